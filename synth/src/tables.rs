//! Arrow schemas and column builders for the generated tables.

use std::io::Cursor;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Date32Builder, Float64Builder, Int32Builder, RecordBatch, StringBuilder,
};
use arrow::csv::ReaderBuilder;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use crate::episodes::Episode;
use crate::population::Person;

/// Rows buffered per record batch.
pub(crate) const BATCH_ROWS: usize = 65_536;

fn utf8(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

fn int32(name: &str) -> Field {
    Field::new(name, DataType::Int32, false)
}

/// Formats an id such as `RXA-P0000123` into `out`: trust code, `-`,
/// `kind`, then `n` zero-padded to at least `width` digits.
pub(crate) fn format_id(out: &mut String, code: &str, kind: char, n: usize, width: usize) {
    let mut digits = [b'0'; 20];
    let (mut i, mut rest) = (digits.len(), n);
    loop {
        i -= 1;
        digits[i] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    out.clear();
    out.push_str(code);
    out.push('-');
    out.push(kind);
    out.extend(
        digits[i.min(digits.len() - width)..]
            .iter()
            .map(|&d| char::from(d)),
    );
}

/// A set of column builders that can be drained into a record batch.
pub(crate) trait Columns {
    /// The schema of the batches produced.
    fn schema(&self) -> SchemaRef;
    /// Rows appended since the last [`Columns::finish`].
    fn len(&self) -> usize;
    /// Drains the builders into a batch.
    fn finish(&mut self) -> Result<RecordBatch, ArrowError>;
}

/// Builds a batch from finished arrays, checking them against `schema`.
fn batch(schema: &SchemaRef, columns: Vec<ArrayRef>) -> Result<RecordBatch, ArrowError> {
    RecordBatch::try_new(Arc::clone(schema), columns)
}

/// Columns of `patients`.
pub(crate) struct PatientColumns {
    schema: SchemaRef,
    person_id: StringBuilder,
    nhs_number: StringBuilder,
    sex: StringBuilder,
    year_of_birth: Int32Builder,
    ethnicity: StringBuilder,
    postcode: StringBuilder,
    imd_decile: Int32Builder,
}

impl PatientColumns {
    /// Empty builders sized for one batch.
    pub(crate) fn new() -> Self {
        let strings = |bytes: usize| StringBuilder::with_capacity(BATCH_ROWS, BATCH_ROWS * bytes);
        Self {
            schema: Arc::new(Schema::new(vec![
                utf8("person_id", false),
                utf8("nhs_number", false),
                utf8("sex", false),
                int32("year_of_birth"),
                utf8("ethnicity", true),
                utf8("postcode", false),
                int32("imd_decile"),
            ])),
            person_id: strings(12),
            nhs_number: strings(10),
            sex: strings(1),
            year_of_birth: Int32Builder::with_capacity(BATCH_ROWS),
            ethnicity: strings(1),
            postcode: strings(8),
            imd_decile: Int32Builder::with_capacity(BATCH_ROWS),
        }
    }

    /// Appends one patient row.
    pub(crate) fn push(&mut self, person_id: &str, person: &Person, ethnicity: Option<&str>) {
        self.person_id.append_value(person_id);
        self.nhs_number.append_value(&person.nhs_number);
        self.sex.append_value(person.sex);
        self.year_of_birth.append_value(person.year_of_birth);
        self.ethnicity.append_option(ethnicity);
        self.postcode.append_value(&person.postcode);
        self.imd_decile.append_value(person.imd_decile);
    }
}

impl Columns for PatientColumns {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn len(&self) -> usize {
        self.person_id.len()
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        batch(
            &self.schema,
            vec![
                Arc::new(self.person_id.finish()),
                Arc::new(self.nhs_number.finish()),
                Arc::new(self.sex.finish()),
                Arc::new(self.year_of_birth.finish()),
                Arc::new(self.ethnicity.finish()),
                Arc::new(self.postcode.finish()),
                Arc::new(self.imd_decile.finish()),
            ],
        )
    }
}

/// Columns of `episodes`.
pub(crate) struct EpisodeColumns {
    schema: SchemaRef,
    episode_id: StringBuilder,
    person_id: StringBuilder,
    admission_date: Date32Builder,
    discharge_date: Date32Builder,
    admission_method: StringBuilder,
    specialty: StringBuilder,
    diagnosis_icd10: StringBuilder,
    procedure_opcs4: StringBuilder,
    age_at_admission: Int32Builder,
    length_of_stay: Int32Builder,
    cost: Float64Builder,
}

impl EpisodeColumns {
    /// Empty builders sized for one batch.
    pub(crate) fn new() -> Self {
        // A batch is flushed once it holds BATCH_ROWS rows, after a patient
        // who may have added up to 8 rows.
        let rows = BATCH_ROWS + crate::episodes::MAX_EPISODES;
        let strings = |bytes: usize| StringBuilder::with_capacity(rows, rows * bytes);
        let date = |name: &str| Field::new(name, DataType::Date32, false);
        Self {
            schema: Arc::new(Schema::new(vec![
                utf8("episode_id", false),
                utf8("person_id", false),
                date("admission_date"),
                date("discharge_date"),
                utf8("admission_method", false),
                utf8("specialty", false),
                utf8("diagnosis_icd10", false),
                utf8("procedure_opcs4", true),
                int32("age_at_admission"),
                int32("length_of_stay"),
                Field::new("cost", DataType::Float64, false),
            ])),
            episode_id: strings(14),
            person_id: strings(12),
            admission_date: Date32Builder::with_capacity(rows),
            discharge_date: Date32Builder::with_capacity(rows),
            admission_method: strings(2),
            specialty: strings(3),
            diagnosis_icd10: strings(5),
            procedure_opcs4: strings(5),
            age_at_admission: Int32Builder::with_capacity(rows),
            length_of_stay: Int32Builder::with_capacity(rows),
            cost: Float64Builder::with_capacity(rows),
        }
    }

    /// Appends one episode row.
    pub(crate) fn push(&mut self, episode_id: &str, person_id: &str, e: &Episode) {
        self.episode_id.append_value(episode_id);
        self.person_id.append_value(person_id);
        self.admission_date.append_value(e.admission);
        self.discharge_date.append_value(e.discharge);
        self.admission_method.append_value(e.method);
        self.specialty.append_value(e.specialty);
        self.diagnosis_icd10.append_value(e.diagnosis);
        self.procedure_opcs4.append_option(e.procedure);
        self.age_at_admission.append_value(e.age);
        self.length_of_stay.append_value(e.length_of_stay);
        self.cost.append_value(e.cost);
    }
}

impl Columns for EpisodeColumns {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn len(&self) -> usize {
        self.episode_id.len()
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        batch(
            &self.schema,
            vec![
                Arc::new(self.episode_id.finish()),
                Arc::new(self.person_id.finish()),
                Arc::new(self.admission_date.finish()),
                Arc::new(self.discharge_date.finish()),
                Arc::new(self.admission_method.finish()),
                Arc::new(self.specialty.finish()),
                Arc::new(self.diagnosis_icd10.finish()),
                Arc::new(self.procedure_opcs4.finish()),
                Arc::new(self.age_at_admission.finish()),
                Arc::new(self.length_of_stay.finish()),
                Arc::new(self.cost.finish()),
            ],
        )
    }
}

/// Columns of `opt_outs`.
pub(crate) struct OptOutColumns {
    schema: SchemaRef,
    nhs_number: StringBuilder,
}

impl OptOutColumns {
    /// An empty builder.
    pub(crate) fn new() -> Self {
        Self {
            schema: Arc::new(Schema::new(vec![utf8("nhs_number", false)])),
            nhs_number: StringBuilder::new(),
        }
    }

    /// Appends one opted-out NHS number.
    pub(crate) fn push(&mut self, nhs_number: &str) {
        self.nhs_number.append_value(nhs_number);
    }
}

impl Columns for OptOutColumns {
    fn schema(&self) -> SchemaRef {
        Arc::clone(&self.schema)
    }

    fn len(&self) -> usize {
        self.nhs_number.len()
    }

    fn finish(&mut self) -> Result<RecordBatch, ArrowError> {
        batch(&self.schema, vec![Arc::new(self.nhs_number.finish())])
    }
}

/// The public ICD-10 chapter reference table, parsed from
/// [`crate::ICD10_CHAPTERS_CSV`] as one batch.
pub(crate) fn icd10_chapters() -> Result<RecordBatch, ArrowError> {
    let schema = Arc::new(Schema::new(
        ["chapter", "code_from", "code_to", "title"]
            .map(|name| utf8(name, false))
            .to_vec(),
    ));
    let reader = ReaderBuilder::new(Arc::clone(&schema))
        .with_header(true)
        .build(Cursor::new(crate::ICD10_CHAPTERS_CSV))?;
    let batches = reader.collect::<Result<Vec<_>, _>>()?;
    arrow::compute::concat_batches(&schema, &batches)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_zero_padded() {
        let mut id = String::new();
        format_id(&mut id, "RXA", 'P', 123, 7);
        assert_eq!(id, "RXA-P0000123");
        format_id(&mut id, "RXB", 'E', 0, 9);
        assert_eq!(id, "RXB-E000000000");
        format_id(&mut id, "RXC", 'P', 123_456_789, 7);
        assert_eq!(id, "RXC-P123456789");
    }

    #[test]
    fn reference_table_has_all_chapters() {
        let batch = icd10_chapters().expect("parse");
        assert_eq!(batch.num_rows(), 22);
        assert_eq!(batch.num_columns(), 4);
    }
}
