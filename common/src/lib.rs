//! What the Tally gateway and node agents must agree on: error codes, the checks that form
//! the privacy floor, the step-aggregation functions and the Flight SQL plumbing.

pub mod admission;
pub mod audit;
pub mod checks;
pub mod error;
pub mod facts;
pub mod flight;
pub mod generalise;
pub mod patients;
pub mod policy;
pub mod server;
pub mod session;
pub mod tls;
pub mod udaf;

pub use error::{ErrorCode, TallyError};
