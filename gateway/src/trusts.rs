//! Connections to the trusts' node agents: one pooled channel per trust (dialed by the
//! gateway, or the node's own connection when it dials in), every call bounded by a
//! timeout, every failure turned into a typed error that names the trust.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use arrow_flight::error::FlightError;
use tally_common::admission::RequestIdentity;
use tally_common::flight::{
    ANALYST_TOKEN_HEADER, QUERY_ID_HEADER, SqlClient, TableInfo, http_url, identity_headers,
    list_tables, run_ticket,
};
use tally_common::model::ReleaseRequest;
use tally_common::tls::client_tls;
use tally_common::{ErrorCode, TallyError};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::config::{NodeEndpoint, NodeTlsConfig};
use crate::dial_in::DialIn;
use crate::error::GatewayError;

/// One trust's node agent, as the gateway reaches it.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The trust's code.
    pub code: String,
    /// The trust's name, for messages.
    pub name: String,
    link: Link,
    request_timeout: Duration,
}

/// How the gateway reaches a trust.
#[derive(Debug, Clone)]
enum Link {
    /// It dials the node's URL.
    Dials(Channel),
    /// The node dials in; calls go down its current connection.
    DialsIn(Arc<DialIn>),
}

/// What one trust answered to one per-trust query.
#[derive(Debug, Clone)]
pub struct TrustAnswer {
    /// The trust's code.
    pub trust: String,
    /// The partial-aggregate batches.
    pub batches: Vec<RecordBatch>,
    /// Flight message bytes received for them.
    pub wire_bytes: usize,
    /// Wall time of the call.
    pub elapsed: Duration,
}

impl Trust {
    /// A lazily connecting client for `endpoint`; over mutual TLS (presenting the
    /// gateway's certificate, expecting the trust's name) when its URL asks for TLS.
    pub fn new(
        endpoint: &NodeEndpoint,
        tls: Option<&NodeTlsConfig>,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let url = endpoint.url.clone().unwrap_or_default();
        let bad_url = || GatewayError::NodeUrl {
            code: endpoint.code.clone(),
            url: url.clone(),
        };
        let mut channel = Endpoint::from_shared(http_url(&url)).map_err(|_| bad_url())?;
        if endpoint.uses_tls() {
            let tls = tls.ok_or_else(|| {
                GatewayError::Tls(format!(
                    "node {} uses TLS but there is no [node_tls] section",
                    endpoint.code
                ))
            })?;
            let config = client_tls(&tls.ca, Some(&tls.identity()), &endpoint.expected_name())
                .map_err(|e| GatewayError::Tls(e.to_string()))?;
            channel = channel
                .tls_config(config)
                .map_err(|e| GatewayError::Tls(format!("node {}: {e}", endpoint.code)))?;
        }
        let channel = channel
            .connect_timeout(connect_timeout)
            .timeout(request_timeout)
            .tcp_nodelay(true)
            .connect_lazy();
        Ok(Trust {
            code: endpoint.code.clone(),
            name: endpoint_name(endpoint),
            link: Link::Dials(channel),
            request_timeout,
        })
    }

    /// A trust whose node dials in, reached down its connection in `dial_in`.
    pub fn dialing_in(
        endpoint: &NodeEndpoint,
        dial_in: Arc<DialIn>,
        request_timeout: Duration,
    ) -> Self {
        Trust {
            code: endpoint.code.clone(),
            name: endpoint_name(endpoint),
            link: Link::DialsIn(dial_in),
            request_timeout,
        }
    }

    /// Whether the trust's node dials in (rather than being dialed).
    pub fn dials_in(&self) -> bool {
        match self.link {
            Link::Dials(_) => false,
            Link::DialsIn(_) => true,
        }
    }

    /// The channel calls to the trust go down.
    fn channel(&self) -> Result<Channel, TallyError> {
        match &self.link {
            Link::Dials(channel) => Ok(channel.clone()),
            Link::DialsIn(dial_in) => dial_in.channel(),
        }
    }

    /// The tables the trust announces.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, TallyError> {
        let mut client = SqlClient::new(self.channel()?);
        self.bounded(list_tables(&mut client)).await
    }

    /// Runs one release on behalf of `identity` (with the analyst's signed `token`, which
    /// the trust verifies itself) and collects the trust's protected partials.
    pub async fn run(
        &self,
        request: &ReleaseRequest,
        query_id: &str,
        identity: &RequestIdentity,
        token: Option<&str>,
    ) -> Result<TrustAnswer, TallyError> {
        let started = Instant::now();
        let mut headers = identity_headers(identity);
        headers.push((QUERY_ID_HEADER, query_id.to_string()));
        if let Some(token) = token {
            headers.push((ANALYST_TOKEN_HEADER, token.to_string()));
        }
        let fetched = self
            .bounded(run_ticket(self.channel()?, &headers, request.to_ticket()))
            .await?;
        Ok(TrustAnswer {
            trust: self.code.clone(),
            batches: fetched.batches,
            wire_bytes: fetched.wire_bytes,
            elapsed: started.elapsed(),
        })
    }

    async fn bounded<T>(
        &self,
        call: impl Future<Output = Result<T, FlightError>>,
    ) -> Result<T, TallyError> {
        match tokio::time::timeout(self.request_timeout, call).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(err)) => Err(self.describe_failure(err)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// A trust that did not answer in time. The trust is not named: how long a query runs
    /// at a trust may depend on its data.
    fn timed_out(&self) -> TallyError {
        tracing::warn!(trust = %self.code, "trust did not answer in time");
        TallyError::new(
            ErrorCode::TrustTimeout,
            format!(
                "a trust did not answer within {:.0} s",
                self.request_timeout.as_secs_f64()
            ),
        )
    }

    /// Turns a failed call into one of our errors. Refusals (which depend on the query, the
    /// identity and the trust's policy only) keep the trust's reason code and name the
    /// trust; failures and timeouts, which could depend on the data, are one generic code
    /// that names no trust; unreachable trusts are named. No other text from the node is
    /// passed on.
    fn describe_failure(&self, err: FlightError) -> TallyError {
        let failed = || {
            TallyError::new(
                ErrorCode::TrustFailed,
                "a trust failed to run the query; its audit log has the details",
            )
        };
        let status = match err {
            FlightError::Tonic(status) => *status,
            FlightError::Arrow(_)
            | FlightError::NotYetImplemented(_)
            | FlightError::ProtocolError(_)
            | FlightError::DecodeError(_)
            | FlightError::ExternalError(_) => {
                tracing::warn!(trust = %self.code, error = %err, "unreadable answer from trust");
                return failed();
            }
        };
        if let Some(reason) = TallyError::from_status(&status) {
            tracing::info!(trust = %self.code, code = %reason.code, "trust did not answer");
            return match reason.code {
                // How long a query runs depends on the data: which trust and which budget
                // stopped it is not said. Nor which trust is busy: how long the queries
                // ahead of this one run depends on the data too.
                ErrorCode::QueryTimeout | ErrorCode::CpuBudget => TallyError::new(
                    ErrorCode::TrustTimeout,
                    "a trust stopped the query at its own time or processor-time limit",
                ),
                ErrorCode::Busy => TallyError::new(
                    ErrorCode::Busy,
                    "a trust has no free slot for this query: try again shortly",
                ),
                ErrorCode::Execution
                | ErrorCode::Internal
                | ErrorCode::ResourcesExhausted
                | ErrorCode::TrustFailed
                | ErrorCode::TrustProtocol
                | ErrorCode::TrustTimeout
                | ErrorCode::TrustUnavailable
                | ErrorCode::Overflow
                | ErrorCode::DivideByZero => failed(),
                // Refusals depend on the query, the identity and the trust's policy only.
                refused @ (ErrorCode::SqlSyntax
                | ErrorCode::UnknownTable
                | ErrorCode::UnknownColumn
                | ErrorCode::Plan
                | ErrorCode::ReadOnly
                | ErrorCode::NotAggregate
                | ErrorCode::Window
                | ErrorCode::SchemaMismatch
                | ErrorCode::TrustRefused
                | ErrorCode::Unauthenticated
                | ErrorCode::BadRequest
                | ErrorCode::TooLarge
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
                | ErrorCode::PolicyDenied
                | ErrorCode::PolicyError
                | ErrorCode::RateLimited
                | ErrorCode::ClientCertificate
                | ErrorCode::QueryShape
                | ErrorCode::FilterNotAllowed
                | ErrorCode::BudgetExhausted
                | ErrorCode::LedgerBroken
                | ErrorCode::QueryCost) => TallyError::new(
                    ErrorCode::TrustRefused,
                    format!(
                        "trust {} ({}) refused the query: {}",
                        self.code,
                        self.name,
                        TallyError::new(refused, reason.message.clone())
                    ),
                ),
            };
        }
        tracing::warn!(trust = %self.code, status = ?status, "trust call failed");
        match status.code() {
            Code::DeadlineExceeded | Code::Cancelled => self.timed_out(),
            Code::Unavailable => TallyError::new(
                ErrorCode::TrustUnavailable,
                format!("trust {} ({}) could not be reached", self.code, self.name),
            ),
            Code::Ok
            | Code::Unknown
            | Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::PermissionDenied
            | Code::ResourceExhausted
            | Code::FailedPrecondition
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unimplemented
            | Code::Internal
            | Code::DataLoss
            | Code::Unauthenticated => failed(),
        }
    }
}

/// The trust's name for messages: its configured name, else its code.
fn endpoint_name(endpoint: &NodeEndpoint) -> String {
    endpoint
        .name
        .clone()
        .unwrap_or_else(|| endpoint.code.clone())
}
