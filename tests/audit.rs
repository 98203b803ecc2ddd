//! The audit trail: one gateway record per Flight request (a statement's describe and run
//! share its query id) and one record per release at every trust it reached, joined by query
//! id; tampering named by `tally audit verify`; a killed gateway's log
//! still verifies and holds every answered query.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tally::client::AnalystClient;
use tally::federation;
use tally_common::audit::read_records;

use crate::support::{
    analyst_token, audited_federation, audited_nodes, certs, default_policies, expect_refusal,
    gateway_target, identity_provider, init_logging, spawn_gateway, tally,
};

fn text<'a>(record: &'a Value, field: &str) -> &'a str {
    record[field].as_str().unwrap_or_default()
}

/// Strings of a record's array field.
fn texts<'a>(record: &'a Value, field: &str) -> Vec<&'a str> {
    record[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is a list: {record}"))
        .iter()
        .filter_map(Value::as_str)
        .collect()
}

/// A log's records by query id, in log order.
fn by_query_id(records: &[Value]) -> BTreeMap<&str, Vec<&Value>> {
    let mut grouped: BTreeMap<&str, Vec<&Value>> = BTreeMap::new();
    for record in records {
        grouped
            .entry(text(record, "query_id"))
            .or_default()
            .push(record);
    }
    grouped
}

/// Audit records are written per Flight request: a statement's GetFlightInfo leaves a
/// `describe` record and its DoGet a `run` record under the same query id (the id every
/// trust's record carries); each trust the run reached leaves one `release` record per
/// release it was sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_flight_request_has_one_gateway_record_and_each_release_one_per_trust() {
    let dir = tempfile::tempdir().unwrap();
    let (local, gateway_log, node_logs) = audited_federation(dir.path()).await;
    let mut client = AnalystClient::connect(&local.gateway_target(), &analyst_token())
        .await
        .unwrap();
    let answered = [
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
        "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
        // Two releases: each trust is asked twice under the one query id.
        "SELECT (SELECT COUNT(*) FROM episodes) AS episodes, (SELECT COUNT(*) FROM patients) AS patients",
    ];
    for sql in answered {
        client.query(sql).await.unwrap();
    }
    let refused = [
        "SELECT nhs_number FROM patients",
        "SELECT postcode, COUNT(*) FROM patients GROUP BY postcode",
        "SELEC nonsense",
    ];
    for sql in refused {
        expect_refusal(client.query(sql).await);
    }
    let mut stranger = AnalystClient::connect(&local.gateway_target(), "wrong-token")
        .await
        .unwrap();
    let stranger_sql = "SELECT COUNT(*) FROM episodes";
    expect_refusal(stranger.query(stranger_sql).await);
    local.stop().await;

    let gateway = read_records(&gateway_log).unwrap();
    // Answered: GetFlightInfo and DoGet; refused and unauthenticated: GetFlightInfo only.
    assert_eq!(
        gateway.len(),
        2 * answered.len() + refused.len() + 1,
        "one record per Flight request"
    );
    let queries = by_query_id(&gateway);
    assert_eq!(
        queries.len(),
        answered.len() + refused.len() + 1,
        "one query id per statement"
    );
    let mut runs = Vec::new();
    for (id, records) in &queries {
        let steps: Vec<(&str, &str)> = records
            .iter()
            .map(|r| (text(r, "step"), text(r, "outcome")))
            .collect();
        let sql = text(records[0], "sql");
        if sql == stranger_sql {
            continue; // Checked last, below.
        }
        if answered.contains(&sql) {
            assert_eq!(
                steps,
                [("describe", "described"), ("run", "answered")],
                "{id}: {sql}"
            );
            let (describe, run) = (records[0], records[1]);
            assert_eq!(text(run, "sql"), sql);
            assert_eq!(
                describe["release_sql"], run["release_sql"],
                "{sql}: the run is the plan that was described"
            );
            runs.push(run);
        } else {
            assert_eq!(steps, [("describe", "refused")], "{id}: {sql}");
            assert_eq!(records[0]["codes"].as_array().unwrap().len(), 1, "{sql}");
        }
    }
    let two_releases = runs.iter().find(|r| text(r, "sql") == answered[2]).unwrap();
    assert_eq!(texts(two_releases, "release_sql").len(), 2);
    let unauthenticated = gateway
        .iter()
        .find(|r| text(r, "sql") == stranger_sql)
        .expect("the stranger's request is on record");
    assert_eq!(texts(unauthenticated, "codes"), ["E_UNAUTHENTICATED"]);
    assert_eq!(text(unauthenticated, "outcome"), "refused");
    assert_eq!(text(&unauthenticated["identity"], "user"), "");

    for (code, log) in &node_logs {
        let records = read_records(log).unwrap();
        let asked = by_query_id(&records);
        for record in &records {
            assert_eq!(
                text(record, "step"),
                "release",
                "{code}: the gateway only releases"
            );
            assert_eq!(text(record, "outcome"), "answered", "{code}: {record}");
            assert_eq!(
                text(record, "gateway"),
                "tally-gateway",
                "{code}: by certificate"
            );
            assert_eq!(
                text(&record["identity"], "user"),
                federation::DEMO_USER,
                "{code}: the trust verified who asked"
            );
        }
        for id in asked.keys() {
            assert!(
                runs.iter().any(|r| text(r, "query_id") == *id),
                "{code}: {id} is a query the gateway ran"
            );
        }
        for run in &runs {
            let id = text(run, "query_id");
            let mut sent = texts(run, "release_sql");
            sent.sort_unstable();
            let mut received: Vec<&str> = asked
                .get(id)
                .map(|records| records.iter().map(|r| text(r, "sql")).collect())
                .unwrap_or_default();
            received.sort_unstable();
            if texts(run, "trusts").contains(&code.as_str()) {
                assert_eq!(
                    received, sent,
                    "{code}: one record per release, and the trust ran what the gateway sent"
                );
            } else {
                assert!(received.is_empty(), "{code}: {id} did not reach it");
            }
        }
    }
    // GetFlightInfo is the step refused here, and the record says so.
    assert_eq!(
        text(unauthenticated, "step"),
        "describe",
        "a refused GetFlightInfo is recorded as a describe"
    );
}

/// Rewrites a log's lines with `change` and returns what `tally audit verify` says.
fn verify_after(path: &Path, original: &[String], change: impl Fn(&mut Vec<String>)) -> String {
    let mut lines = original.to_vec();
    change(&mut lines);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
    let out = tally()
        .args(["audit", "verify"])
        .arg(path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "tampering must be found");
    String::from_utf8_lossy(&out.stderr).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_deleting_or_reordering_any_record_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let (local, gateway_log, node_logs) = audited_federation(dir.path()).await;
    let mut client = AnalystClient::connect(&local.gateway_target(), &analyst_token())
        .await
        .unwrap();
    for sql in [
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
        "SELECT nhs_number FROM patients",
        "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
        "SELECT admission_method, COUNT(*) FROM episodes GROUP BY admission_method",
    ] {
        let _ = client.query(sql).await;
    }
    local.stop().await;
    for path in std::iter::once(&gateway_log).chain(node_logs.iter().map(|(_, log)| log)) {
        let out = tally()
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let original: Vec<String> = std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        assert!(original.len() >= 3, "{}", path.display());
        for k in 0..original.len() {
            let number = format!("record {}:", k + 1);
            let edited = verify_after(path, &original, |lines| {
                lines[k] = lines[k].replacen("\"time_ms\":1", "\"time_ms\":2", 1);
            });
            assert!(
                edited.contains(&number) && edited.contains("edited"),
                "{edited}"
            );
            let deleted = verify_after(path, &original, |lines| {
                lines.remove(k);
            });
            assert!(deleted.contains(&number), "{deleted}");
            if k + 1 < original.len() {
                let moved = verify_after(path, &original, |lines| lines.swap(k, k + 1));
                assert!(moved.contains(&number), "{moved}");
            }
        }
        std::fs::write(path, original.join("\n") + "\n").unwrap();
        let out = tally()
            .args(["audit", "verify"])
            .arg(path)
            .output()
            .unwrap();
        assert!(out.status.success(), "the untouched log verifies again");
    }
}

/// A gateway config file (TLS on) over `nodes`, logging to `log`, verifying the test run's
/// identity provider's tokens.
fn gateway_toml(dir: &Path, nodes: &[(String, std::net::SocketAddr)], log: &Path) -> PathBuf {
    let certs = certs();
    let jwt = identity_provider().jwt_config();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\npolicies = {:?}\naudit_log = {:?}\nbudget_ledger = {:?}\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n[node_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n[jwt]\njwks = {:?}\nissuer = {:?}\naudience = {:?}\n",
        default_policies(),
        log,
        dir.join("gateway-ledger.jsonl"),
        certs.gateway_server().cert,
        certs.gateway_server().key,
        certs.gateway_client().cert,
        certs.gateway_client().key,
        certs.ca(),
        jwt.jwks,
        jwt.issuer,
        jwt.audience,
    );
    for (code, addr) in nodes {
        toml.push_str(&format!(
            "\n[[nodes]]\ncode = \"{code}\"\nurl = \"grpc+tls://{addr}\"\n"
        ));
    }
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_queries_leaves_a_log_that_verifies() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = audited_nodes(dir.path()).await;
    let endpoints: Vec<_> = nodes
        .iter()
        .map(|(code, node, _)| (code.clone(), node.listen_addr.unwrap()))
        .collect();
    let log = dir.path().join("gateway.jsonl");
    let config = gateway_toml(dir.path(), &endpoints, &log);
    let queries = [
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
        "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
        "SELECT admission_method, COUNT(*) FROM episodes GROUP BY admission_method",
    ];
    for round in 0..2 {
        let (mut child, addr) = spawn_gateway(&config);
        let mut client = AnalystClient::connect(&gateway_target(addr), &analyst_token())
            .await
            .unwrap();
        for sql in queries {
            client.query(sql).await.unwrap();
        }
        child.kill().unwrap(); // SIGKILL: no shutdown code runs.
        child.wait().unwrap();
        let out = tally()
            .args(["audit", "verify"])
            .arg(&log)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "round {round}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Each query's GetFlightInfo and DoGet, every round so far.
        let records = read_records(&log).unwrap();
        assert_eq!(records.len(), 2 * queries.len() * (round + 1));
        for sql in queries {
            let answered = records
                .iter()
                .filter(|r| text(r, "sql") == sql && text(r, "outcome") == "answered")
                .count();
            assert_eq!(answered, round + 1, "every answered query is on record");
        }
    }
    tokio::time::sleep(Duration::from_millis(10)).await;
    for (_, node, _) in nodes {
        node.stop().await;
    }
}
