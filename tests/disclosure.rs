//! Disclosure under differential privacy (the default policy), checked against ground truth
//! computed with DataFusion from the Parquet files.
//!
//! The rule, as nodes and gateway apply it: the opt-out hides every row of an opted-out
//! person; each trust bounds what one patient contributes (rows per group, groups per
//! patient: `settings.privacy`) and adds discrete Gaussian noise to every partial; the
//! gateway adds up the trusts' noisy partials and shows counts as non-negative integers
//! (rounded to `disclosure.round_to` and groups below `disclosure.suppress_below` dropped,
//! when governance asks). Which groups are released depends on the keys:
//! - keys with a public domain (the catalogue's value lists, age bands within a column's
//!   bounds, months of a declared period) are released every one, zeros included, and
//!   nothing else: whether a group exists in the data is never shown;
//! - other keys (diagnosis codes, postcode districts) are released by a trust only when its
//!   noisy count of the group's patients reaches `T = 1 + σ·sqrt(2 ln(k/δ))`, with σ the
//!   noise on that count (`sqrt(k·s/2ρ)` for `k` groups per patient and `s` noisy statistics
//!   sharing ρ) — so a group of one patient is released with probability below δ/k, and a
//!   group with fewer than `T − 6σ` patients at every trust practically never (below e⁻¹⁸).
//!
//! Every count is checked to lie within 6σ (σ from the field's `tally.noise_sd`) of what it
//! can be after bounding, computed from the files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use arrow::array::{AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type, SchemaRef};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tally::client::{AnalystClient, Answer};
use tally::federation::{self, DEMO_PROJECT, DEMO_USER, LocalFederation};
use tally_common::admission::RequestIdentity;
use tally_common::generalise::band_of;
use tally_common::governance::Governance;
use tally_common::model::ReleaseQuery;
use tally_common::noise::combined_sd;
use tally_common::policy::Policy;
use tally_common::privacy::{ContributionBounds, Keys, ReleaseNoise};
use tally_gateway::release::CI95;
use tally_synth::{PLANTED_DIAGNOSIS, default_trusts};

use crate::node::{
    bounded_row_counts, domain, governance_of, key_text, number, policy_copy, query_rows,
    release_noise, stated_sd, trust_tables,
};
use crate::support::{analyst, copy_of_data, data_dir, default_policies, start_federation_over};

/// A federation under the policy folder `policies` over the data in `data`, and the demo
/// analyst signed in to it.
async fn federation(data: &Path, policies: &Path) -> (LocalFederation, AnalystClient) {
    let local = start_federation_over(data, policies).await;
    let client = analyst(&local).await;
    (local, client)
}

/// The gateway's answer to `sql`, or a panic naming the refusal.
async fn released(client: &mut AnalystClient, sql: &str) -> Answer {
    client
        .query(sql)
        .await
        .unwrap_or_else(|e| panic!("the gateway refused {sql}: {e}"))
}

/// The one release `sql` lowers to for the demo analyst, planned over the test data's
/// schemas as the gateway plans it.
async fn lowered(sql: &str) -> ReleaseQuery {
    let tables = federation::local_tables(data_dir(), &default_policies())
        .await
        .unwrap();
    let plan = tally_gateway::parse::plan_read_only(&tables.state(), sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let identity = RequestIdentity {
        user: DEMO_USER.into(),
        groups: vec!["analysts".into()],
        project: DEMO_PROJECT.into(),
        purpose: "planning".into(),
    };
    let policy = Policy::load(&default_policies()).unwrap();
    let mut releases = tally_gateway::Explanation::of(
        plan,
        &policy.snapshot(),
        &identity,
        &tally_common::admission::BudgetState::unspent(),
    )
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .releases;
    assert_eq!(releases.len(), 1, "{sql} is one release");
    releases.remove(0)
}

/// The noise each trust adds to the release of `sql`, whose answer has `schema` (group
/// keys first), under the default policy.
async fn noise_of(governance: &Governance, sql: &str, schema: &SchemaRef) -> ReleaseNoise {
    let release = lowered(sql).await;
    let group_types: Vec<DataType> = schema.fields()[..release.group_by.len()]
        .iter()
        .map(|f| f.data_type().clone())
        .collect();
    release_noise(governance, &release, &group_types)
}

/// The standard deviation of the noise in a merged partial: every trust of the demo project
/// adds its own.
fn merged_sd(noise: &ReleaseNoise, partial: usize) -> f64 {
    combined_sd(std::iter::repeat_n(
        noise.sd(partial),
        default_trusts().len(),
    ))
}

/// Per key, what `COUNT(*)` over `from` grouped by `key` (patients in `unit`) can be in the
/// federation over `data` after each trust bounds contributions with `bounds`: the trusts'
/// `(lower, upper)` added up (see [`bounded_row_counts`]).
async fn bounded_truth(
    data: &Path,
    unit: &str,
    from: &str,
    key: &str,
    bounds: ContributionBounds,
) -> BTreeMap<String, (i64, i64)> {
    let mut truth: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for trust in default_trusts() {
        let ctx = trust_tables(data, trust.code).await;
        for (k, (lower, upper)) in bounded_row_counts(&ctx, unit, from, key, bounds).await {
            let entry = truth.entry(k).or_default();
            entry.0 += lower;
            entry.1 += upper;
        }
    }
    truth
}

/// Per key, the distinct patients of `from` grouped by `key` at each trust (test data,
/// opted-out patients left out).
async fn patients_per_trust(unit: &str, from: &str, key: &str) -> BTreeMap<String, Vec<i64>> {
    let mut out: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for trust in default_trusts() {
        let ctx = trust_tables(data_dir(), trust.code).await;
        let sql = format!(
            "SELECT COALESCE(CAST({key} AS VARCHAR), 'NULL'), COUNT(DISTINCT {unit}) \
             FROM {from} GROUP BY 1"
        );
        for row in query_rows(&ctx, &sql).await {
            out.entry(row[0].to_string())
                .or_default()
                .push(number(&row[1]) as i64);
        }
    }
    out
}

/// Asserts that every count in column `index` of `answer` lies within 6σ (σ: the field's
/// stated noise) of the bounded truth of its key (keys in column 0; a key missing from
/// `truth` has none of the rows).
fn assert_near_truth(
    sql: &str,
    answer: &Answer,
    index: usize,
    truth: &BTreeMap<String, (i64, i64)>,
) {
    let sd = stated_sd(answer.schema.field(index));
    for row in crate::support::rows(&answer.batches) {
        let key = key_text(&row[0]);
        let (lower, upper) = truth.get(&key).copied().unwrap_or((0, 0));
        let count = number(&row[index]);
        assert!(
            count >= lower as f64 - 6.0 * sd && count <= upper as f64 + 6.0 * sd,
            "{sql}: {key} released {count}, bounded truth in [{lower}, {upper}], σ {sd}"
        );
    }
}

/// The keys (column 0) of an answer, as text, in order.
fn keys(answer: &Answer) -> Vec<String> {
    crate::support::rows(&answer.batches)
        .iter()
        .map(|row| key_text(&row[0]))
        .collect()
}

/// The age bands of every age within `table.column`'s catalogue bounds.
fn age_bands(governance: &Governance, table: &str, column: &str) -> Vec<String> {
    let [low, high] = governance.column(table, column).unwrap().bounds.unwrap();
    let mut bands: Vec<String> = Vec::new();
    for age in (low.ceil() as i64)..=(high.floor() as i64) {
        let band = band_of(age);
        if !bands.contains(&band) {
            bands.push(band);
        }
    }
    bands
}

/// The first day of every month of `table.column`'s catalogue period, as `YYYY-MM-DD`.
fn months(governance: &Governance, table: &str, column: &str) -> Vec<String> {
    use chrono::{Datelike, NaiveDate};
    let [first, last] = governance
        .column(table, column)
        .unwrap()
        .period
        .clone()
        .unwrap();
    let day = |d: &str| NaiveDate::parse_from_str(d, "%Y-%m-%d").unwrap();
    let (mut month, last) = (day(&first).with_day(1).unwrap(), day(&last));
    let mut out = Vec::new();
    while month <= last {
        out.push(month.format("%Y-%m-%d").to_string());
        month = month.checked_add_months(chrono::Months::new(1)).unwrap();
    }
    out
}

/// Rewrites `table` of every trust in `data`: column `column` becomes the SQL expression
/// `expr` (over the file's own columns).
async fn rewrite_column(data: &Path, table: &str, column: &str, expr: &str) {
    for trust in default_trusts() {
        let path = data.join(trust.code).join(format!("{table}.parquet"));
        let ctx = SessionContext::new();
        ctx.register_parquet("t", path.to_str().unwrap(), ParquetReadOptions::default())
            .await
            .unwrap();
        let columns: Vec<String> = ctx
            .table("t")
            .await
            .unwrap()
            .schema()
            .fields()
            .iter()
            .map(|f| match f.name() {
                name if name == column => format!("{expr} AS {name}"),
                name => name.clone(),
            })
            .collect();
        let batches: Vec<RecordBatch> = ctx
            .sql(&format!("SELECT {} FROM t", columns.join(", ")))
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let mut writer =
            parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).unwrap();
        for batch in &batches {
            writer.write(batch).unwrap();
        }
        writer.close().unwrap();
    }
}

/// A grouped count over a public domain: the SQL, and how the reference computes it.
struct PublicCase {
    sql: String,
    /// The patient column of `from`.
    unit: &'static str,
    /// `FROM` (joins and `WHERE` included) for the reference.
    from: String,
    /// The grouping expression for the reference.
    key: &'static str,
    /// Every key the domain has.
    domain: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_key_of_a_public_domain_is_released_zeros_included_and_no_other() {
    let governance = governance_of(&default_policies());
    // Patients with a sex outside the catalogue's list, and with none: many at every trust.
    let (_dir, data) = copy_of_data();
    rewrite_column(
        &data,
        "patients",
        "sex",
        "CASE WHEN imd_decile = 1 THEN 'X' WHEN imd_decile = 2 THEN NULL ELSE sex END",
    )
    .await;
    let planted = format!("diagnosis_icd10 = '{PLANTED_DIAGNOSIS}'");
    let sexes = domain(&governance, "patients", "sex");
    let cases = [
        PublicCase {
            sql: "SELECT sex, COUNT(*) FROM patients GROUP BY sex".into(),
            unit: "person_id",
            from: "patients".into(),
            key: "sex",
            domain: sexes.clone(),
        },
        PublicCase {
            sql: "SELECT p.sex, COUNT(*) FROM episodes e JOIN patients p \
                  ON e.person_id = p.person_id GROUP BY p.sex"
                .into(),
            unit: "e.person_id",
            from: "episodes e JOIN patients p ON e.person_id = p.person_id".into(),
            key: "p.sex",
            domain: sexes.clone(),
        },
        // The planted cohort is in one specialty: every other is released, with a count
        // that is noise around zero.
        PublicCase {
            sql: format!(
                "SELECT specialty, COUNT(*) FROM episodes WHERE {planted} GROUP BY specialty"
            ),
            unit: "person_id",
            from: format!("episodes WHERE {planted}"),
            key: "specialty",
            domain: domain(&governance, "episodes", "specialty"),
        },
        PublicCase {
            sql: "SELECT admission_method, COUNT(*) FROM episodes GROUP BY admission_method".into(),
            unit: "person_id",
            from: "episodes".into(),
            key: "admission_method",
            domain: domain(&governance, "episodes", "admission_method"),
        },
        PublicCase {
            sql: "SELECT imd_decile, COUNT(*) FROM patients GROUP BY imd_decile".into(),
            unit: "person_id",
            from: "patients".into(),
            key: "imd_decile",
            domain: domain(&governance, "patients", "imd_decile"),
        },
        PublicCase {
            sql: "SELECT age_band(age_at_admission), COUNT(*) FROM episodes GROUP BY 1".into(),
            unit: "person_id",
            from: "episodes".into(),
            key: "age_band(age_at_admission)",
            domain: age_bands(&governance, "episodes", "age_at_admission"),
        },
        PublicCase {
            sql: "SELECT month(admission_date), COUNT(*) FROM episodes GROUP BY 1".into(),
            unit: "person_id",
            from: "episodes".into(),
            key: "month(admission_date)",
            domain: months(&governance, "episodes", "admission_date"),
        },
    ];
    let (local, mut client) = federation(&data, &default_policies()).await;
    let mut zero_released = false;
    for case in &cases {
        let answer = released(&mut client, &case.sql).await;
        let got = keys(&answer);
        assert_eq!(
            got.iter().collect::<BTreeSet<_>>(),
            case.domain.iter().collect::<BTreeSet<_>>(),
            "{}: exactly the domain's keys",
            case.sql
        );
        assert_eq!(got.len(), case.domain.len(), "{}: each once", case.sql);
        let noise = noise_of(&governance, &case.sql, &answer.schema).await;
        assert!(matches!(noise.keys, Keys::Public(_)), "{}", case.sql);
        let sd = stated_sd(answer.schema.field(1));
        assert!(
            (sd - merged_sd(&noise, 0)).abs() < 1e-6 * sd,
            "{}: σ {sd} is the trusts' noise added up",
            case.sql
        );
        let bounds = ContributionBounds::of(&governance, &lowered(&case.sql).await);
        let truth = bounded_truth(&data, case.unit, &case.from, case.key, bounds).await;
        assert_near_truth(&case.sql, &answer, 1, &truth);
        zero_released |= got.iter().any(|key| !truth.contains_key(key));
        // Keys the data holds outside the domain are never released, however many
        // patients they have.
        for (key, (lower, _)) in &truth {
            if !case.domain.contains(key) {
                assert!(!got.contains(key), "{}: {key} released", case.sql);
            }
            if case.key.ends_with("sex") && !case.domain.contains(key) {
                assert!(*lower >= 100, "{}: {key} is a large group", case.sql);
            }
        }
        if case.key.ends_with("sex") {
            for outside in ["X", "NULL"] {
                assert!(
                    truth.contains_key(outside),
                    "{}: the data has {outside}",
                    case.sql
                );
            }
        }
    }
    assert!(zero_released, "a key no row has is released too");
    local.stop().await;
}

/// How many noise scales below the threshold a trust's patient count must be for the test
/// to call its release impossible: P(Z ≥ 5σ) < 3·10⁻⁷ for each key at each trust.
const MARGIN: f64 = 5.0;

/// A grouped count over an open domain (no public list of keys).
struct OpenCase {
    sql: String,
    unit: &'static str,
    from: &'static str,
    key: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_domains_release_only_keys_that_many_patients_share_at_one_trust() {
    let governance = governance_of(&default_policies());
    let delta = governance.settings.privacy.delta;
    let cases = [
        OpenCase {
            sql: "SELECT diagnosis_icd10, COUNT(*) FROM episodes GROUP BY diagnosis_icd10".into(),
            unit: "person_id",
            from: "episodes",
            key: "diagnosis_icd10",
        },
        OpenCase {
            sql: "SELECT postcode_district(postcode), COUNT(*) FROM patients GROUP BY 1".into(),
            unit: "person_id",
            from: "patients",
            key: "postcode_district(postcode)",
        },
    ];
    let (local, mut client) = federation(data_dir(), &default_policies()).await;
    let mut diagnosis_bound = 0.0;
    for case in &cases {
        let release = lowered(&case.sql).await;
        let noise = release_noise(&governance, &release, &[DataType::Utf8]);
        let Keys::Thresholded { threshold, scale } = &noise.keys else {
            panic!("{}: keys are thresholded", case.sql);
        };
        // The threshold from first principles: a noisy count of patients, one patient in at
        // most k groups, the release's ρ shared by its partials and that count.
        let bounds = ContributionBounds::of(&governance, &release);
        let k = bounds.groups_per_unit as f64;
        let statistics = release.partials().len() as f64 + 1.0;
        let rho = crate::node::rho_per_release(&governance);
        let sd = (k * statistics / (2.0 * rho)).sqrt();
        assert!((scale.sd() - sd).abs() <= 1e-3 + 1e-6 * sd, "{}", case.sql);
        let expected = 1.0 + (sd * (2.0 * (k / delta).ln()).sqrt()).ceil();
        assert!(
            (*threshold as f64 - expected).abs() <= 1.0,
            "{}: threshold {threshold}, expected {expected}",
            case.sql
        );
        // A key with fewer patients than this at every trust passes at none but with
        // probability below exp(-MARGIN²/2) per trust.
        let bound = *threshold as f64 - MARGIN * scale.sd();
        assert!(
            bound >= 5.0,
            "{}: the threshold protects groups of 5 patients: {bound}",
            case.sql
        );
        if case.key == "diagnosis_icd10" {
            diagnosis_bound = bound;
        }
        let patients = patients_per_trust(case.unit, case.from, case.key).await;
        let answer = released(&mut client, &case.sql).await;
        let got = keys(&answer);
        assert!(!got.is_empty(), "{}: some key is released", case.sql);
        for key in &got {
            let most = patients
                .get(key)
                .and_then(|p| p.iter().max())
                .copied()
                .unwrap_or(0);
            assert!(
                most as f64 >= bound,
                "{}: {key} released with at most {most} patients at any trust (bound {bound})",
                case.sql
            );
        }
        let truth = bounded_truth(data_dir(), case.unit, case.from, case.key, bounds).await;
        assert_near_truth(&case.sql, &answer, 1, &truth);
        let sd = stated_sd(answer.schema.field(1));
        assert!(
            (sd - merged_sd(&noise, 0)).abs() < 1e-6 * sd,
            "{}",
            case.sql
        );
        // The cost of thresholds applied per trust: a key with many patients in all but
        // too few at each trust is not released (the test data has such diagnoses).
        let spread: Vec<&String> = patients
            .iter()
            .filter(|(_, at)| {
                (*at.iter().max().unwrap() as f64) < bound && at.iter().sum::<i64>() as f64 >= bound
            })
            .map(|(key, _)| key)
            .collect();
        assert!(
            case.key != "diagnosis_icd10" || !spread.is_empty(),
            "{}: a key is spread thinly over trusts",
            case.sql
        );
        assert!(spread.iter().all(|key| !got.contains(key)), "{}", case.sql);
    }

    // The planted rare diagnosis: a handful of patients at one trust.
    let planted = patients_per_trust(
        "person_id",
        &format!("episodes WHERE diagnosis_icd10 = '{PLANTED_DIAGNOSIS}'"),
        "diagnosis_icd10",
    )
    .await;
    let most = *planted[PLANTED_DIAGNOSIS].iter().max().unwrap();
    assert!(
        most >= 1 && (most as f64) < diagnosis_bound,
        "the planted cohort is below the bound {diagnosis_bound}: {most} patients"
    );
    let by_diagnosis = released(
        &mut client,
        "SELECT diagnosis_icd10, COUNT(*) FROM episodes GROUP BY diagnosis_icd10",
    )
    .await;
    assert!(!keys(&by_diagnosis).contains(&PLANTED_DIAGNOSIS.to_string()));
    let grouped = released(
        &mut client,
        &format!(
            "SELECT diagnosis_icd10, COUNT(*) FROM episodes \
             WHERE diagnosis_icd10 = '{PLANTED_DIAGNOSIS}' GROUP BY diagnosis_icd10"
        ),
    )
    .await;
    assert!(
        keys(&grouped).is_empty(),
        "no group for the planted diagnosis"
    );
    local.stop().await;
}

/// Queries whose counts are checked: many keys that no row has (so many noisy counts
/// around zero), open and public domains, COUNT(*) and COUNT(column).
fn count_queries() -> Vec<String> {
    vec![
        format!(
            "SELECT month(admission_date), specialty, COUNT(*) FROM episodes \
             WHERE diagnosis_icd10 = '{PLANTED_DIAGNOSIS}' GROUP BY 1, 2"
        ),
        "SELECT diagnosis_icd10, COUNT(*) FROM episodes GROUP BY diagnosis_icd10".into(),
        "SELECT p.sex, COUNT(*), COUNT(e.procedure_opcs4) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex"
            .into(),
        "SELECT COUNT(*) FROM patients WHERE sex = 'U'".into(),
    ]
}

/// Every count column of `answer` (the Int64 columns stating a noise scale): its index
/// and its values.
fn counts(answer: &Answer) -> Vec<(usize, Vec<Option<i64>>)> {
    answer
        .schema
        .fields()
        .iter()
        .enumerate()
        .filter(|(_, f)| f.metadata().contains_key(tally_common::privacy::NOISE_SD))
        .filter(|(_, f)| f.data_type() == &DataType::Int64)
        .map(|(index, _)| {
            let values = answer
                .batches
                .iter()
                .flat_map(|b| {
                    b.column(index)
                        .as_primitive::<Int64Type>()
                        .iter()
                        .collect::<Vec<_>>()
                })
                .collect();
            (index, values)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn released_counts_are_non_negative_integers() {
    let (local, mut client) = federation(data_dir(), &default_policies()).await;
    let mut all = Vec::new();
    for sql in count_queries() {
        let answer = released(&mut client, &sql).await;
        let columns = counts(&answer);
        assert!(!columns.is_empty(), "{sql}: counts are Int64");
        for (index, values) in columns {
            assert!(
                values.iter().all(Option::is_some),
                "{sql}: column {index} has a NULL"
            );
            all.extend(values.into_iter().flatten());
        }
    }
    assert!(all.len() > 1_000, "enough counts to say something");
    assert!(all.iter().all(|n| *n >= 0), "a negative count");
    assert!(all.contains(&0), "noise below zero is shown as 0");
    local.stop().await;
}

/// A copy of the default policy whose gateway post-processes counts as `disclosure` says.
fn with_disclosure(disclosure: serde_json::Value) -> tempfile::TempDir {
    policy_copy(&default_policies(), |governance| {
        governance["settings"]["disclosure"] = disclosure;
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_can_round_noisy_counts() {
    const ROUND_TO: i64 = 5;
    let policies = with_disclosure(serde_json::json!({"suppress_below": 0, "round_to": ROUND_TO}));
    assert_eq!(
        governance_of(policies.path()).settings.disclosure.round_to,
        5
    );
    let (local, mut client) = federation(data_dir(), policies.path()).await;
    let mut all = Vec::new();
    for sql in count_queries() {
        let answer = released(&mut client, &sql).await;
        for (index, values) in counts(&answer) {
            let field = answer.schema.field(index);
            let ci: f64 = field.metadata()[CI95].parse().unwrap();
            let sd = stated_sd(field);
            assert!(
                (ci - (1.96 * sd + ROUND_TO as f64 / 2.0)).abs() < 1e-6 * ci,
                "{sql}: the interval includes the rounding: {field:?}"
            );
            all.extend(values.into_iter().flatten());
        }
    }
    assert!(all.len() > 1_000);
    let off: Vec<&i64> = all
        .iter()
        .filter(|n| **n % ROUND_TO != 0 || **n < 0)
        .collect();
    assert!(
        off.is_empty(),
        "counts not a multiple of {ROUND_TO}: {off:?}"
    );
    assert!(all.iter().any(|n| *n > 0), "not everything rounds to 0");
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn governance_can_suppress_groups_with_small_noisy_counts() {
    const SUPPRESS_BELOW: i64 = 10;
    let policies =
        with_disclosure(serde_json::json!({"suppress_below": SUPPRESS_BELOW, "round_to": 1}));
    let (local, mut client) = federation(data_dir(), policies.path()).await;
    let governance = governance_of(&default_policies());
    let mut grouped = 0;
    for sql in count_queries() {
        let answer = released(&mut client, &sql).await;
        let release = lowered(&sql).await;
        let rows: usize = answer.batches.iter().map(RecordBatch::num_rows).sum();
        if release.group_by.is_empty() {
            assert_eq!(rows, 1, "{sql}: one row, whatever its count");
            continue;
        }
        // Suppression is judged on the group's COUNT(*), the first count.
        let (_, sizes) = counts(&answer).remove(0);
        let small: Vec<_> = sizes
            .iter()
            .flatten()
            .filter(|n| **n < SUPPRESS_BELOW)
            .collect();
        assert!(
            small.is_empty(),
            "{sql}: groups below {SUPPRESS_BELOW}: {small:?}"
        );
        grouped += rows;
        // Among a thousand keys of noise around zero, some are dropped and some kept.
        if let Keys::Public(keys) = &noise_of(&governance, &sql, &answer.schema).await.keys
            && keys.len() > 1_000
        {
            assert!(
                rows < keys.len(),
                "{sql}: some of the {} keys are dropped",
                keys.len()
            );
            assert!(rows > 0, "{sql}: not every key is dropped");
        }
    }
    assert!(grouped > 0);
    local.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aggregate_without_group_by_returns_one_row_even_when_no_row_matches() {
    let governance = governance_of(&default_policies());
    // A code that no episode has, and a sex outside the catalogue's list.
    let unused = "U99.9";
    let nowhere = [
        (
            format!(
                "SELECT COUNT(*), SUM(cost), AVG(length_of_stay) FROM episodes \
                 WHERE diagnosis_icd10 = '{unused}'"
            ),
            format!("episodes WHERE diagnosis_icd10 = '{unused}'"),
        ),
        (
            "SELECT COUNT(*) FROM patients WHERE sex = 'X'".to_string(),
            "patients WHERE sex = 'X'".to_string(),
        ),
        (
            format!("SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 = '{PLANTED_DIAGNOSIS}'"),
            format!("episodes WHERE diagnosis_icd10 = '{PLANTED_DIAGNOSIS}'"),
        ),
    ];
    let (local, mut client) = federation(data_dir(), &default_policies()).await;
    for (sql, from) in &nowhere {
        let release = lowered(sql).await;
        let bounds = ContributionBounds::of(&governance, &release);
        let truth = bounded_truth(data_dir(), "person_id", from, "'all'", bounds).await;
        let (lower, upper) = truth.get("all").copied().unwrap_or((0, 0));
        if !from.contains(PLANTED_DIAGNOSIS) {
            assert_eq!(upper, 0, "{sql}: no row matches");
        }
        let answer = released(&mut client, sql).await;
        let rows = crate::support::rows(&answer.batches);
        assert_eq!(rows.len(), 1, "{sql}: one row");
        let count = number(&rows[0][0]);
        let sd = stated_sd(answer.schema.field(0));
        let noise = release_noise(&governance, &release, &[]);
        assert!((sd - merged_sd(&noise, 0)).abs() < 1e-6 * sd, "{sql}");
        assert!(
            count >= 0.0 && count >= lower as f64 - 6.0 * sd && count <= upper as f64 + 6.0 * sd,
            "{sql}: released {count}, bounded truth in [{lower}, {upper}], σ {sd}"
        );
    }
    local.stop().await;
}
