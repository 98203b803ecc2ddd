//! Releasing: the execution-plan leaf through which every number derived from patient rows
//! enters the gateway's plan.
//!
//! [`ReleaseExec::execute`] sends its release to the trusts, merges their noisy partials
//! and post-processes them before anything above it sees a row: counts below zero become
//! zero, governance may round counts and drop groups whose merged noisy count is small
//! (`settings.disclosure`), and sums, means, variances and standard deviations are derived
//! from the released partials only. Post-processing of noisy values costs no privacy.
//!
//! Every output column carries its accuracy in its Arrow field metadata, where any Flight
//! SQL client can read it: [`NOISE_SD`] (the standard deviation of the noise the trusts
//! added together) and [`CI95`] (the half-width of the 95% interval, rounding included) for
//! counts and sums; for means, variances and standard deviations, [`DERIVED`] names the
//! noisy sum and count they were computed from, with their scales. It is a leaf, visible in
//! EXPLAIN with its metrics; nothing above it can reach the trusts' partials.

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
use std::collections::HashMap;

use tally_common::governance::{DisclosureSettings, Governance, Noise};
use tally_common::model::{Aggregate, Partial, ReleaseQuery};
use tally_common::noise::{Rho, combined_sd, interval95};
use tally_common::privacy::{ContributionBounds, NOISE_SD, ReleaseNoise};
use tally_common::{ErrorCode, TallyError};

/// Field metadata key: the half-width of a value's 95% interval (noise and rounding).
pub const CI95: &str = "tally.ci95";

/// Field metadata key: how a mean, variance or standard deviation was derived, with the
/// noise scales of the sum and count it came from.
pub const DERIVED: &str = "tally.derived";

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

/// What a release needs to run: the model, its rendering, the query's dispatch and the
/// post-processing governance asks for.
struct Release {
    id: usize,
    query: ReleaseQuery,
    sql: String,
    dispatch: Arc<QueryDispatch>,
    disclosure: DisclosureSettings,
    /// Per aggregate, the bounds its noisy mean, variance or deviation is clamped into
    /// (none without noise: exact values are shown as they are).
    clamps: Vec<Option<[f64; 2]>>,
    /// The noise of each merged partial (empty when unknown).
    sds: Vec<f64>,
    /// The noise each trust should add to each partial: a trust that adds more is refused,
    /// since the accuracy shown would then be wrong.
    trust_sds: Vec<f64>,
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
    /// then aggregates), within `dispatch`'s query, under `governance`. Once the dispatch
    /// is decided, the columns carry their accuracy in their metadata.
    pub fn new(
        query: ReleaseQuery,
        sql: String,
        types: Vec<DataType>,
        dispatch: Arc<QueryDispatch>,
        governance: &Governance,
    ) -> Self {
        let (trust_sds, trusts) = partial_sds(&query, governance, &dispatch).unzip();
        let sds: Option<Vec<f64>> = trust_sds.as_ref().zip(trusts).map(|(sds, trusts)| {
            sds.iter()
                .map(|sd| combined_sd(std::iter::repeat_n(*sd, trusts)))
                .collect()
        });
        let mut accuracy = accuracy(&query, governance, sds.as_deref()).into_iter();
        let clamps = query
            .aggregates
            .iter()
            .map(|aggregate| match governance.settings.privacy.noise {
                Noise::Off => None,
                Noise::DiscreteGaussian => aggregate
                    .column()
                    .and_then(|c| governance.column(&c.table, &c.column))
                    .and_then(|spec| spec.bounds),
            })
            .collect();
        let fields: Vec<Field> = types
            .into_iter()
            .enumerate()
            .map(|(i, data_type)| {
                Field::new(output_name(i), data_type, true)
                    .with_metadata(accuracy.next().unwrap_or_default())
            })
            .collect();
        ReleaseTable {
            release: Arc::new(Release {
                id: dispatch.next_release_id(),
                query,
                sql,
                dispatch,
                disclosure: governance.settings.disclosure.clone(),
                clamps,
                sds: sds.unwrap_or_default(),
                trust_sds: trust_sds.unwrap_or_default(),
            }),
            schema: Arc::new(Schema::new(fields)),
        }
    }
}

/// The standard deviation of each partial's noise at one trust, and how many trusts add
/// theirs, from the model, the catalogue and the policy's ρ alone; none before the query
/// is decided, and none under a policy without noise.
fn partial_sds(
    query: &ReleaseQuery,
    governance: &Governance,
    dispatch: &QueryDispatch,
) -> Option<(Vec<f64>, usize)> {
    let trusts = dispatch.trusts_reached(query).ok()?;
    match governance.settings.privacy.noise {
        // The exact mode of tests: the gateway cannot know what the trusts add, and claims
        // nothing.
        Noise::Off => None,
        Noise::DiscreteGaussian => {
            let rho =
                Rho::from_decimal(dispatch.obligations().ok()?.budget.rho_per_release).ok()?;
            let partials = dispatch.partial_schema(query).ok()?;
            let groups: Vec<DataType> = partials.fields()[..query.group_by.len()]
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            let bounds = ContributionBounds::of(governance, query);
            let noise = ReleaseNoise::of(governance, query, bounds, rho, &groups).ok()?;
            Some((
                (0..noise.partials.len()).map(|i| noise.sd(i)).collect(),
                trusts,
            ))
        }
    }
}

/// The accuracy metadata of each output column (none for group keys, and none before the
/// query is decided), from the merged partials' noise `sds`.
fn accuracy(
    query: &ReleaseQuery,
    governance: &Governance,
    sds: Option<&[f64]>,
) -> Vec<HashMap<String, String>> {
    let mut out = vec![HashMap::new(); query.group_by.len()];
    let Some(sds) = sds else {
        out.resize(
            query.group_by.len() + query.aggregates.len(),
            HashMap::new(),
        );
        return out;
    };
    let partials = query.partials();
    let sd_of = |wanted: &Partial| {
        partials
            .iter()
            .position(|p| p == wanted)
            .map_or(f64::NAN, |i| sds[i])
    };
    let round_to = governance.settings.disclosure.round_to;
    let exact = |sd: f64, rounding: u64| {
        HashMap::from([
            (NOISE_SD.to_string(), sd.to_string()),
            (CI95.to_string(), interval95(sd, rounding).to_string()),
        ])
    };
    for aggregate in &query.aggregates {
        out.push(match aggregate {
            Aggregate::CountRows => exact(sd_of(&Partial::Rows), round_to),
            Aggregate::Count { column } => exact(sd_of(&Partial::Count(column.clone())), round_to),
            Aggregate::Sum { column } => exact(sd_of(&Partial::Sum(column.clone())), 1),
            Aggregate::Mean { column }
            | Aggregate::Variance { column, .. }
            | Aggregate::StdDev { column, .. } => HashMap::from([(
                DERIVED.to_string(),
                format!(
                    "from a noisy sum of {} (sd {}) and count (sd {})",
                    column.column,
                    sd_of(&Partial::Sum(column.clone())),
                    sd_of(&Partial::Count(column.clone()))
                ),
            )]),
        });
    }
    out
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
        .run(
            release.id,
            &release.query,
            &release.sql,
            &partials,
            &release.trust_sds,
        )
        .await?;
    trusts.add(partitions.len());
    rows_in.add(partitions.iter().flatten().map(RecordBatch::num_rows).sum());
    let groups = release.query.group_by.len();
    let merged = merge_partials(&partials, groups, partitions)?;
    disclose(&release.query, &merged, output, release)
}

/// A noisy count as released: at least zero, rounded to the nearest multiple of `to`
/// (halves up).
fn round_count(n: i64, to: u64) -> i64 {
    let n = n.max(0);
    let to = i64::try_from(to).unwrap_or(1);
    if to <= 1 {
        return n;
    }
    n.saturating_add(to / 2) / to * to
}

/// The analyst's columns from the merged partials: group keys as they are, counts at
/// least zero and rounded, every other statistic derived from the released counts and
/// sums (means, variances and deviations clamped into what the column's bounds allow),
/// and groups whose released count is below `suppress_below` dropped.
fn disclose(
    query: &ReleaseQuery,
    merged: &RecordBatch,
    output: &SchemaRef,
    release: &Release,
) -> Result<RecordBatch, TallyError> {
    let disclosure = &release.disclosure;
    let round_to = disclosure.round_to;
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
    // A ratio over a count that noise could have made is noise: it is not shown.
    let meaningful = |column: &tally_common::model::ColumnRef, n: i64| {
        let sd = partials
            .iter()
            .position(|p| *p == Partial::Count(column.clone()))
            .and_then(|i| release.sds.get(i))
            .copied()
            .unwrap_or(0.0);
        n > 0 && n as f64 >= 2.0 * sd
    };
    for (aggregate, clamp) in query.aggregates.iter().zip(&release.clamps) {
        // Post-processing: a noisy mean lies within the bounds, a variance within what
        // bounded values can have.
        let within = |value: f64, low: f64, high: f64| match clamp {
            Some(_) => value.clamp(low, high),
            None => value,
        };
        let [low, high] = clamp.unwrap_or([f64::MIN, f64::MAX]);
        let spread = (high - low) / 2.0;
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
                        .map(|(n, s)| {
                            meaningful(column, *n).then(|| within(s / *n as f64, low, high))
                        })
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
                            let shown = meaningful(column, n[row]);
                            let n = n[row] as f64;
                            let divisor = if *population { n } else { n - 1.0 };
                            (shown && divisor > 0.0).then(|| {
                                let variance = ((q[row] - s[row] * s[row] / n) / divisor).max(0.0);
                                let variance = within(variance, 0.0, spread * spread);
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
    let batch = RecordBatch::try_new(output.clone(), columns).map_err(internal)?;
    // Suppression is judged on the group's size: its row count, or its first count.
    let size = partials
        .iter()
        .find(|p| matches!(p, Partial::Rows))
        .or_else(|| partials.iter().find(|p| p.is_count()));
    match size {
        Some(size) if disclosure.suppress_below > 0 && groups > 0 => {
            let threshold = i64::try_from(disclosure.suppress_below).unwrap_or(i64::MAX);
            let keep = arrow::array::BooleanArray::from(
                count(size)?
                    .iter()
                    .map(|n| Some(*n >= threshold))
                    .collect::<Vec<_>>(),
            );
            arrow::compute::filter_record_batch(&batch, &keep).map_err(internal)
        }
        Some(_) | None => Ok(batch),
    }
}

fn internal(err: arrow::error::ArrowError) -> TallyError {
    tracing::error!(error = %err, "releasing failed");
    TallyError::new(ErrorCode::Internal, "the release could not be assembled")
}
