//! The trust's local tables: Parquet or CSV files (or folders of them), or relations of the
//! trust's PostgreSQL database, each served with an extra `trust_code` column holding the
//! trust's code.
//!
//! A table's files are checked when the node starts (each must be readable and non-empty)
//! and again on every scan: a file that has since changed, vanished or appeared fails the
//! query with a typed error, never silently answering from different data. A relation is
//! checked at start-up: it must exist, and the node's role may read it and change nothing.

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column as ColumnExpr, Literal, in_list};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};
use sha2::{Digest, Sha256};

use tally_common::{ErrorCode, TallyError};

use crate::config::{TableConfig, TableFormat, TableLocation};
use crate::error::NodeError;
use crate::postgres::{PgDatabase, PgRelation, PgTable};

/// The layout of the copies in patient order; changing it makes the nodes write new ones.
const CLUSTERED_FORMAT: &str = "tally-clustered-1";

/// Name of the column every federated table gains.
pub const TRUST_CODE_COLUMN: &str = "trust_code";

/// Opens every configured table (those in PostgreSQL from `database`) and wraps it with
/// its `trust_code` column.
pub async fn open_tables(
    ctx: &SessionContext,
    tables: &[TableConfig],
    trust_code: &str,
    database: Option<&Arc<PgDatabase>>,
) -> Result<Vec<(String, Arc<TrustTable>)>, NodeError> {
    let mut relations = Vec::new();
    for table in tables {
        if let Some(TableLocation::Postgres { relation }) = table.location() {
            relations.push((table.name.clone(), relation.to_string()));
        }
    }
    let mut in_database = match (database, relations.is_empty()) {
        (Some(database), false) => database.open(&relations).await?,
        (None, false) => {
            return Err(NodeError::Postgres(
                "tables name PostgreSQL relations but there is no [postgres] section".into(),
            ));
        }
        (Some(_) | None, true) => Vec::new(),
    }
    .into_iter();
    let mut opened = Vec::new();
    for table in tables {
        let (raw, source): (Arc<dyn TableProvider>, TableSource) = match table.location() {
            Some(TableLocation::Files { path, format }) => {
                let (raw, files) = load_files(ctx, &table.name, path, format).await?;
                (raw, TableSource::Files(files))
            }
            Some(TableLocation::Postgres { .. }) => {
                let (_, relation, schema) = in_database.next().ok_or_else(|| NodeError::Table {
                    table: table.name.clone(),
                    reason: "its relation was not opened".into(),
                })?;
                let database = database
                    .ok_or_else(|| NodeError::Postgres("no [postgres] section".into()))?
                    .clone();
                let raw = Arc::new(PgTable::new(schema));
                (raw, TableSource::Postgres { database, relation })
            }
            None => {
                return Err(NodeError::Table {
                    table: table.name.clone(),
                    reason: "needs path or postgres, not both".into(),
                });
            }
        };
        if raw.schema().field_with_name(TRUST_CODE_COLUMN).is_ok() {
            return Err(NodeError::Table {
                table: table.name.clone(),
                reason: format!(
                    "it already has a '{TRUST_CODE_COLUMN}' column, which the node adds itself"
                ),
            });
        }
        opened.push((
            table.name.clone(),
            Arc::new(TrustTable::new(raw, trust_code, Arc::new(source))),
        ));
    }
    Ok(opened)
}

/// Each table with a privacy unit (`unit_of` its name) read instead from a copy of its rows
/// in patient order, written into `dir` the first time the table's files are seen (and
/// kept while they do not change): bounded releases read a patient's rows together, so
/// they need no sort. Copies of earlier versions of the files are removed.
pub async fn cluster(
    ctx: &SessionContext,
    tables: Vec<(String, Arc<TrustTable>)>,
    unit_of: &dyn Fn(&str) -> Option<String>,
    dir: &Path,
) -> Result<Vec<(String, Arc<TrustTable>)>, NodeError> {
    let fail = |reason: String| NodeError::State(format!("{}: {reason}", dir.display()));
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    // Patient-level rows: readable by the node's own user only.
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(|e| fail(e.to_string()))?;
    let mut clustered = Vec::new();
    let mut kept = Vec::new();
    for (name, table) in tables {
        let table = match unit_of(&name) {
            Some(unit)
                if matches!(*table.source, TableSource::Files(_))
                    && table.inner.schema().field_with_name(&unit).is_ok() =>
            {
                let (table, file) = table.clustered(ctx, &name, &unit, dir).await?;
                kept.push(file);
                Arc::new(table)
            }
            Some(_) | None => table,
        };
        clustered.push((name, table));
    }
    // Copies of earlier files, of tables no longer served, and copies a crash left
    // half-written are patient data nobody reads: removed.
    for entry in std::fs::read_dir(dir).map_err(|e| fail(e.to_string()))? {
        let entry = entry.map_err(|e| fail(e.to_string()))?;
        let name = entry.file_name().to_string_lossy().to_string();
        if !kept.contains(&name) {
            std::fs::remove_file(entry.path()).map_err(|e| fail(format!("{name}: {e}")))?;
        }
    }
    Ok(clustered)
}

/// Opens the files of one table (inferring their schema) without registering it; refuses
/// a table with a missing, unreadable or empty file.
pub async fn load_table(
    ctx: &SessionContext,
    name: &str,
    path: &Path,
    format: TableFormat,
) -> Result<Arc<dyn TableProvider>, NodeError> {
    load_files(ctx, name, path, format)
        .await
        .map(|(provider, _)| provider)
}

/// [`load_table`], also returning the files as they were when opened.
async fn load_files(
    ctx: &SessionContext,
    name: &str,
    path: &Path,
    format: TableFormat,
) -> Result<(Arc<dyn TableProvider>, TableFiles), NodeError> {
    let fail = |reason: String| NodeError::Table {
        table: name.to_string(),
        reason,
    };
    let text = path
        .to_str()
        .ok_or_else(|| fail("the path is not valid UTF-8".into()))?;
    if !path.exists() {
        return Err(fail(format!("{} does not exist", path.display())));
    }
    let files = TableFiles::take(name, path, format).map_err(fail)?;
    let staging = format!("__tally_loading_{name}");
    let loaded = match format {
        TableFormat::Parquet => {
            ctx.register_parquet(&staging, text, ParquetReadOptions::default())
                .await
        }
        TableFormat::Csv => {
            ctx.register_csv(&staging, text, CsvReadOptions::new().has_header(true))
                .await
        }
    };
    let unreadable = |e: datafusion::error::DataFusionError| {
        fail(format!(
            "{} could not be read: {}",
            path.display(),
            e.message()
        ))
    };
    loaded.map_err(unreadable)?;
    let provider = ctx.deregister_table(&staging).map_err(unreadable)?;
    let provider = provider.ok_or_else(|| fail("table vanished while loading".into()))?;
    files
        .verify()
        .map_err(|change| fail(format!("its files changed while being opened: {change}")))?;
    Ok((provider, files))
}

/// One data file as the node first saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
}

/// A table's data files (a file, or the files with the format's extension anywhere under a
/// folder) with their sizes and modification times, taken when the node opened the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableFiles {
    table: String,
    root: PathBuf,
    extension: &'static str,
    files: Vec<FileStamp>,
}

impl TableFiles {
    /// Records the files of table `name` at `root`; each must be readable and non-empty,
    /// and a folder must hold at least one. The error names the file (for the node's own
    /// operator, at start-up).
    pub fn take(name: &str, root: &Path, format: TableFormat) -> Result<Self, String> {
        let extension = match format {
            TableFormat::Parquet => ".parquet",
            TableFormat::Csv => ".csv",
        };
        let files = stamps(root, extension)?;
        if files.is_empty() {
            return Err(format!("{} holds no {extension} files", root.display()));
        }
        Ok(TableFiles {
            table: name.to_string(),
            root: root.to_path_buf(),
            extension,
            files,
        })
    }

    /// A text that changes whenever the files do (paths, sizes, modification times): what
    /// "unchanged data" means for stored noisy answers.
    pub fn fingerprint(&self) -> String {
        format!("{:?}", self.files)
    }

    /// Checks that the files are still exactly as recorded: none changed size or
    /// modification time, vanished, appeared, became unreadable or empty. The error
    /// describes the change with paths, for the node's log only.
    pub fn verify(&self) -> Result<(), String> {
        let now = stamps(&self.root, self.extension)?;
        if now == self.files {
            return Ok(());
        }
        let changed = self
            .files
            .iter()
            .find(|then| !now.contains(then))
            .or_else(|| now.iter().find(|file| !self.files.contains(file)))
            .map_or_else(|| self.root.clone(), |file| file.path.clone());
        Err(format!(
            "{} changed since the node opened it",
            changed.display()
        ))
    }

    /// The typed error a scan fails with when [`verify`](Self::verify) does: it names the
    /// table, not its files, and the detail goes to the node's log.
    fn unavailable(&self, detail: &str) -> TallyError {
        tracing::error!(
            table = %self.table,
            detail,
            "a table's files changed since the node started; refusing to read them"
        );
        TallyError::new(
            ErrorCode::Execution,
            format!(
                "table '{}' is unavailable at this trust: its data changed since the node started, \
                 so the node must be restarted",
                self.table
            ),
        )
    }
}

/// The stamps of the data files at `root`, sorted by path: `root` itself when it is a file,
/// otherwise every file under it whose name ends with `extension` (symbolic links to files
/// included; linked folders are not followed). Fails on an unreadable or empty file.
fn stamps(root: &Path, extension: &str) -> Result<Vec<FileStamp>, String> {
    let unreadable =
        |path: &Path, err: std::io::Error| format!("{} cannot be read: {err}", path.display());
    let meta = std::fs::metadata(root).map_err(|e| unreadable(root, e))?;
    if !meta.is_dir() {
        return Ok(vec![stamp(root)?]);
    }
    let mut files = Vec::new();
    let mut folders = vec![root.to_path_buf()];
    while let Some(folder) = folders.pop() {
        for entry in std::fs::read_dir(&folder).map_err(|e| unreadable(&folder, e))? {
            let entry = entry.map_err(|e| unreadable(&folder, e))?;
            let path = entry.path();
            let kind = entry.file_type().map_err(|e| unreadable(&path, e))?;
            if kind.is_dir() {
                folders.push(path);
            } else if path.to_string_lossy().ends_with(extension) {
                files.push(stamp(&path)?);
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// The stamp of one data file, which must open for reading and hold at least one byte.
fn stamp(path: &Path) -> Result<FileStamp, String> {
    let unreadable = |err: std::io::Error| format!("{} cannot be read: {err}", path.display());
    let file = File::open(path).map_err(unreadable)?;
    let meta = file.metadata().map_err(unreadable)?;
    if meta.is_dir() {
        return Err(format!("{} is a folder, not a data file", path.display()));
    }
    if meta.len() == 0 {
        return Err(format!("{} is empty (0 bytes)", path.display()));
    }
    Ok(FileStamp {
        path: path.to_path_buf(),
        len: meta.len(),
        modified: meta.modified().ok(),
    })
}

/// Where a served table's rows are.
#[derive(Debug)]
pub enum TableSource {
    /// Files, checked before every scan.
    Files(TableFiles),
    /// A relation of the trust's PostgreSQL database.
    Postgres {
        /// The database.
        database: Arc<PgDatabase>,
        /// The relation.
        relation: PgRelation,
    },
}

/// People whose rows a table hides: the National Data Opt-out, as person ids.
#[derive(Debug)]
pub struct Excluded {
    /// Column holding the person id.
    pub column: String,
    /// Person ids to hide (as matched when the node started).
    pub people: Vec<String>,
    /// When the patients table is in the trust's database: the list itself, matched again
    /// by every release pushed there, since the database's rows may change while the node
    /// runs (files cannot: a changed file stops its table until the node restarts).
    pub in_database: Option<DatabaseOptOut>,
}

/// The opt-out list as a release pushed into the database matches it.
#[derive(Debug)]
pub struct DatabaseOptOut {
    /// The patients relation, schema-qualified and quoted.
    pub patients: String,
    /// Its column the list's values are matched with, quoted.
    pub key: String,
    /// The list's values (NHS numbers).
    pub numbers: Vec<String>,
}

/// A table with a constant `trust_code` column appended, optionally hiding opted-out people.
/// Every scan first checks that the table's files are as they were at start-up.
#[derive(Debug)]
pub struct TrustTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    trust_code: String,
    excluded: Option<Arc<Excluded>>,
    source: Arc<TableSource>,
}

impl TrustTable {
    /// Wraps `inner`, read from `source`, appending `trust_code` to its schema.
    pub fn new(inner: Arc<dyn TableProvider>, trust_code: &str, source: Arc<TableSource>) -> Self {
        let mut fields: Vec<Arc<Field>> = inner.schema().fields().iter().cloned().collect();
        fields.push(Arc::new(Field::new(
            TRUST_CODE_COLUMN,
            DataType::Utf8,
            false,
        )));
        TrustTable {
            inner,
            schema: Arc::new(Schema::new(fields)),
            trust_code: trust_code.to_string(),
            excluded: None,
            source,
        }
    }

    /// The trust's code, which fills the `trust_code` column.
    pub fn trust_code(&self) -> &str {
        &self.trust_code
    }

    /// The people whose rows this table hides, if any.
    pub fn excluded(&self) -> Option<&Excluded> {
        self.excluded.as_deref()
    }

    /// The database and relation, when the table is served from PostgreSQL.
    pub fn postgres(&self) -> Option<(&Arc<PgDatabase>, &PgRelation)> {
        match &*self.source {
            TableSource::Postgres { database, relation } => Some((database, relation)),
            TableSource::Files(_) => None,
        }
    }

    /// The same table without the rows of `excluded` people (when it has their column).
    pub fn excluding(&self, excluded: &Arc<Excluded>) -> Self {
        let applies = self
            .inner
            .schema()
            .field_with_name(&excluded.column)
            .is_ok();
        TrustTable {
            inner: self.inner.clone(),
            schema: self.schema.clone(),
            trust_code: self.trust_code.clone(),
            excluded: applies.then(|| excluded.clone()),
            source: self.source.clone(),
        }
    }

    /// The same table read from a copy of its rows ordered by `unit` (NULL first) in
    /// `dir`, written now unless a copy of the same files is already there; and the copy's
    /// file name.
    async fn clustered(
        &self,
        ctx: &SessionContext,
        name: &str,
        unit: &str,
        dir: &Path,
    ) -> Result<(TrustTable, String), NodeError> {
        let fail = |reason: String| NodeError::Table {
            table: name.to_string(),
            reason: format!("its copy in patient order: {reason}"),
        };
        let engine = |e: datafusion::error::DataFusionError| fail(e.message().to_string());
        let TableSource::Files(files) = &*self.source else {
            return Err(fail("only tables read from files are copied".into()));
        };
        let order = vec![Expr::Column(Column::from_name(unit)).sort(true, true)];
        let digest = Sha256::digest(format!(
            "{CLUSTERED_FORMAT}\0{}\0{unit}",
            self.fingerprint()
        ));
        let file = format!("{name}-{}.parquet", hex::encode(&digest[..12]));
        let path = dir.join(&file);
        if !path.exists() {
            tracing::info!(
                table = name,
                unit,
                "writing the table's rows in patient order"
            );
            let partial = dir.join(format!(".{file}.{}.parquet", uuid::Uuid::new_v4()));
            let text = partial
                .to_str()
                .ok_or_else(|| fail("the state folder is not valid UTF-8".into()))?;
            let written = async {
                ctx.read_table(self.inner.clone())
                    .and_then(|frame| frame.sort(order.clone()))
                    .map_err(engine)?
                    .write_parquet(
                        text,
                        DataFrameWriteOptions::new().with_single_file_output(true),
                        None,
                    )
                    .await
                    .map_err(engine)?;
                std::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o600))
                    .and_then(|()| File::open(&partial)?.sync_all())
                    .map_err(|e| fail(format!("{}: {e}", partial.display())))?;
                // Files that changed while they were copied would give a torn copy.
                files
                    .verify()
                    .map_err(|change| fail(format!("the files changed while copied: {change}")))?;
                std::fs::rename(&partial, &path)
                    .map_err(|e| fail(format!("{}: {e}", path.display())))
            }
            .await;
            if let Err(error) = written {
                // Best effort: `cluster` removes anything left over at the next start.
                let _ = std::fs::remove_file(&partial);
                return Err(error);
            }
        }
        let schema = self.inner.schema();
        let options = ParquetReadOptions::default()
            .schema(&schema)
            .file_sort_order(vec![order]);
        let staging = format!("__tally_clustering_{name}");
        let text = path
            .to_str()
            .ok_or_else(|| fail("the state folder is not valid UTF-8".into()))?;
        ctx.register_parquet(&staging, text, options)
            .await
            .map_err(engine)?;
        let inner = ctx
            .deregister_table(&staging)
            .map_err(engine)?
            .ok_or_else(|| fail("the copy vanished while loading".into()))?;
        let table = TrustTable {
            inner,
            schema: self.schema.clone(),
            trust_code: self.trust_code.clone(),
            excluded: self.excluded.clone(),
            source: self.source.clone(),
        };
        Ok((table, file))
    }

    /// What "unchanged data" means for stored answers: the fingerprint of the table's
    /// files (see [`TableFiles::fingerprint`]), or of its database for this node's run.
    pub fn fingerprint(&self) -> String {
        match &*self.source {
            TableSource::Files(files) => files.fingerprint(),
            TableSource::Postgres { database, relation } => {
                format!("{}:{}", database.fingerprint(), relation.label)
            }
        }
    }

    fn trust_code_index(&self) -> usize {
        self.schema.fields().len() - 1
    }

    /// `person NOT IN (excluded)` over the inner scan's output.
    fn exclusion_filter(
        &self,
        excluded: &Excluded,
        input: Arc<dyn ExecutionPlan>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let schema = input.schema();
        let index = schema.index_of(&excluded.column)?;
        let column_type = schema.field(index).data_type();
        let list = excluded
            .people
            .iter()
            .map(|p| {
                let value = ScalarValue::Utf8(Some(p.clone())).cast_to(column_type)?;
                Ok(Arc::new(Literal::new(value)) as Arc<dyn PhysicalExpr>)
            })
            .collect::<Result<Vec<_>>>()?;
        let column = Arc::new(ColumnExpr::new(&excluded.column, index));
        let predicate = in_list(column, list, &true, &schema)?;
        Ok(Arc::new(FilterExec::try_new(predicate, input)?))
    }
}

fn mentions_trust_code(expr: &Expr) -> bool {
    expr.column_refs()
        .iter()
        .any(|c: &&Column| c.name == TRUST_CODE_COLUMN)
}

#[async_trait]
impl TableProvider for TrustTable {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        let inner: Vec<&Expr> = filters
            .iter()
            .copied()
            .filter(|f| !mentions_trust_code(f))
            .collect();
        let mut inner_answers = self.inner.supports_filters_pushdown(&inner)?.into_iter();
        Ok(filters
            .iter()
            .map(|f| {
                if mentions_trust_code(f) {
                    TableProviderFilterPushDown::Unsupported
                } else {
                    inner_answers
                        .next()
                        .unwrap_or(TableProviderFilterPushDown::Unsupported)
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if let TableSource::Files(files) = &*self.source
            && let Err(detail) = files.verify()
        {
            return Err(files.unavailable(&detail).into_datafusion());
        }
        let code_index = self.trust_code_index();
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..=code_index).collect(),
        };
        let mut inner_projection: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&i| i != code_index)
            .collect();
        if let Some(excluded) = &self.excluded {
            let index = self.inner.schema().index_of(&excluded.column)?;
            if !inner_projection.contains(&index) {
                inner_projection.push(index);
            }
        }
        let inner_filters: Vec<Expr> = filters
            .iter()
            .filter(|f| !mentions_trust_code(f))
            .cloned()
            .collect();
        // A limit may only be pushed into the files when no rows are hidden after them.
        let inner_limit = if self.excluded.is_some() { None } else { limit };
        let mut input = self
            .inner
            .scan(state, Some(&inner_projection), &inner_filters, inner_limit)
            .await?;
        if let Some(excluded) = &self.excluded {
            input = self.exclusion_filter(excluded, input)?;
        }
        let inner_schema = input.schema();
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = wanted
            .iter()
            .map(|&i| {
                let name = self.schema.field(i).name().clone();
                if i == code_index {
                    let value = ScalarValue::Utf8(Some(self.trust_code.clone()));
                    Ok((Arc::new(Literal::new(value)) as Arc<dyn PhysicalExpr>, name))
                } else {
                    let position = inner_schema.index_of(&name)?;
                    Ok((
                        Arc::new(ColumnExpr::new(&name, position)) as Arc<dyn PhysicalExpr>,
                        name,
                    ))
                }
            })
            .collect::<Result<_>>()?;
        Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch, StringArray};
    use datafusion::parquet::arrow::ArrowWriter;
    use tally_common::error::find_tally_error;

    /// Writes a Parquet file of `rows` people to `path`.
    fn write_parquet(path: &Path, rows: i64) {
        let schema = Arc::new(Schema::new(vec![
            Field::new("person_id", DataType::Utf8, false),
            Field::new("age", DataType::Int64, false),
        ]));
        let ids: Vec<String> = (0..rows).map(|i| format!("p{i}")).collect();
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(ids)),
                Arc::new(Int64Array::from((0..rows).collect::<Vec<_>>())),
            ],
        )
        .expect("batch");
        let file = File::create(path).expect("create");
        let mut writer = ArrowWriter::try_new(file, schema, None).expect("writer");
        writer.write(&batch).expect("write");
        writer.close().expect("close");
    }

    fn config(name: &str, path: &Path) -> TableConfig {
        TableConfig::files(name, path.to_path_buf())
    }

    /// The error `open_tables` gives for one table at `path`.
    async fn start_up_error(path: &Path) -> String {
        let ctx = tally_common::session::new_context().expect("context");
        match open_tables(&ctx, &[config("patients", path)], "RXX", None).await {
            Ok(_) => panic!("{} was accepted", path.display()),
            Err(err) => {
                assert!(
                    matches!(&err, NodeError::Table { table, .. } if table == "patients"),
                    "{err}"
                );
                err.to_string()
            }
        }
    }

    /// Opens the table at `path` into a fresh session, also registering an opt-out view
    /// hiding person `p0`.
    async fn serve(path: &Path) -> SessionContext {
        let ctx = tally_common::session::new_context().expect("context");
        let tables = open_tables(&ctx, &[config("patients", path)], "RXX", None)
            .await
            .expect("opens");
        let (name, table) = &tables[0];
        ctx.register_table(name.as_str(), table.clone())
            .expect("registers");
        let excluded = Arc::new(Excluded {
            column: "person_id".into(),
            people: vec!["p0".into()],
            in_database: None,
        });
        ctx.register_table("opted_out", Arc::new(table.excluding(&excluded)))
            .expect("registers");
        ctx
    }

    #[tokio::test]
    async fn a_table_with_a_privacy_unit_is_served_from_a_copy_in_patient_order() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("patients.parquet");
        write_parquet(&data, 500);
        let copies = dir.path().join("clustered");
        let ctx = tally_common::session::new_context().expect("context");
        let unit = |_: &str| Some("person_id".to_string());
        let cluster_now = || async {
            let tables = open_tables(&ctx, &[config("patients", &data)], "RXX", None)
                .await
                .expect("opens");
            cluster(&ctx, tables, &unit, &copies)
                .await
                .expect("clusters")
        };
        let listing = || {
            let mut names: Vec<String> = std::fs::read_dir(&copies)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
                .collect();
            names.sort();
            names
        };
        let tables = cluster_now().await;
        let first = listing();
        assert_eq!(first.len(), 1, "{first:?}");
        let served = SessionContext::new();
        served
            .register_table("patients", tables[0].1.clone())
            .unwrap();
        let excluded = Arc::new(Excluded {
            column: "person_id".into(),
            people: vec!["p7".into()],
            in_database: None,
        });
        served
            .register_table("opted_out", Arc::new(tables[0].1.excluding(&excluded)))
            .unwrap();
        let ids = |table: &'static str| {
            let served = served.clone();
            async move {
                let batches = served
                    .sql(&format!("SELECT person_id FROM {table}"))
                    .await
                    .unwrap()
                    .collect()
                    .await
                    .unwrap();
                batches
                    .iter()
                    .flat_map(|b| {
                        let column = arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
                        column
                            .as_any()
                            .downcast_ref::<StringArray>()
                            .unwrap()
                            .iter()
                            .map(|v| v.unwrap().to_string())
                            .collect::<Vec<_>>()
                    })
                    .collect::<Vec<String>>()
            }
        };
        let rows = ids("patients").await;
        let mut sorted = rows.clone();
        sorted.sort();
        assert_eq!(rows, sorted, "the rows come in patient order");
        assert_eq!(rows.len(), 500);
        let without = ids("opted_out").await;
        assert_eq!(without.len(), 499, "the opt-out still applies to the copy");
        assert!(!without.contains(&"p7".to_string()));
        // A restart over the same files reuses the copy; changed files get a new one and
        // the old is removed.
        cluster_now().await;
        assert_eq!(listing(), first);
        std::thread::sleep(std::time::Duration::from_millis(20));
        write_parquet(&data, 300);
        let tables = cluster_now().await;
        let second = listing();
        assert_eq!(second.len(), 1, "{second:?}");
        assert_ne!(second, first);
        let served = SessionContext::new();
        served
            .register_table("patients", tables[0].1.clone())
            .unwrap();
        let count = served
            .sql("SELECT COUNT(*) FROM patients")
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        assert_eq!(
            count[0]
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .unwrap()
                .value(0),
            300
        );
    }

    /// The row count of `table`, or the typed error of the query.
    async fn count(ctx: &SessionContext, table: &str) -> Result<usize, TallyError> {
        let batches = async {
            ctx.sql(&format!("SELECT * FROM {table}"))
                .await?
                .collect()
                .await
        }
        .await
        .map_err(|err| find_tally_error(&err).expect("a typed error"))?;
        Ok(batches.iter().map(|b| b.num_rows()).sum())
    }

    fn assert_unavailable(result: Result<usize, TallyError>, dir: &Path) {
        let err = result.expect_err("the query fails");
        assert_eq!(err.code, ErrorCode::Execution, "{err}");
        assert!(err.message.contains("table 'patients'"), "{err}");
        let text = err.to_string();
        let dir = dir.to_string_lossy();
        let leaks = [dir.as_ref(), ".parquet", "Parquet", "/"];
        for leak in leaks {
            assert!(!text.contains(leak), "{text} shows {leak}");
        }
    }

    #[tokio::test]
    async fn start_up_refuses_empty_unreadable_or_missing_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let empty = dir.path().join("empty.parquet");
        File::create(&empty).expect("create");
        let err = start_up_error(&empty).await;
        assert!(err.contains("empty (0 bytes)"), "{err}");

        let folder = dir.path().join("folder");
        std::fs::create_dir_all(folder.join("part=1")).expect("folder");
        let err = start_up_error(&folder).await;
        assert!(err.contains("holds no .parquet files"), "{err}");
        write_parquet(&folder.join("a.parquet"), 3);
        File::create(folder.join("part=1").join("b.parquet")).expect("create");
        let err = start_up_error(&folder).await;
        assert!(err.contains("b.parquet is empty"), "{err}");

        let garbage = dir.path().join("garbage.parquet");
        std::fs::write(&garbage, b"not a parquet file").expect("write");
        let err = start_up_error(&garbage).await;
        assert!(err.contains("could not be read"), "{err}");

        let err = start_up_error(&dir.path().join("missing.parquet")).await;
        assert!(err.contains("does not exist"), "{err}");
    }

    #[tokio::test]
    async fn a_changed_file_fails_every_scan_with_a_typed_error() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("patients.parquet");
        write_parquet(&path, 3);
        let ctx = serve(&path).await;
        assert_eq!(count(&ctx, "patients").await, Ok(3));
        assert_eq!(count(&ctx, "opted_out").await, Ok(2));
        let original = std::fs::read(&path).expect("read");
        let modified = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .expect("mtime");

        // Truncated to nothing while the node runs: no silent empty answer.
        File::create(&path).expect("truncate");
        assert_unavailable(count(&ctx, "patients").await, dir.path());
        assert_unavailable(count(&ctx, "opted_out").await, dir.path());

        // The same bytes written back with a new modification time are still a change.
        std::fs::write(&path, &original).expect("restore");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(modified + std::time::Duration::from_secs(5)))
            .expect("touch");
        assert_unavailable(count(&ctx, "patients").await, dir.path());

        // Different data of another size.
        write_parquet(&path, 5);
        assert_unavailable(count(&ctx, "patients").await, dir.path());

        // Exactly as at start-up again: answered.
        std::fs::write(&path, &original).expect("restore");
        File::options()
            .write(true)
            .open(&path)
            .and_then(|f| f.set_modified(modified))
            .expect("touch");
        assert_eq!(count(&ctx, "patients").await, Ok(3));

        std::fs::remove_file(&path).expect("remove");
        assert_unavailable(count(&ctx, "patients").await, dir.path());
    }

    #[tokio::test]
    async fn a_file_added_to_or_removed_from_a_folder_fails_the_scan() {
        let dir = tempfile::tempdir().expect("tempdir");
        let folder = dir.path().join("patients");
        std::fs::create_dir(&folder).expect("folder");
        write_parquet(&folder.join("a.parquet"), 3);
        write_parquet(&folder.join("b.parquet"), 4);
        let ctx = serve(&folder).await;
        assert_eq!(count(&ctx, "patients").await, Ok(7));

        // A file the listing does not read (another extension) changes nothing.
        std::fs::write(folder.join("_SUCCESS"), b"").expect("marker");
        assert_eq!(count(&ctx, "patients").await, Ok(7));

        write_parquet(&folder.join("c.parquet"), 1);
        assert_unavailable(count(&ctx, "patients").await, dir.path());
        std::fs::remove_file(folder.join("c.parquet")).expect("remove");
        assert_eq!(count(&ctx, "patients").await, Ok(7));

        std::fs::remove_file(folder.join("b.parquet")).expect("remove");
        assert_unavailable(count(&ctx, "opted_out").await, dir.path());
    }

    #[test]
    fn file_stamps_name_the_changed_file_for_the_log() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("t.csv");
        std::fs::write(&path, "a\n1\n").expect("write");
        let files = TableFiles::take("t", &path, TableFormat::Csv).expect("taken");
        assert_eq!(files.verify(), Ok(()));
        std::fs::write(&path, "a\n1\n2\n").expect("write");
        let change = files.verify().expect_err("changed");
        assert!(change.contains("t.csv"), "{change}");
    }
}
