//! What users of the MongoDB broker rely on beyond the conformance kit: delivery order, bulk
//! claims that never overlap, leases that run out and stale receipts, extension, stats expiry,
//! the indexes made at start-up and the size limit. Each test works in a database of its own
//! (`qsem_<random>`, dropped at the end) on the server of `QCLUSTER_TEST_MONGO_URL`.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use broker_core::{Broker, BrokerError, Message, QueueSettings};
use broker_mongo::{MAX_MESSAGE_SIZE, MongoBroker, MongoConfig};
use common::*;
use futures::TryStreamExt as _;
use mongodb::Client;

/// A database of the test's own and a broker factory on it.
struct Db {
    admin: Client,
    name: String,
}

impl Db {
    async fn new() -> Option<Self> {
        let admin = admin().await?;
        Some(Self {
            admin,
            name: format!("qsem_{}", tag()),
        })
    }

    fn settings(queue: &str, bulk: usize, retry_ms: u64) -> QueueSettings {
        QueueSettings {
            bulk,
            retry: Duration::from_millis(retry_ms),
            wait: Duration::from_millis(200),
            poll: Duration::from_millis(50),
            ..QueueSettings::for_queue(queue)
        }
    }

    async fn open(&self, s: QueueSettings) -> MongoBroker {
        open(&url(), &self.name, s).await.expect("connect")
    }

    /// Another handle on the same queue (its own client), not emptied.
    async fn join(&self, s: QueueSettings) -> MongoBroker {
        let cfg = MongoConfig {
            database: self.name.clone(),
            ..MongoConfig::new(url())
        };
        MongoBroker::connect(&cfg, s).await.expect("connect")
    }

    async fn drop(self) {
        cleanup(&self.admin, &self.name, None).await;
    }
}

#[tokio::test]
async fn priority_then_age() {
    let Some(db) = Db::new().await else { return };
    let b = db.open(Db::settings("order", 10, 30_000)).await;
    // Priorities in enqueue order; one package delayed past the claim, one sent alone later.
    let prios = [0i16, 5, 1, 5, 0, -3, 1];
    let msgs = prios
        .iter()
        .enumerate()
        .map(|(i, p)| Message::new(vec![i as u8]).with_priority(*p))
        .collect();
    b.enqueue_many(msgs).await.expect("enqueue_many");
    b.enqueue(
        Message::new(vec![99])
            .with_priority(9)
            .with_delay(Duration::from_secs(60)),
    )
    .await
    .expect("enqueue delayed");
    b.enqueue(Message::new(vec![7]).with_priority(5))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    let order: Vec<u8> = got.iter().map(|d| d.payload[0]).collect();
    // Highest priority first; within a priority, oldest first; the delayed one not yet.
    assert_eq!(order, vec![1, 3, 7, 2, 6, 0, 4, 5]);
    let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
    b.acknowledge_many(&acks).await.expect("ack");
    assert_eq!(
        b.queue_size().await.expect("size"),
        1,
        "the delayed one waits"
    );
    // One at a time (findAndModify), the same order.
    let one = db.open(Db::settings("order1", 1, 30_000)).await;
    for (i, p) in [(0u8, 1i16), (1, 2), (2, 2), (3, 0)] {
        one.enqueue(Message::new(vec![i]).with_priority(p))
            .await
            .expect("enqueue");
    }
    let mut seen = Vec::new();
    for _ in 0..4 {
        let d = one.dequeue().await.expect("dequeue");
        assert_eq!(d.len(), 1);
        seen.push(d[0].payload[0]);
        one.acknowledge(&d[0].ack).await.expect("ack");
    }
    assert_eq!(seen, vec![1, 2, 0, 3]);
    db.drop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_bulk_claims_never_overlap() {
    const N: usize = 200;
    const CONSUMERS: usize = 4;
    let Some(db) = Db::new().await else { return };
    let s = Db::settings("overlap", 10, 120_000);
    let producer = db.open(s.clone()).await;
    let msgs = (0..N)
        .map(|i| Message::new((i as u32).to_be_bytes().to_vec()))
        .collect();
    producer.enqueue_many(msgs).await.expect("enqueue_many");
    let mut joins = Vec::new();
    for _ in 0..CONSUMERS {
        // Each consumer its own handle (own client and pool), all racing for the same heads.
        let b = db.join(s.clone()).await;
        joins.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut empty = 0;
            while empty < 3 {
                let got = b.dequeue().await.expect("dequeue");
                if got.is_empty() {
                    empty += 1;
                    continue;
                }
                // Held, not acknowledged: an overlap would hand a held package out twice.
                mine.extend(got.into_iter().map(|d| (d.payload, d.deliveries)));
            }
            mine
        }));
    }
    let mut count: HashMap<Vec<u8>, usize> = HashMap::new();
    let mut per = Vec::new();
    for j in joins {
        let mine = j.await.expect("consumer");
        per.push(mine.len());
        for (p, n) in mine {
            assert_eq!(n, Some(1), "a first delivery counted as {n:?}");
            *count.entry(p).or_default() += 1;
        }
    }
    let twice = count.values().filter(|&&n| n > 1).count();
    assert_eq!(
        twice, 0,
        "{twice} packages handed to two consumers ({per:?})"
    );
    assert_eq!(count.len(), N, "per consumer {per:?}");
    assert_eq!(
        producer.lock_size().await.expect("lock_size"),
        Some(N as u64)
    );
    db.drop().await;
}

#[tokio::test]
async fn expired_lease_is_claimed_again_and_the_old_receipt_ignored() {
    let Some(db) = Db::new().await else { return };
    let b = db.open(Db::settings("expire", 1, 800)).await;
    b.enqueue(Message::new(b"x".to_vec()))
        .await
        .expect("enqueue");
    let first = b.dequeue().await.expect("dequeue");
    assert_eq!(first.len(), 1);
    assert!(b.dequeue().await.expect("dequeue").is_empty(), "leased");
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let second = b.dequeue().await.expect("dequeue");
    assert_eq!(second.len(), 1, "an expired lease is claimable again");
    assert_eq!(second[0].message_id, first[0].message_id);
    assert_eq!(second[0].deliveries, Some(2));
    assert_ne!(second[0].ack, first[0].ack, "a new lease, a new token");
    // The first holder's late answers change nothing.
    let old = &first[0].ack;
    b.acknowledge(old).await.expect("stale ack");
    b.acknowledge_many(std::slice::from_ref(old))
        .await
        .expect("stale ack_many");
    b.fail(old).await.expect("stale fail");
    b.fail_after(old, Duration::from_secs(9))
        .await
        .expect("stale fail_after");
    assert!(
        !b.extend(old, Duration::from_secs(60))
            .await
            .expect("stale extend")
    );
    b.dead_letter(old, "late").await.expect("stale dead_letter");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(1));
    assert_eq!(b.dead_letter_size().await.expect("dead"), Some(0));
    assert!(
        b.dequeue().await.expect("dequeue").is_empty(),
        "still leased"
    );
    b.acknowledge(&second[0].ack).await.expect("ack");
    assert_eq!(b.lock_size().await.expect("lock_size"), Some(0));
    assert_eq!(b.queue_size().await.expect("size"), 0);
    db.drop().await;
}

#[tokio::test]
async fn extend_keeps_a_second_consumer_away_past_retry() {
    let Some(db) = Db::new().await else { return };
    let s = Db::settings("extend", 1, 800);
    let a = db.open(s.clone()).await;
    let b = db.join(s).await;
    a.enqueue(Message::new(b"long task".to_vec()))
        .await
        .expect("enqueue");
    let held = a.dequeue().await.expect("dequeue");
    assert!(
        a.extend(&held[0].ack, Duration::from_millis(2500))
            .await
            .expect("extend")
    );
    // Well past the original 800 ms lease.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    assert!(
        b.dequeue().await.expect("dequeue").is_empty(),
        "extended lease held"
    );
    assert!(
        a.extend(&held[0].ack, Duration::from_millis(800))
            .await
            .expect("extend again")
    );
    a.acknowledge(&held[0].ack).await.expect("ack");
    assert!(
        !a.extend(&held[0].ack, Duration::from_secs(1))
            .await
            .expect("extend after ack")
    );
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert!(
        b.dequeue().await.expect("dequeue").is_empty(),
        "acknowledged for good"
    );
    db.drop().await;
}

#[tokio::test]
async fn stats_expire_before_the_ttl_monitor_runs() {
    let Some(db) = Db::new().await else { return };
    let b = db.open(Db::settings("stats", 1, 30_000)).await;
    b.set_stat("qsem:cluster:a", b"alive", Duration::from_secs(1))
        .await
        .expect("set_stat");
    b.set_stat("qsem:cluster:b", b"long", Duration::from_secs(600))
        .await
        .expect("set_stat");
    b.set_stat("qsem.cluster:c", b"no match", Duration::from_secs(600))
        .await
        .expect("set_stat");
    let keys = |v: Vec<broker_core::Stat>| {
        let mut k: Vec<String> = v.into_iter().map(|s| s.key).collect();
        k.sort();
        k
    };
    let now = b.get_stats("qsem:cluster:").await.expect("get_stats");
    assert_eq!(keys(now), vec!["qsem:cluster:a", "qsem:cluster:b"]);
    tokio::time::sleep(Duration::from_millis(1300)).await;
    // The TTL monitor runs once a minute: the query itself leaves out what has expired.
    let later = b.get_stats("qsem:cluster:").await.expect("get_stats");
    assert_eq!(keys(later), vec!["qsem:cluster:b"]);
    db.drop().await;
}

#[tokio::test]
async fn indexes_exist_after_connect() {
    let Some(db) = Db::new().await else { return };
    let b = db.open(Db::settings("indexes", 1, 30_000)).await;
    let d = db.admin.database(&db.name);
    let list = |coll: String| {
        let d = d.clone();
        async move {
            let specs: Vec<mongodb::IndexModel> = d
                .collection::<mongodb::bson::Document>(&coll)
                .list_indexes()
                .await
                .expect("listIndexes")
                .try_collect()
                .await
                .expect("listIndexes");
            specs
                .into_iter()
                .map(|m| {
                    let name = m
                        .options
                        .as_ref()
                        .and_then(|o| o.name.clone())
                        .unwrap_or_default();
                    let ttl = m.options.as_ref().and_then(|o| o.expire_after);
                    (name, m.keys, ttl)
                })
                .collect::<Vec<_>>()
        }
    };
    let queue = list(b.collection_name().to_owned()).await;
    let claim = queue
        .iter()
        .find(|(n, _, _)| n == "claim")
        .expect("claim index");
    let keys: Vec<&str> = claim.1.keys().map(String::as_str).collect();
    assert_eq!(keys, vec!["priority", "_id", "due"]);
    let dead = list(format!("{}.dead", b.collection_name())).await;
    assert!(dead.iter().any(|(n, _, _)| n == "dead_order"), "{dead:?}");
    let stats = list("qcluster.stats".to_owned()).await;
    let ttl = stats
        .iter()
        .find(|(n, _, _)| n == "ttl")
        .expect("ttl index");
    assert_eq!(ttl.2, Some(Duration::ZERO), "{ttl:?}");
    // delete_queue drops the collections and makes the indexes again.
    b.delete_queue().await.expect("delete_queue");
    assert!(
        list(b.collection_name().to_owned())
            .await
            .iter()
            .any(|(n, _, _)| n == "claim")
    );
    db.drop().await;
}

#[tokio::test]
async fn too_large_names_both_sizes() {
    let Some(db) = Db::new().await else { return };
    let s = QueueSettings {
        max_message_size: Some(1000),
        ..Db::settings("large", 1, 30_000)
    };
    let b = db.open(s).await;
    assert_eq!(b.capabilities().max_message_size, 1000);
    let e = b.enqueue(Message::new(vec![0; 1001])).await.unwrap_err();
    assert!(
        matches!(
            e,
            BrokerError::TooLarge {
                size: 1001,
                limit: 1000,
                ..
            }
        ),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("1001") && text.contains("1000"), "{text}");
    // The adapter's own limit: MongoDB's 16 MiB document less room for the other fields.
    let own = db.open(Db::settings("large-own", 1, 30_000)).await;
    assert_eq!(own.capabilities().max_message_size, MAX_MESSAGE_SIZE);
    let e = own
        .enqueue(Message::new(vec![0; MAX_MESSAGE_SIZE + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, BrokerError::TooLarge { size, limit, .. } if size == MAX_MESSAGE_SIZE + 1 && limit == MAX_MESSAGE_SIZE),
        "{e:?}"
    );
    assert_eq!(own.queue_size().await.expect("size"), 0);
    // Asking for more than a document holds is a configuration error, named.
    let over = QueueSettings {
        max_message_size: Some(32 * 1024 * 1024),
        ..Db::settings("large-over", 1, 30_000)
    };
    let cfg = MongoConfig {
        database: db.name.clone(),
        ..MongoConfig::new(url())
    };
    let e = MongoBroker::connect(&cfg, over).await.unwrap_err();
    assert!(e.to_string().contains("max_message_size"), "{e}");
    db.drop().await;
}

#[tokio::test]
async fn unreachable_is_transient_bounded_and_masked() {
    let cfg = MongoConfig {
        connect_timeout: Duration::from_secs(1),
        ..MongoConfig::new("mongodb://app:hunter2-secret@127.0.0.1:9/?authSource=admin")
    };
    let t0 = std::time::Instant::now();
    let e = MongoBroker::connect(&cfg, QueueSettings::for_queue("q"))
        .await
        .unwrap_err();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "took {:?}",
        t0.elapsed()
    );
    assert!(e.is_transient(), "{e:?}");
    let text = format!("{e} {e:?}");
    assert!(!text.contains("hunter2-secret"), "{text}");
    assert!(text.contains("127.0.0.1:9"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_dead_letters_of_one_receipt_keep_exactly_one_copy() {
    let Some(db) = Db::new().await else { return };
    let s = Db::settings("bury", 1, 30_000);
    let b = db.open(s.clone()).await;
    let c = db.join(s).await;
    for round in 0..10u8 {
        b.enqueue(Message::new(vec![round])).await.expect("enqueue");
        let d = b.dequeue().await.expect("dequeue");
        assert_eq!(d.len(), 1);
        let ack = d[0].ack.clone();
        // The same receipt settled twice at once (a retried call, two handles): one wins, and
        // the loser must not take the winner's dead letter away with it.
        let (x, y) = tokio::join!(b.dead_letter(&ack, "first"), c.dead_letter(&ack, "second"));
        x.expect("dead_letter");
        y.expect("dead_letter");
        assert_eq!(b.queue_size().await.expect("size"), 0, "round {round}");
        assert_eq!(b.lock_size().await.expect("lock"), Some(0), "round {round}");
        assert_eq!(
            b.dead_letter_size().await.expect("dead"),
            Some(u64::from(round) + 1),
            "round {round}: the package is in neither place"
        );
    }
    db.drop().await;
}

#[tokio::test]
async fn an_expired_lease_counts_as_waiting() {
    let Some(db) = Db::new().await else { return };
    // A lease long enough that the stand-in server, slow under a loaded machine, answers the
    // two counts below well within it.
    let b = db.open(Db::settings("lapsed", 2, 3000)).await;
    b.enqueue_many(vec![
        Message::new(b"a".to_vec()),
        Message::new(b"b".to_vec()),
    ])
    .await
    .expect("enqueue");
    let held = b.dequeue().await.expect("dequeue");
    assert_eq!(held.len(), 2);
    assert_eq!(b.lock_size().await.expect("lock"), Some(2));
    assert_eq!(b.queue_size().await.expect("size"), 0);
    tokio::time::sleep(Duration::from_millis(3200)).await;
    // Nobody holds them any more: they wait to be delivered again, and purge takes them.
    assert_eq!(b.lock_size().await.expect("lock"), Some(0));
    assert_eq!(b.queue_size().await.expect("size"), 2);
    assert_eq!(b.purge_queue().await.expect("purge"), 2);
    assert!(b.dequeue().await.expect("dequeue").is_empty());
    db.drop().await;
}

#[tokio::test]
async fn replica_set_and_misencoded_urls_keep_the_password_out() {
    // A replica-set host list is no URL authority to the `url` crate: the masking must still
    // find the password (and show the hosts).
    let cfg = MongoConfig {
        connect_timeout: Duration::from_secs(1),
        ..MongoConfig::new(
            "mongodb://app:Rs-s3cret@127.0.0.1:9,127.0.0.1:10/?directConnection=false",
        )
    };
    let e = MongoBroker::connect(&cfg, QueueSettings::for_queue("q"))
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("Rs-s3cret"), "{text}");
    assert!(text.contains("127.0.0.1:9,127.0.0.1:10"), "{text}");
    // An unescaped `?` makes the driver read part of the password as a host: none of it shows.
    let cfg = MongoConfig::new("mongodb://app:Pw4x?Tail9@127.0.0.1:9/");
    let e = MongoBroker::connect(&cfg, QueueSettings::for_queue("q"))
        .await
        .unwrap_err();
    let text = format!("{e} {e:?}");
    assert!(!text.contains("Pw4x") && !text.contains("Tail9"), "{text}");
    assert!(text.contains("mongo.url"), "{text}");
}

/// Concurrent `requeue_dead` of one dead letter on four handles: exactly one answers `true`,
/// the package is in the queue once (the `requeue` mark names its copy), with its priority and
/// as a first delivery; the dead letter is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requeue_dead_stores_once() {
    let Some(db) = Db::new().await else { return };
    let s = Db::settings("redead", 1, 30_000);
    let b = db.open(s.clone()).await;
    b.enqueue(Message::new(b"once".to_vec()).with_priority(3))
        .await
        .expect("enqueue");
    let got = b.dequeue().await.expect("dequeue");
    b.dead_letter(&got[0].ack, "given up")
        .await
        .expect("dead_letter");
    let id = b.dead_letters(10).await.expect("list")[0]
        .message_id
        .clone();
    let mut joins = Vec::new();
    for _ in 0..4 {
        let h = db.join(s.clone()).await;
        let id = id.clone();
        joins.push(tokio::spawn(async move { h.requeue_dead(&id).await }));
    }
    let mut yes = 0;
    for j in joins {
        if j.await.expect("join").expect("requeue_dead") {
            yes += 1;
        }
    }
    assert_eq!(yes, 1, "exactly one requeue succeeds");
    assert_eq!(b.queue_size().await.expect("size"), 1, "stored once");
    assert_eq!(b.dead_letter_size().await.expect("dead"), Some(0));
    assert!(!b.requeue_dead(&id).await.expect("again"));
    // Its priority is kept: it comes before a later package of priority 0.
    b.enqueue(Message::new(b"later".to_vec()))
        .await
        .expect("enqueue");
    let again = b.dequeue().await.expect("dequeue");
    assert_eq!(again[0].payload, b"once");
    assert_eq!(again[0].deliveries, Some(1));
    db.drop().await;
}
