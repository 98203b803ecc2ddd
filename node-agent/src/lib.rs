//! Tally node agent: serves one trust's tables over Arrow Flight SQL and answers only with
//! aggregates, whatever it is asked.

pub mod budget;
pub mod config;
pub mod cost;
pub mod dial_out;
pub mod error;
pub mod execution;
pub mod identity;
pub mod opt_out;
pub mod postgres;
pub mod protect;
pub mod pushdown;
pub mod release;
pub mod service;
pub mod tables;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;

use tally_common::audit::AuditLog;
use tally_common::flight::TableInfo;
use tally_common::policy::Policy;
use tally_common::server::{DialedServer, RunningServer, Transport};
use tally_common::tls::{RefusedConnection, ServerTls};

pub use config::{
    GatewayLink, IdentityConfig, NodeConfig, NodeLimits, NodeTlsConfig, OptOutConfig,
    PostgresConfig, TableConfig, TableFormat, TrustConfig,
};
pub use error::NodeError;
pub use service::{Contexts, NodeAuditRecord, NodeService};

/// How often the policy folder is checked for changes.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

/// A running node agent.
pub struct NodeHandle {
    /// The address it listens on (with the real port when configured with port 0); none
    /// for a node that only dials out to its gateway.
    pub listen_addr: Option<SocketAddr>,
    /// The trust's audit log.
    pub audit: Arc<AuditLog<NodeAuditRecord>>,
    /// The trust's policy (reloaded when its files change or on SIGHUP).
    pub policy: Arc<Policy>,
    /// The queue its queries wait in for a running slot.
    pub queue: Arc<tally_common::queue::FairQueue>,
    server: Option<RunningServer>,
    dial_out: Option<DialOut>,
    watcher: tokio::task::JoinHandle<()>,
}

/// A node's connection to its gateway: the task that dials, the server on what it dials.
struct DialOut {
    dialing: tokio::task::JoinHandle<()>,
    server: DialedServer,
}

impl NodeHandle {
    /// Stops serving and waits until the listener and the gateway's connection are closed.
    pub async fn stop(self) {
        self.watcher.abort();
        if let Some(dial_out) = self.dial_out {
            dial_out.dialing.abort();
            let _ = dial_out.dialing.await;
            dial_out.server.stop().await;
        }
        if let Some(server) = self.server {
            server.stop().await;
        }
    }

    /// Waits until the node stops serving (only on error or `stop`).
    pub async fn wait(self) {
        match (self.server, self.dial_out) {
            (Some(server), _) => server.wait().await,
            (None, Some(dial_out)) => {
                let _ = dial_out.dialing.await;
            }
            (None, None) => {}
        }
    }
}

/// Opens the trust's tables, its policy and its opt-out list, and starts serving Flight
/// SQL on `config.listen`, on its connection to the gateway (`[gateway]`), or both.
pub async fn start(config: &NodeConfig) -> Result<NodeHandle, NodeError> {
    let engine = |e: datafusion::error::DataFusionError| NodeError::Engine(e.to_string());
    let runtime = tally_common::session::memory_limited_runtime(config.limits.memory_limit_bytes())
        .map_err(engine)?;
    let full = tally_common::session::new_context_in(runtime.clone()).map_err(engine)?;
    let opted_out = tally_common::session::new_context_in(runtime).map_err(engine)?;
    // Start-up work (reading schemas, matching the opt-out list) is not a query: it runs
    // outside the queries' memory limit.
    let setup = tally_common::session::new_context().map_err(engine)?;
    let database = match &config.postgres {
        Some(postgres) => Some(Arc::new(postgres::PgDatabase::new(
            postgres,
            config.limits.query_timeout(),
        )?)),
        None => None,
    };
    let tables = tables::open_tables(
        &setup,
        &config.tables,
        &config.trust.code,
        database.as_ref(),
    )
    .await?;
    let policy =
        Arc::new(Policy::load(&config.policies).map_err(|e| NodeError::Policy(e.to_string()))?);
    let tables = match &config.state_dir {
        Some(dir) => {
            let snapshot = policy.snapshot();
            let unit_of = |name: &str| {
                snapshot
                    .governance()
                    .table(name)
                    .and_then(|t| t.privacy_unit.clone())
            };
            tables::cluster(&setup, tables, &unit_of, &dir.join("clustered")).await?
        }
        None => tables,
    };
    for (name, table) in &tables {
        full.register_table(name.as_str(), table.clone())
            .map_err(engine)?;
    }
    let excluded = match &config.opt_out {
        Some(opt_out) => {
            for (name, table) in &tables {
                setup
                    .register_table(name.as_str(), table.clone())
                    .map_err(engine)?;
            }
            Some(Arc::new(opt_out::load(&setup, opt_out).await?))
        }
        None => None,
    };
    for (name, table) in &tables {
        let table = match &excluded {
            Some(excluded) => Arc::new(table.excluding(excluded)),
            None => table.clone(),
        };
        opted_out
            .register_table(name.as_str(), table)
            .map_err(engine)?;
    }
    let table_infos = tables
        .iter()
        .map(|(name, table)| TableInfo {
            name: name.clone(),
            schema: datafusion::catalog::TableProvider::schema(table.as_ref()),
        })
        .collect();
    let audit = Arc::new(match &config.audit_log {
        Some(path) => AuditLog::open(path, config.audit_rotate_bytes()).map_err(|source| {
            NodeError::Audit {
                path: path.clone(),
                source,
            }
        })?,
        None => AuditLog::in_memory(),
    });
    let identity = Arc::new(identity::NodeIdentity::load(&config.identity)?);
    let fingerprints: Vec<String> = tables
        .iter()
        .map(|(name, table)| format!("{name}:{}", table.fingerprint()))
        .collect();
    let data_version =
        budget::data_version(&fingerprints, config.opt_out.as_ref().map(|o| &o.path));
    let privacy = match &config.state_dir {
        Some(dir) => Some(Arc::new(
            budget::PrivacyState::open(dir, data_version)
                .map_err(|e| NodeError::State(format!("{}: {e}", dir.display())))?,
        )),
        None if policy.snapshot().governance().settings.privacy.noise
            == tally_common::governance::Noise::Off =>
        {
            None
        }
        None => {
            return Err(NodeError::State(
                "the policy adds noise, so the node needs state_dir for its budget ledger".into(),
            ));
        }
    };
    let execution = Arc::new(
        execution::Execution::new(&config.limits)
            .map_err(|e| NodeError::Engine(format!("the query runtime: {e}")))?,
    );
    let service = NodeService::new(
        config.trust.code.clone(),
        identity,
        Contexts {
            full,
            opted_out: excluded.is_some().then_some(opted_out),
        },
        table_infos,
        policy.clone(),
        audit.clone(),
        execution.clone(),
        privacy,
    );
    let flight = wire::NodeFlight::new(service);
    let server = match config.listen_addr() {
        Some(addr) => Some(
            RunningServer::start(
                flight.clone(),
                addr,
                "node agent",
                transport(config, &audit)?,
            )
            .await
            .map_err(|source| NodeError::Bind { addr, source })?,
        ),
        None => None,
    };
    let dial_out = match (&config.gateway, &config.tls) {
        (Some(link), Some(tls)) => {
            let dialer = dial_out::Dialer::new(link, tls)?;
            let (connections, incoming) = tokio::sync::mpsc::channel(1);
            Some(DialOut {
                server: DialedServer::start(flight, incoming, "node agent (dialed out)"),
                dialing: dialer.spawn(connections, audit.clone()),
            })
        }
        (Some(_), None) => {
            return Err(NodeError::Tls(
                "[gateway] needs the [tls] section: a node dials out over mutual TLS only".into(),
            ));
        }
        (None, _) => None,
    };
    let listen_addr = server.as_ref().map(|s| s.addr);
    let watcher = policy.watch(POLICY_POLL);
    match (&listen_addr, &config.gateway) {
        (Some(addr), _) => {
            tracing::info!(trust = %config.trust.code, %addr, policy = %policy.version(), "node agent serving Flight SQL")
        }
        (None, Some(link)) => {
            tracing::info!(trust = %config.trust.code, gateway = %link.address, policy = %policy.version(), "node agent dialing out to its gateway, listening nowhere")
        }
        (None, None) => {}
    }
    Ok(NodeHandle {
        listen_addr,
        audit,
        policy,
        queue: execution.queue().clone(),
        server,
        dial_out,
        watcher,
    })
}

/// Mutual TLS from the `[tls]` section (refused connections go to the audit log), or
/// plaintext on loopback when started with `--insecure-loopback`.
fn transport(
    config: &NodeConfig,
    audit: &Arc<AuditLog<NodeAuditRecord>>,
) -> Result<Transport, NodeError> {
    let Some(tls) = &config.tls else {
        if config.insecure_loopback {
            return Ok(Transport::InsecureLoopback);
        }
        return Err(NodeError::Tls(
            "no [tls] section: configure mutual TLS, or pass --insecure-loopback to serve plaintext on loopback".into(),
        ));
    };
    let server = ServerTls::mutual(
        &tls.identity(),
        &tls.client_ca,
        tls.allowed_gateways.clone(),
        "an allowed gateway",
    )
    .map_err(|e| NodeError::Tls(e.to_string()))?;
    let audit = audit.clone();
    // Written by the audit log's group commit, off the handshake's task.
    let on_refused = Arc::new(move |refused: RefusedConnection| {
        let (audit, record) = (audit.clone(), NodeAuditRecord::refused_connection(&refused));
        tokio::spawn(async move {
            let _ = audit.write(record).await;
        });
    });
    Ok(Transport::Tls(server, on_refused))
}
