//! Generic interaction logs described by a small TOML schema, so datasets other than
//! MovieLens can be used without writing code.
//!
//! Parsing is deliberately simple: fields are split on the delimiter string, trimmed, and one
//! pair of surrounding double quotes is removed. Quoted fields containing the delimiter or
//! newlines (full RFC 4180) are NOT supported; convert such files first.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, Event, FeatureBuilder, LoadOptions, Parts};
use crate::error::{DataError, Result};
use crate::text::{parse_f32, parse_i64, read_file, show, Lines, RowSink};

/// Top level of a schema file. Unknown keys are rejected so typos do not silently fall
/// back to defaults.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schema {
    /// Dataset name; defaults to the schema file's stem.
    #[serde(default)]
    pub name: Option<String>,
    /// The interaction log.
    pub interactions: InteractionsSchema,
    /// User features taken from columns of the interaction log.
    #[serde(default)]
    pub user_features: Vec<FeatureColumn>,
    /// Item features taken from columns of the interaction log.
    #[serde(default)]
    pub item_features: Vec<FeatureColumn>,
}

/// Where the interaction log is and which columns hold what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InteractionsSchema {
    /// Log file; a relative path resolves against the schema file's folder so a schema and
    /// its data can be moved together.
    pub path: PathBuf,
    /// Field separator, any non-empty string (",", "\t", ";", "::"). Default ",".
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    /// Whether the first line is a header row. Default false: a header mistakenly read as
    /// data fails loudly (non-numeric timestamp) whereas the reverse would silently drop a row.
    #[serde(default)]
    pub header: bool,
    /// User id column.
    pub user: Column,
    /// Item id column.
    pub item: Column,
    /// Integer timestamp column (seconds or any monotone integer); splits order by it.
    pub timestamp: Column,
    /// Optional float rating column; an empty field means no rating.
    #[serde(default)]
    pub rating: Option<Column>,
}

/// A column reference: header name (string) or 0-based index (integer).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Column {
    /// 0-based position, works with or without a header.
    Index(usize),
    /// Header name; requires `header = true`.
    Name(String),
}

/// A categorical side feature read from a column of the interaction log. Each entity takes
/// the value of its first row in file order (later rows are ignored) so features are stable.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureColumn {
    /// Column holding the value.
    pub column: Column,
    /// When present the feature is multi-valued and the field is split on this string.
    #[serde(default)]
    pub separator: Option<String>,
    /// Feature name; default is the header name, or "col<idx>" without a header.
    #[serde(default)]
    pub name: Option<String>,
}

fn default_delimiter() -> String {
    ",".to_owned()
}

impl Schema {
    /// Reads and parses a schema file.
    pub fn from_path(path: &Path) -> Result<Schema> {
        let bytes = read_file(path)?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|e| DataError::Schema { path: path.to_path_buf(), reason: format!("not valid UTF-8: {e}") })?;
        Schema::from_toml(text, path)
    }

    /// Parses schema text; `path` is only used in error messages.
    pub fn from_toml(text: &str, path: &Path) -> Result<Schema> {
        let schema: Schema = toml::from_str(text)
            .map_err(|e| DataError::Schema { path: path.to_path_buf(), reason: e.to_string().trim_end().to_owned() })?;
        let bad = |reason: &str| Err(DataError::Schema { path: path.to_path_buf(), reason: reason.to_owned() });
        if schema.interactions.delimiter.is_empty() {
            return bad("interactions.delimiter must not be empty");
        }
        let feats = schema.user_features.iter().chain(&schema.item_features);
        for f in feats {
            if f.separator.as_deref() == Some("") {
                return bad("feature separator must not be empty");
            }
        }
        Ok(schema)
    }
}

/// Removes surrounding whitespace and one pair of surrounding double quotes.
fn clean(field: &str) -> &str {
    let f = field.trim();
    f.strip_prefix('"').and_then(|s| s.strip_suffix('"')).unwrap_or(f)
}

/// Resolves a column reference to an index, with errors that point at the schema file.
fn resolve(
    col: &Column,
    header: Option<&[String]>,
    n_fields: Option<usize>,
    schema_path: &Path,
    data_path: &Path,
) -> Result<usize> {
    let err = |reason: String| DataError::Schema { path: schema_path.to_path_buf(), reason };
    match (col, header) {
        (Column::Name(name), Some(h)) => h.iter().position(|c| c == name).ok_or_else(|| {
            err(format!(
                "column {name:?} not found in the header of {} (columns: {})",
                data_path.display(),
                h.join(", ")
            ))
        }),
        (Column::Name(name), None) => Err(err(format!(
            "column {name:?} is a name but interactions.header = false; use a 0-based index or set header = true"
        ))),
        (Column::Index(i), _) => match n_fields {
            Some(n) if *i >= n => {
                Err(err(format!("column index {i} out of range: {} has {n} columns", data_path.display())))
            }
            _ => Ok(*i),
        },
    }
}

/// A resolved feature column.
struct FeatureSpec {
    col: usize,
    sep: Option<String>,
    builder: FeatureBuilder,
}

fn feature_specs(
    cols: &[FeatureColumn],
    header: Option<&[String]>,
    n_fields: Option<usize>,
    schema_path: &Path,
    data_path: &Path,
) -> Result<Vec<FeatureSpec>> {
    cols.iter()
        .map(|fc| {
            let col = resolve(&fc.column, header, n_fields, schema_path, data_path)?;
            let name = match (&fc.name, &fc.column) {
                (Some(n), _) => n.clone(),
                (None, Column::Name(n)) => n.clone(),
                (None, Column::Index(i)) => format!("col{i}"),
            };
            Ok(FeatureSpec {
                col,
                sep: fc.separator.clone(),
                builder: FeatureBuilder::new(name, fc.separator.is_some()),
            })
        })
        .collect()
}

/// Sets the entity's feature values from the row unless it already has them.
fn apply_features(specs: &mut [FeatureSpec], entity: usize, fields: &[&str]) {
    for s in specs {
        if s.builder.is_set(entity) {
            continue;
        }
        let v = fields.get(s.col).map_or("", |f| clean(f));
        match &s.sep {
            Some(sep) => s.builder.set(entity, v.split(sep.as_str())),
            None => s.builder.set(entity, [v]),
        }
    }
}

/// Loads the interaction log described by the schema at `schema_path`.
///
/// Every row must have the header's field count (or, without a header, the first row's).
/// Empty user/item ids, non-integer timestamps, non-numeric ratings and invalid UTF-8 make a
/// row bad (error, or skipped with `skip_bad_rows`).
pub fn load_csv(schema_path: &Path, opts: &LoadOptions) -> Result<Dataset> {
    let schema = Schema::from_path(schema_path)?;
    let base = schema_path.parent().unwrap_or(Path::new(""));
    let data_path = base.join(&schema.interactions.path);
    let name = schema.name.clone().unwrap_or_else(|| {
        schema_path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| "csv".to_owned())
    });
    let ix = &schema.interactions;
    let delim = ix.delimiter.as_str();
    let data = read_file(&data_path)?;
    let mut lines = Lines::new(&data).peekable();

    let header: Option<Vec<String>> = if ix.header {
        let Some((line, raw)) = lines.next() else {
            return Err(DataError::Schema {
                path: schema_path.to_path_buf(),
                reason: format!("header = true but {} has no header row", data_path.display()),
            });
        };
        let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(raw);
        let text = std::str::from_utf8(raw).map_err(|_| DataError::BadRow {
            path: data_path.clone(),
            line,
            reason: "header row is not valid UTF-8".to_owned(),
        })?;
        Some(text.split(delim).map(|f| clean(f).to_owned()).collect())
    } else {
        None
    };
    // Without a header the first data row fixes the expected width.
    let n_fields = match &header {
        Some(h) => Some(h.len()),
        None => lines.peek().map(|(_, row)| String::from_utf8_lossy(row).split(delim).count()),
    };
    let h = header.as_deref();
    let col = |c: &Column| resolve(c, h, n_fields, schema_path, &data_path);
    let (uc, ic, tc) = (col(&ix.user)?, col(&ix.item)?, col(&ix.timestamp)?);
    let rc = ix.rating.as_ref().map(col).transpose()?;
    let mut ufeats = feature_specs(&schema.user_features, h, n_fields, schema_path, &data_path)?;
    let mut ifeats = feature_specs(&schema.item_features, h, n_fields, schema_path, &data_path)?;

    let mut parts = Parts::new();
    let mut sink = RowSink::new(&data_path, opts.skip_bad_rows);
    let mut fields: Vec<&str> = Vec::new();
    let shown_delim = delim.escape_debug().to_string();
    parts.events.reserve(data.len() / 24);
    for (line, raw) in lines {
        let Ok(row) = std::str::from_utf8(raw) else {
            sink.bad(line, || "invalid UTF-8".to_owned())?;
            continue;
        };
        fields.clear();
        fields.extend(row.split(delim));
        if let Some(n) = n_fields {
            if fields.len() != n {
                let found = fields.len();
                sink.bad(line, || format!("expected {n} fields separated by \"{shown_delim}\", found {found}"))?;
                continue;
            }
        }
        let get = |i: usize| fields.get(i).map_or("", |f| clean(f));
        let (user, item, ts) = (get(uc), get(ic), get(tc));
        if user.is_empty() {
            sink.bad(line, || "empty user id".to_owned())?;
            continue;
        }
        if item.is_empty() {
            sink.bad(line, || "empty item id".to_owned())?;
            continue;
        }
        let Some(ts) = parse_i64(ts.as_bytes()) else {
            sink.bad(line, || format!("timestamp {} is not an integer", show(ts.as_bytes())))?;
            continue;
        };
        let rating = match rc.map(get) {
            None | Some("") => None,
            Some(r) => match parse_f32(r.as_bytes()) {
                Some(v) => Some(v),
                None => {
                    sink.bad(line, || format!("rating {} is not a number", show(r.as_bytes())))?;
                    continue;
                }
            },
        };
        let u = parts.users.intern(user)?;
        let i = parts.items.intern(item)?;
        parts.events.push(Event { user: u, item: i, ts, rating });
        apply_features(&mut ufeats, u as usize, &fields);
        apply_features(&mut ifeats, i as usize, &fields);
    }
    sink.finish(&mut parts.report);
    parts.user_features = ufeats.into_iter().map(|s| s.builder).collect();
    parts.item_features = ifeats.into_iter().map(|s| s.builder).collect();
    Ok(parts.finish(&name))
}
