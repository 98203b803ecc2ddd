//! The row-shipping baseline, for benchmarks only: what a federated engine without aggregate
//! pushdown does. Each site runs a Flight SQL server that answers *any* SQL with its rows
//! (no floor, no policy: never deploy this), and the "gateway" is a DataFusion context whose
//! tables fetch the needed columns (with filters pushed down) from every site, then
//! aggregates locally.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::datatypes::SchemaRef;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::{SqlInfo, TicketStatementQuery};
use arrow_flight::{HandshakeRequest, HandshakeResponse, Ticket};
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::error::{DataFusionError, Result as DfResult};
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::prelude::SessionContext;
use datafusion::sql::unparser::expr_to_sql;
use futures::{Stream, StreamExt};
use tally_common::TallyError;
use tally_common::flight::{encode_batches, run_statement, ticket_sql};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// A site that ships rows: runs whatever SQL it receives.
#[derive(Clone)]
pub struct RowServer {
    ctx: SessionContext,
}

impl RowServer {
    /// A server over the tables registered in `ctx`.
    pub fn new(ctx: SessionContext) -> Self {
        RowServer { ctx }
    }
}

#[tonic::async_trait]
impl FlightSqlService for RowServer {
    type FlightService = RowServer;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<
        Response<std::pin::Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>,
        Status,
    > {
        Err(Status::unimplemented("no handshake"))
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        _request: Request<Ticket>,
    ) -> Result<Response<<Self as FlightService>::DoGetStream>, Status> {
        let sql = ticket_sql(&ticket.statement_handle)?;
        let frame = self
            .ctx
            .sql(&sql)
            .await
            .map_err(|e| Status::invalid_argument(e.to_string()))?;
        let schema: SchemaRef = Arc::new(frame.schema().as_arrow().clone());
        let stream = frame
            .execute_stream()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        let batches = stream.map(|batch| batch.map_err(|e| TallyError::from_execution(e, "-")));
        Ok(Response::new(encode_batches(schema, batches)))
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// Rows and bytes fetched from the sites, across queries until reset.
#[derive(Debug, Default)]
pub struct Shipped {
    /// Rows received.
    pub rows: AtomicUsize,
    /// Flight message bytes received.
    pub bytes: AtomicUsize,
}

impl Shipped {
    /// Reads and zeroes the counters.
    pub fn take(&self) -> (usize, usize) {
        (
            self.rows.swap(0, Ordering::Relaxed),
            self.bytes.swap(0, Ordering::Relaxed),
        )
    }
}

/// A table whose rows live at the sites and are fetched on every scan.
#[derive(Debug)]
pub struct ShippedTable {
    name: String,
    schema: SchemaRef,
    sites: Vec<Channel>,
    shipped: Arc<Shipped>,
}

impl ShippedTable {
    /// Table `name` with `schema`, held by `sites`, counting into `shipped`.
    pub fn new(name: &str, schema: SchemaRef, sites: Vec<Channel>, shipped: Arc<Shipped>) -> Self {
        ShippedTable {
            name: name.to_string(),
            schema,
            sites,
            shipped,
        }
    }
}

#[async_trait::async_trait]
impl TableProvider for ShippedTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> DfResult<Vec<TableProviderFilterPushDown>> {
        Ok(filters
            .iter()
            .map(|_| TableProviderFilterPushDown::Inexact)
            .collect())
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        let schema = match projection {
            Some(columns) => Arc::new(self.schema.project(columns)?),
            None => self.schema.clone(),
        };
        let columns = if schema.fields().is_empty() {
            "1 AS one".to_string()
        } else {
            schema
                .fields()
                .iter()
                .map(|f| format!("\"{}\"", f.name()))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut sql = format!("SELECT {columns} FROM {}", self.name);
        let conditions: Vec<String> = filters
            .iter()
            .filter_map(|f| expr_to_sql(f).ok().map(|e| e.to_string()))
            .collect();
        if !conditions.is_empty() {
            sql.push_str(&format!(" WHERE {}", conditions.join(" AND ")));
        }
        let fetches = self
            .sites
            .iter()
            .map(|site| run_statement(site.clone(), &[], &sql));
        let mut partitions = Vec::new();
        for fetched in futures::future::join_all(fetches).await {
            let fetched = fetched.map_err(|e| DataFusionError::External(Box::new(e)))?;
            let rows: usize = fetched.batches.iter().map(|b| b.num_rows()).sum();
            self.shipped.rows.fetch_add(rows, Ordering::Relaxed);
            self.shipped
                .bytes
                .fetch_add(fetched.wire_bytes, Ordering::Relaxed);
            partitions.push(fetched.batches);
        }
        if schema.fields().is_empty() {
            // Only row counts were wanted (e.g. COUNT(*)): keep the counts, drop the column.
            for batches in &mut partitions {
                for batch in batches.iter_mut() {
                    let rows = batch.num_rows();
                    *batch = arrow::record_batch::RecordBatch::try_new_with_options(
                        schema.clone(),
                        vec![],
                        &arrow::record_batch::RecordBatchOptions::new().with_row_count(Some(rows)),
                    )?;
                }
            }
        }
        Ok(MemorySourceConfig::try_new_exec(&partitions, schema, None)?)
    }
}
