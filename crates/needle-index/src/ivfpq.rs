//! IVF-PQ: inverted lists of 4-bit product-quantization codes, scanned with the fast-scan
//! kernel, then the best candidates re-scored from 8-bit scalar codes or the float vectors.
//!
//! This is the index for catalogues too large to hold as float vectors: a 64-d vector costs 16
//! bytes of PQ code (32 sub-quantizers of 2 dimensions), plus 64 for the SQ8 re-ranking codes,
//! against 256 as floats.
//!
//! - Coarse step: k-means lists as in IVF-Flat. Above [`COARSE_GRAPH_MIN_LISTS`] lists the
//!   centroids are searched through an HNSW graph rather than scanned, so `nlist` can grow with
//!   the catalogue without the centroid scan dominating a query.
//! - Codes: each vector's residual from its list centroid is product-quantized. For the inner
//!   product the residual costs nothing at query time: `q·x = q·c + q·r`, and the table of
//!   `q·r` sub-scores is the same for every list, so it is built once per query and each list
//!   adds its own `q·c`.
//! - Scan: codes are laid out in blocks of 32 (see `fastscan.rs`); a candidate enters a
//!   bounded heap of `rerank` entries only when its approximate score can beat the heap's worst.
//! - Re-ranking: the heap's candidates are re-scored from SQ8 codes (per-dimension 8-bit
//!   quantization over the data's range) or from the float vectors, and the best `k` returned.

use crate::fastscan::{self, pack_block, unpack_block, BLOCK, CODEWORDS, MAX_SUBQUANTIZERS};
use crate::format::{self, Backing, Header, Reader, Slab};
use crate::hnsw::HnswIndex;
use crate::idmap::LazyIdMap;
use crate::ivf::{top_lists, visit_lists};
use crate::kernels::{dot, Rows, TopK};
use crate::kmeans::{assign_nearest, kmeans, MAX_POINTS_PER_CENTROID};
use crate::source::{SliceSource, VectorSource};
use crate::{
    check_add, check_query, HnswParams, Index, IndexError, IndexKind, IndexParams, IvfPqParams, NoProgress, Progress,
    Refine, Result, Scan, SearchOptions,
};
use needle_core::rng::Rng;
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// Lists from which the centroids are searched through a graph instead of a scan. At 64
/// dimensions a scan of 2,048 centroids costs about as much as the list scans of a typical
/// query; beyond it the scan would dominate.
pub const COARSE_GRAPH_MIN_LISTS: usize = 2048;
/// Most lists the default `nlist = 4·√n` picks: k-means over 64 sample points per list costs
/// `64·nlist²·dim` multiply-adds per iteration, about a minute per iteration on 2 cores at 16,384
/// lists and 64 dimensions, and it grows with the square.
pub const MAX_DEFAULT_LISTS: usize = 16_384;
/// Vectors per call of the SQ8 scan kernel.
const SQ8_CHUNK: usize = 64;
/// Rows per block in the passes of a streaming build.
const BUILD_BLOCK: usize = 1 << 16;
/// Candidates a graph assignment re-scores by L2, and the graph's search effort for them.
const ASSIGN_CANDIDATES: usize = 4;
const ASSIGN_EF: usize = 32;
/// Residuals the product quantizer is trained on.
const PQ_TRAIN_SAMPLE: usize = 65_536;
/// Lloyd iterations per sub-quantizer.
const PQ_TRAIN_ITERS: usize = 25;

/// Per-dimension 8-bit codes of a vector's residual from its list centroid, over the residuals'
/// range: `r_d ≈ lo_d + step_d · code_d`. Residuals span a fraction of the vectors' own range,
/// so the same 8 bits resolve finer differences.
struct Sq8 {
    lo: Vec<f32>,
    step: Vec<f32>,
    /// `len × dim` codes, in list order.
    codes: Slab<u8>,
}

impl Sq8 {
    /// Range of every dimension over `vectors` (a residual sample); later values outside it
    /// are clamped.
    fn train(vectors: &[f32], dim: usize) -> Sq8 {
        let mut lo = vec![f32::INFINITY; dim];
        let mut hi = vec![f32::NEG_INFINITY; dim];
        for row in vectors.chunks_exact(dim) {
            for d in 0..dim {
                lo[d] = lo[d].min(row[d]);
                hi[d] = hi[d].max(row[d]);
            }
        }
        let step = lo.iter().zip(&hi).map(|(&l, &h)| if h > l { (h - l) / 255.0 } else { 0.0 }).collect();
        Sq8 { lo, step, codes: Slab::default() }
    }

    fn encode(&self, x: &[f32], out: &mut [u8]) {
        for d in 0..x.len() {
            out[d] = if self.step[d] > 0.0 {
                ((x[d] - self.lo[d]) / self.step[d]).round().clamp(0.0, 255.0) as u8
            } else {
                0
            };
        }
    }

    /// The query for the integer scan: `q ⊙ step` quantised to 16 bits, its scale, and `q · lo`,
    /// so that `q · r̂ ≈ bias + scale · Σ_d q16_d · code_d`.
    fn quantise_query(&self, q: &[f32]) -> (Vec<i16>, f32, f32) {
        let qs: Vec<f32> = q.iter().zip(&self.step).map(|(a, b)| a * b).collect();
        let max = qs.iter().fold(0.0f32, |m, x| m.max(x.abs()));
        let scale = if max > 0.0 { max / 32767.0 } else { 1.0 };
        let q16 = qs.iter().map(|x| (x / scale).round().clamp(-32767.0, 32767.0) as i16).collect();
        (q16, scale, dot(q, &self.lo))
    }

    /// `q · r̂` for the row at `pos`, given `qs = q ⊙ step` and `bias = q · lo`.
    #[inline]
    fn score(&self, qs: &[f32], bias: f32, pos: usize) -> f32 {
        let dim = qs.len();
        let c = &self.codes[pos * dim..(pos + 1) * dim];
        let mut acc = [0.0f32; 8];
        let mut qc = qs.chunks_exact(8);
        let mut cc = c.chunks_exact(8);
        for (a, b) in (&mut qc).zip(&mut cc) {
            for i in 0..8 {
                acc[i] += a[i] * b[i] as f32;
            }
        }
        let tail: f32 = qc.remainder().iter().zip(cc.remainder()).map(|(a, &b)| a * b as f32).sum();
        bias + acc.iter().sum::<f32>() + tail
    }
}

/// The data candidates are re-scored from.
enum Refiner {
    None,
    Sq8(Sq8),
    /// `len × dim` floats, in list order.
    Flat(Slab<f32>),
}

/// Inverted-file index with 4-bit PQ codes and optional re-ranking.
pub struct IvfPqIndex {
    dim: usize,
    /// As resolved at build time: `nlist` and `m` are never 0.
    params: IvfPqParams,
    /// Dimensions per sub-quantizer.
    dsub: usize,
    /// Sub-quantizers per block: `m` rounded up to even.
    msub: usize,
    centroids: Rows,
    /// `‖c‖²/2` of every centroid, for L2 assignment by inner products.
    half_norms: Vec<f32>,
    /// HNSW over the centroids when there are many lists.
    coarse: Option<HnswIndex>,
    /// `m × 16 × dsub` codewords.
    codebooks: Vec<f32>,
    /// List `l` holds positions `offsets[l]..offsets[l + 1]` of `ids` (and of the re-ranking data).
    offsets: Vec<u32>,
    /// List `l` holds code blocks `blocks[l]..blocks[l + 1]`; derived from `offsets`.
    blocks: Vec<u32>,
    ids: Slab<u32>,
    /// `blocks[nlist] × msub × 16` bytes.
    codes: Slab<u8>,
    refine: Refiner,
    id_map: LazyIdMap,
}

impl std::fmt::Debug for IvfPqIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvfPqIndex")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("len", &self.ids.len())
            .finish()
    }
}

fn block_offsets(offsets: &[u32]) -> Vec<u32> {
    let mut blocks = Vec::with_capacity(offsets.len());
    blocks.push(0u32);
    for w in offsets.windows(2) {
        let last = *blocks.last().unwrap();
        blocks.push(last + (w[1] - w[0]).div_ceil(BLOCK as u32));
    }
    blocks
}

/// `m` when the parameters leave it 0: two dimensions per sub-quantizer (16 bytes for 64-d, as
/// Faiss's `PQ32x4fs`), or one when the dimension is odd.
fn resolve_m(m: usize, dim: usize) -> usize {
    if m != 0 {
        m
    } else if dim.is_multiple_of(2) {
        dim / 2
    } else {
        dim
    }
}

fn check_shape(dim: usize, m: usize) -> Result<()> {
    if m == 0 || m > MAX_SUBQUANTIZERS || !dim.is_multiple_of(m) {
        return Err(IndexError::Param(format!(
            "ivfpq m = {m} must divide the dimension {dim} and be at most {MAX_SUBQUANTIZERS}"
        )));
    }
    Ok(())
}

impl IvfPqIndex {
    /// Trains the coarse quantizer, the product quantizer and (for SQ8 re-ranking) the scalar
    /// ranges on `vectors`, then adds them. `nlist = 0` picks `4·√n` (at most
    /// [`MAX_DEFAULT_LISTS`]); `m = 0` picks `dim / 2`.
    pub fn build(p: &IvfPqParams, ids: &[u32], vectors: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        check_add(dim, 0, ids, vectors)?;
        Self::build_from(p, &SliceSource::new(vectors, dim)?, Some(ids), &NoProgress)
    }

    /// Builds from any [`VectorSource`] with memory bounded by the index itself: the quantizers
    /// train on a seeded sample of rows, then two passes read the rows in blocks, one to assign
    /// lists and one to encode into place. Ids are `ids[row]`, or the row numbers.
    pub fn build_from(
        p: &IvfPqParams,
        src: &dyn VectorSource,
        ids: Option<&[u32]>,
        progress: &dyn Progress,
    ) -> Result<Self> {
        let (n, dim) = (src.rows(), src.dim());
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        let sq8_scan = p.scan == Scan::Sq8;
        let m = if sq8_scan { 0 } else { resolve_m(p.m, dim) };
        if !sq8_scan {
            check_shape(dim, m)?;
        }
        let refine = if sq8_scan { Refine::Sq8 } else { p.refine };
        if n == 0 {
            return Err(IndexError::Param("an IVF-PQ index needs at least one vector to train on".into()));
        }
        if n as u64 > u32::MAX as u64 {
            return Err(IndexError::TooLarge);
        }
        if let Some(ids) = ids {
            if ids.len() != n {
                return Err(IndexError::CountMismatch { ids: ids.len(), rows: n });
            }
        }
        if p.nprobe == 0 {
            return Err(IndexError::Param("ivfpq nprobe must be at least 1".into()));
        }
        let nlist = if p.nlist == 0 {
            ((4.0 * (n as f64).sqrt()).round() as usize).clamp(1, MAX_DEFAULT_LISTS)
        } else {
            p.nlist
        }
        .min(n);

        let rows = sample_rows(n, (nlist * MAX_POINTS_PER_CENTROID).max(PQ_TRAIN_SAMPLE), p.seed);
        progress.stage("read training sample", rows.len() as u64);
        let mut sample = vec![0.0f32; rows.len() * dim];
        sample.par_chunks_mut(dim * 1024).zip(rows.par_chunks(1024)).try_for_each(|(out, rows)| {
            for (v, &r) in out.chunks_exact_mut(dim).zip(rows) {
                src.read(r, v)?;
                if !v.iter().all(|x| x.is_finite()) {
                    return Err(IndexError::NonFinite { what: "vectors", row: r });
                }
            }
            progress.advance(rows.len() as u64);
            Ok(())
        })?;
        progress.stage("train coarse k-means", 1);
        let centroids = Rows::from_flat(dim, &kmeans(&sample, dim, nlist, p.train_iters, p.seed));
        progress.advance(1);
        progress.stage("train quantizers", 1);
        let coarse = coarse_graph(&centroids, p.seed)?;
        let residuals = residual_sample(&sample, dim, centroids.as_slice(), p.seed);
        drop(sample);
        let codebooks = if sq8_scan { Vec::new() } else { train_codebooks(&residuals, dim, m, p.seed) };
        let mut sq8 = (refine == Refine::Sq8).then(|| Sq8::train(&residuals, dim));
        drop(residuals);
        progress.advance(1);
        let msub = m.next_multiple_of(2);
        let mut ix = IvfPqIndex {
            dim,
            params: IvfPqParams { nlist, m, refine, ..*p },
            dsub: dim.checked_div(m).unwrap_or(0),
            msub,
            half_norms: half_norms(&centroids),
            coarse,
            centroids,
            codebooks,
            offsets: vec![0; nlist + 1],
            blocks: vec![0; nlist + 1],
            ids: Slab::default(),
            codes: Slab::default(),
            refine: Refiner::None,
            id_map: LazyIdMap::default(),
        };

        // Pass 1: the list of every row.
        progress.stage("assign lists", n as u64);
        let mut assign = vec![0u32; n];
        let mut buf = vec![0.0f32; BUILD_BLOCK.min(n) * dim];
        for (b, out) in assign.chunks_mut(BUILD_BLOCK).enumerate() {
            let block = &mut buf[..out.len() * dim];
            read_block(src, b * BUILD_BLOCK, block)?;
            out.copy_from_slice(&ix.assign(block));
            progress.advance(out.len() as u64);
        }
        let mut offsets = vec![0u32; nlist + 1];
        assign.iter().for_each(|&a| offsets[a as usize + 1] += 1);
        for l in 0..nlist {
            offsets[l + 1] += offsets[l];
        }
        let blocks = block_offsets(&offsets);

        // Pass 2: encode every row straight into its place in its list.
        progress.stage("encode", n as u64);
        let stride = msub * 16;
        let mut codes = vec![0u8; blocks[nlist] as usize * stride];
        let mut out_ids = vec![0u32; n];
        let mut sq8_codes = vec![0u8; if sq8.is_some() { n * dim } else { 0 }];
        let mut flat = vec![0.0f32; if refine == Refine::Flat { n * dim } else { 0 }];
        let mut fill: Vec<usize> = offsets[..nlist].iter().map(|&o| o as usize).collect();
        let mut sq_block = Vec::new();
        for b in 0..n.div_ceil(BUILD_BLOCK) {
            let start = b * BUILD_BLOCK;
            let rows = (n - start).min(BUILD_BLOCK);
            let block = &mut buf[..rows * dim];
            read_block(src, start, block)?;
            let lists = &assign[start..start + rows];
            let pq = ix.encode(block, lists);
            if let Some(sq) = &sq8 {
                sq_block.resize(rows * dim, 0);
                sq_block.par_chunks_mut(dim).zip(block.par_chunks(dim)).zip(lists.par_iter()).for_each_init(
                    || vec![0.0f32; dim],
                    |r, ((out, x), &l)| {
                        let c = ix.centroids.row(l as usize);
                        r.iter_mut().zip(x.iter().zip(c)).for_each(|(r, (x, c))| *r = x - c);
                        sq.encode(r, out);
                    },
                );
            }
            for (i, &l) in lists.iter().enumerate() {
                let l = l as usize;
                let pos = fill[l];
                fill[l] += 1;
                out_ids[pos] = ids.map_or((start + i) as u32, |ids| ids[start + i]);
                let within = pos - offsets[l] as usize;
                let at = (blocks[l] as usize + within / BLOCK) * stride + within % 16;
                let shift = if within % BLOCK < 16 { 0 } else { 4 };
                for (j, &c) in pq[i * msub..(i + 1) * msub].iter().enumerate() {
                    codes[at + j * 16] |= c << shift;
                }
                if sq8.is_some() {
                    sq8_codes[pos * dim..(pos + 1) * dim].copy_from_slice(&sq_block[i * dim..(i + 1) * dim]);
                }
                if !flat.is_empty() {
                    flat[pos * dim..(pos + 1) * dim].copy_from_slice(&block[i * dim..(i + 1) * dim]);
                }
            }
            progress.advance(rows as u64);
        }
        ix.refine = match refine {
            Refine::None => Refiner::None,
            Refine::Sq8 => {
                let mut s = sq8.take().expect("trained above for SQ8 re-ranking");
                s.codes = sq8_codes.into();
                Refiner::Sq8(s)
            }
            Refine::Flat => Refiner::Flat(flat.into()),
        };
        ix.offsets = offsets;
        ix.blocks = blocks;
        ix.ids = out_ids.into();
        ix.codes = codes.into();
        Ok(ix)
    }

    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.params.nlist
    }

    /// Opens an IVF-PQ index file mapped (see [`crate::open`]); another kind is an error.
    pub fn open(path: &Path, verify: crate::Verify) -> Result<Self> {
        let (header, backing) = format::map(path, verify)?;
        if header.kind != IndexKind::IvfPq {
            return Err(IndexError::Corrupt {
                path: path.to_owned(),
                reason: format!("a {} index, not ivfpq", header.kind),
            });
        }
        Self::from_payload(&header, &backing, path)
    }

    /// Sets how many candidates a search re-scores (0: the default depth).
    pub fn set_rerank(&mut self, rerank: usize) {
        self.params.rerank = rerank;
    }

    /// Candidates re-scored per query for a top-`k` search: `rerank`, or `max(4k, 256)` when it is
    /// 0; just `k` without re-ranking data.
    pub fn candidates(&self, k: usize) -> usize {
        match self.refine {
            Refiner::None => k,
            // Measured on clustered 64-d and 16-d sets: recall@100 stops rising at 4k candidates;
            // small k needs relatively more (256 for k = 20 recovers what 4k loses).
            _ if self.params.rerank == 0 => (4 * k).max(256),
            _ => self.params.rerank.max(k),
        }
    }

    /// The lists to probe, best first, as `(list, q · centroid)`.
    fn probe_lists(&self, q: &[f32], nprobe: usize) -> Vec<(u32, f32)> {
        let nprobe = nprobe.clamp(1, self.params.nlist);
        let mut out = Vec::with_capacity(nprobe);
        match &self.coarse {
            Some(g) => {
                let opts = SearchOptions { effort: Some(coarse_effort(nprobe)), keep: None };
                // The graph holds every centroid, and a query is finite: no error is possible.
                let _ = g.search_with(q, nprobe, &opts, &mut out);
            }
            None => out = top_lists(q, &self.centroids, nprobe),
        }
        out
    }

    /// The byte lookup table of `q`'s sub-scores, its scale and the summed per-table bias:
    /// `q · r ≈ bias + scale · Σ_j lut[j][code_j]`.
    fn lookup_table(&self, q: &[f32], lut: &mut Vec<u8>) -> (f32, f32) {
        let (m, dsub) = (self.params.m, self.dsub);
        let mut f = vec![0.0f32; self.msub * CODEWORDS];
        for j in 0..m {
            let qj = &q[j * dsub..(j + 1) * dsub];
            for c in 0..CODEWORDS {
                let w = &self.codebooks[(j * CODEWORDS + c) * dsub..(j * CODEWORDS + c + 1) * dsub];
                f[j * CODEWORDS + c] = qj.iter().zip(w).map(|(a, b)| a * b).sum();
            }
        }
        let mut bias = 0.0f32;
        let mut range = 0.0f32;
        let mins: Vec<f32> = f
            .chunks_exact(CODEWORDS)
            .map(|t| {
                let lo = t.iter().copied().fold(f32::INFINITY, f32::min);
                let hi = t.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                range = range.max(hi - lo);
                bias += lo;
                lo
            })
            .collect();
        let scale = if range > 0.0 { range / 255.0 } else { 1.0 };
        lut.clear();
        lut.extend(
            f.chunks_exact(CODEWORDS)
                .zip(&mins)
                .flat_map(|(t, &lo)| t.iter().map(move |&v| ((v - lo) / scale).round().clamp(0.0, 255.0) as u8)),
        );
        (scale, bias)
    }

    fn search_impl<F: Fn(u32) -> bool>(&self, q: &[f32], k: usize, nprobe: usize, keep: &F, out: &mut Vec<(u32, f32)>) {
        out.clear();
        if k == 0 || self.ids.is_empty() {
            return;
        }
        if self.params.scan == Scan::Sq8 {
            return self.search_sq8(q, k, nprobe, keep, out);
        }
        let mut lut = Vec::new();
        let (scale, bias) = self.lookup_table(q, &mut lut);
        let mut cand = TopK::new(self.candidates(k));
        let scan = fastscan::scan_fn();
        let mask = fastscan::mask_fn();
        let mut acc = [0u16; BLOCK];
        let stride = self.msub * 16;
        // The largest table sum any code can reach: a list whose bound cannot beat the
        // candidates' worst is skipped whole.
        let acc_max: f32 = lut.chunks_exact(16).map(|t| *t.iter().max().unwrap_or(&0) as f32).sum();
        let mut scan_list = |l: usize, list_score: f32, cand: &mut TopK| {
            let base = list_score + bias;
            if base + scale * acc_max < cand.threshold() {
                return;
            }
            let (start, end) = (self.offsets[l] as usize, self.offsets[l + 1] as usize);
            for (i, b) in (self.blocks[l] as usize..self.blocks[l + 1] as usize).enumerate() {
                scan(&self.codes[b * stride..(b + 1) * stride], &lut, self.msub, &mut acc);
                let first = start + i * BLOCK;
                let nv = (end - first).min(BLOCK);
                // Candidates below the heap's worst cannot enter: compare in table units.
                let limit = ((cand.threshold() - base) / scale).ceil();
                let lim = if limit.is_nan() || limit <= 0.0 { 0 } else { limit.min(65535.0) as u16 };
                let mut bits = mask(&acc, lim) & if nv == BLOCK { u32::MAX } else { (1u32 << nv) - 1 };
                while bits != 0 {
                    let v = bits.trailing_zeros() as usize;
                    bits &= bits - 1;
                    let pos = first + v;
                    if keep(self.ids[pos]) {
                        cand.push(base + scale * acc[v] as f32, pos as u32);
                    }
                }
            }
        };
        self.visit_lists(q, nprobe, |l, s| {
            scan_list(l, s, &mut cand);
            cand.len() >= k
        });
        let mut pairs = Vec::new();
        cand.drain_sorted(&mut pairs);
        let mut top = TopK::new(k);
        if let Refiner::None = self.refine {
            pairs.iter().for_each(|&(pos, s)| top.push(s, self.ids[pos as usize]));
        } else {
            let scorer = Scorer::new(self, q);
            pairs.iter().for_each(|&(pos, _)| top.push(scorer.score(pos as usize), self.ids[pos as usize]));
        }
        top.drain_sorted(out);
    }

    /// IVF-SQ8: every vector of the probed lists scored from its 8-bit codes against the query
    /// quantised to 16 bits, straight into the top `k`.
    fn search_sq8<F: Fn(u32) -> bool>(&self, q: &[f32], k: usize, nprobe: usize, keep: &F, out: &mut Vec<(u32, f32)>) {
        let Refiner::Sq8(sq) = &self.refine else { unreachable!("an SQ8-scan index always holds SQ8 codes") };
        let dim = self.dim;
        let (q16, qscale, qb) = sq.quantise_query(q);
        let dots_fn = fastscan::sq8_dots_fn();
        let mut dots = [0i32; SQ8_CHUNK];
        let mut top = TopK::new(k);
        self.visit_lists(q, nprobe, |l, list_score| {
            let base = list_score + qb;
            let (start, end) = (self.offsets[l] as usize, self.offsets[l + 1] as usize);
            for a in (start..end).step_by(SQ8_CHUNK) {
                let n = (end - a).min(SQ8_CHUNK);
                dots_fn(&sq.codes[a * dim..(a + n) * dim], &q16, &mut dots[..n]);
                let mut thr = top.threshold();
                for (i, &d) in dots[..n].iter().enumerate() {
                    let s = base + qscale * d as f32;
                    if s >= thr && keep(self.ids[a + i]) {
                        top.push(s, self.ids[a + i]);
                        thr = top.threshold();
                    }
                }
            }
            top.len() >= k
        });
        top.drain_sorted(out);
    }

    /// Calls `visit(list, q · centroid)` for the `nprobe` best lists, then, while it returns
    /// false, for the rest (see [`visit_lists`]).
    fn visit_lists(&self, q: &[f32], nprobe: usize, visit: impl FnMut(usize, f32) -> bool) {
        visit_lists(q, &self.centroids, &self.probe_lists(q, nprobe), visit);
    }

    /// List holding position `pos`.
    #[inline]
    fn list_of(&self, pos: usize) -> usize {
        self.offsets.partition_point(|&o| o as usize <= pos) - 1
    }

    /// Sub-quantizer `j`'s code of the vector at position `pos` of list `l`.
    #[inline]
    fn code_at(&self, l: usize, pos: usize, j: usize) -> u8 {
        let within = pos - self.offsets[l] as usize;
        let byte = self.codes[(self.blocks[l] as usize + within / BLOCK) * self.msub * 16 + j * 16 + within % 16];
        if within % BLOCK < 16 {
            byte & 15
        } else {
            byte >> 4
        }
    }

    /// PQ codes (`n × msub`, unpacked) of `vectors`' residuals from their assigned centroids.
    fn encode(&self, vectors: &[f32], assign: &[u32]) -> Vec<u8> {
        let (dim, m, msub, dsub) = (self.dim, self.params.m, self.msub, self.dsub);
        if msub == 0 {
            return Vec::new();
        }
        let mut codes = vec![0u8; assign.len() * msub];
        codes.par_chunks_mut(msub).zip(vectors.par_chunks(dim)).zip(assign.par_iter()).for_each_init(
            || vec![0.0f32; dim],
            |r, ((out, x), &a)| {
                let c = self.centroids.row(a as usize);
                r.iter_mut().zip(x.iter().zip(c)).for_each(|(r, (x, c))| *r = x - c);
                for j in 0..m {
                    out[j] = nearest_codeword(&r[j * dsub..(j + 1) * dsub], &self.codebooks, j, dsub);
                }
            },
        );
        codes
    }

    /// List of each vector: its L2-nearest centroid, what k-means minimised. With a coarse
    /// graph, the nearest among the centroids the graph ranks highest by inner product (the
    /// L2-nearest maximises `x·c − ‖c‖²/2`, and centroid norms vary little), which costs a graph
    /// search instead of a scan of every centroid.
    fn assign(&self, vectors: &[f32]) -> Vec<u32> {
        let Some(g) = &self.coarse else {
            return assign_nearest(vectors, self.dim, self.centroids.as_slice());
        };
        vectors
            .par_chunks(self.dim)
            .map_init(Vec::new, |found, x| {
                let opts = SearchOptions { effort: Some(ASSIGN_EF), keep: None };
                // The graph holds every centroid and x is finite: no error is possible.
                let _ = g.search_with(x, ASSIGN_CANDIDATES, &opts, found);
                let best = found.iter().map(|&(l, s)| (s - self.half_norms[l as usize], l));
                best.fold((f32::NEG_INFINITY, 0), |a, b| if b.0 > a.0 { b } else { a }).1
            })
            .collect()
    }

    pub(crate) fn from_payload(h: &Header, backing: &Arc<Backing>, path: &Path) -> Result<Self> {
        let n = h.count as usize;
        let dim = h.dim as usize;
        let [nlist, nprobe, rerank, seed] = h.params;
        let mut r = Reader::new(backing, path);
        if nlist == 0 || nlist > n.max(1) as u64 {
            return Err(r.corrupt(format!("IVF-PQ with {nlist} lists over {n} vectors")));
        }
        if nprobe == 0 {
            return Err(r.corrupt("IVF-PQ nprobe is 0"));
        }
        let nlist = nlist as usize;
        let [m, refine_code, train_iters, graph_m, graph_efc, graph_ef, scan_code] = r.u64s("settings", Some(7))?[..]
        else {
            unreachable!("the section was checked to hold 7 values")
        };
        let m = m as usize;
        let scan = match scan_code {
            0 => Scan::Pq4,
            1 if m == 0 && refine_code == 1 => Scan::Sq8,
            c => return Err(r.corrupt(format!("unknown scan code {c} (with m = {m}, re-ranking code {refine_code})"))),
        };
        if scan == Scan::Pq4 {
            check_shape(dim, m).map_err(|e| r.corrupt(e.to_string()))?;
        }
        let refine_kind = match refine_code {
            0 => Refine::None,
            1 => Refine::Sq8,
            2 => Refine::Flat,
            c => return Err(r.corrupt(format!("unknown re-ranking code {c}"))),
        };
        let dsub = dim.checked_div(m).unwrap_or(0);
        let msub = m.next_multiple_of(2);
        let centroids = r.rows("centroids", dim, nlist)?;
        let coarse = if graph_m == 0 {
            None
        } else {
            let g = HnswIndex::read_sections(&mut r, dim, nlist, [graph_m, graph_efc, graph_ef], seed)?;
            if g.ids().iter().enumerate().any(|(i, &id)| id as usize != i) {
                return Err(r.corrupt("the coarse graph's nodes are not the lists in order"));
            }
            Some(g)
        };
        let codebooks = if m == 0 { Vec::new() } else { r.rows("codebooks", dsub, m * CODEWORDS)?.as_slice().to_vec() };
        let offsets = r.u32s("list offsets", Some(nlist + 1))?;
        if offsets[0] != 0 || offsets[nlist] as usize != n || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(r.corrupt("list offsets are not an increasing cover of the vectors"));
        }
        let blocks = block_offsets(&offsets);
        let ids = r.slab("ids", Some(n))?;
        let codes = r.slab("codes", Some(blocks[nlist] as usize * msub * 16))?;
        let refine = match refine_kind {
            Refine::None => Refiner::None,
            Refine::Sq8 => {
                let lo = r.rows("sq8 low", dim, 1)?.as_slice().to_vec();
                let step = r.rows("sq8 step", dim, 1)?.as_slice().to_vec();
                if !lo.iter().chain(&step).all(|x| x.is_finite()) || step.iter().any(|&s| s < 0.0) {
                    return Err(r.corrupt("sq8 ranges are not finite and non-negative"));
                }
                let codes = r.slab("sq8 codes", Some(n * dim))?;
                Refiner::Sq8(Sq8 { lo, step, codes })
            }
            Refine::Flat => Refiner::Flat(r.slab("vectors", Some(n * dim))?),
        };
        r.finish()?;
        let params = IvfPqParams {
            nlist,
            nprobe: nprobe.min(nlist as u64) as usize,
            m,
            rerank: rerank as usize,
            refine: refine_kind,
            scan,
            train_iters: train_iters as usize,
            seed,
        };
        Ok(IvfPqIndex {
            dim,
            params,
            dsub,
            msub,
            half_norms: half_norms(&centroids),
            coarse,
            centroids,
            codebooks,
            offsets,
            blocks,
            ids,
            codes,
            refine,
            id_map: LazyIdMap::default(),
        })
    }
}

/// Scores stored vectors for one query the way the final ranking does: from the re-ranking data,
/// or from the PQ codes decoded exactly (no byte rounding) when there is none.
struct Scorer<'a> {
    ix: &'a IvfPqIndex,
    q: &'a [f32],
    /// SQ8: `q ⊙ step` and `q · lo`. Without re-ranking data: the float table of sub-scores.
    qs: Vec<f32>,
    qb: f32,
}

impl<'a> Scorer<'a> {
    fn new(ix: &'a IvfPqIndex, q: &'a [f32]) -> Self {
        match &ix.refine {
            Refiner::Sq8(sq) => {
                Scorer { ix, q, qs: q.iter().zip(&sq.step).map(|(a, b)| a * b).collect(), qb: dot(q, &sq.lo) }
            }
            Refiner::Flat(_) => Scorer { ix, q, qs: Vec::new(), qb: 0.0 },
            Refiner::None => {
                let dsub = ix.dsub;
                let table = (0..ix.params.m * CODEWORDS)
                    .map(|jc| {
                        let j = jc / CODEWORDS;
                        dot(&q[j * dsub..(j + 1) * dsub], &ix.codebooks[jc * dsub..(jc + 1) * dsub])
                    })
                    .collect();
                Scorer { ix, q, qs: table, qb: 0.0 }
            }
        }
    }

    fn score(&self, pos: usize) -> f32 {
        let ix = self.ix;
        match &ix.refine {
            Refiner::Flat(rows) => dot(self.q, &rows[pos * ix.dim..(pos + 1) * ix.dim]),
            Refiner::Sq8(sq) => {
                let l = ix.list_of(pos);
                dot(self.q, ix.centroids.row(l)) + sq.score(&self.qs, self.qb, pos)
            }
            Refiner::None => {
                let l = ix.list_of(pos);
                let codes = (0..ix.params.m).map(|j| self.qs[j * CODEWORDS + ix.code_at(l, pos, j) as usize]);
                dot(self.q, ix.centroids.row(l)) + codes.sum::<f32>()
            }
        }
    }
}

/// The HNSW over the centroids (node `i` is list `i`), when there are enough of them to need
/// one. It is saved with the index: a parallel build is not repeatable, and the lists a query
/// probes must not change between a build and a reload.
fn coarse_graph(centroids: &Rows, seed: u64) -> Result<Option<HnswIndex>> {
    let nlist = centroids.rows();
    if nlist < COARSE_GRAPH_MIN_LISTS {
        return Ok(None);
    }
    let mut g = HnswIndex::new(centroids.dim(), &HnswParams { m: 32, ef_construction: 200, ef_search: 128, seed })?;
    let ids: Vec<u32> = (0..nlist as u32).collect();
    g.add(&ids, centroids.as_slice())?;
    Ok(Some(g))
}

/// The coarse graph's search effort for `nprobe` lists: measured on 10^7 vectors, a walk wider
/// than `nprobe + 16` finds the same lists at a higher cost.
fn coarse_effort(nprobe: usize) -> usize {
    nprobe + 16
}

fn half_norms(centroids: &Rows) -> Vec<f32> {
    (0..centroids.rows()).map(|l| 0.5 * centroids.row(l).iter().map(|x| x * x).sum::<f32>()).collect()
}

/// `want` distinct row numbers below `n` (all of them when `want ≥ n`), seeded, ascending.
fn sample_rows(n: usize, want: usize, seed: u64) -> Vec<usize> {
    if want >= n {
        return (0..n).collect();
    }
    let mut rng = Rng::new(seed ^ 0x7361_6d70);
    let mut rows: Vec<usize> = (0..want).map(|_| rng.below(n)).collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// Reads rows from `start` into `block`, refusing non-finite values.
fn read_block(src: &dyn VectorSource, start: usize, block: &mut [f32]) -> Result<()> {
    let dim = src.dim();
    block.par_chunks_mut(dim * 4096).enumerate().try_for_each(|(i, part)| src.read(start + i * 4096, part))?;
    if let Some(r) = block.chunks_exact(dim).position(|v| !v.iter().all(|x| x.is_finite())) {
        return Err(IndexError::NonFinite { what: "vectors", row: start + r });
    }
    Ok(())
}

/// Index of the codeword of sub-quantizer `j` nearest (L2) to `x`.
#[inline]
fn nearest_codeword(x: &[f32], codebooks: &[f32], j: usize, dsub: usize) -> u8 {
    let mut best = (f32::INFINITY, 0u8);
    for c in 0..CODEWORDS {
        let w = &codebooks[(j * CODEWORDS + c) * dsub..(j * CODEWORDS + c + 1) * dsub];
        let d: f32 = x.iter().zip(w).map(|(a, b)| (a - b) * (a - b)).sum();
        if d < best.0 {
            best = (d, c as u8);
        }
    }
    best.1
}

/// `m` codebooks of 16 codewords, trained by k-means on a residual sample.
fn train_codebooks(sample: &[f32], dim: usize, m: usize, seed: u64) -> Vec<f32> {
    let dsub = dim / m;
    let mut books = vec![0.0f32; m * CODEWORDS * dsub];
    books.par_chunks_mut(CODEWORDS * dsub).enumerate().for_each(|(j, book)| {
        let sub: Vec<f32> =
            sample.chunks_exact(dim).flat_map(|x| x[j * dsub..(j + 1) * dsub].iter().copied()).collect();
        let c = kmeans(&sub, dsub, CODEWORDS, PQ_TRAIN_ITERS, seed.wrapping_add(j as u64));
        // Fewer distinct points than codewords leaves the rest at zero, which is still a valid
        // (if unused) codeword.
        book[..c.len()].copy_from_slice(&c);
    });
    books
}

/// Residuals from their nearest centroid of a seeded sample of `vectors`, what the quantizers
/// are trained on.
fn residual_sample(vectors: &[f32], dim: usize, centroids: &[f32], seed: u64) -> Vec<f32> {
    let n = vectors.len() / dim;
    let mut rng = Rng::new(seed ^ 0x5051_7471);
    let rows: Vec<usize> =
        if n <= PQ_TRAIN_SAMPLE { (0..n).collect() } else { (0..PQ_TRAIN_SAMPLE).map(|_| rng.below(n)).collect() };
    let mut sample = Vec::with_capacity(rows.len() * dim);
    rows.iter().for_each(|&i| sample.extend_from_slice(&vectors[i * dim..(i + 1) * dim]));
    let assign = assign_nearest(&sample, dim, centroids);
    for (x, &a) in sample.chunks_exact_mut(dim).zip(&assign) {
        let c = &centroids[a as usize * dim..(a as usize + 1) * dim];
        x.iter_mut().zip(c).for_each(|(x, c)| *x -= c);
    }
    sample
}

impl Index for IvfPqIndex {
    fn kind(&self) -> IndexKind {
        IndexKind::IvfPq
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn params(&self) -> IndexParams {
        IndexParams::IvfPq(self.params)
    }

    fn memory_bytes(&self) -> usize {
        let refine = match &self.refine {
            Refiner::None => 0,
            Refiner::Sq8(s) => s.codes.len() + 8 * self.dim,
            Refiner::Flat(rows) => rows.len() * 4,
        };
        self.codes.len()
            + self.ids.len() * 4
            + self.centroids.bytes()
            + self.codebooks.len() * 4
            + (self.offsets.len() + self.blocks.len()) * 4
            + refine
            + self.coarse.as_ref().map_or(0, |g| g.memory_bytes())
    }

    /// Assigns and encodes the new vectors with the trained quantizers (which are not
    /// retrained) and rewrites the packed lists once, so adding in large batches is cheapest.
    fn add(&mut self, ids: &[u32], vectors: &[f32]) -> Result<()> {
        check_add(self.dim, self.len(), ids, vectors)?;
        if ids.is_empty() {
            return Ok(());
        }
        let (dim, msub, nlist) = (self.dim, self.msub, self.params.nlist);
        let assign = self.assign(vectors);
        let new_codes = self.encode(vectors, &assign);
        // New vectors grouped by list, in input order within a list.
        let mut starts = vec![0usize; nlist + 1];
        assign.iter().for_each(|&a| starts[a as usize + 1] += 1);
        for l in 0..nlist {
            starts[l + 1] += starts[l];
        }
        let mut order = vec![0usize; assign.len()];
        let mut fill = starts.clone();
        for (i, &a) in assign.iter().enumerate() {
            order[fill[a as usize]] = i;
            fill[a as usize] += 1;
        }
        let mut offsets = vec![0u32; nlist + 1];
        for l in 0..nlist {
            let size = (self.offsets[l + 1] - self.offsets[l]) as usize + starts[l + 1] - starts[l];
            offsets[l + 1] = offsets[l] + size as u32;
        }
        let blocks = block_offsets(&offsets);
        let stride = msub * 16;
        let total = offsets[nlist] as usize;
        let mut codes = vec![0u8; blocks[nlist] as usize * stride];
        let mut new_ids = Vec::with_capacity(total);
        let mut sq8_codes = Vec::new();
        let mut flat = Vec::new();
        match &self.refine {
            Refiner::Sq8(_) => sq8_codes.reserve(total * dim),
            Refiner::Flat(_) => flat.reserve(total * dim),
            Refiner::None => {}
        }
        let mut members = Vec::new();
        let mut sq = vec![0u8; dim];
        let mut residual = vec![0.0f32; dim];
        for l in 0..nlist {
            let (a, b) = (self.offsets[l] as usize, self.offsets[l + 1] as usize);
            let fresh = &order[starts[l]..starts[l + 1]];
            members.clear();
            members.resize((b - a + fresh.len()) * msub, 0);
            for (i, blk) in (self.blocks[l] as usize..self.blocks[l + 1] as usize).enumerate() {
                let nv = (b - a - i * BLOCK).min(BLOCK);
                let at = i * BLOCK * msub;
                unpack_block(&self.codes[blk * stride..(blk + 1) * stride], nv, msub, &mut members[at..at + nv * msub]);
            }
            for (i, &f) in fresh.iter().enumerate() {
                let at = (b - a + i) * msub;
                members[at..at + msub].copy_from_slice(&new_codes[f * msub..(f + 1) * msub]);
            }
            let size = b - a + fresh.len();
            for (i, blk) in (blocks[l] as usize..blocks[l + 1] as usize).enumerate() {
                let nv = (size - i * BLOCK).min(BLOCK);
                let at = i * BLOCK * msub;
                pack_block(&members[at..at + nv * msub], nv, msub, &mut codes[blk * stride..(blk + 1) * stride]);
            }
            new_ids.extend_from_slice(&self.ids[a..b]);
            new_ids.extend(fresh.iter().map(|&f| ids[f]));
            match &self.refine {
                Refiner::Sq8(s) => {
                    sq8_codes.extend_from_slice(&s.codes[a * dim..b * dim]);
                    let c = self.centroids.row(l);
                    for &f in fresh {
                        let x = &vectors[f * dim..(f + 1) * dim];
                        x.iter().zip(c).zip(&mut residual).for_each(|((x, c), r)| *r = x - c);
                        s.encode(&residual, &mut sq);
                        sq8_codes.extend_from_slice(&sq);
                    }
                }
                Refiner::Flat(rows) => {
                    flat.extend_from_slice(&rows[a * dim..b * dim]);
                    fresh.iter().for_each(|&f| flat.extend_from_slice(&vectors[f * dim..(f + 1) * dim]));
                }
                Refiner::None => {}
            }
        }
        self.offsets = offsets;
        self.blocks = blocks;
        self.ids = new_ids.into();
        self.id_map = LazyIdMap::default();
        self.codes = codes.into();
        match &mut self.refine {
            Refiner::Sq8(s) => s.codes = sq8_codes.into(),
            Refiner::Flat(rows) => *rows = flat.into(),
            Refiner::None => {}
        }
        Ok(())
    }

    fn set_search_effort(&mut self, effort: usize) {
        self.params.nprobe = effort.clamp(1, self.params.nlist.max(1));
    }

    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut Vec<(u32, f32)>) -> Result<()> {
        check_query(self.dim, query)?;
        let map = self.id_map.get(&self.ids);
        let scorer = Scorer::new(self, query);
        out.extend(ids.iter().filter_map(|&id| map.row(id).map(|pos| (id, scorer.score(pos)))));
        Ok(())
    }

    fn scan_estimate(&self, _k: usize) -> usize {
        self.params.nprobe * self.len() / self.params.nlist.max(1)
    }

    fn search_with(&self, query: &[f32], k: usize, opts: &SearchOptions, out: &mut Vec<(u32, f32)>) -> Result<()> {
        check_query(self.dim, query)?;
        let nprobe = opts.effort.unwrap_or(self.params.nprobe);
        match opts.keep {
            None => self.search_impl(query, k, nprobe, &|_| true, out),
            Some(keep) => self.search_impl(query, k, nprobe, &keep, out),
        }
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<()> {
        let p = &self.params;
        let header = Header {
            kind: IndexKind::IvfPq,
            dim: self.dim as u32,
            count: self.len() as u64,
            params: [p.nlist as u64, p.nprobe as u64, p.rerank as u64, p.seed],
        };
        let refine_code = match p.refine {
            Refine::None => 0,
            Refine::Sq8 => 1,
            Refine::Flat => 2,
        };
        let graph = self.coarse.as_ref().map(|g| g.params());
        let graph = match graph {
            Some(IndexParams::Hnsw(h)) => [h.m as u64, h.ef_construction as u64, h.ef_search as u64],
            _ => [0; 3],
        };
        format::save(path, &header, |w| {
            let scan = match p.scan {
                Scan::Pq4 => 0,
                Scan::Sq8 => 1,
            };
            w.u64s(&[p.m as u64, refine_code, p.train_iters as u64, graph[0], graph[1], graph[2], scan])?;
            w.f32s(self.centroids.as_slice())?;
            if let Some(g) = &self.coarse {
                g.write_sections(w)?;
            }
            if p.m > 0 {
                w.f32s(&self.codebooks)?;
            }
            w.u32s(&self.offsets)?;
            w.u32s(&self.ids)?;
            w.u8s(&self.codes)?;
            match &self.refine {
                Refiner::None => Ok(()),
                Refiner::Sq8(s) => {
                    w.f32s(&s.lo)?;
                    w.f32s(&s.step)?;
                    w.u8s(&s.codes)
                }
                Refiner::Flat(rows) => w.f32s(rows),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic_clustered;

    #[test]
    fn table_scores_stay_within_the_byte_rounding_of_the_decoded_vectors() {
        let (n, dim) = (700, 16);
        let mut data = synthetic_clustered(n + 5, dim, 6, 1.0, 9);
        let queries = data.split_off(n * dim);
        let ids: Vec<u32> = (0..n as u32).collect();
        let p = IvfPqParams { nlist: 6, m: 4, refine: Refine::None, ..IvfPqParams::default() };
        let ix = IvfPqIndex::build(&p, &ids, &data, dim).unwrap();
        // Decode every stored vector: its list centroid plus its codewords.
        let mut decoded = vec![0.0f32; n * dim];
        let stride = ix.msub * 16;
        for l in 0..ix.nlist() {
            let (a, b) = (ix.offsets[l] as usize, ix.offsets[l + 1] as usize);
            let mut codes = vec![0u8; (b - a) * ix.msub];
            for (i, blk) in (ix.blocks[l] as usize..ix.blocks[l + 1] as usize).enumerate() {
                let nv = (b - a - i * BLOCK).min(BLOCK);
                let at = i * BLOCK * ix.msub;
                unpack_block(
                    &ix.codes[blk * stride..(blk + 1) * stride],
                    nv,
                    ix.msub,
                    &mut codes[at..at + nv * ix.msub],
                );
            }
            for (i, pos) in (a..b).enumerate() {
                let x = &mut decoded[ix.ids[pos] as usize * dim..(ix.ids[pos] as usize + 1) * dim];
                for (d, xd) in x.iter_mut().enumerate() {
                    let (j, e) = (d / ix.dsub, d % ix.dsub);
                    let c = codes[i * ix.msub + j] as usize;
                    *xd = ix.centroids.row(l)[d] + ix.codebooks[(j * CODEWORDS + c) * ix.dsub + e];
                }
            }
        }
        let mut out = Vec::new();
        let mut lut = Vec::new();
        for q in queries.chunks_exact(dim) {
            let (scale, _) = ix.lookup_table(q, &mut lut);
            ix.search_with(q, n, &SearchOptions { effort: Some(ix.nlist()), keep: None }, &mut out).unwrap();
            assert_eq!(out.len(), n);
            let bound = ix.params.m as f32 * scale / 2.0 + 1e-4;
            for &(id, s) in &out {
                let want = dot(q, &decoded[id as usize * dim..(id as usize + 1) * dim]);
                assert!((s - want).abs() <= bound, "id {id}: table score {s}, decoded {want}, bound {bound}");
            }
            // Scoring chosen ids decodes exactly, without the byte rounding.
            let mut scored = Vec::new();
            ix.score_ids(q, &ids, &mut scored).unwrap();
            for &(id, s) in &scored {
                let want = dot(q, &decoded[id as usize * dim..(id as usize + 1) * dim]);
                assert!((s - want).abs() <= 1e-4, "id {id}: scored {s}, decoded {want}");
            }
        }
    }
}
