//! Tally gateway: answers analysts' SQL with aggregates computed where the data lives.
//!
//! Stage by stage, one file each: `parse` (SQL to a DataFusion plan), `lower` (aggregates over
//! the trusts' tables to releases of the query model, refusing what the model cannot say),
//! decide (`tally_common::admission`, the policy over the model), `send` (each release to
//! every trust), `merge` (the trusts' partials) and `release` (the plan leaf that applies
//! disclosure control); `engine` runs them in order and audits.

pub mod auth;
pub mod budget;
pub mod catalogue;
pub mod checked;
pub mod config;
pub mod dial_in;
pub mod engine;
pub mod error;
pub mod limits;
pub mod lower;
pub mod merge;
pub mod parse;
pub mod planned;
pub mod release;
pub mod send;
pub mod service;
pub mod trusts;

use std::net::SocketAddr;
use std::sync::Arc;

use tally_common::audit::AuditLog;
use tally_common::policy::Policy;
use tally_common::server::{RunningServer, Transport};
use tally_common::tls::ServerTls;
use tokio::task::JoinHandle;

pub use auth::{Users, token_hash};
pub use config::{
    GatewayConfig, GatewayLimits, NodeEndpoint, NodeTlsConfig, TrustPortConfig, UserConfig,
    default_node_name,
};
pub use engine::{Caller, Explanation, Gateway, GatewayAuditRecord, QueryOutcome};
pub use error::GatewayError;
pub use service::{BUDGET_ACTION, GatewayService, POLICY_VERSION_HEADER, TRUSTS_HEADER};
pub use tally_common::identity::{Identity, JwtConfig, JwtVerifier};

/// How often the policy folder is checked for changes.
const POLICY_POLL: std::time::Duration = std::time::Duration::from_secs(1);

use catalogue::Catalogue;
use trusts::Trust;

/// A running gateway.
pub struct GatewayHandle {
    /// The address analysts connect to (with the real port when configured with port 0).
    pub addr: SocketAddr,
    /// The engine, for in-process use and inspection.
    pub gateway: Arc<Gateway>,
    /// The address of the port for trusts that dial in, when there is one.
    pub trust_port_addr: Option<SocketAddr>,
    server: RunningServer,
    trust_port: Option<dial_in::TrustPort>,
    refresher: JoinHandle<()>,
    policy_watcher: JoinHandle<()>,
}

impl GatewayHandle {
    /// Stops serving and waits until the listener is closed; the connections of trusts
    /// that dial in are closed.
    pub async fn stop(self) {
        self.refresher.abort();
        self.policy_watcher.abort();
        if let Some(port) = &self.trust_port {
            port.stop();
        }
        self.server.stop().await;
    }

    /// Waits up to `timeout` for every trust to be available (those that dial in have
    /// connected); returns whether they all are.
    pub async fn wait_for_trusts(&self, timeout: std::time::Duration) -> bool {
        self.gateway.catalogue().wait_until_complete(timeout).await
    }

    /// Waits until the server stops.
    pub async fn wait(self) {
        self.server.wait().await;
    }
}

/// Builds the catalogue from the nodes (those that are down are marked unavailable and
/// retried) and starts serving Flight SQL on `config.listen`.
pub async fn start(config: &GatewayConfig) -> Result<GatewayHandle, GatewayError> {
    config.validate().map_err(GatewayError::Invalid)?;
    let mut dial_ins = Vec::new();
    let mut trusts = Vec::new();
    for node in &config.nodes {
        trusts.push(if node.dials_in {
            let dial_in = Arc::new(dial_in::DialIn::new(&node.code));
            dial_ins.push((node.expected_name(), dial_in.clone()));
            Trust::dialing_in(node, dial_in, config.request_timeout())
        } else {
            Trust::new(
                node,
                config.node_tls.as_ref(),
                config.connect_timeout(),
                config.request_timeout(),
            )?
        });
    }
    let jwt = config
        .jwt
        .as_ref()
        .map(|jwt| {
            JwtVerifier::load(jwt).map_err(|reason| GatewayError::Jwks {
                path: jwt.jwks.clone(),
                reason,
            })
        })
        .transpose()?;
    let transport = match &config.tls {
        Some(files) => Transport::Tls(
            ServerTls::server_only(files).map_err(|e| GatewayError::Tls(e.to_string()))?,
            Arc::new(|_| {}),
        ),
        None => Transport::InsecureLoopback,
    };
    let catalogue = Arc::new(Catalogue::new(trusts));
    let snapshot = catalogue.refresh().await;
    for ((_, status), trust) in snapshot.trusts.iter().zip(catalogue.trusts()) {
        match status {
            catalogue::TrustStatus::Unavailable(_) if trust.dials_in() => {
                tracing::info!(trust = %trust.code, "waiting for the trust's node to dial in");
            }
            catalogue::TrustStatus::Unavailable(err) => {
                tracing::warn!(error = %err, "starting without this trust; it will be asked again");
            }
            catalogue::TrustStatus::Available(_) => {}
        }
    }
    let audit = Arc::new(match &config.audit_log {
        Some(path) => AuditLog::open(path, config.audit_rotate_bytes()).map_err(|source| {
            GatewayError::Audit {
                path: path.clone(),
                source,
            }
        })?,
        None => AuditLog::in_memory(),
    });
    let policy =
        Arc::new(Policy::load(&config.policies).map_err(|e| GatewayError::Policy(e.to_string()))?);
    let budget = budget::Budget::open(config.budget_ledger.as_deref())
        .map_err(|e| GatewayError::Ledger(e.to_string()))?;
    if config.budget_ledger.is_none()
        && policy.snapshot().governance().settings.privacy.noise
            != tally_common::governance::Noise::Off
    {
        return Err(GatewayError::Ledger(
            "the policy adds noise, so the gateway needs budget_ledger in its config".into(),
        ));
    }
    let policy_watcher = policy.watch(POLICY_POLL);
    let gateway = Arc::new(Gateway::new(
        catalogue.clone(),
        policy,
        audit,
        budget,
        &config.limits,
    )?);
    let trust_port = match &config.trust_port {
        Some(port) => Some(
            dial_in::TrustPort::start(
                port,
                dial_ins,
                catalogue.clone(),
                gateway.audit().clone(),
                config.connect_timeout(),
                config.request_timeout(),
            )
            .await?,
        ),
        None => None,
    };
    let service = GatewayService::new(gateway.clone(), Users::new(config.users.clone(), jwt));
    let server = RunningServer::start(service, config.listen, "gateway", transport)
        .await
        .map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = server.addr;
    let refresh_every = config.catalogue_refresh();
    let refresher = tokio::spawn(async move {
        let mut ticks = tokio::time::interval(refresh_every);
        ticks.tick().await;
        loop {
            ticks.tick().await;
            catalogue.refresh_if_incomplete().await;
        }
    });
    tracing::info!(%addr, "gateway serving Flight SQL");
    Ok(GatewayHandle {
        addr,
        gateway,
        trust_port_addr: trust_port.as_ref().map(|port| port.addr),
        server,
        trust_port,
        refresher,
        policy_watcher,
    })
}
