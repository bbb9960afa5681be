//! Test metrics as needle writes them: the seeded user sample they are scored on and the
//! metrics files of a run.

use anyhow::Result;
use needle_train::Stage;
use std::path::Path;

static EVAL_SEED: std::sync::atomic::AtomicU64 =
    std::sync::atomic::AtomicU64::new(needle_train::model::DEFAULT_EVAL_SEED);

/// Sets the seed of the test-user sample (`--eval-seed`) for this process.
pub fn set_eval_seed(seed: u64) {
    EVAL_SEED.store(seed, std::sync::atomic::Ordering::Relaxed);
}

/// The seed of the test-user sample (`--eval-seed`).
pub(crate) fn eval_seed() -> u64 {
    EVAL_SEED.load(std::sync::atomic::Ordering::Relaxed)
}

/// The test users to score, saying so when it is a sample.
pub(crate) fn eval_users_of(p: &needle_train::Prepared, n: Option<usize>) -> Vec<usize> {
    let users = needle_train::model::eval_users(p, Stage::Test, n, eval_seed());
    say_sample(users.len(), p);
    users
}

/// Says so when the `scored` test users are a sample of them.
pub(crate) fn say_sample(scored: usize, p: &needle_train::Prepared) {
    let all = p.test.items.len();
    if scored < all {
        eprintln!("evaluating a seeded sample of {scored} of the {all} test users (--eval-users)");
    }
}

/// A report as metrics JSON, with the seed of this process's user sample.
pub(crate) fn metrics_json(report: &needle_eval::Report) -> serde_json::Value {
    needle_api::metrics_json(report, eval_seed())
}

/// Writes a run's `metrics.json` and `hit_curve.json` (`needle_api::write_metrics`).
pub(crate) fn write_metrics(dir: &Path, report: &needle_eval::Report) -> Result<()> {
    Ok(needle_api::write_metrics(dir, report, eval_seed())?)
}

/// Writes `text` over `path` atomically (`needle_core::file`): a reader never sees half a file.
pub(crate) fn write_replacing(path: &Path, text: &str) -> Result<()> {
    Ok(needle_core::file::write_atomic(path, text.as_bytes())?)
}
