//! `needle tune`: a time-budgeted search over a config's `[tune]` space on validation, then the
//! winner saved as a run, its config as a TOML `needle train` takes, and one test evaluation
//! (`needle_api::tune`, with progress on stderr and Ctrl-C as a stop).

use crate::commands::{init_threads, load_prepared, read_config};
use crate::metrics::eval_seed;
use anyhow::Result;
use needle_api::progress::{Bars, TuneBar};
use std::path::Path;
use std::time::Duration;

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
    let threads = init_threads(a.threads.unwrap_or(cfg.train.threads))?;
    // Before the data is loaded, so a config that cannot be tuned fails at once.
    needle_api::tune_check(&cfg, a.trials, a.out)?;
    let data = load_prepared(&cfg, a.data_dir, a.quiet, threads)?;
    let metric = cfg.tune.as_ref().map(|t| t.metric).unwrap_or(needle_train::config::SelectMetric::Ndcg10);
    crate::interrupt::stop_on_interrupt();
    let mut bar = TuneBar::new(a.quiet, metric.name()).stopping_on(crate::interrupt::interrupted);
    let origin = a.config.display().to_string();
    let opts = needle_api::TuneOptions {
        out: a.out,
        budget: a.budget,
        trials: a.trials,
        threads,
        eval_seed: eval_seed(),
        origin: &origin,
    };
    let tb_dir = a.out.join(needle_api::tensorboard::RUN_DIR);
    let mut board = needle_api::tensorboard::TuneBoard::new(&mut bar, &tb_dir);
    let tuned = needle_api::tune(&cfg, &data, &opts, &mut board, &mut Bars::new(a.quiet));
    bar.finish();
    let tuned = tuned?;
    if tuned.out_of_time {
        eprintln!("the budget ended before the last rung finished; the winner is the best trial validated so far");
    }
    eprintln!("{}", tuned.summary());
    println!("test, full corpus, known items excluded:\n{}", needle_eval::format_table(&tuned.test));
    Ok(())
}
