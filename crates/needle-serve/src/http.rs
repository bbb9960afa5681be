//! The HTTP application: routes, request parsing with JSON errors, limits, request ids, metrics,
//! hot reload (POST /admin/reload or SIGHUP) and graceful shutdown (SIGTERM / Ctrl-C).

use crate::admin_api::{
    add_version, admin_reload, get_traffic, healthz, list_versions, metrics, openapi, parse_reload, remove_version,
    rollback, set_traffic, AddVersion, TrafficRequest,
};
use crate::app::{default_version_name, load_engine, reload, trim_heap, App, Shared, Sources};
pub use crate::app::{Limits, ServeOptions, EMBEDDED_STORE_FILE};
pub use crate::catalog_api::MAX_ITEMS_PER_REQUEST;
use crate::catalog_api::{
    check_event, check_items, delete_item, events, follow_store, upsert_items, EventRequest, ItemsRequest,
};
use crate::metrics::Metrics;
use crate::middleware::{contain_panics, method_not_allowed, not_found, observe, require_admin, shed_load};
use crate::recall_api::{check_recall, recall, RecallRequest};
use crate::reply::parse_body;
use crate::versions::Versions;
use crate::ServeError;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::middleware::{self};
use axum::routing::{delete, get, post};
use axum::Router;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, RwLock};
use std::time::Instant;

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
    let engine =
        load_engine(&opts.run, opts.data_dir.clone(), sources_of(&opts.run), Some(&*store), &opts.limits).await?;
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
        let engine = load_engine(dir, opts.data_dir.clone(), sources_of(dir), Some(&*store), &opts.limits)
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
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
