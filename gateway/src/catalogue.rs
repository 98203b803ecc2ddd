//! The federated catalogue, learnt from the nodes' Flight SQL metadata (`GetTables` with
//! schemas). A table present at several trusts is one federated table; a schema that differs
//! between trusts makes the table unusable with an error naming the trust and column; a node
//! that is down is marked unavailable and asked again later.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use arrow::datatypes::{Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{SchemaProvider, Session, TableProvider};
use datafusion::common::Result;
use datafusion::datasource::TableType;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::Expr;
use datafusion::physical_plan::ExecutionPlan;
use tally_common::flight::TableInfo;
use tally_common::{ErrorCode, TallyError};

use crate::trusts::Trust;

/// One federated table.
#[derive(Debug, Clone)]
pub struct FederatedTable {
    /// Table name.
    pub name: String,
    /// The schema all trusts agree on.
    pub schema: SchemaRef,
    /// Codes of the trusts that hold it, in configuration order.
    pub trusts: Vec<String>,
    /// Why the table cannot be used, when the trusts disagree on its schema.
    pub mismatch: Option<TallyError>,
}

/// Whether a trust answered its last catalogue request.
#[derive(Debug, Clone)]
pub enum TrustStatus {
    /// The trust answered, with these tables.
    Available(Vec<TableInfo>),
    /// The trust could not be asked; the error says why.
    Unavailable(TallyError),
}

/// A consistent view of the catalogue.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// Status per trust code, in configuration order.
    pub trusts: Vec<(String, TrustStatus)>,
    /// Federated tables by lower-case name.
    pub tables: BTreeMap<String, FederatedTable>,
}

impl Snapshot {
    fn build(trusts: Vec<(String, TrustStatus)>) -> Self {
        let mut tables: BTreeMap<String, FederatedTable> = BTreeMap::new();
        for (code, status) in &trusts {
            let TrustStatus::Available(infos) = status else {
                continue;
            };
            for info in infos {
                let key = info.name.to_lowercase();
                match tables.get_mut(&key) {
                    None => {
                        tables.insert(
                            key,
                            FederatedTable {
                                name: info.name.clone(),
                                schema: info.schema.clone(),
                                trusts: vec![code.clone()],
                                mismatch: None,
                            },
                        );
                    }
                    Some(table) => {
                        let first = table.trusts[0].clone();
                        match reconcile(&table.schema, &info.schema) {
                            Ok(schema) => table.schema = schema,
                            Err(detail) => {
                                table.mismatch.get_or_insert_with(|| {
                                    TallyError::new(
                                        ErrorCode::SchemaMismatch,
                                        format!(
                                            "table '{}' differs between trusts {first} and {code}: {detail}",
                                            table.name
                                        ),
                                    )
                                });
                            }
                        }
                        table.trusts.push(code.clone());
                    }
                }
            }
        }
        Snapshot { trusts, tables }
    }

    /// Trusts that could not be asked, with the reason.
    pub fn unavailable(&self) -> Vec<&TallyError> {
        self.trusts
            .iter()
            .filter_map(|(_, status)| match status {
                TrustStatus::Unavailable(err) => Some(err),
                TrustStatus::Available(_) => None,
            })
            .collect()
    }

    /// The tables analysts can query: consistent ones only.
    pub fn table_infos(&self) -> Vec<TableInfo> {
        self.tables
            .values()
            .filter(|t| t.mismatch.is_none())
            .map(|t| TableInfo {
                name: t.name.clone(),
                schema: t.schema.clone(),
            })
            .collect()
    }
}

/// Two schemas agree when they have the same columns, in the same order, of the same types;
/// the result is nullable wherever either side is.
fn reconcile(known: &Schema, other: &Schema) -> Result<SchemaRef, String> {
    for field in other.fields() {
        if known.field_with_name(field.name()).is_err() {
            return Err(format!(
                "column '{}' exists only at the second",
                field.name()
            ));
        }
    }
    let mut fields = Vec::with_capacity(known.fields().len());
    for (index, field) in known.fields().iter().enumerate() {
        let Ok(theirs) = other.field_with_name(field.name()) else {
            return Err(format!(
                "column '{}' exists only at the first",
                field.name()
            ));
        };
        if theirs.data_type() != field.data_type() {
            return Err(format!(
                "column '{}' is {} at the first but {} at the second",
                field.name(),
                field.data_type(),
                theirs.data_type()
            ));
        }
        if other.index_of(field.name()).ok() != Some(index) {
            return Err(format!(
                "column '{}' is in a different position",
                field.name()
            ));
        }
        fields.push(Field::new(
            field.name(),
            field.data_type().clone(),
            field.is_nullable() || theirs.is_nullable(),
        ));
    }
    Ok(Arc::new(Schema::new(fields)))
}

/// The catalogue, refreshed from the trusts.
#[derive(Debug)]
pub struct Catalogue {
    trusts: Vec<Trust>,
    /// The newest view, with the number of the refresh that made it.
    snapshot: RwLock<(u64, Arc<Snapshot>)>,
    refreshes: std::sync::atomic::AtomicU64,
}

impl Catalogue {
    /// An empty catalogue over `trusts`; call [`Catalogue::refresh`] to fill it.
    pub fn new(trusts: Vec<Trust>) -> Self {
        Catalogue {
            trusts,
            snapshot: RwLock::new((0, Arc::new(Snapshot::default()))),
            refreshes: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The trusts, in configuration order.
    pub fn trusts(&self) -> &[Trust] {
        &self.trusts
    }

    /// The current view.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.snapshot
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .1
            .clone()
    }

    /// Asks every trust (all at once) for its tables and replaces the view, unless a
    /// refresh that started later has already replaced it (trusts come and go while one
    /// runs); returns the newest view.
    pub async fn refresh(&self) -> Arc<Snapshot> {
        let number = 1 + self
            .refreshes
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let answers = futures::future::join_all(self.trusts.iter().map(|trust| async move {
            let status = match trust.tables().await {
                Ok(tables) => TrustStatus::Available(tables),
                Err(err) => {
                    if trust.dials_in() {
                        tracing::info!(trust = %trust.code, error = %err, "trust not connected");
                    } else {
                        tracing::warn!(trust = %trust.code, error = %err, "trust unavailable");
                    }
                    TrustStatus::Unavailable(TallyError::new(
                        ErrorCode::TrustUnavailable,
                        format!(
                            "trust {} ({}) is unavailable: {}",
                            trust.code, trust.name, err.message
                        ),
                    ))
                }
            };
            (trust.code.clone(), status)
        }))
        .await;
        let snapshot = Arc::new(Snapshot::build(answers));
        for table in snapshot.tables.values() {
            if let Some(err) = &table.mismatch {
                tracing::error!(error = %err, "schema mismatch");
            }
        }
        let mut newest = self.snapshot.write().unwrap_or_else(|p| p.into_inner());
        if number > newest.0 {
            *newest = (number, snapshot);
        }
        newest.1.clone()
    }

    /// Waits up to `timeout` until every trust is available, asking again those that are
    /// not every 50 ms; returns whether they all are.
    pub async fn wait_until_complete(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let snapshot = self.refresh_if_incomplete().await;
            if snapshot.unavailable().is_empty() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Refreshes only if some trust is marked unavailable; returns the current view.
    pub async fn refresh_if_incomplete(&self) -> Arc<Snapshot> {
        let snapshot = self.snapshot();
        if snapshot.unavailable().is_empty() && !snapshot.trusts.is_empty() {
            snapshot
        } else {
            self.refresh().await
        }
    }
}

/// Exposes the catalogue's tables to DataFusion's planner. Their scans refuse to run: a
/// federated table is only ever read by the trusts, beneath an aggregate.
#[derive(Debug)]
pub struct CatalogueSchema {
    catalogue: Arc<Catalogue>,
}

impl CatalogueSchema {
    /// The schema provider over `catalogue`.
    pub fn new(catalogue: Arc<Catalogue>) -> Self {
        CatalogueSchema { catalogue }
    }
}

#[async_trait]
impl SchemaProvider for CatalogueSchema {
    fn table_names(&self) -> Vec<String> {
        self.catalogue
            .snapshot()
            .tables
            .values()
            .map(|t| t.name.clone())
            .collect()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let snapshot = self.catalogue.snapshot();
        let Some(table) = snapshot.tables.get(&name.to_lowercase()) else {
            return Ok(None);
        };
        if let Some(err) = &table.mismatch {
            return Err(err.clone().into_datafusion());
        }
        Ok(Some(Arc::new(FederatedTableProvider {
            table: table.clone(),
        })))
    }

    fn table_exist(&self, name: &str) -> bool {
        self.catalogue
            .snapshot()
            .tables
            .contains_key(&name.to_lowercase())
    }
}

/// A federated table as the gateway's planner sees it: a schema, and a scan that refuses.
#[derive(Debug)]
pub struct FederatedTableProvider {
    /// The table.
    pub table: FederatedTable,
}

#[async_trait]
impl TableProvider for FederatedTableProvider {
    fn schema(&self) -> SchemaRef {
        self.table.schema.clone()
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
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Err(DataFusionError::External(Box::new(TallyError::new(
            ErrorCode::NotAggregate,
            format!("rows of '{}' never leave the trusts", self.table.name),
        ))))
    }
}
