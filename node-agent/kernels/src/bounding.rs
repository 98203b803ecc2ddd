//! Bounding: what one patient may add to a release, enforced while the rows stream past.
//!
//! A bounded release's rows reach [`BoundedTotals`] ordered by patient: each table with a
//! privacy unit is kept in that order at the node (see the node agent's `tables`), and the plan
//! sorts when it is not. For each patient in turn the node gathers the rows per group,
//! keeps at most `groups_per_unit` of that patient's groups (those whose keyed hash of
//! patient and group ranks lowest, so the choice depends on neither data order nor anything
//! an analyst controls), caps and clamps what the patient adds to each kept group, and adds
//! it to the group's totals. One pass over the rows, holding one patient and the groups.
//!
//! The rows may also arrive already totalled per patient and group
//! ([`BoundedTotals::add_totals`], what a trust's database returns): the bounds are the same,
//! applied to the same per-patient accumulations.

use std::cmp::Ordering;
use std::collections::HashMap;
use std::hash::Hasher as _;
use std::sync::Arc;

use arrow::array::Float64Array;
use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, Int64Array, RecordBatch, StringArray, UInt64Array,
};
use arrow::datatypes::{
    DataType, Decimal128Type, Field, Float64Type, Int64Type, Schema, SchemaRef,
};
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::EmitTo;
use datafusion::physical_plan::aggregates::group_values::{GroupValues, new_group_values};
use datafusion::physical_plan::aggregates::order::GroupOrdering;
use siphasher::sip::SipHasher24;
use tally_common::model::partial_column;
use tally_common::privacy::FixedPoint;

/// The column of a bounded answer counting each group's patients.
pub const UNITS: &str = "__tally_units";

/// What one partial adds up, per patient and group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measure {
    /// The patient's rows, at most `rows_per_group`.
    Rows,
    /// The patient's non-NULL values of argument `arg`, at most `rows_per_group`.
    Values {
        /// The argument's index among the input's arguments.
        arg: usize,
    },
    /// The sum of argument `arg` (integer fixed point), scaled to at most `rows_per_group`
    /// values at the patient's own mean there, then clamped to `[low, high]`.
    Sum {
        /// The argument's index among the input's arguments.
        arg: usize,
        /// The least a patient may add.
        low: i128,
        /// The most a patient may add.
        high: i128,
    },
    /// The same for the squares of argument `arg`.
    SumSquares {
        /// The argument's index among the input's arguments.
        arg: usize,
        /// The least a patient may add.
        low: i128,
        /// The most a patient may add.
        high: i128,
    },
}

/// The bounds [`BoundedTotals`] enforces, and the layout of its input: the patient, then
/// `groups` group columns, then one column per argument.
#[derive(Clone)]
pub struct Bounding {
    /// How many group columns follow the patient.
    pub groups: usize,
    /// Per argument column: the fixed point its values are clamped to and summed in, or
    /// `None` when only its NULLs matter (a count of values).
    pub arguments: Vec<Option<FixedPoint>>,
    /// One per partial, in the partials' order.
    pub measures: Vec<Measure>,
    /// The most rows one patient counts in one group.
    pub rows_per_group: u64,
    /// The most groups one patient counts in; `None` when no patient can exceed the bounds
    /// (no groups, or no more public keys than that).
    pub groups_per_unit: Option<usize>,
    /// The node's secret for the keyed hash.
    pub key: [u8; 32],
}

impl std::fmt::Debug for Bounding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("Bounding")
            .field("groups", &self.groups)
            .field("arguments", &self.arguments)
            .field("measures", &self.measures)
            .field("rows_per_group", &self.rows_per_group)
            .field("groups_per_unit", &self.groups_per_unit)
            .finish_non_exhaustive()
    }
}

impl Bounding {
    /// The schema of the totals: the input's group fields, one field per partial (Int64
    /// counts, Decimal128(38, 0) sums), then [`UNITS`].
    pub fn output_schema(&self, input: &Schema) -> SchemaRef {
        let mut fields: Vec<Field> = input.fields()[1..=self.groups]
            .iter()
            .map(|f| f.as_ref().clone())
            .collect();
        for (i, measure) in self.measures.iter().enumerate() {
            let data_type = match measure {
                Measure::Rows | Measure::Values { .. } => DataType::Int64,
                Measure::Sum { .. } | Measure::SumSquares { .. } => DataType::Decimal128(38, 0),
            };
            fields.push(Field::new(partial_column(i), data_type, true));
        }
        fields.push(Field::new(UNITS, DataType::Int64, false));
        Arc::new(Schema::new(fields))
    }
}

/// SipHash-2-4 under the node's secret: a keyed pseudo-random function, so ordering a
/// patient's groups by it picks the same groups every time, independently of the order
/// rows arrive in, and an analyst who does not know the secret cannot steer it.
#[derive(Debug, Clone, Copy)]
struct KeyedHash {
    k0: u64,
    k1: u64,
}

impl KeyedHash {
    fn new(key: &[u8; 32]) -> Self {
        let mut k0 = [0u8; 8];
        let mut k1 = [0u8; 8];
        k0.copy_from_slice(&key[..8]);
        k1.copy_from_slice(&key[8..16]);
        KeyedHash {
            k0: u64::from_le_bytes(k0),
            k1: u64::from_le_bytes(k1),
        }
    }

    fn hasher(&self) -> SipHasher24 {
        SipHasher24::new_with_keys(self.k0, self.k1)
    }

    /// The rank of `group` (its own keyed hash) for `unit`.
    fn rank(&self, unit: &Unit, group: u64) -> u64 {
        let mut hasher = self.hasher();
        unit.write(&mut hasher);
        hasher.write_u64(group);
        hasher.finish()
    }
}

/// One patient's identifier, as the rows carry it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Unit {
    Null,
    Text(Vec<u8>),
    Number(i64),
}

impl Unit {
    fn write(&self, hasher: &mut SipHasher24) {
        match self {
            Unit::Null => hasher.write_u8(0),
            Unit::Text(bytes) => {
                hasher.write_u8(1);
                hasher.write_usize(bytes.len());
                hasher.write(bytes);
            }
            Unit::Number(value) => {
                hasher.write_u8(2);
                hasher.write_i64(*value);
            }
        }
    }
}

/// A batch's patient column, read without allocating per row.
enum Units {
    Text(StringArray),
    View(arrow::array::StringViewArray),
    Number(Int64Array),
}

impl Units {
    fn of(array: &ArrayRef) -> DfResult<Self> {
        let data_type = array.data_type();
        if data_type.is_integer() {
            // Refused, not turned into NULL, where an unsigned id does not fit.
            let strict = arrow::compute::CastOptions {
                safe: false,
                ..Default::default()
            };
            let numbers = arrow::compute::cast_with_options(array, &DataType::Int64, &strict)?;
            return Ok(Units::Number(numbers.as_primitive::<Int64Type>().clone()));
        }
        match data_type {
            DataType::Utf8View => Ok(Units::View(array.as_string_view().clone())),
            DataType::Utf8 | DataType::LargeUtf8 => {
                let text = arrow::compute::cast(array, &DataType::Utf8)?;
                Ok(Units::Text(text.as_string::<i32>().clone()))
            }
            other => exec_err!("a privacy unit must be text or an integer, not {other}"),
        }
    }

    fn is_null(&self, row: usize) -> bool {
        match self {
            Units::Text(values) => values.is_null(row),
            Units::View(values) => values.is_null(row),
            Units::Number(values) => values.is_null(row),
        }
    }

    /// How row `row`'s patient compares with `unit` in the order rows arrive in (ascending,
    /// NULL first).
    fn compare(&self, row: usize, unit: &Unit) -> Ordering {
        if self.is_null(row) {
            return if *unit == Unit::Null {
                Ordering::Equal
            } else {
                Ordering::Less
            };
        }
        match (self, unit) {
            (Units::Text(_) | Units::View(_) | Units::Number(_), Unit::Null) => Ordering::Greater,
            (Units::Text(values), Unit::Text(bytes)) => {
                values.value(row).as_bytes().cmp(bytes.as_slice())
            }
            (Units::View(values), Unit::Text(bytes)) => {
                values.value(row).as_bytes().cmp(bytes.as_slice())
            }
            (Units::Number(values), Unit::Number(number)) => values.value(row).cmp(number),
            (Units::Text(_) | Units::View(_), Unit::Number(_))
            | (Units::Number(_), Unit::Text(_)) => Ordering::Less,
        }
    }

    /// Row `row`'s patient, written into `unit` (reusing its buffer).
    fn read(&self, row: usize, unit: &mut Unit) {
        if self.is_null(row) {
            *unit = Unit::Null;
            return;
        }
        let text = match self {
            Units::Text(values) => values.value(row),
            Units::View(values) => values.value(row),
            Units::Number(values) => {
                *unit = Unit::Number(values.value(row));
                return;
            }
        };
        match unit {
            Unit::Text(bytes) => {
                bytes.clear();
                bytes.extend_from_slice(text.as_bytes());
            }
            Unit::Null | Unit::Number(_) => *unit = Unit::Text(text.as_bytes().to_vec()),
        }
    }
}

/// A batch's argument column: numbers to clamp and sum in fixed point (with their
/// squares when a measure needs them), or any column whose NULLs are counted.
enum Argument {
    Numbers {
        values: Float64Array,
        fixed: FixedPoint,
        squares: bool,
    },
    Presence(Option<arrow::buffer::NullBuffer>),
}

impl Argument {
    /// Row `row`'s value in fixed point, clamped; `None` when missing (NULL or NaN).
    fn fixed(values: &Float64Array, fixed: &FixedPoint, row: usize) -> Option<i128> {
        let value = values.value(row);
        if values.is_null(row) || value.is_nan() {
            return None;
        }
        let clamped = value.clamp(fixed.low, fixed.high) * fixed.scale as f64;
        // Most values are whole already: rounding (a libm call) only for the rest.
        let whole = clamped as i64;
        if whole as f64 == clamped {
            return Some(i128::from(whole));
        }
        Some(i128::from(clamped.round() as i64))
    }
}

/// What one patient has in one group so far, per argument.
#[derive(Debug, Clone, Copy, Default)]
struct Accumulated {
    values: u64,
    sum: i128,
    squares: i128,
}

/// The patient whose rows are arriving: their groups, rows per group, and per-argument
/// accumulations (`arguments` per group, flattened).
#[derive(Debug)]
struct Patient {
    unit: Option<Unit>,
    groups: Vec<usize>,
    rows: Vec<u64>,
    accumulated: Vec<Accumulated>,
    /// Group id to entry, once the patient has more groups than a scan should search.
    index: HashMap<usize, usize>,
}

/// Entries a patient's groups are searched in linearly before they are indexed.
const LINEAR_ENTRIES: usize = 16;

impl Patient {
    fn entry(&mut self, group: usize, arguments: usize) -> usize {
        if self.groups.len() <= LINEAR_ENTRIES {
            if let Some(entry) = self.groups.iter().position(|&g| g == group) {
                return entry;
            }
        } else if let Some(&entry) = self.index.get(&group) {
            return entry;
        }
        let entry = self.groups.len();
        self.groups.push(group);
        self.rows.push(0);
        self.accumulated
            .extend(std::iter::repeat_n(Accumulated::default(), arguments));
        if self.groups.len() == LINEAR_ENTRIES + 1 {
            self.index = self
                .groups
                .iter()
                .enumerate()
                .map(|(e, &g)| (g, e))
                .collect();
        } else if self.groups.len() > LINEAR_ENTRIES + 1 {
            self.index.insert(group, entry);
        }
        entry
    }

    fn clear(&mut self) {
        self.groups.clear();
        self.rows.clear();
        self.accumulated.clear();
        self.index.clear();
    }
}

/// The bounded totals of a release, fed its rows in patient order (see the module docs).
pub struct BoundedTotals {
    bounding: Bounding,
    hash: KeyedHash,
    output: SchemaRef,
    /// The distinct group keys seen, by group id (none when the release has no groups).
    keys: Option<Box<dyn GroupValues>>,
    /// Each group id's keyed hash of its key.
    key_hashes: Vec<u64>,
    /// Per group id, each measure's total (flattened).
    totals: Vec<i128>,
    /// Per group id, the patients counted.
    units: Vec<i64>,
    patient: Patient,
    /// Per argument, whether a measure sums its squares.
    squared: Vec<bool>,
    ids: Vec<usize>,
    order: Vec<(u64, u64, usize)>,
}

impl BoundedTotals {
    /// Totals for rows of `input`'s schema, laid out as `bounding` says (for [`add`](Self::add)).
    pub fn new(bounding: Bounding, input: &Schema) -> DfResult<Self> {
        if input.fields().len() != 1 + bounding.groups + bounding.arguments.len() {
            return exec_err!("a bounded release's rows have the wrong number of columns");
        }
        Self::with_input(bounding, input)
    }

    /// Totals for rows already totalled per patient and group, of `input`'s schema (for
    /// [`add_totals`](Self::add_totals)).
    pub fn of_totals(bounding: Bounding, input: &Schema) -> DfResult<Self> {
        let per_argument: usize = bounding
            .arguments
            .iter()
            .map(|fixed| if fixed.is_some() { 3 } else { 1 })
            .sum();
        if input.fields().len() != 2 + bounding.groups + per_argument {
            return exec_err!("a bounded release's totals have the wrong number of columns");
        }
        Self::with_input(bounding, input)
    }

    fn with_input(bounding: Bounding, input: &Schema) -> DfResult<Self> {
        let keys = if bounding.groups == 0 {
            None
        } else {
            let fields = input.fields()[1..=bounding.groups].to_vec();
            Some(new_group_values(
                Arc::new(Schema::new(fields)),
                &GroupOrdering::None,
            )?)
        };
        let groups = usize::from(bounding.groups == 0);
        Ok(BoundedTotals {
            hash: KeyedHash::new(&bounding.key),
            output: bounding.output_schema(input),
            keys,
            key_hashes: Vec::new(),
            totals: vec![0; groups * bounding.measures.len()],
            units: vec![0; groups],
            patient: Patient {
                unit: None,
                groups: Vec::new(),
                rows: Vec::new(),
                accumulated: Vec::new(),
                index: HashMap::new(),
            },
            squared: (0..bounding.arguments.len())
                .map(|a| {
                    bounding
                        .measures
                        .iter()
                        .any(|m| matches!(m, Measure::SumSquares { arg, .. } if *arg == a))
                })
                .collect(),
            ids: Vec::new(),
            order: Vec::new(),
            bounding,
        })
    }

    /// The memory the totals hold, in bytes (for the query's memory limit).
    pub fn size(&self) -> usize {
        let keys = self.keys.as_ref().map_or(0, |keys| keys.size());
        let patient = &self.patient;
        keys + self.key_hashes.capacity() * 8
            + self.totals.capacity() * 16
            + self.units.capacity() * 8
            + self.ids.capacity() * 8
            + self.order.capacity() * 24
            + self.squared.capacity()
            + patient.groups.capacity() * 8
            + patient.rows.capacity() * 8
            + patient.accumulated.capacity() * std::mem::size_of::<Accumulated>()
            + patient.index.capacity() * 16
    }

    /// Adds a batch of rows; refuses rows that are not in patient order, which would let a
    /// patient count twice.
    pub fn add(&mut self, batch: &RecordBatch) -> DfResult<()> {
        let groups = self.bounding.groups;
        let mut columns = Vec::with_capacity(self.bounding.arguments.len());
        for (a, (column, fixed)) in batch.columns()[1 + groups..]
            .iter()
            .zip(&self.bounding.arguments)
            .enumerate()
        {
            columns.push(match fixed {
                Some(fixed) => Argument::Numbers {
                    values: arrow::compute::cast(column, &DataType::Float64)?
                        .as_primitive::<Float64Type>()
                        .clone(),
                    fixed: *fixed,
                    squares: self.squared[a],
                },
                None => Argument::Presence(column.logical_nulls()),
            });
        }
        self.add_with(batch, |row, rows, accumulated| {
            *rows += 1;
            for (column, accumulated) in columns.iter().zip(accumulated) {
                match column {
                    Argument::Numbers {
                        values,
                        fixed,
                        squares,
                    } => {
                        if let Some(value) = Argument::fixed(values, fixed, row) {
                            accumulated.values += 1;
                            accumulated.sum = accumulated.sum.saturating_add(value);
                            if *squares {
                                accumulated.squares =
                                    accumulated.squares.saturating_add(value * value);
                            }
                        }
                    }
                    Argument::Presence(nulls) => {
                        if nulls.as_ref().is_none_or(|nulls| nulls.is_valid(row)) {
                            accumulated.values += 1;
                        }
                    }
                }
            }
        })
    }

    /// Adds a batch of rows already totalled per patient and group, in patient order: the
    /// patient, the groups, the rows, then per argument the values present and, for an
    /// argument summed in fixed point, their sum and the sum of their squares (each value
    /// clamped and rounded exactly as [`add`](Self::add) does). NULL totals count as 0.
    pub fn add_totals(&mut self, batch: &RecordBatch) -> DfResult<()> {
        let strict = arrow::compute::CastOptions {
            safe: false,
            ..Default::default()
        };
        let column = |index: usize, data_type: &DataType| {
            arrow::compute::cast_with_options(batch.column(index), data_type, &strict)
        };
        let decimal = DataType::Decimal128(38, 0);
        let mut index = 1 + self.bounding.groups;
        let rows = column(index, &DataType::Int64)?
            .as_primitive::<Int64Type>()
            .clone();
        index += 1;
        let mut arguments = Vec::with_capacity(self.bounding.arguments.len());
        for fixed in &self.bounding.arguments {
            let values = column(index, &DataType::Int64)?
                .as_primitive::<Int64Type>()
                .clone();
            index += 1;
            let sums = match fixed {
                Some(_) => {
                    let sum = column(index, &decimal)?
                        .as_primitive::<Decimal128Type>()
                        .clone();
                    let squares = column(index + 1, &decimal)?
                        .as_primitive::<Decimal128Type>()
                        .clone();
                    index += 2;
                    Some((sum, squares))
                }
                None => None,
            };
            arguments.push((values, sums));
        }
        let count = |values: &Int64Array, row: usize| {
            if values.is_valid(row) {
                u64::try_from(values.value(row)).unwrap_or(0)
            } else {
                0
            }
        };
        let total = |values: &Decimal128Array, row: usize| {
            if values.is_valid(row) {
                values.value(row)
            } else {
                0
            }
        };
        self.add_with(batch, |row, patient_rows, accumulated| {
            *patient_rows += count(&rows, row);
            for ((values, sums), accumulated) in arguments.iter().zip(accumulated) {
                accumulated.values += count(values, row);
                if let Some((sum, squares)) = sums {
                    accumulated.sum = accumulated.sum.saturating_add(total(sum, row));
                    accumulated.squares = accumulated.squares.saturating_add(total(squares, row));
                }
            }
        })
    }

    /// Walks a batch's rows in patient order, handing each row's entry (the patient's rows
    /// in its group and per-argument accumulations) to `accumulate`; ends each patient
    /// when the next begins. Refuses rows out of patient order.
    fn add_with(
        &mut self,
        batch: &RecordBatch,
        mut accumulate: impl FnMut(usize, &mut u64, &mut [Accumulated]),
    ) -> DfResult<()> {
        let rows = batch.num_rows();
        let groups = self.bounding.groups;
        let arguments = self.bounding.arguments.len();
        let units = Units::of(batch.column(0))?;
        self.group_ids(&batch.columns()[1..=groups], rows)?;
        // The previous row's group and entry: consecutive rows of a patient are often in
        // the same group.
        let mut last: Option<(usize, usize)> = None;
        for row in 0..rows {
            // A row with no patient cannot be bounded per patient (it may be anyone's):
            // it is left out.
            if units.is_null(row) {
                continue;
            }
            let next = match &self.patient.unit {
                None => true,
                Some(unit) => match units.compare(row, unit) {
                    Ordering::Equal => false,
                    Ordering::Greater => true,
                    Ordering::Less => {
                        return exec_err!("a bounded release's rows are not in patient order");
                    }
                },
            };
            if next {
                self.end_patient();
                let unit = self.patient.unit.get_or_insert(Unit::Null);
                units.read(row, unit);
            }
            let group = self.ids[row];
            let entry = match last {
                Some((g, e)) if g == group && !next => e,
                Some(_) | None => self.patient.entry(group, arguments),
            };
            last = Some((group, entry));
            let patient = &mut self.patient;
            accumulate(
                row,
                &mut patient.rows[entry],
                &mut patient.accumulated[entry * arguments..][..arguments],
            );
        }
        Ok(())
    }

    /// The group id of each of the batch's rows in `self.ids`, with a keyed hash for each
    /// new group.
    fn group_ids(&mut self, columns: &[ArrayRef], rows: usize) -> DfResult<()> {
        let Some(keys) = &mut self.keys else {
            self.ids.clear();
            self.ids.resize(rows, 0);
            return Ok(());
        };
        let before = keys.len();
        keys.intern(columns, &mut self.ids)?;
        let added = keys.len() - before;
        if added == 0 {
            return Ok(());
        }
        let mut first_rows = vec![usize::MAX; added];
        for (row, &id) in self.ids.iter().enumerate() {
            if id >= before && first_rows[id - before] == usize::MAX {
                first_rows[id - before] = row;
            }
        }
        let hashable = columns
            .iter()
            .map(Hashable::of)
            .collect::<DfResult<Vec<_>>>()?;
        for row in first_rows {
            let mut hasher = self.hash.hasher();
            for column in &hashable {
                column.write(row, &mut hasher);
            }
            self.key_hashes.push(hasher.finish());
        }
        let measures = self.bounding.measures.len();
        self.totals.resize(keys.len() * measures, 0);
        self.units.resize(keys.len(), 0);
        Ok(())
    }

    /// Adds the patient whose rows have all arrived to the totals: their lowest-ranked
    /// groups, each capped and clamped.
    fn end_patient(&mut self) {
        let patient = &mut self.patient;
        let entries = patient.groups.len();
        if entries == 0 {
            return;
        }
        self.order.clear();
        let unit = patient.unit.as_ref().unwrap_or(&Unit::Null);
        match self.bounding.groups_per_unit {
            Some(limit) if entries > limit => {
                for (entry, &group) in patient.groups.iter().enumerate() {
                    let key_hash = self.key_hashes[group];
                    self.order
                        .push((self.hash.rank(unit, key_hash), key_hash, entry));
                }
                self.order.sort_unstable();
                self.order.truncate(limit);
            }
            Some(_) | None => self.order.extend((0..entries).map(|entry| (0, 0, entry))),
        }
        let cap = i128::from(self.bounding.rows_per_group);
        let arguments = self.bounding.arguments.len();
        let measures = self.bounding.measures.len();
        for &(_, _, entry) in &self.order {
            let group = patient.groups[entry];
            let accumulated = &patient.accumulated[entry * arguments..][..arguments];
            self.units[group] += 1;
            let totals = &mut self.totals[group * measures..][..measures];
            for (total, measure) in totals.iter_mut().zip(&self.bounding.measures) {
                let added = match *measure {
                    Measure::Rows => i128::from(patient.rows[entry]).min(cap),
                    Measure::Values { arg } => i128::from(accumulated[arg].values).min(cap),
                    Measure::Sum { arg, low, high } => {
                        let a = accumulated[arg];
                        scaled(a.sum, a.values, cap).clamp(low, high)
                    }
                    Measure::SumSquares { arg, low, high } => {
                        let a = accumulated[arg];
                        scaled(a.squares, a.values, cap).clamp(low, high)
                    }
                };
                *total = total.saturating_add(added);
            }
        }
        patient.clear();
    }

    /// The totals of every group some patient counts in (one row when there are no groups).
    pub fn finish(mut self) -> DfResult<RecordBatch> {
        self.end_patient();
        let kept: Vec<u64> = match &self.keys {
            None => vec![0],
            Some(_) => (0..self.units.len())
                .filter(|&group| self.units[group] > 0)
                .map(|group| group as u64)
                .collect(),
        };
        let mut columns: Vec<ArrayRef> = Vec::new();
        match &mut self.keys {
            // No row arrived: no group to emit (some of DataFusion's group stores cannot
            // emit before their first row).
            Some(keys) if keys.is_empty() => {
                for field in &self.output.fields()[..self.bounding.groups] {
                    columns.push(arrow::array::new_empty_array(field.data_type()));
                }
            }
            Some(keys) => {
                let indices = UInt64Array::from(kept.clone());
                for key in keys.emit(EmitTo::All)? {
                    columns.push(arrow::compute::take(&key, &indices, None)?);
                }
            }
            None => {}
        }
        let measures = self.bounding.measures.len();
        let total = |group: u64, i: usize| self.totals[group as usize * measures + i];
        for (i, measure) in self.bounding.measures.iter().enumerate() {
            let column: ArrayRef = match measure {
                Measure::Rows | Measure::Values { .. } => Arc::new(Int64Array::from(
                    kept.iter()
                        .map(|&group| i64::try_from(total(group, i)).unwrap_or(i64::MAX))
                        .collect::<Vec<_>>(),
                )),
                Measure::Sum { .. } | Measure::SumSquares { .. } => Arc::new(
                    Decimal128Array::from(
                        kept.iter()
                            .map(|&group| total(group, i))
                            .collect::<Vec<_>>(),
                    )
                    .with_precision_and_scale(38, 0)?,
                ),
            };
            columns.push(column);
        }
        columns.push(Arc::new(Int64Array::from(
            kept.iter()
                .map(|&group| self.units[group as usize])
                .collect::<Vec<_>>(),
        )));
        Ok(RecordBatch::try_new(self.output.clone(), columns)?)
    }
}

/// A patient's `sum` over `values` values, scaled to at most `cap` values at the patient's
/// own mean (so a group's mean is not skewed by how many rows were cut); nothing when the
/// patient has no values.
fn scaled(sum: i128, values: u64, cap: i128) -> i128 {
    let values = i128::from(values);
    if values <= cap {
        // Within the cap (or no values, whose sum is 0): the sum as it is.
        return sum;
    }
    sum.saturating_mul(cap) / values
}

/// A group column read for the keyed hash without allocating per row: text as its bytes,
/// integers and dates as 64-bit numbers, anything else as its text.
enum Hashable {
    Text(StringArray),
    Number(Int64Array),
}

impl Hashable {
    fn of(array: &ArrayRef) -> DfResult<Self> {
        let data_type = array.data_type();
        if data_type.is_integer() || matches!(data_type, DataType::Date32 | DataType::Date64) {
            let numbers = arrow::compute::cast(array, &DataType::Int64)?;
            return Ok(Hashable::Number(
                numbers.as_primitive::<Int64Type>().clone(),
            ));
        }
        let text = arrow::compute::cast(array, &DataType::Utf8)?;
        Ok(Hashable::Text(text.as_string::<i32>().clone()))
    }

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

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of (patient, group, value), as the totals' input.
    fn batch(rows: &[(&str, &str, Option<i64>)]) -> RecordBatch {
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Utf8, false),
            Field::new("g0", DataType::Utf8, false),
            Field::new("value", DataType::Int64, true),
        ]));
        RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap()
    }

    fn bounding(groups_per_unit: Option<usize>) -> Bounding {
        Bounding {
            groups: 1,
            arguments: vec![Some(FixedPoint {
                low: 0.0,
                high: 100.0,
                scale: 1,
            })],
            measures: vec![
                Measure::Rows,
                Measure::Sum {
                    arg: 0,
                    low: 0,
                    high: 100,
                },
            ],
            rows_per_group: 2,
            groups_per_unit,
            key: [5; 32],
        }
    }

    /// The totals of `batches` as (group, rows, sum, patients), by group.
    fn totals(
        bounding: Bounding,
        batches: &[RecordBatch],
    ) -> DfResult<Vec<(String, i64, i128, i64)>> {
        let mut totals = BoundedTotals::new(bounding, &batches[0].schema())?;
        for batch in batches {
            totals.add(batch)?;
        }
        let out = totals.finish()?;
        let mut rows: Vec<_> = (0..out.num_rows())
            .map(|r| {
                (
                    out.column(0).as_string::<i32>().value(r).to_string(),
                    out.column(1).as_primitive::<Int64Type>().value(r),
                    out.column(2)
                        .as_primitive::<arrow::datatypes::Decimal128Type>()
                        .value(r),
                    out.column(3).as_primitive::<Int64Type>().value(r),
                )
            })
            .collect();
        rows.sort();
        Ok(rows)
    }

    #[test]
    fn rows_with_no_patient_are_left_out() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("unit", DataType::Utf8, true),
            Field::new("g0", DataType::Utf8, false),
            Field::new("value", DataType::Int64, true),
        ]));
        let rows = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from(vec![None, None, Some("a")])),
                Arc::new(StringArray::from(vec!["x", "x", "x"])),
                Arc::new(Int64Array::from(vec![Some(50), Some(50), Some(7)])),
            ],
        )
        .unwrap();
        assert_eq!(
            totals(bounding(None), &[rows]).unwrap(),
            vec![("x".to_string(), 1, 7, 1)]
        );
    }

    #[test]
    fn a_patient_split_across_batches_counts_once() {
        let whole = batch(&[
            ("a", "x", Some(10)),
            ("a", "x", Some(30)),
            ("a", "x", Some(50)),
            ("b", "x", Some(7)),
        ]);
        let split = [
            batch(&[("a", "x", Some(10)), ("a", "x", Some(30))]),
            batch(&[("a", "x", Some(50)), ("b", "x", Some(7))]),
        ];
        let expected = vec![("x".to_string(), 3, 60 + 7, 2)];
        assert_eq!(totals(bounding(None), &[whole]).unwrap(), expected);
        assert_eq!(totals(bounding(None), &split).unwrap(), expected);
    }

    #[test]
    fn no_rows_give_no_groups_whatever_the_group_type() {
        for group_type in [
            DataType::Utf8,
            DataType::Null,
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
        ] {
            let schema = Schema::new(vec![
                Field::new("unit", DataType::Utf8, false),
                Field::new("g0", group_type.clone(), true),
                Field::new("value", DataType::Int64, true),
            ]);
            let out = BoundedTotals::new(bounding(Some(2)), &schema)
                .unwrap()
                .finish()
                .unwrap();
            assert_eq!(out.num_rows(), 0, "{group_type}");
            assert_eq!(out.schema().field(0).data_type(), &group_type);
        }
    }

    #[test]
    fn rows_out_of_patient_order_are_refused_not_counted_twice() {
        let shuffled = batch(&[
            ("a", "x", Some(1)),
            ("b", "x", Some(1)),
            ("a", "x", Some(1)),
        ]);
        assert!(totals(bounding(None), &[shuffled]).is_err());
        let across = [batch(&[("b", "x", Some(1))]), batch(&[("a", "x", Some(1))])];
        assert!(totals(bounding(None), &across).is_err());
    }

    #[test]
    fn a_patient_counts_in_at_most_the_allowed_groups_chosen_by_the_keyed_hash() {
        let rows: Vec<(&str, &str, Option<i64>)> = ["g1", "g2", "g3", "g4", "g5"]
            .iter()
            .map(|g| ("a", *g, Some(1)))
            .collect();
        let mut reversed = rows.clone();
        reversed.reverse();
        let forward = totals(bounding(Some(2)), &[batch(&rows)]).unwrap();
        let backward = totals(bounding(Some(2)), &[batch(&reversed)]).unwrap();
        assert_eq!(forward.len(), 2, "{forward:?}");
        assert_eq!(forward, backward, "the choice does not follow row order");
        let chosen: Vec<_> = (0u8..8)
            .map(|k| {
                let mut b = bounding(Some(2));
                b.key = [k; 32];
                totals(b, &[batch(&rows)]).unwrap()
            })
            .collect();
        assert!(
            chosen.iter().any(|c| c != &forward),
            "different secrets choose different groups"
        );
        assert_eq!(totals(bounding(None), &[batch(&rows)]).unwrap().len(), 5);
    }
}
