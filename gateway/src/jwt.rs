//! Signed JWTs as analyst credentials: the signature is checked against the issuer's JSON Web
//! Key Set, then the issuer, audience, expiry and not-before; the claims name the user, the
//! user's groups and the projects the user may query for.

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};
use serde_json::{Map, Value};
use tally_common::{ErrorCode, TallyError};

use crate::auth::Identity;
use crate::config::JwtConfig;
use crate::error::GatewayError;

/// Signature algorithms accepted: public-key ones only, so a key set can never be used as a
/// shared secret.
const ACCEPTED: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Verifies JWTs from one issuer.
#[derive(Debug, Clone)]
pub struct JwtVerifier {
    keys: JwkSet,
    config: JwtConfig,
}

fn refused(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::Unauthenticated, message)
}

impl JwtVerifier {
    /// Reads the key set named by `config`.
    pub fn load(config: &JwtConfig) -> Result<Self, GatewayError> {
        let fail = |reason: String| GatewayError::Jwks {
            path: config.jwks.clone(),
            reason,
        };
        let text = std::fs::read_to_string(&config.jwks).map_err(|e| fail(e.to_string()))?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        if keys.keys.is_empty() {
            return Err(fail("the key set has no keys".into()));
        }
        Ok(JwtVerifier {
            keys,
            config: config.clone(),
        })
    }

    /// Whether `token` has the shape of a JWT (three dot-separated parts).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// The analyst a valid token names; a clear reason when it is not valid.
    pub fn verify(&self, token: &str) -> Result<Identity, TallyError> {
        let header =
            decode_header(token).map_err(|_| refused("the token is not a well-formed JWT"))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(refused(format!(
                "the token is signed with {:?}, which this gateway does not accept",
                header.alg
            )));
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| refused("the token is signed with a key this gateway does not know"))?;
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|_| refused("the token's signing key cannot be used"))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        validation.validate_nbf = true;
        validation.leeway = self.config.leeway_secs;
        let claims = decode::<Map<String, Value>>(token, &key, &validation)
            .map_err(|err| refused(describe(err.kind())))?
            .claims;
        self.identity(&claims)
    }

    fn identity(&self, claims: &Map<String, Value>) -> Result<Identity, TallyError> {
        let user = claims
            .get(&self.config.user_claim)
            .and_then(Value::as_str)
            .filter(|user| !user.is_empty())
            .ok_or_else(|| {
                refused(format!(
                    "the token has no '{}' claim naming the user",
                    self.config.user_claim
                ))
            })?;
        let list = |claim: &str| -> Result<Vec<String>, TallyError> {
            match claims.get(claim) {
                None => Ok(Vec::new()),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| refused(format!("the '{claim}' claim must list strings"))),
                Some(_) => Err(refused(format!("the '{claim}' claim must be a list"))),
            }
        };
        let projects = list(&self.config.projects_claim)?;
        Ok(Identity {
            user: user.to_string(),
            groups: list(&self.config.groups_claim)?,
            default_project: (projects.len() == 1).then(|| projects[0].clone()),
            projects,
            default_purpose: claims
                .get("purpose")
                .and_then(Value::as_str)
                .map(str::to_string),
        })
    }
}

/// Why a token failed validation, in words an analyst can act on.
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
        ErrorKind::InvalidIssuer => "the token's issuer is not trusted by this gateway".into(),
        ErrorKind::InvalidAudience => "the token is meant for another audience".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no '{claim}' claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        _ => "the token is not valid".into(),
    }
}
