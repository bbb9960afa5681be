//! Logs described by a schema file: the interactions and the optional catalogue and user
//! tables, each a text (CSV/TSV) or Parquet file, read by the reader of its format into one
//! dataset.

use std::path::Path;

use crate::csv::{FileFormat, Schema, Side};
use crate::dataset::{Dataset, LoadOptions, Parts};
use crate::error::Result;

/// Loads the interaction log described by the schema at `schema_path`, with its tables.
pub fn load_csv(schema_path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    load_csv_with(schema_path, opts, &mut |_, _| {})
}

/// [`load_csv`] that reports `(bytes read, file length)` as it streams the log.
pub fn load_csv_with(schema_path: &Path, opts: &LoadOptions, progress: &mut dyn FnMut(u64, u64)) -> Result<Dataset> {
    let schema = Schema::from_path(schema_path)?;
    let base = schema_path.parent().unwrap_or(Path::new(""));
    let data_path = base.join(&schema.interactions.path);
    let name = schema.name.clone().unwrap_or_else(|| {
        schema_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "csv".to_owned())
    });
    let mut parts = match FileFormat::of(schema.interactions.format, &data_path) {
        FileFormat::Parquet => crate::parquet_log::read_log(&schema, schema_path, &data_path, opts, progress)?,
        FileFormat::Csv => crate::csv::read_log(&schema, schema_path, &data_path, opts, progress)?,
    };
    load_tables(&schema, schema_path, opts, &mut parts)?;
    Ok(parts.finish(&name))
}

fn load_tables(schema: &Schema, schema_path: &Path, opts: &LoadOptions, parts: &mut Parts) -> Result<()> {
    for (table, side) in [(&schema.items, Side::Items), (&schema.users, Side::Users)] {
        let Some(t) = table else { continue };
        let path = schema_path.parent().unwrap_or(Path::new("")).join(&t.path);
        match FileFormat::of(t.format, &path) {
            FileFormat::Csv => crate::csv::read_table(t, side, schema_path, opts, parts)?,
            FileFormat::Parquet => crate::parquet_log::read_table(t, side, schema_path, &path, opts, parts)?,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, RecordBatch};
    use arrow_array::{Float64Array, Int64Array, StringArray, TimestampMillisecondArray};
    use arrow_schema::{Field, Schema as ArrowSchema};
    use std::fs::File;
    use std::sync::Arc;

    fn write(path: &Path, columns: Vec<(&str, ArrayRef)>) {
        let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
        let schema = Arc::new(ArrowSchema::new(fields));
        let batch = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).unwrap();
        let mut w = parquet::arrow::ArrowWriter::try_new(File::create(path).unwrap(), schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
    }

    const SCHEMA: &str = r#"
[interactions]
path = "log.parquet"
user = "user"
item = "item"
timestamp = "ts"
rating = "rating"
[[user_features]]
column = "country"
"#;

    #[test]
    fn types_nulls_and_timestamps() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path();
        write(
            &p.join("log.parquet"),
            vec![
                ("user", Arc::new(StringArray::from(vec![Some("u1"), Some("u2"), None, Some("u1")])) as ArrayRef),
                ("item", Arc::new(Int64Array::from(vec![10, 20, 30, 20])) as ArrayRef),
                ("ts", Arc::new(TimestampMillisecondArray::from(vec![5_000, 6_999, 7_000, 8_000])) as ArrayRef),
                ("rating", Arc::new(Float64Array::from(vec![Some(4.5), None, Some(1.0), Some(2.0)])) as ArrayRef),
                ("country", Arc::new(StringArray::from(vec!["de", "fr", "it", "es"])) as ArrayRef),
            ],
        );
        std::fs::write(p.join("s.toml"), SCHEMA).unwrap();
        let strict = crate::dataset::LoadOptions { skip_bad_rows: false };
        let err = load_csv(&p.join("s.toml"), &strict).unwrap_err().to_string();
        assert!(err.contains("log.parquet: column \"user\", row group 0, row 2: null id"), "{err}");
        let lenient = crate::dataset::LoadOptions { skip_bad_rows: true };
        let ds = load_csv(&p.join("s.toml"), &lenient).unwrap();
        assert_eq!(ds.user_ids, vec!["u1", "u2"]);
        assert_eq!(ds.item_ids, vec!["10", "20"]);
        assert_eq!(ds.events.iter().map(|e| e.ts).collect::<Vec<_>>(), vec![5, 6, 8]);
        assert_eq!((ds.rating(0), ds.rating(1)), (Some(4.5), None));
        assert_eq!(ds.report.skipped_total(), 1);
        assert_eq!(ds.user_feature("country").unwrap().values_of(0).collect::<Vec<_>>(), vec!["de"]);

        // A float column can never hold ids.
        write(
            &p.join("log.parquet"),
            vec![
                ("user", Arc::new(Float64Array::from(vec![1.5])) as ArrayRef),
                ("item", Arc::new(Int64Array::from(vec![10])) as ArrayRef),
                ("ts", Arc::new(Int64Array::from(vec![1])) as ArrayRef),
                ("rating", Arc::new(Float64Array::from(vec![1.0])) as ArrayRef),
                ("country", Arc::new(StringArray::from(vec!["de"])) as ArrayRef),
            ],
        );
        let err = load_csv(&p.join("s.toml"), &lenient).unwrap_err().to_string();
        assert!(err.contains("column \"user\"") && err.contains("Float64"), "{err}");
    }
}
