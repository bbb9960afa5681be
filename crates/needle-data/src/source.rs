//! The single entry point the CLI uses to turn "which dataset" into a [`Dataset`], so the
//! data-dir conventions live in one place.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::csv::load_csv;
use crate::dataset::{Dataset, LoadOptions};
use crate::error::Result;
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

/// Loads `source`. `data_dir` is resolved with [`resolve_data_dir`] and is only used for
/// MovieLens; a missing dataset gives an error that explains how to download it.
pub fn load(source: &DatasetSource, data_dir: Option<&Path>, opts: &LoadOptions) -> Result<Dataset> {
    match source {
        DatasetSource::MovieLens(name) => {
            let root = resolve_data_dir(data_dir);
            let Some(dir) = find_dataset_dir(name, &root) else {
                return Err(missing(name.human(), name.as_str(), &root, name.marker_file()));
            };
            match name {
                DatasetName::Ml1m => load_ml1m(&dir, opts),
                DatasetName::Ml100k => load_ml100k(&dir, opts),
            }
        }
        DatasetSource::Csv { schema } => {
            let path = if schema.is_absolute() {
                schema.clone()
            } else {
                std::env::current_dir().map(|d| d.join(schema)).unwrap_or_else(|_| schema.clone())
            };
            load_csv(&path, opts)
        }
    }
}
