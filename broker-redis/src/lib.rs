//! The Redis broker.
//!
//! **Reliable mode** (default): a dequeue atomically (one Lua script) moves up to `bulk`
//! packages from the ready set to an in-flight set whose score is the lease deadline
//! (server clock + `retry`); `acknowledge` removes them for good, `fail` puts them back,
//! `dead_letter` parks them with a reason; a lease that ran out returns its package to the ready
//! set atomically on the next dequeue. A package is never in two places or in none.
//!
//! **Fast mode** (`reliable = false`): Django Q's semantics. A dequeue pops and forgets; a worker
//! or cluster that dies loses what it held. `info` says so.
//!
//! An empty queue blocks server-side (`BLPOP` on a signal list that every enqueue pushes), so
//! latency does not depend on `poll`. Passwords never appear in `info`, errors or `Debug`.
#![warn(missing_docs)]

mod scripts;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, Stat, async_trait, mask_url, redact, url_password,
};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script, ScriptInvocation};
use tokio::sync::Mutex;

/// Most packages one dequeue returns.
pub const MAX_BULK: usize = 1000;
/// Default largest package (Redis itself allows 512 MB values).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// `[redis]` settings.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port/db` (`rediss://` needs a TLS build, not yet shipped).
    pub url: String,
    /// Key prefix; defaults to `qcluster`. Clusters sharing a Redis use their own.
    pub prefix: String,
    /// Receipts and leases (true), or Django Q's pop-and-forget (false).
    pub reliable: bool,
    /// Longest wait to connect.
    pub connect_timeout: Duration,
}

impl RedisConfig {
    /// A reliable-mode configuration for `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            prefix: "qcluster".to_owned(),
            reliable: true,
            connect_timeout: Duration::from_secs(5),
        }
    }
}

impl fmt::Debug for RedisConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisConfig")
            .field("url", &mask_url(&self.url))
            .field("prefix", &self.prefix)
            .field("reliable", &self.reliable)
            .finish_non_exhaustive()
    }
}

struct Keys {
    ready: String,
    delayed: String,
    inflight: String,
    data: String,
    score: String,
    dlv: String,
    seq: String,
    signal: String,
    dead: String,
    deadinfo: String,
    deaddata: String,
    stat: String,
}

impl Keys {
    fn new(prefix: &str, queue: &str) -> Self {
        let base = format!("{prefix}:{{{queue}}}");
        let k = |s: &str| format!("{base}:{s}");
        Self {
            ready: k("ready"),
            delayed: k("delayed"),
            inflight: k("inflight"),
            data: k("data"),
            score: k("score"),
            dlv: k("dlv"),
            seq: k("seq"),
            signal: k("signal"),
            dead: k("dead"),
            deadinfo: k("deadinfo"),
            deaddata: k("deaddata"),
            stat: format!("{prefix}:stat:"),
        }
    }

    /// Everything but `seq`: ids are never reused, so an old receipt can never match a new
    /// package after the queue is deleted.
    fn all(&self) -> [&str; 10] {
        [
            &self.ready,
            &self.delayed,
            &self.inflight,
            &self.data,
            &self.score,
            &self.dlv,
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
    delete: Script,
    purge: Script,
}

struct Inner {
    conn: ConnectionManager,
    /// Blocking waits get their own connection: a `BLPOP` would stall everything multiplexed.
    waiter: Mutex<ConnectionManager>,
    settings: QueueSettings,
    config: RedisConfig,
    keys: Keys,
    scripts: Scripts,
    endpoint: String,
    password: Option<String>,
    max_message_size: usize,
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
        if config.prefix.is_empty() || config.prefix.contains(['{', '}']) {
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
        let client = redis::Client::open(config.url.as_str())
            .map_err(|e| BrokerError::config("redis.url", scrub(e.to_string())))?;
        let manager = |response: Duration| {
            ConnectionManagerConfig::new()
                .set_connection_timeout(Some(config.connect_timeout))
                .set_response_timeout(Some(response))
                .set_number_of_retries(2)
        };
        // A cancelled BLPOP keeps the connection blocked until it times out: leave room.
        let wait_response = settings.wait * 2 + Duration::from_secs(5);
        let connecting = async {
            let conn = client
                .get_connection_manager_with_config(manager(
                    config.connect_timeout + Duration::from_secs(25),
                ))
                .await?;
            let waiter = client
                .get_connection_manager_with_config(manager(wait_response))
                .await?;
            Ok::<_, redis::RedisError>((conn, waiter))
        };
        let (conn, waiter) =
            match tokio::time::timeout(config.connect_timeout + Duration::from_secs(1), connecting)
                .await
            {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
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
        let info: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut conn.clone())
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
                    "{endpoint} runs Redis {}.{}; the broker needs 6.2 or newer (ZMSCORE)",
                    v.0, v.1
                ),
            ));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                conn,
                waiter: Mutex::new(waiter),
                keys: Keys::new(&config.prefix, &settings.queue),
                settings,
                config: config.clone(),
                scripts: Scripts {
                    enqueue: Script::new(scripts::ENQUEUE),
                    dequeue: Script::new(&scripts::dequeue()),
                    acknowledge: Script::new(scripts::ACKNOWLEDGE),
                    fail: Script::new(&scripts::fail()),
                    dead_letter: Script::new(&scripts::dead_letter()),
                    delete: Script::new(scripts::DELETE),
                    purge: Script::new(scripts::PURGE),
                },
                endpoint,
                password,
                max_message_size,
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

    fn receipt(&self, ack: &AckId) -> Result<(String, String), BrokerError> {
        let bad = || BrokerError::InvalidReceipt {
            broker: name(self.inner.config.reliable),
            receipt: ack.as_str().to_owned(),
        };
        let (id, n) = ack.as_str().split_once(':').ok_or_else(bad)?;
        // Canonical forms, as the scripts compare them as text.
        let id = id.parse::<u64>().map_err(|_| bad())?;
        let n = n.parse::<u32>().map_err(|_| bad())?;
        Ok((id.to_string(), n.to_string()))
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

    /// Members of the sorted set `key`; `None` in fast mode, which tracks nothing.
    async fn reliable_count(
        &self,
        key: &str,
        op: &'static str,
    ) -> Result<Option<u64>, BrokerError> {
        if !self.inner.config.reliable {
            return Ok(None);
        }
        let n: u64 = self
            .inner
            .conn
            .clone()
            .zcard(key)
            .await
            .map_err(self.err(op))?;
        Ok(Some(n))
    }

    async fn claim(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let mut inv = Self::call(
            &i.scripts.dequeue,
            &[&k.ready, &k.delayed, &k.inflight, &k.data, &k.score, &k.dlv],
        );
        inv.arg(i.settings.bulk)
            .arg(i.settings.retry.as_millis() as u64)
            .arg(if i.config.reliable { "1" } else { "0" });
        let raw: Vec<(String, u32, Vec<u8>)> = self.run(&inv, "dequeue").await?;
        let out = raw
            .into_iter()
            .map(|(id, n, payload)| Delivery {
                ack: AckId::new(format!("{id}:{n}")),
                message_id: MessageId(id),
                payload,
                deliveries: i.config.reliable.then_some(n),
            })
            .collect::<Vec<_>>();
        Ok(out)
    }
}

#[async_trait]
impl Broker for RedisBroker {
    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let mut ids = self.enqueue_many(vec![message]).await?;
        ids.pop().ok_or_else(|| BrokerError::Backend {
            broker: name(self.inner.config.reliable),
            message: "enqueue returned no id".into(),
        })
    }

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
        // Batches of at most 500 packages and 64 MiB (Redis drops a client over its buffer).
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
            let mut inv = Self::call(
                &i.scripts.enqueue,
                &[&k.seq, &k.data, &k.score, &k.ready, &k.delayed, &k.signal],
            );
            for m in chunk {
                inv.arg(m.payload.as_slice())
                    .arg(m.priority)
                    .arg(m.delay.map_or(0, |d| d.as_millis() as u64));
            }
            let got: Vec<u64> = self.run(&inv, "enqueue").await?;
            ids.extend(got.into_iter().map(|n| MessageId(n.to_string())));
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
        let mut pairs = Vec::with_capacity(acks.len());
        for a in acks {
            pairs.push(self.receipt(a)?);
        }
        if !i.config.reliable || pairs.is_empty() {
            return Ok(());
        }
        let k = &i.keys;
        for chunk in pairs.chunks(MAX_BULK) {
            let mut inv = Self::call(
                &i.scripts.acknowledge,
                &[&k.inflight, &k.data, &k.score, &k.dlv],
            );
            for (id, n) in chunk {
                inv.arg(id).arg(n);
            }
            let _: u64 = self.run(&inv, "acknowledge").await?;
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.fail_after(ack, Duration::ZERO).await
    }

    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let (id, n) = self.receipt(ack)?;
        if !i.config.reliable {
            return Ok(());
        }
        let k = &i.keys;
        let mut inv = Self::call(
            &i.scripts.fail,
            &[
                &k.inflight,
                &k.ready,
                &k.delayed,
                &k.score,
                &k.dlv,
                &k.signal,
            ],
        );
        inv.arg(id).arg(n).arg(delay.as_millis() as u64);
        let _: u64 = self.run(&inv, "fail").await?;
        Ok(())
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let i = &self.inner;
        let (id, _) = self.receipt(ack)?;
        let k = &i.keys;
        let mut inv = Self::call(
            &i.scripts.delete,
            &[&k.ready, &k.delayed, &k.inflight, &k.data, &k.score, &k.dlv],
        );
        inv.arg(id);
        let _: u64 = self.run(&inv, "delete").await?;
        Ok(())
    }

    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let i = &self.inner;
        let (id, n) = self.receipt(ack)?;
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
                &k.data,
                &k.score,
                &k.dlv,
                &k.dead,
                &k.deadinfo,
                &k.deaddata,
            ],
        );
        inv.arg(id).arg(n).arg(reason);
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
            let info: Option<String> = c
                .hget(&k.deadinfo, &id)
                .await
                .map_err(self.err("dead_letters"))?;
            let payload: Option<Vec<u8>> = c
                .hget(&k.deaddata, &id)
                .await
                .map_err(self.err("dead_letters"))?;
            let info = info.unwrap_or_default();
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

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        self.reliable_count(&self.inner.keys.dead, "dead_letter_size")
            .await
    }

    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let k = &i.keys;
        let mut total = 0u64;
        loop {
            let mut inv = Self::call(
                &i.scripts.purge,
                &[&k.ready, &k.delayed, &k.data, &k.score, &k.dlv],
            );
            inv.arg(MAX_BULK);
            let n: u64 = self.run(&inv, "purge_queue").await?;
            total += n;
            if n == 0 {
                return Ok(total);
            }
        }
    }

    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let _: u64 = i
            .conn
            .clone()
            .del(&i.keys.all()[..])
            .await
            .map_err(self.err("delete_queue"))?;
        Ok(())
    }

    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let (a, b): (u64, u64) = redis::pipe()
            .zcard(&i.keys.ready)
            .zcard(&i.keys.delayed)
            .query_async(&mut i.conn.clone())
            .await
            .map_err(self.err("queue_size"))?;
        Ok(a + b)
    }

    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        self.reliable_count(&self.inner.keys.inflight, "lock_size")
            .await
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.inner.conn.clone())
            .await
            .map_err(self.err("ping"))?;
        Ok(())
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let text: String = redis::cmd("INFO")
            .arg("server")
            .query_async(&mut i.conn.clone())
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
        details.insert("prefix".into(), i.config.prefix.clone());
        details.insert("wake_up".into(), "BLPOP on a signal list".into());
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
        }
    }

    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let ms = (ttl.as_millis() as u64).max(1);
        let _: () = i
            .conn
            .clone()
            .pset_ex(format!("{}{key}", i.keys.stat), value, ms)
            .await
            .map_err(self.err("set_stat"))?;
        Ok(())
    }

    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let i = &self.inner;
        let mut c = i.conn.clone();
        let pattern = format!("{}{}*", glob_escape(&i.keys.stat), glob_escape(prefix));
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(500)
                .query_async(&mut c)
                .await
                .map_err(self.err("get_stats"))?;
            keys.extend(batch);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let v: Option<Vec<u8>> = c.get(&k).await.map_err(self.err("get_stats"))?;
            if let Some(value) = v {
                out.push(Stat {
                    key: k[i.keys.stat.len()..].to_owned(),
                    value,
                });
            }
        }
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }
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

/// Escapes glob metacharacters for `SCAN MATCH`.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
