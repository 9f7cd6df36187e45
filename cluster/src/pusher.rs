//! The pusher: dequeues in bulk, verifies every package before anything else touches it, and
//! feeds the bounded job queue. A package that fails verification is quarantined, never run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use broker_core::Delivery;

use crate::sentinel::{Job, Shared};

/// Pulls until stop. Broker errors are logged and retried with backoff; the pusher never exits
/// on its own.
pub(crate) async fn run(shared: Arc<Shared>, jobs: async_channel::Sender<Job>) {
    let mut pause = Duration::from_millis(100);
    while !shared.stop.is_cancelled() {
        // `dequeue` returns within the broker's wait; it is not raced against stop because a
        // cancelled dequeue could lose the packages it claimed.
        let batch = match shared.broker.dequeue().await {
            Ok(b) => {
                pause = Duration::from_millis(100);
                b
            }
            Err(e) => {
                tracing::warn!("dequeue failed: {e}; retrying in {pause:?}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.stop.cancelled() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        for d in batch {
            let seq = shared.enter(&d.ack);
            let Some(job) = verify(&shared, seq, d).await else {
                continue;
            };
            if shared.stop.is_cancelled() {
                shared.give_back(job.seq, &job.ack).await;
                continue;
            }
            tokio::select! {
                sent = jobs.send(job) => {
                    if let Err(async_channel::SendError(job)) = sent {
                        shared.give_back(job.seq, &job.ack).await;
                    }
                }
                // The job is dropped here but stays in the ledger, which gives it back.
                _ = shared.stop.cancelled() => {}
            }
        }
    }
}

/// Checks the signature and decodes; quarantines what fails.
async fn verify(shared: &Shared, seq: u64, d: Delivery) -> Option<Job> {
    match shared.codec.decode(&d.payload) {
        Ok(package) => Some(Job {
            seq,
            ack: d.ack,
            deliveries: d.deliveries,
            package,
        }),
        Err(e) => {
            let reason = format!("quarantined: {e}");
            tracing::error!("package {} {reason}", d.message_id);
            shared.counters.quarantined.fetch_add(1, Ordering::Relaxed);
            let done = if shared.broker.capabilities().dead_letter {
                shared.broker.dead_letter(&d.ack, &reason).await
            } else {
                tracing::error!(
                    "broker keeps no dead letters: package {} is deleted",
                    d.message_id
                );
                shared.broker.delete(&d.ack).await
            };
            match done {
                Ok(()) => shared.settle(seq),
                Err(e) => tracing::error!("could not quarantine package {}: {e}", d.message_id),
            }
            None
        }
    }
}
