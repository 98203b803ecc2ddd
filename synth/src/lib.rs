//! Deterministic, seeded, scalable synthetic HES-like data for Tally.
//!
//! [`generate`] writes one set of Parquet tables per trust of
//! [`default_trusts`] (`patients`, `episodes`, `opt_outs` and the public
//! `icd10_chapters` reference table) plus a `manifest.json`. The same seed
//! and size always give byte-identical files. Rows are generated and
//! written in batches, so memory stays bounded at any scale.
//!
//! Realism built in: trusts of very different sizes; ~4% of patients
//! attending two trusts under the same NHS number; ~3% National Data
//! Opt-outs; skewed episode counts, heavy-tailed stays and costs; and a
//! planted rare-diagnosis cohort that small-number suppression must hide.

mod catalogue;
mod episodes;
mod nhs_number;
pub mod omop;
mod population;
mod random;
mod tables;
#[cfg(feature = "tpch")]
pub mod tpch;
mod trusts;
mod writer;

#[cfg(test)]
mod tests;

use std::fs;
use std::path::{Path, PathBuf};

use rand::Rng;
use serde::Serialize;

use crate::episodes::EpisodeGenerator;
use crate::population::{Person, Population};
use crate::random::Domain;
use crate::tables::{EpisodeColumns, OptOutColumns, PatientColumns};
use crate::trusts::TRUSTS;
pub use crate::trusts::{TrustSpec, default_trusts};
use crate::writer::{Table, io_error};

/// The public ICD-10 chapter reference table (`chapter,code_from,code_to,title`).
pub const ICD10_CHAPTERS_CSV: &str = include_str!("../../examples/reference/icd10_chapters.csv");

/// Diagnosis code of the planted small cohort; used nowhere else.
pub const PLANTED_DIAGNOSIS: &str = "A92.8";
/// Trust holding the planted cohort.
pub const PLANTED_TRUST: &str = "RXB";
/// Distinct patients in the planted cohort.
pub const PLANTED_PATIENTS: usize = 7;
/// Episodes with [`PLANTED_DIAGNOSIS`], in total across the cohort.
pub const PLANTED_EPISODES: usize = 30;

/// Planted episodes per cohort member (each at most 8, summing to
/// [`PLANTED_EPISODES`]).
const PLANTED_COUNTS: [usize; PLANTED_PATIENTS] = [6, 3, 5, 4, 2, 7, 3];
const _: () = {
    let (mut i, mut sum) = (0, 0);
    while i < PLANTED_PATIENTS {
        assert!(PLANTED_COUNTS[i] >= 1 && PLANTED_COUNTS[i] <= episodes::MAX_EPISODES);
        sum += PLANTED_COUNTS[i];
        i += 1;
    }
    assert!(sum == PLANTED_EPISODES);
};

/// Largest supported total number of patient rows.
const MAX_PATIENTS: usize = 50_000_000;
/// Share of patient rows with ethnicity not recorded.
const ETHNICITY_MISSING: f64 = 0.05;

/// What to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct SynthConfig {
    /// Total patient rows across all trusts (people attending two trusts
    /// count once per trust).
    pub patients: usize,
    /// Seed for every random choice.
    pub seed: u64,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            patients: 20_000,
            seed: 42,
        }
    }
}

/// Row counts written for one trust.
#[derive(Debug, Clone, Serialize)]
pub struct TrustSummary {
    /// Trust code, also the name of its output directory.
    pub code: String,
    /// Rows in `patients.parquet`.
    pub patients: usize,
    /// Rows in `episodes.parquet`.
    pub episodes: usize,
    /// Rows in `opt_outs.parquet`.
    pub opted_out: usize,
}

/// Row counts for every trust, in generation order.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// One entry per trust.
    pub trusts: Vec<TrustSummary>,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    /// Reading or writing a file or directory failed.
    #[error("I/O error on {}: {source}", path.display())]
    Io {
        /// The file or directory concerned.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The Parquet writer failed.
    #[error("Parquet error: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// Building Arrow data failed.
    #[error("Arrow error: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The configuration cannot be generated.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

/// `manifest.json`: the configuration and what was written.
#[derive(Serialize)]
struct Manifest<'a> {
    config: &'a SynthConfig,
    #[serde(flatten)]
    summary: &'a Summary,
}

/// Generates the synthetic federation into `out_dir`: for each trust
/// `<CODE>/{patients,episodes,opt_outs,icd10_chapters}.parquet`, then
/// `manifest.json`. Directories are created as needed and every file is
/// written under a temporary name and renamed into place when complete.
///
/// Needs `config.patients` of at least 9 (so every trust has a patient and
/// the planted trust has the whole cohort) and at most 50,000,000.
pub fn generate(out_dir: &Path, config: &SynthConfig) -> Result<Summary, SynthError> {
    let minimum = TRUSTS.map(|t| {
        if t.spec.code == PLANTED_TRUST {
            PLANTED_PATIENTS
        } else {
            1
        }
    });
    let least = minimum.iter().sum::<usize>();
    if !(least..=MAX_PATIENTS).contains(&config.patients) {
        return Err(SynthError::InvalidConfig(format!(
            "patients must be between {least} and {MAX_PATIENTS}, got {}",
            config.patients
        )));
    }
    let population = Population::new(&TRUSTS, &minimum, config.patients, config.seed);
    let generator = EpisodeGenerator::new();
    let reference = tables::icd10_chapters()?;
    fs::create_dir_all(out_dir).map_err(io_error(out_dir))?;

    // Trusts are independent, so they are written in parallel; each
    // uses its own random stream, so the output does not depend on timing.
    let trusts = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..TRUSTS.len())
            .map(|t| {
                let (population, generator, reference) = (&population, &generator, &reference);
                scope.spawn(move || {
                    let dir = out_dir.join(TRUSTS[t].spec.code);
                    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                    writer::write_batch(&dir.join("icd10_chapters.parquet"), reference)?;
                    write_trust(&dir, config.seed, population, generator, t)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect::<Result<Vec<_>, SynthError>>()
    })?;
    let summary = Summary { trusts };

    let manifest = Manifest {
        config,
        summary: &summary,
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| SynthError::Io {
        path: out_dir.join("manifest.json"),
        source: e.into(),
    })?;
    writer::write_file(&out_dir.join("manifest.json"), &json)?;
    Ok(summary)
}

/// Rows of the planted cohort at a trust with `rows` patients, spread
/// evenly, with the number of planted episodes for each.
fn planted_rows(rows: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..PLANTED_PATIENTS).map(move |p| {
        (
            (2 * p + 1) * rows / (2 * PLANTED_PATIENTS),
            PLANTED_COUNTS[p],
        )
    })
}

/// Streams the patients, episodes and opt-outs of trust `t` into `dir`.
fn write_trust(
    dir: &Path,
    seed: u64,
    population: &Population,
    generator: &EpisodeGenerator,
    t: usize,
) -> Result<TrustSummary, SynthError> {
    let code = TRUSTS[t].spec.code;
    let mut patients = Table::create(
        dir.join("patients.parquet"),
        PatientColumns::new(),
        &["person_id", "nhs_number"],
    )?;
    let mut episodes = Table::create(
        dir.join("episodes.parquet"),
        EpisodeColumns::new(),
        &["episode_id", "person_id", "cost"],
    )?;
    let mut opt_outs = Table::create(
        dir.join("opt_outs.parquet"),
        OptOutColumns::new(),
        &["nhs_number"],
    )?;

    let rows = population.rows(t);
    let mut planted = planted_rows(rows)
        .filter(|_| code == PLANTED_TRUST)
        .peekable();
    let mut rng = random::stream(random::key(seed, Domain::Trust), t as u64);
    let mut summary = TrustSummary {
        code: code.to_string(),
        patients: rows,
        episodes: 0,
        opted_out: 0,
    };
    let (mut person, mut person_id, mut episode_id) =
        (Person::default(), String::new(), String::new());
    let mut batch = Vec::with_capacity(episodes::MAX_EPISODES);
    for row in 0..rows {
        population.identity(population.person_at(t, row), &mut person);
        tables::format_id(&mut person_id, code, 'P', row, 7);
        let ethnicity = (!rng.random_bool(ETHNICITY_MISSING)).then_some(person.ethnicity);
        patients.columns.push(&person_id, &person, ethnicity);
        if person.opted_out {
            opt_outs.columns.push(&person.nhs_number);
            summary.opted_out += 1;
        }
        let planted_here = planted.next_if(|&(r, _)| r == row).map_or(0, |(_, n)| n);
        generator.patient(&mut rng, &person, planted_here, &mut batch);
        for episode in &batch {
            tables::format_id(&mut episode_id, code, 'E', summary.episodes, 9);
            episodes.columns.push(&episode_id, &person_id, episode);
            summary.episodes += 1;
        }
        patients.flush_if_full()?;
        episodes.flush_if_full()?;
        opt_outs.flush_if_full()?;
    }
    patients.commit()?;
    episodes.commit()?;
    opt_outs.commit()?;
    Ok(summary)
}
