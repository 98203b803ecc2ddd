//! `tally bench`: measurements recorded in BENCHMARKS.md.

use std::path::Path;
use std::time::Instant;

use tally_common::admission::{RequestIdentity, policy_input};
use tally_common::checks::plan_read_only;
use tally_common::facts::query_facts;
use tally_common::policy::Policy;
use tally_synth::default_trusts;

/// Representative analyst queries for the policy benchmark.
const QUERIES: &[&str] = &[
    "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
    "SELECT age_band(age_at_admission) AS band, month(admission_date) AS m, COUNT(*), AVG(length_of_stay) \
     FROM episodes WHERE admission_method IN ('21', '22') GROUP BY 1, 2",
    "SELECT p.sex, p.imd_decile, SUM(e.cost), STDDEV(e.cost) FROM episodes e JOIN patients p \
     ON e.person_id = p.person_id GROUP BY p.sex, p.imd_decile",
    "SELECT nhs_number, postcode FROM patients",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Times fact derivation and policy evaluation per query; returns a report.
pub async fn policy(policies: &Path, data: &Path, iterations: usize) -> Result<String, String> {
    let policy = Policy::load(policies).map_err(|e| e.to_string())?;
    let ctx = crate::federation::local_tables(data, policies).await?;
    let identity = RequestIdentity {
        user: "analyst".into(),
        groups: vec!["analysts".into()],
        project: "uec-demand".into(),
        purpose: "research".into(),
    };
    let catalogue = policy.data();
    let codes: Vec<String> = default_trusts()
        .iter()
        .map(|t| t.code.to_string())
        .collect();
    let mut report =
        format!("policy evaluation, {iterations} iterations per query (microseconds)\n");
    report
        .push_str("query | decide median | decide p95 | facts+decide median | facts+decide p95\n");
    for sql in QUERIES {
        let planned = plan_read_only(&ctx.state(), sql)
            .await
            .map_err(|e| e.to_string())?;
        let mut decide = Vec::with_capacity(iterations);
        let mut whole = Vec::with_capacity(iterations);
        for _ in 0..iterations {
            let started = Instant::now();
            let facts = query_facts(
                sql,
                &planned.plan,
                &planned.syntax,
                &catalogue,
                codes.clone(),
                &[],
            );
            let input = policy_input(&identity, "bench", &policy.version(), &facts);
            let decided = Instant::now();
            policy.decide(&input).map_err(|e| e.to_string())?;
            decide.push(decided.elapsed().as_secs_f64() * 1e6);
            whole.push(started.elapsed().as_secs_f64() * 1e6);
        }
        decide.sort_by(f64::total_cmp);
        whole.sort_by(f64::total_cmp);
        let short: String = sql.chars().take(60).collect();
        report.push_str(&format!(
            "{short}… | {:.1} | {:.1} | {:.1} | {:.1}\n",
            percentile(&decide, 0.5),
            percentile(&decide, 0.95),
            percentile(&whole, 0.5),
            percentile(&whole, 0.95)
        ));
    }
    Ok(report)
}
