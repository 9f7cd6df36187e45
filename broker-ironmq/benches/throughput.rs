//! Throughput of the IronMQ broker beside raw `reqwest` calls making the same requests, in the
//! same run, against the server at `QCLUSTER_TEST_IRONMQ_URL` (default the test server at
//! `http://127.0.0.1:8787`, token `QCLUSTER_TEST_IRONMQ_TOKEN`).
//!
//! `cargo bench -p broker-ironmq --bench throughput` (env `BENCH_N`, default 1000).
//!
//! Ours: N packages of 100 bytes with `enqueue_many` (posts of 100), then one consumer
//! dequeues (bulk 1, then 100) and settles each batch with `acknowledge_many`. Raw: the same
//! number of 136-character bodies (the base64 of 100 bytes) posted 100 at a time, then
//! reserves (same `n`, `timeout`, `wait`) and deletes (one by one at bulk 1, batched at 100)
//! with no trait, no base64 and no receipts of ours. The test server's absolute speed means
//! little (a Python process on a shared machine): read the ratio and the calls per task.

use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_ironmq::{IronMqBroker, IronMqConfig};
use serde_json::{Value, json};

fn n() -> usize {
    std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn url() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_URL").unwrap_or_else(|_| "http://127.0.0.1:8787".into())
}

fn token() -> String {
    std::env::var("QCLUSTER_TEST_IRONMQ_TOKEN").unwrap_or_else(|_| "qcluster-test-token".into())
}

const PROJECT: &str = "bench";

struct Run {
    enqueue: f64,
    dequeue: f64,
    calls_per_task: f64,
}

async fn ours(queue: &str, n: usize, bulk: usize) -> Result<Run, String> {
    let cfg = IronMqConfig::for_url(&url(), PROJECT, &token());
    let s = QueueSettings {
        bulk,
        retry: Duration::from_secs(120),
        wait: Duration::from_secs(1),
        ..QueueSettings::for_queue(queue)
    };
    let b = IronMqBroker::connect(&cfg, s)
        .await
        .map_err(|e| e.to_string())?;
    b.delete_queue().await.map_err(|e| e.to_string())?;
    let msgs = (0..n)
        .map(|i| Message::new(vec![(i % 251) as u8; 100]))
        .collect();
    let calls0 = b.requests();
    let t = Instant::now();
    b.enqueue_many(msgs).await.map_err(|e| e.to_string())?;
    let enqueue = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = b.dequeue().await.map_err(|e| e.to_string())?;
        let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.map_err(|e| e.to_string())?;
        done += batch.len();
    }
    let dequeue = n as f64 / t.elapsed().as_secs_f64();
    let calls = b.requests() - calls0;
    b.delete_queue().await.map_err(|e| e.to_string())?;
    Ok(Run {
        enqueue,
        dequeue,
        calls_per_task: calls as f64 / n as f64,
    })
}

struct Raw {
    http: reqwest::Client,
    base: String,
    auth: String,
    calls: u64,
}

impl Raw {
    async fn call(
        &mut self,
        method: reqwest::Method,
        path: &str,
        body: Value,
    ) -> Result<Value, String> {
        self.calls += 1;
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("Authorization", &self.auth)
            .header("Content-Type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status();
        let bytes = r.bytes().await.map_err(|e| e.to_string())?;
        let v: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if !status.is_success() && status != reqwest::StatusCode::NOT_FOUND {
            return Err(format!("HTTP {status}: {v}"));
        }
        Ok(v)
    }
}

async fn raw(queue: &str, n: usize, bulk: usize) -> Result<Run, String> {
    // reqwest is built without a default TLS provider here (ring, as the adapter uses).
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut r = Raw {
        http: reqwest::Client::builder()
            .build()
            .map_err(|e| e.to_string())?,
        base: format!("{}/3/projects/{PROJECT}/queues/{queue}", url()),
        auth: format!("OAuth {}", token()),
        calls: 0,
    };
    r.call(reqwest::Method::DELETE, "", json!({})).await?;
    let body = "A".repeat(136);
    r.calls = 0;
    let t = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(100);
        let msgs: Vec<Value> = (0..k).map(|_| json!({ "body": body })).collect();
        r.call(
            reqwest::Method::POST,
            "/messages",
            json!({ "messages": msgs }),
        )
        .await?;
        left -= k;
    }
    let enqueue = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let got = r
            .call(
                reqwest::Method::POST,
                "/reservations",
                json!({ "n": bulk, "timeout": 120, "wait": 1, "delete": false }),
            )
            .await?;
        let msgs = got["messages"].as_array().cloned().unwrap_or_default();
        if msgs.len() == 1 {
            let m = &msgs[0];
            let id = m["id"].as_str().unwrap_or_default().to_owned();
            r.call(
                reqwest::Method::DELETE,
                &format!("/messages/{id}"),
                json!({ "reservation_id": m["reservation_id"] }),
            )
            .await?;
        } else if !msgs.is_empty() {
            let ids: Vec<Value> = msgs
                .iter()
                .map(|m| json!({ "id": m["id"], "reservation_id": m["reservation_id"] }))
                .collect();
            r.call(reqwest::Method::DELETE, "/messages", json!({ "ids": ids }))
                .await?;
        }
        done += msgs.len();
    }
    let dequeue = n as f64 / t.elapsed().as_secs_f64();
    let calls = r.calls;
    r.call(reqwest::Method::DELETE, "", json!({})).await?;
    Ok(Run {
        enqueue,
        dequeue,
        calls_per_task: calls as f64 / n as f64,
    })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = n();
    let probe = IronMqBroker::connect(
        &IronMqConfig::for_url(&url(), PROJECT, &token()),
        QueueSettings {
            retry: Duration::from_secs(120),
            ..QueueSettings::for_queue("bench-probe")
        },
    )
    .await;
    match probe {
        Ok(b) => {
            let _ = b.delete_queue().await;
        }
        Err(e) => {
            eprintln!("skipped: IronMQ server unreachable at {} ({e})", url());
            return;
        }
    }
    println!("IronMQ at {}, {n} packages of 100 bytes", url());
    for bulk in [1usize, 100] {
        let o = ours("bench-ours", n, bulk).await;
        let r = raw("bench-raw", n, bulk).await;
        match (o, r) {
            (Ok(o), Ok(r)) => {
                println!(
                    "bulk {bulk:>3}: enqueue ours {:>8.0}/s raw {:>8.0}/s ({:>5.1}%) | dequeue+ack \
                     ours {:>7.0}/s raw {:>7.0}/s ({:>5.1}%) | calls/task ours {:.3} raw {:.3}",
                    o.enqueue,
                    r.enqueue,
                    100.0 * o.enqueue / r.enqueue,
                    o.dequeue,
                    r.dequeue,
                    100.0 * o.dequeue / r.dequeue,
                    o.calls_per_task,
                    r.calls_per_task
                );
            }
            (o, r) => eprintln!("bulk {bulk}: ours {:?} raw {:?}", o.err(), r.err()),
        }
    }
}
