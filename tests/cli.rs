//! The `tally` binary as a newcomer uses it: `--help`, `demo --exit`, `query` formats,
//! example configs, `policy explain`.

use tally_common::identity::JwtVerifier;

use crate::support::{data_dir, default_policies, identity_provider, start_federation, tally};

#[test]
fn every_subcommand_has_help() {
    for sub in [
        "demo", "node", "gateway", "query", "budget", "generate", "policy", "audit",
    ] {
        let out = tally().args([sub, "--help"]).output().unwrap();
        assert!(out.status.success(), "{sub} --help");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: tally"),
            "{sub} --help prints usage"
        );
    }
    // The benchmark harness is its own binary (`tally-bench`), not part of what a trust runs.
    let bench = tally().args(["bench", "--help"]).output().unwrap();
    assert!(!bench.status.success(), "tally has no bench subcommand");
}

/// The binary carries its default policy: the demo runs from an empty folder (nothing of
/// the repository around it) without `--policies`, and a `--policies` folder that does not
/// exist is an error naming the flag.
#[test]
fn the_demo_runs_anywhere_on_its_built_in_policy() {
    let empty = tempfile::tempdir().unwrap();
    let missing = tally()
        .current_dir(empty.path())
        .args([
            "demo",
            "--exit",
            "--port",
            "0",
            "--policies",
            "no-such-folder",
        ])
        .output()
        .unwrap();
    assert!(!missing.status.success());
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("--policies no-such-folder: no such folder"),
        "{stderr}"
    );

    let data = empty.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for entry in std::fs::read_dir(data_dir()).unwrap() {
        let entry = entry.unwrap();
        let skipped = ["idp", "policies", "state"];
        if entry.path().is_dir() && !skipped.iter().any(|name| entry.file_name() == *name) {
            let to = data.join(entry.file_name());
            std::fs::create_dir_all(&to).unwrap();
            for file in std::fs::read_dir(entry.path()).unwrap() {
                let file = file.unwrap();
                std::fs::copy(file.path(), to.join(file.file_name())).unwrap();
            }
        } else if entry.path().is_file() {
            std::fs::copy(entry.path(), data.join(entry.file_name())).unwrap();
        }
    }
    let out = tally()
        .current_dir(empty.path())
        .args([
            "demo",
            "--exit",
            "--port",
            "0",
            "--insecure-loopback",
            "--data",
            "data",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.matches("trusts answered: RXA, RXB, RXC").count(),
        5,
        "{stdout}"
    );
    for (name, text) in tally::federation::EMBEDDED_POLICIES {
        let written = std::fs::read_to_string(data.join("policies").join(name)).unwrap();
        assert_eq!(written, text, "{name} is the built-in policy");
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
    // Asking for patient rows is refused by the query model: no release can list rows.
    assert!(stdout.contains("refused: E_NOT_AGGREGATE"), "{stdout}");
    assert!(
        stdout.contains("Privacy budget of project 'uec-demand' at each trust"),
        "{stdout}"
    );
    assert!(
        stdout.contains(" ± "),
        "noisy values print with their interval: {stdout}"
    );
    assert!(
        stdout.contains("TLS on: mutual TLS") && stdout.contains("gateway on grpc+tls://"),
        "the demo runs with TLS by default: {stdout}"
    );
    assert_eq!(
        stdout.matches("trusts answered: RXA, RXB, RXC").count(),
        5,
        "{stdout}"
    );
    // The printed token is a signed JWT for the demo analyst that the trusts' key set verifies.
    let token = stdout
        .lines()
        .skip_while(|line| !line.contains("with this signed token"))
        .nth(1)
        .unwrap_or_else(|| panic!("the demo prints a token: {stdout}"));
    let verifier = JwtVerifier::load(&identity_provider().jwt_config()).unwrap();
    let identity = verifier.verify(token).expect("the printed token verifies");
    assert_eq!(identity.user, tally::federation::DEMO_USER);
    assert_eq!(
        identity.approvals[tally::federation::DEMO_PROJECT],
        ["planning", "research"]
    );
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
        let jwt = config
            .identity
            .jwt
            .expect("the example node verifies analysts' tokens");
        assert_eq!(jwt.issuer, tally::tokens::ISSUER);
        assert!(
            !config.identity.trust_gateway_identity,
            "the example node does not take the gateway's word for who is asking"
        );
        assert!(
            config
                .tables
                .iter()
                .all(|t| t.path.as_ref().is_some_and(|p| p.starts_with(&examples)))
        );
    }
    let in_database = tally_node::NodeConfig::load(&examples.join("node-rxb-postgres.toml"))
        .expect("example node config over PostgreSQL");
    assert!(
        in_database
            .tables
            .iter()
            .all(|t| t.path.is_none() && t.postgres.is_some())
    );
    let postgres = in_database.postgres.expect("the [postgres] section");
    assert!(
        postgres
            .password_file
            .is_some_and(|file| file.starts_with(&examples)),
        "the password file is relative to the config"
    );
    let gateway = tally_gateway::GatewayConfig::load(&examples.join("gateway.toml"))
        .expect("example gateway config");
    assert_eq!(gateway.nodes.len(), 3);
    gateway
        .validate()
        .expect("the example gateway needs no --insecure-loopback");
    assert!(
        gateway
            .nodes
            .iter()
            .all(|node| node.uses_tls() || node.dials_in)
    );
    let rxc = tally_node::NodeConfig::load(&examples.join("node-rxc.toml")).unwrap();
    assert_eq!(rxc.listen_addr(), None, "the example RXC only dials out");
    assert_eq!(
        rxc.gateway.map(|g| g.address),
        gateway.trust_port.map(|p| p.listen.to_string()),
        "it dials the example gateway's port for trusts"
    );
    assert_eq!(
        gateway.users[0].token_sha256,
        tally_gateway::token_hash(tally::federation::DEMO_STATIC_TOKEN)
    );

    let dir = tempfile::tempdir().unwrap();
    // Every node config names how the trust knows who is asking.
    let identity = "[identity]\ntrust_gateway_identity = false\n";
    let tables = "[[tables]]\nname = \"t\"\npath = \"t.parquet\"\n";
    let cases = [
        (
            format!(
                "listen = \"127.0.0.1:1\"\npolicies = \"p\"\ntables = []\n[trust]\ncode = \"RXA\"\nname = \"A\"\n{identity}"
            ),
            "at least one [[tables]]",
        ),
        (
            format!("policies = \"p\"\n[trust]\ncode = \"R X\"\nname = \"A\"\n{identity}{tables}"),
            "trust code 'R X'",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\ncolour = 1\n{identity}{tables}"
            ),
            "unknown field `colour`",
        ),
        (
            format!("policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n{tables}"),
            "missing field `identity`",
        ),
        ("[trust]\ncode = \"RXA\"\n".to_string(), "missing field"),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[gateway]\naddress = \"gw:7443\"\n{identity}{tables}"
            ),
            "[gateway] needs the [tls] section",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[gateway]\naddress = \"gw\"\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\nallowed_gateways = [\"g\"]\n{identity}{tables}"
            ),
            "gateway.address 'gw' must be host:port",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[gateway]\naddress = \"gw:1\"\nproxy = \"socks5://p:1\"\n[tls]\ncert = \"c\"\nkey = \"k\"\nclient_ca = \"ca\"\nallowed_gateways = [\"g\"]\n{identity}{tables}"
            ),
            "must be an http:// URL",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[limits]\nmax_running_queries = 2\nmax_running_per_project = 3\n{identity}{tables}"
            ),
            "a per-tenant admission limit is larger than the whole",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[limits]\nmax_waiting_queries = 0\n{identity}{tables}"
            ),
            "admission limits must be at least 1",
        ),
        (
            format!(
                "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[limits]\nquery_cpu_secs = -1\n{identity}{tables}"
            ),
            "limits.query_cpu_secs must be between 0 and 86400 seconds",
        ),
    ];
    // Past the identity check, to the tables'.
    let head = "policies = \"p\"\n[trust]\ncode = \"RXA\"\nname = \"A\"\n[identity]\ntrust_gateway_identity = true\n";
    let postgres = "[postgres]\nconnection = \"host=/run/postgresql user=reader dbname=hes\"\n";
    let cases = cases
        .into_iter()
        .map(|(text, expected)| (text, expected.to_string()))
        .chain([
        (
            format!("{head}{postgres}[[tables]]\nname = \"t\"\npath = \"t.parquet\"\npostgres = \"t\"\n"),
            "sets both path and postgres".to_string(),
        ),
        (
            format!("{head}[[tables]]\nname = \"t\"\npostgres = \"t\"\n"),
            "there is no [postgres] section".to_string(),
        ),
        (
            format!("{head}{postgres}[[tables]]\nname = \"t\"\n"),
            "needs path (files) or postgres".to_string(),
        ),
        (
            format!("{head}{postgres}[[tables]]\nname = \"t\"\npostgres = \"a.b.c\"\n"),
            "must be a table or view name".to_string(),
        ),
        (
            format!("{head}{postgres}[[tables]]\nname = \"t\"\npostgres = \"t\"\nformat = \"csv\"\n"),
            "format applies to files".to_string(),
        ),
        (
            format!(
                "{head}[postgres]\nconnection = \"host=/run/postgresql user=r password=hunter2\"\n[[tables]]\nname = \"t\"\npostgres = \"t\"\n"
            ),
            "put it in password_file".to_string(),
        ),
        (
            format!("{head}{tables}[opt_out]\npath = \"o.parquet\"\npatients_table = \"t\"\npatient_key = \"a b\"\n"),
            "opt_out.patient_key 'a b'".to_string(),
        ),
    ]);
    for (text, expected) in cases {
        let path = dir.path().join("node.toml");
        std::fs::write(&path, &text).unwrap();
        let err = tally_node::NodeConfig::load(&path)
            .expect_err(&text)
            .to_string();
        assert!(err.contains(expected.as_str()), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
    let path = dir.path().join("gateway.toml");
    std::fs::write(&path, "request_timeout_secs = -1\npolicies = \"p\"\n[[nodes]]\ncode = \"A\"\nurl = \"http://127.0.0.1:1\"\n").unwrap();
    let err = tally_gateway::GatewayConfig::load(&path)
        .expect_err("negative timeout")
        .to_string();
    assert!(err.contains("request_timeout_secs"), "{err}");
    for (nodes, expected) in [
        (
            "[[nodes]]\ncode = \"A\"\ndials_in = true\n",
            "no [trust_port] section",
        ),
        (
            "[[nodes]]\ncode = \"A\"\ndials_in = true\nurl = \"grpc://127.0.0.1:1\"\n",
            "not both",
        ),
        (
            "[[nodes]]\ncode = \"A\"\n",
            "needs a url, or dials_in = true",
        ),
    ] {
        std::fs::write(&path, format!("policies = \"p\"\n{nodes}")).unwrap();
        let mut config = tally_gateway::GatewayConfig::load(&path).unwrap();
        config.insecure_loopback = true;
        let err = config.validate().expect_err(nodes);
        assert!(err.contains(expected), "{err}");
    }
    // Two trusts that would accept the same certificate.
    std::fs::write(
        &path,
        "policies = \"p\"\n[[nodes]]\ncode = \"RXC\"\ndials_in = true\n[[nodes]]\ncode = \"rxc\"\ndials_in = true\n",
    )
    .unwrap();
    let err = tally_gateway::GatewayConfig::load(&path)
        .expect_err("two trusts, one certificate name")
        .to_string();
    assert!(
        err.contains("expects the certificate name 'rxc.node.tally'"),
        "{err}"
    );
}

/// Runs `tally policy explain` over the test data for the demo analyst in `project` for
/// `purpose`: its stdout (JSON) on success, its stderr otherwise.
fn explain(project: &str, purpose: &str, sql: &str) -> Result<serde_json::Value, String> {
    let out = tally()
        .args([
            "policy",
            "explain",
            "--user",
            "analyst",
            "--project",
            project,
        ])
        .args(["--purpose", purpose, "--policies"])
        .arg(default_policies())
        .arg("--data")
        .arg(data_dir())
        .arg(sql)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).to_string())
    }
}

#[test]
fn policy_explain_prints_the_releases_inputs_and_decision() {
    let sql = "SELECT age_band(age_at_admission) AS band, COUNT(*) FROM episodes \
               WHERE cost > 5000 GROUP BY 1";
    let explained = explain("uec-demand", "research", sql).unwrap();
    let release = &explained["releases"][0];
    assert_eq!(explained["releases"].as_array().unwrap().len(), 1);
    assert_eq!(release["fact"], "episodes");
    assert_eq!(
        release["group_by"][0]["column"]["column"],
        "age_at_admission"
    );
    assert_eq!(release["group_by"][0]["generaliser"], "age_band");
    assert_eq!(release["filter"]["op"], "compare");
    assert_eq!(release["filter"]["cmp"], "gt");
    assert_eq!(release["aggregates"][0]["function"], "count_rows");
    let rendered = explained["release_sql"][0].as_str().unwrap();
    assert!(
        rendered.contains("age_band(episodes.age_at_admission)")
            && rendered.contains("WHERE episodes.cost > 5000"),
        "{rendered}"
    );
    let input = &explained["inputs"][0];
    assert_eq!(input["context"]["identity"]["purpose"], "research");
    assert_eq!(
        input["action"]["release"], *release,
        "the input holds the model itself"
    );
    let columns = input["action"]["columns"].as_array().unwrap();
    assert!(columns.iter().any(|c| c["column"] == "age_at_admission"
        && c["class"] == "quasi_identifier"
        && c["usage"] == "group_by"
        && c["generaliser"] == "age_band"));
    assert!(
        columns
            .iter()
            .any(|c| c["column"] == "cost" && c["class"] == "measure" && c["usage"] == "filter")
    );
    let decision = &explained["decision"]["Ok"];
    assert_eq!(decision["allow"], true, "{explained}");
    assert_eq!(decision["obligations"]["apply_opt_out"], true);
    assert_eq!(
        decision["obligations"]["budget"],
        serde_json::json!({"dataset": "hes", "rho_per_release": 0.05, "rho_cap": 2.0}),
        "the policy sets what a release costs and what the project may spend"
    );

    // The policy's refusal is the decision; the model is still shown.
    let refused = explain(
        "cardiac-audit",
        "research",
        "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
    )
    .unwrap();
    assert_eq!(refused["releases"][0]["fact"], "patients");
    let reason = refused["decision"]["Err"].as_str().unwrap();
    assert!(reason.starts_with("E_TABLE_NOT_ALLOWED"), "{reason}");

    // What the code's floor refuses never lowers to a release: explain says why.
    let err = explain(
        "uec-demand",
        "research",
        "SELECT postcode, COUNT(*) FROM patients GROUP BY postcode",
    )
    .unwrap_err();
    assert!(err.contains("error: E_QUASI_IDENTIFIER"), "{err}");
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

/// Under the default policy `tally query` prints each noisy value with its 95% interval, and
/// `tally budget` shows what the project spent: one release, and nothing more for a repeat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_shows_intervals_and_budget_shows_the_spend() {
    let local =
        crate::support::start_federation_over(data_dir(), &crate::support::default_policies())
            .await;
    let url = local.gateway_url();
    let token = local.analyst_token().unwrap();
    let ca = crate::support::certs().ca();
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || tally().args(args).output().unwrap())
    };
    let common = |command: &str| {
        vec![
            command.to_string(),
            "--gateway".into(),
            url.clone(),
            "--ca-cert".into(),
            ca.display().to_string(),
            "--token".into(),
            token.clone(),
        ]
    };
    let mut query = common("query");
    query.push("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex".into());
    for _ in 0..2 {
        let out = run(query.clone()).await.unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains(" ± "), "{stdout}");
        assert!(stdout.contains("95% interval"), "{stdout}");
    }
    let out = run(common("budget")).await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("project uec-demand on dataset hes"),
        "{stdout}"
    );
    assert!(
        stdout.contains("spent      ρ = 0.0500") && stdout.contains("1 releases"),
        "one release, the repeat free: {stdout}"
    );
    assert!(stdout.contains("remaining  ρ = 1.9500"), "{stdout}");
    local.stop().await;
}
