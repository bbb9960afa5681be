//! The scan kernels of the compressed index: 4-bit product-quantization "fast scan" (the scores
//! of 32 codes at a time through byte shuffles) and 8-bit scalar codes against a 16-bit query.
//!
//! With 16 codewords per sub-quantizer, a query's table of codeword scores for one
//! sub-quantizer is 16 numbers. Quantised to bytes (one scale shared by all sub-quantizers so the
//! sums stay in one unit, a bias per sub-quantizer), a table fits one 128-bit register, and a
//! byte shuffle looks up 16 codes in one instruction. A 256-bit shuffle serves two
//! sub-quantizers at once. Sums are kept in 16-bit lanes: at most 256 sub-quantizers × 255.
//!
//! Codes are stored in blocks of [`BLOCK`] vectors. For each sub-quantizer `j`, a block holds 16
//! bytes: byte `i`'s low nibble is vector `i`'s code and its high nibble vector `i + 16`'s, so
//! one load brings the codes of all 32 vectors for two sub-quantizers. The number of
//! sub-quantizers in a block is always even; an odd count is padded with a sub-quantizer whose
//! codes and table are zero.

use std::sync::OnceLock;

/// Vectors per code block.
pub const BLOCK: usize = 32;
/// Codewords per sub-quantizer (4-bit codes).
pub const CODEWORDS: usize = 16;
/// Most sub-quantizers a block may hold: their byte sums must fit 16 bits.
pub const MAX_SUBQUANTIZERS: usize = 256;

/// Scores one block: `acc[v]` = Σ_j `lut[j·16 + code_j(v)]` for the 32 vectors of `block`.
/// `block` and `lut` hold `msub × 16` bytes, `msub` even.
pub type ScanFn = fn(block: &[u8], lut: &[u8], msub: usize, acc: &mut [u16; BLOCK]);

/// The fastest block scan this CPU supports.
pub fn scan_fn() -> ScanFn {
    static F: OnceLock<ScanFn> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                return |b, l, m, acc| {
                    assert!(m % 2 == 0 && b.len() >= m * 16 && l.len() >= m * 16, "fast-scan block shape");
                    // SAFETY: AVX2 was detected, and the assert bounds every load below.
                    unsafe { scan_avx2(b, l, m, acc) }
                };
            }
        }
        scan_portable
    })
}

/// Bit `v` set when `acc[v] ≥ lim`: which of a block's vectors can enter the candidates.
pub type MaskFn = fn(acc: &[u16; BLOCK], lim: u16) -> u32;

/// The fastest threshold mask this CPU supports.
pub fn mask_fn() -> MaskFn {
    static F: OnceLock<MaskFn> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                // SAFETY: AVX2 was detected; the loads read the 64 bytes of `acc`.
                return |acc, lim| unsafe { mask_avx2(acc, lim) };
            }
        }
        mask_portable
    })
}

/// The reference threshold mask.
pub fn mask_portable(acc: &[u16; BLOCK], lim: u16) -> u32 {
    acc.iter().enumerate().fold(0u32, |m, (v, &a)| m | (u32::from(a >= lim) << v))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn mask_avx2(acc: &[u16; BLOCK], lim: u16) -> u32 {
    use std::arch::x86_64::*;
    let l = _mm256_set1_epi16(lim as i16);
    let p = acc.as_ptr() as *const __m256i;
    let (a, b) = unsafe { (_mm256_loadu_si256(p), _mm256_loadu_si256(p.add(1))) };
    // Unsigned a ≥ l exactly when max(a, l) = a.
    let ga = _mm256_cmpeq_epi16(_mm256_max_epu16(a, l), a);
    let gb = _mm256_cmpeq_epi16(_mm256_max_epu16(b, l), b);
    // Packing interleaves 128-bit lanes (a0-7, b0-7, a8-15, b8-15); the permute restores order.
    let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi16(ga, gb));
    _mm256_movemask_epi8(packed) as u32
}

/// The reference block scan, one table lookup per code.
pub fn scan_portable(block: &[u8], lut: &[u8], msub: usize, acc: &mut [u16; BLOCK]) {
    acc.fill(0);
    for (c, t) in block[..msub * 16].chunks_exact(16).zip(lut[..msub * 16].chunks_exact(16)) {
        for i in 0..16 {
            acc[i] += t[(c[i] & 15) as usize] as u16;
            acc[i + 16] += t[(c[i] >> 4) as usize] as u16;
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn scan_avx2(block: &[u8], lut: &[u8], msub: usize, acc: &mut [u16; BLOCK]) {
    use std::arch::x86_64::*;
    let nib = _mm256_set1_epi8(0x0f);
    let low_byte = _mm256_set1_epi16(0x00ff);
    // Even/odd byte lanes are summed apart so bytes widen to 16 bits without unpacking:
    // 16-bit lane e of `*_even` holds vector 2e, of `*_odd` vector 2e + 1.
    let (mut lo_even, mut lo_odd, mut hi_even, mut hi_odd) =
        (_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256());
    for p in 0..msub / 2 {
        // Lane 0: sub-quantizer 2p, lane 1: 2p + 1, for both codes and tables.
        let c = unsafe { _mm256_loadu_si256(block.as_ptr().add(p * 32) as *const __m256i) };
        let t = unsafe { _mm256_loadu_si256(lut.as_ptr().add(p * 32) as *const __m256i) };
        let a = _mm256_shuffle_epi8(t, _mm256_and_si256(c, nib));
        let b = _mm256_shuffle_epi8(t, _mm256_and_si256(_mm256_srli_epi16::<4>(c), nib));
        lo_even = _mm256_add_epi16(lo_even, _mm256_and_si256(a, low_byte));
        lo_odd = _mm256_add_epi16(lo_odd, _mm256_srli_epi16::<8>(a));
        hi_even = _mm256_add_epi16(hi_even, _mm256_and_si256(b, low_byte));
        hi_odd = _mm256_add_epi16(hi_odd, _mm256_srli_epi16::<8>(b));
    }
    let out = acc.as_mut_ptr() as *mut __m128i;
    for (half, (even, odd)) in [(lo_even, lo_odd), (hi_even, hi_odd)].into_iter().enumerate() {
        let even = _mm_add_epi16(_mm256_castsi256_si128(even), _mm256_extracti128_si256::<1>(even));
        let odd = _mm_add_epi16(_mm256_castsi256_si128(odd), _mm256_extracti128_si256::<1>(odd));
        unsafe {
            _mm_storeu_si128(out.add(2 * half), _mm_unpacklo_epi16(even, odd));
            _mm_storeu_si128(out.add(2 * half + 1), _mm_unpackhi_epi16(even, odd));
        }
    }
}

/// `out[i]` = Σ_d `codes[i·dim + d] · q[d]` for `out.len()` rows of 8-bit codes, with a query
/// quantised to 16 bits: the SQ8 scan. Sums fit `i32` for `dim` up to 256 (255 · 32767 · 256).
pub type Sq8DotsFn = fn(codes: &[u8], q: &[i16], out: &mut [i32]);

/// The fastest SQ8 scan this CPU supports.
pub fn sq8_dots_fn() -> Sq8DotsFn {
    static F: OnceLock<Sq8DotsFn> = OnceLock::new();
    *F.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") {
                return |codes, q, out| {
                    assert!(codes.len() >= out.len() * q.len(), "SQ8 scan shape");
                    // SAFETY: AVX2 was detected, and the assert bounds every load.
                    unsafe { sq8_dots_avx2(codes, q, out) }
                };
            }
        }
        sq8_dots_portable
    })
}

/// The reference SQ8 scan.
pub fn sq8_dots_portable(codes: &[u8], q: &[i16], out: &mut [i32]) {
    let dim = q.len();
    for (o, c) in out.iter_mut().zip(codes.chunks_exact(dim)) {
        *o = c.iter().zip(q).map(|(&c, &q)| c as i32 * q as i32).sum();
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn sq8_dots_avx2(codes: &[u8], q: &[i16], out: &mut [i32]) {
    use std::arch::x86_64::*;
    let dim = q.len();
    let wide = dim / 16 * 16;
    // The 16-lane sum of one row's products: 16 codes at a time widened to 16 bits,
    // multiplied by the query's lanes and summed in pairs into 32 bits.
    let row_sums = |row: *const u8| {
        let mut acc = _mm256_setzero_si256();
        let mut d = 0;
        while d < wide {
            let c = _mm256_cvtepu8_epi16(unsafe { _mm_loadu_si128(row.add(d) as *const __m128i) });
            let w = unsafe { _mm256_loadu_si256(q.as_ptr().add(d) as *const __m256i) };
            acc = _mm256_add_epi32(acc, _mm256_madd_epi16(c, w));
            d += 16;
        }
        acc
    };
    let tail = |row: *const u8| -> i32 {
        q.iter().enumerate().skip(wide).map(|(d, &w)| unsafe { *row.add(d) } as i32 * w as i32).sum()
    };
    let base = codes.as_ptr();
    let mut i = 0;
    // Four rows at a time: their eight-lane sums are reduced together with three horizontal
    // adds instead of a full reduction per row.
    while i + 4 <= out.len() {
        let a = row_sums(unsafe { base.add(i * dim) });
        let b = row_sums(unsafe { base.add((i + 1) * dim) });
        let c = row_sums(unsafe { base.add((i + 2) * dim) });
        let d = row_sums(unsafe { base.add((i + 3) * dim) });
        let s = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
        let s = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256::<1>(s));
        let mut four = [0i32; 4];
        unsafe { _mm_storeu_si128(four.as_mut_ptr() as *mut __m128i, s) };
        for (j, v) in four.iter().enumerate() {
            out[i + j] = v + tail(unsafe { base.add((i + j) * dim) });
        }
        i += 4;
    }
    while i < out.len() {
        let row = unsafe { base.add(i * dim) };
        let acc = row_sums(row);
        let s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256::<1>(acc));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b01_00_11_10>(s));
        let s = _mm_add_epi32(s, _mm_shuffle_epi32::<0b10_11_00_01>(s));
        out[i] = _mm_cvtsi128_si32(s) + tail(row);
        i += 1;
    }
}

/// Packs up to 32 vectors' codes (`codes[v · msub + j]`, each below 16) into one block of
/// `msub × 16` bytes; slots past `nvec` get code 0.
pub fn pack_block(codes: &[u8], nvec: usize, msub: usize, out: &mut [u8]) {
    debug_assert!(nvec <= BLOCK && out.len() == msub * 16);
    let code = |v: usize, j: usize| if v < nvec { codes[v * msub + j] & 15 } else { 0 };
    for (j, dst) in out.chunks_exact_mut(16).enumerate() {
        for (i, d) in dst.iter_mut().enumerate() {
            *d = code(i, j) | (code(i + 16, j) << 4);
        }
    }
}

/// The inverse of [`pack_block`] for the first `nvec` vectors.
pub fn unpack_block(block: &[u8], nvec: usize, msub: usize, codes: &mut [u8]) {
    for v in 0..nvec {
        for j in 0..msub {
            let b = block[j * 16 + v % 16];
            codes[v * msub + j] = if v < 16 { b & 15 } else { b >> 4 };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use needle_core::rng::Rng;

    #[test]
    fn sq8_scan_matches_the_reference_at_awkward_widths() {
        let mut rng = Rng::new(8);
        for dim in [1usize, 15, 16, 17, 64, 100, 256] {
            let rows = 11;
            let codes: Vec<u8> = (0..rows * dim).map(|_| rng.below(256) as u8).collect();
            let q: Vec<i16> = (0..dim).map(|_| rng.below(65535) as i32 - 32767).map(|x| x as i16).collect();
            let (mut want, mut got) = (vec![0i32; rows], vec![0i32; rows]);
            sq8_dots_portable(&codes, &q, &mut want);
            sq8_dots_fn()(&codes, &q, &mut got);
            assert_eq!(got, want, "dim {dim}");
            let direct: i64 = (0..dim).map(|d| codes[2 * dim + d] as i64 * q[d] as i64).sum();
            assert_eq!(want[2] as i64, direct);
        }
    }

    #[test]
    fn dispatched_scan_matches_the_reference_and_direct_sums() {
        let mut rng = Rng::new(5);
        for msub in [2usize, 4, 32, 64, 256] {
            let codes: Vec<u8> = (0..BLOCK * msub).map(|_| rng.below(16) as u8).collect();
            let lut: Vec<u8> = (0..msub * 16).map(|_| rng.below(256) as u8).collect();
            for nvec in [1usize, 17, 32] {
                let mut block = vec![0u8; msub * 16];
                pack_block(&codes, nvec, msub, &mut block);
                let mut back = vec![0u8; nvec * msub];
                unpack_block(&block, nvec, msub, &mut back);
                assert_eq!(back, codes[..nvec * msub]);
                let (mut want, mut got) = ([0u16; BLOCK], [0u16; BLOCK]);
                scan_portable(&block, &lut, msub, &mut want);
                scan_fn()(&block, &lut, msub, &mut got);
                assert_eq!(got, want, "msub {msub}, {nvec} vectors");
                for lim in [0u16, 1, want[5], want[17], u16::MAX] {
                    assert_eq!(mask_fn()(&want, lim), mask_portable(&want, lim), "lim {lim}");
                    assert_eq!(
                        mask_portable(&want, lim).count_ones() as usize,
                        want.iter().filter(|&&a| a >= lim).count()
                    );
                }
                for (v, &w) in want.iter().enumerate() {
                    let direct: u32 = (0..msub)
                        .map(|j| if v < nvec { lut[j * 16 + codes[v * msub + j] as usize] } else { lut[j * 16] } as u32)
                        .sum();
                    assert_eq!(w as u32, direct, "vector {v}, msub {msub}");
                }
            }
        }
    }
}
