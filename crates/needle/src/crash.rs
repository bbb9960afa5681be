//! `needle bench crash`: `kill -9` at random moments in each write path, then a check that what
//! is left on disk is the state before the write, the state after it, or a clear error, and never
//! something that loads as valid but is wrong.
//!
//! Every write path is run as a child `needle` process on a small synthetic log. Two runs trained
//! on two different logs give an "old" and a "new" state that differ in every file, so a mix of
//! the two cannot pass for either. Children run on one thread, which makes their output
//! byte-for-byte reproducible and lets the check compare files with a reference write.

use anyhow::{bail, Context, Result};
use clap::ValueEnum;
use needle_model::rng::Rng;
use needle_serve::engine::StoreContents;
use needle_store::Store;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The write paths `needle bench crash` can interrupt.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WritePath {
    /// `needle train` writing a run over an earlier one.
    Train,
    /// `needle index build` writing over an earlier index.
    Index,
    /// `needle store load` into an embedded store loaded from other data.
    Store,
    /// `needle serve` taking `POST /v1/events` into its embedded store.
    Events,
    /// The same into Redis with an append-only file synced on every write; Redis is killed too.
    EventsRedis,
}

/// What one interrupted write left behind.
#[derive(Default)]
struct Tally {
    old: usize,
    new: usize,
    /// Refused with a clear error (an interrupted write that must be redone).
    incomplete: usize,
    /// Loaded as valid but matched neither state.
    wrong: usize,
    /// Events only: acknowledged by the server, then missing from the store.
    acked: usize,
    lost: usize,
    /// The first errors that were not the expected "incomplete" one.
    errors: Vec<String>,
}

struct Setup {
    exe: PathBuf,
    work: PathBuf,
    /// Runs trained on the "old" and the "new" log.
    run_old: PathBuf,
    run_new: PathBuf,
    config_new: PathBuf,
}

fn needle(exe: &Path) -> Command {
    let mut c = Command::new(exe);
    c.arg("--threads").arg("1").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    c
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("cannot start {what}"))?;
    if !out.status.success() {
        bail!("{what} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn train_config(schema: &Path) -> String {
    format!(
        "[data]\nschema = {:?}\n\n[model]\nkind = \"youtubednn\"\ndim = 64\nhidden = [128]\n\
         user_features = [\"region\", \"age_band\"]\nmax_seq_len = 20\nrecent = 3\nexample_age = false\n\n\
         [train]\nepochs = 1\nbatch_size = 1024\nloss = \"sampled\"\nnegatives = 64\nseed = 7\n\
         valid_users = 500\npatience = 0\n",
        schema.display().to_string()
    )
}

fn prepare(exe: &Path, work: &Path, items: u64) -> Result<Setup> {
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let mut runs = Vec::new();
    for (name, seed) in [("old", 1u64), ("new", 2)] {
        let data = work.join(format!("data-{name}"));
        let run = work.join(format!("run-{name}"));
        let config = work.join(format!("{name}.toml"));
        if !data.join("schema.toml").exists() {
            run_ok(
                needle(exe).args(["data", "synth", "--quiet", "--users", "20000", "--events", "400000"]).args([
                    "--items".into(),
                    items.to_string(),
                    "--seed".into(),
                    seed.to_string(),
                    "--out".into(),
                    data.display().to_string(),
                ]),
                "needle data synth",
            )?;
        }
        std::fs::write(&config, train_config(&data.join("schema.toml")))?;
        if needle_run::read_info(&run).is_err() {
            eprintln!("training the {name} reference run");
            run_ok(needle(exe).arg("train").arg("--config").arg(&config).arg("--out").arg(&run), "needle train")?;
        }
        runs.push((run, config));
    }
    let (run_new, config_new) = runs.pop().expect("two runs");
    let (run_old, _) = runs.pop().expect("two runs");
    Ok(Setup { exe: exe.to_owned(), work: work.to_owned(), run_old, run_new, config_new })
}

/// The files that make a run what it is (the manifest also records timings, which differ).
fn run_digest(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let info = needle_run::read_info(dir)?;
    let mut files = vec![("fingerprint".to_owned(), info.data_fingerprint.into_bytes())];
    for name in ["model.safetensors", "item_counts.tsv"] {
        files.push((name.to_owned(), std::fs::read(dir.join(name))?));
    }
    let mut vocab: Vec<_> = std::fs::read_dir(dir.join("vocab"))?.collect::<Result<_, _>>()?;
    vocab.sort_by_key(|e| e.file_name());
    for e in vocab {
        files.push((e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path())?));
    }
    Ok(files)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    if to.exists() {
        std::fs::remove_dir_all(to)?;
    }
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        let dest = to.join(e.file_name());
        if e.file_type()?.is_dir() {
            copy_dir(&e.path(), &dest)?;
        } else {
            std::fs::copy(e.path(), dest)?;
        }
    }
    Ok(())
}

/// When to kill a child: at a time after its start, or a time after it starts writing.
enum KillAt {
    Start(Duration),
    Write(Duration),
}

/// Starts `cmd` and kills it with SIGKILL at `at` (if it is still running then).
fn kill_child(cmd: &mut Command, at: KillAt, writing: &dyn Fn() -> bool) -> Result<()> {
    let mut child = cmd.spawn().context("cannot start needle")?;
    let t = Instant::now();
    let deadline = loop {
        match at {
            KillAt::Start(d) => break t + d,
            KillAt::Write(d) if writing() => break Instant::now() + d,
            KillAt::Write(_) => {
                if child.try_wait()?.is_some() {
                    return Ok(());
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    };
    loop {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(());
        }
        std::thread::sleep((deadline - now).min(Duration::from_micros(200)));
    }
}

/// How long an uninterrupted run of the command takes, and when its files are being written
/// (while `writing()` holds), seen by polling.
struct Timing {
    full: Duration,
    write: Option<(Duration, Duration)>,
}

fn observe(cmd: &mut Command, writing: impl Fn() -> bool) -> Result<Timing> {
    let t = Instant::now();
    let mut child = cmd.spawn().context("cannot start needle")?;
    let (mut start, mut end) = (None, None);
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        let w = writing();
        if w && start.is_none() {
            start = Some(t.elapsed());
        } else if !w && start.is_some() && end.is_none() {
            end = Some(t.elapsed());
        }
        std::thread::sleep(Duration::from_micros(200));
    };
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            e.read_to_string(&mut err)?;
        }
        bail!("needle failed: {}", err.trim());
    }
    let full = t.elapsed();
    let write = start.map(|s| (s, end.unwrap_or(full)));
    match write {
        Some((s, e)) => eprintln!(
            "  uninterrupted: {:.0} ms, writing from {:.1} to {:.1} ms",
            full.as_secs_f64() * 1e3,
            s.as_secs_f64() * 1e3,
            e.as_secs_f64() * 1e3
        ),
        None => eprintln!("  uninterrupted: {:.0} ms (the write was too short to see)", full.as_secs_f64() * 1e3),
    }
    Ok(Timing { full, write })
}

/// Half the kills land anywhere in the command's run; the other half while its files are being
/// written, timed from the moment writing starts, where a torn file would come from.
fn kill_moment(rng: &mut Rng, timing: &Timing, i: usize) -> KillAt {
    let f = rng.uniform() as f64;
    match timing.write {
        Some((start, end)) if i % 2 == 1 => KillAt::Write((end - start).mul_f64(1.1 * f)),
        _ => KillAt::Start(timing.full.mul_f64(1.05 * f)),
    }
}

fn crash_train(s: &Setup, runs: usize, rng: &mut Rng, bar: &indicatif::ProgressBar) -> Result<Tally> {
    let old = run_digest(&s.run_old)?;
    let new = run_digest(&s.run_new)?;
    let target = s.work.join("crash-train");
    let train = |out: &Path| {
        let mut c = needle(&s.exe);
        c.args(["train", "--force", "--config"]).arg(&s.config_new).arg("--out").arg(out);
        c
    };
    copy_dir(&s.run_old, &target)?;
    let manifest = target.join("model.toml");
    let timing = observe(&mut train(&target), || !manifest.exists())?;
    if run_digest(&target)? != new {
        bail!("two uninterrupted trainings of one config wrote different runs; the check needs them identical");
    }
    let mut t = Tally::default();
    for i in 0..runs {
        copy_dir(&s.run_old, &target)?;
        kill_child(&mut train(&target), kill_moment(rng, &timing, i), &|| !manifest.exists())?;
        match run_digest(&target) {
            Ok(d) if d == old => t.old += 1,
            Ok(d) if d == new => t.new += 1,
            Ok(_) => t.wrong += 1,
            Err(e) => {
                let msg = format!("{e:#}");
                if msg.contains("incomplete run") {
                    t.incomplete += 1;
                } else {
                    t.wrong += 1;
                    t.errors.push(msg);
                }
            }
        }
        bar.inc(1);
    }
    Ok(t)
}

fn crash_index(s: &Setup, runs: usize, rng: &mut Rng, bar: &indicatif::ProgressBar) -> Result<Tally> {
    let old_path = s.work.join("index-old.bin");
    let new_path = s.work.join("index-new.bin");
    let build = |kind: &str, out: &Path| {
        let mut c = needle(&s.exe);
        c.args(["index", "build", "--kind", kind, "--synthetic-items", "30000", "--run"])
            .arg(&s.run_new)
            .arg("--out")
            .arg(out);
        c
    };
    run_ok(&mut build("exact", &old_path), "needle index build")?;
    let tmp = s.work.join("index-new.bin.tmp");
    let target_tmp = s.work.join("crash-index.bin.tmp");
    let timing = observe(&mut build("hnsw", &new_path), || tmp.exists())?;
    let (old, new) = (std::fs::read(&old_path)?, std::fs::read(&new_path)?);
    let target = s.work.join("crash-index.bin");
    let mut t = Tally::default();
    for i in 0..runs {
        std::fs::copy(&old_path, &target)?;
        let _ = std::fs::remove_file(&target_tmp);
        kill_child(&mut build("hnsw", &target), kill_moment(rng, &timing, i), &|| target_tmp.exists())?;
        match needle_index::load(&target) {
            Ok(_) => {
                let bytes = std::fs::read(&target)?;
                if bytes == old {
                    t.old += 1
                } else if bytes == new {
                    t.new += 1
                } else {
                    t.wrong += 1
                }
            }
            // An index write is atomic: the file must always load.
            Err(e) => {
                t.wrong += 1;
                t.errors.push(format!("{e:#}"));
            }
        }
        bar.inc(1);
    }
    Ok(t)
}

/// Whether every record of `contents` reads back from the store as written.
async fn store_holds(store: &dyn Store, contents: &StoreContents) -> Result<bool> {
    for chunk in contents.items.chunks(1000) {
        let ids: Vec<&str> = chunk.iter().map(|r| r.id.as_str()).collect();
        let got = store.items(&ids).await?;
        if chunk.iter().zip(&got).any(|(r, g)| g.as_ref() != Some(&r.details)) {
            return Ok(false);
        }
    }
    for u in &contents.users {
        let got = store.user(&u.id, contents.max_history).await?;
        match got {
            Some(p)
                if p.features == u.profile.features
                    && p.history == needle_store::newest(&u.profile.history, contents.max_history) => {}
            _ => return Ok(false),
        }
    }
    Ok(true)
}

fn crash_store(s: &Setup, runs: usize, rng: &mut Rng, bar: &indicatif::ProgressBar) -> Result<Tally> {
    let contents_of =
        |run: &Path| -> Result<StoreContents> { Ok(StoreContents::of_run(&needle_run::read_info(run)?, None)?) };
    let (old, new) = (contents_of(&s.run_old)?, contents_of(&s.run_new)?);
    let old_file = s.work.join("store-old.redb");
    let target = s.work.join("crash-store.redb");
    let load = |run: &Path, file: &Path| {
        let mut c = needle(&s.exe);
        c.args(["store", "load", "--run"]).arg(run).arg("--store").arg(file);
        c
    };
    let _ = std::fs::remove_file(&old_file);
    run_ok(&mut load(&s.run_old, &old_file), "needle store load")?;
    std::fs::copy(&old_file, &target)?;
    // The load writes from its first change to the file until it exits.
    let modified = || std::fs::metadata(&target).and_then(|m| m.modified()).ok();
    let before = modified();
    let timing = observe(&mut load(&s.run_new, &target), || modified() != before)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut t = Tally::default();
    for i in 0..runs {
        std::fs::copy(&old_file, &target)?;
        let before = modified();
        kill_child(&mut load(&s.run_new, &target), kill_moment(rng, &timing, i), &|| modified() != before)?;
        rt.block_on(async {
            let store = match needle_store::EmbeddedStore::open(&target) {
                Ok(st) => st,
                Err(e) => {
                    t.wrong += 1;
                    t.errors.push(e.to_string());
                    return Ok::<_, anyhow::Error>(());
                }
            };
            match store.loaded_tag().await? {
                // No tag: the server loads the store again before it serves from it.
                None => t.incomplete += 1,
                Some(tag) if tag == old.fingerprint && store_holds(&store, &old).await? => t.old += 1,
                Some(tag) if tag == new.fingerprint && store_holds(&store, &new).await? => t.new += 1,
                Some(_) => t.wrong += 1,
            }
            Ok(())
        })?;
        bar.inc(1);
    }
    Ok(t)
}

/// Sends one raw HTTP/1.1 request on a fresh connection; the status code.
fn status_of(addr: SocketAddr, request: &str) -> std::io::Result<u16> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    c.set_read_timeout(Some(Duration::from_secs(5)))?;
    c.write_all(request.as_bytes())?;
    let mut head = [0u8; 12];
    c.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("not an HTTP response"))
}

/// A JSON POST with the admin token; the status code.
fn post(addr: SocketAddr, path: &str, body: &str, token: &str) -> std::io::Result<u16> {
    status_of(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {token}\r\ncontent-type: application/json\r\n\
             content-length: {}\r\nconnection: close\r\n\r\n{body}",
            body.len()
        ),
    )
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn wait_healthy(child: &mut Child, addr: SocketAddr) -> Result<()> {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(60) {
        if let Some(status) = child.try_wait()? {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                e.read_to_string(&mut err)?;
            }
            bail!("needle serve exited with {status}: {}", err.trim());
        }
        if let Ok(200) = status_of(addr, "GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n") {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("needle serve did not answer /healthz within 60 s")
}

/// A private redis-server persisting every write to its append-only file before answering.
struct PersistentRedis {
    dir: PathBuf,
    port: u16,
    child: Option<Child>,
}

impl PersistentRedis {
    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn start(&mut self) -> Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .current_dir(&self.dir)
            .stdout(Stdio::null())
            .spawn()
            .context("cannot start redis-server (Debian: apt-get install redis-server)")?;
        self.child = Some(child);
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(30) {
            if let Ok(mut c) = TcpStream::connect(("127.0.0.1", self.port)) {
                // Ready once it has replayed its file and answers.
                let _ = c.write_all(b"PING\r\n");
                let mut reply = [0u8; 5];
                if c.read_exact(&mut reply).is_ok() && &reply == b"+PONG" {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server did not answer within 30 s")
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PersistentRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

fn crash_events(s: &Setup, runs: usize, rng: &mut Rng, bar: &indicatif::ProgressBar, redis: bool) -> Result<Tally> {
    let store_file = s.work.join("crash-events.redb");
    let _ = std::fs::remove_file(&store_file);
    let mut server = if redis {
        let dir = s.work.join("crash-redis");
        let _ = std::fs::remove_dir_all(&dir);
        let mut r = PersistentRedis { dir, port: free_port()?, child: None };
        r.start()?;
        run_ok(
            needle(&s.exe).args(["store", "load", "--run"]).arg(&s.run_new).args(["--store", &r.url()]),
            "needle store load",
        )?;
        Some(r)
    } else {
        None
    };
    let store_spec = match &server {
        Some(r) => r.url(),
        None => store_file.display().to_string(),
    };
    let items = needle_run::read_vocab(&s.run_new, "items")?;
    let item_ids: Vec<&str> = (1..items.len() as u32).filter_map(|r| items.raw(r)).collect();
    let token = "crash-bench-token-0123456789abcdef";
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut t = Tally::default();
    for r in 0..runs {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let mut child = needle(&s.exe)
            .args(["serve", "--log-level", "error", "--admin-token", token, "--run"])
            .arg(&s.run_new)
            .args(["--store", &store_spec, "--addr", &addr.to_string()])
            .spawn()
            .context("cannot start needle serve")?;
        wait_healthy(&mut child, addr)?;
        let stop = Instant::now() + Duration::from_secs_f64(0.05 + 0.5 * rng.uniform() as f64);
        let mut redis_child = server.as_mut().and_then(|r| r.child.take());
        let killer = std::thread::spawn(move || {
            std::thread::sleep(stop.saturating_duration_since(Instant::now()));
            // Redis first: a write it acknowledged must already be in its file.
            if let Some(c) = redis_child.as_mut() {
                let _ = c.kill();
                let _ = c.wait();
            }
            let _ = child.kill();
            let _ = child.wait();
        });
        // Each event goes to a user of its own, so none is pushed out of a capped history.
        let mut acked = Vec::new();
        for n in 0.. {
            let (user, item) = (format!("crash-{r}-{n}"), item_ids[rng.below(item_ids.len())]);
            let body = format!("{{\"user_id\":\"{user}\",\"item_id\":\"{item}\"}}");
            match post(addr, "/v1/events", &body, token) {
                Ok(200) => acked.push((user, item)),
                // Redis died first: the server says so with a 503 until it is killed too.
                Ok(503) if redis => continue,
                Ok(code) => bail!("an event got HTTP {code} from a healthy server"),
                Err(_) => break,
            }
        }
        killer.join().map_err(|_| anyhow::anyhow!("the kill thread panicked"))?;
        let store: Box<dyn Store> = match server.as_mut() {
            Some(r) => {
                r.start()?;
                Box::new(rt.block_on(needle_store::RedisStore::connect(&r.url()))?)
            }
            None => Box::new(needle_store::EmbeddedStore::open(&store_file)?),
        };
        rt.block_on(async {
            for (user, item) in &acked {
                let kept = store.user(user, 10).await?.is_some_and(|p| p.history == [item.to_string()]);
                if !kept {
                    t.lost += 1;
                }
            }
            Ok::<_, anyhow::Error>(())
        })?;
        t.acked += acked.len();
        bar.inc(1);
    }
    Ok(t)
}

/// Runs `runs` interrupted writes of each path in `paths` under `work` and prints the table.
pub fn bench_crash(paths: &[WritePath], runs: usize, work: &Path, seed: u64) -> Result<()> {
    let exe = std::env::current_exe().context("cannot find the needle executable")?;
    let setup = prepare(&exe, work, 20_000)?;
    println!("| write path | kills | old state | new state | incomplete, refused | loaded but wrong | events acknowledged | acknowledged lost |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut bad = 0;
    for &p in paths {
        let mut rng = Rng::new(seed ^ ((p as u64 + 1) * 0x9e37_79b9));
        let name = p.to_possible_value().map_or_else(String::new, |v| v.get_name().to_owned());
        let bar = needle_api::progress::count_bar(runs as u64, &name);
        let t = match p {
            WritePath::Train => crash_train(&setup, runs, &mut rng, &bar)?,
            WritePath::Index => crash_index(&setup, runs, &mut rng, &bar)?,
            WritePath::Store => crash_store(&setup, runs, &mut rng, &bar)?,
            WritePath::Events => crash_events(&setup, runs, &mut rng, &bar, false)?,
            WritePath::EventsRedis => crash_events(&setup, runs, &mut rng, &bar, true)?,
        };
        bar.finish_and_clear();
        // Events have no old or new state to tell apart, and files have no acknowledgements.
        let [old, new, acked, lost] = if matches!(p, WritePath::Events | WritePath::EventsRedis) {
            ["-".into(), "-".into(), t.acked.to_string(), t.lost.to_string()]
        } else {
            [t.old.to_string(), t.new.to_string(), "-".into(), "-".into()]
        };
        println!("| {name} | {runs} | {old} | {new} | {} | {} | {acked} | {lost} |", t.incomplete, t.wrong);
        for e in t.errors.iter().take(3) {
            eprintln!("  {p:?}: {e}");
        }
        bad += t.wrong + t.lost;
    }
    if bad > 0 {
        bail!("{bad} interrupted writes left wrong or lost data");
    }
    Ok(())
}
