//! What wraps every request: request ids, logs and latency, load shedding, the admin token,
//! panics turned into 500s, and the answers for unknown routes.

use crate::app::Shared;
use crate::auth::AdminAuth;
use crate::reply::ApiError;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use std::sync::atomic::Ordering::Relaxed;
use std::time::Instant;
use tracing::Instrument;

/// Names a path for metrics; unknown paths share one label so clients cannot grow the table.
pub(crate) fn route_name(path: &str) -> &'static str {
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
pub(crate) async fn shed_load(State(app): State<Shared>, req: Request, next: Next) -> Response {
    if matches!(req.uri().path(), "/healthz" | "/metrics") {
        return next.run(req).await;
    }
    let Ok(_permit) = app.in_flight.try_acquire() else {
        return app.shed(format!("{} requests in flight", app.limits.max_in_flight)).into_response();
    };
    next.run(req).await
}

/// Lets a request through only with the admin token, unless the operator opened the routes.
pub(crate) async fn require_admin(State(app): State<Shared>, req: Request, next: Next) -> Response {
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
pub(crate) async fn observe(State(app): State<Shared>, req: Request, next: Next) -> Response {
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
pub(crate) async fn contain_panics(req: Request, next: Next) -> Response {
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

pub(crate) async fn not_found(req: Request) -> Response {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no route {} {}; see /openapi.json", req.method(), req.uri().path()),
    }
    .into_response()
}

pub(crate) async fn method_not_allowed(req: Request) -> Response {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: format!("{} is not allowed on {}; see /openapi.json", req.method(), req.uri().path()),
    }
    .into_response()
}
