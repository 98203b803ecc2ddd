//! The node agent's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tally_common::queue::QueueLimits;
use tally_common::tls::CertificateFiles;

use crate::error::NodeError;

/// A node agent's configuration (`tally node --config node.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The trust this node serves.
    pub trust: TrustConfig,
    /// Address the Flight SQL service listens on. Without it, a node that dials the gateway
    /// (`[gateway]`) listens nowhere, and any other node listens on 127.0.0.1:50051.
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Dial out to the gateway and serve it on that connection, for a trust that accepts no
    /// inbound connection.
    #[serde(default)]
    pub gateway: Option<GatewayLink>,
    /// Append-only JSON-lines audit log of every request; none if absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// The folder of the trust's privacy state: its budget ledger, stored noisy answers and
    /// contribution-bounding key (relative to this file). Required when the policy adds
    /// noise; keep it on durable storage and back it up with the audit log.
    #[serde(default)]
    pub state_dir: Option<PathBuf>,
    /// Rotate the audit log before it grows past this many MiB (0: never).
    #[serde(default = "default_rotate_mb")]
    pub audit_rotate_mb: u64,
    /// Mutual TLS with the gateway; required unless started with `--insecure-loopback`.
    #[serde(default)]
    pub tls: Option<NodeTlsConfig>,
    /// Limits that protect the trust's machine.
    #[serde(default)]
    pub limits: NodeLimits,
    /// Serve plaintext on a loopback address instead of TLS (set by `--insecure-loopback`,
    /// never by the file).
    #[serde(skip)]
    pub insecure_loopback: bool,
    /// The trust's own policy folder (`.rego` files and JSON data); relative to this file.
    pub policies: PathBuf,
    /// The National Data Opt-out list; without it no opt-out can be applied and the node
    /// refuses queries whose decision requires one.
    #[serde(default)]
    pub opt_out: Option<OptOutConfig>,
    /// The trust's PostgreSQL database, for tables served from it (`postgres = ...`).
    #[serde(default)]
    pub postgres: Option<PostgresConfig>,
    /// The tables this trust serves.
    pub tables: Vec<TableConfig>,
    /// How the trust knows who is asking; required.
    pub identity: IdentityConfig,
}

/// How the node verifies who is asking. Either analysts' JWTs, forwarded by the gateway and
/// verified here against the identity provider's key set (`[identity.jwt]`), or, only if the
/// trust explicitly opts in, the identity an allowed gateway states in its headers.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// The identity provider whose signed tokens this trust accepts.
    #[serde(default)]
    pub jwt: Option<tally_common::identity::JwtConfig>,
    /// Believe the user, project and purpose an allowed gateway states for requests that
    /// carry no token (analysts with the gateway's static tokens). Off by default: a
    /// compromised gateway could then claim any identity.
    #[serde(default)]
    pub trust_gateway_identity: bool,
}

/// The gateway a node dials out to (`[gateway]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayLink {
    /// `host:port` of the gateway's port for trusts.
    pub address: String,
    /// The name the gateway's certificate must carry (default: the host of `address`).
    #[serde(default)]
    pub server_name: Option<String>,
    /// An HTTP CONNECT proxy to reach the gateway through: `http://[user:password@]host:port`.
    #[serde(default)]
    pub proxy: Option<String>,
    /// The longest wait, in seconds, between two attempts to reach the gateway (the waits
    /// grow from a quarter of a second, with random jitter).
    #[serde(default = "default_max_backoff")]
    pub max_backoff_secs: f64,
}

/// Never shows the proxy's password.
impl std::fmt::Debug for GatewayLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayLink")
            .field("address", &self.address)
            .field("server_name", &self.server_name)
            .field(
                "proxy",
                &self
                    .proxy
                    .as_deref()
                    .map(tally_common::dialed::Proxy::parse),
            )
            .field("max_backoff_secs", &self.max_backoff_secs)
            .finish()
    }
}

impl GatewayLink {
    /// The name the gateway's certificate must carry.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            let host = self
                .address
                .rsplit_once(':')
                .map_or(self.address.as_str(), |(host, _)| host);
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .to_string()
        })
    }

    /// The longest wait between two attempts.
    pub fn max_backoff(&self) -> Duration {
        Duration::from_secs_f64(self.max_backoff_secs)
    }
}

fn default_max_backoff() -> f64 {
    8.0
}

/// The node's side of mutual TLS.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTlsConfig {
    /// The node's certificate chain (PEM); it must name the trust as the gateway expects.
    pub cert: PathBuf,
    /// The node's private key (PEM).
    pub key: PathBuf,
    /// The CA whose gateway certificates are accepted (PEM): as clients when the gateway
    /// dials in, as the server when this node dials out.
    pub client_ca: PathBuf,
    /// Identities (certificate common names) of the gateways allowed to ask.
    pub allowed_gateways: Vec<String>,
}

impl NodeTlsConfig {
    /// The node's own certificate and key.
    pub fn identity(&self) -> CertificateFiles {
        CertificateFiles {
            cert: self.cert.clone(),
            key: self.key.clone(),
        }
    }
}

/// Limits on the work one query can make the node do, and on how many run at once.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeLimits {
    /// Seconds one query may take, from its arrival (waiting for a slot included) to its
    /// last batch.
    #[serde(default = "default_query_timeout")]
    pub query_timeout_secs: f64,
    /// Processor seconds one query's work may use (default: its time limit).
    #[serde(default)]
    pub query_cpu_secs: Option<f64>,
    /// MiB of memory the query engine may hold across all running queries (fractions
    /// allowed); each running query may hold its share, this divided by
    /// `max_running_queries`.
    #[serde(default = "default_memory_mb")]
    pub memory_limit_mb: f64,
    /// Queries running at once, each on a worker thread of its own (apart from the threads
    /// serving Flight).
    #[serde(default = "default_running")]
    pub max_running_queries: usize,
    /// Queries one project may run at once.
    #[serde(default = "default_running_per_project")]
    pub max_running_per_project: usize,
    /// Queries waiting for a slot, across projects; more are refused (`E_BUSY`).
    #[serde(default = "default_waiting")]
    pub max_waiting_queries: usize,
    /// Queries one project may have waiting; more are refused (`E_BUSY`).
    #[serde(default = "default_waiting_per_project")]
    pub max_waiting_per_project: usize,
    /// The most a query may cost, estimated from its model alone before it runs (see
    /// `cost.rs`); none by default.
    #[serde(default)]
    pub max_query_cost: Option<u64>,
}

impl Default for NodeLimits {
    fn default() -> Self {
        NodeLimits {
            query_timeout_secs: default_query_timeout(),
            query_cpu_secs: None,
            memory_limit_mb: default_memory_mb(),
            max_running_queries: default_running(),
            max_running_per_project: default_running_per_project(),
            max_waiting_queries: default_waiting(),
            max_waiting_per_project: default_waiting_per_project(),
            max_query_cost: None,
        }
    }
}

impl NodeLimits {
    /// The per-query time limit.
    pub fn query_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.query_timeout_secs)
    }

    /// The per-query processor-time budget.
    pub fn query_cpu(&self) -> Duration {
        self.query_cpu_secs
            .map_or_else(|| self.query_timeout(), Duration::from_secs_f64)
    }

    /// The engine's memory limit in bytes, across running queries.
    pub fn memory_limit_bytes(&self) -> usize {
        (self.memory_limit_mb * 1024.0 * 1024.0) as usize
    }

    /// The memory one running query may hold.
    pub fn query_memory_bytes(&self) -> usize {
        self.memory_limit_bytes() / self.max_running_queries.max(1)
    }

    /// How many queries run and wait, per project and in all.
    pub fn admission(&self) -> QueueLimits {
        QueueLimits {
            running: self.max_running_queries,
            running_per_tenant: self.max_running_per_project,
            waiting: self.max_waiting_queries,
            waiting_per_tenant: self.max_waiting_per_project,
        }
    }

    /// Checks each limit's range.
    fn validate(&self) -> Result<(), String> {
        let timeout = self.query_timeout_secs;
        if !(timeout.is_finite() && timeout > 0.0 && timeout <= 86_400.0) {
            return Err("limits.query_timeout_secs must be between 0 and 86400 seconds".into());
        }
        if let Some(cpu) = self.query_cpu_secs
            && !(cpu.is_finite() && cpu > 0.0 && cpu <= 86_400.0)
        {
            return Err("limits.query_cpu_secs must be between 0 and 86400 seconds".into());
        }
        let memory = self.memory_limit_mb;
        if !(memory.is_finite() && memory > 0.0) {
            return Err("limits.memory_limit_mb must be a positive number".into());
        }
        if self.max_query_cost == Some(0) {
            return Err("limits.max_query_cost must be at least 1".into());
        }
        self.admission()
            .validate()
            .map_err(|e| format!("limits: {e} (max_running_queries, max_running_per_project, max_waiting_queries, max_waiting_per_project)"))
    }
}

fn default_query_timeout() -> f64 {
    60.0
}

fn default_memory_mb() -> f64 {
    2048.0
}

fn default_running() -> usize {
    4
}

fn default_running_per_project() -> usize {
    2
}

fn default_waiting() -> usize {
    64
}

fn default_waiting_per_project() -> usize {
    16
}

fn default_rotate_mb() -> u64 {
    64
}

/// Where the trust's National Data Opt-out list is, and how to map it to its patients.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OptOutConfig {
    /// Parquet or CSV file with an `nhs_number` column; relative to the config file.
    pub path: PathBuf,
    /// The served table that maps NHS numbers to person ids.
    #[serde(default = "default_patients_table")]
    pub patients_table: String,
    /// The column of the patients table the list's `nhs_number` values are matched with
    /// (OMOP's `person`, say, keeps the NHS number in `person_source_value`).
    #[serde(default = "default_patient_key")]
    pub patient_key: String,
    /// Column holding the person id in every person-level table.
    #[serde(default = "default_person_column")]
    pub person_column: String,
}

fn default_patients_table() -> String {
    "patients".into()
}

fn default_patient_key() -> String {
    "nhs_number".into()
}

fn default_person_column() -> String {
    "person_id".into()
}

/// Who the trust is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustConfig {
    /// ODS code, e.g. `RXA`; it fills every table's `trust_code` column.
    pub code: String,
    /// Human-readable name.
    pub name: String,
}

/// One table: a Parquet or CSV file, a folder of them, or a table or view of the trust's
/// PostgreSQL database.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name as analysts write it.
    pub name: String,
    /// File or folder; relative paths are relative to the config file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// File format; guessed from the extension when absent (folders default to Parquet).
    #[serde(default)]
    pub format: Option<TableFormat>,
    /// A table or view (`name` or `schema.name`) of the database in `[postgres]`, instead
    /// of `path`.
    #[serde(default)]
    pub postgres: Option<String>,
}

/// Where one table's rows are.
#[derive(Debug, Clone, Copy)]
pub enum TableLocation<'a> {
    /// Files of one format.
    Files {
        /// The file or folder.
        path: &'a Path,
        /// Their format.
        format: TableFormat,
    },
    /// A relation of the trust's PostgreSQL database.
    Postgres {
        /// The relation as configured (`name` or `schema.name`).
        relation: &'a str,
    },
}

/// The trust's PostgreSQL database (`[postgres]`). The node connects with a role that may
/// only read its tables; it pushes each release into the database as one aggregate query.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresConfig {
    /// libpq connection settings without the password, as `key=value` pairs
    /// (`host=/var/run/postgresql dbname=hes user=tally_reader`) or a `postgresql://` URL.
    /// TLS is not supported: connect over a Unix socket or loopback.
    pub connection: String,
    /// A file holding the role's password (relative to the config file; trailing newline
    /// ignored), when the server asks for one.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
}

/// Supported file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableFormat {
    /// Apache Parquet.
    Parquet,
    /// Comma-separated values with a header row.
    Csv,
}

impl TableFormat {
    /// The format a file's extension names: CSV for `.csv` (any case), Parquet otherwise
    /// (folders included).
    pub fn of_path(path: &Path) -> Self {
        match path.extension().and_then(|e| e.to_str()) {
            Some(ext) if ext.eq_ignore_ascii_case("csv") => TableFormat::Csv,
            Some(_) | None => TableFormat::Parquet,
        }
    }
}

impl TableConfig {
    /// A table read from `path` (its format guessed from the extension).
    pub fn files(name: &str, path: PathBuf) -> Self {
        TableConfig {
            name: name.to_string(),
            path: Some(path),
            format: None,
            postgres: None,
        }
    }

    /// Where the table's rows are; `None` unless exactly one of `path` and `postgres` is
    /// set (checked by [`NodeConfig::validate`]).
    pub fn location(&self) -> Option<TableLocation<'_>> {
        match (&self.path, &self.postgres) {
            (Some(path), None) => Some(TableLocation::Files {
                path,
                format: self.format.unwrap_or_else(|| TableFormat::of_path(path)),
            }),
            (None, Some(relation)) => Some(TableLocation::Postgres { relation }),
            (Some(_), Some(_)) | (None, None) => None,
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

impl NodeConfig {
    /// Where the node listens: the configured address, none for a node that only dials
    /// out, the default otherwise.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        match (&self.listen, &self.gateway) {
            (Some(addr), _) => Some(*addr),
            (None, Some(_)) => None,
            (None, None) => Some(default_listen()),
        }
    }

    /// The audit log's rotation size in bytes, if it rotates.
    pub fn audit_rotate_bytes(&self) -> Option<u64> {
        (self.audit_rotate_mb > 0).then(|| self.audit_rotate_mb.saturating_mul(1024 * 1024))
    }

    /// Reads and validates a config file; relative paths become relative to its folder.
    pub fn load(path: &Path) -> Result<Self, NodeError> {
        let text = std::fs::read_to_string(path).map_err(|e| NodeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let mut config: NodeConfig = toml::from_str(&text).map_err(|e| NodeError::Config {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for table in &mut config.tables {
            if let Some(path) = &mut table.path
                && path.is_relative()
            {
                *path = base.join(&*path);
            }
        }
        if let Some(file) = config
            .postgres
            .as_mut()
            .and_then(|p| p.password_file.as_mut())
            && file.is_relative()
        {
            *file = base.join(&*file);
        }
        if let Some(log) = &mut config.audit_log
            && log.is_relative()
        {
            *log = base.join(&*log);
        }
        if let Some(dir) = &mut config.state_dir
            && dir.is_relative()
        {
            *dir = base.join(&*dir);
        }
        if config.policies.is_relative() {
            config.policies = base.join(&config.policies);
        }
        if let Some(opt_out) = &mut config.opt_out
            && opt_out.path.is_relative()
        {
            opt_out.path = base.join(&opt_out.path);
        }
        if let Some(jwt) = &mut config.identity.jwt
            && jwt.jwks.is_relative()
        {
            jwt.jwks = base.join(&jwt.jwks);
        }
        if let Some(tls) = &mut config.tls {
            for file in [&mut tls.cert, &mut tls.key, &mut tls.client_ca] {
                if file.is_relative() {
                    *file = base.join(&*file);
                }
            }
        }
        config.validate().map_err(|reason| NodeError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Checks what TOML types cannot: names, codes, duplicates, limits.
    pub fn validate(&self) -> Result<(), String> {
        self.limits.validate()?;
        if let Some(tls) = &self.tls
            && tls.allowed_gateways.is_empty()
        {
            return Err("tls.allowed_gateways must name at least one gateway".into());
        }
        if let Some(link) = &self.gateway {
            if self.tls.is_none() {
                return Err(
                    "[gateway] needs the [tls] section: a node dials out over mutual TLS only"
                        .into(),
                );
            }
            if !tally_common::dialed::has_port(&link.address) {
                return Err(format!(
                    "gateway.address '{}' must be host:port",
                    link.address
                ));
            }
            if let Some(proxy) = &link.proxy {
                tally_common::dialed::Proxy::parse(proxy)
                    .map_err(|e| format!("gateway.proxy: {e}"))?;
            }
            let backoff = link.max_backoff_secs;
            if !(backoff.is_finite() && (0.25..=3600.0).contains(&backoff)) {
                return Err(
                    "gateway.max_backoff_secs must be between 0.25 and 3600 seconds".into(),
                );
            }
        }
        if !is_identifier(&self.trust.code) {
            return Err(format!(
                "trust code '{}' must be letters, digits or '_'",
                self.trust.code
            ));
        }
        if let Some(opt_out) = &self.opt_out {
            for (field, column) in [
                ("patient_key", &opt_out.patient_key),
                ("person_column", &opt_out.person_column),
            ] {
                if !is_identifier(column) {
                    return Err(format!(
                        "opt_out.{field} '{column}' must be letters, digits or '_'"
                    ));
                }
            }
        }
        if let Some(opt_out) = &self.opt_out
            && !self.tables.iter().any(|t| t.name == opt_out.patients_table)
        {
            return Err(format!(
                "opt_out.patients_table '{}' is not among the tables",
                opt_out.patients_table
            ));
        }
        if self.tables.is_empty() {
            return Err("at least one [[tables]] entry is required".into());
        }
        if self.identity.jwt.is_none() && !self.identity.trust_gateway_identity {
            return Err(
                "[identity] must configure [identity.jwt] (verify analysts' tokens) or set trust_gateway_identity = true".into(),
            );
        }
        let mut seen = std::collections::BTreeSet::new();
        for table in &self.tables {
            if !is_identifier(&table.name) {
                return Err(format!(
                    "table name '{}' must be letters, digits or '_'",
                    table.name
                ));
            }
            if !seen.insert(table.name.to_lowercase()) {
                return Err(format!("table '{}' is listed twice", table.name));
            }
            match (&table.path, &table.postgres, &table.format) {
                (Some(_), None, _) => {}
                (None, Some(relation), None) => {
                    if self.postgres.is_none() {
                        return Err(format!(
                            "table '{}' names a PostgreSQL relation but there is no [postgres] section",
                            table.name
                        ));
                    }
                    crate::postgres::quoted_relation(relation).map_err(|e| {
                        format!("table '{}': postgres = '{relation}': {e}", table.name)
                    })?;
                }
                (None, Some(_), Some(_)) => {
                    return Err(format!(
                        "table '{}': format applies to files, not to a PostgreSQL relation",
                        table.name
                    ));
                }
                (Some(_), Some(_), _) => {
                    return Err(format!(
                        "table '{}' sets both path and postgres; give one",
                        table.name
                    ));
                }
                (None, None, _) => {
                    return Err(format!(
                        "table '{}' needs path (files) or postgres (a relation)",
                        table.name
                    ));
                }
            }
        }
        if let Some(postgres) = &self.postgres {
            crate::postgres::connection_settings(postgres)
                .map_err(|e| format!("postgres.connection: {e}"))?;
        }
        Ok(())
    }
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}
