//! Seeded Lloyd k-means, the coarse quantizer of the IVF index.
//!
//! Assignment is the expensive step (points × centroids × dim multiply-adds), so it runs as
//! blocked GEMMs spread over threads: the nearest centroid in L2 is the one maximising
//! `x·c − ‖c‖²/2`, a matrix product plus a bias. Training uses a sample of at most
//! [`MAX_POINTS_PER_CENTROID`] points per centroid, as Faiss does: more points barely move the
//! centroids but multiply the build time.

use crate::kernels::gemm_nt;
use needle_core::rng::Rng;
use rayon::prelude::*;

/// Training points per centroid; 64 keeps a 1M-vector, 4,000-list build to seconds per
/// iteration while leaving every centroid far more points than the ~40 Faiss warns below.
pub const MAX_POINTS_PER_CENTROID: usize = 64;
/// Points per assignment block: 256 × k scores stay within a few MB per thread.
const ASSIGN_BLOCK: usize = 256;

/// For each row of `data`, the index of the L2-nearest of `centroids` (both `dim` wide).
pub fn assign_nearest(data: &[f32], dim: usize, centroids: &[f32]) -> Vec<u32> {
    let k = centroids.len() / dim;
    let n = data.len() / dim;
    let mut out = vec![0u32; n];
    if k == 0 || n == 0 {
        return out;
    }
    let half_norms: Vec<f32> =
        centroids.chunks_exact(dim).map(|c| 0.5 * c.iter().map(|x| x * x).sum::<f32>()).collect();
    data.par_chunks(ASSIGN_BLOCK * dim).zip(out.par_chunks_mut(ASSIGN_BLOCK)).for_each_init(
        || vec![0.0f32; ASSIGN_BLOCK * k],
        |scores, (block, assign)| {
            let bn = block.len() / dim;
            gemm_nt(bn, k, dim, block, centroids, scores);
            for (a, row) in assign.iter_mut().zip(scores.chunks_exact(k)) {
                let mut best = 0usize;
                let mut best_s = f32::NEG_INFINITY;
                for (c, (&s, &h)) in row.iter().zip(&half_norms).enumerate() {
                    let v = s - h;
                    if v > best_s {
                        best_s = v;
                        best = c;
                    }
                }
                *a = best as u32;
            }
        },
    );
    out
}

/// `k` centroids (`k × dim`, row-major) of `data` after `iters` Lloyd iterations.
///
/// Starts from `k` distinct sample points chosen by `seed`, so the same data and seed give the
/// same centroids. A centroid left without points is re-seeded by splitting a populated one
/// (Faiss's rule), so every centroid ends up with points when there are at least `k` distinct
/// ones. `k` is clamped to the number of points.
pub fn kmeans(data: &[f32], dim: usize, k: usize, iters: usize, seed: u64) -> Vec<f32> {
    let n = data.len().checked_div(dim).unwrap_or(0);
    let k = k.min(n);
    if k == 0 {
        return Vec::new();
    }
    let mut rng = Rng::new(seed);
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    let sample_n = n.min(k * MAX_POINTS_PER_CENTROID);
    let sample: Vec<f32> = if sample_n == n {
        data[..n * dim].to_vec()
    } else {
        order[..sample_n].iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect()
    };
    // The first k sampled points seed the centroids (the sample is already in shuffled order
    // when subsampled; otherwise take the shuffled order directly).
    let mut centroids: Vec<f32> = if sample_n == n {
        order[..k].iter().flat_map(|&i| data[i * dim..(i + 1) * dim].iter().copied()).collect()
    } else {
        sample[..k * dim].to_vec()
    };
    let mut sums = vec![0.0f64; k * dim];
    let mut counts = vec![0usize; k];
    for _ in 0..iters {
        let assign = assign_nearest(&sample, dim, &centroids);
        sums.iter_mut().for_each(|s| *s = 0.0);
        counts.iter_mut().for_each(|c| *c = 0);
        for (row, &a) in sample.chunks_exact(dim).zip(&assign) {
            let a = a as usize;
            counts[a] += 1;
            for (s, &x) in sums[a * dim..(a + 1) * dim].iter_mut().zip(row) {
                *s += x as f64;
            }
        }
        for c in 0..k {
            if counts[c] > 0 {
                let inv = 1.0 / counts[c] as f64;
                for (dst, &s) in centroids[c * dim..(c + 1) * dim].iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                    *dst = (s * inv) as f32;
                }
            }
        }
        split_empty(&mut centroids, &mut counts, &assign, dim, &mut rng);
    }
    centroids
}

/// Re-seeds empty centroids next to populated ones: pick a cluster with probability
/// proportional to its size (through a random point's cluster), nudge a copy of its centroid
/// one way and the original the other, and let the next iteration share its points.
fn split_empty(centroids: &mut [f32], counts: &mut [usize], assign: &[u32], dim: usize, rng: &mut Rng) {
    const EPS: f32 = 1.0 / 1024.0;
    let k = counts.len();
    let n = assign.len();
    if n <= k {
        return;
    }
    for c in 0..k {
        if counts[c] > 0 {
            continue;
        }
        let mut j = assign[rng.below(n)] as usize;
        let mut tries = 0;
        while counts[j] <= 1 && tries < 64 {
            j = assign[rng.below(n)] as usize;
            tries += 1;
        }
        if counts[j] <= 1 {
            continue;
        }
        for d in 0..dim {
            let v = centroids[j * dim + d];
            let sign = if d % 2 == 0 { 1.0 } else { -1.0 };
            centroids[c * dim + d] = v * (1.0 + sign * EPS);
            centroids[j * dim + d] = v * (1.0 - sign * EPS);
        }
        counts[c] = counts[j] / 2;
        counts[j] -= counts[c];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_well_separated_blobs_and_repeats_with_the_seed() {
        // Four tight blobs around distinct corners; k-means must put one centroid on each.
        let dim = 8;
        let mut rng = Rng::new(5);
        let centres: Vec<Vec<f32>> =
            (0..4).map(|c| (0..dim).map(|d| if d == c { 10.0 } else { 0.0 }).collect()).collect();
        let mut data = Vec::new();
        for i in 0..400 {
            for &x in &centres[i % 4] {
                data.push(x + 0.1 * rng.normal());
            }
        }
        let c1 = kmeans(&data, dim, 4, 10, 9);
        assert_eq!(c1, kmeans(&data, dim, 4, 10, 9));
        for centre in &centres {
            let best = c1
                .chunks_exact(dim)
                .map(|c| c.iter().zip(centre).map(|(a, b)| (a - b) * (a - b)).sum::<f32>())
                .fold(f32::INFINITY, f32::min);
            assert!(best < 0.1, "no centroid near {centre:?}: {best}");
        }
        let assign = assign_nearest(&data, dim, &c1);
        for i in 0..4 {
            assert!(assign.iter().skip(i).step_by(4).all(|&a| a == assign[i]), "blob {i} split");
        }
    }

    #[test]
    fn duplicate_points_leave_no_centroid_empty_when_avoidable() {
        // 3 distinct points repeated; asking for 5 centroids clamps nothing but must not panic,
        // and every returned value stays finite.
        let data: Vec<f32> = (0..60).flat_map(|i| [(i % 3) as f32, 1.0]).collect();
        let c = kmeans(&data, 2, 5, 5, 1);
        assert_eq!(c.len(), 10);
        assert!(c.iter().all(|x| x.is_finite()));
        assert!(kmeans(&data[..4], 2, 5, 3, 1).len() == 4, "k is clamped to the point count");
    }
}
