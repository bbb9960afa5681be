//! Redis as the store: item details as JSON strings (one MGET per recall), the user's feature
//! map as a JSON string and the recent history as a list (GET + LRANGE in one pipelined round
//! trip). One multiplexed connection carries every request's commands, so concurrent requests
//! pipeline on the wire without a pool; when Redis goes away, calls fail fast and the connection
//! is re-established in the background, so serving recovers when Redis comes back.
//!
//! The same code runs against Redis Cluster (`redis+cluster://HOST:PORT,HOST:PORT,…`). Keys are
//! laid out for it: a user's profile and history share the hash tag `{u:ID}`, so the pipelined
//! read and the MULTI of an event go to one shard; the catalogue's change sets and counters share
//! `{catalogue}`; item details spread over 16 hash-tag buckets, so a recall reads its k items
//! with at most 16 single-slot MGETs, all in flight at once. The cluster client follows MOVED/ASK redirects and re-reads
//! the slot map after a failover. No command crosses slots inside a pipeline or a MULTI, so nothing needs a
//! cross-slot transaction: where two writes go to different shards, their order keeps every
//! intermediate state valid (details before the live mark; the deletion mark before details go).

use crate::{
    ItemDetails, ItemRecord, LiveChanges, Progress, Records, Result, Store, StoreError, StoreFuture, UserProfile,
    UserRecord,
};
use futures_util::StreamExt;
use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::{Cmd, Pipeline, RedisFuture, Value};
use std::time::Duration;

/// Item details are spread over this many hash-tag buckets: a cluster then serves a recall's
/// k item reads with at most this many commands (one MGET per bucket), where one key per
/// command cost 100 commands per recall and capped a 2-core server at 1,277 recalls/s.
const ITEM_BUCKETS: u64 = 16;
/// The loaded-data tag. Its name changed with the key layout, so a Redis filled by an older
/// layout reads as empty and is filled again rather than half-read.
const TAG: &str = "needle:{catalogue}:loaded:v2";
/// Set of the ids of items published while serving.
const LIVE: &str = "needle:{catalogue}:live";
/// Set of the ids of items deleted while serving.
const DELETED: &str = "needle:{catalogue}:deleted";
/// Counts catalogue changes, so a server can tell cheaply whether it missed one.
const SEQ: &str = "needle:{catalogue}:seq";
/// The pub/sub channel on which servers announce catalogue changes to each other.
pub const CHANGES_CHANNEL: &str = "needle:changes";
/// Commands per pipeline while loading.
const LOAD_BATCH: usize = 2_000;
/// Users whose keys are written at once while loading (each user is one pipeline to its shard).
const LOAD_USERS_IN_FLIGHT: usize = 256;

/// `needle:item:{iB}:ID`, B the id's bucket.
fn item_key(id: &str) -> String {
    format!("needle:item:{{i{}}}:{id}", item_bucket(id))
}

fn item_bucket(id: &str) -> u64 {
    let h = needle_core::hash::fnv1a64(needle_core::hash::FNV1A64_OFFSET, id.as_bytes());
    (h ^ (h >> 29)) % ITEM_BUCKETS
}

/// Groups the positions of item ids by bucket: the commands a cluster gets.
fn by_bucket(ids: &[&str]) -> Vec<Vec<usize>> {
    let mut groups = vec![Vec::new(); ITEM_BUCKETS as usize];
    for (i, id) in ids.iter().enumerate() {
        groups[item_bucket(id) as usize].push(i);
    }
    groups.retain(|g| !g.is_empty());
    groups
}

fn profile_key(user: &str) -> String {
    format!("needle:{{u:{user}}}:profile")
}

fn history_key(user: &str) -> String {
    format!("needle:{{u:{user}}}:hist")
}

/// One Redis server or a cluster, behind the connection trait the commands run on.
#[derive(Clone)]
enum Con {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

impl ConnectionLike for Con {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Con::Single(c) => c.req_packed_command(cmd),
            Con::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Con::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Con::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Con::Single(c) => c.get_db(),
            Con::Cluster(c) => c.get_db(),
        }
    }
}

pub struct RedisStore {
    url: String,
    /// Where to subscribe to change announcements (every node of a cluster relays them).
    nodes: Vec<String>,
    con: std::sync::Arc<std::sync::RwLock<Con>>,
    /// With a cluster: what rebuilds the connection when it stops recovering by itself.
    healer: Option<std::sync::Arc<Healer>>,
}

/// Replaces a cluster connection that keeps failing with a fresh one. After a master was killed
/// under load, the client's own connection kept timing out on the dead node's slots long after
/// a replica had taken them over (every call failed for the rest of a 30 s run), while a new
/// connection reads the current slot map from a live node and works at once.
struct Healer {
    client: redis::cluster::ClusterClient,
    /// When the last rebuild started (ms since `epoch`); at most one a second.
    last: std::sync::atomic::AtomicU64,
    epoch: std::time::Instant,
}

impl Healer {
    fn heal(self: &std::sync::Arc<Self>, con: &std::sync::Arc<std::sync::RwLock<Con>>) {
        use std::sync::atomic::Ordering::Relaxed;
        let now = self.epoch.elapsed().as_millis() as u64 + 1_000;
        let last = self.last.load(Relaxed);
        if now < last + 1_000 || self.last.compare_exchange(last, now, Relaxed, Relaxed).is_err() {
            return;
        }
        let (me, con) = (self.clone(), con.clone());
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                match tokio::time::timeout(Duration::from_secs(2), me.client.get_async_connection()).await {
                    Ok(Ok(fresh)) => *con.write().unwrap_or_else(|e| e.into_inner()) = Con::Cluster(fresh),
                    Ok(Err(e)) => tracing::warn!("redis cluster: reconnecting failed (retried on the next error): {e}"),
                    Err(_) => tracing::warn!("redis cluster: reconnecting timed out (retried on the next error)"),
                }
            });
        }
    }
}

/// `redis+cluster://h1:p1,h2:p2` → the node URLs `redis://h1:p1`, `redis://h2:p2`.
pub fn cluster_nodes(url: &str) -> Option<Vec<String>> {
    let rest = url.strip_prefix("redis+cluster://")?;
    let nodes: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| format!("redis://{n}"))
        .collect();
    (!nodes.is_empty()).then_some(nodes)
}

impl RedisStore {
    /// `redis://…` for one server, `redis+cluster://HOST:PORT,…` (any reachable nodes) for a
    /// cluster.
    pub async fn connect(url: &str) -> Result<Self> {
        let fail = |source| StoreError::Redis { url: url.to_owned(), source };
        // Short timeouts and few retries: a request waiting on a dead Redis should fail within
        // its own time budget, not queue behind reconnection attempts.
        let mut healer = None;
        let (mut con, nodes) = match cluster_nodes(url) {
            Some(nodes) => {
                let client = redis::cluster::ClusterClientBuilder::new(nodes.clone())
                    .connection_timeout(Duration::from_millis(500))
                    .response_timeout(Duration::from_secs(1))
                    .retries(3)
                    .min_retry_wait(10)
                    .max_retry_wait(200)
                    .build()
                    .map_err(fail)?;
                let con = client.get_async_connection().await.map_err(fail)?;
                let epoch = std::time::Instant::now();
                healer = Some(std::sync::Arc::new(Healer { client, last: 0.into(), epoch }));
                (Con::Cluster(con), nodes)
            }
            None => {
                let client = redis::Client::open(url).map_err(fail)?;
                let config = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(Duration::from_millis(500)))
                    .set_response_timeout(Some(Duration::from_secs(1)))
                    .set_number_of_retries(2)
                    .set_min_delay(Duration::from_millis(10))
                    .set_max_delay(Duration::from_millis(200));
                let con = ConnectionManager::new_with_config(client, config).await.map_err(fail)?;
                (Con::Single(con), vec![url.to_owned()])
            }
        };
        redis::cmd("PING").query_async::<String>(&mut con).await.map_err(fail)?;
        Ok(RedisStore { url: url.to_owned(), nodes, con: std::sync::Arc::new(std::sync::RwLock::new(con)), healer })
    }

    /// The connection to send on (a cheap handle to a shared multiplexed connection).
    fn con(&self) -> Con {
        self.con.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn err(&self, source: redis::RedisError) -> StoreError {
        let transient = source.is_timeout()
            || source.is_io_error()
            || source.is_connection_dropped()
            || source.is_connection_refusal()
            || source.is_cluster_error();
        if let (Some(h), true) = (&self.healer, transient) {
            h.heal(&self.con);
        }
        StoreError::Redis { url: self.url.clone(), source }
    }

    /// Runs command `name` over the item keys of `ids`, `arg` adding the arguments of id `i`:
    /// as one command on one server; on a cluster as one per bucket (one slot each), all in
    /// flight at once. Each reply comes with the positions of the ids it covers. (The cluster
    /// client can split a multi-slot MGET itself, but its recombination of the replies failed
    /// after a failover and kept failing, with redis-rs 1.8.1.)
    async fn per_bucket<T: redis::FromRedisValue + Send>(
        &self,
        ids: &[&str],
        name: &str,
        arg: impl Fn(&mut Cmd, usize),
    ) -> Result<Vec<(Vec<usize>, T)>> {
        let groups = match self.con() {
            Con::Single(_) => vec![(0..ids.len()).collect()],
            Con::Cluster(_) => by_bucket(ids),
        };
        let calls: Vec<_> = groups
            .iter()
            .map(|g| {
                let (mut c, mut cmd) = (self.con(), redis::cmd(name));
                for &i in g {
                    arg(&mut cmd, i);
                }
                async move { cmd.query_async::<T>(&mut c).await }
            })
            .collect();
        let replies = futures_util::future::try_join_all(calls).await.map_err(|e| self.err(e))?;
        Ok(groups.into_iter().zip(replies).collect())
    }

    /// The stored details of each item id, in order (raw JSON).
    async fn get_many(&self, ids: &[&str]) -> Result<Vec<Option<Vec<u8>>>> {
        let replies = self.per_bucket::<Vec<Option<Vec<u8>>>>(ids, "MGET", |c, i| {
            c.arg(item_key(ids[i]));
        });
        let mut out = vec![None; ids.len()];
        for (positions, values) in replies.await? {
            for (i, v) in positions.into_iter().zip(values) {
                out[i] = v;
            }
        }
        Ok(out)
    }

    /// Writes the items' details.
    async fn set_many(&self, items: &[ItemRecord]) -> Result<()> {
        let json = items
            .iter()
            .map(|it| serde_json::to_vec(&it.details).map_err(|e| corrupt(it.id.clone(), e)))
            .collect::<Result<Vec<_>>>()?;
        let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
        self.per_bucket::<()>(&ids, "MSET", |c, i| {
            c.arg(item_key(ids[i])).arg(&json[i]);
        })
        .await
        .map(drop)
    }

    /// Deletes the items' details; returns how many existed.
    async fn del_many(&self, ids: &[&str]) -> Result<usize> {
        let replies = self.per_bucket::<usize>(ids, "DEL", |c, i| {
            c.arg(item_key(ids[i]));
        });
        Ok(replies.await?.into_iter().map(|(_, n)| n).sum())
    }

    /// Writes one user's profile and history (one shard, one pipeline).
    async fn load_user(&self, u: &UserRecord, max_history: usize) -> Result<()> {
        let json = serde_json::to_vec(&u.profile.features).map_err(|e| corrupt(u.id.clone(), e))?;
        let hist = history_key(&u.id);
        let mut p = redis::pipe();
        p.cmd("SET").arg(profile_key(&u.id)).arg(json).ignore();
        p.cmd("DEL").arg(&hist).ignore();
        let recent = crate::newest(&u.profile.history, max_history);
        if !recent.is_empty() {
            p.cmd("RPUSH").arg(&hist).arg(recent).ignore();
        }
        let mut con = self.con();
        p.query_async::<()>(&mut con).await.map_err(|e| self.err(e))
    }

    /// Marks catalogue changes in the `{catalogue}` shard, all at once, and counts them;
    /// returns the new count.
    async fn mark(&self, add_to: &str, remove_from: &str, ids: &[&str]) -> Result<u64> {
        let mut con = self.con();
        let (count,): (u64,) = redis::pipe()
            .atomic()
            .cmd("SADD")
            .arg(add_to)
            .arg(ids)
            .ignore()
            .cmd("SREM")
            .arg(remove_from)
            .arg(ids)
            .ignore()
            .cmd("INCR")
            .arg(SEQ)
            .query_async(&mut con)
            .await
            .map_err(|e| self.err(e))?;
        Ok(count)
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
            let raw = self.get_many(ids).await?;
            raw.into_iter()
                .zip(ids)
                .map(|(v, id)| v.map(|b| serde_json::from_slice(&b).map_err(|e| corrupt(item_key(id), e))).transpose())
                .collect()
        })
    }

    fn user<'a>(&'a self, id: &'a str, max_history: usize) -> StoreFuture<'a, Option<UserProfile>> {
        Box::pin(async move {
            let mut con = self.con();
            let start = -(max_history.max(1) as i64);
            let (profile, hist) = (profile_key(id), history_key(id));
            let (features, history, exists): (Option<Vec<u8>>, Vec<String>, i64) = redis::pipe()
                .cmd("GET")
                .arg(&profile)
                .cmd("LRANGE")
                .arg(&hist)
                .arg(start)
                .arg(-1)
                .cmd("EXISTS")
                .arg(&hist)
                .query_async(&mut con)
                .await
                .map_err(|e| self.err(e))?;
            if features.is_none() && exists == 0 {
                return Ok(None);
            }
            let features = match features {
                Some(b) => serde_json::from_slice(&b).map_err(|e| corrupt(profile, e))?,
                None => Default::default(),
            };
            let history = if max_history == 0 { Vec::new() } else { history };
            Ok(Some(UserProfile { features, history }))
        })
    }

    fn append_event<'a>(&'a self, user: &'a str, item: &'a str, max_history: usize) -> StoreFuture<'a, usize> {
        Box::pin(async move {
            let mut con = self.con();
            let key = history_key(user);
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

    fn load<'a>(&'a self, records: Records<'a>, progress: Progress<'a>) -> StoreFuture<'a, ()> {
        let Records { items, users, max_history } = records;
        Box::pin(async move {
            let mut con = self.con();
            redis::cmd("DEL").arg(TAG).query_async::<()>(&mut con).await.map_err(|e| self.err(e))?;
            let mut done = 0;
            for chunk in items.chunks(LOAD_BATCH) {
                self.set_many(chunk).await?;
                done += chunk.len();
                progress(done);
            }
            // One pipeline per user (its keys share a shard), many in flight on the one
            // multiplexed connection.
            for chunk in users.chunks(LOAD_USERS_IN_FLIGHT) {
                let writes: Vec<_> = chunk.iter().map(|u| self.load_user(u, max_history)).collect();
                futures_util::future::try_join_all(writes).await?;
                done += chunk.len();
                progress(done);
            }
            Ok(())
        })
    }

    fn upsert_items<'a>(&'a self, items: &'a [ItemRecord]) -> StoreFuture<'a, u64> {
        Box::pin(async move {
            if items.is_empty() {
                return self.change_count().await;
            }
            // Details first: once an item is marked live, its details are there to read.
            self.set_many(items).await?;
            let ids: Vec<&str> = items.iter().map(|it| it.id.as_str()).collect();
            self.mark(LIVE, DELETED, &ids).await
        })
    }

    fn delete_items<'a>(&'a self, ids: &'a [&'a str]) -> StoreFuture<'a, (usize, u64)> {
        Box::pin(async move {
            if ids.is_empty() {
                return Ok((0, self.change_count().await?));
            }
            // The deletion mark first: from then on no server applies the item, whatever
            // happens to its details.
            let count = self.mark(DELETED, LIVE, ids).await?;
            Ok((self.del_many(ids).await?, count))
        })
    }

    fn live_changes(&self) -> StoreFuture<'_, LiveChanges> {
        Box::pin(async move {
            let mut con = self.con();
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

    fn change_count(&self) -> StoreFuture<'_, u64> {
        Box::pin(async move {
            let mut con = self.con();
            let n: Option<u64> = redis::cmd("GET").arg(SEQ).query_async(&mut con).await.map_err(|e| self.err(e))?;
            Ok(n.unwrap_or(0))
        })
    }

    fn announce<'a>(&'a self, message: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut con = self.con();
            redis::cmd("PUBLISH")
                .arg(CHANGES_CHANNEL)
                .arg(message)
                .query_async::<()>(&mut con)
                .await
                .map_err(|e| self.err(e))
        })
    }

    fn subscribe(&self) -> Option<tokio::sync::mpsc::Receiver<String>> {
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(relay_announcements(self.nodes.clone(), tx));
        Some(rx)
    }

    fn loaded_tag(&self) -> StoreFuture<'_, Option<String>> {
        Box::pin(async move {
            let mut con = self.con();
            redis::cmd("GET").arg(TAG).query_async(&mut con).await.map_err(|e| self.err(e))
        })
    }

    fn set_loaded_tag<'a>(&'a self, tag: &'a str) -> StoreFuture<'a, ()> {
        Box::pin(async move {
            let mut con = self.con();
            redis::cmd("SET").arg(TAG).arg(tag).query_async(&mut con).await.map_err(|e| self.err(e))
        })
    }
}

/// Forwards the change announcements of one node (any node of a cluster relays every
/// PUBLISH) until the receiver goes; when the node goes away, tries the others in turn. Missed
/// announcements are the periodic re-sync's job.
async fn relay_announcements(nodes: Vec<String>, tx: tokio::sync::mpsc::Sender<String>) {
    let mut at = 0;
    let mut failures = 0u32;
    while !tx.is_closed() {
        let node = &nodes[at % nodes.len()];
        let subscribed = async {
            let client = redis::Client::open(node.as_str())?;
            let mut ps = client.get_async_pubsub().await?;
            ps.subscribe(CHANGES_CHANNEL).await?;
            Ok::<_, redis::RedisError>(ps)
        };
        match tokio::time::timeout(Duration::from_secs(2), subscribed).await {
            Ok(Ok(ps)) => {
                failures = 0;
                let mut messages = ps.into_on_message();
                while let Some(msg) = messages.next().await {
                    let Ok(text) = msg.get_payload::<String>() else { continue };
                    if tx.send(text).await.is_err() {
                        return;
                    }
                }
            }
            _ => failures += 1,
        }
        at += 1;
        let wait = Duration::from_millis((50u64 << failures.min(5)).min(2_000));
        tokio::time::sleep(wait).await;
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

    /// A Redis Cluster for tests: masters, each with `replicas` replicas, on loopback ports.
    pub struct TestCluster {
        /// `redis+cluster://127.0.0.1:P1,…`.
        pub url: String,
        /// Every node's port, masters first.
        pub ports: Vec<u16>,
        children: Vec<Option<Child>>,
        _dir: Option<tempfile::TempDir>,
    }

    impl Drop for TestCluster {
        fn drop(&mut self) {
            for c in self.children.iter_mut().flatten() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// The shared cluster `NEEDLE_TEST_REDIS_CLUSTER` names (CI starts one), else a private
    /// one of 3 masters; `None` without `redis-server` and `redis-cli`.
    pub fn cluster() -> Option<TestCluster> {
        if let Ok(url) = std::env::var("NEEDLE_TEST_REDIS_CLUSTER") {
            return Some(TestCluster { url, ports: Vec::new(), children: Vec::new(), _dir: None });
        }
        private_cluster(3, 0)
    }

    /// A private cluster (the caller may kill its nodes).
    pub fn private_cluster(masters: usize, replicas: usize) -> Option<TestCluster> {
        let n = masters * (1 + replicas);
        let listeners: Vec<_> = (0..n).filter_map(|_| std::net::TcpListener::bind("127.0.0.1:0").ok()).collect();
        let ports: Vec<u16> = listeners.iter().filter_map(|l| l.local_addr().ok()).map(|a| a.port()).collect();
        drop(listeners);
        if ports.len() != n {
            return None;
        }
        let dir = tempfile::tempdir().ok()?;
        let mut cluster = TestCluster {
            url: format!(
                "redis+cluster://{}",
                ports.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>().join(",")
            ),
            ports: ports.clone(),
            children: Vec::new(),
            _dir: None,
        };
        for &port in &ports {
            let p = port.to_string();
            let child = Command::new("redis-server")
                .args(["--port", &p, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
                .args(["--cluster-enabled", "yes", "--cluster-config-file", &format!("nodes-{p}.conf")])
                // Fast failure detection, and a replica that promotes itself however stale.
                .args(["--cluster-node-timeout", "1000", "--cluster-replica-validity-factor", "0"])
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .ok()?;
            cluster.children.push(Some(child));
        }
        cluster._dir = Some(dir);
        for &port in &ports {
            let up = (0..200).any(|_| {
                let ok = std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                ok
            });
            if !up {
                return None;
            }
        }
        let created = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(ports.iter().map(|p| format!("127.0.0.1:{p}")))
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?;
        if !created.success() {
            return None;
        }
        // Every node must agree that all slots are served, and every replica must have synced
        // with its master (so that it can take over), before a test relies on the cluster.
        for &port in &ports {
            let ok = (0..400).any(|_| {
                let p = port.to_string();
                let info = |args: &[&str]| {
                    Command::new("redis-cli")
                        .args(["-p", &p])
                        .args(args)
                        .output()
                        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                        .unwrap_or_default()
                };
                let repl = info(&["info", "replication"]);
                let synced = !repl.contains("role:slave") || repl.contains("master_link_status:up");
                let ok = synced && info(&["cluster", "info"]).contains("cluster_state:ok");
                if !ok {
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                ok
            });
            if !ok {
                return None;
            }
        }
        Some(cluster)
    }

    impl TestCluster {
        /// Kills the node on `port` as a crash would (SIGKILL).
        pub fn kill(&mut self, port: u16) {
            if let Some(i) = self.ports.iter().position(|&p| p == port) {
                if let Some(mut c) = self.children[i].take() {
                    let _ = c.kill();
                    let _ = c.wait();
                }
            }
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
        let mut con = s.con();
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
        s.load(Records { items: &items, users: &users, max_history: 4 }, &|_| {}).await.unwrap();
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
    async fn redis_cluster_store_behaves_like_a_store() {
        let Some(cluster) = testing::cluster() else {
            eprintln!("SKIPPED: no redis-server/redis-cli on PATH and NEEDLE_TEST_REDIS_CLUSTER is not set");
            return;
        };
        let s = RedisStore::connect(&cluster.url).await.unwrap();
        let mut con = s.con();
        // FLUSHALL goes to every master.
        let _: () = redis::cmd("FLUSHALL").query_async(&mut con).await.unwrap();
        crate::conformance::check(&s).await;
        // The keys really spread over the shards: each master holds some items.
        if !cluster.ports.is_empty() {
            for port in &cluster.ports[..3] {
                let c = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
                let mut node = c.get_multiplexed_async_connection().await.unwrap();
                let n: usize = redis::cmd("DBSIZE").query_async(&mut node).await.unwrap();
                assert!(n > 50, "node {port} holds {n} keys");
            }
        }
    }

    #[tokio::test]
    async fn changes_are_counted_and_announced_to_other_processes() {
        let Some(server) = testing::start(2) else {
            eprintln!("SKIPPED: no redis-server binary on PATH and NEEDLE_TEST_REDIS is not set");
            return;
        };
        let (a, b) = (RedisStore::connect(&server.url).await.unwrap(), RedisStore::connect(&server.url).await.unwrap());
        let mut con = a.con();
        let _: () = redis::cmd("FLUSHDB").query_async(&mut con).await.unwrap();
        let mut rx = b.subscribe().expect("Redis relays announcements");
        let before = b.change_count().await.unwrap();
        let item = ItemRecord { id: "x".into(), details: ItemDetails::default() };
        assert_eq!(a.upsert_items(&[item]).await.unwrap(), before + 1);
        assert_eq!(a.delete_items(&["y"]).await.unwrap(), (0, before + 2));
        assert_eq!(b.change_count().await.unwrap(), before + 2);
        // The subscription may take a moment to be in place: announce until one arrives.
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                a.announce("hello").await.unwrap();
                if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
                    return m;
                }
            }
        })
        .await
        .expect("an announcement arrives");
        assert_eq!(got, "hello");
    }

    #[test]
    fn item_keys_carry_their_bucket_as_the_hash_tag() {
        let mut seen = [0usize; ITEM_BUCKETS as usize];
        for id in (0..1600).map(|i| format!("{i}")).chain(["a{i3}b".to_owned(), "}{".to_owned(), String::new()]) {
            let key = item_key(&id);
            // Redis hashes the first `{…}`: the bucket, whatever the id holds.
            let tag = key.split_once('{').unwrap().1.split_once('}').unwrap().0;
            assert_eq!(tag, format!("i{}", item_bucket(&id)), "{key}");
            assert!(key.ends_with(&format!("}}:{id}")), "{key}");
            seen[item_bucket(&id) as usize] += 1;
        }
        // Sequential ids fill every bucket about evenly (100 each).
        assert!(seen.iter().all(|&n| (60..=140).contains(&n)), "{seen:?}");
        let groups = by_bucket(&["1", "2", "1"]);
        assert_eq!(groups.iter().map(Vec::len).sum::<usize>(), 3);
        assert!(groups.iter().any(|g| g.contains(&0) && g.contains(&2)));
    }

    #[tokio::test]
    async fn an_unreachable_server_is_a_clear_error() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let err = RedisStore::connect(&format!("redis://127.0.0.1:{port}")).await.err().expect("must fail");
        assert!(err.to_string().contains(&format!("127.0.0.1:{port}")), "{err}");
    }
}
