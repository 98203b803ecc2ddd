//! The node's Flight SQL service. Every statement is planned here, with the node's own
//! DataFusion context, and checked against the floor (read-only, aggregates only) both when
//! it is described (`GetFlightInfo`) and when it is run (`DoGet`): a ticket is never trusted.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, CommandStatementQuery, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::{DataFrame, SessionContext};
use futures::{Stream, StreamExt};
use serde::Serialize;
use tally_common::audit::{AuditLog, now_millis};
use tally_common::checks::{check_aggregate_only, plan_read_only};
use tally_common::flight::{
    FlightDataStream, MetadataRequest, QUERY_ID_HEADER, TableInfo, encode_batches, flight_info,
    ticket_sql,
};
use tally_common::{ErrorCode, TallyError};
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
    /// `describe` (GetFlightInfo) or `run` (DoGet).
    pub step: &'static str,
    /// The SQL as received.
    pub sql: String,
    /// `answered`, `refused` or `failed`.
    pub outcome: &'static str,
    /// Our reason code when refused or failed.
    pub code: Option<String>,
    /// Rows returned (groups), when answered.
    pub rows: Option<usize>,
    /// Wall time in milliseconds.
    pub duration_ms: f64,
}

/// The Flight SQL service of one trust.
#[derive(Clone)]
pub struct NodeService {
    ctx: SessionContext,
    tables: Arc<Vec<TableInfo>>,
    audit: Arc<AuditLog<NodeAuditRecord>>,
}

/// What one request is about, for its audit record.
struct RequestContext {
    query_id: String,
    peer: String,
    sql: String,
    started: Instant,
}

impl RequestContext {
    fn new<T>(request: &Request<T>, sql: String) -> Self {
        let query_id = request
            .metadata()
            .get(QUERY_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("-")
            .chars()
            .take(64)
            .collect();
        RequestContext {
            query_id,
            peer: request
                .remote_addr()
                .map_or_else(|| "unknown".into(), |a| a.to_string()),
            sql,
            started: Instant::now(),
        }
    }

    fn record(&self, step: &'static str, outcome: Result<usize, &TallyError>) -> NodeAuditRecord {
        let (outcome, code, rows) = match outcome {
            Ok(rows) => ("answered", None, Some(rows)),
            Err(err) if err.code == ErrorCode::Execution => {
                ("failed", Some(err.code.to_string()), None)
            }
            Err(err) => ("refused", Some(err.code.to_string()), None),
        };
        NodeAuditRecord {
            time_ms: now_millis(),
            query_id: self.query_id.clone(),
            peer: self.peer.clone(),
            step,
            sql: self.sql.clone(),
            outcome,
            code,
            rows,
            duration_ms: self.started.elapsed().as_secs_f64() * 1e3,
        }
    }
}

impl NodeService {
    /// A service over `ctx`, whose tables are listed in `tables`.
    pub fn new(
        ctx: SessionContext,
        tables: Vec<TableInfo>,
        audit: Arc<AuditLog<NodeAuditRecord>>,
    ) -> Self {
        NodeService {
            ctx,
            tables: Arc::new(tables),
            audit,
        }
    }

    /// Plans `sql` and enforces the floor.
    async fn plan_checked(&self, sql: &str) -> Result<LogicalPlan, TallyError> {
        let plan = plan_read_only(&self.ctx.state(), sql).await?;
        check_aggregate_only(&plan)?;
        Ok(plan)
    }

    /// Plans, checks and audits; refusals are logged before they are returned.
    async fn admit(
        &self,
        request: &RequestContext,
        step: &'static str,
    ) -> Result<LogicalPlan, Status> {
        self.plan_checked(&request.sql).await.map_err(|err| {
            tracing::info!(query_id = %request.query_id, code = %err.code, "refused");
            self.audit.append(request.record(step, Err(&err)));
            err.to_status()
        })
    }

    fn metadata(&self, request: MetadataRequest) -> Result<Response<FlightDataStream>, Status> {
        Ok(Response::new(request.answer(&self.tables)?))
    }
}

/// Counts the rows of a result stream and writes the audit record when it ends.
fn audited<S>(
    stream: S,
    request: RequestContext,
    audit: Arc<AuditLog<NodeAuditRecord>>,
) -> impl Stream<Item = Result<arrow::record_batch::RecordBatch, TallyError>> + Send
where
    S: Stream<Item = datafusion::error::Result<arrow::record_batch::RecordBatch>> + Send + 'static,
{
    let rows = Arc::new(AtomicUsize::new(0));
    let failure: Arc<std::sync::Mutex<Option<TallyError>>> = Arc::default();
    let (count, fail) = (rows.clone(), failure.clone());
    let query_id = request.query_id.clone();
    let batches = stream.map(move |batch| match batch {
        Ok(batch) => {
            count.fetch_add(batch.num_rows(), Ordering::Relaxed);
            Ok(batch)
        }
        Err(err) => {
            let err = TallyError::from_execution(err, &query_id);
            *fail.lock().unwrap_or_else(|p| p.into_inner()) = Some(err.clone());
            Err(err)
        }
    });
    let finish = futures::stream::once(async move {
        let failure = failure.lock().unwrap_or_else(|p| p.into_inner()).take();
        let outcome = match &failure {
            Some(err) => Err(err),
            None => Ok(rows.load(Ordering::Relaxed)),
        };
        audit.append(request.record("run", outcome));
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
        let plan = self.admit(&context, "describe").await?;
        let schema: SchemaRef = Arc::new(plan.schema().as_arrow().clone());
        let ticket = TicketStatementQuery {
            statement_handle: query.query.into_bytes().into(),
        };
        self.audit.append(context.record("describe", Ok(0)));
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
        let context = RequestContext::new(&request, sql);
        let plan = self.admit(&context, "run").await?;
        let frame = DataFrame::new(self.ctx.state(), plan);
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = frame.execute_stream().await.map_err(|err| {
            let err = TallyError::from_execution(err, &context.query_id);
            self.audit.append(context.record("run", Err(&err)));
            err.to_status()
        })?;
        let batches = audited(stream, context, self.audit.clone());
        Ok(Response::new(encode_batches(schema, batches)))
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
