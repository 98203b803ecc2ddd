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

/// The resident memory of process `pid` (this process when `None`), MiB; NaN where
/// `/proc` does not say (not Linux, or the process is gone).
pub fn resident_mib(pid: Option<u32>) -> f64 {
    let status = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    std::fs::read_to_string(status)
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::{release_freed_memory, resident_mib};

    #[test]
    fn memory_a_thread_freed_goes_back_to_the_system() {
        // On a thread of its own, through mimalloc itself (a test binary's global allocator
        // is the system's): 64 MiB in small blocks, written, then freed.
        std::thread::spawn(|| {
            const BLOCK: usize = 1024;
            let blocks: Vec<usize> = (0..64 * 1024)
                .map(|_| {
                    // SAFETY: a fresh block of BLOCK bytes, written within its size.
                    unsafe {
                        let block = libmimalloc_sys::mi_malloc(BLOCK).cast::<u8>();
                        assert!(!block.is_null());
                        block.write_bytes(1, BLOCK);
                        block as usize
                    }
                })
                .collect();
            let held = resident_mib(None);
            for block in blocks {
                // SAFETY: each block came from mi_malloc above and is freed once.
                unsafe { libmimalloc_sys::mi_free(block as *mut std::ffi::c_void) };
            }
            release_freed_memory();
            let released = resident_mib(None);
            assert!(
                held - released > 48.0,
                "resident {held:.0} MiB with the blocks, {released:.0} MiB after"
            );
        })
        .join()
        .unwrap();
    }
}
