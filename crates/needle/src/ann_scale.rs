//! `needle bench ann --stream`: the compressed index at catalogue scale (10^7–10^8 vectors),
//! where the float vectors do not fit in memory.
//!
//! The synthetic set is generated row by row from its seed ([`SyntheticSource`]) whenever a
//! pass needs it, so nothing ever holds it whole. Exact ground truth for the queries is a
//! streaming scan (block GEMMs into per-query top-100 heaps), cached in the work folder. Each
//! index is built by the streaming build, saved, dropped, and opened again mapped, the way a
//! server opens it; peak RSS is measured separately for the build and for the searches.

use crate::ann::{synth_clusters, Results, K};
use anyhow::{ensure, Context, Result};
use needle_index::kernels::{gemm_nt, TopK};
use needle_index::{
    recall_at_k, Index, IndexParams, IvfPqIndex, NpyWriter, Scan, SyntheticSource, VectorSource, Verify,
};
use rayon::prelude::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Rows per block of the ground-truth scan and of `.npy` writing.
const BLOCK: usize = 1 << 15;
/// IVF-PQ `nprobe` values swept on the opened index.
const NPROBES: [usize; 6] = [8, 16, 32, 64, 128, 256];
/// Re-ranking depths swept at 16 lists.
const RERANKS: [usize; 4] = [100, 200, 800, 1600];

/// The first `rows` rows of another source: the base set, with the queries after it.
struct Head<'a> {
    src: &'a dyn VectorSource,
    rows: usize,
}

impl VectorSource for Head<'_> {
    fn dim(&self) -> usize {
        self.src.dim()
    }
    fn rows(&self) -> usize {
        self.rows
    }
    fn read(&self, start: usize, out: &mut [f32]) -> needle_index::Result<()> {
        self.src.read(start, out)
    }
}

/// Peak resident memory since the last [`reset_peak_rss`], in GB.
fn peak_rss_gb() -> f64 {
    needle_train::trainer::peak_rss_mb().unwrap_or(f64::NAN) / 1024.0
}

/// Starts a new peak-RSS window (Linux `clear_refs` 5); harmless where unsupported.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Exact top-`K` of every query over the base set, by a parallel streaming scan.
fn exact_truth(base: &dyn VectorSource, queries: &[f32]) -> Result<Results> {
    let dim = base.dim();
    let nq = queries.len() / dim;
    let n = base.rows();
    let blocks = n.div_ceil(BLOCK);
    let bar = needle_api::progress::count_bar(n as u64, "exact scan");
    let heaps = (0..blocks)
        .into_par_iter()
        .try_fold(
            || (vec![TopK::new(K); nq], Vec::new(), Vec::new()),
            |(mut heaps, mut rows, mut scores): (Vec<TopK>, Vec<f32>, Vec<f32>), b| {
                let start = b * BLOCK;
                let len = (n - start).min(BLOCK);
                rows.resize(len * dim, 0.0);
                scores.resize(nq * len, 0.0);
                base.read(start, &mut rows)?;
                gemm_nt(nq, len, dim, queries, &rows, &mut scores);
                for (h, s) in heaps.iter_mut().zip(scores.chunks_exact(len)) {
                    for (i, &v) in s.iter().enumerate() {
                        if v >= h.threshold() {
                            h.push(v, (start + i) as u32);
                        }
                    }
                }
                bar.inc(len as u64);
                Ok::<_, anyhow::Error>((heaps, rows, scores))
            },
        )
        .map(|r| r.map(|t| t.0))
        .try_reduce(
            || vec![TopK::new(K); nq],
            |mut a, b| {
                for (x, mut y) in a.iter_mut().zip(b) {
                    let mut pairs = Vec::new();
                    y.drain_sorted(&mut pairs);
                    pairs.into_iter().for_each(|(id, s)| x.push(s, id));
                }
                Ok(a)
            },
        )?;
    bar.finish_and_clear();
    Ok(heaps
        .into_iter()
        .map(|mut h| {
            let mut out = Vec::new();
            h.drain_sorted(&mut out);
            out
        })
        .collect())
}

/// Ground truth from the cache in `work`, or computed and cached.
fn cached_truth(work: &Path, key: &str, base: &dyn VectorSource, queries: &[f32]) -> Result<(Results, f64)> {
    let path = work.join(format!("truth-{key}.txt"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let parsed: Option<Results> = text
            .lines()
            .map(|l| l.split_whitespace().map(|t| t.parse::<u32>().ok().map(|id| (id, 0.0))).collect())
            .collect();
        if let Some(t) = parsed.filter(|t| t.len() == queries.len() / base.dim()) {
            println!("exact top-{K} read from {}", path.display());
            return Ok((t, f64::NAN));
        }
    }
    let t0 = Instant::now();
    let truth = exact_truth(base, queries)?;
    let secs = t0.elapsed().as_secs_f64();
    let mut text = String::new();
    for row in &truth {
        text.push_str(&row.iter().map(|p| p.0.to_string()).collect::<Vec<_>>().join(" "));
        text.push('\n');
    }
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((truth, secs))
}

/// Opens `path` mapped, as a server does, and prints a row per `nprobe`; `built` holds the
/// build seconds, build peak RSS and size on disk columns.
fn sweep(path: &Path, built: [String; 3], q: &[f32], truth: &Results) -> Result<()> {
    reset_peak_rss();
    let mut ix = IvfPqIndex::open(path, Verify::Header)?;
    let dim = ix.dim();
    let queries = q.len() / dim;
    ensure!(dim > 0 && truth.len() == queries, "{} does not match the benchmark's queries", path.display());
    // One untimed pass at the largest effort brings the pages searches touch into memory, as a
    // server's first minutes would.
    ix.set_search_effort(NPROBES[NPROBES.len() - 1]);
    let _ = ix.search_batch(q, K)?;
    let IndexParams::IvfPq(built_params) = ix.params() else { unreachable!("opened as IVF-PQ") };
    // Lists probed at the built re-ranking depth, then (with a candidate stage) the depth at
    // 16 lists.
    let reranks = if built_params.scan == Scan::Pq4 { &RERANKS[..] } else { &[] };
    let grid = NPROBES.map(|p| (p, built_params.rerank)).into_iter().chain(reranks.iter().map(|&r| (16, r)));
    for (nprobe, rerank) in grid {
        ix.set_search_effort(nprobe);
        ix.set_rerank(rerank);
        let mut got = Vec::with_capacity(queries);
        let mut buf = Vec::new();
        let t = Instant::now();
        for qv in q.chunks_exact(dim) {
            ix.search(qv, K, &mut buf)?;
            got.push(buf.clone());
        }
        let single = queries as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let _ = ix.search_batch(q, K)?;
        let batched = queries as f64 / t.elapsed().as_secs_f64();
        let shown = match ix.params() {
            IndexParams::IvfPq(b) if b.scan == Scan::Sq8 => format!("nlist={} nprobe={nprobe}", b.nlist),
            IndexParams::IvfPq(b) => format!(
                "nlist={} m={}x4 refine={} rerank={} nprobe={nprobe}",
                b.nlist,
                b.m,
                b.refine,
                if b.rerank == 0 { format!("auto ({})", ix.candidates(K)) } else { b.rerank.to_string() }
            ),
            other => other.to_string(),
        };
        let [b_s, b_rss, disk] = built.clone();
        row(&[
            if built_params.scan == Scan::Sq8 { "ivfsq8".into() } else { ix.kind().to_string() },
            shown,
            b_s,
            b_rss,
            disk,
            format!("{:.2}", peak_rss_gb()),
            format!("{:.4}", recall_at_k(truth, &got, 10)),
            format!("{:.4}", recall_at_k(truth, &got, K)),
            format!("{single:.0}"),
            format!("{batched:.0}"),
        ]);
    }
    Ok(())
}

fn row(cells: &[String]) {
    println!("| {} |", cells.join(" | "));
    let _ = std::io::stdout().flush();
}

/// What `needle bench ann --stream` measures.
pub struct StreamBench<'a> {
    pub items: usize,
    pub dim: usize,
    pub queries: usize,
    pub seed: u64,
    pub spread: f32,
    /// IVF-PQ parameter strings (`ivfpq:...`), each built and searched.
    pub kinds: &'a [String],
    /// Search this index file (built over the same set) instead of building.
    pub index: Option<&'a Path>,
    pub work: &'a Path,
    pub write_npy: Option<&'a Path>,
}

/// Runs the benchmark.
pub fn bench_ann_stream(b: &StreamBench<'_>) -> Result<()> {
    let StreamBench { items, dim, queries, seed, spread, kinds, index, work, write_npy } = *b;
    ensure!(items > 0 && dim > 0 && queries > 0, "items, dim and queries must all be positive");
    std::fs::create_dir_all(work).with_context(|| format!("cannot create {}", work.display()))?;
    let clusters = synth_clusters(items);
    let all = SyntheticSource::new(items + queries, dim, clusters, spread, seed)?;
    let base = Head { src: &all, rows: items };
    let mut q = vec![0.0f32; queries * dim];
    all.read(items, &mut q)?;
    println!(
        "ANN benchmark (streamed): {items} synthetic unit vectors, dim {dim}, {clusters} clusters, spread {spread}, \
         seed {seed}; {queries} held-out queries; {} threads; work folder {}\n",
        rayon::current_num_threads(),
        work.display()
    );
    if let Some(dir) = write_npy {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        let t0 = Instant::now();
        let mut w = NpyWriter::create(&dir.join("base.npy"), items, dim)?;
        let mut buf = vec![0.0f32; BLOCK * dim];
        for start in (0..items).step_by(BLOCK) {
            let len = (items - start).min(BLOCK);
            base.read(start, &mut buf[..len * dim])?;
            w.write(&buf[..len * dim])?;
        }
        w.finish()?;
        let mut w = NpyWriter::create(&dir.join("queries.npy"), queries, dim)?;
        w.write(&q)?;
        w.finish()?;
        println!("wrote {0}/base.npy and {0}/queries.npy in {1:.0} s\n", dir.display(), t0.elapsed().as_secs_f64());
    }
    let key = format!("{items}x{dim}-c{clusters}-s{seed}-sp{spread}-q{queries}");
    let (truth, scan_s) = cached_truth(work, &key, &base, &q)?;
    if scan_s.is_finite() {
        println!(
            "exact top-{K} by a streaming scan (rows generated on the fly): {scan_s:.1} s, {:.1} queries/s batched\n",
            queries as f64 / scan_s
        );
    }

    row(&[
        "index",
        "params",
        "build s",
        "build peak RSS GB",
        "on disk GB",
        "search peak RSS GB",
        "recall@10",
        "recall@100",
        "q/s single-thread",
        "q/s batched",
    ]
    .map(String::from));
    row(&["---"; 10].map(String::from));
    match index {
        Some(path) => {
            let size = std::fs::metadata(path).with_context(|| format!("cannot read {}", path.display()))?.len();
            sweep(path, ["-".into(), "-".into(), format!("{:.2}", size as f64 / 1e9)], &q, &truth)?;
        }
        None => {
            for spec in kinds {
                let params: IndexParams = spec.parse()?;
                let IndexParams::IvfPq(p) = params else {
                    anyhow::bail!("--stream benchmarks the compressed kind only; {spec:?} is not ivfpq:...");
                };
                let name: String = spec.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
                let path: PathBuf = work.join(format!("{name}.idx"));
                reset_peak_rss();
                let t0 = Instant::now();
                let progress = needle_api::progress::BarProgress::default();
                let ix = IvfPqIndex::build_from(&p, &base, None, &progress)?;
                progress.finish();
                let build_s = t0.elapsed().as_secs_f64();
                ix.save(&path)?;
                let build_rss = peak_rss_gb();
                drop(ix);
                let disk_gb = std::fs::metadata(&path)?.len() as f64 / 1e9;
                sweep(
                    &path,
                    [format!("{build_s:.0}"), format!("{build_rss:.2}"), format!("{disk_gb:.2}")],
                    &q,
                    &truth,
                )?;
            }
        }
    }
    Ok(())
}
