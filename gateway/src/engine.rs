//! The gateway's query path, stage by stage: parse ([`crate::parse`]), lower
//! ([`crate::lower`]), decide ([`tally_common::admission`]), then run the plan, whose
//! release leaves send ([`crate::send`]), merge ([`crate::merge`]) and release
//! ([`crate::release`]); every request is audited before it is answered.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::execution::TaskContext;
use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::physical_plan::ExecutionPlan;
use serde::Serialize;
use tally_common::admission::{
    BudgetState, Origin, Refused, RequestIdentity, decide, policy_input,
};
use tally_common::audit::{AuditLog, now_millis};
use tally_common::flight::TableInfo;
use tally_common::model::ReleaseQuery;
use tally_common::policy::{Decision, Obligations, Policy, PolicySnapshot};
use tally_common::session::new_context;
use tally_common::{ErrorCode, TallyError};

use crate::budget::{Budget, BudgetReport};
use crate::catalogue::{Catalogue, CatalogueSchema};
use crate::config::GatewayLimits;
use crate::error::GatewayError;
use crate::limits::RateLimiter;
use crate::lower::{lower, releases_of};
use crate::parse::{QueryLimits, plan_read_only};
use crate::planned::{PlanCache, PlannedQuery, StatementPlans};
use crate::send::{QueryDispatch, ReleaseRun};
use tally_common::queue::FairQueue;

/// One line of the gateway's audit log.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayAuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The query id, also sent to every trust.
    pub query_id: String,
    /// `describe` (GetFlightInfo) or `run` (DoGet).
    pub step: &'static str,
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
    /// Each release as the model the trusts received.
    pub releases: Vec<ReleaseQuery>,
    /// Each release rendered as SQL (what the trusts' logs show).
    pub release_sql: Vec<String>,
    /// Trusts that answered.
    pub trusts: Vec<String>,
    /// `answered`, `described`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason codes when refused or failed.
    pub codes: Vec<String>,
    /// Rows in the answer.
    pub rows: Option<usize>,
    /// Rows (released groups) received from the trusts.
    pub rows_from_trusts: Option<usize>,
    /// Flight message bytes received from the trusts.
    pub bytes_from_trusts: Option<usize>,
    /// ρ the query cost its project (0 for a repeat), when it was paid for.
    pub rho_charged: Option<f64>,
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
    /// What each trust returned for each release.
    pub runs: Vec<ReleaseRun>,
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
    /// The releases the query lowers to.
    pub releases: Vec<ReleaseQuery>,
    /// Each release as SQL.
    pub release_sql: Vec<String>,
    /// The policy input document of each release.
    pub inputs: Vec<serde_json::Value>,
    /// The decision, or the refusal's code and message.
    pub decision: Result<Decision, String>,
}

impl Explanation {
    /// What `plan` lowers to and what `policy` decides for `identity`, whose project's
    /// budget is `budget`.
    pub fn of(
        plan: LogicalPlan,
        policy: &PolicySnapshot,
        identity: &RequestIdentity,
        budget: &BudgetState,
    ) -> Result<Self, TallyError> {
        let governance = policy.governance();
        let releases = releases_of(plan, governance)?;
        Ok(Explanation {
            release_sql: releases.iter().map(|r| r.render_sql(governance)).collect(),
            inputs: releases
                .iter()
                .map(|r| policy_input(identity, Origin::Analyst, r, governance, budget))
                .collect(),
            decision: decide(policy, identity, Origin::Analyst, &releases, budget)
                .map_err(|refused| refused.error.to_string()),
            releases,
        })
    }
}

/// The gateway's engine.
pub struct Gateway {
    /// The session every statement is planned in (made once: cloning a state copies its
    /// function registries), and the task context every plan runs in.
    state: SessionState,
    task: Arc<TaskContext>,
    catalogue: Arc<Catalogue>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog<GatewayAuditRecord>>,
    rates: RateLimiter,
    queue: Arc<FairQueue>,
    query_timeout: Duration,
    plans: PlanCache,
    statements: StatementPlans,
    budget: Budget,
}

/// Who sent a request and from where, for its audit record.
#[derive(Debug, Clone)]
pub struct Caller {
    /// The analyst's network address.
    pub peer: String,
    /// Who asked, for which project and purpose.
    pub identity: RequestIdentity,
    /// The analyst's signed token, forwarded to every trust (absent for static tokens,
    /// which only trusts that opt in to the gateway's word accept).
    pub token: Option<String>,
}

/// The schema of a described query's answer.
struct Described(SchemaRef);

/// A query planned, lowered and decided, ready to run.
struct Decided {
    plan: LogicalPlan,
    dispatch: Arc<QueryDispatch>,
    releases: Vec<ReleaseQuery>,
    release_sql: Vec<String>,
    decision: Decision,
}

/// The audit record of one request, written exactly once: by [`AuditGuard::write`], or, if
/// the request's work ends any other way (a panic, a dropped future), when it is dropped.
struct AuditGuard {
    audit: Arc<AuditLog<GatewayAuditRecord>>,
    record: Option<GatewayAuditRecord>,
    started: Instant,
}

impl AuditGuard {
    fn record(&mut self) -> &mut GatewayAuditRecord {
        self.record.get_or_insert_with(unreachable_record)
    }

    /// Writes the record; the answer may be given only if this succeeds.
    async fn write(mut self) -> Result<(), TallyError> {
        let mut record = self.record.take().unwrap_or_else(unreachable_record);
        record.duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
        self.audit.write(record).await
    }
}

fn unreachable_record() -> GatewayAuditRecord {
    GatewayAuditRecord {
        time_ms: now_millis(),
        query_id: "-".into(),
        step: "run",
        peer: String::new(),
        identity: RequestIdentity::default(),
        sql: String::new(),
        policy_version: None,
        obligations: None,
        releases: Vec::new(),
        release_sql: Vec::new(),
        trusts: Vec::new(),
        outcome: "failed",
        codes: vec![ErrorCode::Internal.to_string()],
        rows: None,
        rows_from_trusts: None,
        bytes_from_trusts: None,
        rho_charged: None,
        duration_ms: 0.0,
        detail: None,
    }
}

impl Drop for AuditGuard {
    fn drop(&mut self) {
        if let Some(mut record) = self.record.take() {
            record.outcome = "failed";
            // A panic inside the request's work (caught, and answered as E_INTERNAL), or the
            // client gone.
            record.codes = vec![if std::thread::panicking() {
                ErrorCode::Internal.to_string()
            } else {
                "CANCELLED".into()
            }];
            record.duration_ms = self.started.elapsed().as_secs_f64() * 1e3;
            let _ = self.audit.append(record);
        }
    }
}

impl Gateway {
    /// An engine planning over `catalogue`'s tables under `policy`, keeping its budget in
    /// `budget`, within `limits`.
    pub fn new(
        catalogue: Arc<Catalogue>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog<GatewayAuditRecord>>,
        budget: Budget,
        limits: &GatewayLimits,
    ) -> Result<Self, GatewayError> {
        let engine = |e: datafusion::error::DataFusionError| GatewayError::Engine(e.to_string());
        let ctx = new_context().map_err(engine)?;
        ctx.add_analyzer_rule(Arc::new(crate::checked::CheckedArithmetic));
        QueryLimits {
            max_sql_bytes: limits.max_sql_bytes,
            max_plan_depth: limits.max_plan_depth,
            ..QueryLimits::default()
        }
        .install(&ctx);
        let default_catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| GatewayError::Engine("default catalogue missing".into()))?;
        default_catalog
            .register_schema("public", Arc::new(CatalogueSchema::new(catalogue.clone())))
            .map_err(engine)?;
        let state = ctx.state();
        Ok(Gateway {
            task: state.task_ctx(),
            state,
            catalogue,
            policy,
            audit,
            rates: RateLimiter::new(
                limits.queries_per_minute_per_user,
                limits.queries_per_minute_per_project,
            ),
            queue: FairQueue::new(limits.admission()),
            query_timeout: limits.query_timeout(),
            plans: PlanCache::default(),
            statements: StatementPlans::default(),
            budget,
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

    /// `identity`'s project budget under the current policy.
    pub fn budget_report(&self, identity: &RequestIdentity) -> BudgetReport {
        self.budget
            .report(identity, self.policy.snapshot().governance())
    }

    /// The tables analysts can query.
    pub fn tables(&self) -> Vec<TableInfo> {
        self.catalogue.snapshot().table_infos()
    }

    fn guard(&self, caller: &Caller, sql: &str, query_id: &str, step: &'static str) -> AuditGuard {
        AuditGuard {
            audit: self.audit.clone(),
            record: Some(GatewayAuditRecord {
                time_ms: now_millis(),
                query_id: query_id.to_string(),
                step,
                peer: caller.peer.clone(),
                identity: caller.identity.clone(),
                sql: sql.to_string(),
                outcome: "refused",
                codes: Vec::new(),
                ..unreachable_record()
            }),
            started: Instant::now(),
        }
    }

    /// Parses, lowers and decides `sql` for `caller` under one policy snapshot.
    async fn decide(
        &self,
        caller: &Caller,
        sql: &str,
        query_id: &str,
        policy: &PolicySnapshot,
    ) -> Result<Decided, Refused> {
        let plan = self.statement_plan(sql).await?;
        let dispatch = Arc::new(QueryDispatch::new(
            query_id.to_string(),
            self.catalogue.clone(),
            caller.identity.clone(),
            caller.token.clone(),
        ));
        // The releases are decided first; the plan that runs them is lowered once the
        // decision (and so each value's accuracy) is known.
        let releases = releases_of(plan.clone(), policy.governance())?;
        let budget = self.budget.state(&caller.identity, policy.governance());
        let decision = decide(
            policy,
            &caller.identity,
            Origin::Analyst,
            &releases,
            &budget.view(),
        )?;
        dispatch.bind(decision.obligations.clone());
        let (plan, releases) = lower(plan, policy.governance(), &dispatch)?;
        let release_sql = releases
            .iter()
            .map(|r| r.render_sql(policy.governance()))
            .collect();
        Ok(Decided {
            plan,
            dispatch,
            releases,
            release_sql,
            decision,
        })
    }

    /// The logical plan of `sql`: kept from an earlier request over the same catalogue, or
    /// parsed and planned now (and kept).
    async fn statement_plan(&self, sql: &str) -> Result<LogicalPlan, TallyError> {
        let view = self.catalogue.snapshot();
        if let Some(plan) = self.statements.get(&view, sql) {
            return Ok(plan);
        }
        let plan = plan_read_only(&self.state, sql).await?;
        self.statements.keep(view, sql, &plan);
        Ok(plan)
    }

    /// The releases, policy inputs and decision for `sql`, without running it.
    pub async fn explain(
        &self,
        identity: &RequestIdentity,
        sql: &str,
    ) -> Result<Explanation, TallyError> {
        let policy = self.policy.snapshot();
        let plan = plan_read_only(&self.state, sql).await?;
        let budget = self.budget.state(identity, policy.governance());
        Explanation::of(plan, &policy, identity, &budget.view())
    }

    /// Records a request refused before it reached the planner (credentials, project
    /// membership) as `step` (`describe` or `run`) and returns the error for the analyst.
    pub async fn audit_rejected_request(
        &self,
        caller: &Caller,
        sql: &str,
        step: &'static str,
        error: TallyError,
    ) -> TallyError {
        let mut guard = self.guard(caller, sql, &new_query_id(), step);
        let record = guard.record();
        record.codes = vec![error.code.to_string()];
        record.detail = Some(error.message.clone());
        match guard.write().await {
            Ok(()) => error,
            Err(audit) => audit,
        }
    }

    /// Fills in a refusal (with the policy's reason codes when it decided), writes the record
    /// and returns the error for the analyst.
    async fn refuse(&self, mut guard: AuditGuard, refused: Refused) -> TallyError {
        let record = guard.record();
        record.policy_version = refused.decision.as_ref().map(|d| d.policy_version.clone());
        record.codes = refused.codes();
        match guard.write().await {
            Ok(()) => refused.error,
            Err(audit) => audit,
        }
    }

    /// Plans `sql` for a prepared statement: its schema, or why it is refused. Decided and
    /// audited (step `describe`) but not rate-limited, since nothing reaches a trust; the
    /// statement's own GetFlightInfo then plans it for its run.
    pub async fn prepare(&self, caller: &Caller, sql: &str) -> Result<SchemaRef, TallyError> {
        self.describe_as(caller, sql, false)
            .await
            .map(|(schema, _)| schema.0)
    }

    /// Plans `sql` for a statement (GetFlightInfo): rate-limited, decided and audited (step
    /// `describe`); returns its schema and the ticket that runs it, naming the plan kept for
    /// that run (see [`crate::planned`]).
    pub async fn describe_statement(
        &self,
        caller: &Caller,
        sql: &str,
    ) -> Result<(SchemaRef, Vec<u8>), TallyError> {
        let (schema, planned) = self.describe_as(caller, sql, true).await?;
        Ok((schema.0, self.plans.keep(planned)))
    }

    async fn describe_as(
        &self,
        caller: &Caller,
        sql: &str,
        rate_limited: bool,
    ) -> Result<(Described, PlannedQuery), TallyError> {
        let query_id = new_query_id();
        let mut guard = self.guard(caller, sql, &query_id, "describe");
        if rate_limited && let Err(error) = self.rates.admit(&caller.identity) {
            return Err(self.refuse(guard, error.into()).await);
        }
        let policy = self.policy.snapshot();
        let decided = match self.decide(caller, sql, &query_id, &policy).await {
            Ok(decided) => decided,
            Err(refused) => return Err(self.refuse(guard, refused).await),
        };
        let record = guard.record();
        record.outcome = "described";
        record.policy_version = Some(policy.version().to_string());
        record.obligations = Some(decided.decision.obligations.clone());
        record.releases = decided.releases.clone();
        record.release_sql = decided.release_sql.clone();
        guard.write().await?;
        let schema = Described(Arc::new(decided.plan.schema().as_arrow().clone()));
        let planned = PlannedQuery {
            identity: caller.identity.clone(),
            sql: sql.to_string(),
            policy_version: policy.version().to_string(),
            plan: decided.plan,
            dispatch: decided.dispatch,
            releases: decided.releases,
            release_sql: decided.release_sql,
            obligations: decided.decision.obligations,
        };
        Ok((schema, planned))
    }

    /// Runs `sql` for `caller` and records the outcome in the audit log before answering;
    /// `plan` names the plan kept when the statement was described (already rate-limited and
    /// decided), used if it is still valid.
    pub async fn run(
        &self,
        caller: &Caller,
        sql: &str,
        plan: Option<&str>,
    ) -> Result<QueryOutcome, TallyError> {
        let started = Instant::now();
        let policy = self.policy.snapshot();
        let kept = plan.and_then(|handle| {
            self.plans
                .take(handle, &caller.identity, sql, policy.version())
        });
        let query_id = kept
            .as_ref()
            .map_or_else(new_query_id, |k| k.dispatch.query_id.clone());
        let mut guard = self.guard(caller, sql, &query_id, "run");
        let decided = match kept {
            Some(kept) => Decided {
                plan: kept.plan,
                dispatch: kept.dispatch,
                releases: kept.releases,
                release_sql: kept.release_sql,
                decision: Decision {
                    allow: true,
                    reasons: Vec::new(),
                    obligations: kept.obligations,
                    policy_version: kept.policy_version,
                },
            },
            None => {
                if let Err(error) = self.rates.admit(&caller.identity) {
                    return Err(self.refuse(guard, error.into()).await);
                }
                match self.decide(caller, sql, &query_id, &policy).await {
                    Ok(decided) => decided,
                    Err(refused) => return Err(self.refuse(guard, refused).await),
                }
            }
        };
        let record = guard.record();
        record.policy_version = Some(policy.version().to_string());
        record.obligations = Some(decided.decision.obligations.clone());
        record.releases = decided.releases.clone();
        record.release_sql = decided.release_sql.clone();
        let tenant =
            tally_common::queue::tenant_key(&[&caller.identity.project, &caller.identity.user]);
        let deadline = started + self.query_timeout;
        let running = match self.queue.admit(&tenant, deadline, "the gateway").await {
            Ok(running) => running,
            Err(error) => return Err(self.refuse(guard, error.into()).await),
        };
        // Planned before the budget is charged: planning reads no trust's data (releases are
        // sent when the plan runs), so what it refuses (a constant that overflows, a type
        // that does not fit) costs nothing. Its errors are about the analyst's SQL.
        let schema: SchemaRef = Arc::new(decided.plan.schema().as_arrow().clone());
        let physical = match self.state.create_physical_plan(&decided.plan).await {
            Ok(physical) => physical,
            Err(error) => {
                let refused = TallyError::from_planning(error);
                return Err(self.refuse(guard, refused.into()).await);
            }
        };
        let reserved = match self
            .budget
            .reserve(
                &caller.identity,
                policy.governance(),
                &decided.decision.obligations,
                &decided.releases,
                &query_id,
                policy.version(),
            )
            .await
        {
            Ok(reserved) => reserved,
            Err(error) => return Err(self.refuse(guard, error.into()).await),
        };
        guard.record().rho_charged = Some(reserved.charged.as_f64());
        let dispatch = decided.dispatch.clone();
        let remaining = deadline.saturating_duration_since(Instant::now());
        let result = tokio::time::timeout(remaining, self.execute(physical, &dispatch))
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
        let runs = dispatch.runs();
        let record = guard.record();
        record.trusts = runs.iter().map(|r| r.trust.clone()).collect();
        record.trusts.sort();
        record.trusts.dedup();
        record.rows_from_trusts = Some(runs.iter().map(|r| r.rows).sum());
        record.bytes_from_trusts = Some(runs.iter().map(|r| r.bytes).sum());
        match &result {
            Ok(batches) => {
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
        drop(running);
        guard.write().await?;
        drop(reserved);
        let batches = result?;
        Ok(QueryOutcome {
            query_id,
            schema,
            batches,
            runs,
            policy_version: policy.version().to_string(),
            elapsed: started.elapsed(),
        })
    }

    async fn execute(
        &self,
        physical: Arc<dyn ExecutionPlan>,
        dispatch: &Arc<QueryDispatch>,
    ) -> Result<Vec<RecordBatch>, TallyError> {
        datafusion::physical_plan::collect(physical, self.task.clone())
            .await
            .map_err(|e| TallyError::from_execution(e, &dispatch.query_id))
    }
}

/// Whether an error ends a query as `failed` (Tally or a trust could not answer) rather
/// than `refused` (the query, the identity or the policy said no).
fn is_failure(code: ErrorCode) -> bool {
    match code {
        ErrorCode::Execution
        | ErrorCode::Internal
        | ErrorCode::TrustUnavailable
        | ErrorCode::TrustTimeout
        | ErrorCode::TrustFailed
        | ErrorCode::TrustProtocol
        | ErrorCode::PolicyError
        | ErrorCode::QueryTimeout
        | ErrorCode::ResourcesExhausted
        | ErrorCode::CpuBudget
        | ErrorCode::Busy => true,
        ErrorCode::SqlSyntax
        | ErrorCode::UnknownTable
        | ErrorCode::UnknownColumn
        | ErrorCode::Plan
        | ErrorCode::ReadOnly
        | ErrorCode::NotAggregate
        | ErrorCode::Window
        | ErrorCode::SchemaMismatch
        | ErrorCode::TrustRefused
        | ErrorCode::Unauthenticated
        | ErrorCode::BadRequest
        | ErrorCode::TooLarge
        | ErrorCode::Project
        | ErrorCode::Purpose
        | ErrorCode::TableNotAllowed
        | ErrorCode::AggregateNotAllowed
        | ErrorCode::ExpressionShape
        | ErrorCode::UnclassifiedColumn
        | ErrorCode::IdentifierColumn
        | ErrorCode::QuasiIdentifier
        | ErrorCode::MeasureUsage
        | ErrorCode::SetOperation
        | ErrorCode::Values
        | ErrorCode::GroupingSets
        | ErrorCode::LimitBelowAggregate
        | ErrorCode::PolicyDenied
        | ErrorCode::RateLimited
        | ErrorCode::ClientCertificate
        | ErrorCode::QueryShape
        | ErrorCode::FilterNotAllowed
        | ErrorCode::BudgetExhausted
        | ErrorCode::LedgerBroken
        | ErrorCode::QueryCost
        | ErrorCode::Overflow
        | ErrorCode::DivideByZero => false,
    }
}

fn new_query_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
