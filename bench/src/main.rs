//! `tally-bench`: the benchmarks recorded in BENCHMARKS.md (Tally against Centralised and
//! Row shipping, policy evaluation, audit logging, TLS). It starts `tally` processes for
//! the sites, so build both: `cargo build --release --workspace`.

use std::path::PathBuf;
use std::process::ExitCode;

/// The same allocator as `tally`, so the in-process baselines are measured alike, counting
/// the bytes held live for the isolation report.
#[global_allocator]
static ALLOCATOR: tally_bench::CountingAllocator =
    tally_bench::CountingAllocator(mimalloc::MiMalloc);

use clap::{Parser, Subcommand};
use tally::federation;

#[derive(Parser)]
#[command(
    name = "tally-bench",
    version,
    about = "Tally's benchmarks (BENCHMARKS.md)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Policy evaluation, audit logging and TLS overhead.
    Policy {
        /// The policy folder (default: the built-in policy, written to DATA/policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Data folder whose first trust's tables give the schemas.
        #[arg(long, default_value_os_t = federation::default_data_dir())]
        data: PathBuf,
        /// Evaluations per query.
        #[arg(long, default_value_t = 2_000)]
        iterations: usize,
    },
    /// Tally against Centralised and Row shipping: same data, same queries, one machine.
    Compare {
        /// Where generated data and certificates are cached.
        #[arg(long, default_value_os_t = PathBuf::from(".tally").join("bench"))]
        root: PathBuf,
        /// HES-like dataset sizes in episodes, comma-separated; 0 skips HES.
        #[arg(long, value_delimiter = ',', default_values_t = [1_000_000usize, 10_000_000])]
        episodes: Vec<usize>,
        /// TPC-H scale factors for lineitem (about 6 million rows each), comma-separated;
        /// 0 skips TPC-H.
        #[arg(long = "tpch-sf", value_delimiter = ',', default_values_t = [1.0f64])]
        tpch_scale_factors: Vec<f64>,
        /// Numbers of sites, comma-separated.
        #[arg(long, value_delimiter = ',', default_values_t = [1usize, 3, 8])]
        sites: Vec<usize>,
        /// Timed runs per query, after one warm-up.
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// The policy folder (Tally's gateway and nodes; default: the built-in policy,
        /// written to ROOT/source/policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Run Row shipping only on datasets up to this many rows (it ships every row every
        /// run).
        #[arg(long, default_value_t = 10_000_000)]
        row_shipping_max: usize,
        /// Purpose of Tally's queries (an approved analytics purpose).
        #[arg(long, default_value = "planning")]
        purpose: String,
        /// Run Tally's HES-like sites without the National Data Opt-out (a bench-only copy of
        /// the policy), so that Tally counts the same rows as Centralised and Row shipping,
        /// which never apply it.
        #[arg(long)]
        no_opt_out: bool,
        /// Run Tally's sites without differential-privacy noise (a bench-only copy of the
        /// policy with `noise = "off"`), to measure what the noise, bounding and budget cost.
        #[arg(long)]
        no_noise: bool,
        /// Also run the queries in DuckDB over Centralised's files (needs `python3` with the
        /// `duckdb` module: `pip install duckdb`).
        #[arg(long)]
        duckdb: bool,
        /// Reach the sites over an emulated link of this many Mbit/s each way (a
        /// rate-limiting proxy per site) instead of bare loopback.
        #[arg(long)]
        link_mbit: Option<f64>,
        /// Tally's sites dial the gateway's port for trusts (over the link, if any) instead
        /// of being dialed, as outbound-only trusts do.
        #[arg(long)]
        dial_in: bool,
        /// Where to write results.json, results.md and latency-ratio.svg.
        #[arg(long, default_value_os_t = PathBuf::from("bench-results"))]
        out: PathBuf,
    },
    /// Rewrite results.md and latency-ratio.svg from a saved results.json.
    Render {
        /// The results.json of an earlier `compare`.
        results: PathBuf,
        /// Where to write results.md and latency-ratio.svg.
        #[arg(long, default_value_os_t = PathBuf::from("bench-results"))]
        out: PathBuf,
    },
    /// Fuzz the gateway's SQL and every Flight surface of a local federation (plaintext on
    /// loopback, the built-in policy with a budget that never runs out); fails if any input
    /// panicked, hung, or got an error without one of Tally's codes or with engine text.
    Fuzz {
        /// Where the generated demo data is kept.
        #[arg(long, default_value = "target/fuzz")]
        root: PathBuf,
        /// SQL statements to send through the gateway.
        #[arg(long, default_value_t = 100_000)]
        statements: usize,
        /// Malformed Flight requests, spread over the gateway and the nodes.
        #[arg(long, default_value_t = 10_000)]
        flight_requests: usize,
        /// Random seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Clients sending at once.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds after which an unanswered request counts as a hang.
        #[arg(long, default_value_t = 30)]
        hang_secs: u64,
    },
    /// One project's heaviest queries against another project's small ones at the same
    /// trusts: the small ones' latency before, during and after, and memory given back.
    Isolation {
        /// Where generated data is kept (and the memory maps the run saves).
        #[arg(long, default_value = "target/isolation")]
        root: PathBuf,
        /// Patients to generate across the three trusts.
        #[arg(long, default_value_t = 400_000)]
        patients: usize,
        /// Clients sending heavy queries at once.
        #[arg(long, default_value_t = 4)]
        heavy_clients: usize,
        /// Seconds of small queries before the measured phases (the process settles).
        #[arg(long, default_value_t = 60)]
        warm_up_secs: u64,
        /// Seconds of each phase.
        #[arg(long, default_value_t = 30)]
        phase_secs: u64,
        /// Rounds of heavy queries, each followed by an after phase.
        #[arg(long, default_value_t = 1)]
        rounds: usize,
        /// Each trust's processor-time budget per query, seconds.
        #[arg(long, default_value_t = 1.0)]
        cpu_budget_secs: f64,
    },
    /// Soak: the gateway and three nodes as processes, N clients for M minutes with a
    /// realistic mix, and faults on a schedule (a node killed, a node stopped, the gateway
    /// killed, a link slowed, a node restarted); fails on a lost audit record, an untyped
    /// error, a fault not recovered from within 10 s, or a process's resident memory over
    /// the last minute more than 10 % above the second minute's.
    Soak {
        /// Where data, configs, logs and state are kept.
        #[arg(long, default_value = "target/soak")]
        root: PathBuf,
        /// Analyst clients.
        #[arg(long, default_value_t = 16)]
        clients: usize,
        /// Minutes to run.
        #[arg(long, default_value_t = 10.0)]
        minutes: f64,
        /// Run without faults.
        #[arg(long)]
        no_faults: bool,
    },
    /// (internal) Serve one site's rows for the Row shipping baseline.
    #[command(hide = true)]
    ServeRows {
        /// The site's folder.
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tally::process::run_main(run(cli.command))
}

/// Runs one benchmark.
async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Policy {
            policies,
            data,
            iterations,
        } => {
            federation::ensure_data(&data, 20_000, 42)?;
            let policies = federation::policies_folder(policies.as_deref(), &data)?;
            println!(
                "{}",
                tally_bench::policy(&policies, &data, iterations.max(1)).await?
            );
            println!("{}", tally_bench::audit(1_000)?);
            println!("{}", tally_bench::links(&data, &policies, 15).await?);
            Ok(())
        }
        Command::Compare {
            root,
            episodes,
            tpch_scale_factors,
            sites,
            runs,
            policies,
            row_shipping_max,
            purpose,
            no_opt_out,
            no_noise,
            duckdb,
            link_mbit,
            dial_in,
            out,
        } => {
            let policies = federation::policies_folder(policies.as_deref(), &root.join("source"))?;
            let options = tally_bench::compare::Options {
                root,
                episodes: episodes.into_iter().filter(|&n| n != 0).collect(),
                tpch_scale_factors: tpch_scale_factors
                    .into_iter()
                    .filter(|&sf| sf != 0.0)
                    .collect(),
                sites,
                runs: runs.max(1),
                policies,
                row_shipping_max_rows: row_shipping_max,
                duckdb,
                link_mbit,
                dial_in,
                purpose,
                opt_out: !no_opt_out,
                noise: !no_noise,
            };
            let report = tally_bench::compare::run(&options).await?;
            write_report(&report, &out)
        }
        Command::Render { results, out } => {
            let text = std::fs::read_to_string(&results)
                .map_err(|e| format!("{}: {e}", results.display()))?;
            let report =
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", results.display()))?;
            write_report(&report, &out)
        }
        Command::ServeRows { dir } => tally_bench::compare::serve_rows(&dir).await,
        Command::Soak {
            root,
            clients,
            minutes,
            no_faults,
        } => {
            let options = tally_bench::soak::Options {
                root,
                clients,
                minutes,
                faults: !no_faults,
            };
            println!("{}", tally_bench::soak::run(&options).await?);
            Ok(())
        }
        Command::Isolation {
            root,
            patients,
            heavy_clients,
            warm_up_secs,
            phase_secs,
            rounds,
            cpu_budget_secs,
        } => {
            let options = tally_bench::isolation::Options {
                root,
                patients,
                heavy_clients,
                warm_up_secs,
                phase_secs,
                rounds,
                cpu_budget_secs,
            };
            println!("{}", tally_bench::isolation::run(&options).await?);
            Ok(())
        }
        Command::Fuzz {
            root,
            statements,
            flight_requests,
            seed,
            clients,
            hang_secs,
        } => {
            let data = root.join("data");
            federation::ensure_data(&data, 20_000, 42)?;
            let shipped = federation::policies_folder(None, &data)?;
            let policies = tally_bench::unlimited_budgets(&shipped, &root.join("policies"))?;
            let state = tempfile::tempdir().map_err(|e| e.to_string())?;
            let limits = tally_gateway::GatewayLimits {
                queries_per_minute_per_user: u32::MAX,
                queries_per_minute_per_project: u32::MAX,
                ..Default::default()
            };
            let local = federation::start_with(
                &data,
                "127.0.0.1:0".parse().map_err(|_| "address")?,
                &policies,
                federation::Security::InsecureLoopback,
                state.path(),
                &federation::Limits {
                    gateway: limits,
                    node: Default::default(),
                },
            )
            .await?;
            let token = local.analyst_token()?;
            let options = tally_bench::fuzz::Options {
                statements,
                flight_requests,
                seed,
                hang_after: std::time::Duration::from_secs(hang_secs),
                clients,
            };
            let report = tally_bench::fuzz::run(&local, &token, &options).await;
            local.stop().await;
            let report = report?;
            println!("{}", report.summary());
            std::fs::write(
                root.join("fuzz-report.json"),
                serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?,
            )
            .map_err(|e| e.to_string())?;
            if report.clean() {
                Ok(())
            } else {
                Err("the fuzzer found inputs that broke a rule (see above)".into())
            }
        }
    }
}

/// Writes `results.json`, `results.md` and `latency-ratio.svg` into `out`.
fn write_report(
    report: &tally_bench::compare::Report,
    out: &std::path::Path,
) -> Result<(), String> {
    std::fs::create_dir_all(out).map_err(|e| e.to_string())?;
    let write = |name: &str, text: String| {
        std::fs::write(out.join(name), text).map_err(|e| format!("{name}: {e}"))
    };
    let markdown = tally_bench::report::markdown(report);
    write(
        "results.json",
        serde_json::to_string_pretty(report).map_err(|e| e.to_string())?,
    )?;
    write("results.md", markdown.clone())?;
    write("latency-ratio.svg", tally_bench::report::svg(report))?;
    println!("{markdown}\nwritten to {}", out.display());
    Ok(())
}
