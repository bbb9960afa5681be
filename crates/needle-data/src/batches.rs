//! Logs and tables held in Arrow record batches, whether read from a Parquet file or handed
//! over in memory (a DataFrame through the Arrow C data interface), described by the same
//! schema as CSV ones: columns by name (or position), read column-wise, only the columns the
//! schema names.
//!
//! Ids may be strings or integers (integers become their decimal text, so a log and a catalogue
//! written by different tools still agree); timestamps integers, Arrow timestamps (taken in
//! seconds) or strings holding integers; ratings any number. A null or unparsable value is a bad
//! row, skipped and counted with `skip_bad_rows`, else an error naming the source, column, row
//! group and row; a column of a type that can never hold the value (a float id) is an error.

use std::path::Path;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef};
use arrow_schema::{DataType, TimeUnit};

use crate::csv::{feature_specs, resolve, Column, EntityTable, EventSink, FeatureSpec, Schema, Side};
use crate::dataset::Parts;
use crate::error::{DataError, Result};
use crate::text::RowSink;

/// Columns of record batches, scanned a batch at a time.
pub(crate) trait Batches {
    /// What errors name as the source: the file, or the table's name.
    fn origin(&self) -> &Path;
    /// Column names, in order.
    fn names(&self) -> Vec<String>;
    /// Name and type of column `i`.
    fn field(&self, i: usize) -> (String, DataType);
    fn rows(&self) -> u64;
    /// What progress counts up to: bytes of a file, rows of a table in memory.
    fn size(&self) -> u64;
    /// Calls `each` with every batch of `columns` (batch columns in the order of `columns`),
    /// its row group, and the row of its first line within the group.
    fn scan(&self, columns: &[usize], each: impl FnMut(&[ArrayRef], usize, usize) -> Result<()>) -> Result<()>;
}

/// The index of a schema column, or an error listing the source's columns; the field names
/// play the part of a CSV header.
fn column(src: &impl Batches, col: &Column, schema_path: &Path) -> Result<usize> {
    let names = src.names();
    resolve(col, Some(&names), Some(names.len()), schema_path, src.origin())
}

/// What a value of a column is used as, for type checks and messages.
#[derive(Clone, Copy, PartialEq)]
enum Role {
    Text,
    Integer,
    Number,
}

/// Checks a column's type once, before any row is read.
fn check_type(src: &impl Batches, column: usize, role: Role) -> Result<()> {
    let (name, data_type) = src.field(column);
    let ok = match &data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => true,
        DataType::Int32 | DataType::Int64 | DataType::UInt32 | DataType::UInt64 => true,
        DataType::Timestamp(_, _) => role != Role::Text,
        DataType::Float32 | DataType::Float64 => role == Role::Number,
        _ => false,
    };
    if ok {
        return Ok(());
    }
    let want = match role {
        Role::Text => "strings or integers",
        Role::Integer => "integers, timestamps or strings of digits",
        Role::Number => "numbers",
    };
    Err(DataError::BadValue {
        path: src.origin().to_path_buf(),
        column: name,
        row_group: 0,
        row: 0,
        reason: format!("the column holds {data_type}, expected {want}"),
    })
}

/// Checks a feature column's type: text or integers, or a list of them (a multi-valued feature,
/// each element one value, as a DataFrame holds genres).
fn feature_type(src: &impl Batches, f: &mut FeatureSpec) -> Result<()> {
    let (_, data_type) = src.field(f.col);
    match &data_type {
        DataType::List(inner) | DataType::LargeList(inner) => {
            let ok = matches!(
                inner.data_type(),
                DataType::Utf8
                    | DataType::LargeUtf8
                    | DataType::Utf8View
                    | DataType::Int32
                    | DataType::Int64
                    | DataType::UInt32
                    | DataType::UInt64
            );
            if !ok {
                let (name, _) = src.field(f.col);
                return Err(DataError::BadValue {
                    path: src.origin().to_path_buf(),
                    column: name,
                    row_group: 0,
                    row: 0,
                    reason: format!("the column holds {data_type}, expected lists of strings or integers"),
                });
            }
            f.make_multi();
            Ok(())
        }
        _ => check_type(src, f.col, Role::Text),
    }
}

/// Sets `entity`'s values of feature `f` from row `i` of `a`, unless it has them already.
fn feature(f: &mut FeatureSpec, entity: usize, a: &ArrayRef, i: usize, buf: &mut String) {
    if f.is_set(entity) || a.is_null(i) {
        return;
    }
    let list = match a.data_type() {
        DataType::List(_) => a.as_list::<i32>().value(i),
        DataType::LargeList(_) => a.as_list::<i64>().value(i),
        _ => {
            if let Some(v) = text(a, i, buf) {
                f.apply(entity, v);
            }
            return;
        }
    };
    let mut values = Vec::with_capacity(list.len());
    for j in 0..list.len() {
        if let Some(v) = text(&list, j, buf) {
            values.push(v.to_owned());
        }
    }
    f.set_values(entity, values.iter().map(String::as_str));
}

/// Text of row `i` (integers as decimal), `None` when null. `buf` holds formatted integers.
fn text<'a>(a: &'a ArrayRef, i: usize, buf: &'a mut String) -> Option<&'a str> {
    if a.is_null(i) {
        return None;
    }
    use std::fmt::Write;
    let mut int = |v: i128| {
        buf.clear();
        let _ = write!(buf, "{v}");
    };
    match a.data_type() {
        DataType::Utf8 => return Some(a.as_string::<i32>().value(i)),
        DataType::LargeUtf8 => return Some(a.as_string::<i64>().value(i)),
        DataType::Utf8View => return Some(a.as_string_view().value(i)),
        DataType::Int32 => int(i128::from(a.as_primitive::<Int32Type>().value(i))),
        DataType::Int64 => int(i128::from(a.as_primitive::<Int64Type>().value(i))),
        DataType::UInt32 => int(i128::from(a.as_primitive::<UInt32Type>().value(i))),
        DataType::UInt64 => int(i128::from(a.as_primitive::<UInt64Type>().value(i))),
        _ => return None,
    }
    Some(buf.as_str())
}

/// Integer of row `i`: `Ok(None)` when null, `Err` with the reason when not an integer.
fn integer(a: &ArrayRef, i: usize) -> std::result::Result<Option<i64>, String> {
    if a.is_null(i) {
        return Ok(None);
    }
    let v = match a.data_type() {
        DataType::Int32 => i64::from(a.as_primitive::<Int32Type>().value(i)),
        DataType::Int64 => a.as_primitive::<Int64Type>().value(i),
        DataType::UInt32 => i64::from(a.as_primitive::<UInt32Type>().value(i)),
        DataType::UInt64 => {
            let v = a.as_primitive::<UInt64Type>().value(i);
            i64::try_from(v).map_err(|_| format!("{v} does not fit a 64-bit signed integer"))?
        }
        DataType::Timestamp(unit, _) => match unit {
            TimeUnit::Second => a.as_primitive::<TimestampSecondType>().value(i),
            TimeUnit::Millisecond => a.as_primitive::<TimestampMillisecondType>().value(i).div_euclid(1_000),
            TimeUnit::Microsecond => a.as_primitive::<TimestampMicrosecondType>().value(i).div_euclid(1_000_000),
            TimeUnit::Nanosecond => a.as_primitive::<TimestampNanosecondType>().value(i).div_euclid(1_000_000_000),
        },
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            return parsed_text(a, i, crate::text::parse_i64, "an integer");
        }
        other => return Err(format!("{other} is not an integer type")),
    };
    Ok(Some(v))
}

/// A string column's row `i` read as a value by `parse` (text written by tools that keep
/// everything as strings); `what` names the expected kind in the error.
fn parsed_text<T>(
    a: &ArrayRef,
    i: usize,
    parse: fn(&[u8]) -> Option<T>,
    what: &str,
) -> std::result::Result<Option<T>, String> {
    let mut buf = String::new();
    let s = text(a, i, &mut buf).unwrap_or("");
    parse(s.as_bytes()).map(Some).ok_or_else(|| format!("{} is not {what}", crate::text::show(s.as_bytes())))
}

/// Number of row `i`: `Ok(None)` when null.
fn number(a: &ArrayRef, i: usize) -> std::result::Result<Option<f32>, String> {
    if a.is_null(i) {
        return Ok(None);
    }
    let v = match a.data_type() {
        DataType::Float32 => a.as_primitive::<Float32Type>().value(i),
        DataType::Float64 => a.as_primitive::<Float64Type>().value(i) as f32,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
            return parsed_text(a, i, crate::text::parse_f32, "a number");
        }
        _ => return integer(a, i).map(|v| v.map(|v| v as f32)),
    };
    if v.is_finite() {
        Ok(Some(v))
    } else {
        Err(format!("{v} is not a finite number"))
    }
}

/// Reads the interaction log of `schema` from `src`; `progress` gets `(done, src.size())`.
pub(crate) fn read_log(
    src: &impl Batches,
    schema: &Schema,
    schema_path: &Path,
    opts: &crate::dataset::LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Parts> {
    let path = src.origin();
    let names = src.names();
    let ix = &schema.interactions;
    let (uc, ic, tc) = (
        column(src, &ix.user, schema_path)?,
        column(src, &ix.item, schema_path)?,
        column(src, &ix.timestamp, schema_path)?,
    );
    let rc = ix.rating.as_ref().map(|c| column(src, c, schema_path)).transpose()?;
    check_type(src, uc, Role::Text)?;
    check_type(src, ic, Role::Text)?;
    check_type(src, tc, Role::Integer)?;
    if let Some(r) = rc {
        check_type(src, r, Role::Number)?;
    }
    let mut ufeats = feature_specs(&schema.user_features, Some(&names), Some(names.len()), schema_path, path)?;
    let mut ifeats = feature_specs(&schema.item_features, Some(&names), Some(names.len()), schema_path, path)?;
    for f in ufeats.iter_mut().chain(ifeats.iter_mut()) {
        feature_type(src, f)?;
    }
    let mut columns = vec![uc, ic, tc];
    columns.extend(rc);
    let feat_base = columns.len();
    columns.extend(ufeats.iter().chain(&ifeats).map(|f| f.col));

    let mut parts = Parts { fingerprint: Some(crate::dataset::FNV1A64_OFFSET), ..Parts::new() };
    parts.events.reserve(usize::try_from(src.rows()).unwrap_or(0).min(1 << 28));
    let mut events = EventSink::new(ufeats.is_empty() && ifeats.is_empty());
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let (total, size) = (src.rows().max(1), src.size());
    let mut done = 0u64;
    let (mut ubuf, mut ibuf, mut fbuf) = (String::new(), String::new(), String::new());
    src.scan(&columns, |cols, g, first| {
        let n = cols.first().map_or(0, |c| c.len());
        for i in 0..n {
            let bad = |c: usize, reason: String| DataError::BadValue {
                path: path.to_path_buf(),
                column: names.get(columns[c]).cloned().unwrap_or_default(),
                row_group: g,
                row: first + i,
                reason,
            };
            let (Some(user), Some(item)) = (text(&cols[0], i, &mut ubuf), text(&cols[1], i, &mut ibuf)) else {
                let c = if cols[0].is_null(i) { 0 } else { 1 };
                sink.bad_value(|| bad(c, "null id".into()))?;
                continue;
            };
            if user.is_empty() || item.is_empty() {
                let c = if user.is_empty() { 0 } else { 1 };
                sink.bad_value(|| bad(c, "empty id".into()))?;
                continue;
            }
            let ts = match integer(&cols[2], i) {
                Ok(Some(t)) => t,
                Ok(None) => {
                    sink.bad_value(|| bad(2, "null timestamp".into()))?;
                    continue;
                }
                Err(reason) => {
                    sink.bad_value(|| bad(2, reason))?;
                    continue;
                }
            };
            let rating = match rc.map(|_| number(&cols[3], i)) {
                None => None,
                Some(Ok(r)) => Some(r),
                Some(Err(reason)) => {
                    sink.bad_value(|| bad(3, reason))?;
                    continue;
                }
            };
            if let Some((u, it)) = events.accept(&mut parts, user, item, ts, rating)? {
                let n_user = ufeats.len();
                for (k, f) in ufeats.iter_mut().chain(ifeats.iter_mut()).enumerate() {
                    let entity = if k < n_user { u } else { it } as usize;
                    feature(f, entity, &cols[feat_base + k], i, &mut fbuf);
                }
            }
        }
        done += n as u64;
        progress(done * size / total, size);
        Ok(())
    })?;
    events.flush(&mut parts)?;
    sink.finish(&mut parts.report.skipped);
    parts.user_features = ufeats.into_iter().map(|s| s.builder).collect();
    parts.item_features = ifeats.into_iter().map(|s| s.builder).collect();
    Ok(parts)
}

/// Reads a catalogue or user table from `src` into `parts`.
pub(crate) fn read_table(
    src: &impl Batches,
    t: &EntityTable,
    side: Side,
    schema_path: &Path,
    opts: &crate::dataset::LoadOptions,
    parts: &mut Parts,
) -> Result<()> {
    let path = src.origin();
    let names = src.names();
    let id = column(src, &t.id, schema_path)?;
    check_type(src, id, Role::Text)?;
    let title = t.title.as_ref().map(|c| column(src, c, schema_path)).transpose()?;
    if let Some(c) = title {
        check_type(src, c, Role::Text)?;
    }
    let mut specs = feature_specs(&t.features, Some(&names), Some(names.len()), schema_path, path)?;
    for f in specs.iter_mut() {
        feature_type(src, f)?;
    }
    let mut columns = vec![id];
    columns.extend(title);
    let feat_base = columns.len();
    columns.extend(specs.iter().map(|f| f.col));
    let mut sink = RowSink::new(path, opts.skip_bad_rows);
    let (mut ibuf, mut fbuf) = (String::new(), String::new());
    src.scan(&columns, |cols, g, first| {
        let n = cols.first().map_or(0, |c| c.len());
        for i in 0..n {
            let raw = match text(&cols[0], i, &mut ibuf) {
                Some(s) if !s.is_empty() => s,
                _ => {
                    sink.bad_value(|| DataError::BadValue {
                        path: path.to_path_buf(),
                        column: names.get(id).cloned().unwrap_or_default(),
                        row_group: g,
                        row: first + i,
                        reason: "null or empty id".into(),
                    })?;
                    continue;
                }
            };
            let key = side.intern(parts, raw)?;
            if title.is_some() {
                if let Some(s) = text(&cols[1], i, &mut fbuf).filter(|s| !s.is_empty()) {
                    crate::dataset::set_title(&mut parts.item_titles, key, s.to_owned());
                }
            }
            for (k, f) in specs.iter_mut().enumerate() {
                feature(f, key as usize, &cols[feat_base + k], i, &mut fbuf);
            }
        }
        Ok(())
    })?;
    side.finish(parts, sink, specs);
    Ok(())
}
