//! What the roles of one running cluster share: configuration, broker, store, counters, the stop
//! tokens, the room in the in-memory queue, and the ledger.
//!
//! The ledger is the no-loss guarantee: every delivery is entered when a pusher receives it and
//! leaves only when the monitor settles it (acknowledged, retried, parked) or it is given back.
//! Whatever is still in it when the cluster stops goes back to the broker.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use broker_core::{AckId, Broker, Codec};
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::counters::Counters;
use crate::job::{Job, Prior};
use crate::store::Store;
use crate::task::Registry;

/// State every role shares.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub broker: Arc<dyn Broker>,
    pub codec: Arc<Codec>,
    pub store: Store,
    pub registry: Arc<Registry>,
    pub counters: Arc<Counters>,
    /// Cancelled when shutdown begins: stop pulling, give back what has not started.
    pub stop: CancellationToken,
    /// Cancelled when the shutdown deadline has passed: stop retrying the store.
    pub hard_stop: CancellationToken,
    /// Free places in the in-memory queue: a pusher claims only what it has room for, so a
    /// lease does not run out while its package waits for a worker.
    pub room: Arc<tokio::sync::Semaphore>,
    /// Deliveries received and not yet settled.
    ledger: Mutex<HashMap<u64, AckId>>,
    next_seq: AtomicU64,
    pub running: AtomicUsize,
    /// The broker can extend leases (`Capabilities::extend`), read once at start.
    pub extend: bool,
    /// Where final failures are reported (`[error_reporter]`), if anywhere.
    pub reports: Option<crate::reporter::Reports>,
    /// Per-task figures for `/metrics` (`[http]` with metrics on), if collected.
    pub metrics: Option<Arc<crate::metrics::Metrics>>,
}

impl Shared {
    /// The state of a cluster about to start, with an empty ledger.
    pub fn new(
        config: Arc<Config>,
        broker: Arc<dyn Broker>,
        codec: Arc<Codec>,
        store: Store,
        registry: Arc<Registry>,
        counters: Arc<Counters>,
        reports: Option<crate::reporter::Reports>,
    ) -> Self {
        let room = Arc::new(tokio::sync::Semaphore::new(config.queue_limit()));
        let extend = broker.capabilities().extend;
        Self {
            config,
            broker,
            codec,
            store,
            registry,
            counters,
            stop: CancellationToken::new(),
            hard_stop: CancellationToken::new(),
            room,
            ledger: Mutex::default(),
            next_seq: AtomicU64::new(0),
            running: AtomicUsize::new(0),
            extend,
            reports,
            metrics: None,
        }
    }

    /// Takes every unsettled delivery out of the ledger (the end of a shutdown).
    pub fn drain(&self) -> Vec<(u64, AckId)> {
        self.lock_ledger().drain().collect()
    }

    /// Enters a delivery in the ledger.
    pub fn enter(&self, ack: &AckId) -> u64 {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        self.lock_ledger().insert(seq, ack.clone());
        seq
    }

    /// True while a delivery is in the ledger (received, not yet settled or given back).
    pub fn unsettled(&self, seq: u64) -> bool {
        self.lock_ledger().contains_key(&seq)
    }

    /// Removes a settled delivery from the ledger.
    pub fn settle(&self, seq: u64) {
        self.lock_ledger().remove(&seq);
    }

    fn lock_ledger(&self) -> std::sync::MutexGuard<'_, HashMap<u64, AckId>> {
        self.ledger.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Gives an unstarted or unfinished delivery back to the broker for someone else.
    pub async fn give_back(&self, seq: u64, ack: &AckId) {
        self.give_back_after(seq, ack, Duration::ZERO).await;
    }

    /// Gives a delivery back, visible again after `delay`.
    pub async fn give_back_after(&self, seq: u64, ack: &AckId, delay: Duration) {
        let done = if delay.is_zero() {
            self.broker.fail(ack).await
        } else {
            self.broker.fail_after(ack, delay).await
        };
        match done {
            Ok(()) => {
                self.counters.given_back.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => tracing::warn!(
                "could not give back a delivery ({e}); it returns when its lease runs out"
            ),
        }
        self.settle(seq);
    }

    /// Looks a redelivered task up in the result store. The attempt number counts runs that
    /// were recorded, so packages given back at shutdown or after a lease ran out do not use up
    /// `max_attempts`.
    pub async fn prior(&self, job: &Job) -> Prior {
        let deliveries = job.deliveries.unwrap_or(2);
        let first = job.package.attempt.saturating_add(1);
        if deliveries <= 1
            && !crate::flow::has_follow_ups(&job.package)
            && !crate::flow::runs_once(&job.package)
        {
            return Prior::Attempt(first);
        }
        match self.store.get(job.package.id).await {
            Ok(Some(r)) if r.success || r.done => Prior::Settled,
            Ok(Some(r)) => Prior::Attempt(r.attempts.saturating_add(1).max(first)),
            Ok(None) => Prior::Attempt(first),
            Err(e) => {
                tracing::warn!("duplicate check for task {} failed: {e}", job.package.id);
                Prior::Unknown
            }
        }
    }
}
