//! The gateway's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

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
    /// Flight SQL URL of the node, e.g. `http://127.0.0.1:50051`.
    pub url: String,
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
    /// Project used when a request names none.
    #[serde(default)]
    pub default_project: Option<String>,
    /// Purpose used when a request names none.
    #[serde(default)]
    pub default_purpose: Option<String>,
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
        if let Some(log) = &mut config.audit_log
            && log.is_relative()
        {
            *log = base.join(&*log);
        }
        if config.policies.is_relative() {
            config.policies = base.join(&config.policies);
        }
        if let Some(file) = &config.users_file {
            let file = base.join(file);
            let text = std::fs::read_to_string(&file)
                .map_err(|e| fail(format!("users file {}: {e}", file.display())))?;
            let users: UsersFile = toml::from_str(&text)
                .map_err(|e| fail(format!("users file {}: {e}", file.display())))?;
            config.users.extend(users.users);
        }
        config.validate().map_err(fail)?;
        Ok(config)
    }

    /// Checks what TOML types cannot: durations, duplicates, hashes.
    pub fn validate(&self) -> Result<(), String> {
        for (name, secs) in [
            ("connect_timeout_secs", self.connect_timeout_secs),
            ("request_timeout_secs", self.request_timeout_secs),
            ("catalogue_refresh_secs", self.catalogue_refresh_secs),
        ] {
            if !(secs.is_finite() && secs > 0.0 && secs <= 86_400.0) {
                return Err(format!("{name} must be between 0 and 86400 seconds"));
            }
        }
        if self.nodes.is_empty() {
            return Err("at least one [[nodes]] entry is required".into());
        }
        let mut codes = std::collections::BTreeSet::new();
        for node in &self.nodes {
            if !codes.insert(node.code.as_str()) {
                return Err(format!("trust '{}' is listed twice", node.code));
            }
            // TLS to the nodes (grpc+tls://) arrives with mutual TLS; plaintext until then.
            let schemes = ["grpc://", "grpc+tcp://", "http://"];
            if !schemes.iter().any(|scheme| node.url.starts_with(scheme)) {
                return Err(format!(
                    "node url '{}' must start with grpc:// or http:// (TLS is not supported yet)",
                    node.url
                ));
            }
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
