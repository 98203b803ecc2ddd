//! The trust's PostgreSQL database: connections with a read-only role, the schemas of its
//! tables and views as Arrow sees them, and the rows of the node's own queries (aggregates,
//! or a release's rows in patient order) read back as Arrow batches.
//!
//! Every value crosses as text (`CAST(... AS text)` in the query) and is parsed into the
//! column's Arrow type by arrow's own casts. PostgreSQL prints floats in their shortest
//! exact form, `numeric` exactly and dates as ISO, so nothing is rounded on the way; a value
//! Arrow cannot hold becomes NULL (see `TextColumns::finish`).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{ArrayRef, RecordBatch, StringBuilder};
use arrow::compute::{CastOptions, cast_with_options};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::Result as DfResult;
use datafusion::datasource::TableType;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use futures::{StreamExt, pin_mut};
use tokio_postgres::error::SqlState;
use tokio_postgres::types::ToSql;
use tokio_postgres::{Client, NoTls};

use tally_common::{ErrorCode, TallyError};

use crate::config::PostgresConfig;
use crate::error::NodeError;

/// Rows per Arrow batch read from the database.
const BATCH_ROWS: usize = 8192;

/// How long the node waits for the database to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The relation `text` (`name` or `schema.name`) as a quoted SQL identifier; refuses an
/// empty part, more than two parts, and NUL characters.
pub fn quoted_relation(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split('.').collect();
    if parts.len() > 2 || parts.iter().any(|p| p.is_empty() || p.contains('\0')) {
        return Err("must be a table or view name, or schema.name".into());
    }
    Ok(parts
        .iter()
        .map(|p| quote_identifier(p))
        .collect::<Vec<_>>()
        .join("."))
}

/// `name` as a quoted SQL identifier.
pub fn quote_identifier(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `text` as a SQL string literal (standard conforming strings, which every connection sets).
pub fn quote_text(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// The connection settings of `config`, without the password; refuses a password written
/// into them (it belongs in `password_file`).
pub fn connection_settings(config: &PostgresConfig) -> Result<tokio_postgres::Config, String> {
    let settings: tokio_postgres::Config = config
        .connection
        .parse()
        .map_err(|e: tokio_postgres::Error| e.to_string())?;
    if settings.get_password().is_some() {
        return Err("holds a password; put it in password_file instead".into());
    }
    if settings.get_user().is_none() {
        return Err("names no user (the node's read-only role)".into());
    }
    // No TLS to the database: patient ids and the opt-out list must not cross a network.
    for host in settings.get_hosts() {
        match host {
            tokio_postgres::config::Host::Unix(_) => {}
            tokio_postgres::config::Host::Tcp(name) => {
                let loopback = name == "localhost"
                    || name
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback());
                if !loopback {
                    return Err(format!(
                        "host '{name}' is not this machine: connect over a Unix socket or \
                         loopback (the node does not speak TLS to the database)"
                    ));
                }
            }
        }
    }
    Ok(settings)
}

/// Why reading from the database failed, as an analyst may see it: a timeout is the query's
/// own; anything else is the database's, whose text (which may quote a row's value) goes to
/// the node's log only.
fn failure(err: &tokio_postgres::Error, query_id: &str) -> TallyError {
    if err.code() == Some(&SqlState::QUERY_CANCELED) {
        return TallyError::new(
            ErrorCode::QueryTimeout,
            "the query ran past this trust's time limit",
        );
    }
    tracing::error!(query_id, error = %err, "the trust's PostgreSQL database failed a query");
    TallyError::new(
        ErrorCode::Execution,
        "this trust's database could not answer the release",
    )
}

/// The trust's database: how to connect, and the query time limit every session gets.
pub struct PgDatabase {
    /// For the node's queries: only `pg_catalog` on the search path, so no function or
    /// operator anyone else created can stand in for a built-in one.
    settings: tokio_postgres::Config,
    /// For start-up: the role's own search path, to find the configured relations.
    startup: tokio_postgres::Config,
    /// `user@host/dbname`, for logs and start-up errors.
    label: String,
    /// When the node connected first: stored answers are kept for the node's lifetime.
    opened: SystemTime,
}

impl std::fmt::Debug for PgDatabase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the password.
        f.debug_struct("PgDatabase")
            .field("label", &self.label)
            .finish_non_exhaustive()
    }
}

impl PgDatabase {
    /// The database of `config`, whose sessions stop any statement after `timeout`.
    pub fn new(config: &PostgresConfig, timeout: Duration) -> Result<Self, NodeError> {
        let fail = |reason: String| NodeError::Postgres(reason);
        let mut settings = connection_settings(config).map_err(fail)?;
        if let Some(file) = &config.password_file {
            let password = std::fs::read_to_string(file)
                .map_err(|e| fail(format!("password_file {}: {e}", file.display())))?;
            settings.password(password.trim_end_matches(['\n', '\r']));
        }
        let hosts: Vec<String> = settings
            .get_hosts()
            .iter()
            .map(|host| match host {
                tokio_postgres::config::Host::Tcp(name) => name.clone(),
                tokio_postgres::config::Host::Unix(path) => path.display().to_string(),
            })
            .collect();
        let label = format!(
            "{}@{}/{}",
            settings.get_user().unwrap_or_default(),
            hosts.join(","),
            settings.get_dbname().unwrap_or_default()
        );
        // Every session: read only, stopped at the node's time limit, and printing values
        // the way the decoding below expects.
        let millis = timeout.as_millis().clamp(1, i32::MAX as u128);
        let options = format!(
            "-c default_transaction_read_only=on -c statement_timeout={millis} \
             -c standard_conforming_strings=on -c DateStyle=ISO,YMD -c TimeZone=UTC \
             -c extra_float_digits=1 -c client_encoding=UTF8"
        );
        settings
            .application_name("tally-node")
            .connect_timeout(CONNECT_TIMEOUT);
        let mut startup = settings.clone();
        startup.options(options.as_str());
        settings.options(format!("{options} -c search_path=pg_catalog"));
        Ok(PgDatabase {
            settings,
            startup,
            label,
            opened: SystemTime::now(),
        })
    }

    /// A new session for the node's queries (its connection runs on its own task until the
    /// client is dropped).
    pub async fn connect(&self) -> Result<Client, tokio_postgres::Error> {
        Self::connect_with(&self.settings).await
    }

    async fn connect_with(
        settings: &tokio_postgres::Config,
    ) -> Result<Client, tokio_postgres::Error> {
        let (client, connection) = settings.connect(NoTls).await?;
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::warn!(error = %err, "a PostgreSQL connection ended with an error");
            }
        });
        Ok(client)
    }

    /// A session for start-up work, with errors that name the database.
    async fn connect_for(&self, what: &str) -> Result<Client, NodeError> {
        Self::connect_with(&self.startup).await.map_err(|e| {
            NodeError::Postgres(format!("{}: cannot connect to {what}: {e}", self.label))
        })
    }

    /// Checks that the node's role may read each of `relations` (name, configured relation)
    /// and change none of them (no table or column privilege beyond reading), and is no
    /// superuser and does not bypass row-level security; returns each relation's
    /// schema-qualified name and Arrow schema.
    pub async fn open(
        &self,
        relations: &[(String, String)],
    ) -> Result<Vec<(String, PgRelation, SchemaRef)>, NodeError> {
        let client = self.connect_for("open the tables").await?;
        let fail = |reason: String| NodeError::Postgres(format!("{}: {reason}", self.label));
        let privileged: bool = client
            .query_one(
                "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
                &[],
            )
            .await
            .and_then(|row| row.try_get(0))
            .map_err(|e| fail(e.to_string()))?;
        if privileged {
            return Err(fail(
                "the node's role is a superuser or bypasses row-level security; give it a role \
                 that can only read the trust's tables"
                    .into(),
            ));
        }
        let mut opened = Vec::new();
        for (name, relation) in relations {
            let quoted = quoted_relation(relation).map_err(|e| fail(format!("{relation}: {e}")))?;
            let table_fail = |reason: String| NodeError::Table {
                table: name.clone(),
                reason: format!("PostgreSQL relation {relation}: {reason}"),
            };
            let row = client
                .query_one(
                    "SELECT r::oid::bigint, \
                            has_table_privilege(current_user, r, 'SELECT'), \
                            has_table_privilege(current_user, r, \
                                'INSERT, UPDATE, DELETE, TRUNCATE, REFERENCES, TRIGGER') \
                            OR has_any_column_privilege(current_user, r, \
                                'INSERT, UPDATE, REFERENCES'), \
                            (SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) \
                             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                             WHERE c.oid = r) \
                     FROM (SELECT to_regclass($1) AS r) AS relation",
                    &[&quoted],
                )
                .await
                .map_err(|e| table_fail(e.to_string()))?;
            let oid: Option<i64> = row.try_get(0).map_err(|e| table_fail(e.to_string()))?;
            let Some(oid) = oid else {
                return Err(table_fail("does not exist".into()));
            };
            let (reads, writes): (bool, bool) = (
                row.try_get(1).map_err(|e| table_fail(e.to_string()))?,
                row.try_get(2).map_err(|e| table_fail(e.to_string()))?,
            );
            // The schema-qualified name: queries run with only pg_catalog on the path.
            let qualified: String = row.try_get(3).map_err(|e| table_fail(e.to_string()))?;
            if !reads {
                return Err(table_fail("the node's role may not read it".into()));
            }
            if writes {
                return Err(table_fail(
                    "the node's role may change it; give the node a read-only role".into(),
                ));
            }
            let columns = client
                .query(
                    "SELECT attname::text, format_type(atttypid, atttypmod), attnotnull \
                     FROM pg_attribute WHERE attrelid = $1::bigint::oid AND attnum > 0 \
                     AND NOT attisdropped ORDER BY attnum",
                    &[&oid],
                )
                .await
                .map_err(|e| table_fail(e.to_string()))?;
            let mut fields = Vec::new();
            for column in columns {
                let column_name: String =
                    column.try_get(0).map_err(|e| table_fail(e.to_string()))?;
                let type_name: String = column.try_get(1).map_err(|e| table_fail(e.to_string()))?;
                let not_null: bool = column.try_get(2).map_err(|e| table_fail(e.to_string()))?;
                match arrow_type(&type_name) {
                    Some(data_type) => fields.push(Field::new(column_name, data_type, !not_null)),
                    None => tracing::warn!(
                        table = %name,
                        column = %column_name,
                        r#type = %type_name,
                        "a column of a type Tally does not read is not served"
                    ),
                }
            }
            if fields.is_empty() {
                return Err(table_fail("has no column of a type Tally reads".into()));
            }
            opened.push((
                name.clone(),
                PgRelation {
                    quoted: qualified,
                    label: format!("{}:{relation}", self.label),
                },
                Arc::new(Schema::new(fields)),
            ));
        }
        Ok(opened)
    }

    /// A text that stays the same while this node runs: the database and when the node
    /// opened it (answers already released are given again until the node restarts).
    pub fn fingerprint(&self) -> String {
        format!("postgres:{}:{:?}", self.label, self.opened)
    }

    /// Runs `sql` with `params` and hands its rows to `each` as batches of `schema` (every
    /// column of the query must be text, in the schema's order). `query_id` labels the log.
    pub async fn read(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
        schema: &SchemaRef,
        query_id: &str,
        mut each: impl FnMut(RecordBatch) -> DfResult<()>,
    ) -> Result<(), TallyError> {
        let client = self.connect().await.map_err(|e| failure(&e, query_id))?;
        // A query dropped before its last row (its time limit passed, its caller went away)
        // is cancelled in the database too, not left running until statement_timeout.
        let mut unfinished = CancelOnDrop(Some(client.cancel_token()));
        let rows = client
            .query_raw(sql, params.iter().copied())
            .await
            .map_err(|e| failure(&e, query_id))?;
        pin_mut!(rows);
        let mut columns = TextColumns::new(schema.fields().len());
        while let Some(row) = rows.next().await {
            let row = row.map_err(|e| failure(&e, query_id))?;
            for (index, builder) in columns.builders.iter_mut().enumerate() {
                let value: Option<&str> = row.try_get(index).map_err(|e| failure(&e, query_id))?;
                builder.append_option(value);
            }
            columns.rows += 1;
            if columns.rows == BATCH_ROWS {
                each(columns.finish(schema)?).map_err(|e| engine(e, query_id))?;
            }
        }
        if columns.rows > 0 {
            each(columns.finish(schema)?).map_err(|e| engine(e, query_id))?;
        }
        unfinished.0 = None;
        Ok(())
    }
}

/// Cancels the database's work on a query when dropped while armed.
struct CancelOnDrop(Option<tokio_postgres::CancelToken>);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(async move {
                if let Err(err) = token.cancel_query(NoTls).await {
                    tracing::warn!(error = %err, "cancelling a PostgreSQL query failed");
                }
            });
        }
    }
}

/// A failure of the node's own processing of the database's rows (the memory limit, the
/// bounding) as the typed error it carries, or a generic one.
fn engine(err: datafusion::error::DataFusionError, query_id: &str) -> TallyError {
    TallyError::from_execution(err, query_id)
}

/// Text columns being filled from rows.
struct TextColumns {
    builders: Vec<StringBuilder>,
    rows: usize,
}

impl TextColumns {
    fn new(columns: usize) -> Self {
        TextColumns {
            builders: (0..columns).map(|_| StringBuilder::new()).collect(),
            rows: 0,
        }
    }

    /// The rows so far as a batch of `schema`; empties the builders. A value that does not
    /// parse as its column's type (a date PostgreSQL holds and Arrow cannot, such as
    /// `infinity` or a five-digit year) becomes NULL, as the node's generalisers make such
    /// values NULL: an error here would tell the analyst that some selected row holds one.
    /// How many did is logged.
    fn finish(&mut self, schema: &SchemaRef) -> Result<RecordBatch, TallyError> {
        self.rows = 0;
        let lenient = CastOptions {
            safe: true,
            ..Default::default()
        };
        let undecodable = |column: &str| {
            tracing::error!(
                column,
                "a value from the trust's database did not parse as its column's type"
            );
            TallyError::new(
                ErrorCode::Execution,
                "this trust's database returned a value of an unexpected type",
            )
        };
        let columns = self
            .builders
            .iter_mut()
            .zip(schema.fields())
            .map(|(builder, field)| {
                let text: ArrayRef = Arc::new(builder.finish());
                let parsed = cast_with_options(&text, field.data_type(), &lenient)
                    .map_err(|_| undecodable(field.name()))?;
                let lost = parsed.null_count() - text.null_count();
                if lost > 0 {
                    tracing::warn!(
                        column = %field.name(),
                        values = lost,
                        "values from the trust's database that Arrow cannot hold were read as NULL"
                    );
                }
                Ok(parsed)
            })
            .collect::<Result<Vec<_>, TallyError>>()?;
        RecordBatch::try_new(schema.clone(), columns).map_err(|_| undecodable("(the row)"))
    }
}

/// The Arrow type a PostgreSQL column of type `name` (as `format_type` prints it) is read
/// as; `None` for types Tally does not read. Text is read as `Utf8View`, as Parquet text is.
fn arrow_type(name: &str) -> Option<DataType> {
    let (base, modifier) = match name.split_once('(') {
        Some((base, rest)) => {
            let (modifier, tail) = rest.split_once(')')?;
            (format!("{base}{tail}"), Some(modifier))
        }
        None => (name.to_string(), None),
    };
    Some(match base.as_str() {
        "smallint" => DataType::Int16,
        "integer" => DataType::Int32,
        "bigint" => DataType::Int64,
        "real" => DataType::Float32,
        "double precision" => DataType::Float64,
        "boolean" => DataType::Boolean,
        "date" => DataType::Date32,
        "text" | "character varying" | "character" => DataType::Utf8View,
        "timestamp without time zone" => DataType::Timestamp(TimeUnit::Microsecond, None),
        "numeric" => {
            // Only declared precision and scale: an unconstrained NUMERIC has no Arrow type.
            let (precision, scale) = modifier?.split_once(',')?;
            let precision: u8 = precision.trim().parse().ok()?;
            let scale: i8 = scale.trim().parse().ok()?;
            if precision == 0 || precision > 38 || scale < 0 || scale as u8 > precision {
                return None;
            }
            DataType::Decimal128(precision, scale)
        }
        // Any other type (json, uuid, arrays, timestamptz, ...) is not served: refused.
        _ => return None,
    })
}

/// One table or view of the trust's database.
#[derive(Debug, Clone)]
pub struct PgRelation {
    /// The relation as a quoted SQL name.
    pub quoted: String,
    /// `user@host/db:relation`, for logs.
    pub label: String,
}

/// A relation of the trust's database as a DataFusion table: its schema, for the catalogue
/// and for typing releases. Its rows are never read into the node: a release over it is
/// pushed into the database whole (see [`crate::pushdown`]), so a scan is refused.
#[derive(Debug)]
pub struct PgTable {
    schema: SchemaRef,
}

impl PgTable {
    /// A relation whose columns are `schema`.
    pub fn new(schema: SchemaRef) -> Self {
        PgTable { schema }
    }
}

#[async_trait]
impl TableProvider for PgTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    async fn scan(
        &self,
        _state: &dyn Session,
        _projection: Option<&Vec<usize>>,
        _filters: &[Expr],
        _limit: Option<usize>,
    ) -> DfResult<Arc<dyn ExecutionPlan>> {
        Err(TallyError::new(
            ErrorCode::Execution,
            "this trust reads a table in its database only inside a release pushed there whole; \
             a release joining it to a table read from files cannot run here",
        )
        .into_datafusion())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relations_are_quoted_and_odd_names_refused() {
        assert_eq!(quoted_relation("episodes").unwrap(), "\"episodes\"");
        assert_eq!(
            quoted_relation("hes.Episodes").unwrap(),
            "\"hes\".\"Episodes\""
        );
        assert_eq!(
            quoted_relation("a\"b").unwrap(),
            "\"a\"\"b\"",
            "a quote inside a name is doubled"
        );
        for bad in ["", "a.", ".a", "a.b.c", "a\0b"] {
            assert!(quoted_relation(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(quote_text("O'Brien"), "'O''Brien'");
    }

    #[test]
    fn column_types_map_to_arrow_or_are_left_out() {
        assert_eq!(arrow_type("bigint"), Some(DataType::Int64));
        assert_eq!(
            arrow_type("character varying(12)"),
            Some(DataType::Utf8View)
        );
        assert_eq!(
            arrow_type("numeric(12,2)"),
            Some(DataType::Decimal128(12, 2))
        );
        assert_eq!(
            arrow_type("timestamp(3) without time zone"),
            Some(DataType::Timestamp(TimeUnit::Microsecond, None))
        );
        for unread in ["numeric", "numeric(40,2)", "jsonb", "uuid", "integer[]"] {
            assert_eq!(arrow_type(unread), None, "{unread}");
        }
    }

    #[test]
    fn a_password_in_the_connection_settings_is_refused() {
        let config = |connection: &str| PostgresConfig {
            connection: connection.into(),
            password_file: None,
        };
        assert!(connection_settings(&config("host=/tmp user=reader dbname=hes")).is_ok());
        let err = connection_settings(&config("host=/tmp user=reader password=secret"))
            .expect_err("a password in the settings");
        assert!(err.contains("password_file"), "{err}");
        assert!(!err.contains("secret"), "{err}");
        let err = connection_settings(&config("host=/tmp dbname=hes")).expect_err("no user");
        assert!(err.contains("user"), "{err}");
        for remote in ["host=db.trust.nhs.uk user=r", "host=10.0.0.5 user=r"] {
            let err = connection_settings(&config(remote)).expect_err(remote);
            assert!(err.contains("not this machine"), "{err}");
        }
        for local in [
            "host=127.0.0.1 user=r",
            "host=localhost user=r",
            "host=::1 user=r",
        ] {
            assert!(connection_settings(&config(local)).is_ok(), "{local}");
        }
    }
}
