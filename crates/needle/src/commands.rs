//! The subcommands: thin glue over the library crates, with errors phrased for people.

use crate::metrics::{eval_seed, metrics_json, say_sample, write_metrics, write_replacing};
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use needle_api::progress::{bytes_bar, Bars};
use needle_data::DatasetName;
use needle_train::{Config, Stage};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;

/// Sizes the global thread pool once; 0 means all cores.
pub fn init_threads(n: usize) -> Result<usize> {
    let mut b = rayon::ThreadPoolBuilder::new();
    if n > 0 {
        b = b.num_threads(n);
    }
    b.build_global().context("could not start the thread pool")?;
    Ok(rayon::current_num_threads())
}

/// Reads a config file; its relative paths are taken relative to the file's folder.
pub fn read_config(path: &Path) -> Result<Config> {
    Ok(needle_api::read_config(path)?)
}

/// Parses and validates a config; `origin` names it in errors.
pub fn read_config_str(text: &str, origin: &str) -> Result<Config> {
    Ok(needle_api::parse_config(text, origin)?)
}

/// Loads a config's data and prepares it for the model (through `needle_api::Data`), with a
/// progress bar while a text source is parsed, saying what it found on the way.
pub fn load_prepared(cfg: &Config, data_dir: Option<&Path>, quiet: bool, threads: usize) -> Result<needle_api::Data> {
    let bar = bytes_bar(quiet, "parsing");
    let data = needle_api::Data::load(cfg, data_dir, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    say_data(&data, threads);
    Ok(data)
}

fn say_data(data: &needle_api::Data, threads: usize) {
    eprintln!("data: {}", data.source);
    for note in &data.notes {
        eprintln!("{note}");
    }
    eprintln!("threads: {threads}");
}

/// Switches of `needle train` that are not part of the config.
pub struct TrainFlags {
    pub download: bool,
    pub force: bool,
    pub skip_bad_rows: bool,
    pub quiet: bool,
    pub threads: Option<usize>,
}

/// What `needle train` trains on: a config, or (the default config for its size) a schema or a
/// built-in dataset.
pub struct TrainData {
    pub config: Option<PathBuf>,
    pub schema: Option<PathBuf>,
    pub dataset: Option<String>,
    /// TensorBoard event files' folder (default `OUT/tb`) and steps between curve points.
    pub tensorboard: Option<PathBuf>,
    pub tensorboard_every: u64,
}

pub fn train(what: TrainData, data_dir: Option<&Path>, out: &Path, flags: TrainFlags) -> Result<()> {
    let TrainFlags { download, force, skip_bad_rows, quiet, threads } = flags;
    let mut cfg = match &what.config {
        Some(config) => Some(read_config(config)?),
        None => None,
    };
    let mut data_cfg = match &cfg {
        Some(c) => c.data.clone(),
        None => {
            let schema = what.schema.as_deref().map(std::path::absolute).transpose()?;
            needle_run::config::DataConfig::from_source(what.dataset.clone(), schema, None)
        }
    };
    // Saved into the run, so that eval and recall reload the data the same way.
    data_cfg.skip_bad_rows |= skip_bad_rows;
    if let Some(c) = &mut cfg {
        c.data = data_cfg.clone();
    }
    let threads = init_threads(threads.unwrap_or(cfg.as_ref().map_or(0, |c| c.train.threads)))?;
    if out.join("model.toml").exists() && !force {
        bail!("{} already holds a run; pass --force to replace it", out.display());
    }
    if download {
        if let Some(name) = &data_cfg.dataset {
            let name = DatasetName::from_str(name).map_err(anyhow::Error::msg)?;
            let root = needle_data::resolve_data_dir(data_dir);
            if needle_data::source::find_dataset_dir(&name, &root).is_none() {
                self::download(name.as_str(), &root)?;
            }
        }
    }
    let (cfg, data) = match cfg {
        Some(cfg) => {
            let data = load_prepared(&cfg, data_dir, quiet, threads)?;
            (cfg, data)
        }
        None => {
            let bar = bytes_bar(quiet, "parsing");
            let (cfg, data) = needle_api::Data::load_default(data_cfg, data_dir, &mut |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            say_data(&data, threads);
            (cfg, data)
        }
    };
    crate::interrupt::stop_on_interrupt();
    let mut bars = Bars::new(quiet).stopping_on(crate::interrupt::interrupted);
    let tb_dir = what.tensorboard.clone().unwrap_or_else(|| out.join(needle_api::tensorboard::RUN_DIR));
    let mut board = needle_api::tensorboard::Board::new(&mut bars, &tb_dir, what.tensorboard_every);
    board.config(&cfg);
    let trained = needle_api::train(&cfg, &data, out, eval_seed(), &mut board)?;
    let info = &trained.info;
    if trained.stopped {
        eprintln!(
            "stopped after {} epochs; saved the best of them (epoch {})",
            info.training.epochs_run, info.training.best_epoch
        );
    }
    eprintln!(
        "trained in {:.1}s (best epoch {} of {}), {:.0} samples/s, peak RSS {}; saved {}",
        info.training.seconds,
        info.training.best_epoch,
        info.training.epochs_run,
        info.training.samples_per_sec,
        info.training.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0} MB")),
        out.display()
    );
    println!("test, full corpus, known items excluded:\n{}", needle_eval::format_table(&trained.test));
    Ok(())
}

pub fn eval(
    run: &Path,
    data_dir: Option<&Path>,
    keep_seen: bool,
    ks: &[usize],
    ann: bool,
    eval_users: Option<usize>,
) -> Result<()> {
    if ks.is_empty() || ks.contains(&0) {
        bail!("--k needs positive cut-offs, e.g. --k 10,50,100");
    }
    let r = needle_api::Run::open(run, data_dir)?;
    if ann {
        let report = crate::index_cmd::eval_ann(r.loaded(), ks, keep_seen, eval_users)?;
        crate::index_cmd::print_report(&format!("{} through its ANN index, test, full corpus", run.display()), &report);
        write_replacing(
            &run.join("metrics_ann.json"),
            &(serde_json::to_string_pretty(&metrics_json(&report))? + "\n"),
        )?;
        return Ok(());
    }
    let opts = needle_api::EvalOptions { keep_seen, users: eval_users, seed: eval_seed() };
    let report = r.evaluate(Stage::Test, ks, &opts, &mut Bars::new(false))?;
    say_sample(report.users, r.prepared());
    println!(
        "{} ({:?}), test, full corpus, known items {}:\n{}",
        run.display(),
        r.info().kind,
        if keep_seen { "kept" } else { "excluded" },
        needle_eval::format_table(&report)
    );
    write_metrics(run, &report)
}

pub fn recall(
    run: &Path,
    data_dir: Option<&Path>,
    users: &str,
    k: usize,
    keep_seen: bool,
    show_scores: bool,
) -> Result<()> {
    if k == 0 {
        bail!("--k must be at least 1");
    }
    let r = needle_api::Run::open(run, data_dir)?;
    let selected: Vec<usize> = if users.trim() == "all" {
        (0..r.user_ids().len()).collect()
    } else {
        r.users(&users.split(',').map(str::trim).collect::<Vec<_>>())?
    };
    // The user's known history is train + validation; the test target is never an input.
    let ranked = r.recall(&selected, k, keep_seen)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (row, &u) in selected.iter().enumerate() {
        write!(out, "{}\t", r.user_ids()[u])?;
        for (j, (id, s)) in ranked.items(row).into_iter().enumerate() {
            if j > 0 {
                out.write_all(b",")?;
            }
            out.write_all(id.as_bytes())?;
            if show_scores {
                // Rust's shortest round-trip form: the exact f32 the ranking used.
                write!(out, ":{s}")?;
            }
        }
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}

/// Downloads and verifies a MovieLens release into `to`, with a progress bar.
pub fn download(name: &str, to: &Path) -> Result<()> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec}")
            .expect("static template")
            .progress_chars("=> "),
    );
    bar.set_message(format!("downloading {name}"));
    let dir = needle_data::download(name, to, &mut |done, total| {
        if let Some(t) = total {
            bar.set_length(t);
        }
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    eprintln!("{name}: checksum verified, extracted to {}", dir.display());
    Ok(())
}
