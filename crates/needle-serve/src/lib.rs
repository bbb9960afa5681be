//! The online half of needle: an HTTP server that computes the user's vector in real time, searches
//! the item index and fills in item details from a store.
//!
//! [`engine`] holds one loaded run, with the items published and deleted while serving kept by
//! `needle-catalog` beside its index;
//! [`versions`] routes users over several engines served side by side; [`http`] starts the
//! axum application around them and routes its requests: `app` holds the shared state and
//! (re)loads runs into it, `middleware` wraps every request (ids, logs, shedding, the admin
//! token), and `recall_api`, `catalog_api` and `admin_api` answer the routes, with `reply` for
//! the JSON answers they share. [`loadgen`] is the load generator behind `needle bench serve`.

mod admin_api;
mod app;
pub mod auth;
mod catalog_api;
pub mod compute;
pub mod conn;
pub mod engine;
pub mod http;
pub mod loadgen;
pub mod metrics;
mod middleware;
mod recall_api;
mod reply;
pub mod versions;

pub use engine::{Engine, Source};
pub use http::{serve, Limits, ServeOptions};

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Load(String),
    #[error(transparent)]
    Run(#[from] needle_run::RunError),
    #[error(transparent)]
    Data(#[from] needle_data::DataError),
    #[error(transparent)]
    Store(#[from] needle_store::StoreError),
    #[error("internal error: {0}")]
    Internal(String),
    /// The request asks for something the served run cannot do (e.g. filter on an attribute
    /// it does not have).
    #[error("{0}")]
    BadRequest(String),
    /// The request is well-formed but the served model cannot do it (e.g. embed an item it
    /// was not trained on with an id-only item tower).
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
}
