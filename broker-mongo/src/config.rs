//! `[mongo]` settings.

use std::fmt;
use std::time::Duration;

use broker_core::{BrokerError, mask_url};
use serde::{Deserialize, Serialize};

/// `[mongo]`: where the MongoDB broker keeps its queue. Debug output masks the password in the
/// URL. Unknown keys are refused when read from a config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MongoConfig {
    /// A MongoDB connection string: `mongodb://user:pw@host:27017/?authSource=admin`
    /// (`mongodb+srv://` needs the crate feature `srv`).
    pub url: String,
    /// The database holding the queue, dead-letter and stats collections.
    pub database: String,
    /// The queue's collection. By default `qcluster_<queue>` (characters other than ASCII
    /// letters, digits, `-` and `_` replaced and a hash of the name appended). Setting it pins
    /// the name, so a config section that names a collection serves one queue only.
    pub collection: Option<String>,
    /// Longest wait to connect or to pick a server (the driver's `connectTimeoutMS` and
    /// `serverSelectionTimeoutMS`), in seconds; `ping` is bounded by it too.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
}

impl MongoConfig {
    /// A configuration for `url` with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            database: "qcluster".to_owned(),
            collection: None,
            connect_timeout: Duration::from_secs(5),
        }
    }

    /// Checks the names against MongoDB's rules, naming the offending key.
    pub(crate) fn validate(&self) -> Result<(), BrokerError> {
        let db = &self.database;
        if db.is_empty() || db.len() > 63 {
            return Err(BrokerError::config(
                "mongo.database",
                "must be 1 to 63 bytes long",
            ));
        }
        if let Some(c) = db.chars().find(|c| {
            matches!(
                c,
                '/' | '\\' | '.' | ' ' | '"' | '$' | '*' | '<' | '>' | ':' | '|' | '?' | '\0'
            )
        }) {
            return Err(BrokerError::config(
                "mongo.database",
                format!("must not contain {c:?}"),
            ));
        }
        if let Some(c) = &self.collection {
            if c.is_empty() || c.len() > 180 {
                return Err(BrokerError::config(
                    "mongo.collection",
                    "must be 1 to 180 bytes long",
                ));
            }
            if c.contains(['$', '\0']) || c.starts_with("system.") {
                return Err(BrokerError::config(
                    "mongo.collection",
                    "must not contain `$` or NUL, nor start with `system.`",
                ));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(BrokerError::config(
                "mongo.connect_timeout",
                "must be greater than zero",
            ));
        }
        Ok(())
    }
}

impl Default for MongoConfig {
    fn default() -> Self {
        Self::new("mongodb://127.0.0.1:27017")
    }
}

impl fmt::Debug for MongoConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoConfig")
            .field("url", &mask_url(&self.url))
            .field("database", &self.database)
            .field("collection", &self.collection)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// The collection of `queue` when none is configured: `qcluster_<queue>` where the name is
/// plain and short, else its plain characters (others as `_`, at most 48) plus a stable hash
/// of the whole name, so distinct queues never share a collection and no name breaks
/// MongoDB's rules (`$`, NUL, the 255-byte namespace).
pub(crate) fn default_collection(queue: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_';
    if queue.len() <= 64 && !queue.is_empty() && queue.chars().all(plain) {
        return format!("qcluster_{queue}");
    }
    let cleaned: String = queue
        .chars()
        .map(|c| if plain(c) { c } else { '_' })
        .take(48)
        .collect();
    format!("qcluster_{cleaned}~{:016x}", fnv1a(queue.as_bytes()))
}

/// FNV-1a, 64 bits: stable across processes, platforms and Rust versions (unlike `DefaultHasher`).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_masks_the_password() {
        let c = MongoConfig::new("mongodb://app:s3cr3t@db.example:27017/?authSource=admin");
        let d = format!("{c:?}");
        assert!(!d.contains("s3cr3t") && d.contains("db.example"), "{d}");
    }

    #[test]
    fn collection_names() {
        assert_eq!(default_collection("default"), "qcluster_default");
        let hostile = default_collection("x'; DROP $ TABLE\0 .\"`\\");
        assert!(!hostile.contains(['$', '\0', '.', ' ']), "{hostile}");
        assert_ne!(default_collection("a b"), default_collection("a_b"));
        assert_ne!(default_collection("a b"), default_collection("a.b"));
        assert!(default_collection(&"é".repeat(95)).len() < 100);
    }

    #[test]
    fn unknown_keys_and_bad_names_are_refused() {
        let e = serde_json::from_str::<MongoConfig>(r#"{"uri": "x"}"#);
        assert!(e.is_err());
        let c: MongoConfig =
            serde_json::from_str(r#"{"database": "a.b", "connect_timeout": 0.5}"#).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(500));
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("mongo.database")
        );
    }
}
