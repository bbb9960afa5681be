//! A factorization machine split into two towers.
//!
//! An FM scores `y = w₀ + Σᵢ wᵢxᵢ + ½ Σ_f ((Σᵢ v_{i,f} xᵢ)² − Σᵢ v_{i,f}² xᵢ²)` over all user and
//! item features. The terms that involve only user features are the same for every item, so for
//! retrieval they can be dropped, and what remains is an inner product:
//!
//! - user vector `[1 ; Σ_u v_u x_u]`
//! - item vector `[Σ_t w_t x_t + ½ Σ_f ((Σ_t v_{t,f} x_t)² − Σ_t v_{t,f}² x_t²) ; Σ_t v_t x_t]`
//!
//! User features are one-hot (`x = 1`); the optional history bag and every pooled item feature
//! spread a weight of 1 over their values (`x = 1/len`). The item id is one-hot.

use crate::deep::{bag_tensors, CategoricalSpec, ItemBags};
use crate::embedding::{Embedding, RowHash};
use crate::rng::Rng;
use crate::tower::{table_tensor, Grads, NamedTensor, Tower, UserBatch};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FmSpec {
    /// Item table rows, padding row 0 included.
    pub items: usize,
    /// Factor width `k`; the tower outputs are `k + 1` wide.
    pub k: usize,
    pub max_seq_len: usize,
    /// Include the user's recent items as a multi-hot user feature.
    pub history: bool,
    pub user_features: Vec<CategoricalSpec>,
    pub item_features: Vec<CategoricalSpec>,
    /// Hashing of the catalogue's tail into shared id rows (`[model] hash_buckets`).
    #[serde(default)]
    pub item_hash: Option<RowHash>,
}

#[derive(Clone, Debug)]
pub struct FmTwoTower {
    pub spec: FmSpec,
    /// Item id factors and first-order weights.
    pub item_v: Embedding,
    pub item_w: Embedding,
    /// Factors of items as history entries (a user-side feature, so its own table).
    pub hist_v: Option<Embedding>,
    pub user_v: Vec<Embedding>,
    pub feat_v: Vec<Embedding>,
    pub feat_w: Vec<Embedding>,
    pub item_bags: Vec<ItemBags>,
}

#[derive(Default)]
pub struct UserActs {
    out: Vec<f32>,
}

#[derive(Default)]
pub struct ItemActs {
    out: Vec<f32>,
}

/// Initial factor scale: small, so second-order terms start near zero.
const INIT: f32 = 0.05;

impl FmTwoTower {
    /// One item's `[linear + pairwise ; Σ v x]` from its id row (`None`: left out) and the
    /// value rows of each item feature (`bag(f)`); `q` is scratch of width `k`.
    fn item_row_vector<'b>(&self, row: &mut [f32], id: Option<u32>, bag: impl Fn(usize) -> &'b [u32], q: &mut [f32]) {
        let (first, s) = row.split_at_mut(1);
        let mut linear = 0.0;
        match id {
            None => {
                s.fill(0.0);
                q.fill(0.0);
            }
            Some(id) => {
                linear = self.item_w.row(id)[0];
                for (t, v) in self.item_v.row(id).iter().enumerate() {
                    s[t] = *v;
                    q[t] = v * v;
                }
            }
        }
        for (f, (fv, fw)) in self.feat_v.iter().zip(&self.feat_w).enumerate() {
            let bag = bag(f);
            if bag.is_empty() {
                continue;
            }
            let x = 1.0 / bag.len() as f32;
            for &key in bag {
                linear += x * fw.row(key)[0];
                for (t, v) in fv.row(key).iter().enumerate() {
                    s[t] += x * v;
                    q[t] += x * x * v * v;
                }
            }
        }
        let pair: f32 = s.iter().zip(q.iter()).map(|(a, b)| a * a - b).sum();
        first[0] = linear + 0.5 * pair;
    }

    pub fn new(spec: FmSpec, item_bags: Vec<ItemBags>, rng: &mut Rng) -> Result<Self, String> {
        if item_bags.len() != spec.item_features.len() {
            return Err(format!("{} item features but {} bag lists", spec.item_features.len(), item_bags.len()));
        }
        if spec.k == 0 {
            return Err("fm needs k > 0".into());
        }
        let k = spec.k;
        Ok(FmTwoTower {
            item_v: Embedding::for_items(spec.items, k, INIT, spec.item_hash, rng),
            item_w: Embedding::for_items(spec.items, 1, 0.0, spec.item_hash, rng),
            hist_v: spec.history.then(|| Embedding::for_items(spec.items, k, INIT, spec.item_hash, rng)),
            user_v: spec.user_features.iter().map(|f| Embedding::new(f.rows, k, INIT, rng)).collect(),
            feat_v: spec.item_features.iter().map(|f| Embedding::new(f.rows, k, INIT, rng)).collect(),
            feat_w: spec.item_features.iter().map(|f| Embedding::new(f.rows, 1, 0.0, rng)).collect(),
            spec,
            item_bags,
        })
    }

    /// Gradient table indices: item_v, item_w, hist_v?, user_v…, feat_v…, feat_w….
    fn grad_index(&self) -> (usize, usize, usize, usize) {
        let hist = 2;
        let user0 = hist + usize::from(self.hist_v.is_some());
        let fv0 = user0 + self.user_v.len();
        let fw0 = fv0 + self.feat_v.len();
        (hist, user0, fv0, fw0)
    }
}

impl Tower for FmTwoTower {
    type UserActs = UserActs;
    type ItemActs = ItemActs;

    fn out_dim(&self) -> usize {
        self.spec.k + 1
    }
    crate::tower::spec_shapes!();

    fn user_forward(&self, batch: &UserBatch, acts: &mut UserActs) {
        let (k, d, l, nf) = (self.spec.k, self.spec.k + 1, self.spec.max_seq_len, self.user_v.len());
        acts.out.clear();
        acts.out.resize(batch.n * d, 0.0);
        for (b, row) in acts.out.chunks_exact_mut(d).enumerate() {
            row[0] = 1.0;
            let s = &mut row[1..];
            for (f, table) in self.user_v.iter().enumerate() {
                for (a, v) in s.iter_mut().zip(table.row(batch.feats[b * nf + f])) {
                    *a += v;
                }
            }
            let len = batch.hist_len[b] as usize;
            if let (Some(h), true) = (&self.hist_v, len > 0) {
                let x = 1.0 / len as f32;
                for &id in &batch.hist[b * l..b * l + len] {
                    for (a, v) in s.iter_mut().zip(h.row(id)) {
                        *a += x * v;
                    }
                }
            }
            debug_assert_eq!(s.len(), k);
        }
    }

    fn user_out<'a>(&self, acts: &'a UserActs) -> &'a [f32] {
        &acts.out
    }

    fn user_backward(&self, batch: &UserBatch, _acts: &mut UserActs, dout: &[f32], grads: &mut Grads) {
        let (d, l, nf) = (self.spec.k + 1, self.spec.max_seq_len, self.user_v.len());
        let (hist, user0, _, _) = self.grad_index();
        for b in 0..batch.n {
            let g = &dout[b * d + 1..(b + 1) * d];
            for f in 0..nf {
                let id = batch.feats[b * nf + f];
                if id != 0 {
                    grads.tables[user0 + f].add(id, 1.0, g);
                }
            }
            let len = batch.hist_len[b] as usize;
            if self.hist_v.is_some() && len > 0 {
                let x = 1.0 / len as f32;
                for &id in &batch.hist[b * l..b * l + len] {
                    if id != 0 {
                        grads.tables[hist].add(id, x, g);
                    }
                }
            }
        }
    }

    fn item_forward(&self, ids: &[u32], acts: &mut ItemActs) {
        let d = self.spec.k + 1;
        acts.out.clear();
        acts.out.resize(ids.len() * d, 0.0);
        let mut q = vec![0.0f32; self.spec.k];
        for (row, &id) in acts.out.chunks_exact_mut(d).zip(ids) {
            let (id, dropped) = crate::tower::item_row(id);
            self.item_row_vector(row, (!dropped).then_some(id), |f| self.item_bags[f].of(id), &mut q);
        }
    }

    fn item_vector_of(&self, id: Option<u32>, features: &[&[u32]]) -> Option<Vec<f32>> {
        if self.feat_v.is_empty() {
            return None;
        }
        let mut out = vec![0.0; self.spec.k + 1];
        let mut q = vec![0.0; self.spec.k];
        self.item_row_vector(&mut out, id, |f| features.get(f).copied().unwrap_or(&[]), &mut q);
        Some(out)
    }

    fn item_out<'a>(&self, acts: &'a ItemActs) -> &'a [f32] {
        &acts.out
    }

    fn item_backward(&self, ids: &[u32], acts: &mut ItemActs, dout: &[f32], grads: &mut Grads) {
        let (k, d) = (self.spec.k, self.spec.k + 1);
        let (_, _, fv0, fw0) = self.grad_index();
        let mut gv = vec![0.0f32; k];
        for ((row, g), &id) in acts.out.chunks_exact(d).zip(dout.chunks_exact(d)).zip(ids) {
            let (id, dropped) = crate::tower::item_row(id);
            if id == 0 {
                continue;
            }
            let (g0, gs) = (g[0], &g[1..]);
            let s = &row[1..];
            // ∂/∂v_t = x_t · (g0 · (S − v_t x_t) + g_S); ∂/∂w_t = x_t · g0.
            if !dropped {
                grads.tables[1].add(id, g0, &[1.0]);
                for (t, v) in self.item_v.row(id).iter().enumerate() {
                    gv[t] = g0 * (s[t] - v) + gs[t];
                }
                grads.tables[0].add(id, 1.0, &gv);
            }
            for (f, (fv, bags)) in self.feat_v.iter().zip(&self.item_bags).enumerate() {
                let bag = bags.of(id);
                if bag.is_empty() {
                    continue;
                }
                let x = 1.0 / bag.len() as f32;
                for &key in bag {
                    for (t, v) in fv.row(key).iter().enumerate() {
                        gv[t] = x * (g0 * (s[t] - x * v) + gs[t]);
                    }
                    grads.tables[fv0 + f].add(key, 1.0, &gv);
                    grads.tables[fw0 + f].add(key, x * g0, &[1.0]);
                }
            }
        }
    }

    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>) {
        let mut t = vec![&mut self.item_v, &mut self.item_w];
        t.extend(self.hist_v.as_mut());
        t.extend(self.user_v.iter_mut());
        t.extend(self.feat_v.iter_mut());
        t.extend(self.feat_w.iter_mut());
        (t, Vec::new())
    }

    fn item_row_tables_mut(&mut self) -> Vec<&mut Embedding> {
        let mut t = vec![&mut self.item_v, &mut self.item_w];
        t.extend(self.hist_v.as_mut());
        t
    }

    fn new_grads(&self) -> Grads {
        let mut t = vec![&self.item_v, &self.item_w];
        t.extend(self.hist_v.as_ref());
        t.extend(self.user_v.iter());
        t.extend(self.feat_v.iter());
        t.extend(self.feat_w.iter());
        Grads::for_params(&t, &[])
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let e = table_tensor;
        let mut out = vec![e("item_v".into(), &self.item_v), e("item_w".into(), &self.item_w)];
        if let Some(h) = &self.hist_v {
            out.push(e("hist_v".into(), h));
        }
        for (f, t) in self.spec.user_features.iter().zip(&self.user_v) {
            out.push(e(format!("user_v.{}", f.name), t));
        }
        for (f, t) in self.spec.item_features.iter().zip(&self.feat_v) {
            out.push(e(format!("item_feat_v.{}", f.name), t));
        }
        for (f, t) in self.spec.item_features.iter().zip(&self.feat_w) {
            out.push(e(format!("item_feat_w.{}", f.name), t));
        }
        out
    }

    fn index_tensors(&self) -> Vec<(String, &[u32])> {
        bag_tensors(&self.spec.item_features, &self.item_bags)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(seed: u64) -> (FmTwoTower, UserBatch, Vec<u32>) {
        let spec = FmSpec {
            items: 6,
            k: 3,
            max_seq_len: 4,
            history: true,
            user_features: vec![
                CategoricalSpec { name: "g".into(), rows: 3, dim: 3 },
                CategoricalSpec { name: "age".into(), rows: 4, dim: 3 },
            ],
            item_features: vec![CategoricalSpec { name: "genres".into(), rows: 4, dim: 3 }],
            item_hash: None,
        };
        let bags = vec![ItemBags { offsets: vec![0, 0, 1, 3, 3, 4, 6], keys: vec![1, 2, 3, 1, 1, 3] }];
        let mut m = FmTwoTower::new(spec, bags, &mut Rng::new(seed)).unwrap();
        // Non-zero first-order weights, so every term of the identity is exercised.
        let mut rng = Rng::new(seed + 1);
        for w in [&mut m.item_w.weights, &mut m.feat_w[0].weights] {
            w.iter_mut().skip(1).for_each(|x| *x = rng.normal());
        }
        let (u0, u1) = m.user_v.split_at_mut(1);
        for t in [&mut m.item_v, &mut m.feat_v[0], &mut u0[0], &mut u1[0]] {
            t.weights.iter_mut().skip(3).for_each(|x| *x = rng.normal());
        }
        let mut batch = UserBatch::default();
        batch.reset(2, 4, 2);
        batch.hist.copy_from_slice(&[1, 2, 3, 0, 5, 0, 0, 0]);
        batch.hist_len.copy_from_slice(&[3, 1]);
        batch.feats.copy_from_slice(&[1, 3, 2, 0]);
        (m, batch, vec![2, 3, 5, 1])
    }

    /// The FM identity: full FM score − user-only terms = ⟨user vector, item vector⟩.
    #[test]
    fn full_fm_minus_user_terms_equals_the_tower_dot_product() {
        let (m, batch, items) = tiny(3);
        let mut rng = Rng::new(9);
        let w0 = rng.normal();
        // First-order weights of user-side features (user-only terms, absent from the towers).
        let user_w: Vec<Vec<f32>> = m.user_v.iter().map(|t| (0..t.rows).map(|_| rng.normal()).collect()).collect();
        let hist_w: Vec<f32> = (0..m.spec.items).map(|_| rng.normal()).collect();
        let (mut ua, mut ia) = (UserActs::default(), ItemActs::default());
        m.user_forward(&batch, &mut ua);
        m.item_forward(&items, &mut ia);
        let d = m.spec.k + 1;
        for b in 0..batch.n {
            // Every active feature of the pair as (first-order weight, factors, x).
            let mut user_side: Vec<(f32, Vec<f32>, f32)> = Vec::new();
            for (f, (w, v)) in user_w.iter().zip(&m.user_v).enumerate() {
                let id = batch.feats[b * 2 + f];
                user_side.push((w[id as usize], v.row(id).to_vec(), 1.0));
            }
            let len = batch.hist_len[b] as usize;
            for &id in &batch.hist[b * 4..b * 4 + len] {
                user_side.push((hist_w[id as usize], m.hist_v.as_ref().unwrap().row(id).to_vec(), 1.0 / len as f32));
            }
            for (i, &item) in items.iter().enumerate() {
                let mut item_side = vec![(m.item_w.row(item)[0], m.item_v.row(item).to_vec(), 1.0)];
                let bag = m.item_bags[0].of(item);
                for &key in bag {
                    item_side.push((m.feat_w[0].row(key)[0], m.feat_v[0].row(key).to_vec(), 1.0 / bag.len() as f32));
                }
                let fm = |feats: &[(f32, Vec<f32>, f32)]| -> f64 {
                    let mut y = w0 as f64;
                    for (w, _, x) in feats {
                        y += (*w * *x) as f64;
                    }
                    for f in 0..3 {
                        let s: f64 = feats.iter().map(|(_, v, x)| (v[f] * x) as f64).sum();
                        let q: f64 = feats.iter().map(|(_, v, x)| ((v[f] * x) as f64).powi(2)).sum();
                        y += 0.5 * (s * s - q);
                    }
                    y
                };
                let all: Vec<_> = user_side.iter().cloned().chain(item_side.iter().cloned()).collect();
                let want = fm(&all) - fm(&user_side);
                let got: f32 =
                    ua.out[b * d..(b + 1) * d].iter().zip(&ia.out[i * d..(i + 1) * d]).map(|(a, c)| a * c).sum();
                assert!(
                    (want as f32 - got).abs() < 1e-4 * (1.0 + want.abs() as f32),
                    "user {b} item {item}: {want} vs {got}"
                );
            }
        }
    }

    #[test]
    fn an_fm_item_is_embedded_from_given_features_as_from_its_own() {
        let (m, _, _) = tiny(3);
        crate::tower::testing::check_item_vector_of(&m, &m.item_bags);
    }

    #[test]
    fn fm_gradients_match_finite_differences() {
        let (mut m, batch, items) = tiny(4);
        crate::tower::testing::check_gradients(&mut m, &batch, &items, 1e-2, 2e-2);
        let dropped: Vec<u32> = items.iter().map(|&i| i | crate::tower::ID_DROPPED).collect();
        crate::tower::testing::check_gradients(&mut m, &batch, &dropped, 1e-2, 2e-2);
    }
}
