//! `needle serve`, `needle store load` and `needle bench serve`: the online side.

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use needle_serve::auth::{AdminAuth, AdminToken, TOKEN_FILE};
use needle_serve::engine::StoreContents;
use needle_serve::http::EMBEDDED_STORE_FILE;
use needle_serve::loadgen::{self, LoadOptions, SlowAttack, Surge};
use needle_serve::{Limits, ServeOptions};
use needle_store::StoreSpec;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Parses `30s`, `500ms`, `2m` or a plain number of seconds.
/// Like [`parse_duration`], and also takes `0` (for limits that zero turns off).
pub fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    parse_duration(s)
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, scale) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60.0)
    } else {
        (s, 1.0)
    };
    match num.trim().parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 => Ok(Duration::from_secs_f64(v * scale)),
        _ => Err(format!("{s:?} is not a duration (e.g. 30s, 500ms, 2m)")),
    }
}

fn runtime(workers: Option<usize>) -> Result<tokio::runtime::Runtime> {
    let mut b = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = workers.filter(|&n| n > 0) {
        b.worker_threads(n);
    }
    b.enable_all().build().context("cannot start the async runtime")
}

fn init_logs(level: &str) -> Result<()> {
    let level: tracing::Level = level.parse().map_err(|_| anyhow::anyhow!("unknown log level {level:?}"))?;
    tracing_subscriber::fmt().with_max_level(level).with_writer(std::io::stderr).with_target(false).init();
    Ok(())
}

/// The flags of `needle serve`.
#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// `embedded` (RUN/store.redb, filled from the run's data on first start), a `.redb`
    /// path, or `redis://HOST:PORT`.
    #[arg(long, default_value = "embedded")]
    pub store: String,
    /// Serve this index file instead of RUN/index.bin.
    #[arg(long)]
    pub index: Option<PathBuf>,
    /// Mix the recall channels of this file (TOML, as `needle eval --channels` reads) into
    /// every answer; each item then lists the channels that found it.
    #[arg(long)]
    pub channels: Option<PathBuf>,
    /// Search effort of the served index instead of the one it was built with (IVF `nprobe`,
    /// HNSW `ef_search`): fewer lists or a narrower walk answer faster at lower recall.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub effort: Option<u64>,
    /// Largest k a request may ask for.
    #[arg(long, default_value_t = 1000)]
    pub max_k: usize,
    /// Longest history a request may send.
    #[arg(long, default_value_t = 1000)]
    pub max_history: usize,
    /// Items of each user's history the store keeps when more than the model reads
    /// (`max_seq_len`): a recall leaves out as seen only what was kept, so this many of a user's
    /// newest items are never recalled again (0: the model's window). Costs store memory per user.
    #[arg(long, default_value_t = 0)]
    pub seen_history: usize,
    /// Largest request body in bytes.
    #[arg(long, default_value_t = 65536)]
    pub max_body_bytes: usize,
    /// Per-request time limit (e.g. 2s, 500ms).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub timeout: Duration,
    /// Requests handled at once; more are answered 503 with Retry-After instead of queueing.
    #[arg(long, default_value_t = 256)]
    pub max_in_flight: usize,
    /// Answer a recall 503 with Retry-After at once when it would wait longer than this for a
    /// compute thread (user tower and index search); 0 = never.
    #[arg(long, default_value = "5ms", value_parser = parse_duration_or_zero)]
    pub max_queue_wait: Duration,
    /// Threads that run user towers and index searches (0 = one per core).
    #[arg(long, default_value_t = 0)]
    pub compute_threads: usize,
    /// Client connections open at once; more wait in the accept queue.
    #[arg(long, default_value_t = 1024)]
    pub max_connections: usize,
    /// Connections one client address may hold (0 = no limit; keep 0 behind a proxy).
    #[arg(long, default_value_t = 0)]
    pub max_connections_per_client: usize,
    /// Close a connection whose request is not read (headers and body) within this time of
    /// its first byte: slow senders cannot hold connections.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub request_read_timeout: Duration,
    /// Close a connection idle this long between requests.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// error, warn, info, debug (one line per request) or trace.
    #[arg(long, default_value = "info")]
    pub log_level: String,
    /// The token `/admin/*` and `/v1/events` require (`Authorization: Bearer TOKEN`); also
    /// read from $NEEDLE_ADMIN_TOKEN. Without one, a random token is kept in RUN/admin.token.
    #[arg(long, value_name = "TOKEN")]
    pub admin_token: Option<String>,
    /// Read the admin token from this file.
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
    /// Let anyone who reaches the port post events and reload models.
    #[arg(long)]
    pub no_admin_auth: bool,
    /// The version name `--run` is served as (default: the run directory's name).
    #[arg(long, value_name = "NAME")]
    pub version_name: Option<String>,
    /// Serve another run side by side as version NAME (repeatable); it gets traffic only from
    /// `--traffic` or `POST /admin/traffic`.
    #[arg(long, value_name = "NAME=RUN")]
    pub add_version: Vec<String>,
    /// Traffic weights by version, e.g. `youtubednn=90,canary=10`; users are split by a stable
    /// hash of their id (default: all to `--run`).
    #[arg(long, value_name = "NAME=W,...", value_parser = needle_serve::versions::parse_weights)]
    pub traffic: Option<std::collections::BTreeMap<String, u32>>,
    /// With Redis shared by several servers: how often to check for catalogue changes whose
    /// pub/sub announcement this server missed (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub resync_every: Duration,
    /// Items published while serving are scanned exactly until this many have gathered; then a
    /// background thread compacts them into a graph of their own (0 = never).
    #[arg(long, default_value_t = needle_serve::engine::DEFAULT_COMPACT_AT)]
    pub compact_live_at: usize,
}

/// The variable a token may also come from, so that it stays out of shell history and `ps`.
pub const TOKEN_ENV: &str = "NEEDLE_ADMIN_TOKEN";

/// The server's guard: `--admin-token`, `--admin-token-file`, `$NEEDLE_ADMIN_TOKEN`, or else a
/// token kept in `RUN/admin.token` (written on first start); `--no-admin-auth` opens the routes.
fn admin_auth(f: &ServeArgs) -> Result<AdminAuth> {
    let env = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty());
    let given = usize::from(f.admin_token.is_some()) + usize::from(f.admin_token_file.is_some());
    if given > 1 {
        bail!("give the admin token once: --admin-token or --admin-token-file");
    }
    if f.no_admin_auth {
        if given > 0 {
            bail!("--no-admin-auth opens the admin routes; it cannot go with an admin token");
        }
        tracing::warn!("--no-admin-auth: anyone who reaches this port can post events and reload models");
        return Ok(AdminAuth::Open);
    }
    let token = match (f.admin_token.as_deref(), f.admin_token_file.as_deref(), env) {
        (Some(t), _, _) => AdminToken::new(t)?,
        (None, Some(p), _) => AdminToken::from_file(p)?,
        (None, None, Some(t)) => AdminToken::new(&t).with_context(|| format!("${TOKEN_ENV}"))?,
        (None, None, None) => {
            let path = f.run.join(TOKEN_FILE);
            let token = AdminToken::load_or_create(&path)?;
            tracing::info!("admin token in {} (send it as `Authorization: Bearer <token>`)", path.display());
            token
        }
    };
    Ok(AdminAuth::Token(token))
}

/// The token a client of `needle serve` sends to guarded routes: `--admin-token-file`, else
/// `$NEEDLE_ADMIN_TOKEN`, else the one the server keeps beside the run, if any.
fn client_token(run: &Path, file: Option<&Path>) -> Result<Option<String>> {
    if let Some(p) = file {
        let t =
            std::fs::read_to_string(p).with_context(|| format!("cannot read the admin token from {}", p.display()))?;
        return Ok(Some(t.trim().to_owned()));
    }
    if let Some(t) = std::env::var(TOKEN_ENV).ok().filter(|t| !t.trim().is_empty()) {
        return Ok(Some(t.trim().to_owned()));
    }
    Ok(std::fs::read_to_string(run.join(TOKEN_FILE)).ok().map(|t| t.trim().to_owned()))
}

/// `threads`: the async workers (`--threads`; default one per core).
pub fn serve(f: ServeArgs, threads: Option<usize>) -> Result<()> {
    init_logs(&f.log_level)?;
    let store: StoreSpec = f.store.parse()?;
    let auth = admin_auth(&f)?;
    let versions = f
        .add_version
        .iter()
        .map(|v| match v.split_once('=') {
            Some((name, run)) if !name.is_empty() && !run.is_empty() => Ok((name.to_owned(), PathBuf::from(run))),
            _ => bail!("--add-version {v:?} is not NAME=RUN"),
        })
        .collect::<Result<Vec<_>>>()?;
    let opts = ServeOptions {
        name: f.version_name,
        versions,
        traffic: f.traffic,
        resync_every: f.resync_every,
        compact_live_at: f.compact_live_at,
        limits: Limits {
            max_k: f.max_k,
            max_history: f.max_history,
            seen_history: f.seen_history,
            max_body_bytes: f.max_body_bytes,
            timeout: f.timeout,
            max_in_flight: f.max_in_flight,
            max_queue_wait: f.max_queue_wait,
            compute_threads: f.compute_threads,
        },
        conn: needle_serve::conn::ConnLimits {
            max_connections: f.max_connections,
            max_per_client: f.max_connections_per_client,
            request_read_timeout: f.request_read_timeout,
            idle_timeout: f.idle_timeout,
        },
        run: f.run,
        data_dir: f.data_dir,
        index: f.index,
        channels: f.channels,
        effort: f.effort.map(|e| e as usize),
        store,
        addr: f.addr,
        auth,
    };
    runtime(threads)?.block_on(needle_serve::serve(opts))?;
    Ok(())
}

pub fn store_load(run: &Path, data_dir: Option<&Path>, store: &str) -> Result<()> {
    let spec: StoreSpec = store.parse()?;
    let contents = StoreContents::of_run(&needle_train::run::read_info(run)?, data_dir)?;
    let rt = runtime(Some(1))?;
    rt.block_on(async {
        let s = needle_store::open(&spec, &run.join(EMBEDDED_STORE_FILE)).await?;
        let (items, users) = (contents.items.len(), contents.users.len());
        let bar = ProgressBar::new((items + users) as u64).with_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_message(format!("loading {}", s.describe()));
        let t = std::time::Instant::now();
        contents.write_to(&*s, &|n| bar.set_position(n as u64)).await?;
        bar.finish_and_clear();
        eprintln!(
            "loaded {items} items and {users} users (histories capped at {}) into {} in {:.2}s",
            contents.max_history,
            s.describe(),
            t.elapsed().as_secs_f64()
        );
        Ok::<_, anyhow::Error>(())
    })
}

#[derive(clap::Args)]
pub struct BenchServeFlags {
    /// The run being served (its user ids are sent).
    #[arg(long)]
    pub run: PathBuf,
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Target requests/s over all connections (0 = as fast as possible); latency is then
    /// measured from each request's scheduled start.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,
    #[arg(long, default_value_t = 100)]
    pub k: usize,
    /// POST /admin/reload this many times, spread over the run.
    #[arg(long, default_value_t = 0)]
    pub reloads: usize,
    /// Malformed requests per burst (each must get a 4xx).
    #[arg(long, default_value_t = 0)]
    pub malformed: usize,
    /// Bursts of malformed requests, spread over the run.
    #[arg(long, default_value_t = 1)]
    pub malformed_bursts: usize,
    /// POST /v1/events per second for the run's users and items, on a connection of its own.
    #[arg(long, default_value_t = 0.0)]
    pub events_rate: f64,
    /// Multiply the rate by this factor during the surge (with --surge-at and --surge-for).
    #[arg(long, default_value_t = 3.0)]
    pub surge_factor: f64,
    #[arg(long, value_parser = parse_duration)]
    pub surge_at: Option<Duration>,
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub surge_for: Duration,
    /// Hold this many connections that send their headers one byte at a time.
    #[arg(long, default_value_t = 0)]
    pub slow_connections: usize,
    /// Source address of the slow connections (another client as the server sees it).
    #[arg(long, default_value = "127.0.0.2")]
    pub slow_from: std::net::IpAddr,
    /// One header byte per slow connection this often.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub slow_byte_every: Duration,
    /// Print a row per window of this length (p99, shed, server memory and descriptors).
    #[arg(long, value_parser = parse_duration)]
    pub window: Option<Duration>,
    /// Send this filter (a JSON object) with every recall, e.g. `{"shard": "7"}` on an index
    /// padded with synthetic items (1% of them).
    #[arg(long, value_parser = parse_filter)]
    pub filter: Option<String>,
    /// The admin token for reloads and events (default: $NEEDLE_ADMIN_TOKEN, else the
    /// server's RUN/admin.token).
    #[arg(long, value_name = "PATH")]
    pub admin_token_file: Option<PathBuf>,
}

fn parse_filter(s: &str) -> Result<String, String> {
    match serde_json::from_str::<serde_json::Value>(s) {
        Ok(v) if v.is_object() => Ok(v.to_string()),
        Ok(_) => Err("a filter is a JSON object, e.g. {\"genres\": \"Comedy\"}".into()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

/// The raw ids of one of the run's vocabularies (`users`, `items`), padding left out.
fn vocab_ids(run: &Path, name: &str) -> Result<Vec<String>> {
    let path = run.join("vocab").join(format!("{name}.tsv"));
    let vocab =
        needle_data::Vocab::load(&path).with_context(|| format!("cannot read the ids in {}", path.display()))?;
    Ok(vocab.iter().skip(1).map(|(_, s)| s.to_owned()).collect())
}

pub fn bench_serve(f: BenchServeFlags) -> Result<()> {
    let run = f.run.as_path();
    let users = vocab_ids(run, "users")?;
    if users.is_empty() {
        bail!("{} has no users to send", run.display());
    }
    let event_items = if f.events_rate > 0.0 { vocab_ids(run, "items")? } else { Vec::new() };
    let surge = f.surge_at.map(|start| Surge { start, length: f.surge_for, factor: f.surge_factor });
    if surge.is_some() && f.rate <= 0.0 {
        bail!("--surge-at needs a paced run (--rate)");
    }
    let slow = (f.slow_connections > 0).then_some(SlowAttack {
        connections: f.slow_connections,
        from: f.slow_from,
        byte_every: f.slow_byte_every,
    });
    let opts = LoadOptions {
        addr: f.addr,
        duration: f.duration,
        concurrency: f.concurrency,
        rate: f.rate,
        k: f.k,
        users,
        reloads: f.reloads,
        malformed: f.malformed,
        malformed_bursts: f.malformed_bursts,
        admin_token: client_token(run, f.admin_token_file.as_deref())?,
        events_rate: f.events_rate,
        event_items,
        surge,
        slow,
        window: f.window.unwrap_or(Duration::from_secs(1)),
        filter: f.filter.clone(),
    };
    // One thread, so the server keeps the other core(s).
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let r = rt.block_on(loadgen::run(opts)).with_context(|| format!("load run against {} failed", f.addr))?;
    let rate = if f.rate > 0.0 { format!("{:.0}", f.rate) } else { "max".to_owned() };
    println!(
        "| connections | target rps | achieved rps | ok | shed (503) | failed | p50 ms | p90 ms | p99 ms | max ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    println!(
        "| {} | {rate} | {:.0} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        f.concurrency,
        r.rps(),
        r.ok,
        r.shed,
        r.failed,
        r.quantile_ms(0.5),
        r.quantile_ms(0.9),
        r.quantile_ms(0.99),
        r.quantile_ms(1.0)
    );
    if f.window.is_some() {
        let mb = |b: Option<u64>| b.map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1e6));
        let n = |v: Option<u64>| v.map_or("-".to_owned(), |v| v.to_string());
        println!(
            "\n| from s | ok | shed | failed | p50 ms | p99 ms | max ms | server RSS MB | server fds | connections |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|");
        for w in &r.windows {
            println!(
                "| {:.1} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {} | {} | {} |",
                w.start_s,
                w.ok,
                w.shed,
                w.failed,
                w.p50_ms,
                w.p99_ms,
                w.max_ms,
                mb(w.rss),
                n(w.fds),
                n(w.connections)
            );
        }
    }
    let fds_max = r.windows.iter().filter_map(|w| w.fds).max();
    if let Some(s) = surge {
        // Back to normal: the first window after the surge with nothing shed and a p99 within
        // twice the median window p99 before it.
        let mut base: Vec<f64> = r
            .windows
            .iter()
            .filter(|w| w.start_s + 1e-9 < s.start.as_secs_f64())
            .map(|w| w.p99_ms)
            .filter(|p| p.is_finite())
            .collect();
        base.sort_by(f64::total_cmp);
        let base = base.get(base.len() / 2).copied().unwrap_or(f64::NAN);
        let end = (s.start + s.length).as_secs_f64();
        if let Some(during) = &r.surge {
            let q = |q| loadgen::quantile_ms(&during.latencies_us, q);
            println!(
                "\nduring the surge: {} accepted ({:.0}/s), {} shed (503), {} failed; accepted p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
                during.ok,
                during.ok as f64 / s.length.as_secs_f64(),
                during.shed,
                during.failed,
                q(0.5),
                q(0.99),
                q(1.0)
            );
        }
        let back = r.windows.iter().find(|w| w.start_s + 1e-9 >= end && w.shed == 0 && w.p99_ms <= 2.0 * base);
        match back {
            Some(w) => println!(
                "surge ×{} from {:.1} s for {:.1} s; median window p99 before it {base:.2} ms; back to normal (no shedding, p99 ≤ {:.2} ms) in the window starting {:.2} s after it",
                s.factor,
                s.start.as_secs_f64(),
                s.length.as_secs_f64(),
                2.0 * base,
                w.start_s - end
            ),
            None => println!("\nsurge ×{}: the run ended before the server was back to normal", s.factor),
        }
    }
    if f.reloads > 0 || f.malformed > 0 {
        println!(
            "\nreloads: {} ok, {} failed; malformed requests: {} sent, {} answered 4xx with a JSON error",
            r.reloads_ok, r.reloads_failed, r.malformed_sent, r.malformed_rejected
        );
    }
    if f.events_rate > 0.0 {
        println!("events: {} acknowledged, {} failed", r.events_ok, r.events_failed);
    }
    if let Some(a) = slow {
        println!(
            "slow-header attack from {}: {} connections held, {} opened over the run, {} closed by the server; server fds at most {}",
            a.from,
            a.connections,
            r.slow_opened,
            r.slow_closed,
            fds_max.map_or("-".to_owned(), |v| v.to_string())
        );
    }
    if let (Some(a), Some(b)) = (r.rss_start, r.rss_end) {
        println!("server resident memory: {:.1} MB before, {:.1} MB after", a as f64 / 1e6, b as f64 / 1e6);
    }
    if r.unsent > 0 {
        println!(
            "{} requests scheduled within the run were never sent: the server answered too slowly for {} connections to keep the rate",
            r.unsent, f.concurrency
        );
    }
    if r.failed > 0 {
        bail!("{} well-formed requests failed", r.failed);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_with_units_and_bad_ones_are_refused() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "-1s", "abc", "0"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
