//! Behaviour of the four indexes on small generated data: correctness against brute force,
//! recall, filtering, incremental adds, persistence, and refusal of bad input and damaged files.

use needle_core::rng::Rng;
use needle_index::{
    build, load, open, recall_at_k, synthetic_clustered, Allowed, ExactIndex, HnswIndex, HnswParams, Index, IndexError,
    IndexKind, IndexParams, IvfIndex, IvfParams, IvfPqIndex, IvfPqParams, Refine, Scan, SearchOptions, Verify,
};
use std::path::Path;

fn brute_force(data: &[f32], dim: usize, q: &[f32], k: usize, keep: impl Fn(u32) -> bool) -> Vec<(u32, f32)> {
    let mut all: Vec<(u32, f32)> = data
        .chunks_exact(dim)
        .enumerate()
        .map(|(i, r)| (i as u32, r.iter().zip(q).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>() as f32))
        .filter(|p| keep(p.0))
        .collect();
    all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    all.truncate(k);
    all
}

fn ids(n: usize) -> Vec<u32> {
    (0..n as u32).collect()
}

/// Clustered base vectors plus held-out queries from the same clusters.
fn clustered(n: usize, nq: usize, dim: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let mut all = synthetic_clustered(n + nq, dim, 20, 1.0, seed);
    let q = all.split_off(n * dim);
    (all, q)
}

fn all_kinds() -> Vec<IndexParams> {
    vec![
        IndexParams::Exact,
        IndexParams::Ivf(IvfParams { nlist: 32, nprobe: 8, ..IvfParams::default() }),
        IndexParams::Hnsw(HnswParams { m: 8, ef_construction: 64, ef_search: 64, seed: 1 }),
        IndexParams::IvfPq(IvfPqParams { nlist: 32, nprobe: 8, ..IvfPqParams::default() }),
        IndexParams::IvfPq(IvfPqParams { nlist: 16, nprobe: 4, refine: Refine::Flat, ..IvfPqParams::default() }),
        IndexParams::IvfPq(IvfPqParams { nlist: 32, nprobe: 8, scan: Scan::Sq8, ..IvfPqParams::default() }),
    ]
}

/// How far a kind's reported scores may be from the true inner products: SQ8 re-ranking
/// reports 8-bit reconstructions, everything else exact products.
fn score_tolerance(params: &IndexParams) -> f32 {
    match params {
        IndexParams::IvfPq(IvfPqParams { refine: Refine::Sq8, .. }) => 0.02,
        _ => 0.0,
    }
}

#[test]
fn exact_matches_brute_force_and_batch_matches_single() {
    let dim = 19; // not a multiple of the SIMD width: exercises the tails
    let mut rng = Rng::new(3);
    let data: Vec<f32> = (0..3000 * dim).map(|_| rng.normal()).collect();
    let queries: Vec<f32> = (0..70 * dim).map(|_| rng.normal()).collect();
    let ix = build(&IndexParams::Exact, &ids(3000), &data, dim).unwrap();
    let batch = ix.search_batch(&queries, 25).unwrap();
    assert_eq!(batch.len(), 70);
    let mut out = Vec::new();
    for (qi, q) in queries.chunks_exact(dim).enumerate() {
        ix.search(q, 25, &mut out).unwrap();
        let want = brute_force(&data, dim, q, 25, |_| true);
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), want.iter().map(|p| p.0).collect::<Vec<_>>());
        for ((a, b), c) in out.iter().zip(&want).zip(&batch[qi]) {
            assert!((a.1 - b.1).abs() < 1e-4 && (a.1 - c.1).abs() < 1e-4);
        }
        assert_eq!(recall_at_k(&[want], &[batch[qi].clone()], 25), 1.0);
    }
    // One query in a batch still uses every vector shard and merges them correctly.
    let one = ix.search_batch(&queries[..dim], 5).unwrap();
    assert_eq!(
        one[0].iter().map(|p| p.0).collect::<Vec<_>>(),
        brute_force(&data, dim, &queries[..dim], 5, |_| true).iter().map(|p| p.0).collect::<Vec<_>>()
    );
}

#[test]
fn approximate_indexes_reach_high_recall_and_effort_buys_recall() {
    let dim = 32;
    let (data, queries) = clustered(6000, 200, dim, 11);
    let exact = build(&IndexParams::Exact, &ids(6000), &data, dim).unwrap();
    let truth = exact.search_batch(&queries, 10).unwrap();

    let mut ivf =
        IvfIndex::build(&IvfParams { nlist: 64, nprobe: 8, train_iters: 8, seed: 5 }, &ids(6000), &data, dim).unwrap();
    let r_ivf = recall_at_k(&truth, &ivf.search_batch(&queries, 10).unwrap(), 10);
    assert!(r_ivf > 0.9, "ivf recall@10 {r_ivf}");
    assert!(ivf.list_sizes().iter().all(|&s| s > 0), "k-means left an empty list");
    ivf.set_search_effort(64);
    assert_eq!(recall_at_k(&truth, &ivf.search_batch(&queries, 10).unwrap(), 10), 1.0, "probing every list is exact");

    let mut hnsw = HnswIndex::new(dim, &HnswParams { m: 12, ef_construction: 100, ef_search: 10, seed: 2 }).unwrap();
    hnsw.add(&ids(6000), &data).unwrap();
    assert!(hnsw.mean_degree() > 4.0, "graph too sparse: {}", hnsw.mean_degree());
    let low = recall_at_k(&truth, &hnsw.search_batch(&queries, 10).unwrap(), 10);
    hnsw.set_search_effort(128);
    let high = recall_at_k(&truth, &hnsw.search_batch(&queries, 10).unwrap(), 10);
    assert!(high > 0.98, "hnsw recall@10 at ef=128: {high}");
    assert!(high >= low, "more effort lost recall: {low} -> {high}");
    // A per-query effort override behaves like the default one.
    let mut out = Vec::new();
    hnsw.search_with(&queries[..dim], 10, &SearchOptions { effort: Some(128), keep: None }, &mut out).unwrap();
    assert_eq!(out.len(), 10);

    let pq = |refine, rerank| IvfPqParams { nlist: 64, nprobe: 8, refine, rerank, seed: 5, ..IvfPqParams::default() };
    let recall = |ix: &IvfPqIndex| recall_at_k(&truth, &ix.search_batch(&queries, 10).unwrap(), 10);
    let mut sq8 = IvfPqIndex::build(&pq(Refine::Sq8, 0), &ids(6000), &data, dim).unwrap();
    let bare = IvfPqIndex::build(&pq(Refine::None, 0), &ids(6000), &data, dim).unwrap();
    let (r_sq8, r_bare) = (recall(&sq8), recall(&bare));
    assert!(r_sq8 > 0.9, "ivf-pq + sq8 recall@10 {r_sq8}");
    assert!(r_bare > 0.5 && r_bare < r_sq8, "4-bit codes alone should rank worse than re-ranked: {r_bare} vs {r_sq8}");
    sq8.set_search_effort(2);
    assert!(recall(&sq8) < r_sq8, "fewer lists should cost recall");
    // Every list probed and every vector re-scored from the floats: exact search.
    let mut flat = IvfPqIndex::build(&pq(Refine::Flat, 6000), &ids(6000), &data, dim).unwrap();
    flat.set_search_effort(64);
    assert_eq!(recall(&flat), 1.0, "re-ranking everything from floats is exact");
}

#[test]
fn ivf_pq_pads_an_odd_number_of_subquantizers_and_uses_a_coarse_graph_for_many_lists() {
    let dim = 12;
    let n = 2 * needle_index::COARSE_GRAPH_MIN_LISTS + 500;
    let (data, queries) = clustered(n, 50, dim, 17);
    let truth = build(&IndexParams::Exact, &ids(n), &data, dim).unwrap().search_batch(&queries, 10).unwrap();
    // m = 3: four dimensions per sub-quantizer, padded to 4 in the code blocks.
    let p = IvfPqParams { nlist: needle_index::COARSE_GRAPH_MIN_LISTS, nprobe: 64, m: 3, ..IvfPqParams::default() };
    let ix = IvfPqIndex::build(&p, &ids(n), &data, dim).unwrap();
    assert_eq!(ix.nlist(), needle_index::COARSE_GRAPH_MIN_LISTS);
    let r = recall_at_k(&truth, &ix.search_batch(&queries, 10).unwrap(), 10);
    assert!(r > 0.85, "recall@10 with m = 3 and a coarse graph: {r}");
    let dir = tempfile::tempdir().unwrap();
    ix.save(&dir.path().join("g.idx")).unwrap();
    let back = load(&dir.path().join("g.idx")).unwrap();
    assert_eq!(back.search_batch(&queries, 10).unwrap(), ix.search_batch(&queries, 10).unwrap());
    assert!(matches!(
        build(&IndexParams::IvfPq(IvfPqParams { m: 5, ..IvfPqParams::default() }), &ids(n), &data, dim),
        Err(IndexError::Param(_))
    ));
}

#[test]
fn filtered_search_never_returns_excluded_ids_and_fills_k() {
    let dim = 16;
    let (data, queries) = clustered(4000, 20, dim, 4);
    for params in all_kinds() {
        let ix = build(&params, &ids(4000), &data, dim).unwrap();
        let mut out = Vec::new();
        let mut hits = 0;
        for q in queries.chunks_exact(dim) {
            // Exclude the true top-20 and every id divisible by 3: the answer must come from
            // the rest, as when a user's seen items are removed.
            let top: Vec<u32> = brute_force(&data, dim, q, 20, |_| true).iter().map(|p| p.0).collect();
            let keep = |id: u32| !id.is_multiple_of(3) && !top.contains(&id);
            ix.search_filtered(q, 10, &keep, &mut out).unwrap();
            assert_eq!(out.len(), 10, "{params}: filtered result is short");
            assert!(out.iter().all(|p| keep(p.0)), "{params}: excluded id returned");
            let want = brute_force(&data, dim, q, 10, keep);
            hits += out.iter().filter(|p| want.iter().any(|w| w.0 == p.0)).count();
        }
        let r = hits as f64 / (10.0 * 20.0);
        assert!(r > 0.85, "{params}: filtered recall {r}");
    }
}

#[test]
fn adding_after_build_makes_new_vectors_findable() {
    let dim = 16;
    let (data, _) = clustered(3000, 0, dim, 8);
    let ext_ids: Vec<u32> = (0..3000u32).map(|i| i * 7 + 100).collect();
    for params in all_kinds() {
        let mut ix = build(&params, &ext_ids[..2000], &data[..2000 * dim], dim).unwrap();
        ix.add(&ext_ids[2000..], &data[2000 * dim..]).unwrap();
        assert_eq!(ix.len(), 3000);
        let mut out = Vec::new();
        let mut found = 0;
        for i in (2000..3000).step_by(50) {
            ix.search(&data[i * dim..(i + 1) * dim], 1, &mut out).unwrap();
            found += usize::from(out[0].0 == ext_ids[i]);
        }
        assert!(found >= 19, "{params}: only {found}/20 added vectors found as their own nearest");
    }
}

#[test]
fn ranks_by_inner_product_not_cosine() {
    // A long vector pointing slightly away from the query outscores a unit vector pointing at
    // it: the metric is the inner product, and nothing assumes unit norms.
    let dim = 4;
    let data = vec![1.0, 0.0, 0.0, 0.0, 3.0, 3.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0];
    for params in all_kinds() {
        let ix = build(&params, &[10, 11, 12, 13], &data, dim).unwrap();
        let mut out = Vec::new();
        ix.search(&[1.0, 0.0, 0.0, 0.0], 4, &mut out).unwrap();
        assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), vec![11, 10, 12, 13], "{params}");
        assert!((out[0].1 - 3.0).abs() <= score_tolerance(&params), "{params}: {}", out[0].1);
    }
}

#[test]
fn bad_input_is_an_error_not_a_panic() {
    let dim = 8;
    let (data, _) = clustered(100, 0, dim, 1);
    for params in all_kinds() {
        let mut ix = build(&params, &ids(100), &data, dim).unwrap();
        let mut out = vec![(1, 1.0)];
        assert!(matches!(ix.search(&[0.0; 7], 5, &mut out), Err(IndexError::Dimension { .. })));
        assert!(matches!(ix.search(&[f32::NAN; 8], 5, &mut out), Err(IndexError::NonFinite { .. })));
        assert!(matches!(ix.search_batch(&[0.0; 12], 5), Err(IndexError::Dimension { .. })));
        assert!(matches!(ix.add(&[1, 2], &[0.0; 8]), Err(IndexError::CountMismatch { .. })));
        let mut bad = vec![0.0; 8];
        bad[3] = f32::INFINITY;
        assert!(matches!(ix.add(&[1], &bad), Err(IndexError::NonFinite { .. })));
        assert_eq!(ix.len(), 100, "a rejected add must not change the index");
        ix.search(&data[..dim], 0, &mut out).unwrap();
        assert!(out.is_empty());
        ix.search(&data[..dim], 1000, &mut out).unwrap();
        assert_eq!(out.len(), 100, "{params}: k above the size returns everything");
        assert!(ix.search_batch(&[], 5).unwrap().is_empty());
    }
    assert!(build(&IndexParams::Exact, &[], &[], 0).is_err());
    assert!(matches!(build(&IndexParams::Ivf(IvfParams::default()), &[], &[], 8), Err(IndexError::Param(_))));
    let empty = HnswIndex::new(8, &HnswParams::default()).unwrap();
    let mut out = vec![(1, 1.0)];
    empty.search(&[0.0; 8], 3, &mut out).unwrap();
    assert!(out.is_empty());
    let empty = ExactIndex::new(8).unwrap();
    empty.search(&[0.0; 8], 3, &mut out).unwrap();
    assert!(out.is_empty());
}

#[test]
fn params_parse_print_and_validate() {
    for s in [
        "exact",
        "ivf:nlist=100,nprobe=4,train_iters=5,seed=9",
        "hnsw:m=8,ef_construction=50,ef_search=20,seed=3",
        "ivfpq:nlist=100,nprobe=4,m=8,rerank=200,refine=flat,train_iters=5,seed=9",
        "ivfsq8:nlist=100,nprobe=4,train_iters=5,seed=9",
    ] {
        let p: IndexParams = s.parse().unwrap();
        assert_eq!(p.to_string(), s);
        assert_eq!(p.to_string().parse::<IndexParams>().unwrap(), p);
    }
    assert_eq!(
        "hnsw:ef=300".parse::<IndexParams>().unwrap(),
        IndexParams::Hnsw(HnswParams { ef_search: 300, ..HnswParams::default() })
    );
    assert_eq!("ivf".parse::<IndexParams>().unwrap().kind(), IndexKind::Ivf);
    assert_eq!(
        "ivfpq:refine=none".parse::<IndexParams>().unwrap(),
        IndexParams::IvfPq(IvfPqParams { refine: Refine::None, ..IvfPqParams::default() })
    );
    for bad in [
        "annoy",
        "hnsw:m=1",
        "hnsw:m=x",
        "ivf:nprobe=0",
        "hnsw:depth=3",
        "exact:nlist=3",
        "ivf:nlist",
        "ivfpq:refine=pq",
        "ivfpq:m=300",
        "ivfpq:nprobe=0",
        "ivf:refine=sq8",
        "ivfsq8:m=8",
    ] {
        assert!(bad.parse::<IndexParams>().is_err(), "{bad} parsed");
    }
}

fn saved(params: &IndexParams, dir: &Path) -> (Box<dyn Index>, std::path::PathBuf, Vec<f32>) {
    let dim = 12;
    let (data, queries) = clustered(600, 10, dim, 21);
    let ix = build(params, &ids(600), &data, dim).unwrap();
    let path = dir.join(format!("{}.idx", params.kind()));
    ix.save(&path).unwrap();
    (ix, path, queries)
}

#[test]
fn save_and_load_round_trip_exactly() {
    let dir = tempfile::tempdir().unwrap();
    for params in all_kinds() {
        let (ix, path, queries) = saved(&params, dir.path());
        let want = ix.search_batch(&queries, 10).unwrap();
        for back in [load(&path).unwrap(), open(&path, Verify::Header).unwrap(), open(&path, Verify::Full).unwrap()] {
            let got = (back.kind(), back.dim(), back.len(), back.params());
            assert_eq!(got, (ix.kind(), ix.dim(), ix.len(), ix.params()));
            assert_eq!(back.search_batch(&queries, 10).unwrap(), want, "{params}");
        }
        assert!(!dir.path().join(format!("{}.idx.tmp", params.kind())).exists(), "temporary file left behind");
    }
}

#[test]
fn truncated_or_flipped_files_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    for params in all_kinds() {
        let (_, path, _) = saved(&params, dir.path());
        let good = std::fs::read(&path).unwrap();
        let len = good.len();
        let broken = dir.path().join("broken.idx");
        for cut in [0, 3, 8, 12, 40, 79, 80, 81, 100, len / 2, len - 8, len - 1] {
            std::fs::write(&broken, &good[..cut]).unwrap();
            let err = load(&broken).expect_err(&format!("{params}: truncation at {cut} loaded"));
            assert!(matches!(err, IndexError::Truncated { .. }), "{params} cut {cut}: {err}");
            // A mapped open checks the length before touching any section.
            let err = open(&broken, Verify::Header).expect_err(&format!("{params}: truncation at {cut} opened"));
            assert!(matches!(err, IndexError::Truncated { .. }), "{params} cut {cut}: {err}");
        }
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 8]);
        std::fs::write(&broken, &padded).unwrap();
        assert!(load(&broken).is_err(), "{params}: trailing bytes accepted");
        let step = (len / 37).max(1);
        for at in (0..len).step_by(step).chain([9, 13, 17, 21, 25, 33, 65, 73, len - 1]) {
            for bit in [0x01u8, 0x80] {
                let mut bad = good.clone();
                bad[at] ^= bit;
                std::fs::write(&broken, &bad).unwrap();
                let err = load(&broken).expect_err(&format!("{params}: flip at {at} loaded"));
                let msg = err.to_string();
                assert!(msg.contains("broken.idx"), "error does not name the file: {msg}");
                if at < 8 {
                    assert!(matches!(err, IndexError::BadMagic { .. }), "{msg}");
                } else if at >= 80 {
                    assert!(matches!(err, IndexError::Checksum { .. }), "{params} flip at {at}: {msg}");
                    let err = open(&broken, Verify::Full).expect_err(&format!("{params}: flip at {at} verified"));
                    assert!(matches!(err, IndexError::Checksum { .. }), "{params} flip at {at}: {err}");
                    // Without the checksum a flip in the payload may go unseen, but it never
                    // crashes a search.
                    if let Ok(ix) = open(&broken, Verify::Header) {
                        let _ = ix.search_batch(&vec![0.5; ix.dim() * 3], 5);
                    }
                }
            }
        }
        let mut v3 = good.clone();
        v3[8] = 3;
        std::fs::write(&broken, &v3).unwrap();
        assert!(matches!(load(&broken), Err(IndexError::UnsupportedVersion { found: 3, .. })));
        // A file of format 1 (the same layout, the older checksum) still loads and searches alike.
        let mut v1 = good.clone();
        v1[8] = 1;
        let h = needle_index::image_checksum(&v1).unwrap();
        v1[72..80].copy_from_slice(&h.to_le_bytes());
        assert_ne!(v1[72..80], good[72..80], "format 1 has another checksum");
        std::fs::write(&broken, &v1).unwrap();
        let old = load(&broken).unwrap_or_else(|e| panic!("{params}: format 1 does not load: {e}"));
        let fresh = load(&path).unwrap();
        let q = vec![0.5; fresh.dim() * 3];
        assert_eq!(old.search_batch(&q, 5).unwrap(), fresh.search_batch(&q, 5).unwrap());
    }
    assert!(matches!(load(&dir.path().join("missing.idx")), Err(IndexError::Io { .. })));
}

#[test]
fn tune_effort_finds_the_smallest_effort_meeting_the_target() {
    let dim = 16;
    let (data, queries) = clustered(5000, 100, dim, 31);
    let truth = build(&IndexParams::Exact, &ids(5000), &data, dim).unwrap().search_batch(&queries, 20).unwrap();
    for params in all_kinds() {
        let mut ix = build(&params, &ids(5000), &data, dim).unwrap();
        let (effort, r) = needle_index::tune_effort(ix.as_mut(), &queries, &truth, 20, 0.97).unwrap();
        assert!(r >= 0.97, "{params}: tuned recall {r}");
        let got = ix.search_batch(&queries, 20).unwrap();
        assert!((recall_at_k(&truth, &got, 20) - r).abs() < 1e-9, "{params}: effort was not kept");
        if effort > 1 && params.kind() == IndexKind::Ivf {
            ix.set_search_effort(effort / 2);
            let lower = recall_at_k(&truth, &ix.search_batch(&queries, 20).unwrap(), 20);
            assert!(lower < 0.97, "{params}: effort {} already reached {lower}", effort / 2);
        }
    }
    let mut ix = build(&IndexParams::Exact, &ids(5000), &data, dim).unwrap();
    assert!(needle_index::tune_effort(ix.as_mut(), &queries, &truth[..3], 20, 0.9).is_ok(), "exact needs no tuning");
}

/// Records every stage and how far it advanced.
#[derive(Default)]
struct Recorder(std::sync::Mutex<Vec<(String, u64, u64)>>);

impl needle_index::Progress for Recorder {
    fn stage(&self, name: &str, total: u64) {
        self.0.lock().unwrap().push((name.to_owned(), total, 0));
    }
    fn advance(&self, n: u64) {
        self.0.lock().unwrap().last_mut().unwrap().2 += n;
    }
}

#[test]
fn ivf_pq_streams_a_npy_file_into_the_same_index_as_from_memory() {
    let dim = 16;
    let n = 3000;
    let (data, queries) = clustered(n, 20, dim, 41);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.npy");
    let mut w = needle_index::NpyWriter::create(&path, n, dim).unwrap();
    for rows in data.chunks(700 * dim) {
        w.write(rows).unwrap();
    }
    w.finish().unwrap();
    let npy = needle_index::NpyFile::open(&path).unwrap();
    let p = IvfPqParams { nlist: 24, nprobe: 6, ..IvfPqParams::default() };
    let from_memory = IvfPqIndex::build(&p, &ids(n), &data, dim).unwrap();
    let progress = Recorder::default();
    let streamed = IvfPqIndex::build_from(&p, &npy, None, &progress).unwrap();
    assert_eq!(streamed.search_batch(&queries, 10).unwrap(), from_memory.search_batch(&queries, 10).unwrap());
    let stages = progress.0.into_inner().unwrap();
    for name in ["assign lists", "encode"] {
        let s = stages.iter().find(|s| s.0 == name).unwrap_or_else(|| panic!("no stage {name}: {stages:?}"));
        assert_eq!((s.1, s.2), (n as u64, n as u64), "{name}");
    }

    let mut bad = data.clone();
    bad[1234 * dim + 3] = f32::NAN;
    let mut w = needle_index::NpyWriter::create(&path, n, dim).unwrap();
    w.write(&bad).unwrap();
    w.finish().unwrap();
    let npy = needle_index::NpyFile::open(&path).unwrap();
    let err = IvfPqIndex::build_from(&p, &npy, None, &needle_index::NoProgress).err().unwrap();
    assert!(matches!(err, IndexError::NonFinite { row: 1234, .. }), "{err}");
}

#[test]
fn search_among_scores_selective_filters_directly_and_is_never_short() {
    let dim = 16;
    let n = 4000;
    let (data, queries) = clustered(n, 10, dim, 12);
    for params in all_kinds() {
        let ix = build(&params, &ids(n), &data, dim).unwrap();
        let tol = score_tolerance(&params).max(1e-4);
        let mut out = Vec::new();
        for q in queries.chunks_exact(dim) {
            // 30 ids spread over the catalogue: far too few for any index scan to meet 10.
            let few: Vec<u32> = (0..30).map(|i| i * 131 + 7).collect();
            let keep = |id: u32| id != 7;
            let allowed = Allowed::new(&few[..]).unwrap();
            let path = needle_index::search_among(ix.as_ref(), q, 10, &allowed, &keep, &mut out).unwrap();
            assert_eq!(path, needle_index::FilterPath::Direct, "{params}");
            let want = brute_force(&data, dim, q, 10, |id| few.contains(&id) && keep(id));
            assert_eq!(out.len(), 10, "{params}");
            for (got, w) in out.iter().zip(&want) {
                assert!((got.1 - w.1).abs() <= tol, "{params}: {got:?} vs {w:?}");
            }
            if tol <= 1e-4 {
                assert_eq!(out.iter().map(|p| p.0).collect::<Vec<_>>(), want.iter().map(|p| p.0).collect::<Vec<_>>());
            }
            // Half the catalogue: the index searches with a membership test.
            let half: Vec<u32> = (0..n as u32).filter(|i| i % 2 == 1).collect();
            let allowed = Allowed::new(half).unwrap();
            let path = needle_index::search_among(ix.as_ref(), q, 10, &allowed, &|_| true, &mut out).unwrap();
            assert_eq!(out.len(), 10, "{params}");
            assert!(out.iter().all(|p| p.0 % 2 == 1), "{params}: an id outside the filter");
            if params.kind() != IndexKind::Exact {
                assert_eq!(path, needle_index::FilterPath::Index, "{params}");
            }
        }
        let mut scored = Vec::new();
        ix.score_ids(&queries[..dim], &[5, 999_999, 6], &mut scored).unwrap();
        assert_eq!(scored.iter().map(|p| p.0).collect::<Vec<_>>(), vec![5, 6], "{params}: unknown ids are skipped");
    }
    let err = Allowed::new(vec![9, 3]).err();
    assert!(matches!(err, Some(IndexError::Param(_))), "unsorted ids accepted");
    assert!(Allowed::new(vec![3, 3]).is_err(), "repeated ids accepted");
}

#[test]
fn allowed_membership_agrees_with_a_binary_search() {
    let mut state = 99u64;
    let mut next = move || {
        state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (state >> 33) as u32
    };
    for (n, span) in [(0usize, 1u32), (1, 1), (1000, 200_000), (5000, 1 << 20), (300, u32::MAX)] {
        let mut ids: Vec<u32> = (0..n).map(|_| next() % span.max(1)).collect();
        ids.extend([0, 65_535, 65_536, u32::MAX].iter().filter(|_| n > 500));
        ids.sort_unstable();
        ids.dedup();
        let set = Allowed::new(&ids[..]).unwrap();
        let probes =
            (0..20_000).map(|_| next() % span.max(1)).chain([0, 1, 65_535, 65_536, 65_537, u32::MAX - 1, u32::MAX]);
        for id in probes.chain(ids.iter().copied()) {
            assert_eq!(set.contains(id), ids.binary_search(&id).is_ok(), "id {id} in a set of {}", ids.len());
        }
    }
}
