//! A real third-party client: the Python ADBC Flight SQL driver, with a plain statement and
//! a prepared statement (installed by `.ci/run`).

use datafusion::common::ScalarValue;
use tally::federation::DEMO_USER;

use crate::support::{
    centralised, data_dir, default_policies, rows, start_federation, start_federation_over,
};

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

/// Runs the ADBC client against `local`'s gateway: its JSON answer.
async fn adbc_answer(local: &tally::federation::LocalFederation) -> serde_json::Value {
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
    serde_json::from_slice(&output.stdout).expect("JSON from the client")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_adbc_driver_gets_the_right_numbers() {
    let local = start_federation().await;
    let answer = adbc_answer(&local).await;
    assert!(
        answer["metadata"]["n"].get("tally.noise_sd").is_none(),
        "a gateway whose policy adds no noise claims no accuracy"
    );
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

/// Under the default policy a third-party client reads every count's noise scale and 95%
/// interval from the Arrow schema, and the values are within what that scale allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn python_adbc_driver_reads_each_values_noise_scale() {
    let local = start_federation_over(data_dir(), &default_policies()).await;
    let answer = adbc_answer(&local).await;
    let metadata = &answer["metadata"]["n"];
    let sd: f64 = metadata["tally.noise_sd"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let ci: f64 = metadata["tally.ci95"].as_str().unwrap().parse().unwrap();
    assert!(sd > 1.0, "three trusts' noise on a patient count: {sd}");
    assert!((ci - 1.96 * sd).abs() < 1e-6, "{ci} vs {sd}");
    assert!(
        answer["metadata"]["sex"].as_object().unwrap().is_empty(),
        "group keys carry no noise"
    );
    let central = centralised().await;
    let truth = rows(
        &central
            .sql("SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap(),
    );
    // Opted-out patients are left out at the trusts and not in the central truth.
    let mut opted_out = 0;
    for trust in tally_synth::default_trusts() {
        let path = data_dir().join(trust.code).join("opt_outs.parquet");
        let file = std::fs::File::open(path).unwrap();
        let reader = parquet::file::reader::SerializedFileReader::new(file).unwrap();
        opted_out += parquet::file::reader::FileReader::metadata(&reader)
            .file_metadata()
            .num_rows();
    }
    let got = answer["prepared"].as_array().unwrap();
    assert_eq!(got.len(), 3, "every sex of the public domain F, M, U");
    for (got_row, want_row) in got.iter().zip(&truth) {
        let ScalarValue::Int64(Some(want)) = want_row[1] else {
            panic!("a count")
        };
        let noisy = got_row[1].as_i64().unwrap();
        let error = (noisy - want).abs() as f64;
        assert!(
            error <= 6.0 * sd + opted_out as f64,
            "{got_row:?} vs {want_row:?}: error {error} with sd {sd} and {opted_out} opted out"
        );
    }
    local.stop().await;
}
