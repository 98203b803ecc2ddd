//! Tally node agent: serves one trust's tables over Arrow Flight SQL and answers only with
//! aggregates, whatever it is asked.

pub mod config;
pub mod error;
pub mod service;
pub mod tables;

use std::net::SocketAddr;
use std::sync::Arc;

use arrow_flight::flight_service_server::FlightServiceServer;
use tally_common::audit::AuditLog;
use tally_common::flight::TableInfo;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;

pub use config::{NodeConfig, TableConfig, TableFormat, TrustConfig};
pub use error::NodeError;
pub use service::{NodeAuditRecord, NodeService};

/// A running node agent.
pub struct NodeHandle {
    /// The address it listens on (with the real port when configured with port 0).
    pub addr: SocketAddr,
    /// The trust's audit log.
    pub audit: Arc<AuditLog<NodeAuditRecord>>,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl NodeHandle {
    /// Stops serving and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops (it only stops on error or `stop`).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Opens the trust's tables and starts serving Flight SQL on `config.listen`.
pub async fn start(config: &NodeConfig) -> Result<NodeHandle, NodeError> {
    let ctx = tally_common::session::new_context().map_err(|e| NodeError::Engine(e.to_string()))?;
    tables::register_tables(&ctx, &config.tables, &config.trust.code).await?;
    let mut table_infos = Vec::new();
    for table in &config.tables {
        let provider = ctx
            .table_provider(table.name.as_str())
            .await
            .map_err(|e| NodeError::Engine(e.to_string()))?;
        table_infos.push(TableInfo {
            name: table.name.clone(),
            schema: provider.schema(),
        });
    }
    let audit = Arc::new(match &config.audit_log {
        Some(path) => AuditLog::open(path).map_err(|source| NodeError::Audit {
            path: path.clone(),
            source,
        })?,
        None => AuditLog::in_memory(),
    });
    let service = NodeService::new(ctx, table_infos, audit.clone());
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: config.listen,
        source,
    })?;
    let (shutdown, stopped) = oneshot::channel::<()>();
    let trust = config.trust.code.clone();
    let task = tokio::spawn(async move {
        let served = tonic::transport::Server::builder()
            .add_service(FlightServiceServer::new(service))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            })
            .await;
        if let Err(err) = served {
            tracing::error!(trust = %trust, error = %err, "node agent stopped");
        }
    });
    tracing::info!(trust = %config.trust.code, %addr, "node agent serving Flight SQL");
    Ok(NodeHandle {
        addr,
        audit,
        shutdown: Some(shutdown),
        task,
    })
}
