//! The gateway's answer equals DataFusion's answer on the union of all trusts' files.

use crate::support::{analyst, assert_same_answer, centralised, start_federation};

/// Aggregate queries covering every splittable function, one to three grouping keys,
/// filters, joins, the reference table, post-aggregate operators, empty results and NULL
/// groups. `true` marks queries whose ORDER BY fixes the row order.
const QUERIES: &[(&str, bool)] = &[
    ("SELECT COUNT(*) FROM episodes", false),
    (
        "SELECT COUNT(procedure_opcs4) AS with_procedure FROM episodes",
        false,
    ),
    (
        "SELECT SUM(cost), AVG(cost), SUM(length_of_stay), AVG(age_at_admission) FROM episodes",
        false,
    ),
    (
        "SELECT MIN(cost), MAX(cost), MIN(admission_date), MAX(discharge_date), MIN(specialty) FROM episodes",
        false,
    ),
    (
        "SELECT STDDEV(length_of_stay), VAR(length_of_stay), STDDEV_POP(cost), VAR_POP(cost) FROM episodes",
        false,
    ),
    (
        "SELECT specialty, COUNT(*), AVG(length_of_stay), STDDEV(cost) FROM episodes GROUP BY specialty",
        false,
    ),
    (
        "SELECT trust_code, COUNT(*) AS n FROM episodes GROUP BY trust_code",
        false,
    ),
    (
        "SELECT trust_code, specialty, SUM(cost), VAR(cost) FROM episodes GROUP BY trust_code, specialty",
        false,
    ),
    (
        "SELECT trust_code, admission_method, specialty, COUNT(*), AVG(cost), MAX(length_of_stay) \
         FROM episodes GROUP BY 1, 2, 3",
        false,
    ),
    (
        "SELECT specialty, SUM(cost * (1 - length_of_stay)), AVG(cost * 2 + length_of_stay), \
         STDDEV(cost - length_of_stay) FROM episodes GROUP BY specialty",
        false,
    ),
    (
        "SELECT specialty, COUNT(*) FROM episodes WHERE cost > 5000 AND admission_date >= DATE '2022-01-01' \
         GROUP BY specialty",
        false,
    ),
    (
        "SELECT date_trunc('month', admission_date) AS month, COUNT(*) AS admissions FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY date_trunc('month', admission_date)",
        false,
    ),
    (
        "SELECT p.sex, COUNT(*), SUM(e.cost), AVG(e.length_of_stay) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex",
        false,
    ),
    (
        "SELECT p.ethnicity, e.trust_code, COUNT(*) FROM episodes e JOIN patients p ON e.person_id = p.person_id \
         WHERE p.imd_decile <= 3 AND e.admission_method = '21' GROUP BY p.ethnicity, e.trust_code",
        false,
    ),
    (
        "SELECT c.chapter, c.title, COUNT(*) AS episodes, SUM(e.cost) AS cost FROM episodes e \
         JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to \
         GROUP BY c.chapter, c.title",
        false,
    ),
    (
        "SELECT specialty, COUNT(*) AS c FROM episodes GROUP BY specialty HAVING COUNT(*) > 100",
        false,
    ),
    (
        "SELECT specialty, AVG(cost) FROM episodes GROUP BY specialty HAVING AVG(cost) > 3000",
        false,
    ),
    (
        "SELECT specialty, COUNT(*) AS c FROM episodes GROUP BY specialty ORDER BY c DESC, specialty LIMIT 3",
        true,
    ),
    (
        "WITH per_specialty AS (SELECT specialty, AVG(cost) AS mean_cost FROM episodes GROUP BY specialty) \
         SELECT COUNT(*), MAX(mean_cost), MIN(mean_cost) FROM per_specialty",
        false,
    ),
    (
        "SELECT specialty, SUM(cost) / COUNT(*) AS per_episode, COUNT(*) * 2 AS doubled FROM episodes \
         GROUP BY specialty",
        false,
    ),
    (
        "SELECT * FROM (SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex) t WHERE n > 10",
        false,
    ),
    (
        "SELECT specialty, COUNT(*) FROM episodes WHERE cost < 0 GROUP BY specialty",
        false,
    ),
    (
        "SELECT COUNT(*), SUM(cost), AVG(cost), MIN(cost), STDDEV(cost) FROM episodes WHERE cost < 0",
        false,
    ),
    (
        "SELECT ethnicity, COUNT(*) FROM patients GROUP BY ethnicity",
        false,
    ),
    (
        "SELECT procedure_opcs4 IS NULL AS no_procedure, COUNT(*) FROM episodes GROUP BY 1",
        false,
    ),
    (
        "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty \
         HAVING COUNT(*) > (SELECT COUNT(*) FROM episodes) / 20",
        false,
    ),
    (
        "SELECT COUNT(*) FROM episodes WHERE person_id IN (SELECT person_id FROM patients WHERE sex = 'F')",
        false,
    ),
    (
        "SELECT year_of_birth / 10 * 10 AS decade, COUNT(*) FROM patients GROUP BY 1",
        false,
    ),
    (
        "WITH a AS (SELECT COUNT(*) AS n FROM episodes), b AS (SELECT COUNT(*) AS m FROM patients) \
         SELECT n, m, CAST(n AS DOUBLE) / m AS per_patient FROM a CROSS JOIN b",
        false,
    ),
    (
        "SELECT 'episodes' AS what, COUNT(*) AS n FROM episodes UNION ALL SELECT 'patients', COUNT(*) FROM patients",
        false,
    ),
    (
        "SELECT trust_code, COUNT(*) FROM episodes GROUP BY trust_code ORDER BY trust_code",
        true,
    ),
    (
        "SELECT specialty, COUNT(*) AS n, RANK() OVER (ORDER BY COUNT(*) DESC) AS busiest FROM episodes \
         GROUP BY specialty",
        false,
    ),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_answers_equal_centralised_answers() {
    assert!(QUERIES.len() >= 25);
    let local = start_federation().await;
    let mut client = analyst(&local).await;
    let central = centralised().await;
    for (sql, ordered) in QUERIES {
        let answer = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("gateway refused {sql}: {e}"));
        let expected = central.sql(sql).await.unwrap().collect().await.unwrap();
        assert_same_answer(sql, &answer.batches, &expected, *ordered);
        assert_eq!(
            answer.trusts,
            vec!["RXA", "RXB", "RXC"],
            "every trust answers: {sql}"
        );
    }
    local.stop().await;
}
