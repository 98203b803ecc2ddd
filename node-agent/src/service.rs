//! The node's Flight SQL service. Every statement is planned here, with the node's own
//! DataFusion context, checked against the floor (read-only, aggregates only) and the
//! trust's own policy both when it is described (`GetFlightInfo`) and when it is run
//! (`DoGet`): a ticket is never trusted. The trust applies its own obligations: the
//! National Data Opt-out whenever its policy says so, whatever the gateway asked, and it
//! reports its small-number threshold with every result.

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
use std::str::FromStr;

use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tally_common::admission::{Admitted, Origin, Refused, RequestIdentity, admit};
use tally_common::audit::{AuditLog, now_millis};
use tally_common::checks::{check_aggregate_only, plan_read_only};
use tally_common::flight::{
    FlightDataStream, MIN_PATIENTS_HEADER, MetadataRequest, QUERY_ID_HEADER, TableInfo,
    encode_batches, flight_info, header_text, identity_from_headers, ticket_sql,
};
use tally_common::policy::{Decision, Policy};
use tally_common::tls::{RefusedConnection, certificate_identity};
use tally_common::{ErrorCode, TallyError};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

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
    /// Who the caller says is asking, and why.
    pub identity: RequestIdentity,
    /// `connect` (a refused connection), `describe` (GetFlightInfo) or `run` (DoGet).
    pub step: &'static str,
    /// The SQL as received.
    pub sql: String,
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
    fn new<T>(request: &Request<T>, sql: String) -> Self {
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
            identity: identity_from_headers(request.metadata()),
            sql,
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
    /// A service over `contexts`, whose tables are listed in `tables`, deciding with
    /// `policy`; each query may run for `query_timeout`.
    pub fn new(
        contexts: Contexts,
        tables: Vec<TableInfo>,
        policy: Arc<Policy>,
        audit: Arc<AuditLog<NodeAuditRecord>>,
        query_timeout: Duration,
    ) -> Self {
        NodeService {
            contexts,
            tables: Arc::new(tables),
            policy,
            audit,
            query_timeout,
        }
    }

    /// The floor, the trust's own policy, and the aggregate-only check; refusals are
    /// audited before they are returned.
    async fn admit(
        &self,
        request: &RequestContext,
        step: &'static str,
    ) -> Result<Admitted, Status> {
        let state = self.contexts.full.state();
        let admitted = admit(
            &state,
            &request.sql,
            &self.policy,
            &request.identity,
            &request.query_id,
            Vec::new(),
            Origin::Gateway,
        )
        .await
        .and_then(|admitted| {
            check_aggregate_only(&admitted.plan).map_err(|error| Refused {
                error,
                decision: Some(Box::new(admitted.decision.clone())),
            })?;
            Ok(admitted)
        });
        admitted.map_err(|refused| {
            tracing::info!(query_id = %request.query_id, code = %refused.error.code, "refused");
            let codes = refused.codes();
            let outcome = Outcome {
                codes,
                decision: refused.decision.map(|d| *d),
                ..Outcome::default()
            };
            self.audit.append(request.record(step, outcome));
            refused.error.to_status()
        })
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

    async fn run(&self, context: RequestContext) -> Result<Response<FlightDataStream>, Status> {
        let admitted = self.admit(&context, "run").await?;
        let fail = |err: TallyError, decision: &Decision| {
            let outcome = Outcome {
                codes: vec![err.code.to_string()],
                decision: Some(decision.clone()),
                failed: true,
                ..Outcome::default()
            };
            self.audit.append(context.record("run", outcome));
            err.to_status()
        };
        let decision = admitted.decision;
        let ctx = self
            .context_for(&decision)
            .map_err(|e| fail(e, &decision))?;
        // Admission planned over every row; with the opt-out the tables differ, so plan again.
        let plan = if decision.obligations.apply_opt_out {
            plan_read_only(&ctx.state(), &context.sql)
                .await
                .map_err(|e| fail(e, &decision))?
                .plan
        } else {
            admitted.plan
        };
        let frame = DataFrame::new(ctx.state(), plan);
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = match frame.execute_stream().await {
            Ok(stream) => stream,
            Err(err) => {
                return Err(fail(
                    TallyError::from_execution(err, &context.query_id),
                    &decision,
                ));
            }
        };
        let threshold = decision.obligations.min_distinct_patients;
        let deadline = context.started + self.query_timeout;
        let stream = within_deadline(stream, deadline, self.query_timeout);
        let batches = audited(stream, context, decision, self.audit.clone());
        let mut response = Response::new(encode_batches(schema, batches));
        if let Ok(value) = MetadataValue::from_str(&threshold.to_string()) {
            response.metadata_mut().insert(MIN_PATIENTS_HEADER, value);
        }
        Ok(response)
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
    /// Writes the record (if not yet written) with `failure`'s code, if any.
    fn write(&mut self, failure: Option<&TallyError>, cancelled: bool) {
        let Some(decision) = self.decision.take() else {
            return;
        };
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
        self.audit.append(self.request.record("run", outcome));
    }
}

impl Drop for RunRecord {
    fn drop(&mut self) {
        self.write(None, true);
    }
}

/// Counts the rows of a result stream and writes its audit record (see [`RunRecord`]).
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
        audit,
        rows: 0,
    }));
    let finished = record.clone();
    let batches = stream.map(move |batch| {
        let mut record = record.lock().unwrap_or_else(|p| p.into_inner());
        match batch {
            Ok(batch) => {
                record.rows += batch.num_rows();
                Ok(batch)
            }
            Err(err) => {
                let err = TallyError::from_execution(err, &query_id);
                record.write(Some(&err), false);
                Err(err)
            }
        }
    });
    let finish = futures::stream::once(async move {
        finished
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .write(None, false);
    })
    .filter_map(|()| async { None });
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
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let context = RequestContext::new(&request, query.query.clone());
        let admitted = self.admit(&context, "describe").await?;
        let schema: SchemaRef = Arc::new(admitted.plan.schema().as_arrow().clone());
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        let outcome = Outcome {
            decision: Some(admitted.decision),
            ..Outcome::default()
        };
        self.audit.append(context.record("describe", outcome));
        Ok(Response::new(flight_info(
            &schema,
            ticket,
            request.into_inner(),
        )?))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = ticket_sql(&ticket.statement_handle)?;
        self.run(RequestContext::new(&request, sql)).await
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
