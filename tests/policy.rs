//! Rego policies at gateway and node: the default NHS rules, disclosure control, the
//! National Data Opt-out, and reloading while the gateway runs.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Deserialize;
use tally::client::{AnalystClient, GatewayTarget};
use tally::federation::{self, DEMO_USER};
use tally_common::flight::{PROJECT_HEADER, PURPOSE_HEADER, USER_HEADER, fetch_all};

use crate::support::{
    assert_same_answer, centralised, data_dir, default_policies, expect_refusal, gateway_client,
    gateway_config, gateway_target, init_logging, node_client, open_policies, rows,
    start_federation_over, start_node,
};

#[derive(Deserialize)]
struct Cases {
    case: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    sql: String,
    expect: String,
    project: Option<String>,
    purpose: Option<String>,
}

fn cases() -> Vec<Case> {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/policy_cases.toml"
    ))
    .unwrap();
    toml::from_str::<Cases>(&text).unwrap().case
}

/// Runs `sql` directly at a node, as a gateway would, for the given project and purpose.
async fn ask_node(
    addr: std::net::SocketAddr,
    sql: &str,
    project: &str,
    purpose: &str,
) -> Result<usize, String> {
    let mut client = node_client(addr, "RXB").await;
    client.set_header(USER_HEADER, DEMO_USER);
    client.set_header(PROJECT_HEADER, project);
    client.set_header(PURPOSE_HEADER, purpose);
    let info = client
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| e.to_string())?;
    let (batches, _) = fetch_all(&mut client, info)
        .await
        .map_err(|e| e.to_string())?;
    Ok(batches.iter().map(|b| b.num_rows()).sum())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_cases_hold_at_the_gateway_and_at_a_node() {
    let cases = cases();
    assert!(cases.len() >= 40, "at least 40 cases");
    let local = start_federation_over(data_dir(), &default_policies()).await;
    let target = local.gateway_target();
    for case in &cases {
        let project = case.project.as_deref().unwrap_or(federation::DEMO_PROJECT);
        let purpose = case.purpose.as_deref().unwrap_or("planning");
        let mut client = AnalystClient::connect_for(&target, &crate::support::analyst_token(), project, purpose)
            .await
            .unwrap();
        let at_gateway = client.query(&case.sql).await;
        let at_node = ask_node(local.nodes[1].addr, &case.sql, project, purpose).await;
        if case.expect == "allow" {
            at_gateway.unwrap_or_else(|e| panic!("gateway refused {}: {e}", case.sql));
            at_node.unwrap_or_else(|e| panic!("node refused {}: {e}", case.sql));
        } else {
            let err = expect_refusal(at_gateway);
            assert!(err.contains(&case.expect), "gateway: {} -> {err}", case.sql);
            let err = at_node.expect_err(&case.sql);
            assert!(err.contains(&case.expect), "node: {} -> {err}", case.sql);
        }
    }
    // A project's trusts are an obligation: cardiac-audit may only query RXA and RXB.
    let mut cardiac = AnalystClient::connect_for(&target, &crate::support::analyst_token(), "cardiac-audit", "research")
        .await
        .unwrap();
    let answer = cardiac
        .query("SELECT COUNT(*) FROM episodes")
        .await
        .unwrap();
    assert_eq!(answer.trusts, vec!["RXA", "RXB"]);
    // Every refusal at the node is in the trust's own audit log, with its reason codes.
    let refused = local.nodes[1]
        .audit
        .recent()
        .into_iter()
        .filter(|r| r.outcome == "refused")
        .count();
    let expected = cases.iter().filter(|c| c.expect != "allow").count();
    assert!(
        refused >= expected,
        "node audit has {refused} refusals, expected {expected}"
    );
    local.stop().await;
}

/// Distinct patients and episodes per diagnosis, as a central platform would compute them
/// with the opt-out applied.
async fn central_groups() -> BTreeMap<String, (i64, i64)> {
    let central = centralised().await;
    let mut opted = Vec::new();
    for trust in tally_synth::default_trusts() {
        let path = data_dir().join(trust.code).join("opt_outs.parquet");
        let name = format!("opt_outs_{}", trust.code);
        central
            .register_parquet(&name, path.to_str().unwrap(), Default::default())
            .await
            .unwrap();
        opted.push(format!(
            "SELECT p.person_id FROM patients p JOIN {name} o ON p.nhs_number = o.nhs_number WHERE p.trust_code = '{}'",
            trust.code
        ));
    }
    let sql = format!(
        "SELECT diagnosis_icd10, COUNT(DISTINCT person_id), COUNT(*) FROM episodes \
         WHERE person_id NOT IN ({}) GROUP BY diagnosis_icd10",
        opted.join(" UNION ALL ")
    );
    let batches = central.sql(&sql).await.unwrap().collect().await.unwrap();
    rows(&batches)
        .into_iter()
        .map(|row| {
            let key = row[0].to_string();
            let n = |v: &datafusion::common::ScalarValue| v.to_string().parse::<i64>().unwrap();
            (key, (n(&row[1]), n(&row[2])))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disclosure_control_suppresses_small_groups_and_rounds_counts() {
    let local = start_federation_over(data_dir(), &default_policies()).await;
    let mut client = AnalystClient::connect_for(
        &local.gateway_target(),
        &crate::support::analyst_token(),
        federation::DEMO_PROJECT,
        "research",
    )
    .await
    .unwrap();
    let answer = client
        .query(
            "SELECT diagnosis_icd10, COUNT(*) AS episodes FROM episodes GROUP BY diagnosis_icd10",
        )
        .await
        .unwrap();
    let released: BTreeMap<String, i64> = rows(&answer.batches)
        .into_iter()
        .map(|row| (row[0].to_string(), row[1].to_string().parse().unwrap()))
        .collect();
    let central = central_groups().await;
    // Patients at several trusts have a different person id at each, so each trust counts
    // them once: the threshold applies to the sum of the trusts' distinct patients, and
    // the central count over person ids agrees with it.
    let mut expected_suppressed = 0;
    for (diagnosis, (patients, episodes)) in &central {
        if *patients < 8 {
            expected_suppressed += 1;
            assert!(
                !released.contains_key(diagnosis),
                "{diagnosis} has {patients} patients and must not appear"
            );
        } else {
            let rounded = (episodes + 2) / 5 * 5;
            assert_eq!(
                released.get(diagnosis),
                Some(&rounded),
                "{diagnosis}: {episodes} episodes"
            );
        }
    }
    assert_eq!(released.len() + expected_suppressed, central.len());
    assert_eq!(
        answer.suppressed, expected_suppressed,
        "metadata counts the suppressed groups"
    );
    assert!(
        released.values().all(|n| n % 5 == 0),
        "counts are multiples of 5"
    );
    // The planted group: 7 patients with 30 episodes between them.
    let planted = central
        .get(tally_synth::PLANTED_DIAGNOSIS)
        .expect("planted diagnosis present");
    assert!(
        planted.0 <= 7 && planted.1 >= 7,
        "planted group {planted:?}"
    );
    assert!(!released.contains_key(tally_synth::PLANTED_DIAGNOSIS));

    let small = client
        .query("SELECT diagnosis_icd10, COUNT(*) FROM episodes GROUP BY diagnosis_icd10 HAVING COUNT(*) < 8")
        .await
        .unwrap();
    assert_eq!(
        rows(&small.batches).len(),
        0,
        "HAVING COUNT(*) < 8 sees only released groups"
    );

    let broken = expect_refusal(
        client
            .query("SELECT specialty, COUNT(*) FROM episodes WHERE CAST(diagnosis_icd10 AS INT) > 0 GROUP BY specialty")
            .await,
    );
    assert!(
        broken.contains("E_EXECUTION") && broken.contains("query id"),
        "{broken}"
    );
    assert!(
        !broken.to_lowercase().contains("cast"),
        "no engine text: {broken}"
    );
    for diagnosis in central.keys() {
        assert!(
            !broken.contains(diagnosis.as_str()),
            "no data value: {broken}"
        );
    }
    local.stop().await;
}

async fn count_by_trust(target: &GatewayTarget, purpose: &str) -> BTreeMap<String, i64> {
    let mut client =
        AnalystClient::connect_for(target, &crate::support::analyst_token(), federation::DEMO_PROJECT, purpose)
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

fn opted_out_per_trust() -> BTreeMap<String, i64> {
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("manifest.json")).unwrap())
            .unwrap();
    manifest["trusts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["code"].as_str().unwrap().to_string(),
                t["opted_out"].as_i64().unwrap(),
            )
        })
        .collect()
}

/// A copy of the default policy with `settings` overridden.
fn policy_variant(settings: serde_json::Value) -> tempfile::TempDir {
    catalogue_variant(|governance| {
        for (key, value) in settings.as_object().unwrap() {
            governance["settings"][key] = value.clone();
        }
    })
}

/// A copy of the default policy whose catalogue's `governance` object `edit` has changed.
fn catalogue_variant(edit: impl FnOnce(&mut serde_json::Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        default_policies().join("tally.rego"),
        dir.path().join("tally.rego"),
    )
    .unwrap();
    let mut catalogue: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(default_policies().join("catalogue.json")).unwrap(),
    )
    .unwrap();
    edit(&mut catalogue["governance"]);
    std::fs::write(dir.path().join("catalogue.json"), catalogue.to_string()).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_out_depends_on_purpose_and_is_applied_by_the_node() {
    let exact = policy_variant(serde_json::json!({"round_to": 1}));
    let local = start_federation_over(data_dir(), exact.path()).await;
    let target = local.gateway_target();
    let research = count_by_trust(&target, "research").await;
    let direct_care = count_by_trust(&target, "direct_care").await;
    let opted = opted_out_per_trust();
    for (trust, all) in &direct_care {
        assert_eq!(
            all - research[trust],
            opted[trust],
            "{trust}: the difference is the opted-out patients"
        );
    }
    let record = local.nodes[0]
        .audit
        .recent()
        .into_iter()
        .rev()
        .find(|r| r.step == "run")
        .unwrap();
    assert_eq!(
        record.opt_out_applied,
        Some(false),
        "last query was for direct care"
    );
    local.stop().await;

    // A gateway whose policy says "no opt-out" cannot switch it off at the trusts.
    init_logging();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in tally_synth::default_trusts() {
        let node = start_node(&trust, exact.path()).await;
        endpoints.push((trust.code.to_string(), trust.name.to_string(), node.addr));
        nodes.push(node);
    }
    let config = gateway_config(&endpoints, &open_policies());
    let gateway = tally_gateway::start(&config).await.unwrap();
    let lenient = count_by_trust(&gateway_target(gateway.addr), "research").await;
    assert_eq!(
        lenient, research,
        "the trusts applied the opt-out themselves"
    );
    gateway.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

fn wait_for_version_change(policy: &tally_common::policy::Policy, old: &str) {
    let started = Instant::now();
    while policy.version() == old {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "policy was not reloaded"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_a_rule_changes_the_next_decision_without_a_restart() {
    let dir = policy_variant(serde_json::json!({}));
    let local = start_federation_over(data_dir(), dir.path()).await;
    let mut client = AnalystClient::connect(&local.gateway_target(), &crate::support::analyst_token())
        .await
        .unwrap();
    let sql = "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty";
    client.query(sql).await.expect("allowed before the edit");
    let policy = local.gateway.gateway.policy().clone();
    let before = policy.version();

    let rule = "\nreasons contains reason(\"E_TABLE_NOT_ALLOWED\", \"episodes are closed for maintenance\") if {\n\t\"episodes\" in object.get(action, \"tables\", [])\n}\n";
    let path = dir.path().join("tally.rego");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{original}{rule}")).unwrap();
    wait_for_version_change(&policy, &before);
    let err = expect_refusal(client.query(sql).await);
    assert!(
        err.contains("E_TABLE_NOT_ALLOWED") && err.contains("maintenance"),
        "{err}"
    );
    let closed = policy.version();

    std::fs::write(&path, format!("{original}{rule}\nthis is not rego {{")).unwrap();
    let reload = policy.reload();
    let error = reload.expect_err("a syntax error is reported").to_string();
    assert!(error.contains("tally.rego"), "{error}");
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
    let mut client = gateway_client(local.gateway.addr, DEMO_TOKEN).await;
    let sql = "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty";
    let audit = local.gateway.gateway.audit().clone();

    // The kept plan runs under the query id it was planned with; a second run of the same
    // ticket finds no plan and plans the SQL again, under a new query id.
    let ticket = describe(&mut client, sql).await;
    let first = run_ticket(&mut client, ticket.clone()).await.unwrap();
    let second = run_ticket(&mut client, ticket).await.unwrap();
    assert!(first > 0 && first == second);
    let answered: Vec<_> = audit
        .recent()
        .into_iter()
        .filter(|r| r.sql == sql && r.outcome == "answered")
        .collect();
    assert_eq!(answered.len(), 2);
    assert_ne!(answered[0].query_id, answered[1].query_id);

    // A plan described before the policy changed is not run after it.
    let ticket = describe(&mut client, sql).await;
    let policy = local.gateway.gateway.policy().clone();
    let before = policy.version();
    let rule = "\nreasons contains reason(\"E_TABLE_NOT_ALLOWED\", \"episodes are closed\") if {\n\t\"episodes\" in object.get(action, \"tables\", [])\n}\n";
    let path = dir.path().join("tally.rego");
    let original = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{original}{rule}")).unwrap();
    wait_for_version_change(&policy, &before);
    let err = run_ticket(&mut client, ticket)
        .await
        .expect_err("refused now");
    assert!(err.contains("E_TABLE_NOT_ALLOWED"), "{err}");
    local.stop().await;
}

#[test]
fn default_policy_tests_pass_with_one_per_rule() {
    let outcomes = tally_common::policy::run_tests(&default_policies()).unwrap();
    let failed: Vec<_> = outcomes.iter().filter(|o| !o.passed).collect();
    assert!(failed.is_empty(), "{failed:?}");
    let rego = std::fs::read_to_string(default_policies().join("tally.rego")).unwrap();
    let codes: std::collections::BTreeSet<&str> = rego
        .split('"')
        .filter(|s| s.starts_with("E_") && s.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
        .collect();
    let tests = std::fs::read_to_string(default_policies().join("tally_test.rego")).unwrap();
    for code in codes {
        assert!(tests.contains(&format!("\"{code}\"")), "no test for {code}");
    }
    assert!(
        Path::new(&default_policies()).join("README.md").exists(),
        "reason codes are documented"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_no_allowed_trust_can_answer_is_refused_not_answered_empty() {
    let dir = policy_variant(serde_json::json!({}));
    let path = dir.path().join("catalogue.json");
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    catalogue["governance"]["projects"][federation::DEMO_PROJECT]["trusts"] =
        serde_json::json!(["RXZ"]);
    std::fs::write(&path, catalogue.to_string()).unwrap();
    let local = start_federation_over(data_dir(), dir.path()).await;
    let mut client = AnalystClient::connect(&local.gateway_target(), &crate::support::analyst_token())
        .await
        .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arithmetic_in_aggregates_needs_the_table_to_enable_it() {
    let enabled = catalogue_variant(|governance| {
        governance["catalogue"]["episodes"]["aggregate_arithmetic"] = true.into();
        governance["settings"]["round_to"] = 1.into();
    });
    let local = start_federation_over(data_dir(), enabled.path()).await;
    // Direct care is exempt from the opt-out, so the answer is comparable with every row's.
    let mut client =
        AnalystClient::connect_for(&local.gateway_target(), &crate::support::analyst_token(), "", "direct_care")
            .await
            .unwrap();
    let sql = "SELECT SUM(cost * (length_of_stay + 1)) AS weighted, COUNT(*) AS n FROM episodes";
    let answer = client
        .query(sql)
        .await
        .expect("arithmetic allowed on episodes");
    let expected = centralised()
        .await
        .sql(sql)
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    assert_same_answer(sql, &answer.batches, &expected, false);
    // What could single out rows stays refused, enabled or not.
    for refused in [
        "SELECT SUM(cost / length_of_stay) FROM episodes",
        "SELECT SUM(CAST(specialty = '100' AS INT) * cost) FROM episodes",
        "SELECT SUM(abs(cost) * length_of_stay) FROM episodes",
    ] {
        let err = expect_refusal(client.query(refused).await);
        assert!(
            err.starts_with("E_EXPR_SHAPE") || err.starts_with("E_FUNCTION"),
            "{refused}: {err}"
        );
    }
    // A table that does not enable it, in the same query, refuses it.
    let err = expect_refusal(
        client
            .query(
                "SELECT SUM(e.cost * p.imd_decile) FROM episodes e \
                 JOIN patients p ON e.person_id = p.person_id",
            )
            .await,
    );
    assert!(
        err.contains("E_EXPR_SHAPE") && err.contains("patients"),
        "{err}"
    );
    local.stop().await;
}
