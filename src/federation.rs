//! A whole federation on one machine: a node agent per trust over generated data, and a
//! gateway in front of them. The demo runs on it, and so do the integration tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tally_gateway::{GatewayConfig, GatewayHandle, NodeEndpoint, UserConfig, token_hash};
use tally_node::{NodeConfig, NodeHandle, OptOutConfig, TableConfig, TrustConfig};
use tally_synth::{SynthConfig, TrustSpec, default_trusts};

/// Tables every demo trust serves, by file stem.
pub const DEMO_TABLES: [&str; 3] = ["patients", "episodes", "icd10_chapters"];

/// The analyst account the demo creates.
pub const DEMO_USER: &str = "analyst";

/// The demo analyst's bearer token (loopback only; real deployments list their own users).
pub const DEMO_TOKEN: &str = "tally-demo-token";

/// A running local federation.
pub struct LocalFederation {
    /// The node agents, in trust order.
    pub nodes: Vec<NodeHandle>,
    /// The gateway.
    pub gateway: GatewayHandle,
}

impl LocalFederation {
    /// The gateway's URL for Flight SQL clients.
    pub fn gateway_url(&self) -> String {
        format!("grpc://{}", self.gateway.addr)
    }

    /// Stops the gateway, then every node.
    pub async fn stop(self) {
        self.gateway.stop().await;
        for node in self.nodes {
            node.stop().await;
        }
    }
}

/// The demo analyst's project.
pub const DEMO_PROJECT: &str = "uec-demand";

/// The node config for one trust's generated data under `data_dir`, listening on loopback,
/// deciding with the policy folder `policies`.
pub fn node_config(data_dir: &Path, trust: &TrustSpec, policies: &Path) -> NodeConfig {
    NodeConfig {
        trust: TrustConfig {
            code: trust.code.to_string(),
            name: trust.name.to_string(),
        },
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        audit_log: None,
        policies: policies.to_path_buf(),
        opt_out: Some(OptOutConfig {
            path: data_dir.join(trust.code).join("opt_outs.parquet"),
            patients_table: "patients".into(),
            person_column: "person_id".into(),
        }),
        tables: DEMO_TABLES
            .iter()
            .map(|table| TableConfig {
                name: table.to_string(),
                path: data_dir.join(trust.code).join(format!("{table}.parquet")),
                format: None,
            })
            .collect(),
    }
}

/// A gateway config over `nodes` with the demo analyst, deciding with `policies`.
pub fn gateway_config(
    listen: SocketAddr,
    nodes: &[(String, String, SocketAddr)],
    policies: &Path,
) -> GatewayConfig {
    GatewayConfig {
        listen,
        nodes: nodes
            .iter()
            .map(|(code, name, addr)| NodeEndpoint {
                code: code.clone(),
                name: Some(name.clone()),
                url: format!("http://{addr}"),
            })
            .collect(),
        users: vec![UserConfig {
            name: DEMO_USER.to_string(),
            token_sha256: token_hash(DEMO_TOKEN),
            groups: vec!["analysts".into()],
            projects: vec![DEMO_PROJECT.into(), "cardiac-audit".into()],
            default_project: Some(DEMO_PROJECT.into()),
            default_purpose: Some("planning".into()),
        }],
        users_file: None,
        policies: policies.to_path_buf(),
        connect_timeout_secs: 2.0,
        request_timeout_secs: 30.0,
        catalogue_refresh_secs: 10.0,
        audit_log: None,
    }
}

/// Generates the demo data under `data_dir` unless a complete set is already there.
/// Returns whether it generated.
pub fn ensure_data(data_dir: &Path, patients: usize, seed: u64) -> Result<bool, String> {
    if data_dir.join("manifest.json").exists() {
        return Ok(false);
    }
    tally_synth::generate(data_dir, &SynthConfig { patients, seed }).map_err(|e| e.to_string())?;
    Ok(true)
}

/// Starts a node per default trust over `data_dir` and a gateway on `gateway_listen`, all
/// deciding with the policy folder `policies`.
pub async fn start(
    data_dir: &Path,
    gateway_listen: SocketAddr,
    policies: &Path,
) -> Result<LocalFederation, String> {
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in default_trusts() {
        let node = tally_node::start(&node_config(data_dir, &trust, policies))
            .await
            .map_err(|e| format!("trust {}: {e}", trust.code))?;
        endpoints.push((trust.code.to_string(), trust.name.to_string(), node.addr));
        nodes.push(node);
    }
    let gateway = tally_gateway::start(&gateway_config(gateway_listen, &endpoints, policies))
        .await
        .map_err(|e| e.to_string())?;
    Ok(LocalFederation { nodes, gateway })
}

/// A session over the first trust's tables under `data_dir`: their schemas, for planning
/// queries locally (policy explain, benchmarks). Nothing is served.
pub async fn local_tables(
    data_dir: &Path,
    policies: &Path,
) -> Result<datafusion::prelude::SessionContext, String> {
    let config = node_config(data_dir, &default_trusts()[0], policies);
    let ctx = tally_common::session::new_context().map_err(|e| e.to_string())?;
    let tables = tally_node::tables::open_tables(&ctx, &config.tables, &config.trust.code)
        .await
        .map_err(|e| format!("{e} (generate data with `tally generate`, or pass --data)"))?;
    for (name, table) in tables {
        ctx.register_table(name.as_str(), table)
            .map_err(|e| e.to_string())?;
    }
    Ok(ctx)
}

/// The default policy folder of this repository.
pub fn default_policies() -> PathBuf {
    PathBuf::from("policies")
}

/// Where the demo keeps its data by default.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(".tally").join("demo-data")
}
