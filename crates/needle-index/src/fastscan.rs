//! 4-bit product-quantization "fast scan": the scores of 32 codes at a time through byte
//! shuffles.
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
    use needle_model::rng::Rng;

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
