//! The training configuration, read from TOML (see `configs/`). Every field has a default so
//! a config names only what it changes; unknown keys are errors so typos do not pass silently.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub data: DataConfig,
    #[serde(default)]
    pub model: ModelConfig,
    #[serde(default)]
    pub train: TrainParams,
    /// The search space of `needle tune`; `needle train` ignores it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tune: Option<TuneConfig>,
}

/// `[tune]`: which values of which `[model]` and `[train]` keys `needle tune` tries, and how it
/// compares them.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TuneConfig {
    /// The validation figure trials are ranked by.
    pub metric: SelectMetric,
    /// Configurations to try (0 = as many as the time budget allows).
    pub trials: usize,
    /// Successive halving keeps the best 1/eta of the trials at each rung.
    pub eta: usize,
    /// Epochs every trial trains before the first cut: the rungs start there, so there are fewer
    /// cuts rather than trials judged on less (one epoch mostly measures the learning rate).
    pub min_epochs: usize,
    /// Seeds the choice of configurations (training keeps `[train] seed`).
    pub seed: u64,
    /// Values to try per `[model]` key, e.g. `dim = [32, 64, 128]`.
    pub model: std::collections::BTreeMap<String, Vec<toml::Value>>,
    /// Values to try per `[train]` key, e.g. `lr = [0.0005, 0.001, 0.002]`.
    pub train: std::collections::BTreeMap<String, Vec<toml::Value>>,
}

impl Default for TuneConfig {
    fn default() -> Self {
        TuneConfig {
            metric: SelectMetric::Ndcg10,
            trials: 0,
            eta: 3,
            min_epochs: 2,
            seed: 42,
            model: Default::default(),
            train: Default::default(),
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "kebab-case")]
pub enum SplitKind {
    /// Per user: last event → test, the one before → validation, the rest → train.
    LeaveLastOut,
    /// Global timestamp thresholds: the newest events form validation and test.
    GlobalTime,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// A built-in dataset: "ml-1m" or "ml-100k".
    pub dataset: Option<String>,
    /// Or a TOML schema describing a CSV/TSV log (relative to the config file).
    pub schema: Option<PathBuf>,
    /// Or a binary dataset folder (`dataset.ndb`) that needle wrote: a run trained from a
    /// DataFrame keeps its data in `RUN/data` and names it so, relative to the run directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<PathBuf>,
    /// Folder of the ingested binary dataset (relative to the config file); default: beside the
    /// schema (`S.toml` → `S.ndb/`), or for MovieLens in the user's cache (`~/.cache/needle/`).
    #[serde(default)]
    pub cache: Option<PathBuf>,
    #[serde(default = "default_split")]
    pub split: SplitKind,
    #[serde(default = "default_fraction")]
    pub valid_fraction: f64,
    #[serde(default = "default_fraction")]
    pub test_fraction: f64,
    #[serde(default)]
    pub skip_bad_rows: bool,
}

impl DataConfig {
    /// Data from one source, split and read with the defaults.
    pub fn from_source(dataset: Option<String>, schema: Option<PathBuf>, binary: Option<PathBuf>) -> DataConfig {
        DataConfig {
            dataset,
            schema,
            binary,
            cache: None,
            split: default_split(),
            valid_fraction: default_fraction(),
            test_fraction: default_fraction(),
            skip_bad_rows: false,
        }
    }
}

fn default_split() -> SplitKind {
    SplitKind::LeaveLastOut
}
fn default_fraction() -> f64 {
    0.1
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Items ranked by their number of training events, the same for every user.
    Popularity,
    /// Mean-pooled history (item table shared with the item tower) ‖ user features → MLP.
    Youtubednn,
    /// Two independent MLP towers over user-side and item-side features.
    Dssm,
    /// A factorization machine split into a user vector and an item vector.
    Fm,
    /// Several interest vectors per user by capsule routing, label-aware attention in training.
    Mind,
    /// Items that followed the user's newest items in training sequences (counts, no training
    /// steps); popularity for the rest.
    Transitions,
    /// Item-based collaborative filtering: co-occurrence within a window, cosine-normalised.
    Itemcf,
    /// Causal self-attention over the history, trained to predict the next item at every
    /// position; the user vector is the newest position's output.
    Sequential,
}

impl ModelKind {
    /// The item-to-item kind, for the models counted from the log rather than trained.
    pub fn neighbor_kind(self) -> Option<needle_model::neighbors::NeighborKind> {
        match self {
            ModelKind::Transitions => Some(needle_model::neighbors::NeighborKind::Transitions),
            ModelKind::Itemcf => Some(needle_model::neighbors::NeighborKind::Itemcf),
            _ => None,
        }
    }

    /// Kinds with no user or item tower: they read neither user nor item features.
    pub fn is_counted(self) -> bool {
        self == ModelKind::Popularity || self.neighbor_kind().is_some()
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub kind: ModelKind,
    /// Item embedding width.
    pub dim: usize,
    /// Hidden layer widths of the user MLP (the output layer is added to match the item vector).
    pub hidden: Vec<usize>,
    /// Categorical user features fed to the user tower; "user_id" means the user's own id.
    pub user_features: Vec<String>,
    pub feature_dim: usize,
    /// Item features pooled into the item tower's input (e.g. "genres", "year").
    pub item_features: Vec<String>,
    pub item_feature_dim: usize,
    /// Hidden widths of the item MLP (DSSM only).
    pub item_hidden: Vec<usize>,
    /// Output width of both towers (DSSM; YouTubeDNN's follows from its item input).
    pub out_dim: usize,
    /// Add the user's (mean-pooled) history to the user tower (DSSM and FM; YouTubeDNN always has it).
    pub history: bool,
    /// MIND: interests per user, dynamic K, routing iterations, label-aware attention power.
    pub interests: usize,
    pub dynamic_k: bool,
    pub routing_iters: usize,
    pub attention_power: i32,
    pub example_age: bool,
    /// Longest history the user tower reads; older events are dropped.
    pub max_seq_len: usize,
    /// YouTubeDNN / DSSM: the newest this many history items also enter the user MLP one by one,
    /// next to the mean (0 = the mean only, as in the paper). Transitions / item-CF: the newest
    /// this many history items score a user (0 = all of the newest `max_seq_len`).
    pub recent: usize,
    /// Transitions / item-CF: how many positions apart two events of a sequence may be to
    /// count together (transitions: after the item only; 0 = the whole sequence). Default 1 for
    /// transitions (first order) and 0 for item-CF.
    pub window: Option<usize>,
    /// Transitions / item-CF: neighbours kept per item.
    pub neighbors: usize,
    /// Transitions / item-CF: the weight of each history item relative to the next newer one.
    pub decay: f32,
    /// Keep only the this many most frequent training items in the item table (0 = all): the
    /// knob for catalogues whose table and optimizer state do not fit in memory. Rarer items
    /// leave the histories and cannot be recalled.
    pub max_items: usize,
    /// With `max_items`, the rarer items are not dropped but share this many id rows by a hash
    /// of their row (0 = drop them): they stay in the histories and can be recalled, at the cost
    /// of sharing an embedding.
    pub hash_buckets: usize,
    /// Items of the catalogue with no training event get rows of their own when the item
    /// tower reads features: their id embedding stays zero, so their vector comes from their
    /// features alone and they can be recalled before anyone has interacted with them. Unset,
    /// this follows `[train] item_id_dropout > 0`: a tower never trained to embed an item
    /// without its id places such items poorly (on ML-1M, DSSM's HR@10 drops from 0.1245 to
    /// 0.1171 with the 179 unrated movies in the corpus).
    pub cold_items: Option<bool>,
    /// Sequential: self-attention blocks, heads per block (`dim` must be a multiple), and the
    /// inner width of each block's feed-forward layer (0 = `dim`).
    pub blocks: usize,
    pub heads: usize,
    pub ffn: usize,
    /// Sequential: what a block computes, `"transformer"` (softmax attention and a feed-forward
    /// layer) or `"hstu"` (HSTU's gated pointwise attention, no feed-forward layer).
    pub block: needle_model::seq::BlockKind,
    /// Sequential: buckets of the log2 time gap between a history event and the one before it,
    /// each a learned vector added to the event's token (0 = off). `needle serve` cannot serve
    /// such a model: the store keeps no event times.
    pub time_buckets: usize,
}

impl ModelConfig {
    /// The user features the model reads: none for the counted kinds, which must not require
    /// the default ones to exist in the data.
    pub fn read_user_features(&self) -> &[String] {
        if self.kind.is_counted() {
            &[]
        } else {
            &self.user_features
        }
    }
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            kind: ModelKind::Youtubednn,
            dim: 64,
            hidden: vec![256],
            user_features: vec!["gender".into(), "age".into(), "occupation".into(), "zip".into()],
            feature_dim: 16,
            item_features: Vec::new(),
            item_feature_dim: 16,
            item_hidden: vec![256],
            out_dim: 64,
            history: true,
            interests: 4,
            dynamic_k: false,
            routing_iters: 3,
            attention_power: 2,
            example_age: true,
            max_seq_len: 50,
            recent: 0,
            window: None,
            neighbors: 200,
            decay: 0.5,
            max_items: 0,
            hash_buckets: 0,
            cold_items: None,
            blocks: 2,
            heads: 1,
            ffn: 0,
            block: Default::default(),
            time_buckets: 0,
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LossKind {
    /// Softmax over every item (fine when the catalogue has thousands of items).
    Full,
    /// `negatives` items drawn by popularity^0.75, log-Q corrected.
    Sampled,
    /// The other positives of the batch as negatives, log-Q corrected.
    InBatch,
    /// Pointwise binary cross-entropy on the positive and `negatives` popularity-sampled items per row.
    Bce,
    /// The full softmax up to [`FULL_SOFTMAX_MAX_ITEMS`] item rows, the sampled softmax above:
    /// a step of the full softmax costs a product with the whole item table.
    Auto,
}

/// Above this many item rows, `loss = "auto"` trains with the sampled softmax.
pub const FULL_SOFTMAX_MAX_ITEMS: usize = 50_000;

impl LossKind {
    /// The loss a run over `item_rows` item rows trains with.
    pub fn resolve(self, item_rows: usize) -> LossKind {
        match self {
            LossKind::Auto if item_rows > FULL_SOFTMAX_MAX_ITEMS => LossKind::Sampled,
            LossKind::Auto => LossKind::Full,
            other => other,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LossKind::Full => "full",
            LossKind::Sampled => "sampled",
            LossKind::InBatch => "in-batch",
            LossKind::Bce => "bce",
            LossKind::Auto => "auto",
        }
    }
}

#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum SparseOptimizer {
    /// Adam moments per element, updated only on touched rows.
    Adam,
    /// One accumulator per row: a quarter of Adam's state, for very large tables.
    RowwiseAdagrad,
}

/// How the learning rates change over training.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum LrSchedule {
    /// `lr` throughout (after any warm-up).
    Constant,
    /// From `lr` after the warm-up down to 0 at the end of the last epoch, along a half cosine.
    Cosine,
}

impl LrSchedule {
    /// The factor on the learning rates at optimizer step `step` (0-based) of `total`, with a
    /// linear warm-up over the first `warmup` steps.
    pub fn factor(self, step: u64, total: u64, warmup: u64) -> f32 {
        if step < warmup {
            return (step + 1) as f32 / warmup as f32;
        }
        match self {
            LrSchedule::Constant => 1.0,
            LrSchedule::Cosine => {
                let span = total.saturating_sub(warmup).max(1);
                let done = ((step - warmup) as f64 / span as f64).min(1.0);
                (0.5 * (1.0 + (std::f64::consts::PI * done).cos())) as f32
            }
        }
    }
}

/// A validation figure that decides between epochs (and between configs when tuning).
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub enum SelectMetric {
    #[serde(rename = "hr@10")]
    Hr10,
    #[serde(rename = "ndcg@10")]
    Ndcg10,
}

impl SelectMetric {
    /// This metric's figure out of a validation's HR@10 and NDCG@10.
    pub fn pick(self, hr10: f64, ndcg10: f64) -> f64 {
        match self {
            SelectMetric::Hr10 => hr10,
            SelectMetric::Ndcg10 => ndcg10,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            SelectMetric::Hr10 => "HR@10",
            SelectMetric::Ndcg10 => "NDCG@10",
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TrainParams {
    pub epochs: usize,
    pub batch_size: usize,
    /// Learning rate of the dense layers.
    pub lr: f32,
    /// Learning rate of the embedding tables.
    pub embedding_lr: f32,
    pub loss: LossKind,
    /// Sampled negatives (per row, or per batch when `shared_negatives`).
    pub negatives: usize,
    pub shared_negatives: bool,
    /// Logits are cosine / temperature.
    pub temperature: f32,
    /// Cap on training samples per user (0 = no cap), so heavy users do not dominate.
    pub max_samples_per_user: usize,
    pub sparse_optimizer: SparseOptimizer,
    pub seed: u64,
    /// Worker threads (0 = all cores).
    pub threads: usize,
    /// Stop after this many epochs without a better validation figure (0 = never stop early).
    pub patience: usize,
    /// The validation figure that picks the best epoch (and that early stopping watches).
    pub select: SelectMetric,
    /// Users sampled for the per-epoch validation (0 = all).
    pub valid_users: usize,
    /// Share of the user MLP's hidden units dropped in training (YouTubeDNN, DSSM, MIND).
    pub dropout: f32,
    /// Share of the user MLP's inputs (history, recent items, features) dropped in training.
    pub input_dropout: f32,
    /// Decoupled (AdamW) weight decay of the dense layers.
    pub weight_decay: f32,
    /// L2 penalty on the embedding rows a step reads, applied as those rows are updated.
    pub embedding_l2: f32,
    /// Scale every step's gradients down to this global norm when above it (0 = off).
    pub clip_norm: f32,
    /// Probability that a training candidate is embedded without its id row, from its
    /// features alone, as a cold item is; teaches the item tower to embed items nobody has
    /// interacted with yet (needs `[model] item_features`).
    pub item_id_dropout: f32,
    /// Learning-rate schedule over the configured epochs (`lr` and `embedding_lr` alike).
    pub lr_schedule: LrSchedule,
    /// Optimizer steps over which the learning rates rise linearly from 0.
    pub warmup_steps: usize,
    /// Epochs the learning-rate schedule spans (0 = `epochs`). A run cut short of its schedule
    /// (a tune winner trained to its best epoch) keeps the rates it was chosen with.
    pub schedule_epochs: usize,
}

impl Default for TrainParams {
    fn default() -> Self {
        TrainParams {
            epochs: 20,
            batch_size: 1024,
            lr: 1e-3,
            embedding_lr: 1e-3,
            loss: LossKind::Auto,
            negatives: 100,
            shared_negatives: true,
            temperature: 0.05,
            max_samples_per_user: 0,
            sparse_optimizer: SparseOptimizer::Adam,
            seed: 42,
            threads: 0,
            patience: 3,
            select: SelectMetric::Hr10,
            valid_users: 0,
            dropout: 0.0,
            input_dropout: 0.0,
            weight_decay: 0.0,
            embedding_l2: 0.0,
            clip_norm: 0.0,
            item_id_dropout: 0.0,
            lr_schedule: LrSchedule::Constant,
            warmup_steps: 0,
            schedule_epochs: 0,
        }
    }
}

impl TrainParams {
    /// Epochs the learning-rate schedule spans.
    pub fn schedule_span(&self) -> usize {
        if self.schedule_epochs == 0 {
            self.epochs
        } else {
            self.schedule_epochs
        }
    }
}

impl Config {
    /// Makes the config's relative paths relative to `base`, the folder of the config file, so a
    /// config means the same data from whatever folder it is run.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        for p in [&mut self.data.schema, &mut self.data.cache, &mut self.data.binary].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// Checks the values that the types alone cannot.
    pub fn validate(&self) -> Result<(), String> {
        let sources = [self.data.dataset.is_some(), self.data.schema.is_some(), self.data.binary.is_some()];
        if sources.iter().filter(|&&s| s).count() != 1 {
            return Err("[data] needs exactly one of `dataset` (ml-1m, ml-100k), `schema` or `binary`".into());
        }
        let m = &self.model;
        if m.kind.neighbor_kind().is_some() {
            if m.max_seq_len == 0 || m.neighbors == 0 {
                return Err("[model] max_seq_len and neighbors must be > 0".into());
            }
            if !(m.decay > 0.0 && m.decay <= 1.0) {
                return Err(format!("[model] decay must be above 0 and at most 1, not {}", m.decay));
            }
            if m.recent > m.max_seq_len {
                return Err(format!("[model] recent ({}) cannot exceed max_seq_len ({})", m.recent, m.max_seq_len));
            }
            if m.max_items > 0 {
                return Err("[model] max_items applies to the trained kinds only".into());
            }
        } else if m.window.is_some() {
            return Err("[model] window applies to transitions and itemcf only".into());
        }
        if !m.kind.is_counted() {
            if m.dim == 0 || m.max_seq_len == 0 || m.feature_dim == 0 {
                return Err("[model] dim, feature_dim and max_seq_len must be > 0".into());
            }
            if m.recent > 0 && !matches!(m.kind, ModelKind::Youtubednn | ModelKind::Dssm) {
                return Err("[model] recent applies to youtubednn and dssm only".into());
            }
            if m.recent > m.max_seq_len {
                return Err(format!("[model] recent ({}) cannot exceed max_seq_len ({})", m.recent, m.max_seq_len));
            }
            if m.hidden.contains(&0) {
                return Err("[model] hidden widths must be > 0".into());
            }
        }
        let t = &self.train;
        if t.batch_size == 0 {
            return Err("[train] batch_size must be > 0".into());
        }
        if !(t.temperature > 0.0 && t.temperature.is_finite()) {
            return Err("[train] temperature must be a positive number".into());
        }
        if t.schedule_epochs > 0 && t.schedule_epochs < t.epochs {
            return Err(format!(
                "[train] schedule_epochs ({}) cannot be below epochs ({}): the rates would stay at the schedule's end",
                t.schedule_epochs, t.epochs
            ));
        }
        if !(t.lr > 0.0 && t.embedding_lr > 0.0) {
            return Err("[train] lr and embedding_lr must be > 0".into());
        }
        if matches!(t.loss, LossKind::Sampled | LossKind::Bce | LossKind::Auto) && t.negatives == 0 {
            return Err("[train] loss = \"sampled\", \"bce\" or \"auto\" needs negatives > 0".into());
        }
        if m.kind == ModelKind::Mind && (m.interests == 0 || m.routing_iters == 0 || m.attention_power < 1) {
            return Err("[model] interests, routing_iters and attention_power must be >= 1".into());
        }
        if m.hash_buckets > 0 && m.max_items == 0 {
            return Err(
                "[model] hash_buckets needs max_items: the items beyond the max_items most frequent share the buckets"
                    .into(),
            );
        }
        if m.hash_buckets > u32::MAX as usize / 2 || m.max_items > u32::MAX as usize / 2 {
            return Err("[model] max_items and hash_buckets must be below 2^31".into());
        }
        for (name, v) in [("dropout", t.dropout), ("input_dropout", t.input_dropout)] {
            if !(0.0..1.0).contains(&v) {
                return Err(format!("[train] {name} must be at least 0 and below 1"));
            }
            if v > 0.0
                && !matches!(m.kind, ModelKind::Youtubednn | ModelKind::Dssm | ModelKind::Mind | ModelKind::Sequential)
            {
                return Err(format!(
                    "[train] {name} applies to the user towers of youtubednn, dssm, mind and sequential"
                ));
            }
        }
        for (name, v) in
            [("weight_decay", t.weight_decay), ("embedding_l2", t.embedding_l2), ("clip_norm", t.clip_norm)]
        {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(format!("[train] {name} must be a number >= 0"));
            }
        }
        if !(0.0..1.0).contains(&t.item_id_dropout) {
            return Err("[train] item_id_dropout must be at least 0 and below 1".into());
        }
        if t.item_id_dropout > 0.0 && (m.item_features.is_empty() || m.kind.is_counted()) {
            return Err("[train] item_id_dropout needs [model] item_features: without them a dropped id leaves nothing to embed".into());
        }
        if m.kind == ModelKind::Sequential && (m.heads == 0 || m.dim == 0 || !m.dim.is_multiple_of(m.heads)) {
            return Err(format!("[model] dim ({}) must be a positive multiple of heads ({})", m.dim, m.heads));
        }
        if m.kind == ModelKind::Dssm && m.out_dim == 0 {
            return Err("[model] out_dim must be > 0".into());
        }
        if m.time_buckets > 0 && m.kind != ModelKind::Sequential {
            return Err("[model] time_buckets applies to the sequential kind only".into());
        }
        if m.time_buckets == 1 {
            return Err("[model] time_buckets must be 0 (off) or at least 2".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_config_parses_and_validates() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut seen = 0;
        for ds in std::fs::read_dir(&root).unwrap() {
            let ds = ds.unwrap().path();
            for f in std::fs::read_dir(&ds).unwrap() {
                let f = f.unwrap().path();
                if f.extension().is_none_or(|e| e != "toml") || f.file_name().is_some_and(|n| n == "channels.toml") {
                    continue;
                }
                let text = std::fs::read_to_string(&f).unwrap();
                let cfg: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                cfg.validate().unwrap_or_else(|e| panic!("{}: {e}", f.display()));
                seen += 1;
            }
        }
        assert!(seen >= 20, "only {seen} configs found under {}", root.display());
    }

    #[test]
    fn auto_loss_is_the_full_softmax_on_small_catalogues_and_sampled_on_large_ones() {
        assert_eq!(TrainParams::default().loss, LossKind::Auto);
        assert_eq!(LossKind::Auto.resolve(3_706), LossKind::Full);
        assert_eq!(LossKind::Auto.resolve(FULL_SOFTMAX_MAX_ITEMS), LossKind::Full);
        assert_eq!(LossKind::Auto.resolve(FULL_SOFTMAX_MAX_ITEMS + 1), LossKind::Sampled);
        assert_eq!(LossKind::InBatch.resolve(10_000_000), LossKind::InBatch);
        let cfg: Config =
            toml::from_str("[data]\ndataset = \"ml-1m\"\n[train]\nloss = \"auto\"\nnegatives = 0\n").unwrap();
        assert!(cfg.validate().unwrap_err().contains("negatives > 0"));
    }

    #[test]
    fn sequential_heads_must_divide_the_width() {
        let parse = |s: &str| -> Config { toml::from_str(&format!("[data]\ndataset = \"ml-1m\"\n{s}")).unwrap() };
        let err = parse("[model]\nkind = \"sequential\"\ndim = 64\nheads = 3\n").validate().unwrap_err();
        assert!(err.contains("multiple of heads"), "{err}");
        parse("[model]\nkind = \"sequential\"\ndim = 64\nheads = 4\n").validate().unwrap();
    }

    #[test]
    fn schedules_warm_up_then_hold_or_fall_to_zero() {
        assert_eq!(LrSchedule::Constant.factor(0, 100, 10), 0.1);
        assert_eq!(LrSchedule::Constant.factor(9, 100, 10), 1.0);
        assert_eq!(LrSchedule::Constant.factor(99, 100, 10), 1.0);
        assert_eq!(LrSchedule::Cosine.factor(10, 100, 10), 1.0);
        assert!((LrSchedule::Cosine.factor(55, 100, 10) - 0.5).abs() < 1e-6);
        assert!(LrSchedule::Cosine.factor(100, 100, 10).abs() < 1e-6);
        assert_eq!(LrSchedule::Cosine.factor(0, 100, 0), 1.0);
    }

    #[test]
    fn hashing_and_id_dropout_are_checked_against_what_they_need() {
        let parse = |s: &str| -> Config { toml::from_str(&format!("[data]\ndataset = \"ml-1m\"\n{s}")).unwrap() };
        let err = parse("[model]\nhash_buckets = 64\n").validate().unwrap_err();
        assert!(err.contains("needs max_items"), "{err}");
        assert!(parse("[model]\nhash_buckets = 64\nmax_items = 1000\n").validate().is_ok());
        let err = parse("[train]\nitem_id_dropout = 0.1\n").validate().unwrap_err();
        assert!(err.contains("needs [model] item_features"), "{err}");
        let err =
            parse("[model]\nitem_features = [\"genres\"]\n[train]\nitem_id_dropout = 1.0\n").validate().unwrap_err();
        assert!(err.contains("below 1"), "{err}");
    }
}
