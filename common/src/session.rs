//! The DataFusion session both sides plan with: no information_schema, no file paths as
//! tables, the state-wrapper aggregates registered.

use datafusion::common::Result;
use datafusion::prelude::{SessionConfig, SessionContext};

use crate::udaf::register_state_udafs;

/// A fresh, locked-down session context.
pub fn new_context() -> Result<SessionContext> {
    let config = SessionConfig::new()
        .with_information_schema(false)
        .with_create_default_catalog_and_schema(true);
    let mut ctx = SessionContext::new_with_config(config);
    register_state_udafs(&mut ctx)?;
    crate::generalise::register(&mut ctx)?;
    Ok(ctx)
}
