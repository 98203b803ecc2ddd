//! Benchmark data (generated once, cached): the synthetic HES-like federation at a given
//! number of episodes, re-split into N sites by person so that every patient's episodes stay
//! with the patient; and TPC-H `lineitem`, generated straight into N sites by order.

use std::path::{Path, PathBuf};

use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use tally_synth::{SynthConfig, default_trusts};

/// Episodes per patient row in the generator, measured (51,064 episodes for 20,000 patients).
const EPISODES_PER_PATIENT: f64 = 2.553;

/// The per-site tables.
const TABLES: [&str; 4] = ["patients", "episodes", "opt_outs", "icd10_chapters"];

/// The generated federation with about `episodes` episodes under `root` (reused if there).
pub fn hes(root: &Path, episodes: usize) -> Result<PathBuf, String> {
    let dir = root.join(format!("hes-{episodes}"));
    let patients = ((episodes as f64) / EPISODES_PER_PATIENT).round() as usize;
    if !dir.join("manifest.json").exists() {
        eprintln!(
            "generating {patients} patients (~{episodes} episodes) in {}",
            dir.display()
        );
        tally_synth::generate(&dir, &SynthConfig { patients, seed: 42 })
            .map_err(|e| e.to_string())?;
    }
    Ok(dir)
}

/// The site code of part `index` of `parts`.
pub fn site_code(parts: usize, index: usize) -> String {
    format!("S{parts}{index:02}")
}

/// `source` split into `parts` sites (cached), one folder per site with every table; the
/// episodes and patients of one person land at one site.
pub async fn split(source: &Path, parts: usize) -> Result<Vec<PathBuf>, String> {
    let root = source.join(format!("split-{parts}"));
    let sites: Vec<PathBuf> = (0..parts).map(|i| root.join(site_code(parts, i))).collect();
    if root.join("done").exists() {
        return Ok(sites);
    }
    eprintln!("splitting {} into {parts} sites", source.display());
    let ctx = SessionContext::new();
    for table in TABLES {
        let paths: Vec<String> = default_trusts()
            .iter()
            .map(|t| {
                source
                    .join(t.code)
                    .join(format!("{table}.parquet"))
                    .display()
                    .to_string()
            })
            .collect();
        let frame = ctx
            .read_parquet(paths, ParquetReadOptions::default())
            .await
            .map_err(|e| e.to_string())?;
        ctx.register_table(table, frame.into_view())
            .map_err(|e| e.to_string())?;
    }
    for (index, site) in sites.iter().enumerate() {
        std::fs::create_dir_all(site).map_err(|e| e.to_string())?;
        for table in TABLES {
            let sql = match table {
                "patients" | "episodes" => format!(
                    "SELECT * FROM {table} WHERE CAST(right(person_id, 4) AS INT) % {parts} = {index}"
                ),
                // The opt-out list (by NHS number) and the reference table go to every site.
                _ => format!("SELECT DISTINCT * FROM {table}"),
            };
            let path = site.join(format!("{table}.parquet"));
            ctx.sql(&sql)
                .await
                .map_err(|e| e.to_string())?
                .write_parquet(
                    &path.display().to_string(),
                    DataFrameWriteOptions::new().with_single_file_output(true),
                    None,
                )
                .await
                .map_err(|e| format!("{}: {e}", path.display()))?;
        }
    }
    std::fs::write(root.join("done"), "").map_err(|e| e.to_string())?;
    Ok(sites)
}

/// TPC-H `lineitem` at `scale_factor` in `parts` sites (generated once): part `i` of the
/// generator becomes site `i`. Returns the site folders and the table's total rows.
pub fn tpch(root: &Path, scale_factor: f64, parts: usize) -> Result<(Vec<PathBuf>, usize), String> {
    let dir = root
        .join(format!("tpch-sf{scale_factor}"))
        .join(format!("split-{parts}"));
    let sites: Vec<PathBuf> = (0..parts).map(|i| dir.join(site_code(parts, i))).collect();
    let done = dir.join("rows");
    if let Some(rows) = std::fs::read_to_string(&done)
        .ok()
        .and_then(|text| text.trim().parse().ok())
    {
        return Ok((sites, rows));
    }
    eprintln!("generating TPC-H lineitem at SF {scale_factor} into {parts} sites");
    let mut rows = 0;
    for (index, site) in sites.iter().enumerate() {
        std::fs::create_dir_all(site).map_err(|e| format!("{}: {e}", site.display()))?;
        rows += tally_synth::tpch::write_lineitem(
            &site.join("lineitem.parquet"),
            scale_factor,
            index + 1,
            parts,
        )
        .map_err(|e| e.to_string())?;
    }
    std::fs::write(&done, rows.to_string()).map_err(|e| format!("{}: {e}", done.display()))?;
    Ok((sites, rows))
}
