//! Disque-specific behaviour against the nodes named by `DISQUE_NODES` (and `DISQUE_AUTH`):
//! failover past a dead node, `HELLO` discovery, `WORKING` leases, dead letters with their
//! reason, `FASTACK` mode. Without `DISQUE_NODES` each test prints a skip line and passes.

use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_disque::{DisqueBroker, DisqueConfig};

fn nodes() -> Option<Vec<String>> {
    let n: Vec<String> = std::env::var("DISQUE_NODES")
        .ok()?
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    (!n.is_empty()).then_some(n)
}

fn config(nodes: Vec<String>) -> DisqueConfig {
    DisqueConfig {
        auth: std::env::var("DISQUE_AUTH").ok().filter(|a| !a.is_empty()),
        ..DisqueConfig::new(nodes)
    }
}

fn skip() {
    eprintln!("skipped: no Disque server (set DISQUE_NODES)");
}

fn settings(name: &str) -> QueueSettings {
    QueueSettings {
        queue: format!("sem-{name}-{}", std::process::id()),
        retry: Duration::from_millis(1750),
        wait: Duration::from_millis(300),
        ..QueueSettings::default()
    }
}

async fn open(c: &DisqueConfig, s: QueueSettings) -> DisqueBroker {
    let b = DisqueBroker::connect(c, s).await.expect("connect");
    b.delete_queue().await.expect("delete_queue");
    b
}

#[tokio::test]
async fn failover_past_a_dead_node() {
    let Some(nodes) = nodes() else { return skip() };
    // The first node of the list does not answer; the handle starts at a random node, so
    // connect many times: every handle must end up working through a live one.
    let mut list = vec!["127.0.0.1:9".to_owned()];
    list.extend(nodes);
    let c = DisqueConfig {
        connect_timeout: Duration::from_secs(1),
        ..config(list)
    };
    for i in 0..6 {
        let b = open(&c, settings(&format!("failover{i}"))).await;
        b.ping().await.expect("ping through a live node");
        b.enqueue(Message::new(b"x".to_vec()))
            .await
            .expect("enqueue");
        let got = b.dequeue().await.expect("dequeue");
        assert_eq!(got.len(), 1);
        b.acknowledge(&got[0].ack).await.expect("acknowledge");
        let info = b.info().await.expect("info");
        assert_ne!(
            info.details.get("node_in_use").map(String::as_str),
            Some("127.0.0.1:9")
        );
    }
}

#[tokio::test]
async fn hello_discovers_the_other_nodes() {
    let Some(nodes) = nodes() else { return skip() };
    if nodes.len() < 2 {
        eprintln!("skipped: DISQUE_NODES names one node; HELLO discovery needs a cluster");
        return;
    }
    let b = open(&config(vec![nodes[0].clone()]), settings("hello")).await;
    let info = b.info().await.expect("info");
    let known = info.details.get("nodes_known").cloned().unwrap_or_default();
    for n in &nodes {
        assert!(known.contains(n.as_str()), "{n} not learnt: {known}");
    }
}

#[tokio::test]
async fn working_extends_the_lease() {
    let Some(nodes) = nodes() else { return skip() };
    let c = config(nodes);
    let s = settings("working");
    let a = open(&c, s.clone()).await;
    let b = DisqueBroker::connect(&c, s).await.expect("connect");
    a.enqueue(Message::new(b"long task".to_vec()))
        .await
        .expect("enqueue");
    let t0 = Instant::now();
    let held = a.dequeue().await.expect("dequeue");
    assert_eq!(held.len(), 1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Longer than Disque's retry (2 s): kept alive by repeated WORKINGs.
    assert!(
        a.extend(&held[0].ack, Duration::from_secs(5))
            .await
            .expect("extend")
    );
    while t0.elapsed() < Duration::from_millis(5500) {
        assert!(
            b.dequeue().await.expect("dequeue").is_empty(),
            "delivered while extended, after {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(a.lock_size().await.expect("lock_size"), Some(1));
    a.acknowledge(&held[0].ack).await.expect("acknowledge");
    assert!(
        !a.extend(&held[0].ack, Duration::from_secs(5))
            .await
            .expect("extend after ack")
    );
    // Without extend the lease runs out after about 2 s and the delivery number goes up.
    a.enqueue(Message::new(b"short".to_vec()))
        .await
        .expect("enqueue");
    let first = a.dequeue().await.expect("dequeue");
    let t1 = Instant::now();
    let mut again = Vec::new();
    // On a cluster the job may be queued again by another node holding a copy; a consumer
    // here gets it once Disque's federation moves it (seconds).
    while again.is_empty() && t1.elapsed() < Duration::from_secs(15) {
        again = a.dequeue().await.expect("dequeue");
    }
    assert_eq!(first.len(), 1);
    assert!(!again.is_empty(), "not delivered again within 15 s");
    assert!(
        t1.elapsed() >= Duration::from_millis(1700),
        "back after {:?}",
        t1.elapsed()
    );
    assert_eq!(again[0].deliveries, Some(2));
    // The first holder's receipt is stale now: extend says so and changes nothing.
    assert!(
        !a.extend(&first[0].ack, Duration::from_secs(10))
            .await
            .expect("stale extend")
    );
    a.acknowledge(&again[0].ack).await.expect("acknowledge");
    assert_eq!(a.queue_size().await.expect("queue_size"), 0);
}

#[tokio::test]
async fn dead_letters_keep_the_reason() {
    let Some(nodes) = nodes() else { return skip() };
    let b = open(&config(nodes), settings("dead")).await;
    let payload = b"\x00\xffbad package".to_vec();
    b.enqueue(Message::new(payload.clone()))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    b.fail(&got[0].ack).await.expect("fail");
    let again = b.dequeue().await.expect("dequeue");
    assert_eq!(again[0].deliveries, Some(2));
    b.dead_letter(&again[0].ack, "signature mismatch: ünïcode kept")
        .await
        .expect("dead_letter");
    assert_eq!(b.dead_letter_size().await.expect("size"), Some(1));
    assert_eq!(b.queue_size().await.expect("queue_size"), 0);
    let dead = b.dead_letters(10).await.expect("dead_letters");
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "signature mismatch: ünïcode kept");
    assert_eq!(dead[0].payload, payload);
    assert_eq!(dead[0].deliveries, Some(2));
    assert_eq!(dead[0].message_id, again[0].message_id);
    assert!(dead[0].dead_at_us > 0);
    b.delete_queue().await.expect("delete_queue");
    assert_eq!(b.dead_letter_size().await.expect("size"), Some(0));
}

#[tokio::test]
async fn fastack_mode_acknowledges_for_good() {
    let Some(nodes) = nodes() else { return skip() };
    let c = DisqueConfig {
        fastack: true,
        ..config(nodes)
    };
    let b = open(
        &c,
        QueueSettings {
            bulk: 10,
            ..settings("fastack")
        },
    )
    .await;
    let msgs = (0..5u8).map(|i| Message::new(vec![i])).collect();
    b.enqueue_many(msgs).await.expect("enqueue_many");
    let mut got = Vec::new();
    while got.len() < 5 {
        got.extend(b.dequeue().await.expect("dequeue"));
    }
    let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
    b.acknowledge_many(&acks).await.expect("acknowledge_many");
    let info = b.info().await.expect("info");
    assert_eq!(info.details.get("ack").map(String::as_str), Some("FASTACK"));
    tokio::time::sleep(Duration::from_millis(2600)).await;
    assert!(b.dequeue().await.expect("dequeue").is_empty());
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
}

#[tokio::test]
async fn stale_acknowledge_keeps_the_new_holders_extension() {
    let Some(nodes) = nodes() else { return skip() };
    let c = config(nodes);
    let s = settings("stalekeep");
    let a = open(&c, s.clone()).await;
    let other = DisqueBroker::connect(&c, s).await.expect("connect");
    a.enqueue(Message::new(b"x".to_vec()))
        .await
        .expect("enqueue");
    let first = a.dequeue().await.expect("dequeue");
    assert_eq!(first.len(), 1);
    // The first lease runs out; the same handle gets the job again and extends it well past
    // its retry (a keeper task repeats WORKING).
    let t1 = Instant::now();
    let mut second = Vec::new();
    while second.is_empty() && t1.elapsed() < Duration::from_secs(15) {
        second = a.dequeue().await.expect("dequeue");
    }
    assert!(!second.is_empty(), "not delivered again within 15 s");
    assert!(
        a.extend(&second[0].ack, Duration::from_secs(6))
            .await
            .expect("extend")
    );
    // The first holder's stale acknowledge is ignored, and must not stop the second holder's
    // keeper either.
    a.acknowledge(&first[0].ack)
        .await
        .expect("stale acknowledge");
    let t2 = Instant::now();
    while t2.elapsed() < Duration::from_millis(5000) {
        assert!(
            other.dequeue().await.expect("dequeue").is_empty(),
            "delivered again after {:?}: the stale acknowledge stopped the keeper",
            t2.elapsed()
        );
    }
    a.acknowledge(&second[0].ack).await.expect("acknowledge");
}

#[tokio::test]
async fn extend_and_delays_out_of_range_do_not_panic() {
    let Some(nodes) = nodes() else { return skip() };
    let b = open(&config(nodes), settings("huge")).await;
    let e = b
        .enqueue(Message::new(b"x".to_vec()).with_delay(Duration::MAX))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("delay"), "{e}");
    b.enqueue(Message::new(b"y".to_vec()))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    assert!(
        b.extend(&got[0].ack, Duration::MAX)
            .await
            .expect("extend by Duration::MAX")
    );
    assert!(b.fail_after(&got[0].ack, Duration::MAX).await.is_err());
    b.acknowledge(&got[0].ack).await.expect("acknowledge");
    b.delete_queue().await.expect("delete_queue");
}
