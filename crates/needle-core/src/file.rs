//! Writing a file so that a reader never sees half of it: the bytes go to a temporary file
//! beside the target (`NAME.tmp`), are flushed to disk, and the temporary file is renamed over
//! the target. A crash leaves the old file or the new one, and at worst a stale `.tmp`, which
//! the next write replaces. Every file needle writes for another process to read goes through
//! here.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

/// The temporary name a write to `path` goes through: `path` with `.tmp` appended (appended,
/// not substituted for the extension, so `a.csv` and `a.parquet` never share one).
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    PathBuf::from(tmp)
}

/// An error that names the file it happened to.
fn at(path: &Path, what: &str, e: io::Error) -> io::Error {
    io::Error::new(e.kind(), format!("cannot {what} {}: {e}", path.display()))
}

/// A file being written under its temporary name. [`AtomicFile::commit`] puts it in place;
/// dropping it uncommitted removes the temporary file and leaves the target as it was.
pub struct AtomicFile {
    path: PathBuf,
    tmp: PathBuf,
    out: Option<BufWriter<File>>,
}

impl AtomicFile {
    /// Starts writing `path` (through `path.tmp`, created or truncated).
    pub fn create(path: &Path) -> io::Result<AtomicFile> {
        Self::create_mode(path, 0o644)
    }

    /// [`AtomicFile::create`] for a secret: readable by its owner alone (on Unix) from the first
    /// byte on.
    pub fn create_private(path: &Path) -> io::Result<AtomicFile> {
        Self::create_mode(path, 0o600)
    }

    fn create_mode(path: &Path, mode: u32) -> io::Result<AtomicFile> {
        let tmp = tmp_path(path);
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut opts, mode);
        #[cfg(not(unix))]
        let _ = mode;
        let file = opts.open(&tmp).map_err(|e| at(&tmp, "create", e))?;
        Ok(AtomicFile { path: path.to_owned(), tmp, out: Some(BufWriter::with_capacity(1 << 20, file)) })
    }

    /// The file being written, for formats that seek back to patch a header.
    pub fn file_mut(&mut self) -> io::Result<&mut File> {
        let out = self.out.as_mut().ok_or_else(|| io::Error::other("file already committed"))?;
        out.flush().map_err(|e| at(&self.tmp, "write", e))?;
        Ok(out.get_mut())
    }

    /// Flushes, syncs to disk and renames the file over its target.
    pub fn commit(mut self) -> io::Result<()> {
        let out = self.out.take().ok_or_else(|| io::Error::other("file already committed"))?;
        let file = out.into_inner().map_err(|e| at(&self.tmp, "write", e.into_error()))?;
        file.sync_all().map_err(|e| at(&self.tmp, "sync", e))?;
        drop(file);
        std::fs::rename(&self.tmp, &self.path).map_err(|e| at(&self.path, "replace", e))?;
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.out.as_mut() {
            Some(out) => out.write(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }
    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self.out.as_mut() {
            Some(out) => out.write_all(buf),
            None => Err(io::Error::other("file already committed")),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.as_mut().map_or(Ok(()), |o| o.flush())
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Puts in place a file that a writer outside this module (a Parquet or safetensors writer that
/// wants a path of its own) wrote completely at [`tmp_path`]`(path)`: syncs it and renames it
/// over `path`.
pub fn persist(path: &Path) -> io::Result<()> {
    let tmp = tmp_path(path);
    File::open(&tmp).and_then(|f| f.sync_all()).map_err(|e| at(&tmp, "sync", e))?;
    std::fs::rename(&tmp, path).map_err(|e| at(path, "replace", e))
}

/// Writes `bytes` to `path` atomically (see the module docs).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = AtomicFile::create(path)?;
    f.write_all(bytes).map_err(|e| at(&f.tmp, "write", e))?;
    f.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_committed_file_replaces_the_old_and_an_abandoned_one_leaves_it() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.json");
        write_atomic(&p, b"old").unwrap();
        {
            let mut f = AtomicFile::create(&p).unwrap();
            f.write_all(b"half").unwrap();
            assert!(tmp_path(&p).exists());
            // Dropped without commit: an error path.
        }
        assert_eq!(std::fs::read(&p).unwrap(), b"old");
        assert!(!tmp_path(&p).exists(), "an abandoned write leaves no temporary file");
        write_atomic(&p, b"new").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new");
        assert!(!tmp_path(&p).exists());
        let err = write_atomic(&dir.path().join("no/such/dir/x"), b"x").unwrap_err();
        assert!(err.to_string().contains("no/such/dir/x.tmp"), "{err}");
    }
}
