//! Trusts whose network takes no inbound connection: their node dials the gateway's port
//! for trusts (through an HTTP CONNECT proxy if need be) and serves Flight on that
//! connection. It listens nowhere, comes back after the gateway restarts, fails a query
//! cleanly when its connection drops mid-query, and only a certificate of the right CA for
//! a trust that dials in is let in; every refusal is audited.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tally::client::AnalystClient;
use tally::federation;
use tally_gateway::GatewayHandle;
use tally_node::NodeConfig;
use tally_synth::{TrustSpec, default_trusts};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{
    analyst, analyst_token, certs, data_dir, fresh_state, gateway_config, gateway_target,
    identity_provider, init_logging, open_policies, spawn_gateway, start_federation, tally,
};

const SQL: &str = "SELECT sex, COUNT(*) AS n FROM patients GROUP BY sex ORDER BY sex";

/// The config of `trust`'s node dialing the gateway's port for trusts at `port`.
fn dialing_node(trust: &TrustSpec, port: SocketAddr) -> NodeConfig {
    let mut config = federation::node_config(
        data_dir(),
        trust,
        &open_policies(),
        &crate::support::tls(),
        &identity_provider(),
        &fresh_state(),
    );
    config.listen = None;
    config.gateway = Some(federation::dialing_out_to(port));
    config
}

/// A gateway whose only trust, `trust`, dials in.
async fn gateway_for_dialing(trust: &TrustSpec) -> GatewayHandle {
    let mut config = gateway_config(&[], &open_policies());
    federation::dial_in(&mut config, trust.code, trust.name, certs());
    tally_gateway::start(&config).await.expect("gateway starts")
}

async fn client_of(gateway: &GatewayHandle) -> AnalystClient {
    AnalystClient::connect(&gateway_target(gateway.addr), &analyst_token())
        .await
        .expect("analyst connects")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_listens_nowhere_answers_through_the_gateway() {
    let local = start_federation().await;
    let dialing = default_trusts().last().unwrap().code;
    assert!(
        local.nodes.last().unwrap().listen_addr.is_none(),
        "the federation's last trust only dials out"
    );
    let mut client = analyst(&local).await;
    let answer = client
        .query("SELECT trust_code, COUNT(*) AS n FROM patients GROUP BY trust_code ORDER BY trust_code")
        .await
        .expect("answered");
    assert!(
        answer.trusts.iter().any(|t| t == dialing),
        "{:?}",
        answer.trusts
    );
    let codes: Vec<String> = crate::support::rows(&answer.batches)
        .iter()
        .map(|row| row[0].to_string())
        .collect();
    assert!(codes.contains(&dialing.to_string()), "{codes:?}");
    local.stop().await;
}

/// A TCP relay between a dialing node and the gateway that can be told to cut its
/// connections just after the next bytes from the gateway (a query) reach the node.
struct Relay {
    addr: SocketAddr,
    armed: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    async fn start(upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let armed = Arc::new(AtomicBool::new(false));
        let trigger = armed.clone();
        let task = tokio::spawn(async move {
            while let Ok((node, _)) = listener.accept().await {
                let Ok(gateway) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let trigger = trigger.clone();
                tokio::spawn(async move {
                    let (mut from_node, mut to_node) = node.into_split();
                    let (mut from_gateway, mut to_gateway) = gateway.into_split();
                    let up = async {
                        let _ = tokio::io::copy(&mut from_node, &mut to_gateway).await;
                    };
                    let down = async {
                        let mut buffer = vec![0u8; 64 * 1024];
                        loop {
                            let n = match from_gateway.read(&mut buffer).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if to_node.write_all(&buffer[..n]).await.is_err() {
                                return;
                            }
                            if trigger.swap(false, Ordering::SeqCst) {
                                // The query reached the node: cut before its answer returns.
                                return;
                            }
                        }
                    };
                    tokio::select! { () = up => {}, () = down => {} }
                });
            }
        });
        Relay { addr, armed, task }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_dropped_mid_query_fails_the_query_cleanly_and_the_node_dials_again() {
    init_logging();
    let trust = &default_trusts()[1];
    let gateway = gateway_for_dialing(trust).await;
    let relay = Relay::start(gateway.trust_port_addr.unwrap()).await;
    let node = tally_node::start(&dialing_node(trust, relay.addr))
        .await
        .unwrap();
    assert!(gateway.wait_for_trusts(Duration::from_secs(10)).await);
    let mut client = client_of(&gateway).await;
    let before = client.query(SQL).await.expect("answered before the cut");

    relay.armed.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let cut = client
        .query("SELECT admission_method, COUNT(*) AS n FROM episodes GROUP BY admission_method")
        .await;
    let waited = started.elapsed();
    let message = match cut {
        Ok(_) => panic!("a query whose trust's connection dropped was answered"),
        Err(err) => err.to_string(),
    };
    assert!(
        waited < Duration::from_secs(5),
        "the analyst heard within seconds, not at the timeout: {waited:?}"
    );
    assert!(
        message.contains("E_TRUST_UNAVAILABLE") || message.contains("E_TRUST_FAILED"),
        "a typed error: {message}"
    );
    assert!(
        !message.contains("h2") && !message.contains("hyper") && !message.contains("broken pipe"),
        "no transport text: {message}"
    );

    // The node dials again on its own, and the trust answers as before.
    let started = Instant::now();
    let again = loop {
        match client.query(SQL).await {
            Ok(answer) => break answer,
            Err(err) => {
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "back within 10 s: {err}"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    assert_eq!(
        crate::support::rows(&again.batches),
        crate::support::rows(&before.batches)
    );
    let outcomes: Vec<String> = gateway
        .gateway
        .audit()
        .recent()
        .iter()
        .filter(|r| r.step == "dial-in")
        .map(|r| r.outcome.to_string())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "connected").count(),
        2,
        "{outcomes:?}"
    );
    assert!(
        outcomes.contains(&"disconnected".to_string()),
        "{outcomes:?}"
    );
    node.stop().await;
    gateway.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_of_another_ca_or_another_trust_are_refused_at_connect_and_audited() {
    init_logging();
    let trust = &default_trusts()[0];
    let gateway = gateway_for_dialing(trust).await;
    let port = gateway.trust_port_addr.unwrap();

    // The right trust code, but a certificate from another CA.
    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = tally::certs::create(elsewhere.path(), &[trust.code]).unwrap();
    let mut foreign = dialing_node(trust, port);
    let tls = foreign.tls.as_mut().unwrap();
    tls.cert = other_ca.node(trust.code).cert;
    tls.key = other_ca.node(trust.code).key;
    let foreign = tally_node::start(&foreign).await.unwrap();

    // A certificate of our CA, but for a trust that does not dial in here.
    let other_trust = &default_trusts()[1];
    let mut impostor = dialing_node(trust, port);
    let tls = impostor.tls.as_mut().unwrap();
    tls.cert = certs().node(other_trust.code).cert;
    tls.key = certs().node(other_trust.code).key;
    let impostor = tally_node::start(&impostor).await.unwrap();

    let wanted = [
        "not signed by the trusted CA".to_string(),
        format!(
            "'{}' is not a trust that dials in",
            tally_gateway::default_node_name(other_trust.code)
        ),
    ];
    let mut refusals = Vec::new();
    for _ in 0..100 {
        refusals = gateway
            .gateway
            .audit()
            .recent()
            .into_iter()
            .filter(|r| r.step == "dial-in" && r.outcome == "refused")
            .filter_map(|r| r.detail)
            .collect();
        if wanted
            .iter()
            .all(|w| refusals.iter().any(|r| r.contains(w)))
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for want in &wanted {
        assert!(
            refusals.iter().any(|r| r.contains(want)),
            "{want}: {refusals:?}"
        );
    }
    assert!(
        !gateway.wait_for_trusts(Duration::from_millis(300)).await,
        "neither connection became the trust's"
    );
    let mut client = client_of(&gateway).await;
    let refused = client.query(SQL).await.map(|_| ()).unwrap_err().to_string();
    assert!(refused.contains("E_"), "a typed error: {refused}");
    foreign.stop().await;
    impostor.stop().await;

    // And a node refuses a gateway whose certificate is not from its CA.
    let mut config = gateway_config(&[], &open_policies());
    federation::dial_in(&mut config, trust.code, trust.name, certs());
    let port_config = config.trust_port.as_mut().unwrap();
    port_config.cert = other_ca.gateway_server().cert;
    port_config.key = other_ca.gateway_server().key;
    let rogue = tally_gateway::start(&config).await.unwrap();
    let node = tally_node::start(&dialing_node(trust, rogue.trust_port_addr.unwrap()))
        .await
        .unwrap();
    let mut refused_at_node = Vec::new();
    for _ in 0..100 {
        refused_at_node = node
            .audit
            .recent()
            .into_iter()
            .filter(|r| r.step == "dial" && r.outcome == "refused")
            .collect();
        if !refused_at_node.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !refused_at_node.is_empty(),
        "the node audits the gateway it refused"
    );
    node.stop().await;
    rogue.stop().await;
    gateway.stop().await;
}

/// A minimal HTTP CONNECT proxy, as a trust's outbound proxy would be; it records the
/// targets it was asked for.
async fn connect_proxy() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let asked = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = asked.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let target = head
                    .split_whitespace()
                    .nth(1)
                    .unwrap_or_default()
                    .to_string();
                record.lock().unwrap().push(target.clone());
                let Ok(mut upstream) = TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (addr, asked)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_reaches_the_gateway_through_an_http_connect_proxy() {
    init_logging();
    let trust = &default_trusts()[2];
    let gateway = gateway_for_dialing(trust).await;
    let (proxy, asked) = connect_proxy().await;
    let port = gateway.trust_port_addr.unwrap();
    let mut config = dialing_node(trust, port);
    config.gateway.as_mut().unwrap().proxy = Some(format!("http://{proxy}"));
    let node = tally_node::start(&config).await.unwrap();
    assert!(gateway.wait_for_trusts(Duration::from_secs(10)).await);
    let answer = client_of(&gateway)
        .await
        .query(SQL)
        .await
        .expect("answered");
    assert_eq!(answer.trusts, vec![trust.code.to_string()]);
    assert_eq!(asked.lock().unwrap().clone(), vec![port.to_string()]);
    node.stop().await;
    gateway.stop().await;
}

/// Inodes of the TCP sockets in LISTEN state on this machine.
fn listening_inodes() -> BTreeSet<String> {
    let mut inodes = BTreeSet::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields.get(3) == Some(&"0A") {
                inodes.insert(fields[9].to_string());
            }
        }
    }
    inodes
}

/// Inodes of the sockets process `pid` holds open.
fn socket_inodes(pid: u32) -> BTreeSet<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|link| {
            let link = link.to_string_lossy().to_string();
            Some(
                link.strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_string(),
            )
        })
        .collect()
}

/// Queries until the gateway at `addr` answers `SQL`; returns how long it took.
async fn until_answered(addr: SocketAddr, limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if let Ok(mut client) =
            AnalystClient::connect(&gateway_target(addr), &analyst_token()).await
            && client.query(SQL).await.is_ok()
        {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "no answer within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_process_with_no_listening_socket_comes_back_after_the_gateway_is_killed() {
    init_logging();
    let dir = tempfile::tempdir().unwrap();
    let trust = &default_trusts()[0];
    let certs = certs();
    let jwt = identity_provider().jwt_config();
    // Fixed ports, so that the restarted gateway is where the node dials.
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
    };
    let (listen, port) = (free(), free());
    let gateway_toml = dir.path().join("gateway.toml");
    std::fs::write(
        &gateway_toml,
        format!(
            "listen = \"{listen}\"\npolicies = {:?}\nbudget_ledger = {:?}\n\n[tls]\ncert = {:?}\nkey = {:?}\n\n[trust_port]\nlisten = \"{port}\"\ncert = {:?}\nkey = {:?}\nca = {:?}\n\n[jwt]\njwks = {:?}\nissuer = {:?}\naudience = {:?}\n\n[[nodes]]\ncode = \"{}\"\ndials_in = true\n",
            open_policies(),
            dir.path().join("ledger.jsonl"),
            certs.gateway_server().cert,
            certs.gateway_server().key,
            certs.gateway_server().cert,
            certs.gateway_server().key,
            certs.ca(),
            jwt.jwks,
            jwt.issuer,
            jwt.audience,
            trust.code,
        ),
    )
    .unwrap();
    let node_toml = dir.path().join("node.toml");
    let data = data_dir().join(trust.code);
    std::fs::write(
        &node_toml,
        format!(
            "policies = {:?}\nstate_dir = {:?}\n\n[trust]\ncode = \"{}\"\nname = \"{}\"\n\n[gateway]\naddress = \"{port}\"\n\n[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nallowed_gateways = [\"{}\"]\n\n[identity.jwt]\njwks = {:?}\nissuer = {:?}\naudience = {:?}\n\n[[tables]]\nname = \"patients\"\npath = {:?}\n",
            open_policies(),
            dir.path().join("state"),
            trust.code,
            trust.name,
            certs.node(trust.code).cert,
            certs.node(trust.code).key,
            certs.ca(),
            tally::certs::GATEWAY_IDENTITY,
            jwt.jwks,
            jwt.issuer,
            jwt.audience,
            data.join("patients.parquet"),
        ),
    )
    .unwrap();
    let (mut gateway, addr) = spawn_gateway(&gateway_toml);
    let mut node = tally()
        .args(["node", "--config"])
        .arg(&node_toml)
        .stderr(Stdio::null())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    until_answered(addr, Duration::from_secs(30)).await;
    let listening: BTreeSet<_> = socket_inodes(node.id())
        .intersection(&listening_inodes())
        .cloned()
        .collect();
    assert!(
        listening.is_empty(),
        "the node listens on no socket: {listening:?}"
    );

    gateway.kill().unwrap();
    gateway.wait().unwrap();
    let (mut restarted, addr) = spawn_gateway(&gateway_toml);
    let back = until_answered(addr, Duration::from_secs(10)).await;
    println!("answered again {back:?} after the gateway restarted");
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    node.kill().unwrap();
    node.wait().unwrap();
}
