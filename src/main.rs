//! `tally`: federated SQL across NHS trusts where only aggregates ever travel.

mod demo;

/// Query engines allocate and free many small buffers per batch; glibc's allocator spent
/// ~16% of a federation's CPU time on them (perf, BENCHMARKS.md), mimalloc far less.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tally::client::{AnalystClient, GatewayTarget};
use tally::federation;
use tally::output::{self, Format};
use tally_common::admission::RequestIdentity;
use tally_gateway::GatewayConfig;
use tally_node::NodeConfig;
use tally_synth::SynthConfig;

#[derive(Parser)]
#[command(
    name = "tally",
    version,
    about = "Federated SQL across NHS trusts where only aggregates ever travel"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate data, start three trusts and a gateway on loopback, run a showcase, serve.
    Demo {
        /// Folder for the generated data (reused when present).
        #[arg(long, default_value_os_t = federation::default_data_dir())]
        data: PathBuf,
        /// Patients to generate across all trusts (only when generating).
        #[arg(long, default_value_t = 20_000)]
        patients: usize,
        /// Gateway port on 127.0.0.1 (0 picks a free one).
        #[arg(long, default_value_t = 50050)]
        port: u16,
        /// Policy folder used by the gateway and every node (default: the policy built into
        /// the binary, written to DATA/policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Stop after the showcase instead of serving until Ctrl-C.
        #[arg(long)]
        exit: bool,
        /// Plaintext on loopback instead of TLS (certificates are otherwise made in
        /// DATA/certs).
        #[arg(long)]
        insecure_loopback: bool,
    },
    /// Run a trust's node agent.
    Node {
        /// The node's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Serve plaintext (no [tls] section needed); only on a loopback address.
        #[arg(long)]
        insecure_loopback: bool,
    },
    /// Run the gateway.
    Gateway {
        /// The gateway's TOML config.
        #[arg(long)]
        config: PathBuf,
        /// Serve analysts and reach nodes in plaintext; only on loopback addresses.
        #[arg(long)]
        insecure_loopback: bool,
    },
    /// Create a demo certificate authority and the certificates for TLS everywhere.
    Certs {
        /// Output folder.
        #[arg(long, default_value_os_t = federation::default_data_dir().join("certs"))]
        out: PathBuf,
        /// Trust codes to make node certificates for (repeatable).
        #[arg(long = "trust", default_values_t = ["RXA".to_string(), "RXB".to_string(), "RXC".to_string()])]
        trusts: Vec<String>,
        /// Instead of a new CA: issue one more client certificate with this identity from
        /// the CA already in the folder (e.g. a second gateway).
        #[arg(long)]
        client: Option<String>,
    },
    /// Mint a signed analyst token from the demo's identity provider (DATA/idp).
    Token {
        /// The demo data folder holding the identity provider (made there when absent).
        #[arg(long, default_value_os_t = federation::default_data_dir())]
        data: PathBuf,
        /// The analyst's user name.
        #[arg(long, default_value = federation::DEMO_USER)]
        user: String,
        /// A group the analyst belongs to (repeatable).
        #[arg(long = "group", default_values_t = ["analysts".to_string()])]
        groups: Vec<String>,
        /// An approval, PROJECT=PURPOSE[,PURPOSE...] (repeatable; default: the demo
        /// analyst's approvals and defaults; with approvals given, requests name their project
        /// and purpose unless there is only one).
        #[arg(long = "approve")]
        approvals: Vec<String>,
        /// Hours the token is valid for.
        #[arg(long, default_value_t = 12)]
        hours: u64,
    },
    /// Send SQL to a gateway and print the answer (an interactive shell without SQL).
    Query {
        /// The gateway's Flight SQL URL (`grpc://` only for a plaintext loopback gateway).
        #[arg(long, default_value = "grpc+tls://127.0.0.1:50050")]
        gateway: String,
        /// The CA certificate that signs the gateway's certificate (default: the demo's).
        #[arg(long, env = "TALLY_CA_CERT", default_value_os_t = federation::default_data_dir().join("certs").join("ca.pem"))]
        ca_cert: PathBuf,
        /// Bearer token (or set TALLY_TOKEN).
        #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
        token: String,
        /// Project the query is for (default: the user's default project).
        #[arg(long, default_value = "")]
        project: String,
        /// Purpose of the query, e.g. planning or research (default: the user's).
        #[arg(long, default_value = "")]
        purpose: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Write the answer to this file instead of standard output.
        #[arg(long)]
        output: Option<PathBuf>,
        /// The SQL; omit it for an interactive shell (statements end with ';').
        sql: Option<String>,
    },
    /// Show a project's privacy budget: spent, remaining, and ε at the policy's δ.
    Budget {
        /// The gateway's Flight SQL URL (`grpc://` only for a plaintext loopback gateway).
        #[arg(long, default_value = "grpc+tls://127.0.0.1:50050")]
        gateway: String,
        /// The CA certificate that signs the gateway's certificate (default: the demo's).
        #[arg(long, env = "TALLY_CA_CERT", default_value_os_t = federation::default_data_dir().join("certs").join("ca.pem"))]
        ca_cert: PathBuf,
        /// Bearer token (or set TALLY_TOKEN).
        #[arg(long, env = "TALLY_TOKEN", hide_env_values = true)]
        token: String,
        /// Project (default: the user's default project).
        #[arg(long, default_value = "")]
        project: String,
    },
    /// Governance tools: run a policy folder's tests, explain a decision.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Audit log tools.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// Write deterministic synthetic HES-like data, one Parquet set per trust.
    Generate {
        /// Output folder.
        #[arg(long, default_value_os_t = federation::default_data_dir())]
        out: PathBuf,
        /// Patients across all trusts.
        #[arg(long, default_value_t = 20_000)]
        patients: usize,
        /// Random seed.
        #[arg(long, default_value_t = 42)]
        seed: u64,
    },
}

#[derive(Subcommand)]
enum AuditCommand {
    /// Check an audit log's hash chain (across its rotated files); reports the first record
    /// that breaks it.
    Verify {
        /// The JSON-lines audit log (the active file; rotated `FILE.000001`... are found).
        file: PathBuf,
    },
    /// Write the public transparency register (register.json, index.html) from gateway logs.
    Register {
        /// Gateway audit logs (JSON lines).
        #[arg(required = true)]
        logs: Vec<PathBuf>,
        /// Output folder (created if absent).
        #[arg(long, default_value = "register")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Run every test_* rule in the policy folder and report pass/fail per test.
    Test {
        /// The policy folder (default: the built-in policy, written to
        /// .tally/demo-data/policies).
        dir: Option<PathBuf>,
    },
    /// Print the releases a query lowers to (models and SQL), the policy input of each and
    /// the decision, without running it.
    Explain {
        /// The policy folder (default: the built-in policy, written to DATA/policies).
        #[arg(long)]
        policies: Option<PathBuf>,
        /// Data folder whose first trust's tables give the schemas.
        #[arg(long, default_value_os_t = federation::default_data_dir())]
        data: PathBuf,
        /// User name.
        #[arg(long)]
        user: String,
        /// Groups, comma-separated.
        #[arg(long, default_value = "")]
        groups: String,
        /// Project.
        #[arg(long)]
        project: String,
        /// Purpose.
        #[arg(long, default_value = "planning")]
        purpose: String,
        /// The SQL.
        sql: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tally::process::run_main(run(cli.command))
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Demo {
            data,
            patients,
            port,
            policies,
            exit,
            insecure_loopback,
        } => {
            let policies = federation::policies_folder(policies.as_deref(), &data)?;
            demo::run(&data, patients, port, &policies, exit, insecure_loopback).await
        }
        Command::Audit {
            command: AuditCommand::Verify { file },
        } => match tally_common::audit::verify(&file) {
            Ok(verified) => {
                println!(
                    "{}: {} records in {} file(s), chain intact",
                    file.display(),
                    verified.records,
                    verified.files.len()
                );
                Ok(())
            }
            Err(err) => Err(format!("chain broken at {err}")),
        },
        Command::Certs {
            out,
            trusts,
            client,
        } => certs(&out, &trusts, client.as_deref()),
        Command::Token {
            data,
            user,
            groups,
            approvals,
            hours,
        } => {
            let mut claims = federation::demo_claims();
            claims.user = user;
            claims.groups = groups;
            if !approvals.is_empty() {
                claims.approvals = parse_approvals(&approvals)?;
                claims.default_project = None;
                claims.default_purpose = None;
            }
            let provider = federation::identity_provider(&data)?;
            let token = provider.mint(
                &claims,
                std::time::Duration::from_secs(hours.saturating_mul(3600)),
            )?;
            println!("{token}");
            Ok(())
        }
        Command::Audit {
            command: AuditCommand::Register { logs, out },
        } => {
            let register = tally::register::read(&logs).map_err(|e| e.to_string())?;
            tally::register::write(&register, &out).map_err(|e| e.to_string())?;
            println!(
                "{} entries written to {}",
                register.entries.len(),
                out.join("index.html").display()
            );
            Ok(())
        }
        Command::Budget {
            gateway,
            ca_cert,
            token,
            project,
        } => {
            let target = GatewayTarget::new(gateway, Some(ca_cert));
            let mut client = AnalystClient::connect_for(&target, &token, &project, "")
                .await
                .map_err(|e| e.to_string())?;
            let report = client.budget().await.map_err(|e| e.to_string())?;
            println!("{}", budget_text(&report));
            Ok(())
        }
        Command::Policy { command } => match command {
            PolicyCommand::Test { dir } => tally::policy_cli::test(&federation::policies_folder(
                dir.as_deref(),
                &federation::default_data_dir(),
            )?),
            PolicyCommand::Explain {
                policies,
                data,
                user,
                groups,
                project,
                purpose,
                sql,
            } => {
                let identity = RequestIdentity {
                    user,
                    groups: groups
                        .split(',')
                        .filter(|g| !g.is_empty())
                        .map(str::to_string)
                        .collect(),
                    project,
                    purpose,
                };
                let policies = federation::policies_folder(policies.as_deref(), &data)?;
                let text = tally::policy_cli::explain(&policies, &data, identity, &sql).await?;
                println!("{text}");
                Ok(())
            }
        },
        Command::Node {
            config,
            insecure_loopback,
        } => {
            let mut config = NodeConfig::load(&config).map_err(|e| e.to_string())?;
            config.insecure_loopback = insecure_loopback;
            let node = tally_node::start(&config)
                .await
                .map_err(|e| e.to_string())?;
            match (node.listen_addr, &config.gateway) {
                (Some(addr), _) => eprintln!(
                    "node agent for {} ({}) on {addr}",
                    config.trust.code, config.trust.name
                ),
                (None, Some(link)) => eprintln!(
                    "node agent for {} ({}) dialing out to the gateway at {}, listening nowhere",
                    config.trust.code, config.trust.name, link.address
                ),
                (None, None) => {}
            }
            serve_until_ctrl_c(node.wait()).await;
            Ok(())
        }
        Command::Gateway {
            config,
            insecure_loopback,
        } => {
            let mut config = GatewayConfig::load(&config).map_err(|e| e.to_string())?;
            config.insecure_loopback = insecure_loopback;
            let gateway = tally_gateway::start(&config)
                .await
                .map_err(|e| e.to_string())?;
            let scheme = if config.tls.is_some() {
                "grpc+tls"
            } else {
                "grpc"
            };
            if let Some(port) = gateway.trust_port_addr {
                eprintln!("port for trusts that dial in on {port}");
            }
            eprintln!("gateway on {scheme}://{}", gateway.addr);
            serve_until_ctrl_c(gateway.wait()).await;
            Ok(())
        }
        Command::Query {
            gateway,
            ca_cert,
            token,
            project,
            purpose,
            format,
            output,
            sql,
        } => {
            let target = GatewayTarget::new(gateway, Some(ca_cert));
            let mut client = AnalystClient::connect_for(&target, &token, &project, &purpose)
                .await
                .map_err(|e| e.to_string())?;
            match sql {
                Some(sql) => query_once(&mut client, &sql, format, output.as_deref()).await,
                None => shell(&mut client, format).await,
            }
        }
        Command::Generate {
            out,
            patients,
            seed,
        } => {
            let summary = tally_synth::generate(&out, &SynthConfig { patients, seed })
                .map_err(|e| e.to_string())?;
            for trust in summary.trusts {
                println!(
                    "{}: {} patients, {} episodes, {} opted out",
                    trust.code, trust.patients, trust.episodes, trust.opted_out
                );
            }
            println!("written to {}", out.display());
            Ok(())
        }
    }
}

/// `tally certs`: a new CA and every certificate, or one more client certificate.
fn certs(out: &std::path::Path, trusts: &[String], client: Option<&str>) -> Result<(), String> {
    let folder = tally::certs::CertFolder {
        dir: out.to_path_buf(),
    };
    if let Some(identity) = client {
        let file = format!("client-{identity}");
        let files = tally::certs::issue_from_folder(
            &folder,
            &file,
            identity,
            &[],
            tally::certs::Role::Client,
        )?;
        println!(
            "client certificate '{identity}': {} and {}",
            files.cert.display(),
            files.key.display()
        );
        return Ok(());
    }
    let codes: Vec<&str> = trusts.iter().map(String::as_str).collect();
    tally::certs::create(out, &codes)?;
    println!(
        "demo CA and certificates in {} (gateway identity '{}'; nodes named <code>.node.tally)",
        out.display(),
        tally::certs::GATEWAY_IDENTITY
    );
    Ok(())
}

async fn serve_until_ctrl_c(server: impl Future<Output = ()>) {
    tokio::select! {
        () = server => {}
        _ = tokio::signal::ctrl_c() => eprintln!("stopping"),
    }
}

async fn query_once(
    client: &mut AnalystClient,
    sql: &str,
    format: Format,
    path: Option<&std::path::Path>,
) -> Result<(), String> {
    let answer = client.query(sql).await.map_err(|e| e.to_string())?;
    match (format, path) {
        (Format::Parquet, _) | (_, None) => {
            let mut stdout = std::io::stdout();
            output::write(format, &answer.schema, &answer.batches, &mut stdout, path)?;
        }
        (_, Some(path)) => {
            let mut file =
                std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
            output::write(format, &answer.schema, &answer.batches, &mut file, None)?;
        }
    }
    let rows: usize = answer.batches.iter().map(|b| b.num_rows()).sum();
    eprintln!(
        "{rows} rows in {:.1} ms; trusts answered: {}",
        answer.elapsed.as_secs_f64() * 1e3,
        if answer.trusts.is_empty() {
            "none".to_string()
        } else {
            answer.trusts.join(", ")
        }
    );
    Ok(())
}

/// A budget report for people.
fn budget_text(report: &tally_gateway::budget::BudgetReport) -> String {
    if !report.noise {
        return format!(
            "project {} on dataset {}: this policy adds no noise and charges nothing",
            report.project, report.dataset
        );
    }
    let releases_left = if report.rho_per_release > 0.0 {
        (report.remaining / report.rho_per_release + 1e-9).floor()
    } else {
        0.0
    };
    format!(
        "project {project} on dataset {dataset} (zCDP ρ, at each trust)\n\
         spent      ρ = {spent:.4}  (ε = {eps_spent:.2} at δ = {delta:e}), {releases} releases\n\
         cap        ρ = {cap:.4}  (ε = {eps_cap:.2})\n\
         remaining  ρ = {remaining:.4}: about {left} more releases at ρ = {per} each",
        project = report.project,
        dataset = report.dataset,
        spent = report.spent,
        eps_spent = report.epsilon_spent,
        delta = report.delta,
        releases = report.releases,
        cap = report.cap,
        eps_cap = report.epsilon_cap,
        remaining = report.remaining,
        left = releases_left,
        per = report.rho_per_release,
    )
}

/// A minimal shell: statements end with ';', errors are printed and the shell goes on.
async fn shell(client: &mut AnalystClient, format: Format) -> Result<(), String> {
    let stdin = std::io::stdin();
    let mut buffer = String::new();
    eprint!("tally> ");
    let _ = std::io::stderr().flush();
    for line in stdin.lock().lines() {
        let line = line.map_err(|e| e.to_string())?;
        buffer.push_str(&line);
        buffer.push('\n');
        if line.trim_end().ends_with(';') {
            let sql = buffer.trim().trim_end_matches(';').to_string();
            buffer.clear();
            if let Err(err) = query_once(client, &sql, format, None).await {
                eprintln!("error: {err}");
            }
        }
        eprint!(
            "{}",
            if buffer.is_empty() {
                "tally> "
            } else {
                "   ... "
            }
        );
        let _ = std::io::stderr().flush();
    }
    Ok(())
}

/// `PROJECT=PURPOSE[,PURPOSE...]` approvals, by project.
fn parse_approvals(
    approvals: &[String],
) -> Result<std::collections::BTreeMap<String, Vec<String>>, String> {
    approvals
        .iter()
        .map(|approval| {
            let (project, purposes) = approval.split_once('=').ok_or_else(|| {
                format!("--approve '{approval}' must be PROJECT=PURPOSE[,PURPOSE...]")
            })?;
            let purposes: Vec<String> = purposes
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            if project.trim().is_empty() || purposes.is_empty() {
                return Err(format!(
                    "--approve '{approval}' must name a project and at least one purpose"
                ));
            }
            Ok((project.trim().to_string(), purposes))
        })
        .collect()
}
