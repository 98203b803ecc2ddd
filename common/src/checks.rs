//! The floor the code enforces, whatever any policy says: read-only SELECTs only, and at a
//! trust, results that are aggregates of splittable functions, never rows.

use datafusion::common::tree_node::TreeNodeRecursion;
use std::sync::Arc;

use datafusion::execution::context::SessionState;
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::error::{ErrorCode, TallyError};
use crate::facts::{SyntaxFacts, hidden_patient_counts, is_hidden_patient_count, syntax_facts};
use crate::udaf::{STATE_PREFIX, SplitKind, split_kind};

/// Longest SQL text accepted by default, in bytes.
pub const MAX_SQL_BYTES: usize = 64 * 1024;

/// Deepest logical plan accepted by default (plan nodes from root to leaf, subqueries
/// included).
pub const MAX_PLAN_DEPTH: usize = 64;

/// Size limits on one query, kept in the session's config so every planning path sees them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueryLimits {
    /// Longest SQL text accepted, in bytes.
    pub max_sql_bytes: usize,
    /// Deepest logical plan accepted.
    pub max_plan_depth: usize,
}

impl Default for QueryLimits {
    fn default() -> Self {
        QueryLimits {
            max_sql_bytes: MAX_SQL_BYTES,
            max_plan_depth: MAX_PLAN_DEPTH,
        }
    }
}

impl QueryLimits {
    /// Makes these the limits of every query planned in `ctx`.
    pub fn install(self, ctx: &SessionContext) {
        ctx.state_ref()
            .write()
            .config_mut()
            .set_extension(Arc::new(self));
    }

    /// The limits installed in `state`, or the defaults.
    pub fn of(state: &SessionState) -> Self {
        state
            .config()
            .get_extension::<QueryLimits>()
            .map_or_else(QueryLimits::default, |limits| *limits)
    }
}

/// Nodes on the longest path from `plan` to a leaf, through subqueries too.
fn plan_depth(plan: &LogicalPlan) -> usize {
    let mut deepest = plan.inputs().into_iter().map(plan_depth).max().unwrap_or(0);
    let _ = plan.apply_subqueries(|subquery| {
        deepest = deepest.max(plan_depth(subquery));
        Ok(TreeNodeRecursion::Jump)
    });
    deepest + 1
}

/// A planned read-only query.
#[derive(Debug, Clone)]
pub struct PlannedQuery {
    /// The logical plan, before optimisation.
    pub plan: LogicalPlan,
    /// Features read off the syntax tree.
    pub syntax: SyntaxFacts,
}

/// Parses and plans `sql` as a read-only query: one SELECT (or WITH ... SELECT), nothing that
/// writes, creates, copies, reads files by path, explains or changes settings.
pub async fn plan_read_only(state: &SessionState, sql: &str) -> Result<PlannedQuery, TallyError> {
    let limits = QueryLimits::of(state);
    if sql.len() > limits.max_sql_bytes {
        return Err(TallyError::new(
            ErrorCode::TooLarge,
            format!(
                "the query is {} bytes long; the limit is {}",
                sql.len(),
                limits.max_sql_bytes
            ),
        ));
    }
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state
        .sql_to_statement(sql, &dialect)
        .map_err(TallyError::from_planning)?;
    let syntax = match &statement {
        DfStatement::Statement(inner) if matches!(inner.as_ref(), SqlStatement::Query(_)) => {
            syntax_facts(inner)
        }
        _ => {
            return Err(TallyError::new(
                ErrorCode::ReadOnly,
                "only read-only SELECT queries are accepted",
            ));
        }
    };
    if syntax.information_schema {
        return Err(TallyError::new(
            ErrorCode::Metadata,
            "information_schema is not available; the tables are listed by Flight SQL GetTables",
        ));
    }
    let plan = state
        .statement_to_plan(statement)
        .await
        .map_err(TallyError::from_planning)?;
    reject_non_queries(&plan)?;
    let depth = plan_depth(&plan);
    if depth > limits.max_plan_depth {
        return Err(TallyError::new(
            ErrorCode::TooLarge,
            format!(
                "the query plan is {depth} steps deep; the limit is {}",
                limits.max_plan_depth
            ),
        ));
    }
    Ok(PlannedQuery { plan, syntax })
}

/// Refuses plan nodes that are not part of a read-only query (defence in depth behind the
/// statement check: `SELECT ... INTO` is planned as a table creation, for instance).
fn reject_non_queries(plan: &LogicalPlan) -> Result<(), TallyError> {
    let mut refusal = None;
    plan.apply_with_subqueries(|node| {
        let bad = matches!(
            node,
            LogicalPlan::Ddl(_)
                | LogicalPlan::Dml(_)
                | LogicalPlan::Copy(_)
                | LogicalPlan::Statement(_)
                | LogicalPlan::Explain(_)
                | LogicalPlan::Analyze(_)
                | LogicalPlan::DescribeTable(_)
        );
        if bad {
            refusal = Some(TallyError::new(
                ErrorCode::ReadOnly,
                "only read-only SELECT queries are accepted",
            ));
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|_| TallyError::new(ErrorCode::Internal, "plan inspection failed"))?;
    refusal.map_or(Ok(()), Err)
}

/// Checks that everything `plan` returns is an aggregate: every table is read only beneath
/// an aggregate of splittable functions, with no window functions anywhere.
pub fn check_aggregate_only(plan: &LogicalPlan) -> Result<(), TallyError> {
    check_node(plan, false, &hidden_patient_counts(plan))
}

fn check_node(
    plan: &LogicalPlan,
    below_aggregate: bool,
    hidden: &[String],
) -> Result<(), TallyError> {
    let below = match plan {
        LogicalPlan::Window(_) => {
            return Err(TallyError::new(
                ErrorCode::Window,
                "window functions are not accepted: they work on individual rows",
            ));
        }
        LogicalPlan::TableScan(scan) if !below_aggregate => {
            return Err(TallyError::new(
                ErrorCode::NotAggregate,
                format!(
                    "the query returns rows of table '{}'; only aggregates (COUNT, SUM, AVG, ...) leave a trust",
                    scan.table_name.table()
                ),
            ));
        }
        LogicalPlan::Aggregate(aggregate) => {
            splittable_aggregates(&aggregate.aggr_expr, hidden, Side::Trust)?;
            reject_grouping_sets(&aggregate.group_expr)?;
            true
        }
        LogicalPlan::Extension(_) | LogicalPlan::RecursiveQuery(_) | LogicalPlan::Unnest(_) => {
            return Err(TallyError::new(
                ErrorCode::UnsupportedShape,
                "recursive queries and UNNEST are not supported",
            ));
        }
        _ => below_aggregate,
    };
    let mut result = Ok(());
    plan.apply_subqueries(|subquery| {
        result = check_node(subquery, below, &[]);
        Ok(if result.is_err() {
            TreeNodeRecursion::Stop
        } else {
            TreeNodeRecursion::Continue
        })
    })
    .map_err(|_| TallyError::new(ErrorCode::Internal, "plan inspection failed"))?;
    result?;
    plan.inputs()
        .into_iter()
        .try_for_each(|input| check_node(input, below, hidden))
}

/// Which aggregate calls may appear.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// An analyst's SQL at the gateway: the splittable aggregates only.
    Gateway,
    /// A per-trust query: also the state wrappers (`__tally_state_avg`, ...).
    Trust,
}

/// Checks that every aggregate of an Aggregate node can be combined across trusts without
/// moving row-level values, and returns each call with how it splits. `hidden` names the
/// gateway's hidden patient counts, which are skipped.
pub fn splittable_aggregates<'a>(
    aggr_expr: &'a [Expr],
    hidden: &[String],
    side: Side,
) -> Result<Vec<(&'a AggregateFunction, SplitKind)>, TallyError> {
    if aggr_expr.is_empty() {
        return Err(TallyError::new(
            ErrorCode::NotAggregate,
            "GROUP BY or DISTINCT without an aggregate function lists row values; add COUNT(*) or another aggregate",
        ));
    }
    aggr_expr
        .iter()
        .filter(|e| !is_hidden_patient_count(e, hidden))
        .map(|expr| {
            let Expr::AggregateFunction(function) = strip_alias(expr) else {
                return Err(TallyError::new(
                    ErrorCode::UnsupportedShape,
                    "unexpected expression in an aggregate",
                ));
            };
            let name = function.func.name();
            let kind = match (name.strip_prefix(STATE_PREFIX), side) {
                (Some(inner), Side::Trust) => split_kind(inner).filter(|k| *k == SplitKind::ViaState),
                (Some(_), Side::Gateway) => None,
                (None, _) => split_kind(name),
            };
            let Some(kind) = kind else {
                return Err(TallyError::new(
                    ErrorCode::AggregateNotSplittable,
                    format!(
                        "aggregate '{name}' is not accepted: only COUNT, SUM, AVG, MIN, MAX, VAR and STDDEV can be combined across trusts without moving row-level values"
                    ),
                ));
            };
            if function.params.distinct {
                return Err(TallyError::new(
                    ErrorCode::AggregateNotSplittable,
                    format!("{name}(DISTINCT ...) is not accepted: its partial state would list raw values"),
                ));
            }
            if function.params.filter.is_some() || !function.params.order_by.is_empty() {
                return Err(TallyError::new(
                    ErrorCode::UnsupportedShape,
                    format!("FILTER and ORDER BY clauses inside {name}(...) are not accepted"),
                ));
            }
            Ok((function, kind))
        })
        .collect()
}

/// Refuses ROLLUP, CUBE and GROUPING SETS, whose subtotals cannot be merged across trusts.
pub fn reject_grouping_sets(group_expr: &[Expr]) -> Result<(), TallyError> {
    if group_expr.iter().any(|e| matches!(e, Expr::GroupingSet(_))) {
        return Err(TallyError::new(
            ErrorCode::UnsupportedShape,
            "ROLLUP, CUBE and GROUPING SETS are not supported",
        ));
    }
    Ok(())
}

/// The expression beneath any aliases.
pub fn strip_alias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(alias) => strip_alias(&alias.expr),
        other => other,
    }
}
