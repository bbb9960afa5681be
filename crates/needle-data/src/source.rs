//! The single entry point the CLI uses to turn "which dataset" into a [`Dataset`], so the
//! data-dir conventions live in one place.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::dataset::{Dataset, LoadOptions};
use crate::error::Result;
use crate::log::load_csv_with;
use crate::movielens::{load_ml100k, load_ml1m, missing};

/// Built-in datasets. Serialized as "ml-1m" / "ml-100k" so configs read naturally
/// (explicit renames: plain kebab-case would give "ml1m" since digits do not start a word).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum DatasetName {
    /// MovieLens-1M (1,000,209 ratings).
    #[serde(rename = "ml-1m", alias = "ml1m")]
    Ml1m,
    /// MovieLens-100k (100,000 ratings).
    #[serde(rename = "ml-100k", alias = "ml100k")]
    Ml100k,
}

impl DatasetName {
    /// Short name, also the folder name and the `download` name.
    pub fn as_str(&self) -> &'static str {
        match self {
            DatasetName::Ml1m => "ml-1m",
            DatasetName::Ml100k => "ml-100k",
        }
    }

    /// Human name used in messages.
    pub fn human(&self) -> &'static str {
        match self {
            DatasetName::Ml1m => "MovieLens-1M",
            DatasetName::Ml100k => "MovieLens-100k",
        }
    }

    /// The file whose presence marks a folder as holding this dataset.
    pub fn marker_file(&self) -> &'static str {
        match self {
            DatasetName::Ml1m => "ratings.dat",
            DatasetName::Ml100k => "u.data",
        }
    }
}

impl std::fmt::Display for DatasetName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for DatasetName {
    type Err = String;
    /// Accepts "ml-1m" / "ml-100k" (also without the dash), for CLI arguments.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "ml-1m" | "ml1m" => Ok(DatasetName::Ml1m),
            "ml-100k" | "ml100k" => Ok(DatasetName::Ml100k),
            other => Err(format!("unknown dataset {other:?} (expected ml-1m or ml-100k)")),
        }
    }
}

/// What to load: a built-in MovieLens release or a CSV log described by a schema.
#[derive(Clone, Debug, PartialEq)]
pub enum DatasetSource {
    /// A MovieLens release, looked up under the data dir.
    MovieLens(DatasetName),
    /// A CSV log; a relative schema path resolves against the current directory.
    Csv {
        /// Path of the TOML schema file.
        schema: PathBuf,
    },
}

/// Data dir precedence: explicit flag, then `NEEDLE_DATA_DIR`, then `./data`, so scripts can
/// set it once in the environment and still override it per command.
pub fn resolve_data_dir(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    match std::env::var_os("NEEDLE_DATA_DIR") {
        Some(v) if !v.is_empty() => PathBuf::from(v),
        _ => PathBuf::from("data"),
    }
}

/// Finds the folder holding `name`: the data dir itself (pointed straight at the dataset)
/// or its `<name>/` subfolder (a data root holding several datasets).
pub fn find_dataset_dir(name: &DatasetName, data_dir: &Path) -> Option<PathBuf> {
    let marker = name.marker_file();
    if data_dir.join(marker).is_file() {
        return Some(data_dir.to_path_buf());
    }
    let sub = data_dir.join(name.as_str());
    sub.join(marker).is_file().then_some(sub)
}

/// Identity of what a load of `source` reads: the schema's text, and the path, length and
/// modification time of every data file, with the options that change the result. Two loads
/// with the same identity give the same dataset, so an ingested copy stamped with it can stand in.
pub fn source_id(source: &DatasetSource, data_dir: Option<&Path>, opts: &LoadOptions) -> Result<String> {
    let mut h = crate::dataset::FNV1A64_OFFSET;
    let mut eat = |b: &[u8]| h = crate::dataset::fnv1a64(h, b);
    eat(&crate::packed::FORMAT_VERSION.to_le_bytes());
    eat(&[u8::from(opts.skip_bad_rows)]);
    let files: Vec<PathBuf> = match source {
        DatasetSource::MovieLens(name) => {
            let dir = movielens_dir(name, data_dir)?;
            let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
                .map_err(|e| crate::error::DataError::io(&dir, e))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_file())
                .collect();
            files.sort();
            files
        }
        DatasetSource::Csv { schema } => {
            let path = absolute(schema);
            let parsed = crate::csv::Schema::from_path(&path)?;
            eat(&std::fs::read(&path).map_err(|e| crate::error::DataError::io(&path, e))?);
            let base = path.parent().unwrap_or(Path::new(""));
            let tables = parsed.items.iter().chain(&parsed.users).map(|t| base.join(&t.path));
            std::iter::once(base.join(&parsed.interactions.path)).chain(tables).collect()
        }
    };
    for f in files {
        let meta = std::fs::metadata(&f).map_err(|e| crate::error::DataError::io(&f, e))?;
        eat(f.to_string_lossy().as_bytes());
        eat(&meta.len().to_le_bytes());
        let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok());
        eat(&mtime.map_or(0, |d| d.as_nanos()).to_le_bytes());
    }
    Ok(format!("{h:016x}"))
}

/// Where the ingested copy of `source` lives unless a config says otherwise: beside the schema
/// (`S.toml` → `S.ndb/`); for MovieLens, whose folder is often shared or read-only, in the user's
/// cache (`$NEEDLE_CACHE_DIR`, else `$XDG_CACHE_HOME/needle`, else `~/.cache/needle`), one folder
/// per dataset folder.
pub fn default_cache_dir(source: &DatasetSource, data_dir: Option<&Path>) -> Result<PathBuf> {
    Ok(match source {
        DatasetSource::MovieLens(name) => {
            let dir = movielens_dir(name, data_dir)?;
            let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
            let tag = crate::dataset::fnv1a64(crate::dataset::FNV1A64_OFFSET, dir.to_string_lossy().as_bytes());
            user_cache_root().join(format!("{}-{tag:016x}.ndb", name.as_str()))
        }
        DatasetSource::Csv { schema } => absolute(schema).with_extension("ndb"),
    })
}

fn user_cache_root() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
    var("NEEDLE_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("needle")))
        .or_else(|| var("HOME").map(|h| h.join(".cache").join("needle")))
        .unwrap_or_else(|| std::env::temp_dir().join("needle-cache"))
}

/// How [`load_cached`] got its dataset.
#[derive(Clone, Debug, PartialEq)]
pub enum Cached {
    /// Read from an up-to-date binary dataset.
    Hit(PathBuf),
    /// Parsed from the source and written to the binary dataset (`reason`: why it was (re)built).
    Built { dir: PathBuf, reason: String },
    /// Parsed from the source; the binary dataset could not be written (`reason`).
    Unwritable { dir: PathBuf, reason: String },
}

/// Loads `source` through its binary dataset in `cache` (default [`default_cache_dir`]): an
/// up-to-date copy is read; a missing, stale or corrupted one is rebuilt from the source, so the
/// text is parsed once and every later command maps the binary file. `progress` gets
/// `(bytes read, bytes total)` while the source is parsed.
pub fn load_cached(
    source: &DatasetSource,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
    cache: Option<&Path>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(Dataset, Cached)> {
    let id = source_id(source, data_dir, opts)?;
    let dir = match cache {
        Some(c) => c.to_path_buf(),
        None => default_cache_dir(source, data_dir)?,
    };
    let reason = match crate::packed::Packed::open(&dir) {
        Ok(p) if p.info.source_id == id => match p.dataset() {
            Ok(ds) => return Ok((ds, Cached::Hit(dir))),
            Err(e) => format!("{e}"),
        },
        Ok(_) => "the source changed since it was ingested".to_owned(),
        Err(crate::error::DataError::Io { source: e, .. }) if e.kind() == std::io::ErrorKind::NotFound => {
            "first use".to_owned()
        }
        Err(e) => format!("{e}"),
    };
    let ds = load_with(source, data_dir, opts, progress)?;
    let seqs = crate::split::time_ordered(&ds)?;
    match crate::packed::write(&ds, &seqs, &id, &dir) {
        Ok(_) => Ok((ds, Cached::Built { dir, reason })),
        Err(e) => Ok((ds, Cached::Unwritable { dir, reason: e.to_string() })),
    }
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        std::env::current_dir().map(|d| d.join(p)).unwrap_or_else(|_| p.to_path_buf())
    }
}

fn movielens_dir(name: &DatasetName, data_dir: Option<&Path>) -> Result<PathBuf> {
    let root = resolve_data_dir(data_dir);
    find_dataset_dir(name, &root).ok_or_else(|| missing(name.human(), name.as_str(), &root, name.marker_file()))
}

/// Loads `source`. `data_dir` is resolved with [`resolve_data_dir`] and is only used for
/// MovieLens; a missing dataset gives an error that explains how to download it.
pub fn load(source: &DatasetSource, data_dir: Option<&Path>, opts: &LoadOptions) -> Result<Dataset> {
    load_with(source, data_dir, opts, &mut |_, _| {})
}

/// [`load`] with progress as `(bytes read, bytes total)` for streamed sources.
pub fn load_with(
    source: &DatasetSource,
    data_dir: Option<&Path>,
    opts: &LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Dataset> {
    match source {
        DatasetSource::MovieLens(name) => {
            let dir = movielens_dir(name, data_dir)?;
            match name {
                DatasetName::Ml1m => load_ml1m(&dir, opts),
                DatasetName::Ml100k => load_ml100k(&dir, opts),
            }
        }
        DatasetSource::Csv { schema } => load_csv_with(&absolute(schema), opts, progress),
    }
}
