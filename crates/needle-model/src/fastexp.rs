//! `exp` over whole rows of logits, vectorised.
//!
//! A full-softmax step takes one exponential per (position, item) pair: at ML-1M scale that is
//! tens of millions per step, and libm's scalar `expf` stops the compiler from vectorising the
//! loop. This polynomial form (range reduction by powers of two, a degree-6 polynomial on
//! `[−ln2/2, ln2/2]`, relative error about 2e-7) vectorises, and with AVX2+FMA, chosen at run
//! time, does eight lanes per instruction.

use std::sync::OnceLock;

/// `v[i] = exp(v[i] − shift)` for every value; returns their sum. `−∞` (a masked logit) gives 0.
pub fn exp_shifted_sum(v: &mut [f32], shift: f32) -> f32 {
    static K: OnceLock<fn(&mut [f32], f32) -> f32> = OnceLock::new();
    let k = K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                return |v, s| {
                    // SAFETY: the CPU has AVX2 and FMA (checked just above).
                    unsafe { exp_shifted_sum_avx2(v, s) }
                };
            }
        }
        exp_shifted_sum_portable
    });
    k(v, shift)
}

/// Eight lanes at a time with the same range reduction and polynomial as [`exp_approx`].
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn exp_shifted_sum_avx2(v: &mut [f32], shift: f32) -> f32 {
    use std::arch::x86_64::*;
    let full = v.len() / 8 * 8;
    let sh = _mm256_set1_ps(shift);
    let lo = _mm256_set1_ps(-87.0);
    let hi = _mm256_set1_ps(88.0);
    let log2e = _mm256_set1_ps(std::f32::consts::LOG2_E);
    let ln2_hi = _mm256_set1_ps(LN2_HI);
    let ln2_lo = _mm256_set1_ps(LN2_LO);
    let one = _mm256_set1_ps(1.0);
    let coef = [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5].map(|c: f32| _mm256_set1_ps(c));
    let mut acc = _mm256_setzero_ps();
    let ptr = v.as_mut_ptr();
    let mut i = 0;
    while i < full {
        // SAFETY: i + 8 <= full <= v.len().
        let x = _mm256_sub_ps(unsafe { _mm256_loadu_ps(ptr.add(i)) }, sh);
        let xc = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
        let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(xc, log2e));
        let r = _mm256_fnmadd_ps(n, ln2_lo, _mm256_fnmadd_ps(n, ln2_hi, xc));
        let mut p = coef[0];
        for c in &coef[1..] {
            p = _mm256_fmadd_ps(p, r, *c);
        }
        p = _mm256_fmadd_ps(_mm256_fmadd_ps(p, r, one), r, one);
        let bits = _mm256_slli_epi32::<23>(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)));
        // Below −87 (and −∞, a masked logit) the result is 0.
        let keep = _mm256_cmp_ps::<_CMP_GE_OQ>(x, lo);
        let e = _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
        // SAFETY: as for the load.
        unsafe { _mm256_storeu_ps(ptr.add(i), e) };
        acc = _mm256_add_ps(acc, e);
        i += 8;
    }
    let mut lanes = [0.0f32; 8];
    // SAFETY: `lanes` holds eight floats.
    unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), acc) };
    let mut sum: f32 = lanes.iter().sum();
    for x in &mut v[full..] {
        *x = exp_approx(*x - shift);
        sum += *x;
    }
    sum
}

#[inline(always)]
fn exp_shifted_sum_portable(v: &mut [f32], shift: f32) -> f32 {
    let mut acc = [0.0f32; 8];
    let mut chunks = v.chunks_exact_mut(8);
    for c in &mut chunks {
        for j in 0..8 {
            let e = exp_approx(c[j] - shift);
            c[j] = e;
            acc[j] += e;
        }
    }
    let mut sum = 0.0f32;
    for x in chunks.into_remainder() {
        *x = exp_approx(*x - shift);
        sum += *x;
    }
    sum + acc.iter().sum::<f32>()
}

/// ln 2 split in two, so that `n·LN2_HI` is exact for the `n` that occur.
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `e^x`, flushed to 0 below `−87` (where `f32` has no normal result).
#[inline(always)]
pub fn exp_approx(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    // Round to nearest by adding and subtracting 1.5·2²³ (f32::round has no vector instruction).
    const ROUND: f32 = 12_582_912.0;
    let xc = x.clamp(-87.0, 88.0);
    let n = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - n * LN2_HI - n * LN2_LO;
    // Taylor coefficients to r⁶ / 6!.
    let p = 1.0 + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((n as i32 + 127) as u32) << 23);
    if x < -87.0 {
        0.0
    } else {
        p * scale
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_libm_within_a_few_ulp_and_masks_to_zero() {
        let mut worst = 0.0f32;
        let mut x = -80.0f32;
        while x < 80.0 {
            let (got, want) = (exp_approx(x), x.exp());
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        // A short row (one block of eight and a remainder) and a long one, both through the
        // eight-lane kernel where the CPU has one; each holds a masked −∞.
        let short = vec![0.0, -1.0, f32::NEG_INFINITY, 2.0, -100.0, 0.5, 0.25, 1.0, -3.0, 4.0];
        let mut long: Vec<f32> = (0..1003).map(|i| (i as f32 * 0.37).sin() * 30.0).collect();
        long[17] = f32::NEG_INFINITY;
        for (mut v, shift, masked, sum_tol) in [(short, 4.0f32, 2, 2e-6f32), (long, 5.0, 17, 1e-5)] {
            let want: Vec<f32> = v.iter().map(|x| (x - shift).exp()).collect();
            let sum = exp_shifted_sum(&mut v, shift);
            for (g, w) in v.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-6 * w.max(1e-30), "{g} vs {w}");
            }
            assert_eq!(v[masked], 0.0);
            let total: f32 = want.iter().sum();
            assert!((sum - total).abs() <= sum_tol * total, "{sum} vs {total}");
        }
    }
}
