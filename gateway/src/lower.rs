//! Lowering: the analyst's DataFusion plan becomes releases ([`ReleaseQuery`]) and the
//! gateway-only rest of the query (*post*).
//!
//! Every aggregate that reads the trusts' tables is lowered, by an exhaustive match over
//! every [`LogicalPlan`] and [`Expr`] variant, into the query model; anything the model
//! cannot express is refused by name (`E_QUERY_SHAPE`, `E_WINDOW`, ...). No arm accepts by
//! default: a construct DataFusion adds is refused until someone maps it. The aggregate is
//! replaced by a scan of its [`ReleaseTable`], so whatever runs above it (HAVING, ORDER BY,
//! LIMIT, arithmetic, MIN/MAX, joins and subqueries of released results) sees released
//! values only. A trust's table read anywhere else is refused.

use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::datasource::provider_as_source;
use datafusion::logical_expr::expr::{AggregateFunction, ScalarFunction};
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, ExprSchemable, Join, JoinType, LogicalPlan, LogicalPlanBuilder,
    Operator, col,
};
use tally_common::governance::{Governance, Relationship};
use tally_common::model::{
    Aggregate as ModelAggregate, ColumnRef, Comparison, Dimension, Generaliser, Literal,
    MODEL_VERSION, Predicate, ReleaseQuery,
};
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::FederatedTableProvider;
use crate::release::{ReleaseTable, output_name};
use crate::send::QueryDispatch;

/// Rewrites `plan` so that trusts' tables are read only inside releases; returns the new
/// plan (post over release scans) and the releases, in the order they were lowered.
pub fn lower(
    plan: LogicalPlan,
    governance: &Governance,
    dispatch: &Arc<QueryDispatch>,
) -> Result<(LogicalPlan, Vec<ReleaseQuery>), TallyError> {
    let mut refusal: Option<TallyError> = None;
    let mut releases = Vec::new();
    let rewritten = plan
        .transform_up_with_subqueries(|node| {
            if refusal.is_some() {
                return Ok(Transformed::no(node));
            }
            let LogicalPlan::Aggregate(aggregate) = &node else {
                return node.recompute_schema().map(Transformed::yes);
            };
            if !reads_trust_tables(&aggregate.input) {
                return node.recompute_schema().map(Transformed::yes);
            }
            match lower_aggregate(aggregate, governance) {
                Ok(release) => {
                    let scan = release_scan(aggregate, &release, governance, dispatch);
                    releases.push(release);
                    scan.map(Transformed::yes)
                }
                Err(err) => {
                    refusal = Some(err);
                    Ok(Transformed::no(node))
                }
            }
        })
        .map_err(TallyError::from_planning)?;
    if let Some(err) = refusal {
        return Err(err);
    }
    ensure_no_trust_table(&rewritten.data)?;
    Ok((rewritten.data, releases))
}

/// The releases `plan` lowers to, for explaining a query without running it.
pub fn releases_of(
    plan: LogicalPlan,
    governance: &Governance,
) -> Result<Vec<ReleaseQuery>, TallyError> {
    let dispatch = Arc::new(QueryDispatch::new(
        "explain".into(),
        Arc::new(crate::catalogue::Catalogue::new(Vec::new())),
        tally_common::admission::RequestIdentity::default(),
        None,
    ));
    lower(plan, governance, &dispatch).map(|(_, releases)| releases)
}

/// The scan of a release's table, renamed to the aggregate's own output names.
fn release_scan(
    aggregate: &Aggregate,
    release: &ReleaseQuery,
    governance: &Governance,
    dispatch: &Arc<QueryDispatch>,
) -> datafusion::common::Result<LogicalPlan> {
    let types = aggregate
        .schema
        .fields()
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    let table = ReleaseTable::new(
        release.clone(),
        release.render_sql(governance),
        types,
        dispatch.clone(),
        governance,
    );
    let restore = aggregate
        .schema
        .iter()
        .enumerate()
        .map(|(index, (qualifier, field))| {
            col(output_name(index)).alias_qualified(qualifier.cloned(), field.name())
        });
    let name = format!("__tally_release_{}", table.id());
    LogicalPlanBuilder::scan(name, provider_as_source(Arc::new(table)), None)?
        .project(restore)?
        .build()
}

fn shape(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::QueryShape, message)
}

/// The trust's table a scan reads, if it reads one.
fn trust_table(plan: &LogicalPlan) -> Option<String> {
    let LogicalPlan::TableScan(scan) = plan else {
        return None;
    };
    let provider = source_as_provider(&scan.source).ok()?;
    if provider.is::<ReleaseTable>() {
        return None;
    }
    // Only trusts' tables and releases exist at the gateway: anything that is not a release
    // counts as a trust's table, so that it is refused rather than read.
    Some(
        provider
            .downcast_ref::<FederatedTableProvider>()
            .map_or_else(
                || scan.table_name.table().to_lowercase(),
                |t| t.table.name.to_lowercase(),
            ),
    )
}

fn reads_trust_tables(plan: &LogicalPlan) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        found |= trust_table(node).is_some();
        Ok(if found {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    found
}

/// The last line of defence: no trust's table may be read outside a release.
fn ensure_no_trust_table(plan: &LogicalPlan) -> Result<(), TallyError> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        found = trust_table(node);
        Ok(if found.is_some() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    });
    match found {
        None => Ok(()),
        Some(table) => Err(TallyError::new(
            ErrorCode::NotAggregate,
            format!(
                "this query reads rows of '{table}' outside an aggregate; read every table beneath an aggregate (COUNT, SUM, AVG, ...) so that only aggregates leave the trusts"
            ),
        )),
    }
}

/// What a subtree below a release reads: its tables, filters, and what each of its output
/// columns is (in the order of its schema).
struct Relation {
    /// The first table read: the fact table once joins are resolved.
    fact: String,
    /// Tables joined to it along declared relationships.
    joins: Vec<String>,
    /// Conjuncts of every filter.
    filters: Vec<Predicate>,
    /// Each output column as a bare or generalised column.
    columns: Vec<Dimension>,
}

/// The plan-node kind, by name, for refusals.
fn plan_kind(plan: &LogicalPlan) -> (&'static str, ErrorCode) {
    match plan {
        LogicalPlan::Projection(_) => ("a projection", ErrorCode::QueryShape),
        LogicalPlan::Filter(_) => ("a filter", ErrorCode::QueryShape),
        LogicalPlan::Window(_) => ("a window function", ErrorCode::Window),
        LogicalPlan::Aggregate(_) => ("an aggregate of an aggregate", ErrorCode::QueryShape),
        LogicalPlan::Sort(_) => ("ORDER BY", ErrorCode::LimitBelowAggregate),
        LogicalPlan::Join(_) => ("a join", ErrorCode::QueryShape),
        LogicalPlan::Repartition(_) => ("a repartition", ErrorCode::QueryShape),
        LogicalPlan::Union(_) => ("UNION, INTERSECT or EXCEPT", ErrorCode::SetOperation),
        LogicalPlan::TableScan(_) => ("a table", ErrorCode::QueryShape),
        LogicalPlan::EmptyRelation(_) => ("a SELECT without FROM", ErrorCode::QueryShape),
        LogicalPlan::Subquery(_) => ("a subquery", ErrorCode::QueryShape),
        LogicalPlan::SubqueryAlias(_) => ("a subquery alias", ErrorCode::QueryShape),
        LogicalPlan::Limit(_) => ("LIMIT or OFFSET", ErrorCode::LimitBelowAggregate),
        LogicalPlan::Statement(_) => ("a statement", ErrorCode::ReadOnly),
        LogicalPlan::Values(_) => ("VALUES", ErrorCode::Values),
        LogicalPlan::Explain(_) => ("EXPLAIN", ErrorCode::ReadOnly),
        LogicalPlan::Analyze(_) => ("EXPLAIN ANALYZE", ErrorCode::ReadOnly),
        LogicalPlan::Extension(_) => ("an extension node", ErrorCode::QueryShape),
        LogicalPlan::Distinct(_) => ("DISTINCT", ErrorCode::QueryShape),
        LogicalPlan::Dml(_) => ("a data change", ErrorCode::ReadOnly),
        LogicalPlan::Ddl(_) => ("a definition", ErrorCode::ReadOnly),
        LogicalPlan::Copy(_) => ("COPY", ErrorCode::ReadOnly),
        LogicalPlan::DescribeTable(_) => ("DESCRIBE", ErrorCode::ReadOnly),
        LogicalPlan::Unnest(_) => ("UNNEST", ErrorCode::QueryShape),
        LogicalPlan::RecursiveQuery(_) => ("a recursive query", ErrorCode::QueryShape),
    }
}

fn refuse_plan(plan: &LogicalPlan) -> TallyError {
    let (kind, code) = plan_kind(plan);
    TallyError::new(
        code,
        format!(
            "{kind} below an aggregate over the trusts' tables is not allowed: a release reads one table (and its declared relationships), filtered by constants, grouped by columns or declared generalisers"
        ),
    )
}

/// Lowers the subtree below an aggregate.
fn lower_relation(plan: &LogicalPlan, governance: &Governance) -> Result<Relation, TallyError> {
    match plan {
        LogicalPlan::TableScan(scan) => {
            let Some(table) = trust_table(plan) else {
                return Err(shape(
                    "an aggregate over released results and the trusts' tables together is not allowed",
                ));
            };
            if !scan.filters.is_empty() || scan.fetch.is_some() {
                return Err(refuse_plan(plan));
            }
            let columns = scan
                .projected_schema
                .fields()
                .iter()
                .map(|field| Dimension::bare(&table, field.name()))
                .collect();
            Ok(Relation {
                fact: table,
                joins: Vec::new(),
                filters: Vec::new(),
                columns,
            })
        }
        LogicalPlan::SubqueryAlias(alias) => lower_relation(&alias.input, governance),
        LogicalPlan::Projection(projection) => {
            let mut relation = lower_relation(&projection.input, governance)?;
            let columns = projection
                .expr
                .iter()
                .map(|expr| lower_dimension(expr, &relation.columns, projection.input.schema(), 0))
                .collect::<Result<Vec<_>, _>>()?;
            relation.columns = columns;
            Ok(relation)
        }
        LogicalPlan::Filter(filter) => {
            let mut relation = lower_relation(&filter.input, governance)?;
            let predicate = lower_predicate(
                &filter.predicate,
                &relation.columns,
                filter.input.schema(),
                0,
            )?;
            relation.filters.push(predicate);
            Ok(relation)
        }
        LogicalPlan::Join(join) => lower_join(join, governance),
        LogicalPlan::Window(_)
        | LogicalPlan::Aggregate(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Repartition(_)
        | LogicalPlan::Union(_)
        | LogicalPlan::EmptyRelation(_)
        | LogicalPlan::Subquery(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Statement(_)
        | LogicalPlan::Values(_)
        | LogicalPlan::Explain(_)
        | LogicalPlan::Analyze(_)
        | LogicalPlan::Extension(_)
        | LogicalPlan::Distinct(_)
        | LogicalPlan::Dml(_)
        | LogicalPlan::Ddl(_)
        | LogicalPlan::Copy(_)
        | LogicalPlan::DescribeTable(_)
        | LogicalPlan::Unnest(_)
        | LogicalPlan::RecursiveQuery(_) => Err(refuse_plan(plan)),
    }
}

/// A join is accepted only as one of the fact table's declared relationships, written on
/// exactly its keys: the model records the relationship, never the key columns.
fn lower_join(join: &Join, governance: &Governance) -> Result<Relation, TallyError> {
    let left = lower_relation(&join.left, governance)?;
    let right = lower_relation(&join.right, governance)?;
    let refuse = |why: &str| {
        shape(format!(
            "this join is not one the catalogue declares ({why}); write e.g. `episodes e JOIN patients p ON e.person_id = p.person_id`"
        ))
    };
    match join.join_type {
        JoinType::Inner => {}
        JoinType::Left
        | JoinType::Right
        | JoinType::Full
        | JoinType::LeftSemi
        | JoinType::RightSemi
        | JoinType::LeftAnti
        | JoinType::RightAnti
        | JoinType::LeftMark
        | JoinType::RightMark => return Err(refuse("only inner joins")),
    }
    let mut conditions: Vec<Expr> = join
        .on
        .iter()
        .map(|(l, r)| {
            Expr::BinaryExpr(BinaryExpr::new(
                Box::new(l.clone()),
                Operator::Eq,
                Box::new(r.clone()),
            ))
        })
        .collect();
    if let Some(filter) = &join.filter {
        split_conjunction(filter, &mut conditions);
    }
    let [condition] = conditions.as_slice() else {
        return Err(refuse(
            "a declared relationship joins on exactly its own keys",
        ));
    };
    let mut columns = left.columns.clone();
    columns.extend(right.columns.iter().cloned());
    let scope = join.schema.as_ref();
    let oriented = [(&left, &right), (&right, &left)];
    for (fact, other) in oriented {
        if !other.joins.is_empty() || other.fact == fact.fact {
            continue;
        }
        let Some(relationship) = governance
            .table(&fact.fact)
            .and_then(|t| t.relationships.get(&other.fact))
        else {
            continue;
        };
        if !joins_on(
            condition,
            relationship,
            &fact.fact,
            &other.fact,
            &columns,
            scope,
        )? {
            return Err(refuse("the condition is not the declared relationship's"));
        }
        let mut joins = fact.joins.clone();
        joins.push(other.fact.clone());
        let mut filters = left.filters.clone();
        filters.extend(right.filters.iter().cloned());
        return Ok(Relation {
            fact: fact.fact.clone(),
            joins,
            filters,
            columns,
        });
    }
    Err(refuse(&format!(
        "no relationship from '{}' to '{}'",
        left.fact, right.fact
    )))
}

fn split_conjunction(expr: &Expr, out: &mut Vec<Expr>) {
    match expr {
        Expr::BinaryExpr(BinaryExpr {
            left,
            op: Operator::And,
            right,
        }) => {
            split_conjunction(left, out);
            split_conjunction(right, out);
        }
        other => out.push(other.clone()),
    }
}

/// Whether `condition` is exactly `relationship` from `fact` to `other`.
fn joins_on(
    condition: &Expr,
    relationship: &Relationship,
    fact: &str,
    other: &str,
    columns: &[Dimension],
    scope: &DFSchema,
) -> Result<bool, TallyError> {
    let is = |expr: &Expr, table: &str, column: &str| -> bool {
        lower_dimension(expr, columns, scope, 0).is_ok_and(|d| {
            d.generaliser.is_none() && d.column.table == table && d.column.column == column
        })
    };
    match relationship {
        Relationship::ManyToOne { from, to } => {
            let Expr::BinaryExpr(BinaryExpr {
                left,
                op: Operator::Eq,
                right,
            }) = condition
            else {
                return Ok(false);
            };
            Ok((is(left, fact, from) && is(right, other, to))
                || (is(right, fact, from) && is(left, other, to)))
        }
        Relationship::CodeRange {
            code,
            prefix,
            low,
            high,
        } => {
            let Expr::Between(between) = condition else {
                return Ok(false);
            };
            let Expr::ScalarFunction(ScalarFunction { func, args }) = between.expr.as_ref() else {
                return Ok(false);
            };
            let [code_arg, start, length] = args.as_slice() else {
                return Ok(false);
            };
            Ok(!between.negated
                && func.name() == "substr"
                && is(code_arg, fact, code)
                && constant(start).is_some_and(|v| v == ScalarValue::Int64(Some(1)))
                && constant(length)
                    .is_some_and(|v| v == ScalarValue::Int64(Some(i64::from(*prefix))))
                && is(&between.low, other, low)
                && is(&between.high, other, high))
        }
    }
}

/// The expression kind, by name, for refusals.
// `Expr::Wildcard` is deprecated but still a variant: it is named, and refused.
#[allow(deprecated)]
fn expr_kind(expr: &Expr) -> &'static str {
    match expr {
        Expr::Alias(_) => "an alias",
        Expr::Column(_) => "a column",
        Expr::ScalarVariable(..) => "a variable",
        Expr::Literal(..) => "a constant",
        Expr::BinaryExpr(_) => "arithmetic or a comparison",
        Expr::Like(_) => "LIKE",
        Expr::SimilarTo(_) => "SIMILAR TO",
        Expr::Not(_) => "NOT",
        Expr::IsNotNull(_) => "IS NOT NULL",
        Expr::IsNull(_) => "IS NULL",
        Expr::IsTrue(_) => "IS TRUE",
        Expr::IsFalse(_) => "IS FALSE",
        Expr::IsUnknown(_) => "IS UNKNOWN",
        Expr::IsNotTrue(_) => "IS NOT TRUE",
        Expr::IsNotFalse(_) => "IS NOT FALSE",
        Expr::IsNotUnknown(_) => "IS NOT UNKNOWN",
        Expr::Negative(_) => "a negation",
        Expr::Between(_) => "BETWEEN",
        Expr::Case(_) => "CASE",
        Expr::Cast(_) => "a cast",
        Expr::TryCast(_) => "TRY_CAST",
        Expr::ScalarFunction(_) => "a function",
        Expr::AggregateFunction(_) => "an aggregate",
        Expr::WindowFunction(_) => "a window function",
        Expr::InList(_) => "IN",
        Expr::Exists(_) => "EXISTS",
        Expr::InSubquery(_) => "IN (subquery)",
        Expr::SetComparison(_) => "ANY / ALL (subquery)",
        Expr::ScalarSubquery(_) => "a scalar subquery",
        Expr::Wildcard { .. } => "a wildcard",
        Expr::GroupingSet(_) => "ROLLUP, CUBE or GROUPING SETS",
        Expr::Placeholder(_) => "a placeholder",
        Expr::OuterReferenceColumn(..) => "a correlated column",
        Expr::Unnest(_) => "UNNEST",
        Expr::HigherOrderFunction(_) => "a higher-order function",
        Expr::Lambda(_) => "a lambda",
        Expr::LambdaVariable(_) => "a lambda variable",
    }
}

fn refuse_expr(expr: &Expr, place: &str) -> TallyError {
    let code = match expr {
        Expr::GroupingSet(_) => ErrorCode::GroupingSets,
        Expr::WindowFunction(_) => ErrorCode::Window,
        _ => ErrorCode::QueryShape,
    };
    TallyError::new(
        code,
        format!(
            "{} is not allowed {place}: below a release only bare columns and the declared generalisers ({}) may be used",
            expr_kind(expr),
            Generaliser::ALL
                .iter()
                .map(|g| g.function_name())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    )
}

/// Deepest nesting of expressions below a release.
const MAX_EXPR_DEPTH: usize = 64;

fn too_deep() -> TallyError {
    TallyError::new(
        ErrorCode::TooLarge,
        format!("an expression below a release is nested more than {MAX_EXPR_DEPTH} deep"),
    )
}

/// A bare column or a declared generaliser of a bare column, resolved through `columns`
/// (the input's columns, in `schema`'s order).
// `Expr::Wildcard` is deprecated but still a variant: it is named, and refused.
#[allow(deprecated)]
fn lower_dimension(
    expr: &Expr,
    columns: &[Dimension],
    schema: &DFSchema,
    depth: usize,
) -> Result<Dimension, TallyError> {
    if depth > MAX_EXPR_DEPTH {
        return Err(too_deep());
    }
    match expr {
        Expr::Column(column) => {
            let index = schema
                .index_of_column(column)
                .map_err(TallyError::from_planning)?;
            columns.get(index).cloned().ok_or_else(|| {
                TallyError::new(ErrorCode::Internal, "a column could not be resolved")
            })
        }
        Expr::Alias(alias) => lower_dimension(&alias.expr, columns, schema, depth + 1),
        Expr::ScalarFunction(ScalarFunction { func, args }) => {
            let Some(generaliser) = Generaliser::from_function_name(func.name()) else {
                return Err(refuse_expr(expr, "on patient-level columns"));
            };
            let [arg] = args.as_slice() else {
                return Err(shape(format!(
                    "{} takes exactly one column",
                    generaliser.function_name()
                )));
            };
            let inner = lower_dimension(arg, columns, schema, depth + 1)?;
            match (inner.generaliser, arg) {
                (None, Expr::Column(_)) => Ok(Dimension {
                    column: inner.column,
                    generaliser: Some(generaliser),
                }),
                _ => Err(shape(format!(
                    "{} must be applied to a bare column, not to an expression",
                    generaliser.function_name()
                ))),
            }
        }
        Expr::ScalarVariable(..)
        | Expr::Literal(..)
        | Expr::BinaryExpr(_)
        | Expr::Like(_)
        | Expr::SimilarTo(_)
        | Expr::Not(_)
        | Expr::IsNotNull(_)
        | Expr::IsNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Negative(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::Cast(_)
        | Expr::TryCast(_)
        | Expr::AggregateFunction(_)
        | Expr::WindowFunction(_)
        | Expr::InList(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_)
        | Expr::ScalarSubquery(_)
        | Expr::Wildcard { .. }
        | Expr::GroupingSet(_)
        | Expr::Placeholder(_)
        | Expr::OuterReferenceColumn(..)
        | Expr::Unnest(_)
        | Expr::HigherOrderFunction(_)
        | Expr::Lambda(_)
        | Expr::LambdaVariable(_) => Err(refuse_expr(expr, "on patient-level columns")),
    }
}

/// A constant: a literal, or a cast, negation or arithmetic of constants (how SQL writes
/// `DATE '2024-01-01'`, `-5` and `DATE '1998-12-01' - INTERVAL '90' DAY`), folded here.
// `Expr::Wildcard` is deprecated but still a variant: it is named, and refused.
#[allow(deprecated)]
fn constant(expr: &Expr) -> Option<ScalarValue> {
    match expr {
        Expr::Literal(value, _) => Some(value.clone()),
        Expr::Cast(cast) => constant(&cast.expr)?.cast_to(cast.field.data_type()).ok(),
        Expr::TryCast(cast) => constant(&cast.expr)?.cast_to(cast.field.data_type()).ok(),
        Expr::Negative(inner) => constant(inner)?.arithmetic_negate().ok(),
        Expr::Alias(alias) => constant(&alias.expr),
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (left, right) = (constant(left)?, constant(right)?);
            match operator_use(*op) {
                OperatorUse::Fold(Arithmetic::Plus) => left.add_checked(&right).ok(),
                OperatorUse::Fold(Arithmetic::Minus) => left.sub_checked(&right).ok(),
                OperatorUse::Fold(Arithmetic::Multiply) => left.mul_checked(&right).ok(),
                OperatorUse::And
                | OperatorUse::Or
                | OperatorUse::Compare(_)
                | OperatorUse::Refused => None,
            }
        }
        Expr::Column(_)
        | Expr::ScalarVariable(..)
        | Expr::Like(_)
        | Expr::SimilarTo(_)
        | Expr::Not(_)
        | Expr::IsNotNull(_)
        | Expr::IsNull(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Between(_)
        | Expr::Case(_)
        | Expr::ScalarFunction(_)
        | Expr::AggregateFunction(_)
        | Expr::WindowFunction(_)
        | Expr::InList(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_)
        | Expr::ScalarSubquery(_)
        | Expr::Wildcard { .. }
        | Expr::GroupingSet(_)
        | Expr::Placeholder(_)
        | Expr::OuterReferenceColumn(..)
        | Expr::Unnest(_)
        | Expr::HigherOrderFunction(_)
        | Expr::Lambda(_)
        | Expr::LambdaVariable(_) => None,
    }
}

/// The type a dimension has once generalised.
fn dimension_type(
    expr: &Expr,
    dimension: &Dimension,
    schema: &DFSchema,
) -> Result<DataType, TallyError> {
    match dimension.generaliser {
        Some(Generaliser::AgeBand | Generaliser::PostcodeDistrict) => Ok(DataType::Utf8),
        Some(Generaliser::Month) => Ok(DataType::Date32),
        Some(Generaliser::Year) => Ok(DataType::Int32),
        None => expr.get_type(schema).map_err(TallyError::from_planning),
    }
}

/// A constant as a model literal of the operand's type; refused when it does not fit
/// exactly (so no trust ever casts a row's value, and no comparison can fail on data).
fn literal_for(
    value: &ScalarValue,
    target: &DataType,
    on: &Dimension,
) -> Result<Literal, TallyError> {
    let mismatch = || {
        TallyError::new(
            ErrorCode::Plan,
            format!(
                "{} is compared with a constant of another type ({}); compare it with a {} constant",
                on.to_sql(),
                value.data_type(),
                target
            ),
        )
    };
    if value.is_null() {
        return Err(shape(format!(
            "{} is compared with NULL; use IS NULL or IS NOT NULL",
            on.to_sql()
        )));
    }
    match target {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => match value {
            ScalarValue::Utf8(Some(s))
            | ScalarValue::LargeUtf8(Some(s))
            | ScalarValue::Utf8View(Some(s)) => Ok(Literal::Text(s.clone())),
            _ => Err(mismatch()),
        },
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32
        | DataType::UInt64 => {
            let whole = value
                .cast_to(&DataType::Int64)
                .ok()
                .filter(|_| value.data_type().is_integer());
            let Some(ScalarValue::Int64(Some(v))) = whole else {
                return Err(mismatch());
            };
            // Each trust checks the constant fits the column's own width: one that does
            // not is refused here, by name, rather than by every trust.
            if value.cast_to(target).is_err() {
                return Err(TallyError::new(
                    ErrorCode::Plan,
                    format!("{v} is outside the range of {} ({target})", on.to_sql()),
                ));
            }
            Ok(Literal::Int(v))
        }
        DataType::Float32 | DataType::Float64 | DataType::Decimal128(..) => {
            if !value.data_type().is_numeric() {
                return Err(mismatch());
            }
            match value.cast_to(&DataType::Float64) {
                Ok(ScalarValue::Float64(Some(v))) if v.is_finite() => Ok(Literal::Float(v)),
                _ => Err(mismatch()),
            }
        }
        DataType::Date32 => match value.cast_to(&DataType::Date32) {
            Ok(ScalarValue::Date32(Some(days))) => {
                let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)
                    .and_then(|epoch| epoch.checked_add_signed(chrono::Duration::days(days.into())))
                    .ok_or_else(mismatch)?;
                Ok(Literal::Date(date.format("%Y-%m-%d").to_string()))
            }
            _ => Err(mismatch()),
        },
        DataType::Boolean => match value {
            ScalarValue::Boolean(Some(b)) => Ok(Literal::Bool(*b)),
            _ => Err(mismatch()),
        },
        _ => Err(TallyError::new(
            ErrorCode::Plan,
            format!("{} cannot be compared with constants", on.to_sql()),
        )),
    }
}

/// The operand of a test: a dimension, with its type.
fn operand(
    expr: &Expr,
    columns: &[Dimension],
    schema: &DFSchema,
    depth: usize,
) -> Result<(Dimension, DataType), TallyError> {
    let dimension = lower_dimension(expr, columns, schema, depth)?;
    let data_type = dimension_type(expr, &dimension, schema)?;
    Ok((dimension, data_type))
}

fn constant_for(expr: &Expr, target: &DataType, on: &Dimension) -> Result<Literal, TallyError> {
    let value = constant(expr).ok_or_else(|| {
        shape(format!(
            "{} may only be compared with constants, not with {}",
            on.to_sql(),
            expr_kind(expr)
        ))
    })?;
    literal_for(&value, target, on)
}

/// Arithmetic folded over constants (never applied to a row's value).
enum Arithmetic {
    Plus,
    Minus,
    Multiply,
}

/// What a binary operator may do below a release. Every operator is named, so one that
/// DataFusion adds is a compile error here, never accepted by default.
enum OperatorUse {
    /// `AND` in a filter tree.
    And,
    /// `OR` in a filter tree.
    Or,
    /// A column-against-constant test.
    Compare(Comparison),
    /// Arithmetic between constants, folded at the gateway.
    Fold(Arithmetic),
    /// Anything else.
    Refused,
}

fn operator_use(op: Operator) -> OperatorUse {
    match op {
        Operator::And => OperatorUse::And,
        Operator::Or => OperatorUse::Or,
        Operator::Eq => OperatorUse::Compare(Comparison::Eq),
        Operator::NotEq => OperatorUse::Compare(Comparison::NotEq),
        Operator::Lt => OperatorUse::Compare(Comparison::Lt),
        Operator::LtEq => OperatorUse::Compare(Comparison::LtEq),
        Operator::Gt => OperatorUse::Compare(Comparison::Gt),
        Operator::GtEq => OperatorUse::Compare(Comparison::GtEq),
        Operator::Plus => OperatorUse::Fold(Arithmetic::Plus),
        Operator::Minus => OperatorUse::Fold(Arithmetic::Minus),
        Operator::Multiply => OperatorUse::Fold(Arithmetic::Multiply),
        Operator::Divide
        | Operator::Modulo
        | Operator::IsDistinctFrom
        | Operator::IsNotDistinctFrom
        | Operator::RegexMatch
        | Operator::RegexIMatch
        | Operator::RegexNotMatch
        | Operator::RegexNotIMatch
        | Operator::LikeMatch
        | Operator::ILikeMatch
        | Operator::NotLikeMatch
        | Operator::NotILikeMatch
        | Operator::BitwiseAnd
        | Operator::BitwiseOr
        | Operator::BitwiseXor
        | Operator::BitwiseShiftRight
        | Operator::BitwiseShiftLeft
        | Operator::StringConcat
        | Operator::AtArrow
        | Operator::ArrowAt
        | Operator::Arrow
        | Operator::LongArrow
        | Operator::HashArrow
        | Operator::HashLongArrow
        | Operator::AtAt
        | Operator::IntegerDivide
        | Operator::HashMinus
        | Operator::AtQuestion
        | Operator::Question
        | Operator::QuestionAnd
        | Operator::QuestionPipe
        | Operator::Colon => OperatorUse::Refused,
    }
}

/// A filter as a tree of column-against-constant tests.
// `Expr::Wildcard` is deprecated but still a variant: it is named, and refused.
#[allow(deprecated)]
fn lower_predicate(
    expr: &Expr,
    columns: &[Dimension],
    schema: &DFSchema,
    depth: usize,
) -> Result<Predicate, TallyError> {
    if depth > MAX_EXPR_DEPTH {
        return Err(too_deep());
    }
    let next = depth + 1;
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => match operator_use(*op) {
            OperatorUse::And => Ok(Predicate::And {
                all: vec![
                    lower_predicate(left, columns, schema, next)?,
                    lower_predicate(right, columns, schema, next)?,
                ],
            }),
            OperatorUse::Or => Ok(Predicate::Or {
                any: vec![
                    lower_predicate(left, columns, schema, next)?,
                    lower_predicate(right, columns, schema, next)?,
                ],
            }),
            OperatorUse::Compare(cmp) => {
                let (on, value, cmp) = if constant(left).is_some() {
                    (right, left, cmp.flipped())
                } else {
                    (left, right, cmp)
                };
                let (on, data_type) = operand(on, columns, schema, next)?;
                let value = constant_for(value, &data_type, &on)?;
                Ok(Predicate::Compare { on, cmp, value })
            }
            OperatorUse::Fold(_) | OperatorUse::Refused => {
                Err(refuse_expr(expr, "in a filter over patient rows"))
            }
        },
        Expr::Not(inner) => Ok(Predicate::Not {
            not: Box::new(lower_predicate(inner, columns, schema, next)?),
        }),
        Expr::IsNull(inner) | Expr::IsNotNull(inner) => {
            let (on, _) = operand(inner, columns, schema, next)?;
            Ok(Predicate::IsNull {
                on,
                negated: matches!(expr, Expr::IsNotNull(_)),
            })
        }
        Expr::InList(list) => {
            let (on, data_type) = operand(&list.expr, columns, schema, next)?;
            let values = list
                .list
                .iter()
                .map(|item| constant_for(item, &data_type, &on))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Predicate::InList {
                on,
                values,
                negated: list.negated,
            })
        }
        Expr::Between(between) => {
            let (on, data_type) = operand(&between.expr, columns, schema, next)?;
            Ok(Predicate::Between {
                low: constant_for(&between.low, &data_type, &on)?,
                high: constant_for(&between.high, &data_type, &on)?,
                on,
                negated: between.negated,
            })
        }
        Expr::Like(like) => {
            let (on, data_type) = operand(&like.expr, columns, schema, next)?;
            let prefix = match constant(&like.pattern) {
                Some(
                    ScalarValue::Utf8(Some(pattern))
                    | ScalarValue::LargeUtf8(Some(pattern))
                    | ScalarValue::Utf8View(Some(pattern)),
                ) if !like.case_insensitive && like.escape_char.is_none() => pattern
                    .strip_suffix('%')
                    .filter(|p| !p.contains(['%', '_', '\\']))
                    .map(str::to_string),
                _ => None,
            };
            match (prefix, data_type.is_string()) {
                (Some(prefix), true) => Ok(Predicate::Prefix {
                    on,
                    prefix,
                    negated: like.negated,
                }),
                _ => Err(shape(
                    "only prefix matches are allowed in LIKE (e.g. diagnosis_icd10 LIKE 'I21%', no other wildcards, case-sensitive)",
                )),
            }
        }
        Expr::Alias(alias) => lower_predicate(&alias.expr, columns, schema, next),
        Expr::Column(_)
        | Expr::ScalarVariable(..)
        | Expr::Literal(..)
        | Expr::SimilarTo(_)
        | Expr::IsTrue(_)
        | Expr::IsFalse(_)
        | Expr::IsUnknown(_)
        | Expr::IsNotTrue(_)
        | Expr::IsNotFalse(_)
        | Expr::IsNotUnknown(_)
        | Expr::Negative(_)
        | Expr::Case(_)
        | Expr::Cast(_)
        | Expr::TryCast(_)
        | Expr::ScalarFunction(_)
        | Expr::AggregateFunction(_)
        | Expr::WindowFunction(_)
        | Expr::Exists(_)
        | Expr::InSubquery(_)
        | Expr::SetComparison(_)
        | Expr::ScalarSubquery(_)
        | Expr::Wildcard { .. }
        | Expr::GroupingSet(_)
        | Expr::Placeholder(_)
        | Expr::OuterReferenceColumn(..)
        | Expr::Unnest(_)
        | Expr::HigherOrderFunction(_)
        | Expr::Lambda(_)
        | Expr::LambdaVariable(_) => Err(refuse_expr(expr, "in a filter over patient rows")),
    }
}

fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => strip_alias(&alias.expr),
        other => other,
    }
}

/// One aggregate of the analyst's as a model aggregate.
fn lower_aggregate_function(
    expr: &Expr,
    columns: &[Dimension],
    schema: &DFSchema,
) -> Result<ModelAggregate, TallyError> {
    let Expr::AggregateFunction(AggregateFunction { func, params }) = strip_alias(expr) else {
        return Err(refuse_expr(strip_alias(expr), "as an aggregate"));
    };
    let name = func.name().to_lowercase();
    let display = name.to_uppercase();
    if params.distinct {
        return Err(TallyError::new(
            ErrorCode::ExpressionShape,
            format!("{display}(DISTINCT ...) is not allowed"),
        ));
    }
    if params.filter.is_some() {
        return Err(TallyError::new(
            ErrorCode::ExpressionShape,
            format!("{display}(...) FILTER (WHERE ...) is not allowed; filter in WHERE"),
        ));
    }
    if !params.order_by.is_empty() || params.null_treatment.is_some() {
        return Err(TallyError::new(
            ErrorCode::ExpressionShape,
            format!("{display} with ORDER BY or IGNORE NULLS is not allowed"),
        ));
    }
    let bare = |args: &[Expr]| -> Result<ColumnRef, TallyError> {
        let [arg] = args else {
            return Err(TallyError::new(
                ErrorCode::ExpressionShape,
                format!("{display} takes one column"),
            ));
        };
        let dimension = match arg {
            Expr::Column(_) => lower_dimension(arg, columns, schema, 0)?,
            other => {
                return Err(TallyError::new(
                    ErrorCode::ExpressionShape,
                    format!(
                        "{display} must take a bare column, not {}",
                        expr_kind(other)
                    ),
                ));
            }
        };
        match dimension.generaliser {
            None => Ok(dimension.column),
            Some(g) => Err(TallyError::new(
                ErrorCode::ExpressionShape,
                format!(
                    "{display} must take a bare column, not {}(...)",
                    g.function_name()
                ),
            )),
        }
    };
    match name.as_str() {
        "count" => match params.args.as_slice() {
            [] => Ok(ModelAggregate::CountRows),
            [arg] if constant(arg).is_some_and(|v| !v.is_null()) => Ok(ModelAggregate::CountRows),
            args => Ok(ModelAggregate::Count {
                column: bare(args)?,
            }),
        },
        "sum" => Ok(ModelAggregate::Sum {
            column: bare(&params.args)?,
        }),
        "avg" | "mean" => Ok(ModelAggregate::Mean {
            column: bare(&params.args)?,
        }),
        "var" | "var_samp" | "var_sample" => Ok(ModelAggregate::Variance {
            column: bare(&params.args)?,
            population: false,
        }),
        "var_pop" | "var_population" => Ok(ModelAggregate::Variance {
            column: bare(&params.args)?,
            population: true,
        }),
        "stddev" | "stddev_samp" => Ok(ModelAggregate::StdDev {
            column: bare(&params.args)?,
            population: false,
        }),
        "stddev_pop" => Ok(ModelAggregate::StdDev {
            column: bare(&params.args)?,
            population: true,
        }),
        "min" | "max" => Err(TallyError::new(
            ErrorCode::AggregateNotAllowed,
            format!(
                "{display} over patient rows releases one patient's value; use it over released results instead (e.g. MAX of per-group averages)"
            ),
        )),
        _ => Err(TallyError::new(
            ErrorCode::AggregateNotAllowed,
            format!(
                "aggregate {display} is not allowed over patient rows (COUNT, SUM, AVG, VAR, STDDEV are)"
            ),
        )),
    }
}

/// The release an aggregate over the trusts' tables asks for.
fn lower_aggregate(
    aggregate: &Aggregate,
    governance: &Governance,
) -> Result<ReleaseQuery, TallyError> {
    let relation = lower_relation(&aggregate.input, governance)?;
    let schema = aggregate.input.schema();
    let group_by = aggregate
        .group_expr
        .iter()
        .map(|expr| match strip_alias(expr) {
            Expr::GroupingSet(_) => Err(refuse_expr(strip_alias(expr), "in GROUP BY")),
            inner => lower_dimension(inner, &relation.columns, schema, 0),
        })
        .collect::<Result<Vec<_>, _>>()?;
    let aggregates = aggregate
        .aggr_expr
        .iter()
        .map(|expr| lower_aggregate_function(expr, &relation.columns, schema))
        .collect::<Result<Vec<_>, _>>()?;
    if aggregates.is_empty() {
        return Err(TallyError::new(
            ErrorCode::NotAggregate,
            "GROUP BY without an aggregate (or DISTINCT) would list values; add COUNT(*)",
        ));
    }
    let filter = match relation.filters.len() {
        0 => None,
        1 => relation.filters.into_iter().next(),
        _ => Some(Predicate::And {
            all: relation.filters,
        }),
    };
    let release = ReleaseQuery {
        version: MODEL_VERSION,
        fact: relation.fact,
        joins: relation.joins,
        filter,
        group_by,
        aggregates,
    };
    release.validate(governance)?;
    Ok(release)
}
