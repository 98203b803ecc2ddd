//! The trust's privacy state: its own budget ledger (which refuses whatever the gateway's
//! says), its stored noisy answers, and the secret of the keyed hash that bounds
//! contributions, all kept in the node's `state_dir`.
//!
//! A release is paid for every time the trust computes it: the charge is reserved (and
//! synced to disk) before any data is read and kept if the query then fails. Once answered,
//! the noisy answer is stored before it is sent, and the same release over the same data
//! returns it again at no charge, so repeating a query cannot average its noise away. A
//! lock per release makes two identical requests at once compute (and pay) only once.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tally_common::admission::RequestIdentity;
use tally_common::answers::AnswerStore;
use tally_common::ledger::{Ledger, Reservation};
use tally_common::model::ReleaseQuery;
use tally_common::policy::PolicySnapshot;
use tally_common::{ErrorCode, TallyError};

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

/// The node's privacy state.
pub struct PrivacyState {
    /// The budget ledger.
    pub ledger: Arc<Ledger>,
    /// Noisy answers already released.
    pub answers: AnswerStore,
    /// The secret of the keyed hash that chooses a patient's groups.
    pub bounding_key: [u8; 32],
    /// What the data is: a change (new files, a new opt-out list) is new data.
    data_version: String,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for PrivacyState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrivacyState")
            .field("data_version", &self.data_version)
            .finish_non_exhaustive()
    }
}

fn broken(path: &Path, why: impl std::fmt::Display) -> TallyError {
    tracing::error!(path = %path.display(), %why, "the node's privacy state");
    TallyError::new(
        ErrorCode::LedgerBroken,
        "this trust's privacy state cannot be opened",
    )
}

impl PrivacyState {
    /// Opens (or creates) the state in `dir` for data whose fingerprint is `data_version`.
    pub fn open(dir: &Path, data_version: String) -> Result<PrivacyState, TallyError> {
        std::fs::create_dir_all(dir).map_err(|e| broken(dir, e))?;
        let ledger = Ledger::open(&dir.join("ledger.jsonl"))?;
        let answers = AnswerStore::open(&dir.join("answers"))?;
        Ok(PrivacyState {
            ledger: Arc::new(ledger),
            answers,
            bounding_key: load_or_create_key(dir)?,
            data_version,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// The key a release's stored answer is kept under: the release, who asks for what
    /// (project, purpose, groups) under which version of the policy (so its obligations,
    /// the opt-out among them, are the same), the privacy settings, the aggregated columns'
    /// bounds, and the data, hashed.
    pub fn answer_key(
        &self,
        release: &ReleaseQuery,
        identity: &RequestIdentity,
        policy: &PolicySnapshot,
    ) -> String {
        let governance = policy.governance();
        let project = identity.project.as_str();
        let mut hasher = Sha256::new();
        let parts = serde_json::json!({
            "release": release,
            "project": project,
            "purpose": identity.purpose,
            "groups": identity.groups,
            "policy": policy.version(),
            "privacy": governance.settings.privacy,
            "budget": governance.projects.get(project).and_then(|p| p.budget.as_ref()),
            "columns": release
                .partials()
                .iter()
                .filter_map(|p| p.column().and_then(|c| governance.column(&c.table, &c.column)))
                .collect::<Vec<_>>(),
            "data": self.data_version,
        });
        hasher.update(parts.to_string().as_bytes());
        hex::encode(hasher.finalize())
    }

    /// The place of `release` for `identity` under `policy` in the answer store, held
    /// until the returned slot is dropped: requests for the same release wait, so it is
    /// computed (and paid for) once.
    pub async fn slot(
        &self,
        release: &ReleaseQuery,
        identity: &RequestIdentity,
        policy: &PolicySnapshot,
    ) -> Result<Slot, TallyError> {
        let key = self.answer_key(release, identity, policy);
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(key.clone()).or_default().clone()
        };
        let guard = lock.lock_owned().await;
        let stored = match self.answers.get(&key)?.as_deref() {
            Some([batch]) => Some(batch.clone()),
            Some(_) | None => None,
        };
        Ok(Slot {
            key,
            stored,
            _one_at_a_time: guard,
        })
    }

    /// Reserves one release's charge in the trust's ledger; every computation is paid.
    pub async fn reserve(&self, reservation: Reservation) -> Result<(), TallyError> {
        self.ledger.reserve_async(reservation).await.map(|_| ())
    }
}

/// A release's place in the answer store, held by one request at a time.
pub struct Slot {
    /// The key its answer is stored under.
    pub key: String,
    /// The answer already released for it, if any.
    pub stored: Option<arrow::record_batch::RecordBatch>,
    _one_at_a_time: tokio::sync::OwnedMutexGuard<()>,
}

/// The fingerprint of a node's data: its tables' files and its opt-out list.
pub fn data_version(tables: &[String], opt_out: Option<&PathBuf>) -> String {
    let mut hasher = Sha256::new();
    for table in tables {
        hasher.update(table.as_bytes());
        hasher.update([0]);
    }
    if let Some(path) = opt_out {
        let stamp = std::fs::metadata(path)
            .map(|m| format!("{}:{:?}", m.len(), m.modified().ok()))
            .unwrap_or_default();
        hasher.update(stamp.as_bytes());
    }
    hex::encode(hasher.finalize())
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
