//! The gateway's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_common::identity::JwtConfig;
use tally_common::queue::QueueLimits;
use tally_common::tls::{CertificateFiles, require_loopback};

use crate::error::GatewayError;

/// A gateway's configuration (`tally gateway --config gateway.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// Address analysts connect to with Flight SQL.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The trusts' node agents.
    pub nodes: Vec<NodeEndpoint>,
    /// Analysts allowed to query, with the SHA-256 of their bearer token.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A TOML file of further `[[users]]`, relative to this file.
    #[serde(default)]
    pub users_file: Option<PathBuf>,
    /// The gateway's policy folder (`.rego` files and JSON data), relative to this file.
    pub policies: PathBuf,
    /// Seconds to wait for a node's connection to open.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_secs: f64,
    /// Seconds to wait for a node to answer one per-trust query.
    #[serde(default = "default_request_timeout")]
    pub request_timeout_secs: f64,
    /// Seconds between catalogue refreshes of nodes that were down.
    #[serde(default = "default_refresh")]
    pub catalogue_refresh_secs: f64,
    /// Append-only JSON-lines audit log; none if absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// The privacy-budget ledger (JSON lines, hash-chained like the audit log); required
    /// when the policy adds noise. Never delete it: it is what stops a budget resetting.
    #[serde(default)]
    pub budget_ledger: Option<PathBuf>,
    /// Rotate the audit log before it grows past this many MiB (0: never).
    #[serde(default = "default_rotate_mb")]
    pub audit_rotate_mb: u64,
    /// The certificate analysts' clients verify; required unless `--insecure-loopback`.
    #[serde(default)]
    pub tls: Option<CertificateFiles>,
    /// The gateway's side of mutual TLS with the nodes (for `grpc+tls://` node URLs).
    #[serde(default)]
    pub node_tls: Option<NodeTlsConfig>,
    /// The port trusts whose nodes dial in connect to (`dials_in = true`).
    #[serde(default)]
    pub trust_port: Option<TrustPortConfig>,
    /// Signed JWTs accepted as bearer tokens, besides the listed users' tokens.
    #[serde(default)]
    pub jwt: Option<JwtConfig>,
    /// Limits that protect the trusts.
    #[serde(default)]
    pub limits: GatewayLimits,
    /// Serve analysts and reach nodes in plaintext on loopback (set by
    /// `--insecure-loopback`, never by the file).
    #[serde(skip)]
    pub insecure_loopback: bool,
}

/// The gateway's client certificate and the CA that signs the nodes' certificates.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// The gateway's client certificate chain (PEM); its common name is the identity
    /// nodes list in `allowed_gateways`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA the nodes' certificates must chain to (PEM).
    pub ca: PathBuf,
}

impl NodeTlsConfig {
    /// The gateway's client certificate and key.
    pub fn identity(&self) -> CertificateFiles {
        CertificateFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// The gateway's port for trusts whose nodes dial in (`[trust_port]`): mutual TLS, where
/// each node's certificate says which trust it is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustPortConfig {
    /// Address the nodes dial.
    pub listen: SocketAddr,
    /// The certificate the nodes verify (PEM): it carries the name they dial and an
    /// identity in their `allowed_gateways`.
    pub cert: PathBuf,
    /// Its private key (PEM).
    pub key: PathBuf,
    /// The CA the nodes' certificates must chain to (PEM).
    pub ca: PathBuf,
}

/// Limits on what analysts can ask of the trusts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLimits {
    /// Queries one user may run per minute.
    #[serde(default = "default_user_rate")]
    pub queries_per_minute_per_user: u32,
    /// Queries one project may run per minute, across its users.
    #[serde(default = "default_project_rate")]
    pub queries_per_minute_per_project: u32,
    /// Longest SQL text accepted, in bytes.
    #[serde(default = "default_max_sql")]
    pub max_sql_bytes: usize,
    /// Deepest logical plan accepted (nested subqueries, joins, expressions).
    #[serde(default = "default_max_depth")]
    pub max_plan_depth: usize,
    /// Seconds one query may take at the gateway, end to end (waiting for a slot included).
    #[serde(default = "default_query_timeout")]
    pub query_timeout_secs: f64,
    /// Queries reaching the trusts at once.
    #[serde(default = "default_running")]
    pub max_running_queries: usize,
    /// Queries one user of one project may run at once.
    #[serde(default = "default_running_per_user")]
    pub max_running_per_user: usize,
    /// Queries waiting for a slot; more are refused (`E_BUSY`) rather than queued.
    #[serde(default = "default_waiting")]
    pub max_waiting_queries: usize,
    /// Queries one user of one project may have waiting; more are refused (`E_BUSY`).
    #[serde(default = "default_waiting_per_user")]
    pub max_waiting_per_user: usize,
}

impl Default for GatewayLimits {
    fn default() -> Self {
        GatewayLimits {
            queries_per_minute_per_user: default_user_rate(),
            queries_per_minute_per_project: default_project_rate(),
            max_sql_bytes: default_max_sql(),
            max_plan_depth: default_max_depth(),
            query_timeout_secs: default_query_timeout(),
            max_running_queries: default_running(),
            max_running_per_user: default_running_per_user(),
            max_waiting_queries: default_waiting(),
            max_waiting_per_user: default_waiting_per_user(),
        }
    }
}

impl GatewayLimits {
    /// The end-to-end time limit of one query.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.query_timeout_secs)
    }

    /// How many queries run and wait, per user of a project and in all: each user of each
    /// project is served in turn.
    pub fn admission(&self) -> QueueLimits {
        QueueLimits {
            running: self.max_running_queries,
            running_per_tenant: self.max_running_per_user,
            waiting: self.max_waiting_queries,
            waiting_per_tenant: self.max_waiting_per_user,
        }
    }
}

fn default_running() -> usize {
    32
}

fn default_running_per_user() -> usize {
    8
}

fn default_waiting() -> usize {
    256
}

fn default_waiting_per_user() -> usize {
    32
}

fn default_user_rate() -> u32 {
    60
}

fn default_project_rate() -> u32 {
    600
}

fn default_max_sql() -> usize {
    crate::parse::MAX_SQL_BYTES
}

fn default_max_depth() -> usize {
    crate::parse::MAX_PLAN_DEPTH
}

fn default_query_timeout() -> f64 {
    120.0
}

fn default_rotate_mb() -> u64 {
    64
}

/// One trust's node agent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeEndpoint {
    /// The trust's code, e.g. `RXA`.
    pub code: String,
    /// Human-readable trust name (for messages).
    #[serde(default)]
    pub name: Option<String>,
    /// Flight SQL URL of the node: `grpc+tls://host:port` (mutual TLS), or `grpc://` on
    /// loopback with `--insecure-loopback`. None for a trust whose node dials in.
    #[serde(default)]
    pub url: Option<String>,
    /// The trust's node dials in to the `[trust_port]` instead of being dialed, for a
    /// trust whose network takes no inbound connection.
    #[serde(default)]
    pub dials_in: bool,
    /// The name the node's certificate must carry (default: `<code>.node.tally`, lower case).
    #[serde(default)]
    pub tls_name: Option<String>,
}

impl NodeEndpoint {
    /// Whether the URL asks for TLS.
    pub fn uses_tls(&self) -> bool {
        self.url
            .as_deref()
            .is_some_and(|url| url.starts_with("grpc+tls://") || url.starts_with("https://"))
    }

    /// The name the node's certificate must carry.
    pub fn expected_name(&self) -> String {
        self.tls_name
            .clone()
            .unwrap_or_else(|| default_node_name(&self.code))
    }

    /// The host part of the URL.
    fn host(&self) -> &str {
        let url = self.url.as_deref().unwrap_or_default();
        let rest = url.split_once("://").map_or("", |(_, rest)| rest);
        let authority = rest.split('/').next().unwrap_or_default();
        match authority.rsplit_once(':') {
            Some((host, port)) if port.chars().all(|c| c.is_ascii_digit()) => host,
            _ => authority,
        }
    }
}

/// The certificate name a trust's node carries unless configured otherwise.
pub fn default_node_name(code: &str) -> String {
    format!("{}.node.tally", code.to_ascii_lowercase())
}

/// One analyst account.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// User name (also the Basic-auth user name).
    pub name: String,
    /// Hex SHA-256 of the user's token; the token itself is never stored.
    pub token_sha256: String,
    /// Groups, passed to the policy.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Projects the user may query for.
    #[serde(default)]
    pub projects: Vec<String>,
    /// Purposes the user is approved for, in each of those projects (the project's own
    /// approved purposes are checked by the policy as well).
    #[serde(default = "default_purposes")]
    pub purposes: Vec<String>,
    /// Project used when a request names none.
    #[serde(default)]
    pub default_project: Option<String>,
    /// Purpose used when a request names none.
    #[serde(default)]
    pub default_purpose: Option<String>,
}

fn default_purposes() -> Vec<String> {
    vec!["planning".into(), "research".into()]
}

/// A users file: `[[users]]` entries only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct UsersFile {
    users: Vec<UserConfig>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50050))
}

fn default_connect_timeout() -> f64 {
    2.0
}

fn default_request_timeout() -> f64 {
    30.0
}

fn default_refresh() -> f64 {
    10.0
}

impl GatewayConfig {
    /// Reads and validates a config file; a relative audit path is relative to its folder.
    pub fn load(path: &Path) -> Result<Self, GatewayError> {
        let fail = |reason: String| GatewayError::Config {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
        let mut config: GatewayConfig = toml::from_str(&text).map_err(|e| fail(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        if let Some(ledger) = &mut config.budget_ledger
            && ledger.is_relative()
        {
            *ledger = base.join(&*ledger);
        }
        if let Some(log) = &mut config.audit_log
            && log.is_relative()
        {
            *log = base.join(&*log);
        }
        if config.policies.is_relative() {
            config.policies = base.join(&config.policies);
        }
        for files in [config.tls.as_mut()].into_iter().flatten() {
            files.resolve(base);
        }
        if let Some(port) = &mut config.trust_port {
            for file in [&mut port.cert, &mut port.key, &mut port.ca] {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        if let Some(node_tls) = &mut config.node_tls {
            for file in [&mut node_tls.cert, &mut node_tls.key, &mut node_tls.ca] {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        if let Some(jwt) = &mut config.jwt
            && jwt.jwks.is_relative()
        {
            jwt.jwks = base.join(&jwt.jwks);
        }
        if let Some(file) = &config.users_file {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(format!("users file {}: {e}", file.display())))?;
            let users: UsersFile = toml::from_str(&text)
                .map_err(|e| fail(format!("users file {}: {e}", file.display())))?;
            config.users.extend(users.users);
        }
        config.validate_fields().map_err(fail)?;
        Ok(config)
    }

    /// Checks everything, including that plaintext is only used as `--insecure-loopback`
    /// allows (run by `start`, after command-line flags are applied).
    pub fn validate(&self) -> Result<(), String> {
        self.validate_fields()?;
        for node in &self.nodes {
            self.validate_node_url(node)?;
        }
        if self.tls.is_none() && !self.insecure_loopback {
            return Err(
                "no [tls] section: give the gateway a certificate for analysts, or pass --insecure-loopback to serve plaintext on loopback".into(),
            );
        }
        Ok(())
    }

    /// Checks what TOML types cannot: durations, duplicates, hashes, limits.
    fn validate_fields(&self) -> Result<(), String> {
        for (name, secs) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("request_timeout_secs", self.request_timeout_secs),
            ("catalogue_refresh_secs", self.catalogue_refresh_secs),
            ("limits.query_timeout_secs", self.limits.query_timeout_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                return Err(format!("{name} must be between 0 and 86400 seconds"));
            }
        }
        self.limits.admission().validate().map_err(|e| {
            format!("limits: {e} (max_running_queries, max_running_per_user, max_waiting_queries, max_waiting_per_user)")
        })?;
        if self.nodes.is_empty() {
            return Err("at least one [[nodes]] entry is required".into());
        }
        let mut codes = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for node in &self.nodes {
            if !codes.insert(node.code.as_str()) {
                return Err(format!("trust '{}' is listed twice", node.code));
            }
            // A certificate names one trust: two trusts expecting the same name could each
            // pass for the other.
            if !names.insert(node.expected_name().to_lowercase()) {
                return Err(format!(
                    "trust '{}' expects the certificate name '{}', as another trust does",
                    node.code,
                    node.expected_name()
                ));
            }
        }
        let limits = &self.limits;
        if limits.queries_per_minute_per_user == 0
            || limits.queries_per_minute_per_project == 0
            || limits.max_sql_bytes == 0
            || limits.max_plan_depth == 0
        {
            return Err("limits must be at least 1".into());
        }
        for user in &self.users {
            let valid = user.token_sha256.len() == 64
                && user.token_sha256.chars().all(|c| c.is_ascii_hexdigit());
            if !valid {
                return Err(format!(
                    "user '{}': token_sha256 must be 64 hex digits",
                    user.name
                ));
            }
        }
        Ok(())
    }

    /// Either a node that dials in, with a `[trust_port]`, or a URL: `grpc+tls://` with a
    /// `[node_tls]` section, or plaintext to loopback when started with
    /// `--insecure-loopback`.
    fn validate_node_url(&self, node: &NodeEndpoint) -> Result<(), String> {
        let url = match (&node.url, node.dials_in) {
            (None, true) if self.trust_port.is_some() => return Ok(()),
            (None, true) => {
                return Err(format!(
                    "node {} dials in, but there is no [trust_port] section to dial",
                    node.code
                ));
            }
            (Some(_), true) => {
                return Err(format!(
                    "node {}: give a url or dials_in = true, not both",
                    node.code
                ));
            }
            (None, false) => {
                return Err(format!(
                    "node {} needs a url, or dials_in = true for a node that dials the gateway",
                    node.code
                ));
            }
            (Some(url), false) => url,
        };
        if node.uses_tls() {
            if self.node_tls.is_none() {
                return Err(format!(
                    "node {} uses TLS but there is no [node_tls] section",
                    node.code
                ));
            }
            return Ok(());
        }
        let plaintext = ["grpc://", "grpc+tcp://", "http://"];
        if !plaintext.iter().any(|scheme| url.starts_with(scheme)) {
            return Err(format!(
                "node url '{url}' must start with grpc+tls:// (or grpc:// with --insecure-loopback)"
            ));
        }
        if !self.insecure_loopback {
            return Err(format!(
                "node {} is plaintext ({url}); use grpc+tls://, or pass --insecure-loopback for loopback nodes",
                node.code
            ));
        }
        require_loopback(node.host()).map_err(|e| format!("node {}: {e}", node.code))
    }

    /// The audit log's rotation size in bytes, if it rotates.
    pub fn audit_rotate_bytes(&self) -> Option<u64> {
        (self.audit_rotate_mb > 0).then(|| self.audit_rotate_mb.saturating_mul(1024 * 1024))
    }

    /// Connect timeout as a duration.
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout_secs)
    }

    /// Per-trust request timeout as a duration.
    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.request_timeout_secs)
    }

    /// Catalogue refresh interval as a duration.
    pub fn catalogue_refresh(&self) -> Duration {
        Duration::from_secs_f64(self.catalogue_refresh_secs)
    }
}
