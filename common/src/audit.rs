//! Append-only audit logs, one JSON object per line, plus the most recent records in memory
//! for the process's own inspection (status pages and tests).
//!
//! Every line ends with `"hash"`, the SHA-256 of the line's text before that field, and
//! carries `"prev"`, the hash of the record before it (64 zeros for the very first). Editing
//! a record breaks its own hash; deleting or reordering records breaks a `prev`; [`verify`]
//! names the first record that fails. Each line is written and synced to disk before
//! `append` (or `write`) returns, and a log reopened after a restart (or a crash) continues
//! the chain (reading only its last lines, so a restart costs the same however long the log
//! is). Records written concurrently through `write` are committed in groups: one
//! blocking task writes every record waiting and syncs once for all of them.
//!
//! A chain alone cannot show that records were cut off its end, so the writer also keeps
//! `<name>.head`: the hash of the newest record, rewritten in place after each append.
//! [`verify`] requires the chain to reach the head (or stop one short of it, which a crash
//! between the two writes can cause). Publishing head hashes elsewhere (the transparency
//! register does) anchors them against someone who can rewrite both files.
//!
//! A log may rotate: when the active file would grow past its size limit it is renamed to
//! `<name>.000001` (then `.000002`, ...) and a new file starts, whose first record chains to
//! the last record of the one before. [`segments`] lists a log's files in chain order.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, TallyError};

/// The `prev` of a log's first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Every line ends with this field, then the 64 hex digits of its hash, then `"}`.
const HASH_FIELD: &str = ",\"hash\":\"";

fn sha256_hex(text: &str) -> String {
    hex::encode(Sha256::digest(text.as_bytes()))
}

/// The active file, its size, and the hash of its last record.
#[derive(Debug)]
struct ChainedFile {
    path: PathBuf,
    file: File,
    head: File,
    size: u64,
    last: String,
    rotate_bytes: Option<u64>,
}

/// How many recent records stay in memory.
const RECENT: usize = 10_000;

/// An audit log of records of type `R`.
#[derive(Debug)]
pub struct AuditLog<R> {
    recent: Mutex<VecDeque<R>>,
    file: Option<Mutex<ChainedFile>>,
    waiting: Mutex<Waiting<R>>,
}

/// Records handed to [`AuditLog::write`] and not yet committed, and whether a task is
/// committing them.
#[derive(Debug)]
struct Waiting<R> {
    records: Vec<(R, Committed)>,
    committing: bool,
}

type Committed = tokio::sync::oneshot::Sender<Result<(), TallyError>>;

fn unwritten() -> TallyError {
    TallyError::new(
        ErrorCode::Internal,
        "the audit record could not be written, so no answer is given",
    )
}

/// Fails the records still waiting when a commit task unwinds, and lets the next writer
/// start another, so that a panic cannot leave writers waiting forever.
struct CommitGuard<'a, R>(&'a AuditLog<R>);

impl<R> Drop for CommitGuard<'_, R> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let mut waiting = self.0.waiting.lock().unwrap_or_else(|p| p.into_inner());
            for (_, committed) in waiting.records.drain(..) {
                let _ = committed.send(Err(unwritten()));
            }
            waiting.committing = false;
        }
    }
}

impl<R: Serialize + Clone> AuditLog<R> {
    /// A log kept in memory only.
    pub fn in_memory() -> Self {
        AuditLog {
            recent: Mutex::new(VecDeque::new()),
            file: None,
            waiting: Mutex::new(Waiting::default()),
        }
    }

    /// A log that also appends to `path` (created if absent, never truncated except for a
    /// torn last line left by a crash mid-write, which is moved aside to `<path>.torn`).
    /// With `rotate_bytes`, the file is rotated before it would grow past that size.
    pub fn open(path: &Path, rotate_bytes: Option<u64>) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(path)?;
        set_aside_torn_tail(path, &file)?;
        let last = match last_record_hash(&file)? {
            Some(hash) => hash,
            None => match segments(path)?.iter().rev().nth(1) {
                Some(previous) => {
                    last_record_hash(&File::open(previous)?)?.unwrap_or_else(|| GENESIS.to_string())
                }
                None => GENESIS.to_string(),
            },
        };
        let size = file.metadata()?.len();
        let head = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(head_path(path))?;
        Ok(AuditLog {
            recent: Mutex::new(VecDeque::new()),
            waiting: Mutex::new(Waiting::default()),
            file: Some(Mutex::new(ChainedFile {
                path: path.to_path_buf(),
                file,
                head,
                size,
                last,
                rotate_bytes,
            })),
        })
    }

    /// Appends a record; the line is written and synced to disk before this returns. When
    /// it cannot be written the caller must not answer (fail closed).
    pub fn append(&self, record: R) -> Result<(), TallyError> {
        self.append_all(vec![record])
    }

    /// Appends `records` in order with one sync for all of them; all or none are
    /// acknowledged.
    fn append_all(&self, records: Vec<R>) -> Result<(), TallyError> {
        if let Some(file) = &self.file {
            let mut chained = file.lock().unwrap_or_else(|p| p.into_inner());
            let written = records
                .iter()
                .try_for_each(|record| chained.write_record(record))
                .and_then(|()| chained.sync());
            if let Err(err) = written {
                tracing::error!(error = %err, path = %chained.path.display(), "audit log write failed");
                return Err(unwritten());
            }
        }
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        for record in records {
            if recent.len() == RECENT {
                recent.pop_front();
            }
            recent.push_back(record);
        }
        Ok(())
    }

    /// Appends a record without blocking the async runtime: the record waits with any
    /// others written meanwhile, and one blocking task commits them together (one sync).
    /// Returns once the record is on disk; when it is not, the caller must not answer.
    pub async fn write(self: &Arc<Self>, record: R) -> Result<(), TallyError>
    where
        R: Send + 'static,
    {
        let (committed, outcome) = tokio::sync::oneshot::channel();
        let lead = {
            let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            waiting.records.push((record, committed));
            !std::mem::replace(&mut waiting.committing, true)
        };
        if lead {
            let log = self.clone();
            tokio::task::spawn_blocking(move || log.commit_waiting());
        }
        outcome.await.unwrap_or_else(|_| Err(unwritten()))
    }

    /// Commits waiting records, group by group, until none wait.
    fn commit_waiting(&self) {
        let _guard = CommitGuard(self);
        loop {
            let group = {
                let mut waiting = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
                if waiting.records.is_empty() {
                    waiting.committing = false;
                    return;
                }
                std::mem::take(&mut waiting.records)
            };
            let (records, committed): (Vec<R>, Vec<Committed>) = group.into_iter().unzip();
            let outcome = self.append_all(records);
            for one in committed {
                let _ = one.send(outcome.clone());
            }
        }
    }

    /// The most recent records, oldest first.
    pub fn recent(&self) -> Vec<R> {
        let recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        recent.iter().cloned().collect()
    }
}

impl<R> Default for Waiting<R> {
    fn default() -> Self {
        Waiting {
            records: Vec::new(),
            committing: false,
        }
    }
}

impl ChainedFile {
    /// Writes one record's line, chained to the last (not yet synced).
    fn write_record<R: Serialize>(&mut self, record: &R) -> std::io::Result<()> {
        let (line, hash) = chained_line(record, &self.last)?;
        let length = line.len() as u64 + 1;
        if self
            .rotate_bytes
            .is_some_and(|limit| self.size > 0 && self.size + length > limit)
        {
            self.rotate()?;
        }
        writeln!(self.file, "{line}")?;
        self.size += length;
        self.last = hash;
        Ok(())
    }

    /// Syncs the lines written, then records the newest one's hash in the head file.
    fn sync(&mut self) -> std::io::Result<()> {
        self.file.sync_data()?;
        self.head
            .write_all_at(head_line(&self.last).as_bytes(), 0)?;
        self.head.sync_data()
    }

    /// Renames the active file to the next numbered segment and starts a new one.
    fn rotate(&mut self) -> std::io::Result<()> {
        let next = rotated_numbers(&self.path)?.last().map_or(1, |n| n + 1);
        std::fs::rename(&self.path, segment_path(&self.path, next))?;
        self.file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
            File::open(dir)?.sync_all()?;
        }
        self.size = 0;
        Ok(())
    }
}

/// The JSON line for `record`, chained to `prev`, and its hash.
fn chained_line<R: Serialize>(record: &R, prev: &str) -> std::io::Result<(String, String)> {
    let mut value = serde_json::to_value(record)?;
    let serde_json::Value::Object(fields) = &mut value else {
        return Err(std::io::Error::other(
            "an audit record must be a JSON object",
        ));
    };
    fields.remove("hash");
    fields.insert("prev".into(), serde_json::Value::String(prev.to_string()));
    let body = serde_json::to_string(&value)?;
    let hash = sha256_hex(&body);
    let open = body.strip_suffix('}').unwrap_or(&body);
    Ok((format!("{open}{HASH_FIELD}{hash}\"}}"), hash))
}

/// Splits a line into its hashed text and the hash it claims; `None` if it has no hash.
fn split_hash(line: &str) -> Option<(String, &str)> {
    let stripped = line.strip_suffix("\"}")?;
    let at = stripped.rfind(HASH_FIELD)?;
    let hash = &stripped[at + HASH_FIELD.len()..];
    (hash.len() == 64).then(|| (format!("{}}}", &stripped[..at]), hash))
}

/// How many bytes from a line's end hold its hash: the hash field, 64 hex digits and `"}`.
const HASH_TAIL: usize = HASH_FIELD.len() + 64 + 2;

/// The hash of the last record of `file` that has one, read backwards from the end (a
/// reopened log's files can be large; only their last lines are read).
fn last_record_hash(file: &File) -> std::io::Result<Option<String>> {
    lines_backwards(file, |_, line_end| {
        let line_end = line_end.strip_suffix(b"\r").unwrap_or(line_end);
        let tail = &line_end[line_end.len().saturating_sub(HASH_TAIL)..];
        let (_, hash) = split_hash(std::str::from_utf8(tail).ok()?)?;
        Some(hash.to_string())
    })
}

/// Walks `file`'s lines from the last to the first, in one pass backwards a block at a time,
/// until `visit` returns something. `visit` gets each line's start offset and its last
/// bytes (enough for [`HASH_TAIL`] and a carriage return; without the newline). The first
/// line visited is the one after the file's last newline: empty if the file ends in one.
fn lines_backwards<T>(
    file: &File,
    mut visit: impl FnMut(u64, &[u8]) -> Option<T>,
) -> std::io::Result<Option<T>> {
    const BLOCK: u64 = 64 * 1024;
    let mut line_end = Vec::with_capacity(HASH_TAIL + 1);
    let mut buffer = vec![0; BLOCK as usize];
    let mut end = file.metadata()?.len();
    while end > 0 {
        let begin = end.saturating_sub(BLOCK);
        let block = &mut buffer[..(end - begin) as usize];
        file.read_exact_at(block, begin)?;
        let mut rest: &[u8] = block;
        while let Some(newline) = rest.iter().rposition(|b| *b == b'\n') {
            keep_line_end(&mut line_end, &rest[newline + 1..]);
            if let Some(found) = visit(begin + newline as u64 + 1, &line_end) {
                return Ok(Some(found));
            }
            line_end.clear();
            rest = &rest[..newline];
        }
        keep_line_end(&mut line_end, rest);
        end = begin;
    }
    Ok(visit(0, &line_end))
}

/// Puts `before` (the bytes of a line just before those in `line_end`) in front of
/// `line_end`, which keeps no more than the line's last `HASH_TAIL + 1` bytes.
fn keep_line_end(line_end: &mut Vec<u8>, before: &[u8]) {
    let room = (HASH_TAIL + 1).saturating_sub(line_end.len());
    let kept = &before[before.len().saturating_sub(room)..];
    line_end.splice(0..0, kept.iter().copied());
}

/// A crash in the middle of a write can leave a last line without its newline: that record
/// was never acknowledged. It is moved to `<path>.torn` (for inspection) and cut off, so the
/// chain continues from the last complete record. Reads only the file's last line.
fn set_aside_torn_tail(path: &Path, file: &File) -> std::io::Result<()> {
    let length = file.metadata()?.len();
    let keep = lines_backwards(file, |start, _| Some(start))?.unwrap_or(0);
    if keep == length {
        return Ok(());
    }
    let mut torn_name = path.as_os_str().to_owned();
    torn_name.push(".torn");
    let mut torn = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&torn_name)?;
    let mut tail = file.try_clone()?;
    tail.seek(SeekFrom::Start(keep))?;
    std::io::copy(&mut tail.take(length - keep), &mut torn)?;
    torn.write_all(b"\n")?;
    torn.sync_all()?;
    file.set_len(keep)?;
    file.sync_all()?;
    tracing::warn!(path = %path.display(), torn = %Path::new(&torn_name).display(), "audit log ended in a torn line; it was moved aside");
    Ok(())
}

fn head_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".head");
    PathBuf::from(name)
}

/// The head file's content: always the same length, so an in-place rewrite replaces it all.
fn head_line(hash: &str) -> String {
    format!("{{\"hash\":\"{hash}\"}}\n")
}

/// The newest record's hash as the head file records it, if there is a head file.
fn read_head(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(head_path(path)) {
        Ok(text) if text.is_empty() => Ok(None),
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .ok()
            .and_then(|v| v.get("hash").and_then(|h| h.as_str()).map(str::to_string))
            .map(Some)
            .ok_or_else(|| "its head file is not readable".to_string()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(err) => Err(err.to_string()),
    }
}

fn segment_path(path: &Path, number: u64) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(format!(".{number:06}"));
    PathBuf::from(name)
}

/// The numbers of the rotated segments of the log at `path`, ascending.
fn rotated_numbers(path: &Path) -> std::io::Result<Vec<u64>> {
    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
        return Ok(Vec::new());
    };
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let prefix = format!("{name}.");
    let mut numbers: Vec<u64> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let file = entry.file_name().into_string().ok()?;
            let digits = file.strip_prefix(&prefix)?;
            digits
                .chars()
                .all(|c| c.is_ascii_digit())
                .then(|| digits.parse().ok())
                .flatten()
        })
        .collect();
    numbers.sort_unstable();
    Ok(numbers)
}

/// The files of the log whose active file is `path`, in chain order: the rotated segments,
/// oldest first, then the active file (if it exists).
pub fn segments(path: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = rotated_numbers(path)?
        .into_iter()
        .map(|n| segment_path(path, n))
        .collect();
    if path.exists() {
        files.push(path.to_path_buf());
    }
    Ok(files)
}

/// Where a log's chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}, record {line}: {reason}", file.display())]
pub struct ChainBreak {
    /// The file holding the record.
    pub file: PathBuf,
    /// The first record (1-based line number in `file`) that fails.
    pub line: usize,
    /// Why.
    pub reason: String,
}

/// What a verified log holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedLog {
    /// Records checked.
    pub records: usize,
    /// Files checked, in chain order.
    pub files: Vec<PathBuf>,
}

/// Checks the hash chain of the log whose active file is `path`, across its rotated
/// segments; names the first record that fails.
pub fn verify(path: &Path) -> Result<VerifiedLog, ChainBreak> {
    replay(path, |_| {})
}

/// Every record of the log whose active file is `path`, oldest first, after checking the
/// chain (a log that does not verify is not read).
pub fn read_records(path: &Path) -> Result<Vec<serde_json::Value>, ChainBreak> {
    let mut records = Vec::new();
    replay(path, |record| records.push(record))?;
    Ok(records)
}

/// Why [`replay_into`] stopped.
#[derive(Debug)]
pub enum ReplayError<E> {
    /// The chain breaks (reported first: it makes every record suspect).
    Chain(ChainBreak),
    /// The chain holds, but `apply` rejected this record (1-based across the log's files).
    Rejected {
        /// The record's number.
        record: usize,
        /// Why `apply` rejected it.
        why: E,
    },
}

/// Replays the log at `path` into the caller's state through `apply`, record by record as
/// the chain is verified (see [`replay`]). Once `apply` rejects a record, the rest of the
/// chain is still verified but no longer applied.
pub fn replay_into<E>(
    path: &Path,
    mut apply: impl FnMut(serde_json::Value) -> Result<(), E>,
) -> Result<VerifiedLog, ReplayError<E>> {
    let mut number = 0usize;
    let mut rejected = None;
    let verified = replay(path, |record| {
        number += 1;
        if rejected.is_none()
            && let Err(why) = apply(record)
        {
            rejected = Some(ReplayError::Rejected {
                record: number,
                why,
            });
        }
    })
    .map_err(ReplayError::Chain)?;
    rejected.map_or(Ok(verified), Err)
}

/// Walks the chain of the log whose active file is `path` across every segment, passing
/// each record to `visit` as soon as it is verified, so memory does not grow with the log.
/// Records are visited before the rest of the chain is checked: on an error, whatever the
/// caller built from them must be thrown away.
pub fn replay(
    path: &Path,
    mut visit: impl FnMut(serde_json::Value),
) -> Result<VerifiedLog, ChainBreak> {
    let fail = |file: &Path, line: usize, reason: String| ChainBreak {
        file: file.to_path_buf(),
        line,
        reason,
    };
    let files = segments(path).map_err(|e| fail(path, 0, e.to_string()))?;
    if files.is_empty() {
        return Err(fail(path, 0, "no such log".into()));
    }
    let head = read_head(path).map_err(|reason| fail(path, 0, reason))?;
    let mut expected = GENESIS.to_string();
    let mut before_last = GENESIS.to_string();
    let mut total = 0;
    for file in &files {
        let reader = File::open(file).map_err(|e| fail(file, 0, e.to_string()))?;
        for (index, line) in BufReader::new(reader).lines().enumerate() {
            let number = index + 1;
            let line = line.map_err(|e| fail(file, number, e.to_string()))?;
            let (body, hash) = split_hash(&line)
                .ok_or_else(|| fail(file, number, "the record has no hash".into()))?;
            if sha256_hex(&body) != hash {
                return Err(fail(
                    file,
                    number,
                    "its content does not match its hash: the record was edited".into(),
                ));
            }
            let record: serde_json::Value = serde_json::from_str(&body)
                .map_err(|_| fail(file, number, "not a JSON record".into()))?;
            let prev = record.get("prev").and_then(|p| p.as_str()).unwrap_or("");
            if prev != expected {
                let reason = if expected == GENESIS {
                    "it continues a chain whose earlier records are missing".to_string()
                } else {
                    "it does not follow the record before it: a record was removed or moved"
                        .to_string()
                };
                return Err(fail(file, number, reason));
            }
            before_last = std::mem::replace(&mut expected, hash.to_string());
            total += 1;
            visit(record);
        }
    }
    if let Some(head) = head
        && head != expected
        && head != before_last
    {
        let last = files.last().map_or(path, PathBuf::as_path);
        let lines = File::open(last)
            .map(|f| BufReader::new(f).lines().count())
            .unwrap_or(total);
        return Err(fail(
            last,
            lines + 1,
            "the log ends before the record its head names: records were removed from the end"
                .into(),
        ));
    }
    Ok(VerifiedLog {
        records: total,
        files,
    })
}

/// Milliseconds since the Unix epoch, for record timestamps.
pub fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[derive(Clone, Serialize)]
    struct Entry {
        n: u32,
        note: String,
    }

    fn write_log(path: &Path, from: u32, to: u32, rotate: Option<u64>) {
        let log = AuditLog::open(path, rotate).unwrap();
        for n in from..to {
            log.append(Entry {
                n,
                note: format!("record \"{n}\"}}"),
            })
            .unwrap();
        }
    }

    /// A log file's lines (for tests that edit logs).
    pub(crate) fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    }

    #[test]
    fn chain_verifies_and_continues_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 3, None);
        write_log(&path, 3, 5, None);
        assert_eq!(verify(&path).unwrap().records, 5);
        let records = read_records(&path).unwrap();
        assert_eq!(records[4]["n"], 4);
        assert_eq!(records[4]["note"], "record \"4\"}");
    }

    #[test]
    fn edits_deletions_and_reordering_name_the_record() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 4, None);
        let original = lines(&path);
        let rewrite = |lines: &[String]| std::fs::write(&path, lines.join("\n") + "\n").unwrap();
        let broken_at = |lines: &[String]| {
            rewrite(lines);
            verify(&path).unwrap_err().line
        };

        let mut edited = original.clone();
        edited[1] = edited[1].replace("\"n\":1", "\"n\":9");
        assert_eq!(broken_at(&edited), 2, "the edited record itself");

        let mut deleted = original.clone();
        deleted.remove(1);
        assert_eq!(broken_at(&deleted), 2, "the record after the gap");

        let mut moved = original.clone();
        moved.swap(1, 2);
        assert_eq!(broken_at(&moved), 2);

        let mut first_gone = original.clone();
        first_gone.remove(0);
        assert_eq!(broken_at(&first_gone), 1);

        let mut last_gone = original.clone();
        last_gone.pop();
        assert_eq!(
            broken_at(&last_gone),
            4,
            "the head names the missing last record"
        );

        rewrite(&original);
        assert_eq!(verify(&path).unwrap().records, 4);
    }

    #[test]
    fn rotation_keeps_one_chain_across_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 10, Some(200));
        write_log(&path, 10, 12, Some(200));
        let verified = verify(&path).unwrap();
        assert_eq!(verified.records, 12);
        assert!(verified.files.len() > 3, "{:?}", verified.files);
        assert_eq!(verified.files.last(), Some(&path));
        let ns: Vec<u64> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["n"].as_u64().unwrap())
            .collect();
        assert_eq!(ns, (0..12).collect::<Vec<_>>());

        std::fs::remove_file(&verified.files[1]).unwrap();
        let broken = verify(&path).unwrap_err();
        assert_eq!(broken.file, verified.files[2]);
        assert_eq!(broken.line, 1);
    }

    #[test]
    fn records_written_together_are_all_committed_in_one_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        let log = Arc::new(AuditLog::open(&path, Some(4096)).unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        runtime.block_on(async {
            let writes: Vec<_> = (0..200)
                .map(|n| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let note = format!("record {n}");
                        log.write(Entry { n, note }).await
                    })
                })
                .collect();
            for write in writes {
                write.await.unwrap().unwrap();
            }
        });
        let verified = verify(&path).unwrap();
        assert_eq!(verified.records, 200);
        let mut seen: Vec<u64> = read_records(&path)
            .unwrap()
            .iter()
            .map(|r| r["n"].as_u64().unwrap())
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..200).collect::<Vec<_>>());
        assert_eq!(log.recent().len(), 200);
    }

    #[test]
    fn a_torn_last_line_is_set_aside_and_the_chain_continues() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 2, None);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(b"{\"n\":2,\"no").unwrap();
        drop(file);
        write_log(&path, 3, 4, None);
        assert_eq!(verify(&path).unwrap().records, 3);
        let torn = std::fs::read_to_string(dir.path().join("audit.jsonl.torn")).unwrap();
        assert_eq!(torn, "{\"n\":2,\"no\n");
    }

    #[test]
    fn reopening_continues_from_the_last_line_with_a_hash() {
        // After the last record: a carriage return before its newline (a file converted to
        // CRLF), an empty line, and a line that is not a record. The chain continues from
        // the last record all the same (and `verify` names the line that is not one).
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 2, None);
        let written = lines(&path);
        let hash = |line: &str| split_hash(line).unwrap().1.to_string();
        let damaged = format!("{}\n{}\r\n\n{{}}\n", written[0], written[1]);
        std::fs::write(&path, damaged).unwrap();
        write_log(&path, 2, 3, None);
        let appended: serde_json::Value =
            serde_json::from_str(lines(&path).last().unwrap()).unwrap();
        assert_eq!(appended["prev"], hash(&written[1]));
        assert_eq!(verify(&path).unwrap_err().line, 3);
    }

    #[test]
    fn reopening_reads_back_across_lines_longer_than_a_block() {
        // A last record of 150 KiB and a torn tail of 100 KiB: both span several of the
        // 64 KiB blocks in which a reopened log is read backwards from its end.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.jsonl");
        write_log(&path, 0, 1, None);
        let log = AuditLog::open(&path, None).unwrap();
        let long = "x".repeat(150 * 1024);
        log.append(Entry {
            n: 1,
            note: long.clone(),
        })
        .unwrap();
        drop(log);
        let torn_tail = format!("{{\"n\":2,\"note\":\"{}", "y".repeat(100 * 1024));
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(torn_tail.as_bytes()).unwrap();
        drop(file);
        write_log(&path, 3, 4, None);
        let records = read_records(&path).unwrap();
        assert_eq!(records.len(), 3);
        assert_eq!(records[1]["note"], long.as_str());
        assert_eq!(records[2]["n"], 3);
        let torn = std::fs::read_to_string(dir.path().join("audit.jsonl.torn")).unwrap();
        assert_eq!(torn, torn_tail + "\n");
    }
}
