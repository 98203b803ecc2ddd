//! End-to-end tests: real node agents and a real gateway on 127.0.0.1:0, real Parquet files,
//! real Flight SQL clients. One test binary, so DataFusion is linked once.

mod support;

mod adbc;
mod attacks;
mod audit;
mod bad_input;
mod cli;
mod dial_out;
mod disclosure;
mod equivalence;
mod fuzz;
mod jwt;
mod limits;
mod link;
mod mtls;
mod node;
mod omop;
mod policy;
mod postgres;
mod privacy;
mod register;
mod snapshots;
