//! qdrant-edge (Qdrant's embedded engine) on the vectors `needle bench ann --write-npy DIR` writes,
//! printing the same columns as `needle bench ann` and `bench/ann_reference.py`.
//!
//! Usage: qdrant-edge-bench DIR [--m 16] [--ef-construct 200] [--ef 32,64,128,256] [--shard PATH]
//!
//! The points go into one segment (no size-triggered splits), so search walks one HNSW graph built
//! with the given M / ef_construct, as hnswlib, Faiss and needle do; queries run one at a time on
//! one thread.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, ensure, Context, Result};
use needle_index::{ExactIndex, Index};
use qdrant_edge::{
    Distance, EdgeConfigBuilder, EdgeOptimizersConfig, EdgeShard, EdgeVectorParamsBuilder, HnswIndexConfig, Memory, PointId,
    PointInsertOperations, PointOperations, PointStruct, QueryEnum, NamedQuery, VectorInternal, SearchParams, SearchRequestBuilder,
    UpdateOperation,
};

const VECTOR: &str = "v";
const K: usize = 100;

struct Args {
    dir: PathBuf,
    m: usize,
    ef_construct: usize,
    efs: Vec<usize>,
    shard: PathBuf,
}

fn parse_args() -> Result<Args> {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        dir: PathBuf::new(),
        m: 16,
        ef_construct: 200,
        efs: vec![32, 64, 128, 256],
        shard: std::env::temp_dir().join("needle-qdrant-edge-shard"),
    };
    let mut dir = None;
    while let Some(arg) = it.next() {
        let mut value = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--m" => a.m = value()?.parse()?,
            "--ef-construct" => a.ef_construct = value()?.parse()?,
            "--ef" => a.efs = value()?.split(',').map(str::parse).collect::<Result<_, _>>()?,
            "--shard" => a.shard = value()?.into(),
            s if s.starts_with("--") => bail!("unknown flag {s}"),
            s => dir = Some(PathBuf::from(s)),
        }
    }
    a.dir = dir.context("usage: qdrant-edge-bench DIR (holding base.npy and queries.npy)")?;
    Ok(a)
}

/// Reads the 2-D little-endian f32 arrays that `needle bench ann --write-npy` writes.
fn read_matrix(path: &Path) -> Result<(Vec<f32>, usize, usize)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    ensure!(bytes.starts_with(b"\x93NUMPY\x01\x00"), "{}: not a version-1 .npy file", path.display());
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen])?;
    ensure!(header.contains("'<f4'") && header.contains("False"), "{}: need C-ordered <f4", path.display());
    let shape = &header[header.find('(').context("no shape")? + 1..header.find(')').context("no shape")?];
    let dims: Vec<usize> = shape.split(',').filter(|s| !s.trim().is_empty()).map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
    ensure!(dims.len() == 2, "{}: expected a 2-D array, got shape {dims:?}", path.display());
    let data: Vec<f32> =
        bytes[10 + hlen..].chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    ensure!(data.len() == dims[0] * dims[1], "{}: truncated", path.display());
    Ok((data, dims[0], dims[1]))
}

fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    kb * 1024.0 / 1e6
}

fn dir_size(path: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(path) else { return 0 };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_size(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

fn recall(truth: &[Vec<(u32, f32)>], got: &[Vec<u32>], k: usize) -> f64 {
    let mut hit = 0usize;
    for (t, g) in truth.iter().zip(got) {
        let want: std::collections::HashSet<u32> = t.iter().take(k).map(|p| p.0).collect();
        hit += g.iter().take(k).filter(|id| want.contains(id)).count();
    }
    hit as f64 / (truth.len() * k) as f64
}

fn main() -> Result<()> {
    let args = parse_args()?;
    let (base, n, dim) = read_matrix(&args.dir.join("base.npy"))?;
    let (queries, q, qdim) = read_matrix(&args.dir.join("queries.npy"))?;
    ensure!(dim == qdim, "base has dim {dim}, queries {qdim}");
    eprintln!("{n} vectors, {q} queries, dim {dim}");

    let mut exact = ExactIndex::new(dim)?;
    exact.add(&(0..n as u32).collect::<Vec<_>>(), &base)?;
    let truth = exact.search_batch(&queries, K)?;

    if args.shard.exists() {
        std::fs::remove_dir_all(&args.shard)?;
    }
    std::fs::create_dir_all(&args.shard)?;
    #[allow(deprecated)] // `on_disk` is superseded by `memory` but still a required field.
    let hnsw = HnswIndexConfig {
        m: args.m,
        ef_construct: args.ef_construct,
        full_scan_threshold: 10,
        max_indexing_threads: 0,
        on_disk: None,
        memory: Some(Memory::Pinned),
        payload_m: None,
        inline_storage: None,
    };
    let optimizers = EdgeOptimizersConfig {
        default_segment_number: Some(1),
        max_segment_size: Some(usize::MAX / 4096),
        indexing_threshold: Some(1),
        ..Default::default()
    };
    let config = EdgeConfigBuilder::new()
        .vector(VECTOR, EdgeVectorParamsBuilder::new(dim, Distance::Dot).memory(Memory::Pinned).build())
        .hnsw_config(hnsw)
        .optimizers(optimizers)
        .wal_enabled(false)
        .max_search_threads(1)
        .build();
    let shard = EdgeShard::new(&args.shard, config).context("cannot create the shard")?;

    let t0 = Instant::now();
    for (start, chunk) in base.chunks(dim * 10_000).enumerate() {
        let points = chunk
            .chunks_exact(dim)
            .enumerate()
            .map(|(i, v)| {
                let id = (start * 10_000 + i) as u64;
                PointStruct::new(id, HashMap::from([(VECTOR.to_string(), v.to_vec())]), serde_json::json!({})).into()
            })
            .collect();
        shard.update(UpdateOperation::PointOperation(PointOperations::UpsertPoints(
            PointInsertOperations::PointsList(points),
        )))?;
    }
    let upsert_s = t0.elapsed().as_secs_f64();
    shard.optimize()?;
    let build_s = t0.elapsed().as_secs_f64();
    let info = shard.info()?;
    eprintln!("upsert {upsert_s:.1} s, upsert + optimize {build_s:.1} s; {info:?}");
    let disk_mb = dir_size(&args.shard) as f64 / 1e6;

    println!("| index | params | build s | shard on disk MB | peak RSS MB | recall@10 | recall@100 | q/s (1 thread) |");
    println!("|---|---|---|---|---|---|---|---|");
    for &ef in &args.efs {
        let mut got = Vec::with_capacity(q);
        let t = Instant::now();
        for query in queries.chunks_exact(dim) {
            let req = SearchRequestBuilder::new(QueryEnum::Nearest(NamedQuery { query: VectorInternal::from(query.to_vec()), using: Some(VECTOR.into()) }), K)
                .params(SearchParams { hnsw_ef: Some(ef), ..Default::default() })
                .build();
            let hits = shard.search(req)?;
            got.push(
                hits.iter()
                    .map(|p| match p.id {
                        PointId::NumId(id) => id as u32,
                        PointId::Uuid(_) => u32::MAX,
                    })
                    .collect::<Vec<_>>(),
            );
        }
        let qps = q as f64 / t.elapsed().as_secs_f64();
        println!(
            "| qdrant-edge 0.9 HNSW | m={} efC={} ef={ef} | {build_s:.1} | {disk_mb:.0} | {:.0} | {:.4} | {:.4} | {qps:.0} |",
            args.m,
            args.ef_construct,
            peak_rss_mb(),
            recall(&truth, &got, 10),
            recall(&truth, &got, K),
        );
    }
    Ok(())
}
