//! The HTTP application: routes, request parsing with JSON errors, limits, request ids, metrics,
//! hot reload (POST /admin/reload or SIGHUP) and graceful shutdown (SIGTERM / Ctrl-C).

use crate::auth::AdminAuth;
use crate::engine::{Engine, Restrict, Source, StoreContents, UserInput};
use crate::filter::{Attributes, Filter};
use crate::live::Prepared;
use crate::metrics::{Metrics, VersionView};
use crate::versions::{Version, VersionError, Versions};
use crate::ServeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::Router;
use needle_run::channels::ChannelsConfig;
use needle_store::{ItemDetails, ItemRecord, Store, StoreSpec};
use serde::{Deserialize, Deserializer, Serialize};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tracing::Instrument;

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

struct App {
    versions: RwLock<Arc<Versions>>,
    store: Box<dyn Store>,
    metrics: Metrics,
    limits: Limits,
    in_flight: tokio::sync::Semaphore,
    compute: crate::compute::Compute,
    /// Free connection slots, shared with the listener.
    conn_slots: Arc<tokio::sync::Semaphore>,
    conn: crate::conn::ConnLimits,
    auth: AdminAuth,
    data_dir: Option<PathBuf>,
    /// The run the `--index` override belongs to.
    index_override: Option<(PathBuf, PathBuf)>,
    channels: Option<PathBuf>,
    effort: Option<usize>,
    compact_live_at: usize,
    /// Held by every change to the served versions (reloads, adds, removals, weights), so
    /// that no change is built on a snapshot another change has replaced.
    admin_lock: tokio::sync::Mutex<()>,
    started: Instant,
    boot: u32,
    seq: AtomicU64,
    /// Spreads recalls that name no user over the versions.
    anonymous: AtomicU64,
    /// This process among the servers sharing a store, so it can skip its own announcements.
    instance: String,
    /// The store's change count this server's engines reflect.
    applied_changes: AtomicU64,
}

impl App {
    /// A request turned away over capacity (`why`): counted, and answered 503.
    fn shed(&self, why: String) -> ApiError {
        self.metrics.shed.fetch_add(1, Relaxed);
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("over capacity ({why}); retry in a second"),
        }
    }

    fn versions(&self) -> Arc<Versions> {
        // A poisoned lock still holds a valid snapshot: swaps are a single assignment.
        self.versions.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Swaps in new versions; callers hold `admin_lock`.
    fn set_versions(&self, v: Versions) {
        *self.versions.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(v);
    }

    /// The sources a run is loaded with.
    fn sources(&self, dir: &Path) -> Sources {
        Sources::for_run(dir, self.index_override.as_ref(), &self.channels, self.effort, self.compact_live_at)
    }

    /// A failed store call: counted, and answered 503 (the request was fine; try again).
    fn store_error(&self, e: needle_store::StoreError) -> ApiError {
        self.metrics.store_errors.fetch_add(1, Relaxed);
        ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: format!("store: {e}") }
    }

    /// A store write bounded by the request timeout; failure and timeout are both a 503.
    async fn store_write<T>(&self, fut: needle_store::StoreFuture<'_, T>) -> Result<T, ApiError> {
        match tokio::time::timeout(self.limits.timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(self.store_error(e)),
            Err(_) => Err(ApiError { status: StatusCode::SERVICE_UNAVAILABLE, message: "store timed out".into() }),
        }
    }
}

type Shared = Arc<App>;

/// Loads the run, fills the store when it is empty, and serves until SIGTERM or Ctrl-C.
/// Prints `listening on ADDR` on stdout once requests are accepted.
pub async fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let t0 = Instant::now();
    needle_run::map_large_allocations();
    if opts.limits.max_in_flight == 0 {
        return Err(ServeError::Load("--max-in-flight must be at least 1".into()));
    }
    if opts.conn.max_connections == 0 {
        return Err(ServeError::Load("--max-connections must be at least 1".into()));
    }
    // Bound first, so a taken port fails at once rather than after loading; connections that
    // arrive while loading wait in the backlog.
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| ServeError::Load(format!("cannot listen on {}: {e}", opts.addr)))?;
    let store = needle_store::open(&opts.store, &opts.run.join(EMBEDDED_STORE_FILE)).await?;
    // Read before the engines load the store's changes: a change landing in between makes the
    // count differ, and the next re-sync applies it.
    let change_count = store.change_count().await?;
    let name = match &opts.name {
        Some(n) => n.clone(),
        None => default_version_name(&opts.run),
    };
    crate::versions::check_name(&name).map_err(|e| ServeError::Load(e.to_string()))?;
    let index_override = opts.index.clone().map(|i| (opts.run.clone(), i));
    let sources_of =
        |dir: &Path| Sources::for_run(dir, index_override.as_ref(), &opts.channels, opts.effort, opts.compact_live_at);
    let engine = load_engine(&opts.run, opts.data_dir.clone(), sources_of(&opts.run), Some(&*store)).await?;
    tracing::info!(
        version = %name,
        model = %engine.run_id,
        index = %engine.index_params,
        items = engine.index_len(),
        store = %store.describe(),
        "loaded in {:.2}s",
        t0.elapsed().as_secs_f64()
    );
    let mut versions = Versions::single(name, engine);
    for (name, dir) in &opts.versions {
        let engine = load_engine(dir, opts.data_dir.clone(), sources_of(dir), Some(&*store))
            .await
            .map_err(|e| ServeError::Load(format!("version {name:?} ({}): {e}", dir.display())))?;
        tracing::info!(version = %name, model = %engine.run_id, "loaded");
        versions = versions.with_added(name.clone(), engine).map_err(|e| ServeError::Load(e.to_string()))?;
    }
    if let Some(w) = &opts.traffic {
        versions = versions.with_weights(w).map_err(|e| ServeError::Load(format!("--traffic: {e}")))?;
    }
    let addr = listener.local_addr()?;
    let (listener, conn_slots) = crate::conn::GuardedListener::new(listener, opts.conn);
    let threads = match opts.limits.compute_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let compute = crate::compute::Compute::new(threads, opts.limits.max_queue_wait)?;
    let app = Arc::new(App {
        versions: RwLock::new(Arc::new(versions)),
        store,
        metrics: Metrics::default(),
        limits: opts.limits.clone(),
        in_flight: tokio::sync::Semaphore::new(opts.limits.max_in_flight),
        compute,
        conn_slots: conn_slots.clone(),
        conn: opts.conn,
        auth: opts.auth.clone(),
        data_dir: opts.data_dir.clone(),
        index_override,
        channels: opts.channels.clone(),
        effort: opts.effort,
        compact_live_at: opts.compact_live_at,
        admin_lock: tokio::sync::Mutex::new(()),
        started: Instant::now(),
        boot: std::process::id() ^ (t0.elapsed().subsec_nanos()),
        seq: AtomicU64::new(0),
        anonymous: AtomicU64::new(0),
        instance: format!(
            "{}-{:x}",
            std::process::id(),
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
        ),
        applied_changes: AtomicU64::new(change_count),
    });
    if let Some(rx) = app.store.subscribe() {
        tokio::spawn(follow_store(app.clone(), rx, opts.resync_every));
    }
    trim_heap();
    tokio::spawn(reload_on_sighup(app.clone()));
    let router = router(app);
    println!("listening on {addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();
    tracing::info!(%addr, "listening");
    axum::serve(listener, router).with_graceful_shutdown(shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// A run directory's own name, when it makes a valid version name.
fn default_version_name(run: &Path) -> String {
    let dir = run.canonicalize().unwrap_or_else(|_| run.to_owned());
    dir.file_name()
        .and_then(|n| n.to_str())
        .filter(|n| crate::versions::check_name(n).is_ok())
        .map_or_else(|| "main".to_owned(), str::to_owned)
}

/// What a served run is searched with beyond the run directory itself.
struct Sources {
    /// An index file instead of the run's own.
    index: Option<PathBuf>,
    /// A channel file.
    channels: Option<PathBuf>,
    /// A search effort instead of the index's built one.
    effort: Option<usize>,
    /// Published items that start a compaction (0: never).
    compact_at: usize,
}

impl Sources {
    /// What the run in `dir` is loaded with: `index_override` is (the run it belongs to, the
    /// index file), and applies to that run only.
    fn for_run(
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
async fn load_engine(
    run: &Path,
    data_dir: Option<PathBuf>,
    sources: Sources,
    store: Option<&dyn Store>,
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
    let (served, contents) = in_background(blocking).await??;
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
async fn apply_live_changes(engines: Vec<Arc<Engine>>, store: &dyn Store) -> Result<(), ServeError> {
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
fn same_dir(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// Runs `f` on a thread of its own at a lower CPU priority (nice 10): loading a model and freeing
/// the old one during a reload then take the cycles requests leave over, not theirs, and the
/// compute pool does not fall behind and shed while a reload runs.
async fn in_background<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, ServeError> {
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

fn router(app: Shared) -> Router {
    let limit = app.limits.max_body_bytes;
    // Routes that change state answer only to the admin token.
    let guarded = Router::new()
        .route("/v1/events", post(events).fallback(method_not_allowed))
        .route("/v1/items", post(upsert_items).fallback(method_not_allowed))
        .route("/v1/items/{id}", delete(delete_item).fallback(method_not_allowed))
        .route("/admin/reload", post(admin_reload).fallback(method_not_allowed))
        .route("/admin/versions", get(list_versions).post(add_version).fallback(method_not_allowed))
        .route("/admin/versions/{name}", delete(remove_version).fallback(method_not_allowed))
        .route("/admin/traffic", get(get_traffic).post(set_traffic).fallback(method_not_allowed))
        .route("/admin/rollback", post(rollback).fallback(method_not_allowed))
        .route_layer(middleware::from_fn_with_state(app.clone(), require_admin));
    Router::new()
        .route("/v1/recall", post(recall).fallback(method_not_allowed))
        .route("/healthz", get(healthz).fallback(method_not_allowed))
        .route("/metrics", get(metrics).fallback(method_not_allowed))
        .route("/openapi.json", get(openapi).fallback(method_not_allowed))
        .merge(guarded)
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .layer(middleware::from_fn(contain_panics))
        .layer(middleware::from_fn_with_state(app.clone(), shed_load))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .with_state(app)
}

/// Names a path for metrics; unknown paths share one label so clients cannot grow the table.
fn route_name(path: &str) -> &'static str {
    match path {
        "/v1/recall" => "recall",
        "/v1/events" => "events",
        "/v1/items" => "items",
        p if p.starts_with("/v1/items/") => "items",
        "/healthz" => "healthz",
        "/metrics" => "metrics",
        "/openapi.json" => "openapi",
        "/admin/reload" => "reload",
        "/admin/traffic" | "/admin/rollback" | "/admin/versions" => "admin",
        p if p.starts_with("/admin/versions/") => "admin",
        _ => "other",
    }
}

/// Turns a request away at once when `max_in_flight` are being handled: a client told to retry
/// in a second is better served than one whose request waits behind a growing queue.
async fn shed_load(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if matches!(req.uri().path(), "/healthz" | "/metrics") {
        return next.run(req).await;
    }
    let Ok(_permit) = app.in_flight.try_acquire() else {
        return app.shed(format!("{} requests in flight", app.limits.max_in_flight)).into_response();
    };
    next.run(req).await
}

/// Lets a request through only with the admin token, unless the operator opened the routes.
async fn require_admin(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if let AdminAuth::Token(token) = &app.auth {
        if !token.accepts(req.headers().get(header::AUTHORIZATION).map(HeaderValue::as_bytes)) {
            let mut resp = ApiError {
                status: StatusCode::UNAUTHORIZED,
                message: "this route needs the admin token: send `Authorization: Bearer <token>` \
                          (the token `needle serve` was given, or the one it wrote to RUN/admin.token)"
                    .into(),
            }
            .into_response();
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
    }
    next.run(req).await
}

/// Gives every request an id (the client's `x-request-id` when sane), a log span, a latency
/// observation and the id echoed in the response.
async fn observe(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let t = Instant::now();
    let route = route_name(req.uri().path());
    let rid = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|s| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:08x}-{}", app.boot, app.seq.fetch_add(1, Relaxed)));
    let span = tracing::info_span!("request", id = %rid, method = %req.method(), path = %req.uri().path());
    let mut resp = next.run(req).instrument(span.clone()).await;
    let took = t.elapsed();
    let status = resp.status().as_u16();
    app.metrics.record(route, status, took);
    // The id is repeated on the event so that it shows even when the span's level is filtered out.
    let us = took.as_micros() as u64;
    span.in_scope(|| match status {
        500.. => tracing::error!(request_id = %rid, route, status, us, "failed"),
        400..=499 => tracing::warn!(request_id = %rid, route, status, us, "rejected"),
        _ => tracing::debug!(request_id = %rid, route, status, us, "ok"),
    });
    if let Ok(v) = HeaderValue::from_str(&rid) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// Turns a panic in a handler into a 500 answer, so a bug fails one request, visibly (it is
/// logged and counted as an error), instead of dropping the connection.
async fn contain_panics(req: Request, next: Next) -> Response {
    use futures_util::FutureExt;
    match std::panic::AssertUnwindSafe(next.run(req)).catch_unwind().await {
        Ok(resp) => resp,
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".to_owned());
            tracing::error!("handler panicked: {what}");
            ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: "internal error; see the server log".into() }
                .into_response()
        }
    }
}

/// An error answer: `{"error": {"status": 400, "message": "..."}}`.
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad(message: impl Into<String>) -> Self {
        ApiError { status: StatusCode::BAD_REQUEST, message: message.into() }
    }
}

impl From<ServeError> for ApiError {
    fn from(e: ServeError) -> Self {
        let status = match e {
            ServeError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ServeError::Conflict(_) => StatusCode::CONFLICT,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError { status, message: e.to_string() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": {"status": self.status.as_u16(), "message": self.message}});
        let mut resp = (self.status, axum::Json(body)).into_response();
        // Every 503 is a passing condition (overload, a store outage, a timeout): say when to retry.
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn json_response<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(bytes) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response(),
        Err(e) => ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string() }.into_response(),
    }
}

/// Reads and parses a JSON body, turning every failure into a 4xx that says what is wrong.
fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError { status: r.status(), message: r.body_text() })?;
    if bytes.is_empty() {
        return Err(ApiError::bad("empty request body; send a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Ids may come as JSON strings or integers (`"42"` or `42`).
fn id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    struct V;
    impl serde::de::Visitor<'_> for V {
        type Value = String;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an id (string or integer)")
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
            Ok(v.to_owned())
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
            Ok(v.to_string())
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
            Ok(v.to_string())
        }
    }
    d.deserialize_any(V)
}

#[derive(Deserialize)]
#[serde(transparent)]
struct Id(#[serde(deserialize_with = "id")] String);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RecallRequest {
    user_id: Option<Id>,
    features: Option<BTreeMap<String, Id>>,
    history: Option<Vec<Id>>,
    k: Option<i64>,
    exclude_seen: Option<bool>,
    /// Item ids never to return.
    exclude: Option<Vec<Id>>,
    /// Conditions on item attributes, all of which a returned item meets.
    filter: Option<Filter>,
    /// The version to answer with, instead of the one the user is routed to.
    version: Option<String>,
}

#[derive(Serialize)]
struct RecalledItem<'a> {
    id: std::borrow::Cow<'a, str>,
    score: f32,
    /// With recall channels: the channels that found the item.
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<&'a str>>,
    #[serde(flatten)]
    details: ItemDetails,
}

#[derive(Serialize)]
struct RecallResponse<'a> {
    items: Vec<RecalledItem<'a>>,
    model: &'a str,
    /// The served version that answered.
    version: &'a str,
    /// `model`, or `popularity` when nothing was known about the user.
    source: &'static str,
    /// Whether the store or the model knew the user.
    known_user: bool,
    /// History ids the model has no vector for (skipped).
    #[serde(skip_serializing_if = "is_zero")]
    skipped_history: usize,
    took_ms: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

const DEFAULT_K: i64 = 100;

async fn recall(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let t = Instant::now();
    let req: RecallRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let version = match pick_version(&app, &req) {
        Ok(v) => v,
        Err(e) => return e.into_response(),
    };
    let resp = match tokio::time::timeout(app.limits.timeout, do_recall(&app, &version, req, t)).await {
        Ok(Ok(resp)) => resp,
        Ok(Err(e)) => e.into_response(),
        Err(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: format!("timed out after {} ms", app.limits.timeout.as_millis()),
        }
        .into_response(),
    };
    version.stats.record(resp.status().as_u16(), t.elapsed());
    resp
}

/// The version a recall goes to: the one it names, or the one its user id hashes to (a
/// request without one is spread by arrival).
fn pick_version(app: &App, req: &RecallRequest) -> Result<Version, ApiError> {
    let versions = app.versions();
    if let Some(name) = &req.version {
        return versions.get(name).cloned().ok_or_else(|| {
            let names: Vec<&str> = versions.list().iter().map(|v| v.name.as_str()).collect();
            ApiError::bad(format!("no version {name:?}; serving: {}", names.join(", ")))
        });
    }
    let key = match &req.user_id {
        Some(id) => crate::versions::user_hash(id.0.as_bytes()),
        None => crate::versions::user_hash(&app.anonymous.fetch_add(1, Relaxed).to_le_bytes()),
    };
    Ok(versions.route(key).clone())
}

/// The recall checks that need only the limits; returns `k`.
fn check_recall(req: &RecallRequest, limits: &Limits) -> Result<usize, ApiError> {
    let k = req.k.unwrap_or(DEFAULT_K);
    if k <= 0 || k as u64 > limits.max_k as u64 {
        return Err(ApiError::bad(format!("k must be between 1 and {} (this server's max_k), got {k}", limits.max_k)));
    }
    if let Some(h) = &req.history {
        if h.len() > limits.max_history {
            return Err(ApiError::bad(format!(
                "history has {} items; this server takes at most {} (max_history)",
                h.len(),
                limits.max_history
            )));
        }
    }
    Ok(k as usize)
}

/// Parses a JSON request body for `route` (`/v1/recall`, `/v1/events` or `/admin/reload`) as its
/// handler does and applies the checks that need neither a model nor a store; `Err` is the
/// message a client would get. Lets the request parsing be exercised without a server.
pub fn check_request_body(route: &str, body: &[u8], limits: &Limits) -> Result<(), String> {
    let body = Ok(Bytes::copy_from_slice(body));
    let checked = match route {
        "/v1/recall" => parse_body::<RecallRequest>(body).and_then(|r| check_recall(&r, limits).map(drop)),
        "/v1/events" => parse_body::<EventRequest>(body).and_then(|e| check_event(&e)),
        "/v1/items" => parse_body::<ItemsRequest>(body).and_then(check_items).map(drop),
        "/admin/reload" => parse_reload(body).map(drop),
        "/admin/traffic" => parse_body::<TrafficRequest>(body).map(drop),
        "/admin/versions" => parse_body::<AddVersion>(body).map(drop),
        other => return Err(format!("{other} takes no JSON body")),
    };
    checked.map_err(|e| e.message)
}

async fn do_recall(app: &App, version: &Version, req: RecallRequest, t: Instant) -> Result<Response, ApiError> {
    let k = check_recall(&req, &app.limits)?;
    let engine = version.engine.clone();
    let history: Option<Vec<String>> = req.history.map(|h| h.into_iter().map(|i| i.0).collect());
    if let Some(h) = &history {
        let unknown: Vec<&str> = h.iter().map(String::as_str).filter(|id| !engine.has_item(id)).collect();
        if !unknown.is_empty() {
            let shown: Vec<&str> = unknown.iter().copied().take(5).collect();
            return Err(ApiError::bad(format!(
                "unknown item ids in history: {} ({} of {}); the model knows only items seen in training",
                shown.join(", "),
                unknown.len(),
                h.len()
            )));
        }
    }
    let mut features: BTreeMap<String, String> = BTreeMap::new();
    let user_id = req.user_id.map(|i| i.0);
    let profile = match &user_id {
        Some(id) => app.store.user(id, engine.max_seq_len).await.map_err(|e| app.store_error(e))?,
        None => None,
    };
    let known_user = profile.is_some();
    let (stored_features, stored_history) = profile.map(|p| (p.features, p.history)).unwrap_or_default();
    features.extend(stored_features);
    if let Some(f) = req.features {
        for (name, value) in f {
            if !engine.feature_names().contains(&name) {
                return Err(ApiError::bad(format!(
                    "unknown feature `{name}`; this model reads: {}",
                    if engine.feature_names().is_empty() {
                        "none".to_owned()
                    } else {
                        engine.feature_names().join(", ")
                    }
                )));
            }
            features.insert(name, value.0);
        }
    }
    let history = history.unwrap_or(stored_history);
    let exclude_seen = req.exclude_seen.unwrap_or(true);
    let mut excluded: Vec<u32> =
        req.exclude.unwrap_or_default().iter().filter_map(|id| engine.item_row(&id.0)).collect();
    excluded.sort_unstable();
    excluded.dedup();
    let filter = req.filter;
    let work = {
        let engine = engine.clone();
        move || {
            let input = UserInput { user_id: user_id.as_deref(), features: &features, history: &history };
            let allowed = match &filter {
                Some(f) => Some(engine.filter_rows(f).map_err(ServeError::BadRequest)?),
                None => None,
            };
            let restrict =
                Restrict { exclude_seen, allowed: allowed.as_deref(), filter: filter.as_ref(), excluded: &excluded };
            engine.recall(&input, k, restrict)
        }
    };
    let rec = match app.compute.run(work).await {
        Ok(r) => r?,
        Err(over) => {
            return Err(app.shed(format!(
                "a recall would wait {:.1} ms for a compute thread",
                over.expected_wait.as_secs_f64() * 1e3
            )))
        }
    };
    if rec.source == Source::Popularity {
        app.metrics.popularity_fallbacks.fetch_add(1, Relaxed);
    }
    let ids: Vec<std::borrow::Cow<'_, str>> = rec.items.iter().map(|&(row, _)| engine.item_raw(row)).collect();
    let refs: Vec<&str> = ids.iter().map(|c| c.as_ref()).collect();
    let details = app.store.items(&refs).await.map_err(|e| app.store_error(e))?;
    let names = engine.channel_names();
    let found_by = |i: usize| {
        names.as_ref().map(|n| {
            let bits = rec.found_by.get(i).copied().unwrap_or(0);
            n.iter().enumerate().filter(|(c, _)| bits >> c & 1 == 1).map(|(_, &name)| name).collect()
        })
    };
    let items = ids
        .iter()
        .zip(&rec.items)
        .zip(details)
        .enumerate()
        .map(|(i, ((id, &(_, score)), d))| RecalledItem {
            id: id.clone(),
            score,
            channels: found_by(i),
            details: d.unwrap_or_default(),
        })
        .collect();
    let resp = RecallResponse {
        items,
        model: &engine.run_id,
        version: &version.name,
        source: match rec.source {
            Source::Model => "model",
            Source::Popularity => "popularity",
        },
        known_user,
        skipped_history: rec.unknown_history,
        // Microsecond resolution; more digits are noise.
        took_ms: (t.elapsed().as_secs_f64() * 1e6).round() / 1e3,
    };
    Ok(json_response(&resp))
}

/// `POST /v1/items`: items as recall returns them, `{"id", "title", attribute: value(s), …}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ItemsRequest {
    items: Vec<ItemIn>,
}

#[derive(Deserialize)]
struct ItemIn {
    id: Id,
    title: Option<String>,
    #[serde(flatten)]
    attributes: BTreeMap<String, AttributeValue>,
}

/// An attribute as a client may send it: one value or a list, strings or numbers.
#[derive(Deserialize)]
#[serde(untagged)]
enum AttributeValue {
    One(Id),
    Many(Vec<Id>),
}

/// Items one request may publish; more go in several requests.
pub const MAX_ITEMS_PER_REQUEST: usize = 1_000;

/// Checks a publish request and turns it into store records.
fn check_items(req: ItemsRequest) -> Result<Vec<ItemRecord>, ApiError> {
    if req.items.is_empty() {
        return Err(ApiError::bad("items is empty"));
    }
    if req.items.len() > MAX_ITEMS_PER_REQUEST {
        return Err(ApiError::bad(format!(
            "{} items in one request; send at most {MAX_ITEMS_PER_REQUEST} per request",
            req.items.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    req.items
        .into_iter()
        .map(|it| {
            let id = it.id.0;
            check_item_id(&id)?;
            if !seen.insert(id.clone()) {
                return Err(ApiError::bad(format!("item {id:?} appears twice in one request")));
            }
            let attributes = it
                .attributes
                .into_iter()
                .map(|(name, v)| match v {
                    AttributeValue::One(x) => (name, vec![x.0]),
                    AttributeValue::Many(xs) => (name, xs.into_iter().map(|x| x.0).collect()),
                })
                .collect();
            Ok(ItemRecord { id, details: ItemDetails { title: it.title, attributes } })
        })
        .collect()
}

/// Ids are keys in the store and lines in its histories.
fn check_item_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 256 || id.contains(['\n', '\r']) {
        return Err(ApiError::bad(format!("item id {id:?} must be 1 to 256 bytes without line breaks")));
    }
    Ok(())
}

async fn upsert_items(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    match publish(&app, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    }
}

/// Embeds the items with every served version, records them in the store, then makes them
/// recallable. The store write comes first, so an item that was acknowledged survives a
/// restart; an engine swapped in meanwhile re-reads the store after its swap, and this request
/// embeds again with the engines it finds after writing, so no swap can miss the item. A
/// version whose model cannot embed the items skips them; when none can, the request is
/// refused.
async fn publish(app: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
    let records = check_items(parse_body(body)?)?;
    let t = Instant::now();
    let before = app.versions();
    let engines: Vec<Arc<Engine>> = before.list().iter().map(|v| v.engine.clone()).collect();
    let prepared = prepare_all(engines, records.clone()).await?;
    if prepared.iter().all(Result::is_err) {
        let first = prepared.into_iter().find_map(Result::err).expect("one version at least");
        return Err(first.into());
    }
    let count = app.store_write(app.store.upsert_items(&records)).await?;
    let now = app.versions();
    let unchanged = now.list().len() == before.list().len()
        && now.list().iter().zip(before.list()).all(|(a, b)| Arc::ptr_eq(&a.engine, &b.engine));
    let prepared = if unchanged {
        prepared
    } else {
        prepare_all(now.list().iter().map(|v| v.engine.clone()).collect(), records.clone()).await?
    };
    let mut n = 0;
    let mut refused = serde_json::Map::new();
    for (v, p) in now.list().iter().zip(prepared) {
        match p {
            Ok(p) => {
                n = p.len();
                v.engine.publish(p);
            }
            Err(e) => {
                refused.insert(v.name.clone(), e.to_string().into());
            }
        }
    }
    app.metrics.items_published.fetch_add(n as u64, Relaxed);
    let ids: Vec<&str> = records.iter().map(|r| r.id.as_str()).collect();
    announce(app, count, &ids, &[]).await;
    let mut out = serde_json::json!({
        "upserted": n, "model": now.primary().engine.run_id, "took_ms": (t.elapsed().as_secs_f64() * 1e6).round() / 1e3
    });
    if !refused.is_empty() {
        out["refused_by"] = refused.into();
    }
    Ok(json_response(&out))
}

/// What a server tells the others sharing its store after a catalogue change.
#[derive(Serialize, Deserialize)]
struct Announcement {
    origin: String,
    /// The store's change count right after the change.
    count: u64,
    #[serde(default)]
    upserted: Vec<String>,
    #[serde(default)]
    deleted: Vec<String>,
}

/// Marks a change this server made (the write that brought the store to `count`) as applied,
/// when it was the very next change; then tells the other servers. A failed announcement
/// costs them only the wait for their next re-sync.
async fn announce(app: &App, count: u64, upserted: &[&str], deleted: &[&str]) {
    if count == 0 {
        return;
    }
    let _ = app.applied_changes.compare_exchange(count - 1, count, Relaxed, Relaxed);
    let msg = Announcement {
        origin: app.instance.clone(),
        count,
        upserted: upserted.iter().map(|s| (*s).to_owned()).collect(),
        deleted: deleted.iter().map(|s| (*s).to_owned()).collect(),
    };
    let Ok(text) = serde_json::to_string(&msg) else { return };
    match tokio::time::timeout(app.limits.timeout, app.store.announce(&text)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("could not announce a catalogue change (other servers re-sync later): {e}"),
        Err(_) => tracing::warn!("announcing a catalogue change timed out (other servers re-sync later)"),
    }
}

/// Keeps this server's catalogue in step with the other servers on its store: applies their
/// announced changes as they come, and every `every` compares the store's change count with
/// the one applied, re-reading every change when they differ (a missed announcement, a
/// restart of the pub/sub connection, a Redis failover).
async fn follow_store(app: Shared, mut rx: tokio::sync::mpsc::Receiver<String>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut open = true;
    loop {
        tokio::select! {
            msg = rx.recv(), if open => match msg {
                Some(text) => apply_announcement(&app, &text).await,
                None => open = false,
            },
            _ = tick.tick() => resync(&app).await,
        }
    }
}

async fn apply_announcement(app: &App, text: &str) {
    let Ok(msg) = serde_json::from_str::<Announcement>(text) else {
        tracing::warn!("ignored a malformed catalogue announcement");
        return;
    };
    if msg.origin == app.instance {
        return;
    }
    let refs: Vec<&str> = msg.upserted.iter().map(String::as_str).collect();
    let details = match app.store.items(&refs).await {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!("could not read announced items (the next re-sync applies them): {e}");
            return;
        }
    };
    // An item gone from the store by now was deleted since; its own announcement follows.
    let upserted: Vec<ItemRecord> = msg
        .upserted
        .into_iter()
        .zip(details)
        .filter_map(|(id, d)| d.map(|details| ItemRecord { id, details }))
        .collect();
    let changes = needle_store::LiveChanges { upserted, deleted: msg.deleted };
    let versions = app.versions();
    let applied = in_background(move || {
        for v in versions.list() {
            v.engine.apply_changes(changes.clone());
        }
    })
    .await;
    if applied.is_ok() {
        app.metrics.changes_followed.fetch_add(1, Relaxed);
        let _ = app.applied_changes.compare_exchange(msg.count - 1, msg.count, Relaxed, Relaxed);
    }
}

async fn resync(app: &App) {
    let count = match app.store.change_count().await {
        Ok(c) => c,
        Err(e) => {
            tracing::debug!("re-sync skipped: {e}");
            return;
        }
    };
    if count == app.applied_changes.load(Relaxed) {
        return;
    }
    // Under the admin lock, so that no engine is swapped in between reading and applying.
    let _one_at_a_time = app.admin_lock.lock().await;
    let t = Instant::now();
    let engines = app.versions().list().iter().map(|v| v.engine.clone()).collect();
    if let Err(e) = apply_live_changes(engines, &*app.store).await {
        tracing::warn!("re-sync failed (retried at the next one): {e}");
        return;
    }
    app.applied_changes.store(count, Relaxed);
    app.metrics.resyncs.fetch_add(1, Relaxed);
    tracing::info!("re-synced the live catalogue to change {count} in {:.2}s", t.elapsed().as_secs_f64());
}

/// Each engine's vectors for the items (or why it cannot make them), off the async workers.
async fn prepare_all(
    engines: Vec<Arc<Engine>>,
    records: Vec<ItemRecord>,
) -> Result<Vec<Result<Vec<Prepared>, ServeError>>, ServeError> {
    in_background(move || engines.iter().map(|e| e.prepare(records.clone())).collect()).await
}

async fn delete_item(State(app): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
    if let Err(e) = check_item_id(&id) {
        return e.into_response();
    }
    let known = app.versions().list().iter().any(|v| v.engine.has_item(&id));
    let ids = [id.as_str()];
    let (had_details, count) = match app.store_write(app.store.delete_items(&ids)).await {
        Ok((n, count)) => (n > 0, count),
        Err(e) => return e.into_response(),
    };
    // As for publishing: the engines found after the store write are the ones to change.
    for v in app.versions().list() {
        v.engine.delete(&id);
    }
    announce(&app, count, &[], &ids).await;
    if !known && !had_details {
        return ApiError { status: StatusCode::NOT_FOUND, message: format!("no item {id:?}") }.into_response();
    }
    app.metrics.items_deleted.fetch_add(1, Relaxed);
    json_response(&serde_json::json!({"deleted": id}))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventRequest {
    user_id: Id,
    item_id: Id,
    /// Event time (Unix seconds); checked, and logged. Histories keep arrival order.
    ts: Option<i64>,
}

fn check_event(ev: &EventRequest) -> Result<(), ApiError> {
    if ev.user_id.0.is_empty() {
        return Err(ApiError::bad("user_id must not be empty"));
    }
    Ok(())
}

async fn events(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let ev: EventRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    if let Err(e) = check_event(&ev) {
        return e.into_response();
    }
    let versions = app.versions();
    if !versions.list().iter().any(|v| v.engine.has_item(&ev.item_id.0)) {
        return ApiError::bad(format!(
            "unknown item id {:?}; the model knows only items seen in training",
            ev.item_id.0
        ))
        .into_response();
    }
    match app.store_write(app.store.append_event(&ev.user_id.0, &ev.item_id.0, versions.max_seq_len())).await {
        Ok(len) => {
            app.metrics.events.fetch_add(1, Relaxed);
            tracing::debug!(user = %ev.user_id.0, item = %ev.item_id.0, ts = ev.ts, "event");
            json_response(&serde_json::json!({"user_id": ev.user_id.0, "history_len": len}))
        }
        Err(e) => e.into_response(),
    }
}

async fn healthz(State(app): State<Shared>) -> Response {
    let versions = app.versions();
    let e = &versions.primary().engine;
    let (live_items, deleted_items) = e.live_counts();
    let list: Vec<_> = versions
        .list()
        .iter()
        .map(|v| serde_json::json!({"name": v.name, "model": v.engine.run_id, "weight": v.weight}))
        .collect();
    json_response(&serde_json::json!({
        "versions": list,
        "status": "ok",
        "model": e.run_id,
        "kind": e.kind,
        "index": e.index_params,
        "index_items": e.index_len(),
        "live_items": live_items,
        "sealed_items": e.live_sealed(),
        "deleted_items": deleted_items,
        "store": app.store.describe(),
        "uptime_s": app.started.elapsed().as_secs_f64(),
    }))
}

async fn metrics(State(app): State<Shared>) -> Response {
    let versions = app.versions();
    let views: Vec<VersionView<'_>> = versions
        .list()
        .iter()
        .map(|v| VersionView {
            name: &v.name,
            run_id: &v.engine.run_id,
            kind: &v.engine.kind,
            index_items: v.engine.index_len(),
            index_params: &v.engine.index_params,
            weight: v.weight,
            stats: &v.stats,
        })
        .collect();
    let mut text = app.metrics.render(&views);
    let limit = app.limits.max_in_flight;
    let busy = limit.saturating_sub(app.in_flight.available_permits());
    let max = app.conn.max_connections;
    let (read_s, idle_s) = (app.conn.request_read_timeout.as_secs_f64(), app.conn.idle_timeout.as_secs_f64());
    let request_s = app.limits.timeout.as_secs_f64();
    let open = max.saturating_sub(app.conn_slots.available_permits());
    let (queued, wait_s) = (app.compute.queued(), app.compute.expected_wait().as_secs_f64());
    let max_wait_s = app.limits.max_queue_wait.as_secs_f64();
    text.push_str(&format!(
        "# HELP needle_in_flight Requests being handled.\n# TYPE needle_in_flight gauge\nneedle_in_flight {busy}\n\
         # HELP needle_in_flight_limit Requests handled at once before shedding (--max-in-flight).\n\
         # TYPE needle_in_flight_limit gauge\nneedle_in_flight_limit {limit}\n\
         # HELP needle_compute_queue Recalls waiting for a compute thread.\n# TYPE needle_compute_queue gauge\n\
         needle_compute_queue {queued}\n\
         # HELP needle_compute_expected_wait_seconds How long a recall arriving now would wait for a compute thread.\n\
         # TYPE needle_compute_expected_wait_seconds gauge\nneedle_compute_expected_wait_seconds {wait_s}\n\
         # HELP needle_compute_max_wait_seconds Longest expected wait before shedding (--max-queue-wait).\n\
         # TYPE needle_compute_max_wait_seconds gauge\nneedle_compute_max_wait_seconds {max_wait_s}\n\
         # HELP needle_connections Open client connections.\n# TYPE needle_connections gauge\nneedle_connections {open}\n\
         # HELP needle_connections_limit Connections open at once (--max-connections).\n\
         # TYPE needle_connections_limit gauge\nneedle_connections_limit {max}\n\
         # HELP needle_timeout_seconds Time limits: a request's handling (--timeout), reading a request \
         (--request-read-timeout), an idle connection (--idle-timeout).\n# TYPE needle_timeout_seconds gauge\n\
         needle_timeout_seconds{{limit=\"request\"}} {request_s}\n\
         needle_timeout_seconds{{limit=\"request_read\"}} {read_s}\n\
         needle_timeout_seconds{{limit=\"idle\"}} {idle_s}\n"
    ));
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json")).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct ReloadRequest {
    /// Another run directory to serve; default: the current one (re-read from disk).
    run: Option<PathBuf>,
    /// The version to reload; default: the only one, or every one when `run` is not given.
    version: Option<String>,
}

/// No body means "reload the current run".
fn parse_reload(body: Result<Bytes, BytesRejection>) -> Result<ReloadRequest, ApiError> {
    match &body {
        Ok(b) if b.is_empty() => Ok(ReloadRequest::default()),
        _ => parse_body(body),
    }
}

impl From<VersionError> for ApiError {
    fn from(e: VersionError) -> Self {
        let status = match e {
            VersionError::Unknown(_) => StatusCode::NOT_FOUND,
            VersionError::Refused(_) => StatusCode::CONFLICT,
        };
        ApiError { status, message: e.to_string() }
    }
}

async fn admin_reload(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req = match parse_reload(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let t = Instant::now();
    let _one_at_a_time = app.admin_lock.lock().await;
    let versions = app.versions();
    let names: Vec<String> = match (&req.version, &req.run) {
        (Some(n), _) => match versions.get(n) {
            Some(v) => vec![v.name.clone()],
            None => return ApiError::from(VersionError::Unknown(format!("no version {n:?}"))).into_response(),
        },
        (None, _) if versions.list().len() == 1 => vec![versions.list()[0].name.clone()],
        (None, None) => versions.list().iter().map(|v| v.name.clone()).collect(),
        (None, Some(_)) => {
            return ApiError::bad("several versions are served: say which one to reload (`version`)").into_response()
        }
    };
    let mut reloaded = Vec::new();
    for name in &names {
        match reload(&app, name, req.run.clone()).await {
            Ok((old, new)) => reloaded.push(serde_json::json!({"version": name, "previous": old, "model": new})),
            Err(e) => {
                return ApiError {
                    status: StatusCode::INTERNAL_SERVER_ERROR,
                    message: format!("reload of version {name:?} failed, still serving its previous model: {e}"),
                }
                .into_response()
            }
        }
    }
    let mut out = reloaded[0].clone();
    out["took_ms"] = (t.elapsed().as_secs_f64() * 1e3).into();
    if reloaded.len() > 1 {
        out["reloaded"] = reloaded.into();
    }
    json_response(&out)
}

/// Loads a run for one version and swaps it in: requests that already hold the old engine
/// finish on it, later ones get the new one. On failure the old engine keeps serving. Callers
/// hold `admin_lock`.
async fn reload(app: &App, name: &str, run: Option<PathBuf>) -> Result<(String, String), ServeError> {
    let current = match app.versions().get(name) {
        Some(v) => v.engine.clone(),
        None => return Err(ServeError::BadRequest(format!("no version {name:?}"))),
    };
    let dir = run.unwrap_or_else(|| current.run_dir.clone());
    let result = load_engine(&dir, app.data_dir.clone(), app.sources(&dir), Some(&*app.store)).await;
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
async fn catch_up_live(app: &App, engine: &Arc<Engine>) {
    if let Err(e) = apply_live_changes(vec![engine.clone()], &*app.store).await {
        tracing::warn!("swapped in, but re-reading the live catalogue failed (a reload repairs it): {e}");
    }
}

/// Frees an engine that is no longer served. Requests that took it before the swap finish
/// within the request timeout; wait for them, so it is freed here and its pages trimmed now,
/// not freed later on a request's thread and kept by the allocator until the next reload.
async fn retire(app: &App, old: Arc<Engine>) -> Result<(), ServeError> {
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

/// `GET /admin/versions`: the served versions, their runs and weights.
async fn list_versions(State(app): State<Shared>) -> Response {
    json_response(&versions_json(&app.versions()))
}

fn versions_json(versions: &Versions) -> serde_json::Value {
    let list: Vec<_> = versions
        .list()
        .iter()
        .map(|v| {
            serde_json::json!({
                "name": v.name, "model": v.engine.run_id, "run": v.engine.run_dir, "kind": v.engine.kind,
                "index": v.engine.index_params, "index_items": v.engine.index_len(), "weight": v.weight,
            })
        })
        .collect();
    serde_json::json!({"versions": list, "weights": weights_json(versions.weights())})
}

fn weights_json(w: impl IntoIterator<Item = (String, u32)>) -> serde_json::Value {
    w.into_iter().map(|(n, w)| (n, serde_json::Value::from(w))).collect::<serde_json::Map<_, _>>().into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AddVersion {
    name: String,
    run: PathBuf,
}

/// `POST /admin/versions`: loads a run as a new version, with no traffic until
/// `/admin/traffic` gives it some.
async fn add_version(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: AddVersion = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    let t = Instant::now();
    let _one_at_a_time = app.admin_lock.lock().await;
    // Refuse a bad or taken name before spending the load on it.
    if let Err(e) = crate::versions::check_name(&req.name) {
        return ApiError::bad(e.to_string()).into_response();
    }
    if app.versions().get(&req.name).is_some() {
        return ApiError::from(VersionError::Refused(format!(
            "version {:?} exists; reload it with POST /admin/reload, or remove it first",
            req.name
        )))
        .into_response();
    }
    let engine = match load_engine(&req.run, app.data_dir.clone(), app.sources(&req.run), Some(&*app.store)).await {
        Ok(e) => e,
        Err(e) => {
            return ApiError {
                status: StatusCode::UNPROCESSABLE_ENTITY,
                message: format!("cannot load {}: {e}", req.run.display()),
            }
            .into_response()
        }
    };
    let next = match app.versions().with_added(req.name.clone(), engine.clone()) {
        Ok(n) => n,
        Err(e) => return ApiError::from(e).into_response(),
    };
    app.set_versions(next);
    catch_up_live(&app, &engine).await;
    tracing::info!(version = %req.name, model = %engine.run_id, "version added");
    let mut out = versions_json(&app.versions());
    out["took_ms"] = (t.elapsed().as_secs_f64() * 1e3).into();
    json_response(&out)
}

/// `DELETE /admin/versions/{name}`: removes a drained version once its requests have finished.
async fn remove_version(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
    let _one_at_a_time = app.admin_lock.lock().await;
    let (next, removed) = match app.versions().without(&name) {
        Ok(r) => r,
        Err(e) => return ApiError::from(e).into_response(),
    };
    app.set_versions(next);
    tracing::info!(version = %name, model = %removed.engine.run_id, "version removed");
    let model = removed.engine.run_id.clone();
    if let Err(e) = retire(&app, removed.engine).await {
        return ApiError::from(e).into_response();
    }
    let mut out = versions_json(&app.versions());
    out["removed"] = serde_json::json!({"version": name, "model": model});
    json_response(&out)
}

/// `GET /admin/traffic`.
async fn get_traffic(State(app): State<Shared>) -> Response {
    json_response(&traffic_json(&app.versions()))
}

/// The weights, and the ones a rollback returns to.
fn traffic_json(v: &Versions) -> serde_json::Value {
    serde_json::json!({
        "weights": weights_json(v.weights()),
        "previous": v.previous_weights().map(|p| weights_json(p.iter().cloned())),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TrafficRequest {
    weights: BTreeMap<String, u32>,
}

/// `POST /admin/traffic`: new weights; versions not named get none.
async fn set_traffic(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: TrafficRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    change_traffic(&app, |v| v.with_weights(&req.weights)).await
}

/// `POST /admin/rollback`: back to the weights before the last change.
async fn rollback(State(app): State<Shared>) -> Response {
    change_traffic(&app, Versions::rolled_back).await
}

async fn change_traffic(app: &App, change: impl FnOnce(&Versions) -> Result<Versions, VersionError>) -> Response {
    let _one_at_a_time = app.admin_lock.lock().await;
    let next = match change(&app.versions()) {
        Ok(n) => n,
        Err(e) => return ApiError::from(e).into_response(),
    };
    tracing::info!("traffic: {}", crate::versions::format_weights(next.weights()));
    let out = traffic_json(&next);
    app.set_versions(next);
    json_response(&out)
}

/// Loading a run reads and drops its whole dataset on a blocking-pool thread; glibc keeps such
/// memory in that thread's arena, so without a trim the resident size creeps up with every
/// reload that lands on a new thread.
fn trim_heap() {
    needle_run::trim_heap();
}

async fn reload_on_sighup(app: Shared) {
    let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) else {
        tracing::warn!("cannot listen for SIGHUP; reload with POST /admin/reload");
        return;
    };
    while hup.recv().await.is_some() {
        tracing::info!("SIGHUP: reloading");
        let _one_at_a_time = app.admin_lock.lock().await;
        for v in app.versions().list() {
            let _ = reload(&app, &v.name, None).await;
        }
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down: finishing in-flight requests");
}

async fn not_found(req: Request) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route {} {}; see /openapi.json", req.method(), req.uri().path()),
    }
    .into_response()
}

async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} is not allowed on {}; see /openapi.json", req.method(), req.uri().path()),
    }
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn fetch(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn a_panicking_handler_fails_one_request_with_a_json_500() {
        let router = Router::new()
            .route("/boom", get(|| async { panic!("planted bug") as &'static str }))
            .route("/fine", get(|| async { "fine" }))
            .layer(middleware::from_fn(contain_panics));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        let boom = fetch(addr, "/boom").await;
        assert!(boom.starts_with("HTTP/1.1 500"), "{boom}");
        assert!(boom.contains(r#"{"error":{"message":"internal error; see the server log","status":500}}"#), "{boom}");
        let fine = fetch(addr, "/fine").await;
        assert!(fine.starts_with("HTTP/1.1 200") && fine.ends_with("fine"), "{fine}");
    }
}
