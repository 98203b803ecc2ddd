//! Bad input gets typed errors, never panics or hangs: malformed SQL, unknown names, wrong
//! types, oversized queries, a trust that is down or silent, schema mismatch, corrupt files.
//! A trust that cannot be reached is named; a trust whose run fails is not (the failure could
//! depend on its data).

use std::time::{Duration, Instant};

use tally::client::AnalystClient;
use tally::federation;
use tally_synth::default_trusts;

use crate::support::{
    analyst, analyst_token, copy_of_data, expect_refusal, fresh_state, gateway_config,
    gateway_target, identity_provider, open_policies, start_federation, start_federation_over,
    start_node, tls,
};

/// Asserts that an error the analyst sees names none of the trusts, by code or by name.
pub fn assert_names_no_trust(err: &str) {
    for trust in default_trusts() {
        assert!(
            !err.contains(trust.code) && !err.contains(trust.name),
            "names trust {}: {err}",
            trust.code
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_and_refused_queries_get_our_codes() {
    let local = start_federation().await;
    let mut client = analyst(&local).await;
    let deep = format!(
        "SELECT COUNT(*) FROM episodes WHERE cost > {}1{}",
        "(".repeat(300),
        ")".repeat(300)
    );
    let long = format!(
        "SELECT COUNT(*) FROM episodes WHERE specialty IN ({})",
        vec!["'100'"; 20_000].join(",")
    );
    let cases: Vec<(String, &str)> = vec![
        ("SELEC COUNT(*) FROM episodes".into(), "E_SQL_SYNTAX"),
        ("SELECT COUNT(* FROM episodes".into(), "E_SQL_SYNTAX"),
        ("SELECT COUNT(*) FROM admissions".into(), "E_UNKNOWN_TABLE"),
        (
            "SELECT COUNT(*) FROM episodes WHERE colour = 'red'".into(),
            "E_UNKNOWN_COLUMN",
        ),
        ("SELECT SUM(specialty) FROM episodes".into(), "E_PLAN"),
        ("SELECT * FROM episodes".into(), "E_NOT_AGGREGATE"),
        (
            "SELECT e.cost, c.n FROM episodes e CROSS JOIN (SELECT COUNT(*) AS n FROM patients) c"
                .into(),
            "E_NOT_AGGREGATE",
        ),
        // Only COUNT, SUM, AVG, VAR and STDDEV run over patient rows.
        (
            "SELECT MEDIAN(cost) FROM episodes".into(),
            "E_AGG_NOT_ALLOWED",
        ),
        (
            "SELECT COUNT(DISTINCT person_id) FROM episodes".into(),
            "E_EXPR_SHAPE",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT * FROM episodes LIMIT 10) t".into(),
            "E_LIMIT_BELOW_AGGREGATE",
        ),
        (
            "SELECT specialty, COUNT(*) FROM episodes GROUP BY ROLLUP(specialty)".into(),
            "E_GROUPING_SETS",
        ),
        (
            "SELECT COUNT(*) FROM (SELECT cost, RANK() OVER (ORDER BY cost) AS r FROM episodes) t"
                .into(),
            "E_WINDOW",
        ),
        (
            "INSERT INTO episodes SELECT * FROM episodes".into(),
            "E_READ_ONLY",
        ),
        ("DROP TABLE episodes".into(), "E_READ_ONLY"),
        ("SHOW ALL".into(), "E_READ_ONLY"),
        (deep, "E_TOO_LARGE"),
        (long, "E_TOO_LARGE"),
    ];
    for (sql, code) in &cases {
        let started = Instant::now();
        let err = expect_refusal(client.query(sql).await);
        assert!(
            err.starts_with(code),
            "{}: expected {code}, got {err}",
            &sql[..sql.len().min(80)]
        );
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "refusals are quick"
        );
    }
    let unknown = expect_refusal(
        client
            .query("SELECT frobnicate(specialty), COUNT(*) FROM episodes GROUP BY 1")
            .await,
    );
    assert!(
        unknown.starts_with("E_PLAN: unknown function 'frobnicate'"),
        "{unknown}"
    );
    let types = expect_refusal(client.query("SELECT SUM(specialty) FROM episodes").await);
    assert!(
        !types.contains("Utf8") && !types.contains("DataFusion"),
        "no engine wording: {types}"
    );
    // None of these reached a trust.
    for node in &local.nodes {
        assert!(
            node.audit.recent().iter().all(|r| r.step != "release"),
            "refused queries never run"
        );
    }
    let mut stranger = AnalystClient::connect(&local.gateway_target(), "not-a-token")
        .await
        .unwrap();
    let err = expect_refusal(stranger.query("SELECT COUNT(*) FROM episodes").await);
    assert!(err.starts_with("E_UNAUTHENTICATED"), "{err}");
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_that_is_down_is_named_quickly() {
    let mut local = start_federation().await;
    let mut client = analyst(&local).await;
    client
        .query("SELECT COUNT(*) FROM episodes")
        .await
        .expect("all up");
    let down = local.nodes.pop().unwrap();
    down.stop().await;
    let started = Instant::now();
    let err = expect_refusal(client.query("SELECT COUNT(*) FROM episodes").await);
    assert!(err.starts_with("E_TRUST_UNAVAILABLE"), "{err}");
    assert!(err.contains("RXC"), "names the trust: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_trust_is_named_unavailable_quickly() {
    // A peer that accepts connections and never answers, not even the TLS handshake: the
    // trust cannot be reached, which says nothing about its data, so it is named.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let holder = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });
    let trusts = default_trusts();
    let node = start_node(&trusts[0], &open_policies()).await;
    let endpoints = vec![
        (
            trusts[0].code.to_string(),
            trusts[0].name.to_string(),
            node.listen_addr.unwrap(),
        ),
        (
            "SLOW".to_string(),
            "Silent Hospital".to_string(),
            silent_addr,
        ),
    ];
    let mut config = gateway_config(&endpoints, &open_policies());
    config.request_timeout_secs = 1.0;
    config.connect_timeout_secs = 1.0;
    let gateway = tally_gateway::start(&config)
        .await
        .expect("gateway starts with a trust down");
    let mut client = AnalystClient::connect(&gateway_target(gateway.addr), &analyst_token())
        .await
        .unwrap();
    let started = Instant::now();
    let err = expect_refusal(client.query("SELECT COUNT(*) FROM episodes").await);
    assert!(err.starts_with("E_TRUST_UNAVAILABLE"), "{err}");
    assert!(
        err.contains("SLOW") && err.contains("did not answer within 1 s"),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    gateway.stop().await;
    node.stop().await;
    holder.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_mismatch_names_the_trust_and_column() {
    let (_keep, dir) = copy_of_data();
    let rxc = dir.join("RXC").join("episodes.parquet");
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet("e", rxc.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let changed = ctx
        .sql(
            "SELECT episode_id, person_id, admission_date, discharge_date, admission_method, specialty, \
             diagnosis_icd10, procedure_opcs4, age_at_admission, length_of_stay, CAST(cost AS VARCHAR) AS cost FROM e",
        )
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    let file = std::fs::File::create(&rxc).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, changed[0].schema(), None).unwrap();
    for batch in &changed {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
    let local = start_federation_over(&dir, &open_policies()).await;
    let mut client = analyst(&local).await;
    let err = expect_refusal(client.query("SELECT SUM(cost) FROM episodes").await);
    assert!(err.starts_with("E_SCHEMA_MISMATCH"), "{err}");
    assert!(err.contains("RXC") && err.contains("'cost'"), "{err}");
    let fine = client
        .query("SELECT COUNT(*) FROM patients")
        .await
        .expect("other tables still work");
    assert_eq!(fine.trusts.len(), 3);
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_parquet_file_is_a_typed_error() {
    let (_keep, dir) = copy_of_data();
    let local = start_federation_over(&dir, &open_policies()).await;
    let mut client = analyst(&local).await;
    client
        .query("SELECT COUNT(*) FROM episodes")
        .await
        .expect("healthy first");
    let rxb = dir.join("RXB").join("episodes.parquet");
    let size = std::fs::metadata(&rxb).unwrap().len() as usize;
    std::fs::write(&rxb, vec![0x5a; size]).unwrap();
    // Reading the file fails at RXB only: one generic code that names no trust; the trust's
    // own log has the details.
    let err = expect_refusal(client.query("SELECT SUM(cost) FROM episodes").await);
    assert!(err.starts_with("E_TRUST_FAILED"), "{err}");
    assert_names_no_trust(&err);
    assert!(
        !err.to_lowercase().contains("parquet"),
        "no engine text: {err}"
    );
    let record = local.nodes[1].audit.recent().pop().expect("RXB audited it");
    assert_eq!(record.outcome, "failed", "{record:?}");
    assert!(!record.codes.is_empty(), "{record:?}");
    local.stop().await;

    // A node refuses to start on a corrupt file, naming the table.
    let config = federation::node_config(
        &dir,
        &default_trusts()[1],
        &open_policies(),
        &tls(),
        &identity_provider(),
        &fresh_state(),
    );
    let err = tally_node::start(&config)
        .await
        .err()
        .expect("corrupt file at start-up");
    assert!(err.to_string().contains("table 'episodes'"), "{err}");
}
