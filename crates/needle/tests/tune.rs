//! `needle tune` end to end on a small generated log: the leaderboard, the best config that
//! `needle train` reproduces, and a tune that is killed and resumed.

mod common;

use common::{needle, ok, planted_log, train_log, write_config, YOUTUBEDNN};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The shared small YouTubeDNN with 6 epochs (the rungs below are asserted) and a space.
fn tuned() -> String {
    format!("{}{TUNE_SPACE}", YOUTUBEDNN.replace("epochs = 12", "epochs = 6\nlr_schedule = \"cosine\""))
}

const TUNE_SPACE: &str = r#"[tune]
metric = "ndcg@10"
eta = 2
min_epochs = 1
[tune.model]
recent = [0, 2]
[tune.train]
lr = [0.002, 0.005, 0.01]
"#;

/// The rows of `tune.md` without the train-time column, which differs from run to run.
fn board(dir: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(dir.join("tune.md")).unwrap();
    text.lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| rank"))
        .map(|l| l.rsplitn(3, '|').nth(2).unwrap().to_owned())
        .collect()
}

fn valid_ndcgs(run: &Path) -> Vec<f64> {
    train_log(run).iter().map(|r| r["valid_ndcg10"].as_f64().unwrap()).collect()
}

fn best_valid_ndcg(run: &Path) -> f64 {
    valid_ndcgs(run).into_iter().fold(f64::NEG_INFINITY, f64::max)
}

#[test]
fn tune_ranks_trials_and_its_best_config_trains_to_the_same_validation_figure() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "t.toml", &tuned());
    let args = ["--threads", "2", "tune", "--config", "t.toml", "--budget", "10m", "--trials", "4", "--out"];
    let out = needle(&[&args[..], &["runs/t", "--quiet"]].concat(), dir);
    let stdout = ok(&out);
    assert!(stdout.contains("test, full corpus"), "{stdout}");
    let rows = board(&dir.join("runs/t"));
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows[0].contains("| 1 |"), "{rows:?}");
    // Successive halving with eta 2 over 4 trials: 4 trials, then 2, then 1 at the full 6 epochs.
    let text = std::fs::read_to_string(dir.join("runs/t/tune.md")).unwrap();
    assert!(text.contains("rungs (trials × epochs) 4×2, 2×3, 1×6"), "{text}");
    let ndcg = |row: &str| row.split('|').nth(7).unwrap().trim().parse::<f64>().unwrap();
    for w in rows.windows(2) {
        assert!(ndcg(&w[0]) >= ndcg(&w[1]), "{rows:?}");
    }
    // Test was evaluated once, for the saved winner, and the run reloads.
    assert!(dir.join("runs/t/metrics.json").exists());
    ok(&needle(&["eval", "--run", "runs/t"], dir));

    // The best config trains, as written, to the validation figure the tune reported, along the
    // schedule the winner was chosen with.
    let best_toml = std::fs::read_to_string(dir.join("runs/t/best.toml")).unwrap();
    assert!(best_toml.contains("schedule_epochs = 6"), "{best_toml}");
    let best = ndcg(&rows[0]);
    ok(&needle(&["train", "--config", "runs/t/best.toml", "--out", "runs/again", "--quiet"], dir));
    let again = best_valid_ndcg(&dir.join("runs/again"));
    assert!((again - best).abs() < 5e-5, "tune {best}, retrained {again}");

    // A config without [tune] is refused with a hint.
    write_config(dir, "plain.toml", "[model]\nkind = \"youtubednn\"\n");
    let out = needle(&["tune", "--config", "plain.toml", "--budget", "1m", "--out", "runs/p"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no [tune] section"));
}

#[test]
fn a_run_cut_short_of_its_schedule_follows_the_full_schedules_rates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    let cosine = YOUTUBEDNN.replace("epochs = 12", "epochs = 6\nlr_schedule = \"cosine\"");
    write_config(dir, "full.toml", &cosine);
    write_config(dir, "cut.toml", &cosine.replace("epochs = 6", "epochs = 3\nschedule_epochs = 6"));
    write_config(dir, "short.toml", &cosine.replace("epochs = 6", "epochs = 3"));
    for name in ["full", "cut", "short"] {
        let args = ["--threads", "2", "train", "--config", &format!("{name}.toml"), "--out", name, "--quiet"];
        ok(&needle(&args, dir));
    }
    let (full, cut, short) =
        (valid_ndcgs(&dir.join("full")), valid_ndcgs(&dir.join("cut")), valid_ndcgs(&dir.join("short")));
    assert_eq!(full.len(), 6);
    assert_eq!(cut, full[..3], "the first three epochs of the full schedule");
    // A cosine over 3 epochs falls faster: the second epoch already differs.
    assert_ne!(short[1], full[1], "{short:?} {full:?}");

    // A schedule shorter than the run is refused.
    write_config(dir, "bad.toml", &cosine.replace("epochs = 6", "epochs = 6\nschedule_epochs = 4"));
    let out = needle(&["train", "--config", "bad.toml", "--out", "bad"], dir);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("schedule_epochs (4) cannot be below epochs (6)"));
}

#[test]
fn an_interrupted_tune_resumes_from_its_log_to_the_same_result() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    write_config(dir, "t.toml", &tuned());
    let args = |out: &'static str| {
        ["--threads", "2", "tune", "--config", "t.toml", "--budget", "10m", "--trials", "4", "--quiet", "--out", out]
    };
    ok(&needle(&args("runs/whole"), dir));

    // Killed once the log holds a few epochs, then started again on the same folder.
    let mut child = Command::new(env!("CARGO_BIN_EXE_needle"))
        .args(args("runs/resumed"))
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let log = dir.join("runs/resumed/tune.jsonl");
    let t0 = Instant::now();
    while std::fs::read_to_string(&log).map_or(0, |t| t.lines().count()) < 5 {
        assert!(t0.elapsed() < Duration::from_secs(120), "the tune never logged 5 epochs");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(!dir.join("runs/resumed/model.toml").exists(), "the tune finished before it was killed");
    let out = needle(&args("runs/resumed"), dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("resuming:"), "{stderr}");
    assert_eq!(board(&dir.join("runs/whole")), board(&dir.join("runs/resumed")));
    let best = |d: &str| std::fs::read_to_string(dir.join(d).join("best.toml")).unwrap();
    assert_eq!(
        best("runs/whole").lines().skip(2).collect::<Vec<_>>(),
        best("runs/resumed").lines().skip(2).collect::<Vec<_>>()
    );
}

#[test]
fn a_budget_that_fits_one_trial_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    // 5,000 epochs of at least a millisecond each cannot fit 2 seconds even once.
    write_config(dir, "t.toml", &format!("{}{TUNE_SPACE}", YOUTUBEDNN.replace("epochs = 12", "epochs = 5000")));
    let out = needle(&["--threads", "2", "tune", "--config", "t.toml", "--budget", "2s", "--out", "runs/t"], dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("so the budget fits 1 trial: not a search; 3 trials need about --budget"), "{stderr}");
    assert!(stderr.contains("1 trial; rungs (trials × epochs): 1×5000"), "{stderr}");
}

#[test]
fn counted_kinds_tune_in_one_pass_per_trial() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    planted_log(dir);
    let body = "[model]\nkind = \"transitions\"\nrecent = 3\nwindow = 1\n[tune]\nmetric = \"hr@10\"\n\
                [tune.model]\nrecent = [1, 2, 3]\nwindow = [1, 2]\ndecay = [0.5, 1.0]\n";
    write_config(dir, "tr.toml", body);
    ok(&needle(&["tune", "--config", "tr.toml", "--budget", "5m", "--out", "runs/tr", "--quiet"], dir));
    let rows = board(&dir.join("runs/tr"));
    // The 12 grid points include the config as written (recent 3, window 1, decay 0.5).
    assert_eq!(rows.len(), 12, "{rows:?}");
    let hr = |row: &str| row.split('|').nth(6).unwrap().trim().parse::<f64>().unwrap();
    assert!(rows.windows(2).all(|w| hr(&w[0]) >= hr(&w[1])), "{rows:?}");
    // Its best config trains to the same validation figure.
    ok(&needle(&["train", "--config", "runs/tr/best.toml", "--out", "runs/again", "--quiet"], dir));
    let v = &train_log(&dir.join("runs/again"))[0];
    assert!((v["valid_hr10"].as_f64().unwrap() - hr(&rows[0])).abs() < 5e-5, "{v} vs {}", rows[0]);
}
