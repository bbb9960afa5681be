//! Layer kernels as explicit forward/backward pairs over flat row-major buffers.
//!
//! Shapes are passed as plain sizes; a batch of `b` rows with `d` columns is `&[f32]` of
//! length `b·d`. Backward functions *accumulate* parameter gradients (so several passes can
//! share one gradient buffer) and *overwrite* input gradients.

use crate::fastexp::exp_shifted_sum;
use crate::gemm::{matmul, Layout};
use rayon::prelude::*;

/// Rows per rayon task for element-wise kernels; small batches stay on one thread.
const ROWS_PER_TASK: usize = 256;

/// `y[b×o] = x[b×i] · w[i×o] + bias[o]`.
pub fn linear_forward(y: &mut [f32], x: &[f32], w: &[f32], bias: &[f32], b: usize, i: usize, o: usize) {
    for row in y[..b * o].chunks_exact_mut(o) {
        row.copy_from_slice(&bias[..o]);
    }
    matmul(b, i, o, x, Layout::Normal, w, Layout::Normal, y, true);
}

/// Gradients of [`linear_forward`]: `dw += xᵀ·dy`, `dbias += Σ dy`, and `dx = dy·wᵀ` when asked.
#[allow(clippy::too_many_arguments)]
pub fn linear_backward(
    dx: Option<&mut [f32]>,
    dw: &mut [f32],
    dbias: &mut [f32],
    dy: &[f32],
    x: &[f32],
    w: &[f32],
    b: usize,
    i: usize,
    o: usize,
) {
    matmul(i, b, o, x, Layout::Transposed, dy, Layout::Normal, dw, true);
    for row in dy[..b * o].chunks_exact(o) {
        for (g, d) in dbias.iter_mut().zip(row) {
            *g += d;
        }
    }
    if let Some(dx) = dx {
        matmul(b, o, i, dy, Layout::Normal, w, Layout::Transposed, dx, false);
    }
}

/// In-place ReLU.
pub fn relu_forward(x: &mut [f32]) {
    for v in x {
        *v = v.max(0.0);
    }
}

/// `d *= (y > 0)`, where `y` is the ReLU output.
pub fn relu_backward(d: &mut [f32], y: &[f32]) {
    for (g, &v) in d.iter_mut().zip(y) {
        if v <= 0.0 {
            *g = 0.0;
        }
    }
}

/// Guards the division for all-zero rows (e.g. an item row that has never been trained).
const NORM_EPS: f32 = 1e-12;

/// Row-wise L2 normalisation: `y = x / ‖x‖`; keeps `‖x‖` per row in `norms` for the backward pass.
pub fn l2norm_forward(y: &mut [f32], norms: &mut [f32], x: &[f32], d: usize) {
    let rows = norms.len();
    y[..rows * d]
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(norms.par_chunks_mut(ROWS_PER_TASK))
        .zip(x[..rows * d].par_chunks(d * ROWS_PER_TASK))
        .for_each(|((y, n), x)| {
            for ((yr, nr), xr) in y.chunks_exact_mut(d).zip(n.iter_mut()).zip(x.chunks_exact(d)) {
                let norm = xr.iter().map(|v| v * v).sum::<f32>().sqrt().max(NORM_EPS);
                *nr = norm;
                let inv = 1.0 / norm;
                for (a, b) in yr.iter_mut().zip(xr) {
                    *a = b * inv;
                }
            }
        });
}

/// `dx = (dy − y·(y·dy)) / ‖x‖`, row-wise.
pub fn l2norm_backward(dx: &mut [f32], dy: &[f32], y: &[f32], norms: &[f32], d: usize) {
    let rows = norms.len();
    dx[..rows * d]
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dy[..rows * d].par_chunks(d * ROWS_PER_TASK))
        .zip(y[..rows * d].par_chunks(d * ROWS_PER_TASK))
        .zip(norms.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, dy), y), n)| {
            for (((dxr, dyr), yr), &nr) in dx.chunks_exact_mut(d).zip(dy.chunks_exact(d)).zip(y.chunks_exact(d)).zip(n)
            {
                let dot: f32 = dyr.iter().zip(yr).map(|(a, b)| a * b).sum();
                let inv = 1.0 / nr;
                for ((g, &a), &b) in dxr.iter_mut().zip(dyr).zip(yr) {
                    *g = (a - b * dot) * inv;
                }
            }
        });
}

/// Inputs of the sampled / full softmax cross-entropy over `1 + N` candidates per row.
///
/// Row `r`'s logits are: the positive `u_r·p_r/τ − c_r`; its own negatives `u_r·n_{r,j}/τ − c_{r,j}`;
/// the candidates shared by the whole batch `u_r·s_j/τ − c_j`. A shared candidate whose id equals
/// the row's positive id is masked out (an "accidental hit"), which also makes full softmax a
/// special case: every item is a shared candidate with zero correction.
pub struct SoftmaxInputs<'a> {
    /// `[b×d]` user vectors.
    pub user: &'a [f32],
    /// `[b×d]` positive item vectors.
    pub pos: &'a [f32],
    /// `[b]` correction subtracted from each positive logit (log Q, or 0).
    pub pos_corr: &'a [f32],
    /// Item id of each row's positive, to mask accidental hits.
    pub pos_ids: &'a [u32],
    /// `[b×n×d]` per-row negatives, `[b×n]` corrections and `[b×n]` ids (`n` may be 0).
    pub row_negs: &'a [f32],
    pub row_corr: &'a [f32],
    pub row_ids: &'a [u32],
    pub n_row: usize,
    /// `[s×d]` shared candidates, `[s]` corrections and ids (`s` may be 0).
    pub shared: &'a [f32],
    pub shared_corr: &'a [f32],
    pub shared_ids: &'a [u32],
    pub temperature: f32,
    pub d: usize,
}

/// Reused buffers for [`softmax_loss`] (the `[b×s]` logits dominate memory).
#[derive(Default)]
pub struct SoftmaxScratch {
    logits: Vec<f32>,
    row_logits: Vec<f32>,
    /// Per row, the factor that turns the row's `exp(logit − max)` into its gradient
    /// (`1 / (b·τ·z)`): applied to the `[b×d]` sides of the products instead of the `[b×s]` matrix.
    row_scale: Vec<f32>,
    /// `[b×d]` scratch: the scaled user rows, and the unscaled product for dL/du.
    user_scaled: Vec<f32>,
    user_grad: Vec<f32>,
}

/// Gradients written by [`softmax_loss`], all w.r.t. the mean loss over the batch.
pub struct SoftmaxGrads<'a> {
    pub user: &'a mut [f32],
    pub pos: &'a mut [f32],
    pub row_negs: &'a mut [f32],
    pub shared: &'a mut [f32],
}

/// Logit values held at once: the `[rows × candidates]` matrix is computed, turned into
/// gradients and consumed by its two products one block of rows at a time, so it stays in cache
/// (4 MiB) instead of streaming through memory three times.
const LOGIT_BLOCK_VALUES: usize = 1 << 20;
/// Fewer rows than this make the products too thin to run at speed.
const MIN_BLOCK_ROWS: usize = 64;

/// Softmax cross-entropy with the positive as the label; returns the mean loss and fills `g`.
pub fn softmax_loss(x: &SoftmaxInputs, g: SoftmaxGrads, scratch: &mut SoftmaxScratch) -> f32 {
    let s = x.shared_corr.len();
    let block = LOGIT_BLOCK_VALUES.checked_div(s).map_or(usize::MAX, |r| r.max(MIN_BLOCK_ROWS));
    softmax_loss_in_blocks(x, g, scratch, block)
}

/// [`softmax_loss`] over blocks of `block` rows.
fn softmax_loss_in_blocks(x: &SoftmaxInputs, g: SoftmaxGrads, scratch: &mut SoftmaxScratch, block: usize) -> f32 {
    let d = x.d;
    let b = x.pos_corr.len();
    let s = x.shared_corr.len();
    let nr = x.n_row;
    let block = block.clamp(1, b.max(1));
    scratch.logits.resize(block * s, 0.0);
    scratch.row_logits.resize(b * nr, 0.0);
    scratch.row_scale.resize(b, 0.0);
    if b == 0 {
        g.shared.fill(0.0);
    }
    let mut loss_sum = 0.0f64;
    for r0 in (0..b).step_by(block) {
        let r1 = (r0 + block).min(b);
        let rb = r1 - r0;
        let SoftmaxScratch { logits, row_logits, row_scale, user_scaled, user_grad } = scratch;
        let logits = &mut logits[..rb * s];
        let user = &x.user[r0 * d..r1 * d];
        if s > 0 {
            matmul(rb, d, s, user, Layout::Normal, x.shared, Layout::Transposed, logits, false);
        }
        let rows = BlockRows {
            logits,
            row_logits: &mut row_logits[r0 * nr..r1 * nr],
            row_scale: &mut row_scale[r0..r1],
            user: &mut g.user[r0 * d..r1 * d],
            pos: &mut g.pos[r0 * d..r1 * d],
            row_negs: &mut g.row_negs[r0 * nr * d..r1 * nr * d],
        };
        loss_sum += softmax_rows(x, r0, b, rows);
        if s > 0 {
            // The shared part of dL/du and all of dL/dshared come from two products over the
            // `exp(logit − max)` matrix held in `logits`; each row's factor to a gradient goes on
            // the narrow side of the product (`[rows×d]`), never through the `[rows×s]` matrix again.
            let row_scale = &row_scale[r0..r1];
            user_grad.resize(rb * d, 0.0);
            matmul(rb, s, d, logits, Layout::Normal, x.shared, Layout::Normal, user_grad, false);
            for ((gu, eg), &f) in
                g.user[r0 * d..r1 * d].chunks_exact_mut(d).zip(user_grad.chunks_exact(d)).zip(row_scale.iter())
            {
                gu.iter_mut().zip(eg).for_each(|(a, e)| *a += f * e);
            }
            user_scaled.clear();
            user_scaled
                .extend(user.chunks_exact(d).zip(row_scale.iter()).flat_map(|(u, &f)| u.iter().map(move |v| v * f)));
            matmul(s, rb, d, logits, Layout::Transposed, user_scaled, Layout::Normal, g.shared, r0 > 0);
        }
    }
    (loss_sum / b.max(1) as f64) as f32
}

/// One block's slices of the buffers [`softmax_rows`] fills, rows `r0..r0 + row_scale.len()`.
struct BlockRows<'a> {
    logits: &'a mut [f32],
    row_logits: &'a mut [f32],
    row_scale: &'a mut [f32],
    user: &'a mut [f32],
    pos: &'a mut [f32],
    row_negs: &'a mut [f32],
}

/// The per-row part of [`softmax_loss`] for the block of rows starting at `r0` (of `b` in the
/// batch): logits into `exp(logit − max)`, the loss, and the gradients that need no product.
fn softmax_rows(x: &SoftmaxInputs, r0: usize, b: usize, out: BlockRows) -> f64 {
    let d = x.d;
    let s = x.shared_corr.len();
    let nr = x.n_row;
    let inv_t = 1.0 / x.temperature;
    let rows_in_block = out.row_scale.len();
    // Every thread gets a share of even a small block.
    let chunk = ROWS_PER_TASK.min(rows_in_block.div_ceil(rayon::current_num_threads())).max(1);
    let n_chunks = rows_in_block.div_ceil(chunk);
    let lg_parts = split_rows(out.logits, s * chunk, n_chunks);
    let rl_parts = split_rows(out.row_logits, nr * chunk, n_chunks);
    let gu_parts = split_rows(out.user, d * chunk, n_chunks);
    let gp_parts = split_rows(out.pos, d * chunk, n_chunks);
    let gn_parts = split_rows(out.row_negs, nr * d * chunk, n_chunks);
    lg_parts
        .into_par_iter()
        .zip(rl_parts)
        .zip(out.row_scale.par_chunks_mut(chunk))
        .zip(gu_parts)
        .zip(gp_parts)
        .zip(gn_parts)
        .enumerate()
        .map(|(ci, (((((lg, rl), pl), gu), gp), gn))| {
            let c0 = r0 + ci * chunk;
            let rows = pl.len();
            let mut loss = 0.0f64;
            for k in 0..rows {
                let r = c0 + k;
                let u = &x.user[r * d..(r + 1) * d];
                let p = &x.pos[r * d..(r + 1) * d];
                let pos_logit = dot(u, p) * inv_t - x.pos_corr[r];
                let mut max = pos_logit;
                let rl_row = &mut rl[k * nr..(k + 1) * nr];
                for (j, out) in rl_row.iter_mut().enumerate() {
                    let c = r * nr + j;
                    *out = if x.row_ids[c] == x.pos_ids[r] {
                        f32::NEG_INFINITY
                    } else {
                        dot(u, &x.row_negs[c * d..(c + 1) * d]) * inv_t - x.row_corr[c]
                    };
                    max = max.max(*out);
                }
                let lg_row = &mut lg[k * s..(k + 1) * s];
                max = max.max(shared_logits(lg_row, x.shared_ids, x.shared_corr, x.pos_ids[r], inv_t));
                // Each logit becomes exp(logit − max) in place: one exp per candidate serves both
                // the normaliser and the gradient.
                let e_pos = (pos_logit - max).exp();
                let z = e_pos + exp_shifted_sum(rl_row, max) + exp_shifted_sum(lg_row, max);
                let log_z = max + z.ln();
                loss += (log_z - pos_logit) as f64;
                // dL/dlogit = softmax − onehot, then scaled by 1/(b·τ) for the mean and the temperature.
                let scale = inv_t / b as f32;
                let p_scale = scale / z;
                let gpos = (e_pos / z - 1.0) * scale;
                pl[k] = p_scale;
                let gu_row = &mut gu[k * d..(k + 1) * d];
                let gp_row = &mut gp[k * d..(k + 1) * d];
                for t in 0..d {
                    gu_row[t] = gpos * p[t];
                    gp_row[t] = gpos * u[t];
                }
                for j in 0..nr {
                    let gj = rl_row[j] * p_scale;
                    let n = &x.row_negs[(r * nr + j) * d..(r * nr + j + 1) * d];
                    let gn_row = &mut gn[(k * nr + j) * d..(k * nr + j + 1) * d];
                    for t in 0..d {
                        gu_row[t] += gj * n[t];
                        gn_row[t] = gj * u[t];
                    }
                }
            }
            loss
        })
        .sum()
}

/// Turns a row of raw shared-candidate products into logits, `v·inv_t − corr`, with the row's
/// positive masked to −∞, and returns their maximum. Eight running maxima let the loop vectorise.
fn shared_logits(row: &mut [f32], ids: &[u32], corr: &[f32], pos_id: u32, inv_t: f32) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let n = row.len();
    let full = n / 8 * 8;
    for ((v8, id8), c8) in
        row[..full].chunks_exact_mut(8).zip(ids[..full].chunks_exact(8)).zip(corr[..full].chunks_exact(8))
    {
        for j in 0..8 {
            let l = if id8[j] == pos_id { f32::NEG_INFINITY } else { v8[j] * inv_t - c8[j] };
            v8[j] = l;
            acc[j] = if l > acc[j] { l } else { acc[j] };
        }
    }
    let mut max = acc.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    for j in full..n {
        row[j] = if ids[j] == pos_id { f32::NEG_INFINITY } else { row[j] * inv_t - corr[j] };
        max = max.max(row[j]);
    }
    max
}

/// Cuts `v` into exactly `n` consecutive pieces of `stride` values (the last may be shorter,
/// any may be empty), so buffers with a zero-width part still zip with the others.
fn split_rows(v: &mut [f32], stride: usize, n: usize) -> Vec<&mut [f32]> {
    let mut out = Vec::with_capacity(n);
    let mut rest = v;
    for _ in 0..n {
        let take = stride.min(rest.len());
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(take);
        out.push(head);
        rest = tail;
    }
    out
}

#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    fn rand_vec(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.normal()).collect()
    }

    /// Central difference of `f` along every coordinate of `x`, in f64 for the step.
    fn numeric_grad(x: &mut [f32], f: &mut dyn FnMut(&[f32]) -> f64) -> Vec<f32> {
        let h = 1e-2f32;
        (0..x.len())
            .map(|i| {
                let orig = x[i];
                x[i] = orig + h;
                let up = f(x);
                x[i] = orig - h;
                let down = f(x);
                x[i] = orig;
                ((up - down) / (2.0 * h as f64)) as f32
            })
            .collect()
    }

    fn assert_close(analytic: &[f32], numeric: &[f32], what: &str) {
        let scale = numeric.iter().map(|v| v.abs()).fold(1e-3, f32::max);
        for (i, (a, n)) in analytic.iter().zip(numeric).enumerate() {
            assert!((a - n).abs() <= 2e-2 * scale, "{what}[{i}]: analytic {a} vs numeric {n}");
        }
    }

    #[test]
    fn linear_gradients_match_finite_differences() {
        let (b, i, o) = (5, 4, 3);
        let mut rng = Rng::new(1);
        let mut x = rand_vec(&mut rng, b * i);
        let mut w = rand_vec(&mut rng, i * o);
        let bias = rand_vec(&mut rng, o);
        let r = rand_vec(&mut rng, b * o); // loss = Σ r ⊙ y
        let loss = |x: &[f32], w: &[f32]| {
            let mut y = vec![0.0; b * o];
            linear_forward(&mut y, x, w, &bias, b, i, o);
            y.iter().zip(&r).map(|(a, c)| (a * c) as f64).sum::<f64>()
        };
        let (mut dx, mut dw, mut db) = (vec![0.0; b * i], vec![0.0; i * o], vec![0.0; o]);
        linear_backward(Some(&mut dx), &mut dw, &mut db, &r, &x, &w, b, i, o);
        let wc = w.clone();
        assert_close(&dx, &numeric_grad(&mut x, &mut |x| loss(x, &wc)), "dx");
        let xc = x.clone();
        assert_close(&dw, &numeric_grad(&mut w, &mut |w| loss(&xc, w)), "dw");
        let want_db: Vec<f32> = (0..o).map(|j| (0..b).map(|k| r[k * o + j]).sum()).collect();
        assert_close(&db, &want_db, "dbias");
    }

    #[test]
    fn relu_and_l2norm_gradients_match_finite_differences() {
        let (b, d) = (4, 6);
        let mut rng = Rng::new(2);
        let mut x = rand_vec(&mut rng, b * d);
        let r = rand_vec(&mut rng, b * d);
        let loss = |x: &[f32]| {
            let mut h = x.to_vec();
            relu_forward(&mut h);
            let mut y = vec![0.0; b * d];
            let mut n = vec![0.0; b];
            l2norm_forward(&mut y, &mut n, &h, d);
            y.iter().zip(&r).map(|(a, c)| (a * c) as f64).sum::<f64>()
        };
        let mut h = x.clone();
        relu_forward(&mut h);
        let (mut y, mut n) = (vec![0.0; b * d], vec![0.0; b]);
        l2norm_forward(&mut y, &mut n, &h, d);
        for row in y.chunks(d) {
            let len: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((len - 1.0).abs() < 1e-5 || len == 0.0);
        }
        let mut dh = vec![0.0; b * d];
        l2norm_backward(&mut dh, &r, &y, &n, d);
        relu_backward(&mut dh, &h);
        // Keep finite differences away from the ReLU kink.
        for v in x.iter_mut() {
            if v.abs() < 0.05 {
                *v = 0.3;
            }
        }
        assert_close(&dh, &numeric_grad(&mut x, &mut |x| loss(x)), "dx");
    }

    #[test]
    fn softmax_gradients_match_finite_differences_with_masks_and_corrections() {
        let (b, d, nr, s) = (3, 4, 2, 5);
        let mut rng = Rng::new(3);
        let mut user = rand_vec(&mut rng, b * d);
        let mut pos = rand_vec(&mut rng, b * d);
        let mut negs = rand_vec(&mut rng, b * nr * d);
        let mut shared = rand_vec(&mut rng, s * d);
        let pos_corr = rand_vec(&mut rng, b);
        let row_corr = rand_vec(&mut rng, b * nr);
        let shared_corr = rand_vec(&mut rng, s);
        let pos_ids = vec![1, 2, 3];
        let row_ids = vec![9, 2, 8, 7, 6, 5]; // row 0's second negative is not its positive; row 1's first is not either
        let row_ids = {
            let mut r = row_ids;
            r[2] = 2; // row 1 draws its own positive: masked
            r
        };
        let shared_ids = vec![1, 10, 3, 11, 12]; // rows 0 and 2 hit their positive among shared ones
        let t = 0.5;
        let run = |user: &[f32], pos: &[f32], negs: &[f32], shared: &[f32], grads: bool| {
            let x = SoftmaxInputs {
                user,
                pos,
                pos_corr: &pos_corr,
                pos_ids: &pos_ids,
                row_negs: negs,
                row_corr: &row_corr,
                row_ids: &row_ids,
                n_row: nr,
                shared,
                shared_corr: &shared_corr,
                shared_ids: &shared_ids,
                temperature: t,
                d,
            };
            let (mut gu, mut gp, mut gn, mut gs) =
                (vec![0.0; b * d], vec![0.0; b * d], vec![0.0; b * nr * d], vec![0.0; s * d]);
            let l = softmax_loss(
                &x,
                SoftmaxGrads { user: &mut gu, pos: &mut gp, row_negs: &mut gn, shared: &mut gs },
                &mut SoftmaxScratch::default(),
            );
            let _ = grads;
            (l, gu, gp, gn, gs)
        };
        let (_, gu, gp, gn, gs) = run(&user, &pos, &negs, &shared, true);
        let (p, n, sh) = (pos.clone(), negs.clone(), shared.clone());
        assert_close(&gu, &numeric_grad(&mut user, &mut |u| run(u, &p, &n, &sh, false).0 as f64), "user");
        let uu = user.clone();
        assert_close(&gp, &numeric_grad(&mut pos, &mut |p| run(&uu, p, &n, &sh, false).0 as f64), "pos");
        let pp = pos.clone();
        assert_close(&gn, &numeric_grad(&mut negs, &mut |n| run(&uu, &pp, n, &sh, false).0 as f64), "negs");
        // The masked negative must get no gradient.
        assert!(gn[(nr) * d..(nr + 1) * d].iter().all(|v| *v == 0.0));
        let nn = negs.clone();
        assert_close(&gs, &numeric_grad(&mut shared, &mut |s| run(&uu, &pp, &nn, s, false).0 as f64), "shared");
    }

    #[test]
    fn softmax_in_row_blocks_equals_one_block() {
        // 150 rows in blocks of 64 (two whole blocks and a short one) against all rows at once.
        let (b, d, nr, s) = (150, 8, 1, 40);
        let mut rng = Rng::new(5);
        let user = rand_vec(&mut rng, b * d);
        let pos = rand_vec(&mut rng, b * d);
        let negs = rand_vec(&mut rng, b * nr * d);
        let shared = rand_vec(&mut rng, s * d);
        let pos_corr = rand_vec(&mut rng, b);
        let row_corr = rand_vec(&mut rng, b * nr);
        let shared_corr = rand_vec(&mut rng, s);
        let pos_ids: Vec<u32> = (0..b as u32).map(|r| r % s as u32).collect();
        let row_ids: Vec<u32> = (0..(b * nr) as u32).map(|r| 1000 + r).collect();
        let shared_ids: Vec<u32> = (0..s as u32).collect();
        let x = SoftmaxInputs {
            user: &user,
            pos: &pos,
            pos_corr: &pos_corr,
            pos_ids: &pos_ids,
            row_negs: &negs,
            row_corr: &row_corr,
            row_ids: &row_ids,
            n_row: nr,
            shared: &shared,
            shared_corr: &shared_corr,
            shared_ids: &shared_ids,
            temperature: 0.2,
            d,
        };
        let run = |block: usize| {
            let (mut gu, mut gp, mut gn) = (vec![0.0; b * d], vec![0.0; b * d], vec![0.0; b * nr * d]);
            let mut gs = vec![f32::NAN; s * d];
            let grads = SoftmaxGrads { user: &mut gu, pos: &mut gp, row_negs: &mut gn, shared: &mut gs };
            let l = softmax_loss_in_blocks(&x, grads, &mut SoftmaxScratch::default(), block);
            (l, [gu, gp, gn, gs])
        };
        let (l1, one) = run(b);
        let (l3, blocks) = run(64);
        assert!((l1 - l3).abs() <= 1e-5 * l1.abs(), "loss {l1} vs {l3}");
        for (name, (a, w)) in ["user", "pos", "negs", "shared"].iter().zip(blocks.iter().zip(&one)) {
            let scale = w.iter().map(|v| v.abs()).fold(0.0f32, f32::max);
            assert!(scale > 0.0, "{name}: all zero");
            for (i, (a, w)) in a.iter().zip(w).enumerate() {
                assert!((a - w).abs() <= 1e-5 * scale, "{name}[{i}]: {a} in blocks vs {w} at once");
            }
        }
    }
}

/// Pointwise binary cross-entropy over a positive and `n` negatives per row: logits are
/// `u·v / τ`; the loss is `−ln σ(pos) − Σ ln(1 − σ(neg))`, averaged over rows. Negatives equal to
/// the row's positive are skipped. Writes gradients w.r.t. the mean loss; returns the loss.
#[allow(clippy::too_many_arguments)]
pub fn bce_loss(
    user: &[f32],
    pos: &[f32],
    pos_ids: &[u32],
    negs: &[f32],
    neg_ids: &[u32],
    n: usize,
    temperature: f32,
    d: usize,
    g_user: &mut [f32],
    g_pos: &mut [f32],
    g_negs: &mut [f32],
) -> f32 {
    let b = pos_ids.len();
    let inv_t = 1.0 / temperature;
    let scale = inv_t / b.max(1) as f32;
    let sigmoid = |x: f32| 1.0 / (1.0 + (-x).exp());
    // ln(1 + e^x), stable for large |x|.
    let softplus = |x: f32| x.max(0.0) + (-x.abs()).exp().ln_1p();
    let mut loss = 0.0f64;
    for r in 0..b {
        let u = &user[r * d..(r + 1) * d];
        let p = &pos[r * d..(r + 1) * d];
        let lp = dot(u, p) * inv_t;
        loss += softplus(-lp) as f64;
        let gp = (sigmoid(lp) - 1.0) * scale;
        let gu = &mut g_user[r * d..(r + 1) * d];
        for t in 0..d {
            gu[t] = gp * p[t];
            g_pos[r * d + t] = gp * u[t];
        }
        for j in 0..n {
            let c = r * n + j;
            let v = &negs[c * d..(c + 1) * d];
            let gn = &mut g_negs[c * d..(c + 1) * d];
            if neg_ids[c] == pos_ids[r] {
                gn.fill(0.0);
                continue;
            }
            let ln = dot(u, v) * inv_t;
            loss += softplus(ln) as f64;
            let g = sigmoid(ln) * scale;
            for t in 0..d {
                gu[t] += g * v[t];
                gn[t] = g * u[t];
            }
        }
    }
    (loss / b.max(1) as f64) as f32
}

#[cfg(test)]
mod bce_tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn bce_gradients_match_finite_differences() {
        let (b, n, d) = (3, 2, 4);
        let mut rng = Rng::new(4);
        let user: Vec<f32> = (0..b * d).map(|_| rng.normal()).collect();
        let pos: Vec<f32> = (0..b * d).map(|_| rng.normal()).collect();
        let negs: Vec<f32> = (0..b * n * d).map(|_| rng.normal()).collect();
        let pos_ids = [1, 2, 3];
        let neg_ids = [4, 5, 2, 6, 7, 8]; // row 1 drew its own positive
        let run = |u: &[f32], p: &[f32], ng: &[f32]| {
            let (mut gu, mut gp, mut gn) = (vec![0.0; b * d], vec![0.0; b * d], vec![0.0; b * n * d]);
            let l = bce_loss(u, p, &pos_ids, ng, &neg_ids, n, 0.5, d, &mut gu, &mut gp, &mut gn);
            (l, gu, gp, gn)
        };
        let (_, gu, gp, gn) = run(&user, &pos, &negs);
        assert!(gn[2 * d..3 * d].iter().all(|v| *v == 0.0));
        let h = 1e-2;
        for (which, grad) in [(0, &gu), (1, &gp), (2, &gn)] {
            for i in 0..grad.len() {
                let (mut u, mut p, mut ng) = (user.clone(), pos.clone(), negs.clone());
                let buf = [&mut u, &mut p, &mut ng];
                let v = &mut *buf.into_iter().nth(which).unwrap();
                v[i] += h;
                let (up_u, up_p, up_n) = (u.clone(), p.clone(), ng.clone());
                let up = run(&up_u, &up_p, &up_n).0 as f64;
                let (mut u, mut p, mut ng) = (user.clone(), pos.clone(), negs.clone());
                let buf = [&mut u, &mut p, &mut ng];
                let v = &mut *buf.into_iter().nth(which).unwrap();
                v[i] -= h;
                let down = run(&u, &p, &ng).0 as f64;
                let num = ((up - down) / (2.0 * h as f64)) as f32;
                assert!((num - grad[i]).abs() < 2e-2 * (1.0 + num.abs()), "tensor {which}[{i}]: {num} vs {}", grad[i]);
            }
        }
    }
}

/// Label-aware attention (MIND): for each row, `u = Σ_k a_k V_k` with
/// `a = softmax_k((V_k · e)^p)` (integer `p ≥ 1`) over the row's first `active[r]` interests, where `e` is the
/// target item's vector. `interests` is `[b × k × d]`; writes `u` `[b × d]` and keeps `a`.
#[allow(clippy::too_many_arguments)]
pub fn label_attention_forward(
    u: &mut [f32],
    attn: &mut [f32],
    interests: &[f32],
    target: &[f32],
    active: &[usize],
    k: usize,
    d: usize,
    p: i32,
) {
    for (r, &na) in active.iter().enumerate() {
        let e = &target[r * d..(r + 1) * d];
        let v = &interests[r * k * d..(r + 1) * k * d];
        let a = &mut attn[r * k..(r + 1) * k];
        let mut max = f32::NEG_INFINITY;
        for j in 0..k {
            a[j] = if j < na { dot(&v[j * d..(j + 1) * d], e).powi(p) } else { f32::NEG_INFINITY };
            max = max.max(a[j]);
        }
        let mut z = 0.0;
        for x in a.iter_mut() {
            *x = (*x - max).exp();
            z += *x;
        }
        let ur = &mut u[r * d..(r + 1) * d];
        ur.fill(0.0);
        for j in 0..k {
            a[j] /= z;
            for (o, x) in ur.iter_mut().zip(&v[j * d..(j + 1) * d]) {
                *o += a[j] * x;
            }
        }
    }
}

/// Gradients of [`label_attention_forward`]: writes `d_interests` and adds into `d_target`.
#[allow(clippy::too_many_arguments)]
pub fn label_attention_backward(
    d_interests: &mut [f32],
    d_target: &mut [f32],
    du: &[f32],
    attn: &[f32],
    interests: &[f32],
    target: &[f32],
    active: &[usize],
    k: usize,
    d: usize,
    p: i32,
) {
    for (r, &na) in active.iter().enumerate() {
        let e = &target[r * d..(r + 1) * d];
        let v = &interests[r * k * d..(r + 1) * k * d];
        let a = &attn[r * k..(r + 1) * k];
        let g = &du[r * d..(r + 1) * d];
        let dv = &mut d_interests[r * k * d..(r + 1) * k * d];
        // dL/da_j = g·V_j; through the softmax: dL/dt_j = a_j (g·V_j − Σ a g·V).
        let gv: Vec<f32> = (0..k).map(|j| if j < na { dot(g, &v[j * d..(j + 1) * d]) } else { 0.0 }).collect();
        let mean: f32 = (0..na).map(|j| a[j] * gv[j]).sum();
        for j in 0..k {
            let row = &mut dv[j * d..(j + 1) * d];
            if j >= na {
                row.fill(0.0);
                continue;
            }
            let vj = &v[j * d..(j + 1) * d];
            let s = dot(vj, e);
            // d(s^p)/ds = p s^(p−1)
            let ds = a[j] * (gv[j] - mean) * p as f32 * s.powi(p - 1);
            for t in 0..d {
                row[t] = a[j] * g[t] + ds * e[t];
                d_target[r * d + t] += ds * vj[t];
            }
        }
    }
}

#[cfg(test)]
mod attention_tests {
    use super::*;
    use crate::rng::Rng;

    #[test]
    fn label_attention_gradients_match_finite_differences() {
        let (b, k, d, p) = (2, 3, 4, 2);
        let mut rng = Rng::new(8);
        let v: Vec<f32> = (0..b * k * d).map(|_| rng.normal() * 0.7).collect();
        let e: Vec<f32> = (0..b * d).map(|_| rng.normal() * 0.7).collect();
        let r: Vec<f32> = (0..b * d).map(|_| rng.normal()).collect();
        let active = [3, 2];
        let loss = |v: &[f32], e: &[f32]| {
            let (mut u, mut a) = (vec![0.0; b * d], vec![0.0; b * k]);
            label_attention_forward(&mut u, &mut a, v, e, &active, k, d, p);
            u.iter().zip(&r).map(|(x, y)| (x * y) as f64).sum::<f64>()
        };
        let (mut u, mut a) = (vec![0.0; b * d], vec![0.0; b * k]);
        label_attention_forward(&mut u, &mut a, &v, &e, &active, k, d, p);
        assert_eq!(a[5], 0.0, "an inactive interest gets no attention");
        assert!((a[0] + a[1] + a[2] - 1.0).abs() < 1e-6);
        let (mut dv, mut de) = (vec![0.0; b * k * d], vec![0.0; b * d]);
        label_attention_backward(&mut dv, &mut de, &r, &a, &v, &e, &active, k, d, p);
        let h = 1e-3;
        for i in 0..v.len() {
            let (mut up, mut down) = (v.clone(), v.clone());
            up[i] += h;
            down[i] -= h;
            let num = ((loss(&up, &e) - loss(&down, &e)) / (2.0 * h as f64)) as f32;
            assert!((num - dv[i]).abs() < 1e-2 * (1.0 + num.abs()), "dv[{i}]: {num} vs {}", dv[i]);
        }
        for i in 0..e.len() {
            let (mut up, mut down) = (e.clone(), e.clone());
            up[i] += h;
            down[i] -= h;
            let num = ((loss(&v, &up) - loss(&v, &down)) / (2.0 * h as f64)) as f32;
            assert!((num - de[i]).abs() < 1e-2 * (1.0 + num.abs()), "de[{i}]: {num} vs {}", de[i]);
        }
    }
}
