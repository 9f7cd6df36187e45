//! What a user of the SQS broker relies on beyond the conformance kit, against the emulator at
//! `QCLUSTER_TEST_SQS_ENDPOINT` (default `http://127.0.0.1:9324`). Each test uses queues of its own
//! (`qsem-<random>-...`) and deletes them at the end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use aws_sdk_sqs::types::QueueAttributeName;
use broker_core::{Broker, BrokerError, Message, QueueSettings};
use broker_sqs::{SqsBroker, SqsConfig};

fn endpoint() -> String {
    std::env::var("QCLUSTER_TEST_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into())
}

fn config() -> SqsConfig {
    SqsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        ..SqsConfig::default()
    }
}

fn name(what: &str) -> String {
    format!(
        "qsem-{}-{what}",
        &uuid::Uuid::now_v7().simple().to_string()[18..]
    )
}

fn settings(queue: &str) -> QueueSettings {
    QueueSettings {
        wait: Duration::from_millis(500),
        retry: Duration::from_secs(3),
        ..QueueSettings::for_queue(queue)
    }
}

async fn open(s: QueueSettings) -> Arc<SqsBroker> {
    Arc::new(SqsBroker::connect(&config(), s).await.expect("connect"))
}

/// A plain SDK client on the same endpoint, to look behind the adapter.
fn raw() -> aws_sdk_sqs::Client {
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let conf = aws_sdk_sqs::Config::builder()
        .behavior_version(aws_sdk_sqs::config::BehaviorVersion::latest())
        .region(aws_sdk_sqs::config::Region::new("us-east-1"))
        .endpoint_url(endpoint())
        .credentials_provider(aws_sdk_sqs::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .http_client(http)
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

async fn exists(name: &str) -> bool {
    raw().get_queue_url().queue_name(name).send().await.is_ok()
}

/// Skips (or panics under `QCLUSTER_REQUIRE_SERVICES=1`) when the endpoint does not answer.
async fn up() -> bool {
    match raw().list_queues().send().await {
        Ok(_) => true,
        Err(e) => {
            let e = aws_sdk_sqs::error::DisplayErrorContext(e).to_string();
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("SQS endpoint {} required but unreachable: {e}", endpoint());
            }
            eprintln!("skipped: SQS endpoint {} unreachable: {e}", endpoint());
            false
        }
    }
}

async fn drain(b: &SqsBroker, n: usize) -> Vec<broker_core::Delivery> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut got = Vec::new();
    while got.len() < n && Instant::now() < deadline {
        got.extend(b.dequeue().await.expect("dequeue"));
    }
    assert_eq!(got.len(), n, "delivered");
    got
}

#[tokio::test]
async fn enqueue_many_batches_by_count_and_bytes() {
    if !up().await {
        return;
    }
    let b = open(QueueSettings {
        bulk: 10,
        ..settings(&name("batches"))
    })
    .await;
    // 25 small packages: 3 SendMessageBatch calls.
    let before = b.requests();
    let ids = b
        .enqueue_many((0..25).map(|i| Message::new(vec![i as u8; 10])).collect())
        .await
        .unwrap();
    assert_eq!(ids.len(), 25);
    assert_eq!(b.requests() - before, 3, "25 packages in 3 batches");
    let got = drain(&b, 25).await;
    let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
    let before = b.requests();
    b.acknowledge_many(&acks).await.unwrap();
    assert_eq!(b.requests() - before, 3, "25 acknowledgements in 3 batches");
    assert_eq!(b.queue_size().await.unwrap(), 0);
    assert_eq!(b.lock_size().await.unwrap(), Some(0));

    // 3 packages of 300 kB (400 kB of text each): two fit one batch under 1 MiB, not three.
    let big: Vec<Vec<u8>> = (0..3u8).map(|i| vec![i; 300_000]).collect();
    let before = b.requests();
    b.enqueue_many(big.iter().cloned().map(Message::new).collect())
        .await
        .unwrap();
    assert_eq!(b.requests() - before, 2, "split by bytes into 2 batches");
    let got = drain(&b, 3).await;
    let mut payloads: Vec<_> = got.iter().map(|d| d.payload.clone()).collect();
    payloads.sort();
    assert_eq!(payloads, big);
    for d in &got {
        b.acknowledge(&d.ack).await.unwrap();
    }
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn too_large_names_both_sizes_and_sends_nothing() {
    if !up().await {
        return;
    }
    let b = open(QueueSettings {
        max_message_size: Some(1000),
        ..settings(&name("large"))
    })
    .await;
    let before = b.requests();
    let e = b.enqueue(Message::new(vec![7; 1001])).await.unwrap_err();
    match &e {
        BrokerError::TooLarge { size, limit, .. } => assert_eq!((*size, *limit), (1001, 1000)),
        other => panic!("{other:?}"),
    }
    let text = e.to_string();
    assert!(text.contains("1001") && text.contains("1000"), "{text}");
    let e = b
        .enqueue_many(vec![Message::new(vec![1; 10]), Message::new(vec![7; 1001])])
        .await
        .unwrap_err();
    assert!(matches!(e, BrokerError::TooLarge { .. }), "{e:?}");
    assert_eq!(b.requests(), before, "nothing sent");
    assert_eq!(b.queue_size().await.unwrap(), 0);
    // The adapter's own limit: the largest raw package whose base64 fits the queue's 1 MiB.
    let own = open(settings(&name("large-own"))).await;
    let cap = own.capabilities().max_message_size;
    assert!(cap > 700_000 && cap < 1024 * 1024 * 3 / 4, "{cap}");
    let e = own
        .enqueue(Message::new(vec![0; cap + 1]))
        .await
        .unwrap_err();
    assert!(
        matches!(e, BrokerError::TooLarge { size, limit, .. } if size == cap + 1 && limit == cap)
    );
    b.delete_queue().await.unwrap();
    own.delete_queue().await.unwrap();
}

#[tokio::test]
async fn bulk_over_ten_is_clamped() {
    if !up().await {
        return;
    }
    let b = open(QueueSettings {
        bulk: 15,
        ..settings(&name("bulk"))
    })
    .await;
    assert_eq!(b.capabilities().max_bulk, 10);
    let info = b.info().await.unwrap();
    assert_eq!(info.details.get("bulk").map(String::as_str), Some("10"));
    b.enqueue_many((0..15).map(|i| Message::new(vec![i as u8])).collect())
        .await
        .unwrap();
    let mut sizes = Vec::new();
    let mut total = 0;
    while total < 15 {
        let got = b.dequeue().await.unwrap();
        assert!(got.len() <= 10);
        total += got.len();
        sizes.push(got.len());
        let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.unwrap();
    }
    assert!(sizes.contains(&10), "a full batch of 10: {sizes:?}");
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn second_purge_within_a_minute_is_refused_quickly() {
    if !up().await {
        return;
    }
    let b = open(settings(&name("purge"))).await;
    b.enqueue_many((0..4).map(|i| Message::new(vec![i])).collect())
        .await
        .unwrap();
    assert_eq!(b.purge_queue().await.unwrap(), 4);
    b.enqueue(Message::new(vec![9])).await.unwrap();
    let t = Instant::now();
    let e = b.purge_queue().await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let text = e.to_string();
    assert!(text.contains("60") && text.contains("retry"), "{text}");
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn missing_queue_without_create_is_a_config_error() {
    if !up().await {
        return;
    }
    let q = name("absent");
    let cfg = SqsConfig {
        create: false,
        ..config()
    };
    let e = SqsBroker::connect(&cfg, settings(&q)).await.unwrap_err();
    match &e {
        BrokerError::Config { key, message } => {
            assert_eq!(key, "sqs.queue");
            assert!(message.contains(&q), "{message}");
        }
        other => panic!("{other:?}"),
    }
    assert!(!exists(&q).await, "create = false created the queue");
}

#[tokio::test]
async fn managed_dead_letter_queue_and_delete_queue() {
    if !up().await {
        return;
    }
    let q = name("dead");
    let b = open(settings(&q)).await;
    b.enqueue(Message::new(b"poison".to_vec())).await.unwrap();
    let got = drain(&b, 1).await;
    b.dead_letter(&got[0].ack, "bad signature").await.unwrap();
    assert!(exists(&format!("{q}-dead")).await, "<queue>-dead created");
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(1));
    let dead = b.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "bad signature");
    assert_eq!(dead[0].payload, b"poison");
    assert_eq!(dead[0].deliveries, Some(1));
    assert_eq!(dead[0].message_id, got[0].message_id);
    // Listing does not consume.
    assert_eq!(b.dead_letters(10).await.unwrap().len(), 1);
    assert_eq!(b.dead_letter_size().await.unwrap(), Some(1));
    b.delete_queue().await.unwrap();
    assert!(!exists(&q).await && !exists(&format!("{q}-dead")).await);
}

#[tokio::test]
async fn redrive_policy_queue_takes_the_dead_letters() {
    if !up().await {
        return;
    }
    let (q, dlq) = (name("redrive"), name("redrive-dlq"));
    let c = raw();
    let dlq_url = c
        .create_queue()
        .queue_name(&dlq)
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let arn = c
        .get_queue_attributes()
        .queue_url(&dlq_url)
        .attribute_names(QueueAttributeName::QueueArn)
        .send()
        .await
        .unwrap()
        .attributes()
        .unwrap()[&QueueAttributeName::QueueArn]
        .clone();
    let q_url = c
        .create_queue()
        .queue_name(&q)
        .attributes(
            QueueAttributeName::RedrivePolicy,
            format!(r#"{{"deadLetterTargetArn":"{arn}","maxReceiveCount":"50"}}"#),
        )
        .send()
        .await
        .unwrap()
        .queue_url()
        .unwrap()
        .to_owned();
    let cfg = SqsConfig {
        queue: Some(q.clone()),
        create: false,
        ..config()
    };
    let b = SqsBroker::connect(&cfg, settings("cluster-queue"))
        .await
        .unwrap();
    assert!(
        b.info().await.unwrap().details["dead_letter_queue"].contains(&dlq),
        "{:?}",
        b.info().await.unwrap().details
    );
    b.enqueue(Message::new(b"x".to_vec())).await.unwrap();
    let got = drain(&b, 1).await;
    b.dead_letter(&got[0].ack, "gave up after 3 attempts")
        .await
        .unwrap();
    let dead = b.dead_letters(5).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].reason, "gave up after 3 attempts");
    assert!(!exists(&format!("{q}-dead")).await, "no managed queue");
    // delete_queue leaves the operator's dead-letter queue alone.
    b.delete_queue().await.unwrap();
    assert!(exists(&dlq).await);
    c.delete_queue().queue_url(&dlq_url).send().await.unwrap();
    let _ = c.delete_queue().queue_url(&q_url).send().await;
}

#[tokio::test]
async fn fifo_groups_order_and_deduplication() {
    if !up().await {
        return;
    }
    let cfg = SqsConfig {
        fifo: true,
        ..config()
    };
    let q = name("fifo");
    let b = SqsBroker::connect(
        &cfg,
        QueueSettings {
            bulk: 10,
            ..settings(&q)
        },
    )
    .await
    .unwrap();
    assert!(b.is_fifo() && b.queue_url().ends_with(".fifo"));
    // The same key twice within the window: stored once.
    for _ in 0..2 {
        b.enqueue(Message::new(b"once".to_vec()).with_key("task-1"))
            .await
            .unwrap();
    }
    // Order within a group.
    let ordered: Vec<Vec<u8>> = (0..6u8).map(|i| vec![b'a', i]).collect();
    b.enqueue_many(
        ordered
            .iter()
            .enumerate()
            .map(|(i, p)| {
                Message::new(p.clone())
                    .with_group("g1")
                    .with_key(format!("a-{i}"))
            })
            .collect(),
    )
    .await
    .unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while got.len() < 7 && Instant::now() < deadline {
        let batch = b.dequeue().await.unwrap();
        let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.unwrap();
        got.extend(batch.into_iter().map(|d| d.payload));
    }
    assert_eq!(got.iter().filter(|p| *p == b"once").count(), 1, "{got:?}");
    let g1: Vec<_> = got.iter().filter(|p| p[0] == b'a').cloned().collect();
    assert_eq!(g1, ordered, "order kept within the group");
    assert!(b.dequeue().await.unwrap().is_empty());
    // A held group does not hold back another group.
    let one = SqsBroker::connect(&cfg, settings(&q)).await.unwrap();
    one.enqueue(Message::new(b"g1".to_vec()).with_group("g1"))
        .await
        .unwrap();
    one.enqueue(Message::new(b"g2".to_vec()).with_group("g2"))
        .await
        .unwrap();
    let first = drain(&one, 1).await;
    let second = drain(&one, 1).await;
    assert_ne!(first[0].payload, second[0].payload);
    one.acknowledge(&first[0].ack).await.unwrap();
    one.acknowledge(&second[0].ack).await.unwrap();
    // No per-message delay on FIFO: refused with a clear error, nothing sent.
    let e = one
        .enqueue(Message::new(b"later".to_vec()).with_delay(Duration::from_secs(5)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("FIFO"), "{e}");
    assert_eq!(one.queue_size().await.unwrap(), 0);
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn extend_keeps_a_message_past_retry() {
    if !up().await {
        return;
    }
    let q = name("extend");
    let s = QueueSettings {
        retry: Duration::from_secs(2),
        wait: Duration::ZERO,
        ..settings(&q)
    };
    let a = open(s.clone()).await;
    let b = open(s).await;
    a.enqueue(Message::new(b"long task".to_vec()))
        .await
        .unwrap();
    let held = drain(&a, 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        a.extend(&held[0].ack, Duration::from_secs(6))
            .await
            .unwrap()
    );
    // Past the 2 s lease: still invisible to another handle.
    let until = Instant::now() + Duration::from_secs(3);
    while Instant::now() < until {
        assert!(
            b.dequeue().await.unwrap().is_empty(),
            "delivered during the extension"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    a.acknowledge(&held[0].ack).await.unwrap();
    assert!(
        !a.extend(&held[0].ack, Duration::from_secs(6))
            .await
            .unwrap()
    );
    assert_eq!(a.lock_size().await.unwrap(), Some(0));
    a.delete_queue().await.unwrap();
}

#[tokio::test]
async fn delays_beyond_sqs_limits_are_refused() {
    if !up().await {
        return;
    }
    let b = open(settings(&name("delay"))).await;
    let e = b
        .enqueue(Message::new(vec![1]).with_delay(Duration::from_secs(901)))
        .await
        .unwrap_err();
    assert!(e.to_string().contains("900"), "{e}");
    assert_eq!(b.queue_size().await.unwrap(), 0);
    let e = SqsBroker::connect(
        &config(),
        QueueSettings {
            retry: Duration::from_secs(43_201),
            ..settings(&name("retry"))
        },
    )
    .await
    .unwrap_err();
    assert!(
        matches!(&e, BrokerError::Config { key, .. } if key == "retry"),
        "{e:?}"
    );
    b.delete_queue().await.unwrap();
}

#[tokio::test]
async fn fifo_dead_letters_and_stale_batch_acknowledge() {
    if !up().await {
        return;
    }
    let cfg = SqsConfig {
        fifo: true,
        ..config()
    };
    let q = name("fifo-dead");
    let b = SqsBroker::connect(
        &cfg,
        QueueSettings {
            bulk: 10,
            retry: Duration::from_secs(1),
            ..settings(&q)
        },
    )
    .await
    .unwrap();
    b.enqueue_many(vec![
        Message::new(b"p1".to_vec()).with_key("k1"),
        Message::new(b"p2".to_vec()).with_key("k2"),
    ])
    .await
    .unwrap();
    let got = drain(&b, 2).await;
    b.dead_letter(&got[0].ack, "poison").await.unwrap();
    assert!(exists(&format!("{q}-dead.fifo")).await, "{q}-dead.fifo");
    let dead = b.dead_letters(10).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(
        (dead[0].payload.as_slice(), dead[0].reason.as_str()),
        (&b"p1"[..], "poison")
    );
    // p2's lease (1 s) runs out; a batch acknowledge with its old receipt is ignored, and the
    // package comes back.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    b.acknowledge_many(&[got[1].ack.clone()]).await.unwrap();
    let again = drain(&b, 1).await;
    assert_eq!(again[0].payload, b"p2");
    assert_eq!(again[0].deliveries, Some(2));
    b.acknowledge_many(&[again[0].ack.clone()]).await.unwrap();
    b.delete_queue().await.unwrap();
    assert!(!exists(&q).await && !exists(&format!("{q}-dead.fifo")).await);
}

/// `extend` counts from now, so a short extension ends the lease early: once SQS has handed
/// the package to another consumer, the first receipt is stale (acknowledge ignored, extend
/// `false`) even though the deadline it carries has not passed, and the new holder keeps it.
#[tokio::test]
async fn a_shortened_lease_is_not_settled_after_it_ran_out() {
    if !up().await {
        return;
    }
    let q = name("shorten");
    let s = QueueSettings {
        retry: Duration::from_secs(30),
        wait: Duration::ZERO,
        ..settings(&q)
    };
    let a = open(s.clone()).await;
    let b = open(s).await;
    a.enqueue(Message::new(b"short".to_vec())).await.unwrap();
    let first = drain(&a, 1).await;
    assert!(
        a.extend(&first[0].ack, Duration::from_secs(1))
            .await
            .unwrap()
    );
    // SQS shows it again after 1 s (not 30): b takes it.
    let second = drain(&b, 1).await;
    assert_eq!(second[0].message_id, first[0].message_id);
    a.acknowledge(&first[0].ack).await.unwrap();
    assert!(
        !a.extend(&first[0].ack, Duration::from_secs(30))
            .await
            .unwrap(),
        "a stale receipt extended"
    );
    assert_eq!(
        a.lock_size().await.unwrap(),
        Some(1),
        "the stale acknowledge removed b's package"
    );
    b.fail(&second[0].ack).await.unwrap();
    let third = drain(&a, 1).await;
    assert_eq!(third[0].payload, b"short");
    a.acknowledge(&third[0].ack).await.unwrap();
    a.delete_queue().await.unwrap();
}
