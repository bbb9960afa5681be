//! A saved run with its data: evaluation, recall, vectors and export.

use crate::{io, Error, Result};
use needle_core::Lists;
use needle_eval::Report;
use needle_index::NpyWriter;
use needle_model::tower::UserEvents;
use needle_run::{Model, RunInfo};
use needle_train::observe::{self, Observer, Unit};
use needle_train::run::LoadedRun;
use needle_train::{Prepared, Stage};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// How [`Run::evaluate`] scores.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    /// Keep each user's known items in the ranking (excluded by default).
    pub keep_seen: bool,
    /// Score a seeded sample of this many users (`None`: every user on catalogues of up to
    /// 100,000 items, 10,000 above; `Some(0)`: every user).
    pub users: Option<usize>,
    /// Seed of that sample: fixed, so runs of one dataset are scored on the same users.
    pub seed: u64,
}

impl Default for EvalOptions {
    fn default() -> Self {
        EvalOptions { keep_seen: false, users: None, seed: crate::DEFAULT_EVAL_SEED }
    }
}

/// Ranked lists, `k` per query, best first: item rows and scores, padded with `u32::MAX` and
/// `-inf` where fewer than `k` items qualify.
pub struct Ranked<'a> {
    pub k: usize,
    pub rows: Vec<u32>,
    pub scores: Vec<f32>,
    ids: &'a needle_data::Vocab,
}

impl Ranked<'_> {
    /// Number of lists.
    pub fn len(&self) -> usize {
        self.rows.len().checked_div(self.k).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// List `q` as `(raw item id, score)` pairs, best first, without the padding.
    pub fn items(&self, q: usize) -> Vec<(&str, f32)> {
        let span = q * self.k..(q + 1) * self.k;
        self.rows[span.clone()]
            .iter()
            .zip(&self.scores[span])
            .take_while(|(&r, _)| r != u32::MAX)
            .map(|(&r, &s)| (self.ids.raw(r).unwrap_or("?"), s))
            .collect()
    }
}

/// Vectors with the raw ids they belong to: `[ids.len() × per_id × dim]` row-major.
pub struct Vectors {
    pub ids: Vec<String>,
    /// Vectors per id (a multi-interest model's users have several).
    pub per_id: usize,
    pub dim: usize,
    pub data: Vec<f32>,
}

/// What [`Run::export`] wrote.
pub struct Exported {
    pub files: Vec<PathBuf>,
    pub items: usize,
    pub users: usize,
    pub dim: usize,
}

/// A trained run loaded with the data it was trained on (checked by fingerprint).
pub struct Run {
    loaded: LoadedRun,
    /// Raw user id → dataset position, built on the first lookup by raw id.
    user_index: std::sync::OnceLock<HashMap<String, usize>>,
}

impl Run {
    /// Opens the run in `dir` and reloads its data (from `data_dir`, else where the config
    /// says); refuses data other than what the run was trained on.
    pub fn open(dir: &Path, data_dir: Option<&Path>) -> Result<Run> {
        let loaded = needle_train::run::load_run(dir, data_dir)?;
        Ok(Run { loaded, user_index: std::sync::OnceLock::new() })
    }

    pub fn dir(&self) -> &Path {
        &self.loaded.dir
    }

    pub fn info(&self) -> &RunInfo {
        &self.loaded.info
    }

    /// The run as the training crate loads it, for code that works on its parts directly.
    pub fn loaded(&self) -> &LoadedRun {
        &self.loaded
    }

    pub fn model(&self) -> &Model {
        &self.loaded.model
    }

    pub fn prepared(&self) -> &Prepared {
        &self.loaded.prepared
    }

    /// The dataset's name.
    pub fn dataset_name(&self) -> &str {
        &self.loaded.dataset.name
    }

    /// Every user of the dataset, by raw id, in dataset order.
    pub fn user_ids(&self) -> &[String] {
        &self.loaded.prepared.user_raw
    }

    /// The dataset positions of raw user ids; an unknown id is an error naming it.
    pub fn users(&self, raw: &[&str]) -> Result<Vec<usize>> {
        let index = self
            .user_index
            .get_or_init(|| self.loaded.prepared.user_raw.iter().enumerate().map(|(i, s)| (s.clone(), i)).collect());
        raw.iter()
            .map(|r| {
                index.get(*r).copied().ok_or_else(|| {
                    Error::Invalid(format!("unknown user id `{r}` (not in dataset {})", self.loaded.dataset.name))
                })
            })
            .collect()
    }

    /// Scores `stage`'s held-out targets over the full corpus at each cut-off in `ks`.
    pub fn evaluate(&self, stage: Stage, ks: &[usize], opts: &EvalOptions, obs: &mut dyn Observer) -> Result<Report> {
        if ks.is_empty() || ks.contains(&0) {
            return Err(Error::Invalid("cut-offs must be positive, e.g. 10,50,100".into()));
        }
        Ok(score(&self.loaded.model, &self.loaded.prepared, stage, ks, opts, obs))
    }

    /// The top `k` items for known users (dataset positions, see [`Run::users`]) from their
    /// known history (training and validation events), as `needle recall` prints them.
    pub fn recall(&self, users: &[usize], k: usize, keep_seen: bool) -> Result<Ranked<'_>> {
        check_k(k)?;
        let p = &self.loaded.prepared;
        if let Some(&bad) = users.iter().find(|&&u| u >= p.n_users()) {
            return Err(Error::Invalid(format!("user position {bad} is past the {} users", p.n_users())));
        }
        let q = needle_train::model::Query { users, stage: Stage::Test, k, keep_seen };
        let (rows, scores) = needle_train::model::recall(&self.loaded.model, p, &q);
        Ok(Ranked { k, rows, scores, ids: &self.loaded.prepared.items })
    }

    /// [`Run::recall`] by raw user ids.
    pub fn recall_users(&self, users: &[&str], k: usize, keep_seen: bool) -> Result<Ranked<'_>> {
        self.recall(&self.users(users)?, k, keep_seen)
    }

    /// Item rows of a history of raw item ids, oldest first; ids the model has no row for are
    /// left out, as a server leaves them out.
    fn history_rows(&self, history: &[&str]) -> Vec<u32> {
        history.iter().filter_map(|raw| self.loaded.prepared.items.get(raw)).collect()
    }

    /// The top `k` items for explicit histories of raw item ids (oldest first), as a new user
    /// with no features would get them; the history's items are left out unless `keep_seen`.
    pub fn recall_histories(&self, histories: &[Vec<&str>], k: usize, keep_seen: bool) -> Result<Ranked<'_>> {
        check_k(k)?;
        let model = &self.loaded.model;
        let rows: Vec<Vec<u32>> = histories.iter().map(|h| self.history_rows(h)).collect();
        let n = rows.len();
        let (rows, scores) = match model.neighbors() {
            Some(nb) => needle_train::model::rank_neighbors(nb, n, k, |i, history, seen| {
                history.extend_from_slice(&rows[i]);
                if !keep_seen {
                    seen.extend_from_slice(&rows[i]);
                }
            }),
            None => {
                let uv = self.history_vectors_of(&rows);
                let seen = (!keep_seen).then(|| {
                    let mut l = Lists::new();
                    rows.iter().for_each(|h| l.push(h.iter().copied()));
                    l
                });
                let iv = model.item_vectors();
                needle_train::model::rank_vectors(&uv, &iv, model.dim(), model.interests(), k, seen.as_ref())
            }
        };
        Ok(Ranked { k, rows, scores, ids: &self.loaded.prepared.items })
    }

    /// The `k` items most like each of `items` (raw ids), each item itself left out: by inner
    /// product of item vectors, or an item-to-item model's neighbour lists. An unknown item is an
    /// error naming it.
    pub fn similar_items(&self, items: &[&str], k: usize) -> Result<Ranked<'_>> {
        check_k(k)?;
        let vocab = &self.loaded.prepared.items;
        let rows: Vec<u32> = items
            .iter()
            .map(|raw| {
                vocab.get(raw).ok_or_else(|| {
                    Error::Invalid(format!("unknown item id `{raw}` (not in dataset {})", self.loaded.dataset.name))
                })
            })
            .collect::<Result<_>>()?;
        let model = &self.loaded.model;
        let (rows, scores) = match model.neighbors() {
            Some(nb) => needle_train::model::rank_neighbors(nb, rows.len(), k, |i, history, seen| {
                history.push(rows[i]);
                seen.push(rows[i]);
            }),
            None => {
                let iv = model.item_vectors();
                let d = model.dim();
                let queries: Vec<f32> =
                    rows.iter().flat_map(|&r| iv[r as usize * d..(r as usize + 1) * d].iter().copied()).collect();
                let mut seen = Lists::new();
                rows.iter().for_each(|&r| seen.push([r]));
                needle_train::model::rank_vectors(&queries, &iv, d, 1, k, Some(&seen))
            }
        };
        Ok(Ranked { k, rows, scores, ids: vocab })
    }

    /// Raw item ids by row (row 0, the padding row, is the empty string).
    pub fn item_ids(&self) -> Vec<&str> {
        let v = &self.loaded.prepared.items;
        (0..v.len() as u32).map(|r| v.raw(r).unwrap_or("")).collect()
    }

    fn history_vectors_of(&self, rows: &[Vec<u32>]) -> Vec<f32> {
        use rayon::prelude::*;
        let model = &self.loaded.model;
        rows.par_iter().flat_map_iter(|h| model.user_vector(&UserEvents::new(h, &[]))).collect()
    }

    fn has_vectors(&self) -> Result<()> {
        if self.loaded.model.neighbors().is_some() {
            return Err(Error::Invalid(
                "this run is an item-to-item model (transitions or itemcf): it has neighbour lists, not vectors".into(),
            ));
        }
        Ok(())
    }

    /// Every item's vector (padding row left out), as an index holds them.
    pub fn item_vectors(&self) -> Result<Vectors> {
        self.has_vectors()?;
        let (rows, data) = self.loaded.model.indexed_items();
        let ids = rows.iter().map(|&r| self.loaded.prepared.items.raw(r).unwrap_or("").to_owned()).collect();
        Ok(Vectors { ids, per_id: 1, dim: self.loaded.model.dim(), data })
    }

    /// Vectors of known users (dataset positions) from their known history.
    pub fn user_vectors(&self, users: &[usize]) -> Result<Vectors> {
        self.has_vectors()?;
        let p = &self.loaded.prepared;
        let data = needle_train::model::user_vectors(&self.loaded.model, p, users, Stage::Test);
        let ids = users.iter().map(|&u| p.user_raw[u].clone()).collect();
        Ok(Vectors { ids, per_id: self.loaded.model.interests(), dim: self.loaded.model.dim(), data })
    }

    /// Vectors of explicit histories of raw item ids (oldest first), no user features.
    pub fn history_vectors(&self, histories: &[Vec<&str>]) -> Result<Vectors> {
        self.has_vectors()?;
        let rows: Vec<Vec<u32>> = histories.iter().map(|h| self.history_rows(h)).collect();
        let data = self.history_vectors_of(&rows);
        let ids = (0..histories.len()).map(|i| i.to_string()).collect();
        Ok(Vectors { ids, per_id: self.loaded.model.interests(), dim: self.loaded.model.dim(), data })
    }

    /// Writes the run's vectors for use elsewhere into `out`: `item_embeddings.npy` with
    /// `items.tsv`, `user_embeddings.npy` with `users.tsv` (`[users, K, dim]` for a
    /// multi-interest model); an item-to-item model writes `item_neighbors.tsv` instead.
    pub fn export(&self, out: &Path) -> Result<Exported> {
        std::fs::create_dir_all(out).map_err(io(out))?;
        let items = &self.loaded.prepared.items;
        if let Some(n) = self.loaded.model.neighbors() {
            let rows = (1..n.item_rows() as u32).flat_map(|a| {
                n.neighbors_of(a)
                    .map(move |(b, w)| format!("{}\t{}\t{w}", items.raw(a).unwrap_or(""), items.raw(b).unwrap_or("")))
            });
            let path = out.join("item_neighbors.tsv");
            write_tsv(&path, "item_id\tneighbor_id\tweight", rows)?;
            return Ok(Exported { files: vec![path], items: n.item_rows() - 1, users: 0, dim: 0 });
        }
        let iv = self.item_vectors()?;
        let d = iv.dim;
        let item_npy = out.join("item_embeddings.npy");
        write_npy(&item_npy, &iv.data, &[iv.ids.len(), d])?;
        let items_tsv = out.join("items.tsv");
        write_tsv(&items_tsv, "row\titem_id", iv.ids.iter().enumerate().map(|(i, id)| format!("{i}\t{id}")))?;
        let users: Vec<usize> = (0..self.loaded.prepared.n_users()).collect();
        let uv = self.user_vectors(&users)?;
        let shape = if uv.per_id > 1 { vec![users.len(), uv.per_id, d] } else { vec![users.len(), d] };
        let user_npy = out.join("user_embeddings.npy");
        write_npy(&user_npy, &uv.data, &shape)?;
        let users_tsv = out.join("users.tsv");
        write_tsv(&users_tsv, "row\tuser_id", uv.ids.iter().enumerate().map(|(i, id)| format!("{i}\t{id}")))?;
        Ok(Exported {
            files: vec![item_npy, items_tsv, user_npy, users_tsv],
            items: iv.ids.len(),
            users: users.len(),
            dim: d,
        })
    }
}

/// Scores `stage`'s held-out targets of `model` over the user sample `opts` names, reporting
/// the users scored to `obs`.
pub(crate) fn score(
    model: &Model,
    p: &Prepared,
    stage: Stage,
    ks: &[usize],
    opts: &EvalOptions,
    obs: &mut dyn Observer,
) -> Report {
    let users = needle_train::model::eval_users(p, stage, opts.users, opts.seed);
    obs.begin(if stage == Stage::Test { "test" } else { "validation" }, Unit::Users, users.len() as u64);
    let report =
        needle_train::model::evaluate(model, p, stage, ks, opts.keep_seen, Some(&users), &mut observe::users(obs));
    obs.end();
    report
}

fn check_k(k: usize) -> Result<()> {
    if k == 0 {
        return Err(Error::Invalid("k must be at least 1".into()));
    }
    Ok(())
}

fn write_npy(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let mut w = NpyWriter::with_shape(path, shape)?;
    w.write(data)?;
    Ok(w.finish()?)
}

fn write_tsv(path: &Path, header: &str, rows: impl Iterator<Item = String>) -> Result<()> {
    let mut f = needle_core::file::AtomicFile::create(path).map_err(io(path))?;
    let body = || -> std::io::Result<()> {
        writeln!(f, "{header}")?;
        for r in rows {
            writeln!(f, "{r}")?;
        }
        Ok(())
    };
    body().map_err(io(path))?;
    f.commit().map_err(io(path))
}

/// Writes `metrics.json` (every metric at every cut-off, and the sample's seed) and
/// `hit_curve.json` (HR@1..K) into a run directory.
pub fn write_metrics(dir: &Path, report: &Report, eval_seed: u64) -> Result<()> {
    let path = dir.join("metrics.json");
    let text =
        serde_json::to_string_pretty(&metrics_json(report, eval_seed)).map_err(|e| Error::Invalid(e.to_string()))?;
    needle_core::file::write_atomic(&path, (text + "\n").as_bytes()).map_err(io(&path))?;
    let path = dir.join("hit_curve.json");
    let text = serde_json::to_string(&report.hit_curve).map_err(|e| Error::Invalid(e.to_string()))?;
    needle_core::file::write_atomic(&path, (text + "\n").as_bytes()).map_err(io(&path))
}

/// A report as metrics JSON, with the seed of the user sample it was scored on.
pub fn metrics_json(report: &Report, eval_seed: u64) -> serde_json::Value {
    let mut v = report.to_json();
    v["eval_seed"] = eval_seed.into();
    v
}
