//! The National Data Opt-out: the trust's list of opted-out NHS numbers, turned into the
//! person ids whose rows are hidden when a query's purpose requires it.

use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema};
use datafusion::catalog::TableProvider;
use datafusion::prelude::SessionContext;

use crate::config::{OptOutConfig, TableFormat};
use crate::error::NodeError;
use crate::postgres::{PgDatabase, quote_identifier};
use crate::tables::{DatabaseOptOut, Excluded, TrustTable, load_table};

const OPT_OUT_TABLE: &str = "__tally_opt_outs";

/// Reads the opt-out list and finds the matching person ids in the patients table
/// (registered in `ctx`).
pub async fn load(ctx: &SessionContext, config: &OptOutConfig) -> Result<Excluded, NodeError> {
    let format = TableFormat::of_path(&config.path);
    let fail = |reason: String| NodeError::Table {
        table: "opt_out".into(),
        reason,
    };
    let list = load_table(ctx, OPT_OUT_TABLE, &config.path, format).await?;
    let patients = ctx
        .table_provider(config.patients_table.as_str())
        .await
        .map_err(|e| fail(e.message().to_string()))?;
    let (batches, in_database) = match patients
        .downcast_ref::<TrustTable>()
        .and_then(TrustTable::postgres)
    {
        Some((database, relation)) => {
            let numbers = numbers(ctx, list).await.map_err(fail)?;
            let batches = matched_in_database(config, database, &relation.quoted, &numbers)
                .await
                .map_err(fail)?;
            let matched = DatabaseOptOut {
                patients: relation.quoted.clone(),
                key: quote_identifier(&config.patient_key),
                numbers,
            };
            (batches, Some(matched))
        }
        None => (in_files(ctx, list, config).await.map_err(fail)?, None),
    };
    let mut people = Vec::new();
    for batch in batches {
        let ids = cast(batch.column(0), &DataType::Utf8).map_err(|e| fail(e.to_string()))?;
        let ids = ids.as_string::<i32>();
        people.extend(
            (0..ids.len())
                .filter(|&i| ids.is_valid(i))
                .map(|i| ids.value(i).to_string()),
        );
    }
    people.sort();
    Ok(Excluded {
        column: config.person_column.clone(),
        people,
        in_database,
    })
}

/// The opted-out person ids, matched by DataFusion against a patients table read from files.
async fn in_files(
    ctx: &SessionContext,
    list: Arc<dyn TableProvider>,
    config: &OptOutConfig,
) -> Result<Vec<RecordBatch>, String> {
    ctx.register_table(OPT_OUT_TABLE, list)
        .map_err(|e| e.to_string())?;
    let sql = format!(
        "SELECT DISTINCT p.{person} FROM {patients} p JOIN {OPT_OUT_TABLE} o ON CAST(p.{key} AS VARCHAR) = CAST(o.nhs_number AS VARCHAR)",
        person = config.person_column,
        patients = config.patients_table,
        key = config.patient_key,
    );
    let batches = async { ctx.sql(&sql).await?.collect().await }
        .await
        .map_err(|e| {
            format!(
                "the opt-out list could not be matched to patients: {}",
                e.message()
            )
        });
    let _ = ctx.deregister_table(OPT_OUT_TABLE);
    batches
}

/// The opt-out list's values (NHS numbers), as text.
async fn numbers(
    ctx: &SessionContext,
    list: Arc<dyn TableProvider>,
) -> Result<Vec<String>, String> {
    let batches = ctx
        .read_table(list)
        .and_then(|frame| frame.select_columns(&["nhs_number"]))
        .map_err(|e| e.message().to_string())?
        .collect()
        .await
        .map_err(|e| format!("the opt-out list could not be read: {}", e.message()))?;
    let mut numbers: Vec<String> = Vec::new();
    for batch in &batches {
        let column = cast(batch.column(0), &DataType::Utf8).map_err(|e| e.to_string())?;
        let column = column.as_string::<i32>();
        numbers.extend(column.iter().flatten().map(str::to_string));
    }
    Ok(numbers)
}

/// The opted-out person ids, matched inside the trust's database (which returns only
/// theirs, never the patients table).
async fn matched_in_database(
    config: &OptOutConfig,
    database: &PgDatabase,
    patients: &str,
    numbers: &Vec<String>,
) -> Result<Vec<RecordBatch>, String> {
    let sql = format!(
        "SELECT DISTINCT CAST({person} AS text) FROM {patients} \
         WHERE CAST({key} AS text) = ANY($1::text[])",
        person = quote_identifier(&config.person_column),
        key = quote_identifier(&config.patient_key),
    );
    let schema = Arc::new(Schema::new(vec![Field::new(
        "person",
        DataType::Utf8,
        true,
    )]));
    let mut batches = Vec::new();
    database
        .read(&sql, &[numbers], &schema, "opt-out", |batch| {
            batches.push(batch);
            Ok(())
        })
        .await
        .map_err(|e| format!("the opt-out list could not be matched to patients: {e}"))?;
    Ok(batches)
}
