//! Raw-id vocabularies saved next to trained models, so a model can map the ids a user
//! types (or a serving system sends) to its embedding rows, independent of the dataset.

use std::path::Path;

use crate::error::{DataError, Result};
use crate::text::{read_file, IdIndex, Lines};

/// Bidirectional raw id <-> index map. Index 0 is reserved for padding/unknown so models can
/// use row 0 of an embedding table for "no item"; raw ids get indices from 1 upward in
/// insertion order.
#[derive(Clone, Debug)]
pub struct Vocab {
    /// `raws[0]` is the padding slot (empty string, never looked up).
    raws: Vec<String>,
    index: IdIndex,
}

impl Default for Vocab {
    fn default() -> Self {
        Vocab::new()
    }
}

impl PartialEq for Vocab {
    fn eq(&self, other: &Self) -> bool {
        // The map is derived from `raws`, so comparing `raws` is enough.
        self.raws == other.raws
    }
}

impl Vocab {
    /// Empty vocabulary (just the padding slot, so `len() == 1`).
    pub fn new() -> Self {
        Vocab { raws: vec![String::new()], index: IdIndex::default() }
    }

    /// Vocabulary whose index `k + 1` is `ids[k]`, i.e. dataset key + 1. Duplicate ids map
    /// to their first index (dataset id lists never contain duplicates).
    pub fn from_ids<S: AsRef<str>>(ids: &[S]) -> Self {
        let mut v = Vocab::new();
        for id in ids {
            v.insert(id.as_ref());
        }
        v
    }

    /// Index of `raw`, inserting it if new. Saturates at `u32::MAX` (never panics); real
    /// vocabularies are far smaller.
    pub fn insert(&mut self, raw: &str) -> u32 {
        self.index.get_or_push(&mut self.raws, raw).unwrap_or(u32::MAX)
    }

    /// Index of a known raw id; `None` when unknown (never returns the padding index 0).
    pub fn get(&self, raw: &str) -> Option<u32> {
        self.index.get(&self.raws, raw)
    }

    /// Raw id of an index; `None` for 0 (padding) and out-of-range indices.
    pub fn raw(&self, idx: u32) -> Option<&str> {
        if idx == 0 {
            return None;
        }
        self.raws.get(idx as usize).map(String::as_str)
    }

    /// Number of slots including padding, i.e. the embedding table height.
    pub fn len(&self) -> usize {
        self.raws.len()
    }

    /// True when only the padding slot exists.
    pub fn is_empty(&self) -> bool {
        self.raws.len() <= 1
    }

    /// `(index, raw)` for every real entry in index order (padding excluded).
    pub fn iter(&self) -> impl Iterator<Item = (u32, &str)> + '_ {
        self.raws.iter().enumerate().skip(1).map(|(i, r)| (u32::try_from(i).unwrap_or(u32::MAX), r.as_str()))
    }

    /// Writes a TSV file with one `<index>\t<raw>\n` line per index >= 1 (human-readable and
    /// diffable). Ids containing tab, CR or LF are rejected rather than escaped, since they
    /// would break the line format and real ids never contain them.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut out = String::with_capacity(self.raws.len() * 12);
        for (i, raw) in self.iter() {
            if raw.contains(['\t', '\n', '\r']) {
                return Err(DataError::Vocab {
                    path: path.to_path_buf(),
                    reason: format!("id {raw:?} (index {i}) contains a tab or line break"),
                });
            }
            out.push_str(&i.to_string());
            out.push('\t');
            out.push_str(raw);
            out.push('\n');
        }
        needle_core::file::write_atomic(path, out.as_bytes()).map_err(|e| DataError::io(path, e))
    }

    /// Reads a file written by [`Vocab::save`]. Indices must be exactly 1, 2, 3, ... in order
    /// and ids unique, because a model's embedding rows depend on that numbering.
    pub fn load(path: &Path) -> Result<Self> {
        let data = read_file(path)?;
        let mut v = Vocab::new();
        let bad = |line: usize, reason: String| DataError::BadRow { path: path.to_path_buf(), line, reason };
        for (line, row) in Lines::new(&data) {
            let row = std::str::from_utf8(row).map_err(|_| bad(line, "invalid UTF-8".into()))?;
            let (idx, raw) = row.split_once('\t').ok_or_else(|| bad(line, "expected \"<index>\\t<id>\"".into()))?;
            let expected = v.raws.len();
            if idx.parse::<usize>().ok() != Some(expected) {
                return Err(bad(
                    line,
                    format!("expected index {expected}, found {idx:?} (indices must be 1..n in order)"),
                ));
            }
            if v.get(raw).is_some() {
                return Err(bad(line, format!("duplicate id {raw:?}")));
            }
            v.insert(raw);
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padding_slot() {
        let mut v = Vocab::new();
        assert_eq!(v.len(), 1);
        assert!(v.is_empty());
        assert_eq!(v.insert("a"), 1);
        assert_eq!(v.insert("b"), 2);
        assert_eq!(v.insert("a"), 1);
        assert_eq!(v.get("a"), Some(1));
        assert_eq!(v.get(""), None);
        assert_eq!(v.raw(0), None);
        assert_eq!(v.raw(2), Some("b"));
        assert_eq!(v.raw(3), None);
        assert_eq!(v.len(), 3);
        assert!(!v.is_empty());
        let f = Vocab::from_ids(&["x", "y"]);
        assert_eq!(f.get("y"), Some(2));
    }
}
