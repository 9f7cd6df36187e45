//! One look at a cluster name, for the dashboard and `qcluster monitor`: the running clusters,
//! the queue, the latest failures.
//!
//! The promise: gathering never fails and never hangs. Each source (broker, status home, result
//! store) is asked within a bound; what does not answer is reported as an error beside whatever
//! did, so a view degrades instead of disappearing.

use std::sync::Arc;
use std::time::Duration;

use broker_core::Broker;

use crate::health::bounded;

use crate::config::Config;
use crate::sentinel::Status;
use crate::store::{Browse, Outcome, Store, TaskRecord};

/// Longest each source may take.
const LIMIT: Duration = Duration::from_secs(3);

/// What a view shows.
#[derive(Debug, Clone, Default)]
pub struct Overview {
    /// Every running cluster of this name, by host then pid.
    pub clusters: Vec<Status>,
    /// Where status lives.
    pub status_at: String,
    /// Packages waiting.
    pub waiting: Option<u64>,
    /// Packages delivered and unsettled, where the broker tracks them.
    pub in_flight: Option<u64>,
    /// Dead letters, where the broker keeps them.
    pub dead_letters: Option<u64>,
    /// The broker's failure, if it did not answer.
    pub broker_error: Option<String>,
    /// The latest failed runs, newest first.
    pub failures: Vec<TaskRecord>,
    /// The store's failure, if it did not answer.
    pub store_error: Option<String>,
}

/// Gathers the view of `config.name`, with up to `failures` latest failures.
pub async fn gather(
    broker: &Arc<dyn Broker>,
    store: &Store,
    config: &Config,
    failures: usize,
) -> Overview {
    let mut o = gather_with(broker, Some(store), config).await;
    if failures > 0 {
        let b = Browse {
            outcome: Outcome::Failure,
            limit: failures,
            ..Browse::default()
        };
        match bounded("browse", LIMIT, store.browse(&config.name, &b)).await {
            Ok(rows) => o.failures = rows,
            Err(e) => o.store_error = Some(e),
        }
    }
    o
}

/// The broker's part of the view: queue figures and cluster statuses (no failures).
pub async fn gather_broker(broker: &Arc<dyn Broker>, config: &Config) -> Overview {
    gather_with(broker, None, config).await
}

async fn gather_with(broker: &Arc<dyn Broker>, store: Option<&Store>, config: &Config) -> Overview {
    let mut o = Overview::default();
    let mut errors = Vec::new();
    match bounded("queue_size", LIMIT, broker.queue_size()).await {
        Ok(n) => o.waiting = Some(n),
        Err(e) => errors.push(e),
    }
    if errors.is_empty() {
        match bounded("lock_size", LIMIT, broker.lock_size()).await {
            Ok(n) => o.in_flight = n,
            Err(e) => errors.push(e),
        }
        match bounded("dead_letter_size", LIMIT, broker.dead_letter_size()).await {
            Ok(n) => o.dead_letters = n,
            Err(e) => errors.push(e),
        }
        match bounded(
            "status",
            LIMIT,
            crate::cli::statuses_with(broker, store, config),
        )
        .await
        {
            Ok((mut all, at)) => {
                all.sort_by(|a, b| a.host.cmp(&b.host).then(a.pid.cmp(&b.pid)));
                o.clusters = all;
                o.status_at = at;
            }
            Err(e) => errors.push(e),
        }
    }
    o.broker_error = (!errors.is_empty()).then(|| errors.join("; "));
    o
}
