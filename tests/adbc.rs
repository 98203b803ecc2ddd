//! A real third-party client: the Python ADBC Flight SQL driver, with a plain statement and
//! a prepared statement (installed by `.ci/run`).

use datafusion::common::ScalarValue;
use tally::federation::DEMO_USER;

use crate::support::{centralised, rows, start_federation};

fn as_json(value: &ScalarValue) -> serde_json::Value {
    match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => serde_json::json!(s),
        ScalarValue::Int64(Some(n)) => serde_json::json!(n),
        ScalarValue::Float64(Some(f)) => serde_json::json!(f),
        other => panic!("unexpected value {other:?}"),
    }
}

fn close(got: &serde_json::Value, want: &serde_json::Value) -> bool {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) if !got.is_i64() || !want.is_i64() => {
            (g - w).abs() <= 1e-9 * g.abs().max(w.abs())
        }
        _ => got == want,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_adbc_driver_gets_the_right_numbers() {
    let local = start_federation().await;
    let target = local.gateway_target();
    let ca = target.ca_cert.clone().expect("the federation runs TLS");
    let token = local.analyst_token().unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/adbc_client.py");
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new("python3")
            .args([script, &target.url, DEMO_USER, &token])
            .arg(ca)
            .output()
            .expect("python3 runs")
    })
    .await
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the ADBC client failed (install with: pip install adbc-driver-flightsql pyarrow; bash .ci/run does):\n{stderr}"
    );
    let answer: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("JSON from the client");
    assert_eq!(
        answer["parameters"], 0,
        "the prepared statement takes no parameters"
    );
    let central = centralised().await;
    for (key, sql) in [
        (
            "plain",
            "SELECT specialty, COUNT(*) AS n, AVG(cost) AS mean_cost FROM episodes GROUP BY specialty ORDER BY specialty",
        ),
        (
            "prepared",
            "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex",
        ),
    ] {
        let expected = rows(&central.sql(sql).await.unwrap().collect().await.unwrap());
        let got = answer[key].as_array().expect("rows");
        assert_eq!(got.len(), expected.len(), "{key}: row count");
        for (got_row, want_row) in got.iter().zip(&expected) {
            let got_row = got_row.as_array().unwrap();
            for (g, w) in got_row.iter().zip(want_row) {
                assert!(
                    close(g, &as_json(w)),
                    "{key}: got {got_row:?}, want {want_row:?}"
                );
            }
        }
    }
    local.stop().await;
}
