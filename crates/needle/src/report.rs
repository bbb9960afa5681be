//! `needle report`: one markdown table from several evaluated runs, so results files are
//! generated from the runs themselves rather than typed by hand.

use anyhow::{Context, Result};
use needle_train::run::RunInfo;
use std::fmt::Write as _;
use std::path::Path;

const KS: [usize; 3] = [10, 50, 100];
const METRICS: [(&str, &str); 5] =
    [("hit_rate", "HR"), ("ndcg", "NDCG"), ("recall", "Recall"), ("precision", "Precision"), ("mrr", "MRR")];

struct Row {
    name: String,
    info: RunInfo,
    metrics: serde_json::Value,
}

fn read_run(dir: &Path) -> Result<Row> {
    let info_path = dir.join("model.toml");
    let text = std::fs::read_to_string(&info_path).with_context(|| format!("cannot read {}", info_path.display()))?;
    let info: RunInfo =
        toml::from_str(&text).with_context(|| format!("{} is not a run manifest", info_path.display()))?;
    let m_path = dir.join("metrics.json");
    let text = std::fs::read_to_string(&m_path).with_context(|| {
        format!("cannot read {} (run `needle eval --run {}` first)", m_path.display(), dir.display())
    })?;
    let metrics = serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", m_path.display()))?;
    let name = dir.file_name().map_or_else(|| dir.display().to_string(), |n| n.to_string_lossy().into_owned());
    Ok(Row { name, info, metrics })
}

/// Renders the quality and cost tables for `runs`.
pub fn render(runs: &[std::path::PathBuf]) -> Result<String> {
    let rows: Vec<Row> = runs.iter().map(|r| read_run(r)).collect::<Result<_>>()?;
    let mut s = String::new();
    let mut header = String::from("| run | model |");
    let mut rule = String::from("|---|---|");
    for (_, label) in METRICS {
        for k in KS {
            write!(header, " {label}@{k} |")?;
            rule.push_str("---|");
        }
    }
    writeln!(s, "{header}\n{rule}")?;
    for r in &rows {
        write!(s, "| {} | {:?} |", r.name, r.info.kind)?;
        for (key, _) in METRICS {
            for k in KS {
                match r.metrics[format!("{key}@{k}")].as_f64() {
                    Some(v) => write!(s, " {v:.4} |")?,
                    None => write!(s, " – |")?,
                }
            }
        }
        writeln!(s)?;
    }
    writeln!(
        s,
        "\n| run | users | items | epochs (best) | train time s | samples/epoch | samples/s | peak RSS MB | threads |"
    )?;
    writeln!(s, "|---|---|---|---|---|---|---|---|---|")?;
    for r in &rows {
        let t = &r.info.training;
        writeln!(
            s,
            "| {} | {} | {} | {} ({}) | {:.1} | {} | {:.0} | {} | {} |",
            r.name,
            r.metrics["users"],
            r.metrics["items"],
            t.epochs_run,
            t.best_epoch,
            t.seconds,
            t.samples_per_epoch,
            t.samples_per_sec,
            t.peak_rss_mb.map_or("–".into(), |m| format!("{m:.0}")),
            t.threads
        )?;
    }
    Ok(s)
}
