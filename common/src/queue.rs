//! Admission of queries to a bounded number of running slots, fairly across tenants (the
//! projects at a node, each user of each project at the gateway). A query waits in its
//! tenant's queue; when a slot frees, the next tenant in turn with a waiting query and room
//! under its own cap takes it, so one tenant's stream of queries cannot starve another's.
//! Queues are bounded: a query that finds its tenant's queue (or the whole queue) full is
//! refused at once rather than held, and one that waits out its deadline is refused too.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use serde::Deserialize;
use tokio::sync::oneshot;

use crate::{ErrorCode, TallyError};

/// How many queries run and wait, in all and per tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueLimits {
    /// Queries running at once.
    pub running: usize,
    /// Queries one tenant may run at once.
    pub running_per_tenant: usize,
    /// Queries waiting for a slot, across tenants.
    pub waiting: usize,
    /// Queries one tenant may have waiting.
    pub waiting_per_tenant: usize,
}

impl QueueLimits {
    /// Checks that every limit is at least 1 and no tenant cap exceeds the whole.
    pub fn validate(&self) -> Result<(), String> {
        if self.running == 0
            || self.running_per_tenant == 0
            || self.waiting == 0
            || self.waiting_per_tenant == 0
        {
            return Err("admission limits must be at least 1".into());
        }
        if self.running_per_tenant > self.running || self.waiting_per_tenant > self.waiting {
            return Err("a per-tenant admission limit is larger than the whole".into());
        }
        Ok(())
    }
}

/// The fair queue. Cheap to share: hand out clones of the `Arc`.
#[derive(Debug)]
pub struct FairQueue {
    limits: QueueLimits,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    running: usize,
    running_by: HashMap<String, usize>,
    /// Tenants with waiting queries, in the order they are served.
    turn: VecDeque<String>,
    waiting_by: HashMap<String, VecDeque<Waiter>>,
    waiting: usize,
    next_id: u64,
}

#[derive(Debug)]
struct Waiter {
    id: u64,
    wake: oneshot::Sender<()>,
}

/// A running slot, returned to the queue (and handed to the next tenant in turn) on drop.
#[derive(Debug)]
pub struct Slot {
    queue: Arc<FairQueue>,
    tenant: String,
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.queue.lock();
        state.release(&self.tenant);
        self.queue.hand_on(&mut state);
    }
}

/// A query's place in its tenant's queue; leaving it (dropped while waiting) takes the
/// query out, or gives back a slot it was handed at that moment.
struct Place {
    queue: Arc<FairQueue>,
    tenant: String,
    id: u64,
    woken: oneshot::Receiver<()>,
    /// Whether the slot it was handed became a [`Slot`].
    settled: bool,
}

impl Drop for Place {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.queue.lock();
        match self.woken.try_recv() {
            Ok(()) => {
                state.release(&self.tenant);
                self.queue.hand_on(&mut state);
            }
            Err(_) => state.leave(&self.tenant, self.id),
        }
    }
}

impl State {
    fn running_of(&self, tenant: &str) -> usize {
        self.running_by.get(tenant).copied().unwrap_or(0)
    }

    fn take(&mut self, tenant: &str) {
        self.running += 1;
        *self.running_by.entry(tenant.to_string()).or_insert(0) += 1;
    }

    fn release(&mut self, tenant: &str) {
        self.running -= 1;
        if let Some(count) = self.running_by.get_mut(tenant) {
            *count -= 1;
            if *count == 0 {
                self.running_by.remove(tenant);
            }
        }
    }

    fn leave(&mut self, tenant: &str, id: u64) {
        let Some(waiters) = self.waiting_by.get_mut(tenant) else {
            return;
        };
        let before = waiters.len();
        waiters.retain(|w| w.id != id);
        self.waiting -= before - waiters.len();
        if waiters.is_empty() {
            self.waiting_by.remove(tenant);
            self.turn.retain(|t| t != tenant);
        }
    }
}

impl FairQueue {
    /// A queue within `limits`.
    pub fn new(limits: QueueLimits) -> Arc<Self> {
        Arc::new(FairQueue {
            limits,
            state: Mutex::new(State::default()),
        })
    }

    /// The limits it keeps.
    pub fn limits(&self) -> QueueLimits {
        self.limits
    }

    /// Queries running now.
    pub fn running(&self) -> usize {
        self.lock().running
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands free slots to waiting queries, tenant by tenant in turn, skipping tenants at
    /// their own cap (they keep their place in the turn).
    fn hand_on(&self, state: &mut State) {
        let mut skipped = 0;
        while state.running < self.limits.running && skipped < state.turn.len() {
            let Some(tenant) = state.turn.pop_front() else {
                return;
            };
            if state.running_of(&tenant) >= self.limits.running_per_tenant {
                state.turn.push_back(tenant);
                skipped += 1;
                continue;
            }
            skipped = 0;
            let waiters = state.waiting_by.entry(tenant.clone()).or_default();
            let next = waiters.pop_front();
            let more = !waiters.is_empty();
            if !more {
                state.waiting_by.remove(&tenant);
            }
            if let Some(waiter) = next {
                state.waiting -= 1;
                // A waiter gone in the meantime (its query dropped) takes nothing.
                if waiter.wake.send(()).is_ok() {
                    state.take(&tenant);
                }
            }
            if more {
                state.turn.push_back(tenant);
            }
        }
    }

    /// A running slot for `tenant`, waiting in its queue until `deadline` at the latest.
    /// Refused with [`ErrorCode::Busy`] when the tenant's or the whole queue is full, or
    /// when the deadline passes first; `what` names the server in the message. `tenant` is
    /// a key (see [`tenant_key`]); messages name no tenant.
    pub async fn admit(
        self: &Arc<Self>,
        tenant: &str,
        deadline: Instant,
        what: &str,
    ) -> Result<Slot, TallyError> {
        let slot = || Slot {
            queue: self.clone(),
            tenant: tenant.to_string(),
        };
        let mut place = {
            let mut state = self.lock();
            let waiting_here = state.waiting_by.get(tenant).map_or(0, VecDeque::len);
            if waiting_here == 0
                && state.running < self.limits.running
                && state.running_of(tenant) < self.limits.running_per_tenant
            {
                state.take(tenant);
                return Ok(slot());
            }
            if waiting_here >= self.limits.waiting_per_tenant {
                return Err(busy(format!(
                    "{what} already has {waiting_here} of your project's queries waiting to run, the limit; try again shortly"
                )));
            }
            if state.waiting >= self.limits.waiting {
                return Err(busy(format!(
                    "{what} has as many queries waiting to run as it holds; try again shortly"
                )));
            }
            let (wake, woken) = oneshot::channel();
            state.next_id += 1;
            let id = state.next_id;
            if waiting_here == 0 {
                state.turn.push_back(tenant.to_string());
            }
            state
                .waiting_by
                .entry(tenant.to_string())
                .or_default()
                .push_back(Waiter { id, wake });
            state.waiting += 1;
            Place {
                queue: self.clone(),
                tenant: tenant.to_string(),
                id,
                woken,
                settled: false,
            }
        };
        let wait = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(wait, &mut place.woken).await {
            Ok(Ok(())) => {
                place.settled = true;
                Ok(slot())
            }
            // The queue drops no waiter it has not woken: timing out is the only way here.
            Ok(Err(_)) | Err(_) => Err(busy(format!(
                "{what} had no free slot for this query within its time limit"
            ))),
        }
    }
}

/// The key of the tenant made of `parts` (a project, a user): distinct parts, distinct keys,
/// whatever characters the names hold.
pub fn tenant_key(parts: &[&str]) -> String {
    parts.iter().map(|p| format!("{}:{p}", p.len())).collect()
}

fn busy(message: String) -> TallyError {
    TallyError::new(ErrorCode::Busy, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(running: usize, per_tenant: usize) -> QueueLimits {
        QueueLimits {
            running,
            running_per_tenant: per_tenant,
            waiting: 8,
            waiting_per_tenant: 4,
        }
    }

    use std::time::Duration;

    fn soon() -> Instant {
        Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn a_freed_slot_goes_to_the_next_tenant_in_turn_not_the_busiest() {
        let queue = FairQueue::new(limits(1, 1));
        let first = queue
            .admit("heavy", soon(), "node")
            .await
            .expect("free slot");
        let order = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for tenant in ["heavy", "heavy", "heavy", "light"] {
            let (queue, order) = (queue.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let slot = queue.admit(tenant, soon(), "node").await.expect("a slot");
                order.lock().unwrap().push(tenant);
                tokio::time::sleep(Duration::from_millis(5)).await;
                drop(slot);
            }));
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order, ["heavy", "light", "heavy", "heavy"]);
        assert_eq!(queue.running(), 0);
    }

    #[tokio::test]
    async fn full_queues_refuse_at_once_and_a_deadline_refuses_the_waiter() {
        let queue = FairQueue::new(QueueLimits {
            running: 1,
            running_per_tenant: 1,
            waiting: 2,
            waiting_per_tenant: 1,
        });
        let _held = queue.admit("a", soon(), "node").await.unwrap();
        let waiting = {
            let queue = queue.clone();
            tokio::spawn(async move { queue.admit("a", soon(), "node").await.map(drop) })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let err = queue.admit("a", soon(), "node").await.unwrap_err();
        assert_eq!(err.code, ErrorCode::Busy);
        assert!(err.message.contains("your project's"), "{err}");
        let late = queue
            .admit("b", Instant::now() + Duration::from_millis(30), "node")
            .await
            .unwrap_err();
        assert_eq!(late.code, ErrorCode::Busy);
        assert!(late.message.contains("time limit"), "{err}");
        waiting.abort();
        let _ = waiting.await;
        assert_eq!(queue.lock().waiting, 0, "a dropped waiter leaves the queue");
    }

    #[tokio::test]
    async fn a_tenant_at_its_cap_waits_while_others_run() {
        let queue = FairQueue::new(limits(3, 1));
        let _a = queue.admit("a", soon(), "node").await.unwrap();
        let held =
            tokio::time::timeout(Duration::from_millis(50), queue.admit("a", soon(), "node")).await;
        assert!(held.is_err(), "a second query of 'a' waits for a's slot");
        let _b = queue.admit("b", soon(), "node").await.unwrap();
        assert_eq!(queue.running(), 2);
        assert_eq!(queue.lock().waiting, 0, "the timed-out waiter left");
    }

    #[test]
    fn tenant_keys_do_not_collide_whatever_the_names() {
        assert_ne!(
            tenant_key(&["a' of project 'b", "c"]),
            tenant_key(&["a", "b' of project 'c"])
        );
        assert_ne!(tenant_key(&["ab", "c"]), tenant_key(&["a", "bc"]));
    }

    #[test]
    fn limits_are_checked() {
        assert!(limits(2, 1).validate().is_ok());
        assert!(limits(1, 2).validate().is_err());
        assert!(limits(0, 0).validate().is_err());
    }
}
