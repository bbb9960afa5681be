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

    /// One update at step `t` (1-based) with the gradient scaled by `g_scale` (clipping) and
    /// decoupled weight decay `decay` (AdamW: the decay does not pass through the moments).
    pub fn step(&mut self, w: &mut [f32], g: &[f32], lr: f32, t: u64, g_scale: f32, decay: f32) {
        let (c1, c2) = bias_corrections(t);
        for (((w, &g), m), v) in w.iter_mut().zip(g).zip(&mut self.m).zip(&mut self.v) {
            let g = g * g_scale;
            *m = BETA1 * *m + (1.0 - BETA1) * g;
            *v = BETA2 * *v + (1.0 - BETA2) * g * g;
            *w -= lr * ((*m / c1) / ((*v / c2).sqrt() + EPS) + decay * *w);
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
    /// One update of the rows `g` touched, with the gradient scaled by `g_scale` (clipping) plus
    /// `l2 × row`: an L2 penalty paid only by the rows a step reads, so its cost follows the
    /// touched rows, not the table.
    pub fn step(&mut self, table: &mut Embedding, g: &SparseGrad, lr: f32, t: u64, g_scale: f32, l2: f32) {
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
                        let gk = gr[k] * g_scale + l2 * w[k];
                        m[k] = BETA1 * m[k] + (1.0 - BETA1) * gk;
                        v[k] = BETA2 * v[k] + (1.0 - BETA2) * gk * gk;
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
                    let w = &mut table.weights[r as usize * d..(r as usize + 1) * d];
                    let eff = |k: usize| gr[k] * g_scale + l2 * w[k];
                    let a = &mut acc[r as usize];
                    *a += (0..d).map(|k| eff(k) * eff(k)).sum::<f32>() / d as f32;
                    let scale = lr / (a.sqrt() + 1e-6);
                    for k in 0..d {
                        w[k] -= scale * (gr[k] * g_scale + l2 * w[k]);
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
            st.step(&mut table, &g, 0.1, t, 1.0, 0.0);
            dense.step(&mut dense_w, &[0.5, -1.0, 2.0], 0.1, t, 1.0, 0.0);
        }
        assert_eq!(table.row(2), &dense_w[..]);
        for r in [0u32, 1, 3, 4] {
            assert_eq!(table.row(r), &before[r as usize * 3..(r as usize + 1) * 3], "row {r} moved");
        }
        let mut ada = SparseState::rowwise_adagrad(&table);
        let row2 = table.row(2).to_vec();
        ada.step(&mut table, &g, 0.1, 1, 1.0, 0.0);
        assert!(table.row(2)[0] < row2[0] && table.row(2)[1] > row2[1]);
    }

    #[test]
    fn decay_l2_and_clipping_act_as_defined() {
        // A zero gradient with decoupled decay shrinks every weight by lr × decay × w.
        let mut w = vec![1.0f32, -2.0];
        DenseAdam::new(2).step(&mut w, &[0.0, 0.0], 0.1, 1, 1.0, 0.5);
        assert_eq!(w, vec![1.0 - 0.05, -2.0 + 0.1]);
        // Row-wise L2 is the gradient l2 × w, on the touched rows only: with Adam's first step
        // (a move of lr × sign) it pulls the touched row towards zero and leaves the others.
        let mut rng = Rng::new(3);
        let mut table = Embedding::new(4, 2, 1.0, &mut rng);
        let before = table.weights.clone();
        let mut g = SparseGrad::new(4, 2);
        g.add(1, 1.0, &[0.0, 0.0]);
        SparseState::adam(&table).step(&mut table, &g, 0.01, 1, 1.0, 0.1);
        for k in 0..2 {
            let (b, a) = (before[2 + k], table.row(1)[k]);
            assert!((a - (b - 0.01 * b.signum())).abs() < 1e-6, "{b} -> {a}");
        }
        assert_eq!(table.row(2), &before[4..6]);
        // A scaled gradient is a smaller gradient: Adam's first step is scale-free, so compare
        // the moments' effect over two steps against an unscaled run on half the gradient.
        let (mut a, mut b) = (vec![0.0f32; 2], vec![0.0f32; 2]);
        let (mut sa, mut sb) = (DenseAdam::new(2), DenseAdam::new(2));
        for t in 1..=2 {
            sa.step(&mut a, &[1.0, -4.0], 0.1, t, 0.5, 0.0);
            sb.step(&mut b, &[0.5, -2.0], 0.1, t, 1.0, 0.0);
        }
        assert_eq!(a, b);
    }
}
