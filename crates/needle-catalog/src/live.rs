//! Items published and deleted while serving (`POST /v1/items`, `DELETE /v1/items/{id}`).
//!
//! The item index is built offline and never changes in place: it is shared by every request
//! and, at 10^8 items, costs half an hour to build. Live changes therefore sit beside it, as in
//! a log-structured store:
//!
//! - a **segment** of published items with their vectors (computed by the item tower from the
//!   item's features) and details, scanned exactly by every search of the owning engine and
//!   merged with the index's answer by score;
//! - a **sealed segment**: once the segment holds enough items, a background thread compacts it
//!   (with what was sealed before) into an HNSW graph of its own, so the cost of a search stops
//!   growing with every item published; entries updated or deleted after their compaction are
//!   stale there and skipped, their new versions living in the segment;
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
    /// Counts puts, so a compaction knows which segment entries its snapshot held.
    seq: u64,
    /// Published items compacted into a graph (`None` until the first compaction).
    sealed: Option<Sealed>,
    /// The compaction under way, if any.
    compaction: Option<Compaction>,
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
#[derive(Default, Clone)]
struct Segment {
    dim: usize,
    rows: Vec<u32>,
    /// The put that wrote each entry (`LiveState::seq`).
    seqs: Vec<u64>,
    vectors: Vec<f32>,
    details: Vec<ItemDetails>,
    /// Each entry's attribute values as [`ValueIds`], for filters.
    value_ids: Vec<Vec<u32>>,
    /// Row → position in the arrays above.
    pos: HashMap<u32, usize>,
}

impl Segment {
    fn put(&mut self, row: u32, vector: &[f32], details: ItemDetails, value_ids: Vec<u32>, seq: u64) {
        match self.pos.get(&row) {
            Some(&p) => {
                self.vectors[p * self.dim..(p + 1) * self.dim].copy_from_slice(vector);
                self.details[p] = details;
                self.value_ids[p] = value_ids;
                self.seqs[p] = seq;
            }
            None => {
                self.pos.insert(row, self.rows.len());
                self.rows.push(row);
                self.seqs.push(seq);
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
            self.seqs.swap(p, last);
            self.details.swap(p, last);
            self.value_ids.swap(p, last);
            self.vectors.copy_within(last * self.dim..(last + 1) * self.dim, p * self.dim);
            self.pos.insert(moved, p);
        }
        self.rows.pop();
        self.seqs.pop();
        self.details.pop();
        self.value_ids.pop();
        self.vectors.truncate(last * self.dim);
        true
    }

    /// Copies entry `p` of `other` in (as a put would).
    fn put_from(&mut self, other: &Segment, p: usize) {
        let v = &other.vectors[p * other.dim..(p + 1) * other.dim];
        self.put(other.rows[p], v, other.details[p].clone(), other.value_ids[p].clone(), other.seqs[p]);
    }

    /// Only the entries written after put `upto`.
    fn newer_than(&self, upto: u64) -> Segment {
        let mut out = Segment { dim: self.dim, ..Segment::default() };
        for p in (0..self.rows.len()).filter(|&p| self.seqs[p] > upto) {
            out.put_from(self, p);
        }
        out
    }
}

/// Published items compacted into an HNSW graph whose ids are positions in `seg`.
pub struct Sealed {
    seg: Segment,
    index: Box<dyn needle_index::Index>,
    /// Attribute value id → the positions whose entry has it, ascending: a filtered search
    /// scores only the entries one of its conditions lets through.
    postings: HashMap<u32, Vec<u32>>,
    /// Rows updated or deleted since this was built: their entries here are out of date.
    stale: HashSet<u32>,
}

impl Sealed {
    /// Scores the entries that meet the compiled filter `c`, found through the postings of its
    /// most selective condition; whether any went into `best`.
    fn scan_filtered(
        &self,
        query: &[f32],
        k: usize,
        c: &[Vec<u32>],
        keep: &dyn Fn(u32) -> bool,
        best: &mut BinaryHeap<Reverse<Ranked>>,
    ) -> bool {
        let size = |cond: &Vec<u32>| cond.iter().map(|v| self.postings.get(v).map_or(0, Vec::len)).sum::<usize>();
        let Some(narrowest) = c.iter().min_by_key(|cond| size(cond)) else { return false };
        let mut cands: Vec<u32> = narrowest.iter().filter_map(|v| self.postings.get(v)).flatten().copied().collect();
        if narrowest.len() > 1 {
            // An entry with several of the condition's values is listed once per value.
            cands.sort_unstable();
            cands.dedup();
        }
        let (dim, dot) = (self.seg.dim, needle_index::kernels::dot_fn());
        let mut entered = false;
        for p in cands {
            let p = p as usize;
            let row = self.seg.rows[p];
            let cand = Ranked(dot(query, &self.seg.vectors[p * dim..(p + 1) * dim]), row);
            if best.len() == k && best.peek().is_some_and(|w| cand <= w.0) {
                continue;
            }
            if !self.stale.contains(&row) && filter::matches_ids(c, &self.seg.value_ids[p]) && keep(row) {
                entered |= offer(best, k, cand);
            }
        }
        entered
    }

    /// The entry of `row`, unless it went stale.
    fn pos(&self, row: u32) -> Option<usize> {
        self.seg.pos.get(&row).copied().filter(|_| !self.stale.contains(&row))
    }
}

struct Compaction {
    /// The snapshot holds every put up to this one.
    upto: u64,
    /// Rows updated or deleted since the snapshot.
    changed: HashSet<u32>,
}

/// What a compaction builds its graph from: every published item, as of one moment.
pub struct Snapshot {
    seg: Segment,
}

impl Snapshot {
    /// Builds the graph (the slow part, done without holding the engine's lock).
    pub fn build(self) -> Result<Sealed, needle_index::IndexError> {
        self.build_with(needle_index::HnswParams::default())
    }

    /// [`Snapshot::build`] with chosen graph parameters.
    pub fn build_with(self, hnsw: needle_index::HnswParams) -> Result<Sealed, needle_index::IndexError> {
        let ids: Vec<u32> = (0..self.seg.rows.len() as u32).collect();
        let params = needle_index::IndexParams::Hnsw(hnsw);
        let index = needle_index::build(&params, &ids, &self.seg.vectors, self.seg.dim)?;
        let mut postings: HashMap<u32, Vec<u32>> = HashMap::new();
        for (p, values) in self.seg.value_ids.iter().enumerate() {
            for &v in values {
                postings.entry(v).or_default().push(p as u32);
            }
        }
        Ok(Sealed { seg: self.seg, index, postings, stale: HashSet::new() })
    }

    pub fn len(&self) -> usize {
        self.seg.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seg.rows.is_empty()
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
        self.published() == 0 && self.deleted.is_empty()
    }

    /// Published items, in the segment or sealed.
    pub fn published(&self) -> usize {
        let sealed = self.sealed.as_ref().map_or(0, |s| s.seg.rows.len() - s.stale.len());
        self.segment.rows.len() + sealed
    }

    /// Published items in the sealed segment's graph (stale entries included).
    pub fn sealed(&self) -> usize {
        self.sealed.as_ref().map_or(0, |s| s.seg.rows.len())
    }

    /// Whether the segment has grown to `threshold` items and no compaction is under way.
    pub fn compaction_due(&self, threshold: usize) -> bool {
        threshold > 0 && self.compaction.is_none() && self.segment.rows.len() >= threshold
    }

    /// Starts a compaction: a snapshot of every published item to build a graph over.
    pub fn begin_compaction(&mut self) -> Snapshot {
        let mut seg = Segment { dim: self.segment.dim, ..Segment::default() };
        if let Some(s) = &self.sealed {
            for p in (0..s.seg.rows.len()).filter(|&p| !s.stale.contains(&s.seg.rows[p])) {
                seg.put_from(&s.seg, p);
            }
        }
        for p in 0..self.segment.rows.len() {
            seg.put_from(&self.segment, p);
        }
        self.compaction = Some(Compaction { upto: self.seq, changed: HashSet::new() });
        Snapshot { seg }
    }

    /// Swaps in a compaction's graph: the segment keeps only what was written since the
    /// snapshot, and what changed since is stale in the graph.
    pub fn finish_compaction(&mut self, mut sealed: Sealed) {
        let Some(c) = self.compaction.take() else { return };
        sealed.stale = c.changed.into_iter().filter(|r| sealed.seg.pos.contains_key(r)).collect();
        self.segment = self.segment.newer_than(c.upto);
        self.sealed = Some(sealed);
    }

    /// Gives up a compaction whose build failed; the segment still holds everything.
    pub fn abort_compaction(&mut self) {
        self.compaction = None;
    }

    /// A row's entry changed: any sealed copy of it is out of date.
    fn touch(&mut self, row: u32) {
        if let Some(s) = self.sealed.as_mut() {
            if s.seg.pos.contains_key(&row) {
                s.stale.insert(row);
            }
        }
        if let Some(c) = self.compaction.as_mut() {
            c.changed.insert(row);
        }
    }

    /// A published item's current details.
    fn details_of(&self, row: u32) -> Option<&ItemDetails> {
        if let Some(&p) = self.segment.pos.get(&row) {
            return Some(&self.segment.details[p]);
        }
        let s = self.sealed.as_ref()?;
        s.pos(row).map(|p| &s.seg.details[p])
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
        self.touch(row);
        self.seq += 1;
        self.segment.put(row, &vector, item.details, ids, self.seq);
    }

    /// Deletes the item at `row` (an index row) or the new item `raw`; whether anything was
    /// there to delete.
    pub fn delete(&mut self, raw: &str, row: Option<u32>) -> bool {
        match row {
            Some(r) => {
                self.segment.remove(r);
                self.touch(r);
                self.replaced.remove(&r);
                self.deleted.insert(r)
            }
            None => {
                let Some(r) = self.new_rows.remove(raw) else { return false };
                self.new_raw[(r - self.first_new_row) as usize] = None;
                self.segment.remove(r);
                self.touch(r);
                true
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
        match (filter, self.details_of(row)) {
            (Some(f), Some(d)) => filter::matches(f, d),
            _ => true,
        }
    }

    /// The published items' best `k` for `query` among the rows `keep` passes and `filter`
    /// allows, merged into `out` (best first, at most `k`).
    pub fn search_into(
        &self,
        query: &[f32],
        k: usize,
        filter: Option<&Filter>,
        keep: &dyn Fn(u32) -> bool,
        out: &mut Vec<(u32, f32)>,
    ) {
        if self.published() == 0 || k == 0 {
            return;
        }
        let compiled = filter.map(|f| self.values.compile(f));
        if compiled.as_ref().is_some_and(|c| c.iter().any(Vec::is_empty)) {
            // A condition no published value meets: no published item passes.
            return;
        }
        // A bounded heap whose worst entry rises as better items arrive, so most of the segment
        // is turned away by one comparison and only contenders pay for `keep` and the filter.
        let mut best: BinaryHeap<Reverse<Ranked>> = out.iter().map(|&(row, s)| Reverse(Ranked(s, row))).collect();
        while best.len() > k {
            best.pop();
        }
        let mut entered = scan(&self.segment, query, k, compiled.as_deref(), keep, &mut best);
        if let Some(s) = &self.sealed {
            entered |= match &compiled {
                // Under a filter the graph would have to walk past every item that fails it:
                // the entries one condition lets through are scored exactly instead.
                Some(c) => s.scan_filtered(query, k, c, keep, &mut best),
                None => {
                    let mut found = Vec::with_capacity(k);
                    let pass = |p: u32| {
                        let row = s.seg.rows[p as usize];
                        !s.stale.contains(&row) && keep(row)
                    };
                    // A failed graph search leaves the sealed items out of this answer only.
                    let _ = s.index.search_filtered(query, k, &pass, &mut found);
                    let mut any = false;
                    for (p, score) in found {
                        any |= offer(&mut best, k, Ranked(score, s.seg.rows[p as usize]));
                    }
                    any
                }
            };
        }
        if !entered && out.len() <= k {
            return;
        }
        out.clear();
        out.extend(best.into_sorted_vec().into_iter().map(|Reverse(Ranked(s, row))| (row, s)));
    }
}

/// Puts a candidate in the bounded heap if it beats the worst of `k`; whether it went in.
fn offer(best: &mut BinaryHeap<Reverse<Ranked>>, k: usize, cand: Ranked) -> bool {
    if best.len() == k && best.peek().is_some_and(|w| cand <= w.0) {
        return false;
    }
    best.push(Reverse(cand));
    if best.len() > k {
        best.pop();
    }
    true
}

/// Scores every entry of `seg` against `query` and offers the ones `keep` and the compiled
/// filter let through; whether any went in.
fn scan(
    seg: &Segment,
    query: &[f32],
    k: usize,
    compiled: Option<&[Vec<u32>]>,
    keep: &dyn Fn(u32) -> bool,
    best: &mut BinaryHeap<Reverse<Ranked>>,
) -> bool {
    if seg.rows.is_empty() {
        return false;
    }
    let mut scores = vec![0.0f32; seg.rows.len()];
    (needle_index::kernels::dot_rows_fn())(query, &seg.vectors, seg.dim, &mut scores);
    let mut entered = false;
    for (p, (&row, &s)) in seg.rows.iter().zip(&scores).enumerate() {
        let cand = Ranked(s, row);
        if best.len() == k && best.peek().is_some_and(|w| cand <= w.0) {
            continue;
        }
        if keep(row) && compiled.is_none_or(|c| filter::matches_ids(c, &seg.value_ids[p])) {
            entered |= offer(best, k, cand);
        }
    }
    entered
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

    #[test]
    fn compaction_seals_published_items_and_keeps_every_later_change() {
        const DIM: usize = 8;
        let mut state = 7u64;
        let mut vector = move || -> Vec<f32> {
            let v: Vec<f32> = (0..DIM)
                .map(|_| {
                    state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    ((state >> 40) as f32 / (1u64 << 24) as f32) - 0.5
                })
                .collect();
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.into_iter().map(|x| x / n).collect()
        };
        let genre = |i: usize| if i.is_multiple_of(3) { "Drama" } else { "Comedy" };
        let mut live = LiveState::new(1000, DIM);
        // What should be published: id → (row, vector, genre).
        let mut truth: HashMap<String, (u32, Vec<f32>, &str)> = HashMap::new();
        let publish = |live: &mut LiveState, truth: &mut HashMap<_, _>, i: usize, v: Vec<f32>| {
            let id = format!("n{i}");
            live.upsert(Prepared { id: id.clone(), row: None, vector: Some(v.clone()), details: details(genre(i)) });
            truth.insert(id.clone(), (live.new_row(&id).unwrap(), v, genre(i)));
        };
        let check = |live: &LiveState, truth: &HashMap<String, (u32, Vec<f32>, &str)>, queries: &[Vec<f32>]| {
            let drama: Filter = serde_json::from_str(r#"{"genres": "Drama"}"#).unwrap();
            for q in queries {
                for filter in [None, Some(&drama)] {
                    let mut want: Vec<(u32, f32)> = truth
                        .values()
                        .filter(|(_, _, g)| filter.is_none() || *g == "Drama")
                        .map(|(row, v, _)| (*row, v.iter().zip(q).map(|(a, b)| a * b).sum::<f32>()))
                        .collect();
                    want.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                    want.truncate(10);
                    let mut got = Vec::new();
                    live.search_into(q, 10, filter, &|_| true, &mut got);
                    let rows = |l: &[(u32, f32)]| l.iter().map(|x| x.0).collect::<Vec<_>>();
                    assert_eq!(rows(&got), rows(&want), "filter {}", filter.is_some());
                }
            }
            assert_eq!(live.published(), truth.len());
        };
        // A beam wider than the catalogue makes the graph search exhaustive, so the answers can
        // be compared with exact ones: what is checked here is the merge, not the graph's recall.
        let exhaustive = needle_index::HnswParams { ef_search: 1000, ..Default::default() };
        let queries: Vec<Vec<f32>> = (0..20).map(|_| vector()).collect();
        for i in 0..300 {
            publish(&mut live, &mut truth, i, vector());
        }
        assert!(live.compaction_due(300) && !live.compaction_due(301) && !live.compaction_due(0));
        check(&live, &truth, &queries);

        // Changes while the graph is being built: updates, deletions, new items.
        let snap = live.begin_compaction();
        assert_eq!(snap.len(), 300);
        assert!(!live.compaction_due(1), "one compaction at a time");
        for i in 0..10 {
            publish(&mut live, &mut truth, i, vector());
            let gone = format!("n{}", 100 + i);
            assert!(live.delete(&gone, None));
            truth.remove(&gone);
            publish(&mut live, &mut truth, 300 + i, vector());
        }
        check(&live, &truth, &queries);
        live.finish_compaction(snap.build_with(exhaustive).unwrap());
        assert_eq!(live.sealed(), 300);
        // The segment keeps only what the snapshot did not hold: 10 updates and 10 new items.
        assert_eq!(live.segment.rows.len(), 20);
        check(&live, &truth, &queries);
        // A sealed item updated or deleted afterwards: its sealed entry is skipped.
        publish(&mut live, &mut truth, 200, vector());
        assert!(live.delete("n201", None));
        truth.remove("n201");
        check(&live, &truth, &queries);
        // A second compaction folds everything into a new graph.
        let snap = live.begin_compaction();
        assert_eq!(snap.len(), truth.len());
        live.finish_compaction(snap.build_with(exhaustive).unwrap());
        assert_eq!((live.sealed(), live.segment.rows.len()), (truth.len(), 0));
        check(&live, &truth, &queries);
        assert_eq!(live.newest_first().count(), truth.len());
    }
}
