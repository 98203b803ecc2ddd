//! Plans kept between requests. A plan made to describe a statement (Flight SQL
//! `GetFlightInfo`) is kept for the `DoGet` that follows ([`PlanCache`]), so each query is
//! parsed, planned, lowered and decided once rather than twice; and the logical plan of a
//! statement's text is kept for as long as the catalogue does not change
//! ([`StatementPlans`]), so a dashboard's repeated statement is parsed and planned once.
//!
//! A plan is handed out at most once, only to the identity it was made for, only while the
//! policy that decided it is still in force, and only within [`PLAN_TTL`]; otherwise the
//! query is planned again from its SQL. The statement ticket carries both the plan's handle
//! and the SQL, so a ticket whose plan is gone still runs.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::logical_expr::LogicalPlan;
use tally_common::admission::RequestIdentity;

use tally_common::model::ReleaseQuery;
use tally_common::policy::Obligations;

use crate::catalogue::Snapshot;
use crate::send::QueryDispatch;

/// How long a described plan waits for its `DoGet`.
pub const PLAN_TTL: Duration = Duration::from_secs(30);

/// Plans kept at most; the oldest is dropped first (a client that describes and never runs
/// costs memory only up to this bound).
const CAPACITY: usize = 1024;

/// Marks a statement ticket that names a kept plan: `MARKER`, the handle, a newline, the SQL.
const MARKER: &str = "tally-plan:";

/// A planned query waiting for its `DoGet`.
pub struct PlannedQuery {
    /// Who it was planned and decided for.
    pub identity: RequestIdentity,
    /// The analyst's SQL.
    pub sql: String,
    /// The version of the policy that decided it.
    pub policy_version: String,
    /// The lowered plan.
    pub plan: LogicalPlan,
    /// The dispatch its releases run through (it holds the query id).
    pub dispatch: Arc<QueryDispatch>,
    /// The releases, for the audit record.
    pub releases: Vec<ReleaseQuery>,
    /// The releases as SQL.
    pub release_sql: Vec<String>,
    /// The obligations the policy set.
    pub obligations: Obligations,
}

/// The kept plans, oldest first.
#[derive(Default)]
pub struct PlanCache {
    entries: Mutex<VecDeque<(String, Instant, PlannedQuery)>>,
}

impl PlanCache {
    /// Keeps `planned` and returns the statement ticket that names it.
    pub fn keep(&self, planned: PlannedQuery) -> Vec<u8> {
        let handle = uuid::Uuid::new_v4().to_string();
        let ticket = format!("{MARKER}{handle}\n{}", planned.sql).into_bytes();
        let now = Instant::now();
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        entries.retain(|(_, kept, _)| now.duration_since(*kept) < PLAN_TTL);
        while entries.len() >= CAPACITY {
            entries.pop_front();
        }
        entries.push_back((handle, now, planned));
        ticket
    }

    /// The plan `handle` names, removed from the cache, if it was made for `identity` and
    /// `sql` under `policy_version` and has not expired.
    pub fn take(
        &self,
        handle: &str,
        identity: &RequestIdentity,
        sql: &str,
        policy_version: &str,
    ) -> Option<PlannedQuery> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        let index = entries.iter().position(|(h, _, _)| h == handle)?;
        let (_, kept, planned) = entries.remove(index)?;
        (kept.elapsed() < PLAN_TTL
            && planned.identity == *identity
            && planned.sql == sql
            && planned.policy_version == policy_version)
            .then_some(planned)
    }
}

/// Statements' texts kept at most with their plans; all are dropped when the bound is hit.
const STATEMENTS: usize = 1024;

/// The logical plans of statements already planned, by their exact text, for one view of
/// the catalogue: planning depends on nothing else (not on who asks: each request is still
/// lowered, decided and audited for its caller). A new view drops them all.
#[derive(Default)]
pub struct StatementPlans {
    kept: Mutex<KeptStatements>,
}

/// The view the kept plans were made over, and the plans by statement text.
type KeptStatements = (Option<Arc<Snapshot>>, HashMap<String, LogicalPlan>);

impl StatementPlans {
    /// The plan of `sql` made over `view`, if it was kept.
    pub fn get(&self, view: &Arc<Snapshot>, sql: &str) -> Option<LogicalPlan> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        match &kept.0 {
            Some(planned_over) if Arc::ptr_eq(planned_over, view) => kept.1.get(sql).cloned(),
            Some(_) | None => None,
        }
    }

    /// Keeps `plan`, made for `sql` over `view`.
    pub fn keep(&self, view: Arc<Snapshot>, sql: &str, plan: &LogicalPlan) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let same_view = kept.0.as_ref().is_some_and(|v| Arc::ptr_eq(v, &view));
        if !same_view || kept.1.len() >= STATEMENTS {
            kept.1.clear();
            kept.0 = Some(view);
        }
        kept.1.insert(sql.to_string(), plan.clone());
    }
}

/// A statement ticket's plan handle (if it names one) and SQL.
pub fn parse_ticket(ticket: &str) -> (Option<&str>, &str) {
    ticket
        .strip_prefix(MARKER)
        .and_then(|rest| rest.split_once('\n'))
        .map_or((None, ticket), |(handle, sql)| (Some(handle), sql))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::common::DFSchema;
    use datafusion::logical_expr::EmptyRelation;

    fn plan() -> LogicalPlan {
        LogicalPlan::EmptyRelation(EmptyRelation {
            produce_one_row: true,
            schema: Arc::new(DFSchema::empty()),
        })
    }

    #[test]
    fn a_statement_plan_is_kept_only_for_its_text_and_catalogue_view() {
        let plans = StatementPlans::default();
        let view = Arc::new(Snapshot::default());
        let sql = "SELECT COUNT(*) FROM episodes";
        assert!(plans.get(&view, sql).is_none());
        plans.keep(view.clone(), sql, &plan());
        assert!(plans.get(&view, sql).is_some());
        assert!(plans.get(&view, "SELECT COUNT(*) FROM patients").is_none());
        let refreshed = Arc::new(Snapshot::default());
        assert!(plans.get(&refreshed, sql).is_none());
        plans.keep(refreshed.clone(), "SELECT 1", &plan());
        assert!(plans.get(&view, "SELECT 1").is_none());
        assert!(
            plans.get(&refreshed, sql).is_none(),
            "a new view drops the old plans"
        );
    }
}
