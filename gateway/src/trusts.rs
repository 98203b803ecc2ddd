//! Connections to the trusts' node agents: one pooled channel per trust, every call bounded
//! by a timeout, every failure turned into a typed error that names the trust.

use std::time::{Duration, Instant};

use arrow::record_batch::RecordBatch;
use arrow_flight::error::FlightError;
use tally_common::admission::RequestIdentity;
use tally_common::flight::{
    MIN_PATIENTS_HEADER, QUERY_ID_HEADER, SqlClient, TableInfo, header_text, http_url,
    identity_headers, list_tables, run_statement,
};
use tally_common::tls::client_tls;
use tally_common::{ErrorCode, TallyError};
use tonic::Code;
use tonic::transport::{Channel, Endpoint};

use crate::config::{NodeEndpoint, NodeTlsConfig};
use crate::error::GatewayError;

/// One trust's node agent, as the gateway reaches it.
#[derive(Debug, Clone)]
pub struct Trust {
    /// The trust's code.
    pub code: String,
    /// The trust's name, for messages.
    pub name: String,
    channel: Channel,
    request_timeout: Duration,
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
    /// The small-number threshold the trust demands (0 when it states none).
    pub min_patients: u64,
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
        let bad_url = || GatewayError::NodeUrl {
            code: endpoint.code.clone(),
            url: endpoint.url.clone(),
        };
        let mut channel = Endpoint::from_shared(http_url(&endpoint.url)).map_err(|_| bad_url())?;
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
            name: endpoint
                .name
                .clone()
                .unwrap_or_else(|| endpoint.code.clone()),
            channel,
            request_timeout,
        })
    }

    fn client(&self) -> SqlClient {
        SqlClient::new(self.channel.clone())
    }

    /// The tables the trust announces.
    pub async fn tables(&self) -> Result<Vec<TableInfo>, TallyError> {
        let mut client = self.client();
        self.bounded(list_tables(&mut client)).await
    }

    /// Runs one per-trust query on behalf of `identity` and collects its partial result.
    pub async fn run(
        &self,
        sql: &str,
        query_id: &str,
        identity: &RequestIdentity,
    ) -> Result<TrustAnswer, TallyError> {
        let started = Instant::now();
        let mut headers = identity_headers(identity);
        headers.push((QUERY_ID_HEADER, query_id.to_string()));
        let fetched = self
            .bounded(run_statement(self.channel.clone(), &headers, sql))
            .await?;
        let min_patients = header_text(&fetched.headers, MIN_PATIENTS_HEADER)
            .parse()
            .unwrap_or(0);
        Ok(TrustAnswer {
            trust: self.code.clone(),
            batches: fetched.batches,
            wire_bytes: fetched.wire_bytes,
            elapsed: started.elapsed(),
            min_patients,
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

    fn timed_out(&self) -> TallyError {
        TallyError::new(
            ErrorCode::TrustTimeout,
            format!(
                "trust {} ({}) did not answer within {:.0} s",
                self.code,
                self.name,
                self.request_timeout.as_secs_f64()
            ),
        )
    }

    /// Turns a failed call into an error naming the trust. A node's own reason code is kept;
    /// any other text from the node is not passed on.
    fn describe_failure(&self, err: FlightError) -> TallyError {
        let status = match err {
            FlightError::Tonic(status) => *status,
            other => {
                tracing::warn!(trust = %self.code, error = %other, "unexpected answer from trust");
                return TallyError::new(
                    ErrorCode::TrustProtocol,
                    format!(
                        "trust {} ({}) sent an answer Tally cannot read",
                        self.code, self.name
                    ),
                );
            }
        };
        if let Some(reason) = TallyError::from_status(&status) {
            let (code, verb) = match reason.code {
                ErrorCode::Execution | ErrorCode::Internal | ErrorCode::ResourcesExhausted => {
                    (ErrorCode::TrustFailed, "failed to run")
                }
                ErrorCode::QueryTimeout => (ErrorCode::TrustTimeout, "stopped"),
                _ => (ErrorCode::TrustRefused, "refused"),
            };
            return TallyError::new(
                code,
                format!(
                    "trust {} ({}) {verb} the query: {reason}",
                    self.code, self.name
                ),
            );
        }
        tracing::warn!(trust = %self.code, status = ?status, "trust call failed");
        match status.code() {
            Code::DeadlineExceeded | Code::Cancelled => self.timed_out(),
            Code::Unavailable | Code::Unknown => TallyError::new(
                ErrorCode::TrustUnavailable,
                format!("trust {} ({}) could not be reached", self.code, self.name),
            ),
            _ => TallyError::new(
                ErrorCode::TrustFailed,
                format!("trust {} ({}) failed to answer", self.code, self.name),
            ),
        }
    }
}
