//! A load generator for the recall server (`needle bench serve`): keep-alive HTTP/1.1 connections
//! posting `/v1/recall` for a rotating set of users, optionally paced to a target rate (with a
//! surge above it), with optional reloads, bursts of malformed requests, a stream of events, and
//! a slow-header attack from another source address; results overall and per time window.
//!
//! With a target rate each request has a scheduled start, and its latency is measured from that
//! schedule, not from when it was sent, so a stalled server cannot hide its queueing delay
//! (coordinated omission).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub concurrency: usize,
    /// Requests per second over all connections; 0 = as fast as each connection can go.
    pub rate: f64,
    pub k: usize,
    pub users: Vec<String>,
    /// Reloads spread evenly over the run (one in the middle of each of `reloads` equal spans).
    pub reloads: usize,
    /// Malformed requests sent in each burst.
    pub malformed: usize,
    /// Bursts of malformed requests, one in the middle of each of this many equal spans.
    pub malformed_bursts: usize,
    /// Sent with reloads and events, which the server guards.
    pub admin_token: Option<String>,
    /// `POST /v1/events` per second (for the users above and these items) on a connection of
    /// their own; 0 = none.
    pub events_rate: f64,
    pub event_items: Vec<String>,
    /// A period at a multiple of `rate`.
    pub surge: Option<Surge>,
    /// Connections that send request headers a byte at a time.
    pub slow: Option<SlowAttack>,
    /// Report per window of this length (and sample the server's memory and descriptors at
    /// each window's end).
    pub window: Duration,
    /// A filter object sent with every recall (JSON text), e.g. `{"shard": "7"}`.
    pub filter: Option<String>,
}

#[derive(Clone, Copy, Debug)]
pub struct Surge {
    pub start: Duration,
    pub length: Duration,
    pub factor: f64,
}

#[derive(Clone, Copy, Debug)]
pub struct SlowAttack {
    pub connections: usize,
    /// Source address of the attack (any 127.x.y.z on loopback), so the server sees a client
    /// other than the well-formed load.
    pub from: IpAddr,
    /// One header byte per connection this often.
    pub byte_every: Duration,
}

/// What became of the requests scheduled during the surge.
#[derive(Debug, Default, Clone)]
pub struct SurgeReport {
    pub ok: u64,
    pub shed: u64,
    pub failed: u64,
    /// Latencies of the requests answered 200, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
}

/// One window of the run.
#[derive(Debug, Default, Clone)]
pub struct Window {
    pub start_s: f64,
    pub ok: u64,
    pub shed: u64,
    pub failed: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Sampled from `/metrics` at the window's end.
    pub rss: Option<u64>,
    pub fds: Option<u64>,
    pub connections: Option<u64>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub seconds: f64,
    pub ok: u64,
    /// Well-formed requests answered 503 (load shed): the server chose to turn them away.
    pub shed: u64,
    /// Well-formed requests that got neither a 200 nor a 503 (or whose connection failed).
    pub failed: u64,
    /// Paced requests scheduled within the run that were never sent: each connection waits for
    /// its previous answer, so a server that answers too slowly leaves them behind.
    pub unsent: u64,
    /// Latencies of well-formed requests answered 200, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    /// Requests scheduled during the surge, when there is one.
    pub surge: Option<SurgeReport>,
    pub windows: Vec<Window>,
    pub malformed_sent: u64,
    /// Malformed requests answered 4xx with a JSON error.
    pub malformed_rejected: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub events_ok: u64,
    pub events_failed: u64,
    /// Slow connections the attack opened, and how many of them the server closed.
    pub slow_opened: u64,
    pub slow_closed: u64,
    pub rss_start: Option<u64>,
    pub rss_end: Option<u64>,
}

impl LoadReport {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// The `q` quantile in milliseconds (nearest rank).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.latencies_us, q)
    }
}

/// The `q` quantile of sorted microsecond latencies, in milliseconds (nearest rank).
pub fn quantile_ms(sorted_us: &[u32], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return f64::NAN;
    }
    let i = ((q * sorted_us.len() as f64).ceil() as usize).clamp(1, sorted_us.len()) - 1;
    sorted_us[i] as f64 / 1e3
}

/// One keep-alive HTTP/1.1 connection.
struct Conn {
    reader: BufReader<TcpStream>,
    line: String,
    body: Vec<u8>,
}

impl Conn {
    async fn open(addr: SocketAddr) -> std::io::Result<Conn> {
        let s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        Ok(Conn { reader: BufReader::new(s), line: String::new(), body: Vec::new() })
    }

    /// Sends one request and reads the whole response; returns the status code. The body is
    /// left in `self.body`.
    async fn request(&mut self, method: &str, path: &str, body: &[u8], close: bool) -> std::io::Result<u16> {
        self.request_as(method, path, body, close, None).await
    }

    /// [`Conn::request`] with the admin token.
    async fn request_as(
        &mut self,
        method: &str,
        path: &str,
        body: &[u8],
        close: bool,
        token: Option<&str>,
    ) -> std::io::Result<u16> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nhost: needle\r\ncontent-type: application/json\r\ncontent-length: {}\r\n{}{}\r\n",
            body.len(),
            if close { "connection: close\r\n" } else { "" },
            token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default()
        );
        let s = self.reader.get_mut();
        s.write_all(head.as_bytes()).await?;
        s.write_all(body).await?;
        self.line.clear();
        self.reader.read_line(&mut self.line).await?;
        let status: u16 = self
            .line
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {:?}", self.line)))?;
        let mut len = 0usize;
        loop {
            self.line.clear();
            if self.reader.read_line(&mut self.line).await? == 0 {
                return Err(std::io::Error::other("connection closed in headers"));
            }
            let l = self.line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((name, value)) = l.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    len = value.trim().parse().map_err(std::io::Error::other)?;
                }
            }
        }
        self.body.resize(len, 0);
        self.reader.read_exact(&mut self.body).await?;
        Ok(status)
    }
}

/// Gauges read from the server's `/metrics`.
#[derive(Default)]
struct Gauges {
    rss: Option<u64>,
    fds: Option<u64>,
    connections: Option<u64>,
}

async fn scrape(addr: SocketAddr) -> Gauges {
    let Ok(mut c) = Conn::open(addr).await else { return Gauges::default() };
    if c.request("GET", "/metrics", b"", true).await.is_err() {
        return Gauges::default();
    }
    let text = String::from_utf8_lossy(&c.body).into_owned();
    let gauge = |name: &str| {
        text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).map(|v| v as u64)
    };
    Gauges {
        rss: gauge("process_resident_memory_bytes"),
        fds: gauge("process_open_fds"),
        connections: gauge("needle_connections"),
    }
}

/// What one well-formed request came to, by its scheduled time (ms from the start).
enum Outcome {
    Ok { at_ms: u32, latency_us: u32 },
    Shed { at_ms: u32 },
    Failed { at_ms: u32 },
}

/// One slow connection, reopened whenever the server closes it, until `deadline`.
async fn slow_connection(
    addr: SocketAddr,
    attack: SlowAttack,
    deadline: Instant,
    opened: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
) {
    let header = b"POST /v1/recall HTTP/1.1\r\nhost: needle\r\ncontent-type: application/json\r\nx-padding: ";
    while Instant::now() < deadline {
        let socket = match if attack.from.is_ipv4() { TcpSocket::new_v4() } else { TcpSocket::new_v6() } {
            Ok(s) => s,
            Err(_) => return,
        };
        let connected = match socket.bind(SocketAddr::new(attack.from, 0)) {
            Ok(()) => tokio::time::timeout(Duration::from_secs(1), socket.connect(addr)).await,
            Err(_) => return,
        };
        let Ok(Ok(mut stream)) = connected else {
            tokio::time::sleep(attack.byte_every).await;
            continue;
        };
        opened.fetch_add(1, Relaxed);
        let mut buf = [0u8; 256];
        let mut sent = 0;
        loop {
            let byte = &header[sent % header.len()..][..1];
            if stream.write_all(byte).await.is_err() {
                break;
            }
            sent += 1;
            // A read that ends (0 bytes, an error, or a response) means the server gave up on us.
            match tokio::time::timeout(attack.byte_every, stream.read(&mut buf)).await {
                Err(_) if Instant::now() < deadline => continue,
                Err(_) => return,
                Ok(_) => break,
            }
        }
        closed.fetch_add(1, Relaxed);
        // Reconnect after a pause, as an attacker that wants to stay unnoticed would.
        tokio::time::sleep(attack.byte_every).await;
    }
}

/// The malformed requests of the burst, cycled: each must be answered 4xx.
fn malformed_bodies(max_body: usize) -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("/v1/recall", b"{\"user_id\": \"1\", \"k\": ".to_vec()),
        ("/v1/recall", b"{\"user_id\": \"1\", \"k\": \"ten\"}".to_vec()),
        ("/v1/recall", b"{\"user_id\": \"1\", \"k\": 0}".to_vec()),
        ("/v1/recall", b"{\"user_id\": \"1\", \"k\": 100000000}".to_vec()),
        ("/v1/recall", b"{\"history\": [\"no-such-item-1\", \"no-such-item-2\"]}".to_vec()),
        ("/v1/recall", b"{\"user_id\": [1, 2]}".to_vec()),
        ("/v1/recall", b"[1, 2, 3]".to_vec()),
        ("/v1/recall", b"".to_vec()),
        ("/v1/recall", format!("{{\"history\": [\"{}\"]}}", "9".repeat(max_body)).into_bytes()),
        ("/v1/events", b"{\"user_id\": \"1\"}".to_vec()),
        ("/v1/events", b"{\"user_id\": \"1\", \"item_id\": \"no-such-item\"}".to_vec()),
        ("/v1/nope", b"{}".to_vec()),
    ]
}

/// When request `n` of the run is due, from the start: requests arrive evenly at `rate`, and at
/// `rate × factor` during the surge. `None` when the run is not paced.
fn schedule(opts: &LoadOptions, n: usize) -> Option<Duration> {
    if opts.rate <= 0.0 {
        return None;
    }
    let (n, r) = (n as f64, opts.rate);
    let secs = match opts.surge {
        Some(s) => {
            let (t0, len) = (s.start.as_secs_f64(), s.length.as_secs_f64());
            let (before, during) = (r * t0, r * s.factor * len);
            if n < before {
                n / r
            } else if n < before + during {
                t0 + (n - before) / (r * s.factor)
            } else {
                t0 + len + (n - before - during) / r
            }
        }
        None => n / r,
    };
    Some(Duration::from_secs_f64(secs))
}

/// Runs the load and returns what it measured.
pub async fn run(opts: LoadOptions) -> std::io::Result<LoadReport> {
    if opts.users.is_empty() || opts.concurrency == 0 {
        return Err(std::io::Error::other("need at least one user id and one connection"));
    }
    if opts.events_rate > 0.0 && opts.event_items.is_empty() {
        return Err(std::io::Error::other("events need at least one item id"));
    }
    let mut probe = Conn::open(opts.addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot reach needle serve at {}: {e}", opts.addr)))?;
    let status = probe.request("GET", "/healthz", b"", true).await?;
    if status != 200 {
        return Err(std::io::Error::other(format!("{} answered /healthz with {status}", opts.addr)));
    }
    let mut report = LoadReport { rss_start: scrape(opts.addr).await.rss, ..Default::default() };
    let start = Instant::now();
    let deadline = start + opts.duration;
    let (slow_opened, slow_closed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    // The attack runs on a thread and runtime of its own, as it would from another machine: its
    // thousands of sockets must not delay the measured requests inside the load generator.
    let attack = match opts.slow {
        Some(attack) => {
            let (o, c, addr) = (slow_opened.clone(), slow_closed.clone(), opts.addr);
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            Some(std::thread::spawn(move || {
                rt.block_on(async move {
                    let conns: Vec<_> = (0..attack.connections)
                        .map(|_| tokio::spawn(slow_connection(addr, attack, deadline, o.clone(), c.clone())))
                        .collect();
                    for h in conns {
                        let _ = h.await;
                    }
                })
            }))
        }
        None => None,
    };
    let mut workers = Vec::new();
    for c in 0..opts.concurrency {
        let opts = opts.clone();
        workers.push(tokio::spawn(async move {
            let mut out = Vec::new();
            let mut conn: Option<Conn> = None;
            // Request n of the whole run belongs to connection n mod concurrency, so the paced
            // requests stay spread over time whatever the rate does.
            let mut n = c;
            while Instant::now() < deadline {
                let scheduled = match schedule(&opts, n) {
                    Some(at) => {
                        let at = start + at;
                        if at >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(at.into()).await;
                        at
                    }
                    None => Instant::now(),
                };
                let at_ms = scheduled.saturating_duration_since(start).as_millis() as u32;
                let user = &opts.users[n % opts.users.len()];
                n += opts.concurrency;
                let body = match &opts.filter {
                    None => format!("{{\"user_id\":{},\"k\":{}}}", serde_json::Value::from(user.as_str()), opts.k),
                    Some(f) => format!(
                        "{{\"user_id\":{},\"k\":{},\"filter\":{f}}}",
                        serde_json::Value::from(user.as_str()),
                        opts.k
                    ),
                };
                if conn.is_none() {
                    conn = Conn::open(opts.addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(c) => c.request("POST", "/v1/recall", body.as_bytes(), false).await.ok(),
                    None => None,
                };
                match status {
                    Some(200) => {
                        let latency_us = scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32;
                        out.push(Outcome::Ok { at_ms, latency_us });
                    }
                    Some(503) => out.push(Outcome::Shed { at_ms }),
                    _ => {
                        out.push(Outcome::Failed { at_ms });
                        conn = None;
                    }
                }
            }
            let mut unsent = 0u64;
            while schedule(&opts, n).is_some_and(|at| at < opts.duration) {
                unsent += 1;
                n += opts.concurrency;
            }
            (out, unsent)
        }));
    }
    let reloads = {
        let opts = opts.clone();
        tokio::spawn(async move {
            let (mut okn, mut bad) = (0, 0);
            for r in 0..opts.reloads {
                // Midway between evenly spaced marks, so reloads fall between the windows' ends,
                // where the server's memory is sampled, not on them.
                let at = start + opts.duration.mul_f64((r as f64 + 0.5) / opts.reloads as f64);
                tokio::time::sleep_until(at.into()).await;
                let status = match Conn::open(opts.addr).await {
                    Ok(mut c) => {
                        c.request_as("POST", "/admin/reload", b"", true, opts.admin_token.as_deref()).await.ok()
                    }
                    Err(_) => None,
                };
                if status == Some(200) {
                    okn += 1
                } else {
                    bad += 1
                }
            }
            (okn, bad)
        })
    };
    let bursts = {
        let opts = opts.clone();
        tokio::spawn(async move {
            let bodies = malformed_bodies(70 * 1024);
            let (mut sent, mut rejected) = (0u64, 0u64);
            let n_bursts = if opts.malformed > 0 { opts.malformed_bursts.max(1) } else { 0 };
            for b in 0..n_bursts {
                let at = start + opts.duration.mul_f64((b as f64 + 0.5) / n_bursts as f64);
                tokio::time::sleep_until(at.into()).await;
                for n in 0..opts.malformed {
                    let (path, body) = &bodies[n % bodies.len()];
                    sent += 1;
                    if let Ok(mut c) = Conn::open(opts.addr).await {
                        if let Ok(status) = c.request_as("POST", path, body, true, opts.admin_token.as_deref()).await {
                            let json_error = serde_json::from_slice::<serde_json::Value>(&c.body)
                                .map(|v| v["error"]["message"].is_string())
                                .unwrap_or(false);
                            if (400..500).contains(&status) && json_error {
                                rejected += 1;
                            }
                        }
                    }
                }
            }
            (sent, rejected)
        })
    };
    let events = {
        let opts = opts.clone();
        tokio::spawn(async move {
            let (mut okn, mut bad) = (0u64, 0u64);
            if opts.events_rate <= 0.0 {
                return (okn, bad);
            }
            let gap = Duration::from_secs_f64(1.0 / opts.events_rate);
            let mut conn: Option<Conn> = None;
            let mut next = start;
            let mut n = 0usize;
            while next < deadline {
                tokio::time::sleep_until(next.into()).await;
                let user = &opts.users[(n * 7919) % opts.users.len()];
                let item = &opts.event_items[(n * 104_729) % opts.event_items.len()];
                n += 1;
                let body = serde_json::json!({"user_id": user, "item_id": item}).to_string();
                if conn.is_none() {
                    conn = Conn::open(opts.addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(c) => c
                        .request_as("POST", "/v1/events", body.as_bytes(), false, opts.admin_token.as_deref())
                        .await
                        .ok(),
                    None => None,
                };
                if status == Some(200) {
                    okn += 1;
                } else {
                    bad += 1;
                    conn = None;
                }
                next += gap;
            }
            (okn, bad)
        })
    };
    // Server gauges at the end of every window.
    let monitor = {
        let opts = opts.clone();
        tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut at = start + opts.window;
            while at <= deadline + opts.window / 2 {
                tokio::time::sleep_until(at.into()).await;
                samples.push(scrape(opts.addr).await);
                at += opts.window;
            }
            samples
        })
    };
    let mut outcomes = Vec::new();
    for w in workers {
        let (out, unsent) = w.await.map_err(std::io::Error::other)?;
        outcomes.extend(out);
        report.unsent += unsent;
    }
    report.seconds = start.elapsed().as_secs_f64();
    if let Some(a) = attack {
        a.join().map_err(|_| std::io::Error::other("the slow-header attack thread panicked"))?;
    }
    (report.reloads_ok, report.reloads_failed) = reloads.await.map_err(std::io::Error::other)?;
    (report.malformed_sent, report.malformed_rejected) = bursts.await.map_err(std::io::Error::other)?;
    (report.events_ok, report.events_failed) = events.await.map_err(std::io::Error::other)?;
    let samples = monitor.await.map_err(std::io::Error::other)?;
    report.slow_opened = slow_opened.load(Relaxed);
    report.slow_closed = slow_closed.load(Relaxed);
    let window_ms = opts.window.as_millis().max(1) as u32;
    let n_windows = opts.duration.as_millis().div_ceil(window_ms as u128).max(1) as usize;
    let mut per_window: Vec<(Window, Vec<u32>)> = (0..n_windows)
        .map(|w| {
            let g = samples.get(w);
            let win = Window {
                start_s: w as f64 * opts.window.as_secs_f64(),
                rss: g.and_then(|g| g.rss),
                fds: g.and_then(|g| g.fds),
                connections: g.and_then(|g| g.connections),
                ..Default::default()
            };
            (win, Vec::new())
        })
        .collect();
    let surge_ms = opts.surge.map(|s| s.start.as_millis() as u32..(s.start + s.length).as_millis() as u32);
    let mut surge = SurgeReport::default();
    for o in outcomes {
        let at_ms = match o {
            Outcome::Ok { at_ms, .. } | Outcome::Shed { at_ms } | Outcome::Failed { at_ms } => at_ms,
        };
        let (win, lat) = &mut per_window[((at_ms / window_ms) as usize).min(n_windows - 1)];
        let in_surge = surge_ms.as_ref().is_some_and(|r| r.contains(&at_ms));
        match o {
            Outcome::Ok { latency_us, .. } => {
                report.ok += 1;
                win.ok += 1;
                lat.push(latency_us);
                report.latencies_us.push(latency_us);
                if in_surge {
                    surge.ok += 1;
                    surge.latencies_us.push(latency_us);
                }
            }
            Outcome::Shed { .. } => {
                report.shed += 1;
                win.shed += 1;
                surge.shed += u64::from(in_surge);
            }
            Outcome::Failed { .. } => {
                report.failed += 1;
                win.failed += 1;
                surge.failed += u64::from(in_surge);
            }
        }
    }
    if surge_ms.is_some() {
        surge.latencies_us.sort_unstable();
        report.surge = Some(surge);
    }
    report.windows = per_window
        .into_iter()
        .map(|(mut w, mut lat)| {
            lat.sort_unstable();
            (w.p50_ms, w.p99_ms, w.max_ms) = (quantile_ms(&lat, 0.5), quantile_ms(&lat, 0.99), quantile_ms(&lat, 1.0));
            w
        })
        .collect();
    report.latencies_us.sort_unstable();
    report.rss_end = scrape(opts.addr).await.rss;
    Ok(report)
}
