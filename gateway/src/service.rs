//! The analysts' Flight SQL endpoint: statements, prepared statements (as JDBC and ADBC
//! clients use them), catalogue metadata and bearer-token authentication.

use std::pin::Pin;
use std::str::FromStr;
use std::sync::Arc;

use arrow::datatypes::Schema;
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage,
    SchemaAsIpc, Ticket,
};
use futures::{Stream, StreamExt};
use tally_common::flight::{
    FlightDataStream, MetadataRequest, PROJECT_HEADER, PURPOSE_HEADER, QUERY_ID_HEADER,
    encode_batches, flight_info, header_text, ticket_sql,
};
use tally_common::{ErrorCode, TallyError};
use tonic::metadata::MetadataValue;
use tonic::{Request, Response, Status, Streaming};

use crate::auth::Users;
use crate::engine::{Caller, Gateway};
use crate::planned::parse_ticket;

/// Response header listing the trusts that answered, comma-separated.
pub const TRUSTS_HEADER: &str = "x-tally-trusts";

/// The Flight action that returns the caller's project budget as JSON ([`BudgetReport`]).
///
/// [`BudgetReport`]: crate::budget::BudgetReport
pub const BUDGET_ACTION: &str = "tally.budget";
/// Response header: the version of the policy that allowed the query.
pub const POLICY_VERSION_HEADER: &str = "x-tally-policy-version";

/// The Flight SQL service analysts talk to.
#[derive(Clone)]
pub struct GatewayService {
    gateway: Arc<Gateway>,
    users: Arc<Users>,
}

impl GatewayService {
    /// A service over `gateway`, admitting `users`.
    pub fn new(gateway: Arc<Gateway>, users: Users) -> Self {
        GatewayService {
            gateway,
            users: Arc::new(users),
        }
    }

    /// Who is calling: bearer token (or JWT), then the project and purpose the request
    /// names (or the user's defaults). A refusal is audited with the `sql` it carried.
    async fn identify<T>(
        &self,
        request: &Request<T>,
        sql: &str,
        step: &'static str,
    ) -> Result<Caller, Status> {
        let metadata = request.metadata();
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".into(), |a| a.to_string());
        let project = header_text(metadata, PROJECT_HEADER);
        let purpose = header_text(metadata, PURPOSE_HEADER);
        let mut caller = Caller {
            peer,
            identity: Default::default(),
            token: None,
        };
        let (identity, token) = match self.users.bearer(metadata) {
            Ok(signed_in) => signed_in,
            Err(error) => return Err(self.refuse(&caller, sql, step, error).await),
        };
        caller.identity.user = identity.user.clone();
        match identity.for_request(&project, &purpose) {
            Ok(resolved) => {
                caller.identity = resolved;
                caller.token = token;
                Ok(caller)
            }
            Err(error) => Err(self.refuse(&caller, sql, step, error).await),
        }
    }

    async fn refuse(
        &self,
        caller: &Caller,
        sql: &str,
        step: &'static str,
        error: TallyError,
    ) -> Status {
        tracing::info!(peer = %caller.peer, code = %error.code, "request refused before planning");
        self.gateway
            .audit_rejected_request(caller, sql, step, error)
            .await
            .to_status()
    }

    fn metadata(&self, request: MetadataRequest) -> Result<Response<FlightDataStream>, Status> {
        Ok(Response::new(request.answer(&self.gateway.tables())?))
    }

    /// Runs `sql` and streams the answer, with the query id and the answering trusts in the
    /// response headers.
    async fn answer(
        &self,
        caller: &Caller,
        sql: &str,
        plan: Option<&str>,
    ) -> Result<Response<FlightDataStream>, Status> {
        let outcome = self.gateway.run(caller, sql, plan).await?;
        let schema = outcome.schema.clone();
        let batches = futures::stream::iter(outcome.batches.clone().into_iter().map(Ok));
        let mut response = Response::new(encode_batches(schema, batches));
        let headers = response.metadata_mut();
        for (name, value) in [
            (QUERY_ID_HEADER, outcome.query_id.clone()),
            (TRUSTS_HEADER, outcome.trusts().join(",")),
            (POLICY_VERSION_HEADER, outcome.policy_version.clone()),
        ] {
            if let Ok(value) = MetadataValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
        Ok(response)
    }
}

fn schema_bytes(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|_| {
            TallyError::new(ErrorCode::Internal, "schema could not be encoded").to_status()
        })?;
    Ok(message.0)
}

#[tonic::async_trait]
impl FlightSqlService for GatewayService {
    type FlightService = GatewayService;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        let peer = request
            .remote_addr()
            .map_or_else(|| "unknown".into(), |a| a.to_string());
        let (identity, token) = match self.users.handshake(request.metadata()) {
            Ok(signed_in) => signed_in,
            Err(error) => {
                let caller = Caller {
                    peer,
                    identity: Default::default(),
                    token: None,
                };
                return Err(self.refuse(&caller, "", "run", error).await);
            }
        };
        tracing::info!(user = %identity.user, "analyst authenticated");
        let reply = HandshakeResponse {
            protocol_version: 0,
            payload: token.clone().into(),
        };
        let mut response: Response<Pin<Box<dyn Stream<Item = _> + Send>>> =
            Response::new(Box::pin(futures::stream::once(async { Ok(reply) })));
        let bearer = MetadataValue::from_str(&format!("Bearer {token}")).map_err(|_| {
            TallyError::new(ErrorCode::Unauthenticated, "token is not valid header text")
                .to_status()
        })?;
        response.metadata_mut().insert("authorization", bearer);
        Ok(response)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let caller = self.identify(&request, &query.query, "describe").await?;
        let (schema, ticket) = self
            .gateway
            .describe_statement(&caller, &query.query)
            .await?;
        let ticket = TicketStatementQuery {
            statement_handle: ticket.into(),
        };
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
        let text = ticket_sql(&ticket.statement_handle)?;
        let (plan, sql) = parse_ticket(&text);
        let caller = self.identify(&request, sql, "run").await?;
        self.answer(&caller, sql, plan).await
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let caller = self.identify(&request, &query.query, "describe").await?;
        let schema = self.gateway.prepare(&caller, &query.query).await?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: query.query.into_bytes().into(),
            dataset_schema: schema_bytes(&schema)?,
            parameter_schema: schema_bytes(&Schema::empty())?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<(), Status> {
        self.identify(&request, "", "describe").await?;
        Ok(())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        self.identify(&request, "", "describe").await?;
        let mut stream = request.into_inner();
        while let Some(message) = stream.next().await {
            if !message?.data_body.is_empty() {
                return Err(TallyError::new(
                    ErrorCode::BadRequest,
                    "query parameters are not supported; write the values into the SQL",
                )
                .into());
            }
        }
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(query.prepared_statement_handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let sql = ticket_sql(&query.prepared_statement_handle)?;
        let caller = self.identify(&request, &sql, "describe").await?;
        // The endpoint's ticket is a statement ticket naming the plan kept for the run, so
        // the prepared statement is planned, rate-limited and audited once like any other.
        let (schema, ticket) = self.gateway.describe_statement(&caller, &sql).await?;
        let ticket = TicketStatementQuery {
            statement_handle: ticket.into(),
        };
        Ok(Response::new(flight_info(
            &schema,
            ticket,
            request.into_inner(),
        )?))
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = ticket_sql(&query.prepared_statement_handle)?;
        let caller = self.identify(&request, &sql, "run").await?;
        self.answer(&caller, &sql, None).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "", "describe").await?;
        Ok(Response::new(
            MetadataRequest::Catalogs(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "", "describe").await?;
        Ok(Response::new(
            MetadataRequest::Schemas(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "", "describe").await?;
        Ok(Response::new(
            MetadataRequest::Tables(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "", "describe").await?;
        Ok(Response::new(
            MetadataRequest::TableTypes(query).flight_info(request.into_inner())?,
        ))
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.identify(&request, "", "describe").await?;
        Ok(Response::new(
            MetadataRequest::SqlInfo(query).flight_info(request.into_inner())?,
        ))
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.identify(&request, "", "describe").await?;
        self.metadata(MetadataRequest::Catalogs(query))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.identify(&request, "", "describe").await?;
        self.metadata(MetadataRequest::Schemas(query))
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.identify(&request, "", "describe").await?;
        self.metadata(MetadataRequest::Tables(query))
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.identify(&request, "", "describe").await?;
        self.metadata(MetadataRequest::TableTypes(query))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        self.identify(&request, "", "describe").await?;
        self.metadata(MetadataRequest::SqlInfo(query))
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        if request.get_ref().r#type != BUDGET_ACTION {
            let error = TallyError::new(
                ErrorCode::BadRequest,
                format!(
                    "unknown action '{}' (this gateway offers '{BUDGET_ACTION}' and the Flight SQL actions)",
                    request.get_ref().r#type
                ),
            );
            return Err(error.to_status());
        }
        let caller = self.identify(&request, "", "budget").await?;
        let report = self.gateway.budget_report(&caller.identity);
        let body = serde_json::to_vec(&report).map_err(|_| {
            TallyError::new(ErrorCode::Internal, "the budget could not be encoded").to_status()
        })?;
        let result = arrow_flight::Result { body: body.into() };
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(result)
        }))))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
