//! Rego policies, evaluated in-process with regorus.
//!
//! A policy folder holds `.rego` files and `.json` data files (the governance catalogue:
//! column classes, projects, purposes, budgets). Every decision carries the policy
//! version, a hash of those files. Reloading keeps the previous policy when the new one
//! fails to load, and queries in flight finish on the policy they started with.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ErrorCode, TallyError};
use crate::governance::Governance;

/// The rule every decision is read from.
pub const DECISION_RULE: &str = "data.tally.decision";

/// Why a policy folder could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("policy {path}: {reason}")]
pub struct PolicyError {
    /// The file (or folder) at fault.
    pub path: PathBuf,
    /// What is wrong, as the Rego parser or JSON reader put it.
    pub reason: String,
}

/// One reason for a refusal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Stable reason code, e.g. `E_IDENTIFIER_COLUMN`.
    pub code: String,
    /// A message for the analyst.
    pub message: String,
}

/// What the policy requires of an allowed query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Obligations {
    /// Whether the National Data Opt-out applies to this query.
    pub apply_opt_out: bool,
    /// Trusts the query may use; absent means every trust.
    #[serde(default)]
    pub trusts: Option<Vec<String>>,
    /// What the query costs and what the project may spend (zCDP ρ, per trust).
    pub budget: BudgetObligation,
}

/// The privacy budget the policy sets for a query's project.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetObligation {
    /// The dataset the budget is kept for.
    pub dataset: String,
    /// ρ each release of the query costs.
    pub rho_per_release: f64,
    /// The total ρ the project may spend on the dataset.
    pub rho_cap: f64,
}

impl Default for Obligations {
    /// What a decision without obligations gets: the strictest there is (no trust, no
    /// budget), so a policy that forgets them fails closed.
    fn default() -> Self {
        Obligations {
            apply_opt_out: true,
            trusts: Some(Vec::new()),
            budget: BudgetObligation {
                dataset: String::new(),
                rho_per_release: f64::INFINITY,
                rho_cap: 0.0,
            },
        }
    }
}

/// A policy decision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the query may run.
    pub allow: bool,
    /// Why not, when it may not.
    #[serde(default)]
    pub reasons: Vec<Reason>,
    /// What an allowed query must respect.
    #[serde(default)]
    pub obligations: Obligations,
    /// The version (hash) of the policy that decided.
    #[serde(default)]
    pub policy_version: String,
}

impl Decision {
    /// The refusal as one of our errors: the first reason's code and every message.
    pub fn refusal(&self) -> Option<TallyError> {
        if self.allow {
            return None;
        }
        let code = self
            .reasons
            .first()
            .and_then(|r| ErrorCode::parse(&r.code))
            .unwrap_or(ErrorCode::PolicyDenied);
        let message = if self.reasons.is_empty() {
            "the policy does not allow this query".to_string()
        } else {
            self.reasons
                .iter()
                .map(|r| format!("{} ({})", r.message, r.code))
                .collect::<Vec<_>>()
                .join("; ")
        };
        Some(TallyError::new(code, message))
    }
}

/// A loaded policy folder.
struct Loaded {
    engine: Mutex<regorus::Engine>,
    version: String,
    data: serde_json::Value,
    governance: Governance,
    /// Decisions this version has made, by input document (absent when the rules draw
    /// random numbers, so that the same input may be decided differently).
    decided: Option<Mutex<HashMap<String, Decision>>>,
}

/// Decisions remembered per policy version; the memory is emptied when it fills.
const DECIDED_CAPACITY: usize = 4096;

/// Whether rules written in `text` decide the same input the same way every time. The
/// engine is built without its clock, HTTP, UUID and runtime built-ins, so the only
/// source of variation left is `rand.intn`.
fn deterministic(text: &str) -> bool {
    !text.contains("rand.")
}

/// One loaded version of a policy: its files' hash, its catalogue and its rules. A query is
/// decided, lowered and validated against one snapshot, so a reload mid-query cannot mix
/// two versions.
#[derive(Clone)]
pub struct PolicySnapshot(Arc<Loaded>);

impl std::fmt::Debug for PolicySnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PolicySnapshot")
            .field("version", &self.0.version)
            .finish()
    }
}

impl PolicySnapshot {
    /// The version (hash) of the files.
    pub fn version(&self) -> &str {
        &self.0.version
    }

    /// The governance catalogue.
    pub fn governance(&self) -> &Governance {
        &self.0.governance
    }

    /// The merged JSON data of the folder.
    pub fn data(&self) -> &serde_json::Value {
        &self.0.data
    }

    /// Decides on a policy input document. Any failure to decide is a refusal.
    pub fn decide(&self, input: &serde_json::Value) -> Result<Decision, TallyError> {
        self.0.evaluate(input)
    }
}

/// The policy of one gateway or node, reloadable while queries run.
pub struct Policy {
    dir: PathBuf,
    current: RwLock<Arc<Loaded>>,
}

impl std::fmt::Debug for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Policy")
            .field("dir", &self.dir)
            .field("version", &self.version())
            .finish()
    }
}

/// The `.rego` and `.json` files of a folder, sorted by name.
fn policy_files(dir: &Path) -> Result<Vec<PathBuf>, PolicyError> {
    let entries = std::fs::read_dir(dir).map_err(|e| PolicyError {
        path: dir.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("rego" | "json")
            )
        })
        .collect();
    files.sort();
    if !files
        .iter()
        .any(|p| p.extension().is_some_and(|e| e == "rego"))
    {
        return Err(PolicyError {
            path: dir.to_path_buf(),
            reason: "no .rego files".into(),
        });
    }
    Ok(files)
}

fn load(dir: &Path) -> Result<Loaded, PolicyError> {
    let mut engine = regorus::Engine::new();
    engine.set_rego_v0(false);
    let mut hasher = Sha256::new();
    let mut data = serde_json::Value::Object(Default::default());
    let mut memoisable = true;
    for path in policy_files(dir)? {
        let fail = |reason: String| PolicyError {
            path: path.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&path).map_err(|e| fail(e.to_string()))?;
        hasher.update(
            path.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        hasher.update([0]);
        hasher.update(text.as_bytes());
        hasher.update([0]);
        if path.extension().is_some_and(|e| e == "rego") {
            memoisable &= deterministic(&text);
            engine
                .add_policy(path.display().to_string(), text)
                .map_err(|e| fail(e.to_string()))?;
        } else {
            let value: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
            merge_json(&mut data, value.clone());
            engine
                .add_data(regorus::Value::from_json_str(&text).map_err(|e| fail(e.to_string()))?)
                .map_err(|e| fail(e.to_string()))?;
        }
    }
    let version = hex::encode(&hasher.finalize()[..8]);
    let governance = Governance::from_policy_data(&data).map_err(|reason| PolicyError {
        path: dir.join("catalogue.json"),
        reason,
    })?;
    let loaded = Loaded {
        engine: Mutex::new(engine),
        version,
        data,
        governance,
        decided: memoisable.then(|| Mutex::new(HashMap::new())),
    };
    // A policy that cannot produce a decision is not loaded.
    loaded
        .evaluate(&serde_json::json!({}))
        .map_err(|e| PolicyError {
            path: dir.to_path_buf(),
            reason: e.message,
        })?;
    Ok(loaded)
}

fn merge_json(into: &mut serde_json::Value, from: serde_json::Value) {
    match (into, from) {
        (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
            for (k, v) in b {
                merge_json(a.entry(k).or_insert(serde_json::Value::Null), v);
            }
        }
        (slot, value) => *slot = value,
    }
}

impl Loaded {
    /// The decision for `input`: remembered when this version has decided the same input
    /// before (a policy is a function of its files and its input), evaluated otherwise.
    fn evaluate(&self, input: &serde_json::Value) -> Result<Decision, TallyError> {
        let Some(decided) = &self.decided else {
            return self.evaluate_rules(&input.to_string());
        };
        let input = input.to_string();
        if let Some(decision) = decided
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&input)
        {
            return Ok(decision.clone());
        }
        let decision = self.evaluate_rules(&input)?;
        let mut decided = decided.lock().unwrap_or_else(|p| p.into_inner());
        if decided.len() >= DECIDED_CAPACITY {
            decided.clear();
        }
        decided.insert(input, decision.clone());
        Ok(decision)
    }

    fn evaluate_rules(&self, input: &str) -> Result<Decision, TallyError> {
        let broken = |what: &str| {
            tracing::error!(error = what, "policy evaluation failed");
            TallyError::new(
                ErrorCode::PolicyError,
                "the policy could not decide, so the query is refused",
            )
        };
        let input = regorus::Value::from_json_str(input).map_err(|e| broken(&e.to_string()))?;
        let value = {
            let mut engine = self.engine.lock().unwrap_or_else(|p| p.into_inner());
            engine.set_input(input);
            engine
                .eval_rule(DECISION_RULE.to_string())
                .map_err(|e| broken(&e.to_string()))?
        };
        let json = value.to_json_str().map_err(|e| broken(&e.to_string()))?;
        let mut decision: Decision =
            serde_json::from_str(&json).map_err(|e| broken(&e.to_string()))?;
        decision.policy_version = self.version.clone();
        Ok(decision)
    }
}

impl Policy {
    /// Loads the policy folder `dir`.
    pub fn load(dir: &Path) -> Result<Self, PolicyError> {
        let loaded = load(dir)?;
        Ok(Policy {
            dir: dir.to_path_buf(),
            current: RwLock::new(Arc::new(loaded)),
        })
    }

    fn current(&self) -> Arc<Loaded> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The folder this policy is loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The version (hash) of the loaded files.
    pub fn version(&self) -> String {
        self.current().version.clone()
    }

    /// The version in force now, to decide one query with.
    pub fn snapshot(&self) -> PolicySnapshot {
        PolicySnapshot(self.current())
    }

    /// Reloads from disk; on failure the previous policy stays in force and the error is
    /// returned (and logged). Returns the version in force.
    pub fn reload(&self) -> Result<String, PolicyError> {
        match load(&self.dir) {
            Ok(loaded) => {
                let version = loaded.version.clone();
                let mut current = self.current.write().unwrap_or_else(|p| p.into_inner());
                if current.version != version {
                    tracing::info!(%version, dir = %self.dir.display(), "policy reloaded");
                }
                *current = Arc::new(loaded);
                Ok(version)
            }
            Err(err) => {
                tracing::error!(error = %err, "policy reload failed; keeping the previous policy");
                Err(err)
            }
        }
    }

    /// Watches the folder: reloads when a file changes (checked every `every`) and on SIGHUP.
    pub fn watch(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        let policy = self.clone();
        tokio::spawn(async move {
            let mut last = fingerprint(&policy.dir);
            let mut ticks = tokio::time::interval(every);
            #[cfg(unix)]
            let mut hangups =
                tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
            loop {
                #[cfg(unix)]
                let hangup = async {
                    match hangups.as_mut() {
                        Some(signal) => {
                            signal.recv().await;
                        }
                        None => std::future::pending::<()>().await,
                    }
                };
                #[cfg(not(unix))]
                let hangup = std::future::pending::<()>();
                let forced = tokio::select! {
                    _ = ticks.tick() => false,
                    () = hangup => true,
                };
                let now = fingerprint(&policy.dir);
                if forced || now != last {
                    last = now;
                    let _ = policy.reload();
                }
            }
        })
    }
}

/// Names, sizes and modification times of the folder's policy files.
fn fingerprint(dir: &Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    policy_files(dir)
        .unwrap_or_default()
        .into_iter()
        .map(|p| {
            let meta = std::fs::metadata(&p).ok();
            let size = meta.as_ref().map_or(0, |m| m.len());
            let modified = meta.and_then(|m| m.modified().ok());
            (p, size, modified)
        })
        .collect()
}

/// The outcome of one `test_*` rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestOutcome {
    /// Package and rule, e.g. `data.tally_test.test_identifier_refused`.
    pub name: String,
    /// Whether it evaluated to true.
    pub passed: bool,
    /// Why it failed, when it did.
    pub detail: Option<String>,
}

/// Runs every `test_*` rule of the policy folder.
pub fn run_tests(dir: &Path) -> Result<Vec<TestOutcome>, PolicyError> {
    let loaded = load(dir)?;
    let mut engine = loaded
        .engine
        .into_inner()
        .unwrap_or_else(|p| p.into_inner());
    let mut names = Vec::new();
    for path in policy_files(dir)? {
        if path.extension().is_some_and(|e| e == "rego") {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            let package = text
                .lines()
                .find_map(|l| l.trim().strip_prefix("package "))
                .map(str::trim)
                .unwrap_or_default()
                .to_string();
            for line in text.lines() {
                if let Some(rest) = line.strip_prefix("test_") {
                    let rule: String = rest
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    let name = format!("data.{package}.test_{rule}");
                    if !names.contains(&name) {
                        names.push(name);
                    }
                }
            }
        }
    }
    Ok(names
        .into_iter()
        .map(|name| {
            engine.set_input(regorus::Value::new_object());
            match engine.eval_rule(name.clone()) {
                Ok(value) if value == regorus::Value::from(true) => TestOutcome {
                    name,
                    passed: true,
                    detail: None,
                },
                Ok(value) => TestOutcome {
                    name,
                    passed: false,
                    detail: Some(format!("evaluated to {value}")),
                },
                Err(err) => TestOutcome {
                    name,
                    passed: false,
                    detail: Some(err.to_string()),
                },
            }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shipped_policy() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies")
    }

    /// A copy of the shipped policy folder with `extra` appended to its rules.
    fn policy_with(extra: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for name in ["tally.rego", "catalogue.json"] {
            std::fs::copy(shipped_policy().join(name), dir.path().join(name)).unwrap();
        }
        let rules = dir.path().join("tally.rego");
        let text = std::fs::read_to_string(&rules).unwrap() + extra;
        std::fs::write(rules, text).unwrap();
        dir
    }

    #[test]
    fn a_remembered_decision_is_the_decision_the_rules_make() {
        let loaded = load(&shipped_policy()).unwrap();
        let input = serde_json::json!({"identity": {"user": "ana", "project": "none"}});
        let evaluated = loaded.evaluate_rules(&input.to_string()).unwrap();
        let first = loaded.evaluate(&input).unwrap();
        let second = loaded.evaluate(&input).unwrap();
        assert_eq!(first, evaluated);
        assert_eq!(second, evaluated);
        assert!(
            !evaluated.reasons.is_empty(),
            "an unknown project is refused"
        );
        let decided = loaded
            .decided
            .as_ref()
            .expect("the shipped rules are memoised");
        let remembered = decided.lock().unwrap();
        assert!(remembered.contains_key(&input.to_string()));
    }

    #[test]
    fn rules_that_draw_random_numbers_are_evaluated_every_time() {
        let dir = policy_with("\nlucky if rand.intn(\"draw\", 2) == 1\n");
        let loaded = load(dir.path()).unwrap();
        assert!(loaded.decided.is_none());
        let plain = load(policy_with("\nplain := 1\n").path()).unwrap();
        assert!(plain.decided.is_some());
    }

    #[test]
    fn the_memory_of_decisions_stays_bounded() {
        let loaded = load(&shipped_policy()).unwrap();
        for i in 0..DECIDED_CAPACITY + 10 {
            let input = serde_json::json!({"identity": {"user": format!("u{i}")}});
            loaded.evaluate(&input).unwrap();
        }
        let decided = loaded.decided.as_ref().unwrap().lock().unwrap();
        assert!(decided.len() <= DECIDED_CAPACITY);
    }
}
