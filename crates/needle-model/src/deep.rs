//! Deep two-tower models: YouTubeDNN and DSSM share this implementation.
//!
//! User tower: `[mean of history embeddings ‖ the newest `recent` items' embeddings ‖ categorical
//! user features ‖ example age]` → MLP
//! (ReLU between layers, linear last) → L2 norm. Item tower: `[item id embedding ‖ mean of each
//! item feature's embeddings]` → optional MLP → L2 norm.
//!
//! - YouTubeDNN: the history reads the item table itself (`history = shared`), no item MLP.
//! - DSSM: two independent towers — the history has its own table (`history = own`) and the
//!   item side has its own MLP.

use crate::embedding::{bag_mean_backward, bag_mean_forward, Embedding, RowHash};
use crate::layers::{l2norm_backward, l2norm_forward};
use crate::mlp::{Mlp, MlpActs};
use crate::rng::Rng;
use crate::tower::{table_tensor, Grads, NamedTensor, Tower, UserBatch};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

/// One categorical input: its name, table rows (vocabulary size incl. padding) and width.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CategoricalSpec {
    pub name: String,
    pub rows: usize,
    pub dim: usize,
}

/// Where the user tower's history embeddings come from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum HistoryMode {
    /// The item tower's own id table (YouTubeDNN).
    Shared,
    /// A separate table, so the towers share no parameters (DSSM).
    Own,
    /// No history input.
    Off,
}

/// Everything that fixes the shapes of a [`DeepTwoTower`]; saved with the model.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct DeepSpec {
    /// Item table rows, including the padding row 0.
    pub items: usize,
    /// Width of the item id (and history) embeddings.
    pub dim: usize,
    /// Longest history the user tower reads (newest items kept).
    pub max_seq_len: usize,
    pub history: HistoryMode,
    pub user_features: Vec<CategoricalSpec>,
    /// Item features pooled (mean) into the item tower's input, e.g. genres, year.
    pub item_features: Vec<CategoricalSpec>,
    /// Hidden widths of the user MLP.
    pub hidden: Vec<usize>,
    /// Hidden widths of the item MLP; `None` means no item MLP (the raw item input is the vector).
    pub item_hidden: Option<Vec<usize>>,
    /// Width of both towers' outputs.
    pub out_dim: usize,
    pub example_age: bool,
    /// The newest this many history items also enter the user MLP one by one (newest first, zero
    /// when the history is shorter), so the tower sees order, not only the mean.
    #[serde(default)]
    pub recent: usize,
    /// Hashing of the catalogue's tail into shared id rows (`[model] hash_buckets`).
    #[serde(default)]
    pub item_hash: Option<RowHash>,
}

impl DeepSpec {
    /// Width of the item tower's input.
    pub fn item_input_dim(&self) -> usize {
        self.dim + self.item_features.iter().map(|f| f.dim).sum::<usize>()
    }

    /// Width of the user MLP input.
    pub fn user_input_dim(&self) -> usize {
        let hist = if self.history == HistoryMode::Off { 0 } else { self.dim * (1 + self.recent) };
        hist + self.user_features.iter().map(|f| f.dim).sum::<usize>() + usize::from(self.example_age)
    }

    /// Checks the shapes fit together.
    pub fn validate(&self) -> Result<(), String> {
        if self.item_hidden.is_none() && self.out_dim != self.item_input_dim() {
            return Err(format!(
                "without an item MLP the output width must equal the item input width ({}), not {}",
                self.item_input_dim(),
                self.out_dim
            ));
        }
        if self.recent > self.max_seq_len {
            return Err(format!("recent ({}) cannot exceed max_seq_len ({})", self.recent, self.max_seq_len));
        }
        if self.user_input_dim() == 0 {
            return Err("the user tower has no input (no history, no features, no example age)".into());
        }
        Ok(())
    }
}

/// Item → feature-value bags are shared by every tower that reads item features.
pub use crate::tower::ItemBags;

#[derive(Clone, Debug)]
pub struct DeepTwoTower {
    pub spec: DeepSpec,
    pub item_emb: Embedding,
    /// Only with [`HistoryMode::Own`].
    pub hist_emb: Option<Embedding>,
    pub user_feat_emb: Vec<Embedding>,
    pub item_feat_emb: Vec<Embedding>,
    /// One per item feature.
    pub item_bags: Vec<ItemBags>,
    pub user_mlp: Mlp,
    pub item_mlp: Option<Mlp>,
}

#[derive(Default)]
pub struct UserActs {
    x0: Vec<f32>,
    mlp: MlpActs,
    norms: Vec<f32>,
    out: Vec<f32>,
    dz: Vec<f32>,
}

#[derive(Default)]
pub struct ItemActs {
    raw: Vec<f32>,
    mlp: MlpActs,
    norms: Vec<f32>,
    out: Vec<f32>,
    dz: Vec<f32>,
}

const ROWS_PER_TASK: usize = 128;

fn new_table(rows: usize, dim: usize, rng: &mut Rng) -> Embedding {
    Embedding::new(rows, dim, 1.0 / (dim as f32).sqrt(), rng)
}

impl DeepTwoTower {
    pub fn new(spec: DeepSpec, item_bags: Vec<ItemBags>, rng: &mut Rng) -> Result<Self, String> {
        spec.validate()?;
        if item_bags.len() != spec.item_features.len() {
            return Err(format!("{} item features but {} bag lists", spec.item_features.len(), item_bags.len()));
        }
        let scale = 1.0 / (spec.dim as f32).sqrt();
        let item_emb = Embedding::for_items(spec.items, spec.dim, scale, spec.item_hash, rng);
        let hist_emb = (spec.history == HistoryMode::Own)
            .then(|| Embedding::for_items(spec.items, spec.dim, scale, spec.item_hash, rng));
        let user_feat_emb = spec.user_features.iter().map(|f| new_table(f.rows, f.dim, rng)).collect();
        let item_feat_emb = spec.item_features.iter().map(|f| new_table(f.rows, f.dim, rng)).collect();
        let widths: Vec<usize> = spec.hidden.iter().copied().chain([spec.out_dim]).collect();
        let user_mlp = Mlp::new(spec.user_input_dim(), &widths, rng);
        let item_mlp = spec.item_hidden.as_ref().map(|h| {
            let widths: Vec<usize> = h.iter().copied().chain([spec.out_dim]).collect();
            Mlp::new(spec.item_input_dim(), &widths, rng)
        });
        Ok(DeepTwoTower { spec, item_emb, hist_emb, user_feat_emb, item_feat_emb, item_bags, user_mlp, item_mlp })
    }

    fn hist_table(&self) -> Option<&Embedding> {
        match self.spec.history {
            HistoryMode::Shared => Some(&self.item_emb),
            HistoryMode::Own => self.hist_emb.as_ref(),
            HistoryMode::Off => None,
        }
    }

    /// Index of the history table among the gradient tables.
    fn hist_grad(&self) -> usize {
        if self.spec.history == HistoryMode::Own {
            1
        } else {
            0
        }
    }

    fn first_user_feat_grad(&self) -> usize {
        1 + usize::from(self.hist_emb.is_some())
    }

    /// Builds the MLP input rows: `[mean history ‖ recent items ‖ features ‖ age]`.
    fn assemble_input(&self, batch: &UserBatch, x0: &mut [f32]) {
        let w = self.spec.user_input_dim();
        let l = self.spec.max_seq_len;
        let nf = self.spec.user_features.len();
        let hist = self.hist_table();
        x0[..batch.n * w].par_chunks_mut(w * ROWS_PER_TASK).enumerate().for_each(|(ci, chunk)| {
            let r0 = ci * ROWS_PER_TASK;
            let rows = chunk.len() / w;
            let mut off = 0;
            if let Some(table) = hist {
                bag_mean_forward(
                    chunk,
                    w,
                    table,
                    &batch.hist[r0 * l..(r0 + rows) * l],
                    &batch.hist_len[r0..r0 + rows],
                    l,
                );
                off = table.dim;
                for k in 0..rows {
                    let len = batch.hist_len[r0 + k] as usize;
                    let items = &batch.hist[(r0 + k) * l..(r0 + k) * l + len];
                    for j in 0..self.spec.recent {
                        let slot = &mut chunk[k * w + off + j * table.dim..k * w + off + (j + 1) * table.dim];
                        match len.checked_sub(j + 1) {
                            Some(i) => slot.copy_from_slice(table.row(items[i])),
                            None => slot.fill(0.0),
                        }
                    }
                }
                off += self.spec.recent * table.dim;
            }
            for k in 0..rows {
                let row = &mut chunk[k * w..(k + 1) * w];
                let mut o = off;
                for (f, table) in self.user_feat_emb.iter().enumerate() {
                    let id = batch.feats[(r0 + k) * nf + f];
                    row[o..o + table.dim].copy_from_slice(table.row(id));
                    o += table.dim;
                }
                if self.spec.example_age {
                    row[o] = batch.age[r0 + k];
                }
            }
        });
    }
}

/// The item → feature-value bags as named u32 tensors, saved with a model's parameters.
pub fn bag_tensors<'a>(features: &[CategoricalSpec], bags: &'a [ItemBags]) -> Vec<(String, &'a [u32])> {
    let mut out = Vec::new();
    for (f, b) in features.iter().zip(bags) {
        out.push((format!("item_bags.{}.offsets", f.name), &b.offsets[..]));
        out.push((format!("item_bags.{}.keys", f.name), &b.keys[..]));
    }
    out
}

/// Item tower input rows `[item id embedding ‖ mean of each item feature's embeddings]`.
pub fn pool_item_inputs(
    item_emb: &Embedding,
    feat_emb: &[Embedding],
    bags: &[ItemBags],
    ids: &[u32],
    raw: &mut Vec<f32>,
) {
    let de = item_emb.dim;
    let di = de + feat_emb.iter().map(|e| e.dim).sum::<usize>();
    raw.resize(ids.len() * di, 0.0);
    raw.par_chunks_mut(di * ROWS_PER_TASK).zip(ids.par_chunks(ROWS_PER_TASK)).for_each(|(raw, ids)| {
        for (row, &id) in raw.chunks_exact_mut(di).zip(ids) {
            let (id, dropped) = crate::tower::item_row(id);
            let id_row = (!dropped).then(|| item_emb.row(id));
            pool_item_row(row, id_row, feat_emb, |f| bags[f].of(id));
        }
    });
}

/// `v / ‖v‖`, as the towers' output layer computes it.
pub fn normalized(v: &[f32]) -> Vec<f32> {
    let (mut out, mut norm) = (vec![0.0; v.len()], [0.0]);
    l2norm_forward(&mut out, &mut norm, v, v.len());
    out
}

/// The item tower input row of one item given by its id row (`None`: none) and the value rows
/// of each item feature, `width` wide.
pub fn pool_given_item(
    item_emb: &Embedding,
    feat_emb: &[Embedding],
    width: usize,
    id: Option<u32>,
    features: &[&[u32]],
) -> Vec<f32> {
    let mut raw = vec![0.0; width];
    pool_item_row(&mut raw, id.map(|r| item_emb.row(r)), feat_emb, |f| features.get(f).copied().unwrap_or(&[]));
    raw
}

/// One item tower input row: the id embedding (zeros without one), then the mean embedding of
/// each item feature's values (`bag(f)`: value rows of feature `f`).
pub fn pool_item_row<'b>(
    row: &mut [f32],
    id_row: Option<&[f32]>,
    feat_emb: &[Embedding],
    bag: impl Fn(usize) -> &'b [u32],
) {
    let de = row.len() - feat_emb.iter().map(|e| e.dim).sum::<usize>();
    match id_row {
        Some(v) => row[..de].copy_from_slice(v),
        None => row[..de].fill(0.0),
    }
    let mut off = de;
    for (f, fe) in feat_emb.iter().enumerate() {
        let out = &mut row[off..off + fe.dim];
        out.fill(0.0);
        let bag = bag(f);
        for &k in bag {
            for (a, v) in out.iter_mut().zip(fe.row(k)) {
                *a += v;
            }
        }
        if !bag.is_empty() {
            let inv = 1.0 / bag.len() as f32;
            out.iter_mut().for_each(|a| *a *= inv);
        }
        off += fe.dim;
    }
}

/// Gradient of [`pool_item_inputs`]: table 0 gets the id part, tables `feat0..` the features.
#[allow(clippy::too_many_arguments)]
pub fn scatter_item_input_grads(
    feat_emb: &[Embedding],
    bags: &[ItemBags],
    ids: &[u32],
    draw: &[f32],
    de: usize,
    di: usize,
    tables: &mut [crate::embedding::SparseGrad],
    feat0: usize,
) {
    let (item_grad, rest) = tables.split_at_mut(1);
    for (row, &id) in draw.chunks_exact(di).zip(ids) {
        let (id, dropped) = crate::tower::item_row(id);
        if id == 0 {
            continue;
        }
        if !dropped {
            item_grad[0].add(id, 1.0, &row[..de]);
        }
        let mut off = de;
        for (g, (fe, bags)) in feat_emb.iter().zip(bags).enumerate() {
            let bag = bags.of(id);
            if !bag.is_empty() {
                let inv = 1.0 / bag.len() as f32;
                for &k in bag {
                    rest[feat0 - 1 + g].add(k, inv, &row[off..off + fe.dim]);
                }
            }
            off += fe.dim;
        }
    }
}

impl Tower for DeepTwoTower {
    type UserActs = UserActs;
    type ItemActs = ItemActs;

    fn out_dim(&self) -> usize {
        self.spec.out_dim
    }
    crate::tower::spec_shapes!();

    fn user_forward(&self, batch: &UserBatch, acts: &mut UserActs) {
        let n = batch.n;
        acts.x0.resize(n * self.spec.user_input_dim(), 0.0);
        self.assemble_input(batch, &mut acts.x0);
        let z = self.user_mlp.forward_with(&acts.x0, n, &mut acts.mlp, batch.dropout);
        let d = self.spec.out_dim;
        acts.out.resize(n * d, 0.0);
        acts.norms.resize(n, 0.0);
        l2norm_forward(&mut acts.out, &mut acts.norms, z, d);
    }

    fn user_out<'a>(&self, acts: &'a UserActs) -> &'a [f32] {
        &acts.out
    }

    fn user_backward(&self, batch: &UserBatch, acts: &mut UserActs, dout: &[f32], grads: &mut Grads) {
        let n = batch.n;
        let d = self.spec.out_dim;
        acts.dz.resize(n * d, 0.0);
        l2norm_backward(&mut acts.dz, dout, &acts.out, &acts.norms, d);
        let n_user_dense = 2 * self.user_mlp.layers.len();
        let dx0 = self.user_mlp.backward(&acts.x0, n, &mut acts.mlp, &acts.dz, &mut grads.dense[..n_user_dense]);
        let w = self.spec.user_input_dim();
        let l = self.spec.max_seq_len;
        let mut off = 0;
        if self.spec.history != HistoryMode::Off {
            let g = &mut grads.tables[self.hist_grad()];
            bag_mean_backward(g, dx0, w, &batch.hist, &batch.hist_len[..n], l);
            let d = self.spec.dim;
            for b in 0..n {
                let len = batch.hist_len[b] as usize;
                for j in 0..self.spec.recent.min(len) {
                    let id = batch.hist[b * l + len - 1 - j];
                    if id != 0 {
                        g.add(id, 1.0, &dx0[b * w + d * (1 + j)..b * w + d * (2 + j)]);
                    }
                }
            }
            off = d * (1 + self.spec.recent);
        }
        let nf = self.spec.user_features.len();
        let g0 = self.first_user_feat_grad();
        for f in 0..nf {
            let g = &mut grads.tables[g0 + f];
            let fd = g.dim;
            for b in 0..n {
                let id = batch.feats[b * nf + f];
                if id != 0 {
                    g.add(id, 1.0, &dx0[b * w + off..b * w + off + fd]);
                }
            }
            off += fd;
        }
    }

    fn item_forward(&self, ids: &[u32], acts: &mut ItemActs) {
        let m = ids.len();
        pool_item_inputs(&self.item_emb, &self.item_feat_emb, &self.item_bags, ids, &mut acts.raw);
        let d = self.spec.out_dim;
        let z = match &self.item_mlp {
            Some(mlp) => mlp.forward(&acts.raw, m, &mut acts.mlp),
            None => &acts.raw[..],
        };
        acts.out.resize(m * d, 0.0);
        acts.norms.resize(m, 0.0);
        l2norm_forward(&mut acts.out, &mut acts.norms, z, d);
    }

    fn item_out<'a>(&self, acts: &'a ItemActs) -> &'a [f32] {
        &acts.out
    }

    fn item_vector_of(&self, id: Option<u32>, features: &[&[u32]]) -> Option<Vec<f32>> {
        if self.item_feat_emb.is_empty() {
            return None;
        }
        let raw = pool_given_item(&self.item_emb, &self.item_feat_emb, self.spec.item_input_dim(), id, features);
        let mut acts = MlpActs::default();
        let z = match &self.item_mlp {
            Some(mlp) => mlp.forward(&raw, 1, &mut acts),
            None => &raw[..],
        };
        Some(normalized(z))
    }

    fn item_backward(&self, ids: &[u32], acts: &mut ItemActs, dout: &[f32], grads: &mut Grads) {
        let m = ids.len();
        let d = self.spec.out_dim;
        let di = self.spec.item_input_dim();
        let de = self.spec.dim;
        acts.dz.resize(m * d, 0.0);
        l2norm_backward(&mut acts.dz, dout, &acts.out, &acts.norms, d);
        let n_user_dense = 2 * self.user_mlp.layers.len();
        let draw: &[f32] = match &self.item_mlp {
            Some(mlp) => mlp.backward(&acts.raw, m, &mut acts.mlp, &acts.dz, &mut grads.dense[n_user_dense..]),
            None => &acts.dz,
        };
        let g_feat0 = self.first_user_feat_grad() + self.spec.user_features.len();
        scatter_item_input_grads(&self.item_feat_emb, &self.item_bags, ids, draw, de, di, &mut grads.tables, g_feat0);
    }

    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>) {
        let mut tables = vec![&mut self.item_emb];
        tables.extend(self.hist_emb.as_mut());
        tables.extend(self.user_feat_emb.iter_mut());
        tables.extend(self.item_feat_emb.iter_mut());
        let mut dense: Vec<&mut Vec<f32>> = self.user_mlp.dense_mut().collect();
        if let Some(mlp) = &mut self.item_mlp {
            dense.extend(mlp.dense_mut());
        }
        (tables, dense)
    }

    fn item_row_tables_mut(&mut self) -> Vec<&mut Embedding> {
        let mut t = vec![&mut self.item_emb];
        t.extend(self.hist_emb.as_mut());
        t
    }

    fn new_grads(&self) -> Grads {
        let mut tables = vec![&self.item_emb];
        tables.extend(self.hist_emb.as_ref());
        tables.extend(self.user_feat_emb.iter());
        tables.extend(self.item_feat_emb.iter());
        let mut dense = self.user_mlp.dense_sizes();
        if let Some(mlp) = &self.item_mlp {
            dense.extend(mlp.dense_sizes());
        }
        Grads::for_params(&tables, &dense)
    }

    fn tensors(&self) -> Vec<NamedTensor<'_>> {
        let e = table_tensor;
        let mut out = vec![e("item_emb".into(), &self.item_emb)];
        if let Some(h) = &self.hist_emb {
            out.push(e("hist_emb".into(), h));
        }
        for (f, t) in self.spec.user_features.iter().zip(&self.user_feat_emb) {
            out.push(e(format!("user_feat.{}", f.name), t));
        }
        for (f, t) in self.spec.item_features.iter().zip(&self.item_feat_emb) {
            out.push(e(format!("item_feat.{}", f.name), t));
        }
        out.extend(self.user_mlp.tensors("user_mlp"));
        if let Some(mlp) = &self.item_mlp {
            out.extend(mlp.tensors("item_mlp"));
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

    fn spec(history: HistoryMode, item_hidden: Option<Vec<usize>>) -> DeepSpec {
        let item_features = vec![
            CategoricalSpec { name: "genres".into(), rows: 4, dim: 2 },
            CategoricalSpec { name: "year".into(), rows: 3, dim: 2 },
        ];
        let out_dim = if item_hidden.is_some() { 4 } else { 3 + 4 };
        DeepSpec {
            items: 6,
            dim: 3,
            max_seq_len: 4,
            history,
            user_features: vec![CategoricalSpec { name: "g".into(), rows: 3, dim: 2 }],
            item_features,
            hidden: vec![7],
            item_hidden,
            out_dim,
            example_age: true,
            recent: 0,
            item_hash: None,
        }
    }

    fn tiny(history: HistoryMode, item_hidden: Option<Vec<usize>>, seed: u64) -> (DeepTwoTower, UserBatch, Vec<u32>) {
        let bags = vec![
            ItemBags { offsets: vec![0, 0, 1, 3, 3, 4, 6], keys: vec![1, 2, 3, 1, 1, 3] },
            ItemBags { offsets: vec![0, 0, 1, 2, 3, 4, 5], keys: vec![1, 2, 1, 2, 1] },
        ];
        let model = DeepTwoTower::new(spec(history, item_hidden), bags, &mut Rng::new(seed)).unwrap();
        let mut batch = UserBatch::default();
        batch.reset(3, 4, 1);
        batch.hist.copy_from_slice(&[1, 2, 3, 0, 5, 5, 0, 0, 4, 0, 0, 0]);
        batch.hist_len.copy_from_slice(&[3, 2, 1]);
        batch.feats.copy_from_slice(&[1, 2, 0]);
        batch.age.copy_from_slice(&[0.1, 0.5, 0.9]);
        (model, batch, vec![2, 3, 5, 1])
    }

    fn check_gradients(history: HistoryMode, item_hidden: Option<Vec<usize>>, seed: u64) {
        let (mut model, batch, items) = tiny(history, item_hidden, seed);
        crate::tower::testing::check_gradients(&mut model, &batch, &items, 1e-2, 2e-2);
    }

    // Finite differences are meaningless where a ReLU input lies within the step of zero; the
    // seeds below keep every hidden pre-activation clear of the kink.
    #[test]
    fn youtubednn_gradients_match_finite_differences() {
        check_gradients(HistoryMode::Shared, None, 5);
    }

    #[test]
    fn recent_item_inputs_have_matching_gradients() {
        for (history, item_hidden) in [(HistoryMode::Shared, None), (HistoryMode::Own, Some(vec![5]))] {
            let (mut model, batch, items) = tiny(history, item_hidden.clone(), 5);
            let mut spec = model.spec.clone();
            spec.recent = 2;
            model = DeepTwoTower::new(spec, model.item_bags.clone(), &mut Rng::new(5)).unwrap();
            crate::tower::testing::check_gradients(&mut model, &batch, &items, 1e-2, 2e-2);
        }
    }

    #[test]
    fn recent_items_enter_newest_first_and_pad_with_zeros() {
        let (model, batch, _) = tiny(HistoryMode::Shared, None, 5);
        let mut spec = model.spec.clone();
        spec.recent = 2;
        let model = DeepTwoTower::new(spec, model.item_bags.clone(), &mut Rng::new(5)).unwrap();
        let w = model.spec.user_input_dim();
        let mut x0 = vec![f32::NAN; batch.n * w];
        model.assemble_input(&batch, &mut x0);
        let d = model.spec.dim;
        // User 0's history is [1, 2, 3]: slots hold items 3 then 2. User 2's is [4]: item 4, then zeros.
        assert_eq!(&x0[d..2 * d], model.item_emb.row(3));
        assert_eq!(&x0[2 * d..3 * d], model.item_emb.row(2));
        assert_eq!(&x0[2 * w + d..2 * w + 2 * d], model.item_emb.row(4));
        assert!(x0[2 * w + 2 * d..2 * w + 3 * d].iter().all(|&v| v == 0.0));
        assert!(x0.iter().all(|v| v.is_finite()));
    }

    #[test]
    fn dropout_gradients_match_finite_differences_and_dropout_changes_the_output() {
        for (history, hidden) in [(HistoryMode::Shared, None), (HistoryMode::Own, Some(vec![5]))] {
            let (mut model, mut batch, items) = tiny(history, hidden, 5);
            let mut plain = UserActs::default();
            model.user_forward(&batch, &mut plain);
            batch.dropout = crate::tower::Dropout { input: 0.3, hidden: 0.4, seed: 99 };
            let mut dropped = UserActs::default();
            model.user_forward(&batch, &mut dropped);
            assert!(model.user_out(&plain) != model.user_out(&dropped));
            crate::tower::testing::check_gradients(&mut model, &batch, &items, 1e-2, 2e-2);
        }
    }

    #[test]
    fn dssm_gradients_match_finite_differences() {
        check_gradients(HistoryMode::Own, Some(vec![5]), 5);
    }

    #[test]
    fn hashed_item_rows_get_the_gradients_of_every_item_sharing_them() {
        for history in [HistoryMode::Shared, HistoryMode::Own] {
            let mut s = spec(history, None);
            // Rows 1..3 own their rows, 3..6 share two buckets.
            s.item_hash = Some(RowHash { own: 3, buckets: 2, first_cold: 6 });
            let (small, batch, items) = tiny(history, None, 5);
            let mut model = DeepTwoTower::new(s, small.item_bags.clone(), &mut Rng::new(5)).unwrap();
            assert_eq!(model.item_emb.rows, 5);
            crate::tower::testing::check_gradients(&mut model, &batch, &items, 1e-2, 2e-2);
        }
    }

    // Seed 9 keeps the hidden pre-activations clear of the ReLU kink and the dropped items'
    // item-MLP outputs clear of zero norm.
    #[test]
    fn a_dropped_id_embeds_the_item_from_its_features_alone() {
        use crate::tower::ID_DROPPED;
        for (history, hidden) in [(HistoryMode::Shared, None), (HistoryMode::Own, Some(vec![5]))] {
            let (mut model, batch, _) = tiny(history, hidden, 11);
            let items = [2 | ID_DROPPED, 3, 5 | ID_DROPPED, 1];
            crate::tower::testing::check_gradients(&mut model, &batch, &items, 1e-2, 2e-2);
            let vector = |m: &DeepTwoTower, id: u32| {
                let mut acts = ItemActs::default();
                m.item_forward(&[id], &mut acts);
                m.item_out(&acts).to_vec()
            };
            let mut cleared = model.clone();
            crate::tower::clear_item_rows(&mut cleared, 2);
            assert_eq!(vector(&model, 2 | ID_DROPPED), vector(&cleared, 2));
            assert_ne!(vector(&model, 2 | ID_DROPPED), vector(&model, 2));
        }
    }

    #[test]
    fn an_item_is_embedded_from_given_features_as_from_its_own() {
        for (history, hidden) in [(HistoryMode::Shared, None), (HistoryMode::Own, Some(vec![5]))] {
            let (model, _, _) = tiny(history, hidden, 11);
            crate::tower::testing::check_item_vector_of(&model, &model.item_bags);
            let mut id_only = model.clone();
            id_only.item_feat_emb.clear();
            assert!(id_only.item_vector_of(None, &[]).is_none(), "an id-only tower has no vector for a new item");
        }
    }

    #[test]
    fn outputs_are_unit_length_and_bad_shapes_are_rejected() {
        for (h, ih) in [(HistoryMode::Shared, None), (HistoryMode::Own, Some(vec![5]))] {
            let (model, batch, _) = tiny(h, ih, 3);
            let mut ua = UserActs::default();
            model.user_forward(&batch, &mut ua);
            let d = model.spec.out_dim;
            let mut unit = 0;
            for row in ua.out.chunks(d).chain(model.all_item_vectors().chunks(d).skip(1)) {
                let n: f32 = row.iter().map(|v| v * v).sum::<f32>().sqrt();
                // An all-zero pre-activation (every ReLU dead, zero bias) has no direction and stays zero.
                assert!((n - 1.0).abs() < 1e-5 || n == 0.0, "{n}");
                unit += usize::from(n > 0.0);
            }
            assert!(unit >= 6, "only {unit} of 8 vectors are non-zero");
        }
        let mut bad = spec(HistoryMode::Shared, None);
        bad.out_dim = 5;
        assert!(DeepTwoTower::new(bad, vec![ItemBags::default(); 2], &mut Rng::new(1)).is_err());
    }
}
