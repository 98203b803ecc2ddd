//! Flight SQL plumbing shared by the gateway (serving analysts) and the node agents
//! (serving the gateway): FlightInfo construction, result streaming, catalogue metadata,
//! and the client calls the gateway makes to a trust.

use std::pin::Pin;
use std::sync::LazyLock;

use arrow::datatypes::{Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::client::FlightSqlServiceClient;
use arrow_flight::sql::metadata::{GetCatalogsBuilder, SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    CommandGetCatalogs, CommandGetDbSchemas, CommandGetSqlInfo, CommandGetTableTypes,
    CommandGetTables, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{FlightData, FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{Stream, StreamExt, TryStreamExt};
use prost::Message;
use tonic::Status;
use tonic::transport::Channel;

use crate::admission::RequestIdentity;
use crate::error::{ErrorCode, TallyError};

/// The catalogue name Tally reports in Flight SQL metadata.
pub const CATALOG: &str = "tally";
/// The schema name Tally reports in Flight SQL metadata.
pub const SCHEMA: &str = "public";
/// Request header carrying the gateway's query id to the trusts, for joined-up audit logs.
pub const QUERY_ID_HEADER: &str = "x-tally-query-id";

/// Request header carrying the analyst's signed JWT from the gateway to the trusts, which
/// verify it themselves.
pub const ANALYST_TOKEN_HEADER: &str = "x-tally-analyst-token";

/// Request headers carrying the analyst's identity from the gateway to the trusts (the
/// project and purpose select among the token's signed approvals; the rest is believed only
/// by trusts that opt in to the gateway's word).
pub const USER_HEADER: &str = "x-tally-user";
/// Comma-separated groups of the user.
pub const GROUPS_HEADER: &str = "x-tally-groups";
/// The project a query is for (also sent by analysts to the gateway).
pub const PROJECT_HEADER: &str = "x-tally-project";
/// The purpose of a query (also sent by analysts to the gateway).
pub const PURPOSE_HEADER: &str = "x-tally-purpose";

/// Reads one header as text (empty when absent or not text), at most 256 characters.
pub fn header_text(metadata: &tonic::metadata::MetadataMap, name: &str) -> String {
    metadata
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .chars()
        .take(256)
        .collect()
}

/// The identity headers of a request.
pub fn identity_from_headers(metadata: &tonic::metadata::MetadataMap) -> RequestIdentity {
    RequestIdentity {
        user: header_text(metadata, USER_HEADER),
        groups: header_text(metadata, GROUPS_HEADER)
            .split(',')
            .filter(|g| !g.is_empty())
            .map(str::to_string)
            .collect(),
        project: header_text(metadata, PROJECT_HEADER),
        purpose: header_text(metadata, PURPOSE_HEADER),
    }
}

/// The identity as request headers (values that are not valid header text are dropped).
pub fn identity_headers(identity: &RequestIdentity) -> Vec<(&'static str, String)> {
    vec![
        (USER_HEADER, identity.user.clone()),
        (GROUPS_HEADER, identity.groups.join(",")),
        (PROJECT_HEADER, identity.project.clone()),
        (PURPOSE_HEADER, identity.purpose.clone()),
    ]
}

/// The stream type every `do_get` returns.
pub type FlightDataStream = Pin<Box<dyn Stream<Item = Result<FlightData, Status>> + Send>>;

/// A FlightInfo for one endpoint whose ticket is `ticket`. Sizes are reported as unknown
/// (-1): announcing a row count before disclosure control would leak it.
pub fn flight_info(
    schema: &Schema,
    ticket: impl ProstMessageExt,
    descriptor: FlightDescriptor,
) -> Result<FlightInfo, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket.as_any().encode_to_vec()));
    FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|_| {
            TallyError::new(ErrorCode::Internal, "result schema could not be encoded").to_status()
        })
        .map(|info| {
            info.with_endpoint(endpoint)
                .with_descriptor(descriptor)
                .with_total_records(-1)
                .with_total_bytes(-1)
        })
}

/// Encodes a stream of batches as Flight data; errors are already Tally errors.
pub fn encode_batches<S>(schema: SchemaRef, batches: S) -> FlightDataStream
where
    S: Stream<Item = Result<RecordBatch, TallyError>> + Send + 'static,
{
    let batches = batches.map_err(|e| FlightError::Tonic(Box::new(e.to_status())));
    let encoded = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(batches)
        .map_err(|e| match e {
            FlightError::Tonic(status) => *status,
            _ => TallyError::new(ErrorCode::Internal, "result could not be encoded").to_status(),
        });
    Box::pin(encoded)
}

/// One table as announced in the catalogue.
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name, unqualified.
    pub name: String,
    /// Arrow schema of the table.
    pub schema: SchemaRef,
}

static SQL_INFO: LazyLock<SqlInfoData> = LazyLock::new(|| {
    let mut builder = SqlInfoDataBuilder::new();
    builder.append(SqlInfo::FlightSqlServerName, "Tally");
    builder.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    builder.append(SqlInfo::FlightSqlServerArrowVersion, "1.3");
    builder.append(SqlInfo::FlightSqlServerReadOnly, true);
    builder.append(SqlInfo::FlightSqlServerSql, true);
    builder.append(SqlInfo::FlightSqlServerSubstrait, false);
    builder.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    builder.append(SqlInfo::FlightSqlServerCancel, false);
    builder.append(SqlInfo::SqlDdlCatalog, false);
    builder.append(SqlInfo::SqlDdlSchema, false);
    builder.append(SqlInfo::SqlDdlTable, false);
    builder.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    builder.build().expect("static SqlInfo entries are valid")
});

/// The catalogue and server-information requests both services answer the same way.
#[derive(Debug, Clone)]
pub enum MetadataRequest {
    /// `GetCatalogs`.
    Catalogs(CommandGetCatalogs),
    /// `GetDbSchemas`.
    Schemas(CommandGetDbSchemas),
    /// `GetTables` (optionally with schemas).
    Tables(CommandGetTables),
    /// `GetTableTypes`.
    TableTypes(CommandGetTableTypes),
    /// `GetSqlInfo`.
    SqlInfo(CommandGetSqlInfo),
}

impl MetadataRequest {
    fn schema(&self) -> SchemaRef {
        match self.clone() {
            MetadataRequest::Catalogs(cmd) => cmd.into_builder().schema(),
            MetadataRequest::Schemas(cmd) => cmd.into_builder().schema(),
            MetadataRequest::Tables(cmd) => cmd.into_builder().schema(),
            MetadataRequest::TableTypes(cmd) => cmd.into_builder().schema(),
            MetadataRequest::SqlInfo(cmd) => cmd.into_builder(&SQL_INFO).schema(),
        }
    }

    /// The FlightInfo for this request; the ticket is the request itself.
    pub fn flight_info(&self, descriptor: FlightDescriptor) -> Result<FlightInfo, Status> {
        let schema = self.schema();
        match self.clone() {
            MetadataRequest::Catalogs(cmd) => flight_info(&schema, cmd, descriptor),
            MetadataRequest::Schemas(cmd) => flight_info(&schema, cmd, descriptor),
            MetadataRequest::Tables(cmd) => flight_info(&schema, cmd, descriptor),
            MetadataRequest::TableTypes(cmd) => flight_info(&schema, cmd, descriptor),
            MetadataRequest::SqlInfo(cmd) => flight_info(&schema, cmd, descriptor),
        }
    }

    /// Answers the request for a server holding `tables`.
    pub fn answer(&self, tables: &[TableInfo]) -> Result<FlightDataStream, Status> {
        let internal =
            |_| TallyError::new(ErrorCode::Internal, "metadata could not be built").to_status();
        let batch = match self.clone() {
            MetadataRequest::Catalogs(cmd) => {
                let mut builder: GetCatalogsBuilder = cmd.into_builder();
                builder.append(CATALOG);
                builder.build()
            }
            MetadataRequest::Schemas(cmd) => {
                let mut builder = cmd.into_builder();
                builder.append(CATALOG, SCHEMA);
                builder.build()
            }
            MetadataRequest::Tables(cmd) => {
                let mut builder = cmd.into_builder();
                for table in tables {
                    builder
                        .append(CATALOG, SCHEMA, &table.name, "TABLE", &table.schema)
                        .map_err(internal)?;
                }
                builder.build()
            }
            MetadataRequest::TableTypes(cmd) => {
                let mut builder = cmd.into_builder();
                builder.append("TABLE");
                builder.build()
            }
            MetadataRequest::SqlInfo(cmd) => cmd.into_builder(&SQL_INFO).build(),
        }
        .map_err(internal)?;
        let schema = batch.schema();
        Ok(encode_batches(
            schema,
            futures::stream::once(async { Ok(batch) }),
        ))
    }
}

/// A Flight SQL client over a pooled channel.
pub type SqlClient = FlightSqlServiceClient<Channel>;

/// Fetches every endpoint of `info` and collects the batches and the response headers.
pub async fn fetch_all(
    client: &mut SqlClient,
    info: FlightInfo,
) -> Result<(Vec<RecordBatch>, tonic::metadata::MetadataMap), FlightError> {
    let mut batches = Vec::new();
    let mut headers = tonic::metadata::MetadataMap::new();
    for endpoint in info.endpoint {
        let Some(ticket) = endpoint.ticket else {
            return Err(FlightError::protocol("endpoint without a ticket"));
        };
        let mut stream = client.do_get(ticket).await?;
        headers = stream.headers().clone();
        while let Some(batch) = stream.next().await {
            batches.push(batch?);
        }
    }
    Ok((batches, headers))
}

/// What a statement returned, and how many bytes crossed the wire for it.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The batches.
    pub batches: Vec<RecordBatch>,
    /// The response headers.
    pub headers: tonic::metadata::MetadataMap,
    /// Flight message bytes received (IPC headers and bodies).
    pub wire_bytes: usize,
}

/// Runs `sql` at a Flight SQL server straight from its statement ticket, without a
/// GetFlightInfo round trip, sending `headers` with the call.
pub async fn run_statement(
    channel: Channel,
    headers: &[(&'static str, String)],
    sql: &str,
) -> Result<Fetched, FlightError> {
    let ticket = TicketStatementQuery {
        statement_handle: sql.as_bytes().to_vec().into(),
    };
    run_ticket(
        channel,
        headers,
        Ticket::new(ticket.as_any().encode_to_vec()),
    )
    .await
}

/// Redeems `ticket` with `DoGet`, sending `headers`, and collects the batches and how many
/// bytes crossed the wire for them.
pub async fn run_ticket(
    channel: Channel,
    headers: &[(&'static str, String)],
    ticket: Ticket,
) -> Result<Fetched, FlightError> {
    let mut request = tonic::Request::new(ticket);
    for (name, value) in headers {
        if let Ok(value) = tonic::metadata::MetadataValue::try_from(value.as_str()) {
            request.metadata_mut().insert(*name, value);
        }
    }
    let response = FlightServiceClient::new(channel)
        .do_get(request)
        .await
        .map_err(|status| FlightError::Tonic(Box::new(status)))?;
    let headers = response.metadata().clone();
    let wire = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = wire.clone();
    let messages = response.into_inner().map(move |message| {
        let message = message.map_err(|status| FlightError::Tonic(Box::new(status)))?;
        let size = message.data_header.len() + message.data_body.len();
        counter.fetch_add(size, std::sync::atomic::Ordering::Relaxed);
        Ok(message)
    });
    let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(messages)
        .try_collect()
        .await?;
    Ok(Fetched {
        batches,
        headers,
        wire_bytes: wire.load(std::sync::atomic::Ordering::Relaxed),
    })
}

/// Lists the tables (with schemas) a Flight SQL server announces.
pub async fn list_tables(client: &mut SqlClient) -> Result<Vec<TableInfo>, FlightError> {
    let info = client
        .get_tables(CommandGetTables {
            include_schema: true,
            ..Default::default()
        })
        .await?;
    let mut tables = Vec::new();
    for batch in fetch_all(client, info).await?.0 {
        let names = string_column(&batch, "table_name")?;
        let schemas = batch
            .column_by_name("table_schema")
            .and_then(|c| c.as_any().downcast_ref::<arrow::array::BinaryArray>())
            .ok_or_else(|| FlightError::protocol("GetTables answer has no table_schema column"))?;
        for row in 0..batch.num_rows() {
            let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(schemas.value(row))
                .map_err(FlightError::Arrow)?;
            tables.push(TableInfo {
                name: names.value(row).to_string(),
                schema: std::sync::Arc::new(schema),
            });
        }
    }
    Ok(tables)
}

fn string_column<'a>(
    batch: &'a RecordBatch,
    name: &str,
) -> Result<&'a arrow::array::StringArray, FlightError> {
    batch
        .column_by_name(name)
        .and_then(|c| c.as_any().downcast_ref::<arrow::array::StringArray>())
        .ok_or_else(|| FlightError::protocol(format!("GetTables answer has no {name} column")))
}

/// Flight SQL clients write `grpc://` and `grpc+tls://`; tonic wants `http://` and `https://`.
pub fn http_url(url: &str) -> String {
    for (flight, http) in [
        ("grpc+tls://", "https://"),
        ("grpc+tcp://", "http://"),
        ("grpc://", "http://"),
    ] {
        if let Some(rest) = url.strip_prefix(flight) {
            return format!("{http}{rest}");
        }
    }
    url.to_string()
}

/// Decodes the SQL carried in a statement ticket we issued.
pub fn ticket_sql(handle: &[u8]) -> Result<String, Status> {
    String::from_utf8(handle.to_vec()).map_err(|_| {
        TallyError::new(ErrorCode::BadRequest, "the ticket does not carry SQL text").to_status()
    })
}
