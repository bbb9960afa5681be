//! What the indexes share beyond `needle-core`'s kernels: a 64-byte aligned vector store. The
//! dot kernels, the matrix product and the top-K heap are `needle-core`'s, re-exported here.

pub use needle_core::dot::{dot, dot_fn, dot_portable, dot_rows_fn, prefetch, DotFn, DotRowsFn};
pub use needle_core::gemm::gemm_nt;
pub use needle_core::topk::TopK;

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
