//! Tokens: connection JWTs (`sub`, `exp`, `channels`, `info`) and
//! subscription JWTs (`sub`, `channel`, `exp`), checked with jsonwebtoken.
//!
//! Both kinds are signed with the same key, so each check refuses the other
//! kind: a subscription token (it has `channel`) is no connection token, and
//! a connection token (no `channel`) grants no subscription. `nbf` is
//! honoured when present. `aud` and `iss` are checked (and required) when
//! `auth.audience` and `auth.issuer` are set, and ignored otherwise
//! (identity providers add them routinely).

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
    /// Its `nbf` (not before) has not come yet.
    #[error("token not valid yet (nbf)")]
    NotYetValid,
}

#[derive(Deserialize)]
struct ConnectClaims {
    sub: String,
    exp: Option<u64>,
    #[serde(default)]
    channels: Vec<String>,
    info: Option<serde_json::Value>,
    /// Whether the token has a `channel` claim (even `null`): then it is a
    /// subscription token, which must not open a connection.
    #[serde(default, deserialize_with = "present")]
    channel: bool,
}

/// `true` for any value: marks a claim as present.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    serde::de::IgnoredAny::deserialize(d).map(|_| true)
}

#[derive(Deserialize)]
struct SubscribeClaims {
    sub: String,
    channel: String,
    /// Required: see [`Verifier::validation`].
    exp: u64,
}

/// Checks tokens with the configured key.
#[derive(Clone)]
pub struct Verifier {
    key: Option<DecodingKey>,
    /// What connection and subscription tokens are checked against.
    connection: Validation,
    subscription: Validation,
    /// `auth.anonymous`: a connection token may then name the anonymous
    /// user (`sub` = `""`), as a connection without a token may.
    anonymous: bool,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field(
                "algorithm",
                &self.key.as_ref().map(|_| self.connection.algorithms[0]),
            )
            .field("audience", &self.connection.aud)
            .field("issuer", &self.connection.iss)
            .field("anonymous", &self.anonymous)
            .finish()
    }
}

/// Which kind of token a check expects.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Connection,
    Subscription,
}

impl Verifier {
    /// The verifier for `auth` (reading its PEM file, if any).
    pub fn new(auth: &AuthConfig) -> Result<Self, ConfigError> {
        let pem = |path: &std::path::Path, setting: &str| {
            std::fs::read(path)
                .map_err(|e| ConfigError(format!("auth.{setting}: {}: {e}", path.display())))
        };
        let (key, alg) = if let Some(secret) = &auth.hmac_secret {
            (
                Some(DecodingKey::from_secret(secret.as_bytes())),
                Algorithm::HS256,
            )
        } else if let Some(path) = &auth.rsa_public_key {
            let key = DecodingKey::from_rsa_pem(&pem(path, "rsa_public_key")?).map_err(|e| {
                ConfigError(format!("auth.rsa_public_key: {}: {e}", path.display()))
            })?;
            (Some(key), Algorithm::RS256)
        } else if let Some(path) = &auth.ecdsa_public_key {
            let key = DecodingKey::from_ec_pem(&pem(path, "ecdsa_public_key")?).map_err(|e| {
                ConfigError(format!("auth.ecdsa_public_key: {}: {e}", path.display()))
            })?;
            (Some(key), Algorithm::ES256)
        } else {
            (None, Algorithm::HS256)
        };
        Ok(Verifier {
            key,
            connection: Self::validation(alg, Kind::Connection, auth),
            subscription: Self::validation(alg, Kind::Subscription, auth),
            anonymous: auth.anonymous,
        })
    }

    /// What jsonwebtoken checks for `kind`: `exp` and `nbf` when present,
    /// without leeway (the server's clock decides), `exp` required only in
    /// subscription tokens (a grant of a channel that never expires could
    /// not be taken back), and `aud` and `iss` required and checked only
    /// when configured: with no audience set, jsonwebtoken would refuse
    /// every token that has `aud`.
    fn validation(alg: Algorithm, kind: Kind, auth: &AuthConfig) -> Validation {
        let mut validation = Validation::new(alg);
        validation.required_spec_claims = match kind {
            Kind::Connection => HashSet::new(),
            Kind::Subscription => HashSet::from(["exp".to_owned()]),
        };
        validation.validate_exp = true;
        validation.validate_nbf = true;
        validation.leeway = 0;
        match &auth.audience {
            Some(audience) => {
                validation.set_audience(&[audience]);
                validation.required_spec_claims.insert("aud".to_owned());
            }
            None => validation.validate_aud = false,
        }
        if let Some(issuer) = &auth.issuer {
            validation.set_issuer(&[issuer]);
            validation.required_spec_claims.insert("iss".to_owned());
        }
        validation
    }

    fn decode<T: serde::de::DeserializeOwned>(
        &self,
        token: &str,
        kind: Kind,
    ) -> Result<T, AuthError> {
        let key = self.key.as_ref().ok_or(AuthError::NoKey)?;
        let validation = match kind {
            Kind::Connection => &self.connection,
            Kind::Subscription => &self.subscription,
        };
        jsonwebtoken::decode::<T>(token, key, validation)
            .map(|data| data.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::ImmatureSignature => AuthError::NotYetValid,
                _ => AuthError::Invalid(e.to_string()),
            })
    }

    /// Checks a connection token (at `connect`, and at `refresh`).
    pub fn connect(&self, token: &str) -> Result<Identity, AuthError> {
        let claims: ConnectClaims = self.decode(token, Kind::Connection)?;
        if claims.channel {
            return Err(AuthError::Invalid(
                "a subscription token (it has `channel`) is not a connection token".into(),
            ));
        }
        if claims.sub.is_empty() && !self.anonymous {
            return Err(AuthError::Invalid(
                "`sub` is empty, and anonymous connections are not allowed".into(),
            ));
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
    /// expiry (always `Some`: subscription tokens must have `exp`).
    pub fn subscribe(
        &self,
        token: &str,
        user: &str,
        channel: &str,
    ) -> Result<Option<u64>, AuthError> {
        let claims: SubscribeClaims = self.decode(token, Kind::Subscription)?;
        if claims.sub != user {
            return Err(AuthError::NotFor("user"));
        }
        if claims.channel != channel {
            return Err(AuthError::NotFor("channel"));
        }
        Ok(Some(claims.exp))
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
    use serde_json::{Value, json};

    const SECRET: &str = "auth-test-secret";

    fn verifier(anonymous: bool) -> Verifier {
        Verifier::new(&AuthConfig {
            hmac_secret: Some(SECRET.into()),
            anonymous,
            ..AuthConfig::default()
        })
        .unwrap()
    }

    fn token(claims: Value) -> String {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::default(),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
        )
        .unwrap()
    }

    fn now() -> u64 {
        jsonwebtoken::get_current_timestamp()
    }

    #[test]
    fn an_empty_sub_is_the_anonymous_user_only_where_anonymous_is_allowed() {
        let anonymous = token(json!({"sub": "", "exp": now() + 60}));
        let id = verifier(true).connect(&anonymous).unwrap();
        assert_eq!(id.user, "");
        assert!(matches!(
            verifier(false).connect(&anonymous),
            Err(AuthError::Invalid(_))
        ));
    }

    #[test]
    fn a_subscription_token_is_not_a_connection_token() {
        let v = verifier(true);
        for channel in [json!("chat:a"), Value::Null] {
            let t = token(json!({"sub": "42", "channel": channel, "exp": now() + 60}));
            assert!(
                matches!(v.connect(&t), Err(AuthError::Invalid(_))),
                "channel {channel}"
            );
        }
        let exp = now() + 60;
        let t = token(json!({"sub": "42", "channel": "chat:a", "exp": exp}));
        assert_eq!(v.subscribe(&t, "42", "chat:a"), Ok(Some(exp)));
    }

    #[test]
    fn a_configured_audience_and_issuer_are_required() {
        let v = Verifier::new(&AuthConfig {
            hmac_secret: Some(SECRET.into()),
            audience: Some("walkie".into()),
            issuer: Some("https://id.example".into()),
            ..AuthConfig::default()
        })
        .unwrap();
        let iss = "https://id.example";
        for aud in [json!("walkie"), json!(["api", "walkie"])] {
            let t = token(json!({"sub": "42", "aud": aud, "iss": iss}));
            assert_eq!(v.connect(&t).map(|id| id.user), Ok("42".into()), "{aud}");
            let t = token(
                json!({"sub": "42", "channel": "c", "exp": now() + 60, "aud": aud, "iss": iss}),
            );
            assert!(v.subscribe(&t, "42", "c").is_ok(), "{aud}");
        }
        for claims in [
            json!({"sub": "42", "iss": iss}),
            json!({"sub": "42", "aud": "api", "iss": iss}),
            json!({"sub": "42", "aud": ["api"], "iss": iss}),
            json!({"sub": "42", "aud": "walkie"}),
            json!({"sub": "42", "aud": "walkie", "iss": "https://other.example"}),
        ] {
            let t = token(claims.clone());
            assert!(
                matches!(v.connect(&t), Err(AuthError::Invalid(_))),
                "{claims}"
            );
            let mut sub = claims.clone();
            sub["channel"] = json!("c");
            sub["exp"] = json!(now() + 60);
            let t = token(sub);
            assert!(
                matches!(v.subscribe(&t, "42", "c"), Err(AuthError::Invalid(_))),
                "{claims}"
            );
        }
    }

    #[test]
    fn an_audience_is_accepted_when_none_is_configured() {
        let v = verifier(false);
        for aud in [json!("walkie"), json!(["walkie", "api"])] {
            let t = token(json!({"sub": "42", "aud": aud}));
            assert_eq!(v.connect(&t).map(|id| id.user), Ok("42".into()), "{aud}");
            let t = token(json!({"sub": "42", "channel": "c", "exp": now() + 60, "aud": aud}));
            assert!(v.subscribe(&t, "42", "c").is_ok(), "{aud}");
        }
    }

    #[test]
    fn nbf_is_honoured() {
        let v = verifier(false);
        let early = token(json!({"sub": "42", "nbf": now() + 3600}));
        assert_eq!(v.connect(&early), Err(AuthError::NotYetValid));
        let early =
            token(json!({"sub": "42", "channel": "c", "exp": now() + 7200, "nbf": now() + 3600}));
        assert_eq!(v.subscribe(&early, "42", "c"), Err(AuthError::NotYetValid));
        let started = token(json!({"sub": "42", "nbf": now() - 10}));
        assert!(v.connect(&started).is_ok());
    }

    #[test]
    fn a_subscription_token_needs_exp_and_a_connection_token_does_not() {
        let v = verifier(false);
        let forever = token(json!({"sub": "42", "channel": "c"}));
        assert!(matches!(
            v.subscribe(&forever, "42", "c"),
            Err(AuthError::Invalid(_))
        ));
        let id = v.connect(&token(json!({"sub": "42"}))).unwrap();
        assert_eq!(id.expires_at, None);
    }

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
