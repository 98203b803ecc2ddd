//! Sends a query's fragments to the trusts, all at once, and hands the partial results to
//! DataFusion as one partition per trust.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::Catalogue;
use crate::split::Fragment;
use crate::trusts::TrustAnswer;

/// What one trust returned for one fragment: the record kept for metadata and audit.
#[derive(Debug, Clone)]
pub struct FragmentRun {
    /// The fragment's position in the query.
    pub fragment: usize,
    /// The per-trust SQL.
    pub sql: String,
    /// The trust's code.
    pub trust: String,
    /// Rows (groups) returned.
    pub rows: usize,
    /// In-memory size of the partial result, in bytes.
    pub bytes: usize,
    /// Wall time of the trust's answer.
    pub elapsed: Duration,
}

/// The fan-out of one analyst query.
#[derive(Debug)]
pub struct QueryFanout {
    /// The query id sent to every trust.
    pub query_id: String,
    catalogue: Arc<Catalogue>,
    next_fragment: AtomicUsize,
    runs: Mutex<Vec<FragmentRun>>,
}

impl QueryFanout {
    /// A fan-out for query `query_id` over the trusts of `catalogue`.
    pub fn new(query_id: String, catalogue: Arc<Catalogue>) -> Self {
        QueryFanout {
            query_id,
            catalogue,
            next_fragment: AtomicUsize::new(0),
            runs: Mutex::new(Vec::new()),
        }
    }

    /// A fresh fragment number.
    pub fn next_fragment_id(&self) -> usize {
        self.next_fragment.fetch_add(1, Ordering::Relaxed)
    }

    /// Every per-trust answer so far.
    pub fn runs(&self) -> Vec<FragmentRun> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Runs `fragment` at every trust that holds its tables; all must answer.
    async fn run(&self, fragment: &Fragment) -> Result<Vec<Vec<RecordBatch>>, TallyError> {
        let snapshot = self.catalogue.refresh_if_incomplete().await;
        if let Some(err) = snapshot.unavailable().first() {
            return Err((*err).clone());
        }
        let targets: Vec<_> = self
            .catalogue
            .trusts()
            .iter()
            .filter(|trust| {
                fragment.tables.iter().all(|name| {
                    snapshot
                        .tables
                        .get(name)
                        .is_some_and(|t| t.trusts.contains(&trust.code))
                })
            })
            .collect();
        tracing::debug!(query_id = %self.query_id, sql = %fragment.sql, trusts = targets.len(), "per-trust query");
        let answers = futures::future::join_all(
            targets
                .iter()
                .map(|trust| trust.run(&fragment.sql, &self.query_id)),
        )
        .await;
        let mut partitions = Vec::with_capacity(answers.len());
        for answer in answers {
            let answer = answer?;
            let batches = conform(&answer, &fragment.schema)?;
            self.record(fragment, &answer, &batches);
            partitions.push(batches);
        }
        Ok(partitions)
    }

    fn record(&self, fragment: &Fragment, answer: &TrustAnswer, batches: &[RecordBatch]) {
        let run = FragmentRun {
            fragment: fragment.id,
            sql: fragment.sql.clone(),
            trust: answer.trust.clone(),
            rows: batches.iter().map(RecordBatch::num_rows).sum(),
            bytes: batches.iter().map(RecordBatch::get_array_memory_size).sum(),
            elapsed: answer.elapsed,
        };
        self.runs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(run);
    }
}

/// Checks a trust's batches against the fragment's schema (columns found by name, of the
/// expected types) and relabels them with it.
fn conform(answer: &TrustAnswer, schema: &SchemaRef) -> Result<Vec<RecordBatch>, TallyError> {
    let mismatch = || {
        TallyError::new(
            ErrorCode::TrustProtocol,
            format!(
                "trust {} answered with columns Tally did not ask for",
                answer.trust
            ),
        )
    };
    answer
        .batches
        .iter()
        .map(|batch| {
            if batch.num_columns() != schema.fields().len() {
                return Err(mismatch());
            }
            let columns = schema
                .fields()
                .iter()
                .map(|field| {
                    let column = batch.column_by_name(field.name()).ok_or_else(mismatch)?;
                    if column.data_type() != field.data_type() {
                        tracing::warn!(trust = %answer.trust, column = %field.name(), got = %column.data_type(), want = %field.data_type(), "partial result type differs");
                        return Err(mismatch());
                    }
                    Ok(column.clone())
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(schema.clone(), columns).map_err(|_| mismatch())
        })
        .collect()
}

/// The trusts' partial results for one fragment, as a table the gateway's plan scans.
#[derive(Debug)]
pub struct PartialScan {
    fragment: Arc<Fragment>,
    fanout: Arc<QueryFanout>,
}

impl PartialScan {
    /// The partial-result table of `fragment` within `fanout`'s query.
    pub fn new(fragment: Arc<Fragment>, fanout: Arc<QueryFanout>) -> Self {
        PartialScan { fragment, fanout }
    }
}

#[async_trait]
impl TableProvider for PartialScan {
    fn schema(&self) -> SchemaRef {
        self.fragment.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Temporary
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let mut partitions = self
            .fanout
            .run(&self.fragment)
            .await
            .map_err(TallyError::into_datafusion)?;
        if partitions.is_empty() {
            partitions.push(Vec::new());
        }
        let exec =
            MemorySourceConfig::try_new_exec(&partitions, self.schema(), projection.cloned())?;
        Ok(exec)
    }
}
