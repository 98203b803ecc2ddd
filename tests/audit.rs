//! The audit trail: one gateway record per request and one record at every node it reached,
//! joined by query id; tampering named by `tally audit verify`; a killed gateway's log
//! still verifies and holds every answered query.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;
use tally::client::AnalystClient;
use tally::federation::{self, DEMO_USER};
use tally_common::audit::read_records;

use crate::support::{
    audited_federation, audited_nodes, certs, default_policies, expect_refusal, gateway_target,
    init_logging,
};

fn tally() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tally"))
}

fn text<'a>(record: &'a Value, field: &str) -> &'a str {
    record[field].as_str().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_request_has_one_gateway_record_and_one_per_node_reached() {
    let dir = tempfile::tempdir().unwrap();
    let (local, gateway_log, node_logs) = audited_federation(dir.path()).await;
    let mut client =
        AnalystClient::connect(&local.gateway_target(), &crate::support::analyst_token())
            .await
            .unwrap();
    let answered = [
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
        "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex",
        // Two fragments: each trust is asked twice under the one query id.
        "SELECT (SELECT COUNT(*) FROM episodes) AS episodes, (SELECT COUNT(*) FROM patients) AS patients",
    ];
    for sql in answered {
        client.query(sql).await.unwrap();
    }
    for sql in [
        "SELECT nhs_number FROM patients",
        "SELECT postcode, COUNT(*) FROM patients GROUP BY postcode",
        "SELEC nonsense",
    ] {
        expect_refusal(client.query(sql).await);
    }
    let mut stranger = AnalystClient::connect(&local.gateway_target(), "wrong-token")
        .await
        .unwrap();
    expect_refusal(stranger.query(answered[0]).await);
    local.stop().await;

    let gateway = read_records(&gateway_log).unwrap();
    assert_eq!(gateway.len(), answered.len() + 4, "one record per request");
    let ids: BTreeSet<&str> = gateway.iter().map(|r| text(r, "query_id")).collect();
    assert_eq!(ids.len(), gateway.len(), "query ids are unique");
    let by_id: BTreeMap<&str, &Value> = gateway.iter().map(|r| (text(r, "query_id"), r)).collect();
    let outcomes: Vec<&str> = gateway.iter().map(|r| text(r, "outcome")).collect();
    assert_eq!(outcomes.iter().filter(|o| **o == "answered").count(), 3);

    for (code, log) in &node_logs {
        let records = read_records(log).unwrap();
        let mut asked: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for record in &records {
            assert_eq!(text(record, "step"), "run", "{code}: the gateway only runs");
            assert_eq!(
                text(record, "gateway"),
                "tally-gateway",
                "{code}: by certificate"
            );
            let id = text(record, "query_id");
            assert!(by_id.contains_key(id), "{code}: {id} has a gateway record");
            asked.entry(id).or_default().push(text(record, "sql"));
        }
        for record in &gateway {
            let id = text(record, "query_id");
            let reached = record["trusts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|t| t.as_str() == Some(code));
            let fragments: BTreeSet<&str> = record["fragments"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(Value::as_str)
                .collect();
            match asked.get(id) {
                Some(sqls) => {
                    assert!(
                        reached,
                        "{code}: node records only for queries that reached it"
                    );
                    assert_eq!(
                        sqls.len(),
                        fragments.len(),
                        "{code}: one record per fragment"
                    );
                    let sqls: BTreeSet<&str> = sqls.iter().copied().collect();
                    assert_eq!(
                        sqls, fragments,
                        "{code}: the node ran what the gateway sent"
                    );
                }
                None => assert!(!reached, "{code}: {id} reached the node but left no record"),
            }
        }
    }
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
    let mut client =
        AnalystClient::connect(&local.gateway_target(), &crate::support::analyst_token())
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

/// A gateway config file (TLS on) over `nodes`, logging to `log`.
fn gateway_toml(dir: &Path, nodes: &[(String, std::net::SocketAddr)], log: &Path) -> PathBuf {
    let certs = certs();
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\npolicies = {:?}\naudit_log = {:?}\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n[node_tls]\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n[[users]]\nname = \"{DEMO_USER}\"\ntoken_sha256 = \"{}\"\nprojects = [\"{}\"]\ndefault_project = \"{}\"\ndefault_purpose = \"planning\"\n",
        default_policies(),
        log,
        certs.gateway_server().cert,
        certs.gateway_server().key,
        certs.gateway_client().cert,
        certs.gateway_client().key,
        certs.ca(),
        tally_gateway::token_hash(federation::DEMO_STATIC_TOKEN),
        federation::DEMO_PROJECT,
        federation::DEMO_PROJECT,
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

/// Starts `tally gateway` and waits for the address it prints.
fn spawn_gateway(config: &Path) -> (Child, std::net::SocketAddr) {
    let mut child = tally()
        .args(["gateway", "--config"])
        .arg(config)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines
            .next()
            .expect("the gateway prints its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("gateway on grpc+tls://") {
            break addr.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_killed_between_queries_leaves_a_log_that_verifies() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = audited_nodes(dir.path()).await;
    let endpoints: Vec<_> = nodes
        .iter()
        .map(|(code, node, _)| (code.clone(), node.addr))
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
        let mut client =
            AnalystClient::connect(&gateway_target(addr), &crate::support::analyst_token())
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
        let records = read_records(&log).unwrap();
        assert_eq!(records.len(), queries.len() * (round + 1));
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
