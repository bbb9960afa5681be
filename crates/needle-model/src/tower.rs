//! What every two-tower model offers the trainer, evaluation and serving: a user tower over a
//! batch of users, an item tower over item rows, their backward passes, and its parameters as
//! embedding tables (updated sparsely) and dense tensors.

use crate::embedding::{Embedding, SparseGrad};

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

/// Gradients of a model, in the order of [`Tower::params_mut`].
pub struct Grads {
    pub tables: Vec<SparseGrad>,
    pub dense: Vec<Vec<f32>>,
}

impl Grads {
    /// Zero-sized gradients shaped like `tables` and `dense`.
    pub fn for_params(tables: &[&Embedding], dense: &[usize]) -> Self {
        Grads {
            tables: tables.iter().map(|e| SparseGrad::new(e.rows, e.dim)).collect(),
            dense: dense.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    pub fn zero(&mut self) {
        self.tables.iter_mut().for_each(SparseGrad::clear);
        self.dense.iter_mut().for_each(|g| g.fill(0.0));
    }
}

/// A named parameter tensor, for checkpoints.
pub type NamedTensor<'a> = (String, Vec<usize>, &'a [f32]);

/// A two-tower model with explicit forward and backward passes.
///
/// User outputs are `[n × interests × out_dim]` (one vector per interest; most models have one);
/// item outputs are `[m × out_dim]`. A user–item score is the inner product (the best interest's,
/// for multi-interest models).
pub trait Tower: Send + Sync {
    type UserActs: Default + Send;
    type ItemActs: Default + Send;

    fn out_dim(&self) -> usize;
    /// Vectors per user.
    fn interests(&self) -> usize {
        1
    }
    /// Per user, how many of its interest vectors are its own (the rest repeat interest 0);
    /// `None` when every user uses all of them.
    fn active_interests<'a>(&self, _acts: &'a Self::UserActs) -> Option<&'a [usize]> {
        None
    }
    /// Item table rows, padding row 0 included.
    fn item_rows(&self) -> usize;
    fn max_seq_len(&self) -> usize;
    fn n_user_features(&self) -> usize;

    fn user_forward(&self, batch: &UserBatch, acts: &mut Self::UserActs);
    fn user_out<'a>(&self, acts: &'a Self::UserActs) -> &'a [f32];
    /// Accumulates gradients given `dout = dL/d(user_out)`.
    fn user_backward(&self, batch: &UserBatch, acts: &mut Self::UserActs, dout: &[f32], grads: &mut Grads);

    fn item_forward(&self, ids: &[u32], acts: &mut Self::ItemActs);
    fn item_out<'a>(&self, acts: &'a Self::ItemActs) -> &'a [f32];
    /// Accumulates gradients given `dout = dL/d(item_out)`.
    fn item_backward(&self, ids: &[u32], acts: &mut Self::ItemActs, dout: &[f32], grads: &mut Grads);

    /// Embedding tables (updated row-wise) and dense tensors (updated whole).
    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>);
    fn new_grads(&self) -> Grads;

    /// Every parameter with a stable name and shape (tables first, then dense, in the orders above).
    fn tensors(&self) -> Vec<NamedTensor<'_>>;
    /// Integer side data saved with the parameters (e.g. item → genre bags).
    fn index_tensors(&self) -> Vec<(String, &[u32])> {
        Vec::new()
    }

    /// Vectors of every item row (row 0 included), `[item_rows × out_dim]`.
    fn all_item_vectors(&self) -> Vec<f32> {
        let ids: Vec<u32> = (0..self.item_rows() as u32).collect();
        let mut acts = Self::ItemActs::default();
        self.item_forward(&ids, &mut acts);
        self.item_out(&acts).to_vec()
    }
}

/// Mutable views of every parameter in [`Tower::tensors`] order.
pub fn tensors_mut<T: Tower>(model: &mut T) -> Vec<&mut Vec<f32>> {
    let (tables, dense) = model.params_mut();
    tables.into_iter().map(|e| &mut e.weights).chain(dense).collect()
}
