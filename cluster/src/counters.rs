//! Running totals of a cluster: what [`crate::Cluster::run`] returns and the status publishes.

use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;

/// Running totals, published in the status and returned by [`crate::Cluster::run`].
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
    /// Roles restarted by the guard, and worker processes replaced (all reasons).
    pub reincarnations: AtomicU64,
    /// Lease extensions of running tasks.
    pub extended: AtomicU64,
    /// Worker processes killed because their task overran its timeout.
    pub reincarnated_timeout: AtomicU64,
    /// Worker processes replaced after `recycle` tasks.
    pub reincarnated_recycle: AtomicU64,
    /// Worker processes replaced for using more than `max_rss`.
    pub reincarnated_rss: AtomicU64,
    /// Worker processes that died on their own (abort, signal, exit, OOM kill).
    pub reincarnated_crash: AtomicU64,
}

/// Why a worker process was replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its task overran the timeout: killed.
    Timeout,
    /// It ran `recycle` tasks.
    Recycle,
    /// Its resident memory passed `max_rss`.
    Rss,
    /// It died on its own.
    Crash,
}

impl Reason {
    /// The reason as `info` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Recycle => "recycle",
            Self::Rss => "rss",
            Self::Crash => "crash",
        }
    }
}

/// Worker processes replaced, by reason.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Reincarnations {
    /// Killed past their task's timeout.
    pub timeout: u64,
    /// Replaced after `recycle` tasks.
    pub recycle: u64,
    /// Replaced above `max_rss`.
    pub rss: u64,
    /// Died on their own.
    pub crash: u64,
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
    /// Worker processes replaced, by reason (process mode).
    #[serde(default)]
    pub reincarnated: Reincarnations,
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
            reincarnated: Reincarnations {
                timeout: g(&self.reincarnated_timeout),
                recycle: g(&self.reincarnated_recycle),
                rss: g(&self.reincarnated_rss),
                crash: g(&self.reincarnated_crash),
            },
        }
    }

    /// Counts a worker process replaced for `reason`.
    pub fn reincarnated(&self, reason: Reason) {
        let by = match reason {
            Reason::Timeout => &self.reincarnated_timeout,
            Reason::Recycle => &self.reincarnated_recycle,
            Reason::Rss => &self.reincarnated_rss,
            Reason::Crash => &self.reincarnated_crash,
        };
        by.fetch_add(1, Ordering::Relaxed);
        self.reincarnations.fetch_add(1, Ordering::Relaxed);
    }
}
