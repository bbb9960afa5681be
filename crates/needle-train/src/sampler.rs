//! Popularity-based negative sampling with Walker's alias method: O(1) per draw.

use needle_model::rng::Rng;

/// Draws item rows with probability proportional to `weight`; also reports `ln Q(row)` for
/// the log-Q correction of the sampled softmax.
#[derive(Clone, Debug)]
pub struct AliasSampler {
    prob: Vec<f32>,
    alias: Vec<u32>,
    log_q: Vec<f32>,
}

impl AliasSampler {
    /// `weights[r]` ≥ 0; rows of weight 0 are never drawn. Returns None if every weight is 0.
    pub fn new(weights: &[f64]) -> Option<Self> {
        let n = weights.len();
        let total: f64 = weights.iter().sum();
        if n == 0 || total <= 0.0 || !total.is_finite() {
            return None;
        }
        let mut scaled: Vec<f64> = weights.iter().map(|w| w * n as f64 / total).collect();
        let log_q =
            weights.iter().map(|w| if *w > 0.0 { (w / total).ln() as f32 } else { f32::NEG_INFINITY }).collect();
        let (mut small, mut large): (Vec<usize>, Vec<usize>) = (0..n).partition(|&i| scaled[i] < 1.0);
        let mut prob = vec![1.0f32; n];
        let mut alias: Vec<u32> = (0..n as u32).collect();
        while let (Some(s), Some(&l)) = (small.pop(), large.last()) {
            prob[s] = scaled[s] as f32;
            alias[s] = l as u32;
            scaled[l] -= 1.0 - scaled[s];
            if scaled[l] < 1.0 {
                large.pop();
                small.push(l);
            }
        }
        // Leftovers are 1 up to rounding, except zero-weight rows that must never be drawn.
        for (i, &w) in weights.iter().enumerate() {
            if w <= 0.0 && alias[i] == i as u32 {
                prob[i] = 0.0;
                alias[i] = weights.iter().position(|&x| x > 0.0).unwrap_or(0) as u32;
            }
        }
        Some(AliasSampler { prob, alias, log_q })
    }

    #[inline]
    pub fn sample(&self, rng: &mut Rng) -> u32 {
        let i = rng.below(self.prob.len());
        if rng.uniform() < self.prob[i] {
            i as u32
        } else {
            self.alias[i]
        }
    }

    /// `ln Q(row)`.
    #[inline]
    pub fn log_q(&self, row: u32) -> f32 {
        self.log_q[row as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frequencies_follow_the_weights() {
        let w = [0.0, 1.0, 3.0, 0.0, 6.0];
        let s = AliasSampler::new(&w).unwrap();
        let mut rng = Rng::new(1);
        let mut c = [0usize; 5];
        for _ in 0..100_000 {
            c[s.sample(&mut rng) as usize] += 1;
        }
        assert_eq!(c[0] + c[3], 0, "{c:?}");
        for (i, &wi) in w.iter().enumerate() {
            let f = c[i] as f64 / 100_000.0;
            assert!((f - wi / 10.0).abs() < 0.01, "row {i}: {f}");
        }
        assert!((s.log_q(4) - (0.6f32).ln()).abs() < 1e-6);
        assert!(AliasSampler::new(&[0.0, 0.0]).is_none());
    }
}
