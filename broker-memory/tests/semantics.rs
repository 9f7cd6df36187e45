//! What users of the memory broker rely on, beyond the conformance kit: leases, receipts,
//! extension, order, delay, dead letters, stats, purge, hub isolation and cancel-safety.
//! Every test has a hub of its own and short leases.

use std::sync::Arc;
use std::time::Duration;

use broker_core::{AckId, Broker, BrokerError, Delivery, Message, QueueSettings};
use broker_memory::{DEFAULT_MAX_MESSAGE_SIZE, MAX_BULK, MemoryBroker, MemoryConfig, MemoryHub};
use tokio::time::Instant;

const RETRY: Duration = Duration::from_millis(400);

fn settings(queue: &str, bulk: usize, wait_ms: u64) -> QueueSettings {
    QueueSettings {
        queue: queue.to_owned(),
        bulk,
        retry: RETRY,
        wait: Duration::from_millis(wait_ms),
        poll: Duration::from_millis(50),
        max_message_size: None,
    }
}

fn open(hub: &MemoryHub, queue: &str, bulk: usize, wait_ms: u64) -> MemoryBroker {
    MemoryBroker::open(hub, settings(queue, bulk, wait_ms)).expect("valid settings")
}

fn msg(p: &str) -> Message {
    Message::new(p.as_bytes().to_vec())
}

fn payloads(ds: &[Delivery]) -> Vec<String> {
    ds.iter()
        .map(|d| String::from_utf8_lossy(&d.payload).into_owned())
        .collect()
}

async fn one(b: &MemoryBroker) -> Delivery {
    let mut got = b.dequeue().await.expect("dequeue");
    assert_eq!(
        got.len(),
        1,
        "expected one package, got {:?}",
        payloads(&got)
    );
    got.remove(0)
}

async fn sizes(b: &MemoryBroker) -> (u64, u64, u64) {
    (
        b.queue_size().await.unwrap(),
        b.lock_size().await.unwrap().unwrap(),
        b.dead_letter_size().await.unwrap().unwrap(),
    )
}

#[tokio::test]
async fn lease_expiry_redelivers_with_count_raised() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    let id = b.enqueue(msg("a")).await.unwrap();
    let t0 = Instant::now();
    let first = one(&b).await;
    assert_eq!((first.deliveries, &first.message_id), (Some(1), &id));
    assert_eq!(sizes(&b).await, (0, 1, 0));
    // Invisible while leased.
    assert!(b.dequeue().await.unwrap().is_empty());
    // A consumer waiting longer than the lease is woken when it runs out, not at the end of
    // its wait.
    let waiter = open(&hub, "q", 1, 5000);
    let second = one(&waiter).await;
    let took = t0.elapsed();
    assert!(took >= RETRY, "redelivered after {took:?}, lease {RETRY:?}");
    assert!(took < Duration::from_secs(3), "woken only after {took:?}");
    assert_eq!(second.deliveries, Some(2));
    assert_eq!(second.message_id, id);
    assert_eq!(second.payload, b"a");
    assert_ne!(second.ack, first.ack);
    b.acknowledge(&second.ack).await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
}

#[tokio::test]
async fn stale_receipts_are_ignored_but_delete_is_not() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 1000);
    b.enqueue(msg("a")).await.unwrap();
    let first = one(&b).await;
    let second = one(&b).await; // after the first lease ran out
    assert_eq!(second.deliveries, Some(2));
    b.acknowledge(&first.ack).await.unwrap();
    b.acknowledge_many(std::slice::from_ref(&first.ack))
        .await
        .unwrap();
    b.fail(&first.ack).await.unwrap();
    b.fail_after(&first.ack, Duration::from_secs(5))
        .await
        .unwrap();
    b.dead_letter(&first.ack, "stale").await.unwrap();
    // A stale extend must not shorten (or lengthen) the new holder's lease.
    assert!(
        !b.extend(&first.ack, Duration::ZERO).await.unwrap(),
        "a stale extend says the lease is not held"
    );
    assert_eq!(sizes(&b).await, (0, 1, 0), "the second lease was touched");
    let quick = open(&hub, "q", 1, 50);
    assert!(quick.dequeue().await.unwrap().is_empty());
    // delete removes the message behind any receipt of it, stale or not.
    b.delete(&first.ack).await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
    b.acknowledge(&second.ack).await.unwrap();
}

#[tokio::test]
async fn fail_ends_the_receipt_and_a_late_ack_before_redelivery_holds() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    b.enqueue(msg("a")).await.unwrap();
    let d = one(&b).await;
    b.fail(&d.ack).await.unwrap();
    // The failed package waits again; its old receipt no longer removes it.
    b.acknowledge(&d.ack).await.unwrap();
    b.dead_letter(&d.ack, "late").await.unwrap();
    assert_eq!(sizes(&b).await, (1, 0, 0));
    let again = one(&b).await;
    assert_eq!(again.deliveries, Some(2));
    // The lease runs out, but nobody has taken the package since: the receipt still holds.
    tokio::time::sleep(RETRY + Duration::from_millis(100)).await;
    assert_eq!(
        sizes(&b).await,
        (1, 0, 0),
        "a lease that ran out counts as waiting"
    );
    b.acknowledge(&again.ack).await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
    assert!(b.dequeue().await.unwrap().is_empty());
}

#[tokio::test]
async fn extend_keeps_the_package_from_a_second_consumer() {
    let hub = MemoryHub::new();
    let a = open(&hub, "q", 1, 50);
    let other = open(&hub, "q", 1, 100);
    a.enqueue(msg("long task")).await.unwrap();
    let t0 = Instant::now();
    let d = one(&a).await;
    tokio::time::sleep(RETRY / 2).await;
    assert!(a.extend(&d.ack, Duration::from_millis(1200)).await.unwrap());
    // Well past the original lease, the second consumer still gets nothing.
    while t0.elapsed() < RETRY * 2 {
        let got = other.dequeue().await.unwrap();
        assert!(
            got.is_empty(),
            "delivered again after {:?} despite extend",
            t0.elapsed()
        );
    }
    assert_eq!(sizes(&a).await, (0, 1, 0));
    // The receipt still holds: the holder acknowledges after the original lease.
    a.acknowledge(&d.ack).await.unwrap();
    assert_eq!(sizes(&a).await, (0, 0, 0));

    // And an extended lease does run out `by` after the extension, not before.
    a.enqueue(msg("again")).await.unwrap();
    let d = one(&a).await;
    let extended_at2 = Instant::now();
    a.extend(&d.ack, Duration::from_millis(700)).await.unwrap();
    let waiter = open(&hub, "q", 1, 5000);
    let back = one(&waiter).await;
    let took = extended_at2.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "came back {took:?} after extend"
    );
    assert_eq!(back.deliveries, Some(2));
    waiter.acknowledge(&back.ack).await.unwrap();
}

#[tokio::test]
async fn highest_priority_first_then_fifo() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 10, 50);
    for (p, prio) in [
        ("0a", 0),
        ("5a", 5),
        ("1a", 1),
        ("0b", 0),
        ("5b", 5),
        ("-3", -3),
    ] {
        b.enqueue(msg(p).with_priority(prio)).await.unwrap();
    }
    b.enqueue_many(vec![msg("0c"), msg("5c").with_priority(5), msg("0d")])
        .await
        .unwrap();
    let got = b.dequeue().await.unwrap();
    assert_eq!(
        payloads(&got),
        ["5a", "5b", "5c", "1a", "0a", "0b", "0c", "0d", "-3"]
    );
    // Given back, they keep their priority.
    for d in &got[..2] {
        b.fail(&d.ack).await.unwrap();
    }
    let b2 = open(&hub, "q", 1, 50);
    assert_eq!(payloads(&b2.dequeue().await.unwrap()), ["5a"]);
}

#[tokio::test]
async fn delays_are_honoured_and_wake_a_waiting_consumer() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 10, 50);
    let t0 = Instant::now();
    let delay = Duration::from_millis(500);
    b.enqueue(msg("later").with_delay(delay)).await.unwrap();
    b.enqueue(msg("now")).await.unwrap();
    assert_eq!(
        b.queue_size().await.unwrap(),
        2,
        "delayed packages count as waiting"
    );
    let now = b.dequeue().await.unwrap();
    assert_eq!(payloads(&now), ["now"]);
    b.acknowledge(&now[0].ack).await.unwrap();
    let waiter = open(&hub, "q", 10, 5000);
    let d = one(&waiter).await;
    let took = t0.elapsed();
    assert_eq!(d.payload, b"later");
    assert!(took >= delay, "delayed {delay:?}, delivered after {took:?}");
    assert!(took < Duration::from_secs(3), "woken only after {took:?}");

    // fail_after holds it back too, and the waiting consumer wakes for it.
    let t1 = Instant::now();
    let back_after = Duration::from_millis(300);
    waiter.fail_after(&d.ack, back_after).await.unwrap();
    assert_eq!(sizes(&b).await, (1, 0, 0), "fail_after ends the lease");
    assert!(b.dequeue().await.unwrap().is_empty(), "came back early");
    let again = one(&waiter).await;
    assert!(t1.elapsed() >= back_after);
    assert_eq!(again.deliveries, Some(2));
}

#[tokio::test]
async fn enqueue_and_fail_wake_a_waiting_consumer_at_once() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 10_000);
    let consumer = b.clone();
    let t0 = Instant::now();
    let waiting = tokio::spawn(async move { consumer.dequeue().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.enqueue(msg("x")).await.unwrap();
    let got = waiting.await.unwrap().unwrap();
    assert_eq!(payloads(&got), ["x"]);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());

    let consumer = b.clone();
    let t1 = Instant::now();
    let waiting = tokio::spawn(async move { consumer.dequeue().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    b.fail(&got[0].ack).await.unwrap();
    let back = waiting.await.unwrap().unwrap();
    assert_eq!(back.len(), 1);
    assert_eq!(back[0].deliveries, Some(2));
    assert!(t1.elapsed() < Duration::from_secs(3), "{:?}", t1.elapsed());
}

#[tokio::test]
async fn empty_dequeue_waits_about_wait() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 300);
    let t0 = Instant::now();
    assert!(b.dequeue().await.unwrap().is_empty());
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn dead_letters_are_listed_oldest_first_with_their_reason() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 3, 50);
    let ids = b
        .enqueue_many(vec![msg("a"), msg("b"), msg("c")])
        .await
        .unwrap();
    let got = b.dequeue().await.unwrap();
    b.dead_letter(&got[1].ack, "bad signature").await.unwrap();
    b.dead_letter(&got[0].ack, "gave up after 3 attempts")
        .await
        .unwrap();
    b.acknowledge(&got[2].ack).await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 2));
    let dead = b.dead_letters(10).await.unwrap();
    let listed: Vec<_> = dead
        .iter()
        .map(|d| {
            (
                d.message_id.clone(),
                d.payload.clone(),
                d.reason.as_str(),
                d.deliveries,
            )
        })
        .collect();
    assert_eq!(
        listed,
        [
            (ids[1].clone(), b"b".to_vec(), "bad signature", Some(1)),
            (
                ids[0].clone(),
                b"a".to_vec(),
                "gave up after 3 attempts",
                Some(1)
            ),
        ]
    );
    assert!(dead[0].dead_at_us > 0 && dead[0].dead_at_us <= dead[1].dead_at_us);
    assert_eq!(b.dead_letters(1).await.unwrap()[0].reason, "bad signature");
    // Never delivered again, even past the lease.
    tokio::time::sleep(RETRY + Duration::from_millis(100)).await;
    assert!(b.dequeue().await.unwrap().is_empty());
    b.delete_queue().await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
    assert!(b.dead_letters(10).await.unwrap().is_empty());
}

#[tokio::test]
async fn stats_expire_and_belong_to_the_hub() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    let other_queue = open(&hub, "other", 1, 50);
    let other_hub = open(&MemoryHub::new(), "q", 1, 50);
    b.set_stat("cluster:a", b"1", Duration::from_millis(300))
        .await
        .unwrap();
    b.set_stat("cluster:b", b"2", Duration::from_secs(60))
        .await
        .unwrap();
    b.set_stat("cluster:b", b"3", Duration::from_secs(60))
        .await
        .unwrap();
    b.set_stat("clusterX", b"no", Duration::from_secs(60))
        .await
        .unwrap();
    b.set_stat("cluster:zero", b"0", Duration::ZERO)
        .await
        .unwrap();
    let view = |stats: Vec<broker_core::Stat>| -> Vec<(String, Vec<u8>)> {
        stats.into_iter().map(|s| (s.key, s.value)).collect()
    };
    let want = vec![
        ("cluster:a".to_owned(), b"1".to_vec()),
        ("cluster:b".to_owned(), b"3".to_vec()),
    ];
    assert_eq!(view(b.get_stats("cluster:").await.unwrap()), want);
    assert_eq!(view(other_queue.get_stats("cluster:").await.unwrap()), want);
    assert!(other_hub.get_stats("").await.unwrap().is_empty());
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        view(b.get_stats("cluster:").await.unwrap()),
        [("cluster:b".to_owned(), b"3".to_vec())]
    );
    assert_eq!(b.get_stats("").await.unwrap().len(), 2);
}

#[tokio::test]
async fn purge_keeps_packages_in_flight() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    let other = open(&hub, "other", 1, 50);
    other.enqueue(msg("elsewhere")).await.unwrap();
    b.enqueue_many(vec![msg("held"), msg("a"), msg("b")])
        .await
        .unwrap();
    b.enqueue(msg("delayed").with_delay(Duration::from_secs(60)))
        .await
        .unwrap();
    let held = one(&b).await;
    assert_eq!(b.purge_queue().await.unwrap(), 3);
    assert_eq!(sizes(&b).await, (0, 1, 0));
    assert_eq!(other.queue_size().await.unwrap(), 1);
    // The holder still settles it; nothing else comes.
    b.fail(&held.ack).await.unwrap();
    let again = one(&b).await;
    assert_eq!(again.payload, b"held");
    b.acknowledge(&again.ack).await.unwrap();
    assert!(b.dequeue().await.unwrap().is_empty());
    assert_eq!(b.purge_queue().await.unwrap(), 0);
}

#[tokio::test]
async fn delete_queue_removes_everything_but_handles_keep_sharing() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    b.enqueue_many(vec![msg("a"), msg("b"), msg("c")])
        .await
        .unwrap();
    let d = one(&b).await;
    let d2 = one(&b).await;
    b.dead_letter(&d2.ack, "x").await.unwrap();
    b.delete_queue().await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
    // The old receipt names nothing any more.
    b.fail(&d.ack).await.unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
    // Handles opened before and after the deletion share the queue.
    let later = open(&hub, "q", 1, 50);
    later.enqueue(msg("new")).await.unwrap();
    assert_eq!(payloads(&b.dequeue().await.unwrap()), ["new"]);
}

#[tokio::test]
async fn two_hubs_are_isolated() {
    let (h1, h2) = (MemoryHub::new(), MemoryHub::new());
    let b1 = open(&h1, "same-name", 1, 50);
    let b2 = open(&h2, "same-name", 1, 50);
    b1.enqueue(msg("one")).await.unwrap();
    b2.enqueue(msg("two")).await.unwrap();
    assert_eq!(
        (
            b1.queue_size().await.unwrap(),
            b2.queue_size().await.unwrap()
        ),
        (1, 1)
    );
    let d1 = one(&b1).await;
    assert_eq!(d1.payload, b"one");
    // A receipt from one hub touches nothing in the other.
    b2.acknowledge(&d1.ack).await.unwrap();
    b2.delete(&d1.ack).await.unwrap();
    assert_eq!(b2.queue_size().await.unwrap(), 1);
    assert_eq!(b1.lock_size().await.unwrap(), Some(1));
    let d2 = one(&b2).await;
    assert_eq!(d2.payload, b"two");
    assert_ne!(d1.message_id, d2.message_id);
    // Clones of a hub are the same hub.
    let b3 = open(&h1.clone(), "same-name", 1, 50);
    b3.acknowledge(&d1.ack).await.unwrap();
    assert_eq!(b1.lock_size().await.unwrap(), Some(0));
}

#[tokio::test]
async fn a_dropped_dequeue_future_loses_nothing() {
    let hub = MemoryHub::new();
    let b = MemoryBroker::open(
        &hub,
        QueueSettings {
            retry: Duration::from_secs(60),
            ..settings("q", 5, 10_000)
        },
    )
    .unwrap();
    // Waiting on an empty queue, then woken by an enqueue but dropped before it runs again.
    let mut waiting = Box::pin(b.dequeue());
    assert!(
        tokio::time::timeout(Duration::from_millis(100), &mut waiting)
            .await
            .is_err()
    );
    b.enqueue_many(vec![msg("a"), msg("b")]).await.unwrap();
    drop(waiting);
    assert_eq!(sizes(&b).await, (2, 0, 0));
    let got = b.dequeue().await.unwrap();
    assert_eq!(payloads(&got), ["a", "b"]);
    assert!(got.iter().all(|d| d.deliveries == Some(1)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_dequeues_wait_on_one_handle_while_it_settles() {
    let hub = MemoryHub::new();
    let b = Arc::new(open(&hub, "q", 1, 5000));
    b.enqueue_many(vec![msg("a"), msg("b")]).await.unwrap();
    let held = [one(&b).await, one(&b).await];
    let (c1, c2) = (b.clone(), b.clone());
    let w1 = tokio::spawn(async move { c1.dequeue().await });
    let w2 = tokio::spawn(async move { c2.dequeue().await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    // Settles on the same handle while both wait: neither blocks the other.
    let t0 = Instant::now();
    b.acknowledge(&held[0].ack).await.unwrap();
    b.fail(&held[1].ack).await.unwrap();
    assert!(t0.elapsed() < Duration::from_millis(500));
    b.enqueue(msg("c")).await.unwrap();
    let mut got = payloads(&w1.await.unwrap().unwrap());
    got.extend(payloads(&w2.await.unwrap().unwrap()));
    got.sort();
    assert_eq!(got, ["b", "c"]);
    assert!(t0.elapsed() < Duration::from_secs(3), "{:?}", t0.elapsed());
}

#[tokio::test]
async fn sizes_follow_the_limit_and_enqueue_many_is_all_or_nothing() {
    let hub = MemoryHub::new();
    let b = MemoryBroker::open(
        &hub,
        QueueSettings {
            max_message_size: Some(10),
            ..settings("q", 10, 50)
        },
    )
    .unwrap();
    assert_eq!(b.capabilities().max_message_size, 10);
    b.enqueue(Message::new(vec![7; 10])).await.unwrap();
    match b.enqueue(Message::new(vec![7; 11])).await {
        Err(BrokerError::TooLarge {
            broker: "memory",
            size: 11,
            limit: 10,
        }) => {}
        other => panic!("{other:?}"),
    }
    let batch = vec![msg("ok"), Message::new(vec![1; 11]), msg("ok too")];
    assert!(matches!(
        b.enqueue_many(batch).await,
        Err(BrokerError::TooLarge { size: 11, .. })
    ));
    assert_eq!(
        b.queue_size().await.unwrap(),
        1,
        "a refused batch stored something"
    );
    let default = open(&hub, "d", 1, 50);
    let caps = default.capabilities();
    assert_eq!(caps.max_message_size, DEFAULT_MAX_MESSAGE_SIZE);
    assert_eq!(caps.max_bulk, MAX_BULK);
    assert!(
        caps.receipts
            && caps.atomic
            && caps.dead_letter
            && caps.priority
            && caps.delay
            && caps.stats
            && caps.extend
            && !caps.text_only
    );
    default
        .enqueue(Message::new(vec![0; DEFAULT_MAX_MESSAGE_SIZE]))
        .await
        .unwrap();
    assert!(matches!(
        default
            .enqueue(Message::new(vec![0; DEFAULT_MAX_MESSAGE_SIZE + 1]))
            .await,
        Err(BrokerError::TooLarge { .. })
    ));
}

#[tokio::test]
async fn malformed_receipts_are_refused_and_settle_nothing() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 2, 50);
    b.enqueue_many(vec![msg("a"), msg("b")]).await.unwrap();
    let got = b.dequeue().await.unwrap();
    let bad = AckId::new("not-a-receipt");
    let is_invalid = |r: Result<(), BrokerError>| matches!(r, Err(BrokerError::InvalidReceipt { broker: "memory", ref receipt }) if receipt == "not-a-receipt");
    assert!(is_invalid(b.acknowledge(&bad).await));
    assert!(is_invalid(b.fail(&bad).await));
    assert!(is_invalid(b.fail_after(&bad, Duration::from_secs(1)).await));
    assert!(is_invalid(b.delete(&bad).await));
    assert!(is_invalid(
        b.extend(&bad, Duration::from_secs(1)).await.map(drop)
    ));
    assert!(is_invalid(b.dead_letter(&bad, "x").await));
    let mixed = [got[0].ack.clone(), bad.clone(), got[1].ack.clone()];
    assert!(is_invalid(b.acknowledge_many(&mixed).await));
    assert_eq!(
        b.lock_size().await.unwrap(),
        Some(2),
        "a refused batch settled something"
    );
    b.acknowledge_many(&[got[0].ack.clone(), got[1].ack.clone()])
        .await
        .unwrap();
    assert_eq!(sizes(&b).await, (0, 0, 0));
}

/// What the cluster's broker registry needs of a factory's future.
fn registrable<F: std::future::Future + Send + 'static>(f: F) -> F {
    f
}

#[tokio::test]
async fn connect_opens_the_global_hub_and_validates() {
    let s = settings("broker-memory-test-global", 1, 50);
    let from_config = registrable(MemoryBroker::connect(MemoryConfig::default(), s.clone()));
    assert_eq!(from_config.await.unwrap().queue_size().await.unwrap(), 0);
    let a = MemoryBroker::connect(MemoryConfig::default(), s.clone())
        .await
        .unwrap();
    let b = MemoryBroker::open(&MemoryHub::global(), s.clone()).unwrap();
    let isolated = MemoryBroker::open(&MemoryHub::new(), s.clone()).unwrap();
    a.enqueue(msg("shared")).await.unwrap();
    assert_eq!(payloads(&b.dequeue().await.unwrap()), ["shared"]);
    assert!(isolated.dequeue().await.unwrap().is_empty());
    for (bad, key) in [
        (
            QueueSettings {
                bulk: MAX_BULK + 1,
                ..s.clone()
            },
            "bulk",
        ),
        (
            QueueSettings {
                queue: String::new(),
                ..s.clone()
            },
            "queue",
        ),
        (
            QueueSettings {
                retry: Duration::ZERO,
                ..s.clone()
            },
            "retry",
        ),
    ] {
        match MemoryBroker::connect(MemoryConfig::default(), bad).await {
            Err(BrokerError::Config { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{key}: {other:?}"),
        }
    }
    assert!(
        MemoryBroker::open(
            &MemoryHub::new(),
            QueueSettings {
                bulk: MAX_BULK,
                ..s
            }
        )
        .is_ok()
    );
}

#[tokio::test]
async fn info_says_where_packages_live() {
    let hub = MemoryHub::new();
    let b = open(&hub, "q", 1, 50);
    let info = b.info().await.unwrap();
    assert_eq!(
        (
            info.broker.as_str(),
            info.endpoint.as_str(),
            info.queue.as_str()
        ),
        ("memory", "in-process", "q")
    );
    assert!(info.receipts);
    assert_eq!(info.retry_secs, Some(RETRY.as_secs_f64()));
    let notes = info.notes.join("\n");
    for needle in [
        "lost when it exits",
        "other processes cannot see",
        "at least once",
    ] {
        assert!(notes.contains(needle), "notes lack {needle:?}: {notes}");
    }
    assert_eq!(b.name(), "memory");
    b.ping().await.unwrap();
    let debug = format!("{b:?}");
    assert!(
        debug.contains("MemoryBroker") && debug.contains("\"q\""),
        "{debug}"
    );
}
