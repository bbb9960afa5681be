//! Exact search: every query scores every vector. The reference for recall, and the kernel IVF
//! reuses for its lists.
//!
//! One query at a time streams the vectors through the canonical dot kernel, which is
//! memory-bound, so its scores and order are those of evaluation's exact top-K. A batch instead
//! multiplies blocks of queries by tiles of vectors (a cache-sized GEMM), so each vector tile is
//! read from memory once per block of queries rather than once per query; top-K selection then
//! scans each tile's scores against the heap threshold, which after the first tiles rejects
//! almost everything with one comparison.

use crate::format::{self, Backing, Header, Reader};
use crate::idmap::LazyIdMap;
use crate::kernels::{dot_rows_fn, gemm_nt, Rows, TopK};
use crate::{check_add, check_flat, check_query, Index, IndexError, IndexKind, IndexParams, Result, SearchOptions};
use rayon::prelude::*;
use std::path::Path;
use std::sync::Arc;

/// Rows scored per call of the single-query kernel (scores stay on the stack).
const SCAN_BLOCK: usize = 256;
/// Queries per GEMM block in batched search.
const QUERY_BLOCK: usize = 64;
/// Vectors per GEMM tile: 64 queries × 1024 scores and 1024 × 64-d vectors are 256 KB each,
/// so both fit in L2 while the heap scan runs.
const ITEM_TILE: usize = 1024;

/// Brute-force inner-product search over contiguous vectors.
#[derive(Clone)]
pub struct ExactIndex {
    dim: usize,
    ids: Vec<u32>,
    rows: Rows,
    id_map: LazyIdMap,
}

impl std::fmt::Debug for ExactIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExactIndex").field("dim", &self.dim).field("len", &self.ids.len()).finish()
    }
}

impl ExactIndex {
    /// An empty index of `dim`-dimensional vectors.
    pub fn new(dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        Ok(ExactIndex { dim, ids: Vec::new(), rows: Rows::new(dim), id_map: LazyIdMap::default() })
    }

    /// Offers every vector in `ids`/`rows` to `top`, skipping ids `keep` rejects.
    pub(crate) fn scan_into<F: Fn(u32) -> bool>(
        q: &[f32],
        ids: &[u32],
        rows: &[f32],
        dim: usize,
        keep: &F,
        top: &mut TopK,
    ) {
        let kernel = dot_rows_fn();
        let mut scores = [0.0f32; SCAN_BLOCK];
        for (id_block, row_block) in ids.chunks(SCAN_BLOCK).zip(rows.chunks(SCAN_BLOCK * dim)) {
            let s = &mut scores[..id_block.len()];
            kernel(q, row_block, dim, s);
            let mut thr = top.threshold();
            for (&score, &id) in s.iter().zip(id_block) {
                if score >= thr && keep(id) {
                    top.push(score, id);
                    thr = top.threshold();
                }
            }
        }
    }

    /// [`ExactIndex::scan_into`] scoring each row with the canonical `dot`, whose bits do not
    /// depend on the row's position in a block: the reference search of a single query then
    /// scores and orders exactly as evaluation (`needle_core::topk::top_k`) does.
    fn scan_canonical<F: Fn(u32) -> bool>(q: &[f32], ids: &[u32], rows: &[f32], dim: usize, keep: &F, top: &mut TopK) {
        let dot = crate::kernels::dot_fn();
        let mut thr = top.threshold();
        for (&id, row) in ids.iter().zip(rows.chunks_exact(dim)) {
            let score = dot(q, row);
            if score >= thr && keep(id) {
                top.push(score, id);
                thr = top.threshold();
            }
        }
    }

    /// Top-k of every query against vectors `lo..hi`, one heap per query.
    fn batch_unit(&self, queries: &[f32], k: usize, lo: usize, hi: usize) -> Vec<TopK> {
        let dim = self.dim;
        let nq = queries.len() / dim;
        let mut tops: Vec<TopK> = (0..nq).map(|_| TopK::new(k)).collect();
        let mut scores = vec![0.0f32; nq * ITEM_TILE];
        let all = self.rows.as_slice();
        let mut t0 = lo;
        while t0 < hi {
            let tn = ITEM_TILE.min(hi - t0);
            gemm_nt(nq, tn, dim, queries, &all[t0 * dim..(t0 + tn) * dim], &mut scores);
            let ids = &self.ids[t0..t0 + tn];
            for (top, row) in tops.iter_mut().zip(scores.chunks_exact(tn)) {
                let mut thr = top.threshold();
                for (&s, &id) in row.iter().zip(ids) {
                    if s >= thr {
                        top.push(s, id);
                        thr = top.threshold();
                    }
                }
            }
            t0 += tn;
        }
        tops
    }

    pub(crate) fn from_payload(h: &Header, backing: &Arc<Backing>, path: &Path) -> Result<Self> {
        let n = h.count as usize;
        let dim = h.dim as usize;
        let mut r = Reader::new(backing, path);
        let ids = r.u32s("ids", Some(n))?;
        let rows = r.rows("vectors", dim, n)?;
        r.finish()?;
        Ok(ExactIndex { dim, ids, rows, id_map: LazyIdMap::default() })
    }
}

/// Exact scores of `ids` from float rows, for [`Index::score_ids`].
pub(crate) fn score_rows(
    query: &[f32],
    ids: &[u32],
    map: &crate::idmap::IdMap,
    rows: &Rows,
    out: &mut Vec<(u32, f32)>,
) -> Result<()> {
    check_query(rows.dim(), query)?;
    let dot = crate::kernels::dot_fn();
    out.extend(ids.iter().filter_map(|&id| map.row(id).map(|r| (id, dot(query, rows.row(r))))));
    Ok(())
}

impl Index for ExactIndex {
    fn kind(&self) -> IndexKind {
        IndexKind::Exact
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn params(&self) -> IndexParams {
        IndexParams::Exact
    }

    fn memory_bytes(&self) -> usize {
        self.rows.bytes() + self.ids.len() * 4
    }

    fn add(&mut self, ids: &[u32], vectors: &[f32]) -> Result<()> {
        check_add(self.dim, self.len(), ids, vectors)?;
        self.ids.extend_from_slice(ids);
        self.id_map = LazyIdMap::default();
        self.rows.extend(vectors);
        Ok(())
    }

    fn set_search_effort(&mut self, _effort: usize) {}

    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut Vec<(u32, f32)>) -> Result<()> {
        score_rows(query, ids, self.id_map.get(&self.ids), &self.rows, out)
    }

    fn search_with(&self, query: &[f32], k: usize, opts: &SearchOptions, out: &mut Vec<(u32, f32)>) -> Result<()> {
        check_query(self.dim, query)?;
        let mut top = TopK::new(k);
        let rows = self.rows.as_slice();
        match opts.keep {
            None => Self::scan_canonical(query, &self.ids, rows, self.dim, &|_| true, &mut top),
            Some(keep) => Self::scan_canonical(query, &self.ids, rows, self.dim, &keep, &mut top),
        }
        top.drain_sorted(out);
        Ok(())
    }

    fn search_batch(&self, queries: &[f32], k: usize) -> Result<Vec<Vec<(u32, f32)>>> {
        let nq = check_flat("queries", self.dim, queries)?;
        for (row, q) in queries.chunks_exact(self.dim).enumerate() {
            if !q.iter().all(|x| x.is_finite()) {
                return Err(IndexError::NonFinite { what: "query", row });
            }
        }
        let n = self.len();
        if nq == 0 {
            return Ok(Vec::new());
        }
        // Enough work units to occupy every thread: query blocks first, then vector shards
        // when the batch is small (a handful of queries still uses all cores).
        let qblocks = nq.div_ceil(QUERY_BLOCK);
        let threads = rayon::current_num_threads();
        let shards = if qblocks >= threads { 1 } else { threads.div_ceil(qblocks).min(n.div_ceil(ITEM_TILE)).max(1) };
        let units: Vec<(usize, usize)> = (0..qblocks).flat_map(|b| (0..shards).map(move |s| (b, s))).collect();
        let parts: Vec<Vec<TopK>> = units
            .par_iter()
            .map(|&(b, s)| {
                let q = &queries[b * QUERY_BLOCK * self.dim..((b + 1) * QUERY_BLOCK).min(nq) * self.dim];
                self.batch_unit(q, k, s * n / shards, (s + 1) * n / shards)
            })
            .collect();
        let mut out = Vec::with_capacity(nq);
        for b in 0..qblocks {
            let block = &parts[b * shards..(b + 1) * shards];
            for qi in 0..block[0].len() {
                let mut merged = TopK::new(k);
                let mut tmp = Vec::new();
                for part in block {
                    let mut t = part[qi].clone();
                    t.drain_sorted(&mut tmp);
                    for &(id, s) in &tmp {
                        merged.push(s, id);
                    }
                }
                let mut res = Vec::with_capacity(k.min(n));
                merged.drain_sorted(&mut res);
                out.push(res);
            }
        }
        Ok(out)
    }

    fn save(&self, path: &Path) -> Result<()> {
        let header = Header { kind: IndexKind::Exact, dim: self.dim as u32, count: self.len() as u64, params: [0; 4] };
        format::save(path, &header, |w| {
            w.u32s(&self.ids)?;
            w.f32s(self.rows.as_slice())
        })
    }
}
