//! MIND: several interest vectors per user by behaviour-to-interest dynamic routing.
//!
//! User tower: the history items' embeddings (the item table itself) are mapped by one shared
//! bilinear matrix `S`; `interests` capsules are formed by dynamic routing — coupling weights
//! `w_kj = softmax_k(b_kj)`, capsule `c_k = squash(Σ_j w_kj · e_j S)`, logits `b_kj += c_k · e_j S` —
//! for a fixed number of iterations. The routing logits start from fixed random values (drawn
//! from `routing_seed`) and are not trained. Each capsule, concatenated with the user's
//! categorical features, goes through a shared MLP and an L2 norm: one unit vector per interest.
//! With `dynamic_k`, a user with `n` history items has `max(1, min(K, ⌊log2 n⌋))` interests; the
//! unused slots repeat interest 0, so a max-over-interests search is unaffected.
//!
//! Backward treats the final coupling weights as constants (no gradient through the routing
//! logit updates), the usual simplification for capsule routing.
//!
//! Item tower: `[item embedding ‖ pooled item features]` → L2 norm, as in YouTubeDNN.

use crate::deep::{
    bag_tensors, normalized, pool_given_item, pool_item_inputs, scatter_item_input_grads, CategoricalSpec, ItemBags,
};
use crate::embedding::{Embedding, RowHash};
use crate::gemm::{matmul, Layout};
use crate::layers::{l2norm_backward, l2norm_forward};
use crate::mlp::{Mlp, MlpActs};
use crate::rng::Rng;
use crate::tower::{table_tensor, Grads, NamedTensor, Tower, UserBatch};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct MindSpec {
    /// Item table rows, padding row 0 included.
    pub items: usize,
    /// Width of item embeddings and capsules.
    pub dim: usize,
    pub max_seq_len: usize,
    /// Interests (capsules) per user, `K`.
    pub interests: usize,
    pub dynamic_k: bool,
    pub routing_iters: usize,
    pub routing_seed: u64,
    pub user_features: Vec<CategoricalSpec>,
    pub item_features: Vec<CategoricalSpec>,
    /// Hidden widths of the MLP applied to each capsule ‖ user features.
    pub hidden: Vec<usize>,
    /// Hashing of the catalogue's tail into shared id rows (`[model] hash_buckets`).
    #[serde(default)]
    pub item_hash: Option<RowHash>,
}

impl MindSpec {
    pub fn out_dim(&self) -> usize {
        self.dim + self.item_features.iter().map(|f| f.dim).sum::<usize>()
    }

    fn mlp_input(&self) -> usize {
        self.dim + self.user_features.iter().map(|f| f.dim).sum::<usize>()
    }

    /// Interests a user with `len` history items gets.
    pub fn active_for(&self, len: usize) -> usize {
        if !self.dynamic_k {
            return self.interests;
        }
        let log = if len == 0 { 0 } else { (usize::BITS - 1 - len.leading_zeros()) as usize };
        log.clamp(1, self.interests)
    }
}

#[derive(Clone, Debug)]
pub struct MindTwoTower {
    pub spec: MindSpec,
    pub item_emb: Embedding,
    pub user_feat_emb: Vec<Embedding>,
    pub item_feat_emb: Vec<Embedding>,
    pub item_bags: Vec<ItemBags>,
    /// `[dim × dim]` bilinear map shared by all behaviours and interests.
    pub bilinear: Vec<f32>,
    pub mlp: Mlp,
    /// `[K × max_seq_len]` initial routing logits, regenerated from `routing_seed`.
    routing_init: Vec<f32>,
}

#[derive(Default)]
pub struct UserActs {
    e: Vec<f32>,
    uhat: Vec<f32>,
    w: Vec<f32>,
    z: Vec<f32>,
    x: Vec<f32>,
    mlp: MlpActs,
    norms: Vec<f32>,
    out: Vec<f32>,
    active: Vec<usize>,
    dz_out: Vec<f32>,
    dout: Vec<f32>,
    duhat: Vec<f32>,
    de: Vec<f32>,
}

#[derive(Default)]
pub struct ItemActs {
    raw: Vec<f32>,
    norms: Vec<f32>,
    out: Vec<f32>,
    draw: Vec<f32>,
}

/// `c = z · |z| / (1 + |z|²)`; returns `|z|`.
fn squash(c: &mut [f32], z: &[f32]) -> f32 {
    let n2: f32 = z.iter().map(|v| v * v).sum();
    let n = n2.sqrt();
    let s = n / (1.0 + n2);
    for (a, b) in c.iter_mut().zip(z) {
        *a = b * s;
    }
    n
}

/// `dz = s·dc + z · (1 − n²) / ((1 + n²)² n) · (z·dc)` with `s = n / (1 + n²)`.
fn squash_backward(dz: &mut [f32], dc: &[f32], z: &[f32]) {
    let n2: f32 = z.iter().map(|v| v * v).sum();
    let n = n2.sqrt();
    if n < 1e-12 {
        dz.iter_mut().zip(dc).for_each(|(a, b)| *a = b * n);
        return;
    }
    let s = n / (1.0 + n2);
    let zdc: f32 = z.iter().zip(dc).map(|(a, b)| a * b).sum();
    let c = (1.0 - n2) / ((1.0 + n2) * (1.0 + n2) * n) * zdc;
    for ((a, &g), &zv) in dz.iter_mut().zip(dc).zip(z) {
        *a = s * g + c * zv;
    }
}

impl MindTwoTower {
    pub fn new(spec: MindSpec, item_bags: Vec<ItemBags>, rng: &mut Rng) -> Result<Self, String> {
        if spec.interests == 0 || spec.routing_iters == 0 || spec.dim == 0 {
            return Err("mind needs interests, routing_iters and dim > 0".into());
        }
        if item_bags.len() != spec.item_features.len() {
            return Err(format!("{} item features but {} bag lists", spec.item_features.len(), item_bags.len()));
        }
        let d = spec.dim;
        let table = |rows: usize, dim: usize, rng: &mut Rng| Embedding::new(rows, dim, 1.0 / (dim as f32).sqrt(), rng);
        let item_emb = Embedding::for_items(spec.items, d, 1.0 / (d as f32).sqrt(), spec.item_hash, rng);
        let user_feat_emb = spec.user_features.iter().map(|f| table(f.rows, f.dim, rng)).collect();
        let item_feat_emb = spec.item_features.iter().map(|f| table(f.rows, f.dim, rng)).collect();
        let bilinear = (0..d * d).map(|_| rng.normal() / (d as f32).sqrt()).collect();
        let widths: Vec<usize> = spec.hidden.iter().copied().chain([spec.out_dim()]).collect();
        let mlp = Mlp::new(spec.mlp_input(), &widths, rng);
        let mut r = Rng::new(spec.routing_seed);
        let routing_init = (0..spec.interests * spec.max_seq_len).map(|_| r.normal()).collect();
        Ok(MindTwoTower { spec, item_emb, user_feat_emb, item_feat_emb, item_bags, bilinear, mlp, routing_init })
    }

    /// Dynamic routing for one user: fills `w` `[K × L]`, `z` and `caps` `[K × d]`.
    /// `logits` is scratch space of `K × L` values.
    #[allow(clippy::too_many_arguments)]
    fn route(
        &self,
        uhat: &[f32],
        len: usize,
        active: usize,
        w: &mut [f32],
        z: &mut [f32],
        caps: &mut [f32],
        logits: &mut [f32],
    ) {
        let (l, d) = (self.spec.max_seq_len, self.spec.dim);
        w.fill(0.0);
        z.fill(0.0);
        caps.fill(0.0);
        logits.fill(0.0);
        if len == 0 {
            return;
        }
        for i in 0..active {
            logits[i * l..i * l + len].copy_from_slice(&self.routing_init[i * l..i * l + len]);
        }
        for it in 0..self.spec.routing_iters {
            for j in 0..len {
                let max = (0..active).map(|i| logits[i * l + j]).fold(f32::NEG_INFINITY, f32::max);
                let sum: f32 = (0..active).map(|i| (logits[i * l + j] - max).exp()).sum();
                for i in 0..active {
                    w[i * l + j] = (logits[i * l + j] - max).exp() / sum;
                }
            }
            for i in 0..active {
                let zi = &mut z[i * d..(i + 1) * d];
                zi.fill(0.0);
                for j in 0..len {
                    let wij = w[i * l + j];
                    for (a, u) in zi.iter_mut().zip(&uhat[j * d..(j + 1) * d]) {
                        *a += wij * u;
                    }
                }
                squash(&mut caps[i * d..(i + 1) * d], &z[i * d..(i + 1) * d]);
            }
            if it + 1 < self.spec.routing_iters {
                for i in 0..active {
                    let c = &caps[i * d..(i + 1) * d];
                    for j in 0..len {
                        logits[i * l + j] += c.iter().zip(&uhat[j * d..(j + 1) * d]).map(|(a, b)| a * b).sum::<f32>();
                    }
                }
            }
        }
    }
}

impl Tower for MindTwoTower {
    type UserActs = UserActs;
    type ItemActs = ItemActs;

    fn out_dim(&self) -> usize {
        self.spec.out_dim()
    }
    fn interests(&self) -> usize {
        self.spec.interests
    }
    fn active_interests<'a>(&self, acts: &'a UserActs) -> Option<&'a [usize]> {
        Some(&acts.active)
    }
    crate::tower::spec_shapes!();

    fn user_forward(&self, batch: &UserBatch, acts: &mut UserActs) {
        let (n, k, l, d) = (batch.n, self.spec.interests, self.spec.max_seq_len, self.spec.dim);
        // Gather history embeddings (zeros at padding) and map them: Û = E·S.
        acts.e.clear();
        acts.e.resize(n * l * d, 0.0);
        for b in 0..n {
            for j in 0..batch.hist_len[b] as usize {
                let id = batch.hist[b * l + j];
                acts.e[(b * l + j) * d..(b * l + j + 1) * d].copy_from_slice(self.item_emb.row(id));
            }
        }
        acts.uhat.resize(n * l * d, 0.0);
        matmul(n * l, d, d, &acts.e, Layout::Normal, &self.bilinear, Layout::Normal, &mut acts.uhat, false);
        acts.active.clear();
        acts.active.extend(batch.hist_len[..n].iter().map(|&len| self.spec.active_for(len as usize)));
        acts.w.resize(n * k * l, 0.0);
        acts.z.resize(n * k * d, 0.0);
        let win = self.spec.mlp_input();
        acts.x.resize(n * k * win, 0.0);
        let nf = self.spec.user_features.len();
        acts.w
            .par_chunks_mut(k * l)
            .zip(acts.z.par_chunks_mut(k * d))
            .zip(acts.x.par_chunks_mut(k * win))
            .enumerate()
            .for_each_init(
                || (vec![0.0f32; k * d], vec![0.0f32; k * l]),
                |(caps, logits), (b, ((w, z), x))| {
                    self.route(
                        &acts.uhat[b * l * d..(b + 1) * l * d],
                        batch.hist_len[b] as usize,
                        acts.active[b],
                        w,
                        z,
                        caps,
                        logits,
                    );
                    for i in 0..k {
                        let row = &mut x[i * win..(i + 1) * win];
                        row[..d].copy_from_slice(&caps[i * d..(i + 1) * d]);
                        let mut off = d;
                        for (f, t) in self.user_feat_emb.iter().enumerate() {
                            row[off..off + t.dim].copy_from_slice(t.row(batch.feats[b * nf + f]));
                            off += t.dim;
                        }
                    }
                },
            );
        let out_d = self.spec.out_dim();
        let zmlp = self.mlp.forward_with(&acts.x, n * k, &mut acts.mlp, batch.dropout);
        acts.out.resize(n * k * out_d, 0.0);
        acts.norms.resize(n * k, 0.0);
        l2norm_forward(&mut acts.out, &mut acts.norms, zmlp, out_d);
        for (b, &a) in acts.active.iter().enumerate() {
            let (head, tail) = acts.out[b * k * out_d..(b + 1) * k * out_d].split_at_mut(out_d);
            for slot in tail.chunks_exact_mut(out_d).skip(a.saturating_sub(1)) {
                slot.copy_from_slice(head);
            }
        }
    }

    fn user_out<'a>(&self, acts: &'a UserActs) -> &'a [f32] {
        &acts.out
    }

    fn user_backward(&self, batch: &UserBatch, acts: &mut UserActs, dout: &[f32], grads: &mut Grads) {
        let (n, k, l, d) = (batch.n, self.spec.interests, self.spec.max_seq_len, self.spec.dim);
        let out_d = self.spec.out_dim();
        // Copies of interest 0 in unused slots pass their gradient back to interest 0.
        acts.dout.clear();
        acts.dout.extend_from_slice(&dout[..n * k * out_d]);
        for (b, &a) in acts.active.iter().enumerate() {
            let rows = &mut acts.dout[b * k * out_d..(b + 1) * k * out_d];
            for i in a.max(1)..k {
                for t in 0..out_d {
                    rows[t] += rows[i * out_d + t];
                    rows[i * out_d + t] = 0.0;
                }
            }
        }
        acts.dz_out.resize(n * k * out_d, 0.0);
        l2norm_backward(&mut acts.dz_out, &acts.dout, &acts.out, &acts.norms, out_d);
        let mlp_dense = 2 * self.mlp.layers.len();
        let dx = self.mlp.backward(&acts.x, n * k, &mut acts.mlp, &acts.dz_out, &mut grads.dense[1..1 + mlp_dense]);
        let win = self.spec.mlp_input();
        let nf = self.spec.user_features.len();
        for b in 0..n {
            for i in 0..k {
                let row = &dx[(b * k + i) * win..(b * k + i + 1) * win];
                let mut off = d;
                for f in 0..nf {
                    let id = batch.feats[b * nf + f];
                    let fd = self.user_feat_emb[f].dim;
                    if id != 0 {
                        grads.tables[1 + f].add(id, 1.0, &row[off..off + fd]);
                    }
                    off += fd;
                }
            }
        }
        // Capsules → routing sums → mapped behaviours (coupling weights held fixed).
        acts.duhat.clear();
        acts.duhat.resize(n * l * d, 0.0);
        let (w, z, active) = (&acts.w, &acts.z, &acts.active);
        acts.duhat.par_chunks_mut(l * d).enumerate().for_each_init(
            || vec![0.0f32; d],
            |dz, (b, duhat)| {
                let len = batch.hist_len[b] as usize;
                for i in 0..active[b] {
                    let r = b * k + i;
                    squash_backward(dz, &dx[r * win..r * win + d], &z[r * d..(r + 1) * d]);
                    for j in 0..len {
                        let wij = w[r * l + j];
                        for (a, g) in duhat[j * d..(j + 1) * d].iter_mut().zip(dz.iter()) {
                            *a += wij * g;
                        }
                    }
                }
            },
        );
        matmul(d, n * l, d, &acts.e, Layout::Transposed, &acts.duhat, Layout::Normal, &mut grads.dense[0], true);
        acts.de.resize(n * l * d, 0.0);
        matmul(n * l, d, d, &acts.duhat, Layout::Normal, &self.bilinear, Layout::Transposed, &mut acts.de, false);
        for b in 0..n {
            for j in 0..batch.hist_len[b] as usize {
                let id = batch.hist[b * l + j];
                if id != 0 {
                    grads.tables[0].add(id, 1.0, &acts.de[(b * l + j) * d..(b * l + j + 1) * d]);
                }
            }
        }
    }

    fn item_forward(&self, ids: &[u32], acts: &mut ItemActs) {
        pool_item_inputs(&self.item_emb, &self.item_feat_emb, &self.item_bags, ids, &mut acts.raw);
        let d = self.spec.out_dim();
        acts.out.resize(ids.len() * d, 0.0);
        acts.norms.resize(ids.len(), 0.0);
        l2norm_forward(&mut acts.out, &mut acts.norms, &acts.raw, d);
    }

    fn item_out<'a>(&self, acts: &'a ItemActs) -> &'a [f32] {
        &acts.out
    }

    fn item_vector_of(&self, id: Option<u32>, features: &[&[u32]]) -> Option<Vec<f32>> {
        if self.item_feat_emb.is_empty() {
            return None;
        }
        let raw = pool_given_item(&self.item_emb, &self.item_feat_emb, self.spec.out_dim(), id, features);
        Some(normalized(&raw))
    }

    fn item_backward(&self, ids: &[u32], acts: &mut ItemActs, dout: &[f32], grads: &mut Grads) {
        let d = self.spec.out_dim();
        acts.draw.resize(ids.len() * d, 0.0);
        l2norm_backward(&mut acts.draw, dout, &acts.out, &acts.norms, d);
        let feat0 = 1 + self.user_feat_emb.len();
        scatter_item_input_grads(
            &self.item_feat_emb,
            &self.item_bags,
            ids,
            &acts.draw,
            self.spec.dim,
            d,
            &mut grads.tables,
            feat0,
        );
    }

    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>) {
        let mut t = vec![&mut self.item_emb];
        t.extend(self.user_feat_emb.iter_mut());
        t.extend(self.item_feat_emb.iter_mut());
        let mut dense = vec![&mut self.bilinear];
        dense.extend(self.mlp.dense_mut());
        (t, dense)
    }

    fn item_row_tables_mut(&mut self) -> Vec<&mut Embedding> {
        vec![&mut self.item_emb]
    }

    fn new_grads(&self) -> Grads {
        let mut t = vec![&self.item_emb];
        t.extend(self.user_feat_emb.iter());
        t.extend(self.item_feat_emb.iter());
        let mut dense = vec![self.bilinear.len()];
        dense.extend(self.mlp.dense_sizes());
        Grads::for_params(&t, &dense)
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let e = table_tensor;
        let mut out = vec![e("item_emb".into(), &self.item_emb)];
        for (f, t) in self.spec.user_features.iter().zip(&self.user_feat_emb) {
            out.push(e(format!("user_feat.{}", f.name), t));
        }
        for (f, t) in self.spec.item_features.iter().zip(&self.item_feat_emb) {
            out.push(e(format!("item_feat.{}", f.name), t));
        }
        out.push(("bilinear".into(), vec![self.spec.dim, self.spec.dim], &self.bilinear[..]));
        out.extend(self.mlp.tensors("mlp"));
        out
    }

    fn index_tensors(&self) -> Vec<(String, &[u32])> {
        bag_tensors(&self.spec.item_features, &self.item_bags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(dynamic_k: bool) -> (MindTwoTower, UserBatch) {
        let spec = MindSpec {
            items: 7,
            dim: 3,
            max_seq_len: 5,
            interests: 3,
            dynamic_k,
            routing_iters: 3,
            routing_seed: 1,
            user_features: vec![CategoricalSpec { name: "g".into(), rows: 3, dim: 2 }],
            item_features: vec![CategoricalSpec { name: "genres".into(), rows: 3, dim: 2 }],
            hidden: vec![6],
            item_hash: None,
        };
        let bags = vec![ItemBags { offsets: vec![0, 0, 1, 2, 2, 3, 3, 4], keys: vec![1, 2, 1, 2] }];
        let m = MindTwoTower::new(spec, bags, &mut Rng::new(5)).unwrap();
        let mut batch = UserBatch::default();
        batch.reset(3, 5, 1);
        batch.hist.copy_from_slice(&[1, 2, 3, 4, 5, 6, 2, 0, 0, 0, 3, 0, 0, 0, 0]);
        batch.hist_len.copy_from_slice(&[5, 2, 1]);
        batch.feats.copy_from_slice(&[1, 2, 0]);
        (m, batch)
    }

    #[test]
    fn a_mind_item_is_embedded_from_given_features_as_from_its_own() {
        let (m, _) = tiny(false);
        crate::tower::testing::check_item_vector_of(&m, &m.item_bags);
    }

    #[test]
    fn interests_have_the_right_shape_and_unit_length() {
        for dynamic in [false, true] {
            let (m, batch) = tiny(dynamic);
            let mut acts = UserActs::default();
            m.user_forward(&batch, &mut acts);
            let d = m.out_dim();
            assert_eq!(m.user_out(&acts).len(), batch.n * m.interests() * d);
            for v in m.user_out(&acts).chunks(d) {
                let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
                assert!((norm - 1.0).abs() < 1e-5, "{norm}");
            }
            let want: Vec<usize> = if dynamic { vec![2, 1, 1] } else { vec![3, 3, 3] };
            assert_eq!(acts.active, want);
            if dynamic {
                // User 1 has one interest: its slots 1 and 2 repeat its interest 0.
                let user1 = &m.user_out(&acts)[3 * d..6 * d];
                assert_eq!(&user1[d..2 * d], &user1[..d]);
                assert_eq!(&user1[2 * d..], &user1[..d]);
            }
        }
    }

    #[test]
    fn squash_gradient_matches_finite_differences() {
        let z = [0.3f32, -1.2, 0.7];
        let r = [0.5f32, 0.1, -0.9];
        let f = |z: &[f32]| {
            let mut c = [0.0f32; 3];
            squash(&mut c, z);
            c.iter().zip(&r).map(|(a, b)| a * b).sum::<f32>()
        };
        let mut dz = [0.0f32; 3];
        squash_backward(&mut dz, &r, &z);
        for i in 0..3 {
            let (mut up, mut down) = (z, z);
            up[i] += 1e-3;
            down[i] -= 1e-3;
            let num = (f(&up) - f(&down)) / 2e-3;
            assert!((num - dz[i]).abs() < 1e-3, "{i}: {num} vs {}", dz[i]);
        }
    }

    /// With the coupling weights frozen at their forward values, the analytic gradient is exact;
    /// finite differences re-run the routing, so they match only where the weights barely move.
    /// One routing iteration makes the weights independent of the parameters, so the check is exact.
    /// A small step keeps the differences from crossing a ReLU kink.
    #[test]
    fn gradients_match_finite_differences_with_one_routing_iteration() {
        let (mut m, batch) = tiny(false);
        m.spec.routing_iters = 1;
        crate::tower::testing::check_gradients(&mut m, &batch, &[2, 5, 6], 1e-3, 3e-2);
        let dropped = crate::tower::ID_DROPPED;
        crate::tower::testing::check_gradients(&mut m, &batch, &[2 | dropped, 5, 6 | dropped], 1e-3, 3e-2);
    }
}
