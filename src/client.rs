//! The analyst's side of Flight SQL: connect to a gateway, authenticate, run one query.

use std::time::{Duration, Instant};

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use arrow_flight::error::FlightError;
use arrow_flight::sql::client::FlightSqlServiceClient;
use futures::TryStreamExt;
use tally_common::flight::{PROJECT_HEADER, PURPOSE_HEADER, header_text, http_url};
use tally_gateway::{SUPPRESSED_HEADER, TRUSTS_HEADER};
use tonic::transport::{Channel, Endpoint};

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
    /// Groups dropped by disclosure control, as reported by the gateway.
    pub suppressed: usize,
    /// Round-trip time seen by the client.
    pub elapsed: Duration,
}

/// A failure the CLI reports to the analyst.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The gateway URL is malformed.
    #[error("invalid gateway url '{0}'")]
    Url(String),
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

fn refused(err: FlightError) -> ClientError {
    ClientError::Refused(match err {
        FlightError::Tonic(status) => status.message().to_string(),
        other => other.to_string(),
    })
}

impl AnalystClient {
    /// Connects to `url`; every call carries `token` as a bearer token.
    pub async fn connect(url: &str, token: &str) -> Result<Self, ClientError> {
        Self::connect_for(url, token, "", "").await
    }

    /// Connects to `url` for `project` and `purpose` (empty: the user's defaults).
    pub async fn connect_for(
        url: &str,
        token: &str,
        project: &str,
        purpose: &str,
    ) -> Result<Self, ClientError> {
        let channel = Endpoint::from_shared(http_url(url))
            .map_err(|_| ClientError::Url(url.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .connect()
            .await
            .map_err(|e| ClientError::Connect {
                url: url.to_string(),
                reason: e.to_string(),
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
        let mut suppressed = 0;
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
            suppressed = header_text(headers, SUPPRESSED_HEADER).parse().unwrap_or(0);
            let mut got: Vec<RecordBatch> = stream.try_collect().await.map_err(refused)?;
            batches.append(&mut got);
        }
        Ok(Answer {
            schema,
            batches,
            trusts,
            suppressed,
            elapsed: started.elapsed(),
        })
    }
}
