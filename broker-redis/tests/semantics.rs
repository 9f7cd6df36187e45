//! What the Redis layout must keep that the conformance kit does not reach: a batch answered in
//! part when its lease runs out, a stale receipt's `delete`, and a value in the queue that
//! qcluster did not write. Against Redis at 127.0.0.1:6379, each test under its own prefix.

use std::time::Duration;

use broker_core::{Broker, Message, QueueSettings};
use broker_redis::{RedisBroker, RedisConfig};

fn url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

/// A fresh queue with `bulk` and a one-second lease, or `None` after a loud skip.
async fn open(tag: &str, bulk: usize) -> Option<(RedisBroker, String)> {
    let mut cfg = RedisConfig::new(url());
    cfg.prefix = Some(format!(
        "sem{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    ));
    let settings = QueueSettings {
        bulk,
        retry: Duration::from_secs(1),
        wait: Duration::from_millis(200),
        ..QueueSettings::for_queue(tag)
    };
    match RedisBroker::connect(&cfg, settings).await {
        Ok(b) => {
            b.delete_queue().await.expect("delete_queue");
            Some((b, cfg.prefix.unwrap_or_default()))
        }
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("server required but unreachable: {e}");
            }
            eprintln!("skipped: {e}");
            None
        }
    }
}

async fn raw() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("url")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

#[tokio::test]
async fn expired_batch_returns_only_its_unanswered_packages() {
    let Some((b, _)) = open("partial", 4).await else {
        return;
    };
    let msgs = (0..4u8).map(|i| Message::new(vec![i])).collect();
    b.enqueue_many(msgs).await.expect("enqueue");
    let first = b.dequeue().await.expect("dequeue");
    assert_eq!(first.len(), 4);
    // Two answered (one acknowledged, one failed back), two left to run out.
    b.acknowledge(&first[1].ack).await.expect("ack");
    b.fail(&first[3].ack).await.expect("fail");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(2));
    let again = b.dequeue().await.expect("dequeue");
    assert_eq!(again.len(), 1, "the failed one comes back at once");
    assert_eq!(again[0].payload, vec![3]);
    assert_eq!(again[0].deliveries, Some(2));
    b.acknowledge(&again[0].ack).await.expect("ack");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let back = b.dequeue().await.expect("dequeue");
    let mut payloads: Vec<u8> = back.iter().map(|d| d.payload[0]).collect();
    payloads.sort_unstable();
    assert_eq!(payloads, vec![0, 2], "only the unanswered packages return");
    assert!(back.iter().all(|d| d.deliveries == Some(2)));
    // The first holder's late answers are ignored; the new holder's stand.
    b.acknowledge_many(&[first[0].ack.clone(), first[2].ack.clone()])
        .await
        .expect("stale acks");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(2));
    let acks: Vec<_> = back.iter().map(|d| d.ack.clone()).collect();
    b.acknowledge_many(&acks).await.expect("ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
    b.delete_queue().await.expect("delete_queue");
}

#[tokio::test]
async fn delete_with_a_stale_receipt_finds_the_package() {
    let Some((b, _)) = open("staledel", 1).await else {
        return;
    };
    b.enqueue(Message::new(b"x".to_vec()))
        .await
        .expect("enqueue");
    let old = b.dequeue().await.expect("dequeue");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let new = b.dequeue().await.expect("dequeue");
    assert_eq!(new.len(), 1, "redelivered after the lease");
    // Back in the queue, then deleted through the first, stale receipt.
    b.fail(&new[0].ack).await.expect("fail");
    assert_eq!(b.queue_size().await.expect("queue_size"), 1);
    b.delete(&old[0].ack).await.expect("delete");
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    // In flight under a newer receipt: deleted too.
    b.enqueue(Message::new(b"y".to_vec()))
        .await
        .expect("enqueue");
    let old = b.dequeue().await.expect("dequeue");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let _new = b.dequeue().await.expect("dequeue");
    b.delete(&old[0].ack).await.expect("delete");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    assert!(b.dequeue().await.expect("dequeue").is_empty());
    b.delete_queue().await.expect("delete_queue");
}

#[tokio::test]
async fn a_foreign_value_is_set_aside_not_lost() {
    let Some((b, prefix)) = open("foreign", 10).await else {
        return;
    };
    let mut c = raw().await;
    let _: () = redis::pipe()
        .rpush(
            format!("{prefix}:{{foreign}}:ready:0"),
            "hello from elsewhere",
        )
        .zadd(format!("{prefix}:{{foreign}}:bands"), "0", 0)
        .query_async(&mut c)
        .await
        .expect("write");
    b.enqueue(Message::new(b"ours".to_vec()))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"ours");
    let dead = b.dead_letters(10).await.expect("dead_letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, b"hello from elsewhere");
    assert!(
        dead[0].reason.contains("not a qcluster package"),
        "{dead:?}"
    );
    b.acknowledge(&got[0].ack).await.expect("ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    b.delete_queue().await.expect("delete_queue");
    let left: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut c)
        .await
        .expect("keys");
    // `seq` stays (ids are never reused); enqueue tokens expire by themselves within a minute.
    for k in &left {
        if k.ends_with(":seq") {
            continue;
        }
        assert!(k.contains(":ready:enq:"), "delete_queue left {k}");
        let ttl: i64 = redis::cmd("PTTL")
            .arg(k)
            .query_async(&mut c)
            .await
            .expect("pttl");
        assert!(ttl > 0 && ttl <= 60_000, "{k} has no expiry ({ttl})");
    }
}

#[tokio::test]
async fn delete_queue_removes_bands_delayed_and_in_flight() {
    let Some((b, _)) = open("drop", 10).await else {
        return;
    };
    let ids = b
        .enqueue_many(
            (0..3u8)
                .map(|i| Message::new(vec![i]).with_priority(5))
                .collect(),
        )
        .await
        .expect("enqueue");
    let n: Vec<u64> = ids
        .iter()
        .map(|m| m.0.parse().expect("numeric id"))
        .collect();
    assert_eq!(n, vec![n[0], n[0] + 1, n[0] + 2]);
    b.enqueue(Message::new(vec![9]).with_delay(Duration::from_secs(60)))
        .await
        .expect("enqueue delayed");
    let got = b.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 3);
    b.delete_queue().await.expect("delete_queue");
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    // A new package of the same band is alone: nothing of the old queue comes back.
    b.enqueue(Message::new(vec![7]).with_priority(5))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, vec![7]);
    b.delete_queue().await.expect("delete_queue");
}

#[tokio::test]
async fn claims_survive_a_script_flush() {
    let Some((b, _)) = open("flush", 10).await else {
        return;
    };
    b.enqueue(Message::new(b"one".to_vec()))
        .await
        .expect("enqueue");
    // A server that lost its scripts (restart, failover, SCRIPT FLUSH): the claim pipeline
    // loads the script itself and goes again.
    let mut c = raw().await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut c)
        .await
        .expect("flush");
    let got = b.dequeue().await.expect("dequeue after SCRIPT FLUSH");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].payload, b"one");
    b.acknowledge(&got[0].ack).await.expect("ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    b.delete_queue().await.expect("delete_queue");
}

/// A dead letter of priority 5, requeued behind 30 packages of priority 0, comes first; the
/// listing still reads its deliveries and reason.
#[tokio::test]
async fn a_requeued_dead_letter_keeps_its_priority() {
    let Some((b, _)) = open("deadprio", 5).await else {
        return;
    };
    b.enqueue(Message::new(b"urgent".to_vec()).with_priority(5))
        .await
        .expect("enqueue urgent");
    let got = b.dequeue().await.expect("dequeue");
    assert_eq!(got.len(), 1);
    b.dead_letter(&got[0].ack, "given up | twice")
        .await
        .expect("dead letter");
    let dead = b.dead_letters(10).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "given up | twice");
    assert_eq!(dead[0].deliveries, Some(1));
    assert!(dead[0].dead_at_us > 0);
    let low: Vec<Message> = (0..30u8).map(|k| Message::new(vec![k; 8])).collect();
    b.enqueue_many(low).await.expect("enqueue");
    let first = b.dequeue().await.expect("dequeue");
    let acks: Vec<_> = first.iter().map(|d| d.ack.clone()).collect();
    b.acknowledge_many(&acks).await.expect("ack");
    assert!(b.requeue_dead(&dead[0].message_id).await.expect("requeue"));
    let next = b.dequeue().await.expect("dequeue");
    assert_eq!(
        next.first().map(|d| &d.payload[..]),
        Some(&b"urgent"[..]),
        "the requeued dead letter kept its priority"
    );
    b.delete_queue().await.expect("delete queue");
}
