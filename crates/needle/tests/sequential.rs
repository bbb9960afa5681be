//! The sequential kind on a log where only order tells the next item: every item has one fixed
//! successor, users follow it for a few steps and then jump to a random item, and the last event
//! of every user follows its successor. A model that reads the newest item learns it; a
//! mean-pooled history cannot tell which of its items is the newest.

mod common;

use common::{draws, needle, ok, write_config};
use std::path::Path;

/// A random permutation of `0..n`, so item names carry no order.
fn permutation(n: usize, next: &mut impl FnMut(usize) -> usize) -> Vec<usize> {
    let mut p: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        p.swap(i, next(i + 1));
    }
    p
}

/// Writes `csv` (user, item, ts) as `log.csv` with the schema that reads it.
fn write_log(dir: &Path, name: &str, csv: &str) {
    std::fs::write(dir.join("log.csv"), csv).unwrap();
    let schema = format!(
        "name = \"{name}\"\n[interactions]\npath = \"log.csv\"\nheader = true\nuser = \"user\"\nitem = \"item\"\ntimestamp = \"ts\"\n"
    );
    std::fs::write(dir.join("schema.toml"), schema).unwrap();
}

fn successor_log(dir: &Path) {
    let (items, users) = (100usize, 400usize);
    let mut next = draws(777);
    let succ = permutation(items, &mut next);
    let mut csv = String::from("user,item,ts\n");
    for u in 0..users {
        let len = 12 + next(13);
        // Drawn again until the successor of the second-to-last item is new to the user: the
        // test target must follow it and must not be a seen (hence excluded) item.
        let seq = loop {
            let mut seq: Vec<usize> = Vec::with_capacity(len);
            let mut used = vec![false; items];
            let mut cur = next(items);
            while seq.len() < len {
                seq.push(cur);
                used[cur] = true;
                let follow = next(3) != 0;
                cur = succ[cur];
                while !follow || used[cur] {
                    // A jump: any item the user has not met yet.
                    cur = next(items);
                    if !used[cur] {
                        break;
                    }
                }
            }
            let target = succ[seq[len - 2]];
            if !seq[..len - 1].contains(&target) {
                seq[len - 1] = target;
                break seq;
            }
        };
        for (t, item) in seq.iter().enumerate() {
            csv.push_str(&format!("u{u},i{item},{}\n", 1_000_000 + u * 1000 + t));
        }
    }
    write_log(dir, "successors", &csv);
}

fn hit_rate(dir: &Path, run: &str, k: usize) -> f64 {
    let text = std::fs::read_to_string(dir.join("runs").join(run).join("metrics.json")).unwrap();
    serde_json::from_str::<serde_json::Value>(&text).unwrap()[format!("hit_rate@{k}")].as_f64().unwrap()
}

#[test]
fn a_planted_successor_is_learned_by_the_sequential_model_and_not_by_mean_pooling() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    successor_log(dir);
    write_config(
        dir,
        "seq.toml",
        "[model]\nkind = \"sequential\"\ndim = 32\nmax_seq_len = 30\nblocks = 1\nheads = 2\nuser_features = []\n\
         [train]\nepochs = 30\nbatch_size = 16\nlr = 0.005\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\n",
    );
    // The same model with HSTU's gated blocks.
    write_config(
        dir,
        "hstu.toml",
        "[model]\nkind = \"sequential\"\nblock = \"hstu\"\ndim = 32\nmax_seq_len = 30\nblocks = 1\nheads = 2\nuser_features = []\n\
         [train]\nepochs = 30\nbatch_size = 16\nlr = 0.005\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\n",
    );
    write_config(
        dir,
        "mean.toml",
        "[model]\nkind = \"youtubednn\"\ndim = 32\nhidden = [64]\nmax_seq_len = 30\nuser_features = []\nexample_age = false\n\
         [train]\nepochs = 40\nbatch_size = 64\nlr = 0.005\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\n",
    );
    for run in ["seq", "hstu", "mean"] {
        ok(&needle(&["train", "--config", &format!("{run}.toml"), "--out", &format!("runs/{run}"), "--quiet"], dir));
        ok(&needle(&["eval", "--run", &format!("runs/{run}"), "--k", "1,10"], dir));
    }
    let (seq, hstu, mean) = (hit_rate(dir, "seq", 1), hit_rate(dir, "hstu", 1), hit_rate(dir, "mean", 1));
    eprintln!("HR@1: sequential {seq}, sequential with HSTU blocks {hstu}, mean-pooled YouTubeDNN {mean}");
    assert!(seq >= 0.9, "sequential HR@1 {seq}");
    assert!(hstu >= 0.9, "sequential (HSTU blocks) HR@1 {hstu}");
    assert!(mean < 0.5 * seq, "mean-pooled YouTubeDNN HR@1 {mean} against sequential {seq}");
}

/// A log where the item after `x` depends on how long the user paused before `x`: after a pause
/// of a second it is `fast[x]`, after a day `slow[x]`. Only a tower that reads the time gaps can
/// tell the two apart; the item order alone gives each successor half the time.
fn pause_log(dir: &Path) {
    let (items, users) = (60usize, 500usize);
    let mut next = draws(4242);
    let (fast, slow) = (permutation(items, &mut next), permutation(items, &mut next));
    let mut csv = String::from("user,item,ts\n");
    for u in 0..users {
        let len = 10 + next(10);
        let seq = loop {
            let (mut items_seq, mut times) = (vec![next(items)], vec![1_000_000i64]);
            let mut used = vec![false; items];
            used[items_seq[0]] = true;
            while items_seq.len() < len {
                let n = items_seq.len();
                let cur = items_seq[n - 1];
                let paused = times[n - 1] - times.get(n.wrapping_sub(2)).copied().unwrap_or(times[n - 1]) > 60;
                let mut pick = if next(3) != 0 {
                    if paused {
                        slow[cur]
                    } else {
                        fast[cur]
                    }
                } else {
                    next(items)
                };
                while used[pick] {
                    pick = next(items);
                }
                used[pick] = true;
                items_seq.push(pick);
                times.push(times[n - 1] + if next(2) == 0 { 1 } else { 86_400 });
            }
            // The test target follows the rule from the second-to-last event.
            let n = items_seq.len();
            let paused = times[n - 2] - times[n - 3] > 60;
            let target = if paused { slow[items_seq[n - 2]] } else { fast[items_seq[n - 2]] };
            if !items_seq[..n - 1].contains(&target) {
                items_seq[n - 1] = target;
                break items_seq.into_iter().zip(times).collect::<Vec<_>>();
            }
        };
        for (item, ts) in seq {
            csv.push_str(&format!("u{u},i{item},{ts}\n"));
        }
    }
    write_log(dir, "pauses", &csv);
}

#[test]
fn time_gap_buckets_learn_what_a_pause_means_and_such_a_run_is_refused_by_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    pause_log(dir);
    let model =
        "[model]\nkind = \"sequential\"\ndim = 32\nmax_seq_len = 30\nblocks = 1\nheads = 2\nuser_features = []\n";
    let train =
        "[train]\nepochs = 30\nbatch_size = 16\nlr = 0.005\nembedding_lr = 0.005\ntemperature = 0.1\npatience = 0\n";
    write_config(dir, "plain.toml", &format!("{model}{train}"));
    write_config(dir, "timed.toml", &format!("{model}time_buckets = 24\n{train}"));
    for run in ["plain", "timed"] {
        ok(&needle(&["train", "--config", &format!("{run}.toml"), "--out", &format!("runs/{run}"), "--quiet"], dir));
        ok(&needle(&["eval", "--run", &format!("runs/{run}"), "--k", "1,10"], dir));
    }
    let (plain, timed) = (hit_rate(dir, "plain", 1), hit_rate(dir, "timed", 1));
    eprintln!("HR@1: without time gaps {plain}, with time gaps {timed}");
    assert!(timed >= 0.8, "with time gaps HR@1 {timed}");
    assert!(plain <= timed - 0.2, "without time gaps HR@1 {plain} against {timed}");
    // Offline recall reads the times from the log; the store has none to give.
    let out = needle(&["serve", "--run", "runs/timed", "--addr", "127.0.0.1:0"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("time_buckets"), "{err}");
}
