//! `tally-bench`: the measurements recorded in BENCHMARKS.md, kept out of the `tally`
//! binary a trust runs.

pub mod compare;
mod data;
pub mod fuzz;
pub mod isolation;
pub mod report;
mod rows;
pub mod soak;
pub mod workload;

use std::alloc::{GlobalAlloc, Layout};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use tally_common::admission::{BudgetState, Origin, RequestIdentity, decide};
use tally_common::policy::Policy;
use tally_gateway::lower::releases_of;
use tally_gateway::parse::plan_read_only;

/// Representative analyst queries for the policy benchmark.
const QUERIES: &[&str] = &[
    "SELECT specialty, COUNT(*) FROM episodes GROUP BY specialty",
    "SELECT age_band(age_at_admission) AS band, month(admission_date) AS m, COUNT(*), AVG(length_of_stay) \
     FROM episodes WHERE admission_method IN ('21', '22') GROUP BY 1, 2",
    "SELECT p.sex, p.imd_decile, SUM(e.cost), STDDEV(e.cost) FROM episodes e JOIN patients p \
     ON e.person_id = p.person_id GROUP BY p.sex, p.imd_decile",
    "SELECT ethnicity, postcode_district(postcode) AS district, COUNT(*) FROM patients GROUP BY 1, 2",
];

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Times lowering to the query model and policy evaluation per query; returns a report.
/// "evaluate" decides a new input each time (the project's spending differs by a fraction
/// every iteration, so no decision is remembered); "repeat" decides the same input again,
/// as a dashboard's repeated query is, answered from the decisions the policy remembers.
pub async fn policy(policies: &Path, data: &Path, iterations: usize) -> Result<String, String> {
    let policy = Policy::load(policies).map_err(|e| e.to_string())?;
    let ctx = tally::federation::local_tables(data, policies).await?;
    let identity = RequestIdentity {
        user: "analyst".into(),
        groups: vec!["analysts".into()],
        project: "uec-demand".into(),
        purpose: "research".into(),
    };
    let snapshot = policy.snapshot();
    let mut report =
        format!("policy evaluation, {iterations} iterations per query (microseconds)\n");
    report.push_str(
        "query | evaluate median | evaluate p95 | lower+evaluate median | repeat median\n",
    );
    for (n, sql) in QUERIES.iter().enumerate() {
        let plan = plan_read_only(&ctx.state(), sql)
            .await
            .map_err(|e| e.to_string())?;
        let mut evaluated = Vec::with_capacity(iterations);
        let mut whole = Vec::with_capacity(iterations);
        let mut repeated = Vec::with_capacity(iterations);
        for i in 0..iterations {
            let started = Instant::now();
            let releases =
                releases_of(plan.clone(), snapshot.governance()).map_err(|e| e.to_string())?;
            let decided = Instant::now();
            let fresh = BudgetState {
                spent: (n * iterations + i) as f64 * 1e-9,
                paid: &|_| false,
            };
            decide(&snapshot, &identity, Origin::Analyst, &releases, &fresh)
                .map_err(|refused| refused.error.to_string())?;
            evaluated.push(decided.elapsed().as_secs_f64() * 1e6);
            whole.push(started.elapsed().as_secs_f64() * 1e6);
            let again = Instant::now();
            decide(&snapshot, &identity, Origin::Analyst, &releases, &fresh)
                .map_err(|refused| refused.error.to_string())?;
            repeated.push(again.elapsed().as_secs_f64() * 1e6);
        }
        evaluated.sort_by(f64::total_cmp);
        whole.sort_by(f64::total_cmp);
        repeated.sort_by(f64::total_cmp);
        let short: String = sql.chars().take(60).collect();
        report.push_str(&format!(
            "{short}… | {:.1} | {:.1} | {:.1} | {:.1}\n",
            percentile(&evaluated, 0.5),
            percentile(&evaluated, 0.95),
            percentile(&whole, 0.5),
            percentile(&repeated, 0.5)
        ));
    }
    Ok(report)
}

/// Times appending records to a hash-chained, fsynced audit log and verifying it.
pub fn audit(records: usize) -> Result<String, String> {
    let dir = tempfile_dir()?;
    let path = dir.join("bench-audit.jsonl");
    let log = tally_common::audit::AuditLog::open(&path, None).map_err(|e| e.to_string())?;
    let mut appends = Vec::with_capacity(records);
    for n in 0..records {
        let record = serde_json::json!({
            "time_ms": n, "query_id": format!("q{n}"), "sql": QUERIES[n % QUERIES.len()],
            "outcome": "answered", "trusts": ["RXA", "RXB", "RXC"], "duration_ms": 12.5,
        });
        let started = Instant::now();
        log.append(record).map_err(|e| e.to_string())?;
        appends.push(started.elapsed().as_secs_f64() * 1e6);
    }
    appends.sort_by(f64::total_cmp);
    let started = Instant::now();
    let verified = tally_common::audit::verify(&path).map_err(|e| e.to_string())?;
    let verify_ms = started.elapsed().as_secs_f64() * 1e3;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(format!(
        "audit log, {records} records: append (write + fsync of line and head) median {:.0} µs, p95 {:.0} µs; verify {} records in {verify_ms:.1} ms\n",
        percentile(&appends, 0.5),
        percentile(&appends, 0.95),
        verified.records
    ))
}

fn tempfile_dir() -> Result<std::path::PathBuf, String> {
    let dir = std::env::temp_dir().join(format!("tally-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    Ok(dir)
}

/// Times the same queries through a federation with TLS everywhere and one in plaintext on
/// loopback (analyst round trip, connection reused). Keep `(rounds + 1) * 3` within the
/// gateway's default rate limit of 60 queries a minute.
pub async fn links(data: &Path, policies: &Path, rounds: usize) -> Result<String, String> {
    use tally::federation::{self, Security};
    let certs = tempfile_dir()?.join("certs");
    let mut report = format!(
        "analyst round trip, {rounds} rounds of {} queries (ms)\nlink | median | p95\n",
        QUERIES.len() - 1
    );
    for (label, security) in [
        ("TLS + mutual TLS", Security::tls_in(&certs)?),
        ("plaintext (loopback)", Security::InsecureLoopback),
    ] {
        let state = tempfile::tempdir().map_err(|e| e.to_string())?;
        let local = federation::start(
            data,
            "127.0.0.1:0".parse().unwrap(),
            policies,
            security,
            state.path(),
        )
        .await?;
        let token = local.analyst_token()?;
        let mut client = tally::client::AnalystClient::connect(&local.gateway_target(), &token)
            .await
            .map_err(|e| e.to_string())?;
        let mut times = Vec::new();
        for round in 0..rounds + 1 {
            for sql in &QUERIES[..QUERIES.len() - 1] {
                let answer = client.query(sql).await.map_err(|e| e.to_string())?;
                if round > 0 {
                    times.push(answer.elapsed.as_secs_f64() * 1e3);
                }
            }
        }
        local.stop().await;
        times.sort_by(f64::total_cmp);
        report.push_str(&format!(
            "{label} | {:.1} | {:.1}\n",
            percentile(&times, 0.5),
            percentile(&times, 0.95)
        ));
    }
    let _ = std::fs::remove_dir_all(certs.parent().unwrap_or(&certs));
    Ok(report)
}

/// A copy of the policy folder `from` in `to` whose projects' budgets never run out, so that
/// a long run's releases are decided and run rather than refused for budget.
pub fn unlimited_budgets(from: &Path, to: &Path) -> Result<std::path::PathBuf, String> {
    compare::copy_policy_files(from, to)?;
    let path = to.join("catalogue.json");
    let text = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
    let mut catalogue: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| e.to_string())?;
    let projects = catalogue
        .pointer_mut("/governance/projects")
        .and_then(serde_json::Value::as_object_mut)
        .ok_or("the catalogue has no projects")?;
    for project in projects.values_mut() {
        project["budget"] = serde_json::json!({ "rho_cap": 1.0e6 });
    }
    std::fs::write(&path, catalogue.to_string()).map_err(|e| e.to_string())?;
    Ok(to.to_path_buf())
}

/// mimalloc, counting the bytes the process holds live, so that a report can tell memory
/// still in use from memory the allocator keeps after it was freed (`live_heap_mib`).
pub struct CountingAllocator(pub mimalloc::MiMalloc);

/// Bytes allocated through [`CountingAllocator`] and not yet freed.
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed on unchanged to mimalloc; the counter only observes sizes.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let block = unsafe { self.0.alloc(layout) };
        if !block.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        block
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let block = unsafe { self.0.alloc_zeroed(layout) };
        if !block.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        block
    }

    unsafe fn dealloc(&self, block: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.0.dealloc(block, layout) }
    }

    unsafe fn realloc(&self, block: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let moved = unsafe { self.0.realloc(block, layout, new_size) };
        if !moved.is_null() {
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        moved
    }
}

/// The bytes this process holds live (allocated and not freed), MiB, as counted by
/// [`CountingAllocator`]; 0 where it is not the global allocator.
pub fn live_heap_mib() -> f64 {
    LIVE_BYTES.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}
