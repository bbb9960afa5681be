//! Embedding tables that live outside the dense graph.
//!
//! A step gathers only the rows its batch touches and writes their gradients into a
//! [`SparseGrad`]; the optimizer then updates only those rows. Nothing in a step walks the
//! whole table, so a step costs the same at 10⁴ rows as at 10⁷.

use crate::rng::Rng;
use serde::{Deserialize, Serialize};

/// How item rows share the rows of an item-id table when the tail of the catalogue is hashed:
/// rows below `own` keep a table row of their own, rows from `own` to `first_cold` share
/// `buckets` rows by a hash of the row, and rows from `first_cold` on (items without training
/// events) read the zero padding row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RowHash {
    pub own: u32,
    pub buckets: u32,
    pub first_cold: u32,
}

impl RowHash {
    /// Rows of a table under this hashing.
    pub fn table_rows(&self) -> usize {
        self.own as usize + self.buckets as usize
    }

    /// The table row of item row `r`.
    #[inline]
    pub fn row(&self, r: u32) -> u32 {
        if r < self.own {
            r
        } else if r < self.first_cold && self.buckets > 0 {
            // Fibonacci hashing: consecutive rows scatter over the buckets.
            let h = (u64::from(r).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 32) as u32;
            self.own + h % self.buckets
        } else {
            0
        }
    }
}

/// A `[rows × dim]` table; row 0 is the padding / unknown row and is kept at zero. With `hash`,
/// the ids given to [`Embedding::row`] are item rows that map onto fewer table rows.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub rows: usize,
    pub dim: usize,
    pub weights: Vec<f32>,
    pub hash: Option<RowHash>,
}

impl Embedding {
    /// Rows drawn from N(0, scale²); the padding row is zero so that unknown ids contribute nothing.
    pub fn new(rows: usize, dim: usize, scale: f32, rng: &mut Rng) -> Self {
        let mut weights = huge_page_vec(rows * dim);
        weights.extend((0..rows * dim).map(|_| rng.normal() * scale));
        weights[..dim.min(rows * dim)].fill(0.0);
        Embedding { rows, dim, weights, hash: None }
    }

    /// A table indexed by item row: `items` rows, or the rows of `hash` when the tail is hashed.
    pub fn for_items(items: usize, dim: usize, scale: f32, hash: Option<RowHash>, rng: &mut Rng) -> Self {
        let mut t = Embedding::new(hash.map_or(items, |h| h.table_rows()), dim, scale, rng);
        t.hash = hash;
        t
    }

    #[inline]
    pub fn row(&self, r: u32) -> &[f32] {
        let r = self.hash.map_or(r, |h| h.row(r)) as usize;
        &self.weights[r * self.dim..(r + 1) * self.dim]
    }
}

/// Buffers at least this large ask the kernel for huge pages.
const HUGE_PAGES_FROM: usize = 16 << 20;

/// An empty vector with room for `n` values, backed by huge pages when large (see
/// [`advise_huge_pages`]); fill it before use.
pub fn huge_page_vec<T>(n: usize) -> Vec<T> {
    let v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(v.as_ptr(), n);
    v
}

/// `n` zeros, backed by huge pages when large; pages are still committed only when first written.
pub fn huge_page_zeros(n: usize) -> Vec<f32> {
    let v = vec![0.0f32; n];
    advise_huge_pages(v.as_ptr(), n);
    v
}

/// Asks the kernel to back the `n` values at `ptr` with transparent huge pages, where it offers
/// them on request, when they take at least [`HUGE_PAGES_FROM`] bytes: a training step reads and
/// writes rows scattered over whole tables, and with 4 KiB pages nearly every row costs a TLB
/// miss. Only pages not yet touched are affected.
fn advise_huge_pages<T>(ptr: *const T, n: usize) {
    let bytes = n * std::mem::size_of::<T>();
    #[cfg(target_os = "linux")]
    if bytes >= HUGE_PAGES_FROM {
        const PAGE: usize = 4096;
        let start = ptr as usize;
        let aligned = (start + PAGE - 1) & !(PAGE - 1);
        let len = (start + bytes).saturating_sub(aligned) & !(PAGE - 1);
        // SAFETY: the range lies inside one live allocation of `bytes` bytes; the advice changes
        // only how its pages are backed, never their contents. A kernel without huge pages
        // refuses, and the memory works as before.
        unsafe {
            libc::madvise(aligned as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (ptr, bytes);
}

/// Gradient rows for the rows a batch touched, in first-touch order.
///
/// `slot` maps a table row to its position in `rows`; it is as long as the table (one `u32`
/// per row, allocated once) and only the touched entries are reset after a step.
#[derive(Clone, Debug)]
pub struct SparseGrad {
    pub dim: usize,
    /// The table's hashing: ids given to [`SparseGrad::add`] are mapped as the table maps them,
    /// and `rows` holds table rows.
    hash: Option<RowHash>,
    slot: Vec<u32>,
    pub rows: Vec<u32>,
    pub grads: Vec<f32>,
}

const ABSENT: u32 = u32::MAX;

impl SparseGrad {
    pub fn new(table_rows: usize, dim: usize) -> Self {
        let mut slot = huge_page_vec(table_rows);
        slot.resize(table_rows, ABSENT);
        SparseGrad { dim, hash: None, slot, rows: Vec::new(), grads: Vec::new() }
    }

    /// Gradients for `table`, mapping ids as it does.
    pub fn for_table(table: &Embedding) -> Self {
        SparseGrad { hash: table.hash, ..SparseGrad::new(table.rows, table.dim) }
    }

    /// The gradient row of table row `r`, created at zero on first touch.
    #[inline]
    pub fn row_mut(&mut self, r: u32) -> &mut [f32] {
        let mut s = self.slot[r as usize];
        if s == ABSENT {
            s = self.rows.len() as u32;
            self.slot[r as usize] = s;
            self.rows.push(r);
            self.grads.resize(self.grads.len() + self.dim, 0.0);
        }
        let s = s as usize;
        &mut self.grads[s * self.dim..(s + 1) * self.dim]
    }

    /// `grad[r] += scale · v`, `r` mapped to its table row; the padding row takes nothing (the
    /// optimizer never moves it, and under hashing cold items map onto it).
    #[inline]
    pub fn add(&mut self, r: u32, scale: f32, v: &[f32]) {
        let r = self.hash.map_or(r, |h| h.row(r));
        if r == 0 && self.hash.is_some() {
            return;
        }
        for (g, x) in self.row_mut(r).iter_mut().zip(v) {
            *g += scale * x;
        }
    }

    /// Forgets the touched rows, keeping the capacity for the next step.
    pub fn clear(&mut self) {
        for &r in &self.rows {
            self.slot[r as usize] = ABSENT;
        }
        self.rows.clear();
        self.grads.clear();
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

/// Mean of the table rows in each bag: `out[b] = Σ_{j<len[b]} E[ids[b·l + j]] / len[b]` (zeros for
/// an empty bag). Bags are stored padded to a fixed width `l`; row 0 ids inside the length count.
pub fn bag_mean_forward(out: &mut [f32], out_stride: usize, table: &Embedding, ids: &[u32], lens: &[u32], l: usize) {
    let d = table.dim;
    for (b, &len) in lens.iter().enumerate() {
        let o = &mut out[b * out_stride..b * out_stride + d];
        o.fill(0.0);
        let len = len as usize;
        if len == 0 {
            continue;
        }
        for &id in &ids[b * l..b * l + len] {
            for (a, v) in o.iter_mut().zip(table.row(id)) {
                *a += v;
            }
        }
        let inv = 1.0 / len as f32;
        for a in o.iter_mut() {
            *a *= inv;
        }
    }
}

/// Gradient of [`bag_mean_forward`]: each id of bag `b` receives `dout[b] / len[b]`.
pub fn bag_mean_backward(grad: &mut SparseGrad, dout: &[f32], dout_stride: usize, ids: &[u32], lens: &[u32], l: usize) {
    let d = grad.dim;
    for (b, &len) in lens.iter().enumerate() {
        let len = len as usize;
        if len == 0 {
            continue;
        }
        let g = &dout[b * dout_stride..b * dout_stride + d];
        let inv = 1.0 / len as f32;
        for &id in &ids[b * l..b * l + len] {
            if id != 0 {
                grad.add(id, inv, g);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashed_rows_keep_the_head_share_the_tail_and_zero_the_cold() {
        let h = RowHash { own: 10, buckets: 16, first_cold: 2010 };
        assert!((0..10).all(|r| h.row(r) == r));
        let mut per_bucket = [0usize; 16];
        for r in 10..2010 {
            let t = h.row(r);
            assert!((10..26).contains(&t), "row {r} → {t}");
            per_bucket[(t - 10) as usize] += 1;
        }
        // 2,000 tail rows over 16 buckets: every bucket used, none with more than twice its share.
        assert!(per_bucket.iter().all(|&n| n > 0 && n <= 250), "{per_bucket:?}");
        assert_eq!(h.row(2010), 0);
        assert_eq!(h.row(u32::MAX >> 1), 0);

        let mut t = Embedding::for_items(2020, 2, 1.0, Some(h), &mut Rng::new(1));
        assert_eq!(t.rows, 26);
        t.weights[h.row(500) as usize * 2] = 7.0;
        assert_eq!(t.row(500)[0], 7.0);
        assert_eq!(t.row(2015), &[0.0, 0.0]);
        let mut g = SparseGrad::for_table(&t);
        g.add(500, 1.0, &[1.0, 1.0]);
        g.add(3, 1.0, &[1.0, 1.0]);
        g.add(2015, 1.0, &[1.0, 1.0]);
        assert_eq!(g.rows, vec![h.row(500), 3]);
    }

    #[test]
    fn bag_mean_gradient_matches_finite_differences() {
        let mut rng = Rng::new(5);
        let mut table = Embedding::new(6, 3, 1.0, &mut rng);
        let (ids, lens, l) = (vec![1, 2, 2, 0, 5, 3, 0, 0, 0, 0, 0, 0], vec![3, 2, 0], 4);
        let r: Vec<f32> = (0..9).map(|_| rng.normal()).collect();
        let loss = |t: &Embedding| {
            let mut out = vec![0.0; 9];
            bag_mean_forward(&mut out, 3, t, &ids, &lens, l);
            out.iter().zip(&r).map(|(a, b)| (a * b) as f64).sum::<f64>()
        };
        let mut g = SparseGrad::new(6, 3);
        bag_mean_backward(&mut g, &r, 3, &ids, &lens, l);
        assert_eq!(g.rows, vec![1, 2, 5, 3]);
        for (slot, &row) in g.rows.clone().iter().enumerate() {
            for k in 0..3 {
                let i = row as usize * 3 + k;
                let orig = table.weights[i];
                table.weights[i] = orig + 1e-2;
                let up = loss(&table);
                table.weights[i] = orig - 1e-2;
                let down = loss(&table);
                table.weights[i] = orig;
                let num = ((up - down) / 2e-2) as f32;
                assert!((num - g.grads[slot * 3 + k]).abs() < 1e-3, "row {row}: {num} vs {}", g.grads[slot * 3 + k]);
            }
        }
        g.clear();
        assert!(g.is_empty());
        g.add(4, 1.0, &[1.0, 2.0, 3.0]);
        assert_eq!(g.rows, vec![4]);
        assert_eq!(g.grads, vec![1.0, 2.0, 3.0]);
    }
}
