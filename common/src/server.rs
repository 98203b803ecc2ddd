//! Starting and stopping a Flight SQL server on a TCP listener (port 0 picks a free port),
//! with TLS, or in plaintext on loopback only; or on connections the server dialed itself.

use std::net::SocketAddr;

use arrow_flight::flight_service_server::FlightService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::{Connected, TcpIncoming};

use crate::dialed::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT};
use crate::front_door::TypedGrpc;
use crate::tls::{OnRefused, ServerTls, accept_tls, require_loopback};

/// How a server talks to its clients.
pub enum Transport {
    /// TLS (mutual when the [`ServerTls`] asks for client certificates); refused
    /// connections are reported to the callback.
    Tls(ServerTls, OnRefused),
    /// Plaintext, allowed on loopback addresses only (`--insecure-loopback`).
    InsecureLoopback,
}

/// A Flight service running in the background.
pub struct RunningServer {
    /// The bound address (with the real port).
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
    acceptor: Option<JoinHandle<()>>,
}

impl RunningServer {
    /// Binds `addr` and serves `service` over `transport` until stopped.
    pub async fn start<S: FlightService>(
        service: S,
        addr: SocketAddr,
        name: &'static str,
        transport: Transport,
    ) -> std::io::Result<Self> {
        if matches!(transport, Transport::InsecureLoopback) {
            require_loopback(&addr.ip().to_string())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        }
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let (shutdown, stopped) = oneshot::channel::<()>();
        let stopped = async {
            let _ = stopped.await;
        };
        let server = tonic::transport::Server::builder().add_service(TypedGrpc::new(service));
        let (task, acceptor) = match transport {
            Transport::Tls(tls, on_refused) => {
                let (incoming, acceptor) = accept_tls(listener, tls, on_refused);
                let serving = server.serve_with_incoming_shutdown(incoming, stopped);
                (tokio::spawn(report(serving, name)), Some(acceptor))
            }
            Transport::InsecureLoopback => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                let serving = server.serve_with_incoming_shutdown(incoming, stopped);
                (tokio::spawn(report(serving, name)), None)
            }
        };
        Ok(RunningServer {
            addr,
            shutdown: Some(shutdown),
            task,
            acceptor,
        })
    }

    /// Stops accepting calls and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(acceptor) = self.acceptor.take() {
            acceptor.abort();
        }
    }

    /// Waits until the server stops (on error or `stop` from elsewhere).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// A Flight service served on connections it is handed rather than on a listener: those a
/// node dialed to its gateway.
pub struct DialedServer {
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl DialedServer {
    /// Serves `service` on the connections sent to `connections`, pinging each over HTTP/2
    /// so that idle firewalls keep it open and a dead one ends.
    pub fn start<S, IO>(
        service: S,
        connections: mpsc::Receiver<std::io::Result<IO>>,
        name: &'static str,
    ) -> Self
    where
        S: FlightService,
        IO: AsyncRead + AsyncWrite + Connected + Unpin + Send + 'static,
        IO::ConnectInfo: Clone + Send + Sync + 'static,
    {
        let (shutdown, stopped) = oneshot::channel::<()>();
        let serving = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(KEEPALIVE_INTERVAL))
            .http2_keepalive_timeout(Some(KEEPALIVE_TIMEOUT))
            .add_service(TypedGrpc::new(service))
            .serve_with_incoming_shutdown(ReceiverStream::new(connections), async {
                let _ = stopped.await;
            });
        DialedServer {
            shutdown: Some(shutdown),
            task: tokio::spawn(report(serving, name)),
        }
    }

    /// Stops serving: calls in flight finish, then the connections close.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }
}

/// Awaits a server and logs why it stopped, if it failed.
async fn report(
    serving: impl Future<Output = Result<(), tonic::transport::Error>>,
    name: &'static str,
) {
    if let Err(err) = serving.await {
        tracing::error!(server = name, error = %err, "server stopped");
    }
}
