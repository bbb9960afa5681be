//! Progress bars with ETA on stderr: drawn on a terminal, printed as a line every 30 seconds
//! in a log file, hidden when asked.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;

/// A progress bar over bytes with rate and ETA, for parsing and ingesting logs.
pub fn bytes_bar(quiet: bool, msg: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    for_logs(
        ProgressBar::new(0)
            .with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
            .with_message(msg.to_owned()),
    )
}

/// A progress bar over `len` steps with ETA.
pub fn count_bar(len: u64, msg: &str) -> ProgressBar {
    for_logs(
        ProgressBar::new(len)
            .with_style(
                ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            )
            .with_message(msg.to_owned()),
    )
}

/// How often a bar whose stderr is not a terminal prints its state as a line.
const LOG_LINE_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// On a terminal, `bar` as it is. Otherwise (a log file, a CI job, `nohup`), where a bar would
/// draw nothing at all, it prints its state as a plain line every 30 seconds, so long work
/// still shows its progress and ETA; work shorter than that prints nothing.
pub fn for_logs(bar: ProgressBar) -> ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::term_like(Box::new(LogLines::default())));
    }
    bar
}

/// A draw target that keeps the line being drawn and writes it out at most every `every`, the
/// first time once that long has passed.
struct LogLines {
    every: std::time::Duration,
    /// When a line was last written (or the bar started), the line being drawn, and where to.
    state: std::sync::Mutex<(std::time::Instant, String, Box<dyn Write + Send>)>,
}

impl std::fmt::Debug for LogLines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLines").field("every", &self.every).finish()
    }
}

impl LogLines {
    fn new(every: std::time::Duration, out: Box<dyn Write + Send>) -> LogLines {
        LogLines { every, state: std::sync::Mutex::new((std::time::Instant::now(), String::new(), out)) }
    }
}

impl Default for LogLines {
    fn default() -> Self {
        LogLines::new(LOG_LINE_EVERY, Box::new(std::io::stderr()))
    }
}

impl indicatif::TermLike for LogLines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1.push_str(s);
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).1.clear();
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (last, line, out) = &mut *st;
        if last.elapsed() >= self.every && !line.trim().is_empty() {
            writeln!(out, "{}", line.trim_end())?;
            *last = std::time::Instant::now();
        }
        Ok(())
    }
}

/// An index build's stages as a sequence of progress bars with ETA.
#[derive(Default)]
pub struct BarProgress(std::sync::Mutex<Option<ProgressBar>>);

impl BarProgress {
    /// Finishes the last bar.
    pub fn finish(&self) {
        if let Some(bar) = self.0.lock().unwrap_or_else(|e| e.into_inner()).take() {
            bar.finish();
        }
    }
}

impl needle_index::Progress for BarProgress {
    fn stage(&self, name: &str, total: u64) {
        let mut cur = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bar) = cur.take() {
            bar.finish();
        }
        *cur = Some(count_bar(total, name));
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.0.lock().unwrap_or_else(|e| e.into_inner()) {
            bar.inc(n);
        }
    }
}

/// Training's and evaluation's progress as bars on stderr (hidden with `quiet`), each epoch as
/// a line, and a stop request (Ctrl-C) from the predicate given to [`Bars::stopping_on`].
pub struct Bars {
    quiet: bool,
    /// Notes and epoch lines are printed too (the bars alone are hidden by `quiet`).
    lines: bool,
    bar: Option<ProgressBar>,
    stop: Option<Box<dyn Fn() -> bool>>,
}

impl Bars {
    pub fn new(quiet: bool) -> Bars {
        Bars { quiet, lines: true, bar: None, stop: None }
    }

    /// Nothing at all on stderr: no bars, notes or epoch lines.
    pub fn silent() -> Bars {
        Bars { quiet: true, lines: false, bar: None, stop: None }
    }

    /// Training asks `stop` between steps and, when it says so, ends after the current step.
    pub fn stopping_on(mut self, stop: impl Fn() -> bool + 'static) -> Bars {
        self.stop = Some(Box::new(stop));
        self
    }
}

impl crate::Observer for Bars {
    fn begin(&mut self, name: &str, unit: crate::Unit, total: u64) {
        let template = match unit {
            crate::Unit::Samples => "{prefix} [{bar:30}] {pos}/{len} samples  {msg}  ETA {eta}",
            crate::Unit::Users => "{prefix} [{bar:30}] {pos}/{len} users  {per_sec}  ETA {eta}",
        };
        let bar = if self.quiet { ProgressBar::hidden() } else { for_logs(ProgressBar::new(total)) };
        bar.set_length(total);
        bar.set_style(
            ProgressStyle::with_template(template)
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(name.to_owned());
        if let Some(old) = self.bar.replace(bar) {
            old.finish_and_clear();
        }
    }

    fn progress(&mut self, done: u64, status: &str) {
        if let Some(bar) = &self.bar {
            bar.set_position(done);
            if !status.is_empty() {
                bar.set_message(status.to_owned());
            }
        }
    }

    fn end(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }

    fn note(&mut self, line: &str) {
        if self.lines {
            eprintln!("{line}");
        }
    }

    fn epoch(&mut self, rec: &crate::EpochLog) {
        if !self.lines {
            return;
        }
        eprintln!(
            "epoch {:>3}  loss {:.4}  valid HR@10 {:.4}  NDCG@10 {:.4}  {:.1}s  {:.0} samples/s",
            rec.epoch, rec.loss, rec.valid_hr10, rec.valid_ndcg10, rec.seconds, rec.samples_per_sec
        );
    }

    fn should_stop(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| s())
    }
}

/// A tune's progress: one bar over the planned epochs with the best so far, the plan and each
/// epoch as lines (unless quiet), and a stop request from the predicate given to
/// [`TuneBar::stopping_on`], which ends the search with [`needle_train::TrainError::Stopped`].
pub struct TuneBar {
    bar: ProgressBar,
    metric: &'static str,
    best: f64,
    best_label: String,
    quiet: bool,
    stop: Option<Box<dyn Fn() -> bool>>,
}

impl TuneBar {
    /// `metric` names what the trials are ranked by (`ndcg@10`).
    pub fn new(quiet: bool, metric: &'static str) -> TuneBar {
        let bar = if quiet {
            ProgressBar::hidden()
        } else {
            for_logs(
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("tune [{bar:30}] {pos}/{len} epochs  {msg}  ETA {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar())
                        .progress_chars("=> "),
                ),
            )
        };
        TuneBar { bar, metric, best: f64::NEG_INFINITY, best_label: String::new(), quiet, stop: None }
    }

    /// The search ends after the epoch during which `stop` says so; the log keeps every
    /// validated epoch, and tuning the same folder again resumes.
    pub fn stopping_on(mut self, stop: impl Fn() -> bool + 'static) -> TuneBar {
        self.stop = Some(Box::new(stop));
        self
    }

    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

impl needle_train::tune::TuneObserver for TuneBar {
    fn planned(
        &mut self,
        trials: usize,
        rungs: &[(usize, usize)],
        short: Option<&needle_train::tune::BudgetShort>,
    ) -> Result<(), needle_train::TrainError> {
        let plan: Vec<String> = rungs.iter().map(|(n, e)| format!("{n}×{e}")).collect();
        self.bar.set_length(needle_train::tune::rung_epochs(rungs) as u64);
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
        Ok(())
    }

    fn epoch(
        &mut self,
        rec: &needle_train::tune::TrialEpoch,
        best: (f64, usize),
    ) -> Result<(), needle_train::TrainError> {
        if best.0 > self.best {
            self.best = best.0;
            self.best_label = format!("trial {} epoch {}", rec.trial, best.1);
        }
        self.bar.inc(1);
        self.bar.set_message(format!("best {} {:.4} ({})", self.metric, self.best, self.best_label));
        if !self.quiet {
            self.bar.suspend(|| {
                eprintln!(
                    "trial {:>3} epoch {:>3}  valid HR@10 {:.4}  NDCG@10 {:.4}  {:.1}s  {}",
                    rec.trial, rec.epoch, rec.valid_hr10, rec.valid_ndcg10, rec.seconds, rec.params
                )
            });
        }
        if self.stop.as_ref().is_some_and(|s| s()) {
            return Err(needle_train::TrainError::Stopped(
                "tune stopped; every validated epoch is in tune.jsonl, and tuning the same folder again resumes".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use indicatif::TermLike;
    use std::sync::{Arc, Mutex};

    /// A writer the test can read back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_bar_in_a_log_prints_whole_lines_only_once_its_interval_has_passed() {
        let out = Shared::default();
        let quiet = LogLines::new(std::time::Duration::from_secs(3600), Box::new(out.clone()));
        quiet.write_str("build [====] 5/10 ETA 3s").unwrap();
        quiet.flush().unwrap();
        assert!(out.0.lock().unwrap().is_empty(), "short work must print nothing");

        let out = Shared::default();
        let bar = ProgressBar::with_draw_target(
            Some(10),
            indicatif::ProgressDrawTarget::term_like(Box::new(LogLines::new(
                std::time::Duration::ZERO,
                Box::new(out.clone()),
            ))),
        )
        .with_style(ProgressStyle::with_template("{msg} {pos}/{len}").unwrap())
        .with_message("assign");
        bar.set_position(4);
        bar.finish();
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        assert!(text.lines().any(|l| l == "assign 10/10"), "{text:?}");
        assert!(text.lines().all(|l| l.starts_with("assign ")), "{text:?}");
    }
}
