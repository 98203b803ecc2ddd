//! Parsing: the analyst's SQL becomes a DataFusion logical plan, within size limits, and
//! only if it is one read-only query.

use datafusion::common::tree_node::TreeNodeRecursion;
use std::sync::Arc;

use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use tally_common::{ErrorCode, TallyError};

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

/// Parses and plans `sql` as a read-only query: one SELECT (or WITH ... SELECT), nothing that
/// writes, creates, copies, reads files by path, explains or changes settings.
pub async fn plan_read_only(state: &SessionState, sql: &str) -> Result<LogicalPlan, TallyError> {
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
    match &statement {
        DfStatement::Statement(inner) if matches!(inner.as_ref(), SqlStatement::Query(_)) => {}
        _ => {
            return Err(TallyError::new(
                ErrorCode::ReadOnly,
                "only read-only SELECT queries are accepted",
            ));
        }
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
    Ok(plan)
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
