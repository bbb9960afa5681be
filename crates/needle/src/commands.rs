//! The subcommands: thin glue over the library crates, with errors phrased for people.

use crate::metrics::{eval_users_of, metrics_json, write_metrics, write_replacing};
use crate::progress::bytes_bar;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use needle_data::DatasetName;
use needle_train::model::{evaluate, recall as recall_top_k};
use needle_train::prepare::prepare;
use needle_train::run::{append_log, load_run, save_run};
use needle_train::{trainer, Config, Stage};
use std::io::Write;
use std::path::Path;
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
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read config {}", path.display()))?;
    let mut cfg = read_config_str(&text, &path.display().to_string())?;
    let dir = path.parent().unwrap_or(Path::new(""));
    let base = if dir.is_absolute() { dir.to_path_buf() } else { std::env::current_dir()?.join(dir) };
    cfg.resolve_paths(&base);
    Ok(cfg)
}

/// Parses and validates a config; `origin` names it in errors.
pub fn read_config_str(text: &str, origin: &str) -> Result<Config> {
    let cfg: Config = toml::from_str(text).with_context(|| format!("config {origin} is not valid"))?;
    cfg.validate().map_err(|e| anyhow::anyhow!("config {origin}: {e}"))?;
    Ok(cfg)
}

/// Loads and splits a config's data through its binary dataset, with a progress bar while a
/// text source is parsed, and says where the dataset came from.
pub fn load_data_shown(
    cfg: &Config,
    data_dir: Option<&Path>,
    quiet: bool,
) -> Result<(needle_data::Dataset, needle_data::Split)> {
    let bar = bytes_bar(quiet, "parsing");
    let (ds, split, cached) = needle_train::run::load_data_with(cfg, data_dir, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    match cached {
        needle_data::Cached::Hit(dir) => eprintln!("data: read the binary dataset {}", dir.display()),
        needle_data::Cached::Built { dir, reason } => {
            eprintln!("data: ingested into the binary dataset {} ({reason})", dir.display())
        }
        needle_data::Cached::Unwritable { dir, reason } => {
            eprintln!("warning: could not write the binary dataset {} ({reason}); parsed the source", dir.display())
        }
    }
    Ok((ds, split))
}

/// Loads a config's data, prepares it for the model and keeps only what a run records of the
/// dataset (its name and fingerprint), saying what it found on the way.
pub fn load_prepared(
    cfg: &Config,
    data_dir: Option<&Path>,
    quiet: bool,
    threads: usize,
) -> Result<(needle_data::Dataset, needle_train::Prepared)> {
    let (mut ds, split) = load_data_shown(cfg, data_dir, quiet)?;
    eprintln!(
        "data: {} — {} events, {} users, {} items{}",
        ds.name,
        ds.events.len(),
        ds.user_ids.len(),
        ds.item_ids.len(),
        match ds.report.skipped_total() {
            0 => String::new(),
            n => format!(", {n} bad rows skipped"),
        }
    );
    let p = prepare(&ds, &split, cfg)?;
    // Training reads only the prepared form; at 10^8 events the raw events, ids, titles and the
    // split are gigabytes. The run keeps the dataset's name and the source's fingerprint.
    drop(split);
    let slim = needle_data::Dataset {
        name: std::mem::take(&mut ds.name),
        source_fingerprint: Some(ds.fingerprint()),
        report: std::mem::take(&mut ds.report),
        ..Default::default()
    };
    drop(ds);
    let ds = slim;
    needle_train::run::trim_heap();
    eprintln!(
        "split: {} train events, {} validation and {} test targets; {} items and {} users in the vocabulary; {threads} threads",
        p.train.items.len(),
        p.valid.items.len(),
        p.test.items.len(),
        p.items.len() - 1,
        p.users.len() - 1
    );
    // The counted kinds take no training steps, so they have no loss to report.
    if cfg.train.loss == needle_train::config::LossKind::Auto && !cfg.model.kind.is_counted() {
        eprintln!(
            "loss: {} (auto: {} item rows, the full softmax up to {})",
            cfg.train.loss.resolve(p.n_item_rows()).name(),
            p.n_item_rows(),
            needle_train::config::FULL_SOFTMAX_MAX_ITEMS
        );
    }
    if let Some(h) = p.item_hash {
        eprintln!(
            "hashed tail: {} items beyond the {} most frequent share {} id rows",
            h.first_cold - h.own,
            h.own - 1,
            h.buckets
        );
    }
    if p.cold_rows > 0 {
        eprintln!("cold items: {} items without a training event are embedded from their features alone", p.cold_rows);
    }
    if p.unembedded_items > 0 {
        let why = if cfg.model.kind.is_counted() {
            "this model counts training events, and they have none".to_owned()
        } else if cfg.model.item_features.is_empty() {
            "this model's item tower reads item ids only; list [model] item_features to embed them".to_owned()
        } else if cfg.model.cold_items == Some(false) {
            "[model] cold_items = false".to_owned()
        } else if cfg.model.cold_items.is_none() && cfg.train.item_id_dropout == 0.0 {
            "train with [train] item_id_dropout = 0.1 (or set [model] cold_items = true) to embed them from their features"
                .to_owned()
        } else {
            "none of their feature values occurs on a trained item".to_owned()
        };
        eprintln!(
            "note: {} items without a training event get no vector and cannot be recalled ({why})",
            p.unembedded_items
        );
    }
    Ok((ds, p))
}

/// Switches of `needle train` that are not part of the config.
pub struct TrainFlags {
    pub download: bool,
    pub force: bool,
    pub skip_bad_rows: bool,
    pub quiet: bool,
    pub threads: Option<usize>,
}

pub fn train(config: &Path, data_dir: Option<&Path>, out: &Path, flags: TrainFlags) -> Result<()> {
    let TrainFlags { download, force, skip_bad_rows, quiet, threads } = flags;
    let mut cfg = read_config(config)?;
    // Saved into the run, so that eval and recall reload the data the same way.
    cfg.data.skip_bad_rows |= skip_bad_rows;
    let threads = init_threads(threads.unwrap_or(cfg.train.threads))?;
    if out.join("model.toml").exists() && !force {
        bail!("{} already holds a run; pass --force to replace it", out.display());
    }
    if download {
        if let Some(name) = &cfg.data.dataset {
            let name = DatasetName::from_str(name).map_err(anyhow::Error::msg)?;
            let root = needle_data::resolve_data_dir(data_dir);
            if needle_data::source::find_dataset_dir(&name, &root).is_none() {
                self::download(name.as_str(), &root)?;
            }
        }
    }
    let (ds, p) = load_prepared(&cfg, data_dir, quiet, threads)?;
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let log_path = out.join("train_log.jsonl");
    if log_path.exists() {
        std::fs::remove_file(&log_path).with_context(|| format!("cannot replace {}", log_path.display()))?;
    }
    let mut log_err = None;
    let trained = trainer::train(&cfg, &p, !quiet, &mut |rec| {
        eprintln!(
            "epoch {:>3}  loss {:.4}  valid HR@10 {:.4}  NDCG@10 {:.4}  {:.1}s  {:.0} samples/s",
            rec.epoch, rec.loss, rec.valid_hr10, rec.valid_ndcg10, rec.seconds, rec.samples_per_sec
        );
        if let Err(e) = append_log(out, rec) {
            log_err.get_or_insert(e);
        }
    })?;
    if let Some(e) = log_err {
        return Err(e.into());
    }
    let info = save_run(out, &cfg, &ds, &p, &trained, threads)?;
    eprintln!(
        "trained in {:.1}s (best epoch {} of {}), {:.0} samples/s, peak RSS {}; saved {}",
        info.training.seconds,
        info.training.best_epoch,
        info.training.epochs_run,
        info.training.samples_per_sec,
        info.training.peak_rss_mb.map_or("n/a".into(), |m| format!("{m:.0} MB")),
        out.display()
    );
    test_once(out, &trained.model, &p, quiet)
}

/// Evaluates a just-trained model on the test targets (over the default user sample), prints
/// the table and writes `metrics.json`.
pub fn test_once(out: &Path, model: &needle_train::Model, p: &needle_train::Prepared, quiet: bool) -> Result<()> {
    let users = eval_users_of(p, None);
    let bar = trainer::users_bar("test", !quiet);
    let report =
        evaluate(model, p, Stage::Test, &[10, 50, 100], false, Some(&users), &mut trainer::users_progress(&bar));
    bar.finish_and_clear();
    println!("test, full corpus, known items excluded:\n{}", needle_eval::format_table(&report));
    write_metrics(out, &report)
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
    let r = load_run(run, data_dir)?;
    if ann {
        let report = crate::index_cmd::eval_ann(&r, ks, keep_seen, eval_users)?;
        crate::index_cmd::print_report(&format!("{} through its ANN index, test, full corpus", run.display()), &report);
        write_replacing(
            &run.join("metrics_ann.json"),
            &(serde_json::to_string_pretty(&metrics_json(&report))? + "\n"),
        )?;
        return Ok(());
    }
    let users = eval_users_of(&r.prepared, eval_users);
    let bar = trainer::users_bar("test", true);
    let report =
        evaluate(&r.model, &r.prepared, Stage::Test, ks, keep_seen, Some(&users), &mut trainer::users_progress(&bar));
    bar.finish_and_clear();
    println!(
        "{} ({:?}), test, full corpus, known items {}:\n{}",
        run.display(),
        r.info.kind,
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
    let r = load_run(run, data_dir)?;
    let p = &r.prepared;
    let selected: Vec<usize> = if users.trim() == "all" {
        (0..p.n_users()).collect()
    } else {
        let index: std::collections::HashMap<&str, usize> =
            p.user_raw.iter().enumerate().map(|(i, s)| (s.as_str(), i)).collect();
        users
            .split(',')
            .map(|raw| {
                let raw = raw.trim();
                index
                    .get(raw)
                    .copied()
                    .with_context(|| format!("unknown user id `{raw}` (not in dataset {})", r.dataset.name))
            })
            .collect::<Result<_>>()?
    };
    // The user's known history is train + validation; the test target is never an input.
    let (ids, scores) = recall_top_k(&r.model, p, &selected, Stage::Test, k, keep_seen);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for (row, &u) in selected.iter().enumerate() {
        write!(out, "{}\t", p.user_raw[u])?;
        let mut first = true;
        let span = row * k..(row + 1) * k;
        for (&it, &s) in ids[span.clone()].iter().zip(&scores[span]).take_while(|(&i, _)| i != u32::MAX) {
            if !first {
                out.write_all(b",")?;
            }
            first = false;
            out.write_all(p.items.raw(it).unwrap_or("?").as_bytes())?;
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
