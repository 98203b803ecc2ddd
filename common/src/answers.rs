//! Stored noisy answers: the same release over unchanged data returns the answer already
//! released, with the same noise, so repeating a query cannot average its noise away.
//!
//! A store is a folder of Arrow IPC files, one per answer, named `<key>.arrow` where the key
//! is the hex SHA-256 the caller derives from the release, its privacy settings and the
//! data's version. A file is written under a temporary name (`.<key>.<n>.tmp`), synced,
//! renamed into place and the folder synced, so a crash leaves either the old answer or the
//! new one, never half of one (stray `.tmp` files from a crash can be deleted).
//!
//! A file that does not read as Arrow IPC (damaged on disk) counts as absent: [`get`]
//! logs a warning and returns `None`, and the caller computes (and pays for) the answer
//! again. Arrow IPC validates structure, not content: there is no checksum, so a flipped bit
//! inside a value is not detected.
//!
//! [`get`]: AnswerStore::get

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use arrow::record_batch::RecordBatch;

use crate::error::{ErrorCode, TallyError};

/// A store of noisy answers already released, by key.
#[derive(Debug)]
pub struct AnswerStore {
    /// The folder of stored answers.
    dir: PathBuf,
    /// Makes temporary file names unique within the process.
    counter: AtomicU64,
}

/// Whether `key` is a hex SHA-256 (64 lowercase hex digits), the only names a store uses.
fn check_key(key: &str) -> Result<(), TallyError> {
    let hex = key.len() == 64 && key.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if hex {
        Ok(())
    } else {
        Err(TallyError::new(
            ErrorCode::Internal,
            "a stored answer's key must be a hex SHA-256 (64 lowercase hex digits)",
        ))
    }
}

fn store_error(what: &str, path: &Path, err: impl std::fmt::Display) -> TallyError {
    tracing::error!(path = %path.display(), error = %err, "answer store: {what}");
    TallyError::new(
        ErrorCode::Internal,
        format!("the store of released answers failed ({what}), so no answer is given"),
    )
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl AnswerStore {
    /// Opens the store in folder `dir`, creating it (and its parents) if absent.
    pub fn open(dir: &Path) -> Result<AnswerStore, TallyError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| store_error("cannot create its folder", dir, e))?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent).map_err(|e| store_error("cannot sync its folder", dir, e))?;
        }
        Ok(AnswerStore {
            dir: dir.to_path_buf(),
            counter: AtomicU64::new(0),
        })
    }

    /// The answer stored under `key`, if there is one. A file that cannot be read as Arrow
    /// IPC is logged and treated as absent. Refuses a key that is not a hex SHA-256.
    pub fn get(&self, key: &str) -> Result<Option<Vec<RecordBatch>>, TallyError> {
        check_key(key)?;
        let path = self.dir.join(format!("{key}.arrow"));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(err) => return Err(store_error("cannot open a stored answer", &path, err)),
        };
        // The IPC reader is not meant to panic on bad input, but a damaged file must never
        // take the node down, so a panic counts as damage too.
        let read = std::panic::catch_unwind(AssertUnwindSafe(|| {
            FileReader::try_new_buffered(file, None)?.collect::<Result<Vec<_>, _>>()
        }));
        match read {
            Ok(Ok(batches)) => Ok(Some(batches)),
            Ok(Err(err)) => {
                tracing::warn!(path = %path.display(), error = %err, "stored answer is damaged; ignoring it");
                Ok(None)
            }
            Err(_) => {
                tracing::warn!(path = %path.display(), "stored answer is damaged (reader panicked); ignoring it");
                Ok(None)
            }
        }
    }

    /// Stores `batches` (all of `schema`) under `key`, replacing what was there: written to a
    /// temporary file, synced, renamed into place, and the folder synced before this returns.
    /// Blocks on fsync. Refuses a key that is not a hex SHA-256.
    pub fn put(
        &self,
        key: &str,
        schema: &SchemaRef,
        batches: &[RecordBatch],
    ) -> Result<(), TallyError> {
        check_key(key)?;
        if let Some(batch) = batches
            .iter()
            .find(|b| b.schema().fields() != schema.fields())
        {
            return Err(TallyError::new(
                ErrorCode::Internal,
                format!(
                    "a stored answer's batch does not have the answer's schema ({} columns, not {})",
                    batch.num_columns(),
                    schema.fields().len()
                ),
            ));
        }
        let dir = &self.dir;
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let temp = dir.join(format!(".{key}.{}-{n}.tmp", std::process::id()));
        let path = dir.join(format!("{key}.arrow"));
        let written = write_ipc(&temp, schema, batches)
            .and_then(|()| std::fs::rename(&temp, &path).map_err(|e| e.to_string()))
            .and_then(|()| sync_dir(dir).map_err(|e| e.to_string()));
        written.map_err(|err| {
            let _ = std::fs::remove_file(&temp);
            store_error("cannot write a stored answer", &path, err)
        })
    }
}

/// Writes an Arrow IPC file at `path` (which must not exist) and syncs it.
fn write_ipc(path: &Path, schema: &SchemaRef, batches: &[RecordBatch]) -> Result<(), String> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(|e| e.to_string())?;
    let mut writer =
        FileWriter::try_new(BufWriter::new(file), schema).map_err(|e| e.to_string())?;
    for batch in batches {
        writer.write(batch).map_err(|e| e.to_string())?;
    }
    let mut buffered = writer.into_inner().map_err(|e| e.to_string())?;
    buffered.flush().map_err(|e| e.to_string())?;
    let file = buffered.into_inner().map_err(|e| e.to_string())?;
    file.sync_all().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Float64Array, Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    /// Reads an Arrow IPC file with nothing but arrow.
    fn read_ipc(path: &Path) -> Vec<RecordBatch> {
        FileReader::try_new(File::open(path).unwrap(), None)
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    const KEY: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn schema() -> SchemaRef {
        Arc::new(Schema::new(vec![
            Field::new("sex", DataType::Utf8, true),
            Field::new("n", DataType::Int64, false),
            Field::new("mean_cost", DataType::Float64, true),
        ]))
    }

    fn batch(sexes: &[Option<&str>], offset: i64) -> RecordBatch {
        let n: Vec<i64> = (0..sexes.len() as i64).map(|i| i * 5 + offset).collect();
        let cost: Vec<Option<f64>> = n
            .iter()
            .map(|v| (v % 2 == 0).then(|| *v as f64 / 3.0))
            .collect();
        RecordBatch::try_new(
            schema(),
            vec![
                Arc::new(StringArray::from(sexes.to_vec())),
                Arc::new(Int64Array::from(n)),
                Arc::new(Float64Array::from(cost)),
            ],
        )
        .unwrap()
    }

    fn batches() -> Vec<RecordBatch> {
        vec![
            batch(&[Some("F"), Some("M"), None], 0),
            batch(&[], 0),
            batch(&[Some("U"); 7], 3),
        ]
    }

    #[test]
    fn answers_round_trip_through_files() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnswerStore::open(&dir.path().join("answers")).unwrap();
        assert_eq!(store.get(KEY).unwrap(), None);
        store.put(KEY, &schema(), &batches()).unwrap();
        assert_eq!(store.get(KEY).unwrap(), Some(batches()));

        // A new store over the same folder (a restart) has it; it is a plain Arrow IPC file,
        // and no temporary file is left behind.
        let reopened = AnswerStore::open(&dir.path().join("answers")).unwrap();
        assert_eq!(reopened.get(KEY).unwrap(), Some(batches()));
        let file = dir.path().join("answers").join(format!("{KEY}.arrow"));
        assert_eq!(read_ipc(&file), batches());
        let names: Vec<String> = std::fs::read_dir(dir.path().join("answers"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names, vec![format!("{KEY}.arrow")]);

        // Putting again replaces it.
        let other = vec![batch(&[Some("X")], 10)];
        reopened.put(KEY, &schema(), &other).unwrap();
        assert_eq!(store.get(KEY).unwrap(), Some(other));
        // An answer with no batches at all is stored as such.
        let empty_key = KEY.replace('0', "f");
        store.put(&empty_key, &schema(), &[]).unwrap();
        assert_eq!(store.get(&empty_key).unwrap(), Some(vec![]));
    }

    #[test]
    fn a_damaged_file_counts_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnswerStore::open(dir.path()).unwrap();
        let file = dir.path().join(format!("{KEY}.arrow"));

        std::fs::write(&file, b"not arrow at all").unwrap();
        assert_eq!(store.get(KEY).unwrap(), None);

        store.put(KEY, &schema(), &batches()).unwrap();
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(store.get(KEY).unwrap(), None, "cut in half");

        let mut scrambled = bytes.clone();
        let len = scrambled.len();
        for byte in &mut scrambled[len - 200..len - 10] {
            *byte = !*byte;
        }
        std::fs::write(&file, &scrambled).unwrap();
        assert_eq!(store.get(KEY).unwrap(), None, "footer scrambled");

        std::fs::write(&file, b"").unwrap();
        assert_eq!(store.get(KEY).unwrap(), None, "empty");

        // And a good answer written over the damage reads again.
        store.put(KEY, &schema(), &batches()).unwrap();
        assert_eq!(store.get(KEY).unwrap(), Some(batches()));
    }

    #[test]
    fn keys_that_are_not_hex_sha256_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnswerStore::open(dir.path()).unwrap();
        let traversal = format!("../{}", &KEY[3..]);
        for bad in [
            "",
            "abc",
            &KEY.to_uppercase(),
            &KEY[1..],
            &format!("{KEY}0"),
            &traversal,
            &KEY.replace('a', "g"),
        ] {
            assert_eq!(
                store.get(bad).unwrap_err().code,
                ErrorCode::Internal,
                "{bad}"
            );
            let put = store.put(bad, &schema(), &batches());
            assert_eq!(put.unwrap_err().code, ErrorCode::Internal, "{bad}");
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        assert!(!dir.path().parent().unwrap().join(&KEY[3..]).exists());
    }

    #[test]
    fn batches_of_another_schema_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = AnswerStore::open(dir.path()).unwrap();
        let other = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let err = store.put(KEY, &other, &batches()).unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert_eq!(store.get(KEY).unwrap(), None);
    }
}
