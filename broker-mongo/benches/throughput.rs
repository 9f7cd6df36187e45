//! Throughput of the MongoDB broker beside a raw `mongodb` client making the same calls, on the
//! same server, in the same run. Not a test: `cargo bench -p broker-mongo --bench throughput`.
//!
//! Env: `BENCH_N` (packages per case, default 1000: SecantusDB, the test server, plans the
//! claim as a collection scan plus sort, so a claim costs time in proportion to the backlog;
//! use 10000 or more on a real mongod), `BENCH_ROUNDS` (default 1; the median is printed),
//! `QCLUSTER_TEST_MONGO_URL` (default `mongodb://127.0.0.1:27018`).
//!
//! Each case: N packages of 100 bytes enqueued (`enqueue_many` in batches of 1000; raw:
//! `insertMany` of the same documents), then one consumer dequeues and acknowledges until the
//! queue is empty, bulk 1 and 10 (ours: `dequeue` + `acknowledge_many`; raw: `findAndModify`,
//! or `find` ids + `updateMany` + `find` by token, then one `deleteMany`, with no trait, no
//! receipts parsed, no codec). Round trips per package are the server's `opcounters`
//! (`serverStatus`) before and after the consume phase, so they include the driver's own
//! heartbeats and anything else the server did meanwhile.

use std::time::{Duration, Instant};

use broker_core::{Broker, Message, QueueSettings};
use broker_mongo::{MongoBroker, MongoConfig};
use futures::TryStreamExt as _;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, DateTime, Document, doc};
use mongodb::options::ReturnDocument;
use mongodb::{Client, Collection};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let n: usize = env("BENCH_N", 1000);
    let rounds: usize = env("BENCH_ROUNDS", 1).max(1);
    let url = std::env::var("QCLUSTER_TEST_MONGO_URL")
        .unwrap_or_else(|_| "mongodb://127.0.0.1:27018".into());
    let database = format!("qbench_{}", &ObjectId::new().to_hex()[12..]);
    let client = match Client::with_uri_str(&url).await {
        Ok(c) => c,
        Err(e) => return println!("skipped: {e}"),
    };
    if let Err(e) = client
        .database("admin")
        .run_command(doc! { "ping": 1 })
        .await
    {
        return println!("skipped: {e}");
    }
    let version = client
        .database("admin")
        .run_command(doc! { "buildInfo": 1 })
        .await
        .ok()
        .and_then(|b| b.get_str("version").ok().map(str::to_owned))
        .unwrap_or_default();
    println!(
        "qcluster MongoDB broker bench: {url} (server says {version}), N = {n}, 100-byte \
         packages, 1 consumer, median of {rounds} round(s)"
    );
    println!(
        "{:<5} {:>10} {:>10} {:>6} {:>14} {:>14} {:>6} {:>9} {:>9}",
        "bulk",
        "raw enq/s",
        "ours enq/s",
        "ratio",
        "raw deq+ack/s",
        "ours deq+ack/s",
        "ratio",
        "raw rt/t",
        "ours rt/t"
    );
    for bulk in [1usize, 10] {
        let mut raws = Vec::new();
        let mut ourss = Vec::new();
        for r in 0..rounds {
            let coll = format!("raw{bulk}_{r}");
            match raw(&client, &database, &coll, n, bulk).await {
                Ok(x) => raws.push(x),
                Err(e) => return println!("raw bulk {bulk}: failed: {e}"),
            }
            match ours(&client, &url, &database, n, bulk, r).await {
                Ok(x) => ourss.push(x),
                Err(e) => return println!("ours bulk {bulk}: failed: {e}"),
            }
        }
        let (re, rd, rrt) = median3(&mut raws);
        let (oe, od, ort) = median3(&mut ourss);
        println!(
            "{bulk:<5} {re:>10.0} {oe:>10.0} {:>5.0}% {rd:>14.0} {od:>14.0} {:>5.0}% {rrt:>9.2} {ort:>9.2}",
            100.0 * oe / re,
            100.0 * od / rd
        );
    }
    if let Err(e) = client.database(&database).drop().await {
        println!("could not drop {database}: {e}");
    }
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn median3(v: &mut [(f64, f64, f64)]) -> (f64, f64, f64) {
    let pick = |k: usize| {
        let mut xs: Vec<f64> = v.iter().map(|t| [t.0, t.1, t.2][k]).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    (pick(0), pick(1), pick(2))
}

/// Operations the server counted so far (`serverStatus.opcounters`, all kinds).
async fn ops(client: &Client) -> f64 {
    let Ok(s) = client
        .database("admin")
        .run_command(doc! { "serverStatus": 1 })
        .await
    else {
        return f64::NAN;
    };
    let Ok(c) = s.get_document("opcounters") else {
        return f64::NAN;
    };
    c.values()
        .filter_map(|v| match v {
            mongodb::bson::Bson::Int32(x) => Some(f64::from(*x)),
            mongodb::bson::Bson::Int64(x) => Some(*x as f64),
            mongodb::bson::Bson::Double(x) => Some(*x),
            _ => None,
        })
        .sum()
}

/// The same documents, filters and updates as the adapter, written by hand.
async fn raw(
    client: &Client,
    database: &str,
    name: &str,
    n: usize,
    bulk: usize,
) -> Result<(f64, f64, f64), String> {
    let e = |e: mongodb::error::Error| e.to_string();
    let q: Collection<Document> = client.database(database).collection(name);
    q.drop().await.map_err(e)?;
    q.create_index(
        mongodb::IndexModel::builder()
            .keys(doc! { "priority": -1, "_id": 1, "due": 1 })
            .build(),
    )
    .await
    .map_err(e)?;
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let now = DateTime::now();
        let docs = (0..k).map(|_| {
            doc! {
                "_id": ObjectId::new(),
                "payload": Binary { subtype: BinarySubtype::Generic, bytes: vec![7u8; 100] },
                "priority": 0i32, "due": now, "deliveries": 0i32, "enqueued": now,
            }
        });
        q.insert_many(docs).await.map_err(e)?;
        left -= k;
    }
    let enq = n as f64 / t0.elapsed().as_secs_f64();
    let lease = |token: ObjectId| {
        let until = DateTime::from_millis(DateTime::now().timestamp_millis() + 300_000);
        doc! {
            "$set": { "lease": token, "lease_until": until, "due": until },
            "$inc": { "deliveries": 1i32 },
        }
    };
    let order = doc! { "priority": -1, "_id": 1 };
    let ops0 = ops(client).await;
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let token = ObjectId::new();
        let ids: Vec<ObjectId> = if bulk == 1 {
            let got = q
                .find_one_and_update(doc! { "due": { "$lte": DateTime::now() } }, lease(token))
                .sort(order.clone())
                .return_document(ReturnDocument::After)
                .await
                .map_err(e)?;
            got.and_then(|d| d.get_object_id("_id").ok())
                .into_iter()
                .collect()
        } else {
            let cand: Vec<Document> = q
                .find(doc! { "due": { "$lte": DateTime::now() } })
                .sort(order.clone())
                .limit(bulk as i64)
                .projection(doc! { "_id": 1 })
                .await
                .map_err(e)?
                .try_collect()
                .await
                .map_err(e)?;
            let ids: Vec<ObjectId> = cand
                .iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect();
            q.update_many(
                doc! { "_id": { "$in": &ids }, "due": { "$lte": DateTime::now() } },
                lease(token),
            )
            .await
            .map_err(e)?;
            let docs: Vec<Document> = q
                .find(doc! { "_id": { "$in": &ids }, "lease": token })
                .await
                .map_err(e)?
                .try_collect()
                .await
                .map_err(e)?;
            docs.iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect()
        };
        if ids.is_empty() {
            return Err(format!("queue empty after {done} of {n}"));
        }
        q.delete_many(doc! { "_id": { "$in": &ids }, "lease": token })
            .await
            .map_err(e)?;
        done += ids.len();
    }
    let deq = n as f64 / t0.elapsed().as_secs_f64();
    let rt = (ops(client).await - ops0) / n as f64;
    q.drop().await.map_err(e)?;
    Ok((enq, deq, rt))
}

async fn ours(
    client: &Client,
    url: &str,
    database: &str,
    n: usize,
    bulk: usize,
    round: usize,
) -> Result<(f64, f64, f64), String> {
    let e = |e: broker_core::BrokerError| e.to_string();
    let cfg = MongoConfig {
        database: database.to_owned(),
        ..MongoConfig::new(url)
    };
    let settings = QueueSettings {
        bulk,
        retry: Duration::from_secs(300),
        wait: Duration::from_millis(100),
        poll: Duration::from_millis(20),
        ..QueueSettings::for_queue(format!("ours{bulk}_{round}"))
    };
    let b = MongoBroker::connect(&cfg, settings).await.map_err(e)?;
    b.delete_queue().await.map_err(e)?;
    let t0 = Instant::now();
    let mut left = n;
    while left > 0 {
        let k = left.min(1000);
        let batch: Vec<Message> = (0..k).map(|_| Message::new(vec![7u8; 100])).collect();
        b.enqueue_many(batch).await.map_err(e)?;
        left -= k;
    }
    let enq = n as f64 / t0.elapsed().as_secs_f64();
    let ops0 = ops(client).await;
    let t0 = Instant::now();
    let mut done = 0;
    while done < n {
        let got = b.dequeue().await.map_err(e)?;
        if got.is_empty() {
            return Err(format!("queue empty after {done} of {n}"));
        }
        let acks: Vec<_> = got.iter().map(|d| d.ack.clone()).collect();
        b.acknowledge_many(&acks).await.map_err(e)?;
        done += got.len();
    }
    let deq = n as f64 / t0.elapsed().as_secs_f64();
    let rt = (ops(client).await - ops0) / n as f64;
    b.delete_queue().await.map_err(e)?;
    Ok((enq, deq, rt))
}
