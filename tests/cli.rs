//! The `tally` binary as a newcomer uses it: `--help`, `demo --exit`, `query` formats.

use std::process::Command;

use crate::support::{data_dir, default_policies, start_federation};

fn tally() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tally"))
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "demo", "node", "gateway", "query", "generate", "policy", "audit", "bench",
    ] {
        let out = tally().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: tally"),
            "{sub} --help prints usage"
        );
    }
}

#[test]
fn demo_runs_its_showcase_and_exits() {
    let out = tally()
        .args(["demo", "--exit", "--port", "0", "--data"])
        .arg(data_dir())
        .arg("--policies")
        .arg(default_policies())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("refused: E_IDENTIFIER_COLUMN"), "{stdout}");
    assert!(
        stdout.contains("TLS on: mutual TLS") && stdout.contains("gateway on grpc+tls://"),
        "the demo runs with TLS by default: {stdout}"
    );
    assert!(
        stdout.contains("(E_NOT_AGGREGATE)") && stdout.contains("(E_QUASI_IDENTIFIER)"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches("trusts answered: RXA, RXB, RXC").count(),
        5,
        "{stdout}"
    );
    assert!(stdout.contains("with this signed token"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_prints_csv_and_json() {
    let local = start_federation().await;
    let url = local.gateway_url();
    let token = local.analyst_token().unwrap();
    let ca = crate::support::certs().ca();
    let sql = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex";
    let run = |format: &'static str, sql: &'static str| {
        let (url, ca, token) = (url.clone(), ca.clone(), token.clone());
        tokio::task::spawn_blocking(move || {
            tally()
                .args([
                    "query",
                    "--gateway",
                    &url,
                    "--ca-cert",
                    ca.to_str().unwrap(),
                    "--token",
                    &token,
                    "--format",
                    format,
                    sql,
                ])
                .output()
                .unwrap()
        })
    };
    let csv = run("csv", sql).await.unwrap();
    assert!(
        csv.status.success(),
        "{}",
        String::from_utf8_lossy(&csv.stderr)
    );
    let text = String::from_utf8_lossy(&csv.stdout);
    assert!(text.starts_with("sex,n\n"), "{text}");
    assert!(String::from_utf8_lossy(&csv.stderr).contains("trusts answered: RXA, RXB, RXC"));
    let json = run("json", sql).await.unwrap();
    let parsed: serde_json::Value = serde_json::from_slice(&json.stdout).expect("valid JSON");
    let total: i64 = parsed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["n"].as_i64().unwrap())
        .sum();
    let manifest: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(data_dir().join("manifest.json")).unwrap())
            .unwrap();
    let patients: i64 = manifest["trusts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["patients"].as_i64().unwrap())
        .sum();
    assert_eq!(total, patients, "counts add up to the generated patients");
    let refused = run("table", "SELECT nhs_number FROM patients")
        .await
        .unwrap();
    assert!(!refused.status.success(), "a refusal exits non-zero");
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("error: E_NOT_AGGREGATE"), "{stderr}");

    let tests = tally()
        .args(["policy", "test"])
        .arg(default_policies())
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&tests.stdout);
    assert!(tests.status.success(), "{report}");
    assert!(report.contains(" passed, 0 failed"), "{report}");
    local.stop().await;
}

#[test]
fn example_configs_load_and_bad_configs_say_why() {
    let examples = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for code in ["rxa", "rxb", "rxc"] {
        let config = tally_node::NodeConfig::load(&examples.join(format!("node-{code}.toml")))
            .expect("example node config");
        assert_eq!(config.trust.code, code.to_uppercase());
        assert_eq!(config.tables.len(), 3);
        let tls = config.tls.expect("the example node runs mutual TLS");
        assert_eq!(tls.allowed_gateways, [tally::certs::GATEWAY_IDENTITY]);
        assert!(
            config
                .tables
                .iter()
                .all(|t| t.path.is_absolute() || t.path.starts_with(&examples))
        );
    }
    let gateway = tally_gateway::GatewayConfig::load(&examples.join("gateway.toml"))
        .expect("example gateway config");
    assert_eq!(gateway.nodes.len(), 3);
    gateway
        .validate()
        .expect("the example gateway needs no --insecure-loopback");
    assert!(gateway.nodes.iter().all(|node| node.uses_tls()));
    assert_eq!(
        gateway.users[0].token_sha256,
        tally_gateway::token_hash(tally::federation::DEMO_STATIC_TOKEN)
    );

    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "listen = \"127.0.0.1:1\"\npolicies = \"p\"\ntables = []\n[trust]\ncode = \"RXA\"\nname = \"A\"\n",
            "at least one [[tables]]",
        ),
        (
            "policies = \"p\"\n[trust]\ncode = \"R X\"\nname = \"A\"\n[[tables]]\nname = \"t\"\npath = \"t.parquet\"\n",
            "trust code 'R X'",
        ),
        (
            "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\ncolour = 1\n[[tables]]\nname = \"t\"\npath = \"t.parquet\"\n",
            "unknown field `colour`",
        ),
        ("[trust]\ncode = \"RXA\"\n", "missing field"),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, text).unwrap();
        let err = tally_node::NodeConfig::load(&path)
            .expect_err(text)
            .to_string();
        assert!(err.contains(expected), "{err}");
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "request_timeout_secs = -1\npolicies = \"p\"\n[[nodes]]\ncode = \"A\"\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    let err = tally_gateway::GatewayConfig::load(&path)
        .expect_err("negative timeout")
        .to_string();
    assert!(err.contains("request_timeout_secs"), "{err}");
}

#[test]
fn policy_explain_prints_facts_and_decision() {
    let out = tally()
        .args([
            "policy",
            "explain",
            "--user",
            "analyst",
            "--project",
            "uec-demand",
            "--purpose",
            "research",
            "--policies",
        ])
        .arg(default_policies())
        .arg("--data")
        .arg(data_dir())
        .arg("SELECT postcode, COUNT(*) FROM patients GROUP BY postcode")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let explained: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(explained["decision"]["allow"], false);
    let codes: Vec<&str> = explained["decision"]["reasons"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, vec!["E_QUASI_IDENTIFIER"]);
    assert_eq!(explained["decision"]["obligations"]["apply_opt_out"], true);
    let columns = explained["input"]["action"]["columns"].as_array().unwrap();
    assert!(columns.iter().any(|c| c["column"] == "postcode"
        && c["class"] == "quasi_identifier"
        && c["usage"] == "group_by"));
    assert_eq!(
        explained["input"]["context"]["identity"]["purpose"],
        "research"
    );
}

#[test]
fn a_users_file_adds_analysts() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("users.toml"),
        format!(
            "[[users]]\nname = \"ada\"\ntoken_sha256 = \"{}\"\nprojects = [\"uec-demand\"]\n",
            tally_gateway::token_hash("ada-token")
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("gateway.toml"),
        "policies = \"policies\"\nusers_file = \"users.toml\"\n[[nodes]]\ncode = \"RXA\"\nurl = \"grpc://127.0.0.1:1\"\n",
    )
    .unwrap();
    let config = tally_gateway::GatewayConfig::load(&dir.path().join("gateway.toml")).unwrap();
    assert_eq!(config.users.len(), 1);
    assert_eq!(config.users[0].name, "ada");
    assert_eq!(config.policies, dir.path().join("policies"));
}
