//! The data path end to end: synthetic logs, ingest, binary datasets, catalogue tables and
//! config paths.

mod common;

use common::{needle, ok};
use std::path::Path;

fn metric(run: &Path, key: &str) -> f64 {
    let text = std::fs::read_to_string(run.join("metrics.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key].as_f64().unwrap_or_else(|| panic!("metrics.json has no {key}: {text}"))
}

const SYNTH_MODEL: &str = r#"
[model]
kind = "youtubednn"
dim = 32
hidden = [64]
user_features = ["region", "age_band"]
feature_dim = 8
max_seq_len = 20
recent = 3
example_age = false
[train]
epochs = 4
batch_size = 256
loss = "sampled"
negatives = 64
lr = 0.002
embedding_lr = 0.02
temperature = 0.05
patience = 0
seed = 7
"#;

#[test]
fn synthetic_log_is_learnable_and_configs_resolve_from_their_folder() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let args = ["data", "synth", "--users", "3000", "--items", "1500", "--events", "60000", "--out", "data/synth"];
    ok(&needle(&args, dir));
    // Same seed, same files; the CSV form holds the same log.
    ok(&needle(&["data", "synth", "--users", "3000", "--items", "1500", "--events", "60000", "--out", "again"], dir));
    ok(&needle(
        &["data", "synth", "--users", "3000", "--items", "1500", "--events", "60000", "--out", "csv", "--csv"],
        dir,
    ));
    for f in ["events.parquet", "items.parquet", "users.parquet"] {
        assert!(
            std::fs::read(dir.join("data/synth").join(f)).unwrap() == std::fs::read(dir.join("again").join(f)).unwrap(),
            "{f} differs between two runs with one seed"
        );
    }
    let lines = std::fs::read_to_string(dir.join("csv/events.csv")).unwrap().lines().count();
    assert_eq!(lines, 60_001);
    ok(&needle(&["data", "ingest", "--schema", "csv/schema.toml", "--out", "csv-bin", "--quiet"], dir));

    // Configs live in their own folder and name the schema relative to themselves; training
    // runs from a third folder.
    std::fs::create_dir_all(dir.join("configs")).unwrap();
    std::fs::create_dir_all(dir.join("elsewhere")).unwrap();
    let data = "[data]\nschema = \"../data/synth/schema.toml\"\n";
    std::fs::write(dir.join("configs/pop.toml"), format!("{data}[model]\nkind = \"popularity\"\n")).unwrap();
    std::fs::write(dir.join("configs/yt.toml"), format!("{data}{SYNTH_MODEL}")).unwrap();
    let cwd = dir.join("elsewhere");
    let out = needle(&["train", "--config", "../configs/pop.toml", "--out", "../runs/pop", "--quiet"], &cwd);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("ingested into the binary dataset") && err.contains("first use"), "{err}");
    let out =
        needle(&["--threads", "2", "train", "--config", "../configs/yt.toml", "--out", "../runs/yt", "--quiet"], &cwd);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("read the binary dataset"), "the second command must not parse the text again: {err}");

    assert!(err.contains("memory: embedding tables"), "the memory plan is printed before training: {err}");

    // The item table can be cut to the most frequent items; a plan over the memory limit stops
    // before training with the knobs to turn.
    let capped = format!("{data}{}", SYNTH_MODEL.replace("recent = 3", "recent = 3\nmax_items = 300"));
    std::fs::write(dir.join("configs/capped.toml"), capped).unwrap();
    ok(&needle(&["train", "--config", "../configs/capped.toml", "--out", "../runs/capped", "--quiet"], &cwd));
    let vocab = std::fs::read_to_string(dir.join("runs/capped/vocab/items.tsv")).unwrap();
    assert_eq!(vocab.lines().count(), 300);
    // Or the tail shares a few hashed rows: it stays in the vocabulary and can be recalled.
    let hashed =
        format!("{data}{}", SYNTH_MODEL.replace("recent = 3", "recent = 3\nmax_items = 300\nhash_buckets = 64"));
    std::fs::write(dir.join("configs/hashed.toml"), hashed).unwrap();
    let out = needle(&["train", "--config", "../configs/hashed.toml", "--out", "../runs/hashed", "--quiet"], &cwd);
    ok(&out);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("items beyond the 300 most frequent share 64 id rows"), "{err}");
    let all = std::fs::read_to_string(dir.join("runs/yt/vocab/items.tsv")).unwrap();
    let hashed_vocab = std::fs::read_to_string(dir.join("runs/hashed/vocab/items.tsv")).unwrap();
    assert_eq!(hashed_vocab.lines().count(), all.lines().count());
    let head: std::collections::HashSet<&str> = vocab.lines().filter_map(|l| l.split('\t').nth(1)).collect();
    let recall = ok(&needle(&["recall", "--run", "runs/hashed", "--k", "100"], dir));
    let tail_recalled = recall.lines().flat_map(|l| l.split(['\t', ',']).skip(1)).filter(|i| !head.contains(i)).count();
    assert!(tail_recalled > 0, "no item beyond the 300 most frequent was recalled");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_needle"))
        .args(["train", "--config", "../configs/yt.toml", "--out", "../runs/too-big", "--quiet"])
        .env("NEEDLE_MEMORY_LIMIT", "1M")
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("max_items") && err.contains("1.0 MB is available"), "{err}");
    assert!(!dir.join("runs/too-big/model.toml").exists());

    let pop = metric(&dir.join("runs/pop"), "hit_rate@100");
    let yt = metric(&dir.join("runs/yt"), "hit_rate@100");
    assert!(yt >= 2.0 * pop, "youtubednn HR@100 {yt} vs popularity {pop}");

    // The run reloads its data from any folder, through the binary dataset.
    ok(&needle(&["eval", "--run", "runs/yt"], dir));
    assert_eq!(metric(&dir.join("runs/yt"), "users"), 3000.0);
    // A seeded sample of users: the metrics say how many were scored, and the sample repeats.
    let out = needle(&["eval", "--run", "runs/yt", "--eval-users", "500"], dir);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("sample of 500 of the 3000"));
    assert_eq!(metric(&dir.join("runs/yt"), "users"), 500.0);
    let first = metric(&dir.join("runs/yt"), "ndcg@10");
    ok(&needle(&["eval", "--run", "runs/yt", "--eval-users", "500"], dir));
    assert_eq!(metric(&dir.join("runs/yt"), "ndcg@10"), first);
    assert_eq!(metric(&dir.join("runs/yt"), "eval_seed"), 42.0, "the default sample seed is recorded");
    // The sample has its own seed: another one scores other users (so another figure), and it
    // is recorded with the metrics.
    ok(&needle(&["--eval-seed", "7", "eval", "--run", "runs/yt", "--eval-users", "500"], dir));
    assert_eq!(metric(&dir.join("runs/yt"), "eval_seed"), 7.0);
    assert_ne!(metric(&dir.join("runs/yt"), "ndcg@10"), first, "seed 7 draws another sample");
    let info = ok(&needle(&["data", "info", "data/synth/schema.ndb"], dir));
    assert!(info.contains("events       60000") && info.contains("checksums    ok"), "{info}");
    // Parquet and CSV give the same events, ids and fingerprint.
    let from_csv = ok(&needle(&["data", "info", "csv-bin"], dir));
    let same = |t: &str| {
        t.lines()
            .filter(|l| !l.starts_with("file") && !l.starts_with("source id") && !l.starts_with("checksums"))
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    assert_eq!(same(&from_csv), same(&info));
    // An explicit ingest writes the same dataset, with the source's fingerprint.
    ok(&needle(&["data", "ingest", "--schema", "data/synth/schema.toml", "--out", "bin", "--quiet"], dir));
    let fp = |text: &str| text.lines().find(|l| l.starts_with("fingerprint")).map(str::to_owned);
    let again = ok(&needle(&["data", "info", "bin"], dir));
    assert_eq!(fp(&again), fp(&info));
    assert!(fp(&info).is_some_and(|l| !l.contains("cbf29ce484222325")), "{info}");
}

#[test]
fn ingest_errors_name_the_file_and_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&needle(&["data", "synth", "--users", "200", "--items", "100", "--events", "2000", "--out", "s", "--csv"], dir));
    let mut log = std::fs::read_to_string(dir.join("s/events.csv")).unwrap();
    log.push_str("u1,i1,yesterday\n");
    std::fs::write(dir.join("s/events.csv"), &log).unwrap();
    let out = needle(&["data", "ingest", "--schema", "s/schema.toml", "--out", "bin", "--quiet"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("events.csv:2002") && err.contains("yesterday"), "{err}");
    assert!(!dir.join("bin/dataset.ndb").exists(), "a failed ingest must not leave a dataset");

    // Skipping counts the bad row, and the dataset says so.
    let out =
        needle(&["data", "ingest", "--schema", "s/schema.toml", "--out", "bin", "--skip-bad-rows", "--quiet"], dir);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("1 bad rows skipped"));
    let info = ok(&needle(&["data", "info", "bin"], dir));
    assert!(info.contains("skipped rows 1"), "{info}");

    // A flipped byte is an error naming the file, with a non-zero exit.
    let path = dir.join("bin/dataset.ndb");
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 1;
    std::fs::write(&path, bytes).unwrap();
    let out = needle(&["data", "info", "bin"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("dataset.ndb") && err.contains("checksum"), "{err}");

    // A schema naming a missing column.
    let schema =
        std::fs::read_to_string(dir.join("s/schema.toml")).unwrap().replace("id = \"item_id\"", "id = \"sku\"");
    std::fs::write(dir.join("s/schema.toml"), schema).unwrap();
    let out = needle(&["data", "ingest", "--schema", "s/schema.toml", "--out", "bin2", "--skip-bad-rows"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("\"sku\"") && err.contains("items.csv"), "{err}");
    assert!(!dir.join("bin2/dataset.ndb").exists());
}

#[test]
fn parquet_errors_name_the_file_column_and_row_group() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    ok(&needle(&["data", "synth", "--users", "200", "--items", "100", "--events", "2000", "--out", "p"], dir));
    // A truncated file: an error naming it, nothing written.
    let log = std::fs::read(dir.join("p/events.parquet")).unwrap();
    std::fs::write(dir.join("p/events.parquet"), &log[..log.len() / 2]).unwrap();
    let out = needle(&["data", "ingest", "--schema", "p/schema.toml", "--out", "bin", "--quiet"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("events.parquet") && err.contains("Parquet"), "{err}");
    assert!(!dir.join("bin/dataset.ndb").exists());
    std::fs::write(dir.join("p/events.parquet"), &log).unwrap();

    // A string column where integers are expected: the first bad value is named; skipping
    // counts every row.
    let schema = std::fs::read_to_string(dir.join("p/schema.toml")).unwrap();
    std::fs::write(dir.join("p/bad.toml"), schema.replace("timestamp = \"ts\"", "timestamp = \"item_id\"")).unwrap();
    let out = needle(&["data", "ingest", "--schema", "p/bad.toml", "--out", "bin", "--quiet"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        err.contains("events.parquet")
            && err.contains("column \"item_id\", row group 0, row 0")
            && err.contains("not an integer"),
        "{err}"
    );
    let out = needle(&["data", "ingest", "--schema", "p/bad.toml", "--out", "bin", "--quiet", "--skip-bad-rows"], dir);
    ok(&out);
    assert!(String::from_utf8_lossy(&out.stderr).contains("2000 bad rows skipped"));
    // Integer columns may hold ids; a missing column is an error naming the file.
    std::fs::write(dir.join("p/bad.toml"), schema.replace("user = \"user_id\"", "user = \"ts\"")).unwrap();
    let out = needle(&["data", "ingest", "--schema", "p/bad.toml", "--out", "bin", "--quiet"], dir);
    ok(&out); // integer ids are allowed: they become their decimal text
    std::fs::write(dir.join("p/bad.toml"), schema.replace("user = \"user_id\"", "user = \"uid\"")).unwrap();
    let out = needle(&["data", "ingest", "--schema", "p/bad.toml", "--out", "bin2", "--quiet"], dir);
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success() && err.contains("\"uid\"") && err.contains("events.parquet"), "{err}");
}
