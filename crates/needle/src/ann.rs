//! `needle bench ann`: recall and speed of every index kind on one vector set, side by side, plus
//! the `.npy` reader/writer that lets `bench/ann_reference.py` (hnswlib, Faiss) run on exactly
//! the same vectors.
//!
//! Ground truth is the exact index's batched top-100. Single-thread figures run one query at a
//! time on the calling thread (the latency view); batched figures hand all queries to the rayon
//! pool at once (the throughput view).

use anyhow::{bail, ensure, Context, Result};
use needle_index::{
    recall_at_k, synthetic_clustered, ExactIndex, HnswIndex, HnswParams, Index, IndexParams, IvfIndex, IvfParams,
    IvfPqIndex, IvfPqParams, NpyFile, NpyWriter,
};
use needle_model::rng::Rng;
use rayon::prelude::*;
use std::io::Write;
use std::path::Path;
use std::time::Instant;

/// Default noise norm of the synthetic set relative to its unit centres (see
/// [`needle_index::synthetic_clustered`]): vectors sit ~45° from their centre. 1.5 makes a much
/// harder set (~56°), where every index needs several times the effort for the same recall.
pub const SYNTH_SPREAD: f32 = 1.0;
/// Top-K that recall and speed are measured at.
pub(crate) const K: usize = 100;
/// IVF `nprobe` values swept.
const NPROBES: [usize; 7] = [4, 8, 16, 32, 64, 128, 256];
/// IVF-PQ re-ranking depths swept at the default `nprobe`.
const RERANKS: [usize; 4] = [200, 400, 800, 1600];
/// HNSW `ef_search` values swept (`ef` below `K` is raised to `K`).
const EFS: [usize; 7] = [100, 128, 160, 200, 300, 500, 800];

/// Number of clusters in the synthetic set: `√items`, so clusters grow with the set as genres
/// and niches do (1,000 clusters of ~1,000 items at 1M).
pub fn synth_clusters(items: usize) -> usize {
    ((items as f64).sqrt().round() as usize).max(1)
}

/// Benchmarks every index on `items` synthetic clustered vectors of dimension `dim` (`√items`
/// clusters, noise norm `spread`, see [`SYNTH_SPREAD`]) with `queries` held-out queries from
/// the same distribution, and prints a markdown table.
/// With `write_npy`, also writes `base.npy` and `queries.npy` there for `bench/ann_reference.py`.
pub fn bench_ann(
    items: usize,
    dim: usize,
    queries: usize,
    seed: u64,
    spread: f32,
    write_npy: Option<&Path>,
) -> Result<()> {
    ensure!(items > 0 && dim > 0 && queries > 0, "items, dim and queries must all be positive");
    let clusters = synth_clusters(items);
    let t0 = Instant::now();
    let mut all = synthetic_clustered(items + queries, dim, clusters, spread, seed);
    let q = all.split_off(items * dim);
    println!(
        "ANN benchmark: {items} synthetic unit vectors, dim {dim}, {clusters} clusters (uniform), spread {spread} \
         (noise norm per vector), seed {seed}; {queries} held-out queries; generated in {:.1} s\n",
        t0.elapsed().as_secs_f64()
    );
    if let Some(dir) = write_npy {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        write_npy_f32(&dir.join("base.npy"), &all, &[items, dim])?;
        write_npy_f32(&dir.join("queries.npy"), &q, &[queries, dim])?;
        println!("wrote {0}/base.npy and {0}/queries.npy\n", dir.display());
    }
    run_table(&all, &q, dim)
}

/// The same table on vectors from a `.npy` file (`[n, dim]`, `<f4`), e.g. exported item
/// embeddings. Without a queries file, `queries` rows chosen by `seed` are held out of the base
/// and used as queries.
pub fn bench_ann_vectors(base_npy: &Path, queries_npy: Option<&Path>, queries: usize, seed: u64) -> Result<()> {
    let (base, shape) = read_npy_f32(base_npy)?;
    ensure!(shape.len() == 2 && shape[1] > 0, "{}: expected a 2-d array, got shape {shape:?}", base_npy.display());
    let dim = shape[1];
    let (base, q) = match queries_npy {
        Some(p) => {
            let (q, qs) = read_npy_f32(p)?;
            ensure!(qs.len() == 2 && qs[1] == dim, "{}: shape {qs:?} does not match base dimension {dim}", p.display());
            (base, q)
        }
        None => {
            let n = shape[0];
            ensure!(queries < n, "cannot hold out {queries} queries from {n} vectors");
            let mut order: Vec<usize> = (0..n).collect();
            Rng::new(seed).shuffle(&mut order);
            let mut is_query = vec![false; n];
            order[..queries].iter().for_each(|&i| is_query[i] = true);
            let mut b = Vec::with_capacity((n - queries) * dim);
            let mut q = Vec::with_capacity(queries * dim);
            for (i, row) in base.chunks_exact(dim).enumerate() {
                if is_query[i] { &mut q } else { &mut b }.extend_from_slice(row);
            }
            (b, q)
        }
    };
    println!(
        "ANN benchmark on {}: {} vectors, dim {dim}, {} queries\n",
        base_npy.display(),
        base.len() / dim,
        q.len() / dim
    );
    run_table(&base, &q, dim)
}

struct Row {
    index: String,
    params: String,
    build_s: f64,
    memory_mb: f64,
    recall10: f64,
    recall100: f64,
    qps_single: f64,
    qps_batch: f64,
}

fn print_row(r: &Row) {
    println!(
        "| {} | {} | {:.1} | {:.0} | {:.4} | {:.4} | {:.0} | {:.0} |",
        r.index, r.params, r.build_s, r.memory_mb, r.recall10, r.recall100, r.qps_single, r.qps_batch
    );
    let _ = std::io::stdout().flush();
}

/// Ranked `(id, score)` lists, one per query.
pub(crate) type Results = Vec<Vec<(u32, f32)>>;

/// One query at a time on this thread; returns results and queries per second.
fn single_thread(ix: &dyn Index, queries: &[f32], dim: usize, limit: usize) -> Result<(Results, f64)> {
    let mut out = Vec::new();
    let mut buf = Vec::new();
    let t = Instant::now();
    for q in queries.chunks_exact(dim).take(limit) {
        ix.search(q, K, &mut buf)?;
        out.push(buf.clone());
    }
    let qps = out.len() as f64 / t.elapsed().as_secs_f64();
    Ok((out, qps))
}

fn batched(ix: &dyn Index, queries: &[f32]) -> Result<(Results, f64)> {
    let nq = queries.len() / ix.dim();
    let t = Instant::now();
    let res = ix.search_batch(queries, K)?;
    Ok((res, nq as f64 / t.elapsed().as_secs_f64()))
}

fn run_table(base: &[f32], queries: &[f32], dim: usize) -> Result<()> {
    let n = base.len() / dim;
    let nq = queries.len() / dim;
    ensure!(n > 0 && nq > 0, "need at least one vector and one query");
    let ids: Vec<u32> = (0..n as u32).collect();
    let threads = rayon::current_num_threads();

    let bw = memory_bandwidth_gbs();
    println!("memory bandwidth (streaming read of 1 GiB, {threads} threads): {bw:.1} GB/s\n");

    println!("| index | params | build s | memory MB | recall@10 | recall@100 | q/s single-thread | q/s batched ({threads} threads) |");
    println!("|---|---|---|---|---|---|---|---|");

    let t = Instant::now();
    let mut exact = ExactIndex::new(dim)?;
    exact.add(&ids, base)?;
    let build_s = t.elapsed().as_secs_f64();
    let (truth, qps_batch) = batched(&exact, queries)?;
    // A full scan per query is slow at 1M; a few hundred queries give a stable rate.
    let single_limit = nq.min((2_000_000_000 / (n * dim).max(1)).clamp(20, 1000));
    let (single, qps_single) = single_thread(&exact, queries, dim, single_limit)?;
    let agree = recall_at_k(&truth[..single.len()], &single, K);
    ensure!(agree > 0.999, "exact single-query and batched results disagree (overlap {agree:.4})");
    print_row(&Row {
        index: "exact".into(),
        params: "-".into(),
        build_s,
        memory_mb: exact.memory_bytes() as f64 / 1e6,
        recall10: 1.0,
        recall100: 1.0,
        qps_single,
        qps_batch,
    });
    let scan_bytes = (n * dim * 4) as f64;
    let exact_batch_gbs = qps_batch * scan_bytes / 1e9;
    let exact_single_gbs = qps_single * scan_bytes / 1e9;
    drop(exact);

    let t = Instant::now();
    let mut ivf = IvfIndex::build(&IvfParams::default(), &ids, base, dim)?;
    let ivf_build = t.elapsed().as_secs_f64();
    let nlist = ivf.nlist();
    let (default_nprobe, default_ef) = match IndexParams::recommended() {
        IndexParams::Ivf(p) => (p.nprobe, 0),
        IndexParams::IvfPq(p) => (p.nprobe, 0),
        IndexParams::Hnsw(p) => (0, p.ef_search),
        IndexParams::Exact => (0, 0),
    };
    let row = |name: &str, params: String, build_s: f64, ix: &dyn Index| -> Result<()> {
        let (got, qps_single) = single_thread(ix, queries, dim, nq)?;
        let (_, qps_batch) = batched(ix, queries)?;
        print_row(&Row {
            index: name.into(),
            params,
            build_s,
            memory_mb: ix.memory_bytes() as f64 / 1e6,
            recall10: recall_at_k(&truth, &got, 10),
            recall100: recall_at_k(&truth, &got, K),
            qps_single,
            qps_batch,
        });
        Ok(())
    };
    for nprobe in NPROBES.into_iter().filter(|&p| p <= nlist) {
        ivf.set_search_effort(nprobe);
        let default = if nprobe == default_nprobe { " (default)" } else { "" };
        row("ivf-flat", format!("nlist={nlist} nprobe={nprobe}{default}"), ivf_build, &ivf)?;
    }
    drop(ivf);

    let pq = IvfPqParams::default();
    let t = Instant::now();
    let mut ivfpq = IvfPqIndex::build(&pq, &ids, base, dim)?;
    let ivfpq_build = t.elapsed().as_secs_f64();
    let IndexParams::IvfPq(built) = ivfpq.params() else { bail!("an IVF-PQ build reported other parameters") };
    // Lists probed at the default re-ranking depth, then the depth at the default lists.
    let sweep = NPROBES
        .into_iter()
        .filter(|&p| p <= built.nlist)
        .map(|p| (p, built.rerank))
        .chain(RERANKS.into_iter().map(|r| (built.nprobe, r)));
    for (nprobe, rerank) in sweep {
        ivfpq.set_search_effort(nprobe);
        ivfpq.set_rerank(rerank);
        let default = nprobe == built.nprobe && rerank == built.rerank;
        let params = format!(
            "nlist={} m={}x4 refine={} rerank={} nprobe={nprobe}{}",
            built.nlist,
            built.m,
            built.refine,
            if rerank == 0 { format!("auto ({})", ivfpq.candidates(K)) } else { rerank.to_string() },
            if default { " (default)" } else { "" }
        );
        row("ivf-pq", params, ivfpq_build, &ivfpq)?;
    }
    drop(ivfpq);

    let hp = HnswParams::default();
    let t = Instant::now();
    let mut hnsw = HnswIndex::new(dim, &hp)?;
    hnsw.add(&ids, base)?;
    let hnsw_build = t.elapsed().as_secs_f64();
    for ef in EFS {
        hnsw.set_search_effort(ef);
        let default = if ef == default_ef { " (default)" } else { "" };
        row(
            "hnsw",
            format!("m={} ef_construction={} ef_search={ef}{default}", hp.m, hp.ef_construction),
            hnsw_build,
            &hnsw,
        )?;
    }

    println!(
        "\nexact batched search streams {exact_batch_gbs:.1} GB/s of vectors ({:.0}% of the measured {bw:.1} GB/s); \
         one query at a time on one thread: {exact_single_gbs:.1} GB/s ({:.0}%).",
        100.0 * exact_batch_gbs / bw,
        100.0 * exact_single_gbs / bw
    );
    println!(
        "(\"streams\" counts n × dim × 4 bytes per query, the bytes a scan must cover; batched search reuses each \
         cache-resident tile of vectors for 64 queries, so it can exceed the bandwidth of memory.)"
    );
    Ok(())
}

/// Read bandwidth of main memory: the best of three parallel sums over a 1 GiB buffer.
pub fn memory_bandwidth_gbs() -> f64 {
    const BYTES: usize = 1 << 30;
    let buf = vec![1u64; BYTES / 8];
    let chunk = buf.len() / rayon::current_num_threads().max(1) / 16;
    let mut best = 0.0f64;
    for _ in 0..3 {
        let t = Instant::now();
        let s: u64 = buf
            .par_chunks(chunk.max(1024))
            .map(|c| {
                // Four independent sums so the loop is bound by loads, not by one add chain.
                let mut acc = [0u64; 4];
                for w in c.chunks_exact(4) {
                    for i in 0..4 {
                        acc[i] = acc[i].wrapping_add(w[i]);
                    }
                }
                acc.iter().fold(0u64, |a, &b| a.wrapping_add(b))
            })
            .reduce(|| 0, u64::wrapping_add);
        let secs = t.elapsed().as_secs_f64();
        std::hint::black_box(s);
        best = best.max(BYTES as f64 / secs / 1e9);
    }
    best
}

/// Writes `data` as a NumPy `.npy` float32 array of `shape` (through a temporary file).
pub fn write_npy_f32(path: &Path, data: &[f32], shape: &[usize]) -> Result<()> {
    let expected: usize = shape.iter().product();
    ensure!(expected == data.len(), "shape {shape:?} holds {expected} values, data has {}", data.len());
    let mut w = NpyWriter::with_shape(path, shape)?;
    w.write(data)?;
    Ok(w.finish()?)
}

/// Reads a NumPy `.npy` file holding a C-ordered little-endian `f32` array; returns the values
/// and the shape. Other dtypes and Fortran order are refused with a message saying so.
pub fn read_npy_f32(path: &Path) -> Result<(Vec<f32>, Vec<usize>)> {
    let f = NpyFile::open(path)?;
    Ok((f.read_all()?, f.shape().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trip_and_header_layout() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5 - 1.0).collect();
        write_npy_f32(&path, &data, &[3, 4]).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(&bytes[..8], b"\x93NUMPY\x01\x00");
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0, "data must start on a 64-byte boundary");
        let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }"), "{header}");
        assert!(header.ends_with('\n'));
        assert_eq!(bytes.len(), 10 + hlen + 48);
        assert_eq!(&bytes[10 + hlen..10 + hlen + 4], &(-1.0f32).to_le_bytes());
        let (back, shape) = read_npy_f32(&path).unwrap();
        assert_eq!((back, shape), (data, vec![3, 4]));

        write_npy_f32(&path, &[1.0, 2.0], &[2]).unwrap();
        assert_eq!(read_npy_f32(&path).unwrap().1, vec![2]);
        assert!(write_npy_f32(&path, &[1.0], &[2]).is_err());
    }

    #[test]
    fn npy_reader_refuses_other_dtypes_and_truncation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.npy");
        write_npy_f32(&path, &[1.0; 8], &[2, 4]).unwrap();
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 3]).unwrap();
        assert!(read_npy_f32(&path).unwrap_err().to_string().contains("needs 32 bytes"));
        let mut f8 = good.clone();
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        std::fs::write(&path, f8).unwrap();
        assert!(read_npy_f32(&path).unwrap_err().to_string().contains("float32"));
        std::fs::write(&path, b"not numpy").unwrap();
        assert!(read_npy_f32(&path).is_err());
    }
}
