//! A soak test: the gateway and three nodes as separate `tally` processes (plaintext on
//! loopback, the built-in policy with budgets that never run out, audit logs on disk), the
//! gateway reaching RXC through an emulated link, N analyst clients sending a realistic mix
//! for M minutes, and faults on a schedule: a node killed (SIGKILL) and restarted, a node
//! stopped (SIGSTOP) and continued, the gateway killed and restarted, the link to a trust
//! slowed, a node restarted gracefully, at 20 to 60 % of the run (in a run of ten minutes
//! or more, all between the second minute and the last). Reported: outcomes by code,
//! latency percentiles, each process's resident memory every 10 s and whether it stayed
//! flat, how long after each fault's end a query was answered by every trust again, and
//! whether every answered query's audit record is in the gateway's log and every log's
//! hash chain holds.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tally::client::{AnalystClient, GatewayTarget};
use tally::federation;
use tally::link::Link;
use tally_synth::default_trusts;
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where data, configs, logs and state are kept.
    pub root: PathBuf,
    /// Analyst clients.
    pub clients: usize,
    /// Minutes to run.
    pub minutes: f64,
    /// Whether to inject faults.
    pub faults: bool,
}

/// The analysts' mix: dashboards repeating the same queries (answered from the trusts'
/// stored answers), new questions (`{k}` a new constant each time), and refused queries.
const MIX: &[&str] = &[
    "SELECT sex, COUNT(*) FROM patients GROUP BY sex",
    "SELECT specialty, COUNT(*), AVG(length_of_stay) FROM episodes GROUP BY specialty",
    "SELECT trust_code, month(admission_date) AS m, COUNT(*) FROM episodes WHERE admission_method IN ('21', '22', '23', '24', '28') AND admission_date >= DATE '2024-01-01' GROUP BY 1, 2 ORDER BY 1, 2",
    "SELECT age_band(age_at_admission) AS band, COUNT(*) AS n, SUM(cost) FROM episodes WHERE cost > {k} GROUP BY 1 ORDER BY 1",
    "SELECT p.sex, p.imd_decile, COUNT(*), STDDEV(e.cost) FROM episodes e JOIN patients p ON e.person_id = p.person_id WHERE e.length_of_stay > {k} GROUP BY 1, 2",
    "SELECT COUNT(*) FROM episodes WHERE cost > {k}",
    "SELECT nhs_number, COUNT(*) FROM patients GROUP BY nhs_number",
    "SELECT * FROM patients",
];

/// A `tally` process and how to start it again.
struct Process {
    name: String,
    args: Vec<String>,
    child: Option<Child>,
    /// When the running child was started.
    started: Instant,
}

impl Process {
    fn start(name: &str, args: Vec<String>) -> Result<Self, String> {
        let mut process = Process {
            name: name.to_string(),
            args,
            child: None,
            started: Instant::now(),
        };
        process.spawn()?;
        Ok(process)
    }

    fn spawn(&mut self) -> Result<(), String> {
        let exe = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("tally");
        let child = Command::new(exe)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("{}: {e}", self.name))?;
        self.child = Some(child);
        self.started = Instant::now();
        Ok(())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status();
        }
    }

    /// Ends the process with `signal` and reaps it.
    fn end(&mut self, signal: &str) {
        self.signal(signal);
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// A sample of the running child's resident memory, if there is a child.
    fn sample(&self, at: Duration) -> Option<Sample> {
        self.pid().map(|pid| Sample {
            at: at.as_secs(),
            process: self.name.clone(),
            pid,
            age: self.started.elapsed().as_secs(),
            mib: tally_common::memory::resident_mib(Some(pid)),
        })
    }
}

/// One process's resident memory at one moment.
struct Sample {
    /// Seconds into the run.
    at: u64,
    /// Which process (gateway, RXA, ...).
    process: String,
    /// Which life of it.
    pid: u32,
    /// Seconds since this life started.
    age: u64,
    /// Resident memory, MiB.
    mib: f64,
}

/// A free loopback port.
fn free_port() -> Result<SocketAddr, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    listener.local_addr().map_err(|e| e.to_string())
}

fn path(p: &Path) -> String {
    p.display().to_string().replace('\\', "/")
}

/// What the clients saw.
#[derive(Default)]
struct Seen {
    millis: Vec<f64>,
    by_code: BTreeMap<String, usize>,
    answered_ids: Vec<String>,
    /// When a query was last answered by every trust.
    last_full: Option<Instant>,
    /// Each fully answered query's time.
    full_at: Vec<Instant>,
}

/// A fault: what happens at `at`, and when it ends.
struct Fault {
    at: Duration,
    lasts: Duration,
    what: &'static str,
}

/// Runs the soak and returns a Markdown report; fails if a rule was broken.
pub async fn run(options: &Options) -> Result<String, String> {
    // Absolute: the processes' configs name files, and a config's relative paths are read
    // from the config's own folder.
    let root = &std::path::absolute(&options.root).map_err(|e| e.to_string())?;
    let data = root.join("data");
    federation::ensure_data(&data, 20_000, 42)?;
    let shipped = federation::policies_folder(None, &data)?;
    let policies = crate::unlimited_budgets(&shipped, &root.join("policies"))?;
    let run_dir = root.join(format!("run-{}", std::process::id()));
    std::fs::create_dir_all(&run_dir).map_err(|e| e.to_string())?;
    let identity = federation::identity_provider(&data)?;
    let jwt = identity.jwt_config();
    let jwt_toml = format!(
        "[identity]\ntrust_gateway_identity = false\n[identity.jwt]\njwks = \"{}\"\nissuer = \"{}\"\naudience = \"{}\"\n",
        path(&jwt.jwks),
        jwt.issuer,
        jwt.audience
    );
    let mut nodes = Vec::new();
    let mut node_addrs = Vec::new();
    for trust in default_trusts() {
        let addr = free_port()?;
        let dir = data.join(trust.code);
        let mut toml = format!(
            "listen = \"{addr}\"\naudit_log = \"{}\"\nstate_dir = \"{}\"\npolicies = \"{}\"\n{jwt_toml}[trust]\ncode = \"{}\"\nname = \"{}\"\n[opt_out]\npath = \"{}\"\n",
            path(&run_dir.join(format!("{}.jsonl", trust.code))),
            path(&run_dir.join(format!("state-{}", trust.code))),
            path(&policies),
            trust.code,
            trust.name,
            path(&dir.join("opt_outs.parquet")),
        );
        for table in federation::DEMO_TABLES {
            toml.push_str(&format!(
                "[[tables]]\nname = \"{table}\"\npath = \"{}\"\n",
                path(&dir.join(format!("{table}.parquet")))
            ));
        }
        let config = run_dir.join(format!("node-{}.toml", trust.code));
        std::fs::write(&config, toml).map_err(|e| e.to_string())?;
        tally_node::NodeConfig::load(&config).map_err(|e| e.to_string())?;
        nodes.push(Process::start(
            trust.code,
            vec![
                "node".into(),
                "--config".into(),
                path(&config),
                "--insecure-loopback".into(),
            ],
        )?);
        node_addrs.push((trust, addr));
    }
    // The gateway reaches the last trust through an emulated link.
    let (last_trust, last_addr) = node_addrs.last().cloned().ok_or("no trusts")?;
    let link = Link::start(last_addr, 1000.0).await?;
    let gateway_addr = free_port()?;
    let mut toml = format!(
        "listen = \"{gateway_addr}\"\naudit_log = \"{}\"\nbudget_ledger = \"{}\"\npolicies = \"{}\"\nrequest_timeout_secs = 10.0\n[limits]\nqueries_per_minute_per_user = 1000000\nqueries_per_minute_per_project = 1000000\nquery_timeout_secs = 15.0\n[jwt]\njwks = \"{}\"\nissuer = \"{}\"\naudience = \"{}\"\n",
        path(&run_dir.join("gateway.jsonl")),
        path(&run_dir.join("gateway-ledger.jsonl")),
        path(&policies),
        path(&jwt.jwks),
        jwt.issuer,
        jwt.audience
    );
    for (trust, addr) in &node_addrs {
        let addr = if trust.code == last_trust.code {
            link.addr
        } else {
            *addr
        };
        toml.push_str(&format!(
            "[[nodes]]\ncode = \"{}\"\nname = \"{}\"\nurl = \"grpc://{addr}\"\n",
            trust.code, trust.name
        ));
    }
    let gateway_config = run_dir.join("gateway.toml");
    std::fs::write(&gateway_config, toml).map_err(|e| e.to_string())?;
    tally_gateway::GatewayConfig::load(&gateway_config).map_err(|e| e.to_string())?;
    let gateway = Process::start(
        "gateway",
        vec![
            "gateway".into(),
            "--config".into(),
            path(&gateway_config),
            "--insecure-loopback".into(),
        ],
    )?;
    let processes = Arc::new(Mutex::new((gateway, nodes)));
    let token = identity.mint(&federation::demo_claims(), federation::DEMO_TOKEN_LIFETIME)?;
    let target = GatewayTarget::plaintext(format!("grpc://{gateway_addr}"));
    wait_until_answering(&target, &token, Duration::from_secs(60)).await?;

    let started = Instant::now();
    let length = Duration::from_secs_f64(options.minutes * 60.0);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let counter = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client in 0..options.clients {
        let (seen, stop, counter) = (seen.clone(), stop.clone(), counter.clone());
        let (target, token) = (target.clone(), token.clone());
        clients.push(tokio::spawn(async move {
            let mut connection: Option<AnalystClient> = None;
            let mut i = client;
            while !stop.load(Ordering::SeqCst) {
                i += 1;
                let sql = MIX[i % MIX.len()].replace(
                    "{k}",
                    &(counter.fetch_add(1, Ordering::SeqCst) % 5000).to_string(),
                );
                let analyst = match &mut connection {
                    Some(analyst) => analyst,
                    None => match AnalystClient::connect(&target, &token).await {
                        Ok(analyst) => connection.insert(analyst),
                        Err(_) => {
                            seen.lock()
                                .await
                                .by_code
                                .entry("(gateway unreachable)".into())
                                .and_modify(|n| *n += 1)
                                .or_insert(1);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                let began = Instant::now();
                let outcome =
                    tokio::time::timeout(Duration::from_secs(30), analyst.query(&sql)).await;
                let took = began.elapsed();
                let mut seen = seen.lock().await;
                seen.millis.push(took.as_secs_f64() * 1e3);
                let code = match outcome {
                    Err(_) => "(no answer in 30 s)".to_string(),
                    Ok(Ok(answer)) => {
                        if answer.trusts.len() == 3 {
                            let now = Instant::now();
                            seen.last_full = Some(now);
                            seen.full_at.push(now);
                        }
                        seen.answered_ids.push(answer.query_id);
                        "answered".to_string()
                    }
                    Ok(Err(tally::client::ClientError::Refused(message))) => {
                        match message.split_once(": ").map(|(code, _)| code) {
                            Some(code) if tally_common::ErrorCode::parse(code).is_some() => {
                                code.to_string()
                            }
                            Some(_) | None
                                if message.contains("transport error")
                                    || message.contains("connection") =>
                            {
                                connection = None;
                                "(connection lost)".to_string()
                            }
                            Some(_) | None => format!("UNTYPED {message}"),
                        }
                    }
                    Ok(Err(_)) => {
                        connection = None;
                        "(connection lost)".to_string()
                    }
                };
                *seen.by_code.entry(code).or_default() += 1;
            }
        }));
    }

    // In a run of ten minutes or more, between the second minute and the last, which
    // memory is compared over (each must see the processes at work, not restarting).
    let faults: Vec<Fault> = if options.faults {
        let at = |fraction: f64| Duration::from_secs_f64(length.as_secs_f64() * fraction);
        vec![
            Fault {
                at: at(0.20),
                lasts: Duration::from_secs(20),
                what: "node RXA killed (SIGKILL), restarted",
            },
            Fault {
                at: at(0.30),
                lasts: Duration::from_secs(20),
                what: "node RXB stopped (SIGSTOP), continued",
            },
            Fault {
                at: at(0.40),
                lasts: Duration::from_secs(5),
                what: "gateway killed (SIGKILL), restarted",
            },
            Fault {
                at: at(0.50),
                lasts: Duration::from_secs(30),
                what: "link to RXC slowed to 0.05 Mbit/s",
            },
            Fault {
                at: at(0.60),
                lasts: Duration::from_secs(3),
                what: "node RXC stopped (SIGTERM), restarted",
            },
        ]
    } else {
        Vec::new()
    };
    let mut samples = Vec::new();
    let mut recoveries = Vec::new();
    let mut next_fault = 0;
    let mut next_sample = Duration::ZERO;
    while started.elapsed() < length {
        let now = started.elapsed();
        if now >= next_sample {
            let (gateway, nodes) = &*processes.lock().await;
            samples.extend(
                std::iter::once(gateway)
                    .chain(nodes)
                    .filter_map(|p| p.sample(now)),
            );
            // Once per 10 s mark, none made up for after a fault's pause.
            while next_sample <= now {
                next_sample += Duration::from_secs(10);
            }
        }
        if let Some(fault) = faults.get(next_fault)
            && now >= fault.at
        {
            inject(fault.what, true, &processes, &link).await?;
            tokio::time::sleep(fault.lasts).await;
            inject(fault.what, false, &processes, &link).await?;
            let ended = Instant::now();
            let recovered = loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                let seen = seen.lock().await;
                if let Some(at) = seen.full_at.iter().rev().find(|t| **t >= ended) {
                    break Some(at.duration_since(ended));
                }
                if ended.elapsed() > Duration::from_secs(60) {
                    break None;
                }
            };
            recoveries.push((fault.what, fault.lasts, recovered));
            next_fault += 1;
            continue;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        let _ = client.await;
    }
    {
        let (gateway, nodes) = &mut *processes.lock().await;
        gateway.end("-TERM");
        for node in nodes.iter_mut() {
            node.end("-TERM");
        }
    }
    let mut seen = std::mem::take(&mut *seen.lock().await);
    report(options, &run_dir, &mut seen, &samples, &recoveries)
}

/// Starts or ends the fault named `what`.
async fn inject(
    what: &str,
    start: bool,
    processes: &Mutex<(Process, Vec<Process>)>,
    link: &Link,
) -> Result<(), String> {
    let (gateway, nodes) = &mut *processes.lock().await;
    let node = |code: &str| what.contains(&format!("node {code}"));
    let index = ["RXA", "RXB", "RXC"].iter().position(|c| node(c));
    match (
        index,
        what.contains("killed"),
        what.contains("stopped (SIGSTOP)"),
        start,
    ) {
        (Some(i), true, _, true) => nodes[i].end("-KILL"),
        (Some(i), _, true, true) => nodes[i].signal("-STOP"),
        (Some(i), _, true, false) => nodes[i].signal("-CONT"),
        (Some(i), false, false, true) => nodes[i].end("-TERM"),
        (Some(i), _, false, false) => nodes[i].spawn()?,
        (None, true, _, true) => gateway.end("-KILL"),
        (None, true, _, false) => gateway.spawn()?,
        (None, false, _, true) => link.set_rate(0.05)?,
        (None, false, _, false) => link.set_rate(1000.0)?,
    }
    Ok(())
}

/// Waits until the gateway answers a query with every trust.
async fn wait_until_answering(
    target: &GatewayTarget,
    token: &str,
    within: Duration,
) -> Result<(), String> {
    let started = Instant::now();
    while started.elapsed() < within {
        if let Ok(mut analyst) = AnalystClient::connect(target, token).await
            && let Ok(answer) = analyst.query(MIX[0]).await
            && answer.trusts.len() == 3
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err("the federation did not start answering".into())
}

fn report(
    options: &Options,
    run_dir: &Path,
    seen: &mut Seen,
    samples: &[Sample],
    recoveries: &[(&str, Duration, Option<Duration>)],
) -> Result<String, String> {
    seen.millis.sort_by(f64::total_cmp);
    let at = |p: f64| {
        let n = seen.millis.len();
        if n == 0 {
            return f64::NAN;
        }
        seen.millis[(((n - 1) as f64) * p).round() as usize]
    };
    let mut text = format!(
        "soak: {} clients, {} min, faults {}; logs in {}\n\n{} queries; latency p50 {:.1} ms, p95 {:.1} ms, p99 {:.1} ms, max {:.0} ms\n\noutcomes:\n",
        options.clients,
        options.minutes,
        if options.faults { "on" } else { "off" },
        run_dir.display(),
        seen.millis.len(),
        at(0.5),
        at(0.95),
        at(0.99),
        at(1.0)
    );
    for (code, n) in &seen.by_code {
        text.push_str(&format!("- {code}: {n}\n"));
    }
    text.push_str(
        "\n| fault | lasted s | first answer from every trust after its end |\n|---|---|---|\n",
    );
    for (what, lasted, recovered) in recoveries {
        text.push_str(&format!(
            "| {what} | {} | {} |\n",
            lasted.as_secs(),
            recovered.map_or("none within 60 s".to_string(), |d| format!(
                "{:.2} s",
                d.as_secs_f64()
            ))
        ));
    }
    let (memory, unflat) = memory_report(options, samples);
    text.push_str(&memory);
    // Every answered query's record is in the gateway's log, and every chain holds.
    let mut logged = HashSet::new();
    let gateway_log = tally_common::audit::read_records(&run_dir.join("gateway.jsonl"))
        .map_err(|e| format!("{text}\nthe gateway's audit log: {e}"))?;
    for record in gateway_log {
        if record.get("step").and_then(|s| s.as_str()) == Some("run")
            && record.get("outcome").and_then(|s| s.as_str()) == Some("answered")
            && let Some(id) = record.get("query_id").and_then(|s| s.as_str())
        {
            logged.insert(id.to_string());
        }
    }
    let missing = seen
        .answered_ids
        .iter()
        .filter(|id| !logged.contains(*id))
        .count();
    text.push_str(&format!(
        "\naudit: {} answered queries, {missing} without an `answered` record in the gateway's log\n",
        seen.answered_ids.len()
    ));
    let mut broken = Vec::new();
    for log in ["gateway", "RXA", "RXB", "RXC"] {
        let file = run_dir.join(format!("{log}.jsonl"));
        match tally_common::audit::verify(&file) {
            Ok(verified) => text.push_str(&format!("- {log}: chain holds ({verified:?})\n")),
            Err(e) => {
                text.push_str(&format!("- {log}: BROKEN {e}\n"));
                broken.push(log);
            }
        }
    }
    let untyped = seen
        .by_code
        .keys()
        .filter(|c| c.starts_with("UNTYPED"))
        .count();
    let unrecovered = recoveries
        .iter()
        .filter(|(_, _, r)| r.is_none_or(|d| d > Duration::from_secs(10)))
        .count();
    if missing > 0 || !broken.is_empty() || untyped > 0 || unrecovered > 0 || !unflat.is_empty() {
        return Err(format!(
            "{text}\nthe soak broke a rule: {missing} records missing, chains broken {broken:?}, {untyped} untyped errors, {unrecovered} faults not recovered within 10 s, memory not flat in {unflat:?}"
        ));
    }
    Ok(text)
}

/// Resident memory over time, then whether it stayed flat: for each named process, the
/// mean over the last minute of the run against the mean over the second minute (whichever
/// life of the process was running then: a restarted process counts against its
/// predecessor), and the same for each life of a process on its own (its second minute of
/// life against its last), so that a restart can neither hide growth nor be mistaken for
/// it. Returns the text and what was not flat: more than 10 % up, or not measured in a run
/// or life long enough to measure (three minutes: the two minutes apart).
fn memory_report(options: &Options, samples: &[Sample]) -> (String, Vec<String>) {
    let names = ["gateway", "RXA", "RXB", "RXC"];
    let mut text = String::from(
        "\n| at s | gateway MiB | RXA MiB | RXB MiB | RXC MiB |\n|---|---|---|---|---|\n",
    );
    let mut times: Vec<u64> = samples.iter().map(|s| s.at).collect();
    times.dedup();
    for at in times {
        let row: Vec<String> = names
            .iter()
            .map(|name| {
                samples
                    .iter()
                    .find(|s| s.at == at && s.process == *name)
                    .map_or("-".to_string(), |s| format!("{:.0}", s.mib))
            })
            .collect();
        text.push_str(&format!("| {at} | {} |\n", row.join(" | ")));
    }
    text.push_str(
        "\n| process | second minute MiB | last minute MiB | change |\n|---|---|---|---|\n",
    );
    let mut unflat = Vec::new();
    let mut judge = |label: String, series: Vec<(u64, f64)>, end: u64| match flatness(&series, end)
    {
        Flatness::TooShort => {
            text.push_str(&format!(
                "| {label} | - | - | under three minutes: not measured |\n"
            ));
        }
        Flatness::Unmeasured => {
            text.push_str(&format!(
                "| {label} | - | - | **no sample in one of the minutes** |\n"
            ));
            unflat.push(label);
        }
        Flatness::Measured { second, last } => {
            let change = (last / second - 1.0) * 100.0;
            text.push_str(&format!(
                "| {label} | {second:.0} | {last:.0} | {change:+.1} % |\n"
            ));
            if change.is_nan() || change > 10.0 {
                unflat.push(label);
            }
        }
    };
    let run_end = (options.minutes * 60.0) as u64;
    for name in names {
        let series = samples
            .iter()
            .filter(|s| s.process == name)
            .map(|s| (s.at, s.mib))
            .collect();
        judge(name.to_string(), series, run_end);
    }
    let mut lives: Vec<(&str, u32, u64)> = Vec::new();
    for s in samples {
        if !lives
            .iter()
            .any(|(name, pid, _)| *name == s.process && *pid == s.pid)
        {
            lives.push((&s.process, s.pid, s.at.saturating_sub(s.age)));
        }
    }
    for (name, pid, from) in lives {
        let series: Vec<(u64, f64)> = samples
            .iter()
            .filter(|s| s.process == name && s.pid == pid)
            .map(|s| (s.age, s.mib))
            .collect();
        let end = series.iter().map(|(age, _)| *age).max().unwrap_or(0);
        judge(format!("{name}, its life from {from} s"), series, end);
    }
    (text, unflat)
}

/// How a series of memory samples (seconds, MiB) over `end` seconds compares.
enum Flatness {
    /// Under three minutes: the second minute and the last would overlap.
    TooShort,
    /// Long enough, but one of the two minutes has no sample.
    Unmeasured,
    /// The mean of each minute, MiB.
    Measured { second: f64, last: f64 },
}

fn flatness(series: &[(u64, f64)], end: u64) -> Flatness {
    if end < 180 {
        return Flatness::TooShort;
    }
    let mean = |within: &dyn Fn(u64) -> bool| {
        let picked: Vec<f64> = series
            .iter()
            .filter(|(t, _)| within(*t))
            .map(|(_, mib)| *mib)
            .collect();
        (!picked.is_empty()).then(|| picked.iter().sum::<f64>() / picked.len() as f64)
    };
    match (mean(&|t| (60..120).contains(&t)), mean(&|t| t + 60 >= end)) {
        (Some(second), Some(last)) => Flatness::Measured { second, last },
        (None, _) | (_, None) => Flatness::Unmeasured,
    }
}
