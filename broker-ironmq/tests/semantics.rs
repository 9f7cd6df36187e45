//! IronMQ-specific behaviour against the test server (`testserver/ironmq_v3.py`) at
//! `QCLUSTER_TEST_IRONMQ_URL`: batches over IronMQ's 100, the size limit, touch and its new
//! reservation id, stale reservations, dead letters, a refused token. Skips loudly when the
//! server is down; panics instead under `QCLUSTER_REQUIRE_SERVICES=1`.

use std::time::Duration;

use broker_core::{Broker, BrokerError, Message, QueueSettings};
use broker_ironmq::{IronMqBroker, IronMqConfig, MAX_BULK};

fn url() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_URL").unwrap_or_else(|_| "http://127.0.0.1:8787".into())
}

fn token() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_TOKEN").unwrap_or_else(|_| "qcluster-test-token".into())
}

fn config() -> IronMqConfig {
    IronMqConfig {
        allow_short_timeout: true,
        connect_timeout: Duration::from_secs(2),
        timeout: Duration::from_secs(10),
        ..IronMqConfig::for_url(&url(), "semantics", &token())
    }
}

fn settings(name: &str, bulk: usize, retry: Duration) -> QueueSettings {
    QueueSettings {
        bulk,
        retry,
        wait: Duration::from_millis(300),
        poll: Duration::from_millis(50),
        ..QueueSettings::for_queue(format!(
            "sem-{name}-{}",
            &uuid::Uuid::now_v7().simple().to_string()[20..]
        ))
    }
}

/// A fresh broker on a queue of its own, or `None` (skipped, loudly) when the server is down.
async fn open(name: &str, bulk: usize, retry: Duration) -> Option<IronMqBroker> {
    match IronMqBroker::connect(&config(), settings(name, bulk, retry)).await {
        Ok(b) => Some(b),
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!(
                    "IronMQ test server required but unreachable at {}: {e}",
                    url()
                );
            }
            eprintln!("skipped: IronMQ test server unreachable at {} ({e})", url());
            None
        }
    }
}

#[tokio::test]
async fn batches_above_one_hundred() {
    let Some(b) = open("batch", MAX_BULK, Duration::from_secs(30)).await else {
        return;
    };
    let n = 250;
    let before = b.requests();
    let ids = b
        .enqueue_many(
            (0..n)
                .map(|i| Message::new(format!("p{i:04}").into_bytes()))
                .collect(),
        )
        .await
        .unwrap();
    assert_eq!(ids.len(), n);
    assert_eq!(
        b.requests() - before,
        3,
        "250 packages in 3 posts of at most 100"
    );
    assert_eq!(b.queue_size().await.unwrap(), n as u64);
    let mut got = Vec::new();
    let before = b.requests();
    while got.len() < n {
        let batch = b.dequeue().await.unwrap();
        assert!(!batch.is_empty() && batch.len() <= MAX_BULK);
        let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.unwrap();
        got.extend(batch.into_iter().map(|d| d.payload));
    }
    assert_eq!(b.requests() - before, 6, "3 reserves and 3 batch deletes");
    let want: Vec<Vec<u8>> = (0..n).map(|i| format!("p{i:04}").into_bytes()).collect();
    assert_eq!(got, want, "in order, each once");
    assert_eq!(b.queue_size().await.unwrap(), 0);
    assert_eq!(b.lock_size().await.unwrap(), Some(0));
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn too_large_is_refused_before_any_call() {
    let Some(b) = open("large", 1, Duration::from_secs(30)).await else {
        return;
    };
    let cap = b.capabilities().max_message_size;
    // 64 KiB of text less the dead-letter headroom, as raw bytes before base64.
    assert_eq!(cap, (64 * 1024 - 2048) / 4 * 3);
    let before = b.requests();
    match b.enqueue(Message::new(vec![7u8; cap + 1])).await {
        Err(BrokerError::TooLarge { size, limit, .. }) => {
            assert_eq!((size, limit), (cap + 1, cap));
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let many = vec![
        Message::new(b"small".to_vec()),
        Message::new(vec![0u8; cap + 1]),
    ];
    assert!(matches!(
        b.enqueue_many(many).await,
        Err(BrokerError::TooLarge { .. })
    ));
    assert_eq!(b.requests(), before, "nothing was sent");
    b.enqueue(Message::new(vec![1u8; cap])).await.unwrap();
    let got = b.dequeue().await.unwrap();
    assert_eq!(got[0].payload.len(), cap);
    b.acknowledge(&got[0].ack).await.unwrap();
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn extend_then_acknowledge_with_the_original_receipt() {
    let retry = Duration::from_secs(2);
    let Some(a) = open("touch", 1, retry).await else {
        return;
    };
    let other = IronMqBroker::connect(
        &config(),
        QueueSettings {
            queue: a.queue_name().to_owned(),
            ..settings("x", 1, retry)
        },
    )
    .await
    .unwrap();
    a.enqueue(Message::new(b"long task".to_vec()))
        .await
        .unwrap();
    let held = a.dequeue().await.unwrap();
    let ack = held[0].ack.clone();
    assert!(a.extend(&ack, Duration::from_secs(5)).await.unwrap());
    // Past the first reservation: the touch holds it.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(
        other.dequeue().await.unwrap().is_empty(),
        "touched message delivered again"
    );
    // Extended again with the original receipt (the handle maps it to the newest id).
    assert!(a.extend(&ack, Duration::from_secs(5)).await.unwrap());
    assert_eq!(a.touched_receipts(), 1);
    a.acknowledge(&ack).await.unwrap();
    assert_eq!(a.touched_receipts(), 0, "the settle forgot the mapping");
    assert_eq!(
        a.lock_size().await.unwrap(),
        Some(0),
        "acknowledge after touch took effect"
    );
    assert!(
        !a.extend(&ack, Duration::from_secs(5)).await.unwrap(),
        "extend after ack"
    );
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(other.dequeue().await.unwrap().is_empty());
    a.delete_queue().await.unwrap();
}

#[tokio::test]
async fn stale_reservation_is_ignored() {
    let retry = Duration::from_secs(1);
    let Some(b) = open("stale", 1, retry).await else {
        return;
    };
    b.enqueue(Message::new(b"p".to_vec())).await.unwrap();
    let first = b.dequeue().await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = b.dequeue().await.unwrap();
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].deliveries, Some(2));
    assert_ne!(
        first[0].ack, second[0].ack,
        "a new reservation id on redelivery"
    );
    // The first holder's late answers change nothing.
    b.acknowledge(&first[0].ack).await.unwrap();
    b.fail(&first[0].ack).await.unwrap();
    assert!(
        !b.extend(&first[0].ack, Duration::from_secs(60))
            .await
            .unwrap()
    );
    b.dead_letter(&first[0].ack, "late").await.unwrap();
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(0));
    assert_eq!(b.lock_size().await.unwrap(), Some(1));
    assert_eq!(b.queue_size().await.unwrap(), 0);
    b.acknowledge(&second[0].ack).await.unwrap();
    assert_eq!(b.lock_size().await.unwrap(), Some(0));
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn dead_letters_keep_the_reason() {
    let Some(b) = open("dead", 2, Duration::from_secs(30)).await else {
        return;
    };
    b.enqueue(Message::new(vec![0, 1, 2, 255])).await.unwrap();
    let got = b.dequeue().await.unwrap();
    let reason = "bad signature: \"quoted\" \n and ünïcode";
    b.dead_letter(&got[0].ack, reason).await.unwrap();
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(1));
    assert_eq!(b.queue_size().await.unwrap(), 0);
    assert_eq!(b.lock_size().await.unwrap(), Some(0));
    let dead = b.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].payload, vec![0, 1, 2, 255]);
    assert_eq!(dead[0].reason, reason);
    assert_eq!(dead[0].deliveries, Some(1));
    assert_eq!(dead[0].message_id, got[0].message_id);
    assert!(dead[0].dead_at_us > 0);
    // Listing does not reserve: a second look sees the same.
    assert_eq!(b.dead_letters(10).await.unwrap().len(), 1);
    b.delete_queue().await.unwrap();
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(0));
}

#[tokio::test]
async fn bad_token_is_a_clear_error_without_the_token() {
    let Some(probe) = open("token", 1, Duration::from_secs(30)).await else {
        return;
    };
    probe.delete_queue().await.unwrap();
    let bad = "wrong-Token-5521";
    let cfg = IronMqConfig {
        token: bad.into(),
        ..config()
    };
    let e = IronMqBroker::connect(&cfg, settings("token", 1, Duration::from_secs(30)))
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(
        matches!(&e, BrokerError::Config { key, .. } if key == "ironmq.token"),
        "{text}"
    );
    assert!(text.contains("401") && !text.contains(bad), "{text}");
}

#[tokio::test]
async fn short_retry_needs_allow_short_timeout() {
    let cfg = IronMqConfig {
        allow_short_timeout: false,
        ..config()
    };
    let e = IronMqBroker::connect(&cfg, settings("short", 1, Duration::from_secs(10)))
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("`retry`") && e.to_string().contains("30 s"),
        "{e}"
    );
    // At IronMQ's minimum it opens (when the server is up) and extends by at least 30 s.
    let Some(probe) = open("short-probe", 1, Duration::from_secs(30)).await else {
        return;
    };
    probe.delete_queue().await.unwrap();
    let b = IronMqBroker::connect(&cfg, settings("short", 1, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(b.info().await.unwrap().retry_secs, Some(30.0));
    b.delete_queue().await.unwrap();
}
