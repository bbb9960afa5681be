//! Fuzz entry points for every loader and on-disk format of needle.
//!
//! Each target takes arbitrary bytes, hands them to needle's real parsing code and returns whether
//! they were accepted. Rejecting input is expected; panicking, aborting or looping is a bug. What
//! a target accepts is then put to use (split, searched, round-tripped, run through a tower) so
//! that a loader which lets inconsistent data through fails here rather than in production.
//!
//! Most targets read their first byte as a selector (which file, which options, which parser),
//! so one corpus covers several code paths and a mutation of that byte moves an input between
//! them. The same functions serve `fuzz/` (cargo-fuzz) and the corpus regression test.

mod config;
mod data;
mod index;
mod run;
mod serve;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub use config::config_toml;
pub use data::{csv_log, dataset, movielens, parquet_log, reseal_packed, MOVIELENS_FILE_SEPARATOR};
pub use index::{index, reseal_index};
pub use run::{checkpoint, templates, RunTemplate, KINDS, RUN_FILES};
pub use serve::{request_json, store_records, ROUTES};

/// A fuzz target: bytes in, `true` when needle accepted them.
pub type Target = fn(&[u8]) -> bool;

/// Every target by name; the names are also those of `fuzz/fuzz_targets/*.rs` and of the seed
/// and regression folders.
pub const TARGETS: &[(&str, Target)] = &[
    ("csv_log", csv_log),
    ("parquet_log", parquet_log),
    ("movielens", movielens),
    ("dataset", dataset),
    ("checkpoint", checkpoint),
    ("index", index),
    ("store_records", store_records),
    ("request_json", request_json),
    ("config_toml", config_toml),
];

/// `NEEDLE_FUZZ_STRICT=1` makes the corpus test also replay the slow reproducers (`slow-*`,
/// `timeout-*` in `fuzz/regressions/`), which take as long as the hangs they show.
pub fn strict() -> bool {
    static STRICT: OnceLock<bool> = OnceLock::new();
    *STRICT.get_or_init(|| std::env::var_os("NEEDLE_FUZZ_STRICT").is_some_and(|v| v == "1"))
}

/// The selector byte and the rest; empty input selects 0 with an empty body.
fn selector(data: &[u8]) -> (u8, &[u8]) {
    match data.split_first() {
        Some((&s, rest)) => (s, rest),
        None => (0, &[]),
    }
}

/// Where per-input folders go: `NEEDLE_FUZZ_TMPDIR`, else `/dev/shm` when usable (the loaders
/// sync what they write, which costs milliseconds on a disk and nothing in memory), else the
/// system temporary folder.
fn scratch_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        if let Some(dir) = std::env::var_os("NEEDLE_FUZZ_TMPDIR").filter(|d| !d.is_empty()) {
            return PathBuf::from(dir);
        }
        let shm = Path::new("/dev/shm");
        if tempfile::tempdir_in(shm).is_ok() {
            return shm.to_path_buf();
        }
        std::env::temp_dir()
    })
}

/// A fresh empty folder for one input, removed when dropped.
fn scratch() -> tempfile::TempDir {
    match tempfile::Builder::new().prefix("needle-fuzz").tempdir_in(scratch_root()) {
        Ok(d) => d,
        // Without a folder no target can run; this is the harness failing, not needle.
        Err(e) => panic!("cannot create a scratch folder in {}: {e}", scratch_root().display()),
    }
}

/// Writes a file the harness needs; failing to is a harness problem, not a finding.
fn put(path: &Path, bytes: &[u8]) {
    if let Some(parent) = path.parent() {
        if let Err(e) = std::fs::create_dir_all(parent) {
            panic!("cannot create {}: {e}", parent.display());
        }
    }
    if let Err(e) = std::fs::write(path, bytes) {
        panic!("cannot write {}: {e}", path.display());
    }
}
