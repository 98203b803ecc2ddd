//! Arithmetic over released values that fails, rather than wraps, on overflow. DataFusion
//! adds, subtracts, multiplies, negates and sums whole numbers modulo 2^64, so
//! `COUNT(*) * 9223372036854775807` would answer a negative count. This analyzer rule runs
//! on every plan the gateway executes, after type coercion, and replaces each of those
//! operations on an integer type, `SUM(...) OVER (...)` included, with a checked one that
//! stops the query with `E_OVERFLOW` instead; names are kept, so the answer's columns keep
//! their names and types. Floating-point arithmetic is left as it is (it overflows to
//! infinity); division and remainder are checked by Arrow. Left as DataFusion computes
//! them: sums of decimals (released values are whole numbers or floats) and bit shifts.

use std::sync::Arc;

use arrow::array::{ArrayRef, ArrowNumericType, AsArray};
use arrow::compute::kernels::numeric;
use arrow::datatypes::{ArrowNativeTypeOp, DataType, Int64Type, UInt64Type};
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TransformedResult, TreeNode};
use datafusion::common::{DFSchema, Result, ScalarValue};
use datafusion::error::DataFusionError;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::expr_rewriter::NamePreserver;
use datafusion::logical_expr::function::AccumulatorFactoryFunction;
use datafusion::logical_expr::utils::merge_schema;
use datafusion::logical_expr::{
    Accumulator, AggregateUDF, BinaryExpr, ColumnarValue, Expr, ExprSchemable, LogicalPlan,
    Operator, ScalarUDF, Volatility, WindowFunctionDefinition, create_udaf, create_udf,
};
use datafusion::optimizer::AnalyzerRule;
use tally_common::{ErrorCode, TallyError};

/// The analyzer rule (see the module's documentation).
#[derive(Debug, Default)]
pub struct CheckedArithmetic;

impl AnalyzerRule for CheckedArithmetic {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        plan.transform_up_with_subqueries(|plan| {
            let inputs = merge_schema(&plan.inputs());
            let names = NamePreserver::new(&plan);
            let rewritten = plan.map_expressions(|expr| {
                let name = names.save(&expr);
                let rewritten = expr.transform_down(|e| checked(e, &inputs))?;
                Ok(rewritten.update_data(|e| name.restore(e)))
            })?;
            // The checked functions' answers may be NULL where the operators' were not:
            // the node's schema follows its new expressions.
            match rewritten.transformed {
                true => rewritten.map_data(LogicalPlan::recompute_schema),
                false => Ok(rewritten),
            }
        })
        .data()
    }

    fn name(&self) -> &str {
        "tally_checked_arithmetic"
    }
}

/// The checked form of one expression node, when it is integer arithmetic that can wrap.
fn checked(expr: Expr, schema: &DFSchema) -> Result<Transformed<Expr>> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right })
            if matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply) =>
        {
            let (left_type, right_type) = (left.get_type(schema)?, right.get_type(schema)?);
            if !(left_type.is_integer() && left_type == right_type) {
                return Ok(Transformed::no(Expr::BinaryExpr(BinaryExpr {
                    left,
                    op,
                    right,
                })));
            }
            let udf = binary_udf(op, left_type)?;
            Ok(Transformed::yes(Expr::ScalarFunction(
                ScalarFunction::new_udf(udf, vec![*left, *right]),
            )))
        }
        Expr::Negative(operand) => {
            let operand_type = operand.get_type(schema)?;
            if !operand_type.is_integer() {
                return Ok(Transformed::no(Expr::Negative(operand)));
            }
            let udf = create_udf(
                "checked_negate",
                vec![operand_type.clone()],
                operand_type,
                Volatility::Immutable,
                Arc::new(|args| elementwise(args, |a| numeric::neg(a[0].as_ref()))),
            );
            Ok(Transformed::yes(Expr::ScalarFunction(
                ScalarFunction::new_udf(Arc::new(udf), vec![*operand]),
            )))
        }
        Expr::AggregateFunction(aggregate)
            if aggregate.func.name() == "sum" && aggregate.params.args.len() == 1 =>
        {
            let argument_type = aggregate.params.args[0].get_type(schema)?;
            checked_sum(aggregate, &argument_type)
        }
        // A running or sliding `SUM(...) OVER (...)` of released values.
        Expr::WindowFunction(mut window)
            if matches!(&window.fun, WindowFunctionDefinition::AggregateUDF(f) if f.name() == "sum")
                && window.params.args.len() == 1 =>
        {
            let argument_type = window.params.args[0].get_type(schema)?;
            match checked_sum_udaf(&argument_type) {
                Some(udaf) => {
                    window.fun = WindowFunctionDefinition::AggregateUDF(Arc::new(udaf));
                    Ok(Transformed::yes(Expr::WindowFunction(window)))
                }
                None => Ok(Transformed::no(Expr::WindowFunction(window))),
            }
        }
        other => Ok(Transformed::no(other)),
    }
}

/// An Arrow kernel over two arrays that fails on overflow.
type Kernel = fn(&ArrayRef, &ArrayRef) -> Result<ArrayRef, arrow::error::ArrowError>;

/// `checked_add`, `checked_subtract` or `checked_multiply` over two values of `data_type`.
fn binary_udf(op: Operator, data_type: DataType) -> Result<Arc<ScalarUDF>> {
    let (name, kernel): (&str, Kernel) = match op {
        Operator::Plus => ("checked_add", |a, b| numeric::add(a, b)),
        Operator::Minus => ("checked_subtract", |a, b| numeric::sub(a, b)),
        Operator::Multiply => ("checked_multiply", |a, b| numeric::mul(a, b)),
        other => {
            return Err(DataFusionError::Internal(format!(
                "{other} has no checked form"
            )));
        }
    };
    Ok(Arc::new(create_udf(
        name,
        vec![data_type.clone(), data_type.clone()],
        data_type,
        Volatility::Immutable,
        Arc::new(move |args| elementwise(args, |a| kernel(&a[0], &a[1]))),
    )))
}

/// Applies `kernel` to the arguments as arrays; a scalar answer when every argument was one.
fn elementwise(
    args: &[ColumnarValue],
    kernel: impl Fn(&[ArrayRef]) -> Result<ArrayRef, arrow::error::ArrowError>,
) -> Result<ColumnarValue> {
    let all_scalar = args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)));
    let arrays = ColumnarValue::values_to_arrays(args)?;
    let result = kernel(&arrays)?;
    if all_scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(
            &result, 0,
        )?))
    } else {
        Ok(ColumnarValue::Array(result))
    }
}

/// `SUM` of whole numbers (DataFusion sums every integer type as Int64 or UInt64) with a
/// checked running total; `SUM(DISTINCT ...)` of whole numbers is refused rather than left
/// to wrap.
fn checked_sum(
    aggregate: AggregateFunction,
    argument_type: &DataType,
) -> Result<Transformed<Expr>> {
    let Some(udaf) = checked_sum_udaf(argument_type) else {
        return Ok(Transformed::no(Expr::AggregateFunction(aggregate)));
    };
    if aggregate.params.distinct {
        return Err(TallyError::new(
            ErrorCode::Plan,
            "SUM(DISTINCT ...) of whole numbers is not supported over released values; sum them as DOUBLE, or without DISTINCT",
        )
        .into_datafusion());
    }
    let params = aggregate.params;
    Ok(Transformed::yes(Expr::AggregateFunction(
        AggregateFunction::new_udf(
            Arc::new(udaf),
            params.args,
            params.distinct,
            params.filter,
            params.order_by,
            params.null_treatment,
        ),
    )))
}

/// The checked `SUM` of `argument_type`, when it is one DataFusion sums by wrapping.
fn checked_sum_udaf(argument_type: &DataType) -> Option<AggregateUDF> {
    let udaf = |data_type: DataType, accumulator: AccumulatorFactoryFunction| {
        create_udaf(
            "checked_sum",
            vec![data_type.clone()],
            Arc::new(data_type.clone()),
            Volatility::Immutable,
            accumulator,
            Arc::new(vec![data_type]),
        )
    };
    if *argument_type == DataType::Int64 {
        Some(udaf(
            DataType::Int64,
            Arc::new(|_| Ok(Box::new(CheckedSum::<Int64Type>::new()))),
        ))
    } else if *argument_type == DataType::UInt64 {
        Some(udaf(
            DataType::UInt64,
            Arc::new(|_| Ok(Box::new(CheckedSum::<UInt64Type>::new()))),
        ))
    } else {
        None
    }
}

/// A running total that fails on overflow.
#[derive(Debug)]
struct CheckedSum<T: ArrowNumericType> {
    total: Option<T::Native>,
}

impl<T: ArrowNumericType> CheckedSum<T> {
    fn new() -> Self {
        CheckedSum { total: None }
    }

    fn add(&mut self, values: &ArrayRef) -> Result<()> {
        let Some(part) = arrow::compute::sum_checked(values.as_primitive::<T>())? else {
            return Ok(());
        };
        self.total = Some(match self.total {
            None => part,
            Some(total) => total.add_checked(part)?,
        });
        Ok(())
    }

    /// Takes `values` out of the total (a sliding window's rows leaving it).
    fn subtract(&mut self, values: &ArrayRef) -> Result<()> {
        if let Some(part) = arrow::compute::sum_checked(values.as_primitive::<T>())? {
            let total = self.total.unwrap_or(T::Native::ZERO);
            self.total = Some(total.sub_checked(part)?);
        }
        Ok(())
    }

    fn value(&self) -> ScalarValue {
        ScalarValue::new_primitive::<T>(self.total, &T::DATA_TYPE).unwrap_or(ScalarValue::Null)
    }
}

impl<T: ArrowNumericType + std::fmt::Debug> Accumulator for CheckedSum<T> {
    fn update_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        values.iter().try_for_each(|v| self.add(v))
    }

    fn merge_batch(&mut self, states: &[ArrayRef]) -> Result<()> {
        self.update_batch(states)
    }

    fn state(&mut self) -> Result<Vec<ScalarValue>> {
        Ok(vec![self.value()])
    }

    fn evaluate(&mut self) -> Result<ScalarValue> {
        Ok(self.value())
    }

    fn size(&self) -> usize {
        std::mem::size_of_val(self)
    }

    fn retract_batch(&mut self, values: &[ArrayRef]) -> Result<()> {
        values.iter().try_for_each(|v| self.subtract(v))
    }

    fn supports_retract_batch(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use datafusion::prelude::SessionContext;

    /// A session with the rule installed and a one-row table `t(n BIGINT)`.
    fn session() -> SessionContext {
        let ctx = SessionContext::new();
        ctx.add_analyzer_rule(Arc::new(CheckedArithmetic));
        let n: ArrayRef = Arc::new(Int64Array::from(vec![40]));
        let batch = arrow::record_batch::RecordBatch::try_from_iter([("n", n)]).unwrap();
        ctx.register_batch("t", batch).unwrap();
        ctx
    }

    #[tokio::test]
    async fn a_long_chain_of_checked_operators_is_planned_and_answered() {
        // As many operators as the gateway accepts: typing the checked calls must not grow
        // faster than the chain (a nest of calls typed bottom-up had hung the gateway).
        let sql = format!("SELECT n{} AS total FROM t", " + 1".repeat(255));
        let batches = session().sql(&sql).await.unwrap().collect().await.unwrap();
        let total = batches[0].column(0).as_primitive::<Int64Type>().value(0);
        assert_eq!(total, 40 + 255);
        let err = session()
            .sql(&format!(
                "SELECT n{} * 9223372036854775807 FROM t",
                " + 1".repeat(200)
            ))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap_err();
        assert_eq!(
            TallyError::from_execution(err, "q").code,
            ErrorCode::Overflow
        );
    }

    #[test]
    fn a_checked_sum_fails_where_a_wrapping_one_would_turn_negative() {
        let mut sum = CheckedSum::<Int64Type>::new();
        let values: ArrayRef = Arc::new(Int64Array::from(vec![i64::MAX - 1, 1]));
        sum.update_batch(&[values]).unwrap();
        assert_eq!(sum.evaluate().unwrap(), ScalarValue::Int64(Some(i64::MAX)));
        let one: ArrayRef = Arc::new(Int64Array::from(vec![Some(1), None]));
        let err = sum.update_batch(&[one]).unwrap_err();
        assert_eq!(
            TallyError::from_execution(err, "q").code,
            ErrorCode::Overflow
        );
    }
}
