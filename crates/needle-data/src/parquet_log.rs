//! Parquet logs and tables: the file, its metadata checked, read through Arrow arrays one row
//! group at a time (only the projected columns) and handed to the record-batch readers.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::DataType;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ParquetRecordBatchReaderBuilder};
use parquet::arrow::ProjectionMask;

use crate::batches::Batches;
use crate::csv::{EntityTable, Schema, Side};
use crate::dataset::Parts;
use crate::error::{DataError, Result};

const BATCH_ROWS: usize = 1 << 16;

/// A Parquet file whose readers fail when asked for bytes past its end. The `parquet` reader
/// skips an unknown list field of a page header element by element, each a read; with a corrupt
/// length and a plain file every read past the end returns 0 bytes and the skip runs on for
/// minutes on a 2 KB file (found by fuzzing). An error there ends it at once.
struct EofIsError(File);

impl parquet::file::reader::Length for EofIsError {
    fn len(&self) -> u64 {
        parquet::file::reader::Length::len(&self.0)
    }
}

impl parquet::file::reader::ChunkReader for EofIsError {
    type T = EofRead<<File as parquet::file::reader::ChunkReader>::T>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        self.0.get_read(start).map(EofRead)
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<bytes::Bytes> {
        self.0.get_bytes(start, length)
    }
}

/// A reader that turns "no more bytes" into an error when bytes were asked for.
struct EofRead<R>(R);

impl<R: std::io::Read> std::io::Read for EofRead<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self.0.read(buf)? {
            0 if !buf.is_empty() => {
                Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "read past the end of the Parquet file"))
            }
            n => Ok(n),
        }
    }
}

/// An opened Parquet file: its metadata, read once.
struct Source {
    path: std::path::PathBuf,
    file: File,
    meta: ArrowReaderMetadata,
}

impl Source {
    fn open(path: &Path) -> Result<Source> {
        let file = File::open(path).map_err(|e| DataError::io(path, e))?;
        let meta = contained(path, || {
            ArrowReaderMetadata::load(&file, Default::default()).map_err(|e| DataError::Parquet {
                path: path.to_path_buf(),
                reason: format!("not a readable Parquet file: {e}"),
            })
        })?;
        // The reader panics on a column chunk whose offset or size is negative instead of
        // returning an error, so such metadata is refused before any row group is read.
        for (g, group) in meta.metadata().row_groups().iter().enumerate() {
            for c in group.columns() {
                let start = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
                if start < 0 || c.compressed_size() < 0 {
                    return Err(DataError::Parquet {
                        path: path.to_path_buf(),
                        reason: format!(
                            "row group {g}, column {}: negative offset or size in the metadata",
                            c.column_path()
                        ),
                    });
                }
            }
        }
        Ok(Source { path: path.to_path_buf(), file, meta })
    }
}

impl Batches for Source {
    fn origin(&self) -> &Path {
        &self.path
    }

    fn names(&self) -> Vec<String> {
        self.meta.schema().fields().iter().map(|f| f.name().clone()).collect()
    }

    fn field(&self, i: usize) -> (String, DataType) {
        let f = self.meta.schema().field(i).clone();
        (f.name().clone(), f.data_type().clone())
    }

    fn rows(&self) -> u64 {
        self.meta.metadata().file_metadata().num_rows().max(0) as u64
    }

    fn size(&self) -> u64 {
        self.file.metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Row groups one at a time, only the projected columns.
    fn scan(&self, columns: &[usize], mut each: impl FnMut(&[ArrayRef], usize, usize) -> Result<()>) -> Result<()> {
        let mut roots: Vec<usize> = columns.to_vec();
        roots.sort_unstable();
        roots.dedup();
        let mask = ProjectionMask::roots(self.meta.metadata().file_metadata().schema_descr(), roots.iter().copied());
        let pq =
            |e: parquet::errors::ParquetError| DataError::Parquet { path: self.path.clone(), reason: e.to_string() };
        for g in 0..self.meta.metadata().num_row_groups() {
            let file = self.file.try_clone().map_err(|e| DataError::io(&self.path, e))?;
            let mut reader = contained(&self.path, || {
                ParquetRecordBatchReaderBuilder::new_with_metadata(EofIsError(file), self.meta.clone())
                    .with_projection(mask.clone())
                    .with_row_groups(vec![g])
                    .with_batch_size(BATCH_ROWS)
                    .build()
                    .map_err(pq)
            })?;
            let mut row = 0usize;
            while let Some(batch) = contained(&self.path, || Ok(reader.next()))? {
                let batch: RecordBatch = batch.map_err(|e| DataError::Parquet {
                    path: self.path.clone(),
                    reason: format!("row group {g}: {e}"),
                })?;
                // Projected columns come in file order; map each asked-for column to its array.
                let arrays: Vec<ArrayRef> = columns
                    .iter()
                    .map(|c| {
                        let at = roots.iter().position(|r| r == c).unwrap_or(0);
                        batch.columns().get(at).cloned().unwrap_or_else(|| Arc::new(arrow_array::NullArray::new(0)))
                    })
                    .collect();
                each(&arrays, g, row)?;
                row += batch.num_rows();
            }
        }
        Ok(())
    }
}

/// Runs a call into the Parquet reader, turning a panic of the reader into an error that names
/// the file: the reader has panicked on malformed files (an empty dictionary page that claims no
/// values divides by zero) where it should return an error, and one bad file must not take a
/// whole ingest down with a panic. Only reader calls go through here, so needle's own bugs still
/// panic.
fn contained<T>(path: &Path, call: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)).unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("unknown failure");
        Err(DataError::Parquet {
            path: path.to_path_buf(),
            reason: format!("the Parquet reader failed on this file (malformed or unsupported): {what}"),
        })
    })
}

/// Reads the interaction log of `schema` from the Parquet file `path`.
pub(crate) fn read_log(
    schema: &Schema,
    schema_path: &Path,
    path: &Path,
    opts: &crate::dataset::LoadOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Parts> {
    crate::batches::read_log(&Source::open(path)?, schema, schema_path, opts, progress)
}

/// Reads a catalogue or user table from the Parquet file `path` into `parts`.
pub(crate) fn read_table(
    t: &EntityTable,
    side: Side,
    schema_path: &Path,
    path: &Path,
    opts: &crate::dataset::LoadOptions,
    parts: &mut Parts,
) -> Result<()> {
    crate::batches::read_table(&Source::open(path)?, t, side, schema_path, opts, parts)
}
