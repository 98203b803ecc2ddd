//! Errors that stop a gateway from starting.

use std::path::PathBuf;

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The config file is missing or invalid.
    #[error("config {path}: {reason}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The configuration cannot be served as given (e.g. plaintext without the flag).
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A node URL is not a valid endpoint.
    #[error("node {code}: invalid url '{url}'")]
    NodeUrl {
        /// The trust code.
        code: String,
        /// The URL as configured.
        url: String,
    },
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The audit log could not be opened.
    #[error("audit log {path}: {source}")]
    Audit {
        /// The log file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The JWT key set could not be read.
    #[error("JWKS {path}: {reason}")]
    Jwks {
        /// The key set file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The TLS set-up is missing or unusable.
    #[error("TLS: {0}")]
    Tls(String),
    /// The policy folder could not be loaded.
    #[error("{0}")]
    Policy(String),
    /// The budget ledger could not be opened (it does not verify, or noise is on without one).
    #[error("budget ledger: {0}")]
    Ledger(String),
    /// The query engine could not be set up.
    #[error("engine set-up failed: {0}")]
    Engine(String),
}
