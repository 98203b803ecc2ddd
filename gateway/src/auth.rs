//! Analyst authentication: signed JWTs (verified against the issuer's key set) or bearer
//! tokens whose SHA-256 is listed in the config. Flight SQL clients may also use Basic auth
//! in the handshake (user name + token or JWT as password); the handshake answers with the
//! bearer token to use on later calls.

use base64::Engine;
use base64::alphabet::STANDARD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use sha2::{Digest, Sha256};
use tally_common::identity::{Identity, JwtVerifier};
use tally_common::{ErrorCode, TallyError};
use tonic::metadata::MetadataMap;

use crate::config::UserConfig;

/// The known analysts, and the JWT issuer when one is configured.
#[derive(Debug, Clone, Default)]
pub struct Users {
    users: Vec<UserConfig>,
    jwt: Option<JwtVerifier>,
}

/// Hex SHA-256 of a token, as stored in the config.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

fn unauthenticated(message: &str) -> TallyError {
    TallyError::new(ErrorCode::Unauthenticated, message)
}

impl Users {
    /// Users from the config, and JWTs verified by `jwt`.
    pub fn new(users: Vec<UserConfig>, jwt: Option<JwtVerifier>) -> Self {
        Users { users, jwt }
    }

    fn by_token(&self, token: &str) -> Option<Identity> {
        let hash = token_hash(token);
        self.users
            .iter()
            .find(|u| u.token_sha256.eq_ignore_ascii_case(&hash))
            .map(|u| Identity {
                user: u.name.clone(),
                groups: u.groups.clone(),
                approvals: u
                    .projects
                    .iter()
                    .map(|project| (project.clone(), u.purposes.clone()))
                    .collect(),
                default_project: u.default_project.clone(),
                default_purpose: u.default_purpose.clone(),
            })
    }

    /// Authenticates a call carrying `authorization: Bearer <token>`: the identity, and the
    /// token itself when it is a signed JWT (forwarded to the trusts, which verify it again).
    pub fn bearer(&self, metadata: &MetadataMap) -> Result<(Identity, Option<String>), TallyError> {
        let header = authorization(metadata)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or_else(|| unauthenticated("expected 'authorization: Bearer <token>'"))?;
        let token = token.trim();
        if let Some(jwt) = &self.jwt
            && JwtVerifier::looks_like_jwt(token)
        {
            return Ok((jwt.verify(token)?, Some(token.to_string())));
        }
        self.by_token(token)
            .map(|identity| (identity, None))
            .ok_or_else(|| unauthenticated("unknown or revoked token"))
    }

    /// Authenticates a handshake with Basic (user:token) or Bearer credentials; returns the
    /// identity and the token the client should send as a bearer token from now on.
    pub fn handshake(&self, metadata: &MetadataMap) -> Result<(Identity, String), TallyError> {
        let header = authorization(metadata)?;
        if let Some(encoded) = header.strip_prefix("Basic ") {
            // Some clients (the ADBC driver) leave out the base64 padding.
            let lenient = GeneralPurpose::new(
                &STANDARD,
                GeneralPurposeConfig::new()
                    .with_decode_padding_mode(DecodePaddingMode::Indifferent),
            );
            let decoded = lenient
                .decode(encoded.trim())
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| unauthenticated("Basic credentials are not valid base64 text"))?;
            let (user, token) = decoded
                .split_once(':')
                .ok_or_else(|| unauthenticated("Basic credentials must be user:token"))?;
            let identity = match &self.jwt {
                Some(jwt) if JwtVerifier::looks_like_jwt(token) => Some(jwt.verify(token)?),
                Some(_) | None => self.by_token(token),
            }
            .filter(|identity| identity.user == user)
            .ok_or_else(|| unauthenticated("unknown user or wrong token"))?;
            return Ok((identity, token.to_string()));
        }
        let (identity, _) = self.bearer(metadata)?;
        let token = header.trim_start_matches("Bearer ").trim().to_string();
        Ok((identity, token))
    }
}

fn authorization(metadata: &MetadataMap) -> Result<&str, TallyError> {
    metadata
        .get("authorization")
        .ok_or_else(|| {
            unauthenticated(
                "credentials required: send a bearer token or Basic auth in the handshake",
            )
        })?
        .to_str()
        .map_err(|_| unauthenticated("the authorization header is not text"))
}
