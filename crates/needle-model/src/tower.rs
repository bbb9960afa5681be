//! What every two-tower model offers the trainer, evaluation and serving: a user tower over a
//! batch of users, an item tower over item rows, their backward passes, and its parameters as
//! embedding tables (updated sparsely) and dense tensors.

use crate::embedding::{Embedding, SparseGrad};

/// One user's events as every user tower reads them, in training, in offline evaluation and
/// recall, in channels and in serving: [`UserBatch::set_user`] turns them into the tower's input,
/// and nothing else does, so a served answer and an offline one see the same window.
#[derive(Clone, Copy, Debug, Default)]
pub struct UserEvents<'a> {
    /// Item rows, oldest first, in up to two consecutive parts (say, the training events and a
    /// held-out one after them). Row 0 is an item the model has no row for (first seen after
    /// training, or cut from the table); it is left out of the window, as a server leaves out
    /// an id it does not know.
    pub items: [&'a [u32]; 2],
    /// Event times (Unix seconds) parallel to `items`; a part may be empty when times are not
    /// known, and its window slots then hold 0.
    pub times: [&'a [i64]; 2],
    /// Feature value rows in the model's user-feature order (0 = unknown); missing trailing
    /// values read as 0.
    pub features: &'a [u32],
}

impl<'a> UserEvents<'a> {
    /// Events without times, in one part.
    pub fn new(items: &'a [u32], features: &'a [u32]) -> Self {
        UserEvents { items: [items, &[]], times: [&[], &[]], features }
    }

    fn item(&self, i: usize) -> u32 {
        let a = self.items[0];
        if i < a.len() {
            a[i]
        } else {
            self.items[1][i - a.len()]
        }
    }

    /// The time of event `i`; 0 when its part's times are not given (or do not match it).
    fn time(&self, i: usize) -> i64 {
        let n0 = self.items[0].len();
        let (p, j) = if i < n0 { (0, i) } else { (1, i - n0) };
        let times = self.times[p];
        if times.len() == self.items[p].len() {
            times[j]
        } else {
            0
        }
    }

    /// Where the window of the newest `max_seq_len` known items starts, and how many it holds.
    pub fn window(&self, max_seq_len: usize) -> (usize, usize) {
        let total = self.items[0].len() + self.items[1].len();
        let (mut start, mut n) = (total, 0);
        while start > 0 && n < max_seq_len {
            start -= 1;
            if self.item(start) != 0 {
                n += 1;
            }
        }
        (start, n)
    }

    /// The known items of the window, oldest first (row 0 left out), for towers that read no
    /// batch (item-to-item models).
    pub fn known_items(&self, max_seq_len: usize) -> impl Iterator<Item = u32> + '_ {
        let (start, _) = self.window(max_seq_len);
        let total = self.items[0].len() + self.items[1].len();
        (start..total).map(|i| self.item(i)).filter(|&r| r != 0)
    }
}

/// Dropout rates of one forward pass (0 = off) and the seed its masks derive from; the default
/// is off, as at evaluation and serving time.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Dropout {
    /// Share of the input features zeroed.
    pub input: f32,
    /// Share of every hidden layer's units zeroed (after the ReLU).
    pub hidden: f32,
    pub seed: u64,
}

/// A batch of users as contiguous buffers: histories padded to `max_seq_len`.
#[derive(Clone, Debug, Default)]
pub struct UserBatch {
    pub n: usize,
    /// Slots per user in `hist` and `hist_ts`.
    pub max_seq_len: usize,
    /// `[n × max_seq_len]` item rows, newest last; only the first `hist_len[b]` count.
    pub hist: Vec<u32>,
    pub hist_len: Vec<u32>,
    /// `[n × max_seq_len]` event times (Unix seconds) parallel to `hist`, filled only for a
    /// tower that [reads them](Tower::reads_event_times); zeros otherwise.
    pub hist_ts: Vec<i64>,
    /// `[n × user_features]` feature value rows (0 = unknown).
    pub feats: Vec<u32>,
    /// Example age in [0, 1]; 0 at serving time.
    pub age: Vec<f32>,
    /// Dropout in the user tower's MLP: set by training, off after [`UserBatch::reset`].
    pub dropout: Dropout,
    /// Sequential towers: one output per history position (the prediction of the item after
    /// it) instead of one per user. Set by training; off after [`UserBatch::reset`].
    pub all_positions: bool,
}

impl UserBatch {
    /// Empties the batch, keeping its buffers, and sizes it for `n` users.
    pub fn reset(&mut self, n: usize, max_seq_len: usize, n_feats: usize) {
        self.n = n;
        self.max_seq_len = max_seq_len;
        self.hist.clear();
        self.hist.resize(n * max_seq_len, 0);
        self.hist_len.clear();
        self.hist_len.resize(n, 0);
        self.hist_ts.clear();
        self.hist_ts.resize(n * max_seq_len, 0);
        self.feats.clear();
        self.feats.resize(n * n_feats, 0);
        self.age.clear();
        self.age.resize(n, 0.0);
        self.dropout = Dropout::default();
        self.all_positions = false;
    }

    /// Writes user `b`'s input from `events`: the window of the newest `max_seq_len` items the
    /// model knows, oldest first, with their times, and the user's features. Returns the
    /// window's length. Example age is left to the caller (training sets it; it is 0 at
    /// evaluation and serving time).
    pub fn set_user(&mut self, b: usize, events: &UserEvents<'_>) -> usize {
        let l = self.max_seq_len;
        let (hist, ts) = (&mut self.hist[b * l..(b + 1) * l], &mut self.hist_ts[b * l..(b + 1) * l]);
        // The common case, every training window: the newest `l` items are all known, so the
        // window is the tails of the two parts, copied whole.
        let [first, second] = events.items;
        let take = l.min(first.len() + second.len());
        let from_second = take.min(second.len());
        let tails = [&first[first.len() - (take - from_second)..], &second[second.len() - from_second..]];
        let n = if tails.iter().all(|t| !t.contains(&0)) {
            let mut at = 0;
            for (part, tail) in tails.iter().enumerate() {
                hist[at..at + tail.len()].copy_from_slice(tail);
                let times = events.times[part];
                if times.len() == events.items[part].len() {
                    ts[at..at + tail.len()].copy_from_slice(&times[times.len() - tail.len()..]);
                } else {
                    ts[at..at + tail.len()].fill(0);
                }
                at += tail.len();
            }
            take
        } else {
            let (start, n) = events.window(l);
            let mut slot = 0;
            for i in start..first.len() + second.len() {
                let item = events.item(i);
                if item != 0 {
                    hist[slot] = item;
                    ts[slot] = events.time(i);
                    slot += 1;
                }
            }
            n
        };
        hist[n..].fill(0);
        ts[n..].fill(0);
        self.hist_len[b] = n as u32;
        let nf = self.feats.len().checked_div(self.n).unwrap_or(0);
        let feats = &mut self.feats[b * nf..(b + 1) * nf];
        let given = nf.min(events.features.len());
        feats[..given].copy_from_slice(&events.features[..given]);
        feats[given..].fill(0);
        n
    }
}

/// Item → values of one pooled item feature, as CSR over item rows.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ItemBags {
    pub offsets: Vec<u32>,
    pub keys: Vec<u32>,
}

impl ItemBags {
    pub fn of(&self, item: u32) -> &[u32] {
        let i = item as usize;
        match (self.offsets.get(i), self.offsets.get(i + 1)) {
            (Some(&a), Some(&b)) if a <= b && (b as usize) <= self.keys.len() => &self.keys[a as usize..b as usize],
            _ => &[],
        }
    }
}

/// Flag on an item row given to `item_forward` / `item_backward`: embed the item without its id
/// rows, from its features alone, as an item without training events is embedded. Training sets
/// it at random so the item tower learns to embed items nobody has interacted with; item rows
/// stay below it.
pub const ID_DROPPED: u32 = 1 << 31;

/// The item row and whether its id rows are left out (see [`ID_DROPPED`]).
#[inline]
pub fn item_row(id: u32) -> (u32, bool) {
    (id & !ID_DROPPED, id & ID_DROPPED != 0)
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
            tables: tables.iter().map(|e| SparseGrad::for_table(e)).collect(),
            dense: dense.iter().map(|&n| vec![0.0; n]).collect(),
        }
    }

    pub fn zero(&mut self) {
        self.tables.iter_mut().for_each(SparseGrad::clear);
        self.dense.iter_mut().for_each(|g| g.fill(0.0));
    }
}

/// The [`Tower`] methods that read a tower's `spec` fields `items`, `max_seq_len` and
/// `user_features` (YouTubeDNN/DSSM, FM and MIND keep their shapes under those names).
macro_rules! spec_shapes {
    () => {
        fn item_rows(&self) -> usize {
            self.spec.items
        }
        fn max_seq_len(&self) -> usize {
            self.spec.max_seq_len
        }
        fn n_user_features(&self) -> usize {
            self.spec.user_features.len()
        }
    };
}
pub(crate) use spec_shapes;

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
    /// The most users one `user_forward` should take when a caller scores many: a tower whose
    /// activations grow with the history (per token, or per pair of tokens) asks for fewer.
    fn max_users_per_batch(&self) -> usize {
        usize::MAX
    }
    fn n_user_features(&self) -> usize;
    /// Whether the user tower reads the times of the history events (`UserBatch::hist_ts`).
    fn reads_event_times(&self) -> bool {
        false
    }

    fn user_forward(&self, batch: &UserBatch, acts: &mut Self::UserActs);
    /// [`Tower::user_forward`] when no backward pass follows (evaluation, serving), so a tower
    /// may skip what only gradients or other positions need; same outputs.
    fn user_infer(&self, batch: &UserBatch, acts: &mut Self::UserActs) {
        self.user_forward(batch, acts)
    }
    fn user_out<'a>(&self, acts: &'a Self::UserActs) -> &'a [f32];
    /// Accumulates gradients given `dout = dL/d(user_out)`.
    fn user_backward(&self, batch: &UserBatch, acts: &mut Self::UserActs, dout: &[f32], grads: &mut Grads);

    fn item_forward(&self, ids: &[u32], acts: &mut Self::ItemActs);
    fn item_out<'a>(&self, acts: &'a Self::ItemActs) -> &'a [f32];
    /// Accumulates gradients given `dout = dL/d(item_out)`.
    fn item_backward(&self, ids: &[u32], acts: &mut Self::ItemActs, dout: &[f32], grads: &mut Grads);

    /// Embedding tables (updated row-wise) and dense tensors (updated whole).
    fn params_mut(&mut self) -> (Vec<&mut Embedding>, Vec<&mut Vec<f32>>);
    /// The tables indexed by item row (id embeddings, history tables), not by feature value.
    fn item_row_tables_mut(&mut self) -> Vec<&mut Embedding>;
    fn new_grads(&self) -> Grads;

    /// Every parameter with a stable name and shape (tables first, then dense, in the orders above).
    fn tensors(&self) -> Vec<NamedTensor<'_>>;
    /// Integer side data saved with the parameters (e.g. item → genre bags).
    fn index_tensors(&self) -> Vec<(String, &[u32])> {
        Vec::new()
    }

    /// The vector of one item from its id row (`None`: an item the model was not trained on,
    /// embedded from its features alone, like an item with [`ID_DROPPED`]) and the value rows
    /// of each of its item features, in the model's order. `None` when the item tower reads no
    /// features, so an item it was not trained on has no vector.
    fn item_vector_of(&self, _id: Option<u32>, _features: &[&[u32]]) -> Option<Vec<f32>> {
        None
    }

    /// Vectors of every item row (row 0 included), `[item_rows × out_dim]`.
    fn all_item_vectors(&self) -> Vec<f32> {
        let ids: Vec<u32> = (0..self.item_rows() as u32).collect();
        let mut acts = Self::ItemActs::default();
        self.item_forward(&ids, &mut acts);
        self.item_out(&acts).to_vec()
    }
}

/// Zeroes rows `from..` of every item-row table, so those items' vectors come from their
/// features alone (items without training events, whose id rows would otherwise stay random).
pub fn clear_item_rows<T: Tower>(model: &mut T, from: usize) {
    for t in model.item_row_tables_mut() {
        let start = (from * t.dim).min(t.weights.len());
        t.weights[start..].fill(0.0);
    }
}

/// Mutable views of every parameter in [`Tower::tensors`] order.
pub fn tensors_mut<T: Tower>(model: &mut T) -> Vec<&mut Vec<f32>> {
    let (tables, dense) = model.params_mut();
    tables.into_iter().map(|e| &mut e.weights).chain(dense).collect()
}

/// The `(name, shape, values)` view of an embedding table.
pub fn table_tensor(name: String, t: &Embedding) -> NamedTensor<'_> {
    (name, vec![t.rows, t.dim], &t.weights[..])
}

/// Finite-difference checks shared by every model's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;
    use crate::rng::Rng;

    /// [`Tower::item_vector_of`] given each item's own id row and feature bags gives the vector
    /// `item_forward` gives for that row, and without the id row the vector of the row with
    /// [`ID_DROPPED`].
    pub fn check_item_vector_of<T: Tower>(m: &T, bags: &[ItemBags]) {
        let forward = |id: u32| {
            let mut acts = T::ItemActs::default();
            m.item_forward(&[id], &mut acts);
            m.item_out(&acts).to_vec()
        };
        for row in 1..m.item_rows() as u32 {
            let feats: Vec<&[u32]> = bags.iter().map(|b| b.of(row)).collect();
            for (id, expected) in [(Some(row), forward(row)), (None, forward(row | ID_DROPPED))] {
                let got = m.item_vector_of(id, &feats).expect("a tower with item features");
                assert_eq!(got.len(), expected.len());
                for (a, b) in got.iter().zip(&expected) {
                    assert!((a - b).abs() <= 1e-5, "row {row} (id {id:?}): {got:?} vs {expected:?}");
                }
            }
        }
    }

    /// `loss = Σ r ⊙ user outputs + Σ q ⊙ item outputs` and its analytic gradients.
    fn loss_and_grads<T: Tower>(m: &T, batch: &UserBatch, items: &[u32], r: &[f32], q: &[f32]) -> (f64, Grads) {
        let (mut ua, mut ia) = (T::UserActs::default(), T::ItemActs::default());
        m.user_forward(batch, &mut ua);
        m.item_forward(items, &mut ia);
        let loss =
            m.user_out(&ua).iter().zip(r).chain(m.item_out(&ia).iter().zip(q)).map(|(a, b)| (a * b) as f64).sum();
        let mut g = m.new_grads();
        m.user_backward(batch, &mut ua, r, &mut g);
        m.item_backward(items, &mut ia, q, &mut g);
        (loss, g)
    }

    /// Compares every parameter's analytic gradient with a central difference of step `h`;
    /// row 0 of every table (padding) must get exactly zero.
    pub fn check_gradients<T: Tower>(model: &mut T, batch: &UserBatch, items: &[u32], h: f32, tol: f32) {
        let d = model.out_dim();
        let mut rng = Rng::new(12);
        // As many user outputs as the tower gives (one per position for sequential towers).
        let mut ua = T::UserActs::default();
        model.user_forward(batch, &mut ua);
        let r: Vec<f32> = (0..model.user_out(&ua).len()).map(|_| rng.normal()).collect();
        let q: Vec<f32> = (0..items.len() * d).map(|_| rng.normal()).collect();
        let (_, g) = loss_and_grads(model, batch, items, &r, &q);
        let names: Vec<(String, Vec<usize>)> = model.tensors().into_iter().map(|(n, s, _)| (n, s)).collect();
        let mut analytic: Vec<Vec<f32>> = Vec::new();
        for (sg, (_, shape)) in g.tables.iter().zip(&names) {
            let mut v = vec![0.0f32; shape[0] * sg.dim];
            for (s, &row) in sg.rows.iter().enumerate() {
                v[row as usize * sg.dim..(row as usize + 1) * sg.dim]
                    .copy_from_slice(&sg.grads[s * sg.dim..(s + 1) * sg.dim]);
            }
            analytic.push(v);
        }
        analytic.extend(g.dense.iter().cloned());
        assert_eq!(analytic.len(), names.len());
        for (t, analytic_t) in analytic.iter().enumerate() {
            for (i, &ana) in analytic_t.iter().enumerate() {
                let orig = tensors_mut(model)[t][i];
                tensors_mut(model)[t][i] = orig + h;
                let up = loss_and_grads(model, batch, items, &r, &q).0;
                tensors_mut(model)[t][i] = orig - h;
                let down = loss_and_grads(model, batch, items, &r, &q).0;
                tensors_mut(model)[t][i] = orig;
                let num = ((up - down) / (2.0 * h as f64)) as f32;
                if t < g.tables.len() && i < names[t].1[1] {
                    assert_eq!(ana, 0.0, "{} padding row", names[t].0);
                    continue;
                }
                assert!(
                    (num - ana).abs() < tol * (1.0 + num.abs()),
                    "{}[{i}]: numeric {num} vs analytic {ana}",
                    names[t].0
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_window_keeps_the_newest_known_items_across_parts() {
        let mut b = UserBatch::default();
        b.reset(2, 3, 2);
        // Training part then a held-out part; row 0 (unknown) is left out wherever it stands.
        let events =
            UserEvents { items: [&[5, 6, 0, 7], &[0, 8]], times: [&[50, 60, 65, 70], &[75, 80]], features: &[9] };
        assert_eq!(b.set_user(1, &events), 3);
        assert_eq!(&b.hist[3..6], &[6, 7, 8]);
        assert_eq!(&b.hist_ts[3..6], &[60, 70, 80]);
        assert_eq!(&b.feats[2..4], &[9, 0], "missing trailing features read as unknown");
        assert_eq!(events.known_items(usize::MAX).collect::<Vec<_>>(), vec![5, 6, 7, 8]);
        // A shorter history pads after the window, and times may be unknown.
        let short = UserEvents::new(&[0, 4], &[1, 2]);
        assert_eq!(b.set_user(0, &short), 1);
        assert_eq!((&b.hist[..3], &b.hist_ts[..3], b.hist_len[0]), (&[4, 0, 0][..], &[0, 0, 0][..], 1));
        // Every newest item known: the window is the parts' tails, with their times.
        let known = UserEvents { items: [&[1, 2, 3], &[4]], times: [&[10, 20, 30], &[40]], features: &[] };
        assert_eq!(b.set_user(1, &known), 3);
        assert_eq!((&b.hist[3..6], &b.hist_ts[3..6]), (&[2, 3, 4][..], &[20, 30, 40][..]));
        // Reusing a slot clears what the previous user left in it.
        assert_eq!(b.set_user(1, &UserEvents::new(&[3], &[])), 1);
        assert_eq!(&b.hist[3..6], &[3, 0, 0]);
        assert_eq!(&b.hist_ts[3..6], &[0, 0, 0]);
    }
}
