//! Append-only audit logs, one JSON object per line, plus the most recent records in memory
//! for the process's own inspection (status pages and tests).
//!
//! Every line carries `prev`, the SHA-256 of the line before it (64 zeros for the first), so
//! editing, deleting or reordering any line breaks the chain; [`verify`] finds where. Each
//! line is written and synced to disk before `append` returns, and a log reopened after a
//! restart (or a crash) continues the chain from its last line.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev` of a log's first line.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

fn line_hash(line: &str) -> String {
    hex::encode(Sha256::digest(line.as_bytes()))
}

/// The file and the hash of its last line.
#[derive(Debug)]
struct ChainedFile {
    file: File,
    last: String,
}

/// How many recent records stay in memory.
const RECENT: usize = 10_000;

/// An audit log of records of type `R`.
#[derive(Debug)]
pub struct AuditLog<R> {
    recent: Mutex<VecDeque<R>>,
    file: Option<Mutex<ChainedFile>>,
}

impl<R: Serialize + Clone> AuditLog<R> {
    /// A log kept in memory only.
    pub fn in_memory() -> Self {
        AuditLog {
            recent: Mutex::new(VecDeque::new()),
            file: None,
        }
    }

    /// A log that also appends to `path` (created if absent, never truncated).
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let last = match File::open(path) {
            Ok(existing) => BufReader::new(existing)
                .lines()
                .map_while(Result::ok)
                .filter(|line| !line.is_empty())
                .last()
                .map_or_else(|| GENESIS.to_string(), |line| line_hash(&line)),
            Err(_) => GENESIS.to_string(),
        };
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            recent: Mutex::new(VecDeque::new()),
            file: Some(Mutex::new(ChainedFile { file, last })),
        })
    }

    /// Appends a record; the line is written and synced to disk before this returns.
    pub fn append(&self, record: R) {
        if let Some(file) = &self.file {
            let mut chained = file.lock().unwrap_or_else(|p| p.into_inner());
            match chained_line(&record, &chained.last) {
                Ok(line) => {
                    let written =
                        writeln!(chained.file, "{line}").and_then(|_| chained.file.sync_data());
                    match written {
                        Ok(()) => chained.last = line_hash(&line),
                        Err(err) => tracing::error!(error = %err, "audit log write failed"),
                    }
                }
                Err(err) => tracing::error!(error = %err, "audit record could not be serialised"),
            }
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.len() == RECENT {
            recent.pop_front();
        }
        recent.push_back(record);
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<R> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}

/// The JSON line for `record`, chained to the previous line's hash.
fn chained_line<R: Serialize>(record: &R, prev: &str) -> serde_json::Result<String> {
    let mut value = serde_json::to_value(record)?;
    if let serde_json::Value::Object(fields) = &mut value {
        fields.insert("prev".into(), serde_json::Value::String(prev.to_string()));
    }
    serde_json::to_string(&value)
}

/// Where a log's chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ChainBreak {
    /// The first line (1-based) that does not follow from the one before.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// Checks the hash chain of the log at `path`; returns the number of records.
pub fn verify(path: &Path) -> Result<usize, ChainBreak> {
    let file = File::open(path).map_err(|e| ChainBreak {
        line: 0,
        reason: e.to_string(),
    })?;
    let mut expected = GENESIS.to_string();
    let mut count = 0;
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let number = index + 1;
        let fail = |reason: &str| ChainBreak {
            line: number,
            reason: reason.to_string(),
        };
        let line = line.map_err(|e| fail(&e.to_string()))?;
        if line.is_empty() {
            continue;
        }
        let value: serde_json::Value =
            serde_json::from_str(&line).map_err(|_| fail("not a JSON record"))?;
        let prev = value
            .get("prev")
            .and_then(|p| p.as_str())
            .ok_or_else(|| fail("no prev hash"))?;
        if prev != expected {
            return Err(fail(&format!(
                "its prev hash does not match line {}: that line was edited, or a record between them was removed or moved",
                number - 1
            )));
        }
        expected = line_hash(&line);
        count += 1;
    }
    Ok(count)
}

/// Milliseconds since the Unix epoch, for record timestamps.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Serialize)]
    struct Entry {
        n: u32,
    }

    fn write_log(path: &Path, from: u32, to: u32) {
        let log = AuditLog::open(path).unwrap();
        for n in from..to {
            log.append(Entry { n });
        }
    }

    #[test]
    fn chain_verifies_and_continues_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 3);
        write_log(&path, 3, 5);
        assert_eq!(verify(&path), Ok(5));
    }

    #[test]
    fn edits_deletions_and_reordering_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 4);
        let lines: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect();
        let rewrite = |lines: &[String]| std::fs::write(&path, lines.join("\n") + "\n").unwrap();

        let mut edited = lines.clone();
        edited[1] = edited[1].replace("\"n\":1", "\"n\":9");
        rewrite(&edited);
        assert_eq!(
            verify(&path).unwrap_err().line,
            3,
            "the line after the edit no longer follows"
        );

        let mut deleted = lines.clone();
        deleted.remove(1);
        rewrite(&deleted);
        assert_eq!(verify(&path).unwrap_err().line, 2);

        let mut moved = lines.clone();
        moved.swap(1, 2);
        rewrite(&moved);
        assert_eq!(verify(&path).unwrap_err().line, 2);

        rewrite(&lines);
        assert_eq!(verify(&path), Ok(4));
    }
}
