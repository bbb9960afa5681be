//! `needle tune`: a time-budgeted search over a config's `[tune]` space on validation, then the
//! winner saved as a run, its config as a TOML `needle train` takes, and one test evaluation.

use crate::commands::{init_threads, load_prepared, read_config, test_once};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use needle_train::run::save_run;
use needle_train::tune::{self, LogLine, Resumed, TrialEpoch, TuneObserver, TuneOutcome};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const LOG_FILE: &str = "tune.jsonl";
const BOARD_FILE: &str = "tune.md";
const BEST_FILE: &str = "best.toml";

/// Reads the log of an earlier, interrupted tune. A last line cut short by the interruption is
/// dropped (and rewritten when its epoch trains again); a damaged line elsewhere is an error.
fn read_log(path: &Path) -> Result<Vec<LogLine>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        match serde_json::from_str::<LogLine>(line) {
            Ok(r) => out.push(r),
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => {
                eprintln!("note: {}: dropped the last line, cut short when the tune was interrupted", path.display())
            }
            Err(e) => {
                bail!("{}:{}: not a tune record ({e}); it was not written by `needle tune`", path.display(), i + 1)
            }
        }
    }
    Ok(out)
}

/// Appends each new epoch to the log and draws the progress bar.
struct Shown {
    log: std::fs::File,
    bar: ProgressBar,
    metric: &'static str,
    best: f64,
    best_label: String,
    quiet: bool,
}

impl Shown {
    fn append(&mut self, line: &LogLine) -> Result<(), needle_train::TrainError> {
        let line = serde_json::to_string(line).map_err(|e| needle_train::TrainError::Config(e.to_string()))? + "\n";
        self.log
            .write_all(line.as_bytes())
            .and_then(|_| self.log.flush())
            .map_err(|e| needle_train::TrainError::Io { path: LOG_FILE.into(), source: e })
    }
}

impl TuneObserver for Shown {
    fn planned(
        &mut self,
        trials: usize,
        rungs: &[(usize, usize)],
        short: Option<&tune::BudgetShort>,
    ) -> Result<(), needle_train::TrainError> {
        let plan: Vec<String> = rungs.iter().map(|(n, e)| format!("{n}×{e}")).collect();
        self.bar.set_length(tune::rung_epochs(rungs) as u64);
        let noun = if trials == 1 { "trial" } else { "trials" };
        // Printed around the bar, also when stderr is not a terminal and the bar is hidden.
        if let Some(s) = short {
            self.bar.suspend(|| {
                eprintln!(
                    "warning: an epoch takes about {:.0} s, so the budget fits {trials} {noun}: not a search; \
                     {} trials need about --budget {}m, or train fewer [train] epochs",
                    s.epoch_secs,
                    s.trials,
                    (s.needed_secs / 60.0).ceil()
                )
            });
        }
        if !self.quiet {
            self.bar.suspend(|| eprintln!("{trials} {noun}; rungs (trials × epochs): {}", plan.join(", ")));
        }
        self.append(&LogLine::Plan { planned_trials: trials })
    }

    fn epoch(&mut self, rec: &TrialEpoch, best: (f64, usize)) -> Result<(), needle_train::TrainError> {
        self.append(&LogLine::Epoch(rec.clone()))?;
        if best.0 > self.best {
            self.best = best.0;
            self.best_label = format!("trial {} epoch {}", rec.trial, best.1);
        }
        self.bar.inc(1);
        self.bar.set_message(format!("best {} {:.4} ({})", self.metric, self.best, self.best_label));
        if self.quiet {
            return Ok(());
        }
        self.bar.suspend(|| {
            eprintln!(
                "trial {:>3} epoch {:>3}  valid HR@10 {:.4}  NDCG@10 {:.4}  {:.1}s  {}",
                rec.trial, rec.epoch, rec.valid_hr10, rec.valid_ndcg10, rec.seconds, rec.params
            )
        });
        Ok(())
    }
}

pub struct TuneArgs<'a> {
    pub config: &'a Path,
    pub data_dir: Option<&'a Path>,
    pub budget: Duration,
    pub trials: Option<usize>,
    pub out: &'a Path,
    pub quiet: bool,
    pub threads: Option<usize>,
}

pub fn tune(a: TuneArgs<'_>) -> Result<()> {
    let cfg = read_config(a.config)?;
    if cfg.tune.is_none() {
        bail!(
            "{} has no [tune] section; list the values to try, e.g.\n[tune]\nmetric = \"ndcg@10\"\n[tune.train]\nlr = [0.0005, 0.001, 0.002]\n[tune.model]\ndim = [32, 64]",
            a.config.display()
        );
    }
    if a.trials == Some(0) {
        bail!("--trials must be at least 1 (leave it out to fit the trials to the budget)");
    }
    let threads = init_threads(a.threads.unwrap_or(cfg.train.threads))?;
    if a.out.join("model.toml").exists() {
        bail!("{} already holds a run (a finished tune or a trained model); choose another --out", a.out.display());
    }
    std::fs::create_dir_all(a.out).with_context(|| format!("cannot create {}", a.out.display()))?;
    let log_path = a.out.join(LOG_FILE);
    let logged = read_log(&log_path)?;
    let needle_api::Data { dataset: ds, prepared: p, .. } = load_prepared(&cfg, a.data_dir, a.quiet, threads)?;
    // A cut-short last line is rewritten whole: the log is truncated to its complete lines.
    let complete: String =
        logged.iter().map(|r| serde_json::to_string(r).map(|s| s + "\n")).collect::<Result<_, _>>()?;
    std::fs::write(&log_path, complete).with_context(|| format!("cannot write {}", log_path.display()))?;
    let resumed = Resumed::from_lines(logged);
    if !resumed.epochs.is_empty() {
        eprintln!("resuming: {} validated epochs in {}", resumed.epochs.len(), log_path.display());
    }
    let log = std::fs::OpenOptions::new()
        .append(true)
        .open(&log_path)
        .with_context(|| format!("cannot open {}", log_path.display()))?;
    let metric = cfg.tune.as_ref().map(|t| t.metric).unwrap_or(needle_train::config::SelectMetric::Ndcg10);
    let bar = if a.quiet {
        ProgressBar::hidden()
    } else {
        needle_api::progress::for_logs(
            ProgressBar::new(0).with_style(
                ProgressStyle::with_template("tune [{bar:30}] {pos}/{len} epochs  {msg}  ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
        )
    };
    let mut shown =
        Shown { log, bar, metric: metric.name(), best: f64::NEG_INFINITY, best_label: String::new(), quiet: a.quiet };
    let mut outcome = tune::tune(&cfg, &p, a.budget, a.trials, &resumed, &mut shown)?;
    // Training is reproducible for a seed and a thread count: the config says both.
    outcome.best_config.train.threads = threads;
    shown.bar.finish_and_clear();
    if outcome.out_of_time {
        eprintln!("the budget ended before the last rung finished; the winner is the best trial validated so far");
    }
    write_board(a.out, &outcome, a.budget)?;
    let best_path = a.out.join(BEST_FILE);
    let text = format!(
        "# The best of `needle tune --config {}` by validation {}; train it with\n# needle train --config {} --out runs/NAME\n{}",
        a.config.display(),
        outcome.metric.name(),
        best_path.display(),
        toml::to_string_pretty(&outcome.best_config)?
    );
    std::fs::write(&best_path, text).with_context(|| format!("cannot write {}", best_path.display()))?;
    let w = &outcome.board[0];
    eprintln!(
        "best: trial {} ({}), validation HR@10 {:.4} NDCG@10 {:.4} at epoch {}; config {}",
        w.trial,
        w.params,
        w.valid_hr10,
        w.valid_ndcg10,
        w.best_epoch,
        best_path.display()
    );
    save_run(a.out, &outcome.best_config, &ds, &p, &outcome.trained, threads)?;
    test_once(a.out, &outcome.trained.model, &p, a.quiet)
}

/// `tune.md`: the leaderboard, best first.
fn write_board(out: &Path, o: &TuneOutcome, budget: Duration) -> Result<()> {
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
    std::fs::write(&path, s).with_context(|| format!("cannot write {}", path.display()))
}
