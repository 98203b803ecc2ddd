//! `tally policy`: the governance team's tools. `test` runs every `test_*` rule of a policy
//! folder; `explain` shows the releases (query models) a query lowers to, the policy input
//! of each and what the policy decides, without running it.

use std::path::Path;

use tally_common::admission::{BudgetState, RequestIdentity};
use tally_common::policy::{Policy, run_tests};
use tally_gateway::Explanation;
use tally_gateway::parse::plan_read_only;

/// Runs the tests of `dir`, printing one line per test; fails if any test fails.
pub fn test(dir: &Path) -> Result<(), String> {
    let outcomes = run_tests(dir).map_err(|e| e.to_string())?;
    if outcomes.is_empty() {
        return Err(format!("no test_* rules in {}", dir.display()));
    }
    let failed = outcomes.iter().filter(|o| !o.passed).count();
    for outcome in &outcomes {
        match &outcome.detail {
            None => println!("PASS {}", outcome.name),
            Some(detail) => println!("FAIL {}: {detail}", outcome.name),
        }
    }
    println!("{} passed, {failed} failed", outcomes.len() - failed);
    if failed > 0 {
        return Err(format!("{failed} policy tests failed"));
    }
    Ok(())
}

/// Prints the releases, policy inputs and decision for `sql`, planned against one trust's
/// tables in `data_dir` (schemas only; nothing is run).
pub async fn explain(
    policies: &Path,
    data_dir: &Path,
    identity: RequestIdentity,
    sql: &str,
) -> Result<String, String> {
    let policy = Policy::load(policies).map_err(|e| e.to_string())?;
    let ctx = crate::federation::local_tables(data_dir, policies).await?;
    let plan = plan_read_only(&ctx.state(), sql)
        .await
        .map_err(|e| e.to_string())?;
    let explanation = Explanation::of(plan, &policy.snapshot(), &identity, &BudgetState::unspent())
        .map_err(|e| e.to_string())?;
    serde_json::to_string_pretty(&explanation).map_err(|e| e.to_string())
}
