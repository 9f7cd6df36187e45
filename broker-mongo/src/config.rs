//! `[mongo]` settings.

use std::fmt;
use std::time::Duration;

use broker_core::{BrokerError, mask_url, url_password};
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

/// The user part, host list and options of `url` split the way the driver splits them: options
/// after the first `?`, user part before the last `@` ahead of them. `None` for a string without
/// `://`.
fn driver_split(url: &str) -> Option<(&str, Option<&str>, &str, Option<&str>)> {
    let (scheme, rest) = url.split_once("://")?;
    let (pre, query) = match rest.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (rest, None),
    };
    let (user_info, hosts) = match pre.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, pre),
    };
    Some((scheme, user_info, hosts, query))
}

/// True when the password seems to hold an unescaped `?`: the driver then cuts the URL inside
/// it and its parse errors quote pieces of it (as a host or an option).
pub(crate) fn password_cut_by_query(url: &str) -> bool {
    driver_split(url).is_some_and(|(_, user_info, _, query)| {
        user_info.is_none() && query.is_some_and(|q| q.contains('@'))
    })
}

/// Every form in which the URL's secret may show in a message, longest first: what
/// [`url_password`] finds, and the password as the driver reads it (after the first `:` of the
/// user part), raw and percent-decoded. `url_password` alone finds nothing in a replica-set URL
/// (`h1:27017,h2:27017` is no URL authority), the usual MongoDB form.
pub(crate) fn url_secrets(url: &str) -> Vec<String> {
    let mut out: Vec<String> = url_password(url).into_iter().collect();
    if let Some((_, Some(user_info), _, _)) = driver_split(url)
        && let Some((_, pw)) = user_info.split_once(':')
    {
        out.push(pw.to_owned());
        out.push(percent_decode(pw));
    }
    out.retain(|s| !s.is_empty());
    out.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    out.dedup();
    out
}

/// `url` as errors and `info` show it: [`mask_url`], or for what the `url` crate cannot parse
/// (a replica-set host list) the driver's reading with the password and secret-looking options
/// masked.
pub(crate) fn endpoint(url: &str) -> String {
    let masked = mask_url(url);
    if !masked.contains("<unparsable URL hidden>") || password_cut_by_query(url) {
        return masked;
    }
    let Some((scheme, user_info, hosts, query)) = driver_split(url) else {
        return masked;
    };
    let mut out = format!("{scheme}://");
    if let Some(u) = user_info {
        match u.split_once(':') {
            Some((user, _)) => out.push_str(&format!("{user}:***@")),
            None => out.push_str(&format!("{u}@")),
        }
    }
    out.push_str(hosts);
    if let Some(q) = query {
        let pairs: Vec<String> = q
            .split('&')
            .map(|pair| match pair.split_once('=') {
                Some((k, _)) if secret_option(k) => format!("{k}=***"),
                Some((k, v)) => format!("{k}={v}"),
                None => pair.to_owned(),
            })
            .collect();
        out.push('?');
        out.push_str(&pairs.join("&"));
    }
    out
}

/// Options whose value is a secret (`authMechanismProperties` may carry an AWS session token).
fn secret_option(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    k.contains("password")
        || k.contains("secret")
        || k.contains("token")
        || k == "pass"
        || k == "authmechanismproperties"
}

/// Percent-decoding (invalid escapes kept as they are), lossy on invalid UTF-8.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut k = 0;
    while k < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[k] == b'%'
            && k + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[k + 1]), hex(b[k + 2]))
        {
            out.push((h * 16 + l) as u8);
            k += 3;
        } else {
            out.push(b[k]);
            k += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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
    fn replica_set_urls_keep_their_password_out() {
        let rs = "mongodb://app:s%40cr3t@h1:27017,h2:27017/db?replicaSet=rs&authMechanismProperties=AWS_SESSION_TOKEN:tok9";
        assert_eq!(
            url_secrets(rs),
            vec!["s%40cr3t".to_owned(), "s@cr3t".to_owned()]
        );
        let e = endpoint(rs);
        assert_eq!(
            e,
            "mongodb://app:***@h1:27017,h2:27017/db?replicaSet=rs&authMechanismProperties=***"
        );
        // A `?` in the password: the driver cuts the URL there, so nothing of it is shown.
        let cut = "mongodb://app:Qw8?Zx7@h:27017/";
        assert!(password_cut_by_query(cut));
        let e = endpoint(cut);
        assert!(!e.contains("Qw8") && !e.contains("Zx7"), "{e}");
        assert!(!password_cut_by_query(rs));
        assert!(!password_cut_by_query("mongodb://h/?appName=x"));
        assert_eq!(url_secrets("mongodb://h:1/"), Vec::<String>::new());
        assert_eq!(
            endpoint("mongodb://app:pw@h:27017/"),
            "mongodb://app:***@h:27017/"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
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
