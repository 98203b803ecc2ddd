//! Shared fixtures: generated data (once per test run), a local federation, a centralised
//! DataFusion context over the union of every trust's files, and answer comparison.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use arrow::array::{ArrayRef, RecordBatch};
use datafusion::common::ScalarValue;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tally::certs::CertFolder;
use tally::client::{AnalystClient, Answer, GatewayTarget};
use tally::federation::{self, LocalFederation, Security};
use tally::tokens::IdentityProvider;
use tally_common::flight::SqlClient;
use tally_common::tls::{CertificateFiles, client_tls};
use tally_gateway::{GatewayConfig, default_node_name};
use tally_synth::{TrustSpec, default_trusts};
use tonic::transport::Endpoint;

/// The `tally` binary this test run built.
pub fn tally() -> std::process::Command {
    std::process::Command::new(env!("CARGO_BIN_EXE_tally"))
}

/// Starts `tally gateway --config <config>` and returns it once it prints its address.
pub fn spawn_gateway(config: &Path) -> (std::process::Child, std::net::SocketAddr) {
    let mut child = tally()
        .args(["gateway", "--config"])
        .arg(config)
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
    let addr = loop {
        let line = lines
            .next()
            .expect("the gateway prints its address")
            .unwrap();
        if let Some(addr) = line.strip_prefix("gateway on grpc+tls://") {
            break addr.trim().parse().unwrap();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    (child, addr)
}

/// Patients in the test data: small enough to build fast, large enough for many groups.
pub const TEST_PATIENTS: usize = 3_000;

/// The generated test data, shared by every test in this binary.
pub fn data_dir() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        federation::ensure_data(dir.path(), TEST_PATIENTS, 7).expect("generate test data");
        // The identity provider's keys are made here, once: tests that start together
        // would otherwise each make their own.
        federation::identity_provider(dir.path()).expect("identity provider");
        dir
    })
    .path()
}

/// The test run's demo CA and certificates (made once, like `tally certs`).
pub fn certs() -> &'static CertFolder {
    static CERTS: OnceLock<(tempfile::TempDir, CertFolder)> = OnceLock::new();
    &CERTS
        .get_or_init(|| {
            let dir = tempfile::tempdir().expect("temp dir");
            let codes: Vec<&str> = default_trusts().iter().map(|t| t.code).collect();
            let folder = tally::certs::create(dir.path(), &codes).expect("certificates");
            (dir, folder)
        })
        .1
}

/// The test run's identity provider (beside the shared test data).
pub fn identity_provider() -> IdentityProvider {
    federation::identity_provider(data_dir()).expect("identity provider")
}

/// A fresh signed token for the demo analyst from the test run's identity provider.
pub fn analyst_token() -> String {
    identity_provider()
        .mint(&federation::demo_claims(), federation::DEMO_TOKEN_LIFETIME)
        .expect("token")
}

/// TLS everywhere, as the demo runs.
pub fn tls() -> Security {
    Security::Tls(certs().clone())
}

/// The analysts' view of a TLS gateway listening on `addr`.
pub fn gateway_target(addr: std::net::SocketAddr) -> GatewayTarget {
    GatewayTarget::new(federation::gateway_url(&tls(), addr), Some(certs().ca()))
}

/// A Flight SQL client to the node of trust `code` at `addr`, over TLS presenting
/// `identity` (no client certificate when `None`).
pub async fn node_client_as(
    addr: std::net::SocketAddr,
    code: &str,
    identity: Option<&CertificateFiles>,
) -> Result<SqlClient, String> {
    let config =
        client_tls(&certs().ca(), identity, &default_node_name(code)).map_err(|e| e.to_string())?;
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(config)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("{e:?}"))?;
    Ok(SqlClient::new(channel))
}

/// A Flight SQL client to a node, as the gateway connects to it.
pub async fn node_client(addr: std::net::SocketAddr, code: &str) -> SqlClient {
    node_client_as(addr, code, Some(&certs().gateway_client()))
        .await
        .expect("the gateway's certificate is accepted")
}

/// A raw Flight SQL client to the gateway at `addr`, signed in with `token`, for tests that
/// drive GetFlightInfo and DoGet themselves.
pub async fn gateway_client(addr: std::net::SocketAddr, token: &str) -> SqlClient {
    let config = client_tls(&certs().ca(), None, &addr.ip().to_string()).unwrap();
    let channel = Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(config)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut client = SqlClient::new(channel);
    client.set_token(token.to_string());
    client
}

/// A fresh folder for privacy state (budget ledgers, stored answers), so no test's budget
/// depends on another's or on an earlier run. It is left for the OS to clean up.
pub fn fresh_state() -> PathBuf {
    tempfile::tempdir().expect("a temporary folder").keep()
}

/// A TLS node agent for `trust` over the test data, deciding with `policies`.
pub async fn start_node(trust: &TrustSpec, policies: &Path) -> tally_node::NodeHandle {
    tally_node::start(&node_config(trust.code, policies))
        .await
        .unwrap()
}

/// The config of a TLS node for the default trust `code` over the test data, deciding with
/// `policies`, with fresh privacy state.
pub fn node_config(code: &str, policies: &Path) -> tally_node::NodeConfig {
    let trust = default_trusts()
        .into_iter()
        .find(|t| t.code == code)
        .unwrap_or_else(|| panic!("no default trust {code}"));
    federation::node_config(
        data_dir(),
        &trust,
        policies,
        &tls(),
        &identity_provider(),
        &fresh_state(),
    )
}

/// The config of a TLS gateway on a loopback port over `endpoints` (code, name, address),
/// deciding with `policies`.
pub fn gateway_config(
    endpoints: &[(String, String, std::net::SocketAddr)],
    policies: &Path,
) -> GatewayConfig {
    federation::gateway_config(
        "127.0.0.1:0".parse().unwrap(),
        endpoints,
        policies,
        &tls(),
        &identity_provider(),
        &fresh_state(),
    )
}

/// Sends the servers' logs to the test output (shown for failing tests); `RUST_LOG` filters.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The repository's default policy folder (the NHS disclosure rules).
pub fn default_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("policies")
}

/// A policy that allows what the code's floor allows, without disclosure control or
/// opt-outs: answers must then equal a central DataFusion's exactly.
pub fn open_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/policies/open")
}

/// Starts three trusts and a gateway over `data`, all deciding with `policies`.
pub async fn start_federation_over(data: &Path, policies: &Path) -> LocalFederation {
    init_logging();
    federation::start(
        data,
        "127.0.0.1:0".parse().unwrap(),
        policies,
        tls(),
        &fresh_state(),
    )
    .await
    .expect("federation starts")
}

/// Nodes for every trust, each with an audit log in `dir`.
pub async fn audited_nodes(dir: &Path) -> Vec<(String, tally_node::NodeHandle, PathBuf)> {
    let mut nodes = Vec::new();
    for trust in default_trusts() {
        let mut config = federation::node_config(
            data_dir(),
            &trust,
            &default_policies(),
            &tls(),
            &identity_provider(),
            &fresh_state(),
        );
        let log = dir.join(format!("{}.jsonl", trust.code));
        config.audit_log = Some(log.clone());
        let node = tally_node::start(&config).await.unwrap();
        nodes.push((trust.code.to_string(), node, log));
    }
    nodes
}

/// A federation under the default policy whose gateway and nodes all write audit logs in
/// `dir`; returns it, the gateway's log and each trust's log.
pub async fn audited_federation(dir: &Path) -> (LocalFederation, PathBuf, Vec<(String, PathBuf)>) {
    init_logging();
    let nodes = audited_nodes(dir).await;
    let logs = nodes
        .iter()
        .map(|(code, _, log)| (code.clone(), log.clone()))
        .collect();
    let gateway_log = dir.join("gateway.jsonl");
    let nodes = nodes
        .into_iter()
        .map(|(code, node, _)| (code, node))
        .collect();
    let local = federation_of(nodes, &default_policies(), Some(gateway_log.clone())).await;
    (local, gateway_log, logs)
}

/// A TLS gateway deciding with `policies` (auditing to `gateway_log` if given) over
/// `nodes`, each with its trust's code, which all listen.
pub async fn federation_of(
    nodes: Vec<(String, tally_node::NodeHandle)>,
    policies: &Path,
    gateway_log: Option<PathBuf>,
) -> LocalFederation {
    let endpoints: Vec<_> = nodes
        .iter()
        .map(|(code, node)| (code.clone(), code.clone(), node.listen_addr.unwrap()))
        .collect();
    let mut config = gateway_config(&endpoints, policies);
    config.audit_log = gateway_log;
    let gateway = tally_gateway::start(&config).await.unwrap();
    LocalFederation {
        nodes: nodes.into_iter().map(|(_, node)| node).collect(),
        gateway,
        security: tls(),
        identity_provider: identity_provider(),
    }
}

/// Starts three trusts and a gateway over the test data under the open policy.
pub async fn start_federation() -> LocalFederation {
    start_federation_over(data_dir(), &open_policies()).await
}

/// An analyst client connected to `local`'s gateway.
pub async fn analyst(local: &LocalFederation) -> AnalystClient {
    let token = local.analyst_token().expect("token");
    AnalystClient::connect(&local.gateway_target(), &token)
        .await
        .expect("analyst connects")
}

/// What a central platform would do after copying every trust's files: one DataFusion
/// context over their union (with `trust_code` filled per trust).
pub async fn centralised() -> SessionContext {
    let ctx = SessionContext::new();
    for table in ["patients", "episodes"] {
        let mut parts = Vec::new();
        for trust in default_trusts() {
            let name = format!("{table}_{}", trust.code);
            let path = data_dir().join(trust.code).join(format!("{table}.parquet"));
            ctx.register_parquet(&name, path.to_str().unwrap(), ParquetReadOptions::default())
                .await
                .unwrap();
            parts.push(format!(
                "SELECT *, '{}' AS trust_code FROM {name}",
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
    let reference = data_dir()
        .join(default_trusts()[0].code)
        .join("icd10_chapters.parquet");
    ctx.register_parquet(
        "icd10_chapters",
        reference.to_str().unwrap(),
        ParquetReadOptions::default(),
    )
    .await
    .unwrap();
    ctx
}

/// Every row of `batches` as scalar values.
pub fn rows(batches: &[RecordBatch]) -> Vec<Vec<ScalarValue>> {
    let mut rows = Vec::new();
    for batch in batches {
        for row in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c: &ArrayRef| ScalarValue::try_from_array(c.as_ref(), row).unwrap())
                    .collect(),
            );
        }
    }
    rows
}

fn sort_rows(rows: &mut [Vec<ScalarValue>]) {
    rows.sort_by(|a, b| {
        a.iter()
            .zip(b)
            .map(|(x, y)| x.partial_cmp(y).unwrap_or(std::cmp::Ordering::Equal))
            .find(|o| o.is_ne())
            .unwrap_or(std::cmp::Ordering::Equal)
    });
}

fn values_match(got: &ScalarValue, want: &ScalarValue) -> bool {
    match (got, want) {
        (ScalarValue::Float64(Some(g)), ScalarValue::Float64(Some(w))) => {
            let scale = g.abs().max(w.abs());
            scale == 0.0 || (g - w).abs() / scale < 1e-9
        }
        _ => got == want,
    }
}

/// Asserts that two answers hold the same rows (order-insensitive unless `ordered`), exactly
/// for integers and strings, within a relative error of 1e-9 for floats.
pub fn assert_same_answer(sql: &str, got: &[RecordBatch], want: &[RecordBatch], ordered: bool) {
    let mut got_rows = rows(got);
    let mut want_rows = rows(want);
    assert_eq!(
        got_rows.len(),
        want_rows.len(),
        "row count differs for: {sql}"
    );
    if !ordered {
        sort_rows(&mut got_rows);
        sort_rows(&mut want_rows);
    }
    for (g, w) in got_rows.iter().zip(&want_rows) {
        assert_eq!(g.len(), w.len(), "column count differs for: {sql}");
        for (x, y) in g.iter().zip(w) {
            assert_eq!(
                x.data_type(),
                y.data_type(),
                "column type differs for: {sql}"
            );
            assert!(
                values_match(x, y),
                "value differs for: {sql}\n got: {g:?}\nwant: {w:?}"
            );
        }
    }
}

/// The answer's error text, or a panic if it succeeded.
pub fn expect_refusal(result: Result<Answer, tally::client::ClientError>) -> String {
    match result {
        Ok(answer) => panic!("expected a refusal, got {} batches", answer.batches.len()),
        Err(err) => err.to_string(),
    }
}

/// Copies the test data of every trust to a fresh folder the test may damage.
pub fn copy_of_data() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let target = dir.path().to_path_buf();
    for trust in default_trusts() {
        let from = data_dir().join(trust.code);
        let to = target.join(trust.code);
        std::fs::create_dir_all(&to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }
    std::fs::copy(
        data_dir().join("manifest.json"),
        target.join("manifest.json"),
    )
    .unwrap();
    (dir, target)
}
