//! Who is asking: analysts sign in with JWTs from an identity provider, verified against
//! its JSON Web Key Set (signature with public-key algorithms only, issuer, audience,
//! expiry, not-before). The claims name the user, the user's groups, and the projects the
//! user is approved for with the purposes approved in each, so a project and a purpose are
//! never taken from a free header: a request only *selects* among its signed approvals
//! (optional `default_project` and `default_purpose` claims choose when it does not). The
//! gateway verifies the token, forwards it, and every node verifies it again itself.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{
    Algorithm, DecodingKey, Validation, decode, decode_header, get_current_timestamp,
};
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::admission::RequestIdentity;
use crate::error::{ErrorCode, TallyError};
use crate::flight::PROJECT_HEADER;

/// How signed JWTs are verified and mapped to an analyst.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// JSON Web Key Set file with the issuer's public keys.
    pub jwks: PathBuf,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must carry.
    pub audience: String,
    /// Claim holding the user name.
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
    /// Claim holding the user's groups (a list of strings).
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// Claim holding the user's approvals: an object mapping each project to the list of
    /// purposes approved for the user in it.
    #[serde(default = "default_projects_claim")]
    pub projects_claim: String,
    /// Seconds of clock difference tolerated on `exp` and `nbf`.
    #[serde(default = "default_leeway")]
    pub leeway_secs: u64,
}

fn default_user_claim() -> String {
    "sub".into()
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_projects_claim() -> String {
    "projects".into()
}

fn default_leeway() -> u64 {
    30
}

/// An authenticated analyst.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// User name.
    pub user: String,
    /// The user's groups.
    pub groups: Vec<String>,
    /// Each project the user may query for, with the purposes approved in it.
    pub approvals: BTreeMap<String, Vec<String>>,
    /// Project when a request names none (the only one, when there is one).
    pub default_project: Option<String>,
    /// Purpose when a request names none.
    pub default_purpose: Option<String>,
}

impl Identity {
    /// The identity the policy sees for a request selecting `project` and `purpose` (empty:
    /// the user's defaults). A project or purpose the user is not approved for is refused.
    pub fn for_request(&self, project: &str, purpose: &str) -> Result<RequestIdentity, TallyError> {
        let project = if project.is_empty() {
            self.default_project.clone().unwrap_or_default()
        } else {
            project.to_string()
        };
        let Some(purposes) = self.approvals.get(&project) else {
            return Err(TallyError::new(
                ErrorCode::Project,
                if project.is_empty() {
                    format!(
                        "user '{}' must name a project (header {PROJECT_HEADER})",
                        self.user
                    )
                } else {
                    format!(
                        "user '{}' is not a member of project '{project}'",
                        self.user
                    )
                },
            ));
        };
        let purpose = if !purpose.is_empty() {
            purpose.to_string()
        } else if let Some(default) = self
            .default_purpose
            .as_ref()
            .filter(|p| purposes.contains(p))
        {
            default.clone()
        } else if let [only] = purposes.as_slice() {
            only.clone()
        } else {
            String::new()
        };
        if !purposes.contains(&purpose) {
            return Err(TallyError::new(
                ErrorCode::Purpose,
                format!(
                    "user '{}' is not approved for purpose '{purpose}' in project '{project}' (approved: {})",
                    self.user,
                    purposes.join(", ")
                ),
            ));
        }
        Ok(RequestIdentity {
            user: self.user.clone(),
            groups: self.groups.clone(),
            project,
            purpose,
        })
    }
}

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
    verified: Arc<VerifiedTokens>,
}

/// Tokens whose signature has verified, by their exact text, with the analyst they name
/// and the window in which they are valid: a dashboard's hundreds of queries with one token
/// check its signature once, and every use still checks the window. Emptied when full.
#[derive(Default)]
struct VerifiedTokens(Mutex<HashMap<String, VerifiedToken>>);

/// Tokens remembered at most.
const VERIFIED_CAPACITY: usize = 1024;

#[derive(Clone)]
struct VerifiedToken {
    identity: Identity,
    not_before: Option<u64>,
    expires: u64,
}

impl std::fmt::Debug for VerifiedTokens {
    /// Counts only: the tokens are credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let count = self.0.lock().map_or(0, |tokens| tokens.len());
        write!(f, "VerifiedTokens({count})")
    }
}

impl VerifiedTokens {
    /// The identity of `token` if it verified before and is valid now, within `leeway`
    /// seconds, by the same rules as a full verification.
    fn valid(&self, token: &str, leeway: u64) -> Option<Identity> {
        let tokens = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let known = tokens.get(token)?;
        let now = get_current_timestamp();
        let started = known.not_before.is_none_or(|nbf| nbf <= now + leeway);
        let running = known.expires >= now.saturating_sub(leeway);
        (started && running).then(|| known.identity.clone())
    }

    fn remember(&self, token: &str, known: VerifiedToken) {
        let mut tokens = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if tokens.len() >= VERIFIED_CAPACITY {
            tokens.clear();
        }
        tokens.insert(token.to_string(), known);
    }
}

fn refused(message: impl Into<String>) -> TallyError {
    TallyError::new(ErrorCode::Unauthenticated, message)
}

impl JwtVerifier {
    /// Reads the key set named by `config`; the error says what is wrong with the file.
    pub fn load(config: &JwtConfig) -> Result<Self, String> {
        let fail = |reason: String| format!("key set {}: {reason}", config.jwks.display());
        let text = std::fs::read_to_string(&config.jwks).map_err(|e| fail(e.to_string()))?;
        let keys: JwkSet = serde_json::from_str(&text).map_err(|e| fail(e.to_string()))?;
        if keys.keys.is_empty() {
            return Err(fail("the key set has no keys".into()));
        }
        Ok(JwtVerifier {
            keys,
            config: config.clone(),
            verified: Arc::default(),
        })
    }

    /// Whether `token` has the shape of a JWT (three dot-separated parts).
    pub fn looks_like_jwt(token: &str) -> bool {
        token.split('.').count() == 3
    }

    /// The analyst a valid token names; a clear reason when it is not valid.
    pub fn verify(&self, token: &str) -> Result<Identity, TallyError> {
        if let Some(identity) = self.verified.valid(token, self.config.leeway_secs) {
            return Ok(identity);
        }
        let header =
            decode_header(token).map_err(|_| refused("the token is not a well-formed JWT"))?;
        if !ACCEPTED.contains(&header.alg) {
            return Err(refused(format!(
                "the token is signed with {:?}, which is not accepted",
                header.alg
            )));
        }
        let jwk = match &header.kid {
            Some(kid) => self.keys.find(kid),
            None if self.keys.keys.len() == 1 => self.keys.keys.first(),
            None => None,
        }
        .ok_or_else(|| refused("the token is signed with a key that is not trusted"))?;
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
        let identity = self.identity(&claims)?;
        let seconds = |claim: &str| claims.get(claim).and_then(Value::as_u64);
        if let Some(expires) = seconds("exp") {
            let not_before = seconds("nbf");
            let window_known = not_before.is_some() || !claims.contains_key("nbf");
            if window_known {
                let known = VerifiedToken {
                    identity: identity.clone(),
                    not_before,
                    expires,
                };
                self.verified.remember(token, known);
            }
        }
        Ok(identity)
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
        let strings = |value: &Value, claim: &str| -> Result<Vec<String>, TallyError> {
            match value {
                Value::Array(items) => items
                    .iter()
                    .map(|item| item.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| refused(format!("the '{claim}' claim must list strings"))),
                Value::Null
                | Value::Bool(_)
                | Value::Number(_)
                | Value::String(_)
                | Value::Object(_) => Err(refused(format!("the '{claim}' claim must be a list"))),
            }
        };
        let groups = match claims.get(&self.config.groups_claim) {
            None => Vec::new(),
            Some(value) => strings(value, &self.config.groups_claim)?,
        };
        let claim = &self.config.projects_claim;
        let approvals: BTreeMap<String, Vec<String>> = match claims.get(claim) {
            None => BTreeMap::new(),
            Some(Value::Object(projects)) => projects
                .iter()
                .map(|(project, purposes)| Ok((project.clone(), strings(purposes, claim)?)))
                .collect::<Result<_, TallyError>>()?,
            Some(_) => {
                return Err(refused(format!(
                    "the '{claim}' claim must map each project to its approved purposes"
                )));
            }
        };
        let text = |claim: &str| -> Result<Option<String>, TallyError> {
            match claims.get(claim) {
                None => Ok(None),
                Some(Value::String(value)) => Ok(Some(value.clone())),
                Some(_) => Err(refused(format!("the '{claim}' claim must be text"))),
            }
        };
        let only = (approvals.len() == 1)
            .then(|| approvals.keys().next().cloned())
            .flatten();
        Ok(Identity {
            user: user.to_string(),
            groups,
            default_project: text("default_project")?.or(only),
            approvals,
            default_purpose: text("default_purpose")?,
        })
    }
}

/// Why a token failed validation, in words an analyst can act on. (`ErrorKind` is
/// `#[non_exhaustive]`, so the last arm is required; it only words a refusal.)
fn describe(kind: &ErrorKind) -> String {
    match kind {
        ErrorKind::ExpiredSignature => "the token has expired".into(),
        ErrorKind::ImmatureSignature => "the token is not valid yet".into(),
        ErrorKind::InvalidIssuer => "the token's issuer is not trusted".into(),
        ErrorKind::InvalidAudience => "the token is meant for another audience".into(),
        ErrorKind::InvalidSignature => "the token's signature does not verify".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("the token has no '{claim}' claim"),
        ErrorKind::InvalidAlgorithm => "the token's algorithm does not match its key".into(),
        _ => "the token is not valid".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn analyst() -> Identity {
        Identity {
            user: "ana".into(),
            groups: Vec::new(),
            approvals: BTreeMap::new(),
            default_project: None,
            default_purpose: None,
        }
    }

    fn remembered(not_before: Option<u64>, expires: u64) -> VerifiedTokens {
        let tokens = VerifiedTokens::default();
        let known = VerifiedToken {
            identity: analyst(),
            not_before,
            expires,
        };
        tokens.remember("a.b.c", known);
        tokens
    }

    #[test]
    fn a_remembered_token_is_valid_only_within_its_window() {
        let now = get_current_timestamp();
        assert_eq!(
            remembered(None, now + 60).valid("a.b.c", 0),
            Some(analyst())
        );
        assert_eq!(remembered(None, now + 60).valid("x.y.z", 0), None);
        assert_eq!(remembered(None, now - 60).valid("a.b.c", 0), None);
        assert_eq!(
            remembered(None, now - 60).valid("a.b.c", 90),
            Some(analyst())
        );
        assert_eq!(
            remembered(Some(now + 60), now + 120).valid("a.b.c", 0),
            None
        );
        assert_eq!(
            remembered(Some(now + 60), now + 120).valid("a.b.c", 90),
            Some(analyst())
        );
    }

    #[test]
    fn remembered_tokens_stay_bounded_and_out_of_debug_output() {
        let tokens = VerifiedTokens::default();
        let expires = get_current_timestamp() + 60;
        for i in 0..VERIFIED_CAPACITY + 10 {
            let known = VerifiedToken {
                identity: analyst(),
                not_before: None,
                expires,
            };
            tokens.remember(&format!("secret.token.{i}"), known);
        }
        assert!(tokens.0.lock().unwrap().len() <= VERIFIED_CAPACITY);
        assert!(!format!("{tokens:?}").contains("secret"));
    }
}
