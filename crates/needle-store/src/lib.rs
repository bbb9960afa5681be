//! What the online recall path reads besides the model and the index: item details to show
//! (title, genres, …) and, per user, a profile (feature values) and the recent history, newest
//! last. Two stores implement one trait:
//!
//! - [`EmbeddedStore`]: a single redb file, the default; no server to run.
//! - [`RedisStore`]: a Redis server or a Redis Cluster, the usual production cache shared by many
//!   serving processes.
//!
//! Keys are the dataset's raw ids (strings), so a store outlives any one model: a retrained run
//! maps them to its own rows.

mod embedded;
mod redis_store;

pub use embedded::EmbeddedStore;
pub use redis_store::{testing, RedisStore};

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("embedded store {path}: {message}")]
    Embedded { path: PathBuf, message: String },
    #[error("redis {url}: {source}")]
    Redis { url: String, source: redis::RedisError },
    #[error("stored value for {key} is not valid: {message}")]
    Corrupt { key: String, message: String },
    #[error("bad store address {0:?}: expected `embedded`, a path to a .redb file, redis://HOST:PORT, or redis+cluster://HOST:PORT,HOST:PORT,...")]
    BadSpec(String),
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// What a client sees of an item besides its id and score.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct ItemDetails {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Categorical attributes by name (e.g. `genres`), each possibly multi-valued.
    #[serde(flatten)]
    pub attributes: BTreeMap<String, Vec<String>>,
}

/// One item to load.
#[derive(Clone, Debug, PartialEq)]
pub struct ItemRecord {
    pub id: String,
    pub details: ItemDetails,
}

/// What the user tower reads of a user, beyond the request itself.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct UserProfile {
    /// Feature values by feature name (e.g. `gender` → `F`).
    pub features: BTreeMap<String, String>,
    /// Raw item ids, oldest first.
    pub history: Vec<String>,
}

/// One user to load.
#[derive(Clone, Debug)]
pub struct UserRecord {
    pub id: String,
    pub profile: UserProfile,
}

/// The catalogue changes made while serving (`POST` / `DELETE /v1/items`), which an engine
/// loaded later applies on top of its run.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct LiveChanges {
    /// Items published or updated, with their current details.
    pub upserted: Vec<ItemRecord>,
    /// Ids removed and not published again since.
    pub deleted: Vec<String>,
}

/// A boxed future, so that [`Store`] can be used as a trait object.
pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T>> + Send + 'a>>;

/// What [`Store::load`] writes: every item's details and every user's profile, each history cut
/// to its newest `max_history` items.
#[derive(Clone, Copy)]
pub struct Records<'a> {
    pub items: &'a [ItemRecord],
    pub users: &'a [UserRecord],
    pub max_history: usize,
}

/// Told how many records a long write has done.
pub type Progress<'a> = &'a (dyn Fn(usize) + Send + Sync);

/// Item details and user state for online recall.
pub trait Store: Send + Sync {
    /// `embedded:PATH` or the Redis URL, for logs and `/healthz`.
    fn describe(&self) -> String;

    /// Details of each id, in order; `None` for unknown ids.
    fn items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Vec<Option<ItemDetails>>>;

    /// The user's profile with at most the newest `max_history` items; `None` for an unknown user.
    fn user<'a>(&'a self, id: &'a str, max_history: usize) -> StoreFuture<'a, Option<UserProfile>>;

    /// Appends one event to the user's history, keeping the newest `max_history`; returns the
    /// new history length. Creates the user when unknown.
    fn append_event<'a>(&'a self, user: &'a str, item: &'a str, max_history: usize) -> StoreFuture<'a, usize>;

    /// Replaces the stored items and users with these (other keys are left alone), in batches.
    /// `progress` is told how many records are done.
    fn load<'a>(&'a self, records: Records<'a>, progress: Progress<'a>) -> StoreFuture<'a, ()>;

    /// Writes items published while serving: their details, and a mark that they came live,
    /// so that an engine loaded later (a restart, a reload, another server) applies them again.
    /// An upsert cancels an earlier deletion of the same id. Returns the store's
    /// [`Store::change_count`] right after this write.
    fn upsert_items<'a>(&'a self, items: &'a [ItemRecord]) -> StoreFuture<'a, u64>;

    /// Removes items: their details and live marks go, and a deletion mark stays, so a trained
    /// item stays removed across restarts. Returns how many of them had details, and the
    /// store's [`Store::change_count`] right after this write.
    fn delete_items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, (usize, u64)>;

    /// Every live upsert (with its current details) and deletion recorded so far.
    fn live_changes(&self) -> StoreFuture<'_, LiveChanges>;

    /// A free-form tag recorded after the last complete [`Store::load`] (needle stores the run's
    /// data fingerprint), or `None` when nothing was loaded. `load` removes the tag before it
    /// writes anything, so a load that was interrupted leaves no tag, never the previous one over
    /// half-replaced records.
    fn loaded_tag(&self) -> StoreFuture<'_, Option<String>>;
    fn set_loaded_tag<'a>(&'a self, tag: &'a str) -> StoreFuture<'a, ()>;

    /// How many catalogue changes (upserts and deletes) have been recorded: a server compares
    /// it with the count it last applied to notice changes other servers made. A store only one
    /// process can open (the embedded file) has no other writers, and answers 0.
    fn change_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async { Ok(0) })
    }

    /// Tells every other process on this store about a change (Redis pub/sub); nothing to do
    /// for a store only one process can open.
    fn announce<'a>(&'a self, _message: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async { Ok(()) })
    }

    /// The announcements of other processes, from now on (`None`: no other process can share
    /// this store). Delivery is best effort; [`Store::change_count`] is the safety net.
    fn subscribe(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        None
    }
}

/// Where a store lives, as given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreSpec {
    /// The default embedded file, wherever the caller puts it (needle: `RUN/store.redb`).
    DefaultEmbedded,
    Embedded(PathBuf),
    Redis(String),
}

impl FromStr for StoreSpec {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "embedded" {
            Ok(StoreSpec::DefaultEmbedded)
        } else if s.starts_with("redis://") || s.starts_with("rediss://") || s.starts_with("redis+unix://") {
            Ok(StoreSpec::Redis(s.to_owned()))
        } else if s.starts_with("redis+cluster://") {
            redis_store::cluster_nodes(s).ok_or_else(|| StoreError::BadSpec(s.to_owned()))?;
            Ok(StoreSpec::Redis(s.to_owned()))
        } else if let Some(p) = s.strip_prefix("embedded:") {
            Ok(StoreSpec::Embedded(p.into()))
        } else if s.ends_with(".redb") {
            Ok(StoreSpec::Embedded(s.into()))
        } else {
            Err(StoreError::BadSpec(s.to_owned()))
        }
    }
}

/// Opens (or creates, for an embedded file) the store; `default_path` is the embedded file for
/// [`StoreSpec::DefaultEmbedded`].
pub async fn open(spec: &StoreSpec, default_path: &std::path::Path) -> Result<Box<dyn Store>> {
    Ok(match spec {
        StoreSpec::DefaultEmbedded => Box::new(EmbeddedStore::open(default_path)?),
        StoreSpec::Embedded(p) => Box::new(EmbeddedStore::open(p)?),
        StoreSpec::Redis(url) => Box::new(RedisStore::connect(url).await?),
    })
}

/// The newest `max` entries of `history`: what a store keeps of a user's log.
pub fn newest(history: &[String], max: usize) -> &[String] {
    &history[history.len().saturating_sub(max)..]
}

/// Keeps the newest `max` entries of `history`.
fn truncate_front(history: &mut Vec<String>, max: usize) {
    let drop = history.len() - newest(history, max).len();
    history.drain(..drop);
}

#[cfg(test)]
pub(crate) mod conformance {
    //! The behaviour every store must show, run against each implementation.
    use super::*;

    pub fn sample() -> (Vec<ItemRecord>, Vec<UserRecord>) {
        let items = (0..250)
            .map(|i| ItemRecord {
                id: format!("i{i}"),
                details: ItemDetails {
                    title: Some(format!("Title {i}")),
                    attributes: BTreeMap::from([(
                        "genres".to_owned(),
                        vec!["Drama".to_owned(), format!("g{}", i % 3)],
                    )]),
                },
            })
            .collect();
        let users = (0..120)
            .map(|u| UserRecord {
                id: format!("u{u}"),
                profile: UserProfile {
                    features: BTreeMap::from([("gender".to_owned(), if u % 2 == 0 { "F" } else { "M" }.to_owned())]),
                    history: (0..(u % 7)).map(|i| format!("i{i}")).collect(),
                },
            })
            .collect();
        (items, users)
    }

    pub async fn check(store: &dyn Store) {
        let (items, users) = sample();
        let done = std::sync::atomic::AtomicUsize::new(0);
        let progress = |n: usize| {
            done.store(n, std::sync::atomic::Ordering::Relaxed);
        };
        store.load(Records { items: &items, users: &users, max_history: 4 }, &progress).await.unwrap();
        assert_eq!(done.load(std::sync::atomic::Ordering::Relaxed), items.len() + users.len());
        store.set_loaded_tag("fp1").await.unwrap();
        assert_eq!(store.loaded_tag().await.unwrap().as_deref(), Some("fp1"));
        // A load in progress (or cut short) is never covered by the previous load's tag.
        store.load(Records { items: &items[..1], users: &[], max_history: 4 }, &|_| {}).await.unwrap();
        assert_eq!(store.loaded_tag().await.unwrap(), None);
        store.set_loaded_tag("fp1").await.unwrap();

        let got = store.items(&["i3", "nope", "i249"]).await.unwrap();
        assert_eq!(got[0].as_ref(), Some(&items[3].details));
        assert_eq!(got[1], None);
        assert_eq!(got[2].as_ref().unwrap().title.as_deref(), Some("Title 249"));
        assert!(store.items(&[]).await.unwrap().is_empty());

        // Loading keeps only the newest `max_history` items.
        let u6 = store.user("u6", 100).await.unwrap().unwrap();
        assert_eq!(u6.features["gender"], "F");
        assert_eq!(u6.history, vec!["i2", "i3", "i4", "i5"]);
        assert_eq!(store.user("u6", 2).await.unwrap().unwrap().history, vec!["i4", "i5"]);
        assert_eq!(store.user("u0", 10).await.unwrap().unwrap().history, Vec::<String>::new());
        assert_eq!(store.user("ghost", 10).await.unwrap(), None);

        // Events append newest last and stay bounded.
        assert_eq!(store.append_event("u6", "i9", 4).await.unwrap(), 4);
        assert_eq!(store.user("u6", 10).await.unwrap().unwrap().history, vec!["i3", "i4", "i5", "i9"]);
        assert_eq!(store.append_event("new", "i1", 4).await.unwrap(), 1);
        assert_eq!(store.append_event("new", "i2", 4).await.unwrap(), 2);
        let new = store.user("new", 10).await.unwrap().unwrap();
        assert_eq!(new.history, vec!["i1", "i2"]);
        assert!(new.features.is_empty());

        // A second load replaces what the first wrote for the same keys.
        let mut users2 = users.clone();
        users2[6].profile.history = vec!["i7".to_owned()];
        store.load(Records { items: &items, users: &users2, max_history: 4 }, &|_| {}).await.unwrap();
        assert_eq!(store.user("u6", 10).await.unwrap().unwrap().history, vec!["i7"]);
        assert_eq!(store.loaded_tag().await.unwrap(), None);
        store.set_loaded_tag("fp1").await.unwrap();

        // Live catalogue changes: recorded, replayable, and an upsert undoes a deletion.
        assert_eq!(store.live_changes().await.unwrap(), LiveChanges::default());
        let fresh = ItemRecord {
            id: "new-1".into(),
            details: ItemDetails {
                title: Some("Fresh".into()),
                attributes: BTreeMap::from([("genres".to_owned(), vec!["g1".to_owned()])]),
            },
        };
        store.upsert_items(std::slice::from_ref(&fresh)).await.unwrap();
        assert_eq!(store.items(&["new-1"]).await.unwrap()[0].as_ref(), Some(&fresh.details));
        assert_eq!(store.delete_items(&["i3", "ghost"]).await.unwrap().0, 1);
        assert_eq!(store.items(&["i3"]).await.unwrap()[0], None);
        let changes = store.live_changes().await.unwrap();
        assert_eq!(changes.upserted.len(), 1);
        assert_eq!(changes.upserted[0].id, "new-1");
        assert_eq!(changes.upserted[0].details, fresh.details);
        let mut deleted = changes.deleted.clone();
        deleted.sort();
        assert_eq!(deleted, vec!["ghost", "i3"]);
        // Deleting a live item removes its live mark; upserting a deleted one clears the deletion.
        assert_eq!(store.delete_items(&["new-1"]).await.unwrap().0, 1);
        let again = ItemRecord { id: "i3".into(), details: items[3].details.clone() };
        store.upsert_items(&[again]).await.unwrap();
        let changes = store.live_changes().await.unwrap();
        assert_eq!(changes.upserted.iter().map(|r| r.id.as_str()).collect::<Vec<_>>(), vec!["i3"]);
        let mut deleted = changes.deleted;
        deleted.sort();
        assert_eq!(deleted, vec!["ghost", "new-1"]);
        assert_eq!(store.items(&["i3"]).await.unwrap()[0].as_ref(), Some(&items[3].details));
    }
}
