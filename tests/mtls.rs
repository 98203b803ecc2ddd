//! Mutual TLS between the gateway and the nodes: who a node lets in, what it writes down
//! about those it turns away, and plaintext only on loopback.

use tally::certs::{Role, issue_from_folder};
use tally::federation::{self, Security};
use tally_common::flight::list_tables;
use tally_synth::default_trusts;

use crate::support::{
    certs, data_dir, fresh_state, gateway_config, init_logging, node_client_as, open_policies,
    start_node,
};

/// Asks RXA's node at `addr` for its tables, presenting `identity`; the error when refused.
async fn try_list(
    addr: std::net::SocketAddr,
    identity: Option<&tally_common::tls::CertificateFiles>,
) -> Result<usize, String> {
    let mut client = node_client_as(addr, "RXA", identity).await?;
    list_tables(&mut client)
        .await
        .map(|tables| tables.len())
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_admits_only_allowed_gateways_and_audits_every_refusal() {
    init_logging();
    let trust = &default_trusts()[0];
    let node = start_node(trust, &open_policies()).await;
    let tables = try_list(node.listen_addr.unwrap(), Some(&certs().gateway_client())).await;
    assert_eq!(tables, Ok(3), "the gateway's certificate is accepted");

    let no_certificate = try_list(node.listen_addr.unwrap(), None).await;
    assert!(no_certificate.is_err(), "no client certificate");

    let elsewhere = tempfile::tempdir().unwrap();
    let other_ca = tally::certs::create(elsewhere.path(), &["RXA"]).unwrap();
    let foreign = try_list(node.listen_addr.unwrap(), Some(&other_ca.gateway_client())).await;
    assert!(foreign.is_err(), "a certificate from another CA");

    let rogue =
        issue_from_folder(certs(), "client-rogue", "rogue-gateway", &[], Role::Client).unwrap();
    let not_allowed = try_list(node.listen_addr.unwrap(), Some(&rogue)).await;
    assert!(
        not_allowed.is_err(),
        "a valid certificate of an identity not allowed"
    );

    // Refusals are written by the handshake tasks (a client may retry, so there can be more
    // than one per client); wait until all three kinds are on record.
    let kinds = [
        "presented no certificate",
        "not signed by the trusted CA",
        "'rogue-gateway' is not an allowed gateway",
    ];
    let mut refusals = Vec::new();
    for _ in 0..100 {
        refusals = node
            .audit
            .recent()
            .into_iter()
            .filter(|r| r.step == "connect")
            .collect();
        let seen = |kind: &str| {
            refusals
                .iter()
                .any(|r| r.detail.as_deref().is_some_and(|d| d.contains(kind)))
        };
        if kinds.iter().all(|kind| seen(kind)) {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let details: Vec<String> = refusals
        .iter()
        .map(|r| r.detail.clone().unwrap_or_default())
        .collect();
    assert!(refusals.len() >= 3, "{details:?}");
    assert!(refusals.iter().all(|r| r.outcome == "refused"
        && r.codes == ["E_CLIENT_CERT"]
        && r.peer.starts_with("127.0.0.1:")));
    for kind in kinds {
        assert!(
            details.iter().any(|d| d.contains(kind)),
            "{kind}: {details:?}"
        );
    }
    assert!(
        refusals
            .iter()
            .any(|r| r.gateway.as_deref() == Some("rogue-gateway")
                && r.detail
                    .as_deref()
                    .is_some_and(|d| d.contains("'rogue-gateway' is not an allowed gateway"))),
        "{details:?}"
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_checks_each_node_against_the_trusts_expected_name() {
    init_logging();
    let trusts = default_trusts();
    let node = start_node(&trusts[0], &open_policies()).await;
    // The gateway believes RXB lives where RXA's node is: RXA's certificate does not name RXB.
    let endpoints = vec![(
        "RXB".to_string(),
        "Impostor".to_string(),
        node.listen_addr.unwrap(),
    )];
    let config = gateway_config(&endpoints, &open_policies());
    let gateway = tally_gateway::start(&config).await.unwrap();
    let snapshot = gateway.gateway.catalogue().snapshot();
    let unavailable: Vec<String> = snapshot
        .unavailable()
        .iter()
        .map(|e| e.to_string())
        .collect();
    assert_eq!(unavailable.len(), 1, "{unavailable:?}");
    assert!(
        unavailable[0].contains("E_TRUST_UNAVAILABLE"),
        "{unavailable:?}"
    );
    assert!(
        node.audit.recent().iter().all(|r| r.step == "connect"),
        "no request from the gateway reached the node's service"
    );
    gateway.stop().await;
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_needs_the_flag_and_a_loopback_address() {
    init_logging();
    let trust = &default_trusts()[0];
    let mut config = federation::node_config(
        data_dir(),
        trust,
        &open_policies(),
        &Security::InsecureLoopback,
        &crate::support::identity_provider(),
        &fresh_state(),
    );
    config.insecure_loopback = false;
    let err = tally_node::start(&config).await.err().expect("refused");
    assert!(err.to_string().contains("--insecure-loopback"), "{err}");

    config.insecure_loopback = true;
    config.listen = Some("0.0.0.0:0".parse().unwrap());
    let err = tally_node::start(&config).await.err().expect("refused");
    assert!(err.to_string().contains("not a loopback address"), "{err}");

    let endpoints = vec![(
        "RXA".to_string(),
        "Remote".to_string(),
        "10.1.2.3:50051".parse().unwrap(),
    )];
    let mut gateway = federation::gateway_config(
        "127.0.0.1:0".parse().unwrap(),
        &endpoints,
        &open_policies(),
        &Security::InsecureLoopback,
        &crate::support::identity_provider(),
        &fresh_state(),
    );
    let err = tally_gateway::start(&gateway).await.err().expect("refused");
    assert!(err.to_string().contains("not a loopback address"), "{err}");
    gateway.insecure_loopback = false;
    let err = tally_gateway::start(&gateway).await.err().expect("refused");
    assert!(err.to_string().contains("plaintext"), "{err}");
}
