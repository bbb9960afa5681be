//! `needle report`: one markdown table from several evaluated runs, so results files are
//! generated from the runs themselves rather than typed by hand, and optionally a PNG chart of
//! each run's HR@K curve.

use anyhow::{anyhow, ensure, Context, Result};
use needle_train::config::ModelKind;
use needle_train::run::TrainingSummary;
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const KS: [usize; 3] = [10, 50, 100];
const METRICS: [(&str, &str); 5] =
    [("hit_rate", "HR"), ("ndcg", "NDCG"), ("recall", "Recall"), ("precision", "Precision"), ("mrr", "MRR")];

struct Row {
    name: String,
    info: Summary,
    metrics: serde_json::Value,
}

/// What a report reads of a run's manifest: the kind and the training summary (the tower's
/// shapes and the config are not needed, and may be absent from a manifest written by hand).
#[derive(serde::Deserialize)]
struct Summary {
    kind: ModelKind,
    training: TrainingSummary,
}

fn read_run(dir: &Path) -> Result<Row> {
    let info_path = dir.join("model.toml");
    let text = std::fs::read_to_string(&info_path).with_context(|| format!("cannot read {}", info_path.display()))?;
    let info: Summary =
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
pub fn render(runs: &[PathBuf]) -> Result<String> {
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

/// Chart size in pixels.
pub const CHART_SIZE: (u32, u32) = (1000, 600);

/// DejaVu Sans, shipped with the crate so that chart text never depends on the fonts installed
/// where `needle` runs (see `assets/README.md` for its origin and licence).
static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");

/// Line colours (Tableau 10); runs past the tenth take colours from plotters' `Palette99`.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

fn colour(i: usize) -> RGBAColor {
    COLOURS.get(i).map_or_else(|| Palette99::pick(i).to_rgba(), |c| c.to_rgba())
}

/// Makes the bundled font plotters' "sans-serif", the family every text element here uses.
fn register_font() -> Result<()> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).is_ok());
    ensure!(ok, "the bundled font assets/DejaVuSans.ttf could not be loaded");
    Ok(())
}

/// Reads `DIR/hit_curve.json`: element j is HR@(j+1).
fn read_hit_curve(dir: &Path) -> Result<Vec<f64>> {
    let path = dir.join("hit_curve.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {} (run `needle eval --run {}` first)", path.display(), dir.display()))?;
    let curve: Vec<f64> =
        serde_json::from_str(&text).with_context(|| format!("{} is not a JSON array of numbers", path.display()))?;
    ensure!(!curve.is_empty(), "{} is empty", path.display());
    ensure!(curve.iter().all(|h| (0.0..=1.0).contains(h)), "{} has hit rates outside [0, 1]", path.display());
    Ok(curve)
}

/// Draws HR@K against K, one line per run, into the PNG file `out`.
pub fn chart(runs: &[PathBuf], out: &Path) -> Result<()> {
    let is_png = out.extension().is_some_and(|e| e.eq_ignore_ascii_case("png"));
    ensure!(is_png, "chart path {} must end in .png", out.display());
    let mut lines = Vec::with_capacity(runs.len());
    for dir in runs {
        let row = read_run(dir)?;
        lines.push((format!("{} ({:?})", row.name, row.info.kind), read_hit_curve(dir)?));
    }
    register_font()?;
    // Fail on an unwritable path with the OS's own message before drawing anything.
    std::fs::File::create(out).with_context(|| format!("cannot write chart {}", out.display()))?;
    draw(&lines, out).inspect_err(|_| {
        let _ = std::fs::remove_file(out);
    })
}

fn draw(lines: &[(String, Vec<f64>)], out: &Path) -> Result<()> {
    let fail = |e: DrawingAreaErrorKind<_>| anyhow!("cannot draw chart {}: {e}", out.display());
    let kmax = lines.iter().map(|(_, c)| c.len()).max().unwrap_or(1).max(2);
    let top = lines.iter().flat_map(|(_, c)| c.iter().copied()).fold(0.0f64, f64::max);
    // Headroom above the highest curve, rounded up to a multiple of 0.05.
    let ymax = ((top * 1.05 / 0.05).ceil() * 0.05).clamp(0.05, 1.0);

    let root = BitMapBackend::new(out, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(fail)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("HR@K over the full corpus", ("sans-serif", 28))
        .margin(20)
        .x_label_area_size(50)
        .y_label_area_size(70)
        .build_cartesian_2d(1f64..kmax as f64, 0f64..ymax)
        .map_err(fail)?;
    chart
        .configure_mesh()
        .x_desc("K")
        .y_desc("HR@K")
        .x_labels(11)
        .y_labels(11)
        .x_label_formatter(&|k| format!("{k:.0}"))
        .y_label_formatter(&|h| format!("{h:.2}"))
        .label_style(("sans-serif", 16))
        .axis_desc_style(("sans-serif", 20))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(fail)?;
    for (i, (label, curve)) in lines.iter().enumerate() {
        let style = colour(i).stroke_width(2);
        let points = curve.iter().enumerate().map(|(j, &h)| ((j + 1) as f64, h));
        chart
            .draw_series(LineSeries::new(points, style))
            .map_err(fail)?
            .label(label)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], style));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(fail)?;
    root.present().map_err(fail)?;
    Ok(())
}
