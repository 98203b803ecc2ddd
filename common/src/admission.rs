//! Deciding: a release is checked against the code's floor (the model validated against the
//! governance catalogue), then the policy decides over the model and the identity. Gateway
//! and nodes run exactly this, each with its own policy snapshot.

use serde::{Deserialize, Serialize};

use crate::error::TallyError;
use crate::governance::{ColumnClass, Governance};
use crate::model::{ColumnRef, Dimension, Predicate, ReleaseQuery};
use crate::policy::{BudgetObligation, Decision, Obligations, PolicySnapshot};

/// Who is asking and why, as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestIdentity {
    /// User name.
    pub user: String,
    /// Groups the user belongs to.
    pub groups: Vec<String>,
    /// The project the query is for.
    pub project: String,
    /// The purpose of the query (e.g. `research`, `planning`).
    pub purpose: String,
}

/// A refused query: why, and the decision when the policy was reached.
#[derive(Debug, Clone)]
pub struct Refused {
    /// The error for the caller.
    pub error: TallyError,
    /// The policy's decision, when the policy was reached.
    pub decision: Option<Box<Decision>>,
}

impl Refused {
    /// The reason codes for the audit log: the policy's when it refused, else ours.
    pub fn codes(&self) -> Vec<String> {
        match &self.decision {
            Some(d) if !d.allow => d.reasons.iter().map(|r| r.code.clone()).collect(),
            _ => vec![self.error.code.to_string()],
        }
    }
}

impl From<TallyError> for Refused {
    fn from(error: TallyError) -> Self {
        Refused {
            error,
            decision: None,
        }
    }
}

/// Who decides: the gateway for an analyst, or a node for a gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The gateway deciding an analyst's query.
    Analyst,
    /// A node deciding a release a gateway sent.
    Gateway,
}

/// One column use, flattened for short policy rules.
#[derive(Debug, Clone, Serialize)]
struct ColumnUse<'a> {
    table: &'a str,
    column: &'a str,
    class: &'static str,
    usage: &'static str,
    generaliser: Option<&'static str>,
}

fn class_name(governance: &Governance, column: &ColumnRef) -> &'static str {
    match governance
        .column(&column.table, &column.column)
        .map(|c| c.class)
    {
        Some(ColumnClass::Identifier) => "identifier",
        Some(ColumnClass::QuasiIdentifier) => "quasi_identifier",
        Some(ColumnClass::Dimension) => "dimension",
        Some(ColumnClass::Measure) => "measure",
        None => "unclassified",
    }
}

fn tested<'a>(predicate: &'a Predicate, out: &mut Vec<&'a Dimension>) {
    match predicate {
        Predicate::And { all: operands } | Predicate::Or { any: operands } => {
            for operand in operands {
                tested(operand, out);
            }
        }
        Predicate::Not { not } => tested(not, out),
        Predicate::Compare { on, .. }
        | Predicate::InList { on, .. }
        | Predicate::Between { on, .. }
        | Predicate::IsNull { on, .. }
        | Predicate::Prefix { on, .. } => out.push(on),
    }
}

/// The project's privacy budget as the deciding side's own ledger has it.
pub struct BudgetState<'a> {
    /// ρ spent on the dataset so far.
    pub spent: f64,
    /// Whether a release was already paid for: a repeat returns its stored noisy answer
    /// and costs nothing, so it is never refused for want of budget.
    pub paid: &'a (dyn Fn(&ReleaseQuery) -> bool + Send + Sync),
}

impl BudgetState<'_> {
    /// Nothing spent, nothing paid for (explaining a query without a ledger).
    pub fn unspent() -> BudgetState<'static> {
        BudgetState {
            spent: 0.0,
            paid: &|_| false,
        }
    }
}

/// The policy input for one release: the model itself, its tables, column uses and
/// aggregate functions flattened, and the project's budget: the ρ spent on the dataset so
/// far and whether this release is a repeat (see `policies/README.md`).
pub fn policy_input(
    identity: &RequestIdentity,
    origin: Origin,
    release: &ReleaseQuery,
    governance: &Governance,
    budget: &BudgetState,
) -> serde_json::Value {
    let mut tables = vec![release.fact.as_str()];
    tables.extend(release.joins.iter().map(String::as_str));
    fn use_of<'a>(
        governance: &Governance,
        dimension: &'a Dimension,
        usage: &'static str,
    ) -> ColumnUse<'a> {
        ColumnUse {
            table: &dimension.column.table,
            column: &dimension.column.column,
            class: class_name(governance, &dimension.column),
            usage,
            generaliser: dimension.generaliser.map(|g| g.function_name()),
        }
    }
    let mut columns: Vec<ColumnUse> = release
        .group_by
        .iter()
        .map(|d| use_of(governance, d, "group_by"))
        .collect();
    if let Some(filter) = &release.filter {
        let mut dimensions = Vec::new();
        tested(filter, &mut dimensions);
        columns.extend(
            dimensions
                .into_iter()
                .map(|d| use_of(governance, d, "filter")),
        );
    }
    columns.extend(release.aggregates.iter().filter_map(|a| {
        a.column().map(|column| ColumnUse {
            table: &column.table,
            column: &column.column,
            class: class_name(governance, column),
            usage: "aggregate",
            generaliser: None,
        })
    }));
    let aggregates: Vec<serde_json::Value> = release
        .aggregates
        .iter()
        .filter_map(|a| serde_json::to_value(a).ok())
        .filter_map(|a| a.get("function").cloned())
        .collect();
    serde_json::json!({
        "context": {
            "identity": identity,
            "origin": origin,
            "budget": { "spent": budget.spent, "repeat": (budget.paid)(release) },
        },
        "action": {
            "kind": "release",
            "release": release,
            "tables": tables,
            "columns": columns,
            "aggregates": aggregates,
        },
    })
}

/// Decides `releases` for `identity`, whose project's budget is `budget`: each must pass
/// the floor and the policy. The obligations are the strictest over all of them.
pub fn decide(
    policy: &PolicySnapshot,
    identity: &RequestIdentity,
    origin: Origin,
    releases: &[ReleaseQuery],
    budget: &BudgetState,
) -> Result<Decision, Refused> {
    let mut combined: Option<Decision> = None;
    for release in releases {
        release.validate(policy.governance())?;
        let input = policy_input(identity, origin, release, policy.governance(), budget);
        let decision = policy.decide(&input)?;
        if let Some(error) = decision.refusal() {
            return Err(Refused {
                error,
                decision: Some(Box::new(decision)),
            });
        }
        combined = Some(match combined {
            None => decision,
            Some(mut so_far) => {
                so_far.obligations = so_far.obligations.strictest(&decision.obligations);
                so_far
            }
        });
    }
    combined.ok_or_else(|| {
        Refused::from(TallyError::new(
            crate::ErrorCode::NotAggregate,
            "the query reads no trust's table: aggregate a table (COUNT, SUM, AVG, ...)",
        ))
    })
}

impl Obligations {
    /// Obligations that satisfy both `self` and `other`.
    pub fn strictest(&self, other: &Obligations) -> Obligations {
        let trusts = match (&self.trusts, &other.trusts) {
            (None, None) => None,
            (Some(a), None) | (None, Some(a)) => Some(a.clone()),
            (Some(a), Some(b)) => Some(a.iter().filter(|t| b.contains(t)).cloned().collect()),
        };
        Obligations {
            apply_opt_out: self.apply_opt_out || other.apply_opt_out,
            trusts,
            budget: BudgetObligation {
                dataset: self.budget.dataset.clone(),
                rho_per_release: self
                    .budget
                    .rho_per_release
                    .max(other.budget.rho_per_release),
                rho_cap: self.budget.rho_cap.min(other.budget.rho_cap),
            },
        }
    }
}
