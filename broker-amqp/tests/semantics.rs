//! What the AMQP adapter promises beyond the kit, against RabbitMQ at 127.0.0.1:5672: publisher
//! confirms, the adapter lease and stale receipts on a live channel, extend, dead letters with
//! their reason (the adapter's and the server's own), a queue declared by an older version,
//! and a connection closed mid-run. Skips loudly when RabbitMQ is down (panics under
//! `QCLUSTER_REQUIRE_SERVICES=1`).

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use broker_amqp::{AmqpBroker, AmqpConfig, QueueType};
use broker_core::{Broker, BrokerError, Message, QueueSettings};

fn url() -> String {
    std::env::var("QCLUSTER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

fn queue(name: &str) -> String {
    format!(
        "qkit-{name}-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

fn settings(q: &str, retry: Duration) -> QueueSettings {
    QueueSettings {
        retry,
        wait: Duration::from_millis(300),
        ..QueueSettings::for_queue(q)
    }
}

async fn open(cfg: &AmqpConfig, s: QueueSettings) -> Option<AmqpBroker> {
    match AmqpBroker::connect(cfg, s).await {
        Ok(b) => Some(b),
        Err(e) => unreachable_server(e),
    }
}

fn unreachable_server<T>(e: impl std::fmt::Display) -> Option<T> {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("RabbitMQ required but unreachable: {e}");
    }
    eprintln!("skipped: RabbitMQ unreachable: {e}");
    None
}

fn cfg_named(name: &str) -> AmqpConfig {
    AmqpConfig {
        connection_name: Some(name.to_owned()),
        ..AmqpConfig::new(url())
    }
}

async fn cleanup(b: &AmqpBroker, q: &str) {
    b.delete_queue().await.ok();
    for n in [q.to_owned(), format!("{q}.dead")] {
        let _ = Command::new("rabbitmqctl")
            .args(["delete_queue", &n])
            .output();
    }
}

async fn drain(b: &AmqpBroker, n: usize, within: Duration) -> Vec<broker_core::Delivery> {
    let deadline = Instant::now() + within;
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(b.dequeue().await.expect("dequeue"));
    }
    assert_eq!(got.len(), n, "deliveries within {within:?}");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn enqueue_returns_after_the_confirm() {
    let q = queue("confirm");
    let cfg = AmqpConfig::new(url());
    let Some(a) = open(&cfg, settings(&q, Duration::from_secs(30))).await else {
        return;
    };
    let ids = a
        .enqueue_many((0..50).map(|i| Message::new(vec![i])).collect())
        .await
        .unwrap();
    let id = a.enqueue(Message::new(b"one".to_vec())).await.unwrap();
    // A fresh handle (its own connection) sees every confirmed message at once.
    let fresh = open(&cfg, settings(&q, Duration::from_secs(30)))
        .await
        .unwrap();
    assert_eq!(fresh.queue_size().await.unwrap(), 51);
    let mut b = settings(&q, Duration::from_secs(30));
    b.bulk = 60;
    let reader = open(&cfg, b).await.unwrap();
    let got = drain(&reader, 51, Duration::from_secs(10)).await;
    let mut want: Vec<_> = ids.clone();
    want.push(id);
    let seen: Vec<_> = got.iter().map(|d| d.message_id.clone()).collect();
    assert_eq!(seen, want, "message ids and order");
    reader
        .acknowledge_many(&got.iter().map(|d| d.ack.clone()).collect::<Vec<_>>())
        .await
        .unwrap();
    cleanup(&a, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_gives_back_and_stale_receipts_keep_the_channel() {
    for queue_type in [QueueType::Quorum, QueueType::Classic] {
        let q = queue("lease");
        let cfg = AmqpConfig {
            queue_type,
            ..AmqpConfig::new(url())
        };
        let retry = Duration::from_millis(800);
        let Some(b) = open(&cfg, settings(&q, retry)).await else {
            return;
        };
        b.enqueue(Message::new(b"x".to_vec())).await.unwrap();
        let t0 = Instant::now();
        let first = drain(&b, 1, Duration::from_secs(5)).await;
        assert_eq!(first[0].deliveries, Some(1));
        assert_eq!(b.held(), 1);
        assert_eq!(b.lock_size().await.unwrap(), None);
        // Not settled: the adapter gives it back after `retry`, to this handle again.
        let second = drain(&b, 1, Duration::from_secs(5)).await;
        assert!(t0.elapsed() >= retry, "came back after {:?}", t0.elapsed());
        assert_eq!(second[0].payload, b"x");
        assert_eq!(second[0].message_id, first[0].message_id);
        assert_ne!(second[0].ack, first[0].ack);
        // Stale receipt: ignored, never sent (an unknown tag would close the channel).
        b.acknowledge(&first[0].ack).await.unwrap();
        b.fail(&first[0].ack).await.unwrap();
        assert!(!b.extend(&first[0].ack, retry * 10).await.unwrap());
        // A receipt of another handle, or nonsense, is refused or ignored.
        assert!(matches!(
            b.acknowledge(&broker_core::AckId::new("nonsense")).await,
            Err(BrokerError::InvalidReceipt { .. })
        ));
        // The channel still works: the current holder's ack takes effect.
        b.enqueue(Message::new(b"y".to_vec())).await.unwrap();
        b.acknowledge(&second[0].ack).await.unwrap();
        let third = drain(&b, 1, Duration::from_secs(5)).await;
        assert_eq!(third[0].payload, b"y");
        b.acknowledge(&third[0].ack).await.unwrap();
        tokio::time::sleep(retry * 2).await;
        assert!(
            b.dequeue().await.unwrap().is_empty(),
            "{queue_type:?}: acked came back"
        );
        assert_eq!(b.queue_size().await.unwrap(), 0);
        assert_eq!(b.held(), 0);
        cleanup(&b, &q).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extend_keeps_the_delivery() {
    let q = queue("extend");
    let cfg = AmqpConfig::new(url());
    let retry = Duration::from_millis(800);
    let Some(a) = open(&cfg, settings(&q, retry)).await else {
        return;
    };
    let other = open(&cfg, settings(&q, retry)).await.unwrap();
    a.enqueue(Message::new(b"long".to_vec())).await.unwrap();
    let held = drain(&a, 1, Duration::from_secs(5)).await;
    let until = Instant::now() + retry * 3;
    while Instant::now() < until {
        assert!(a.extend(&held[0].ack, retry).await.unwrap());
        assert!(
            other.dequeue().await.unwrap().is_empty(),
            "extended lease lost"
        );
    }
    a.acknowledge(&held[0].ack).await.unwrap();
    assert!(!a.extend(&held[0].ack, retry).await.unwrap());
    tokio::time::sleep(retry * 2).await;
    assert!(other.dequeue().await.unwrap().is_empty());
    cleanup(&a, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_are_listed_with_reason_and_left_in_place() {
    let q = queue("dead");
    let cfg = AmqpConfig::new(url());
    let Some(b) = open(&cfg, settings(&q, Duration::from_secs(30))).await else {
        return;
    };
    for i in 0..3u8 {
        b.enqueue(Message::new(vec![i])).await.unwrap();
    }
    let got = drain(&b, 3, Duration::from_secs(5)).await;
    b.dead_letter(&got[0].ack, "bad signature").await.unwrap();
    b.dead_letter(&got[1].ack, "gave up after 3 attempts")
        .await
        .unwrap();
    b.acknowledge(&got[2].ack).await.unwrap();
    for _ in 0..2 {
        let dead = b.dead_letters(10).await.unwrap();
        let reasons: BTreeSet<_> = dead.iter().map(|d| d.reason.clone()).collect();
        assert_eq!(dead.len(), 2, "{dead:?}");
        assert!(reasons.contains("bad signature") && reasons.contains("gave up after 3 attempts"));
        assert!(dead.iter().all(|d| d.dead_at_us > 0));
        let ids: BTreeSet<_> = dead.iter().map(|d| d.message_id.clone()).collect();
        assert!(ids.contains(&got[0].message_id) && ids.contains(&got[1].message_id));
        // Listing leaves them in place.
        assert_eq!(b.dead_letter_size().await.unwrap(), Some(2));
    }
    assert_eq!(b.dead_letters(1).await.unwrap().len(), 1);
    assert_eq!(b.queue_size().await.unwrap(), 0);
    b.delete_queue().await.unwrap();
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(0));
    cleanup(&b, &q).await;
}

fn close_connections_named(name: &str) -> usize {
    let Ok(out) = Command::new("rabbitmqctl")
        .args([
            "list_connections",
            "-q",
            "--no-table-headers",
            "pid",
            "client_properties",
        ])
        .output()
    else {
        return 0;
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    for line in text.lines() {
        if line.contains(name)
            && let Some(pid) = line.split('\t').next()
            && Command::new("rabbitmqctl")
                .args(["close_connection", pid.trim(), "semantics test"])
                .output()
                .is_ok_and(|o| o.status.success())
        {
            n += 1;
        }
    }
    n
}

/// A connection closed mid-run: enqueue errors (transient) or reconnects, never drops silently;
/// acknowledged packages are not delivered again, unacknowledged ones are.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn closed_connection_loses_nothing_and_redelivers_the_unacknowledged() {
    let q = queue("loss");
    let name = format!("qkit-semantics-{}", &q[q.len() - 12..]);
    let cfg = cfg_named(&name);
    let mut s = settings(&q, Duration::from_secs(60));
    s.bulk = 10;
    let Some(b) = open(&cfg, s).await else {
        return;
    };
    if Command::new("rabbitmqctl")
        .arg("-q")
        .arg("status")
        .output()
        .is_err()
    {
        eprintln!("skipped: no rabbitmqctl to close the connection with");
        cleanup(&b, &q).await;
        return;
    }
    b.enqueue_many((0..20u8).map(|i| Message::new(vec![i])).collect())
        .await
        .unwrap();
    let got = drain(&b, 10, Duration::from_secs(5)).await;
    let (acked, unacked) = got.split_at(5);
    for d in acked {
        b.acknowledge(&d.ack).await.unwrap();
    }
    assert!(close_connections_named(&name) > 0, "no connection closed");
    // Enqueue right after the loss: an error (transient) or a reconnect; never silent.
    let mut stored = Vec::new();
    for i in 100..110u8 {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match b.enqueue(Message::new(vec![i])).await {
                Ok(_) => {
                    stored.push(vec![i]);
                    break;
                }
                Err(e) if e.is_transient() && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("enqueue after the loss: {e}"),
            }
        }
    }
    // Old receipts are stale: ignored, not errors, not sent.
    for d in unacked {
        b.acknowledge(&d.ack).await.ok();
    }
    // Everything not acknowledged comes back: 5 unacked + 10 never delivered + 10 new.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.len() < 25 && Instant::now() < deadline {
        match b.dequeue().await {
            Ok(batch) => {
                for d in batch {
                    b.acknowledge(&d.ack).await.unwrap();
                    seen.push(d.payload);
                }
            }
            Err(e) if e.is_transient() => tokio::time::sleep(Duration::from_millis(100)).await,
            Err(e) => panic!("dequeue after the loss: {e}"),
        }
    }
    let seen: BTreeSet<Vec<u8>> = seen.into_iter().collect();
    let mut want: BTreeSet<Vec<u8>> = (5..20u8).map(|i| vec![i]).collect();
    want.extend(stored);
    for d in acked {
        assert!(
            !seen.contains(&d.payload),
            "acknowledged {:?} came back",
            d.payload
        );
    }
    assert_eq!(seen, want, "after the loss");
    cleanup(&b, &q).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn classic_priorities_and_config_errors() {
    let q = queue("prio");
    let cfg = AmqpConfig {
        queue_type: QueueType::Classic,
        max_priority: Some(5),
        ..AmqpConfig::new(url())
    };
    let mut s = settings(&q, Duration::from_secs(30));
    s.bulk = 3;
    let Some(b) = open(&cfg, s.clone()).await else {
        return;
    };
    assert!(b.capabilities().priority);
    for (p, prio) in [
        (b"low".to_vec(), 0),
        (b"high".to_vec(), 9),
        (b"mid".to_vec(), 2),
    ] {
        b.enqueue(Message::new(p).with_priority(prio))
            .await
            .unwrap();
    }
    let got = drain(&b, 3, Duration::from_secs(5)).await;
    let order: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
    assert_eq!(
        order,
        vec![b"high".to_vec(), b"mid".to_vec(), b"low".to_vec()]
    );
    for d in &got {
        b.acknowledge(&d.ack).await.unwrap();
    }
    // The same queue as quorum: refused, naming the key.
    let quorum = AmqpConfig::new(url());
    match AmqpBroker::connect(&quorum, s).await {
        Err(BrokerError::Config { key, .. }) => assert_eq!(key, "amqp.queue_type"),
        other => panic!("declaring a classic queue as quorum gave {other:?}"),
    }
    let info = b.info().await.unwrap();
    assert!(
        info.server.as_deref().unwrap_or("").contains("3."),
        "{:?}",
        info.server
    );
    assert!(!format!("{info:?}").contains("guest:guest"));
    cleanup(&b, &q).await;
}

/// Delays through holding queues: not delivered before the delay, delivered after; two delays
/// in either order come out in due order; fail_after likewise (and counts the deliveries on);
/// queue_size and purge_queue see delayed packages; delete_queue removes the holding queues.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delays_wait_in_holding_queues() {
    for queue_type in [QueueType::Quorum, QueueType::Classic] {
        let q = queue("delay");
        let cfg = AmqpConfig {
            queue_type,
            ..AmqpConfig::new(url())
        };
        let mut s = settings(&q, Duration::from_secs(30));
        s.bulk = 5;
        let Some(b) = open(&cfg, s).await else {
            return;
        };
        assert!(b.capabilities().delay);
        let d = |ms| Duration::from_millis(ms);
        // The longer delay first, then the shorter: due order, not enqueue order.
        let t0 = Instant::now();
        b.enqueue(Message::new(b"late".to_vec()).with_delay(d(1600)))
            .await
            .unwrap();
        b.enqueue(Message::new(b"soon".to_vec()).with_delay(d(800)))
            .await
            .unwrap();
        b.enqueue(Message::new(b"now".to_vec())).await.unwrap();
        assert_eq!(b.queue_size().await.unwrap(), 3, "{queue_type:?}");
        let mut order = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while order.len() < 3 && Instant::now() < deadline {
            for x in b.dequeue().await.unwrap() {
                order.push((x.payload.clone(), t0.elapsed()));
                assert_eq!(x.deliveries, Some(1));
                b.acknowledge(&x.ack).await.unwrap();
            }
        }
        let names: Vec<&[u8]> = order.iter().map(|(p, _)| p.as_slice()).collect();
        assert_eq!(
            names,
            vec![&b"now"[..], b"soon", b"late"],
            "{queue_type:?}: {order:?}"
        );
        assert!(order[1].1 >= d(800) && order[2].1 >= d(1600), "{order:?}");
        assert!(order[2].1 < d(4000), "late by far: {order:?}");
        // fail_after: not back before its delay, back after it, counted on.
        b.enqueue(Message::new(b"retry".to_vec())).await.unwrap();
        let got = drain(&b, 1, Duration::from_secs(5)).await;
        let t1 = Instant::now();
        b.fail_after(&got[0].ack, d(1000)).await.unwrap();
        assert_eq!(b.held(), 0);
        assert_eq!(
            b.queue_size().await.unwrap(),
            1,
            "delayed counts as waiting"
        );
        assert!(b.dequeue().await.unwrap().is_empty(), "back early");
        let again = drain(&b, 1, Duration::from_secs(10)).await;
        assert!(t1.elapsed() >= d(1000), "back after {:?}", t1.elapsed());
        assert_eq!(again[0].message_id, got[0].message_id);
        assert_eq!(again[0].payload, b"retry");
        assert_eq!(again[0].deliveries, Some(2), "{queue_type:?}");
        b.acknowledge(&again[0].ack).await.unwrap();
        // purge takes the delayed ones too; nothing arrives after their delay.
        b.enqueue(Message::new(b"p".to_vec()).with_delay(d(700)))
            .await
            .unwrap();
        b.enqueue(Message::new(b"p2".to_vec())).await.unwrap();
        assert_eq!(b.purge_queue().await.unwrap(), 2);
        tokio::time::sleep(d(900)).await;
        assert!(
            b.dequeue().await.unwrap().is_empty(),
            "purged delayed came back"
        );
        assert_eq!(b.queue_size().await.unwrap(), 0);
        // delete_queue removes the holding queues (another handle's included).
        let other = open(&cfg, settings(&q, Duration::from_secs(30)))
            .await
            .unwrap();
        other
            .enqueue(Message::new(b"gone".to_vec()).with_delay(d(1200)))
            .await
            .unwrap();
        let t2 = Instant::now();
        b.delete_queue().await.unwrap();
        eprintln!("delete_queue took {:?}", t2.elapsed());
        tokio::time::sleep(d(1500)).await;
        assert!(
            b.dequeue().await.unwrap().is_empty(),
            "deleted delayed came back"
        );
        assert_eq!(other.queue_size().await.unwrap(), 0);
        let left = Command::new("rabbitmqctl")
            .args([
                "list_queues",
                "-q",
                "--no-table-headers",
                "name",
                "messages",
            ])
            .output();
        if let Ok(out) = left {
            // `other.queue_size` declares its holding queue again (empty; it expires by itself).
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                !text
                    .lines()
                    .any(|l| l.starts_with(&format!("{q}.delay.")) && !l.ends_with("\t0")),
                "holding queues left with messages: {text}"
            );
        }
        cleanup(&b, &q).await;
    }
}

/// Fails the package (requeue) on every delivery until the server dead-letters it; returns how
/// many times it was failed and the dead letters then listed.
async fn fail_until_dead(
    b: &AmqpBroker,
    within: Duration,
) -> (usize, Vec<broker_core::DeadLetter>) {
    let deadline = Instant::now() + within;
    let mut fails = 0;
    loop {
        for d in b.dequeue().await.expect("dequeue") {
            b.fail(&d.ack).await.unwrap();
            fails += 1;
        }
        let dead = b.dead_letters(10).await.unwrap();
        if !dead.is_empty() {
            return (fails, dead);
        }
        assert!(
            Instant::now() < deadline,
            "not dead-lettered after {fails} fails within {within:?}"
        );
    }
}

/// What RabbitMQ dead-letters by itself lands in `<queue>.dead`: with `delivery_limit = 2`, a
/// package failed (requeued) until the server gives up on it is listed with the delivery limit
/// as its reason (not the `expired` of the holding queue it came through), has left the queue,
/// and `requeue_dead` brings it back as a fresh package that is dequeued and acknowledged.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn delivery_limit_dead_letters_into_the_dead_letter_queue() {
    let q = queue("dlimit");
    let cfg = AmqpConfig {
        delivery_limit: Some(2),
        ..AmqpConfig::new(url())
    };
    let Some(b) = open(&cfg, settings(&q, Duration::from_secs(30))).await else {
        return;
    };
    assert_eq!(
        b.info().await.unwrap().details["dead_letter_exchange"],
        format!("\"\" -> {q}.dead")
    );
    let t0 = broker_core::now_us();
    // Through a holding queue first: its message then carries an `expired` x-death entry.
    let id = b
        .enqueue(Message::new(b"poison".to_vec()).with_delay(Duration::from_millis(200)))
        .await
        .unwrap();
    let (fails, dead) = fail_until_dead(&b, Duration::from_secs(20)).await;
    eprintln!("dead-lettered after {fails} fails: {dead:?}");
    // RabbitMQ counts every return (our idle give-backs too): at most limit + 1 fails.
    assert!((1..=3).contains(&fails), "{fails} fails");
    assert_eq!(dead.len(), 1, "{dead:?}");
    let d = &dead[0];
    assert_eq!(d.message_id, id);
    assert_eq!(d.payload, b"poison");
    assert_eq!(
        d.reason,
        format!("RabbitMQ dead-lettered it: delivery_limit (queue {q})")
    );
    let now = broker_core::now_us();
    assert!(
        d.dead_at_us >= t0 - 1_000_000 && d.dead_at_us <= now + 1_000_000,
        "dead at {} (test ran {t0}..{now})",
        d.dead_at_us
    );
    assert_eq!(b.queue_size().await.unwrap(), 0, "still in the queue");
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(1));
    // Requeued like one of ours: a fresh package in the queue, gone from the dead letters.
    assert!(b.requeue_dead(&id).await.unwrap());
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(0));
    assert_eq!(b.queue_size().await.unwrap(), 1);
    let back = drain(&b, 1, Duration::from_secs(5)).await;
    assert_eq!(back[0].payload, b"poison");
    assert_ne!(back[0].message_id, id, "requeued as a fresh message");
    assert_eq!(back[0].deliveries, Some(1));
    b.acknowledge(&back[0].ack).await.unwrap();
    assert_eq!(b.queue_size().await.unwrap(), 0);
    assert!(b.dequeue().await.unwrap().is_empty());
    assert!(b.dead_letters(10).await.unwrap().is_empty());
    // A delivery limit on a classic queue is refused, naming the key.
    let classic = AmqpConfig {
        queue_type: QueueType::Classic,
        ..cfg.clone()
    };
    match AmqpBroker::connect(&classic, settings(&q, Duration::from_secs(30))).await {
        Err(BrokerError::Config { key, .. }) => assert_eq!(key, "amqp.delivery_limit"),
        other => panic!("delivery_limit on a classic queue gave {other:?}"),
    }
    cleanup(&b, &q).await;
}

fn rabbitmqctl_works() -> bool {
    Command::new("rabbitmqctl")
        .args(["-q", "status"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The policy `rabbitmqctl list_queues` shows for queue `q` (empty for none).
fn policy_of(q: &str) -> String {
    let out = Command::new("rabbitmqctl")
        .args(["list_queues", "-q", "--no-table-headers", "name", "policy"])
        .output()
        .expect("rabbitmqctl list_queues");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| {
            let (name, policy) = l.split_once('\t')?;
            (name == q).then(|| policy.trim().to_owned())
        })
        .unwrap_or_default()
}

/// A queue declared by an older version (no dead-letter arguments) refuses the new declaration
/// (PRECONDITION_FAILED). The adapter runs on with it as it is, losing nothing it holds, and
/// reports the missing dead-letter exchange with the `rabbitmqctl set_policy` command that adds
/// it; that command works (the server then dead-letters into `<queue>.dead`); `delete_queue`
/// declares it again with the arguments; a queue with another delivery limit is refused,
/// naming `amqp.delivery_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queue_of_an_older_version_runs_on_and_the_advised_policy_works() {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let q = queue("legacy");
    let raw = match lapin::Connection::connect(&url(), lapin::ConnectionProperties::default()).await
    {
        Ok(c) => c,
        Err(e) => {
            let _: Option<()> = unreachable_server(e);
            return;
        }
    };
    // Declared the way earlier versions did (x-queue-type alone), with a package in it.
    let ch = raw.create_channel().await.unwrap();
    for n in [q.clone(), format!("{q}.dead")] {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            AMQPValue::LongString("quorum".into()),
        );
        ch.queue_declare(n.as_str().into(), QueueDeclareOptions::durable(), args)
            .await
            .unwrap();
    }
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .unwrap();
    ch.basic_publish(
        "".into(),
        q.as_str().into(),
        BasicPublishOptions::default(),
        b"old",
        lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id("old-1".into()),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = raw.close(200, "declared the old way".into()).await;

    let cfg = AmqpConfig {
        delivery_limit: Some(1),
        ..AmqpConfig::new(url())
    };
    let s = settings(&q, Duration::from_secs(30));
    let b = AmqpBroker::connect(&cfg, s.clone())
        .await
        .expect("a queue of an older version is used as it is");
    let info = b.info().await.unwrap();
    assert!(
        info.details["dead_letter_exchange"].starts_with("none"),
        "{:?}",
        info.details
    );
    let fix = info.details["dead_letter_fix"].clone();
    eprintln!("advised: {fix}");
    assert!(fix.starts_with("rabbitmqctl set_policy -p '/' --apply-to queues"));
    assert!(fix.contains(&format!("\"dead-letter-routing-key\":\"{q}.dead\"")));
    assert!(fix.contains("\"delivery-limit\":1"));
    // Nothing lost, and the channels stay usable (no declaration closes them).
    for _ in 0..3 {
        assert_eq!(b.queue_size().await.unwrap(), 1);
        b.ping().await.unwrap();
    }
    let second = open(&cfg, s.clone()).await.unwrap();
    second.enqueue(Message::new(b"new".to_vec())).await.unwrap();
    let mut got = drain(&b, 2, Duration::from_secs(5)).await;
    got.sort_by(|x, y| x.payload.cmp(&y.payload));
    assert_eq!(got[0].payload, b"new");
    assert_eq!(got[1].payload, b"old");
    assert_eq!(got[1].message_id.0, "old-1");
    b.acknowledge(&got[0].ack).await.unwrap();
    b.fail(&got[1].ack).await.unwrap();
    assert_eq!(
        b.info()
            .await
            .unwrap()
            .details
            .get("connected")
            .map(String::as_str),
        Some("true")
    );
    drop(second);

    if rabbitmqctl_works() {
        // The advised command, run as printed: the server dead-letters into <queue>.dead.
        let out = Command::new("sh").args(["-c", &fix]).output().unwrap();
        assert!(
            out.status.success(),
            "{fix}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let policy = format!("qcluster-dlx-{q}");
        let until = Instant::now() + Duration::from_secs(10);
        while policy_of(&q) != policy {
            assert!(
                Instant::now() < until,
                "policy not applied: {:?}",
                policy_of(&q)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (fails, dead) = fail_until_dead(&b, Duration::from_secs(20)).await;
        eprintln!("dead-lettered under the policy after {fails} more fails: {dead:?}");
        assert_eq!(dead.len(), 1, "{dead:?}");
        assert_eq!(dead[0].message_id.0, "old-1");
        assert_eq!(
            dead[0].reason,
            format!("RabbitMQ dead-lettered it: delivery_limit (queue {q})")
        );
        assert!(dead[0].dead_at_us > 0);
        assert!(b.requeue_dead(&dead[0].message_id).await.unwrap());
        let back = drain(&b, 1, Duration::from_secs(5)).await;
        assert_eq!(back[0].payload, b"old");
        b.acknowledge(&back[0].ack).await.unwrap();
        let out = Command::new("rabbitmqctl")
            .args(["clear_policy", "-p", "/", &policy])
            .output()
            .unwrap();
        assert!(out.status.success());
    } else {
        eprintln!("skipped the policy check: no rabbitmqctl");
    }

    // delete_queue declares it again, now with its dead-letter arguments.
    b.delete_queue().await.unwrap();
    assert_eq!(
        b.info().await.unwrap().details["dead_letter_exchange"],
        format!("\"\" -> {q}.dead")
    );
    let fresh = open(&cfg, s.clone()).await.unwrap();
    assert!(
        !fresh
            .info()
            .await
            .unwrap()
            .details
            .contains_key("dead_letter_fix")
    );
    // The queue now has a delivery limit of 1: another one is refused, naming the key.
    let other = AmqpConfig {
        delivery_limit: Some(5),
        ..cfg.clone()
    };
    match AmqpBroker::connect(&other, s).await {
        Err(BrokerError::Config { key, message }) => {
            assert_eq!(key, "amqp.delivery_limit", "{message}")
        }
        other => panic!("another delivery limit gave {other:?}"),
    }
    cleanup(&b, &q).await;
}
