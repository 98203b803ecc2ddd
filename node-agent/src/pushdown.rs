//! Pushing a release whose fact table lives in the trust's PostgreSQL database into that
//! database, as one query the node writes itself from the model (never analyst text).
//!
//! Without noise the query is the release's aggregate: PostgreSQL returns one row per
//! group. Under a noise policy it returns, in patient order, one row per patient and group:
//! that patient's rows there and, per measured column, how many values, their sum and the
//! sum of their squares, each value clamped, scaled and rounded as the node does it for
//! files. The node then bounds each patient's contribution exactly as for files
//! ([`BoundedTotals::add_totals`]) before adding noise.
//!
//! The SQL keeps DataFusion's meaning: text compares byte by byte (`COLLATE "C"`), the
//! generalisers are written out to match [`tally_common::generalise`], constants are typed
//! as the node types them for files, and floating-point sums are summed as `double
//! precision`. Constants are written as SQL literals (text quoted, numbers formatted by
//! Rust); the opt-out list is the one bound parameter.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::record_batch::RecordBatch;
use datafusion::common::{Result as DfResult, ScalarValue};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::prelude::SessionContext;
use tally_common::generalise::UNKNOWN;
use tally_common::governance::{Governance, Relationship};
use tally_common::model::{
    ColumnRef, Dimension, Generaliser, Partial, Predicate, ReleaseQuery, group_column,
    partial_column,
};
use tally_common::{ErrorCode, TallyError};
use tally_kernels::bounding::{BoundedTotals, Bounding};
use tokio_postgres::types::ToSql;

use crate::postgres::{PgDatabase, quote_identifier, quote_text};
use crate::release::{
    Aggregation, ReleasePlan, bounding_of, dimension_type, literal_value, needs_cut,
};
use crate::tables::{TRUST_CODE_COLUMN, TrustTable};

fn column_ref(table: &str, column: &str) -> ColumnRef {
    ColumnRef {
        table: table.to_string(),
        column: column.to_string(),
    }
}

fn bad(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::BadRequest, message)
}

/// A release as one query of the trust's database.
pub struct PushedRelease {
    database: Arc<PgDatabase>,
    sql: String,
    /// The opted-out people, when the query hides their rows.
    opted_out: Option<Vec<String>>,
    /// The query's rows: the partial schema, or the bounded input.
    rows: SchemaRef,
    /// The bounds, for a bounded release.
    bounding: Option<Bounding>,
}

impl PushedRelease {
    /// Runs the query: the partial rows as they come, or their bounded totals (held within
    /// `ctx`'s memory limit).
    pub async fn run(mut self, ctx: &SessionContext) -> DfResult<Vec<RecordBatch>> {
        match self.bounding.take() {
            None => {
                let mut batches = Vec::new();
                self.read(|batch| {
                    batches.push(batch);
                    Ok(())
                })
                .await?;
                Ok(batches)
            }
            Some(bounding) => {
                let mut totals = BoundedTotals::of_totals(bounding, &self.rows)?;
                let task = ctx.task_ctx();
                let memory =
                    MemoryConsumer::new("bounded release totals").register(task.memory_pool());
                self.read(|batch| {
                    totals.add_totals(&batch)?;
                    memory.try_resize(totals.size())
                })
                .await?;
                Ok(vec![totals.finish()?])
            }
        }
    }

    /// Runs the query, handing its rows to `each` as batches.
    async fn read(&self, each: impl FnMut(RecordBatch) -> DfResult<()>) -> DfResult<()> {
        let people;
        let params: Vec<&(dyn ToSql + Sync)> = match &self.opted_out {
            Some(list) => {
                people = list;
                vec![people]
            }
            None => Vec::new(),
        };
        tracing::debug!(sql = %self.sql, "a release sent to the trust's database");
        self.database
            .read(&self.sql, &params, &self.rows, "release", each)
            .await
            .map_err(TallyError::into_datafusion)
    }
}

/// The tables of a release pushed into the database: each served name with its table.
struct Tables {
    trust_code: String,
    by_name: Vec<(String, Arc<dyn datafusion::catalog::TableProvider>)>,
}

impl Tables {
    fn table(&self, name: &str) -> Result<&TrustTable, TallyError> {
        self.by_name
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, p)| p.downcast_ref::<TrustTable>())
            .ok_or_else(|| bad(format!("'{name}' is not a table of this release")))
    }

    /// The type of `column` at this trust.
    fn column_type(&self, column: &ColumnRef) -> Option<DataType> {
        let table = self.table(&column.table).ok()?;
        let schema = datafusion::catalog::TableProvider::schema(table);
        schema
            .field_with_name(&column.column)
            .ok()
            .map(|f| f.data_type().clone())
    }

    /// `column` as SQL: the qualified column, or the trust's code for `trust_code`.
    fn column_sql(&self, column: &ColumnRef) -> String {
        if column.column == TRUST_CODE_COLUMN {
            // Typed, so it may be grouped by (PostgreSQL refuses a bare constant there).
            return format!("CAST({} AS text)", quote_text(&self.trust_code));
        }
        format!(
            "{}.{}",
            quote_identifier(&column.table),
            quote_identifier(&column.column)
        )
    }

    /// A dimension as SQL, text compared byte by byte as DataFusion compares it.
    fn dimension_sql(&self, dimension: &Dimension) -> Result<String, TallyError> {
        // A generalised column must be served too (the generaliser's output type alone
        // would not show it is missing).
        let bare_type = self.column_type(&dimension.column).ok_or_else(|| {
            TallyError::new(
                ErrorCode::UnknownColumn,
                format!("this trust has no column {}", dimension.to_sql()),
            )
        })?;
        let bare = self.column_sql(&dimension.column);
        let sql = match dimension.generaliser {
            None => bare,
            Some(generaliser) => generalised(generaliser, &bare, &bare_type),
        };
        let data_type = dimension_type(dimension, &|c| self.column_type(c))?;
        Ok(if data_type.is_string() {
            format!("({sql} COLLATE \"C\")")
        } else {
            sql
        })
    }

    fn predicate_sql(&self, predicate: &Predicate) -> Result<String, TallyError> {
        let typed = |on: &Dimension| -> Result<(String, DataType), TallyError> {
            Ok((
                self.dimension_sql(on)?,
                dimension_type(on, &|c| self.column_type(c))?,
            ))
        };
        let constant = |value, data_type: &DataType, on: &Dimension| {
            sql_literal(&literal_value(value, data_type, on)?)
        };
        let not = |negated: bool| if negated { "NOT " } else { "" };
        Ok(match predicate {
            Predicate::And { all } => self.joined(all, " AND ")?,
            Predicate::Or { any } => self.joined(any, " OR ")?,
            Predicate::Not { not } => format!("(NOT {})", self.predicate_sql(not)?),
            Predicate::Compare { on, cmp, value } => {
                let (sql, data_type) = typed(on)?;
                format!(
                    "({sql} {} {})",
                    cmp.symbol(),
                    constant(value, &data_type, on)?
                )
            }
            Predicate::InList {
                on,
                values,
                negated,
            } => {
                let (sql, data_type) = typed(on)?;
                if values.is_empty() {
                    // `x IN ()`: false, or NULL for a NULL value, as DataFusion has it.
                    let empty = if *negated { "TRUE" } else { "FALSE" };
                    format!("(CASE WHEN {sql} IS NULL THEN NULL ELSE {empty} END)")
                } else {
                    let list = values
                        .iter()
                        .map(|v| constant(v, &data_type, on))
                        .collect::<Result<Vec<_>, _>>()?;
                    format!("({sql} {}IN ({}))", not(*negated), list.join(", "))
                }
            }
            Predicate::Between {
                on,
                low,
                high,
                negated,
            } => {
                let (sql, data_type) = typed(on)?;
                format!(
                    "({sql} {}BETWEEN {} AND {})",
                    not(*negated),
                    constant(low, &data_type, on)?,
                    constant(high, &data_type, on)?
                )
            }
            Predicate::IsNull { on, negated } => {
                let (sql, _) = typed(on)?;
                format!("({sql} IS {}NULL)", not(*negated))
            }
            Predicate::Prefix {
                on,
                prefix,
                negated,
            } => {
                let (sql, data_type) = typed(on)?;
                if !data_type.is_string() {
                    return Err(bad(format!("{} is not text", on.to_sql())));
                }
                format!(
                    "({}starts_with({sql}, {}))",
                    not(*negated),
                    sql_text(prefix)?
                )
            }
        })
    }

    fn joined(&self, operands: &[Predicate], separator: &str) -> Result<String, TallyError> {
        if operands.is_empty() {
            return Err(bad("an AND or OR with no operands"));
        }
        let parts = operands
            .iter()
            .map(|p| self.predicate_sql(p))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(format!("({})", parts.join(separator)))
    }
}

/// `generaliser` applied to the SQL expression `bare` (of type `bare_type` at this trust),
/// with the meaning of its DataFusion function (see [`tally_common::generalise`]): the
/// argument cast to the function's input type as Arrow casts it, NULL for NULL.
fn generalised(generaliser: Generaliser, bare: &str, bare_type: &DataType) -> String {
    let unknown = quote_text(UNKNOWN);
    match generaliser {
        Generaliser::AgeBand => {
            // Arrow truncates a fractional age, where PostgreSQL's cast would round it; a
            // value no bigint holds (NaN, huge) is NULL rather than an error.
            let age = if bare_type.is_integer() {
                format!("CAST({bare} AS bigint)")
            } else {
                format!(
                    "(CASE WHEN CAST({bare} AS double precision) \
                     BETWEEN -9.2e18 AND 9.2e18 THEN CAST(trunc({bare}) AS bigint) END)"
                )
            };
            format!(
                "(CASE WHEN {age} < 0 THEN {unknown} WHEN {age} >= 90 THEN '90+' \
                 ELSE CAST({age} / 5 * 5 AS text) || '-' || CAST({age} / 5 * 5 + 4 AS text) END)"
            )
        }
        Generaliser::Month => {
            let date = finite_date(bare);
            format!("({date} - CAST(EXTRACT(DAY FROM {date}) AS integer) + 1)")
        }
        Generaliser::Year => {
            format!("CAST(EXTRACT(YEAR FROM {}) AS integer)", finite_date(bare))
        }
        Generaliser::PostcodeDistrict => {
            // The text trimmed; its part before the first space or, without one, all but
            // the last three characters of a 5 to 7 character code; kept (upper-cased) if
            // shaped like an outward code.
            let text = format!("regexp_replace(CAST({bare} AS text), '^\\s+|\\s+$', '', 'g')");
            let outward = format!(
                "(CASE WHEN {text} ~ '\\s' THEN substring({text} FROM '^\\S*') \
                 WHEN char_length({text}) BETWEEN 5 AND 7 THEN left({text}, char_length({text}) - 3) \
                 ELSE {text} END)"
            );
            format!(
                "(CASE WHEN {bare} IS NULL THEN NULL \
                 WHEN {outward} ~ '^[A-Za-z][A-Za-z0-9]{{1,3}}$' AND {outward} ~ '[0-9]' \
                 THEN upper({outward} COLLATE \"C\") ELSE {unknown} END)"
            )
        }
    }
}

/// `bare` as a date, NULL where PostgreSQL holds one no Arrow date can (`infinity`), so that
/// functions of it cannot fail on a row's value.
fn finite_date(bare: &str) -> String {
    format!("(CASE WHEN isfinite(CAST({bare} AS date)) THEN CAST({bare} AS date) END)")
}

/// A finite float as a `double precision` literal (Rust prints its shortest exact form).
fn float_sql(value: f64) -> String {
    format!("CAST('{value:?}' AS double precision)")
}

/// The `double precision` expression `value` rounded to a `bigint` as the node rounds a
/// fixed-point value: half away from zero (exact: a float's fractional part is exact).
fn rounded(value: &str) -> String {
    format!(
        "CAST(CASE WHEN {value} - trunc({value}) >= 0.5 THEN trunc({value}) + 1 \
         WHEN {value} - trunc({value}) <= -0.5 THEN trunc({value}) - 1 \
         ELSE trunc({value}) END AS bigint)"
    )
}

/// Text as a literal; refuses a NUL character, which PostgreSQL text cannot hold.
fn sql_text(text: &str) -> Result<String, TallyError> {
    if text.contains('\0') {
        return Err(bad("a text constant holds a NUL character"));
    }
    Ok(quote_text(text))
}

/// A typed constant (as [`literal_value`] makes it) as a SQL literal of the same type.
fn sql_literal(value: &ScalarValue) -> Result<String, TallyError> {
    let unsupported = || bad("a constant of this type cannot be sent to this trust's database");
    Ok(match value {
        ScalarValue::Utf8(Some(text))
        | ScalarValue::LargeUtf8(Some(text))
        | ScalarValue::Utf8View(Some(text)) => sql_text(text)?,
        ScalarValue::Int8(Some(v)) => format!("CAST({v} AS bigint)"),
        ScalarValue::Int16(Some(v)) => format!("CAST({v} AS bigint)"),
        ScalarValue::Int32(Some(v)) => format!("CAST({v} AS bigint)"),
        ScalarValue::Int64(Some(v)) => format!("CAST({v} AS bigint)"),
        ScalarValue::Float32(Some(v)) if v.is_finite() => float_sql(f64::from(*v)),
        ScalarValue::Float64(Some(v)) if v.is_finite() => float_sql(*v),
        ScalarValue::Decimal128(Some(_), _, _) => format!("CAST('{value}' AS numeric)"),
        ScalarValue::Date32(Some(_)) => format!("DATE '{value}'"),
        ScalarValue::Boolean(Some(v)) => if *v { "TRUE" } else { "FALSE" }.to_string(),
        // Everything else (NULLs, other widths and kinds) is refused.
        _ => return Err(unsupported()),
    })
}

/// The release as one query of the trust's database, when its fact table is there; `None`
/// when the fact table is served from files.
pub async fn plan(
    ctx: &SessionContext,
    governance: &Governance,
    release: &ReleaseQuery,
    aggregation: &Aggregation,
    unit: &str,
) -> Result<Option<(ReleasePlan, SchemaRef)>, TallyError> {
    let provider = |name: &str| {
        let name = name.to_string();
        async move {
            ctx.table_provider(name.as_str()).await.map_err(|_| {
                TallyError::new(
                    ErrorCode::UnknownTable,
                    format!("this trust has no table '{name}'"),
                )
            })
        }
    };
    let fact_provider = provider(&release.fact).await?;
    let Some(fact) = fact_provider.downcast_ref::<TrustTable>() else {
        return Ok(None);
    };
    let Some((database, relation)) = fact.postgres() else {
        return Ok(None);
    };
    let fact_table = governance
        .table(&release.fact)
        .ok_or_else(|| bad("the fact table is not in this trust's catalogue"))?;
    let mut tables = Tables {
        trust_code: fact.trust_code().to_string(),
        by_name: vec![(release.fact.clone(), fact_provider.clone())],
    };
    let mut from = format!("{} AS {}", relation.quoted, quote_identifier(&release.fact));
    for join in &release.joins {
        let relationship = fact_table
            .relationships
            .get(join)
            .ok_or_else(|| bad(format!("'{join}' is not a declared relationship here")))?;
        let joined = provider(join).await?;
        let in_database = joined
            .downcast_ref::<TrustTable>()
            .and_then(TrustTable::postgres);
        let Some((_, joined_relation)) = in_database else {
            return Err(TallyError::new(
                ErrorCode::Execution,
                format!(
                    "this trust serves '{}' from its database but '{join}' from files, and a \
                     release joining them is answered inside the database only",
                    release.fact
                ),
            ));
        };
        let on = match relationship {
            Relationship::ManyToOne { from: key, to } => format!(
                "{} = {}",
                tables.column_sql(&column_ref(&release.fact, key)),
                format_args!("{}.{}", quote_identifier(join), quote_identifier(to))
            ),
            Relationship::CodeRange {
                code,
                prefix,
                low,
                high,
            } => format!(
                "(substr({}, 1, {prefix}) COLLATE \"C\") BETWEEN {joined}.{} AND {joined}.{}",
                tables.column_sql(&column_ref(&release.fact, code)),
                quote_identifier(low),
                quote_identifier(high),
                joined = quote_identifier(join),
            ),
        };
        from.push_str(&format!(
            " JOIN {} AS {} ON {on}",
            joined_relation.quoted,
            quote_identifier(join)
        ));
        tables.by_name.push((join.clone(), joined));
    }
    let expected = release.partial_schema(|c| tables.column_type(c))?;
    let mut conditions = Vec::new();
    if let Some(filter) = &release.filter {
        conditions.push(tables.predicate_sql(filter)?);
    }
    // The opt-out hides a person's rows in every table that has their column (rows with no
    // person too, as `NOT IN` does for files). A patients table in the database is matched
    // with the list again now: its rows may have changed since the node started.
    let mut opted_out = None;
    for (name, _) in &tables.by_name {
        if let Some(excluded) = tables.table(name)?.excluded() {
            let column = tables.column_sql(&column_ref(name, &excluded.column));
            match &excluded.in_database {
                Some(list) => {
                    conditions.push(format!(
                        "({column} IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {patients} AS opted_out \
                         WHERE opted_out.{person} = {column} \
                         AND CAST(opted_out.{key} AS text) = ANY($1::text[])))",
                        patients = list.patients,
                        person = quote_identifier(&excluded.column),
                        key = list.key,
                    ));
                    opted_out = Some(list.numbers.clone());
                }
                None => {
                    conditions.push(format!(
                        "({column} IS NOT NULL AND CAST({column} AS text) <> ALL($1::text[]))"
                    ));
                    opted_out = Some(excluded.people.clone());
                }
            }
        }
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!(" WHERE {}", conditions.join(" AND "))
    };
    let groups = release
        .group_by
        .iter()
        .map(|d| tables.dimension_sql(d))
        .collect::<Result<Vec<_>, _>>()?;
    let text = |sql: &str| format!("CAST({sql} AS text)");
    let partials = release.partials();
    let (sql, rows, bounding) = match aggregation {
        Aggregation::Exact => {
            let mut select: Vec<String> = groups.iter().map(|g| text(g)).collect();
            for partial in &partials {
                select.push(text(&exact_sql(&tables, partial)?));
            }
            let group_by = if groups.is_empty() {
                String::new()
            } else {
                format!(" GROUP BY {}", groups.join(", "))
            };
            let sql = format!("SELECT {} FROM {from}{filter}{group_by}", select.join(", "));
            (sql, expected.clone(), None)
        }
        Aggregation::Bounded { bounds, key } => {
            let group_types: Vec<DataType> = expected.fields()[..groups.len()]
                .iter()
                .map(|f| f.data_type().clone())
                .collect();
            let cut = needs_cut(governance, release, &group_types, *bounds)?;
            let (bounding, arguments) =
                bounding_of(governance, &partials, groups.len(), *bounds, cut, *key)?;
            let unit_column = column_ref(&release.fact, unit);
            let unit_type = tables
                .column_type(&unit_column)
                .ok_or_else(|| bad("the privacy unit is not a column here"))?;
            // Inside: each row's patient, groups and arguments (a summed argument clamped
            // and scaled to its fixed point, NaN as missing). Outside: their totals per
            // patient and group, each value rounded as the node rounds it.
            // A text patient id compared byte by byte, as the kernel compares it: one
            // patient's rows are one group, whatever the column's collation. (The ORDER BY
            // names the inner column: a bare `u` would be the output's text.)
            let unit_sql = tables.column_sql(&unit_column);
            let unit_sql = if unit_type.is_string() {
                format!("({unit_sql} COLLATE \"C\")")
            } else {
                unit_sql
            };
            let mut inner = vec![format!("{unit_sql} AS u")];
            inner.extend(
                groups
                    .iter()
                    .enumerate()
                    .map(|(i, g)| format!("{g} AS g{i}")),
            );
            let group_names: Vec<String> = (0..groups.len()).map(|i| format!("g{i}")).collect();
            let mut outer = vec![text("u")];
            outer.extend(group_names.iter().map(|g| text(g)));
            outer.push(text("COUNT(*)"));
            let mut fields = vec![Field::new("__tally_unit", unit_type.clone(), true)];
            for (i, group_type) in group_types.into_iter().enumerate() {
                fields.push(Field::new(group_column(i), group_type, true));
            }
            fields.push(Field::new("__tally_rows", DataType::Int64, true));
            let total = DataType::Decimal128(38, 0);
            for (i, (column, fixed)) in arguments.iter().zip(&bounding.arguments).enumerate() {
                let value = tables.column_sql(column);
                fields.push(Field::new(
                    format!("__tally_values_{i}"),
                    DataType::Int64,
                    true,
                ));
                outer.push(text(&format!("COUNT(a{i})")));
                match fixed {
                    Some(fixed) => {
                        // (GREATEST and LEAST skip NULLs: a missing value stays missing.)
                        let number = format!(
                            "NULLIF(CAST({value} AS double precision), 'NaN'::double precision)"
                        );
                        inner.push(format!(
                            "CASE WHEN {number} IS NULL THEN NULL \
                             ELSE LEAST(GREATEST({number}, {}), {}) * {} END AS a{i}",
                            float_sql(fixed.low),
                            float_sql(fixed.high),
                            float_sql(fixed.scale as f64),
                        ));
                        let whole = rounded(&format!("a{i}"));
                        outer.push(text(&format!("SUM({whole})")));
                        outer.push(text(&format!(
                            "SUM(CAST({whole} AS numeric) * CAST({whole} AS numeric))"
                        )));
                        fields.push(Field::new(format!("__tally_sum_{i}"), total.clone(), true));
                        fields.push(Field::new(
                            format!("__tally_squares_{i}"),
                            total.clone(),
                            true,
                        ));
                    }
                    None => inner.push(format!("{value} AS a{i}")),
                }
            }
            let mut keys = vec!["u".to_string()];
            keys.extend(group_names);
            let sql = format!(
                "SELECT {} FROM (SELECT {} FROM {from}{filter}) AS release_rows \
                 GROUP BY {} ORDER BY release_rows.u NULLS FIRST",
                outer.join(", "),
                inner.join(", "),
                keys.join(", ")
            );
            (sql, Arc::new(Schema::new(fields)), Some(bounding))
        }
    };
    debug_assert!(
        expected
            .fields()
            .iter()
            .skip(groups.len())
            .enumerate()
            .all(|(i, f)| *f.name() == partial_column(i))
    );
    let pushed = PushedRelease {
        database: database.clone(),
        sql,
        opted_out,
        rows,
        bounding,
    };
    Ok(Some((ReleasePlan::Pushed(pushed), expected)))
}

/// A partial's exact aggregate as SQL, for policies without noise: floating-point columns
/// summed as `double precision`, as DataFusion sums them.
fn exact_sql(tables: &Tables, partial: &Partial) -> Result<String, TallyError> {
    let float = |column: &ColumnRef| {
        tables
            .column_type(column)
            .is_some_and(|t| matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64))
    };
    Ok(match partial {
        Partial::Rows => "COUNT(*)".to_string(),
        Partial::Count(column) => format!("COUNT({})", tables.column_sql(column)),
        Partial::Sum(column) if float(column) => format!(
            "SUM(CAST({} AS double precision))",
            tables.column_sql(column)
        ),
        Partial::Sum(column) => format!("SUM({})", tables.column_sql(column)),
        Partial::SumSquares(column) => {
            let value = format!("CAST({} AS double precision)", tables.column_sql(column));
            format!("SUM({value} * {value})")
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constants_become_typed_literals_and_others_are_refused() {
        assert_eq!(
            sql_literal(&ScalarValue::Utf8(Some("O'Neil".into()))).unwrap(),
            "'O''Neil'"
        );
        assert_eq!(
            sql_literal(&ScalarValue::Int64(Some(-3))).unwrap(),
            "CAST(-3 AS bigint)"
        );
        assert_eq!(
            sql_literal(&ScalarValue::Float64(Some(2500.5))).unwrap(),
            "CAST('2500.5' AS double precision)"
        );
        assert_eq!(
            sql_literal(&ScalarValue::Date32(Some(19_358))).unwrap(),
            "DATE '2023-01-01'"
        );
        assert_eq!(
            sql_literal(&ScalarValue::Decimal128(Some(12_345), 10, 2)).unwrap(),
            "CAST('123.45' AS numeric)"
        );
        for refused in [
            ScalarValue::Utf8(None),
            ScalarValue::Float64(Some(f64::NAN)),
            ScalarValue::Utf8(Some("a\0b".into())),
            ScalarValue::Binary(Some(vec![1])),
        ] {
            assert!(sql_literal(&refused).is_err(), "{refused:?}");
        }
    }
}
