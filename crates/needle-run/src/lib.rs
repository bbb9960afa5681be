//! A run directory: everything needed to evaluate, recall with or serve a trained model.
//!
//! ```text
//! runs/NAME/
//!   model.toml          config, tower shapes, vocabulary sizes, data fingerprint, training summary
//!   model.safetensors   parameters (the neighbour lists of transitions and item-CF)
//!   vocab/*.tsv         raw id ↔ row for items, users and every categorical feature
//!   item_counts.tsv     per item row: training events (popularity, the fallback for unknown
//!                       users) and the time of its first training event (the `newest` channel)
//!   train_log.jsonl     one line per epoch
//! ```
//!
//! Training writes runs and serving reads them; this crate is the format both agree on, so the
//! server never links the training code.

pub mod channels;
pub mod config;
pub mod model;

pub use config::Config;
use model::declared_shapes;
pub use model::{load_model, merge_interests, Model, TowerSpec};

use config::ModelKind;
use needle_data::{Dataset, LoadOptions, Split, SplitStrategy, Vocab};
use needle_model::deep::DeepSpec;
use needle_model::fm::FmSpec;
use needle_model::mind::MindSpec;
use needle_model::neighbors::NeighborSpec;
use needle_model::seq::SeqSpec;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of a run directory changes incompatibly.
pub const RUN_FORMAT: u32 = 1;

/// The name under which a user's own id can be listed among the user features.
pub const USER_ID_FEATURE: &str = "user_id";

const ITEM_COUNTS_FILE: &str = "item_counts.tsv";
pub(crate) const MANIFEST_FILE: &str = "model.toml";
pub(crate) const WEIGHTS_FILE: &str = "model.safetensors";

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Data(#[from] needle_data::DataError),
    #[error("{0}")]
    Invalid(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] needle_model::ModelError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> RunError + '_ {
    move |e| RunError::Io { path: path.to_owned(), source: e }
}

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
#[serde(try_from = "ManifestFields")]
pub struct RunInfo {
    pub format: u32,
    pub kind: ModelKind,
    pub dataset: String,
    pub data_fingerprint: String,
    pub items: usize,
    pub users: usize,
    /// The tower and its shapes (`[tower.deep]`, `[tower.seq]`, …).
    pub tower: TowerSpec,
    pub training: TrainingSummary,
    pub config: Config,
}

impl RunInfo {
    /// Newest history items the run reads: its tower's own length, which training, evaluation,
    /// the store and the server all use (the config's value for popularity, which reads none).
    pub fn max_seq_len(&self) -> usize {
        self.tower.max_seq_len().unwrap_or(self.config.model.max_seq_len)
    }
}

/// `model.toml` as written, including the layout before `[tower]`, when each family's shapes
/// had a table of its own at the top level (`[deep]`, `[seq]`, …): such runs still load.
#[derive(Deserialize)]
struct ManifestFields {
    format: u32,
    kind: ModelKind,
    dataset: String,
    data_fingerprint: String,
    items: usize,
    users: usize,
    tower: Option<TowerSpec>,
    deep: Option<DeepSpec>,
    fm: Option<FmSpec>,
    mind: Option<MindSpec>,
    neighbors: Option<NeighborSpec>,
    seq: Option<SeqSpec>,
    training: TrainingSummary,
    config: Config,
}

impl TryFrom<ManifestFields> for RunInfo {
    type Error = String;

    fn try_from(m: ManifestFields) -> Result<Self, String> {
        let legacy = [
            m.deep.map(TowerSpec::Deep),
            m.fm.map(TowerSpec::Fm),
            m.mind.map(TowerSpec::Mind),
            m.neighbors.map(TowerSpec::Neighbors),
            m.seq.map(TowerSpec::Seq),
        ];
        let mut found = m.tower.into_iter().chain(legacy.into_iter().flatten());
        let tower = match (found.next(), found.next()) {
            (Some(t), None) => t,
            (None, None) if m.kind == ModelKind::Popularity => TowerSpec::Popularity,
            (None, None) => return Err(format!("a {:?} run needs its tower's shapes ([tower])", m.kind)),
            (_, Some(_)) => return Err("the manifest describes more than one tower".into()),
        };
        Ok(RunInfo {
            format: m.format,
            kind: m.kind,
            dataset: m.dataset,
            data_fingerprint: m.data_fingerprint,
            items: m.items,
            users: m.users,
            tower,
            training: m.training,
            config: m.config,
        })
    }
}

/// Serves allocations of 1 MiB and more from their own mappings, returned to the OS when freed.
/// glibc otherwise raises that threshold each time such a block is freed, so after a reload or
/// two a long-running server keeps its large buffers (posting lists, model tables) in the heap,
/// and [`trim_heap`] then spends tens of milliseconds releasing them while holding the lock of an
/// arena that request threads allocate from: a latency spike on every reload.
pub fn map_large_allocations() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes an allocator tuning parameter.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 20);
    }
}

/// Hands freed heap pages back to the OS (glibc keeps them otherwise): called after a large
/// load is dropped, so the resident size reflects what is still in use.
pub fn trim_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases unused memory of the allocator's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Loads and splits the dataset a config names.
pub fn load_data(cfg: &Config, data_dir: Option<&Path>) -> Result<(Dataset, Split), RunError> {
    let (ds, split, _) = load_data_with(cfg, data_dir, &mut |_, _| {})?;
    Ok((ds, split))
}

/// [`load_data`] through the binary dataset (ingested on first use, rebuilt when stale or
/// damaged), reporting `(bytes read, total)` while a text source is parsed and how the
/// dataset was found.
pub fn load_data_with(
    cfg: &Config,
    data_dir: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Dataset, Split, needle_data::Cached), RunError> {
    if let Some(dir) = &cfg.data.binary {
        let ds = needle_data::Packed::open(dir)?.dataset()?;
        let split = split_by(cfg, &ds)?;
        return Ok((ds, split, needle_data::Cached::Hit(dir.clone())));
    }
    let source = match (&cfg.data.dataset, &cfg.data.schema) {
        (Some(name), None) => {
            // The same parser as `needle data download` and `train --download`, so one spelling
            // works everywhere.
            let name: needle_data::DatasetName = name.parse().map_err(RunError::Invalid)?;
            needle_data::DatasetSource::MovieLens(name)
        }
        (None, Some(schema)) => needle_data::DatasetSource::Csv { schema: schema.clone() },
        _ => return Err(RunError::Invalid("[data] needs exactly one of `dataset` or `schema`".into())),
    };
    let opts = LoadOptions { skip_bad_rows: cfg.data.skip_bad_rows };
    let (ds, cached) = needle_data::load_cached(&source, data_dir, &opts, cfg.data.cache.as_deref(), progress)?;
    let split = split_by(cfg, &ds)?;
    Ok((ds, split, cached))
}

/// Splits `ds` as `cfg` says.
pub fn split_by(cfg: &Config, ds: &Dataset) -> Result<Split, RunError> {
    let strategy = match cfg.data.split {
        config::SplitKind::LeaveLastOut => SplitStrategy::LeaveLastOut,
        config::SplitKind::GlobalTime => {
            SplitStrategy::GlobalTime { valid_fraction: cfg.data.valid_fraction, test_fraction: cfg.data.test_fraction }
        }
    };
    Ok(needle_data::split::split(ds, &strategy)?)
}

/// Loads the data a run was trained on and refuses any other: the fingerprint of what is found
/// now must be the one saved in the manifest.
pub fn load_run_data(info: &RunInfo, data_dir: Option<&Path>) -> Result<(Dataset, Split), RunError> {
    let (dataset, split) = load_data(&info.config, data_dir)?;
    let fp = dataset.fingerprint();
    if fp != info.data_fingerprint {
        return Err(RunError::Invalid(format!(
            "the data found now (fingerprint {fp}) is not the data this model was trained on ({}); point --data-dir at the original copy",
            info.data_fingerprint
        )));
    }
    Ok((dataset, split))
}

/// What a run directory holds besides its manifest, borrowed from the trainer for writing.
pub struct RunContents<'a> {
    /// `(file stem, vocabulary)`: `items`, `users`, `user_feat.NAME`, `item_feat.NAME`.
    pub vocabs: Vec<(String, &'a Vocab)>,
    /// Training events per item row (row 0 = padding).
    pub item_counts: &'a [u64],
    /// Each item row's first training event, Unix seconds (0 without one).
    pub item_first_seen: &'a [i64],
    pub model: &'a Model,
}

/// Writes a run into `dir`. The manifest goes last, through a temporary file and a rename: a
/// directory whose writing was interrupted has no `model.toml` and is never read as a run.
pub fn write_run(dir: &Path, info: &mut RunInfo, contents: &RunContents<'_>) -> Result<(), RunError> {
    std::fs::create_dir_all(dir.join("vocab")).map_err(io(dir))?;
    let manifest = dir.join(MANIFEST_FILE);
    match std::fs::remove_file(&manifest) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&manifest)(e)),
        _ => {}
    }
    for (name, vocab) in &contents.vocabs {
        vocab.save(&dir.join("vocab").join(format!("{name}.tsv")))?;
    }
    let first = |row: usize| contents.item_first_seen.get(row).copied().unwrap_or(0);
    let counts: String = contents
        .item_counts
        .iter()
        .enumerate()
        .skip(1)
        .map(|(row, c)| format!("{row}\t{c}\t{}\n", first(row)))
        .collect();
    let counts_path = dir.join(ITEM_COUNTS_FILE);
    std::fs::write(&counts_path, counts).map_err(io(&counts_path))?;
    let ckpt = dir.join(WEIGHTS_FILE);
    info.tower = model::save_model(contents.model, &ckpt)?;
    let text = toml::to_string_pretty(&*info).map_err(|e| RunError::Invalid(e.to_string()))?;
    needle_core::file::write_atomic(&manifest, text.as_bytes()).map_err(io(&manifest))
}

/// Reads and checks `dir/model.toml`.
pub fn read_info(dir: &Path) -> Result<RunInfo, RunError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| match e.kind() {
        // The manifest is written last, so other run files without it mean an interrupted write.
        std::io::ErrorKind::NotFound if dir.join(WEIGHTS_FILE).exists() || dir.join("vocab").exists() => {
            RunError::Invalid(format!(
                "{} holds an incomplete run (its writing was interrupted: no model.toml); train it again",
                dir.display()
            ))
        }
        std::io::ErrorKind::NotFound => RunError::Invalid(format!(
            "{} is not a run directory (no model.toml); train one with `needle train --config ... --out {}`",
            dir.display(),
            dir.display()
        )),
        _ => RunError::Io { path: path.clone(), source: e },
    })?;
    let mut info: RunInfo = toml::from_str(&text).map_err(|e| RunError::Invalid(format!("{}: {e}", path.display())))?;
    // A run's own data folder moves with the run.
    if let Some(b) = info.config.data.binary.as_mut().filter(|b| b.is_relative()) {
        *b = dir.join(&*b);
    }
    if info.format != RUN_FORMAT {
        return Err(RunError::Invalid(format!(
            "{}: run format {} is not supported (this build reads format {RUN_FORMAT})",
            path.display(),
            info.format
        )));
    }
    Ok(info)
}

/// Reads one of the run's vocabularies (`items`, `users`, `user_feat.NAME`, `item_feat.NAME`).
pub fn read_vocab(dir: &Path, name: &str) -> Result<Vocab, RunError> {
    Ok(Vocab::load(&dir.join("vocab").join(format!("{name}.tsv")))?)
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
    /// Each item row's first training event (Unix seconds, 0 without one); `None` for runs
    /// saved before the file carried it.
    pub item_first_seen: Option<Vec<i64>>,
    /// The item features the item tower reads, in its order, and their value vocabularies;
    /// empty for towers that read item ids only.
    pub item_feature_names: Vec<String>,
    pub item_feature_vocabs: Vec<Vocab>,
    pub model: Model,
}

/// Reads `item_counts.tsv` for an item vocabulary of `rows` rows (padding included): the
/// counts, and the first-event times when every line has them.
fn read_item_counts(dir: &Path, rows: usize) -> Result<(Vec<u64>, Option<Vec<i64>>), RunError> {
    let counts_path = dir.join(ITEM_COUNTS_FILE);
    let text = std::fs::read_to_string(&counts_path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => RunError::Invalid(format!(
            "{} has no {ITEM_COUNTS_FILE} (it was saved by an older needle); train it again",
            dir.display()
        )),
        _ => io(&counts_path)(e),
    })?;
    let mut item_counts = vec![0u64; rows];
    let mut first_seen = Some(vec![0i64; rows]);
    for (i, line) in text.lines().enumerate() {
        let bad = || {
            RunError::Invalid(format!("{}:{}: expected `row<TAB>count[<TAB>first time]`", counts_path.display(), i + 1))
        };
        let mut fields = line.split('\t');
        let (Some(row), Some(count)) = (fields.next(), fields.next()) else { return Err(bad()) };
        let row: usize = row.parse().map_err(|_| bad())?;
        *item_counts.get_mut(row).ok_or_else(bad)? = count.parse().map_err(|_| bad())?;
        match fields.next() {
            Some(t) => {
                if let Some(f) = first_seen.as_mut() {
                    f[row] = t.parse().map_err(|_| bad())?;
                }
            }
            None => first_seen = None,
        }
        if fields.next().is_some() {
            return Err(bad());
        }
    }
    Ok((item_counts, first_seen))
}

/// Loads a run for serving from its directory alone: manifest, vocabularies, item counts and
/// parameters.
pub fn load_for_serving(dir: &Path) -> Result<ServingRun, RunError> {
    let info = read_info(dir)?;
    let items = read_vocab(dir, "items")?;
    let (item_counts, item_first_seen) = read_item_counts(dir, items.len())?;
    let user_feature_names = info.config.model.read_user_features().to_vec();
    let (tables, _) = declared_shapes(&info);
    let user_feature_vocabs = read_feature_vocabs(dir, "user_feat", &user_feature_names, &tables)?;
    let model = load_model(&info, dir, &item_counts)?;
    // Only towers that embed items from features need their vocabularies.
    let item_feature_names =
        if model.reads_item_features() { info.config.model.item_features.clone() } else { Vec::new() };
    let item_feature_vocabs = read_feature_vocabs(dir, "item_feat", &item_feature_names, &tables)?;
    if model.item_rows() != items.len() {
        return Err(RunError::Invalid(format!(
            "{}: the model has {} item rows but vocab/items.tsv has {}",
            dir.display(),
            model.item_rows(),
            items.len()
        )));
    }
    Ok(ServingRun {
        dir: dir.to_owned(),
        info,
        items,
        user_feature_names,
        user_feature_vocabs,
        item_counts,
        item_first_seen,
        item_feature_names,
        item_feature_vocabs,
        model,
    })
}

/// The value vocabularies `vocab/PREFIX.NAME.tsv` of the named features. A vocabulary longer
/// than the model's table (`tables`, as [`declared_shapes`] gives them) is refused: its values
/// would index past the table when a request names them.
fn read_feature_vocabs(
    dir: &Path,
    prefix: &str,
    names: &[String],
    tables: &[(String, usize, usize)],
) -> Result<Vec<Vocab>, RunError> {
    names
        .iter()
        .map(|name| {
            let vocab = read_vocab(dir, &format!("{prefix}.{name}"))?;
            let table = format!("{prefix}.{name}");
            if let Some((_, rows, _)) = tables.iter().find(|t| t.0 == table) {
                if vocab.len() > *rows {
                    return Err(RunError::Invalid(format!(
                        "{}: vocab/{table}.tsv has {} values but the model's table has {rows} rows",
                        dir.display(),
                        vocab.len()
                    )));
                }
            }
            Ok(vocab)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_counts_carry_first_event_times_and_older_files_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(ITEM_COUNTS_FILE);
        std::fs::write(&path, "1\t5\t1000\n2\t0\t0\n3\t2\t900\n").unwrap();
        let (counts, first) = read_item_counts(dir.path(), 4).unwrap();
        assert_eq!((counts, first), (vec![0, 5, 0, 2], Some(vec![0, 1000, 0, 900])));
        // Written before the times: counts only, and no `newest` order.
        std::fs::write(&path, "1\t5\n2\t0\n3\t2\n").unwrap();
        assert_eq!(read_item_counts(dir.path(), 4).unwrap(), (vec![0, 5, 0, 2], None));
        for bad in ["1\t5\tsoon\n", "1\t5\t1\t2\n", "9\t1\t1\n", "1\n"] {
            std::fs::write(&path, bad).unwrap();
            let e = read_item_counts(dir.path(), 4).unwrap_err().to_string();
            assert!(e.contains("expected `row<TAB>count[<TAB>first time]`"), "{bad:?}: {e}");
        }
    }
}
