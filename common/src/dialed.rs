//! Connections a node dials out to the gateway, for trusts whose network allows no inbound
//! connection. The node opens TCP (through an HTTP CONNECT proxy when the trust has one) and
//! TLS as the client, presenting the trust's certificate; then the roles turn round: the
//! node serves Flight on that connection and the gateway calls it, as it would call a node
//! it had dialed itself.
//!
//! Both ends hold the connection as a [`WatchedStream`], which says when the HTTP/2 layer
//! above it has let it go, so that the node can dial again and the gateway can mark the
//! trust as gone.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{
    AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf,
};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

/// How often each end of a dialed connection pings the other over HTTP/2, so that idle
/// firewalls keep the connection open and a dead one is noticed.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// How long a ping may go unanswered before the connection is taken as dead.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// The longest status line and headers an HTTP CONNECT proxy may answer with.
const MAX_PROXY_REPLY: usize = 8 * 1024;

/// Who is at the other end of a dialed connection, for the audit logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DialedPeer {
    /// The other end's network address (the proxy's, when there is one).
    pub addr: SocketAddr,
    /// The identity (certificate common name) the other end proved in the handshake.
    pub identity: String,
}

/// A connection that reports when it is dropped: when the HTTP/2 connection above it ends,
/// for whatever reason (closed by either end, failed keepalive, a broken link).
pub struct WatchedStream<S> {
    inner: S,
    peer: DialedPeer,
    _closed: oneshot::Sender<()>,
}

impl<S> WatchedStream<S> {
    /// Wraps `inner`, a connection to `peer`; the receiver completes when it is dropped.
    pub fn new(inner: S, peer: DialedPeer) -> (Self, oneshot::Receiver<()>) {
        let (closed, watch) = oneshot::channel();
        (
            WatchedStream {
                inner,
                peer,
                _closed: closed,
            },
            watch,
        )
    }

    /// Who is at the other end.
    pub fn peer(&self) -> &DialedPeer {
        &self.peer
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for WatchedStream<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for WatchedStream<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The node serves Flight on the connections it dialed; each request carries the gateway
/// it came from as its connect info.
impl<S> tonic::transport::server::Connected for WatchedStream<S> {
    type ConnectInfo = DialedPeer;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.peer.clone()
    }
}

/// An HTTP CONNECT proxy a node reaches the gateway through.
#[derive(Clone, PartialEq, Eq)]
pub struct Proxy {
    /// `host:port` of the proxy.
    pub authority: String,
    /// `user:password` for Basic proxy authentication, when the URL has them.
    credentials: Option<String>,
}

/// Never shows the proxy's password.
impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("authority", &self.authority)
            .field("credentials", &self.credentials.as_ref().map(|_| "***"))
            .finish()
    }
}

/// `url` without the user and password it may carry, for messages.
fn without_credentials(url: &str) -> String {
    match (url.split_once("://"), url.rsplit_once('@')) {
        (Some((scheme, _)), Some((_, host))) => format!("{scheme}://***@{host}"),
        (None, _) | (_, None) => url.to_string(),
    }
}

impl Proxy {
    /// Parses `http://[user:password@]host:port`.
    pub fn parse(url: &str) -> Result<Self, String> {
        let shown = without_credentials(url);
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("proxy '{shown}' must be an http:// URL (HTTP CONNECT)"))?;
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let (credentials, authority) = match rest.rsplit_once('@') {
            Some((credentials, authority)) => (Some(credentials.to_string()), authority),
            None => (None, rest),
        };
        if !has_port(authority) || authority.contains('/') {
            return Err(format!("proxy '{shown}' must be http://host:port"));
        }
        Ok(Proxy {
            authority: authority.to_string(),
            credentials,
        })
    }

    /// Opens a tunnel to `target` (`host:port`) through the proxy.
    pub async fn tunnel(&self, target: &str) -> io::Result<TcpStream> {
        let mut tcp = TcpStream::connect(&self.authority).await?;
        tcp.set_nodelay(true)?;
        let mut request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
        if let Some(credentials) = &self.credentials {
            let encoded = base64::engine::general_purpose::STANDARD.encode(credentials);
            request.push_str(&format!("Proxy-Authorization: Basic {encoded}\r\n"));
        }
        request.push_str("\r\n");
        tcp.write_all(request.as_bytes()).await?;
        // Read the reply a line at a time so that nothing after its blank line (the start
        // of the TLS handshake) is consumed.
        let mut reader = BufReader::with_capacity(1, &mut tcp);
        let mut status = String::new();
        let mut read = 0;
        let mut line = String::new();
        loop {
            line.clear();
            let n = (&mut reader)
                .take((MAX_PROXY_REPLY - read) as u64)
                .read_line(&mut line)
                .await?;
            read += n;
            if n == 0 || read >= MAX_PROXY_REPLY {
                return Err(io::Error::other(
                    "the proxy closed the connection or sent an over-long reply",
                ));
            }
            if status.is_empty() {
                status = line.trim_end().to_string();
            } else if line == "\r\n" || line == "\n" {
                break;
            }
        }
        let code = status.split_whitespace().nth(1).unwrap_or_default();
        if !status.starts_with("HTTP/1.") || code != "200" {
            return Err(io::Error::other(format!(
                "the proxy refused the tunnel: {status}"
            )));
        }
        Ok(tcp)
    }
}

/// Whether `authority` ends in `:port`.
pub fn has_port(authority: &str) -> bool {
    authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxy_urls_are_parsed_or_refused_with_the_reason() {
        let plain = Proxy::parse("http://proxy.trust.nhs.uk:3128").unwrap();
        assert_eq!(plain.authority, "proxy.trust.nhs.uk:3128");
        assert_eq!(plain.credentials, None);
        let with_user = Proxy::parse("http://ops:s3cret@10.0.0.1:8080/").unwrap();
        assert_eq!(with_user.authority, "10.0.0.1:8080");
        assert_eq!(with_user.credentials.as_deref(), Some("ops:s3cret"));
        for bad in [
            "https://proxy:3128",
            "proxy:3128",
            "http://proxy",
            "http://proxy:99999",
        ] {
            let err = Proxy::parse(bad).unwrap_err();
            assert!(err.contains(bad), "{err}");
        }
        let err = Proxy::parse("http://ops:s3cret@proxy").unwrap_err();
        assert!(
            !err.contains("s3cret") && err.contains("***@proxy"),
            "{err}"
        );
        assert!(!format!("{with_user:?}").contains("s3cret"));
    }

    #[tokio::test]
    async fn a_tunnel_is_opened_only_on_a_200_reply() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let authority = listener.local_addr().unwrap().to_string();
        let proxy = Proxy::parse(&format!("http://u:p@{authority}")).unwrap();
        let serve = tokio::spawn(async move {
            let mut requests = Vec::new();
            for reply in [
                "HTTP/1.1 200 Connection established\r\nVia: test\r\n\r\nTLS",
                "HTTP/1.1 407 Proxy Authentication Required\r\n\r\n",
            ] {
                let (mut tcp, _) = listener.accept().await.unwrap();
                let mut request = vec![0u8; 1024];
                let n = tcp.read(&mut request).await.unwrap();
                requests.push(String::from_utf8_lossy(&request[..n]).to_string());
                tcp.write_all(reply.as_bytes()).await.unwrap();
            }
            requests
        });
        let mut tunnel = proxy.tunnel("gateway.example:7443").await.unwrap();
        let mut after = [0u8; 3];
        tunnel.read_exact(&mut after).await.unwrap();
        assert_eq!(&after, b"TLS", "bytes after the reply are left for TLS");
        let refused = proxy.tunnel("gateway.example:7443").await.unwrap_err();
        assert!(refused.to_string().contains("407"), "{refused}");
        let requests = serve.await.unwrap();
        assert!(requests[0].starts_with("CONNECT gateway.example:7443 HTTP/1.1\r\n"));
        assert!(requests[0].contains("Proxy-Authorization: Basic dTpw\r\n"));
    }
}
