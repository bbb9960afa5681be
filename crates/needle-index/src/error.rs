//! One error type for building, querying, saving and loading indexes.
//!
//! File errors carry the path because a serving process that refuses to start must say which
//! index file is broken; shape errors carry both sizes because "dimension mismatch" alone does not
//! tell the caller which side is wrong.

use std::path::PathBuf;

/// Everything that can go wrong in this crate. Bad input (wrong shapes, non-finite values,
/// corrupted files) is always reported here, never by a panic.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Reading or writing an index file failed.
    #[error("{}: {source}", path.display())]
    Io {
        /// The index file.
        path: PathBuf,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the index magic: it is not an index file at all.
    #[error("{}: not a needle index file (bad magic bytes)", path.display())]
    BadMagic {
        /// The file that was read.
        path: PathBuf,
    },

    /// The file was written by a format version this build cannot read.
    #[error("{}: index format version {found} is not supported (this build reads version {supported})", path.display())]
    UnsupportedVersion {
        /// The file that was read.
        path: PathBuf,
        /// Version recorded in the file.
        found: u32,
        /// Version this build writes and reads.
        supported: u32,
    },

    /// The file is shorter or longer than its header says: an interrupted copy or write.
    #[error("{}: truncated or padded index file: header promises {expected} bytes, file has {actual}", path.display())]
    Truncated {
        /// The file that was read.
        path: PathBuf,
        /// Size the header implies.
        expected: u64,
        /// Size on disk.
        actual: u64,
    },

    /// The stored checksum does not match the bytes: the file was damaged after it was written.
    #[error("{}: checksum mismatch (stored {stored:#018x}, computed {computed:#018x}); the index file is corrupted", path.display())]
    Checksum {
        /// The file that was read.
        path: PathBuf,
        /// Checksum recorded in the header.
        stored: u64,
        /// Checksum of the bytes on disk.
        computed: u64,
    },

    /// The checksum matched but the content is inconsistent (e.g. a neighbour id out of range).
    #[error("{}: corrupt index: {reason}", path.display())]
    Corrupt {
        /// The file that was read.
        path: PathBuf,
        /// What is inconsistent.
        reason: String,
    },

    /// A vector or query does not have the index's dimension, or a flat buffer is not a whole
    /// number of rows.
    #[error("{what}: expected dimension {expected}, got {got} values")]
    Dimension {
        /// Which argument was wrong ("query", "vectors", ...).
        what: &'static str,
        /// The index dimension (or the required multiple).
        expected: usize,
        /// The length that was passed.
        got: usize,
    },

    /// `ids` and `vectors` describe different numbers of rows.
    #[error("{ids} ids given for {rows} vectors")]
    CountMismatch {
        /// Number of ids.
        ids: usize,
        /// Number of vector rows.
        rows: usize,
    },

    /// A vector or query holds NaN or infinity, which has no place in a ranking.
    #[error("{what} row {row} holds a non-finite value")]
    NonFinite {
        /// "vectors" or "query".
        what: &'static str,
        /// 0-based row within the call.
        row: usize,
    },

    /// A vector file (`.npy`) cannot be used: wrong dtype, order, shape or length.
    #[error("{}: {reason}", path.display())]
    Vectors {
        /// The file that was read.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A build or search parameter is out of range, or a parameter string does not parse.
    #[error("invalid index parameter: {0}")]
    Param(String),

    /// More vectors than `u32` rows can address.
    #[error("an index holds at most {} vectors", u32::MAX)]
    TooLarge,
}

/// Crate-wide result alias.
pub type Result<T> = std::result::Result<T, IndexError>;
