//! Dialing out: a node with a `[gateway]` section keeps one connection open to the gateway's
//! port for trusts (directly or through an HTTP CONNECT proxy), as the TLS client presenting
//! the trust's certificate, and serves Flight on it. When the connection ends it dials
//! again, waiting longer after each failure, with jitter so that trusts cut off together do
//! not all return at the same instant.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use tally_common::audit::AuditLog;
use tally_common::dialed::{DialedPeer, Proxy, WatchedStream};
use tally_common::tls::DialTls;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream;

use crate::config::{GatewayLink, NodeTlsConfig};
use crate::error::NodeError;
use crate::service::NodeAuditRecord;

/// The first wait after a failed attempt; each further failure doubles it, up to the
/// configured ceiling.
const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// A connection that stayed up this long was a success: the next wait starts again from
/// the first.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// How long opening the TCP connection (or the proxy's tunnel) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A connection the node dialed, as the Flight server receives it.
pub type DialedConnection = WatchedStream<TlsStream<TcpStream>>;

/// How the node reaches its gateway.
pub struct Dialer {
    address: String,
    proxy: Option<Proxy>,
    tls: DialTls,
    max_backoff: Duration,
}

impl Dialer {
    /// The dialer for `link`, with the node's certificate and CA from `tls`.
    pub fn new(link: &GatewayLink, tls: &NodeTlsConfig) -> Result<Self, NodeError> {
        let proxy = link
            .proxy
            .as_deref()
            .map(Proxy::parse)
            .transpose()
            .map_err(NodeError::Tls)?;
        let tls = DialTls::new(
            &tls.identity(),
            &tls.client_ca,
            &link.server_name(),
            tls.allowed_gateways.clone(),
        )
        .map_err(|e| NodeError::Tls(e.to_string()))?;
        Ok(Dialer {
            address: link.address.clone(),
            proxy,
            tls,
            max_backoff: link.max_backoff(),
        })
    }

    /// Keeps a connection to the gateway open, handing each new one to `serve`, until the
    /// server stops taking them. Connections and refused gateways go to `audit`.
    pub fn spawn(
        self,
        serve: mpsc::Sender<std::io::Result<DialedConnection>>,
        audit: Arc<AuditLog<NodeAuditRecord>>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut failures = 0u32;
            loop {
                match self.connect().await {
                    Ok((stream, peer)) => {
                        let (connection, closed) = WatchedStream::new(stream, peer.clone());
                        tracing::info!(gateway = %peer.identity, addr = %peer.addr, "connected to the gateway");
                        let _ =
                            audit.append(NodeAuditRecord::gateway_link(&peer, "connected", None));
                        if serve.send(Ok(connection)).await.is_err() {
                            return;
                        }
                        let up = Instant::now();
                        let _ = closed.await;
                        tracing::warn!(gateway = %peer.identity, "the connection to the gateway ended");
                        let _ = audit.append(NodeAuditRecord::gateway_link(
                            &peer,
                            "disconnected",
                            None,
                        ));
                        failures = if up.elapsed() >= STABLE_CONNECTION {
                            0
                        } else {
                            failures + 1
                        };
                    }
                    Err(Failure::Unreachable(reason)) => {
                        tracing::warn!(gateway = %self.address, %reason, "cannot reach the gateway");
                        failures = failures.saturating_add(1);
                    }
                    Err(Failure::Refused(peer, reason)) => {
                        tracing::error!(gateway = %self.address, %reason, "refused the gateway");
                        let _ = audit.append(NodeAuditRecord::gateway_link(
                            &peer,
                            "refused",
                            Some(reason),
                        ));
                        failures = failures.saturating_add(1);
                    }
                }
                tokio::time::sleep(backoff(failures, self.max_backoff)).await;
            }
        })
    }

    /// One attempt: TCP (or a proxy tunnel), then TLS with the gateway's identity checked.
    async fn connect(&self) -> Result<(TlsStream<TcpStream>, DialedPeer), Failure> {
        let unreachable = |e: std::io::Error| Failure::Unreachable(e.to_string());
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, async {
            match &self.proxy {
                Some(proxy) => proxy.tunnel(&self.address).await,
                None => TcpStream::connect(&self.address).await,
            }
        })
        .await
        .map_err(|_| Failure::Unreachable("the connection did not open in time".into()))?
        .map_err(unreachable)?;
        tcp.set_nodelay(true).map_err(unreachable)?;
        let addr = tcp.peer_addr().map_err(unreachable)?;
        let (tls, identity) = self.tls.connect(tcp).await.map_err(|reason| {
            Failure::Refused(
                DialedPeer {
                    addr,
                    identity: String::new(),
                },
                reason,
            )
        })?;
        Ok((tls, DialedPeer { addr, identity }))
    }
}

/// Why an attempt failed.
enum Failure {
    /// The network: nothing listening, a proxy refusing, a timeout.
    Unreachable(String),
    /// The other end is not a gateway this trust accepts (certificate, CA or identity).
    Refused(DialedPeer, String),
}

/// The wait after `failures` failed attempts in a row: half the ceiling for that count,
/// plus up to as much again at random.
fn backoff(failures: u32, max: Duration) -> Duration {
    let ceiling = FIRST_BACKOFF
        .saturating_mul(1u32 << failures.min(16))
        .min(max)
        .max(FIRST_BACKOFF);
    let half = ceiling / 2;
    half + half.mul_f64(rand::rng().random::<f64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_grow_with_failures_up_to_the_ceiling_with_jitter() {
        let max = Duration::from_secs(8);
        for _ in 0..100 {
            let first = backoff(0, max);
            assert!(
                first >= FIRST_BACKOFF / 2 && first <= FIRST_BACKOFF,
                "{first:?}"
            );
            let third = backoff(3, max);
            assert!(third >= Duration::from_secs(1) && third <= Duration::from_secs(2));
            let many = backoff(40, max);
            assert!(many >= max / 2 && many <= max, "{many:?}");
        }
        let waits: std::collections::BTreeSet<_> = (0..20).map(|_| backoff(5, max)).collect();
        assert!(waits.len() > 10, "jittered waits differ: {waits:?}");
    }
}
