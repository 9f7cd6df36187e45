//! Where clusters publish their status, so that `qcluster info` (and any monitor) finds every
//! running cluster whatever the broker.
//!
//! The promise: a running cluster's status is readable for as long as it runs, from the broker
//! when the broker can hold stats ([`Capabilities::stats`](broker_core::Capabilities)), else from
//! the result store's `qcluster_status` table (SQS, and any user broker without stats). Every
//! status expires a few guard cycles after its last refresh, so a killed cluster drops out.

use std::sync::Arc;
use std::time::Duration;

use broker_core::Broker;

use crate::config::Config;
use crate::error::Error;
use crate::store::Store;

/// The place status is published to and read from.
#[derive(Debug, Clone)]
pub enum StatusHome {
    /// The broker's own stats (`set_stat` / `get_stats`).
    Broker(Arc<dyn Broker>),
    /// The result store's `qcluster_status` table.
    Store(Store),
}

impl StatusHome {
    /// The broker when it can hold stats, else `store`.
    pub fn pick(broker: &Arc<dyn Broker>, store: &Store) -> Self {
        if broker.capabilities().stats {
            Self::Broker(broker.clone())
        } else {
            Self::Store(store.clone())
        }
    }

    /// The broker when it can hold stats, else the result store `config` names, connected
    /// only then (for readers such as `qcluster info`, which need no store otherwise).
    pub async fn open(broker: &Arc<dyn Broker>, config: &Config) -> Result<Self, Error> {
        if broker.capabilities().stats {
            return Ok(Self::Broker(broker.clone()));
        }
        let store = Store::connect(&config.store_url(), config.store.connect_timeout).await?;
        Ok(Self::Store(store))
    }

    /// Where status lives, as `info` says it (no secret: the store's endpoint is masked).
    pub fn describe(&self) -> String {
        match self {
            Self::Broker(b) => format!("in the broker ({})", b.name()),
            Self::Store(s) => format!(
                "in the result store ({}), since the broker cannot hold it",
                s.endpoint()
            ),
        }
    }

    /// Publishes `value` under `key` for `ttl`.
    pub async fn publish(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), Error> {
        match self {
            Self::Broker(b) => Ok(b.set_stat(key, value, ttl).await?),
            Self::Store(s) => {
                s.set_status(key, &String::from_utf8_lossy(value), ttl)
                    .await
            }
        }
    }

    /// Every unexpired value whose key starts with `prefix`.
    pub async fn read(&self, prefix: &str) -> Result<Vec<Vec<u8>>, Error> {
        match self {
            Self::Broker(b) => Ok(b
                .get_stats(prefix)
                .await?
                .into_iter()
                .map(|s| s.value)
                .collect()),
            Self::Store(s) => Ok(s
                .statuses(prefix)
                .await?
                .into_iter()
                .map(|(_, body)| body.into_bytes())
                .collect()),
        }
    }
}
