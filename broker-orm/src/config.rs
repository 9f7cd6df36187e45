//! `[orm]` settings.

use std::fmt;
use std::time::Duration;

use broker_core::mask_url;
use serde::{Deserialize, Serialize};

/// `[orm]`: where the SQL broker keeps its queue. Debug output masks passwords. Unknown keys
/// are refused when read from a config file.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OrmConfig {
    /// `sqlite://path.sqlite3`, `postgres://user:pw@host/db` or `mysql://user:pw@host/db`
    /// (MariaDB too).
    pub url: String,
    /// Optional read replica used for `queue_size`, `lock_size` and `info` (Django Q's
    /// `has_replica`).
    pub replica_url: Option<String>,
    /// Most connections the pool opens (SQLite defaults to 1: it has one writer anyway).
    pub pool_size: Option<u32>,
    /// Longest wait to connect or to get a connection from the pool, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
}

impl OrmConfig {
    /// A configuration for `url` with defaults for everything else.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            replica_url: None,
            pool_size: None,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl Default for OrmConfig {
    fn default() -> Self {
        Self::new("sqlite://qcluster.sqlite3")
    }
}

impl fmt::Debug for OrmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OrmConfig")
            .field("url", &mask_url(&self.url))
            .field("replica_url", &self.replica_url.as_deref().map(mask_url))
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}
