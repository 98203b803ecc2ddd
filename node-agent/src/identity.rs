//! Who is asking, as this trust decides it: the analyst's JWT, forwarded by the gateway, is
//! verified here against the key set the trust trusts, and the request's project and
//! purpose must be among the token's signed approvals. Without a token, the gateway's word
//! is taken only when the trust's configuration opts in.

use tally_common::admission::RequestIdentity;
use tally_common::flight::{
    ANALYST_TOKEN_HEADER, PROJECT_HEADER, PURPOSE_HEADER, header_text, identity_from_headers,
};
use tally_common::identity::JwtVerifier;
use tally_common::{ErrorCode, TallyError};
use tonic::metadata::MetadataMap;

use crate::config::IdentityConfig;
use crate::error::NodeError;

/// Longest token accepted, in bytes.
const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// The node's identity check.
#[derive(Debug)]
pub struct NodeIdentity {
    jwt: Option<JwtVerifier>,
    trust_gateway_identity: bool,
}

fn unauthenticated(message: &str) -> TallyError {
    TallyError::new(ErrorCode::Unauthenticated, message)
}

impl NodeIdentity {
    /// The check `config` describes (its key set is read now).
    pub fn load(config: &IdentityConfig) -> Result<Self, NodeError> {
        let jwt = config
            .jwt
            .as_ref()
            .map(|jwt| JwtVerifier::load(jwt).map_err(NodeError::Identity))
            .transpose()?;
        Ok(NodeIdentity {
            jwt,
            trust_gateway_identity: config.trust_gateway_identity,
        })
    }

    /// The verified identity of a request, or why there is none.
    pub fn verify(&self, metadata: &MetadataMap) -> Result<RequestIdentity, TallyError> {
        let token = match metadata.get(ANALYST_TOKEN_HEADER) {
            None => None,
            Some(value) => Some(
                value
                    .to_str()
                    .ok()
                    .filter(|t| t.len() <= MAX_TOKEN_BYTES)
                    .ok_or_else(|| unauthenticated("the analyst's token is not valid text"))?,
            ),
        };
        match (token, &self.jwt) {
            (Some(token), Some(jwt)) => jwt.verify(token)?.for_request(
                &header_text(metadata, PROJECT_HEADER),
                &header_text(metadata, PURPOSE_HEADER),
            ),
            (Some(_), None) => Err(unauthenticated(
                "this trust verifies no tokens: it is not configured with an identity provider",
            )),
            (None, _) if self.trust_gateway_identity => {
                let identity = identity_from_headers(metadata);
                if identity.user.is_empty() {
                    return Err(unauthenticated("the request names no analyst"));
                }
                Ok(identity)
            }
            (None, _) => Err(unauthenticated(
                "the request carries no analyst token, and this trust does not take the gateway's word for who is asking",
            )),
        }
    }
}
