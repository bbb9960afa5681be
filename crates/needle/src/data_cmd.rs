//! `needle data ingest | info | synth`: turning logs into binary datasets and looking inside them.

use anyhow::{Context, Result};
use needle_data::{DatasetName, DatasetSource, LoadOptions, Packed};
use std::path::Path;
use std::time::Instant;

use needle_api::progress::bytes_bar;

pub fn ingest(
    schema: Option<&Path>,
    dataset: Option<&str>,
    data_dir: Option<&Path>,
    out: Option<&Path>,
    skip_bad_rows: bool,
    quiet: bool,
) -> Result<()> {
    let source = match (schema, dataset) {
        (Some(s), _) => DatasetSource::Csv { schema: s.to_path_buf() },
        (None, Some(name)) => DatasetSource::MovieLens(name.parse::<DatasetName>().map_err(anyhow::Error::msg)?),
        (None, None) => anyhow::bail!("give --schema S.toml or --dataset NAME"),
    };
    let opts = LoadOptions { skip_bad_rows };
    let dir = match out {
        Some(o) => o.to_path_buf(),
        None => needle_data::source::default_cache_dir(&source, data_dir)?,
    };
    let id = needle_data::source_id(&source, data_dir, &opts)?;
    let t = Instant::now();
    let bar = bytes_bar(quiet, "ingesting");
    let mut ds = needle_data::source::load_with(&source, data_dir, &opts, &mut |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    })?;
    bar.finish_and_clear();
    let parsed = t.elapsed().as_secs_f64();
    let seqs = needle_data::split::time_ordered(&ds)?;
    // The runs hold every event now; the file-order copy is no longer needed once the source
    // fingerprint (computed over it) is taken.
    ds.source_fingerprint = Some(ds.fingerprint());
    ds.events = Vec::new();
    let info = needle_data::packed::write(&ds, &seqs, &id, &dir)?;
    let secs = t.elapsed().as_secs_f64();
    let size = std::fs::metadata(dir.join(needle_data::packed::DATASET_FILE)).map(|m| m.len()).unwrap_or(0);
    eprintln!(
        "ingested {} events, {} users, {} items into {} in {secs:.1}s (parsed in {parsed:.1}s, {:.2} M events/s; {:.2} bytes/event){}",
        info.events,
        info.users,
        info.items,
        dir.display(),
        info.events as f64 / secs / 1e6,
        size as f64 / (info.events.max(1)) as f64,
        match ds.report.skipped_total() {
            0 => String::new(),
            n => format!("; {n} bad rows skipped"),
        }
    );
    Ok(())
}

pub fn info(dir: &Path) -> Result<()> {
    let t = Instant::now();
    let p = Packed::open(dir)?;
    let ds = p.dataset().with_context(|| format!("verifying {}", p.path().display()))?;
    let i = &p.info;
    let size = p.file_len();
    println!("dataset      {}", i.name);
    println!(
        "file         {} ({:.1} MB, {:.2} bytes/event)",
        p.path().display(),
        size as f64 / 1e6,
        size as f64 / i.events.max(1) as f64
    );
    println!("events       {}", i.events);
    println!("users        {}", i.users);
    println!("items        {}", i.items);
    println!("item keys    {} bytes; earliest timestamp {}", i.item_bytes, i.ts_base);
    println!("fingerprint  {}", i.fingerprint);
    println!("source id    {}", i.source_id);
    for (side, feats) in [("user", &i.user_features), ("item", &i.item_features)] {
        for f in feats {
            println!("{side} feature {} ({} values{})", f.name, f.values, if f.multi { ", multi-valued" } else { "" });
        }
    }
    let skipped: u64 = i.skipped.iter().map(|(_, n)| n).sum();
    if skipped > 0 {
        println!("skipped rows {skipped}");
    }
    println!("checksums    ok ({} sections verified in {:.2}s)", i.sections.len(), t.elapsed().as_secs_f64());
    drop(ds);
    Ok(())
}

pub fn synth(spec: &needle_data::synth::SynthSpec, out: &Path, quiet: bool) -> Result<()> {
    let t = Instant::now();
    let bar = if quiet {
        indicatif::ProgressBar::hidden()
    } else {
        needle_api::progress::for_logs(
            indicatif::ProgressBar::new(spec.events).with_style(
                indicatif::ProgressStyle::with_template(
                    "synth [{bar:30}] {human_pos}/{human_len} events {per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            ),
        )
    };
    let report = needle_data::synth::write_synth(spec, out, &mut |done, _| bar.set_position(done))?;
    bar.finish_and_clear();
    let bytes: u64 = report.files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
    eprintln!(
        "wrote {} events ({} users, {} items, {} topics, seed {}) to {} in {:.1}s ({:.1} MB); schema: {}",
        report.events,
        spec.users,
        spec.items,
        spec.topics,
        spec.seed,
        out.display(),
        t.elapsed().as_secs_f64(),
        bytes as f64 / 1e6,
        report.schema.display()
    );
    Ok(())
}
