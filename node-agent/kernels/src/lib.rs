//! The node agent's per-row work, in a crate of its own so that it is optimised fully while
//! the rest of the node agent builds quickly (see the workspace's release profile):
//! contribution bounding in one streaming pass ([`bounding`]) and the lookup of a code's
//! range in a reference table of ranges ([`range`]).

pub mod bounding;
pub mod range;
