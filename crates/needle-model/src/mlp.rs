//! A multi-layer perceptron: linear layers with ReLU between them and a linear last layer.

use crate::layers::{linear_backward, linear_forward, relu_backward, relu_forward};
use crate::rng::Rng;

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
}

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

    pub fn tensors<'a>(&'a self, prefix: &str) -> Vec<crate::tower::NamedTensor<'a>> {
        let mut t = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            t.push((format!("{prefix}.{i}.weight"), vec![l.inp, l.out], &l.w[..]));
            t.push((format!("{prefix}.{i}.bias"), vec![l.out], &l.b[..]));
        }
        t
    }

    /// Forward pass over `n` rows of `x`; returns the last layer's output `[n × out]`.
    pub fn forward<'a>(&self, x: &[f32], n: usize, acts: &'a mut MlpActs) -> &'a [f32] {
        acts.zs.resize_with(self.layers.len(), Vec::new);
        for (li, layer) in self.layers.iter().enumerate() {
            let (prev, rest) = acts.zs.split_at_mut(li);
            let input = if li == 0 { x } else { &prev[li - 1] };
            let z = &mut rest[0];
            z.resize(n * layer.out, 0.0);
            linear_forward(z, input, &layer.w, &layer.b, n, layer.inp, layer.out);
            if li + 1 < self.layers.len() {
                relu_forward(z);
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
            let input = if li == 0 { x } else { &acts.zs[li - 1] };
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
            if li > 0 {
                relu_backward(&mut acts.dz_prev, &acts.zs[li - 1]);
            }
            std::mem::swap(&mut acts.dz, &mut acts.dz_prev);
        }
        &acts.dz
    }
}
