//! Throughput of the NATS broker against a raw async-nats loop on the same stream layout, in the
//! same run: publish N packages (acknowledgements pipelined), then pull them in batches and
//! acknowledge them. Goal: the broker reaches at least 80% of the raw rate.
//!
//! ```sh
//! cargo bench -p custom_broker --bench throughput   # N = 100000, batches of 100, 2 rounds
//! BENCH_N=200000 BENCH_BULK=10 cargo bench -p custom_broker --bench throughput
//! ```
//! Needs the NATS server (JetStream on) at `QCLUSTER_TEST_NATS_URL` or 127.0.0.1:4222.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer, stream};
use broker_core::{Broker, Message, QueueSettings};
use custom_broker::{NatsBroker, NatsConfig};
use futures::StreamExt;

const PAYLOAD: usize = 256;
const PIPELINE: usize = 512;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Rates {
    publish: f64,
    consume: f64,
    total: f64,
}

/// The same layout the broker uses: a work-queue stream, a durable pull consumer with explicit
/// acks; acks sent without waiting, the last one confirmed before the clock stops.
async fn raw(url: &str, prefix: &str, n: usize, bulk: usize) -> Result<Rates, async_nats::Error> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    let name = format!("{prefix}-raw");
    let subject = format!("{prefix}.raw");
    let s = js
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..Default::default()
        })
        .await?;
    let c: consumer::PullConsumer = s
        .create_consumer(consumer::pull::Config {
            durable_name: Some("workers".into()),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: Duration::from_secs(60),
            max_deliver: -1,
            max_ack_pending: -1,
            ..Default::default()
        })
        .await?;
    let payload = bytes::Bytes::from(vec![7u8; PAYLOAD]);
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(PIPELINE);
        let mut acks = Vec::with_capacity(k);
        for _ in 0..k {
            acks.push(js.publish(subject.clone(), payload.clone()).await?);
        }
        for a in acks {
            a.await?;
        }
        left -= k;
    }
    let published = t0.elapsed();
    let t1 = Instant::now();
    let mut got = 0;
    while got < n {
        let mut batch = c
            .fetch()
            .max_messages(bulk)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let mut last = None;
        while let Some(m) = batch.next().await {
            let m = m?;
            got += 1;
            if let Some(prev) = last.replace(m) {
                prev.ack().await?;
            }
        }
        if let Some(m) = last {
            m.double_ack().await?;
        }
    }
    let consumed = t1.elapsed();
    js.delete_stream(&name).await?;
    Ok(Rates {
        publish: n as f64 / published.as_secs_f64(),
        consume: n as f64 / consumed.as_secs_f64(),
        total: n as f64 / (published + consumed).as_secs_f64(),
    })
}

async fn ours(
    url: &str,
    prefix: &str,
    n: usize,
    bulk: usize,
) -> Result<Rates, broker_core::BrokerError> {
    let mut cfg = NatsConfig::new(url);
    cfg.prefix = prefix.to_owned();
    let settings = QueueSettings {
        bulk,
        retry: Duration::from_secs(60),
        wait: Duration::from_secs(1),
        ..QueueSettings::for_queue("bench")
    };
    let b = NatsBroker::connect(cfg, settings).await?;
    b.delete_queue().await?;
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        b.enqueue_many((0..k).map(|_| Message::new(vec![7u8; PAYLOAD])).collect())
            .await?;
        left -= k;
    }
    let published = t0.elapsed();
    let t1 = Instant::now();
    let mut got = 0;
    while got < n {
        let batch = b.dequeue().await?;
        got += batch.len();
        let acks: Vec<_> = batch.into_iter().map(|d| d.ack).collect();
        b.acknowledge_many(&acks).await?;
    }
    let consumed = t1.elapsed();
    b.delete_queue().await?;
    Ok(Rates {
        publish: n as f64 / published.as_secs_f64(),
        consume: n as f64 / consumed.as_secs_f64(),
        total: n as f64 / (published + consumed).as_secs_f64(),
    })
}

/// The better of two runs, phase by phase.
fn best(a: Option<Rates>, b: Rates) -> Rates {
    match a {
        None => b,
        Some(a) => Rates {
            publish: a.publish.max(b.publish),
            consume: a.consume.max(b.consume),
            total: a.total.max(b.total),
        },
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url =
        std::env::var("QCLUSTER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let n = env("BENCH_N", 100_000);
    let bulk = env("BENCH_BULK", 100);
    let prefix = format!("bench{}", std::process::id());
    println!("NATS throughput, {n} packages of {PAYLOAD} bytes, batches of {bulk}, {url}");
    // Alternating rounds, best of each: the server's disk and the other loop's leftovers
    // (stream deletion, compaction) weigh on whichever runs next.
    let rounds = env("BENCH_ROUNDS", 2);
    let mut best_raw: Option<Rates> = None;
    let mut best_ours: Option<Rates> = None;
    for round in 0..rounds {
        let r = match raw(&url, &format!("{prefix}r{round}"), n, bulk).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("skipped: raw loop: {e}");
                return;
            }
        };
        let o = match ours(&url, &format!("{prefix}o{round}"), n, bulk).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("broker loop failed: {e}");
                std::process::exit(1);
            }
        };
        println!(
            "round {round}: raw {:.0}/s, NatsBroker {:.0}/s (publish + consume)",
            r.total, o.total
        );
        best_raw = Some(best(best_raw, r));
        best_ours = Some(best(best_ours, o));
    }
    let (Some(raw), Some(ours)) = (best_raw, best_ours) else {
        return;
    };
    println!(
        "{:<12} {:>12} {:>12} {:>12}",
        "", "publish/s", "consume/s", "total/s"
    );
    for (name, r) in [("raw", &raw), ("NatsBroker", &ours)] {
        println!(
            "{name:<12} {:>12.0} {:>12.0} {:>12.0}",
            r.publish, r.consume, r.total
        );
    }
    println!(
        "{:<12} {:>11.0}% {:>11.0}% {:>11.0}%",
        "ratio",
        100.0 * ours.publish / raw.publish,
        100.0 * ours.consume / raw.consume,
        100.0 * ours.total / raw.total
    );
}
