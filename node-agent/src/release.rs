//! Building: the node's own DataFusion plan for one release, from the model alone.
//!
//! The node never runs SQL text. It joins only along relationships its own catalogue
//! declares, compares columns with constants of the column's own type (so no comparison or
//! cast can fail on a row's value), applies generalisers to bare columns, and aggregates
//! per group: exactly, or (under a noise policy) bounded per patient (see
//! [`crate::bounding`]) so the noise added afterwards is calibrated to what one patient can
//! change.

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::{Column, Result as DfResult, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::execution::FunctionRegistry;
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::session_state::{SessionState, SessionStateBuilder};
use datafusion::functions::string::expr_fn::starts_with;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use std::sync::Arc;

use datafusion::logical_expr::ScalarUDF;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, LogicalPlanBuilder, cast, col, lit};
use datafusion::physical_plan::ExecutionPlanProperties;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::StreamExt;
use tally_common::error::find_tally_error;
use tally_common::governance::{Governance, Relationship};
use tally_common::model::{
    ColumnRef, Comparison, Dimension, Literal, Partial, Predicate, ReleaseQuery, group_column,
    partial_column,
};
use tally_common::privacy::{ContributionBounds, FixedPoint, public_keys};
use tally_common::{ErrorCode, TallyError};

use tally_kernels::bounding::{BoundedTotals, Bounding, Measure};
use tally_kernels::range::RangeLookup;

fn bad(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::BadRequest, message)
}

fn engine(err: datafusion::error::DataFusionError) -> TallyError {
    tracing::error!(error = %err, "building a release plan failed");
    TallyError::new(
        ErrorCode::Internal,
        "the release could not be planned at this trust",
    )
}

/// A scan of one of this trust's tables.
async fn scan(ctx: &SessionContext, name: &str) -> Result<LogicalPlanBuilder, TallyError> {
    let provider = ctx.table_provider(name).await.map_err(|_| {
        TallyError::new(
            ErrorCode::UnknownTable,
            format!("this trust has no table '{name}'"),
        )
    })?;
    LogicalPlanBuilder::scan(name, provider_as_source(provider), None).map_err(engine)
}

/// How a node aggregates a release (no `Debug`: it holds the bounding key).
#[derive(Clone)]
pub enum Aggregation {
    /// Exact aggregates, for policies without noise (tests that compare answers with a
    /// central computation): the partial schema's columns, nothing bounded.
    Exact,
    /// Bounded per patient: the columns noise is added to (see
    /// [`Bounding::output_schema`]).
    Bounded {
        /// The contribution bounds.
        bounds: ContributionBounds,
        /// The node's secret for the keyed hash that chooses a patient's groups.
        key: [u8; 32],
    },
}

/// How a node runs a release.
pub enum ReleasePlan {
    /// Exact aggregates: one plan, run to the end.
    Exact(LogicalPlan),
    /// Bounded aggregates: the release's rows in patient order (the patient, the groups,
    /// the arguments), totalled by [`BoundedTotals`] under `bounding`.
    Bounded {
        /// The rows, sorted by patient.
        rows: LogicalPlan,
        /// The bounds and the rows' layout.
        bounding: Bounding,
    },
    /// One query of the trust's PostgreSQL database (see [`crate::pushdown`]).
    Pushed(crate::pushdown::PushedRelease),
}

impl ReleasePlan {
    /// Runs the plan to the end over `ctx`.
    pub async fn run(self, ctx: &SessionContext) -> DfResult<Vec<RecordBatch>> {
        match self {
            ReleasePlan::Exact(plan) => DataFrame::new(ctx.state(), plan).collect().await,
            ReleasePlan::Bounded { rows, bounding } => {
                // One partition: the rows arrive in the files' patient order through
                // order-preserving joins (the small side built), with no merge; DataFusion
                // sorts only where it cannot prove that order.
                let state = one_partition(ctx.state()).build();
                let plan = state.create_physical_plan(&rows).await?;
                // One ordered stream: a patient split over two would count twice (the
                // totals also refuse rows out of order).
                if plan.output_partitioning().partition_count() != 1 {
                    return datafusion::common::exec_err!(
                        "a bounded release's rows are not one stream"
                    );
                }
                let mut totals = BoundedTotals::new(bounding, &plan.schema())?;
                let task = state.task_ctx();
                let memory =
                    MemoryConsumer::new("bounded release totals").register(task.memory_pool());
                let mut stream = plan.execute(0, task)?;
                while let Some(batch) = stream.next().await {
                    totals.add(&batch?)?;
                    memory.try_resize(totals.size())?;
                }
                Ok(vec![totals.finish()?])
            }
            ReleasePlan::Pushed(pushed) => pushed.run(ctx).await,
        }
    }
}

/// A state like `state` whose plans run in one partition. (It creates no default catalog,
/// which would replace the tables' own in the catalogue list it shares with `state`.)
pub(crate) fn one_partition(state: SessionState) -> SessionStateBuilder {
    let config = state
        .config()
        .clone()
        .with_target_partitions(1)
        .with_create_default_catalog_and_schema(false);
    SessionStateBuilder::new_from_existing(state).with_config(config)
}

/// The plan for `release` over `ctx`'s tables, validated against `governance` (already
/// done by the caller) and this trust's schemas: group columns `g0..`, then one column per
/// partial `p0..` (and [`tally_kernels::bounding::UNITS`] when bounded); and the partial schema the trust answers
/// with.
pub async fn build_plan(
    ctx: &SessionContext,
    governance: &Governance,
    release: &ReleaseQuery,
    aggregation: &Aggregation,
) -> Result<(ReleasePlan, SchemaRef), TallyError> {
    let fact = governance
        .table(&release.fact)
        .ok_or_else(|| bad("the fact table is not in this trust's catalogue"))?;
    let unit = fact
        .privacy_unit
        .as_ref()
        .ok_or_else(|| bad("the fact table has no privacy unit"))?;
    if let Some(pushed) = crate::pushdown::plan(ctx, governance, release, aggregation, unit).await?
    {
        return Ok(pushed);
    }
    let mut builder = scan(ctx, &release.fact).await?;
    for join in &release.joins {
        let relationship = fact
            .relationships
            .get(join)
            .ok_or_else(|| bad(format!("'{join}' is not a declared relationship here")))?;
        let right = scan(ctx, join).await?.build().map_err(engine)?;
        builder = match relationship {
            Relationship::ManyToOne { from, to } => builder.join(
                right,
                JoinType::Inner,
                (
                    vec![Column::new(Some(release.fact.as_str()), from.as_str())],
                    vec![Column::new(Some(join.as_str()), to.as_str())],
                ),
                None,
            ),
            Relationship::CodeRange {
                code,
                prefix,
                low,
                high,
            } => {
                let code = datafusion::functions::unicode::expr_fn::substring(
                    column_expr(&release.fact, code),
                    lit(1i64),
                    lit(i64::from(*prefix)),
                );
                match range_lookup(ctx, join, low, high, &code).await? {
                    // An equi-join on each code's range: the reference table is built and
                    // the fact rows keep their order (a bounded release needs them in
                    // patient order, which a nested-loop join would lose).
                    Some(range) => {
                        builder.join_on(right, JoinType::Inner, [range.eq(column_expr(join, low))])
                    }
                    None => builder.join_on(
                        right,
                        JoinType::Inner,
                        [code.between(column_expr(join, low), column_expr(join, high))],
                    ),
                }
            }
        }
        .map_err(engine)?;
    }
    let schema_of = |column: &ColumnRef| -> Option<DataType> {
        let schema = builder.schema();
        schema
            .field_with_qualified_name(&column.table.as_str().into(), &column.column)
            .ok()
            .map(|f| f.data_type().clone())
    };
    // The partial schema is what the gateway expects; deriving it here checks every column
    // exists with a usable type.
    let expected: SchemaRef = release.partial_schema(schema_of)?;
    if let Some(filter) = &release.filter {
        let predicate = predicate_expr(ctx, filter, &schema_of)?;
        builder = builder.filter(predicate).map_err(engine)?;
    }
    let groups = release
        .group_by
        .iter()
        .enumerate()
        .map(|(i, d)| Ok(dimension_expr(ctx, d)?.alias(group_column(i))))
        .collect::<Result<Vec<_>, TallyError>>()?;
    let partials = release.partials();
    match aggregation {
        Aggregation::Exact => {
            let aggregates: Vec<Expr> = partials
                .iter()
                .enumerate()
                .map(|(i, partial)| exact_expr(partial).alias(partial_column(i)))
                .collect();
            let outputs: Vec<Expr> = expected
                .fields()
                .iter()
                .map(|field| cast(col(field.name()), field.data_type().clone()).alias(field.name()))
                .collect();
            let plan = builder
                .aggregate(groups, aggregates)
                .and_then(|b| b.project(outputs))
                .and_then(|b| b.build())
                .map_err(engine)?;
            Ok((ReleasePlan::Exact(plan), expected))
        }
        Aggregation::Bounded { bounds, key } => {
            let group_types: Vec<DataType> = expected.fields()[..groups.len()]
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            let cut = needs_cut(governance, release, &group_types, *bounds)?;
            let unit = column_expr(&release.fact, unit);
            let plan = bounded(
                builder, governance, &partials, unit, groups, *bounds, cut, *key,
            )?;
            Ok((plan, expected))
        }
    }
}

/// The most ranges of a reference table looked up (rather than joined range by range).
const RANGE_LOOKUP_LIMIT: usize = 1_000;

/// The lower bound of the one range of `table` holding each code (NULL when none does), as
/// a lookup by binary search, when the table is small, its bounds are text and its ranges
/// do not overlap (so at most one matches); otherwise `None`.
async fn range_lookup(
    ctx: &SessionContext,
    table: &str,
    low: &str,
    high: &str,
    code: &Expr,
) -> Result<Option<Expr>, TallyError> {
    let frame = ctx
        .table(table)
        .await
        .and_then(|t| t.select(vec![col_named(low), col_named(high)]))
        .and_then(|t| t.limit(0, Some(RANGE_LOOKUP_LIMIT + 1)))
        .map_err(engine)?;
    // A typed error (the table's files changed) reaches the analyst as it is.
    let batches = frame
        .collect()
        .await
        .map_err(|e| find_tally_error(&e).unwrap_or_else(|| engine(e)))?;
    let mut ranges = Vec::new();
    let mut low_type = DataType::Utf8;
    for batch in &batches {
        low_type = batch.column(0).data_type().clone();
        for row in 0..batch.num_rows() {
            let bound = |c: usize| {
                ScalarValue::try_from_array(batch.column(c), row)
                    .ok()
                    .and_then(|v| v.try_as_str().flatten().map(str::to_string))
            };
            match (bound(0), bound(1)) {
                (Some(l), Some(h)) => ranges.push((l, h)),
                (None, _) | (_, None) => return Ok(None),
            }
        }
    }
    if ranges.is_empty() || ranges.len() > RANGE_LOOKUP_LIMIT {
        return Ok(None);
    }
    ranges.sort();
    // Every range proper and none overlapping, so each code is in at most one and each
    // lower bound names one range.
    let proper = ranges.iter().all(|(low, high)| low <= high);
    if !proper || !ranges.windows(2).all(|pair| pair[0].1 < pair[1].0) {
        return Ok(None);
    }
    let udf = ScalarUDF::new_from_impl(RangeLookup::new(ranges, low_type));
    Ok(Some(Expr::ScalarFunction(ScalarFunction::new_udf(
        Arc::new(udf),
        vec![code.clone()],
    ))))
}

fn col_named(name: &str) -> Expr {
    Expr::Column(Column::from_name(name))
}

/// The hidden column holding each row's patient in a bounded plan.
const UNIT: &str = "__tally_unit";

/// Whether a patient could fall in more groups than the bounds allow: not when there are
/// no groups, nor when every key is public and there are no more keys than that.
pub(crate) fn needs_cut(
    governance: &Governance,
    release: &ReleaseQuery,
    group_types: &[DataType],
    bounds: ContributionBounds,
) -> Result<bool, TallyError> {
    if release.group_by.is_empty() {
        return Ok(false);
    }
    let keys = public_keys(governance, release, group_types)?;
    Ok(keys.is_none_or(|keys| keys.len() as u64 > bounds.groups_per_unit))
}

/// The release's rows in patient order (the patient, the groups, then one argument per
/// measured column: its fixed-point value for sums, the bare column for counts), and the
/// bounds [`BoundedTotals`] enforces over them.
#[allow(clippy::too_many_arguments)]
fn bounded(
    builder: LogicalPlanBuilder,
    governance: &Governance,
    partials: &[Partial],
    unit: Expr,
    groups: Vec<Expr>,
    bounds: ContributionBounds,
    cut: bool,
    key: [u8; 32],
) -> Result<ReleasePlan, TallyError> {
    let (bounding, arguments) = bounding_of(governance, partials, groups.len(), bounds, cut, key)?;
    let mut columns = vec![unit.alias(UNIT)];
    columns.extend(groups);
    columns.extend(
        arguments
            .into_iter()
            .enumerate()
            .map(|(i, column)| column_ref_expr(&column).alias(format!("__tally_argument_{i}"))),
    );
    let rows = builder
        .project(columns)
        .and_then(|b| b.sort(vec![col(UNIT).sort(true, true)]))
        .and_then(|b| b.build())
        .map_err(engine)?;
    Ok(ReleasePlan::Bounded { rows, bounding })
}

/// The bounds [`BoundedTotals`] enforces over a release's rows with `groups` group columns,
/// and the measured columns its arguments are, in order (sums first, in fixed point; then
/// columns only counted).
pub(crate) fn bounding_of(
    governance: &Governance,
    partials: &[Partial],
    groups: usize,
    bounds: ContributionBounds,
    cut: bool,
    key: [u8; 32],
) -> Result<(Bounding, Vec<ColumnRef>), TallyError> {
    let rows = i128::from(bounds.rows_per_group);
    // Sums first, so a column both counted and summed is read once, in fixed point (a
    // value is missing where the column is NULL or NaN).
    let mut arguments: Vec<(ColumnRef, Option<FixedPoint>)> = Vec::new();
    let mut fixed_points = Vec::new();
    for partial in partials {
        let fixed = FixedPoint::of_partial(governance, partial)?;
        fixed_points.push(fixed);
        if let (Some(column), Some(fixed)) = (partial.column(), fixed)
            && !arguments.iter().any(|(c, _)| c == column)
        {
            arguments.push((column.clone(), Some(fixed)));
        }
    }
    for partial in partials {
        if let Partial::Count(column) = partial
            && !arguments.iter().any(|(c, _)| c == column)
        {
            arguments.push((column.clone(), None));
        }
    }
    let arg = |column: &ColumnRef| {
        arguments
            .iter()
            .position(|(c, _)| c == column)
            .ok_or_else(|| bad("a measured column has no argument"))
    };
    let mut measures = Vec::new();
    for (partial, fixed) in partials.iter().zip(&fixed_points) {
        let measure = match (partial, fixed) {
            (Partial::Rows, _) => Measure::Rows,
            (Partial::Count(column), _) => Measure::Values { arg: arg(column)? },
            (Partial::Sum(column), Some(fixed)) => {
                let (low, high) = fixed.fixed_bounds();
                Measure::Sum {
                    arg: arg(column)?,
                    low: rows * i128::from(low.min(0)),
                    high: rows * i128::from(high.max(0)),
                }
            }
            (Partial::SumSquares(column), Some(fixed)) => {
                let magnitude = i128::try_from(fixed.magnitude()).unwrap_or(i128::MAX);
                Measure::SumSquares {
                    arg: arg(column)?,
                    low: 0,
                    high: rows.saturating_mul(magnitude.saturating_mul(magnitude)),
                }
            }
            (Partial::Sum(_) | Partial::SumSquares(_), None) => {
                return Err(bad("a sum has no bounds"));
            }
        };
        measures.push(measure);
    }
    let bounding = Bounding {
        groups,
        arguments: arguments.iter().map(|(_, fixed)| *fixed).collect(),
        measures,
        rows_per_group: bounds.rows_per_group,
        groups_per_unit: cut.then(|| usize::try_from(bounds.groups_per_unit).unwrap_or(usize::MAX)),
        key,
    };
    Ok((
        bounding,
        arguments.into_iter().map(|(column, _)| column).collect(),
    ))
}

fn column_expr(table: &str, column: &str) -> Expr {
    Expr::Column(Column::new(Some(table), column))
}

fn column_ref_expr(column: &ColumnRef) -> Expr {
    column_expr(&column.table, &column.column)
}

/// A dimension: the bare column, or the registered generaliser of it (its argument cast to
/// the generaliser's input type, which cannot fail for the declared columns).
fn dimension_expr(ctx: &SessionContext, dimension: &Dimension) -> Result<Expr, TallyError> {
    let bare = column_ref_expr(&dimension.column);
    let Some(generaliser) = dimension.generaliser else {
        return Ok(bare);
    };
    let udf = ctx
        .udf(generaliser.function_name())
        .map_err(|_| TallyError::new(ErrorCode::Internal, "a generaliser is not registered"))?;
    let input = match generaliser {
        tally_common::model::Generaliser::AgeBand => DataType::Int64,
        tally_common::model::Generaliser::Month | tally_common::model::Generaliser::Year => {
            DataType::Date32
        }
        tally_common::model::Generaliser::PostcodeDistrict => DataType::Utf8,
    };
    Ok(Expr::ScalarFunction(ScalarFunction::new_udf(
        udf,
        vec![cast(bare, input)],
    )))
}

/// A partial's exact aggregate, for policies without noise.
fn exact_expr(partial: &Partial) -> Expr {
    match partial {
        Partial::Rows => count(lit(1i64)),
        Partial::Count(column) => count(column_ref_expr(column)),
        Partial::Sum(column) => sum(column_ref_expr(column)),
        Partial::SumSquares(column) => {
            let value = cast(column_ref_expr(column), DataType::Float64);
            sum(value.clone() * value)
        }
    }
}

/// A constant as a value of exactly `target`; refused when it does not fit.
pub(crate) fn literal_value(
    literal: &Literal,
    target: &DataType,
    on: &Dimension,
) -> Result<ScalarValue, TallyError> {
    let mismatch = || {
        bad(format!(
            "a constant compared with {} is not of its type ({target})",
            on.to_sql()
        ))
    };
    let value = match (literal, target) {
        (Literal::Text(text), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => {
            ScalarValue::Utf8(Some(text.clone()))
        }
        (Literal::Int(v), t) if t.is_integer() => ScalarValue::Int64(Some(*v)),
        (Literal::Float(v), DataType::Float32 | DataType::Float64) if v.is_finite() => {
            ScalarValue::Float64(Some(*v))
        }
        (Literal::Int(v), DataType::Float32 | DataType::Float64) => {
            ScalarValue::Float64(Some(*v as f64))
        }
        // A decimal column is compared with the constant rounded to the column's scale.
        (Literal::Int(v), DataType::Decimal128(..)) => ScalarValue::Int64(Some(*v)),
        (Literal::Float(v), DataType::Decimal128(..)) if v.is_finite() => {
            ScalarValue::Float64(Some(*v))
        }
        (Literal::Date(text), DataType::Date32) => {
            let date =
                chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").map_err(|_| mismatch())?;
            let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).ok_or_else(mismatch)?;
            let days = i32::try_from(date.signed_duration_since(epoch).num_days())
                .map_err(|_| mismatch())?;
            ScalarValue::Date32(Some(days))
        }
        (Literal::Bool(v), DataType::Boolean) => ScalarValue::Boolean(Some(*v)),
        (
            Literal::Text(_)
            | Literal::Int(_)
            | Literal::Float(_)
            | Literal::Date(_)
            | Literal::Bool(_),
            _,
        ) => {
            return Err(mismatch());
        }
    };
    // Widening to the column's own type is exact for every pair accepted above; integers
    // that do not fit the column's width are refused rather than wrapped.
    value.cast_to(target).map_err(|_| mismatch())
}

/// The type a dimension has at this trust.
pub(crate) fn dimension_type(
    dimension: &Dimension,
    schema_of: &dyn Fn(&ColumnRef) -> Option<DataType>,
) -> Result<DataType, TallyError> {
    match dimension.generaliser {
        Some(g) => Ok(g.output_type()),
        None => schema_of(&dimension.column).ok_or_else(|| {
            TallyError::new(
                ErrorCode::UnknownColumn,
                format!("this trust has no column {}", dimension.to_sql()),
            )
        }),
    }
}

fn predicate_expr(
    ctx: &SessionContext,
    predicate: &Predicate,
    schema_of: &dyn Fn(&ColumnRef) -> Option<DataType>,
) -> Result<Expr, TallyError> {
    let operand = |on: &Dimension| -> Result<(Expr, DataType), TallyError> {
        Ok((dimension_expr(ctx, on)?, dimension_type(on, schema_of)?))
    };
    let negate = |expr: Expr, negated: bool| {
        if negated {
            Expr::Not(Box::new(expr))
        } else {
            expr
        }
    };
    match predicate {
        Predicate::And { all } => fold(ctx, all, schema_of, Expr::and),
        Predicate::Or { any } => fold(ctx, any, schema_of, Expr::or),
        Predicate::Not { not } => Ok(Expr::Not(Box::new(predicate_expr(ctx, not, schema_of)?))),
        Predicate::Compare { on, cmp, value } => {
            let (expr, data_type) = operand(on)?;
            let value = lit(literal_value(value, &data_type, on)?);
            Ok(match cmp {
                Comparison::Eq => expr.eq(value),
                Comparison::NotEq => expr.not_eq(value),
                Comparison::Lt => expr.lt(value),
                Comparison::LtEq => expr.lt_eq(value),
                Comparison::Gt => expr.gt(value),
                Comparison::GtEq => expr.gt_eq(value),
            })
        }
        Predicate::InList {
            on,
            values,
            negated,
        } => {
            let (expr, data_type) = operand(on)?;
            let values = values
                .iter()
                .map(|v| Ok(lit(literal_value(v, &data_type, on)?)))
                .collect::<Result<Vec<_>, TallyError>>()?;
            Ok(expr.in_list(values, *negated))
        }
        Predicate::Between {
            on,
            low,
            high,
            negated,
        } => {
            let (expr, data_type) = operand(on)?;
            let low = lit(literal_value(low, &data_type, on)?);
            let high = lit(literal_value(high, &data_type, on)?);
            Ok(negate(expr.between(low, high), *negated))
        }
        Predicate::IsNull { on, negated } => {
            let (expr, _) = operand(on)?;
            Ok(if *negated {
                expr.is_not_null()
            } else {
                expr.is_null()
            })
        }
        Predicate::Prefix {
            on,
            prefix,
            negated,
        } => {
            let (expr, data_type) = operand(on)?;
            if !data_type.is_string() {
                return Err(bad(format!("{} is not text", on.to_sql())));
            }
            Ok(negate(starts_with(expr, lit(prefix.clone())), *negated))
        }
    }
}

fn fold(
    ctx: &SessionContext,
    operands: &[Predicate],
    schema_of: &dyn Fn(&ColumnRef) -> Option<DataType>,
    combine: fn(Expr, Expr) -> Expr,
) -> Result<Expr, TallyError> {
    let mut exprs = operands.iter().map(|p| predicate_expr(ctx, p, schema_of));
    let first = exprs
        .next()
        .ok_or_else(|| bad("an AND or OR with no operands"))??;
    exprs.try_fold(first, |acc, next| Ok(combine(acc, next?)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{AsArray, Float64Array, RecordBatch, StringArray};
    use arrow::datatypes::{Decimal128Type, Field, Int64Type, Schema};
    use datafusion::datasource::MemTable;
    use std::sync::Arc;
    use tally_common::model::{Aggregate, MODEL_VERSION};

    use tally_kernels::bounding::UNITS;

    fn governance() -> Governance {
        let data: serde_json::Value =
            serde_json::from_str(include_str!("../../policies/catalogue.json")).unwrap();
        Governance::from_policy_data(&data).unwrap()
    }

    /// Episodes of three patients: `p1` has five episodes in specialty 100 (one costing a
    /// billion) and one in each of 300, 320, 340, 400; `p2` and `p3` one each in 100; in
    /// reverse order if `reversed`.
    fn context(reversed: bool) -> SessionContext {
        let mut rows = vec![
            ("p1", "100", 1.0e9),
            ("p1", "100", 10.0),
            ("p1", "100", 10.0),
            ("p1", "100", 10.0),
            ("p1", "100", 10.0),
            ("p1", "300", 10.0),
            ("p1", "320", 10.0),
            ("p1", "340", 10.0),
            ("p1", "400", 10.0),
            ("p2", "100", 100.0),
            ("p3", "100", 200.0),
        ];
        if reversed {
            rows.reverse();
        }
        let rows: Vec<_> = rows.into_iter().map(|(p, s, c)| (p, s, Some(c))).collect();
        episodes(&rows)
    }

    /// A session whose `episodes` table holds `rows` of (person, specialty, cost).
    fn episodes(rows: &[(&str, &str, Option<f64>)]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("specialty", DataType::Utf8, false),
            Field::new("cost", DataType::Float64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
                Arc::new(Float64Array::from_iter(rows.iter().map(|r| r.2))),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_table(
            "episodes",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        ctx
    }

    /// The bounded plan's answer to `release` over `ctx`, with the bounding key `key`.
    async fn bounded_answer(ctx: &SessionContext, release: &ReleaseQuery, key: u8) -> RecordBatch {
        let governance = governance();
        let aggregation = Aggregation::Bounded {
            bounds: ContributionBounds::of(&governance, release),
            key: [key; 32],
        };
        let (plan, _) = build_plan(ctx, &governance, release, &aggregation)
            .await
            .unwrap();
        let batches = plan.run(ctx).await.unwrap();
        let batch = arrow::compute::concat_batches(&batches[0].schema(), &batches).unwrap();
        // In the order of the first group column, for comparisons.
        let order = arrow::compute::sort_to_indices(batch.column(0), None, None).unwrap();
        arrow::compute::take_record_batch(&batch, &order).unwrap()
    }

    fn cost_by_specialty() -> ReleaseQuery {
        let cost = ColumnRef {
            table: "episodes".into(),
            column: "cost".into(),
        };
        ReleaseQuery {
            version: MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter: None,
            group_by: vec![Dimension::bare("episodes", "specialty")],
            aggregates: vec![
                Aggregate::CountRows,
                Aggregate::Variance {
                    column: cost,
                    population: true,
                },
            ],
        }
    }

    #[tokio::test]
    async fn a_bounded_plan_caps_each_patient_and_yields_only_integers_for_the_noise() {
        let ctx = context(false);
        let governance = governance();
        let release = cost_by_specialty();
        let bounds = ContributionBounds::of(&governance, &release);
        assert_eq!(
            bounds,
            ContributionBounds {
                rows_per_group: 2,
                groups_per_unit: 3
            }
        );
        let batch = bounded_answer(&ctx, &release, 7).await;
        // What noise is added to is integer: counts, and sums in fixed point. No float.
        for field in batch.schema().fields().iter().skip(1) {
            assert!(
                matches!(
                    field.data_type(),
                    DataType::Int64 | DataType::Decimal128(38, 0)
                ),
                "{field}"
            );
        }
        let partials = release.partials();
        let index = |p: &Partial| 1 + partials.iter().position(|q| q == p).unwrap();
        let cost = ColumnRef {
            table: "episodes".into(),
            column: "cost".into(),
        };
        let specialties = batch.column(0).as_string::<i32>();
        let row = (0..batch.num_rows())
            .find(|&r| specialties.value(r) == "100")
            .unwrap();
        let rows = batch
            .column(index(&Partial::Rows))
            .as_primitive::<Int64Type>();
        let units = batch
            .column(batch.schema().index_of(UNITS).unwrap())
            .as_primitive::<Int64Type>();
        let p1_in_100 = units.value(row) == 3;
        assert_eq!(
            rows.value(row),
            if p1_in_100 { 4 } else { 2 },
            "p1's five episodes count 2, p2 and p3 one each"
        );
        let others = (0..batch.num_rows())
            .filter(|&r| specialties.value(r) != "100")
            .count();
        assert_eq!(
            others + usize::from(p1_in_100),
            3,
            "p1 counts in exactly 3 of the 5 specialties it has episodes in"
        );
        let sums = batch
            .column(index(&Partial::Sum(cost)))
            .as_primitive::<Decimal128Type>();
        // Each value is clamped to [0, 20000]; p1's five (20040 in all) count as two
        // values at p1's mean: 20040 x 2 / 5.
        let expected = if p1_in_100 { 8_016 + 100 + 200 } else { 300 };
        assert_eq!(sums.value(row), expected);
    }

    #[tokio::test]
    async fn the_keyed_rank_picks_the_same_groups_whatever_the_row_order() {
        let release = cost_by_specialty();
        let mut answers = Vec::new();
        for reversed in [false, true] {
            let batch = bounded_answer(&context(reversed), &release, 9).await;
            answers.push(
                arrow::util::pretty::pretty_format_batches(&[batch])
                    .unwrap()
                    .to_string(),
            );
        }
        assert_eq!(answers[0], answers[1]);
    }

    /// A session with a `ranges` table of (code_from, code_to).
    fn ranges(rows: &[(&str, &str)]) -> SessionContext {
        let schema = Arc::new(Schema::new(vec![
            Field::new("code_from", DataType::Utf8, false),
            Field::new("code_to", DataType::Utf8, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap();
        let ctx = SessionContext::new();
        ctx.register_table(
            "ranges",
            Arc::new(MemTable::try_new(schema, vec![vec![batch]]).unwrap()),
        )
        .unwrap();
        ctx
    }

    #[tokio::test]
    async fn a_range_lookup_finds_the_range_between_would_and_declines_overlaps() {
        let table = [("A00", "B99"), ("D50", "D89"), ("C00", "D48")];
        let ctx = ranges(&table);
        let codes = [
            Some("A00"),
            Some("B99"),
            Some("C00"),
            Some("D49"),
            Some("D50"),
            Some("D89"),
            Some("D90"),
            Some("Z"),
            Some(""),
            None,
        ];
        let lookup = range_lookup(&ctx, "ranges", "code_from", "code_to", &col("code"))
            .await
            .unwrap()
            .expect("small disjoint text ranges are looked up");
        let schema = Arc::new(Schema::new(vec![Field::new("code", DataType::Utf8, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(StringArray::from(codes.to_vec()))],
        )
        .unwrap();
        let found = SessionContext::new()
            .read_batch(batch)
            .unwrap()
            .select(vec![lookup.alias("low")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let found = arrow::compute::cast(found[0].column(0), &DataType::Utf8).unwrap();
        let found: Vec<Option<String>> = found
            .as_string::<i32>()
            .iter()
            .map(|v| v.map(str::to_string))
            .collect();
        // What `code BETWEEN code_from AND code_to` matches, row by row.
        let between: Vec<Option<String>> = codes
            .iter()
            .map(|code| {
                let code = (*code)?;
                table
                    .iter()
                    .find(|(low, high)| *low <= code && code <= *high)
                    .map(|(low, _)| low.to_string())
            })
            .collect();
        assert_eq!(found, between);
        assert_eq!(found[3], None, "D49 falls between two ranges");
        let overlapping = ranges(&[("A00", "C99"), ("C50", "D89")]);
        assert!(
            range_lookup(&overlapping, "ranges", "code_from", "code_to", &col("code"))
                .await
                .unwrap()
                .is_none(),
            "overlapping ranges keep the join"
        );
    }

    #[tokio::test]
    async fn a_missing_value_adds_nothing_to_a_sum() {
        let ctx = episodes(&[
            ("p1", "100", None),
            ("p1", "100", None),
            ("p2", "100", Some(100.0)),
            ("p2", "100", None),
        ]);
        let release = cost_by_specialty();
        let batch = bounded_answer(&ctx, &release, 3).await;
        let partials = release.partials();
        let cost = ColumnRef {
            table: "episodes".into(),
            column: "cost".into(),
        };
        let index = |p: &Partial| 1 + partials.iter().position(|q| q == p).unwrap();
        let value = |p: &Partial| {
            let column = batch.column(index(p));
            match column.as_primitive_opt::<Int64Type>() {
                Some(counts) => i128::from(counts.value(0)),
                None => column.as_primitive::<Decimal128Type>().value(0),
            }
        };
        assert_eq!(value(&Partial::Rows), 4);
        assert_eq!(value(&Partial::Count(cost.clone())), 1);
        assert_eq!(
            value(&Partial::Sum(cost.clone())),
            100,
            "NULL costs are not the upper bound"
        );
        assert_eq!(value(&Partial::SumSquares(cost)), 10_000);
    }
}
