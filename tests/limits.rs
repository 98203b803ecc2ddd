//! Limits that protect the trusts: rate, size, depth, time and memory. Each breach is a
//! typed error and is audited.

use tally::client::AnalystClient;
use tally::federation;
use tally_gateway::GatewayHandle;
use tally_synth::default_trusts;

use crate::support::{
    data_dir, expect_refusal, gateway_config, gateway_target, init_logging, open_policies, tls,
};

const SQL: &str = "SELECT sex, COUNT(*) FROM patients GROUP BY sex";

/// A second analyst in the same project.
const COLLEAGUE_TOKEN: &str = "colleague-token";

/// Nodes for every trust with `node_limits`, behind a gateway with `gateway_limits`.
async fn limited(
    gateway_limits: tally_gateway::GatewayLimits,
    node_limits: tally_node::NodeLimits,
) -> (GatewayHandle, Vec<tally_node::NodeHandle>) {
    init_logging();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in default_trusts() {
        let mut config = federation::node_config(
            data_dir(),
            &trust,
            &open_policies(),
            &tls(),
            &crate::support::identity_provider(),
        );
        config.limits = node_limits.clone();
        let node = tally_node::start(&config).await.unwrap();
        endpoints.push((trust.code.to_string(), trust.name.to_string(), node.addr));
        nodes.push(node);
    }
    let mut config = gateway_config(&endpoints, &open_policies());
    config.limits = gateway_limits;
    let mut colleague = config.users[0].clone();
    colleague.name = "colleague".into();
    colleague.token_sha256 = tally_gateway::token_hash(COLLEAGUE_TOKEN);
    config.users.push(colleague);
    (tally_gateway::start(&config).await.unwrap(), nodes)
}

async fn stop(gateway: GatewayHandle, nodes: Vec<tally_node::NodeHandle>) {
    gateway.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// The last gateway audit record's outcome and codes.
fn last_record(gateway: &GatewayHandle) -> (String, Vec<String>) {
    let record = gateway.gateway.audit().recent().pop().expect("a record");
    (record.outcome.to_string(), record.codes)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_limits_refuse_with_typed_errors_and_are_audited() {
    let limits = tally_gateway::GatewayLimits {
        queries_per_minute_per_user: 3,
        queries_per_minute_per_project: 5,
        max_sql_bytes: 300,
        max_plan_depth: 8,
        query_timeout_secs: 60.0,
    };
    let (gateway, nodes) = limited(limits, tally_node::NodeLimits::default()).await;
    let mut client = AnalystClient::connect(
        &gateway_target(gateway.addr),
        &crate::support::analyst_token(),
    )
    .await
    .unwrap();

    let long = format!("{SQL} -- {}", "x".repeat(400));
    let err = expect_refusal(client.query(&long).await);
    assert!(
        err.starts_with("E_TOO_LARGE") && err.contains("limit is 300"),
        "{err}"
    );
    assert_eq!(
        last_record(&gateway),
        ("refused".into(), vec!["E_TOO_LARGE".into()])
    );

    let deep = "SELECT n FROM (SELECT n FROM (SELECT n FROM (SELECT n FROM (SELECT n FROM \
                (SELECT COUNT(*) AS n FROM episodes) a) b) c) d) e";
    let err = expect_refusal(client.query(deep).await);
    assert!(
        err.starts_with("E_TOO_LARGE") && err.contains("plan"),
        "{err}"
    );
    assert_eq!(last_record(&gateway).1, ["E_TOO_LARGE"]);

    for _ in 0..3 {
        client.query(SQL).await.expect("within the rate");
    }
    let err = expect_refusal(client.query(SQL).await);
    assert!(
        err.starts_with("E_RATE_LIMITED") && err.contains("user 'analyst'"),
        "{err}"
    );
    assert_eq!(
        last_record(&gateway),
        ("refused".into(), vec!["E_RATE_LIMITED".into()])
    );

    // The project's allowance is shared: the colleague gets the two that are left.
    let mut colleague = AnalystClient::connect(&gateway_target(gateway.addr), COLLEAGUE_TOKEN)
        .await
        .unwrap();
    for _ in 0..2 {
        colleague
            .query(SQL)
            .await
            .expect("within the project's rate");
    }
    let err = expect_refusal(colleague.query(SQL).await);
    assert!(
        err.starts_with("E_RATE_LIMITED") && err.contains("project 'uec-demand'"),
        "{err}"
    );
    assert_eq!(last_record(&gateway).1, ["E_RATE_LIMITED"]);
    stop(gateway, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_and_memory_limits_stop_queries_with_typed_errors() {
    // The gateway's end-to-end limit.
    let hurried = tally_gateway::GatewayLimits {
        query_timeout_secs: 0.000_001,
        ..Default::default()
    };
    let (gateway, nodes) = limited(hurried, tally_node::NodeLimits::default()).await;
    let mut client = AnalystClient::connect(
        &gateway_target(gateway.addr),
        &crate::support::analyst_token(),
    )
    .await
    .unwrap();
    let err = expect_refusal(client.query(SQL).await);
    assert!(err.starts_with("E_QUERY_TIMEOUT"), "{err}");
    assert_eq!(
        last_record(&gateway),
        ("failed".into(), vec!["E_QUERY_TIMEOUT".into()])
    );
    stop(gateway, nodes).await;

    // Each node's own limit, whatever the gateway allows.
    let node_hurried = tally_node::NodeLimits {
        query_timeout_secs: 0.000_001,
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), node_hurried).await;
    let mut client = AnalystClient::connect(
        &gateway_target(gateway.addr),
        &crate::support::analyst_token(),
    )
    .await
    .unwrap();
    let err = expect_refusal(client.query(SQL).await);
    assert!(
        err.starts_with("E_TRUST_TIMEOUT") && err.contains("E_QUERY_TIMEOUT"),
        "{err}"
    );
    for node in &nodes {
        let record = node.audit.recent().pop().expect("every node audited it");
        assert_eq!(record.outcome, "failed");
        assert_eq!(record.codes, ["E_QUERY_TIMEOUT"]);
    }
    stop(gateway, nodes).await;

    // A node's memory pool: a join's hash table does not fit in 16 KiB.
    let small = tally_node::NodeLimits {
        memory_limit_mb: 1.0 / 64.0,
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), small).await;
    let mut client = AnalystClient::connect(
        &gateway_target(gateway.addr),
        &crate::support::analyst_token(),
    )
    .await
    .unwrap();
    let err = expect_refusal(
        client
            .query(
                "SELECT p.sex, e.specialty, COUNT(*), SUM(e.cost) FROM episodes e \
                 JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex, e.specialty",
            )
            .await,
    );
    assert!(
        err.starts_with("E_TRUST_FAILED") && err.contains("E_RESOURCES"),
        "{err}"
    );
    assert!(
        !err.contains("Resources exhausted"),
        "no engine text: {err}"
    );
    stop(gateway, nodes).await;
}
