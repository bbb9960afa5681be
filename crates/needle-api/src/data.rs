//! A config's data, loaded, split by time and prepared for its model.

use crate::Result;
use needle_data::{Dataset, Split};
use needle_run::config::{DataConfig, LossKind, FULL_SOFTMAX_MAX_ITEMS};
use needle_run::Config;
use needle_train::Prepared;
use std::path::Path;

/// The prepared data of a config: vocabularies and histories from training events only, the
/// held-out targets, and what a run records of the dataset (its name and fingerprint).
pub struct Data {
    /// The dataset's name and fingerprint; the raw events are dropped once prepared (at 10^8
    /// events they are gigabytes that training never reads).
    pub dataset: Dataset,
    pub prepared: Prepared,
    /// Where the events came from: `read the binary dataset …`, `ingested into …`.
    pub source: String,
    /// What a person should know about this data and config, one line each: sizes, the loss
    /// chosen, hashed and cold items, items that cannot be recalled and why.
    pub notes: Vec<String>,
}

impl Data {
    /// Loads and prepares `cfg`'s data (through the binary dataset, ingested on first use);
    /// `progress` gets `(bytes, total)` while a text source is parsed.
    pub fn load(cfg: &Config, data_dir: Option<&Path>, progress: &mut dyn FnMut(u64, u64)) -> Result<Data> {
        let (ds, split, cached) = needle_run::load_data_with(cfg, data_dir, progress)?;
        Data::prepare(cfg, ds, split, source_of(cached))
    }

    /// Loads `data` and picks the default config for its size ([`crate::default_config`]); the
    /// first note says which config was picked and why.
    pub fn load_default(
        data: DataConfig,
        data_dir: Option<&Path>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<(Config, Data)> {
        let (probe, _) = crate::default_config(data.clone(), 0);
        probe.validate().map_err(crate::Error::Config)?;
        let (ds, split, cached) = needle_run::load_data_with(&probe, data_dir, progress)?;
        let (cfg, why) = crate::default_config(data, split.train.total());
        let mut prepared = Data::prepare(&cfg, ds, split, source_of(cached))?;
        prepared.notes.insert(0, why);
        Ok((cfg, prepared))
    }

    /// Prepares a loaded and split dataset for `cfg`'s model; `source` says where it came from.
    pub fn prepare(cfg: &Config, mut ds: Dataset, split: Split, source: String) -> Result<Data> {
        let mut notes = vec![format!(
            "data: {} — {} events, {} users, {} items{}",
            ds.name,
            ds.events.len(),
            ds.user_ids.len(),
            ds.item_ids.len(),
            match ds.report.skipped_total() {
                0 => String::new(),
                n => format!(", {n} bad rows skipped"),
            }
        )];
        let p = needle_train::prepare::prepare(&ds, &split, cfg)?;
        drop(split);
        let slim = Dataset {
            name: std::mem::take(&mut ds.name),
            source_fingerprint: Some(ds.fingerprint()),
            report: std::mem::take(&mut ds.report),
            ..Default::default()
        };
        drop(ds);
        needle_run::trim_heap();
        notes.push(format!(
            "split: {} train events, {} validation and {} test targets; {} items and {} users in the vocabulary",
            p.train.items.len(),
            p.valid.items.len(),
            p.test.items.len(),
            p.items.len() - 1,
            p.users.len() - 1
        ));
        notes.extend(model_notes(cfg, &p));
        Ok(Data { dataset: slim, prepared: p, source, notes })
    }
}

/// What the config makes of this data: the loss it resolves to, hashing, cold items.
fn model_notes(cfg: &Config, p: &Prepared) -> Vec<String> {
    let mut notes = Vec::new();
    // The counted kinds take no training steps, so they have no loss to report.
    if cfg.train.loss == LossKind::Auto && !cfg.model.kind.is_counted() {
        notes.push(format!(
            "loss: {} (auto: {} item rows, the full softmax up to {FULL_SOFTMAX_MAX_ITEMS})",
            cfg.train.loss.resolve(p.n_item_rows()).name(),
            p.n_item_rows(),
        ));
    }
    if let Some(h) = p.item_hash {
        notes.push(format!(
            "hashed tail: {} items beyond the {} most frequent share {} id rows",
            h.first_cold - h.own,
            h.own - 1,
            h.buckets
        ));
    }
    if p.cold_rows > 0 {
        notes.push(format!(
            "cold items: {} items without a training event are embedded from their features alone",
            p.cold_rows
        ));
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
        notes.push(format!(
            "note: {} items without a training event get no vector and cannot be recalled ({why})",
            p.unembedded_items
        ));
    }
    notes
}

/// Writes `ds` as a binary dataset into `run/data` and returns the `[data]` section that reads
/// it from there: a run trained on data held in memory (a DataFrame) keeps its data with it, so
/// it can be opened, evaluated and served like any other.
pub fn keep_with_run(ds: &Dataset, run: &Path, like: &DataConfig) -> Result<DataConfig> {
    let dir = run.join(RUN_DATA_DIR);
    let seqs = needle_data::split::time_ordered(ds)?;
    needle_data::packed::write(ds, &seqs, &format!("memory:{}", ds.fingerprint()), &dir)?;
    Ok(DataConfig { dataset: None, schema: None, cache: None, binary: Some(dir), ..like.clone() })
}

/// Where [`keep_with_run`] puts a run's data, inside the run directory.
pub const RUN_DATA_DIR: &str = "data";

/// What a load says of where its events came from.
fn source_of(cached: needle_data::Cached) -> String {
    match cached {
        needle_data::Cached::Hit(dir) => format!("read the binary dataset {}", dir.display()),
        needle_data::Cached::Built { dir, reason } => {
            format!("ingested into the binary dataset {} ({reason})", dir.display())
        }
        needle_data::Cached::Unwritable { dir, reason } => {
            format!("could not write the binary dataset {} ({reason}); parsed the source", dir.display())
        }
    }
}

/// Loads `cfg`'s dataset (through its binary dataset) without splitting or preparing it.
pub fn load_dataset(cfg: &Config, data_dir: Option<&Path>) -> Result<Dataset> {
    Ok(needle_run::load_data_with(cfg, data_dir, &mut |_, _| {})?.0)
}
