//! Where a streaming build reads its vectors from, a block of rows at a time, so a catalogue
//! larger than memory can be indexed: a slice in memory, a NumPy `.npy` file read with
//! positioned reads (never mapped whole, so the file's pages do not pile up in the process), or
//! the seeded synthetic generator, which makes any row on demand.

use crate::error::{IndexError, Result};
use crate::synth;
use needle_core::file::AtomicFile;
use needle_core::rng::Rng;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Rows of `dim` floats, readable in any order and from many threads.
pub trait VectorSource: Sync {
    /// Values per row.
    fn dim(&self) -> usize;
    /// Number of rows.
    fn rows(&self) -> usize;
    /// Fills `out` (a whole number of rows) with the rows from `start` on.
    fn read(&self, start: usize, out: &mut [f32]) -> Result<()>;
}

/// Rows held in memory.
pub struct SliceSource<'a> {
    data: &'a [f32],
    dim: usize,
}

impl<'a> SliceSource<'a> {
    /// `data` holds `data.len() / dim` rows.
    pub fn new(data: &'a [f32], dim: usize) -> Result<Self> {
        crate::check_flat("vectors", dim, data)?;
        Ok(SliceSource { data, dim })
    }
}

impl VectorSource for SliceSource<'_> {
    fn dim(&self) -> usize {
        self.dim
    }

    fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    fn read(&self, start: usize, out: &mut [f32]) -> Result<()> {
        let a = start * self.dim;
        let src = self.data.get(a..a + out.len()).ok_or(IndexError::Dimension {
            what: "rows read",
            expected: self.data.len(),
            got: a + out.len(),
        })?;
        out.copy_from_slice(src);
        Ok(())
    }
}

/// A `[rows, dim]` little-endian float32 `.npy` file, C order.
pub struct NpyFile {
    file: File,
    path: PathBuf,
    data_offset: u64,
    shape: Vec<usize>,
    rows: usize,
    dim: usize,
}

fn npy_error(path: &Path, reason: impl Into<String>) -> IndexError {
    IndexError::Vectors { path: path.to_owned(), reason: reason.into() }
}

impl NpyFile {
    /// Opens the file and checks its header, dtype, order, shape and length.
    pub fn open(path: &Path) -> Result<NpyFile> {
        let io = |e| IndexError::Io { path: path.to_owned(), source: e };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let mut head = vec![0u8; (len.min(1 << 16)) as usize];
        file.read_exact(&mut head).map_err(io)?;
        if head.len() < 10 || !head.starts_with(b"\x93NUMPY") {
            return Err(npy_error(path, "not a .npy file"));
        }
        let (header_len, start) = match head[6] {
            1 => (u16::from_le_bytes([head[8], head[9]]) as usize, 10),
            2 | 3 if head.len() >= 12 => (u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize, 12),
            v => return Err(npy_error(path, format!("unsupported .npy format version {v}"))),
        };
        let header = head
            .get(start..start + header_len)
            .and_then(|h| std::str::from_utf8(h).ok())
            .ok_or_else(|| npy_error(path, "truncated or non-text .npy header"))?;
        let value_after = |key: &str| -> Result<&str> {
            let i = header.find(key).ok_or_else(|| npy_error(path, format!("header lacks {key}")))?;
            Ok(header[i + key.len()..].trim_start().trim_start_matches(':').trim_start())
        };
        let descr = value_after("'descr'")?;
        if !(descr.starts_with("'<f4'") || descr.starts_with("\"<f4\"")) {
            return Err(npy_error(
                path,
                format!(
                    "dtype {} is not little-endian float32 ('<f4'); convert with arr.astype('<f4')",
                    descr.split(',').next().unwrap_or("?")
                ),
            ));
        }
        if !value_after("'fortran_order'")?.starts_with("False") {
            return Err(npy_error(path, "Fortran-ordered arrays are not supported"));
        }
        let shape_text = value_after("'shape'")?;
        let close = shape_text.find(')').filter(|_| shape_text.starts_with('('));
        let close = close.ok_or_else(|| npy_error(path, "malformed shape"))?;
        let shape = shape_text[1..close]
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.parse::<usize>().map_err(|_| npy_error(path, format!("bad shape entry {s:?}"))))
            .collect::<Result<Vec<_>>>()?;
        let (rows, dim) = match shape[..] {
            [rows, dim] if dim > 0 => (rows, dim),
            [rows] => (rows, 1),
            _ => return Err(npy_error(path, format!("expected a 2-d [rows, dim] array, got shape {shape:?}"))),
        };
        let data_offset = (start + header_len) as u64;
        let need = (rows as u64).checked_mul(dim as u64).and_then(|v| v.checked_mul(4));
        let need = need.ok_or_else(|| npy_error(path, "shape overflows"))?;
        if len.saturating_sub(data_offset) != need {
            return Err(npy_error(
                path,
                format!(
                    "shape [{rows}, {dim}] needs {need} bytes of data, the file has {}",
                    len.saturating_sub(data_offset)
                ),
            ));
        }
        Ok(NpyFile { file, path: path.to_owned(), data_offset, shape, rows, dim })
    }

    /// The array's shape as the header gives it (`[rows]` or `[rows, dim]`).
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Every value, read into memory.
    pub fn read_all(&self) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; self.rows * self.dim];
        self.read(0, &mut out)?;
        Ok(out)
    }
}

impl VectorSource for NpyFile {
    fn dim(&self) -> usize {
        self.dim
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn read(&self, start: usize, out: &mut [f32]) -> Result<()> {
        use std::os::unix::fs::FileExt;
        let rows = out.len() / self.dim;
        if start + rows > self.rows {
            return Err(npy_error(&self.path, format!("rows {start}..{} past the end ({})", start + rows, self.rows)));
        }
        let mut offset = self.data_offset + (start * self.dim * 4) as u64;
        let mut bytes = vec![0u8; (out.len() * 4).min(1 << 20)];
        for chunk in out.chunks_mut(bytes.len() / 4) {
            let b = &mut bytes[..chunk.len() * 4];
            self.file.read_exact_at(b, offset).map_err(|e| IndexError::Io { path: self.path.clone(), source: e })?;
            for (x, c) in chunk.iter_mut().zip(b.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
            offset += b.len() as u64;
        }
        Ok(())
    }
}

/// Writes a `[rows, dim]` float32 `.npy` file row block by row block, through a temporary file
/// renamed into place by [`NpyWriter::finish`].
pub struct NpyWriter {
    out: AtomicFile,
    tmp: PathBuf,
    path: PathBuf,
    remaining: usize,
    dim: usize,
    buf: Vec<u8>,
}

impl NpyWriter {
    /// Starts a file that will hold `rows × dim` values.
    pub fn create(path: &Path, rows: usize, dim: usize) -> Result<NpyWriter> {
        Self::with_shape(path, &[rows, dim])
    }

    /// Starts a file holding an array of any shape; rows are its last dimension.
    pub fn with_shape(path: &Path, shape: &[usize]) -> Result<NpyWriter> {
        let dims = match shape {
            [] => "()".to_string(),
            [n] => format!("({n},)"),
            _ => format!("({})", shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        };
        let values: usize = shape.iter().product();
        let dim = shape.last().copied().unwrap_or(1).max(1);
        let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {dims}, }}");
        // NumPy pads the header so the data starts on a 64-byte boundary.
        let unpadded = 10 + header.len() + 1;
        header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
        header.push('\n');
        let tmp = needle_core::file::tmp_path(path);
        let io = |e| IndexError::Io { path: tmp.clone(), source: e };
        let mut out = AtomicFile::create(path).map_err(io)?;
        out.write_all(b"\x93NUMPY\x01\x00").map_err(io)?;
        out.write_all(&(header.len() as u16).to_le_bytes()).map_err(io)?;
        out.write_all(header.as_bytes()).map_err(io)?;
        Ok(NpyWriter { out, tmp: tmp.clone(), path: path.to_owned(), remaining: values, dim, buf: Vec::new() })
    }

    /// Appends whole rows.
    pub fn write(&mut self, values: &[f32]) -> Result<()> {
        if !values.len().is_multiple_of(self.dim) || values.len() > self.remaining {
            return Err(npy_error(&self.path, "more values written than the shape holds"));
        }
        self.buf.clear();
        values.iter().for_each(|x| self.buf.extend_from_slice(&x.to_le_bytes()));
        self.out.write_all(&self.buf).map_err(|e| IndexError::Io { path: self.tmp.clone(), source: e })?;
        self.remaining -= values.len();
        Ok(())
    }

    /// Checks every row was written, flushes and renames the file into place.
    pub fn finish(self) -> Result<()> {
        if self.remaining != 0 {
            // Dropping the writer removes the temporary file.
            return Err(npy_error(&self.path, format!("{} values short of the shape", self.remaining)));
        }
        self.out.commit().map_err(|e| IndexError::Io { path: self.path.clone(), source: e })
    }
}

/// The clustered unit vectors of [`crate::synthetic_clustered`]'s distribution, any row on
/// demand: row `i` draws its centre and noise from its own seeded stream, so a set of any size is
/// generated in blocks, in parallel, and never needs to be held whole.
pub struct SyntheticSource {
    rows: usize,
    dim: usize,
    centres: Vec<f32>,
    sigma: f32,
    rng: Rng,
}

impl SyntheticSource {
    /// `rows` vectors around `clusters` centres (0: uniform on the sphere), noise norm `spread`.
    pub fn new(rows: usize, dim: usize, clusters: usize, spread: f32, seed: u64) -> Result<Self> {
        if dim == 0 {
            return Err(IndexError::Param("dimension must be at least 1".into()));
        }
        let mut rng = Rng::new(seed);
        let centres = synth::centres(&mut rng, clusters, dim);
        let sigma = synth::noise_sigma(clusters, dim, spread);
        Ok(SyntheticSource { rows, dim, centres, sigma, rng: rng.fork(0x5e7) })
    }
}

impl VectorSource for SyntheticSource {
    fn dim(&self) -> usize {
        self.dim
    }

    fn rows(&self) -> usize {
        self.rows
    }

    fn read(&self, start: usize, out: &mut [f32]) -> Result<()> {
        for (i, v) in out.chunks_exact_mut(self.dim).enumerate() {
            synth::draw(&mut self.rng.fork((start + i) as u64), &self.centres, self.sigma, v);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn npy_round_trips_through_the_streaming_writer_and_refuses_bad_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.npy");
        let data: Vec<f32> = (0..30).map(|i| i as f32 * 0.25 - 2.0).collect();
        let mut w = NpyWriter::create(&path, 10, 3).unwrap();
        w.write(&data[..12]).unwrap();
        w.write(&data[12..]).unwrap();
        w.finish().unwrap();
        let f = NpyFile::open(&path).unwrap();
        assert_eq!((f.rows(), f.dim()), (10, 3));
        assert_eq!(f.read_all().unwrap(), data);
        let mut two = [0.0f32; 6];
        f.read(4, &mut two).unwrap();
        assert_eq!(two[..], data[12..18]);
        assert!(f.read(9, &mut two).is_err(), "reading past the end");

        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, &good[..good.len() - 4]).unwrap();
        let err = NpyFile::open(&path).err().unwrap().to_string();
        assert!(err.contains("needs 120 bytes"), "{err}");
        let mut f8 = good.clone();
        let at = f8.windows(3).position(|w| w == b"<f4").unwrap();
        f8[at + 2] = b'8';
        std::fs::write(&path, f8).unwrap();
        assert!(NpyFile::open(&path).err().unwrap().to_string().contains("float32"));
        std::fs::write(&path, b"not numpy").unwrap();
        assert!(NpyFile::open(&path).is_err());

        let mut short = NpyWriter::create(&path, 2, 3).unwrap();
        short.write(&data[..3]).unwrap();
        assert!(short.finish().is_err(), "a short file must not be renamed into place");
    }

    #[test]
    fn synthetic_rows_are_unit_repeatable_and_independent_of_how_they_are_read() {
        let s = SyntheticSource::new(100, 8, 5, 1.0, 3).unwrap();
        let mut all = vec![0.0f32; 800];
        s.read(0, &mut all).unwrap();
        let mut part = vec![0.0f32; 80];
        s.read(37, &mut part).unwrap();
        assert_eq!(part[..], all[37 * 8..47 * 8]);
        for v in all.chunks_exact(8) {
            let n: f32 = v.iter().map(|x| x * x).sum();
            assert!((n - 1.0).abs() < 1e-4);
        }
        let again = SyntheticSource::new(100, 8, 5, 1.0, 3).unwrap();
        let mut b = vec![0.0f32; 800];
        again.read(0, &mut b).unwrap();
        assert_eq!(all, b);
    }
}
