//! The hidden patient count behind disclosure control, computed cheaply.
//!
//! Small-number suppression only asks whether a group has *at least* k distinct patients,
//! so each trust counts distinct patients per group only up to [`PATIENT_COUNT_CAP`]:
//! `__tally_patients_upto(person_id)` keeps the 64-bit hashes of at most that many distinct
//! ids per group and skips whole batches once it has them. An exact
//! `COUNT(DISTINCT person_id)` keeps every id string of every group, which made disclosure
//! control cost more than the query itself on large tables. (Two ids whose hashes collide
//! count once: again a smaller count, never a larger one.)
//!
//! Capping can only make counts smaller, so it can only suppress more, never less: for any
//! threshold up to the cap, the sum over trusts of capped counts reaches the threshold
//! exactly when the sum of true counts does (person ids are per trust).

use std::collections::HashSet;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, ListArray, UInt64Array};
use arrow::array::{BooleanArray, Int64Array};
use arrow::datatypes::{DataType, Field, FieldRef, UInt64Type};
use datafusion::common::hash_utils::{HLL_RANDOM_STATE, create_hashes};
use datafusion::common::{Result, ScalarValue};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, EmitTo, GroupsAccumulator, Signature, Volatility,
};

/// The name of the capped distinct count the gateway asks every trust for.
pub const PATIENTS_UPTO: &str = "__tally_patients_upto";

/// Distinct patients are counted per group up to this many; thresholds above it would
/// suppress more than they need to (never less).
pub const PATIENT_COUNT_CAP: usize = 1_000;

/// The `__tally_patients_upto` aggregate.
pub fn patients_upto_udaf() -> AggregateUDF {
    AggregateUDF::new_from_impl(PatientsUpTo {
        signature: Signature::any(1, Volatility::Immutable),
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct PatientsUpTo {
    signature: Signature,
}

impl AggregateUDFImpl for PatientsUpTo {
    fn name(&self) -> &str {
        PATIENTS_UPTO
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn is_nullable(&self) -> bool {
        false
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        Ok(vec![Arc::new(Field::new_list(
            format!("{}[hashes]", args.name),
            Field::new_list_field(DataType::UInt64, true),
            true,
        ))])
    }

    fn accumulator(&self, _args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        Ok(Box::new(UpToAccumulator::default()))
    }

    fn groups_accumulator_supported(&self, _args: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _args: AccumulatorArgs,
    ) -> Result<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(UpToGroups::default()))
    }

    fn default_value(&self, _data_type: &DataType) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(0)))
    }
}

/// The hashes of up to [`PATIENT_COUNT_CAP`] distinct non-null values.
#[derive(Debug, Default)]
struct UpToAccumulator {
    seen: HashSet<u64>,
}

impl UpToAccumulator {
    fn full(&self) -> bool {
        self.seen.len() >= PATIENT_COUNT_CAP
    }

    fn insert(&mut self, hashes: impl IntoIterator<Item = u64>) {
        for hash in hashes {
            if self.full() {
                break;
            }
            self.seen.insert(hash);
        }
    }

    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let mut hashes = vec![0; values.len()];
        create_hashes([values], &HLL_RANDOM_STATE, &mut hashes)?;
        let valid = (0..values.len()).filter(|&row| values.is_valid(row));
        self.insert(valid.map(|row| hashes[row]));
        Ok(())
    }
}

impl Accumulator for UpToAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        match values.first() {
            Some(values) if !self.full() => self.add(values),
            _ => Ok(()),
        }
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        let Some(lists) = states.first() else {
            return Ok(());
        };
        let lists = as_hash_lists(lists)?;
        for list in lists.iter().flatten() {
            if self.full() {
                break;
            }
            let hashes = list.as_primitive::<UInt64Type>();
            self.insert(hashes.iter().flatten());
        }
        Ok(())
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        let hashes = UInt64Array::from_iter_values(self.seen.iter().copied());
        Ok(vec![ScalarValue::List(Arc::new(hash_lists(
            [hashes.len()],
            hashes,
        )))])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(ScalarValue::Int64(Some(self.seen.len() as i64)))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.seen.capacity() * std::mem::size_of::<u64>()
    }
}

/// The state column: one list of value hashes per group, of the given lengths.
fn hash_lists(lengths: impl IntoIterator<Item = usize>, hashes: UInt64Array) -> ListArray {
    ListArray::new(
        Arc::new(Field::new_list_field(DataType::UInt64, true)),
        arrow::buffer::OffsetBuffer::from_lengths(lengths),
        Arc::new(hashes),
        None,
    )
}

/// Reads a state column written by [`hash_lists`].
fn as_hash_lists(state: &ArrayRef) -> Result<&ListArray> {
    state
        .as_any()
        .downcast_ref::<ListArray>()
        .ok_or_else(|| datafusion::error::DataFusionError::Internal("list state".into()))
}

/// The hashes of up to [`PATIENT_COUNT_CAP`] distinct values, per group: one pass over
/// each batch for all groups.
#[derive(Debug, Default)]
struct UpToGroups {
    seen: Vec<HashSet<u64>>,
}

impl UpToGroups {
    fn insert(&mut self, group: usize, hash: u64) {
        let set = &mut self.seen[group];
        if set.len() < PATIENT_COUNT_CAP {
            set.insert(hash);
        }
    }

    fn grow(&mut self, total_num_groups: usize) {
        if self.seen.len() < total_num_groups {
            self.seen.resize_with(total_num_groups, HashSet::new);
        }
    }
}

impl GroupsAccumulator for UpToGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&BooleanArray>,
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let Some(values) = values.first() else {
            return Ok(());
        };
        let mut hashes = vec![0; values.len()];
        create_hashes([values], &HLL_RANDOM_STATE, &mut hashes)?;
        for (row, &group) in group_indices.iter().enumerate() {
            let kept = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
            if kept && values.is_valid(row) {
                self.insert(group, hashes[row]);
            }
        }
        Ok(())
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> Result<ArrayRef> {
        let sets = emit_to.take_needed(&mut self.seen);
        Ok(Arc::new(Int64Array::from_iter_values(
            sets.iter().map(|set| set.len() as i64),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> Result<Vec<ArrayRef>> {
        let sets = emit_to.take_needed(&mut self.seen);
        let hashes = UInt64Array::from_iter_values(sets.iter().flatten().copied());
        Ok(vec![Arc::new(hash_lists(
            sets.iter().map(HashSet::len),
            hashes,
        ))])
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> Result<()> {
        self.grow(total_num_groups);
        let Some(lists) = values.first() else {
            return Ok(());
        };
        let lists = as_hash_lists(lists)?;
        for (row, &group) in group_indices.iter().enumerate() {
            if lists.is_valid(row) {
                let list = lists.value(row);
                for hash in list.as_primitive::<UInt64Type>().iter().flatten() {
                    self.insert(group, hash);
                }
            }
        }
        Ok(())
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&BooleanArray>,
    ) -> Result<Vec<ArrayRef>> {
        let Some(values) = values.first() else {
            return Ok(Vec::new());
        };
        let mut hashes = vec![0; values.len()];
        create_hashes([values], &HLL_RANDOM_STATE, &mut hashes)?;
        let kept: Vec<bool> = (0..values.len())
            .map(|row| {
                values.is_valid(row) && opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row))
            })
            .collect();
        let items = UInt64Array::from_iter_values(
            hashes
                .iter()
                .zip(&kept)
                .filter(|(_, k)| **k)
                .map(|(h, _)| *h),
        );
        Ok(vec![Arc::new(hash_lists(
            kept.iter().map(|&k| usize::from(k)),
            items,
        ))])
    }

    fn size(&self) -> usize {
        self.seen.capacity() * std::mem::size_of::<HashSet<u64>>()
            + self
                .seen
                .iter()
                .map(|set| set.capacity() * std::mem::size_of::<u64>())
                .sum::<usize>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::StringArray;

    fn ids(range: std::ops::Range<usize>) -> ArrayRef {
        Arc::new(StringArray::from_iter_values(
            range.map(|n| format!("P{n}")),
        ))
    }

    fn accumulator() -> UpToAccumulator {
        UpToAccumulator::default()
    }

    #[test]
    fn counts_distinct_ids_exactly_below_the_cap_and_stops_at_it() {
        let mut small = accumulator();
        small.update_batch(&[ids(0..5)]).unwrap();
        small.update_batch(&[ids(3..9)]).unwrap();
        assert_eq!(small.evaluate().unwrap(), ScalarValue::Int64(Some(9)));

        let mut large = accumulator();
        large.update_batch(&[ids(0..5_000)]).unwrap();
        assert_eq!(
            large.evaluate().unwrap(),
            ScalarValue::Int64(Some(PATIENT_COUNT_CAP as i64))
        );
    }

    #[test]
    fn groups_count_up_to_the_cap_and_merge_their_states() {
        let mut groups = UpToGroups::default();
        let rows = 3_000;
        let group_of: Vec<usize> = (0..rows).map(|n| n % 3).collect();
        groups
            .update_batch(&[ids(0..rows)], &group_of, None, 3)
            .unwrap();
        groups.update_batch(&[ids(0..2)], &[2, 2], None, 4).unwrap();
        let state = groups.state(EmitTo::All).unwrap();
        let mut merged = UpToGroups::default();
        merged.merge_batch(&state, &[0, 1, 0, 3], 4).unwrap();
        let counts = merged.evaluate(EmitTo::All).unwrap();
        let counts = counts.as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(counts.values().to_vec(), vec![1_000, 1_000, 0, 0]);
        let mut small = UpToGroups::default();
        small
            .update_batch(&[ids(0..4)], &[0, 1, 0, 1], None, 2)
            .unwrap();
        let counts = small.evaluate(EmitTo::All).unwrap();
        let counts = counts.as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(counts.values().to_vec(), vec![2, 2]);
    }

    #[test]
    fn full_groups_stay_full_and_filters_and_nulls_hold() {
        let mut groups = UpToGroups::default();
        groups
            .update_batch(
                &[ids(0..PATIENT_COUNT_CAP + 10)],
                &vec![0; PATIENT_COUNT_CAP + 10],
                None,
                2,
            )
            .unwrap();
        // Group 0 is full; group 1 gets ids 0..8 with P3 filtered out, a null, and repeats.
        let values: ArrayRef = Arc::new(StringArray::from(vec![
            Some("P0"),
            Some("X"),
            Some("P1"),
            Some("P2"),
            Some("P3"),
            None,
            Some("P1"),
            Some("P4"),
        ]));
        let group_of = [1, 0, 1, 1, 1, 1, 1, 1];
        let filter = BooleanArray::from(vec![true, true, true, true, false, true, true, true]);
        groups
            .update_batch(&[values], &group_of, Some(&filter), 2)
            .unwrap();
        let counts = groups.evaluate(EmitTo::All).unwrap();
        let counts = counts.as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(counts.values().to_vec(), vec![PATIENT_COUNT_CAP as i64, 4]);
    }

    #[test]
    fn partial_states_merge_without_double_counting() {
        let mut left = accumulator();
        left.update_batch(&[ids(0..6)]).unwrap();
        let mut right = accumulator();
        right.update_batch(&[ids(4..10)]).unwrap();
        let state = right.state().unwrap();
        let ScalarValue::List(list) = &state[0] else {
            panic!("list state");
        };
        left.merge_batch(&[list.clone() as ArrayRef]).unwrap();
        assert_eq!(left.evaluate().unwrap(), ScalarValue::Int64(Some(10)));
    }
}
