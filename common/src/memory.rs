//! Giving freed memory back to the system. Tally's programs allocate with mimalloc, which
//! keeps the pages a thread has freed for that thread's next allocations; a thread that then
//! goes idle would hold a heavy query's memory for as long as it stays idle. C libraries
//! (zstd, under Parquet) allocate with glibc's allocator, which keeps freed memory in
//! per-thread arenas.

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

/// Sets the process up to give freed memory back: to call first thing in `main` (memory
/// touched before stays as it is). Measured in BENCHMARKS.md (issue 14), each where Linux
/// and glibc have the switch:
/// - ordinary 4 KiB pages only, never transparent huge pages: a 2 MiB huge page stays
///   resident while any byte of it is in use, so the few blocks a heavy query leaves
///   scattered over the heap kept far more than they hold (36 MiB more at rest, and about
///   twice the memory left behind by a heavy query). The setting passes to child processes;
/// - glibc's mmap and trim thresholds fixed at 128 KiB: a block that large has a mapping
///   of its own, unmapped when freed, and an arena's free top past that goes back. By
///   default both grow with the largest block freed so far (to 32 and 64 MiB), and what is
///   freed below them stays with the thread's arena (zstd's buffers, under Parquet, did).
///
/// Returns what could not be set, for the caller to log.
pub fn release_memory_eagerly() -> Vec<String> {
    let mut failed = Vec::new();
    #[cfg(target_os = "linux")]
    {
        // SAFETY: `prctl` with integer arguments only; the unused ones must be zero.
        let status = unsafe {
            libc::prctl(
                libc::PR_SET_THP_DISABLE,
                1 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        if status != 0 {
            failed.push(format!(
                "transparent huge pages stay on ({})",
                std::io::Error::last_os_error()
            ));
        }
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (setting, name) in [
        (libc::M_MMAP_THRESHOLD, "mmap"),
        (libc::M_TRIM_THRESHOLD, "trim"),
    ] {
        // SAFETY: `mallopt` takes integers only; 128 KiB is glibc's own default for both.
        if unsafe { libc::mallopt(setting, 128 * 1024) } != 1 {
            failed.push(format!("glibc's {name} threshold stays adaptive"));
        }
    }
    failed
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
    use std::sync::Mutex;

    use super::{release_freed_memory, release_memory_eagerly, resident_mib};

    /// The tests below measure the whole process's resident memory: one at a time.
    static MEASURING: Mutex<()> = Mutex::new(());

    /// On a thread of its own: `blocks` blocks of `size` bytes from `allocate`, written, then
    /// given to `free`, then `tidy`; resident memory must drop by more than `at_least_mib`.
    fn freed_goes_back(
        blocks: usize,
        size: usize,
        allocate: unsafe extern "C" fn(usize) -> *mut std::ffi::c_void,
        free: unsafe extern "C" fn(*mut std::ffi::c_void),
        tidy: fn(),
        at_least_mib: f64,
    ) {
        std::thread::spawn(move || {
            let held: Vec<usize> = (0..blocks)
                .map(|_| {
                    // SAFETY: a fresh block of `size` bytes, written within its size.
                    unsafe {
                        let block = allocate(size).cast::<u8>();
                        assert!(!block.is_null());
                        block.write_bytes(1, size);
                        block as usize
                    }
                })
                .collect();
            let with_blocks = resident_mib(None);
            for block in held {
                // SAFETY: each block came from `allocate` above and is freed once.
                unsafe { free(block as *mut std::ffi::c_void) };
            }
            tidy();
            let after = resident_mib(None);
            assert!(
                with_blocks - after > at_least_mib,
                "resident {with_blocks:.0} MiB with the blocks, {after:.0} MiB after"
            );
        })
        .join()
        .unwrap();
    }

    #[test]
    fn memory_a_thread_freed_goes_back_to_the_system() {
        let _alone = MEASURING.lock().unwrap_or_else(|p| p.into_inner());
        // Through mimalloc itself (a test binary's global allocator is the system's): 64 MiB
        // in 1 KiB blocks, then the thread tidies its heap.
        freed_goes_back(
            64 * 1024,
            1024,
            libmimalloc_sys::mi_malloc,
            libmimalloc_sys::mi_free,
            release_freed_memory,
            48.0,
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn memory_glibc_freed_goes_back_and_huge_pages_are_off() {
        let _alone = MEASURING.lock().unwrap_or_else(|p| p.into_inner());
        assert_eq!(release_memory_eagerly(), Vec::<String>::new());
        // SAFETY: `prctl` with integer arguments only; the unused ones must be zero.
        let disabled = unsafe {
            libc::prctl(
                libc::PR_GET_THP_DISABLE,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
                0 as libc::c_ulong,
            )
        };
        assert_eq!(disabled, 1, "transparent huge pages still on");
        // A 16 MiB block freed first would, by glibc's default, raise the sizes below which
        // it keeps freed memory (to 16 and 32 MiB); then 24 MiB in 1 MiB blocks.
        // SAFETY: a block from glibc's malloc, written within its size, freed once; seen, so
        // that the compiler keeps the pair.
        unsafe {
            let large = std::hint::black_box(libc::malloc(16 * 1024 * 1024));
            assert!(!large.is_null());
            large.cast::<u8>().write(1);
            libc::free(std::hint::black_box(large));
        }
        // Nothing to tidy: glibc gives them back as they are freed.
        freed_goes_back(24, 1024 * 1024, libc::malloc, libc::free, || {}, 16.0);
    }
}
