//! TLS on Tally's two links, with rustls: gateway ↔ nodes is mutual TLS (a node accepts only
//! client certificates from its configured CA whose identity it lists as an allowed
//! gateway; the gateway checks each node's certificate against the trust's expected name;
//! a node that dials out is the TLS client and makes the same checks of the gateway's
//! certificate, and the gateway takes the trust's identity from the node's), and
//! analysts ↔ gateway is server-authenticated TLS.
//!
//! Servers complete handshakes themselves, off the accept loop, so that every refused
//! connection (no certificate, another CA, an identity not allowed) can be audited before
//! it is dropped; accepted streams are handed to tonic, which exposes the peer's
//! certificates on each request.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_rustls::client::TlsStream as ClientTlsStream;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::ServerName;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

/// How long a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes a server completes at once; further connections wait to be accepted.
const MAX_HANDSHAKES: usize = 256;

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateFiles {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

impl CertificateFiles {
    /// Makes relative paths relative to `base` (the config file's folder).
    pub fn resolve(&mut self, base: &Path) {
        for path in [&mut self.cert, &mut self.key] {
            if path.is_relative() {
                *path = base.join(&*path);
            }
        }
    }
}

/// A TLS set-up that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file is missing or unreadable.
    #[error("{}: {reason}", path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The certificates and keys do not make a valid configuration.
    #[error("TLS configuration: {0}")]
    Config(String),
    /// Plaintext was asked for off loopback.
    #[error(
        "{0} is not a loopback address: without TLS Tally only listens on and connects to loopback (--insecure-loopback)"
    )]
    NotLoopback(String),
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn file_error(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// Reads every certificate of a PEM file.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(path, e))?;
    if certs.is_empty() {
        return Err(file_error(path, "no PEM certificate in the file"));
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| file_error(path, e))
}

fn read_pem(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|e| file_error(path, e))
}

/// How a server accepts TLS connections.
#[derive(Clone)]
pub struct ServerTls {
    acceptor: TlsAcceptor,
    /// Client identities accepted (mutual TLS only).
    allowed_clients: Option<Arc<Vec<String>>>,
    /// What an accepted client is, for refusals ("an allowed gateway").
    accepted: &'static str,
}

impl ServerTls {
    /// Server-authenticated TLS (the analysts' side of the gateway).
    pub fn server_only(identity: &CertificateFiles) -> Result<Self, TlsError> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_no_client_auth()
            .with_single_cert(read_certificates(&identity.cert)?, read_key(&identity.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Self::from_config(config, None, "a client"))
    }

    /// Mutual TLS (a node, or the gateway's port for trusts that dial in): client
    /// certificates must chain to `client_ca` and name one of `allowed_clients`, which are
    /// `accepted` (e.g. "an allowed gateway", for the refusal's reason).
    pub fn mutual(
        identity: &CertificateFiles,
        client_ca: &Path,
        allowed_clients: Vec<String>,
        accepted: &'static str,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(client_ca)? {
            roots
                .add(cert)
                .map_err(|e| file_error(client_ca, format!("not a usable CA certificate: {e}")))?;
        }
        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .build()
            .map_err(|e| TlsError::Config(e.to_string()))?;
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(read_certificates(&identity.cert)?, read_key(&identity.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        Ok(Self::from_config(config, Some(allowed_clients), accepted))
    }

    fn from_config(
        mut config: ServerConfig,
        allowed: Option<Vec<String>>,
        accepted: &'static str,
    ) -> Self {
        config.alpn_protocols = vec![b"h2".to_vec()];
        ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            allowed_clients: allowed.map(Arc::new),
            accepted,
        }
    }

    /// Completes the handshake and checks the client's identity against the allowed list.
    async fn accept(&self, tcp: TcpStream) -> Result<TlsStream<TcpStream>, RefusalReason> {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(tcp))
            .await
            .map_err(|_| RefusalReason::plain("the TLS handshake did not finish in time"))?
            .map_err(|e| RefusalReason::plain(handshake_failure(&e)))?;
        if let Some(allowed) = &self.allowed_clients {
            let identity = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(certificate_identity);
            match identity {
                Some(name) if allowed.contains(&name) => {}
                Some(name) => {
                    return Err(RefusalReason {
                        reason: format!("certificate identity '{name}' is not {}", self.accepted),
                        identity: Some(name),
                    });
                }
                None => {
                    return Err(RefusalReason::plain(
                        "the client certificate names no identity",
                    ));
                }
            }
        }
        Ok(tls)
    }
}

/// Why a connection was refused.
struct RefusalReason {
    reason: String,
    identity: Option<String>,
}

impl RefusalReason {
    fn plain(reason: impl Into<String>) -> Self {
        RefusalReason {
            reason: reason.into(),
            identity: None,
        }
    }
}

/// A connection a server refused, for its audit log.
#[derive(Debug, Clone)]
pub struct RefusedConnection {
    /// The client's address.
    pub peer: SocketAddr,
    /// The identity its certificate named, when it presented a valid one.
    pub identity: Option<String>,
    /// Why it was refused.
    pub reason: String,
}

/// Called for every refused connection.
pub type OnRefused = Arc<dyn Fn(RefusedConnection) + Send + Sync>;

/// Describes a failed handshake in words a trust's operator can act on.
fn handshake_failure(err: &std::io::Error) -> String {
    use rustls::{CertificateError, Error};
    match err.get_ref().and_then(|e| e.downcast_ref::<Error>()) {
        Some(Error::NoCertificatesPresented) => "the client presented no certificate".into(),
        Some(Error::InvalidCertificate(
            CertificateError::UnknownIssuer | CertificateError::BadSignature,
        )) => "the client certificate is not signed by the trusted CA".into(),
        Some(Error::InvalidCertificate(CertificateError::Expired))
        | Some(Error::InvalidCertificate(CertificateError::ExpiredContext { .. })) => {
            "the client certificate has expired".into()
        }
        Some(Error::InvalidCertificate(other)) => {
            format!("the client certificate is not valid: {other:?}")
        }
        Some(other) => format!("TLS handshake failed: {other}"),
        None => format!("TLS handshake failed: {err}"),
    }
}

/// The incoming stream tonic serves: accepted TLS connections.
pub type TlsIncoming = ReceiverStream<std::io::Result<TlsStream<TcpStream>>>;

/// Accepts connections on `listener` and completes their handshakes in the background;
/// refused connections go to `on_refused`. The task ends when the stream is dropped.
pub fn accept_tls(
    listener: TcpListener,
    tls: ServerTls,
    on_refused: OnRefused,
) -> (TlsIncoming, JoinHandle<()>) {
    let (sender, receiver) = mpsc::channel(64);
    let handshakes = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
    let task = tokio::spawn(async move {
        loop {
            // At most MAX_HANDSHAKES at once: a flood of connections that never finish
            // their handshake waits here instead of using up the process's descriptors.
            let Ok(permit) = handshakes.clone().acquire_owned().await else {
                return;
            };
            let (tcp, peer) = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        tracing::warn!(error = %err, "accept failed");
                        // Out of descriptors, say: let connections close before trying again.
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = sender.closed() => return,
            };
            let _ = tcp.set_nodelay(true);
            let (tls, sender, on_refused) = (tls.clone(), sender.clone(), on_refused.clone());
            tokio::spawn(async move {
                let accepted = tls.accept(tcp).await;
                drop(permit);
                match accepted {
                    Ok(stream) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Err(refusal) => {
                        tracing::info!(%peer, reason = %refusal.reason, "connection refused");
                        on_refused(RefusedConnection {
                            peer,
                            identity: refusal.identity,
                            reason: refusal.reason,
                        });
                    }
                }
            });
        }
    });
    (ReceiverStream::new(receiver), task)
}

/// The identity a certificate names: its subject common name.
pub fn certificate_identity(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let name = parsed
        .subject()
        .iter_common_name()
        .next()?
        .as_str()
        .ok()?
        .to_string();
    Some(name)
}

/// How a node dials the gateway: TLS as the client, presenting the trust's certificate,
/// expecting the gateway's name in a certificate from `ca` whose identity is allowed.
#[derive(Clone)]
pub struct DialTls {
    connector: TlsConnector,
    server_name: ServerName<'static>,
    allowed_servers: Arc<Vec<String>>,
}

impl DialTls {
    /// Client TLS with `identity`, trusting `ca`, for a server named `server_name` (a DNS
    /// name or an IP address) whose certificate's identity is one of `allowed_servers`.
    pub fn new(
        identity: &CertificateFiles,
        ca: &Path,
        server_name: &str,
        allowed_servers: Vec<String>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for cert in read_certificates(ca)? {
            roots
                .add(cert)
                .map_err(|e| file_error(ca, format!("not a usable CA certificate: {e}")))?;
        }
        let mut config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Config(e.to_string()))?
            .with_root_certificates(roots)
            .with_client_auth_cert(read_certificates(&identity.cert)?, read_key(&identity.key)?)
            .map_err(|e| TlsError::Config(e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let server_name = ServerName::try_from(server_name.to_string())
            .map_err(|_| TlsError::Config(format!("'{server_name}' is not a server name")))?;
        Ok(DialTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            allowed_servers: Arc::new(allowed_servers),
        })
    }

    /// Completes the handshake over `tcp` and returns the stream with the identity the
    /// server's certificate names; fails with a reason an operator can act on.
    pub async fn connect(
        &self,
        tcp: TcpStream,
    ) -> Result<(ClientTlsStream<TcpStream>, String), String> {
        let tls = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            self.connector.connect(self.server_name.clone(), tcp),
        )
        .await
        .map_err(|_| "the TLS handshake did not finish in time".to_string())?
        .map_err(|e| format!("TLS handshake failed: {e}"))?;
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(certificate_identity)
            .ok_or_else(|| "the server certificate names no identity".to_string())?;
        if !self.allowed_servers.contains(&identity) {
            return Err(format!(
                "the server's certificate identity '{identity}' is not an allowed gateway"
            ));
        }
        Ok((tls, identity))
    }
}

/// Client TLS for a tonic channel: trust `ca`, expect `server_name` in the server's
/// certificate, and present `identity` when given (mutual TLS).
pub fn client_tls(
    ca: &Path,
    identity: Option<&CertificateFiles>,
    server_name: &str,
) -> Result<ClientTlsConfig, TlsError> {
    read_certificates(ca)?;
    let mut config = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read_pem(ca)?))
        .domain_name(server_name);
    if let Some(identity) = identity {
        read_certificates(&identity.cert)?;
        read_key(&identity.key)?;
        config = config.identity(Identity::from_pem(
            read_pem(&identity.cert)?,
            read_pem(&identity.key)?,
        ));
    }
    Ok(config)
}

/// Refuses plaintext anywhere but loopback: `host` is an IP address or `localhost`.
pub fn require_loopback(host: &str) -> Result<(), TlsError> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let loopback = bare.eq_ignore_ascii_case("localhost")
        || bare
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if loopback {
        Ok(())
    } else {
        Err(TlsError::NotLoopback(host.to_string()))
    }
}
