//! The governance catalogue (`catalogue.json` in a policy folder, under `governance`), typed:
//! which tables hold patients and what their privacy unit is, which relationships may be
//! joined, and for every column its class and what an analyst may do with it. Gateway and
//! nodes validate every [`crate::model::ReleaseQuery`] against their own copy.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::Generaliser;

/// The catalogue: settings, tables and projects.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Governance {
    /// Defaults that apply to every project.
    pub settings: Settings,
    /// Every table analysts may name, by lower-case name.
    pub catalogue: BTreeMap<String, TableSpec>,
    /// Registered projects, by name.
    pub projects: BTreeMap<String, ProjectSpec>,
}

/// Defaults that apply to every project.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// A released group must hold at least this many distinct patients at each trust.
    pub min_distinct_patients: u64,
    /// Released counts are rounded to a multiple of this (0 or 1: no rounding).
    pub round_to: u64,
    /// Purposes a project may be approved for. `direct_care` is not one: care of one
    /// patient is not analytics.
    pub analytics_purposes: Vec<String>,
}

/// One table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TableSpec {
    /// The column naming the person a row is about. Only tables with a privacy unit can be
    /// the fact table of a release.
    #[serde(default)]
    pub privacy_unit: Option<String>,
    /// Tables a release over this table may join, by name.
    #[serde(default)]
    pub relationships: BTreeMap<String, Relationship>,
    /// Every column, by name.
    pub columns: BTreeMap<String, ColumnSpec>,
}

/// A declared join from a fact table to another table.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Relationship {
    /// Each fact row matches at most one row of the other table: `fact.from = other.to`,
    /// where both rows belong to the same privacy unit.
    ManyToOne {
        /// The fact table's key column.
        from: String,
        /// The other table's key column.
        to: String,
    },
    /// A public reference table of code ranges: a fact row matches the row whose
    /// `[low, high]` holds the first `prefix` characters of its `code`.
    CodeRange {
        /// The fact table's code column.
        code: String,
        /// How many leading characters of the code are compared.
        prefix: u32,
        /// The reference table's lower bound column.
        low: String,
        /// The reference table's upper bound column.
        high: String,
    },
}

/// How a column may be used.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ColumnClass {
    /// Identifies a person or a record: never referenced by an analyst.
    Identifier,
    /// Could single a person out in combination: grouped only through a generaliser.
    QuasiIdentifier,
    /// A category: grouped and filtered as it is.
    Dimension,
    /// A quantity: aggregated (SUM, AVG, ...) and, where allowed, filtered.
    Measure,
}

/// One column.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ColumnSpec {
    /// Its class.
    pub class: ColumnClass,
    /// Generalisers that may be applied to it (the only way a quasi-identifier is grouped).
    #[serde(default)]
    pub generalisers: Vec<Generaliser>,
    /// Whether it may be compared with constants in WHERE.
    #[serde(default)]
    pub filter: bool,
    /// Whether it may be the argument of SUM, AVG, VAR or STDDEV (always for measures).
    #[serde(default)]
    pub aggregate: bool,
    /// The public list of values, where there is one (released with every key).
    #[serde(default)]
    pub domain: Option<Vec<String>>,
    /// The bounds each value is clamped to before it is summed, for measures.
    #[serde(default)]
    pub bounds: Option<[f64; 2]>,
}

impl ColumnSpec {
    /// Whether the column may be grouped by as it is.
    pub fn groupable_bare(&self) -> bool {
        match self.class {
            ColumnClass::Dimension => true,
            ColumnClass::Identifier | ColumnClass::QuasiIdentifier | ColumnClass::Measure => false,
        }
    }

    /// Whether the column may be aggregated.
    pub fn aggregatable(&self) -> bool {
        match self.class {
            ColumnClass::Measure => true,
            ColumnClass::QuasiIdentifier | ColumnClass::Dimension => self.aggregate,
            ColumnClass::Identifier => false,
        }
    }

    /// Whether the column may be filtered (bare or through a generaliser).
    pub fn filterable(&self) -> bool {
        match self.class {
            ColumnClass::Identifier => false,
            ColumnClass::QuasiIdentifier | ColumnClass::Dimension | ColumnClass::Measure => {
                self.filter
            }
        }
    }
}

/// One project.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ProjectSpec {
    /// What the project is for.
    #[serde(default)]
    pub description: String,
    /// Tables it may query.
    pub tables: Vec<String>,
    /// Trusts it may reach.
    pub trusts: Vec<String>,
    /// Purposes it is approved for.
    pub purposes: Vec<String>,
}

impl Governance {
    /// The catalogue in a policy folder's data document (`{"governance": {...}}`).
    pub fn from_policy_data(data: &serde_json::Value) -> Result<Self, String> {
        let section = data
            .get("governance")
            .ok_or_else(|| "the policy data has no 'governance' section".to_string())?;
        Governance::deserialize(section).map_err(|e| format!("the governance catalogue: {e}"))
    }

    /// A table by name.
    pub fn table(&self, name: &str) -> Option<&TableSpec> {
        self.catalogue.get(name)
    }

    /// A column by table and name.
    pub fn column(&self, table: &str, column: &str) -> Option<&ColumnSpec> {
        self.catalogue.get(table)?.columns.get(column)
    }
}
