//! Tally's own error codes: the only error text an analyst (or a gateway) ever sees.
//!
//! Engine errors (DataFusion, Arrow, Parquet) are logged server-side with the query id and
//! replaced by a code and a message written by us. Planning errors describe the query text
//! only; execution errors can carry data values (a failed cast prints the value), so they are
//! always replaced by a generic message.

use std::fmt;

use datafusion::error::DataFusionError;
use datafusion::sql::sqlparser::parser::ParserError;
use tonic::{Code, Status};

/// Stable reason codes that analysts can look up in the README.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// The SQL text does not parse.
    SqlSyntax,
    /// The query names a table no trust serves.
    UnknownTable,
    /// The query names a column the table does not have.
    UnknownColumn,
    /// The query parses but cannot be planned (types, functions, ambiguity).
    Plan,
    /// The statement is not a read-only SELECT (DDL, DML, COPY, SET, EXPLAIN ...).
    ReadOnly,
    /// The result would contain row-level data instead of aggregates.
    NotAggregate,
    /// A window function.
    Window,
    /// The same table has different schemas at different trusts.
    SchemaMismatch,
    /// A trust that must answer is down or unreachable.
    TrustUnavailable,
    /// A trust did not answer within the time limit.
    TrustTimeout,
    /// A trust refused the per-trust query.
    TrustRefused,
    /// A trust failed while running the per-trust query.
    TrustFailed,
    /// A trust answered with something that is not the agreed partial result.
    TrustProtocol,
    /// The engine failed while running the query (details are in the server log).
    Execution,
    /// Missing or invalid credentials.
    Unauthenticated,
    /// A malformed Flight SQL request.
    BadRequest,
    /// The query text is larger or deeper than the limits allow.
    TooLarge,
    /// A fault inside Tally itself.
    Internal,
    /// The project is unknown, or the user is not a member of it.
    Project,
    /// The purpose is not approved for the project.
    Purpose,
    /// The project has no access to a table.
    TableNotAllowed,
    /// An aggregate the policy does not allow (MIN, MAX, ...).
    AggregateNotAllowed,
    /// An aggregate over an expression, CASE, cast, DISTINCT or FILTER.
    ExpressionShape,
    /// A column the governance catalogue does not classify.
    UnclassifiedColumn,
    /// An identifier used outside a bare same-trust join.
    IdentifierColumn,
    /// A quasi-identifier grouped or shown without a generalising function.
    QuasiIdentifier,
    /// A measure used other than as the bare argument of an aggregate.
    MeasureUsage,
    /// UNION, INTERSECT or EXCEPT.
    SetOperation,
    /// A VALUES list.
    Values,
    /// ROLLUP, CUBE or GROUPING SETS.
    GroupingSets,
    /// LIMIT or ORDER BY below an aggregate.
    LimitBelowAggregate,
    /// The policy refused with a reason code Tally does not know.
    PolicyDenied,
    /// The policy could not decide (fail closed).
    PolicyError,
    /// The user or project has sent more queries than its rate limit allows.
    RateLimited,
    /// The query ran longer than the time limit.
    QueryTimeout,
    /// The query needed more memory than the node's limit.
    ResourcesExhausted,
    /// A client certificate was missing, from another CA, or not an allowed gateway.
    ClientCertificate,
    /// A construct the query model cannot express below a release (subqueries, undeclared
    /// joins, expressions over patient-level columns, ...).
    QueryShape,
    /// A column the catalogue does not allow in WHERE.
    FilterNotAllowed,
    /// The project's privacy budget for this dataset cannot pay for this query.
    BudgetExhausted,
    /// The privacy-budget ledger failed verification or cannot be written, so every query
    /// is refused (fail closed).
    LedgerBroken,
    /// Every slot for running queries is taken and the wait queue is full, or the query
    /// waited its whole time limit for a slot: try again later.
    Busy,
    /// The query's estimated cost (from its model alone) is above the trust's ceiling.
    QueryCost,
    /// The query used more processor time than the per-query budget allows.
    CpuBudget,
    /// Arithmetic over released values overflowed its integer type.
    Overflow,
    /// Arithmetic over released values divided a whole number by zero.
    DivideByZero,
}

impl ErrorCode {
    /// Every code, for documentation and tests.
    pub const ALL: [ErrorCode; 46] = [
        ErrorCode::SqlSyntax,
        ErrorCode::UnknownTable,
        ErrorCode::UnknownColumn,
        ErrorCode::Plan,
        ErrorCode::ReadOnly,
        ErrorCode::NotAggregate,
        ErrorCode::Window,
        ErrorCode::SchemaMismatch,
        ErrorCode::TrustUnavailable,
        ErrorCode::TrustTimeout,
        ErrorCode::TrustRefused,
        ErrorCode::TrustFailed,
        ErrorCode::TrustProtocol,
        ErrorCode::Execution,
        ErrorCode::Unauthenticated,
        ErrorCode::BadRequest,
        ErrorCode::TooLarge,
        ErrorCode::Internal,
        ErrorCode::Project,
        ErrorCode::Purpose,
        ErrorCode::TableNotAllowed,
        ErrorCode::AggregateNotAllowed,
        ErrorCode::ExpressionShape,
        ErrorCode::UnclassifiedColumn,
        ErrorCode::IdentifierColumn,
        ErrorCode::QuasiIdentifier,
        ErrorCode::MeasureUsage,
        ErrorCode::SetOperation,
        ErrorCode::Values,
        ErrorCode::GroupingSets,
        ErrorCode::LimitBelowAggregate,
        ErrorCode::PolicyDenied,
        ErrorCode::PolicyError,
        ErrorCode::RateLimited,
        ErrorCode::QueryTimeout,
        ErrorCode::ResourcesExhausted,
        ErrorCode::ClientCertificate,
        ErrorCode::QueryShape,
        ErrorCode::FilterNotAllowed,
        ErrorCode::BudgetExhausted,
        ErrorCode::LedgerBroken,
        ErrorCode::Busy,
        ErrorCode::QueryCost,
        ErrorCode::CpuBudget,
        ErrorCode::Overflow,
        ErrorCode::DivideByZero,
    ];

    /// The stable identifier, e.g. `E_NOT_AGGREGATE`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::SqlSyntax => "E_SQL_SYNTAX",
            ErrorCode::UnknownTable => "E_UNKNOWN_TABLE",
            ErrorCode::UnknownColumn => "E_UNKNOWN_COLUMN",
            ErrorCode::Plan => "E_PLAN",
            ErrorCode::ReadOnly => "E_READ_ONLY",
            ErrorCode::NotAggregate => "E_NOT_AGGREGATE",
            ErrorCode::Window => "E_WINDOW",
            ErrorCode::SchemaMismatch => "E_SCHEMA_MISMATCH",
            ErrorCode::TrustUnavailable => "E_TRUST_UNAVAILABLE",
            ErrorCode::TrustTimeout => "E_TRUST_TIMEOUT",
            ErrorCode::TrustRefused => "E_TRUST_REFUSED",
            ErrorCode::TrustFailed => "E_TRUST_FAILED",
            ErrorCode::TrustProtocol => "E_TRUST_PROTOCOL",
            ErrorCode::Execution => "E_EXECUTION",
            ErrorCode::Unauthenticated => "E_UNAUTHENTICATED",
            ErrorCode::BadRequest => "E_BAD_REQUEST",
            ErrorCode::TooLarge => "E_TOO_LARGE",
            ErrorCode::Internal => "E_INTERNAL",
            ErrorCode::Project => "E_PROJECT",
            ErrorCode::Purpose => "E_PURPOSE",
            ErrorCode::TableNotAllowed => "E_TABLE_NOT_ALLOWED",
            ErrorCode::AggregateNotAllowed => "E_AGG_NOT_ALLOWED",
            ErrorCode::ExpressionShape => "E_EXPR_SHAPE",
            ErrorCode::UnclassifiedColumn => "E_UNCLASSIFIED_COLUMN",
            ErrorCode::IdentifierColumn => "E_IDENTIFIER_COLUMN",
            ErrorCode::QuasiIdentifier => "E_QUASI_IDENTIFIER",
            ErrorCode::MeasureUsage => "E_MEASURE_USAGE",
            ErrorCode::SetOperation => "E_SETOP",
            ErrorCode::Values => "E_VALUES",
            ErrorCode::GroupingSets => "E_GROUPING_SETS",
            ErrorCode::LimitBelowAggregate => "E_LIMIT_BELOW_AGGREGATE",
            ErrorCode::PolicyDenied => "E_POLICY_DENIED",
            ErrorCode::PolicyError => "E_POLICY_ERROR",
            ErrorCode::RateLimited => "E_RATE_LIMITED",
            ErrorCode::QueryTimeout => "E_QUERY_TIMEOUT",
            ErrorCode::ResourcesExhausted => "E_RESOURCES",
            ErrorCode::ClientCertificate => "E_CLIENT_CERT",
            ErrorCode::QueryShape => "E_QUERY_SHAPE",
            ErrorCode::FilterNotAllowed => "E_FILTER_NOT_ALLOWED",
            ErrorCode::BudgetExhausted => "E_BUDGET_EXHAUSTED",
            ErrorCode::LedgerBroken => "E_LEDGER_BROKEN",
            ErrorCode::Busy => "E_BUSY",
            ErrorCode::QueryCost => "E_QUERY_COST",
            ErrorCode::CpuBudget => "E_CPU_BUDGET",
            ErrorCode::Overflow => "E_OVERFLOW",
            ErrorCode::DivideByZero => "E_DIVIDE_BY_ZERO",
        }
    }

    /// Parses a stable identifier back into a code.
    pub fn parse(text: &str) -> Option<ErrorCode> {
        ErrorCode::ALL
            .into_iter()
            .find(|code| code.as_str() == text)
    }

    fn grpc_code(self) -> Code {
        match self {
            ErrorCode::SqlSyntax
            | ErrorCode::UnknownTable
            | ErrorCode::UnknownColumn
            | ErrorCode::Plan
            | ErrorCode::BadRequest
            | ErrorCode::TooLarge
            | ErrorCode::Overflow
            | ErrorCode::DivideByZero => Code::InvalidArgument,
            ErrorCode::ReadOnly
            | ErrorCode::NotAggregate
            | ErrorCode::Window
            | ErrorCode::TrustRefused
            | ErrorCode::Project
            | ErrorCode::Purpose
            | ErrorCode::TableNotAllowed
            | ErrorCode::AggregateNotAllowed
            | ErrorCode::ExpressionShape
            | ErrorCode::UnclassifiedColumn
            | ErrorCode::IdentifierColumn
            | ErrorCode::QuasiIdentifier
            | ErrorCode::MeasureUsage
            | ErrorCode::SetOperation
            | ErrorCode::Values
            | ErrorCode::GroupingSets
            | ErrorCode::LimitBelowAggregate
            | ErrorCode::QueryShape
            | ErrorCode::FilterNotAllowed
            | ErrorCode::PolicyDenied => Code::PermissionDenied,
            ErrorCode::SchemaMismatch => Code::FailedPrecondition,
            ErrorCode::TrustUnavailable => Code::Unavailable,
            ErrorCode::TrustTimeout | ErrorCode::QueryTimeout | ErrorCode::CpuBudget => {
                Code::DeadlineExceeded
            }
            ErrorCode::Busy => Code::Unavailable,
            ErrorCode::Unauthenticated | ErrorCode::ClientCertificate => Code::Unauthenticated,
            ErrorCode::RateLimited
            | ErrorCode::ResourcesExhausted
            | ErrorCode::BudgetExhausted
            | ErrorCode::QueryCost => Code::ResourceExhausted,
            ErrorCode::TrustFailed
            | ErrorCode::TrustProtocol
            | ErrorCode::Execution
            | ErrorCode::Internal
            | ErrorCode::PolicyError
            | ErrorCode::LedgerBroken => Code::Internal,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The longest error message sent, in bytes.
pub const MAX_MESSAGE_BYTES: usize = 1024;

/// An error Tally is willing to show: a stable code and a message written by us.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct TallyError {
    /// The stable reason code.
    pub code: ErrorCode,
    /// A message for people; never engine text produced while reading data.
    pub message: String,
}

impl TallyError {
    /// Creates an error with the given code and message.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        TallyError {
            code,
            message: message.into(),
        }
    }

    /// The generic message for an engine failure during execution; details stay in the log.
    pub fn execution(query_id: &str) -> Self {
        TallyError::new(
            ErrorCode::Execution,
            format!(
                "the query failed while running; the server log has the details under query id {query_id}"
            ),
        )
    }

    /// Maps an error raised while *planning* a query. Syntax errors (which quote only the
    /// analyst's own text), unknown tables, columns and functions keep their names; any other
    /// engine wording is logged and replaced by our own message.
    pub fn from_planning(err: DataFusionError) -> Self {
        if let Some(tally) = find_tally_error(&err).or_else(|| arithmetic(&err)) {
            return tally;
        }
        match err.find_root() {
            DataFusionError::SQL(parse, _) => syntax_error(parse),
            DataFusionError::SchemaError(schema_err, _) => {
                use datafusion::common::SchemaError;
                match schema_err.as_ref() {
                    SchemaError::FieldNotFound { field, .. } => TallyError::new(
                        ErrorCode::UnknownColumn,
                        format!("column '{}' not found", field.name()),
                    ),
                    SchemaError::AmbiguousReference { field } => TallyError::new(
                        ErrorCode::Plan,
                        format!(
                            "column reference '{}' is ambiguous; qualify it with its table",
                            field.name()
                        ),
                    ),
                    other => engine_plan_error(&other.to_string()),
                }
            }
            DataFusionError::Plan(msg) => plan_error(msg),
            DataFusionError::NotImplemented(msg) => {
                tracing::info!(detail = %first_line(msg), "query uses an unsupported feature");
                TallyError::new(
                    ErrorCode::Plan,
                    "the query uses a SQL feature Tally does not support",
                )
            }
            other => engine_plan_error(&other.to_string()),
        }
    }

    /// Maps an error raised while *executing* a query: our own errors pass through, engine
    /// errors become the generic message and are logged with the query id.
    pub fn from_execution(err: DataFusionError, query_id: &str) -> Self {
        match find_tally_error(&err).or_else(|| arithmetic(&err)) {
            Some(tally) => tally,
            None if matches!(err.find_root(), DataFusionError::ResourcesExhausted(_)) => {
                tracing::warn!(query_id, error = %err, "query exceeded the memory limit");
                TallyError::new(
                    ErrorCode::ResourcesExhausted,
                    format!(
                        "the query needed more memory than the limit allows (query id {query_id})"
                    ),
                )
            }
            None => {
                tracing::warn!(query_id, error = %err, "query failed inside the engine");
                TallyError::execution(query_id)
            }
        }
    }

    /// Wraps this error so that it survives DataFusion's stream and planning boundaries.
    pub fn into_datafusion(self) -> DataFusionError {
        DataFusionError::External(Box::new(self))
    }

    /// The gRPC status carrying `CODE: message`, the message cut to [`MAX_MESSAGE_BYTES`]
    /// (it travels in an HTTP/2 header, and a syntax error quotes the analyst's token:
    /// a 60 KB string literal would otherwise break the connection).
    pub fn to_status(&self) -> Status {
        let mut text = self.to_string();
        if text.len() > MAX_MESSAGE_BYTES {
            let mut end = MAX_MESSAGE_BYTES;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text.truncate(end);
            text.push('…');
        }
        Status::new(self.code.grpc_code(), text)
    }

    /// Reads a status sent by a Tally peer back into a typed error, if it carries our format.
    pub fn from_status(status: &Status) -> Option<Self> {
        let (code, message) = status.message().split_once(": ")?;
        Some(TallyError::new(ErrorCode::parse(code)?, message))
    }
}

/// [`ErrorCode::Overflow`] when integer arithmetic overflowed, [`ErrorCode::DivideByZero`]
/// when a whole number was divided by zero (while running, or while folding constants in
/// planning).
fn arithmetic(err: &DataFusionError) -> Option<TallyError> {
    let DataFusionError::ArrowError(arrow, _) = err.find_root() else {
        return None;
    };
    match arrow.as_ref() {
        arrow::error::ArrowError::ArithmeticOverflow(_) => Some(TallyError::new(
            ErrorCode::Overflow,
            "arithmetic over the answer overflowed its integer type; compute it as a DOUBLE or with smaller factors",
        )),
        arrow::error::ArrowError::DivideByZero => Some(TallyError::new(
            ErrorCode::DivideByZero,
            "arithmetic over the answer divided by zero; write NULLIF(divisor, 0) for NULL instead",
        )),
        // Any other engine failure keeps the generic message (its text stays in the log).
        arrow::error::ArrowError::NotYetImplemented(_)
        | arrow::error::ArrowError::ExternalError(_)
        | arrow::error::ArrowError::CastError(_)
        | arrow::error::ArrowError::MemoryError(_)
        | arrow::error::ArrowError::ParseError(_)
        | arrow::error::ArrowError::SchemaError(_)
        | arrow::error::ArrowError::ComputeError(_)
        | arrow::error::ArrowError::CsvError(_)
        | arrow::error::ArrowError::JsonError(_)
        | arrow::error::ArrowError::AvroError(_)
        | arrow::error::ArrowError::IoError(..)
        | arrow::error::ArrowError::IpcError(_)
        | arrow::error::ArrowError::InvalidArgumentError(_)
        | arrow::error::ArrowError::ParquetError(_)
        | arrow::error::ArrowError::CDataInterface(_)
        | arrow::error::ArrowError::DictionaryKeyOverflowError
        | arrow::error::ArrowError::RunEndIndexOverflowError
        | arrow::error::ArrowError::OffsetOverflowError(_) => None,
    }
}

impl From<TallyError> for Status {
    fn from(err: TallyError) -> Status {
        err.to_status()
    }
}

/// Looks through DataFusion's wrappers (context, shared, external) for one of our errors.
pub fn find_tally_error(err: &DataFusionError) -> Option<TallyError> {
    match err {
        DataFusionError::External(inner) => {
            inner.downcast_ref::<TallyError>().cloned().or_else(|| {
                inner
                    .downcast_ref::<DataFusionError>()
                    .and_then(find_tally_error)
            })
        }
        DataFusionError::Context(_, inner) => find_tally_error(inner),
        DataFusionError::Shared(inner) => find_tally_error(inner),
        DataFusionError::Diagnostic(_, inner) => find_tally_error(inner),
        DataFusionError::Collection(errors) => errors.iter().find_map(find_tally_error),
        DataFusionError::ArrowError(arrow, _) => match arrow.as_ref() {
            arrow::error::ArrowError::ExternalError(inner) => {
                inner.downcast_ref::<TallyError>().cloned().or_else(|| {
                    inner
                        .downcast_ref::<DataFusionError>()
                        .and_then(find_tally_error)
                })
            }
            _ => None,
        },
        _ => None,
    }
}

fn syntax_error(parse: &ParserError) -> TallyError {
    let detail = match parse {
        ParserError::TokenizerError(msg) | ParserError::ParserError(msg) => msg.clone(),
        ParserError::RecursionLimitExceeded => {
            return TallyError::new(ErrorCode::TooLarge, "the query is nested too deeply");
        }
    };
    TallyError::new(ErrorCode::SqlSyntax, detail)
}

fn plan_error(msg: &str) -> TallyError {
    let msg = first_line(msg);
    if let Some(rest) = msg.strip_prefix("table '") {
        let name = rest.split('\'').next().unwrap_or_default();
        let short = name.rsplit('.').next().unwrap_or(name);
        return TallyError::new(
            ErrorCode::UnknownTable,
            format!("table '{short}' not found"),
        );
    }
    if let Some(rest) = msg.strip_prefix("Invalid function '") {
        let name = rest.split('\'').next().unwrap_or_default();
        return TallyError::new(ErrorCode::Plan, format!("unknown function '{name}'"));
    }
    engine_plan_error(msg)
}

/// Any other planning failure: the engine's wording stays in the server log.
fn engine_plan_error(detail: &str) -> TallyError {
    tracing::info!(detail = %first_line(detail), "query could not be planned");
    TallyError::new(
        ErrorCode::Plan,
        "the query could not be planned: check that column types suit the operators and functions used",
    )
}

fn first_line(msg: &str) -> &str {
    msg.lines().next().unwrap_or(msg).trim()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_through_status() {
        for code in ErrorCode::ALL {
            let err = TallyError::new(code, "something: with a colon");
            let back = TallyError::from_status(&err.to_status()).expect("our format");
            assert_eq!(back, err);
        }
    }

    #[test]
    fn a_long_message_is_cut_at_a_character_boundary() {
        let quoted = format!(
            "Expected: end of statement, found: '{}'",
            "é".repeat(40_000)
        );
        let status = TallyError::new(ErrorCode::SqlSyntax, quoted).to_status();
        assert!(status.message().len() <= MAX_MESSAGE_BYTES + '…'.len_utf8());
        assert!(status.message().ends_with('…'));
        let back = TallyError::from_status(&status).expect("still ours");
        assert_eq!(back.code, ErrorCode::SqlSyntax);
    }

    #[test]
    fn foreign_status_is_not_ours() {
        assert!(TallyError::from_status(&Status::internal("boom")).is_none());
        assert!(TallyError::from_status(&Status::internal("E_NOPE: boom")).is_none());
    }

    #[test]
    fn tally_error_survives_datafusion_wrapping() {
        let inner = TallyError::new(ErrorCode::TrustTimeout, "trust RXA did not answer");
        let wrapped = DataFusionError::Context(
            "while scanning".into(),
            Box::new(DataFusionError::Shared(std::sync::Arc::new(
                inner.clone().into_datafusion(),
            ))),
        );
        assert_eq!(find_tally_error(&wrapped), Some(inner.clone()));
        assert_eq!(TallyError::from_execution(wrapped, "q1"), inner);
    }

    #[test]
    fn engine_errors_become_generic_without_their_text() {
        let err = DataFusionError::Execution("Cannot cast string 'RXA-P0001' to Int64".into());
        let mapped = TallyError::from_execution(err, "q42");
        assert_eq!(mapped.code, ErrorCode::Execution);
        assert!(!mapped.message.contains("RXA-P0001"));
        assert!(mapped.message.contains("q42"));
    }
}
