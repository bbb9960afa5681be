//! Tuning a config's `[tune]` space on validation within a time budget (successive halving),
//! into a run directory: every validated epoch is appended to `tune.jsonl` as it ends, so a later
//! call with the same folder resumes an interrupted tune; the winner is saved as a run with
//! `tune.md` (the leaderboard) and `best.toml` (its config), and scored on test once.

use crate::data::Data;
use crate::{io, Error, Result};
use needle_eval::Report;
use needle_run::Config;
use needle_train::tune::{self, BudgetShort, LogLine, Resumed, TrialEpoch, TrialSummary, TuneObserver};
use needle_train::TrainError;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub const TUNE_LOG_FILE: &str = "tune.jsonl";
pub const BOARD_FILE: &str = "tune.md";
pub const BEST_FILE: &str = "best.toml";

/// What [`tune`] produced, besides the run directory it wrote.
pub struct Tuned {
    /// Every trial that ran, best first.
    pub board: Vec<TrialSummary>,
    /// The winner's config as `needle train` takes it (also in `best.toml`).
    pub best_config: Config,
    pub best_path: PathBuf,
    /// The winner's test evaluation (`metrics.json`).
    pub test: Report,
    /// The budget ended before the last rung finished.
    pub out_of_time: bool,
    /// Validated epochs read back from an earlier, interrupted tune of the same folder.
    pub resumed_epochs: usize,
}

impl Tuned {
    /// One line on the winner: its trial, values, validation figures and where its config is.
    pub fn summary(&self) -> String {
        let w = &self.board[0];
        format!(
            "best: trial {} ({}), validation HR@10 {:.4} NDCG@10 {:.4} at epoch {}; config {}",
            w.trial,
            w.params,
            w.valid_hr10,
            w.valid_ndcg10,
            w.best_epoch,
            self.best_path.display()
        )
    }
}

/// Where a tune's log ends: complete records, and whether a last line cut short by an
/// interruption was dropped.
fn read_log(path: &Path) -> Result<(Vec<LogLine>, bool)> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), false)),
        Err(e) => return Err(io(path)(e)),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    let mut cut = false;
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<LogLine>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => cut = true,
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "{}:{}: not a tune record ({e}); it was not written by `needle tune`",
                    path.display(),
                    i + 1
                )))
            }
        }
    }
    Ok((out, cut))
}

/// Appends each record to the log before `inner` sees it.
struct Logged<'a> {
    log: std::fs::File,
    inner: &'a mut dyn TuneObserver,
}

impl Logged<'_> {
    fn append(&mut self, line: &LogLine) -> Result<(), TrainError> {
        let line = serde_json::to_string(line).map_err(|e| TrainError::Config(e.to_string()))? + "\n";
        self.log
            .write_all(line.as_bytes())
            .and_then(|_| self.log.flush())
            .map_err(|e| TrainError::Io { path: TUNE_LOG_FILE.into(), source: e })
    }
}

impl TuneObserver for Logged<'_> {
    fn planned(
        &mut self,
        trials: usize,
        rungs: &[(usize, usize)],
        short: Option<&BudgetShort>,
    ) -> Result<(), TrainError> {
        self.append(&LogLine::Plan { planned_trials: trials })?;
        self.inner.planned(trials, rungs, short)
    }

    fn epoch(&mut self, rec: &TrialEpoch, best: (f64, usize)) -> Result<(), TrainError> {
        self.append(&LogLine::Epoch(rec.clone()))?;
        self.inner.epoch(rec, best)
    }
}

/// Whether `cfg` can be tuned into `out` for `trials`: it has a `[tune]` space, at least one
/// trial is asked for, and `out` holds no finished run.
pub fn check(cfg: &Config, trials: Option<usize>, out: &Path) -> Result<()> {
    if cfg.tune.is_none() {
        return Err(Error::Config(
            "the config has no [tune] section; list the values to try, e.g.\n[tune]\nmetric = \"ndcg@10\"\n[tune.train]\nlr = [0.0005, 0.001, 0.002]\n[tune.model]\ndim = [32, 64]".into(),
        ));
    }
    if trials == Some(0) {
        return Err(Error::Invalid("trials must be at least 1 (leave it out to fit the trials to the budget)".into()));
    }
    if out.join("model.toml").exists() {
        return Err(Error::Invalid(format!(
            "{} already holds a run (a finished tune or a trained model); choose another folder",
            out.display()
        )));
    }
    Ok(())
}

/// What [`tune`] needs besides the config and its data.
pub struct TuneOptions<'a> {
    pub out: &'a Path,
    /// Wall-time budget of the search.
    pub budget: Duration,
    /// Configurations to try (default: `[tune] trials`, else as many as fit the budget).
    pub trials: Option<usize>,
    /// Worker threads training uses, recorded in `best.toml` (training is reproducible for a seed
    /// and a thread count).
    pub threads: usize,
    pub eval_seed: u64,
    /// How `best.toml` says the tuned config was named (`needle tune --config …`).
    pub origin: &'a str,
}

/// Searches `cfg`'s `[tune]` space on `data`'s validation targets within the budget; `show` sees
/// the plan and every new epoch (and may end the search with an error, e.g. on Ctrl-C: the log
/// keeps what was validated, and the same call resumes), `obs` the test evaluation.
pub fn tune(
    cfg: &Config,
    data: &Data,
    o: &TuneOptions<'_>,
    show: &mut dyn TuneObserver,
    obs: &mut dyn crate::Observer,
) -> Result<Tuned> {
    check(cfg, o.trials, o.out)?;
    let out = o.out;
    std::fs::create_dir_all(out).map_err(io(out))?;
    let log_path = out.join(TUNE_LOG_FILE);
    let (logged, cut) = read_log(&log_path)?;
    if cut {
        crate::Observer::note(
            obs,
            &format!("note: {}: dropped the last line, cut short when the tune was interrupted", log_path.display()),
        );
    }
    // A cut-short last line is rewritten whole: the log is truncated to its complete lines.
    let complete: String = logged
        .iter()
        .map(|r| serde_json::to_string(r).map(|s| s + "\n"))
        .collect::<Result<_, _>>()
        .map_err(|e| Error::Invalid(e.to_string()))?;
    std::fs::write(&log_path, complete).map_err(io(&log_path))?;
    let resumed = Resumed::from_lines(logged);
    let resumed_epochs = resumed.epochs.len();
    if resumed_epochs > 0 {
        crate::Observer::note(obs, &format!("resuming: {resumed_epochs} validated epochs in {}", log_path.display()));
    }
    let log = std::fs::OpenOptions::new().append(true).open(&log_path).map_err(io(&log_path))?;
    let p = &data.prepared;
    let mut logged = Logged { log, inner: show };
    let mut outcome = tune::tune(cfg, p, o.budget, o.trials, &resumed, &mut logged)?;
    outcome.best_config.train.threads = o.threads;
    write_board(out, &outcome, o.budget)?;
    let best_path = out.join(BEST_FILE);
    let text = format!(
        "# The best of `needle tune --config {}` by validation {}; train it with\n# needle train --config {} --out runs/NAME\n{}",
        o.origin,
        outcome.metric.name(),
        best_path.display(),
        toml::to_string_pretty(&outcome.best_config).map_err(|e| Error::Invalid(e.to_string()))?
    );
    needle_core::file::write_atomic(&best_path, text.as_bytes()).map_err(io(&best_path))?;
    needle_train::run::save_run(out, &outcome.best_config, &data.dataset, p, &outcome.trained, o.threads)?;
    let test = crate::write_test_metrics(out, &outcome.trained.model, p, o.eval_seed, obs)?;
    Ok(Tuned {
        board: outcome.board,
        best_config: outcome.best_config,
        best_path,
        test,
        out_of_time: outcome.out_of_time,
        resumed_epochs,
    })
}

/// `tune.md`: the leaderboard, best first.
fn write_board(out: &Path, o: &tune::TuneOutcome, budget: Duration) -> Result<()> {
    let mut s = format!(
        "# Tune leaderboard\n\nRanked by validation {} (best epoch of each trial); {} trials planned, rungs (trials × epochs) {}; budget {} s{}.\n\n",
        o.metric.name(),
        o.trials_planned,
        o.rungs.iter().map(|(n, e)| format!("{n}×{e}")).collect::<Vec<_>>().join(", "),
        budget.as_secs(),
        if o.out_of_time { ", ended by the budget" } else { "" }
    );
    s.push_str("| rank | trial | values | epochs run | best epoch | valid HR@10 | valid NDCG@10 | train s |\n");
    s.push_str("|---|---|---|---|---|---|---|---|\n");
    for (rank, t) in o.board.iter().enumerate() {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {:.4} | {:.4} | {:.1} |\n",
            rank + 1,
            t.trial,
            t.params,
            t.epochs_run,
            t.best_epoch,
            t.valid_hr10,
            t.valid_ndcg10,
            t.seconds
        ));
    }
    let path = out.join(BOARD_FILE);
    needle_core::file::write_atomic(&path, s.as_bytes()).map_err(io(&path))
}
