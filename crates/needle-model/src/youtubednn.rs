//! YouTubeDNN two-tower model.
//!
//! User tower: mean of the history items' embeddings (the same table the item tower uses) ‖
//! categorical user features ‖ example age → MLP (ReLU between layers, linear last) → L2 norm.
//! Item tower: item embedding (‖ mean of a multi-valued item feature such as genres) → L2 norm.

use crate::embedding::{bag_mean_backward, bag_mean_forward, Embedding, SparseGrad};
use crate::layers::{
    l2norm_backward, l2norm_forward, linear_backward, linear_forward, relu_backward, relu_forward,
};
use crate::rng::Rng;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One categorical input: its name, table rows (vocabulary size incl. padding) and width.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CategoricalSpec {
    pub name: String,
    pub rows: usize,
    pub dim: usize,
}

/// Everything that fixes the shapes of a [`YoutubeDnn`]; saved with the model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TowerSpec {
    /// Item table rows, including the padding row 0.
    pub items: usize,
    /// Width of the item id embedding.
    pub dim: usize,
    /// Longest history the user tower reads (newest items kept).
    pub max_seq_len: usize,
    pub user_features: Vec<CategoricalSpec>,
    /// A multi-valued item feature (e.g. genres) pooled into the item vector.
    pub item_feature: Option<CategoricalSpec>,
    /// Hidden widths of the user MLP; the last layer's width is [`TowerSpec::out_dim`].
    pub hidden: Vec<usize>,
    pub example_age: bool,
}

impl TowerSpec {
    /// Width of both towers' output vectors.
    pub fn out_dim(&self) -> usize {
        self.dim + self.item_feature.as_ref().map_or(0, |f| f.dim)
    }

    /// Width of the user MLP input.
    pub fn input_dim(&self) -> usize {
        self.dim
            + self.user_features.iter().map(|f| f.dim).sum::<usize>()
            + usize::from(self.example_age)
    }

    fn layer_dims(&self) -> Vec<(usize, usize)> {
        let mut dims = Vec::new();
        let mut i = self.input_dim();
        for &h in self.hidden.iter().chain(std::iter::once(&self.out_dim())) {
            dims.push((i, h));
            i = h;
        }
        dims
    }
}

/// One fully connected layer, `w` stored `[in × out]`.
#[derive(Clone, Debug)]
pub struct Dense {
    pub inp: usize,
    pub out: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

/// Item → values of the pooled item feature, as CSR over item rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemBags {
    pub offsets: Vec<u32>,
    pub keys: Vec<u32>,
}

impl ItemBags {
    pub fn of(&self, item: u32) -> &[u32] {
        let i = item as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) => &self.keys[a as usize..b as usize],
            _ => &[],
        }
    }
}

#[derive(Clone, Debug)]
pub struct YoutubeDnn {
    pub spec: TowerSpec,
    pub item_emb: Embedding,
    pub user_feat_emb: Vec<Embedding>,
    pub item_feat_emb: Option<Embedding>,
    pub item_bags: ItemBags,
    pub layers: Vec<Dense>,
}

/// A batch of users as contiguous buffers: histories padded to `max_seq_len`.
#[derive(Clone, Debug, Default)]
pub struct UserBatch {
    pub n: usize,
    /// `[n × max_seq_len]` item rows, newest last; only the first `hist_len[b]` count.
    pub hist: Vec<u32>,
    pub hist_len: Vec<u32>,
    /// `[n × user_features]` feature value rows (0 = unknown).
    pub feats: Vec<u32>,
    /// Example age in [0, 1]; 0 at serving time.
    pub age: Vec<f32>,
}

impl UserBatch {
    /// Empties the batch, keeping its buffers, and sizes it for `n` users.
    pub fn reset(&mut self, n: usize, max_seq_len: usize, n_feats: usize) {
        self.n = n;
        self.hist.clear();
        self.hist.resize(n * max_seq_len, 0);
        self.hist_len.clear();
        self.hist_len.resize(n, 0);
        self.feats.clear();
        self.feats.resize(n * n_feats, 0);
        self.age.clear();
        self.age.resize(n, 0.0);
    }
}

/// Activations of the user tower kept for the backward pass.
#[derive(Default)]
pub struct UserActs {
    x0: Vec<f32>,
    zs: Vec<Vec<f32>>,
    norms: Vec<f32>,
    /// `[n × out_dim]` unit-length user vectors.
    pub out: Vec<f32>,
    dz: Vec<f32>,
    dz_prev: Vec<f32>,
}

/// Activations of the item tower for one list of item rows.
#[derive(Default)]
pub struct ItemActs {
    raw: Vec<f32>,
    norms: Vec<f32>,
    /// `[m × out_dim]` unit-length item vectors.
    pub out: Vec<f32>,
    draw: Vec<f32>,
}

/// Gradients of every parameter; embedding gradients are sparse.
pub struct Grads {
    pub item: SparseGrad,
    pub user_feats: Vec<SparseGrad>,
    pub item_feat: Option<SparseGrad>,
    pub layers: Vec<(Vec<f32>, Vec<f32>)>,
}

impl Grads {
    pub fn zero(&mut self) {
        self.item.clear();
        self.user_feats.iter_mut().for_each(SparseGrad::clear);
        if let Some(g) = &mut self.item_feat {
            g.clear();
        }
        for (w, b) in &mut self.layers {
            w.fill(0.0);
            b.fill(0.0);
        }
    }
}

const ROWS_PER_TASK: usize = 128;

impl YoutubeDnn {
    /// Fresh parameters: embeddings N(0, 0.1²)… scaled by width, He-uniform hidden layers.
    pub fn new(spec: TowerSpec, item_bags: ItemBags, rng: &mut Rng) -> Self {
        let item_emb = Embedding::new(spec.items, spec.dim, 1.0 / (spec.dim as f32).sqrt(), rng);
        let user_feat_emb = spec
            .user_features
            .iter()
            .map(|f| Embedding::new(f.rows, f.dim, 1.0 / (f.dim as f32).sqrt(), rng))
            .collect();
        let item_feat_emb = spec
            .item_feature
            .as_ref()
            .map(|f| Embedding::new(f.rows, f.dim, 1.0 / (f.dim as f32).sqrt(), rng));
        let layers = spec
            .layer_dims()
            .into_iter()
            .map(|(i, o)| {
                let a = (6.0 / i as f32).sqrt();
                Dense {
                    inp: i,
                    out: o,
                    w: (0..i * o)
                        .map(|_| (rng.uniform() * 2.0 - 1.0) * a)
                        .collect(),
                    b: vec![0.0; o],
                }
            })
            .collect();
        YoutubeDnn {
            spec,
            item_emb,
            user_feat_emb,
            item_feat_emb,
            item_bags,
            layers,
        }
    }

    pub fn new_grads(&self) -> Grads {
        Grads {
            item: SparseGrad::new(self.item_emb.rows, self.item_emb.dim),
            user_feats: self
                .user_feat_emb
                .iter()
                .map(|e| SparseGrad::new(e.rows, e.dim))
                .collect(),
            item_feat: self
                .item_feat_emb
                .as_ref()
                .map(|e| SparseGrad::new(e.rows, e.dim)),
            layers: self
                .layers
                .iter()
                .map(|l| (vec![0.0; l.w.len()], vec![0.0; l.b.len()]))
                .collect(),
        }
    }

    /// Builds the MLP input rows: `[mean history ‖ features ‖ age]`.
    fn assemble_input(&self, batch: &UserBatch, x0: &mut [f32]) {
        let w = self.spec.input_dim();
        let l = self.spec.max_seq_len;
        let nf = self.spec.user_features.len();
        x0[..batch.n * w]
            .par_chunks_mut(w * ROWS_PER_TASK)
            .enumerate()
            .for_each(|(ci, chunk)| {
                let r0 = ci * ROWS_PER_TASK;
                let rows = chunk.len() / w;
                bag_mean_forward(
                    chunk,
                    w,
                    &self.item_emb,
                    &batch.hist[r0 * l..(r0 + rows) * l],
                    &batch.hist_len[r0..r0 + rows],
                    l,
                );
                for k in 0..rows {
                    let row = &mut chunk[k * w..(k + 1) * w];
                    let mut off = self.spec.dim;
                    for (f, table) in self.user_feat_emb.iter().enumerate() {
                        let id = batch.feats[(r0 + k) * nf + f];
                        row[off..off + table.dim].copy_from_slice(table.row(id));
                        off += table.dim;
                    }
                    if self.spec.example_age {
                        row[off] = batch.age[r0 + k];
                    }
                }
            });
    }

    /// User tower forward pass; the result is in `acts.out`.
    pub fn user_forward(&self, batch: &UserBatch, acts: &mut UserActs) {
        let n = batch.n;
        acts.x0.resize(n * self.spec.input_dim(), 0.0);
        self.assemble_input(batch, &mut acts.x0);
        acts.zs.resize_with(self.layers.len(), Vec::new);
        for (li, layer) in self.layers.iter().enumerate() {
            let (prev, rest) = acts.zs.split_at_mut(li);
            let x = if li == 0 { &acts.x0 } else { &prev[li - 1] };
            let z = &mut rest[0];
            z.resize(n * layer.out, 0.0);
            linear_forward(z, x, &layer.w, &layer.b, n, layer.inp, layer.out);
            if li + 1 < self.layers.len() {
                relu_forward(z);
            }
        }
        let d = self.spec.out_dim();
        acts.out.resize(n * d, 0.0);
        acts.norms.resize(n, 0.0);
        l2norm_forward(
            &mut acts.out,
            &mut acts.norms,
            acts.zs.last().expect("at least one layer"),
            d,
        );
    }

    /// Accumulates the user tower's gradients given `dout = dL/d(acts.out)`.
    pub fn user_backward(
        &self,
        batch: &UserBatch,
        acts: &mut UserActs,
        dout: &[f32],
        grads: &mut Grads,
    ) {
        let n = batch.n;
        let d = self.spec.out_dim();
        acts.dz.resize(n * d, 0.0);
        l2norm_backward(&mut acts.dz, dout, &acts.out, &acts.norms, d);
        for li in (0..self.layers.len()).rev() {
            let layer = &self.layers[li];
            let x = if li == 0 { &acts.x0 } else { &acts.zs[li - 1] };
            acts.dz_prev.resize(n * layer.inp, 0.0);
            let (gw, gb) = &mut grads.layers[li];
            linear_backward(
                Some(&mut acts.dz_prev),
                gw,
                gb,
                &acts.dz,
                x,
                &layer.w,
                n,
                layer.inp,
                layer.out,
            );
            if li > 0 {
                relu_backward(&mut acts.dz_prev, &acts.zs[li - 1]);
            }
            std::mem::swap(&mut acts.dz, &mut acts.dz_prev);
        }
        // acts.dz now holds dL/dx0.
        let w = self.spec.input_dim();
        let l = self.spec.max_seq_len;
        bag_mean_backward(
            &mut grads.item,
            &acts.dz,
            w,
            &batch.hist,
            &batch.hist_len[..n],
            l,
        );
        let nf = self.spec.user_features.len();
        let mut off = self.spec.dim;
        for (f, g) in grads.user_feats.iter_mut().enumerate() {
            let fd = g.dim;
            for b in 0..n {
                let id = batch.feats[b * nf + f];
                if id != 0 {
                    g.add(id, 1.0, &acts.dz[b * w + off..b * w + off + fd]);
                }
            }
            off += fd;
        }
    }

    /// Item tower forward pass over item rows `ids`; the result is in `acts.out`.
    pub fn item_forward(&self, ids: &[u32], acts: &mut ItemActs) {
        let m = ids.len();
        let d = self.spec.out_dim();
        let de = self.spec.dim;
        acts.raw.resize(m * d, 0.0);
        acts.raw
            .par_chunks_mut(d * ROWS_PER_TASK)
            .zip(ids.par_chunks(ROWS_PER_TASK))
            .for_each(|(raw, ids)| {
                for (row, &id) in raw.chunks_exact_mut(d).zip(ids) {
                    row[..de].copy_from_slice(self.item_emb.row(id));
                    if let Some(fe) = &self.item_feat_emb {
                        let out = &mut row[de..];
                        out.fill(0.0);
                        let bag = self.item_bags.of(id);
                        for &k in bag {
                            for (a, v) in out.iter_mut().zip(fe.row(k)) {
                                *a += v;
                            }
                        }
                        if !bag.is_empty() {
                            let inv = 1.0 / bag.len() as f32;
                            out.iter_mut().for_each(|a| *a *= inv);
                        }
                    }
                }
            });
        acts.out.resize(m * d, 0.0);
        acts.norms.resize(m, 0.0);
        l2norm_forward(&mut acts.out, &mut acts.norms, &acts.raw, d);
    }

    /// Accumulates the item tower's gradients given `dout = dL/d(acts.out)`.
    pub fn item_backward(&self, ids: &[u32], acts: &mut ItemActs, dout: &[f32], grads: &mut Grads) {
        let m = ids.len();
        let d = self.spec.out_dim();
        let de = self.spec.dim;
        acts.draw.resize(m * d, 0.0);
        l2norm_backward(&mut acts.draw, dout, &acts.out, &acts.norms, d);
        for (row, &id) in acts.draw.chunks_exact(d).zip(ids) {
            if id == 0 {
                continue;
            }
            grads.item.add(id, 1.0, &row[..de]);
            if let Some(g) = &mut grads.item_feat {
                let bag = self.item_bags.of(id);
                if !bag.is_empty() {
                    let inv = 1.0 / bag.len() as f32;
                    for &k in bag {
                        g.add(k, inv, &row[de..]);
                    }
                }
            }
        }
    }

    /// Unit-length vectors of every item row (row 0, padding, included), `[items × out_dim]`.
    pub fn all_item_vectors(&self) -> Vec<f32> {
        let ids: Vec<u32> = (0..self.spec.items as u32).collect();
        let mut acts = ItemActs::default();
        self.item_forward(&ids, &mut acts);
        acts.out
    }

    /// Named views of every parameter, in a fixed order (for checkpoints and optimizers).
    pub fn tensors(&self) -> Vec<(String, Vec<usize>, &[f32])> {
        let mut t = vec![(
            "item_emb".to_string(),
            vec![self.item_emb.rows, self.item_emb.dim],
            &self.item_emb.weights[..],
        )];
        for (f, e) in self.spec.user_features.iter().zip(&self.user_feat_emb) {
            t.push((
                format!("user_feat.{}", f.name),
                vec![e.rows, e.dim],
                &e.weights[..],
            ));
        }
        if let (Some(f), Some(e)) = (&self.spec.item_feature, &self.item_feat_emb) {
            t.push((
                format!("item_feat.{}", f.name),
                vec![e.rows, e.dim],
                &e.weights[..],
            ));
        }
        for (i, l) in self.layers.iter().enumerate() {
            t.push((format!("mlp.{i}.weight"), vec![l.inp, l.out], &l.w[..]));
            t.push((format!("mlp.{i}.bias"), vec![l.out], &l.b[..]));
        }
        t
    }

    /// Mutable views in the same order as [`YoutubeDnn::tensors`].
    pub fn tensors_mut(&mut self) -> Vec<&mut Vec<f32>> {
        let mut t = vec![&mut self.item_emb.weights];
        t.extend(self.user_feat_emb.iter_mut().map(|e| &mut e.weights));
        if let Some(e) = &mut self.item_feat_emb {
            t.push(&mut e.weights);
        }
        for l in &mut self.layers {
            t.push(&mut l.w);
            t.push(&mut l.b);
        }
        t
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> (YoutubeDnn, UserBatch, Vec<u32>) {
        let spec = TowerSpec {
            items: 6,
            dim: 3,
            max_seq_len: 4,
            user_features: vec![CategoricalSpec {
                name: "g".into(),
                rows: 3,
                dim: 2,
            }],
            item_feature: Some(CategoricalSpec {
                name: "genres".into(),
                rows: 4,
                dim: 2,
            }),
            hidden: vec![7],
            example_age: true,
        };
        let bags = ItemBags {
            offsets: vec![0, 0, 1, 3, 3, 4, 6],
            keys: vec![1, 2, 3, 1, 1, 3],
        };
        // Finite differences are meaningless where a ReLU input lies within the step of zero;
        // with this seed every hidden pre-activation is clear of the kink (seed 11 is not).
        let model = YoutubeDnn::new(spec, bags, &mut Rng::new(5));
        let mut batch = UserBatch::default();
        batch.reset(3, 4, 1);
        batch
            .hist
            .copy_from_slice(&[1, 2, 3, 0, 5, 5, 0, 0, 4, 0, 0, 0]);
        batch.hist_len.copy_from_slice(&[3, 2, 1]);
        batch.feats.copy_from_slice(&[1, 2, 0]);
        batch.age.copy_from_slice(&[0.1, 0.5, 0.9]);
        (model, batch, vec![2, 3, 5, 1])
    }

    /// loss = Σ r ⊙ user vectors + Σ q ⊙ item vectors; returns (loss, grads).
    fn loss_and_grads(
        model: &YoutubeDnn,
        batch: &UserBatch,
        items: &[u32],
        r: &[f32],
        q: &[f32],
    ) -> (f64, Grads) {
        let (mut ua, mut ia) = (UserActs::default(), ItemActs::default());
        model.user_forward(batch, &mut ua);
        model.item_forward(items, &mut ia);
        let loss = ua
            .out
            .iter()
            .zip(r)
            .chain(ia.out.iter().zip(q))
            .map(|(a, b)| (a * b) as f64)
            .sum();
        let mut g = model.new_grads();
        model.user_backward(batch, &mut ua, r, &mut g);
        model.item_backward(items, &mut ia, q, &mut g);
        (loss, g)
    }

    #[test]
    fn whole_model_gradients_match_finite_differences() {
        let (mut model, batch, items) = tiny();
        let d = model.spec.out_dim();
        let mut rng = Rng::new(12);
        let r: Vec<f32> = (0..batch.n * d).map(|_| rng.normal()).collect();
        let q: Vec<f32> = (0..items.len() * d).map(|_| rng.normal()).collect();
        let (_, g) = loss_and_grads(&model, &batch, &items, &r, &q);
        // Dense view of each sparse gradient, in the order of `tensors_mut`.
        let dense = |sg: &SparseGrad, rows: usize| {
            let mut v = vec![0.0f32; rows * sg.dim];
            for (s, &row) in sg.rows.iter().enumerate() {
                v[row as usize * sg.dim..(row as usize + 1) * sg.dim]
                    .copy_from_slice(&sg.grads[s * sg.dim..(s + 1) * sg.dim]);
            }
            v
        };
        let mut analytic = vec![
            dense(&g.item, 6),
            dense(&g.user_feats[0], 3),
            dense(g.item_feat.as_ref().unwrap(), 4),
        ];
        for (w, b) in &g.layers {
            analytic.push(w.clone());
            analytic.push(b.clone());
        }
        for (t, analytic_t) in analytic.iter().enumerate() {
            for (i, &ana) in analytic_t.iter().enumerate() {
                let orig = model.tensors_mut()[t][i];
                model.tensors_mut()[t][i] = orig + 1e-2;
                let up = loss_and_grads(&model, &batch, &items, &r, &q).0;
                model.tensors_mut()[t][i] = orig - 1e-2;
                let down = loss_and_grads(&model, &batch, &items, &r, &q).0;
                model.tensors_mut()[t][i] = orig;
                let num = ((up - down) / 2e-2) as f32;
                // Row 0 is padding: it gets no gradient by design, whatever its value.
                let padding_row = t < 3 && i < [3, 2, 2][t];
                if padding_row {
                    assert_eq!(ana, 0.0);
                    continue;
                }
                assert!(
                    (num - ana).abs() < 2e-2 * (1.0 + num.abs()),
                    "tensor {t}[{i}]: numeric {num} vs analytic {ana}"
                );
            }
        }
    }

    #[test]
    fn outputs_are_unit_length() {
        let (model, batch, items) = tiny();
        let mut ua = UserActs::default();
        model.user_forward(&batch, &mut ua);
        let d = model.spec.out_dim();
        for row in ua
            .out
            .chunks(d)
            .chain(model.all_item_vectors().chunks(d).skip(1))
        {
            let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!((n - 1.0).abs() < 1e-5, "{n}");
        }
        let _ = items;
    }
}
