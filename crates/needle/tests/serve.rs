//! End-to-end tests of `needle serve` as a separate process, over real HTTP: recall for known,
//! new and anonymous users, events, every kind of bad input, metrics, reloads under load,
//! SIGHUP, SIGTERM, and the Redis store against a real redis-server.

mod common;

use common::server::{bearer, http, ids, metrics_text, post, Server, TOKEN};
use common::{needle, ok, planted_log, write_config, YOUTUBEDNN};
use serde_json::{json, Value};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Trains the planted-log models the tests serve: `runs/yt` and `runs/pop`.
fn trained(dir: &Path) {
    planted_log(dir);
    write_config(dir, "yt.toml", YOUTUBEDNN);
    write_config(dir, "pop.toml", "[model]\nkind = \"popularity\"\n");
    ok(&needle(&["--threads", "2", "train", "--config", "yt.toml", "--out", "runs/yt", "--quiet"], dir));
    ok(&needle(&["train", "--config", "pop.toml", "--out", "runs/pop", "--quiet"], dir));
}

/// Trains `runs/tr`: item transitions from the newest three history items.
fn trained_transitions(dir: &Path) {
    write_config(dir, "tr.toml", "[model]\nkind = \"transitions\"\nrecent = 3\nmax_seq_len = 10\n");
    ok(&needle(&["train", "--config", "tr.toml", "--out", "runs/tr", "--quiet"], dir));
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos()
}

/// Three client threads sending recalls of k = 10 until stopped, request `i` for user `user(i)`;
/// every answer must be a 200 with 10 items.
struct RecallLoad {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    clients: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>,
}

impl RecallLoad {
    fn start(addr: &str, user: fn(usize) -> String) -> RecallLoad {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let clients = (0..3)
            .map(|c| {
                let (a, stop) = (addr.to_owned(), stop.clone());
                std::thread::spawn(move || {
                    let (mut n, mut failed) = (0, Vec::new());
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let r = post(&a, "/v1/recall", &json!({"user_id": user(n * 3 + c), "k": 10}));
                        if r.status != 200 || ids(&r.json()).len() != 10 {
                            failed.push(String::from_utf8_lossy(&r.body).into_owned());
                        }
                        n += 1;
                    }
                    (n, failed)
                })
            })
            .collect();
        RecallLoad { stop, clients }
    }

    /// Stops the clients: how many requests they sent, and the bodies of those that failed.
    fn stop(self) -> (usize, Vec<String>) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (mut total, mut failed) = (0, Vec::new());
        for c in self.clients {
            let (n, f) = c.join().unwrap();
            total += n;
            failed.extend(f);
        }
        (total, failed)
    }
}

fn user_log(dir: &Path, user: &str) -> Vec<String> {
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    log.lines()
        .filter(|l| l.starts_with(&format!("{user},")))
        .map(|l| l.split(',').nth(1).unwrap().to_owned())
        .collect()
}

#[test]
fn serving_answers_recalls_events_and_rejects_bad_input() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let srv = Server::start(dir, &["--run", "runs/yt", "--max-body-bytes", "4096", "--max-k", "500"]);
    let a = srv.addr.as_str();

    let h = http(a, "GET", "/healthz", b"", "");
    assert_eq!(h.status, 200);
    let health = h.json();
    assert!(health["model"].as_str().unwrap().starts_with("yt:"), "{health}");
    assert!(health["store"].as_str().unwrap().contains("store.redb"), "{health}");
    assert!(dir.join("runs/yt/store.redb").exists(), "the embedded store is filled on first start");

    // A known user: k distinct items, none already in the user's log.
    let r = post(a, "/v1/recall", &json!({"user_id": "u3", "k": 7}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = r.json();
    assert_eq!(v["source"], "model");
    assert_eq!(v["known_user"], true);
    assert_eq!(v["model"], health["model"]);
    let got = ids(&v);
    assert_eq!(got.len(), 7);
    let mut dedup = got.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 7);
    // The store keeps the newest max_seq_len (10) items of each history; those are excluded.
    let log = user_log(dir, "u3");
    let recent = &log[log.len() - 10..];
    assert!(got.iter().all(|i| !recent.contains(i)), "recommended recently seen items: {got:?}");
    let scores: Vec<f64> = v["items"].as_array().unwrap().iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    // exclude_seen = false may return them; the ids are still distinct.
    let r = post(a, "/v1/recall", &json!({"user_id": "u3", "k": 20, "exclude_seen": false}));
    assert_eq!(ids(&r.json()).len(), 20);
    // Integer ids are accepted as their text.
    assert_eq!(post(a, "/v1/recall", &json!({"user_id": 3, "k": 5})).status, 200);

    // No user, explicit history from taste group 1: the planted structure points back into group 1.
    let r =
        post(a, "/v1/recall", &json!({"history": ["c1_3", "c1_4", "c1_5"], "features": {"country": "de"}, "k": 10}));
    let v = r.json();
    assert_eq!(v["source"], "model");
    assert_eq!(v["known_user"], false);
    let got = ids(&v);
    let in_group = got.iter().filter(|i| i.starts_with("c1_")).count();
    assert!(in_group >= 5, "only {in_group} of {got:?} from the history's group");
    assert!(!got.iter().any(|i| ["c1_3", "c1_4", "c1_5"].contains(&i.as_str())));

    // Nothing known: popularity, flagged; the planted hot items lead.
    let v = post(a, "/v1/recall", &json!({"user_id": "stranger", "k": 5})).json();
    assert_eq!(v["source"], "popularity");
    assert_eq!(v["known_user"], false);
    assert!(ids(&v).iter().all(|i| i.starts_with("hot")), "{v}");
    assert_eq!(post(a, "/v1/recall", &json!({})).json()["source"], "popularity");

    // Events: a new user becomes known at once, and the event's item is then excluded.
    let e = post(a, "/v1/events", &json!({"user_id": "newbie", "item_id": "c2_5", "ts": 978300760}));
    assert_eq!(e.status, 200);
    assert_eq!(e.json()["history_len"], 1);
    let v = post(a, "/v1/recall", &json!({"user_id": "newbie", "k": 10})).json();
    assert_eq!(v["source"], "model");
    assert_eq!(v["known_user"], true);
    assert!(!ids(&v).contains(&"c2_5".to_owned()));
    // Histories stay bounded by max_seq_len (10).
    for i in 0..15 {
        let e = post(a, "/v1/events", &json!({"user_id": "newbie", "item_id": format!("c2_{}", i % 25)}));
        assert_eq!(e.status, 200);
    }
    assert_eq!(post(a, "/v1/events", &json!({"user_id": "newbie", "item_id": "c2_0"})).json()["history_len"], 10);

    // Bad input: 4xx with a JSON error saying what is wrong, and the server keeps serving.
    http(a, "POST", "/v1/recall", b"{\"user_id\": \"u3\", \"k\": ", "").rejects(400, "invalid request body");
    post(a, "/v1/recall", &json!({"user_id": "u3", "k": "ten"})).rejects(400, "invalid type");
    post(a, "/v1/recall", &json!({"user_id": "u3", "k": 0})).rejects(400, "k must be between 1 and 500");
    post(a, "/v1/recall", &json!({"user_id": "u3", "k": -3})).rejects(400, "got -3");
    post(a, "/v1/recall", &json!({"user_id": "u3", "k": 501})).rejects(400, "max_k");
    post(a, "/v1/recall", &json!({"history": ["c1_3", "nope", "nada"]}))
        .rejects(400, "unknown item ids in history: nope, nada");
    post(a, "/v1/recall", &json!({"features": {"planet": "mars"}})).rejects(400, "unknown feature `planet`");
    post(a, "/v1/recall", &json!({"user_id": "u3", "kk": 5})).rejects(400, "unknown field `kk`");
    post(a, "/v1/recall", &json!({"user_id": ["u3"]})).rejects(400, "an id (string or integer)");
    post(a, "/v1/recall", &json!([1, 2])).rejects(400, "invalid request body");
    http(a, "POST", "/v1/recall", b"", "").rejects(400, "empty request body");
    let big = json!({"history": vec!["c1_1"; 1000]}).to_string();
    http(a, "POST", "/v1/recall", big.as_bytes(), "").rejects(413, "");
    post(a, "/v1/events", &json!({"user_id": "u3"})).rejects(400, "missing field `item_id`");
    post(a, "/v1/events", &json!({"user_id": "u3", "item_id": "nope"})).rejects(400, "unknown item id");
    http(a, "GET", "/v1/recall", b"", "").rejects(405, "GET is not allowed");
    http(a, "GET", "/nowhere", b"", "").rejects(404, "no route GET /nowhere");
    assert_eq!(post(a, "/v1/recall", &json!({"user_id": "u3", "k": 3})).status, 200);

    // Request ids: the client's is echoed.
    let r = http(a, "POST", "/v1/recall", br#"{"user_id":"u3"}"#, "x-request-id: abc-123\r\n");
    assert!(r.headers.to_lowercase().contains("x-request-id: abc-123"), "{}", r.headers);

    let text = metrics_text(a);
    // User 3 (the log's users are u0, u1, …), "stranger" and the empty request.
    assert!(text.contains("\nneedle_popularity_fallbacks_total 3\n"), "{text}");
    for want in [
        "needle_requests_total{route=\"recall\",status=\"200\"}",
        "needle_requests_total{route=\"recall\",status=\"400\"}",
        "needle_requests_total{route=\"recall\",status=\"413\"}",
        "needle_request_duration_seconds_bucket{route=\"recall\",le=\"+Inf\"}",
        "needle_events_total 17",
        "needle_model_info{version=\"yt\",run=\"yt:",
        "process_resident_memory_bytes",
        "process_open_fds",
        "needle_compute_queue 0",
        "needle_compute_max_wait_seconds 0.005",
    ] {
        assert!(text.contains(want), "metrics lack {want}:\n{text}");
    }
    let doc = http(a, "GET", "/openapi.json", b"", "").json();
    assert!(doc["paths"]["/v1/recall"]["post"].is_object() && doc["openapi"].is_string());

    // SIGTERM: a clean exit.
    srv.signal("TERM");
    let mut srv = srv;
    let t = Instant::now();
    let status = loop {
        if let Some(s) = srv.child.try_wait().unwrap() {
            break s;
        }
        assert!(t.elapsed() < Duration::from_secs(10), "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status:?}");
}

#[test]
fn reloads_swap_models_without_failing_requests() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let mind = "[model]\nkind = \"mind\"\ndim = 16\nhidden = [32]\ninterests = 3\nuser_features = [\"country\", \"user_id\"]\n\
                feature_dim = 8\nmax_seq_len = 10\n[train]\nepochs = 6\nbatch_size = 64\nlr = 0.005\nembedding_lr = 0.01\n\
                temperature = 0.1\npatience = 0\nseed = 3\n";
    write_config(dir, "mind.toml", mind);
    ok(&needle(&["train", "--config", "mind.toml", "--out", "runs/mind", "--quiet"], dir));
    let srv = Server::start(dir, &["--run", "runs/yt"]);
    let a = srv.addr.clone();
    // From here on the training data is gone: the store is filled, and reloads read only the
    // run directories.
    std::fs::rename(dir.join("log.csv"), dir.join("log.csv.away")).unwrap();
    let yt_id = http(&a, "GET", "/healthz", b"", "").json()["model"].as_str().unwrap().to_owned();

    // The load generator: a short paced run with a reload and one of each malformed request.
    std::fs::write(dir.join("token"), TOKEN).unwrap();
    let out = ok(&needle(
        &["bench", "serve", "--run", "runs/yt", "--addr", &a, "--duration", "1s", "--concurrency", "2"]
            .into_iter()
            .chain(["--rate", "200", "--reloads", "1", "--malformed", "12", "--admin-token-file", "token"])
            .collect::<Vec<_>>(),
        dir,
    ));
    let row = out.lines().find(|l| l.starts_with("| 2 | 200 |")).unwrap_or_else(|| panic!("{out}"));
    let cells: Vec<&str> = row.split('|').map(str::trim).collect();
    assert!(cells[4].parse::<u64>().unwrap() > 100 && cells[5] == "0", "{row}");
    assert!(out.contains("reloads: 1 ok, 0 failed; malformed requests: 12 sent, 12 answered 4xx"), "{out}");

    // Recalls keep flowing on other threads while the model is swapped back and forth.
    let load = RecallLoad::start(&a, |i| format!("u{}", i % 300));
    let mut models = Vec::new();
    for run in ["runs/pop", "runs/yt", "runs/pop"] {
        let r = post(&a, "/admin/reload", &json!({"run": run}));
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        models.push(r.json()["model"].as_str().unwrap().to_owned());
    }
    assert!(models[0].starts_with("pop:") && models[1] == yt_id && models[2].starts_with("pop:"), "{models:?}");
    // A run that cannot load leaves the current one serving.
    post(&a, "/admin/reload", &json!({"run": "runs/missing"})).rejects(500, "still serving its previous model");
    assert_eq!(http(&a, "GET", "/healthz", b"", "").json()["model"], models[2]);
    // SIGHUP re-reads the current run.
    srv.signal("HUP");
    let t = Instant::now();
    loop {
        let text = metrics_text(&a);
        if text.contains("needle_reloads_total 5") {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "SIGHUP did not reload:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (total, failed) = load.stop();
    assert!(failed.is_empty(), "{} failed during reloads, e.g. {}", failed.len(), failed[0]);
    assert!(total > 0);
    // A multi-interest model: every interest searches, the lists merge by score without duplicates.
    assert_eq!(post(&a, "/admin/reload", &json!({"run": "runs/mind"})).status, 200);
    let v = post(&a, "/v1/recall", &json!({"user_id": "u3", "k": 15})).json();
    assert!(v["model"].as_str().unwrap().starts_with("mind:"), "{v}");
    let got = ids(&v);
    let mut dedup = got.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!((got.len(), dedup.len()), (15, 15), "{got:?}");
    let scores: Vec<f64> = v["items"].as_array().unwrap().iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    post(&a, "/admin/reload", &json!({"run": "runs/pop"}));

    // The popularity model answers everyone from the counts.
    let v = post(&a, "/v1/recall", &json!({"user_id": "u3", "k": 5, "exclude_seen": false})).json();
    assert!(v["model"].as_str().unwrap().starts_with("pop:"));
    assert!(ids(&v).iter().all(|i| i.starts_with("hot")), "{v}");

    // A new server starts from the run directory and the filled store alone (the embedded store
    // is one process's at a time; the old server is killed, so the store is also reopened after
    // an unclean stop).
    drop(srv);
    let second = Server::start(dir, &["--run", "runs/yt"]);
    let v = post(&second.addr, "/v1/recall", &json!({"user_id": "u3", "k": 5})).json();
    assert_eq!((v["source"].as_str(), ids(&v).len()), (Some("model"), 5), "{v}");
}

#[test]
fn redis_store_serves_and_takes_events() {
    let Some(redis) = needle_store::testing::start(2) else {
        eprintln!("SKIPPED: no redis-server binary on PATH and NEEDLE_TEST_REDIS is not set");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let url = redis.url.as_str();
    let out = needle(&["store", "load", "--run", "runs/yt", "--store", url], dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    ok(&out);
    assert!(err.contains("items and 300 users"), "{err}");
    let srv = Server::start(dir, &["--run", "runs/yt", "--store", url]);
    let a = srv.addr.as_str();
    assert_eq!(http(a, "GET", "/healthz", b"", "").json()["store"], url);
    assert!(!dir.join("runs/yt/store.redb").exists(), "the Redis store must not create the embedded file");

    let v = post(a, "/v1/recall", &json!({"user_id": "u10", "k": 10})).json();
    assert_eq!(v["known_user"], true);
    let log = user_log(dir, "u10");
    assert!(ids(&v).iter().all(|i| !log[log.len() - 10..].contains(i)));

    // The event lands in Redis: another client sees it at once.
    // A user id of its own, so a reused server (NEEDLE_TEST_REDIS) holds no history for it yet.
    let r1 = format!("r1-{}-{}", std::process::id(), now_nanos());
    assert_eq!(post(a, "/v1/events", &json!({"user_id": r1, "item_id": "c4_2"})).status, 200);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let profile = rt.block_on(async {
        use needle_store::Store;
        let s = needle_store::RedisStore::connect(url).await.unwrap();
        s.user(&r1, 10).await.unwrap()
    });
    assert_eq!(profile.unwrap().history, vec!["c4_2"]);
    assert_eq!(post(a, "/v1/recall", &json!({"user_id": r1})).json()["source"], "model");

    // Redis going away fails requests with a JSON 503; when it is back, serving recovers.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    if let Some(mut private) = needle_store::testing::start_on(port, 0) {
        let url = private.url.clone();
        ok(&needle(&["store", "load", "--run", "runs/yt", "--store", &url], dir));
        let srv = Server::start(dir, &["--run", "runs/yt", "--store", &url]);
        assert_eq!(post(&srv.addr, "/v1/recall", &json!({"user_id": "u3"})).status, 200);
        private.kill();
        post(&srv.addr, "/v1/recall", &json!({"user_id": "u3"})).rejects(503, "store:");
        assert_eq!(http(&srv.addr, "GET", "/healthz", b"", "").status, 200);
        let _back = needle_store::testing::start_on(port, 0).unwrap();
        ok(&needle(&["store", "load", "--run", "runs/yt", "--store", &url], dir));
        let t = Instant::now();
        while post(&srv.addr, "/v1/recall", &json!({"user_id": "u3"})).status != 200 {
            assert!(t.elapsed() < Duration::from_secs(10), "serving did not recover");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    // A store that is down is a clear error at start.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let store = format!("redis://127.0.0.1:{port}");
    let out = needle(&["serve", "--run", "runs/yt", "--store", &store, "--addr", "127.0.0.1:0"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("127.0.0.1:{port}")));
}

/// Reads a CSV written by `needle data synth --csv` as rows of fields, header dropped.
fn csv_rows(path: &Path) -> Vec<Vec<String>> {
    let text = std::fs::read_to_string(path).unwrap();
    text.lines().skip(1).map(|l| l.split(',').map(str::to_owned).collect()).collect()
}

#[test]
fn items_without_events_or_published_live_are_recalled_when_their_features_fit() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let synth = ["data", "synth", "--users", "3000", "--items", "1500", "--events", "60000", "--csv"];
    ok(&needle(&[&synth[..], &["--cold-items", "0.1", "--out", "data", "--quiet"]].concat(), dir));
    let category: std::collections::HashMap<String, String> =
        csv_rows(&dir.join("data/items.csv")).into_iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let events = csv_rows(&dir.join("data/events.csv"));
    let mut tastes: std::collections::HashMap<&str, std::collections::HashMap<&str, usize>> = Default::default();
    for e in &events {
        *tastes.entry(&e[0]).or_default().entry(&category[&e[1]]).or_default() += 1;
    }
    let in_log: std::collections::HashSet<&str> = events.iter().map(|e| e[1].as_str()).collect();
    let cold: std::collections::HashSet<&str> =
        category.keys().map(String::as_str).filter(|i| !in_log.contains(i)).collect();
    assert!((120..=180).contains(&cold.len()), "{} of 1500 items never occur", cold.len());

    // The shipped config (the one `results/scale.md` measured), pointed at this log.
    let shipped = include_str!("../../../configs/synth/youtubednn-cold.toml");
    let model = shipped.replace("../../data/synth-cold/schema.toml", "data/schema.toml");
    assert_ne!(model, shipped, "the config no longer names ../../data/synth-cold/schema.toml");
    std::fs::write(dir.join("yt.toml"), &model).unwrap();
    let out = needle(&["--threads", "2", "train", "--config", "yt.toml", "--out", "runs/yt", "--quiet"], dir);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains(&format!("cold items: {} items without a training event", cold.len())), "{err}");

    // Over every user's top 50: cold items come back, and they come back for users whose
    // history leans to their category.
    let recall = ok(&needle(&["recall", "--run", "runs/yt", "--k", "50"], dir));
    let (mut lists, mut with_cold, mut hits, mut fitting, mut chance) = (0usize, 0usize, 0usize, 0usize, 0.0f64);
    let mut recalled = std::collections::HashSet::new();
    for line in recall.lines() {
        let (user, items) = line.split_once('\t').unwrap();
        let mut counts: Vec<(&str, usize)> = tastes[user].iter().map(|(c, n)| (*c, *n)).collect();
        counts.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let top: Vec<&str> = counts.iter().take(2).map(|c| c.0).collect();
        let found: Vec<&str> = items.split(',').filter(|i| cold.contains(i)).collect();
        lists += 1;
        with_cold += usize::from(!found.is_empty());
        for i in &found {
            hits += 1;
            recalled.insert(i.to_string());
            fitting += usize::from(top.contains(&category[*i].as_str()));
        }
        chance += cold.iter().filter(|i| top.contains(&category[**i].as_str())).count() as f64 / cold.len() as f64;
    }
    assert_eq!(lists, 3000);
    let (share, fit, chance) = (with_cold as f64 / 3000.0, fitting as f64 / hits.max(1) as f64, chance / 3000.0);
    assert!(share >= 0.3, "only {share:.3} of the lists hold a cold item");
    assert!(recalled.len() * 10 >= cold.len() * 8, "{} of {} cold items recalled", recalled.len(), cold.len());
    assert!(fit >= 0.7 && fit >= 2.5 * chance, "{fit:.3} of cold recalls fit the user's taste (chance {chance:.3})");

    // The server recalls them too, from the same index.
    let srv = Server::start(dir, &["--run", "runs/yt"]);
    let first_with_cold = recall.lines().find(|l| l.split(['\t', ',']).skip(1).any(|i| cold.contains(i)));
    let user = first_with_cold.unwrap().split('\t').next().unwrap();
    let v = post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50})).json();
    let served = ids(&v);
    assert!(served.iter().any(|i| cold.contains(i.as_str())), "no cold item served to {user}: {served:?}");

    // Filters on the catalogue's attributes and explicit exclusions: every item meets the
    // filter, the answer is never short, and excluded items never come back.
    let wanted = category[&served[0]].clone();
    let in_category = category.values().filter(|c| **c == wanted).count();
    let v = post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 20, "filter": {"category": wanted}})).json();
    let filtered = ids(&v);
    assert_eq!(filtered.len(), 20.min(in_category), "{v}");
    assert!(filtered.iter().all(|i| category[i] == wanted), "{filtered:?} outside {wanted}");
    let rare: Vec<String> = category.values().filter(|c| **c != wanted).take(1).cloned().collect();
    let v =
        post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 10, "filter": {"category": [wanted, rare[0]]}}))
            .json();
    assert!(ids(&v).iter().all(|i| category[i] == wanted || category[i] == rare[0]), "{v}");
    let v = post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50, "exclude": [served[0], served[1]]})).json();
    let again = ids(&v);
    assert_eq!(again.len(), 50);
    assert!(!again.contains(&served[0]) && !again.contains(&served[1]), "excluded items returned");
    // 1,000 random filters over both attributes: every item passes, and nothing is short.
    let items = csv_rows(&dir.join("data/items.csv"));
    let values = |col: usize| {
        let mut v: Vec<String> = items.iter().map(|r| r[col].clone()).collect();
        v.sort();
        v.dedup();
        v
    };
    let (categories, bands) = (values(1), values(2));
    let users: Vec<&str> = tastes.keys().copied().collect();
    let mut state = 99u64;
    let mut next = move |n: usize| {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((state >> 33) as usize) % n
    };
    for _ in 0..1000 {
        let cats: Vec<&String> = (0..1 + next(3)).map(|_| &categories[next(categories.len())]).collect();
        let mut filter = serde_json::Map::new();
        filter.insert("category".into(), json!(cats));
        let band = (next(2) == 0).then(|| &bands[next(bands.len())]);
        if let Some(b) = band {
            filter.insert("price_band".into(), json!(b));
        }
        let passes = |r: &Vec<String>| cats.contains(&&r[1]) && band.is_none_or(|b| &r[2] == b);
        let passing = items.iter().filter(|r| passes(r)).count();
        let k = 1 + next(60);
        let body = json!({"user_id": users[next(users.len())], "k": k, "exclude_seen": false, "filter": filter});
        let v = post(&srv.addr, "/v1/recall", &body).json();
        let got = ids(&v);
        assert_eq!(got.len(), k.min(passing), "{body}: {got:?}");
        let by_id: std::collections::HashMap<&str, &Vec<String>> = items.iter().map(|r| (r[0].as_str(), r)).collect();
        assert!(got.iter().all(|i| passes(by_id[i.as_str()])), "{body}: {got:?}");
    }
    post(&srv.addr, "/v1/recall", &json!({"user_id": user, "filter": {"colour": "red"}})).rejects(400, "category");
    post(&srv.addr, "/v1/recall", &json!({"user_id": user, "filter": {"category": {"between": 1}}}))
        .rejects(400, "between");

    // Live catalogue. An item published with the features of a cold item this user is served
    // (so the same vector) is in the very next recall, with its details, and obeys filters.
    let by_id: std::collections::HashMap<&str, &Vec<String>> = items.iter().map(|r| (r[0].as_str(), r)).collect();
    let twin = served.iter().take(45).find(|i| cold.contains(i.as_str())).expect("a cold item in the top 45");
    let (cat, band) = (by_id[twin.as_str()][1].clone(), by_id[twin.as_str()][2].clone());
    let published = json!({"items": [{"id": "live-1", "title": "Published", "category": cat, "price_band": band}]});
    let t = Instant::now();
    let r = post(&srv.addr, "/v1/items", &published);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50})).json();
    eprintln!("published item recalled {:.1} ms after the upsert was sent", t.elapsed().as_secs_f64() * 1e3);
    let live = v["items"].as_array().unwrap().iter().find(|i| i["id"] == "live-1").unwrap_or_else(|| panic!("{v}"));
    assert_eq!((live["title"].as_str(), live["category"][0].as_str()), (Some("Published"), Some(cat.as_str())));
    let other = categories.iter().find(|c| **c != cat).unwrap();
    let only = |c: &str| {
        ids(&post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50, "filter": {"category": c}})).json())
    };
    assert!(only(&cat).contains(&"live-1".to_owned()) && !only(other).contains(&"live-1".to_owned()));
    // Deleting a trained item hides it from every answer.
    let gone = served[0].clone();
    assert_eq!(http(&srv.addr, "DELETE", &format!("/v1/items/{gone}"), b"", &bearer(TOKEN)).status, 200);
    let recalled = |srv: &Server| ids(&post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50})).json());
    assert!(!recalled(&srv).contains(&gone));
    let health = http(&srv.addr, "GET", "/healthz", b"", "").json();
    assert_eq!((health["live_items"].as_u64(), health["deleted_items"].as_u64()), (Some(1), Some(1)), "{health}");
    // Bad publishes: an empty list, a duplicate id, no token; none changes anything.
    post(&srv.addr, "/v1/items", &json!({"items": []})).rejects(400, "empty");
    post(&srv.addr, "/v1/items", &json!({"items": [{"id": "a"}, {"id": "a"}]})).rejects(400, "twice");
    let unknown = json!({"items": [{"id": "live-2", "category": "no-such-category"}]});
    post(&srv.addr, "/v1/items", &unknown).rejects(409, "no vector");
    let r = http(&srv.addr, "POST", "/v1/items", published.to_string().as_bytes(), "");
    assert_eq!(r.status, 401);
    assert_eq!(http(&srv.addr, "DELETE", "/v1/items/live-1", b"", "").status, 401);
    assert_eq!(http(&srv.addr, "DELETE", "/v1/items/no-such-item", b"", &bearer(TOKEN)).status, 404);
    // A restart (kill -9) keeps both changes: the store holds them and the new engine applies them.
    // Compacting at one published item, the item is then searched through the sealed graph.
    drop(srv);
    let srv = Server::start(dir, &["--run", "runs/yt", "--compact-live-at", "1"]);
    within(Duration::from_secs(10), "the published item is compacted", || {
        http(&srv.addr, "GET", "/healthz", b"", "").json()["sealed_items"] == 1
    });
    let after = recalled(&srv);
    assert!(after.contains(&"live-1".to_owned()) && !after.contains(&gone), "{after:?}");
    // Deleted, the published item never comes back, not after a restart either.
    assert_eq!(http(&srv.addr, "DELETE", "/v1/items/live-1", b"", &bearer(TOKEN)).status, 200);
    assert!(!recalled(&srv).contains(&"live-1".to_owned()));
    drop(srv);
    let srv = Server::start(dir, &["--run", "runs/yt"]);
    let after = recalled(&srv);
    assert!(!after.contains(&"live-1".to_owned()) && !after.contains(&gone), "{after:?}");
    drop(srv);

    // A model whose item tower reads ids only says so, and never returns them.
    let id_only =
        model.replace("item_features = [\"category\", \"price_band\"]\n", "").replace("item_id_dropout = 0.1\n", "");
    std::fs::write(dir.join("ids.toml"), id_only).unwrap();
    let out = needle(&["--threads", "2", "train", "--config", "ids.toml", "--out", "runs/ids", "--quiet"], dir);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains(&format!("{} items without a training event get no vector", cold.len())), "{err}");
    assert!(err.contains("reads item ids only"), "{err}");
    let recall = ok(&needle(&["recall", "--run", "runs/ids", "--k", "50"], dir));
    assert!(recall.lines().all(|l| !l.split(['\t', ',']).any(|i| cold.contains(i))));
    // Nor can it publish a new item: 409, saying why.
    let srv = Server::start(dir, &["--run", "runs/ids"]);
    post(&srv.addr, "/v1/items", &published).rejects(409, "reads only item ids");
    assert!(!ids(&post(&srv.addr, "/v1/recall", &json!({"user_id": user, "k": 50})).json()).contains(&"live-1".into()));
}

#[test]
fn admin_and_write_routes_need_the_admin_token() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let event = json!({"user_id": "u3", "item_id": "c3_4"}).to_string();

    // No token given: the server keeps a random one beside the run, readable by its owner only.
    let srv = Server::start_as(dir, &["--run", "runs/yt"]);
    let a = srv.addr.as_str();
    let token = std::fs::read_to_string(dir.join("runs/yt/admin.token")).unwrap().trim().to_owned();
    assert_eq!(token.len(), 64);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.join("runs/yt/admin.token")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let recall = br#"{"user_id": "u3", "k": 5}"#;
    let before = http(a, "POST", "/v1/recall", recall, "").json();
    let item = br#"{"items": [{"id": "i1", "title": "changed"}]}"#;
    let writes = [
        ("POST", "/v1/events", event.as_bytes()),
        ("POST", "/admin/reload", &b""[..]),
        ("POST", "/v1/items", &item[..]),
        ("DELETE", "/v1/items/i1", &b""[..]),
    ];
    for (method, path, body) in writes {
        for header in [String::new(), bearer("wrong-token-0123456789"), format!("authorization: {token}\r\n")] {
            let r = http(a, method, path, body, &header);
            r.rejects(401, "needs the admin token");
            assert!(r.headers.to_ascii_lowercase().contains("www-authenticate: bearer"), "{}", r.headers);
        }
    }
    // Refused requests changed nothing: no event stored, no reload, the same answer for u3.
    let metrics = metrics_text(a);
    assert!(
        ["events", "reloads", "items_published", "items_deleted"]
            .iter()
            .all(|m| metrics.contains(&format!("\nneedle_{m}_total 0\n"))),
        "{metrics}"
    );
    let after = http(a, "POST", "/v1/recall", recall, "").json();
    assert_eq!(before["items"], after["items"]);
    assert_eq!(http(a, "POST", "/v1/events", event.as_bytes(), &bearer(&token)).status, 200);
    assert_eq!(http(a, "POST", "/admin/reload", b"", &bearer(&token)).status, 200);
    // Reading stays open.
    assert_eq!(http(a, "POST", "/v1/recall", br#"{"user_id": "u3", "k": 5}"#, "").status, 200);
    assert_eq!(http(a, "GET", "/healthz", b"", "").status, 200);
    let metrics = metrics_text(a);
    assert!(metrics.contains("status=\"401\""), "{metrics}");
    assert!(!metrics.contains(&token));
    drop(srv);

    // A restart keeps the same token; the operator can also open the routes explicitly.
    let srv = Server::start_as(dir, &["--run", "runs/yt"]);
    assert_eq!(http(&srv.addr, "POST", "/admin/reload", b"", &bearer(&token)).status, 200);
    drop(srv);
    let srv = Server::start_as(dir, &["--run", "runs/yt", "--no-admin-auth"]);
    assert_eq!(http(&srv.addr, "POST", "/v1/events", event.as_bytes(), "").status, 200);
    drop(srv);

    // Tokens that guard nothing, or contradict each other, stop the server before it listens.
    for (args, says) in [
        (&["--admin-token", "short"][..], "at least 16"),
        (&["--admin-token", TOKEN, "--no-admin-auth"][..], "cannot go with"),
        (&["--admin-token-file", "no/such/file"][..], "no/such/file"),
    ] {
        let out = needle(&[&["serve", "--run", "runs/yt", "--addr", "127.0.0.1:0"][..], args].concat(), dir);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[test]
fn load_beyond_max_in_flight_is_shed_with_503_and_retry_after() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let srv = Server::start(dir, &["--run", "runs/yt", "--max-in-flight", "1", "--timeout", "10s"]);
    let a = srv.addr.as_str();
    // One request holds the only slot: its headers are in, its body is still on the way.
    let body = br#"{"user_id": "u3", "k": 5}"#;
    let mut slow = TcpStream::connect(a).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let head = format!(
        "POST /v1/recall HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).unwrap();
    slow.write_all(&body[..4]).unwrap();
    // Wait until the server holds it (`/metrics` is never turned away and takes no slot).
    let in_flight = || metrics_text(a).contains("needle_in_flight 1\n");
    let t = Instant::now();
    while !in_flight() {
        assert!(t.elapsed() < Duration::from_secs(10), "the slow request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    // The next one is turned away at once, with a JSON error and a hint when to come back;
    // health checks and metrics still answer.
    let t = Instant::now();
    let shed = http(a, "POST", "/v1/recall", body, "");
    shed.rejects(503, "over capacity");
    assert!(shed.headers.to_ascii_lowercase().contains("retry-after: 1"), "{}", shed.headers);
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(http(a, "GET", "/healthz", b"", "").status, 200);
    let metrics = metrics_text(a);
    assert!(metrics.contains("needle_in_flight_limit 1") && metrics.contains("needle_in_flight 1"), "{metrics}");
    assert!(!metrics.contains("needle_shed_total 0"), "{metrics}");
    // The held request completes, and the slot is free again.
    slow.write_all(&body[4..]).unwrap();
    let mut raw = Vec::new();
    slow.read_to_end(&mut raw).unwrap();
    assert!(String::from_utf8_lossy(&raw).starts_with("HTTP/1.1 200"), "{}", String::from_utf8_lossy(&raw));
    assert_eq!(http(a, "POST", "/v1/recall", body, "").status, 200);
    // A server that could take nothing is refused at start.
    let out = needle(&["serve", "--run", "runs/yt", "--addr", "127.0.0.1:0", "--max-in-flight", "0"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-in-flight must be at least 1"));
}

#[test]
fn slow_and_idle_connections_are_closed_and_open_ones_capped() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let args = ["--run", "runs/yt", "--max-connections", "3", "--request-read-timeout", "1s", "--idle-timeout", "2s"];
    let srv = Server::start(dir, &args);
    let a = srv.addr.as_str();
    let open_connections = || {
        let text = metrics_text(a);
        let line = text.lines().find(|l| l.starts_with("needle_connections ")).map(str::to_owned);
        line.and_then(|l| l.split_whitespace().nth(1)?.parse::<usize>().ok()).unwrap_or(usize::MAX)
    };
    // A client that sends its headers a byte at a time is cut off after the read timeout.
    let mut slow = TcpStream::connect(a).unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let t = Instant::now();
    let mut cut = false;
    for b in b"POST /v1/recall HTTP/1.1\r\nhost: t\r\nx-slow: ".iter().chain(std::iter::repeat(&b'a')) {
        if slow.write_all(&[*b]).is_err() {
            cut = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
        if t.elapsed() > Duration::from_secs(6) {
            break;
        }
    }
    let mut rest = Vec::new();
    let closed = cut || matches!(slow.read_to_end(&mut rest), Ok(_) | Err(_));
    assert!(closed && t.elapsed() < Duration::from_secs(6), "a trickling request held its connection");
    // Connections beyond the cap wait; idle ones are closed, which lets the waiting one in.
    let idle: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    let r = http(a, "POST", "/v1/recall", br#"{"user_id": "u3", "k": 5}"#, "");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() >= Duration::from_millis(1500), "served past the cap at once ({:?})", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(8), "idle connections were not closed ({:?})", t.elapsed());
    drop(idle);
    let open = open_connections();
    assert!((1..=3).contains(&open), "{open} connections open, the cap is 3");
    let metrics = metrics_text(a);
    for line in [
        "needle_connections_limit 3",
        "needle_timeout_seconds{limit=\"request_read\"} 1",
        "needle_timeout_seconds{limit=\"idle\"} 2",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
}

#[test]
fn one_client_cannot_hold_more_than_its_share_of_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let srv = Server::start(dir, &["--run", "runs/yt", "--max-connections-per-client", "2"]);
    let a = srv.addr.as_str();
    let held: Vec<TcpStream> = (0..2).map(|_| TcpStream::connect(a).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(200));
    // A third connection from the same address is closed at once, not queued.
    let mut extra = TcpStream::connect(a).unwrap();
    extra.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let t = Instant::now();
    let mut buf = [0u8; 16];
    let closed = matches!(extra.read(&mut buf), Ok(0) | Err(_));
    assert!(closed && t.elapsed() < Duration::from_secs(2), "the extra connection was kept ({:?})", t.elapsed());
    // Once the client lets go, it is served again.
    drop(held);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http(a, "POST", "/v1/recall", br#"{"user_id": "u3", "k": 5}"#, "").status, 200);
}

#[test]
fn a_transitions_run_serves_from_its_neighbour_lists() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    trained_transitions(dir);
    ok(&needle(&["export", "--run", "runs/tr", "--out", "exp"], dir));
    let pairs: std::collections::HashMap<(String, String), f64> =
        std::fs::read_to_string(dir.join("exp/item_neighbors.tsv"))
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| {
                let f: Vec<&str> = l.split('\t').collect();
                ((f[0].to_owned(), f[1].to_owned()), f[2].parse().unwrap())
            })
            .collect();
    let srv = Server::start(dir, &["--run", "runs/tr"]);
    let a = srv.addr.as_str();
    let history = ["c1_3", "c1_4", "c1_5"];
    let v = post(a, "/v1/recall", &json!({"history": history, "k": 10})).json();
    assert_eq!(v["source"], "model");
    // Each score is the decayed sum of the exported counts from the newest three items.
    for item in v["items"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap();
        let want: f64 = history
            .iter()
            .rev()
            .zip([1.0, 0.5, 0.25])
            .map(|(h, w)| w * pairs.get(&(h.to_string(), id.to_owned())).copied().unwrap_or(0.0))
            .sum();
        assert_eq!(item["score"].as_f64().unwrap(), want, "{id}");
    }
    // The walk moves one or two items on, so the two successors of the newest item lead.
    let mut top: Vec<String> = ids(&v)[..2].to_vec();
    top.sort();
    assert_eq!(top, ["c1_6", "c1_7"], "{v}");
    // An event changes the next recall: a new user's one event leads to that item's successors.
    assert_eq!(post(a, "/v1/events", &json!({"user_id": "fresh", "item_id": "c4_10", "ts": 1})).status, 200);
    let v = post(a, "/v1/recall", &json!({"user_id": "fresh", "k": 3})).json();
    assert_eq!(v["source"], "model", "{v}");
    assert!(ids(&v).iter().all(|i| ["c4_11", "c4_12"].contains(&i.as_str()) || i.starts_with("hot")), "{v}");
    // An index makes no sense for it and is refused at start.
    drop(srv);
    let out = needle(&["serve", "--run", "runs/tr", "--index", "nope.bin", "--addr", "127.0.0.1:0"], dir);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("takes no --index"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_sequential_run_serves_from_the_newest_items_and_follows_events() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(
        dir,
        "seq.toml",
        "[model]\nkind = \"sequential\"\ndim = 16\nmax_seq_len = 10\nblocks = 1\nuser_features = []\n\
         [train]\nepochs = 15\nbatch_size = 16\nlr = 0.005\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\n",
    );
    ok(&needle(&["train", "--config", "seq.toml", "--out", "runs/seq", "--quiet"], dir));
    let srv = Server::start(dir, &["--run", "runs/seq"]);
    let a = srv.addr.as_str();
    let leads = |v: &Value, want: &[&str]| ids(v)[..2].iter().all(|i| want.contains(&i.as_str()));
    let v = post(a, "/v1/recall", &json!({"history": ["c1_3", "c1_4", "c1_5"], "k": 10})).json();
    assert_eq!(v["source"], "model");
    assert!(leads(&v, &["c1_6", "c1_7"]), "{v}");
    // Each event posted for a user moves the next recall on to that item's successors.
    for (ts, item, next) in [(1, "c4_10", ["c4_11", "c4_12"]), (2, "c4_12", ["c4_13", "c4_14"])] {
        assert_eq!(post(a, "/v1/events", &json!({"user_id": "fresh", "item_id": item, "ts": ts})).status, 200);
        let v = post(a, "/v1/recall", &json!({"user_id": "fresh", "k": 5})).json();
        assert_eq!(v["source"], "model", "{v}");
        assert!(leads(&v, &next), "after {item}: {v}");
    }
}

#[test]
fn channels_mix_in_eval_and_in_serving_and_say_who_found_each_item() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    trained_transitions(dir);
    let channels = r#"
merge = "quota"
[[channel]]
name = "yt"
kind = "run"
run = "runs/yt"
quota = 2
[[channel]]
name = "tr"
kind = "run"
run = "runs/tr"
quota = 1
[[channel]]
name = "near"
kind = "similar"
run = "runs/yt"
recent = 2
quota = 1
[[channel]]
name = "popular"
kind = "popularity"
quota = 1
"#;
    std::fs::write(dir.join("channels.toml"), channels).unwrap();

    // Offline: each channel alone is scored as its run is by `needle eval`, then the mix.
    let table = ok(&needle(&["eval", "--channels", "channels.toml", "--k", "5,10", "--metrics", "mix.json"], dir));
    let row = |name: &str| -> Vec<f64> {
        let line = table.lines().find(|l| l.starts_with(&format!("| {name} |"))).unwrap_or_else(|| panic!("{table}"));
        line.split('|').filter_map(|c| c.trim().parse().ok()).collect()
    };
    for (name, run) in [("yt", "runs/yt"), ("tr", "runs/tr")] {
        let alone = ok(&needle(&["eval", "--run", run, "--k", "5,10"], dir));
        let hr10: f64 = alone
            .lines()
            .find(|l| l.split_whitespace().next() == Some("10"))
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap()
            .parse()
            .unwrap();
        assert!((row(name)[1] - hr10).abs() < 1e-4, "{name}: {table}\n{alone}");
    }
    let mix = row("mix (quota)");
    assert_eq!(mix.len(), 4, "{table}");
    // The metrics file holds the table's rows, in its order, with every metric.
    let doc: Value = serde_json::from_str(&std::fs::read_to_string(dir.join("mix.json")).unwrap()).unwrap();
    assert_eq!(doc["stage"], "test");
    let rows = doc["rows"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|r| r["channel"].as_str().unwrap()).collect();
    let printed: Vec<&str> = table.lines().skip(3).filter_map(|l| l.split('|').nth(1)).map(str::trim).collect();
    assert_eq!(names, printed, "{table}");
    for r in rows {
        let m = &r["metrics"];
        let shown = row(r["channel"].as_str().unwrap());
        assert!((m["hit_rate@10"].as_f64().unwrap() - shown[1]).abs() < 1e-4, "{r} against {table}");
        assert!((m["ndcg@5"].as_f64().unwrap() - shown[2]).abs() < 1e-4, "{r} against {table}");
        assert!(m["mrr@10"].as_f64().is_some() && m["users"].as_u64().unwrap() > 0, "{r}");
    }
    assert!(mix.iter().all(|v| (0.0..=1.0).contains(v)), "{table}");
    assert!(mix[1] >= mix[0], "HR@10 below HR@5: {table}");

    // Online: the same mix, each item naming the channels that found it.
    let history = ["c1_3", "c1_4", "c1_5"];
    let req = json!({"history": history, "k": 10});
    let answer = |args: &[&str]| {
        let srv = Server::start(dir, args);
        post(&srv.addr, "/v1/recall", &req).json()
    };
    let yt = ids(&answer(&["--run", "runs/yt"]));
    let tr = ids(&answer(&["--run", "runs/tr"]));
    let v = answer(&["--run", "runs/yt", "--channels", "channels.toml"]);
    let got = ids(&v);
    assert_eq!(got.len(), 10, "{v}");
    let mut distinct = got.clone();
    distinct.sort();
    distinct.dedup();
    assert_eq!(distinct.len(), 10, "duplicates: {v}");
    // Shares of k = 10 at quotas 2:1:1:1 are 4, 2, 2, 2, and yt fills its share first.
    assert_eq!(got[..4], yt[..4], "{v}");
    for item in v["items"].as_array().unwrap() {
        let id = item["id"].as_str().unwrap().to_owned();
        let found: Vec<&str> = item["channels"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
        assert!(!found.is_empty(), "{item}");
        assert_eq!(found.contains(&"yt"), yt.contains(&id), "{item}");
        assert_eq!(found.contains(&"tr"), tr.contains(&id), "{item}");
        assert!(!history.contains(&id.as_str()), "a seen item came back: {item}");
    }
    assert!(got[4..6].iter().all(|i| tr.contains(i)), "tr's share: {v}");

    // A channel that cannot work is refused at start, saying why.
    std::fs::write(
        dir.join("bad.toml"),
        "[[channel]]\nname = \"n\"\nkind = \"similar\"\nrun = \"runs/tr\"\nquota = 1\n",
    )
    .unwrap();
    let out = needle(&["serve", "--run", "runs/yt", "--channels", "bad.toml", "--addr", "127.0.0.1:0"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a run with item vectors"), "{err}");
}

/// The version each of `users` is answered by (a k = 1 recall each, on four client threads).
fn versions_of(addr: &str, users: std::ops::Range<usize>) -> Vec<String> {
    let chunk = users.len().div_ceil(4);
    let threads: Vec<_> = users
        .collect::<Vec<_>>()
        .chunks(chunk)
        .map(|c| {
            let (a, c) = (addr.to_owned(), c.to_vec());
            std::thread::spawn(move || {
                c.iter()
                    .map(|u| {
                        let r = post(&a, "/v1/recall", &json!({"user_id": format!("user{u}"), "k": 1}));
                        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
                        r.json()["version"].as_str().unwrap().to_owned()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
}

#[test]
fn versions_side_by_side_split_users_stably_and_roll_back_under_load() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let srv = Server::start(dir, &["--run", "runs/yt", "--add-version", "pop=runs/pop"]);
    let a = srv.addr.clone();
    let h = http(&a, "GET", "/healthz", b"", "").json();
    let names: Vec<&str> = h["versions"].as_array().unwrap().iter().map(|v| v["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["yt", "pop"], "{h}");
    // A version added at start-up has no traffic until it is given some.
    assert!(versions_of(&a, 0..200).iter().all(|v| v == "yt"));
    // One call, and the admin token, set the split.
    assert_eq!(http(&a, "POST", "/admin/traffic", br#"{"weights":{"yt":90,"pop":10}}"#, "").status, 401);
    let r = post(&a, "/admin/traffic", &json!({"weights": {"yt": 90, "pop": 10}}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["previous"], json!({"yt": 1, "pop": 0}));

    let split = versions_of(&a, 0..10_000);
    let on_pop = split.iter().filter(|v| *v == "pop").count();
    eprintln!("{on_pop} of 10,000 users on the 10% version");
    assert!((800..=1_200).contains(&on_pop), "{on_pop} of 10,000 users on the 10% version");
    // Stable per user: asked again, every user gets the same version.
    assert_eq!(versions_of(&a, 0..2_000), split[..2_000]);
    // The answer is the version's own model.
    let v = post(&a, "/v1/recall", &json!({"user_id": "u3", "k": 5, "version": "pop"})).json();
    assert!(v["model"].as_str().unwrap().starts_with("pop:") && v["version"] == "pop", "{v}");
    post(&a, "/v1/recall", &json!({"user_id": "u3", "version": "nope"})).rejects(400, "no version \"nope\"");
    let text = metrics_text(&a);
    let count = |version: &str| -> u64 {
        let key = format!("needle_version_recalls_total{{version=\"{version}\",class=\"2xx\"}} ");
        text.lines().find_map(|l| l.strip_prefix(&key)).unwrap_or_else(|| panic!("{text}")).parse().unwrap()
    };
    let pop_again = split[..2_000].iter().filter(|v| *v == "pop").count();
    assert_eq!(count("pop") as usize, on_pop + pop_again + 1, "{text}");
    assert_eq!(count("yt") as usize, 200 + 10_000 - on_pop + 2_000 - pop_again, "{text}");
    assert!(text.contains("needle_traffic_weight{version=\"pop\"} 10"), "{text}");
    assert!(text.contains("needle_model_info{version=\"pop\",run=\"pop:"), "{text}");

    // Rollback under load: recalls keep flowing on other threads; none may fail.
    let load = RecallLoad::start(&a, |i| format!("user{i}"));
    std::thread::sleep(Duration::from_millis(300));
    let r = post(&a, "/admin/rollback", &json!({}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["weights"], json!({"yt": 1, "pop": 0}));
    std::thread::sleep(Duration::from_millis(300));
    let (total, failed) = load.stop();
    assert!(failed.is_empty(), "{} failed during the rollback, e.g. {}", failed.len(), failed[0]);
    assert!(total > 20, "{total}");
    assert!(versions_of(&a, 0..1_000).iter().all(|v| v == "yt"));
    // A second rollback rolls forward, and users return to the versions they had.
    assert_eq!(post(&a, "/admin/rollback", &json!({})).status, 200);
    assert_eq!(versions_of(&a, 0..1_000), split[..1_000]);

    // Bad changes are refused and change nothing.
    post(&a, "/admin/traffic", &json!({"weights": {"nope": 1}})).rejects(404, "no version \"nope\"");
    post(&a, "/admin/traffic", &json!({"weights": {"yt": 0}})).rejects(409, "some version traffic");
    post(&a, "/admin/reload", &json!({"run": "runs/pop"})).rejects(400, "say which one");
    post(&a, "/admin/versions", &json!({"name": "pop", "run": "runs/pop"})).rejects(409, "exists");
    post(&a, "/admin/versions", &json!({"name": "b", "run": "runs/missing"})).rejects(422, "cannot load");
    post(&a, "/admin/versions", &json!({"name": "a b", "run": "runs/pop"})).rejects(400, "version name");
    let del = |name: &str| http(&a, "DELETE", &format!("/admin/versions/{name}"), b"", &bearer(TOKEN));
    del("pop").rejects(409, "drain it first");
    del("nope").rejects(404, "no version");
    let t = http(&a, "GET", "/admin/traffic", b"", &bearer(TOKEN)).json();
    assert_eq!(t["weights"], json!({"yt": 90, "pop": 10}), "{t}");

    // Drain, then remove; a new version loads next to the served one and reloads alone.
    assert_eq!(post(&a, "/admin/traffic", &json!({"weights": {"yt": 1}})).status, 200);
    let r = del("pop");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["weights"], json!({"yt": 1}));
    let r = post(&a, "/admin/versions", &json!({"name": "canary", "run": "runs/pop"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["weights"], json!({"yt": 1, "canary": 0}));
    let r = post(&a, "/admin/reload", &json!({"version": "canary", "run": "runs/yt"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let v = post(&a, "/v1/recall", &json!({"user_id": "u3", "k": 5, "version": "canary"})).json();
    assert!(v["model"].as_str().unwrap().starts_with("yt:"), "{v}");
    let list = http(&a, "GET", "/admin/versions", b"", &bearer(TOKEN)).json();
    assert_eq!(list["versions"].as_array().unwrap().len(), 2, "{list}");
    del("yt").rejects(409, "drain it first");
}

/// A small log whose items carry features, and a tower that embeds new items from them:
/// `runs/cold`, with `data/items.csv` (id, category, price band).
fn trained_with_item_features(dir: &Path) {
    let synth = ["data", "synth", "--users", "800", "--items", "400", "--events", "16000", "--csv"];
    ok(&needle(&[&synth[..], &["--cold-items", "0.1", "--out", "data", "--quiet"]].concat(), dir));
    let shipped = include_str!("../../../configs/synth/youtubednn-cold.toml");
    let model = shipped.replace("../../data/synth-cold/schema.toml", "data/schema.toml");
    std::fs::write(dir.join("cold.toml"), model).unwrap();
    ok(&needle(&["--threads", "2", "train", "--config", "cold.toml", "--out", "runs/cold", "--quiet"], dir));
}

/// Polls until `done` holds, for at most `limit`; returns how long it took.
fn within(limit: Duration, what: &str, mut done: impl FnMut() -> bool) -> Duration {
    let t = Instant::now();
    while !done() {
        assert!(t.elapsed() < limit, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    t.elapsed()
}

#[test]
fn two_servers_on_one_redis_cluster_see_each_others_events_and_catalogue_changes() {
    let Some(cluster) = needle_store::testing::cluster() else {
        eprintln!("SKIPPED: no redis-server/redis-cli on PATH and NEEDLE_TEST_REDIS_CLUSTER is not set");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained_with_item_features(dir);
    let url = cluster.url.as_str();
    ok(&needle(&["store", "load", "--run", "runs/cold", "--store", url], dir));
    let args = ["--run", "runs/cold", "--store", url, "--resync-every", "300ms"];
    let (one, two) = (Server::start(dir, &args), Server::start(dir, &args));
    let (a, b) = (one.addr.as_str(), two.addr.as_str());

    // An event posted to one server changes the next recall from the other.
    let user = format!("new-{}-{}", std::process::id(), now_nanos());
    let anon = post(b, "/v1/recall", &json!({"user_id": user, "k": 5})).json();
    assert_eq!(anon["known_user"], false, "{anon}");
    let items = csv_rows(&dir.join("data/items.csv"));
    assert_eq!(post(a, "/v1/events", &json!({"user_id": user, "item_id": items[0][0]})).status, 200);
    let v = post(b, "/v1/recall", &json!({"user_id": user, "k": 5})).json();
    assert_eq!((v["known_user"].as_bool(), v["source"].as_str()), (Some(true), Some("model")), "{v}");

    // An item published on one server is recalled by the other, through the announcement.
    let category = items[0][1].clone();
    let fresh = format!("fresh-{}", now_nanos());
    let body = json!({"items": [{"id": fresh, "title": "Fresh", "category": category, "price_band": items[0][2]}]});
    let r = post(a, "/v1/items", &body);
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let ask = json!({"user_id": user, "k": 400, "filter": {"category": category}, "exclude_seen": false});
    let took = within(Duration::from_secs(5), "the other server recalls the published item", || {
        ids(&post(b, "/v1/recall", &ask).json()).contains(&fresh)
    });
    eprintln!("published on one server, recalled by the other after {took:?}");
    assert!(metrics_text(b).contains("needle_changes_followed_total 1\n"), "{}", metrics_text(b));
    // Deleted on the other one: gone from both.
    let r = http(b, "DELETE", &format!("/v1/items/{fresh}"), b"", &bearer(TOKEN));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    within(Duration::from_secs(5), "the delete reaches the first server", || {
        !ids(&post(a, "/v1/recall", &ask).json()).contains(&fresh)
    });
    assert!(!ids(&post(b, "/v1/recall", &ask).json()).contains(&fresh));

    // A change nobody announced (written to the store directly) is found by the re-sync.
    let quiet = format!("quiet-{}", now_nanos());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use needle_store::Store;
        let s = needle_store::RedisStore::connect(url).await.unwrap();
        let details = needle_store::ItemDetails {
            title: Some("Quiet".into()),
            attributes: [
                ("category".to_owned(), vec![category.clone()]),
                ("price_band".to_owned(), vec![items[0][2].clone()]),
            ]
            .into(),
        };
        s.upsert_items(&[needle_store::ItemRecord { id: quiet.clone(), details }]).await.unwrap();
    });
    for srv in [a, b] {
        within(Duration::from_secs(5), "the re-sync applies an unannounced change", || {
            ids(&post(srv, "/v1/recall", &ask).json()).contains(&quiet)
        });
        assert!(!metrics_text(srv).contains("needle_resyncs_total 0\n"));
    }
}

#[test]
fn a_redis_cluster_master_killed_under_load_fails_requests_only_for_the_failover() {
    let Some(mut cluster) = needle_store::testing::private_cluster(3, 1) else {
        eprintln!("SKIPPED: no redis-server/redis-cli on PATH");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained(dir);
    let url = cluster.url.clone();
    ok(&needle(&["store", "load", "--run", "runs/yt", "--store", &url], dir));
    let srv = Server::start(dir, &["--run", "runs/yt", "--store", &url]);
    let a = srv.addr.clone();
    let master = *cluster
        .ports
        .iter()
        .find(|p| {
            let out = Command::new("redis-cli").args(["-p", &p.to_string(), "role"]).output().unwrap();
            String::from_utf8_lossy(&out.stdout).starts_with("master")
        })
        .unwrap();

    // Recalls of known users (every one reads a user's shard and item details on all shards).
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let client = {
        let (a, stop) = (a.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = post(&a, "/v1/recall", &json!({"user_id": format!("u{}", n % 300), "k": 10}));
                log.push((Instant::now(), r.status));
                n += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            log
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    let killed = Instant::now();
    cluster.kill(master);
    // Recovered: a full second of answers after the kill without a failure.
    let recovered = within(Duration::from_secs(30), "serving recovers after the failover", || {
        let t = Instant::now();
        while t.elapsed() < Duration::from_secs(1) {
            if post(&a, "/v1/recall", &json!({"user_id": "u7", "k": 10})).status != 200 {
                return false;
            }
        }
        true
    });
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let log = client.join().unwrap();
    let failed: Vec<&(Instant, u16)> = log.iter().filter(|(_, s)| *s != 200).collect();
    assert!(failed.iter().all(|(_, s)| *s == 503), "failures other than 503: {failed:?}");
    let window = match (failed.first(), failed.last()) {
        (Some(f), Some(l)) => l.0.duration_since(f.0),
        _ => Duration::ZERO,
    };
    assert!(failed.iter().all(|(t, _)| *t >= killed), "requests failed before the kill");
    eprintln!(
        "{} requests, {} failed (all 503) over {window:?} after the kill; serving again after {recovered:?}",
        log.len(),
        failed.len()
    );
    assert!(log.iter().filter(|(t, s)| *t > killed + recovered && *s == 200).count() > 0);
}

#[test]
fn a_newest_channel_serves_published_items_first_then_the_latest_trained_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    trained_with_item_features(dir);
    // Each item's first training event, counted here from the log: leave-last-out keeps each
    // user's last two events (time order; the generator's times increase per user) out of
    // training.
    let mut by_user: std::collections::BTreeMap<String, Vec<(i64, String)>> = Default::default();
    for e in csv_rows(&dir.join("data/events.csv")) {
        by_user.entry(e[0].clone()).or_default().push((e[2].parse().unwrap(), e[1].clone()));
    }
    let mut first: std::collections::HashMap<String, i64> = Default::default();
    for events in by_user.values_mut() {
        events.sort_by_key(|e| e.0);
        for (t, item) in &events[..events.len() - 2] {
            let f = first.entry(item.clone()).or_insert(*t);
            *f = (*f).min(*t);
        }
    }
    let vocab: std::collections::HashMap<u32, String> = std::fs::read_to_string(dir.join("runs/cold/vocab/items.tsv"))
        .unwrap()
        .lines()
        .map(|l| {
            let (row, raw) = l.split_once('\t').unwrap();
            (row.parse().unwrap(), raw.to_owned())
        })
        .collect();
    let mut trained: Vec<(i64, u32)> = Vec::new();
    for line in std::fs::read_to_string(dir.join("runs/cold/item_counts.tsv")).unwrap().lines() {
        let f: Vec<&str> = line.split('\t').collect();
        let (row, count, t): (u32, u64, i64) = (f[0].parse().unwrap(), f[1].parse().unwrap(), f[2].parse().unwrap());
        if count > 0 {
            assert_eq!(Some(&t), first.get(&vocab[&row]), "first event of item {}", vocab[&row]);
            trained.push((t, row));
        }
    }
    assert_eq!(trained.len(), first.len());
    trained.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let expected: Vec<&str> = trained.iter().map(|(_, r)| vocab[r].as_str()).collect();

    // Weighted so that the newest channel's order decides the mix.
    let channels = "merge = \"rrf\"\n[[channel]]\nname = \"model\"\nkind = \"run\"\nrun = \"runs/cold\"\nquota = 1\n\
                    [[channel]]\nname = \"fresh\"\nkind = \"newest\"\nquota = 1000\n";
    std::fs::write(dir.join("channels.toml"), channels).unwrap();
    let table = ok(&needle(&["eval", "--channels", "channels.toml", "--k", "10"], dir));
    assert!(table.lines().any(|l| l.starts_with("| fresh |")), "{table}");
    // Compacting at two published items, so the answers below also come through the sealed graph.
    let srv = Server::start(dir, &["--run", "runs/cold", "--channels", "channels.toml", "--compact-live-at", "2"]);
    let ask = json!({"user_id": "u0", "k": 20, "exclude_seen": false});
    let got = ids(&post(&srv.addr, "/v1/recall", &ask).json());
    assert_eq!(got, expected[..20], "the newest trained items, latest first");

    // Published items come first, the latest first; deleted ones go.
    let item = |id: &str| json!({"id": id, "title": id, "category": "cat1", "price_band": "p1"});
    assert_eq!(post(&srv.addr, "/v1/items", &json!({"items": [item("new-a")]})).status, 200);
    assert_eq!(post(&srv.addr, "/v1/items", &json!({"items": [item("new-b")]})).status, 200);
    within(Duration::from_secs(10), "the two published items are compacted", || {
        http(&srv.addr, "GET", "/healthz", b"", "").json()["sealed_items"] == 2
    });
    let v = post(&srv.addr, "/v1/recall", &ask).json();
    assert_eq!(ids(&v)[..3], ["new-b", "new-a", expected[0]], "{v}");
    // Sealed items answer filters from their own attributes.
    let v = post(
        &srv.addr,
        "/v1/recall",
        &json!({"user_id": "u0", "k": 400, "exclude_seen": false, "filter": {"category": "cat1"}}),
    )
    .json();
    assert!(ids(&v).contains(&"new-a".to_owned()), "{v}");
    assert!(v["items"][0]["channels"].as_array().unwrap().contains(&json!("fresh")), "{v}");
    // Under a filter the published items are judged on their own attributes.
    let v = post(&srv.addr, "/v1/recall", &json!({"user_id": "u0", "k": 5, "filter": {"category": "cat2"}})).json();
    assert!(!ids(&v).iter().any(|i| i.starts_with("new-")), "{v}");
    assert_eq!(http(&srv.addr, "DELETE", "/v1/items/new-b", b"", &bearer(TOKEN)).status, 200);
    assert_eq!(ids(&post(&srv.addr, "/v1/recall", &ask).json())[..2], ["new-a", expected[0]]);
}
