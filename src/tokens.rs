//! The demo's identity provider: an ECDSA P-256 signing key and its public JSON Web Key Set
//! in `<data>/idp`, and JWTs for analysts whose claims carry their signed approvals (each
//! project with the purposes approved in it). `tally demo` uses it and prints a ready
//! token; `tally token` mints more. Real deployments use their own identity provider and
//! give the gateway and every trust its key set.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rcgen::KeyPair;
use serde::Serialize;
use tally_common::identity::JwtConfig;

/// The demo provider's issuer.
pub const ISSUER: &str = "https://idp.tally.demo";
/// The audience every Tally token names.
pub const AUDIENCE: &str = "tally";
/// The key id in the key set and in every token's header.
const KEY_ID: &str = "tally-demo-1";

/// A signing key and its key set, in one folder.
#[derive(Debug, Clone)]
pub struct IdentityProvider {
    /// The folder (`signing-key.pem`, `jwks.json`).
    pub dir: PathBuf,
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: &'a str,
    iss: &'a str,
    aud: &'a str,
    iat: u64,
    exp: u64,
    groups: &'a [String],
    projects: &'a BTreeMap<String, Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_project: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    default_purpose: Option<&'a str>,
}

/// What a token says about its analyst.
#[derive(Debug, Clone)]
pub struct TokenClaims {
    /// The user name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Each project the user is approved for, with the purposes approved in it.
    pub approvals: BTreeMap<String, Vec<String>>,
    /// The project used when a request names none.
    pub default_project: Option<String>,
    /// The purpose used when a request names none.
    pub default_purpose: Option<String>,
}

impl IdentityProvider {
    /// The provider in `dir`, created there (key written readable by the owner only) when
    /// absent.
    pub fn ensure(dir: &Path) -> Result<Self, String> {
        let provider = IdentityProvider {
            dir: dir.to_path_buf(),
        };
        if provider.key_path().exists() && provider.jwks_path().exists() {
            return Ok(provider);
        }
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        let key = KeyPair::generate().map_err(|e| e.to_string())?;
        crate::certs::write(&provider.key_path(), &key.serialize_pem(), true)?;
        let point = key.public_key_raw();
        let (x, y) = match point {
            [4, rest @ ..] if rest.len() == 64 => rest.split_at(32),
            _ => return Err("unexpected public key encoding".into()),
        };
        let jwks = serde_json::json!({"keys": [{
            "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": KEY_ID,
            "x": URL_SAFE_NO_PAD.encode(x),
            "y": URL_SAFE_NO_PAD.encode(y),
        }]});
        std::fs::write(provider.jwks_path(), jwks.to_string())
            .map_err(|e| format!("{}: {e}", provider.jwks_path().display()))?;
        Ok(provider)
    }

    fn key_path(&self) -> PathBuf {
        self.dir.join("signing-key.pem")
    }

    /// The public key set the gateway and every trust verify tokens with.
    pub fn jwks_path(&self) -> PathBuf {
        self.dir.join("jwks.json")
    }

    /// How the gateway and the trusts verify this provider's tokens.
    pub fn jwt_config(&self) -> JwtConfig {
        JwtConfig {
            jwks: self.jwks_path(),
            issuer: ISSUER.into(),
            audience: AUDIENCE.into(),
            user_claim: "sub".into(),
            groups_claim: "groups".into(),
            projects_claim: "projects".into(),
            leeway_secs: 30,
        }
    }

    /// A token saying `claims`, valid for `lifetime` from now.
    pub fn mint(&self, claims: &TokenClaims, lifetime: Duration) -> Result<String, String> {
        let pem = std::fs::read_to_string(self.key_path())
            .map_err(|e| format!("{}: {e}", self.key_path().display()))?;
        let key = KeyPair::from_pem(&pem).map_err(|e| e.to_string())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_err(|e| e.to_string())?
            .as_secs();
        let claims = Claims {
            sub: &claims.user,
            iss: ISSUER,
            aud: AUDIENCE,
            iat: now,
            exp: now + lifetime.as_secs(),
            groups: &claims.groups,
            projects: &claims.approvals,
            default_project: claims.default_project.as_deref(),
            default_purpose: claims.default_purpose.as_deref(),
        };
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(KEY_ID.into());
        encode(
            &header,
            &claims,
            &EncodingKey::from_ec_der(&key.serialize_der()),
        )
        .map_err(|e| e.to_string())
    }
}
