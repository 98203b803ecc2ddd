//! Append-only audit logs, one JSON object per line, plus the most recent records in memory
//! for the process's own inspection (status pages and tests).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

/// How many recent records stay in memory.
const RECENT: usize = 10_000;

/// An audit log of records of type `R`.
#[derive(Debug)]
pub struct AuditLog<R> {
    recent: Mutex<VecDeque<R>>,
    file: Option<Mutex<File>>,
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
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditLog {
            recent: Mutex::new(VecDeque::new()),
            file: Some(Mutex::new(file)),
        })
    }

    /// Appends a record; the line is flushed to the file before this returns.
    pub fn append(&self, record: R) {
        if let Some(file) = &self.file {
            match serde_json::to_string(&record) {
                Ok(line) => {
                    let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
                    if let Err(err) = writeln!(file, "{line}").and_then(|_| file.flush()) {
                        tracing::error!(error = %err, "audit log write failed");
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

/// Milliseconds since the Unix epoch, for record timestamps.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}
