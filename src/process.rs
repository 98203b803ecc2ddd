//! What every Tally program does around its work: memory set up to go back to the system,
//! logs to stderr (`RUST_LOG`, default warnings), an async runtime, and an exit code with
//! the error printed.

use std::process::ExitCode;

/// Runs `work` on a new runtime after setting up logging: success, or the error on stderr
/// and a failing exit code.
pub fn run_main<F>(work: F) -> ExitCode
where
    F: Future<Output = Result<(), String>>,
{
    let memory_settings_failed = tally_common::memory::release_memory_eagerly();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    for failed in memory_settings_failed {
        tracing::warn!("{failed}: freed memory may be slower to go back to the system");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_stack_size(tally_common::session::WORKER_STACK_BYTES)
        .on_thread_park(tally_common::memory::release_freed_memory_when_idle)
        .build();
    let runtime = match runtime {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("error: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(work) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
