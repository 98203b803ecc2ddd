//! A trust whose tables live in PostgreSQL: a real server (PostgreSQL from the distribution's
//! packages, started in a temporary folder, as the `postgres` user when the tests run as
//! root), loaded with the trust's generated tables, read by the node with a read-only role.
//!
//! - The federation answers every equivalence query exactly as with that trust's Parquet
//!   files, and `pg_stat_statements` shows the database ran only aggregate queries and
//!   returned exactly as many rows as the trust released groups.
//! - At the node, every release gives the same exact and the same bounded (pre-noise)
//!   totals from the database as from the files, with the opt-out applied.
//! - Edge values (odd postcodes, negative and boundary ages, NUMERIC costs, text that sorts
//!   differently under the database's collation) give the same answers both ways.
//! - A role that may write, a superuser, a missing relation and a wrong password stop the
//!   node at start-up with a reason.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use arrow::array::{Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::prelude::SessionContext;
use futures::{SinkExt, pin_mut};
use tally::federation;
use tally_common::governance::Governance;
use tally_common::model::ReleaseQuery;
use tally_common::policy::Policy;
use tally_common::privacy::ContributionBounds;
use tally_node::release::{Aggregation, build_plan};
use tally_node::tables::open_tables;
use tally_node::{NodeConfig, OptOutConfig, PostgresConfig, TableConfig};
use tally_synth::default_trusts;

use crate::equivalence::{QUERIES, central_reference};
use crate::snapshots::lower_all;
use crate::support::{
    analyst, assert_same_answer, data_dir, default_policies, federation_of, init_logging,
    node_config, open_policies, rows,
};

/// The trust served from PostgreSQL in these tests.
const TRUST: &str = "RXB";

/// The node's read-only role and its password.
const READER: (&str, &str) = ("tally_reader", "reader-secret");

/// The superuser's password (the server asks every TCP connection for one).
const SUPERUSER_PASSWORD: &str = "superuser-secret";

/// A PostgreSQL server of the distribution's packages in a temporary folder, on a loopback
/// port, with `pg_stat_statements`; stopped when dropped.
struct PgServer {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

/// The newest installed PostgreSQL's programs.
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|bin| bin.join("initdb").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort_by_key(|bin| {
        bin.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    versions.pop().expect(
        "PostgreSQL is not installed (scripts/test installs it: apt-get install postgresql)",
    )
}

fn running_as_root() -> bool {
    let out = Command::new("id").arg("-u").output().expect("id runs");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

impl PgServer {
    /// Creates a cluster (ICU English collation, so text sorts unlike bytes) and starts it.
    fn start() -> Self {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let pwfile = dir.path().join("superuser.pw");
        std::fs::write(&pwfile, SUPERUSER_PASSWORD).unwrap();
        if running_as_root() {
            // PostgreSQL refuses to run as root: the folder becomes the postgres user's.
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .unwrap();
            assert!(status.success(), "chown to the postgres user");
        }
        let data = dir.path().join("data");
        let server = PgServer {
            port: free_port(),
            bin,
            dir,
        };
        server.run(
            "initdb",
            &[
                "-D",
                data.to_str().unwrap(),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                &format!("--pwfile={}", pwfile.display()),
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                "--locale-provider=icu",
                "--icu-locale=en-GB",
            ],
        );
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=all \
             -c fsync=off",
            server.port,
            server.dir.path().display()
        );
        server.run(
            "pg_ctl",
            &[
                "-D",
                data.to_str().unwrap(),
                "-l",
                server.dir.path().join("server.log").to_str().unwrap(),
                "-w",
                "-o",
                &options,
                "start",
            ],
        );
        server
    }

    /// Runs one of the server's programs (as the postgres user when we are root).
    fn run(&self, program: &str, args: &[&str]) {
        let path = self.bin.join(program);
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let out = command
            .args(args)
            .current_dir(self.dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{program} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Connection settings for `user` to database `db`, without the password.
    fn settings(&self, user: &str, db: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={db}", self.port)
    }

    /// A session of `user` (with `password`) in database `db`.
    async fn session(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Client {
        let mut config: tokio_postgres::Config = self.settings(user, db).parse().unwrap();
        config.password(password);
        let (client, connection) = config.connect(tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client
    }

    /// The superuser's session in `db`.
    async fn superuser(&self, db: &str) -> tokio_postgres::Client {
        self.session("postgres", SUPERUSER_PASSWORD, db).await
    }

    /// A file holding `password`, for a node's `password_file`.
    fn password_file(&self, password: &str) -> PathBuf {
        let path = self.dir.path().join(format!("{password}.pw"));
        std::fs::write(&path, format!("{password}\n")).unwrap();
        path
    }

    /// The `[postgres]` section of a node reading database `db` as `user`.
    fn node_settings(&self, user: &str, password: &str, db: &str) -> PostgresConfig {
        PostgresConfig {
            connection: self.settings(user, db),
            password_file: Some(self.password_file(password)),
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let path = self.bin.join("pg_ctl");
        let mut command = if running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&path);
            c
        } else {
            Command::new(&path)
        };
        let _ = command
            .args(["-D", data.to_str().unwrap(), "-m", "immediate", "stop"])
            .output();
    }
}

/// A loopback port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The PostgreSQL type a column of `data_type` is created with.
fn column_type(data_type: &DataType) -> String {
    match data_type {
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text".into(),
        DataType::Int16 => "smallint".into(),
        DataType::Int32 => "integer".into(),
        DataType::Int64 => "bigint".into(),
        DataType::Float64 => "double precision".into(),
        DataType::Date32 => "date".into(),
        DataType::Boolean => "boolean".into(),
        DataType::Decimal128(p, s) => format!("numeric({p},{s})"),
        other => panic!("no PostgreSQL type for {other} in these tests"),
    }
}

/// `value` escaped for COPY's text format.
fn copy_text(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('\t', "\\t")
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// Creates table `name` from `batches` (their schema and rows) in the database of
/// `client`, with COPY.
async fn load(client: &tokio_postgres::Client, name: &str, batches: &[RecordBatch]) {
    let schema = batches[0].schema();
    let columns: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| {
            let not_null = if f.is_nullable() { "" } else { " NOT NULL" };
            format!("\"{}\" {}{not_null}", f.name(), column_type(f.data_type()))
        })
        .collect();
    client
        .batch_execute(&format!("CREATE TABLE \"{name}\" ({})", columns.join(", ")))
        .await
        .unwrap();
    let mut text = String::new();
    for batch in batches {
        let columns: Vec<_> = batch
            .columns()
            .iter()
            .map(|c| arrow::compute::cast(c, &DataType::Utf8).unwrap())
            .collect();
        for row in 0..batch.num_rows() {
            let values: Vec<String> = columns
                .iter()
                .map(|c| {
                    let c = c
                        .as_any()
                        .downcast_ref::<arrow::array::StringArray>()
                        .unwrap();
                    if c.is_null(row) {
                        "\\N".to_string()
                    } else {
                        copy_text(c.value(row))
                    }
                })
                .collect();
            text.push_str(&values.join("\t"));
            text.push('\n');
        }
    }
    let sink = client
        .copy_in(&format!("COPY \"{name}\" FROM STDIN"))
        .await
        .unwrap();
    pin_mut!(sink);
    sink.send(Cursor::new(text.into_bytes())).await.unwrap();
    sink.finish().await.unwrap();
}

/// The rows of a Parquet file.
fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The tables a trust serves.
const TABLES: [&str; 3] = ["patients", "episodes", "icd10_chapters"];

/// Database `db` holding trust [`TRUST`]'s generated tables, readable (only) by
/// [`READER`], with `pg_stat_statements`.
async fn trust_database(server: &PgServer, db: &str) {
    let admin = server.superuser("postgres").await;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await
        .unwrap();
    let client = server.superuser(db).await;
    for table in TABLES {
        let batches = read_parquet(&data_dir().join(TRUST).join(format!("{table}.parquet")));
        load(&client, table, &batches).await;
    }
    client
        .batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    grant_reader(&client).await;
}

/// `tables` as entries read from the relations of the same names in the node's database.
fn relations(tables: &[&str]) -> Vec<TableConfig> {
    tables
        .iter()
        .map(|name| TableConfig {
            name: name.to_string(),
            path: None,
            format: None,
            postgres: Some(name.to_string()),
        })
        .collect()
}

/// Creates [`READER`], allowed to read every table of the database of `client`.
async fn grant_reader(client: &tokio_postgres::Client) {
    client
        .batch_execute(&format!(
            "DO $$ BEGIN
               IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{user}') THEN
                 CREATE ROLE {user} LOGIN PASSWORD '{password}';
               END IF;
             END $$;
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO {user};",
            user = READER.0,
            password = READER.1
        ))
        .await
        .unwrap();
}

/// The node's view of database `db` of `server`, read as [`READER`].
fn reader_database(server: &PgServer, db: &str) -> Arc<tally_node::postgres::PgDatabase> {
    Arc::new(
        tally_node::postgres::PgDatabase::new(
            &server.node_settings(READER.0, READER.1, db),
            std::time::Duration::from_secs(60),
        )
        .unwrap(),
    )
}

/// The releases `sql` lowers to over `ctx`'s tables, as the gateway lowers them for the demo
/// analyst in `project` for `purpose` under `snapshot`.
async fn releases_of(
    ctx: &SessionContext,
    snapshot: &tally_common::policy::PolicySnapshot,
    project: &str,
    purpose: &str,
    sql: &str,
) -> Vec<ReleaseQuery> {
    let identity = tally_common::admission::RequestIdentity {
        user: federation::DEMO_USER.into(),
        groups: vec!["analysts".into()],
        project: project.into(),
        purpose: purpose.into(),
    };
    let plan = tally_gateway::parse::plan_read_only(&ctx.state(), sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    tally_gateway::Explanation::of(
        plan,
        snapshot,
        &identity,
        &tally_common::admission::BudgetState::unspent(),
    )
    .unwrap_or_else(|e| panic!("{sql}: {e}"))
    .releases
}

/// Asserts that `release` gives the same bounded (pre-noise) totals, bounding key `key`,
/// over `from_database` as over `from_files`; returns how many groups they have.
async fn assert_same_bounded(
    from_files: &SessionContext,
    from_database: &SessionContext,
    governance: &Governance,
    release: &ReleaseQuery,
    key: u8,
) -> usize {
    let sql = release.render_sql(governance);
    let bounded = Aggregation::Bounded {
        bounds: ContributionBounds::of(governance, release),
        key: [key; 32],
    };
    let want = node_answer(from_files, governance, release, &bounded).await;
    let got = node_answer(from_database, governance, release, &bounded).await;
    let groups = rows(&want).len();
    assert_same_rows(&sql, rows(&got), rows(&want));
    groups
}

/// Trust [`TRUST`]'s node config (over `policies`), its tables read from database `db`.
fn node_in_database(server: &PgServer, db: &str, policies: &Path) -> NodeConfig {
    let mut config = node_config(TRUST, policies);
    config.postgres = Some(server.node_settings(READER.0, READER.1, db));
    config.tables = relations(&TABLES);
    config
}

/// What the reader role ran since the statistics were last reset: each statement's text
/// and the rows it returned.
async fn statements(admin: &tokio_postgres::Client) -> Vec<(String, i64)> {
    admin
        .query(
            "SELECT query, rows FROM pg_stat_statements \
             WHERE userid = (SELECT oid FROM pg_roles WHERE rolname = $1) \
             AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())",
            &[&READER.0],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

/// The rows the trust released per answered release, from its audit log, after the first
/// `skip` lines; and how many lines there are now.
fn released_rows(log: &Path, skip: usize) -> (usize, usize) {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let released = lines[skip.min(lines.len())..]
        .iter()
        .map(|line| serde_json::from_str::<serde_json::Value>(line).unwrap())
        .filter(|record| record["step"] == "release" && record["outcome"] == "answered")
        .map(|record| record["rows"].as_u64().unwrap() as usize)
        .sum();
    (released, lines.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trust_in_postgresql_answers_as_its_parquet_files_with_aggregates_only() {
    init_logging();
    let server = PgServer::start();
    trust_database(&server, "federated").await;
    let audit = tempfile::tempdir().unwrap();
    let policies = open_policies();
    let mut nodes = Vec::new();
    for trust in default_trusts() {
        let mut config = if trust.code == TRUST {
            node_in_database(&server, "federated", &policies)
        } else {
            node_config(trust.code, &policies)
        };
        config.audit_log = Some(audit.path().join(format!("{}.jsonl", trust.code)));
        nodes.push((
            trust.code.to_string(),
            tally_node::start(&config).await.unwrap(),
        ));
    }
    let local = federation_of(nodes, &policies, None).await;
    let mut client = analyst(&local).await;
    let central = central_reference().await;
    let admin = server.superuser("federated").await;
    let log = audit.path().join(format!("{TRUST}.jsonl"));
    let (_, mut seen) = released_rows(&log, 0);
    let mut checked_rows = 0;
    for query in QUERIES {
        let sql = query.sql;
        admin
            .batch_execute("SELECT pg_stat_statements_reset()")
            .await
            .unwrap();
        let answer = client
            .query(sql)
            .await
            .unwrap_or_else(|e| panic!("gateway refused {sql}: {e}"));
        let expected = central.sql(sql).await.unwrap().collect().await.unwrap();
        assert_same_answer(sql, &answer.batches, &expected, query.ordered);
        assert_eq!(answer.trusts, vec!["RXA", "RXB", "RXC"], "{sql}");
        let ran = statements(&admin).await;
        assert!(!ran.is_empty(), "the database was asked for: {sql}");
        for (statement, _) in &ran {
            assert!(
                statement.starts_with("SELECT ")
                    && (statement.contains("COUNT(") || statement.contains("SUM("))
                    && !statement.contains("ORDER BY"),
                "not one aggregate query: {statement}"
            );
        }
        let returned: i64 = ran.iter().map(|(_, rows)| rows).sum();
        let (released, now) = released_rows(&log, seen);
        seen = now;
        assert_eq!(
            returned as usize, released,
            "the database returned exactly the groups the trust released: {sql}"
        );
        checked_rows += released;
    }
    eprintln!(
        "postgres: {} queries, {checked_rows} groups released, each returned by one aggregate query",
        QUERIES.len()
    );
    assert!(checked_rows > 100, "the groups checked: {checked_rows}");
    local.stop().await;
}

/// A node-side session over trust [`TRUST`]'s tables (read from `database`, or from its
/// files when `None`), with the trust's opt-out list applied.
async fn node_session(database: Option<PostgresConfig>) -> SessionContext {
    let files = data_dir().join(TRUST);
    let tables: Vec<TableConfig> = match database {
        Some(_) => relations(&TABLES),
        None => TABLES
            .iter()
            .map(|name| TableConfig::files(name, files.join(format!("{name}.parquet"))))
            .collect(),
    };
    let database = database.map(|config| {
        Arc::new(
            tally_node::postgres::PgDatabase::new(&config, std::time::Duration::from_secs(60))
                .unwrap(),
        )
    });
    let setup = tally_common::session::new_context().unwrap();
    let opened = open_tables(&setup, &tables, TRUST, database.as_ref())
        .await
        .unwrap();
    for (name, table) in &opened {
        setup.register_table(name.as_str(), table.clone()).unwrap();
    }
    let opt_out = OptOutConfig {
        path: files.join("opt_outs.parquet"),
        patients_table: "patients".into(),
        patient_key: "nhs_number".into(),
        person_column: "person_id".into(),
    };
    let excluded = Arc::new(tally_node::opt_out::load(&setup, &opt_out).await.unwrap());
    assert!(!excluded.people.is_empty(), "some patients opted out");
    let ctx = tally_common::session::new_context().unwrap();
    for (name, table) in opened {
        ctx.register_table(name.as_str(), Arc::new(table.excluding(&excluded)))
            .unwrap();
    }
    ctx
}

/// `release`'s answer at the node over `ctx`, aggregated as `aggregation` says.
async fn node_answer(
    ctx: &SessionContext,
    governance: &Governance,
    release: &ReleaseQuery,
    aggregation: &Aggregation,
) -> Vec<RecordBatch> {
    let (plan, _) = build_plan(ctx, governance, release, aggregation)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", release.render_sql(governance)));
    plan.run(ctx)
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", release.render_sql(governance)))
}

/// Asserts that two bounded answers hold exactly the same rows, in any order.
fn assert_same_rows(
    sql: &str,
    mut got: Vec<Vec<datafusion::common::ScalarValue>>,
    mut want: Vec<Vec<datafusion::common::ScalarValue>>,
) {
    let order = |a: &Vec<_>, b: &Vec<_>| format!("{a:?}").cmp(&format!("{b:?}"));
    want.sort_by(order);
    got.sort_by(order);
    assert_eq!(got, want, "bounded totals differ for: {sql}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_release_totals_the_same_from_postgresql_as_from_files_opt_out_applied() {
    init_logging();
    let server = PgServer::start();
    trust_database(&server, "node").await;
    let files = node_session(None).await;
    let database = node_session(Some(server.node_settings(READER.0, READER.1, "node"))).await;
    let policy = Policy::load(&default_policies()).unwrap();
    let snapshot = policy.snapshot();
    let governance = snapshot.governance();
    let (queries, _) = lower_all().await;
    let mut compared = 0;
    for release in queries.iter().flatten() {
        let sql = release.render_sql(governance);
        let exact = Aggregation::Exact;
        let want = node_answer(&files, governance, release, &exact).await;
        let got = node_answer(&database, governance, release, &exact).await;
        assert_same_answer(&sql, &got, &want, false);
        assert_same_bounded(&files, &database, governance, release, 7).await;
        compared += 1;
    }
    eprintln!("postgres: {compared} releases total the same, exact and bounded");
    assert!(compared >= 50, "releases compared: {compared}");
}

/// Edge rows, as a batch of episodes (person_id, specialty, cost NUMERIC(12,2), age,
/// admission date, diagnosis) of five patients, and a batch of twelve patients (person_id,
/// postcode).
fn edge_rows() -> (RecordBatch, RecordBatch) {
    use arrow::array::{Date32Array, Decimal128Array, Int32Array, StringArray};
    let people: Vec<String> = (0..12).map(|i| format!("e{i}")).collect();
    // Five patients with two or three episodes each, so the bounds cut.
    let episode_people: Vec<String> = (0..12).map(|i| format!("e{}", i % 5)).collect();
    let episodes = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("specialty", DataType::Utf8, true),
            Field::new("cost", DataType::Decimal128(12, 2), true),
            Field::new("age_at_admission", DataType::Int32, true),
            Field::new("admission_date", DataType::Date32, true),
            Field::new("diagnosis_icd10", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(&episode_people)),
            Arc::new(StringArray::from(vec![
                Some("a"),
                Some("Z"),
                Some("b's"),
                Some("Zé"),
                Some(""),
                None,
                Some("100"),
                Some("a"),
                Some("z"),
                Some("A"),
                Some("é"),
                Some("Z"),
            ])),
            Arc::new(
                Decimal128Array::from(vec![
                    Some(10),
                    Some(123_456_789),
                    Some(-5),
                    None,
                    Some(0),
                    Some(99_999_999_999),
                    Some(1),
                    Some(250),
                    Some(333),
                    Some(7),
                    Some(10),
                    Some(12),
                ])
                .with_precision_and_scale(12, 2)
                .unwrap(),
            ),
            Arc::new(Int32Array::from(vec![
                Some(-3),
                Some(0),
                Some(4),
                Some(5),
                Some(89),
                Some(90),
                Some(120),
                None,
                Some(44),
                Some(45),
                Some(17),
                Some(3),
            ])),
            Arc::new(Date32Array::from(vec![
                Some(19_388), // 2023-01-31
                Some(19_782), // 2024-02-29
                Some(10_956), // 1999-12-31
                None,
                Some(0),
                Some(-1),
                Some(19_358),
                Some(19_389),
                Some(19_417),
                Some(19_448),
                Some(19_478),
                Some(19_509),
            ])),
            Arc::new(StringArray::from(vec![
                Some("I21"),
                Some("i21"),
                Some("Z99"),
                Some("I2"),
                None,
                Some("J45"),
                Some("I210"),
                Some("A00"),
                Some(""),
                Some("I21"),
                Some("Z00"),
                Some("J45"),
            ])),
        ],
    )
    .unwrap();
    let patients = RecordBatch::try_new(
        Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("postcode", DataType::Utf8, true),
        ])),
        vec![
            Arc::new(StringArray::from_iter_values(&people)),
            Arc::new(StringArray::from(vec![
                Some("LS6 2AB"),
                Some(" ls6 2ab "),
                Some("EC1A1BB"),
                Some("SW1A  1AA"),
                Some("xx"),
                Some("12345"),
                Some("LS62AB"),
                None,
                Some("ABCDE 1XX"),
                Some("Ä1 2AB"),
                Some("M1 1AE"),
                Some(""),
            ])),
        ],
    )
    .unwrap();
    (episodes, patients)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_values_answer_the_same_from_postgresql_and_from_files() {
    init_logging();
    let server = PgServer::start();
    let admin = server.superuser("postgres").await;
    admin.batch_execute("CREATE DATABASE edges").await.unwrap();
    let client = server.superuser("edges").await;
    let (episodes, patients) = edge_rows();
    load(&client, "episodes", std::slice::from_ref(&episodes)).await;
    load(&client, "patients", std::slice::from_ref(&patients)).await;
    grant_reader(&client).await;
    let dir = tempfile::tempdir().unwrap();
    let mut file_tables = Vec::new();
    for (name, batch) in [("episodes", &episodes), ("patients", &patients)] {
        let path = dir.path().join(format!("{name}.parquet"));
        let mut writer = parquet::arrow::ArrowWriter::try_new(
            std::fs::File::create(&path).unwrap(),
            batch.schema(),
            None,
        )
        .unwrap();
        writer.write(batch).unwrap();
        writer.close().unwrap();
        file_tables.push(TableConfig::files(name, path));
    }
    let in_database = relations(&["episodes", "patients"]);
    let database = reader_database(&server, "edges");
    let session = |tables: Vec<(String, Arc<tally_node::tables::TrustTable>)>| {
        let ctx = tally_common::session::new_context().unwrap();
        for (name, table) in tables {
            ctx.register_table(name.as_str(), table).unwrap();
        }
        ctx
    };
    let setup = tally_common::session::new_context().unwrap();
    let files = session(
        open_tables(&setup, &file_tables, TRUST, None)
            .await
            .unwrap(),
    );
    let in_db = session(
        open_tables(&setup, &in_database, TRUST, Some(&database))
            .await
            .unwrap(),
    );
    let policy = Policy::load(&default_policies()).unwrap();
    let snapshot = policy.snapshot();
    let governance = snapshot.governance();
    let statements = [
        "SELECT specialty, COUNT(*), SUM(cost), AVG(cost) FROM episodes GROUP BY specialty",
        "SELECT COUNT(*) FROM episodes WHERE specialty > 'Z'",
        "SELECT COUNT(*) FROM episodes WHERE specialty BETWEEN 'Z' AND 'b' OR specialty IN ('é', '')",
        "SELECT age_band(age_at_admission), COUNT(*), VAR(cost) FROM episodes GROUP BY 1",
        "SELECT month(admission_date), year(admission_date), COUNT(*) FROM episodes GROUP BY 1, 2",
        "SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 LIKE 'I2%'",
        "SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 NOT LIKE 'I2%'",
        "SELECT specialty, COUNT(*) FROM episodes WHERE cost > 1.5 AND cost <= 999999999.99 GROUP BY 1",
        "SELECT COUNT(*) FROM episodes WHERE cost BETWEEN 0.1 AND 2.5 OR cost = 3",
        "SELECT COUNT(*) FROM episodes WHERE admission_date >= DATE '2023-01-31'",
        "SELECT postcode_district(p.postcode), COUNT(*) FROM episodes e \
         JOIN patients p ON e.person_id = p.person_id GROUP BY 1",
        "SELECT postcode_district(postcode), COUNT(*) FROM patients GROUP BY 1",
        "SELECT specialty, SUM(cost), STDDEV(cost), COUNT(*) FROM episodes GROUP BY 1",
    ];
    for sql in statements {
        let releases =
            releases_of(&files, &snapshot, federation::DEMO_PROJECT, "planning", sql).await;
        for release in &releases {
            let exact = Aggregation::Exact;
            let want = node_answer(&files, governance, release, &exact).await;
            let got = node_answer(&in_db, governance, release, &exact).await;
            assert!(!rows(&want).is_empty(), "{sql}");
            assert_same_answer(sql, &got, &want, false);
            assert_same_bounded(&files, &in_db, governance, release, 3).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_a_role_that_may_write_a_superuser_a_missing_relation_a_bad_password() {
    init_logging();
    let server = PgServer::start();
    trust_database(&server, "checks").await;
    let client = server.superuser("checks").await;
    client
        .batch_execute(
            "CREATE ROLE tally_writer LOGIN PASSWORD 'writer-secret';
             GRANT SELECT ON ALL TABLES IN SCHEMA public TO tally_writer;
             GRANT INSERT ON episodes TO tally_writer;",
        )
        .await
        .unwrap();
    let refusal = |config: NodeConfig| async move {
        match tally_node::start(&config).await {
            Ok(_) => panic!("the node started"),
            Err(err) => err.to_string(),
        }
    };
    let policies = open_policies();
    let mut writer = node_in_database(&server, "checks", &policies);
    writer.postgres = Some(server.node_settings("tally_writer", "writer-secret", "checks"));
    let err = refusal(writer).await;
    assert!(
        err.contains("episodes") && err.contains("read-only role"),
        "{err}"
    );

    let mut superuser = node_in_database(&server, "checks", &policies);
    superuser.postgres = Some(server.node_settings("postgres", SUPERUSER_PASSWORD, "checks"));
    let err = refusal(superuser).await;
    assert!(err.contains("superuser"), "{err}");

    let mut missing = node_in_database(&server, "checks", &policies);
    missing.tables[0].postgres = Some("hes.patients".into());
    let err = refusal(missing).await;
    assert!(
        err.contains("hes.patients") && err.contains("does not exist"),
        "{err}"
    );

    let mut wrong = node_in_database(&server, "checks", &policies);
    wrong.postgres = Some(server.node_settings(READER.0, "not-the-password", "checks"));
    let err = refusal(wrong).await;
    assert!(err.contains("cannot connect"), "{err}");
    assert!(!err.contains("not-the-password"), "{err}");

    // And the one that is right starts.
    let node = tally_node::start(&node_in_database(&server, "checks", &policies))
        .await
        .unwrap();
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn omop_releases_over_integer_patient_ids_total_the_same_from_postgresql() {
    use crate::omop::{QUESTIONS, omop_policies, omop_trusts};
    use tally_synth::omop::OMOP_TABLES;
    init_logging();
    let server = PgServer::start();
    let admin = server.superuser("postgres").await;
    admin.batch_execute("CREATE DATABASE omop").await.unwrap();
    let client = server.superuser("omop").await;
    let files = omop_trusts().join(TRUST);
    for table in OMOP_TABLES {
        let batches = read_parquet(&files.join(format!("{table}.parquet")));
        load(&client, table, &batches).await;
    }
    grant_reader(&client).await;
    let database = reader_database(&server, "omop");
    let in_files: Vec<TableConfig> = OMOP_TABLES
        .iter()
        .map(|t| TableConfig::files(t, files.join(format!("{t}.parquet"))))
        .collect();
    let in_db = relations(&OMOP_TABLES);
    let opt_out = OptOutConfig {
        path: files.join("opt_outs.parquet"),
        patients_table: "person".into(),
        patient_key: "person_source_value".into(),
        person_column: "person_id".into(),
    };
    let session = |tables: &[TableConfig],
                   database: Option<Arc<tally_node::postgres::PgDatabase>>| {
        let tables = tables.to_vec();
        let opt_out = opt_out.clone();
        async move {
            let setup = tally_common::session::new_context().unwrap();
            let opened = open_tables(&setup, &tables, TRUST, database.as_ref())
                .await
                .unwrap();
            for (name, table) in &opened {
                setup.register_table(name.as_str(), table.clone()).unwrap();
            }
            let excluded = Arc::new(tally_node::opt_out::load(&setup, &opt_out).await.unwrap());
            assert!(!excluded.people.is_empty(), "some people opted out");
            let ctx = tally_common::session::new_context().unwrap();
            for (name, table) in opened {
                ctx.register_table(name.as_str(), Arc::new(table.excluding(&excluded)))
                    .unwrap();
            }
            ctx
        }
    };
    let from_files = session(&in_files, None).await;
    let from_database = session(&in_db, Some(database)).await;
    let rules = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies/tally.rego");
    let policies = omop_policies(&rules, false);
    let policy = Policy::load(policies.path()).unwrap();
    let snapshot = policy.snapshot();
    let governance = snapshot.governance();
    for sql in QUESTIONS {
        for release in &releases_of(&from_files, &snapshot, "omop-demo", "research", sql).await {
            let groups =
                assert_same_bounded(&from_files, &from_database, governance, release, 9).await;
            assert!(groups > 0, "{sql}");
        }
    }
}
