//! Inner products: one query against one row, or against many consecutive rows.
//!
//! [`dot`] is the canonical score of a (query, item) pair: exact searches may select candidates
//! with faster kernels (the four-rows-at-once kernel, a matrix product), but the scores they
//! report, and so the order of near-ties, come from [`dot`]. Its summation order is fixed for a
//! given CPU, so the same pair scores the same bits in evaluation, in an index and in a server.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

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
}
