//! Crash-safe output: every file is written under a temporary name, synced
//! and then renamed into place, so a final name never holds partial data.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use parquet::schema::types::ColumnPath;

use crate::SynthError;
use crate::tables::{BATCH_ROWS, Columns};

/// Rows per Parquet row group.
const ROW_GROUP_ROWS: usize = 1 << 20;

/// Wraps an I/O error with the path it concerns.
pub(crate) fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// The temporary sibling that `path` is written to before the rename.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// Syncs `file` at `temp` and renames it to `path`.
fn publish(file: File, temp: &Path, path: &Path) -> Result<(), SynthError> {
    file.sync_all().map_err(io_error(temp))?;
    drop(file);
    fs::rename(temp, path).map_err(io_error(path))
}

/// Writes `bytes` to `path` atomically.
pub(crate) fn write_file(path: &Path, bytes: &[u8]) -> Result<(), SynthError> {
    let temp = temp_path(path);
    let mut file = File::create(&temp).map_err(io_error(&temp))?;
    file.write_all(bytes).map_err(io_error(&temp))?;
    publish(file, &temp, path)
}

/// Writer settings: zstd, ~1M-row row groups, and no dictionary for the
/// `unique` columns, whose values are (nearly) all distinct.
fn properties(unique: &[&str]) -> Result<WriterProperties, SynthError> {
    let mut props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS));
    for &column in unique {
        props = props.set_column_dictionary_enabled(ColumnPath::from(column), false);
    }
    Ok(props.build())
}

/// A Parquet table being streamed to disk in record batches.
pub(crate) struct Table<C: Columns> {
    /// Builders for the batch in progress.
    pub columns: C,
    /// `None` once committed.
    writer: Option<ArrowWriter<File>>,
    temp: PathBuf,
    path: PathBuf,
}

impl<C: Columns> Table<C> {
    /// Starts writing `path` (via its temporary name); see [`properties`]
    /// for `unique`.
    pub(crate) fn create(path: PathBuf, columns: C, unique: &[&str]) -> Result<Self, SynthError> {
        let props = properties(unique)?;
        let temp = temp_path(&path);
        let file = File::create(&temp).map_err(io_error(&temp))?;
        let writer = ArrowWriter::try_new(file, columns.schema(), Some(props))?;
        Ok(Self {
            columns,
            writer: Some(writer),
            temp,
            path,
        })
    }

    /// Writes the batch in progress once it is full.
    pub(crate) fn flush_if_full(&mut self) -> Result<(), SynthError> {
        if self.columns.len() >= BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), SynthError> {
        let batch = self.columns.finish()?;
        if let Some(writer) = self.writer.as_mut() {
            writer.write(&batch)?;
        }
        Ok(())
    }

    /// Writes remaining rows and the footer, then publishes the file.
    pub(crate) fn commit(mut self) -> Result<(), SynthError> {
        if self.columns.len() > 0 {
            self.flush()?;
        }
        match self.writer.take() {
            Some(writer) => publish(writer.into_inner()?, &self.temp, &self.path),
            None => Ok(()),
        }
    }
}

impl<C: Columns> Drop for Table<C> {
    /// Removes the temporary file of a table that was never committed.
    fn drop(&mut self) {
        if self.writer.take().is_some() {
            // Best effort: the error that aborted the write is what matters.
            let _ = fs::remove_file(&self.temp);
        }
    }
}

/// Writes one small in-memory batch as a complete Parquet file at `path`.
pub(crate) fn write_batch(path: &Path, batch: &RecordBatch) -> Result<(), SynthError> {
    let mut writer = ArrowWriter::try_new(Vec::new(), batch.schema(), Some(properties(&[])?))?;
    writer.write(batch)?;
    write_file(path, &writer.into_inner()?)
}
