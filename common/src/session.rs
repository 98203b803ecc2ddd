//! The DataFusion session both sides plan with: no information_schema, no file paths as
//! tables, the generalisers and the capped patient count registered.

use std::sync::Arc;

use datafusion::common::Result;
use datafusion::execution::disk_manager::{DiskManagerBuilder, DiskManagerMode};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::prelude::{SessionConfig, SessionContext};

/// A fresh, locked-down session context with no memory limit.
pub fn new_context() -> Result<SessionContext> {
    new_context_in(Arc::new(RuntimeEnv::default()))
}

/// The stack of every thread of the gateway's and the nodes' runtimes. Parsing and planning
/// recurse, and some of that recursion (typing an expression, say) has no stack guard; how
/// deep a frame is depends on how DataFusion's planning crates are optimised (see the
/// workspace's release profile): built at opt-level 0, a statement at the gateway's size
/// limits (256 operators deep) overflowed Tokio's default 2 MiB. Untouched stack costs no
/// memory.
pub const WORKER_STACK_BYTES: usize = 16 * 1024 * 1024;

/// Stack a guarded recursive step of parsing or planning must find left, or it continues on
/// a new segment (DataFusion's default, 128 KiB, assumes optimised frames).
const PLANNING_RED_ZONE: usize = 1024 * 1024;

/// The size of each new stack segment recursive planning continues on.
const PLANNING_SEGMENT: usize = 8 * 1024 * 1024;

/// A fresh, locked-down session context running in `runtime` (its memory pool is shared
/// by every context in it).
pub fn new_context_in(runtime: Arc<RuntimeEnv>) -> Result<SessionContext> {
    recursive::set_minimum_stack_size(PLANNING_RED_ZONE);
    recursive::set_stack_allocation_size(PLANNING_SEGMENT);
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(true);
    let mut ctx = SessionContext::new_with_config_rt(config, runtime);
    crate::generalise::register(&mut ctx)?;
    Ok(ctx)
}

/// A runtime whose queries together may hold at most `bytes` of memory. Spilling is off:
/// a query over the limit fails (E_RESOURCES) rather than writing patient-derived
/// intermediate data to temporary files.
pub fn memory_limited_runtime(bytes: usize) -> Result<Arc<RuntimeEnv>> {
    RuntimeEnvBuilder::new()
        .with_memory_limit(bytes, 1.0)
        .with_disk_manager_builder(
            DiskManagerBuilder::default().with_mode(DiskManagerMode::Disabled),
        )
        .build_arc()
}
