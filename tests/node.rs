//! A trust's node on its own, reached with the gateway's certificate but without the gateway:
//! it refuses SQL text, models its catalogue does not allow, and requests whose signed
//! identity is missing, forged, expired or does not approve what is asked (or a project that
//! does not include the trust), each written in the trust's own audit log with its code; and
//! it answers only with groups of at least 8 distinct patients at this trust.

use std::collections::BTreeMap;
use std::path::PathBuf;

use arrow::array::RecordBatch;
use arrow_flight::Ticket;
use arrow_flight::sql::{ProstMessageExt, TicketStatementQuery};
use datafusion::common::ScalarValue;
use futures::TryStreamExt;
use prost::Message;
use serde_json::Value;
use tally::federation::{self, DEMO_PROJECT, DEMO_USER};
use tally::tokens::{AUDIENCE, ISSUER, IdentityProvider, TokenClaims};
use tally_common::audit::read_records;
use tally_common::flight::{
    ANALYST_TOKEN_HEADER, PROJECT_HEADER, PURPOSE_HEADER, QUERY_ID_HEADER, USER_HEADER,
};
use tally_common::model::{
    Aggregate, ColumnRef, Comparison, Dimension, Generaliser, Literal, MODEL_VERSION, Predicate,
    ReleaseQuery, ReleaseRequest,
};

use crate::support::{
    analyst_token, audited_nodes, data_dir, fresh_state, identity_provider, node_client, rows,
};

/// The demo's trusts, each with its own audit log, under the default policy.
struct Trusts {
    nodes: Vec<(String, tally_node::NodeHandle, PathBuf)>,
    _dir: tempfile::TempDir,
}

impl Trusts {
    async fn start() -> Self {
        crate::support::init_logging();
        let dir = tempfile::tempdir().unwrap();
        Trusts {
            nodes: audited_nodes(dir.path()).await,
            _dir: dir,
        }
    }

    fn node(&self, code: &str) -> &(String, tally_node::NodeHandle, PathBuf) {
        self.nodes.iter().find(|(c, _, _)| c == code).unwrap()
    }

    /// Sends `ask` to trust `code` (see [`send`]).
    async fn send(
        &self,
        code: &str,
        asker: &Asker,
        query_id: &str,
        ask: &Ask,
    ) -> Result<Vec<RecordBatch>, String> {
        send(self.node(code).1.addr, code, asker, query_id, ask).await
    }

    /// The record of query `query_id` in trust `code`'s own audit log (exactly one).
    fn record(&self, code: &str, query_id: &str) -> Value {
        let records: Vec<Value> = read_records(&self.node(code).2)
            .unwrap()
            .into_iter()
            .filter(|r| r["query_id"] == query_id)
            .collect();
        assert_eq!(records.len(), 1, "{code}: one record of {query_id}");
        records.into_iter().next().unwrap()
    }

    async fn stop(self) {
        for (_, node, _) in self.nodes {
            node.stop().await;
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
/// `filter`); the trust applies its own threshold.
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
    let ctx = datafusion::prelude::SessionContext::new();
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

/// The default policy's threshold and rounding (`policies/catalogue.json`).
pub fn default_settings() -> (i64, i64) {
    let catalogue: Value = serde_json::from_str(
        &std::fs::read_to_string(crate::support::default_policies().join("catalogue.json"))
            .unwrap(),
    )
    .unwrap();
    let settings = &catalogue["governance"]["settings"];
    (
        settings["min_distinct_patients"].as_i64().unwrap(),
        settings["round_to"].as_i64().unwrap(),
    )
}

/// `n` rounded to the nearest multiple of `to` (halves up), as trusts round counts.
pub fn rounded(n: i64, to: i64) -> i64 {
    (n + to / 2) / to * to
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_answers_only_groups_of_at_least_eight_patients_at_the_trust() {
    let trusts = Trusts::start().await;
    let (threshold, round_to) = default_settings();
    assert_eq!(threshold, 8);
    let asker = Asker::analyst(DEMO_PROJECT, "planning");
    for (code, _, _) in &trusts.nodes {
        let query_id = format!("node-test-valid-{code}");
        let batches = trusts
            .send(
                code,
                &asker,
                &query_id,
                &Ask::release(episodes_by_diagnosis()),
            )
            .await
            .unwrap_or_else(|e| panic!("{code}: {e}"));
        let released: BTreeMap<String, i64> = rows(&batches)
            .into_iter()
            .map(|row| (row[0].to_string(), row[1].to_string().parse().unwrap()))
            .collect();
        let truth = trust_groups(code, "episodes", "diagnosis_icd10", true).await;
        assert!(
            truth.values().any(|(patients, _)| *patients < threshold),
            "{code}: the data has groups under the threshold"
        );
        for (diagnosis, episodes) in &released {
            let (patients, all) = truth[diagnosis];
            assert!(
                patients >= threshold,
                "{code}: {diagnosis} released with {patients} distinct patients"
            );
            assert_eq!(*episodes, rounded(all, round_to), "{code}: {diagnosis}");
        }
        let kept = truth.values().filter(|(p, _)| *p >= threshold).count();
        assert_eq!(
            released.len(),
            kept,
            "{code}: every group that passes is released"
        );
        let record = trusts.record(code, &query_id);
        assert_eq!(record["outcome"], "answered");
        assert_eq!(record["rows"], released.len());
        assert_eq!(record["opt_out_applied"], true);
        assert_eq!(record["min_distinct_patients"], threshold);
        assert_eq!(record["identity"]["user"], DEMO_USER);
    }
    trusts.stop().await;
}

/// Red-team finding: a group of many patients in which only one episode has a cost must not
/// carry that cost. A node withholds an aggregated column (count 0, sum and sum of squares
/// NULL) whose values come from fewer patients than its threshold.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_measure_valued_for_too_few_patients_is_withheld() {
    crate::support::init_logging();
    let (_dir, data) = crate::support::copy_of_data();
    let episodes = data.join("RXA").join("episodes.parquet");
    let ctx = datafusion::prelude::SessionContext::new();
    ctx.register_parquet("e", episodes.to_str().unwrap(), Default::default())
        .await
        .unwrap();
    let kept = rows(
        &ctx.sql("SELECT MIN(episode_id) FROM e WHERE specialty = '800'")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap(),
    )[0][0]
        .to_string();
    let columns: Vec<String> = ctx
        .table("e")
        .await
        .unwrap()
        .schema()
        .fields()
        .iter()
        .map(|f| match f.name().as_str() {
            "cost" => format!(
                "CASE WHEN specialty <> '800' OR episode_id = '{kept}' THEN cost END AS cost"
            ),
            name => name.to_string(),
        })
        .collect();
    let rewritten = ctx
        .sql(&format!("SELECT {} FROM e", columns.join(", ")))
        .await
        .unwrap()
        .collect()
        .await
        .unwrap();
    std::fs::remove_file(&episodes).unwrap();
    let file = std::fs::File::create(&episodes).unwrap();
    let mut writer =
        parquet::arrow::ArrowWriter::try_new(file, rewritten[0].schema(), None).unwrap();
    for batch in &rewritten {
        writer.write(batch).unwrap();
    }
    writer.close().unwrap();

    let mut config = tally::federation::node_config(
        &data,
        &tally_synth::default_trusts()[0],
        &crate::support::default_policies(),
        &crate::support::tls(),
        &identity_provider(),
        &fresh_state(),
    );
    config.audit_log = Some(data.join("rxa.jsonl"));
    let node = tally_node::start(&config).await.unwrap();
    let cost = column("episodes", "cost");
    let request = ReleaseRequest {
        release: ReleaseQuery {
            version: MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter: Some(Predicate::Compare {
                on: Dimension::bare("episodes", "specialty"),
                cmp: Comparison::Eq,
                value: Literal::Text("800".into()),
            }),
            group_by: Vec::new(),
            aggregates: vec![
                Aggregate::CountRows,
                Aggregate::Sum {
                    column: cost.clone(),
                },
                Aggregate::Variance {
                    column: cost,
                    population: true,
                },
            ],
        },
    };
    let asker = Asker::analyst(DEMO_PROJECT, "planning");
    let batches = send(
        node.addr,
        "RXA",
        &asker,
        "q-null-cost",
        &Ask::release(request),
    )
    .await
    .expect("answered");
    let answer = rows(&batches);
    assert_eq!(answer.len(), 1, "{answer:?}");
    let [row_count, cost_count, cost_sum, cost_squares] = answer[0].as_slice() else {
        panic!("four partials: {answer:?}");
    };
    assert!(
        matches!(row_count, ScalarValue::Int64(Some(n)) if *n >= 8),
        "the group itself has many patients: {row_count:?}"
    );
    assert_eq!(cost_count, &ScalarValue::Int64(Some(0)), "{answer:?}");
    assert!(cost_sum.is_null() && cost_squares.is_null(), "{answer:?}");
    node.stop().await;
}
