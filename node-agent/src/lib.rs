//! Tally node agent: serves one trust's tables over Arrow Flight SQL and answers only with
//! aggregates, whatever it is asked.

pub mod config;
pub mod error;
pub mod service;
pub mod tables;

use std::net::SocketAddr;
use std::sync::Arc;

use tally_common::audit::AuditLog;
use tally_common::flight::TableInfo;
use tally_common::server::RunningServer;

pub use config::{NodeConfig, TableConfig, TableFormat, TrustConfig};
pub use error::NodeError;
pub use service::{NodeAuditRecord, NodeService};

/// A running node agent.
pub struct NodeHandle {
    /// The address it listens on (with the real port when configured with port 0).
    pub addr: SocketAddr,
    /// The trust's audit log.
    pub audit: Arc<AuditLog<NodeAuditRecord>>,
    server: RunningServer,
}

impl NodeHandle {
    /// Stops serving and waits until the listener is closed.
    pub async fn stop(self) {
        self.server.stop().await;
    }

    /// Waits until the server stops (it only stops on error or `stop`).
    pub async fn wait(self) {
        self.server.wait().await;
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
    let server = RunningServer::start(service, config.listen, "node agent")
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = server.addr;
    tracing::info!(trust = %config.trust.code, %addr, "node agent serving Flight SQL");
    Ok(NodeHandle {
        addr,
        audit,
        server,
    })
}
