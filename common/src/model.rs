//! The query model: everything a trust can be asked, closed by construction.
//!
//! A [`ReleaseQuery`] runs over one fact table's rows at every trust: the fact table (whose
//! privacy unit the catalogue names), joins along declared relationships only, a boolean
//! filter tree of column-against-constant predicates, group-by dimensions that are bare
//! columns or a declared generaliser of a bare column, and aggregates of bare columns.
//! Nothing else is expressible: no expression is ever applied to a patient-level column
//! except a declared generaliser, and no predicate can fail on a row's value.
//!
//! A release returns, per group, the *partials* ([`Partial`]) its aggregates are computed
//! from: row counts, value counts, sums and sums of squares. The gateway derives means,
//! variances and standard deviations from the released partials, so every statistic an
//! analyst sees is a function of protected values only.
//!
//! The model is the wire contract between gateway and nodes: JSON, versioned
//! ([`MODEL_VERSION`]), with a readable SQL rendering ([`ReleaseQuery::render_sql`]) for the
//! trusts' audit logs.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::error::{ErrorCode, TallyError};
use crate::governance::{ColumnSpec, Governance, Relationship};

/// The version of the model this build speaks.
pub const MODEL_VERSION: u32 = 1;

/// Most predicates (leaves and connectives) in one filter tree.
pub const MAX_FILTER_NODES: usize = 256;
/// Most values in one IN list.
pub const MAX_IN_VALUES: usize = 1_000;
/// Most group-by dimensions in one release.
pub const MAX_DIMENSIONS: usize = 8;
/// Most aggregates in one release.
pub const MAX_AGGREGATES: usize = 32;
/// Deepest nesting of AND / OR / NOT.
pub const MAX_FILTER_DEPTH: usize = 32;

/// One release: the part of an analyst's query that runs over patient rows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseQuery {
    /// Always [`MODEL_VERSION`] for this build.
    pub version: u32,
    /// The fact table: its privacy unit is the release's.
    pub fact: String,
    /// Tables joined along the fact table's declared relationships, by name.
    #[serde(default)]
    pub joins: Vec<String>,
    /// Which rows count.
    #[serde(default)]
    pub filter: Option<Predicate>,
    /// The grouping keys.
    #[serde(default)]
    pub group_by: Vec<Dimension>,
    /// What is computed per group.
    pub aggregates: Vec<Aggregate>,
}

/// A column of the fact table or of a joined table.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnRef {
    /// The table's name.
    pub table: String,
    /// The column's name.
    pub column: String,
}

/// A bare column, or a declared generaliser of one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Dimension {
    /// The column.
    pub column: ColumnRef,
    /// The generaliser applied to it, if any.
    #[serde(default)]
    pub generaliser: Option<Generaliser>,
}

/// The generalising functions: total functions of one bare column that coarsen it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Generaliser {
    /// Five-year age bands (`age_band(age)`).
    AgeBand,
    /// The first day of a date's month (`month(date)`).
    Month,
    /// A date's calendar year (`year(date)`).
    Year,
    /// A postcode's outward code (`postcode_district(postcode)`).
    PostcodeDistrict,
}

impl Generaliser {
    /// Every generaliser.
    pub const ALL: [Generaliser; 4] = [
        Generaliser::AgeBand,
        Generaliser::Month,
        Generaliser::Year,
        Generaliser::PostcodeDistrict,
    ];

    /// Its SQL function name.
    pub fn function_name(self) -> &'static str {
        match self {
            Generaliser::AgeBand => "age_band",
            Generaliser::Month => "month",
            Generaliser::Year => "year",
            Generaliser::PostcodeDistrict => "postcode_district",
        }
    }

    /// The generaliser an SQL function name denotes.
    pub fn from_function_name(name: &str) -> Option<Self> {
        Generaliser::ALL
            .into_iter()
            .find(|g| g.function_name() == name)
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Comparison {
    /// `=`
    Eq,
    /// `<>`
    NotEq,
    /// `<`
    Lt,
    /// `<=`
    LtEq,
    /// `>`
    Gt,
    /// `>=`
    GtEq,
}

impl Comparison {
    /// The SQL operator.
    pub fn symbol(self) -> &'static str {
        match self {
            Comparison::Eq => "=",
            Comparison::NotEq => "<>",
            Comparison::Lt => "<",
            Comparison::LtEq => "<=",
            Comparison::Gt => ">",
            Comparison::GtEq => ">=",
        }
    }

    /// The operator with its operands swapped (`5 < x` is `x > 5`).
    pub fn flipped(self) -> Self {
        match self {
            Comparison::Eq => Comparison::Eq,
            Comparison::NotEq => Comparison::NotEq,
            Comparison::Lt => Comparison::Gt,
            Comparison::LtEq => Comparison::GtEq,
            Comparison::Gt => Comparison::Lt,
            Comparison::GtEq => Comparison::LtEq,
        }
    }
}

/// A constant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum Literal {
    /// A whole number.
    Int(i64),
    /// A finite floating-point number.
    Float(f64),
    /// Text.
    Text(String),
    /// A calendar date, `YYYY-MM-DD`.
    Date(String),
    /// True or false.
    Bool(bool),
}

impl Literal {
    /// The constant as SQL.
    pub fn to_sql(&self) -> String {
        match self {
            Literal::Int(v) => v.to_string(),
            Literal::Float(v) => format!("{v:?}"),
            Literal::Text(v) => format!("'{}'", v.replace('\'', "''")),
            Literal::Date(v) => format!("DATE '{}'", v.replace('\'', "''")),
            Literal::Bool(v) => v.to_string().to_uppercase(),
        }
    }
}

/// Which rows count: a tree of column-against-constant tests.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Predicate {
    /// Every one holds.
    And {
        /// The operands.
        all: Vec<Predicate>,
    },
    /// At least one holds.
    Or {
        /// The operands.
        any: Vec<Predicate>,
    },
    /// The operand does not hold.
    Not {
        /// The operand.
        not: Box<Predicate>,
    },
    /// `on <cmp> value`.
    Compare {
        /// The column or generalised column.
        on: Dimension,
        /// The operator.
        cmp: Comparison,
        /// The constant.
        value: Literal,
    },
    /// `on [NOT] IN (values)`.
    InList {
        /// The column or generalised column.
        on: Dimension,
        /// The constants.
        values: Vec<Literal>,
        /// `NOT IN`.
        negated: bool,
    },
    /// `on [NOT] BETWEEN low AND high`.
    Between {
        /// The column or generalised column.
        on: Dimension,
        /// The lower bound (inclusive).
        low: Literal,
        /// The upper bound (inclusive).
        high: Literal,
        /// `NOT BETWEEN`.
        negated: bool,
    },
    /// `on IS [NOT] NULL`.
    IsNull {
        /// The column or generalised column.
        on: Dimension,
        /// `IS NOT NULL`.
        negated: bool,
    },
    /// `on [NOT] LIKE 'prefix%'` on a text column.
    Prefix {
        /// The column or generalised column.
        on: Dimension,
        /// The leading characters (no wildcards).
        prefix: String,
        /// `NOT LIKE`.
        negated: bool,
    },
}

/// An aggregate an analyst asked for.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "function", rename_all = "snake_case", deny_unknown_fields)]
pub enum Aggregate {
    /// `COUNT(*)`.
    CountRows,
    /// `COUNT(column)`: rows where it is not NULL.
    Count {
        /// The column.
        column: ColumnRef,
    },
    /// `SUM(column)`.
    Sum {
        /// The column.
        column: ColumnRef,
    },
    /// `AVG(column)`.
    Mean {
        /// The column.
        column: ColumnRef,
    },
    /// `VAR_SAMP` / `VAR_POP`.
    Variance {
        /// The column.
        column: ColumnRef,
        /// Population (divide by n) rather than sample (n - 1).
        population: bool,
    },
    /// `STDDEV_SAMP` / `STDDEV_POP`.
    StdDev {
        /// The column.
        column: ColumnRef,
        /// Population rather than sample.
        population: bool,
    },
}

impl Aggregate {
    /// The column it aggregates (none for `COUNT(*)`).
    pub fn column(&self) -> Option<&ColumnRef> {
        match self {
            Aggregate::CountRows => None,
            Aggregate::Count { column }
            | Aggregate::Sum { column }
            | Aggregate::Mean { column }
            | Aggregate::Variance { column, .. }
            | Aggregate::StdDev { column, .. } => Some(column),
        }
    }

    /// The partials it is computed from.
    pub fn partials(&self) -> Vec<Partial> {
        match self {
            Aggregate::CountRows => vec![Partial::Rows],
            Aggregate::Count { column } => vec![Partial::Count(column.clone())],
            Aggregate::Sum { column } | Aggregate::Mean { column } => {
                vec![Partial::Count(column.clone()), Partial::Sum(column.clone())]
            }
            Aggregate::Variance { column, .. } | Aggregate::StdDev { column, .. } => vec![
                Partial::Count(column.clone()),
                Partial::Sum(column.clone()),
                Partial::SumSquares(column.clone()),
            ],
        }
    }

    /// The SQL an analyst would write for it.
    pub fn to_sql(&self) -> String {
        let of = |name: &str, c: &ColumnRef| format!("{name}({}.{})", c.table, c.column);
        match self {
            Aggregate::CountRows => "COUNT(*)".into(),
            Aggregate::Count { column } => of("COUNT", column),
            Aggregate::Sum { column } => of("SUM", column),
            Aggregate::Mean { column } => of("AVG", column),
            Aggregate::Variance { column, population } => {
                of(if *population { "VAR_POP" } else { "VAR_SAMP" }, column)
            }
            Aggregate::StdDev { column, population } => of(
                if *population {
                    "STDDEV_POP"
                } else {
                    "STDDEV_SAMP"
                },
                column,
            ),
        }
    }
}

/// What a trust computes per group: the building blocks of every aggregate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Partial {
    /// Rows in the group.
    Rows,
    /// Rows whose column is not NULL.
    Count(ColumnRef),
    /// The column's sum.
    Sum(ColumnRef),
    /// The sum of the column's squares (as a float).
    SumSquares(ColumnRef),
}

impl Partial {
    /// The column it aggregates (none for the row count).
    pub fn column(&self) -> Option<&ColumnRef> {
        match self {
            Partial::Rows => None,
            Partial::Count(column) | Partial::Sum(column) | Partial::SumSquares(column) => {
                Some(column)
            }
        }
    }

    /// Whether it is a count (released as an integer, rounded).
    pub fn is_count(&self) -> bool {
        match self {
            Partial::Rows | Partial::Count(_) => true,
            Partial::Sum(_) | Partial::SumSquares(_) => false,
        }
    }
}

/// Name of group column `index` in a trust's answer.
pub fn group_column(index: usize) -> String {
    format!("g{index}")
}

/// Name of partial column `index` in a trust's answer.
pub fn partial_column(index: usize) -> String {
    format!("p{index}")
}

impl Dimension {
    /// A bare column.
    pub fn bare(table: &str, column: &str) -> Self {
        Dimension {
            column: ColumnRef {
                table: table.into(),
                column: column.into(),
            },
            generaliser: None,
        }
    }

    /// The dimension as SQL.
    pub fn to_sql(&self) -> String {
        let bare = format!("{}.{}", self.column.table, self.column.column);
        match self.generaliser {
            Some(g) => format!("{}({bare})", g.function_name()),
            None => bare,
        }
    }
}

impl Predicate {
    /// The predicate as SQL.
    pub fn to_sql(&self) -> String {
        let not = |negated: bool| if negated { "NOT " } else { "" };
        match self {
            Predicate::And { all } => join_sql(all, " AND "),
            Predicate::Or { any } => join_sql(any, " OR "),
            Predicate::Not { not } => format!("NOT ({})", not.to_sql()),
            Predicate::Compare { on, cmp, value } => {
                format!("{} {} {}", on.to_sql(), cmp.symbol(), value.to_sql())
            }
            Predicate::InList {
                on,
                values,
                negated,
            } => format!(
                "{} {}IN ({})",
                on.to_sql(),
                not(*negated),
                values
                    .iter()
                    .map(Literal::to_sql)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            Predicate::Between {
                on,
                low,
                high,
                negated,
            } => format!(
                "{} {}BETWEEN {} AND {}",
                on.to_sql(),
                not(*negated),
                low.to_sql(),
                high.to_sql()
            ),
            Predicate::IsNull { on, negated } => {
                format!("{} IS {}NULL", on.to_sql(), not(*negated))
            }
            Predicate::Prefix {
                on,
                prefix,
                negated,
            } => format!(
                "{} {}LIKE {}",
                on.to_sql(),
                not(*negated),
                Literal::Text(format!("{prefix}%")).to_sql()
            ),
        }
    }

    /// Every dimension the predicate tests, with its nesting depth and node count checked.
    fn visit<'a>(
        &'a self,
        depth: usize,
        nodes: &mut usize,
        out: &mut Vec<&'a Dimension>,
    ) -> Result<(), TallyError> {
        *nodes += 1;
        if depth > MAX_FILTER_DEPTH || *nodes > MAX_FILTER_NODES {
            return Err(shape(format!(
                "the filter is too large: at most {MAX_FILTER_NODES} tests nested at most {MAX_FILTER_DEPTH} deep"
            )));
        }
        match self {
            Predicate::And { all: operands } | Predicate::Or { any: operands } => {
                if operands.is_empty() {
                    return Err(shape("an AND or OR with no operands"));
                }
                for operand in operands {
                    operand.visit(depth + 1, nodes, out)?;
                }
            }
            Predicate::Not { not } => not.visit(depth + 1, nodes, out)?,
            Predicate::InList { on, values, .. } => {
                if values.is_empty() || values.len() > MAX_IN_VALUES {
                    return Err(shape(format!(
                        "an IN list must hold between 1 and {MAX_IN_VALUES} values"
                    )));
                }
                out.push(on);
            }
            Predicate::Compare { on, .. }
            | Predicate::Between { on, .. }
            | Predicate::IsNull { on, .. }
            | Predicate::Prefix { on, .. } => out.push(on),
        }
        Ok(())
    }
}

fn join_sql(operands: &[Predicate], separator: &str) -> String {
    operands
        .iter()
        .map(|p| format!("({})", p.to_sql()))
        .collect::<Vec<_>>()
        .join(separator)
}

fn shape(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::QueryShape, message)
}

impl ReleaseQuery {
    /// The partials every trust computes, each once, in first-use order.
    pub fn partials(&self) -> Vec<Partial> {
        let mut partials: Vec<Partial> = Vec::new();
        for partial in self.aggregates.iter().flat_map(Aggregate::partials) {
            if !partials.contains(&partial) {
                partials.push(partial);
            }
        }
        partials
    }

    /// The release as readable SQL (for audit logs; nodes never execute SQL text).
    pub fn render_sql(&self, governance: &Governance) -> String {
        let mut sql = String::from("SELECT ");
        let mut items: Vec<String> = self
            .group_by
            .iter()
            .enumerate()
            .map(|(i, d)| format!("{} AS {}", d.to_sql(), group_column(i)))
            .collect();
        items.extend(self.aggregates.iter().map(Aggregate::to_sql));
        sql.push_str(&items.join(", "));
        let _ = write!(sql, " FROM {}", self.fact);
        for join in &self.joins {
            let relationship = governance
                .table(&self.fact)
                .and_then(|t| t.relationships.get(join));
            match relationship {
                Some(Relationship::ManyToOne { from, to }) => {
                    let _ = write!(sql, " JOIN {join} ON {}.{from} = {join}.{to}", self.fact);
                }
                Some(Relationship::CodeRange {
                    code,
                    prefix,
                    low,
                    high,
                }) => {
                    let _ = write!(
                        sql,
                        " JOIN {join} ON substr({}.{code}, 1, {prefix}) BETWEEN {join}.{low} AND {join}.{high}",
                        self.fact
                    );
                }
                None => {
                    let _ = write!(sql, " JOIN {join} ON <undeclared>");
                }
            }
        }
        if let Some(filter) = &self.filter {
            let _ = write!(sql, " WHERE {}", filter.to_sql());
        }
        if !self.group_by.is_empty() {
            let keys: Vec<String> = (0..self.group_by.len()).map(group_column).collect();
            let _ = write!(sql, " GROUP BY {}", keys.join(", "));
        }
        sql
    }

    /// Checks the model against a governance catalogue: the fact table has a privacy unit,
    /// every join is declared, every column exists and is used only as its class allows,
    /// every generaliser is declared for its column, and the model is within size limits.
    /// Column types and constants are checked where the plan is built, against the data.
    pub fn validate(&self, governance: &Governance) -> Result<(), TallyError> {
        if self.version != MODEL_VERSION {
            return Err(TallyError::new(
                ErrorCode::BadRequest,
                format!("query model version {} is not supported", self.version),
            ));
        }
        let fact = governance.table(&self.fact).ok_or_else(|| {
            TallyError::new(
                ErrorCode::UnknownTable,
                format!("table '{}' is not in the governance catalogue", self.fact),
            )
        })?;
        if fact.privacy_unit.is_none() {
            return Err(shape(format!(
                "table '{}' holds no patients' rows: only tables with a privacy unit can be aggregated over",
                self.fact
            )));
        }
        for (i, join) in self.joins.iter().enumerate() {
            if !fact.relationships.contains_key(join) || self.joins[..i].contains(join) {
                return Err(shape(format!(
                    "'{}' may not be joined to '{join}': only the relationships the catalogue declares, each once",
                    self.fact
                )));
            }
        }
        if self.aggregates.is_empty() || self.aggregates.len() > MAX_AGGREGATES {
            return Err(shape(format!(
                "a release computes between 1 and {MAX_AGGREGATES} aggregates"
            )));
        }
        if self.group_by.len() > MAX_DIMENSIONS {
            return Err(shape(format!(
                "a release groups by at most {MAX_DIMENSIONS} dimensions"
            )));
        }
        for dimension in &self.group_by {
            let spec = self.column_spec(governance, &dimension.column)?;
            check_generaliser(spec, dimension)?;
            if dimension.generaliser.is_none() && !spec.groupable_bare() {
                return Err(bare_group_refusal(spec, &dimension.column));
            }
        }
        for aggregate in &self.aggregates {
            if let Some(column) = aggregate.column() {
                let spec = self.column_spec(governance, column)?;
                let counted = matches!(aggregate, Aggregate::Count { .. });
                let allowed = match spec.class {
                    crate::governance::ColumnClass::Identifier => false,
                    crate::governance::ColumnClass::QuasiIdentifier
                    | crate::governance::ColumnClass::Dimension
                    | crate::governance::ColumnClass::Measure => counted || spec.aggregatable(),
                };
                if !allowed {
                    return Err(TallyError::new(
                        ErrorCode::MeasureUsage,
                        format!(
                            "{} is not allowed: {}.{} is not a measure the catalogue lets you aggregate",
                            aggregate.to_sql(),
                            column.table,
                            column.column
                        ),
                    ));
                }
            }
        }
        let mut tested = Vec::new();
        if let Some(filter) = &self.filter {
            filter.visit(0, &mut 0, &mut tested)?;
        }
        for dimension in &tested {
            let spec = self.column_spec(governance, &dimension.column)?;
            check_generaliser(spec, dimension)?;
            if !spec.filterable() {
                return Err(TallyError::new(
                    identifier_or(spec, ErrorCode::FilterNotAllowed),
                    format!(
                        "column {}.{} may not be filtered on",
                        dimension.column.table, dimension.column.column
                    ),
                ));
            }
        }
        // A sum over rows whose value the release itself pins down (by a filter or a group
        // key on the same column) is that value times an exact count: it would undo count
        // rounding (`SUM(los) WHERE los = 3`).
        for aggregate in &self.aggregates {
            let summed = match aggregate {
                Aggregate::Sum { column }
                | Aggregate::Mean { column }
                | Aggregate::Variance { column, .. }
                | Aggregate::StdDev { column, .. } => column,
                Aggregate::CountRows | Aggregate::Count { .. } => continue,
            };
            let pinned = tested
                .iter()
                .copied()
                .chain(self.group_by.iter())
                .any(|d| d.column == *summed);
            if pinned {
                return Err(TallyError::new(
                    ErrorCode::MeasureUsage,
                    format!(
                        "{} may not be computed in a release that also filters or groups by {}.{}: a sum of values the query pins down reveals an exact count; filter on another column, or count instead",
                        aggregate.to_sql(),
                        summed.table,
                        summed.column
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The catalogue entry of a column of the fact table or a joined table.
    fn column_spec<'a>(
        &self,
        governance: &'a Governance,
        column: &ColumnRef,
    ) -> Result<&'a ColumnSpec, TallyError> {
        if column.table != self.fact && !self.joins.contains(&column.table) {
            return Err(shape(format!(
                "column {}.{} is not from the release's tables",
                column.table, column.column
            )));
        }
        let spec = governance
            .column(&column.table, &column.column)
            .ok_or_else(|| {
                TallyError::new(
                    ErrorCode::UnclassifiedColumn,
                    format!(
                        "column {}.{} has no class in the governance catalogue",
                        column.table, column.column
                    ),
                )
            })?;
        match spec.class {
            crate::governance::ColumnClass::Identifier => Err(TallyError::new(
                ErrorCode::IdentifierColumn,
                format!(
                    "column {}.{} identifies people or records: it may not be used in a query (joins are declared, so you never name their keys)",
                    column.table, column.column
                ),
            )),
            crate::governance::ColumnClass::QuasiIdentifier
            | crate::governance::ColumnClass::Dimension
            | crate::governance::ColumnClass::Measure => Ok(spec),
        }
    }
}

fn identifier_or(spec: &ColumnSpec, otherwise: ErrorCode) -> ErrorCode {
    match spec.class {
        crate::governance::ColumnClass::Identifier => ErrorCode::IdentifierColumn,
        crate::governance::ColumnClass::QuasiIdentifier
        | crate::governance::ColumnClass::Dimension
        | crate::governance::ColumnClass::Measure => otherwise,
    }
}

fn check_generaliser(spec: &ColumnSpec, dimension: &Dimension) -> Result<(), TallyError> {
    match dimension.generaliser {
        Some(g) if !spec.generalisers.contains(&g) => Err(TallyError::new(
            ErrorCode::QuasiIdentifier,
            format!(
                "{} is not a declared generaliser of {}.{}",
                g.function_name(),
                dimension.column.table,
                dimension.column.column
            ),
        )),
        Some(_) | None => Ok(()),
    }
}

fn bare_group_refusal(spec: &ColumnSpec, column: &ColumnRef) -> TallyError {
    let (code, why) = match spec.class {
        crate::governance::ColumnClass::QuasiIdentifier => (
            ErrorCode::QuasiIdentifier,
            "must be generalised before it is grouped",
        ),
        crate::governance::ColumnClass::Measure => (
            ErrorCode::MeasureUsage,
            "is a measure: aggregate it, or filter on it",
        ),
        crate::governance::ColumnClass::Identifier => {
            (ErrorCode::IdentifierColumn, "identifies people or records")
        }
        crate::governance::ColumnClass::Dimension => (ErrorCode::QueryShape, "cannot be grouped"),
    };
    let hint = if spec.generalisers.is_empty() {
        String::new()
    } else {
        format!(
            " (declared: {})",
            spec.generalisers
                .iter()
                .map(|g| g.function_name())
                .collect::<Vec<_>>()
                .join(", ")
        )
    };
    TallyError::new(
        code,
        format!("column {}.{} {why}{hint}", column.table, column.column),
    )
}

/// The `type_url` of a release request inside a Flight `Ticket` (a protobuf `Any`).
pub const RELEASE_TYPE_URL: &str = "type.tally.nhs.uk/tally.ReleaseRequest";

/// What the gateway sends a trust: one release. Everything that protects the trust's
/// patients (bounds, noise, budget) comes from the trust's own policy, never the request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReleaseRequest {
    /// The release.
    pub release: ReleaseQuery,
}

impl ReleaseRequest {
    /// The request as a Flight ticket.
    pub fn to_ticket(&self) -> arrow_flight::Ticket {
        use prost::Message as _;
        let any = arrow_flight::sql::Any {
            type_url: RELEASE_TYPE_URL.to_string(),
            value: serde_json::to_vec(self).unwrap_or_default().into(),
        };
        arrow_flight::Ticket::new(any.encode_to_vec())
    }

    /// A request received in a ticket's `Any`; refuses other versions and anything
    /// malformed.
    pub fn from_any(any: &arrow_flight::sql::Any) -> Result<Self, TallyError> {
        if any.type_url != RELEASE_TYPE_URL {
            return Err(TallyError::new(
                ErrorCode::BadRequest,
                "this node answers only Tally release requests (never SQL text)",
            ));
        }
        #[derive(Deserialize)]
        struct Versioned {
            release: VersionOnly,
        }
        #[derive(Deserialize)]
        struct VersionOnly {
            version: u32,
        }
        let versioned: Versioned = serde_json::from_slice(&any.value).map_err(|_| {
            TallyError::new(
                ErrorCode::BadRequest,
                "the release request is not a Tally query model",
            )
        })?;
        if versioned.release.version != MODEL_VERSION {
            return Err(TallyError::new(
                ErrorCode::BadRequest,
                format!(
                    "query model version {} is not supported (this node speaks version {MODEL_VERSION})",
                    versioned.release.version
                ),
            ));
        }
        serde_json::from_slice(&any.value).map_err(|e| {
            TallyError::new(
                ErrorCode::BadRequest,
                format!("the release request is not a valid query model: {e}"),
            )
        })
    }
}

impl Generaliser {
    /// The type of a generalised value.
    pub fn output_type(self) -> arrow::datatypes::DataType {
        use arrow::datatypes::DataType;
        match self {
            Generaliser::AgeBand | Generaliser::PostcodeDistrict => DataType::Utf8,
            Generaliser::Month => DataType::Date32,
            Generaliser::Year => DataType::Int32,
        }
    }
}

impl ReleaseQuery {
    /// The schema of a trust's answer: the group columns (`g0`, ...), then the partials
    /// (`p0`, ...): counts as Int64, sums of integer columns as Int64 and of others as
    /// Float64, sums of squares as Float64. `column_type` gives each column's type in the
    /// data. Gateway and node both derive it, so neither can drift.
    pub fn partial_schema(
        &self,
        column_type: impl Fn(&ColumnRef) -> Option<arrow::datatypes::DataType>,
    ) -> Result<arrow::datatypes::SchemaRef, TallyError> {
        use arrow::datatypes::{DataType, Field, Schema};
        let type_of = |column: &ColumnRef| {
            column_type(column).ok_or_else(|| {
                TallyError::new(
                    ErrorCode::UnknownColumn,
                    format!("table '{}' has no column '{}'", column.table, column.column),
                )
            })
        };
        let mut fields = Vec::new();
        for (i, dimension) in self.group_by.iter().enumerate() {
            let data_type = match dimension.generaliser {
                Some(g) => g.output_type(),
                None => type_of(&dimension.column)?,
            };
            fields.push(Field::new(group_column(i), data_type, true));
        }
        for (i, partial) in self.partials().iter().enumerate() {
            let data_type = match partial {
                Partial::Rows | Partial::Count(_) => DataType::Int64,
                Partial::Sum(column) => {
                    let data_type = type_of(column)?;
                    if data_type.is_integer() {
                        DataType::Int64
                    } else if data_type.is_numeric() {
                        DataType::Float64
                    } else {
                        return Err(TallyError::new(
                            ErrorCode::Plan,
                            format!("{}.{} is not numeric", column.table, column.column),
                        ));
                    }
                }
                Partial::SumSquares(column) => {
                    if !type_of(column)?.is_numeric() {
                        return Err(TallyError::new(
                            ErrorCode::Plan,
                            format!("{}.{} is not numeric", column.table, column.column),
                        ));
                    }
                    DataType::Float64
                }
            };
            fields.push(Field::new(partial_column(i), data_type, true));
        }
        Ok(std::sync::Arc::new(Schema::new(fields)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn governance() -> Governance {
        let data: serde_json::Value =
            serde_json::from_str(include_str!("../../policies/catalogue.json")).unwrap();
        Governance::from_policy_data(&data).unwrap()
    }

    fn count_by(table: &str, column: &str) -> ReleaseQuery {
        ReleaseQuery {
            version: MODEL_VERSION,
            fact: "episodes".into(),
            joins: Vec::new(),
            filter: None,
            group_by: vec![Dimension::bare(table, column)],
            aggregates: vec![Aggregate::CountRows],
        }
    }

    fn code(release: &ReleaseQuery) -> ErrorCode {
        release.validate(&governance()).unwrap_err().code
    }

    #[test]
    fn a_request_survives_its_ticket_and_nothing_else_passes_for_one() {
        let request = ReleaseRequest {
            release: count_by("episodes", "specialty"),
        };
        let ticket = request.to_ticket();
        let any = <arrow_flight::sql::Any as prost::Message>::decode(ticket.ticket).unwrap();
        assert_eq!(ReleaseRequest::from_any(&any).unwrap(), request);

        let with = |type_url: &str, value: &str| arrow_flight::sql::Any {
            type_url: type_url.into(),
            value: value.as_bytes().to_vec().into(),
        };
        let json = serde_json::to_string(&request).unwrap();
        for (any, why) in [
            (
                with(
                    "type.googleapis.com/arrow.flight.protocol.sql.TicketStatementQuery",
                    &json,
                ),
                "another type",
            ),
            (with(RELEASE_TYPE_URL, "SELECT 1"), "SQL text"),
            (
                with(
                    RELEASE_TYPE_URL,
                    &json.replace("\"version\":1", "\"version\":2"),
                ),
                "another version",
            ),
            (
                with(RELEASE_TYPE_URL, &json.replacen('{', "{\"extra\":1,", 1)),
                "an unknown field",
            ),
        ] {
            let err = ReleaseRequest::from_any(&any).expect_err(why);
            assert_eq!(err.code, ErrorCode::BadRequest, "{why}: {err}");
        }
    }

    #[test]
    fn the_floor_refuses_what_the_catalogue_does_not_allow() {
        assert!(
            count_by("episodes", "specialty")
                .validate(&governance())
                .is_ok()
        );
        assert_eq!(
            code(&count_by("episodes", "person_id")),
            ErrorCode::IdentifierColumn
        );
        assert_eq!(
            code(&count_by("episodes", "age_at_admission")),
            ErrorCode::QuasiIdentifier
        );
        assert_eq!(code(&count_by("episodes", "cost")), ErrorCode::MeasureUsage);
        assert_eq!(code(&count_by("patients", "sex")), ErrorCode::QueryShape);
        assert_eq!(
            code(&count_by("episodes", "no_such")),
            ErrorCode::UnclassifiedColumn
        );

        let mut generalised = count_by("episodes", "cost");
        generalised.group_by[0].generaliser = Some(Generaliser::AgeBand);
        assert_eq!(code(&generalised), ErrorCode::QuasiIdentifier);

        let mut undeclared = count_by("episodes", "specialty");
        undeclared.joins = vec!["episodes".into()];
        assert_eq!(code(&undeclared), ErrorCode::QueryShape);

        let mut twice = count_by("episodes", "specialty");
        twice.joins = vec!["patients".into(), "patients".into()];
        assert_eq!(code(&twice), ErrorCode::QueryShape);

        let mut reference = count_by("icd10_chapters", "chapter");
        reference.fact = "icd10_chapters".into();
        assert_eq!(code(&reference), ErrorCode::QueryShape);

        let mut unfiltered = count_by("episodes", "specialty");
        unfiltered.joins = vec!["patients".into()];
        unfiltered.filter = Some(Predicate::Compare {
            on: Dimension::bare("patients", "year_of_birth"),
            cmp: Comparison::Eq,
            value: Literal::Int(1950),
        });
        assert_eq!(code(&unfiltered), ErrorCode::FilterNotAllowed);
    }

    #[test]
    fn a_sum_of_a_pinned_column_is_refused() {
        let cost = ColumnRef {
            table: "episodes".into(),
            column: "cost".into(),
        };
        let mut pinned = count_by("episodes", "specialty");
        pinned.aggregates = vec![Aggregate::Mean {
            column: cost.clone(),
        }];
        pinned.filter = Some(Predicate::InList {
            on: Dimension::bare("episodes", "cost"),
            values: vec![Literal::Float(500.0)],
            negated: false,
        });
        assert_eq!(code(&pinned), ErrorCode::MeasureUsage);
        pinned.filter = Some(Predicate::Compare {
            on: Dimension::bare("episodes", "length_of_stay"),
            cmp: Comparison::Gt,
            value: Literal::Int(21),
        });
        assert!(pinned.validate(&governance()).is_ok());
    }

    #[test]
    fn huge_or_deep_filters_are_refused_without_recursing_far() {
        let leaf = Predicate::IsNull {
            on: Dimension::bare("episodes", "specialty"),
            negated: true,
        };
        let mut deep = leaf.clone();
        for _ in 0..10_000 {
            deep = Predicate::Not {
                not: Box::new(deep),
            };
        }
        let mut release = count_by("episodes", "specialty");
        release.filter = Some(deep);
        assert_eq!(code(&release), ErrorCode::QueryShape);
        release.filter = Some(Predicate::InList {
            on: Dimension::bare("episodes", "specialty"),
            values: vec![Literal::Text("100".into()); MAX_IN_VALUES + 1],
            negated: false,
        });
        assert_eq!(code(&release), ErrorCode::QueryShape);
        // The deep tree must also drop without overflowing the stack.
        drop(release);
    }

    #[test]
    fn renders_readable_sql() {
        let mut release = count_by("episodes", "specialty");
        release.joins = vec!["patients".into()];
        release.filter = Some(Predicate::Prefix {
            on: Dimension::bare("episodes", "diagnosis_icd10"),
            prefix: "I2'1".into(),
            negated: false,
        });
        assert_eq!(
            release.render_sql(&governance()),
            "SELECT episodes.specialty AS g0, COUNT(*) FROM episodes JOIN patients ON episodes.person_id = patients.person_id WHERE episodes.diagnosis_icd10 LIKE 'I2''1%' GROUP BY g0"
        );
    }
}
