//! Throughput of the Redis broker beside the raw limit on the same server, in the same run.
//!
//! `cargo bench -p broker-redis --bench throughput` (env `BENCH_N`, default 100000;
//! `BENCH_ROUNDS`, default 3; `BENCH_ONLY`, e.g. `reliable100`; `QCLUSTER_TEST_REDIS_URL`).
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
    let n: usize = env("BENCH_N", 100_000);
    let rounds: usize = env("BENCH_ROUNDS", 3).max(1);
    let url = std::env::var("QCLUSTER_TEST_REDIS_URL")
        .unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());
    println!(
        "qcluster Redis broker bench: N = {n}, {CONSUMERS} consumers, 100-byte packages, \
         median of {rounds} rounds (raw and ours alternate)"
    );
    let only = std::env::var("BENCH_ONLY").unwrap_or_default();
    let cases: Vec<(bool, usize)> = [(true, 1), (true, 100), (false, 1), (false, 100)]
        .into_iter()
        .filter(|(reliable, bulk)| {
            only.is_empty()
                || only == format!("{}{bulk}", if *reliable { "reliable" } else { "fast" })
        })
        .collect();
    let (mut raw_push, mut raw_pop) = (Vec::new(), Vec::new());
    let mut ours_runs: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); cases.len()];
    for _ in 0..rounds {
        match raw(&url, n).await {
            Ok((push, pop)) => {
                raw_push.push(push);
                raw_pop.push(pop);
            }
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        }
        for (c, &(reliable, bulk)) in cases.iter().enumerate() {
            match ours(&url, n, bulk, reliable).await {
                Ok((enq, deq)) => {
                    ours_runs[c].0.push(enq);
                    ours_runs[c].1.push(deq);
                }
                Err(e) => println!("{reliable} {bulk}: failed: {e}"),
            }
        }
    }
    let raw_pop = median(&mut raw_pop);
    println!(
        "raw pipelined LPUSH: {:.0}/s, raw RPOP pipelined by 100 x2: {raw_pop:.0}/s",
        median(&mut raw_push)
    );
    println!(
        "{:<9} {:>5} {:>12} {:>14} {:>10}",
        "mode", "bulk", "enqueue/s", "dequeue+ack/s", "vs raw"
    );
    for (c, &(reliable, bulk)) in cases.iter().enumerate() {
        let (enq, deq) = &mut ours_runs[c];
        if deq.is_empty() {
            continue;
        }
        let deq = median(deq);
        println!(
            "{:<9} {bulk:>5} {:>12.0} {deq:>14.0} {:>9.0}%",
            if reliable { "reliable" } else { "fast" },
            median(enq),
            100.0 * deq / raw_pop
        );
    }
    if let Ok(out) = std::process::Command::new("redis-benchmark")
        .args(["-t", "lpush,rpop", "-P", "16", "-q", "-n", "200000"])
        .output()
    {
        // `-q` still prints progress lines ending in `\r`; keep the final figures only.
        let text = String::from_utf8_lossy(&out.stdout);
        for line in text.split(['\r', '\n']) {
            if line.contains("requests per second") {
                println!("redis-benchmark -P 16: {}", line.trim());
            }
        }
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    cfg.prefix = Some(format!("bench{}", std::process::id()));
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
    let cpu0 = cpu(url).await;
    let t0 = Instant::now();
    let mut joins = Vec::new();
    let shared = RedisBroker::connect(&cfg, settings.clone())
        .await
        .map_err(|e| e.to_string())?;
    for _ in 0..CONSUMERS {
        let b = if std::env::var_os("BENCH_SHARED").is_some() {
            shared.clone()
        } else {
            RedisBroker::connect(&cfg, settings.clone())
                .await
                .map_err(|e| e.to_string())?
        };
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
    if std::env::var_os("BENCH_CPU").is_some() {
        let cpu1 = cpu(url).await;
        println!(
            "  cpu per package: server {:.2} us, client {:.2} us",
            (cpu1.0 - cpu0.0) * 1e6 / n as f64,
            (cpu1.1 - cpu0.1) * 1e6 / n as f64
        );
    }
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    Ok((enq, deq))
}

/// CPU seconds used so far by the Redis server (`INFO cpu`) and by this process (`/proc`).
async fn cpu(url: &str) -> (f64, f64) {
    let server = async {
        let client = redis::Client::open(url).ok()?;
        let mut c = client.get_multiplexed_async_connection().await.ok()?;
        let text: String = redis::cmd("INFO")
            .arg("cpu")
            .query_async(&mut c)
            .await
            .ok()?;
        let get = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<f64>().ok())
        };
        Some(get("used_cpu_user:")? + get("used_cpu_sys:")?)
    };
    let client = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
            let ticks = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
            Some(ticks / 100.0)
        });
    (server.await.unwrap_or(0.0), client.unwrap_or(0.0))
}
