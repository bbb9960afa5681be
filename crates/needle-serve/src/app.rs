//! The state a server shares between requests (served versions, store, limits, metrics) and
//! how runs are loaded into it at start-up and on reload.

use crate::auth::AdminAuth;
use crate::engine::{Engine, StoreContents};
use crate::metrics::Metrics;
use crate::reply::ApiError;
use crate::versions::Versions;
use crate::ServeError;
use axum::http::StatusCode;
use needle_catalog::filter::Attributes;
use needle_run::channels::ChannelsConfig;
use needle_store::{Store, StoreSpec};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Request limits; every one is a command-line flag of `needle serve`.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Largest `k` a recall may ask for.
    pub max_k: usize,
    /// Longest `history` a recall may send.
    pub max_history: usize,
    /// Largest request body, in bytes.
    pub max_body_bytes: usize,
    /// Longest a request may take before it is answered 503.
    pub timeout: Duration,
    /// Requests handled at once; one more is answered 503 with `Retry-After` at once instead of
    /// queueing, so latency stays bounded when load exceeds capacity (`/healthz` and `/metrics`
    /// are never turned away).
    pub max_in_flight: usize,
    /// A recall whose user tower and search would wait longer than this for a compute thread is
    /// answered 503 with `Retry-After` at once (zero: never).
    pub max_queue_wait: Duration,
    /// Threads that run user towers and index searches (0: one per core).
    pub compute_threads: usize,
    /// Items of each user's history the store keeps, when more than the model's window: a
    /// recall leaves out as seen only what the store kept (0: the window, `max_seq_len`).
    pub seen_history: usize,
}

impl Limits {
    /// Items of a user's history the store keeps for a model that reads the newest `window`.
    pub fn history_kept(&self, window: usize) -> usize {
        window.max(self.seen_history)
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_k: 1000,
            max_history: 1000,
            max_body_bytes: 64 * 1024,
            timeout: Duration::from_secs(2),
            max_in_flight: 256,
            max_queue_wait: Duration::from_millis(5),
            compute_threads: 0,
            seen_history: 0,
        }
    }
}

#[derive(Clone, Debug)]
pub struct ServeOptions {
    pub run: PathBuf,
    pub data_dir: Option<PathBuf>,
    /// An index file to serve instead of the run's own `index.bin`.
    pub index: Option<PathBuf>,
    /// A channel file whose channels are mixed into every answer (re-read on reload).
    pub channels: Option<PathBuf>,
    /// The served index's search effort instead of the built one.
    pub effort: Option<usize>,
    pub store: StoreSpec,
    pub addr: SocketAddr,
    pub limits: Limits,
    /// What `/admin/*` and the write routes require.
    pub auth: AdminAuth,
    pub conn: crate::conn::ConnLimits,
    /// The name of the version `run` is served as (default: the run directory's name).
    pub name: Option<String>,
    /// More runs served side by side, by version name; they get traffic only from `traffic`.
    pub versions: Vec<(String, PathBuf)>,
    /// The traffic weights by version name (default: all to `run`).
    pub traffic: Option<BTreeMap<String, u32>>,
    /// With a store other servers share (Redis): how often to check for catalogue changes
    /// whose announcement this server missed.
    pub resync_every: Duration,
    /// Published items the exact-scan segment holds before a background compaction seals them
    /// into a graph (0: never).
    pub compact_live_at: usize,
}

/// The embedded store's file inside a run directory.
pub const EMBEDDED_STORE_FILE: &str = "store.redb";

pub(crate) struct App {
    pub(crate) versions: RwLock<Arc<Versions>>,
    pub(crate) store: Box<dyn Store>,
    pub(crate) metrics: Metrics,
    pub(crate) limits: Limits,
    pub(crate) in_flight: tokio::sync::Semaphore,
    pub(crate) compute: crate::compute::Compute,
    /// Free connection slots, shared with the listener.
    pub(crate) conn_slots: Arc<tokio::sync::Semaphore>,
    pub(crate) conn: crate::conn::ConnLimits,
    pub(crate) auth: AdminAuth,
    pub(crate) data_dir: Option<PathBuf>,
    /// The run the `--index` override belongs to.
    pub(crate) index_override: Option<(PathBuf, PathBuf)>,
    pub(crate) channels: Option<PathBuf>,
    pub(crate) effort: Option<usize>,
    pub(crate) compact_live_at: usize,
    /// Held by every change to the served versions (reloads, adds, removals, weights), so
    /// that no change is built on a snapshot another change has replaced.
    pub(crate) admin_lock: tokio::sync::Mutex<()>,
    pub(crate) started: Instant,
    pub(crate) boot: u32,
    pub(crate) seq: AtomicU64,
    /// Spreads recalls that name no user over the versions.
    pub(crate) anonymous: AtomicU64,
    /// This process among the servers sharing a store, so it can skip its own announcements.
    pub(crate) instance: String,
    /// The store's change count this server's engines reflect.
    pub(crate) applied_changes: AtomicU64,
}

impl App {
    /// A request turned away over capacity (`why`): counted, and answered 503.
    pub(crate) fn shed(&self, why: String) -> ApiError {
        self.metrics.shed.fetch_add(1, Relaxed);
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("over capacity ({why}); retry in a second"),
        }
    }

    pub(crate) fn versions(&self) -> Arc<Versions> {
        // A poisoned lock still holds a valid snapshot: swaps are a single assignment.
        self.versions.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in new versions; callers hold `admin_lock`.
    pub(crate) fn set_versions(&self, v: Versions) {
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    /// The sources a run is loaded with.
    pub(crate) fn sources(&self, dir: &Path) -> Sources {
        Sources::for_run(dir, self.index_override.as_ref(), &self.channels, self.effort, self.compact_live_at)
    }

    /// A failed store call: counted, and answered 503 (the request was fine; try again).
    pub(crate) fn store_error(&self, e: needle_store::StoreError) -> ApiError {
        self.metrics.store_errors.fetch_add(1, Relaxed);
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: format!("store: {e}") }
    }

    /// A store write bounded by the request timeout; failure and timeout are both a 503.
    pub(crate) async fn store_write<T>(&self, fut: needle_store::StoreFuture<'_, T>) -> Result<T, ApiError> {
        match tokio::time::timeout(self.limits.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.store_error(e)),
            Err(_) => Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: "store timed out".into() }),
        }
    }
}

pub(crate) type Shared = Arc<App>;

/// A run directory's own name, when it makes a valid version name.
pub(crate) fn default_version_name(run: &Path) -> String {
    let dir = run.canonicalize().unwrap_or_else(|_| run.to_owned());
    dir.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| crate::versions::check_name(n).is_ok())
        .map_or_else(|| "main".to_owned(), str::to_owned)
}

/// What a served run is searched with beyond the run directory itself.
pub(crate) struct Sources {
    /// An index file instead of the run's own.
    pub(crate) index: Option<PathBuf>,
    /// A channel file.
    pub(crate) channels: Option<PathBuf>,
    /// A search effort instead of the index's built one.
    pub(crate) effort: Option<usize>,
    /// Published items that start a compaction (0: never).
    pub(crate) compact_at: usize,
}

impl Sources {
    /// What the run in `dir` is loaded with: `index_override` is (the run it belongs to, the
    /// index file), and applies to that run only.
    pub(crate) fn for_run(
        dir: &Path,
        index_override: Option<&(PathBuf, PathBuf)>,
        channels: &Option<PathBuf>,
        effort: Option<usize>,
        compact_at: usize,
    ) -> Sources {
        let index = index_override.filter(|(r, _)| same_dir(r, dir)).map(|(_, i)| i.clone());
        Sources { index, channels: channels.clone(), effort, compact_at }
    }
}

/// Loads a run into an engine on the blocking pool, from the run directory alone. With a store
/// that holds nothing yet, also reads the run's training data to fill it; warns when the store
/// was filled from other data.
pub(crate) async fn load_engine(
    run: &Path,
    data_dir: Option<PathBuf>,
    sources: Sources,
    store: Option<&dyn Store>,
    limits: &Limits,
) -> Result<Arc<Engine>, ServeError> {
    let Sources { index, channels, effort, compact_at } = sources;
    // `None`: no store; `Some(None)`: a store that holds nothing yet, or whose last load was cut
    // short (loads are idempotent, so loading again repairs it).
    let tag = match store {
        Some(s) => Some(s.loaded_tag().await?),
        None => None,
    };
    let empty_store = matches!(tag, Some(None));
    let dir = run.to_owned();
    let blocking = move || -> Result<_, ServeError> {
        let served = needle_run::load_for_serving(&dir)?;
        let contents = if empty_store { Some(StoreContents::of_run(&served.info, data_dir.as_deref())?) } else { None };
        Ok((served, contents))
    };
    let (served, mut contents) = in_background(blocking).await??;
    if let Some(c) = contents.as_mut() {
        c.max_history = limits.history_kept(c.max_history);
    }
    if let Some(store) = store {
        let fp = &served.info.data_fingerprint;
        if let Some(c) = contents {
            let t = Instant::now();
            c.write_to(store, &|_| {}).await?;
            tracing::info!(
                store = %store.describe(),
                "store held no complete load: loaded {} items and {} users in {:.2}s",
                c.items.len(),
                c.users.len(),
                t.elapsed().as_secs_f64()
            );
        } else if let Some(Some(other)) = tag.filter(|t| t.as_ref() != Some(fp)) {
            tracing::warn!(
                store = %store.describe(),
                "the store was loaded from other data (fingerprint {other}, this run's is {fp}); reload it with `needle store load`"
            );
        }
    }
    let mut engine = in_background(move || Engine::new(served, index.as_deref())).await??;
    let t = Instant::now();
    let real = engine.catalogue_rows();
    let (first, synthetic) = engine.padding_rows();
    let mut details = Vec::with_capacity(real.len());
    if let Some(store) = store {
        for chunk in real.chunks(1024) {
            let ids: Vec<&str> = chunk.iter().map(|(_, raw)| raw.as_str()).collect();
            details.extend(store.items(&ids).await?);
        }
    }
    let with_details = real.iter().zip(&details).filter_map(|((row, _), d)| d.as_ref().map(|d| (*row, d)));
    let mut attributes = Attributes::from_items(with_details);
    if synthetic > 0 {
        attributes.add_synthetic_shards(first, synthetic);
    }
    tracing::info!(
        "filterable item attributes: {} ({:.2}s)",
        if attributes.names().is_empty() { "none".to_owned() } else { attributes.names().join(", ") },
        t.elapsed().as_secs_f64()
    );
    engine.set_attributes(attributes);
    if let Some(e) = effort {
        engine.set_search_effort(e);
    }
    engine.set_compact_at(compact_at);
    if let Some(path) = channels {
        let main = run.to_owned();
        engine = in_background(move || -> Result<Engine, ServeError> {
            let cfg = ChannelsConfig::read(&path).map_err(ServeError::Load)?;
            // Each run once, however many channels read it.
            let mut loaded: Vec<(PathBuf, Arc<Engine>)> = Vec::new();
            let mut engines = Vec::with_capacity(cfg.channels.len());
            for c in &cfg.channels {
                let dir = match &c.run {
                    Some(d) if !same_dir(d, &main) => d,
                    _ => {
                        engines.push(None);
                        continue;
                    }
                };
                if let Some((_, e)) = loaded.iter().find(|(d, _)| same_dir(d, dir)) {
                    engines.push(Some(e.clone()));
                    continue;
                }
                let served = needle_run::load_for_serving(dir)
                    .map_err(|e| ServeError::Load(format!("channel `{}`: {}: {e}", c.name, dir.display())))?;
                let e = Arc::new(Engine::new(served, None)?);
                loaded.push((dir.clone(), e.clone()));
                engines.push(Some(e));
            }
            engine.set_channels(cfg, engines)?;
            Ok(engine)
        })
        .await??;
        tracing::info!("recall channels: {}", engine.channel_names().unwrap_or_default().join(", "));
    }
    let engine = Arc::new(engine);
    if let Some(store) = store {
        apply_live_changes(vec![engine.clone()], store).await?;
    }
    Ok(engine)
}

/// Applies the catalogue changes the store recorded (items published and deleted while
/// serving) to engines, read from the store once for all of them.
pub(crate) async fn apply_live_changes(engines: Vec<Arc<Engine>>, store: &dyn Store) -> Result<(), ServeError> {
    let changes = store.live_changes().await?;
    if changes.upserted.is_empty() && changes.deleted.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let (n_up, n_del) = (changes.upserted.len(), changes.deleted.len());
    let refused =
        in_background(move || engines.iter().map(|e| e.apply_changes(changes.clone())).collect::<Vec<_>>()).await?;
    for refused in refused {
        tracing::info!(
            "applied the store's live catalogue: {} published ({refused} this model cannot embed), {n_del} deleted ({:.2}s)",
            n_up - refused,
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Whether two paths name the same directory (as written or once resolved).
pub(crate) fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Runs `f` on a thread of its own at a lower CPU priority (nice 10): loading a model and freeing
/// the old one during a reload then take the cycles requests leave over, not theirs, and the
/// compute pool does not fall behind and shed while a reload runs.
pub(crate) async fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServeError> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("needle-background".into())
        .spawn(move || {
            crate::compute::lower_priority();
            let _ = tx.send(f());
        })
        .map_err(|e| ServeError::Internal(format!("cannot start a background thread: {e}")))?;
    rx.await.map_err(|_| ServeError::Internal("a background task ended without an answer".into()))
}

/// Loads a run for one version and swaps it in: requests that already hold the old engine
/// finish on it, later ones get the new one. On failure the old engine keeps serving. Callers
/// hold `admin_lock`.
pub(crate) async fn reload(app: &App, name: &str, run: Option<PathBuf>) -> Result<(String, String), ServeError> {
    let current = match app.versions().get(name) {
        Some(v) => v.engine.clone(),
        None => return Err(ServeError::BadRequest(format!("no version {name:?}"))),
    };
    let dir = run.unwrap_or_else(|| current.run_dir.clone());
    let result = load_engine(&dir, app.data_dir.clone(), app.sources(&dir), Some(&*app.store), &app.limits).await;
    let engine = match result {
        Ok(e) => e,
        Err(e) => {
            app.metrics.reload_failures.fetch_add(1, Relaxed);
            tracing::error!(version = name, run = %dir.display(), "reload failed: {e}");
            return Err(e);
        }
    };
    let new_id = engine.run_id.clone();
    let next = app.versions().with_engine(name, engine.clone()).map_err(|e| ServeError::Internal(e.to_string()))?;
    app.set_versions(next);
    catch_up_live(app, &engine).await;
    app.metrics.reloads.fetch_add(1, Relaxed);
    tracing::info!(version = name, previous = %current.run_id, model = %new_id, "reloaded");
    let previous = current.run_id.clone();
    retire(app, current).await?;
    Ok((previous, new_id))
}

/// Items published while a new engine loaded went to the engines then serving and to the
/// store: read the store again now that every later change reaches the new engine.
pub(crate) async fn catch_up_live(app: &App, engine: &Arc<Engine>) {
    if let Err(e) = apply_live_changes(vec![engine.clone()], &*app.store).await {
        tracing::warn!("swapped in, but re-reading the live catalogue failed (a reload repairs it): {e}");
    }
}

/// Frees an engine that is no longer served. Requests that took it before the swap finish
/// within the request timeout; wait for them, so it is freed here and its pages trimmed now,
/// not freed later on a request's thread and kept by the allocator until the next reload.
pub(crate) async fn retire(app: &App, old: Arc<Engine>) -> Result<(), ServeError> {
    let deadline = Instant::now() + app.limits.timeout + Duration::from_millis(100);
    while Arc::strong_count(&old) > 1 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Freeing and trimming take milliseconds: off the async workers, where they would stall the
    // requests queued on them.
    in_background(move || {
        drop(old);
        trim_heap();
    })
    .await
}

/// Loading a run reads and drops its whole dataset on a blocking-pool thread; glibc keeps such
/// memory in that thread's arena, so without a trim the resident size creeps up with every
/// reload that lands on a new thread.
pub(crate) fn trim_heap() {
    needle_run::trim_heap();
}
