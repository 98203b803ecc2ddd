//! Per-user and per-project rate limits: at most N queries in any sliding minute.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tally_common::admission::RequestIdentity;
use tally_common::{ErrorCode, TallyError};

/// The window the limits count over.
const WINDOW: Duration = Duration::from_secs(60);

/// Counts query starts per user and per project.
#[derive(Debug)]
pub struct RateLimiter {
    per_user: usize,
    per_project: usize,
    starts: Mutex<HashMap<(Scope, String), VecDeque<Instant>>>,
}

/// What a limit is counted for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Scope {
    User,
    Project,
}

impl RateLimiter {
    /// Allows `per_user` queries per minute per user and `per_project` per project.
    pub fn new(per_user: u32, per_project: u32) -> Self {
        RateLimiter {
            per_user: per_user as usize,
            per_project: per_project as usize,
            starts: Mutex::new(HashMap::new()),
        }
    }

    /// Counts a query for `identity`, or refuses it (without counting) when the user or the
    /// project has used up the last minute's allowance.
    pub fn admit(&self, identity: &RequestIdentity) -> Result<(), TallyError> {
        let now = Instant::now();
        let mut starts = self.starts.lock().unwrap_or_else(|p| p.into_inner());
        let checks = [
            (Scope::User, &identity.user, self.per_user, "user"),
            (
                Scope::Project,
                &identity.project,
                self.per_project,
                "project",
            ),
        ];
        for (scope, name, limit, label) in checks {
            let window = starts.entry((scope, name.clone())).or_default();
            while window
                .front()
                .is_some_and(|t| now.duration_since(*t) >= WINDOW)
            {
                window.pop_front();
            }
            if window.len() >= limit {
                let wait = window
                    .front()
                    .map_or(0, |t| (WINDOW - now.duration_since(*t)).as_secs() + 1);
                return Err(TallyError::new(
                    ErrorCode::RateLimited,
                    format!(
                        "{label} '{name}' has run {limit} queries in the last minute, the limit; try again in {wait} s"
                    ),
                ));
            }
        }
        for (scope, name) in [
            (Scope::User, &identity.user),
            (Scope::Project, &identity.project),
        ] {
            starts
                .entry((scope, name.clone()))
                .or_default()
                .push_back(now);
        }
        Ok(())
    }
}
