//! Throughput of the AMQP broker beside a raw `lapin` loop doing the same work, in the same run.
//!
//! `cargo bench -p broker-amqp --bench throughput` (env `BENCH_N`, default 20000;
//! `QCLUSTER_TEST_AMQP_URL`, default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//!
//! Both sides, on a fresh quorum queue each: N packages of 100 bytes published persistent in
//! batches of 100 (publish all, then await all publisher confirms: what `enqueue_many` does),
//! then one consumer takes and acknowledges them all with prefetch = bulk, bulk 1 and 10.
//! Ours: `enqueue_many` and `dequeue` + `acknowledge_many`, through `dyn Broker`.
//! Raw: `basic_publish` + confirms, `basic_consume` + `basic_ack` per delivery; no trait, no
//! lease bookkeeping, no buffer.

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_amqp::{AmqpBroker, AmqpConfig};
use broker_core::{Broker, Message, QueueSettings};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};

const BATCH: usize = 100;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = std::env::var("BENCH_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    let url = std::env::var("QCLUSTER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
    println!(
        "qcluster AMQP broker bench: N = {n}, 100-byte packages, quorum queues, confirms in batches of {BATCH}"
    );
    println!(
        "{:<5} {:>13} {:>13} {:>7} {:>15} {:>15} {:>7}",
        "bulk", "raw enq/s", "ours enq/s", "ratio", "raw deq+ack/s", "ours deq+ack/s", "ratio"
    );
    for bulk in [1usize, 10] {
        let raw = match raw(&url, n, bulk).await {
            Ok(r) => r,
            Err(e) => {
                println!("skipped: {e}");
                return;
            }
        };
        let ours = match ours(&url, n, bulk).await {
            Ok(r) => r,
            Err(e) => {
                println!("ours failed: {e}");
                return;
            }
        };
        println!(
            "{bulk:<5} {:>13.0} {:>13.0} {:>6.0}% {:>15.0} {:>15.0} {:>6.0}%",
            raw.0,
            ours.0,
            100.0 * ours.0 / raw.0,
            raw.1,
            ours.1,
            100.0 * ours.1 / raw.1
        );
    }
}

fn queue() -> String {
    format!(
        "qkit-bench-{}",
        &uuid::Uuid::now_v7().simple().to_string()[20..]
    )
}

async fn ours(url: &str, n: usize, bulk: usize) -> Result<(f64, f64), String> {
    let q = queue();
    let cfg = AmqpConfig::new(url);
    let settings = QueueSettings {
        bulk,
        retry: Duration::from_secs(600),
        wait: Duration::from_millis(500),
        ..QueueSettings::for_queue(&q)
    };
    let b: Arc<dyn Broker> = Arc::new(
        AmqpBroker::connect(&cfg, settings)
            .await
            .map_err(|e| e.to_string())?,
    );
    let t = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(BATCH) {
        let msgs = chunk.iter().map(|_| Message::new(vec![7u8; 100])).collect();
        b.enqueue_many(msgs).await.map_err(|e| e.to_string())?;
    }
    let enq = n as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        let batch = b.dequeue().await.map_err(|e| e.to_string())?;
        if batch.is_empty() {
            return Err(format!("ran dry after {done} of {n}"));
        }
        let acks: Vec<_> = batch.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.map_err(|e| e.to_string())?;
        done += batch.len();
    }
    let deq = n as f64 / t.elapsed().as_secs_f64();
    b.delete_queue().await.map_err(|e| e.to_string())?;
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &q])
        .output();
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["delete_queue", &format!("{q}.dead")])
        .output();
    Ok((enq, deq))
}

async fn raw(url: &str, n: usize, bulk: usize) -> Result<(f64, f64), String> {
    let q = queue();
    let conn = Connection::connect(url, ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let publish = conn.create_channel().await.map_err(|e| e.to_string())?;
    publish
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    publish
        .queue_declare(q.as_str().into(), QueueDeclareOptions::durable(), args)
        .await
        .map_err(|e| e.to_string())?;
    let payload = vec![7u8; 100];
    let t = Instant::now();
    let mut sent = 0;
    while sent < n {
        let k = BATCH.min(n - sent);
        let mut confirms = Vec::with_capacity(k);
        for _ in 0..k {
            confirms.push(
                publish
                    .basic_publish(
                        "".into(),
                        q.as_str().into(),
                        BasicPublishOptions {
                            mandatory: true,
                            immediate: false,
                        },
                        &payload,
                        BasicProperties::default().with_delivery_mode(2),
                    )
                    .await
                    .map_err(|e| e.to_string())?,
            );
        }
        for c in confirms {
            let c = c.await.map_err(|e| e.to_string())?;
            if !c.is_ack() {
                return Err("nack".into());
            }
        }
        sent += k;
    }
    let enq = n as f64 / t.elapsed().as_secs_f64();
    let consume = conn.create_channel().await.map_err(|e| e.to_string())?;
    consume
        .basic_qos(bulk as u16, BasicQosOptions { global: false })
        .await
        .map_err(|e| e.to_string())?;
    let t = Instant::now();
    let mut consumer = consume
        .basic_consume(
            q.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(|e| e.to_string())?;
    let mut done = 0;
    while done < n {
        let d = consumer
            .next()
            .await
            .ok_or("consumer ended")?
            .map_err(|e| e.to_string())?;
        consume
            .basic_ack(d.delivery_tag, BasicAckOptions { multiple: false })
            .await
            .map_err(|e| e.to_string())?;
        done += 1;
    }
    let deq = n as f64 / t.elapsed().as_secs_f64();
    publish
        .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let _ = conn.close(200, "bench done".into()).await;
    Ok((enq, deq))
}
