//! Bounding: the keyed hash that chooses which of a patient's groups count when a patient
//! falls in more groups than the bounds allow (see [`tally_common::privacy`]).
//!
//! The node aggregates per (patient, group) first and keeps at most `groups_per_unit`
//! groups of each patient: those whose keyed hash of patient and group ranks lowest, so the
//! choice depends on neither data order nor anything an analyst controls.

use std::path::Path;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, UInt64Builder};
use arrow::datatypes::DataType;
use datafusion::common::{Result as DfResult, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use sha2::{Digest, Sha256};
use tally_common::{ErrorCode, TallyError};

/// The name of the keyed-hash function in the node's plans.
pub const KEYED_RANK: &str = "__tally_keyed_rank";

/// The node's secret for the keyed hash, kept in `<state>/bounding.key` (created with
/// random bytes the first time).
pub fn load_or_create_key(state: &Path) -> Result<[u8; 32], TallyError> {
    let path = state.join("bounding.key");
    let broken = |why: String| {
        tracing::error!(path = %path.display(), %why, "the bounding key");
        TallyError::new(
            ErrorCode::Internal,
            "this trust's contribution-bounding key cannot be read",
        )
    };
    match std::fs::read(&path) {
        Ok(bytes) => bytes.try_into().map_err(|_| broken("not 32 bytes".into())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut key = [0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
            std::fs::write(&path, key)
                .and_then(|()| std::fs::File::open(&path)?.sync_all())
                .map_err(|e| broken(e.to_string()))?;
            Ok(key)
        }
        Err(e) => Err(broken(e.to_string())),
    }
}

/// `__tally_keyed_rank(unit, g0, g1, ...)`: SHA-256 of the node's secret, then each
/// argument's text with its type, as an unsigned 64-bit number. Ordering a patient's
/// groups by it picks the same groups for the same patient every time, independently of
/// the order rows arrive in, and an analyst who does not know the secret cannot steer it.
#[derive(Debug, PartialEq, Eq, Hash)]
struct KeyedRank {
    key: [u8; 32],
    signature: Signature,
}

impl ScalarUDFImpl for KeyedRank {
    fn name(&self) -> &str {
        KEYED_RANK
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let rows = args.number_rows;
        let texts: Vec<(DataType, ArrayRef)> = args
            .args
            .iter()
            .map(|arg| {
                let array = arg.to_array(rows)?;
                let text = arrow::compute::cast(&array, &DataType::Utf8)?;
                Ok((array.data_type().clone(), text))
            })
            .collect::<DfResult<_>>()?;
        let mut out = UInt64Builder::with_capacity(rows);
        for row in 0..rows {
            let mut hasher = Sha256::new();
            hasher.update(self.key);
            for (data_type, text) in &texts {
                let Some(strings) = text.as_any().downcast_ref::<arrow::array::StringArray>()
                else {
                    return exec_err!("the keyed rank needs text arguments");
                };
                hasher.update(data_type.to_string().as_bytes());
                if strings.is_null(row) {
                    hasher.update([0u8]);
                } else {
                    hasher.update([1u8]);
                    let value = strings.value(row).as_bytes();
                    hasher.update((value.len() as u64).to_le_bytes());
                    hasher.update(value);
                }
            }
            let digest = hasher.finalize();
            let mut first = [0u8; 8];
            first.copy_from_slice(&digest[..8]);
            out.append_value(u64::from_le_bytes(first));
        }
        Ok(ColumnarValue::Array(Arc::new(out.finish())))
    }
}

/// The keyed-rank function for the node's plans, with the node's secret.
pub fn keyed_rank_udf(key: [u8; 32]) -> ScalarUDF {
    ScalarUDF::new_from_impl(KeyedRank {
        key,
        signature: Signature::variadic_any(Volatility::Immutable),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bounding_key_is_created_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create_key(dir.path()).unwrap();
        let second = load_or_create_key(dir.path()).unwrap();
        assert_eq!(first, second);
        assert_ne!(first, [0u8; 32]);
        std::fs::write(dir.path().join("bounding.key"), b"short").unwrap();
        assert_eq!(
            load_or_create_key(dir.path()).unwrap_err().code,
            ErrorCode::Internal
        );
    }
}
