//! The gateway's query path: plan with DataFusion, split into per-trust fragments, fan out,
//! merge, audit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use serde::Serialize;
use tally_common::admission::{Origin, Refused, RequestIdentity, admit, policy_input};
use tally_common::audit::{AuditLog, now_millis};
use tally_common::checks::{QueryLimits, plan_read_only};
use tally_common::facts::query_facts;
use tally_common::flight::TableInfo;
use tally_common::policy::{Decision, Obligations, Policy};
use tally_common::session::new_context;
use tally_common::{ErrorCode, TallyError};

use crate::catalogue::{Catalogue, CatalogueSchema};
use crate::config::GatewayLimits;
use crate::error::GatewayError;
use crate::fanout::{FragmentRun, QueryFanout};
use crate::limits::RateLimiter;
use crate::planned::{PlanCache, PlannedQuery};
use crate::split::split;

/// One line of the gateway's audit log.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayAuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The query id, also sent to every trust (`-` for a request refused before it had one).
    pub query_id: String,
    /// The analyst's network address.
    pub peer: String,
    /// Who asked, for which project and purpose (empty when authentication failed).
    pub identity: RequestIdentity,
    /// The analyst's SQL.
    pub sql: String,
    /// The version of the policy that decided (absent when the policy was not reached).
    pub policy_version: Option<String>,
    /// The obligations applied, when allowed.
    pub obligations: Option<Obligations>,
    /// The per-trust SQL, one entry per fragment.
    pub fragments: Vec<String>,
    /// Trusts that answered.
    pub trusts: Vec<String>,
    /// `answered`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason codes when refused or failed.
    pub codes: Vec<String>,
    /// Rows in the answer.
    pub rows: Option<usize>,
    /// Rows (partial-aggregate groups) received from the trusts.
    pub rows_from_trusts: Option<usize>,
    /// Flight message bytes received from the trusts.
    pub bytes_from_trusts: Option<usize>,
    /// Groups dropped by disclosure control (a count, never which).
    pub groups_suppressed: Option<usize>,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
    /// Why a request was refused before planning (authentication, project, rate limit).
    pub detail: Option<String>,
}

/// A query's answer and how it was obtained.
#[derive(Debug, Clone)]
pub struct QueryOutcome {
    /// The query id.
    pub query_id: String,
    /// The answer's schema.
    pub schema: SchemaRef,
    /// The answer.
    pub batches: Vec<RecordBatch>,
    /// What each trust returned for each fragment.
    pub runs: Vec<FragmentRun>,
    /// Groups dropped by disclosure control.
    pub suppressed: usize,
    /// The version of the policy that allowed the query.
    pub policy_version: String,
    /// Wall time.
    pub elapsed: Duration,
}

impl QueryOutcome {
    /// Codes of the trusts that answered, without repeats, in answer order.
    pub fn trusts(&self) -> Vec<String> {
        let mut trusts: Vec<String> = Vec::new();
        for run in &self.runs {
            if !trusts.contains(&run.trust) {
                trusts.push(run.trust.clone());
            }
        }
        trusts
    }
}

/// What the policy made of a query, without running it.
#[derive(Debug, Clone, Serialize)]
pub struct Explanation {
    /// The policy input document.
    pub input: serde_json::Value,
    /// The decision.
    pub decision: Decision,
}

/// The gateway's engine.
pub struct Gateway {
    ctx: SessionContext,
    catalogue: Arc<Catalogue>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog<GatewayAuditRecord>>,
    rates: RateLimiter,
    query_timeout: Duration,
    plans: PlanCache,
}

/// Who sent a request and from where, for its audit record.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The analyst's network address.
    pub peer: String,
    /// Who asked, for which project and purpose.
    pub identity: RequestIdentity,
}

impl Gateway {
    /// An engine planning over `catalogue`'s tables under `policy`, within `limits`.
    pub fn new(
        catalogue: Arc<Catalogue>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog<GatewayAuditRecord>>,
        limits: &GatewayLimits,
    ) -> Result<Self, GatewayError> {
        let engine = |e: datafusion::error::DataFusionError| GatewayError::Engine(e.to_string());
        let ctx = new_context().map_err(engine)?;
        QueryLimits {
            max_sql_bytes: limits.max_sql_bytes,
            max_plan_depth: limits.max_plan_depth,
        }
        .install(&ctx);
        let default_catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| GatewayError::Engine("default catalogue missing".into()))?;
        default_catalog
            .register_schema("public", Arc::new(CatalogueSchema::new(catalogue.clone())))
            .map_err(engine)?;
        Ok(Gateway {
            ctx,
            catalogue,
            policy,
            audit,
            rates: RateLimiter::new(
                limits.queries_per_minute_per_user,
                limits.queries_per_minute_per_project,
            ),
            query_timeout: limits.query_timeout(),
            plans: PlanCache::default(),
        })
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &Arc<Catalogue> {
        &self.catalogue
    }

    /// The gateway's policy.
    pub fn policy(&self) -> &Arc<Policy> {
        &self.policy
    }

    /// The gateway's audit log.
    pub fn audit(&self) -> &Arc<AuditLog<GatewayAuditRecord>> {
        &self.audit
    }

    /// The tables analysts can query.
    pub fn tables(&self) -> Vec<TableInfo> {
        self.catalogue.snapshot().table_infos()
    }

    fn trust_codes(&self) -> Vec<String> {
        self.catalogue
            .trusts()
            .iter()
            .map(|t| t.code.clone())
            .collect()
    }

    /// Admits `sql` for `identity` and splits it into fragments.
    async fn plan(
        &self,
        identity: &RequestIdentity,
        sql: &str,
        query_id: &str,
    ) -> Result<(LogicalPlan, Arc<QueryFanout>), Refused> {
        let admitted = self.admit(identity, sql, query_id).await?;
        let fanout = Arc::new(QueryFanout::new(
            query_id.to_string(),
            self.catalogue.clone(),
            identity.clone(),
            admitted.decision.obligations.clone(),
        ));
        let plan = split(admitted.plan, &fanout, &self.policy.data()).map_err(|error| Refused {
            error,
            decision: Some(Box::new(admitted.decision)),
        })?;
        Ok((plan, fanout))
    }

    /// Plans `sql` and asks the policy; nothing is split or sent yet.
    async fn admit(
        &self,
        identity: &RequestIdentity,
        sql: &str,
        query_id: &str,
    ) -> Result<tally_common::admission::Admitted, Refused> {
        admit(
            &self.ctx.state(),
            sql,
            &self.policy,
            identity,
            query_id,
            self.trust_codes(),
            Origin::Analyst,
        )
        .await
    }

    /// The policy input and decision for `sql`, without running it.
    pub async fn explain(
        &self,
        identity: &RequestIdentity,
        sql: &str,
    ) -> Result<Explanation, TallyError> {
        let planned = plan_read_only(&self.ctx.state(), sql).await?;
        let facts = query_facts(
            sql,
            &planned.plan,
            &planned.syntax,
            &self.policy.data(),
            self.trust_codes(),
            &[],
        );
        let input = policy_input(identity, "explain", &self.policy.version(), &facts);
        let decision = self.policy.decide(&input)?;
        Ok(Explanation { input, decision })
    }

    /// A fresh audit record for a query, before anything is known of its outcome.
    fn new_record(&self, caller: &Caller, sql: &str, query_id: &str) -> GatewayAuditRecord {
        GatewayAuditRecord {
            time_ms: now_millis(),
            query_id: query_id.to_string(),
            peer: caller.peer.clone(),
            identity: caller.identity.clone(),
            sql: sql.to_string(),
            policy_version: None,
            obligations: None,
            fragments: Vec::new(),
            trusts: Vec::new(),
            outcome: "refused",
            codes: Vec::new(),
            rows: None,
            rows_from_trusts: None,
            bytes_from_trusts: None,
            groups_suppressed: None,
            duration_ms: 0.0,
            detail: None,
        }
    }

    /// Records a request refused before it reached the planner (credentials, project
    /// membership) and returns the error for the analyst.
    pub fn audit_rejected_request(
        &self,
        caller: &Caller,
        sql: &str,
        error: TallyError,
    ) -> TallyError {
        let mut record = self.new_record(caller, sql, &new_query_id());
        record.codes = vec![error.code.to_string()];
        record.detail = Some(error.message.clone());
        self.audit.append(record);
        error
    }

    /// Records a refusal (with the policy's reason codes when it decided) and returns the
    /// error for the analyst.
    fn audit_refusal(
        &self,
        mut record: GatewayAuditRecord,
        refused: Refused,
        started: Instant,
    ) -> TallyError {
        record.policy_version = refused.decision.as_ref().map(|d| d.policy_version.clone());
        record.codes = refused.codes();
        record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        self.audit.append(record);
        refused.error
    }

    /// Plans `sql` for `caller`, auditing a refusal.
    async fn plan_or_refuse(
        &self,
        caller: &Caller,
        sql: &str,
    ) -> Result<(LogicalPlan, Arc<QueryFanout>), TallyError> {
        let started = Instant::now();
        let query_id = new_query_id();
        self.plan(&caller.identity, sql, &query_id)
            .await
            .map_err(|refused| {
                let record = self.new_record(caller, sql, &query_id);
                self.audit_refusal(record, refused, started)
            })
    }

    /// Plans `sql` without running it: the answer's schema, or why it is refused.
    pub async fn describe(&self, caller: &Caller, sql: &str) -> Result<SchemaRef, TallyError> {
        // The split plan's schema is the one the run streams (types and nullability after
        // merging), which strict clients such as ADBC check against.
        let (plan, _) = self.plan_or_refuse(caller, sql).await?;
        Ok(Arc::new(plan.schema().as_arrow().clone()))
    }

    /// Plans `sql` for a statement: its schema and the ticket that runs it, which names the
    /// plan kept for that run (see [`crate::planned`]).
    pub async fn describe_statement(
        &self,
        caller: &Caller,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<u8>), TallyError> {
        let (plan, fanout) = self.plan_or_refuse(caller, sql).await?;
        let schema = Arc::new(plan.schema().as_arrow().clone());
        let ticket = self.plans.keep(PlannedQuery {
            identity: caller.identity.clone(),
            sql: sql.to_string(),
            policy_version: self.policy.version(),
            plan,
            fanout,
        });
        Ok((schema, ticket))
    }

    /// Runs `sql` for `caller` and records the outcome in the audit log; `plan` names the plan
    /// kept when the statement was described, used if it is still valid.
    pub async fn run(
        &self,
        caller: &Caller,
        sql: &str,
        plan: Option<&str>,
    ) -> Result<QueryOutcome, TallyError> {
        let started = Instant::now();
        let kept = plan.and_then(|handle| {
            self.plans
                .take(handle, &caller.identity, sql, &self.policy.version())
        });
        let query_id = kept
            .as_ref()
            .map_or_else(new_query_id, |k| k.fanout.query_id.clone());
        let mut record = self.new_record(caller, sql, &query_id);
        if let Err(error) = self.rates.admit(&caller.identity) {
            let refused = Refused {
                error,
                decision: None,
            };
            return Err(self.audit_refusal(record, refused, started));
        }
        let (plan, fanout) = match kept {
            Some(kept) => (kept.plan, kept.fanout),
            None => match self.plan(&caller.identity, sql, &query_id).await {
                Ok(planned) => planned,
                Err(refused) => return Err(self.audit_refusal(record, refused, started)),
            },
        };
        record.policy_version = Some(self.policy.version());
        record.obligations = Some(fanout.obligations().clone());
        let result = tokio::time::timeout(self.query_timeout, self.execute(plan, &fanout))
            .await
            .unwrap_or_else(|_| {
                Err(TallyError::new(
                    ErrorCode::QueryTimeout,
                    format!(
                        "the query took longer than the gateway's limit of {:.0} s",
                        self.query_timeout.as_secs_f64()
                    ),
                ))
            });
        let runs = fanout.runs();
        record.fragments = runs.iter().map(|r| r.sql.clone()).collect();
        record.fragments.dedup();
        record.trusts = runs.iter().map(|r| r.trust.clone()).collect();
        record.trusts.sort();
        record.trusts.dedup();
        record.groups_suppressed = Some(fanout.suppressed());
        record.rows_from_trusts = Some(runs.iter().map(|r| r.rows).sum());
        record.bytes_from_trusts = Some(runs.iter().map(|r| r.bytes).sum());
        match &result {
            Ok((_, batches)) => {
                record.outcome = "answered";
                record.rows = Some(batches.iter().map(RecordBatch::num_rows).sum());
            }
            Err(err) => {
                record.outcome = if is_failure(err.code) {
                    "failed"
                } else {
                    "refused"
                };
                record.codes = vec![err.code.to_string()];
            }
        }
        record.duration_ms = started.elapsed().as_secs_f64() * 1e3;
        let policy_version = record.policy_version.clone().unwrap_or_default();
        self.audit.append(record);
        let (schema, batches) = result?;
        Ok(QueryOutcome {
            query_id,
            schema,
            batches,
            runs,
            suppressed: fanout.suppressed(),
            policy_version,
            elapsed: started.elapsed(),
        })
    }

    async fn execute(
        &self,
        plan: LogicalPlan,
        fanout: &Arc<QueryFanout>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), TallyError> {
        let frame = DataFrame::new(self.ctx.state(), plan);
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let batches = frame
            .collect()
            .await
            .map_err(|e| TallyError::from_execution(e, &fanout.query_id))?;
        Ok((schema, batches))
    }
}

fn is_failure(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::Execution
            | ErrorCode::Internal
            | ErrorCode::TrustUnavailable
            | ErrorCode::TrustTimeout
            | ErrorCode::TrustFailed
            | ErrorCode::TrustProtocol
            | ErrorCode::PolicyError
            | ErrorCode::QueryTimeout
            | ErrorCode::ResourcesExhausted
    )
}

fn new_query_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
