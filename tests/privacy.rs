//! Differential privacy end to end (issue 11): real trusts and a real gateway over the test
//! data, every figure checked against ground truth computed with DataFusion over the
//! trusts' Parquet files (without the patients each trust's opt-out hides).
//!
//! - accuracy: the 95% intervals each released count carries (`tally.ci95` in its Arrow
//!   field) cover the truth in 93–97% of well over 1,000 cells, and the mean absolute error
//!   of a typical count (admissions by month × age band) is what the stated σ predicts,
//!   give or take the bias of contribution bounding;
//! - the budget: 16 clients racing for the last of a project's budget cannot overspend it,
//!   at the gateway or at any trust; a second gateway whose ledger knows nothing of that
//!   spending is refused by the trusts' own ledgers; an edited ledger stops its service from
//!   starting; repeats are free and return the stored answer, trivial rewrites are charged
//!   and freshly noised, so averaging them gains only σ/√k for k·ρ until the budget refuses;
//! - attacks with ground truth: a Dinur–Nissim reconstruction by random subset queries
//!   (near-perfect with exact answers, within a few points of chance with the noisy answers
//!   the budget allows) and
//!   a tracker, `(A OR target) − A`, whose estimate is off by noise of the stated scale.
//!
//! The federations here are started with raised rate limits (the default 60 queries a
//! minute per user would otherwise refuse the statistics-heavy tests) and keep their
//! ledgers in a folder of their own, so a test can read, stop, edit and restart them.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde_json::{Value, json};
use tally::client::{AnalystClient, Answer, ClientError};
use tally::federation::{self, DEMO_PROJECT};
use tally_common::audit::read_records;
use tally_gateway::{GatewayConfig, GatewayHandle};
use tally_node::{NodeConfig, NodeHandle};
use tally_synth::default_trusts;

use crate::support::{
    analyst_token, centralised, data_dir, default_policies, fresh_state, gateway_target,
    identity_provider, init_logging, open_policies, rows, tls,
};

// ------------------------------------------------------------------------------------------
// A federation whose state, configs and ledgers the tests can reach.
// ------------------------------------------------------------------------------------------

/// Three trusts and a gateway over the test data, all deciding with one policy folder.
struct Fed {
    nodes: Vec<NodeHandle>,
    node_configs: Vec<NodeConfig>,
    gateway: GatewayHandle,
    gateway_config: GatewayConfig,
    /// The trusts' privacy state is in `state/<code>`, the gateway's ledger in `state`.
    state: PathBuf,
}

/// Rate limits that no test here reaches.
fn unlimited() -> tally_gateway::GatewayLimits {
    tally_gateway::GatewayLimits {
        queries_per_minute_per_user: 100_000,
        queries_per_minute_per_project: 100_000,
        ..tally_gateway::GatewayLimits::default()
    }
}

/// A gateway config in front of `nodes`, keeping its ledger in `state`.
fn gateway_config_over(nodes: &[NodeHandle], policies: &Path, state: &Path) -> GatewayConfig {
    let endpoints: Vec<_> = default_trusts()
        .iter()
        .zip(nodes)
        .map(|(trust, node)| {
            (
                trust.code.to_string(),
                trust.name.to_string(),
                node.listen_addr.unwrap(),
            )
        })
        .collect();
    let mut config = federation::gateway_config(
        "127.0.0.1:0".parse().unwrap(),
        &endpoints,
        policies,
        &tls(),
        &identity_provider(),
        state,
    );
    config.limits = unlimited();
    config
}

impl Fed {
    async fn start(policies: &Path) -> Fed {
        init_logging();
        let state = fresh_state();
        let mut nodes = Vec::new();
        let mut node_configs = Vec::new();
        for trust in default_trusts() {
            let config = federation::node_config(
                data_dir(),
                &trust,
                policies,
                &tls(),
                &identity_provider(),
                &state,
            );
            nodes.push(tally_node::start(&config).await.expect("a node starts"));
            node_configs.push(config);
        }
        let gateway_config = gateway_config_over(&nodes, policies, &state);
        let gateway = tally_gateway::start(&gateway_config)
            .await
            .expect("the gateway starts");
        Fed {
            nodes,
            node_configs,
            gateway,
            gateway_config,
            state,
        }
    }

    async fn client(&self) -> AnalystClient {
        AnalystClient::connect(&gateway_target(self.gateway.addr), &analyst_token())
            .await
            .expect("the analyst connects")
    }

    /// Trust `code`'s budget ledger.
    fn node_ledger(&self, code: &str) -> PathBuf {
        self.state.join(code).join("ledger.jsonl")
    }

    /// The gateway's budget ledger.
    fn gateway_ledger(&self) -> PathBuf {
        self.gateway_config
            .budget_ledger
            .clone()
            .expect("the gateway keeps a ledger")
    }

    async fn stop(self) {
        self.gateway.stop().await;
        for node in self.nodes {
            node.stop().await;
        }
    }
}

/// A copy of the default policy folder with `edit` applied to its `catalogue.json`.
fn policies_with(edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(default_policies()).unwrap() {
        let entry = entry.unwrap();
        if entry.file_type().unwrap().is_file() {
            std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
        }
    }
    let path = dir.path().join("catalogue.json");
    let mut catalogue = catalogue(dir.path());
    edit(&mut catalogue);
    std::fs::write(&path, serde_json::to_string_pretty(&catalogue).unwrap()).unwrap();
    dir
}

/// The default policy with the demo project's budget set to `budget`.
fn policies_with_budget(budget: Value) -> tempfile::TempDir {
    policies_with(|catalogue| {
        catalogue["governance"]["projects"][DEMO_PROJECT]["budget"] = budget;
    })
}

/// The `catalogue.json` of the policy folder `policies`.
fn catalogue(policies: &Path) -> Value {
    let text = std::fs::read_to_string(policies.join("catalogue.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// The default policy's per-release ρ and cap (the demo project has no budget of its own).
fn default_budget() -> (f64, f64) {
    let catalogue = catalogue(&default_policies());
    assert!(
        catalogue["governance"]["projects"][DEMO_PROJECT]
            .get("budget")
            .is_none(),
        "the demo project uses the default budget"
    );
    let privacy = &catalogue["governance"]["settings"]["privacy"];
    assert_eq!(privacy["noise"], "discrete_gaussian");
    (
        privacy["rho_per_release"].as_f64().unwrap(),
        privacy["rho_cap"].as_f64().unwrap(),
    )
}

/// ρ in the ledger's integer unit (nano-ρ).
fn nanos(rho: f64) -> u64 {
    (rho * 1e9).round() as u64
}

/// The charges (nano-ρ) of the demo project in the ledger at `path`.
fn charges(path: &Path) -> Vec<u64> {
    read_records(path)
        .unwrap_or_else(|e| panic!("{}: {e:?}", path.display()))
        .into_iter()
        .filter(|r| r["kind"] == "charge" && r["project"] == DEMO_PROJECT)
        .map(|r| r["charge"].as_u64().expect("a charge is an integer"))
        .collect()
}

/// The error text of a refused query (a panic if it was answered).
fn refusal(result: Result<Answer, ClientError>, sql: &str) -> String {
    match result {
        Ok(_) => panic!("expected a refusal for: {sql}"),
        Err(err) => err.to_string(),
    }
}

// ------------------------------------------------------------------------------------------
// Answers and ground truth.
// ------------------------------------------------------------------------------------------

/// One released value: its group key (as text), the value, and its accuracy metadata.
#[derive(Debug, Clone)]
struct Cell {
    key: Vec<String>,
    value: f64,
    /// Half-width of the stated 95% interval (`tally.ci95`).
    ci: f64,
    /// Standard deviation of the noise (`tally.noise_sd`).
    sd: f64,
}

fn number(value: &ScalarValue) -> f64 {
    match value {
        ScalarValue::Int64(Some(v)) => *v as f64,
        ScalarValue::UInt64(Some(v)) => *v as f64,
        ScalarValue::Int32(Some(v)) => f64::from(*v),
        ScalarValue::Float64(Some(v)) => *v,
        other => panic!("not a number: {other:?}"),
    }
}

fn text(value: &ScalarValue) -> String {
    match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => s.clone(),
        other => other.to_string(),
    }
}

/// The cells of an answer whose last column is the released count and the others its key.
fn cells(answer: &Answer) -> Vec<Cell> {
    let fields = answer.schema.fields();
    let field = fields.last().expect("a column");
    // A gateway whose policy adds no noise (the exact runs) claims no accuracy: exact.
    let meta = |key: &str| -> f64 {
        field
            .metadata()
            .get(key)
            .map_or(0.0, |value| value.parse().expect("a number"))
    };
    let (ci, sd) = (meta("tally.ci95"), meta("tally.noise_sd"));
    rows(&answer.batches)
        .into_iter()
        .map(|row| {
            let (value, key) = row.split_last().unwrap();
            Cell {
                key: key.iter().map(text).collect(),
                value: number(value),
                ci,
                sd,
            }
        })
        .collect()
}

/// The trusts' files in one DataFusion context, with the generalisers and views of the
/// rows each trust may use (`kept_patients`, `kept_episodes`: without its opted-out
/// patients, matched by NHS number at that trust as its node does).
struct Truth(SessionContext);

impl Truth {
    async fn new() -> Truth {
        let mut ctx = centralised().await;
        tally_common::generalise::register(&mut ctx).unwrap();
        let mut parts = Vec::new();
        for trust in default_trusts() {
            let code = trust.code;
            let name = format!("opt_outs_{code}");
            let path = data_dir().join(code).join("opt_outs.parquet");
            ctx.register_parquet(&name, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            parts.push(format!(
                "SELECT CAST(nhs_number AS VARCHAR) AS nhs_number, '{code}' AS trust_code FROM {name}"
            ));
        }
        for view in [
            format!("CREATE VIEW opt_outs AS {}", parts.join(" UNION ALL ")),
            "CREATE VIEW opted_out AS SELECT p.person_id, p.trust_code FROM patients p \
             JOIN opt_outs o ON CAST(p.nhs_number AS VARCHAR) = o.nhs_number \
             AND p.trust_code = o.trust_code"
                .into(),
            "CREATE VIEW kept_patients AS SELECT p.* FROM patients p LEFT JOIN opted_out o \
             ON p.person_id = o.person_id AND p.trust_code = o.trust_code \
             WHERE o.person_id IS NULL"
                .into(),
            "CREATE VIEW kept_episodes AS SELECT e.* FROM episodes e LEFT JOIN opted_out o \
             ON e.person_id = o.person_id AND e.trust_code = o.trust_code \
             WHERE o.person_id IS NULL"
                .into(),
        ] {
            ctx.sql(&view).await.unwrap();
        }
        Truth(ctx)
    }

    async fn rows(&self, sql: &str) -> Vec<Vec<ScalarValue>> {
        let frame = self
            .0
            .sql(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        rows(
            &frame
                .collect()
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}")),
        )
    }

    /// The counts of `sql` (key columns, then one count) by key.
    async fn counts(&self, sql: &str) -> HashMap<Vec<String>, f64> {
        self.rows(sql)
            .await
            .into_iter()
            .map(|row| {
                let (value, key) = row.split_last().unwrap();
                (key.iter().map(text).collect(), number(value))
            })
            .collect()
    }
}

// ------------------------------------------------------------------------------------------
// A little statistics.
// ------------------------------------------------------------------------------------------

/// The standard normal distribution function (Abramowitz & Stegun 7.1.26, |error| < 1.5e-7).
fn phi(x: f64) -> f64 {
    let z = x.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * z);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-z * z).exp();
    if x >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

/// The standard normal density.
fn density(x: f64) -> f64 {
    (-x * x / 2.0).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// The probability that a released count (integer truth `truth` plus integer noise of
/// standard deviation `sd`, shown as at least 0) lies within `ci` of the truth: the noise
/// must be at most `floor(ci)` in size, except that a count at most `ci` shown as 0 is
/// still covered, so only the upper bound matters there (normal approximation with a
/// continuity correction; the trusts' discrete Gaussians are summed at the gateway).
fn coverage_probability(truth: f64, sd: f64, ci: f64) -> f64 {
    let upper = phi((ci.floor() + 0.5) / sd);
    if truth <= ci {
        upper
    } else {
        2.0 * upper - 1.0
    }
}

/// E|max(0, t + N) − t| for N ~ N(0, sd²): the mean absolute error of a count whose truth
/// is `t` after the clamp at zero.
fn expected_abs_error(t: f64, sd: f64) -> f64 {
    let z = t / sd;
    sd * (2.0 / std::f64::consts::PI).sqrt() - sd * density(z) + t * phi(-z)
}

/// A seeded generator (SplitMix64), so the attack's random subsets are the same in every run.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn coin(&mut self) -> bool {
        self.next() & 1 == 1
    }

    /// A random non-empty subset of `items` (each kept with probability 1/2).
    fn subset<T: Clone>(&mut self, items: &[T]) -> Vec<T> {
        loop {
            let chosen: Vec<T> = items.iter().filter(|_| self.coin()).cloned().collect();
            if !chosen.is_empty() {
                return chosen;
            }
        }
    }
}

/// The inverse of a symmetric positive definite matrix, by Gauss–Jordan elimination with
/// partial pivoting.
fn inverse(mut m: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    let n = m.len();
    for (i, row) in m.iter_mut().enumerate() {
        row.extend((0..n).map(|j| f64::from(u8::from(i == j))));
    }
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&x, &y| m[x][col].abs().total_cmp(&m[y][col].abs()))
            .unwrap();
        m.swap(col, pivot);
        let scale = m[col][col];
        assert!(scale.abs() > 1e-12, "a singular design");
        m[col].iter_mut().for_each(|v| *v /= scale);
        let pivot_row = m[col].clone();
        for (row, values) in m.iter_mut().enumerate() {
            let factor = values[col];
            if row != col && factor != 0.0 {
                values
                    .iter_mut()
                    .zip(&pivot_row)
                    .for_each(|(v, p)| *v -= factor * p);
            }
        }
    }
    m.into_iter().map(|row| row[n..].to_vec()).collect()
}

// ------------------------------------------------------------------------------------------
// 1. Accuracy (must-show 4).
// ------------------------------------------------------------------------------------------

const SEXES: [&str; 3] = ["F", "M", "U"];
const ETHNICITIES: [&str; 16] = [
    "A", "B", "C", "D", "E", "F", "G", "H", "J", "K", "L", "M", "N", "P", "R", "S",
];
const TRUSTS: [&str; 3] = ["RXA", "RXB", "RXC"];

/// The accuracy queries: counts of patients (one row per patient, so bounding changes
/// nothing: the bounded truth is the raw truth) over public domains, every key released.
fn coverage_queries() -> Vec<String> {
    let mut queries = vec![
        "SELECT sex, ethnicity, imd_decile, COUNT(*) FROM patients GROUP BY 1, 2, 3".to_string(),
    ];
    for ethnicity in ETHNICITIES {
        for trust in TRUSTS {
            queries.push(format!(
                "SELECT sex, imd_decile, COUNT(*) FROM patients \
                 WHERE ethnicity <> '{ethnicity}' AND trust_code <> '{trust}' GROUP BY 1, 2"
            ));
        }
        for sex in SEXES {
            queries.push(format!(
                "SELECT trust_code, imd_decile, COUNT(*) FROM patients \
                 WHERE ethnicity <> '{ethnicity}' AND sex <> '{sex}' GROUP BY 1, 2"
            ));
        }
    }
    queries
}

/// The ground truth of a coverage query: the same query over the kept patients.
fn truth_sql(sql: &str) -> String {
    sql.replace("FROM patients", "FROM kept_patients")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn intervals_cover_the_truth_and_the_typical_error_is_as_stated() {
    // Enough budget for ~100 releases at the default ρ per release (so the default σ).
    let policies = policies_with_budget(json!({"rho_cap": 50}));
    let fed = Fed::start(policies.path()).await;
    let truth = Truth::new().await;
    let mut client = fed.client().await;
    let started = Instant::now();

    let mut all = (0usize, 0usize, 0.0f64); // (cells, covered, expected covered)
    let mut unclamped = (0usize, 0usize, 0.0f64);
    // Squared errors in σ units of the cells far from 0, whose mean should be 1.
    let mut far = (0usize, 0.0f64);
    let queries = coverage_queries();
    for sql in &queries {
        let answer = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"));
        let want = truth.counts(&truth_sql(sql)).await;
        let got = cells(&answer);
        assert!(!got.is_empty(), "{sql}: no cells");
        for cell in got {
            assert!(
                cell.sd > 0.0 && cell.ci >= 1.96 * cell.sd,
                "{sql}: {cell:?}"
            );
            assert!(
                cell.value >= 0.0,
                "counts are shown as at least 0: {cell:?}"
            );
            let t = want.get(&cell.key).copied().unwrap_or(0.0);
            let covered = (cell.value - t).abs() <= cell.ci;
            let p = coverage_probability(t, cell.sd, cell.ci);
            all.0 += 1;
            all.1 += usize::from(covered);
            all.2 += p;
            // A truth beyond its interval cannot be covered by a count shown as 0, so the
            // clamp at 0 changes nothing for these cells.
            if t > 4.0 * cell.sd {
                far.0 += 1;
                far.1 += ((cell.value - t) / cell.sd).powi(2);
            }
            if t > cell.ci {
                unclamped.0 += 1;
                unclamped.1 += usize::from(covered);
                unclamped.2 += p;
            }
        }
    }
    let report = |name: &str, (n, covered, expected): (usize, usize, f64)| {
        let observed = covered as f64 / n as f64;
        let expected = expected / n as f64;
        let sd = (expected * (1.0 - expected) / n as f64).sqrt();
        eprintln!(
            "privacy accuracy: {name}: {covered}/{n} cells covered = {:.2}% (expected {:.2}% ± {:.2})",
            100.0 * observed,
            100.0 * expected,
            100.0 * sd
        );
        assert!(
            (observed - expected).abs() <= 4.0 * sd,
            "{name}: coverage {observed:.4} is not the {expected:.4} the stated σ predicts"
        );
        observed
    };
    eprintln!(
        "privacy accuracy: empirical noise sd / stated sd over {} cells far from 0: {:.3}",
        far.0,
        (far.1 / far.0 as f64).sqrt()
    );
    let ratio = (far.1 / far.0 as f64).sqrt();
    assert!(
        (0.9..=1.1).contains(&ratio),
        "the noise's sd is {ratio:.3} times the stated one"
    );
    let observed = report("every released cell", all);
    report("cells whose truth exceeds their interval", unclamped);
    assert!(
        all.0 >= 1_000 && unclamped.0 >= 1_000,
        "{all:?} {unclamped:?}"
    );
    assert!(
        (0.93..=0.97).contains(&observed),
        "95% intervals cover {:.2}% of {} cells",
        100.0 * observed,
        all.0
    );

    // A typical count: emergency admissions by month × age band, against the raw truth.
    let sql = "SELECT month(admission_date), age_band(age_at_admission), COUNT(*) FROM episodes \
               WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY 1, 2";
    let answer = client.query(sql).await.unwrap();
    let raw = truth
        .counts(&truth_sql(sql).replace("FROM episodes", "FROM kept_episodes"))
        .await;
    let got = cells(&answer);
    let n = got.len() as f64;
    let sd = got[0].sd;
    let mae = got
        .iter()
        .map(|c| (c.value - raw.get(&c.key).copied().unwrap_or(0.0)).abs())
        .sum::<f64>()
        / n;
    let expected = got
        .iter()
        .map(|c| expected_abs_error(raw.get(&c.key).copied().unwrap_or(0.0), c.sd))
        .sum::<f64>()
        / n;
    let mean_truth = got
        .iter()
        .map(|c| raw.get(&c.key).copied().unwrap_or(0.0))
        .sum::<f64>()
        / n;
    // Bounding keeps at most `rows` rows of a patient per cell and at most `groups` cells
    // per patient (each trust bounds its own patients): the released truth is below the raw
    // truth by what that drops. Which cells a patient keeps is a keyed hash the test cannot
    // know, but the total dropped lies between two sums over (trust, patient): each dropped
    // cell held at least one row, and each kept cell at least one.
    let catalogue = catalogue(policies.path());
    let privacy = &catalogue["governance"]["settings"]["privacy"];
    let rows_cap = privacy["max_rows_per_group"].as_u64().unwrap();
    let groups_cap = privacy["max_groups_per_unit"].as_u64().unwrap();
    let period =
        &catalogue["governance"]["catalogue"]["episodes"]["columns"]["admission_date"]["period"];
    let (first, last) = (period[0].as_str().unwrap(), period[1].as_str().unwrap());
    let loss = truth
        .rows(&format!(
            "WITH pg AS (SELECT trust_code, person_id, month(admission_date) AS m, \
             age_band(age_at_admission) AS b, COUNT(*) AS n FROM kept_episodes \
             WHERE admission_method IN ('21', '22', '23', '24', '28') \
             AND admission_date BETWEEN DATE '{first}' AND DATE '{last}' GROUP BY 1, 2, 3, 4), \
             pp AS (SELECT trust_code, person_id, COUNT(*) AS g, SUM(n) AS rows, \
             SUM(LEAST(n, {rows_cap})) AS capped FROM pg GROUP BY 1, 2) \
             SELECT CAST(SUM(rows - capped) AS DOUBLE), \
             CAST(SUM(CASE WHEN g > {groups_cap} THEN g - {groups_cap} ELSE 0 END) AS DOUBLE), \
             CAST(SUM(CASE WHEN g > {groups_cap} THEN capped - {groups_cap} ELSE 0 END) AS DOUBLE) \
             FROM pp"
        ))
        .await;
    let (row_cap, fewest_dropped, most_dropped) = (
        number(&loss[0][0]),
        number(&loss[0][1]),
        number(&loss[0][2]),
    );
    let bias_low = (row_cap + fewest_dropped) / n;
    let bias_high = (row_cap + most_dropped) / n;
    eprintln!(
        "privacy accuracy: emergency admissions by month × age band: {} cells, mean raw count \
         {mean_truth:.2}, noise σ {sd:.2} (ci95 ±{:.1}), MAE {mae:.2} = {:.2}σ (noise alone, with the \
         clamp at 0: {expected:.2}); bounding lowers a cell by {bias_low:.3}–{bias_high:.3} on average",
        got.len(),
        got[0].ci,
        mae / sd
    );
    // |noise − bias| lies within |noise| ± bias: the MAE is the noise's, give or take the
    // mean bias, plus sampling error (the mean of n absolute errors of sd ≤ 0.61σ each).
    let slack = 5.0 * 0.61 * sd / n.sqrt();
    assert!(
        mae <= expected + bias_high + slack && mae >= expected - bias_high - slack,
        "MAE {mae:.2} vs {expected:.2} ± {bias_high:.2} (bias) ± {slack:.2}"
    );
    assert!(mae > 0.2 * sd, "the counts carry noise");
    eprintln!(
        "privacy accuracy: {} queries in {:.1} s",
        queries.len() + 1,
        started.elapsed().as_secs_f64()
    );
    fed.stop().await;
}

// ------------------------------------------------------------------------------------------
// 2–4. The budget ledgers (must-show 3).
// ------------------------------------------------------------------------------------------

/// A budget of five releases, for the ledger tests.
const SMALL_BUDGET: (f64, f64) = (0.02, 0.1);

fn small_budget_policies() -> tempfile::TempDir {
    let (rho, cap) = SMALL_BUDGET;
    policies_with_budget(json!({"rho_cap": cap, "rho_per_release": rho}))
}

/// A one-release query, distinct for each `i` (all count every patient).
fn one_release(i: usize) -> String {
    format!("SELECT sex, COUNT(*) FROM patients WHERE imd_decile <> {i} GROUP BY 1")
}

/// Asserts that the demo project's budget at the gateway and every trust is `releases`
/// charges of `rho`.
fn assert_ledgers(fed: &Fed, releases: usize, rho: f64) {
    let gateway = charges(&fed.gateway_ledger());
    assert_eq!(gateway, vec![nanos(rho); releases], "the gateway's ledger");
    for trust in TRUSTS {
        let node = charges(&fed.node_ledger(trust));
        assert_eq!(node, vec![nanos(rho); releases], "{trust}'s ledger");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 8)]
async fn sixteen_clients_racing_for_the_last_of_a_budget_cannot_overspend_it() {
    let (rho, cap) = SMALL_BUDGET;
    let releases = (cap / rho).round() as usize;
    let policies = small_budget_policies();
    let fed = Fed::start(policies.path()).await;
    let mut clients = Vec::new();
    for _ in 0..16 {
        clients.push(fed.client().await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(clients.len()));
    let tasks: Vec<_> = clients
        .into_iter()
        .enumerate()
        .map(|(i, mut client)| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let sql = one_release(i + 1);
                barrier.wait().await;
                let result = client.query(&sql).await.map_err(|e| e.to_string());
                (sql, result)
            })
        })
        .collect();
    let mut answered = Vec::new();
    let mut refused = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            (sql, Ok(answer)) => answered.push((sql, rows(&answer.batches))),
            (sql, Err(message)) => refused.push((sql, message)),
        }
    }
    eprintln!(
        "privacy ledger race: {} answered, {} refused of 16 racing for {releases} releases",
        answered.len(),
        refused.len()
    );
    assert_eq!(answered.len(), releases, "refused: {refused:?}");
    for (sql, message) in &refused {
        assert!(
            message.contains("E_BUDGET_EXHAUSTED") && !message.contains("E_TRUST_REFUSED"),
            "{sql}: the gateway refuses on its own ledger: {message}"
        );
    }

    let mut client = fed.client().await;
    let report = client.budget().await.unwrap();
    assert!(report.noise, "{report:?}");
    assert_eq!(nanos(report.spent), nanos(cap), "{report:?}");
    assert_eq!(nanos(report.cap), nanos(cap), "{report:?}");
    assert_eq!(nanos(report.remaining), 0, "{report:?}");
    assert_eq!(report.releases, releases as u64, "{report:?}");
    assert_ledgers(&fed, releases, rho);

    // Repeating an answered query is free and gives the same noisy values, even now.
    let (sql, first) = &answered[0];
    let again = client
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("a repeat of an answered query is refused: {e}"));
    assert_eq!(
        &rows(&again.batches),
        first,
        "a repeat gives the stored answer"
    );
    let after = client.budget().await.unwrap();
    assert_eq!(after, report, "a repeat is free");
    assert_ledgers(&fed, releases, rho);
    fed.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trusts_refuse_on_their_own_ledgers_a_gateway_that_knows_nothing_of_the_spending() {
    let (rho, cap) = SMALL_BUDGET;
    let releases = (cap / rho).round() as usize;
    let policies = small_budget_policies();
    let fed = Fed::start(policies.path()).await;
    let mut client = fed.client().await;
    let mut answered = Vec::new();
    for i in 1..=releases {
        let answer = client.query(&one_release(i)).await.unwrap();
        answered.push(rows(&answer.batches));
    }
    let sql = one_release(releases + 1);
    let message = refusal(client.query(&sql).await, &sql);
    assert!(
        message.contains("E_BUDGET_EXHAUSTED") && !message.contains("E_TRUST_REFUSED"),
        "{message}"
    );
    assert_ledgers(&fed, releases, rho);

    // A second gateway in front of the same trusts, with a fresh ledger of its own.
    let second_state = fresh_state();
    let config = gateway_config_over(&fed.nodes, policies.path(), &second_state);
    let second = tally_gateway::start(&config).await.unwrap();
    let mut bypass = AnalystClient::connect(&gateway_target(second.addr), &analyst_token())
        .await
        .unwrap();
    assert_eq!(nanos(bypass.budget().await.unwrap().spent), 0);
    let sql = one_release(releases + 2);
    let message = refusal(bypass.query(&sql).await, &sql);
    eprintln!("privacy ledger bypass: the second gateway's query: {message}");
    assert!(
        message.contains("E_TRUST_REFUSED") && message.contains("E_BUDGET_EXHAUSTED"),
        "the trusts refuse on their own ledgers: {message}"
    );
    // No trust spent more; the second gateway kept its charge though the query failed.
    for trust in TRUSTS {
        assert_eq!(charges(&fed.node_ledger(trust)), vec![nanos(rho); releases]);
    }
    let kept = config.budget_ledger.clone().unwrap();
    assert_eq!(
        charges(&kept),
        vec![nanos(rho)],
        "a charge stays when its query fails"
    );
    assert_eq!(nanos(bypass.budget().await.unwrap().spent), nanos(rho));

    // What the trusts answered before, they answer again (stored, free) through either.
    let repeat = bypass
        .query(&one_release(1))
        .await
        .unwrap_or_else(|e| panic!("a trust refuses a release it stored: {e}"));
    assert_eq!(rows(&repeat.batches), answered[0]);
    for trust in TRUSTS {
        assert_eq!(charges(&fed.node_ledger(trust)), vec![nanos(rho); releases]);
    }
    second.stop().await;
    fed.stop().await;
}

/// Halves the first charge recorded in the ledger at `path` (as someone refunding
/// themselves would), leaving every other byte as it was.
fn halve_first_charge(path: &Path) {
    let text = std::fs::read_to_string(path).unwrap();
    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
    let index = lines
        .iter()
        .position(|line| serde_json::from_str::<Value>(line).unwrap()["kind"] == "charge")
        .expect("a charge");
    let charge = serde_json::from_str::<Value>(&lines[index]).unwrap()["charge"]
        .as_u64()
        .unwrap();
    let (from, to) = (
        format!("\"charge\":{charge}"),
        format!("\"charge\":{}", charge / 2),
    );
    assert!(lines[index].contains(&from), "{}", lines[index]);
    lines[index] = lines[index].replacen(&from, &to, 1);
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Asserts that the ledger at `path` no longer opens, and that `error` (why a service
/// did not start) names it.
fn assert_broken(path: &Path, error: &str) {
    let broken = tally_common::ledger::Ledger::open(path).expect_err("the edit is detected");
    assert_eq!(
        broken.code,
        tally_common::ErrorCode::LedgerBroken,
        "{broken}"
    );
    assert!(
        error.contains("ledger") && error.contains(&path.display().to_string()),
        "the error names the ledger {}: {error}",
        path.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edited_ledger_stops_its_trust_or_its_gateway_from_starting() {
    let fed = Fed::start(&default_policies()).await;
    let mut client = fed.client().await;
    for i in 1..=2 {
        client.query(&one_release(i)).await.unwrap();
    }
    let node_ledger = fed.node_ledger(TRUSTS[0]);
    let gateway_ledger = fed.gateway_ledger();
    let Fed {
        mut nodes,
        node_configs,
        gateway,
        gateway_config,
        ..
    } = fed;

    // A trust: stopped, it restarts over its ledger as it was; edited, it does not start.
    nodes.remove(0).stop().await;
    tally_node::start(&node_configs[0])
        .await
        .expect("an untouched ledger reopens")
        .stop()
        .await;
    halve_first_charge(&node_ledger);
    let error = tally_node::start(&node_configs[0])
        .await
        .err()
        .expect("a trust with an edited ledger does not start")
        .to_string();
    eprintln!("privacy ledger tampering: trust: {error}");
    assert_broken(&node_ledger, &error);

    // The gateway, likewise.
    gateway.stop().await;
    tally_gateway::start(&gateway_config)
        .await
        .expect("an untouched ledger reopens")
        .stop()
        .await;
    halve_first_charge(&gateway_ledger);
    let error = tally_gateway::start(&gateway_config)
        .await
        .err()
        .expect("a gateway with an edited ledger does not start")
        .to_string();
    eprintln!("privacy ledger tampering: gateway: {error}");
    assert_broken(&gateway_ledger, &error);
    for node in nodes {
        node.stop().await;
    }
}

// ------------------------------------------------------------------------------------------
// 5. Averaging by repetition and by trivial rewrites (must-show 1).
// ------------------------------------------------------------------------------------------

/// SQL filters that keep every patient, each a different model: `imd_decile` is 1 to 10.
fn no_op_filters() -> Vec<String> {
    let mut filters: Vec<String> = [
        "imd_decile > 0",
        "imd_decile >= 1",
        "NOT imd_decile <= 0",
        "imd_decile > 0 AND sex <> 'X'",
        "imd_decile BETWEEN 1 AND 10",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    filters.extend((1..=100).map(|j| format!("imd_decile > -{j}")));
    filters
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeats_are_free_and_rewrites_average_away_only_as_sigma_over_root_k() {
    let (rho, cap) = default_budget();
    let releases = (cap / rho + 1e-9).floor() as usize;
    let fed = Fed::start(&default_policies()).await;
    let truth = Truth::new().await;
    let mut client = fed.client().await;
    let base = "SELECT sex, imd_decile, COUNT(*) FROM patients";
    let group = "GROUP BY 1, 2";
    let want = truth
        .counts(&format!(
            "SELECT sex, imd_decile, COUNT(*) FROM kept_patients {group}"
        ))
        .await;

    // The same SQL ten times: one charge, one answer.
    let sql = format!("{base} {group}");
    let first = cells(&client.query(&sql).await.unwrap());
    for _ in 1..10 {
        let again = cells(&client.query(&sql).await.unwrap());
        let same = first
            .iter()
            .zip(&again)
            .all(|(a, b)| a.key == b.key && a.value == b.value);
        assert!(
            same && first.len() == again.len(),
            "a repeat gives the stored answer"
        );
    }
    let report = client.budget().await.unwrap();
    assert_eq!(
        (report.releases, nanos(report.spent)),
        (1, nanos(rho)),
        "{report:?}"
    );
    for trust in TRUSTS {
        assert_eq!(
            charges(&fed.node_ledger(trust)),
            vec![nanos(rho)],
            "{trust}"
        );
    }

    // Rewrites that keep every patient: each a new model, charged and freshly noised,
    // until the budget refuses.
    let mut answers = vec![first];
    let mut spent = nanos(rho);
    let mut refused = None;
    let mut free_rewrites = Vec::new();
    for filter in no_op_filters() {
        let sql = format!("{base} WHERE {filter} {group}");
        match client.query(&sql).await {
            Ok(answer) => {
                let got = cells(&answer);
                let repeat = answers.iter().any(|earlier| {
                    earlier.len() == got.len()
                        && earlier
                            .iter()
                            .zip(&got)
                            .all(|(a, b)| a.key == b.key && a.value == b.value)
                });
                let now = nanos(client.budget().await.unwrap().spent);
                if repeat {
                    // A rewrite the gateway recognises as the same model is a free repeat.
                    assert_eq!(now, spent, "{sql}: an identical answer was charged");
                    free_rewrites.push(filter.clone());
                } else {
                    assert_eq!(
                        now,
                        spent + nanos(rho),
                        "{sql}: a new answer was not charged"
                    );
                    answers.push(got);
                }
                spent = now;
            }
            Err(err) => {
                refused = Some((sql, err.to_string()));
                break;
            }
        }
    }
    let (sql, message) = refused.expect("the budget refuses before the rewrites run out");
    eprintln!(
        "privacy averaging: {} rewrites charged and answered afresh, then refused ({message}); \
         rewrites recognised as the same model (free): {free_rewrites:?}",
        answers.len() - 1
    );
    assert!(message.contains("E_BUDGET_EXHAUSTED"), "{sql}: {message}");
    assert_eq!(
        answers.len(),
        releases,
        "every release the budget allows was answered"
    );
    assert_eq!(spent, nanos(cap));

    // Averaging k of them: the error falls as σ/√k (never to 0), for k·ρ.
    let sd = answers[0][0].sd;
    let cells_far: Vec<usize> = (0..answers[0].len())
        .filter(|&i| want.get(&answers[0][i].key).copied().unwrap_or(0.0) > 4.0 * sd)
        .collect();
    assert!(cells_far.len() >= 15, "{cells_far:?}");
    let mut ks = vec![1, 4, 16, answers.len()];
    ks.dedup();
    for k in ks {
        let squared: f64 = cells_far
            .iter()
            .map(|&i| {
                let mean = answers[..k].iter().map(|a| a[i].value).sum::<f64>() / k as f64;
                (mean - want[&answers[0][i].key]).powi(2)
            })
            .sum();
        let rms = (squared / cells_far.len() as f64).sqrt();
        let predicted = sd / (k as f64).sqrt();
        eprintln!(
            "privacy averaging: k = {k:2} rewrites (ρ = {:.2}): RMS error {rms:.2} over {} cells, \
             σ/√k = {predicted:.2}",
            k as f64 * rho,
            cells_far.len()
        );
        // With 15+ cells, RMS²/(σ²/k) is a χ² over their number divided by it: within
        // [0.16, 3.1] but for odds below 1 in 10,000.
        let ratio = rms / predicted;
        assert!(
            (0.4..=1.75).contains(&ratio),
            "k = {k}: {rms:.2} vs σ/√k = {predicted:.2}"
        );
    }
    // The rewrites' noise is independent, with the stated σ.
    let spread: f64 = cells_far
        .iter()
        .map(|&i| {
            let values: Vec<f64> = answers.iter().map(|a| a[i].value).collect();
            let mean = values.iter().sum::<f64>() / values.len() as f64;
            values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (values.len() - 1) as f64
        })
        .sum::<f64>()
        / cells_far.len() as f64;
    let spread = spread.sqrt();
    eprintln!("privacy averaging: the rewrites' spread per cell {spread:.2} (stated σ {sd:.2})");
    assert!((0.85..=1.15).contains(&(spread / sd)), "{spread} vs {sd}");
    fed.stop().await;
}

// ------------------------------------------------------------------------------------------
// 6. A reconstruction attack (must-show 1).
// ------------------------------------------------------------------------------------------

const EMERGENCY: [&str; 5] = ["21", "22", "23", "24", "28"];
const SPECIALTIES: [&str; 14] = [
    "100", "101", "110", "120", "130", "300", "320", "340", "400", "420", "430", "500", "502",
    "800",
];

/// One subset query of the attack: emergency episodes whose admission method and
/// specialty are in random subsets, counted by month, trust and the patient's sex.
struct SubsetQuery {
    methods: Vec<&'static str>,
    specialties: Vec<&'static str>,
}

impl SubsetQuery {
    fn sql(&self) -> String {
        let list = |values: &[&str]| {
            values
                .iter()
                .map(|v| format!("'{v}'"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "SELECT month(e.admission_date), e.trust_code, p.sex, COUNT(*) \
             FROM episodes e JOIN patients p ON e.person_id = p.person_id \
             WHERE e.admission_method IN ({}) AND e.specialty IN ({}) GROUP BY 1, 2, 3",
            list(&self.methods),
            list(&self.specialties)
        )
    }

    /// The row of the design matrix: which (method, specialty) cells the query adds up.
    fn row(&self) -> Vec<f64> {
        EMERGENCY
            .iter()
            .flat_map(|m| {
                SPECIALTIES.iter().map(move |s| {
                    f64::from(u8::from(
                        self.methods.contains(m) && self.specialties.contains(s),
                    ))
                })
            })
            .collect()
    }
}

/// The attack's subset queries, the same in every run.
fn subset_queries(count: usize) -> Vec<SubsetQuery> {
    let mut rng = SplitMix(0x7a11_7e57);
    (0..count)
        .map(|_| SubsetQuery {
            methods: rng.subset(&EMERGENCY),
            specialties: rng.subset(&SPECIALTIES),
        })
        .collect()
}

/// The linear decoder of the design `a` (m × n): x̂ = D b with D = (AᵀA + λI)⁻¹Aᵀ when
/// m ≥ n, and D = Aᵀ(AAᵀ + λI)⁻¹ (the least-norm solution, as λ → 0) when m < n; as n
/// rows of m weights.
fn decoder(a: &[Vec<f64>], lambda: f64) -> Vec<Vec<f64>> {
    let (m, n) = (a.len(), a[0].len());
    let ridge = |i: usize, j: usize| if i == j { lambda } else { 0.0 };
    if m >= n {
        let gram: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                (0..n)
                    .map(|j| a.iter().map(|r| r[i] * r[j]).sum::<f64>() + ridge(i, j))
                    .collect()
            })
            .collect();
        let inv = inverse(gram);
        (0..n)
            .map(|i| {
                (0..m)
                    .map(|q| (0..n).map(|k| inv[i][k] * a[q][k]).sum())
                    .collect()
            })
            .collect()
    } else {
        let gram: Vec<Vec<f64>> = (0..m)
            .map(|p| {
                (0..m)
                    .map(|q| (0..n).map(|k| a[p][k] * a[q][k]).sum::<f64>() + ridge(p, q))
                    .collect()
            })
            .collect();
        let inv = inverse(gram);
        (0..n)
            .map(|i| {
                (0..m)
                    .map(|q| (0..m).map(|p| a[p][i] * inv[p][q]).sum())
                    .collect()
            })
            .collect()
    }
}

/// Which (method, specialty) cell of the design a pair of codes is.
fn cell_index(method: &str, specialty: &str) -> Option<usize> {
    let m = EMERGENCY.iter().position(|v| *v == method)?;
    let s = SPECIALTIES.iter().position(|v| *v == specialty)?;
    Some(m * SPECIALTIES.len() + s)
}

/// What the attack is after, per (month, trust): for each (method, specialty) cell, the
/// number of its emergency episodes of women minus those of men, in `episodes` joined to
/// `patients` at each trust.
async fn attack_truth(
    truth: &Truth,
    episodes: &str,
    patients: &str,
) -> BTreeMap<(String, String), Vec<f64>> {
    let methods = EMERGENCY.map(|m| format!("'{m}'")).join(", ");
    let sql = format!(
        "SELECT month(e.admission_date), e.trust_code, e.admission_method, e.specialty, \
         SUM(CASE WHEN p.sex = 'F' THEN 1 WHEN p.sex = 'M' THEN -1 ELSE 0 END) \
         FROM {episodes} e JOIN {patients} p \
         ON e.person_id = p.person_id AND e.trust_code = p.trust_code \
         WHERE e.admission_method IN ({methods}) GROUP BY 1, 2, 3, 4"
    );
    let mut out: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for row in truth.rows(&sql).await {
        let Some(index) = cell_index(&text(&row[2]), &text(&row[3])) else {
            continue;
        };
        let cells = out
            .entry((text(&row[0]), text(&row[1])))
            .or_insert_with(|| vec![0.0; EMERGENCY.len() * SPECIALTIES.len()]);
        cells[index] += number(&row[4]);
    }
    out
}

/// One answer of the attack as women minus men per (month, trust).
fn differences(cells: &[Cell]) -> HashMap<(String, String), f64> {
    let mut out = HashMap::new();
    for cell in cells {
        let sign = match cell.key[2].as_str() {
            "F" => 1.0,
            "M" => -1.0,
            _ => continue,
        };
        *out.entry((cell.key[0].clone(), cell.key[1].clone()))
            .or_insert(0.0) += sign * cell.value;
    }
    out
}

/// How well a decoded attack did: cells with a majority, those it got right, and those
/// whose majority is women.
#[derive(Debug, Clone, Copy)]
struct Score {
    scored: usize,
    correct: usize,
    women: usize,
}

impl Score {
    fn accuracy(&self) -> f64 {
        self.correct as f64 / self.scored as f64
    }

    /// The best guess that ignores the answers: every cell's majority is the commoner one.
    fn chance(&self) -> f64 {
        self.women.max(self.scored - self.women) as f64 / self.scored as f64
    }
}

/// Decodes `answers` (one per row of `design`) with ridge `lambda` and scores the guess of
/// every cell's majority against `truth`.
fn score(
    truth: &BTreeMap<(String, String), Vec<f64>>,
    answers: &[HashMap<(String, String), f64>],
    design: &[Vec<f64>],
    lambda: f64,
) -> Score {
    let decode = decoder(design, lambda);
    let mut score = Score {
        scored: 0,
        correct: 0,
        women: 0,
    };
    for (instance, cells) in truth {
        let b: Vec<f64> = answers
            .iter()
            .map(|a| a.get(instance).copied().unwrap_or(0.0))
            .collect();
        for (weights, &x) in decode.iter().zip(cells) {
            if x == 0.0 {
                continue;
            }
            let guess: f64 = weights.iter().zip(&b).map(|(w, y)| w * y).sum();
            score.scored += 1;
            score.women += usize::from(x > 0.0);
            score.correct += usize::from((guess > 0.0) == (x > 0.0));
        }
    }
    score
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_reconstruction_by_subset_queries_stays_at_chance_until_the_budget_refuses() {
    let started = Instant::now();
    let (rho, cap) = default_budget();
    let releases = (cap / rho + 1e-9).floor() as usize;
    let queries = subset_queries(releases + 5);
    let truth = Truth::new().await;

    // Under the default policy: as many subset queries as the budget allows.
    let fed = Fed::start(&default_policies()).await;
    let mut client = fed.client().await;
    let mut noisy = Vec::new();
    let mut noise_sd = 0.0;
    let mut refused = None;
    for (i, query) in queries.iter().enumerate() {
        match client.query(&query.sql()).await {
            Ok(answer) => {
                let got = cells(&answer);
                noise_sd = got[0].sd;
                noisy.push(differences(&got));
            }
            Err(err) => {
                refused = Some((i, err.to_string()));
                break;
            }
        }
    }
    fed.stop().await;
    let (answered, message) = refused.expect("the budget refuses");
    assert!(message.contains("E_BUDGET_EXHAUSTED"), "{message}");
    assert_eq!(answered, releases, "the budget allows cap/ρ releases");
    let design: Vec<Vec<f64>> = queries[..answered].iter().map(SubsetQuery::row).collect();

    // The same queries answered exactly (the open policy: no noise, no opt-out).
    let open = Fed::start(&open_policies()).await;
    let mut client = open.client().await;
    let mut exact = Vec::new();
    for query in &queries[..answered] {
        exact.push(differences(&cells(
            &client.query(&query.sql()).await.unwrap(),
        )));
    }
    open.stop().await;

    let everyone = attack_truth(&truth, "episodes", "patients").await;
    let kept = attack_truth(&truth, "kept_episodes", "kept_patients").await;
    // Under noise every (month, trust, sex) is released in every answer (public keys), so
    // no instance is decoded from nothing (exact answers hold only the groups that exist).
    let missing = kept
        .keys()
        .filter(|key| noisy.iter().any(|a| !a.contains_key(*key)))
        .count();
    assert_eq!(missing, 0, "instances missing from the noisy answers");
    let with_exact = score(&everyone, &exact, &design, 1e-9);
    let least_squares = score(&kept, &noisy, &design, 1e-9);
    // A Bayesian attacker shrinks towards 0 by noise variance over the prior variance of a
    // cell (about one episode in five cells): ridge regression.
    let lambda = 2.0 * noise_sd * noise_sd / 0.2;
    let shrunk = score(&kept, &noisy, &design, lambda);
    let unknowns = design[0].len();
    for (name, s) in [
        ("exact answers, least squares", with_exact),
        ("noisy answers, least squares", least_squares),
        ("noisy answers, ridge", shrunk),
    ] {
        eprintln!(
            "privacy reconstruction: {answered} subset queries ({unknowns} cells per (month, trust), \
             {} instances), {name}: {}/{} majorities = {:.1}% (chance {:.1}%)",
            kept.len(),
            s.correct,
            s.scored,
            100.0 * s.accuracy(),
            100.0 * s.chance()
        );
    }
    eprintln!(
        "privacy reconstruction: refused after {answered} releases ({message}); {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert!(with_exact.scored >= 1_000 && least_squares.scored >= 1_000);
    assert!(
        with_exact.accuracy() >= 0.9,
        "the attack works on exact answers: {with_exact:?}"
    );
    for s in [least_squares, shrunk] {
        assert!(
            s.accuracy() <= s.chance() + 0.10,
            "the noisy reconstruction beats chance by more than 10 points: {s:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// 7. A tracker (must-show 1).
// ------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tracker_finds_a_patient_only_to_within_the_stated_noise() {
    let truth = Truth::new().await;
    // The target: the only patient of their (trust, IMD decile, ethnicity) at that trust.
    let alone = truth
        .rows(
            "SELECT trust_code, imd_decile, ethnicity, MIN(person_id) FROM patients \
             WHERE ethnicity <> 'A' GROUP BY 1, 2, 3 HAVING COUNT(*) = 1 ORDER BY 1, 2, 3",
        )
        .await;
    let mut target = None;
    for row in alone {
        let (trust, decile, ethnicity, person) =
            (text(&row[0]), text(&row[1]), text(&row[2]), text(&row[3]));
        let kept = truth
            .rows(&format!(
                "SELECT sex FROM kept_patients WHERE person_id = '{person}' AND trust_code = '{trust}'"
            ))
            .await;
        if let Some(sex) = kept.first() {
            let secret = f64::from(u8::from(text(&sex[0]) == "F"));
            target = Some((
                format!(
                    "trust_code = '{trust}' AND imd_decile = {decile} AND ethnicity = '{ethnicity}'"
                ),
                secret,
            ));
            break;
        }
    }
    let (target, secret) = target.expect("a patient alone in a cell");
    // Groups A that never hold the target (whose ethnicity is not A), each a new model.
    let groups: Vec<String> = (1..=10)
        .map(|i| format!("imd_decile = {i}"))
        .chain(["imd_decile <= 5".into(), "imd_decile > 5".into()])
        .map(|c| format!("ethnicity = 'A' AND {c}"))
        .collect();
    let pair = |i: usize| {
        let a = &groups[i];
        (
            format!("SELECT COUNT(*) FROM patients WHERE sex = 'F' AND (({a}) OR ({target}))"),
            format!("SELECT COUNT(*) FROM patients WHERE sex = 'F' AND {a}"),
        )
    };

    // Without noise the tracker is exact.
    let open = Fed::start(&open_policies()).await;
    let mut client = open.client().await;
    let (with, without) = pair(0);
    let exact = cells(&client.query(&with).await.unwrap())[0].value
        - cells(&client.query(&without).await.unwrap())[0].value;
    assert_eq!(exact, secret, "the tracker isolates the target");
    open.stop().await;

    // With it, the difference is the target plus noise of the stated scale.
    let fed = Fed::start(&default_policies()).await;
    let mut client = fed.client().await;
    let trials = groups.len();
    let mut hits = 0;
    let mut squared = 0.0;
    for i in 0..trials {
        let (with, without) = pair(i);
        let a = cells(&client.query(&with).await.unwrap())[0].clone();
        let b = cells(&client.query(&without).await.unwrap())[0].clone();
        assert!(
            b.value > 4.0 * b.sd,
            "the counts are far from the clamp at 0"
        );
        let estimate = a.value - b.value;
        let sd = (a.sd * a.sd + b.sd * b.sd).sqrt();
        eprintln!(
            "privacy tracker: trial {}: estimate {estimate} of {secret} (noise sd {sd:.2}, \
             ±{:.1} at 95%)",
            i + 1,
            1.96 * sd
        );
        assert!(
            (estimate - secret).abs() <= 6.0 * sd,
            "{estimate} vs {secret}: beyond 6√2σ"
        );
        hits += usize::from(estimate == secret);
        squared += ((estimate - secret) / sd).powi(2);
    }
    let rms = (squared / trials as f64).sqrt();
    eprintln!("privacy tracker: exact in {hits}/{trials} trials; RMS error {rms:.2} σ√2");
    assert!(
        hits < trials / 2,
        "the tracker is exact in {hits} of {trials} trials"
    );
    // RMS²·12 is χ² with 12 degrees of freedom: within [0.75, 48] but for odds below 1 in
    // 10,000; the tracker is exact with probability about 5% in each trial.
    assert!(
        (0.25..=2.0).contains(&rms),
        "the error is not of the stated scale: {rms}"
    );
    fed.stop().await;
}
