//! IVF-Flat: vectors grouped by their nearest k-means centroid, each group stored contiguously.
//!
//! A query scores all centroids, then scans only the `nprobe` best lists with the exact
//! kernel. Every list is one contiguous block of rows, so a probe is a sequential read the
//! prefetcher handles well, unlike the random row reads of a graph walk. Recall depends on how
//! well the data clusters; `nprobe` trades it against speed at query time.
//!
//! Items are assigned to lists by L2 distance to the centroids (what k-means minimises), while
//! lists are probed by inner product with the query, the quantity being ranked.

use crate::exact::ExactIndex;
use crate::format::{self, Backing, Header, Reader};
use crate::idmap::LazyIdMap;
use crate::kernels::{dot_rows_fn, Rows, TopK};
use crate::kmeans::{assign_nearest, kmeans};
use crate::{check_add, check_query, Index, IndexError, IndexKind, IndexParams, IvfParams, Result, SearchOptions};
use std::path::Path;
use std::sync::Arc;

/// Inverted-file index with exact (flat) vectors in each list.
#[derive(Clone)]
pub struct IvfIndex {
    dim: usize,
    params: IvfParams,
    centroids: Rows,
    /// List `l` holds rows `offsets[l]..offsets[l + 1]` of `ids` / `rows`.
    offsets: Vec<u32>,
    ids: Vec<u32>,
    rows: Rows,
    id_map: LazyIdMap,
}

impl std::fmt::Debug for IvfIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IvfIndex")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("len", &self.ids.len())
            .finish()
    }
}

impl IvfIndex {
    /// Trains the coarse quantizer on `vectors` and adds them. `nlist = 0` picks `4·√n`;
    /// `nlist` is clamped to the number of vectors.
    pub fn build(p: &IvfParams, ids: &[u32], vectors: &[f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        check_add(dim, 0, ids, vectors)?;
        let n = ids.len();
        if n == 0 {
            return Err(IndexError::Param("an IVF index needs at least one vector to train its lists".into()));
        }
        if p.nprobe == 0 {
            return Err(IndexError::Param("ivf nprobe must be at least 1".into()));
        }
        let nlist = if p.nlist == 0 { ((4.0 * (n as f64).sqrt()).round() as usize).max(1) } else { p.nlist }.min(n);
        let centroids = kmeans(vectors, dim, nlist, p.train_iters, p.seed);
        let mut ix = IvfIndex {
            dim,
            params: IvfParams { nlist, ..*p },
            centroids: Rows::from_flat(dim, &centroids),
            offsets: vec![0; nlist + 1],
            ids: Vec::new(),
            rows: Rows::new(dim),
            id_map: LazyIdMap::default(),
        };
        ix.add(ids, vectors)?;
        Ok(ix)
    }

    /// Number of lists.
    pub fn nlist(&self) -> usize {
        self.params.nlist
    }

    /// Sizes of the lists, e.g. to check balance.
    pub fn list_sizes(&self) -> Vec<usize> {
        self.offsets.windows(2).map(|w| (w[1] - w[0]) as usize).collect()
    }

    /// Scans the `nprobe` lists whose centroids score highest; if they hold fewer than `k`
    /// vectors that pass `keep`, goes on to the next-best lists until `k` are found, so a
    /// small list or a strict filter never shortens the result.
    fn search_impl<F: Fn(u32) -> bool>(&self, q: &[f32], k: usize, nprobe: usize, keep: &F, top: &mut TopK) {
        top.reset(k);
        let rows = self.rows.as_slice();
        let probe = top_lists(q, &self.centroids, nprobe);
        visit_lists(q, &self.centroids, &probe, |l, _| {
            let (a, b) = (self.offsets[l] as usize, self.offsets[l + 1] as usize);
            ExactIndex::scan_into(q, &self.ids[a..b], &rows[a * self.dim..b * self.dim], self.dim, keep, top);
            top.len() >= k
        });
    }

    pub(crate) fn from_payload(h: &Header, backing: &Arc<Backing>, path: &Path) -> Result<Self> {
        let n = h.count as usize;
        let dim = h.dim as usize;
        let [nlist, nprobe, train_iters, seed] = h.params;
        let mut r = Reader::new(backing, path);
        if nlist == 0 || nlist > n.max(1) as u64 {
            return Err(r.corrupt(format!("IVF with {nlist} lists over {n} vectors")));
        }
        if nprobe == 0 {
            return Err(r.corrupt("IVF nprobe is 0"));
        }
        let nlist = nlist as usize;
        let centroids = r.rows("centroids", dim, nlist)?;
        let offsets = r.u32s("list offsets", Some(nlist + 1))?;
        if offsets[0] != 0 || offsets[nlist] as usize != n || offsets.windows(2).any(|w| w[0] > w[1]) {
            return Err(r.corrupt("list offsets are not an increasing cover of the vectors"));
        }
        let ids = r.u32s("ids", Some(n))?;
        let rows = r.rows("vectors", dim, n)?;
        r.finish()?;
        let params =
            IvfParams { nlist, nprobe: nprobe.min(nlist as u64) as usize, train_iters: train_iters as usize, seed };
        Ok(IvfIndex { dim, params, centroids, offsets, ids, rows, id_map: LazyIdMap::default() })
    }
}

/// The `nprobe` (at least 1, at most all) lists whose centroids score highest for `q`, as
/// `(list, q · centroid)`, best first.
pub(crate) fn top_lists(q: &[f32], centroids: &Rows, nprobe: usize) -> Vec<(u32, f32)> {
    let nlist = centroids.rows();
    let mut scores = vec![0.0f32; nlist];
    dot_rows_fn()(q, centroids.as_slice(), centroids.dim(), &mut scores);
    let mut lists = TopK::new(nprobe.clamp(1, nlist.max(1)));
    for (l, &s) in scores.iter().enumerate() {
        if s >= lists.threshold() {
            lists.push(s, l as u32);
        }
    }
    let mut out = Vec::new();
    lists.drain_sorted(&mut out);
    out
}

/// Calls `visit(list, q · centroid)` for each list of `probe`, then, while it returns false (the
/// result is still short, as under a strict filter), for the remaining lists in order of
/// centroid score.
pub(crate) fn visit_lists(
    q: &[f32],
    centroids: &Rows,
    probe: &[(u32, f32)],
    mut visit: impl FnMut(usize, f32) -> bool,
) {
    let nlist = centroids.rows();
    let mut full = false;
    for &(l, s) in probe {
        full = visit(l as usize, s);
    }
    if full || probe.len() >= nlist {
        return;
    }
    let mut probed = vec![false; nlist];
    probe.iter().for_each(|&(l, _)| probed[l as usize] = true);
    let mut scores = vec![0.0f32; nlist];
    dot_rows_fn()(q, centroids.as_slice(), centroids.dim(), &mut scores);
    let mut rest: Vec<(f32, u32)> =
        scores.iter().enumerate().filter(|(l, _)| !probed[*l]).map(|(l, &s)| (s, l as u32)).collect();
    rest.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
    for (s, l) in rest {
        if visit(l as usize, s) {
            break;
        }
    }
}

impl Index for IvfIndex {
    fn kind(&self) -> IndexKind {
        IndexKind::Ivf
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn params(&self) -> IndexParams {
        IndexParams::Ivf(self.params)
    }

    fn memory_bytes(&self) -> usize {
        self.rows.bytes() + self.ids.len() * 4 + self.centroids.bytes() + self.offsets.len() * 4
    }

    /// Assigns the new vectors to the existing lists (the centroids are not retrained) and
    /// rewrites the contiguous storage once, so adding in large batches is cheapest.
    fn add(&mut self, ids: &[u32], vectors: &[f32]) -> Result<()> {
        check_add(self.dim, self.len(), ids, vectors)?;
        if ids.is_empty() {
            return Ok(());
        }
        let dim = self.dim;
        let nlist = self.params.nlist;
        let assign = assign_nearest(vectors, dim, self.centroids.as_slice());
        let mut counts: Vec<usize> = self.list_sizes();
        for &a in &assign {
            counts[a as usize] += 1;
        }
        let mut new_offsets = vec![0u32; nlist + 1];
        for l in 0..nlist {
            new_offsets[l + 1] = new_offsets[l] + counts[l] as u32;
        }
        let total = new_offsets[nlist] as usize;
        let mut new_ids = vec![0u32; total];
        let mut new_rows = Rows::new(dim);
        new_rows.resize_values(total * dim);
        let mut fill: Vec<usize> = new_offsets[..nlist].iter().map(|&o| o as usize).collect();
        {
            let dst = new_rows.as_mut_slice();
            let old = self.rows.as_slice();
            for (f, w) in fill.iter_mut().zip(self.offsets.windows(2)) {
                let (a, b) = (w[0] as usize, w[1] as usize);
                new_ids[*f..*f + b - a].copy_from_slice(&self.ids[a..b]);
                dst[*f * dim..(*f + b - a) * dim].copy_from_slice(&old[a * dim..b * dim]);
                *f += b - a;
            }
            for (i, &a) in assign.iter().enumerate() {
                let f = &mut fill[a as usize];
                new_ids[*f] = ids[i];
                dst[*f * dim..(*f + 1) * dim].copy_from_slice(&vectors[i * dim..(i + 1) * dim]);
                *f += 1;
            }
        }
        self.offsets = new_offsets;
        self.ids = new_ids;
        self.rows = new_rows;
        self.id_map = LazyIdMap::default();
        Ok(())
    }

    fn set_search_effort(&mut self, effort: usize) {
        self.params.nprobe = effort.clamp(1, self.params.nlist.max(1));
    }

    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut Vec<(u32, f32)>) -> Result<()> {
        crate::exact::score_rows(query, ids, self.id_map.get(&self.ids), &self.rows, out)
    }

    fn scan_estimate(&self, _k: usize) -> usize {
        self.params.nprobe * self.len() / self.params.nlist.max(1)
    }

    fn search_with(&self, query: &[f32], k: usize, opts: &SearchOptions, out: &mut Vec<(u32, f32)>) -> Result<()> {
        check_query(self.dim, query)?;
        let nprobe = opts.effort.unwrap_or(self.params.nprobe);
        let mut top = TopK::new(k);
        match opts.keep {
            None => self.search_impl(query, k, nprobe, &|_| true, &mut top),
            Some(keep) => self.search_impl(query, k, nprobe, &keep, &mut top),
        }
        top.drain_sorted(out);
        Ok(())
    }

    fn save(&self, path: &Path) -> Result<()> {
        let p = &self.params;
        let header = Header {
            kind: IndexKind::Ivf,
            dim: self.dim as u32,
            count: self.len() as u64,
            params: [p.nlist as u64, p.nprobe as u64, p.train_iters as u64, p.seed],
        };
        format::save(path, &header, |w| {
            w.f32s(self.centroids.as_slice())?;
            w.u32s(&self.offsets)?;
            w.u32s(&self.ids)?;
            w.f32s(self.rows.as_slice())
        })
    }
}
