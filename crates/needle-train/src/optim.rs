//! Optimizers: Adam for dense layers; Adam or row-wise Adagrad for embedding tables, touching
//! only the rows a step produced gradients for.

use needle_model::embedding::{huge_page_zeros, Embedding, SparseGrad};
use rayon::prelude::*;

const BETA1: f32 = 0.9;
const BETA2: f32 = 0.999;
const EPS: f32 = 1e-8;

/// Adam state for one dense tensor.
pub struct DenseAdam {
    m: Vec<f32>,
    v: Vec<f32>,
}

impl DenseAdam {
    pub fn new(len: usize) -> Self {
        DenseAdam { m: vec![0.0; len], v: vec![0.0; len] }
    }

    /// One update at step `t` (1-based).
    pub fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32, t: u64) {
        let (c1, c2) = bias_corrections(t);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *w -= lr * (*m / c1) / ((*v / c2).sqrt() + EPS);
        }
    }
}

fn bias_corrections(t: u64) -> (f32, f32) {
    let t = t.min(1 << 20) as i32;
    (1.0 - BETA1.powi(t), 1.0 - BETA2.powi(t))
}

/// State for one embedding table.
pub enum SparseState {
    /// Per-element moments, the same shape as the table ("lazy" Adam).
    Adam { m: Vec<f32>, v: Vec<f32> },
    /// One squared-gradient accumulator per row.
    RowwiseAdagrad { acc: Vec<f32> },
}

impl SparseState {
    pub fn adam(table: &Embedding) -> Self {
        SparseState::Adam { m: huge_page_zeros(table.weights.len()), v: huge_page_zeros(table.weights.len()) }
    }

    pub fn rowwise_adagrad(table: &Embedding) -> Self {
        SparseState::RowwiseAdagrad { acc: huge_page_zeros(table.rows) }
    }

    /// Updates the touched rows of `table`; row 0 (padding) is never updated.
    pub fn step(&mut self, table: &mut Embedding, g: &SparseGrad, lr: f32, t: u64) {
        let d = table.dim;
        let (c1, c2) = bias_corrections(t);
        // Rows are distinct, so updates are independent; hand each task its own rows through
        // raw addresses of the (disjoint) row slices.
        let w_addr = table.weights.as_mut_ptr() as usize;
        match self {
            SparseState::Adam { m, v } => {
                let (m_addr, v_addr) = (m.as_mut_ptr() as usize, v.as_mut_ptr() as usize);
                g.rows.par_iter().enumerate().with_min_len(64).for_each(|(s, &r)| {
                    if r == 0 {
                        return;
                    }
                    let off = r as usize * d;
                    // SAFETY: `g.rows` holds each row at most once, so no two tasks touch the
                    // same row; every row index is < table.rows by construction of SparseGrad.
                    let (w, m, v) = unsafe {
                        (
                            std::slice::from_raw_parts_mut((w_addr as *mut f32).add(off), d),
                            std::slice::from_raw_parts_mut((m_addr as *mut f32).add(off), d),
                            std::slice::from_raw_parts_mut((v_addr as *mut f32).add(off), d),
                        )
                    };
                    let gr = &g.grads[s * d..(s + 1) * d];
                    for k in 0..d {
                        m[k] = BETA1 * m[k] + (1.0 - BETA1) * gr[k];
                        v[k] = BETA2 * v[k] + (1.0 - BETA2) * gr[k] * gr[k];
                        w[k] -= lr * (m[k] / c1) / ((v[k] / c2).sqrt() + EPS);
                    }
                });
            }
            SparseState::RowwiseAdagrad { acc } => {
                for (s, &r) in g.rows.iter().enumerate() {
                    if r == 0 {
                        continue;
                    }
                    let gr = &g.grads[s * d..(s + 1) * d];
                    let a = &mut acc[r as usize];
                    *a += gr.iter().map(|x| x * x).sum::<f32>() / d as f32;
                    let scale = lr / (a.sqrt() + 1e-6);
                    for (w, x) in table.weights[r as usize * d..(r as usize + 1) * d].iter_mut().zip(gr) {
                        *w -= scale * x;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_model::rng::Rng;

    #[test]
    fn sparse_adam_moves_only_touched_rows_and_matches_dense_adam() {
        let mut rng = Rng::new(1);
        let mut table = Embedding::new(5, 3, 1.0, &mut rng);
        let before = table.weights.clone();
        let mut dense_w = table.row(2).to_vec();
        let mut g = SparseGrad::new(5, 3);
        g.add(2, 1.0, &[0.5, -1.0, 2.0]);
        g.add(0, 1.0, &[1.0, 1.0, 1.0]);
        let mut st = SparseState::adam(&table);
        let mut dense = DenseAdam::new(3);
        for t in 1..=3 {
            st.step(&mut table, &g, 0.1, t);
            dense.step(&mut dense_w, &[0.5, -1.0, 2.0], 0.1, t);
        }
        assert_eq!(table.row(2), &dense_w[..]);
        for r in [0u32, 1, 3, 4] {
            assert_eq!(table.row(r), &before[r as usize * 3..(r as usize + 1) * 3], "row {r} moved");
        }
        let mut ada = SparseState::rowwise_adagrad(&table);
        let row2 = table.row(2).to_vec();
        ada.step(&mut table, &g, 0.1, 1);
        assert!(table.row(2)[0] < row2[0] && table.row(2)[1] > row2[1]);
    }
}
