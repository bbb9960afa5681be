//! Data layer of needle: loading interaction logs (MovieLens, CSV), interning raw ids to dense
//! keys, side features, vocabularies, time-ordered splits and dataset download.
//!
//! Everything here is deterministic and panic-free on any input, so data problems surface as
//! [`DataError`]s with file and line rather than crashes deep inside training.

mod batches;
pub mod csv;
pub mod dataset;
pub mod download;
pub mod error;
pub mod frame;
pub mod log;
pub mod movielens;
pub mod packed;
mod parquet_log;
pub mod source;
pub mod split;
pub mod synth;
mod text;
pub mod vocab;

pub use crate::csv::{Column, EntityTable, FeatureColumn, FileFormat, InteractionsSchema, Schema};
pub use crate::dataset::{fnv1a64, Dataset, Event, Feature, LoadOptions, LoadReport, FNV1A64_OFFSET};
pub use crate::download::{download, extract_zip, verify_md5};
pub use crate::error::{DataError, Result};
pub use crate::frame::{load_frames, Frame};
pub use crate::log::{load_csv, load_csv_with};
pub use crate::movielens::{load_ml100k, load_ml1m};
pub use crate::packed::{Packed, PackedInfo};
pub use crate::source::{load, load_cached, resolve_data_dir, source_id, Cached, DatasetName, DatasetSource};
pub use crate::split::{split, Sequences, Split, SplitStrategy};
pub use crate::vocab::Vocab;
