//! A run directory: everything needed to evaluate, recall with or serve a trained model.
//!
//! ```text
//! runs/NAME/
//!   model.toml          config, tower shapes, vocabulary sizes, data fingerprint, training summary
//!   model.safetensors   parameters
//!   vocab/*.tsv         raw id ↔ row for items, users and every categorical feature
//!   item_counts.tsv     training events per item row (popularity, the fallback for unknown users)
//!   train_log.jsonl     one line per epoch
//! ```

use crate::config::{Config, ModelKind};
use crate::model::Model;
use crate::prepare::{prepare, Prepared};
use crate::trainer::{EpochLog, Trained};
use crate::TrainError;
use needle_data::{Dataset, LoadOptions, Split, SplitStrategy, Vocab};
use needle_model::checkpoint::{save, Checkpoint};
use needle_model::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, ItemBags};
use needle_model::fm::{FmSpec, FmTwoTower};
use needle_model::mind::{MindSpec, MindTwoTower};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of a run directory changes incompatibly.
pub const RUN_FORMAT: u32 = 1;

const ITEM_COUNTS_FILE: &str = "item_counts.tsv";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TrainingSummary {
    pub epochs_run: usize,
    pub best_epoch: usize,
    pub seconds: f64,
    pub samples_per_epoch: usize,
    pub samples_per_sec: f64,
    pub peak_rss_mb: Option<f64>,
    pub threads: usize,
}

/// The contents of `model.toml`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunInfo {
    pub format: u32,
    pub kind: ModelKind,
    pub dataset: String,
    pub data_fingerprint: String,
    pub items: usize,
    pub users: usize,
    /// Shapes of a YouTubeDNN or DSSM model.
    pub deep: Option<DeepSpec>,
    /// Shapes of an FM model.
    pub fm: Option<FmSpec>,
    /// Shapes of a MIND model.
    pub mind: Option<MindSpec>,
    pub training: TrainingSummary,
    pub config: Config,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io { path: path.to_owned(), source: e }
}

/// Loads and splits the dataset a config names.
pub fn load_data(cfg: &Config, data_dir: Option<&Path>) -> Result<(Dataset, Split), TrainError> {
    let source = match (&cfg.data.dataset, &cfg.data.schema) {
        (Some(name), None) => {
            // The same parser as `needle data download` and `train --download`, so one spelling
            // works everywhere.
            let name: needle_data::DatasetName = name.parse().map_err(TrainError::Config)?;
            needle_data::DatasetSource::MovieLens(name)
        }
        (None, Some(schema)) => needle_data::DatasetSource::Csv { schema: schema.clone() },
        _ => return Err(TrainError::Config("[data] needs exactly one of `dataset` or `schema`".into())),
    };
    let opts = LoadOptions { skip_bad_rows: cfg.data.skip_bad_rows };
    let ds = needle_data::load(&source, data_dir, &opts)?;
    let strategy = match cfg.data.split {
        crate::config::SplitKind::LeaveLastOut => SplitStrategy::LeaveLastOut,
        crate::config::SplitKind::GlobalTime => {
            SplitStrategy::GlobalTime { valid_fraction: cfg.data.valid_fraction, test_fraction: cfg.data.test_fraction }
        }
    };
    let split = needle_data::split::split(&ds, &strategy)?;
    Ok((ds, split))
}

fn vocab_files(p: &Prepared) -> Vec<(String, &Vocab)> {
    let mut v = vec![("items".to_string(), &p.items), ("users".to_string(), &p.users)];
    for (n, voc) in p.user_feature_names.iter().zip(&p.user_feature_vocabs) {
        v.push((format!("user_feat.{n}"), voc));
    }
    for (n, voc) in &p.item_features {
        v.push((format!("item_feat.{n}"), voc));
    }
    v
}

/// Writes a trained model and everything needed to use it into `dir`.
pub fn save_run(
    dir: &Path,
    cfg: &Config,
    ds: &Dataset,
    p: &Prepared,
    t: &Trained,
    threads: usize,
) -> Result<RunInfo, TrainError> {
    std::fs::create_dir_all(dir.join("vocab")).map_err(io(dir))?;
    for (name, vocab) in vocab_files(p) {
        vocab.save(&dir.join("vocab").join(format!("{name}.tsv")))?;
    }
    let counts: String = p.item_counts.iter().enumerate().skip(1).map(|(row, c)| format!("{row}\t{c}\n")).collect();
    let counts_path = dir.join(ITEM_COUNTS_FILE);
    std::fs::write(&counts_path, counts).map_err(io(&counts_path))?;
    let ckpt = dir.join("model.safetensors");
    let (mut deep, mut fm, mut mind) = (None, None, None);
    match &t.model {
        Model::Deep(m) => {
            save(m.as_ref(), &ckpt)?;
            deep = Some(m.spec.clone());
        }
        Model::Fm(m) => {
            save(m.as_ref(), &ckpt)?;
            fm = Some(m.spec.clone());
        }
        Model::Mind(m) => {
            save(m.as_ref(), &ckpt)?;
            mind = Some(m.spec.clone());
        }
        Model::Popularity { .. } => {}
    }
    let info = RunInfo {
        format: RUN_FORMAT,
        kind: cfg.model.kind,
        dataset: ds.name.clone(),
        data_fingerprint: ds.fingerprint(),
        items: p.items.len() - 1,
        users: p.users.len() - 1,
        deep,
        fm,
        mind,
        training: TrainingSummary {
            epochs_run: t.epochs.len(),
            best_epoch: t.best_epoch,
            seconds: t.seconds,
            samples_per_epoch: t.samples_per_epoch,
            samples_per_sec: t.samples_per_sec,
            peak_rss_mb: crate::trainer::peak_rss_mb(),
            threads,
        },
        config: cfg.clone(),
    };
    let text = toml::to_string_pretty(&info).map_err(|e| TrainError::Config(e.to_string()))?;
    let path = dir.join("model.toml");
    std::fs::write(&path, text).map_err(io(&path))?;
    Ok(info)
}

/// Appends one epoch record to `train_log.jsonl`.
pub fn append_log(dir: &Path, rec: &EpochLog) -> Result<(), TrainError> {
    use std::io::Write;
    let path = dir.join("train_log.jsonl");
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io(&path))?;
    let line = serde_json::to_string(rec).map_err(|e| TrainError::Config(e.to_string()))?;
    writeln!(f, "{line}").map_err(io(&path))
}

/// A run loaded back: its manifest, the re-prepared data and the model.
pub struct LoadedRun {
    pub dir: PathBuf,
    pub info: RunInfo,
    pub dataset: Dataset,
    pub prepared: Prepared,
    pub model: Model,
}

/// Reads and checks `dir/model.toml`.
pub fn read_info(dir: &Path) -> Result<RunInfo, TrainError> {
    let path = dir.join("model.toml");
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => TrainError::Config(format!(
            "{} is not a run directory (no model.toml); train one with `needle train --config ... --out {}`",
            dir.display(),
            dir.display()
        )),
        _ => TrainError::Io { path: path.clone(), source: e },
    })?;
    let info: RunInfo = toml::from_str(&text).map_err(|e| TrainError::Config(format!("{}: {e}", path.display())))?;
    if info.format != RUN_FORMAT {
        return Err(TrainError::Config(format!(
            "{}: run format {} is not supported (this build reads format {RUN_FORMAT})",
            path.display(),
            info.format
        )));
    }
    Ok(info)
}

/// Reads `dir/model.toml`, reloads and re-splits the data (checking that it is the data the
/// model was trained on) and loads the parameters.
pub fn load_run(dir: &Path, data_dir: Option<&Path>) -> Result<LoadedRun, TrainError> {
    let info = read_info(dir)?;
    let (dataset, split) = load_data(&info.config, data_dir)?;
    let fp = dataset.fingerprint();
    if fp != info.data_fingerprint {
        return Err(TrainError::Config(format!(
            "the data found now (fingerprint {fp}) is not the data this model was trained on ({}); point --data-dir at the original copy",
            info.data_fingerprint
        )));
    }
    let prepared = prepare(&dataset, &split, &info.config.model)?;
    for (name, vocab) in vocab_files(&prepared) {
        let saved = Vocab::load(&dir.join("vocab").join(format!("{name}.tsv")))?;
        if saved.len() != vocab.len() || saved.iter().zip(vocab.iter()).any(|(a, b)| a != b) {
            return Err(TrainError::Config(format!("vocabulary {name} of {} does not match the data", dir.display())));
        }
    }
    let model = load_model(&info, dir, &prepared.item_counts)?;
    Ok(LoadedRun { dir: dir.to_owned(), info, dataset, prepared, model })
}

/// What serving needs of a run, read from the run directory alone (no training data).
pub struct ServingRun {
    pub dir: PathBuf,
    pub info: RunInfo,
    pub items: Vocab,
    /// The user features the model reads, in its order, and their value vocabularies
    /// (`user_id`'s is the user vocabulary).
    pub user_feature_names: Vec<String>,
    pub user_feature_vocabs: Vec<Vocab>,
    /// Training events per item row (row 0 = padding).
    pub item_counts: Vec<u64>,
    pub model: Model,
}

impl From<LoadedRun> for ServingRun {
    fn from(r: LoadedRun) -> Self {
        ServingRun {
            dir: r.dir,
            info: r.info,
            items: r.prepared.items,
            user_feature_names: r.prepared.user_feature_names,
            user_feature_vocabs: r.prepared.user_feature_vocabs,
            item_counts: r.prepared.item_counts,
            model: r.model,
        }
    }
}

/// Loads a run for serving from its directory alone: manifest, vocabularies, item counts and
/// parameters. Runs saved before `item_counts.tsv` existed fall back to [`load_run`], which
/// needs the training data.
pub fn load_for_serving(dir: &Path, data_dir: Option<&Path>) -> Result<ServingRun, TrainError> {
    let info = read_info(dir)?;
    let counts_path = dir.join(ITEM_COUNTS_FILE);
    if !counts_path.exists() {
        return load_run(dir, data_dir).map(ServingRun::from);
    }
    let items = Vocab::load(&dir.join("vocab").join("items.tsv"))?;
    let text = std::fs::read_to_string(&counts_path).map_err(io(&counts_path))?;
    let mut item_counts = vec![0u64; items.len()];
    for (i, line) in text.lines().enumerate() {
        let bad = || TrainError::Config(format!("{}:{}: expected `row<TAB>count`", counts_path.display(), i + 1));
        let (row, count) = line.split_once('\t').ok_or_else(bad)?;
        let row: usize = row.parse().map_err(|_| bad())?;
        *item_counts.get_mut(row).ok_or_else(bad)? = count.parse().map_err(|_| bad())?;
    }
    let user_feature_names = info.config.model.read_user_features().to_vec();
    let user_feature_vocabs = user_feature_names
        .iter()
        .map(|n| Vocab::load(&dir.join("vocab").join(format!("user_feat.{n}.tsv"))))
        .collect::<Result<Vec<_>, _>>()?;
    let model = load_model(&info, dir, &item_counts)?;
    if model.item_rows() != items.len() {
        return Err(TrainError::Config(format!(
            "{}: the model has {} item rows but vocab/items.tsv has {}",
            dir.display(),
            model.item_rows(),
            items.len()
        )));
    }
    Ok(ServingRun { dir: dir.to_owned(), info, items, user_feature_names, user_feature_vocabs, item_counts, model })
}

/// Rebuilds the model of a run from its manifest and checkpoint.
fn load_model(info: &RunInfo, dir: &Path, item_counts: &[u64]) -> Result<Model, TrainError> {
    let path = dir.join("model.toml");
    Ok(match info.kind {
        ModelKind::Popularity => Model::Popularity { counts: item_counts.iter().map(|&c| c as f32).collect() },
        ModelKind::Youtubednn | ModelKind::Dssm => {
            let spec = info.deep.clone().ok_or_else(|| {
                TrainError::Config(format!("{}: {:?} run without a [deep] table", path.display(), info.kind))
            })?;
            Model::Deep(Box::new(load_deep(spec, &dir.join("model.safetensors"))?))
        }
        ModelKind::Fm => {
            let spec = info
                .fm
                .clone()
                .ok_or_else(|| TrainError::Config(format!("{}: fm run without an [fm] table", path.display())))?;
            let ckpt = Checkpoint::read(&dir.join("model.safetensors"))?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &dir.join("model.safetensors"))?;
            let mut m = FmTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(TrainError::Config)?;
            ckpt.fill(&mut m)?;
            Model::Fm(Box::new(m))
        }
        ModelKind::Mind => {
            let spec = info
                .mind
                .clone()
                .ok_or_else(|| TrainError::Config(format!("{}: mind run without a [mind] table", path.display())))?;
            let ckpt = Checkpoint::read(&dir.join("model.safetensors"))?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &dir.join("model.safetensors"))?;
            let mut m =
                MindTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(TrainError::Config)?;
            ckpt.fill(&mut m)?;
            Model::Mind(Box::new(m))
        }
    })
}

/// Reads and checks the item → feature-value bags saved with a model.
fn read_bags(
    ckpt: &Checkpoint,
    features: &[CategoricalSpec],
    items: usize,
    path: &Path,
) -> Result<Vec<ItemBags>, TrainError> {
    let mut bags = Vec::with_capacity(features.len());
    for f in features {
        let b = ItemBags {
            offsets: ckpt.u32_tensor(&format!("item_bags.{}.offsets", f.name))?,
            keys: ckpt.u32_tensor(&format!("item_bags.{}.keys", f.name))?,
        };
        let consistent = b.offsets.len() == items + 1
            && b.offsets.windows(2).all(|w| w[0] <= w[1])
            && b.offsets.last().copied() == Some(b.keys.len() as u32)
            && b.keys.iter().all(|&k| (k as usize) < f.rows);
        if !consistent {
            return Err(TrainError::Config(format!("{}: item_bags.{} are inconsistent", path.display(), f.name)));
        }
        bags.push(b);
    }
    Ok(bags)
}

/// Rebuilds a YouTubeDNN / DSSM model from its spec and checkpoint.
fn load_deep(spec: DeepSpec, path: &Path) -> Result<DeepTwoTower, TrainError> {
    let ckpt = Checkpoint::read(path)?;
    let bags = read_bags(&ckpt, &spec.item_features, spec.items, path)?;
    let mut model = DeepTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(TrainError::Config)?;
    ckpt.fill(&mut model)?;
    Ok(model)
}
