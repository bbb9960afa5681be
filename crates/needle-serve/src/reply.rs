//! Answers of the HTTP API: JSON bodies, the error answer every failure turns into, and the
//! parsing of request bodies and ids.

use crate::versions::VersionError;
use crate::ServeError;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Deserializer, Serialize};

/// An error answer: `{"error": {"status": 400, "message": "..."}}`.
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

impl ApiError {
    pub(crate) fn bad(message: impl Into<String>) -> Self {
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

pub(crate) fn json_response<T: Serialize>(v: &T) -> Response {
    match serde_json::to_vec(v) {
        Ok(bytes) => ([(header::CONTENT_TYPE, HeaderValue::from_static("application/json"))], bytes).into_response(),
        Err(e) => ApiError { status: StatusCode::INTERNAL_SERVER_ERROR, message: e.to_string() }.into_response(),
    }
}

/// Reads and parses a JSON body, turning every failure into a 4xx that says what is wrong.
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let bytes = body.map_err(|r| ApiError { status: r.status(), message: r.body_text() })?;
    if bytes.is_empty() {
        return Err(ApiError::bad("empty request body; send a JSON object"));
    }
    serde_json::from_slice(&bytes).map_err(|e| ApiError::bad(format!("invalid request body: {e}")))
}

/// Ids may come as JSON strings or integers (`"42"` or `42`).
pub(crate) fn id<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
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
pub(crate) struct Id(#[serde(deserialize_with = "id")] pub(crate) String);

impl From<VersionError> for ApiError {
    fn from(e: VersionError) -> Self {
        let status = match e {
            VersionError::Unknown(_) => StatusCode::NOT_FOUND,
            VersionError::Refused(_) => StatusCode::CONFLICT,
        };
        ApiError { status, message: e.to_string() }
    }
}
