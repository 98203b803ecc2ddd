//! The policy over the query model, at the gateway and at every trust: policy cases (SQL and
//! identity, allowed or refused with a code) decided the same at the gateway and, replayed as
//! the releases the SQL lowers to, straight at a node; the National Data Opt-out, the
//! contribution bounds and the noise applied by each trust whatever the gateway's policy
//! says; reloading while running; and the governance team's own Rego tests.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use datafusion::prelude::SessionContext;
use serde::Deserialize;
use tally::client::{AnalystClient, GatewayTarget};
use tally::federation::{self, DEMO_PROJECT, DEMO_USER};
use tally_common::admission::{BudgetState, RequestIdentity};
use tally_common::model::ReleaseRequest;
use tally_common::policy::Policy;
use tally_common::privacy::{ContributionBounds, Keys};
use tally_gateway::Explanation;
use tally_synth::{PLANTED_DIAGNOSIS, default_trusts};

use crate::node::{
    Ask, Asker, bounded_row_counts, governance_of, key_text, number, policy_copy, release_noise,
    send, stated_sd, token_approving, trust_groups, trust_tables, with_threshold,
};
use crate::support::{
    analyst, analyst_token, data_dir, default_policies, expect_refusal, gateway_client,
    gateway_config, gateway_target, init_logging, open_policies, rows, start_federation_over,
    start_node,
};

#[derive(Deserialize)]
struct Cases {
    case: Vec<Case>,
}

/// One policy case (see `tests/policy_cases.toml`).
#[derive(Deserialize)]
struct Case {
    sql: String,
    expect: String,
    project: Option<String>,
    purpose: Option<String>,
}

impl Case {
    fn project(&self) -> &str {
        self.project.as_deref().unwrap_or(DEMO_PROJECT)
    }

    fn purpose(&self) -> &str {
        self.purpose.as_deref().unwrap_or("planning")
    }

    /// Who asks: the demo analyst, for the case's project and purpose.
    fn identity(&self) -> RequestIdentity {
        RequestIdentity {
            user: DEMO_USER.into(),
            groups: vec!["analysts".into()],
            project: self.project().into(),
            purpose: self.purpose().into(),
        }
    }

    /// The demo analyst's token approving exactly the case's project and purpose, so that
    /// what is refused is refused by the policy.
    fn asker(&self) -> Asker {
        Asker {
            token: Some(token_approving(&[(self.project(), &[self.purpose()])])),
            project: self.project().into(),
            purpose: self.purpose().into(),
        }
    }
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/policy_cases.toml"
    ))
    .unwrap();
    toml::from_str::<Cases>(&text).unwrap().case
}

/// What `sql` lowers to and what the default policy decides for `identity`, planned over
/// the test data's schemas as `tally policy explain` plans it.
async fn explain(tables: &SessionContext, sql: &str, identity: &RequestIdentity) -> Explanation {
    let policy = Policy::load(&default_policies()).unwrap();
    let plan = tally_gateway::parse::plan_read_only(&tables.state(), sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    Explanation::of(plan, &policy.snapshot(), identity, &BudgetState::unspent())
        .unwrap_or_else(|e| panic!("a policy case lowers to releases: {sql}: {e}"))
}

/// The trust every case is replayed at: in both of the catalogue's projects.
const REPLAYED_AT: &str = "RXB";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_cases_hold_at_the_gateway_and_at_a_node() {
    let cases = cases();
    assert!(cases.len() >= 25, "at least 25 cases");
    let local = start_federation_over(data_dir(), &default_policies()).await;
    let tables = federation::local_tables(data_dir(), &default_policies())
        .await
        .unwrap();
    let node = default_trusts()
        .iter()
        .zip(&local.nodes)
        .find(|(trust, _)| trust.code == REPLAYED_AT)
        .map(|(_, node)| node)
        .unwrap();
    for (number, case) in cases.iter().enumerate() {
        let sql = &case.sql;
        let asker = case.asker();
        let explained = explain(&tables, sql, &case.identity()).await;
        let allowed = case.expect == "allow";
        match &explained.decision {
            Ok(decision) => assert!(allowed && decision.allow, "explain allows {sql}"),
            Err(refusal) => assert!(
                refusal.starts_with(&case.expect),
                "explain: {sql} -> {refusal}"
            ),
        }

        let mut client = AnalystClient::connect_for(
            &local.gateway_target(),
            asker.token.as_deref().unwrap(),
            &asker.project,
            &asker.purpose,
        )
        .await
        .unwrap();
        let at_gateway = client.query(sql).await;
        if allowed {
            at_gateway.unwrap_or_else(|e| panic!("gateway refused {sql}: {e}"));
        } else {
            let err = expect_refusal(at_gateway);
            assert!(err.starts_with(&case.expect), "gateway: {sql} -> {err}");
        }

        // Each release straight at the trust, in order, as the gateway would send it: the
        // node's own code (not E_TRUST_REFUSED) for the first it refuses.
        let mut refused = None;
        for (release_number, release) in explained.releases.into_iter().enumerate() {
            let query_id = format!("policy-case-{number}-{release_number}");
            let request = ReleaseRequest { release };
            let at_node = send(
                node.listen_addr.unwrap(),
                REPLAYED_AT,
                &asker,
                &query_id,
                &Ask::release(request),
            )
            .await;
            if let Err(err) = at_node {
                refused = Some((query_id, err));
                break;
            }
        }
        match (refused, allowed) {
            (None, true) => {}
            (Some((_, err)), true) => panic!("{REPLAYED_AT} refused {sql}: {err}"),
            (None, false) => panic!("{REPLAYED_AT} answered {sql}"),
            (Some((query_id, err)), false) => {
                assert!(
                    err.contains(&format!("{}: ", case.expect)),
                    "{REPLAYED_AT}: {sql} -> {err}"
                );
                let record = node
                    .audit
                    .recent()
                    .into_iter()
                    .find(|r| r.query_id == query_id)
                    .expect("the refusal is in the trust's own audit log");
                assert_eq!(record.outcome, "refused");
                assert_eq!(record.codes[0], case.expect, "{sql}");
            }
        }
    }
    // A project's trusts are an obligation: cardiac-audit may only query RXA and RXB.
    let cardiac = cases
        .iter()
        .find(|c| c.project() == "cardiac-audit" && c.expect == "allow")
        .unwrap();
    let mut client = AnalystClient::connect_for(
        &local.gateway_target(),
        &analyst_token(),
        "cardiac-audit",
        cardiac.purpose(),
    )
    .await
    .unwrap();
    let answer = client.query(&cardiac.sql).await.unwrap();
    assert_eq!(answer.trusts, ["RXA", "RXB"]);
    local.stop().await;
}

/// Patients per trust as the gateway answers `purpose`'s query for the demo project.
async fn patients_by_trust(target: &GatewayTarget, purpose: &str) -> BTreeMap<String, i64> {
    let mut client = AnalystClient::connect_for(target, &analyst_token(), DEMO_PROJECT, purpose)
        .await
        .unwrap();
    let answer = client
        .query("SELECT trust_code, COUNT(*) FROM patients GROUP BY trust_code")
        .await
        .unwrap();
    rows(&answer.batches)
        .into_iter()
        .map(|row| (row[0].to_string(), row[1].to_string().parse().unwrap()))
        .collect()
}

/// Patients at `code` from its Parquet files, with or without its opted-out patients.
async fn patients_at(code: &str, opt_out: bool) -> i64 {
    trust_groups(code, "patients", "sex", opt_out)
        .await
        .values()
        .map(|(_, rows)| rows)
        .sum()
}

/// A copy of the default policy with `settings` overridden.
fn policy_variant(settings: serde_json::Value) -> tempfile::TempDir {
    policy_copy(&default_policies(), |governance| {
        for (key, value) in settings.as_object().unwrap() {
            governance["settings"][key] = value.clone();
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_opt_out_applies_to_every_purpose_at_every_trust() {
    // Exact counts (no noise, no rounding), so every opted-out patient shows.
    let mut privacy = governance_of(&default_policies()).settings.privacy;
    privacy.noise = tally_common::governance::Noise::Off;
    let exact = policy_variant(serde_json::json!({
        "privacy": privacy,
        "disclosure": {"suppress_below": 0, "round_to": 1},
    }));
    let local = start_federation_over(data_dir(), exact.path()).await;
    for purpose in ["planning", "research"] {
        let answered = patients_by_trust(&local.gateway_target(), purpose).await;
        for (trust, node) in default_trusts().iter().zip(&local.nodes) {
            let (all, kept) = (
                patients_at(trust.code, false).await,
                patients_at(trust.code, true).await,
            );
            assert!(kept < all, "{}: some patients opted out", trust.code);
            assert_eq!(
                answered[trust.code], kept,
                "{} for {purpose}: every opted-out patient is left out",
                trust.code
            );
            let record = node
                .audit
                .recent()
                .into_iter()
                .rev()
                .find(|r| r.step == "release")
                .unwrap();
            assert_eq!(record.identity.purpose, purpose);
            assert_eq!(record.opt_out_applied, Some(true), "{}", trust.code);
        }
    }
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusts_apply_their_own_opt_out_and_noise_whatever_the_gateway_says() {
    // The gateway's policy: no opt-out, no noise, no budget. The trusts': the default.
    init_logging();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in default_trusts() {
        let node = start_node(&trust, &default_policies()).await;
        endpoints.push((
            trust.code.to_string(),
            trust.name.to_string(),
            node.listen_addr.unwrap(),
        ));
        nodes.push(node);
    }
    let gateway = tally_gateway::start(&gateway_config(&endpoints, &open_policies()))
        .await
        .unwrap();
    let mut client = AnalystClient::connect(&gateway_target(gateway.addr), &analyst_token())
        .await
        .unwrap();
    let trusts = default_trusts().len() as f64;
    let governance = governance_of(&default_policies());
    let tables = federation::local_tables(data_dir(), &default_policies())
        .await
        .unwrap();
    let identity = RequestIdentity {
        user: DEMO_USER.into(),
        groups: vec!["analysts".into()],
        project: DEMO_PROJECT.into(),
        purpose: "planning".into(),
    };
    // The release a query lowers to, and the noise each trust adds to it under its policy.
    let lowered = |sql: String| {
        let (tables, identity, governance) = (&tables, &identity, &governance);
        async move {
            let release = explain(tables, &sql, identity).await.releases.remove(0);
            let group_types: Vec<_> = release
                .group_by
                .iter()
                .map(|d| match d.generaliser {
                    Some(g) => g.output_type(),
                    None => arrow::datatypes::DataType::Utf8,
                })
                .collect();
            let noise = release_noise(governance, &release, &group_types);
            (release, noise)
        }
    };

    // Each trust leaves out its opted-out patients (its audit says so), and its count is
    // noisy: every trust adds noise to every trust code's count (a public domain).
    let sql = "SELECT trust_code, COUNT(*) FROM patients GROUP BY trust_code";
    let (_, noise) = lowered(sql.to_string()).await;
    let sd = noise.sd(0) * trusts.sqrt();
    let answer = client.query(sql).await.unwrap();
    let released: BTreeMap<String, f64> = rows(&answer.batches)
        .into_iter()
        .map(|row| (key_text(&row[0]), number(&row[1])))
        .collect();
    for trust in default_trusts() {
        let kept = patients_at(trust.code, true).await as f64;
        assert!(
            kept < patients_at(trust.code, false).await as f64,
            "{}: some patients opted out",
            trust.code
        );
        let count = released[trust.code];
        assert!(
            (count - kept).abs() <= 6.0 * sd,
            "{}: released {count}, {kept} patients without the opted-out, σ {sd}",
            trust.code
        );
    }
    for node in &nodes {
        let record = node.audit.recent().pop().unwrap();
        assert_eq!(record.opt_out_applied, Some(true));
        assert_eq!(record.stored_answer, Some(false));
        assert!(
            record.rho_charged.is_some_and(|rho| rho > 0.0),
            "{record:?}"
        );
    }

    // The planted cohort's admissions by month: an exact answer has a row for each of the
    // few months they were admitted in; the trusts release every month of the public
    // period, noisy, zeros included, whatever the gateway's policy says.
    let planted = format!("diagnosis_icd10 = '{PLANTED_DIAGNOSIS}'");
    let sql = format!(
        "SELECT month(admission_date) AS m, COUNT(*) FROM episodes WHERE {planted} GROUP BY 1"
    );
    let (release, noise) = lowered(sql.clone()).await;
    let Keys::Public(months) = &noise.keys else {
        panic!("months of the period are public keys");
    };
    let bounds = ContributionBounds::of(&governance, &release);
    let mut truth: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for trust in default_trusts() {
        let at = bounded_row_counts(
            &trust_tables(data_dir(), trust.code).await,
            "person_id",
            &format!("episodes WHERE {planted}"),
            "month(admission_date)",
            bounds,
        )
        .await;
        for (key, (lower, upper)) in at {
            let entry = truth.entry(key).or_default();
            entry.0 += lower;
            entry.1 += upper;
        }
    }
    let answer = client.query(&sql).await.unwrap();
    let released: BTreeMap<String, f64> = rows(&answer.batches)
        .into_iter()
        .map(|row| (key_text(&row[0]), number(&row[1])))
        .collect();
    let every_month: BTreeSet<String> = months.iter().map(|k| key_text(&k[0])).collect();
    assert_eq!(
        released.keys().cloned().collect::<BTreeSet<_>>(),
        every_month,
        "every month of the period"
    );
    assert!(
        truth.len() < every_month.len(),
        "the cohort misses some months"
    );
    let sd = noise.sd(0) * trusts.sqrt();
    for (month, count) in &released {
        let (lower, upper) = truth.get(month).copied().unwrap_or((0, 0));
        assert!(
            *count >= lower as f64 - 6.0 * sd && *count <= upper as f64 + 6.0 * sd,
            "{month}: released {count}, bounded truth in [{lower}, {upper}], σ {sd}"
        );
    }
    assert!(
        released
            .iter()
            .any(|(month, count)| !truth.contains_key(month) && *count > 0.0),
        "only noise gives a month without admissions a positive count: {released:?}"
    );

    // What each trust sent states its noise, whatever the gateway's policy says; the
    // trust's stored answer is what the gateway received.
    let (code, node) = (default_trusts()[0].code, &nodes[0]);
    let asker = Asker {
        token: Some(analyst_token()),
        project: DEMO_PROJECT.into(),
        purpose: "planning".into(),
    };
    let partials = send(
        node.listen_addr.unwrap(),
        code,
        &asker,
        "policy-test-what-the-trust-sent",
        &Ask::release(ReleaseRequest {
            release: release.clone(),
        }),
    )
    .await
    .unwrap();
    let field = partials[0].schema().field(1).clone();
    let stated = stated_sd(&field);
    assert!(
        stated > 0.0 && (stated - noise.sd(0)).abs() < 1e-3,
        "{field:?}"
    );
    let record = node.audit.recent().pop().unwrap();
    assert_eq!(record.stored_answer, Some(true), "{record:?}");

    // And the gateway cannot ask a trust for anything less: a request stating how to
    // protect the patients (here a threshold of one patient) is not a release request.
    let err = send(
        node.listen_addr.unwrap(),
        code,
        &asker,
        "policy-test-threshold",
        &Ask::Json(with_threshold(&ReleaseRequest { release })),
    )
    .await
    .expect_err("refused");
    assert!(err.contains("E_BAD_REQUEST: "), "{err}");
    gateway.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// Waits until `policy`'s version differs from `old`; how long that took.
fn wait_for_version_change(policy: &Policy, old: &str) -> Duration {
    let started = Instant::now();
    while policy.version() == old {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "policy was not reloaded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    started.elapsed()
}

/// A rule closing the episodes table, appended to a policy's `tally.rego`.
const CLOSE_EPISODES: &str = "\nreasons contains reason(\"E_TABLE_NOT_ALLOWED\", \"episodes are closed for maintenance\") if {\n\t\"episodes\" in object.get(action, \"tables\", [])\n}\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_rule_changes_the_next_decision_within_a_second_without_a_restart() {
    let dir = policy_variant(serde_json::json!({}));
    let local = start_federation_over(data_dir(), dir.path()).await;
    let mut client = analyst(&local).await;
    let sql = "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty";
    client.query(sql).await.expect("allowed before the edit");
    let policy = local.gateway.gateway.policy().clone();
    let before = policy.version();

    let path = dir.path().join("tally.rego");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{original}{CLOSE_EPISODES}")).unwrap();
    let took = wait_for_version_change(&policy, &before);
    // The folder is checked every second.
    assert!(
        took < Duration::from_millis(1_500),
        "reloaded after {took:?}"
    );
    let err = expect_refusal(client.query(sql).await);
    assert!(
        err.contains("E_TABLE_NOT_ALLOWED") && err.contains("maintenance"),
        "{err}"
    );
    let closed = policy.version();

    // A broken file is reported, naming it, and the previous policy stays in force: also
    // after the watcher has seen the change.
    std::fs::write(
        &path,
        format!("{original}{CLOSE_EPISODES}\nthis is not rego {{"),
    )
    .unwrap();
    let error = policy.reload().expect_err("a syntax error is reported");
    assert!(error.to_string().contains("tally.rego"), "{error}");
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    assert_eq!(
        policy.version(),
        closed,
        "the previous policy stays in force"
    );
    let err = expect_refusal(client.query(sql).await);
    assert!(err.contains("E_TABLE_NOT_ALLOWED"), "{err}");
    local.stop().await;
}

/// Runs a statement ticket from GetFlightInfo: the rows, or the refusal's message.
async fn run_ticket(
    client: &mut tally_common::flight::SqlClient,
    ticket: arrow_flight::Ticket,
) -> Result<usize, String> {
    use futures::TryStreamExt;
    let stream = client.do_get(ticket).await.map_err(|e| e.to_string())?;
    let batches: Vec<arrow::array::RecordBatch> =
        stream.try_collect().await.map_err(|e| e.to_string())?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

/// The ticket of the first endpoint GetFlightInfo returned for `sql`.
async fn describe(client: &mut tally_common::flight::SqlClient, sql: &str) -> arrow_flight::Ticket {
    let info = client.execute(sql.to_string(), None).await.unwrap();
    info.endpoint[0].ticket.clone().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_described_plan_runs_once_and_only_under_the_policy_that_decided_it() {
    let dir = policy_variant(serde_json::json!({}));
    let local = start_federation_over(data_dir(), dir.path()).await;
    let mut client = gateway_client(local.gateway.addr, &analyst_token()).await;
    let sql = "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty";
    let audit = local.gateway.gateway.audit().clone();

    // The kept plan runs under the query id it was described with; a second run of the
    // same ticket finds no plan and plans the SQL again, under a new query id.
    let ticket = describe(&mut client, sql).await;
    let first = run_ticket(&mut client, ticket.clone()).await.unwrap();
    let second = run_ticket(&mut client, ticket).await.unwrap();
    assert!(first > 0 && first == second);
    let records = audit.recent();
    let of = |step: &str, outcome: &str| -> Vec<String> {
        records
            .iter()
            .filter(|r| r.sql == sql && r.step == step && r.outcome == outcome)
            .map(|r| r.query_id.clone())
            .collect()
    };
    let (described, answered) = (of("describe", "described"), of("run", "answered"));
    assert_eq!((described.len(), answered.len()), (1, 2));
    assert_eq!(
        answered[0], described[0],
        "the first run is the described plan"
    );
    assert_ne!(answered[1], described[0], "the second is planned again");

    // A plan described before the policy changed is not run after it.
    let ticket = describe(&mut client, sql).await;
    let policy = local.gateway.gateway.policy().clone();
    let before = policy.version();
    let path = dir.path().join("tally.rego");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{original}{CLOSE_EPISODES}")).unwrap();
    wait_for_version_change(&policy, &before);
    let err = run_ticket(&mut client, ticket)
        .await
        .expect_err("refused now");
    assert!(err.contains("E_TABLE_NOT_ALLOWED"), "{err}");
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_no_allowed_trust_can_answer_is_refused_not_answered_empty() {
    let dir = policy_variant(serde_json::json!({}));
    let path = dir.path().join("catalogue.json");
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    catalogue["governance"]["projects"][DEMO_PROJECT]["trusts"] = serde_json::json!(["RXZ"]);
    std::fs::write(&path, catalogue.to_string()).unwrap();
    let local = start_federation_over(data_dir(), dir.path()).await;
    let mut client = analyst(&local).await;
    let err = expect_refusal(
        client
            .query("SELECT sex, COUNT(*) FROM patients GROUP BY sex")
            .await,
    );
    assert!(
        err.starts_with("E_TABLE_NOT_ALLOWED") && err.contains("patients"),
        "{err}"
    );
    local.stop().await;
}

/// The reason codes `policies/README.md` documents for the default policy.
fn documented_codes() -> BTreeSet<String> {
    let readme = std::fs::read_to_string(default_policies().join("README.md")).unwrap();
    let table = readme
        .split("## Reason codes")
        .nth(1)
        .expect("the README has a reason codes section");
    table
        .lines()
        .take_while(|line| !line.starts_with("## "))
        .filter_map(|line| line.strip_prefix("| `"))
        .filter_map(|rest| rest.split('`').next())
        .filter(|code| code.starts_with("E_"))
        .map(str::to_string)
        .collect()
}

#[test]
fn every_documented_reason_code_has_a_passing_rego_test() {
    let outcomes = tally_common::policy::run_tests(&default_policies()).unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let documented = documented_codes();
    assert!(documented.len() >= 10, "{documented:?}");
    let tests = std::fs::read_to_string(default_policies().join("tally_test.rego")).unwrap();
    for code in &documented {
        assert!(
            tests.contains(&format!("\"{code}\"")),
            "no Rego test for {code}"
        );
    }
    // And every code the rules use is documented.
    let rego = std::fs::read_to_string(default_policies().join("tally.rego")).unwrap();
    for code in rego
        .split('"')
        .filter(|s| s.starts_with("E_") && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
    {
        assert!(
            documented.contains(code),
            "{code} is not in policies/README.md"
        );
    }
}

#[test]
fn tally_policy_test_runs_every_rego_test() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
        .args(["policy", "test"])
        .arg(default_policies())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{report}");
    let tests = tally_common::policy::run_tests(&default_policies())
        .unwrap()
        .len();
    assert!(
        report.contains(&format!("{tests} passed, 0 failed")),
        "{report}"
    );
    assert_eq!(
        report.lines().filter(|l| l.starts_with("PASS ")).count(),
        tests
    );
}
