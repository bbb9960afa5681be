//! One loaded run, ready to answer: the user tower, the vocabularies that map raw ids to model
//! rows, the item index and a popularity list for users the model knows nothing about.
//!
//! Everything here is synchronous CPU work of well under a millisecond per request at ML-1M
//! scale, so handlers call it inline.

use crate::ServeError;
use needle_catalog::filter::{Attributes, Filter};
use needle_catalog::live::{LiveState, Prepared};
use needle_data::Dataset;
use needle_data::Vocab;
use needle_index::{Allowed, Index, IndexParams};
use needle_model::neighbors::Scratch;
use needle_model::tower::UserEvents;
use needle_run::channels::{mix, ChannelKind, ChannelsConfig, MixScratch};
use needle_run::{merge_interests, Model, RunInfo, ServingRun, USER_ID_FEATURE};
use needle_store::{ItemDetails, ItemRecord, LiveChanges, Store, UserProfile, UserRecord};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock, RwLockReadGuard};
use std::time::Instant;

thread_local! {
    /// Buffers of item-to-item scoring, reused by each compute thread from request to request.
    static NEIGHBOR_SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
    /// Buffers of the channel mix, likewise.
    static MIX_SCRATCH: std::cell::RefCell<MixScratch> = std::cell::RefCell::new(MixScratch::default());
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
    /// Item rows with training events by the time of their first one (Unix seconds), latest
    /// first; `None` for runs saved without those times.
    newest: Option<Vec<(u32, f32)>>,
    /// Newest history items the user tower reads.
    pub max_seq_len: usize,
    /// What request filters select on; empty until [`Engine::set_attributes`].
    attributes: Attributes,
    /// Item vectors by row, computed on first use by a `similar` channel.
    item_vecs: std::sync::OnceLock<Vec<f32>>,
    /// Recall channels mixed into every answer; `None`: this run's own recall alone.
    channels: Option<ChannelSet>,
    /// The item features the item tower reads and their vocabularies (empty: ids only).
    item_feature_names: Vec<String>,
    item_feature_vocabs: Vec<Vocab>,
    /// Items published and deleted while serving.
    live: Arc<RwLock<LiveState>>,
    /// Segment size that starts a background compaction (0: never).
    compact_at: usize,
}

/// The channels of a channel file, each bound to the engine it reads.
pub struct ChannelSet {
    pub cfg: ChannelsConfig,
    /// `None`: the channel reads the served run itself.
    engines: Vec<Option<Arc<Engine>>>,
}

/// What a recall may return beyond the user's own history.
#[derive(Clone, Copy, Default)]
pub struct Restrict<'a> {
    /// Leave out the items of the user's history.
    pub exclude_seen: bool,
    /// Only these item rows, from a request filter.
    pub allowed: Option<&'a Allowed<'a>>,
    /// The filter `allowed` came from, for items whose attributes changed while serving.
    pub filter: Option<&'a Filter>,
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
    /// With channels: for each item, the set of channels (bit `c` = channel `c`) that found it.
    pub found_by: Vec<u64>,
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
        if run.info.config.model.time_buckets > 0 {
            return Err(ServeError::Load(format!(
                "{}: its sequential model reads the time gaps between history events ([model] time_buckets = {}), \
                 and the store keeps no event times; serve a run trained without time_buckets",
                dir.display(),
                run.info.config.model.time_buckets
            )));
        }
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
        let dim = model.dim();
        let mut popular: Vec<(u32, f32)> =
            run.item_counts.iter().enumerate().skip(1).map(|(row, &c)| (row as u32, c as f32)).collect();
        popular.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        // Ordered on the exact times; the f32 score is only what a client sees.
        let newest = run.item_first_seen.as_ref().map(|first| {
            let rows = needle_run::channels::newest_rows(first, &run.item_counts);
            rows.into_iter().map(|row| (row, first[row as usize] as f32)).collect()
        });
        let mut engine = Engine {
            run_id: format!("{name}:{:08x}", checksum >> 32),
            run_dir: dir,
            kind: format!("{:?}", run.info.kind).to_lowercase(),
            max_seq_len: run.info.max_seq_len(),
            index_params,
            model,
            items: run.items,
            feature_names: run.user_feature_names,
            feature_vocabs: run.user_feature_vocabs,
            index,
            popular,
            newest,
            attributes: Attributes::default(),
            item_vecs: std::sync::OnceLock::new(),
            channels: None,
            item_feature_names: run.item_feature_names,
            item_feature_vocabs: run.item_feature_vocabs,
            live: Arc::default(),
            compact_at: DEFAULT_COMPACT_AT,
        };
        // Items published live get rows past every row the index holds (synthetic padding too).
        let (first, synthetic) = engine.padding_rows();
        engine.live = Arc::new(RwLock::new(LiveState::new(first + synthetic, dim)));
        Ok(engine)
    }

    fn live(&self) -> RwLockReadGuard<'_, LiveState> {
        // A panic while holding the lock cannot leave the state half-changed: every change is
        // one call that allocates before it mutates.
        self.live.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Published items compacted into the sealed segment's graph, for `/healthz`.
    pub fn live_sealed(&self) -> usize {
        self.live().sealed()
    }

    /// Items published into the live segment and index rows deleted, for `/healthz`.
    pub fn live_counts(&self) -> (usize, usize) {
        let live = self.live();
        (live.published(), live.deleted())
    }

    /// Embeds items to publish: each item's vector from its features (the item tower), or the
    /// trained vector of a known item whose tower reads ids only. An item the model has no way
    /// to embed (a new id for an id-only tower, or none of its feature values known) is a
    /// [`ServeError::Conflict`].
    pub fn prepare(&self, items: Vec<ItemRecord>) -> Result<Vec<Prepared>, ServeError> {
        items.into_iter().map(|it| self.prepare_one(it)).collect()
    }

    fn prepare_one(&self, item: ItemRecord) -> Result<Prepared, ServeError> {
        let row = self.items.get(&item.id);
        let conflict = |why: String| ServeError::Conflict(format!("item {:?}: {why}", item.id));
        let vector = if self.index.is_none() {
            // Neighbour lists cannot take an item nobody has interacted with.
            if row.is_none() {
                return Err(conflict(format!(
                    "this is an item-to-item model ({}), which recalls only items seen in training",
                    self.kind
                )));
            }
            None
        } else if self.item_feature_names.is_empty() {
            let Some(r) = row else {
                return Err(conflict(format!(
                    "the {} item tower reads only item ids, so an item it was not trained on has no vector; \
                     serve a model whose item tower reads item features (`[model] item_features`, trained \
                     with `item_id_dropout`) to publish new items",
                    self.kind
                )));
            };
            Some(self.model.item_vector(r))
        } else {
            let values: Vec<Vec<u32>> = self
                .item_feature_names
                .iter()
                .zip(&self.item_feature_vocabs)
                .map(|(name, vocab)| {
                    let given = item.details.attributes.get(name).map(Vec::as_slice).unwrap_or_default();
                    given.iter().filter_map(|v| vocab.get(v)).collect()
                })
                .collect();
            if row.is_none() && values.iter().all(Vec::is_empty) {
                return Err(conflict(format!(
                    "none of its item features ({}) has a value the model was trained on, so it has no vector",
                    self.item_feature_names.join(", ")
                )));
            }
            let refs: Vec<&[u32]> = values.iter().map(Vec::as_slice).collect();
            self.model.item_vector_of(row, &refs)
        };
        Ok(Prepared { id: item.id, row, vector, details: item.details })
    }

    /// Applies prepared upserts.
    pub fn publish(&self, items: Vec<Prepared>) {
        let snapshot = {
            let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
            for it in items {
                live.upsert(it);
            }
            live.compaction_due(self.compact_at).then(|| live.begin_compaction())
        };
        if let Some(snap) = snapshot {
            self.compact_in_background(snap);
        }
    }

    /// Segment size that starts a background compaction of the published items into a graph
    /// (0: never).
    pub fn set_compact_at(&mut self, n: usize) {
        self.compact_at = n;
    }

    /// Builds the graph over `snap` on a thread of its own at a lower priority and swaps it in;
    /// searches go on over the segment meanwhile.
    fn compact_in_background(&self, snap: needle_catalog::live::Snapshot) {
        let live = self.live.clone();
        let n = snap.len();
        let spawned = std::thread::Builder::new().name("needle-compact".into()).spawn(move || {
            crate::compute::lower_priority();
            let t = std::time::Instant::now();
            match snap.build() {
                Ok(sealed) => {
                    live.write().unwrap_or_else(|e| e.into_inner()).finish_compaction(sealed);
                    tracing::info!("compacted {n} published items into a graph in {:.2}s", t.elapsed().as_secs_f64());
                }
                Err(e) => {
                    live.write().unwrap_or_else(|e| e.into_inner()).abort_compaction();
                    tracing::warn!("compacting {n} published items failed (they stay in the segment): {e}");
                }
            }
        });
        if let Err(e) = spawned {
            self.live.write().unwrap_or_else(|e| e.into_inner()).abort_compaction();
            tracing::warn!("cannot start a compaction thread: {e}");
        }
    }

    /// Deletes an item; whether the engine had it.
    pub fn delete(&self, raw: &str) -> bool {
        let row = self.items.get(raw);
        self.live.write().unwrap_or_else(|e| e.into_inner()).delete(raw, row)
    }

    /// Applies the changes a store recorded; returns how many upserts could not be applied
    /// (items this model cannot embed), each logged.
    pub fn apply_changes(&self, changes: LiveChanges) -> usize {
        let mut ready = Vec::with_capacity(changes.upserted.len());
        let mut refused = 0;
        for it in changes.upserted {
            match self.prepare_one(it) {
                Ok(p) => ready.push(p),
                Err(e) => {
                    refused += 1;
                    tracing::warn!("live item not applied: {e}");
                }
            }
        }
        self.publish(ready);
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        for raw in &changes.deleted {
            live.delete(raw, self.items.get(raw));
        }
        refused
    }

    /// Mixes `cfg`'s channels into every answer; `engines[c]` is channel `c`'s run when it is
    /// not this one. Every run must share this run's item vocabulary, so rows mean the same items.
    pub fn set_channels(&mut self, cfg: ChannelsConfig, engines: Vec<Option<Arc<Engine>>>) -> Result<(), ServeError> {
        for (c, e) in cfg.channels.iter().zip(&engines) {
            if let Some(e) = e {
                if e.items != self.items {
                    return Err(ServeError::Load(format!(
                        "channel `{}`: {} has another item vocabulary than {}; the channels of one server must be trained on the same data",
                        c.name,
                        e.run_dir.display(),
                        self.run_dir.display()
                    )));
                }
            }
            if c.kind == ChannelKind::Similar && e.as_deref().unwrap_or(self).model.dim() == 0 {
                return Err(ServeError::Load(format!(
                    "channel `{}`: a `similar` channel needs a run with item vectors, not an item-to-item model",
                    c.name
                )));
            }
            if c.kind == ChannelKind::Newest && self.newest.is_none() {
                return Err(ServeError::Load(format!(
                    "channel `{}`: {} was saved without its items' first-event times (item_counts.tsv has two columns); train it again to serve a `newest` channel",
                    c.name,
                    self.run_dir.display()
                )));
            }
        }
        self.channels = Some(ChannelSet { cfg, engines });
        Ok(())
    }

    /// Overrides the index's built search effort (HNSW `ef_search`, IVF `nprobe`): the
    /// speed/recall knob, turned at start without rebuilding the index.
    pub fn set_search_effort(&mut self, effort: usize) {
        if let Some(ix) = &mut self.index {
            ix.set_search_effort(effort);
            self.index_params = ix.params().to_string();
        }
    }

    /// Channel names, when channels are mixed.
    pub fn channel_names(&self) -> Option<Vec<&str>> {
        self.channels.as_ref().map(|s| s.cfg.channels.iter().map(|c| c.name.as_str()).collect())
    }

    /// Sets the attributes request filters select on.
    pub fn set_attributes(&mut self, attributes: Attributes) {
        self.attributes = attributes;
    }

    /// Real item rows (`1..`) with their raw ids.
    pub fn catalogue_rows(&self) -> Vec<(u32, String)> {
        let rows = self.model.item_rows() as u32;
        (1..rows).filter_map(|r| self.items.raw(r).map(|raw| (r, raw.to_owned()))).collect()
    }

    /// The synthetic rows padding the index past the real items: `(first, count)`. Every row
    /// below the model's table has a raw id (checked when the run is loaded).
    pub fn padding_rows(&self) -> (u32, u32) {
        let rows = self.model.item_rows();
        (rows as u32, self.index_len().saturating_sub(rows.saturating_sub(1)) as u32)
    }

    /// The ascending item rows a request filter allows.
    pub fn filter_rows(&self, filter: &Filter) -> Result<std::borrow::Cow<'_, Allowed<'static>>, String> {
        self.attributes.allowed(filter)
    }

    /// The row of a raw item id, items published live and synthetic padding (`synthetic-ROW`)
    /// included.
    pub fn item_row(&self, raw: &str) -> Option<u32> {
        self.items.get(raw).or_else(|| self.live().new_row(raw)).or_else(|| {
            let row: u32 = raw.strip_prefix("synthetic-")?.parse().ok()?;
            (row >= self.model.item_rows() as u32 && (row as usize) < self.model.item_rows() + self.index_len())
                .then_some(row)
        })
    }

    /// Items the engine can recall.
    pub fn index_len(&self) -> usize {
        self.index.as_ref().map_or_else(|| self.model.item_rows() - 1, |ix| ix.len())
    }

    /// Whether the model was trained on the item or it was published live.
    pub fn has_item(&self, raw: &str) -> bool {
        self.items.get(raw).is_some() || self.live().new_row(raw).is_some()
    }

    /// The raw id of an item row; rows past the vocabulary (synthetic items added to a large
    /// benchmark index) are named `synthetic-ROW`.
    pub fn item_raw(&self, row: u32) -> std::borrow::Cow<'_, str> {
        if let Some(s) = self.items.raw(row) {
            return s.into();
        }
        match self.live().new_raw(row) {
            Some(s) => s.to_owned().into(),
            None => format!("synthetic-{row}").into(),
        }
    }

    /// Names of the user features the model reads (`user_id` is taken from the request's user).
    pub fn feature_names(&self) -> &[String] {
        &self.feature_names
    }

    /// Top `k` items for one user among those `restrict` allows: this run's own recall, or the
    /// mix of the channels when they are set. Channel runs share this run's item vocabulary
    /// (checked when they are set), so the history's rows and what to keep serve them all.
    pub fn recall(&self, user: &UserInput<'_>, k: usize, restrict: Restrict<'_>) -> Result<Recalled, ServeError> {
        let live = self.live();
        let rows: Vec<u32> = user.history.iter().filter_map(|raw| self.items.get(raw)).collect();
        // Items published live have no row in the towers' tables, but they were seen.
        let live_seen: Vec<u32> = if live.published() > 0 && rows.len() < user.history.len() {
            user.history.iter().filter_map(|raw| live.new_row(raw)).collect()
        } else {
            Vec::new()
        };
        let unknown_history = user.history.len() - rows.len() - live_seen.len();
        let keep = Keep::new(&rows, &live_seen, restrict, &live, self);
        let Some(set) = &self.channels else {
            let (items, source) = self.recall_own(user, &rows, k, &keep)?;
            return Ok(Recalled { items, found_by: Vec::new(), source, unknown_history });
        };
        let mut lists: Vec<Vec<(u32, f32)>> = Vec::with_capacity(set.cfg.channels.len());
        let mut source = Source::Popularity;
        for (c, e) in set.cfg.channels.iter().zip(&set.engines) {
            let e = e.as_deref().unwrap_or(self);
            let items = match c.kind {
                ChannelKind::Run => {
                    let (items, s) = e.recall_own(user, &rows, k, &keep)?;
                    if s == Source::Model {
                        source = Source::Model;
                    }
                    items
                }
                ChannelKind::Similar => {
                    let items = e.similar(&rows, c.recent, k, &keep)?;
                    if !items.is_empty() {
                        source = Source::Model;
                    }
                    items
                }
                ChannelKind::Popularity => self.popular_items(k, &keep),
                ChannelKind::Newest => self.newest_items(k, &keep),
            };
            lists.push(items);
        }
        let refs: Vec<&[(u32, f32)]> = lists.iter().map(Vec::as_slice).collect();
        let mut mixed = Vec::with_capacity(k);
        MIX_SCRATCH.with_borrow_mut(|scratch| mix(&set.cfg, &refs, k, scratch, &mut mixed));
        Ok(Recalled {
            items: mixed.iter().map(|m| (m.item, m.score)).collect(),
            found_by: mixed.iter().map(|m| m.found_by).collect(),
            source,
            unknown_history,
        })
    }

    /// The `k` most trained-on items `keep` passes.
    fn popular_items(&self, k: usize, keep: &Keep<'_>) -> Vec<(u32, f32)> {
        self.popular.iter().copied().filter(|&(id, _)| keep.test(id)).take(k).collect()
    }

    /// The `k` newest items `keep` passes: published while serving, then by first training event.
    fn newest_items(&self, k: usize, keep: &Keep<'_>) -> Vec<(u32, f32)> {
        let mut out = Vec::with_capacity(k);
        // Published rows are in no allowed list (built from the index's attributes); the
        // filter is checked on their own details.
        for (row, t) in keep.live.newest_first() {
            if out.len() == k {
                return out;
            }
            if keep.admits(row, false) {
                out.push((row, t));
            }
        }
        let trained = self.newest.as_deref().unwrap_or_default();
        out.extend(trained.iter().copied().filter(|&(row, _)| keep.test(row)).take(k - out.len()));
        out
    }

    /// This run's own recall for a user whose history is `rows`: the user tower searching the
    /// index, its neighbour lists, or the most popular items for a user nothing is known about.
    fn recall_own(
        &self,
        user: &UserInput<'_>,
        rows: &[u32],
        k: usize,
        keep: &Keep<'_>,
    ) -> Result<(Vec<(u32, f32)>, Source), ServeError> {
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
            return Ok((self.popular_items(k, keep), Source::Popularity));
        }
        if self.index.is_none() {
            let Some(n) = self.model.neighbors() else {
                return Err(ServeError::Internal("the engine has neither an index nor neighbour lists".into()));
            };
            let mut items = Vec::with_capacity(k);
            NEIGHBOR_SCRATCH.with_borrow_mut(|scratch| n.recall(rows, k, &|id| keep.test(id), scratch, &mut items));
            return Ok((items, Source::Model));
        }
        let uv = self.model.user_vector(&UserEvents::new(rows, &feats));
        Ok((self.search(&uv, k, keep)?, Source::Model))
    }

    /// The items nearest the newest `recent` history rows by item vector, each scored by its
    /// best match; empty without a history.
    fn similar(&self, rows: &[u32], recent: usize, k: usize, keep: &Keep<'_>) -> Result<Vec<(u32, f32)>, ServeError> {
        if rows.is_empty() || self.index.is_none() {
            return Ok(Vec::new());
        }
        let iv = self.item_vecs.get_or_init(|| self.model.item_vectors());
        let d = self.model.dim();
        let queries: Vec<f32> =
            rows.iter().rev().take(recent).flat_map(|&r| &iv[r as usize * d..(r as usize + 1) * d]).copied().collect();
        self.search(&queries, k, keep)
    }

    /// Top `k` by index search for each `dim`-wide query among the items `keep` passes, merged
    /// by best score.
    fn search(&self, queries: &[f32], k: usize, keep: &Keep<'_>) -> Result<Vec<(u32, f32)>, ServeError> {
        let index = self.index.as_ref().ok_or_else(|| ServeError::Internal("no item index".into()))?;
        let d = self.model.dim();
        let nq = queries.len() / d;
        let mut ids = vec![u32::MAX; nq * k];
        let mut scores = vec![f32::NEG_INFINITY; nq * k];
        let mut buf = Vec::with_capacity(k);
        let own = std::ptr::eq(self, keep.owner);
        let not_excluded = |id: u32| keep.admits(id, own);
        let not_seen = |id: u32| keep.not_seen(id);
        for (i, q) in queries.chunks_exact(d).enumerate() {
            let res = match keep.restrict.allowed {
                Some(allowed) => {
                    needle_index::search_among(index.as_ref(), q, k, allowed, &not_excluded, &mut buf).map(|_| ())
                }
                None if keep.plain() => index.search(q, k, &mut buf),
                None => index.search_filtered(q, k, &not_excluded, &mut buf),
            };
            res.map_err(|e| ServeError::Internal(e.to_string()))?;
            if own {
                keep.live.search_into(q, k, keep.restrict.filter, &not_seen, &mut buf);
            }
            for (slot, &(id, s)) in buf.iter().enumerate().take(k) {
                ids[i * k + slot] = id;
                scores[i * k + slot] = s;
            }
        }
        let (ids, scores) = if nq > 1 { merge_interests(&ids, &scores, 1, nq, k) } else { (ids, scores) };
        Ok(ids.into_iter().zip(scores).take_while(|&(id, _)| id != u32::MAX).collect())
    }
}

/// Published items the segment holds before they are compacted into a graph: at 10,000 the
/// exact scan added 0.5–0.9 ms at p99 to a 2-core server's recalls (`results/serve.md`).
pub const DEFAULT_COMPACT_AT: usize = 4096;

/// What one recall may return: the restriction of the request, the user's seen items and the
/// live changes of the engine that answers it.
struct Keep<'a> {
    /// The history's rows, sorted, when seen items are excluded; else empty.
    seen: Vec<u32>,
    restrict: Restrict<'a>,
    live: &'a LiveState,
    /// The engine whose live segment and tombstones these are.
    owner: &'a Engine,
}

impl<'a> Keep<'a> {
    fn new(
        history_rows: &[u32],
        live_rows: &[u32],
        restrict: Restrict<'a>,
        live: &'a LiveState,
        owner: &'a Engine,
    ) -> Keep<'a> {
        let mut seen = Vec::new();
        if restrict.exclude_seen {
            seen.extend_from_slice(history_rows);
            seen.extend_from_slice(live_rows);
        }
        seen.sort_unstable();
        seen.dedup();
        Keep { seen, restrict, live, owner }
    }

    /// Neither seen nor excluded.
    fn not_seen(&self, id: u32) -> bool {
        self.seen.binary_search(&id).is_err() && self.restrict.excluded.binary_search(&id).is_err()
    }

    /// Neither seen, excluded, deleted, nor (in the owner's index) superseded: what an index is
    /// told to accept, the allowed list going to it separately.
    fn admits(&self, id: u32, own_index: bool) -> bool {
        self.not_seen(id) && (self.live.is_empty() || self.live.admits(id, self.restrict.filter, own_index))
    }

    /// For rows that come from no index (popularity, neighbour lists).
    fn test(&self, id: u32) -> bool {
        self.admits(id, false) && self.restrict.allowed.is_none_or(|a| a.contains(id))
    }

    /// Nothing to leave out beyond an allowed list.
    fn plain(&self) -> bool {
        self.seen.is_empty() && self.restrict.excluded.is_empty() && self.live.is_empty()
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
        Ok(StoreContents { items, users, max_history: info.max_seq_len(), fingerprint: info.data_fingerprint.clone() })
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
        store
            .load(
                needle_store::Records { items: &self.items, users: &self.users, max_history: self.max_history },
                progress,
            )
            .await?;
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
