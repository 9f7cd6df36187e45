//! Throughput of the SQS broker beside a raw `aws-sdk-sqs` loop making the same calls, in the
//! same run, against the endpoint at `QCLUSTER_TEST_SQS_ENDPOINT` (default the moto emulator at
//! `http://127.0.0.1:9324`).
//!
//! `cargo bench -p broker-sqs --bench throughput` (env `BENCH_N`, default 500; `BENCH_ROUNDS`,
//! default 1). The default is small because moto scans a queue's whole message list on every
//! receive and delete: it answers about 80 small requests a second and slows down as the queue
//! grows, so 10000 packages at bulk 1 take the better part of an hour. Against real SQS, set
//! `BENCH_N=10000` and point `QCLUSTER_TEST_SQS_ENDPOINT` (and credentials) at it.
//!
//! Ours: N packages of 100 bytes with `enqueue_many`, then one consumer dequeues (bulk 1 and
//! 10) and acknowledges each batch with `acknowledge_many`. Raw: the same number of 136-byte
//! bodies (the base64 length of 100 bytes) sent with SendMessageBatch of 10, then
//! ReceiveMessage (same MaxNumberOfMessages, visibility and wait) and DeleteMessageBatch, with no
//! trait, no codec and no receipts of ours. Both print their rates, ours as a share of raw
//! (goal: 80% or more) and the SQS calls per task.

use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_sqs::{SqsBroker, SqsConfig};

fn env(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn endpoint() -> String {
    std::env::var("QCLUSTER_TEST_SQS_ENDPOINT").unwrap_or_else(|_| "http://127.0.0.1:9324".into())
}

fn config(queue: &str) -> SqsConfig {
    SqsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        access_key_id: Some("test".into()),
        secret_access_key: Some("test".into()),
        queue: Some(queue.into()),
        ..SqsConfig::default()
    }
}

fn settings(bulk: usize) -> QueueSettings {
    QueueSettings {
        bulk,
        retry: Duration::from_secs(120),
        wait: Duration::from_secs(1),
        ..QueueSettings::for_queue("bench")
    }
}

fn raw_client() -> aws_sdk_sqs::Client {
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
            "test", "test", None, None, "bench",
        ))
        .http_client(http)
        .build();
    aws_sdk_sqs::Client::from_conf(conf)
}

struct Run {
    enqueue: f64,
    dequeue: f64,
    calls_per_task: f64,
}

async fn ours(queue: &str, n: usize, bulk: usize) -> Result<Run, String> {
    let b = SqsBroker::connect(&config(queue), settings(bulk))
        .await
        .map_err(|e| e.to_string())?;
    let msgs: Vec<Message> = (0..n)
        .map(|i| {
            let mut p = format!("{i:08}").into_bytes();
            p.resize(100, b'x');
            Message::new(p)
        })
        .collect();
    let r0 = b.requests();
    let t = Instant::now();
    b.enqueue_many(msgs).await.map_err(|e| e.to_string())?;
    let enqueue = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = b.dequeue().await.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Err(format!("queue empty after {done} of {n}"));
        }
        let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.map_err(|e| e.to_string())?;
        done += batch.len();
    }
    let dequeue = n as f64 / t.elapsed().as_secs_f64();
    let calls = (b.requests() - r0) as f64 / n as f64;
    b.delete_queue().await.map_err(|e| e.to_string())?;
    Ok(Run {
        enqueue,
        dequeue,
        calls_per_task: calls,
    })
}

async fn raw(queue: &str, n: usize, bulk: usize) -> Result<Run, String> {
    use aws_sdk_sqs::types::{DeleteMessageBatchRequestEntry, SendMessageBatchRequestEntry};
    let c = raw_client();
    let url = c
        .create_queue()
        .queue_name(queue)
        .send()
        .await
        .map_err(e)?
        .queue_url()
        .unwrap_or_default()
        .to_owned();
    let body = "x".repeat(136);
    let mut calls = 0usize;
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = (n - sent).min(10);
        let entries = (0..k)
            .map(|j| {
                SendMessageBatchRequestEntry::builder()
                    .id(j.to_string())
                    .message_body(&body)
                    .build()
                    .map_err(|x| x.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        let out = c
            .send_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(e)?;
        calls += 1;
        if !out.failed().is_empty() {
            return Err("raw SendMessageBatch: entries failed".into());
        }
        sent += k;
    }
    let enqueue = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    let max = i32::try_from(bulk).unwrap_or(10);
    while done < n {
        let out = c
            .receive_message()
            .queue_url(&url)
            .max_number_of_messages(max)
            .visibility_timeout(120)
            .wait_time_seconds(1)
            .send()
            .await
            .map_err(e)?;
        calls += 1;
        let msgs = out.messages();
        if msgs.is_empty() {
            return Err(format!("raw: queue empty after {done} of {n}"));
        }
        let entries = msgs
            .iter()
            .enumerate()
            .map(|(j, m)| {
                DeleteMessageBatchRequestEntry::builder()
                    .id(j.to_string())
                    .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                    .build()
                    .map_err(|x| x.to_string())
            })
            .collect::<Result<Vec<_>, _>>()?;
        c.delete_message_batch()
            .queue_url(&url)
            .set_entries(Some(entries))
            .send()
            .await
            .map_err(e)?;
        calls += 1;
        done += msgs.len();
    }
    let dequeue = n as f64 / t.elapsed().as_secs_f64();
    c.delete_queue().queue_url(&url).send().await.map_err(e)?;
    Ok(Run {
        enqueue,
        dequeue,
        calls_per_task: calls as f64 / n as f64,
    })
}

fn e<E: std::error::Error + 'static, R: std::fmt::Debug>(
    x: aws_sdk_sqs::error::SdkError<E, R>,
) -> String {
    aws_sdk_sqs::error::DisplayErrorContext(x).to_string()
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n = env("BENCH_N", 500);
    let rounds = env("BENCH_ROUNDS", 1).max(1);
    let tag = &uuid::Uuid::now_v7().simple().to_string()[18..];
    println!(
        "qcluster SQS broker bench at {}: N = {n}, 100-byte packages, 1 consumer, median of \
         {rounds} round(s) (raw and ours alternate)",
        endpoint()
    );
    println!(
        "{:<5} {:>4} {:>11} {:>14} {:>10} {:>10}",
        "who", "bulk", "enqueue/s", "dequeue+ack/s", "calls/task", "vs raw"
    );
    for bulk in [1usize, 10] {
        let (mut re, mut rd, mut oe, mut od) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let (mut rc, mut oc) = (0.0, 0.0);
        for round in 0..rounds {
            match raw(&format!("qbench-{tag}-raw-{bulk}-{round}"), n, bulk).await {
                Ok(r) => {
                    re.push(r.enqueue);
                    rd.push(r.dequeue);
                    rc = r.calls_per_task;
                }
                Err(e) => {
                    println!("skipped: raw client: {e}");
                    return;
                }
            }
            match ours(&format!("qbench-{tag}-ours-{bulk}-{round}"), n, bulk).await {
                Ok(r) => {
                    oe.push(r.enqueue);
                    od.push(r.dequeue);
                    oc = r.calls_per_task;
                }
                Err(e) => {
                    println!("ours, bulk {bulk}: failed: {e}");
                    return;
                }
            }
        }
        let (re, rd, oe, od) = (
            median(&mut re),
            median(&mut rd),
            median(&mut oe),
            median(&mut od),
        );
        println!(
            "{:<5} {bulk:>4} {re:>11.0} {rd:>14.0} {rc:>10.2} {:>10}",
            "raw", "-"
        );
        println!(
            "{:<5} {bulk:>4} {oe:>11.0} {od:>14.0} {oc:>10.2} {:>4.0}%/{:.0}%",
            "ours",
            100.0 * oe / re,
            100.0 * od / rd
        );
    }
    println!(
        "vs raw: enqueue / dequeue+acknowledge; calls/task counts every SQS request of the run"
    );
}
