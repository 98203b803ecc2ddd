//! The comparison's workloads: which tables the sites serve and the analyst queries over them.

use serde::{Deserialize, Serialize};

/// A dataset and its queries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Workload {
    /// The synthetic HES-like federation (patients, episodes, the ICD-10 reference table).
    #[default]
    Hes,
    /// TPC-H `lineitem` split by order across the sites, with TPC-H Q1 and Q6.
    Tpch,
}

/// HES-like analyst queries: a title and the SQL.
const HES_QUERIES: [(&str, &str); 8] = [
    (
        "admissions by month and age band",
        "SELECT month(admission_date) AS month, age_band(age_at_admission) AS age_band, COUNT(*) AS admissions \
         FROM episodes GROUP BY 1, 2",
    ),
    (
        "mean length of stay by specialty and trust",
        "SELECT trust_code, specialty, AVG(length_of_stay) AS mean_stay, COUNT(*) AS episodes \
         FROM episodes GROUP BY trust_code, specialty",
    ),
    (
        "cost by sex and deprivation (join to patients)",
        "SELECT p.sex, p.imd_decile, SUM(e.cost) AS cost, COUNT(*) AS episodes \
         FROM episodes e JOIN patients p ON e.person_id = p.person_id GROUP BY p.sex, p.imd_decile",
    ),
    (
        "filter-heavy: older emergency stays since 2021",
        "SELECT specialty, COUNT(*) AS episodes, SUM(cost) AS cost FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') AND diagnosis_icd10 LIKE 'I%' \
         AND age_at_admission BETWEEN 65 AND 90 AND admission_date >= DATE '2021-01-01' \
         GROUP BY specialty",
    ),
    (
        "emergency admissions by year and trust",
        "SELECT trust_code, year(admission_date) AS year, COUNT(*) AS admissions FROM episodes \
         WHERE admission_method IN ('21', '22', '23', '24', '28') GROUP BY 1, 2",
    ),
    (
        "cost spread by diagnosis chapter (join to ICD-10)",
        "SELECT c.chapter, COUNT(*) AS episodes, AVG(e.cost) AS mean_cost, STDDEV(e.cost) AS sd_cost \
         FROM episodes e JOIN icd10_chapters c \
         ON substr(e.diagnosis_icd10, 1, 3) BETWEEN c.code_from AND c.code_to GROUP BY c.chapter",
    ),
    (
        "patients by sex and deprivation",
        "SELECT sex, imd_decile, COUNT(*) AS patients FROM patients GROUP BY sex, imd_decile",
    ),
    (
        "totals",
        "SELECT COUNT(*) AS episodes, AVG(length_of_stay) AS mean_stay, SUM(cost) AS cost FROM episodes",
    ),
];

/// TPC-H Q1 and Q6 as far as the query model expresses them (Q1 with its default DELTA of
/// 90 days, Q6 with DATE 1994-01-01, DISCOUNT 0.06 and QUANTITY 24). The model aggregates
/// bare columns only, so Q1 loses its two sums of price expressions and Q6 sums the base
/// price instead of `l_extendedprice * l_discount`.
const TPCH_QUERIES: [(&str, &str); 2] = [
    (
        "TPC-H Q1 (bare-column aggregates): pricing summary report",
        "SELECT l_returnflag, l_linestatus, SUM(l_quantity) AS sum_qty, \
         SUM(l_extendedprice) AS sum_base_price, \
         AVG(l_quantity) AS avg_qty, AVG(l_extendedprice) AS avg_price, \
         AVG(l_discount) AS avg_disc, COUNT(*) AS count_order \
         FROM lineitem WHERE l_shipdate <= DATE '1998-12-01' - INTERVAL '90' DAY \
         GROUP BY l_returnflag, l_linestatus ORDER BY l_returnflag, l_linestatus",
    ),
    (
        "TPC-H Q6 (base price): forecasting revenue change",
        "SELECT SUM(l_extendedprice) AS base_revenue FROM lineitem \
         WHERE l_shipdate >= DATE '1994-01-01' AND l_shipdate < DATE '1995-01-01' \
         AND l_discount BETWEEN 0.06 - 0.01 AND 0.06 + 0.01 AND l_quantity < 24",
    ),
];

impl Workload {
    /// Every workload, in report order.
    pub const ALL: [Workload; 2] = [Workload::Hes, Workload::Tpch];

    /// The analyst queries: a title and the SQL.
    pub fn queries(self) -> &'static [(&'static str, &'static str)] {
        match self {
            Workload::Hes => &HES_QUERIES,
            Workload::Tpch => &TPCH_QUERIES,
        }
    }

    /// The tables every site serves (each also gets the site's `trust_code`).
    pub fn site_tables(self) -> &'static [&'static str] {
        match self {
            Workload::Hes => &["patients", "episodes"],
            Workload::Tpch => &["lineitem"],
        }
    }

    /// Reference tables: the same copy at every site, read from one.
    pub fn reference_tables(self) -> &'static [&'static str] {
        match self {
            Workload::Hes => &["icd10_chapters"],
            Workload::Tpch => &[],
        }
    }

    /// Every table the queries read.
    pub fn tables(self) -> impl Iterator<Item = &'static str> {
        self.site_tables()
            .iter()
            .chain(self.reference_tables())
            .copied()
    }

    /// A query's short name in tables and charts: `Q3`, or what a TPC-H title names before
    /// its colon (`TPC-H Q6`).
    pub fn query_name(self, index: usize) -> String {
        match (self, self.queries().get(index)) {
            (Workload::Tpch, Some((title, _))) => {
                title.split(':').next().unwrap_or(title).to_string()
            }
            _ => format!("Q{}", index + 1),
        }
    }

    /// A dataset of this workload with `size` rows in its main table, for headings.
    pub fn dataset(self, size: usize) -> String {
        match self {
            Workload::Hes => format!("{size} episodes"),
            Workload::Tpch => format!("TPC-H lineitem, {size} rows"),
        }
    }
}
