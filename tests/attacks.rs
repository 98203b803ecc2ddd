//! Red team: attacks on the release path, each run through the gateway with the analyst's
//! Flight SQL client and straight at a node with the gateway's client certificate, each
//! judged against ground truth computed here from the trusts' Parquet files.
//!
//! Every attack must end refused with a stable code, or answered with nothing the rules
//! forbid: no group with fewer than 8 distinct patients at any single trust, no identifier
//! (or full postcode) in the answer, every released count a multiple of 5, no single
//! record's value. The attacks are data: [`GATEWAY_ATTACKS`] (analyst SQL; each is also sent
//! to a node as SQL text, and every release it lowers to is replayed at every node asking for
//! no threshold) and [`NODE_ATTACKS`] (crafted requests and identities at a node). Bespoke
//! tests below cover what needs several answers (trackers, patients at two trusts,
//! purposes, oracles).
//!
//! Columns named `n...` (and DataFusion's `count(...)`) in an attack's answer are counts
//! and must be multiples of 5; columns named `whole...` must be whole numbers.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow_flight::Ticket;
use arrow_flight::error::FlightError;
use arrow_flight::sql::{
    Any, CommandPreparedStatementQuery, ProstMessageExt, TicketStatementQuery,
};
use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use prost::Message;
use serde_json::{Value, json};
use tally::client::{AnalystClient, Answer};
use tally::federation::LocalFederation;
use tally::tokens::{AUDIENCE, ISSUER, IdentityProvider};
use tally_common::flight::{
    ANALYST_TOKEN_HEADER, PROJECT_HEADER, PURPOSE_HEADER, QUERY_ID_HEADER, fetch_all,
};
use tally_common::model::{
    ColumnRef, Dimension, Generaliser, Literal, Partial, Predicate, RELEASE_TYPE_URL, ReleaseQuery,
    ReleaseRequest,
};
use tally_synth::default_trusts;

use crate::support::{
    analyst, analyst_token, audited_nodes, centralised, copy_of_data, data_dir, default_policies,
    gateway_client, gateway_config, identity_provider, init_logging, node_client, rows,
    start_federation_over, tls,
};

/// The default policy's smallest group, in distinct patients at one trust.
const THRESHOLD: i64 = 8;
/// The default policy's rounding of counts.
const ROUND_TO: f64 = 5.0;
/// The trusts of the test data.
const TRUSTS: [&str; 3] = ["RXA", "RXB", "RXC"];

/// How an attack must end.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// Refused; the error's leading reason codes, space-separated (a trust's refusal relayed
    /// by the gateway reads `E_TRUST_REFUSED E_<trust's code>`).
    Refused(&'static str),
    /// Answered within the rules; the answer's first `n` columns are the group keys of its
    /// one release, in GROUP BY order (0: do not compare keys).
    Answered(usize),
}

use Expect::{Answered, Refused};

/// One attack through the gateway: its class, the analyst's SQL, and how it must end.
type GatewayAttack = (&'static str, &'static str, Expect);

/// Analyst SQL, by class. Counts are aliased `n...` so that their rounding is checked.
#[rustfmt::skip]
const GATEWAY_ATTACKS: &[GatewayAttack] = &[
    // --- 1. Padding joins: anything but the declared relationship, on exactly its keys. ---
    ("padding join", "SELECT COUNT(*) AS n, SUM(e.cost) FROM patients p JOIN episodes e ON p.trust_code = e.trust_code", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT SUM(e.cost) AS s, COUNT(*) AS n FROM episodes e CROSS JOIN patients p", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e, patients p WHERE e.person_id = p.person_id", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes a JOIN episodes b ON a.person_id = b.person_id", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM patients a JOIN patients b ON a.nhs_number = b.nhs_number", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT p.sex, COUNT(*) AS n FROM episodes e JOIN patients p ON e.specialty = p.sex GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT p.sex, COUNT(*) AS n FROM episodes e LEFT JOIN patients p ON e.person_id = p.person_id GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e FULL JOIN patients p ON e.person_id = p.person_id", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id AND p.sex = 'F'", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id OR e.trust_code = p.trust_code", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes NATURAL JOIN patients", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN icd10_chapters c ON e.diagnosis_icd10 = c.code_from", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN (SELECT specialty, COUNT(*) AS c FROM episodes GROUP BY specialty) r ON e.specialty = r.specialty", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN (SELECT person_id, COUNT(*) AS c FROM episodes GROUP BY person_id) x ON e.person_id = x.person_id", Refused("E_IDENTIFIER_COLUMN")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN (SELECT person_id FROM patients WHERE postcode = 'LS8 9AN') p ON e.person_id = p.person_id", Refused("E_FILTER_NOT_ALLOWED")),
    ("padding join", "SELECT COUNT(*) AS n FROM episodes e JOIN (SELECT nhs_number AS person_id FROM patients) p ON e.person_id = p.person_id", Refused("E_QUERY_SHAPE")),
    ("padding join", "SELECT sex, COUNT(*) AS n FROM episodes JOIN patients USING (person_id) GROUP BY 1", Answered(1)),
    ("padding join", "SELECT p.sex, COUNT(*) AS n, SUM(e.cost) AS s FROM episodes e JOIN (SELECT person_id, sex FROM patients WHERE ethnicity = 'A') p ON e.person_id = p.person_id GROUP BY 1", Answered(1)),
    ("padding join", "SELECT p.sex, age_band(e.age_at_admission), COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id GROUP BY 1, 2", Answered(2)),
    // --- 2. Subqueries below a release. ---
    ("subquery", "SELECT (SELECT nhs_number FROM patients WHERE postcode = 'LS8 9AN' AND year_of_birth = 1973) AS x, COUNT(*) AS n FROM episodes", Refused("E_NOT_AGGREGATE")),
    ("subquery", "SELECT COUNT(*) AS n FROM episodes WHERE cost > (SELECT AVG(cost) FROM episodes)", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM episodes WHERE cost = (SELECT MAX(cost) FROM episodes)", Refused("E_AGG_NOT_ALLOWED")),
    ("subquery", "SELECT (SELECT COUNT(*) FROM patients) AS g, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM patients p WHERE EXISTS (SELECT 1 FROM episodes e WHERE e.person_id = p.person_id AND e.cost > 300000)", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM patients WHERE person_id IN (SELECT person_id FROM episodes WHERE diagnosis_icd10 = 'G61.0')", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM patients WHERE nhs_number NOT IN (SELECT nhs_number FROM patients WHERE sex = 'F')", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM patients p WHERE (SELECT SUM(e.cost) FROM episodes e WHERE e.person_id = p.person_id) > 100000", Refused("E_QUERY_SHAPE")),
    ("subquery", "SELECT COUNT(*) AS n FROM (SELECT DISTINCT person_id FROM episodes) t", Refused("E_QUERY_SHAPE")),
    ("subquery", "WITH t AS (SELECT person_id AS pid FROM episodes) SELECT pid, COUNT(*) AS n FROM t GROUP BY pid", Refused("E_IDENTIFIER_COLUMN")),
    ("subquery", "SELECT COUNT(*) AS n, SUM(cost) AS s FROM (SELECT * FROM episodes WHERE cost > 1000) t", Refused("E_MEASURE_USAGE")),
    ("subquery", "SELECT COUNT(*) AS n, SUM(length_of_stay) AS s FROM (SELECT * FROM episodes WHERE cost > 1000) t", Answered(0)),
    ("subquery", "WITH t AS (SELECT person_id, specialty, cost FROM episodes) SELECT specialty, COUNT(*) AS n, AVG(cost) AS a FROM t GROUP BY 1", Answered(1)),
    // --- 3. Arithmetic, casts and CASE hidden in subquery columns or aggregates. ---
    ("hidden expression", "SELECT SUM(c) AS s FROM (SELECT cost * CAST(diagnosis_icd10 = 'F50.0' AS INT) AS c FROM episodes) t", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT SUM(CAST(cost > 300000 AS INT)) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT SUM(cost * CAST(diagnosis_icd10 = 'F50.0' AS INT)) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT COUNT(CASE WHEN cost > 300000 THEN 1 END) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT SUM(CASE WHEN diagnosis_icd10 = 'G61.0' THEN cost ELSE 0 END) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT b, COUNT(*) AS n FROM (SELECT cost > 300000 AS b FROM episodes) t GROUP BY b", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT COUNT(*) AS n FROM (SELECT CASE WHEN cost > 300000 THEN 'hi' ELSE 'lo' END AS band FROM episodes) t", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT AVG(cost + 0) AS a FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT SUM(-cost) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT SUM(CAST(age_at_admission AS DOUBLE)) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT COUNT(*) AS n FROM episodes WHERE cost + 0 > 300000", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT COUNT(*) AS n FROM episodes WHERE CAST(cost AS INT) = 741356", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT coalesce(procedure_opcs4, 'none') AS p, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT specialty || diagnosis_icd10 AS k, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("hidden expression", "SELECT COUNT(NULL) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("hidden expression", "SELECT SUM(x) AS s, COUNT(*) AS n FROM (SELECT cost AS x FROM episodes WHERE diagnosis_icd10 = 'G61.0') t", Answered(0)),
    ("hidden expression", "SELECT s, COUNT(*) AS n FROM (SELECT specialty AS s, nhs_number AS specialty FROM episodes e JOIN patients p ON e.person_id = p.person_id) t GROUP BY s", Answered(1)),
    // --- 4. Generalisers over expressions, of predicates, nested, undeclared. ---
    ("generaliser", "SELECT age_band((age_at_admission - 40) * 5) AS b, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT postcode_district(substr(postcode, 5) || 'ZZZ') AS d, COUNT(*) AS n FROM patients GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT age_band(CAST(cost > 300000 AS BIGINT)) AS b, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT age_band(a) AS b, COUNT(*) AS n FROM (SELECT age_at_admission * 5 AS a FROM episodes) t GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT year(month(admission_date)) AS y, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT age_band(length_of_stay) AS b, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", "SELECT postcode_district(diagnosis_icd10) AS d, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", "SELECT age_at_admission, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", "SELECT postcode, COUNT(*) AS n FROM patients GROUP BY 1", Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", "SELECT year_of_birth, COUNT(*) AS n FROM patients GROUP BY 1", Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", "SELECT CAST(admission_date AS VARCHAR) AS d, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_QUERY_SHAPE")),
    ("generaliser", "SELECT cost, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_MEASURE_USAGE")),
    ("generaliser", "SELECT COUNT(*) AS n FROM patients WHERE postcode_district(postcode) = 'LS8'", Refused("E_FILTER_NOT_ALLOWED")),
    ("generaliser", "SELECT age_band(a) AS b, COUNT(*) AS n FROM (SELECT age_at_admission AS a FROM episodes) t GROUP BY 1", Answered(1)),
    ("generaliser", "SELECT postcode_district(postcode) AS d, COUNT(*) AS n FROM patients GROUP BY 1", Answered(1)),
    ("generaliser", "SELECT month(admission_date) AS m, specialty, COUNT(*) AS n FROM episodes WHERE year(admission_date) = 2021 GROUP BY 1, 2", Answered(2)),
    // --- 5. Identifiers anywhere. ---
    ("identifier", "SELECT COUNT(*) AS n FROM patients WHERE nhs_number = '9693109996'", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT nhs_number, COUNT(*) AS n FROM patients GROUP BY 1", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT person_id, COUNT(*) AS n FROM episodes GROUP BY 1", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT episode_id, SUM(cost) AS s FROM episodes GROUP BY 1", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(*) AS n FROM patients WHERE nhs_number LIKE '9171%'", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(*) AS n FROM patients WHERE nhs_number ILIKE '9171%'", Refused("E_QUERY_SHAPE")),
    ("identifier", "SELECT COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id AND p.nhs_number <> '9693109996'", Refused("E_QUERY_SHAPE")),
    ("identifier", "SELECT COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id AND p.nhs_number LIKE '9171%'", Refused("E_QUERY_SHAPE")),
    ("identifier", "SELECT COUNT(nhs_number) AS n FROM patients", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(DISTINCT person_id) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("identifier", "SELECT COUNT(*) AS n FROM episodes WHERE person_id IS NOT NULL", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(*) AS n FROM episodes WHERE episode_id IN ('RXA-E000000000', 'RXA-E000000001')", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(*) AS n FROM episodes WHERE specialty = '100' OR person_id = 'RXA-P0000000'", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT COUNT(*) AS n FROM (SELECT nhs_number AS sex FROM patients) t WHERE sex = '9693109996'", Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", "SELECT MAX(nhs_number) AS m FROM patients", Refused("E_AGG_NOT_ALLOWED")),
    ("identifier", "SELECT COUNT(*) AS n FROM (SELECT nhs_number, sex FROM patients) t", Answered(0)),
    // --- 6. Rounding undone: every count derived from released statistics is rounded. ---
    ("rounding", "SELECT SUM(cost) / AVG(cost) AS n FROM episodes", Answered(0)),
    ("rounding", "SELECT specialty, SUM(length_of_stay) / AVG(length_of_stay) AS n FROM episodes GROUP BY 1", Answered(1)),
    ("rounding", "SELECT VAR_SAMP(cost) / (VAR_SAMP(cost) - VAR_POP(cost)) AS n FROM episodes", Answered(0)),
    ("rounding", "SELECT power(STDDEV_SAMP(cost), 2) / (power(STDDEV_SAMP(cost), 2) - power(STDDEV_POP(cost), 2)) AS n FROM episodes WHERE specialty = '300'", Answered(0)),
    ("rounding", "SELECT age_band(age_at_admission) AS b, SUM(age_at_admission) / AVG(age_at_admission) AS n FROM episodes GROUP BY 1", Refused("E_MEASURE_USAGE")),
    ("rounding", "SELECT SUM(length_of_stay) AS n FROM episodes WHERE length_of_stay = 1", Refused("E_MEASURE_USAGE")),
    ("rounding", "SELECT SUM(age_at_admission) / 40 AS n FROM episodes WHERE age_at_admission BETWEEN 40 AND 40", Refused("E_MEASURE_USAGE")),
    ("rounding", "SELECT specialty, SUM(length_of_stay) / AVG(length_of_stay) AS n FROM episodes WHERE length_of_stay > 21 GROUP BY 1", Refused("E_MEASURE_USAGE")),
    ("rounding", "SELECT age_band(age_at_admission) AS b, SUM(length_of_stay) / AVG(length_of_stay) AS n FROM episodes GROUP BY 1", Answered(1)),
    ("rounding", "SELECT SUM(1) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("rounding", "SELECT SUM(x) AS n FROM (SELECT 1 AS x FROM episodes) t", Refused("E_QUERY_SHAPE")),
    ("rounding", "SELECT COUNT(*) * 1.0 / 5 AS whole_fifths FROM episodes", Answered(0)),
    ("rounding", "SELECT COUNT(*) AS n, COUNT(procedure_opcs4) AS n_coded, COUNT(e.cost) AS n_costed FROM episodes e JOIN patients p ON e.person_id = p.person_id", Answered(0)),
    ("rounding", "SELECT c.chapter, COUNT(*) AS n, SUM(e.cost) / AVG(e.cost) AS n_derived FROM episodes e JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to GROUP BY 1", Answered(1)),
    ("rounding", "SELECT a.n - b.n AS n FROM (SELECT COUNT(*) AS n FROM episodes) a CROSS JOIN (SELECT COUNT(*) AS n FROM episodes WHERE cost < 741356) b", Answered(0)),
    ("rounding", "SELECT COUNT(*) AS n FROM episodes UNION ALL SELECT COUNT(*) AS n FROM patients", Answered(0)),
    // --- 10. Oracles: nothing that can fail on a row's value is planned. ---
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE 1 / (cost - 903.2) > 0", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE cost / 0 > 1", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE regexp_like(diagnosis_icd10, '[')", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 SIMILAR TO '('", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE CAST(diagnosis_icd10 AS INT) > 0", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE sqrt(cost - 1000) > 0", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT SUM(cost / 0) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE age_at_admission = '40'", Refused("E_PLAN")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE (cost > 300000) IS TRUE", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE admission_date > now()", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM patients WHERE ethnicity = NULL", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 LIKE '%0'", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 LIKE 'G61_0'", Refused("E_QUERY_SHAPE")),
    ("oracle", "SELECT COUNT(*) AS n FROM episodes WHERE year(admission_date) = '2021'", Refused("E_PLAN")),
    ("oracle", "SELECT COUNT(*) AS n, SUM(cost) AS s FROM episodes WHERE admission_date BETWEEN DATE '2020-03-14' AND DATE '2020-03-14' AND diagnosis_icd10 = 'M06.9'", Answered(0)),
    ("oracle", "SELECT COUNT(*) AS n, SUM(cost) AS s FROM episodes WHERE cost > 300000", Refused("E_MEASURE_USAGE")),
    ("oracle", "SELECT COUNT(*) AS n, SUM(length_of_stay) AS s FROM episodes WHERE cost > 300000", Answered(0)),
    ("oracle", "SELECT trust_code, COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 LIKE 'G61%' GROUP BY 1", Answered(1)),
    ("oracle", "SELECT diagnosis_icd10, COUNT(*) AS n FROM episodes WHERE admission_date = DATE '2020-03-14' AND age_at_admission = 26 GROUP BY 1", Answered(1)),
    ("oracle", "SELECT p.imd_decile, COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id WHERE e.admission_date = DATE '2020-05-24' AND e.specialty = '110' GROUP BY 1", Answered(1)),
    ("oracle", "SELECT COUNT(*) AS n FROM patients WHERE ethnicity IS NULL", Answered(0)),
    // --- LIMIT, ORDER BY, windows, set operations, VALUES, UNNEST, recursion below a release. ---
    ("shape", "SELECT SUM(cost) AS s FROM (SELECT cost FROM episodes ORDER BY cost DESC LIMIT 1) t", Refused("E_LIMIT_BELOW_AGGREGATE")),
    ("shape", "SELECT SUM(cost) AS s FROM (SELECT cost FROM episodes LIMIT 10 OFFSET 5) t", Refused("E_LIMIT_BELOW_AGGREGATE")),
    ("shape", "SELECT COUNT(*) AS n FROM (SELECT specialty FROM episodes ORDER BY cost DESC) t", Answered(0)),
    ("shape", "SELECT 'x' AS k, COUNT(*) AS n FROM episodes GROUP BY 'x'", Refused("E_QUERY_SHAPE")),
    ("shape", "SELECT SUM(r) AS s FROM (SELECT ROW_NUMBER() OVER (ORDER BY cost) AS r FROM episodes) t", Refused("E_WINDOW")),
    ("shape", "SELECT SUM(cost) OVER () AS s FROM episodes", Refused("E_NOT_AGGREGATE")),
    ("shape", "SELECT COUNT(*) AS n FROM (SELECT person_id FROM episodes UNION ALL SELECT person_id FROM patients) t", Refused("E_SETOP")),
    ("shape", "SELECT COUNT(*) AS n FROM (SELECT person_id FROM episodes WHERE cost > 1000 INTERSECT SELECT person_id FROM episodes WHERE specialty = '100') t", Refused("E_QUERY_SHAPE")),
    ("shape", "SELECT COUNT(*) AS n FROM episodes e JOIN (VALUES ('100')) v(s) ON e.specialty = v.s", Refused("E_VALUES")),
    ("shape", "SELECT COUNT(*) AS n FROM (SELECT unnest(make_array(cost, cost)) AS v FROM episodes) t", Refused("E_QUERY_SHAPE")),
    ("shape", "WITH RECURSIVE r(k) AS (SELECT 1 UNION ALL SELECT k + 1 FROM r WHERE k < 3) SELECT COUNT(*) AS n FROM episodes e JOIN r ON e.length_of_stay = r.k", Refused("E_QUERY_SHAPE")),
    ("shape", "SELECT cost FROM episodes ORDER BY cost DESC LIMIT 1", Refused("E_NOT_AGGREGATE")),
    ("shape", "SELECT specialty FROM episodes GROUP BY specialty", Refused("E_NOT_AGGREGATE")),
    ("shape", "SELECT DISTINCT diagnosis_icd10 FROM episodes", Refused("E_NOT_AGGREGATE")),
    ("shape", "SELECT COUNT(*) AS n FROM icd10_chapters", Refused("E_QUERY_SHAPE")),
    ("shape", "SELECT specialty, COUNT(*) AS n, RANK() OVER (ORDER BY COUNT(*)) AS r FROM episodes GROUP BY 1", Answered(1)),
    ("shape", "SELECT diagnosis_icd10, COUNT(*) AS n FROM episodes GROUP BY 1 HAVING COUNT(*) < 10 ORDER BY 2 LIMIT 5", Answered(0)),
    // --- MIN / MAX and other aggregates over patient rows. ---
    ("min/max", "SELECT MAX(cost) AS m FROM episodes", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT specialty, MIN(age_at_admission) AS m FROM episodes GROUP BY 1", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT MAX(admission_date) AS m FROM episodes WHERE diagnosis_icd10 = 'G61.0'", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT median(cost) AS m FROM episodes", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT array_agg(nhs_number) AS a FROM patients", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT string_agg(postcode, ',') AS a FROM patients", Refused("E_AGG_NOT_ALLOWED")),
    ("min/max", "SELECT first_value(cost ORDER BY cost DESC) AS f FROM episodes", Refused("E_EXPR_SHAPE")),
    ("min/max", "SELECT MAX(n) AS n FROM (SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY specialty) t", Answered(0)),
    ("min/max", "SELECT postcode_district('ÄÖ€Ü 1AB') AS d, age_band(-5) AS b, COUNT(*) AS n FROM patients", Answered(0)),
    // --- Placeholders, information_schema, statements. ---
    ("placeholder", "SELECT COUNT(*) AS n FROM episodes WHERE cost > $1", Refused("E_QUERY_SHAPE")),
    ("placeholder", "SELECT COUNT(*) AS n FROM patients WHERE sex = $1 AND ethnicity = $2", Refused("E_QUERY_SHAPE")),
    ("metadata", "SELECT * FROM information_schema.tables", Refused("E_UNKNOWN_TABLE")),
    ("metadata", "SELECT COUNT(*) AS n FROM information_schema.columns", Refused("E_UNKNOWN_TABLE")),
    ("metadata", "SELECT COUNT(*) AS n FROM '/etc/passwd'", Refused("E_UNKNOWN_TABLE")),
    ("metadata", "EXPLAIN SELECT COUNT(*) FROM episodes", Refused("E_READ_ONLY")),
    ("metadata", "COPY (SELECT * FROM patients) TO '/tmp/tally-attack.csv'", Refused("E_READ_ONLY")),
    // --- ROLLUP / CUBE / GROUPING SETS. ---
    ("grouping sets", "SELECT specialty, admission_method, COUNT(*) AS n FROM episodes GROUP BY ROLLUP(specialty, admission_method)", Refused("E_GROUPING_SETS")),
    ("grouping sets", "SELECT specialty, admission_method, COUNT(*) AS n FROM episodes GROUP BY CUBE(specialty, admission_method)", Refused("E_GROUPING_SETS")),
    ("grouping sets", "SELECT specialty, diagnosis_icd10, COUNT(*) AS n FROM episodes GROUP BY GROUPING SETS ((specialty), (diagnosis_icd10), ())", Refused("E_GROUPING_SETS")),
    // --- FILTER clauses and DISTINCT aggregates. ---
    ("filter clause", "SELECT COUNT(*) FILTER (WHERE cost > 300000) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("filter clause", "SELECT SUM(cost) FILTER (WHERE diagnosis_icd10 = 'G61.0') AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("distinct aggregate", "SELECT COUNT(DISTINCT diagnosis_icd10) AS n FROM episodes", Refused("E_EXPR_SHAPE")),
    ("distinct aggregate", "SELECT SUM(DISTINCT cost) AS s FROM episodes", Refused("E_EXPR_SHAPE")),
    ("distinct aggregate", "SELECT AVG(DISTINCT length_of_stay) AS a FROM episodes", Refused("E_EXPR_SHAPE")),
];

// ------------------------------------------------------------------------------------------
// The laboratory: a federation under the default policy, every log on disk, ground truth.
// ------------------------------------------------------------------------------------------

/// A federation under the default policy whose gateway and nodes write audit logs, with
/// rate limits raised so that a whole table of attacks fits in a minute.
struct Lab {
    local: LocalFederation,
    gateway_log: PathBuf,
    node_logs: BTreeMap<String, PathBuf>,
    node_addrs: BTreeMap<String, SocketAddr>,
    truth: Truth,
    _dir: tempfile::TempDir,
}

async fn lab() -> Lab {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let nodes = audited_nodes(dir.path()).await;
    let names: BTreeMap<&str, &str> = default_trusts().iter().map(|t| (t.code, t.name)).collect();
    let endpoints: Vec<_> = nodes
        .iter()
        .map(|(code, node, _)| (code.clone(), names[code.as_str()].to_string(), node.addr))
        .collect();
    let mut config = gateway_config(&endpoints, &default_policies());
    config.limits.queries_per_minute_per_user = 100_000;
    config.limits.queries_per_minute_per_project = 100_000;
    let gateway_log = dir.path().join("gateway.jsonl");
    config.audit_log = Some(gateway_log.clone());
    let gateway = tally_gateway::start(&config).await.unwrap();
    let node_logs = nodes
        .iter()
        .map(|(c, _, log)| (c.clone(), log.clone()))
        .collect();
    let node_addrs = nodes.iter().map(|(c, n, _)| (c.clone(), n.addr)).collect();
    let local = LocalFederation {
        nodes: nodes.into_iter().map(|(_, node, _)| node).collect(),
        gateway,
        security: tls(),
        identity_provider: identity_provider(),
    };
    Lab {
        local,
        gateway_log,
        node_logs,
        node_addrs,
        truth: Truth::new().await,
        _dir: dir,
    }
}

impl Lab {
    /// The gateway audit record of the last run of `sql` that was answered.
    fn answered_record(&self, sql: &str) -> Option<Value> {
        log_records(&self.gateway_log)
            .into_iter()
            .rfind(|r| r["step"] == "run" && r["sql"] == sql && r["outcome"] == "answered")
    }

    /// The releases the gateway sent for the last answered run of `sql`.
    fn releases_of(&self, sql: &str) -> Vec<ReleaseQuery> {
        self.answered_record(sql)
            .map(|r| serde_json::from_value(r["releases"].clone()).unwrap())
            .unwrap_or_default()
    }

    /// Every record trust `code` wrote for query `query_id`.
    fn node_records(&self, code: &str, query_id: &str) -> Vec<Value> {
        log_records(&self.node_logs[code])
            .into_iter()
            .filter(|r| r["query_id"] == query_id)
            .collect()
    }

    async fn stop(self) {
        self.local.stop().await;
    }
}

/// The records of a JSON-lines audit log (empty when it does not exist yet).
fn log_records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit line is JSON"))
        .collect()
}

// ------------------------------------------------------------------------------------------
// Ground truth from the Parquet files.
// ------------------------------------------------------------------------------------------

/// The trusts' files in one DataFusion context ([`centralised`]) with the generalisers, the
/// opt-out lists, and views of the rows each trust may use (`kept_patients`,
/// `kept_episodes`: without its opted-out patients); and every value no answer may hold.
struct Truth {
    ctx: SessionContext,
    /// Every NHS number, person id, episode id and full postcode in the files.
    forbidden: HashSet<String>,
}

impl Truth {
    async fn new() -> Self {
        let mut ctx = centralised().await;
        tally_common::generalise::register(&mut ctx).unwrap();
        let mut parts = Vec::new();
        for code in TRUSTS {
            let name = format!("opt_outs_{code}");
            let path = data_dir().join(code).join("opt_outs.parquet");
            ctx.register_parquet(&name, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            parts.push(format!(
                "SELECT nhs_number, '{code}' AS trust_code FROM {name}"
            ));
        }
        for view in [
            format!("CREATE VIEW opt_outs AS {}", parts.join(" UNION ALL ")),
            "CREATE VIEW opted_out AS SELECT p.person_id FROM patients p JOIN opt_outs o \
             ON p.nhs_number = o.nhs_number AND p.trust_code = o.trust_code"
                .into(),
            "CREATE VIEW kept_patients AS SELECT * FROM patients \
             WHERE person_id NOT IN (SELECT person_id FROM opted_out)"
                .into(),
            "CREATE VIEW kept_episodes AS SELECT * FROM episodes \
             WHERE person_id NOT IN (SELECT person_id FROM opted_out)"
                .into(),
        ] {
            ctx.sql(&view).await.unwrap();
        }
        let mut truth = Truth {
            ctx,
            forbidden: HashSet::new(),
        };
        let values = truth
            .rows(
                "SELECT nhs_number FROM patients UNION ALL SELECT person_id FROM patients \
                 UNION ALL SELECT episode_id FROM episodes UNION ALL SELECT postcode FROM patients",
            )
            .await;
        truth.forbidden = values.iter().map(|r| r[0].to_string()).collect();
        truth
    }

    async fn rows(&self, sql: &str) -> Vec<Vec<ScalarValue>> {
        let frame = self
            .ctx
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

    /// One number.
    async fn number(&self, sql: &str) -> f64 {
        number(&self.rows(sql).await[0][0]).unwrap_or(0.0)
    }

    /// The groups trust `code` may release for `release` (at least `threshold` distinct
    /// patients there, after its opt-out), each with its exact partials (in
    /// [`ReleaseQuery::partials`] order).
    async fn groups(
        &self,
        release: &ReleaseQuery,
        code: &str,
        threshold: i64,
    ) -> BTreeMap<String, Vec<Option<f64>>> {
        let keys = release.group_by.len();
        self.rows(&truth_sql(release, code))
            .await
            .into_iter()
            .filter(|row| number(&row[keys]).unwrap_or(0.0) >= threshold as f64)
            .map(|row| {
                (
                    key_of(&row[..keys]),
                    row[keys + 1..].iter().map(number).collect(),
                )
            })
            .collect()
    }
}

/// A group's key as text.
fn key_of(values: &[ScalarValue]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("|")
}

/// The ground-truth SQL of `release` at trust `code`: per group, distinct patients and rows.
fn truth_sql(release: &ReleaseQuery, code: &str) -> String {
    let fact = &release.fact;
    let mut sql = String::from("SELECT ");
    for (i, dimension) in release.group_by.iter().enumerate() {
        let _ = write!(sql, "{} AS g{i}, ", dimension_sql(dimension));
    }
    let _ = write!(sql, "COUNT(DISTINCT {fact}.person_id) AS patients");
    for partial in release.partials() {
        let value = match &partial {
            Partial::Rows => "COUNT(*)".to_string(),
            Partial::Count(c) => format!("COUNT({})", column_sql(c)),
            Partial::Sum(c) => format!("SUM(CAST({} AS DOUBLE))", column_sql(c)),
            Partial::SumSquares(c) => {
                format!(
                    "SUM(CAST({0} AS DOUBLE) * CAST({0} AS DOUBLE))",
                    column_sql(c)
                )
            }
        };
        let _ = write!(sql, ", {value}");
    }
    let _ = write!(sql, " FROM kept_{fact} AS {fact}");
    for join in &release.joins {
        match join.as_str() {
            "patients" => {
                let _ = write!(
                    sql,
                    " JOIN kept_patients AS patients ON {fact}.person_id = patients.person_id"
                );
            }
            "icd10_chapters" => {
                let _ = write!(
                    sql,
                    " JOIN (SELECT *, '{code}' AS trust_code FROM icd10_chapters) AS chapters \
                     ON substr({fact}.diagnosis_icd10, 1, 3) BETWEEN chapters.code_from AND chapters.code_to"
                );
            }
            other => panic!("no ground truth for a join to {other}"),
        }
    }
    let _ = write!(sql, " WHERE {fact}.trust_code = '{code}'");
    if let Some(filter) = &release.filter {
        let _ = write!(sql, " AND ({})", predicate_sql(filter));
    }
    if !release.group_by.is_empty() {
        let positions: Vec<String> = (1..=release.group_by.len())
            .map(|i| i.to_string())
            .collect();
        let _ = write!(sql, " GROUP BY {}", positions.join(", "));
    }
    sql
}

/// A column as ground-truth SQL (the reference table is aliased `chapters`).
fn column_sql(column: &ColumnRef) -> String {
    let table = match column.table.as_str() {
        "icd10_chapters" => "chapters",
        other => other,
    };
    format!("{table}.{}", column.column)
}

/// A dimension as ground-truth SQL.
fn dimension_sql(dimension: &Dimension) -> String {
    let bare = column_sql(&dimension.column);
    match dimension.generaliser {
        None => bare,
        Some(Generaliser::AgeBand) => format!("age_band(CAST({bare} AS BIGINT))"),
        Some(Generaliser::Month) => format!("month(CAST({bare} AS DATE))"),
        Some(Generaliser::Year) => format!("year(CAST({bare} AS DATE))"),
        Some(Generaliser::PostcodeDistrict) => {
            format!("postcode_district(CAST({bare} AS VARCHAR))")
        }
    }
}

/// A filter as ground-truth SQL (prefixes as `starts_with`, as the nodes test them).
fn predicate_sql(predicate: &Predicate) -> String {
    let not = |negated: bool| if negated { "NOT " } else { "" };
    let list = |items: &[Predicate], separator: &str| {
        items
            .iter()
            .map(|p| format!("({})", predicate_sql(p)))
            .collect::<Vec<_>>()
            .join(separator)
    };
    match predicate {
        Predicate::And { all } => list(all, " AND "),
        Predicate::Or { any } => list(any, " OR "),
        Predicate::Not { not } => format!("NOT ({})", predicate_sql(not)),
        Predicate::Compare { on, cmp, value } => {
            format!("{} {} {}", dimension_sql(on), cmp.symbol(), value.to_sql())
        }
        Predicate::InList {
            on,
            values,
            negated,
        } => format!(
            "{} {}IN ({})",
            dimension_sql(on),
            not(*negated),
            values
                .iter()
                .map(Literal::to_sql)
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Predicate::Between {
            on,
            low,
            high,
            negated,
        } => format!(
            "{} {}BETWEEN {} AND {}",
            dimension_sql(on),
            not(*negated),
            low.to_sql(),
            high.to_sql()
        ),
        Predicate::IsNull { on, negated } => {
            format!("{} IS {}NULL", dimension_sql(on), not(*negated))
        }
        Predicate::Prefix {
            on,
            prefix,
            negated,
        } => format!(
            "{}starts_with({}, {})",
            not(*negated),
            dimension_sql(on),
            Literal::Text(prefix.clone()).to_sql()
        ),
    }
}

// ------------------------------------------------------------------------------------------
// Judging answers and refusals.
// ------------------------------------------------------------------------------------------

/// The reason codes (`E_...`) in an error's text, in order.
fn codes(text: &str) -> Vec<&str> {
    let bytes = text.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut found = Vec::new();
    let mut i = 0;
    while i + 2 < bytes.len() {
        if (i == 0 || !word(bytes[i - 1])) && bytes[i..].starts_with(b"E_") {
            let len = bytes[i + 2..]
                .iter()
                .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || **b == b'_')
                .count();
            if len > 0 {
                found.push(&text[i..i + 2 + len]);
                i += 2 + len;
                continue;
            }
        }
        i += 1;
    }
    found
}

/// Whether `text` leads with the codes `spec` lists (space-separated).
fn leads_with(text: &str, spec: &str) -> bool {
    let want: Vec<&str> = spec.split(' ').collect();
    let got = codes(text);
    got.len() >= want.len() && got[..want.len()] == want[..]
}

/// A value as a number, if it is one.
fn number(value: &ScalarValue) -> Option<f64> {
    if value.is_null() || !value.data_type().is_numeric() {
        return None;
    }
    match value.cast_to(&DataType::Float64).ok()? {
        ScalarValue::Float64(Some(v)) => Some(v),
        _ => None,
    }
}

/// A count rounded as the policy rounds it (to the nearest 5, halves up).
fn rounded(n: f64) -> f64 {
    ((n + ROUND_TO / 2.0) / ROUND_TO).floor() * ROUND_TO
}

/// Whether `x` is a multiple of `m` (up to floating-point error).
fn multiple_of(x: f64, m: f64) -> bool {
    let q = x / m;
    (q - q.round()).abs() <= 1e-6 * q.abs().max(1.0)
}

/// A cell as the text an identifier would have.
fn cell_text(value: &ScalarValue) -> Option<String> {
    match value {
        v if v.is_null() => None,
        ScalarValue::Float64(Some(f)) if f.fract() == 0.0 && f.abs() < 1e15 => {
            Some(format!("{f:.0}"))
        }
        v => Some(v.to_string()),
    }
}

/// What an answer holds that the rules forbid: identifiers or full postcodes anywhere, and
/// counts (columns named `n...` or `count(...)`) that are not multiples of 5, or `whole...`
/// columns that are not whole.
fn answer_violations(truth: &Truth, batches: &[RecordBatch]) -> Vec<String> {
    let mut found = Vec::new();
    let Some(first) = batches.first() else {
        return found;
    };
    let names: Vec<String> = first
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().to_lowercase())
        .collect();
    for row in rows(batches) {
        for (name, value) in names.iter().zip(&row) {
            if let Some(text) = cell_text(value)
                && truth.forbidden.contains(&text)
            {
                found.push(format!(
                    "column {name} releases the identifier or postcode {text}"
                ));
            }
            let Some(x) = number(value) else { continue };
            if (name.starts_with('n') || name.starts_with("count(")) && !multiple_of(x, ROUND_TO) {
                found.push(format!(
                    "count {name} = {x} is not a multiple of {ROUND_TO}"
                ));
            }
            if name.starts_with("whole") && !multiple_of(x, 1.0) {
                found.push(format!(
                    "{name} = {x} is not whole, so the count it derives from is not rounded"
                ));
            }
        }
    }
    found
}

/// Checks, for the last answered run of `sql`, that every trust released exactly the groups
/// with at least 8 distinct patients there, and (with `keys` > 0 and one release) that the
/// answer's keys are exactly the union of those groups.
async fn release_violations(
    lab: &Lab,
    sql: &str,
    keys: usize,
    answer: &[RecordBatch],
) -> Vec<String> {
    let Some(record) = lab.answered_record(sql) else {
        return vec!["answered without a gateway audit record".into()];
    };
    let query_id = record["query_id"].as_str().unwrap().to_string();
    let releases: Vec<ReleaseQuery> = serde_json::from_value(record["releases"].clone()).unwrap();
    let mut found = Vec::new();
    let mut union = BTreeSet::new();
    for code in TRUSTS {
        for node in lab.node_records(code, &query_id) {
            let Ok(release) = serde_json::from_value::<ReleaseQuery>(node["release"].clone())
            else {
                found.push(format!("{code} logged no model for {query_id}"));
                continue;
            };
            let groups = lab.truth.groups(&release, code, THRESHOLD).await;
            let released = node["rows"].as_u64().unwrap_or(u64::MAX);
            if node["outcome"] != "answered" || released != groups.len() as u64 {
                found.push(format!(
                    "{code} released {released} groups of {}, ground truth has {} with >= {THRESHOLD} patients there",
                    release.render_sql(&governance()),
                    groups.len()
                ));
            }
            union.extend(groups.into_keys());
        }
    }
    if keys > 0 && releases.len() == 1 {
        let got: BTreeSet<String> = rows(answer).iter().map(|r| key_of(&r[..keys])).collect();
        let extra: Vec<_> = got.difference(&union).take(5).collect();
        let missing: Vec<_> = union.difference(&got).take(5).collect();
        if !extra.is_empty() || !missing.is_empty() {
            found.push(format!(
                "released keys differ from the groups of >= {THRESHOLD} patients at a trust: extra {extra:?}, missing {missing:?}"
            ));
        }
    }
    found
}

/// The default catalogue, for rendering releases in messages.
fn governance() -> tally_common::governance::Governance {
    let text = std::fs::read_to_string(default_policies().join("catalogue.json")).unwrap();
    tally_common::governance::Governance::from_policy_data(&serde_json::from_str(&text).unwrap())
        .unwrap()
}

/// Runs one analyst attack through the gateway and judges it; returns what went wrong, and
/// the answer if there was one.
async fn gateway_attack(
    lab: &Lab,
    client: &mut AnalystClient,
    sql: &str,
    expect: Expect,
) -> (Vec<String>, Option<Vec<RecordBatch>>) {
    let result = client.query(sql).await;
    let mut found = Vec::new();
    let batches = result.as_ref().ok().map(|a| a.batches.clone());
    match (expect, result) {
        (Refused(spec), Err(err)) => {
            if !leads_with(&err.to_string(), spec) {
                found.push(format!("expected {spec}, refused with: {err}"));
            }
        }
        (Refused(spec), Ok(answer)) => {
            found.push(format!(
                "expected {spec}, but it was ANSWERED with {} rows",
                row_count(&answer)
            ));
            found.extend(answer_violations(&lab.truth, &answer.batches));
            found.extend(release_violations(lab, sql, 0, &answer.batches).await);
        }
        (Answered(_), Err(err)) => found.push(format!("expected an answer, refused with: {err}")),
        (Answered(keys), Ok(answer)) => {
            found.extend(answer_violations(&lab.truth, &answer.batches));
            found.extend(release_violations(lab, sql, keys, &answer.batches).await);
        }
    }
    (found, batches)
}

fn row_count(answer: &Answer) -> usize {
    answer.batches.iter().map(RecordBatch::num_rows).sum()
}

/// Panics listing every attack that went wrong.
fn report(what: &str, failures: &[(String, String, Vec<String>)]) {
    let failed: Vec<String> = failures
        .iter()
        .filter(|(_, _, found)| !found.is_empty())
        .map(|(class, attack, found)| {
            format!("[{class}] {attack}\n    - {}", found.join("\n    - "))
        })
        .collect();
    assert!(
        failed.is_empty(),
        "{} of {} {what} went wrong:\n{}",
        failed.len(),
        failures.len(),
        failed.join("\n")
    );
}

// ------------------------------------------------------------------------------------------
// Straight at a node: crafted requests and identities.
// ------------------------------------------------------------------------------------------

/// Tokens, signed by the test run's identity provider or forged.
struct Kit {
    token: String,
    provider: IdentityProvider,
    foreign: String,
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

impl Kit {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let foreign = IdentityProvider::ensure(dir.path())
            .unwrap()
            .mint(
                &tally::federation::demo_claims(),
                std::time::Duration::from_secs(600),
            )
            .unwrap();
        Kit {
            token: analyst_token(),
            provider: identity_provider(),
            foreign,
        }
    }

    /// The demo analyst's claims (as the provider signs them), to alter before signing.
    fn claims(&self) -> Value {
        json!({
            "sub": "analyst", "iss": ISSUER, "aud": AUDIENCE, "iat": now(), "exp": now() + 600,
            "groups": ["analysts"],
            "projects": {"uec-demand": ["planning", "research"], "cardiac-audit": ["research"]},
            "default_project": "uec-demand", "default_purpose": "planning",
        })
    }

    /// `claims` with `changes` merged in (a null removes a claim).
    fn claims_with(&self, changes: Value) -> Value {
        let mut claims = self.claims();
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(key);
            } else {
                claims[key] = value.clone();
            }
        }
        claims
    }

    /// `claims` signed with the provider's real key: what a token the provider issued says.
    fn sign(&self, claims: &Value) -> String {
        let pem = std::fs::read_to_string(self.provider.dir.join("signing-key.pem")).unwrap();
        let key = rcgen::KeyPair::from_pem(&pem).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("tally-demo-1".into());
        encode(
            &header,
            claims,
            &EncodingKey::from_ec_der(&key.serialize_der()),
        )
        .unwrap()
    }

    /// The headers the gateway sends: the token, project and purpose.
    fn headers_with(
        &self,
        token: Option<&str>,
        project: &str,
        purpose: &str,
    ) -> Vec<(&'static str, String)> {
        let mut headers = vec![
            (PROJECT_HEADER, project.to_string()),
            (PURPOSE_HEADER, purpose.to_string()),
        ];
        if let Some(token) = token {
            headers.push((ANALYST_TOKEN_HEADER, token.to_string()));
        }
        headers
    }

    fn headers(&self) -> Vec<(&'static str, String)> {
        self.headers_with(Some(&self.token), "uec-demand", "planning")
    }

    /// A request to RXA's node with the gateway's headers.
    fn probe(&self, ticket: Vec<u8>) -> Probe {
        Probe {
            trust: "RXA",
            call: Call::DoGet(ticket),
            headers: self.headers(),
        }
    }

    /// A request carrying `token` for `project` and `purpose`.
    fn as_user(&self, token: &str, project: &str, purpose: &str) -> Probe {
        self.probe(ticket(baseline()))
            .with_headers(self.headers_with(Some(token), project, purpose))
    }
}

/// How a request reaches the node.
enum Call {
    /// `DoGet` with these ticket bytes.
    DoGet(Vec<u8>),
    /// `GetFlightInfo` for a SQL statement (how a Flight SQL client sends SQL).
    FlightInfo(String),
}

/// One request straight at a node.
struct Probe {
    trust: &'static str,
    call: Call,
    headers: Vec<(&'static str, String)>,
}

impl Probe {
    fn at(mut self, trust: &'static str) -> Self {
        self.trust = trust;
        self
    }

    fn with_headers(mut self, headers: Vec<(&'static str, String)>) -> Self {
        self.headers = headers;
        self
    }

    fn with_header(mut self, name: &'static str, value: &str) -> Self {
        self.headers.push((name, value.to_string()));
        self
    }
}

/// A crafted request, by class.
type NodeAttack = (&'static str, fn(&Kit) -> Probe, Expect);

/// Requests straight at a node, by class (RXA unless `.at(...)` says otherwise).
#[rustfmt::skip]
const NODE_ATTACKS: &[NodeAttack] = &[
    // --- 9. Forged identity straight at a node. ---
    ("identity", |k| k.probe(ticket(baseline())).with_headers(k.headers_with(None, "uec-demand", "planning")), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.probe(ticket(baseline())).with_headers(k.headers_with(None, "uec-demand", "planning")).with_header("x-tally-user", "analyst").with_header("x-tally-groups", "analysts"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"exp": now() - 3600, "iat": now() - 7200}))), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"nbf": now() + 3600}))), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"exp": null}))), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"iss": "https://evil.example"}))), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"aud": "another-service"}))), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.foreign, "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&tampered(&k.token), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&unsigned(&k.claims()), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&hmac_with_jwks(k), "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(tally::federation::DEMO_STATIC_TOKEN, "uec-demand", "planning"), Refused("E_UNAUTHENTICATED")),
    ("identity", |k| k.as_user(&k.token, "renal-research", "research"), Refused("E_PROJECT")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"projects": {"cardiac-audit": ["research"]}, "default_project": null}))), "uec-demand", "planning"), Refused("E_PROJECT")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"default_project": null}))), "", ""), Refused("E_PROJECT")),
    ("identity", |k| k.as_user(&k.sign(&k.claims_with(json!({"projects": {"shadow-project": ["research"]}, "default_project": null}))), "shadow-project", "research"), Refused("E_PROJECT")),
    ("identity", |k| k.probe(ticket(baseline())).with_header("x-tally-user", "mallory").with_header("x-tally-groups", "admins,governance"), Answered(0)),
    ("identity", |k| k.probe(ticket(baseline())).with_header("x-tally-min-patients", "0"), Answered(0)),
    // --- Project scope at the node: cardiac-audit covers RXA and RXB, episodes only. ---
    ("project scope", |k| k.as_user(&k.token, "cardiac-audit", "research").at("RXC"), Refused("E_PROJECT")),
    ("project scope", |k| k.as_user(&k.token, "cardiac-audit", "research").at("RXB"), Answered(0)),
    ("project scope", |k| k.probe(ticket(patients_by_sex())).with_headers(k.headers_with(Some(&k.token), "cardiac-audit", "research")), Refused("E_TABLE_NOT_ALLOWED")),
    ("project scope", |k| k.probe(ticket(model("episodes", &["patients"], None, vec![dim("patients", "sex")], vec![count_rows()]))).with_headers(k.headers_with(Some(&k.token), "cardiac-audit", "research")), Refused("E_TABLE_NOT_ALLOWED")),
    // --- 8. Purpose games at the node. ---
    ("purpose", |k| k.as_user(&k.token, "uec-demand", "direct_care"), Refused("E_PURPOSE")),
    ("purpose", |k| k.as_user(&k.token, "uec-demand", "audit"), Refused("E_PURPOSE")),
    ("purpose", |k| k.as_user(&k.token, "cardiac-audit", "planning"), Refused("E_PURPOSE")),
    ("purpose", |k| k.as_user(&k.sign(&k.claims_with(json!({"projects": {"uec-demand": ["direct_care"]}, "default_purpose": null}))), "uec-demand", "direct_care"), Refused("E_PURPOSE")),
    ("purpose", |k| k.as_user(&k.sign(&k.claims_with(json!({"projects": {"uec-demand": ["audit"]}, "default_purpose": null}))), "uec-demand", "audit"), Refused("E_PURPOSE")),
    ("purpose", |k| k.probe(request_ticket(json!({"release": baseline(), "min_distinct_patients": 0, "apply_opt_out": false}))), Refused("E_BAD_REQUEST")),
    // --- Malformed models. ---
    ("malformed model", |k| k.probe(ticket(with(baseline(), "version", json!(2)))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(with(baseline(), "version", json!(0)))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(with(baseline(), "version", json!("1")))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(with(baseline(), "sql", json!("SELECT * FROM patients")))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(request_ticket(json!({"release": baseline(), "min_distinct_patients": 0, "round_to": 1}))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![json!({"column": col("episodes", "specialty"), "generaliser": null, "expr": "cost * 1"})], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(request_ticket(json!({"release": "SELECT nhs_number FROM patients", "min_distinct_patients": 0}))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(request_ticket(json!({"release": baseline(), "min_distinct_patients": -1}))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(any_ticket(RELEASE_TYPE_URL, duplicate_release().into_bytes())), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(any_ticket(RELEASE_TYPE_URL, b"{not json".to_vec())), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(any_ticket("type.googleapis.com/evil.Command", serde_json::to_vec(&json!({"release": baseline(), "min_distinct_patients": 0})).unwrap())), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(vec![0xff, 0xff, 0xff, 0xff, 0x0f, 0x01]), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(b"SELECT nhs_number, postcode FROM patients".to_vec()), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(statement_ticket("SELECT nhs_number, postcode FROM patients")), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(prepared_ticket("SELECT nhs_number, postcode FROM patients")), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| Probe { trust: "RXA", call: Call::FlightInfo("SELECT nhs_number, postcode FROM patients".into()), headers: k.headers() }, Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &["episodes"], None, vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("patients", &["episodes"], None, vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &["patients", "patients"], None, vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &["opt_outs"], None, vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("icd10_chapters", &[], None, vec![dim("icd10_chapters", "chapter")], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("opt_outs", &[], None, vec![], vec![count_rows()]))), Refused("E_UNKNOWN_TABLE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "colour")], vec![count_rows()]))), Refused("E_UNCLASSIFIED_COLUMN")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("patients", "sex")], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "specialty")], vec![]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &["patients"], None, nine_dimensions(), vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![], vec![count_rows(); 33]))), Refused("E_QUERY_SHAPE")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![], vec![agg("min", "episodes", "cost")]))), Refused("E_BAD_REQUEST")),
    ("malformed model", |k| k.probe(ticket(model("episodes", &[], None, vec![json!({"column": col("episodes", "diagnosis_icd10"), "generaliser": "substr"})], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    // --- Identifiers in the model. ---
    ("identifier", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "person_id")], vec![count_rows()]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("episodes", &["patients"], None, vec![dim("patients", "nhs_number")], vec![count_rows()]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("patients", &[], Some(compare(dim("patients", "nhs_number"), "eq", text("9693109996"))), vec![], vec![count_rows()]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("patients", &[], Some(json!({"op": "prefix", "on": dim("patients", "nhs_number"), "prefix": "9171", "negated": false})), vec![], vec![count_rows()]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("episodes", &[], Some(json!({"op": "is_null", "on": dim("episodes", "episode_id"), "negated": true})), vec![], vec![count_rows()]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("episodes", &[], None, vec![], vec![agg("count", "episodes", "person_id")]))), Refused("E_IDENTIFIER_COLUMN")),
    ("identifier", |k| k.probe(ticket(model("episodes", &[], None, vec![], vec![agg("sum", "episodes", "episode_id")]))), Refused("E_IDENTIFIER_COLUMN")),
    // --- Generalisers and classes in the model. ---
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![generalised("age_band", "episodes", "cost")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![generalised("postcode_district", "episodes", "diagnosis_icd10")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("patients", &[], None, vec![dim("patients", "postcode")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("patients", &[], None, vec![dim("patients", "year_of_birth")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "age_at_admission")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![generalised("month", "episodes", "cost")], vec![count_rows()]))), Refused("E_QUASI_IDENTIFIER")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], Some(compare(generalised("age_band", "episodes", "age_at_admission"), "eq", int(40))), vec![], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "cost")], vec![count_rows()]))), Refused("E_MEASURE_USAGE")),
    ("generaliser", |k| k.probe(ticket(model("episodes", &[], None, vec![], vec![agg("sum", "episodes", "specialty")]))), Refused("E_MEASURE_USAGE")),
    ("generaliser", |k| k.probe(ticket(model("patients", &[], None, vec![], vec![agg("count", "patients", "year_of_birth")]))), Refused("E_MEASURE_USAGE")),
    // --- Filters in the model. ---
    ("filter", |k| k.probe(ticket(model("patients", &[], Some(json!({"op": "prefix", "on": dim("patients", "postcode"), "prefix": "LS8 9", "negated": false})), vec![], vec![count_rows()]))), Refused("E_FILTER_NOT_ALLOWED")),
    ("filter", |k| k.probe(ticket(model("patients", &[], Some(compare(generalised("postcode_district", "patients", "postcode"), "eq", text("LS8"))), vec![], vec![count_rows()]))), Refused("E_FILTER_NOT_ALLOWED")),
    ("filter", |k| k.probe(ticket(model("patients", &[], Some(compare(dim("patients", "year_of_birth"), "eq", int(1973))), vec![], vec![count_rows()]))), Refused("E_FILTER_NOT_ALLOWED")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "age_at_admission"), "eq", text("40"))), vec![], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "length_of_stay"), "gt", json!({"type": "float", "value": 2.5}))), vec![], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "age_at_admission"), "lt", int(i64::MAX))), vec![], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "admission_date"), "eq", json!({"type": "date", "value": "2020-13-45"}))), vec![], vec![count_rows()]))), Refused("E_BAD_REQUEST")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(json!({"op": "in_list", "on": dim("episodes", "specialty"), "values": [], "negated": true})), vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(huge_in_list()), vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(json!({"op": "and", "all": []})), vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("filter", |k| k.probe(ticket(model("episodes", &[], Some(nested_not(40)), vec![], vec![count_rows()]))), Refused("E_QUERY_SHAPE")),
    ("filter", |k| k.probe(any_ticket(RELEASE_TYPE_URL, deeply_nested_not(10_000))), Refused("E_BAD_REQUEST")),
    // --- What a node must answer safely whatever it is asked. ---
    ("threshold", |k| k.probe(ticket(model("episodes", &[], None, vec![dim("episodes", "diagnosis_icd10")], vec![count_rows(), agg("sum", "episodes", "cost")]))), Answered(0)),
    ("rounding", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "cost"), "gt", int(300_000))), vec![], vec![count_rows(), agg("sum", "episodes", "cost")]))).at("RXB"), Refused("E_MEASURE_USAGE")),
    ("rounding", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "length_of_stay"), "eq", int(1))), vec![dim("episodes", "specialty")], vec![agg("sum", "episodes", "length_of_stay")]))), Refused("E_MEASURE_USAGE")),
    ("rounding", |k| k.probe(ticket(model("episodes", &[], None, vec![generalised("age_band", "episodes", "age_at_admission")], vec![agg("mean", "episodes", "age_at_admission")]))), Refused("E_MEASURE_USAGE")),
    ("threshold", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "cost"), "gt", int(300_000))), vec![], vec![count_rows(), agg("sum", "episodes", "length_of_stay")]))).at("RXB"), Answered(0)),
    ("threshold", |k| k.probe(ticket(model("episodes", &["patients", "icd10_chapters"], None, vec![dim("icd10_chapters", "chapter"), dim("patients", "sex"), generalised("age_band", "episodes", "age_at_admission")], vec![count_rows(), agg("mean", "episodes", "length_of_stay")]))).at("RXC"), Answered(0)),
    ("threshold", |k| k.probe(ticket(model("patients", &[], None, vec![generalised("postcode_district", "patients", "postcode"), dim("patients", "sex")], vec![count_rows()]))), Answered(0)),
    ("threshold", |k| k.probe(request_ticket(json!({"release": model("episodes", &[], None, vec![dim("episodes", "specialty"), dim("episodes", "admission_method")], vec![count_rows()]), "min_distinct_patients": 25}))).at("RXB"), Answered(0)),
    ("threshold", |k| k.probe(ticket(model("episodes", &[], Some(json!({"op": "prefix", "on": dim("episodes", "diagnosis_icd10"), "prefix": "%", "negated": false})), vec![], vec![count_rows()]))), Answered(0)),
    ("threshold", |k| k.probe(ticket(model("episodes", &[], Some(compare(dim("episodes", "trust_code"), "eq", text("RXB"))), vec![dim("episodes", "specialty")], vec![count_rows()]))), Answered(0)),
    ("threshold", |k| k.probe(ticket(model("episodes", &[], Some(json!({"op": "not", "not": compare(dim("episodes", "specialty"), "eq", text("100"))})), vec![generalised("month", "episodes", "admission_date")], vec![count_rows(), json!({"function": "variance", "column": col("episodes", "cost"), "population": true})]))).at("RXC"), Answered(0)),
];

/// Episodes per specialty: count and total cost (a legitimate release).
fn baseline() -> Value {
    model(
        "episodes",
        &[],
        None,
        vec![dim("episodes", "specialty")],
        vec![count_rows(), agg("sum", "episodes", "cost")],
    )
}

fn patients_by_sex() -> Value {
    model(
        "patients",
        &[],
        None,
        vec![dim("patients", "sex")],
        vec![count_rows()],
    )
}

fn model(
    fact: &str,
    joins: &[&str],
    filter: Option<Value>,
    group_by: Vec<Value>,
    aggregates: Vec<Value>,
) -> Value {
    json!({"version": 1, "fact": fact, "joins": joins, "filter": filter, "group_by": group_by, "aggregates": aggregates})
}

/// `value` with `field` set.
fn with(mut value: Value, field: &str, to: Value) -> Value {
    value[field] = to;
    value
}

fn col(table: &str, column: &str) -> Value {
    json!({"table": table, "column": column})
}

fn dim(table: &str, column: &str) -> Value {
    json!({"column": col(table, column), "generaliser": null})
}

fn generalised(generaliser: &str, table: &str, column: &str) -> Value {
    json!({"column": col(table, column), "generaliser": generaliser})
}

fn count_rows() -> Value {
    json!({"function": "count_rows"})
}

fn agg(function: &str, table: &str, column: &str) -> Value {
    json!({"function": function, "column": col(table, column)})
}

fn compare(on: Value, cmp: &str, value: Value) -> Value {
    json!({"op": "compare", "on": on, "cmp": cmp, "value": value})
}

fn text(value: &str) -> Value {
    json!({"type": "text", "value": value})
}

fn int(value: i64) -> Value {
    json!({"type": "int", "value": value})
}

fn nine_dimensions() -> Vec<Value> {
    let mut dims: Vec<Value> = [
        "specialty",
        "admission_method",
        "diagnosis_icd10",
        "procedure_opcs4",
        "trust_code",
    ]
    .iter()
    .map(|c| dim("episodes", c))
    .collect();
    dims.extend(
        ["sex", "ethnicity", "imd_decile", "trust_code"]
            .iter()
            .map(|c| dim("patients", c)),
    );
    dims
}

fn huge_in_list() -> Value {
    let values: Vec<Value> = (0..100_000).map(|i| text(&format!("X{i:05}"))).collect();
    json!({"op": "in_list", "on": dim("episodes", "diagnosis_icd10"), "values": values, "negated": true})
}

fn nested_not(depth: usize) -> Value {
    (0..depth).fold(
        compare(dim("episodes", "specialty"), "eq", text("100")),
        |inner, _| json!({"op": "not", "not": inner}),
    )
}

/// A request whose filter is `depth` NOTs deep, written as text (too deep to build as a
/// `Value` without recursion).
fn deeply_nested_not(depth: usize) -> Vec<u8> {
    let leaf = compare(dim("episodes", "specialty"), "eq", text("100")).to_string();
    let filter = format!(
        "{}{leaf}{}",
        r#"{"op":"not","not":"#.repeat(depth),
        "}".repeat(depth)
    );
    let release = baseline()
        .to_string()
        .replace(r#""filter":null"#, &format!(r#""filter":{filter}"#));
    format!(r#"{{"release":{release},"min_distinct_patients":0}}"#).into_bytes()
}

/// A request naming two releases: the validator and the planner must see the same one.
fn duplicate_release() -> String {
    let harmless = baseline().to_string();
    let harmful = model(
        "episodes",
        &[],
        None,
        vec![dim("episodes", "person_id")],
        vec![count_rows()],
    )
    .to_string();
    format!(r#"{{"release":{harmless},"release":{harmful},"min_distinct_patients":0}}"#)
}

/// The ticket the gateway sends for `release`, asking for no threshold at all.
fn ticket(release: Value) -> Vec<u8> {
    request_ticket(json!({"release": release, "min_distinct_patients": 0}))
}

fn request_ticket(request: Value) -> Vec<u8> {
    any_ticket(RELEASE_TYPE_URL, serde_json::to_vec(&request).unwrap())
}

fn any_ticket(type_url: &str, value: Vec<u8>) -> Vec<u8> {
    Any {
        type_url: type_url.into(),
        value: value.into(),
    }
    .encode_to_vec()
}

/// SQL text as a Flight SQL statement ticket.
fn statement_ticket(sql: &str) -> Vec<u8> {
    TicketStatementQuery {
        statement_handle: sql.as_bytes().to_vec().into(),
    }
    .as_any()
    .encode_to_vec()
}

/// SQL text as a prepared-statement handle.
fn prepared_ticket(sql: &str) -> Vec<u8> {
    CommandPreparedStatementQuery {
        prepared_statement_handle: sql.as_bytes().to_vec().into(),
    }
    .as_any()
    .encode_to_vec()
}

/// `token` with its claims changed to approve direct care, signature kept.
fn tampered(token: &str) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let parts: Vec<&str> = token.split('.').collect();
    let mut claims: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["projects"] = json!({"uec-demand": ["planning", "research", "direct_care"], "renal-research": ["research"]});
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    format!("{}.{body}.{}", parts[0], parts[2])
}

/// `claims` as an `alg: none` token.
fn unsigned(claims: &Value) -> String {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT","kid":"tally-demo-1"}"#);
    let body = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).unwrap());
    format!("{header}.{body}.")
}

/// The demo claims signed HS256 with the public key set as the shared secret (algorithm
/// confusion).
fn hmac_with_jwks(kit: &Kit) -> String {
    let secret = std::fs::read(kit.provider.jwks_path()).unwrap();
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some("tally-demo-1".into());
    encode(&header, &kit.claims(), &EncodingKey::from_secret(&secret)).unwrap()
}

/// A failed call's text: the status message for gRPC errors.
fn flight_error(err: FlightError) -> String {
    match err {
        FlightError::Tonic(status) => format!("{} ({:?})", status.message(), status.code()),
        other => other.to_string(),
    }
}

/// Sends `probe` to its node with the gateway's certificate, tagged `query_id`.
async fn call_node(lab: &Lab, probe: &Probe, query_id: &str) -> Result<Vec<RecordBatch>, String> {
    let mut client = node_client(lab.node_addrs[probe.trust], probe.trust).await;
    for (name, value) in &probe.headers {
        client.set_header(*name, value.clone());
    }
    client.set_header(QUERY_ID_HEADER, query_id);
    match &probe.call {
        Call::DoGet(bytes) => {
            let stream = client
                .do_get(Ticket::new(bytes.clone()))
                .await
                .map_err(flight_error)?;
            stream.try_collect().await.map_err(flight_error)
        }
        Call::FlightInfo(sql) => {
            let info = client
                .execute(sql.clone(), None)
                .await
                .map_err(flight_error)?;
            fetch_all(&mut client, info)
                .await
                .map(|(b, _)| b)
                .map_err(flight_error)
        }
    }
}

/// The release a probe carries, when it is a valid release request.
fn probe_request(probe: &Probe) -> Option<ReleaseRequest> {
    let Call::DoGet(bytes) = &probe.call else {
        return None;
    };
    ReleaseRequest::from_any(&Any::decode(bytes.as_slice()).ok()?).ok()
}

/// What a node's answer to `request` holds that it must not: groups other than those with
/// at least the threshold of distinct patients at this trust after its opt-out, row counts
/// other than the ground truth's (so rows of opted-out patients were counted), identifiers.
async fn node_answer_violations(
    lab: &Lab,
    code: &str,
    request: &ReleaseRequest,
    batches: &[RecordBatch],
) -> Vec<String> {
    let mut found = answer_violations(&lab.truth, batches);
    let release = &request.release;
    let threshold = THRESHOLD;
    let groups = lab.truth.groups(release, code, threshold).await;
    let keys = release.group_by.len();
    let partials = release.partials();
    let answer = rows(batches);
    let got: BTreeSet<String> = answer.iter().map(|r| key_of(&r[..keys])).collect();
    let want: BTreeSet<String> = groups.keys().cloned().collect();
    if got != want {
        let extra: Vec<_> = got.difference(&want).take(5).collect();
        let missing: Vec<_> = want.difference(&got).take(5).collect();
        found.push(format!(
            "{code} released other groups than those of >= {threshold} patients there: extra {extra:?}, missing {missing:?}"
        ));
    }
    for row in &answer {
        let key = key_of(&row[..keys]);
        let Some(truth) = groups.get(&key) else {
            continue;
        };
        for (i, (partial, want)) in partials.iter().zip(truth).enumerate() {
            let got = number(&row[keys + i]);
            let ok = match (partial.is_count(), got, want) {
                (true, Some(got), Some(want)) => got == rounded(*want),
                (false, Some(got), Some(want)) => (got - want).abs() <= 1e-9 * want.abs().max(1.0),
                (_, None, None) => true,
                _ => false,
            };
            if !ok {
                found.push(format!(
                    "{code} released {partial:?} = {got:?} for group [{key}]; ground truth after the opt-out is {want:?}{}",
                    if partial.is_count() { " (rounded to 5)" } else { "" }
                ));
            }
        }
    }
    found
}

/// Sends one crafted request and judges the answer and the trust's audit record.
async fn node_attack(lab: &Lab, probe: &Probe, expect: Expect, query_id: &str) -> Vec<String> {
    let result = call_node(lab, probe, query_id).await;
    let mut found = Vec::new();
    match (&expect, &result) {
        (Refused(spec), Err(err)) => {
            if !leads_with(err, spec) {
                found.push(format!(
                    "expected {spec} from {}, refused with: {err}",
                    probe.trust
                ));
            }
            for trust in default_trusts() {
                if (err.contains(trust.name) || err.contains(trust.code))
                    && !spec.contains("E_PROJECT")
                {
                    found.push(format!("the refusal names trust {}: {err}", trust.code));
                }
            }
        }
        (Refused(spec), Ok(batches)) => {
            found.push(format!(
                "expected {spec}, but {} ANSWERED {} rows",
                probe.trust,
                rows(batches).len()
            ));
        }
        (Answered(_), Err(err)) => found.push(format!(
            "expected an answer from {}, refused with: {err}",
            probe.trust
        )),
        (Answered(_), Ok(batches)) => match probe_request(probe) {
            Some(request) => {
                found.extend(node_answer_violations(lab, probe.trust, &request, batches).await)
            }
            None => found.push("answered something that is not a release request".into()),
        },
    }
    let records = lab.node_records(probe.trust, query_id);
    match (records.last(), expect) {
        (None, _) => found.push(format!("{} wrote no audit record for it", probe.trust)),
        (Some(record), Refused(spec)) => {
            let code = spec.split(' ').next_back().unwrap();
            let logged: Vec<&str> = record["codes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            if record["outcome"] != "refused" || !logged.contains(&code) {
                found.push(format!(
                    "audited as {} {logged:?}, expected refused {code}",
                    record["outcome"]
                ));
            }
        }
        (Some(record), Answered(_)) => {
            if record["outcome"] != "answered" {
                found.push(format!("audited as {}", record["outcome"]));
            }
            if record["identity"]["user"] != "analyst"
                || record["identity"]["groups"] != json!(["analysts"])
            {
                found.push(format!(
                    "audited identity {} is not the token's",
                    record["identity"]
                ));
            }
        }
    }
    found
}

// ------------------------------------------------------------------------------------------
// The suites.
// ------------------------------------------------------------------------------------------

/// Every analyst attack through the gateway; then each one's SQL text straight at a node
/// (both ways a Flight SQL client sends SQL), and every release an answered attack lowered to
/// replayed at every trust, asking for no threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn analyst_attacks_through_the_gateway_and_at_the_nodes() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    let mut outcomes = Vec::new();
    let mut node_outcomes = Vec::new();
    for (i, (class, sql, expect)) in GATEWAY_ATTACKS.iter().enumerate() {
        let (found, answer) = gateway_attack(&lab, &mut client, sql, *expect).await;
        outcomes.push((class.to_string(), sql.to_string(), found));
        let trust = TRUSTS[i % TRUSTS.len()];
        let as_text = [
            Call::FlightInfo(sql.to_string()),
            Call::DoGet(statement_ticket(sql)),
        ];
        for (j, call) in as_text.into_iter().enumerate() {
            let probe = Probe {
                trust,
                call,
                headers: kit.headers(),
            };
            let found = node_attack(
                &lab,
                &probe,
                Refused("E_BAD_REQUEST"),
                &format!("sql-{i}-{j}"),
            )
            .await;
            node_outcomes.push((
                class.to_string(),
                format!("SQL text at {trust}: {sql}"),
                found,
            ));
        }
        if answer.is_none() {
            continue;
        }
        for (r, release) in lab.releases_of(sql).iter().enumerate() {
            for code in TRUSTS {
                let model = serde_json::to_value(release).unwrap();
                let probe = kit.probe(ticket(model)).at(code);
                let found =
                    node_attack(&lab, &probe, Answered(0), &format!("replay-{i}-{r}-{code}")).await;
                node_outcomes.push((
                    class.to_string(),
                    format!("release {r} of `{sql}` at {code} with no threshold"),
                    found,
                ));
            }
        }
    }
    report("gateway attacks", &outcomes);
    report("node replays of gateway attacks", &node_outcomes);
    lab.stop().await;
}

/// Crafted requests and forged identities straight at a node with the gateway's
/// certificate: each refused with its code and audited, or answered within the trust's own
/// rules (its threshold, its opt-out) whatever the request asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crafted_requests_straight_at_a_node() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut outcomes = Vec::new();
    for (i, (class, build, expect)) in NODE_ATTACKS.iter().enumerate() {
        let probe = build(&kit);
        let found = node_attack(&lab, &probe, *expect, &format!("node-{i}")).await;
        outcomes.push((
            class.to_string(),
            format!("node attack #{i} at {} ({expect:?})", probe.trust),
            found,
        ));
    }
    report("node attacks", &outcomes);
    lab.stop().await;
}

// ------------------------------------------------------------------------------------------
// Ground-truth attacks that need several answers.
// ------------------------------------------------------------------------------------------

/// The rows of an answer that must be given.
async fn answer(client: &mut AnalystClient, sql: &str) -> Vec<Vec<ScalarValue>> {
    match client.query(sql).await {
        Ok(answer) => rows(&answer.batches),
        Err(err) => panic!("{sql}: {err}"),
    }
}

/// The text of a refusal that must be given.
async fn refusal(client: &mut AnalystClient, sql: &str) -> String {
    match client.query(sql).await {
        Ok(answer) => panic!("{sql} was answered with {} rows", row_count(&answer)),
        Err(err) => err.to_string(),
    }
}

/// Runs `sql` through the gateway and judges it like a table attack (`keys` as in
/// [`Expect::Answered`]), then replays each of its releases straight at every trust with no
/// threshold; panics listing what went wrong, else returns the answer's rows.
async fn judged(
    lab: &Lab,
    kit: &Kit,
    client: &mut AnalystClient,
    sql: &str,
    keys: usize,
) -> Vec<Vec<ScalarValue>> {
    let (mut found, answer) = gateway_attack(lab, client, sql, Answered(keys)).await;
    for (r, release) in lab.releases_of(sql).iter().enumerate() {
        for code in TRUSTS {
            let probe = kit
                .probe(ticket(serde_json::to_value(release).unwrap()))
                .at(code);
            let id = format!("judged-{}-{r}-{code}", tag(sql));
            found.extend(node_attack(lab, &probe, Answered(0), &id).await);
        }
    }
    assert!(found.is_empty(), "{sql}:\n  - {}", found.join("\n  - "));
    rows(&answer.unwrap_or_default())
}

/// A short tag for a query, for the query ids of its replays at the nodes.
fn tag(sql: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    sql.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// The keys of an answer's rows (its first `keys` columns).
fn keys_of(rows: &[Vec<ScalarValue>], keys: usize) -> BTreeSet<String> {
    rows.iter().map(|r| key_of(&r[..keys])).collect()
}

/// Class 7. Patients at two trusts: groups of 4 to 7 real people (NHS numbers) whose person
/// rows over the trusts number 8 or more would pass a threshold counted over the union; no
/// such group is released, by the gateway or by any node (each counts its own patients).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn patients_at_two_trusts_are_not_counted_twice() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    // (ground-truth key expressions over `p` / `e`, the analyst's key expressions, table)
    let cases = [
        (
            "p.ethnicity, p.imd_decile",
            "ethnicity, imd_decile",
            "patients",
        ),
        (
            "p.sex, p.ethnicity, p.imd_decile",
            "sex, ethnicity, imd_decile",
            "patients",
        ),
        (
            "p.sex, p.imd_decile, postcode_district(p.postcode)",
            "sex, imd_decile, postcode_district(postcode)",
            "patients",
        ),
        (
            "p.ethnicity, postcode_district(p.postcode)",
            "ethnicity, postcode_district(postcode)",
            "patients",
        ),
        ("e.diagnosis_icd10", "diagnosis_icd10", "episodes"),
        (
            "e.specialty, age_band(CAST(e.age_at_admission AS BIGINT))",
            "specialty, age_band(age_at_admission)",
            "episodes",
        ),
    ];
    let mut spread = 0;
    for (truth_keys, keys, table) in cases {
        let k = keys.split(", ").count();
        let positions = (1..=k)
            .map(|i| i.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let from = match table {
            "patients" => "kept_patients p",
            _ => "kept_episodes e JOIN kept_patients p ON e.person_id = p.person_id",
        };
        let small = keys_of(
            &lab.truth
                .rows(&format!(
                    "SELECT {truth_keys} FROM {from} GROUP BY {positions} \
                     HAVING COUNT(DISTINCT p.nhs_number) BETWEEN 4 AND 7 AND COUNT(DISTINCT p.person_id) >= {THRESHOLD}"
                ))
                .await,
            k,
        );
        spread += small.len();
        let sql = format!("SELECT {keys}, COUNT(*) AS n FROM {table} GROUP BY {positions}");
        let released = keys_of(&judged(&lab, &kit, &mut client, &sql, k).await, k);
        let leaked: Vec<_> = released.intersection(&small).collect();
        assert!(
            leaked.is_empty(),
            "{sql} released groups of fewer than {THRESHOLD} real people: {leaked:?}"
        );
    }
    assert!(
        spread > 0,
        "the test data holds groups of 4-7 people spread over trusts"
    );
    lab.stop().await;
}

/// Class 8. Project and purpose come from signed approvals: an analyst cannot choose
/// `direct_care` (which would skip the opt-out) or a purpose or project not approved, a
/// project reaches only its trusts and tables, and every analytics purpose applies the
/// opt-out, so switching purpose tells nothing about who opted out.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn purposes_and_projects_come_from_signed_approvals() {
    let lab = lab().await;
    let kit = Kit::new();
    let target = lab.local.gateway_target();
    let by_sex = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY 1";
    let signed = |changes: Value| kit.sign(&kit.claims_with(changes));
    let games = [
        (kit.token.clone(), "uec-demand", "direct_care", "E_PURPOSE"),
        (kit.token.clone(), "uec-demand", "audit", "E_PURPOSE"),
        (kit.token.clone(), "cardiac-audit", "planning", "E_PURPOSE"),
        (kit.token.clone(), "renal-research", "research", "E_PROJECT"),
        (
            signed(json!({"projects": {"uec-demand": ["direct_care"]}, "default_purpose": null})),
            "uec-demand",
            "direct_care",
            "E_PURPOSE",
        ),
        (
            signed(json!({"projects": {"shadow-project": ["research"]}, "default_project": null})),
            "shadow-project",
            "research",
            "E_PROJECT",
        ),
        (
            kit.token.clone(),
            "cardiac-audit",
            "research",
            "E_TABLE_NOT_ALLOWED",
        ),
    ];
    for (token, project, purpose, code) in games {
        let mut client = AnalystClient::connect_for(&target, &token, project, purpose)
            .await
            .unwrap();
        let err = refusal(&mut client, by_sex).await;
        assert!(
            leads_with(&err, code),
            "{project}/{purpose}: expected {code}, got {err}"
        );
    }
    // cardiac-audit covers RXA and RXB only: RXC is never asked.
    let mut cardiac = AnalystClient::connect_for(&target, &kit.token, "cardiac-audit", "research")
        .await
        .unwrap();
    let sql = "SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY 1";
    let got = cardiac.query(sql).await.unwrap();
    assert_eq!(
        got.trusts,
        ["RXA", "RXB"],
        "trusts that answered for cardiac-audit"
    );
    let found = [
        answer_violations(&lab.truth, &got.batches),
        release_violations(&lab, sql, 1, &got.batches).await,
    ]
    .concat();
    assert!(found.is_empty(), "{sql}: {found:?}");
    let query_id = lab.answered_record(sql).unwrap()["query_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        lab.node_records("RXC", &query_id).is_empty(),
        "RXC was asked for cardiac-audit"
    );
    // Headers an analyst adds do not change who is asking or the threshold.
    let mut raw = gateway_client(lab.local.gateway.addr, &kit.token).await;
    for (name, value) in [
        ("x-tally-user", "mallory"),
        ("x-tally-groups", "admins"),
        ("x-tally-min-patients", "0"),
        (ANALYST_TOKEN_HEADER, kit.foreign.as_str()),
    ] {
        raw.set_header(name, value);
    }
    let sql = "SELECT diagnosis_icd10, COUNT(*) AS n FROM episodes GROUP BY 1";
    let info = raw.execute(sql.into(), None).await.unwrap();
    let (batches, _) = fetch_all(&mut raw, info).await.unwrap();
    let found = [
        answer_violations(&lab.truth, &batches),
        release_violations(&lab, sql, 1, &batches).await,
    ]
    .concat();
    assert!(found.is_empty(), "{sql} with forged headers: {found:?}");
    let record = lab.answered_record(sql).unwrap();
    assert_eq!(
        record["identity"]["user"], "analyst",
        "the gateway audits the token's user"
    );
    // Every purpose applies the opt-out: the total is that of the kept patients.
    let total = "SELECT COUNT(*) AS n FROM patients";
    let mut kept = 0.0;
    let mut all = 0.0;
    for code in TRUSTS {
        kept += rounded(
            lab.truth
                .number(&format!(
                    "SELECT COUNT(*) FROM kept_patients WHERE trust_code = '{code}'"
                ))
                .await,
        );
        all += rounded(
            lab.truth
                .number(&format!(
                    "SELECT COUNT(*) FROM patients WHERE trust_code = '{code}'"
                ))
                .await,
        );
    }
    assert_ne!(kept, all, "the opt-out changes the released total");
    for purpose in ["planning", "research"] {
        let mut client = AnalystClient::connect_for(&target, &kit.token, "uec-demand", purpose)
            .await
            .unwrap();
        let n = number(&answer(&mut client, total).await[0][0]).unwrap();
        assert_eq!(n, kept, "{purpose}: the total counts opted-out patients");
    }
    lab.stop().await;
}

/// The most expensive episode of a patient who has not opted out, as the attacker knows it
/// from outside (its specialty, admission date, diagnosis and age), with its exact cost and
/// length of stay.
struct TargetEpisode {
    trust: String,
    specialty: String,
    admitted: String,
    diagnosis: String,
    age: i64,
    cost: f64,
    stay: f64,
}

impl TargetEpisode {
    async fn find(truth: &Truth, among: &str) -> Self {
        let row = truth
            .rows(&format!(
                "SELECT trust_code, specialty, CAST(admission_date AS VARCHAR), diagnosis_icd10, \
                 CAST(age_at_admission AS BIGINT), cost, CAST(length_of_stay AS DOUBLE) FROM {among} \
                 ORDER BY cost DESC LIMIT 1"
            ))
            .await
            .remove(0);
        let text = |v: &ScalarValue| v.to_string();
        TargetEpisode {
            trust: text(&row[0]),
            specialty: text(&row[1]),
            admitted: text(&row[2]),
            diagnosis: text(&row[3]),
            age: number(&row[4]).unwrap() as i64,
            cost: number(&row[5]).unwrap(),
            stay: number(&row[6]).unwrap(),
        }
    }

    /// A filter that holds for this episode only (among its trust's episodes).
    fn only(&self) -> String {
        format!(
            "admission_date = DATE '{}' AND diagnosis_icd10 = '{}' AND age_at_admission = {}",
            self.admitted, self.diagnosis, self.age
        )
    }
}

/// The difference of one statistic over two releases in one query: a tracker.
fn tracker(statistic: &str, base: &str, without: &str) -> String {
    format!(
        "SELECT a.v - b.v AS diff FROM (SELECT {statistic} AS v FROM episodes WHERE {base}) a \
         CROSS JOIN (SELECT {statistic} AS v FROM episodes WHERE {base} AND NOT ({without})) b"
    )
}

/// Trackers and differencing, with what the default policy can bound without noise: a
/// query isolating one episode is suppressed, a count tracker's estimate of one episode is
/// a multiple of 5 (never the 1 it is), and an opted-out patient's rows change no answer.
/// (Exact sums still give a tracker one record's value: see
/// `residual_exact_sums_let_a_tracker_recover_one_record`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn trackers_are_bounded_by_rounding_and_the_threshold() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    let target = TargetEpisode::find(&lab.truth, "kept_episodes").await;
    // Isolating the episode: suppressed.
    let isolate = format!(
        "SELECT COUNT(*) AS n, SUM(length_of_stay) AS s FROM episodes WHERE cost >= {}",
        target.cost
    );
    let row = judged(&lab, &kit, &mut client, &isolate, 0).await.remove(0);
    assert!(
        number(&row[0]) == Some(0.0) && row[1].is_null(),
        "{isolate}: {row:?}"
    );
    // Count trackers: base minus base-without-the-target.
    let base = format!("specialty = '{}'", target.specialty);
    for without in [target.only(), format!("cost >= {}", target.cost)] {
        let sql = tracker("COUNT(*)", &base, &without);
        let estimate = number(&judged(&lab, &kit, &mut client, &sql, 0).await[0][0]).unwrap();
        assert!(
            multiple_of(estimate, ROUND_TO) && estimate != 1.0,
            "{sql}: the tracker counts {estimate}"
        );
    }
    // Straight at the target's node, both tracker halves: rounded counts, so no exact 1.
    let node_count =
        |filter: Value| model("episodes", &[], Some(filter), vec![], vec![count_rows()]);
    let specialty = compare(dim("episodes", "specialty"), "eq", text(&target.specialty));
    let mut counts = Vec::new();
    for filter in [
        specialty.clone(),
        json!({"op": "and", "all": [specialty, {"op": "not", "not": compare(dim("episodes", "cost"), "lt", json!({"type": "float", "value": target.cost}))}]}),
    ] {
        let probe = kit
            .probe(ticket(node_count(filter)))
            .at(TRUSTS.iter().find(|t| **t == target.trust).unwrap());
        let id = format!("tracker-{}", counts.len());
        let found = node_attack(&lab, &probe, Answered(0), &id).await;
        assert!(found.is_empty(), "node tracker half: {found:?}");
        let batches = call_node(&lab, &probe, &format!("{id}-again"))
            .await
            .unwrap();
        counts.push(
            rows(&batches)
                .first()
                .and_then(|r| number(&r[0]))
                .unwrap_or(0.0),
        );
    }
    let estimate = counts[0] - counts[1];
    assert!(
        multiple_of(estimate, ROUND_TO) && estimate != 1.0,
        "the node's tracker counts {estimate}"
    );
    // An opted-out patient's episode: excluding it changes nothing, counts and sums alike.
    let opted = TargetEpisode::find(
        &lab.truth,
        "episodes WHERE person_id IN (SELECT person_id FROM opted_out)",
    )
    .await;
    let matching = lab
        .truth
        .number(&format!(
            "SELECT COUNT(*) FROM kept_episodes WHERE trust_code = '{}' AND {}",
            opted.trust,
            opted.only()
        ))
        .await;
    assert_eq!(
        matching, 0.0,
        "the opted-out episode's description matches no other episode"
    );
    let statistics = "COUNT(*) AS n, SUM(cost) AS s, SUM(length_of_stay) AS l";
    let with_target = format!(
        "SELECT {statistics} FROM episodes WHERE trust_code = '{}'",
        opted.trust
    );
    let without_target = format!("{with_target} AND NOT ({})", opted.only());
    let a = judged(&lab, &kit, &mut client, &with_target, 0).await;
    let b = judged(&lab, &kit, &mut client, &without_target, 0).await;
    assert_eq!(
        a, b,
        "excluding an opted-out patient's episode changed the answer"
    );
    lab.stop().await;
}

/// RESIDUAL RISK (no noise yet): exact sums over groups that each pass the threshold let a
/// tracker recover one episode's cost and length of stay exactly, and so whether its
/// patient opted out. Differential privacy (the next issue) must make this test pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "residual risk inherent to exact sums without noise: a tracker recovers one record (closed by DP, next issue)"]
async fn residual_exact_sums_let_a_tracker_recover_one_record() {
    let lab = lab().await;
    let mut client = analyst(&lab.local).await;
    let target = TargetEpisode::find(&lab.truth, "kept_episodes").await;
    let base = format!("specialty = '{}'", target.specialty);
    let mut recovered = Vec::new();
    for (statistic, truth) in [
        ("SUM(cost)", target.cost),
        ("SUM(length_of_stay)", target.stay),
    ] {
        let sql = tracker(statistic, &base, &target.only());
        let Ok(got) = client.query(&sql).await else {
            continue;
        };
        let estimate = number(&rows(&got.batches)[0][0]).unwrap_or(f64::NAN);
        if (estimate - truth).abs() < 0.005 {
            recovered.push(format!(
                "{sql}\n    gives {estimate}, the episode's exact value {truth}"
            ));
        }
    }
    assert!(
        recovered.is_empty(),
        "a tracker recovered one episode exactly:\n  {}",
        recovered.join("\n  ")
    );
    lab.stop().await;
}

/// Class 6, through correlated columns: the floor refuses a sum of a column the release
/// filters or groups on, but `length_of_stay` is `discharge_date - admission_date`, so
/// pinning both dates pins the stay, and `SUM(length_of_stay)` over episodes pinned to a
/// stay of 1 day is their exact count. Every count derived from released statistics must be
/// a multiple of 5 (or the query refused), at the gateway and at each node. This is the same
/// residual as the tracker above: an exact sum of values the analyst can pin down reveals an
/// exact count, and no rule over the query text closes that for every correlation in the
/// data; noise on sums (differential privacy, the next issue) must make this test pass.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "residual risk inherent to exact sums without noise: a measure pinned through correlated columns gives an exact count (closed by DP, next issue)"]
async fn rounding_is_not_undone_by_a_measure_pinned_through_other_columns() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    let days: Vec<String> = lab
        .truth
        .rows(
            "SELECT CAST(admission_date AS VARCHAR), CAST(discharge_date AS VARCHAR) FROM kept_episodes \
             WHERE length_of_stay = 1 GROUP BY 1, 2 ORDER BY COUNT(*) DESC, 1 LIMIT 64",
        )
        .await
        .iter()
        .map(|r| format!("(admission_date = DATE '{}' AND discharge_date = DATE '{}')", r[0], r[1]))
        .collect();
    // A balanced OR, so that 64 day pairs fit the model's depth and size limits.
    fn balanced(items: &[String]) -> String {
        match items {
            [one] => one.clone(),
            _ => {
                let (left, right) = items.split_at(items.len() / 2);
                format!("({} OR {})", balanced(left), balanced(right))
            }
        }
    }
    let filter = balanced(&days);
    let exact = lab
        .truth
        .number(&format!(
            "SELECT COUNT(*) FROM kept_episodes WHERE {filter}"
        ))
        .await;
    let mut found = Vec::new();
    for sql in [
        format!("SELECT SUM(length_of_stay) AS n FROM episodes WHERE {filter}"),
        format!(
            "SELECT SUM(length_of_stay) / 1 AS n, COUNT(*) AS n_rows FROM episodes WHERE {filter}"
        ),
    ] {
        match client.query(&sql).await {
            Err(err) => assert!(
                !codes(&err.to_string()).is_empty(),
                "refused without a code: {err}"
            ),
            Ok(got) => {
                for v in answer_violations(&lab.truth, &got.batches) {
                    found.push(format!("gateway: {v} (ground truth: {exact} episodes)"));
                }
            }
        }
    }
    for (r, release) in lab
        .releases_of(&format!(
            "SELECT SUM(length_of_stay) AS n FROM episodes WHERE {filter}"
        ))
        .iter()
        .enumerate()
    {
        for code in TRUSTS {
            let probe = kit
                .probe(ticket(serde_json::to_value(release).unwrap()))
                .at(code);
            let Ok(batches) = call_node(&lab, &probe, &format!("pinned-{r}-{code}")).await else {
                continue;
            };
            for row in rows(&batches) {
                if let Some(sum) = number(&row[1])
                    && !multiple_of(sum, ROUND_TO)
                {
                    found.push(format!("{code} released SUM(length_of_stay) = {sum} over stays pinned to 1 day: an exact count"));
                }
            }
        }
    }
    assert!(
        found.is_empty(),
        "SQL: SELECT SUM(length_of_stay) FROM episodes WHERE <64 ORed (admission_date, discharge_date) pairs a day apart>\n  - {}",
        found.join("\n  - ")
    );
    lab.stop().await;
}

/// Asks a node for `release` with the gateway's headers; the rows and the response headers.
async fn node_rows_and_headers(
    lab: &Lab,
    kit: &Kit,
    release: &ReleaseQuery,
    code: &'static str,
    id: &str,
) -> (Vec<Vec<ScalarValue>>, String) {
    let probe = kit
        .probe(ticket(serde_json::to_value(release).unwrap()))
        .at(code);
    let mut client = node_client(lab.node_addrs[code], code).await;
    for (name, value) in &probe.headers {
        client.set_header(*name, value.clone());
    }
    client.set_header(QUERY_ID_HEADER, id);
    let Call::DoGet(bytes) = probe.call else {
        unreachable!()
    };
    let stream = client.do_get(Ticket::new(bytes)).await.unwrap();
    let headers = format!("{:?}", stream.headers()).to_lowercase();
    let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
    (rows(&batches), headers)
}

/// Response headers that would say something about suppression, sizes or timing.
fn telling_headers(headers: &str) -> Vec<&'static str> {
    ["suppress", "elapsed", "min-patients", "rows", "groups"]
        .into_iter()
        .filter(|word| headers.contains(word))
        .collect()
}

/// Class 10. Oracles: an empty answer and a suppressed group look the same (at the gateway
/// and at every node), no response header tells how many groups were hidden, expressions
/// that could fail on a row's value are refused at planning with the same text whether or
/// not rows match, the public register shows no constant an analyst typed, and a trust
/// failing on its data is not named.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oracles_say_nothing_about_the_data() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    let first = |rows: Vec<Vec<ScalarValue>>| rows[0][0].to_string();
    let rare = first(lab.truth.rows(&format!(
        "SELECT diagnosis_icd10 FROM kept_episodes GROUP BY 1 HAVING COUNT(DISTINCT person_id) BETWEEN 1 AND {} ORDER BY 1 LIMIT 1",
        THRESHOLD - 1
    )).await);
    let common = first(lab.truth.rows("SELECT diagnosis_icd10 FROM kept_episodes GROUP BY 1 ORDER BY COUNT(*) DESC LIMIT 1").await);
    let absent = "ZZZ.9";
    assert_eq!(
        lab.truth
            .number(&format!(
                "SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 = '{absent}'"
            ))
            .await,
        0.0
    );
    // 1. Suppressed and empty look the same.
    for template in [
        "SELECT COUNT(*) AS n, SUM(length_of_stay) AS s, AVG(cost) AS a, STDDEV(cost) AS d FROM episodes WHERE diagnosis_icd10 = '{}'",
        "SELECT specialty, COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 = '{}' GROUP BY 1",
        "SELECT p.sex, COUNT(*) AS n FROM episodes e JOIN patients p ON e.person_id = p.person_id WHERE e.diagnosis_icd10 LIKE '{}%' GROUP BY 1",
    ] {
        let (suppressed, empty) = (
            template.replace("{}", &rare),
            template.replace("{}", absent),
        );
        assert_eq!(
            answer(&mut client, &suppressed).await,
            answer(&mut client, &empty).await,
            "{suppressed} vs {empty}"
        );
        let pairs = lab
            .releases_of(&suppressed)
            .into_iter()
            .zip(lab.releases_of(&empty));
        for (i, (s, e)) in pairs.enumerate() {
            for code in TRUSTS {
                let (s_rows, s_headers) = node_rows_and_headers(
                    &lab,
                    &kit,
                    &s,
                    code,
                    &format!("oracle-s-{i}-{code}-{}", tag(template)),
                )
                .await;
                let (e_rows, e_headers) = node_rows_and_headers(
                    &lab,
                    &kit,
                    &e,
                    code,
                    &format!("oracle-e-{i}-{code}-{}", tag(template)),
                )
                .await;
                assert_eq!(
                    s_rows, e_rows,
                    "{code} tells a suppressed group from an empty one: {suppressed}"
                );
                assert!(
                    telling_headers(&s_headers).is_empty()
                        && telling_headers(&e_headers).is_empty(),
                    "{code} headers: {s_headers}"
                );
            }
        }
    }
    // 2. The gateway's response headers say nothing about suppression either.
    let mut raw = gateway_client(lab.local.gateway.addr, &kit.token).await;
    let sql = "SELECT diagnosis_icd10, COUNT(*) AS n FROM episodes GROUP BY 1";
    let info = raw.execute(sql.into(), None).await.unwrap();
    assert_eq!(info.total_records, -1, "GetFlightInfo announces no size");
    for endpoint in info.endpoint {
        let stream = raw.do_get(endpoint.ticket.unwrap()).await.unwrap();
        let headers = format!("{:?}", stream.headers()).to_lowercase();
        let _: Vec<RecordBatch> = stream.try_collect().await.unwrap();
        assert!(
            telling_headers(&headers).is_empty(),
            "gateway headers: {headers}"
        );
    }
    // 3. What could fail on a row is refused at planning, the same whether rows match or not.
    for template in [
        "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 = '{}' AND 1 / (cost - 903.2) > 0",
        "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 = '{}' AND regexp_like(procedure_opcs4, '[')",
        "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 = '{}' AND CAST(procedure_opcs4 AS INT) > 0",
        "SELECT SUM(cost / 0) AS s FROM episodes WHERE diagnosis_icd10 = '{}'",
        "SELECT COUNT(*) AS n FROM episodes WHERE diagnosis_icd10 = '{}' AND arrow_cast(diagnosis_icd10, 'Int64') > 0",
    ] {
        let texts: BTreeSet<String> =
            futures::future::join_all([&rare, &common, absent].map(|code| {
                let sql = template.replace("{}", code);
                let target = lab.local.gateway_target();
                let token = kit.token.clone();
                async move {
                    let mut client = AnalystClient::connect(&target, &token).await.unwrap();
                    refusal(&mut client, &sql).await
                }
            }))
            .await
            .into_iter()
            .collect();
        assert_eq!(
            texts.len(),
            1,
            "{template}: refusals differ with the data: {texts:?}"
        );
        let text = texts.first().unwrap();
        assert!(
            !codes(text).is_empty() && !text.contains("RX"),
            "{template}: {text}"
        );
    }
    // 4. The public register masks every constant, answered or refused.
    let target = TargetEpisode::find(&lab.truth, "kept_episodes").await;
    let nhs = first(
        lab.truth
            .rows("SELECT nhs_number FROM patients ORDER BY nhs_number LIMIT 1")
            .await,
    );
    answer(
        &mut client,
        &format!("SELECT COUNT(*) AS n FROM episodes WHERE {}", target.only()),
    )
    .await;
    refusal(
        &mut client,
        &format!("SELECT COUNT(*) AS n FROM patients WHERE nhs_number = '{nhs}'"),
    )
    .await;
    refusal(
        &mut client,
        &format!("SELECT COUNT(*) AS n FROM patients WHERE nhs_number = {nhs}"),
    )
    .await;
    refusal(
        &mut client,
        &format!("SELECT COUNT(*) AS n FROM patients -- {nhs}\nWHERE sex = \"{nhs}\""),
    )
    .await;
    let register = tally::register::read(std::slice::from_ref(&lab.gateway_log)).unwrap();
    for entry in &register.entries {
        for constant in [
            nhs.as_str(),
            target.admitted.as_str(),
            target.diagnosis.as_str(),
        ] {
            assert!(
                !entry.sql.contains(constant),
                "the register publishes {constant}: {}",
                entry.sql
            );
        }
    }
    lab.stop().await;
    // 5. A trust whose table cannot be read fails without being named.
    let (_copy, data) = copy_of_data();
    let broken = start_federation_over(&data, &default_policies()).await;
    let episodes = data.join("RXB").join("episodes.parquet");
    let mut bytes = std::fs::read(&episodes).unwrap();
    bytes.truncate(bytes.len() / 2);
    std::fs::write(&episodes, bytes).unwrap();
    let mut client = analyst(&broken).await;
    let err = refusal(
        &mut client,
        "SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY 1",
    )
    .await;
    let rxb = default_trusts()
        .into_iter()
        .find(|t| t.code == "RXB")
        .unwrap();
    assert!(
        leads_with(&err, "E_TRUST_FAILED"),
        "a trust's failure: {err}"
    );
    assert!(
        !err.contains(rxb.code) && !err.contains(rxb.name),
        "the failure names the trust: {err}"
    );
    broken.stop().await;
}

/// The judge itself: an answer holding an identifier, a full postcode, an unrounded count
/// or an unrounded derived count is flagged, and the ground truth suppresses small groups
/// (so that a clean report means something).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_judge_flags_what_the_rules_forbid() {
    use arrow::array::{ArrayRef, Float64Array, Int64Array, StringArray};
    use std::sync::Arc;
    let truth = Truth::new().await;
    let person = truth
        .rows("SELECT nhs_number, postcode FROM patients LIMIT 1")
        .await
        .remove(0);
    let batch = RecordBatch::try_from_iter([
        (
            "k",
            Arc::new(StringArray::from(vec![person[0].to_string(), "LS8".into()])) as ArrayRef,
        ),
        (
            "p",
            Arc::new(StringArray::from(vec![person[1].to_string(), "x".into()])) as ArrayRef,
        ),
        ("n", Arc::new(Int64Array::from(vec![10, 7])) as ArrayRef),
        (
            "whole_fifths",
            Arc::new(Float64Array::from(vec![2.0, 1.4])) as ArrayRef,
        ),
    ])
    .unwrap();
    let found = answer_violations(&truth, &[batch]);
    assert_eq!(found.len(), 4, "{found:?}");
    let by_diagnosis: ReleaseQuery = serde_json::from_value(model(
        "episodes",
        &[],
        None,
        vec![dim("episodes", "diagnosis_icd10")],
        vec![count_rows()],
    ))
    .unwrap();
    let all = truth.groups(&by_diagnosis, "RXA", 0).await;
    let kept = truth.groups(&by_diagnosis, "RXA", THRESHOLD).await;
    assert!(
        !kept.is_empty() && kept.len() < all.len(),
        "{} of {} diagnoses pass",
        kept.len(),
        all.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn zz_explore() {
    let lab = lab().await;
    let kit = Kit::new();
    let mut client = analyst(&lab.local).await;
    for sql in [
        "SELECT sex, COUNT(*) AS n FROM patients GROUP BY 1",
        "SELECT COUNT(*) AS n, SUM(cost) AS s, AVG(cost) AS a FROM episodes",
        "SELECT a.n - b.n AS n FROM (SELECT COUNT(*) AS n FROM episodes) a CROSS JOIN (SELECT COUNT(*) AS n FROM episodes WHERE cost < 741356) b",
        "SELECT diagnosis_icd10, COUNT(*) AS n FROM episodes GROUP BY 1",
        "SELECT specialty, COUNT(*) AS n, RANK() OVER (ORDER BY COUNT(*)) AS r FROM episodes GROUP BY 1",
    ] {
        let got = client.query(sql).await.unwrap();
        println!("SQL {sql}\nSCHEMA {:?}\nBATCH SCHEMA {:?}\nROWS {}", got.schema, got.batches.first().map(|b| b.schema()), row_count(&got));
        for r in rows(&got.batches).iter().take(5) { println!("  {r:?}"); }
        let rec = lab.answered_record(sql).unwrap();
        println!("REC rho {:?}", rec["rho_charged"]);
        let qid = rec["query_id"].as_str().unwrap().to_string();
        for code in TRUSTS { for n in lab.node_records(code, &qid) { println!("  NODE {code} rows {} rho {} stored {}", n["rows"], n["rho_charged"], n["stored_answer"]); } }
        for release in lab.releases_of(sql) {
            let t = request_ticket(json!({"release": release}));
            let probe = kit.probe(t).at("RXA");
            let mut c = node_client(lab.node_addrs["RXA"], "RXA").await;
            for (name, value) in &probe.headers { c.set_header(*name, value.clone()); }
            c.set_header(QUERY_ID_HEADER, "explore");
            let Call::DoGet(bytes) = probe.call else { unreachable!() };
            let stream = c.do_get(Ticket::new(bytes)).await.unwrap();
            println!("  NODE HEADERS {:?}", stream.headers());
            let batches: Vec<RecordBatch> = stream.try_collect().await.unwrap();
            println!("  NODE SCHEMA {:?}", batches.first().map(|b| b.schema()));
            for r in rows(&batches).iter().take(3) { println!("   {r:?}"); }
            let recs = lab.node_records("RXA", "explore");
            println!("  REPLAY rho {} stored {}", recs.last().unwrap()["rho_charged"], recs.last().unwrap()["stored_answer"]);
        }
    }
    for q in [
        "SELECT trust_code, COUNT(*) FROM patients GROUP BY 1 ORDER BY 1",
        "SELECT trust_code, COUNT(*) FROM kept_patients GROUP BY 1 ORDER BY 1",
        "SELECT trust_code, COUNT(*) FROM episodes GROUP BY 1 ORDER BY 1",
        "SELECT trust_code, COUNT(*) FROM kept_episodes GROUP BY 1 ORDER BY 1",
        "SELECT c, COUNT(*) FROM (SELECT nhs_number, COUNT(*) AS c FROM patients GROUP BY 1) GROUP BY 1 ORDER BY 1",
        "SELECT k, COUNT(*) FROM (SELECT person_id, COUNT(*) AS k FROM kept_episodes GROUP BY 1) GROUP BY 1 ORDER BY 1",
        "SELECT arrow_typeof(imd_decile), arrow_typeof(sex), arrow_typeof(length_of_stay), arrow_typeof(cost), arrow_typeof(age_at_admission) FROM patients p JOIN episodes e ON e.person_id = p.person_id LIMIT 1",
        "SELECT MIN(cost), MAX(cost), MIN(length_of_stay), MAX(length_of_stay), MIN(age_at_admission), MAX(age_at_admission) FROM episodes",
        "SELECT COUNT(*) FROM (SELECT specialty FROM episodes GROUP BY 1)",
    ] {
        println!("TRUTH {q}: {:?}", lab.truth.rows(q).await);
    }
    lab.stop().await;
}
