//! Plan facts: what a query does, derived from its DataFusion logical plan (and, for a few
//! features the plan no longer shows, its syntax tree). Gateway and nodes both derive the
//! policy input with this code, each from its own plan of the SQL it received.

use std::collections::BTreeSet;
use std::ops::ControlFlow;

use datafusion::common::Column;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::sql::sqlparser::ast::{self as sql, Visit, Visitor};
use serde::Serialize;

use crate::checks::strip_alias;
use crate::udaf::STATE_PREFIX;

/// Alias of the hidden distinct-patient count that travels with every partial result.
pub const PATIENTS_COLUMN: &str = "__tally_patients";

/// Features visible only in the syntax tree.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SyntaxFacts {
    /// UNION, INTERSECT or EXCEPT.
    pub set_operation: bool,
    /// A VALUES list.
    pub values: bool,
    /// A table function in FROM.
    pub table_function: bool,
    /// A reference to information_schema.
    pub information_schema: bool,
}

/// Collects [`SyntaxFacts`] from a parsed statement.
pub fn syntax_facts(statement: &sql::Statement) -> SyntaxFacts {
    struct Collector(SyntaxFacts);
    impl Visitor for Collector {
        type Break = ();
        fn pre_visit_query(&mut self, query: &sql::Query) -> ControlFlow<()> {
            mark_set_expr(&query.body, &mut self.0);
            ControlFlow::Continue(())
        }
        fn pre_visit_relation(&mut self, relation: &sql::ObjectName) -> ControlFlow<()> {
            let first = relation
                .0
                .first()
                .and_then(|p| p.as_ident())
                .map(|i| i.value.to_lowercase());
            if relation.0.len() > 1 && first.as_deref() == Some("information_schema") {
                self.0.information_schema = true;
            }
            ControlFlow::Continue(())
        }
        fn pre_visit_table_factor(&mut self, factor: &sql::TableFactor) -> ControlFlow<()> {
            match factor {
                sql::TableFactor::Table { args: Some(_), .. }
                | sql::TableFactor::TableFunction { .. }
                | sql::TableFactor::Function { .. } => self.0.table_function = true,
                _ => {}
            }
            ControlFlow::Continue(())
        }
    }
    fn mark_set_expr(body: &sql::SetExpr, facts: &mut SyntaxFacts) {
        match body {
            sql::SetExpr::SetOperation { left, right, .. } => {
                facts.set_operation = true;
                mark_set_expr(left, facts);
                mark_set_expr(right, facts);
            }
            sql::SetExpr::Values(_) => facts.values = true,
            _ => {}
        }
    }
    let mut collector = Collector(SyntaxFacts::default());
    let _ = statement.visit(&mut collector);
    collector.0
}

/// Where a column is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Usage {
    /// Returned to the analyst (directly or as a group key).
    Output,
    /// A grouping key.
    GroupBy,
    /// In a WHERE (or HAVING below the first aggregate) predicate.
    Filter,
    /// An argument of an aggregate function.
    AggregateArg,
    /// In a join condition.
    Join,
}

/// One use of a base-table column.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct ColumnFact {
    /// Base table.
    pub table: String,
    /// Column name.
    pub column: String,
    /// Class from the governance catalogue (`unclassified` when it has none).
    pub class: String,
    /// Where it is used.
    pub usage: Usage,
    /// Scalar functions applied to it on the way, outermost first.
    pub functions: Vec<String>,
}

/// One aggregate call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AggregateFact {
    /// Canonical function name (`avg` for `__tally_state_avg`).
    pub function: String,
    /// `star`, `column`, `arithmetic`, `case`, `cast`, `literal` or `expression`.
    pub argument_shape: &'static str,
    /// `DISTINCT` was given.
    pub distinct: bool,
    /// A `FILTER (WHERE ...)` clause was given.
    pub filter: bool,
}

/// Query shape features.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Features {
    /// A window function anywhere.
    pub window: bool,
    /// UNION / INTERSECT / EXCEPT.
    pub set_operation: bool,
    /// A subquery (in FROM or in an expression).
    pub subquery: bool,
    /// A VALUES list.
    pub values: bool,
    /// A table function.
    pub table_function: bool,
    /// LIMIT or OFFSET beneath an aggregate.
    pub limit_below_aggregate: bool,
    /// ORDER BY beneath an aggregate.
    pub order_below_aggregate: bool,
    /// ROLLUP, CUBE or GROUPING SETS.
    pub grouping_sets: bool,
    /// information_schema.
    pub information_schema: bool,
    /// A join.
    pub join: bool,
    /// No aggregate at all.
    pub no_aggregate: bool,
}

/// The `action` part of the policy input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QueryFacts {
    /// Always `query`.
    pub operation: &'static str,
    /// The SQL as received.
    pub sql: String,
    /// Base tables read.
    pub tables: Vec<String>,
    /// Every use of a base column.
    pub columns: Vec<ColumnFact>,
    /// Every aggregate call.
    pub aggregates: Vec<AggregateFact>,
    /// Every scalar function called.
    pub functions: Vec<String>,
    /// Query shape.
    pub features: Features,
    /// Trusts the query would reach.
    pub trusts: Vec<String>,
}

/// Looks up a column's class in the governance catalogue (`data.governance.catalogue`).
pub fn column_class(catalogue: &serde_json::Value, table: &str, column: &str) -> String {
    catalogue
        .pointer(&format!("/governance/catalogue/{table}/columns/{column}"))
        .and_then(|c| c.as_str())
        .unwrap_or("unclassified")
        .to_string()
}

/// Derives the facts of `plan` (planned from `sql`). `hidden` names the aggregates that
/// are the gateway's hidden patient count (empty for an analyst's own SQL); they are not
/// the analyst's and are left out of the facts.
pub fn query_facts(
    sql: &str,
    plan: &LogicalPlan,
    syntax: &SyntaxFacts,
    catalogue: &serde_json::Value,
    trusts: Vec<String>,
    hidden: &[String],
) -> QueryFacts {
    let mut collector = FactCollector {
        catalogue,
        hidden,
        columns: BTreeSet::new(),
        aggregates: Vec::new(),
        functions: BTreeSet::new(),
        tables: BTreeSet::new(),
        features: Features {
            set_operation: syntax.set_operation,
            values: syntax.values,
            table_function: syntax.table_function,
            information_schema: syntax.information_schema,
            ..Features::default()
        },
        saw_aggregate: false,
    };
    collector.visit(plan, false);
    for (index, _) in plan.schema().iter().enumerate() {
        for base in lineage(plan, index, Vec::new()) {
            collector.add(base, Usage::Output);
        }
    }
    collector.features.no_aggregate = !collector.saw_aggregate && !collector.tables.is_empty();
    QueryFacts {
        operation: "query",
        sql: sql.to_string(),
        tables: collector.tables.into_iter().collect(),
        columns: collector.columns.into_iter().collect(),
        aggregates: collector.aggregates,
        functions: collector.functions.into_iter().collect(),
        features: collector.features,
        trusts,
    }
}

/// A base column reached through the plan, with the functions applied on the way.
#[derive(Debug, Clone)]
struct BaseColumn {
    table: String,
    column: String,
    functions: Vec<String>,
}

struct FactCollector<'a> {
    catalogue: &'a serde_json::Value,
    hidden: &'a [String],
    columns: BTreeSet<ColumnFact>,
    aggregates: Vec<AggregateFact>,
    functions: BTreeSet<String>,
    tables: BTreeSet<String>,
    features: Features,
    saw_aggregate: bool,
}

impl FactCollector<'_> {
    fn add(&mut self, base: BaseColumn, usage: Usage) {
        let class = column_class(self.catalogue, &base.table, &base.column);
        self.columns.insert(ColumnFact {
            table: base.table,
            column: base.column,
            class,
            usage,
            functions: base.functions,
        });
    }

    fn expr_columns(&mut self, expr: &Expr, inputs: &[&LogicalPlan], usage: Usage) {
        for (column, functions) in columns_with_functions(expr) {
            for base in resolve(inputs, &column, functions) {
                self.add(base, usage);
            }
        }
        let _ = expr.apply(|e| {
            if let Expr::ScalarFunction(f) = e {
                self.functions.insert(f.func.name().to_string());
            }
            Ok(TreeNodeRecursion::Continue)
        });
    }

    /// Visits `plan`; `above` says whether an aggregate sits above this node.
    fn visit(&mut self, plan: &LogicalPlan, below_aggregate: bool) {
        let inputs = plan.inputs();
        let mut below = below_aggregate;
        match plan {
            LogicalPlan::TableScan(scan) => {
                self.tables.insert(scan.table_name.table().to_string());
            }
            LogicalPlan::Window(_) => self.features.window = true,
            LogicalPlan::Union(_) => self.features.set_operation = true,
            LogicalPlan::Values(_) => self.features.values = true,
            LogicalPlan::Limit(_) if below_aggregate => self.features.limit_below_aggregate = true,
            LogicalPlan::Sort(_) if below_aggregate => self.features.order_below_aggregate = true,
            LogicalPlan::Join(join) => {
                self.features.join = true;
                for (left, right) in &join.on {
                    self.expr_columns(left, &inputs, Usage::Join);
                    self.expr_columns(right, &inputs, Usage::Join);
                }
                if let Some(filter) = &join.filter {
                    self.expr_columns(filter, &inputs, Usage::Join);
                }
            }
            LogicalPlan::Filter(filter) => {
                self.expr_columns(&filter.predicate, &inputs, Usage::Filter)
            }
            LogicalPlan::SubqueryAlias(alias)
                if !matches!(alias.input.as_ref(), LogicalPlan::TableScan(_)) =>
            {
                self.features.subquery = true;
            }
            LogicalPlan::Subquery(_) => self.features.subquery = true,
            LogicalPlan::Aggregate(aggregate) => {
                self.saw_aggregate = true;
                below = true;
                for group in &aggregate.group_expr {
                    if matches!(group, Expr::GroupingSet(_)) {
                        self.features.grouping_sets = true;
                    }
                    self.expr_columns(group, &inputs, Usage::GroupBy);
                }
                for expr in &aggregate.aggr_expr {
                    self.aggregate(expr, &inputs);
                }
            }
            _ => {}
        }
        let _ = plan.apply_subqueries(|subquery| {
            self.features.subquery = true;
            self.visit(subquery, below);
            Ok(TreeNodeRecursion::Continue)
        });
        if let LogicalPlan::Projection(projection) = plan {
            for expr in &projection.expr {
                let _ = expr.apply(|e| {
                    if let Expr::ScalarFunction(f) = e {
                        self.functions.insert(f.func.name().to_string());
                    }
                    Ok(TreeNodeRecursion::Continue)
                });
            }
        }
        for input in inputs {
            self.visit(input, below);
        }
    }

    fn aggregate(&mut self, expr: &Expr, inputs: &[&LogicalPlan]) {
        let Expr::AggregateFunction(function) = strip_alias(expr) else {
            return;
        };
        if is_hidden_patient_count(expr, self.hidden) {
            return;
        }
        let name = function.func.name();
        let name = name.strip_prefix(STATE_PREFIX).unwrap_or(name).to_string();
        let argument_shape = match function.params.args.as_slice() {
            [] => "star",
            [Expr::Literal(..)] if name == "count" => "star",
            [arg] => match strip_alias(arg) {
                Expr::Column(_) => "column",
                Expr::Literal(..) => "literal",
                arg if is_arithmetic(arg) => "arithmetic",
                Expr::Case(_) => "case",
                Expr::Cast(_) | Expr::TryCast(_) => "cast",
                _ => "expression",
            },
            _ => "expression",
        };
        self.aggregates.push(AggregateFact {
            function: name,
            argument_shape,
            distinct: function.params.distinct,
            filter: function.params.filter.is_some(),
        });
        for arg in &function.params.args {
            self.expr_columns(arg, inputs, Usage::AggregateArg);
        }
        if let Some(filter) = &function.params.filter {
            self.expr_columns(filter, inputs, Usage::Filter);
        }
    }
}

/// Whether `expr` is arithmetic on a row's numbers: `+`, `-` and `*` over columns and numeric
/// literals (with the casts type coercion adds), and at least one operator. Division and
/// modulo are excluded (a division by zero is an error that depends on one row's value), as
/// are comparisons, CASE and functions, which could single out rows.
fn is_arithmetic(expr: &Expr) -> bool {
    use datafusion::logical_expr::{BinaryExpr, Operator};
    /// The operand under a numeric cast or a minus sign.
    fn unwrapped(expr: &Expr) -> Option<&Expr> {
        match expr {
            Expr::Cast(cast) if cast.field.data_type().is_numeric() => Some(&cast.expr),
            Expr::TryCast(cast) if cast.field.data_type().is_numeric() => Some(&cast.expr),
            Expr::Negative(inner) => Some(inner),
            _ => None,
        }
    }
    fn operand(expr: &Expr) -> bool {
        match strip_alias(expr) {
            Expr::Column(_) => true,
            Expr::Literal(value, _) => value.data_type().is_numeric(),
            other => unwrapped(other).map_or_else(|| is_arithmetic(other), operand),
        }
    }
    match strip_alias(expr) {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            matches!(op, Operator::Plus | Operator::Minus | Operator::Multiply)
                && operand(left)
                && operand(right)
        }
        other => unwrapped(other).is_some_and(is_arithmetic),
    }
}

/// Output names of the aggregates that a plan returns as `__tally_patients`: the hidden
/// distinct-patient count the gateway adds to every per-trust query.
pub fn hidden_patient_counts(plan: &LogicalPlan) -> Vec<String> {
    let LogicalPlan::Projection(projection) = plan else {
        return Vec::new();
    };
    projection
        .expr
        .iter()
        .filter_map(|expr| match expr {
            Expr::Alias(alias) if alias.name == PATIENTS_COLUMN => match alias.expr.as_ref() {
                Expr::Column(column) => Some(column.name.clone()),
                _ => None,
            },
            _ => None,
        })
        .collect()
}

/// Whether `expr` is `__tally_patients_upto(<column>)` returned as the hidden patient count
/// (`hidden` lists the output names from [`hidden_patient_counts`]).
pub fn is_hidden_patient_count(expr: &Expr, hidden: &[String]) -> bool {
    let Expr::AggregateFunction(function) = strip_alias(expr) else {
        return false;
    };
    let returned_as_hidden = matches!(expr, Expr::Alias(alias) if alias.name == PATIENTS_COLUMN)
        || hidden.contains(&expr.schema_name().to_string());
    returned_as_hidden
        && function.func.name() == crate::patients::PATIENTS_UPTO
        && !function.params.distinct
        && function.params.filter.is_none()
        && matches!(function.params.args.as_slice(), [Expr::Column(_)])
}

/// Every column in `expr` with the scalar functions wrapping it, outermost first.
fn columns_with_functions(expr: &Expr) -> Vec<(Column, Vec<String>)> {
    fn walk(expr: &Expr, stack: &mut Vec<String>, out: &mut Vec<(Column, Vec<String>)>) {
        match expr {
            Expr::Column(column) => out.push((column.clone(), stack.clone())),
            Expr::ScalarFunction(function) => {
                stack.push(function.func.name().to_string());
                for arg in &function.args {
                    walk(arg, stack, out);
                }
                stack.pop();
            }
            Expr::Case(_) => {
                stack.push("case".to_string());
                let _ = expr.apply_children(|child| {
                    walk(child, stack, out);
                    Ok(TreeNodeRecursion::Continue)
                });
                stack.pop();
            }
            // Subqueries are visited as plans of their own.
            Expr::ScalarSubquery(_) | Expr::Exists(_) | Expr::InSubquery(_) => {}
            _ => {
                let _ = expr.apply_children(|child| {
                    walk(child, stack, out);
                    Ok(TreeNodeRecursion::Continue)
                });
            }
        }
    }
    let mut out = Vec::new();
    walk(expr, &mut Vec::new(), &mut out);
    out
}

/// Resolves `column` against whichever of `inputs` provides it.
fn resolve(inputs: &[&LogicalPlan], column: &Column, functions: Vec<String>) -> Vec<BaseColumn> {
    for input in inputs {
        if let Ok(index) = input.schema().index_of_column(column) {
            return lineage(input, index, functions);
        }
    }
    Vec::new()
}

/// The base columns behind output field `index` of `plan`.
fn lineage(plan: &LogicalPlan, index: usize, functions: Vec<String>) -> Vec<BaseColumn> {
    let field_column = || {
        let (qualifier, field) = plan.schema().qualified_field(index);
        Column::new(qualifier.cloned(), field.name())
    };
    match plan {
        LogicalPlan::TableScan(scan) => vec![BaseColumn {
            table: scan.table_name.table().to_string(),
            column: plan.schema().field(index).name().clone(),
            functions,
        }],
        LogicalPlan::Projection(projection) => {
            let Some(expr) = projection.expr.get(index) else {
                return Vec::new();
            };
            columns_with_functions(expr)
                .into_iter()
                .flat_map(|(column, inner)| {
                    let mut all = functions.clone();
                    all.extend(inner);
                    resolve(&[projection.input.as_ref()], &column, all)
                })
                .collect()
        }
        LogicalPlan::SubqueryAlias(alias) => lineage(&alias.input, index, functions),
        LogicalPlan::Aggregate(aggregate) => match aggregate.group_expr.get(index) {
            Some(group) => columns_with_functions(group)
                .into_iter()
                .flat_map(|(column, inner)| {
                    let mut all = functions.clone();
                    all.extend(inner);
                    resolve(&[aggregate.input.as_ref()], &column, all)
                })
                .collect(),
            None => Vec::new(),
        },
        LogicalPlan::Window(window) if index < window.input.schema().fields().len() => {
            lineage(&window.input, index, functions)
        }
        LogicalPlan::Union(union) => union
            .inputs
            .iter()
            .flat_map(|input| lineage(input, index, functions.clone()))
            .collect(),
        LogicalPlan::Join(_) => resolve(&plan.inputs(), &field_column(), functions),
        LogicalPlan::Filter(_)
        | LogicalPlan::Sort(_)
        | LogicalPlan::Limit(_)
        | LogicalPlan::Distinct(_)
        | LogicalPlan::Repartition(_)
        | LogicalPlan::Subquery(_) => plan
            .inputs()
            .first()
            .map(|input| lineage(input, index, functions))
            .unwrap_or_default(),
        _ => Vec::new(),
    }
}

/// The privacy unit (person id column) of `table` in the governance catalogue.
fn privacy_unit<'a>(catalogue: &'a serde_json::Value, table: &str) -> Option<&'a str> {
    catalogue
        .pointer(&format!("/governance/catalogue/{table}/privacy_unit"))
        .and_then(|v| v.as_str())
}

/// Whether `plan` reads a table whose rows are about people (it has a privacy unit).
pub fn reads_people(plan: &LogicalPlan, catalogue: &serde_json::Value) -> bool {
    let mut found = false;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && privacy_unit(catalogue, scan.table_name.table()).is_some()
        {
            found = true;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    found
}

/// A column of `plan`'s output that is, unchanged, the privacy unit of a person-level table:
/// what disclosure control counts distinct values of.
pub fn privacy_unit_column(plan: &LogicalPlan, catalogue: &serde_json::Value) -> Option<Column> {
    (0..plan.schema().fields().len()).find_map(|index| {
        let [base] = lineage(plan, index, Vec::new()).try_into().ok()?;
        let base: BaseColumn = base;
        let is_unit = base.functions.is_empty()
            && privacy_unit(catalogue, &base.table) == Some(base.column.as_str());
        is_unit.then(|| {
            let (qualifier, field) = plan.schema().qualified_field(index);
            Column::new(qualifier.cloned(), field.name())
        })
    })
}
