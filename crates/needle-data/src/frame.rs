//! Logs and tables handed over in memory as Arrow record batches (a pandas, Polars or pyarrow
//! table through the Arrow C data interface), read by the same readers as Parquet files, so a
//! DataFrame and the Parquet file it would be written to give the same dataset.

use std::path::{Path, PathBuf};

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, SchemaRef};

use crate::batches::Batches;
use crate::csv::{Schema, Side};
use crate::dataset::{Dataset, LoadOptions, Parts};
use crate::error::{DataError, Result};

/// A table in memory: record batches of one schema.
pub struct Frame {
    /// What errors call it (`events`, `items`, `users`).
    name: PathBuf,
    schema: SchemaRef,
    batches: Vec<RecordBatch>,
}

impl Frame {
    /// A table of `batches`, all of `schema`; `name` is what errors call it.
    pub fn new(name: &str, schema: SchemaRef, batches: Vec<RecordBatch>) -> Result<Frame> {
        if let Some(b) = batches.iter().find(|b| b.schema().fields() != schema.fields()) {
            return Err(DataError::Schema {
                path: name.into(),
                reason: format!("a record batch has columns {:?}, unlike the table's", b.schema().fields()),
            });
        }
        Ok(Frame { name: name.into(), schema, batches })
    }

    /// Column names, in order.
    pub fn columns(&self) -> Vec<String> {
        self.names()
    }

    /// Number of rows.
    pub fn len(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes held by the table's arrays.
    pub fn memory_size(&self) -> usize {
        self.batches.iter().map(RecordBatch::get_array_memory_size).sum()
    }
}

impl Batches for Frame {
    fn origin(&self) -> &Path {
        &self.name
    }

    fn names(&self) -> Vec<String> {
        self.schema.fields().iter().map(|f| f.name().clone()).collect()
    }

    fn field(&self, i: usize) -> (String, DataType) {
        let f = self.schema.field(i);
        (f.name().clone(), f.data_type().clone())
    }

    fn rows(&self) -> u64 {
        self.len() as u64
    }

    fn size(&self) -> u64 {
        self.len() as u64
    }

    /// One row group: rows are numbered from the table's first.
    fn scan(&self, columns: &[usize], mut each: impl FnMut(&[ArrayRef], usize, usize) -> Result<()>) -> Result<()> {
        let mut row = 0;
        let mut arrays = Vec::with_capacity(columns.len());
        for b in &self.batches {
            arrays.clear();
            arrays.extend(columns.iter().map(|&c| b.column(c).clone()));
            each(&arrays, 0, row)?;
            row += b.num_rows();
        }
        Ok(())
    }
}

/// A dataset named `name` from an events table and optional item and user tables, their columns
/// as `schema` names them (its file paths are not read). `progress` gets `(rows, total rows)`
/// of the events.
pub fn load_frames(
    name: &str,
    schema: &Schema,
    events: &Frame,
    items: Option<&Frame>,
    users: Option<&Frame>,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Dataset> {
    let mut parts: Parts = crate::batches::read_log(events, schema, &events.name, opts, progress)?;
    for (table, frame, side) in [(&schema.items, items, Side::Items), (&schema.users, users, Side::Users)] {
        match (table, frame) {
            (Some(t), Some(f)) => crate::batches::read_table(f, t, side, &f.name, opts, &mut parts)?,
            (None, None) => {}
            (Some(_), None) | (None, Some(_)) => {
                return Err(DataError::Schema {
                    path: events.name.clone(),
                    reason: "a side table needs both its frame and its columns".into(),
                })
            }
        }
    }
    Ok(parts.finish(name))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csv::{Column, EntityTable, FeatureColumn, InteractionsSchema};
    use arrow_array::{Int64Array, StringArray};
    use arrow_schema::{Field, Schema as ArrowSchema};
    use std::sync::Arc;

    fn frame(name: &str, columns: Vec<(&str, ArrayRef)>, split_at: usize) -> Frame {
        let fields: Vec<Field> = columns.iter().map(|(n, a)| Field::new(*n, a.data_type().clone(), true)).collect();
        let schema = Arc::new(ArrowSchema::new(fields));
        let whole = RecordBatch::try_new(schema.clone(), columns.into_iter().map(|c| c.1).collect()).unwrap();
        let n = whole.num_rows();
        let batches = vec![whole.slice(0, split_at), whole.slice(split_at, n - split_at)];
        Frame::new(name, schema, batches).unwrap()
    }

    fn schema(user: &str) -> Schema {
        let name = |s: &str| Column::Name(s.into());
        Schema {
            name: None,
            interactions: InteractionsSchema {
                path: "events".into(),
                format: None,
                delimiter: ",".into(),
                header: true,
                user: name(user),
                item: name("item"),
                timestamp: name("ts"),
                rating: None,
            },
            user_features: vec![],
            item_features: vec![],
            items: Some(EntityTable {
                path: "items".into(),
                format: None,
                delimiter: ",".into(),
                header: true,
                id: name("item"),
                title: Some(name("title")),
                features: vec![FeatureColumn { column: name("genres"), separator: Some("|".into()), name: None }],
            }),
            users: None,
        }
    }

    #[test]
    fn events_and_catalogue_across_batches() {
        let events = frame(
            "events",
            vec![
                ("user", Arc::new(StringArray::from(vec!["a", "b", "a", "c"])) as ArrayRef),
                ("item", Arc::new(Int64Array::from(vec![1, 2, 2, 3])) as ArrayRef),
                ("ts", Arc::new(Int64Array::from(vec![10, 11, 12, 13])) as ArrayRef),
            ],
            1,
        );
        let items = frame(
            "items",
            vec![
                ("item", Arc::new(Int64Array::from(vec![1, 2, 4])) as ArrayRef),
                ("title", Arc::new(StringArray::from(vec!["one", "two", "four"])) as ArrayRef),
                ("genres", Arc::new(StringArray::from(vec!["x|y", "y", "z"])) as ArrayRef),
            ],
            2,
        );
        let opts = LoadOptions::default();
        let ds = load_frames("t", &schema("user"), &events, Some(&items), None, &opts, &mut |_, _| {}).unwrap();
        assert_eq!(ds.user_ids, vec!["a", "b", "c"]);
        assert_eq!(ds.item_ids, vec!["1", "2", "3", "4"]);
        assert_eq!(ds.events.len(), 4);
        assert_eq!(ds.item_title(3), Some("four"));
        assert_eq!(ds.item_feature("genres").unwrap().values_of(0).collect::<Vec<_>>(), vec!["x", "y"]);

        // A list column is a multi-valued feature, each element one value.
        let mut genres = arrow_array::builder::ListBuilder::new(arrow_array::builder::StringBuilder::new());
        for row in [vec!["x", "y"], vec!["y"], vec![]] {
            row.iter().for_each(|v| genres.values().append_value(v));
            genres.append(true);
        }
        let listed = frame(
            "items",
            vec![
                ("item", Arc::new(Int64Array::from(vec![1, 2, 4])) as ArrayRef),
                ("title", Arc::new(StringArray::from(vec!["one", "two", "four"])) as ArrayRef),
                ("genres", Arc::new(genres.finish()) as ArrayRef),
            ],
            1,
        );
        let mut no_sep = schema("user");
        no_sep.items.as_mut().unwrap().features[0].separator = None;
        let ds = load_frames("t", &no_sep, &events, Some(&listed), None, &opts, &mut |_, _| {}).unwrap();
        let g = ds.item_feature("genres").unwrap();
        assert!(g.multi);
        assert_eq!(g.values_of(0).collect::<Vec<_>>(), vec!["x", "y"]);
        assert_eq!(g.values_of(1).collect::<Vec<_>>(), vec!["y"]);
        assert_eq!(g.values_of(3).count(), 0);

        let err = load_frames("t", &schema("usr"), &events, Some(&items), None, &opts, &mut |_, _| {})
            .unwrap_err()
            .to_string();
        assert!(err.contains("\"usr\" not found") && err.contains("user, item, ts"), "{err}");
        let err = load_frames("t", &schema("user"), &events, None, None, &opts, &mut |_, _| {}).unwrap_err();
        assert!(err.to_string().contains("side table"), "{err}");
    }
}
