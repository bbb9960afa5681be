//! The arithmetic every index shares: inner products, a bounded top-K heap, and a 64-byte
//! aligned vector store.
//!
//! Dot products pick an AVX2+FMA version at run time when the CPU has it, because release builds
//! target baseline x86-64 (SSE2) and a 64-d product is 8 fused multiply-adds with AVX2 against 16
//! multiplies and 16 adds without. The choice is made once and cached as a function pointer.

use std::sync::OnceLock;

/// `a · b` over the shorter of the two slices.
pub type DotFn = fn(&[f32], &[f32]) -> f32;

/// Scores of one query against consecutive rows of `rows` (`dim` values each) into `out`.
pub type DotRowsFn = fn(&[f32], &[f32], usize, &mut [f32]);

struct Kernels {
    dot: DotFn,
    dot_rows: DotRowsFn,
}

fn kernels() -> &'static Kernels {
    static K: OnceLock<Kernels> = OnceLock::new();
    K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return Kernels { dot: x86::dot, dot_rows: x86::dot_rows };
            }
        }
        Kernels { dot: dot_portable, dot_rows: dot_rows_portable }
    })
}

/// The fastest inner product this CPU supports.
#[inline]
pub fn dot_fn() -> DotFn {
    kernels().dot
}

/// The fastest one-query-against-many-rows kernel this CPU supports.
#[inline]
pub fn dot_rows_fn() -> DotRowsFn {
    kernels().dot_rows
}

/// `a · b` with the dispatched kernel (convenience for code off the hot path).
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    (kernels().dot)(a, b)
}

/// Eight independent partial sums so the compiler can keep them in vector registers.
pub fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let ca = a.chunks_exact(8);
    let cb = b.chunks_exact(8);
    let (ta, tb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for j in 0..8 {
            acc[j] += x[j] * y[j];
        }
    }
    let mut s = (acc[0] + acc[4]) + (acc[1] + acc[5]) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ta.iter().zip(tb) {
        s += x * y;
    }
    s
}

fn dot_rows_portable(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
    if dim == 0 {
        out.iter_mut().for_each(|o| *o = 0.0);
        return;
    }
    for (o, r) in out.iter_mut().zip(rows.chunks_exact(dim)) {
        *o = dot_portable(q, r);
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    pub fn dot(a: &[f32], b: &[f32]) -> f32 {
        // SAFETY: only installed by `kernels()` after checking the CPU has AVX2 and FMA.
        unsafe { dot_avx2(a, b) }
    }

    pub fn dot_rows(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
        // SAFETY: as above.
        unsafe { dot_rows_avx2(q, rows, dim, out) }
    }

    #[inline(always)]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_avx2(a: &[f32], b: &[f32]) -> f32 {
        let n = a.len().min(b.len());
        let (pa, pb) = (a.as_ptr(), b.as_ptr());
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut i = 0;
        while i + 32 <= n {
            for (j, a) in acc.iter_mut().enumerate() {
                let x = _mm256_loadu_ps(pa.add(i + 8 * j));
                *a = _mm256_fmadd_ps(x, _mm256_loadu_ps(pb.add(i + 8 * j)), *a);
            }
            i += 32;
        }
        while i + 8 <= n {
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), _mm256_loadu_ps(pb.add(i)), acc[0]);
            i += 8;
        }
        let mut s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
        while i < n {
            s += *pa.add(i) * *pb.add(i);
            i += 1;
        }
        s
    }

    /// Four rows at a time: each query chunk is loaded once and used four times, and the four
    /// sums are reduced together.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn dot_rows_avx2(q: &[f32], rows: &[f32], dim: usize, out: &mut [f32]) {
        if dim == 0 {
            out.iter_mut().for_each(|o| *o = 0.0);
            return;
        }
        let n = out.len().min(rows.len() / dim);
        let d8 = dim.min(q.len()) / 8 * 8;
        let pq = q.as_ptr();
        let mut r = 0;
        while r + 4 <= n {
            let p0 = rows.as_ptr().add(r * dim);
            let (p1, p2, p3) = (p0.add(dim), p0.add(2 * dim), p0.add(3 * dim));
            let (mut a0, mut a1, mut a2, mut a3) =
                (_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps());
            let mut i = 0;
            while i < d8 {
                let x = _mm256_loadu_ps(pq.add(i));
                a0 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p0.add(i)), a0);
                a1 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p1.add(i)), a1);
                a2 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p2.add(i)), a2);
                a3 = _mm256_fmadd_ps(x, _mm256_loadu_ps(p3.add(i)), a3);
                i += 8;
            }
            // Transpose-and-add: lanes of the result hold the four row sums.
            let h01 = _mm256_hadd_ps(a0, a1);
            let h23 = _mm256_hadd_ps(a2, a3);
            let h = _mm256_hadd_ps(h01, h23);
            let s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
            let mut sums = [0.0f32; 4];
            _mm_storeu_ps(sums.as_mut_ptr(), s);
            for i in d8..dim.min(q.len()) {
                let x = *pq.add(i);
                sums[0] += x * *p0.add(i);
                sums[1] += x * *p1.add(i);
                sums[2] += x * *p2.add(i);
                sums[3] += x * *p3.add(i);
            }
            out[r..r + 4].copy_from_slice(&sums);
            r += 4;
        }
        while r < n {
            out[r] = dot_avx2(q, &rows[r * dim..(r + 1) * dim]);
            r += 1;
        }
    }
}

/// Asks the CPU to start loading `bytes` bytes from `p` into cache; a hint, never a fault.
#[inline(always)]
pub fn prefetch(p: *const f32, bytes: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        let p = p as *const i8;
        let mut off = 0;
        while off < bytes {
            // SAFETY: prefetch never dereferences in the architectural sense and cannot fault;
            // `wrapping_add` keeps the pointer arithmetic itself defined.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.wrapping_add(off)) };
            off += 64;
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (p, bytes);
    }
}

/// `c[m×n] = a[m×k] · b[n×k]ᵀ` on the calling thread (callers parallelise over blocks, so the
/// product itself must not fork).
pub fn gemm_nt(m: usize, n: usize, k: usize, a: &[f32], b: &[f32], c: &mut [f32]) {
    assert!(a.len() >= m * k && b.len() >= n * k && c.len() >= m * n, "gemm_nt shape mismatch");
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the assert bounds every element the strides reach: A is m×k row-major, B is read as
    // its transpose (row stride 1, column stride k), C is m×n row-major.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            k as isize,
            1,
            b.as_ptr(),
            1,
            k as isize,
            0.0,
            c.as_mut_ptr(),
            n as isize,
            1,
        );
    }
}

/// A bounded min-heap keeping the `k` best `(score, id)` pairs seen so far.
///
/// "Best" is the larger score, ties going to the smaller id so results do not depend on scan
/// order. The root is the worst kept pair, so rejecting a candidate costs one comparison with
/// [`TopK::threshold`] — the common case once the heap is full.
#[derive(Clone, Debug)]
pub struct TopK {
    k: usize,
    heap: Vec<(f32, u32)>,
}

#[inline]
fn worse(a: (f32, u32), b: (f32, u32)) -> bool {
    a.0 < b.0 || (a.0 == b.0 && a.1 > b.1)
}

impl TopK {
    /// An empty collector for the best `k` pairs.
    pub fn new(k: usize) -> Self {
        TopK { k, heap: Vec::with_capacity(k.min(1 << 16)) }
    }

    /// Empties the collector and sets a new `k`, keeping the allocation.
    pub fn reset(&mut self, k: usize) {
        self.k = k;
        self.heap.clear();
    }

    /// Candidates scoring below this cannot enter; `-inf` until `k` pairs are held (`+inf`
    /// when `k` is 0, so nothing is ever offered).
    #[inline]
    pub fn threshold(&self) -> f32 {
        if self.heap.len() < self.k {
            f32::NEG_INFINITY
        } else {
            self.heap.first().map_or(f32::INFINITY, |w| w.0)
        }
    }

    /// Offers one pair; NaN scores are ignored.
    #[inline]
    pub fn push(&mut self, score: f32, id: u32) {
        if self.k == 0 || score.is_nan() {
            return;
        }
        let cand = (score, id);
        if self.heap.len() < self.k {
            self.heap.push(cand);
            let mut i = self.heap.len() - 1;
            while i > 0 {
                let p = (i - 1) / 2;
                if worse(self.heap[i], self.heap[p]) {
                    self.heap.swap(i, p);
                    i = p;
                } else {
                    break;
                }
            }
        } else if worse(self.heap[0], cand) {
            self.heap[0] = cand;
            let n = self.heap.len();
            let mut i = 0;
            loop {
                let l = 2 * i + 1;
                if l >= n {
                    break;
                }
                let r = l + 1;
                let c = if r < n && worse(self.heap[r], self.heap[l]) { r } else { l };
                if worse(self.heap[c], self.heap[i]) {
                    self.heap.swap(c, i);
                    i = c;
                } else {
                    break;
                }
            }
        }
    }

    /// Number of pairs held.
    pub fn len(&self) -> usize {
        self.heap.len()
    }

    /// True when nothing has been kept yet.
    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }

    /// Moves the kept pairs into `out` as `(id, score)`, best first, and empties the heap.
    pub fn drain_sorted(&mut self, out: &mut Vec<(u32, f32)>) {
        out.clear();
        self.heap.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        out.extend(self.heap.drain(..).map(|(s, id)| (id, s)));
    }
}

/// One 64-byte cache line of floats; a `Vec` of these is a line-aligned float buffer.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C, align(64))]
struct Line([f32; 16]);

/// Row-major `f32` rows whose buffer starts on a cache-line boundary.
///
/// Large allocations from the system allocator start 16 bytes past a page boundary, which makes
/// every 256-byte row of a 64-d index straddle five cache lines instead of four; graph search
/// reads rows at random, so that fifth line is a 25% tax on memory traffic.
#[derive(Clone, Default)]
pub struct Rows {
    lines: Vec<Line>,
    len: usize,
    dim: usize,
}

impl std::fmt::Debug for Rows {
    /// A summary: printing a million vectors helps nobody.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Rows {{ rows: {}, dim: {} }}", self.rows(), self.dim)
    }
}

impl Rows {
    /// An empty store of `dim`-wide rows.
    pub fn new(dim: usize) -> Self {
        Rows { lines: Vec::new(), len: 0, dim }
    }

    /// Copies a flat row-major buffer (its length must be a multiple of `dim`).
    pub fn from_flat(dim: usize, data: &[f32]) -> Self {
        let mut r = Rows::new(dim);
        r.extend(data);
        r
    }

    /// Appends rows from a flat buffer.
    pub fn extend(&mut self, data: &[f32]) {
        let start = self.len;
        self.resize_values(start + data.len());
        self.as_mut_slice()[start..].copy_from_slice(data);
    }

    /// Grows or shrinks to `values` floats (new values are zero).
    pub fn resize_values(&mut self, values: usize) {
        self.lines.resize(values.div_ceil(16), Line::default());
        self.len = values;
    }

    /// Reserves room for `values` more floats.
    pub fn reserve_values(&mut self, values: usize) {
        self.lines.reserve((self.len + values).div_ceil(16).saturating_sub(self.lines.len()));
    }

    /// All values, row-major.
    #[inline]
    pub fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]`, so `lines` is `16 * lines.len()`
        // contiguous initialised floats, and `len <= 16 * lines.len()` is kept by every method.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr() as *const f32, self.len) }
    }

    /// All values, row-major, mutable.
    #[inline]
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, with exclusive access through `&mut self`.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr() as *mut f32, self.len) }
    }

    /// Row `i` (panics if out of range, like slice indexing; callers validate ids first).
    #[inline]
    pub fn row(&self, i: usize) -> &[f32] {
        &self.as_slice()[i * self.dim..(i + 1) * self.dim]
    }

    /// Number of rows.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Number of rows.
    pub fn rows(&self) -> usize {
        self.len.checked_div(self.dim).unwrap_or(0)
    }

    /// Bytes held (capacity excluded).
    pub fn bytes(&self) -> usize {
        self.lines.len() * 64
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_model::rng::Rng;

    fn naive(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum::<f64>() as f32
    }

    #[test]
    fn dispatched_kernels_match_naive_at_awkward_dims() {
        let mut rng = Rng::new(1);
        for dim in [1, 3, 7, 8, 9, 16, 31, 33, 64, 100] {
            let q: Vec<f32> = (0..dim).map(|_| rng.normal()).collect();
            let rows: Vec<f32> = (0..dim * 11).map(|_| rng.normal()).collect();
            let mut out = vec![0.0; 11];
            dot_rows_fn()(&q, &rows, dim, &mut out);
            for (r, &got) in out.iter().enumerate() {
                let want = naive(&q, &rows[r * dim..(r + 1) * dim]);
                assert!((got - want).abs() < 1e-4 * (1.0 + want.abs()), "dim {dim} row {r}: {got} vs {want}");
                assert!((dot(&q, &rows[r * dim..(r + 1) * dim]) - want).abs() < 1e-4 * (1.0 + want.abs()));
                assert!((dot_portable(&q, &rows[r * dim..(r + 1) * dim]) - want).abs() < 1e-4 * (1.0 + want.abs()));
            }
        }
    }

    #[test]
    fn topk_keeps_the_best_with_id_tie_break() {
        let mut t = TopK::new(3);
        for (s, id) in [(0.5, 9), (0.1, 1), (0.9, 4), (0.5, 2), (f32::NAN, 0), (0.7, 5), (0.5, 1)] {
            t.push(s, id);
        }
        let mut out = Vec::new();
        t.drain_sorted(&mut out);
        assert_eq!(out, vec![(4, 0.9), (5, 0.7), (1, 0.5)]);
        assert!(t.is_empty());
    }

    #[test]
    fn rows_are_line_aligned_and_round_trip() {
        let data: Vec<f32> = (0..64 * 5).map(|i| i as f32).collect();
        let mut r = Rows::from_flat(64, &data[..64 * 3]);
        r.extend(&data[64 * 3..]);
        assert_eq!(r.as_slice(), &data[..]);
        assert_eq!(r.rows(), 5);
        assert_eq!(r.as_slice().as_ptr() as usize % 64, 0);
        assert_eq!(r.row(4)[0], 256.0);
    }
}
