//! The floor every other needle crate stands on: the pieces of arithmetic and file handling
//! that training, evaluation, indexing and serving must agree on to the bit.
//!
//! - [`rng`]: the seeded generator behind every random draw.
//! - [`gemm`]: row-major matrix products (the one wrapper over `matrixmultiply`).
//! - [`dot`]: inner products with runtime SIMD dispatch and a scalar fallback. [`dot::dot`] is
//!   the *canonical score*: every exact search reports its scores with it, so that offline
//!   evaluation and a served recall rank near-ties the same way.
//! - [`topk`]: a bounded top-K heap and exact top-K of many queries over a matrix of items.
//! - [`lists`]: variable-length lists in one buffer (histories, targets, exclusions).
//! - [`hash`]: FNV-1a (bytes and 64-bit words) and a 64-bit finaliser.
//! - [`file`]: write-to-temporary-then-rename with fsync, so a reader never sees half a file.

pub mod dot;
pub mod file;
pub mod gemm;
pub mod hash;
pub mod lists;
pub mod rng;
pub mod topk;

pub use lists::Lists;
