//! A whole federation on one machine: a node agent per trust over generated data, and a
//! gateway in front of them. The demo runs on it, and so do the integration tests.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use tally_gateway::{
    GatewayConfig, GatewayHandle, GatewayLimits, NodeEndpoint, NodeTlsConfig as GatewayNodeTls,
    TrustPortConfig, UserConfig, token_hash,
};
use tally_node::{
    GatewayLink, IdentityConfig, NodeConfig, NodeHandle, NodeLimits, NodeTlsConfig, OptOutConfig,
    TableConfig, TrustConfig,
};
use tally_synth::{SynthConfig, TrustSpec, default_trusts};

use crate::certs::{CertFolder, GATEWAY_IDENTITY};
use crate::client::GatewayTarget;
use crate::tokens::{IdentityProvider, TokenClaims};

/// How a local federation's links are secured.
#[derive(Debug, Clone)]
pub enum Security {
    /// TLS everywhere with the certificates in this folder (see `tally certs`).
    Tls(CertFolder),
    /// Plaintext on loopback (`--insecure-loopback`).
    InsecureLoopback,
}

impl Security {
    /// TLS with the certificates in `dir`, created there first if any are missing.
    pub fn tls_in(dir: &Path) -> Result<Self, String> {
        let folder = CertFolder {
            dir: dir.to_path_buf(),
        };
        let codes: Vec<&str> = default_trusts().iter().map(|t| t.code).collect();
        if folder.is_complete(&codes) {
            return Ok(Security::Tls(folder));
        }
        crate::certs::create(dir, &codes).map(Security::Tls)
    }
}

/// Tables every demo trust serves, by file stem.
pub const DEMO_TABLES: [&str; 3] = ["patients", "episodes", "icd10_chapters"];

/// The analyst account the demo creates.
pub const DEMO_USER: &str = "analyst";

/// A static bearer token the demo gateway also knows for its analyst. Trusts do not take
/// the gateway's word for who holds it, so it only shows that they refuse it; analysts use
/// the signed token the demo prints ([`LocalFederation::analyst_token`]).
pub const DEMO_STATIC_TOKEN: &str = "tally-demo-token";

/// How long the demo's analyst tokens are valid.
pub const DEMO_TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(12 * 3600);

/// What the demo analyst's token says: approved for `planning` and `research` in
/// `uec-demand` (the default, for planning) and for `research` in `cardiac-audit`.
pub fn demo_claims() -> TokenClaims {
    TokenClaims {
        user: DEMO_USER.into(),
        groups: vec!["analysts".into()],
        approvals: [
            (DEMO_PROJECT, vec!["planning", "research"]),
            ("cardiac-audit", vec!["research"]),
        ]
        .into_iter()
        .map(|(project, purposes)| {
            (
                project.to_string(),
                purposes.into_iter().map(str::to_string).collect(),
            )
        })
        .collect(),
        default_project: Some(DEMO_PROJECT.into()),
        default_purpose: Some("planning".into()),
    }
}

/// A running local federation.
pub struct LocalFederation {
    /// The node agents, in trust order.
    pub nodes: Vec<NodeHandle>,
    /// The gateway.
    pub gateway: GatewayHandle,
    /// How its links are secured.
    pub security: Security,
    /// The identity provider its gateway and trusts trust.
    pub identity_provider: IdentityProvider,
}

impl LocalFederation {
    /// A fresh signed token for the demo analyst.
    pub fn analyst_token(&self) -> Result<String, String> {
        self.identity_provider
            .mint(&demo_claims(), DEMO_TOKEN_LIFETIME)
    }

    /// The gateway's URL for Flight SQL clients.
    pub fn gateway_url(&self) -> String {
        gateway_url(&self.security, self.gateway.addr)
    }

    /// The gateway's URL and the CA to verify it with.
    pub fn gateway_target(&self) -> GatewayTarget {
        GatewayTarget::new(self.gateway_url(), ca_cert(&self.security))
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

/// The URL a gateway at `addr` serves analysts on.
pub fn gateway_url(security: &Security, addr: SocketAddr) -> String {
    match security {
        Security::Tls(_) => format!("grpc+tls://{addr}"),
        Security::InsecureLoopback => format!("grpc://{addr}"),
    }
}

/// The CA analysts' clients verify the gateway with, under TLS.
pub fn ca_cert(security: &Security) -> Option<PathBuf> {
    match security {
        Security::Tls(folder) => Some(folder.ca()),
        Security::InsecureLoopback => None,
    }
}

/// Where a local federation keeps its identity provider.
pub fn identity_provider(data_dir: &Path) -> Result<IdentityProvider, String> {
    IdentityProvider::ensure(&data_dir.join("idp"))
}

/// The node config for one trust's generated data under `data_dir`, listening on loopback,
/// deciding with the policy folder `policies`, secured as `security` says, verifying the
/// tokens of `identity`, keeping its privacy state in `state/<trust code>`.
pub fn node_config(
    data_dir: &Path,
    trust: &TrustSpec,
    policies: &Path,
    security: &Security,
    identity: &IdentityProvider,
    state: &Path,
) -> NodeConfig {
    NodeConfig {
        trust: TrustConfig {
            code: trust.code.to_string(),
            name: trust.name.to_string(),
        },
        listen: Some(SocketAddr::from(([127, 0, 0, 1], 0))),
        gateway: None,
        audit_log: None,
        state_dir: Some(state.join(trust.code)),
        audit_rotate_mb: 64,
        tls: match security {
            Security::Tls(folder) => {
                let leaf = folder.node(trust.code);
                Some(NodeTlsConfig {
                    cert: leaf.cert,
                    key: leaf.key,
                    client_ca: folder.ca(),
                    allowed_gateways: vec![GATEWAY_IDENTITY.to_string()],
                })
            }
            Security::InsecureLoopback => None,
        },
        limits: NodeLimits::default(),
        insecure_loopback: matches!(security, Security::InsecureLoopback),
        policies: policies.to_path_buf(),
        opt_out: Some(OptOutConfig {
            path: data_dir.join(trust.code).join("opt_outs.parquet"),
            patients_table: "patients".into(),
            patient_key: "nhs_number".into(),
            person_column: "person_id".into(),
        }),
        postgres: None,
        tables: DEMO_TABLES
            .iter()
            .map(|table| {
                TableConfig::files(
                    table,
                    data_dir.join(trust.code).join(format!("{table}.parquet")),
                )
            })
            .collect(),
        identity: IdentityConfig {
            jwt: Some(identity.jwt_config()),
            trust_gateway_identity: false,
        },
    }
}

/// A gateway config over `nodes` with the demo analyst, deciding with `policies`, secured
/// as `security` says, keeping its budget ledger in `state`.
pub fn gateway_config(
    listen: SocketAddr,
    nodes: &[(String, String, SocketAddr)],
    policies: &Path,
    security: &Security,
    identity: &IdentityProvider,
    state: &Path,
) -> GatewayConfig {
    let scheme = match security {
        Security::Tls(_) => "grpc+tls",
        Security::InsecureLoopback => "grpc",
    };
    GatewayConfig {
        listen,
        nodes: nodes
            .iter()
            .map(|(code, name, addr)| NodeEndpoint {
                code: code.clone(),
                name: Some(name.clone()),
                url: Some(format!("{scheme}://{addr}")),
                dials_in: false,
                tls_name: None,
            })
            .collect(),
        users: vec![UserConfig {
            name: DEMO_USER.to_string(),
            token_sha256: token_hash(DEMO_STATIC_TOKEN),
            groups: vec!["analysts".into()],
            projects: vec![DEMO_PROJECT.into(), "cardiac-audit".into()],
            purposes: vec!["planning".into(), "research".into()],
            default_project: Some(DEMO_PROJECT.into()),
            default_purpose: Some("planning".into()),
        }],
        users_file: None,
        policies: policies.to_path_buf(),
        connect_timeout_secs: 2.0,
        request_timeout_secs: 30.0,
        catalogue_refresh_secs: 10.0,
        audit_log: None,
        budget_ledger: Some(state.join("gateway-ledger.jsonl")),
        audit_rotate_mb: 64,
        tls: match security {
            Security::Tls(folder) => Some(folder.gateway_server()),
            Security::InsecureLoopback => None,
        },
        node_tls: match security {
            Security::Tls(folder) => {
                let leaf = folder.gateway_client();
                Some(GatewayNodeTls {
                    cert: leaf.cert,
                    key: leaf.key,
                    ca: folder.ca(),
                })
            }
            Security::InsecureLoopback => None,
        },
        trust_port: None,
        jwt: Some(identity.jwt_config()),
        limits: GatewayLimits::default(),
        insecure_loopback: matches!(security, Security::InsecureLoopback),
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
/// deciding with the policy folder `policies`, secured as `security` says, keeping their
/// budget ledgers and stored answers under `state`. Under TLS the last trust's node dials
/// out to the gateway and listens nowhere, as on a network that takes no inbound
/// connection; the gateway dials the others.
pub async fn start(
    data_dir: &Path,
    gateway_listen: SocketAddr,
    policies: &Path,
    security: Security,
    state: &Path,
) -> Result<LocalFederation, String> {
    start_with(
        data_dir,
        gateway_listen,
        policies,
        security,
        state,
        &Limits::default(),
    )
    .await
}

/// The gateway's and every node's limits, for [`start_with`].
#[derive(Debug, Clone, Default)]
pub struct Limits {
    /// The gateway's.
    pub gateway: GatewayLimits,
    /// Every node's.
    pub node: NodeLimits,
}

/// As [`start`], within `limits` (a fuzzer or a load test raises the gateway's rates, say).
pub async fn start_with(
    data_dir: &Path,
    gateway_listen: SocketAddr,
    policies: &Path,
    security: Security,
    state: &Path,
    limits: &Limits,
) -> Result<LocalFederation, String> {
    let identity = identity_provider(data_dir)?;
    let configure = |trust: &TrustSpec| {
        let mut config = node_config(data_dir, trust, policies, &security, &identity, state);
        config.limits = limits.node.clone();
        config
    };
    let mut trusts = default_trusts();
    let dialing = match &security {
        Security::Tls(folder) => trusts.pop().map(|trust| (trust, folder.clone())),
        Security::InsecureLoopback => None,
    };
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in &trusts {
        let node = tally_node::start(&configure(trust))
            .await
            .map_err(|e| format!("trust {}: {e}", trust.code))?;
        let addr = node
            .listen_addr
            .ok_or_else(|| format!("trust {}: the node is not listening", trust.code))?;
        endpoints.push((trust.code.to_string(), trust.name.to_string(), addr));
        nodes.push(node);
    }
    let mut config = gateway_config(
        gateway_listen,
        &endpoints,
        policies,
        &security,
        &identity,
        state,
    );
    config.limits = limits.gateway.clone();
    if let Some((trust, folder)) = &dialing {
        dial_in(&mut config, trust.code, trust.name, folder);
    }
    let gateway = tally_gateway::start(&config)
        .await
        .map_err(|e| e.to_string())?;
    if let (Some((trust, _)), Some(port)) = (&dialing, gateway.trust_port_addr) {
        let mut config = configure(trust);
        config.listen = None;
        config.gateway = Some(dialing_out_to(port));
        let node = tally_node::start(&config)
            .await
            .map_err(|e| format!("trust {}: {e}", trust.code))?;
        nodes.push(node);
        if !gateway.wait_for_trusts(DIAL_IN_WAIT).await {
            return Err(format!(
                "trust {} did not dial in to the gateway within {} s",
                trust.code,
                DIAL_IN_WAIT.as_secs()
            ));
        }
    }
    Ok(LocalFederation {
        nodes,
        gateway,
        security,
        identity_provider: identity,
    })
}

/// How long a local federation waits for its dialing trust to connect.
const DIAL_IN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Adds trust `code` (named `name`) to a gateway config as a trust whose node dials in,
/// and the port it dials (on loopback, with the gateway's server certificate from `folder`).
pub fn dial_in(config: &mut GatewayConfig, code: &str, name: &str, folder: &CertFolder) {
    config.nodes.push(NodeEndpoint {
        code: code.to_string(),
        name: Some(name.to_string()),
        url: None,
        dials_in: true,
        tls_name: None,
    });
    let server = folder.gateway_server();
    config.trust_port = Some(TrustPortConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cert: server.cert,
        key: server.key,
        ca: folder.ca(),
    });
}

/// The `[gateway]` section of a node that dials the gateway's port for trusts at `port`.
pub fn dialing_out_to(port: SocketAddr) -> GatewayLink {
    GatewayLink {
        address: port.to_string(),
        server_name: None,
        proxy: None,
        max_backoff_secs: 8.0,
    }
}

/// A session over the first trust's tables under `data_dir`: their schemas, for planning
/// queries locally (policy explain, benchmarks). Nothing is served.
pub async fn local_tables(
    data_dir: &Path,
    policies: &Path,
) -> Result<datafusion::prelude::SessionContext, String> {
    let config = node_config(
        data_dir,
        &default_trusts()[0],
        policies,
        &Security::InsecureLoopback,
        &IdentityProvider {
            dir: data_dir.join("idp"),
        },
        &data_dir.join("state"),
    );
    let ctx = tally_common::session::new_context().map_err(|e| e.to_string())?;
    let tables = tally_node::tables::open_tables(&ctx, &config.tables, &config.trust.code, None)
        .await
        .map_err(|e| format!("{e} (generate data with `tally generate`, or pass --data)"))?;
    for (name, table) in tables {
        ctx.register_table(name.as_str(), table)
            .map_err(|e| e.to_string())?;
    }
    Ok(ctx)
}

/// The default policy folder, built into the binary: its files by name.
pub const EMBEDDED_POLICIES: [(&str, &str); 4] = [
    ("tally.rego", include_str!("../policies/tally.rego")),
    (
        "tally_test.rego",
        include_str!("../policies/tally_test.rego"),
    ),
    ("catalogue.json", include_str!("../policies/catalogue.json")),
    ("README.md", include_str!("../policies/README.md")),
];

/// The policy folder to use: `explicit` (given with `--policies`), which must exist, or else
/// the default policy built into the binary, written to `<data_dir>/policies` the first time
/// (files already there are kept, so a governance team's edits survive).
pub fn policies_folder(explicit: Option<&Path>, data_dir: &Path) -> Result<PathBuf, String> {
    if let Some(folder) = explicit {
        if !folder.is_dir() {
            return Err(format!("--policies {}: no such folder", folder.display()));
        }
        return Ok(folder.to_path_buf());
    }
    let folder = data_dir.join("policies");
    std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
    for (name, text) in EMBEDDED_POLICIES {
        let path = folder.join(name);
        if !path.exists() {
            std::fs::write(&path, text).map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    Ok(folder)
}

/// Where the demo keeps its data by default.
pub fn default_data_dir() -> PathBuf {
    PathBuf::from(".tally").join("demo-data")
}
