//! MongoDB broker on the official `mongodb` driver (3.x, tokio).
//!
//! Layout: each queue has a collection of its own (`qcluster_<queue>` by default, see
//! [`MongoConfig::collection`]), one document per package:
//! `{ _id: ObjectId, payload: BinData(0, envelope), priority: int32, due: Date, lease: ObjectId,
//! lease_until: Date, deliveries: int32, enqueued: Date }`. `due` is the moment the document
//! may next be claimed: the end of its delay while it waits, its lease deadline while it is
//! leased. `lease` (the claim token) and `lease_until` exist only while the document is leased.
//! Dead letters live in `<collection>.dead` (`reason`, `deliveries`, `dead_at` added), monitoring
//! values in the database-wide `qcluster.stats` (`{ _id: key, value, expires }`, TTL-indexed).
//!
//! `requeue_dead` puts a dead letter back as a fresh package (a new `_id`, no delivery yet, due
//! now, its priority kept) without a transaction: the dead letter is first marked with the new
//! `_id`, then the package is inserted under it, then the dead letter is deleted, so a crash
//! leaves it in both places (a retry finishes the job, never storing it twice), never in
//! neither. `delete_dead` deletes one. Both find the dead letter by `_id` (one indexed lookup).
//!
//! The promise: at least once. A claim leases a document atomically (a conditional update on
//! `due <= now`, so two consumers never both take it) until `now + retry`; unless acknowledged
//! by then it is claimed again. Receipts are `<_id>:<lease token>` and every settle matches both,
//! so a consumer whose lease ran out (and whose package someone else holds now) changes nothing.
//! `acknowledge` deletes the document; `fail` clears the lease and makes it due at once.
//!
//! A claim of one document is one `findAndModify` (sorted by priority, then `_id`, i.e. age). A
//! bulk claim costs three round trips whatever `bulk` is: `find` the `bulk` best candidate ids
//! (`due <= now`, same order, ids only), one `updateMany` that stamps a fresh token on those of
//! them still claimable (the filter repeats `due <= now`, so a document another consumer took
//! in between is skipped: atomic per document), then `find` by ids and token for the payloads.
//! Times are the server's clock (its offset measured at connect), so consumers on machines with
//! skewed clocks agree on leases. An empty queue is polled every `poll` for up to `wait`; an
//! enqueue or fail through any handle of this process wakes that process's waiting consumers.
//!
//! Start-up creates (idempotently) the claim index `{priority: -1, _id: 1, due: 1}` (equality,
//! sort, range: the claim walks it in delivery order and checks `due` in the index), the TTL
//! index on the stats' `expires`, and `{dead_at: 1, _id: 1}` on the dead letters.
#![warn(missing_docs)]

mod config;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, Stat, async_trait, redact,
};
use futures::TryStreamExt as _;
use mongodb::bson::oid::ObjectId;
use mongodb::bson::spec::BinarySubtype;
use mongodb::bson::{Binary, Bson, DateTime, Document, doc};
use mongodb::error::ErrorKind;
use mongodb::options::{ClientOptions, IndexOptions, ReturnDocument};
use mongodb::{Client, Collection, IndexModel};
use tokio::sync::Notify;

pub use config::MongoConfig;

/// Most packages one claim takes.
pub const MAX_BULK: usize = 1000;
/// MongoDB's document limit (16 MiB) less room for the other fields, the dead-letter reason and
/// the reply wrapper: the largest envelope accepted.
pub const MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024 - 16 * 1024;
/// Longest dead-letter reason kept, in bytes (longer ones are cut at a character boundary).
const MAX_REASON: usize = 4096;
/// Times a bulk claim starts over at once when other consumers took all its candidates.
const CONTENDED_RETRIES: usize = 4;
/// The database-wide collection of monitoring values.
const STATS_COLLECTION: &str = "qcluster.stats";
const NAME: &str = "mongo";

/// The MongoDB broker for one queue. Cheap to clone; clones share the client and its pool.
#[derive(Clone)]
pub struct MongoBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    queue: Collection<Document>,
    dead: Collection<Document>,
    stats: Collection<Document>,
    settings: QueueSettings,
    database: String,
    endpoint: String,
    secrets: Arc<[String]>,
    timeout: Duration,
    max_message_size: usize,
    server: String,
    /// Server clock minus local clock, in milliseconds (measured at connect).
    offset_ms: i64,
    wake: Arc<Notify>,
}

impl fmt::Debug for MongoBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MongoBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("database", &self.inner.database)
            .field("collection", &self.inner.queue.name())
            .field("queue", &self.inner.settings.queue)
            .finish()
    }
}

/// Turns driver errors into [`BrokerError`]s: connection trouble is `Unreachable` (transient),
/// the rest `Backend`; the URL's password is scrubbed from every message.
#[derive(Clone)]
struct Ctx {
    endpoint: String,
    secrets: Arc<[String]>,
}

/// `message` with every form of the URL's secret replaced by `***`.
fn scrub(message: &str, secrets: &[String]) -> String {
    secrets
        .iter()
        .fold(message.to_owned(), |m, s| redact(&m, Some(s)))
}

impl Ctx {
    fn err(&self, op: &'static str) -> impl Fn(mongodb::error::Error) -> BrokerError + '_ {
        move |e| {
            let message = scrub(&format!("{op}: {e}"), &self.secrets);
            match *e.kind {
                ErrorKind::ServerSelection { .. }
                | ErrorKind::Io(_)
                | ErrorKind::ConnectionPoolCleared { .. }
                | ErrorKind::DnsResolve { .. }
                | ErrorKind::Shutdown => BrokerError::Unreachable {
                    broker: NAME,
                    endpoint: self.endpoint.clone(),
                    message,
                },
                _ if e.contains_label("RetryableWriteError")
                    || e.contains_label("NetworkError") =>
                {
                    BrokerError::Unreachable {
                        broker: NAME,
                        endpoint: self.endpoint.clone(),
                        message,
                    }
                }
                _ => BrokerError::Backend {
                    broker: NAME,
                    message,
                },
            }
        }
    }
}

fn parse_ack(ack: &AckId) -> Result<(ObjectId, ObjectId), BrokerError> {
    let bad = || BrokerError::InvalidReceipt {
        broker: NAME,
        receipt: ack.as_str().to_owned(),
    };
    let (id, token) = ack.as_str().split_once(':').ok_or_else(bad)?;
    Ok((
        ObjectId::parse_str(id).map_err(|_| bad())?,
        ObjectId::parse_str(token).map_err(|_| bad())?,
    ))
}

fn millis(d: Duration) -> i64 {
    // Far from i64::MAX, so `now + millis` cannot overflow.
    i64::try_from(d.as_millis())
        .unwrap_or(i64::MAX)
        .min(i64::MAX / 4)
}

fn local_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(millis)
        .unwrap_or(0)
}

/// A document of the queue as a delivery (`None` when it lacks a field qcluster writes).
fn delivery(mut d: Document, token: ObjectId) -> Option<(i32, ObjectId, Delivery)> {
    let id = d.get_object_id("_id").ok()?;
    let priority = d.get_i32("priority").unwrap_or(0);
    let n = d.get_i32("deliveries").unwrap_or(1);
    let payload = match d.remove("payload")? {
        Bson::Binary(b) => b.bytes,
        _ => return None,
    };
    Some((
        priority,
        id,
        Delivery {
            ack: AckId::new(format!("{}:{}", id.to_hex(), token.to_hex())),
            message_id: MessageId(id.to_hex()),
            payload,
            deliveries: Some(n.max(0) as u32),
        },
    ))
}

/// Escapes the regular-expression metacharacters of `s`, so that it matches itself.
/// A duplicate-key error (E11000) of a single-document write.
fn duplicate_key(e: &mongodb::error::Error) -> bool {
    match &*e.kind {
        ErrorKind::Write(mongodb::error::WriteFailure::WriteError(w)) => w.code == 11000,
        ErrorKind::Command(c) => c.code == 11000,
        _ => false,
    }
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 2);
    for c in s.chars() {
        if "\\^$.|?*+()[]{}-#/ ".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl MongoBroker {
    /// Connects (within `connect_timeout`), measures the server's clock and creates the indexes.
    pub async fn connect(
        config: &MongoConfig,
        settings: QueueSettings,
    ) -> Result<MongoBroker, BrokerError> {
        settings.validate(MAX_BULK)?;
        config.validate()?;
        let endpoint = config::endpoint(&config.url);
        let secrets: Arc<[String]> = config::url_secrets(&config.url).into();
        let ctx = Ctx {
            endpoint: endpoint.clone(),
            secrets: secrets.clone(),
        };
        if config.url.starts_with("mongodb+srv://") && cfg!(not(feature = "srv")) {
            return Err(BrokerError::config(
                "mongo.url",
                "mongodb+srv:// URLs need broker-mongo's `srv` feature (DNS lookups)",
            ));
        }
        if !config.url.starts_with("mongodb://") && !config.url.starts_with("mongodb+srv://") {
            return Err(BrokerError::config(
                "mongo.url",
                format!("{endpoint:?} is not a mongodb:// URL"),
            ));
        }
        let timeout = config.connect_timeout;
        let parse = async {
            let mut opts = ClientOptions::parse(&config.url).await.map_err(|e| {
                if config::password_cut_by_query(&config.url) {
                    // The driver read part of the password as a host or an option and quotes it.
                    BrokerError::config(
                        "mongo.url",
                        "does not parse as a MongoDB connection string; a `?` (or another of \
                         `: / ? # [ ] @ %`) in the user name or password must be percent-encoded",
                    )
                } else {
                    BrokerError::config("mongo.url", scrub(&e.to_string(), &secrets))
                }
            })?;
            opts.connect_timeout = Some(timeout);
            opts.server_selection_timeout = Some(timeout);
            Client::with_options(opts).map_err(ctx.err("connect"))
        };
        let client = bounded(parse, timeout, "connect", &endpoint).await?;
        let db = client.database(&config.database);
        // The server's clock and version; this also proves the server answers.
        let sent = local_ms();
        let hello = bounded(
            async {
                db.run_command(doc! { "hello": 1 })
                    .await
                    .map_err(ctx.err("connect"))
            },
            timeout + Duration::from_millis(500),
            "connect",
            &endpoint,
        )
        .await?;
        let got = local_ms();
        let offset_ms = hello
            .get_datetime("localTime")
            .map(|t| t.timestamp_millis() - (sent + got) / 2)
            .unwrap_or(0);
        let server = match db.run_command(doc! { "buildInfo": 1 }).await {
            Ok(b) => format!(
                "MongoDB {}",
                b.get_str("version").unwrap_or("(unknown version)")
            ),
            Err(e) => {
                tracing::debug!(error = %scrub(&e.to_string(), &secrets), "buildInfo refused");
                "MongoDB (buildInfo refused)".to_owned()
            }
        };
        let max_bson = hello
            .get_i32("maxBsonObjectSize")
            .ok()
            .and_then(|n| usize::try_from(n).ok())
            .unwrap_or(16 * 1024 * 1024);
        let own_limit = MAX_MESSAGE_SIZE.min(max_bson.saturating_sub(16 * 1024));
        let max_message_size = match settings.max_message_size {
            Some(m) if m > own_limit => {
                return Err(BrokerError::config(
                    "max_message_size",
                    format!(
                        "{m} bytes does not fit a MongoDB document (at most {own_limit} bytes)"
                    ),
                ));
            }
            Some(m) => m,
            None => own_limit,
        };
        let name = config
            .collection
            .clone()
            .unwrap_or_else(|| config::default_collection(&settings.queue));
        let queue = db.collection::<Document>(&name);
        let dead = db.collection::<Document>(&format!("{name}.dead"));
        let stats = db.collection::<Document>(STATS_COLLECTION);
        let broker = MongoBroker {
            inner: Arc::new(Inner {
                wake: shared_wake(&config.url, &config.database, &name),
                client,
                queue,
                dead,
                stats,
                settings,
                database: config.database.clone(),
                endpoint,
                secrets,
                timeout,
                max_message_size,
                server,
                offset_ms,
            }),
        };
        broker.create_indexes().await?;
        tracing::debug!(
            endpoint = %broker.inner.endpoint,
            collection = %name,
            offset_ms,
            "mongo broker connected"
        );
        Ok(broker)
    }

    /// The queue settings this handle was opened with.
    pub fn settings(&self) -> &QueueSettings {
        &self.inner.settings
    }

    /// The queue's collection name (the dead letters are in `<name>.dead`).
    pub fn collection_name(&self) -> &str {
        self.inner.queue.name()
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            endpoint: self.inner.endpoint.clone(),
            secrets: self.inner.secrets.clone(),
        }
    }

    /// Now on the server's clock.
    fn now(&self) -> DateTime {
        DateTime::from_millis(local_ms() + self.inner.offset_ms)
    }

    fn after(&self, d: Duration) -> DateTime {
        DateTime::from_millis(local_ms() + self.inner.offset_ms + millis(d))
    }

    /// Creates the claim, TTL and dead-letter indexes (a no-op where they exist).
    async fn create_indexes(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let ctx = self.ctx();
        let named = |name: &str| IndexOptions::builder().name(name.to_owned()).build();
        i.queue
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "priority": -1, "_id": 1, "due": 1 })
                    .options(named("claim"))
                    .build(),
            )
            .await
            .map_err(ctx.err("create claim index"))?;
        i.dead
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "dead_at": 1, "_id": 1 })
                    .options(named("dead_order"))
                    .build(),
            )
            .await
            .map_err(ctx.err("create dead-letter index"))?;
        i.stats
            .create_index(
                IndexModel::builder()
                    .keys(doc! { "expires": 1 })
                    .options(
                        IndexOptions::builder()
                            .name("ttl".to_owned())
                            .expire_after(Duration::ZERO)
                            .build(),
                    )
                    .build(),
            )
            .await
            .map_err(ctx.err("create stats TTL index"))?;
        Ok(())
    }

    fn check_size(&self, m: &Message) -> Result<(), BrokerError> {
        if m.payload.len() > self.inner.max_message_size {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size: m.payload.len(),
                limit: self.inner.max_message_size,
            });
        }
        Ok(())
    }

    fn document(&self, id: ObjectId, m: Message, now: DateTime) -> Document {
        let due = match m.delay {
            Some(d) if !d.is_zero() => DateTime::from_millis(now.timestamp_millis() + millis(d)),
            _ => now,
        };
        doc! {
            "_id": id,
            "payload": Binary { subtype: BinarySubtype::Generic, bytes: m.payload },
            "priority": i32::from(m.priority),
            "due": due,
            "deliveries": 0i32,
            "enqueued": now,
        }
    }

    /// Leases up to `bulk` claimable documents; returns them by priority, then age.
    async fn claim(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let ctx = self.ctx();
        let err = ctx.err("dequeue");
        let order = doc! { "priority": -1, "_id": 1 };
        let retry = i.settings.retry;
        if i.settings.bulk == 1 {
            // One round trip: find-and-modify the best claimable document.
            let token = ObjectId::new();
            let until = self.after(retry);
            let got = i
                .queue
                .find_one_and_update(
                    doc! { "due": { "$lte": self.now() } },
                    doc! {
                        "$set": { "lease": token, "lease_until": until, "due": until },
                        "$inc": { "deliveries": 1i32 },
                    },
                )
                .sort(order)
                .return_document(ReturnDocument::After)
                .await
                .map_err(&err)?;
            return Ok(got
                .and_then(|d| self.checked(d, token))
                .map(|(_, _, d)| vec![d])
                .unwrap_or_default());
        }
        for _ in 0..=CONTENDED_RETRIES {
            // 1: the best candidates, ids only.
            let candidates: Vec<Document> = i
                .queue
                .find(doc! { "due": { "$lte": self.now() } })
                .sort(order.clone())
                .limit(i.settings.bulk as i64)
                .projection(doc! { "_id": 1 })
                .await
                .map_err(&err)?
                .try_collect()
                .await
                .map_err(&err)?;
            let ids: Vec<ObjectId> = candidates
                .iter()
                .filter_map(|d| d.get_object_id("_id").ok())
                .collect();
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            // 2: lease those still claimable with a fresh token (atomic per document).
            let token = ObjectId::new();
            let until = self.after(retry);
            let stamped = i
                .queue
                .update_many(
                    doc! { "_id": { "$in": &ids }, "due": { "$lte": self.now() } },
                    doc! {
                        "$set": { "lease": token, "lease_until": until, "due": until },
                        "$inc": { "deliveries": 1i32 },
                    },
                )
                .await
                .map_err(&err)?;
            if stamped.modified_count == 0 {
                // Another consumer took every candidate between our two calls: look again.
                continue;
            }
            // 3: what this token holds.
            let docs: Vec<Document> = i
                .queue
                .find(doc! { "_id": { "$in": &ids }, "lease": token })
                .await
                .map_err(&err)?
                .try_collect()
                .await
                .map_err(&err)?;
            let mut got: Vec<(i32, ObjectId, Delivery)> = docs
                .into_iter()
                .filter_map(|d| self.checked(d, token))
                .collect();
            got.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
            return Ok(got.into_iter().map(|(_, _, d)| d).collect());
        }
        tracing::debug!(queue = %i.settings.queue, "bulk claim lost every candidate to other consumers; polling");
        Ok(Vec::new())
    }

    /// A claimed document as a delivery; one qcluster did not write is moved to the dead
    /// letters (in the background) instead of failing the whole claim.
    fn checked(&self, d: Document, token: ObjectId) -> Option<(i32, ObjectId, Delivery)> {
        let id = d.get_object_id("_id").ok();
        match delivery(d, token) {
            Some(x) => Some(x),
            None => {
                tracing::warn!(queue = %self.inner.settings.queue, ?id, "document without a binary payload in the queue collection: set aside as a dead letter");
                if let Some(id) = id {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let ack = AckId::new(format!("{}:{}", id.to_hex(), token.to_hex()));
                        if let Err(e) = me
                            .dead_letter(&ack, "malformed document (no binary payload)")
                            .await
                        {
                            tracing::warn!(error = %e, "could not set a malformed document aside");
                        }
                    });
                }
                None
            }
        }
    }

    /// Documents nobody holds: never leased, given back, or whose lease ran out (`due` is the
    /// lease deadline while leased, so a lapsed lease is claimable again and waits like the rest).
    fn waiting(&self) -> Document {
        doc! { "$or": [ { "lease": { "$exists": false } }, { "due": { "$lte": self.now() } } ] }
    }

    async fn count(&self, filter: Document, op: &'static str) -> Result<u64, BrokerError> {
        let ctx = self.ctx();
        self.inner
            .queue
            .count_documents(filter)
            .await
            .map_err(ctx.err(op))
    }
}

/// Runs `f` within `after`, or returns a `Timeout` naming `operation`.
async fn bounded<T>(
    f: impl Future<Output = Result<T, BrokerError>>,
    after: Duration,
    operation: &'static str,
    endpoint: &str,
) -> Result<T, BrokerError> {
    match tokio::time::timeout(after, f).await {
        Ok(r) => r,
        Err(_) => Err(BrokerError::Timeout {
            broker: NAME,
            operation,
            endpoint: endpoint.to_owned(),
            after,
        }),
    }
}

#[async_trait]
impl Broker for MongoBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        self.check_size(&message)?;
        let ctx = self.ctx();
        let id = ObjectId::new();
        let d = self.document(id, message, self.now());
        self.inner
            .queue
            .insert_one(d)
            .await
            .map_err(ctx.err("enqueue"))?;
        self.inner.wake.notify_waiters();
        Ok(MessageId(id.to_hex()))
    }

    /// One ordered `insertMany` (the driver splits it at the server's batch limits). Sizes are
    /// checked first, so an oversized package stores nothing; a server error part-way may leave
    /// the packages before the failing one stored.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        for m in &messages {
            self.check_size(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let ctx = self.ctx();
        let now = self.now();
        let mut ids = Vec::with_capacity(messages.len());
        let docs: Vec<Document> = messages
            .into_iter()
            .map(|m| {
                let id = ObjectId::new();
                ids.push(MessageId(id.to_hex()));
                self.document(id, m, now)
            })
            .collect();
        self.inner
            .queue
            .insert_many(docs)
            .await
            .map_err(ctx.err("enqueue_many"))?;
        self.inner.wake.notify_waiters();
        Ok(ids)
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let s = &self.inner.settings;
        let deadline = Instant::now() + s.wait;
        loop {
            // Registered before looking, so an enqueue between the look and the nap wakes us.
            let woken = self.inner.wake.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            let got = self.claim().await?;
            let now = Instant::now();
            if !got.is_empty() || now >= deadline {
                return Ok(got);
            }
            let nap = s.poll.min(deadline - now);
            let _ = tokio::time::timeout(nap, woken).await;
        }
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        let (id, token) = parse_ack(ack)?;
        let ctx = self.ctx();
        self.inner
            .queue
            .delete_one(doc! { "_id": id, "lease": token })
            .await
            .map_err(ctx.err("acknowledge"))?;
        Ok(())
    }

    /// One `deleteMany` per 1000 receipts, matching each id with its own token (receipts of one
    /// claim share a token, so the filter has one clause per claim).
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let parsed = acks.iter().map(parse_ack).collect::<Result<Vec<_>, _>>()?;
        let ctx = self.ctx();
        for chunk in parsed.chunks(MAX_BULK) {
            let mut by_token: HashMap<ObjectId, Vec<ObjectId>> = HashMap::new();
            for (id, token) in chunk {
                by_token.entry(*token).or_default().push(*id);
            }
            let clauses: Vec<Document> = by_token
                .into_iter()
                .map(|(token, ids)| doc! { "_id": { "$in": ids }, "lease": token })
                .collect();
            let filter = if clauses.len() == 1 {
                clauses.into_iter().next().unwrap_or_default()
            } else {
                doc! { "$or": clauses }
            };
            self.inner
                .queue
                .delete_many(filter)
                .await
                .map_err(ctx.err("acknowledge"))?;
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.fail_after(ack, Duration::ZERO).await
    }

    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let (id, token) = parse_ack(ack)?;
        let ctx = self.ctx();
        self.inner
            .queue
            .update_one(
                doc! { "_id": id, "lease": token },
                doc! {
                    "$set": { "due": self.after(delay) },
                    "$unset": { "lease": "", "lease_until": "" },
                },
            )
            .await
            .map_err(ctx.err("fail"))?;
        if delay.is_zero() {
            self.inner.wake.notify_waiters();
        }
        Ok(())
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let (id, _) = parse_ack(ack)?;
        let ctx = self.ctx();
        self.inner
            .queue
            .delete_one(doc! { "_id": id })
            .await
            .map_err(ctx.err("delete"))?;
        Ok(())
    }

    /// Moves the deadline to `now + by` if this receipt's token still holds the lease.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let (id, token) = parse_ack(ack)?;
        let ctx = self.ctx();
        let until = self.after(by.min(broker_core::MAX_RETRY));
        let r = self
            .inner
            .queue
            .update_one(
                doc! { "_id": id, "lease": token },
                doc! { "$set": { "due": until, "lease_until": until } },
            )
            .await
            .map_err(ctx.err("extend"))?;
        Ok(r.matched_count == 1)
    }

    /// First re-leases the document to a token of this call alone (for a full `retry`), so that
    /// no other settle of the same receipt, and no consumer whose lease ran out, can interleave;
    /// then copies it to `<collection>.dead` (an upsert by `_id`, tagged with that token) and
    /// deletes it under that token. If the delete misses (the call outlived its lease and someone
    /// else holds the package now), only the copy this call made is removed again.
    /// Without transactions (standalone servers have none) a crash between the steps leaves the
    /// package in both places, or leased until `retry`, never in neither.
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let (id, token) = parse_ack(ack)?;
        let i = &self.inner;
        let ctx = self.ctx();
        let err = ctx.err("dead_letter");
        let burial = ObjectId::new();
        let until = self.after(i.settings.retry);
        let held = i
            .queue
            .find_one_and_update(
                doc! { "_id": id, "lease": token },
                doc! { "$set": { "lease": burial, "lease_until": until, "due": until } },
            )
            .return_document(ReturnDocument::After)
            .await
            .map_err(&err)?;
        let Some(mut d) = held else {
            tracing::debug!(queue = %i.settings.queue, message_id = %id, "dead_letter with a stale receipt ignored");
            return Ok(());
        };
        let mut cut = reason.len().min(MAX_REASON);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        for f in ["lease", "lease_until", "due"] {
            d.remove(f);
        }
        d.insert("reason", &reason[..cut]);
        d.insert("dead_at", self.now());
        d.insert("burial", burial);
        if let Err(e) = i.dead.replace_one(doc! { "_id": id }, d).upsert(true).await {
            // Give the lease back to the caller's receipt, so that a retry of this call works
            // (if this fails too, the package comes back after `retry`).
            let _ = i
                .queue
                .update_one(
                    doc! { "_id": id, "lease": burial },
                    doc! { "$set": { "lease": token } },
                )
                .await;
            return Err(err(e));
        }
        let gone = i
            .queue
            .delete_one(doc! { "_id": id, "lease": burial })
            .await
            .map_err(&err)?;
        if gone.deleted_count == 0 {
            // This call outlived its lease and someone else holds the package: not ours to bury.
            i.dead
                .delete_one(doc! { "_id": id, "burial": burial })
                .await
                .map_err(&err)?;
            return Ok(());
        }
        tracing::warn!(queue = %i.settings.queue, message_id = %id, reason = &reason[..cut], "package moved to dead letters");
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let ctx = self.ctx();
        let err = ctx.err("dead_letters");
        let docs: Vec<Document> = self
            .inner
            .dead
            .find(doc! {})
            .sort(doc! { "dead_at": 1, "_id": 1 })
            .limit(i64::try_from(limit).unwrap_or(i64::MAX))
            .await
            .map_err(&err)?
            .try_collect()
            .await
            .map_err(&err)?;
        Ok(docs
            .into_iter()
            .filter_map(|mut d| {
                let id = d.get_object_id("_id").ok()?;
                let payload = match d.remove("payload") {
                    Some(Bson::Binary(b)) => b.bytes,
                    _ => Vec::new(),
                };
                Some(DeadLetter {
                    message_id: MessageId(id.to_hex()),
                    payload,
                    reason: d.get_str("reason").unwrap_or_default().to_owned(),
                    deliveries: d.get_i32("deliveries").ok().map(|n| n.max(0) as u32),
                    dead_at_us: d
                        .get_datetime("dead_at")
                        .map(|t| t.timestamp_millis().saturating_mul(1000))
                        .unwrap_or(0),
                })
            })
            .collect())
    }

    /// Without transactions, in three idempotent steps: (1) mark the dead letter with the `_id`
    /// its requeued copy will get (`requeue`, set once; a retry after a crash reuses it), (2)
    /// insert the fresh package (no delivery yet, due now, priority kept) under that `_id` (a
    /// duplicate key means an earlier attempt stored it already), (3) delete the dead letter.
    /// A crash in between leaves the package in both places, never in neither, and never twice
    /// in the queue; of two concurrent requeues of one id, one answers `true`.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Ok(id) = ObjectId::parse_str(&id.0) else {
            return Ok(false);
        };
        let i = &self.inner;
        let ctx = self.ctx();
        let err = ctx.err("requeue_dead");
        i.dead
            .update_one(
                doc! { "_id": id, "requeue": { "$exists": false } },
                doc! { "$set": { "requeue": ObjectId::new() } },
            )
            .await
            .map_err(&err)?;
        let Some(mut d) = i.dead.find_one(doc! { "_id": id }).await.map_err(&err)? else {
            return Ok(false);
        };
        let Ok(fresh) = d.get_object_id("requeue") else {
            return Err(BrokerError::Backend {
                broker: NAME,
                message: format!("requeue_dead: dead letter {id} lost its requeue mark"),
            });
        };
        let payload = match d.remove("payload") {
            Some(Bson::Binary(b)) => b.bytes,
            _ => Vec::new(),
        };
        let priority = d
            .get_i32("priority")
            .ok()
            .and_then(|p| i16::try_from(p).ok())
            .unwrap_or(0);
        let fresh_doc = self.document(
            fresh,
            Message::new(payload).with_priority(priority),
            self.now(),
        );
        match i.queue.insert_one(fresh_doc).await {
            Ok(_) => {}
            Err(e) if duplicate_key(&e) => {
                tracing::debug!(queue = %i.settings.queue, message_id = %id, "requeue_dead: stored by an earlier attempt");
            }
            Err(e) => return Err(err(e)),
        }
        i.wake.notify_waiters();
        let gone = i.dead.delete_one(doc! { "_id": id }).await.map_err(&err)?;
        if gone.deleted_count == 1 {
            tracing::info!(queue = %i.settings.queue, message_id = %id, new_id = %fresh, "dead letter requeued");
        }
        Ok(gone.deleted_count == 1)
    }

    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Ok(id) = ObjectId::parse_str(&id.0) else {
            return Ok(false);
        };
        let ctx = self.ctx();
        let gone = self
            .inner
            .dead
            .delete_one(doc! { "_id": id })
            .await
            .map_err(ctx.err("delete_dead"))?;
        Ok(gone.deleted_count == 1)
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let ctx = self.ctx();
        let n = self
            .inner
            .dead
            .count_documents(doc! {})
            .await
            .map_err(ctx.err("dead_letter_size"))?;
        Ok(Some(n))
    }

    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let ctx = self.ctx();
        let r = self
            .inner
            .queue
            .delete_many(self.waiting())
            .await
            .map_err(ctx.err("purge_queue"))?;
        Ok(r.deleted_count)
    }

    /// Drops the queue and dead-letter collections, then recreates their (empty) indexes so
    /// that this handle stays usable.
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let ctx = self.ctx();
        let err = ctx.err("delete_queue");
        self.inner.queue.drop().await.map_err(&err)?;
        self.inner.dead.drop().await.map_err(&err)?;
        self.create_indexes().await
    }

    async fn queue_size(&self) -> Result<u64, BrokerError> {
        self.count(self.waiting(), "queue_size").await
    }

    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let held = doc! { "lease": { "$exists": true }, "due": { "$gt": self.now() } };
        self.count(held, "lock_size").await.map(Some)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let ctx = self.ctx();
        let db = i.client.database(&i.database);
        bounded(
            async {
                db.run_command(doc! { "ping": 1 })
                    .await
                    .map(drop)
                    .map_err(ctx.err("ping"))
            },
            i.timeout + Duration::from_millis(500),
            "ping",
            &i.endpoint,
        )
        .await
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let mut details = BTreeMap::new();
        details.insert("database".into(), i.database.clone());
        details.insert("collection".into(), i.queue.name().to_owned());
        details.insert("dead_letter_collection".into(), i.dead.name().to_owned());
        details.insert("stats_collection".into(), STATS_COLLECTION.to_owned());
        details.insert("bulk".into(), i.settings.bulk.to_string());
        details.insert("poll_ms".into(), i.settings.poll.as_millis().to_string());
        details.insert("max_message_size".into(), i.max_message_size.to_string());
        details.insert("clock_offset_ms".into(), i.offset_ms.to_string());
        let round_trips = if i.settings.bulk == 1 {
            "1 round trip (findAndModify)"
        } else {
            "3 round trips whatever bulk (find ids, updateMany with a fresh token, find by token)"
        };
        details.insert("round_trips_per_claim".into(), round_trips.into());
        details.insert(
            "wake_up".into(),
            "poll (and in-process wake-up on enqueue/fail)".into(),
        );
        Ok(BrokerInfo {
            broker: NAME.into(),
            server: Some(i.server.clone()),
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.settings.retry.as_secs_f64()),
            notes: vec![
                "at least once: a package not acknowledged within `retry` is delivered again".into(),
                "claims are atomic per document (conditional update on the due time): a package is leased to one consumer at a time".into(),
                "receipts carry the lease token: a late settle after the lease ran out changes nothing".into(),
                "acknowledge deletes the document; fail clears the lease and makes it due again".into(),
                format!("a claim costs {round_trips}"),
            ],
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            receipts: true,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: self.inner.max_message_size,
            text_only: false,
            dead_letter: true,
            priority: true,
            delay: true,
            stats: true,
            extend: true,
        }
    }

    /// An upsert by key with an `expires` date; the TTL index removes it about a minute after
    /// that, and reads ignore it from then on.
    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let ctx = self.ctx();
        self.inner
            .stats
            .update_one(
                doc! { "_id": key },
                doc! { "$set": {
                    "value": Binary { subtype: BinarySubtype::Generic, bytes: value.to_vec() },
                    "expires": self.after(ttl),
                } },
            )
            .upsert(true)
            .await
            .map_err(ctx.err("set_stat"))?;
        Ok(())
    }

    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let ctx = self.ctx();
        let err = ctx.err("get_stats");
        // An anchored, escaped prefix: `_id`'s index serves it as a range.
        let filter = doc! {
            "_id": { "$regex": format!("^{}", regex_escape(prefix)) },
            "expires": { "$gt": self.now() },
        };
        let docs: Vec<Document> = self
            .inner
            .stats
            .find(filter)
            .await
            .map_err(&err)?
            .try_collect()
            .await
            .map_err(&err)?;
        Ok(docs
            .into_iter()
            .filter_map(|mut d| {
                let key = d.get_str("_id").ok()?.to_owned();
                let value = match d.remove("value") {
                    Some(Bson::Binary(b)) => b.bytes,
                    _ => return None,
                };
                key.starts_with(prefix).then_some(Stat { key, value })
            })
            .collect())
    }
}

/// One wake-up per queue collection in this process: an enqueue or fail through any handle
/// wakes every consumer of that collection waiting in this process.
fn shared_wake(url: &str, database: &str, collection: &str) -> Arc<Notify> {
    use std::sync::{Mutex, OnceLock, Weak};
    type Wakes = Mutex<HashMap<(String, String, String), Weak<Notify>>>;
    static WAKES: OnceLock<Wakes> = OnceLock::new();
    let mut map = WAKES
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    map.retain(|_, w| w.strong_count() > 0);
    let key = (url.to_owned(), database.to_owned(), collection.to_owned());
    if let Some(w) = map.get(&key).and_then(Weak::upgrade) {
        return w;
    }
    let w = Arc::new(Notify::new());
    map.insert(key, Arc::downgrade(&w));
    w
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip() {
        let (id, tok) = (ObjectId::new(), ObjectId::new());
        let ack = AckId::new(format!("{}:{}", id.to_hex(), tok.to_hex()));
        assert_eq!(parse_ack(&ack).ok(), Some((id, tok)));
        for bad in ["", "x:y", "abc", &id.to_hex()] {
            assert!(matches!(
                parse_ack(&AckId::new(bad)),
                Err(BrokerError::InvalidReceipt { .. })
            ));
        }
    }

    #[test]
    fn regex_prefix_is_literal() {
        assert_eq!(regex_escape("a.b%_:c*"), "a\\.b%_:c\\*");
        assert_eq!(regex_escape("(x)[y]\\"), "\\(x\\)\\[y\\]\\\\");
        assert_eq!(regex_escape("é"), "é");
    }
}
