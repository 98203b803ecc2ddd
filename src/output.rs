//! Writing an answer as a table, CSV, JSON or Parquet.

use std::fs::File;
use std::io::Write;
use std::path::Path;

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, StringArray};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use clap::ValueEnum;
use tally_gateway::release::{CI95, DERIVED};

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

/// The batches with every column whose field carries a 95% interval (`tally.ci95`) shown
/// as text, `value ± half-width`, for reading in a terminal.
fn with_intervals(
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<Vec<RecordBatch>, arrow::error::ArrowError> {
    let intervals: Vec<Option<f64>> = schema
        .fields()
        .iter()
        .map(|f| f.metadata().get(CI95).and_then(|v| v.parse().ok()))
        .collect();
    if intervals.iter().all(Option::is_none) {
        return Ok(batches.to_vec());
    }
    let fields: Vec<Field> = schema
        .fields()
        .iter()
        .zip(&intervals)
        .map(|(field, ci)| match ci {
            Some(_) => Field::new(field.name(), DataType::Utf8, true),
            None => field.as_ref().clone(),
        })
        .collect();
    let shown = Arc::new(Schema::new(fields));
    batches
        .iter()
        .map(|batch| {
            let columns = batch
                .columns()
                .iter()
                .zip(&intervals)
                .map(
                    |(column, ci)| -> Result<ArrayRef, arrow::error::ArrowError> {
                        let Some(ci) = ci else {
                            return Ok(column.clone());
                        };
                        let text = cast(column, &DataType::Utf8)?;
                        let text = text.as_string::<i32>();
                        Ok(Arc::new(StringArray::from_iter((0..text.len()).map(
                            |row| {
                                text.is_valid(row).then(|| {
                                    format!("{} ± {}", text.value(row), format_interval(*ci))
                                })
                            },
                        ))))
                    },
                )
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(shown.clone(), columns)
        })
        .collect()
}

/// An interval's half-width with about three significant figures.
fn format_interval(ci: f64) -> String {
    if ci >= 100.0 {
        format!("{ci:.0}")
    } else if ci >= 1.0 {
        format!("{ci:.1}")
    } else {
        format!("{ci:.3}")
    }
}

/// What the ± means, when the answer has any noisy values.
fn accuracy_note(schema: &SchemaRef) -> Option<String> {
    let noisy = schema.fields().iter().any(|f| {
        f.metadata()
            .get(CI95)
            .and_then(|v| v.parse::<f64>().ok())
            .is_some_and(|ci| ci > 0.0)
    });
    let derived = schema
        .fields()
        .iter()
        .any(|f| f.metadata().contains_key(DERIVED));
    match (noisy, derived) {
        (false, false) => None,
        (true, false) => Some(NOISE_NOTE.to_string()),
        (false, true) => Some(DERIVED_NOTE.to_string()),
        (true, true) => Some(format!("{NOISE_NOTE}\n{DERIVED_NOTE}")),
    }
}

const NOISE_NOTE: &str = "± : 95% interval of the differential-privacy noise each trust added.";
const DERIVED_NOTE: &str =
    "Means, variances and standard deviations are ratios of noisy sums and counts.";

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
            let shown = with_intervals(schema, batches).map_err(|e| fail(&e))?;
            let table = arrow::util::pretty::pretty_format_batches(&shown).map_err(|e| fail(&e))?;
            writeln!(out, "{table}").map_err(|e| fail(&e))?;
            if let Some(note) = accuracy_note(schema) {
                writeln!(out, "{note}").map_err(|e| fail(&e))?;
            }
            Ok(())
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
