//! The live catalogue and user events: `POST /v1/items`, `DELETE /v1/items/{id}`,
//! `POST /v1/events`, and keeping in step with other servers on the same store.

use crate::app::{apply_live_changes, in_background, App, Shared};
use crate::engine::Engine;
use crate::reply::{json_response, parse_body, ApiError, Id};
use crate::ServeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use needle_catalog::live::Prepared;
use needle_store::{ItemDetails, ItemRecord};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// `POST /v1/items`: items as recall returns them, `{"id", "title", attribute: value(s), …}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ItemsRequest {
    pub(crate) items: Vec<ItemIn>,
}

#[derive(Deserialize)]
pub(crate) struct ItemIn {
    pub(crate) id: Id,
    pub(crate) title: Option<String>,
    #[serde(flatten)]
    pub(crate) attributes: BTreeMap<String, AttributeValue>,
}

/// An attribute as a client may send it: one value or a list, strings or numbers.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum AttributeValue {
    One(Id),
    Many(Vec<Id>),
}

/// Items one request may publish; more go in several requests.
pub const MAX_ITEMS_PER_REQUEST: usize = 1_000;

/// Checks a publish request and turns it into store records.
pub(crate) fn check_items(req: ItemsRequest) -> Result<Vec<ItemRecord>, ApiError> {
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
pub(crate) fn check_item_id(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 256 || id.contains(['\n', '\r']) {
        return Err(ApiError::bad(format!("item id {id:?} must be 1 to 256 bytes without line breaks")));
    }
    Ok(())
}

pub(crate) async fn upsert_items(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
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
pub(crate) async fn publish(app: &Shared, body: Result<Bytes, BytesRejection>) -> Result<Response, ApiError> {
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
pub(crate) struct Announcement {
    pub(crate) origin: String,
    /// The store's change count right after the change.
    pub(crate) count: u64,
    #[serde(default)]
    pub(crate) upserted: Vec<String>,
    #[serde(default)]
    pub(crate) deleted: Vec<String>,
}

/// Marks a change this server made (the write that brought the store to `count`) as applied,
/// when it was the very next change; then tells the other servers. A failed announcement
/// costs them only the wait for their next re-sync.
pub(crate) async fn announce(app: &App, count: u64, upserted: &[&str], deleted: &[&str]) {
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
pub(crate) async fn follow_store(app: Shared, mut rx: tokio::sync::mpsc::Receiver<String>, every: Duration) {
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

pub(crate) async fn apply_announcement(app: &App, text: &str) {
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

pub(crate) async fn resync(app: &App) {
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
pub(crate) async fn prepare_all(
    engines: Vec<Arc<Engine>>,
    records: Vec<ItemRecord>,
) -> Result<Vec<Result<Vec<Prepared>, ServeError>>, ServeError> {
    in_background(move || engines.iter().map(|e| e.prepare(records.clone())).collect()).await
}

pub(crate) async fn delete_item(State(app): State<Shared>, UrlPath(id): UrlPath<String>) -> Response {
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
pub(crate) struct EventRequest {
    pub(crate) user_id: Id,
    pub(crate) item_id: Id,
    /// Event time (Unix seconds); checked, and logged. Histories keep arrival order.
    pub(crate) ts: Option<i64>,
}

pub(crate) fn check_event(ev: &EventRequest) -> Result<(), ApiError> {
    if ev.user_id.0.is_empty() {
        return Err(ApiError::bad("user_id must not be empty"));
    }
    Ok(())
}

pub(crate) async fn events(State(app): State<Shared>, body: Result<Bytes, BytesRejection>) -> Response {
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
    match app
        .store_write(app.store.append_event(
            &ev.user_id.0,
            &ev.item_id.0,
            app.limits.history_kept(versions.max_seq_len()),
        ))
        .await
    {
        Ok(len) => {
            app.metrics.events.fetch_add(1, Relaxed);
            tracing::debug!(user = %ev.user_id.0, item = %ev.item_id.0, ts = ev.ts, "event");
            json_response(&serde_json::json!({"user_id": ev.user_id.0, "history_len": len}))
        }
        Err(e) => e.into_response(),
    }
}
