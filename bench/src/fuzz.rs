//! A fuzzer for Tally's two network surfaces: SQL through the gateway, and malformed Flight
//! requests to the gateway and to every node. SQL comes from a grammar of what analysts
//! write (shaped like the query model about half the time, so it reaches the trusts, and
//! anything else the grammar knows the rest) and from mutations of it at the token level.
//! Flight requests are every Flight RPC with random, truncated or mutated payloads: tickets,
//! descriptors, `Any` messages of each command type, release requests (the nodes' JSON
//! model) mutated, actions, uploads and exchanges.
//!
//! Every response is checked: an error must carry one of Tally's codes and no engine text;
//! nothing may take longer than the hang limit; nothing may panic (a panic hook counts
//! panics anywhere in the process, caught or not). The same code runs a few thousand
//! inputs in the test suite and as many as asked with `tally-bench fuzz`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{Any, ProstMessageExt};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, HandshakeRequest, Ticket,
};
use futures::StreamExt;
use prost::Message;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tally::client::AnalystClient;
use tally::federation::LocalFederation;
use tally_common::TallyError;
use tally_common::flight::{ANALYST_TOKEN_HEADER, PROJECT_HEADER, PURPOSE_HEADER};
use tally_common::model::RELEASE_TYPE_URL;
use tokio::sync::Mutex;
use tonic::transport::Channel;

/// How much to fuzz.
#[derive(Debug, Clone)]
pub struct Options {
    /// SQL statements sent through the gateway.
    pub statements: usize,
    /// Malformed Flight requests, spread over the gateway and the nodes.
    pub flight_requests: usize,
    /// The random seed (the same seed sends the same inputs).
    pub seed: u64,
    /// A response slower than this is a hang.
    pub hang_after: Duration,
    /// Clients sending at once.
    pub clients: usize,
}

/// What one input found.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    /// `hang`, `untyped` (an error without our code), `engine_text` or `transport`.
    pub kind: &'static str,
    /// `sql`, `gateway` or `node`.
    pub surface: &'static str,
    /// The input, shortened.
    pub input: String,
    /// The response, shortened.
    pub response: String,
}

/// The run's figures.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    /// SQL statements sent.
    pub statements: usize,
    /// Statements answered.
    pub answered: usize,
    /// Flight requests sent.
    pub flight_requests: usize,
    /// Errors by code, over both surfaces.
    pub by_code: BTreeMap<String, usize>,
    /// The first input refused with each code, and its message.
    pub example_by_code: BTreeMap<String, (String, String)>,
    /// Panics counted by the hook while the run lasted.
    pub panics: usize,
    /// Slowest response, milliseconds.
    pub slowest_ms: f64,
    /// Wall time, seconds.
    pub elapsed_s: f64,
    /// Everything that broke a rule (the first 50 of each kind are kept).
    pub findings: Vec<Finding>,
    /// Findings by kind, all of them.
    pub findings_by_kind: BTreeMap<String, usize>,
}

impl Report {
    /// Whether nothing broke a rule.
    pub fn clean(&self) -> bool {
        self.findings_by_kind.is_empty() && self.panics == 0
    }

    /// A short text summary.
    pub fn summary(&self) -> String {
        let mut text = format!(
            "{} statements ({} answered), {} Flight requests in {:.1} s; slowest {:.0} ms; panics {}; findings {:?}\nerrors by code: {:?}\n",
            self.statements,
            self.answered,
            self.flight_requests,
            self.elapsed_s,
            self.slowest_ms,
            self.panics,
            self.findings_by_kind,
            self.by_code
        );
        for (code, (input, message)) in &self.example_by_code {
            text.push_str(&format!("  e.g. {code}: {input} -> {message}\n"));
        }
        for finding in self.findings.iter().take(20) {
            text.push_str(&format!(
                "  {} on {}: {} -> {}\n",
                finding.kind, finding.surface, finding.input, finding.response
            ));
        }
        text
    }

    fn record(&mut self, surface: &'static str, input: &str, outcome: Outcome, took: Duration) {
        self.slowest_ms = self.slowest_ms.max(took.as_secs_f64() * 1e3);
        let finding = match outcome {
            Outcome::Answered => {
                if surface == "sql" {
                    self.answered += 1;
                }
                None
            }
            Outcome::Refused(code, message) => {
                *self.by_code.entry(code.clone()).or_default() += 1;
                self.example_by_code
                    .entry(code)
                    .or_insert_with(|| (shorten(input), shorten(&message)));
                None
            }
            Outcome::Broken(kind, response) => Some((kind, response)),
        };
        if let Some((kind, response)) = finding {
            let count = self.findings_by_kind.entry(kind.to_string()).or_default();
            *count += 1;
            if *count <= 50 {
                self.findings.push(Finding {
                    kind,
                    surface,
                    input: shorten(input),
                    response: shorten(&response),
                });
            }
        }
    }
}

fn shorten(text: &str) -> String {
    let mut short: String = text.chars().take(300).collect();
    if short.len() < text.len() {
        short.push('…');
    }
    short
}

/// How one request ended.
enum Outcome {
    Answered,
    Refused(String, String),
    Broken(&'static str, String),
}

/// Words of engine and library errors that must never reach a client.
const ENGINE_WORDS: &[&str] = &[
    "DataFusion",
    "datafusion",
    "Arrow error",
    "ArrowError",
    "Parquet",
    "parquet",
    "Execution error",
    "Internal error",
    "Schema error",
    "sqlparser",
    "panicked",
    "tonic",
    "h2 protocol",
    "transport error",
    "Protobuf",
    "protobuf",
    "serde",
    "/home/",
    "/tmp/",
    ".rs:",
];

/// Judges an error status: our code and no engine text, or a finding.
fn judge(status: &tonic::Status) -> Outcome {
    let message = status.message();
    if let Some(word) = ENGINE_WORDS.iter().find(|w| message.contains(*w)) {
        return Outcome::Broken(
            "engine_text",
            format!("{:?} ({word}): {message}", status.code()),
        );
    }
    match TallyError::from_status(status) {
        Some(error) => Outcome::Refused(error.code.to_string(), error.message),
        None => Outcome::Broken("untyped", format!("{:?}: {message}", status.code())),
    }
}

static PANICS: AtomicUsize = AtomicUsize::new(0);

/// Counts every panic in the process from now on (then runs the previous hook).
fn count_panics() {
    static INSTALLED: std::sync::Once = std::sync::Once::new();
    INSTALLED.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            PANICS.fetch_add(1, Ordering::SeqCst);
            previous(info);
        }));
    });
}

/// Fuzzes `federation`, started in plaintext on loopback (its gateway, and its nodes at
/// their listen addresses), with `options`; `token` signs the analyst in.
pub async fn run(
    federation: &LocalFederation,
    token: &str,
    options: &Options,
) -> Result<Report, String> {
    count_panics();
    let panics_before = PANICS.load(Ordering::SeqCst);
    let started = Instant::now();
    let report = Arc::new(Mutex::new(Report::default()));
    let target = federation.gateway_target();
    let gateway = Channel::from_shared(format!("http://{}", federation.gateway.addr))
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("the gateway: {e}"))?;
    let mut nodes = Vec::new();
    for node in &federation.nodes {
        if let Some(addr) = node.listen_addr {
            let channel = Channel::from_shared(format!("http://{addr}"))
                .map_err(|e| e.to_string())?
                .connect()
                .await
                .map_err(|e| format!("a node: {e}"))?;
            nodes.push(channel);
        }
    }
    let clients = options.clients.max(1);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let share = |total: usize| total / clients + usize::from(client < total % clients);
        let (statements, requests) = (share(options.statements), share(options.flight_requests));
        let seed = options.seed.wrapping_add(client as u64 * 7919);
        let (report, target, token) = (report.clone(), target.clone(), token.to_string());
        let (gateway, nodes, hang) = (gateway.clone(), nodes.clone(), options.hang_after);
        tasks.push(tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(seed);
            let mut analyst = AnalystClient::connect(&target, &token)
                .await
                .map_err(|e| e.to_string())?;
            let mut corpus: Vec<String> = SEEDS.iter().map(|s| s.to_string()).collect();
            for _ in 0..statements {
                let sql = statement(&mut rng, &mut corpus);
                let began = Instant::now();
                let outcome = match tokio::time::timeout(hang, analyst.query(&sql)).await {
                    Err(_) => Outcome::Broken("hang", format!("no answer in {hang:?}")),
                    Ok(Ok(_)) => {
                        if corpus.len() < 2_000 {
                            corpus.push(sql.clone());
                        }
                        Outcome::Answered
                    }
                    Ok(Err(tally::client::ClientError::Refused(message))) => {
                        judge(&tonic::Status::unknown(message))
                    }
                    Ok(Err(other)) => Outcome::Broken("transport", other.to_string()),
                };
                let mut report = report.lock().await;
                report.statements += 1;
                report.record("sql", &sql, outcome, began.elapsed());
            }
            for _ in 0..requests {
                let to_node = !nodes.is_empty() && rng.random_bool(0.5);
                let channel = match to_node {
                    true => nodes
                        .choose(&mut rng)
                        .cloned()
                        .unwrap_or_else(|| gateway.clone()),
                    false => gateway.clone(),
                };
                let request = FlightRequest::random(&mut rng, to_node, &token);
                let described = request.describe();
                let began = Instant::now();
                let outcome = match tokio::time::timeout(hang, request.send(channel)).await {
                    Err(_) => Outcome::Broken("hang", format!("no answer in {hang:?}")),
                    Ok(outcome) => outcome,
                };
                let mut report = report.lock().await;
                report.flight_requests += 1;
                let surface = if to_node { "node" } else { "gateway" };
                report.record(surface, &described, outcome, began.elapsed());
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        task.await
            .map_err(|e| format!("a fuzzing client stopped: {e}"))??;
    }
    let mut report = std::mem::take(&mut *report.lock().await);
    report.panics = PANICS.load(Ordering::SeqCst) - panics_before;
    report.elapsed_s = started.elapsed().as_secs_f64();
    Ok(report)
}

/// Queries the grammar and the mutations start from (shaped like real analysts' queries).
const SEEDS: &[&str] = &[
    "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
    "SELECT age_band(age_at_admission) AS band, month(admission_date) AS m, COUNT(*), AVG(length_of_stay) FROM episodes WHERE admission_method IN ('21', '22') GROUP BY 1, 2",
    "SELECT p.sex, p.imd_decile, SUM(e.cost), STDDEV(e.cost) FROM episodes e JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex, p.imd_decile",
    "SELECT ethnicity, postcode_district(postcode) AS district, COUNT(*) FROM patients GROUP BY 1, 2 HAVING COUNT(*) > 10 ORDER BY 3 DESC LIMIT 5",
    "SELECT trust_code, year(admission_date) AS y, COUNT(*) * 2 AS twice FROM episodes WHERE cost BETWEEN 100 AND 5000 AND specialty LIKE '1%' GROUP BY trust_code, year(admission_date)",
    "WITH t AS (SELECT specialty, COUNT(*) AS n FROM episodes GROUP BY specialty) SELECT MAX(n), MIN(n), SUM(n) FROM t",
    "SELECT c.chapter, COUNT(*) FROM episodes e JOIN icd10_chapters c ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to GROUP BY c.chapter",
];

const TABLES: &[(&str, &str, &[&str])] = &[
    (
        "episodes",
        "e",
        &[
            "episode_id",
            "person_id",
            "admission_date",
            "discharge_date",
            "admission_method",
            "specialty",
            "diagnosis_icd10",
            "procedure_opcs4",
            "age_at_admission",
            "length_of_stay",
            "cost",
            "trust_code",
        ],
    ),
    (
        "patients",
        "p",
        &[
            "person_id",
            "nhs_number",
            "sex",
            "year_of_birth",
            "ethnicity",
            "postcode",
            "imd_decile",
            "trust_code",
        ],
    ),
    (
        "icd10_chapters",
        "c",
        &["chapter", "code_from", "code_to", "title", "trust_code"],
    ),
    ("nowhere", "n", &["x", "y"]),
];

const AGGREGATES: &[&str] = &[
    "COUNT",
    "SUM",
    "AVG",
    "MIN",
    "MAX",
    "STDDEV",
    "VARIANCE",
    "VAR_POP",
    "STDDEV_POP",
    "MEDIAN",
    "APPROX_DISTINCT",
    "ARRAY_AGG",
    "BIT_AND",
    "FIRST_VALUE",
    "CORR",
];

const FUNCTIONS: &[&str] = &[
    "age_band",
    "month",
    "year",
    "postcode_district",
    "abs",
    "round",
    "upper",
    "lower",
    "length",
    "substr",
    "coalesce",
    "date_trunc",
    "power",
    "sqrt",
    "ln",
    "random",
    "now",
    "concat",
    "md5",
    "sha256",
    "to_timestamp",
    "make_array",
    "regexp_replace",
    "nullif",
    "greatest",
    "array_length",
    "unnest",
    "generate_series",
    "arrow_typeof",
    "version",
];

const WORDS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "HAVING",
    "ORDER",
    "LIMIT",
    "OFFSET",
    "JOIN",
    "ON",
    "UNION",
    "ALL",
    "DISTINCT",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "BETWEEN",
    "LIKE",
    "IS",
    "NULL",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "CAST",
    "WITH",
    "OVER",
    "PARTITION",
    "EXISTS",
    "(",
    ")",
    ",",
    "*",
    "+",
    "-",
    "/",
    "%",
    "||",
    "=",
    "<>",
    "<",
    ">=",
    ";",
    "'",
    "\"",
    "$1",
    "?",
    ":x",
    "::",
    "[",
    "]",
    "{",
    "}",
    "@",
    "\\",
    "--",
    "/*",
    "*/",
    "\u{0}",
    "é",
    "😀",
    "\u{202e}",
    "9223372036854775808",
    "-9223372036854775808",
    "1e309",
    "NaN",
    "INTERVAL '1' DAY",
    "DATE '2024-02-30'",
    "TIMESTAMP '1970-01-01 00:00:00'",
];

const STATEMENTS: &[&str] = &[
    "INSERT INTO patients VALUES (1)",
    "UPDATE episodes SET cost = 0",
    "DELETE FROM patients",
    "CREATE TABLE t AS SELECT * FROM patients",
    "DROP TABLE patients",
    "COPY patients TO '/tmp/x.csv'",
    "SET datafusion.execution.batch_size = 1",
    "EXPLAIN SELECT COUNT(*) FROM patients",
    "SHOW TABLES",
    "VALUES (1), (2)",
    "SELECT * FROM information_schema.tables",
    "SELECT * FROM '/etc/passwd'",
    "PREPARE q AS SELECT $1",
    "SELECT $1, COUNT(*) FROM patients",
    "",
    ";",
    "   ",
];

/// One statement: from the grammar, mutated from the corpus, or built to hit a limit.
fn statement(rng: &mut StdRng, corpus: &mut [String]) -> String {
    match rng.random_range(0..10) {
        0..=3 => shaped(rng),
        4..=5 => Grammar { rng, depth: 0 }.query(),
        6..=8 => {
            let base = corpus.choose(rng).cloned().unwrap_or_default();
            mutate(rng, &base)
        }
        _ => extreme(rng),
    }
}

/// Dimensions of the episodes, of the patients, and the tests analysts filter them with.
const EPISODE_DIMENSIONS: &[&str] = &[
    "specialty",
    "admission_method",
    "trust_code",
    "age_band(age_at_admission)",
    "month(admission_date)",
    "year(admission_date)",
    "year(discharge_date)",
    "diagnosis_icd10",
];
const PATIENT_DIMENSIONS: &[&str] = &[
    "sex",
    "ethnicity",
    "imd_decile",
    "postcode_district(postcode)",
    "patients.trust_code",
];
const EPISODE_TESTS: &[&str] = &[
    "specialty IN ('100', '110', '300')",
    "admission_method = '21'",
    "admission_date >= DATE '2022-01-01'",
    "cost > 100",
    "length_of_stay BETWEEN 1 AND 5",
    "age_at_admission >= 65",
    "diagnosis_icd10 LIKE 'I2%'",
    "NOT (specialty = '100')",
    "month(admission_date) = DATE '2023-01-01'",
    "discharge_date IS NOT NULL",
];
const PATIENT_TESTS: &[&str] = &[
    "sex = 'F'",
    "imd_decile <= 3",
    "ethnicity IN ('A', 'B')",
    "imd_decile <> 5",
];
const EPISODE_AGGREGATES: &[&str] = &[
    "COUNT(*)",
    "SUM(cost)",
    "AVG(length_of_stay)",
    "STDDEV(cost)",
    "VARIANCE(length_of_stay)",
    "COUNT(cost)",
    "AVG(cost)",
];

/// A query shaped like the model (its tables' own dimensions, allowed aggregates, filters on
/// filterable columns, sometimes the declared join and arithmetic or HAVING over the
/// result), with now and then a part from anywhere in the grammar.
fn shaped(rng: &mut StdRng) -> String {
    let (from, dimensions, tests, aggregates): (&str, Vec<&str>, Vec<&str>, &[&str]) =
        match rng.random_range(0..3) {
            0 => (
                "patients",
                PATIENT_DIMENSIONS.to_vec(),
                PATIENT_TESTS.to_vec(),
                &["COUNT(*)"],
            ),
            1 => (
                "episodes",
                EPISODE_DIMENSIONS.to_vec(),
                EPISODE_TESTS.to_vec(),
                EPISODE_AGGREGATES,
            ),
            _ => (
                "episodes JOIN patients ON episodes.person_id = patients.person_id",
                [EPISODE_DIMENSIONS, PATIENT_DIMENSIONS].concat(),
                [EPISODE_TESTS, PATIENT_TESTS].concat(),
                EPISODE_AGGREGATES,
            ),
        };
    let dims: Vec<&str> = (0..rng.random_range(0..3))
        .filter_map(|_| dimensions.choose(rng).copied())
        .collect();
    let mut items: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
    for _ in 0..rng.random_range(1..4) {
        let mut item = match rng.random_bool(0.1) {
            true => format!(
                "{}(cost)",
                AGGREGATES.choose(rng).copied().unwrap_or("COUNT")
            ),
            false => aggregates
                .choose(rng)
                .copied()
                .unwrap_or("COUNT(*)")
                .to_string(),
        };
        if rng.random_bool(0.15) {
            let op = ["*", "+", "-", "/"].choose(rng).copied().unwrap_or("+");
            item = format!("{item} {op} {}", literal(rng));
        }
        items.push(item);
    }
    let mut sql = format!("SELECT {} FROM {from}", items.join(", "));
    if rng.random_bool(0.6) {
        let chosen: Vec<&str> = (0..rng.random_range(1..3))
            .filter_map(|_| tests.choose(rng).copied())
            .collect();
        let mut filter = chosen.join(if rng.random_bool(0.7) {
            " AND "
        } else {
            " OR "
        });
        if rng.random_bool(0.1) {
            filter = Grammar { rng, depth: 2 }.predicate();
        }
        sql.push_str(&format!(" WHERE {filter}"));
    }
    if !dims.is_empty() {
        sql.push_str(&format!(" GROUP BY {}", dims.join(", ")));
    }
    if rng.random_bool(0.15) {
        sql.push_str(&format!(" HAVING COUNT(*) > {}", literal(rng)));
    }
    if rng.random_bool(0.3) {
        sql.push_str(" ORDER BY 1");
    }
    if rng.random_bool(0.15) {
        sql.push_str(&format!(" LIMIT {}", literal(rng)));
    }
    sql
}

/// A constant, often one at the edge of its type.
fn literal(rng: &mut StdRng) -> String {
    let choices: &[&str] = &[
        "0",
        "1",
        "-1",
        "3",
        "42",
        "9223372036854775807",
        "-9223372036854775808",
        "18446744073709551616",
        "1e308",
        "-0.0",
        "1e-320",
        "0.5",
        "'NaN'",
        "''",
        "'x'",
        "'it''s'",
        "'é😀'",
        "DATE '2024-02-29'",
        "DATE '0001-01-01'",
        "DATE '9999-12-31'",
        "NULL",
        "TRUE",
        "FALSE",
        "'21'",
        "'LS6'",
        "INTERVAL '1 day'",
        "$1",
        "?",
        "CAST(NULL AS INT)",
        "CAST('1' AS BIGINT)",
        "X'00FF'",
        "ARRAY[1, 2]",
    ];
    match rng.random_range(0..8) {
        0 => rng.random::<i64>().to_string(),
        1 => format!(
            "{:e}",
            rng.random::<f64>() * 10f64.powi(rng.random_range(-300..300))
        ),
        2 => format!("'{}'", "a".repeat(rng.random_range(0..3000))),
        _ => choices.choose(rng).copied().unwrap_or("0").to_string(),
    }
}

/// Random SQL from a small grammar, nesting up to a few levels.
struct Grammar<'a> {
    rng: &'a mut StdRng,
    depth: usize,
}

impl Grammar<'_> {
    fn table(&mut self) -> (&'static str, &'static str, &'static [&'static str]) {
        *TABLES.choose(self.rng).unwrap_or(&TABLES[0])
    }

    fn column(&mut self, table: &(&'static str, &'static str, &'static [&'static str])) -> String {
        let column = table.2.choose(self.rng).copied().unwrap_or("x");
        match self.rng.random_range(0..3) {
            0 => format!("{}.{column}", table.1),
            _ => column.to_string(),
        }
    }

    fn query(&mut self) -> String {
        if self.rng.random_bool(0.05) {
            return STATEMENTS
                .choose(self.rng)
                .copied()
                .unwrap_or("")
                .to_string();
        }
        self.depth += 1;
        let table = self.table();
        let other = self.table();
        let mut sql = String::new();
        if self.depth < 3 && self.rng.random_bool(0.1) {
            sql.push_str(&format!("WITH w AS ({}) ", self.query()));
        }
        let distinct = if self.rng.random_bool(0.1) {
            "DISTINCT "
        } else {
            ""
        };
        let items: Vec<String> = (0..self.rng.random_range(1..5))
            .map(|_| self.expression(&table))
            .collect();
        sql.push_str(&format!(
            "SELECT {distinct}{} FROM {} {}",
            items.join(", "),
            table.0,
            table.1
        ));
        match self.rng.random_range(0..6) {
            0 => sql.push_str(&format!(
                " JOIN {} {} ON {} = {}",
                other.0,
                other.1,
                self.column(&table),
                self.column(&other)
            )),
            1 if self.depth < 3 => sql.push_str(&format!(", ({}) sub", self.query())),
            _ => {}
        }
        if self.rng.random_bool(0.5) {
            sql.push_str(&format!(" WHERE {}", self.predicate_over(&table)));
        }
        if self.rng.random_bool(0.5) {
            sql.push_str(&format!(" GROUP BY {}", self.column(&table)));
        }
        if self.rng.random_bool(0.2) {
            sql.push_str(&format!(" HAVING {}", self.predicate_over(&table)));
        }
        if self.rng.random_bool(0.2) {
            sql.push_str(&format!(" ORDER BY {}", self.expression(&table)));
        }
        if self.rng.random_bool(0.1) {
            sql.push_str(&format!(
                " LIMIT {} OFFSET {}",
                literal(self.rng),
                literal(self.rng)
            ));
        }
        if self.depth < 3 && self.rng.random_bool(0.08) {
            sql.push_str(&format!(" UNION ALL {}", self.query()));
        }
        self.depth -= 1;
        sql
    }

    fn expression(
        &mut self,
        table: &(&'static str, &'static str, &'static [&'static str]),
    ) -> String {
        self.depth += 1;
        let deep = self.depth > 4;
        let expr = match self.rng.random_range(0..12) {
            _ if deep => self.column(table),
            0 | 1 => self.column(table),
            2 => literal(self.rng),
            3 | 4 => {
                let function = AGGREGATES.choose(self.rng).copied().unwrap_or("COUNT");
                let distinct = if self.rng.random_bool(0.1) {
                    "DISTINCT "
                } else {
                    ""
                };
                let argument = if self.rng.random_bool(0.3) {
                    "*".to_string()
                } else {
                    self.expression(table)
                };
                format!("{function}({distinct}{argument})")
            }
            5 => {
                let function = FUNCTIONS.choose(self.rng).copied().unwrap_or("abs");
                format!("{function}({})", self.expression(table))
            }
            6 => {
                let op = ["+", "-", "*", "/", "%", "||", "=", "<", "AND", "OR"]
                    .choose(self.rng)
                    .copied()
                    .unwrap_or("+");
                format!(
                    "({} {op} {})",
                    self.expression(table),
                    self.expression(table)
                )
            }
            7 => format!(
                "CASE WHEN {} THEN {} ELSE {} END",
                self.predicate_over(table),
                self.expression(table),
                self.expression(table)
            ),
            8 => {
                let to = [
                    "INT",
                    "BIGINT",
                    "DOUBLE",
                    "VARCHAR",
                    "DATE",
                    "DECIMAL(38, 10)",
                    "BOOLEAN",
                    "TIMESTAMP",
                ]
                .choose(self.rng)
                .copied()
                .unwrap_or("INT");
                format!("CAST({} AS {to})", self.expression(table))
            }
            9 => format!("(SELECT {} FROM {})", self.expression(table), table.0),
            10 => format!(
                "{}({}) OVER (PARTITION BY {} ORDER BY {})",
                AGGREGATES.choose(self.rng).copied().unwrap_or("SUM"),
                self.column(table),
                self.column(table),
                self.column(table)
            ),
            _ => format!("-{}", self.expression(table)),
        };
        self.depth -= 1;
        expr
    }

    fn predicate(&mut self) -> String {
        let table = TABLES[self.rng.random_range(0..2)];
        self.predicate_over(&table)
    }

    fn predicate_over(
        &mut self,
        table: &(&'static str, &'static str, &'static [&'static str]),
    ) -> String {
        self.depth += 1;
        let deep = self.depth > 5;
        let column = self.column(table);
        let predicate = match self.rng.random_range(0..10) {
            0 | 1 => format!(
                "{column} {} {}",
                ["=", "<>", "<", "<=", ">", ">="]
                    .choose(self.rng)
                    .copied()
                    .unwrap_or("="),
                literal(self.rng)
            ),
            2 => {
                let values: Vec<String> = (0..self.rng.random_range(0..20))
                    .map(|_| literal(self.rng))
                    .collect();
                format!("{column} IN ({})", values.join(", "))
            }
            3 => format!(
                "{column} BETWEEN {} AND {}",
                literal(self.rng),
                literal(self.rng)
            ),
            4 => format!("{column} IS NOT NULL"),
            5 => format!(
                "{column} LIKE '{}%'",
                ["1", "L", "%", "_", "\\"]
                    .choose(self.rng)
                    .copied()
                    .unwrap_or("1")
            ),
            6 if !deep => format!(
                "({} AND {})",
                self.predicate_over(table),
                self.predicate_over(table)
            ),
            7 if !deep => format!(
                "({} OR {})",
                self.predicate_over(table),
                self.predicate_over(table)
            ),
            8 if !deep => format!("NOT {}", self.predicate_over(table)),
            9 if !deep => format!("{column} IN (SELECT {column} FROM {})", table.0),
            _ => format!("{column} = {column}"),
        };
        self.depth -= 1;
        predicate
    }
}

/// `base` changed at a few places, token by token.
fn mutate(rng: &mut StdRng, base: &str) -> String {
    let mut tokens: Vec<String> = tokens(base);
    for _ in 0..rng.random_range(1..5) {
        if tokens.is_empty() {
            tokens.push(WORDS.choose(rng).copied().unwrap_or("x").to_string());
        }
        let at = rng.random_range(0..tokens.len());
        match rng.random_range(0..9) {
            0 => {
                tokens.remove(at);
            }
            1 => {
                let token = tokens[at].clone();
                tokens.insert(at, token);
            }
            2 => {
                let other = rng.random_range(0..tokens.len());
                tokens.swap(at, other);
            }
            3 | 4 => tokens.insert(at, WORDS.choose(rng).copied().unwrap_or("x").to_string()),
            5 => tokens[at] = literal(rng),
            6 => {
                let end = rng.random_range(at..tokens.len());
                let span = tokens[at..=end].join(" ");
                let times = rng.random_range(2..50);
                tokens.splice(at..=end, std::iter::once(vec![span; times].join(" ")));
            }
            7 => {
                let end = rng.random_range(at..tokens.len());
                tokens.insert(end + 1, ")".into());
                tokens.insert(at, "(".into());
            }
            _ => tokens.truncate(at),
        }
    }
    tokens.join(" ")
}

/// SQL split into words, quoted strings and single symbols.
fn tokens(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    let mut quoted = false;
    for c in sql.chars() {
        match (quoted, c) {
            (true, '\'') => {
                current.push(c);
                out.push(std::mem::take(&mut current));
                quoted = false;
            }
            (true, _) => current.push(c),
            (false, '\'') => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                current.push(c);
                quoted = true;
            }
            (false, c) if c.is_alphanumeric() || c == '_' || c == '.' => current.push(c),
            (false, c) => {
                if !current.is_empty() {
                    out.push(std::mem::take(&mut current));
                }
                if !c.is_whitespace() {
                    out.push(c.to_string());
                }
            }
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// Statements built to hit the gateway's limits: deep nesting, long lists, huge text.
fn extreme(rng: &mut StdRng) -> String {
    let n = rng.random_range(10..3000);
    match rng.random_range(0..8) {
        0 => format!(
            "SELECT COUNT(*) FROM patients WHERE {}imd_decile > 1{}",
            "(".repeat(n),
            ")".repeat(n)
        ),
        1 => format!(
            "SELECT {}COUNT(*){} FROM patients",
            "(".repeat(n),
            ")".repeat(n)
        ),
        2 => format!("SELECT COUNT(*) {} FROM patients", "+ 1 ".repeat(n)),
        3 => {
            let mut sql = "SELECT COUNT(*) AS n FROM episodes".to_string();
            for i in 0..rng.random_range(2..200) {
                sql = format!("SELECT n FROM ({sql}) t{i}");
            }
            sql
        }
        4 => format!(
            "SELECT COUNT(*) FROM episodes WHERE specialty IN ({})",
            (0..n * 4)
                .map(|i| format!("'{i}'"))
                .collect::<Vec<_>>()
                .join(",")
        ),
        5 => format!(
            "SELECT COUNT(*) FROM patients WHERE {}sex = 'F'",
            "NOT ".repeat(n)
        ),
        6 => format!("SELECT '{}' , COUNT(*) FROM patients", "x".repeat(n * 500)),
        _ => format!(
            "SELECT COUNT(*) FROM patients WHERE {}",
            (0..n)
                .map(|i| format!("imd_decile <> {i}"))
                .collect::<Vec<_>>()
                .join(" OR ")
        ),
    }
}

/// One Flight request with a malformed part.
enum FlightRequest {
    DoGet(Ticket, Headers),
    GetFlightInfo(FlightDescriptor, Headers),
    GetSchema(FlightDescriptor, Headers),
    PollFlightInfo(FlightDescriptor, Headers),
    DoAction(Action, Headers),
    DoPut(Vec<FlightData>, Headers),
    DoExchange(Vec<FlightData>, Headers),
    Handshake(Vec<HandshakeRequest>, Headers),
    ListFlights(Criteria, Headers),
    ListActions(Headers),
}

/// Request headers: a token or not, and sometimes junk.
type Headers = Vec<(&'static str, String)>;

/// The type URLs of Flight SQL's commands and of Tally's release request.
const TYPE_URLS: &[&str] = &[
    RELEASE_TYPE_URL,
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandPreparedStatementQuery",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetTables",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetDbSchemas",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetSqlInfo",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetCatalogs",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandGetXdbcTypeInfo",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementUpdate",
    "type.googleapis.com/arrow.flight.protocol.sql.CommandStatementIngest",
    "type.googleapis.com/arrow.flight.protocol.sql.ActionCreatePreparedStatementRequest",
    "type.googleapis.com/nope",
    "",
];

/// A release request a gateway could send, to mutate.
const RELEASE: &str = r#"{"release":{"version":1,"fact":"episodes","joins":["patients"],"filter":{"op":"and","all":[{"op":"compare","on":{"column":{"table":"episodes","column":"cost"}},"cmp":"gt","value":{"type":"int","value":100}},{"op":"in_list","on":{"column":{"table":"episodes","column":"specialty"}},"values":[{"type":"text","value":"100"}],"negated":false}]},"group_by":[{"column":{"table":"patients","column":"sex"}},{"column":{"table":"episodes","column":"age_at_admission"},"generaliser":"age_band"}],"aggregates":[{"function":"count_rows"},{"function":"sum","column":{"table":"episodes","column":"cost"}}]}}"#;

impl FlightRequest {
    fn random(rng: &mut StdRng, to_node: bool, token: &str) -> Self {
        let mut headers: Headers = Vec::new();
        match (to_node, rng.random_range(0..6)) {
            (_, 0) => {}
            (_, 1) => headers.push(("authorization", format!("Bearer {}", junk_text(rng)))),
            (true, _) => {
                headers.push((ANALYST_TOKEN_HEADER, token.to_string()));
                if rng.random_bool(0.3) {
                    headers.push((PROJECT_HEADER, junk_text(rng)));
                }
            }
            (false, _) => {
                headers.push(("authorization", format!("Bearer {token}")));
                if rng.random_bool(0.2) {
                    headers.push((PURPOSE_HEADER, junk_text(rng)));
                }
            }
        }
        match rng.random_range(0..12) {
            0..=3 => FlightRequest::DoGet(Ticket::new(payload(rng)), headers),
            4 | 5 => FlightRequest::GetFlightInfo(descriptor(rng), headers),
            6 => FlightRequest::GetSchema(descriptor(rng), headers),
            7 => FlightRequest::PollFlightInfo(descriptor(rng), headers),
            8 => FlightRequest::DoAction(
                Action::new(
                    [
                        "CreatePreparedStatement",
                        "ClosePreparedStatement",
                        "tally.budget",
                        "BeginTransaction",
                        "CancelQuery",
                        "",
                    ]
                    .choose(rng)
                    .copied()
                    .unwrap_or(""),
                    payload(rng),
                ),
                headers,
            ),
            9 => FlightRequest::DoPut(flight_data(rng), headers),
            10 => FlightRequest::DoExchange(flight_data(rng), headers),
            _ => match rng.random_range(0..3) {
                0 => FlightRequest::Handshake(
                    vec![HandshakeRequest {
                        protocol_version: rng.random(),
                        payload: bytes(rng).into(),
                    }],
                    headers,
                ),
                1 => FlightRequest::ListFlights(
                    Criteria {
                        expression: bytes(rng).into(),
                    },
                    headers,
                ),
                _ => FlightRequest::ListActions(headers),
            },
        }
    }

    fn describe(&self) -> String {
        match self {
            FlightRequest::DoGet(ticket, _) => format!(
                "DoGet {:?}",
                shorten(&String::from_utf8_lossy(&ticket.ticket))
            ),
            FlightRequest::GetFlightInfo(d, _) => format!(
                "GetFlightInfo {:?}",
                shorten(&String::from_utf8_lossy(&d.cmd))
            ),
            FlightRequest::GetSchema(d, _) => {
                format!("GetSchema {:?}", shorten(&String::from_utf8_lossy(&d.cmd)))
            }
            FlightRequest::PollFlightInfo(d, _) => format!(
                "PollFlightInfo {:?}",
                shorten(&String::from_utf8_lossy(&d.cmd))
            ),
            FlightRequest::DoAction(a, _) => format!(
                "DoAction {} {:?}",
                a.r#type,
                shorten(&String::from_utf8_lossy(&a.body))
            ),
            FlightRequest::DoPut(d, _) => format!("DoPut {} messages", d.len()),
            FlightRequest::DoExchange(d, _) => format!("DoExchange {} messages", d.len()),
            FlightRequest::Handshake(..) => "Handshake".into(),
            FlightRequest::ListFlights(..) => "ListFlights".into(),
            FlightRequest::ListActions(..) => "ListActions".into(),
        }
    }

    /// Sends the request and judges the answer, reading every streamed message.
    async fn send(self, channel: Channel) -> Outcome {
        let mut client = FlightServiceClient::new(channel);
        fn with<T>(message: T, headers: &Headers) -> tonic::Request<T> {
            let mut request = tonic::Request::new(message);
            for (name, value) in headers {
                if let Ok(value) = value.parse() {
                    request.metadata_mut().insert(*name, value);
                }
            }
            request
        }
        let result = match self {
            FlightRequest::DoGet(ticket, h) => match client.do_get(with(ticket, &h)).await {
                Ok(response) => drain(response.into_inner()).await,
                Err(status) => Err(status),
            },
            FlightRequest::GetFlightInfo(d, h) => {
                client.get_flight_info(with(d, &h)).await.map(drop)
            }
            FlightRequest::GetSchema(d, h) => client.get_schema(with(d, &h)).await.map(drop),
            FlightRequest::PollFlightInfo(d, h) => {
                client.poll_flight_info(with(d, &h)).await.map(drop)
            }
            FlightRequest::DoAction(a, h) => match client.do_action(with(a, &h)).await {
                Ok(response) => drain(response.into_inner()).await,
                Err(status) => Err(status),
            },
            FlightRequest::DoPut(data, h) => {
                match client.do_put(with(futures::stream::iter(data), &h)).await {
                    Ok(response) => drain(response.into_inner()).await,
                    Err(status) => Err(status),
                }
            }
            FlightRequest::DoExchange(data, h) => {
                match client
                    .do_exchange(with(futures::stream::iter(data), &h))
                    .await
                {
                    Ok(response) => drain(response.into_inner()).await,
                    Err(status) => Err(status),
                }
            }
            FlightRequest::Handshake(messages, h) => {
                match client
                    .handshake(with(futures::stream::iter(messages), &h))
                    .await
                {
                    Ok(response) => drain(response.into_inner()).await,
                    Err(status) => Err(status),
                }
            }
            FlightRequest::ListFlights(criteria, h) => {
                match client.list_flights(with(criteria, &h)).await {
                    Ok(response) => drain(response.into_inner()).await,
                    Err(status) => Err(status),
                }
            }
            FlightRequest::ListActions(h) => match client.list_actions(with(Empty {}, &h)).await {
                Ok(response) => drain(response.into_inner()).await,
                Err(status) => Err(status),
            },
        };
        match result {
            Ok(()) => Outcome::Answered,
            Err(status) => judge(&status),
        }
    }
}

/// Reads a response stream to its end; its first error is the answer.
async fn drain<T>(mut stream: tonic::Streaming<T>) -> Result<(), tonic::Status> {
    while let Some(message) = stream.next().await {
        message?;
    }
    Ok(())
}

fn bytes(rng: &mut StdRng) -> Vec<u8> {
    let len = match rng.random_range(0..4) {
        0 => 0,
        1 => rng.random_range(0..16),
        2 => rng.random_range(0..512),
        _ => rng.random_range(0..65_536),
    };
    (0..len).map(|_| rng.random()).collect()
}

fn junk_text(rng: &mut StdRng) -> String {
    let len = rng.random_range(0..200);
    (0..len)
        .map(|_| char::from(rng.random_range(0x20u8..0x7f)))
        .collect()
}

/// A ticket, command or action body: random bytes, an `Any` of a known type with a random
/// or mutated value, or a mutated release request.
fn payload(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..6) {
        0 => bytes(rng),
        1 | 2 => {
            let mut json = RELEASE.as_bytes().to_vec();
            mutate_bytes(rng, &mut json);
            any(RELEASE_TYPE_URL, json)
        }
        3 => {
            let statement = arrow_flight::sql::TicketStatementQuery {
                statement_handle: match rng.random_bool(0.5) {
                    true => {
                        let seed = SEEDS.choose(rng).copied().unwrap_or("");
                        mutate(rng, seed).into_bytes().into()
                    }
                    false => bytes(rng).into(),
                },
            };
            statement.as_any().encode_to_vec()
        }
        4 => {
            let mut encoded = any(TYPE_URLS.choose(rng).copied().unwrap_or(""), bytes(rng));
            mutate_bytes(rng, &mut encoded);
            encoded
        }
        _ => any(TYPE_URLS.choose(rng).copied().unwrap_or(""), bytes(rng)),
    }
}

fn any(type_url: &str, value: Vec<u8>) -> Vec<u8> {
    Any {
        type_url: type_url.to_string(),
        value: value.into(),
    }
    .encode_to_vec()
}

fn descriptor(rng: &mut StdRng) -> FlightDescriptor {
    let mut descriptor = FlightDescriptor::new_cmd(payload(rng));
    match rng.random_range(0..5) {
        0 => descriptor.r#type = rng.random(),
        1 => descriptor.path = vec![junk_text(rng), junk_text(rng)],
        2 => {
            let seed = SEEDS.choose(rng).copied().unwrap_or("");
            let query = arrow_flight::sql::CommandStatementQuery {
                query: mutate(rng, seed),
                transaction_id: rng.random_bool(0.3).then(|| bytes(rng).into()),
            };
            descriptor.cmd = query.as_any().encode_to_vec().into();
        }
        _ => {}
    }
    descriptor
}

fn flight_data(rng: &mut StdRng) -> Vec<FlightData> {
    (0..rng.random_range(0..4))
        .map(|_| FlightData {
            flight_descriptor: rng.random_bool(0.5).then(|| descriptor(rng)),
            data_header: bytes(rng).into(),
            app_metadata: bytes(rng).into(),
            data_body: bytes(rng).into(),
        })
        .collect()
}

/// Flips, drops, repeats or truncates a few bytes.
fn mutate_bytes(rng: &mut StdRng, data: &mut Vec<u8>) {
    for _ in 0..rng.random_range(1..6) {
        if data.is_empty() {
            return;
        }
        let at = rng.random_range(0..data.len());
        match rng.random_range(0..5) {
            0 => data[at] ^= 1 << rng.random_range(0..8),
            1 => {
                data.remove(at);
            }
            2 => {
                let end = rng.random_range(at..data.len());
                let span = data[at..=end].to_vec();
                for _ in 0..rng.random_range(1..100) {
                    data.splice(at..at, span.iter().copied());
                }
            }
            3 => data.truncate(at),
            _ => data.insert(at, *b"{}[]\",:0-e9".choose(rng).unwrap_or(&b'0')),
        }
    }
}
