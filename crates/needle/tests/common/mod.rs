//! Helpers shared by the end-to-end tests.
#![allow(dead_code)]

pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn needle(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needle")).args(args).current_dir(cwd).output().expect("needle runs")
}

pub fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "needle failed:\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Seeded draws below `n` (xorshift), so a generated log is the same on every run.
pub fn draws(seed: u64) -> impl FnMut(usize) -> usize {
    let mut state = seed;
    move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    }
}

/// A log with planted structure: users belong to one of `clusters` taste groups and walk
/// through their group's items in order, with 15% of events on a few globally hot items.
/// Popularity can only find the hot items; a model that learns the groups and the order can
/// find the next item.
pub fn planted_log(dir: &Path) -> PathBuf {
    let (users, clusters, per_cluster, hot) = (300usize, 8usize, 25usize, 5usize);
    let mut next = draws(12345);
    let mut csv = String::from("user,item,ts,country\n");
    for u in 0..users {
        let c = u % clusters;
        let len = 15 + next(20);
        let mut pos = next(per_cluster);
        let country = ["de", "fr", "cn"][next(3)];
        for t in 0..len {
            let item = if next(100) < 15 {
                format!("hot{}", next(hot))
            } else {
                pos = (pos + 1 + next(2)) % per_cluster;
                format!("c{c}_{pos}")
            };
            csv.push_str(&format!("u{u},{item},{},{country}\n", 1_000_000 + u * 1000 + t));
        }
    }
    std::fs::write(dir.join("log.csv"), csv).unwrap();
    let schema = r#"
name = "planted"
interactions = { path = "log.csv", header = true, user = "user", item = "item", timestamp = "ts" }
[[user_features]]
column = "country"
"#;
    std::fs::write(dir.join("schema.toml"), schema).unwrap();
    dir.join("schema.toml")
}

pub fn write_config(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("[data]\nschema = \"schema.toml\"\n{body}")).unwrap();
    path
}

/// A small YouTubeDNN that learns the planted structure in about a second.
pub const YOUTUBEDNN: &str = r#"[model]
kind = "youtubednn"
dim = 16
hidden = [32]
user_features = ["country"]
feature_dim = 4
max_seq_len = 10
[train]
epochs = 12
batch_size = 64
lr = 0.005
embedding_lr = 0.01
temperature = 0.1
patience = 0
seed = 7
"#;

/// The validation records of a run's `train_log.jsonl`, one per epoch, oldest first.
pub fn train_log(run: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(run.join("train_log.jsonl")).unwrap();
    text.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
}
