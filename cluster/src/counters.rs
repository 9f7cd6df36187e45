//! Running totals of a cluster: what [`crate::Cluster::run`] returns and the status publishes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Running totals, published in the status and returned by [`Cluster::run`].
#[derive(Debug, Default)]
pub struct Counters {
    /// Runs finished (success or failure).
    pub processed: AtomicU64,
    /// Runs that succeeded.
    pub succeeded: AtomicU64,
    /// Runs that failed (retried or final).
    pub failed: AtomicU64,
    /// Failed runs sent back for another attempt.
    pub retried: AtomicU64,
    /// Packages that failed verification and were quarantined.
    pub quarantined: AtomicU64,
    /// Deliveries of already successful tasks, discarded.
    pub duplicates: AtomicU64,
    /// Deliveries given back to the broker unfinished (shutdown).
    pub given_back: AtomicU64,
    /// Roles restarted by the guard.
    pub reincarnations: AtomicU64,
    /// Lease extensions of running tasks.
    pub extended: AtomicU64,
}

/// A snapshot of [`Counters`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Summary {
    /// Runs finished.
    pub processed: u64,
    /// Runs that succeeded.
    pub succeeded: u64,
    /// Runs that failed.
    pub failed: u64,
    /// Failed runs retried.
    pub retried: u64,
    /// Packages quarantined.
    pub quarantined: u64,
    /// Duplicate deliveries discarded.
    pub duplicates: u64,
    /// Deliveries given back unfinished.
    pub given_back: u64,
    /// Roles restarted.
    pub reincarnations: u64,
    /// Lease extensions of running tasks.
    #[serde(default)]
    pub extended: u64,
}

impl Counters {
    /// The current values.
    pub fn summary(&self) -> Summary {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Summary {
            processed: g(&self.processed),
            succeeded: g(&self.succeeded),
            failed: g(&self.failed),
            retried: g(&self.retried),
            quarantined: g(&self.quarantined),
            duplicates: g(&self.duplicates),
            given_back: g(&self.given_back),
            reincarnations: g(&self.reincarnations),
            extended: g(&self.extended),
        }
    }
}
