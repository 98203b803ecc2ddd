//! Sends a query's fragments to the trusts allowed to answer, all at once, with the
//! analyst's identity, and collects the partial results (one partition per trust) and the
//! trusts' small-number thresholds.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tally_common::admission::RequestIdentity;
use tally_common::policy::Obligations;
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::{Catalogue, TrustStatus};
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
    /// Bytes of Flight messages received for the partial result.
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
    identity: RequestIdentity,
    obligations: Obligations,
    next_fragment: AtomicUsize,
    suppressed: AtomicUsize,
    runs: Mutex<Vec<FragmentRun>>,
}

impl QueryFanout {
    /// A fan-out for query `query_id`, on behalf of `identity`, under the gateway policy's
    /// `obligations` (allowed trusts, threshold, rounding).
    pub fn new(
        query_id: String,
        catalogue: Arc<Catalogue>,
        identity: RequestIdentity,
        obligations: Obligations,
    ) -> Self {
        QueryFanout {
            query_id,
            catalogue,
            identity,
            obligations,
            next_fragment: AtomicUsize::new(0),
            suppressed: AtomicUsize::new(0),
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

    /// The gateway policy's obligations for this query.
    pub fn obligations(&self) -> &Obligations {
        &self.obligations
    }

    /// Counts are rounded to a multiple of this.
    pub fn round_to(&self) -> u64 {
        self.obligations.round_to
    }

    /// Adds groups dropped by disclosure control.
    pub fn record_suppressed(&self, groups: usize) {
        self.suppressed.fetch_add(groups, Ordering::Relaxed);
    }

    /// Groups dropped by disclosure control so far.
    pub fn suppressed(&self) -> usize {
        self.suppressed.load(Ordering::Relaxed)
    }

    /// Runs `fragment` at every allowed trust that holds its tables; all must answer.
    /// Returns one partition per trust and the strictest small-number threshold among the
    /// gateway and the trusts that answered.
    pub async fn run(
        &self,
        fragment: &Fragment,
    ) -> Result<(Vec<Vec<RecordBatch>>, u64), TallyError> {
        let snapshot = self.catalogue.refresh_if_incomplete().await;
        let allowed = |code: &String| {
            self.obligations
                .trusts
                .as_ref()
                .is_none_or(|trusts| trusts.contains(code))
        };
        if let Some(err) = snapshot
            .trusts
            .iter()
            .filter(|(code, _)| allowed(code))
            .find_map(|(_, status)| match status {
                TrustStatus::Unavailable(err) => Some(err),
                TrustStatus::Available(_) => None,
            })
        {
            return Err(err.clone());
        }
        let targets: Vec<_> = self
            .catalogue
            .trusts()
            .iter()
            .filter(|trust| allowed(&trust.code))
            .filter(|trust| {
                fragment.tables.iter().all(|name| {
                    snapshot
                        .tables
                        .get(name)
                        .is_some_and(|t| t.trusts.contains(&trust.code))
                })
            })
            .collect();
        if targets.is_empty() {
            // An answer from no trust at all would look like a real (empty) answer.
            return Err(TallyError::new(
                ErrorCode::TableNotAllowed,
                format!(
                    "no trust this query may reach holds {}",
                    fragment
                        .tables
                        .iter()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        tracing::debug!(query_id = %self.query_id, sql = %fragment.sql, trusts = targets.len(), "per-trust query");
        let answers = futures::future::join_all(
            targets
                .iter()
                .map(|trust| trust.run(&fragment.sql, &self.query_id, &self.identity)),
        )
        .await;
        let mut partitions = Vec::with_capacity(answers.len());
        let mut threshold = self.obligations.min_distinct_patients;
        for answer in answers {
            let answer = answer?;
            let batches = conform(&answer, &fragment.schema)?;
            threshold = threshold.max(answer.min_patients);
            self.record(fragment, &answer, &batches);
            partitions.push(batches);
        }
        Ok((partitions, threshold))
    }

    fn record(&self, fragment: &Fragment, answer: &TrustAnswer, batches: &[RecordBatch]) {
        let run = FragmentRun {
            fragment: fragment.id,
            sql: fragment.sql.clone(),
            trust: answer.trust.clone(),
            rows: batches.iter().map(RecordBatch::num_rows).sum(),
            bytes: answer.wire_bytes,
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
