//! Quickstart on the embedded default, no server needed: a SQLite file broker.
//!
//! `cargo run --release -p broker-orm --example quickstart`
//!
//! Enqueues 1,000 signed `echo` packages into `qcluster-quickstart.sqlite3`, runs two consumers
//! that verify, "run" and acknowledge them, prints progress, then a summary. Nothing is lost:
//! the run ends only when every package was acknowledged and the queue is empty.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use broker_core::{Broker, Codec, Message, QueueSettings, TaskPackage};
use broker_orm::{OrmBroker, OrmConfig};

const TASKS: usize = 1000;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path =
        std::env::var("QUICKSTART_DB").unwrap_or_else(|_| "qcluster-quickstart.sqlite3".into());
    let config = OrmConfig::new(format!("sqlite://{path}"));
    let settings = QueueSettings {
        bulk: 10,
        retry: Duration::from_secs(60),
        // An idle consumer returns after this long, so the run ends promptly.
        wait: Duration::from_millis(200),
        ..QueueSettings::for_queue("quickstart")
    };
    // A per-run secret: packages signed for this run verify only in this run.
    let secret = uuid::Uuid::now_v7().to_string();
    let codec = Codec::new(secret.as_bytes(), "quickstart")?;
    let broker = OrmBroker::connect(&config, settings).await?;
    broker.purge_queue().await?;

    let t0 = Instant::now();
    let mut batch = Vec::with_capacity(TASKS);
    for i in 0..TASKS {
        let args = format!("[\"hello {i}\"]").into_bytes();
        batch.push(Message::new(codec.encode(&TaskPackage::new("echo", args))?));
    }
    broker.enqueue_many(batch).await?;
    println!(
        "enqueued {TASKS} tasks into {path} in {:.1} ms",
        t0.elapsed().as_secs_f64() * 1e3
    );

    let done = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(std::sync::Mutex::new(String::new()));
    let finished = Arc::new(std::sync::OnceLock::<Instant>::new());
    let t1 = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (broker, codec, done, last) =
            (broker.clone(), codec.clone(), done.clone(), last.clone());
        let finished = finished.clone();
        workers.push(tokio::spawn(async move {
            while done.load(Ordering::Relaxed) < TASKS {
                let batch = broker.dequeue().await?;
                let mut acks = Vec::with_capacity(batch.len());
                for d in batch {
                    let task = codec.decode(&d.payload)?;
                    // "Run" the echo task: its result is its argument.
                    let result = String::from_utf8_lossy(&task.args).into_owned();
                    if let Ok(mut l) = last.lock() {
                        *l = format!("{} {}({result})", task.id, task.func);
                    }
                    acks.push(d.ack);
                }
                broker.acknowledge_many(&acks).await?;
                if done.fetch_add(acks.len(), Ordering::Relaxed) + acks.len() >= TASKS {
                    let _ = finished.set(Instant::now());
                }
            }
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
        }));
    }
    let progress = {
        let done = done.clone();
        tokio::spawn(async move {
            loop {
                let n = done.load(Ordering::Relaxed);
                let filled = n * 40 / TASKS;
                eprint!(
                    "\r[{}{}] {n}/{TASKS}",
                    "#".repeat(filled),
                    ".".repeat(40 - filled)
                );
                if n >= TASKS {
                    eprintln!();
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    for w in workers {
        w.await?.map_err(|e| e.to_string())?;
    }
    progress.await?;
    let end = finished.get().copied().unwrap_or_else(Instant::now);
    let secs = end.duration_since(t1).as_secs_f64();
    let left = broker.queue_size().await? + broker.lock_size().await?.unwrap_or(0);
    println!(
        "processed {} tasks in {secs:.2} s ({:.0} tasks/s), {left} left in the queue",
        done.load(Ordering::Relaxed),
        TASKS as f64 / secs
    );
    if let Ok(l) = last.lock() {
        println!("last result: {l}");
    }
    println!("broker: {}", serde_json::to_string(&broker.info().await?)?);
    Ok(())
}
