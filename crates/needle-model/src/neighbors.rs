//! Item-to-item recall from counts: the classical baselines that a neural model has to beat,
//! and the item-to-item channels a server mixes with it.
//!
//! Both kinds keep, for every item row, its best `neighbors` other rows with a weight:
//! - **transitions**: how often the other item came within `window` positions *after* this one
//!   in a user's training sequence (first-order transitions for `window = 1`);
//! - **item-CF**: how often the two items came within `window` positions of each other (either
//!   direction; 0 = anywhere in the sequence), divided by `sqrt(n_a · n_b)` with `n` an item's
//!   number of training events: the cosine of item-based collaborative filtering.
//!
//! A user is scored from the newest `recent` items of the history: the j-th newest (j = 0 the
//! newest) adds `decay^j × weight` to each of its neighbours. Items rank by that score, ties and
//! the remainder of the list by training count, so a user with no usable history gets the
//! popularity ranking.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum NeighborKind {
    Transitions,
    Itemcf,
}

/// The shape and scoring rule of an item-to-item model (saved in the run's manifest).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NeighborSpec {
    pub kind: NeighborKind,
    /// Item rows, padding row 0 included.
    pub items: usize,
    /// Positions that count as "together" (see the module docs); 0 = the whole sequence.
    pub window: usize,
    /// Neighbours kept per item.
    pub neighbors: usize,
    /// Newest history items that score a user (0 = all of the newest `max_seq_len`).
    pub recent: usize,
    /// Weight ratio from one history item to the next older one.
    pub decay: f32,
    pub max_seq_len: usize,
}

impl NeighborSpec {
    /// History items that score a user.
    pub fn scoring_len(&self) -> usize {
        match self.recent {
            0 => self.max_seq_len,
            r => r.min(self.max_seq_len.max(1)),
        }
    }
}

/// Neighbour lists of every item row (CSR, each list best first) and the popularity order.
#[derive(Clone, Debug)]
pub struct ItemNeighbors {
    pub spec: NeighborSpec,
    offsets: Vec<u64>,
    rows: Vec<u32>,
    weights: Vec<f32>,
    /// Training events per item row, the tie-break and the fallback order.
    counts: Vec<u64>,
    /// Item rows (row 0 left out) by training count, most first; ties by row.
    popular: Vec<u32>,
}

/// Items counted per parallel task: enough work to amortise the task, small enough to balance.
const BUILD_CHUNK: usize = 256;

/// Reusable buffers of one scoring call, so a server scores without allocating per request.
#[derive(Default)]
pub struct Scratch {
    pairs: Vec<(u32, f32)>,
    ranked: Vec<(u32, f32)>,
}

impl ItemNeighbors {
    /// Counts neighbours over training sequences given as CSR (`offsets`, item rows oldest
    /// first; row 0 is skipped). `counts[row]` is each row's number of training events.
    pub fn build(spec: NeighborSpec, offsets: &[u32], seq_items: &[u32], counts: &[u64]) -> Result<Self, String> {
        if counts.len() != spec.items {
            return Err(format!("{} item counts for {} item rows", counts.len(), spec.items));
        }
        if spec.neighbors == 0 {
            return Err("`neighbors` must be at least 1".into());
        }
        if !(spec.decay > 0.0 && spec.decay <= 1.0) {
            return Err(format!("`decay` must be in (0, 1], not {}", spec.decay));
        }
        if let Some(&bad) = seq_items.iter().find(|&&r| r as usize >= spec.items) {
            return Err(format!("item row {bad} is past the {} item rows", spec.items));
        }
        // Where each item occurs (global positions), and which sequence each position is in.
        let n = spec.items;
        let mut occ_start = vec![0u64; n + 1];
        for &r in seq_items {
            occ_start[r as usize + 1] += 1;
        }
        for i in 0..n {
            occ_start[i + 1] += occ_start[i];
        }
        let mut fill = occ_start.clone();
        let mut occ = vec![0u64; seq_items.len()];
        let mut seq_of = vec![0u32; seq_items.len()];
        for s in 0..offsets.len().saturating_sub(1) {
            for p in offsets[s] as usize..offsets[s + 1] as usize {
                let r = seq_items[p] as usize;
                occ[fill[r] as usize] = p as u64;
                fill[r] += 1;
                seq_of[p] = s as u32;
            }
        }
        let occurrences = |r: usize| &occ[occ_start[r] as usize..occ_start[r + 1] as usize];
        let norm: Vec<f32> = (0..n).map(|r| (occurrences(r).len() as f32).sqrt()).collect();
        let (kind, window, m) = (spec.kind, spec.window, spec.neighbors);

        let chunks: Vec<(Vec<u32>, Vec<u32>, Vec<f32>)> = (0..n.div_ceil(BUILD_CHUNK))
            .into_par_iter()
            .map_init(
                || (vec![0f32; n], Vec::<u32>::new(), Vec::<(u32, f32)>::new()),
                |(acc, touched, best), c| {
                    let mut lens = Vec::with_capacity(BUILD_CHUNK);
                    let (mut rows, mut weights) = (Vec::new(), Vec::new());
                    for a in c * BUILD_CHUNK..((c + 1) * BUILD_CHUNK).min(n) {
                        if a != 0 {
                            for &p in occurrences(a) {
                                let p = p as usize;
                                let s = seq_of[p] as usize;
                                let (lo, hi) = (offsets[s] as usize, offsets[s + 1] as usize);
                                let span = match (kind, window) {
                                    (NeighborKind::Transitions, 0) => p + 1..hi,
                                    (NeighborKind::Transitions, w) => p + 1..(p + 1 + w).min(hi),
                                    (NeighborKind::Itemcf, 0) => lo..hi,
                                    (NeighborKind::Itemcf, w) => p.saturating_sub(w).max(lo)..(p + 1 + w).min(hi),
                                };
                                for &b in &seq_items[span] {
                                    if b == 0 || b as usize == a {
                                        continue;
                                    }
                                    if acc[b as usize] == 0.0 {
                                        touched.push(b);
                                    }
                                    acc[b as usize] += 1.0;
                                }
                            }
                        }
                        best.clear();
                        for &b in touched.iter() {
                            let c = std::mem::take(&mut acc[b as usize]);
                            let w = match kind {
                                NeighborKind::Transitions => c,
                                NeighborKind::Itemcf => c / (norm[a] * norm[b as usize]),
                            };
                            best.push((b, w));
                        }
                        touched.clear();
                        let by_weight = |x: &(u32, f32), y: &(u32, f32)| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0));
                        if best.len() > m {
                            best.select_nth_unstable_by(m - 1, by_weight);
                            best.truncate(m);
                        }
                        best.sort_unstable_by(by_weight);
                        lens.push(best.len() as u32);
                        rows.extend(best.iter().map(|x| x.0));
                        weights.extend(best.iter().map(|x| x.1));
                    }
                    (lens, rows, weights)
                },
            )
            .collect();
        let mut offsets_out = Vec::with_capacity(n + 1);
        offsets_out.push(0u64);
        let total: usize = chunks.iter().map(|c| c.1.len()).sum();
        let (mut rows, mut weights) = (Vec::with_capacity(total), Vec::with_capacity(total));
        for (lens, r, w) in chunks {
            for l in lens {
                offsets_out.push(offsets_out.last().copied().unwrap_or(0) + l as u64);
            }
            rows.extend(r);
            weights.extend(w);
        }
        Ok(Self::from_parts(spec, offsets_out, rows, weights, counts.to_vec()).expect("built consistently"))
    }

    /// Reassembles saved lists, checking that they fit together.
    pub fn from_parts(
        spec: NeighborSpec,
        offsets: Vec<u64>,
        rows: Vec<u32>,
        weights: Vec<f32>,
        counts: Vec<u64>,
    ) -> Result<Self, String> {
        if offsets.len() != spec.items + 1 || counts.len() != spec.items {
            return Err(format!("{} offsets and {} counts for {} item rows", offsets.len(), counts.len(), spec.items));
        }
        if offsets[0] != 0 || offsets.windows(2).any(|w| w[0] > w[1]) || offsets[spec.items] != rows.len() as u64 {
            return Err("neighbour offsets are not a non-decreasing list ending at the neighbour count".into());
        }
        if rows.len() != weights.len() {
            return Err(format!("{} neighbour rows but {} weights", rows.len(), weights.len()));
        }
        if rows.iter().any(|&r| r == 0 || r as usize >= spec.items) {
            return Err("a neighbour row is padding or past the item rows".into());
        }
        if weights.iter().any(|w| !w.is_finite()) {
            return Err("a neighbour weight is not finite".into());
        }
        let mut popular: Vec<u32> = (1..spec.items as u32).collect();
        popular.sort_by(|&a, &b| counts[b as usize].cmp(&counts[a as usize]).then(a.cmp(&b)));
        Ok(ItemNeighbors { spec, offsets, rows, weights, counts, popular })
    }

    /// The saved arrays: offsets, neighbour rows, weights.
    pub fn parts(&self) -> (&[u64], &[u32], &[f32]) {
        (&self.offsets, &self.rows, &self.weights)
    }

    pub fn item_rows(&self) -> usize {
        self.spec.items
    }

    /// Neighbours of one item row, best first.
    pub fn neighbors_of(&self, row: u32) -> impl Iterator<Item = (u32, f32)> + '_ {
        let r = row as usize;
        let span = match (self.offsets.get(r), self.offsets.get(r + 1)) {
            (Some(&a), Some(&b)) => a as usize..b as usize,
            _ => 0..0,
        };
        self.rows[span.clone()].iter().copied().zip(self.weights[span].iter().copied())
    }

    /// Sums the neighbours of the scoring history items into `pairs`, one entry per row.
    fn accumulate(&self, history: &[u32], pairs: &mut Vec<(u32, f32)>) {
        pairs.clear();
        let mut w = 1.0f32;
        for &h in history.iter().rev().take(self.spec.scoring_len()) {
            pairs.extend(self.neighbors_of(h).map(|(r, x)| (r, w * x)));
            w *= self.spec.decay;
        }
        // A stable sort keeps each row's terms newest first, so the sums do not depend on the
        // sort algorithm.
        pairs.sort_by_key(|p| p.0);
        let mut out = 0;
        for i in 0..pairs.len() {
            if out > 0 && pairs[out - 1].0 == pairs[i].0 {
                pairs[out - 1].1 += pairs[i].1;
            } else {
                pairs[out] = pairs[i];
                out += 1;
            }
        }
        pairs.truncate(out);
    }

    /// The `k` best items for a user with this history (oldest first), `(row, score)` best
    /// first; items for which `keep` is false are left out. Items no history item leads to
    /// follow by popularity with score 0, so the list is short only when the catalogue is.
    pub fn recall(
        &self,
        history: &[u32],
        k: usize,
        keep: &dyn Fn(u32) -> bool,
        scratch: &mut Scratch,
        out: &mut Vec<(u32, f32)>,
    ) {
        out.clear();
        self.accumulate(history, &mut scratch.pairs);
        let ranked = &mut scratch.ranked;
        ranked.clear();
        ranked.extend(scratch.pairs.iter().copied().filter(|&(r, s)| s > 0.0 && keep(r)));
        let counts = &self.counts;
        let order = |x: &(u32, f32), y: &(u32, f32)| {
            y.1.total_cmp(&x.1).then(counts[y.0 as usize].cmp(&counts[x.0 as usize])).then(x.0.cmp(&y.0))
        };
        if ranked.len() > k && k > 0 {
            ranked.select_nth_unstable_by(k - 1, order);
        }
        ranked.truncate(k);
        ranked.sort_unstable_by(order);
        out.extend_from_slice(ranked);
        if out.len() < k {
            // Rows already scored are in `pairs`, sorted by row.
            for &r in &self.popular {
                if out.len() == k {
                    break;
                }
                let scored = scratch.pairs.binary_search_by_key(&r, |p| p.0).is_ok_and(|i| scratch.pairs[i].1 > 0.0);
                if !scored && keep(r) {
                    out.push((r, 0.0));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(kind: NeighborKind, window: usize, neighbors: usize) -> NeighborSpec {
        NeighborSpec { kind, items: 6, window, neighbors, recent: 2, decay: 0.5, max_seq_len: 50 }
    }

    // Two sequences over rows 1..=5.
    const OFFSETS: [u32; 3] = [0, 4, 7];
    const ITEMS: [u32; 7] = [1, 2, 3, 2, 2, 3, 4];
    const COUNTS: [u64; 6] = [0, 1, 3, 2, 1, 0];

    #[test]
    fn transitions_count_what_follows() {
        let m = ItemNeighbors::build(spec(NeighborKind::Transitions, 1, 10), &OFFSETS, &ITEMS, &COUNTS).unwrap();
        assert_eq!(m.neighbors_of(1).collect::<Vec<_>>(), vec![(2, 1.0)]);
        assert_eq!(m.neighbors_of(2).collect::<Vec<_>>(), vec![(3, 2.0)]);
        assert_eq!(m.neighbors_of(3).collect::<Vec<_>>(), vec![(2, 1.0), (4, 1.0)]);
        assert_eq!(m.neighbors_of(5).count(), 0);
        // Kept neighbours are the heaviest, ties to the lower row.
        let m1 = ItemNeighbors::build(spec(NeighborKind::Transitions, 1, 1), &OFFSETS, &ITEMS, &COUNTS).unwrap();
        assert_eq!(m1.neighbors_of(3).collect::<Vec<_>>(), vec![(2, 1.0)]);
    }

    #[test]
    fn itemcf_is_a_windowed_cosine() {
        let m = ItemNeighbors::build(spec(NeighborKind::Itemcf, 1, 10), &OFFSETS, &ITEMS, &COUNTS).unwrap();
        // 2 and 3 are adjacent three times (2-3, 3-2 in the first sequence, 2-3 in the second).
        let w23 = m.neighbors_of(2).find(|x| x.0 == 3).unwrap().1;
        assert!((w23 - 3.0 / (3f32 * 2.0).sqrt()).abs() < 1e-6);
        let w32 = m.neighbors_of(3).find(|x| x.0 == 2).unwrap().1;
        assert_eq!(w23, w32);
    }

    #[test]
    fn recall_scores_then_falls_back_to_popularity() {
        let m = ItemNeighbors::build(spec(NeighborKind::Transitions, 1, 10), &OFFSETS, &ITEMS, &COUNTS).unwrap();
        let mut s = Scratch::default();
        let mut out = Vec::new();
        // Newest 3 (weight 1) → 2 (1), 4 (1); then 2 (weight ½) → 3 (2 × ½ = 1).
        m.recall(&[1, 2, 3], 5, &|r| r != 1, &mut s, &mut out);
        // Ties at score 1 rank by training count: 2 (3 events), 3 (2), 4 (1); then 5 by
        // popularity; row 1 is excluded.
        assert_eq!(out, vec![(2, 1.0), (3, 1.0), (4, 1.0), (5, 0.0)]);
        m.recall(&[], 2, &|_| true, &mut s, &mut out);
        assert_eq!(out, vec![(2, 0.0), (3, 0.0)]);
    }

    #[test]
    fn broken_parts_are_refused() {
        let sp = spec(NeighborKind::Transitions, 1, 10);
        let counts = COUNTS.to_vec();
        assert!(ItemNeighbors::from_parts(sp.clone(), vec![0; 7], vec![], vec![], counts.clone()).is_ok());
        assert!(ItemNeighbors::from_parts(sp.clone(), vec![0; 6], vec![], vec![], counts.clone()).is_err());
        assert!(ItemNeighbors::from_parts(sp.clone(), vec![0, 1, 1, 1, 1, 1, 1], vec![9], vec![1.0], counts.clone())
            .is_err());
        assert!(ItemNeighbors::from_parts(sp.clone(), vec![0, 1, 0, 1, 1, 1, 1], vec![2], vec![1.0], counts.clone())
            .is_err());
        assert!(ItemNeighbors::from_parts(sp, vec![0, 1, 1, 1, 1, 1, 1], vec![2], vec![f32::NAN], counts).is_err());
    }
}
