//! Full-corpus retrieval evaluation: exact top-K by inner product over every item, then hit
//! rate, recall, NDCG, precision and MRR at several cut-offs.
//!
//! The scan is a blocked matrix product (a block of users against all items) followed by a
//! bounded-heap selection per user, both spread over the available threads.

use needle_model::gemm::{matmul, Layout};
use rayon::prelude::*;
use serde::Serialize;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Variable-length lists (one per user) stored as CSR.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lists {
    pub offsets: Vec<u32>,
    pub items: Vec<u32>,
}

impl Lists {
    pub fn new() -> Self {
        Lists { offsets: vec![0], items: Vec::new() }
    }

    /// Appends one list.
    pub fn push(&mut self, items: impl IntoIterator<Item = u32>) {
        self.items.extend(items);
        self.offsets.push(self.items.len() as u32);
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, i: usize) -> &[u32] {
        &self.items[self.offsets[i] as usize..self.offsets[i + 1] as usize]
    }
}

/// Users scored per block: `[block × items]` scores stay in cache-friendly memory.
const USER_BLOCK: usize = 256;

#[derive(Clone, Copy, PartialEq)]
struct Scored(f32, u32);

impl Eq for Scored {}
impl PartialOrd for Scored {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scored {
    /// "Greater" means ranked higher: larger score, then smaller item row (a stable tie-break).
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.total_cmp(&other.0).then_with(|| other.1.cmp(&self.1))
    }
}

/// The `k` best items of one score row, best first; `-inf` scores are never returned.
pub fn select_top_k(scores: &[f32], k: usize, ids: &mut Vec<u32>, vals: &mut Vec<f32>) {
    let mut heap = BinaryHeap::with_capacity(k + 1);
    offer(&mut heap, scores, 0, k);
    drain_sorted(heap, ids, vals);
}

/// A bounded min-heap of the best candidates seen so far.
type TopHeap = BinaryHeap<std::cmp::Reverse<Scored>>;

/// Offers `scores` (item rows `first..`) to a heap that keeps the `k` best.
fn offer(heap: &mut TopHeap, scores: &[f32], first: u32, k: usize) {
    if k == 0 {
        return;
    }
    for (i, &s) in scores.iter().enumerate() {
        if s == f32::NEG_INFINITY || s.is_nan() {
            continue;
        }
        let cand = Scored(s, first + i as u32);
        if heap.len() < k {
            heap.push(std::cmp::Reverse(cand));
        } else if let Some(min) = heap.peek() {
            if cand > min.0 {
                heap.pop();
                heap.push(std::cmp::Reverse(cand));
            }
        }
    }
}

/// Empties `heap` into `ids` / `vals`, best first.
fn drain_sorted(heap: TopHeap, ids: &mut Vec<u32>, vals: &mut Vec<f32>) {
    ids.clear();
    vals.clear();
    let mut top: Vec<Scored> = heap.into_iter().map(|r| r.0).collect();
    top.sort_unstable_by(|a, b| b.cmp(a));
    for s in top {
        ids.push(s.1);
        vals.push(s.0);
    }
}

/// Scores held at once: a block of users against a tile of items. Bounds memory at any
/// catalogue size (256 users × 10^7 items would be 10 GB) while keeping tiles large enough that
/// the matrix product runs at full speed.
const SCORE_BUDGET: usize = 1 << 24;

/// Top-`k` item rows for every user, `[users × k]` (rows padded with `u32::MAX` when fewer
/// items qualify). Item row 0 (padding) and each user's `exclude` list never appear.
///
/// `user_vecs` is `[users × d]`; `item_vecs` is `[items × d]`, row = item row.
pub fn top_k(
    user_vecs: &[f32],
    item_vecs: &[f32],
    d: usize,
    k: usize,
    exclude: Option<&Lists>,
) -> (Vec<u32>, Vec<f32>) {
    top_k_tiled(user_vecs, item_vecs, d, k, exclude, SCORE_BUDGET / USER_BLOCK)
}

/// [`top_k`] scoring `tile` items at a time; every user's heap carries over from tile to tile,
/// so the result does not depend on the tiling.
fn top_k_tiled(
    user_vecs: &[f32],
    item_vecs: &[f32],
    d: usize,
    k: usize,
    exclude: Option<&Lists>,
    tile: usize,
) -> (Vec<u32>, Vec<f32>) {
    let n_users = user_vecs.len().checked_div(d).unwrap_or(0);
    let n_items = item_vecs.len().checked_div(d).unwrap_or(0);
    let tile = tile.clamp(1, n_items.max(1));
    let mut out_ids = vec![u32::MAX; n_users * k];
    let mut out_scores = vec![f32::NEG_INFINITY; n_users * k];
    let mut scores = vec![0.0f32; USER_BLOCK.min(n_users.max(1)) * tile];
    let mut heaps: Vec<TopHeap> = Vec::new();
    for b0 in (0..n_users).step_by(USER_BLOCK) {
        let bn = USER_BLOCK.min(n_users - b0);
        heaps.clear();
        heaps.resize_with(bn, || BinaryHeap::with_capacity(k + 1));
        for t0 in (0..n_items).step_by(tile) {
            let tn = tile.min(n_items - t0);
            let block = &mut scores[..bn * tn];
            matmul(
                bn,
                d,
                tn,
                &user_vecs[b0 * d..(b0 + bn) * d],
                Layout::Normal,
                &item_vecs[t0 * d..(t0 + tn) * d],
                Layout::Transposed,
                block,
                false,
            );
            block.par_chunks_mut(tn).zip(heaps.par_iter_mut()).enumerate().for_each(|(i, (row, heap))| {
                if t0 == 0 {
                    if let Some(first) = row.first_mut() {
                        *first = f32::NEG_INFINITY;
                    }
                }
                if let Some(ex) = exclude {
                    for &it in ex.get(b0 + i) {
                        if let Some(s) = (it as usize).checked_sub(t0).and_then(|j| row.get_mut(j)) {
                            *s = f32::NEG_INFINITY;
                        }
                    }
                }
                offer(heap, row, t0 as u32, k);
            });
        }
        std::mem::take(&mut heaps)
            .into_par_iter()
            .zip(out_ids[b0 * k..(b0 + bn) * k].par_chunks_mut(k))
            .zip(out_scores[b0 * k..(b0 + bn) * k].par_chunks_mut(k))
            .for_each_init(
                || (Vec::with_capacity(k), Vec::with_capacity(k)),
                |(ids, vals), ((heap, oi), os)| {
                    drain_sorted(heap, ids, vals);
                    oi[..ids.len()].copy_from_slice(ids);
                    os[..vals.len()].copy_from_slice(vals);
                },
            );
    }
    (out_ids, out_scores)
}

/// Metrics at one cut-off, averaged over users.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct AtK {
    pub k: usize,
    pub hit_rate: f64,
    pub recall: f64,
    pub ndcg: f64,
    pub precision: f64,
    pub mrr: f64,
}

/// Everything one evaluation measured.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    pub users: usize,
    pub items: usize,
    pub at: Vec<AtK>,
    /// `hit_curve[j]` = HR@(j+1), for plotting HR against K.
    pub hit_curve: Vec<f64>,
}

impl Report {
    /// Flat `metric@k` map, e.g. `hit_rate@10`, plus `users` and `items`.
    pub fn to_json(&self) -> serde_json::Value {
        let mut m = serde_json::Map::new();
        for a in &self.at {
            m.insert(format!("hit_rate@{}", a.k), a.hit_rate.into());
            m.insert(format!("recall@{}", a.k), a.recall.into());
            m.insert(format!("ndcg@{}", a.k), a.ndcg.into());
            m.insert(format!("precision@{}", a.k), a.precision.into());
            m.insert(format!("mrr@{}", a.k), a.mrr.into());
        }
        m.insert("users".into(), self.users.into());
        m.insert("items".into(), self.items.into());
        serde_json::Value::Object(m)
    }

    pub fn get(&self, k: usize) -> Option<&AtK> {
        self.at.iter().find(|a| a.k == k)
    }
}

/// Scores ranked lists (`[users × kmax]`, as from [`top_k`]) against each user's targets.
/// Users with no target are skipped.
pub fn score(ranked: &[u32], kmax: usize, targets: &Lists, ks: &[usize], n_items: usize) -> Report {
    let mut at: Vec<AtK> = ks.iter().map(|&k| AtK { k, ..Default::default() }).collect();
    let mut hit_curve = vec![0.0f64; kmax];
    let mut users = 0usize;
    for u in 0..targets.len() {
        let t = targets.get(u);
        if t.is_empty() {
            continue;
        }
        users += 1;
        let row = &ranked[u * kmax..(u + 1) * kmax];
        let ranks: Vec<usize> = row.iter().enumerate().filter(|(_, id)| t.contains(id)).map(|(r, _)| r).collect();
        if let Some(&first) = ranks.first() {
            for h in hit_curve.iter_mut().skip(first) {
                *h += 1.0;
            }
        }
        for a in at.iter_mut() {
            let k = a.k.min(kmax);
            let hits: Vec<usize> = ranks.iter().copied().filter(|&r| r < k).collect();
            if hits.is_empty() {
                continue;
            }
            let dcg: f64 = hits.iter().map(|&r| 1.0 / ((r + 2) as f64).log2()).sum();
            let idcg: f64 = (0..t.len().min(a.k)).map(|r| 1.0 / ((r + 2) as f64).log2()).sum();
            a.hit_rate += 1.0;
            a.recall += hits.len() as f64 / t.len() as f64;
            a.precision += hits.len() as f64 / a.k as f64;
            a.ndcg += dcg / idcg;
            a.mrr += 1.0 / (hits[0] + 1) as f64;
        }
    }
    let n = users.max(1) as f64;
    for a in at.iter_mut() {
        a.hit_rate /= n;
        a.recall /= n;
        a.precision /= n;
        a.ndcg /= n;
        a.mrr /= n;
    }
    hit_curve.iter_mut().for_each(|h| *h /= n);
    Report { users, items: n_items, at, hit_curve }
}

/// Prints a report as an aligned text table.
pub fn format_table(r: &Report) -> String {
    let mut s = format!("users {}  items {}\n", r.users, r.items);
    s.push_str(&format!("{:>6} {:>9} {:>9} {:>9} {:>10} {:>9}\n", "K", "HR", "Recall", "NDCG", "Precision", "MRR"));
    for a in &r.at {
        s.push_str(&format!(
            "{:>6} {:>9.4} {:>9.4} {:>9.4} {:>10.5} {:>9.4}\n",
            a.k, a.hit_rate, a.recall, a.ndcg, a.precision, a.mrr
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_k_matches_a_full_sort_and_respects_exclusions() {
        let mut rng = needle_model::rng::Rng::new(1);
        let (nu, ni, d, k) = (300, 500, 8, 20);
        let u: Vec<f32> = (0..nu * d).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..ni * d).map(|_| rng.normal()).collect();
        let mut ex = Lists::new();
        for i in 0..nu {
            ex.push([(i % ni) as u32, ((i * 7) % ni) as u32]);
        }
        let (ids, scores) = top_k(&u, &v, d, k, Some(&ex));
        for i in 0..nu {
            let mut all: Vec<(f32, u32)> = (1..ni as u32)
                .filter(|j| !ex.get(i).contains(j))
                .map(|j| {
                    (needle_model::layers::dot(&u[i * d..(i + 1) * d], &v[j as usize * d..(j as usize + 1) * d]), j)
                })
                .collect();
            all.sort_by(|a, b| b.0.total_cmp(&a.0));
            let want: Vec<u32> = all[..k].iter().map(|x| x.1).collect();
            assert_eq!(&ids[i * k..(i + 1) * k], &want[..], "user {i}");
            assert!((scores[i * k] - all[0].0).abs() < 1e-4);
        }
    }

    #[test]
    fn tiling_the_items_does_not_change_the_result() {
        let mut rng = needle_model::rng::Rng::new(3);
        let (nu, ni, d, k) = (300, 1000, 8, 50);
        let u: Vec<f32> = (0..nu * d).map(|_| rng.normal()).collect();
        // Repeated item vectors make exact ties, which must still break towards the lower row.
        let v: Vec<f32> = (0..ni * d).map(|i| if (i / d) % 10 == 3 { 0.5 } else { rng.normal() }).collect();
        let mut ex = Lists::new();
        for i in 0..nu {
            ex.push([(i % ni) as u32, ((i * 13) % ni) as u32, 999]);
        }
        let whole = top_k_tiled(&u, &v, d, k, Some(&ex), ni);
        for tile in [1, 7, 64, 333, 999] {
            assert!(top_k_tiled(&u, &v, d, k, Some(&ex), tile) == whole, "tile {tile}");
        }
        assert!(top_k(&u, &v, d, k, Some(&ex)) == whole);
    }

    #[test]
    fn metrics_follow_their_definitions() {
        // Two users, kmax 3. User 0's target at rank 1 (0-based); user 1 has two targets, one at rank 0.
        let ranked = vec![5, 7, 9, 1, 2, 3];
        let mut t = Lists::new();
        t.push([7]);
        t.push([1, 8]);
        t.push([]); // a user without a target is skipped
        let r = score(&ranked, 3, &t, &[1, 3], 10);
        assert_eq!(r.users, 2);
        let a1 = r.get(1).unwrap();
        assert_eq!(a1.hit_rate, 0.5);
        assert_eq!(a1.recall, 0.25);
        assert_eq!(a1.precision, 0.5);
        assert_eq!(a1.mrr, 0.5);
        assert!((a1.ndcg - 0.5).abs() < 1e-12);
        let a3 = r.get(3).unwrap();
        assert_eq!(a3.hit_rate, 1.0);
        assert_eq!(a3.recall, 0.75);
        assert!((a3.mrr - 0.75).abs() < 1e-12);
        let ndcg_u0 = 1.0 / 3f64.log2();
        let ndcg_u1 = 1.0 / (1.0 + 1.0 / 3f64.log2());
        assert!((a3.ndcg - (ndcg_u0 + ndcg_u1) / 2.0).abs() < 1e-12);
        assert_eq!(r.hit_curve, vec![0.5, 1.0, 1.0]);
        assert_eq!(r.to_json()["hit_rate@3"], 1.0);
    }
}
