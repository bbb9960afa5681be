//! What training reports while it runs, and how it is asked to stop: the CLI draws progress
//! bars from it and stops on Ctrl-C; a library caller (a notebook) gets the same events.

use serde::Serialize;

/// What a unit of [`Observer::begin`]'s work counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unit {
    /// Training samples (targets) of an epoch.
    Samples,
    /// Users scored by an evaluation.
    Users,
}

/// Receives the progress of training and evaluation; every method has a do-nothing default.
pub trait Observer {
    /// Work called `name` (`epoch 3/20`, `validation 3/20`, `test`) of `total` units begins.
    fn begin(&mut self, _name: &str, _unit: Unit, _total: u64) {}
    /// `done` units of the current work are finished; `status` is a short line such as
    /// `loss 0.4321  5000 samples/s` (empty when there is nothing new to say).
    fn progress(&mut self, _done: u64, _status: &str) {}
    /// Optimizer step `step` (counted from 1 over the whole training) ended with this batch
    /// loss, taken at learning rate `lr` (the dense layers'; embeddings scale alike).
    fn step(&mut self, _step: u64, _loss: f64, _lr: f32) {}
    /// The current work is finished.
    fn end(&mut self) {}
    /// A line a person should see before training starts (the memory plan).
    fn note(&mut self, _line: &str) {}
    /// An epoch ended, with its loss and validation figures.
    fn epoch(&mut self, _rec: &EpochLog) {}
    /// Polled between training steps: `true` stops training after the current step, keeping
    /// the best epoch validated so far.
    fn should_stop(&self) -> bool {
        false
    }
}

/// Reports nothing and never stops.
pub struct Silent;

impl Observer for Silent {}

/// An [`Observer::progress`] callback of `needle_train::model::evaluate` (`(users scored, users)`).
pub fn users(obs: &mut dyn Observer) -> impl FnMut(usize, usize) + '_ {
    move |done, _| obs.progress(done as u64, "")
}

/// One epoch's record, written to `train_log.jsonl`.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct EpochLog {
    pub epoch: usize,
    pub loss: f64,
    pub valid_hr10: f64,
    pub valid_ndcg10: f64,
    pub seconds: f64,
    pub samples_per_sec: f64,
}

impl EpochLog {
    /// The record of an epoch from its mean loss, its validation report, and its training time
    /// over this many targets.
    pub(crate) fn new(epoch: usize, loss: f64, valid: &needle_eval::Report, seconds: f64, targets: usize) -> Self {
        EpochLog {
            epoch,
            loss,
            valid_hr10: valid.get(10).map_or(0.0, |a| a.hit_rate),
            valid_ndcg10: valid.get(10).map_or(0.0, |a| a.ndcg),
            seconds,
            samples_per_sec: targets as f64 / seconds.max(1e-9),
        }
    }
}
