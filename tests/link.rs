//! The benchmark's emulated network link: every byte arrives, in order, both ways, and no
//! faster than the link's rate.

use std::time::Instant;

use tally::link::Link;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An echo server on loopback.
async fn echo_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((socket, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = socket.into_split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_carries_every_byte_both_ways_no_faster_than_its_rate() {
    let site = echo_server().await;
    let link = Link::start(site, 80.0).await.unwrap();
    let stream = TcpStream::connect(link.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let sent: Vec<u8> = (0..1_000_000u32).map(|n| (n % 251) as u8).collect();
    let started = Instant::now();
    let to_send = sent.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&to_send).await.unwrap();
        write.shutdown().await.unwrap();
    });
    let mut received = Vec::new();
    read.read_to_end(&mut received).await.unwrap();
    writer.await.unwrap();
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(received.len(), sent.len());
    assert!(received == sent, "bytes arrive intact and in order");
    // 1,000,000 bytes at 80 Mbit/s take 0.1 s each way; each way may burst 1 ms ahead.
    assert!(
        elapsed >= 0.09,
        "{elapsed:.3} s is faster than the link allows"
    );

    for rate in [0.0, -5.0, f64::NAN] {
        assert!(Link::start(site, rate).await.is_err(), "rate {rate}");
    }
}
