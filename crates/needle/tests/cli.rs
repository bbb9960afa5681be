//! End-to-end tests of the `needle` binary on small generated logs.

mod common;

use common::{needle, ok, planted_log, write_config, YOUTUBEDNN};
use std::path::Path;

fn metric(dir: &Path, key: &str) -> f64 {
    let text = std::fs::read_to_string(dir.join("metrics.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[key].as_f64().unwrap_or_else(|| panic!("metrics.json has no {key}: {text}"))
}

#[test]
fn youtubednn_beats_popularity_on_planted_structure_end_to_end() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "pop.toml", "[model]\nkind = \"popularity\"\n");
    write_config(dir, "yt.toml", YOUTUBEDNN);
    ok(&needle(&["train", "--config", "pop.toml", "--out", "runs/pop", "--quiet"], dir));
    ok(&needle(&["--threads", "2", "train", "--config", "yt.toml", "--out", "runs/yt", "--quiet"], dir));
    let pop = metric(&dir.join("runs/pop"), "hit_rate@10");
    let yt = metric(&dir.join("runs/yt"), "hit_rate@10");
    assert!(yt > 2.0 * pop && yt > 0.3, "youtubednn HR@10 {yt} vs popularity {pop}");

    // eval rewrites metrics.json with every key, and agrees with the evaluation at the end of training.
    let table = ok(&needle(&["eval", "--run", "runs/yt"], dir));
    assert!(table.contains("NDCG"), "{table}");
    for k in [10, 50, 100] {
        for m in ["hit_rate", "recall", "ndcg", "precision", "mrr"] {
            let v = metric(&dir.join("runs/yt"), &format!("{m}@{k}"));
            assert!((0.0..=1.0).contains(&v), "{m}@{k} = {v}");
        }
    }
    assert_eq!(metric(&dir.join("runs/yt"), "hit_rate@10"), yt);
    assert_eq!(metric(&dir.join("runs/yt"), "users"), 300.0);

    // recall: one line per user, k distinct items, none of them already seen.
    let out = ok(&needle(&["recall", "--run", "runs/yt", "--users", "u3,u10", "--k", "7"], dir));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    let log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    for (line, user) in lines.iter().zip(["u3", "u10"]) {
        let (u, items) = line.split_once('\t').unwrap();
        assert_eq!(u, user);
        let items: Vec<&str> = items.split(',').collect();
        assert_eq!(items.len(), 7);
        let mut dedup = items.clone();
        dedup.sort();
        dedup.dedup();
        assert_eq!(dedup.len(), 7);
        // Known history = every event but the last (the test target).
        let mut events: Vec<&str> =
            log.lines().filter(|l| l.starts_with(&format!("{user},"))).map(|l| l.split(',').nth(1).unwrap()).collect();
        events.pop();
        for it in &items {
            assert!(!events.contains(it), "{user} was recommended already-seen {it}");
        }
    }
    let all = ok(&needle(&["recall", "--run", "runs/yt", "--users", "all", "--k", "3"], dir));
    assert_eq!(all.lines().count(), 300);
}

#[test]
fn fm_dssm_mind_and_recent_items_beat_popularity_on_planted_structure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "pop.toml", "[model]\nkind = \"popularity\"\n");
    ok(&needle(&["train", "--config", "pop.toml", "--out", "runs/pop", "--quiet"], dir));
    let pop = metric(&dir.join("runs/pop"), "hit_rate@10");
    let common = "user_features = [\"country\", \"user_id\"]\nfeature_dim = 8\nmax_seq_len = 10\n";
    let train = "[train]\nepochs = 12\nbatch_size = 64\nlr = 0.005\nembedding_lr = 0.01\npatience = 0\nseed = 3\n";
    for (name, model, temperature) in [
        ("fm", "kind = \"fm\"\ndim = 16\n", "1.0"),
        ("dssm", "kind = \"dssm\"\ndim = 16\nhidden = [32]\nitem_hidden = [32]\nout_dim = 16\n", "0.1"),
        ("dssm-bce", "kind = \"dssm\"\ndim = 16\nhidden = [32]\nitem_hidden = [32]\nout_dim = 16\n", "0.1"),
        ("mind", "kind = \"mind\"\ndim = 16\nhidden = [32]\ninterests = 3\ndynamic_k = true\n", "0.1"),
        ("youtubednn-recent", "kind = \"youtubednn\"\ndim = 16\nhidden = [32]\nrecent = 3\n", "0.1"),
    ] {
        let loss = if name.ends_with("bce") { "loss = \"bce\"\nnegatives = 8\n" } else { "" };
        let body = format!("[model]\n{model}{common}{train}temperature = {temperature}\n{loss}");
        write_config(dir, &format!("{name}.toml"), &body);
        let out = format!("runs/{name}");
        ok(&needle(&["train", "--config", &format!("{name}.toml"), "--out", &out, "--quiet"], dir));
        let hr = metric(&dir.join(&out), "hit_rate@10");
        assert!(hr > 2.0 * pop && hr > 0.25, "{name} HR@10 {hr} vs popularity {pop}");
        // The saved run reloads and evaluates to the same figure.
        ok(&needle(&["eval", "--run", &out], dir));
        assert_eq!(metric(&dir.join(&out), "hit_rate@10"), hr, "{name}");
    }
}

#[test]
fn training_is_reproducible_for_a_fixed_seed_and_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    let body = "[model]\ndim = 8\nhidden = [16]\nuser_features = []\nmax_seq_len = 5\n[train]\nepochs = 2\nbatch_size = 128\nloss = \"sampled\"\nnegatives = 20\n";
    write_config(dir, "a.toml", body);
    for out in ["runs/a", "runs/b"] {
        ok(&needle(&["--threads", "2", "train", "--config", "a.toml", "--out", out, "--quiet"], dir));
    }
    let a = std::fs::read(dir.join("runs/a/model.safetensors")).unwrap();
    let b = std::fs::read(dir.join("runs/b/model.safetensors")).unwrap();
    assert!(a == b, "two runs with the same seed and threads differ");
}

#[test]
fn bad_input_gives_clear_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // A dataset that is not there names the download command.
    std::fs::write(dir.join("ml.toml"), "[data]\ndataset = \"ml-1m\"\n").unwrap();
    let out = needle(&["train", "--config", "ml.toml", "--out", "r", "--data-dir", "nowhere"], dir);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needle data download ml-1m"), "{err}");
    // Unknown config keys and impossible values are rejected before any work.
    std::fs::write(dir.join("typo.toml"), "[data]\ndataset = \"ml-1m\"\n[train]\nepoch = 3\n").unwrap();
    let err =
        String::from_utf8_lossy(&needle(&["train", "--config", "typo.toml", "--out", "r"], dir).stderr).into_owned();
    assert!(err.contains("epoch"), "{err}");
    std::fs::write(dir.join("t.toml"), "[data]\ndataset = \"ml-1m\"\n[train]\ntemperature = 0.0\n").unwrap();
    let err = String::from_utf8_lossy(&needle(&["train", "--config", "t.toml", "--out", "r"], dir).stderr).into_owned();
    assert!(err.contains("temperature"), "{err}");
    // A bad row names file and line; --skip-bad-rows style config skips and counts it.
    planted_log(dir);
    let mut log = std::fs::read_to_string(dir.join("log.csv")).unwrap();
    log.push_str("u1,c0_1,not-a-time,de\n");
    std::fs::write(dir.join("log.csv"), log).unwrap();
    write_config(dir, "p.toml", "[model]\nkind = \"popularity\"\n");
    let err = String::from_utf8_lossy(&needle(&["train", "--config", "p.toml", "--out", "r"], dir).stderr).into_owned();
    assert!(err.contains("log.csv:") && err.contains("not-a-time"), "{err}");
    std::fs::write(
        dir.join("s.toml"),
        "[data]\nschema = \"schema.toml\"\nskip_bad_rows = true\n[model]\nkind = \"popularity\"\n",
    )
    .unwrap();
    let out = needle(&["train", "--config", "s.toml", "--out", "r"], dir);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("1 bad rows skipped"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Not a run directory.
    let err = String::from_utf8_lossy(&needle(&["eval", "--run", "nothing-here"], dir).stderr).into_owned();
    assert!(err.contains("not a run directory"), "{err}");
    // Unknown user in recall.
    let err = String::from_utf8_lossy(&needle(&["recall", "--run", "r", "--users", "nobody"], dir).stderr).into_owned();
    assert!(err.contains("unknown user id `nobody`"), "{err}");
}

#[test]
fn ctrl_c_stops_training_cleanly_and_keeps_the_best_epoch() {
    use std::io::{BufRead, BufReader};
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "yt.toml", &YOUTUBEDNN.replace("epochs = 12", "epochs = 100000"));
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_needle"))
        .args(["--threads", "2", "train", "--config", "yt.toml", "--out", "runs/yt"])
        .current_dir(dir)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // Wait for two epochs, then press Ctrl-C once.
    let mut epochs = 0;
    while epochs < 2 {
        let mut line = String::new();
        assert!(err.read_line(&mut line).unwrap() > 0, "training ended early:\n{seen}");
        epochs += usize::from(line.starts_with("epoch "));
        seen.push_str(&line);
    }
    let st = std::process::Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(st.success());
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "exit {status:?}:\n{seen}{rest}");
    assert!(rest.contains("stopped after"), "{rest}");
    // A whole run: its manifest, its test metrics, and it evaluates.
    let info = std::fs::read_to_string(dir.join("runs/yt/model.toml")).unwrap();
    assert!(info.contains("best_epoch"), "{info}");
    assert!(metric(&dir.join("runs/yt"), "hit_rate@10") > 0.0);
    ok(&needle(&["eval", "--run", "runs/yt"], dir));
}
