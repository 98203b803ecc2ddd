//! A trust's node on its own, reached with the gateway's certificate but without the gateway:
//! it refuses SQL text, models its catalogue does not allow, requests that try to set how it
//! protects its patients, and requests whose signed identity is missing, forged, expired or
//! does not approve what is asked (or a project that does not include the trust), each
//! written in the trust's own audit log with its code. What it answers is protected by its
//! own policy: contributions bounded per patient, discrete Gaussian noise on every partial
//! (its scale in the field's `tally.noise_sd`), every computation paid for in its own budget
//! ledger (which refuses when the project's budget is spent, whoever asks), and a repeat of
//! the same release answered from its store, identical and free.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use arrow::datatypes::DataType;
use arrow_flight::Ticket;
use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use futures::TryStreamExt;
use prost::Message;
use serde_json::Value;
use tally::federation::{self, DEMO_PROJECT, DEMO_USER};
use tally::tokens::{AUDIENCE, ISSUER, IdentityProvider, TokenClaims};
use tally_common::audit::read_records;
use tally_common::flight::{
    ANALYST_TOKEN_HEADER, PROJECT_HEADER, PURPOSE_HEADER, QUERY_ID_HEADER, USER_HEADER,
};
use tally_common::governance::Governance;
use tally_common::ledger::Ledger;
use tally_common::model::{
    Aggregate, ColumnRef, Comparison, Dimension, Generaliser, Literal, MODEL_VERSION, Partial,
    Predicate, RELEASE_TYPE_URL, ReleaseQuery, ReleaseRequest,
};
use tally_common::noise::Rho;
use tally_common::policy::Policy;
use tally_common::privacy::{ContributionBounds, FixedPoint, Keys, NOISE_SD, ReleaseNoise};
use tally_synth::default_trusts;

use crate::support::{
    analyst_token, copy_of_data, data_dir, default_policies, fresh_state, identity_provider,
    init_logging, node_client, open_policies, rows, tls,
};

/// One trust's node over the data in `data`, with its own audit log and privacy state
/// (budget ledger, stored answers, bounding key) in fresh folders.
pub struct Trust {
    /// The trust's code.
    pub code: String,
    /// The running node.
    pub node: tally_node::NodeHandle,
    /// Its audit log.
    pub log: PathBuf,
    /// Its `state_dir`.
    pub state: PathBuf,
}

impl Trust {
    /// Starts trust `code`'s node over `data`, deciding with the policy folder `policies`.
    pub async fn start(data: &Path, code: &str, policies: &Path) -> Trust {
        init_logging();
        let spec = default_trusts()
            .into_iter()
            .find(|t| t.code == code)
            .expect("a demo trust");
        let state = fresh_state();
        let mut config =
            federation::node_config(data, &spec, policies, &tls(), &identity_provider(), &state);
        let log = state.join(format!("{code}-audit.jsonl"));
        config.audit_log = Some(log.clone());
        let node = tally_node::start(&config).await.unwrap();
        Trust {
            code: code.to_string(),
            node,
            log,
            state: config.state_dir.expect("node_config sets a state_dir"),
        }
    }

    /// Sends `ask` to this trust (see [`send`]).
    pub async fn send(
        &self,
        asker: &Asker,
        query_id: &str,
        ask: &Ask,
    ) -> Result<Vec<RecordBatch>, String> {
        send(
            self.node.listen_addr.unwrap(),
            &self.code,
            asker,
            query_id,
            ask,
        )
        .await
    }

    /// The record of query `query_id` in the trust's own audit log (exactly one).
    pub fn record(&self, query_id: &str) -> Value {
        let records: Vec<Value> = read_records(&self.log)
            .unwrap()
            .into_iter()
            .filter(|r| r["query_id"] == query_id)
            .collect();
        assert_eq!(records.len(), 1, "{}: one record of {query_id}", self.code);
        records.into_iter().next().unwrap()
    }

    /// Stops the node; the ρ the demo project has spent on `dataset` in the trust's own
    /// ledger, read back from its file.
    pub async fn stop_and_read_spent(self, dataset: &str) -> f64 {
        self.node.stop().await;
        Ledger::open(&self.state.join("ledger.jsonl"))
            .expect("the node's ledger opens")
            .balance(DEMO_PROJECT, dataset)
            .spent
            .as_f64()
    }
}

/// The demo's trusts under the default policy.
struct Trusts {
    trusts: Vec<Trust>,
}

impl Trusts {
    async fn start() -> Self {
        let mut trusts = Vec::new();
        for trust in default_trusts() {
            trusts.push(Trust::start(data_dir(), trust.code, &default_policies()).await);
        }
        Trusts { trusts }
    }

    fn trust(&self, code: &str) -> &Trust {
        self.trusts.iter().find(|t| t.code == code).unwrap()
    }

    /// Sends `ask` to trust `code` (see [`send`]).
    async fn send(
        &self,
        code: &str,
        asker: &Asker,
        query_id: &str,
        ask: &Ask,
    ) -> Result<Vec<RecordBatch>, String> {
        self.trust(code).send(asker, query_id, ask).await
    }

    /// The record of query `query_id` in trust `code`'s own audit log (exactly one).
    fn record(&self, code: &str, query_id: &str) -> Value {
        self.trust(code).record(query_id)
    }

    async fn stop(self) {
        for trust in self.trusts {
            trust.node.stop().await;
        }
    }
}

/// Who a request says is asking, in the headers the gateway forwards.
#[derive(Clone)]
pub struct Asker {
    /// The analyst's signed token (none: the header is left out).
    pub token: Option<String>,
    /// The project selected.
    pub project: String,
    /// The purpose selected.
    pub purpose: String,
}

impl Asker {
    /// The demo analyst with a valid token, selecting `project` and `purpose`.
    fn analyst(project: &str, purpose: &str) -> Self {
        Asker {
            token: Some(analyst_token()),
            project: project.into(),
            purpose: purpose.into(),
        }
    }

    /// The same selection with `token` instead.
    fn with_token(self, token: Option<String>) -> Self {
        Asker { token, ..self }
    }
}

/// What a request carries.
pub enum Ask {
    /// SQL text, described with a Flight SQL statement's GetFlightInfo.
    SqlInfo(&'static str),
    /// SQL text in a statement ticket, redeemed with DoGet.
    SqlTicket(&'static str),
    /// A release (a query model) in a DoGet ticket, as the gateway sends.
    Release(Box<ReleaseRequest>),
    /// A release request's JSON as it is, in a DoGet ticket of the release type: what a
    /// compromised gateway could send that the model's types cannot build.
    Json(Value),
}

impl Ask {
    /// `request` in a DoGet ticket.
    pub fn release(request: ReleaseRequest) -> Self {
        Ask::Release(Box::new(request))
    }
}

/// Sends `ask` straight to the node of trust `code` at `addr` as `asker`, under `query_id`,
/// with the gateway's certificate; the batches or the error's text.
pub async fn send(
    addr: std::net::SocketAddr,
    code: &str,
    asker: &Asker,
    query_id: &str,
    ask: &Ask,
) -> Result<Vec<RecordBatch>, String> {
    let mut client = node_client(addr, code).await;
    if let Some(token) = &asker.token {
        client.set_header(ANALYST_TOKEN_HEADER, token);
    }
    client.set_header(PROJECT_HEADER, &asker.project);
    client.set_header(PURPOSE_HEADER, &asker.purpose);
    client.set_header(QUERY_ID_HEADER, query_id);
    // A lying gateway would also state who is asking: the trust never believes it.
    client.set_header(USER_HEADER, DEMO_USER);
    let ticket = match ask {
        Ask::SqlInfo(sql) => {
            let info = client
                .execute(sql.to_string(), None)
                .await
                .map_err(|e| e.to_string())?;
            return Err(format!("GetFlightInfo of SQL text answered: {info:?}"));
        }
        Ask::SqlTicket(sql) => {
            let statement = TicketStatementQuery {
                statement_handle: sql.as_bytes().to_vec().into(),
            };
            Ticket::new(statement.as_any().encode_to_vec())
        }
        Ask::Release(request) => request.to_ticket(),
        Ask::Json(value) => {
            let any = arrow_flight::sql::Any {
                type_url: RELEASE_TYPE_URL.to_string(),
                value: serde_json::to_vec(value).unwrap().into(),
            };
            Ticket::new(any.encode_to_vec())
        }
    };
    let stream = client.do_get(ticket).await.map_err(|e| e.to_string())?;
    stream.try_collect().await.map_err(|e| e.to_string())
}

fn column(table: &str, column: &str) -> ColumnRef {
    ColumnRef {
        table: table.into(),
        column: column.into(),
    }
}

fn generalised(table: &str, name: &str, generaliser: Generaliser) -> Dimension {
    Dimension {
        column: column(table, name),
        generaliser: Some(generaliser),
    }
}

/// A release counting `fact`'s rows per `group_by` (joined to `joins`, filtered by
/// `filter`); the trust applies its own bounds and noise.
fn count(
    fact: &str,
    joins: &[&str],
    group_by: Vec<Dimension>,
    filter: Option<Predicate>,
) -> ReleaseRequest {
    ReleaseRequest {
        release: ReleaseQuery {
            version: MODEL_VERSION,
            fact: fact.into(),
            joins: joins.iter().map(|j| j.to_string()).collect(),
            filter,
            group_by,
            aggregates: vec![Aggregate::CountRows],
        },
    }
}

/// Episodes per diagnosis: a release every trust may answer for the demo project.
fn episodes_by_diagnosis() -> ReleaseRequest {
    count(
        "episodes",
        &[],
        vec![Dimension::bare("episodes", "diagnosis_icd10")],
        None,
    )
}

/// `request` as JSON with a field the wire format does not have: the smallest number of
/// distinct patients per group, as a gateway could once ask a trust for. A trust decides
/// how it protects its patients from its own policy alone.
pub fn with_threshold(request: &ReleaseRequest) -> Value {
    let mut json = serde_json::to_value(request).unwrap();
    json["min_distinct_patients"] = Value::from(1);
    json
}

/// A token for the demo analyst whose approvals are `approvals` (project -> purposes).
pub fn token_approving(approvals: &[(&str, &[&str])]) -> String {
    let claims = TokenClaims {
        approvals: approvals
            .iter()
            .map(|(project, purposes)| {
                (
                    project.to_string(),
                    purposes.iter().map(|p| p.to_string()).collect(),
                )
            })
            .collect(),
        default_project: None,
        default_purpose: None,
        ..federation::demo_claims()
    };
    identity_provider()
        .mint(&claims, federation::DEMO_TOKEN_LIFETIME)
        .unwrap()
}

/// The demo analyst's token signed by another identity provider's key.
fn forged_token() -> String {
    let elsewhere = tempfile::tempdir().unwrap();
    IdentityProvider::ensure(elsewhere.path())
        .unwrap()
        .mint(&federation::demo_claims(), federation::DEMO_TOKEN_LIFETIME)
        .unwrap()
}

/// The demo analyst's token, signed by the trusted key, that expired an hour ago (well past
/// the verifier's leeway).
fn expired_token() -> String {
    let provider = identity_provider();
    let pem = std::fs::read_to_string(provider.dir.join("signing-key.pem")).unwrap();
    let key = rcgen::KeyPair::from_pem(&pem).unwrap();
    let jwks: Value =
        serde_json::from_str(&std::fs::read_to_string(provider.jwks_path()).unwrap()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = jwks["keys"][0]["kid"].as_str().map(str::to_string);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({
        "sub": DEMO_USER, "iss": ISSUER, "aud": AUDIENCE,
        "iat": now - 7_200, "exp": now - 3_600,
        "groups": ["analysts"], "projects": {DEMO_PROJECT: ["planning"]},
    });
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_ec_der(&key.serialize_der()),
    )
    .unwrap()
}

/// One refusal a trust must make on its own.
struct Refusal {
    name: &'static str,
    trust: &'static str,
    asker: Asker,
    ask: Ask,
    code: &'static str,
}

/// Everything a trust must refuse whoever holds the gateway's certificate.
fn refusals() -> Vec<Refusal> {
    let planning = Asker::analyst(DEMO_PROJECT, "planning");
    let refusal = |name, ask, code| Refusal {
        name,
        trust: "RXA",
        asker: planning.clone(),
        ask,
        code,
    };
    let denied = |name, asker, code| Refusal {
        name,
        trust: "RXA",
        asker,
        ask: Ask::release(episodes_by_diagnosis()),
        code,
    };
    let nhs_number = Predicate::Compare {
        on: Dimension::bare("patients", "nhs_number"),
        cmp: Comparison::Eq,
        value: Literal::Text("9434765919".into()),
    };
    let postcode_prefix = Predicate::Prefix {
        on: Dimension::bare("patients", "postcode"),
        prefix: "LS6 2".into(),
        negated: false,
    };
    let cost_as_text = Predicate::Compare {
        on: Dimension::bare("episodes", "cost"),
        cmp: Comparison::Gt,
        value: Literal::Text("a lot".into()),
    };
    let by_patients = |group_by: Vec<Dimension>, filter| count("patients", &[], group_by, filter);
    vec![
        // SQL text, however it arrives.
        refusal(
            "sql-get-flight-info",
            Ask::SqlInfo("SELECT COUNT(*) FROM episodes"),
            "E_BAD_REQUEST",
        ),
        refusal(
            "sql-statement-ticket",
            Ask::SqlTicket("SELECT nhs_number, postcode FROM patients"),
            "E_BAD_REQUEST",
        ),
        // Models the trust's own catalogue does not allow.
        refusal(
            "undeclared-join",
            Ask::release(count(
                "patients",
                &["episodes"],
                vec![Dimension::bare("episodes", "specialty")],
                None,
            )),
            "E_QUERY_SHAPE",
        ),
        refusal(
            "group-by-identifier",
            Ask::release(by_patients(
                vec![Dimension::bare("patients", "nhs_number")],
                None,
            )),
            "E_IDENTIFIER_COLUMN",
        ),
        refusal(
            "filter-on-identifier",
            Ask::release(by_patients(vec![], Some(nhs_number))),
            "E_IDENTIFIER_COLUMN",
        ),
        refusal(
            "bare-quasi-identifier",
            Ask::release(by_patients(
                vec![Dimension::bare("patients", "postcode")],
                None,
            )),
            "E_QUASI_IDENTIFIER",
        ),
        refusal(
            "undeclared-generaliser",
            Ask::release(by_patients(
                vec![generalised(
                    "patients",
                    "year_of_birth",
                    Generaliser::AgeBand,
                )],
                None,
            )),
            "E_QUASI_IDENTIFIER",
        ),
        refusal(
            "filter-not-allowed",
            Ask::release(by_patients(vec![], Some(postcode_prefix))),
            "E_FILTER_NOT_ALLOWED",
        ),
        // How the trust protects its patients is not the gateway's to say.
        refusal(
            "a-threshold-in-the-request",
            Ask::Json(with_threshold(&episodes_by_diagnosis())),
            "E_BAD_REQUEST",
        ),
        refusal(
            "literal-of-the-wrong-type",
            Ask::release(count("episodes", &[], vec![], Some(cost_as_text))),
            "E_BAD_REQUEST",
        ),
        // Identities the trust cannot verify.
        denied(
            "missing-token",
            planning.clone().with_token(None),
            "E_UNAUTHENTICATED",
        ),
        denied(
            "forged-token",
            planning.clone().with_token(Some(forged_token())),
            "E_UNAUTHENTICATED",
        ),
        denied(
            "expired-token",
            planning.clone().with_token(Some(expired_token())),
            "E_UNAUTHENTICATED",
        ),
        // Selections the signed approvals do not cover.
        denied(
            "project-not-approved",
            Asker::analyst("cardiac-audit", "research")
                .with_token(Some(token_approving(&[(DEMO_PROJECT, &["planning"])]))),
            "E_PROJECT",
        ),
        denied(
            "purpose-not-approved",
            Asker::analyst("cardiac-audit", "audit"),
            "E_PURPOSE",
        ),
        denied(
            "direct-care-even-if-signed",
            Asker::analyst(DEMO_PROJECT, "direct_care")
                .with_token(Some(token_approving(&[(DEMO_PROJECT, &["direct_care"])]))),
            "E_PURPOSE",
        ),
        // cardiac-audit covers RXA and RXB only.
        Refusal {
            name: "project-without-this-trust",
            trust: "RXC",
            asker: Asker::analyst("cardiac-audit", "research"),
            ask: Ask::release(episodes_by_diagnosis()),
            code: "E_PROJECT",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_on_its_own_and_audits_every_refusal_with_its_code() {
    let trusts = Trusts::start().await;
    for case in refusals() {
        let query_id = format!("node-test-{}", case.name);
        let err = trusts
            .send(case.trust, &case.asker, &query_id, &case.ask)
            .await
            .expect_err(case.name);
        assert!(
            err.contains(&format!("{}: ", case.code)),
            "{}: expected {}, got {err}",
            case.name,
            case.code
        );
        let record = trusts.record(case.trust, &query_id);
        assert_eq!(record["step"], "release", "{}: {record}", case.name);
        assert_eq!(record["outcome"], "refused", "{}: {record}", case.name);
        assert_eq!(record["codes"][0], case.code, "{}: {record}", case.name);
        assert_eq!(record["gateway"], "tally-gateway", "{}", case.name);
        let verified = record["identity"]["user"].as_str().unwrap();
        if case.code == "E_UNAUTHENTICATED" {
            assert_eq!(
                verified, "",
                "{}: the stated user is not believed",
                case.name
            );
        }
        if let Ask::Release(request) = &case.ask
            && !verified.is_empty()
        {
            assert_eq!(
                record["release"],
                serde_json::to_value(&request.release).unwrap(),
                "{}: the log holds the model received",
                case.name
            );
        }
    }
    // What RXC refused for cardiac-audit, RXA answers: the project includes it.
    let asker = Asker::analyst("cardiac-audit", "research");
    trusts
        .send(
            "RXA",
            &asker,
            "node-test-project-with-this-trust",
            &Ask::release(episodes_by_diagnosis()),
        )
        .await
        .expect("RXA is in cardiac-audit");
    assert_eq!(
        trusts.record("RXA", "node-test-project-with-this-trust")["outcome"],
        "answered"
    );
    trusts.stop().await;
}

/// Per value of `<fact>.<dimension>` at trust `code`, from its Parquet files: (distinct
/// patients, rows), without the rows of its opted-out patients when `opt_out`.
pub async fn trust_groups(
    code: &str,
    fact: &str,
    dimension: &str,
    opt_out: bool,
) -> BTreeMap<String, (i64, i64)> {
    let ctx = SessionContext::new();
    for table in ["episodes", "patients", "opt_outs"] {
        let path = data_dir().join(code).join(format!("{table}.parquet"));
        ctx.register_parquet(table, path.to_str().unwrap(), Default::default())
            .await
            .unwrap();
    }
    let opted_out = "SELECT p.person_id FROM patients p JOIN opt_outs o \
                     ON CAST(p.nhs_number AS VARCHAR) = CAST(o.nhs_number AS VARCHAR)";
    let filter = if opt_out {
        format!("WHERE person_id NOT IN ({opted_out})")
    } else {
        String::new()
    };
    let sql = format!(
        "SELECT CAST({dimension} AS VARCHAR), COUNT(DISTINCT person_id), COUNT(*) \
         FROM {fact} {filter} GROUP BY 1"
    );
    let batches = ctx.sql(&sql).await.unwrap().collect().await.unwrap();
    rows(&batches)
        .into_iter()
        .map(|row| {
            let number = |i: usize| row[i].to_string().parse::<i64>().unwrap();
            (row[0].to_string(), (number(1), number(2)))
        })
        .collect()
}

/// DataFusion over trust `code`'s files in `data` as its node sees them under a policy
/// that applies the opt-out: `episodes` and `patients` without the rows of the trust's
/// opted-out patients, with `trust_code` filled, and the generalisers registered.
pub async fn trust_tables(data: &Path, code: &str) -> SessionContext {
    let mut ctx = SessionContext::new();
    tally_common::generalise::register(&mut ctx).expect("generalisers register");
    for table in ["episodes", "patients", "opt_outs"] {
        let path = data.join(code).join(format!("{table}.parquet"));
        ctx.register_parquet(
            format!("{table}_file"),
            path.to_str().unwrap(),
            ParquetReadOptions::default(),
        )
        .await
        .unwrap();
    }
    let opted_out = "SELECT p.person_id FROM patients_file p JOIN opt_outs_file o \
                     ON CAST(p.nhs_number AS VARCHAR) = CAST(o.nhs_number AS VARCHAR)";
    for table in ["episodes", "patients"] {
        ctx.sql(&format!(
            "CREATE VIEW {table} AS SELECT t.*, '{code}' AS trust_code FROM {table}_file t \
             WHERE t.person_id NOT IN ({opted_out})"
        ))
        .await
        .unwrap();
    }
    ctx
}

/// The rows of `sql` over `ctx`.
pub async fn query_rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<ScalarValue>> {
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows(&batches)
}

/// A number in an answer (an integer count or a float sum) as f64; NULL is NaN.
pub fn number(value: &ScalarValue) -> f64 {
    match value.cast_to(&DataType::Float64) {
        Ok(ScalarValue::Float64(Some(v))) => v,
        Ok(_) | Err(_) => f64::NAN,
    }
}

/// A group key as text, as [`bounded_row_counts`] writes keys (`NULL` for a null key).
pub fn key_text(value: &ScalarValue) -> String {
    if value.is_null() {
        "NULL".to_string()
    } else {
        value.to_string()
    }
}

/// What `COUNT(*)` per value of `key` over `from` (a FROM clause, joins and WHERE
/// included, whose patient column is `unit`) can be at a trust after bounding
/// contributions with `bounds`, from `ctx`'s rows: per key, `(lower, upper)`. Each patient
/// counts at most `rows_per_group` rows in a group; a patient in more than
/// `groups_per_unit` groups keeps only that many, chosen by the trust's keyed hash, which
/// the test cannot know, so such a patient's rows are in `upper` and not in `lower`.
/// `key` may be a constant for an ungrouped release.
pub async fn bounded_row_counts(
    ctx: &SessionContext,
    unit: &str,
    from: &str,
    key: &str,
    bounds: ContributionBounds,
) -> BTreeMap<String, (i64, i64)> {
    let sql = format!(
        "WITH pg AS (SELECT {unit} AS u, COALESCE(CAST({key} AS VARCHAR), 'NULL') AS k, \
                            LEAST(COUNT(*), {rows}) AS n \
                     FROM {from} GROUP BY 1, 2), \
              pu AS (SELECT u, COUNT(*) AS g FROM pg GROUP BY u) \
         SELECT pg.k, SUM(CASE WHEN pu.g <= {groups} THEN pg.n ELSE 0 END), SUM(pg.n) \
         FROM pg JOIN pu ON pg.u = pu.u GROUP BY pg.k",
        rows = bounds.rows_per_group,
        groups = bounds.groups_per_unit,
    );
    query_rows(ctx, &sql)
        .await
        .into_iter()
        .map(|row| {
            (
                row[0].to_string(),
                (number(&row[1]) as i64, number(&row[2]) as i64),
            )
        })
        .collect()
}

/// The typed catalogue of the policy folder `policies`, as a node reads it.
pub fn governance_of(policies: &Path) -> Governance {
    Policy::load(policies)
        .expect("the policy loads")
        .snapshot()
        .governance()
        .clone()
}

/// ρ one release of the demo project costs under `governance` (its project budget's, else
/// the settings').
pub fn rho_per_release(governance: &Governance) -> f64 {
    governance
        .projects
        .get(DEMO_PROJECT)
        .and_then(|p| p.budget.as_ref())
        .and_then(|b| b.rho_per_release)
        .unwrap_or(governance.settings.privacy.rho_per_release)
}

/// The noise one trust adds to `release` for the demo project under `governance`, from the
/// shared calculation (`tally_common::privacy`), with `group_types` the types of its group
/// columns.
pub fn release_noise(
    governance: &Governance,
    release: &ReleaseQuery,
    group_types: &[DataType],
) -> ReleaseNoise {
    let rho = Rho::from_decimal(rho_per_release(governance)).unwrap();
    let bounds = ContributionBounds::of(governance, release);
    ReleaseNoise::of(governance, release, bounds, rho, group_types).unwrap()
}

/// The standard deviation a partial's noise must have, worked out here from first
/// principles rather than with the shared code: one patient changes the partial in at most
/// `groups_per_unit` groups, each by at most `rows_per_group` rows (counts) or that many
/// clamped values (sums: the largest magnitude the bounds allow, in the column's fixed
/// point; sums of squares: its square), so its L2 sensitivity is Δ = per-group change ×
/// sqrt(groups); spending ρ/k (the release's ρ split equally over its k noisy statistics),
/// the Gaussian mechanism needs σ = Δ / sqrt(2ρ/k) under zCDP. In the partial's own units.
pub fn expected_sd(
    governance: &Governance,
    partial: &Partial,
    bounds: ContributionBounds,
    statistics: usize,
) -> f64 {
    let rho = rho_per_release(governance) / statistics as f64;
    let rows = bounds.rows_per_group as f64;
    let fixed = FixedPoint::of_partial(governance, partial).unwrap();
    let (magnitude, unit) = match fixed {
        Some(fixed) => {
            let spec = governance
                .column(
                    &partial.column().unwrap().table,
                    &partial.column().unwrap().column,
                )
                .unwrap();
            let [low, high] = spec.bounds.unwrap();
            let scale = 10f64.powi(spec.precision as i32);
            assert_eq!(fixed.scale as f64, scale);
            ((low.abs().max(high.abs()) * scale).ceil(), scale)
        }
        None => (1.0, 1.0),
    };
    let (per_group, unit) = match partial {
        Partial::Rows | Partial::Count(_) => (rows, 1.0),
        Partial::Sum(_) => (rows * magnitude, unit),
        Partial::SumSquares(_) => (rows * magnitude * magnitude, unit * unit),
    };
    let sensitivity = per_group * (bounds.groups_per_unit as f64).sqrt();
    sensitivity / (2.0 * rho).sqrt() / unit
}

/// The noise scale a field states in its `tally.noise_sd` metadata.
pub fn stated_sd(field: &arrow::datatypes::Field) -> f64 {
    field
        .metadata()
        .get(NOISE_SD)
        .unwrap_or_else(|| panic!("{} states its noise: {field:?}", field.name()))
        .parse()
        .unwrap()
}

/// Whether two noise scales agree up to how the shared code rounds: σ up to a thousandth,
/// and each statistic's share of ρ down to a whole nano-ρ (a relative change of σ below
/// 10⁻⁶ for any share above a thousandth of a ρ).
fn same_scale(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-3 + 1e-6 * a.abs().max(b.abs())
}

/// The public values of `table.column` in `governance`'s catalogue.
pub fn domain(governance: &Governance, table: &str, column: &str) -> Vec<String> {
    governance
        .column(table, column)
        .and_then(|c| c.domain.clone())
        .unwrap_or_else(|| panic!("{table}.{column} has a public domain"))
}

/// A release over episodes per specialty of COUNT(*), AVG(cost) and VAR_SAMP(length_of_stay):
/// every kind of partial (rows, counts, sums, sums of squares).
fn every_partial_by_specialty() -> ReleaseRequest {
    let cost = column("episodes", "cost");
    let stay = column("episodes", "length_of_stay");
    ReleaseRequest {
        release: ReleaseQuery {
            version: MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter: None,
            group_by: vec![Dimension::bare("episodes", "specialty")],
            aggregates: vec![
                Aggregate::CountRows,
                Aggregate::Mean { column: cost },
                Aggregate::Variance {
                    column: stay,
                    population: false,
                },
            ],
        },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_noises_every_partial_and_states_its_scale() {
    let trusts = Trusts::start().await;
    let governance = governance_of(&default_policies());
    let request = every_partial_by_specialty();
    let release = &request.release;
    let partials = release.partials();
    let bounds = ContributionBounds::of(&governance, release);
    let specialties = domain(&governance, "episodes", "specialty");
    let rho = rho_per_release(&governance);
    let asker = Asker::analyst(DEMO_PROJECT, "planning");
    for trust in &trusts.trusts {
        let code = &trust.code;
        let query_id = format!("node-test-noise-{code}");
        let batches = trust
            .send(&asker, &query_id, &Ask::release(request.clone()))
            .await
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        let schema = batches[0].schema();
        assert_eq!(
            schema.fields().len(),
            1 + partials.len(),
            "{code}: {schema:?}"
        );
        // The scales were decided from the model, the catalogue and ρ alone.
        let noise = release_noise(&governance, release, &[schema.field(0).data_type().clone()]);
        assert!(
            matches!(noise.keys, Keys::Public(_)),
            "specialty has a public domain"
        );
        for (i, partial) in partials.iter().enumerate() {
            let field = schema.field(1 + i);
            let sd = stated_sd(field);
            let expected = expected_sd(&governance, partial, bounds, partials.len());
            assert!(
                same_scale(sd, noise.sd(i)) && same_scale(sd, expected),
                "{code}: {partial:?} states σ = {sd}, the shared code says {}, first principles {expected}",
                noise.sd(i)
            );
        }
        // Every specialty of the public list, zeros included, each count within 6σ of
        // what the trust's bounded rows can be.
        let answer = rows(&batches);
        let keys: Vec<String> = answer.iter().map(|row| key_text(&row[0])).collect();
        assert_eq!(keys, specialties, "{code}: every key, in order");
        let truth = bounded_row_counts(
            &trust_tables(data_dir(), code).await,
            "e.person_id",
            "episodes e",
            "e.specialty",
            bounds,
        )
        .await;
        let sd = noise.sd(0);
        for row in &answer {
            let key = key_text(&row[0]);
            let (lower, upper) = truth.get(&key).copied().unwrap_or((0, 0));
            let count = number(&row[1]);
            assert!(
                count >= lower as f64 - 6.0 * sd && count <= upper as f64 + 6.0 * sd,
                "{code}: {key} released {count}, bounded truth in [{lower}, {upper}], σ {sd}"
            );
        }
        let record = trust.record(&query_id);
        assert_eq!(record["outcome"], "answered");
        assert_eq!(record["rows"], specialties.len());
        assert_eq!(record["opt_out_applied"], true);
        assert_eq!(record["stored_answer"], false);
        assert_eq!(record["rho_charged"].as_f64(), Some(rho));
        assert_eq!(record["identity"]["user"], DEMO_USER);
    }
    trusts.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_release_returns_the_stored_answer_at_no_charge() {
    let trust = Trust::start(data_dir(), "RXB", &default_policies()).await;
    let governance = governance_of(&default_policies());
    let asker = Asker::analyst(DEMO_PROJECT, "planning");
    let ask = Ask::release(every_partial_by_specialty());
    let first = trust.send(&asker, "node-test-first", &ask).await.unwrap();
    let again = trust.send(&asker, "node-test-again", &ask).await.unwrap();
    assert_eq!(first, again, "the same noisy values, schema and scales");
    assert!(!first.is_empty() && first[0].num_rows() > 0);
    let (paid, free) = (
        trust.record("node-test-first"),
        trust.record("node-test-again"),
    );
    assert_eq!(paid["stored_answer"], false);
    assert_eq!(
        paid["rho_charged"].as_f64(),
        Some(rho_per_release(&governance))
    );
    assert_eq!(free["outcome"], "answered");
    assert_eq!(free["stored_answer"], true);
    assert_eq!(free["rho_charged"].as_f64(), Some(0.0));
    let spent = trust
        .stop_and_read_spent(&governance.settings.privacy.dataset)
        .await;
    assert_eq!(
        Rho::from_decimal(spent).unwrap(),
        Rho::from_decimal(rho_per_release(&governance)).unwrap(),
        "the trust's ledger holds one charge"
    );
}

/// A copy of the policy folder `from` (every file), its catalogue edited by `edit`.
pub fn policy_copy(from: &Path, edit: impl FnOnce(&mut Value)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.path().join(entry.file_name())).unwrap();
    }
    let path = dir.path().join("catalogue.json");
    let mut catalogue: Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut catalogue["governance"]);
    std::fs::write(&path, catalogue.to_string()).unwrap();
    dir
}

/// Episodes with a stay longer than `days`: one release per `days`, each distinct.
fn long_stays(days: i64) -> ReleaseRequest {
    count(
        "episodes",
        &[],
        vec![],
        Some(Predicate::Compare {
            on: Dimension::bare("episodes", "length_of_stay"),
            cmp: Comparison::Gt,
            value: Literal::Int(days),
        }),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nodes_own_ledger_refuses_once_the_project_budget_is_spent() {
    // The demo project may pay for five releases at this trust; nobody else keeps count
    // here (no gateway at all).
    const RELEASES: u64 = 5;
    let rho = governance_of(&default_policies())
        .settings
        .privacy
        .rho_per_release;
    let cap = Rho::from_decimal(rho)
        .unwrap()
        .times(RELEASES)
        .unwrap()
        .as_f64();
    let policies = policy_copy(&default_policies(), |governance| {
        governance["projects"][DEMO_PROJECT]["budget"] = serde_json::json!({"rho_cap": cap});
    });
    let trust = Trust::start(data_dir(), "RXA", policies.path()).await;
    let asker = Asker::analyst(DEMO_PROJECT, "planning");
    for days in 0..RELEASES as i64 {
        let query_id = format!("node-test-budget-{days}");
        trust
            .send(&asker, &query_id, &Ask::release(long_stays(days)))
            .await
            .unwrap_or_else(|e| panic!("release {days} is within the budget: {e}"));
        assert_eq!(trust.record(&query_id)["rho_charged"].as_f64(), Some(rho));
    }
    let err = trust
        .send(
            &asker,
            "node-test-budget-over",
            &Ask::release(long_stays(RELEASES as i64)),
        )
        .await
        .expect_err("the budget is spent");
    assert!(err.contains("E_BUDGET_EXHAUSTED: "), "{err}");
    let record = trust.record("node-test-budget-over");
    assert_eq!(record["outcome"], "refused");
    assert_eq!(record["codes"][0], "E_BUDGET_EXHAUSTED");
    let dataset = governance_of(policies.path()).settings.privacy.dataset;
    let spent = trust.stop_and_read_spent(&dataset).await;
    assert_eq!(
        Rho::from_decimal(spent).unwrap(),
        Rho::from_decimal(cap).unwrap(),
        "the trust's ledger holds the cap, not a charge more"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_policy_adds_noise_does_not_start_without_a_state_dir() {
    init_logging();
    let trust = &default_trusts()[0];
    let config = |policies: &Path| {
        let mut config = federation::node_config(
            data_dir(),
            trust,
            policies,
            &tls(),
            &identity_provider(),
            &fresh_state(),
        );
        config.state_dir = None;
        config
    };
    match tally_node::start(&config(&default_policies())).await {
        Ok(node) => {
            node.stop().await;
            panic!("a node with noise and no state_dir started");
        }
        Err(err) => assert!(err.to_string().contains("state_dir"), "{err}"),
    }
    // Without noise there is no budget to keep: the open test policy starts.
    let node = tally_node::start(&config(&open_policies()))
        .await
        .expect("no noise, no state needed");
    node.stop().await;
}

/// A copy of the test data in which one patient of trust `code` who has not opted out gets
/// `extra` more episodes in every specialty of `specialties` (copies of one of their
/// episodes, each with its own episode id); the copy's folder and the patient's id.
async fn data_with_a_frequent_patient(
    code: &str,
    specialties: &[String],
    extra: usize,
) -> (tempfile::TempDir, PathBuf, String) {
    let (dir, data) = copy_of_data();
    let ctx = trust_tables(&data, code).await;
    let chosen = query_rows(
        &ctx,
        "SELECT episode_id, person_id FROM episodes ORDER BY episode_id LIMIT 1",
    )
    .await;
    let (episode, person) = (chosen[0][0].to_string(), chosen[0][1].to_string());
    let columns: Vec<String> = ctx
        .table("episodes_file")
        .await
        .unwrap()
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let copies: Vec<String> = columns
        .iter()
        .map(|name| match name.as_str() {
            "episode_id" => "concat(e.episode_id, '-', s.column1, '-', CAST(g.value AS VARCHAR)) \
                             AS episode_id"
                .to_string(),
            "specialty" => "s.column1 AS specialty".to_string(),
            name => format!("e.{name}"),
        })
        .collect();
    let values: Vec<String> = specialties.iter().map(|s| format!("('{s}')")).collect();
    let sql = format!(
        "SELECT {all} FROM episodes_file \
         UNION ALL \
         SELECT {copies} FROM episodes_file e \
         CROSS JOIN generate_series(1, {extra}) g \
         CROSS JOIN (VALUES {values}) s \
         WHERE e.episode_id = '{episode}'",
        all = columns.join(", "),
        copies = copies.join(", "),
        values = values.join(", "),
    );
    let batches = ctx
        .sql(&sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .collect()
        .await
        .unwrap();
    let path = data.join(code).join("episodes.parquet");
    std::fs::remove_file(&path).unwrap();
    let file = std::fs::File::create(&path).unwrap();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, batches[0].schema(), None).unwrap();
    for batch in &batches {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();
    (dir, data, person)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_patient_counts_at_most_the_bounds_however_many_episodes_they_have() {
    let governance = governance_of(&default_policies());
    let specialties = domain(&governance, "episodes", "specialty");
    let by_specialty = count(
        "episodes",
        &[],
        vec![Dimension::bare("episodes", "specialty")],
        None,
    );
    let in_one = count(
        "episodes",
        &[],
        vec![],
        Some(Predicate::Compare {
            on: Dimension::bare("episodes", "specialty"),
            cmp: Comparison::Eq,
            value: Literal::Text(specialties[0].clone()),
        }),
    );
    let grouped = release_noise(&governance, &by_specialty.release, &[DataType::Utf8]);
    let ungrouped = release_noise(&governance, &in_one.release, &[]);
    let sd = grouped.sd(0).max(ungrouped.sd(0));
    // Far more extra episodes than the noise could hide.
    let extra = (20.0 * sd).ceil() as usize;
    let (_dir, data, person) = data_with_a_frequent_patient("RXA", &specialties, extra).await;
    let ctx = trust_tables(&data, "RXA").await;
    let raw = |filter: &str| {
        let ctx = ctx.clone();
        let sql = format!("SELECT COUNT(*) FROM episodes {filter}");
        async move { number(&query_rows(&ctx, &sql).await[0][0]) }
    };
    let trust = Trust::start(&data, "RXA", &default_policies()).await;
    let asker = Asker::analyst(DEMO_PROJECT, "planning");

    // In one group, the patient's rows count at most `rows_per_group` times.
    let bounds = ContributionBounds::of(&governance, &in_one.release);
    let filter = format!("WHERE specialty = '{}'", specialties[0]);
    let truth = bounded_row_counts(
        &ctx,
        "person_id",
        &format!("episodes {filter}"),
        "'all'",
        bounds,
    )
    .await["all"];
    assert_eq!(
        truth.0, truth.1,
        "one group: the bounded count is known exactly"
    );
    let answer = rows(
        &trust
            .send(&asker, "node-test-bound-rows", &Ask::release(in_one))
            .await
            .unwrap(),
    );
    let released = number(&answer[0][0]);
    let sd = ungrouped.sd(0);
    assert!(
        (released - truth.0 as f64).abs() <= 6.0 * sd,
        "released {released}, bounded truth {}, σ {sd}",
        truth.0
    );
    let all = raw(&filter).await;
    assert!(
        all - released > 10.0 * sd,
        "the {extra} extra episodes did not count: {all} rows, released {released}"
    );

    // Over groups, the patient counts in at most `groups_per_unit` of them.
    let bounds = ContributionBounds::of(&governance, &by_specialty.release);
    assert!((bounds.groups_per_unit as usize) < specialties.len());
    let per_patient = |order: &str| {
        format!(
            "WITH pg AS (SELECT person_id AS u, specialty AS k, LEAST(COUNT(*), {rows}) AS n \
                         FROM episodes GROUP BY 1, 2), \
                  ranked AS (SELECT n, ROW_NUMBER() OVER (PARTITION BY u ORDER BY n {order}) AS r \
                             FROM pg) \
             SELECT SUM(n) FROM ranked WHERE r <= {groups}",
            rows = bounds.rows_per_group,
            groups = bounds.groups_per_unit,
        )
    };
    // Whichever groups the keyed hash keeps, the total lies between keeping each
    // patient's smallest groups and keeping their largest.
    let lowest = number(&query_rows(&ctx, &per_patient("ASC")).await[0][0]);
    let highest = number(&query_rows(&ctx, &per_patient("DESC")).await[0][0]);
    let frequent = number(
        &query_rows(
            &ctx,
            &format!("SELECT COUNT(DISTINCT specialty) FROM episodes WHERE person_id = '{person}'"),
        )
        .await[0][0],
    );
    assert_eq!(frequent as usize, specialties.len(), "in every specialty");
    let answer = rows(
        &trust
            .send(
                &asker,
                "node-test-bound-groups",
                &Ask::release(by_specialty),
            )
            .await
            .unwrap(),
    );
    let total: f64 = answer.iter().map(|row| number(&row[1])).sum();
    let sd = grouped.sd(0) * (answer.len() as f64).sqrt();
    assert!(
        total >= lowest - 6.0 * sd && total <= highest + 6.0 * sd,
        "released {total} in all, bounded truth in [{lowest}, {highest}], σ {sd}"
    );
    let all = raw("").await;
    assert!(
        all - total > 10.0 * sd,
        "the extra episodes in other groups did not count: {all} rows, released {total}"
    );
    trust.node.stop().await;
}
