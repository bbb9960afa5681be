//! HNSW (Malkov & Yashunin) over the same contiguous, line-aligned vectors as the other indexes.
//!
//! Layout: each node's layer-0 links live in one fixed-size block of `1 + 2m` `u32`s (count,
//! then ids) in a single array, and the rare upper-layer blocks (`1 + m` each) in a second
//! array, so a search touches two flat arrays and the vectors — no per-node allocations.
//!
//! Search keeps the `ef` best candidates in one sorted array with an "expanded" flag (the
//! NSG-style pool) instead of the paper's two heaps, prefetches the rows of unvisited neighbours
//! before scoring them, and marks visited nodes in a bitset (128 KB per million nodes, so it stays
//! in L2 where a byte- or word-per-node array would not).
//!
//! Construction inserts nodes in parallel over the rayon pool, as hnswlib does: links are read
//! lock-free through atomics and each node's block is rewritten under that node's mutex. The
//! graph therefore depends on thread timing, but its quality does not. Neighbour selection uses
//! the paper's heuristic (keep a candidate only if it is closer to the new node than to every
//! neighbour already kept), which matters for clustered data.

use crate::format::{self, Backing, Header, Reader, Writer};
use crate::idmap::LazyIdMap;
use crate::kernels::{dot_fn, prefetch, DotFn, Rows};
use crate::{check_add, check_query, HnswParams, Index, IndexError, IndexKind, IndexParams, Result, SearchOptions};
use needle_core::rng::Rng;
use rayon::prelude::*;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::sync::Mutex;

/// Highest layer a node can be drawn on; with m ≥ 2 a draw above it has probability < 2⁻³⁰.
const MAX_LEVEL: u8 = 30;
/// Rows prefetched ahead of the one being scored.
const PREFETCH_AHEAD: usize = 3;

// Build-time views reinterpret `&mut [u32]` as `&[AtomicU32]`; that needs identical layouts.
const _: () = assert!(std::mem::size_of::<u32>() == std::mem::size_of::<AtomicU32>());
const _: () = assert!(std::mem::align_of::<u32>() == std::mem::align_of::<AtomicU32>());

/// A link slot: plain `u32` when searching a finished graph, atomic while building it.
trait Slot: Sync {
    fn get(&self) -> u32;
}

impl Slot for u32 {
    #[inline(always)]
    fn get(&self) -> u32 {
        *self
    }
}

impl Slot for AtomicU32 {
    #[inline(always)]
    fn get(&self) -> u32 {
        self.load(Ordering::Acquire)
    }
}

/// Borrowed view of the link arrays.
struct Graph<'a, S> {
    level0: &'a [S],
    upper: &'a [S],
    upper_start: &'a [u32],
    m: usize,
}

impl<'a, S: Slot> Graph<'a, S> {
    /// The block `[count, ids…]` of `node` on `level`.
    #[inline]
    fn block(&self, node: u32, level: usize) -> &'a [S] {
        if level == 0 {
            let w = 1 + 2 * self.m;
            &self.level0[node as usize * w..][..w]
        } else {
            let w = 1 + self.m;
            let b = self.upper_start[node as usize] as usize + level - 1;
            &self.upper[b * w..][..w]
        }
    }

    /// The current links of `node` on `level`.
    #[inline]
    fn links(&self, node: u32, level: usize) -> impl Iterator<Item = u32> + 'a {
        let blk = self.block(node, level);
        let c = (blk[0].get() as usize).min(blk.len() - 1);
        blk[1..1 + c].iter().map(Slot::get)
    }
}

/// Visited marks as a bitset, cleared by remembering which words were touched.
#[derive(Default)]
struct Visited {
    bits: Vec<u64>,
    touched: Vec<u32>,
}

impl Visited {
    fn ensure(&mut self, n: usize) {
        let words = n.div_ceil(64);
        if self.bits.len() < words {
            self.bits.resize(words, 0);
        }
    }

    /// Marks `id`; true if it was not marked before.
    #[inline]
    fn insert(&mut self, id: u32) -> bool {
        let w = (id >> 6) as usize;
        let bit = 1u64 << (id & 63);
        let word = self.bits[w];
        if word & bit != 0 {
            return false;
        }
        if word == 0 {
            self.touched.push(w as u32);
        }
        self.bits[w] = word | bit;
        true
    }

    fn clear(&mut self) {
        for &w in &self.touched {
            self.bits[w as usize] = 0;
        }
        self.touched.clear();
    }
}

#[derive(Clone, Copy, Debug)]
struct Cand {
    score: f32,
    node: u32,
    expanded: bool,
    /// Passes the query's filter (always true without one); only kept nodes count towards `ef`
    /// and appear in results, but every node guides the walk.
    kept: bool,
}

/// The best candidates found so far, sorted by descending score.
#[derive(Default)]
struct Pool {
    items: Vec<Cand>,
    cap: usize,
    kept: usize,
}

impl Pool {
    fn reset(&mut self, cap: usize) {
        self.items.clear();
        self.cap = cap;
        self.kept = 0;
    }

    /// Could a candidate with this score enter?
    #[inline]
    fn accepts(&self, score: f32) -> bool {
        self.kept < self.cap || self.items.last().is_some_and(|c| score > c.score)
    }

    /// Inserts a candidate already known to be accepted; returns its position.
    #[inline]
    fn insert(&mut self, score: f32, node: u32, kept: bool) -> usize {
        let pos = self.items.partition_point(|c| c.score >= score);
        self.items.insert(pos, Cand { score, node, expanded: false, kept });
        if kept {
            self.kept += 1;
            if self.kept > self.cap {
                // Drop the worst kept candidate and anything (filtered) ranked below it.
                while let Some(c) = self.items.pop() {
                    if c.kept {
                        self.kept -= 1;
                        break;
                    }
                }
                while self.items.last().is_some_and(|c| !c.kept) {
                    self.items.pop();
                }
            }
        }
        pos
    }
}

/// Per-thread search state, reused across queries.
#[derive(Default)]
struct Scratch {
    visited: Visited,
    pool: Pool,
    fresh: Vec<u32>,
    cands: Vec<(f32, u32)>,
    selected: Vec<u32>,
}

/// Scratch states shared by the searches of one index; a search takes one and gives it back.
#[derive(Default)]
struct ScratchPool(Mutex<Vec<Scratch>>);

struct PooledScratch<'a> {
    owner: &'a ScratchPool,
    s: Option<Scratch>,
}

impl ScratchPool {
    fn get(&self, n: usize) -> PooledScratch<'_> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default();
        s.visited.ensure(n);
        PooledScratch { owner: self, s: Some(s) }
    }
}

impl Drop for PooledScratch<'_> {
    fn drop(&mut self) {
        if let Some(s) = self.s.take() {
            self.owner.0.lock().unwrap_or_else(|e| e.into_inner()).push(s);
        }
    }
}

impl std::ops::Deref for PooledScratch<'_> {
    type Target = Scratch;
    fn deref(&self) -> &Scratch {
        self.s.as_ref().expect("scratch present until drop")
    }
}

impl std::ops::DerefMut for PooledScratch<'_> {
    fn deref_mut(&mut self) -> &mut Scratch {
        self.s.as_mut().expect("scratch present until drop")
    }
}

/// Moves to the best-scoring neighbour until none improves (search on upper layers).
fn greedy<S: Slot>(g: &Graph<S>, rows: &Rows, dot: DotFn, q: &[f32], cur: &mut u32, cur_s: &mut f32, level: usize) {
    loop {
        let mut changed = false;
        for id in g.links(*cur, level) {
            let s = dot(q, rows.row(id as usize));
            if s > *cur_s {
                *cur_s = s;
                *cur = id;
                changed = true;
            }
        }
        if !changed {
            return;
        }
    }
}

/// Best-first search on one layer from the candidates already in `sc.pool` (whose nodes must be
/// marked visited), until every candidate in the pool has been expanded.
fn search_layer<S: Slot, F: Fn(u32) -> bool>(
    g: &Graph<S>,
    rows: &Rows,
    dot: DotFn,
    q: &[f32],
    level: usize,
    keep: &F,
    sc: &mut Scratch,
) {
    let dim = rows.row(0).len();
    let row_bytes = dim * 4;
    let base = rows.as_slice().as_ptr();
    let Scratch { visited, pool, fresh, .. } = sc;
    let mut cur = 0;
    while cur < pool.items.len() {
        if pool.items[cur].expanded {
            cur += 1;
            continue;
        }
        pool.items[cur].expanded = true;
        let node = pool.items[cur].node;
        fresh.clear();
        for id in g.links(node, level) {
            if visited.insert(id) {
                fresh.push(id);
            }
        }
        for &id in fresh.iter().take(PREFETCH_AHEAD) {
            prefetch(base.wrapping_add(id as usize * dim), row_bytes);
        }
        let mut next = cur + 1;
        for i in 0..fresh.len() {
            if let Some(&ahead) = fresh.get(i + PREFETCH_AHEAD) {
                prefetch(base.wrapping_add(ahead as usize * dim), row_bytes);
            }
            let id = fresh[i];
            let s = dot(q, rows.row(id as usize));
            if pool.accepts(s) {
                let pos = pool.insert(s, id, keep(id));
                next = next.min(pos);
            }
        }
        cur = next;
    }
}

/// The paper's neighbour-selection heuristic: walk candidates from best to worst and keep one
/// only if it scores higher with the base node than with every neighbour kept so far. This
/// spreads links across directions instead of spending them all inside one dense cluster.
fn select_neighbors(cands: &[(f32, u32)], m: usize, rows: &Rows, dot: DotFn, out: &mut Vec<u32>) {
    out.clear();
    if cands.len() <= m {
        out.extend(cands.iter().map(|c| c.1));
        return;
    }
    for &(s, c) in cands {
        if out.len() >= m {
            break;
        }
        let rc = rows.row(c as usize);
        if out.iter().all(|&o| dot(rc, rows.row(o as usize)) <= s) {
            out.push(c);
        }
    }
}

/// Everything one parallel insertion needs, shared read-only across threads.
struct Builder<'a> {
    graph: Graph<'a, AtomicU32>,
    rows: &'a Rows,
    levels: &'a [u8],
    locks: &'a [Mutex<()>],
    top: &'a Mutex<(u32, u8)>,
    ef_construction: usize,
    dot: DotFn,
}

impl Builder<'_> {
    fn lock(&self, node: u32) -> std::sync::MutexGuard<'_, ()> {
        self.locks[node as usize].lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self, x: u32, sc: &mut Scratch) {
        let (g, rows, dot) = (&self.graph, self.rows, self.dot);
        let m = g.m;
        let q = rows.row(x as usize);
        let lx = self.levels[x as usize];
        let top = self.top.lock().unwrap_or_else(|e| e.into_inner());
        let (ep, max_level) = *top;
        // A node that raises the top layer holds the lock for its whole insertion, so no other
        // node can raise it concurrently (hnswlib's rule).
        let raise = if lx > max_level {
            Some(top)
        } else {
            drop(top);
            None
        };
        let mut cur = ep;
        let mut cur_s = dot(q, rows.row(ep as usize));
        for level in (lx as usize + 1..=max_level as usize).rev() {
            greedy(g, rows, dot, q, &mut cur, &mut cur_s, level);
        }
        sc.cands.clear();
        sc.cands.push((cur_s, cur));
        for level in (0..=lx.min(max_level) as usize).rev() {
            sc.visited.clear();
            sc.pool.reset(self.ef_construction);
            sc.visited.insert(x);
            for i in 0..sc.cands.len() {
                let (s, n) = sc.cands[i];
                if sc.visited.insert(n) && sc.pool.accepts(s) {
                    sc.pool.insert(s, n, true);
                }
            }
            search_layer(g, rows, dot, q, level, &|_| true, sc);
            sc.cands.clear();
            sc.cands.extend(sc.pool.items.iter().map(|c| (c.score, c.node)));
            let mut selected = std::mem::take(&mut sc.selected);
            select_neighbors(&sc.cands, m, rows, dot, &mut selected);
            {
                let _guard = self.lock(x);
                let blk = g.block(x, level);
                for (slot, &id) in blk[1..].iter().zip(&selected) {
                    slot.store(id, Ordering::Relaxed);
                }
                blk[0].store(selected.len() as u32, Ordering::Release);
            }
            let cap = if level == 0 { 2 * m } else { m };
            for &n in &selected {
                self.link(n, x, level, cap);
            }
            sc.selected = selected;
        }
        sc.visited.clear();
        if let Some(mut top) = raise {
            *top = (x, lx);
        }
    }

    /// Adds `x` to `n`'s links on `level`, re-running the heuristic when the block is full.
    fn link(&self, n: u32, x: u32, level: usize, cap: usize) {
        let (g, rows, dot) = (&self.graph, self.rows, self.dot);
        let _guard = self.lock(n);
        let blk = g.block(n, level);
        let c = (blk[0].get() as usize).min(cap);
        if blk[1..1 + c].iter().any(|s| s.get() == x) {
            return;
        }
        if c < cap {
            blk[1 + c].store(x, Ordering::Relaxed);
            blk[0].store(c as u32 + 1, Ordering::Release);
            return;
        }
        let base = rows.row(n as usize);
        let mut cands: Vec<(f32, u32)> =
            blk[1..1 + c].iter().map(Slot::get).chain([x]).map(|j| (dot(base, rows.row(j as usize)), j)).collect();
        cands.sort_unstable_by(|a, b| b.0.total_cmp(&a.0));
        let mut keep = Vec::with_capacity(cap);
        select_neighbors(&cands, cap, rows, dot, &mut keep);
        for (slot, &id) in blk[1..].iter().zip(&keep) {
            slot.store(id, Ordering::Relaxed);
        }
        blk[0].store(keep.len() as u32, Ordering::Release);
    }
}

/// Views a `u32` slice as atomics for the duration of a parallel build.
fn as_atomic(v: &mut [u32]) -> &[AtomicU32] {
    // SAFETY: `AtomicU32` has the size and alignment of `u32` (asserted at compile time above)
    // and the exclusive borrow guarantees no non-atomic access while the view lives.
    unsafe { &*(v as *mut [u32] as *const [AtomicU32]) }
}

/// Hierarchical navigable small-world graph index.
pub struct HnswIndex {
    dim: usize,
    params: HnswParams,
    ids: Vec<u32>,
    rows: Rows,
    levels: Vec<u8>,
    /// First upper-layer block of each node (meaningful when its level is above 0).
    upper_start: Vec<u32>,
    level0: Vec<u32>,
    upper: Vec<u32>,
    entry: u32,
    max_level: u8,
    scratch: ScratchPool,
    id_map: LazyIdMap,
}

impl std::fmt::Debug for HnswIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HnswIndex")
            .field("dim", &self.dim)
            .field("params", &self.params)
            .field("len", &self.ids.len())
            .field("max_level", &self.max_level)
            .finish()
    }
}

impl HnswIndex {
    /// An empty graph; vectors arrive through [`Index::add`].
    pub fn new(dim: usize, params: &HnswParams) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        IndexParams::Hnsw(*params).validate()?;
        Ok(HnswIndex {
            dim,
            params: *params,
            ids: Vec::new(),
            rows: Rows::new(dim),
            levels: Vec::new(),
            upper_start: Vec::new(),
            level0: Vec::new(),
            upper: Vec::new(),
            entry: 0,
            max_level: 0,
            scratch: ScratchPool::default(),
            id_map: LazyIdMap::default(),
        })
    }

    fn graph(&self) -> Graph<'_, u32> {
        Graph { level0: &self.level0, upper: &self.upper, upper_start: &self.upper_start, m: self.params.m }
    }

    /// Mean number of layer-0 links per node (a graph-health figure for tests and reports).
    pub fn mean_degree(&self) -> f64 {
        let n = self.ids.len();
        if n == 0 {
            return 0.0;
        }
        let w = 1 + 2 * self.params.m;
        (0..n).map(|i| self.level0[i * w] as f64).sum::<f64>() / n as f64
    }

    /// Links every layer-0 node that the entry point cannot reach into the reachable part.
    ///
    /// The neighbour heuristic can prune away every link into a node; such a node is never
    /// returned by any query — an item that can never be recommended. hnswlib leaves these
    /// orphans; here each one is searched for like a query and linked from its best reachable
    /// match, replacing that match's link to its most-linked-to neighbour (which loses one of
    /// several incoming links, so no new orphan appears). Returns how many nodes were relinked.
    fn connect_unreachable(&mut self) -> usize {
        let n = self.ids.len();
        if n < 2 {
            return 0;
        }
        let m0 = 2 * self.params.m;
        let w = 1 + m0;
        let mut indeg = vec![0u32; n];
        for node in 0..n {
            let c = (self.level0[node * w] as usize).min(m0);
            for &t in &self.level0[node * w + 1..node * w + 1 + c] {
                indeg[t as usize] += 1;
            }
        }
        /// Marks everything reachable from `from` over layer-0 links.
        fn walk(from: u32, reach: &mut [bool], level0: &[u32], w: usize, stack: &mut Vec<u32>) {
            stack.push(from);
            reach[from as usize] = true;
            while let Some(x) = stack.pop() {
                let b = x as usize * w;
                let c = (level0[b] as usize).min(w - 1);
                for &t in &level0[b + 1..b + 1 + c] {
                    if !reach[t as usize] {
                        reach[t as usize] = true;
                        stack.push(t);
                    }
                }
            }
        }
        let mut reach = vec![false; n];
        let mut stack = Vec::new();
        walk(self.entry, &mut reach, &self.level0, w, &mut stack);
        let mut relinked = 0;
        let dot = dot_fn();
        let mut sc = Scratch::default();
        sc.visited.ensure(n);
        for u in 0..n as u32 {
            if reach[u as usize] {
                continue;
            }
            // Best reachable nodes for u's vector, found the way a query would find them.
            let q = self.rows.row(u as usize);
            let g = self.graph();
            let mut cur = self.entry;
            let mut cur_s = dot(q, self.rows.row(cur as usize));
            for level in (1..=self.max_level as usize).rev() {
                greedy(&g, &self.rows, dot, q, &mut cur, &mut cur_s, level);
            }
            sc.visited.clear();
            sc.pool.reset(self.params.ef_construction);
            sc.visited.insert(cur);
            sc.visited.insert(u);
            sc.pool.insert(cur_s, cur, true);
            search_layer(&g, &self.rows, dot, q, 0, &|_| true, &mut sc);
            let y = sc.pool.items.iter().map(|c| c.node).find(|&c| reach[c as usize]).unwrap_or(self.entry);
            let b = y as usize * w;
            let c = (self.level0[b] as usize).min(m0);
            if c < m0 {
                self.level0[b + 1 + c] = u;
                self.level0[b] = c as u32 + 1;
            } else {
                let (slot, t) = self.level0[b + 1..b + 1 + c]
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, &t)| indeg[t as usize])
                    .map(|(i, &t)| (i, t))
                    .expect("full block has links");
                if indeg[t as usize] <= 1 {
                    continue; // every link of y is someone's only way in; leave u for now
                }
                indeg[t as usize] -= 1;
                self.level0[b + 1 + slot] = u;
            }
            indeg[u as usize] += 1;
            walk(u, &mut reach, &self.level0, w, &mut stack);
            relinked += 1;
        }
        sc.visited.clear();
        relinked
    }

    fn search_impl<F: Fn(u32) -> bool>(&self, q: &[f32], k: usize, ef: usize, keep: &F, out: &mut Vec<(u32, f32)>) {
        out.clear();
        let n = self.ids.len();
        if n == 0 || k == 0 {
            return;
        }
        let g = self.graph();
        let dot = dot_fn();
        let mut sc = self.scratch.get(n);
        let mut cur = self.entry;
        let mut cur_s = dot(q, self.rows.row(cur as usize));
        for level in (1..=self.max_level as usize).rev() {
            greedy(&g, &self.rows, dot, q, &mut cur, &mut cur_s, level);
        }
        let ids = &self.ids;
        let keep_node = |node: u32| keep(ids[node as usize]);
        sc.visited.clear();
        sc.pool.reset(ef.max(k));
        sc.visited.insert(cur);
        sc.pool.insert(cur_s, cur, keep_node(cur));
        search_layer(&g, &self.rows, dot, q, 0, &keep_node, &mut sc);
        out.extend(sc.pool.items.iter().filter(|c| c.kept).take(k).map(|c| (ids[c.node as usize], c.score)));
        out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        sc.visited.clear();
    }

    pub(crate) fn from_payload(h: &Header, backing: &Arc<Backing>, path: &Path) -> Result<Self> {
        let mut r = Reader::new(backing, path);
        let [m, efc, ef, seed] = h.params;
        let ix = Self::read_sections(&mut r, h.dim as usize, h.count as usize, [m, efc, ef], seed)?;
        r.finish()?;
        Ok(ix)
    }

    /// The id of every node, in node order.
    pub(crate) fn ids(&self) -> &[u32] {
        &self.ids
    }

    /// The graph and its vectors as file sections (the parameters go in the caller's header).
    pub(crate) fn write_sections(&self, w: &mut Writer) -> Result<()> {
        w.u64s(&[self.entry as u64, self.max_level as u64])?;
        w.u32s(&self.ids)?;
        w.u8s(&self.levels)?;
        w.u32s(&self.upper_start)?;
        w.u32s(&self.level0)?;
        w.u32s(&self.upper)?;
        w.f32s(self.rows.as_slice())
    }

    /// Reads the sections [`HnswIndex::write_sections`] wrote for `n` nodes, checking every
    /// link; `params` are `m`, `ef_construction` and `ef_search` as stored.
    pub(crate) fn read_sections(r: &mut Reader, dim: usize, n: usize, params: [u64; 3], seed: u64) -> Result<Self> {
        let [m, efc, ef] = params;
        if !(2..=256).contains(&m) || efc == 0 || ef == 0 || efc > u32::MAX as u64 || ef > u32::MAX as u64 {
            return Err(r.corrupt(format!("HNSW parameters out of range: m={m} ef_construction={efc} ef_search={ef}")));
        }
        let params = HnswParams { m: m as usize, ef_construction: efc as usize, ef_search: ef as usize, seed };
        let m = m as usize;
        let top = r.u64s("entry point", Some(2))?;
        let ids = r.u32s("ids", Some(n))?;
        let levels = r.u8s("levels", Some(n))?;
        let upper_start = r.u32s("upper-layer offsets", Some(n))?;
        let level0 = r.u32s("layer-0 links", Some(n * (1 + 2 * m)))?;
        let upper = r.u32s("upper-layer links", None)?;
        let rows = r.rows("vectors", dim, n)?;
        let (entry, max_level) = (top[0], top[1]);
        let blocks = upper.len() / (1 + m);
        if upper.len() % (1 + m) != 0 {
            return Err(r.corrupt("upper-layer links are not whole blocks"));
        }
        if n > 0 {
            if entry >= n as u64 || max_level > MAX_LEVEL as u64 || levels[entry as usize] as u64 != max_level {
                return Err(r.corrupt(format!("entry point {entry} at level {max_level} does not match the nodes")));
            }
            if levels.iter().any(|&l| l > max_level as u8) {
                return Err(r.corrupt("a node lies above the top layer"));
            }
        }
        for (i, &l) in levels.iter().enumerate() {
            if l > 0 && upper_start[i] as usize + l as usize > blocks {
                return Err(r.corrupt(format!("node {i}: upper-layer blocks out of range")));
            }
        }
        let ix = HnswIndex {
            dim,
            params,
            ids,
            rows,
            levels,
            upper_start,
            level0,
            upper,
            entry: entry as u32,
            max_level: max_level as u8,
            scratch: ScratchPool::default(),
            id_map: LazyIdMap::default(),
        };
        // Every link must name an existing node that lives on that layer, or a search could
        // index out of bounds.
        let g = ix.graph();
        for node in 0..n {
            for level in 0..=ix.levels[node] as usize {
                let blk = g.block(node as u32, level);
                if blk[0] as usize > blk.len() - 1 {
                    return Err(r.corrupt(format!("node {node} layer {level}: {} links exceed the block", blk[0])));
                }
                if let Some(bad) = g
                    .links(node as u32, level)
                    .find(|&id| id as usize >= n || (ix.levels[id as usize] as usize) < level)
                {
                    return Err(
                        r.corrupt(format!("node {node} layer {level}: link to {bad} is not a node of that layer"))
                    );
                }
            }
        }
        Ok(ix)
    }
}

impl Index for HnswIndex {
    fn kind(&self) -> IndexKind {
        IndexKind::Hnsw
    }

    fn dim(&self) -> usize {
        self.dim
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn params(&self) -> IndexParams {
        IndexParams::Hnsw(self.params)
    }

    fn memory_bytes(&self) -> usize {
        self.rows.bytes()
            + 4 * (self.ids.len() + self.upper_start.len() + self.level0.len() + self.upper.len())
            + self.levels.len()
    }

    /// Inserts the new vectors into the graph in parallel. Layers are drawn from a stream seeded
    /// by `seed` and the number of nodes already present, so the same sequence of adds draws the
    /// same layers.
    fn add(&mut self, ids: &[u32], vectors: &[f32]) -> Result<()> {
        check_add(self.dim, self.len(), ids, vectors)?;
        if ids.is_empty() {
            return Ok(());
        }
        let m = self.params.m;
        let start = self.ids.len();
        let total = start + ids.len();
        let ml = 1.0 / (m as f64).ln();
        let mut rng = Rng::new(self.params.seed).fork(start as u64);
        let mut blocks = self.upper.len() / (1 + m);
        for _ in 0..ids.len() {
            let u = 1.0 - rng.uniform() as f64;
            let level = ((-u.ln() * ml) as u64).min(MAX_LEVEL as u64) as u8;
            self.levels.push(level);
            self.upper_start.push(blocks as u32);
            blocks += level as usize;
        }
        self.ids.extend_from_slice(ids);
        self.id_map = LazyIdMap::default();
        self.rows.extend(vectors);
        self.level0.resize(total * (1 + 2 * m), 0);
        self.upper.resize(blocks * (1 + m), 0);

        let first = if start == 0 {
            self.entry = 0;
            self.max_level = self.levels[0];
            1
        } else {
            start
        };
        let top = Mutex::new((self.entry, self.max_level));
        let locks: Vec<Mutex<()>> = (0..total).map(|_| Mutex::new(())).collect();
        let builder = Builder {
            graph: Graph {
                level0: as_atomic(&mut self.level0),
                upper: as_atomic(&mut self.upper),
                upper_start: &self.upper_start,
                m,
            },
            rows: &self.rows,
            levels: &self.levels,
            locks: &locks,
            top: &top,
            ef_construction: self.params.ef_construction,
            dot: dot_fn(),
        };
        let scratch = &self.scratch;
        (first..total).into_par_iter().for_each_init(|| scratch.get(total), |sc, x| builder.insert(x as u32, sc));
        let (entry, max_level) = top.into_inner().unwrap_or_else(|e| e.into_inner());
        self.entry = entry;
        self.max_level = max_level;
        self.connect_unreachable();
        Ok(())
    }

    fn set_search_effort(&mut self, effort: usize) {
        self.params.ef_search = effort.max(1);
    }

    fn search_with(&self, query: &[f32], k: usize, opts: &SearchOptions, out: &mut Vec<(u32, f32)>) -> Result<()> {
        check_query(self.dim, query)?;
        let ef = opts.effort.unwrap_or(self.params.ef_search).max(1);
        match opts.keep {
            None => self.search_impl(query, k, ef, &|_| true, out),
            Some(keep) => self.search_impl(query, k, ef, &keep, out),
        }
        Ok(())
    }

    fn score_ids(&self, query: &[f32], ids: &[u32], out: &mut Vec<(u32, f32)>) -> Result<()> {
        crate::exact::score_rows(query, ids, self.id_map.get(&self.ids), &self.rows, out)
    }

    /// A walk visits about `ef` nodes and compares each one's layer-0 neighbours.
    fn scan_estimate(&self, k: usize) -> usize {
        self.params.ef_search.max(k) * 2 * self.params.m
    }

    fn save(&self, path: &Path) -> Result<()> {
        let p = &self.params;
        let header = Header {
            kind: IndexKind::Hnsw,
            dim: self.dim as u32,
            count: self.len() as u64,
            params: [p.m as u64, p.ef_construction as u64, p.ef_search as u64, p.seed],
        };
        format::save(path, &header, |w| self.write_sections(w))
    }
}
