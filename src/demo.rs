//! `tally demo`: generated data, three trusts and a gateway on loopback, a showcase of
//! queries, then serving until Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use tally::client::AnalystClient;
use tally::federation::{self, DEMO_USER, Security};
use tally::output::{self, Format};

/// The showcase: a title, the SQL, and whether Tally should refuse it.
pub const SHOWCASE: &[(&str, &str)] = &[
    (
        "Emergency admissions by month and trust, first quarter of 2024",
        "SELECT trust_code, month(admission_date) AS month, COUNT(*) AS admissions \
         FROM episodes WHERE admission_method IN ('21', '22', '23', '24', '28') \
         AND admission_date >= DATE '2024-01-01' AND admission_date < DATE '2024-04-01' \
         GROUP BY trust_code, month(admission_date) ORDER BY trust_code, month",
    ),
    (
        "Emergency admissions by age band (all trusts)",
        "SELECT age_band(age_at_admission) AS age_band, COUNT(*) AS admissions, \
         AVG(length_of_stay) AS mean_stay_days FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY 1 ORDER BY 1",
    ),
    (
        "Length of stay by specialty: the five busiest",
        "SELECT specialty, COUNT(*) AS episodes, AVG(length_of_stay) AS mean_stay, \
         STDDEV(length_of_stay) AS sd_stay FROM episodes GROUP BY specialty \
         ORDER BY episodes DESC LIMIT 5",
    ),
    (
        "Cost by diagnosis chapter (join with the public ICD-10 reference table)",
        "SELECT c.chapter, c.title, COUNT(*) AS episodes, SUM(e.cost) AS total_cost \
         FROM episodes e JOIN icd10_chapters c \
         ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to \
         GROUP BY c.chapter, c.title ORDER BY total_cost DESC LIMIT 5",
    ),
    (
        "Mean cost per episode by sex and deprivation decile (patients joined with episodes)",
        "SELECT p.sex, p.imd_decile, COUNT(*) AS episodes, AVG(e.cost) AS mean_cost \
         FROM episodes e JOIN patients p ON e.person_id = p.person_id \
         WHERE p.sex IN ('F', 'M') AND p.imd_decile IN (1, 10) \
         GROUP BY p.sex, p.imd_decile ORDER BY p.sex, p.imd_decile",
    ),
    (
        "Refused: asking for patient rows",
        "SELECT nhs_number, postcode FROM patients LIMIT 5",
    ),
];

/// Runs the demo.
pub async fn run(
    data_dir: &Path,
    patients: usize,
    port: u16,
    policies: &Path,
    exit: bool,
    insecure_loopback: bool,
) -> Result<(), String> {
    if federation::ensure_data(data_dir, patients, 42)? {
        println!(
            "Generated synthetic data for {patients} patients in {}",
            data_dir.display()
        );
    } else {
        println!("Using the synthetic data in {}", data_dir.display());
    }
    let security = if insecure_loopback {
        Security::InsecureLoopback
    } else {
        Security::tls_in(&data_dir.join("certs"))?
    };
    let listen = SocketAddr::from(([127, 0, 0, 1], port));
    // The ledgers live with the data and are never reset: a demo run again keeps its
    // budget spent, and repeated queries return their stored noisy answers.
    let state = data_dir.join("state");
    let local = federation::start(data_dir, listen, policies, security, &state).await?;
    match &local.security {
        Security::Tls(folder) => println!(
            "TLS on: mutual TLS between the gateway and each trust, TLS for analysts (CA: {})",
            folder.ca().display()
        ),
        Security::InsecureLoopback => {
            println!("TLS off (--insecure-loopback): plaintext on loopback")
        }
    }
    for (trust, node) in tally_synth::default_trusts().iter().zip(&local.nodes) {
        match node.listen_addr {
            Some(addr) => println!("  node agent {} ({}) on {addr}", trust.code, trust.name),
            None => println!(
                "  node agent {} ({}) dials out to the gateway's port for trusts{}, listening nowhere",
                trust.code,
                trust.name,
                local
                    .gateway
                    .trust_port_addr
                    .map(|a| format!(" {a}"))
                    .unwrap_or_default()
            ),
        }
    }
    let target = local.gateway_target();
    let url = target.url.clone();
    println!("  gateway on {url}\n");
    let token = local.analyst_token()?;
    let mut client = AnalystClient::connect(&target, &token)
        .await
        .map_err(|e| e.to_string())?;
    let mut failures = 0;
    for (title, sql) in SHOWCASE {
        println!("== {title}\n{sql}\n");
        match client.query(sql).await {
            Ok(answer) => {
                let mut stdout = std::io::stdout();
                output::write(
                    Format::Table,
                    &answer.schema,
                    &answer.batches,
                    &mut stdout,
                    None,
                )?;
                println!(
                    "{:.1} ms, trusts answered: {}\n",
                    answer.elapsed.as_secs_f64() * 1e3,
                    answer.trusts.join(", "),
                );
                if title.starts_with("Refused") {
                    failures += 1;
                }
            }
            Err(err) => {
                println!("refused: {err}\n");
                if !title.starts_with("Refused") {
                    failures += 1;
                }
            }
        }
    }
    match client.budget().await {
        Ok(report) => println!(
            "Privacy budget of project '{}' at each trust: ρ = {:.2} spent of {:.2} ({} releases; repeated queries are free). `tally budget` shows it.\n",
            report.project, report.spent, report.cap, report.releases
        ),
        Err(err) => println!("budget: {err}\n"),
    }
    println!("Flight SQL endpoint: {url}");
    println!(
        "Credentials: user '{DEMO_USER}' with this signed token (valid 12 h; `tally token` mints more), as Basic auth in the handshake or 'authorization: Bearer <token>':\n{token}"
    );
    let ca_flag = target
        .ca_cert
        .as_ref()
        .map(|ca| format!(" --ca-cert {}", ca.display()))
        .unwrap_or_default();
    println!(
        "Try: TALLY_TOKEN=$(tally token --data {}) tally query --gateway {url}{ca_flag} \"SELECT sex, COUNT(*) FROM patients GROUP BY sex\"",
        data_dir.display()
    );
    let _ = std::io::stdout().flush();
    if failures > 0 {
        local.stop().await;
        return Err(format!(
            "{failures} showcase queries did not behave as expected"
        ));
    }
    if !exit {
        println!("Serving until Ctrl-C.");
        let _ = tokio::signal::ctrl_c().await;
    }
    local.stop().await;
    Ok(())
}
