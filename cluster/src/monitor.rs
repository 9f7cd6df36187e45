//! The monitor: saves results in batches, then settles each delivery with the broker:
//! acknowledge successes (and final failures), send retryable failures back with a backoff.
//! A result is saved before its package is acknowledged, so a crash in between re-runs the task
//! (and the duplicate is discarded) rather than losing its result.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::{AckId, now_us};
use tokio::sync::{Mutex, mpsc};

use crate::sentinel::{Outcome, Shared};
use crate::worker::record;

/// Most outcomes settled in one batch.
const BATCH: usize = 512;
/// How often old successes beyond `save_limit` are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(2);

/// Settles outcomes until every worker is gone and the channel is drained.
pub(crate) async fn run(shared: Arc<Shared>, outcomes: Arc<Mutex<mpsc::Receiver<Outcome>>>) {
    let mut rx = outcomes.lock().await;
    let mut batch = Vec::with_capacity(BATCH);
    let mut last_prune = Instant::now();
    loop {
        if rx.recv_many(&mut batch, BATCH).await == 0 {
            break;
        }
        settle(&shared, std::mem::take(&mut batch)).await;
        if shared.config.save_limit > 0 && last_prune.elapsed() >= PRUNE_EVERY {
            last_prune = Instant::now();
            prune(&shared).await;
        }
    }
    if shared.config.save_limit > 0 {
        prune(&shared).await;
    }
}

async fn prune(shared: &Shared) {
    let spare_after = now_us() - shared.config.retry.as_micros() as i64;
    let keep = shared.config.save_limit as u64;
    if let Err(e) = shared
        .store
        .prune(&shared.config.name, keep, spare_after)
        .await
    {
        tracing::warn!("pruning old results failed: {e}");
    }
}

/// True when a failed run gets no further attempt.
fn is_final(shared: &Shared, o: &Outcome, permanent: bool) -> bool {
    let opts = &o.job.package.options;
    let max = opts.max_attempts.unwrap_or(shared.config.max_attempts);
    permanent
        || opts.ack_failure.unwrap_or(shared.config.ack_failure)
        || (max > 0 && o.attempt >= max)
}

/// Delay before attempt `attempt + 1`: 1 s, 2 s, 4 s, … capped at `retry`.
fn backoff(attempt: u32, cap: Duration) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(16)).min(cap)
}

async fn settle(shared: &Shared, batch: Vec<Outcome>) {
    let cfg = &shared.config;
    let mut records = Vec::with_capacity(batch.len());
    let mut acks: Vec<(u64, AckId)> = Vec::with_capacity(batch.len());
    let mut retries: Vec<(u64, AckId, Duration)> = Vec::new();
    let c = &shared.counters;
    for o in &batch {
        let Some(ran) = &o.ran else {
            c.duplicates.fetch_add(1, Ordering::Relaxed);
            acks.push((o.job.seq, o.job.ack.clone()));
            continue;
        };
        let success = ran.result.is_ok();
        let fin = success || is_final(shared, o, ran.permanent);
        if !success || cfg.save_limit != -1 {
            let mut r = record(&o.job.package, ran, o.attempt, &cfg.name);
            r.done = fin;
            records.push(r);
        }
        if success {
            c.succeeded.fetch_add(1, Ordering::Relaxed);
        } else {
            c.failed.fetch_add(1, Ordering::Relaxed);
            if let Err(msg) = &ran.result {
                tracing::warn!(
                    "task {} ({}) failed on attempt {}{}: {msg}",
                    o.job.package.id,
                    o.job.package.func,
                    o.attempt,
                    if fin { ", final" } else { "" }
                );
            }
        }
        if fin {
            acks.push((o.job.seq, o.job.ack.clone()));
        } else {
            retries.push((o.job.seq, o.job.ack.clone(), backoff(o.attempt, cfg.retry)));
        }
    }

    // Results first: an acknowledged package whose result was not saved would be lost.
    let mut pause = Duration::from_millis(50);
    while let Err(e) = shared.store.save(&records).await {
        if shared.hard_stop.is_cancelled() {
            tracing::error!(
                "{} results could not be saved: {e}; their packages are given back",
                records.len()
            );
            return;
        }
        tracing::warn!(
            "saving {} results failed: {e}; retrying in {pause:?}",
            records.len()
        );
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = shared.hard_stop.cancelled() => {}
        }
        pause = (pause * 2).min(Duration::from_secs(5));
    }
    c.processed.fetch_add(
        batch.iter().filter(|o| o.ran.is_some()).count() as u64,
        Ordering::Relaxed,
    );

    if !acks.is_empty() {
        let ids: Vec<AckId> = acks.iter().map(|(_, a)| a.clone()).collect();
        if let Err(e) = shared.broker.acknowledge_many(&ids).await {
            tracing::debug!("bulk acknowledge failed ({e}); acknowledging one by one");
            for a in &ids {
                if let Err(e) = shared.broker.acknowledge(a).await {
                    tracing::warn!(
                        "acknowledge failed: {e}; the package comes back after its lease and \
                         is discarded as a duplicate"
                    );
                }
            }
        }
    }
    for (_, ack, delay) in &retries {
        match shared.broker.fail_after(ack, *delay).await {
            Ok(()) => {
                c.retried.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                tracing::warn!("retry could not be scheduled ({e}); the lease brings it back")
            }
        }
    }
    for (seq, _) in &acks {
        shared.settle(*seq);
    }
    for (seq, _, _) in &retries {
        shared.settle(*seq);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_lease() {
        let cap = Duration::from_secs(60);
        assert_eq!(backoff(1, cap), Duration::from_secs(1));
        assert_eq!(backoff(2, cap), Duration::from_secs(2));
        assert_eq!(backoff(3, cap), Duration::from_secs(4));
        assert_eq!(backoff(30, cap), cap);
    }
}
