//! Fetching the public MovieLens archives, so a fresh checkout can get its data with one
//! command. Integrity is checked against the published MD5 before anything is extracted.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};

use md5::{Digest, Md5};

use crate::error::{DataError, Result};

/// A downloadable dataset: name (also the archive's top folder), URL and published MD5.
struct Known {
    name: &'static str,
    url: &'static str,
    md5: &'static str,
}

const KNOWN: [Known; 2] = [
    Known {
        name: "ml-1m",
        url: "https://files.grouplens.org/datasets/movielens/ml-1m.zip",
        md5: "c4d9eecfca2ab87c1945afe126590906",
    },
    Known {
        name: "ml-100k",
        url: "https://files.grouplens.org/datasets/movielens/ml-100k.zip",
        md5: "0e33842e24a9c977be4e0107933c0723",
    },
];

/// Names accepted by [`download`], for help texts.
pub fn known_datasets() -> Vec<&'static str> {
    KNOWN.iter().map(|k| k.name).collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deletes a partial file when dropped unless disarmed, so every error path (network,
/// checksum, disk full) cleans up without repeating the removal in each branch.
struct RemoveOnDrop(Option<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            // Best effort: the original error is more useful than a cleanup failure.
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Downloads dataset `name` ("ml-1m" or "ml-100k") into `to`, verifies its MD5, extracts
/// it and returns `to/<name>`. `progress(done, total)` is called as bytes arrive (`total`
/// is the Content-Length when the server sends one). The archive itself is not kept.
pub fn download(name: &str, to: &Path, progress: &mut dyn FnMut(u64, Option<u64>)) -> Result<PathBuf> {
    let Some(known) = KNOWN.iter().find(|k| k.name == name) else {
        return Err(DataError::UnknownDataset {
            name: name.to_owned(),
            known: KNOWN.iter().map(|k| k.name.to_owned()).collect(),
        });
    };
    std::fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    let zip_path = to.join(format!(".{}.zip.part", known.name));
    let guard = RemoveOnDrop(Some(zip_path.clone()));

    let net_err = |reason: String| DataError::Download { url: known.url.to_owned(), reason };
    let response = ureq::get(known.url).call().map_err(|e| net_err(e.to_string()))?;
    let total = response.body().content_length();
    let mut reader = response.into_body().into_reader();
    let mut file = File::create(&zip_path).map_err(|e| DataError::io(&zip_path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut done = 0u64;
    progress(0, total);
    loop {
        let n = reader.read(&mut buf).map_err(|e| net_err(e.to_string()))?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or(&[]);
        hasher.update(chunk);
        file.write_all(chunk).map_err(|e| DataError::io(&zip_path, e))?;
        done += n as u64;
        progress(done, total);
    }
    file.flush().map_err(|e| DataError::io(&zip_path, e))?;
    drop(file);

    let actual = hex(&hasher.finalize());
    if actual != known.md5 {
        return Err(DataError::ChecksumMismatch { path: zip_path.clone(), expected: known.md5.to_owned(), actual });
    }
    extract_zip(&zip_path, to)?;
    drop(guard);
    Ok(to.join(known.name))
}

/// Checks that the file's MD5 equals `expected` (hex, case-insensitive), streaming it so
/// large archives do not need to fit in memory.
pub fn verify_md5(path: &Path, expected: &str) -> Result<()> {
    let mut f = File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut hasher = Md5::new();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(buf.get(..n).unwrap_or(&[]));
    }
    let actual = hex(&hasher.finalize());
    if actual.eq_ignore_ascii_case(expected.trim()) {
        Ok(())
    } else {
        Err(DataError::ChecksumMismatch {
            path: path.to_path_buf(),
            expected: expected.trim().to_ascii_lowercase(),
            actual,
        })
    }
}

/// Relative path of an entry if it stays inside the target folder. Names are checked as
/// written (both separators, drive letters) rather than only through the OS's path rules,
/// so an archive made on Windows cannot escape either.
fn safe_entry_path(name: &str) -> Option<PathBuf> {
    if name.starts_with('/') || name.starts_with('\\') || name.contains('\0') {
        return None;
    }
    let mut out = PathBuf::new();
    for part in name.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." => return None,
            p if p.contains(':') => return None,
            p => out.push(p),
        }
    }
    // Belt and braces: whatever we built must consist of normal components only.
    let normal = out.components().all(|c| matches!(c, Component::Normal(_)));
    if normal && !out.as_os_str().is_empty() {
        Some(out)
    } else {
        None
    }
}

/// Extracts every entry of `zip_path` under `to`. All entry names are validated before
/// anything is written, and absolute paths or `..` components are rejected (zip-slip), so
/// a hostile archive leaves no partial output behind.
pub fn extract_zip(zip_path: &Path, to: &Path) -> Result<()> {
    let zerr = |reason: String| DataError::Zip { path: zip_path.to_path_buf(), reason };
    let file = File::open(zip_path).map_err(|e| DataError::io(zip_path, e))?;
    let mut archive = zip::ZipArchive::new(file).map_err(|e| zerr(e.to_string()))?;

    let mut targets = Vec::with_capacity(archive.len());
    for i in 0..archive.len() {
        let entry = archive.by_index_raw(i).map_err(|e| zerr(e.to_string()))?;
        let name = entry.name().to_owned();
        let rel = safe_entry_path(&name)
            .filter(|_| entry.enclosed_name().is_some())
            .ok_or_else(|| zerr(format!("unsafe entry path {name:?} (absolute or contains ..)")))?;
        targets.push((rel, entry.is_dir()));
    }

    std::fs::create_dir_all(to).map_err(|e| DataError::io(to, e))?;
    for (i, (rel, is_dir)) in targets.into_iter().enumerate() {
        let out = to.join(&rel);
        if is_dir {
            std::fs::create_dir_all(&out).map_err(|e| DataError::io(&out, e))?;
            continue;
        }
        if let Some(parent) = out.parent() {
            std::fs::create_dir_all(parent).map_err(|e| DataError::io(parent, e))?;
        }
        let mut entry = archive.by_index(i).map_err(|e| zerr(e.to_string()))?;
        let mut f = File::create(&out).map_err(|e| DataError::io(&out, e))?;
        std::io::copy(&mut entry, &mut f).map_err(|e| zerr(format!("{}: {e}", rel.display())))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths() {
        assert_eq!(safe_entry_path("ml-1m/ratings.dat"), Some(PathBuf::from("ml-1m/ratings.dat")));
        assert_eq!(safe_entry_path("ml-1m/"), Some(PathBuf::from("ml-1m")));
        assert_eq!(safe_entry_path("../evil"), None);
        assert_eq!(safe_entry_path("a/../../evil"), None);
        assert_eq!(safe_entry_path("/etc/passwd"), None);
        assert_eq!(safe_entry_path("\\x"), None);
        assert_eq!(safe_entry_path("C:/x"), None);
    }
}
