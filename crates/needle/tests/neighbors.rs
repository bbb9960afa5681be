//! The item-to-item kinds (transitions, item-CF) against counts made here, independently, from
//! the raw log: exported neighbour weights must equal them and recall must rank by them.

mod common;

use common::{needle, ok, planted_log, train_log, write_config};
use std::collections::HashMap;
use std::path::Path;

/// Each user's items in time order (the planted log's timestamps are distinct per user).
fn sequences(dir: &Path) -> Vec<(String, Vec<String>)> {
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    let mut by_user: Vec<(String, Vec<(i64, String)>)> = Vec::new();
    for line in log.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        let ts: i64 = f[2].parse().unwrap();
        match by_user.iter_mut().find(|(u, _)| u == f[0]) {
            Some((_, v)) => v.push((ts, f[1].to_owned())),
            None => by_user.push((f[0].to_owned(), vec![(ts, f[1].to_owned())])),
        }
    }
    by_user
        .into_iter()
        .map(|(u, mut v)| {
            v.sort_by_key(|e| e.0);
            (u, v.into_iter().map(|e| e.1).collect())
        })
        .collect()
}

type Pairs = HashMap<(String, String), f64>;

/// Leave-last-out: the training sequence is everything but the last two events.
fn training(seqs: &[(String, Vec<String>)]) -> Vec<&[String]> {
    seqs.iter().map(|(_, s)| &s[..s.len().saturating_sub(2)]).collect()
}

fn transitions(train: &[&[String]]) -> Pairs {
    let mut t = Pairs::new();
    for s in train {
        for w in s.windows(2) {
            if w[0] != w[1] {
                *t.entry((w[0].clone(), w[1].clone())).or_default() += 1.0;
            }
        }
    }
    t
}

fn itemcf(train: &[&[String]], window: usize) -> Pairs {
    let mut n: HashMap<&str, f64> = HashMap::new();
    let mut c = Pairs::new();
    for s in train {
        for (i, a) in s.iter().enumerate() {
            *n.entry(a).or_default() += 1.0;
            for (j, b) in s.iter().enumerate() {
                if i != j && i.abs_diff(j) <= window && a != b {
                    *c.entry((a.clone(), b.clone())).or_default() += 1.0;
                }
            }
        }
    }
    c.into_iter()
        .map(|((a, b), x)| {
            let w = x / (n[a.as_str()] * n[b.as_str()]).sqrt();
            ((a, b), w)
        })
        .collect()
}

fn exported(dir: &Path, run: &str) -> Pairs {
    let out = format!("exp-{run}");
    ok(&needle(&["export", "--run", &format!("runs/{run}"), "--out", &out], dir));
    let text = std::fs::read_to_string(dir.join(&out).join("item_neighbors.tsv")).unwrap();
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("item_id\tneighbor_id\tweight"));
    lines
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            ((f[0].to_owned(), f[1].to_owned()), f[2].parse::<f64>().unwrap())
        })
        .collect()
}

#[test]
fn neighbour_weights_equal_an_independent_count() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "tr.toml", "[model]\nkind = \"transitions\"\nrecent = 3\nneighbors = 1000\n");
    write_config(dir, "cf.toml", "[model]\nkind = \"itemcf\"\nwindow = 2\nneighbors = 1000\n");
    for run in ["tr", "cf"] {
        ok(&needle(&["train", "--config", &format!("{run}.toml"), "--out", &format!("runs/{run}"), "--quiet"], dir));
    }
    let seqs = sequences(dir);
    let train = training(&seqs);

    let want = transitions(&train);
    let got = exported(dir, "tr");
    assert!(want.len() > 100, "the log has only {} transitions", want.len());
    assert_eq!(got.len(), want.len());
    for (pair, w) in &want {
        assert_eq!(got.get(pair), Some(w), "transition {pair:?}");
    }

    let want = itemcf(&train, 2);
    let got = exported(dir, "cf");
    assert_eq!(got.len(), want.len());
    for (pair, w) in &want {
        let g = got.get(pair).unwrap_or_else(|| panic!("item-CF pair {pair:?} missing"));
        assert!((g - w).abs() <= 1e-6 * w.max(1.0), "item-CF {pair:?}: {g} vs {w}");
    }
}

#[test]
fn transitions_recall_ranks_by_the_counted_scores_then_popularity() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "tr.toml", "[model]\nkind = \"transitions\"\nrecent = 3\n");
    write_config(dir, "pop.toml", "[model]\nkind = \"popularity\"\n");
    ok(&needle(&["train", "--config", "tr.toml", "--out", "runs/tr", "--quiet"], dir));
    ok(&needle(&["train", "--config", "pop.toml", "--out", "runs/pop", "--quiet"], dir));
    let seqs = sequences(dir);
    let train = training(&seqs);
    let t = transitions(&train);
    let mut count: HashMap<&str, u64> = HashMap::new();
    for s in &train {
        for i in s.iter() {
            *count.entry(i).or_default() += 1;
        }
    }
    let k = 30;
    let users: Vec<&str> = seqs.iter().take(40).map(|(u, _)| u.as_str()).collect();
    let out = ok(&needle(&["recall", "--run", "runs/tr", "--users", &users.join(","), "--k", &k.to_string()], dir));
    for (line, (user, seq)) in out.lines().zip(&seqs) {
        let (u, items) = line.split_once('\t').unwrap();
        assert_eq!(u, user);
        let known = &seq[..seq.len() - 1];
        let score = |item: &str| -> f64 {
            known
                .iter()
                .rev()
                .take(3)
                .zip([1.0, 0.5, 0.25])
                .map(|(h, w)| w * t.get(&(h.clone(), item.to_owned())).copied().unwrap_or(0.0))
                .sum()
        };
        let key = |item: &str| (score(item), count.get(item).copied().unwrap_or(0));
        let items: Vec<&str> = items.split(',').collect();
        assert_eq!(items.len(), k, "{user}");
        for w in items.windows(2) {
            assert!(key(w[0]) >= key(w[1]), "{user}: {} {:?} before {} {:?}", w[0], key(w[0]), w[1], key(w[1]));
        }
        let last = key(items[k - 1]);
        for item in count.keys() {
            if !items.contains(item) && !known.iter().any(|h| h == item) {
                assert!(key(item) <= last, "{user}: {item} {:?} left out, the list ends at {last:?}", key(item));
            }
        }
    }
    // On planted sequences the counted successors beat popularity by far.
    let hr = |run: &str| -> f64 {
        let text = std::fs::read_to_string(dir.join("runs").join(run).join("metrics.json")).unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()["hit_rate@10"].as_f64().unwrap()
    };
    assert!(hr("tr") > 2.0 * hr("pop") && hr("tr") > 0.3, "transitions {} vs popularity {}", hr("tr"), hr("pop"));
}

#[test]
fn item_to_item_runs_refuse_what_needs_vectors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "tr.toml", "[model]\nkind = \"transitions\"\n");
    ok(&needle(&["train", "--config", "tr.toml", "--out", "runs/tr", "--quiet"], dir));
    let out = needle(&["index", "build", "--run", "runs/tr"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no vectors to index"), "{err}");
    write_config(dir, "bad.toml", "[model]\nkind = \"youtubednn\"\nwindow = 3\n");
    let out = needle(&["train", "--config", "bad.toml", "--out", "runs/bad"], dir);
    assert!(String::from_utf8_lossy(&out.stderr).contains("window applies to transitions and itemcf only"));
}

#[test]
fn counted_validation_scores_the_sample_valid_users_asks_for() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    let body = "[model]\nkind = \"transitions\"\nrecent = 3\n";
    write_config(dir, "all.toml", body);
    write_config(dir, "one.toml", &format!("{body}[train]\nvalid_users = 1\n"));
    let valid_hr = |run: &str| -> f64 {
        ok(&needle(&["train", "--config", &format!("{run}.toml"), "--out", &format!("runs/{run}"), "--quiet"], dir));
        train_log(&dir.join("runs").join(run))[0]["valid_hr10"].as_f64().unwrap()
    };
    // Over every user the hit rate is a fraction; over a sample of one it is all or nothing.
    let all = valid_hr("all");
    assert!(all > 0.0 && all < 1.0, "validation HR@10 over all users: {all}");
    let one = valid_hr("one");
    assert!(one == 0.0 || one == 1.0, "validation HR@10 over one user: {one}");
}
