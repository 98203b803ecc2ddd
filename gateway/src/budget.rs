//! Budgeting: the gateway's own privacy-budget ledger, the analyst-facing account of what
//! each project has spent on each dataset. Every trust keeps its own ledger too and
//! refuses on it whatever this one says.
//!
//! A query's charge is computed from its releases alone (ρ per release, from the policy)
//! and reserved, synced to disk, before anything is sent; it stays if the query then fails.
//! A release identical to one the project already paid for is free: the trusts return the
//! noisy answer they stored for it (over unchanged data), so nothing new is learnt. A lock
//! per query shape makes an identical query wait while the one that paid for it runs, so
//! the trusts compute once; repeats of a query already paid for then run side by side
//! (each trust still takes its stored answer one request at a time).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::{Digest, Sha256};
use tally_common::admission::{BudgetState, RequestIdentity};
use tally_common::governance::{Governance, Noise};
use tally_common::ledger::{Ledger, Reservation};
use tally_common::model::ReleaseQuery;
use tally_common::noise::Rho;
use tally_common::policy::Obligations;
use tally_common::{ErrorCode, TallyError};

/// The gateway's budget ledger (absent when no policy adds noise).
pub struct Budget {
    ledger: Option<Arc<Ledger>>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A project's budget as the gateway's ledger has it.
pub struct ProjectBudget {
    spent: f64,
    paid: Box<dyn Fn(&ReleaseQuery) -> bool + Send + Sync>,
}

impl ProjectBudget {
    /// The budget as the policy sees it.
    pub fn view(&self) -> BudgetState<'_> {
        BudgetState {
            spent: self.spent,
            paid: &*self.paid,
        }
    }
}

/// A paid-for query: what it cost, and, when it paid, the lock that keeps identical
/// queries waiting until it has run.
pub struct Reserved {
    /// ρ charged now (zero for repeats and for policies without noise).
    pub charged: Rho,
    _running: Option<tokio::sync::OwnedMutexGuard<()>>,
}

impl Budget {
    /// The ledger in `path`, or none.
    pub fn open(path: Option<&Path>) -> Result<Budget, TallyError> {
        let ledger = match path {
            Some(path) => Some(Arc::new(Ledger::open(path)?)),
            None => None,
        };
        Ok(Budget {
            ledger,
            locks: Mutex::new(HashMap::new()),
        })
    }

    /// `identity`'s project's budget on `governance`'s dataset, for deciding its next query.
    pub fn state(&self, identity: &RequestIdentity, governance: &Governance) -> ProjectBudget {
        let dataset = governance.settings.privacy.dataset.clone();
        let spent = self.ledger.as_ref().map_or(0.0, |ledger| {
            ledger.balance(&identity.project, &dataset).spent.as_f64()
        });
        let ledger = self.ledger.clone();
        let identity = identity.clone();
        ProjectBudget {
            spent,
            paid: Box::new(move |release| {
                ledger.as_ref().is_some_and(|ledger| {
                    let paid = release_hash(release, &identity);
                    ledger.has_charged(&identity.project, &dataset, &paid)
                })
            }),
        }
    }

    /// Pays for `releases` before they are sent (see the module documentation).
    pub async fn reserve(
        &self,
        identity: &RequestIdentity,
        governance: &Governance,
        obligations: &Obligations,
        releases: &[ReleaseQuery],
        query_id: &str,
        policy_version: &str,
    ) -> Result<Reserved, TallyError> {
        match governance.settings.privacy.noise {
            Noise::Off => {
                return Ok(Reserved {
                    charged: Rho::ZERO,
                    _running: None,
                });
            }
            Noise::DiscreteGaussian => {}
        }
        let ledger = self.ledger.clone().ok_or_else(|| {
            TallyError::new(
                ErrorCode::LedgerBroken,
                "the policy adds noise but the gateway has no state_dir for its budget ledger",
            )
        })?;
        let models: Vec<String> = releases
            .iter()
            .map(|release| release_hash(release, identity))
            .collect();
        let lock = {
            let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
            locks.retain(|_, lock| Arc::strong_count(lock) > 1);
            locks.entry(models.join(",")).or_default().clone()
        };
        let running = lock.lock_owned().await;
        let charged = ledger
            .reserve_async(Reservation {
                project: identity.project.clone(),
                dataset: obligations.budget.dataset.clone(),
                models,
                charge_each: Rho::from_decimal(obligations.budget.rho_per_release)?,
                cap: Rho::from_decimal(obligations.budget.rho_cap)?,
                cap_set_by: format!("policy {policy_version}"),
                query_id: query_id.to_string(),
                user: identity.user.clone(),
            })
            .await?;
        Ok(Reserved {
            charged: charged.charged,
            _running: (charged.charged > Rho::ZERO).then_some(running),
        })
    }
}

/// A project's budget on a dataset, as `tally budget` shows it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BudgetReport {
    /// The project.
    pub project: String,
    /// The dataset.
    pub dataset: String,
    /// Whether the policy adds noise (and so charges) at all.
    pub noise: bool,
    /// ρ spent, at each trust.
    pub spent: f64,
    /// ρ the project may spend in total.
    pub cap: f64,
    /// ρ left.
    pub remaining: f64,
    /// ρ one release costs.
    pub rho_per_release: f64,
    /// Releases paid for so far.
    pub releases: u64,
    /// δ, for the ε figures.
    pub delta: f64,
    /// ε (at δ) of what was spent.
    pub epsilon_spent: f64,
    /// ε (at δ) of the whole cap.
    pub epsilon_cap: f64,
}

impl Budget {
    /// `identity`'s project's budget under `governance`: the cap the ledger last recorded
    /// from the policy, or the catalogue's when nothing was charged yet.
    pub fn report(&self, identity: &RequestIdentity, governance: &Governance) -> BudgetReport {
        let privacy = &governance.settings.privacy;
        let project = governance.projects.get(&identity.project);
        let budget = project.and_then(|p| p.budget.as_ref());
        let balance = self
            .ledger
            .as_ref()
            .map(|ledger| ledger.balance(&identity.project, &privacy.dataset));
        let spent = balance.as_ref().map_or(Rho::ZERO, |b| b.spent);
        let cap = balance
            .as_ref()
            .and_then(|b| b.cap)
            .or_else(|| Rho::from_decimal(budget.map_or(privacy.rho_cap, |b| b.rho_cap)).ok())
            .unwrap_or(Rho::ZERO);
        BudgetReport {
            project: identity.project.clone(),
            dataset: privacy.dataset.clone(),
            noise: privacy.noise != Noise::Off,
            spent: spent.as_f64(),
            cap: cap.as_f64(),
            remaining: cap.saturating_sub(spent).as_f64(),
            rho_per_release: budget
                .and_then(|b| b.rho_per_release)
                .unwrap_or(privacy.rho_per_release),
            releases: balance.as_ref().map_or(0, |b| b.releases),
            delta: privacy.delta,
            epsilon_spent: spent.epsilon_at(privacy.delta),
            epsilon_cap: cap.epsilon_at(privacy.delta),
        }
    }
}

/// The hash a release is paid for under: the model, the project and the purpose (the
/// trusts store answers per purpose too, since a policy may oblige differently per purpose).
fn release_hash(release: &ReleaseQuery, identity: &RequestIdentity) -> String {
    let text = serde_json::json!({
        "release": release,
        "project": identity.project,
        "purpose": identity.purpose,
    })
    .to_string();
    hex::encode(Sha256::digest(text.as_bytes()))
}
