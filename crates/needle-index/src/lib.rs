//! Top-K inner-product search over item vectors, the step between a trained two-tower model and
//! serving: given a user vector, which item rows score highest?
//!
//! Four indexes share one small trait, [`Index`] (build, add, search one query or a batch,
//! save, [`load`]), in the spirit of Faiss's interface:
//!
//! - [`ExactIndex`]: scans every vector. It is the reference that approximate indexes are
//!   measured against, and fast enough for a few hundred thousand items.
//! - [`IvfIndex`]: k-means lists (IVF-Flat); a query scans the `nprobe` lists whose centroids
//!   score highest, with the same scan kernel as the exact index.
//! - [`HnswIndex`]: a hierarchical navigable small-world graph over the same contiguous vectors.
//! - [`IvfPqIndex`]: k-means lists of 4-bit product-quantization codes scanned 32 at a time
//!   (`fastscan.rs`), the best candidates re-scored from 8-bit codes or floats: the compressed
//!   index for catalogues whose float vectors would not fit in memory.
//!
//! The metric is always the inner product. Models L2-normalise their vectors, but nothing here
//! assumes it. Items are `u32` rows; the caller maps rows to its own ids.
//!
//! Index files are written in one pass and read with one read; a header records magic, format
//! version, kind, dimension, metric, count, parameters and a checksum, so a damaged file is an
//! [`IndexError`] rather than a crash or silently wrong results (see `format.rs`).

mod error;
mod exact;
pub mod fastscan;
mod format;
mod hnsw;
mod idmap;
mod ivf;
mod ivfpq;
pub mod kernels;
mod kmeans;
pub mod source;
mod synth;

pub use error::{IndexError, Result};
pub use exact::ExactIndex;
pub use format::{image_checksum, Verify, FORMAT_VERSION};
pub use hnsw::HnswIndex;
pub use ivf::IvfIndex;
pub use ivfpq::{IvfPqIndex, COARSE_GRAPH_MIN_LISTS, MAX_DEFAULT_LISTS};
pub use kmeans::kmeans;
pub use source::{NpyFile, NpyWriter, SliceSource, SyntheticSource, VectorSource};
pub use synth::synthetic_clustered;

use kernels::TopK;
use rayon::prelude::*;
use std::borrow::Cow;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

/// Where `needle index build` saves a run's index, inside the run directory.
pub const RUN_INDEX_FILE: &str = "index.bin";

/// Which algorithm an index uses; recorded in the file header.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum IndexKind {
    Exact,
    Ivf,
    Hnsw,
    IvfPq,
}

impl fmt::Display for IndexKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            IndexKind::Exact => "exact",
            IndexKind::Ivf => "ivf",
            IndexKind::Hnsw => "hnsw",
            IndexKind::IvfPq => "ivfpq",
        })
    }
}

/// IVF-Flat build and search parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvfParams {
    /// Number of k-means lists; 0 picks `4·√n` at build time (Faiss's lower guideline, which
    /// keeps the centroid scan cheap next to the list scans).
    pub nlist: usize,
    /// Lists scanned per query: the speed/recall knob.
    pub nprobe: usize,
    /// Lloyd iterations of the coarse k-means.
    pub train_iters: usize,
    /// Seeds the k-means sample and initial centroids, so a build repeats exactly.
    pub seed: u64,
}

impl Default for IvfParams {
    fn default() -> Self {
        IvfParams { nlist: 0, nprobe: 16, train_iters: 10, seed: 42 }
    }
}

/// Where IVF-PQ's final scores come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refine {
    /// The 4-bit PQ scores themselves: the smallest index, the roughest ranking.
    None,
    /// 8-bit per-dimension codes: a quarter of the float vectors' size.
    Sq8,
    /// The float vectors, kept in the index.
    Flat,
}

impl fmt::Display for Refine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refine::None => "none",
            Refine::Sq8 => "sq8",
            Refine::Flat => "flat",
        })
    }
}

/// What an IVF-PQ search scans in the probed lists.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scan {
    /// 4-bit PQ codes with the fast-scan kernel, then the best candidates re-scored.
    Pq4,
    /// The 8-bit codes themselves, every vector of the probed lists scored from them (IVF-SQ8):
    /// 64 bytes per 64-d vector instead of 16 + 64, no candidate stage, no PQ error.
    Sq8,
}

/// IVF-PQ build and search parameters (see [`IvfPqIndex`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IvfPqParams {
    /// Number of k-means lists; 0 picks `4·√n` at build time.
    pub nlist: usize,
    /// Lists scanned per query: the speed/recall knob.
    pub nprobe: usize,
    /// Sub-quantizers of 16 codewords (4 bits) each; must divide the dimension. 0 picks
    /// `dim / 2`: 16 bytes per 64-d vector.
    pub m: usize,
    /// Candidates re-scored per query; 0 picks `max(4k, 256)`. Ignored without re-ranking data.
    pub rerank: usize,
    /// What candidates are re-scored from (always SQ8 with `scan = Sq8`).
    pub refine: Refine,
    /// What the probed lists are scanned with.
    pub scan: Scan,
    /// Lloyd iterations of the coarse k-means.
    pub train_iters: usize,
    /// Seeds k-means, the quantizer's training sample and the coarse graph.
    pub seed: u64,
}

impl Default for IvfPqParams {
    fn default() -> Self {
        IvfPqParams {
            nlist: 0,
            nprobe: 32,
            m: 0,
            rerank: 0,
            refine: Refine::Sq8,
            scan: Scan::Pq4,
            train_iters: 10,
            seed: 42,
        }
    }
}

/// HNSW build and search parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HnswParams {
    /// Links per node on upper layers; layer 0 keeps up to `2·m`.
    pub m: usize,
    /// Candidate list size while inserting: higher builds a better graph, slower.
    pub ef_construction: usize,
    /// Candidate list size while searching (raised to `k` when smaller): the speed/recall knob.
    pub ef_search: usize,
    /// Seeds the layer draw of every node.
    pub seed: u64,
}

impl Default for HnswParams {
    fn default() -> Self {
        HnswParams { m: 16, ef_construction: 200, ef_search: 128, seed: 42 }
    }
}

/// How to build an index; also what [`Index::params`] reports back.
///
/// Parses from and prints as a short string (`exact`, `ivf:nlist=4000,nprobe=16`,
/// `hnsw:m=16,ef_construction=200,ef_search=128`), so a command line or config can name an index
/// in one value, like a Faiss factory string. Unnamed parameters keep their defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IndexParams {
    Exact,
    Ivf(IvfParams),
    Hnsw(HnswParams),
    IvfPq(IvfPqParams),
}

impl IndexParams {
    /// The kind these parameters build.
    pub fn kind(&self) -> IndexKind {
        match self {
            IndexParams::Exact => IndexKind::Exact,
            IndexParams::Ivf(_) => IndexKind::Ivf,
            IndexParams::Hnsw(_) => IndexKind::Hnsw,
            IndexParams::IvfPq(_) => IndexKind::IvfPq,
        }
    }

    /// The index to use when nothing is specified: HNSW (`m = 16`, `ef_construction = 200`,
    /// `ef_search = 128`).
    ///
    /// Chosen by measurement (`results/ann.md`): on 1M clustered 64-d vectors it reached
    /// recall@100 0.993 at 1.4× hnswlib's single-thread rate at equal recall and built in 0.7× its
    /// time; on ML-1M item vectors it kept HR@10 within 0.2% of exact search. IVF-Flat is faster on
    /// well-clustered synthetic sets, but its fixed `nprobe` lost a third of the true top-100 on
    /// real item vectors, so it is an option to calibrate with [`tune_effort`], not the default.
    pub fn recommended() -> Self {
        IndexParams::Hnsw(HnswParams::default())
    }
}

impl Default for IndexParams {
    fn default() -> Self {
        IndexParams::recommended()
    }
}

impl fmt::Display for IndexParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IndexParams::Exact => f.write_str("exact"),
            IndexParams::Ivf(p) => {
                write!(f, "ivf:nlist={},nprobe={},train_iters={},seed={}", p.nlist, p.nprobe, p.train_iters, p.seed)
            }
            IndexParams::Hnsw(p) => write!(
                f,
                "hnsw:m={},ef_construction={},ef_search={},seed={}",
                p.m, p.ef_construction, p.ef_search, p.seed
            ),
            IndexParams::IvfPq(p) if p.scan == Scan::Sq8 => {
                write!(f, "ivfsq8:nlist={},nprobe={},train_iters={},seed={}", p.nlist, p.nprobe, p.train_iters, p.seed)
            }
            IndexParams::IvfPq(p) => write!(
                f,
                "ivfpq:nlist={},nprobe={},m={},rerank={},refine={},train_iters={},seed={}",
                p.nlist, p.nprobe, p.m, p.rerank, p.refine, p.train_iters, p.seed
            ),
        }
    }
}

impl FromStr for IndexParams {
    type Err = IndexError;

    fn from_str(s: &str) -> Result<Self> {
        let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut pairs = Vec::new();
        for item in rest.split(',').map(str::trim).filter(|x| !x.is_empty()) {
            let (k, v) =
                item.split_once('=').ok_or_else(|| IndexError::Param(format!("{item:?} in {s:?} is not key=value")))?;
            pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        let num = |k: &str, v: &str| -> Result<u64> {
            v.parse().map_err(|_| IndexError::Param(format!("{k}={v:?} in {s:?} is not a whole number")))
        };
        let unknown =
            |k: &str, known: &str| IndexError::Param(format!("unknown parameter {k:?} for {kind}; known: {known}"));
        // The keys every list-based kind shares; false for any other key.
        let list_key = |k: &str, v: &str, nlist: &mut usize, nprobe: &mut usize, iters: &mut usize, seed: &mut u64| {
            match k {
                "nlist" => *nlist = num(k, v)? as usize,
                "nprobe" => *nprobe = num(k, v)? as usize,
                "train_iters" | "iters" => *iters = num(k, v)? as usize,
                "seed" => *seed = num(k, v)?,
                _ => return Ok(false),
            }
            Ok::<_, IndexError>(true)
        };
        let params = match kind.trim().to_ascii_lowercase().as_str() {
            "exact" | "flat" => {
                if let Some((k, _)) = pairs.first() {
                    return Err(unknown(k, "none"));
                }
                IndexParams::Exact
            }
            "ivf" | "ivf-flat" | "ivfflat" => {
                let mut p = IvfParams::default();
                for (k, v) in pairs {
                    if !list_key(&k, &v, &mut p.nlist, &mut p.nprobe, &mut p.train_iters, &mut p.seed)? {
                        return Err(unknown(&k, "nlist, nprobe, train_iters, seed"));
                    }
                }
                IndexParams::Ivf(p)
            }
            "hnsw" => {
                let mut p = HnswParams::default();
                for (k, v) in pairs {
                    match k.as_str() {
                        "m" => p.m = num(&k, &v)? as usize,
                        "ef_construction" | "efc" => p.ef_construction = num(&k, &v)? as usize,
                        "ef_search" | "ef" => p.ef_search = num(&k, &v)? as usize,
                        "seed" => p.seed = num(&k, &v)?,
                        _ => return Err(unknown(&k, "m, ef_construction, ef_search, seed")),
                    }
                }
                IndexParams::Hnsw(p)
            }
            "ivfpq" | "ivf-pq" => {
                let mut p = IvfPqParams::default();
                for (k, v) in pairs {
                    if list_key(&k, &v, &mut p.nlist, &mut p.nprobe, &mut p.train_iters, &mut p.seed)? {
                        continue;
                    }
                    match k.as_str() {
                        "m" => p.m = num(&k, &v)? as usize,
                        "rerank" => p.rerank = num(&k, &v)? as usize,
                        "refine" => {
                            p.refine = match v.to_ascii_lowercase().as_str() {
                                "none" => Refine::None,
                                "sq8" => Refine::Sq8,
                                "flat" => Refine::Flat,
                                _ => {
                                    return Err(IndexError::Param(format!(
                                        "refine={v:?} in {s:?}: expected none, sq8 or flat"
                                    )))
                                }
                            }
                        }
                        _ => return Err(unknown(&k, "nlist, nprobe, m, rerank, refine, train_iters, seed")),
                    }
                }
                IndexParams::IvfPq(p)
            }
            "ivfsq8" | "ivf-sq8" => {
                let mut p = IvfPqParams { scan: Scan::Sq8, ..IvfPqParams::default() };
                for (k, v) in pairs {
                    if !list_key(&k, &v, &mut p.nlist, &mut p.nprobe, &mut p.train_iters, &mut p.seed)? {
                        return Err(unknown(&k, "nlist, nprobe, train_iters, seed"));
                    }
                }
                IndexParams::IvfPq(p)
            }
            other => {
                return Err(IndexError::Param(format!(
                    "unknown index kind {other:?}; known: exact, ivf, hnsw, ivfpq, ivfsq8"
                )))
            }
        };
        params.validate()?;
        Ok(params)
    }
}

impl IndexParams {
    /// Rejects parameters no index can be built with.
    pub fn validate(&self) -> Result<()> {
        match self {
            IndexParams::Exact => Ok(()),
            IndexParams::Ivf(p) => {
                if p.nprobe == 0 {
                    return Err(IndexError::Param("ivf nprobe must be at least 1".into()));
                }
                Ok(())
            }
            IndexParams::IvfPq(p) => {
                if p.nprobe == 0 {
                    return Err(IndexError::Param("ivfpq nprobe must be at least 1".into()));
                }
                if p.m > fastscan::MAX_SUBQUANTIZERS {
                    return Err(IndexError::Param(format!(
                        "ivfpq m must be at most {}, got {}",
                        fastscan::MAX_SUBQUANTIZERS,
                        p.m
                    )));
                }
                Ok(())
            }
            IndexParams::Hnsw(p) => {
                if p.m < 2 || p.m > 256 {
                    return Err(IndexError::Param(format!("hnsw m must be in 2..=256, got {}", p.m)));
                }
                if p.ef_construction == 0 || p.ef_search == 0 {
                    return Err(IndexError::Param("hnsw ef_construction and ef_search must be at least 1".into()));
                }
                Ok(())
            }
        }
    }
}

/// Receives the progress of a long build: each stage's name and size, then its advances.
pub trait Progress: Sync {
    /// A new stage of `total` units begins.
    fn stage(&self, name: &str, total: u64);
    /// `n` more units of the current stage are done.
    fn advance(&self, n: u64);
}

/// Progress that goes nowhere.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Per-query options for [`Index::search_with`].
#[derive(Clone, Copy, Default)]
pub struct SearchOptions<'a> {
    /// Overrides the index's search effort for this query: `nprobe` for IVF, `ef_search` for
    /// HNSW; ignored by the exact index. Lets one shared index serve different latency budgets.
    pub effort: Option<usize>,
    /// Only ids for which this returns `true` may appear in the result (e.g. excluding a user's
    /// seen items). Filtered-out vectors still guide HNSW's graph walk, so excluding a few items
    /// costs little recall; the result is short only if fewer than `k` ids pass.
    pub keep: Option<&'a dyn Fn(u32) -> bool>,
}

/// A searchable set of `dim`-dimensional vectors, each tagged with a `u32` id.
///
/// Results are `(id, inner product)` pairs, best first; ties go to the smaller id. Searches take
/// `&self` and are safe to run from many threads at once.
pub trait Index: Send + Sync + fmt::Debug {
    /// The algorithm.
    fn kind(&self) -> IndexKind;

    /// Vector dimension.
    fn dim(&self) -> usize;

    /// Number of vectors held.
    fn len(&self) -> usize;

    /// True when no vector has been added.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Build and search parameters in effect (IVF's `nlist` as resolved at build time).
    fn params(&self) -> IndexParams;

    /// Bytes of the index structures (vectors, ids, lists, graph), for capacity planning.
    fn memory_bytes(&self) -> usize;

    /// Adds vectors (`ids.len() × dim` values, row-major). Ids need not be unique or dense.
    fn add(&mut self, ids: &[u32], vectors: &[f32]) -> Result<()>;

    /// Sets the default search effort (`nprobe` / `ef_search`); the exact index ignores it.
    fn set_search_effort(&mut self, effort: usize);

    /// The `k` best ids for one query, written into `out` (cleared first).
    fn search_with(&self, query: &[f32], k: usize, opts: &SearchOptions, out: &mut Vec<(u32, f32)>) -> Result<()>;

    /// The `k` best ids for one query at the index's default effort.
    fn search(&self, query: &[f32], k: usize, out: &mut Vec<(u32, f32)>) -> Result<()> {
        self.search_with(query, k, &SearchOptions::default(), out)
    }

    /// The `k` best ids among those `keep` accepts.
    fn search_filtered(
        &self,
        query: &[f32],
        k: usize,
        keep: &dyn Fn(u32) -> bool,
        out: &mut Vec<(u32, f32)>,
    ) -> Result<()> {
        self.search_with(query, k, &SearchOptions { effort: None, keep: Some(keep) }, out)
    }

    /// The `k` best ids for each of `queries.len() / dim` queries, spread over the rayon pool.
    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let dim = self.dim();
        check_flat("queries", dim, queries)?;
        queries
            .par_chunks(dim)
            .map_init(Vec::new, |buf, q| {
                self.search(q, k, buf)?;
                Ok(buf.clone())
            })
            .collect()
    }

    /// Writes the index to `path` (atomically, via a temporary file).
    fn save(&self, path: &Path) -> Result<()>;

    /// Appends `(id, score)` for each of `ids` the index holds (others are skipped), scored as
    /// the index's final ranking scores them: exactly from float rows, from the re-ranking data
    /// for IVF-PQ. The direct side of a selective filter ([`search_among`]).
    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut Vec<(u32, f32)>) -> Result<()>;

    /// About how many stored vectors a top-`k` search at the default effort compares: what
    /// [`search_among`] weighs a filter's size against.
    fn scan_estimate(&self, k: usize) -> usize {
        let _ = k;
        self.len()
    }
}

/// The ids a filtered search may return: ascending and distinct, checked once when built, with
/// a directory of where each block of ids sharing their high bits starts.
///
/// Membership is a binary search within one block. Over the whole list, 10^6 allowed ids take
/// 20 dependent reads spread over 4 MB, most of them cache misses; the index path tests every
/// scanned id that could enter its top `k`, so at 10^8 items that search dominated a filtered
/// query. Blocks are sized to hold about 16 ids (one or two cache lines), so a test costs the
/// directory read and one block: the directory takes a quarter of the list's own memory.
/// Servers build one per posting list at load, so no request pays for the check or the
/// directory.
#[derive(Clone, Debug, Default)]
pub struct Allowed<'a> {
    ids: Cow<'a, [u32]>,
    /// Ids `id >> shift == b` are `ids[starts[b]..starts[b + 1]]`.
    shift: u32,
    starts: Vec<u32>,
}

/// Ids per directory block that [`Allowed`] aims for.
const ALLOWED_BLOCK_IDS: u64 = 16;

impl<'a> Allowed<'a> {
    /// Fails unless `ids` is ascending and distinct. One pass over the ids.
    pub fn new(ids: impl Into<Cow<'a, [u32]>>) -> Result<Allowed<'a>> {
        let ids = ids.into();
        if !ids.windows(2).all(|w| w[0] < w[1]) {
            return Err(IndexError::Param(
                "the allowed ids of a filtered search must be ascending and distinct".into(),
            ));
        }
        let Some(&max) = ids.last() else { return Ok(Allowed { ids, shift: 32, starts: Vec::new() }) };
        // The widest block that still holds about ALLOWED_BLOCK_IDS ids on average.
        let span = (max as u64 + 1) * ALLOWED_BLOCK_IDS / ids.len() as u64;
        let shift = span.max(1).ilog2().min(31);
        let blocks = (max >> shift) as usize + 1;
        let mut starts = Vec::with_capacity(blocks + 1);
        for (i, &id) in ids.iter().enumerate() {
            let b = (id >> shift) as usize;
            while starts.len() <= b {
                starts.push(i as u32);
            }
        }
        starts.push(ids.len() as u32);
        Ok(Allowed { ids, shift, starts })
    }

    pub fn ids(&self) -> &[u32] {
        &self.ids
    }

    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    pub fn contains(&self, id: u32) -> bool {
        let b = id.checked_shr(self.shift).unwrap_or(0) as usize;
        match (self.starts.get(b), self.starts.get(b + 1)) {
            (Some(&s), Some(&e)) => self.ids[s as usize..e as usize].binary_search(&id).is_ok(),
            _ => false,
        }
    }

    /// The same set, owning its ids.
    pub fn into_owned(self) -> Allowed<'static> {
        Allowed { ids: Cow::Owned(self.ids.into_owned()), shift: self.shift, starts: self.starts }
    }
}

/// How [`search_among`] answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FilterPath {
    /// Every allowed id was scored directly: the filter was too selective for the index's scan to
    /// meet `k` of its ids.
    Direct,
    /// The index searched as usual, skipping ids outside the filter.
    Index,
}

/// The `k` best among `allowed` (e.g. the items of one category) that
/// `keep` also accepts (e.g. not yet seen).
///
/// A search at the index's default effort compares about [`Index::scan_estimate`] vectors. The
/// allowed ids are scored directly when that is cheaper (they number at most a quarter of the
/// scan: a direct score is a random read, several times a scanned one) or when fewer than `2k`
/// of them are expected among the scanned vectors, where the index path would come back short
/// or have to scan on. Otherwise the index searches
/// with a membership test, and should that still come back short, the direct path answers. The
/// result is therefore never short while `allowed` holds `k` ids the index has and `keep`
/// accepts.
pub fn search_among(
    index: &dyn Index,
    query: &[f32],
    k: usize,
    allowed: &Allowed<'_>,
    keep: &dyn Fn(u32) -> bool,
    out: &mut Vec<(u32, f32)>,
) -> Result<FilterPath> {
    check_query(index.dim(), query)?;
    let n = index.len().max(1);
    let scan = index.scan_estimate(k).min(n);
    let expected = allowed.len() as f64 * scan as f64 / n as f64;
    if expected >= 2.0 * k as f64 && allowed.len() > scan / 4 {
        let member = |id: u32| allowed.contains(id) && keep(id);
        index.search_filtered(query, k, &member, out)?;
        if out.len() >= k {
            return Ok(FilterPath::Index);
        }
    }
    let mut scored = Vec::with_capacity(allowed.len().min(1 << 20));
    let mut pass = Vec::with_capacity(allowed.len().min(1 << 20));
    pass.extend(allowed.ids().iter().copied().filter(|&id| keep(id)));
    index.score_ids(query, &pass, &mut scored)?;
    let mut top = TopK::new(k);
    scored.iter().for_each(|&(id, s)| top.push(s, id));
    top.drain_sorted(out);
    Ok(FilterPath::Direct)
}

/// Builds an index of the given kind over `ids` and their vectors (`ids.len() × dim` values).
pub fn build(params: &IndexParams, ids: &[u32], vectors: &[f32], dim: usize) -> Result<Box<dyn Index>> {
    params.validate()?;
    Ok(match params {
        IndexParams::Exact => {
            let mut ix = ExactIndex::new(dim)?;
            ix.add(ids, vectors)?;
            Box::new(ix)
        }
        IndexParams::Ivf(p) => Box::new(IvfIndex::build(p, ids, vectors, dim)?),
        IndexParams::Hnsw(p) => {
            let mut ix = HnswIndex::new(dim, p)?;
            ix.add(ids, vectors)?;
            Box::new(ix)
        }
        IndexParams::IvfPq(p) => Box::new(IvfPqIndex::build(p, ids, vectors, dim)?),
    })
}

/// Reads an index file written by [`Index::save`], whatever its kind, onto the heap, after
/// checking its checksum over every byte.
pub fn load(path: &Path) -> Result<Box<dyn Index>> {
    let (header, backing) = format::read_verified(path)?;
    from_backing(&header, &backing, path)
}

/// Opens an index file by mapping it into memory: the IVF-PQ kind searches the mapped codes in
/// place (pages are read as queries touch them, and the map is released when the index is
/// dropped), the other kinds copy their arrays out of the map.
///
/// With [`Verify::Header`] only the header, the file's length and the structure are checked,
/// at a cost independent of the file's size; [`Verify::Full`] also checksums every byte (what
/// [`load`] and `needle index verify` do).
pub fn open(path: &Path, verify: Verify) -> Result<Box<dyn Index>> {
    let (header, backing) = format::map(path, verify)?;
    from_backing(&header, &backing, path)
}

/// Index files up to this size are checksummed in full by [`open_for_serving`].
pub const FULL_CHECK_MAX_BYTES: u64 = 1 << 30;

/// Opens an index for a server: mapped, with the checksum verified over every byte when the
/// file is at most [`FULL_CHECK_MAX_BYTES`] (well under a second), and only the header, length
/// and structure above it, where a full pass would read gigabytes before the first request.
/// Those files are checked at build time and by `needle index verify`.
pub fn open_for_serving(path: &Path) -> Result<Box<dyn Index>> {
    let size = std::fs::metadata(path).map_err(|e| IndexError::Io { path: path.to_owned(), source: e })?.len();
    open(path, if size <= FULL_CHECK_MAX_BYTES { Verify::Full } else { Verify::Header })
}

fn from_backing(
    header: &format::Header,
    backing: &std::sync::Arc<format::Backing>,
    path: &Path,
) -> Result<Box<dyn Index>> {
    Ok(match header.kind {
        IndexKind::Exact => Box::new(ExactIndex::from_payload(header, backing, path)?),
        IndexKind::Ivf => Box::new(IvfIndex::from_payload(header, backing, path)?),
        IndexKind::Hnsw => Box::new(HnswIndex::from_payload(header, backing, path)?),
        IndexKind::IvfPq => Box::new(IvfPqIndex::from_payload(header, backing, path)?),
    })
}

/// Mean over queries of |got top-k ∩ true top-k| / |true top-k|, the usual ANN quality measure.
/// Queries whose truth is empty are skipped; with no such queries the result is 1.
pub fn recall_at_k(truth: &[Vec<(u32, f32)>], got: &[Vec<(u32, f32)>], k: usize) -> f64 {
    let mut sum = 0.0;
    let mut n = 0usize;
    for (t, g) in truth.iter().zip(got) {
        let t = &t[..t.len().min(k)];
        if t.is_empty() {
            continue;
        }
        let mut want: Vec<u32> = t.iter().map(|p| p.0).collect();
        want.sort_unstable();
        let hits = g[..g.len().min(k)].iter().filter(|p| want.binary_search(&p.0).is_ok()).count();
        sum += hits.min(t.len()) as f64 / t.len() as f64;
        n += 1;
    }
    if n == 0 {
        1.0
    } else {
        sum / n as f64
    }
}

/// Sets the index's search effort to the smallest value whose recall@`k` on `queries` reaches
/// `target`, and returns `(effort, recall)`.
///
/// Recall at a given effort depends on the data far more than on its size (clustered vectors
/// need a few IVF lists, near-uniform ones hundreds), so a fixed default cannot be right
/// everywhere; a few hundred representative queries (e.g. user vectors) and their exact answers
/// (`truth`, from [`ExactIndex`]'s `search_batch`) settle it in seconds. Efforts tried: `k`,
/// then doubling, for HNSW (up to 8192); 1, 2, 4, … up to `nlist` for IVF and IVF-PQ. If no effort reaches
/// the target, the largest is kept. The exact index returns `(0, 1.0)`.
pub fn tune_effort(
    index: &mut dyn Index,
    queries: &[f32],
    truth: &[Vec<(u32, f32)>],
    k: usize,
    target: f64,
) -> Result<(usize, f64)> {
    let ladder: Vec<usize> = match index.params() {
        IndexParams::Exact => return Ok((0, 1.0)),
        IndexParams::Ivf(IvfParams { nlist, .. }) | IndexParams::IvfPq(IvfPqParams { nlist, .. }) => {
            let mut v: Vec<usize> =
                std::iter::successors(Some(1usize), |&e| Some(e * 2)).take_while(|&e| e < nlist).collect();
            v.push(nlist.max(1));
            v
        }
        IndexParams::Hnsw(_) => {
            std::iter::successors(Some(k.max(1)), |&e| Some(e * 2)).take_while(|&e| e <= 8192).collect()
        }
    };
    let nq = check_flat("queries", index.dim(), queries)?;
    if truth.len() != nq {
        return Err(IndexError::CountMismatch { ids: truth.len(), rows: nq });
    }
    let mut last = (0, 0.0);
    for effort in ladder {
        index.set_search_effort(effort);
        let got = index.search_batch(queries, k)?;
        let r = recall_at_k(truth, &got, k);
        last = (effort, r);
        if r >= target {
            break;
        }
    }
    Ok(last)
}

/// Checks that a flat buffer is a whole number of `dim`-wide rows and returns the row count.
pub(crate) fn check_flat(what: &'static str, dim: usize, data: &[f32]) -> Result<usize> {
    if dim == 0 || !data.len().is_multiple_of(dim) {
        return Err(IndexError::Dimension { what, expected: dim, got: data.len() });
    }
    Ok(data.len() / dim)
}

/// Validates a query: right length, finite values.
pub(crate) fn check_query(dim: usize, q: &[f32]) -> Result<()> {
    if q.len() != dim {
        return Err(IndexError::Dimension { what: "query", expected: dim, got: q.len() });
    }
    if !q.iter().all(|x| x.is_finite()) {
        return Err(IndexError::NonFinite { what: "query", row: 0 });
    }
    Ok(())
}

/// Validates an `add` call and the resulting size.
pub(crate) fn check_add(dim: usize, have: usize, ids: &[u32], vectors: &[f32]) -> Result<()> {
    let rows = check_flat("vectors", dim, vectors)?;
    if rows != ids.len() {
        return Err(IndexError::CountMismatch { ids: ids.len(), rows });
    }
    if let Some(row) = vectors.chunks_exact(dim).position(|r| !r.iter().all(|x| x.is_finite())) {
        return Err(IndexError::NonFinite { what: "vectors", row });
    }
    if have as u64 + rows as u64 > u32::MAX as u64 {
        return Err(IndexError::TooLarge);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Byte offset of section `i` (0-based) in a file image whose first section holds
    /// `first_elem`-byte elements and every later one skipped holds 4-byte elements.
    fn section_offset(bytes: &[u8], i: usize, first_elem: usize) -> usize {
        let mut pos = format::HEADER_LEN;
        for s in 0..i {
            let count = u64::from_le_bytes(bytes[pos..pos + 8].try_into().unwrap()) as usize;
            let bytes_len = count * if s == 0 { first_elem } else { 4 };
            pos += 8 + bytes_len.div_ceil(8) * 8;
        }
        pos
    }

    fn forge(ix: &dyn Index, edit: impl Fn(&mut Vec<u8>)) -> Result<Box<dyn Index>> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.idx");
        ix.save(&path).unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        edit(&mut bytes);
        format::reseal(&mut bytes);
        std::fs::write(&path, &bytes).unwrap();
        load(&path)
    }

    #[test]
    fn checksummed_but_inconsistent_files_are_rejected() {
        let dim = 8;
        let data = synthetic_clustered(300, dim, 5, 1.0, 2);
        let ids: Vec<u32> = (0..300).collect();
        let n = 300usize;

        let exact = build(&IndexParams::Exact, &ids, &data, dim).unwrap();
        assert!(forge(exact.as_ref(), |_| ()).is_ok(), "resealing an untouched file must load");
        let err = forge(exact.as_ref(), |b| b[24..32].copy_from_slice(&7u64.to_le_bytes())).unwrap_err();
        assert!(err.to_string().contains("section ids holds 300 elements, expected 7"), "{err}");
        assert!(forge(exact.as_ref(), |b| b[20] = 0).is_err(), "dimension 0");
        assert!(forge(exact.as_ref(), |b| b[16] = 9).is_err(), "unknown metric");
        assert!(forge(exact.as_ref(), |b| b[12] = 9).is_err(), "unknown kind");

        let ivf = build(&IndexParams::Ivf(IvfParams { nlist: 10, ..IvfParams::default() }), &ids, &data, dim).unwrap();
        // Sections: centroids, offsets. Make offsets[1] larger than offsets[2].
        let err = forge(ivf.as_ref(), |b| {
            let off = section_offset(b, 1, 4) + 8;
            b[off + 4..off + 8].copy_from_slice(&1000u32.to_le_bytes());
        })
        .unwrap_err();
        assert!(err.to_string().contains("offsets"), "{err}");
        assert!(forge(ivf.as_ref(), |b| b[32..40].copy_from_slice(&0u64.to_le_bytes())).is_err(), "nlist 0");

        let hnsw = build(&IndexParams::Hnsw(HnswParams { m: 4, ..HnswParams::default() }), &ids, &data, dim).unwrap();
        // Sections: entry (2 × u64), ids, levels (u8), upper offsets, layer 0. Point node 0's
        // first link past the last node.
        let err = forge(hnsw.as_ref(), |b| {
            let lv = section_offset(b, 2, 8);
            let after_levels = lv + 8 + n.div_ceil(8) * 8;
            let upper = after_levels + 8 + (4 * n).div_ceil(8) * 8;
            let l0 = upper + 8;
            b[l0..l0 + 4].copy_from_slice(&1u32.to_le_bytes());
            b[l0 + 4..l0 + 8].copy_from_slice(&(n as u32 + 5).to_le_bytes());
        })
        .unwrap_err();
        assert!(err.to_string().contains("is not a node of that layer"), "{err}");
        let err = forge(hnsw.as_ref(), |b| {
            let e = format::HEADER_LEN + 8;
            b[e..e + 8].copy_from_slice(&(n as u64).to_le_bytes());
        })
        .unwrap_err();
        assert!(err.to_string().contains("entry point"), "{err}");

        let pq =
            build(&IndexParams::IvfPq(IvfPqParams { nlist: 10, ..IvfPqParams::default() }), &ids, &data, dim).unwrap();
        assert!(forge(pq.as_ref(), |_| ()).is_ok(), "resealing an untouched IVF-PQ file must load");
        // Sections: settings [m, refine, train_iters], centroids, codebooks, offsets, ...
        let settings = format::HEADER_LEN + 8;
        let err = forge(pq.as_ref(), |b| b[settings..settings + 8].copy_from_slice(&3u64.to_le_bytes())).unwrap_err();
        assert!(err.to_string().contains("must divide the dimension"), "{err}");
        let err =
            forge(pq.as_ref(), |b| b[settings + 8..settings + 16].copy_from_slice(&7u64.to_le_bytes())).unwrap_err();
        assert!(err.to_string().contains("re-ranking code 7"), "{err}");
        let err = forge(pq.as_ref(), |b| {
            let off = section_offset(b, 3, 8) + 8;
            b[off + 4..off + 8].copy_from_slice(&1000u32.to_le_bytes());
        })
        .unwrap_err();
        assert!(err.to_string().contains("offsets"), "{err}");
    }
}
