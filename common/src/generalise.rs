//! Generalising functions: the only way a quasi-identifier reaches an answer under the
//! default policy. Registered on both sides so gateway and nodes plan the same SQL.
//!
//! - `age_band(age)`: five-year bands `0-4`, `5-9`, ..., `85-89`, then `90+`.
//! - `postcode_district(postcode)`: the outward code, e.g. `LS6 2AB` -> `LS6`.
//! - `month(date)`: the first day of the date's month.
//! - `year(date)`: the calendar year.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Date32Array, Int32Array, StringArray};
use arrow::datatypes::{DataType, Date32Type, Int64Type};
use chrono::{Datelike, NaiveDate};
use datafusion::common::{Result, exec_err};
use datafusion::execution::FunctionRegistry;
use datafusion::logical_expr::{ColumnarValue, ScalarUDF, Volatility, create_udf};

/// Registers the generalising functions.
pub fn register(registry: &mut dyn FunctionRegistry) -> Result<()> {
    for udf in [age_band(), postcode_district(), month(), year()] {
        registry.register_udf(Arc::new(udf))?;
    }
    Ok(())
}

/// Applies `f` to the single array argument (scalars are expanded to one-row arrays).
fn unary(
    args: &[ColumnarValue],
    f: impl Fn(&dyn Array) -> Result<ArrayRef>,
) -> Result<ColumnarValue> {
    let [arg] = args else {
        return exec_err!("expected one argument");
    };
    let is_scalar = matches!(arg, ColumnarValue::Scalar(_));
    let array = arg.to_array(1)?;
    let result = f(array.as_ref())?;
    if is_scalar {
        Ok(ColumnarValue::Scalar(
            datafusion::common::ScalarValue::try_from_array(&result, 0)?,
        ))
    } else {
        Ok(ColumnarValue::Array(result))
    }
}

/// The five-year band of an age ([`UNKNOWN`] when negative); total on every `i64`.
pub fn band_of(age: i64) -> String {
    match age {
        a if a < 0 => UNKNOWN.to_string(),
        a if a >= 90 => "90+".to_string(),
        a => {
            let low = a / 5 * 5;
            format!("{low}-{}", low + 4)
        }
    }
}

fn age_band() -> ScalarUDF {
    create_udf(
        "age_band",
        vec![DataType::Int64],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let Some(ages) = array.as_primitive_opt::<Int64Type>() else {
                    return exec_err!("age_band expects a 64-bit integer");
                };
                let bands: StringArray = ages.iter().map(|a| a.map(band_of)).collect();
                Ok(Arc::new(bands) as ArrayRef)
            })
        }),
    )
}

/// Returned for a value that cannot be generalised: a negative age, or text that is not
/// shaped like a UK postcode.
pub const UNKNOWN: &str = "unknown";

/// The outward code of a UK postcode, upper-cased: `LS6 2AB` and `ls62ab` give `LS6`.
///
/// Total on any text: the outward part is the text before the first whitespace or, without
/// whitespace, all but the last three characters (the inward code) of a 5 to 7 character
/// postcode. Anything whose outward part is not shaped like an outward code (2 to 4 ASCII
/// letters and digits, starting with a letter and holding a digit) gives [`UNKNOWN`], so
/// free text, non-ASCII or over-long values never become groups of their own.
pub fn district_of(postcode: &str) -> String {
    let trimmed = postcode.trim();
    let outward = match trimmed.split_once(char::is_whitespace) {
        Some((outward, _)) => outward,
        None => {
            let chars = trimmed.chars().count();
            if (5..=7).contains(&chars) {
                // The inward code is the last three characters (not bytes).
                let cut = trimmed
                    .char_indices()
                    .nth(chars - 3)
                    .map_or(trimmed.len(), |(at, _)| at);
                trimmed.get(..cut).unwrap_or(trimmed)
            } else {
                trimmed
            }
        }
    };
    if is_outward_code(outward) {
        outward.to_ascii_uppercase()
    } else {
        UNKNOWN.to_string()
    }
}

/// Whether `text` is shaped like a UK outward code (`M1`, `LS6`, `EC1A`, `SW1A`).
fn is_outward_code(text: &str) -> bool {
    (2..=4).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric())
        && text.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
        && text.bytes().any(|b| b.is_ascii_digit())
}

fn postcode_district() -> ScalarUDF {
    create_udf(
        "postcode_district",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let Some(codes) = array.as_string_opt::<i32>() else {
                    return exec_err!("postcode_district expects text");
                };
                let districts: StringArray = codes.iter().map(|p| p.map(district_of)).collect();
                Ok(Arc::new(districts) as ArrayRef)
            })
        }),
    )
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")
}

/// The date `days` after 1970-01-01, or `None` outside chrono's range (about ±262,000
/// years), so the date functions give NULL rather than panic on extreme values.
fn to_date(days: i32) -> Option<NaiveDate> {
    epoch().checked_add_signed(chrono::TimeDelta::try_days(days.into())?)
}

fn month() -> ScalarUDF {
    create_udf(
        "month",
        vec![DataType::Date32],
        DataType::Date32,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let Some(dates) = array.as_primitive_opt::<Date32Type>() else {
                    return exec_err!("month expects a date");
                };
                let firsts: Date32Array = dates
                    .iter()
                    .map(|d| {
                        let first = to_date(d?)?.with_day(1)?;
                        i32::try_from(first.signed_duration_since(epoch()).num_days()).ok()
                    })
                    .collect();
                Ok(Arc::new(firsts) as ArrayRef)
            })
        }),
    )
}

fn year() -> ScalarUDF {
    create_udf(
        "year",
        vec![DataType::Date32],
        DataType::Int32,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let Some(dates) = array.as_primitive_opt::<Date32Type>() else {
                    return exec_err!("year expects a date");
                };
                let years: Int32Array = dates.iter().map(|d| Some(to_date(d?)?.year())).collect();
                Ok(Arc::new(years) as ArrayRef)
            })
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, RecordBatch};
    use arrow::datatypes::{Field, Schema};
    use datafusion::datasource::MemTable;
    use datafusion::prelude::SessionContext;

    #[test]
    fn bands_and_districts() {
        assert_eq!(band_of(0), "0-4");
        assert_eq!(band_of(17), "15-19");
        assert_eq!(band_of(89), "85-89");
        assert_eq!(band_of(104), "90+");
        assert_eq!(band_of(-1), UNKNOWN);
        assert_eq!(band_of(i64::MIN), UNKNOWN);
        assert_eq!(band_of(i64::MAX), "90+");
        assert_eq!(district_of("LS6 2AB"), "LS6");
        assert_eq!(district_of("ls62ab"), "LS6");
        assert_eq!(district_of("M1"), "M1");
        assert_eq!(district_of("  sw1a 1aa "), "SW1A");
        assert_eq!(district_of("EC1A1BB"), "EC1A");
        assert_eq!(district_of("LS6\t2AB"), "LS6");
        assert_eq!(district_of("M1 1AE"), "M1");
    }

    /// Odd text never panics and never becomes a group of its own: it is either a
    /// plausible outward code or `unknown`.
    #[test]
    fn districts_are_total_on_odd_text() {
        let long_ascii = "A1".repeat(50_000);
        let long_multibyte = "É".repeat(10_000);
        let odd = [
            "",
            " ",
            "\t\n",
            "ÉÉÉÉ",
            "ÉÉÉÉÉ",
            "日本語テキスト",
            "日本語 テキスト",
            "😀😀😀😀😀",
            "LS6 😀",
            "😀 2AB",
            "ıs6 2AB",
            "ſW1 1AA",
            "NO FIXED ABODE",
            "12345",
            "L",
            "LS",
            "LS6",
            "\u{0}\u{0}\u{0}\u{0}\u{0}",
            "LS6\u{200B}2AB",
            long_ascii.as_str(),
            long_multibyte.as_str(),
        ];
        for text in odd {
            let district = district_of(text);
            assert!(
                district == UNKNOWN || is_outward_code(&district),
                "{text:?} gave {district:?}"
            );
            assert!(
                district.len() <= UNKNOWN.len(),
                "{text:?} gave {district:?}"
            );
        }
        for text in [
            "",
            " ",
            "ÉÉÉÉ",
            "日本語テキスト",
            "😀😀😀😀😀",
            "NO FIXED ABODE",
        ] {
            assert_eq!(district_of(text), UNKNOWN, "{text:?}");
        }
        // Non-ASCII letters that upper-case to ASCII are not accepted as postcodes.
        assert_eq!(district_of("ıs6 2AB"), UNKNOWN);
        assert_eq!(district_of("ſW1 1AA"), UNKNOWN);
        assert_eq!(
            district_of("LS 2AB"),
            UNKNOWN,
            "no digit in the outward code"
        );
        assert_eq!(district_of("6LS 2AB"), UNKNOWN, "starts with a digit");
    }

    #[test]
    fn dates_are_total_on_extreme_days() {
        assert_eq!(to_date(0), Some(epoch()));
        assert_eq!(to_date(i32::MIN), None);
        assert_eq!(to_date(i32::MAX), None);
    }

    /// The registered functions over extreme and odd values, through a real query (array
    /// path) and over constants (the scalar path, folded at planning).
    #[tokio::test]
    async fn functions_give_null_or_a_value_on_extremes() {
        let mut ctx = SessionContext::new();
        register(&mut ctx).expect("registers");
        let schema = Arc::new(Schema::new(vec![
            Field::new("age", DataType::Int64, true),
            Field::new("day", DataType::Date32, true),
            Field::new("postcode", DataType::Utf8, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(Int64Array::from(vec![
                    Some(i64::MIN),
                    Some(i64::MAX),
                    Some(42),
                    None,
                ])),
                Arc::new(Date32Array::from(vec![
                    Some(i32::MIN),
                    Some(i32::MAX),
                    Some(19_000),
                    None,
                ])),
                Arc::new(StringArray::from(vec![
                    Some("ÉÉÉÉ"),
                    Some("日本語テキスト"),
                    Some("ls6 2ab"),
                    None,
                ])),
            ],
        )
        .expect("batch");
        let table = MemTable::try_new(schema, vec![vec![batch]]).expect("table");
        ctx.register_table("t", Arc::new(table))
            .expect("registered");
        let batches = ctx
            .sql("SELECT age_band(age), month(day), year(day), postcode_district(postcode) FROM t")
            .await
            .expect("plans")
            .collect()
            .await
            .expect("runs");
        let [batch] = batches.as_slice() else {
            panic!("one batch expected, got {}", batches.len());
        };
        let bands = batch.column(0).as_string::<i32>();
        let months = batch.column(1).as_primitive::<Date32Type>();
        let years = batch
            .column(2)
            .as_primitive::<arrow::datatypes::Int32Type>();
        let districts = batch.column(3).as_string::<i32>();
        let text = |a: &StringArray, i: usize| a.is_valid(i).then(|| a.value(i).to_string());
        assert_eq!(text(bands, 0).as_deref(), Some(UNKNOWN));
        assert_eq!(text(bands, 1).as_deref(), Some("90+"));
        assert_eq!(text(bands, 2).as_deref(), Some("40-44"));
        assert!(bands.is_null(3));
        for row in [0, 1, 3] {
            assert!(months.is_null(row) && years.is_null(row), "row {row}");
        }
        // Day 19,000 is 2022-01-08.
        assert_eq!(months.value(2), 18_993);
        assert_eq!(years.value(2), 2022);
        assert_eq!(text(districts, 0).as_deref(), Some(UNKNOWN));
        assert_eq!(text(districts, 1).as_deref(), Some(UNKNOWN));
        assert_eq!(text(districts, 2).as_deref(), Some("LS6"));
        assert!(districts.is_null(3));

        let constants = ctx
            .sql(
                "SELECT postcode_district('😀😀😀😀😀'), age_band(CAST(-5 AS BIGINT)), \
                 year(CAST(CAST(2147483647 AS INT) AS DATE))",
            )
            .await
            .expect("plans")
            .collect()
            .await
            .expect("runs");
        let row = &constants[0];
        assert_eq!(row.column(0).as_string::<i32>().value(0), UNKNOWN);
        assert_eq!(row.column(1).as_string::<i32>().value(0), UNKNOWN);
        assert!(row.column(2).is_null(0));
    }
}
