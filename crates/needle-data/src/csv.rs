//! Generic interaction logs described by a small TOML schema, so datasets other than
//! MovieLens can be used without writing code.
//!
//! Parsing is deliberately simple: fields are split on the delimiter string, trimmed, and one
//! pair of surrounding double quotes is removed. Quoted fields containing the delimiter or
//! newlines (full RFC 4180) are NOT supported; convert such files first.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Event, FeatureBuilder, LoadOptions, Parts};
use crate::error::{DataError, Result};
use crate::text::{parse_f32, parse_i64, read_file, show, LineReader, RowSink};

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
    /// A catalogue: one row per item with its features and display fields. Items listed here
    /// but absent from the log are still part of the dataset.
    #[serde(default)]
    pub items: Option<EntityTable>,
    /// A user table: one row per user with profile features.
    #[serde(default)]
    pub users: Option<EntityTable>,
}

/// A side table keyed by item or user id (CSV/TSV or Parquet). The first row of an id wins.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityTable {
    /// Table file, relative to the schema's folder.
    pub path: PathBuf,
    /// As for the log.
    #[serde(default)]
    pub format: Option<FileFormat>,
    #[serde(default = "default_delimiter")]
    pub delimiter: String,
    #[serde(default)]
    pub header: bool,
    /// Id column.
    pub id: Column,
    /// Display title (items only); what the server returns as the item's title.
    #[serde(default)]
    pub title: Option<Column>,
    /// Categorical features, as for the log's feature columns.
    #[serde(default)]
    pub features: Vec<FeatureColumn>,
}

/// Where the interaction log is and which columns hold what.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InteractionsSchema {
    /// Log file; a relative path resolves against the schema file's folder so a schema and
    /// its data can be moved together.
    pub path: PathBuf,
    /// `csv` (also TSV and any delimiter) or `parquet`; default: `parquet` for a `.parquet` /
    /// `.pq` path, else `csv`.
    #[serde(default)]
    pub format: Option<FileFormat>,
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

/// How a log or table file is encoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FileFormat {
    Csv,
    Parquet,
}

impl FileFormat {
    /// The explicit format, else one from the file's extension.
    pub(crate) fn of(explicit: Option<FileFormat>, path: &Path) -> FileFormat {
        explicit.unwrap_or_else(|| match path.extension().and_then(|e| e.to_str()) {
            Some(e) if e.eq_ignore_ascii_case("parquet") || e.eq_ignore_ascii_case("pq") => FileFormat::Parquet,
            _ => FileFormat::Csv,
        })
    }
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
        let tables = schema.items.iter().chain(&schema.users);
        let feats = schema.user_features.iter().chain(&schema.item_features).chain(tables.flat_map(|t| &t.features));
        for f in feats {
            if f.separator.as_deref() == Some("") {
                return bad("feature separator must not be empty");
            }
        }
        for t in schema.items.iter().chain(&schema.users) {
            if t.delimiter.is_empty() {
                return bad("table delimiter must not be empty");
            }
        }
        if schema.users.as_ref().is_some_and(|t| t.title.is_some()) {
            return bad("users.title is not supported (titles are item display fields)");
        }
        for (side, log, table) in
            [("item", &schema.item_features, &schema.items), ("user", &schema.user_features, &schema.users)]
        {
            let names: Vec<String> = log
                .iter()
                .chain(table.iter().flat_map(|t| &t.features))
                .map(|f| match (&f.name, &f.column) {
                    (Some(n), _) | (None, Column::Name(n)) => n.clone(),
                    (None, Column::Index(i)) => format!("col{i}"),
                })
                .collect();
            for (i, n) in names.iter().enumerate() {
                if names[..i].contains(n) {
                    return bad(&format!("{side} feature {n:?} is defined twice"));
                }
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
pub(crate) fn resolve(
    col: &Column,
    header: Option<&[String]>,
    n_fields: Option<usize>,
    schema_path: &Path,
    data_path: &Path,
) -> Result<usize> {
    let err = |reason: String| DataError::Schema { path: schema_path.to_path_buf(), reason };
    match (col, header) {
        (Column::Name(name), Some(h)) => h.iter().position(|c| c == name).ok_or_else(|| {
            err(format!("column {name:?} not found in {} (columns: {})", data_path.display(), h.join(", ")))
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
pub(crate) struct FeatureSpec {
    pub(crate) col: usize,
    sep: Option<String>,
    pub(crate) builder: FeatureBuilder,
}

impl FeatureSpec {
    pub(crate) fn is_set(&self, entity: usize) -> bool {
        self.builder.is_set(entity)
    }

    /// Makes the feature multi-valued (a list column), before any value is read.
    pub(crate) fn make_multi(&mut self) {
        let name = std::mem::take(&mut self.builder.name);
        self.builder = FeatureBuilder::new(name, true);
    }

    /// Sets the entity's values, each one value, unless it already has them.
    pub(crate) fn set_values<'a>(&mut self, entity: usize, values: impl IntoIterator<Item = &'a str>) {
        if !self.builder.is_set(entity) {
            self.builder.set(entity, values.into_iter().map(clean));
        }
    }

    /// Sets the entity's values from one raw field unless it already has them.
    pub(crate) fn apply(&mut self, entity: usize, raw: &str) {
        if self.builder.is_set(entity) {
            return;
        }
        let v = clean(raw);
        match &self.sep {
            Some(sep) => self.builder.set(entity, v.split(sep.as_str())),
            None => self.builder.set(entity, [v]),
        }
    }
}

pub(crate) fn feature_specs(
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

/// One row's fields as spans into the row text.
struct Fields<'a> {
    row: &'a str,
    spans: &'a [(usize, usize)],
}

impl<'a> Fields<'a> {
    /// Splits `row` on `delim`, keeping the boundaries in `spans` (reused across rows).
    fn split(row: &'a str, delim: &str, spans: &'a mut Vec<(usize, usize)>) -> Fields<'a> {
        spans.clear();
        let mut start = 0;
        for (i, _) in row.match_indices(delim) {
            spans.push((start, i));
            start = i + delim.len();
        }
        spans.push((start, row.len()));
        Fields { row, spans }
    }

    fn len(&self) -> usize {
        self.spans.len()
    }

    /// Field `i`, or "" past the end.
    fn get(&self, i: usize) -> &str {
        self.spans.get(i).and_then(|&(a, b)| self.row.get(a..b)).unwrap_or("")
    }
}

/// Sets the entity's feature values from the row unless it already has them.
fn apply_features(specs: &mut [FeatureSpec], entity: usize, fields: &Fields<'_>) {
    for s in specs {
        s.apply(entity, fields.get(s.col));
    }
}

/// Reads a text (CSV/TSV) interaction log described by `schema` into parts: the events and the
/// features its rows carry. The file is read through a fixed buffer, so memory grows with the
/// ids and events kept, not the file; `progress` gets `(bytes read, file length)`.
///
/// Every row must have the header's field count (or, without a header, the first row's).
/// Empty user/item ids, non-integer timestamps, non-numeric ratings and invalid UTF-8 make a
/// row bad (error, or skipped with `skip_bad_rows`).
pub(crate) fn read_log(
    schema: &Schema,
    schema_path: &Path,
    data_path: &Path,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Parts> {
    let ix = &schema.interactions;
    let delim = ix.delimiter.as_str();
    let mut reader = LineReader::open(data_path)?;
    let Head { header, first_row, n_fields } = read_head(&mut reader, ix.header, delim, schema_path, data_path)?;
    let h = header.as_deref();
    let col = |c: &Column| resolve(c, h, n_fields, schema_path, data_path);
    let (uc, ic, tc) = (col(&ix.user)?, col(&ix.item)?, col(&ix.timestamp)?);
    let rc = ix.rating.as_ref().map(col).transpose()?;
    let ufeats = feature_specs(&schema.user_features, h, n_fields, schema_path, data_path)?;
    let ifeats = feature_specs(&schema.item_features, h, n_fields, schema_path, data_path)?;
    let mut rows = RowParser {
        n_fields,
        cols: (uc, ic, tc, rc),
        events: EventSink::new(ufeats.is_empty() && ifeats.is_empty()),
        ufeats,
        ifeats,
        parts: Parts { fingerprint: Some(crate::dataset::FNV1A64_OFFSET), ..Parts::new() },
        sink: RowSink::new(data_path, opts.skip_bad_rows),
        spans: Vec::new(),
        delim,
        shown_delim: delim.escape_debug().to_string(),
    };
    rows.parts.events.reserve(usize::try_from(reader.len / 24).unwrap_or(0).min(1 << 28));
    if let Some((line, raw)) = &first_row {
        rows.row(*line, raw)?;
    }
    let mut n = 0u64;
    while let Some((line, raw)) = reader.next_line()? {
        rows.row(line, raw)?;
        n += 1;
        if n.is_multiple_of(1 << 16) {
            progress(reader.consumed(), reader.len);
        }
    }
    rows.events.flush(&mut rows.parts)?;
    progress(reader.consumed(), reader.len);
    let RowParser { mut parts, sink, ufeats, ifeats, .. } = rows;
    sink.finish(&mut parts.report.skipped);
    parts.user_features = ufeats.into_iter().map(|s| s.builder).collect();
    parts.item_features = ifeats.into_iter().map(|s| s.builder).collect();
    Ok(parts)
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Side {
    Items,
    Users,
}

impl Side {
    /// The key of a table row's id, new ids after the log's.
    pub(crate) fn intern(self, parts: &mut Parts, raw: &str) -> Result<u32> {
        match self {
            Side::Items => parts.items.intern(raw),
            Side::Users => parts.users.intern(raw),
        }
    }

    /// Records a table's skipped rows and hands its features to the dataset.
    pub(crate) fn finish(self, parts: &mut Parts, sink: RowSink, specs: Vec<FeatureSpec>) {
        sink.finish(&mut parts.report.skipped);
        let builders = specs.into_iter().map(|s| s.builder);
        match self {
            Side::Items => parts.item_features.extend(builders),
            Side::Users => parts.user_features.extend(builders),
        }
    }
}

/// Reads a text catalogue or user table into `parts`: ids not in the log get new keys after the
/// log's, features and titles go to the entity (first row wins).
pub(crate) fn read_table(
    t: &EntityTable,
    side: Side,
    schema_path: &Path,
    opts: &LoadOptions,
    parts: &mut Parts,
) -> Result<()> {
    let path = schema_path.parent().unwrap_or(Path::new("")).join(&t.path);
    let delim = t.delimiter.as_str();
    let mut reader = LineReader::open(&path)?;
    let Head { header, first_row, n_fields } = read_head(&mut reader, t.header, delim, schema_path, &path)?;
    let h = header.as_deref();
    let id_col = resolve(&t.id, h, n_fields, schema_path, &path)?;
    let title_col = t.title.as_ref().map(|c| resolve(c, h, n_fields, schema_path, &path)).transpose()?;
    let mut specs = feature_specs(&t.features, h, n_fields, schema_path, &path)?;
    let mut sink = RowSink::new(&path, opts.skip_bad_rows);
    let mut spans: Vec<(usize, usize)> = Vec::new();
    let shown = delim.escape_debug().to_string();
    let mut row = |line: usize, raw: &[u8], parts: &mut Parts| -> Result<()> {
        let Ok(text) = std::str::from_utf8(raw) else {
            return sink.bad(line, || "invalid UTF-8".to_owned());
        };
        let fields = Fields::split(text, delim, &mut spans);
        if let Some(n) = n_fields {
            if fields.len() != n {
                let found = fields.len();
                return sink.bad(line, || format!("expected {n} fields separated by \"{shown}\", found {found}"));
            }
        }
        let id = clean(fields.get(id_col));
        if id.is_empty() {
            return sink.bad(line, || "empty id".to_owned());
        }
        let key = side.intern(parts, id)?;
        apply_features(&mut specs, key as usize, &fields);
        if let Some(c) = title_col {
            let title = clean(fields.get(c));
            if !title.is_empty() {
                crate::dataset::set_title(&mut parts.item_titles, key, title.to_owned());
            }
        }
        Ok(())
    };
    if let Some((line, raw)) = &first_row {
        row(*line, raw, parts)?;
    }
    while let Some((line, raw)) = reader.next_line()? {
        row(line, raw, parts)?;
    }
    side.finish(parts, sink, specs);
    Ok(())
}

/// The start of a table: its header (if it has one), the first data row otherwise, and the
/// field count every row must have.
struct Head {
    header: Option<Vec<String>>,
    first_row: Option<(usize, Vec<u8>)>,
    n_fields: Option<usize>,
}

fn read_head(reader: &mut LineReader, has_header: bool, delim: &str, schema_path: &Path, path: &Path) -> Result<Head> {
    let first = reader.next_line()?.map(|(l, r)| (l, r.to_vec()));
    let (header, first_row): (Option<Vec<String>>, _) = if has_header {
        let Some((line, raw)) = first else {
            return Err(DataError::Schema {
                path: schema_path.to_path_buf(),
                reason: format!("header = true but {} has no header row", path.display()),
            });
        };
        let raw = raw.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(&raw);
        let text = std::str::from_utf8(raw).map_err(|_| DataError::BadRow {
            path: path.to_path_buf(),
            line,
            reason: "header row is not valid UTF-8".to_owned(),
        })?;
        (Some(text.split(delim).map(|f| clean(f).to_owned()).collect()), None)
    } else {
        (None, first)
    };
    // Without a header the first data row fixes the expected width.
    let n_fields = match &header {
        Some(h) => Some(h.len()),
        None => first_row.as_ref().map(|(_, row)| String::from_utf8_lossy(row).split(delim).count()),
    };
    Ok(Head { header, first_row, n_fields })
}

/// Turns rows into events and feature values, with the bad-row policy of the load.
struct RowParser<'a> {
    n_fields: Option<usize>,
    /// User, item, timestamp and optional rating column.
    cols: (usize, usize, usize, Option<usize>),
    ufeats: Vec<FeatureSpec>,
    ifeats: Vec<FeatureSpec>,
    events: EventSink,
    parts: Parts,
    sink: RowSink,
    /// Field boundaries of the current row, reused across rows.
    spans: Vec<(usize, usize)>,
    delim: &'a str,
    shown_delim: String,
}

/// A block of parsed rows waiting to be interned: ids in one string arena, as spans.
#[derive(Default)]
struct Pending {
    arena: String,
    users: Vec<(usize, usize)>,
    items: Vec<(usize, usize)>,
    ts: Vec<i64>,
    ratings: Vec<f32>,
}

/// Rows per interned block: large enough that starting a thread is noise, small enough to stay
/// in cache.
const BLOCK_ROWS: usize = 1 << 16;

impl Pending {
    fn push_id(&mut self, id: &str, user: bool) {
        let start = self.arena.len();
        self.arena.push_str(id);
        let span = (start, self.arena.len());
        if user {
            self.users.push(span);
        } else {
            self.items.push(span);
        }
    }
}

/// Keys of the ids at `spans` of `arena`, in order.
fn intern_all(ids: &mut crate::text::Interner, arena: &str, spans: &[(usize, usize)]) -> Result<Vec<u32>> {
    spans.iter().map(|&(a, b)| ids.intern(arena.get(a..b).unwrap_or(""))).collect()
}

/// Where accepted events go, whatever the file format: folded into the fingerprint, then
/// interned at once or, in block mode, a block at a time with users and items on two threads
/// (the lookups are memory-bound and independent).
pub(crate) struct EventSink {
    pending: Option<Pending>,
}

impl EventSink {
    /// Block mode needs no keys per row, so it is for logs without feature columns.
    pub(crate) fn new(blocks: bool) -> Self {
        EventSink { pending: blocks.then(Pending::default) }
    }

    /// Takes one event. `rating` is `None` when the log has no rating column. Returns the keys
    /// when interned at once (not in block mode).
    pub(crate) fn accept(
        &mut self,
        parts: &mut Parts,
        user: &str,
        item: &str,
        ts: i64,
        rating: Option<Option<f32>>,
    ) -> Result<Option<(u32, u32)>> {
        if let Some(h) = &mut parts.fingerprint {
            *h = crate::dataset::fingerprint_event(*h, user, item, ts);
        }
        if let Some(p) = &mut self.pending {
            p.push_id(user, true);
            p.push_id(item, false);
            p.ts.push(ts);
            if let Some(r) = rating {
                p.ratings.push(r.unwrap_or(f32::NAN));
            }
            if p.ts.len() >= BLOCK_ROWS {
                self.flush(parts)?;
            }
            return Ok(None);
        }
        let u = parts.users.intern(user)?;
        let i = parts.items.intern(item)?;
        parts.events.push(Event { user: u, item: i, ts });
        if let Some(r) = rating {
            parts.ratings.push(r.unwrap_or(f32::NAN));
        }
        Ok(Some((u, i)))
    }

    /// Interns the pending block and appends its events.
    pub(crate) fn flush(&mut self, parts: &mut Parts) -> Result<()> {
        let Some(p) = &mut self.pending else {
            return Ok(());
        };
        let (users, items) = (&mut parts.users, &mut parts.items);
        let (arena, us, is) = (&p.arena, &p.users, &p.items);
        let (ukeys, ikeys) = std::thread::scope(|s| {
            let items_done = s.spawn(|| intern_all(items, arena, is));
            let ukeys = intern_all(users, arena, us);
            let ikeys = match items_done.join() {
                Ok(r) => r,
                Err(panic) => std::panic::resume_unwind(panic),
            };
            (ukeys, ikeys)
        });
        let (ukeys, ikeys) = (ukeys?, ikeys?);
        for ((&user, &item), &ts) in ukeys.iter().zip(&ikeys).zip(&p.ts) {
            parts.events.push(Event { user, item, ts });
        }
        parts.ratings.extend_from_slice(&p.ratings);
        p.arena.clear();
        p.users.clear();
        p.items.clear();
        p.ts.clear();
        p.ratings.clear();
        Ok(())
    }
}

impl RowParser<'_> {
    fn row(&mut self, line: usize, raw: &[u8]) -> Result<()> {
        let Ok(row) = std::str::from_utf8(raw) else {
            return self.sink.bad(line, || "invalid UTF-8".to_owned());
        };
        let fields = Fields::split(row, self.delim, &mut self.spans);
        Self::fields_row(
            line,
            &fields,
            self.n_fields,
            self.cols,
            &self.shown_delim,
            &mut self.sink,
            &mut self.parts,
            &mut self.ufeats,
            &mut self.ifeats,
            &mut self.events,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn fields_row(
        line: usize,
        fields: &Fields<'_>,
        n_fields: Option<usize>,
        cols: (usize, usize, usize, Option<usize>),
        shown_delim: &str,
        sink: &mut RowSink,
        parts: &mut Parts,
        ufeats: &mut [FeatureSpec],
        ifeats: &mut [FeatureSpec],
        events: &mut EventSink,
    ) -> Result<()> {
        if let Some(n) = n_fields {
            if fields.len() != n {
                let found = fields.len();
                return sink.bad(line, || format!("expected {n} fields separated by \"{shown_delim}\", found {found}"));
            }
        }
        let (uc, ic, tc, rc) = cols;
        let get = |i: usize| clean(fields.get(i));
        let (user, item, ts) = (get(uc), get(ic), get(tc));
        if user.is_empty() {
            return sink.bad(line, || "empty user id".to_owned());
        }
        if item.is_empty() {
            return sink.bad(line, || "empty item id".to_owned());
        }
        let Some(ts) = parse_i64(ts.as_bytes()) else {
            return sink.bad(line, || format!("timestamp {} is not an integer", show(ts.as_bytes())));
        };
        let rating = match rc.map(get) {
            None | Some("") => None,
            Some(r) => match parse_f32(r.as_bytes()) {
                Some(v) => Some(v),
                None => return sink.bad(line, || format!("rating {} is not a number", show(r.as_bytes()))),
            },
        };
        if let Some((u, i)) = events.accept(parts, user, item, ts, rc.map(|_| rating))? {
            apply_features(ufeats, u as usize, fields);
            apply_features(ifeats, i as usize, fields);
        }
        Ok(())
    }
}
