//! The trust's local tables: Parquet or CSV files (or folders of them), each served with an
//! extra `trust_code` column holding the trust's code.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column as ColumnExpr, Literal};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::config::{TableConfig, TableFormat};
use crate::error::NodeError;

/// Name of the column every federated table gains.
pub const TRUST_CODE_COLUMN: &str = "trust_code";

/// Registers every configured table in `ctx`, wrapped with its `trust_code` column.
pub async fn register_tables(
    ctx: &SessionContext,
    tables: &[TableConfig],
    trust_code: &str,
) -> Result<(), NodeError> {
    for table in tables {
        let raw = load_table(ctx, table).await?;
        if raw.schema().field_with_name(TRUST_CODE_COLUMN).is_ok() {
            return Err(NodeError::Table {
                table: table.name.clone(),
                reason: format!(
                    "its files already have a '{TRUST_CODE_COLUMN}' column, which the node adds itself"
                ),
            });
        }
        let wrapped = TrustTable::new(raw, trust_code);
        ctx.register_table(table.name.as_str(), Arc::new(wrapped))
            .map_err(|e| NodeError::Table {
                table: table.name.clone(),
                reason: e.to_string(),
            })?;
    }
    Ok(())
}

/// Opens the files of one table (inferring their schema) without registering it.
async fn load_table(
    ctx: &SessionContext,
    table: &TableConfig,
) -> Result<Arc<dyn TableProvider>, NodeError> {
    let path = table.path.to_str().ok_or_else(|| NodeError::Table {
        table: table.name.clone(),
        reason: "the path is not valid UTF-8".into(),
    })?;
    if !table.path.exists() {
        return Err(NodeError::Table {
            table: table.name.clone(),
            reason: format!("{} does not exist", table.path.display()),
        });
    }
    let staging = format!("__tally_loading_{}", table.name);
    let loaded = match table.format() {
        TableFormat::Parquet => {
            ctx.register_parquet(&staging, path, ParquetReadOptions::default())
                .await
        }
        TableFormat::Csv => {
            ctx.register_csv(&staging, path, CsvReadOptions::new().has_header(true))
                .await
        }
    };
    let fail = |e: datafusion::error::DataFusionError| NodeError::Table {
        table: table.name.clone(),
        reason: format!(
            "{} could not be read: {}",
            table.path.display(),
            e.message()
        ),
    };
    loaded.map_err(fail)?;
    let provider = ctx.deregister_table(&staging).map_err(fail)?;
    provider.ok_or_else(|| NodeError::Table {
        table: table.name.clone(),
        reason: "table vanished while loading".into(),
    })
}

/// A table with a constant `trust_code` column appended.
#[derive(Debug)]
pub struct TrustTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    trust_code: String,
}

impl TrustTable {
    /// Wraps `inner`, appending `trust_code` to its schema.
    pub fn new(inner: Arc<dyn TableProvider>, trust_code: &str) -> Self {
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
        }
    }

    fn trust_code_index(&self) -> usize {
        self.schema.fields().len() - 1
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
        let code_index = self.trust_code_index();
        let wanted: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..=code_index).collect(),
        };
        let inner_projection: Vec<usize> = wanted
            .iter()
            .copied()
            .filter(|&i| i != code_index)
            .collect();
        let inner_filters: Vec<Expr> = filters
            .iter()
            .filter(|f| !mentions_trust_code(f))
            .cloned()
            .collect();
        let input = self
            .inner
            .scan(state, Some(&inner_projection), &inner_filters, limit)
            .await?;
        let inner_schema = input.schema();
        let mut position = 0;
        let exprs: Vec<(Arc<dyn PhysicalExpr>, String)> = wanted
            .iter()
            .map(|&i| {
                let name = self.schema.field(i).name().clone();
                if i == code_index {
                    let value = ScalarValue::Utf8(Some(self.trust_code.clone()));
                    (Arc::new(Literal::new(value)) as Arc<dyn PhysicalExpr>, name)
                } else {
                    let column = ColumnExpr::new(inner_schema.field(position).name(), position);
                    position += 1;
                    (Arc::new(column) as Arc<dyn PhysicalExpr>, name)
                }
            })
            .collect();
        Ok(Arc::new(ProjectionExec::try_new(exprs, input)?))
    }
}
