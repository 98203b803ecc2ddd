//! The fuzzer (`tally-bench fuzz`, bench/src/fuzz.rs) for a bounded run: a few thousand SQL
//! statements and malformed Flight requests against a real federation. Every input must be
//! answered or refused with one of Tally's codes, without engine text, within 30 s, and
//! nothing may panic. Longer runs: `cargo run --release -p tally-bench -- fuzz`.

use std::time::Duration;

use tally::federation::{self, Security};

use crate::support::{data_dir, default_policies, init_logging};

#[test]
fn a_bounded_fuzz_run_finds_no_panic_hang_or_untyped_error() {
    init_logging();
    // The runtime `tally` serves on: planning deep statements needs its larger stacks.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_stack_size(tally_common::session::WORKER_STACK_BYTES)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let policies =
            tally_bench::unlimited_budgets(&default_policies(), &dir.path().join("policies"))
                .unwrap();
        let limits = tally_gateway::GatewayLimits {
            queries_per_minute_per_user: u32::MAX,
            queries_per_minute_per_project: u32::MAX,
            ..Default::default()
        };
        let local = federation::start_with(
            data_dir(),
            "127.0.0.1:0".parse().unwrap(),
            &policies,
            Security::InsecureLoopback,
            dir.path(),
            &federation::Limits {
                gateway: limits,
                node: Default::default(),
            },
        )
        .await
        .unwrap();
        let token = local.analyst_token().unwrap();
        let options = tally_bench::fuzz::Options {
            statements: 3_000,
            flight_requests: 1_500,
            seed: 14,
            hang_after: Duration::from_secs(30),
            clients: 4,
        };
        let report = tally_bench::fuzz::run(&local, &token, &options)
            .await
            .unwrap();
        local.stop().await;
        assert_eq!(report.statements, 3_000);
        assert_eq!(report.flight_requests, 1_500);
        assert!(
            report.answered > 100,
            "the grammar reaches the trusts: {}",
            report.summary()
        );
        assert!(report.clean(), "{}", report.summary());
    });
}
