//! One error type for every loader, so callers (the CLI, the trainer) can report
//! data problems with the file and line that caused them instead of a bare parse error.

use std::path::PathBuf;

/// Everything that can go wrong while finding, downloading, parsing or splitting data.
///
/// Variants carry the path (and for row-level problems the 1-based line number) because
/// a data error without its location is nearly impossible to fix in a 1M-line file.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// Reading or writing a file failed; the path says which one.
    #[error("{}: {source}", path.display())]
    Io {
        /// File or folder the operation was about.
        path: PathBuf,
        /// Underlying OS error.
        #[source]
        source: std::io::Error,
    },

    /// A row could not be parsed. Returned unless `LoadOptions::skip_bad_rows` is set,
    /// in which case the row is skipped and counted in `LoadReport::skipped`.
    #[error("{}:{line}: {reason}", path.display())]
    BadRow {
        /// File holding the row.
        path: PathBuf,
        /// 1-based line number, as editors show it.
        line: usize,
        /// What is wrong with the row.
        reason: String,
    },

    /// A required dataset file is absent; `hint` tells the user how to obtain it.
    #[error("{name} not found in {} {hint}", dir.display())]
    MissingDataset {
        /// Human name of the dataset, e.g. "MovieLens-1M".
        name: String,
        /// Folder that was searched.
        dir: PathBuf,
        /// What was expected and how to get it (download command, env var).
        hint: String,
    },

    /// A CSV schema file is malformed or does not match the data it describes.
    #[error("schema {}: {reason}", path.display())]
    Schema {
        /// The schema (TOML) file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// Split parameters are out of range (fractions must be in (0,1) and sum below 1).
    #[error("invalid split: {0}")]
    InvalidSplit(String),

    /// A vocabulary cannot be saved or loaded (e.g. an id containing a tab or newline).
    #[error("vocab {}: {reason}", path.display())]
    Vocab {
        /// Vocabulary file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The name given to `download` is not a dataset we know how to fetch.
    #[error("unknown dataset {name:?}; known datasets: {}", known.join(", "))]
    UnknownDataset {
        /// The name that was asked for.
        name: String,
        /// Names that `download` accepts.
        known: Vec<String>,
    },

    /// The HTTP transfer failed (connection, status code, truncated body).
    #[error("download of {url} failed: {reason}")]
    Download {
        /// URL that was fetched.
        url: String,
        /// Transport or HTTP error message.
        reason: String,
    },

    /// A file's MD5 differs from the published one: corrupted or tampered download.
    #[error("{}: md5 mismatch: expected {expected}, got {actual}", path.display())]
    ChecksumMismatch {
        /// File that was checked.
        path: PathBuf,
        /// Published checksum (lowercase hex).
        expected: String,
        /// Checksum of the bytes on disk (lowercase hex).
        actual: String,
    },

    /// The zip archive is unreadable, or holds an entry that would escape the target folder.
    #[error("zip {}: {reason}", path.display())]
    Zip {
        /// Archive path.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// A Parquet file cannot be read (not Parquet, truncated, unsupported encoding).
    #[error("{}: {reason}", path.display())]
    Parquet {
        /// The Parquet file.
        path: PathBuf,
        /// What the reader said.
        reason: String,
    },

    /// A value in a Parquet column is missing or of the wrong kind.
    #[error("{}: column {column:?}, row group {row_group}, row {row}: {reason}", path.display())]
    BadValue {
        /// The Parquet file.
        path: PathBuf,
        /// Column name.
        column: String,
        /// 0-based row group.
        row_group: usize,
        /// 0-based row within the row group.
        row: usize,
        /// What is wrong.
        reason: String,
    },

    /// A binary dataset file is truncated, corrupted, of another format version, or stale.
    #[error("dataset {}: {reason}", path.display())]
    Packed {
        /// The dataset file.
        path: PathBuf,
        /// What is wrong, and what to do about it.
        reason: String,
    },

    /// A dataset grew beyond what `u32` keys can address.
    #[error("too many {what}: more than {} cannot be indexed with u32 keys", u32::MAX)]
    TooLarge {
        /// What overflowed ("users", "items", "events", ...).
        what: &'static str,
    },
}

impl DataError {
    /// A binary dataset that cannot be used as it is.
    pub(crate) fn packed(path: &std::path::Path, reason: impl Into<String>) -> Self {
        DataError::Packed { path: path.to_path_buf(), reason: reason.into() }
    }
}

/// Crate-wide result alias so signatures stay short.
pub type Result<T> = std::result::Result<T, DataError>;

impl DataError {
    /// Shorthand used by every loader, which always knows the path it was touching.
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
