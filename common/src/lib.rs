//! What the Tally gateway and node agents must agree on: error codes, the checks that form
//! the privacy floor, the step-aggregation functions and the Flight SQL plumbing.

pub mod audit;
pub mod checks;
pub mod error;
pub mod flight;
pub mod server;
pub mod session;
pub mod udaf;

pub use error::{ErrorCode, TallyError};
