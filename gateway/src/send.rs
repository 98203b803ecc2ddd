//! Sending: a query's releases go to every trust the query may reach that holds their
//! tables, all at once, with the analyst's identity; each trust answers with its protected
//! partials (one partition per trust).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use tally_common::admission::RequestIdentity;
use tally_common::model::{ReleaseQuery, ReleaseRequest};
use tally_common::policy::Obligations;
use tally_common::privacy::NOISE_SD;
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::{Catalogue, Snapshot, TrustStatus};
use crate::trusts::TrustAnswer;

/// What one trust returned for one release: kept for metadata and audit.
#[derive(Debug, Clone)]
pub struct ReleaseRun {
    /// The release's position in the query.
    pub release: usize,
    /// The release as SQL (what the trust's audit log shows).
    pub sql: String,
    /// The trust's code.
    pub trust: String,
    /// Rows (groups) returned.
    pub rows: usize,
    /// Bytes of Flight messages received.
    pub bytes: usize,
    /// Wall time of the trust's answer.
    pub elapsed: Duration,
}

/// The dispatch of one analyst query's releases.
#[derive(Debug)]
pub struct QueryDispatch {
    /// The query id sent to every trust.
    pub query_id: String,
    catalogue: Arc<Catalogue>,
    identity: RequestIdentity,
    token: Option<String>,
    obligations: OnceLock<Obligations>,
    next_release: AtomicUsize,
    runs: Mutex<Vec<ReleaseRun>>,
}

impl QueryDispatch {
    /// A dispatch for query `query_id`, on behalf of `identity` (signed in with `token`, when
    /// it is a JWT the trusts verify themselves). Nothing is sent until the policy's
    /// obligations are set ([`QueryDispatch::bind`]).
    pub fn new(
        query_id: String,
        catalogue: Arc<Catalogue>,
        identity: RequestIdentity,
        token: Option<String>,
    ) -> Self {
        QueryDispatch {
            query_id,
            catalogue,
            identity,
            token,
            obligations: OnceLock::new(),
            next_release: AtomicUsize::new(0),
            runs: Mutex::new(Vec::new()),
        }
    }

    /// A fresh release number.
    pub fn next_release_id(&self) -> usize {
        self.next_release.fetch_add(1, Ordering::Relaxed)
    }

    /// Every trust's answer so far.
    pub fn runs(&self) -> Vec<ReleaseRun> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Binds the gateway policy's obligations (allowed trusts, opt-out, budget) once the
    /// policy has decided; a second decision cannot replace the first.
    pub fn bind(&self, obligations: Obligations) {
        let _ = self.obligations.set(obligations);
    }

    /// The gateway policy's obligations; a query the policy has not decided runs nowhere.
    pub fn obligations(&self) -> Result<&Obligations, TallyError> {
        self.obligations.get().ok_or_else(|| {
            TallyError::new(ErrorCode::Internal, "a release was about to run undecided")
        })
    }

    /// How many trusts `release` will reach under the bound obligations (for the accuracy
    /// the analyst is shown: each adds its own noise).
    pub fn trusts_reached(&self, release: &ReleaseQuery) -> Result<usize, TallyError> {
        let obligations = self.obligations()?;
        let snapshot = self.catalogue.snapshot();
        let tables = release_tables(release);
        Ok(self
            .catalogue
            .trusts()
            .iter()
            .filter(|trust| reaches(obligations, &snapshot, &tables, &trust.code))
            .count())
    }

    /// The schema of each trust's answer to `release`, from the tables' agreed schemas.
    pub fn partial_schema(&self, release: &ReleaseQuery) -> Result<SchemaRef, TallyError> {
        let snapshot = self.catalogue.snapshot();
        release.partial_schema(|column| {
            let table = snapshot.tables.get(&column.table)?;
            let field = table.schema.field_with_name(&column.column).ok()?;
            Some(field.data_type().clone())
        })
    }

    /// Runs `release` (number `id`, rendered as `sql`) at every allowed trust that holds its
    /// tables; all must answer. Each trust's batches are checked against `schema`, and the
    /// noise it states against `noise` (what each partial's noise should be at most).
    pub async fn run(
        &self,
        id: usize,
        release: &ReleaseQuery,
        sql: &str,
        schema: &SchemaRef,
        noise: &[f64],
    ) -> Result<Vec<Vec<RecordBatch>>, TallyError> {
        let obligations = self.obligations()?;
        let snapshot = self.catalogue.refresh_if_incomplete().await;
        let allowed = |code: &String| {
            obligations
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
        let tables = release_tables(release);
        let targets: Vec<_> = self
            .catalogue
            .trusts()
            .iter()
            .filter(|trust| reaches(obligations, &snapshot, &tables, &trust.code))
            .collect();
        if targets.is_empty() {
            // An answer from no trust at all would look like a real (empty) answer.
            return Err(TallyError::new(
                ErrorCode::TableNotAllowed,
                format!("no trust this query may reach holds {}", tables.join(", ")),
            ));
        }
        let request = ReleaseRequest {
            release: release.clone(),
        };
        tracing::debug!(query_id = %self.query_id, %sql, trusts = targets.len(), "release");
        let answers = futures::future::join_all(targets.iter().map(|trust| {
            trust.run(
                &request,
                &self.query_id,
                &self.identity,
                self.token.as_deref(),
            )
        }))
        .await;
        let mut partitions = Vec::with_capacity(answers.len());
        for answer in answers {
            let answer = answer?;
            let batches = conform(&answer, schema, noise)?;
            self.record(id, sql, &answer, &batches);
            partitions.push(batches);
        }
        Ok(partitions)
    }

    fn record(&self, id: usize, sql: &str, answer: &TrustAnswer, batches: &[RecordBatch]) {
        let run = ReleaseRun {
            release: id,
            sql: sql.to_string(),
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

/// The tables a release reads.
fn release_tables(release: &ReleaseQuery) -> Vec<String> {
    let mut tables = vec![release.fact.clone()];
    tables.extend(release.joins.iter().cloned());
    tables
}

/// Whether trust `code` answers a release over `tables`: the obligations allow it and it
/// holds every table.
fn reaches(
    obligations: &Obligations,
    snapshot: &Snapshot,
    tables: &[String],
    code: &String,
) -> bool {
    obligations
        .trusts
        .as_ref()
        .is_none_or(|trusts| trusts.contains(code))
        && tables.iter().all(|name| {
            snapshot
                .tables
                .get(name)
                .is_some_and(|t| t.trusts.contains(code))
        })
}

/// Checks a trust's batches against the expected partials' schema (columns by name, of the
/// expected types, with no more noise than `noise` says each partial has, or the accuracy
/// shown would be wrong) and relabels them with it.
fn conform(
    answer: &TrustAnswer,
    schema: &SchemaRef,
    noise: &[f64],
) -> Result<Vec<RecordBatch>, TallyError> {
    let groups = schema.fields().len().saturating_sub(noise.len());
    for batch in &answer.batches {
        for (index, expected) in noise.iter().enumerate() {
            let Some(field) = batch.schema().fields().get(groups + index).cloned() else {
                continue;
            };
            let stated: f64 = field
                .metadata()
                .get(NOISE_SD)
                .and_then(|sd| sd.parse().ok())
                .unwrap_or(0.0);
            if stated > expected * (1.0 + 1e-9) + 1e-12 {
                tracing::warn!(trust = %answer.trust, stated, expected, "a trust adds more noise than the gateway's policy");
                return Err(TallyError::new(
                    ErrorCode::TrustProtocol,
                    format!(
                        "trust {} adds more noise than the gateway's policy expects (sd {stated} > {expected}), so the accuracy shown would be wrong: align the gateway's privacy settings with the trusts'",
                        answer.trust
                    ),
                ));
            }
        }
    }
    let mismatch = || {
        tracing::warn!(trust = %answer.trust, "trust answered with columns Tally did not ask for");
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
                        return Err(mismatch());
                    }
                    Ok(column.clone())
                })
                .collect::<Result<Vec<_>, _>>()?;
            RecordBatch::try_new(schema.clone(), columns).map_err(|_| mismatch())
        })
        .collect()
}
