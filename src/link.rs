//! An emulated network link between the gateway and one site: a TCP proxy on loopback that
//! carries bytes no faster than a set rate in each direction, so that moving data costs what
//! it would between organisations rather than what loopback costs. TLS passes through it
//! untouched.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// Bytes a link may send ahead of its rate: small messages (a partial aggregate, a request)
/// pass without waiting for the timer, which cannot sleep for less than a millisecond.
const BURST: Duration = Duration::from_millis(1);

/// A listening proxy; dropping it closes the listener.
pub struct Link {
    /// Where to connect instead of the site.
    pub addr: SocketAddr,
    /// Bytes per second each way (an `f64`'s bits), read for every chunk.
    rate: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Link {
    /// Listens on a loopback port and forwards each connection to `site`, at most
    /// `mbit_per_s` megabits per second each way.
    pub async fn start(site: SocketAddr, mbit_per_s: f64) -> Result<Link, String> {
        let rate = Arc::new(AtomicU64::new(bytes_per_s(mbit_per_s)?.to_bits()));
        let listener = TcpListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .map_err(|e| e.to_string())?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let shared = rate.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let rate = shared.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = TcpStream::connect(site).await else {
                        return;
                    };
                    let _ = inbound.set_nodelay(true);
                    let _ = outbound.set_nodelay(true);
                    let (from_gateway, to_gateway) = inbound.into_split();
                    let (from_site, to_site) = outbound.into_split();
                    tokio::join!(
                        pace(from_gateway, to_site, &rate),
                        pace(from_site, to_gateway, &rate)
                    );
                });
            }
        });
        Ok(Link { addr, rate, task })
    }

    /// Changes the rate of every connection, open or to come (a link slowing down).
    pub fn set_rate(&self, mbit_per_s: f64) -> Result<(), String> {
        self.rate
            .store(bytes_per_s(mbit_per_s)?.to_bits(), Ordering::Relaxed);
        Ok(())
    }
}

fn bytes_per_s(mbit_per_s: f64) -> Result<f64, String> {
    if mbit_per_s.is_nan() || mbit_per_s <= 0.0 {
        return Err(format!(
            "a link needs a positive rate, not {mbit_per_s} Mbit/s"
        ));
    }
    Ok(mbit_per_s * 1e6 / 8.0)
}

impl Drop for Link {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Copies `from` to `to` no faster than `rate` bytes per second on average, then closes `to`.
async fn pace(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, rate: &AtomicU64) {
    let mut buffer = vec![0u8; 64 * 1024];
    let mut free_at = Instant::now();
    loop {
        let n = match from.read(&mut buffer).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let now = Instant::now();
        let bytes_per_s = f64::from_bits(rate.load(Ordering::Relaxed));
        free_at = free_at.max(now) + Duration::from_secs_f64(n as f64 / bytes_per_s);
        if free_at > now + BURST {
            tokio::time::sleep_until(free_at - BURST).await;
        }
        if to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}
