//! A multi-layer perceptron: linear layers with ReLU between them and a linear last layer.

use crate::layers::{linear_backward, linear_forward, relu_backward, relu_forward};
use crate::rng::Rng;
use crate::tower::{Dropout, NamedTensor};
use rayon::prelude::*;

/// One fully connected layer, `w` stored `[in × out]`.
#[derive(Clone, Debug)]
pub struct Dense {
    pub inp: usize,
    pub out: usize,
    pub w: Vec<f32>,
    pub b: Vec<f32>,
}

#[derive(Clone, Debug)]
pub struct Mlp {
    pub layers: Vec<Dense>,
}

/// Activations kept for the backward pass.
#[derive(Default)]
pub struct MlpActs {
    zs: Vec<Vec<f32>>,
    dz: Vec<f32>,
    dz_prev: Vec<f32>,
    /// The input after dropout, when input dropout is on.
    x_drop: Vec<f32>,
    /// Per layer input (0 = the MLP's input, i = hidden layer i's output): the kept units'
    /// scale `1 / keep`, 0 for dropped ones; empty when that layer has no dropout.
    masks: Vec<Vec<f32>>,
}

/// Fills `mask` with `1/keep` or 0 for `len` units, from a counter-based hash of the seed, the
/// layer and the unit, so that a mask never depends on how a batch is split across threads.
pub(crate) fn fill_mask(mask: &mut Vec<f32>, len: usize, rate: f32, seed: u64, layer: u64) {
    let keep = 1.0 - rate;
    let threshold = (f64::from(keep) * (1u64 << 32) as f64) as u64;
    let base = seed ^ layer.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    mask.resize(len, 0.0);
    // Each unit's value depends on its index alone, so the chunks can be filled in any order.
    mask.par_chunks_mut(MASK_CHUNK).enumerate().for_each(|(c, chunk)| {
        let i0 = (c * MASK_CHUNK) as u64;
        for (i, m) in (i0..).zip(chunk.iter_mut()) {
            let mut z = base ^ i.wrapping_mul(0xD1B5_4A32_D192_ED03);
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            *m = if (z >> 32) < threshold { 1.0 / keep } else { 0.0 };
        }
    });
}

/// Units per parallel task of [`fill_mask`].
const MASK_CHUNK: usize = 1 << 14;

impl Mlp {
    /// Layers `input → widths[0] → … → widths[last]`, He-uniform weights, zero biases.
    pub fn new(input: usize, widths: &[usize], rng: &mut Rng) -> Self {
        let mut layers = Vec::with_capacity(widths.len());
        let mut i = input;
        for &o in widths {
            let a = (6.0 / i as f32).sqrt();
            layers.push(Dense {
                inp: i,
                out: o,
                w: (0..i * o).map(|_| (rng.uniform() * 2.0 - 1.0) * a).collect(),
                b: vec![0.0; o],
            });
            i = o;
        }
        Mlp { layers }
    }

    pub fn out_dim(&self) -> usize {
        self.layers.last().map_or(0, |l| l.out)
    }

    /// Sizes of the dense tensors, `[w0, b0, w1, b1, …]`.
    pub fn dense_sizes(&self) -> Vec<usize> {
        self.layers.iter().flat_map(|l| [l.w.len(), l.b.len()]).collect()
    }

    pub fn dense_mut(&mut self) -> impl Iterator<Item = &mut Vec<f32>> {
        self.layers.iter_mut().flat_map(|l| [&mut l.w, &mut l.b])
    }

    pub fn tensors<'a>(&'a self, prefix: &str) -> Vec<NamedTensor<'a>> {
        let mut t = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            t.push((format!("{prefix}.{i}.weight"), vec![l.inp, l.out], &l.w[..]));
            t.push((format!("{prefix}.{i}.bias"), vec![l.out], &l.b[..]));
        }
        t
    }

    /// Forward pass over `n` rows of `x`; returns the last layer's output `[n × out]`.
    pub fn forward<'a>(&self, x: &[f32], n: usize, acts: &'a mut MlpActs) -> &'a [f32] {
        self.forward_with(x, n, acts, Dropout::default())
    }

    /// [`Mlp::forward`] with dropout on the input and after every hidden ReLU (training only).
    pub fn forward_with<'a>(&self, x: &[f32], n: usize, acts: &'a mut MlpActs, drop: Dropout) -> &'a [f32] {
        let layers = self.layers.len();
        acts.zs.resize_with(layers, Vec::new);
        acts.masks.resize_with(layers, Vec::new);
        let first_in = self.layers.first().map_or(0, |l| l.inp);
        if drop.input > 0.0 {
            fill_mask(&mut acts.masks[0], n * first_in, drop.input, drop.seed, 0);
            acts.x_drop.clear();
            acts.x_drop.extend(x[..n * first_in].iter().zip(&acts.masks[0]).map(|(a, m)| a * m));
        } else {
            acts.masks[0].clear();
        }
        for (li, layer) in self.layers.iter().enumerate() {
            let (prev, rest) = acts.zs.split_at_mut(li);
            let input = match li {
                0 if drop.input > 0.0 => &acts.x_drop[..],
                0 => x,
                _ => &prev[li - 1],
            };
            let z = &mut rest[0];
            z.resize(n * layer.out, 0.0);
            linear_forward(z, input, &layer.w, &layer.b, n, layer.inp, layer.out);
            if li + 1 < layers {
                relu_forward(z);
                let mask = &mut acts.masks[li + 1];
                if drop.hidden > 0.0 {
                    fill_mask(mask, z.len(), drop.hidden, drop.seed, li as u64 + 1);
                    z.iter_mut().zip(mask.iter()).for_each(|(a, m)| *a *= m);
                } else {
                    mask.clear();
                }
            }
        }
        // Every MLP has at least its output layer.
        acts.zs.last().map_or(&[], |z| &z[..])
    }

    /// Backward pass: accumulates into `grads` (`[w0, b0, …]`) and returns `dL/dx`.
    pub fn backward<'a>(
        &self,
        x: &[f32],
        n: usize,
        acts: &'a mut MlpActs,
        dout: &[f32],
        grads: &mut [Vec<f32>],
    ) -> &'a [f32] {
        acts.dz.clear();
        acts.dz.extend_from_slice(&dout[..n * self.out_dim()]);
        for li in (0..self.layers.len()).rev() {
            let layer = &self.layers[li];
            let input = match li {
                0 if !acts.masks[0].is_empty() => &acts.x_drop[..],
                0 => x,
                _ => &acts.zs[li - 1],
            };
            acts.dz_prev.resize(n * layer.inp, 0.0);
            let (gw, rest) = grads[2 * li..].split_at_mut(1);
            linear_backward(
                Some(&mut acts.dz_prev),
                &mut gw[0],
                &mut rest[0],
                &acts.dz,
                input,
                &layer.w,
                n,
                layer.inp,
                layer.out,
            );
            let mask = &acts.masks[li];
            if !mask.is_empty() {
                acts.dz_prev.iter_mut().zip(mask).for_each(|(g, m)| *g *= m);
            }
            if li > 0 {
                // A dropped unit's output is 0, so the ReLU test also stops its gradient.
                relu_backward(&mut acts.dz_prev, &acts.zs[li - 1]);
            }
            std::mem::swap(&mut acts.dz, &mut acts.dz_prev);
        }
        &acts.dz
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropout_masks_drop_their_share_and_keep_the_mean() {
        let mut mask = Vec::new();
        fill_mask(&mut mask, 100_000, 0.3, 7, 1);
        let dropped = mask.iter().filter(|&&m| m == 0.0).count() as f64 / mask.len() as f64;
        assert!((dropped - 0.3).abs() < 0.01, "dropped {dropped}");
        let mean = mask.iter().map(|&m| f64::from(m)).sum::<f64>() / mask.len() as f64;
        assert!((mean - 1.0).abs() < 0.02, "mean scale {mean}");
        let mut other = Vec::new();
        fill_mask(&mut other, 100_000, 0.3, 7, 2);
        assert!(mask != other, "layers must get different masks");
        fill_mask(&mut other, 100_000, 0.3, 7, 1);
        assert!(mask == other, "a mask is a function of seed, layer and unit");
    }
}
