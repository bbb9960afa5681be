//! Checkpoints and run directories: what `needle serve` reads at start and on every reload.

use std::path::Path;
use std::sync::OnceLock;

use needle_data::Vocab;
use needle_model::checkpoint::Checkpoint;
use needle_model::deep::{CategoricalSpec, DeepSpec, DeepTwoTower, HistoryMode, ItemBags};
use needle_model::fm::{FmSpec, FmTwoTower};
use needle_model::mind::{MindSpec, MindTwoTower};
use needle_model::neighbors::{ItemNeighbors, NeighborKind, NeighborSpec, Scratch};
use needle_model::rng::Rng;
use needle_model::seq::{SeqSpec, SeqTwoTower};
use needle_run::config::{Config, DataConfig, ModelConfig, ModelKind, SplitKind, TrainParams};
use needle_run::{load_for_serving, read_info, write_run, Model, RunContents, RunInfo, ServingRun, TrainingSummary};

use crate::{put, scratch, selector};

/// The files of a run that serving reads, in selector order.
pub const RUN_FILES: [&str; 6] = [
    "model.toml",
    "model.safetensors",
    "item_counts.tsv",
    "vocab/items.tsv",
    "vocab/user_feat.gender.tsv",
    "vocab/item_feat.genres.tsv",
];

/// The model kinds of the template runs, in selector order.
pub const KINDS: [ModelKind; 6] = [
    ModelKind::Youtubednn,
    ModelKind::Fm,
    ModelKind::Mind,
    ModelKind::Popularity,
    ModelKind::Transitions,
    ModelKind::Sequential,
];

const ITEM_ROWS: usize = 6;
const ITEM_COUNTS: [u64; ITEM_ROWS] = [0, 5, 3, 2, 1, 1];

fn neighbor_spec() -> NeighborSpec {
    NeighborSpec {
        kind: NeighborKind::Transitions,
        items: ITEM_ROWS,
        window: 1,
        neighbors: 3,
        recent: 2,
        decay: 0.5,
        max_seq_len: 3,
    }
}

/// Every file of a small valid run, by path relative to the run directory.
pub struct RunTemplate {
    pub kind: ModelKind,
    pub files: Vec<(String, Vec<u8>)>,
}

fn genre_bags() -> ItemBags {
    ItemBags { offsets: vec![0, 0, 1, 3, 3, 4, 5], keys: vec![1, 2, 3, 1, 2] }
}

fn cat(name: &str, rows: usize, dim: usize) -> CategoricalSpec {
    CategoricalSpec { name: name.to_owned(), rows, dim }
}

/// A tiny trained-looking model of `kind`: six item rows, a `gender` user feature and a
/// `genres` item feature, as the template runs hold.
fn tiny_model(kind: ModelKind, bags: Vec<ItemBags>) -> Result<Model, String> {
    let mut rng = Rng::new(7);
    Ok(match kind {
        ModelKind::Youtubednn | ModelKind::Dssm => Model::Deep(Box::new(DeepTwoTower::new(
            DeepSpec {
                items: ITEM_ROWS,
                dim: 4,
                max_seq_len: 3,
                history: HistoryMode::Shared,
                user_features: vec![cat("gender", 3, 2)],
                item_features: vec![cat("genres", 4, 2)],
                hidden: vec![8],
                item_hidden: None,
                out_dim: 6,
                example_age: true,
                recent: 1,
                item_hash: None,
            },
            bags,
            &mut rng,
        )?)),
        ModelKind::Fm => Model::Fm(Box::new(FmTwoTower::new(
            FmSpec {
                items: ITEM_ROWS,
                k: 3,
                max_seq_len: 3,
                history: true,
                user_features: vec![cat("gender", 3, 3)],
                item_features: vec![cat("genres", 4, 3)],
                item_hash: None,
            },
            bags,
            &mut rng,
        )?)),
        ModelKind::Mind => Model::Mind(Box::new(MindTwoTower::new(
            MindSpec {
                items: ITEM_ROWS,
                dim: 4,
                max_seq_len: 3,
                interests: 2,
                dynamic_k: true,
                routing_iters: 2,
                routing_seed: 5,
                user_features: vec![cat("gender", 3, 2)],
                item_features: vec![cat("genres", 4, 2)],
                hidden: vec![8],
                item_hash: None,
            },
            bags,
            &mut rng,
        )?)),
        ModelKind::Sequential => Model::Seq(Box::new(SeqTwoTower::new(
            SeqSpec {
                items: ITEM_ROWS,
                dim: 4,
                max_seq_len: 3,
                blocks: 1,
                heads: 2,
                ffn: 5,
                item_hash: None,
                block: Default::default(),
                time_buckets: 0,
            },
            &mut rng,
        )?)),
        ModelKind::Popularity => Model::Popularity { counts: ITEM_COUNTS.iter().map(|&c| c as f32).collect() },
        ModelKind::Transitions | ModelKind::Itemcf => Model::Neighbors(Box::new(ItemNeighbors::build(
            neighbor_spec(),
            &[0, 3, 6],
            &[1, 2, 3, 2, 4, 5],
            &ITEM_COUNTS,
        )?)),
    })
}

/// Writes a run of `kind` with needle's own writer and reads its files back.
fn build_template(kind: ModelKind) -> RunTemplate {
    let dir = scratch();
    let model = match tiny_model(kind, vec![genre_bags()]) {
        Ok(m) => m,
        Err(e) => panic!("the template {kind:?} model is invalid: {e}"),
    };
    let items = Vocab::from_ids(&["i1", "i2", "i3", "i4", "i5"]);
    let users = Vocab::from_ids(&["u1", "u2"]);
    let gender = Vocab::from_ids(&["F", "M"]);
    let genres = Vocab::from_ids(&["Comedy", "Drama", "Horror"]);
    let model_config = ModelConfig {
        kind,
        dim: 4,
        user_features: vec!["gender".into()],
        item_features: vec!["genres".into()],
        max_seq_len: 3,
        ..ModelConfig::default()
    };
    let mut info = RunInfo {
        format: needle_run::RUN_FORMAT,
        kind,
        dataset: "fuzz".into(),
        data_fingerprint: "00112233445566778899aabb".into(),
        items: items.len() - 1,
        users: users.len() - 1,
        // Filled in by `write_run` from the model it saves.
        tower: needle_run::TowerSpec::Popularity,
        training: TrainingSummary {
            epochs_run: 1,
            best_epoch: 1,
            seconds: 0.5,
            samples_per_epoch: 10,
            samples_per_sec: 20.0,
            peak_rss_mb: None,
            threads: 1,
        },
        config: Config {
            data: DataConfig {
                dataset: Some("ml-1m".into()),
                schema: None,
                binary: None,
                cache: None,
                split: SplitKind::LeaveLastOut,
                valid_fraction: 0.1,
                test_fraction: 0.1,
                skip_bad_rows: false,
            },
            model: model_config,
            train: TrainParams::default(),
            tune: None,
        },
    };
    let contents = RunContents {
        vocabs: vec![
            ("items".into(), &items),
            ("users".into(), &users),
            ("user_feat.gender".into(), &gender),
            ("item_feat.genres".into(), &genres),
        ],
        item_counts: &ITEM_COUNTS,
        item_first_seen: &[],
        model: &model,
    };
    if let Err(e) = write_run(dir.path(), &mut info, &contents) {
        panic!("cannot write the template {kind:?} run: {e}");
    }
    let mut files = Vec::new();
    for name in RUN_FILES.iter().copied().chain(["vocab/users.tsv"]) {
        if let Ok(bytes) = std::fs::read(dir.path().join(name)) {
            files.push((name.to_owned(), bytes));
        }
    }
    RunTemplate { kind, files }
}

/// The template runs, one per [`KINDS`] entry, written once per process.
pub fn templates() -> &'static [RunTemplate] {
    static T: OnceLock<Vec<RunTemplate>> = OnceLock::new();
    T.get_or_init(|| KINDS.iter().map(|&k| build_template(k)).collect())
}

/// Checkpoints and run directories.
///
/// The selector modulo 6 picks the template run (YouTubeDNN, FM, MIND, popularity,
/// transitions, sequential); the selector divided by 6, modulo 7, picks what the bytes are: 0 a checkpoint read with `Checkpoint::read`
/// and loaded into a tiny tower of that kind; 1–6 one of [`RUN_FILES`], put in place of the
/// template's file before `load_for_serving` reads the whole run. A model that loads computes
/// every item vector and a user vector from the largest feature value and item row the run's
/// vocabularies hold, as the server would for such a request.
pub fn checkpoint(data: &[u8]) -> bool {
    let (sel, body) = selector(data);
    let t = &templates()[usize::from(sel) % KINDS.len()];
    let slot = usize::from(sel) / KINDS.len() % (RUN_FILES.len() + 1);
    let dir = scratch();
    let d = dir.path();
    if slot == 0 {
        return checkpoint_alone(t.kind, body, d);
    }
    for (name, bytes) in &t.files {
        put(&d.join(name), bytes);
    }
    put(&d.join(RUN_FILES[slot - 1]), body);
    match read_info(d) {
        Ok(_) => {}
        Err(_) => return false,
    }
    match load_for_serving(d) {
        Ok(run) => {
            use_run(&run);
            true
        }
        Err(_) => false,
    }
}

fn checkpoint_alone(kind: ModelKind, body: &[u8], dir: &Path) -> bool {
    let path = dir.join("model.safetensors");
    put(&path, body);
    let Ok(ck) = Checkpoint::read(&path) else {
        return false;
    };
    let _ = (ck.u32_tensor("item_bags.genres.offsets"), ck.u32_tensor("item_bags.genres.keys"));
    let kind = if kind == ModelKind::Popularity { ModelKind::Youtubednn } else { kind };
    let mut model = match tiny_model(kind, vec![genre_bags()]) {
        Ok(m) => m,
        Err(e) => panic!("the template {kind:?} model is invalid: {e}"),
    };
    let filled = match &mut model {
        Model::Deep(m) => ck.fill(m.as_mut()),
        Model::Fm(m) => ck.fill(m.as_mut()),
        Model::Mind(m) => ck.fill(m.as_mut()),
        Model::Seq(m) => ck.fill(m.as_mut()),
        Model::Neighbors(n) => ck.neighbors(n.spec.clone(), ITEM_COUNTS.to_vec()).map(|loaded| **n = loaded),
        Model::Popularity { .. } => Ok(()),
    };
    if filled.is_err() {
        return false;
    }
    use_model(&model, &[2], &[1, 2, 5]);
    true
}

fn use_run(run: &ServingRun) {
    assert_eq!(run.model.item_rows(), run.items.len());
    assert_eq!(run.item_counts.len(), run.items.len());
    assert_eq!(run.user_feature_vocabs.len(), run.user_feature_names.len());
    let features: Vec<u32> = run.user_feature_vocabs.iter().map(|v| (v.len() - 1) as u32).collect();
    let history: Vec<u32> = (1..run.items.len() as u32).collect();
    use_model(&run.model, &features, &history);
    // An item published while serving: embedded from the largest value row of each item feature.
    assert_eq!(run.item_feature_vocabs.len(), run.item_feature_names.len());
    let values: Vec<Vec<u32>> = run.item_feature_vocabs.iter().map(|v| vec![(v.len() - 1) as u32]).collect();
    let refs: Vec<&[u32]> = values.iter().map(Vec::as_slice).collect();
    if let Some(v) = run.model.item_vector_of(None, &refs) {
        assert_eq!(v.len(), run.model.dim());
    }
}

/// Rows of the model's user feature tables, in the order the tower reads the features.
fn use_model(m: &Model, features: &[u32], history: &[u32]) {
    let d = m.dim();
    assert_eq!(m.item_vectors().len(), m.item_rows() * d);
    let (rows, vectors) = m.indexed_items();
    assert_eq!(vectors.len(), rows.len() * d);
    for (f, h) in [(features, history), (&[][..], &[][..])] {
        assert_eq!(m.user_vector(&needle_model::tower::UserEvents::new(h, f)).len(), m.interests() * d);
    }
    if let Some(n) = m.neighbors() {
        // Popularity fills what the neighbours leave, so a list is short only when the
        // catalogue is.
        let (mut scratch, mut out) = (Scratch::default(), Vec::new());
        n.recall(history, 10, &|_| true, &mut scratch, &mut out);
        assert_eq!(out.len(), 10.min(n.item_rows() - 1));
        assert!(out.iter().all(|&(r, s)| r != 0 && (r as usize) < n.item_rows() && s.is_finite()));
    }
}
