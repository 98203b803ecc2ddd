//! The analyst's side of Flight SQL: connect to a gateway, authenticate, run one query.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tally_common::flight::{
    PROJECT_HEADER, PURPOSE_HEADER, QUERY_ID_HEADER, header_text, http_url,
};
use tally_common::tls::client_tls;
use tally_gateway::budget::BudgetReport;
use tally_gateway::{BUDGET_ACTION, TRUSTS_HEADER};
use tonic::transport::{Channel, Endpoint};

/// Where a gateway is, and the CA certificate that signs its TLS certificate.
#[derive(Debug, Clone)]
pub struct GatewayTarget {
    /// `grpc+tls://host:port`, or `grpc://` for a gateway serving plaintext on loopback.
    pub url: String,
    /// The CA to verify the gateway with (required for `grpc+tls://`).
    pub ca_cert: Option<PathBuf>,
}

impl GatewayTarget {
    /// A gateway at `url` verified with `ca_cert`.
    pub fn new(url: impl Into<String>, ca_cert: Option<PathBuf>) -> Self {
        GatewayTarget {
            url: url.into(),
            ca_cert,
        }
    }

    /// A plaintext gateway on loopback.
    pub fn plaintext(url: impl Into<String>) -> Self {
        Self::new(url, None)
    }

    fn uses_tls(&self) -> bool {
        self.url.starts_with("grpc+tls://") || self.url.starts_with("https://")
    }
}

/// A connected, authenticated analyst client.
pub struct AnalystClient {
    inner: FlightSqlServiceClient<Channel>,
}

/// A query's answer as the analyst receives it.
pub struct Answer {
    /// The answer's schema.
    pub schema: SchemaRef,
    /// The rows.
    pub batches: Vec<RecordBatch>,
    /// Trusts that contributed, as reported by the gateway.
    pub trusts: Vec<String>,
    /// The gateway's query id (its audit log's and the trusts').
    pub query_id: String,
    /// Round-trip time seen by the client.
    pub elapsed: Duration,
}

/// A failure the CLI reports to the analyst.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway URL is malformed.
    #[error("invalid gateway url '{0}'")]
    Url(String),
    /// TLS cannot be set up as asked.
    #[error("{0}")]
    Tls(String),
    /// The gateway could not be reached.
    #[error("cannot reach the gateway at {url}: {reason}")]
    Connect {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The gateway answered with an error (already one of Tally's codes).
    #[error("{0}")]
    Refused(String),
}

/// An error and its causes, joined: transport errors say little on their own.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

fn refused(err: FlightError) -> ClientError {
    ClientError::Refused(match err {
        FlightError::Tonic(status) => status.message().to_string(),
        other => other.to_string(),
    })
}

impl AnalystClient {
    /// Connects to `target`; every call carries `token` as a bearer token.
    pub async fn connect(target: &GatewayTarget, token: &str) -> Result<Self, ClientError> {
        Self::connect_for(target, token, "", "").await
    }

    /// Connects to `target` for `project` and `purpose` (empty: the user's defaults).
    pub async fn connect_for(
        target: &GatewayTarget,
        token: &str,
        project: &str,
        purpose: &str,
    ) -> Result<Self, ClientError> {
        let url = &target.url;
        let mut endpoint =
            Endpoint::from_shared(http_url(url)).map_err(|_| ClientError::Url(url.to_string()))?;
        if target.uses_tls() {
            let ca = target.ca_cert.as_ref().ok_or_else(|| {
                ClientError::Tls(format!(
                    "{url} uses TLS: give the CA certificate that signs the gateway's certificate (--ca-cert)"
                ))
            })?;
            let host = endpoint.uri().host().unwrap_or_default().to_string();
            let config =
                client_tls(ca, None, &host).map_err(|e| ClientError::Tls(e.to_string()))?;
            endpoint = endpoint
                .tls_config(config)
                .map_err(|e| ClientError::Tls(e.to_string()))?;
        }
        let channel = endpoint
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                url: url.to_string(),
                reason: error_chain(&e),
            })?;
        let mut inner = FlightSqlServiceClient::new(channel);
        inner.set_token(token.to_string());
        for (header, value) in [(PROJECT_HEADER, project), (PURPOSE_HEADER, purpose)] {
            if !value.is_empty() {
                inner.set_header(header, value);
            }
        }
        Ok(AnalystClient { inner })
    }

    /// The project's privacy budget, as the gateway's ledger has it.
    pub async fn budget(&mut self) -> Result<BudgetReport, ClientError> {
        let action = arrow_flight::Action {
            r#type: BUDGET_ACTION.to_string(),
            body: Default::default(),
        };
        let mut results = self.inner.do_action(action).await.map_err(refused)?;
        let first = results
            .message()
            .await
            .map_err(|status| ClientError::Refused(status.message().to_string()))?
            .ok_or_else(|| ClientError::Refused("the gateway sent no budget".into()))?;
        serde_json::from_slice(&first.body)
            .map_err(|_| ClientError::Refused("the gateway's budget could not be read".into()))
    }

    /// Runs `sql` and collects the answer.
    pub async fn query(&mut self, sql: &str) -> Result<Answer, ClientError> {
        let started = Instant::now();
        let info = self
            .inner
            .execute(sql.to_string(), None)
            .await
            .map_err(refused)?;
        let schema: SchemaRef = std::sync::Arc::new(
            info.clone()
                .try_decode_schema()
                .map_err(|e| refused(FlightError::Arrow(e)))?,
        );
        let mut batches = Vec::new();
        let mut trusts = Vec::new();
        let mut query_id = String::new();
        for endpoint in info.endpoint {
            let Some(ticket) = endpoint.ticket else {
                continue;
            };
            let stream = self.inner.do_get(ticket).await.map_err(refused)?;
            let headers = stream.headers();
            trusts = header_text(headers, TRUSTS_HEADER)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
            query_id = header_text(headers, QUERY_ID_HEADER);
            let mut got: Vec<RecordBatch> = stream.try_collect().await.map_err(refused)?;
            batches.append(&mut got);
        }
        Ok(Answer {
            schema,
            batches,
            trusts,
            query_id,
            elapsed: started.elapsed(),
        })
    }
}
