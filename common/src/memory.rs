//! Giving freed memory back to the system. Tally's programs allocate with mimalloc, which
//! keeps the pages a thread has freed for that thread's next allocations; a thread that then
//! goes idle would hold a heavy query's memory for as long as it stays idle.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// How often at most a runtime thread that goes idle tidies its heap.
const IDLE_RELEASE_INTERVAL: Duration = Duration::from_secs(1);

/// Returns the pages the calling thread has freed to the system (and purges what other
/// threads left behind), now.
pub fn release_freed_memory() {
    // SAFETY: `mi_collect` takes no pointers; it tidies the calling thread's heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// [`release_freed_memory`], at most once per [`IDLE_RELEASE_INTERVAL`] per thread: for an
/// async runtime's threads to call as they go idle (`on_thread_park`), which they do many
/// times a second under load.
pub fn release_freed_memory_when_idle() {
    thread_local! {
        static LAST_RELEASE: Cell<Option<Instant>> = const { Cell::new(None) };
    }
    let now = Instant::now();
    let due = LAST_RELEASE.with(|last| {
        let due = last
            .get()
            .is_none_or(|at| now.duration_since(at) >= IDLE_RELEASE_INTERVAL);
        if due {
            last.set(Some(now));
        }
        due
    });
    if due {
        release_freed_memory();
    }
}
