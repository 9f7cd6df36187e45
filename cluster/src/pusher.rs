//! The pushers: claim in bulk when the in-memory queue has room for a whole claim, verify every
//! package before anything else touches it, and hand jobs to the workers. A package that fails
//! verification is quarantined, never run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use broker_core::Delivery;

use crate::job::{Job, Slot};
use crate::shared::Shared;

/// Pulls until stop. Broker errors are logged and retried with backoff; a pusher never exits
/// on its own.
pub(crate) async fn run(shared: Arc<Shared>, jobs: async_channel::Sender<Job>) {
    let bulk = u32::try_from(shared.config.bulk).unwrap_or(u32::MAX);
    let mut pause = Duration::from_millis(100);
    while !shared.stop.is_cancelled() {
        // Room first, so that a claimed package starts before its lease runs out.
        let room = tokio::select! {
            r = shared.room.clone().acquire_many_owned(bulk) => r,
            _ = shared.stop.cancelled() => break,
        };
        let Ok(room) = room else { break };
        room.forget();
        // The lease starts no earlier than the call.
        let claimed = Instant::now();
        // `dequeue` returns within the broker's wait; it is never raced against stop because a
        // cancelled dequeue would strand the packages it claimed.
        let batch = match shared.broker.dequeue().await {
            Ok(b) => {
                pause = Duration::from_millis(100);
                b
            }
            Err(e) => {
                shared.room.add_permits(bulk as usize);
                tracing::warn!("dequeue failed: {e}; retrying in {pause:?}");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = shared.stop.cancelled() => {}
                }
                pause = (pause * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let mut batch = batch;
        if batch.len() > bulk as usize {
            // More than asked for: no room for the rest, give it back.
            for d in batch.split_off(bulk as usize) {
                let seq = shared.enter(&d.ack);
                shared.give_back(seq, &d.ack).await;
            }
        }
        shared
            .room
            .add_permits((bulk as usize).saturating_sub(batch.len()));
        // Every delivery is in the ledger, and holds its place, before anything can go wrong.
        let entered: Vec<(u64, Delivery, Slot)> = batch
            .into_iter()
            .map(|d| (shared.enter(&d.ack), d, Slot(shared.room.clone())))
            .collect();
        for (seq, d, slot) in entered {
            let Some(mut job) = verify(&shared, seq, d, claimed).await else {
                continue;
            };
            job.slot = Some(slot);
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
async fn verify(shared: &Shared, seq: u64, d: Delivery, claimed: Instant) -> Option<Job> {
    match shared.codec.decode(&d.payload) {
        Ok(package) => Some(Job {
            seq,
            ack: d.ack,
            deliveries: d.deliveries,
            package,
            claimed,
            slot: None,
        }),
        Err(e) => {
            let reason = format!("quarantined: {e}");
            tracing::error!("package {} {reason}", d.message_id);
            shared.counters.quarantined.fetch_add(1, Ordering::Relaxed);
            if let Some(m) = &shared.metrics {
                m.quarantined();
            }
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
