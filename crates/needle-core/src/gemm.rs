//! Row-major single-precision matrix products, split over threads along the output rows.
//!
//! Every product in the engine goes through [`matmul`]. Splitting only along the rows of the
//! output keeps each output element computed by exactly one call with one summation order, so a
//! run is reproducible for a fixed thread count.

use rayon::prelude::*;

/// How an operand is laid out in memory relative to its logical shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// Stored as the logical matrix, row-major.
    Normal,
    /// Stored as the transpose of the logical matrix, row-major.
    Transposed,
}

/// Below this many multiply-adds a product runs on the calling thread: forking costs more.
const PARALLEL_MIN_MACS: usize = 1 << 18;

/// `C[m×n] = A[m×k] · B[k×n] (+ C if accumulate)`, all row-major in their stored layout.
///
/// `a` holds `m·k` values (stored `[m×k]` or, when transposed, `[k×m]`); `b` holds `k·n` values
/// (stored `[k×n]` or `[n×k]`); `c` holds `m·n` values.
#[allow(clippy::too_many_arguments)]
pub fn matmul(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    la: Layout,
    b: &[f32],
    lb: Layout,
    c: &mut [f32],
    accumulate: bool,
) {
    assert!(a.len() >= m * k && b.len() >= k * n && c.len() >= m * n, "matmul shape mismatch");
    if m == 0 || n == 0 {
        return;
    }
    let (rsa, csa) = match la {
        Layout::Normal => (k as isize, 1),
        Layout::Transposed => (1, m as isize),
    };
    let (rsb, csb) = match lb {
        Layout::Normal => (n as isize, 1),
        Layout::Transposed => (1, k as isize),
    };
    let beta = if accumulate { 1.0 } else { 0.0 };
    let threads = rayon::current_num_threads();
    if m * k * n < PARALLEL_MIN_MACS || threads == 1 || m < 2 * 4 {
        // SAFETY: the asserts above bound every index the strides can reach.
        unsafe {
            matrixmultiply::sgemm(
                m,
                k,
                n,
                1.0,
                a.as_ptr(),
                rsa,
                csa,
                b.as_ptr(),
                rsb,
                csb,
                beta,
                c.as_mut_ptr(),
                n as isize,
                1,
            );
        }
        return;
    }
    // Round chunk rows to a multiple of 8 so micro-kernel panels stay whole.
    let rows = m.div_ceil(threads).div_ceil(8) * 8;
    let a_addr = a.as_ptr() as usize;
    let b_addr = b.as_ptr() as usize;
    c[..m * n].par_chunks_mut(rows * n).enumerate().for_each(|(ci, chunk)| {
        let r0 = ci * rows;
        let mr = chunk.len() / n;
        let a_off = match la {
            Layout::Normal => r0 * k,
            Layout::Transposed => r0,
        };
        // SAFETY: rows r0..r0+mr of A lie inside `a` (checked above); B is shared read-only;
        // each chunk of C is written by one task only.
        unsafe {
            let a_ptr = (a_addr as *const f32).add(a_off);
            matrixmultiply::sgemm(
                mr,
                k,
                n,
                1.0,
                a_ptr,
                rsa,
                csa,
                b_addr as *const f32,
                rsb,
                csb,
                beta,
                chunk.as_mut_ptr(),
                n as isize,
                1,
            );
        }
    });
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

/// `C = alpha · A·B (+ C when beta = 1)` over strided views, on the calling thread (the
/// attention kernels run one task per sequence).
///
/// # Safety
/// Every element the strides reach in `a` (`m × k`), `b` (`k × n`) and `c` (`m × n`) must lie
/// inside its allocation, and `c` must not overlap `a` or `b`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_strided(
    m: usize,
    k: usize,
    n: usize,
    alpha: f32,
    a: *const f32,
    rsa: usize,
    csa: usize,
    b: *const f32,
    rsb: usize,
    csb: usize,
    beta: f32,
    c: *mut f32,
    rsc: usize,
) {
    // SAFETY: the caller guarantees every strided view lies inside its buffer.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            alpha,
            a,
            rsa as isize,
            csa as isize,
            b,
            rsb as isize,
            csb as isize,
            beta,
            c,
            rsc as isize,
            1,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(m: usize, k: usize, n: usize, a: &[f32], la: Layout, b: &[f32], lb: Layout) -> Vec<f32> {
        let mut c = vec![0.0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let mut s = 0.0f64;
                for p in 0..k {
                    let av = if la == Layout::Normal { a[i * k + p] } else { a[p * m + i] };
                    let bv = if lb == Layout::Normal { b[p * n + j] } else { b[j * k + p] };
                    s += av as f64 * bv as f64;
                }
                c[i * n + j] = s as f32;
            }
        }
        c
    }

    #[test]
    fn matches_naive_in_every_layout_and_size() {
        let mut rng = crate::rng::Rng::new(7);
        for &(m, k, n) in &[(1, 1, 1), (3, 5, 2), (70, 33, 41), (300, 64, 120)] {
            let a: Vec<f32> = (0..m * k).map(|_| rng.normal()).collect();
            let b: Vec<f32> = (0..k * n).map(|_| rng.normal()).collect();
            for la in [Layout::Normal, Layout::Transposed] {
                for lb in [Layout::Normal, Layout::Transposed] {
                    let want = naive(m, k, n, &a, la, &b, lb);
                    let mut got = vec![1.0f32; m * n];
                    matmul(m, k, n, &a, la, &b, lb, &mut got, true);
                    for (g, w) in got.iter().zip(&want) {
                        assert!((g - 1.0 - w).abs() < 1e-3 * (1.0 + w.abs()), "{m}x{k}x{n}: {g} vs {w}");
                    }
                }
            }
        }
    }
}
