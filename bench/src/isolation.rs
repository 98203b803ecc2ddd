//! One project's heaviest queries against another's small ones at the same trusts (issue
//! 14's first measure). A local federation (in this process, plaintext on loopback) serves
//! generated data; one client of project `cardiac-audit` sends small queries throughout
//! (first for an unmeasured warm-up);
//! during the middle phase clients of project `uec-demand` send, back to back, the heaviest
//! release the model and the default policy allow, each with a new constant (so no stored
//! answer serves it), which the trusts stop at their processor-time budget. Reported: the
//! small queries' latency before, during and after, every outcome by code, and the
//! process's resident memory (the median over the phase) before the heavy phase and after
//! each round of it, with the bytes still allocated; the memory maps at those points are
//! saved beside the data.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tally::client::AnalystClient;
use tally::federation::{self, Limits, Security};
use tokio::sync::Mutex;

/// What to run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where data and policies are kept.
    pub root: PathBuf,
    /// Patients to generate across the three trusts.
    pub patients: usize,
    /// Clients sending heavy queries at once.
    pub heavy_clients: usize,
    /// Seconds of small queries before the measured phases, so that "before" is the
    /// settled process (the gateway's per-minute rate windows fill for a minute, the
    /// runtimes start their threads, the allocator takes its working set).
    pub warm_up_secs: u64,
    /// Seconds of each phase (before, during, after the heavy queries).
    pub phase_secs: u64,
    /// Rounds of heavy queries, each followed by an after phase (memory that one round
    /// leaves behind would grow round by round).
    pub rounds: usize,
    /// Each trust's processor-time budget per query, seconds.
    pub cpu_budget_secs: f64,
}

/// The small queries: a dashboard's, repeated.
const SMALL: &[&str] = &[
    "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
    "SELECT admission_method, COUNT(*) FROM episodes GROUP BY admission_method",
    "SELECT year(admission_date) AS y, COUNT(*) FROM episodes GROUP BY 1",
];

/// The heaviest release the default policy allows: the declared join, eight dimensions,
/// every aggregate of both measures, a filter (with `{k}` a new constant each time).
const HEAVY: &str = "SELECT age_band(e.age_at_admission), month(e.admission_date), \
    month(e.discharge_date), e.specialty, e.admission_method, e.trust_code, p.sex, p.ethnicity, \
    COUNT(*), COUNT(e.cost), COUNT(e.length_of_stay), SUM(e.cost), SUM(e.length_of_stay), \
    AVG(e.cost), AVG(e.length_of_stay), STDDEV(e.cost), STDDEV(e.length_of_stay), \
    STDDEV_POP(e.cost), STDDEV_POP(e.length_of_stay), VAR_SAMP(e.cost), \
    VAR_SAMP(e.length_of_stay), VAR_POP(e.cost), VAR_POP(e.length_of_stay) \
    FROM episodes e JOIN patients p ON e.person_id = p.person_id \
    WHERE e.age_at_admission <> {k} AND p.imd_decile <> 11 \
    GROUP BY 1, 2, 3, 4, 5, 6, 7, 8";

/// Latencies and outcomes of one kind of query in one phase.
#[derive(Default)]
struct Tally {
    millis: Vec<f64>,
    by_code: BTreeMap<String, usize>,
    /// The process's resident memory after each query, MiB (small queries only).
    rss_mib: Vec<f64>,
}

impl Tally {
    fn add(&mut self, took: Duration, outcome: Result<(), String>) {
        self.millis.push(took.as_secs_f64() * 1e3);
        let code = match outcome {
            Ok(()) => "answered".to_string(),
            Err(message) => message.split(':').next().unwrap_or("?").to_string(),
        };
        *self.by_code.entry(code).or_default() += 1;
    }

    /// The median of the resident memory sampled over the phase: steadier than one sample.
    fn median_rss_mib(&mut self) -> f64 {
        self.rss_mib.sort_by(f64::total_cmp);
        self.rss_mib
            .get(self.rss_mib.len() / 2)
            .copied()
            .unwrap_or(f64::NAN)
    }

    fn line(&mut self, label: &str) -> String {
        self.millis.sort_by(f64::total_cmp);
        let at = |p: f64| {
            let n = self.millis.len();
            if n == 0 {
                return f64::NAN;
            }
            self.millis[(((n - 1) as f64) * p).round() as usize]
        };
        format!(
            "| {label} | {} | {:.1} | {:.1} | {:.1} | {:?} |",
            self.millis.len(),
            at(0.5),
            at(0.99),
            at(1.0),
            self.by_code
        )
    }
}

/// Sends the small queries one after another for `phase`, noting the peak resident memory.
async fn small_phase(
    small: &mut AnalystClient,
    phase: Duration,
    sent: &mut usize,
    rss_peak: &mut f64,
) -> Tally {
    let mut tally = Tally::default();
    let started = Instant::now();
    while started.elapsed() < phase {
        let began = Instant::now();
        let outcome = small.query(SMALL[*sent % SMALL.len()]).await.map(drop);
        tally.add(began.elapsed(), outcome.map_err(|e| e.to_string()));
        let rss = tally_common::memory::resident_mib(None);
        tally.rss_mib.push(rss);
        *rss_peak = rss_peak.max(rss);
        *sent += 1;
    }
    tally
}

/// Copies the process's memory map, with each mapping's resident size (`/proc/self/smaps`),
/// to `root/name`: compared before and after, it shows where resident memory grew (the
/// allocators' heaps, the program's code, thread stacks).
fn save_memory_map(root: &std::path::Path, name: &str) -> Result<(), String> {
    std::fs::copy("/proc/self/smaps", root.join(name))
        .map(drop)
        .map_err(|e| format!("cannot save the memory map to {}: {e}", root.display()))
}

/// Runs the three phases and returns a Markdown report.
pub async fn run(options: &Options) -> Result<String, String> {
    if options.rounds == 0 {
        return Err("--rounds must be at least 1".into());
    }
    let data = options.root.join(format!("data-{}", options.patients));
    federation::ensure_data(&data, options.patients, 42)?;
    let shipped = federation::policies_folder(None, &data)?;
    let policies = crate::unlimited_budgets(&shipped, &options.root.join("policies"))?;
    let state = tempfile::tempdir().map_err(|e| e.to_string())?;
    let limits = Limits {
        gateway: tally_gateway::GatewayLimits {
            queries_per_minute_per_user: u32::MAX,
            queries_per_minute_per_project: u32::MAX,
            ..Default::default()
        },
        node: tally_node::NodeLimits {
            query_cpu_secs: Some(options.cpu_budget_secs),
            ..Default::default()
        },
    };
    let local = federation::start_with(
        &data,
        "127.0.0.1:0".parse().map_err(|_| "address")?,
        &policies,
        Security::InsecureLoopback,
        state.path(),
        &limits,
    )
    .await?;
    let token = local.analyst_token()?;
    let target = local.gateway_target();
    let mut small = AnalystClient::connect_for(&target, &token, "cardiac-audit", "research")
        .await
        .map_err(|e| e.to_string())?;
    let phase = Duration::from_secs(options.phase_secs);
    let mut report = String::from(
        "| phase | small queries | p50 ms | p99 ms | max ms | outcomes |\n|---|---|---|---|---|---|\n",
    );
    let mut sent = 0;
    let mut rss_peak = 0.0;
    let warm_up = Duration::from_secs(options.warm_up_secs);
    let mut warming = small_phase(&mut small, warm_up, &mut sent, &mut rss_peak).await;
    report.push_str(&warming.line("warm-up (not measured)"));
    report.push('\n');
    let mut before = small_phase(&mut small, phase, &mut sent, &mut rss_peak).await;
    report.push_str(&before.line("before"));
    report.push('\n');
    let rss_before = before.median_rss_mib();
    save_memory_map(&options.root, "smaps-before")?;
    let live_before = crate::live_heap_mib();
    let mut rss_after = Vec::new();
    let heavy = Arc::new(Mutex::new(Tally::default()));
    let constant = Arc::new(AtomicUsize::new(0));
    for round in 1..=options.rounds {
        let stop = Arc::new(AtomicBool::new(false));
        let mut heavy_tasks = Vec::new();
        for _ in 0..options.heavy_clients {
            let (heavy, stop, constant) = (heavy.clone(), stop.clone(), constant.clone());
            let mut client = AnalystClient::connect_for(&target, &token, "uec-demand", "research")
                .await
                .map_err(|e| e.to_string())?;
            heavy_tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::SeqCst) {
                    let k = constant.fetch_add(1, Ordering::SeqCst);
                    let sql = HEAVY.replace("{k}", &k.to_string());
                    let began = Instant::now();
                    let outcome = client.query(&sql).await.map(drop);
                    heavy
                        .lock()
                        .await
                        .add(began.elapsed(), outcome.map_err(|e| e.to_string()));
                }
            }));
        }
        let mut during = small_phase(&mut small, phase, &mut sent, &mut rss_peak).await;
        stop.store(true, Ordering::SeqCst);
        for task in heavy_tasks {
            let _ = task.await;
        }
        report.push_str(&during.line(&format!("during heavy queries (round {round})")));
        report.push('\n');
        let mut after = small_phase(&mut small, phase, &mut sent, &mut rss_peak).await;
        report.push_str(&after.line(&format!("after (round {round})")));
        report.push('\n');
        rss_after.push((after.median_rss_mib(), crate::live_heap_mib()));
        save_memory_map(&options.root, &format!("smaps-after-{round}"))?;
    }
    let mut heavy = std::mem::take(&mut *heavy.lock().await);
    report.push_str(&format!(
        "\n| heavy queries ({} clients, CPU budget {} s) | count | p50 ms | p99 ms | max ms | outcomes |\n|---|---|---|---|---|---|\n{}\n",
        options.heavy_clients,
        options.cpu_budget_secs,
        heavy.line("uec-demand").replacen("| uec-demand |", "| |", 1)
    ));
    let afters: Vec<String> = rss_after
        .iter()
        .enumerate()
        .map(|(i, (rss, live))| {
            format!(
                "after round {} {rss:.0} MiB ({:+.1} %; {live:.0} MiB live)",
                i + 1,
                (rss / rss_before - 1.0) * 100.0
            )
        })
        .collect();
    report.push_str(&format!(
        "\nresident memory of the process (gateway and three nodes), the median over each phase: \
         before {rss_before:.0} MiB ({live_before:.0} MiB live at its end: allocated, not freed); \
         peak {rss_peak:.0} MiB; {} (memory maps at those points: {}/smaps-*)\n",
        afters.join(", "),
        options.root.display()
    ));
    local.stop().await;
    Ok(report)
}
