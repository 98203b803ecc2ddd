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

/// The five-year band of an age.
pub fn band_of(age: i64) -> String {
    match age {
        a if a < 0 => "unknown".to_string(),
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
                let ages = array.as_primitive::<Int64Type>();
                let bands: StringArray = ages.iter().map(|a| a.map(band_of)).collect();
                Ok(Arc::new(bands) as ArrayRef)
            })
        }),
    )
}

/// The outward code of a UK postcode.
pub fn district_of(postcode: &str) -> String {
    let trimmed = postcode.trim().to_uppercase();
    match trimmed.split_once(' ') {
        Some((outward, _)) => outward.to_string(),
        None if trimmed.len() > 3 => trimmed[..trimmed.len() - 3].to_string(),
        None => trimmed,
    }
}

fn postcode_district() -> ScalarUDF {
    create_udf(
        "postcode_district",
        vec![DataType::Utf8],
        DataType::Utf8,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let codes = array.as_string::<i32>();
                let districts: StringArray = codes.iter().map(|p| p.map(district_of)).collect();
                Ok(Arc::new(districts) as ArrayRef)
            })
        }),
    )
}

fn epoch() -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("valid date")
}

fn to_date(days: i32) -> Option<NaiveDate> {
    epoch().checked_add_signed(chrono::Duration::days(days.into()))
}

fn month() -> ScalarUDF {
    create_udf(
        "month",
        vec![DataType::Date32],
        DataType::Date32,
        Volatility::Immutable,
        Arc::new(|args| {
            unary(args, |array| {
                let dates = array.as_primitive::<Date32Type>();
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
                let dates = array.as_primitive::<Date32Type>();
                let years: Int32Array = dates.iter().map(|d| Some(to_date(d?)?.year())).collect();
                Ok(Arc::new(years) as ArrayRef)
            })
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bands_and_districts() {
        assert_eq!(band_of(0), "0-4");
        assert_eq!(band_of(17), "15-19");
        assert_eq!(band_of(89), "85-89");
        assert_eq!(band_of(104), "90+");
        assert_eq!(district_of("LS6 2AB"), "LS6");
        assert_eq!(district_of("ls62ab"), "LS6");
        assert_eq!(district_of("M1"), "M1");
    }
}
