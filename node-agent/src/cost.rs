//! A release's cost, estimated from its model alone before it runs: the work each row of
//! each table it reads takes, in units of one simple step (a comparison, a grouping key, a
//! running total). It depends on nothing in the trust's data (not even table sizes), so a
//! refusal for cost says nothing about the data that the query does not already say; a
//! trust sets its ceiling (`limits.max_query_cost`) knowing its own tables. The work a
//! query really does is bounded while it runs, by its time and processor-time budgets.

use tally_common::model::{Dimension, Predicate, ReleaseQuery};

/// IN-list values that cost one more unit (a hashed lookup, not one comparison each).
const IN_VALUES_PER_UNIT: usize = 16;

/// The estimated cost of `release`: tables read (the fact table and each joined table,
/// whose rows are hashed and probed) times the steps per row.
pub fn cost(release: &ReleaseQuery) -> u64 {
    let tables = 1 + release.joins.len() as u64;
    let filter = release.filter.as_ref().map_or(0, predicate_cost);
    let groups: u64 = release.group_by.iter().map(dimension_cost).sum();
    let partials: u64 = release
        .aggregates
        .iter()
        .map(|a| a.partials().len() as u64)
        .sum();
    tables * (1 + filter + groups + partials)
}

fn dimension_cost(dimension: &Dimension) -> u64 {
    match dimension.generaliser {
        Some(_) => 2,
        None => 1,
    }
}

fn predicate_cost(predicate: &Predicate) -> u64 {
    match predicate {
        Predicate::And { all: operands } | Predicate::Or { any: operands } => {
            1 + operands.iter().map(predicate_cost).sum::<u64>()
        }
        Predicate::Not { not } => 1 + predicate_cost(not),
        Predicate::Compare { on, .. }
        | Predicate::IsNull { on, .. }
        | Predicate::Prefix { on, .. } => dimension_cost(on),
        Predicate::Between { on, .. } => 1 + dimension_cost(on),
        Predicate::InList { on, values, .. } => {
            dimension_cost(on) + values.len().div_ceil(IN_VALUES_PER_UNIT) as u64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_common::model::{Aggregate, ColumnRef, Comparison, Generaliser, Literal};

    fn column(table: &str, name: &str) -> ColumnRef {
        ColumnRef {
            table: table.into(),
            column: name.into(),
        }
    }

    #[test]
    fn cost_grows_with_every_part_of_the_model() {
        let mut release = ReleaseQuery {
            version: tally_common::model::MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter: None,
            group_by: Vec::new(),
            aggregates: vec![Aggregate::CountRows],
        };
        let mut last = cost(&release);
        assert_eq!(last, 2, "one table: a scan step and a count");
        let mut grows = |release: &ReleaseQuery, what: &str| {
            let now = cost(release);
            assert!(now > last, "{what}: {now} after {last}");
            last = now;
        };
        release.group_by.push(Dimension {
            column: column("episodes", "age_at_admission"),
            generaliser: Some(Generaliser::AgeBand),
        });
        grows(&release, "a grouping key");
        release.aggregates.push(Aggregate::Variance {
            column: column("episodes", "cost"),
            population: false,
        });
        grows(&release, "a variance");
        release.filter = Some(Predicate::InList {
            on: Dimension::bare("episodes", "specialty"),
            values: (0..40).map(|i| Literal::Text(i.to_string())).collect(),
            negated: false,
        });
        grows(&release, "an IN list");
        release.filter = Some(Predicate::And {
            all: vec![
                release.filter.take().unwrap(),
                Predicate::Compare {
                    on: Dimension::bare("episodes", "length_of_stay"),
                    cmp: Comparison::Gt,
                    value: Literal::Int(3),
                },
            ],
        });
        grows(&release, "one more test");
        release.joins.push("patients".into());
        grows(&release, "a join");
    }
}
