//! What a user of the NATS broker relies on, beyond the kit: redelivery after the ack wait,
//! extend keeps the package, dead letters listed with their reason, settling on another handle,
//! `fail_after` delays, refusals with typed errors.

mod common;

use std::time::{Duration, Instant};

use broker_core::{Broker, BrokerError, Message, QueueSettings};
use common::*;
use custom_broker::{NatsBroker, NatsConfig};

/// A fresh queue under a prefix of its own, with a short lease.
async fn open(prefix: &str, queue: &str, retry: Duration) -> NatsBroker {
    let mut cfg = NatsConfig::new(url());
    cfg.prefix = prefix.to_owned();
    let settings = QueueSettings {
        retry,
        wait: Duration::from_millis(200),
        bulk: 10,
        ..QueueSettings::for_queue(queue)
    };
    NatsBroker::connect(cfg, settings).await.expect("connect")
}

/// Dequeues until something comes or `within` passes.
async fn next(b: &NatsBroker, within: Duration) -> Vec<broker_core::Delivery> {
    let t = Instant::now();
    loop {
        let got = b.dequeue().await.expect("dequeue");
        if !got.is_empty() || t.elapsed() > within {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behaviour() {
    if !reachable().await {
        return;
    }
    let prefix = run_prefix();
    redelivered_after_the_ack_wait(&prefix).await;
    extend_keeps_the_package(&prefix).await;
    dead_letters_are_listed_with_their_reason(&prefix).await;
    any_handle_settles_and_fail_after_delays(&prefix).await;
    refusals_are_typed(&prefix).await;
    cleanup(&prefix).await;
}

async fn redelivered_after_the_ack_wait(prefix: &str) {
    let a = open(prefix, "redeliver", Duration::from_secs(1)).await;
    let b = open(prefix, "redeliver", Duration::from_secs(1)).await;
    let id = a
        .enqueue(Message::new(b"job".to_vec()))
        .await
        .expect("enqueue");
    let first = next(&a, Duration::from_secs(5)).await;
    assert_eq!((first.len(), first[0].deliveries), (1, Some(1)));
    assert_eq!(first[0].message_id, id);
    // Not acknowledged: another handle gets it once the lease (retry = 1 s) has run out.
    let t = Instant::now();
    let again = next(&b, Duration::from_secs(5)).await;
    assert_eq!(again.len(), 1);
    assert!(
        t.elapsed() >= Duration::from_millis(600),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        (again[0].message_id.clone(), again[0].deliveries),
        (id, Some(2))
    );
    // The first holder's late acknowledgement is stale: it must not remove B's package.
    a.acknowledge(&first[0].ack).await.expect("stale ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(1));
    b.acknowledge(&again[0].ack).await.expect("ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
}

async fn extend_keeps_the_package(prefix: &str) {
    let retry = Duration::from_secs(1);
    let a = open(prefix, "extend", retry).await;
    let b = open(prefix, "extend", retry).await;
    a.enqueue(Message::new(b"long job".to_vec()))
        .await
        .expect("enqueue");
    let held = next(&a, Duration::from_secs(5)).await;
    // As the cluster does: extend by `retry` before each lease runs out, for 3 leases.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(600)).await;
        a.extend(&held[0].ack, retry).await.expect("extend");
        assert!(
            b.dequeue().await.expect("dequeue").is_empty(),
            "taken while extended"
        );
    }
    // One extension longer than retry is kept by the handle (several +WPI).
    a.extend(&held[0].ack, Duration::from_millis(2500))
        .await
        .expect("long extend");
    let t = Instant::now();
    while t.elapsed() < Duration::from_millis(2200) {
        assert!(
            b.dequeue().await.expect("dequeue").is_empty(),
            "taken during a long extend"
        );
    }
    a.acknowledge(&held[0].ack).await.expect("ack");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        b.dequeue().await.expect("dequeue").is_empty(),
        "came back after ack"
    );
}

async fn dead_letters_are_listed_with_their_reason(prefix: &str) {
    let b = open(prefix, "dead", Duration::from_secs(5)).await;
    let ids = b
        .enqueue_many((0..3).map(|i| Message::new(vec![i])).collect())
        .await
        .expect("enqueue_many");
    let got = next(&b, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 3);
    b.dead_letter(&got[0].ack, "quarantined: bad signature")
        .await
        .expect("dead_letter");
    let long = format!("first line\nsecond line {}", "x".repeat(5000));
    b.dead_letter(&got[2].ack, &long)
        .await
        .expect("dead_letter");
    b.acknowledge(&got[1].ack).await.expect("ack");
    assert_eq!(b.dead_letter_size().await.expect("size"), Some(2));
    let dead = b.dead_letters(10).await.expect("dead_letters");
    assert_eq!(dead.len(), 2);
    assert_eq!(dead[0].message_id, ids[0], "oldest first");
    assert_eq!(dead[0].reason, "quarantined: bad signature");
    assert_eq!(
        (dead[0].payload.clone(), dead[0].deliveries),
        (vec![0], Some(1))
    );
    assert!(dead[0].dead_at_us > 0 && dead[0].dead_at_us <= dead[1].dead_at_us);
    assert_eq!(dead[1].message_id, ids[2]);
    assert!(
        dead[1].reason.starts_with("first line second line xxx"),
        "{}",
        dead[1].reason
    );
    assert!(dead[1].reason.len() <= 1024);
    assert_eq!(b.dead_letters(1).await.expect("limit").len(), 1);
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    b.delete_queue().await.expect("delete_queue");
    assert_eq!(b.dead_letter_size().await.expect("size"), Some(0));
}

async fn any_handle_settles_and_fail_after_delays(prefix: &str) {
    let a = open(prefix, "handles", Duration::from_secs(30)).await;
    let b = open(prefix, "handles", Duration::from_secs(30)).await;
    a.enqueue_many(vec![
        Message::new(b"1".to_vec()),
        Message::new(b"2".to_vec()),
    ])
    .await
    .expect("enqueue");
    let got = next(&a, Duration::from_secs(5)).await;
    assert_eq!(got.len(), 2);
    // A receipt from A settles on B, even while a dequeue of B is waiting.
    let (waiting, acked) = tokio::join!(b.dequeue(), async {
        tokio::time::sleep(Duration::from_millis(50)).await;
        b.acknowledge(&got[0].ack).await
    });
    acked.expect("ack on another handle");
    assert!(waiting.expect("dequeue").is_empty());
    // fail_after holds the package back for its delay (a NATS -NAK with a delay).
    let t = Instant::now();
    b.fail_after(&got[1].ack, Duration::from_secs(1))
        .await
        .expect("fail_after");
    assert!(
        a.dequeue().await.expect("dequeue").is_empty(),
        "back before its delay"
    );
    let back = next(&a, Duration::from_secs(5)).await;
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        (back[0].payload.clone(), back[0].deliveries),
        (b"2".to_vec(), Some(2))
    );
    a.acknowledge_many(&[back[0].ack.clone()])
        .await
        .expect("ack");
    assert_eq!(a.lock_size().await.expect("lock_size"), Some(0));
}

async fn refusals_are_typed(prefix: &str) {
    let b = open(prefix, "refusals", Duration::from_secs(5)).await;
    let delayed = Message::new(b"x".to_vec()).with_delay(Duration::from_secs(1));
    assert!(matches!(
        b.enqueue(delayed).await,
        Err(BrokerError::Unsupported { broker: "nats", .. })
    ));
    let foreign = broker_core::AckId::new("$JS.ACK.other-q-00.workers.1.1.1.1.0 0");
    assert!(matches!(
        b.acknowledge(&foreign).await,
        Err(BrokerError::InvalidReceipt { .. })
    ));
    let mut cfg = NatsConfig::new(url());
    cfg.prefix = prefix.to_owned();
    let over = QueueSettings {
        bulk: custom_broker::MAX_BULK + 1,
        ..QueueSettings::for_queue("refusals")
    };
    let e = NatsBroker::connect(cfg, over)
        .await
        .expect_err("bulk over the limit");
    assert!(e.to_string().contains("`bulk`"), "{e}");
    // A token in the URL never shows, and an unreachable server fails fast.
    let mut cfg = NatsConfig::new("nats://t0ken-s3cret@127.0.0.1:1");
    cfg.connect_timeout = Duration::from_secs(2);
    let t = Instant::now();
    let e = NatsBroker::connect(cfg, QueueSettings::for_queue("q"))
        .await
        .expect_err("nothing listens on port 1");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    assert!(e.is_transient(), "{e:?}");
    let shown = format!("{e} {e:?}");
    assert!(
        !shown.contains("t0ken-s3cret") && shown.contains("127.0.0.1:1"),
        "{shown}"
    );
}
