//! Where and within what a release's work runs. Admitted queries ([`tally_common::queue`])
//! run on a runtime of their own, never on the one that serves Flight and keeps the
//! time limits, so a heavy query cannot starve the server, its timers or other trusts'
//! connections. Each query runs in one partition (its processor time is then the time of
//! its one task, which is metered), with a memory pool of its own (its share of the node's
//! limit), and is stopped at its time limit or its processor-time budget, whichever comes
//! first: its task is aborted, which drops DataFusion's streams and so frees their memory.
//! A panic inside a query's work ends that query alone, with a typed error.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::execution::context::SessionContext;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionStateBuilder;
use tally_common::model::ReleaseQuery;
use tally_common::queue::{FairQueue, Slot};
use tally_common::{ErrorCode, TallyError};

use crate::config::NodeLimits;

/// The node's query runtime and the budgets every query runs within.
pub struct Execution {
    /// Always present until dropped (a runtime is shut down in the background on drop,
    /// since a node may be stopped from async code).
    runtime: Option<tokio::runtime::Runtime>,
    queue: Arc<FairQueue>,
    timeout: Duration,
    cpu_budget: Duration,
    query_memory_bytes: usize,
    max_cost: Option<u64>,
}

impl Drop for Execution {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Execution {
    /// The runtime and budgets `limits` configure.
    pub fn new(limits: &NodeLimits) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(limits.query_threads())
            .thread_name("tally-query")
            .thread_stack_size(tally_common::session::WORKER_STACK_BYTES)
            .enable_all()
            .build()?;
        Ok(Execution {
            runtime: Some(runtime),
            queue: FairQueue::new(limits.admission()),
            timeout: limits.query_timeout(),
            cpu_budget: limits.query_cpu(),
            query_memory_bytes: limits.query_memory_bytes(),
            max_cost: limits.max_query_cost,
        })
    }

    /// Refuses (`E_QUERY_COST`) a release whose estimated cost is above the ceiling.
    pub fn check_cost(&self, release: &ReleaseQuery) -> Result<(), TallyError> {
        let estimated = crate::cost::cost(release);
        match self.max_cost {
            Some(ceiling) if estimated > ceiling => Err(TallyError::new(
                ErrorCode::QueryCost,
                format!(
                    "the query's estimated cost, {estimated}, is above this trust's ceiling of {ceiling}: use fewer tables, tests, groups or aggregates"
                ),
            )),
            Some(_) | None => Ok(()),
        }
    }

    /// The per-query time limit.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The queue queries wait in for a running slot.
    pub fn queue(&self) -> &Arc<FairQueue> {
        &self.queue
    }

    /// A running slot for a query of `project` that started at `started`: it waits at most
    /// until the query's time limit.
    pub async fn admit(&self, project: &str, started: Instant) -> Result<Slot, TallyError> {
        self.queue
            .admit(
                &format!("project '{project}'"),
                started + self.timeout,
                "this trust",
            )
            .await
    }

    /// The context one query runs in: `ctx`'s tables and functions, one partition, and a
    /// memory pool of the query's own.
    pub fn query_context(&self, ctx: &SessionContext) -> Result<SessionContext, TallyError> {
        let state = ctx.state();
        let runtime = RuntimeEnvBuilder::from_runtime_env(state.runtime_env())
            .with_memory_pool(Arc::new(GreedyMemoryPool::new(self.query_memory_bytes)))
            .build_arc()
            .map_err(|e| {
                tracing::error!(error = %e, "a query's runtime could not be made");
                TallyError::new(ErrorCode::Internal, "the query could not be started")
            })?;
        // (Not creating a default catalog, which would replace the tables' own in the
        // catalogue list this state shares with the context.)
        let config = state
            .config()
            .clone()
            .with_target_partitions(1)
            .with_create_default_catalog_and_schema(false);
        let state = SessionStateBuilder::new_from_existing(state)
            .with_config(config)
            .with_runtime_env(runtime)
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    /// Runs `work` on the query runtime while `slot` is held, stopping it at the time limit
    /// counted from `started` or at the processor-time budget. The slot is given back only
    /// once the work has really stopped (an aborted task stops at its next yield).
    pub async fn run<T, W>(
        &self,
        slot: Slot,
        started: Instant,
        query_id: &str,
        work: W,
    ) -> Result<T, TallyError>
    where
        T: Send + 'static,
        W: Future<Output = Result<T, TallyError>> + Send + 'static,
    {
        let timeout = || {
            TallyError::new(
                ErrorCode::QueryTimeout,
                format!(
                    "the query ran longer than this trust's limit of {:.0} s",
                    self.timeout.as_secs_f64()
                ),
            )
        };
        let remaining = self.timeout.saturating_sub(started.elapsed());
        if remaining.is_zero() {
            return Err(timeout());
        }
        let Some(runtime) = &self.runtime else {
            return Err(TallyError::new(ErrorCode::Internal, "the node is stopping"));
        };
        let mut task = runtime.spawn(Metered {
            work: Box::pin(work),
            budget: self.cpu_budget,
            spent: Duration::ZERO,
        });
        let outcome = match tokio::time::timeout(remaining, &mut task).await {
            Ok(Ok(_)) if started.elapsed() > self.timeout => Err(timeout()),
            Ok(Ok(result)) => result,
            Ok(Err(join)) if join.is_panic() => {
                tracing::error!(query_id, "a query's work panicked; the query alone failed");
                Err(TallyError::new(
                    ErrorCode::Internal,
                    format!(
                        "the query failed at this trust; its log has the details under query id {query_id}"
                    ),
                ))
            }
            Ok(Err(_)) => Err(TallyError::new(
                ErrorCode::Internal,
                "the query was cancelled at this trust",
            )),
            Err(_) => {
                task.abort();
                Err(timeout())
            }
        };
        if task.is_finished() {
            drop(slot);
        } else {
            // Still running (aborted, not yet at a yield): its slot is held until it stops.
            let query_id = query_id.to_string();
            tokio::spawn(async move {
                let stopping = Instant::now();
                let _ = task.await;
                tracing::info!(
                    query_id,
                    stopped_after_ms = stopping.elapsed().as_millis() as u64,
                    "an aborted query stopped"
                );
                drop(slot);
            });
        }
        outcome
    }
}

/// A query's work, stopped once the processor time its polls took exceeds `budget`.
struct Metered<T> {
    work: Pin<Box<dyn Future<Output = Result<T, TallyError>> + Send>>,
    budget: Duration,
    spent: Duration,
}

impl<T> Future for Metered<T> {
    type Output = Result<T, TallyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let before = thread_cpu_time();
        let polled = self.work.as_mut().poll(cx);
        let spent = self.spent + thread_cpu_time().saturating_sub(before);
        self.spent = spent;
        // Over budget is over budget, whether or not the work had just finished.
        if spent > self.budget {
            return Poll::Ready(Err(TallyError::new(
                ErrorCode::CpuBudget,
                format!(
                    "the query used more than this trust's processor-time budget of {} s",
                    self.budget.as_secs_f64()
                ),
            )));
        }
        polled
    }
}

/// The processor time the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through a pointer to a live local; the
    // per-thread CPU clock exists on every platform Tally supports (Linux, macOS).
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    if status != 0 {
        return Duration::ZERO;
    }
    Duration::new(now.tv_sec as u64, now.tv_nsec as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(timeout_secs: f64, cpu_secs: f64) -> NodeLimits {
        NodeLimits {
            query_timeout_secs: timeout_secs,
            query_cpu_secs: Some(cpu_secs),
            ..NodeLimits::default()
        }
    }

    /// Work that keeps a core busy, yielding now and then as DataFusion's operators do.
    async fn spin(for_at_least: Duration) -> Result<u64, TallyError> {
        let started = Instant::now();
        let mut sum = 0u64;
        while started.elapsed() < for_at_least {
            for i in 0..100_000u64 {
                sum = sum.wrapping_add(std::hint::black_box(i));
            }
            tokio::task::yield_now().await;
        }
        Ok(sum)
    }

    #[tokio::test]
    async fn work_past_its_budget_stops_with_the_budgets_code_and_frees_its_slot() {
        let execution = Execution::new(&limits(30.0, 0.2)).unwrap();
        let slot = execution.admit("p", Instant::now()).await.unwrap();
        let err = execution
            .run(slot, Instant::now(), "q", spin(Duration::from_secs(20)))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::CpuBudget, "{err}");
        assert_eq!(execution.queue().running(), 0);
    }

    #[tokio::test]
    async fn work_past_its_time_limit_is_aborted() {
        let execution = Execution::new(&limits(0.3, 30.0)).unwrap();
        let started = Instant::now();
        let slot = execution.admit("p", started).await.unwrap();
        let err = execution
            .run(slot, started, "q", spin(Duration::from_secs(20)))
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::QueryTimeout, "{err}");
        // The aborted task gives its slot back once it stops (at its next yield).
        for _ in 0..100 {
            if execution.queue().running() == 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the aborted query's slot was never given back");
    }

    #[tokio::test]
    async fn a_panic_in_one_querys_work_is_a_typed_error() {
        let execution = Execution::new(&limits(30.0, 30.0)).unwrap();
        let slot = execution.admit("p", Instant::now()).await.unwrap();
        let err = execution
            .run(slot, Instant::now(), "q", async {
                if std::hint::black_box(true) {
                    panic!("boom");
                }
                Ok(1u8)
            })
            .await
            .unwrap_err();
        assert_eq!(err.code, ErrorCode::Internal);
        assert!(!err.message.contains("boom"));
        let slot = execution.admit("p", Instant::now()).await.unwrap();
        let answer = execution
            .run(slot, Instant::now(), "q", async { Ok(7u8) })
            .await;
        assert_eq!(answer, Ok(7), "the runtime survives the panic");
    }
}
