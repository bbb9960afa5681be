//! Health, metrics, the API description and the admin routes: reload, versions, traffic,
//! rollback.

use crate::app::{catch_up_live, load_engine, reload, retire, App, Shared};
use crate::metrics::VersionView;
use crate::reply::{json_response, parse_body, ApiError};
use crate::versions::{VersionError, Versions};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

pub(crate) async fn healthz(State(app): State<Shared>) -> Response {
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

pub(crate) async fn metrics(State(app): State<Shared>) -> Response {
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

pub(crate) async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("../openapi.json")).into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct ReloadRequest {
    /// Another run directory to serve; default: the current one (re-read from disk).
    pub(crate) run: Option<PathBuf>,
    /// The version to reload; default: the only one, or every one when `run` is not given.
    pub(crate) version: Option<String>,
}

/// No body means "reload the current run".
pub(crate) fn parse_reload(body: Result<Bytes, BytesRejection>) -> Result<ReloadRequest, ApiError> {
    match &body {
        Ok(b) if b.is_empty() => Ok(ReloadRequest::default()),
        _ => parse_body(body),
    }
}

pub(crate) async fn admin_reload(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
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

/// `GET /admin/versions`: the served versions, their runs and weights.
pub(crate) async fn list_versions(State(app): State<Shared>) -> Response {
    json_response(&versions_json(&app.versions()))
}

pub(crate) fn versions_json(versions: &Versions) -> serde_json::Value {
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

pub(crate) fn weights_json(w: impl IntoIterator<Item = (String, u32)>) -> serde_json::Value {
    w.into_iter().map(|(n, w)| (n, serde_json::Value::from(w))).collect::<serde_json::Map<_, _>>().into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AddVersion {
    pub(crate) name: String,
    pub(crate) run: PathBuf,
}

/// `POST /admin/versions`: loads a run as a new version, with no traffic until
/// `/admin/traffic` gives it some.
pub(crate) async fn add_version(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
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
    let engine = match load_engine(
        &req.run,
        app.data_dir.clone(),
        app.sources(&req.run),
        Some(&*app.store),
        &app.limits,
    )
    .await
    {
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
pub(crate) async fn remove_version(State(app): State<Shared>, UrlPath(name): UrlPath<String>) -> Response {
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
pub(crate) async fn get_traffic(State(app): State<Shared>) -> Response {
    json_response(&traffic_json(&app.versions()))
}

/// The weights, and the ones a rollback returns to.
pub(crate) fn traffic_json(v: &Versions) -> serde_json::Value {
    serde_json::json!({
        "weights": weights_json(v.weights()),
        "previous": v.previous_weights().map(|p| weights_json(p.iter().cloned())),
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct TrafficRequest {
    pub(crate) weights: BTreeMap<String, u32>,
}

/// `POST /admin/traffic`: new weights; versions not named get none.
pub(crate) async fn set_traffic(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
    let req: TrafficRequest = match parse_body(body) {
        Ok(r) => r,
        Err(e) => return e.into_response(),
    };
    change_traffic(&app, |v| v.with_weights(&req.weights)).await
}

/// `POST /admin/rollback`: back to the weights before the last change.
pub(crate) async fn rollback(State(app): State<Shared>) -> Response {
    change_traffic(&app, Versions::rolled_back).await
}

pub(crate) async fn change_traffic(
    app: &App,
    change: impl FnOnce(&Versions) -> Result<Versions, VersionError>,
) -> Response {
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
