//! The node agent's TOML configuration.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::NodeError;

/// A node agent's configuration (`tally node --config node.toml`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// The trust this node serves.
    pub trust: TrustConfig,
    /// Address the Flight SQL service listens on.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Append-only JSON-lines audit log of every request; none if absent.
    #[serde(default)]
    pub audit_log: Option<PathBuf>,
    /// The trust's own policy folder (`.rego` files and JSON data); relative to this file.
    pub policies: PathBuf,
    /// The National Data Opt-out list; without it no opt-out can be applied and the node
    /// refuses queries whose decision requires one.
    #[serde(default)]
    pub opt_out: Option<OptOutConfig>,
    /// The tables this trust serves.
    pub tables: Vec<TableConfig>,
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
    /// Column holding the person id in every person-level table.
    #[serde(default = "default_person_column")]
    pub person_column: String,
}

fn default_patients_table() -> String {
    "patients".into()
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

/// One table: a Parquet or CSV file, or a folder of them.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TableConfig {
    /// Table name as analysts write it.
    pub name: String,
    /// File or folder; relative paths are relative to the config file.
    pub path: PathBuf,
    /// File format; guessed from the extension when absent (folders default to Parquet).
    #[serde(default)]
    pub format: Option<TableFormat>,
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

impl TableConfig {
    /// The table's format, from the config or the file extension.
    pub fn format(&self) -> TableFormat {
        self.format
            .unwrap_or_else(|| match self.path.extension().and_then(|e| e.to_str()) {
                Some(ext) if ext.eq_ignore_ascii_case("csv") => TableFormat::Csv,
                _ => TableFormat::Parquet,
            })
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 50051))
}

impl NodeConfig {
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
            if table.path.is_relative() {
                table.path = base.join(&table.path);
            }
        }
        if let Some(log) = &mut config.audit_log
            && log.is_relative()
        {
            *log = base.join(&*log);
        }
        if config.policies.is_relative() {
            config.policies = base.join(&config.policies);
        }
        if let Some(opt_out) = &mut config.opt_out
            && opt_out.path.is_relative()
        {
            opt_out.path = base.join(&opt_out.path);
        }
        config.validate().map_err(|reason| NodeError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Checks what TOML types cannot: names, codes, duplicates.
    pub fn validate(&self) -> Result<(), String> {
        if !is_identifier(&self.trust.code) {
            return Err(format!(
                "trust code '{}' must be letters, digits or '_'",
                self.trust.code
            ));
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
        }
        Ok(())
    }
}

fn is_identifier(text: &str) -> bool {
    !text.is_empty()
        && text.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !text.starts_with(|c: char| c.is_ascii_digit())
}
