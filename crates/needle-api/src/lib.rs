//! needle as a library: everything the `needle` command does, as functions and types a Rust
//! program (or the Python package) calls directly.
//!
//! ```no_run
//! use needle_api::{read_config, train, Data, Run, Silent, Stage};
//! # fn main() -> Result<(), needle_api::Error> {
//! let cfg = read_config("configs/ml-100k/sequential-reg.toml".as_ref())?;
//! let data = Data::load(&cfg, None, &mut |_, _| {})?;
//! let trained = train(&cfg, &data, "runs/seq".as_ref(), needle_api::DEFAULT_EVAL_SEED, &mut Silent)?;
//! println!("test HR@10 {:.4}", trained.test.get(10).map_or(0.0, |a| a.hit_rate));
//! let run = Run::open("runs/seq".as_ref(), None)?;
//! let top = run.recall_users(&["1", "2"], 10, false)?;
//! println!("{:?}", top.items(0));
//! let report = run.evaluate(Stage::Test, &[10, 100], &Default::default(), &mut Silent)?;
//! # Ok(()) }
//! ```
//!
//! - [`Data`]: a config's data, loaded (through the binary dataset), split by time and prepared
//!   for its model.
//! - [`train`]: trains, saves the run directory and scores the test targets once; progress and
//!   stopping go through an [`Observer`].
//! - [`Run`]: a saved run with its data: evaluation, recall for known users or explicit
//!   histories, user and item vectors, export.
//! - Indexes over any vectors: `needle_index` re-exported as [`index`].

mod data;
pub mod defaults;
pub mod progress;
mod run;
pub mod tensorboard;
mod train;
mod tune;

pub use data::{keep_with_run, load_dataset, Data, RUN_DATA_DIR};
pub use defaults::default_config;
pub use needle_data::{
    load_frames, Column, Dataset, DatasetName, EntityTable, FeatureColumn, Frame, InteractionsSchema, LoadOptions,
    Schema,
};
pub use needle_eval::{AtK, Report};
pub use needle_index as index;
pub use needle_run::config::DataConfig;
pub use needle_run::config::ModelKind;
pub use needle_run::{Config, RunInfo};
pub use needle_train::observe::{EpochLog, Observer, Silent, Unit};
pub use needle_train::{Stage, TrainError};
pub use run::{metrics_json, write_metrics, EvalOptions, Exported, Ranked, Run, Vectors};
pub use train::{train, write_test_metrics, Trained};
pub use tune::{check as tune_check, tune, TuneOptions, Tuned, BEST_FILE, BOARD_FILE, TUNE_LOG_FILE};

use std::path::{Path, PathBuf};

/// Seed of the test-user sample unless told otherwise (see [`EvalOptions::seed`]).
pub const DEFAULT_EVAL_SEED: u64 = needle_train::model::DEFAULT_EVAL_SEED;

/// Everything that can go wrong, with the messages the CLI prints.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config file or value that cannot be used.
    #[error("{0}")]
    Config(String),
    /// Input data that cannot be read or does not fit the run.
    #[error(transparent)]
    Data(#[from] needle_data::DataError),
    #[error(transparent)]
    Train(#[from] needle_train::TrainError),
    #[error(transparent)]
    Run(#[from] needle_run::RunError),
    #[error(transparent)]
    Index(#[from] needle_index::IndexError),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    /// An argument out of range or naming something that does not exist.
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

pub(crate) fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |e| Error::Io { path: path.to_owned(), source: e }
}

/// Reads a config file; its relative paths are taken relative to the file's folder.
pub fn read_config(path: &Path) -> Result<Config> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::Config(format!("cannot read config {}: {e}", path.display())))?;
    let mut cfg = parse_config(&text, &path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let base = if dir.is_absolute() {
        dir.to_path_buf()
    } else {
        std::env::current_dir().map_err(|e| Error::Config(format!("cannot read the current folder: {e}")))?.join(dir)
    };
    cfg.resolve_paths(&base);
    Ok(cfg)
}

/// Parses and validates a config; `origin` names it in errors.
pub fn parse_config(text: &str, origin: &str) -> Result<Config> {
    let cfg: Config = toml::from_str(text).map_err(|e| Error::Config(format!("config {origin} is not valid: {e}")))?;
    cfg.validate().map_err(|e| Error::Config(format!("config {origin}: {e}")))?;
    Ok(cfg)
}
