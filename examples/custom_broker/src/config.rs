//! [`NatsConfig`]: the `[nats]` section of `qcluster.toml`.

use std::fmt;
use std::time::Duration;

use broker_core::{BrokerError, mask_url};
use serde::{Deserialize, Serialize};

/// Where and how to reach NATS. Read from the `[nats]` section of `qcluster.toml` (or
/// `QCLUSTER_NATS__URL=…`); unknown keys are refused.
///
/// `Debug` masks the password or token in `url`, so the config can be logged.
#[derive(Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL: `nats://host:4222`, with `user:password@` or a `token@` if the server wants
    /// one. Default `nats://127.0.0.1:4222`.
    pub url: String,
    /// How long connecting (and each JetStream API call) may take, in seconds. Default 5.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// First part of every stream and subject name this broker creates, so that several
    /// projects can share one server: 1 to 32 of `A-Z a-z 0-9 _ -`. Default `qcluster`.
    pub prefix: String,
    /// Copies of each stream in a clustered JetStream (1 on a single server). Default 1.
    pub replicas: usize,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".to_owned(),
            connect_timeout: Duration::from_secs(5),
            prefix: "qcluster".to_owned(),
            replicas: 1,
        }
    }
}

impl NatsConfig {
    /// The defaults with another `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks the values, naming the offending key (`nats.prefix`, …).
    pub fn validate(&self) -> Result<(), BrokerError> {
        if self.prefix.is_empty()
            || self.prefix.len() > 32
            || !self
                .prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        {
            return Err(BrokerError::config(
                "nats.prefix",
                "must be 1 to 32 characters of A-Z, a-z, 0-9, `_` and `-`",
            ));
        }
        if self.connect_timeout.is_zero() {
            return Err(BrokerError::config(
                "nats.connect_timeout",
                "must be greater than zero",
            ));
        }
        if !(1..=5).contains(&self.replicas) {
            return Err(BrokerError::config("nats.replicas", "must be 1 to 5"));
        }
        if !(self.url.starts_with("nats://")
            || self.url.starts_with("tls://")
            || self.url.starts_with("ws://")
            || self.url.starts_with("wss://"))
        {
            return Err(BrokerError::config(
                "nats.url",
                format!(
                    "{} is not a nats:// or tls:// URL",
                    masked_endpoint(&self.url)
                ),
            ));
        }
        Ok(())
    }

    /// `url` with its password or token replaced by `***`, for logs, errors and `info`.
    pub fn endpoint(&self) -> String {
        masked_endpoint(&self.url)
    }

    /// The secrets `url` carries (a password, or a token in the user position: see
    /// [`broker_core::url_password`]), so that messages from the client library can be
    /// scrubbed of them.
    pub(crate) fn secrets(&self) -> Vec<String> {
        broker_core::url_password(&self.url).into_iter().collect()
    }
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConfig")
            .field("url", &self.endpoint())
            .field("connect_timeout", &self.connect_timeout)
            .field("prefix", &self.prefix)
            .field("replicas", &self.replicas)
            .finish()
    }
}

/// [`mask_url`]: the password, or a token in the user position (`nats://s3cret@host`), masked.
pub(crate) fn masked_endpoint(url: &str) -> String {
    mask_url(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_and_tokens() {
        let c = NatsConfig::new("nats://app:hunter2@nats.internal:4222");
        assert_eq!(c.endpoint(), "nats://app:***@nats.internal:4222");
        assert!(!format!("{c:?}").contains("hunter2"));
        let t = NatsConfig::new("nats://s3cr3t-token@nats.internal:4222");
        assert_eq!(t.endpoint(), "nats://***@nats.internal:4222");
        assert_eq!(t.secrets(), vec!["s3cr3t-token".to_owned()]);
        assert_eq!(NatsConfig::default().endpoint(), "nats://127.0.0.1:4222");
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = NatsConfig {
            prefix: "a.b".into(),
            ..NatsConfig::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("nats.prefix")
        );
        c.prefix = "ok_Prefix-1".into();
        c.validate().unwrap();
        c.url = "http://x:pw@h".into();
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("nats.url") && !e.contains("pw"), "{e}");
    }

    #[test]
    fn reads_toml_like_values() {
        let c: NatsConfig =
            serde_json::from_str(r#"{"url": "nats://h:1", "connect_timeout": 0.5}"#).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert_eq!(c.prefix, "qcluster");
        let e = serde_json::from_str::<NatsConfig>(r#"{"uri": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown field `uri`"), "{e}");
    }
}
