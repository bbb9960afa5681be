//! Training/serving parity: for every model kind, a served `/v1/recall` with an exact index
//! answers each user exactly as `needle recall` does offline — the same ids in the same order,
//! scores within 1e-5 — given the same history, sent with the request or stored event by event
//! through `/v1/events`. Both sides build the tower's input through one
//! user window and score through one canonical dot product, so any skew between them shows here.
//!
//! The generated log runs in every test run; MovieLens-100k runs when its files are found
//! (`NEEDLE_DATA_DIR`, or `shared/data` beside the repository).

mod common;

use common::server::{http, post, Server};
use common::{needle, ok, planted_log};
use serde_json::{json, Value};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

const K: usize = 20;

/// Small configs of every kind the server answers with a model (popularity answers unknown
/// users by design and is left out), for the planted log.
const KINDS: &[(&str, &str)] = &[
    (
        "youtubednn",
        "[model]\nkind = \"youtubednn\"\ndim = 16\nhidden = [32]\nuser_features = [\"country\"]\nfeature_dim = 4\nmax_seq_len = 10\nrecent = 2\n",
    ),
    (
        "dssm",
        "[model]\nkind = \"dssm\"\ndim = 16\nhidden = [32]\nitem_hidden = [32]\nout_dim = 16\nuser_features = [\"user_id\", \"country\"]\nhistory = true\nmax_seq_len = 10\n",
    ),
    ("fm", "[model]\nkind = \"fm\"\ndim = 8\nuser_features = [\"user_id\", \"country\"]\nhistory = true\nmax_seq_len = 10\n"),
    (
        "mind",
        "[model]\nkind = \"mind\"\ndim = 16\nhidden = [32]\nuser_features = [\"country\"]\ninterests = 2\nmax_seq_len = 10\n",
    ),
    (
        "sequential",
        "[model]\nkind = \"sequential\"\ndim = 16\nmax_seq_len = 8\nblocks = 1\nheads = 2\nffn = 32\nuser_features = []\n",
    ),
    (
        "hstu",
        "[model]\nkind = \"sequential\"\nblock = \"hstu\"\ndim = 16\nmax_seq_len = 8\nblocks = 1\nheads = 2\nuser_features = []\n",
    ),
    ("transitions", "[model]\nkind = \"transitions\"\nrecent = 3\nmax_seq_len = 10\n"),
    ("itemcf", "[model]\nkind = \"itemcf\"\nrecent = 3\nwindow = 3\nneighbors = 50\nmax_seq_len = 10\n"),
];

const TRAIN: &str = "[train]\nepochs = 1\nbatch_size = 64\nlr = 0.005\nembedding_lr = 0.01\ntemperature = 0.1\npatience = 0\nseed = 7\nthreads = 2\n";

/// `user → [(item, score)]` from `needle recall --scores`.
fn offline(dir: &Path, run: &str, extra: &[&str]) -> HashMap<String, Vec<(String, f32)>> {
    let args =
        [&["--threads", "2", "recall", "--run", run, "--users", "all", "--k", "20", "--scores"][..], extra].concat();
    let text = ok(&needle(&args, dir));
    text.lines()
        .map(|line| {
            let (user, items) = line.split_once('\t').expect("user<TAB>items");
            let items = items
                .split(',')
                .filter(|s| !s.is_empty())
                .map(|pair| {
                    let (id, score) = pair.rsplit_once(':').expect("item:score");
                    (id.to_owned(), score.parse().expect("a score"))
                })
                .collect();
            (user.to_owned(), items)
        })
        .collect()
}

/// Each user's known history (every event but the last, in time order, file order breaking
/// ties) in raw ids, keeping the items the run has a row for (a server refuses the others).
fn histories(events: &[(String, String, i64)], run: &Path) -> HashMap<String, Vec<String>> {
    let vocab = std::fs::read_to_string(run.join("vocab/items.tsv")).unwrap();
    let known: HashSet<&str> = vocab.lines().filter_map(|l| l.split_once('\t')).map(|(_, raw)| raw).collect();
    let mut by_user: HashMap<String, Vec<(i64, usize, String)>> = HashMap::new();
    for (i, (u, it, ts)) in events.iter().enumerate() {
        by_user.entry(u.clone()).or_default().push((*ts, i, it.clone()));
    }
    by_user
        .into_iter()
        .map(|(u, mut evs)| {
            evs.sort();
            evs.pop();
            (u, evs.into_iter().map(|e| e.2).filter(|it| known.contains(it.as_str())).collect())
        })
        .collect()
}

/// Trains `kind` from `config`, then compares the served answer of every user with the offline
/// one; returns how many users were compared.
fn check_kind(dir: &Path, name: &str, config: &str, events: &[(String, String, i64)], extra: &[&str]) -> usize {
    let run = format!("runs/{name}");
    let cfg = format!("{name}.toml");
    std::fs::write(dir.join(&cfg), config).unwrap();
    ok(&needle(&[&["--threads", "2", "train", "--config", &cfg, "--out", &run, "--quiet"][..], extra].concat(), dir));
    let counted = matches!(name, "transitions" | "itemcf");
    // The store keeps whole histories (up to 1,000 items), so a stored user's seen items are all
    // left out, as offline.
    let mut serve_args = vec!["--run", run.as_str(), "--seen-history", "1000"];
    serve_args.extend_from_slice(extra);
    if !counted {
        ok(&needle(
            &[&["--threads", "2", "index", "build", "--run", &run, "--kind", "exact"][..], extra].concat(),
            dir,
        ));
    }
    let want = offline(dir, &run, extra);
    let hist = histories(events, &dir.join(&run));
    let server = Server::start(dir, &serve_args);
    let mut users: Vec<&String> = want.keys().collect();
    users.sort();
    let mut mismatches = Vec::new();
    let recall = |body: Value| -> Vec<(String, f32)> {
        let r = http(&server.addr, "POST", "/v1/recall", body.to_string().as_bytes(), "");
        assert_eq!(r.status, 200, "{name} {body}: {}", String::from_utf8_lossy(&r.body));
        let v: Value = r.json();
        v["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| (i["id"].as_str().unwrap().to_owned(), i["score"].as_f64().unwrap() as f32))
            .collect()
    };
    let mut compare = |how: &str, user: &str, got: Vec<(String, f32)>, want: &HashMap<String, Vec<(String, f32)>>| {
        let expected = &want[user];
        let same_ids = got.iter().map(|g| &g.0).eq(expected.iter().map(|e| &e.0));
        let close = got.iter().zip(expected).all(|(g, e)| (g.1 - e.1).abs() <= 1e-5);
        if !same_ids || !close {
            mismatches.push(format!("user {user} ({how}):\n  served  {got:?}\n  offline {expected:?}"));
        }
    };
    for user in &users {
        compare("history sent", user, recall(json!({"user_id": user, "history": hist[*user], "k": K})), &want);
    }
    // The stored path: a user the store does not know yet, whose events arrive one by one through
    // /v1/events, then a recall by id alone. Only for towers that read no user features (a new
    // user has none).
    if matches!(name, "sequential" | "hstu" | "transitions" | "itemcf") {
        for user in users.iter().take(15) {
            let fresh = format!("fresh-{user}");
            for item in &hist[*user] {
                let r = post(&server.addr, "/v1/events", &json!({"user_id": fresh, "item_id": item}));
                assert_eq!(r.status, 200, "{name}: {}", String::from_utf8_lossy(&r.body));
            }
            compare("stored, then events", user, recall(json!({"user_id": fresh, "k": K})), &want);
        }
    }
    assert!(
        mismatches.is_empty(),
        "{name}: {} of {} users differ between /v1/recall and needle recall, e.g.\n{}",
        mismatches.len(),
        users.len(),
        mismatches.iter().take(3).cloned().collect::<Vec<_>>().join("\n")
    );
    users.len()
}

/// `(user, item, timestamp)` of a CSV log with a header `user,item,ts,…`.
fn csv_events(path: &Path) -> Vec<(String, String, i64)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].parse().unwrap())
        })
        .collect()
}

#[test]
fn served_recalls_equal_offline_recalls_for_every_kind_on_a_generated_log() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    let events = csv_events(&dir.join("log.csv"));
    for (name, model) in KINDS {
        let config = format!("[data]\nschema = \"schema.toml\"\n{model}{TRAIN}");
        let n = check_kind(dir, name, &config, &events, &[]);
        assert_eq!(n, 300, "{name}: every user is compared");
    }
}

/// MovieLens-100k's folder, when its files are here.
fn ml100k() -> Option<PathBuf> {
    let root = std::env::var_os("NEEDLE_DATA_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data"));
    let dir = root.join("ml-100k");
    dir.join("u.data").exists().then_some(dir)
}

#[test]
fn served_recalls_equal_offline_recalls_on_movielens_100k() {
    let Some(data) = ml100k() else {
        eprintln!("MovieLens-100k not found (set NEEDLE_DATA_DIR); the generated-log parity test covers every kind");
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let events: Vec<(String, String, i64)> = std::fs::read_to_string(data.join("u.data"))
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), f[1].to_owned(), f[3].parse().unwrap())
        })
        .collect();
    let root = data.parent().unwrap().to_str().unwrap().to_owned();
    let ml_kinds: &[(&str, &str)] = &[
        ("youtubednn", "[model]\nkind = \"youtubednn\"\ndim = 32\nhidden = [64]\nuser_features = [\"gender\", \"age\", \"occupation\"]\nmax_seq_len = 50\nrecent = 3\n"),
        ("dssm", "[model]\nkind = \"dssm\"\ndim = 32\nhidden = [64]\nitem_hidden = [64]\nout_dim = 32\nuser_features = [\"user_id\", \"gender\", \"age\", \"occupation\", \"zip\"]\nitem_features = [\"genres\", \"year\"]\nhistory = true\nmax_seq_len = 50\nrecent = 3\n"),
        ("fm", "[model]\nkind = \"fm\"\ndim = 16\nuser_features = [\"user_id\", \"gender\", \"age\", \"occupation\", \"zip\"]\nitem_features = [\"genres\"]\nhistory = true\nmax_seq_len = 10\n"),
        ("mind", "[model]\nkind = \"mind\"\ndim = 32\nhidden = [64]\nuser_features = [\"gender\", \"age\", \"occupation\", \"zip\"]\ninterests = 2\nmax_seq_len = 50\n"),
        ("sequential", "[model]\nkind = \"sequential\"\ndim = 16\nmax_seq_len = 50\nblocks = 1\nheads = 1\nffn = 16\nuser_features = []\n"),
        ("hstu", "[model]\nkind = \"sequential\"\nblock = \"hstu\"\ndim = 16\nmax_seq_len = 50\nblocks = 1\nheads = 1\nuser_features = []\n"),
        ("transitions", "[model]\nkind = \"transitions\"\nrecent = 3\nmax_seq_len = 50\n"),
        ("itemcf", "[model]\nkind = \"itemcf\"\nrecent = 5\nwindow = 5\nneighbors = 200\nmax_seq_len = 50\n"),
    ];
    for (name, model) in ml_kinds {
        let config = format!(
            "[data]\ndataset = \"ml-100k\"\nsplit = \"leave-last-out\"\n{model}[train]\nepochs = 1\nbatch_size = 256\nloss = \"full\"\nlr = 0.002\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\nseed = 42\nthreads = 2\n"
        );
        let n = check_kind(dir, name, &config, &events, &["--data-dir", &root]);
        assert_eq!(n, 943, "{name}: every user is compared");
    }
}
