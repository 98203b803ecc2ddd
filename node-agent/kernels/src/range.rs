//! The range a code falls in: a binary search over a reference table's sorted, disjoint
//! text ranges (ICD-10 chapters, say), per row of a release, in place of a range join.

use arrow::array::{AsArray, StringArray};
use arrow::datatypes::DataType;
use datafusion::common::Result as DfResult;
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

/// `__tally_range_low(code)`: the lower bound of the sorted, disjoint range holding `code`.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct RangeLookup {
    ranges: Vec<(String, String)>,
    output: DataType,
    signature: Signature,
}

impl RangeLookup {
    /// A lookup over `ranges` (sorted by lower bound, proper and disjoint), answering with
    /// the lower bound as `output`.
    pub fn new(ranges: Vec<(String, String)>, output: DataType) -> Self {
        RangeLookup {
            ranges,
            output,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for RangeLookup {
    fn name(&self) -> &str {
        "__tally_range_low"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(self.output.clone())
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let codes =
            arrow::compute::cast(&args.args[0].to_array(args.number_rows)?, &DataType::Utf8)?;
        let codes = codes.as_string::<i32>();
        let lows: StringArray = codes
            .iter()
            .map(|code| {
                let code = code?;
                // The last range starting at or before the code, if the code is within it.
                let at = self.ranges.partition_point(|(low, _)| low.as_str() <= code);
                let (low, high) = self.ranges.get(at.checked_sub(1)?)?;
                (code <= high.as_str()).then_some(low.as_str())
            })
            .collect();
        Ok(ColumnarValue::Array(arrow::compute::cast(
            &lows,
            &self.output,
        )?))
    }
}
