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
pub use model::{merge_interests, Model};

use config::ModelKind;
use needle_data::{Dataset, LoadOptions, Split, SplitStrategy, Vocab};
use needle_model::checkpoint::{save, save_neighbors, Checkpoint};
use needle_model::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, ItemBags};
use needle_model::fm::{FmSpec, FmTwoTower};
use needle_model::mind::{MindSpec, MindTwoTower};
use needle_model::neighbors::NeighborSpec;
use needle_model::seq::{SeqSpec, SeqTwoTower};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// Bumped whenever the layout of a run directory changes incompatibly.
pub const RUN_FORMAT: u32 = 1;

/// The name under which a user's own id can be listed among the user features.
pub const USER_ID_FEATURE: &str = "user_id";

const ITEM_COUNTS_FILE: &str = "item_counts.tsv";
const MANIFEST_FILE: &str = "model.toml";
const WEIGHTS_FILE: &str = "model.safetensors";

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
    /// Shape and scoring rule of a transitions or item-CF model.
    pub neighbors: Option<NeighborSpec>,
    /// Shapes of a sequential model.
    pub seq: Option<SeqSpec>,
    pub training: TrainingSummary,
    pub config: Config,
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
    let strategy = match cfg.data.split {
        config::SplitKind::LeaveLastOut => SplitStrategy::LeaveLastOut,
        config::SplitKind::GlobalTime => {
            SplitStrategy::GlobalTime { valid_fraction: cfg.data.valid_fraction, test_fraction: cfg.data.test_fraction }
        }
    };
    let split = needle_data::split::split(&ds, &strategy)?;
    Ok((ds, split, cached))
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
    (info.deep, info.fm, info.mind, info.neighbors, info.seq) = (None, None, None, None, None);
    match contents.model {
        Model::Deep(m) => {
            save(m.as_ref(), &ckpt)?;
            info.deep = Some(m.spec.clone());
        }
        Model::Fm(m) => {
            save(m.as_ref(), &ckpt)?;
            info.fm = Some(m.spec.clone());
        }
        Model::Mind(m) => {
            save(m.as_ref(), &ckpt)?;
            info.mind = Some(m.spec.clone());
        }
        Model::Seq(m) => {
            save(m.as_ref(), &ckpt)?;
            info.seq = Some(m.spec.clone());
        }
        Model::Neighbors(n) => {
            save_neighbors(n, &ckpt)?;
            info.neighbors = Some(n.spec.clone());
        }
        Model::Popularity { .. } => {}
    }
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
    let info: RunInfo = toml::from_str(&text).map_err(|e| RunError::Invalid(format!("{}: {e}", path.display())))?;
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

/// Widths and lengths past this are not a recall model but a damaged manifest (and a tower built
/// from them would allocate terabytes before the checkpoint could be compared).
const MAX_WIDTH: usize = 1 << 14;

/// The tables a manifest declares, `(name, rows, width)`, and every other size it gives.
fn declared_shapes(info: &RunInfo) -> (Vec<(String, usize, usize)>, Vec<usize>) {
    let item_rows =
        |items: usize, hash: Option<needle_model::embedding::RowHash>| hash.map_or(items, |h| h.table_rows());
    let feats = |fs: &[CategoricalSpec], prefix: &str| {
        fs.iter().map(|f| (format!("{prefix}.{}", f.name), f.rows, f.dim)).collect::<Vec<_>>()
    };
    let (mut tables, mut sizes) = (Vec::new(), Vec::new());
    if let Some(d) = &info.deep {
        tables.push(("item_emb".to_owned(), item_rows(d.items, d.item_hash), d.dim));
        tables.extend(feats(&d.user_features, "user_feat"));
        tables.extend(feats(&d.item_features, "item_feat"));
        sizes.extend([d.dim, d.out_dim, d.recent, d.max_seq_len]);
        sizes.extend(d.hidden.iter().chain(d.item_hidden.iter().flatten()));
    }
    if let Some(f) = &info.fm {
        tables.push(("item_v".to_owned(), item_rows(f.items, f.item_hash), f.k));
        tables.extend(feats(&f.user_features, "user_feat"));
        tables.extend(feats(&f.item_features, "item_feat"));
        sizes.extend([f.k, f.max_seq_len]);
    }
    if let Some(m) = &info.mind {
        tables.push(("item_emb".to_owned(), item_rows(m.items, m.item_hash), m.dim));
        tables.extend(feats(&m.user_features, "user_feat"));
        tables.extend(feats(&m.item_features, "item_feat"));
        sizes.extend([m.dim, m.interests, m.routing_iters, m.max_seq_len]);
        sizes.extend(&m.hidden);
    }
    if let Some(s) = &info.seq {
        tables.push(("items".to_owned(), item_rows(s.items, s.item_hash), s.dim));
        sizes.extend([s.dim, s.ffn, s.max_seq_len, s.blocks, s.heads]);
    }
    (tables, sizes)
}

/// Hidden widths followed by the output width, for each MLP a manifest declares.
fn dense_chains(info: &RunInfo) -> Vec<Vec<usize>> {
    let mut chains = Vec::new();
    if let Some(d) = &info.deep {
        chains.push(d.hidden.iter().copied().chain([d.out_dim]).collect());
        if let Some(h) = &d.item_hidden {
            chains.push(h.iter().copied().chain([d.out_dim]).collect());
        }
    }
    if let Some(m) = &info.mind {
        chains.push(m.hidden.iter().copied().chain([m.out_dim()]).collect());
    }
    chains
}

/// Refuses a manifest whose shapes cannot belong to the checkpoint beside it, before anything
/// is allocated from them: every table it declares is saved in the checkpoint, so together they
/// cannot be larger than the file.
fn check_declared_shapes(info: &RunInfo, weights: &Path) -> Result<(), RunError> {
    let (tables, sizes) = declared_shapes(info);
    let bad =
        |why: String| RunError::Invalid(format!("{}: {why}; the run is damaged, train it again", weights.display()));
    if let Some(s) = sizes.iter().chain(tables.iter().map(|t| &t.2)).find(|&&s| s > MAX_WIDTH) {
        return Err(bad(format!("model.toml declares a width or length of {s}")));
    }
    let file = std::fs::metadata(weights).map_err(io(weights))?.len() as u128;
    let mut floats: u128 = tables.iter().map(|(_, rows, width)| *rows as u128 * *width as u128).sum();
    // The dense layers between hidden widths are saved too.
    for chain in dense_chains(info) {
        floats += chain.windows(2).map(|w| w[0] as u128 * w[1] as u128).sum::<u128>();
    }
    if floats * 4 > file {
        return Err(bad(format!(
            "model.toml declares tables of {floats} parameters, more than the {file}-byte checkpoint holds"
        )));
    }
    Ok(())
}

/// Rebuilds the model of a run from its manifest and checkpoint.
pub fn load_model(info: &RunInfo, dir: &Path, item_counts: &[u64]) -> Result<Model, RunError> {
    let path = dir.join(MANIFEST_FILE);
    let weights = dir.join(WEIGHTS_FILE);
    if !info.kind.is_counted() {
        check_declared_shapes(info, &weights)?;
    }
    let missing =
        |table: &str| RunError::Invalid(format!("{}: {:?} run without a [{table}] table", path.display(), info.kind));
    Ok(match info.kind {
        ModelKind::Popularity => Model::Popularity { counts: item_counts.iter().map(|&c| c as f32).collect() },
        ModelKind::Youtubednn | ModelKind::Dssm => {
            let spec = info.deep.clone().ok_or_else(|| missing("deep"))?;
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m =
                DeepTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Deep(Box::new(m))
        }
        ModelKind::Fm => {
            let spec = info.fm.clone().ok_or_else(|| missing("fm"))?;
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m = FmTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Fm(Box::new(m))
        }
        ModelKind::Mind => {
            let spec = info.mind.clone().ok_or_else(|| missing("mind"))?;
            let ckpt = Checkpoint::read(&weights)?;
            let bags = read_bags(&ckpt, &spec.item_features, spec.items, &weights)?;
            let mut m =
                MindTwoTower::new(spec, bags, &mut needle_model::rng::Rng::new(0)).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Mind(Box::new(m))
        }
        ModelKind::Sequential => {
            let spec = info.seq.clone().ok_or_else(|| missing("seq"))?;
            let ckpt = Checkpoint::read(&weights)?;
            let mut m = SeqTwoTower::new(spec, &mut needle_model::rng::Rng::new(0)).map_err(RunError::Invalid)?;
            ckpt.fill(&mut m)?;
            Model::Seq(Box::new(m))
        }
        ModelKind::Transitions | ModelKind::Itemcf => {
            let spec = info.neighbors.clone().ok_or_else(|| missing("neighbors"))?;
            if info.kind.neighbor_kind() != Some(spec.kind) || spec.items != item_counts.len() {
                return Err(RunError::Invalid(format!(
                    "{}: the [neighbors] table ({:?} over {} item rows) does not belong to a {:?} run over {} item rows",
                    path.display(),
                    spec.kind,
                    spec.items,
                    info.kind,
                    item_counts.len()
                )));
            }
            Model::Neighbors(Box::new(Checkpoint::read(&weights)?.neighbors(spec, item_counts.to_vec())?))
        }
    })
}

/// Reads and checks the item → feature-value bags saved with a model.
fn read_bags(
    ckpt: &Checkpoint,
    features: &[CategoricalSpec],
    items: usize,
    path: &Path,
) -> Result<Vec<ItemBags>, RunError> {
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
            return Err(RunError::Invalid(format!("{}: item_bags.{} are inconsistent", path.display(), f.name)));
        }
        bags.push(b);
    }
    Ok(bags)
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
