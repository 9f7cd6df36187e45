//! Throughput of the Disque broker beside raw Disque commands on the same node, in the same run.
//!
//! `DISQUE_NODES=127.0.0.1:7711 cargo bench -p broker-disque --bench throughput` (env `BENCH_N`,
//! default 20000; `BENCH_ROUNDS`, default 3; `DISQUE_AUTH`). Without `DISQUE_NODES` it prints a
//! skip line.
//!
//! Ours: N packages of 100 bytes through `enqueue_many` in batches of 100, then 2 consumers (each
//! its own handle, bulk 100) dequeue and `acknowledge_many`. Raw: the same N bodies ADDJOBed in
//! pipelines of 100 (same RETRY/TTL), then 2 connections `GETJOB COUNT 100` and one `ACKJOB` per
//! batch. The adapter adds per batch: a pipeline of `WORKING` after `GETJOB` (lease from
//! delivery) and a pipeline of `SHOW` before the `ACKJOB` (stale-receipt check).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_disque::{DisqueBroker, DisqueConfig};
use redis::Value;

const CONSUMERS: usize = 2;
const BATCH: usize = 100;

fn env(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let Some(node) = std::env::var("DISQUE_NODES")
        .ok()
        .and_then(|n| n.split(',').next().map(|s| s.trim().to_owned()))
        .filter(|n| !n.is_empty())
    else {
        println!("skipped: no Disque server (set DISQUE_NODES)");
        return;
    };
    let auth = std::env::var("DISQUE_AUTH").ok().filter(|a| !a.is_empty());
    let n = env("BENCH_N", 20_000);
    let rounds = env("BENCH_ROUNDS", 3).max(1);
    println!(
        "qcluster Disque broker bench on {node}: N = {n}, {CONSUMERS} consumers, bulk {BATCH}, \
         100-byte packages, median of {rounds} rounds (raw and ours alternate)"
    );
    let (mut rp, mut rc, mut op, mut oc) = (vec![], vec![], vec![], vec![]);
    for r in 0..rounds {
        match raw(&node, auth.as_deref(), n, r).await {
            Ok((p, c)) => {
                rp.push(p);
                rc.push(c);
            }
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        }
        match ours(&node, auth.clone(), n, r).await {
            Ok((p, c)) => {
                op.push(p);
                oc.push(c);
            }
            Err(e) => {
                println!("ours failed: {e}");
                return;
            }
        }
    }
    let (rp, rc, op, oc) = (median(rp), median(rc), median(op), median(oc));
    println!("raw  enqueue {rp:>9.0}/s   consume (get+ack) {rc:>9.0}/s");
    println!("ours enqueue {op:>9.0}/s   consume (get+ack) {oc:>9.0}/s");
    println!(
        "ratio ours/raw: enqueue {:.2}, consume {:.2}",
        op / rp,
        oc / rc
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

async fn raw(node: &str, auth: Option<&str>, n: usize, round: usize) -> Result<(f64, f64), String> {
    let queue = format!("bench-raw-{}-{round}", std::process::id());
    let url = match auth {
        Some(a) => format!("redis://:{a}@{node}/"),
        None => format!("redis://{node}/"),
    };
    let client = redis::Client::open(url).map_err(|e| e.to_string())?;
    let mut c = client
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("cannot reach {node}: {e}"))?;
    let body = vec![b'x'; 100];
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let mut pipe = redis::pipe();
        for _ in chunk {
            pipe.cmd("ADDJOB")
                .arg(&queue)
                .arg(&body)
                .arg(5000)
                .arg("RETRY")
                .arg(61)
                .arg("TTL")
                .arg(604_800);
        }
        let _: Vec<String> = pipe.query_async(&mut c).await.map_err(|e| e.to_string())?;
    }
    let push = n as f64 / t.elapsed().as_secs_f64();
    let done = Arc::new(AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..CONSUMERS {
        let mut c = client
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        let (queue, done) = (queue.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < n {
                let v: Value = redis::cmd("GETJOB")
                    .arg("TIMEOUT")
                    .arg(100)
                    .arg("COUNT")
                    .arg(BATCH)
                    .arg("WITHCOUNTERS")
                    .arg("FROM")
                    .arg(&queue)
                    .query_async(&mut c)
                    .await?;
                let Value::Array(jobs) = v else { continue };
                let ids: Vec<Value> = jobs
                    .into_iter()
                    .filter_map(|j| match j {
                        Value::Array(mut f) if f.len() > 1 => Some(f.swap_remove(1)),
                        _ => None,
                    })
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                let mut ack = redis::cmd("ACKJOB");
                for id in &ids {
                    if let Value::BulkString(b) = id {
                        ack.arg(b.as_slice());
                    }
                }
                let _: Value = ack.query_async(&mut c).await?;
                done.fetch_add(ids.len(), Ordering::SeqCst);
            }
            Ok::<_, redis::RedisError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    Ok((push, n as f64 / t.elapsed().as_secs_f64()))
}

async fn ours(
    node: &str,
    auth: Option<String>,
    n: usize,
    round: usize,
) -> Result<(f64, f64), String> {
    let config = DisqueConfig {
        auth,
        ..DisqueConfig::new([node])
    };
    let settings = QueueSettings {
        bulk: BATCH,
        wait: Duration::from_millis(100),
        ..QueueSettings::for_queue(format!("bench-ours-{}-{round}", std::process::id()))
    };
    let producer = DisqueBroker::connect(&config, settings.clone())
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let msgs = chunk
            .iter()
            .map(|_| Message::new(vec![b'x'; 100]))
            .collect();
        producer
            .enqueue_many(msgs)
            .await
            .map_err(|e| e.to_string())?;
    }
    let push = n as f64 / t.elapsed().as_secs_f64();
    let done = Arc::new(AtomicUsize::new(0));
    let mut consumers = Vec::new();
    for _ in 0..CONSUMERS {
        consumers.push(
            DisqueBroker::connect(&config, settings.clone())
                .await
                .map_err(|e| e.to_string())?,
        );
    }
    let t = Instant::now();
    let mut tasks = Vec::new();
    for b in consumers {
        let done = done.clone();
        tasks.push(tokio::spawn(async move {
            while done.load(Ordering::SeqCst) < n {
                let batch = b.dequeue().await?;
                let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
                if !acks.is_empty() {
                    b.acknowledge_many(&acks).await?;
                }
                done.fetch_add(batch.len(), Ordering::SeqCst);
            }
            Ok::<_, broker_core::BrokerError>(())
        }));
    }
    for t in tasks {
        t.await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
    }
    let consume = n as f64 / t.elapsed().as_secs_f64();
    producer.delete_queue().await.map_err(|e| e.to_string())?;
    Ok((push, consume))
}
