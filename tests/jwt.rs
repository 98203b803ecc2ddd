//! Analysts signing in with JWTs from an identity provider: the gateway verifies the
//! signature against the provider's key set, then issuer, audience and expiry, and audits
//! every refusal.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rcgen::KeyPair;
use serde::Serialize;
use tally::client::AnalystClient;
use tally::federation::DEMO_PROJECT;
use tally_gateway::JwtConfig;

use crate::support::{
    expect_refusal, gateway_config, gateway_target, init_logging, open_policies, start_federation,
};

const ISSUER: &str = "https://login.example.nhs.uk";
const AUDIENCE: &str = "tally";

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    exp: i64,
    groups: Vec<&'a str>,
    projects: Vec<&'a str>,
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

fn claims(user: &str) -> Claims<'_> {
    Claims {
        sub: user,
        iss: ISSUER,
        aud: AUDIENCE,
        exp: now() + 600,
        groups: vec!["analysts"],
        projects: vec![DEMO_PROJECT],
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_and_every_refusal_is_audited() {
    init_logging();
    let provider = Provider::new();
    let dir = tempfile::tempdir().unwrap();
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, provider.jwks().to_string()).unwrap();
    // The trusts of the shared test federation, behind a gateway that trusts the provider.
    let local = start_federation().await;
    let endpoints: Vec<_> = tally_synth::default_trusts()
        .iter()
        .zip(&local.nodes)
        .map(|(t, n)| (t.code.to_string(), t.name.to_string(), n.addr))
        .collect();
    let mut config = gateway_config(&endpoints, &open_policies());
    config.jwt = Some(JwtConfig {
        jwks,
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        user_claim: "sub".into(),
        groups_claim: "groups".into(),
        projects_claim: "projects".into(),
        leeway_secs: 0,
    });
    let gateway = tally_gateway::start(&config).await.unwrap();
    let target = gateway_target(gateway.addr);
    let sql = "SELECT sex, COUNT(*) FROM patients GROUP BY sex";

    let valid = provider.sign(&claims("jwt-analyst"));
    let mut client = AnalystClient::connect(&target, &valid).await.unwrap();
    client.query(sql).await.expect("a valid token is accepted");
    let answered = gateway.gateway.audit().recent();
    assert_eq!(answered.last().unwrap().identity.user, "jwt-analyst");
    assert_eq!(answered.last().unwrap().outcome, "answered");

    let expired = provider.sign(&Claims {
        exp: now() - 3_600,
        ..claims("jwt-analyst")
    });
    let wrong_issuer = provider.sign(&Claims {
        iss: "https://evil.example.com",
        ..claims("jwt-analyst")
    });
    let wrong_audience = provider.sign(&Claims {
        aud: "another-service",
        ..claims("jwt-analyst")
    });
    let forged = {
        let other = Provider::new().sign(&claims("jwt-analyst"));
        let mut parts: Vec<&str> = valid.split('.').collect();
        let other_parts: Vec<&str> = other.split('.').collect();
        parts[2] = other_parts[2];
        parts.join(".")
    };
    let tampered = {
        let mut parts: Vec<String> = valid.split('.').map(str::to_string).collect();
        let raised = serde_json::json!({"sub": "jwt-analyst", "iss": ISSUER, "aud": AUDIENCE,
            "exp": now() + 600, "groups": ["admins"], "projects": [DEMO_PROJECT]});
        parts[1] = URL_SAFE_NO_PAD.encode(raised.to_string());
        parts.join(".")
    };
    let cases = [
        (expired, "the token has expired"),
        (wrong_issuer, "issuer is not trusted"),
        (wrong_audience, "meant for another audience"),
        (forged, "signature does not verify"),
        (tampered, "signature does not verify"),
        ("not-a-known-token".to_string(), "unknown or revoked token"),
    ];
    for (token, reason) in &cases {
        let before = gateway.gateway.audit().recent().len();
        let mut client = AnalystClient::connect(&target, token).await.unwrap();
        let err = expect_refusal(client.query(sql).await);
        assert!(
            err.starts_with("E_UNAUTHENTICATED") && err.contains(reason),
            "{reason}: {err}"
        );
        let records = gateway.gateway.audit().recent();
        assert_eq!(records.len(), before + 1, "{reason}: one audit record");
        let record = records.last().unwrap();
        assert_eq!(record.codes, ["E_UNAUTHENTICATED"]);
        assert_eq!(record.sql, sql);
        assert!(record.identity.user.is_empty(), "nobody was identified");
        assert!(
            record.detail.as_deref().is_some_and(|d| d.contains(reason)),
            "{:?}",
            record.detail
        );
    }
    gateway.stop().await;
    local.stop().await;
}
