//! Where and within what a release's work runs. Each running slot of the admission queue
//! ([`tally_common::queue`]) is a worker: an OS thread with a single-threaded runtime of its
//! own, never the runtime that serves Flight and keeps the time limits, so a heavy query
//! cannot starve the server, its timers or other trusts' connections. A worker runs one
//! query at a time, in one partition, so everything that query spawns (a sort's buffered
//! runs included) runs on that thread, and the thread's processor clock, read while the
//! query runs, is the query's processor time. Each query has a memory pool of its own (its
//! share of the node's limit) and is stopped at its time limit, its processor-time budget,
//! or when its request is dropped, whichever comes first: its future is aborted at its next
//! yield, which drops DataFusion's streams and so frees their memory, and only then are its
//! worker and slot handed on. A panic inside a query's work ends that query alone, with a
//! typed error.

use std::collections::VecDeque;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use datafusion::execution::context::SessionContext;
use datafusion::execution::memory_pool::GreedyMemoryPool;
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use futures::FutureExt;
use futures::future::{AbortHandle, Abortable};
use tally_common::model::ReleaseQuery;
use tally_common::queue::{FairQueue, Slot};
use tally_common::{ErrorCode, TallyError};
use tokio::sync::{mpsc, oneshot};

use crate::config::NodeLimits;

/// One query's work, as a worker runs it.
type Job = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The node's query workers and the budgets every query runs within.
pub struct Execution {
    /// Each worker's queue of jobs (it runs one at a time); closing them ends the threads.
    workers: Vec<mpsc::UnboundedSender<Job>>,
    /// Workers not running a query, the longest idle first: the next query goes to a worker
    /// that has finished tidying after its last one, not to the one that just stopped.
    idle: Arc<Mutex<VecDeque<usize>>>,
    queue: Arc<FairQueue>,
    timeout: Duration,
    cpu_budget: Duration,
    query_memory_bytes: usize,
    max_cost: Option<u64>,
}

impl Execution {
    /// One worker per running slot, and the budgets `limits` configure.
    pub fn new(limits: &NodeLimits) -> std::io::Result<Self> {
        let mut workers = Vec::new();
        for index in 0..limits.max_running_queries {
            let (jobs, mut next) = mpsc::unbounded_channel::<Job>();
            // One thread for the blocking calls, so that the worker can reach its heap when
            // a query ends. They are short file reads (object_store's local files; spilling
            // is off), none waiting on another, so one thread serialises them and no more.
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .max_blocking_threads(1)
                .build()?;
            std::thread::Builder::new()
                .name(format!("tally-query-{index}"))
                .stack_size(tally_common::session::WORKER_STACK_BYTES)
                .spawn(move || {
                    runtime.block_on(async move {
                        while let Some(job) = next.recv().await {
                            job.await;
                        }
                    });
                })?;
            workers.push(jobs);
        }
        Ok(Execution {
            idle: Arc::new(Mutex::new((0..workers.len()).collect())),
            workers,
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
                &tally_common::queue::tenant_key(&[project]),
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
        let state = crate::release::one_partition(state)
            .with_runtime_env(runtime)
            .build();
        Ok(SessionContext::new_with_state(state))
    }

    /// Runs `work` on the query runtime while `slot` is held, stopping it at the time limit
    /// counted from `started`, at the processor-time budget, or when this future is dropped.
    /// The slot is given back only once the work has really stopped (an aborted task stops
    /// at its next yield).
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
        // The slot guarantees a worker is idle: there are as many workers as slots.
        let Some(worker) = self
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop_front()
        else {
            return Err(TallyError::new(
                ErrorCode::Internal,
                "no query worker is idle",
            ));
        };
        let (abort, registration) = AbortHandle::new_pair();
        let (answer, answered) = oneshot::channel();
        let metered = Metered {
            work: Box::pin(work),
            budget: self.cpu_budget,
            since: None,
        };
        let idle = self.idle.clone();
        let job: Job = Box::pin(async move {
            // Given back when the work has stopped (dropped, if it never ends): the worker
            // first, then the slot, both before the answer goes.
            let held = (slot, Idle(idle, worker));
            let stopped = AssertUnwindSafe(Abortable::new(metered, registration))
                .catch_unwind()
                .await;
            let (slot, worker) = held;
            drop(worker);
            drop(slot);
            let _ = answer.send(stopped);
            // The query's memory goes back to the system here, not whenever this worker next
            // runs a query (mimalloc keeps a thread's freed pages for that thread, and a
            // worker may then sit idle for hours). After the answer, so that the answer does
            // not wait for it. The blocking thread first: while the worker waits for it, its
            // runtime drops the tasks the stopped query had spawned (their abort takes effect
            // only when the runtime next runs them), so the worker's own heap is tidied once
            // their memory is freed too.
            let _ = tokio::task::spawn_blocking(tally_common::memory::release_freed_memory).await;
            tally_common::memory::release_freed_memory();
        });
        if self.workers[worker].send(job).is_err() {
            return Err(TallyError::new(
                ErrorCode::Internal,
                "the query worker has stopped",
            ));
        }
        let _abort_on_drop = Aborting(abort);
        match tokio::time::timeout(remaining, answered).await {
            Ok(Ok(Ok(Ok(_)))) if started.elapsed() > self.timeout => Err(timeout()),
            Ok(Ok(Ok(Ok(result)))) => result,
            Ok(Ok(Err(_panic))) => {
                tracing::error!(query_id, "a query's work panicked; the query alone failed");
                Err(TallyError::new(
                    ErrorCode::Internal,
                    format!(
                        "the query failed at this trust; its log has the details under query id {query_id}"
                    ),
                ))
            }
            Ok(Ok(Ok(Err(_)))) | Ok(Err(_)) => Err(TallyError::new(
                ErrorCode::Internal,
                "the query was cancelled at this trust",
            )),
            Err(_) => Err(timeout()),
        }
    }
}

/// A query's work, aborted when this is dropped: at its time limit, and when the request
/// itself is dropped (the gateway gave up, the connection closed), so that no query
/// outlives the request that asked for it.
struct Aborting(AbortHandle);

impl Drop for Aborting {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A worker's place in the idle list, taken back when its query's work ends.
struct Idle(Arc<Mutex<VecDeque<usize>>>, usize);

impl Drop for Idle {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back(self.1);
    }
}

/// A query's work, stopped once its worker thread's processor time since the work began
/// (the query's own, since a worker runs one query at a time) exceeds `budget`.
struct Metered<T> {
    work: Pin<Box<dyn Future<Output = Result<T, TallyError>> + Send>>,
    budget: Duration,
    since: Option<Duration>,
}

impl<T> Future for Metered<T> {
    type Output = Result<T, TallyError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let Some(now) = thread_cpu_time() else {
            return Poll::Ready(Err(TallyError::new(
                ErrorCode::Internal,
                "this trust cannot read its processor clock, so it runs no query",
            )));
        };
        let since = *self.since.get_or_insert(now);
        let polled = self.work.as_mut().poll(cx);
        let spent = thread_cpu_time().unwrap_or(now).saturating_sub(since);
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

/// The processor time the calling thread has used (none if the clock cannot be read).
fn thread_cpu_time() -> Option<Duration> {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes one `timespec` through a pointer to a live local; the
    // per-thread CPU clock exists on every platform Tally supports (Linux, macOS).
    let status = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) };
    (status == 0).then(|| Duration::new(now.tv_sec as u64, now.tv_nsec as u32))
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
    async fn work_whose_request_is_dropped_stops_and_frees_its_slot() {
        let execution = Execution::new(&limits(60.0, 60.0)).unwrap();
        let slot = execution.admit("p", Instant::now()).await.unwrap();
        let steps = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = steps.clone();
        let work = async move {
            loop {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::hint::black_box((0..10_000u64).sum::<u64>());
                tokio::task::yield_now().await;
            }
        };
        let request = execution.run::<(), _>(slot, Instant::now(), "q", work);
        // The gateway gives up after 100 ms: the request's future is dropped.
        assert!(
            tokio::time::timeout(Duration::from_millis(100), request)
                .await
                .is_err()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let stopped_at = steps.load(std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            steps.load(std::sync::atomic::Ordering::SeqCst),
            stopped_at,
            "the work stopped"
        );
        assert_eq!(execution.queue().running(), 0, "and gave its slot back");
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
