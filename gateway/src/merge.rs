//! Merging: the trusts' partials for one release become one row per group, by adding each
//! partial across trusts (counts and integer sums with overflow checks).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, UInt32Array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{DataType, Float64Type, Int64Type, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow::row::{RowConverter, SortField};
use tally_common::{ErrorCode, TallyError};

fn internal(what: &str) -> TallyError {
    tracing::error!(what, "merging partials failed");
    TallyError::new(
        ErrorCode::Internal,
        "the trusts' partial results could not be merged",
    )
}

fn overflow() -> TallyError {
    TallyError::new(
        ErrorCode::Execution,
        "a merged count or sum does not fit in 64 bits",
    )
}

/// Merges `partitions` (batches of `schema`: `groups` key columns, then partials) into one
/// batch of `schema` with one row per distinct key.
pub fn merge_partials(
    schema: &SchemaRef,
    groups: usize,
    partitions: Vec<Vec<RecordBatch>>,
) -> Result<RecordBatch, TallyError> {
    let batches: Vec<RecordBatch> = partitions.into_iter().flatten().collect();
    let all = concat_batches(schema, &batches).map_err(|e| internal(&e.to_string()))?;
    let (slots, first_row) = if groups == 0 {
        // No keys: every partial row belongs to the one group (a row converter over no
        // columns would see no rows at all).
        let first: Vec<u32> = if all.num_rows() == 0 {
            Vec::new()
        } else {
            vec![0]
        };
        (vec![0; all.num_rows()], first)
    } else {
        group_slots(&all, groups)?
    };
    let firsts = UInt32Array::from(first_row);
    let mut columns: Vec<ArrayRef> = all.columns()[..groups]
        .iter()
        .map(|key| take(key, &firsts, None).map_err(|e| internal(&e.to_string())))
        .collect::<Result<_, _>>()?;
    for partial in &all.columns()[groups..] {
        columns.push(add_up(partial, &slots, firsts.len())?);
    }
    RecordBatch::try_new(schema.clone(), columns).map_err(|e| internal(&e.to_string()))
}

/// The group each row belongs to, and the first row of each group, by the first `groups`
/// columns.
fn group_slots(all: &RecordBatch, groups: usize) -> Result<(Vec<usize>, Vec<u32>), TallyError> {
    let fields: Vec<SortField> = all.schema().fields()[..groups]
        .iter()
        .map(|f| SortField::new(f.data_type().clone()))
        .collect();
    let converter = RowConverter::new(fields).map_err(|e| internal(&e.to_string()))?;
    let rows = converter
        .convert_columns(&all.columns()[..groups])
        .map_err(|e| internal(&e.to_string()))?;
    let mut slot_of: HashMap<Box<[u8]>, usize> = HashMap::new();
    let mut first_row: Vec<u32> = Vec::new();
    let mut slots: Vec<usize> = Vec::with_capacity(all.num_rows());
    for (index, row) in rows.iter().enumerate() {
        let next = first_row.len();
        let slot = *slot_of.entry(row.as_ref().into()).or_insert(next);
        if slot == next {
            first_row.push(u32::try_from(index).map_err(|_| internal("too many rows"))?);
        }
        slots.push(slot);
    }
    Ok((slots, first_row))
}

/// Adds `values` into `slots` groups (NULL counts as nothing; a group with no value at all
/// stays NULL).
fn add_up(values: &ArrayRef, slots: &[usize], groups: usize) -> Result<ArrayRef, TallyError> {
    match values.data_type() {
        DataType::Int64 => {
            let values = values.as_primitive::<Int64Type>();
            let mut sums: Vec<Option<i64>> = vec![None; groups];
            for (row, slot) in slots.iter().enumerate() {
                if values.is_valid(row) {
                    let sum = sums[*slot].unwrap_or(0);
                    sums[*slot] = Some(sum.checked_add(values.value(row)).ok_or_else(overflow)?);
                }
            }
            Ok(Arc::new(Int64Array::from(sums)))
        }
        DataType::Float64 => {
            let values = values.as_primitive::<Float64Type>();
            let mut sums: Vec<Option<f64>> = vec![None; groups];
            for (row, slot) in slots.iter().enumerate() {
                if values.is_valid(row) {
                    sums[*slot] = Some(sums[*slot].unwrap_or(0.0) + values.value(row));
                }
            }
            Ok(Arc::new(Float64Array::from(sums)))
        }
        other => Err(internal(&format!("unexpected partial type {other}"))),
    }
}
