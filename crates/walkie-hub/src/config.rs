//! The hub's configuration: auth and channel namespaces, from a TOML file.
//!
//! ```toml
//! [auth]
//! hmac_secret = "change me"          # HS256 tokens; or rsa_public_key / ecdsa_public_key (PEM files)
//! anonymous = false                  # connections without a token
//! api_key = "backend secret"         # the HTTP publish API
//! allowed_origins = ["https://example.com"]   # browsers from elsewhere are refused (403)
//!
//! [default]                          # channels without a namespace
//! history_size = 0
//!
//! [namespaces.chat]
//! history_size = 100
//! history_ttl = "24h"
//! presence = true
//! join_leave = true
//! allow_publish = true
//! anonymous = false
//! private = false                    # true: only channels in the token's claims, or with a subscription token
//! max_message_size = "64K"
//! overflow = "disconnect"            # or "latest_per_key"
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::channel::ChannelName;
use crate::publication::HistoryOptions;
use crate::queue::OverflowPolicy;

/// Why a configuration was refused; the message names the setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

/// Everything the hub is configured with.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HubConfig {
    /// Who may connect and how tokens are checked.
    #[serde(default)]
    pub auth: AuthConfig,
    /// Channels without a `:`; `None`: such channels are refused.
    #[serde(default)]
    pub default: Option<NamespaceConfig>,
    /// Namespaces by name.
    #[serde(default)]
    pub namespaces: HashMap<String, NamespaceConfig>,
}

/// Auth settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The HS256 secret for connection and subscription tokens.
    pub hmac_secret: Option<String>,
    /// A PEM file with the RSA public key for RS256 tokens.
    pub rsa_public_key: Option<PathBuf>,
    /// A PEM file with the EC (P-256) public key for ES256 tokens.
    pub ecdsa_public_key: Option<PathBuf>,
    /// Whether connections without a token are accepted (as user `""`).
    #[serde(default)]
    pub anonymous: bool,
    /// The key the HTTP API requires (`Authorization: apikey KEY`); the API
    /// is off without one.
    pub api_key: Option<String>,
    /// Origins browsers may connect from; empty: any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// The audience tokens must name in `aud` (a string, or one element of
    /// an array); unset: `aud` is not checked.
    pub audience: Option<String>,
    /// The issuer tokens must name in `iss`; unset: `iss` is not checked.
    pub issuer: Option<String>,
}

/// One namespace's options. Every field has a default.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceConfig {
    /// Messages kept in each channel's history; 0: none (no recovery).
    /// Default 100.
    pub history_size: usize,
    /// How long a message is kept, e.g. "90s", "24h". Default 24h.
    #[serde(deserialize_with = "duration")]
    pub history_ttl: Duration,
    /// Whether presence is kept (and can be asked for). Default false.
    pub presence: bool,
    /// Whether subscribers get join and leave pushes. Default false.
    pub join_leave: bool,
    /// Whether clients may publish (the HTTP API always may). Default false.
    pub allow_publish: bool,
    /// Whether anonymous connections may subscribe (and publish, if
    /// allowed). Default false.
    pub anonymous: bool,
    /// Whether subscribing needs the channel in the token's `channels`
    /// claim or a subscription token; otherwise any connected user may.
    /// Default false.
    pub private: bool,
    /// The largest message a client may publish, in bytes ("64K").
    /// Default 64 KiB.
    #[serde(deserialize_with = "size")]
    pub max_message_size: usize,
    /// What a slow subscriber's full queue does: "disconnect" or
    /// "latest_per_key". Default "disconnect".
    #[serde(deserialize_with = "overflow")]
    pub overflow: OverflowPolicy,
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        NamespaceConfig {
            history_size: 100,
            history_ttl: Duration::from_secs(24 * 3600),
            presence: false,
            join_leave: false,
            allow_publish: false,
            anonymous: false,
            private: false,
            max_message_size: 64 * 1024,
            overflow: OverflowPolicy::Disconnect,
        }
    }
}

impl NamespaceConfig {
    /// Everything on, anonymous allowed: the built-in namespaces when no
    /// configuration file is given.
    pub fn open() -> Self {
        NamespaceConfig {
            presence: true,
            join_leave: true,
            allow_publish: true,
            anonymous: true,
            ..NamespaceConfig::default()
        }
    }

    /// History options for publishes, if the namespace keeps history.
    pub fn history(&self) -> Option<HistoryOptions> {
        (self.history_size > 0).then_some(HistoryOptions {
            size: self.history_size,
            ttl: self.history_ttl,
        })
    }
}

impl Default for HubConfig {
    /// With no configuration file: anonymous connections, an open default
    /// namespace, and the namespaces the demo pages use: `rooms` (where rooms
    /// by URL live) and `chat` (open), `notifications` (user channels that
    /// backends publish to), `scores` (state: the latest per key for slow
    /// clients), `game` (positions: no history) and `dashboard` (the
    /// server's own metrics and logs).
    fn default() -> Self {
        let open = NamespaceConfig::open;
        let namespaces = [
            ("rooms", open()),
            ("chat", open()),
            (
                "notifications",
                NamespaceConfig {
                    history_size: 20,
                    allow_publish: false,
                    presence: false,
                    join_leave: false,
                    ..open()
                },
            ),
            (
                "scores",
                NamespaceConfig {
                    history_size: 10,
                    overflow: OverflowPolicy::LatestPerKey,
                    join_leave: false,
                    ..open()
                },
            ),
            (
                "game",
                NamespaceConfig {
                    history_size: 0,
                    overflow: OverflowPolicy::LatestPerKey,
                    max_message_size: 1024,
                    ..open()
                },
            ),
            (
                "dashboard",
                NamespaceConfig {
                    history_size: 120,
                    allow_publish: false,
                    join_leave: false,
                    ..open()
                },
            ),
        ];
        HubConfig {
            auth: AuthConfig {
                anonymous: true,
                ..AuthConfig::default()
            },
            default: Some(open()),
            namespaces: namespaces
                .into_iter()
                .map(|(name, ns)| (name.to_owned(), ns))
                .collect(),
        }
    }
}

impl HubConfig {
    /// Parses and checks a TOML configuration.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let config: HubConfig = toml::from_str(text).map_err(|e| ConfigError(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Rejects settings that cannot work.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for name in self.namespaces.keys() {
            if name.is_empty() || name.contains([':', '#']) || name.chars().any(char::is_whitespace)
            {
                return Err(ConfigError(format!(
                    "namespaces.{name}: a namespace name is non-empty, without `:`, `#` or spaces"
                )));
            }
            if name.starts_with('$') {
                return Err(ConfigError(format!(
                    "namespaces.{name}: names starting with `$` are reserved for walkie's own channels"
                )));
            }
        }
        let keys = [
            self.auth.hmac_secret.is_some(),
            self.auth.rsa_public_key.is_some(),
            self.auth.ecdsa_public_key.is_some(),
        ];
        if keys.iter().filter(|k| **k).count() > 1 {
            return Err(ConfigError(
                "auth: give one of hmac_secret, rsa_public_key, ecdsa_public_key".into(),
            ));
        }
        if self.auth.hmac_secret.as_deref() == Some("") {
            return Err(ConfigError("auth.hmac_secret: must not be empty".into()));
        }
        if self.auth.api_key.as_deref() == Some("") {
            return Err(ConfigError("auth.api_key: must not be empty".into()));
        }
        Ok(())
    }

    /// The namespace of `channel`, if configured.
    pub fn namespace(&self, channel: &ChannelName) -> Option<&NamespaceConfig> {
        match channel.namespace() {
            Some(ns) => self.namespaces.get(ns),
            None => self.default.as_ref(),
        }
    }
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

fn size<'de, D: serde::Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        N(usize),
        S(String),
    }
    match Size::deserialize(d)? {
        Size::N(n) if n > 0 => Ok(n),
        Size::N(_) => Err(serde::de::Error::custom("must be at least 1 byte")),
        Size::S(s) => parse_size(&s).map_err(serde::de::Error::custom),
    }
}

fn overflow<'de, D: serde::Deserializer<'de>>(d: D) -> Result<OverflowPolicy, D::Error> {
    match String::deserialize(d)?.as_str() {
        "disconnect" => Ok(OverflowPolicy::Disconnect),
        "latest_per_key" => Ok(OverflowPolicy::LatestPerKey),
        other => Err(serde::de::Error::custom(format!(
            "`{other}`: use \"disconnect\" or \"latest_per_key\""
        ))),
    }
}

/// "500ms", "90s", "5m", "24h", "7d".
fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (examples: 500ms, 90s, 5m, 24h, 7d)"))?;
    let secs = match unit {
        "ms" => return Ok(Duration::from_millis(n)),
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86400,
        _ => return Err(format!("`{s}`: unknown unit (use ms, s, m, h or d)")),
    };
    Ok(Duration::from_secs(n.saturating_mul(secs)))
}

/// "65536", "64K", "16M".
fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: usize = num
        .parse()
        .map_err(|_| format!("`{s}` is not a size (examples: 65536, 64K, 16M)"))?;
    let mult = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        _ => return Err(format!("`{s}`: unknown unit (use K or M)")),
    };
    match n.checked_mul(mult) {
        Some(0) => Err("must be at least 1 byte".into()),
        Some(b) => Ok(b),
        None => Err(format!("`{s}` is too large")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses() {
        let c = HubConfig::from_toml(
            r#"
            [auth]
            hmac_secret = "s"
            api_key = "k"
            [default]
            history_size = 0
            [namespaces.scores]
            history_size = 10
            history_ttl = "90s"
            overflow = "latest_per_key"
            max_message_size = "1K"
            "#,
        )
        .unwrap();
        let scores = c
            .namespace(&ChannelName::new("scores:cup").unwrap())
            .unwrap();
        assert_eq!(scores.history_ttl, Duration::from_secs(90));
        assert_eq!(scores.overflow, OverflowPolicy::LatestPerKey);
        assert_eq!(scores.max_message_size, 1024);
        assert!(
            c.namespace(&ChannelName::new("plain").unwrap())
                .unwrap()
                .history()
                .is_none()
        );
        assert!(c.namespace(&ChannelName::new("other:x").unwrap()).is_none());
    }

    #[test]
    fn mistakes_name_the_setting() {
        for (text, needle) in [
            ("[namespaces.a]\nhistory_ttl = \"soon\"", "history_ttl"),
            ("[namespaces.a]\noverflow = \"drop\"", "latest_per_key"),
            ("[namespaces.a]\nhistroy_size = 1", "histroy_size"),
            ("[namespaces.\"$walkie\"]", "reserved"),
            ("[auth]\nhmac_secret = \"\"", "hmac_secret"),
            (
                "[auth]\nhmac_secret = \"a\"\nrsa_public_key = \"k.pem\"",
                "one of",
            ),
        ] {
            let e = HubConfig::from_toml(text).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
    }
}
