//! The public transparency register: `tally audit register` over the audit log of a real
//! federation, checked for what it must never publish, and rendered by headless Chromium.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tally::federation::DEMO_USER;
use tally::register::{Outcome, WITHHELD_SQL, public_sql};

use crate::support::{analyst, audited_federation, expect_refusal, rows, tally};

/// A valid-looking NHS number an analyst should never have typed.
const NHS_NUMBER: &str = "9434765919";

/// An answered query whose totals are distinctive numbers.
const COST_SQL: &str = "SELECT specialty, COUNT(*) AS episodes, SUM(cost) AS total_cost \
                        FROM episodes GROUP BY specialty ORDER BY specialty";

/// An answered query with a literal: published with its constant masked, like every query.
const LITERAL_SQL: &str = "SELECT COUNT(*) AS episodes FROM episodes WHERE specialty = '300'";

/// How the register publishes [`LITERAL_SQL`].
const LITERAL_SQL_MASKED: &str = "SELECT COUNT(*) AS episodes FROM episodes WHERE specialty = ?";

/// Chromium, or a failure that says how to install it.
fn chromium() -> PathBuf {
    let fixed = Path::new("/usr/bin/chromium");
    if fixed.exists() {
        return fixed.to_path_buf();
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join("chromium"))
                .find(|path| path.exists())
        })
        .unwrap_or_else(|| {
            panic!(
                "chromium is not installed, and this test renders the register with it: \
                 install it with `apt-get install -y chromium` (scripts/test does so)"
            )
        })
}

/// Runs headless Chromium (fresh profile, no network services) with `args`; its stdout.
fn run_chromium(args: &[String]) -> String {
    let scratch = tempfile::tempdir().unwrap();
    let stdout = scratch.path().join("stdout");
    let stderr = scratch.path().join("stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1280,900",
        ])
        .arg(format!(
            "--user-data-dir={}",
            scratch.path().join("profile").display()
        ))
        .args(args)
        .stdout(File::create(&stdout).unwrap())
        .stderr(File::create(&stderr).unwrap())
        .spawn()
        .expect("chromium starts");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success(),
        "chromium failed: {}",
        std::fs::read_to_string(&stderr).unwrap_or_default()
    );
    std::fs::read_to_string(&stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_publishes_decisions_never_people_or_answers() {
    let dir = tempfile::tempdir().unwrap();
    let (local, log, _) = audited_federation(dir.path()).await;
    let mut client = analyst(&local).await;
    let token = local.analyst_token().unwrap();

    let costs = client.query(COST_SQL).await.expect("answered");
    let secret_totals: Vec<String> = rows(&costs.batches)
        .iter()
        .map(|row| row[2].to_string())
        .map(|total| total.split('.').next().unwrap_or_default().to_string())
        .filter(|digits| digits.len() >= 5)
        .collect();
    assert!(
        !secret_totals.is_empty(),
        "the cost totals are distinctive numbers"
    );
    client
        .query("SELECT sex, COUNT(*) AS patients FROM patients GROUP BY sex")
        .await
        .expect("answered");
    client.query(LITERAL_SQL).await.expect("answered");
    let star = expect_refusal(client.query("SELECT * FROM patients").await);
    assert!(star.contains("E_NOT_AGGREGATE"), "{star}");
    let identifier_sql = format!("SELECT COUNT(*) FROM patients WHERE nhs_number = '{NHS_NUMBER}'");
    let identifier = expect_refusal(client.query(&identifier_sql).await);
    assert!(identifier.contains("E_IDENTIFIER_COLUMN"), "{identifier}");
    local.stop().await;

    // The log has a record per Flight request (an answered query's GetFlightInfo and DoGet
    // share its query id); the register has one entry per query.
    let logged = std::fs::read_to_string(&log).unwrap();
    let records = logged.lines().filter(|l| !l.trim().is_empty()).count();
    assert_eq!(
        records,
        3 * 2 + 2,
        "one gateway record per request:\n{logged}"
    );
    let queries = tally_common::audit::read_records(&log)
        .unwrap()
        .iter()
        .map(|r| r["query_id"].as_str().unwrap().to_string())
        .collect::<std::collections::BTreeSet<_>>()
        .len();
    assert_eq!(queries, 5, "one query id per query");
    assert!(
        logged.contains(NHS_NUMBER) && logged.contains(DEMO_USER),
        "the log itself holds what the register must withhold"
    );

    let out = dir.path().join("public");
    let run = tally()
        .args(["audit", "register"])
        .arg(&log)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let json = std::fs::read_to_string(out.join("register.json")).unwrap();
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    let register: serde_json::Value = serde_json::from_str(&json).expect("register.json is JSON");
    let entries = register["entries"].as_array().expect("entries");
    assert_eq!(entries.len(), queries, "one entry per query");
    let sql_of = |outcome: &str| -> Vec<&str> {
        entries
            .iter()
            .filter(|e| e["outcome"] == outcome)
            .map(|e| e["sql"].as_str().unwrap())
            .collect()
    };
    let answered = sql_of("answered");
    assert_eq!(answered.len(), 3, "{json}");
    assert!(
        answered.contains(&COST_SQL) && answered.contains(&LITERAL_SQL_MASKED),
        "{answered:?}"
    );
    assert!(
        !json.contains("'300'") && !html.contains("'300'"),
        "constants are masked in answered queries too"
    );
    let refused = sql_of("refused");
    assert!(refused.contains(&"SELECT COUNT(*) FROM patients WHERE nhs_number = ?"));
    assert!(refused.contains(&"SELECT * FROM patients"));
    let times: Vec<&str> = entries
        .iter()
        .map(|e| e["time"].as_str().unwrap())
        .collect();
    assert!(
        times.windows(2).all(|w| w[0] >= w[1]),
        "newest first: {times:?}"
    );
    let identifier_entry = entries
        .iter()
        .find(|e| {
            e["reason_codes"]
                .as_array()
                .is_some_and(|codes| codes.iter().any(|c| c == "E_IDENTIFIER_COLUMN"))
        })
        .expect("the identifier refusal is listed with its reason");
    // The code's floor refuses identifiers while lowering, before any policy is reached.
    assert!(
        identifier_entry["policy_version"].is_null(),
        "{identifier_entry}"
    );
    assert!(
        entries
            .iter()
            .filter(|e| e["outcome"] == "answered")
            .all(|e| e["policy_version"].is_string()),
        "answered queries name the policy that allowed them: {json}"
    );
    assert_eq!(
        entries[entries.len() - 1]["trusts"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
    for (name, text) in [("register.json", &json), ("index.html", &html)] {
        assert!(!text.contains(NHS_NUMBER), "{name} leaks the NHS number");
        assert!(!text.contains(DEMO_USER), "{name} names the user");
        assert!(!text.contains(&token), "{name} leaks the token");
        assert!(!text.contains("analysts"), "{name} names the user's groups");
        for total in &secret_totals {
            assert!(
                !text.contains(total.as_str()),
                "{name} leaks the answer {total}"
            );
        }
    }
    assert!(!html.contains("<script"), "no JavaScript");

    let page = format!("file://{}", out.join("index.html").display());
    let png = dir.path().join("register.png");
    run_chromium(&[format!("--screenshot={}", png.display()), page.clone()]);
    let image = std::fs::read(&png).expect("chromium wrote the screenshot");
    assert!(
        image.starts_with(b"\x89PNG\r\n\x1a\n"),
        "the screenshot is a PNG"
    );
    assert!(
        image.len() > 20_000,
        "the screenshot shows a page ({} bytes)",
        image.len()
    );
    let dom = run_chromium(&["--dump-dom".to_string(), page]);
    assert!(dom.contains("Tally transparency register"), "{dom}");
    assert!(dom.contains(COST_SQL), "the answered SQL is shown: {dom}");
    assert!(dom.contains("refused"), "{dom}");
    assert!(!dom.contains(DEMO_USER), "the page names the user");
    assert!(!dom.contains(NHS_NUMBER));
}

#[test]
fn published_sql_has_no_literals_or_is_withheld() {
    let refused = |sql: &str| public_sql(sql, Outcome::Refused);
    assert_eq!(
        refused("SELECT COUNT(*) FROM patients WHERE surname = 'Smith' AND age > 42"),
        "SELECT COUNT(*) FROM patients WHERE surname = ? AND age > ?"
    );
    assert_eq!(
        refused("SELECT COUNT(*) FROM patients WHERE \"9434765919\" -- about Mrs Smith\nLIMIT 1"),
        "SELECT COUNT(*) FROM patients WHERE ? -- ?\nLIMIT ?"
    );
    assert_eq!(
        refused("SELECT 1 /* 9434765919 */, x'ff', E'a\\'b'"),
        "SELECT ? /* ? */, ?, ?"
    );
    assert_eq!(
        refused("SELECT COUNT(*) FROM patients WHERE nhs_number = $9434765919"),
        "SELECT COUNT(*) FROM patients WHERE nhs_number = ?"
    );
    assert_eq!(refused("SELECT 'unterminated"), WITHHELD_SQL);
    assert_eq!(
        public_sql("SELECT 'unterminated", Outcome::Failed),
        WITHHELD_SQL
    );
    // An answered query's constants can identify people too: masked all the same.
    assert_eq!(
        public_sql("SELECT COUNT(*) FROM t WHERE a = 'x'", Outcome::Answered),
        "SELECT COUNT(*) FROM t WHERE a = ?"
    );
}

#[test]
fn register_errors_name_the_file_and_record() {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&Path]| {
        let out = tally()
            .args(["audit", "register"])
            .args(args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "fails: {args:?}");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let missing = dir.path().join("missing.jsonl");
    let err = run(&[&missing]);
    assert!(
        err.contains("does not verify") && err.contains("missing.jsonl"),
        "{err}"
    );

    let good = serde_json::json!({"time_ms": 1748786587120u64, "query_id": "q",
        "identity": {"user": "u", "project": "p", "purpose": "planning"},
        "sql": "SELECT 1", "outcome": "answered"});
    let write_log = |name: &str, records: &[serde_json::Value]| {
        let path = dir.path().join(name);
        let log = tally_common::audit::AuditLog::open(&path, None).unwrap();
        for record in records {
            log.append(record.clone()).unwrap();
        }
        path
    };
    let tampered = write_log("tampered.jsonl", &[good.clone(), good.clone()]);
    let text = std::fs::read_to_string(&tampered).unwrap();
    let edited: Vec<String> = text
        .lines()
        .enumerate()
        .map(|(n, l)| {
            if n == 1 {
                l.replace("SELECT 1", "SELECT 2")
            } else {
                l.to_string()
            }
        })
        .collect();
    std::fs::write(&tampered, edited.join("\n") + "\n").unwrap();
    let err = run(&[&tampered]);
    assert!(
        err.contains("does not verify") && err.contains("record 2"),
        "{err}"
    );
    let not_a_query = write_log(
        "other.jsonl",
        &[good.clone(), serde_json::json!({"time_ms": 1})],
    );
    let err = run(&[&not_a_query]);
    assert!(
        err.contains("other.jsonl, record 2: not a gateway audit record")
            && err.contains("query_id"),
        "{err}"
    );

    let good_log = write_log("good.jsonl", &[good]);
    let blocker = dir.path().join("a-file");
    std::fs::write(&blocker, "").unwrap();
    let err = run(&[&good_log, Path::new("--out"), &blocker.join("register")]);
    assert!(
        err.contains("cannot write") && err.contains("a-file"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}
