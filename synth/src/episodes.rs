//! Hospital episodes for one patient: dates, admission method, diagnosis,
//! specialty, procedure, length of stay and cost.

use rand::Rng;

use crate::catalogue::{self, Catalogue, Dx, ELECTIVE, EMERGENCY, MATERNITY};
use crate::population::Person;
use crate::random::{pick, unit_open};

/// First admission day: 2019-01-01, in days since the Unix epoch.
pub(crate) const FIRST_DAY: i32 = 17_897;
/// Last admission day: 2024-12-31.
pub(crate) const LAST_DAY: i32 = 20_088;

/// Episodes per patient (1..=8) with weights giving a mean of about 2.5.
const EPISODE_COUNTS: [(usize, u32); 8] = [
    (1, 38),
    (2, 24),
    (3, 14),
    (4, 9),
    (5, 6),
    (6, 4),
    (7, 3),
    (8, 2),
];
/// Most episodes a patient can have.
pub(crate) const MAX_EPISODES: usize = 8;
/// Chance that a later episode is a readmission for the previous diagnosis.
const READMISSION: f64 = 0.3;
/// Chance that a diagnosis with typical procedures records one.
const PROCEDURE_RATE: f64 = 0.7;
/// Chance of an extreme-cost episode (critical care, complex surgery).
const EXTREME_COST_RATE: f64 = 0.002;
/// Cost of each bed day, in pounds.
const BED_DAY_COST: f64 = 300.0;

/// One generated episode, before ids are attached.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Episode {
    pub admission: i32,
    pub discharge: i32,
    pub method: &'static str,
    pub specialty: &'static str,
    pub diagnosis: &'static str,
    pub procedure: Option<&'static str>,
    pub age: i32,
    pub length_of_stay: i32,
    pub cost: f64,
}

/// 1 January of `year` in days since the epoch (valid for years 1..).
const fn jan1(year: i32) -> i32 {
    let y = year - 1;
    365 * (year - 1970) + (y / 4 - 492) - (y / 100 - 19) + (y / 400 - 4)
}

/// Calendar year of an admission day in `FIRST_DAY..=LAST_DAY`.
fn year_of(day: i32) -> i32 {
    2019 + (2020..=2024).filter(|&y| jan1(y) <= day).count() as i32
}

/// Generates episodes from the shared clinical catalogue.
pub(crate) struct EpisodeGenerator {
    catalogue: Catalogue,
}

impl EpisodeGenerator {
    /// A generator over the built-in catalogue.
    pub(crate) fn new() -> Self {
        Self {
            catalogue: Catalogue::new(),
        }
    }

    /// Replaces `out` with the episodes of one patient row, in admission
    /// order. `planted` episodes (at most [`MAX_EPISODES`]) get the planted
    /// diagnosis; no other episode can.
    pub(crate) fn patient(
        &self,
        rng: &mut impl Rng,
        person: &Person,
        planted: usize,
        out: &mut Vec<Episode>,
    ) {
        out.clear();
        let count = if planted > 0 {
            (planted + rng.random_range(0..=2)).min(MAX_EPISODES)
        } else {
            pick(rng, &EPISODE_COUNTS)
        };
        let first = FIRST_DAY.max(jan1(person.year_of_birth));
        let mut days = [0i32; MAX_EPISODES];
        for day in &mut days[..count] {
            *day = rng.random_range(first..=LAST_DAY);
        }
        days[..count].sort_unstable();

        // Choose which episodes carry the planted code (partial shuffle).
        let mut order: [usize; MAX_EPISODES] = std::array::from_fn(|i| i);
        for i in 0..planted {
            let j = rng.random_range(i..count);
            order.swap(i, j);
        }
        let is_planted = |i: usize| order[..planted].contains(&i);

        let mut previous: Option<&'static Dx> = None;
        for (i, &admission) in days[..count].iter().enumerate() {
            let age = year_of(admission) - person.year_of_birth;
            let may_be_pregnant = person.sex == "F" && (15..=50).contains(&age);
            let routes = ELECTIVE | EMERGENCY | if may_be_pregnant { MATERNITY } else { 0 };
            let (dx, method) = if is_planted(i) {
                (
                    &catalogue::PLANTED,
                    catalogue::pick_method(rng, EMERGENCY).0,
                )
            } else {
                let readmit = previous
                    .filter(|d| d.routes & routes != 0 && d.fits(person.sex, age, admission))
                    .filter(|_| rng.random_bool(READMISSION));
                let (dx, method) = match readmit {
                    Some(d) => (d, catalogue::pick_method(rng, d.routes & routes).0),
                    None => {
                        let (method, route) = catalogue::pick_method(rng, routes);
                        (
                            self.catalogue.pick(rng, route, person.sex, age, admission),
                            method,
                        )
                    }
                };
                previous = Some(dx);
                (dx, method)
            };
            let specialty = match dx.specialty {
                "300" | "320" | "340" | "400" | "430" if age < 16 => "420",
                "300" if age >= 75 => "430",
                s => s,
            };
            let procedure = (!dx.procedures.is_empty() && rng.random_bool(PROCEDURE_RATE))
                .then(|| dx.procedures[rng.random_range(0..dx.procedures.len())]);
            // Pareto-like stay (tail index 2): mean ≈ dx.los, often 0, rarely months.
            let mean = dx.los * if age >= 75 { 1.5 } else { 1.0 };
            let mut length_of_stay = (mean * (1.0 / unit_open(rng).sqrt() - 1.0))
                .round()
                .min(365.0) as i32;
            if let Some(&next) = days[..count].get(i + 1) {
                length_of_stay = length_of_stay.min(next - admission);
            }
            let cost = if rng.random_bool(EXTREME_COST_RATE) {
                100_000.0 / (1.0 - 0.95 * rng.random::<f64>())
            } else {
                dx.tariff * (0.75 + 0.5 * rng.random::<f64>())
                    + BED_DAY_COST * f64::from(length_of_stay)
            };
            out.push(Episode {
                admission,
                discharge: admission + length_of_stay,
                method,
                specialty,
                diagnosis: dx.code,
                procedure,
                age,
                length_of_stay,
                cost: (cost * 100.0).round() / 100.0,
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calendar_helpers() {
        assert_eq!(jan1(1970), 0);
        assert_eq!(jan1(2019), FIRST_DAY);
        assert_eq!(jan1(2025) - 1, LAST_DAY);
        assert_eq!(jan1(1919), -18_628);
        assert_eq!(year_of(FIRST_DAY), 2019);
        assert_eq!(year_of(jan1(2020) - 1), 2019);
        assert_eq!(year_of(jan1(2020)), 2020);
        assert_eq!(year_of(LAST_DAY), 2024);
    }
}
