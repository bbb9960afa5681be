//! Top-K selection: a bounded heap, and the exact top-K of many queries over a matrix of items.
//!
//! Every ranked list in needle breaks ties the same way: the larger score first, then the
//! smaller id. Scores are compared with IEEE `<` inside the heap (NaN never enters) and with
//! `total_cmp` when sorting.

use crate::dot::dot;
use crate::gemm::{matmul, Layout};
use crate::lists::Lists;
use rayon::prelude::*;

/// A bounded min-heap keeping the `k` best `(score, id)` pairs seen so far.
///
/// "Best" is the larger score, ties going to the smaller id so results do not depend on scan
/// order. The root is the worst kept pair, so rejecting a candidate costs one comparison with
/// [`TopK::threshold`] — the common case once the heap is full.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    heap: Vec<(f32, u32)>,
}

#[inline]
fn worse(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
}

impl TopK {
    /// An empty collector for the best `k` pairs.
    pub fn new(k: usize) -> Self {
        TopK { k, heap: Vec::with_capacity(k.min(1 << 16)) }
    }

    /// Empties the collector and sets a new `k`, keeping the allocation.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.heap.clear();
    }

    /// Candidates scoring below this cannot enter; `-inf` until `k` pairs are held (`+inf`
    /// when `k` is 0, so nothing is ever offered).
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.first().map_or(f32::INFINITY, |w| w.0)
        }
    }

    /// Offers one pair; NaN scores are ignored.
    #[inline]
    pub fn push(&mut self, score: f32, id: u32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        let cand = (score, id);
        if self.heap.len() < self.k {
            self.heap.push(cand);
            let mut i = self.heap.len() - 1;
            while i > 0 {
                let p = (i - 1) / 2;
                if worse(self.heap[i], self.heap[p]) {
                    self.heap.swap(i, p);
                    i = p;
                } else {
                    break;
                }
            }
        } else if worse(self.heap[0], cand) {
            self.heap[0] = cand;
            let n = self.heap.len();
            let mut i = 0;
            loop {
                let l = 2 * i + 1;
                if l >= n {
                    break;
                }
                let r = l + 1;
                let c = if r < n && worse(self.heap[r], self.heap[l]) { r } else { l };
                if worse(self.heap[c], self.heap[i]) {
                    self.heap.swap(c, i);
                    i = c;
                } else {
                    break;
                }
            }
        }
    }

    /// Number of pairs held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Moves the kept pairs into `out` as `(id, score)`, best first, and empties the heap.
    pub fn drain_sorted(&mut self, out: &mut Vec<(u32, f32)>) {
        out.clear();
        self.heap.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out.extend(self.heap.drain(..).map(|(s, id)| (id, s)));
    }
}

/// Candidates the matrix product selects beyond `k` before [`dot`] rescores them. The product
/// and [`dot`] sum in different orders, so two items within a rounding error of each other may
/// swap places between them; the margin keeps the item the canonical score puts at rank `k`
/// among the candidates unless more than this many items tie with it to the last bits.
pub const RESCORE_MARGIN: usize = 8;

/// Users scored per block: `[block × items]` scores stay in cache-friendly memory.
const USER_BLOCK: usize = 256;

/// Scores held at once: a block of users against a tile of items. Bounds memory at any
/// catalogue size (256 users × 10^7 items would be 10 GB) while keeping tiles large enough that
/// the matrix product runs at full speed.
const SCORE_BUDGET: usize = 1 << 24;

/// Top-`k` item rows for every user, `[users × k]` (rows padded with `u32::MAX` and `-inf` when
/// fewer items qualify). Item row 0 (padding) and each user's `exclude` list never appear.
///
/// `user_vecs` is `[users × d]`; `item_vecs` is `[items × d]`, row = item row. A blocked matrix
/// product selects candidates; the scores returned, and the order, are [`dot`]'s, as an exact
/// index reports them.
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
    if k == 0 {
        return (out_ids, out_scores);
    }
    let kept = k + RESCORE_MARGIN;
    let mut scores = vec![0.0f32; USER_BLOCK.min(n_users.max(1)) * tile];
    let mut heaps: Vec<TopK> = Vec::new();
    for b0 in (0..n_users).step_by(USER_BLOCK) {
        let bn = USER_BLOCK.min(n_users - b0);
        heaps.clear();
        heaps.resize_with(bn, || TopK::new(kept));
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
                let mut thr = heap.threshold();
                for (j, &s) in row.iter().enumerate() {
                    if s >= thr && s != f32::NEG_INFINITY {
                        heap.push(s, (t0 + j) as u32);
                        thr = heap.threshold();
                    }
                }
            });
        }
        heaps
            .par_iter_mut()
            .zip(out_ids[b0 * k..(b0 + bn) * k].par_chunks_mut(k))
            .zip(out_scores[b0 * k..(b0 + bn) * k].par_chunks_mut(k))
            .enumerate()
            .for_each_init(
                || Vec::with_capacity(kept),
                |cands, (i, ((heap, oi), os))| {
                    let q = &user_vecs[(b0 + i) * d..(b0 + i + 1) * d];
                    heap.drain_sorted(cands);
                    rescore(q, cands, |id| &item_vecs[id as usize * d..(id as usize + 1) * d]);
                    for (j, &(id, s)) in cands.iter().take(k).enumerate() {
                        oi[j] = id;
                        os[j] = s;
                    }
                },
            );
    }
    (out_ids, out_scores)
}

/// Replaces each candidate's score by the canonical [`dot`] of `query` and its vector, then
/// sorts best first (ties: smaller id).
pub fn rescore<'a>(query: &[f32], cands: &mut [(u32, f32)], vector: impl Fn(u32) -> &'a [f32]) {
    for c in cands.iter_mut() {
        c.1 = dot(query, vector(c.0));
    }
    sort_ranked(cands);
}

/// Sorts `(id, score)` pairs best first: larger score, then smaller id.
pub fn sort_ranked(items: &mut [(u32, f32)]) {
    items.sort_unstable_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn topk_keeps_the_best_with_id_tie_break() {
        let mut t = TopK::new(3);
        for (s, id) in [(0.5, 9), (0.1, 1), (0.9, 4), (0.5, 2), (f32::NAN, 0), (0.7, 5), (0.5, 1)] {
            t.push(s, id);
        }
        let mut out = Vec::new();
        t.drain_sorted(&mut out);
        assert_eq!(out, vec![(4, 0.9), (5, 0.7), (1, 0.5)]);
        assert!(t.is_empty());
    }

    #[test]
    fn top_k_matches_a_full_sort_by_the_canonical_score_and_respects_exclusions() {
        let mut rng = Rng::new(1);
        let (nu, ni, d, k) = (300, 500, 8, 20);
        let u: Vec<f32> = (0..nu * d).map(|_| rng.normal()).collect();
        let v: Vec<f32> = (0..ni * d).map(|_| rng.normal()).collect();
        let mut ex = Lists::new();
        for i in 0..nu {
            ex.push([(i % ni) as u32, ((i * 7) % ni) as u32]);
        }
        let (ids, scores) = top_k(&u, &v, d, k, Some(&ex));
        for i in 0..nu {
            let q = &u[i * d..(i + 1) * d];
            let mut all: Vec<(u32, f32)> = (1..ni as u32)
                .filter(|j| !ex.get(i).contains(j))
                .map(|j| (j, dot(q, &v[j as usize * d..(j as usize + 1) * d])))
                .collect();
            sort_ranked(&mut all);
            let want: Vec<u32> = all[..k].iter().map(|x| x.0).collect();
            assert_eq!(&ids[i * k..(i + 1) * k], &want[..], "user {i}");
            let want_scores: Vec<f32> = all[..k].iter().map(|x| x.1).collect();
            assert_eq!(&scores[i * k..(i + 1) * k], &want_scores[..], "user {i}: scores are dot's bits");
        }
    }

    #[test]
    fn tiling_the_items_does_not_change_the_result() {
        let mut rng = Rng::new(3);
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
    fn fewer_items_than_k_pad_the_rows() {
        let u = vec![1.0, 0.0];
        let v = vec![0.0, 0.0, 0.5, 0.5, 0.25, 1.0];
        let (ids, scores) = top_k(&u, &v, 2, 4, None);
        assert_eq!(ids, vec![1, 2, u32::MAX, u32::MAX]);
        assert_eq!(scores[..2], [0.5, 0.25]);
        assert!(scores[2..].iter().all(|&s| s == f32::NEG_INFINITY));
    }
}
