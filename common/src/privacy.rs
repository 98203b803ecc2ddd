//! What differential privacy at a trust means for one release, decided from the model,
//! the catalogue and ρ before any data is read, so that the gateway (which shows analysts
//! the accuracy of every value) and the nodes (which add the noise) cannot drift:
//! - contribution bounds: how many rows of one patient count in a group, and in how many
//!   groups one patient counts;
//! - fixed point: measures are clamped to the catalogue's bounds and summed as integers;
//! - sensitivities, and from them the discrete Gaussian scale of every partial, each
//!   spending an equal share of the release's ρ (zCDP composes by addition);
//! - keys: every key of public domains (the catalogue's value lists, age bands within a
//!   column's bounds, months or years of a declared period), or a noisy patient count per
//!   group and a threshold that a group made by one patient clears with probability at
//!   most δ.

use arrow::datatypes::DataType;
use chrono::Datelike as _;
use datafusion::common::ScalarValue;

use crate::generalise::band_of;
use crate::governance::{ColumnSpec, Governance};
use crate::model::{Comparison, Dimension, Generaliser, Literal, Partial, Predicate, ReleaseQuery};
use crate::noise::{NoiseScale, Rho};
use crate::{ErrorCode, TallyError};

/// The most keys a release with public domains may enumerate; beyond it the trust
/// thresholds instead (a choice that depends on the model and catalogue only).
pub const MAX_PUBLIC_KEYS: usize = 20_000;

/// Field metadata key: the standard deviation of the noise in a value, in its units.
pub const NOISE_SD: &str = "tally.noise_sd";

fn internal(message: &str) -> TallyError {
    TallyError::new(ErrorCode::Internal, message.to_string())
}

/// How much one patient may contribute to one release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContributionBounds {
    /// Rows of one patient counted in one group.
    pub rows_per_group: u64,
    /// Groups one patient contributes to.
    pub groups_per_unit: u64,
}

impl ContributionBounds {
    /// The bounds for `release`: the settings' bounds, tightened by the fact table's rows
    /// per patient; a release without groups has exactly one group per patient.
    pub fn of(governance: &Governance, release: &ReleaseQuery) -> ContributionBounds {
        let privacy = &governance.settings.privacy;
        let per_unit = governance
            .table(&release.fact)
            .and_then(|t| t.max_rows_per_unit)
            .unwrap_or(u64::MAX);
        let groups = if release.group_by.is_empty() {
            1
        } else {
            privacy.max_groups_per_unit.min(per_unit)
        };
        ContributionBounds {
            rows_per_group: privacy.max_rows_per_group.min(per_unit).max(1),
            groups_per_unit: groups.max(1),
        }
    }
}

/// A measure in integer fixed point: values are clamped to `[low, high]` and kept with
/// `10^precision` as one unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FixedPoint {
    /// The lower bound, in the column's own unit.
    pub low: f64,
    /// The upper bound, in the column's own unit.
    pub high: f64,
    /// How many fixed-point units make one of the column's units.
    pub scale: i64,
}

impl FixedPoint {
    /// The fixed point of an aggregated column, from its catalogue entry.
    pub fn of(spec: &ColumnSpec) -> Result<FixedPoint, TallyError> {
        let [low, high] = spec.bounds.ok_or_else(|| {
            TallyError::new(
                ErrorCode::PolicyError,
                "an aggregated column has no bounds in this trust's catalogue",
            )
        })?;
        Ok(FixedPoint {
            low,
            high,
            scale: 10i64.pow(spec.precision),
        })
    }

    /// The fixed point of a partial's values: none for counts, the column's for sums.
    pub fn of_partial(
        governance: &Governance,
        partial: &Partial,
    ) -> Result<Option<FixedPoint>, TallyError> {
        match partial {
            Partial::Rows | Partial::Count(_) => Ok(None),
            Partial::Sum(column) | Partial::SumSquares(column) => {
                let spec = governance
                    .column(&column.table, &column.column)
                    .ok_or_else(|| internal("an aggregated column has no catalogue entry"))?;
                FixedPoint::of(spec).map(Some)
            }
        }
    }

    /// The largest magnitude one clamped value can have, in fixed-point units.
    pub fn magnitude(&self) -> u128 {
        let (low, high) = self.fixed_bounds();
        u128::from(low.unsigned_abs().max(high.unsigned_abs()))
    }

    /// The bounds in fixed-point units, rounded outwards.
    pub fn fixed_bounds(&self) -> (i64, i64) {
        (
            (self.low * self.scale as f64).floor() as i64,
            (self.high * self.scale as f64).ceil() as i64,
        )
    }
}

/// The squared L2 sensitivity of a partial over all groups, in fixed-point units: one
/// patient changes at most `groups_per_unit` groups, each by at most `rows_per_group`
/// rows (or that many clamped values, or squares of them).
pub fn sensitivity_squared(
    partial: &Partial,
    bounds: ContributionBounds,
    fixed: Option<FixedPoint>,
) -> u128 {
    let rows = u128::from(bounds.rows_per_group);
    let groups = u128::from(bounds.groups_per_unit);
    let magnitude = fixed.map_or(1, |f| f.magnitude());
    let per_group = match partial {
        Partial::Rows | Partial::Count(_) => rows,
        Partial::Sum(_) => rows.saturating_mul(magnitude),
        Partial::SumSquares(_) => rows.saturating_mul(magnitude.saturating_mul(magnitude)),
    };
    per_group.saturating_mul(per_group).saturating_mul(groups)
}

/// The squared L2 sensitivity of the count of patients per group (used to threshold
/// groups whose keys are not public): one patient is in at most `groups_per_unit` groups.
pub fn units_sensitivity_squared(bounds: ContributionBounds) -> u128 {
    u128::from(bounds.groups_per_unit)
}

/// How a release's keys are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum Keys {
    /// Every key of the public domains, in order.
    Public(Vec<Vec<ScalarValue>>),
    /// Groups whose noisy patient count reaches `threshold`.
    Thresholded {
        /// The smallest noisy patient count released.
        threshold: i128,
        /// The noise on the patient count.
        scale: NoiseScale,
    },
}

/// The noise of one release: decided from the model, the catalogue and ρ, before any data
/// is read.
#[derive(Debug, Clone)]
pub struct ReleaseNoise {
    /// The partials, in order.
    pub partials: Vec<Partial>,
    /// The noise of each partial, in fixed-point units.
    pub scales: Vec<NoiseScale>,
    /// The fixed point of each partial's column (none for the row count).
    pub fixed: Vec<Option<FixedPoint>>,
    /// How the keys are chosen.
    pub keys: Keys,
}

impl ReleaseNoise {
    /// The noise of `release` at ρ = `rho` under `bounds`; `group_types` are the types of
    /// the group columns.
    pub fn of(
        governance: &Governance,
        release: &ReleaseQuery,
        bounds: ContributionBounds,
        rho: Rho,
        group_types: &[DataType],
    ) -> Result<ReleaseNoise, TallyError> {
        let partials = release.partials();
        let public = public_keys(governance, release, group_types)?;
        let statistics = partials.len() as u64 + u64::from(public.is_none());
        let share = rho.split(statistics.max(1));
        let fixed = partials
            .iter()
            .map(|partial| FixedPoint::of_partial(governance, partial))
            .collect::<Result<Vec<_>, TallyError>>()?;
        let scales = partials
            .iter()
            .zip(&fixed)
            .map(|(partial, fixed)| {
                NoiseScale::for_sensitivity(sensitivity_squared(partial, bounds, *fixed), share)
            })
            .collect::<Result<Vec<_>, TallyError>>()?;
        let keys = match public {
            Some(keys) => Keys::Public(keys),
            None => {
                let scale = NoiseScale::for_sensitivity(units_sensitivity_squared(bounds), share)?;
                Keys::Thresholded {
                    threshold: threshold(
                        &scale,
                        bounds.groups_per_unit,
                        governance.settings.privacy.delta,
                    ),
                    scale,
                }
            }
        };
        Ok(ReleaseNoise {
            partials,
            scales,
            fixed,
            keys,
        })
    }

    /// How many fixed-point units make one unit of partial `index` (1 for counts).
    pub fn unit(&self, index: usize) -> i128 {
        let scale = i128::from(self.fixed[index].map_or(1, |f| f.scale));
        match self.partials[index] {
            Partial::Rows | Partial::Count(_) => 1,
            Partial::Sum(_) => scale,
            Partial::SumSquares(_) => scale * scale,
        }
    }

    /// The standard deviation of partial `index`'s noise in the partial's own units.
    pub fn sd(&self, index: usize) -> f64 {
        self.scales[index].sd() / self.unit(index) as f64
    }
}

/// The smallest noisy patient count at which a group is released: a group that exists
/// because of one patient (count 1) passes with probability at most δ / k for each of the
/// patient's k groups, since the discrete Gaussian is sub-Gaussian with its scale
/// (Canonne, Kamath, Steinke 2020): P(Z ≥ t) ≤ exp(-t² / 2σ²).
pub fn threshold(scale: &NoiseScale, groups_per_unit: u64, delta: f64) -> i128 {
    let tail = (2.0 * (groups_per_unit as f64 / delta).ln()).sqrt();
    1 + (scale.sd() * tail).ceil() as i128
}

/// Every key of the release when each group dimension has a public domain and there are
/// not too many; `None` when the keys must be thresholded.
pub fn public_keys(
    governance: &Governance,
    release: &ReleaseQuery,
    group_types: &[DataType],
) -> Result<Option<Vec<Vec<ScalarValue>>>, TallyError> {
    if release.group_by.is_empty() {
        return Ok(Some(vec![Vec::new()]));
    }
    let mut keys: Vec<Vec<ScalarValue>> = vec![Vec::new()];
    for (dimension, data_type) in release.group_by.iter().zip(group_types) {
        let filter = release.filter.as_ref();
        let Some(domain) = public_domain(governance, dimension, data_type, filter)? else {
            return Ok(None);
        };
        if keys.len().saturating_mul(domain.len()) > MAX_PUBLIC_KEYS {
            return Ok(None);
        }
        keys = keys
            .into_iter()
            .flat_map(|key| {
                domain.iter().map(move |value| {
                    let mut next = key.clone();
                    next.push(value.clone());
                    next
                })
            })
            .collect();
    }
    Ok(Some(keys))
}

/// The public values of one dimension, as values of `data_type`, if it has any, narrowed
/// to what the release's filter allows (the filter is public too: it is in the model).
fn public_domain(
    governance: &Governance,
    dimension: &Dimension,
    data_type: &DataType,
    filter: Option<&Predicate>,
) -> Result<Option<Vec<ScalarValue>>, TallyError> {
    let Some(mut values) = declared_domain(governance, dimension, data_type, filter)? else {
        return Ok(None);
    };
    // A key twice would be released twice, each with its own noise: once each.
    let mut seen = std::collections::HashSet::new();
    values.retain(|value| seen.insert(value.clone()));
    let mut conjuncts = Vec::new();
    if let Some(filter) = filter {
        conjunction(filter, &mut conjuncts);
    }
    Ok(Some(
        values
            .into_iter()
            .filter(|value| {
                conjuncts
                    .iter()
                    .all(|conjunct| allows(conjunct, dimension, value))
            })
            .collect(),
    ))
}

/// The operands of a filter's top-level AND (the filter itself when it is not one).
fn conjunction<'a>(predicate: &'a Predicate, out: &mut Vec<&'a Predicate>) {
    match predicate {
        Predicate::And { all } => all.iter().for_each(|p| conjunction(p, out)),
        Predicate::Or { .. }
        | Predicate::Not { .. }
        | Predicate::Compare { .. }
        | Predicate::InList { .. }
        | Predicate::Between { .. }
        | Predicate::IsNull { .. }
        | Predicate::Prefix { .. } => out.push(predicate),
    }
}

/// Whether one conjunct of the filter lets rows with `value` of `dimension` through: only
/// `dimension = c` and `dimension IN (...)` pin it; anything else leaves every key.
fn allows(conjunct: &Predicate, dimension: &Dimension, value: &ScalarValue) -> bool {
    let text = value.to_string();
    match conjunct {
        Predicate::Compare {
            on,
            cmp: Comparison::Eq,
            value: constant,
        } if on == dimension => literal_text(constant) == text,
        Predicate::InList {
            on,
            values,
            negated: false,
        } if on == dimension => values.iter().any(|v| literal_text(v) == text),
        Predicate::Compare { .. }
        | Predicate::InList { .. }
        | Predicate::And { .. }
        | Predicate::Or { .. }
        | Predicate::Not { .. }
        | Predicate::Between { .. }
        | Predicate::IsNull { .. }
        | Predicate::Prefix { .. } => true,
    }
}

/// A constant as the text a domain value of its type displays as.
fn literal_text(literal: &Literal) -> String {
    match literal {
        Literal::Int(v) => v.to_string(),
        Literal::Float(v) => v.to_string(),
        Literal::Text(v) | Literal::Date(v) => v.clone(),
        Literal::Bool(v) => v.to_string(),
    }
}

/// The days a filter's top-level AND allows for the bare date column of `dimension`:
/// `>=`, `>`, `<`, `<=` and `BETWEEN` with dates narrow `[first, last]`.
fn narrowed_period(
    filter: Option<&Predicate>,
    dimension: &Dimension,
    mut first: chrono::NaiveDate,
    mut last: chrono::NaiveDate,
) -> (chrono::NaiveDate, chrono::NaiveDate) {
    let bare = Dimension {
        column: dimension.column.clone(),
        generaliser: None,
    };
    let date = |literal: &Literal| match literal {
        Literal::Date(text) => chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d").ok(),
        Literal::Int(_) | Literal::Float(_) | Literal::Text(_) | Literal::Bool(_) => None,
    };
    let mut conjuncts = Vec::new();
    if let Some(filter) = filter {
        conjunction(filter, &mut conjuncts);
    }
    for conjunct in conjuncts {
        match conjunct {
            Predicate::Compare { on, cmp, value } if *on == bare => {
                let Some(day) = date(value) else { continue };
                match cmp {
                    Comparison::Gt | Comparison::GtEq => first = first.max(day),
                    Comparison::Lt => last = last.min(day.pred_opt().unwrap_or(day)),
                    Comparison::LtEq => last = last.min(day),
                    Comparison::Eq => {
                        first = first.max(day);
                        last = last.min(day);
                    }
                    Comparison::NotEq => {}
                }
            }
            Predicate::Between {
                on,
                low,
                high,
                negated: false,
            } if *on == bare => {
                if let (Some(low), Some(high)) = (date(low), date(high)) {
                    first = first.max(low);
                    last = last.min(high);
                }
            }
            Predicate::Compare { .. }
            | Predicate::Between { .. }
            | Predicate::And { .. }
            | Predicate::Or { .. }
            | Predicate::Not { .. }
            | Predicate::InList { .. }
            | Predicate::IsNull { .. }
            | Predicate::Prefix { .. } => {}
        }
    }
    (first, last)
}

/// The public values the catalogue declares for one dimension, as values of `data_type`
/// (months and years only within the filter's dates).
fn declared_domain(
    governance: &Governance,
    dimension: &Dimension,
    data_type: &DataType,
    filter: Option<&Predicate>,
) -> Result<Option<Vec<ScalarValue>>, TallyError> {
    let Some(spec) = governance.column(&dimension.column.table, &dimension.column.column) else {
        return Ok(None);
    };
    let typed = |value: ScalarValue| {
        value.cast_to(data_type).map_err(|_| {
            TallyError::new(
                ErrorCode::PolicyError,
                format!(
                    "a domain value of {} is not of the column's type {data_type}",
                    dimension.to_sql()
                ),
            )
        })
    };
    let period = || -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
        let [first, last] = spec.period.as_ref()?;
        let parse = |d: &str| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok();
        Some(narrowed_period(
            filter,
            dimension,
            parse(first)?,
            parse(last)?,
        ))
    };
    let values: Vec<ScalarValue> = match dimension.generaliser {
        None => match &spec.domain {
            Some(domain) => domain
                .iter()
                .map(|v| typed(ScalarValue::Utf8(Some(v.clone()))))
                .collect::<Result<_, _>>()?,
            None => return Ok(None),
        },
        Some(Generaliser::AgeBand) => match spec.bounds {
            Some([low, high]) if high - low < 1000.0 => {
                let mut bands: Vec<String> = Vec::new();
                for age in (low.ceil() as i64)..=(high.floor() as i64) {
                    let band = band_of(age);
                    if bands.last() != Some(&band) {
                        bands.push(band);
                    }
                }
                bands
                    .into_iter()
                    .map(|b| typed(ScalarValue::Utf8(Some(b))))
                    .collect::<Result<_, _>>()?
            }
            Some(_) | None => return Ok(None),
        },
        Some(Generaliser::Month) => {
            let Some((first, last)) = period() else {
                return Ok(None);
            };
            let epoch =
                chrono::NaiveDate::from_ymd_opt(1970, 1, 1).ok_or_else(|| internal("no epoch"))?;
            let mut months = Vec::new();
            let mut month = first.with_day0(0).ok_or_else(|| internal("bad period"))?;
            // An empty range (first after last) has no months.
            while month <= last && months.len() <= MAX_PUBLIC_KEYS {
                let days = i32::try_from(month.signed_duration_since(epoch).num_days())
                    .map_err(|_| internal("bad period"))?;
                months.push(typed(ScalarValue::Date32(Some(days)))?);
                month = month
                    .checked_add_months(chrono::Months::new(1))
                    .ok_or_else(|| internal("bad period"))?;
            }
            months
        }
        Some(Generaliser::Year) => {
            let Some((first, last)) = period() else {
                return Ok(None);
            };
            (first.year()..=last.year())
                .map(|y| typed(ScalarValue::Int32(Some(y))))
                .collect::<Result<_, _>>()?
        }
        Some(Generaliser::PostcodeDistrict) => return Ok(None),
    };
    Ok(Some(values))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ColumnRef;

    fn column() -> ColumnRef {
        ColumnRef {
            table: "episodes".into(),
            column: "cost".into(),
        }
    }

    #[test]
    fn sensitivities_follow_from_the_bounds_alone() {
        let bounds = ContributionBounds {
            rows_per_group: 3,
            groups_per_unit: 4,
        };
        let fixed = FixedPoint {
            low: 0.0,
            high: 20_000.0,
            scale: 1,
        };
        assert_eq!(sensitivity_squared(&Partial::Rows, bounds, None), 9 * 4);
        assert_eq!(
            sensitivity_squared(&Partial::Sum(column()), bounds, Some(fixed)),
            60_000u128 * 60_000 * 4
        );
        assert_eq!(
            sensitivity_squared(&Partial::SumSquares(column()), bounds, Some(fixed)),
            (3u128 * 400_000_000).pow(2) * 4
        );
        assert_eq!(units_sensitivity_squared(bounds), 4);
    }

    #[test]
    fn fixed_point_rounds_bounds_outwards() {
        let fixed = FixedPoint {
            low: -1.25,
            high: 7.5,
            scale: 10,
        };
        assert_eq!(fixed.fixed_bounds(), (-13, 75));
        assert_eq!(fixed.magnitude(), 75);
    }

    fn governance() -> Governance {
        let data: serde_json::Value =
            serde_json::from_str(include_str!("../../policies/catalogue.json")).unwrap();
        Governance::from_policy_data(&data).unwrap()
    }

    fn release(group_by: Vec<Dimension>, filter: Option<Predicate>) -> ReleaseQuery {
        ReleaseQuery {
            version: crate::model::MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter,
            group_by,
            aggregates: vec![crate::model::Aggregate::CountRows],
        }
    }

    fn month_of_admission() -> Dimension {
        Dimension {
            column: ColumnRef {
                table: "episodes".into(),
                column: "admission_date".into(),
            },
            generaliser: Some(Generaliser::Month),
        }
    }

    #[test]
    fn public_domains_release_every_key_and_open_ones_none() {
        let governance = governance();
        let specialty = Dimension::bare("episodes", "specialty");
        let keys = public_keys(
            &governance,
            &release(vec![specialty], None),
            &[DataType::Utf8],
        )
        .unwrap()
        .expect("specialty has a public domain");
        assert_eq!(keys.len(), 14);
        let months = public_keys(
            &governance,
            &release(vec![month_of_admission()], None),
            &[DataType::Date32],
        )
        .unwrap()
        .expect("admission months have a public period");
        assert_eq!(months.len(), 72, "2019-01 to 2024-12");
        let diagnosis = Dimension::bare("episodes", "diagnosis_icd10");
        assert_eq!(
            public_keys(
                &governance,
                &release(vec![diagnosis], None),
                &[DataType::Utf8]
            )
            .unwrap(),
            None,
            "a diagnosis code list is not declared: thresholded"
        );
    }

    #[test]
    fn the_filter_narrows_public_keys() {
        let governance = governance();
        let specialty = Dimension::bare("episodes", "specialty");
        let pinned = Predicate::And {
            all: vec![
                Predicate::InList {
                    on: specialty.clone(),
                    values: vec![Literal::Text("100".into()), Literal::Text("300".into())],
                    negated: false,
                },
                Predicate::Compare {
                    on: Dimension::bare("episodes", "admission_date"),
                    cmp: Comparison::GtEq,
                    value: Literal::Date("2024-01-01".into()),
                },
                Predicate::Compare {
                    on: Dimension::bare("episodes", "admission_date"),
                    cmp: Comparison::Lt,
                    value: Literal::Date("2024-04-01".into()),
                },
            ],
        };
        let keys = public_keys(
            &governance,
            &release(vec![specialty, month_of_admission()], Some(pinned)),
            &[DataType::Utf8, DataType::Date32],
        )
        .unwrap()
        .unwrap();
        let shown: Vec<String> = keys.iter().map(|k| format!("{} {}", k[0], k[1])).collect();
        assert_eq!(
            shown,
            [
                "100 2024-01-01",
                "100 2024-02-01",
                "100 2024-03-01",
                "300 2024-01-01",
                "300 2024-02-01",
                "300 2024-03-01"
            ]
        );
    }

    #[test]
    fn the_threshold_lets_a_one_patient_group_through_at_most_delta() {
        let scale = NoiseScale::for_sensitivity(3, Rho::from_decimal(0.025).unwrap()).unwrap();
        let threshold = threshold(&scale, 3, 1e-9);
        // P(1 + Z >= t) <= exp(-(t-1)^2 / 2σ^2) <= δ/k.
        let margin = (threshold - 1) as f64;
        let tail = (-(margin * margin) / (2.0 * scale.sd() * scale.sd())).exp();
        assert!(tail <= 1e-9 / 3.0, "{tail}");
        assert!(threshold > 30 && threshold < 80, "{threshold}");
    }
}
