//! The `tally` command line: the analyst client, output formats, the local federation
//! that the demo and the integration tests run on, and the public transparency register.

pub mod certs;
pub mod client;
pub mod federation;
pub mod link;
pub mod output;
pub mod policy_cli;
pub mod process;
pub mod register;
pub mod tokens;
