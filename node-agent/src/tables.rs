//! The trust's local tables: Parquet or CSV files (or folders of them), each served with an
//! extra `trust_code` column holding the trust's code.

use std::path::Path;
use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::{Column, Result, ScalarValue};
use datafusion::datasource::TableType;
use datafusion::logical_expr::{Expr, TableProviderFilterPushDown};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_expr::expressions::{Column as ColumnExpr, Literal, in_list};
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::prelude::{CsvReadOptions, ParquetReadOptions, SessionContext};

use crate::config::{TableConfig, TableFormat};
use crate::error::NodeError;

/// Name of the column every federated table gains.
pub const TRUST_CODE_COLUMN: &str = "trust_code";

/// Opens every configured table and wraps it with its `trust_code` column.
pub async fn open_tables(
    ctx: &SessionContext,
    tables: &[TableConfig],
    trust_code: &str,
) -> Result<Vec<(String, Arc<TrustTable>)>, NodeError> {
    let mut opened = Vec::new();
    for table in tables {
        let raw = load_table(ctx, &table.name, &table.path, table.format()).await?;
        if raw.schema().field_with_name(TRUST_CODE_COLUMN).is_ok() {
            return Err(NodeError::Table {
                table: table.name.clone(),
                reason: format!(
                    "its files already have a '{TRUST_CODE_COLUMN}' column, which the node adds itself"
                ),
            });
        }
        opened.push((
            table.name.clone(),
            Arc::new(TrustTable::new(raw, trust_code)),
        ));
    }
    Ok(opened)
}

/// Opens the files of one table (inferring their schema) without registering it.
pub async fn load_table(
    ctx: &SessionContext,
    name: &str,
    path: &Path,
    format: TableFormat,
) -> Result<Arc<dyn TableProvider>, NodeError> {
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
    provider.ok_or_else(|| fail("table vanished while loading".into()))
}

/// People whose rows a table hides: the National Data Opt-out, as person ids.
#[derive(Debug)]
pub struct Excluded {
    /// Column holding the person id.
    pub column: String,
    /// Person ids to hide.
    pub people: Vec<String>,
}

/// A table with a constant `trust_code` column appended, optionally hiding opted-out people.
#[derive(Debug)]
pub struct TrustTable {
    inner: Arc<dyn TableProvider>,
    schema: SchemaRef,
    trust_code: String,
    excluded: Option<Arc<Excluded>>,
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
            excluded: None,
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
