//! The gateway's query path: plan with DataFusion, split into per-trust fragments, fan out,
//! merge, audit.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use serde::Serialize;
use tally_common::audit::{AuditLog, now_millis};
use tally_common::checks::plan_read_only;
use tally_common::flight::TableInfo;
use tally_common::session::new_context;
use tally_common::{ErrorCode, TallyError};

use crate::auth::Identity;
use crate::catalogue::{Catalogue, CatalogueSchema};
use crate::error::GatewayError;
use crate::fanout::{FragmentRun, QueryFanout};
use crate::split::split;

/// One line of the gateway's audit log.
#[derive(Debug, Clone, Serialize)]
pub struct GatewayAuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The query id, also sent to every trust.
    pub query_id: String,
    /// Who asked.
    pub user: String,
    /// The analyst's SQL.
    pub sql: String,
    /// The per-trust SQL, one entry per fragment.
    pub fragments: Vec<String>,
    /// Trusts that answered.
    pub trusts: Vec<String>,
    /// `answered`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason code when refused or failed.
    pub code: Option<String>,
    /// Rows in the answer.
    pub rows: Option<usize>,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
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

/// The gateway's engine.
pub struct Gateway {
    ctx: SessionContext,
    catalogue: Arc<Catalogue>,
    audit: Arc<AuditLog<GatewayAuditRecord>>,
}

impl Gateway {
    /// An engine planning over `catalogue`'s tables.
    pub fn new(
        catalogue: Arc<Catalogue>,
        audit: Arc<AuditLog<GatewayAuditRecord>>,
    ) -> Result<Self, GatewayError> {
        let engine = |e: datafusion::error::DataFusionError| GatewayError::Engine(e.to_string());
        let ctx = new_context().map_err(engine)?;
        let default_catalog = ctx
            .catalog("datafusion")
            .ok_or_else(|| GatewayError::Engine("default catalogue missing".into()))?;
        default_catalog
            .register_schema("public", Arc::new(CatalogueSchema::new(catalogue.clone())))
            .map_err(engine)?;
        Ok(Gateway {
            ctx,
            catalogue,
            audit,
        })
    }

    /// The catalogue.
    pub fn catalogue(&self) -> &Arc<Catalogue> {
        &self.catalogue
    }

    /// The gateway's audit log.
    pub fn audit(&self) -> &Arc<AuditLog<GatewayAuditRecord>> {
        &self.audit
    }

    /// The tables analysts can query.
    pub fn tables(&self) -> Vec<TableInfo> {
        self.catalogue.snapshot().table_infos()
    }

    async fn plan(&self, sql: &str, fanout: &Arc<QueryFanout>) -> Result<LogicalPlan, TallyError> {
        let plan = plan_read_only(&self.ctx.state(), sql).await?;
        split(plan, fanout)
    }

    /// Plans `sql` without running it: the answer's schema, or why it is refused.
    pub async fn describe(&self, sql: &str) -> Result<SchemaRef, TallyError> {
        let fanout = Arc::new(QueryFanout::new(new_query_id(), self.catalogue.clone()));
        let plan = self.plan(sql, &fanout).await?;
        Ok(Arc::new(plan.schema().as_arrow().clone()))
    }

    /// Runs `sql` for `identity` and records the outcome in the audit log.
    pub async fn run(&self, identity: &Identity, sql: &str) -> Result<QueryOutcome, TallyError> {
        let started = Instant::now();
        let fanout = Arc::new(QueryFanout::new(new_query_id(), self.catalogue.clone()));
        let result = self.execute(sql, &fanout).await;
        let runs = fanout.runs();
        let (outcome, code, rows) = match &result {
            Ok((_, batches)) => (
                "answered",
                None,
                Some(batches.iter().map(RecordBatch::num_rows).sum()),
            ),
            Err(err) if is_failure(err.code) => ("failed", Some(err.code.to_string()), None),
            Err(err) => ("refused", Some(err.code.to_string()), None),
        };
        let mut fragments: Vec<String> = runs.iter().map(|r| r.sql.clone()).collect();
        fragments.dedup();
        let mut trusts: Vec<String> = runs.iter().map(|r| r.trust.clone()).collect();
        trusts.sort();
        trusts.dedup();
        self.audit.append(GatewayAuditRecord {
            time_ms: now_millis(),
            query_id: fanout.query_id.clone(),
            user: identity.user.clone(),
            sql: sql.to_string(),
            fragments,
            trusts,
            outcome,
            code,
            rows,
            duration_ms: started.elapsed().as_secs_f64() * 1e3,
        });
        let (schema, batches) = result?;
        Ok(QueryOutcome {
            query_id: fanout.query_id.clone(),
            schema,
            batches,
            runs,
            elapsed: started.elapsed(),
        })
    }

    async fn execute(
        &self,
        sql: &str,
        fanout: &Arc<QueryFanout>,
    ) -> Result<(SchemaRef, Vec<RecordBatch>), TallyError> {
        let plan = self.plan(sql, fanout).await?;
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
    )
}

fn new_query_id() -> String {
    uuid::Uuid::new_v4().to_string()
}
