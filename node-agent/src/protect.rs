//! Protecting: the noise a trust adds to its bounded aggregates, and the keys it releases,
//! as [`tally_common::privacy::ReleaseNoise`] decided before the data was read.
//!
//! Every draw is an exact discrete Gaussian added to an integer (counts, or sums in fixed
//! point): there is no floating-point path from the data to the noise. Each partial's
//! field carries its noise scale in the metadata key [`NOISE_SD`], in its own units.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Decimal128Type, Field, Int64Type, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use tally_common::noise::add_noise;
use tally_common::privacy::{Keys, NOISE_SD, ReleaseNoise};
use tally_common::{ErrorCode, TallyError};

use tally_kernels::bounding::UNITS;

fn internal(message: &str) -> TallyError {
    TallyError::new(ErrorCode::Internal, message.to_string())
}

/// The noisy partial batch of `noise`'s release (schema `expected`, with each partial's
/// noise scale in its field metadata) from the bounded plan's output `batches`.
pub fn protect(
    noise: &ReleaseNoise,
    expected: &SchemaRef,
    groups: usize,
    batches: &[RecordBatch],
) -> Result<RecordBatch, TallyError> {
    let exact = collect_groups(groups, noise.partials.len(), batches)?;
    let zero = vec![0i128; noise.partials.len() + 1];
    let mut keys: Vec<Vec<ScalarValue>> = Vec::new();
    let mut values: Vec<Vec<i128>> = Vec::new();
    match &noise.keys {
        Keys::Public(domain) => {
            for key in domain {
                keys.push(key.clone());
                values.push(exact.get(key).unwrap_or(&zero).clone());
            }
        }
        Keys::Thresholded { threshold, scale } => {
            let mut rows: Vec<(&Vec<ScalarValue>, &Vec<i128>)> = exact.iter().collect();
            // Output order must not depend on the hash map's order.
            rows.sort_by(|a, b| a.0.partial_cmp(b.0).unwrap_or(std::cmp::Ordering::Equal));
            for (key, row) in rows {
                let units = row[noise.partials.len()];
                if add_noise(units, scale)? >= *threshold {
                    keys.push(key.clone());
                    values.push(row.clone());
                }
            }
        }
    }
    let mut columns: Vec<ArrayRef> = Vec::new();
    for g in 0..groups {
        let field = expected.field(g);
        let scalars = keys.iter().map(|k| k[g].clone());
        let array = if keys.is_empty() {
            arrow::array::new_empty_array(field.data_type())
        } else {
            ScalarValue::iter_to_array(scalars)
                .map_err(|_| internal("a group key could not be built"))?
        };
        let array = arrow::compute::cast(&array, field.data_type())
            .map_err(|_| internal("a group key has the wrong type"))?;
        columns.push(array);
    }
    let mut fields: Vec<Field> = expected.fields()[..groups]
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    for i in 0..noise.partials.len() {
        let field = expected.field(groups + i);
        let scale = &noise.scales[i];
        let noisy = values
            .iter()
            .map(|row| add_noise(row[i], scale))
            .collect::<Result<Vec<i128>, TallyError>>()?;
        // Post-processing of the noisy integers: back from fixed point to the column's units.
        let unit = noise.unit(i);
        // The partial schema holds Int64 or Float64 partials only.
        let array: ArrayRef = if *field.data_type() == DataType::Int64 {
            Arc::new(Int64Array::from_iter_values(noisy.iter().map(|v| {
                let whole = v / unit;
                i64::try_from(whole).unwrap_or(if whole < 0 { i64::MIN } else { i64::MAX })
            })))
        } else if *field.data_type() == DataType::Float64 {
            Arc::new(Float64Array::from_iter_values(
                noisy.iter().map(|v| *v as f64 / unit as f64),
            ))
        } else {
            return Err(internal("a partial has an unexpected type"));
        };
        columns.push(array);
        let sd = noise.sd(i);
        fields.push(
            field
                .as_ref()
                .clone()
                .with_metadata(HashMap::from([(NOISE_SD.to_string(), sd.to_string())])),
        );
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
        .map_err(|_| internal("the noisy release could not be assembled"))
}

/// The exact bounded aggregates by key: the partials, then the patient count.
fn collect_groups(
    groups: usize,
    partials: usize,
    batches: &[RecordBatch],
) -> Result<HashMap<Vec<ScalarValue>, Vec<i128>>, TallyError> {
    let mut out = HashMap::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            let key = (0..groups)
                .map(|g| ScalarValue::try_from_array(batch.column(g), row))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| internal("a group key could not be read"))?;
            let mut values = Vec::with_capacity(partials + 1);
            for p in 0..=partials {
                let index = if p < partials {
                    groups + p
                } else {
                    batch
                        .schema()
                        .index_of(UNITS)
                        .map_err(|_| internal("the bounded plan has no patient count"))?
                };
                values.push(integer_at(batch.column(index), row)?);
            }
            out.insert(key, values);
        }
    }
    Ok(out)
}

/// An exact integer aggregate (Int64 counts, Decimal128 fixed-point sums); NULL is 0.
fn integer_at(array: &ArrayRef, row: usize) -> Result<i128, TallyError> {
    if array.is_null(row) {
        return Ok(0);
    }
    if let Some(counts) = array.as_primitive_opt::<Int64Type>() {
        return Ok(i128::from(counts.value(row)));
    }
    match array.as_primitive_opt::<Decimal128Type>() {
        Some(sums) if sums.scale() == 0 => Ok(sums.value(row)),
        Some(_) | None => Err(internal("a bounded aggregate is not an integer")),
    }
}
