//! Errors that stop a node agent from starting.

use std::path::PathBuf;

/// Why a node agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The config file is missing or invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A table's files could not be opened.
    #[error("table '{table}': {reason}")]
    Table {
        /// The table name.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The privacy state (budget ledger, stored answers) could not be opened.
    #[error("privacy state: {0}")]
    State(String),
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The TLS set-up is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The policy folder could not be loaded.
    #[error("{0}")]
    Policy(String),
    /// The identity provider's key set could not be loaded.
    #[error("identity: {0}")]
    Identity(String),
    /// The trust's PostgreSQL database is unreachable or unsuitable (a role that may write,
    /// a missing relation).
    #[error("PostgreSQL: {0}")]
    Postgres(String),
    /// The query engine could not be set up.
    #[error("engine set-up failed: {0}")]
    Engine(String),
}
