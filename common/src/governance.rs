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
    /// Purposes a project may be approved for. `direct_care` is not one: care of one
    /// patient is not analytics.
    pub analytics_purposes: Vec<String>,
    /// Differential privacy: noise, contribution bounds and the default budget.
    pub privacy: PrivacySettings,
    /// Statistical disclosure control applied by the gateway to merged noisy values.
    pub disclosure: DisclosureSettings,
}

/// The noise each trust adds to what it releases.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Noise {
    /// The discrete Gaussian mechanism under zero-concentrated DP (the default).
    DiscreteGaussian,
    /// No noise and no budget: exact aggregates. Only for tests that compare answers with
    /// a central computation; never for real patients.
    Off,
}

/// Differential privacy settings (zero-concentrated DP, per trust, per project).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PrivacySettings {
    /// The mechanism.
    pub noise: Noise,
    /// The name of the dataset budgets are kept for (one per population of patients).
    pub dataset: String,
    /// ρ one release costs unless its project says otherwise.
    pub rho_per_release: f64,
    /// The total ρ a project may spend on this dataset unless its project says otherwise.
    pub rho_cap: f64,
    /// δ for showing ε and for thresholding groups whose keys are not public.
    pub delta: f64,
    /// Rows one patient contributes to one group at most (more are not counted).
    pub max_rows_per_group: u64,
    /// Groups one patient contributes to at most in one release (chosen by a keyed hash).
    pub max_groups_per_unit: u64,
}

/// Post-processing of merged noisy values, for outputs that look like NHS tables.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DisclosureSettings {
    /// Groups whose merged noisy count is below this are dropped (0: none).
    pub suppress_below: u64,
    /// Released counts are rounded to a multiple of this (0 or 1: no rounding).
    pub round_to: u64,
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
    /// Rows one patient has in this table at most, where fewer than the settings'
    /// bounds (1 for a table of one row per patient): it tightens both contribution
    /// bounds, and the node enforces it whatever the data holds.
    #[serde(default)]
    pub max_rows_per_unit: Option<u64>,
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
    /// Decimal places kept when values are summed in integer fixed point (default 0).
    #[serde(default)]
    pub precision: u32,
    /// For dates: the public first and last day (`YYYY-MM-DD`) whose months and years are
    /// released as every key.
    #[serde(default)]
    pub period: Option<[String; 2]>,
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
    /// Its privacy budget, where it differs from the settings' default.
    #[serde(default)]
    pub budget: Option<BudgetSpec>,
}

/// A project's privacy budget (zCDP ρ).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BudgetSpec {
    /// The total ρ the project may spend on the dataset, at each trust. Raising it is a
    /// governance act the ledgers record.
    pub rho_cap: f64,
    /// ρ one release costs.
    #[serde(default)]
    pub rho_per_release: Option<f64>,
}

impl Governance {
    /// The catalogue in a policy folder's data document (`{"governance": {...}}`).
    pub fn from_policy_data(data: &serde_json::Value) -> Result<Self, String> {
        let section = data
            .get("governance")
            .ok_or_else(|| "the policy data has no 'governance' section".to_string())?;
        let governance = Governance::deserialize(section)
            .map_err(|e| format!("the governance catalogue: {e}"))?;
        governance
            .check()
            .map_err(|e| format!("the governance catalogue: {e}"))?;
        Ok(governance)
    }

    /// Refuses settings that would not protect anyone: budgets that are not positive
    /// numbers, δ outside (0, 1), contribution bounds of zero, aggregated columns without
    /// bounds, periods that are not dates.
    fn check(&self) -> Result<(), String> {
        let privacy = &self.settings.privacy;
        let positive = |name: &str, value: f64| {
            if value.is_finite() && value > 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a positive number, not {value}"))
            }
        };
        positive("settings.privacy.rho_per_release", privacy.rho_per_release)?;
        positive("settings.privacy.rho_cap", privacy.rho_cap)?;
        if !(privacy.delta > 0.0 && privacy.delta < 1.0) {
            return Err(format!(
                "settings.privacy.delta must lie strictly between 0 and 1, not {}",
                privacy.delta
            ));
        }
        if privacy.max_rows_per_group == 0 || privacy.max_groups_per_unit == 0 {
            return Err("settings.privacy contribution bounds must be at least 1".into());
        }
        for (name, project) in &self.projects {
            if let Some(budget) = &project.budget {
                positive(&format!("projects.{name}.budget.rho_cap"), budget.rho_cap)?;
                if let Some(rho) = budget.rho_per_release {
                    positive(&format!("projects.{name}.budget.rho_per_release"), rho)?;
                }
            }
        }
        for (table, spec) in &self.catalogue {
            if spec.max_rows_per_unit == Some(0) {
                return Err(format!("{table}.max_rows_per_unit must be at least 1"));
            }
            for (column, c) in &spec.columns {
                if let Some([low, high]) = c.bounds
                    && !(low.is_finite() && high.is_finite() && low <= high)
                {
                    return Err(format!(
                        "{table}.{column}: bounds must be finite, low <= high"
                    ));
                }
                if c.aggregatable() && c.bounds.is_none() {
                    return Err(format!(
                        "{table}.{column} may be aggregated, so it needs bounds to clamp to"
                    ));
                }
                if c.precision > 6 {
                    return Err(format!("{table}.{column}: precision is at most 6 places"));
                }
                if let Some(period) = &c.period {
                    for day in period {
                        chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").map_err(|_| {
                            format!("{table}.{column}: period day '{day}' is not YYYY-MM-DD")
                        })?;
                    }
                }
            }
        }
        Ok(())
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
