//! Trusts that dial in: the gateway's port for nodes whose network takes no inbound
//! connection. A node connects as the TLS client with the trust's certificate; the gateway
//! takes the trust's identity from that certificate alone, then calls the node's Flight
//! service down the node's own connection, as it calls a node it dials. A trust's newest
//! connection replaces its last; when one ends the trust is marked unavailable until its
//! node dials again. Every connection, refusal and disconnection is audited.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::StreamExt;
use hyper_util::rt::TokioIo;
use tally_common::admission::RequestIdentity;
use tally_common::audit::{AuditLog, now_millis};
use tally_common::dialed::{DialedPeer, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, WatchedStream};
use tally_common::tls::{
    CertificateFiles, RefusedConnection, ServerTls, accept_tls, certificate_identity,
};
use tally_common::{ErrorCode, TallyError};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::server::TlsStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::catalogue::Catalogue;
use crate::config::TrustPortConfig;
use crate::engine::GatewayAuditRecord;
use crate::error::GatewayError;

/// A dialed-in connection, as the gateway's client side holds it.
type TrustConnection = WatchedStream<TlsStream<TcpStream>>;

/// One dialing-in trust's current connection, if it has one.
#[derive(Debug)]
pub struct DialIn {
    code: String,
    current: Mutex<Option<(u64, Channel)>>,
    connections: AtomicU64,
}

impl DialIn {
    /// A trust (`code`) with no connection yet.
    pub fn new(code: &str) -> Self {
        DialIn {
            code: code.to_string(),
            current: Mutex::new(None),
            connections: AtomicU64::new(0),
        }
    }

    /// The channel over the trust's current connection.
    pub fn channel(&self) -> Result<Channel, TallyError> {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(_, channel)| channel.clone())
            .ok_or_else(|| {
                TallyError::new(
                    ErrorCode::TrustUnavailable,
                    format!(
                        "trust {}'s node dials in and has no connection open",
                        self.code
                    ),
                )
            })
    }

    /// Makes `channel` the trust's connection; returns its number.
    fn install(&self, channel: Channel) -> u64 {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        let number = self.connections.fetch_add(1, Ordering::Relaxed);
        *current = Some((number, channel));
        number
    }

    /// Drops the current connection.
    fn close(&self) {
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Forgets connection `number`, unless a newer one has replaced it.
    fn remove(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|(n, _)| *n == number) {
            *current = None;
        }
    }
}

/// The trusts that dial in, by the certificate identity each must present.
pub type DialIns = Vec<(String, Arc<DialIn>)>;

/// The gateway's port for trusts, accepting the nodes' connections in the background.
pub struct TrustPort {
    /// The bound address (with the real port when configured with port 0).
    pub addr: SocketAddr,
    trusts: DialIns,
    acceptor: JoinHandle<()>,
    receiver: JoinHandle<()>,
}

impl TrustPort {
    /// Binds `config.listen` and accepts the nodes of `trusts`. Each connection's channel
    /// times out calls after `request_timeout`; the catalogue is refreshed as trusts come
    /// and go.
    pub async fn start(
        config: &TrustPortConfig,
        trusts: DialIns,
        catalogue: Arc<Catalogue>,
        audit: Arc<AuditLog<GatewayAuditRecord>>,
        connect_timeout: Duration,
        request_timeout: Duration,
    ) -> Result<Self, GatewayError> {
        let tls = ServerTls::mutual(
            &CertificateFiles {
                cert: config.cert.clone(),
                key: config.key.clone(),
            },
            &config.ca,
            trusts.iter().map(|(name, _)| name.clone()).collect(),
            "a trust that dials in",
        )
        .map_err(|e| GatewayError::Tls(format!("[trust_port]: {e}")))?;
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| GatewayError::Bind {
                    addr: config.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
            addr: config.listen,
            source,
        })?;
        let refusals = audit.clone();
        // Written by the audit log's group commit, off the handshake's task.
        let on_refused = Arc::new(move |refused: RefusedConnection| {
            let record = trust_link(
                &refused.peer,
                None,
                "refused",
                Some(ErrorCode::ClientCertificate),
                Some(refused.reason),
            );
            let refusals = refusals.clone();
            tokio::spawn(async move {
                let _ = refusals.write(record).await;
            });
        });
        let (mut incoming, acceptor) = accept_tls(listener, tls, on_refused);
        let taker = Arc::new(Taker {
            trusts: trusts.clone(),
            catalogue,
            audit,
            connect_timeout,
            request_timeout,
        });
        // Each connection is served by a task of this set, so that stopping the port ends
        // them all.
        let receiver = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            loop {
                tokio::select! {
                    accepted = incoming.next() => match accepted {
                        Some(Ok(stream)) => {
                            connections.spawn(taker.clone().take(stream));
                        }
                        Some(Err(_)) => {}
                        None => return,
                    },
                    Some(_) = connections.join_next() => {}
                }
            }
        });
        tracing::info!(%addr, "gateway accepting trusts that dial in");
        Ok(TrustPort {
            addr,
            trusts,
            acceptor,
            receiver,
        })
    }

    /// Stops accepting and closes the trusts' connections.
    pub fn stop(&self) {
        self.acceptor.abort();
        self.receiver.abort();
        for (_, trust) in &self.trusts {
            trust.close();
        }
    }
}

/// What taking a new connection needs.
struct Taker {
    trusts: DialIns,
    catalogue: Arc<Catalogue>,
    audit: Arc<AuditLog<GatewayAuditRecord>>,
    connect_timeout: Duration,
    request_timeout: Duration,
}

impl Taker {
    /// Opens a channel over an accepted connection and makes it its trust's, then waits for
    /// the connection to end and marks the trust gone.
    async fn take(self: Arc<Self>, stream: TlsStream<TcpStream>) {
        let Ok(peer_addr) = stream.get_ref().0.peer_addr() else {
            return;
        };
        let identity = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(certificate_identity)
            .unwrap_or_default();
        let Some((_, trust)) = self.trusts.iter().find(|(name, _)| *name == identity) else {
            // The handshake only accepts the listed identities.
            return;
        };
        let peer = DialedPeer {
            addr: peer_addr,
            identity,
        };
        let (connection, closed) = WatchedStream::new(stream, peer.clone());
        let channel = Endpoint::from_static("http://dialed-in.trust")
            .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
            .keep_alive_timeout(KEEPALIVE_TIMEOUT)
            .keep_alive_while_idle(true)
            .timeout(self.request_timeout)
            .connect_timeout(self.connect_timeout)
            .connect_with_connector(OneConnection(Some(connection)))
            .await;
        let channel = match channel {
            Ok(channel) => channel,
            Err(err) => {
                tracing::warn!(trust = %trust.code, error = %err, "a dialed-in connection failed to start");
                let _ = self
                    .audit
                    .write(trust_link(
                        &peer.addr,
                        Some(&trust.code),
                        "failed",
                        Some(ErrorCode::TrustProtocol),
                        Some("the HTTP/2 connection did not start".into()),
                    ))
                    .await;
                return;
            }
        };
        // On record before any query can use it; a connection that cannot be audited is
        // not used.
        let recorded = self
            .audit
            .write(trust_link(
                &peer.addr,
                Some(&trust.code),
                "connected",
                None,
                None,
            ))
            .await;
        if recorded.is_err() {
            return;
        }
        let number = trust.install(channel);
        tracing::info!(trust = %trust.code, addr = %peer.addr, "trust connected");
        self.catalogue.refresh().await;
        let _ = closed.await;
        trust.remove(number);
        tracing::warn!(trust = %trust.code, "trust disconnected");
        let _ = self
            .audit
            .write(trust_link(
                &peer.addr,
                Some(&trust.code),
                "disconnected",
                None,
                None,
            ))
            .await;
        self.catalogue.refresh().await;
    }
}

/// A connector that hands tonic one connection, the one the node dialed; asked again (the
/// connection has ended), it fails, and the trust waits for its node to dial anew.
struct OneConnection(Option<TrustConnection>);

impl tower_service::Service<Uri> for OneConnection {
    type Response = TokioIo<TrustConnection>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Uri) -> Self::Future {
        std::future::ready(self.0.take().map(TokioIo::new).ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "the trust's connection has ended",
            )
        }))
    }
}

/// The audit record of a trust's node connecting, being refused, failing or going.
fn trust_link(
    peer: &SocketAddr,
    trust: Option<&str>,
    outcome: &'static str,
    code: Option<ErrorCode>,
    detail: Option<String>,
) -> GatewayAuditRecord {
    GatewayAuditRecord {
        time_ms: now_millis(),
        query_id: "-".into(),
        step: "dial-in",
        peer: peer.to_string(),
        identity: RequestIdentity::default(),
        sql: String::new(),
        policy_version: None,
        obligations: None,
        releases: Vec::new(),
        release_sql: Vec::new(),
        trusts: trust.map(str::to_string).into_iter().collect(),
        outcome,
        codes: code.iter().map(ToString::to_string).collect(),
        rows: None,
        rows_from_trusts: None,
        bytes_from_trusts: None,
        rho_charged: None,
        duration_ms: 0.0,
        detail,
    }
}
