//! `tally audit register`: the public transparency register. It reads gateway audit logs and
//! writes what a member of the public may see of every query (when, for which project and
//! purpose, the SQL, the decision and its reason codes, the trusts that answered an answered
//! query, the policy version) as `register.json` and a static, self-contained `index.html`.
//!
//! Never published: who asked (user, groups), tokens, the answers or their size, anything
//! about suppressed groups, obligations, the releases sent to the trusts (their models and
//! SQL hold constants too). Any query's SQL, answered or not, may hold what should not be
//! public (an NHS number or a rare diagnosis code in a `WHERE` clause), so it is published
//! with every constant, quoted name and comment replaced by `?`, or withheld when it does
//! not tokenize.
//!
//! The gateway logs a query planned by `GetFlightInfo` twice: a `describe` record, then the
//! `run` record of the `DoGet` that follows. The register lists runs, and describes that
//! stopped the query (refused or failed, so that no run followed); a successful describe
//! (outcome `described`) is left to its run.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::{DateTime, SecondsFormat};
use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer, Whitespace};
use serde::{Deserialize, Serialize};
use tally_common::audit::{ChainBreak, ReplayError, now_millis, replay_into};

/// Published in place of the SQL of a query that does not tokenize.
pub const WITHHELD_SQL: &str = "(withheld: the text could not be parsed)";

/// A query's decision, as the gateway logged it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The query was answered.
    Answered,
    /// The policy or the code's floor refused the query.
    Refused,
    /// The query was allowed but could not be completed (a trust down, an engine error).
    Failed,
}

impl Outcome {
    /// The word the register uses, e.g. `refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Answered => "answered",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

/// The fields the register reads of one gateway audit record; all others (the releases and
/// their SQL, obligations, sizes, the user) are ignored.
#[derive(Deserialize)]
struct LoggedQuery {
    time_ms: u64,
    query_id: String,
    /// Absent in records written before describes were logged: those were all runs.
    #[serde(default)]
    step: Step,
    #[serde(default)]
    identity: LoggedIdentity,
    sql: String,
    policy_version: Option<String>,
    #[serde(default)]
    trusts: Vec<String>,
    outcome: LoggedOutcome,
    #[serde(default)]
    codes: Vec<String>,
    /// Absent in records written before budgets were charged.
    #[serde(default)]
    rho_charged: Option<f64>,
}

/// Which request a gateway audit record is for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Step {
    /// `GetFlightInfo`: planned and decided, not run.
    Describe,
    /// `DoGet`: run and answered, or stopped.
    #[default]
    Run,
}

/// A decision as logged, including a describe's `described`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum LoggedOutcome {
    Answered,
    Described,
    Refused,
    Failed,
}

impl LoggedOutcome {
    /// The public decision of a record, or `None` when the register does not list it: a
    /// successful describe, whose run is listed instead. A describe that was refused or
    /// failed is listed, since no run follows it.
    fn published(self, step: Step) -> Result<Option<Outcome>, String> {
        Ok(match (step, self) {
            (Step::Describe, LoggedOutcome::Described) => None,
            (Step::Run, LoggedOutcome::Described) => {
                return Err("a run record has the outcome 'described'".into());
            }
            (_, LoggedOutcome::Answered) => Some(Outcome::Answered),
            (_, LoggedOutcome::Refused) => Some(Outcome::Refused),
            (_, LoggedOutcome::Failed) => Some(Outcome::Failed),
        })
    }
}

/// The public part of a logged identity: the user's name and groups are not read.
#[derive(Default, Deserialize)]
struct LoggedIdentity {
    #[serde(default)]
    project: String,
    #[serde(default)]
    purpose: String,
}

/// One query as the public sees it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    /// When the gateway received the query, ISO-8601 UTC with milliseconds.
    pub time: String,
    /// The query id (the same id is in the gateway's and every trust's log).
    pub query_id: String,
    /// The project the query was for.
    pub project: String,
    /// The purpose of the query.
    pub purpose: String,
    /// The SQL without its constants, quoted names and comments (see [`public_sql`]).
    pub sql: String,
    /// The decision.
    pub outcome: Outcome,
    /// Reason codes of a refusal or failure.
    pub reason_codes: Vec<String>,
    /// Trusts that answered their part, for an answered query; empty otherwise.
    pub trusts: Vec<String>,
    /// The version of the policy that decided (absent when the policy was not reached).
    pub policy_version: Option<String>,
    /// The privacy budget (zCDP ρ) the query cost its project at each trust; absent when
    /// it was not paid for (refused before, or a policy without noise).
    pub budget_spent: Option<f64>,
}

/// The whole register.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Register {
    /// When the register was generated, ISO-8601 UTC.
    pub generated_at: String,
    /// Every logged query, newest first.
    pub entries: Vec<Entry>,
}

/// Why the register could not be written.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// A log is missing, unreadable, or its hash chain does not verify.
    #[error("the log does not verify: {0}")]
    Chain(ChainBreak),
    /// A record of a log is not a gateway audit record.
    #[error("{}, record {record}: {reason}", path.display())]
    Record {
        /// The log file.
        path: PathBuf,
        /// The record (1-based, across the log's rotated files).
        record: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// The output folder or a file in it could not be written.
    #[error("cannot write {}: {source}", path.display())]
    Write {
        /// The folder or file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Reads every record of the gateway audit logs `logs` into a register, newest first.
pub fn read(logs: &[PathBuf]) -> Result<Register, RegisterError> {
    let mut timed = Vec::new();
    for path in logs {
        read_log(path, &mut timed)?;
    }
    timed.sort_by_key(|(ms, _)| std::cmp::Reverse(*ms));
    Ok(Register {
        generated_at: iso_time(now_millis()).unwrap_or_default(),
        entries: timed.into_iter().map(|(_, entry)| entry).collect(),
    })
}

/// Appends the entries of the log at `path` (with its rotated files) to `timed`, each with
/// its time in milliseconds. A log whose hash chain does not verify is not published.
/// Records the register does not list (successful describes) are skipped.
fn read_log(path: &Path, timed: &mut Vec<(u64, Entry)>) -> Result<(), RegisterError> {
    // Each record is read into its public entry as the chain is verified, so memory holds
    // the entries, never a whole log's records (a busy gateway logs gigabytes).
    replay_into(path, |record| {
        parse_record(record).map(|parsed| timed.extend(parsed))
    })
    .map(|_| ())
    .map_err(|error| match error {
        ReplayError::Chain(chain) => RegisterError::Chain(chain),
        ReplayError::Rejected { record, why } => RegisterError::Record {
            path: path.to_path_buf(),
            record,
            reason: why,
        },
    })
}

/// The public entry for one gateway audit record, with its time in milliseconds, or `None`
/// for a record the register does not list.
fn parse_record(record: serde_json::Value) -> Result<Option<(u64, Entry)>, String> {
    let record: LoggedQuery = serde_json::from_value(record).map_err(json_reason)?;
    let time = iso_time(record.time_ms)
        .ok_or_else(|| format!("time_ms {} is out of range", record.time_ms))?;
    let Some(outcome) = record.outcome.published(record.step)? else {
        return Ok(None);
    };
    let entry = Entry {
        time,
        query_id: record.query_id,
        project: record.identity.project,
        purpose: record.identity.purpose,
        sql: public_sql(&record.sql, outcome),
        outcome,
        reason_codes: distinct(record.codes),
        // Only an answered query names its trusts (each it reached answered). A query that
        // failed or was refused on the way logs the trusts that answered before it stopped,
        // which would name the one that did not: whether a trust fails can depend on its data.
        trusts: match outcome {
            Outcome::Answered => record.trusts,
            Outcome::Refused | Outcome::Failed => Vec::new(),
        },
        policy_version: record.policy_version,
        budget_spent: record.rho_charged,
    };
    Ok(Some((record.time_ms, entry)))
}

/// Why a line did not read as a gateway audit record, e.g. `not JSON (column 1): expected value`.
fn json_reason(err: serde_json::Error) -> String {
    let text = err.to_string();
    // serde_json ends its message with the position within the line, which we give ourselves.
    let message = text
        .rsplit_once(" at line ")
        .map_or(text.as_str(), |(m, _)| m);
    let what = match err.classify() {
        serde_json::error::Category::Data => "not a gateway audit record",
        _ => "not JSON",
    };
    format!("{what} (column {}): {message}", err.column())
}

/// `codes` without repeats, in first-seen order (a refusal names a rule once per column).
fn distinct(codes: Vec<String>) -> Vec<String> {
    let mut seen = Vec::with_capacity(codes.len());
    for code in codes {
        if !seen.contains(&code) {
            seen.push(code);
        }
    }
    seen
}

/// Milliseconds since the Unix epoch as ISO-8601 UTC, e.g. `2025-06-01T14:03:07.120Z`.
fn iso_time(ms: u64) -> Option<String> {
    let ms = i64::try_from(ms).ok()?;
    DateTime::from_timestamp_millis(ms).map(|t| t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

/// The SQL the register publishes, whatever the query's outcome: without its constants,
/// quoted names and comments, or [`WITHHELD_SQL`] when it does not tokenize. (An answered
/// query can hold an NHS number or a rare code as much as a refused one; the outcome is
/// taken only so that callers need not change.)
pub fn public_sql(sql: &str, _outcome: Outcome) -> String {
    without_literals(sql).unwrap_or_else(|| WITHHELD_SQL.to_string())
}

/// `sql` with every string and number literal, placeholder, quoted name and comment replaced
/// by `?`, or `None` when DataFusion's SQL tokenizer (generic dialect) does not accept it.
pub fn without_literals(sql: &str) -> Option<String> {
    let tokens = Tokenizer::new(&GenericDialect {}, sql).tokenize().ok()?;
    Some(tokens.iter().map(public_token).collect())
}

/// A token's text, or `?` in place of anything an analyst typed as a value.
fn public_token(token: &Token) -> String {
    match token {
        value if tally_gateway::parse::is_value_token(value) => "?".to_string(),
        // A quoted name may be a value typed in the wrong quotes: "9434765919".
        Token::Word(word) if word.quote_style.is_some() => "?".to_string(),
        Token::Whitespace(Whitespace::SingleLineComment { prefix, comment }) => {
            let newline = if comment.ends_with('\n') { "\n" } else { "" };
            format!("{prefix} ?{newline}")
        }
        Token::Whitespace(Whitespace::MultiLineComment(_)) => "/* ? */".to_string(),
        other => other.to_string(),
    }
}

/// Writes `register.json` and `index.html` into `out`, creating the folder if needed.
pub fn write(register: &Register, out: &Path) -> Result<(), RegisterError> {
    let write_error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RegisterError::Write { path, source }
    };
    std::fs::create_dir_all(out).map_err(write_error(out))?;
    let json = serde_json::to_string_pretty(register).map_err(|err| RegisterError::Write {
        path: out.join("register.json"),
        source: err.into(),
    })?;
    let json_path = out.join("register.json");
    std::fs::write(&json_path, json + "\n").map_err(write_error(&json_path))?;
    let html_path = out.join("index.html");
    std::fs::write(&html_path, render_html(register)).map_err(write_error(&html_path))
}

/// `text` with `& < > " '` escaped for HTML text and attribute values.
fn escape(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => escaped.push_str("&amp;"),
            '<' => escaped.push_str("&lt;"),
            '>' => escaped.push_str("&gt;"),
            '"' => escaped.push_str("&quot;"),
            '\'' => escaped.push_str("&#39;"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// An ISO-8601 time in a chrono `format` people read, e.g. `1 Jun 2025` for `%-d %b %Y`
/// (unchanged if it does not parse).
fn readable_time(iso: &str, format: &str) -> String {
    DateTime::parse_from_rfc3339(iso)
        .map_or_else(|_| iso.to_string(), |t| t.format(format).to_string())
}

/// The register's stylesheet: readable type, zebra rows, wrapping SQL.
const STYLE: &str = r#"
:root { --ink: #1d2329; --muted: #56606b; --line: #d9dee3; --zebra: #f4f6f8;
  --accent: #005eb8; --ok: #1b6e3a; --ok-bg: #e3f2e8; --no: #8a4b00; --no-bg: #fdf0dc;
  --fail: #a11d21; --fail-bg: #fbe4e4; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff;
  font: 16px/1.55 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
.wrap { max-width: 1200px; margin: 0 auto; padding: 0 24px; }
header { background: var(--accent); color: #fff; padding: 28px 0 24px; }
header h1 { margin: 0 0 8px; font-size: 2rem; letter-spacing: -0.01em; }
header p { margin: 0; max-width: 52em; font-size: 1.05rem; }
.generated { margin: 18px 0 0; color: var(--muted); font-size: 0.9rem; }
.summary { display: flex; flex-wrap: wrap; gap: 12px; margin: 16px 0 8px; }
.stat { flex: 1 1 140px; border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px; }
.stat .n { display: block; font-size: 1.8rem; font-weight: 700; line-height: 1.2; }
.stat .label { color: var(--muted); font-size: 0.9rem; }
.stat.answered .n { color: var(--ok); }
.stat.refused .n { color: var(--no); }
.stat.failed .n { color: var(--fail); }
.projects { margin: 12px 0 20px; }
.projects span { display: inline-block; margin: 2px 6px 2px 0; padding: 1px 10px;
  border-radius: 999px; background: var(--zebra); border: 1px solid var(--line); font-size: 0.9rem; }
.table-wrap { overflow-x: auto; border: 1px solid var(--line); border-radius: 8px; }
table { width: 100%; border-collapse: collapse; font-size: 0.92rem; }
th, td { padding: 10px 12px; text-align: left; vertical-align: top; }
th { background: #e8edf2; font-weight: 600; border-bottom: 2px solid var(--line); }
tbody tr:nth-child(even) { background: var(--zebra); }
tbody tr + tr td { border-top: 1px solid var(--line); }
td.when { white-space: nowrap; }
td.sql { width: 40%; }
.small { display: block; color: var(--muted); font-size: 0.85rem; }
.id { display: block; margin-top: 6px; color: var(--muted); font-size: 0.75rem; }
td.version code { white-space: nowrap; font-size: 0.8rem; }
code { font: 0.86rem/1.45 ui-monospace, SFMono-Regular, Menlo, Consolas, monospace; }
td.sql code { display: block; white-space: pre-wrap; overflow-wrap: anywhere; min-width: 18em; }
.badge { display: inline-block; padding: 1px 10px; border-radius: 999px; font-weight: 600;
  font-size: 0.85rem; }
.badge.answered { color: var(--ok); background: var(--ok-bg); }
.badge.refused { color: var(--no); background: var(--no-bg); }
.badge.failed { color: var(--fail); background: var(--fail-bg); }
.codes { margin-top: 4px; }
.codes code { display: block; font-size: 0.78rem; color: var(--muted); }
.empty { padding: 24px; text-align: center; color: var(--muted); }
footer.wrap { margin: 32px auto 48px; color: var(--muted); font-size: 0.9rem; }
footer h2 { color: var(--ink); font-size: 1.05rem; margin: 0 0 6px; }
footer p { max-width: 60em; margin: 0 0 10px; }
"#;

/// The introduction for a member of the public.
const INTRODUCTION: &str = "NHS trusts use Tally to let approved staff and researchers ask \
statistical questions of the patient records each trust holds, without those records ever \
leaving the trust. Only totals such as counts, sums and averages come back, each protected \
so that it does not reveal any one patient. This register lists every question put to \
Tally: when it was asked, for which project and purpose, the question itself (written in SQL, \
a database language), whether it was answered or refused and why, and which trusts answered. \
It never shows who asked, nor the answers.";

/// The footer: what is withheld and why (`{withheld}` stands for [`WITHHELD_SQL`]).
const FOOTER: &str = "<h2>What this register leaves out, and why</h2>\
<p>It never shows who asked a question, the answers, or how the question was split between \
the trusts.</p>\
<p>A question, answered or not, may contain something that should not be public, such as an \
NHS number or a rare diagnosis code. Every question is therefore shown with every text, \
number and date value (and every quoted name and comment) replaced by <code>?</code>; a \
question whose text cannot be read that way is shown as <code>{withheld}</code>.</p>\
<p>The codes under a decision, such as <code>E_NOT_AGGREGATE</code>, name the rule that refused \
or stopped the question; Tally's documentation lists them all. Times are in UTC.</p>";

/// The register as one static, self-contained HTML page (inline CSS, no scripts, nothing
/// fetched), every text value escaped.
pub fn render_html(register: &Register) -> String {
    let mut html = String::new();
    html.push_str("<!DOCTYPE html>\n<html lang=\"en-GB\">\n<head>\n<meta charset=\"utf-8\">\n");
    html.push_str("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n");
    html.push_str("<title>Tally transparency register</title>\n");
    let _ = writeln!(html, "<style>{STYLE}</style>\n</head>\n<body>");
    let _ = writeln!(
        html,
        "<header><div class=\"wrap\"><h1>Tally transparency register</h1><p>{}</p></div></header>",
        escape(INTRODUCTION)
    );
    html.push_str("<main class=\"wrap\">\n");
    let _ = writeln!(
        html,
        "<p class=\"generated\">Generated {}.</p>",
        escape(&readable_time(
            &register.generated_at,
            "%-d %B %Y at %H:%M UTC"
        ))
    );
    html.push_str(&summary_html(&register.entries));
    html.push_str(&table_html(&register.entries));
    let _ = writeln!(
        html,
        "</main>\n<footer class=\"wrap\">{}</footer>\n</body>\n</html>",
        FOOTER.replace("{withheld}", &escape(WITHHELD_SQL))
    );
    html
}

/// The counts by decision and the projects, as HTML.
fn summary_html(entries: &[Entry]) -> String {
    let count = |outcome: Outcome| entries.iter().filter(|e| e.outcome == outcome).count();
    let mut html = String::from("<section class=\"summary\" aria-label=\"Summary\">\n");
    let _ = writeln!(
        html,
        "<div class=\"stat\"><span class=\"n\">{}</span><span class=\"label\">questions asked</span></div>",
        entries.len()
    );
    for outcome in [Outcome::Answered, Outcome::Refused, Outcome::Failed] {
        let name = outcome.as_str();
        let _ = writeln!(
            html,
            "<div class=\"stat {name}\"><span class=\"n\">{}</span><span class=\"label\">{name}</span></div>",
            count(outcome)
        );
    }
    let mut projects: BTreeMap<&str, usize> = BTreeMap::new();
    for entry in entries {
        *projects.entry(entry.project.as_str()).or_default() += 1;
    }
    let _ = writeln!(
        html,
        "<div class=\"stat\"><span class=\"n\">{}</span><span class=\"label\">projects</span></div>\n</section>",
        projects.len()
    );
    if !projects.is_empty() {
        html.push_str("<p class=\"projects\"><strong>Projects:</strong> ");
        for (project, questions) in projects {
            let plural = if questions == 1 { "" } else { "s" };
            let _ = write!(
                html,
                "<span>{} ({questions} question{plural})</span>",
                escape(project)
            );
        }
        html.push_str("</p>\n");
    }
    html
}

/// The table of entries, one row each, as HTML.
fn table_html(entries: &[Entry]) -> String {
    let mut html = String::from(
        "<div class=\"table-wrap\"><table>\n<thead><tr><th>When</th><th>Project and purpose</th>\
         <th>Question (SQL)</th><th>Decision</th><th>Trusts that answered</th>\
         <th>Budget spent (ρ)</th><th>Policy</th></tr></thead>\n<tbody>\n",
    );
    if entries.is_empty() {
        html.push_str(
            "<tr><td colspan=\"7\" class=\"empty\">No questions have been asked yet.</td></tr>\n",
        );
    }
    for entry in entries {
        html.push_str(&row_html(entry));
    }
    html.push_str("</tbody>\n</table></div>\n");
    html
}

/// One entry as a table row.
fn row_html(entry: &Entry) -> String {
    let outcome = entry.outcome.as_str();
    let codes: String = entry
        .reason_codes
        .iter()
        .map(|code| format!("<code>{}</code>", escape(code)))
        .collect();
    let trusts = if entry.trusts.is_empty() {
        "none".to_string()
    } else {
        escape(&entry.trusts.join(", "))
    };
    format!(
        "<tr><td class=\"when\"><time datetime=\"{time}\">{date}<br>{clock}</time>\
         </td>\
         <td>{project}<span class=\"small\">{purpose}</span></td>\
         <td class=\"sql\"><code>{sql}</code><span class=\"id\">query id {id}</span></td>\
         <td><span class=\"badge {outcome}\">{outcome}</span><div class=\"codes\">{codes}</div></td>\
         <td>{trusts}</td><td>{budget}</td><td class=\"version\"><code>{version}</code></td></tr>\n",
        budget = entry
            .budget_spent
            .map_or_else(|| "none".to_string(), |rho| format!("{rho}")),
        time = escape(&entry.time),
        date = escape(&readable_time(&entry.time, "%-d %b %Y")),
        clock = escape(&readable_time(&entry.time, "%H:%M:%S UTC")),
        id = escape(&entry.query_id),
        project = escape(&entry.project),
        purpose = escape(&entry.purpose),
        sql = escape(&entry.sql),
        version = escape(entry.policy_version.as_deref().unwrap_or("none")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// A gateway audit record in the current format, with releases holding constants.
    fn record(step: &str, outcome: &str, sql: &str) -> serde_json::Value {
        json!({
            "time_ms": 1_748_786_587_120u64,
            "query_id": "q-1",
            "step": step,
            "peer": "10.0.0.7:5555",
            "identity": {"user": "dr.who", "groups": ["analysts"], "project": "eating-disorders",
                         "purpose": "service_planning"},
            "sql": sql,
            "policy_version": "v7",
            "obligations": {"noise": "gaussian"},
            "releases": [{"fact": "episodes", "where": {"eq": ["diagnosis_icd10", "F50.0"]}}],
            "release_sql": ["SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 = 'F50.0'"],
            "trusts": ["RXX", "RYY"],
            "outcome": outcome,
            "codes": [],
            "rows": 1,
            "rows_from_trusts": 2,
            "bytes_from_trusts": 912,
            "duration_ms": 12.5,
            "detail": null
        })
    }

    const ANSWERED_SQL: &str = "SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 = 'F50.0' \
                                AND nhs_number <> 4010232137 -- Mrs Smith";

    #[test]
    fn an_answered_query_is_published_without_its_constants() {
        let (ms, entry) = parse_record(record("run", "answered", ANSWERED_SQL))
            .expect("parses")
            .expect("listed");
        assert_eq!(ms, 1_748_786_587_120);
        assert_eq!(entry.outcome, Outcome::Answered);
        assert_eq!(
            entry.sql,
            "SELECT COUNT(*) FROM episodes WHERE diagnosis_icd10 = ? AND nhs_number <> ? -- ?"
        );
        assert_eq!(entry.trusts, ["RXX", "RYY"]);
        assert_eq!(entry.project, "eating-disorders");
        let register = Register {
            generated_at: "2025-06-01T14:03:07.120Z".into(),
            entries: vec![entry],
        };
        let json = serde_json::to_string(&register).expect("json");
        let html = render_html(&register);
        for text in [&json, &html] {
            for secret in [
                "F50.0",
                "4010232137",
                "Smith",
                "dr.who",
                "analysts",
                "release",
                "episodes WHERE diagnosis_icd10 = '",
                "gaussian",
                "912",
                "suppress",
            ] {
                assert!(!text.contains(secret), "the register shows {secret}");
            }
        }
    }

    #[test]
    fn every_outcome_is_masked_alike() {
        let sql = "SELECT COUNT(*) FROM patients WHERE \"9434765919\" = DATE '1970-01-01' /* x */";
        let masked = "SELECT COUNT(*) FROM patients WHERE ? = DATE ? /* ? */";
        for outcome in [Outcome::Answered, Outcome::Refused, Outcome::Failed] {
            assert_eq!(public_sql(sql, outcome), masked);
            assert_eq!(public_sql("SELECT 'open", outcome), WITHHELD_SQL);
        }
        // A query without constants reads as typed.
        let plain = "SELECT specialty, COUNT(*) AS n\nFROM episodes GROUP BY specialty";
        assert_eq!(public_sql(plain, Outcome::Answered), plain);
    }

    #[test]
    fn only_an_answered_query_names_its_trusts() {
        // The log of a query that failed or was refused on the way lists the trusts that
        // answered before it stopped (here RXX and RYY); published, that would name the
        // trust that did not, and whether a trust fails can depend on its data.
        for outcome in ["failed", "refused"] {
            let (_, entry) = parse_record(record("run", outcome, "SELECT COUNT(*) FROM episodes"))
                .expect("parses")
                .expect("listed");
            assert!(entry.trusts.is_empty(), "{outcome}: {:?}", entry.trusts);
            let html = render_html(&Register {
                generated_at: "2025-06-01T14:03:07.120Z".into(),
                entries: vec![entry],
            });
            assert!(!html.contains("RXX") && !html.contains("RYY"), "{html}");
        }
    }

    #[test]
    fn describes_are_left_to_their_runs_unless_they_stopped_the_query() {
        let sql = "SELECT COUNT(*) FROM episodes";
        assert_eq!(
            parse_record(record("describe", "described", sql)).expect("parses"),
            None
        );
        let refused = parse_record(record("describe", "refused", sql))
            .expect("parses")
            .expect("a refused describe is listed: no run follows it");
        assert_eq!(refused.1.outcome, Outcome::Refused);
        let run = parse_record(record("run", "failed", sql))
            .expect("parses")
            .expect("listed");
        assert_eq!(run.1.outcome, Outcome::Failed);
        let err = parse_record(record("run", "described", sql)).expect_err("malformed");
        assert!(err.contains("described"), "{err}");
        let err = parse_record(record("plan", "answered", sql)).expect_err("unknown step");
        assert!(err.starts_with("not a gateway audit record"), "{err}");
        // Records from before describes were logged have no step: they are runs.
        let mut legacy = record("run", "answered", "SELECT 1");
        legacy.as_object_mut().expect("object").remove("step");
        assert!(parse_record(legacy).expect("parses").is_some());
    }

    #[test]
    fn a_log_with_a_describe_and_its_run_lists_the_query_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("gateway.jsonl");
        let log = tally_common::audit::AuditLog::open(&path, None).expect("log");
        log.append(record("describe", "described", ANSWERED_SQL))
            .expect("appended");
        log.append(record("run", "answered", ANSWERED_SQL))
            .expect("appended");
        drop(log);
        let register = read(&[path]).expect("reads");
        assert_eq!(register.entries.len(), 1);
        assert_eq!(register.entries[0].outcome, Outcome::Answered);
        assert!(!register.entries[0].sql.contains("F50.0"));
    }
}
