//! The National Data Opt-out: the trust's list of opted-out NHS numbers, turned into the
//! person ids whose rows are hidden when a query's purpose requires it.

use arrow::array::{Array, AsArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;
use datafusion::prelude::SessionContext;

use crate::config::{OptOutConfig, TableFormat};
use crate::error::NodeError;
use crate::tables::{Excluded, load_table};

const OPT_OUT_TABLE: &str = "__tally_opt_outs";

/// Reads the opt-out list and finds the matching person ids in the patients table
/// (registered in `ctx`).
pub async fn load(ctx: &SessionContext, config: &OptOutConfig) -> Result<Excluded, NodeError> {
    let format = match config.path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("csv") => TableFormat::Csv,
        _ => TableFormat::Parquet,
    };
    let fail = |reason: String| NodeError::Table {
        table: "opt_out".into(),
        reason,
    };
    let list = load_table(ctx, OPT_OUT_TABLE, &config.path, format).await?;
    ctx.register_table(OPT_OUT_TABLE, list)
        .map_err(|e| fail(e.to_string()))?;
    let sql = format!(
        "SELECT DISTINCT p.{person} FROM {patients} p JOIN {OPT_OUT_TABLE} o ON CAST(p.nhs_number AS VARCHAR) = CAST(o.nhs_number AS VARCHAR)",
        person = config.person_column,
        patients = config.patients_table,
    );
    let batches = async { ctx.sql(&sql).await?.collect().await }
        .await
        .map_err(|e| {
            fail(format!(
                "the opt-out list could not be matched to patients: {}",
                e.message()
            ))
        });
    let _ = ctx.deregister_table(OPT_OUT_TABLE);
    let mut people = Vec::new();
    for batch in batches? {
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
    })
}
