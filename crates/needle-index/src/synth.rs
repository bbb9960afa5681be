//! A documented generator of clustered unit vectors, so benchmarks and tests need no data files
//! and anyone can regenerate exactly the same set from its parameters.

use needle_core::rng::Rng;

/// `n` unit vectors of dimension `dim` (row-major), drawn around `clusters` random centres.
///
/// Centres are uniform on the unit sphere (normalised Gaussians). Each vector picks a centre
/// uniformly at random, adds Gaussian noise of standard deviation `spread / √dim` per coordinate
/// (so the noise has norm ≈ `spread`), and is normalised. With `spread = 1` a vector sits about
/// 45° from its centre: clusters are visible but overlap in score, as trained item embeddings
/// do. `clusters = 0` gives vectors uniform on the sphere (no structure at all).
///
/// Rows are independent given the centres, so generating `n + q` rows and splitting off the last
/// `q` as queries gives queries from the same distribution as the items.
pub fn synthetic_clustered(n: usize, dim: usize, clusters: usize, spread: f32, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let centres = centres(&mut rng, clusters, dim);
    let sigma = noise_sigma(clusters, dim, spread);
    let mut out = vec![0.0f32; n * dim];
    for v in out.chunks_exact_mut(dim.max(1)) {
        draw(&mut rng, &centres, sigma, v);
    }
    out
}

/// `clusters` centres uniform on the unit sphere (normalised Gaussians), row-major.
pub(crate) fn centres(rng: &mut Rng, clusters: usize, dim: usize) -> Vec<f32> {
    let mut centres = vec![0.0f32; clusters * dim];
    for c in centres.chunks_exact_mut(dim.max(1)) {
        c.iter_mut().for_each(|x| *x = rng.normal());
        unit(c);
    }
    centres
}

/// Per-coordinate noise for a noise norm of about `spread`; 1 when there are no centres.
pub(crate) fn noise_sigma(clusters: usize, dim: usize, spread: f32) -> f32 {
    if clusters == 0 {
        1.0
    } else {
        spread / (dim.max(1) as f32).sqrt()
    }
}

/// One vector into `v`: a centre picked by `rng` plus Gaussian noise of `sigma` per coordinate
/// (a plain Gaussian when there are no centres), normalised.
pub(crate) fn draw(rng: &mut Rng, centres: &[f32], sigma: f32, v: &mut [f32]) {
    let dim = v.len();
    let clusters = centres.len().checked_div(dim).unwrap_or(0);
    if clusters == 0 {
        v.iter_mut().for_each(|x| *x = rng.normal());
    } else {
        let c = rng.below(clusters);
        for (x, &m) in v.iter_mut().zip(&centres[c * dim..(c + 1) * dim]) {
            *x = m + sigma * rng.normal();
        }
    }
    unit(v);
}

fn unit(v: &mut [f32]) {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unit_norm_repeatable_and_clustered() {
        let a = synthetic_clustered(2000, 16, 10, 0.5, 3);
        assert_eq!(a, synthetic_clustered(2000, 16, 10, 0.5, 3));
        assert_ne!(a, synthetic_clustered(2000, 16, 10, 0.5, 4));
        for v in a.chunks_exact(16) {
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        // Clustered vectors have much closer nearest neighbours than uniform ones.
        let mean_nn_cos = |d: &[f32]| {
            let rows: Vec<&[f32]> = d.chunks_exact(16).collect();
            let mut s = 0.0;
            for i in 0..100 {
                let best = (0..rows.len())
                    .filter(|&j| j != i)
                    .map(|j| rows[i].iter().zip(rows[j]).map(|(x, y)| x * y).sum::<f32>())
                    .fold(f32::NEG_INFINITY, f32::max);
                s += best;
            }
            s / 100.0
        };
        let uniform = synthetic_clustered(2000, 16, 0, 0.5, 3);
        let (c, u) = (mean_nn_cos(&a), mean_nn_cos(&uniform));
        assert!(c > 0.9 && u < 0.8, "nearest-neighbour cosine: clustered {c}, uniform {u}");
    }
}
