//! Embedding tables that live outside the dense graph.
//!
//! A step gathers only the rows its batch touches and writes their gradients into a
//! [`SparseGrad`]; the optimizer then updates only those rows. Nothing in a step walks the
//! whole table, so a step costs the same at 10⁴ rows as at 10⁷.

use crate::rng::Rng;

/// A `[rows × dim]` table; row 0 is the padding / unknown row and is kept at zero.
#[derive(Clone, Debug)]
pub struct Embedding {
    pub rows: usize,
    pub dim: usize,
    pub weights: Vec<f32>,
}

impl Embedding {
    /// Rows drawn from N(0, scale²); the padding row is zero so that unknown ids contribute nothing.
    pub fn new(rows: usize, dim: usize, scale: f32, rng: &mut Rng) -> Self {
        let mut weights: Vec<f32> = (0..rows * dim).map(|_| rng.normal() * scale).collect();
        weights[..dim.min(rows * dim)].fill(0.0);
        Embedding { rows, dim, weights }
    }

    #[inline]
    pub fn row(&self, r: u32) -> &[f32] {
        let r = r as usize;
        &self.weights[r * self.dim..(r + 1) * self.dim]
    }
}

/// Gradient rows for the rows a batch touched, in first-touch order.
///
/// `slot` maps a table row to its position in `rows`; it is as long as the table (one `u32`
/// per row, allocated once) and only the touched entries are reset after a step.
#[derive(Clone, Debug)]
pub struct SparseGrad {
    pub dim: usize,
    slot: Vec<u32>,
    pub rows: Vec<u32>,
    pub grads: Vec<f32>,
}

const ABSENT: u32 = u32::MAX;

impl SparseGrad {
    pub fn new(table_rows: usize, dim: usize) -> Self {
        SparseGrad { dim, slot: vec![ABSENT; table_rows], rows: Vec::new(), grads: Vec::new() }
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

    /// `grad[r] += scale · v`.
    #[inline]
    pub fn add(&mut self, r: u32, scale: f32, v: &[f32]) {
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
