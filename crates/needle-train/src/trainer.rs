//! The training loop: next-item samples, negatives, forward/backward through any
//! [`Tower`], optimizer steps, per-epoch validation with early stopping.

use crate::config::{Config, LossKind, ModelKind, SelectMetric, SparseOptimizer, TrainParams};
use crate::model::{evaluate, InPlace, Model};
use crate::observe::{self, Observer, Unit};
use crate::optim::{DenseAdam, SparseState};
use crate::prepare::{Prepared, Stage};
use crate::sampler::AliasSampler;
use crate::TrainError;
use needle_model::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, HistoryMode};
use needle_model::embedding::Embedding;
use needle_model::fm::{FmSpec, FmTwoTower};
use needle_model::layers::{
    bce_loss, label_attention_backward, label_attention_forward, softmax_loss, SoftmaxGrads, SoftmaxInputs,
    SoftmaxScratch,
};
use needle_model::mind::{MindSpec, MindTwoTower};
use needle_model::neighbors::{ItemNeighbors, NeighborKind, NeighborSpec};
use needle_model::rng::Rng;
use needle_model::seq::{SeqSpec, SeqTwoTower};
use needle_model::tower::{Dropout, Grads, Tower, UserBatch, UserEvents, ID_DROPPED};
use std::time::Instant;

pub use crate::observe::EpochLog;

/// What a finished training run reports.
pub struct Trained {
    pub model: Model,
    pub epochs: Vec<EpochLog>,
    pub best_epoch: usize,
    pub seconds: f64,
    pub samples_per_sec: f64,
    pub samples_per_epoch: usize,
    /// Training was stopped by its observer before its last epoch; `model` is the best epoch
    /// validated until then.
    pub stopped: bool,
}

/// Forwards progress and stop requests but not epoch records: a counted model's one pass,
/// whose record its session returns instead.
struct Quiet<'a>(&'a mut dyn Observer);

impl Observer for Quiet<'_> {
    fn begin(&mut self, name: &str, unit: Unit, total: u64) {
        self.0.begin(name, unit, total)
    }
    fn progress(&mut self, done: u64, status: &str) {
        self.0.progress(done, status)
    }
    fn end(&mut self) {
        self.0.end()
    }
    fn note(&mut self, line: &str) {
        self.0.note(line)
    }
    fn should_stop(&self) -> bool {
        self.0.should_stop()
    }
}

/// A training sample: predict the item at `pos` of `user`'s training history from the items before it.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub user: u32,
    pub pos: u32,
}

/// Every training event after the user's first is a target; with `cap > 0` at most `cap` per
/// user, chosen at random (seeded) so that heavy users do not dominate the loss.
pub fn build_samples(p: &Prepared, cap: usize, rng: &mut Rng) -> Vec<Sample> {
    let mut out = Vec::with_capacity(p.train.items.len());
    let mut pos: Vec<u32> = Vec::new();
    for u in 0..p.n_users() {
        let n = p.train.get(u).len();
        if n < 2 {
            continue;
        }
        pos.clear();
        pos.extend(1..n as u32);
        if cap > 0 && pos.len() > cap {
            rng.shuffle(&mut pos);
            pos.truncate(cap);
            pos.sort_unstable();
        }
        out.extend(pos.iter().map(|&q| Sample { user: u as u32, pos: q }));
    }
    out
}

/// A sequential model's training samples: windows of at most `max_seq_len` targets, the newest
/// ending at the user's last training event and the older ones tiling the history before it,
/// so that every training event after the first is a target once. A sample's `pos` is its
/// window's last target.
pub fn build_windows(p: &Prepared, max_seq_len: usize) -> Vec<Sample> {
    let mut out = Vec::new();
    for u in 0..p.n_users() {
        let n = p.train.get(u).len();
        let mut pos = n.saturating_sub(1);
        while pos >= 1 {
            out.push(Sample { user: u as u32, pos: pos as u32 });
            pos = pos.saturating_sub(max_seq_len);
        }
    }
    out
}

/// The training samples of the configured model: one per target, or windows of targets for a
/// sequential model.
pub fn training_samples(cfg: &Config, p: &Prepared, rng: &mut Rng) -> Vec<Sample> {
    if cfg.model.kind == ModelKind::Sequential {
        build_windows(p, cfg.model.max_seq_len)
    } else {
        build_samples(p, cfg.train.max_samples_per_user, rng)
    }
}

/// Targets the samples train on: one each, or a sequential model's windows.
pub fn targets_of(cfg: &Config, samples: &[Sample]) -> usize {
    if cfg.model.kind == ModelKind::Sequential {
        samples.iter().map(|s| (s.pos as usize).min(cfg.model.max_seq_len)).sum()
    } else {
        samples.len()
    }
}

/// The categorical inputs a config asks for, sized by the prepared vocabularies.
pub fn feature_specs(cfg: &Config, p: &Prepared) -> (Vec<CategoricalSpec>, Vec<CategoricalSpec>) {
    let m = &cfg.model;
    let user = p
        .user_feature_names
        .iter()
        .zip(&p.user_feature_vocabs)
        .map(|(n, v)| CategoricalSpec { name: n.clone(), rows: v.len(), dim: m.feature_dim })
        .collect();
    let item = p
        .item_features
        .iter()
        .map(|(n, v)| CategoricalSpec { name: n.clone(), rows: v.len(), dim: m.item_feature_dim })
        .collect();
    (user, item)
}

/// Shapes of a YouTubeDNN or DSSM model from the config and prepared vocabularies.
pub fn deep_spec(cfg: &Config, p: &Prepared) -> DeepSpec {
    let m = &cfg.model;
    let (user_features, item_features) = feature_specs(cfg, p);
    let dssm = m.kind == ModelKind::Dssm;
    let item_input = m.dim + item_features.iter().map(|f| f.dim).sum::<usize>();
    DeepSpec {
        items: p.n_item_rows(),
        dim: m.dim,
        max_seq_len: m.max_seq_len,
        history: match (dssm, m.history) {
            (false, _) => HistoryMode::Shared,
            (true, true) => HistoryMode::Own,
            (true, false) => HistoryMode::Off,
        },
        user_features,
        item_features,
        hidden: m.hidden.clone(),
        item_hidden: dssm.then(|| m.item_hidden.clone()),
        out_dim: if dssm { m.out_dim } else { item_input },
        example_age: m.example_age,
        recent: m.recent,
        item_hash: p.item_hash,
    }
}

/// Shapes of an FM model: factor width `dim`, user features, history bag, item features.
pub fn fm_spec(cfg: &Config, p: &Prepared) -> FmSpec {
    let m = &cfg.model;
    let (mut user_features, mut item_features) = feature_specs(cfg, p);
    user_features.iter_mut().chain(item_features.iter_mut()).for_each(|f| f.dim = m.dim);
    FmSpec {
        items: p.n_item_rows(),
        k: m.dim,
        max_seq_len: m.max_seq_len,
        history: m.history,
        user_features,
        item_features,
        item_hash: p.item_hash,
    }
}

/// Shapes of a sequential model.
pub fn seq_spec(cfg: &Config, p: &Prepared) -> SeqSpec {
    let m = &cfg.model;
    SeqSpec {
        items: p.n_item_rows(),
        dim: m.dim,
        max_seq_len: m.max_seq_len,
        blocks: m.blocks,
        heads: m.heads,
        ffn: if m.ffn == 0 { m.dim } else { m.ffn },
        item_hash: p.item_hash,
        block: m.block,
        time_buckets: m.time_buckets,
    }
}

/// Shapes of a MIND model.
pub fn mind_spec(cfg: &Config, p: &Prepared) -> MindSpec {
    let m = &cfg.model;
    let (user_features, item_features) = feature_specs(cfg, p);
    MindSpec {
        items: p.n_item_rows(),
        dim: m.dim,
        max_seq_len: m.max_seq_len,
        interests: m.interests,
        dynamic_k: m.dynamic_k,
        routing_iters: m.routing_iters,
        routing_seed: cfg.train.seed,
        user_features,
        item_features,
        hidden: m.hidden.clone(),
        item_hash: p.item_hash,
    }
}

/// One assembled batch as contiguous buffers: the user tower's inputs and the candidates. Two of
/// them circulate between the producer thread and the training loop, so nothing is allocated
/// per step once both are warm.
#[derive(Default)]
pub struct Batch {
    users: UserBatch,
    pos_ids: Vec<u32>,
    pos_corr: Vec<f32>,
    neg_ids: Vec<u32>,
    neg_corr: Vec<f32>,
    shared_ids: Vec<u32>,
    shared_corr: Vec<f32>,
    /// The candidates as the item tower sees them: with `item_id_dropout`, some carry
    /// [`ID_DROPPED`]; the ids above stay plain for corrections and accidental-hit masks.
    tower_ids: [Vec<u32>; 3],
    /// Sampled negatives per row (0 when negatives are shared by the batch).
    n_row: usize,
    /// Seconds spent assembling it.
    seconds: f64,
}

impl Batch {
    /// The candidate ids to give the item tower: positives, per-row negatives, shared negatives.
    fn tower_inputs(&self, id_dropout: bool) -> [&[u32]; 3] {
        if id_dropout {
            [&self.tower_ids[0], &self.tower_ids[1], &self.tower_ids[2]]
        } else {
            [&self.pos_ids, &self.neg_ids, &self.shared_ids]
        }
    }
}

/// Reused activation and gradient buffers: nothing is allocated per sample or per step once warm.
struct Step<T: Tower> {
    user: T::UserActs,
    pos: T::ItemActs,
    neg: T::ItemActs,
    shared: T::ItemActs,
    gu: Vec<f32>,
    gp: Vec<f32>,
    gn: Vec<f32>,
    gs: Vec<f32>,
    scratch: SoftmaxScratch,
    /// Label-aware attention (multi-interest models): attended user vectors, weights, dL/dinterests.
    att_u: Vec<f32>,
    att_a: Vec<f32>,
    att_dv: Vec<f32>,
    active: Vec<usize>,
}

impl<T: Tower> Default for Step<T> {
    fn default() -> Self {
        Step {
            user: Default::default(),
            pos: Default::default(),
            neg: Default::default(),
            shared: Default::default(),
            gu: Vec::new(),
            gp: Vec::new(),
            gn: Vec::new(),
            gs: Vec::new(),
            scratch: SoftmaxScratch::default(),
            att_u: Vec::new(),
            att_a: Vec::new(),
            att_dv: Vec::new(),
            active: Vec::new(),
        }
    }
}

/// Everything the optimizer keeps between steps.
struct Optim {
    tables: Vec<SparseState>,
    dense: Vec<DenseAdam>,
    t: u64,
    /// Steps in the whole configured training, for the learning-rate schedule.
    total_steps: u64,
}

impl Optim {
    fn new<T: Tower>(m: &mut T, kind: SparseOptimizer) -> Self {
        let sparse = |e: &mut Embedding| match kind {
            SparseOptimizer::Adam => SparseState::adam(e),
            SparseOptimizer::RowwiseAdagrad => SparseState::rowwise_adagrad(e),
        };
        let (tables, dense) = m.params_mut();
        Optim {
            tables: tables.into_iter().map(sparse).collect(),
            dense: dense.into_iter().map(|d| DenseAdam::new(d.len())).collect(),
            t: 0,
            total_steps: 0,
        }
    }

    fn step<T: Tower>(&mut self, m: &mut T, g: &Grads, p: &TrainParams) {
        let lr_scale = p.lr_schedule.factor(self.t, self.total_steps, p.warmup_steps as u64);
        self.t += 1;
        let t = self.t;
        // Clipping by the global norm of every gradient, dense and sparse together.
        let g_scale = if p.clip_norm > 0.0 {
            let sq: f64 = g
                .dense
                .iter()
                .flatten()
                .chain(g.tables.iter().flat_map(|s| s.grads[..s.rows.len() * s.dim].iter()))
                .map(|&x| f64::from(x) * f64::from(x))
                .sum();
            let norm = sq.sqrt() as f32;
            if norm > p.clip_norm {
                p.clip_norm / norm
            } else {
                1.0
            }
        } else {
            1.0
        };
        let (tables, dense) = m.params_mut();
        for ((st, table), grad) in self.tables.iter_mut().zip(tables).zip(&g.tables) {
            st.step(table, grad, p.embedding_lr * lr_scale, t, g_scale, p.embedding_l2);
        }
        for ((st, w), grad) in self.dense.iter_mut().zip(dense).zip(&g.dense) {
            st.step(w, grad, p.lr * lr_scale, t, g_scale, p.weight_decay);
        }
    }
}

/// What assembling a batch reads: the prepared data, the config and the negative sampler. It is
/// shared with the producer thread, which fills the next batch while a step computes.
pub struct Assembler<'a> {
    p: &'a Prepared,
    cfg: &'a Config,
    sampler: AliasSampler,
    /// `ln` of each item's unigram frequency among training targets (for in-batch log-Q).
    log_unigram: Vec<f32>,
    age_span: f32,
    max_seq_len: usize,
    n_user_features: usize,
    times: bool,
}

impl<'a> Assembler<'a> {
    fn new<T: Tower>(cfg: &'a Config, p: &'a Prepared, model: &T) -> Result<Self, TrainError> {
        let weights: Vec<f64> = p.item_counts.iter().map(|&c| (c as f64).powf(0.75)).collect();
        let sampler =
            AliasSampler::new(&weights).ok_or_else(|| TrainError::Data("no item has a training event".into()))?;
        let total: u64 = p.item_counts.iter().sum();
        let log_unigram =
            p.item_counts.iter().map(|&c| if c > 0 { (c as f64 / total as f64).ln() as f32 } else { 0.0 }).collect();
        Ok(Assembler {
            p,
            cfg,
            sampler,
            log_unigram,
            age_span: (p.train_max_ts - p.train_min_ts).max(1) as f32,
            max_seq_len: model.max_seq_len(),
            n_user_features: model.n_user_features(),
            times: model.reads_event_times(),
        })
    }

    /// Fills `s` with the user inputs and candidate lists for `samples`.
    fn fill(&self, samples: &[Sample], rng: &mut Rng, s: &mut Batch) {
        let start = Instant::now();
        let p = self.p;
        let t = &self.cfg.train;
        let (l, nf) = (self.max_seq_len, self.n_user_features);
        let all = self.cfg.model.kind == ModelKind::Sequential;
        s.users.reset(samples.len(), l, nf);
        s.users.all_positions = all;
        if t.dropout > 0.0 || t.input_dropout > 0.0 {
            // Drawn only when on, so runs without dropout keep their random stream.
            s.users.dropout = Dropout { input: t.input_dropout, hidden: t.dropout, seed: rng.next_u64() };
        }
        s.pos_ids.clear();
        for (i, smp) in samples.iter().enumerate() {
            let u = smp.user as usize;
            let seq = p.train.get(u);
            let pos = smp.pos as usize;
            let first = p.train.offsets[u] as usize;
            let times: &[i64] = if self.times { &p.train_ts[first..first + pos] } else { &[] };
            let events = UserEvents {
                items: [&seq[..pos], &[]],
                times: [times, &[]],
                features: &p.user_feats[u * nf..(u + 1) * nf],
            };
            let n = s.users.set_user(i, &events);
            if all {
                // Every position of the window predicts the item after it. Training sequences
                // hold known rows only (`prepare` drops cut-off items), so the window is the
                // last `n` events before `pos`.
                debug_assert!(seq[pos - n..pos].iter().all(|&r| r != 0));
                s.pos_ids.extend_from_slice(&seq[pos + 1 - n..pos]);
            }
            let ts = p.train_ts[first + pos];
            s.users.age[i] = (p.train_max_ts - ts) as f32 / self.age_span;
            s.pos_ids.push(seq[pos]);
        }
        let b = s.pos_ids.len();
        s.neg_ids.clear();
        s.neg_corr.clear();
        s.shared_ids.clear();
        s.shared_corr.clear();
        s.pos_corr.clear();
        s.n_row = 0;
        match t.loss.resolve(p.n_item_rows()) {
            LossKind::Full | LossKind::Auto => {
                s.pos_corr.resize(b, 0.0);
                // Cold rows are never candidates: nothing says the user would not have chosen them.
                s.shared_ids.extend(1..p.warm_rows() as u32);
                s.shared_corr.resize(s.shared_ids.len(), 0.0);
            }
            LossKind::InBatch => {
                let ln_b = (b as f32).ln();
                s.pos_corr.extend(s.pos_ids.iter().map(|&i| self.log_unigram[i as usize] + ln_b));
                s.shared_ids.extend_from_slice(&s.pos_ids);
                s.shared_corr.extend_from_slice(&s.pos_corr);
            }
            LossKind::Bce => {
                s.pos_corr.resize(b, 0.0);
                s.n_row = t.negatives;
                for _ in 0..t.negatives * b {
                    s.neg_ids.push(self.sampler.sample(rng));
                }
            }
            LossKind::Sampled => {
                let ln_n = (t.negatives as f32).ln();
                s.pos_corr.extend(s.pos_ids.iter().map(|&i| self.sampler.log_q(i) + ln_n));
                let (ids, corr, draws) = if t.shared_negatives {
                    (&mut s.shared_ids, &mut s.shared_corr, t.negatives)
                } else {
                    s.n_row = t.negatives;
                    (&mut s.neg_ids, &mut s.neg_corr, t.negatives * b)
                };
                for _ in 0..draws {
                    let j = self.sampler.sample(rng);
                    ids.push(j);
                    corr.push(self.sampler.log_q(j) + ln_n);
                }
            }
        }
        let drop = t.item_id_dropout;
        // An item without feature values has nothing left to embed once its id is dropped.
        let bags = &p.item_bags;
        let has_features = |i: u32| bags.iter().any(|b| !b.of(i).is_empty());
        for (out, ids) in s.tower_ids.iter_mut().zip([&s.pos_ids, &s.neg_ids, &s.shared_ids]) {
            out.clear();
            if drop > 0.0 {
                out.extend(
                    ids.iter().map(|&i| if rng.uniform() < drop && has_features(i) { i | ID_DROPPED } else { i }),
                );
            }
        }
        s.seconds = start.elapsed().as_secs_f64();
    }
}

/// The model, its optimizer and the step buffers: what a step mutates.
struct Engine<T: Tower> {
    model: T,
    grads: Grads,
    optim: Optim,
    step: Step<T>,
}

/// A model under training with its sampler, optimizer and buffers; [`Trainer::step`] runs one
/// batch, [`Trainer::epoch`] a whole pass with batches assembled on a producer thread.
pub struct Trainer<'a, T: Tower> {
    asm: Assembler<'a>,
    engine: Engine<T>,
    /// A batch for [`Trainer::step`], which assembles in line.
    batch: Batch,
    /// Seconds spent so far assembling batches (or, in an epoch, waiting for the producer), in
    /// forward + backward, and in the optimizer.
    phases: [f64; 3],
}

impl<'a, T: Tower> Trainer<'a, T> {
    pub fn new(cfg: &'a Config, p: &'a Prepared, mut model: T) -> Result<Self, TrainError> {
        let asm = Assembler::new(cfg, p, &model)?;
        let grads = model.new_grads();
        let optim = Optim::new(&mut model, cfg.train.sparse_optimizer);
        Ok(Trainer {
            asm,
            engine: Engine { model, grads, optim, step: Step::default() },
            batch: Batch::default(),
            phases: [0.0; 3],
        })
    }

    pub fn model(&self) -> &T {
        &self.engine.model
    }

    /// Frees the activation and batch buffers; the next step allocates them again. Between
    /// epochs this costs nothing measurable, and a tuner holding many paused sessions keeps only
    /// their parameters and optimizer state.
    pub fn release_buffers(&mut self) {
        self.engine.step = Step::default();
        self.batch = Batch::default();
        for g in &mut self.engine.grads.tables {
            g.clear();
            g.grads.shrink_to_fit();
            g.rows.shrink_to_fit();
        }
    }

    /// `(optimizer steps taken, steps in the whole training)`: where the learning-rate schedule is.
    pub fn schedule(&self) -> (u64, u64) {
        (self.engine.optim.t, self.engine.optim.total_steps)
    }

    /// How many optimizer steps the whole training takes, so the learning-rate schedule can
    /// end there.
    pub fn set_total_steps(&mut self, steps: u64) {
        self.engine.optim.total_steps = steps;
    }

    pub fn into_model(self) -> T {
        self.engine.model
    }

    /// Seconds spent so far assembling batches (histories, features, negatives), in forward and
    /// backward passes (embedding gathers included), and in the optimizer.
    pub fn phase_seconds(&self) -> [f64; 3] {
        self.phases
    }

    /// Item-table rows the last step updated.
    pub fn touched_item_rows(&self) -> usize {
        self.engine.grads.tables.first().map_or(0, |g| g.rows.len())
    }

    /// One optimizer step on `samples`, assembled in line; returns the batch's mean loss.
    pub fn step(&mut self, samples: &[Sample], rng: &mut Rng) -> f32 {
        self.asm.fill(samples, rng, &mut self.batch);
        self.phases[0] += self.batch.seconds;
        let (loss, f, o) = self.engine.compute(self.asm.cfg, &self.batch);
        self.phases[1] += f;
        self.phases[2] += o;
        loss
    }

    /// One pass over `order` in batches of `batch_size`, the next batch assembled on a producer
    /// thread while the current one computes (both draw from `rng` in the order a sequential
    /// loop would, so results do not depend on the overlap). `after` sees each step's index,
    /// samples and loss; an error from it stops the epoch.
    pub fn epoch<E>(
        &mut self,
        order: &[Sample],
        batch_size: usize,
        rng: &mut Rng,
        mut after: impl FnMut(usize, usize, f32) -> Result<(), E>,
    ) -> Result<(), E> {
        use std::sync::mpsc::sync_channel;
        let Trainer { asm, engine, phases, .. } = self;
        let asm = &*asm;
        std::thread::scope(|scope| {
            let (full_tx, full_rx) = sync_channel::<Batch>(1);
            let (empty_tx, empty_rx) = sync_channel::<Batch>(2);
            for _ in 0..2 {
                let _ = empty_tx.send(Batch::default());
            }
            scope.spawn(move || {
                for chunk in order.chunks(batch_size) {
                    let Ok(mut b) = empty_rx.recv() else { return };
                    asm.fill(chunk, rng, &mut b);
                    if full_tx.send(b).is_err() {
                        return;
                    }
                }
            });
            for (i, chunk) in order.chunks(batch_size).enumerate() {
                let wait = Instant::now();
                let Ok(b) = full_rx.recv() else { break };
                phases[0] += wait.elapsed().as_secs_f64();
                let (loss, f, o) = engine.compute(asm.cfg, &b);
                phases[1] += f;
                phases[2] += o;
                let _ = empty_tx.send(b);
                // Returning drops the receivers, which ends the producer at its next send.
                after(i, chunk.len(), loss)?;
            }
            Ok(())
        })
    }
}

impl<T: Tower> Engine<T> {
    /// Forward, loss, backward and optimizer update on one assembled batch; returns the loss
    /// and the seconds of forward + backward and of the optimizer.
    fn compute(&mut self, cfg: &Config, batch: &Batch) -> (f32, f64, f64) {
        let t1 = Instant::now();
        let t = &cfg.train;
        let s = &mut self.step;
        let n_row = batch.n_row;
        let [pos_in, neg_in, shared_in] = batch.tower_inputs(t.item_id_dropout > 0.0);
        let m = &self.model;
        let b = batch.pos_ids.len();
        let d = m.out_dim();
        m.user_forward(&batch.users, &mut s.user);
        m.item_forward(pos_in, &mut s.pos);
        m.item_forward(neg_in, &mut s.neg);
        m.item_forward(shared_in, &mut s.shared);
        s.gu.resize(b * d, 0.0);
        s.gp.resize(b * d, 0.0);
        s.gn.resize(batch.neg_ids.len() * d, 0.0);
        s.gs.resize(batch.shared_ids.len() * d, 0.0);
        let ni = m.interests();
        let power = cfg.model.attention_power;
        if ni > 1 {
            // Label-aware attention: the target item picks the mix of interests it is scored by.
            s.active.clear();
            match m.active_interests(&s.user) {
                Some(a) => s.active.extend_from_slice(&a[..b]),
                None => s.active.resize(b, ni),
            }
            s.att_u.resize(b * d, 0.0);
            s.att_a.resize(b * ni, 0.0);
            label_attention_forward(
                &mut s.att_u,
                &mut s.att_a,
                m.user_out(&s.user),
                m.item_out(&s.pos),
                &s.active,
                ni,
                d,
                power,
            );
        }
        let user = if ni > 1 { &s.att_u[..] } else { m.user_out(&s.user) };
        let loss = if t.loss == LossKind::Bce {
            bce_loss(
                user,
                m.item_out(&s.pos),
                &batch.pos_ids,
                m.item_out(&s.neg),
                &batch.neg_ids,
                n_row,
                t.temperature,
                d,
                &mut s.gu,
                &mut s.gp,
                &mut s.gn,
            )
        } else {
            softmax_loss(
                &SoftmaxInputs {
                    user,
                    pos: m.item_out(&s.pos),
                    pos_corr: &batch.pos_corr,
                    pos_ids: &batch.pos_ids,
                    row_negs: m.item_out(&s.neg),
                    row_corr: &batch.neg_corr,
                    row_ids: &batch.neg_ids,
                    n_row,
                    shared: m.item_out(&s.shared),
                    shared_corr: &batch.shared_corr,
                    shared_ids: &batch.shared_ids,
                    temperature: t.temperature,
                    d,
                },
                SoftmaxGrads { user: &mut s.gu, pos: &mut s.gp, row_negs: &mut s.gn, shared: &mut s.gs },
                &mut s.scratch,
            )
        };
        self.grads.zero();
        if ni > 1 {
            s.att_dv.resize(b * ni * d, 0.0);
            label_attention_backward(
                &mut s.att_dv,
                &mut s.gp,
                &s.gu,
                &s.att_a,
                m.user_out(&s.user),
                m.item_out(&s.pos),
                &s.active,
                ni,
                d,
                power,
            );
            m.user_backward(&batch.users, &mut s.user, &s.att_dv, &mut self.grads);
        } else {
            m.user_backward(&batch.users, &mut s.user, &s.gu, &mut self.grads);
        }
        m.item_backward(pos_in, &mut s.pos, &s.gp, &mut self.grads);
        m.item_backward(neg_in, &mut s.neg, &s.gn, &mut self.grads);
        m.item_backward(shared_in, &mut s.shared, &s.gs, &mut self.grads);
        let t2 = Instant::now();
        self.optim.step(&mut self.model, &self.grads, t);
        (loss, (t2 - t1).as_secs_f64(), t2.elapsed().as_secs_f64())
    }
}

/// What training will hold in memory besides the data, known before the optimizer allocates:
/// the parameters, the optimizer state, the copy of the best epoch's parameters, the item vectors
/// validation scores against, and the serialised checkpoint.
#[derive(Clone, Debug)]
pub struct MemoryPlan {
    pub tables: u64,
    pub dense: u64,
    pub optimizer: u64,
    pub best_copy: u64,
    pub item_vectors: u64,
    pub checkpoint: u64,
    /// `MemAvailable` of the machine (Linux), when known.
    pub available: Option<u64>,
}

impl MemoryPlan {
    pub fn of<T: Tower>(cfg: &Config, model: &mut T, item_rows: usize) -> MemoryPlan {
        let out_dim = model.out_dim() as u64;
        let (tables, dense) = model.params_mut();
        let table_bytes: u64 = tables.iter().map(|t| t.weights.len() as u64 * 4).sum();
        let table_rows: u64 = tables.iter().map(|t| t.rows as u64).sum();
        let dense_bytes: u64 = dense.iter().map(|d| d.len() as u64 * 4).sum();
        let optimizer = 2 * dense_bytes
            + match cfg.train.sparse_optimizer {
                SparseOptimizer::Adam => 2 * table_bytes,
                SparseOptimizer::RowwiseAdagrad => 4 * table_rows,
            };
        let params = table_bytes + dense_bytes;
        MemoryPlan {
            tables: table_bytes,
            dense: dense_bytes,
            optimizer,
            best_copy: params,
            item_vectors: item_rows as u64 * out_dim * 4,
            checkpoint: params,
            available: mem_available(),
        }
    }

    /// The larger of the two peaks: while validating (parameters, optimizer state, the
    /// snapshot being validated or kept as the best, item vectors) and while saving (the best
    /// parameters and their serialised copy; the optimizer is gone by then).
    pub fn total(&self) -> u64 {
        let params = self.tables + self.dense;
        let training = params + self.optimizer + self.best_copy + self.item_vectors;
        let saving = params + self.checkpoint;
        training.max(saving)
    }

    /// An error naming the knobs when the plan needs more than 90% of the available memory.
    pub fn check(&self) -> Result<(), TrainError> {
        match self.available {
            Some(avail) if self.total() > avail / 10 * 9 => Err(TrainError::Config(format!(
                "training needs about {} for parameters and optimizer state but {} is available; \
                 lower [model] dim, set [train] sparse_optimizer = \"rowwise-adagrad\" (a quarter of Adam's \
                 state for tables), or keep the most frequent items only with [model] max_items = N",
                gb(self.total()),
                gb(avail)
            ))),
            _ => Ok(()),
        }
    }
}

fn gb(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.2} GB", b as f64 / f64::from(1u32 << 30))
    } else {
        format!("{:.1} MB", b as f64 / f64::from(1u32 << 20))
    }
}

impl std::fmt::Display for MemoryPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory: embedding tables {}, dense layers {}, optimizer state {}, validation snapshot {}, item vectors {}, checkpoint buffer {}; peak about {}",
            gb(self.tables),
            gb(self.dense),
            gb(self.optimizer),
            gb(self.best_copy),
            gb(self.item_vectors),
            gb(self.checkpoint),
            gb(self.total())
        )?;
        if let Some(a) = self.available {
            write!(f, " of {} available", gb(a))?;
        }
        Ok(())
    }
}

/// The memory training may use: `NEEDLE_MEMORY_LIMIT` (bytes, or with a K/M/G suffix) when set
/// — /proc/meminfo shows the host's memory inside a container, not the container's limit — else
/// `MemAvailable` from /proc/meminfo.
fn mem_available() -> Option<u64> {
    if let Ok(v) = std::env::var("NEEDLE_MEMORY_LIMIT") {
        let v = v.trim();
        let (num, mult) = match v.char_indices().last() {
            Some((i, 'K' | 'k')) => (&v[..i], 1u64 << 10),
            Some((i, 'M' | 'm')) => (&v[..i], 1 << 20),
            Some((i, 'G' | 'g')) => (&v[..i], 1 << 30),
            _ => (v, 1),
        };
        if let Ok(n) = num.trim().parse::<f64>() {
            return Some((n * mult as f64) as u64);
        }
    }
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Peak resident memory of this process in MB (Linux), for the results table.
pub fn peak_rss_mb() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}

/// Builds an untrained model of the configured kind; the id rows of cold items start (and,
/// since no step touches them, stay) at zero.
pub fn build_model(cfg: &Config, p: &Prepared, rng: &mut Rng) -> Result<Model, TrainError> {
    fn cold<T: Tower>(mut m: T, p: &Prepared) -> Box<T> {
        // Under hashing, cold rows already read the zero padding row.
        if p.item_hash.is_none() {
            needle_model::tower::clear_item_rows(&mut m, p.warm_rows());
        }
        Box::new(m)
    }
    Ok(match cfg.model.kind {
        ModelKind::Popularity => Model::Popularity { counts: p.item_counts.iter().map(|&c| c as f32).collect() },
        ModelKind::Youtubednn | ModelKind::Dssm => Model::Deep(cold(
            DeepTwoTower::new(deep_spec(cfg, p), p.item_bags.clone(), rng).map_err(TrainError::Config)?,
            p,
        )),
        ModelKind::Mind => Model::Mind(cold(
            MindTwoTower::new(mind_spec(cfg, p), p.item_bags.clone(), rng).map_err(TrainError::Config)?,
            p,
        )),
        ModelKind::Sequential => {
            Model::Seq(cold(SeqTwoTower::new(seq_spec(cfg, p), rng).map_err(TrainError::Config)?, p))
        }
        ModelKind::Fm => {
            Model::Fm(cold(FmTwoTower::new(fm_spec(cfg, p), p.item_bags.clone(), rng).map_err(TrainError::Config)?, p))
        }
        ModelKind::Transitions | ModelKind::Itemcf => Model::Neighbors(Box::new(
            ItemNeighbors::build(neighbor_spec(cfg, p)?, &p.train.offsets, &p.train.items, &p.item_counts)
                .map_err(TrainError::Config)?,
        )),
    })
}

/// The shape of a transitions or item-CF model from its config.
pub fn neighbor_spec(cfg: &Config, p: &Prepared) -> Result<NeighborSpec, TrainError> {
    let m = &cfg.model;
    let kind = m.kind.neighbor_kind().ok_or_else(|| TrainError::Config(format!("{:?} is not counted", m.kind)))?;
    Ok(NeighborSpec {
        kind,
        items: p.n_item_rows(),
        window: m.window.unwrap_or(match kind {
            NeighborKind::Transitions => 1,
            NeighborKind::Itemcf => 0,
        }),
        neighbors: m.neighbors,
        recent: m.recent,
        decay: m.decay,
        max_seq_len: m.max_seq_len,
    })
}

/// The seeded sample of validation users `[train] valid_users` asks for (`None`: all of them).
fn valid_subset(cfg: &Config, p: &Prepared, root: &Rng) -> Option<Vec<usize>> {
    let n = cfg.train.valid_users;
    (n > 0).then(|| {
        let mut users: Vec<usize> = (0..p.n_users()).filter(|&u| !p.valid.get(u).is_empty()).collect();
        root.fork(3).shuffle(&mut users);
        users.truncate(n);
        users
    })
}

/// Trains the configured model, reporting to `obs` (progress, and each epoch's record) and
/// stopping early when it asks: then the best epoch validated so far is returned, with
/// [`Trained::stopped`] set, or [`TrainError::Cancelled`] when no epoch had ended.
pub fn train(cfg: &Config, p: &Prepared, obs: &mut dyn Observer) -> Result<Trained, TrainError> {
    let root = Rng::new(cfg.train.seed);
    let start = Instant::now();
    match build_model(cfg, p, &mut root.fork(2))? {
        Model::Popularity { counts } => Ok(Trained {
            model: Model::Popularity { counts },
            epochs: Vec::new(),
            best_epoch: 0,
            seconds: 0.0,
            samples_per_sec: 0.0,
            samples_per_epoch: p.train.items.len(),
            stopped: false,
        }),
        Model::Neighbors(n) => {
            // Counted in one pass: the "epoch" is that pass, and its validation figure is what
            // a tuner compares.
            let secs = start.elapsed().as_secs_f64();
            let model = Model::Neighbors(n);
            let subset = valid_subset(cfg, p, &root);
            let n_users = subset.as_ref().map_or_else(|| p.valid.len(), Vec::len);
            obs.begin("validation", Unit::Users, n_users as u64);
            let r = evaluate(&model, p, Stage::Valid, &[10], false, subset.as_deref(), &mut observe::users(obs));
            obs.end();
            let events = p.train.items.len();
            let rec = EpochLog::new(1, 0.0, &r, secs, events);
            obs.epoch(&rec);
            Ok(Trained {
                model,
                epochs: vec![rec],
                best_epoch: 1,
                seconds: secs,
                samples_per_sec: events as f64 / secs.max(1e-9),
                samples_per_epoch: events,
                stopped: false,
            })
        }
        tower => {
            let mut session = tower_session(cfg, p, tower, obs)?;
            loop {
                match session.epoch(obs) {
                    Ok(Some(rec)) => obs.epoch(&rec),
                    Ok(None) => break,
                    Err(TrainError::Cancelled) if session.has_best() => {
                        let mut t = session.finish()?;
                        t.stopped = true;
                        return Ok(t);
                    }
                    Err(e) => return Err(e),
                }
            }
            session.finish()
        }
    }
}

/// The validation figure `metric` picks out of an epoch's record.
pub fn selected(metric: SelectMetric, rec: &EpochLog) -> f64 {
    metric.pick(rec.valid_hr10, rec.valid_ndcg10)
}

/// A tower's training advanced one epoch at a time, with validation after each: `needle train`
/// runs one to its end; `needle tune` interleaves many and drops the weak ones early.
pub struct Session<'a, T: Tower + Clone> {
    cfg: &'a Config,
    p: &'a Prepared,
    trainer: Trainer<'a, T>,
    wrap: fn(T) -> Model,
    root: Rng,
    /// Shuffled in place every epoch; at 10^8 events a second copy would cost 0.8 GB.
    order: Vec<Sample>,
    /// Targets per epoch (a sequential model's samples are windows of many).
    targets: usize,
    valid_subset: Option<Vec<usize>>,
    epochs: Vec<EpochLog>,
    /// A copy of the best epoch's model while later epochs may still replace it; `None` when
    /// the model under training is the best (after the last epoch no copy is ever made).
    best: Option<T>,
    best_score: f64,
    best_epoch: usize,
    since_best: usize,
    done: bool,
    /// Seconds spent in this session (a tuner interleaves several).
    seconds: f64,
    train_secs: f64,
    trained_samples: usize,
}

/// The session behind a model of any kind, as a tuner holds it.
pub trait AnySession {
    /// Trains and validates one more epoch, reporting to `obs`; `None` once the epochs are
    /// spent or early stopping has ended the run; [`TrainError::Cancelled`] when `obs` asked
    /// to stop during it (the epoch is then lost, the best one before it kept).
    fn epoch(&mut self, obs: &mut dyn Observer) -> Result<Option<EpochLog>, TrainError>;
    /// No epoch is left to train.
    fn is_done(&self) -> bool;
    /// An epoch has been validated, so [`AnySession::finish`] has a best one to return.
    fn has_best(&self) -> bool;
    /// The model of the best epoch and what its training reports.
    fn finish(self: Box<Self>) -> Result<Trained, TrainError>;
}

/// A counted model (popularity, transitions, item-CF) as a one-epoch session: its one pass
/// and validation are the epoch.
struct Counted<'a> {
    cfg: &'a Config,
    p: &'a Prepared,
    trained: Option<Trained>,
}

impl AnySession for Counted<'_> {
    fn epoch(&mut self, obs: &mut dyn Observer) -> Result<Option<EpochLog>, TrainError> {
        if self.trained.is_some() {
            return Ok(None);
        }
        // The pass reports its one epoch to a silent observer; the caller gets it returned.
        let t = train(self.cfg, self.p, &mut Quiet(obs))?;
        let rec = t.epochs.first().cloned();
        self.trained = Some(t);
        Ok(rec)
    }
    fn is_done(&self) -> bool {
        self.trained.is_some()
    }
    fn has_best(&self) -> bool {
        self.trained.is_some()
    }
    fn finish(self: Box<Self>) -> Result<Trained, TrainError> {
        match self.trained {
            Some(t) => Ok(t),
            None => train(self.cfg, self.p, &mut crate::observe::Silent),
        }
    }
}

impl<'a, T: Tower + Clone> Session<'a, T> {
    /// `obs` is told the memory plan (a tuner's many sessions pass a silent one).
    pub fn new(
        cfg: &'a Config,
        p: &'a Prepared,
        mut model: T,
        wrap: fn(T) -> Model,
        obs: &mut dyn Observer,
    ) -> Result<Self, TrainError> {
        let start = Instant::now();
        let t = &cfg.train;
        let root = Rng::new(t.seed);
        let samples = training_samples(cfg, p, &mut root.fork(1));
        let targets = targets_of(cfg, &samples);
        if samples.is_empty() {
            return Err(TrainError::Data("no training samples: every user has fewer than 2 training events".into()));
        }
        let plan = MemoryPlan::of(cfg, &mut model, p.n_item_rows());
        obs.note(&plan.to_string());
        plan.check()?;
        let mut trainer = Trainer::new(cfg, p, model)?;
        trainer.set_total_steps((samples.len().div_ceil(t.batch_size.max(1)) * t.schedule_span()) as u64);
        let valid_subset = valid_subset(cfg, p, &root);
        Ok(Session {
            cfg,
            p,
            trainer,
            wrap,
            root,
            order: samples,
            targets,
            valid_subset,
            epochs: Vec::new(),
            best: None,
            best_score: f64::NEG_INFINITY,
            best_epoch: 0,
            since_best: 0,
            done: t.epochs == 0,
            seconds: start.elapsed().as_secs_f64(),
            train_secs: 0.0,
            trained_samples: 0,
        })
    }

    /// See [`AnySession::epoch`].
    pub fn epoch(&mut self, obs: &mut dyn Observer) -> Result<Option<EpochLog>, TrainError> {
        if self.done {
            return Ok(None);
        }
        let start = Instant::now();
        let (t, p) = (&self.cfg.train, self.p);
        let epoch = self.epochs.len() + 1;
        let mut rng = self.root.fork(100 + epoch as u64);
        rng.shuffle(&mut self.order);
        obs.begin(&format!("epoch {epoch}/{}", t.epochs), Unit::Samples, self.order.len() as u64);
        let (mut loss_sum, mut steps, mut done) = (0.0f64, 0usize, 0u64);
        let mut ema = f64::NAN;
        let mut status = String::new();
        let (t0, total_steps) = self.trainer.schedule();
        let stepped = self.trainer.epoch(&self.order, t.batch_size, &mut rng, |i, n, loss| {
            let loss = f64::from(loss);
            if !loss.is_finite() {
                return Err(TrainError::Diverged { epoch, step: i });
            }
            let at = t0 + i as u64;
            let lr = t.lr * t.lr_schedule.factor(at, total_steps, t.warmup_steps as u64);
            obs.step(at + 1, loss, lr);
            loss_sum += loss;
            steps += 1;
            done += n as u64;
            ema = if ema.is_nan() { loss } else { 0.98 * ema + 0.02 * loss };
            status.clear();
            if i % 20 == 0 {
                let rate = done as f64 / start.elapsed().as_secs_f64().max(1e-9);
                status = format!("loss {ema:.4}  {rate:.0} samples/s");
            }
            obs.progress(done, &status);
            if obs.should_stop() {
                return Err(TrainError::Cancelled);
            }
            Ok(())
        });
        obs.end();
        stepped?;
        let secs = start.elapsed().as_secs_f64();
        self.trainer.release_buffers();
        self.train_secs += secs;
        self.trained_samples += self.targets;
        let n_users = self.valid_subset.as_ref().map_or_else(|| p.valid.len(), Vec::len);
        obs.begin(&format!("validation {epoch}/{}", t.epochs), Unit::Users, n_users as u64);
        // Scored in place: at 10^7 items a copy of the tables is gigabytes.
        let r = evaluate(
            &InPlace(self.trainer.model()),
            p,
            Stage::Valid,
            &[10],
            false,
            self.valid_subset.as_deref(),
            &mut observe::users(obs),
        );
        obs.end();
        let rec = EpochLog::new(epoch, loss_sum / steps.max(1) as f64, &r, secs, self.targets);
        let score = selected(t.select, &rec);
        if score > self.best_score {
            self.best_score = score;
            self.best_epoch = epoch;
            // The old best goes before the copy is made; after the last epoch the model under
            // training is itself the best, and no copy is made at all.
            self.best = None;
            if epoch < t.epochs {
                self.best = Some(self.trainer.model().clone());
            }
            self.since_best = 0;
        } else {
            self.since_best += 1;
            if t.patience > 0 && self.since_best >= t.patience {
                self.done = true;
            }
        }
        self.done |= epoch >= t.epochs;
        self.epochs.push(rec.clone());
        self.seconds += start.elapsed().as_secs_f64();
        Ok(Some(rec))
    }

    /// See [`AnySession::finish`].
    pub fn finish(self) -> Trained {
        let samples_per_epoch = self.targets;
        // The optimizer state goes before the caller saves, so saving never holds both.
        let model = match self.best {
            Some(b) => (self.wrap)(b),
            None => (self.wrap)(self.trainer.into_model()),
        };
        Trained {
            model,
            epochs: self.epochs,
            best_epoch: self.best_epoch,
            seconds: self.seconds,
            samples_per_sec: self.trained_samples as f64 / self.train_secs.max(1e-9),
            samples_per_epoch,
            stopped: false,
        }
    }
}

impl<T: Tower + Clone> AnySession for Session<'_, T> {
    fn epoch(&mut self, obs: &mut dyn Observer) -> Result<Option<EpochLog>, TrainError> {
        Session::epoch(self, obs)
    }
    fn is_done(&self) -> bool {
        self.done
    }
    fn has_best(&self) -> bool {
        self.best_epoch > 0
    }
    fn finish(self: Box<Self>) -> Result<Trained, TrainError> {
        Ok(Session::finish(*self))
    }
}

/// A training session for the configured model, behind [`AnySession`]; the counted kinds have
/// one epoch, their one pass.
pub fn session<'a>(cfg: &'a Config, p: &'a Prepared) -> Result<Box<dyn AnySession + 'a>, TrainError> {
    if cfg.model.kind.is_counted() {
        return Ok(Box::new(Counted { cfg, p, trained: None }));
    }
    let root = Rng::new(cfg.train.seed);
    tower_session(cfg, p, build_model(cfg, p, &mut root.fork(2))?, &mut observe::Silent)
}

/// The session training `model`, a freshly built model of the configured kind; `obs` is told
/// its memory plan (a tuner's many sessions keep quiet).
fn tower_session<'a>(
    cfg: &'a Config,
    p: &'a Prepared,
    model: Model,
    obs: &mut dyn Observer,
) -> Result<Box<dyn AnySession + 'a>, TrainError> {
    Ok(match model {
        Model::Deep(m) => Box::new(Session::new(cfg, p, *m, |m| Model::Deep(Box::new(m)), obs)?),
        Model::Fm(m) => Box::new(Session::new(cfg, p, *m, |m| Model::Fm(Box::new(m)), obs)?),
        Model::Mind(m) => Box::new(Session::new(cfg, p, *m, |m| Model::Mind(Box::new(m)), obs)?),
        Model::Seq(m) => Box::new(Session::new(cfg, p, *m, |m| Model::Seq(Box::new(m)), obs)?),
        Model::Popularity { .. } | Model::Neighbors(_) => Box::new(Counted { cfg, p, trained: None }),
    })
}
