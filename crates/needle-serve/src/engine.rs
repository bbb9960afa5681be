//! One loaded run, ready to answer: the user tower, the vocabularies that map raw ids to model
//! rows, the item index and a popularity list for users the model knows nothing about.
//!
//! Everything here is synchronous CPU work of well under a millisecond per request at ML-1M
//! scale, so handlers call it inline.

use crate::filter::{Attributes, Filter};
use crate::ServeError;
use needle_data::Dataset;
use needle_data::Vocab;
use needle_index::{Index, IndexParams};
use needle_model::neighbors::Scratch;
use needle_run::{merge_interests, Model, RunInfo, ServingRun, USER_ID_FEATURE};
use needle_store::{ItemDetails, ItemRecord, Store, UserProfile, UserRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

thread_local! {
    /// Buffers of item-to-item scoring, reused by each compute thread from request to request.
    static NEIGHBOR_SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

pub struct Engine {
    /// Names the model in answers and metrics: run directory name and a checksum of its weights.
    pub run_id: String,
    pub run_dir: PathBuf,
    pub kind: String,
    model: Model,
    items: Vocab,
    feature_names: Vec<String>,
    feature_vocabs: Vec<Vocab>,
    /// The item index; `None` for item-to-item models, which recall from their neighbour lists.
    index: Option<Box<dyn Index>>,
    pub index_params: String,
    /// Item rows by training count, most popular first.
    popular: Vec<(u32, f32)>,
    /// Newest history items the user tower reads.
    pub max_seq_len: usize,
    /// What request filters select on; empty until [`Engine::set_attributes`].
    attributes: Attributes,
}

/// What a recall may return beyond the user's own history.
#[derive(Clone, Copy, Default)]
pub struct Restrict<'a> {
    /// Leave out the items of the user's history.
    pub exclude_seen: bool,
    /// Only these item rows (ascending), from a request filter.
    pub allowed: Option<&'a [u32]>,
    /// Never these item rows (ascending).
    pub excluded: &'a [u32],
}

/// Where an answer's items came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// The user tower from the user's features and history.
    Model,
    /// Nothing known about the user: most popular items.
    Popularity,
}

/// What the user tower gets for one request, in raw ids.
pub struct UserInput<'a> {
    pub user_id: Option<&'a str>,
    pub features: &'a BTreeMap<String, String>,
    pub history: &'a [String],
}

pub struct Recalled {
    /// `(item row, score)`, best first.
    pub items: Vec<(u32, f32)>,
    pub source: Source,
    /// History items the model has no row for (skipped).
    pub unknown_history: usize,
}

impl Engine {
    /// Builds the engine from a loaded run. The item index is `index` when given, else the run's
    /// saved `index.bin`, else the default HNSW built now over the model's item vectors.
    pub fn new(run: ServingRun, index: Option<&Path>) -> Result<Engine, ServeError> {
        let dir = run.dir.clone();
        // The manifest and the weights (popularity runs have none) identify what is served.
        let checksum = ["model.toml", "model.safetensors"]
            .iter()
            .filter_map(|f| std::fs::read(dir.join(f)).ok())
            .fold(needle_data::FNV1A64_OFFSET, |h, bytes| needle_data::fnv1a64(h, &bytes));
        let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "run".into());
        let model = run.model;
        let index_path = index.map(Path::to_owned).unwrap_or_else(|| dir.join(needle_index::RUN_INDEX_FILE));
        let index: Option<Box<dyn Index>> = if let Some(n) = model.neighbors() {
            if index.is_some() {
                return Err(ServeError::Load(format!(
                    "{} is an item-to-item model ({:?}): it recalls from its neighbour lists and takes no --index",
                    dir.display(),
                    n.spec.kind
                )));
            }
            None
        } else if index_path.exists() {
            let ix = needle_index::open_for_serving(&index_path)
                .map_err(|e| ServeError::Load(format!("{}: {e}", index_path.display())))?;
            if ix.dim() != model.dim() {
                return Err(ServeError::Load(format!(
                    "{}: index dimension {} does not match the model's {}; rebuild it with `needle index build --run {}`",
                    index_path.display(),
                    ix.dim(),
                    model.dim(),
                    dir.display()
                )));
            }
            Some(ix)
        } else if index.is_some() {
            return Err(ServeError::Load(format!("index file {} does not exist", index_path.display())));
        } else {
            let t = Instant::now();
            let (ids, vecs) = model.indexed_items();
            let params = if model.dim() == 1 { IndexParams::Exact } else { IndexParams::recommended() };
            let ix =
                needle_index::build(&params, &ids, &vecs, model.dim()).map_err(|e| ServeError::Load(e.to_string()))?;
            tracing::info!(
                "{} has no index.bin; built {} over {} items in {:.2}s",
                dir.display(),
                ix.params(),
                ix.len(),
                t.elapsed().as_secs_f64()
            );
            Some(ix)
        };
        let index_params = match &index {
            Some(ix) => ix.params().to_string(),
            None => format!("neighbors({} per item)", model.neighbors().map_or(0, |n| n.spec.neighbors)),
        };
        let mut popular: Vec<(u32, f32)> =
            run.item_counts.iter().enumerate().skip(1).map(|(row, &c)| (row as u32, c as f32)).collect();
        popular.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        Ok(Engine {
            run_id: format!("{name}:{:08x}", checksum >> 32),
            run_dir: dir,
            kind: format!("{:?}", run.info.kind).to_lowercase(),
            max_seq_len: run.info.config.model.max_seq_len,
            index_params,
            model,
            items: run.items,
            feature_names: run.user_feature_names,
            feature_vocabs: run.user_feature_vocabs,
            index,
            popular,
            attributes: Attributes::default(),
        })
    }

    /// Sets the attributes request filters select on.
    pub fn set_attributes(&mut self, attributes: Attributes) {
        self.attributes = attributes;
    }

    /// Real item rows (`1..`) with their raw ids, and the synthetic rows padding the index past
    /// them (`first`, `count`).
    pub fn catalogue_rows(&self) -> (Vec<(u32, String)>, (u32, u32)) {
        let rows = self.model.item_rows() as u32;
        let real: Vec<(u32, String)> =
            (1..rows).filter_map(|r| self.items.raw(r).map(|raw| (r, raw.to_owned()))).collect();
        let synthetic = self.index_len().saturating_sub(real.len()) as u32;
        (real, (rows, synthetic))
    }

    /// The ascending item rows a request filter allows.
    pub fn filter_rows(&self, filter: &Filter) -> Result<std::borrow::Cow<'_, [u32]>, String> {
        self.attributes.allowed(filter)
    }

    /// The row of a raw item id, synthetic padding (`synthetic-ROW`) included.
    pub fn item_row(&self, raw: &str) -> Option<u32> {
        self.items.get(raw).or_else(|| {
            let row: u32 = raw.strip_prefix("synthetic-")?.parse().ok()?;
            (row >= self.model.item_rows() as u32 && (row as usize) < self.model.item_rows() + self.index_len())
                .then_some(row)
        })
    }

    /// Items the engine can recall.
    pub fn index_len(&self) -> usize {
        self.index.as_ref().map_or_else(|| self.model.item_rows() - 1, |ix| ix.len())
    }

    pub fn has_item(&self, raw: &str) -> bool {
        self.items.get(raw).is_some()
    }

    /// The raw id of an item row; rows past the vocabulary (synthetic items added to a large
    /// benchmark index) are named `synthetic-ROW`.
    pub fn item_raw(&self, row: u32) -> std::borrow::Cow<'_, str> {
        match self.items.raw(row) {
            Some(s) => s.into(),
            None => format!("synthetic-{row}").into(),
        }
    }

    /// Names of the user features the model reads (`user_id` is taken from the request's user).
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// Top `k` items for one user among those `restrict` allows.
    pub fn recall(&self, user: &UserInput<'_>, k: usize, restrict: Restrict<'_>) -> Result<Recalled, ServeError> {
        let exclude_seen = restrict.exclude_seen;
        let mut rows: Vec<u32> = Vec::with_capacity(user.history.len());
        let mut unknown_history = 0;
        for raw in user.history {
            match self.items.get(raw) {
                Some(r) => rows.push(r),
                None => unknown_history += 1,
            }
        }
        let mut seen = rows.clone();
        seen.sort_unstable();
        seen.dedup();
        // Neither seen (when that matters) nor excluded: what the index is told to accept, the
        // allowed list going to it separately.
        let not_excluded = |id: u32| {
            (!exclude_seen || seen.binary_search(&id).is_err()) && restrict.excluded.binary_search(&id).is_err()
        };
        let keep = |id: u32| not_excluded(id) && restrict.allowed.is_none_or(|a| a.binary_search(&id).is_ok());
        let plain = !exclude_seen && restrict.excluded.is_empty();

        let feats: Vec<u32> = self
            .feature_names
            .iter()
            .zip(&self.feature_vocabs)
            .map(|(name, vocab)| {
                let value =
                    if name == USER_ID_FEATURE { user.user_id } else { user.features.get(name).map(String::as_str) };
                value.and_then(|v| vocab.get(v)).unwrap_or(0)
            })
            .collect();
        let knows_user = feats.iter().any(|&f| f != 0);
        if rows.is_empty() && !knows_user {
            let items = self.popular.iter().copied().filter(|&(id, _)| keep(id)).take(k).collect();
            return Ok(Recalled { items, source: Source::Popularity, unknown_history });
        }

        let index = match (&self.index, self.model.neighbors()) {
            (Some(ix), _) => ix,
            (None, Some(n)) => {
                let mut items = Vec::with_capacity(k);
                NEIGHBOR_SCRATCH.with_borrow_mut(|scratch| n.recall(&rows, k, &keep, scratch, &mut items));
                return Ok(Recalled { items, source: Source::Model, unknown_history });
            }
            (None, None) => {
                return Err(ServeError::Internal("the engine has neither an index nor neighbour lists".into()))
            }
        };
        let uv = self.model.user_vector(&feats, &rows);
        let (d, ni) = (self.model.dim(), self.model.interests());
        let mut ids = vec![u32::MAX; ni * k];
        let mut scores = vec![f32::NEG_INFINITY; ni * k];
        let mut buf = Vec::with_capacity(k);
        for (i, q) in uv.chunks_exact(d).enumerate() {
            let res = match restrict.allowed {
                Some(allowed) => {
                    needle_index::search_among(index.as_ref(), q, k, allowed, &not_excluded, &mut buf).map(|_| ())
                }
                None if plain => index.search(q, k, &mut buf),
                None => index.search_filtered(q, k, &not_excluded, &mut buf),
            };
            res.map_err(|e| ServeError::Internal(e.to_string()))?;
            for (slot, &(id, s)) in buf.iter().enumerate().take(k) {
                ids[i * k + slot] = id;
                scores[i * k + slot] = s;
            }
        }
        let (ids, scores) = if ni > 1 { merge_interests(&ids, &scores, 1, ni, k) } else { (ids, scores) };
        let items = ids.into_iter().zip(scores).take_while(|&(id, _)| id != u32::MAX).collect();
        Ok(Recalled { items, source: Source::Model, unknown_history })
    }
}

/// What a store holds for one run: item details and user profiles/histories, with the history
/// bound and the data fingerprint they were made for. Written by `needle store load` and by
/// `needle serve` when it finds its store empty.
pub struct StoreContents {
    pub items: Vec<ItemRecord>,
    pub users: Vec<UserRecord>,
    /// The model's `max_seq_len`: stores keep each user's newest this many items.
    pub max_history: usize,
    pub fingerprint: String,
}

impl StoreContents {
    /// Every item's details and every user's profile and whole log in time order (file order
    /// breaks ties), from the data the run `info` was trained on.
    pub fn of(ds: &Dataset, info: &RunInfo) -> Result<Self, needle_data::DataError> {
        let (items, users) = store_records(ds)?;
        Ok(StoreContents {
            items,
            users,
            max_history: info.config.model.max_seq_len,
            fingerprint: info.data_fingerprint.clone(),
        })
    }

    /// Loads the data of the run in `dir` (refusing data with another fingerprint) and makes its
    /// store contents.
    pub fn of_run(info: &RunInfo, data_dir: Option<&Path>) -> Result<Self, ServeError> {
        let (ds, _) = needle_run::load_run_data(info, data_dir)?;
        Ok(StoreContents::of(&ds, info)?)
    }

    /// Loads the records into `store` and tags it with the data fingerprint.
    pub async fn write_to(
        &self,
        store: &dyn Store,
        progress: &(dyn Fn(usize) + Send + Sync),
    ) -> Result<(), needle_store::StoreError> {
        store.load(&self.items, &self.users, self.max_history, progress).await?;
        store.set_loaded_tag(&self.fingerprint).await
    }
}

/// Item details and user profiles/histories of a run's dataset.
fn store_records(ds: &Dataset) -> Result<(Vec<ItemRecord>, Vec<UserRecord>), needle_data::DataError> {
    let items = (0..ds.item_ids.len())
        .map(|i| {
            let attributes = ds
                .item_features
                .iter()
                .map(|f| (f.name.clone(), f.values_of(i).map(str::to_owned).collect::<Vec<_>>()))
                .filter(|(_, v)| !v.is_empty())
                .collect();
            ItemRecord {
                id: ds.item_ids[i].clone(),
                details: ItemDetails { title: ds.item_titles.get(i).cloned().flatten(), attributes },
            }
        })
        .collect();
    let logs = needle_data::split::time_ordered(ds)?;
    let users = (0..ds.user_ids.len())
        .map(|u| {
            let features = ds
                .user_features
                .iter()
                .filter_map(|f| f.values_of(u).next().map(|v| (f.name.clone(), v.to_owned())))
                .collect();
            let history = logs.items_of(u).iter().map(|&i| ds.item_ids[i as usize].clone()).collect();
            UserRecord { id: ds.user_ids[u].clone(), profile: UserProfile { features, history } }
        })
        .collect();
    Ok((items, users))
}
