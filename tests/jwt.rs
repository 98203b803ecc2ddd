//! Analysts signing in with JWTs from an identity provider: the gateway and every trust
//! verify the signature against the provider's key set, then issuer, audience and expiry; a
//! request selects its project and purpose among the token's signed approvals; every refusal
//! is audited. The gateway's static tokens are only the gateway's word, which trusts refuse
//! unless they opt in to it.

use std::collections::BTreeMap;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rcgen::KeyPair;
use serde::Serialize;
use tally::client::AnalystClient;
use tally::federation::{self, DEMO_PROJECT, DEMO_STATIC_TOKEN};
use tally_gateway::{GatewayConfig, GatewayHandle, JwtConfig};
use tally_node::{NodeConfig, NodeHandle};

use crate::support::{
    data_dir, default_policies, expect_refusal, fresh_state, gateway_config, gateway_target,
    identity_provider, init_logging, tls,
};

const ISSUER: &str = "https://login.example.nhs.uk";
const AUDIENCE: &str = "tally";
const SQL: &str = "SELECT sex, COUNT(*) FROM patients GROUP BY sex";

#[derive(Clone, Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    exp: i64,
    groups: Vec<&'a str>,
    /// Each approved project with the purposes approved in it.
    projects: BTreeMap<&'a str, Vec<&'a str>>,
}

/// An identity provider's signing key, and its public half as a JSON Web Key Set.
struct Provider {
    key: KeyPair,
}

impl Provider {
    fn new() -> Self {
        Provider {
            key: KeyPair::generate().unwrap(),
        }
    }

    fn jwks(&self) -> serde_json::Value {
        let point = self.key.public_key_raw();
        assert_eq!(point.len(), 65, "an uncompressed P-256 point");
        serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": "k1",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
        }]})
    }

    /// How the gateway and the trusts verify this provider's tokens, its key set written in
    /// `dir`.
    fn jwt_config(&self, dir: &std::path::Path) -> JwtConfig {
        let jwks = dir.join("jwks.json");
        std::fs::write(&jwks, self.jwks().to_string()).unwrap();
        JwtConfig {
            jwks,
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            projects_claim: "projects".into(),
            leeway_secs: 0,
        }
    }

    fn sign(&self, claims: &Claims) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        encode(
            &header,
            claims,
            &EncodingKey::from_ec_der(&self.key.serialize_der()),
        )
        .unwrap()
    }
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A valid token's claims: `user`, approved for `approvals` (project -> purposes).
fn claims<'a>(user: &'a str, approvals: &[(&'a str, &[&'a str])]) -> Claims<'a> {
    Claims {
        sub: user,
        iss: ISSUER,
        aud: AUDIENCE,
        exp: now() + 600,
        groups: vec!["analysts"],
        projects: approvals
            .iter()
            .map(|(project, purposes)| (*project, purposes.to_vec()))
            .collect(),
    }
}

/// The demo project for planning, as most tokens here approve.
const PLANNING: &[(&str, &[&str])] = &[(DEMO_PROJECT, &["planning"])];

/// Nodes for every trust under the default policy, then a gateway over them; `node` and
/// `gateway` adjust their configs first.
async fn federation_with(
    node: impl Fn(&mut NodeConfig),
    gateway: impl FnOnce(&mut GatewayConfig),
) -> (GatewayHandle, Vec<NodeHandle>) {
    init_logging();
    let mut nodes = Vec::new();
    let mut endpoints = Vec::new();
    for trust in tally_synth::default_trusts() {
        let mut config = federation::node_config(
            data_dir(),
            &trust,
            &default_policies(),
            &tls(),
            &identity_provider(),
            &fresh_state(),
        );
        node(&mut config);
        let handle = tally_node::start(&config).await.unwrap();
        endpoints.push((
            trust.code.to_string(),
            trust.name.to_string(),
            handle.listen_addr.unwrap(),
        ));
        nodes.push(handle);
    }
    let mut config = gateway_config(&endpoints, &default_policies());
    gateway(&mut config);
    (tally_gateway::start(&config).await.unwrap(), nodes)
}

/// A federation whose gateway and trusts all verify `jwt`'s tokens.
async fn trusting(jwt: &JwtConfig) -> (GatewayHandle, Vec<NodeHandle>) {
    federation_with(
        |node| node.identity.jwt = Some(jwt.clone()),
        |gateway| gateway.jwt = Some(jwt.clone()),
    )
    .await
}

async fn stop(gateway: GatewayHandle, nodes: Vec<NodeHandle>) {
    gateway.stop().await;
    for node in nodes {
        node.stop().await;
    }
}

/// Runs [`SQL`] at `gateway` with `token`, selecting `project` and `purpose` (empty: the
/// token's defaults).
async fn ask(
    gateway: &GatewayHandle,
    token: &str,
    project: &str,
    purpose: &str,
) -> Result<tally::client::Answer, tally::client::ClientError> {
    let target = gateway_target(gateway.addr);
    let mut client = AnalystClient::connect_for(&target, token, project, purpose)
        .await
        .unwrap();
    client.query(SQL).await
}

/// The gateway's audit record of the one request since `before` records.
fn only_record_since(gateway: &GatewayHandle, before: usize) -> tally_gateway::GatewayAuditRecord {
    let records = gateway.gateway.audit().recent();
    assert_eq!(records.len(), before + 1, "one audit record per request");
    records.last().unwrap().clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_at_the_gateway_and_the_trusts_and_every_refusal_is_audited() {
    let provider = Provider::new();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, nodes) = trusting(&provider.jwt_config(dir.path())).await;

    let valid = provider.sign(&claims("jwt-analyst", PLANNING));
    ask(&gateway, &valid, "", "")
        .await
        .expect("a valid token is accepted");
    let answered = gateway.gateway.audit().recent();
    assert_eq!(answered.last().unwrap().identity.user, "jwt-analyst");
    assert_eq!(answered.last().unwrap().outcome, "answered");
    for node in &nodes {
        let record = node.audit.recent().pop().expect("every trust was asked");
        assert_eq!(record.outcome, "answered");
        assert_eq!(
            (
                record.identity.user.as_str(),
                record.identity.purpose.as_str()
            ),
            ("jwt-analyst", "planning"),
            "the trust verified the token itself"
        );
    }

    let expired = provider.sign(&Claims {
        exp: now() - 3_600,
        ..claims("jwt-analyst", PLANNING)
    });
    let wrong_issuer = provider.sign(&Claims {
        iss: "https://evil.example.com",
        ..claims("jwt-analyst", PLANNING)
    });
    let wrong_audience = provider.sign(&Claims {
        aud: "another-service",
        ..claims("jwt-analyst", PLANNING)
    });
    let forged = {
        let other = Provider::new().sign(&claims("jwt-analyst", PLANNING));
        let mut parts: Vec<&str> = valid.split('.').collect();
        let other_parts: Vec<&str> = other.split('.').collect();
        parts[2] = other_parts[2];
        parts.join(".")
    };
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
        let raised = serde_json::json!({"sub": "jwt-analyst", "iss": ISSUER, "aud": AUDIENCE,
            "exp": now() + 600, "groups": ["admins"],
            "projects": {DEMO_PROJECT: ["planning", "research"], "cardiac-audit": ["audit"]}});
        parts[1] = URL_SAFE_NO_PAD.encode(raised.to_string());
        parts.join(".")
    };
    let old_shape = {
        // Approvals must say which purposes: a bare list of projects is not accepted.
        let mut list = serde_json::to_value(claims("jwt-analyst", PLANNING)).unwrap();
        list["projects"] = serde_json::json!([DEMO_PROJECT]);
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        encode(
            &header,
            &list,
            &EncodingKey::from_ec_der(&provider.key.serialize_der()),
        )
        .unwrap()
    };
    let cases = [
        (expired, "the token has expired"),
        (wrong_issuer, "issuer is not trusted"),
        (wrong_audience, "meant for another audience"),
        (forged, "signature does not verify"),
        (tampered, "signature does not verify"),
        (old_shape, "must map each project to its approved purposes"),
        ("not-a-known-token".to_string(), "unknown or revoked token"),
    ];
    for (token, reason) in &cases {
        let before = gateway.gateway.audit().recent().len();
        let err = expect_refusal(ask(&gateway, token, "", "").await);
        assert!(
            err.starts_with("E_UNAUTHENTICATED") && err.contains(reason),
            "{reason}: {err}"
        );
        let record = only_record_since(&gateway, before);
        assert_eq!(record.codes, ["E_UNAUTHENTICATED"]);
        assert_eq!(record.sql, SQL);
        assert!(record.identity.user.is_empty(), "nobody was identified");
        assert!(
            record.detail.as_deref().is_some_and(|d| d.contains(reason)),
            "{:?}",
            record.detail
        );
    }
    stop(gateway, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_selects_among_the_tokens_signed_approvals() {
    let provider = Provider::new();
    let dir = tempfile::tempdir().unwrap();
    let (gateway, nodes) = trusting(&provider.jwt_config(dir.path())).await;
    // The catalogue approves uec-demand for research, but this analyst's token does not.
    let planner = provider.sign(&claims("planner", PLANNING));
    let direct_care = provider.sign(&claims(
        "clinician",
        &[(DEMO_PROJECT, &["planning", "direct_care"])],
    ));
    // (token, code, project, purpose, what the refusal says, whether the policy decided it)
    let cases = [
        (
            &planner,
            "E_PURPOSE",
            DEMO_PROJECT,
            "research",
            "not approved for purpose 'research'",
            false,
        ),
        (
            &planner,
            "E_PROJECT",
            "cardiac-audit",
            "research",
            "not a member of project 'cardiac-audit'",
            false,
        ),
        // Signed approval or not, direct care is not an analytics purpose: the policy refuses.
        (
            &direct_care,
            "E_PURPOSE",
            DEMO_PROJECT,
            "direct_care",
            "not an analytics purpose",
            true,
        ),
    ];
    for (token, code, project, purpose, says, by_policy) in cases {
        let before = gateway.gateway.audit().recent().len();
        let err = expect_refusal(ask(&gateway, token, project, purpose).await);
        assert!(
            err.starts_with(code) && err.contains(says),
            "{project}/{purpose}: {err}"
        );
        let record = only_record_since(&gateway, before);
        assert_eq!(record.codes, [code], "{project}/{purpose}");
        assert_eq!(
            record.policy_version.is_some(),
            by_policy,
            "{project}/{purpose}: decided by the {}",
            if by_policy { "policy" } else { "token" }
        );
    }
    // The same token, for what it does approve.
    ask(&gateway, &direct_care, DEMO_PROJECT, "planning")
        .await
        .expect("approved for planning");
    assert!(
        nodes.iter().all(|n| n.audit.recent().len() == 1),
        "only the allowed query reached the trusts"
    );
    stop(gateway, nodes).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trusts_refuse_static_tokens_unless_they_take_the_gateways_word() {
    // The gateway knows the static token, but there is no signed token to forward.
    let (gateway, nodes) = federation_with(|_| {}, |_| {}).await;
    let err = expect_refusal(ask(&gateway, DEMO_STATIC_TOKEN, "", "").await);
    assert!(
        err.starts_with("E_TRUST_REFUSED") && err.contains("E_UNAUTHENTICATED"),
        "{err}"
    );
    for node in &nodes {
        let record = node.audit.recent().pop().expect("the trust audited it");
        assert_eq!(record.codes, ["E_UNAUTHENTICATED"]);
        assert!(record.identity.user.is_empty(), "nobody was identified");
    }
    stop(gateway, nodes).await;

    // Trusts that opt in believe the identity an allowed gateway states.
    let (gateway, nodes) =
        federation_with(|node| node.identity.trust_gateway_identity = true, |_| {}).await;
    let answer = ask(&gateway, DEMO_STATIC_TOKEN, "", "")
        .await
        .expect("answered on the gateway's word");
    assert_eq!(answer.trusts, ["RXA", "RXB", "RXC"]);
    for node in &nodes {
        let record = node.audit.recent().pop().expect("the trust audited it");
        assert_eq!(record.outcome, "answered");
        assert_eq!(record.identity.user, federation::DEMO_USER);
    }
    stop(gateway, nodes).await;
}
