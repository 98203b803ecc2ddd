//! `tally policy`: the governance team's tools. `test` runs every `test_*` rule of a policy
//! folder; `explain` shows the facts a query yields and what the policy decides, without
//! running it.

use std::path::Path;

use tally_common::admission::{RequestIdentity, policy_input};
use tally_common::checks::plan_read_only;
use tally_common::facts::query_facts;
use tally_common::policy::{Policy, run_tests};
use tally_synth::default_trusts;

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

/// Prints the policy input and decision for `sql`, planned against one trust's tables in
/// `data_dir` (schemas only; nothing is run).
pub async fn explain(
    policies: &Path,
    data_dir: &Path,
    identity: RequestIdentity,
    sql: &str,
) -> Result<String, String> {
    let policy = Policy::load(policies).map_err(|e| e.to_string())?;
    let ctx = crate::federation::local_tables(data_dir, policies).await?;
    let planned = plan_read_only(&ctx.state(), sql)
        .await
        .map_err(|e| e.to_string())?;
    let codes = default_trusts()
        .iter()
        .map(|t| t.code.to_string())
        .collect();
    let facts = query_facts(
        sql,
        &planned.plan,
        &planned.syntax,
        &policy.data(),
        codes,
        &[],
    );
    let input = policy_input(&identity, "explain", &policy.version(), &facts);
    let decision = policy.decide(&input).map_err(|e| e.to_string())?;
    serde_json::to_string_pretty(&serde_json::json!({ "input": input, "decision": decision }))
        .map_err(|e| e.to_string())
}
