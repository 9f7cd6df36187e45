//! Dead letters an operator lists, requeues and deletes: the library behind `qcluster dead`
//! (and the web dashboard).
//!
//! A requeued package is **verified again** with the cluster's [`Codec`] before it goes back:
//! one with a bad signature, one signed for another cluster (or with another secret), or one
//! that does not decode is refused and stays in the dead letters, with the reason returned.
//! Only a package that decodes is handed to [`Broker::requeue_dead`], which puts it back as a
//! fresh package (first delivery again) and never loses it.
//!
//! Finding one id may need a listing: the broker is asked for up to [`FIND_LIMIT`] dead letters
//! (a generous limit; on queue-based dead-letter places such as SQS, AMQP, IronMQ and Disque a
//! listing and a requeue scan the dead-letter queue, see each adapter's notes). A dead letter
//! beyond the first [`FIND_LIMIT`] is not found. [`requeue_all`] and [`delete_all`] list once per
//! pass and then requeue or delete each dead letter by id, so on those queue-based places they
//! cost one scan per dead letter: fine for an operator's clean-up, slow for very many.

use std::collections::HashSet;

use broker_core::{Broker, Codec, DeadLetter, MessageId};

use crate::error::Error;

/// Most dead letters listed to find one id, and per pass of [`requeue_all`] / [`delete_all`].
pub const FIND_LIMIT: usize = 100_000;

/// Outcome of requeueing one dead letter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requeue {
    /// Verified and back in the queue as a fresh package.
    Done,
    /// There is no dead letter with this id (never was, or already requeued or deleted).
    Missing,
    /// The package does not verify or decode (the reason): it stays in the dead letters.
    Refused(String),
}

/// Up to `limit` dead letters of the broker's queue, oldest first.
pub async fn list(broker: &dyn Broker, limit: usize) -> Result<Vec<DeadLetter>, Error> {
    Ok(broker.dead_letters(limit).await?)
}

/// Why `payload` may not go back to the queue, or `None` when it decodes with `codec`
/// (signature, cluster and format all checked).
pub fn refusal(codec: &Codec, payload: &[u8]) -> Option<String> {
    codec.decode(payload).err().map(|e| e.to_string())
}

/// Verifies dead letter `id` with `codec` and puts it back in the queue. Refused packages stay
/// in the dead letters. Lists up to [`FIND_LIMIT`] dead letters to find `id`.
pub async fn requeue(broker: &dyn Broker, codec: &Codec, id: &MessageId) -> Result<Requeue, Error> {
    let Some(dead) = find(broker, id).await? else {
        return Ok(Requeue::Missing);
    };
    requeue_one(broker, codec, &dead).await
}

/// Verifies and requeues every dead letter; returns how many were requeued and, for each one
/// refused, its id and why (those stay in the dead letters). Terminates whatever is refused:
/// each dead letter is looked at once. Works through the dead letters [`FIND_LIMIT`] at a time.
pub async fn requeue_all(
    broker: &dyn Broker,
    codec: &Codec,
) -> Result<(u64, Vec<(MessageId, String)>), Error> {
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut requeued = 0u64;
    let mut refused = Vec::new();
    loop {
        let batch = broker.dead_letters(FIND_LIMIT).await?;
        let full = batch.len() >= FIND_LIMIT;
        let mut new = 0usize;
        for d in batch {
            if !seen.insert(d.message_id.clone()) {
                continue;
            }
            new += 1;
            match requeue_one(broker, codec, &d).await? {
                Requeue::Done => requeued += 1,
                Requeue::Missing => {}
                Requeue::Refused(why) => refused.push((d.message_id, why)),
            }
        }
        if !full || new == 0 {
            break;
        }
    }
    Ok((requeued, refused))
}

/// Deletes dead letter `id` for good; `false` when there is no such dead letter.
pub async fn delete(broker: &dyn Broker, id: &MessageId) -> Result<bool, Error> {
    Ok(broker.delete_dead(id).await?)
}

/// Deletes every dead letter; returns how many.
pub async fn delete_all(broker: &dyn Broker) -> Result<u64, Error> {
    let mut seen: HashSet<MessageId> = HashSet::new();
    let mut deleted = 0u64;
    loop {
        let batch = broker.dead_letters(FIND_LIMIT).await?;
        if batch.is_empty() {
            break;
        }
        let mut new = 0usize;
        for d in batch {
            if !seen.insert(d.message_id.clone()) {
                continue;
            }
            new += 1;
            if broker.delete_dead(&d.message_id).await? {
                deleted += 1;
            }
        }
        if new == 0 {
            break;
        }
    }
    Ok(deleted)
}

/// The dead letter listed as `id`, among the first [`FIND_LIMIT`].
async fn find(broker: &dyn Broker, id: &MessageId) -> Result<Option<DeadLetter>, Error> {
    Ok(broker
        .dead_letters(FIND_LIMIT)
        .await?
        .into_iter()
        .find(|d| d.message_id == *id))
}

async fn requeue_one(
    broker: &dyn Broker,
    codec: &Codec,
    dead: &DeadLetter,
) -> Result<Requeue, Error> {
    if let Some(why) = refusal(codec, &dead.payload) {
        tracing::warn!(message_id = %dead.message_id, reason = %why, "dead letter not requeued: it does not verify");
        return Ok(Requeue::Refused(why));
    }
    if broker.requeue_dead(&dead.message_id).await? {
        tracing::info!(message_id = %dead.message_id, "dead letter requeued");
        Ok(Requeue::Done)
    } else {
        Ok(Requeue::Missing)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use broker_core::{Message, QueueSettings, TaskPackage};
    use broker_memory::{MemoryBroker, MemoryHub};

    use super::*;

    fn codec(cluster: &str) -> Codec {
        Codec::new(b"a test secret", cluster).expect("codec")
    }

    async fn dead(b: &MemoryBroker, payloads: Vec<Vec<u8>>) -> Vec<MessageId> {
        let n = payloads.len();
        for p in payloads {
            b.enqueue(Message::new(p)).await.expect("enqueue");
        }
        let got = b.dequeue().await.expect("dequeue");
        assert_eq!(got.len(), n);
        for d in &got {
            b.dead_letter(&d.ack, "given up")
                .await
                .expect("dead_letter");
        }
        got.into_iter().map(|d| d.message_id).collect()
    }

    #[tokio::test]
    async fn only_packages_that_verify_go_back() {
        let hub = MemoryHub::new();
        let s = QueueSettings {
            bulk: 10,
            ..QueueSettings::for_queue("dead")
        };
        let b = Arc::new(MemoryBroker::open(&hub, s).expect("open"));
        let ours = codec("here");
        let good = ours
            .encode(&TaskPackage::new("echo", b"1".to_vec()))
            .expect("encode");
        let mut tampered = good.clone();
        let mid = tampered.len() / 2;
        tampered[mid] ^= 1;
        let foreign = codec("elsewhere")
            .encode(&TaskPackage::new("echo", b"2".to_vec()))
            .expect("encode");
        let ids = dead(&b, vec![good.clone(), tampered, foreign]).await;

        assert_eq!(
            requeue(&*b, &ours, &ids[0]).await.expect("requeue"),
            Requeue::Done
        );
        assert!(matches!(
            requeue(&*b, &ours, &ids[1]).await.expect("requeue"),
            Requeue::Refused(why) if why.contains("signature")
        ));
        assert_eq!(
            requeue(&*b, &ours, &ids[0]).await.expect("requeue"),
            Requeue::Missing
        );
        assert_eq!(b.queue_size().await.expect("size"), 1);
        assert_eq!(b.dequeue().await.expect("dequeue")[0].payload, good);

        let (n, refused) = requeue_all(&*b, &ours).await.expect("requeue_all");
        assert_eq!(n, 0);
        assert_eq!(
            refused.iter().map(|(id, _)| id.clone()).collect::<Vec<_>>(),
            vec![ids[1].clone(), ids[2].clone()]
        );
        assert_eq!(list(&*b, 10).await.expect("list").len(), 2);
        assert!(
            !delete(&*b, &MessageId("nope".into()))
                .await
                .expect("delete")
        );
        assert_eq!(delete_all(&*b).await.expect("delete_all"), 2);
        assert!(list(&*b, 10).await.expect("list").is_empty());
    }
}
