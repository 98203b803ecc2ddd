//! Nothing row-level crosses: what each node was asked and returned, and what a node refuses
//! on its own when the gateway is bypassed.

use std::collections::HashSet;

use arrow_flight::Ticket;
use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
use prost::Message;
use tally_common::flight::{SqlClient, fetch_all};
use tally_synth::default_trusts;

use crate::support::{analyst, node_client, rows, start_federation};

/// Runs `sql` directly at a node and returns the batches or the error text.
async fn ask_node(
    client: &mut SqlClient,
    sql: &str,
) -> Result<Vec<arrow::array::RecordBatch>, String> {
    let info = client
        .execute(sql.to_string(), None)
        .await
        .map_err(|e| e.to_string())?;
    fetch_all(client, info)
        .await
        .map(|(batches, _)| batches)
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_trust_results_hold_one_row_per_group() {
    let local = start_federation().await;
    let mut client = analyst(&local).await;
    for sql in [
        "SELECT specialty, COUNT(*), AVG(cost) FROM episodes GROUP BY specialty",
        "SELECT p.sex, e.admission_method, SUM(e.cost) FROM episodes e JOIN patients p ON e.person_id = p.person_id GROUP BY 1, 2",
        "SELECT COUNT(*), STDDEV(length_of_stay) FROM episodes",
    ] {
        client.query(sql).await.unwrap();
    }
    for (node, trust) in local.nodes.iter().zip(default_trusts()) {
        let received: Vec<String> = node
            .audit
            .recent()
            .into_iter()
            .filter(|r| r.step == "run" && r.outcome == "answered")
            .map(|r| r.sql)
            .collect();
        assert_eq!(received.len(), 3, "each node ran each per-trust query once");
        let mut direct = node_client(node.addr, trust.code).await;
        for sql in received {
            assert!(
                sql.contains("GROUP BY") || !sql.contains(" g0"),
                "per-trust SQL aggregates: {sql}"
            );
            let batches = ask_node(&mut direct, &sql)
                .await
                .expect("node answers its own fragment");
            let schema = batches[0].schema();
            let group_columns: Vec<usize> = schema
                .fields()
                .iter()
                .enumerate()
                .filter(|(_, f)| f.name().starts_with('g'))
                .map(|(i, _)| i)
                .collect();
            let all_rows = rows(&batches);
            let keys: HashSet<String> = all_rows
                .iter()
                .map(|row| {
                    format!(
                        "{:?}",
                        group_columns.iter().map(|&i| &row[i]).collect::<Vec<_>>()
                    )
                })
                .collect();
            assert_eq!(keys.len(), all_rows.len(), "one row per group in: {sql}");
            if group_columns.is_empty() {
                assert_eq!(all_rows.len(), 1, "a global aggregate is one row: {sql}");
            }
        }
    }
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_refuses_row_level_queries_sent_directly() {
    let local = start_federation().await;
    let node = &local.nodes[0];
    let mut direct = node_client(node.addr, default_trusts()[0].code).await;
    for (sql, code) in [
        ("SELECT * FROM episodes", "E_NOT_AGGREGATE"),
        ("SELECT cost FROM episodes", "E_NOT_AGGREGATE"),
        (
            "SELECT DISTINCT nhs_number FROM patients",
            "E_NOT_AGGREGATE",
        ),
        (
            "SELECT nhs_number FROM patients GROUP BY nhs_number",
            "E_NOT_AGGREGATE",
        ),
        (
            "SELECT cost, ROW_NUMBER() OVER (ORDER BY cost) FROM episodes",
            "E_WINDOW",
        ),
        (
            "SELECT SUM(cost) OVER (PARTITION BY specialty) FROM episodes",
            "E_WINDOW",
        ),
        ("SELECT MEDIAN(cost) FROM episodes", "E_AGG_NOT_SPLITTABLE"),
        (
            "SELECT ARRAY_AGG(nhs_number) FROM patients",
            "E_AGG_NOT_SPLITTABLE",
        ),
        (
            "SELECT COUNT(DISTINCT person_id) FROM episodes",
            "E_AGG_NOT_SPLITTABLE",
        ),
        (
            "SELECT c.n, p.nhs_number FROM (SELECT COUNT(*) AS n FROM episodes) c CROSS JOIN patients p",
            "E_NOT_AGGREGATE",
        ),
        ("COPY episodes TO '/tmp/tally-leak.csv'", "E_READ_ONLY"),
        ("CREATE TABLE leak AS SELECT * FROM patients", "E_READ_ONLY"),
        ("EXPLAIN SELECT COUNT(*) FROM episodes", "E_READ_ONLY"),
        ("SET datafusion.execution.batch_size = 1", "E_READ_ONLY"),
        ("SELECT COUNT(*) FROM '/etc/passwd'", "E_UNKNOWN_TABLE"),
    ] {
        let err = ask_node(&mut direct, sql).await.expect_err(sql);
        assert!(err.contains(code), "{sql}: expected {code}, got {err}");
    }
    // A forged ticket that skips GetFlightInfo is checked all the same.
    let forged = TicketStatementQuery {
        statement_handle: "SELECT nhs_number, postcode FROM patients"
            .as_bytes()
            .to_vec()
            .into(),
    };
    let ticket = Ticket::new(forged.as_any().encode_to_vec());
    let err = match direct.do_get(ticket).await {
        Ok(mut stream) => {
            use futures::StreamExt;
            stream
                .next()
                .await
                .expect("an answer")
                .expect_err("refused")
                .to_string()
        }
        Err(err) => err.to_string(),
    };
    assert!(err.contains("E_NOT_AGGREGATE"), "forged ticket: {err}");
    let refused = node
        .audit
        .recent()
        .iter()
        .filter(|r| r.outcome == "refused")
        .count();
    assert!(
        refused >= 16,
        "every refusal is in the trust's audit log, got {refused}"
    );
    local.stop().await;
}
