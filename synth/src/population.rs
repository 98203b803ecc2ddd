//! Who is a patient where: the split of patient rows across trusts, the
//! people who attend two trusts, and each person's stable identity.
//!
//! A person is "homed" at one trust; about 2% of each trust's home people
//! also attend one other trust, where they get a second patient row. Both
//! rows are derived from the same per-person random stream, so they share
//! NHS number, sex, year of birth, ethnicity, postcode and opt-out status.
//! Everything is computed on demand from indices: nothing is held per person.

use rand::Rng;

use crate::nhs_number::{self, NhsNumbers};
use crate::random::{self, Domain, mix, pick};
use crate::trusts::TrustDef;

/// Fraction of a trust's home people who also attend one other trust.
const SHARED_RATE: f64 = 0.02;
/// One person in every block of this many home people has opted out (~3%).
const OPT_OUT_BLOCK: usize = 33;

/// Age on 1 January 2024 by band, weighted towards hospital users.
const AGE_BANDS: [((i32, i32), u32); 8] = [
    ((0, 4), 7),
    ((5, 15), 7),
    ((16, 29), 12),
    ((30, 44), 15),
    ((45, 59), 17),
    ((60, 74), 20),
    ((75, 89), 18),
    ((90, 105), 4),
];

/// NHS ethnic category codes with approximate England weights (per 1000).
const ETHNICITY: [(&str, u32); 16] = [
    ("A", 735),
    ("B", 9),
    ("C", 62),
    ("D", 6),
    ("E", 3),
    ("F", 6),
    ("G", 5),
    ("H", 33),
    ("J", 27),
    ("K", 11),
    ("L", 17),
    ("M", 11),
    ("N", 25),
    ("P", 5),
    ("R", 8),
    ("S", 22),
];

/// Letters allowed in the inward part of a UK postcode.
const INWARD_LETTERS: &[u8; 20] = b"ABDEFGHJLNPQRSTUWXYZ";

/// Identifies a person by home trust and index among its home people.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PersonKey {
    pub trust: usize,
    pub index: usize,
}

/// The stable attributes of one person.
#[derive(Debug, Default, Clone)]
pub(crate) struct Person {
    pub nhs_number: String,
    pub sex: &'static str,
    pub year_of_birth: i32,
    pub ethnicity: &'static str,
    pub postcode: String,
    pub imd_decile: i32,
    pub opted_out: bool,
}

/// Per-trust counts.
#[derive(Debug, Clone)]
struct TrustLayout {
    /// Patient rows at this trust (home people plus visitors).
    rows: usize,
    /// People homed here.
    home: usize,
    /// Global index of this trust's first home person.
    first_person: u64,
    /// `exports[d]`: home people who also attend trust `d`.
    exports: Vec<usize>,
    /// Visitors: people homed elsewhere with a row here.
    imports: usize,
}

/// The whole synthetic population, addressable by trust and row.
pub(crate) struct Population<'a> {
    trusts: &'a [TrustDef],
    layout: Vec<TrustLayout>,
    person_key: [u8; 32],
    seed: u64,
    nhs: NhsNumbers,
}

impl<'a> Population<'a> {
    /// Splits `total` rows across `trusts` by share, guaranteeing each trust
    /// at least `minimum[t]` rows (the caller checks `total` is large enough).
    pub(crate) fn new(trusts: &'a [TrustDef], minimum: &[usize], total: usize, seed: u64) -> Self {
        let rows = split(trusts, minimum, total);
        let share = |t: usize| trusts[t].spec.share;
        let exports: Vec<Vec<usize>> = (0..trusts.len())
            .map(|s| {
                (0..trusts.len())
                    .map(|d| {
                        if s == d {
                            0
                        } else {
                            let expected =
                                rows[s] as f64 * SHARED_RATE * share(d) / (1.0 - share(s));
                            expected.round() as usize
                        }
                    })
                    .collect()
            })
            .collect();
        let mut first_person = 0;
        let layout = (0..trusts.len())
            .map(|t| {
                let imports = (0..trusts.len()).map(|s| exports[s][t]).sum::<usize>();
                let home = rows[t] - imports;
                let l = TrustLayout {
                    rows: rows[t],
                    home,
                    first_person,
                    exports: exports[t].clone(),
                    imports,
                };
                first_person += home as u64;
                l
            })
            .collect();
        Self {
            trusts,
            layout,
            person_key: random::key(seed, Domain::Person),
            seed,
            nhs: NhsNumbers::new(seed),
        }
    }

    /// Number of patient rows at trust `t`.
    pub(crate) fn rows(&self, t: usize) -> usize {
        self.layout[t].rows
    }

    /// The person behind patient row `row` of trust `t`. Visitor rows are
    /// spread evenly through the table rather than appended at the end.
    pub(crate) fn person_at(&self, t: usize, row: usize) -> PersonKey {
        let l = &self.layout[t];
        let (n, i) = (l.rows as u64, l.imports as u64);
        let before = row as u64 * i / n;
        if (row as u64 + 1) * i / n == before {
            return PersonKey {
                trust: t,
                index: row - before as usize,
            };
        }
        // Visitor number `before`: find its home trust and export slot.
        let mut k = before as usize;
        for (s, source) in self.layout.iter().enumerate() {
            let count = source.exports[t];
            if k < count {
                let slot = source.exports[..t].iter().sum::<usize>() + k;
                return PersonKey {
                    trust: s,
                    index: self.exported_person(s, slot),
                };
            }
            k -= count;
        }
        unreachable!("visitor index within imports by construction")
    }

    /// Home index of the `slot`-th exported person of trust `s`: exported
    /// people are spread over the home range, one per equal-sized bucket.
    fn exported_person(&self, s: usize, slot: usize) -> usize {
        let l = &self.layout[s];
        let total: usize = l.exports.iter().sum();
        let lo = slot * l.home / total;
        let hi = (slot + 1) * l.home / total;
        let jitter = mix(self.seed ^ mix(((s as u64) << 40) | slot as u64));
        lo + (jitter % (hi - lo) as u64) as usize
    }

    /// Fills `out` with the identity of person `key`.
    pub(crate) fn identity(&self, key: PersonKey, out: &mut Person) {
        let global = self.layout[key.trust].first_person + key.index as u64;
        debug_assert!(global < nhs_number::CAPACITY);
        let mut rng = random::stream(self.person_key, global);
        out.nhs_number.clear();
        out.nhs_number
            .extend(self.nhs.number(global).map(char::from));
        out.sex = match rng.random_range(0..10_000) {
            0..10 => "U",
            10..5_110 => "F",
            _ => "M",
        };
        let (lo, hi) = pick(&mut rng, &AGE_BANDS);
        out.year_of_birth = 2024 - rng.random_range(lo..=hi);
        out.ethnicity = pick(&mut rng, &ETHNICITY);
        let catchment = self.trusts[key.trust].catchment;
        let area = catchment[rng.random_range(0..catchment.len())];
        out.imd_decile = (area.imd_decile + rng.random_range(-2..=2)).clamp(1, 10);
        out.postcode.clear();
        out.postcode.push_str(area.code);
        out.postcode.push(' ');
        out.postcode
            .push(char::from(b'0' + rng.random_range(1..10u8)));
        for _ in 0..2 {
            out.postcode.push(char::from(
                INWARD_LETTERS[rng.random_range(0..INWARD_LETTERS.len())],
            ));
        }
        let block = key.index / OPT_OUT_BLOCK;
        let chosen = mix(self.seed ^ mix(((key.trust as u64) << 48) | block as u64));
        out.opted_out = key.index % OPT_OUT_BLOCK == (chosen % OPT_OUT_BLOCK as u64) as usize;
    }
}

/// Largest-remainder split of `total` by share, then topped up to each
/// trust's minimum by taking rows from the trust with most to spare.
fn split(trusts: &[TrustDef], minimum: &[usize], total: usize) -> Vec<usize> {
    let exact: Vec<f64> = trusts.iter().map(|t| t.spec.share * total as f64).collect();
    let mut rows: Vec<usize> = exact.iter().map(|x| x.floor() as usize).collect();
    let mut by_remainder: Vec<usize> = (0..trusts.len()).collect();
    by_remainder
        .sort_by(|&a, &b| (exact[b] - exact[b].floor()).total_cmp(&(exact[a] - exact[a].floor())));
    let missing = total - rows.iter().sum::<usize>();
    for &t in by_remainder.iter().cycle().take(missing) {
        rows[t] += 1;
    }
    for t in 0..trusts.len() {
        while rows[t] < minimum[t] {
            let donor = (0..trusts.len())
                .max_by_key(|&d| (rows[d].saturating_sub(minimum[d]), std::cmp::Reverse(d)))
                .unwrap_or(t);
            rows[donor] -= 1;
            rows[t] += 1;
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trusts::TRUSTS;

    const MIN: [usize; 3] = [1, 7, 1];

    #[test]
    fn split_adds_up_and_respects_minimums() {
        for total in (9..3_000).chain([20_000, 4_000_000, 50_000_000]) {
            let pop = Population::new(&TRUSTS, &MIN, total, 1);
            let rows: Vec<usize> = (0..3).map(|t| pop.rows(t)).collect();
            assert_eq!(rows.iter().sum::<usize>(), total);
            for t in 0..3 {
                let l = &pop.layout[t];
                assert!(rows[t] >= MIN[t]);
                assert!(
                    l.home >= 1 && l.exports.iter().sum::<usize>() <= l.home,
                    "{total}"
                );
            }
        }
    }

    #[test]
    fn every_person_has_one_home_row_and_visitors_are_distinct() {
        let pop = Population::new(&TRUSTS, &MIN, 5_000, 3);
        let mut seen = std::collections::BTreeMap::new();
        for t in 0..3 {
            for row in 0..pop.rows(t) {
                let key = pop.person_at(t, row);
                assert!(seen.insert((key.trust, key.index, t), row).is_none());
                assert!(key.index < pop.layout[key.trust].home);
            }
        }
        let homes = seen.keys().filter(|(h, _, t)| h == t).count();
        assert_eq!(homes, pop.layout.iter().map(|l| l.home).sum::<usize>());
        assert!(seen.len() > homes, "some people attend two trusts");
    }

    #[test]
    fn exactly_one_opt_out_per_full_block() {
        let pop = Population::new(&TRUSTS, &MIN, 3_300, 9);
        let home = pop.layout[0].home;
        let mut person = Person::default();
        let opted = (0..home)
            .filter(|&index| {
                pop.identity(PersonKey { trust: 0, index }, &mut person);
                person.opted_out
            })
            .count();
        // The last, partial block may or may not contain its chosen index.
        let full_blocks = home / OPT_OUT_BLOCK;
        assert!(
            (full_blocks..=full_blocks + 1).contains(&opted),
            "{opted} of {home}"
        );
    }
}
