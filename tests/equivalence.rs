//! The gateway's answer equals DataFusion's answer on the union of all trusts' files, under
//! the open test policy (threshold 0, no rounding, no opt-out): integers and text exactly,
//! floats to a relative 1e-9 (means, variances and standard deviations are derived at the
//! gateway from released counts, sums and sums of squares, so they are not bit-identical).
//!
//! [`QUERIES`] is also the list `snapshots` records the per-trust releases of.

use datafusion::prelude::SessionContext;

use crate::support::{analyst, assert_same_answer, centralised, start_federation};

/// One equivalence query.
pub(crate) struct Query {
    /// The analyst's SQL.
    pub sql: &'static str,
    /// Whether its ORDER BY fixes the row order (otherwise rows are compared as a set).
    pub ordered: bool,
}

const fn set(sql: &'static str) -> Query {
    Query {
        sql,
        ordered: false,
    }
}

const fn ordered(sql: &'static str) -> Query {
    Query { sql, ordered: true }
}

/// The one query whose answer has no rows (no episode has a negative cost).
const EMPTY: &str = "SELECT specialty, COUNT(*) FROM episodes WHERE cost < 0 GROUP BY specialty";

/// Aggregate queries covering every aggregate of the model, zero to three grouping keys,
/// every filter shape, both declared joins, generalisers, several releases in one query,
/// what runs over released results (HAVING, ORDER BY / LIMIT, arithmetic, MIN / MAX, CTEs,
/// scalar and IN subqueries, joins, UNION ALL, windows), NULL groups and empty results.
pub(crate) const QUERIES: &[Query] = &[
    // Whole-table aggregates.
    set("SELECT COUNT(*) FROM episodes"),
    set("SELECT COUNT(procedure_opcs4) AS with_procedure FROM episodes"),
    set("SELECT SUM(cost), AVG(cost), SUM(length_of_stay), AVG(age_at_admission) FROM episodes"),
    set(
        "SELECT STDDEV(length_of_stay), VAR(length_of_stay), STDDEV_POP(cost), VAR_POP(cost) FROM episodes",
    ),
    set(
        "SELECT VAR_SAMP(age_at_admission), STDDEV_SAMP(age_at_admission), VAR_POP(length_of_stay), \
         STDDEV_POP(length_of_stay) FROM episodes",
    ),
    // Grouping keys: bare columns and generalisers.
    set(
        "SELECT specialty, COUNT(*), AVG(length_of_stay), STDDEV(cost) FROM episodes GROUP BY specialty",
    ),
    set("SELECT trust_code, COUNT(*) AS n FROM episodes GROUP BY trust_code"),
    set(
        "SELECT trust_code, specialty, SUM(cost), VAR(cost) FROM episodes GROUP BY trust_code, specialty",
    ),
    set(
        "SELECT trust_code, admission_method, specialty, COUNT(*), AVG(cost), SUM(length_of_stay) \
         FROM episodes GROUP BY 1, 2, 3",
    ),
    set(
        "SELECT admission_method, VAR_POP(cost), STDDEV_POP(age_at_admission), VAR(length_of_stay) \
         FROM episodes GROUP BY admission_method",
    ),
    set(
        "SELECT age_band(age_at_admission) AS band, COUNT(*), STDDEV(length_of_stay) FROM episodes \
         GROUP BY 1",
    ),
    set(
        "SELECT year(admission_date) AS year, month(discharge_date) AS month, COUNT(*) FROM episodes \
         GROUP BY 1, 2",
    ),
    set(
        "SELECT month(admission_date) AS month, COUNT(*) AS admissions FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY month(admission_date)",
    ),
    // Filters: dimensions, measures, dates, LIKE prefixes, NULL tests, NOT / OR trees,
    // generalisers.
    set(
        "SELECT specialty, COUNT(*) FROM episodes WHERE cost > 5000 AND admission_date >= DATE '2022-01-01' \
         GROUP BY specialty",
    ),
    set(
        "SELECT specialty, COUNT(*), AVG(cost) FROM episodes WHERE length_of_stay > 21 GROUP BY specialty",
    ),
    set("SELECT COUNT(*), SUM(cost) FROM episodes WHERE 21 < length_of_stay"),
    set(
        "SELECT COUNT(*), SUM(length_of_stay), AVG(age_at_admission) FROM episodes \
         WHERE cost BETWEEN 1000 AND 2500.5",
    ),
    set(
        "SELECT specialty, COUNT(*), VAR(age_at_admission) FROM episodes \
         WHERE cost NOT BETWEEN 500 AND 8000 AND length_of_stay <> 0 GROUP BY specialty",
    ),
    set(
        "SELECT diagnosis_icd10, COUNT(*), SUM(cost) FROM episodes WHERE diagnosis_icd10 LIKE 'I2%' \
         GROUP BY diagnosis_icd10",
    ),
    set("SELECT specialty, COUNT(*) FROM episodes \
         WHERE diagnosis_icd10 NOT LIKE 'Z%' AND procedure_opcs4 LIKE 'W%' GROUP BY specialty"),
    set(
        "SELECT admission_method, COUNT(*), AVG(age_at_admission) FROM episodes \
         WHERE NOT (specialty = '300' OR length_of_stay > 10) \
         AND (admission_method = '21' OR cost < 1000 OR NOT diagnosis_icd10 LIKE 'J%') \
         GROUP BY admission_method",
    ),
    set(
        "SELECT specialty, COUNT(*), AVG(cost) FROM episodes WHERE procedure_opcs4 IS NULL \
         GROUP BY specialty",
    ),
    set(
        "SELECT COUNT(*) FROM episodes WHERE procedure_opcs4 IS NOT NULL AND specialty IN ('100', '110')",
    ),
    set("SELECT specialty, COUNT(*) FROM episodes \
         WHERE year(admission_date) = 2023 AND age_band(age_at_admission) IN ('70-74', '75-79') \
         GROUP BY specialty"),
    set("SELECT COUNT(*), AVG(cost) FROM episodes \
         WHERE month(admission_date) BETWEEN DATE '2023-01-01' AND DATE '2023-06-01'"),
    // Declared joins: patients (many-to-one) and the ICD-10 chapters (code range).
    set(
        "SELECT p.sex, COUNT(*), SUM(e.cost), AVG(e.length_of_stay) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex",
    ),
    set(
        "SELECT p.ethnicity, e.trust_code, COUNT(*) FROM episodes e JOIN patients p ON e.person_id = p.person_id \
         WHERE p.imd_decile <= 3 AND e.admission_method = '21' GROUP BY p.ethnicity, e.trust_code",
    ),
    set(
        "SELECT COUNT(*) FROM episodes e JOIN patients p ON e.person_id = p.person_id WHERE p.sex = 'F'",
    ),
    set(
        "SELECT postcode_district(p.postcode) AS district, COUNT(*), AVG(e.cost) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id GROUP BY 1",
    ),
    set(
        "SELECT c.chapter, c.title, COUNT(*) AS episodes, SUM(e.cost) AS cost FROM episodes e \
         JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to \
         GROUP BY c.chapter, c.title",
    ),
    set(
        "SELECT c.chapter, p.sex, COUNT(*), STDDEV(e.age_at_admission) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id \
         JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to \
         GROUP BY 1, 2",
    ),
    // Patients as the fact table; NULL groups.
    set("SELECT ethnicity, COUNT(*) FROM patients GROUP BY ethnicity"),
    set("SELECT sex, imd_decile, COUNT(*) FROM patients WHERE ethnicity IS NULL GROUP BY 1, 2"),
    set("SELECT procedure_opcs4, COUNT(*) FROM episodes GROUP BY procedure_opcs4"),
    // Over released results: HAVING, ORDER BY / LIMIT, arithmetic, MIN / MAX, CTEs.
    set("SELECT specialty, COUNT(*) AS c FROM episodes GROUP BY specialty HAVING COUNT(*) > 100"),
    set("SELECT specialty, AVG(cost) FROM episodes GROUP BY specialty HAVING AVG(cost) > 3000"),
    set(
        "SELECT specialty, SUM(cost) FROM episodes GROUP BY specialty \
         HAVING SUM(cost) > 100000 AND COUNT(*) < 1000",
    ),
    ordered(
        "SELECT specialty, COUNT(*) AS c FROM episodes GROUP BY specialty ORDER BY c DESC, specialty LIMIT 3",
    ),
    ordered("SELECT trust_code, COUNT(*) FROM episodes GROUP BY trust_code ORDER BY trust_code"),
    set(
        "WITH per_specialty AS (SELECT specialty, AVG(cost) AS mean_cost FROM episodes GROUP BY specialty) \
         SELECT COUNT(*), MAX(mean_cost), MIN(mean_cost) FROM per_specialty",
    ),
    set(
        "SELECT specialty, SUM(cost) / COUNT(*) AS per_episode, COUNT(*) * 2 AS doubled FROM episodes \
         GROUP BY specialty",
    ),
    set("SELECT * FROM (SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex) t WHERE n > 10"),
    set(
        "SELECT MIN(n), MAX(n) FROM (SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY specialty) t",
    ),
    set(
        "SELECT MIN(month), MAX(month), MIN(mean_cost), MAX(mean_cost) FROM \
         (SELECT month(admission_date) AS month, AVG(cost) AS mean_cost FROM episodes GROUP BY 1) t",
    ),
    set("SELECT specialty, MIN(n), MAX(n) FROM \
         (SELECT specialty, trust_code, COUNT(*) AS n FROM episodes GROUP BY 1, 2) t \
         GROUP BY specialty HAVING MIN(n) > 10"),
    set(
        "SELECT specialty, RANK() OVER (ORDER BY COUNT(*) DESC) AS busiest, COUNT(*) AS n FROM episodes \
         GROUP BY specialty",
    ),
    // Subqueries over released results.
    set(
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty \
         HAVING COUNT(*) > (SELECT COUNT(*) FROM episodes) / 20",
    ),
    set(
        "SELECT specialty, n FROM (SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY specialty) t \
         WHERE specialty IN (SELECT specialty FROM \
         (SELECT specialty, AVG(cost) AS mean_cost FROM episodes GROUP BY specialty) s WHERE mean_cost > 3000)",
    ),
    // Two releases in one query: a cross join, joins on a released key, a scalar subquery,
    // UNION ALL.
    set(
        "WITH a AS (SELECT COUNT(*) AS n FROM episodes), b AS (SELECT COUNT(*) AS m FROM patients) \
         SELECT n, m, CAST(n AS DOUBLE) / m AS per_patient FROM a CROSS JOIN b",
    ),
    set(
        "SELECT a.trust_code, a.episodes, b.patients, CAST(a.episodes AS DOUBLE) / b.patients AS per_patient \
         FROM (SELECT trust_code, COUNT(*) AS episodes FROM episodes GROUP BY trust_code) a \
         JOIN (SELECT trust_code, COUNT(*) AS patients FROM patients GROUP BY trust_code) b \
         ON a.trust_code = b.trust_code",
    ),
    set("SELECT a.sex, a.episodes, a.mean_cost, b.patients FROM \
         (SELECT p.sex, COUNT(*) AS episodes, AVG(e.cost) AS mean_cost FROM episodes e \
          JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex) a \
         JOIN (SELECT sex, COUNT(*) AS patients FROM patients GROUP BY sex) b ON a.sex = b.sex"),
    set(
        "SELECT specialty, CAST(COUNT(*) AS DOUBLE) / (SELECT COUNT(*) FROM patients) AS per_patient \
         FROM episodes GROUP BY specialty",
    ),
    set(
        "SELECT 'episodes' AS what, COUNT(*) AS n FROM episodes UNION ALL SELECT 'patients', COUNT(*) FROM patients",
    ),
    // Empty results: no group, and the one row of an ungrouped aggregate.
    set(EMPTY),
    set(
        "SELECT COUNT(*), SUM(cost), AVG(cost), STDDEV(cost), VAR_POP(age_at_admission) FROM episodes \
         WHERE length_of_stay < 0",
    ),
];

/// The central computation: DataFusion over the union of the trusts' files, with the
/// declared generalisers registered (they are ordinary functions there).
pub(crate) async fn central_reference() -> SessionContext {
    let mut ctx = centralised().await;
    tally_common::generalise::register(&mut ctx).expect("generalisers register");
    ctx
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_equal_centralised_answers() {
    assert!(QUERIES.len() >= 50);
    let local = start_federation().await;
    let mut client = analyst(&local).await;
    let central = central_reference().await;
    for query in QUERIES {
        let sql = query.sql;
        let answer = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("gateway refused {sql}: {e}"));
        let expected = central.sql(sql).await.unwrap().collect().await.unwrap();
        assert_same_answer(sql, &answer.batches, &expected, query.ordered);
        assert_eq!(
            answer.trusts,
            vec!["RXA", "RXB", "RXC"],
            "every trust answers: {sql}"
        );
    }
    local.stop().await;
}

/// The comparison is not vacuous: every query but [`EMPTY`] has rows in the central answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn central_answers_are_not_all_empty() {
    let central = central_reference().await;
    let mut empty = Vec::new();
    for query in QUERIES {
        let batches = central
            .sql(query.sql)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        if batches.iter().map(|b| b.num_rows()).sum::<usize>() == 0 {
            empty.push(query.sql);
        }
    }
    assert_eq!(
        empty,
        vec![EMPTY],
        "only the deliberately empty query has no rows"
    );
}
