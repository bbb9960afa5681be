//! Training for needle: from a dataset split to a saved run directory.
//!
//! [`prepare`] builds vocabularies and histories from training events only; [`trainer`] runs
//! the explicit forward/backward engine of `needle-model` with sampled, in-batch or full
//! softmax; [`run`] saves and reloads everything evaluation and serving need.

pub use needle_run::config;
pub mod model;
pub mod observe;
pub mod optim;
pub mod prepare;
pub mod run;
pub mod sampler;
pub mod trainer;
pub mod tune;

pub use needle_run::{Config, Model};
pub use prepare::{Prepared, Stage};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error(transparent)]
    Load(#[from] needle_data::DataError),
    #[error("{0}")]
    Data(String),
    #[error("{0}")]
    Config(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error(transparent)]
    Model(#[from] needle_model::ModelError),
    #[error(transparent)]
    Run(#[from] needle_run::RunError),
    #[error("training diverged (non-finite loss) in epoch {epoch} at step {step}; lower the learning rate or raise the temperature")]
    Diverged { epoch: usize, step: usize },
    #[error("training was stopped before its first epoch ended; nothing to save")]
    Cancelled,
    /// Stopped on request where what was done is kept elsewhere (a tune's log); the message says
    /// how to go on.
    #[error("{0}")]
    Stopped(String),
}
