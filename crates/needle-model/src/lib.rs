//! needle's model engine: two-tower layers as explicit forward/backward passes over contiguous
//! f32 buffers, with embedding tables kept outside the dense graph.
//!
//! Every layer is a pair of functions, `*_forward` and `*_backward`, over flat row-major
//! buffers; matrix products go through [`gemm::matmul`]. Models implement [`tower::Tower`].
//! Tests check every backward pass against finite differences.

pub mod checkpoint;
pub mod deep;
pub mod embedding;
pub mod fastexp;
pub mod fm;
pub mod layers;
pub mod mind;
pub mod mlp;
pub mod neighbors;
pub mod seq;
pub mod tower;

/// The generator and matrix product live in `needle-core`, shared with indexing and evaluation.
pub use needle_core::{gemm, rng};

use std::path::PathBuf;

/// Errors from loading or saving model parameters.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: bad checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
}
