//! The `tally` command line: the analyst client, output formats and the local federation
//! that the demo and the integration tests run on.

pub mod bench;
pub mod certs;
pub mod client;
pub mod federation;
pub mod output;
pub mod policy_cli;
