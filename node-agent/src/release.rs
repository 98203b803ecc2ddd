//! Building: the node's own DataFusion plan for one release, from the model alone.
//!
//! The node never runs SQL text. It joins only along relationships its own catalogue
//! declares, compares columns with constants of the column's own type (so no comparison or
//! cast can fail on a row's value), applies generalisers to bare columns, and aggregates
//! per group: exactly, or (under a noise policy) bounded per patient (see
//! [`crate::bounding`]) so the noise added afterwards is calibrated to what one patient can
//! change.

use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{MemTable, provider_as_source};
use datafusion::execution::FunctionRegistry;
use datafusion::functions::core::expr_fn::{coalesce, greatest, least, nullif};
use datafusion::functions::math::expr_fn::round;
use datafusion::functions::string::expr_fn::starts_with;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::logical_expr::ScalarUDF;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::{Expr, JoinType, LogicalPlan, LogicalPlanBuilder, cast, col, lit};
use datafusion::prelude::SessionContext;
use tally_common::governance::{Governance, Relationship};
use tally_common::model::{
    ColumnRef, Comparison, Dimension, Literal, Partial, Predicate, ReleaseQuery, group_column,
    partial_column,
};
use tally_common::privacy::{ContributionBounds, FixedPoint, public_keys};
use tally_common::{ErrorCode, TallyError};

use crate::bounding::group_cut_udaf;

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

/// How a node aggregates a release.
#[derive(Debug, Clone)]
pub enum Aggregation {
    /// Exact aggregates, for policies without noise (tests that compare answers with a
    /// central computation): the partial schema's columns, nothing bounded.
    Exact,
    /// Bounded per patient: the columns noise is added to. Counts are Int64, sums and sums
    /// of squares Decimal128(38, 0) in fixed-point units, and [`UNITS`] counts the patients
    /// left in each group after bounding.
    Bounded {
        /// The contribution bounds.
        bounds: ContributionBounds,
        /// The keyed hash that chooses a patient's groups.
        rank: Arc<ScalarUDF>,
    },
}

/// The column of a bounded plan counting each group's patients.
pub const UNITS: &str = "__tally_units";

/// How a node runs a release.
pub enum ReleasePlan {
    /// One plan, run to the end.
    Single(LogicalPlan),
    /// The per-patient table first, kept in memory, then [`Cut::plan`] over it: the cut of
    /// each patient's groups and the totals both read it, and computing it once halves the
    /// work.
    PerPatient {
        /// The per-(patient, group) aggregates, each with its keyed rank.
        per_patient: LogicalPlan,
        /// What is done with them.
        cut: Cut,
    },
}

/// The second half of a release whose patients may fall in too many groups.
pub struct Cut {
    groups_per_unit: u64,
    group_names: Vec<Expr>,
    capped: Vec<Expr>,
}

impl Cut {
    /// The plan over the per-patient table `rows` (of `schema`): each patient's
    /// `groups_per_unit` lowest-ranked groups, capped and summed per group.
    pub fn plan(
        self,
        schema: SchemaRef,
        rows: Vec<RecordBatch>,
    ) -> Result<LogicalPlan, TallyError> {
        let table = MemTable::try_new(schema, vec![rows]).map_err(engine)?;
        let ranked =
            LogicalPlanBuilder::scan(PER_PATIENT, provider_as_source(Arc::new(table)), None)
                .and_then(|b| b.build())
                .map_err(engine)?;
        let cut = Expr::AggregateFunction(AggregateFunction::new_udf(
            Arc::new(group_cut_udaf(
                usize::try_from(self.groups_per_unit).unwrap_or(usize::MAX),
            )),
            vec![col(RANK)],
            false,
            None,
            vec![],
            None,
        ));
        let cuts = LogicalPlanBuilder::from(ranked.clone())
            .aggregate(vec![col(UNIT).alias(CUT_UNIT)], vec![cut.alias(CUT)])
            .and_then(|b| b.build())
            .map_err(engine)?;
        LogicalPlanBuilder::from(ranked)
            .join(
                cuts,
                JoinType::Inner,
                (
                    vec![Column::from_name(UNIT)],
                    vec![Column::from_name(CUT_UNIT)],
                ),
                None,
            )
            .and_then(|b| b.filter(col(CUT).is_null().or(col(RANK).lt_eq(col(CUT)))))
            .and_then(|b| b.aggregate(self.group_names, self.capped))
            .and_then(|b| b.build())
            .map_err(engine)
    }
}

/// The name the per-patient table is scanned under.
const PER_PATIENT: &str = "__tally_per_patient";

/// The plan for `release` over `ctx`'s tables, validated against `governance` (already
/// done by the caller) and this trust's schemas: group columns `g0..`, then one column per
/// partial `p0..` (and [`UNITS`] when bounded); and the partial schema the trust answers
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
            } => builder.join_on(
                right,
                JoinType::Inner,
                [datafusion::functions::unicode::expr_fn::substring(
                    column_expr(&release.fact, code),
                    lit(1i64),
                    lit(i64::from(*prefix)),
                )
                .between(column_expr(join, low), column_expr(join, high))],
            ),
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
            Ok((ReleasePlan::Single(plan), expected))
        }
        Aggregation::Bounded { bounds, rank } => {
            let unit = column_expr(&release.fact, unit);
            let group_types: Vec<DataType> = expected.fields()[..groups.len()]
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            let per_group = PerGroup {
                groups,
                group_types,
                unit,
            };
            let plan = bounded(
                builder, governance, release, &partials, per_group, *bounds, rank,
            )?;
            Ok((plan, expected))
        }
    }
}

/// What a bounded plan groups by: the group expressions and their types, and the patient.
struct PerGroup {
    groups: Vec<Expr>,
    group_types: Vec<DataType>,
    unit: Expr,
}

/// The hidden column holding each row's patient in a bounded plan.
const UNIT: &str = "__tally_unit";

/// The hidden keyed rank of a (patient, group).
const RANK: &str = "__tally_rank";

/// The hidden patient column of the per-patient cut-offs.
const CUT_UNIT: &str = "__tally_cut_unit";

/// The hidden per-patient cut-off rank.
const CUT: &str = "__tally_cut";

/// Whether a patient could fall in more groups than the bounds allow: not when there are
/// no groups, nor when every key is public and there are no more keys than that.
fn needs_cut(
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

/// Per (patient, group) aggregates, a patient's groups cut to `groups_per_unit` by keyed
/// rank, each per-patient aggregate capped or clamped, then summed per group.
fn bounded(
    builder: LogicalPlanBuilder,
    governance: &Governance,
    release: &ReleaseQuery,
    partials: &[Partial],
    per_group: PerGroup,
    bounds: ContributionBounds,
    rank: &Arc<ScalarUDF>,
) -> Result<ReleasePlan, TallyError> {
    let PerGroup {
        groups,
        group_types,
        unit,
    } = per_group;
    let rows = i64::try_from(bounds.rows_per_group).unwrap_or(i64::MAX);
    let mut per_unit = Vec::new();
    let mut capped = Vec::new();
    for (i, partial) in partials.iter().enumerate() {
        let name = partial_column(i);
        let fixed = FixedPoint::of_partial(governance, partial)?
            .and_then(|fixed| partial.column().map(|column| (column, fixed)));
        let (expr, low, high) = match (partial, fixed) {
            (Partial::Rows, _) => (count(lit(1i64)), 0, rows),
            (Partial::Count(column), _) => (count(column_ref_expr(column)), 0, rows),
            (Partial::Sum(_), Some((column, fixed))) => {
                let (low, high) = fixed.fixed_bounds();
                (
                    sum(fixed_point(column, fixed)),
                    rows.saturating_mul(low.min(0)),
                    rows.saturating_mul(high.max(0)),
                )
            }
            (Partial::SumSquares(_), Some((column, fixed))) => {
                let value = fixed_point(column, fixed);
                let magnitude = i64::try_from(fixed.magnitude()).unwrap_or(i64::MAX);
                (
                    sum(value.clone() * value),
                    0,
                    rows.saturating_mul(magnitude.saturating_mul(magnitude)),
                )
            }
            (Partial::Sum(_) | Partial::SumSquares(_), None) => {
                return Err(bad("a sum has no column"));
            }
        };
        per_unit.push(expr.alias(name.clone()));
        // A patient with more than `rows` values in a group counts `rows` of them: counts
        // are capped, and sums scaled to `rows` times the patient's own mean there, so the
        // group's mean is not skewed by how many rows were cut.
        let per_patient = match (partial, fixed) {
            (Partial::Rows | Partial::Count(_), _) => col(&name),
            (Partial::Sum(_) | Partial::SumSquares(_), None) => {
                return Err(bad("a sum has no column"));
            }
            (Partial::Sum(_) | Partial::SumSquares(_), Some((column, _))) => {
                let values = format!("{name}_values");
                per_unit.push(count(column_ref_expr(column)).alias(values.clone()));
                // A patient with no value of the column adds nothing (not NULL, which the
                // clamp below would turn into its upper bound).
                coalesce(vec![
                    col(&name) * least(vec![col(&values), lit(rows)])
                        / nullif(col(&values), lit(0i64)),
                    lit(0i64),
                ])
            }
        };
        let clamped = greatest(vec![lit(low), least(vec![per_patient, lit(high)])]);
        let value = match partial {
            Partial::Rows | Partial::Count(_) => clamped,
            Partial::Sum(_) | Partial::SumSquares(_) => cast(clamped, DataType::Decimal128(38, 0)),
        };
        capped.push(sum(value).alias(name));
    }
    capped.push(count(lit(1i64)).alias(UNITS));
    let group_names: Vec<Expr> = (0..groups.len()).map(|i| col(group_column(i))).collect();
    let mut unit_and_groups = vec![unit.alias(UNIT)];
    unit_and_groups.extend(groups);
    let builder = builder
        .aggregate(unit_and_groups, per_unit)
        .map_err(engine)?;
    if needs_cut(governance, release, &group_types, bounds)? {
        // Each patient's groups ranked by the keyed hash; the patient's `groups_per_unit`
        // lowest count (see [`Cut`]: an aggregate per patient and a join; a window
        // partitioned by patient costs several times more).
        let mut hashed = vec![col(UNIT)];
        hashed.extend(group_names.iter().cloned());
        let rank_of = Expr::ScalarFunction(ScalarFunction::new_udf(rank.clone(), hashed));
        let mut columns: Vec<Expr> = builder
            .schema()
            .columns()
            .into_iter()
            .map(Expr::Column)
            .collect();
        columns.push(rank_of.alias(RANK));
        let per_patient = builder
            .project(columns)
            .and_then(|b| b.build())
            .map_err(engine)?;
        return Ok(ReleasePlan::PerPatient {
            per_patient,
            cut: Cut {
                groups_per_unit: bounds.groups_per_unit,
                group_names,
                capped,
            },
        });
    }
    builder
        .aggregate(group_names, capped)
        .and_then(|b| b.build())
        .map(ReleasePlan::Single)
        .map_err(engine)
}

/// A value clamped to its bounds, in integer fixed point; NULL stays NULL (`least` and
/// `greatest` skip NULLs, so a missing value would otherwise become the upper bound).
fn fixed_point(column: &ColumnRef, fixed: FixedPoint) -> Expr {
    let value = cast(column_ref_expr(column), DataType::Float64);
    let clamped = greatest(vec![
        lit(fixed.low),
        least(vec![value.clone(), lit(fixed.high)]),
    ]);
    let fixed_value = cast(
        round(vec![clamped * lit(fixed.scale as f64)]),
        DataType::Int64,
    );
    Expr::Case(datafusion::logical_expr::Case::new(
        None,
        vec![(Box::new(value.is_not_null()), Box::new(fixed_value))],
        None,
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
fn literal_value(
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
fn dimension_type(
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
    use datafusion::prelude::DataFrame;
    use tally_common::model::{Aggregate, MODEL_VERSION};

    use crate::bounding::keyed_rank_udf;

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
            rank: Arc::new(keyed_rank_udf([key; 32])),
        };
        let (plan, _) = build_plan(ctx, &governance, release, &aggregation)
            .await
            .unwrap();
        let batches = match plan {
            ReleasePlan::Single(plan) => DataFrame::new(ctx.state(), plan).collect().await,
            ReleasePlan::PerPatient { per_patient, cut } => {
                let schema = Arc::new(per_patient.schema().as_arrow().clone());
                let rows = DataFrame::new(ctx.state(), per_patient)
                    .collect()
                    .await
                    .unwrap();
                DataFrame::new(ctx.state(), cut.plan(schema, rows).unwrap())
                    .collect()
                    .await
            }
        }
        .unwrap();
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
