//! Settings shared by every adapter, and helpers that keep secrets out of messages.

use std::time::Duration;

use crate::BrokerError;

/// Longest queue name any adapter must accept (it fits an indexed `VARCHAR` on MySQL).
pub const MAX_QUEUE_NAME: usize = 191;

/// Longest lease accepted (a year): bounds the arithmetic on server clocks.
pub const MAX_RETRY: Duration = Duration::from_secs(365 * 24 * 3600);

/// The queue-level settings every adapter takes, whatever its server.
///
/// Mirrors Django Q's cluster keys: `bulk`, `retry`, `poll`; `queue` is Django Q's `list_key`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueSettings {
    /// Queue name. Any text up to [`MAX_QUEUE_NAME`] bytes; adapters send it as a bound value.
    pub queue: String,
    /// Most packages one `dequeue` returns.
    pub bulk: usize,
    /// Lease: how long a delivered package stays invisible before it is delivered again.
    pub retry: Duration,
    /// Longest time `dequeue` waits on an empty queue before returning an empty batch.
    pub wait: Duration,
    /// How often a waiting `dequeue` looks again when the broker cannot wake it.
    pub poll: Duration,
    /// Largest package accepted, in bytes; `None` takes the adapter's own limit.
    pub max_message_size: Option<usize>,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            queue: "default".to_owned(),
            bulk: 1,
            retry: Duration::from_secs(60),
            wait: Duration::from_secs(1),
            poll: Duration::from_millis(200),
            max_message_size: None,
        }
    }
}

impl QueueSettings {
    /// Settings for `queue` with every other value at its default.
    pub fn for_queue(queue: impl Into<String>) -> Self {
        Self {
            queue: queue.into(),
            ..Self::default()
        }
    }

    /// Checks the values against an adapter's limits, naming the offending key.
    pub fn validate(&self, max_bulk: usize) -> Result<(), BrokerError> {
        if self.queue.is_empty() {
            return Err(BrokerError::config("queue", "must not be empty"));
        }
        if self.queue.len() > MAX_QUEUE_NAME {
            return Err(BrokerError::config(
                "queue",
                format!(
                    "is {} bytes long; the limit is {MAX_QUEUE_NAME}",
                    self.queue.len()
                ),
            ));
        }
        if self.bulk == 0 {
            return Err(BrokerError::config("bulk", "must be at least 1"));
        }
        if self.bulk > max_bulk {
            return Err(BrokerError::config(
                "bulk",
                format!("is {}; this broker returns at most {max_bulk}", self.bulk),
            ));
        }
        if self.retry.is_zero() {
            return Err(BrokerError::config("retry", "must be greater than zero"));
        }
        if self.retry > MAX_RETRY {
            return Err(BrokerError::config("retry", "must be at most 365 days"));
        }
        if self.poll.is_zero() {
            return Err(BrokerError::config("poll", "must be greater than zero"));
        }
        if self.max_message_size == Some(0) {
            return Err(BrokerError::config(
                "max_message_size",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

/// Schemes whose user part (without a password) is a login name, not a secret.
const LOGIN_SCHEMES: &[&str] = &[
    "postgres",
    "postgresql",
    "mysql",
    "mariadb",
    "redis",
    "rediss",
    "amqp",
    "amqps",
    "mongodb",
    "mongodb+srv",
];

/// Returns `url` with its password (and any `password=` query value) replaced by `***`; a user
/// part without a password is masked too unless the scheme makes it a login name (SQL, Redis,
/// AMQP, MongoDB), since many servers take a token there (`nats://TOKEN@host`).
///
/// Anything that does not parse as a URL is cut to its scheme, so an odd string can't leak.
pub fn mask_url(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(mut url) => {
            if url.password().is_some() {
                // Only fails for URLs that cannot have a password, which this one has.
                let _ = url.set_password(Some("***"));
            } else if !url.username().is_empty() && !LOGIN_SCHEMES.contains(&url.scheme()) {
                // A lone user part is a token on many servers (`nats://TOKEN@host`): kept only
                // where the scheme makes it a login name.
                let _ = url.set_username("***");
            }
            let pairs: Vec<(String, String)> = url
                .query_pairs()
                .map(|(k, v)| {
                    let secret = secret_param(&k);
                    (
                        k.into_owned(),
                        if secret { "***".into() } else { v.into_owned() },
                    )
                })
                .collect();
            if !pairs.is_empty() {
                url.query_pairs_mut().clear().extend_pairs(pairs);
            }
            url.to_string()
        }
        // Unparsable (a bad port, say): the password may sit anywhere, so show the scheme only.
        Err(_) => match raw.split_once("://") {
            Some((scheme, _)) => format!("{scheme}://<unparsable URL hidden>"),
            None => "<unparsable URL hidden>".to_owned(),
        },
    }
}

/// Query parameters that carry a secret (`?password=`, `?pass=` as Redis socket URLs use, …).
fn secret_param(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password") || matches!(k.as_str(), "pass" | "secret" | "token")
}

/// The secret inside `url` (the password, a secret query parameter, or a lone user part that is
/// a token, see [`mask_url`]), if it has one, so that
/// messages can be scrubbed of it.
pub fn url_password(raw: &str) -> Option<String> {
    let url = url::Url::parse(raw).ok()?;
    if let Some(pw) = url.password() {
        return Some(
            percent_encoding::percent_decode_str(pw)
                .decode_utf8_lossy()
                .into_owned(),
        );
    }
    if let Some((_, v)) = url.query_pairs().find(|(k, _)| secret_param(k)) {
        return Some(v.into_owned());
    }
    // A lone user part that `mask_url` hides is a token: scrub it too.
    (!url.username().is_empty() && !LOGIN_SCHEMES.contains(&url.scheme())).then(|| {
        percent_encoding::percent_decode_str(url.username())
            .decode_utf8_lossy()
            .into_owned()
    })
}

/// Removes every occurrence of `secret` from `message`.
pub fn redact(message: &str, secret: Option<&str>) -> String {
    match secret {
        Some(s) if !s.is_empty() => message.replace(s, "***"),
        _ => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_passwords_and_query_secrets() {
        let m = mask_url("postgres://bob:hunter2@db.example:5432/app?sslmode=require&password=x9");
        assert!(!m.contains("hunter2") && !m.contains("x9"), "{m}");
        assert!(m.contains("db.example:5432") && m.contains("bob"), "{m}");
        assert_eq!(mask_url("sqlite://q.sqlite3"), "sqlite://q.sqlite3");
        assert_eq!(mask_url("nats://s3cr3t-tok@h:4222"), "nats://***@h:4222");
        assert_eq!(mask_url("postgres://app@db/x"), "postgres://app@db/x");
        assert!(!mask_url("weird://u:p@ss@h:1 x").contains("p@ss"));
        let bad_port = mask_url("postgres://h:99999/db?password=x9");
        assert!(
            !bad_port.contains("x9") && bad_port.starts_with("postgres://"),
            "{bad_port}"
        );
        let sock = "redis+unix:///run/redis.sock?db=0&pass=s0ck-pw";
        assert!(!mask_url(sock).contains("s0ck-pw"), "{}", mask_url(sock));
        assert_eq!(url_password(sock).as_deref(), Some("s0ck-pw"));
    }

    #[test]
    fn finds_and_redacts_the_password() {
        let pw = url_password("mysql://root:p%40ss@127.0.0.1/test").unwrap();
        assert_eq!(pw, "p@ss");
        assert_eq!(redact("auth p@ss failed", Some(&pw)), "auth *** failed");
    }

    #[test]
    fn validation_names_the_key() {
        let mut s = QueueSettings::for_queue("q");
        s.bulk = 0;
        let e = s.validate(10).unwrap_err();
        assert!(e.to_string().contains("`bulk`"), "{e}");
        s.bulk = 11;
        assert!(
            s.validate(10)
                .unwrap_err()
                .to_string()
                .contains("at most 10")
        );
        let long = QueueSettings::for_queue("x".repeat(MAX_QUEUE_NAME + 1));
        assert!(
            long.validate(10)
                .unwrap_err()
                .to_string()
                .contains("`queue`")
        );
    }
}

/// Serde helpers for adapter config types: a duration written as seconds (`5`, `0.25`).
///
/// ```
/// #[derive(serde::Deserialize, serde::Serialize)]
/// struct MyConfig {
///     #[serde(with = "broker_core::secs")]
///     connect_timeout: std::time::Duration,
/// }
/// ```
pub mod secs {
    use std::fmt;
    use std::time::Duration;

    use serde::{Deserializer, Serializer};

    /// Writes the duration as a number of seconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(d.as_secs_f64())
    }

    /// Reads a non-negative, finite number of seconds (integer or fraction).
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of seconds")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<Duration, E> {
                Ok(Duration::from_secs(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<Duration, E> {
                u64::try_from(v)
                    .map(Duration::from_secs)
                    .map_err(|_| E::custom("must not be negative"))
            }
            fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<Duration, E> {
                Duration::try_from_secs_f64(v)
                    .map_err(|_| E::custom("must be a finite, non-negative number of seconds"))
            }
        }
        d.deserialize_any(V)
    }
}
