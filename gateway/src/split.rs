//! Splits an analyst's logical plan at the lowest aggregate over federated tables.
//!
//! Each such aggregate becomes a *fragment*: SQL text that every trust runs on its own rows,
//! returning one row per group with partial aggregates (`COUNT`, `SUM`, `MIN`, `MAX` as they
//! are; `AVG`, `VAR`, `STDDEV` as `__tally_state_*` structs) and the hidden count of
//! distinct patients. In the gateway's plan the aggregate is replaced by a scan of the
//! merged, disclosure-controlled result ([`MergedAggregate`]) and a projection that
//! restores the original column names, so every operator above (HAVING, ORDER BY, LIMIT,
//! CTEs, expressions over aggregates) runs unchanged at the gateway, on released groups
//! only. Anything that would still read a federated table at the gateway is refused.

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::datatypes::{Field, FieldRef, Schema, SchemaRef};
use datafusion::catalog::default_table_source::source_as_provider;
use datafusion::common::tree_node::{Transformed, TreeNodeRecursion};
use datafusion::common::{Column, DFSchemaRef, Result as DfResult};
use datafusion::datasource::provider_as_source;
use datafusion::functions_aggregate::expr_fn::{max, min, sum};
use datafusion::logical_expr::expr::AggregateFunction;
use datafusion::logical_expr::type_coercion::functions::fields_with_udf;
use datafusion::logical_expr::{
    Aggregate, AggregateUDF, Expr, ExprSchemable, LogicalPlan, LogicalPlanBuilder, TableScan, col,
};
use datafusion::sql::unparser::plan_to_sql;
use tally_common::checks::{Side, reject_grouping_sets, splittable_aggregates, strip_alias};
use tally_common::facts::{PATIENTS_COLUMN, privacy_unit_column, reads_people};
use tally_common::patients::patients_upto_udaf;
use tally_common::udaf::{SplitKind, merge_udaf, state_udaf};
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::FederatedTableProvider;
use crate::fanout::QueryFanout;
use crate::merge::{MergeColumn, MergeSpec, MergedAggregate, output_name};

/// One per-trust query.
#[derive(Debug)]
pub struct Fragment {
    /// Position of the fragment within its query.
    pub id: usize,
    /// The SQL every trust runs.
    pub sql: String,
    /// Lower-case names of the federated tables it reads.
    pub tables: BTreeSet<String>,
    /// The partial result's schema (all columns nullable).
    pub schema: SchemaRef,
}

/// Rewrites `plan` so that federated tables are only read inside fragments. `catalogue` is
/// the governance catalogue (privacy units of person-level tables).
pub fn split(
    plan: LogicalPlan,
    fanout: &Arc<QueryFanout>,
    catalogue: &serde_json::Value,
) -> Result<LogicalPlan, TallyError> {
    let mut refusal: Option<TallyError> = None;
    let rewritten = plan
        .transform_up_with_subqueries(|node| {
            let LogicalPlan::Aggregate(aggregate) = &node else {
                return node.recompute_schema().map(Transformed::yes);
            };
            let reads = reads_tables(&aggregate.input);
            if refusal.is_some() || !reads.federated || reads.merged {
                return node.recompute_schema().map(Transformed::yes);
            }
            match split_aggregate(aggregate, fanout, catalogue) {
                Ok(plan) => Ok(Transformed::yes(plan)),
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
    ensure_no_federated_scan(&rewritten.data)?;
    Ok(rewritten.data)
}

/// What kinds of table a subtree reads: trusts' tables (by name) and merged results.
#[derive(Default)]
struct Reads {
    federated: bool,
    merged: bool,
    tables: BTreeSet<String>,
}

fn reads_tables(plan: &LogicalPlan) -> Reads {
    let mut reads = Reads::default();
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            match scan_kind(scan) {
                ScanKind::Federated(name) => {
                    reads.federated = true;
                    reads.tables.insert(name);
                }
                ScanKind::Merged => reads.merged = true,
            }
        }
        Ok(TreeNodeRecursion::Continue)
    });
    reads
}

enum ScanKind {
    Federated(String),
    Merged,
}

fn scan_kind(scan: &TableScan) -> ScanKind {
    let provider = source_as_provider(&scan.source).ok();
    match provider
        .as_ref()
        .and_then(|p| p.downcast_ref::<FederatedTableProvider>())
    {
        Some(table) => ScanKind::Federated(table.table.name.to_lowercase()),
        None if provider.as_ref().is_some_and(|p| p.is::<MergedAggregate>()) => ScanKind::Merged,
        // Only federated tables and merged results exist at the gateway; treat anything else as
        // federated so that it is refused rather than read.
        None => ScanKind::Federated(scan.table_name.table().to_lowercase()),
    }
}

/// Refuses operators below an aggregate whose per-trust result would differ from the result
/// over all trusts' rows together.
fn ensure_pushable(input: &LogicalPlan) -> Result<(), TallyError> {
    let mut refusal = None;
    let _ = input.apply_with_subqueries(|node| {
        let problem = match node {
            LogicalPlan::Limit(_) => Some((
                ErrorCode::UnsupportedShape,
                "LIMIT or OFFSET below an aggregate is not supported: each trust would apply it to its own rows",
            )),
            LogicalPlan::Sort(sort) if sort.fetch.is_some() => Some((
                ErrorCode::UnsupportedShape,
                "ORDER BY with LIMIT below an aggregate is not supported",
            )),
            LogicalPlan::Window(_) => Some((
                ErrorCode::Window,
                "window functions are not accepted: they work on individual rows",
            )),
            LogicalPlan::Distinct(_) => Some((
                ErrorCode::UnsupportedShape,
                "DISTINCT or UNION below an aggregate is not supported: it would need rows from every trust in one place",
            )),
            LogicalPlan::Aggregate(_) => Some((
                ErrorCode::UnsupportedShape,
                "an aggregate over another aggregate's rows that mixes trusts' raw rows is not supported",
            )),
            LogicalPlan::Values(_)
            | LogicalPlan::Unnest(_)
            | LogicalPlan::RecursiveQuery(_)
            | LogicalPlan::Extension(_) => Some((
                ErrorCode::UnsupportedShape,
                "VALUES, UNNEST and recursive queries are not supported below an aggregate",
            )),
            _ => None,
        };
        match problem {
            Some((code, message)) => {
                refusal = Some(TallyError::new(code, message));
                Ok(TreeNodeRecursion::Stop)
            }
            None => Ok(TreeNodeRecursion::Continue),
        }
    });
    refusal.map_or(Ok(()), Err)
}

/// How one aggregate of the original query is computed in two steps.
struct SplitAggregate {
    /// The expression each trust evaluates.
    partial: Expr,
    /// The expression the gateway evaluates over the partial column.
    merge: Box<dyn Fn(Expr) -> Expr + Send + Sync>,
    /// COUNT over no trust rows must still be 0, not NULL.
    is_count: bool,
}

fn split_one(
    function: &AggregateFunction,
    kind: SplitKind,
    input_schema: &DFSchemaRef,
) -> Result<SplitAggregate, TallyError> {
    let name = function.func.name().to_string();
    let params = &function.params;
    match kind {
        SplitKind::SelfMerging { merge_function } => Ok(SplitAggregate {
            partial: Expr::AggregateFunction(function.clone()),
            merge: Box::new(move |partial| match merge_function {
                "min" => min(partial),
                "max" => max(partial),
                _ => sum(partial),
            }),
            is_count: name == "count",
        }),
        SplitKind::ViaState => {
            let input_fields =
                argument_fields(&function.params.args, &function.func, input_schema)?;
            let inner = function.func.clone();
            let partial = Expr::AggregateFunction(AggregateFunction::new_udf(
                Arc::new(state_udaf(inner.clone())),
                params.args.clone(),
                false,
                None,
                vec![],
                None,
            ));
            Ok(SplitAggregate {
                partial,
                merge: Box::new(move |state| {
                    Expr::AggregateFunction(AggregateFunction::new_udf(
                        Arc::new(merge_udaf(inner.clone(), input_fields.clone())),
                        vec![state],
                        false,
                        None,
                        vec![],
                        None,
                    ))
                }),
                is_count: false,
            })
        }
    }
}

/// The argument fields the trusts' accumulator will see, after the function's own coercion.
fn argument_fields(
    args: &[Expr],
    func: &AggregateUDF,
    schema: &DFSchemaRef,
) -> Result<Vec<FieldRef>, TallyError> {
    let fields: Vec<FieldRef> = args
        .iter()
        .map(|arg| arg.to_field(schema.as_ref()).map(|(_, field)| field))
        .collect::<DfResult<_>>()
        .map_err(TallyError::from_planning)?;
    fields_with_udf(&fields, func).map_err(TallyError::from_planning)
}

fn split_aggregate(
    aggregate: &Aggregate,
    fanout: &Arc<QueryFanout>,
    catalogue: &serde_json::Value,
) -> Result<LogicalPlan, TallyError> {
    reject_grouping_sets(&aggregate.group_expr)?;
    ensure_pushable(&aggregate.input)?;
    let input_schema = aggregate.input.schema();
    let splits = splittable_aggregates(&aggregate.aggr_expr, &[], Side::Gateway)?
        .into_iter()
        .map(|(function, kind)| split_one(function, kind, input_schema))
        .collect::<Result<Vec<_>, _>>()?;
    let patients = privacy_unit_column(&aggregate.input, catalogue);
    if patients.is_none() && reads_people(&aggregate.input, catalogue) {
        return Err(TallyError::new(
            ErrorCode::Disclosure,
            "disclosure control needs each aggregate to see the patient identifier of the rows it counts; aggregate the tables directly rather than a subquery that drops it",
        ));
    }
    let group_names: Vec<String> = (0..aggregate.group_expr.len())
        .map(|i| format!("g{i}"))
        .collect();
    let partial_names: Vec<String> = (0..splits.len()).map(|i| format!("p{i}")).collect();
    let fragment = build_fragment(
        aggregate,
        &splits,
        &group_names,
        &partial_names,
        patients,
        fanout.next_fragment_id(),
    )?;
    let counts_patients = fragment.schema.field_with_name(PATIENTS_COLUMN).is_ok();
    let types = aggregate
        .schema
        .fields()
        .iter()
        .map(|f| f.data_type().clone());
    let columns = group_names
        .into_iter()
        .map(|partial| MergeColumn::Group { partial })
        .chain(
            splits
                .into_iter()
                .zip(partial_names)
                .map(|(split, partial)| MergeColumn::Aggregate {
                    partial,
                    merge: split.merge,
                    is_count: split.is_count,
                }),
        )
        .zip(types)
        .collect();
    let scan_name = format!("__tally_merged_{}", fragment.id);
    let merged = MergedAggregate::new(
        Arc::new(fragment),
        MergeSpec {
            columns,
            counts_patients,
        },
        fanout.clone(),
    );
    let restore = aggregate
        .schema
        .iter()
        .enumerate()
        .map(|(index, (qualifier, field))| {
            col(output_name(index)).alias_qualified(qualifier.cloned(), field.name())
        });
    LogicalPlanBuilder::scan(scan_name, provider_as_source(Arc::new(merged)), None)
        .and_then(|b| b.project(restore))
        .and_then(|b| b.build())
        .map_err(TallyError::from_planning)
}

fn build_fragment(
    aggregate: &Aggregate,
    splits: &[SplitAggregate],
    group_names: &[String],
    partial_names: &[String],
    patients: Option<Column>,
    id: usize,
) -> Result<Fragment, TallyError> {
    let groups = aggregate
        .group_expr
        .iter()
        .zip(group_names)
        .map(|(e, name)| strip_alias(e).clone().alias(name));
    let patient_count = patients.map(|column| {
        Expr::AggregateFunction(AggregateFunction::new_udf(
            Arc::new(patients_upto_udaf()),
            vec![Expr::Column(column)],
            false,
            None,
            vec![],
            None,
        ))
        .alias(PATIENTS_COLUMN)
    });
    let partials = splits
        .iter()
        .zip(partial_names)
        .map(|(s, name)| s.partial.clone().alias(name))
        .chain(patient_count);
    let plan = LogicalPlanBuilder::from(aggregate.input.as_ref().clone())
        .aggregate(groups, partials)
        .and_then(|b| b.build())
        .map_err(TallyError::from_planning)?;
    let sql = plan_to_sql(&plan)
        .map_err(|err| {
            tracing::warn!(error = %err, "per-trust SQL could not be written");
            TallyError::new(
                ErrorCode::UnsupportedShape,
                "this query's per-trust part cannot be expressed as SQL for the trusts",
            )
        })?
        .to_string();
    let fields: Vec<Field> = plan
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone().with_nullable(true))
        .collect();
    Ok(Fragment {
        id,
        sql,
        tables: reads_tables(&aggregate.input).tables,
        schema: Arc::new(Schema::new(fields)),
    })
}

/// The last line of defence at the gateway: no federated table may be read outside a
/// fragment.
fn ensure_no_federated_scan(plan: &LogicalPlan) -> Result<(), TallyError> {
    let mut found = None;
    let _ = plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node
            && let ScanKind::Federated(name) = scan_kind(scan)
        {
            found = Some(name);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    match found {
        None => Ok(()),
        Some(table) => Err(TallyError::new(
            ErrorCode::NotAggregate,
            format!(
                "this query needs row-level data from '{table}' at the gateway; read every table beneath an aggregate (COUNT, SUM, AVG, ...) so that only aggregates leave the trusts"
            ),
        )),
    }
}
