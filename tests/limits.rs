//! Limits that protect the trusts: rate, size, depth, time and memory. Each breach is a
//! typed error and is audited; a limit reached at a trust never names the trust.

use tally::client::AnalystClient;
use tally::federation;
use tally_gateway::GatewayHandle;
use tally_synth::default_trusts;

use crate::bad_input::assert_names_no_trust;
use crate::support::{
    analyst_token, data_dir, expect_refusal, fresh_state, gateway_config, gateway_target,
    identity_provider, init_logging, open_policies, tls,
};

const SQL: &str = "SELECT sex, COUNT(*) FROM patients GROUP BY sex";

/// A signed token for a second analyst in the demo analyst's project.
fn colleague_token() -> String {
    let claims = tally::tokens::TokenClaims {
        user: "colleague".into(),
        ..federation::demo_claims()
    };
    identity_provider()
        .mint(&claims, federation::DEMO_TOKEN_LIFETIME)
        .unwrap()
}

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
            &identity_provider(),
            &fresh_state(),
        );
        config.limits = node_limits.clone();
        let node = tally_node::start(&config).await.unwrap();
        endpoints.push((
            trust.code.to_string(),
            trust.name.to_string(),
            node.listen_addr.unwrap(),
        ));
        nodes.push(node);
    }
    let mut config = gateway_config(&endpoints, &open_policies());
    config.limits = gateway_limits;
    (tally_gateway::start(&config).await.unwrap(), nodes)
}

async fn stop(gateway: GatewayHandle, nodes: Vec<tally_node::NodeHandle>) {
    gateway.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// An analyst client of `gateway` signed in with `token`.
async fn connect(gateway: &GatewayHandle, token: &str) -> AnalystClient {
    AnalystClient::connect(&gateway_target(gateway.addr), token)
        .await
        .unwrap()
}

/// The last gateway audit record's step, outcome and codes.
fn last_record(gateway: &GatewayHandle) -> (String, String, Vec<String>) {
    let record = gateway.gateway.audit().recent().pop().expect("a record");
    (
        record.step.to_string(),
        record.outcome.to_string(),
        record.codes,
    )
}

/// What a refused GetFlightInfo leaves as the last record.
fn refused_describe(code: &str) -> (String, String, Vec<String>) {
    ("describe".into(), "refused".into(), vec![code.into()])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_limits_refuse_with_typed_errors_and_are_audited() {
    let per_user = 3;
    let limits = tally_gateway::GatewayLimits {
        queries_per_minute_per_user: per_user,
        queries_per_minute_per_project: 5,
        max_sql_bytes: 300,
        max_plan_depth: 8,
        query_timeout_secs: 60.0,
        ..Default::default()
    };
    let (gateway, nodes) = limited(limits, tally_node::NodeLimits::default()).await;
    let mut client = connect(&gateway, &analyst_token()).await;

    let long = format!("{SQL} -- {}", "x".repeat(400));
    let err = expect_refusal(client.query(&long).await);
    assert!(
        err.starts_with("E_TOO_LARGE") && err.contains("limit is 300"),
        "{err}"
    );
    assert_eq!(last_record(&gateway), refused_describe("E_TOO_LARGE"));

    let deep = "SELECT n FROM (SELECT n FROM (SELECT n FROM (SELECT n FROM (SELECT n FROM \
                (SELECT COUNT(*) AS n FROM episodes) a) b) c) d) e";
    let err = expect_refusal(client.query(deep).await);
    assert!(
        err.starts_with("E_TOO_LARGE") && err.contains("plan"),
        "{err}"
    );
    assert_eq!(last_record(&gateway).2, ["E_TOO_LARGE"]);

    // Every GetFlightInfo counts against the rate, before the SQL is even parsed (so a flood
    // of oversized statements is limited too): the two refusals above used two of the
    // analyst's three. The DoGet that runs a described plan is not counted again, so each
    // answered query below costs one.
    let refused_so_far = 2;
    for _ in refused_so_far..per_user {
        client.query(SQL).await.expect("within the rate");
    }
    let err = expect_refusal(client.query(SQL).await);
    assert!(
        err.starts_with("E_RATE_LIMITED") && err.contains("user 'analyst'"),
        "{err}"
    );
    assert_eq!(last_record(&gateway), refused_describe("E_RATE_LIMITED"));
    let runs = gateway
        .gateway
        .audit()
        .recent()
        .into_iter()
        .filter(|r| r.step == "run")
        .count();
    assert_eq!(
        runs,
        (per_user - refused_so_far) as usize,
        "only described plans ran"
    );

    // The project's allowance is shared: the analyst's three (the user's refusal is not
    // counted) leave the colleague two.
    let mut colleague = connect(&gateway, &colleague_token()).await;
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
    assert_eq!(last_record(&gateway), refused_describe("E_RATE_LIMITED"));
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
    let mut client = connect(&gateway, &analyst_token()).await;
    let err = expect_refusal(client.query(SQL).await);
    assert!(err.starts_with("E_QUERY_TIMEOUT"), "{err}");
    assert_eq!(
        last_record(&gateway),
        (
            "run".into(),
            "failed".into(),
            vec!["E_QUERY_TIMEOUT".into()]
        )
    );
    stop(gateway, nodes).await;

    // Each node's own limit, whatever the gateway allows. How long a query runs at a trust
    // may depend on its data, so the analyst learns that a trust timed out, not which.
    let node_hurried = tally_node::NodeLimits {
        query_timeout_secs: 0.000_001,
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), node_hurried).await;
    let mut client = connect(&gateway, &analyst_token()).await;
    let err = expect_refusal(client.query(SQL).await);
    assert!(err.starts_with("E_TRUST_TIMEOUT"), "{err}");
    assert_names_no_trust(&err);
    assert_eq!(
        last_record(&gateway),
        (
            "run".into(),
            "failed".into(),
            vec!["E_TRUST_TIMEOUT".into()]
        )
    );
    for node in &nodes {
        let record = node.audit.recent().pop().expect("every node audited it");
        assert_eq!(record.outcome, "failed");
        assert_eq!(
            record.codes,
            ["E_QUERY_TIMEOUT"],
            "the trust's own log says why"
        );
    }
    stop(gateway, nodes).await;

    // A node's memory pool: a join's hash table does not fit in 16 KiB. The failure could
    // depend on the data too: one generic code, the details in the trust's own log.
    let small = tally_node::NodeLimits {
        memory_limit_mb: 1.0 / 64.0,
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), small).await;
    let mut client = connect(&gateway, &analyst_token()).await;
    let err = expect_refusal(
        client
            .query(
                "SELECT p.sex, e.specialty, COUNT(*), SUM(e.cost) FROM episodes e \
                 JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex, e.specialty",
            )
            .await,
    );
    assert!(
        err.starts_with("E_TRUST_FAILED") && err.contains("a trust failed to run the query"),
        "{err}"
    );
    assert_names_no_trust(&err);
    assert!(
        !err.contains("Resources exhausted") && !err.contains("E_RESOURCES"),
        "no engine text, no trust's reason: {err}"
    );
    let exhausted = nodes
        .iter()
        .filter_map(|node| node.audit.recent().pop())
        .filter(|record| record.outcome == "failed" && record.codes == ["E_RESOURCES"])
        .count();
    assert!(exhausted >= 1, "a trust's own log has the reason");
    stop(gateway, nodes).await;
}

/// A node config's limits with one running slot and room for one waiting query per project.
fn one_slot() -> tally_node::NodeLimits {
    tally_node::NodeLimits {
        max_running_queries: 1,
        max_running_per_project: 1,
        max_waiting_queries: 2,
        max_waiting_per_project: 1,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_trust_queues_a_query_and_refuses_beyond_its_queue() {
    let (gateway, nodes) = limited(Default::default(), one_slot()).await;
    // Another project's query holds RXA's one slot (taken from the node's own queue).
    let rxa = &nodes[0];
    let held = rxa
        .queue
        .admit(
            &tally_common::queue::tenant_key(&["other"]),
            std::time::Instant::now() + std::time::Duration::from_secs(60),
            "test",
        )
        .await
        .expect("the free slot");
    let mut first = connect(&gateway, &analyst_token()).await;
    let waiting = tokio::spawn(async move { first.query(SQL).await });
    // RXA holds the first query in the project's queue ...
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert!(!waiting.is_finished(), "the query waits for RXA's slot");
    // ... and, that queue being full, refuses a colleague's query at once; which trust is
    // busy is not said (how long the queries ahead run depends on the data).
    let mut colleague = connect(&gateway, &colleague_token()).await;
    let err = expect_refusal(colleague.query(SQL).await);
    assert!(err.starts_with("E_BUSY"), "{err}");
    assert_names_no_trust(&err);
    let refusal = rxa.audit.recent().pop().expect("RXA audited the refusal");
    assert_eq!(
        (refusal.outcome, refusal.codes),
        ("refused", vec!["E_BUSY".to_string()])
    );
    assert_eq!(last_record(&gateway).2, ["E_BUSY"]);
    // The slot freed, the waiting query runs.
    drop(held);
    let answer = waiting
        .await
        .unwrap()
        .expect("answered once the slot is free");
    assert_eq!(answer.trusts.len(), 3);
    assert_eq!(rxa.queue.running(), 0, "every slot given back");
    stop(gateway, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_refuses_a_query_over_its_cost_ceiling_and_stops_one_over_its_cpu_budget() {
    // The ceiling, checked against the model before anything runs: a count of one table
    // costs 2, each extra aggregate more.
    let ceiling = tally_node::NodeLimits {
        max_query_cost: Some(4),
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), ceiling).await;
    let mut client = connect(&gateway, &analyst_token()).await;
    client.query(SQL).await.expect("within the ceiling");
    let err = expect_refusal(
        client
            .query(
                "SELECT specialty, COUNT(*), SUM(cost), AVG(cost) FROM episodes GROUP BY specialty",
            )
            .await,
    );
    assert!(
        err.starts_with("E_TRUST_REFUSED")
            && err.contains("E_QUERY_COST")
            && err.contains("ceiling of 4"),
        "{err}"
    );
    for node in &nodes {
        let record = node.audit.recent().pop().expect("audited");
        assert_eq!(record.codes, ["E_QUERY_COST"]);
    }
    stop(gateway, nodes).await;

    // A processor-time budget no query fits in: the trust stops each one and says why in
    // its own log; the analyst learns only that a trust stopped it, as for its time limit.
    let frugal = tally_node::NodeLimits {
        query_cpu_secs: Some(1e-9),
        ..Default::default()
    };
    let (gateway, nodes) = limited(Default::default(), frugal).await;
    let mut client = connect(&gateway, &analyst_token()).await;
    let err = expect_refusal(client.query(SQL).await);
    assert!(err.starts_with("E_TRUST_TIMEOUT"), "{err}");
    assert_names_no_trust(&err);
    for node in &nodes {
        let record = node.audit.recent().pop().expect("audited");
        assert_eq!(
            (record.outcome, record.codes),
            ("failed", vec!["E_CPU_BUDGET".to_string()])
        );
        assert_eq!(node.queue.running(), 0);
    }
    stop(gateway, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arithmetic_over_released_values_fails_on_overflow_instead_of_wrapping() {
    let (gateway, nodes) = limited(Default::default(), Default::default()).await;
    let mut client = connect(&gateway, &analyst_token()).await;
    for sql in [
        "SELECT sex, COUNT(*) * 9223372036854775807 AS n FROM patients GROUP BY sex",
        "SELECT COUNT(*) + 9223372036854775807 FROM patients",
        "SELECT -(COUNT(*) - COUNT(*) - 9223372036854775807 - 1) FROM patients",
        "SELECT SUM(n) FROM (SELECT sex, COUNT(*) * 4611686018427387904 AS n FROM patients GROUP BY sex) t",
        "SELECT SUM(n) FROM (SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex \
         UNION ALL SELECT 'x', 9223372036854775807) t",
        // A running total of 2^62 per sex.
        "SELECT sex, SUM(n) OVER (ORDER BY sex) AS running FROM (SELECT sex, \
         4611686018427387904 + COUNT(*) - COUNT(*) AS n FROM patients GROUP BY sex) t",
    ] {
        let err = expect_refusal(client.query(sql).await);
        assert!(err.starts_with("E_OVERFLOW"), "{sql}: {err}");
        assert_eq!(last_record(&gateway).2, ["E_OVERFLOW"], "{sql}");
    }
    for sql in [
        "SELECT COUNT(*) / 0 FROM patients",
        "SELECT sex, COUNT(*) % (COUNT(*) - COUNT(*)) FROM patients GROUP BY sex",
    ] {
        let err = expect_refusal(client.query(sql).await);
        assert!(err.starts_with("E_DIVIDE_BY_ZERO"), "{sql}: {err}");
        assert_eq!(last_record(&gateway).2, ["E_DIVIDE_BY_ZERO"], "{sql}");
    }
    // Arithmetic that fits is untouched, names and types included.
    let answer = client
        .query("SELECT sex, COUNT(*) * 2 + 1 AS odd, -COUNT(*) AS negated FROM patients GROUP BY sex ORDER BY sex")
        .await
        .expect("fits");
    let batch = &answer.batches[0];
    let schema = batch.schema();
    assert_eq!(schema.field(1).name(), "odd");
    assert_eq!(
        schema.field(1).data_type(),
        &arrow::datatypes::DataType::Int64
    );
    let odd = batch
        .column(1)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap();
    let negated = batch
        .column(2)
        .as_any()
        .downcast_ref::<arrow::array::Int64Array>()
        .unwrap();
    for row in 0..batch.num_rows() {
        assert_eq!(odd.value(row) % 2, 1);
        assert_eq!(odd.value(row), -2 * negated.value(row) + 1);
    }
    // Sums of checked sums, and running totals that fit, are answered as before.
    let total = |answer: &tally::client::Answer, column: usize| -> Vec<i64> {
        answer
            .batches
            .iter()
            .flat_map(|b| {
                let values = b
                    .column(column)
                    .as_any()
                    .downcast_ref::<arrow::array::Int64Array>()
                    .expect("whole numbers")
                    .clone();
                values.values().to_vec()
            })
            .collect()
    };
    let counts = client
        .query("SELECT sex, COUNT(*) + 1 AS k FROM patients GROUP BY sex ORDER BY sex")
        .await
        .expect("counts");
    let summed = client
        .query("SELECT SUM(k) FROM (SELECT sex, COUNT(*) + 1 AS k FROM patients GROUP BY sex) t")
        .await
        .expect("a sum of checked sums");
    let running = client
        .query(
            "SELECT sex, SUM(k) OVER (ORDER BY sex) AS running FROM \
             (SELECT sex, COUNT(*) + 1 AS k FROM patients GROUP BY sex) t ORDER BY sex",
        )
        .await
        .expect("a running total that fits");
    // As many operators as the gateway accepts, each one checked, answered (the same
    // release as `COUNT(*)`, so the stored answer plus 255).
    let count = client
        .query("SELECT COUNT(*) FROM patients")
        .await
        .expect("count");
    let chain = client
        .query(&format!(
            "SELECT COUNT(*){} FROM patients",
            " + 1".repeat(255)
        ))
        .await
        .expect("a chain at the operator limit");
    assert_eq!(total(&chain, 0), [total(&count, 0)[0] + 255]);
    let each = total(&counts, 1);
    assert_eq!(total(&summed, 0), [each.iter().sum::<i64>()]);
    let mut so_far = 0;
    let expected: Vec<i64> = each
        .iter()
        .map(|k| {
            so_far += k;
            so_far
        })
        .collect();
    assert_eq!(total(&running, 1), expected);
    stop(gateway, nodes).await;
}
