//! The merged, disclosure-controlled result of one fragment, as a table the rest of the
//! gateway's plan reads.
//!
//! Scanning it fans the fragment out to the trusts, merges their partial aggregates, and
//! applies statistical disclosure control before anything else of the query sees a row:
//! groups with fewer distinct patients than the strictest threshold (the gateway's or any
//! answering trust's) are dropped, and counts are rounded to the nearest multiple of
//! `round_to` (zero stays zero). Because this happens inside the scan, no optimiser rule
//! can move HAVING, ORDER BY, LIMIT or arithmetic in front of it.

use std::sync::Arc;

use arrow::array::Int64Array;
use arrow::array::{AsArray, RecordBatch};
use arrow::compute::filter_record_batch;
use arrow::compute::kernels::cmp::gt_eq;
use arrow::datatypes::{DataType, Field, Int64Type, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::{MemTable, TableType, provider_as_source};
use datafusion::execution::context::SessionState;
use datafusion::functions::expr_fn::coalesce;
use datafusion::logical_expr::{Expr, LogicalPlanBuilder, cast, col, lit};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::DataFrame;
use tally_common::facts::PATIENTS_COLUMN;
use tally_common::{ErrorCode, TallyError};

use crate::fanout::QueryFanout;
use crate::split::Fragment;

/// How one output column of the original aggregate is produced from the partials.
pub enum MergeColumn {
    /// A grouping key, passed through.
    Group {
        /// The partial column holding it.
        partial: String,
    },
    /// An aggregate, merged from its partial column.
    Aggregate {
        /// The partial column.
        partial: String,
        /// Builds the merge aggregate over the partial column.
        merge: Box<dyn Fn(Expr) -> Expr + Send + Sync>,
        /// COUNT: zero rather than NULL when no trust had rows, and rounded.
        is_count: bool,
    },
}

/// The merge of one fragment.
pub struct MergeSpec {
    /// Output columns, in the original aggregate's order, with their types.
    pub columns: Vec<(MergeColumn, DataType)>,
    /// Whether the partials carry the hidden distinct-patient count.
    pub counts_patients: bool,
}

/// The merged, disclosure-controlled result of one fragment.
pub struct MergedAggregate {
    fragment: Arc<Fragment>,
    spec: MergeSpec,
    fanout: Arc<QueryFanout>,
    schema: SchemaRef,
}

impl std::fmt::Debug for MergedAggregate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MergedAggregate")
            .field("fragment", &self.fragment.id)
            .field("sql", &self.fragment.sql)
            .finish()
    }
}

/// Name of output column `index` of a merged aggregate (the gateway's plan renames them).
pub fn output_name(index: usize) -> String {
    format!("c{index}")
}

impl MergedAggregate {
    /// The merged result of `fragment` within `fanout`'s query.
    pub fn new(fragment: Arc<Fragment>, spec: MergeSpec, fanout: Arc<QueryFanout>) -> Self {
        let fields: Vec<Field> = spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, (_, data_type))| Field::new(output_name(i), data_type.clone(), true))
            .collect();
        MergedAggregate {
            fragment,
            spec,
            fanout,
            schema: Arc::new(Schema::new(fields)),
        }
    }

    /// Merges the partials of every trust into one row per group (plus the patient count).
    async fn merge(
        &self,
        state: &SessionState,
        partitions: Vec<Vec<RecordBatch>>,
    ) -> DfResult<Vec<RecordBatch>> {
        let partials = MemTable::try_new(self.fragment.schema.clone(), partitions)?;
        let mut groups = Vec::new();
        let mut aggregates = Vec::new();
        for (column, _) in &self.spec.columns {
            match column {
                MergeColumn::Group { partial } => groups.push(col(partial.as_str())),
                MergeColumn::Aggregate { partial, merge, .. } => {
                    aggregates.push(merge(col(partial.as_str())).alias(partial));
                }
            }
        }
        if self.spec.counts_patients {
            aggregates.push(
                datafusion::functions_aggregate::expr_fn::sum(col(PATIENTS_COLUMN))
                    .alias(PATIENTS_COLUMN),
            );
        }
        let plan =
            LogicalPlanBuilder::scan("partials", provider_as_source(Arc::new(partials)), None)?
                .aggregate(groups, aggregates)?
                .build()?;
        DataFrame::new(state.clone(), plan).collect().await
    }

    /// Keeps the groups with at least `threshold` distinct patients.
    fn suppress(&self, merged: Vec<RecordBatch>, threshold: u64) -> DfResult<Vec<RecordBatch>> {
        if !self.spec.counts_patients || threshold == 0 {
            return Ok(merged);
        }
        let threshold = Int64Array::new_scalar(i64::try_from(threshold).unwrap_or(i64::MAX));
        merged
            .into_iter()
            .map(|batch| {
                let patients = batch
                    .column_by_name(PATIENTS_COLUMN)
                    .map(|c| c.as_primitive::<Int64Type>().clone())
                    .unwrap_or_else(|| Int64Array::from(vec![0; batch.num_rows()]));
                let keep = gt_eq(&patients, &threshold)?;
                Ok(filter_record_batch(&batch, &keep)?)
            })
            .collect()
    }

    /// Restores the original aggregate's output: counts as zero when absent and rounded,
    /// every column cast to its original type, the patient count dropped.
    async fn finish(
        &self,
        state: &SessionState,
        released: Vec<RecordBatch>,
        round_to: u64,
    ) -> DfResult<Vec<RecordBatch>> {
        let Some(first) = released.first() else {
            return Ok(Vec::new());
        };
        let table = MemTable::try_new(first.schema(), vec![released])?;
        let round = i64::try_from(round_to).unwrap_or(1).max(1);
        let exprs = self
            .spec
            .columns
            .iter()
            .enumerate()
            .map(|(i, (column, data_type))| {
                let expr = match column {
                    MergeColumn::Group { partial } => col(partial.as_str()),
                    MergeColumn::Aggregate {
                        partial, is_count, ..
                    } => {
                        let merged = col(partial.as_str());
                        if *is_count {
                            let counted = coalesce(vec![merged, lit(0i64)]);
                            if round > 1 {
                                (counted + lit(round / 2)) / lit(round) * lit(round)
                            } else {
                                counted
                            }
                        } else {
                            merged
                        }
                    }
                };
                cast(expr, data_type.clone()).alias(output_name(i))
            });
        let plan = LogicalPlanBuilder::scan("merged", provider_as_source(Arc::new(table)), None)?
            .project(exprs)?
            .build()?;
        DataFrame::new(state.clone(), plan).collect().await
    }
}

#[async_trait]
impl TableProvider for MergedAggregate {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        session: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let state = session
            .as_any()
            .downcast_ref::<SessionState>()
            .ok_or_else(|| {
                TallyError::new(ErrorCode::Internal, "unexpected session type").into_datafusion()
            })?;
        let (mut partitions, threshold) = self
            .fanout
            .run(&self.fragment)
            .await
            .map_err(TallyError::into_datafusion)?;
        if partitions.is_empty() {
            partitions.push(Vec::new());
        }
        let merged = self.merge(state, partitions).await?;
        let merged_groups: usize = merged.iter().map(RecordBatch::num_rows).sum();
        let released = self.suppress(merged, threshold)?;
        let released_groups: usize = released.iter().map(RecordBatch::num_rows).sum();
        self.fanout
            .record_suppressed(merged_groups - released_groups);
        let output = self.finish(state, released, self.fanout.round_to()).await?;
        MemorySourceConfig::try_new_exec(&[output], self.schema.clone(), projection.cloned())
            .map(|exec| exec as Arc<dyn ExecutionPlan>)
    }
}
