//! The Redis broker.
//!
//! **Reliable mode** (default): a dequeue atomically (one Lua script) pops up to `bulk` packages
//! from the ready lists into a list of their own (the batch), under one lease whose deadline is
//! the server clock + `retry`; `acknowledge` answers them for good (one script call, grouped by
//! batch; a whole batch is dropped without per-package work), `fail` puts them back,
//! `dead_letter` parks them with a reason; the unanswered packages of a lease that ran out return
//! to the front of the queue atomically on the next dequeue. A package is never in two places or
//! in none. See `scripts.rs` for the layout.
//!
//! Dead letters (reliable mode): `requeue_dead` is one script that puts the package back at the
//! end of priority band 0 as a fresh package (a new id, first delivery again; dead letters keep
//! no priority) and then drops the dead letter; `delete_dead` drops one. Both are O(1).
//!
//! **Fast mode** (`reliable = false`): Django Q's semantics. A dequeue pops and forgets; a worker
//! or cluster that dies loses what it held. `info` says so.
//!
//! An empty queue blocks server-side (`BLPOP` on a signal list that every enqueue pushes), so
//! latency does not depend on `poll`. One server or a Redis Cluster (a queue's keys share a hash
//! tag, so one slot); `rediss://` with the `tls` feature. Passwords never appear in `info`,
//! errors or `Debug`.
#![warn(missing_docs)]

mod conn;
mod scripts;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, Stat, async_trait, mask_url, redact, url_password,
};
use redis::{AsyncCommands, Script, ScriptInvocation};
use tokio::sync::Mutex;

use conn::{Conn, ConnectError};

/// Most packages one dequeue returns.
pub const MAX_BULK: usize = 1000;
/// Default largest package (Redis itself allows 512 MB values).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// `[redis]` settings. Debug output masks the password; unknown keys are refused when read from
/// a config file.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://[[user]:password@]host:port/db`, or `rediss://...` for TLS (feature `tls`). With
    /// `cluster`, any one node of the cluster.
    pub url: String,
    /// Key prefix; `None` takes `qcluster:<queue>`. Clusters sharing a Redis use their own.
    pub prefix: Option<String>,
    /// Receipts and leases (true), or Django Q's pop-and-forget (false).
    pub reliable: bool,
    /// Longest wait to connect, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// Talk to a Redis Cluster (slots, redirects) instead of one server.
    pub cluster: bool,
    /// PEM file of the CA that signed the server's certificate (`rediss://`); the system's roots
    /// otherwise.
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate, for servers that ask for one (with `key_file`).
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
}

impl RedisConfig {
    /// A reliable-mode configuration for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: None,
            reliable: true,
            connect_timeout: Duration::from_secs(5),
            cluster: false,
            ca_file: None,
            cert_file: None,
            key_file: None,
        }
    }
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self::new("redis://127.0.0.1:6379/0")
    }
}

impl RedisConfig {
    /// The key prefix in use: `prefix`, else `qcluster:<queue>`.
    pub fn prefix_for(&self, queue: &str) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("qcluster:{queue}"))
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &mask_url(&self.url))
            .field("prefix", &self.prefix)
            .field("reliable", &self.reliable)
            .field("cluster", &self.cluster)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

struct Keys {
    /// Base of the band lists: `ready:<priority>`.
    ready: String,
    bands: String,
    delayed: String,
    /// Base of the batch lists: `inflight:<batch>`.
    inflight: String,
    /// Base of the answered-index sets: `acked:<batch>`.
    acked: String,
    leases: String,
    seq: String,
    signal: String,
    dead: String,
    deadinfo: String,
    deaddata: String,
    /// Base of the stat keys, and their index (one hash tag per prefix).
    stat: String,
    stats: String,
}

impl Keys {
    fn new(prefix: &str, queue: &str) -> Self {
        let base = format!("{prefix}:{{{queue}}}");
        let k = |s: &str| format!("{base}:{s}");
        Self {
            ready: k("ready:"),
            bands: k("bands"),
            delayed: k("delayed"),
            inflight: k("inflight:"),
            acked: k("acked:"),
            leases: k("leases"),
            seq: k("seq"),
            signal: k("signal"),
            dead: k("dead"),
            deadinfo: k("deadinfo"),
            deaddata: k("deaddata"),
            stat: format!("{{{prefix}}}:stat:"),
            stats: format!("{{{prefix}}}:stats"),
        }
    }

    /// The keys the dequeue, fail and delete scripts share (in their order), then `extra`.
    fn queue_and<'a>(&'a self, extra: &[&'a String]) -> Vec<&'a String> {
        let mut keys = vec![
            &self.ready,
            &self.bands,
            &self.delayed,
            &self.inflight,
            &self.acked,
            &self.leases,
        ];
        keys.extend_from_slice(extra);
        keys
    }

    /// The keys of `DROP`, which removes everything but `seq`: ids and batches are never
    /// reused, so an old receipt can never match a new package.
    fn drop_keys(&self) -> [&String; 10] {
        [
            &self.inflight,
            &self.acked,
            &self.ready,
            &self.leases,
            &self.bands,
            &self.delayed,
            &self.signal,
            &self.dead,
            &self.deadinfo,
            &self.deaddata,
        ]
    }
}

struct Scripts {
    enqueue: Script,
    dequeue: Script,
    acknowledge: Script,
    fail: Script,
    dead_letter: Script,
    requeue_dead: Script,
    delete_dead: Script,
    delete: Script,
    purge: Script,
    size: Script,
    locked: Script,
    drop: Script,
    set_stat: Script,
    get_stats: Script,
    extend: Script,
}

struct Inner {
    conn: Conn,
    /// Blocking waits get their own connection: a `BLPOP` would stall everything multiplexed.
    waiter: Mutex<Conn>,
    settings: QueueSettings,
    config: RedisConfig,
    keys: Keys,
    scripts: Scripts,
    endpoint: String,
    password: Option<String>,
    max_message_size: usize,
    /// Random per handle: with `batches`, batch ids that no one else uses.
    batch_prefix: u64,
    batches: std::sync::atomic::AtomicU64,
}

/// A queue on Redis. Cheap to clone.
#[derive(Clone)]
pub struct RedisBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("queue", &self.inner.settings.queue)
            .field("reliable", &self.inner.config.reliable)
            .finish_non_exhaustive()
    }
}

fn name(reliable: bool) -> &'static str {
    if reliable { "redis" } else { "redis/fast" }
}

/// A receipt: `batch:index:id`.
struct Receipt {
    /// Lowercase hex, at most 32 digits (see [`RedisBroker::next_batch`]).
    batch: String,
    index: u32,
    id: u64,
}

/// Reads a blob's header `id:deliveries:priority:`: id, deliveries and the payload's offset.
fn split_blob(blob: &[u8]) -> Option<(u64, u32, usize)> {
    let mut fields = [0usize; 3];
    let mut at = 0;
    for f in &mut fields {
        let colon = blob[at..].iter().position(|&c| c == b':')?;
        *f = at + colon;
        at += colon + 1;
    }
    let number = |b: &[u8]| std::str::from_utf8(b).ok()?.parse::<i64>().ok();
    let id = u64::try_from(number(&blob[..fields[0]])?).ok()?;
    let n = u32::try_from(number(&blob[fields[0] + 1..fields[1]])?).ok()?;
    i16::try_from(number(&blob[fields[1] + 1..fields[2]])?).ok()?;
    Some((id, n, at))
}

impl RedisBroker {
    /// Connects within `connect_timeout`; the error names the host with the password masked.
    pub async fn connect(
        config: &RedisConfig,
        settings: QueueSettings,
    ) -> Result<Self, BrokerError> {
        settings.validate(MAX_BULK)?;
        let endpoint = mask_url(&config.url);
        let password = url_password(&config.url);
        let broker = name(config.reliable);
        let prefix = config.prefix_for(&settings.queue);
        if prefix.is_empty() || prefix.contains(['{', '}']) {
            return Err(BrokerError::config(
                "redis.prefix",
                "must be non-empty text without `{` or `}`",
            ));
        }
        if settings.queue.contains(['{', '}']) {
            return Err(BrokerError::config(
                "queue",
                "must not contain `{` or `}` on Redis (they delimit the key hash tag)",
            ));
        }
        let scrub = |m: String| redact(&m, password.as_deref());
        // A cancelled BLPOP keeps the connection blocked until it times out: leave room.
        let wait_response = settings.wait * 2 + Duration::from_secs(5);
        let connecting = async {
            let conn = conn::open(config, config.connect_timeout + Duration::from_secs(25)).await?;
            let waiter = conn::open(config, wait_response).await?;
            Ok::<_, ConnectError>((conn, waiter))
        };
        let (conn, waiter) =
            match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), connecting)
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(ConnectError::Config(key, m))) => {
                    return Err(BrokerError::config(key, scrub(m)));
                }
                Ok(Err(ConnectError::Redis(e))) => {
                    return Err(BrokerError::Unreachable {
                        broker,
                        endpoint,
                        message: scrub(e.to_string()),
                    });
                }
                Err(_) => {
                    return Err(BrokerError::Timeout {
                        broker,
                        operation: "connect",
                        endpoint,
                        after: config.connect_timeout,
                    });
                }
            };
        let max_message_size = settings
            .max_message_size
            .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE);
        let keys = Keys::new(&prefix, &settings.queue);
        let info = server_info(&mut conn.clone())
            .await
            .map_err(|e| BrokerError::Unreachable {
                broker,
                endpoint: endpoint.clone(),
                message: scrub(e.to_string()),
            })?;
        if let Some(v) = server_version(&info)
            && v < (6, 2)
        {
            return Err(BrokerError::config(
                "redis.url",
                format!(
                    "{endpoint} runs Redis {}.{}; the broker needs 6.2 or newer (LPOP with a count)",
                    v.0, v.1
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                waiter: Mutex::new(waiter),
                keys,
                settings,
                config: config.clone(),
                scripts: Scripts {
                    enqueue: Script::new(&scripts::enqueue()),
                    dequeue: Script::new(&scripts::dequeue()),
                    acknowledge: Script::new(&scripts::acknowledge()),
                    fail: Script::new(&scripts::fail()),
                    dead_letter: Script::new(&scripts::dead_letter()),
                    requeue_dead: Script::new(&scripts::requeue_dead()),
                    delete_dead: Script::new(scripts::DELETE_DEAD),
                    delete: Script::new(&scripts::delete()),
                    purge: Script::new(scripts::PURGE),
                    size: Script::new(scripts::SIZE),
                    locked: Script::new(scripts::LOCKED),
                    drop: Script::new(scripts::DROP),
                    set_stat: Script::new(scripts::SET_STAT),
                    get_stats: Script::new(scripts::GET_STATS),
                    extend: Script::new(&scripts::extend()),
                },
                endpoint,
                password,
                max_message_size,
                batch_prefix: random_u64(),
                batches: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    fn err(&self, op: &'static str) -> impl Fn(redis::RedisError) -> BrokerError + '_ {
        move |e| {
            let i = &self.inner;
            let message = redact(&format!("{op}: {e}"), i.password.as_deref());
            let broker = name(i.config.reliable);
            if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                BrokerError::Unreachable {
                    broker,
                    endpoint: i.endpoint.clone(),
                    message,
                }
            } else if e.is_timeout() {
                BrokerError::Timeout {
                    broker,
                    operation: op,
                    endpoint: i.endpoint.clone(),
                    after: i.config.connect_timeout,
                }
            } else {
                BrokerError::Backend { broker, message }
            }
        }
    }

    fn receipt(&self, ack: &AckId) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceipt {
            broker: name(self.inner.config.reliable),
            receipt: ack.as_str().to_owned(),
        };
        let mut parts = ack.as_str().split(':');
        let mut next = || parts.next().ok_or_else(bad);
        let batch = next()?;
        if batch.is_empty()
            || batch.len() > 32
            || !batch
                .bytes()
                .all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'))
        {
            return Err(bad());
        }
        let batch = batch.to_owned();
        let index = next()?.parse::<u32>().map_err(|_| bad())?;
        let id = next()?.parse::<u64>().map_err(|_| bad())?;
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Receipt { batch, index, id })
    }

    /// A call of `script` on `keys`; arguments are added by the caller.
    fn call<'a>(script: &'a Script, keys: &[&String]) -> ScriptInvocation<'a> {
        let mut inv = script.prepare_invoke();
        for k in keys {
            inv.key(k.as_str());
        }
        inv
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        inv: &ScriptInvocation<'_>,
        op: &'static str,
    ) -> Result<T, BrokerError> {
        inv.invoke_async(&mut self.inner.conn.clone())
            .await
            .map_err(self.err(op))
    }

    /// A batch id never used before: this handle's random prefix and a counter, in hex.
    fn next_batch(&self) -> String {
        let n = self
            .inner
            .batches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{:016x}{n:x}", self.inner.batch_prefix)
    }

    /// Runs the dequeue script and, in reliable mode, reads the batch in the same round trip.
    async fn claim(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let script = &i.scripts.dequeue;
        let keys = k.queue_and(&[]);
        let retry_ms = i.settings.retry.as_millis() as u64;
        let (batch, blobs) = if i.config.reliable {
            let batch = self.next_batch();
            let list = format!("{}{batch}", k.inflight);
            let mut pipe = redis::pipe();
            pipe.cmd("EVALSHA").arg(script.get_hash()).arg(keys.len());
            for key in &keys {
                pipe.arg(key.as_str());
            }
            pipe.arg(i.settings.bulk)
                .arg(retry_ms)
                .arg("1")
                .arg(&batch)
                .ignore()
                .lrange(&list, 0, -1);
            let mut c = i.conn.clone();
            let got: Result<(Vec<Vec<u8>>,), _> = pipe.query_async(&mut c).await;
            let blobs = match got {
                Ok((blobs,)) => blobs,
                Err(e)
                    if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) =>
                {
                    // First use on this server (or after SCRIPT FLUSH): load it and go again.
                    script
                        .prepare_invoke()
                        .load_async(&mut c)
                        .await
                        .map_err(self.err("dequeue"))?;
                    let (blobs,): (Vec<Vec<u8>>,) = pipe
                        .query_async(&mut c)
                        .await
                        .map_err(self.err("dequeue"))?;
                    blobs
                }
                Err(e) => return Err(self.err("dequeue")(e)),
            };
            (batch, blobs)
        } else {
            let mut inv = Self::call(script, &keys);
            inv.arg(i.settings.bulk).arg(retry_ms).arg("0");
            let (_, blobs): (u64, Vec<Vec<u8>>) = self.run(&inv, "dequeue").await?;
            ("0".to_owned(), blobs)
        };
        let mut out = Vec::with_capacity(blobs.len());
        for (n, mut blob) in blobs.into_iter().enumerate() {
            let index = n + 1;
            let Some((id, before, at)) = split_blob(&blob) else {
                // Not written by qcluster (edited by hand?): set aside, never delivered or lost.
                let reason = "not a qcluster package (no id:deliveries:priority: header)";
                if i.config.reliable {
                    self.dead_letter(&AckId::new(format!("{batch}:{index}:0")), reason)
                        .await?;
                } else {
                    tracing::error!(queue = %i.settings.queue, "dropped a package: {reason}");
                }
                continue;
            };
            out.push(Delivery {
                ack: AckId::new(format!("{batch}:{index}:{id}")),
                message_id: MessageId(id.to_string()),
                payload: {
                    blob.drain(..at);
                    blob
                },
                deliveries: i.config.reliable.then_some(before + 1),
            });
        }
        Ok(out)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    fn name(&self) -> &'static str {
        name(self.inner.config.reliable)
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let mut ids = self.enqueue_many(vec![message]).await?;
        ids.pop().ok_or_else(|| BrokerError::Backend {
            broker: name(self.inner.config.reliable),
            message: "enqueue returned no id".into(),
        })
    }

    /// Batches of at most 500 packages and 64 MiB are each one atomic script; a failure part way
    /// through a larger call leaves the batches before it stored.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        let i = &self.inner;
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        for m in &messages {
            if m.payload.len() > i.max_message_size {
                return Err(BrokerError::TooLarge {
                    broker: name(i.config.reliable),
                    size: m.payload.len(),
                    limit: i.max_message_size,
                });
            }
        }
        let k = &i.keys;
        let mut ids = Vec::with_capacity(messages.len());
        // Redis drops a client whose query buffer passes its limit (1 GB): stay well below.
        let mut chunks: Vec<&[Message]> = Vec::new();
        let (mut start, mut bytes) = (0, 0usize);
        for (n, m) in messages.iter().enumerate() {
            if n > start && (n - start == 500 || bytes + m.payload.len() > 64 << 20) {
                chunks.push(&messages[start..n]);
                (start, bytes) = (n, 0);
            }
            bytes += m.payload.len();
        }
        chunks.push(&messages[start..]);
        for chunk in chunks {
            let token = enqueue_token(&k.ready);
            let mut inv = Self::call(
                &i.scripts.enqueue,
                &[&k.seq, &k.ready, &k.bands, &k.delayed, &k.signal, &token],
            );
            for m in chunk {
                inv.arg(m.payload.as_slice())
                    .arg(m.priority)
                    .arg(m.delay.map_or(0, |d| d.as_millis() as u64));
            }
            let first: u64 = self.run(&inv, "enqueue").await?;
            ids.extend((first..first + chunk.len() as u64).map(|n| MessageId(n.to_string())));
        }
        Ok(ids)
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let deadline = Instant::now() + i.settings.wait;
        loop {
            let got = self.claim().await?;
            let left = deadline.saturating_duration_since(Instant::now());
            if !got.is_empty() || left.is_zero() {
                return Ok(got);
            }
            // Block server-side until an enqueue signals, at most `poll` (delayed packages
            // and expired leases have no signal).
            let Ok(mut w) = tokio::time::timeout(left, i.waiter.lock()).await else {
                continue; // another dequeue of this handle waited: look again
            };
            let left = deadline.saturating_duration_since(Instant::now());
            let block = left.min(i.settings.poll).max(Duration::from_millis(10));
            let _: Option<(String, String)> = w
                .blpop(&i.keys.signal, block.as_secs_f64())
                .await
                .map_err(self.err("wait"))?;
        }
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.acknowledge_many(std::slice::from_ref(ack)).await
    }

    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let i = &self.inner;
        // Grouped by batch, as index ranges: a whole batch is one token.
        let mut groups: BTreeMap<String, Vec<u32>> = BTreeMap::new();
        for a in acks {
            let r = self.receipt(a)?;
            groups.entry(r.batch).or_default().push(r.index);
        }
        if !i.config.reliable || groups.is_empty() {
            return Ok(());
        }
        let k = &i.keys;
        let keys = [&k.inflight, &k.acked, &k.leases];
        let mut inv = Self::call(&i.scripts.acknowledge, &keys);
        let mut held = 0;
        for (batch, indexes) in &mut groups {
            let tokens = ranges(indexes);
            for part in tokens.chunks(MAX_BULK) {
                if held + part.len() > MAX_BULK {
                    let _: u64 = self.run(&inv, "acknowledge").await?;
                    inv = Self::call(&i.scripts.acknowledge, &keys);
                    held = 0;
                }
                inv.arg(batch.as_str()).arg(part.len()).arg(part);
                held += part.len();
            }
        }
        let _: u64 = self.run(&inv, "acknowledge").await?;
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.fail_after(ack, Duration::ZERO).await
    }

    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let r = self.receipt(ack)?;
        if !i.config.reliable {
            return Ok(());
        }
        let k = &i.keys;
        let mut inv = Self::call(&i.scripts.fail, &k.queue_and(&[&k.signal]));
        inv.arg(&r.batch)
            .arg(r.index)
            .arg(delay.as_millis() as u64)
            .arg(r.id);
        let _: u64 = self.run(&inv, "fail").await?;
        Ok(())
    }

    /// Extends the lease of the receipt's whole batch (one lease per claim): the batch's other
    /// unanswered packages are held by the same consumer, so they keep their place with it.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let i = &self.inner;
        let r = self.receipt(ack)?;
        if !i.config.reliable {
            return Err(BrokerError::Unsupported {
                broker: name(false),
                operation: "extend",
            });
        }
        let k = &i.keys;
        let ms = by.min(broker_core::MAX_RETRY).as_millis().max(1) as u64;
        let mut inv = Self::call(&i.scripts.extend, &[&k.inflight, &k.acked, &k.leases]);
        inv.arg(&r.batch).arg(r.index).arg(ms).arg(r.id);
        let held: u64 = self.run(&inv, "extend").await?;
        Ok(held == 1)
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let i = &self.inner;
        let r = self.receipt(ack)?;
        if !i.config.reliable {
            return Ok(()); // popped and forgotten already
        }
        let k = &i.keys;
        let mut inv = Self::call(&i.scripts.delete, &k.queue_and(&[]));
        inv.arg(&r.batch).arg(r.index).arg(r.id);
        let _: u64 = self.run(&inv, "delete").await?;
        Ok(())
    }

    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let i = &self.inner;
        let r = self.receipt(ack)?;
        if !i.config.reliable {
            return Err(BrokerError::Unsupported {
                broker: name(false),
                operation: "dead_letter",
            });
        }
        let k = &i.keys;
        let mut inv = Self::call(
            &i.scripts.dead_letter,
            &[
                &k.inflight,
                &k.acked,
                &k.leases,
                &k.dead,
                &k.deadinfo,
                &k.deaddata,
                &k.seq,
            ],
        );
        inv.arg(&r.batch).arg(r.index).arg(reason).arg(r.id);
        let _: u64 = self.run(&inv, "dead_letter").await?;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let mut c = i.conn.clone();
        if limit == 0 {
            return Ok(Vec::new());
        }
        let last = isize::try_from(limit).unwrap_or(isize::MAX) - 1;
        let ids: Vec<String> = c
            .zrange(&k.dead, 0, last)
            .await
            .map_err(self.err("dead_letters"))?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let (info, payload): (Option<String>, Option<Vec<u8>>) = redis::pipe()
                .hget(&k.deadinfo, &id)
                .hget(&k.deaddata, &id)
                .query_async(&mut c)
                .await
                .map_err(self.err("dead_letters"))?;
            let info = info.unwrap_or_default();
            // `P<priority>|` first since version 3 of the layout; older entries lack it.
            let info = match info.strip_prefix('P') {
                Some(rest) => rest.split_once('|').map_or("", |(_, r)| r),
                None => info.as_str(),
            };
            let mut parts = info.splitn(3, '|');
            let deliveries = parts.next().and_then(|s| s.parse().ok());
            let at_ms: i64 = parts.next().and_then(|s| s.parse().ok()).unwrap_or(0);
            out.push(DeadLetter {
                message_id: MessageId(id),
                payload: payload.unwrap_or_default(),
                reason: parts.next().unwrap_or_default().to_owned(),
                deliveries,
                dead_at_us: at_ms * 1000,
            });
        }
        Ok(out)
    }

    /// One script: the package goes to the end of its priority's band with a new id, then leaves the dead
    /// letters (reliable mode only, like `dead_letter`).
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let i = &self.inner;
        if !i.config.reliable {
            return Err(BrokerError::Unsupported {
                broker: name(false),
                operation: "requeue_dead",
            });
        }
        let k = &i.keys;
        let mut inv = Self::call(
            &i.scripts.requeue_dead,
            &[
                &k.seq,
                &k.ready,
                &k.bands,
                &k.signal,
                &k.dead,
                &k.deadinfo,
                &k.deaddata,
            ],
        );
        inv.arg(&id.0);
        let n: u64 = self.run(&inv, "requeue_dead").await?;
        if n > 0 {
            tracing::info!(queue = i.settings.queue.as_str(), message_id = %id, "dead letter requeued");
        }
        Ok(n > 0)
    }

    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let i = &self.inner;
        if !i.config.reliable {
            return Err(BrokerError::Unsupported {
                broker: name(false),
                operation: "delete_dead",
            });
        }
        let k = &i.keys;
        let mut inv = Self::call(&i.scripts.delete_dead, &[&k.dead, &k.deadinfo, &k.deaddata]);
        inv.arg(&id.0);
        let n: u64 = self.run(&inv, "delete_dead").await?;
        Ok(n > 0)
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let i = &self.inner;
        if !i.config.reliable {
            return Ok(None);
        }
        let n: u64 = i
            .conn
            .clone()
            .zcard(&i.keys.dead)
            .await
            .map_err(self.err("dead_letter_size"))?;
        Ok(Some(n))
    }

    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let inv = Self::call(&i.scripts.purge, &[&k.ready, &k.bands, &k.delayed]);
        self.run(&inv, "purge_queue").await
    }

    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let inv = Self::call(&i.scripts.drop, &i.keys.drop_keys());
        let _: u64 = self.run(&inv, "delete_queue").await?;
        Ok(())
    }

    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let inv = Self::call(&i.scripts.size, &[&k.ready, &k.bands, &k.delayed]);
        self.run(&inv, "queue_size").await
    }

    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let i = &self.inner;
        if !i.config.reliable {
            return Ok(None);
        }
        let k = &i.keys;
        let inv = Self::call(&i.scripts.locked, &[&k.inflight, &k.acked, &k.leases]);
        Ok(Some(self.run(&inv, "lock_size").await?))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        // On a cluster a keyed command checks the node that holds this queue.
        let _: u64 = self
            .inner
            .conn
            .clone()
            .exists(&self.inner.keys.seq)
            .await
            .map_err(self.err("ping"))?;
        Ok(())
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let text = server_info(&mut i.conn.clone())
            .await
            .map_err(self.err("info"))?;
        let version = version_text(&text).map(|v| format!("Redis {v}"));
        let mut notes = Vec::new();
        let mut details = BTreeMap::new();
        if i.config.reliable {
            notes.push(
                "reliable: a delivered package is leased for `retry`; unless acknowledged it \
                 is delivered again"
                    .to_owned(),
            );
        } else {
            notes.push(
                "fast mode (Django Q's semantics): a dequeued package is gone from Redis; a \
                 worker or cluster that dies loses the packages it held, and fail cannot bring \
                 one back"
                    .to_owned(),
            );
        }
        details.insert("prefix".into(), i.config.prefix_for(&i.settings.queue));
        details.insert("wake_up".into(), "BLPOP on a signal list".into());
        details.insert(
            "topology".into(),
            if i.config.cluster {
                "Redis Cluster (the queue's keys share one slot)"
            } else {
                "single server"
            }
            .into(),
        );
        details.insert(
            "tls".into(),
            if i.config.url.starts_with("rediss://") {
                "yes"
            } else {
                "no"
            }
            .into(),
        );
        Ok(BrokerInfo {
            broker: name(i.config.reliable).to_owned(),
            server: version,
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: i.config.reliable,
            retry_secs: i.config.reliable.then(|| i.settings.retry.as_secs_f64()),
            notes,
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        let reliable = self.inner.config.reliable;
        Capabilities {
            receipts: reliable,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: self.inner.max_message_size,
            text_only: false,
            dead_letter: reliable,
            priority: true,
            delay: true,
            stats: true,
            extend: reliable,
        }
    }

    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let ms = (ttl.as_millis() as u64).max(1);
        let full = format!("{}{key}", i.keys.stat);
        let mut inv = Self::call(&i.scripts.set_stat, &[&full, &i.keys.stats]);
        inv.arg(value).arg(ms).arg(key);
        let _: u64 = self.run(&inv, "set_stat").await?;
        Ok(())
    }

    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let i = &self.inner;
        let mut inv = Self::call(&i.scripts.get_stats, &[&i.keys.stats]);
        inv.arg(&i.keys.stat).arg(prefix);
        let flat: Vec<Vec<u8>> = self.run(&inv, "get_stats").await?;
        let mut out = Vec::with_capacity(flat.len() / 2);
        let mut it = flat.into_iter();
        while let (Some(k), Some(value)) = (it.next(), it.next()) {
            out.push(Stat {
                key: String::from_utf8_lossy(&k).into_owned(),
                value,
            });
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
}

/// 64 random bits from the standard library's hasher seeds (fresh per call, OS-seeded).
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// A key unique to one enqueue call (process, time, counter), next to the queue's keys so that
/// it is in their slot: `<ready base>enq:<token>` never collides with a band list `ready:<n>`.
fn enqueue_token(ready: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{ready}enq:{:x}.{nanos:x}.{n:x}", std::process::id())
}

/// Sorted, deduplicated indexes as tokens `i` or `i-j` (runs of three or more).
fn ranges(indexes: &mut Vec<u32>) -> Vec<String> {
    indexes.sort_unstable();
    indexes.dedup();
    let mut out = Vec::new();
    let mut n = 0;
    while n < indexes.len() {
        let mut m = n;
        while m + 1 < indexes.len() && indexes[m + 1] == indexes[m] + 1 {
            m += 1;
        }
        if m - n >= 2 {
            out.push(format!("{}-{}", indexes[n], indexes[m]));
        } else {
            out.extend(indexes[n..=m].iter().map(u32::to_string));
        }
        n = m + 1;
    }
    out
}

/// `INFO server`; a cluster answers per node, and the first node's answer stands for all.
async fn server_info(c: &mut Conn) -> redis::RedisResult<String> {
    let v: redis::Value = redis::cmd("INFO").arg("server").query_async(c).await?;
    let v = match v {
        redis::Value::Map(nodes) => nodes
            .into_iter()
            .next()
            .map_or(redis::Value::Nil, |(_, v)| v),
        other => other,
    };
    Ok(redis::from_redis_value(v)?)
}

/// `redis_version` from `INFO server`.
fn version_text(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// `(major, minor)` from `INFO server`.
fn server_version(info: &str) -> Option<(u32, u32)> {
    let mut parts = version_text(info)?.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_compress_runs() {
        assert_eq!(
            ranges(&mut vec![3, 1, 2, 2, 7, 9, 10, 11, 12]),
            ["1-3", "7", "9-12"]
        );
        assert_eq!(ranges(&mut vec![5, 6]), ["5", "6"]);
        assert!(ranges(&mut Vec::new()).is_empty());
    }

    #[test]
    fn blob_header() {
        assert_eq!(split_blob(b"12:3:-5:pay:load"), Some((12, 3, 8)));
        assert_eq!(split_blob(b"12:3:load"), None);
        assert_eq!(split_blob(b"x:3:0:load"), None);
        assert_eq!(split_blob(b"1:3:99999:load"), None);
    }
}
