//! Starting and stopping a Flight SQL server on a TCP listener (port 0 picks a free port).

use std::net::SocketAddr;

use arrow_flight::flight_service_server::{FlightService, FlightServiceServer};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tonic::transport::server::TcpIncoming;

/// A Flight service running in the background.
pub struct RunningServer {
    /// The bound address (with the real port).
    pub addr: SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl RunningServer {
    /// Binds `addr` and serves `service` until stopped.
    pub async fn start<S: FlightService>(
        service: S,
        addr: SocketAddr,
        name: &'static str,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
        let (shutdown, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(FlightServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(err) = served {
                tracing::error!(server = name, error = %err, "server stopped");
            }
        });
        Ok(RunningServer {
            addr,
            shutdown: Some(shutdown),
            task,
        })
    }

    /// Stops accepting calls and waits until the listener is closed.
    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
    }

    /// Waits until the server stops (on error or `stop` from elsewhere).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}
