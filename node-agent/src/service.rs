//! The node's Flight service. It answers only release requests (a query model in a
//! `DoGet` ticket), never SQL text: each is validated against the trust's own catalogue,
//! decided by the trust's own policy for the identity, checked against the project's
//! trusts, and planned by the node itself ([`crate::release`]). The trust applies its own
//! obligations whatever the gateway asked: the National Data Opt-out whenever its policy
//! says so, and its own small-number threshold (or the gateway's, if stricter). Every
//! request, refused or answered, is audited before the answer is sent.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandStatementQuery, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};

use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tally_common::admission::{Origin, Refused, RequestIdentity, decide};
use tally_common::audit::{AuditLog, now_millis};
use tally_common::flight::{
    FlightDataStream, MetadataRequest, QUERY_ID_HEADER, TableInfo, encode_batches, header_text,
};
use tally_common::model::{ReleaseQuery, ReleaseRequest};
use tally_common::policy::{Decision, Policy};
use tally_common::tls::{RefusedConnection, certificate_identity};
use tally_common::{ErrorCode, TallyError};
use tonic::{Request, Response, Status, Streaming};

use crate::identity::NodeIdentity;
use crate::release::build_plan;

/// One line of the trust's own audit log.
#[derive(Debug, Clone, Serialize)]
pub struct NodeAuditRecord {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The gateway's query id (or `-` when the caller sent none).
    pub query_id: String,
    /// Network address of the caller.
    pub peer: String,
    /// The identity named by the caller's TLS client certificate (absent in plaintext).
    pub gateway: Option<String>,
    /// Who is asking and why, as this trust verified it (empty when it could not).
    pub identity: RequestIdentity,
    /// `connect` (a refused connection) or `release` (a release request).
    pub step: &'static str,
    /// The release received, as readable SQL (empty when none could be read).
    pub sql: String,
    /// The release received, as the model.
    pub release: Option<ReleaseQuery>,
    /// `answered`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason codes when refused or failed.
    pub codes: Vec<String>,
    /// The version of the trust's policy that decided (absent if it was not reached).
    pub policy_version: Option<String>,
    /// Whether the National Data Opt-out was applied.
    pub opt_out_applied: Option<bool>,
    /// The small-number threshold the trust demanded.
    pub min_distinct_patients: Option<u64>,
    /// Rows returned (groups), when answered.
    pub rows: Option<usize>,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
    /// Why a connection was refused.
    pub detail: Option<String>,
}

impl NodeAuditRecord {
    /// The record of a connection refused during the TLS handshake or identity check.
    pub fn refused_connection(refused: &RefusedConnection) -> Self {
        NodeAuditRecord {
            time_ms: now_millis(),
            query_id: "-".into(),
            peer: refused.peer.to_string(),
            gateway: refused.identity.clone(),
            identity: RequestIdentity::default(),
            step: "connect",
            sql: String::new(),
            release: None,
            outcome: "refused",
            codes: vec![ErrorCode::ClientCertificate.to_string()],
            policy_version: None,
            opt_out_applied: None,
            min_distinct_patients: None,
            rows: None,
            duration_ms: 0.0,
            detail: Some(refused.reason.clone()),
        }
    }
}

/// The node's two views of its tables: everything, and without opted-out patients.
#[derive(Clone)]
pub struct Contexts {
    /// Every row.
    pub full: SessionContext,
    /// Without the rows of patients on the National Data Opt-out (absent without a list).
    pub opted_out: Option<SessionContext>,
}

/// The Flight SQL service of one trust.
#[derive(Clone)]
pub struct NodeService {
    trust: String,
    identity: Arc<NodeIdentity>,
    contexts: Contexts,
    tables: Arc<Vec<TableInfo>>,
    policy: Arc<Policy>,
    audit: Arc<AuditLog<NodeAuditRecord>>,
    query_timeout: Duration,
}

/// What one request is about, for its audit record.
struct RequestContext {
    query_id: String,
    peer: String,
    gateway: Option<String>,
    identity: RequestIdentity,
    sql: String,
    release: Option<ReleaseQuery>,
    started: Instant,
}

/// How a request ended, for its audit record.
#[derive(Default)]
struct Outcome {
    codes: Vec<String>,
    decision: Option<Decision>,
    rows: Option<usize>,
    failed: bool,
}

impl RequestContext {
    fn new<T>(request: &Request<T>) -> Self {
        let query_id = header_text(request.metadata(), QUERY_ID_HEADER);
        RequestContext {
            query_id: if query_id.is_empty() {
                "-".into()
            } else {
                query_id
            },
            peer: request
                .remote_addr()
                .map_or_else(|| "unknown".into(), |a| a.to_string()),
            gateway: request
                .peer_certs()
                .and_then(|certs| certs.first().and_then(certificate_identity)),
            identity: RequestIdentity::default(),
            sql: String::new(),
            release: None,
            started: Instant::now(),
        }
    }

    fn record(&self, step: &'static str, outcome: Outcome) -> NodeAuditRecord {
        let label = match (&outcome.rows, outcome.failed) {
            (_, true) => "failed",
            (Some(_), false) => "answered",
            (None, false) if outcome.codes.is_empty() => "answered",
            (None, false) => "refused",
        };
        NodeAuditRecord {
            time_ms: now_millis(),
            query_id: self.query_id.clone(),
            peer: self.peer.clone(),
            gateway: self.gateway.clone(),
            identity: self.identity.clone(),
            step,
            sql: self.sql.clone(),
            release: self.release.clone(),
            outcome: label,
            codes: outcome.codes,
            policy_version: outcome.decision.as_ref().map(|d| d.policy_version.clone()),
            opt_out_applied: outcome
                .decision
                .as_ref()
                .map(|d| d.obligations.apply_opt_out),
            min_distinct_patients: outcome
                .decision
                .as_ref()
                .map(|d| d.obligations.min_distinct_patients),
            rows: outcome.rows,
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
            detail: None,
        }
    }
}

impl NodeService {
    /// The service of trust `trust`, checking who asks with `identity`, over `contexts`,
    /// whose tables are listed in `tables`, deciding with `policy`; each query may run for
    /// `query_timeout`.
    pub fn new(
        trust: String,
        identity: Arc<NodeIdentity>,
        contexts: Contexts,
        tables: Vec<TableInfo>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog<NodeAuditRecord>>,
        query_timeout: Duration,
    ) -> Self {
        NodeService {
            trust,
            identity,
            contexts,
            tables: Arc::new(tables),
            policy,
            audit,
            query_timeout,
        }
    }

    /// The context to run in: without opted-out patients whenever the decision says so.
    fn context_for(&self, decision: &Decision) -> Result<&SessionContext, TallyError> {
        if !decision.obligations.apply_opt_out {
            return Ok(&self.contexts.full);
        }
        self.contexts.opted_out.as_ref().ok_or_else(|| {
            TallyError::new(
                ErrorCode::PolicyError,
                "this query requires the National Data Opt-out, and this trust has no opt-out list configured",
            )
        })
    }

    fn metadata(&self, request: MetadataRequest) -> Result<Response<FlightDataStream>, Status> {
        Ok(Response::new(request.answer(&self.tables)?))
    }

    /// Writes a refusal's record and returns its status.
    async fn refuse(&self, context: &RequestContext, refused: Refused) -> Status {
        tracing::info!(query_id = %context.query_id, code = %refused.error.code, "refused");
        let outcome = Outcome {
            codes: refused.codes(),
            decision: refused.decision.map(|d| *d),
            ..Outcome::default()
        };
        match self.audit.write(context.record("release", outcome)).await {
            Ok(()) => refused.error.to_status(),
            Err(audit) => audit.to_status(),
        }
    }

    /// Decides, plans and runs one release request.
    async fn release(
        &self,
        mut context: RequestContext,
        metadata: tonic::metadata::MetadataMap,
        request: Result<ReleaseRequest, TallyError>,
    ) -> Result<Response<FlightDataStream>, Status> {
        match self.identity.verify(&metadata) {
            Ok(identity) => context.identity = identity,
            Err(error) => return Err(self.refuse(&context, error.into()).await),
        }
        let request = match request {
            Ok(request) => request,
            Err(error) => return Err(self.refuse(&context, error.into()).await),
        };
        let policy = self.policy.snapshot();
        context.sql = request.release.render_sql(policy.governance());
        context.release = Some(request.release.clone());
        let decision = match decide(
            &policy,
            &context.identity,
            Origin::Gateway,
            std::slice::from_ref(&request.release),
        ) {
            Ok(decision) => decision,
            Err(refused) => return Err(self.refuse(&context, refused).await),
        };
        let refuse_with = |error: TallyError, decision: &Decision| Refused {
            error,
            decision: Some(Box::new(decision.clone())),
        };
        if let Some(trusts) = &decision.obligations.trusts
            && !trusts.contains(&self.trust)
        {
            let error = TallyError::new(
                ErrorCode::Project,
                format!(
                    "project '{}' does not include trust {}",
                    context.identity.project, self.trust
                ),
            );
            return Err(self.refuse(&context, refuse_with(error, &decision)).await);
        }
        let ctx = match self.context_for(&decision) {
            Ok(ctx) => ctx.clone(),
            Err(error) => return Err(self.refuse(&context, refuse_with(error, &decision)).await),
        };
        let threshold = decision
            .obligations
            .min_distinct_patients
            .max(request.min_distinct_patients);
        // The audit record shows the threshold applied: the stricter of the two.
        let mut decision = decision;
        decision.obligations.min_distinct_patients = threshold;
        let plan = match build_plan(
            &ctx,
            policy.governance(),
            &request.release,
            threshold,
            decision.obligations.round_to,
        )
        .await
        {
            Ok(plan) => plan,
            Err(error) => return Err(self.refuse(&context, refuse_with(error, &decision)).await),
        };
        let frame = DataFrame::new(ctx.state(), plan);
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = match frame.execute_stream().await {
            Ok(stream) => stream,
            Err(err) => {
                let error = TallyError::from_execution(err, &context.query_id);
                let outcome = Outcome {
                    codes: vec![error.code.to_string()],
                    decision: Some(decision),
                    failed: true,
                    ..Outcome::default()
                };
                return Err(
                    match self.audit.write(context.record("release", outcome)).await {
                        Ok(()) => error.to_status(),
                        Err(audit) => audit.to_status(),
                    },
                );
            }
        };
        let deadline = context.started + self.query_timeout;
        let stream = within_deadline(stream, deadline, self.query_timeout);
        let batches = audited(stream, context, decision, self.audit.clone());
        Ok(Response::new(encode_batches(schema, batches)))
    }

    /// Refuses SQL text: a node runs only release requests it plans itself.
    async fn refuse_sql(&self, context: RequestContext) -> Status {
        let error = TallyError::new(
            ErrorCode::BadRequest,
            "this node runs only Tally release requests (a query model), never SQL text",
        );
        self.refuse(&context, error.into()).await
    }

    /// Refuses, and audits, a request that is neither a release request nor a catalogue
    /// request (an undecodable ticket, an action, an upload, an exchange).
    pub(crate) async fn refuse_request<T>(&self, request: &Request<T>, what: &str) -> Status {
        let error = TallyError::new(
            ErrorCode::BadRequest,
            format!("{what}: this node answers only Tally release requests and catalogue requests"),
        );
        self.refuse(&RequestContext::new(request), error.into())
            .await
    }
}

/// Ends a result stream with E_QUERY_TIMEOUT (and cancels the query) at `deadline`.
fn within_deadline<S>(
    stream: S,
    deadline: Instant,
    limit: Duration,
) -> impl Stream<Item = datafusion::error::Result<arrow::record_batch::RecordBatch>> + Send
where
    S: Stream<Item = datafusion::error::Result<arrow::record_batch::RecordBatch>>
        + Send
        + Unpin
        + 'static,
{
    let deadline = tokio::time::Instant::from_std(deadline);
    futures::stream::unfold(Some(stream), move |state| async move {
        let mut stream = state?;
        let next = if tokio::time::Instant::now() < deadline {
            tokio::time::timeout_at(deadline, stream.next()).await
        } else {
            tokio::time::timeout_at(deadline, std::future::pending()).await
        };
        match next {
            Ok(Some(item)) => Some((item, Some(stream))),
            Ok(None) => None,
            Err(_) => {
                let timeout = TallyError::new(
                    ErrorCode::QueryTimeout,
                    format!(
                        "the query ran longer than this trust's limit of {:.0} s",
                        limit.as_secs_f64()
                    ),
                );
                Some((Err(timeout.into_datafusion()), None))
            }
        }
    })
}

/// The audit record of one run, written exactly once: when the stream ends, when it fails
/// (before the error is sent), or when it is dropped early (the gateway went away).
struct RunRecord {
    request: RequestContext,
    decision: Option<Decision>,
    audit: Arc<AuditLog<NodeAuditRecord>>,
    rows: usize,
}

impl RunRecord {
    /// The record, if not yet taken, with `failure`'s code, if any.
    fn take(&mut self, failure: Option<&TallyError>, cancelled: bool) -> Option<NodeAuditRecord> {
        let decision = self.decision.take()?;
        let mut codes: Vec<String> = failure.map(|e| e.code.to_string()).into_iter().collect();
        if cancelled {
            codes.push("CANCELLED".into());
        }
        let outcome = Outcome {
            failed: failure.is_some() || cancelled,
            codes,
            rows: Some(self.rows),
            decision: Some(decision),
        };
        Some(self.request.record("release", outcome))
    }
}

impl Drop for RunRecord {
    fn drop(&mut self) {
        if let Some(record) = self.take(None, true) {
            let _ = self.audit.append(record);
        }
    }
}

/// Counts the rows of a result stream and writes its audit record (see [`RunRecord`]); a
/// record that cannot be written ends the stream with an error, so the gateway, which needs
/// the whole stream, never answers from it.
fn audited<S>(
    stream: S,
    request: RequestContext,
    decision: Decision,
    audit: Arc<AuditLog<NodeAuditRecord>>,
) -> impl Stream<Item = Result<arrow::record_batch::RecordBatch, TallyError>> + Send
where
    S: Stream<Item = datafusion::error::Result<arrow::record_batch::RecordBatch>> + Send + 'static,
{
    let query_id = request.query_id.clone();
    let record = Arc::new(std::sync::Mutex::new(RunRecord {
        request,
        decision: Some(decision),
        audit: audit.clone(),
        rows: 0,
    }));
    let finished = record.clone();
    let failed_audit = audit.clone();
    let batches = stream.then(move |batch| {
        let record = record.clone();
        let audit = failed_audit.clone();
        let query_id = query_id.clone();
        async move {
            match batch {
                Ok(batch) => {
                    record.lock().unwrap_or_else(|p| p.into_inner()).rows += batch.num_rows();
                    Ok(batch)
                }
                Err(err) => {
                    let err = TallyError::from_execution(err, &query_id);
                    let taken = record
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .take(Some(&err), false);
                    if let Some(entry) = taken {
                        audit.write(entry).await?;
                    }
                    Err(err)
                }
            }
        }
    });
    let finish = futures::stream::once(async move {
        let taken = finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(None, false);
        match taken {
            Some(entry) => audit.write(entry).await.err().map(Err),
            None => None,
        }
    })
    .filter_map(|item| async { item });
    batches.chain(finish)
}

#[tonic::async_trait]
impl FlightSqlService for NodeService {
    type FlightService = NodeService;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let reply = HandshakeResponse::default();
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(reply)
        }))))
    }

    async fn get_flight_info_statement(
        &self,
        _query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_statement(
        &self,
        _ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_prepared_statement(
        &self,
        _query: arrow_flight::sql::CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn get_flight_info_prepared_statement(
        &self,
        _query: arrow_flight::sql::CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Err(self.refuse_sql(RequestContext::new(&request)).await)
    }

    async fn do_get_fallback(
        &self,
        request: Request<Ticket>,
        message: arrow_flight::sql::Any,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let context = RequestContext::new(&request);
        let metadata = request.metadata().clone();
        self.release(context, metadata, ReleaseRequest::from_any(&message))
            .await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Catalogs(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Schemas(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::Tables(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::TableTypes(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        Ok(Response::new(
            MetadataRequest::SqlInfo(query).flight_info(request.into_inner())?,
        ))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Catalogs(query))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Schemas(query))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::Tables(query))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::TableTypes(query))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.metadata(MetadataRequest::SqlInfo(query))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
