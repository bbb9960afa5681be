//! A load generator for the recall server (`needle bench serve`): keep-alive HTTP/1.1 connections
//! posting `/v1/recall` for a rotating set of users, optionally paced to a target rate, with
//! optional reloads and a burst of malformed requests during the run.
//!
//! With a target rate each request has a scheduled start, and its latency is measured from that
//! schedule, not from when it was sent, so a stalled server cannot hide its queueing delay
//! (coordinated omission).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Clone, Debug)]
pub struct LoadOptions {
    pub addr: SocketAddr,
    pub duration: Duration,
    pub concurrency: usize,
    /// Requests per second over all connections; 0 = as fast as each connection can go.
    pub rate: f64,
    pub k: usize,
    pub users: Vec<String>,
    /// Reloads spread evenly over the run.
    pub reloads: usize,
    /// Malformed requests sent in one burst at mid-run.
    pub malformed: usize,
    /// Sent with reloads and events, which the server guards.
    pub admin_token: Option<String>,
}

#[derive(Debug, Default)]
pub struct LoadReport {
    pub seconds: f64,
    pub ok: u64,
    /// Well-formed requests that did not get a 200 (or whose connection failed).
    pub failed: u64,
    /// Latencies of well-formed requests, in microseconds, sorted.
    pub latencies_us: Vec<u32>,
    pub malformed_sent: u64,
    /// Malformed requests answered 4xx with a JSON error.
    pub malformed_rejected: u64,
    pub reloads_ok: u64,
    pub reloads_failed: u64,
    pub rss_start: Option<u64>,
    pub rss_end: Option<u64>,
}

impl LoadReport {
    pub fn rps(&self) -> f64 {
        self.ok as f64 / self.seconds
    }

    /// The `q` quantile in milliseconds (nearest rank).
    pub fn quantile_ms(&self, q: f64) -> f64 {
        if self.latencies_us.is_empty() {
            return f64::NAN;
        }
        let i = ((q * self.latencies_us.len() as f64).ceil() as usize).clamp(1, self.latencies_us.len()) - 1;
        self.latencies_us[i] as f64 / 1e3
    }
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

async fn scrape_rss(addr: SocketAddr) -> Option<u64> {
    let mut c = Conn::open(addr).await.ok()?;
    c.request("GET", "/metrics", b"", true).await.ok()?;
    let text = String::from_utf8_lossy(&c.body).into_owned();
    text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")?.trim().parse().ok())
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

/// Runs the load and returns what it measured.
pub async fn run(opts: LoadOptions) -> std::io::Result<LoadReport> {
    if opts.users.is_empty() || opts.concurrency == 0 {
        return Err(std::io::Error::other("need at least one user id and one connection"));
    }
    let mut probe = Conn::open(opts.addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot reach needle serve at {}: {e}", opts.addr)))?;
    let status = probe.request("GET", "/healthz", b"", true).await?;
    if status != 200 {
        return Err(std::io::Error::other(format!("{} answered /healthz with {status}", opts.addr)));
    }
    let mut report = LoadReport { rss_start: scrape_rss(opts.addr).await, ..Default::default() };
    let start = Instant::now();
    let deadline = start + opts.duration;
    let failed = Arc::new(AtomicU64::new(0));
    let mut workers = Vec::new();
    for c in 0..opts.concurrency {
        let (opts, failed) = (opts.clone(), failed.clone());
        workers.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut ok = 0u64;
            let mut conn: Option<Conn> = None;
            let interval = (opts.rate > 0.0).then(|| Duration::from_secs_f64(opts.concurrency as f64 / opts.rate));
            // Connections start staggered over one interval so paced requests do not arrive in waves.
            let mut next = start + interval.map(|i| i.mul_f64(c as f64 / opts.concurrency as f64)).unwrap_or_default();
            let mut i = c;
            while Instant::now() < deadline {
                if interval.is_some() {
                    tokio::time::sleep_until(next.into()).await;
                }
                let scheduled = if interval.is_some() { next } else { Instant::now() };
                let user = &opts.users[i % opts.users.len()];
                i += opts.concurrency;
                let body = format!("{{\"user_id\":{},\"k\":{}}}", serde_json::Value::from(user.as_str()), opts.k);
                if conn.is_none() {
                    conn = Conn::open(opts.addr).await.ok();
                }
                let status = match conn.as_mut() {
                    Some(c) => c.request("POST", "/v1/recall", body.as_bytes(), false).await.ok(),
                    None => None,
                };
                if status == Some(200) {
                    ok += 1;
                    lat.push(scheduled.elapsed().as_micros().min(u32::MAX as u128) as u32);
                } else {
                    failed.fetch_add(1, Relaxed);
                    conn = None;
                }
                if let Some(iv) = interval {
                    next += iv;
                }
            }
            (ok, lat)
        }));
    }
    let reloads = {
        let opts = opts.clone();
        tokio::spawn(async move {
            let (mut okn, mut bad) = (0, 0);
            for r in 0..opts.reloads {
                let at = start + opts.duration.mul_f64((r + 1) as f64 / (opts.reloads + 1) as f64);
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
    let burst = {
        let opts = opts.clone();
        tokio::spawn(async move {
            tokio::time::sleep_until((start + opts.duration / 2).into()).await;
            let bodies = malformed_bodies(70 * 1024);
            let (mut sent, mut rejected) = (0u64, 0u64);
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
            (sent, rejected)
        })
    };
    for w in workers {
        let (ok, lat) = w.await.map_err(std::io::Error::other)?;
        report.ok += ok;
        report.latencies_us.extend(lat);
    }
    report.seconds = start.elapsed().as_secs_f64();
    (report.reloads_ok, report.reloads_failed) = reloads.await.map_err(std::io::Error::other)?;
    (report.malformed_sent, report.malformed_rejected) = burst.await.map_err(std::io::Error::other)?;
    report.failed = failed.load(Relaxed);
    report.latencies_us.sort_unstable();
    report.rss_end = scrape_rss(opts.addr).await;
    Ok(report)
}
