//! What the Tally gateway and node agents must agree on: the query model and its
//! validation, the governance catalogue, the policy engine, error codes, audit logs and
//! the Flight SQL plumbing.

pub mod admission;
pub mod answers;
pub mod audit;
pub mod dialed;
pub mod error;
pub mod flight;
pub mod front_door;
pub mod generalise;
pub mod governance;
pub mod identity;
pub mod ledger;
pub mod memory;
pub mod model;
pub mod noise;
pub mod policy;
pub mod privacy;
pub mod queue;
pub mod server;
pub mod session;
pub mod tls;

pub use error::{ErrorCode, TallyError};
