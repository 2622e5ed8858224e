//! Tokens: connection JWTs (`sub`, `exp`, `channels`, `info`) and
//! subscription JWTs (`sub`, `channel`, `exp`), checked with jsonwebtoken.

use std::collections::HashSet;

use bytes::Bytes;
use jsonwebtoken::{Algorithm, DecodingKey, Validation, errors::ErrorKind};
use serde::Deserialize;

use crate::config::{AuthConfig, ConfigError};

/// Who a connection is, from its token.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Identity {
    /// The `sub` claim (`""` for anonymous).
    pub user: String,
    /// The `exp` claim, in seconds since the Unix epoch.
    pub expires_at: Option<u64>,
    /// The `channels` claim: names and `*` patterns.
    pub channels: Vec<String>,
    /// The `info` claim, as JSON.
    pub info: Option<Bytes>,
}

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// Its `exp` has passed.
    #[error("token expired")]
    Expired,
    /// A bad signature, a malformed token, a wrong algorithm, missing claims.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// The server has no key to check tokens with.
    #[error("this server accepts no tokens (no key configured)")]
    NoKey,
    /// A valid subscription token, for another user or channel.
    #[error("the token is for another {0}")]
    NotFor(&'static str),
}

#[derive(Deserialize)]
struct ConnectClaims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    info: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct SubscribeClaims {
    sub: String,
    channel: String,
    exp: Option<u64>,
}

/// Checks tokens with the configured key.
#[derive(Clone)]
pub struct Verifier {
    key: Option<(DecodingKey, Algorithm)>,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("algorithm", &self.key.as_ref().map(|(_, a)| a))
            .finish()
    }
}

impl Verifier {
    /// The verifier for `auth` (reading its PEM file, if any).
    pub fn new(auth: &AuthConfig) -> Result<Self, ConfigError> {
        let pem = |path: &std::path::Path, setting: &str| {
            std::fs::read(path)
                .map_err(|e| ConfigError(format!("auth.{setting}: {}: {e}", path.display())))
        };
        let key = if let Some(secret) = &auth.hmac_secret {
            Some((
                DecodingKey::from_secret(secret.as_bytes()),
                Algorithm::HS256,
            ))
        } else if let Some(path) = &auth.rsa_public_key {
            let key = DecodingKey::from_rsa_pem(&pem(path, "rsa_public_key")?).map_err(|e| {
                ConfigError(format!("auth.rsa_public_key: {}: {e}", path.display()))
            })?;
            Some((key, Algorithm::RS256))
        } else if let Some(path) = &auth.ecdsa_public_key {
            let key = DecodingKey::from_ec_pem(&pem(path, "ecdsa_public_key")?).map_err(|e| {
                ConfigError(format!("auth.ecdsa_public_key: {}: {e}", path.display()))
            })?;
            Some((key, Algorithm::ES256))
        } else {
            None
        };
        Ok(Verifier { key })
    }

    fn decode<T: serde::de::DeserializeOwned>(&self, token: &str) -> Result<T, AuthError> {
        let (key, alg) = self.key.as_ref().ok_or(AuthError::NoKey)?;
        let mut validation = Validation::new(*alg);
        // `exp` is checked when present; tokens may leave it out.
        validation.required_spec_claims = HashSet::new();
        validation.validate_exp = true;
        validation.leeway = 0;
        jsonwebtoken::decode::<T>(token, key, &validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                _ => AuthError::Invalid(e.to_string()),
            })
    }

    /// Checks a connection token.
    pub fn connect(&self, token: &str) -> Result<Identity, AuthError> {
        let claims: ConnectClaims = self.decode(token)?;
        if claims.sub.is_empty() {
            return Err(AuthError::Invalid("`sub` is empty".into()));
        }
        let info = match claims.info {
            None => None,
            Some(v @ serde_json::Value::Object(_)) => Some(Bytes::from(v.to_string())),
            Some(_) => return Err(AuthError::Invalid("`info` must be an object".into())),
        };
        Ok(Identity {
            user: claims.sub,
            expires_at: claims.exp,
            channels: claims.channels,
            info,
        })
    }

    /// Checks a subscription token for `user` and `channel`; returns its
    /// expiry.
    pub fn subscribe(
        &self,
        token: &str,
        user: &str,
        channel: &str,
    ) -> Result<Option<u64>, AuthError> {
        let claims: SubscribeClaims = self.decode(token)?;
        if claims.sub != user {
            return Err(AuthError::NotFor("user"));
        }
        if claims.channel != channel {
            return Err(AuthError::NotFor("channel"));
        }
        Ok(claims.exp)
    }
}

/// Whether `channel` matches one of `patterns` (exact names, or `*`
/// matching any run of characters).
pub fn channel_allowed(patterns: &[String], channel: &str) -> bool {
    patterns
        .iter()
        .any(|p| glob(p.as_bytes(), channel.as_bytes()))
}

fn glob(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative wildcard matching with backtracking to the last `*`.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == b'*' {
            star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && pattern[p] == text[t] {
            p += 1;
            t += 1;
        } else if let Some((sp, st)) = star {
            p = sp + 1;
            t = st + 1;
            star = Some((sp, st + 1));
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(channel_allowed(&p(&["chat:*"]), "chat:lobby"));
        assert!(channel_allowed(&p(&["a:b"]), "a:b"));
        assert!(!channel_allowed(&p(&["a:b"]), "a:bc"));
        assert!(channel_allowed(&p(&["*:x*y"]), "n:xaay"));
        assert!(!channel_allowed(&p(&["*:x*y"]), "n:xaaz"));
        assert!(!channel_allowed(&p(&["chat:*"]), "news:a"));
        assert!(!channel_allowed(&[], "x"));
    }
}
