//! `tally-bench compare`: the same queries over the same data, side by side, on one machine:
//! Tally (gateway in this process, one `tally node` process per site, TLS, policies on),
//! Centralised (one DataFusion context over every file) and Row shipping (sites that ship
//! rows to a DataFusion "gateway" that aggregates them).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::prelude::{ParquetReadOptions, SessionContext};
use serde::{Deserialize, Serialize};
use tally_synth::default_trusts;
use tonic::transport::Endpoint;

use super::data::{hes, site_code, split, tpch};
use super::percentile;
use super::rows::{Shipped, ShippedTable};
use super::workload::Workload;
use tally::certs::{CertFolder, GATEWAY_IDENTITY};
use tally::client::AnalystClient;
use tally::federation::{self, Security};
use tally::link::Link;
use tally::tokens::IdentityProvider;

/// What to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where data and certificates are cached.
    pub root: PathBuf,
    /// HES dataset sizes, in episodes.
    pub episodes: Vec<usize>,
    /// TPC-H scale factors (`lineitem` has about 6 million rows per unit).
    pub tpch_scale_factors: Vec<f64>,
    /// Numbers of sites.
    pub sites: Vec<usize>,
    /// Timed runs per query (after one warm-up).
    pub runs: usize,
    /// Policy folder for Tally's gateway and nodes.
    pub policies: PathBuf,
    /// Skip row shipping on datasets above this many rows (it ships every row, every run).
    pub row_shipping_max_rows: usize,
    /// Also run the queries in DuckDB (`python3` with the `duckdb` module) over Centralised's
    /// files.
    pub duckdb: bool,
    /// Reach every site (Tally's and Row shipping's) over an emulated link of this many
    /// Mbit/s each way instead of bare loopback.
    pub link_mbit: Option<f64>,
    /// Tally's sites dial the gateway's port for trusts instead of being dialed.
    pub dial_in: bool,
    /// The purpose Tally's queries are for (an approved analytics purpose).
    pub purpose: String,
    /// Whether Tally's sites apply the National Data Opt-out to the HES-like data (the
    /// default policy always does; Centralised and Row shipping never do). Off, the bench
    /// policy is the default one with the opt-out obligation turned off, so that all three
    /// systems count the same rows.
    pub opt_out: bool,
    /// Whether Tally's sites add differential-privacy noise (the default policy does). Off,
    /// the bench policies are copies with `noise = "off"`: exact answers, no bounding, no
    /// budget. On, every timed run is computed afresh (see [`Federation::measure`]).
    pub noise: bool,
}

/// One system's figures for one query.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// `Tally`, `Centralised` or `Row shipping`.
    pub system: String,
    /// The dataset and queries (HES when absent: results saved before TPC-H was added).
    #[serde(default)]
    pub workload: Workload,
    /// Sites (0 for Centralised).
    pub sites: usize,
    /// Rows in the dataset's main table: episodes (HES) or `lineitem` rows (TPC-H).
    #[serde(alias = "episodes")]
    pub size: usize,
    /// Query index in the workload's [`Workload::queries`].
    pub query: usize,
    /// Median latency, ms.
    pub median_ms: f64,
    /// 95th percentile latency, ms.
    pub p95_ms: f64,
    /// Rows moved from the sites to the gateway per run.
    pub rows_moved: usize,
    /// Flight bytes moved from the sites to the gateway per run.
    pub bytes_moved: usize,
    /// Peak resident memory of this process during the runs, MiB (the gateway for Tally
    /// and Row shipping, whose sites are other processes; everything for Centralised).
    pub peak_rss_mib: f64,
    /// Why the query failed, if it did.
    pub error: Option<String>,
}

/// Resets the kernel's peak-RSS mark for this process (Linux).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident memory since the last reset, MiB (Linux; 0 elsewhere).
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Times `runs` runs of `run` after one warm-up; returns (median, p95) in ms and the last
/// value `run` returned.
async fn timed<T>(
    runs: usize,
    mut run: impl AsyncFnMut() -> Result<T, String>,
) -> Result<(f64, f64, T), String> {
    run().await?;
    let mut times = Vec::with_capacity(runs);
    let mut last = None;
    for _ in 0..runs {
        let started = Instant::now();
        last = Some(run().await?);
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let last = last.ok_or("no runs")?;
    Ok((percentile(&times, 0.5), percentile(&times, 0.95), last))
}

/// A child process serving one site; killed when dropped.
struct SiteProcess {
    child: Child,
    /// Where it listens; none for a node that dials the gateway.
    addr: Option<SocketAddr>,
}

impl Drop for SiteProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The program a site runs: `tally` (built beside this benchmark's binary: `cargo build
/// --release` builds both), or this benchmark itself for its own row-serving sites.
enum Program {
    Tally,
    Bench,
}

impl Program {
    fn path(&self) -> Result<PathBuf, String> {
        let bench = std::env::current_exe().map_err(|e| e.to_string())?;
        match self {
            Program::Bench => Ok(bench),
            Program::Tally => {
                let tally = bench.with_file_name(format!("tally{}", std::env::consts::EXE_SUFFIX));
                if tally.exists() {
                    Ok(tally)
                } else {
                    Err(format!(
                        "{} is missing: build both with `cargo build --release --workspace`",
                        tally.display()
                    ))
                }
            }
        }
    }
}

/// Starts `program <args>` and waits for the stderr line starting with `prefix`, which ends
/// in the address it serves on unless it only dials out.
fn spawn_site(program: Program, args: &[String], prefix: &str) -> Result<SiteProcess, String> {
    let exe = program.path()?;
    let mut child = Command::new(exe)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| e.to_string())?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let mut lines = std::io::BufReader::new(stderr).lines();
    let addr = loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.kill();
            return Err(format!("site {args:?} exited before serving"));
        };
        if line.starts_with(prefix) {
            break line.rsplit(' ').next().and_then(|a| a.parse().ok());
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(SiteProcess { child, addr })
}

/// A site's address, or an error naming it when it does not listen.
fn listening(site: &SiteProcess) -> Result<SocketAddr, String> {
    site.addr
        .ok_or_else(|| "the site does not listen".to_string())
}

/// Writes a node config for site `code` serving `workload`'s tables in `dir` (and the
/// opt-out list, if `dir` has one) and starts `tally node` on it: listening on a loopback
/// port, or dialing the gateway's port for trusts at `dials`.
fn spawn_node(
    code: &str,
    dir: &Path,
    workload: Workload,
    certs: &CertFolder,
    policies: &Path,
    state: &Path,
    dials: Option<SocketAddr>,
) -> Result<SiteProcess, String> {
    let leaf = certs.node(code);
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    // A node that dials out has no listening address, and a [gateway] section instead.
    let (listen, gateway) = match dials {
        Some(port) => (
            String::new(),
            format!("\n[gateway]\naddress = \"{port}\"\n"),
        ),
        None => ("listen = \"127.0.0.1:0\"\n".to_string(), String::new()),
    };
    let mut toml = format!(
        "{listen}policies = {:?}\nstate_dir = {:?}\n\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nallowed_gateways = [\"{GATEWAY_IDENTITY}\"]\n\n[limits]\nquery_timeout_secs = 600\nmemory_limit_mb = 8192\n\n[trust]\ncode = \"{code}\"\nname = \"Site {code}\"\n",
        abs(policies),
        abs(&state.join(code)),
        abs(&leaf.cert),
        abs(&leaf.key),
        abs(&certs.ca()),
    );
    toml.push_str(&gateway);
    let idp = bench_identity(certs)?;
    toml.push_str(&format!(
        "\n[identity.jwt]\njwks = {:?}\nissuer = {:?}\naudience = {:?}\n",
        abs(&idp.jwks_path()),
        tally::tokens::ISSUER,
        tally::tokens::AUDIENCE
    ));
    let opt_outs = dir.join("opt_outs.parquet");
    if opt_outs.exists() {
        toml.push_str(&format!("\n[opt_out]\npath = {:?}\n", abs(&opt_outs)));
    }
    for table in workload.tables() {
        toml.push_str(&format!(
            "\n[[tables]]\nname = \"{table}\"\npath = {:?}\n",
            abs(&dir.join(format!("{table}.parquet")))
        ));
    }
    let config = dir.join("node.toml");
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    spawn_site(
        Program::Tally,
        &[
            "node".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        "node agent for",
    )
}

/// The benchmark's identity provider, beside its certificates.
fn bench_identity(certs: &CertFolder) -> Result<IdentityProvider, String> {
    IdentityProvider::ensure(&certs.dir.join("idp"))
}

/// A signed token for the benchmark's analyst.
fn bench_token(certs: &CertFolder) -> Result<String, String> {
    bench_identity(certs)?.mint(&federation::demo_claims(), federation::DEMO_TOKEN_LIFETIME)
}

/// Centralised: one context over every file of `workload` in `sites` (a trust code and its
/// folder each), as a central platform holding copies would have them.
async fn centralised(
    workload: Workload,
    sites: &[(String, PathBuf)],
) -> Result<SessionContext, String> {
    let mut ctx = SessionContext::new();
    tally_common::generalise::register(&mut ctx).map_err(|e| e.to_string())?;
    let register = async |ctx: &SessionContext, name: &str, path: PathBuf| {
        ctx.register_parquet(
            name,
            path.display().to_string(),
            ParquetReadOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())
    };
    for table in workload.site_tables() {
        let mut parts = Vec::new();
        for (code, dir) in sites {
            let name = format!("{table}_{code}");
            register(&ctx, &name, dir.join(format!("{table}.parquet"))).await?;
            parts.push(format!("SELECT *, '{code}' AS trust_code FROM {name}"));
        }
        ctx.sql(&format!(
            "CREATE VIEW {table} AS {}",
            parts.join(" UNION ALL ")
        ))
        .await
        .map_err(|e| e.to_string())?;
    }
    if let Some((_, dir)) = sites.first() {
        for table in workload.reference_tables() {
            register(&ctx, table, dir.join(format!("{table}.parquet"))).await?;
        }
    }
    Ok(ctx)
}

/// An answer as sorted text rows, floats to 9 significant digits (sums added in another
/// order differ in the last bits), to check that systems agree.
fn canonical(batches: &[arrow::record_batch::RecordBatch]) -> Vec<String> {
    let options = arrow::util::display::FormatOptions::default();
    let mut rows = Vec::new();
    for batch in batches {
        let formatters: Vec<_> = batch
            .columns()
            .iter()
            .filter_map(|c| {
                arrow::util::display::ArrayFormatter::try_new(c.as_ref(), &options).ok()
            })
            .collect();
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = formatters
                .iter()
                .map(|f| {
                    let text = f.value(row).to_string();
                    match text.parse::<f64>() {
                        Ok(x) if text.contains('.') => format!("{x:.8e}"),
                        _ => text,
                    }
                })
                .collect();
            rows.push(cells.join("|"));
        }
    }
    rows.sort();
    rows
}

/// Runs every query on a local context, counting what `shipped` saw; when `expected` holds
/// Centralised's answers, an answer that differs is reported as an error (queries by
/// `trust_code` excepted: the sites are not the original trusts). Returns the measurements
/// and the answers.
async fn measure_context(
    ctx: &SessionContext,
    series: Series<'_>,
    runs: usize,
    shipped: Option<&Shipped>,
    expected: Option<&[Vec<String>]>,
) -> (Vec<Measurement>, Vec<Vec<String>>) {
    let mut results = Vec::new();
    let mut answers = Vec::new();
    for (index, (_, sql)) in series.workload.queries().iter().enumerate() {
        reset_peak_rss();
        let timing = timed(runs, async || {
            ctx.sql(sql)
                .await
                .map_err(|e| e.to_string())?
                .collect()
                .await
                .map_err(|e| e.to_string())
        })
        .await;
        let moved = shipped.map_or((0, 0), |s| s.take());
        let per_run = |n: usize| n / (runs + 1);
        let answer = timing
            .as_ref()
            .map(|(_, _, batches)| canonical(batches))
            .map_err(String::clone);
        let checked = timing.and_then(|(median, p95, _)| match (&answer, expected) {
            // Sites are not the original trusts, so answers by trust_code cannot agree.
            (Ok(got), Some(want))
                if !sql.contains("trust_code") && want.get(index) != Some(got) =>
            {
                Err("the answer differs from Centralised's".to_string())
            }
            _ => Ok((median, p95)),
        });
        answers.push(answer.unwrap_or_default());
        results.push(series.measurement(index, checked, (per_run(moved.0), per_run(moved.1))));
    }
    (results, answers)
}

/// What one series of measurements is of: a system over a dataset and number of sites.
#[derive(Debug, Clone, Copy)]
struct Series<'a> {
    system: &'a str,
    workload: Workload,
    sites: usize,
    size: usize,
}

impl Series<'_> {
    /// The measurement of query `query`, with the peak memory since the last reset.
    fn measurement(
        &self,
        query: usize,
        timing: Result<(f64, f64), String>,
        (rows_moved, bytes_moved): (usize, usize),
    ) -> Measurement {
        let (median_ms, p95_ms, error) = match timing {
            Ok((median, p95)) => (median, p95, None),
            Err(err) => (f64::NAN, f64::NAN, Some(err)),
        };
        Measurement {
            system: self.system.to_string(),
            workload: self.workload,
            sites: self.sites,
            size: self.size,
            query,
            median_ms,
            p95_ms,
            rows_moved,
            bytes_moved,
            peak_rss_mib: peak_rss_mib(),
            error,
        }
    }
}

/// The address to reach a site at `addr` by: a new emulated link to it when `link_mbit` is
/// set (kept in `links`), else the site itself.
async fn reach(
    addr: SocketAddr,
    link_mbit: Option<f64>,
    links: &mut Vec<Link>,
) -> Result<SocketAddr, String> {
    let Some(rate) = link_mbit else {
        return Ok(addr);
    };
    let link = Link::start(addr, rate).await?;
    let via = link.addr;
    links.push(link);
    Ok(via)
}

/// A Tally federation over `dirs`: node processes and a gateway in this process.
struct Federation {
    nodes: Vec<SiteProcess>,
    _links: Vec<Link>,
    state: tempfile::TempDir,
    codes: Vec<String>,
    gateway: tally_gateway::GatewayHandle,
    target: tally::client::GatewayTarget,
    client: AnalystClient,
    token: String,
}

impl Federation {
    async fn start(
        dirs: &[PathBuf],
        workload: Workload,
        certs: &CertFolder,
        policies: &Path,
        purpose: &str,
        link_mbit: Option<f64>,
        dial_in: bool,
    ) -> Result<Self, String> {
        let mut nodes = Vec::new();
        let mut links = Vec::new();
        let mut endpoints = Vec::new();
        let codes: Vec<String> = (0..dirs.len()).map(|i| site_code(dirs.len(), i)).collect();
        // Fresh ledgers and answer stores for every run.
        let state_dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let state = state_dir.path().to_path_buf();
        if !dial_in {
            for (code, dir) in codes.iter().zip(dirs) {
                let node = spawn_node(code, dir, workload, certs, policies, &state, None)?;
                let addr = reach(listening(&node)?, link_mbit, &mut links).await?;
                endpoints.push((code.clone(), format!("Site {code}"), addr));
                nodes.push(node);
            }
        }
        let security = Security::Tls(certs.clone());
        let mut config = federation::gateway_config(
            "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            &endpoints,
            policies,
            &security,
            &bench_identity(certs)?,
            &state,
        );
        if dial_in {
            for code in &codes {
                federation::dial_in(&mut config, code, &format!("Site {code}"), certs);
            }
        }
        config.request_timeout_secs = 600.0;
        config.limits.query_timeout_secs = 600.0;
        config.limits.queries_per_minute_per_user = 1_000_000;
        config.limits.queries_per_minute_per_project = 1_000_000;
        let gateway = tally_gateway::start(&config)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(port) = gateway.trust_port_addr {
            for (code, dir) in codes.iter().zip(dirs) {
                let via = reach(port, link_mbit, &mut links).await?;
                nodes.push(spawn_node(
                    code,
                    dir,
                    workload,
                    certs,
                    policies,
                    &state,
                    Some(via),
                )?);
            }
            if !gateway.wait_for_trusts(Duration::from_secs(120)).await {
                return Err("the sites did not dial in within 120 s".into());
            }
        }
        let target = tally::client::GatewayTarget::new(
            federation::gateway_url(&security, gateway.addr),
            federation::ca_cert(&security),
        );
        let token = bench_token(certs)?;
        let client = AnalystClient::connect_for(&target, &token, "", purpose)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Federation {
            nodes,
            _links: links,
            state: state_dir,
            codes,
            gateway,
            target,
            client,
            token,
        })
    }

    /// Runs every query; rows and bytes from the gateway's audit record of the last run.
    async fn measure(&mut self, workload: Workload, size: usize, runs: usize) -> Vec<Measurement> {
        let series = Series {
            system: "Tally",
            workload,
            sites: self.nodes.len(),
            size,
        };
        let mut results = Vec::new();
        let answers: Vec<PathBuf> = self
            .codes
            .iter()
            .map(|code| self.state.path().join(code).join("answers"))
            .collect();
        for (index, (_, sql)) in workload.queries().iter().enumerate() {
            reset_peak_rss();
            let client = &mut self.client;
            // Each run must be computed, bounded and noised afresh rather than returned from
            // the trusts' stored answers: the bench empties the stores (a few files) first.
            let timing = timed(runs, async || {
                forget_stored_answers(&answers);
                client.query(sql).await.map_err(|e| e.to_string())
            })
            .await;
            let record = self.gateway.gateway.audit().recent().pop();
            let moved = record.map_or((0, 0), |r| {
                (
                    r.rows_from_trusts.unwrap_or(0),
                    r.bytes_from_trusts.unwrap_or(0),
                )
            });
            results.push(series.measurement(index, timing.map(|(m, p, _)| (m, p)), moved));
        }
        results
    }

    async fn stop(self) {
        self.gateway.stop().await;
    }
}

/// Empties the sites' stores of noisy answers (bench only: a trust never forgets one).
fn forget_stored_answers(dirs: &[PathBuf]) {
    for dir in dirs {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

/// Row shipping over `dirs`: row-server processes and a local aggregating context.
async fn row_shipping(
    dirs: &[PathBuf],
    workload: Workload,
    size: usize,
    options: &Options,
    expected: &[Vec<String>],
) -> Result<Vec<Measurement>, String> {
    let mut servers = Vec::new();
    let mut links = Vec::new();
    let mut channels = Vec::new();
    for dir in dirs {
        let server = spawn_site(
            Program::Bench,
            &[
                "serve-rows".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
            "rows on",
        )?;
        let addr = reach(listening(&server)?, options.link_mbit, &mut links).await?;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| e.to_string())?
            .connect()
            .await
            .map_err(|e| e.to_string())?;
        channels.push(channel);
        servers.push(server);
    }
    let shipped = Arc::new(Shipped::default());
    let mut ctx = SessionContext::new();
    tally_common::generalise::register(&mut ctx).map_err(|e| e.to_string())?;
    let local = SessionContext::new();
    for table in workload.tables() {
        let path = dirs[0].join(format!("{table}.parquet"));
        let frame = local
            .read_parquet(path.display().to_string(), ParquetReadOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut fields: Vec<_> = frame.schema().as_arrow().fields().iter().cloned().collect();
        let reference = workload.reference_tables().contains(&table);
        if !reference {
            fields.push(Arc::new(arrow::datatypes::Field::new(
                "trust_code",
                arrow::datatypes::DataType::Utf8,
                false,
            )));
        }
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        let sites = if reference {
            channels[..1].to_vec()
        } else {
            channels.clone()
        };
        ctx.register_table(
            table,
            Arc::new(ShippedTable::new(table, schema, sites, shipped.clone())),
        )
        .map_err(|e| e.to_string())?;
    }
    let series = Series {
        system: "Row shipping",
        workload,
        sites: dirs.len(),
        size,
    };
    let (results, _) =
        measure_context(&ctx, series, options.runs, Some(&shipped), Some(expected)).await;
    drop(links);
    drop(servers);
    Ok(results)
}

/// Serves one site's tables (with its `trust_code`) to the row-shipping gateway; prints
/// `rows on ADDR` and runs until killed.
pub async fn serve_rows(dir: &Path) -> Result<(), String> {
    let ctx = SessionContext::new();
    let code = dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("SITE")
        .to_string();
    for workload in Workload::ALL {
        for table in workload.tables() {
            let path = dir.join(format!("{table}.parquet"));
            if path.exists() {
                serve_table(&ctx, workload, table, &path, &code).await?;
            }
        }
    }
    let server = tally_common::server::RunningServer::start(
        super::rows::RowServer::new(ctx),
        SocketAddr::from(([127, 0, 0, 1], 0)),
        "row server",
        tally_common::server::Transport::InsecureLoopback,
    )
    .await
    .map_err(|e| e.to_string())?;
    eprintln!("rows on {}", server.addr);
    server.wait().await;
    Ok(())
}

/// Registers the site's `table` file at `path` for the row server: site tables with the
/// site's `trust_code`, reference tables as they are.
async fn serve_table(
    ctx: &SessionContext,
    workload: Workload,
    table: &str,
    path: &Path,
    code: &str,
) -> Result<(), String> {
    let raw = format!("{table}_file");
    ctx.register_parquet(
        &raw,
        path.display().to_string(),
        ParquetReadOptions::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let body = if workload.reference_tables().contains(&table) {
        format!("SELECT * FROM {raw}")
    } else {
        format!("SELECT *, '{code}' AS trust_code FROM {raw}")
    };
    ctx.sql(&format!("CREATE VIEW {table} AS {body}"))
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The tiny query's end-to-end latency and the throughput of 16 concurrent clients.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Overhead {
    /// The tiny query.
    pub sql: String,
    /// Sites.
    pub sites: usize,
    /// Median end-to-end latency, ms.
    pub median_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// Concurrent clients.
    pub clients: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Queries answered per second.
    pub queries_per_second: f64,
    /// Queries that failed.
    pub errors: usize,
    /// The same through the Python ADBC Flight SQL driver (a third-party client), when it is
    /// installed.
    #[serde(default)]
    pub adbc: Option<ClientFigures>,
}

/// The tiny query's figures through one client library.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClientFigures {
    /// Median end-to-end latency over the sequential runs, ms.
    pub median_ms: f64,
    /// 95th percentile, ms.
    pub p95_ms: f64,
    /// Sequential runs timed.
    pub runs: usize,
    /// Queries answered per second by the concurrent clients.
    pub queries_per_second: f64,
    /// Queries that failed.
    pub errors: usize,
}

/// The tiny query through the ADBC driver: `runs` in sequence, then `clients` processes for
/// `seconds`. `None` (with a note on stderr) when the driver is not installed.
async fn adbc_overhead(
    federation: &Federation,
    sql: &str,
    runs: usize,
    clients: usize,
    seconds: f64,
) -> Option<ClientFigures> {
    let spec = serde_json::json!({
        "url": federation.target.url,
        "user": federation::DEMO_USER,
        "token": federation.token,
        "ca": federation.target.ca_cert,
        "sql": sql,
        "runs": runs,
        "clients": clients,
        "seconds": seconds,
    });
    let script = include_str!("adbc_load.py");
    let hint = "pip install adbc-driver-flightsql pyarrow";
    let lines = tokio::task::spawn_blocking(move || run_python("ADBC", hint, script, &spec))
        .await
        .map_err(|e| e.to_string())
        .and_then(|lines| lines);
    match lines.map(|lines| lines.into_iter().next()) {
        Ok(Some(line)) => match serde_json::from_value(line) {
            Ok(figures) => Some(figures),
            Err(e) => {
                eprintln!("the ADBC figures are unreadable: {e}");
                None
            }
        },
        Ok(None) => None,
        Err(e) => {
            eprintln!("skipping the ADBC figures: {e}");
            None
        }
    }
}

/// The tiny query, and throughput from `clients` concurrent analysts for `seconds`.
async fn overhead(
    federation: &mut Federation,
    runs: usize,
    clients: usize,
    seconds: f64,
) -> Result<Overhead, String> {
    const TINY: &str = "SELECT sex, COUNT(*) AS patients FROM patients GROUP BY sex";
    let client = &mut federation.client;
    let (median_ms, p95_ms, _) = timed(runs.max(50), async || {
        client.query(TINY).await.map_err(|e| e.to_string())
    })
    .await?;
    let deadline = Instant::now() + Duration::from_secs_f64(seconds);
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let target = federation.target.clone();
        let token = federation.token.clone();
        tasks.push(tokio::spawn(async move {
            let mut client = AnalystClient::connect(&target, &token)
                .await
                .map_err(|e| e.to_string())?;
            let (mut ok, mut failed) = (0usize, 0usize);
            while Instant::now() < deadline {
                match client.query(TINY).await {
                    Ok(_) => ok += 1,
                    Err(_) => failed += 1,
                }
            }
            Ok::<_, String>((ok, failed))
        }));
    }
    let (mut ok, mut errors) = (0, 0);
    for task in tasks {
        let (o, e) = task.await.map_err(|e| e.to_string())??;
        ok += o;
        errors += e;
    }
    let adbc = adbc_overhead(federation, TINY, runs.max(200), clients, seconds).await;
    Ok(Overhead {
        sql: TINY.into(),
        sites: federation.nodes.len(),
        median_ms,
        p95_ms,
        clients,
        seconds,
        queries_per_second: ok as f64 / seconds,
        errors,
        adbc,
    })
}

/// The demo-sized dataset the tiny query and the throughput run on.
const SMALL_EPISODES: usize = 51_000;

/// Everything one comparison measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    /// Per query, system, size and number of sites.
    pub measurements: Vec<Measurement>,
    /// The tiny query and concurrent throughput.
    pub overhead: Option<Overhead>,
    /// The emulated link's rate between the gateway and each site, if there was one.
    #[serde(default)]
    pub link_mbit: Option<f64>,
    /// Whether Tally's sites dialed the gateway.
    #[serde(default)]
    pub dial_in: bool,
}

/// The bench policy folders under `root`: one applying the opt-out and one not (TPC-H has no
/// patients and so no opt-out list; `--no-opt-out` compares like with like).
struct BenchPolicies {
    with_opt_out: PathBuf,
    without_opt_out: PathBuf,
}

impl BenchPolicies {
    fn create(from: &Path, root: &Path, codes: &[String], noise: bool) -> Result<Self, String> {
        let with_opt_out = bench_policies(from, &root.join("policies"), codes, noise)?;
        let without_opt_out =
            bench_policies(from, &root.join("policies-no-opt-out"), codes, noise)?;
        let rules = without_opt_out.join("tally.rego");
        let text = std::fs::read_to_string(&rules).map_err(|e| e.to_string())?;
        const OBLIGATION: &str = "apply_opt_out := true";
        if !text.contains(OBLIGATION) {
            return Err(format!(
                "{}: no `{OBLIGATION}` rule to turn off for the no-opt-out bench policy",
                rules.display()
            ));
        }
        std::fs::write(&rules, text.replace(OBLIGATION, "apply_opt_out := false"))
            .map_err(|e| e.to_string())?;
        Ok(BenchPolicies {
            with_opt_out,
            without_opt_out,
        })
    }

    /// The folder for `workload`'s sites.
    fn for_workload(&self, workload: Workload, opt_out: bool) -> &Path {
        match (workload, opt_out) {
            (Workload::Hes, true) => &self.with_opt_out,
            (Workload::Hes, false) | (Workload::Tpch, _) => &self.without_opt_out,
        }
    }
}

/// Copies the files of the policy folder `from` into `to` (made if missing).
pub(crate) fn copy_policy_files(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_file() {
            let name = path.file_name().ok_or("file name")?;
            std::fs::copy(&path, to.join(name)).map_err(|e| e.to_string())?;
        }
    }
    Ok(())
}

/// A copy of the policy folder `from` in `to` whose `uec-demand` project may also query the
/// benchmark's sites `codes` and TPC-H `lineitem` (the shipped catalogue lists the demo
/// trusts and tables only), with a budget large enough for every timed run, and with
/// noise off unless `noise`.
fn bench_policies(
    from: &Path,
    to: &Path,
    codes: &[String],
    noise: bool,
) -> Result<PathBuf, String> {
    copy_policy_files(from, to)?;
    let catalogue_path = to.join("catalogue.json");
    let text = std::fs::read_to_string(&catalogue_path).map_err(|e| e.to_string())?;
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let governance = catalogue
        .get_mut("governance")
        .ok_or("the catalogue has no governance section")?;
    governance["catalogue"]["lineitem"] = lineitem_catalogue();
    if !noise {
        governance["settings"]["privacy"]["noise"] = "off".into();
    }
    let project = governance
        .pointer_mut("/projects/uec-demand")
        .ok_or("the catalogue has no uec-demand project")?;
    let mut extend = |key: &str, items: &mut dyn Iterator<Item = String>| {
        project
            .get_mut(key)
            .and_then(serde_json::Value::as_array_mut)
            .map(|list| list.extend(items.map(serde_json::Value::String)))
            .ok_or(format!("the uec-demand project has no {key}"))
    };
    extend("trusts", &mut codes.iter().cloned())?;
    extend("tables", &mut std::iter::once("lineitem".to_string()))?;
    project["budget"] = serde_json::json!({ "rho_cap": 1.0e6 });
    std::fs::write(&catalogue_path, catalogue.to_string()).map_err(|e| e.to_string())?;
    Ok(to.to_path_buf())
}

/// How the benchmark's governance classifies TPC-H `lineitem`: the order is the privacy unit
/// (disclosure control counts distinct orders per group, as it counts patients), prices,
/// quantities and discounts are measures, and what Q1 and Q6 group on are dimensions.
fn lineitem_catalogue() -> serde_json::Value {
    let class = |class: &str| serde_json::json!({ "class": class, "filter": true });
    let mut columns = serde_json::Map::new();
    for name in ["l_orderkey", "l_partkey", "l_suppkey", "l_comment"] {
        columns.insert(name.into(), serde_json::json!({ "class": "identifier" }));
    }
    // Bounds from the TPC-H specification (4.2.3): quantities 1..50, prices below 105,000,
    // discounts 0..0.10 and taxes 0..0.08 (two decimals).
    for (name, high, precision) in [
        ("l_quantity", 50.0, 0),
        ("l_extendedprice", 105_000.0, 2),
        ("l_discount", 0.1, 2),
        ("l_tax", 0.08, 2),
    ] {
        columns.insert(
            name.into(),
            serde_json::json!({
                "class": "measure", "filter": true, "bounds": [0.0, high], "precision": precision
            }),
        );
    }
    for name in [
        "l_linenumber",
        "l_returnflag",
        "l_linestatus",
        "l_shipdate",
        "l_commitdate",
        "l_receiptdate",
        "l_shipinstruct",
        "l_shipmode",
        "trust_code",
    ] {
        columns.insert(name.into(), class("dimension"));
    }
    serde_json::json!({ "privacy_unit": "l_orderkey", "columns": columns })
}

/// One dataset: where Centralised reads it (a trust code and folder each) and its split into
/// each number of sites.
struct Dataset {
    workload: Workload,
    size: usize,
    central: Vec<(String, PathBuf)>,
    splits: Vec<(usize, Vec<PathBuf>)>,
}

/// The HES-like federation at `episodes`: Centralised reads the original trusts' files.
async fn hes_dataset(options: &Options, episodes: usize) -> Result<Dataset, String> {
    let source = hes(&options.root, episodes)?;
    let central = default_trusts()
        .iter()
        .map(|t| (t.code.to_string(), source.join(t.code)))
        .collect();
    let mut splits = Vec::new();
    for &n in &options.sites {
        splits.push((n, split(&source, n).await?));
    }
    Ok(Dataset {
        workload: Workload::Hes,
        size: episodes,
        central,
        splits,
    })
}

/// TPC-H `lineitem` at `scale_factor`: Centralised reads the whole table as one file.
fn tpch_dataset(options: &Options, scale_factor: f64) -> Result<Dataset, String> {
    let (whole, size) = tpch(&options.root, scale_factor, 1)?;
    let central = whole
        .into_iter()
        .map(|dir| ("TPCH".to_string(), dir))
        .collect();
    let mut splits = Vec::new();
    for &n in &options.sites {
        splits.push((n, tpch(&options.root, scale_factor, n)?.0));
    }
    Ok(Dataset {
        workload: Workload::Tpch,
        size,
        central,
        splits,
    })
}

/// Measures Centralised, then Tally and Row shipping over each split of `dataset`.
async fn compare_dataset(
    dataset: &Dataset,
    options: &Options,
    certs: &CertFolder,
    policies: &Path,
) -> Result<Vec<Measurement>, String> {
    let (workload, size) = (dataset.workload, dataset.size);
    let name = workload.dataset(size);
    let purpose = options.purpose.as_str();
    eprintln!("{name}: Centralised");
    let central = centralised(workload, &dataset.central).await?;
    let series = Series {
        system: "Centralised",
        workload,
        sites: 0,
        size,
    };
    let (mut results, answers) = measure_context(&central, series, options.runs, None, None).await;
    drop(central);
    if options.duckdb {
        eprintln!("{name}: DuckDB");
        results.extend(duckdb(dataset, options.runs, &answers).await?);
    }
    for (n, dirs) in &dataset.splits {
        eprintln!("{name}: Tally over {n} sites");
        let mut federation = Federation::start(
            dirs,
            workload,
            certs,
            policies,
            purpose,
            options.link_mbit,
            options.dial_in,
        )
        .await?;
        results.extend(federation.measure(workload, size, options.runs).await);
        federation.stop().await;
        if size <= options.row_shipping_max_rows {
            eprintln!("{name}: Row shipping over {n} sites");
            results.extend(row_shipping(dirs, workload, size, options, &answers).await?);
        }
    }
    Ok(results)
}

/// DuckDB over the files Centralised reads, in a `python3` process with the `duckdb` module
/// (`src/bench/duckdb.py`); an answer whose number of rows differs from Centralised's is
/// reported as an error.
async fn duckdb(
    dataset: &Dataset,
    runs: usize,
    expected: &[Vec<String>],
) -> Result<Vec<Measurement>, String> {
    let workload = dataset.workload;
    let path = |dir: &Path, table: &str| dir.join(format!("{table}.parquet")).display().to_string();
    let site_tables: serde_json::Map<String, serde_json::Value> = workload
        .site_tables()
        .iter()
        .map(|&table| {
            let files: Vec<_> = dataset
                .central
                .iter()
                .map(|(code, dir)| serde_json::json!([code, path(dir, table)]))
                .collect();
            (table.to_string(), files.into())
        })
        .collect();
    let reference_tables: serde_json::Map<String, serde_json::Value> = dataset
        .central
        .first()
        .map(|(_, dir)| {
            workload
                .reference_tables()
                .iter()
                .map(|&table| (table.to_string(), path(dir, table).into()))
                .collect()
        })
        .unwrap_or_default();
    let queries: Vec<&str> = workload.queries().iter().map(|(_, sql)| *sql).collect();
    let spec = serde_json::json!({
        "runs": runs,
        "site_tables": site_tables,
        "reference_tables": reference_tables,
        "queries": queries,
    });
    let hint = "pip install duckdb";
    let lines = tokio::task::spawn_blocking(move || {
        run_python(
            "the DuckDB baseline",
            hint,
            include_str!("duckdb.py"),
            &spec,
        )
    })
    .await
    .map_err(|e| e.to_string())??;
    let series = Series {
        system: "DuckDB",
        workload,
        sites: 0,
        size: dataset.size,
    };
    let mut results = Vec::new();
    for (index, line) in lines.iter().enumerate() {
        let field = |name: &str| line.get(name).and_then(serde_json::Value::as_f64);
        let rows = line.get("rows").and_then(serde_json::Value::as_u64);
        let timing = match (line.get("error"), field("median_ms"), field("p95_ms")) {
            (Some(error), _, _) => Err(format!("DuckDB: {error}")),
            (None, Some(median), Some(p95)) => match (rows, expected.get(index)) {
                (Some(rows), Some(want)) if rows as usize != want.len() => Err(format!(
                    "DuckDB answered {rows} rows, Centralised {}",
                    want.len()
                )),
                _ => Ok((median, p95)),
            },
            _ => Err(format!("DuckDB printed {line}")),
        };
        let mut measurement = series.measurement(index, timing, (0, 0));
        measurement.peak_rss_mib = field("peak_rss_mib").unwrap_or(0.0);
        results.push(measurement);
    }
    Ok(results)
}

/// Runs `script` in `python3` with `spec` on its stdin; returns its stdout as JSON lines.
/// Runs `script` (`what`, installed with `install`) on `spec` as JSON on stdin: the JSON
/// lines it prints.
fn run_python(
    what: &str,
    install: &str,
    script: &str,
    spec: &serde_json::Value,
) -> Result<Vec<serde_json::Value>, String> {
    use std::io::Write;
    let mut child = Command::new("python3")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{what} needs python3: {e}"))?;
    child
        .stdin
        .take()
        .ok_or("no stdin")?
        .write_all(spec.to_string().as_bytes())
        .map_err(|e| e.to_string())?;
    let output = child.wait_with_output().map_err(|e| e.to_string())?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        return Err(format!(
            "{what} failed (install it with `{install}`): {}",
            stderr.lines().last().unwrap_or_default()
        ));
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(|line| serde_json::from_str(line).map_err(|e| format!("{what} printed {line}: {e}")))
        .collect()
}

/// Runs the comparison.
pub async fn run(options: &Options) -> Result<Report, String> {
    let mut codes: Vec<String> = (0..3).map(|i| site_code(3, i)).collect();
    for &n in &options.sites {
        codes.extend((0..n).map(|i| site_code(n, i)));
    }
    codes.sort();
    codes.dedup();
    let certs_dir = options.root.join("certs");
    let certs = CertFolder {
        dir: certs_dir.clone(),
    };
    let code_refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    if !certs.is_complete(&code_refs) {
        tally::certs::create(&certs_dir, &code_refs)?;
    }
    let policies = BenchPolicies::create(&options.policies, &options.root, &codes, options.noise)?;
    let mut report = Report {
        measurements: Vec::new(),
        overhead: None,
        link_mbit: options.link_mbit,
        dial_in: options.dial_in,
    };
    // The gateway's own overhead, on data small enough that the sites' work is negligible.
    let small = split(&hes(&options.root, SMALL_EPISODES)?, 3).await?;
    // On loopback even when the sites sit behind a link: this measures the gateway.
    let mut federation = Federation::start(
        &small,
        Workload::Hes,
        &certs,
        policies.for_workload(Workload::Hes, options.opt_out),
        &options.purpose,
        None,
        options.dial_in,
    )
    .await?;
    report.overhead = Some(overhead(&mut federation, options.runs, 16, 10.0).await?);
    federation.stop().await;
    for &episodes in &options.episodes {
        let dataset = hes_dataset(options, episodes).await?;
        report.measurements.extend(
            compare_dataset(
                &dataset,
                options,
                &certs,
                policies.for_workload(dataset.workload, options.opt_out),
            )
            .await?,
        );
    }
    for &scale_factor in &options.tpch_scale_factors {
        let dataset = tpch_dataset(options, scale_factor)?;
        report.measurements.extend(
            compare_dataset(
                &dataset,
                options,
                &certs,
                policies.for_workload(dataset.workload, options.opt_out),
            )
            .await?,
        );
    }
    Ok(report)
}
