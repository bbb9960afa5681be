//! Redis as the store: item details as JSON strings (one MGET per recall), the user's feature
//! map as a JSON string and the recent history as a list (GET + LRANGE in one pipelined round
//! trip). One multiplexed connection carries every request's commands, so concurrent requests
//! pipeline on the wire without a pool; when Redis goes away, calls fail fast and the connection
//! is re-established in the background, so serving recovers when Redis comes back.

use crate::{ItemDetails, ItemRecord, LiveChanges, Result, Store, StoreError, StoreFuture, UserProfile, UserRecord};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use std::time::Duration;

const ITEM: &str = "needle:item:";
const USER: &str = "needle:user:";
const HIST: &str = "needle:hist:";
const TAG: &str = "needle:loaded";
/// Set of the ids of items published while serving.
const LIVE: &str = "needle:live";
/// Set of the ids of items deleted while serving.
const DELETED: &str = "needle:deleted";
/// Commands per pipeline while loading.
const LOAD_BATCH: usize = 2_000;

pub struct RedisStore {
    url: String,
    con: ConnectionManager,
}

impl RedisStore {
    pub async fn connect(url: &str) -> Result<Self> {
        let fail = |source| StoreError::Redis { url: url.to_owned(), source };
        let client = redis::Client::open(url).map_err(fail)?;
        // Short timeouts and few retries: a request waiting on a dead Redis should fail within
        // its own time budget, not queue behind reconnection attempts.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_millis(500)))
            .set_response_timeout(Some(Duration::from_secs(1)))
            .set_number_of_retries(2)
            .set_min_delay(Duration::from_millis(10))
            .set_max_delay(Duration::from_millis(200));
        let mut con = ConnectionManager::new_with_config(client, config).await.map_err(fail)?;
        redis::cmd("PING").query_async::<String>(&mut con).await.map_err(fail)?;
        Ok(RedisStore { url: url.to_owned(), con })
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        StoreError::Redis { url: self.url.clone(), source }
    }
}

fn corrupt(key: String, e: serde_json::Error) -> StoreError {
    StoreError::Corrupt { key, message: e.to_string() }
}

impl Store for RedisStore {
    fn describe(&self) -> String {
        self.url.clone()
    }

    fn items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, Vec<Option<ItemDetails>>> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            let keys: Vec<String> = ids.iter().map(|id| format!("{ITEM}{id}")).collect();
            let mut con = self.con.clone();
            let raw: Vec<Option<Vec<u8>>> =
                redis::cmd("MGET").arg(&keys).query_async(&mut con).await.map_err(|e| self.err(e))?;
            raw.into_iter()
                .zip(keys)
                .map(|(v, key)| v.map(|b| serde_json::from_slice(&b).map_err(|e| corrupt(key, e))).transpose())
                .collect()
        })
    }

    fn user<'a>(&'a self, id: &'a str, max_history: usize) -> StoreFuture<'a, Option<UserProfile>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let start = -(max_history.max(1) as i64);
            let (features, history, exists): (Option<Vec<u8>>, Vec<String>, i64) = redis::pipe()
                .cmd("GET")
                .arg(format!("{USER}{id}"))
                .cmd("LRANGE")
                .arg(format!("{HIST}{id}"))
                .arg(start)
                .arg(-1)
                .cmd("EXISTS")
                .arg(format!("{HIST}{id}"))
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            if features.is_none() && exists == 0 {
                return Ok(None);
            }
            let features = match features {
                Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt(format!("{USER}{id}"), e))?,
                None => Default::default(),
            };
            let history = if max_history == 0 { Vec::new() } else { history };
            Ok(Some(UserProfile { features, history }))
        })
    }

    fn append_event<'a>(&'a self, user: &'a str, item: &'a str, max_history: usize) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let key = format!("{HIST}{user}");
            // MULTI/EXEC so that a concurrent reader never sees the list over its bound.
            let (_, len): ((), usize) = redis::pipe()
                .atomic()
                .cmd("RPUSH")
                .arg(&key)
                .arg(item)
                .ignore()
                .cmd("LTRIM")
                .arg(&key)
                .arg(-(max_history.max(1) as i64))
                .arg(-1)
                .cmd("LLEN")
                .arg(&key)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            Ok(len)
        })
    }

    fn load<'a>(
        &'a self,
        items: &'a [ItemRecord],
        users: &'a [UserRecord],
        max_history: usize,
        progress: &'a (dyn Fn(usize) + Send + Sync),
    ) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut con = self.con.clone();
            redis::cmd("DEL").arg(TAG).query_async::<()>(&mut con).await.map_err(|e| self.err(e))?;
            let mut done = 0;
            for chunk in items.chunks(LOAD_BATCH) {
                let mut p = redis::pipe();
                for it in chunk {
                    let json = serde_json::to_vec(&it.details).map_err(|e| corrupt(it.id.clone(), e))?;
                    p.cmd("SET").arg(format!("{ITEM}{}", it.id)).arg(json).ignore();
                }
                p.query_async::<()>(&mut con).await.map_err(|e| self.err(e))?;
                done += chunk.len();
                progress(done);
            }
            for chunk in users.chunks(LOAD_BATCH / 4) {
                let mut p = redis::pipe();
                for u in chunk {
                    let json = serde_json::to_vec(&u.profile.features).map_err(|e| corrupt(u.id.clone(), e))?;
                    p.cmd("SET").arg(format!("{USER}{}", u.id)).arg(json).ignore();
                    let key = format!("{HIST}{}", u.id);
                    p.cmd("DEL").arg(&key).ignore();
                    let recent = crate::newest(&u.profile.history, max_history);
                    if !recent.is_empty() {
                        p.cmd("RPUSH").arg(&key).arg(recent).ignore();
                    }
                }
                p.query_async::<()>(&mut con).await.map_err(|e| self.err(e))?;
                done += chunk.len();
                progress(done);
            }
            Ok(())
        })
    }

    fn upsert_items<'a>(&'a self, items: &'a [ItemRecord]) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            if items.is_empty() {
                return Ok(());
            }
            let mut p = redis::pipe();
            p.atomic();
            for it in items {
                let json = serde_json::to_vec(&it.details).map_err(|e| corrupt(it.id.clone(), e))?;
                p.cmd("SET").arg(format!("{ITEM}{}", it.id)).arg(json).ignore();
            }
            let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
            p.cmd("SADD").arg(LIVE).arg(&ids).ignore();
            p.cmd("SREM").arg(DELETED).arg(&ids).ignore();
            let mut con = self.con.clone();
            p.query_async::<()>(&mut con).await.map_err(|e| self.err(e))
        })
    }

    fn delete_items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok(0);
            }
            let keys: Vec<String> = ids.iter().map(|id| format!("{ITEM}{id}")).collect();
            let mut con = self.con.clone();
            let (had,): (usize,) = redis::pipe()
                .atomic()
                .cmd("DEL")
                .arg(&keys)
                .cmd("SREM")
                .arg(LIVE)
                .arg(ids)
                .ignore()
                .cmd("SADD")
                .arg(DELETED)
                .arg(ids)
                .ignore()
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            Ok(had)
        })
    }

    fn live_changes(&self) -> StoreFuture<'_, LiveChanges> {
        Box::pin(async move {
            let mut con = self.con.clone();
            let (mut live, mut deleted): (Vec<String>, Vec<String>) = redis::pipe()
                .cmd("SMEMBERS")
                .arg(LIVE)
                .cmd("SMEMBERS")
                .arg(DELETED)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            // Sets come back in hash order; sorted, every server applies them alike.
            live.sort_unstable();
            deleted.sort_unstable();
            let mut upserted = Vec::with_capacity(live.len());
            for chunk in live.chunks(LOAD_BATCH) {
                let refs: Vec<&str> = chunk.iter().map(String::as_str).collect();
                let details = self.items(&refs).await?;
                upserted.extend(
                    chunk
                        .iter()
                        .zip(details)
                        .filter_map(|(id, d)| d.map(|details| ItemRecord { id: id.clone(), details })),
                );
            }
            Ok(LiveChanges { upserted, deleted })
        })
    }

    fn loaded_tag(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            let mut con = self.con.clone();
            redis::cmd("GET").arg(TAG).query_async(&mut con).await.map_err(|e| self.err(e))
        })
    }

    fn set_loaded_tag<'a>(&'a self, tag: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut con = self.con.clone();
            redis::cmd("SET").arg(TAG).arg(tag).query_async(&mut con).await.map_err(|e| self.err(e))
        })
    }
}

/// A Redis server for tests: `NEEDLE_TEST_REDIS` when set (CI starts one), else a private
/// `redis-server` on a free port when the binary exists, else `None` (the caller skips, saying so).
pub mod testing {
    use std::process::{Child, Command, Stdio};

    pub struct TestRedis {
        pub url: String,
        child: Option<Child>,
        _dir: Option<tempfile::TempDir>,
    }

    impl Drop for TestRedis {
        fn drop(&mut self) {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// `db` picks the logical database, so tests sharing one server (CI's) keep apart.
    pub fn start(db: u8) -> Option<TestRedis> {
        if let Ok(url) = std::env::var("NEEDLE_TEST_REDIS") {
            let url = format!("{}/{db}", url.trim_end_matches('/'));
            return Some(TestRedis { url, child: None, _dir: None });
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
        start_on(port, db)
    }

    impl TestRedis {
        /// Stops a private server (as a crash would: SIGKILL); no-op for a shared one.
        pub fn kill(&mut self) {
            if let Some(c) = self.child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            self.child = None;
        }
    }

    /// A private redis-server on `port`.
    pub fn start_on(port: u16, db: u8) -> Option<TestRedis> {
        let dir = tempfile::tempdir().ok()?;
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let url = format!("redis://127.0.0.1:{port}/{db}");
        let mut server = TestRedis { url, child: Some(child), _dir: Some(dir) };
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(server);
            }
            if let Some(Ok(Some(_))) = server.child.as_mut().map(|c| c.try_wait()) {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(25));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redis_store_behaves_like_a_store() {
        let Some(server) = testing::start(1) else {
            eprintln!("SKIPPED: no redis-server binary on PATH and NEEDLE_TEST_REDIS is not set");
            return;
        };
        let s = RedisStore::connect(&server.url).await.unwrap();
        let mut con = s.con.clone();
        let _: () = redis::cmd("FLUSHDB").query_async(&mut con).await.unwrap();
        crate::conformance::check(&s).await;
    }

    #[tokio::test]
    async fn calls_fail_while_redis_is_down_and_recover_when_it_returns() {
        let Some(port) = std::net::TcpListener::bind("127.0.0.1:0").ok().map(|l| l.local_addr().unwrap().port()) else {
            return;
        };
        let Some(mut server) = testing::start_on(port, 0) else {
            eprintln!("SKIPPED: no redis-server binary on PATH");
            return;
        };
        let s = RedisStore::connect(&server.url).await.unwrap();
        let (items, users) = crate::conformance::sample();
        s.load(&items, &users, 4, &|_| {}).await.unwrap();
        assert!(s.items(&["i1"]).await.unwrap()[0].is_some());
        server.kill();
        let err = s.items(&["i1"]).await.expect_err("Redis is down");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
        let _restarted = testing::start_on(port, 0).expect("redis-server restarts on the same port");
        // The data is gone with the old process; what matters is that calls work again.
        let t = std::time::Instant::now();
        loop {
            match s.items(&["i1"]).await {
                Ok(v) => {
                    assert_eq!(v, vec![None]);
                    break;
                }
                Err(e) => assert!(t.elapsed() < Duration::from_secs(10), "no recovery: {e}"),
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}")).await.err().expect("must fail");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
