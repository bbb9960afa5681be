//! Training a config on prepared data into a run directory.

use crate::data::Data;
use crate::{io, Error, Result};
use needle_eval::Report;
use needle_run::{Config, RunInfo};
use needle_train::observe::{EpochLog, Observer, Unit};
use needle_train::Stage;
use std::path::Path;

/// What [`train`] produced, besides the run directory it wrote.
pub struct Trained {
    pub info: RunInfo,
    /// Every epoch's record, oldest first (also in `train_log.jsonl`).
    pub epochs: Vec<EpochLog>,
    /// The test evaluation written to `metrics.json` (K = 10, 50, 100, known items excluded,
    /// over the default user sample).
    pub test: Report,
    /// Training was stopped by the observer; the run holds the best epoch validated before.
    pub stopped: bool,
}

/// Writes each epoch's record to `train_log.jsonl` as it ends, then hands it on.
struct Logged<'a> {
    inner: &'a mut dyn Observer,
    dir: &'a Path,
    err: Option<Error>,
}

impl Observer for Logged<'_> {
    fn begin(&mut self, name: &str, unit: Unit, total: u64) {
        self.inner.begin(name, unit, total)
    }
    fn progress(&mut self, done: u64, status: &str) {
        self.inner.progress(done, status)
    }
    fn step(&mut self, step: u64, loss: f64, lr: f32) {
        self.inner.step(step, loss, lr)
    }
    fn end(&mut self) {
        self.inner.end()
    }
    fn note(&mut self, line: &str) {
        self.inner.note(line)
    }
    fn epoch(&mut self, rec: &EpochLog) {
        if let Err(e) = needle_train::run::append_log(self.dir, rec) {
            self.err.get_or_insert(e.into());
        }
        self.inner.epoch(rec)
    }
    fn should_stop(&self) -> bool {
        // A log that cannot be written stops training rather than losing its records.
        self.err.is_some() || self.inner.should_stop()
    }
}

/// Trains `cfg` on `data` and saves the run in `out` (created if needed; an existing run
/// there is replaced), then scores the test targets once and writes `metrics.json` and
/// `hit_curve.json` (over the user sample of `eval_seed` on large catalogues). `obs` sees the progress and each epoch, and may stop training early: the
/// best epoch validated so far is then saved.
pub fn train(cfg: &Config, data: &Data, out: &Path, eval_seed: u64, obs: &mut dyn Observer) -> Result<Trained> {
    std::fs::create_dir_all(out).map_err(io(out))?;
    let log_path = out.join("train_log.jsonl");
    if log_path.exists() {
        std::fs::remove_file(&log_path).map_err(io(&log_path))?;
    }
    let p = &data.prepared;
    let mut logged = Logged { inner: obs, dir: out, err: None };
    let trained = needle_train::trainer::train(cfg, p, &mut logged);
    if let Some(e) = logged.err {
        return Err(e);
    }
    let trained = trained?;
    let threads = rayon::current_num_threads();
    // A binary dataset inside the run is named relative to it, so the run can be moved.
    let mut saved = cfg.clone();
    if let Some(b) = saved.data.binary.as_mut() {
        if let Ok(rel) = b.strip_prefix(out) {
            *b = rel.to_path_buf();
        }
    }
    let info = needle_train::run::save_run(out, &saved, &data.dataset, p, &trained, threads)?;
    let test = write_test_metrics(out, &trained.model, p, eval_seed, obs)?;
    Ok(Trained { info, epochs: trained.epochs, test, stopped: trained.stopped })
}

/// Scores a trained model's test targets once (K = 10, 50, 100, known items excluded, over the
/// user sample of `eval_seed` on large catalogues) and writes `metrics.json` and
/// `hit_curve.json` into `out`.
pub fn write_test_metrics(
    out: &Path,
    model: &needle_run::Model,
    p: &needle_train::Prepared,
    eval_seed: u64,
    obs: &mut dyn Observer,
) -> Result<Report> {
    let opts = crate::EvalOptions { keep_seen: false, users: None, seed: eval_seed };
    let test = crate::run::score(model, p, Stage::Test, &[10, 50, 100], &opts, obs);
    crate::run::write_metrics(out, &test, eval_seed)?;
    Ok(test)
}
