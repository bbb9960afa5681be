//! From an item id to its row in an index, for scoring chosen ids directly (the brute-force side
//! of a selective filter). Built on first use: searches without such a filter never pay for it.

use std::collections::HashMap;
use std::sync::OnceLock;

/// Row of each id: a table when ids are dense (row numbers, catalogue ids), a hash map otherwise.
#[derive(Clone, Debug)]
pub(crate) enum IdMap {
    Dense(Vec<u32>),
    Sparse(HashMap<u32, u32>),
}

const ABSENT: u32 = u32::MAX;

impl IdMap {
    pub fn new(ids: &[u32]) -> IdMap {
        let max = ids.iter().copied().max().map_or(0, |m| m as usize + 1);
        // A table up to twice the number of rows costs at most 8 bytes per row.
        if max <= 2 * ids.len().max(1) {
            let mut rows = vec![ABSENT; max];
            for (row, &id) in ids.iter().enumerate() {
                rows[id as usize] = row as u32;
            }
            IdMap::Dense(rows)
        } else {
            IdMap::Sparse(ids.iter().enumerate().map(|(row, &id)| (id, row as u32)).collect())
        }
    }

    /// The row holding `id` (the last one, should ids repeat).
    #[inline]
    pub fn row(&self, id: u32) -> Option<usize> {
        match self {
            IdMap::Dense(rows) => rows.get(id as usize).copied().filter(|&r| r != ABSENT).map(|r| r as usize),
            IdMap::Sparse(m) => m.get(&id).map(|&r| r as usize),
        }
    }
}

/// An [`IdMap`] made when first asked for; reset whenever the ids change.
#[derive(Clone, Debug, Default)]
pub(crate) struct LazyIdMap(OnceLock<IdMap>);

impl LazyIdMap {
    pub fn get(&self, ids: &[u32]) -> &IdMap {
        self.0.get_or_init(|| IdMap::new(ids))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dense_and_sparse_maps_find_every_id_and_nothing_else() {
        for ids in [vec![3u32, 0, 2, 5, 1], vec![7u32, 1_000_000, 42, 9]] {
            let m = IdMap::new(&ids);
            assert_eq!(matches!(m, IdMap::Dense(_)), ids.len() == 5);
            for (row, &id) in ids.iter().enumerate() {
                assert_eq!(m.row(id), Some(row));
            }
            assert_eq!(m.row(4), None);
            assert_eq!(m.row(u32::MAX), None);
        }
    }
}
