//! Admission of a query: the read-only floor, the plan facts, the policy decision. Gateway
//! and nodes run exactly this, each on its own plan of the SQL it received.

use datafusion::execution::context::SessionState;
use datafusion::logical_expr::LogicalPlan;
use serde::{Deserialize, Serialize};

use crate::checks::plan_read_only;
use crate::error::TallyError;
use crate::facts::{QueryFacts, hidden_patient_counts, query_facts};
use crate::policy::{Decision, Policy};

/// Who is asking and why, as the policy sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestIdentity {
    /// User name.
    pub user: String,
    /// Groups the user belongs to.
    pub groups: Vec<String>,
    /// The project the query is for.
    pub project: String,
    /// The purpose of the query (e.g. `research`, `planning`, `direct_care`).
    pub purpose: String,
}

/// An admitted query.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// The plan (before optimisation).
    pub plan: LogicalPlan,
    /// The facts the policy saw.
    pub facts: QueryFacts,
    /// The decision (allowing).
    pub decision: Decision,
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

/// The policy input document for these facts.
pub fn policy_input(
    identity: &RequestIdentity,
    query_id: &str,
    policy_version: &str,
    facts: &QueryFacts,
) -> serde_json::Value {
    serde_json::json!({
        "context": {
            "identity": identity,
            "query_id": query_id,
            "policy_version": policy_version,
        },
        "action": facts,
    })
}

/// Where a query comes from, which decides whether its hidden patient count is trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// An analyst's SQL at the gateway: every aggregate is the analyst's.
    Analyst,
    /// A per-trust query from a gateway: its `__tally_patients` count is disclosure control's.
    Gateway,
}

/// Plans `sql` read-only, derives its facts and asks `policy`.
pub async fn admit(
    state: &SessionState,
    sql: &str,
    policy: &Policy,
    identity: &RequestIdentity,
    query_id: &str,
    trusts: Vec<String>,
    origin: Origin,
) -> Result<Admitted, Refused> {
    let planned = plan_read_only(state, sql).await?;
    let catalogue = policy.data();
    let hidden = match origin {
        Origin::Analyst => Vec::new(),
        Origin::Gateway => hidden_patient_counts(&planned.plan),
    };
    let facts = query_facts(
        sql,
        &planned.plan,
        &planned.syntax,
        &catalogue,
        trusts,
        &hidden,
    );
    let input = policy_input(identity, query_id, &policy.version(), &facts);
    let decision = policy.decide(&input)?;
    if let Some(error) = decision.refusal() {
        return Err(Refused {
            error,
            decision: Some(Box::new(decision)),
        });
    }
    Ok(Admitted {
        plan: planned.plan,
        facts,
        decision,
    })
}
