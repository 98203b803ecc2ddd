//! Releasing: the execution-plan leaf through which every number derived from patient rows
//! enters the gateway's plan.
//!
//! [`ReleaseExec::execute`] sends its release to the trusts, merges their partials and
//! applies disclosure control before anything above it sees a row. Each trust has already
//! rounded its own counts; the merged counts are rounded again to the gateway policy's
//! multiple (a no-op for the same base; zero stays zero), and sums, means, variances and
//! standard deviations are derived from the released partials only, so no combination of
//! released statistics recovers an unrounded count. It is a leaf, visible in EXPLAIN with its
//! metrics; nothing above it can reach the trusts' partials.

use std::fmt;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Int64Array, new_null_array};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Float64Type, Int64Type, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::datasource::TableType;
use datafusion::execution::TaskContext;
use datafusion::logical_expr::Expr;
use datafusion::physical_expr::{EquivalenceProperties, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{
    Count, ExecutionPlanMetricsSet, MetricBuilder, MetricsSet,
};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    DisplayAs, DisplayFormatType, ExecutionPlan, Partitioning, PlanProperties,
    ReplaceChildrenOptions, SendableRecordBatchStream,
};
use tally_common::model::{Aggregate, Partial, ReleaseQuery};
use tally_common::{ErrorCode, TallyError};

use crate::merge::merge_partials;
use crate::send::QueryDispatch;

/// Name of output column `index` of a release (the gateway's plan renames them).
pub fn output_name(index: usize) -> String {
    format!("c{index}")
}

/// One release, as a table the rest of the gateway's plan reads.
pub struct ReleaseTable {
    release: Arc<Release>,
    schema: SchemaRef,
}

/// What a release needs to run: the model, its rendering, the types the analyst's
/// aggregate promised, and the query's dispatch.
struct Release {
    id: usize,
    query: ReleaseQuery,
    sql: String,
    dispatch: Arc<QueryDispatch>,
}

impl fmt::Debug for ReleaseTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseTable")
            .field("release", &self.release.sql)
            .finish()
    }
}

impl ReleaseTable {
    /// Release `query` (rendered as `sql`), whose output columns have `types` (group keys,
    /// then aggregates), within `dispatch`'s query.
    pub fn new(
        query: ReleaseQuery,
        sql: String,
        types: Vec<DataType>,
        dispatch: Arc<QueryDispatch>,
    ) -> Self {
        let fields: Vec<Field> = types
            .into_iter()
            .enumerate()
            .map(|(i, data_type)| Field::new(output_name(i), data_type, true))
            .collect();
        ReleaseTable {
            release: Arc::new(Release {
                id: dispatch.next_release_id(),
                query,
                sql,
                dispatch,
            }),
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

impl ReleaseTable {
    /// The release's number within its query.
    pub fn id(&self) -> usize {
        self.release.id
    }
}

#[async_trait]
impl TableProvider for ReleaseTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _session: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(Arc::new(ReleaseExec::new(
            self.release.clone(),
            self.schema.clone(),
            projection.cloned(),
        )?))
    }
}

/// The leaf that runs one release: send, merge, disclosure control.
pub struct ReleaseExec {
    release: Arc<Release>,
    full_schema: SchemaRef,
    projection: Option<Vec<usize>>,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl fmt::Debug for ReleaseExec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReleaseExec")
            .field("release", &self.release.sql)
            .finish()
    }
}

impl ReleaseExec {
    fn new(
        release: Arc<Release>,
        full_schema: SchemaRef,
        projection: Option<Vec<usize>>,
    ) -> DfResult<Self> {
        let schema = match &projection {
            Some(indices) => Arc::new(full_schema.project(indices)?),
            None => full_schema.clone(),
        };
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        Ok(ReleaseExec {
            release,
            full_schema,
            projection,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        })
    }
}

impl DisplayAs for ReleaseExec {
    fn fmt_as(&self, t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        match t {
            DisplayFormatType::Default | DisplayFormatType::Verbose => {
                write!(
                    f,
                    "ReleaseExec: release={} [{}]",
                    self.release.id, self.release.sql
                )
            }
            DisplayFormatType::TreeRender => write!(f, "release={}", self.release.id),
        }
    }
}

impl ExecutionPlan for ReleaseExec {
    fn name(&self) -> &str {
        "ReleaseExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> DfResult<TreeNodeRecursion>,
    ) -> DfResult<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn with_new_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Ok(self)
    }

    fn execute(
        &self,
        partition: usize,
        _context: Arc<TaskContext>,
    ) -> DfResult<SendableRecordBatchStream> {
        if partition != 0 {
            return Err(
                TallyError::new(ErrorCode::Internal, "a release has one partition")
                    .into_datafusion(),
            );
        }
        let release = self.release.clone();
        let full_schema = self.full_schema.clone();
        let projection = self.projection.clone();
        let rows_in = MetricBuilder::new(&self.metrics).counter("partial_rows", partition);
        let trusts = MetricBuilder::new(&self.metrics).counter("trusts", partition);
        let output = MetricBuilder::new(&self.metrics).output_rows(partition);
        let schema = self.properties.eq_properties.schema().clone();
        let stream = futures::stream::once(async move {
            let batch = run(&release, &full_schema, &rows_in, &trusts)
                .await
                .map_err(TallyError::into_datafusion)?;
            output.add(batch.num_rows());
            match projection {
                Some(indices) => Ok(batch.project(&indices)?),
                None => Ok(batch),
            }
        });
        Ok(Box::pin(RecordBatchStreamAdapter::new(schema, stream)))
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }
}

/// Sends, merges and releases.
async fn run(
    release: &Release,
    output: &SchemaRef,
    rows_in: &Count,
    trusts: &Count,
) -> Result<RecordBatch, TallyError> {
    let partials = release.dispatch.partial_schema(&release.query)?;
    let partitions = release
        .dispatch
        .run(release.id, &release.query, &release.sql, &partials)
        .await?;
    trusts.add(partitions.len());
    rows_in.add(partitions.iter().flatten().map(RecordBatch::num_rows).sum());
    let groups = release.query.group_by.len();
    let merged = merge_partials(&partials, groups, partitions)?;
    let round_to = release.dispatch.obligations()?.round_to;
    disclose(&release.query, &merged, output, round_to)
}

/// Rounds `n` to the nearest multiple of `to` (halves up; zero stays zero).
fn round_count(n: i64, to: u64) -> i64 {
    let to = i64::try_from(to).unwrap_or(1);
    if to <= 1 {
        return n;
    }
    n.saturating_add(to / 2) / to * to
}

/// The analyst's columns from the merged partials: group keys as they are, counts
/// rounded, and every other statistic derived from the rounded counts and the sums.
fn disclose(
    query: &ReleaseQuery,
    merged: &RecordBatch,
    output: &SchemaRef,
    round_to: u64,
) -> Result<RecordBatch, TallyError> {
    let partials = query.partials();
    let groups = query.group_by.len();
    // An aggregate without GROUP BY has exactly one row, even when no trust released one
    // (every trust's part was empty or too small: the two look the same).
    let rows = if groups == 0 { 1 } else { merged.num_rows() };
    let partial = |wanted: &Partial| -> Result<&ArrayRef, TallyError> {
        let index = partials
            .iter()
            .position(|p| p == wanted)
            .ok_or_else(|| TallyError::new(ErrorCode::Internal, "a partial is missing"))?;
        Ok(merged.column(groups + index))
    };
    let count = |wanted: &Partial| -> Result<Vec<i64>, TallyError> {
        let column = partial(wanted)?.as_primitive::<Int64Type>();
        Ok((0..rows)
            .map(|row| {
                let n = if row < column.len() && column.is_valid(row) {
                    column.value(row)
                } else {
                    0
                };
                round_count(n, round_to)
            })
            .collect())
    };
    let floats = |wanted: &Partial| -> Result<Vec<f64>, TallyError> {
        let column = cast(partial(wanted)?, &DataType::Float64)
            .map_err(|_| TallyError::new(ErrorCode::Internal, "a partial is not numeric"))?;
        let column = column.as_primitive::<Float64Type>();
        Ok((0..rows)
            .map(|row| {
                if row < column.len() && column.is_valid(row) {
                    column.value(row)
                } else {
                    0.0
                }
            })
            .collect())
    };
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(output.fields().len());
    for (i, field) in output.fields().iter().enumerate().take(groups) {
        let key = if merged.num_rows() == rows {
            merged.column(i).clone()
        } else {
            new_null_array(field.data_type(), rows)
        };
        columns.push(key);
    }
    for aggregate in &query.aggregates {
        let values: ArrayRef = match aggregate {
            Aggregate::CountRows => Arc::new(Int64Array::from(count(&Partial::Rows)?)),
            Aggregate::Count { column } => {
                Arc::new(Int64Array::from(count(&Partial::Count(column.clone()))?))
            }
            Aggregate::Sum { column } => {
                let n = count(&Partial::Count(column.clone()))?;
                let sums = partial(&Partial::Sum(column.clone()))?;
                let sums = if sums.len() == rows {
                    sums.clone()
                } else {
                    new_null_array(sums.data_type(), rows)
                };
                let keep = arrow::array::BooleanArray::from(
                    n.iter().map(|n| Some(*n > 0)).collect::<Vec<_>>(),
                );
                arrow::compute::nullif(&sums, &arrow::compute::not(&keep).map_err(internal)?)
                    .map_err(internal)?
            }
            Aggregate::Mean { column } => {
                let n = count(&Partial::Count(column.clone()))?;
                let s = floats(&Partial::Sum(column.clone()))?;
                Arc::new(Float64Array::from(
                    n.iter()
                        .zip(&s)
                        .map(|(n, s)| (*n > 0).then(|| s / *n as f64))
                        .collect::<Vec<_>>(),
                ))
            }
            Aggregate::Variance { column, population }
            | Aggregate::StdDev { column, population } => {
                let n = count(&Partial::Count(column.clone()))?;
                let s = floats(&Partial::Sum(column.clone()))?;
                let q = floats(&Partial::SumSquares(column.clone()))?;
                let root = matches!(aggregate, Aggregate::StdDev { .. });
                Arc::new(Float64Array::from(
                    (0..rows)
                        .map(|row| {
                            let n = n[row] as f64;
                            let divisor = if *population { n } else { n - 1.0 };
                            (divisor > 0.0).then(|| {
                                let variance = ((q[row] - s[row] * s[row] / n) / divisor).max(0.0);
                                if root { variance.sqrt() } else { variance }
                            })
                        })
                        .collect::<Vec<_>>(),
                ))
            }
        };
        columns.push(values);
    }
    let columns = columns
        .into_iter()
        .zip(output.fields())
        .map(|(column, field)| cast(&column, field.data_type()).map_err(internal))
        .collect::<Result<Vec<_>, _>>()?;
    RecordBatch::try_new(output.clone(), columns).map_err(internal)
}

fn internal(err: arrow::error::ArrowError) -> TallyError {
    tracing::error!(error = %err, "releasing failed");
    TallyError::new(ErrorCode::Internal, "the release could not be assembled")
}
