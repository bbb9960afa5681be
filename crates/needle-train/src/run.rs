//! Saving a trained run and loading one back with its re-prepared data. The format itself is
//! `needle-run`'s; this module adds what only training and offline evaluation need.

use crate::prepare::{prepare, Prepared};
use crate::trainer::{EpochLog, Trained};
use crate::TrainError;
use needle_data::{Dataset, Vocab};
pub use needle_run::{
    load_data, load_data_with, load_for_serving, read_info, trim_heap, RunInfo, ServingRun, TrainingSummary, RUN_FORMAT,
};
use needle_run::{read_vocab, write_run, Config, Model, RunContents};
use std::path::{Path, PathBuf};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |e| TrainError::Io { path: path.to_owned(), source: e }
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
    let mut info = RunInfo {
        format: RUN_FORMAT,
        kind: cfg.model.kind,
        dataset: ds.name.clone(),
        data_fingerprint: ds.fingerprint(),
        items: p.items.len() - 1,
        users: p.users.len() - 1,
        // Filled in by `write_run` from the model it saves.
        tower: needle_run::TowerSpec::Popularity,
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
    let first_seen = p.item_first_seen();
    let contents = RunContents {
        vocabs: vocab_files(p),
        item_counts: &p.item_counts,
        item_first_seen: &first_seen,
        model: &t.model,
    };
    write_run(dir, &mut info, &contents)?;
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

/// Reads `dir/model.toml`, reloads and re-splits the data (checking that it is the data the
/// model was trained on) and loads the parameters.
pub fn load_run(dir: &Path, data_dir: Option<&Path>) -> Result<LoadedRun, TrainError> {
    let info = read_info(dir)?;
    let (dataset, split) = needle_run::load_run_data(&info, data_dir)?;
    let prepared = prepare(&dataset, &split, &info.config)?;
    for (name, vocab) in vocab_files(&prepared) {
        let saved = read_vocab(dir, &name)?;
        if saved.len() != vocab.len() || saved.iter().zip(vocab.iter()).any(|(a, b)| a != b) {
            return Err(TrainError::Config(format!("vocabulary {name} of {} does not match the data", dir.display())));
        }
    }
    let model = needle_run::load_model(&info, dir, &prepared.item_counts)?;
    Ok(LoadedRun { dir: dir.to_owned(), info, dataset, prepared, model })
}
