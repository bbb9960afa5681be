//! `POST /v1/recall`: the user tower, the index search and the item details of one answer.

use crate::app::{App, Limits, Shared};
use crate::engine::{Restrict, Source, UserInput};
use crate::reply::{json_response, parse_body, ApiError, Id};
use crate::versions::Version;
use crate::ServeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use needle_catalog::filter::Filter;
use needle_store::ItemDetails;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RecallRequest {
    pub(crate) user_id: Option<Id>,
    pub(crate) features: Option<BTreeMap<String, Id>>,
    pub(crate) history: Option<Vec<Id>>,
    pub(crate) k: Option<i64>,
    pub(crate) exclude_seen: Option<bool>,
    /// Item ids never to return.
    pub(crate) exclude: Option<Vec<Id>>,
    /// Conditions on item attributes, all of which a returned item meets.
    pub(crate) filter: Option<Filter>,
    /// The version to answer with, instead of the one the user is routed to.
    pub(crate) version: Option<String>,
}

#[derive(Serialize)]
pub(crate) struct RecalledItem<'a> {
    id: std::borrow::Cow<'a, str>,
    score: f32,
    /// With recall channels: the channels that found the item.
    #[serde(skip_serializing_if = "Option::is_none")]
    channels: Option<Vec<&'a str>>,
    #[serde(flatten)]
    details: ItemDetails,
}

#[derive(Serialize)]
pub(crate) struct RecallResponse<'a> {
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

pub(crate) fn is_zero(n: &usize) -> bool {
    *n == 0
}

pub(crate) const DEFAULT_K: i64 = 100;

pub(crate) async fn recall(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
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
pub(crate) fn pick_version(app: &App, req: &RecallRequest) -> Result<Version, ApiError> {
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
pub(crate) fn check_recall(req: &RecallRequest, limits: &Limits) -> Result<usize, ApiError> {
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

pub(crate) async fn do_recall(
    app: &App,
    version: &Version,
    req: RecallRequest,
    t: Instant,
) -> Result<Response, ApiError> {
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
        Some(id) => {
            app.store.user(id, app.limits.history_kept(engine.max_seq_len)).await.map_err(|e| app.store_error(e))?
        }
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
