//! A sequential user tower: causal self-attention over the user's history (pre-norm
//! transformer blocks over item embeddings plus learned positions), the item table tied between
//! the input and the output side.
//!
//! A batch is ragged: each user's history is its own sequence, oldest first, packed one after
//! another into `[T × d]` token rows, so no step computes or masks padding. Position `j` of a
//! sequence is the `j`-th item of its window, counted from the oldest, which is the same in
//! training (every prefix of a window) and at serving time (the whole window).
//!
//! With [`UserBatch::all_positions`] the tower outputs one vector per token, the prediction of
//! the item that follows it (training predicts every position at once); otherwise one vector per
//! user, from its newest token.

use crate::embedding::{Embedding, RowHash};
use crate::fastexp::{exp_approx, exp_shifted_sum};
use crate::layers::{
    dot, l2norm_backward, l2norm_forward, linear_backward, linear_forward, relu_backward, relu_forward,
};
use crate::mlp::fill_mask;
use crate::rng::Rng;
use crate::tower::{Grads, NamedTensor, Tower, UserBatch};
use needle_core::gemm::gemm_strided as gemm;
use rayon::prelude::*;

/// What each block of the tower computes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum BlockKind {
    /// Softmax attention, then a ReLU feed-forward layer, each a pre-norm residual branch.
    #[default]
    Transformer,
    /// HSTU's gated block, one pre-norm residual branch: a single projection to `U, V, Q, K`
    /// through SiLU; pointwise attention `SiLU(QKᵀ/√dh) / max_seq_len` (no softmax) over the
    /// earlier tokens; the layer-normalised attention output gated by `U`, then projected back.
    /// It has no feed-forward layer (`ffn` is unused).
    Hstu,
}

/// Shapes of a sequential model.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SeqSpec {
    /// Item rows, padding row 0 included.
    pub items: usize,
    pub dim: usize,
    /// The longest window the tower reads; positions beyond it have no embedding.
    pub max_seq_len: usize,
    pub blocks: usize,
    pub heads: usize,
    /// Inner width of each block's feed-forward layer.
    pub ffn: usize,
    pub item_hash: Option<RowHash>,
    /// Runs written before the block kind existed are transformers.
    #[serde(default)]
    pub block: BlockKind,
    /// Buckets of the time gap between a token's event and the one before it, each a learned
    /// vector added to the token (0 = no time signal; see [`gap_bucket`]).
    #[serde(default)]
    pub time_buckets: usize,
}

/// The time bucket of a token whose event came `gap` seconds after the one before it in its
/// window: `1 + ⌊log2(1 + gap)⌋`, capped at `buckets − 1`. Bucket 0 is the window's first token,
/// which has no earlier event to measure from, at serving time as in training.
pub fn gap_bucket(gap: i64, buckets: usize) -> u32 {
    let g = gap.max(0) as u64;
    let log = 63 - g.saturating_add(1).leading_zeros() as usize;
    (1 + log).min(buckets.saturating_sub(1)) as u32
}

impl SeqSpec {
    pub fn validate(&self) -> Result<(), String> {
        if self.dim == 0 || self.max_seq_len == 0 || self.ffn == 0 || self.heads == 0 {
            return Err("[model] dim, max_seq_len, ffn and heads must be > 0 for a sequential model".into());
        }
        if !self.dim.is_multiple_of(self.heads) {
            return Err(format!("[model] dim ({}) must be a multiple of heads ({})", self.dim, self.heads));
        }
        if self.time_buckets == 1 {
            return Err("[model] time_buckets must be 0 (off) or at least 2".into());
        }
        Ok(())
    }
}

/// Dense tensors of one block, in [`SeqTwoTower::dense`] order.
const LN1_G: usize = 0;
const LN1_B: usize = 1;
const W_QKV: usize = 2;
const B_QKV: usize = 3;
const W_O: usize = 4;
const B_O: usize = 5;
const LN2_G: usize = 6;
const LN2_B: usize = 7;
const W_1: usize = 8;
const B_1: usize = 9;
const W_2: usize = 10;
const B_2: usize = 11;
const PER_BLOCK: usize = 12;
const BLOCK_NAMES: [&str; PER_BLOCK] = [
    "ln1.g",
    "ln1.b",
    "qkv.weight",
    "qkv.bias",
    "out.weight",
    "out.bias",
    "ln2.g",
    "ln2.b",
    "ffn1.weight",
    "ffn1.bias",
    "ffn2.weight",
    "ffn2.bias",
];

/// Dense tensors of one HSTU block, in [`SeqTwoTower::dense`] order.
const H_LN1_G: usize = 0;
const H_LN1_B: usize = 1;
const H_W_UVQK: usize = 2;
const H_B_UVQK: usize = 3;
const H_LN2_G: usize = 4;
const H_LN2_B: usize = 5;
const H_W_O: usize = 6;
const H_B_O: usize = 7;
const HSTU_PER_BLOCK: usize = 8;
const HSTU_BLOCK_NAMES: [&str; HSTU_PER_BLOCK] =
    ["ln1.g", "ln1.b", "uvqk.weight", "uvqk.bias", "attn_norm.g", "attn_norm.b", "out.weight", "out.bias"];

#[derive(Clone, Debug)]
pub struct SeqTwoTower {
    pub spec: SeqSpec,
    /// Item embeddings: the tower's input tokens and, L2-normalised, the item vectors.
    pub items: Embedding,
    /// `[positions, block 0 …, block B−1 …, final norm gain, final norm bias]`.
    pub dense: Vec<Vec<f32>>,
}

const LN_EPS: f32 = 1e-5;

fn normal_vec(n: usize, scale: f32, rng: &mut Rng) -> Vec<f32> {
    (0..n).map(|_| rng.normal() * scale).collect()
}

impl SeqTwoTower {
    pub fn new(spec: SeqSpec, rng: &mut Rng) -> Result<Self, String> {
        spec.validate()?;
        let d = spec.dim;
        let f = spec.ffn;
        let s = 1.0 / (d as f32).sqrt();
        let items = Embedding::for_items(spec.items, d, s, spec.item_hash, rng);
        // Positions start at zero: a position no training window reaches (a history longer than
        // any seen in training) then adds nothing instead of noise.
        let mut dense = vec![vec![0.0; spec.max_seq_len * d]];
        if spec.time_buckets > 0 {
            // Zero like the positions: a bucket no training token reached adds nothing.
            dense.push(vec![0.0; spec.time_buckets * d]);
        }
        // Projections into the residual stream start smaller, so that a deep stack begins near
        // the identity.
        let out_scale = s / (2.0 * spec.blocks.max(1) as f32).sqrt();
        for _ in 0..spec.blocks {
            if spec.block == BlockKind::Hstu {
                dense.push(vec![1.0; d]);
                dense.push(vec![0.0; d]);
                dense.push(normal_vec(d * 4 * d, s, rng));
                dense.push(vec![0.0; 4 * d]);
                dense.push(vec![1.0; d]);
                dense.push(vec![0.0; d]);
                dense.push(normal_vec(d * d, out_scale, rng));
                dense.push(vec![0.0; d]);
                continue;
            }
            dense.push(vec![1.0; d]);
            dense.push(vec![0.0; d]);
            dense.push(normal_vec(d * 3 * d, s, rng));
            dense.push(vec![0.0; 3 * d]);
            dense.push(normal_vec(d * d, out_scale, rng));
            dense.push(vec![0.0; d]);
            dense.push(vec![1.0; d]);
            dense.push(vec![0.0; d]);
            dense.push(normal_vec(d * f, s, rng));
            dense.push(vec![0.0; f]);
            dense.push(normal_vec(f * d, out_scale * (d as f32 / f as f32).sqrt(), rng));
            dense.push(vec![0.0; d]);
        }
        dense.push(vec![1.0; d]);
        dense.push(vec![0.0; d]);
        Ok(SeqTwoTower { spec, items, dense })
    }

    fn per_block(&self) -> usize {
        match self.spec.block {
            BlockKind::Transformer => PER_BLOCK,
            BlockKind::Hstu => HSTU_PER_BLOCK,
        }
    }

    /// Index in `dense` of the time-gap table, when the tower has one.
    const TIME: usize = 1;

    /// Index in `dense` of block 0's first tensor: after the positions and the time-gap table.
    fn first_block(&self) -> usize {
        1 + usize::from(self.spec.time_buckets > 0)
    }

    fn block(&self, l: usize, i: usize) -> &[f32] {
        &self.dense[self.first_block() + l * self.per_block() + i]
    }

    fn final_ln(&self) -> (&[f32], &[f32]) {
        let n = self.dense.len();
        (&self.dense[n - 2], &self.dense[n - 1])
    }
}

/// What one block keeps for its backward pass (all `[T × …]` token rows).
#[derive(Default)]
struct BlockActs {
    /// Input of the block (the residual stream).
    x: Vec<f32>,
    ln1: LnActs,
    qkv: Vec<f32>,
    /// Attention probabilities, per sequence and head `[n × n]` (zero above the diagonal).
    probs: Vec<f32>,
    /// HSTU: the attention scores before the SiLU, laid out as `probs`.
    scores: Vec<f32>,
    ctx: Vec<f32>,
    attn_mask: Vec<f32>,
    /// The stream after the attention residual.
    mid: Vec<f32>,
    ln2: LnActs,
    /// Feed-forward hidden layer after the ReLU.
    hidden: Vec<f32>,
    ffn_mask: Vec<f32>,
}

#[derive(Default)]
struct LnActs {
    out: Vec<f32>,
    xhat: Vec<f32>,
    rstd: Vec<f32>,
}

/// Activations of a forward pass over a ragged batch, and the buffers of its backward pass.
#[derive(Default)]
pub struct SeqActs {
    all: bool,
    /// Token offsets of each sequence, `n + 1` values.
    off: Vec<usize>,
    /// Offsets of each sequence's `[n × n]` attention block (one head), `n + 1` values.
    poff: Vec<usize>,
    ids: Vec<u32>,
    /// Each token's time bucket (empty without a time signal).
    time_ids: Vec<u32>,
    emb_mask: Vec<f32>,
    blocks: Vec<BlockActs>,
    /// The stream after the last block.
    last: Vec<f32>,
    lnf: LnActs,
    /// Pre-normalisation output rows and their norms; `out` the unit vectors.
    sel: Vec<f32>,
    norms: Vec<f32>,
    out: Vec<f32>,
    // Backward buffers.
    dx: Vec<f32>,
    dmid: Vec<f32>,
    dtmp: Vec<f32>,
    dhidden: Vec<f32>,
    dqkv: Vec<f32>,
    dctx: Vec<f32>,
    dsel: Vec<f32>,
    dprobs: Vec<f32>,
}

#[derive(Default)]
pub struct SeqItemActs {
    emb: Vec<f32>,
    norms: Vec<f32>,
    out: Vec<f32>,
}

/// Token rows per rayon task in the row-wise kernels.
const ROWS_PER_TASK: usize = 64;

fn ln_forward(a: &mut LnActs, x: &[f32], g: &[f32], b: &[f32], d: usize) {
    let t = x.len() / d;
    a.out.resize(t * d, 0.0);
    a.xhat.resize(t * d, 0.0);
    a.rstd.resize(t, 0.0);
    a.out
        .par_chunks_mut(d * ROWS_PER_TASK)
        .zip(a.xhat.par_chunks_mut(d * ROWS_PER_TASK))
        .zip(a.rstd.par_chunks_mut(ROWS_PER_TASK))
        .zip(x.par_chunks(d * ROWS_PER_TASK))
        .for_each(|(((out, xhat), rstd), x)| {
            for (((o, h), r), xr) in
                out.chunks_exact_mut(d).zip(xhat.chunks_exact_mut(d)).zip(rstd.iter_mut()).zip(x.chunks_exact(d))
            {
                let mean = xr.iter().sum::<f32>() / d as f32;
                let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / d as f32;
                let rs = 1.0 / (var + LN_EPS).sqrt();
                *r = rs;
                for j in 0..d {
                    h[j] = (xr[j] - mean) * rs;
                    o[j] = h[j] * g[j] + b[j];
                }
            }
        });
}

/// `dx = rstd · (dy·g − mean(dy·g) − x̂ · mean(dy·g·x̂))`; accumulates `dg`, `db`.
fn ln_backward(dx: &mut [f32], dy: &[f32], a: &LnActs, g: &[f32], dg: &mut [f32], db: &mut [f32], d: usize) {
    dx.par_chunks_mut(d * ROWS_PER_TASK)
        .zip(dy.par_chunks(d * ROWS_PER_TASK))
        .zip(a.xhat.par_chunks(d * ROWS_PER_TASK))
        .zip(a.rstd.par_chunks(ROWS_PER_TASK))
        .for_each(|(((dx, dy), xhat), rstd)| {
            for (((dxr, dyr), h), &rs) in
                dx.chunks_exact_mut(d).zip(dy.chunks_exact(d)).zip(xhat.chunks_exact(d)).zip(rstd)
            {
                let (mut m1, mut m2) = (0.0f32, 0.0f32);
                for j in 0..d {
                    let gy = dyr[j] * g[j];
                    m1 += gy;
                    m2 += gy * h[j];
                }
                m1 /= d as f32;
                m2 /= d as f32;
                for j in 0..d {
                    dxr[j] = rs * (dyr[j] * g[j] - m1 - h[j] * m2);
                }
            }
        });
    for (dyr, h) in dy.chunks_exact(d).zip(a.xhat.chunks_exact(d)) {
        for j in 0..d {
            dg[j] += dyr[j] * h[j];
            db[j] += dyr[j];
        }
    }
}

/// A raw pointer handed to parallel tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every task derives from it a region no other task touches (see the callers).
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

impl Shared {
    fn at(self, i: usize) -> *mut f32 {
        // SAFETY: callers pass offsets inside the buffer the pointer came from.
        unsafe { self.0.add(i) }
    }
}

/// Causal multi-head attention of every sequence: `ctx = softmax(QKᵀ/√dh, causal) · V`, the
/// probabilities kept in `probs`.
fn attention_forward(
    qkv: &[f32],
    probs: &mut [f32],
    ctx: &mut [f32],
    off: &[usize],
    poff: &[usize],
    d: usize,
    heads: usize,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (pp, cp) = (Shared(probs.as_mut_ptr()), Shared(ctx.as_mut_ptr()));
    let qp = qkv.as_ptr() as usize;
    (0..off.len() - 1).into_par_iter().for_each(|s| {
        let (t0, n) = (off[s], off[s + 1] - off[s]);
        let q = (qp as *const f32).wrapping_add(t0 * 3 * d);
        for h in 0..heads {
            let p = pp.at((poff[s] * heads) + h * n * n);
            // SAFETY: sequence `s` owns token rows t0..t0+n of ctx and its own probability
            // blocks; qkv is read only. Every view lies inside its buffer by the offsets' sums.
            unsafe {
                let qh = q.add(h * dh);
                let kh = q.add(d + h * dh);
                let vh = q.add(2 * d + h * dh);
                gemm(n, dh, n, scale, qh, 3 * d, 1, kh, 1, 3 * d, 0.0, p, n);
                let rows = std::slice::from_raw_parts_mut(p, n * n);
                for (i, row) in rows.chunks_exact_mut(n).enumerate() {
                    let (seen, future) = row.split_at_mut(i + 1);
                    let max = seen.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let inv = 1.0 / exp_shifted_sum(seen, max);
                    seen.iter_mut().for_each(|v| *v *= inv);
                    future.fill(0.0);
                }
                gemm(n, n, dh, 1.0, p, n, 1, vh, 3 * d, 1, 0.0, cp.at(t0 * d + h * dh), d);
            }
        }
    });
}

/// Gradients of [`attention_forward`]: `dqkv` from `dctx` (overwritten); `scratch` holds one
/// `[n × n]` block per sequence.
#[allow(clippy::too_many_arguments)]
fn attention_backward(
    dqkv: &mut [f32],
    scratch: &mut [f32],
    dctx: &[f32],
    qkv: &[f32],
    probs: &[f32],
    off: &[usize],
    poff: &[usize],
    d: usize,
    heads: usize,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (gp, sp) = (Shared(dqkv.as_mut_ptr()), Shared(scratch.as_mut_ptr()));
    let (qp, pp, dcp) = (qkv.as_ptr() as usize, probs.as_ptr() as usize, dctx.as_ptr() as usize);
    (0..off.len() - 1).into_par_iter().for_each(|s| {
        let (t0, n) = (off[s], off[s + 1] - off[s]);
        let q = (qp as *const f32).wrapping_add(t0 * 3 * d);
        let dq = gp.at(t0 * 3 * d);
        let ds = sp.at(poff[s]);
        for h in 0..heads {
            // SAFETY: as in the forward pass: sequence `s` writes only its own rows of dqkv and
            // its own scratch block; the rest is read only.
            unsafe {
                let p = (pp as *const f32).add(poff[s] * heads + h * n * n);
                let dout = (dcp as *const f32).add(t0 * d + h * dh);
                let (qh, kh, vh) = (q.add(h * dh), q.add(d + h * dh), q.add(2 * d + h * dh));
                // dP = dO·Vᵀ
                gemm(n, dh, n, 1.0, dout, d, 1, vh, 1, 3 * d, 0.0, ds, n);
                let prow = std::slice::from_raw_parts(p, n * n);
                let drow = std::slice::from_raw_parts_mut(ds, n * n);
                for i in 0..n {
                    let pr = &prow[i * n..i * n + i + 1];
                    let dr = &mut drow[i * n..(i + 1) * n];
                    let pd = dot(pr, &dr[..=i]);
                    for j in 0..=i {
                        dr[j] = pr[j] * (dr[j] - pd) * scale;
                    }
                    dr[i + 1..].fill(0.0);
                }
                // dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q
                gemm(n, n, dh, 1.0, p, 1, n, dout, d, 1, 0.0, dq.add(2 * d + h * dh), 3 * d);
                gemm(n, n, dh, 1.0, ds, n, 1, kh, 3 * d, 1, 0.0, dq.add(h * dh), 3 * d);
                gemm(n, n, dh, 1.0, ds, 1, n, qh, 3 * d, 1, 0.0, dq.add(d + h * dh), 3 * d);
            }
        }
    });
}

/// The attention output of each sequence's newest token alone, `[sequences × d]`: a running
/// (online) softmax over its keys, so nothing per key is stored.
fn newest_attention(qkv: &[f32], ctx: &mut [f32], off: &[usize], d: usize, heads: usize) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    ctx.par_chunks_mut(d).enumerate().for_each(|(s, out)| {
        let (t0, last) = (off[s], off[s + 1] - 1);
        for h in 0..heads {
            let q = &qkv[last * 3 * d + h * dh..][..dh];
            let acc = &mut out[h * dh..(h + 1) * dh];
            acc.fill(0.0);
            let (mut max, mut z) = (f32::NEG_INFINITY, 0.0f32);
            for j in t0..=last {
                let row = &qkv[j * 3 * d..(j + 1) * 3 * d];
                let (k, v) = (&row[d + h * dh..][..dh], &row[2 * d + h * dh..][..dh]);
                let score = dot(q, k) * scale;
                if score > max {
                    let r = (max - score).exp();
                    z *= r;
                    acc.iter_mut().for_each(|x| *x *= r);
                    max = score;
                }
                let e = (score - max).exp();
                z += e;
                acc.iter_mut().zip(v).for_each(|(x, v)| *x += e * v);
            }
            let inv = 1.0 / z;
            acc.iter_mut().for_each(|x| *x *= inv);
        }
    });
}

#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp_approx(-x))
}

#[inline(always)]
fn silu(x: f32) -> f32 {
    x * sigmoid(x)
}

/// `d(x·σ(x))/dx = σ(x)·(1 + x·(1 − σ(x)))`.
#[inline(always)]
fn silu_grad(x: f32) -> f32 {
    let s = sigmoid(x);
    s * (1.0 + x * (1.0 - s))
}

/// Values per rayon task in the element-wise kernels.
const VALUES_PER_TASK: usize = 1 << 14;

/// `y = SiLU(x)`.
fn silu_forward(y: &mut Vec<f32>, x: &[f32]) {
    y.resize(x.len(), 0.0);
    y.par_chunks_mut(VALUES_PER_TASK).zip(x.par_chunks(VALUES_PER_TASK)).for_each(|(y, x)| {
        y.iter_mut().zip(x).for_each(|(y, &x)| *y = silu(x));
    });
}

/// `d *= SiLU'(x)`.
fn silu_backward(d: &mut [f32], x: &[f32]) {
    d.par_chunks_mut(VALUES_PER_TASK).zip(x.par_chunks(VALUES_PER_TASK)).for_each(|(d, x)| {
        d.iter_mut().zip(x).for_each(|(d, &x)| *d *= silu_grad(x));
    });
}

/// HSTU's attention over every sequence, reading `V, Q, K` from the `[T × 4d]` rows
/// `U | V | Q | K` of `act`: `S = QKᵀ/√dh`, `P = SiLU(S) · inv_len` on and below the diagonal
/// (0 above), `ctx = P·V`. Keeps `S` and `P`, laid out as in [`attention_forward`].
#[allow(clippy::too_many_arguments)]
fn hstu_attention_forward(
    act: &[f32],
    scores: &mut [f32],
    probs: &mut [f32],
    ctx: &mut [f32],
    off: &[usize],
    poff: &[usize],
    d: usize,
    heads: usize,
    inv_len: f32,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (sp, pp, cp) = (Shared(scores.as_mut_ptr()), Shared(probs.as_mut_ptr()), Shared(ctx.as_mut_ptr()));
    let ap = act.as_ptr() as usize;
    (0..off.len() - 1).into_par_iter().for_each(|s| {
        let (t0, n) = (off[s], off[s + 1] - off[s]);
        let row = (ap as *const f32).wrapping_add(t0 * 4 * d);
        for h in 0..heads {
            let at = poff[s] * heads + h * n * n;
            // SAFETY: sequence `s` owns token rows t0..t0+n of ctx and its own score and
            // probability blocks; act is read only. Every view lies inside its buffer.
            unsafe {
                let (vh, qh, kh) = (row.add(d + h * dh), row.add(2 * d + h * dh), row.add(3 * d + h * dh));
                gemm(n, dh, n, scale, qh, 4 * d, 1, kh, 1, 4 * d, 0.0, sp.at(at), n);
                let sc = std::slice::from_raw_parts(sp.at(at), n * n);
                let pr = std::slice::from_raw_parts_mut(pp.at(at), n * n);
                for (i, (srow, prow)) in sc.chunks_exact(n).zip(pr.chunks_exact_mut(n)).enumerate() {
                    let (seen, future) = prow.split_at_mut(i + 1);
                    seen.iter_mut().zip(srow).for_each(|(p, &x)| *p = silu(x) * inv_len);
                    future.fill(0.0);
                }
                gemm(n, n, dh, 1.0, pp.at(at), n, 1, vh, 4 * d, 1, 0.0, cp.at(t0 * d + h * dh), d);
            }
        }
    });
}

/// Gradients of [`hstu_attention_forward`]: the `V, Q, K` columns of `dact` from `dctx` (the
/// `U` columns are left as they are); `scratch` holds one `[n × n]` block per sequence.
#[allow(clippy::too_many_arguments)]
fn hstu_attention_backward(
    dact: &mut [f32],
    scratch: &mut [f32],
    dctx: &[f32],
    act: &[f32],
    scores: &[f32],
    probs: &[f32],
    off: &[usize],
    poff: &[usize],
    d: usize,
    heads: usize,
    inv_len: f32,
) {
    let dh = d / heads;
    let scale = 1.0 / (dh as f32).sqrt();
    let (gp, xp) = (Shared(dact.as_mut_ptr()), Shared(scratch.as_mut_ptr()));
    let (ap, sp, pp, dcp) =
        (act.as_ptr() as usize, scores.as_ptr() as usize, probs.as_ptr() as usize, dctx.as_ptr() as usize);
    (0..off.len() - 1).into_par_iter().for_each(|s| {
        let (t0, n) = (off[s], off[s + 1] - off[s]);
        let row = (ap as *const f32).wrapping_add(t0 * 4 * d);
        let drow = gp.at(t0 * 4 * d);
        let ds = xp.at(poff[s]);
        for h in 0..heads {
            let at = poff[s] * heads + h * n * n;
            // SAFETY: as in the forward pass: sequence `s` writes only its own rows of dact and
            // its own scratch block; the rest is read only.
            unsafe {
                let p = (pp as *const f32).add(at);
                let sc = std::slice::from_raw_parts((sp as *const f32).add(at), n * n);
                let dout = (dcp as *const f32).add(t0 * d + h * dh);
                let (vh, qh, kh) = (row.add(d + h * dh), row.add(2 * d + h * dh), row.add(3 * d + h * dh));
                // dP = dO·Vᵀ, then dS = dP ⊙ SiLU'(S) · inv_len / √dh on and below the diagonal.
                gemm(n, dh, n, 1.0, dout, d, 1, vh, 1, 4 * d, 0.0, ds, n);
                let dsm = std::slice::from_raw_parts_mut(ds, n * n);
                for (i, (dr, sr)) in dsm.chunks_exact_mut(n).zip(sc.chunks_exact(n)).enumerate() {
                    let (seen, future) = dr.split_at_mut(i + 1);
                    seen.iter_mut().zip(sr).for_each(|(g, &x)| *g *= silu_grad(x) * inv_len * scale);
                    future.fill(0.0);
                }
                // dV = Pᵀ·dO, dQ = dS·K, dK = dSᵀ·Q
                gemm(n, n, dh, 1.0, p, 1, n, dout, d, 1, 0.0, drow.add(d + h * dh), 4 * d);
                gemm(n, n, dh, 1.0, ds, n, 1, kh, 4 * d, 1, 0.0, drow.add(2 * d + h * dh), 4 * d);
                gemm(n, n, dh, 1.0, ds, 1, n, qh, 4 * d, 1, 0.0, drow.add(3 * d + h * dh), 4 * d);
            }
        }
    });
}

/// The gradients of tensor `i` and of the one after it (a weight and its bias, a norm's gain and
/// its shift), borrowed together.
fn grad_pair(grads: &mut [Vec<f32>], i: usize) -> (&mut [f32], &mut [f32]) {
    let (a, b) = grads[i..].split_at_mut(1);
    (&mut a[0], &mut b[0])
}

/// The dropout mask of a block's branch output (`layer` numbers it), empty when dropout is off.
fn hidden_mask(mask: &mut Vec<f32>, len: usize, drop: crate::tower::Dropout, layer: u64) {
    if drop.hidden > 0.0 {
        fill_mask(mask, len, drop.hidden, drop.seed, layer);
    } else {
        mask.clear();
    }
}

/// `dst = mask ⊙ src` (a copy when the mask is empty).
fn masked_copy(dst: &mut Vec<f32>, src: &[f32], mask: &[f32]) {
    dst.clear();
    dst.extend_from_slice(src);
    apply_mask(dst, mask);
}

fn apply_mask(x: &mut [f32], mask: &[f32]) {
    if !mask.is_empty() {
        x.iter_mut().zip(mask).for_each(|(v, m)| *v *= m);
    }
}

/// `y = x + mask ⊙ branch` into `y`.
fn residual(y: &mut Vec<f32>, x: &[f32], branch: &[f32], mask: &[f32]) {
    y.clear();
    if mask.is_empty() {
        y.extend(x.iter().zip(branch).map(|(a, b)| a + b));
    } else {
        y.extend(x.iter().zip(branch).zip(mask).map(|((a, b), m)| a + b * m));
    }
}

impl SeqTwoTower {
    /// Tokens of user `u`: its history within the window, at least one token (an empty history
    /// reads the zero padding row, so every user gets a vector).
    fn tokens(&self, batch: &UserBatch, u: usize) -> usize {
        (batch.hist_len[u] as usize).clamp(1, self.spec.max_seq_len)
    }
}

impl SeqTwoTower {
    /// The forward pass; with `newest_only`, the last block computes its attention row,
    /// projection and feed-forward for each user's newest token only (all that a per-user output
    /// reads), which no backward pass may follow.
    fn forward(&self, batch: &UserBatch, a: &mut SeqActs, newest_only: bool) {
        let d = self.spec.dim;
        let (l, heads, f) = (batch.hist.len() / batch.n.max(1), self.spec.heads, self.spec.ffn);
        a.all = batch.all_positions;
        a.off.clear();
        a.poff.clear();
        a.off.push(0);
        a.poff.push(0);
        a.ids.clear();
        a.time_ids.clear();
        let tb = self.spec.time_buckets;
        for u in 0..batch.n {
            let n = self.tokens(batch, u);
            let len = (batch.hist_len[u] as usize).min(n);
            // The newest `n` items when the history is longer than the window.
            let hist = &batch.hist[u * l..u * l + batch.hist_len[u] as usize];
            a.ids.extend_from_slice(&hist[hist.len() - len..]);
            a.ids.resize(a.ids.len() + n - len, 0);
            if tb > 0 {
                let ts = &batch.hist_ts[u * l + hist.len() - len..u * l + hist.len()];
                a.time_ids.push(0);
                a.time_ids.extend(ts.windows(2).map(|w| gap_bucket(w[1] - w[0], tb)));
                a.time_ids.resize(a.ids.len(), 0);
            }
            a.off.push(a.off[u] + n);
            a.poff.push(a.poff[u] + n * n);
        }
        let t = a.ids.len();
        let drop = batch.dropout;
        // x0 = E[id] + P[position], then input dropout.
        a.blocks.resize_with(self.spec.blocks, BlockActs::default);
        let x0 = match a.blocks.first_mut() {
            Some(b) => &mut b.x,
            None => &mut a.last,
        };
        x0.resize(t * d, 0.0);
        for u in 0..batch.n {
            for (j, tok) in (a.off[u]..a.off[u + 1]).enumerate() {
                let row = &mut x0[tok * d..(tok + 1) * d];
                let e = self.items.row(a.ids[tok]);
                let p = &self.dense[0][j * d..(j + 1) * d];
                for c in 0..d {
                    row[c] = e[c] + p[c];
                }
                if tb > 0 {
                    let tg = &self.dense[Self::TIME][a.time_ids[tok] as usize * d..][..d];
                    row.iter_mut().zip(tg).for_each(|(r, v)| *r += v);
                }
            }
        }
        if drop.input > 0.0 {
            fill_mask(&mut a.emb_mask, t * d, drop.input, drop.seed, 0);
            apply_mask(x0, &a.emb_mask);
        } else {
            a.emb_mask.clear();
        }
        let p_total = a.poff[batch.n] * heads;
        let inv_len = 1.0 / self.spec.max_seq_len as f32;
        // Only a transformer's last block has a per-user shortcut; an HSTU tower computes every
        // token and the newest ones are picked below.
        let newest_only = newest_only && self.spec.block == BlockKind::Transformer;
        for bi in 0..self.spec.blocks {
            let (done, rest) = a.blocks.split_at_mut(bi + 1);
            let b = &mut done[bi];
            let g = |i| self.block(bi, i);
            if self.spec.block == BlockKind::Hstu {
                ln_forward(&mut b.ln1, &b.x, g(H_LN1_G), g(H_LN1_B), d);
                b.qkv.resize(t * 4 * d, 0.0);
                linear_forward(&mut b.qkv, &b.ln1.out, g(H_W_UVQK), g(H_B_UVQK), t, d, 4 * d);
                silu_forward(&mut b.hidden, &b.qkv);
                b.scores.resize(p_total, 0.0);
                b.probs.resize(p_total, 0.0);
                b.ctx.resize(t * d, 0.0);
                let (off, poff) = (&a.off, &a.poff);
                hstu_attention_forward(
                    &b.hidden,
                    &mut b.scores,
                    &mut b.probs,
                    &mut b.ctx,
                    off,
                    poff,
                    d,
                    heads,
                    inv_len,
                );
                ln_forward(&mut b.ln2, &b.ctx, g(H_LN2_G), g(H_LN2_B), d);
                // The normalised attention output gated by U, the first `d` columns of each row.
                b.mid.clear();
                b.mid.extend(
                    b.ln2
                        .out
                        .chunks_exact(d)
                        .zip(b.hidden.chunks_exact(4 * d))
                        .flat_map(|(y, u)| y.iter().zip(&u[..d]).map(|(y, u)| y * u)),
                );
                a.dtmp.resize(t * d, 0.0);
                linear_forward(&mut a.dtmp, &b.mid, g(H_W_O), g(H_B_O), t, d, d);
                hidden_mask(&mut b.attn_mask, t * d, drop, 1 + 2 * bi as u64);
                let next = match rest.first_mut() {
                    Some(nb) => &mut nb.x,
                    None => &mut a.last,
                };
                residual(next, &b.x, &a.dtmp, &b.attn_mask);
                continue;
            }
            ln_forward(&mut b.ln1, &b.x, g(LN1_G), g(LN1_B), d);
            b.qkv.resize(t * 3 * d, 0.0);
            linear_forward(&mut b.qkv, &b.ln1.out, g(W_QKV), g(B_QKV), t, d, 3 * d);
            if newest_only && rest.is_empty() {
                // Every token's keys and values, but one query per user from here on.
                let users = batch.n;
                b.ctx.resize(users * d, 0.0);
                newest_attention(&b.qkv, &mut b.ctx, &a.off, d, heads);
                a.dtmp.resize(users * d, 0.0);
                linear_forward(&mut a.dtmp, &b.ctx, g(W_O), g(B_O), users, d, d);
                b.mid.clear();
                for u in 0..users {
                    let tok = a.off[u + 1] - 1;
                    let x = &b.x[tok * d..(tok + 1) * d];
                    b.mid.extend(x.iter().zip(&a.dtmp[u * d..(u + 1) * d]).map(|(x, o)| x + o));
                }
                ln_forward(&mut b.ln2, &b.mid, g(LN2_G), g(LN2_B), d);
                b.hidden.resize(users * f, 0.0);
                linear_forward(&mut b.hidden, &b.ln2.out, g(W_1), g(B_1), users, d, f);
                relu_forward(&mut b.hidden);
                linear_forward(&mut a.dtmp, &b.hidden, g(W_2), g(B_2), users, f, d);
                residual(&mut a.last, &b.mid, &a.dtmp, &[]);
                break;
            }
            b.probs.resize(p_total, 0.0);
            b.ctx.resize(t * d, 0.0);
            attention_forward(&b.qkv, &mut b.probs, &mut b.ctx, &a.off, &a.poff, d, heads);
            // The projected attention output goes to `mid` first, then the residual is added.
            a.dtmp.resize(t * d, 0.0);
            linear_forward(&mut a.dtmp, &b.ctx, g(W_O), g(B_O), t, d, d);
            hidden_mask(&mut b.attn_mask, t * d, drop, 1 + 2 * bi as u64);
            residual(&mut b.mid, &b.x, &a.dtmp, &b.attn_mask);
            ln_forward(&mut b.ln2, &b.mid, g(LN2_G), g(LN2_B), d);
            b.hidden.resize(t * f, 0.0);
            linear_forward(&mut b.hidden, &b.ln2.out, g(W_1), g(B_1), t, d, f);
            relu_forward(&mut b.hidden);
            linear_forward(&mut a.dtmp, &b.hidden, g(W_2), g(B_2), t, f, d);
            hidden_mask(&mut b.ffn_mask, t * d, drop, 2 + 2 * bi as u64);
            let next = match rest.first_mut() {
                Some(nb) => &mut nb.x,
                None => &mut a.last,
            };
            residual(next, &b.mid, &a.dtmp, &b.ffn_mask);
        }
        let (gf, bf) = self.final_ln();
        ln_forward(&mut a.lnf, &a.last, gf, bf, d);
        let rows = if a.all { t } else { batch.n };
        a.sel.clear();
        if a.all || (newest_only && self.spec.blocks > 0) {
            a.sel.extend_from_slice(&a.lnf.out);
        } else {
            for u in 0..batch.n {
                let tok = a.off[u + 1] - 1;
                a.sel.extend_from_slice(&a.lnf.out[tok * d..(tok + 1) * d]);
            }
        }
        a.norms.resize(rows, 0.0);
        a.out.resize(rows * d, 0.0);
        l2norm_forward(&mut a.out, &mut a.norms, &a.sel, d);
    }
}

impl Tower for SeqTwoTower {
    type UserActs = SeqActs;
    type ItemActs = SeqItemActs;

    fn out_dim(&self) -> usize {
        self.spec.dim
    }
    fn item_rows(&self) -> usize {
        self.spec.items
    }
    fn max_seq_len(&self) -> usize {
        self.spec.max_seq_len
    }
    fn n_user_features(&self) -> usize {
        0
    }
    fn reads_event_times(&self) -> bool {
        self.spec.time_buckets > 0
    }
    fn max_users_per_batch(&self) -> usize {
        // About 16k tokens: every block keeps a dozen [tokens × dim] buffers and the
        // attention probabilities grow with the square of each window.
        (16_384 / self.spec.max_seq_len).max(1)
    }

    fn user_forward(&self, batch: &UserBatch, a: &mut SeqActs) {
        self.forward(batch, a, false)
    }

    fn user_infer(&self, batch: &UserBatch, a: &mut SeqActs) {
        self.forward(batch, a, !batch.all_positions)
    }

    fn user_out<'a>(&self, a: &'a SeqActs) -> &'a [f32] {
        &a.out
    }

    fn user_backward(&self, batch: &UserBatch, a: &mut SeqActs, dout: &[f32], grads: &mut Grads) {
        let d = self.spec.dim;
        let (heads, f) = (self.spec.heads, self.spec.ffn);
        let t = a.ids.len();
        let rows = a.norms.len();
        a.dsel.resize(rows * d, 0.0);
        l2norm_backward(&mut a.dsel, &dout[..rows * d], &a.out, &a.norms, d);
        // dL/d(final norm output) on every token; only the selected ones are non-zero.
        a.dtmp.clear();
        a.dtmp.resize(t * d, 0.0);
        if a.all {
            a.dtmp.copy_from_slice(&a.dsel);
        } else {
            for u in 0..batch.n {
                let tok = a.off[u + 1] - 1;
                a.dtmp[tok * d..(tok + 1) * d].copy_from_slice(&a.dsel[u * d..(u + 1) * d]);
            }
        }
        let nd = self.dense.len();
        let inv_len = 1.0 / self.spec.max_seq_len as f32;
        let (gf, _) = self.final_ln();
        a.dx.resize(t * d, 0.0);
        let (dg, db) = grad_pair(&mut grads.dense, nd - 2);
        ln_backward(&mut a.dx, &a.dtmp, &a.lnf, gf, dg, db, d);
        a.dprobs.resize(a.poff[batch.n], 0.0);
        for bi in (0..self.spec.blocks).rev() {
            let b = &a.blocks[bi];
            let g = |i| self.block(bi, i);
            let per = self.per_block();
            let base = self.first_block() + bi * per;
            let gd = &mut grads.dense[base..base + per];
            if self.spec.block == BlockKind::Hstu {
                // a.dx is dL/d(block output), and stays so (the residual part) until the end.
                masked_copy(&mut a.dtmp, &a.dx, &b.attn_mask);
                a.dctx.resize(t * d, 0.0);
                let (g0, g1) = grad_pair(gd, H_W_O);
                linear_backward(Some(&mut a.dctx), g0, g1, &a.dtmp, &b.mid, g(H_W_O), t, d, d);
                // Through the gate: dU = d(gated) ⊙ norm(AV) into the U columns, and
                // d(norm(AV)) = d(gated) ⊙ U into dtmp.
                a.dqkv.resize(t * 4 * d, 0.0);
                for (((dq, dt), (dg, y)), act) in a
                    .dqkv
                    .chunks_exact_mut(4 * d)
                    .zip(a.dtmp.chunks_exact_mut(d))
                    .zip(a.dctx.chunks_exact(d).zip(b.ln2.out.chunks_exact(d)))
                    .zip(b.hidden.chunks_exact(4 * d))
                {
                    for c in 0..d {
                        dq[c] = dg[c] * y[c];
                        dt[c] = dg[c] * act[c];
                    }
                }
                let (g0, g1) = grad_pair(gd, H_LN2_G);
                ln_backward(&mut a.dctx, &a.dtmp, &b.ln2, g(H_LN2_G), g0, g1, d);
                let (off, poff) = (&a.off, &a.poff);
                a.dprobs.resize(poff[batch.n], 0.0);
                hstu_attention_backward(
                    &mut a.dqkv,
                    &mut a.dprobs,
                    &a.dctx,
                    &b.hidden,
                    &b.scores,
                    &b.probs,
                    off,
                    poff,
                    d,
                    heads,
                    inv_len,
                );
                silu_backward(&mut a.dqkv, &b.qkv);
                let (g0, g1) = grad_pair(gd, H_W_UVQK);
                linear_backward(Some(&mut a.dtmp), g0, g1, &a.dqkv, &b.ln1.out, g(H_W_UVQK), t, d, 4 * d);
                let (g0, g1) = grad_pair(gd, H_LN1_G);
                a.dmid.resize(t * d, 0.0);
                ln_backward(&mut a.dmid, &a.dtmp, &b.ln1, g(H_LN1_G), g0, g1, d);
                a.dx.iter_mut().zip(&a.dmid).for_each(|(x, m)| *x += m);
                continue;
            }
            // Feed-forward branch: a.dx is dL/d(block output).
            masked_copy(&mut a.dtmp, &a.dx, &b.ffn_mask);
            a.dhidden.resize(t * f, 0.0);
            let (g0, g1) = grad_pair(gd, W_2);
            linear_backward(Some(&mut a.dhidden), g0, g1, &a.dtmp, &b.hidden, g(W_2), t, f, d);
            relu_backward(&mut a.dhidden, &b.hidden);
            let (g0, g1) = grad_pair(gd, W_1);
            linear_backward(Some(&mut a.dtmp), g0, g1, &a.dhidden, &b.ln2.out, g(W_1), t, d, f);
            a.dmid.resize(t * d, 0.0);
            let (g0, g1) = grad_pair(gd, LN2_G);
            ln_backward(&mut a.dmid, &a.dtmp, &b.ln2, g(LN2_G), g0, g1, d);
            a.dmid.iter_mut().zip(&a.dx).for_each(|(m, x)| *m += x);
            // Attention branch: a.dmid is dL/d(mid).
            masked_copy(&mut a.dtmp, &a.dmid, &b.attn_mask);
            a.dctx.resize(t * d, 0.0);
            let (g0, g1) = grad_pair(gd, W_O);
            linear_backward(Some(&mut a.dctx), g0, g1, &a.dtmp, &b.ctx, g(W_O), t, d, d);
            a.dqkv.resize(t * 3 * d, 0.0);
            attention_backward(&mut a.dqkv, &mut a.dprobs, &a.dctx, &b.qkv, &b.probs, &a.off, &a.poff, d, heads);
            let (g0, g1) = grad_pair(gd, W_QKV);
            linear_backward(Some(&mut a.dtmp), g0, g1, &a.dqkv, &b.ln1.out, g(W_QKV), t, d, 3 * d);
            let (g0, g1) = grad_pair(gd, LN1_G);
            ln_backward(&mut a.dx, &a.dtmp, &b.ln1, g(LN1_G), g0, g1, d);
            a.dx.iter_mut().zip(&a.dmid).for_each(|(x, m)| *x += m);
        }
        apply_mask(&mut a.dx, &a.emb_mask);
        let dpos = &mut grads.dense[0];
        for u in 0..batch.n {
            for (j, tok) in (a.off[u]..a.off[u + 1]).enumerate() {
                let g = &a.dx[tok * d..(tok + 1) * d];
                // The padding row is never moved: an empty history reads it as a zero token.
                if a.ids[tok] != 0 {
                    grads.tables[0].add(a.ids[tok], 1.0, g);
                }
                dpos[j * d..(j + 1) * d].iter_mut().zip(g).for_each(|(p, v)| *p += v);
            }
        }
        if self.spec.time_buckets > 0 {
            let dtime = &mut grads.dense[Self::TIME];
            for (g, &b) in a.dx.chunks_exact(d).zip(&a.time_ids) {
                dtime[b as usize * d..(b as usize + 1) * d].iter_mut().zip(g).for_each(|(t, v)| *t += v);
            }
        }
    }

    fn item_forward(&self, ids: &[u32], a: &mut SeqItemActs) {
        let d = self.spec.dim;
        a.emb.clear();
        for &i in ids {
            a.emb.extend_from_slice(self.items.row(i));
        }
        a.norms.resize(ids.len(), 0.0);
        a.out.resize(ids.len() * d, 0.0);
        l2norm_forward(&mut a.out, &mut a.norms, &a.emb, d);
    }

    fn item_out<'a>(&self, a: &'a SeqItemActs) -> &'a [f32] {
        &a.out
    }

    fn item_backward(&self, ids: &[u32], a: &mut SeqItemActs, dout: &[f32], grads: &mut Grads) {
        let d = self.spec.dim;
        // `emb` is no longer needed: it takes the gradient of the raw rows.
        let mut demb = std::mem::take(&mut a.emb);
        l2norm_backward(&mut demb, &dout[..ids.len() * d], &a.out, &a.norms, d);
        for (k, &i) in ids.iter().enumerate() {
            if i != 0 {
                grads.tables[0].add(i, 1.0, &demb[k * d..(k + 1) * d]);
            }
        }
        a.emb = demb;
    }

    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>) {
        (vec![&mut self.items], self.dense.iter_mut().collect())
    }

    fn item_row_tables_mut(&mut self) -> Vec<&mut Embedding> {
        vec![&mut self.items]
    }

    fn new_grads(&self) -> Grads {
        let sizes: Vec<usize> = self.dense.iter().map(Vec::len).collect();
        Grads::for_params(&[&self.items], &sizes)
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let (d, f) = (self.spec.dim, self.spec.ffn);
        let mut out = vec![crate::tower::table_tensor("items".into(), &self.items)];
        out.push(("positions".into(), vec![self.spec.max_seq_len, d], &self.dense[0][..]));
        if self.spec.time_buckets > 0 {
            out.push(("time_gaps".into(), vec![self.spec.time_buckets, d], &self.dense[Self::TIME][..]));
        }
        for bi in 0..self.spec.blocks {
            if self.spec.block == BlockKind::Hstu {
                let shapes: [Vec<usize>; HSTU_PER_BLOCK] =
                    [vec![d], vec![d], vec![d, 4 * d], vec![4 * d], vec![d], vec![d], vec![d, d], vec![d]];
                for (i, shape) in shapes.into_iter().enumerate() {
                    out.push((format!("block{bi}.{}", HSTU_BLOCK_NAMES[i]), shape, self.block(bi, i)));
                }
                continue;
            }
            let shapes: [Vec<usize>; PER_BLOCK] = [
                vec![d],
                vec![d],
                vec![d, 3 * d],
                vec![3 * d],
                vec![d, d],
                vec![d],
                vec![d],
                vec![d],
                vec![d, f],
                vec![f],
                vec![f, d],
                vec![d],
            ];
            for (i, shape) in shapes.into_iter().enumerate() {
                out.push((format!("block{bi}.{}", BLOCK_NAMES[i]), shape, self.block(bi, i)));
            }
        }
        let (g, b) = self.final_ln();
        out.push(("final_norm.g".into(), vec![d], g));
        out.push(("final_norm.b".into(), vec![d], b));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(blocks: usize, heads: usize, seed: u64) -> (SeqTwoTower, UserBatch) {
        tiny_of(BlockKind::Transformer, blocks, heads, seed)
    }

    fn tiny_of(block: BlockKind, blocks: usize, heads: usize, seed: u64) -> (SeqTwoTower, UserBatch) {
        let spec = SeqSpec {
            items: 7,
            dim: 8,
            max_seq_len: 5,
            blocks,
            heads,
            ffn: 6,
            item_hash: None,
            block,
            time_buckets: 0,
        };
        let mut rng = Rng::new(seed);
        let mut model = SeqTwoTower::new(spec, &mut rng).unwrap();
        // Trained positions are not zero: give them values so their gradients are checked.
        model.dense[0] = normal_vec(model.dense[0].len(), 0.5, &mut rng);
        let mut batch = UserBatch::default();
        batch.reset(3, 5, 0);
        batch.hist.copy_from_slice(&[1, 2, 3, 4, 0, 5, 6, 0, 0, 0, 3, 0, 0, 0, 0]);
        batch.hist_len.copy_from_slice(&[4, 2, 1]);
        (model, batch)
    }

    // Central differences need the loss smooth within the step: a small step keeps it clear of
    // the feed-forward ReLU's kink.
    #[test]
    fn last_position_gradients_match_finite_differences() {
        for (blocks, heads) in [(0, 1), (1, 1), (2, 2)] {
            let (mut model, batch) = tiny(blocks, heads, 4);
            crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1], 3e-3, 2e-2);
        }
    }

    #[test]
    fn every_position_gradients_match_finite_differences_with_dropout() {
        let (mut model, mut batch) = tiny(2, 2, 6);
        batch.all_positions = true;
        crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1, 6], 3e-3, 2e-2);
        batch.dropout = crate::tower::Dropout { input: 0.2, hidden: 0.3, seed: 11 };
        crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1, 6], 3e-3, 2e-2);
    }

    #[test]
    fn hstu_gradients_match_finite_differences_at_the_last_and_every_position_with_dropout() {
        for (blocks, heads) in [(1, 1), (2, 2)] {
            let (mut model, batch) = tiny_of(BlockKind::Hstu, blocks, heads, 4);
            crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1], 3e-3, 2e-2);
        }
        let (mut model, mut batch) = tiny_of(BlockKind::Hstu, 2, 2, 6);
        batch.all_positions = true;
        crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1, 6], 3e-3, 2e-2);
        batch.dropout = crate::tower::Dropout { input: 0.2, hidden: 0.3, seed: 11 };
        crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1, 6], 3e-3, 2e-2);
    }

    #[test]
    fn gap_buckets_grow_with_the_log_of_the_gap_and_stop_at_the_last() {
        let got: Vec<u32> = [-5, 0, 1, 2, 3, 7, 8, 1 << 20, i64::MAX].iter().map(|&g| gap_bucket(g, 16)).collect();
        assert_eq!(got, vec![1, 1, 2, 2, 3, 4, 4, 15, 15]);
        assert_eq!(gap_bucket(100, 2), 1);
    }

    #[test]
    fn time_gap_gradients_match_finite_differences_and_gaps_change_the_output() {
        let (_, mut batch) = tiny(2, 2, 4);
        let spec = SeqSpec {
            items: 7,
            dim: 8,
            max_seq_len: 5,
            blocks: 2,
            heads: 2,
            ffn: 6,
            item_hash: None,
            block: BlockKind::Transformer,
            time_buckets: 6,
        };
        let mut rng = Rng::new(9);
        let mut model = SeqTwoTower::new(spec, &mut rng).unwrap();
        assert!(model.reads_event_times());
        model.dense[0] = normal_vec(model.dense[0].len(), 0.5, &mut rng);
        model.dense[SeqTwoTower::TIME] = normal_vec(model.dense[SeqTwoTower::TIME].len(), 0.5, &mut rng);
        // User 0: gaps of 0, 3 and 100 s (buckets 1, 3 and 7 capped at 5); user 1: 1 s (bucket 2).
        batch.hist_ts[..4].copy_from_slice(&[1000, 1000, 1003, 1103]);
        batch.hist_ts[5..7].copy_from_slice(&[50, 51]);
        batch.all_positions = true;
        crate::tower::testing::check_gradients(&mut model, &batch, &[2, 5, 1, 6], 3e-3, 2e-2);
        let mut a = SeqActs::default();
        model.user_forward(&batch, &mut a);
        assert_eq!(a.time_ids, vec![0, 1, 3, 5, 0, 2, 0]);
        let before = model.user_out(&a).to_vec();
        batch.hist_ts[3] = 1004;
        model.user_forward(&batch, &mut a);
        let after = model.user_out(&a).to_vec();
        assert_eq!(&before[..3 * 8], &after[..3 * 8], "earlier positions do not see a later gap");
        assert_ne!(&before[3 * 8..4 * 8], &after[3 * 8..4 * 8], "the newest gap moves the newest output");
    }

    #[test]
    fn inference_gives_the_training_forward_outputs() {
        for (kind, blocks) in [0, 1, 2]
            .map(|b| (BlockKind::Transformer, b))
            .into_iter()
            .chain([(BlockKind::Hstu, 1), (BlockKind::Hstu, 2)])
        {
            let (model, batch) = tiny_of(kind, blocks, 2, 5);
            let (mut a, mut b) = (SeqActs::default(), SeqActs::default());
            model.user_forward(&batch, &mut a);
            model.user_infer(&batch, &mut b);
            let (x, y) = (model.user_out(&a), model.user_out(&b));
            assert_eq!(x.len(), y.len());
            for (p, q) in x.iter().zip(y) {
                assert!((p - q).abs() < 1e-5, "{kind:?}, {blocks} blocks: {p} vs {q}");
            }
        }
    }

    #[test]
    fn a_position_sees_only_the_items_before_it() {
        for kind in [BlockKind::Transformer, BlockKind::Hstu] {
            a_position_sees_only_the_items_before_it_in(kind);
        }
    }

    fn a_position_sees_only_the_items_before_it_in(kind: BlockKind) {
        let (model, mut batch) = tiny_of(kind, 2, 2, 5);
        batch.all_positions = true;
        let mut a = SeqActs::default();
        model.user_forward(&batch, &mut a);
        let before = model.user_out(&a).to_vec();
        // Changing user 0's newest item changes its last output only.
        batch.hist[3] = 6;
        model.user_forward(&batch, &mut a);
        let after = model.user_out(&a).to_vec();
        let d = 8;
        assert_eq!(before.len(), (4 + 2 + 1) * d);
        assert_eq!(&before[..3 * d], &after[..3 * d], "earlier positions must not see a later item");
        assert_ne!(&before[3 * d..4 * d], &after[3 * d..4 * d]);
        assert_eq!(&before[4 * d..], &after[4 * d..], "other users are independent");
        // The per-user output is the newest position's.
        batch.all_positions = false;
        model.user_forward(&batch, &mut a);
        assert_eq!(&model.user_out(&a)[..d], &after[3 * d..4 * d]);
        assert_eq!(&model.user_out(&a)[d..2 * d], &after[5 * d..6 * d]);
    }
}
