//! Throughput of the Redis broker beside the raw limit on the same server, in the same run.
//!
//! `cargo bench -p broker-redis --bench throughput` (env `BENCH_N`, default 100000;
//! `QCLUSTER_TEST_REDIS_URL`).
//!
//! Ours: N packages of 100 bytes enqueued with `enqueue_many`, then 2 consumers (each its own
//! handle) dequeue and acknowledge (one call per batch), bulk 1 and 100, reliable and fast mode.
//! Raw: the same N values LPUSHed in pipelines of 100, then 2 connections RPOP in pipelines of 100
//! until empty (no scripts, no receipts); and `redis-benchmark -t lpush,rpop -P 16` if installed.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_redis::{RedisBroker, RedisConfig};

const CONSUMERS: usize = 2;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let url = std::env::var("QCLUSTER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    println!("qcluster Redis broker bench: N = {n}, {CONSUMERS} consumers, 100-byte packages");
    let raw = match raw(&url, n).await {
        Ok(r) => r,
        Err(e) => {
            println!("skipped: {e}");
            return;
        }
    };
    println!(
        "raw pipelined LPUSH: {:.0}/s, raw RPOP pipelined by 100 x2: {:.0}/s",
        raw.0, raw.1
    );
    println!(
        "{:<9} {:>5} {:>12} {:>14} {:>10}",
        "mode", "bulk", "enqueue/s", "dequeue+ack/s", "vs raw"
    );
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    for reliable in [true, false] {
        for bulk in [1usize, 100] {
            let this = format!("{}{bulk}", if reliable { "reliable" } else { "fast" });
            if !only.is_empty() && only != this {
                continue;
            }
            match ours(&url, n, bulk, reliable).await {
                Ok((enq, deq)) => println!(
                    "{:<9} {bulk:>5} {enq:>12.0} {deq:>14.0} {:>9.0}%",
                    if reliable { "reliable" } else { "fast" },
                    100.0 * deq / raw.1
                ),
                Err(e) => println!("{reliable} {bulk}: failed: {e}"),
            }
        }
    }
    if let Ok(out) = std::process::Command::new("redis-benchmark")
        .args(["-t", "lpush,rpop", "-P", "16", "-q", "-n", "200000"])
        .output()
    {
        print!(
            "redis-benchmark -P 16: {}",
            String::from_utf8_lossy(&out.stdout).replace('\r', "")
        );
    }
}

async fn raw(url: &str, n: usize) -> Result<(f64, f64), String> {
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| e.to_string())?;
    let key = format!("bench:raw:{}", std::process::id());
    let value = vec![7u8; 100];
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        let mut p = redis::pipe();
        for _ in 0..k {
            p.lpush(&key, &value).ignore();
        }
        let () = p.query_async(&mut c).await.map_err(|e| e.to_string())?;
        left -= k;
    }
    let push = n as f64 / t0.elapsed().as_secs_f64();
    let done = Arc::new(AtomicUsize::new(0));
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..CONSUMERS {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let key = key.clone();
        let done = done.clone();
        joins.push(tokio::spawn(async move {
            loop {
                let mut p = redis::pipe();
                for _ in 0..100 {
                    p.rpop(&key, None);
                }
                let got: Vec<Option<Vec<u8>>> =
                    p.query_async(&mut c).await.map_err(|e| e.to_string())?;
                let k = got.iter().flatten().count();
                done.fetch_add(k, Ordering::Relaxed);
                if k < 100 {
                    return Ok::<_, String>(());
                }
            }
        }));
    }
    for j in joins {
        j.await.map_err(|e| e.to_string())??;
    }
    let pop = done.load(Ordering::Relaxed) as f64 / t0.elapsed().as_secs_f64();
    Ok((push, pop))
}

async fn ours(url: &str, n: usize, bulk: usize, reliable: bool) -> Result<(f64, f64), String> {
    let mut cfg = RedisConfig::new(url);
    cfg.reliable = reliable;
    cfg.prefix = format!("bench{}", std::process::id());
    let settings = QueueSettings {
        queue: format!("q{bulk}{reliable}"),
        bulk,
        retry: Duration::from_secs(300),
        wait: Duration::from_millis(100),
        poll: Duration::from_millis(20),
        max_message_size: None,
    };
    let producer = RedisBroker::connect(&cfg, settings.clone())
        .await
        .map_err(|e| e.to_string())?;
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let batch: Vec<Message> = (0..k).map(|_| Message::new(vec![7u8; 100])).collect();
        producer
            .enqueue_many(batch)
            .await
            .map_err(|e| e.to_string())?;
        left -= k;
    }
    let enq = n as f64 / t0.elapsed().as_secs_f64();
    let done = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(std::sync::OnceLock::<Instant>::new());
    let t0 = Instant::now();
    let mut joins = Vec::new();
    for _ in 0..CONSUMERS {
        let b = RedisBroker::connect(&cfg, settings.clone())
            .await
            .map_err(|e| e.to_string())?;
        let done = done.clone();
        let finished = finished.clone();
        joins.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < n {
                let got = b.dequeue().await.map_err(|e| e.to_string())?;
                let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
                b.acknowledge_many(&acks).await.map_err(|e| e.to_string())?;
                if done.fetch_add(got.len(), Ordering::Relaxed) + got.len() >= n {
                    let _ = finished.set(Instant::now());
                }
            }
            Ok::<_, String>(())
        }));
    }
    for j in joins {
        j.await.map_err(|e| e.to_string())??;
    }
    let end = finished.get().copied().unwrap_or_else(Instant::now);
    let deq = n as f64 / end.duration_since(t0).as_secs_f64();
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    Ok((enq, deq))
}
