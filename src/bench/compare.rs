//! `tally bench compare`: the same queries over the same data, side by side, on one machine:
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

use super::data::{hes, site_code, split};
use super::percentile;
use super::rows::{Shipped, ShippedTable};
use crate::certs::{CertFolder, GATEWAY_IDENTITY};
use crate::client::AnalystClient;
use crate::federation::{self, DEMO_TOKEN, Security};

/// The analyst queries of the comparison: a title and the SQL.
pub const QUERIES: [(&str, &str); 8] = [
    (
        "admissions by month and age band",
        "SELECT month(admission_date) AS month, age_band(age_at_admission) AS age_band, COUNT(*) AS admissions \
         FROM episodes GROUP BY 1, 2",
    ),
    (
        "mean length of stay by specialty and trust",
        "SELECT trust_code, specialty, AVG(length_of_stay) AS mean_stay, COUNT(*) AS episodes \
         FROM episodes GROUP BY trust_code, specialty",
    ),
    (
        "cost by sex and deprivation (join to patients)",
        "SELECT p.sex, p.imd_decile, SUM(e.cost) AS cost, COUNT(*) AS episodes \
         FROM episodes e JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex, p.imd_decile",
    ),
    (
        "filter-heavy: older emergency stays since 2021",
        "SELECT specialty, COUNT(*) AS episodes, SUM(cost) AS cost FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') AND diagnosis_icd10 LIKE 'I%' \
         AND age_at_admission BETWEEN 65 AND 90 AND admission_date >= DATE '2021-01-01' \
         GROUP BY specialty",
    ),
    (
        "emergency admissions by year and trust",
        "SELECT trust_code, year(admission_date) AS year, COUNT(*) AS admissions FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY 1, 2",
    ),
    (
        "cost spread by diagnosis chapter (join to ICD-10)",
        "SELECT c.chapter, COUNT(*) AS episodes, AVG(e.cost) AS mean_cost, STDDEV(e.cost) AS sd_cost \
         FROM episodes e JOIN icd10_chapters c \
         ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to GROUP BY c.chapter",
    ),
    (
        "patients by sex and deprivation",
        "SELECT sex, imd_decile, COUNT(*) AS patients FROM patients GROUP BY sex, imd_decile",
    ),
    (
        "totals",
        "SELECT COUNT(*) AS episodes, AVG(length_of_stay) AS mean_stay, SUM(cost) AS cost FROM episodes",
    ),
];

/// What to compare.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where data and certificates are cached.
    pub root: PathBuf,
    /// Dataset sizes, in episodes.
    pub episodes: Vec<usize>,
    /// Numbers of sites.
    pub sites: Vec<usize>,
    /// Timed runs per query (after one warm-up).
    pub runs: usize,
    /// Policy folder for Tally's gateway and nodes.
    pub policies: PathBuf,
    /// Skip row shipping above this many episodes (it ships every row, every run).
    pub row_shipping_max_episodes: usize,
    /// The purpose Tally's queries are for (`direct_care` is exempt from the opt-out, which
    /// Centralised and Row shipping do not apply).
    pub purpose: String,
}

/// One system's figures for one query.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Measurement {
    /// `Tally`, `Centralised` or `Row shipping`.
    pub system: String,
    /// Sites (0 for Centralised).
    pub sites: usize,
    /// Dataset size in episodes.
    pub episodes: usize,
    /// Query index in [`QUERIES`].
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
    addr: SocketAddr,
}

impl Drop for SiteProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `tally <args>` and waits for the stderr line starting with `prefix` that ends in
/// the address it serves on.
fn spawn_site(args: &[String], prefix: &str) -> Result<SiteProcess, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
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
        if line.starts_with(prefix)
            && let Some(addr) = line.rsplit(' ').next().and_then(|a| a.parse().ok())
        {
            break addr;
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok(SiteProcess { child, addr })
}

/// Writes a node config for site `code` over `dir` and starts `tally node` on it.
fn spawn_node(
    code: &str,
    dir: &Path,
    certs: &CertFolder,
    policies: &Path,
) -> Result<SiteProcess, String> {
    let leaf = certs.node(code);
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut toml = format!(
        "listen = \"127.0.0.1:0\"\npolicies = {:?}\n\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nallowed_gateways = [\"{GATEWAY_IDENTITY}\"]\n\n[limits]\nquery_timeout_secs = 600\nmemory_limit_mb = 8192\n\n[trust]\ncode = \"{code}\"\nname = \"Site {code}\"\n\n[opt_out]\npath = {:?}\n",
        abs(policies),
        abs(&leaf.cert),
        abs(&leaf.key),
        abs(&certs.ca()),
        abs(&dir.join("opt_outs.parquet")),
    );
    for table in ["patients", "episodes", "icd10_chapters"] {
        toml.push_str(&format!(
            "\n[[tables]]\nname = \"{table}\"\npath = {:?}\n",
            abs(&dir.join(format!("{table}.parquet")))
        ));
    }
    let config = dir.join("node.toml");
    std::fs::write(&config, toml).map_err(|e| e.to_string())?;
    spawn_site(
        &[
            "node".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        "node agent for",
    )
}

/// Centralised: one context over all the original trusts' files.
async fn centralised(source: &Path) -> Result<SessionContext, String> {
    let mut ctx = SessionContext::new();
    tally_common::generalise::register(&mut ctx).map_err(|e| e.to_string())?;
    for table in ["patients", "episodes", "icd10_chapters"] {
        let mut parts = Vec::new();
        for trust in default_trusts() {
            let name = format!("{table}_{}", trust.code);
            let path = source.join(trust.code).join(format!("{table}.parquet"));
            ctx.register_parquet(
                &name,
                path.display().to_string(),
                ParquetReadOptions::default(),
            )
            .await
            .map_err(|e| e.to_string())?;
            parts.push(format!(
                "SELECT *, '{}' AS trust_code FROM {name}",
                trust.code
            ));
        }
        let body = if table == "icd10_chapters" {
            format!("SELECT * FROM {table}_{}", default_trusts()[0].code)
        } else {
            parts.join(" UNION ALL ")
        };
        ctx.sql(&format!("CREATE VIEW {table} AS {body}"))
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(ctx)
}

/// Runs every query on a local context, counting what `shipped` saw.
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
    system: &str,
    sites: usize,
    episodes: usize,
    runs: usize,
    shipped: Option<&Shipped>,
    expected: Option<&[Vec<String>]>,
) -> (Vec<Measurement>, Vec<Vec<String>>) {
    let mut results = Vec::new();
    let mut answers = Vec::new();
    for (index, (_, sql)) in QUERIES.iter().enumerate() {
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
        results.push(measurement(
            system,
            sites,
            episodes,
            index,
            checked,
            (per_run(moved.0), per_run(moved.1)),
        ));
    }
    (results, answers)
}

fn measurement(
    system: &str,
    sites: usize,
    episodes: usize,
    query: usize,
    timing: Result<(f64, f64), String>,
    (rows_moved, bytes_moved): (usize, usize),
) -> Measurement {
    let (median_ms, p95_ms, error) = match timing {
        Ok((median, p95)) => (median, p95, None),
        Err(err) => (f64::NAN, f64::NAN, Some(err)),
    };
    Measurement {
        system: system.to_string(),
        sites,
        episodes,
        query,
        median_ms,
        p95_ms,
        rows_moved,
        bytes_moved,
        peak_rss_mib: peak_rss_mib(),
        error,
    }
}

/// A Tally federation over `dirs`: node processes and a gateway in this process.
struct Federation {
    nodes: Vec<SiteProcess>,
    gateway: tally_gateway::GatewayHandle,
    target: crate::client::GatewayTarget,
    client: AnalystClient,
}

impl Federation {
    async fn start(
        dirs: &[PathBuf],
        certs: &CertFolder,
        policies: &Path,
        purpose: &str,
    ) -> Result<Self, String> {
        let mut nodes = Vec::new();
        let mut endpoints = Vec::new();
        for (index, dir) in dirs.iter().enumerate() {
            let code = site_code(dirs.len(), index);
            let node = spawn_node(&code, dir, certs, policies)?;
            endpoints.push((code.clone(), format!("Site {code}"), node.addr));
            nodes.push(node);
        }
        let security = Security::Tls(certs.clone());
        let mut config = federation::gateway_config(
            "127.0.0.1:0"
                .parse()
                .unwrap_or(SocketAddr::from(([127, 0, 0, 1], 0))),
            &endpoints,
            policies,
            &security,
        );
        config.request_timeout_secs = 600.0;
        config.limits.query_timeout_secs = 600.0;
        config.limits.queries_per_minute_per_user = 1_000_000;
        config.limits.queries_per_minute_per_project = 1_000_000;
        let gateway = tally_gateway::start(&config)
            .await
            .map_err(|e| e.to_string())?;
        let target = crate::client::GatewayTarget::new(
            federation::gateway_url(&security, gateway.addr),
            federation::ca_cert(&security),
        );
        let client = AnalystClient::connect_for(&target, DEMO_TOKEN, "", purpose)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Federation {
            nodes,
            gateway,
            target,
            client,
        })
    }

    /// Runs every query; rows and bytes from the gateway's audit record of the last run.
    async fn measure(&mut self, episodes: usize, runs: usize) -> Vec<Measurement> {
        let sites = self.nodes.len();
        let mut results = Vec::new();
        for (index, (_, sql)) in QUERIES.iter().enumerate() {
            reset_peak_rss();
            let client = &mut self.client;
            let timing = timed(runs, async || {
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
            results.push(measurement(
                "Tally",
                sites,
                episodes,
                index,
                timing.map(|(m, p, _)| (m, p)),
                moved,
            ));
        }
        results
    }

    async fn stop(self) {
        self.gateway.stop().await;
    }
}

/// Row shipping over `dirs`: row-server processes and a local aggregating context.
async fn row_shipping(
    dirs: &[PathBuf],
    episodes: usize,
    runs: usize,
    expected: &[Vec<String>],
) -> Result<Vec<Measurement>, String> {
    let mut servers = Vec::new();
    let mut channels = Vec::new();
    for dir in dirs {
        let server = spawn_site(
            &[
                "bench".into(),
                "serve-rows".into(),
                "--dir".into(),
                dir.display().to_string(),
            ],
            "rows on",
        )?;
        let channel = Endpoint::from_shared(format!("http://{}", server.addr))
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
    for table in ["patients", "episodes", "icd10_chapters"] {
        let path = dirs[0].join(format!("{table}.parquet"));
        let frame = local
            .read_parquet(path.display().to_string(), ParquetReadOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        let mut fields: Vec<_> = frame.schema().as_arrow().fields().iter().cloned().collect();
        if table != "icd10_chapters" {
            fields.push(Arc::new(arrow::datatypes::Field::new(
                "trust_code",
                arrow::datatypes::DataType::Utf8,
                false,
            )));
        }
        let schema = Arc::new(arrow::datatypes::Schema::new(fields));
        let sites = if table == "icd10_chapters" {
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
    let (results, _) = measure_context(
        &ctx,
        "Row shipping",
        dirs.len(),
        episodes,
        runs,
        Some(&shipped),
        Some(expected),
    )
    .await;
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
    for table in ["patients", "episodes", "icd10_chapters"] {
        let path = dir.join(format!("{table}.parquet"));
        let raw = format!("{table}_file");
        ctx.register_parquet(
            &raw,
            path.display().to_string(),
            ParquetReadOptions::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
        let body = if table == "icd10_chapters" {
            format!("SELECT * FROM {raw}")
        } else {
            format!("SELECT *, '{code}' AS trust_code FROM {raw}")
        };
        ctx.sql(&format!("CREATE VIEW {table} AS {body}"))
            .await
            .map_err(|e| e.to_string())?;
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
        tasks.push(tokio::spawn(async move {
            let mut client = AnalystClient::connect(&target, DEMO_TOKEN)
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
    Ok(Overhead {
        sql: TINY.into(),
        sites: federation.nodes.len(),
        median_ms,
        p95_ms,
        clients,
        seconds,
        queries_per_second: ok as f64 / seconds,
        errors,
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
}

/// A copy of the policy folder `from` in `to` whose `uec-demand` project may also query the
/// benchmark's sites `codes` (the shipped catalogue lists the demo trusts only).
fn bench_policies(from: &Path, to: &Path, codes: &[String]) -> Result<PathBuf, String> {
    std::fs::create_dir_all(to).map_err(|e| e.to_string())?;
    for entry in std::fs::read_dir(from).map_err(|e| e.to_string())? {
        let path = entry.map_err(|e| e.to_string())?.path();
        if path.is_file() {
            let name = path.file_name().ok_or("file name")?;
            std::fs::copy(&path, to.join(name)).map_err(|e| e.to_string())?;
        }
    }
    let catalogue_path = to.join("catalogue.json");
    let text = std::fs::read_to_string(&catalogue_path).map_err(|e| e.to_string())?;
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let trusts = catalogue
        .pointer_mut("/governance/projects/uec-demand/trusts")
        .and_then(serde_json::Value::as_array_mut)
        .ok_or("the catalogue has no uec-demand project")?;
    trusts.extend(codes.iter().map(|c| serde_json::Value::String(c.clone())));
    std::fs::write(&catalogue_path, catalogue.to_string()).map_err(|e| e.to_string())?;
    Ok(to.to_path_buf())
}

/// Runs the comparison.
pub async fn run(options: &Options) -> Result<Report, String> {
    let mut codes: Vec<String> = (0..3).map(|i| site_code(3, i)).collect();
    for &n in &options.sites {
        codes.extend((0..n).map(|i| site_code(n, i)));
    }
    let certs_dir = options.root.join("certs");
    let certs = CertFolder {
        dir: certs_dir.clone(),
    };
    let code_refs: Vec<&str> = codes.iter().map(String::as_str).collect();
    if !certs.is_complete(&code_refs) {
        crate::certs::create(&certs_dir, &code_refs)?;
    }
    let policies = bench_policies(&options.policies, &options.root.join("policies"), &codes)?;
    let mut report = Report {
        measurements: Vec::new(),
        overhead: None,
    };
    // The gateway's own overhead, on data small enough that the sites' work is negligible.
    let small = split(&hes(&options.root, SMALL_EPISODES)?, 3).await?;
    let mut federation = Federation::start(&small, &certs, &policies, &options.purpose).await?;
    report.overhead = Some(overhead(&mut federation, options.runs, 16, 10.0).await?);
    federation.stop().await;
    for &episodes in &options.episodes {
        let source = hes(&options.root, episodes)?;
        eprintln!("{episodes} episodes: Centralised");
        let central = centralised(&source).await?;
        let (measured, answers) = measure_context(
            &central,
            "Centralised",
            0,
            episodes,
            options.runs,
            None,
            None,
        )
        .await;
        report.measurements.extend(measured);
        drop(central);
        for &n in &options.sites {
            let dirs = split(&source, n).await?;
            eprintln!("{episodes} episodes: Tally over {n} sites");
            let mut federation =
                Federation::start(&dirs, &certs, &policies, &options.purpose).await?;
            report
                .measurements
                .extend(federation.measure(episodes, options.runs).await);
            federation.stop().await;
            if episodes <= options.row_shipping_max_episodes {
                eprintln!("{episodes} episodes: Row shipping over {n} sites");
                report
                    .measurements
                    .extend(row_shipping(&dirs, episodes, options.runs, &answers).await?);
            }
        }
    }
    Ok(report)
}
