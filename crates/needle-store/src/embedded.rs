//! The default store: one redb file. Reads are plain B-tree lookups in the caller's thread (a
//! few microseconds); writes commit durably, so they run on tokio's blocking pool to keep the
//! request threads free while the file syncs.

use crate::{
    newest, truncate_front, ItemDetails, ItemRecord, LiveChanges, Progress, Records, Result, Store, StoreError,
    StoreFuture, UserProfile,
};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Item id → JSON details.
const ITEMS: TableDefinition<&str, &[u8]> = TableDefinition::new("items");
/// User id → JSON feature map.
const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");
/// User id → history, item ids joined by '\n' (ids never hold a newline: loaders split lines).
const HISTORY: TableDefinition<&str, &[u8]> = TableDefinition::new("history");
const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
/// Ids of items published while serving (their details are in `items`).
const LIVE: TableDefinition<&str, ()> = TableDefinition::new("live_items");
/// Ids of items deleted while serving.
const DELETED: TableDefinition<&str, ()> = TableDefinition::new("deleted_items");

/// Records written per transaction while loading.
const LOAD_BATCH: usize = 10_000;

pub struct EmbeddedStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl EmbeddedStore {
    /// Opens the file, creating it (and its tables) when missing.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |e: &dyn std::fmt::Display| StoreError::Embedded { path: path.to_owned(), message: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
        }
        let db = Database::create(path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                fail(&"another process has it open (a running `needle serve`?); stop it first, or share a Redis store")
            }
            e => fail(&e),
        })?;
        let store = EmbeddedStore { db: Arc::new(db), path: path.to_owned() };
        store.write(|tx| {
            tx.open_table(ITEMS)?;
            tx.open_table(USERS)?;
            tx.open_table(HISTORY)?;
            tx.open_table(META)?;
            tx.open_table(LIVE)?;
            tx.open_table(DELETED)?;
            Ok(())
        })?;
        Ok(store)
    }

    fn err(&self, e: impl std::fmt::Display) -> StoreError {
        StoreError::Embedded { path: self.path.clone(), message: e.to_string() }
    }

    fn write<T>(&self, f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error>) -> Result<T> {
        let tx = self.db.begin_write().map_err(|e| self.err(e))?;
        let out = f(&tx).map_err(|e| self.err(e))?;
        tx.commit().map_err(|e| self.err(e))?;
        Ok(out)
    }

    fn read_items(&self, ids: &[&str]) -> Result<Vec<Option<ItemDetails>>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = tx.open_table(ITEMS).map_err(|e| self.err(e))?;
        ids.iter()
            .map(|id| match table.get(*id).map_err(|e| self.err(e))? {
                Some(v) => serde_json::from_slice(v.value())
                    .map(Some)
                    .map_err(|e| StoreError::Corrupt { key: format!("item {id}"), message: e.to_string() }),
                None => Ok(None),
            })
            .collect()
    }

    /// Runs a durable write on tokio's blocking pool (the commit syncs the file), or inline
    /// outside a runtime.
    async fn write_blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, redb::Error> + Send + 'static,
    ) -> Result<T> {
        let this = EmbeddedStore { db: self.db.clone(), path: self.path.clone() };
        let job = move || this.write(f);
        match tokio::runtime::Handle::try_current() {
            Ok(_) => tokio::task::spawn_blocking(job).await.map_err(|e| self.err(e))?,
            Err(_) => job(),
        }
    }

    fn read_live(&self) -> Result<LiveChanges> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let ids = |def: TableDefinition<&str, ()>| -> Result<Vec<String>> {
            let t = tx.open_table(def).map_err(|e| self.err(e))?;
            let rows = t.iter().map_err(|e| self.err(e))?;
            rows.map(|r| r.map(|(k, _)| k.value().to_owned()).map_err(|e| self.err(e))).collect()
        };
        let (live, deleted) = (ids(LIVE)?, ids(DELETED)?);
        drop(tx);
        let refs: Vec<&str> = live.iter().map(String::as_str).collect();
        let details = self.read_items(&refs)?;
        // A live mark without details cannot be written (both change in one transaction).
        let upserted = live
            .iter()
            .zip(details)
            .filter_map(|(id, d)| d.map(|details| ItemRecord { id: id.clone(), details }))
            .collect();
        Ok(LiveChanges { upserted, deleted })
    }

    fn read_user(&self, id: &str, max_history: usize) -> Result<Option<UserProfile>> {
        let tx = self.db.begin_read().map_err(|e| self.err(e))?;
        let users = tx.open_table(USERS).map_err(|e| self.err(e))?;
        let history = tx.open_table(HISTORY).map_err(|e| self.err(e))?;
        let features = match users.get(id).map_err(|e| self.err(e))? {
            Some(v) => Some(
                serde_json::from_slice(v.value())
                    .map_err(|e| StoreError::Corrupt { key: format!("user {id}"), message: e.to_string() })?,
            ),
            None => None,
        };
        let hist = history.get(id).map_err(|e| self.err(e))?.map(|v| split_history(v.value()));
        Ok(match (features, hist) {
            (None, None) => None,
            (f, h) => {
                let mut history = h.unwrap_or_default();
                truncate_front(&mut history, max_history);
                Some(UserProfile { features: f.unwrap_or_default(), history })
            }
        })
    }
}

fn split_history(bytes: &[u8]) -> Vec<String> {
    if bytes.is_empty() {
        return Vec::new();
    }
    String::from_utf8_lossy(bytes).split('\n').map(str::to_owned).collect()
}

fn join_history(items: &[String]) -> Vec<u8> {
    items.join("\n").into_bytes()
}

fn to_json<T: serde::Serialize>(v: &T) -> Vec<u8> {
    // Maps of strings always serialise.
    serde_json::to_vec(v).unwrap_or_default()
}

impl Store for EmbeddedStore {
    fn describe(&self) -> String {
        format!("embedded:{}", self.path.display())
    }

    fn items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Vec<Option<ItemDetails>>> {
        Box::pin(async move { self.read_items(ids) })
    }

    fn user<'a>(&'a self, id: &'a str, max_history: usize) -> StoreFuture<'a, Option<UserProfile>> {
        Box::pin(async move { self.read_user(id, max_history) })
    }

    fn append_event<'a>(&'a self, user: &'a str, item: &'a str, max_history: usize) -> StoreFuture<'a, usize> {
        let (user, item) = (user.to_owned(), item.to_owned());
        Box::pin(self.write_blocking(move |tx| {
            let mut table = tx.open_table(HISTORY)?;
            let mut history = table.get(user.as_str())?.map(|v| split_history(v.value())).unwrap_or_default();
            history.push(item);
            truncate_front(&mut history, max_history);
            table.insert(user.as_str(), join_history(&history).as_slice())?;
            Ok(history.len())
        }))
    }

    fn load<'a>(&'a self, records: Records<'a>, progress: Progress<'a>) -> StoreFuture<'a, ()> {
        let Records { items, users, max_history } = records;
        Box::pin(async move {
            self.write(|tx| {
                tx.open_table(META)?.remove("loaded")?;
                Ok(())
            })?;
            let mut done = 0;
            for chunk in items.chunks(LOAD_BATCH) {
                self.write(|tx| {
                    let mut t = tx.open_table(ITEMS)?;
                    for it in chunk {
                        t.insert(it.id.as_str(), to_json(&it.details).as_slice())?;
                    }
                    Ok(())
                })?;
                done += chunk.len();
                progress(done);
            }
            for chunk in users.chunks(LOAD_BATCH) {
                self.write(|tx| {
                    let mut f = tx.open_table(USERS)?;
                    let mut h = tx.open_table(HISTORY)?;
                    for u in chunk {
                        f.insert(u.id.as_str(), to_json(&u.profile.features).as_slice())?;
                        h.insert(u.id.as_str(), join_history(newest(&u.profile.history, max_history)).as_slice())?;
                    }
                    Ok(())
                })?;
                done += chunk.len();
                progress(done);
            }
            Ok(())
        })
    }

    fn upsert_items<'a>(&'a self, items: &'a [ItemRecord]) -> StoreFuture<'a, u64> {
        let records: Vec<(String, Vec<u8>)> = items.iter().map(|it| (it.id.clone(), to_json(&it.details))).collect();
        Box::pin(self.write_blocking(move |tx| {
            let (mut t, mut live, mut deleted) = (tx.open_table(ITEMS)?, tx.open_table(LIVE)?, tx.open_table(DELETED)?);
            for (id, json) in &records {
                t.insert(id.as_str(), json.as_slice())?;
                live.insert(id.as_str(), ())?;
                deleted.remove(id.as_str())?;
            }
            Ok(0)
        }))
    }

    fn delete_items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, (usize, u64)> {
        let ids: Vec<String> = ids.iter().map(|s| (*s).to_owned()).collect();
        Box::pin(self.write_blocking(move |tx| {
            let (mut t, mut live, mut deleted) = (tx.open_table(ITEMS)?, tx.open_table(LIVE)?, tx.open_table(DELETED)?);
            let mut had = 0;
            for id in &ids {
                had += usize::from(t.remove(id.as_str())?.is_some());
                live.remove(id.as_str())?;
                deleted.insert(id.as_str(), ())?;
            }
            Ok((had, 0))
        }))
    }

    fn live_changes(&self) -> StoreFuture<'_, LiveChanges> {
        Box::pin(async move { self.read_live() })
    }

    fn loaded_tag(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            let tx = self.db.begin_read().map_err(|e| self.err(e))?;
            let t = tx.open_table(META).map_err(|e| self.err(e))?;
            let v = t.get("loaded").map_err(|e| self.err(e))?.map(|v| v.value().to_owned());
            Ok(v)
        })
    }

    fn set_loaded_tag<'a>(&'a self, tag: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            self.write(|tx| {
                tx.open_table(META)?.insert("loaded", tag)?;
                Ok(())
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn embedded_store_behaves_like_a_store_and_persists() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/store.redb");
        {
            let s = EmbeddedStore::open(&path).unwrap();
            crate::conformance::check(&s).await;
        }
        // Reopening sees what was written, events included.
        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.user("new", 10).await.unwrap().unwrap().history, vec!["i1", "i2"]);
        assert_eq!(s.loaded_tag().await.unwrap().as_deref(), Some("fp1"));
    }

    #[test]
    fn a_file_that_is_not_a_store_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        std::fs::write(&path, b"definitely not a redb file, just some text that is long enough").unwrap();
        let err = EmbeddedStore::open(&path).err().expect("must fail");
        assert!(err.to_string().contains("x.redb"), "{err}");
    }
}
