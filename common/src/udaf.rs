//! Step aggregation across trusts.
//!
//! Each trust computes a *partial* aggregate; the gateway merges the partials. COUNT, SUM,
//! MIN and MAX are their own partials. AVG, VAR and STDDEV are not, so the trust runs
//! `__tally_state_<name>(x)`, which returns the aggregate's intermediate state (for AVG:
//! count and sum) as a struct, and the gateway runs `__tally_merge_<name>(state)`, which
//! merges those states and produces the final value. Both wrap DataFusion's own
//! accumulators (`Accumulator::state` / `merge_batch`), so the arithmetic is DataFusion's.
//!
//! Only aggregates whose state is itself an aggregate are split: DISTINCT variants, MEDIAN,
//! percentiles and friends carry raw values in their state and are never split.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, StructArray};
use arrow::datatypes::{DataType, Field, FieldRef, Fields};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::function::{AccumulatorArgs, StateFieldsArgs};
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, AggregateUDFImpl, Signature, Volatility,
};

/// Prefix of the state-wrapper aggregates that trusts run.
pub const STATE_PREFIX: &str = "__tally_state_";
/// Prefix of the merge aggregates that the gateway runs.
pub const MERGE_PREFIX: &str = "__tally_merge_";

/// How an aggregate function is split between trusts and gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SplitKind {
    /// Trusts run it as is; the gateway combines the partials with `merge_function`.
    SelfMerging {
        /// The aggregate that combines partial values (COUNT partials are summed).
        merge_function: &'static str,
    },
    /// Trusts run the state wrapper; the gateway runs the merge wrapper.
    ViaState,
}

/// The aggregates Tally can split across trusts, by DataFusion's canonical name.
pub fn split_kind(function: &str) -> Option<SplitKind> {
    match function {
        "count" | "sum" => Some(SplitKind::SelfMerging {
            merge_function: "sum",
        }),
        "min" => Some(SplitKind::SelfMerging {
            merge_function: "min",
        }),
        "max" => Some(SplitKind::SelfMerging {
            merge_function: "max",
        }),
        "avg" | "var" | "var_pop" | "stddev" | "stddev_pop" => Some(SplitKind::ViaState),
        _ => None,
    }
}

/// Registers `__tally_state_<name>` for every state-split aggregate of `registry`.
pub fn register_state_udafs(registry: &mut dyn FunctionRegistry) -> Result<()> {
    for name in ["avg", "var", "var_pop", "stddev", "stddev_pop"] {
        let inner = registry.udaf(name)?;
        registry.register_udaf(Arc::new(state_udaf(inner)))?;
    }
    Ok(())
}

/// The state wrapper of `inner`: returns `inner`'s intermediate state as a struct.
pub fn state_udaf(inner: Arc<AggregateUDF>) -> AggregateUDF {
    AggregateUDF::new_from_impl(StateUdaf {
        name: format!("{STATE_PREFIX}{}", inner.name()),
        signature: inner.signature().clone(),
        inner,
    })
}

/// The merge wrapper of `inner` for arguments that had `input_fields` at the trusts.
pub fn merge_udaf(inner: Arc<AggregateUDF>, input_fields: Vec<FieldRef>) -> AggregateUDF {
    AggregateUDF::new_from_impl(MergeUdaf {
        name: format!("{MERGE_PREFIX}{}", inner.name()),
        signature: Signature::any(1, Volatility::Immutable),
        inner,
        input_fields,
    })
}

/// The state fields of `inner` when applied to `input_fields`.
fn inner_state_fields(inner: &AggregateUDF, input_fields: &[FieldRef]) -> Result<Vec<FieldRef>> {
    let return_field = inner.return_field(input_fields)?;
    inner.state_fields(StateFieldsArgs {
        name: inner.name(),
        input_fields,
        return_field,
        ordering_fields: &[],
        is_distinct: false,
    })
}

/// Builds `inner`'s accumulator as if it were called on `input_fields`.
fn inner_accumulator(
    inner: &AggregateUDF,
    args: &AccumulatorArgs,
    input_fields: &[FieldRef],
) -> Result<Box<dyn Accumulator>> {
    if args.is_distinct {
        return plan_err!("DISTINCT aggregates cannot be split across trusts");
    }
    inner.accumulator(AccumulatorArgs {
        return_field: inner.return_field(input_fields)?,
        schema: args.schema,
        ignore_nulls: args.ignore_nulls,
        order_bys: args.order_bys,
        is_reversed: args.is_reversed,
        name: args.name,
        is_distinct: false,
        exprs: args.exprs,
        expr_fields: input_fields,
    })
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct StateUdaf {
    name: String,
    signature: Signature,
    inner: Arc<AggregateUDF>,
}

impl AggregateUDFImpl for StateUdaf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let fields: Vec<FieldRef> = arg_types
            .iter()
            .map(|t| Arc::new(Field::new("arg", t.clone(), true)))
            .collect();
        Ok(self.return_field(&fields)?.data_type().clone())
    }

    fn return_field(&self, arg_fields: &[FieldRef]) -> Result<FieldRef> {
        let state = inner_state_fields(&self.inner, arg_fields)?;
        Ok(Arc::new(Field::new(
            &self.name,
            DataType::Struct(Fields::from(state)),
            true,
        )))
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let state_fields = Fields::from(inner_state_fields(&self.inner, args.expr_fields)?);
        let inner = inner_accumulator(&self.inner, &args, args.expr_fields)?;
        Ok(Box::new(StateAccumulator {
            inner,
            state_fields,
        }))
    }

    fn state_fields(&self, args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        inner_state_fields(&self.inner, args.input_fields)
    }
}

/// Runs the inner accumulator and reports its state, packed in a struct, as the result.
#[derive(Debug)]
struct StateAccumulator {
    inner: Box<dyn Accumulator>,
    state_fields: Fields,
}

impl Accumulator for StateAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        self.inner.update_batch(values)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        let columns = self
            .inner
            .state()?
            .iter()
            .map(ScalarValue::to_array)
            .collect::<Result<Vec<_>>>()?;
        let packed = StructArray::try_new(self.state_fields.clone(), columns, None)?;
        Ok(ScalarValue::Struct(Arc::new(packed)))
    }

    fn size(&self) -> usize {
        self.inner.size() + size_of::<Self>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }
}

#[derive(Debug)]
struct MergeUdaf {
    name: String,
    signature: Signature,
    inner: Arc<AggregateUDF>,
    input_fields: Vec<FieldRef>,
}

impl PartialEq for MergeUdaf {
    fn eq(&self, other: &Self) -> bool {
        self.name == other.name
            && self.inner == other.inner
            && self.input_fields == other.input_fields
    }
}

impl Eq for MergeUdaf {}

impl Hash for MergeUdaf {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.name.hash(state);
        self.inner.hash(state);
        self.input_fields.hash(state);
    }
}

impl AggregateUDFImpl for MergeUdaf {
    fn name(&self) -> &str {
        &self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _arg_types: &[DataType]) -> Result<DataType> {
        Ok(self
            .inner
            .return_field(&self.input_fields)?
            .data_type()
            .clone())
    }

    fn accumulator(&self, args: AccumulatorArgs) -> Result<Box<dyn Accumulator>> {
        let inner = inner_accumulator(&self.inner, &args, &self.input_fields)?;
        Ok(Box::new(MergeAccumulator { inner }))
    }

    fn state_fields(&self, _args: StateFieldsArgs) -> Result<Vec<FieldRef>> {
        inner_state_fields(&self.inner, &self.input_fields)
    }
}

/// Feeds packed states from the trusts into the inner accumulator's `merge_batch`.
#[derive(Debug)]
struct MergeAccumulator {
    inner: Box<dyn Accumulator>,
}

impl Accumulator for MergeAccumulator {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        let Some(packed) = values
            .first()
            .and_then(|v| v.as_any().downcast_ref::<StructArray>())
        else {
            return exec_err!("merge aggregate expects one struct argument");
        };
        // A trust with no rows for this aggregate still sends a state (zero count); a
        // null struct only arises from an outer join at the gateway and carries nothing.
        let columns: Vec<ArrayRef> = if packed.null_count() == 0 {
            packed.columns().to_vec()
        } else {
            let valid = arrow::compute::is_not_null(packed)?;
            let filtered = arrow::compute::filter(packed, &valid)?;
            filtered
                .as_any()
                .downcast_ref::<StructArray>()
                .map(|s| s.columns().to_vec())
                .unwrap_or_default()
        };
        self.inner.merge_batch(&columns)
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        self.inner.evaluate()
    }

    fn size(&self) -> usize {
        self.inner.size() + size_of::<Self>()
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        self.inner.state()
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.inner.merge_batch(states)
    }
}
