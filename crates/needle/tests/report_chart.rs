//! `needle report --chart`: the HR@K chart of fake evaluated runs is a PNG of the right size, and
//! missing inputs or unwritable paths fail with errors that name the file.

use std::path::Path;
use std::process::{Command, Output};

fn needle(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_needle")).args(args).current_dir(cwd).output().expect("needle runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A run directory as `needle train` + `needle eval` leave it, minus the model itself.
fn fake_run(root: &Path, name: &str, kind: &str, scale: f64) {
    let dir = root.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let model = format!(
        r#"format = 1
kind = "{kind}"
dataset = "fake"
data_fingerprint = "0"
items = 500
users = 100

[training]
epochs_run = 3
best_epoch = 2
seconds = 1.5
samples_per_epoch = 1000
samples_per_sec = 2000.0
threads = 1

[config.data]
dataset = "ml-1m"
"#
    );
    std::fs::write(dir.join("model.toml"), model).unwrap();
    let curve: Vec<f64> = (1..=100).map(|k| scale * (k as f64 / 100.0).sqrt()).collect();
    let mut metrics = serde_json::json!({ "users": 100, "items": 500 });
    for k in [10, 50, 100] {
        metrics[format!("hit_rate@{k}")] = curve[k - 1].into();
    }
    std::fs::write(dir.join("metrics.json"), metrics.to_string()).unwrap();
    std::fs::write(dir.join("hit_curve.json"), serde_json::to_string(&curve).unwrap()).unwrap();
}

#[test]
fn report_draws_a_png_chart_and_still_prints_markdown() {
    let tmp = tempfile::tempdir().unwrap();
    fake_run(tmp.path(), "pop", "popularity", 0.4);
    fake_run(tmp.path(), "ytdnn", "youtubednn", 0.7);
    let out = needle(&["report", "pop", "ytdnn", "--chart", "results/chart.png"], tmp.path());
    // The results directory does not exist yet: a clear error naming the file, nothing printed.
    assert!(!out.status.success());
    assert!(stderr(&out).contains("results/chart.png"), "{}", stderr(&out));
    assert!(out.stdout.is_empty());

    std::fs::create_dir(tmp.path().join("results")).unwrap();
    let out = needle(&["report", "pop", "ytdnn", "--chart", "results/chart.png"], tmp.path());
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let md = String::from_utf8(out.stdout).unwrap();
    assert!(md.contains("| pop | Popularity |") && md.contains("| ytdnn | Youtubednn |"), "{md}");

    let png = std::fs::read(tmp.path().join("results/chart.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    assert_eq!(&png[12..16], b"IHDR");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1000, 600));
    // Something was drawn: far more than a blank canvas compresses to.
    assert!(png.len() > 10_000, "suspiciously small PNG: {} bytes", png.len());
}

#[test]
fn report_chart_errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    fake_run(tmp.path(), "a", "popularity", 0.5);
    fake_run(tmp.path(), "b", "fm", 0.6);
    std::fs::remove_file(tmp.path().join("b/hit_curve.json")).unwrap();
    let out = needle(&["report", "a", "b", "--chart", "c.png"], tmp.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("b/hit_curve.json"), "{}", stderr(&out));
    assert!(!tmp.path().join("c.png").exists());

    std::fs::write(tmp.path().join("b/hit_curve.json"), "{\"not\": \"a curve\"}").unwrap();
    let out = needle(&["report", "a", "b", "--chart", "c.png"], tmp.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("b/hit_curve.json"), "{}", stderr(&out));

    let out = needle(&["report", "a", "--chart", "c.svg"], tmp.path());
    assert!(!out.status.success());
    assert!(stderr(&out).contains("c.svg"), "{}", stderr(&out));
}
