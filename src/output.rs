//! Writing an answer as a table, CSV, JSON or Parquet.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use clap::ValueEnum;

/// Output formats of `tally query`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// An aligned text table.
    Table,
    /// CSV with a header row.
    Csv,
    /// A JSON array of objects.
    Json,
    /// Apache Parquet (needs --output).
    Parquet,
}

/// Writes `batches` in `format` to `out`, or for Parquet to the file `path`.
pub fn write(
    format: Format,
    schema: &SchemaRef,
    batches: &[RecordBatch],
    out: &mut dyn Write,
    path: Option<&Path>,
) -> Result<(), String> {
    let fail = |e: &dyn std::fmt::Display| format!("could not write the answer: {e}");
    match format {
        Format::Table => {
            let table =
                arrow::util::pretty::pretty_format_batches(batches).map_err(|e| fail(&e))?;
            writeln!(out, "{table}").map_err(|e| fail(&e))
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(out);
            if batches.is_empty() {
                writer
                    .write(&RecordBatch::new_empty(schema.clone()))
                    .map_err(|e| fail(&e))?;
            }
            batches
                .iter()
                .try_for_each(|b| writer.write(b))
                .map_err(|e| fail(&e))
        }
        Format::Json => {
            let mut writer = arrow::json::ArrayWriter::new(out);
            let refs: Vec<&RecordBatch> = batches.iter().collect();
            writer.write_batches(&refs).map_err(|e| fail(&e))?;
            writer.finish().map_err(|e| fail(&e))
        }
        Format::Parquet => {
            let path = path.ok_or("--format parquet needs --output FILE")?;
            let file = File::create(path).map_err(|e| fail(&e))?;
            let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema.clone(), None)
                .map_err(|e| fail(&e))?;
            batches
                .iter()
                .try_for_each(|b| writer.write(b))
                .map_err(|e| fail(&e))?;
            writer.close().map(|_| ()).map_err(|e| fail(&e))
        }
    }
}
