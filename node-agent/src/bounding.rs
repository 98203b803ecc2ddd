//! Bounding: the keyed hash that chooses which of a patient's groups count when a patient
//! falls in more groups than the bounds allow (see [`tally_common::privacy`]).
//!
//! The node aggregates per (patient, group) first and keeps at most `groups_per_unit`
//! groups of each patient: those whose keyed hash of patient and group ranks lowest, so the
//! choice depends on neither data order nor anything an analyst controls.

use std::path::Path;
use std::sync::Arc;

use arrow::array::UInt64Array;
use arrow::array::{Array, ArrayRef, UInt64Builder};
use arrow::datatypes::DataType;
use arrow::datatypes::{Field, FieldRef, UInt64Type};
use datafusion::common::ScalarValue;
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, ColumnarValue, EmitTo, GroupsAccumulator,
    ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use std::hash::Hasher as _;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use siphasher::sip::SipHasher24;
use tally_common::{ErrorCode, TallyError};

/// The name of the keyed-hash function in the node's plans.
pub const KEYED_RANK: &str = "__tally_keyed_rank";

/// The node's secret for the keyed hash, kept in `<state>/bounding.key` (created with
/// random bytes the first time).
pub fn load_or_create_key(state: &Path) -> Result<[u8; 32], TallyError> {
    let path = state.join("bounding.key");
    let broken = |why: String| {
        tracing::error!(path = %path.display(), %why, "the bounding key");
        TallyError::new(
            ErrorCode::Internal,
            "this trust's contribution-bounding key cannot be read",
        )
    };
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| broken("not 32 bytes".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            std::fs::write(&path, key)
                .and_then(|()| std::fs::File::open(&path)?.sync_all())
                .map_err(|e| broken(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(broken(e.to_string())),
    }
}

/// `__tally_keyed_rank(unit, g0, g1, ...)`: SipHash-2-4 (a keyed pseudo-random function)
/// of the arguments under the node's secret, as an unsigned 64-bit number. Ordering a patient's
/// groups by it picks the same groups for the same patient every time, independently of
/// the order rows arrive in, and an analyst who does not know the secret cannot steer it.
#[derive(Debug, PartialEq, Eq, Hash)]
struct KeyedRank {
    key: [u8; 32],
    signature: Signature,
}

impl ScalarUDFImpl for KeyedRank {
    fn name(&self) -> &str {
        KEYED_RANK
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let arrays: Vec<ArrayRef> = args
            .args
            .iter()
            .map(|arg| arg.to_array(rows))
            .collect::<DfResult<_>>()?;
        let columns = arrays.iter().map(hashable).collect::<DfResult<Vec<_>>>()?;
        let (k0, k1) = self.keys();
        let mut out = UInt64Builder::with_capacity(rows);
        for row in 0..rows {
            let mut hasher = SipHasher24::new_with_keys(k0, k1);
            for column in &columns {
                column.write(row, &mut hasher);
            }
            out.append_value(hasher.finish());
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

impl KeyedRank {
    /// The two SipHash keys, from the node's secret.
    fn keys(&self) -> (u64, u64) {
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(&self.key[..8]);
        k1.copy_from_slice(&self.key[8..16]);
        (u64::from_le_bytes(k0), u64::from_le_bytes(k1))
    }
}

/// One argument of the keyed rank, read without allocating per row: text as its bytes,
/// integers and dates as 64-bit numbers, anything else as its text.
enum Hashable {
    Text(arrow::array::StringArray),
    Number(arrow::array::Int64Array),
}

impl Hashable {
    fn write(&self, row: usize, hasher: &mut SipHasher24) {
        match self {
            Hashable::Text(values) if values.is_valid(row) => {
                hasher.write_u8(1);
                let value = values.value(row).as_bytes();
                hasher.write_usize(value.len());
                hasher.write(value);
            }
            Hashable::Number(values) if values.is_valid(row) => {
                hasher.write_u8(2);
                hasher.write_i64(values.value(row));
            }
            Hashable::Text(_) | Hashable::Number(_) => hasher.write_u8(0),
        }
    }
}

fn hashable(array: &ArrayRef) -> DfResult<Hashable> {
    let data_type = array.data_type();
    if data_type.is_integer() || matches!(data_type, DataType::Date32 | DataType::Date64) {
        let numbers = arrow::compute::cast(array, &DataType::Int64)?;
        return Ok(Hashable::Number(
            numbers.as_primitive::<Int64Type>().clone(),
        ));
    }
    let text = arrow::compute::cast(array, &DataType::Utf8)?;
    match text.as_any().downcast_ref::<arrow::array::StringArray>() {
        Some(strings) => Ok(Hashable::Text(strings.clone())),
        None => exec_err!("the keyed rank needs text arguments"),
    }
}

/// The keyed-rank function for the node's plans, with the node's secret.
pub fn keyed_rank_udf(key: [u8; 32]) -> ScalarUDF {
    ScalarUDF::new_from_impl(KeyedRank {
        key,
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

/// The name of the cut-off aggregate in the node's plans.
pub const GROUP_CUT: &str = "__tally_group_cut";

/// `__tally_group_cut(rank)` per patient: the `k`-th smallest keyed rank among the
/// patient's groups, or NULL when the patient has at most `k` (every group counts). The
/// groups whose rank is at most the cut are the `k` the patient contributes to.
#[derive(Debug, PartialEq, Eq, Hash)]
struct GroupCut {
    k: usize,
    signature: Signature,
}

/// The cut-off aggregate keeping `k` groups per patient.
pub fn group_cut_udaf(k: usize) -> AggregateUDF {
    AggregateUDF::new_from_impl(GroupCut {
        k: k.max(1),
        signature: Signature::exact(vec![DataType::UInt64], Volatility::Immutable),
    })
}

impl AggregateUDFImpl for GroupCut {
    fn name(&self) -> &str {
        GROUP_CUT
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }

    fn state_fields(&self, _: StateFieldsArgs) -> DfResult<Vec<FieldRef>> {
        Ok((0..self.k)
            .map(|i| Arc::new(Field::new(format!("smallest_{i}"), DataType::UInt64, true)))
            .collect())
    }

    fn accumulator(&self, _: AccumulatorArgs) -> DfResult<Box<dyn Accumulator>> {
        Ok(Box::new(CutAccumulator {
            cuts: Smallest::new(self.k),
        }))
    }

    fn groups_accumulator_supported(&self, _: AccumulatorArgs) -> bool {
        true
    }

    fn create_groups_accumulator(
        &self,
        _: AccumulatorArgs,
    ) -> DfResult<Box<dyn GroupsAccumulator>> {
        Ok(Box::new(CutGroups {
            k: self.k,
            groups: Vec::new(),
        }))
    }
}

/// The `k` smallest ranks seen for one patient, ascending.
#[derive(Debug, Clone)]
struct Smallest {
    k: usize,
    ranks: Vec<u64>,
}

impl Smallest {
    fn new(k: usize) -> Self {
        Smallest {
            k,
            ranks: Vec::with_capacity(k),
        }
    }

    fn add(&mut self, rank: u64) {
        if self.ranks.len() == self.k && self.ranks.last().is_some_and(|last| rank >= *last) {
            return;
        }
        let at = self.ranks.partition_point(|r| *r < rank);
        self.ranks.insert(at, rank);
        self.ranks.truncate(self.k);
    }

    /// The cut: the k-th smallest, or none when there were at most k.
    fn cut(&self) -> Option<u64> {
        (self.ranks.len() == self.k).then(|| self.ranks[self.k - 1])
    }

    fn add_column(&mut self, column: &ArrayRef, row: usize) -> DfResult<()> {
        let values = column.as_primitive_opt::<UInt64Type>();
        let Some(values) = values else {
            return exec_err!("the group cut needs UInt64 ranks");
        };
        if values.is_valid(row) {
            self.add(values.value(row));
        }
        Ok(())
    }
}

#[derive(Debug)]
struct CutAccumulator {
    cuts: Smallest,
}

impl Accumulator for CutAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> DfResult<()> {
        let [ranks] = values else {
            return exec_err!("the group cut takes one argument");
        };
        for row in 0..ranks.len() {
            self.cuts.add_column(ranks, row)?;
        }
        Ok(())
    }

    fn evaluate(&mut self) -> DfResult<ScalarValue> {
        Ok(ScalarValue::UInt64(self.cuts.cut()))
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self) + self.cuts.ranks.capacity() * 8
    }

    fn state(&mut self) -> DfResult<Vec<ScalarValue>> {
        Ok((0..self.cuts.k)
            .map(|i| ScalarValue::UInt64(self.cuts.ranks.get(i).copied()))
            .collect())
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> DfResult<()> {
        for column in states {
            for row in 0..column.len() {
                self.cuts.add_column(column, row)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct CutGroups {
    k: usize,
    groups: Vec<Smallest>,
}

impl CutGroups {
    fn add(
        &mut self,
        columns: &[ArrayRef],
        group_indices: &[usize],
        filter: Option<&arrow::array::BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        let k = self.k;
        self.groups
            .resize_with(total_num_groups, || Smallest::new(k));
        for column in columns {
            for (row, group) in group_indices.iter().enumerate() {
                if filter.is_some_and(|f| !f.is_valid(row) || !f.value(row)) {
                    continue;
                }
                self.groups[*group].add_column(column, row)?;
            }
        }
        Ok(())
    }
}

impl GroupsAccumulator for CutGroups {
    fn update_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        opt_filter: Option<&arrow::array::BooleanArray>,
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.add(values, group_indices, opt_filter, total_num_groups)
    }

    fn evaluate(&mut self, emit_to: EmitTo) -> DfResult<ArrayRef> {
        let groups = emit_to.take_needed(&mut self.groups);
        Ok(Arc::new(UInt64Array::from_iter(
            groups.iter().map(Smallest::cut),
        )))
    }

    fn state(&mut self, emit_to: EmitTo) -> DfResult<Vec<ArrayRef>> {
        let groups = emit_to.take_needed(&mut self.groups);
        Ok((0..self.k)
            .map(|i| {
                Arc::new(UInt64Array::from_iter(
                    groups.iter().map(|g| g.ranks.get(i).copied()),
                )) as ArrayRef
            })
            .collect())
    }

    fn merge_batch(
        &mut self,
        values: &[ArrayRef],
        group_indices: &[usize],
        total_num_groups: usize,
    ) -> DfResult<()> {
        self.add(values, group_indices, None, total_num_groups)
    }

    fn convert_to_state(
        &self,
        values: &[ArrayRef],
        opt_filter: Option<&arrow::array::BooleanArray>,
    ) -> DfResult<Vec<ArrayRef>> {
        let [ranks] = values else {
            return exec_err!("the group cut takes one argument");
        };
        let Some(ranks) = ranks.as_primitive_opt::<UInt64Type>() else {
            return exec_err!("the group cut needs UInt64 ranks");
        };
        let first: UInt64Array = (0..ranks.len())
            .map(|row| {
                let kept = opt_filter.is_none_or(|f| f.is_valid(row) && f.value(row));
                (kept && ranks.is_valid(row)).then(|| ranks.value(row))
            })
            .collect();
        let mut state: Vec<ArrayRef> = vec![Arc::new(first)];
        for _ in 1..self.k {
            state.push(arrow::array::new_null_array(&DataType::UInt64, ranks.len()));
        }
        Ok(state)
    }

    fn size(&self) -> usize {
        self.groups.capacity() * (std::mem::size_of::<Smallest>() + self.k * 8)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounding_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_key(dir.path()).unwrap();
        let second = load_or_create_key(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_ne!(first, [0u8; 32]);
        std::fs::write(dir.path().join("bounding.key"), b"short").unwrap();
        assert_eq!(
            load_or_create_key(dir.path()).unwrap_err().code,
            ErrorCode::Internal
        );
    }
}
