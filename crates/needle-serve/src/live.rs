//! Items published and deleted while serving (`POST /v1/items`, `DELETE /v1/items/{id}`).
//!
//! The item index is built offline and never changes in place: it is shared by every request
//! and, at 10^8 items, costs half an hour to build. Live changes therefore sit beside it, as in
//! a log-structured store:
//!
//! - a **segment** of published items with their vectors (computed by the item tower from the
//!   item's features) and details, scanned exactly by every search of the owning engine and
//!   merged with the index's answer by score;
//! - **tombstones**: index rows that were deleted (never returned by any channel) or whose
//!   vector a segment entry supersedes (an update of a trained item: hidden from the index only).
//!
//! The store is the record of these changes (`Store::live_changes`): an engine loaded later
//! (restart, reload, another server) starts empty and applies them again.

use crate::filter::{self, Filter, ValueIds};
use needle_store::ItemDetails;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

/// The live changes applied to one engine.
#[derive(Default)]
pub struct LiveState {
    /// Rows given to items the model was not trained on start here (past the index's rows).
    first_new_row: u32,
    /// Raw id → row of such items, while they are published.
    new_rows: HashMap<String, u32>,
    /// Raw id of each row from `first_new_row` on (`None` once deleted); rows are never reused.
    new_raw: Vec<Option<String>>,
    /// When each such row was first published (Unix seconds): the `newest` channel's score.
    new_since: Vec<f64>,
    segment: Segment,
    /// Index rows deleted: no channel returns them.
    deleted: HashSet<u32>,
    /// Index rows whose vector a segment entry replaces: the engine's own index skips them.
    replaced: HashSet<u32>,
    /// The segment's attribute values, interned.
    values: ValueIds,
}

/// Published vectors, contiguous, scanned with the index's dot kernel.
#[derive(Default)]
struct Segment {
    dim: usize,
    rows: Vec<u32>,
    vectors: Vec<f32>,
    details: Vec<ItemDetails>,
    /// Each entry's attribute values as [`ValueIds`], for filters.
    value_ids: Vec<Vec<u32>>,
    /// Row → position in the arrays above.
    pos: HashMap<u32, usize>,
}

impl Segment {
    fn put(&mut self, row: u32, vector: &[f32], details: ItemDetails, value_ids: Vec<u32>) {
        match self.pos.get(&row) {
            Some(&p) => {
                self.vectors[p * self.dim..(p + 1) * self.dim].copy_from_slice(vector);
                self.details[p] = details;
                self.value_ids[p] = value_ids;
            }
            None => {
                self.pos.insert(row, self.rows.len());
                self.rows.push(row);
                self.vectors.extend_from_slice(vector);
                self.details.push(details);
                self.value_ids.push(value_ids);
            }
        }
    }

    /// Removes `row`, moving the last entry into its place so the arrays stay dense.
    fn remove(&mut self, row: u32) -> bool {
        let Some(p) = self.pos.remove(&row) else { return false };
        let last = self.rows.len() - 1;
        if p != last {
            let moved = self.rows[last];
            self.rows.swap(p, last);
            self.details.swap(p, last);
            self.value_ids.swap(p, last);
            self.vectors.copy_within(last * self.dim..(last + 1) * self.dim, p * self.dim);
            self.pos.insert(moved, p);
        }
        self.rows.pop();
        self.details.pop();
        self.value_ids.pop();
        self.vectors.truncate(last * self.dim);
        true
    }
}

/// One item ready to apply: its row (an index row, or `None` for a new item) and vector.
pub struct Prepared {
    pub id: String,
    pub row: Option<u32>,
    /// `None` for engines without vectors (neighbour lists), where only a deletion is undone.
    pub vector: Option<Vec<f32>>,
    pub details: ItemDetails,
}

impl LiveState {
    /// An empty state for an engine whose index rows end before `first_new_row`, with vectors
    /// of width `dim`.
    pub fn new(first_new_row: u32, dim: usize) -> LiveState {
        LiveState { first_new_row, segment: Segment { dim, ..Segment::default() }, ..LiveState::default() }
    }

    /// Nothing published or deleted: searches need no extra checks.
    pub fn is_empty(&self) -> bool {
        self.segment.rows.is_empty() && self.deleted.is_empty()
    }

    /// Published items in the segment.
    pub fn published(&self) -> usize {
        self.segment.rows.len()
    }

    /// Deleted index rows.
    pub fn deleted(&self) -> usize {
        self.deleted.len()
    }

    /// The row of an item published live that the model was not trained on.
    pub fn new_row(&self, raw: &str) -> Option<u32> {
        self.new_rows.get(raw).copied()
    }

    /// Rows of the items published that the model was not trained on, the most recently first
    /// published first, with that time (Unix seconds). An update keeps an item's place.
    pub fn newest_first(&self) -> impl Iterator<Item = (u32, f32)> + '_ {
        let base = self.first_new_row;
        self.new_raw
            .iter()
            .zip(&self.new_since)
            .enumerate()
            .rev()
            .filter(|(_, (raw, _))| raw.is_some())
            .map(move |(i, (_, &t))| (base + i as u32, t as f32))
    }

    /// The raw id of a row given to a new item.
    pub fn new_raw(&self, row: u32) -> Option<&str> {
        let i = row.checked_sub(self.first_new_row)? as usize;
        self.new_raw.get(i)?.as_deref()
    }

    /// Publishes or updates one item.
    pub fn upsert(&mut self, item: Prepared) {
        let Some(vector) = item.vector else {
            if let Some(r) = item.row {
                self.deleted.remove(&r);
            }
            return;
        };
        let row = match item.row {
            Some(r) => {
                self.deleted.remove(&r);
                self.replaced.insert(r);
                r
            }
            None => match self.new_rows.get(&item.id) {
                Some(&r) => r,
                None => {
                    let r = self.first_new_row + self.new_raw.len() as u32;
                    self.new_raw.push(Some(item.id.clone()));
                    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH);
                    self.new_since.push(now.map_or(0.0, |d| d.as_secs_f64()));
                    self.new_rows.insert(item.id, r);
                    r
                }
            },
        };
        let ids = self.values.intern(&item.details);
        self.segment.put(row, &vector, item.details, ids);
    }

    /// Deletes the item at `row` (an index row) or the new item `raw`; whether anything was
    /// there to delete.
    pub fn delete(&mut self, raw: &str, row: Option<u32>) -> bool {
        match row {
            Some(r) => {
                self.segment.remove(r);
                self.replaced.remove(&r);
                self.deleted.insert(r)
            }
            None => {
                let Some(r) = self.new_rows.remove(raw) else { return false };
                self.new_raw[(r - self.first_new_row) as usize] = None;
                self.segment.remove(r)
            }
        }
    }

    /// Whether any channel may return `row`, given the request's `filter`: not deleted, and
    /// when the row was updated live, its new details pass the filter (index posting lists
    /// hold the old ones). `own_index`: the row comes from the engine's own index, where a
    /// segment entry supersedes it.
    pub fn admits(&self, row: u32, filter: Option<&Filter>, own_index: bool) -> bool {
        if self.deleted.contains(&row) {
            return false;
        }
        if own_index && self.replaced.contains(&row) {
            return false;
        }
        match (filter, self.segment.pos.get(&row)) {
            (Some(f), Some(&p)) => filter::matches(f, &self.segment.details[p]),
            _ => true,
        }
    }

    /// The segment's best `k` for `query` among the rows `keep` passes and `filter` allows,
    /// merged into `out` (best first, at most `k`).
    pub fn search_into(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
        keep: &dyn Fn(u32) -> bool,
        out: &mut Vec<(u32, f32)>,
    ) {
        let seg = &self.segment;
        if seg.rows.is_empty() || k == 0 {
            return;
        }
        let compiled = filter.map(|f| self.values.compile(f));
        if compiled.as_ref().is_some_and(|c| c.iter().any(Vec::is_empty)) {
            // A condition no published value meets: no segment item passes.
            return;
        }
        let mut scores = vec![0.0f32; seg.rows.len()];
        (needle_index::kernels::dot_rows_fn())(query, &seg.vectors, seg.dim, &mut scores);
        // A bounded heap whose worst entry rises as better items arrive, so most of the segment
        // is turned away by one comparison and only contenders pay for `keep` and the filter.
        let mut best: BinaryHeap<Reverse<Ranked>> = out.iter().map(|&(row, s)| Reverse(Ranked(s, row))).collect();
        while best.len() > k {
            best.pop();
        }
        let mut entered = false;
        for (p, (&row, &s)) in seg.rows.iter().zip(&scores).enumerate() {
            let cand = Ranked(s, row);
            if best.len() == k && best.peek().is_some_and(|w| cand <= w.0) {
                continue;
            }
            if keep(row) && compiled.as_ref().is_none_or(|c| filter::matches_ids(c, &seg.value_ids[p])) {
                best.push(Reverse(cand));
                entered = true;
                if best.len() > k {
                    best.pop();
                }
            }
        }
        if !entered && out.len() <= k {
            return;
        }
        out.clear();
        out.extend(best.into_sorted_vec().into_iter().map(|Reverse(Ranked(s, row))| (row, s)));
    }
}

/// A scored row ordered by score, then by lower row (as answers break ties).
#[derive(Clone, Copy, PartialEq)]
struct Ranked(f32, u32);

impl Eq for Ranked {}

impl PartialOrd for Ranked {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Ranked {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0).then(other.1.cmp(&self.1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn details(genre: &str) -> ItemDetails {
        ItemDetails { title: None, attributes: BTreeMap::from([("genres".to_owned(), vec![genre.to_owned()])]) }
    }

    fn item(id: &str, row: Option<u32>, v: [f32; 2], genre: &str) -> Prepared {
        Prepared { id: id.into(), row, vector: Some(v.to_vec()), details: details(genre) }
    }

    #[test]
    fn published_items_are_found_updated_and_deleted() {
        let mut live = LiveState::new(10, 2);
        assert!(live.is_empty());
        live.upsert(item("new-a", None, [1.0, 0.0], "Comedy"));
        live.upsert(item("new-b", None, [0.0, 1.0], "Drama"));
        live.upsert(item("trained-3", Some(3), [0.6, 0.8], "Drama"));
        assert_eq!((live.new_row("new-a"), live.new_row("new-b")), (Some(10), Some(11)));
        assert_eq!(live.new_raw(11), Some("new-b"));
        assert_eq!(live.published(), 3);
        // Row 3's index entry is superseded by its segment entry, not deleted.
        assert!(!live.admits(3, None, true) && live.admits(3, None, false));

        let search = |live: &LiveState, filter: Option<&Filter>| {
            let mut out = vec![(7, 0.9)];
            live.search_into(&[1.0, 0.0], 3, filter, &|_| true, &mut out);
            out
        };
        assert_eq!(search(&live, None), vec![(10, 1.0), (7, 0.9), (3, 0.6)]);
        // When the index already gave k items, a better segment item takes the worst one's place.
        let mut full = vec![(7, 0.9), (8, 0.5)];
        live.search_into(&[1.0, 0.0], 2, None, &|_| true, &mut full);
        assert_eq!(full, vec![(10, 1.0), (7, 0.9)]);
        let drama: Filter = serde_json::from_str(r#"{"genres": "Drama"}"#).unwrap();
        assert_eq!(search(&live, Some(&drama)), vec![(7, 0.9), (3, 0.6), (11, 0.0)]);
        assert!(!live.admits(3, Some(&serde_json::from_str(r#"{"genres": "Comedy"}"#).unwrap()), false));

        // An update moves the vector in place; a delete removes it and the id maps nowhere.
        live.upsert(item("new-a", None, [0.0, -1.0], "Comedy"));
        assert_eq!(live.new_row("new-a"), Some(10));
        assert!(live.delete("new-b", None));
        assert!(!live.delete("new-b", None), "already gone");
        assert_eq!(live.new_row("new-b"), None);
        assert_eq!(live.new_raw(11), None);
        assert_eq!(search(&live, None), vec![(7, 0.9), (3, 0.6), (10, 0.0)]);

        // Deleting a trained row hides it everywhere; publishing it again brings it back.
        assert!(live.delete("trained-3", Some(3)));
        assert!(!live.admits(3, None, false));
        assert_eq!(search(&live, None), vec![(7, 0.9), (10, 0.0)]);
        live.upsert(item("trained-3", Some(3), [1.0, 0.0], "Drama"));
        assert!(live.admits(3, None, false));
        assert_eq!(search(&live, None), vec![(3, 1.0), (7, 0.9), (10, 0.0)]);
    }
}
