//! The Disque broker: a queue is a Disque queue of the same name, a package is one job whose body
//! is the envelope byte for byte, and dead letters are jobs of the side queue `<queue>:dead`.
//!
//! Layout and promise: `enqueue` is `ADDJOB queue body timeout RETRY r TTL t [DELAY d]
//! [REPLICATE n]`; `dequeue` is `GETJOB TIMEOUT wait COUNT bulk WITHCOUNTERS FROM queue` followed
//! by one `WORKING` per job (Disque counts a job's retry from the moment it was *queued*; the
//! `WORKING` restarts it at delivery so that the lease is `retry` from the dequeue); a receipt is
//! `<job id>#<delivery number>`; `acknowledge` is `ACKJOB` (or `FASTACK` with `fastack`), `fail`
//! is `NACK`, `extend` is `WORKING`, `dead_letter` stores a framed copy (reason, deliveries, time,
//! original id, payload) in `<queue>:dead` and acknowledges the original. Delivery is
//! at-least-once: a package is acknowledged or delivered again, never silently dropped, until
//! Disque's own `ttl` runs out.
//!
//! **`ttl` deletes silently.** Disque removes a job when its TTL (`disque.ttl`, default 7 days)
//! runs out, delivered or not: a package still waiting in a backlog, one failed over and over,
//! and a dead letter in `<queue>:dead` all vanish then, with no trace. The adapter refuses a
//! `ttl` below 4 × the retry it sends (or above 10 years, where Disque's 32-bit expiry wraps);
//! sizing it for the longest backlog and dead-letter retention is the operator's job.
//!
//! `requeue_dead` and `delete_dead` **scan the dead letters** for the id (`QPEEK <queue>:dead`
//! on every known node, up to 100,000 per node: Disque cannot find a job by a field of its
//! body); `requeue_dead` adds the package to the queue as a new job (synchronous replication,
//! first delivery again) before it acknowledges the dead-letter job (`ACKJOB`, cluster-wide), so
//! a crash in between leaves it in both places. Disque has no compare-and-set, so two concurrent
//! requeues of one id may both add it.
//!
//! What Disque imposes, and what this adapter does about it:
//! - **Whole seconds.** `RETRY` is whole seconds and Disque adds up to ±0.25 s of jitter, so the
//!   adapter sends `ceil(retry + 0.25 s)`: a lease lasts at least `retry`, at most about
//!   `retry + 1.25 s`. Delays (`Message::delay`, `fail_after`) are rounded up to whole seconds.
//! - **Stale receipts.** A job keeps its id when it is queued again, so a bare `ACKJOB` from a
//!   first consumer whose lease ran out would settle the second consumer's delivery. The receipt
//!   therefore carries the delivery number, and every settle first reads the job (`SHOW`): a
//!   receipt whose number is behind the job's counters (`nacks + additional-deliveries + 1`) is
//!   stale and ignored. Disque has no compare-and-settle, so one round trip separates the check
//!   from the settle; a lease that runs out inside that window makes a duplicate delivery (the
//!   second holder's settle then finds nothing), never a loss.
//! - **`extend`.** `WORKING` pushes the next requeue to *the job's retry time* from now, not to an
//!   arbitrary `by`. For `by` longer than that, the handle keeps the lease alive with further
//!   `WORKING`s until `by` has passed (a background task per extended job that stops on any
//!   settle, on a stale receipt, or when the handle is dropped), so a lease runs out between `by`
//!   and `by + retry` from the call. Disque refuses `WORKING` once half of the job's TTL has gone
//!   (an error naming `disque.ttl`).
//! - **`fail_after`.** Disque has no delayed `NACK`: the adapter adds a copy of the job with
//!   `DELAY`, then acknowledges the original only once `ADDJOB` has answered with the copy's id,
//!   that is once the copy is replicated (the copy, like a dead letter, is never added `ASYNC`,
//!   whatever `async_replication` says). A crash between the two leaves both: the original
//!   comes back after its lease and the copy after its delay (a duplicate, never a loss). The copy
//!   is a new job: new message id, delivery count starting again at 1.
//! - **Node-local views.** `QLEN`, `QPEEK` and `JSCAN` see one node, and a node holds *replicas*
//!   of jobs queued elsewhere, which look exactly like delivered jobs. On a one-node cluster
//!   `queue_size` is `QLEN` plus the jobs still waiting out a `DELAY`, and `lock_size` the active
//!   jobs. With several nodes both scan every known node (`JSCAN`): a job queued or delayed on
//!   any node is waiting, an active job queued nowhere is in flight; a snapshot taken node by
//!   node, not atomic. `purge_queue` and `delete_queue` visit every known node too;
//!   `dead_letters` and `dead_letter_size` read the node in use.
//! - **Nodes.** The handle connects to a random node of `nodes` (with `AUTH` when `auth` is set),
//!   learns the others with `HELLO`, and when a command fails for a connection reason it goes to
//!   the next node and tries again, at most once per known node. A command retried so may have
//!   run on the first node already: an `ADDJOB` whose reply was lost (a response timeout) stores
//!   the package twice (a duplicate, never a loss); settles are safe to repeat. Receipts are
//!   settled on the node in use, which must hold a copy of the job: true with Disque's default
//!   replication (every node of a cluster of up to three).
#![warn(missing_docs)]

mod conn;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex as SyncMutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, async_trait,
};
use redis::aio::MultiplexedConnection;
use redis::{Cmd, RedisError, Value};

use conn::Nodes;

/// The adapter's name in errors and `info`.
pub const NAME: &str = "disque";
/// Most packages one dequeue returns.
pub const MAX_BULK: usize = 1000;
/// Largest package: Disque refuses bulk strings over 512 MiB (`networking.c`); 64 KiB of that
/// is kept for the dead-letter frame around a package.
pub const MAX_MESSAGE_SIZE: usize = 512 * 1024 * 1024 - 64 * 1024;
/// Longest dead-letter reason kept (longer ones are cut at a character boundary).
const MAX_REASON: usize = 4096;
/// Disque's jitter on requeue times is below this (±250 ms, `DISQUE_TIME_ERR / 2`).
const JITTER: Duration = Duration::from_millis(250);
/// Most dead letters per node `requeue_dead` / `delete_dead` look through (`QPEEK`) for one id.
const MAX_DEAD_SCAN: usize = 100_000;
/// Jobs read per `JSCAN` / `QPEEK` round.
const SCAN_BATCH: usize = 1000;
/// Longest `disque.ttl`: Disque keeps a job's expiry as 32-bit Unix seconds, so a TTL that
/// reaches past 2106 wraps and the job expires at once. Ten years, plus at most
/// [`MAX_DELAY_SECS`], stays far from that.
pub const MAX_TTL_SECS: u64 = 10 * 365 * 24 * 3600;
/// Longest delay (`Message::delay`, `fail_after`), for the same reason.
pub const MAX_DELAY_SECS: u64 = 365 * 24 * 3600;
/// Longest `disque.connect_timeout` and `disque.add_timeout`.
const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// `[disque]` settings. Debug output masks `auth`; unknown keys are refused when read from a
/// config file.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DisqueConfig {
    /// Nodes as `host:port`; the handle starts at a random one and learns the rest with `HELLO`.
    pub nodes: Vec<String>,
    /// The nodes' `requirepass`, if any. Never shown in `info`, errors, logs or `Debug`.
    pub auth: Option<String>,
    /// Acknowledge with `FASTACK` (one best-effort delete) instead of `ACKJOB` (an acknowledgement
    /// replicated to every node holding a copy before the job is collected). Faster; a node cut
    /// off during the acknowledgement may deliver the job again when it comes back.
    pub fastack: bool,
    /// Longest wait to connect to one node, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// `REPLICATE`: copies of each job; `None` takes Disque's default (min(3, cluster size)).
    pub replicate: Option<u32>,
    /// `ASYNC`: `ADDJOB` returns before the copies are made (faster, a node crash right after
    /// may lose the job).
    pub async_replication: bool,
    /// How long `ADDJOB` waits for its copies, in seconds (then it fails and Disque cleans up).
    #[serde(with = "broker_core::secs")]
    pub add_timeout: Duration,
    /// `TTL` of a job, in seconds (added to any delay). **Disque deletes a job at its TTL whether
    /// or not it was delivered, silently**: a package still waiting (or failing over and over)
    /// when it runs out is gone, and so is a dead letter (`<queue>:dead` jobs get the same TTL).
    /// Disque also refuses `WORKING` after half of it. Set it well above the longest backlog,
    /// the longest task and how long dead letters must stay listable. At least 4 × the retry
    /// sent to Disque, at most 10 years ([`MAX_TTL_SECS`]). Default 7 days.
    pub ttl: u64,
}

impl Default for DisqueConfig {
    fn default() -> Self {
        Self {
            nodes: vec!["127.0.0.1:7711".to_owned()],
            auth: None,
            fastack: false,
            connect_timeout: Duration::from_secs(5),
            replicate: None,
            async_replication: false,
            add_timeout: Duration::from_secs(5),
            ttl: 7 * 24 * 3600,
        }
    }
}

impl DisqueConfig {
    /// Defaults, with these nodes.
    pub fn new<S: Into<String>>(nodes: impl IntoIterator<Item = S>) -> Self {
        Self {
            nodes: nodes.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }
}

impl fmt::Debug for DisqueConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DisqueConfig")
            .field("nodes", &self.nodes)
            .field("auth", &self.auth.as_ref().map(|_| "***"))
            .field("fastack", &self.fastack)
            .field("connect_timeout", &self.connect_timeout)
            .field("replicate", &self.replicate)
            .field("async_replication", &self.async_replication)
            .field("add_timeout", &self.add_timeout)
            .field("ttl", &self.ttl)
            .finish()
    }
}

struct Inner {
    nodes: Nodes,
    settings: QueueSettings,
    config: DisqueConfig,
    dead_queue: String,
    /// `RETRY` sent with every job (whole seconds, see the module docs).
    retry_secs: u64,
    max_message_size: usize,
    /// Jobs whose lease a keeper task holds: the delivery it keeps and the keeper's generation.
    keepers: SyncMutex<HashMap<String, (u64, u64)>>,
    generation: AtomicU64,
}

/// A queue on Disque. Cheap to clone.
#[derive(Clone)]
pub struct DisqueBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for DisqueBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DisqueBroker")
            .field("nodes", &self.inner.config.nodes)
            .field("queue", &self.inner.settings.queue)
            .field("fastack", &self.inner.config.fastack)
            .finish_non_exhaustive()
    }
}

/// A parsed receipt: the job and the delivery it was handed out as.
struct Receipt {
    job: String,
    delivery: u64,
}

/// What `SHOW` says about a job.
struct JobState {
    state: String,
    /// `nacks + additional-deliveries + 1`: the number of the job's current (or next) delivery.
    delivery: u64,
    body: Vec<u8>,
    /// Still waiting out its `DELAY` (never queued yet).
    delayed: bool,
}

impl JobState {
    fn from_fields(v: &Value) -> Option<Self> {
        let Value::Array(items) = v else { return None };
        let mut state = None;
        let mut nacks = 0;
        let mut deliv = 0;
        let mut body = Vec::new();
        let mut ctime: i64 = 0;
        let mut delay: i64 = 0;
        for pair in items.chunks(2) {
            let [k, v] = pair else { continue };
            match text(k).as_deref() {
                Some("state") => state = text(v),
                Some("nacks") => nacks = int(v).unwrap_or(0),
                Some("additional-deliveries") => deliv = int(v).unwrap_or(0),
                Some("ctime") => ctime = int(v).unwrap_or(0),
                Some("delay") => delay = int(v).unwrap_or(0),
                Some("body") => {
                    if let Value::BulkString(b) = v {
                        body = b.clone();
                    }
                }
                _ => {}
            }
        }
        let state = state?;
        // ctime is the creation time in milliseconds × 10^6 (plus a counter); compared with this
        // machine's clock, which is the node's clock for a local server.
        let visible_ms = ctime / 1_000_000 + delay * 1000;
        let delayed = state == "active" && delay > 0 && nacks + deliv == 0 && visible_ms > now_ms();
        Some(Self {
            state,
            delivery: u64::try_from(nacks + deliv).unwrap_or(0) + 1,
            body,
            delayed,
        })
    }
}

/// A reply of a shape this adapter does not know.
fn unexpected(command: &str, what: &str) -> BrokerError {
    BrokerError::Backend {
        broker: NAME,
        message: format!("{command}: unexpected reply from Disque ({what})"),
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A RESP value as text (bulk or simple string).
pub(crate) fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Okay => Some("OK".to_owned()),
        _ => None,
    }
}

/// A RESP value as an integer (integer reply or numeric text).
pub(crate) fn int(v: &Value) -> Option<i64> {
    match v {
        Value::Int(n) => Some(*n),
        other => text(other)?.parse().ok(),
    }
}

/// Whole seconds, rounded up, at least `min`.
fn ceil_secs(d: Duration, min: u64) -> u64 {
    let s = d.as_secs().saturating_add(u64::from(d.subsec_nanos() > 0));
    s.max(min)
}

/// The dead-letter frame: `QCDL1 | reason len (u32 LE) | reason | deliveries (u32 LE) |
/// dead_at_us (i64 LE) | id len (u16 LE) | original job id | payload`.
const DEAD_MAGIC: &[u8] = b"QCDL1";

fn dead_frame(reason: &str, deliveries: u32, id: &str, payload: &[u8]) -> Vec<u8> {
    let mut cut = reason.len().min(MAX_REASON);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let reason = &reason[..cut];
    let id = &id.as_bytes()[..id.len().min(u16::MAX as usize)];
    let mut out =
        Vec::with_capacity(DEAD_MAGIC.len() + 18 + reason.len() + id.len() + payload.len());
    out.extend_from_slice(DEAD_MAGIC);
    out.extend_from_slice(&(reason.len() as u32).to_le_bytes());
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(&deliveries.to_le_bytes());
    out.extend_from_slice(&now_us().to_le_bytes());
    out.extend_from_slice(&(id.len() as u16).to_le_bytes());
    out.extend_from_slice(id);
    out.extend_from_slice(payload);
    out
}

fn read_dead_frame(body: &[u8]) -> Option<DeadLetter> {
    let rest = body.strip_prefix(DEAD_MAGIC)?;
    let take = |r: &mut &[u8], n: usize| -> Option<Vec<u8>> {
        if r.len() < n {
            return None;
        }
        let (a, b) = r.split_at(n);
        *r = b;
        Some(a.to_vec())
    };
    let mut r = rest;
    let rlen = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?) as usize;
    let reason = String::from_utf8(take(&mut r, rlen)?).ok()?;
    let deliveries = u32::from_le_bytes(take(&mut r, 4)?.try_into().ok()?);
    let dead_at_us = i64::from_le_bytes(take(&mut r, 8)?.try_into().ok()?);
    let idlen = u16::from_le_bytes(take(&mut r, 2)?.try_into().ok()?) as usize;
    let id = String::from_utf8(take(&mut r, idlen)?).ok()?;
    Some(DeadLetter {
        message_id: MessageId(id),
        payload: r.to_vec(),
        reason,
        deliveries: Some(deliveries),
        dead_at_us,
    })
}

fn random_start(n: usize) -> usize {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    (h.finish() % n.max(1) as u64) as usize
}

impl DisqueBroker {
    /// Checks the settings, connects to a random node of `config.nodes` (the others in turn if it
    /// does not answer) and learns the cluster's nodes with `HELLO`.
    pub async fn connect(
        config: &DisqueConfig,
        settings: QueueSettings,
    ) -> Result<DisqueBroker, BrokerError> {
        settings.validate(MAX_BULK)?;
        if config.nodes.is_empty() {
            return Err(BrokerError::config(
                "disque.nodes",
                "must name at least one node",
            ));
        }
        if let Some(bad) = config.nodes.iter().find(|n| conn::parse_addr(n).is_none()) {
            // A URL with a password in it is not echoed.
            let shown = if bad.contains('@') {
                "an entry with '@'".to_owned()
            } else {
                format!("{bad:?}")
            };
            return Err(BrokerError::config(
                "disque.nodes",
                format!("{shown} is not host:port"),
            ));
        }
        if config.replicate == Some(0) {
            return Err(BrokerError::config(
                "disque.replicate",
                "must be at least 1",
            ));
        }
        if config.connect_timeout.is_zero() || config.connect_timeout > MAX_TIMEOUT {
            return Err(BrokerError::config(
                "disque.connect_timeout",
                "must be greater than zero and at most 3600 s",
            ));
        }
        if config.add_timeout > MAX_TIMEOUT {
            return Err(BrokerError::config(
                "disque.add_timeout",
                "must be at most 3600 s",
            ));
        }
        if config.ttl > MAX_TTL_SECS {
            return Err(BrokerError::config(
                "disque.ttl",
                format!(
                    "is {} s; the limit is {MAX_TTL_SECS} s (10 years): Disque stores expiry \
                     times as 32-bit seconds, and a longer TTL would wrap and expire jobs at once",
                    config.ttl
                ),
            ));
        }
        let retry_secs = ceil_secs(settings.retry + JITTER, 1);
        if config.ttl < retry_secs * 4 {
            return Err(BrokerError::config(
                "disque.ttl",
                format!(
                    "is {} s; it must be at least 4 × the retry sent to Disque ({retry_secs} s), \
                     so that jobs outlive their retries and WORKING works",
                    config.ttl
                ),
            ));
        }
        let max_message_size = settings
            .max_message_size
            .map_or(MAX_MESSAGE_SIZE, |m| m.min(MAX_MESSAGE_SIZE));
        // Replies come within the ADDJOB replication timeout plus room.
        let response = config.add_timeout.saturating_add(Duration::from_secs(5));
        let nodes = Nodes::new(
            config.nodes.clone(),
            config.auth.clone().filter(|a| !a.is_empty()),
            config.connect_timeout,
            response,
            random_start(config.nodes.len()),
        );
        let broker = Self {
            inner: Arc::new(Inner {
                nodes,
                dead_queue: format!("{}:dead", settings.queue),
                settings,
                config: config.clone(),
                retry_secs,
                max_message_size,
                keepers: SyncMutex::new(HashMap::new()),
                generation: AtomicU64::new(0),
            }),
        };
        let budget = config
            .connect_timeout
            .saturating_mul(u32::try_from(config.nodes.len()).unwrap_or(u32::MAX))
            .saturating_add(Duration::from_secs(1));
        match tokio::time::timeout(budget, broker.inner.nodes.conn()).await {
            Ok(Ok(_)) => Ok(broker),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(BrokerError::Timeout {
                broker: NAME,
                operation: "connect",
                endpoint: config.nodes.join(","),
                after: budget,
            }),
        }
    }

    fn endpoint(&self) -> String {
        self.inner.config.nodes.join(",")
    }

    fn map_err(&self, op: &'static str, e: &RedisError) -> BrokerError {
        let message = format!("{op}: {}", self.inner.nodes.scrub(e));
        if e.is_timeout() {
            BrokerError::Timeout {
                broker: NAME,
                operation: op,
                endpoint: self.endpoint(),
                after: self
                    .inner
                    .config
                    .add_timeout
                    .saturating_add(Duration::from_secs(5)),
            }
        } else if conn::is_connection_error(e) {
            BrokerError::Unreachable {
                broker: NAME,
                endpoint: self.endpoint(),
                message,
            }
        } else {
            BrokerError::Backend {
                broker: NAME,
                message,
            }
        }
    }

    /// Runs `f` on the node in use; on a connection error moves to the next node and runs it
    /// again, at most once per known node.
    async fn run<T, F, Fut>(&self, op: &'static str, f: F) -> Result<T, BrokerError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let nodes = &self.inner.nodes;
        let mut tries = 0;
        loop {
            let (addr, c) = nodes.conn().await?;
            match f(c).await {
                Ok(v) => return Ok(v),
                Err(e) if conn::is_connection_error(&e) => {
                    tracing::warn!(node = %addr, "disque: {op} failed: {}; trying the next node", nodes.scrub(&e));
                    nodes.failed(&addr).await;
                    tries += 1;
                    if tries >= nodes.known().len() {
                        return Err(self.map_err(op, &e));
                    }
                }
                Err(e) => return Err(self.map_err(op, &e)),
            }
        }
    }

    /// One command on the node in use, with failover.
    async fn cmd<T: redis::FromRedisValue>(
        &self,
        op: &'static str,
        cmd: &Cmd,
    ) -> Result<T, BrokerError> {
        self.run(op, |mut c| async move { cmd.query_async(&mut c).await })
            .await
    }

    fn receipt(&self, ack: &AckId) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceipt {
            broker: NAME,
            receipt: ack.as_str().to_owned(),
        };
        let (job, n) = ack.as_str().rsplit_once('#').ok_or_else(bad)?;
        if !job.starts_with("D-") || job.len() != 40 || !job.is_ascii() {
            return Err(bad());
        }
        let delivery = n.parse::<u64>().map_err(|_| bad())?;
        Ok(Receipt {
            job: job.to_owned(),
            delivery,
        })
    }

    async fn show(&self, job: &str) -> Result<Option<JobState>, BrokerError> {
        let v: Value = self.cmd("show", redis::cmd("SHOW").arg(job)).await?;
        match v {
            Value::Nil => Ok(None),
            other => JobState::from_fields(&other)
                .map(Some)
                .ok_or_else(|| unexpected("SHOW", "a job without a state field")),
        }
    }

    /// The job behind a receipt if this receipt still holds its lease (`None`: gone, unknown to
    /// this node, or stale).
    async fn held(&self, r: &Receipt) -> Result<Option<JobState>, BrokerError> {
        Ok(self
            .show(&r.job)
            .await?
            .filter(|s| s.state == "active" && s.delivery == r.delivery))
    }

    /// Stops the keeper of `r`'s job if it keeps this very delivery (a stale receipt leaves the
    /// new holder's keeper alone); `any` stops it whatever delivery it keeps.
    fn stop_keeper(&self, r: &Receipt, any: bool) {
        if let Ok(mut k) = self.inner.keepers.lock()
            && k.get(&r.job).is_some_and(|(d, _)| any || *d == r.delivery)
        {
            k.remove(&r.job);
        }
    }

    fn ack_cmd(&self) -> &'static str {
        if self.inner.config.fastack {
            "FASTACK"
        } else {
            "ACKJOB"
        }
    }

    /// `ADDJOB` for `body`. A `copy` (the delayed copy of `fail_after`, a dead letter) is always
    /// replicated synchronously, even with `async_replication`: the original is acknowledged
    /// right after, so the copy must be as safe as the original was before `ADDJOB` returns.
    fn addjob(
        &self,
        queue: &str,
        body: &[u8],
        delay: Option<Duration>,
        copy: bool,
    ) -> Result<Cmd, BrokerError> {
        let i = &self.inner;
        let delay = delay.filter(|d| !d.is_zero()).map(|d| ceil_secs(d, 1));
        if let Some(d) = delay
            && d > MAX_DELAY_SECS
        {
            return Err(BrokerError::Backend {
                broker: NAME,
                message: format!(
                    "a delay of {d} s is longer than Disque allows here ({MAX_DELAY_SECS} s, \
                     one year)"
                ),
            });
        }
        let mut c = redis::cmd("ADDJOB");
        c.arg(queue)
            .arg(body)
            .arg(i.config.add_timeout.as_millis().max(1) as u64)
            .arg("RETRY")
            .arg(i.retry_secs)
            .arg("TTL")
            .arg(i.config.ttl + delay.unwrap_or(0));
        if let Some(d) = delay {
            c.arg("DELAY").arg(d);
        }
        if let Some(n) = i.config.replicate {
            c.arg("REPLICATE").arg(n);
        }
        if i.config.async_replication && !copy {
            c.arg("ASYNC");
        }
        Ok(c)
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

    /// Parses a `GETJOB` reply into deliveries (`Nil`: nothing came). A job entry of another
    /// shape is skipped with a warning (Disque queues it again after its retry); a reply that
    /// is not a list is an error.
    fn deliveries(v: Value) -> Result<Vec<Delivery>, BrokerError> {
        let jobs = match v {
            Value::Nil => return Ok(Vec::new()),
            Value::Array(jobs) => jobs,
            _ => return Err(unexpected("GETJOB", "neither a list of jobs nor nil")),
        };
        let mut out = Vec::with_capacity(jobs.len());
        for job in jobs {
            let Value::Array(mut f) = job else {
                tracing::warn!("disque: GETJOB returned a job entry that is not a list; skipped");
                continue;
            };
            if f.len() < 3 {
                tracing::warn!(
                    "disque: GETJOB returned a job entry of {} fields; skipped",
                    f.len()
                );
                continue;
            }
            let mut counters = 0i64;
            for pair in f[3..].chunks(2) {
                if let [k, v] = pair
                    && matches!(text(k).as_deref(), Some("nacks" | "additional-deliveries"))
                {
                    counters += int(v).unwrap_or(0);
                }
            }
            let (Some(id), Value::BulkString(body)) =
                (text(&f[1]), std::mem::replace(&mut f[2], Value::Nil))
            else {
                tracing::warn!("disque: GETJOB returned a job without id or body; skipped");
                continue;
            };
            let n = u64::try_from(counters).unwrap_or(0) + 1;
            out.push(Delivery {
                ack: AckId::new(format!("{id}#{n}")),
                message_id: MessageId(id),
                payload: body,
                deliveries: Some(u32::try_from(n).unwrap_or(u32::MAX)),
            });
        }
        Ok(out)
    }

    /// Job ids of `queue` on the node behind `c` in the given states (all states when empty),
    /// with their state when `all`.
    async fn scan(
        c: &mut MultiplexedConnection,
        queue: &str,
        states: &[&str],
    ) -> Result<Vec<JobScan>, RedisError> {
        let mut cursor = "0".to_owned();
        let mut out = Vec::new();
        loop {
            let mut cmd = redis::cmd("JSCAN");
            cmd.arg(&cursor)
                .arg("COUNT")
                .arg(SCAN_BATCH)
                .arg("QUEUE")
                .arg(queue);
            for s in states {
                cmd.arg("STATE").arg(*s);
            }
            cmd.arg("REPLY").arg("all");
            let v: Value = cmd.query_async(c).await?;
            let Value::Array(mut parts) = v else { break };
            if parts.len() != 2 {
                break;
            }
            let items = parts.pop();
            let next = parts.pop().and_then(|c| text(&c)).unwrap_or_default();
            if let Some(Value::Array(items)) = items {
                for item in &items {
                    let id = match item {
                        Value::Array(f) => f
                            .chunks(2)
                            .find(|p| text(&p[0]).as_deref() == Some("id"))
                            .and_then(|p| p.get(1).and_then(text)),
                        _ => None,
                    };
                    if let (Some(id), Some(s)) = (id, JobState::from_fields(item)) {
                        out.push(JobScan {
                            id,
                            state: s.state,
                            delayed: s.delayed,
                        });
                    }
                }
            }
            if next == "0" || next.is_empty() {
                break;
            }
            cursor = next;
        }
        // JSCAN may repeat an element.
        out.sort_by(|a, b| a.id.cmp(&b.id));
        out.dedup_by(|a, b| a.id == b.id);
        Ok(out)
    }

    /// Runs `f` once on every known node that answers (the node in use through its connection).
    async fn each_node<T, F, Fut>(&self, op: &'static str, f: F) -> Result<Vec<T>, BrokerError>
    where
        F: Fn(MultiplexedConnection) -> Fut,
        Fut: Future<Output = Result<T, RedisError>>,
    {
        let nodes = &self.inner.nodes;
        let (current, c) = nodes.conn().await?;
        let mut out = vec![f(c).await.map_err(|e| self.map_err(op, &e))?];
        for addr in nodes.known() {
            if addr == current {
                continue;
            }
            let res = match nodes.other(&addr).await {
                Ok(c) => f(c).await,
                Err(e) => Err(e),
            };
            match res {
                Ok(v) => out.push(v),
                Err(e) => {
                    nodes.other_failed(&addr);
                    tracing::warn!(node = %addr, "disque: {op} skipped this node: {}", nodes.scrub(&e))
                }
            }
        }
        Ok(out)
    }

    /// Is the cluster a single node (so that local counts are the whole truth)?
    async fn single_node(&self) -> Result<bool, BrokerError> {
        let v: Value = self.cmd("hello", &redis::cmd("HELLO")).await?;
        Ok(matches!(v, Value::Array(items) if items.len() <= 3))
    }

    /// Up to `limit` dead letters from each known node, merged (one per Disque job), oldest
    /// first.
    async fn dead_jobs(
        &self,
        op: &'static str,
        limit: usize,
    ) -> Result<Vec<(String, DeadLetter)>, BrokerError> {
        let dead = self.inner.dead_queue.clone();
        let per_node = self
            .each_node(op, |mut c| {
                let dead = dead.clone();
                async move {
                    let v: Value = redis::cmd("QPEEK")
                        .arg(&dead)
                        .arg(limit)
                        .query_async(&mut c)
                        .await?;
                    Ok(v)
                }
            })
            .await?;
        let mut seen = std::collections::HashSet::new();
        let mut out = Vec::new();
        for v in per_node {
            let Value::Array(jobs) = v else { continue };
            for job in jobs {
                let Value::Array(f) = job else { continue };
                let (Some(id), Some(Value::BulkString(body))) = (f.get(1).and_then(text), f.get(2))
                else {
                    continue;
                };
                if !seen.insert(id.clone()) {
                    continue;
                }
                let d = read_dead_frame(body).unwrap_or_else(|| DeadLetter {
                    message_id: MessageId(id.clone()),
                    payload: body.clone(),
                    reason: "not a qcluster dead-letter frame".into(),
                    deliveries: None,
                    dead_at_us: 0,
                });
                out.push((id, d));
            }
        }
        out.sort_by_key(|(_, d)| d.dead_at_us);
        Ok(out)
    }

    /// The dead-letter job listed as `id` (the original job id of the frame, or the dead-letter
    /// job's own id for a body that is not a frame), with its dead letter.
    async fn find_dead(
        &self,
        id: &MessageId,
        op: &'static str,
    ) -> Result<Option<(String, DeadLetter)>, BrokerError> {
        Ok(self
            .dead_jobs(op, MAX_DEAD_SCAN)
            .await?
            .into_iter()
            .find(|(job, d)| d.message_id == *id || job == &id.0))
    }

    /// Cluster-wide (waiting incl. delayed, in flight) of the queue: `JSCAN` on every node; a
    /// job queued (or delayed) on any node is waiting, an active one queued nowhere is in flight.
    async fn cluster_counts(&self, op: &'static str) -> Result<(u64, u64), BrokerError> {
        let queue = self.inner.settings.queue.clone();
        let per_node = self
            .each_node(op, |mut c| {
                let queue = queue.clone();
                async move { Self::scan(&mut c, &queue, &["active", "queued"]).await }
            })
            .await?;
        let mut waiting = std::collections::HashSet::new();
        let mut active = std::collections::HashSet::new();
        for jobs in per_node {
            for j in jobs {
                if j.state == "queued" || j.delayed {
                    waiting.insert(j.id);
                } else {
                    active.insert(j.id);
                }
            }
        }
        let in_flight = active.difference(&waiting).count() as u64;
        Ok((waiting.len() as u64, in_flight))
    }

    /// Keeps a lease alive with `WORKING` until `deadline` (see the module docs).
    fn keep(&self, r: Receipt, deadline: Instant, last: Instant) {
        let i = &self.inner;
        let generation = i.generation.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut k) = i.keepers.lock() {
            k.insert(r.job.clone(), (r.delivery, generation));
        }
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let lease = Duration::from_secs(i.retry_secs).saturating_sub(JITTER);
        let step = (lease / 2).max(Duration::from_millis(500));
        tokio::spawn(async move {
            let mut last = last;
            loop {
                // The lease surely lasts until `last + lease`: done once that covers the deadline.
                if last + lease >= deadline {
                    break;
                }
                let at = (last + step).min(deadline - lease);
                tokio::time::sleep_until(tokio::time::Instant::from_std(at)).await;
                let Some(inner) = weak.upgrade() else { break };
                let current = inner
                    .keepers
                    .lock()
                    .map(|k| k.get(&r.job).is_some_and(|(_, g)| *g == generation))
                    .unwrap_or(false);
                if !current {
                    break;
                }
                let b = DisqueBroker { inner };
                match b.held(&r).await {
                    Ok(Some(_)) => {}
                    _ => break,
                }
                let sent = Instant::now();
                let res: Result<i64, _> = b.cmd("extend", redis::cmd("WORKING").arg(&r.job)).await;
                if let Err(e) = res {
                    tracing::warn!(job = %r.job, "disque: keeping a lease alive failed: {e}");
                    break;
                }
                last = sent;
            }
            if let Some(inner) = weak.upgrade()
                && let Ok(mut k) = inner.keepers.lock()
                && k.get(&r.job).is_some_and(|(_, g)| *g == generation)
            {
                k.remove(&r.job);
            }
        });
    }
}

/// One job found by `JSCAN`.
struct JobScan {
    id: String,
    state: String,
    delayed: bool,
}

#[async_trait]
impl Broker for DisqueBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    /// `ADDJOB`; retried on the next node after a connection error or a response timeout, so a
    /// package whose first `ADDJOB` did reach a node may be stored twice (at-least-once).
    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        self.check_size(&message)?;
        let cmd = self.addjob(
            &self.inner.settings.queue,
            &message.payload,
            message.delay,
            false,
        )?;
        let id: String = self.cmd("enqueue", &cmd).await?;
        Ok(MessageId(id))
    }

    /// One pipeline of `ADDJOB`s. A failed batch may be partial (the jobs before the failing one
    /// are stored), and a batch retried on another node after a connection error may store
    /// some packages twice: at-least-once.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        for m in &messages {
            self.check_size(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for m in &messages {
            pipe.add_command(self.addjob(
                &self.inner.settings.queue,
                &m.payload,
                m.delay,
                false,
            )?);
        }
        let ids: Vec<String> = self
            .run("enqueue_many", |mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        Ok(ids.into_iter().map(MessageId).collect())
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let nodes = &i.nodes;
        let mut cmd = redis::cmd("GETJOB");
        let wait_ms = i.settings.wait.as_millis() as u64;
        if wait_ms == 0 {
            cmd.arg("NOHANG");
        } else {
            cmd.arg("TIMEOUT").arg(wait_ms);
        }
        cmd.arg("COUNT")
            .arg(i.settings.bulk)
            .arg("WITHCOUNTERS")
            .arg("FROM")
            .arg(&i.settings.queue);
        let response = i.settings.wait.saturating_add(Duration::from_secs(5));
        let mut tries = 0;
        let (addr, mut c, got) = loop {
            let (addr, _) = nodes.conn().await?;
            let attempt = async {
                let mut c = nodes.waiter(&addr, response).await?;
                let v: Value = cmd.query_async(&mut c).await?;
                Ok::<_, RedisError>((c, v))
            };
            match attempt.await {
                Ok((c, v)) => break (addr, c, v),
                Err(e) if conn::is_connection_error(&e) => {
                    nodes.failed(&addr).await;
                    tries += 1;
                    if tries >= nodes.known().len() {
                        return Err(self.map_err("dequeue", &e));
                    }
                }
                Err(e) => return Err(self.map_err("dequeue", &e)),
            }
        };
        let out = Self::deliveries(got)?;
        if !out.is_empty() {
            // Start each lease now (Disque counts it from when the job was queued).
            let mut pipe = redis::pipe();
            for d in &out {
                pipe.cmd("WORKING").arg(&d.message_id.0);
            }
            let res: Result<Vec<Result<Value, RedisError>>, _> =
                pipe.ignore_errors().query_async(&mut c).await;
            match res {
                Ok(answers) => {
                    for (d, a) in out.iter().zip(answers) {
                        if let Err(e) = a {
                            tracing::warn!(job = %d.message_id, "disque: WORKING after GETJOB refused: {}", nodes.scrub(&e));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("disque: WORKING after GETJOB failed: {}", nodes.scrub(&e));
                    return Ok(out);
                }
            }
        }
        nodes.give_back(addr, c);
        Ok(out)
    }

    /// Ignored when the receipt is stale (see the module docs); a job that is waiting in the
    /// queue again, not yet redelivered, is acknowledged (the work was done and nobody holds it).
    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(&r, false);
        match self.show(&r.job).await? {
            Some(s) if s.delivery != r.delivery && s.state != "queued" => {
                tracing::debug!(job = %r.job, "disque: stale acknowledge ignored");
                return Ok(());
            }
            Some(s) if s.state == "acked" => return Ok(()),
            // Unknown to this node: the acknowledgement still reaches the cluster.
            _ => {}
        }
        let _: Value = self
            .cmd("acknowledge", redis::cmd(self.ack_cmd()).arg(&r.job))
            .await?;
        Ok(())
    }

    /// Checks every receipt (one pipeline of `SHOW`s), then acknowledges the fresh ones in one
    /// command.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let receipts = acks
            .iter()
            .map(|a| self.receipt(a))
            .collect::<Result<Vec<_>, _>>()?;
        if receipts.is_empty() {
            return Ok(());
        }
        for r in &receipts {
            self.stop_keeper(r, false);
        }
        let mut pipe = redis::pipe();
        for r in &receipts {
            pipe.cmd("SHOW").arg(&r.job);
        }
        let shows: Vec<Value> = self
            .run("acknowledge", |mut c| {
                let pipe = &pipe;
                async move { pipe.query_async(&mut c).await }
            })
            .await?;
        let mut cmd = redis::cmd(self.ack_cmd());
        let mut n = 0;
        for (r, v) in receipts.iter().zip(&shows) {
            let fresh = match JobState::from_fields(v) {
                None => true,
                Some(s) => (s.delivery == r.delivery || s.state == "queued") && s.state != "acked",
            };
            if fresh {
                cmd.arg(&r.job);
                n += 1;
            }
        }
        if n > 0 {
            let _: Value = self.cmd("acknowledge", &cmd).await?;
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(&r, false);
        if self.held(&r).await?.is_none() {
            tracing::debug!(job = %r.job, "disque: fail with a stale or settled receipt ignored");
            return Ok(());
        }
        let _: i64 = self.cmd("fail", redis::cmd("NACK").arg(&r.job)).await?;
        Ok(())
    }

    /// A copy with `DELAY` (whole seconds, rounded up), then an acknowledgement of the original;
    /// see the module docs for a crash in between.
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        if delay.is_zero() {
            return self.fail(ack).await;
        }
        let r = self.receipt(ack)?;
        self.stop_keeper(&r, false);
        let Some(job) = self.held(&r).await? else {
            tracing::debug!(job = %r.job, "disque: fail_after with a stale or settled receipt ignored");
            return Ok(());
        };
        let _: String = self
            .cmd(
                "fail_after",
                &self.addjob(&self.inner.settings.queue, &job.body, Some(delay), true)?,
            )
            .await?;
        let _: Value = self
            .cmd("fail_after", redis::cmd(self.ack_cmd()).arg(&r.job))
            .await?;
        Ok(())
    }

    /// Acknowledges the job whatever its lease (cluster-wide: `DELJOB` would leave the other
    /// nodes' copies to be queued again).
    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(&r, true);
        let _: Value = self
            .cmd("delete", redis::cmd(self.ack_cmd()).arg(&r.job))
            .await?;
        Ok(())
    }

    /// `WORKING`, repeated by a background task until `by` has passed when `by` is longer than
    /// the job's retry: the lease then runs out between `by` and `by + retry` from now. `false`
    /// when the receipt is stale or the job is gone.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let r = self.receipt(ack)?;
        if self.held(&r).await?.is_none() {
            return Ok(false);
        }
        let sent = Instant::now();
        let res: Result<i64, BrokerError> =
            self.cmd("extend", redis::cmd("WORKING").arg(&r.job)).await;
        match res {
            Ok(_) => {}
            Err(BrokerError::Backend { message, .. }) if message.contains("TOOLATE") => {
                return Err(BrokerError::Backend {
                    broker: NAME,
                    message: format!(
                        "extend: Disque refuses WORKING after half of the job's TTL; raise \
                         disque.ttl ({message})"
                    ),
                });
            }
            Err(BrokerError::Backend { message, .. })
                if message.contains("NOJOB") || message.contains("ACKED") =>
            {
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        // A job lives `ttl` at most: a longer `by` is cut there (and cannot overflow).
        let by = by.min(Duration::from_secs(self.inner.config.ttl));
        self.keep(r, sent + by, sent);
        Ok(true)
    }

    /// Adds the framed copy to `<queue>:dead`, then acknowledges the original (a crash in between
    /// leaves the package in both places: listed as dead and delivered again).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(&r, false);
        let Some(job) = self.held(&r).await? else {
            tracing::debug!(job = %r.job, "disque: dead_letter with a stale or settled receipt ignored");
            return Ok(());
        };
        let frame = dead_frame(
            reason,
            u32::try_from(r.delivery).unwrap_or(u32::MAX),
            &r.job,
            &job.body,
        );
        let _: String = self
            .cmd(
                "dead_letter",
                &self.addjob(&self.inner.dead_queue, &frame, None, true)?,
            )
            .await?;
        let _: Value = self
            .cmd("dead_letter", redis::cmd(self.ack_cmd()).arg(&r.job))
            .await?;
        Ok(())
    }

    /// `QPEEK` of `<queue>:dead` on every known node (a copy queued on two nodes is listed
    /// once), oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut all = self.dead_jobs("dead_letters", limit).await?;
        all.truncate(limit);
        Ok(all.into_iter().map(|(_, d)| d).collect())
    }

    /// Finds the dead letter (`QPEEK` of `<queue>:dead` on every known node, up to
    /// [`MAX_DEAD_SCAN`] per node), adds the package to the queue as a new job (replicated
    /// synchronously: a new job id, first delivery again), and only once `ADDJOB` answered
    /// acknowledges the dead-letter job, which removes it cluster-wide. Disque has no
    /// compare-and-set: two concurrent requeues of one id may both add it (a duplicate, never a
    /// loss).
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((job, d)) = self.find_dead(id, "requeue_dead").await? else {
            return Ok(false);
        };
        let added: String = self
            .cmd(
                "requeue_dead",
                &self.addjob(&self.inner.settings.queue, &d.payload, None, true)?,
            )
            .await?;
        let _: Value = self
            .cmd("requeue_dead", redis::cmd("ACKJOB").arg(&job))
            .await?;
        tracing::info!(message_id = %id, dead_job = %job, new_job = %added, "disque: dead letter requeued");
        Ok(true)
    }

    /// Finds the dead letter like `requeue_dead` and acknowledges its job (`ACKJOB`).
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((job, _)) = self.find_dead(id, "delete_dead").await? else {
            return Ok(false);
        };
        let _: Value = self
            .cmd("delete_dead", redis::cmd("ACKJOB").arg(&job))
            .await?;
        Ok(true)
    }

    /// The dead letters queued on any known node.
    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        if self.single_node().await? {
            let n: u64 = self
                .cmd(
                    "dead_letter_size",
                    redis::cmd("QLEN").arg(&self.inner.dead_queue),
                )
                .await?;
            return Ok(Some(n));
        }
        let dead = self.inner.dead_queue.clone();
        let per_node = self
            .each_node("dead_letter_size", |mut c| {
                let dead = dead.clone();
                async move { Self::scan(&mut c, &dead, &["queued"]).await }
            })
            .await?;
        let ids: std::collections::HashSet<String> =
            per_node.into_iter().flatten().map(|j| j.id).collect();
        Ok(Some(ids.len() as u64))
    }

    /// On every node: queued jobs (`QPEEK`, then `DEQUEUE` one by one so that a job a consumer
    /// took meanwhile is left alone) and jobs still waiting out a `DELAY`, acknowledged in
    /// batches.
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let queue = self.inner.settings.queue.clone();
        let ack = self.ack_cmd();
        let counts = self
            .each_node("purge_queue", |mut c| {
                let queue = queue.clone();
                async move {
                    let mut total = 0u64;
                    loop {
                        let v: Value = redis::cmd("QPEEK")
                            .arg(&queue)
                            .arg(SCAN_BATCH)
                            .query_async(&mut c)
                            .await?;
                        let ids: Vec<String> = match v {
                            Value::Array(jobs) => jobs
                                .iter()
                                .filter_map(|j| match j {
                                    Value::Array(f) => f.get(1).and_then(text),
                                    _ => None,
                                })
                                .collect(),
                            _ => Vec::new(),
                        };
                        if ids.is_empty() {
                            break;
                        }
                        let mut pipe = redis::pipe();
                        for id in &ids {
                            pipe.cmd("DEQUEUE").arg(id);
                        }
                        let moved: Vec<i64> = pipe.query_async(&mut c).await?;
                        let taken: Vec<&String> = ids
                            .iter()
                            .zip(&moved)
                            .filter(|(_, n)| **n == 1)
                            .map(|(id, _)| id)
                            .collect();
                        if taken.is_empty() {
                            break;
                        }
                        let _: Value = redis::cmd(ack).arg(&taken).query_async(&mut c).await?;
                        total += taken.len() as u64;
                    }
                    let delayed: Vec<String> = Self::scan(&mut c, &queue, &["active"])
                        .await?
                        .into_iter()
                        .filter(|j| j.delayed)
                        .map(|j| j.id)
                        .collect();
                    for chunk in delayed.chunks(SCAN_BATCH) {
                        let _: Value = redis::cmd(ack).arg(chunk).query_async(&mut c).await?;
                        total += chunk.len() as u64;
                    }
                    Ok(total)
                }
            })
            .await?;
        Ok(counts.into_iter().sum())
    }

    /// On every node, every job of the queue and of `<queue>:dead` whatever its state
    /// (`JSCAN`, then `FASTACK`: evicted here and, best effort, everywhere).
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        if let Ok(mut k) = self.inner.keepers.lock() {
            k.clear();
        }
        let queues = [
            self.inner.settings.queue.clone(),
            self.inner.dead_queue.clone(),
        ];
        self.each_node("delete_queue", |mut c| {
            let queues = queues.clone();
            async move {
                for q in &queues {
                    let ids: Vec<String> = Self::scan(&mut c, q, &[])
                        .await?
                        .into_iter()
                        .map(|j| j.id)
                        .collect();
                    for chunk in ids.chunks(SCAN_BATCH) {
                        let _: Value = redis::cmd("FASTACK").arg(chunk).query_async(&mut c).await?;
                    }
                }
                Ok(())
            }
        })
        .await?;
        Ok(())
    }

    /// One node: `QLEN` plus the jobs still waiting out a `DELAY`. Several nodes: the jobs of
    /// the queue queued or delayed on any node (`JSCAN` of every node, replicas counted once).
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let queue = &self.inner.settings.queue;
        if self.single_node().await? {
            return self
                .run("queue_size", |mut c| async move {
                    let n: u64 = redis::cmd("QLEN").arg(queue).query_async(&mut c).await?;
                    let delayed = Self::scan(&mut c, queue, &["active"])
                        .await?
                        .iter()
                        .filter(|j| j.delayed)
                        .count() as u64;
                    Ok(n + delayed)
                })
                .await;
        }
        Ok(self.cluster_counts("queue_size").await?.0)
    }

    /// Jobs of the queue delivered and not acknowledged: active, not waiting out a `DELAY`, and
    /// (on a cluster of several nodes) queued on no node, since the other nodes' replicas of a
    /// queued job are active too.
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let queue = &self.inner.settings.queue;
        if self.single_node().await? {
            let n = self
                .run("lock_size", |mut c| async move {
                    Ok(Self::scan(&mut c, queue, &["active"])
                        .await?
                        .iter()
                        .filter(|j| !j.delayed)
                        .count() as u64)
                })
                .await?;
            return Ok(Some(n));
        }
        Ok(Some(self.cluster_counts("lock_size").await?.1))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let budget = self.inner.config.connect_timeout.saturating_mul(2);
        match tokio::time::timeout(budget, self.cmd::<Value>("ping", &redis::cmd("PING"))).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BrokerError::Timeout {
                broker: NAME,
                operation: "ping",
                endpoint: self.endpoint(),
                after: budget,
            }),
        }
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let raw: String = self.cmd("info", redis::cmd("INFO").arg("server")).await?;
        let version = raw
            .lines()
            .find_map(|l| l.strip_prefix("disque_version:"))
            .map(|v| format!("Disque {}", v.trim()));
        let single = self.single_node().await.unwrap_or(false);
        let mut details = BTreeMap::new();
        details.insert("nodes_known".into(), i.nodes.known().join(","));
        if let Some(a) = i.nodes.current_addr().await {
            details.insert("node_in_use".into(), a);
        }
        details.insert("retry_sent_secs".into(), i.retry_secs.to_string());
        details.insert("ttl_secs".into(), i.config.ttl.to_string());
        details.insert(
            "replicate".into(),
            i.config
                .replicate
                .map_or("Disque's default".into(), |n| n.to_string()),
        );
        details.insert("ack".into(), self.ack_cmd().to_owned());
        details.insert("dead_letter_queue".into(), i.dead_queue.clone());
        let mut notes = vec![
            "at-least-once: an unacknowledged package is queued again after its lease".to_owned(),
            format!(
                "Disque's RETRY is whole seconds with jitter: leases last {} s ± 0.25 s \
                 (at least the configured retry)",
                i.retry_secs
            ),
            "a receipt carries the delivery number: a stale acknowledge/fail/extend (the lease \
             ran out and the job was delivered again) is ignored; one round trip separates the \
             check from the settle, so a lease ending in it can cause a duplicate delivery, \
             never a loss"
                .to_owned(),
            "extend repeats WORKING until `by` has passed; refused after half the job TTL"
                .to_owned(),
            "fail_after adds a delayed copy (new message id, counts restart) then acknowledges \
             the original"
                .to_owned(),
            format!(
                "a package not acknowledged within the TTL ({} s) is deleted by Disque, \
                 silently; dead letters too",
                i.config.ttl
            ),
            "an enqueue retried on another node after a lost reply may store the package twice"
                .to_owned(),
            "requeue_dead and delete_dead scan <queue>:dead (QPEEK on every node) for the id"
                .to_owned(),
        ];
        notes.push(if single {
            "queue_size is QLEN + delayed jobs; lock_size the active jobs (JSCAN)".to_owned()
        } else {
            "queue_size and lock_size scan every known node (JSCAN; a replica counts once): a \
             snapshot, not atomic, costing one scan of the queue's jobs per node"
                .to_owned()
        });
        if i.config.fastack {
            notes.push(
                "FASTACK: a node cut off while acknowledging may deliver the job again".to_owned(),
            );
        }
        Ok(BrokerInfo {
            broker: NAME.to_owned(),
            server: version,
            endpoint: self.endpoint(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.retry_secs as f64),
            notes,
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
            priority: false,
            delay: true,
            stats: false,
            extend: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_frames_round_trip() {
        let f = dead_frame("bad signature", 3, "D-abc", b"\x00\xffpayload");
        let d = read_dead_frame(&f).expect("frame");
        assert_eq!(d.reason, "bad signature");
        assert_eq!(d.deliveries, Some(3));
        assert_eq!(d.message_id.0, "D-abc");
        assert_eq!(d.payload, b"\x00\xffpayload");
        assert!(read_dead_frame(b"QCDL1\xff").is_none());
        let long = "é".repeat(MAX_REASON);
        let d = read_dead_frame(&dead_frame(&long, 1, "D-x", b"")).expect("frame");
        assert!(d.reason.len() <= MAX_REASON);
    }

    #[test]
    fn config_debug_masks_auth_and_refuses_unknown_keys() {
        let c = DisqueConfig {
            auth: Some("hunter2".into()),
            ..DisqueConfig::default()
        };
        assert!(!format!("{c:?}").contains("hunter2"));
        let bad: Result<DisqueConfig, _> =
            serde::Deserialize::deserialize(serde::de::value::MapDeserializer::<
                _,
                serde::de::value::Error,
            >::new([("nodez", "x")].into_iter()));
        assert!(bad.is_err());
    }

    #[test]
    fn retry_is_rounded_up_past_the_jitter() {
        assert_eq!(ceil_secs(Duration::from_millis(1750) + JITTER, 1), 2);
        assert_eq!(ceil_secs(Duration::from_secs(2) + JITTER, 1), 3);
        assert_eq!(ceil_secs(Duration::from_secs(60) + JITTER, 1), 61);
    }

    #[tokio::test]
    async fn bad_settings_name_the_key() {
        let e = DisqueBroker::connect(&DisqueConfig::new(["nohost"]), QueueSettings::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disque.nodes"), "{e}");
        let c = DisqueConfig {
            ttl: 10,
            ..DisqueConfig::default()
        };
        let e = DisqueBroker::connect(&c, QueueSettings::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disque.ttl"), "{e}");
        // A TTL past what Disque's 32-bit expiry holds would expire every job at once.
        let c = DisqueConfig {
            ttl: MAX_TTL_SECS + 1,
            ..DisqueConfig::default()
        };
        let e = DisqueBroker::connect(&c, QueueSettings::default())
            .await
            .unwrap_err();
        assert!(e.to_string().contains("disque.ttl"), "{e}");
        for (c, key) in [
            (
                DisqueConfig {
                    connect_timeout: Duration::MAX,
                    ..DisqueConfig::default()
                },
                "disque.connect_timeout",
            ),
            (
                DisqueConfig {
                    add_timeout: Duration::MAX,
                    ..DisqueConfig::default()
                },
                "disque.add_timeout",
            ),
            (
                DisqueConfig::new(["disque://:s3cr3t@db:7711"]),
                "disque.nodes",
            ),
        ] {
            let e = DisqueBroker::connect(&c, QueueSettings::default())
                .await
                .unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
            assert!(!e.to_string().contains("s3cr3t"), "{e}");
        }
    }

    #[test]
    fn huge_durations_do_not_overflow() {
        assert_eq!(ceil_secs(Duration::MAX, 1), u64::MAX);
    }

    #[test]
    fn getjob_replies_of_another_shape_are_errors() {
        assert!(DisqueBroker::deliveries(Value::Nil).unwrap().is_empty());
        assert!(DisqueBroker::deliveries(Value::Int(3)).is_err());
        let odd = Value::Array(vec![Value::Int(1), Value::Array(vec![Value::Nil])]);
        assert!(DisqueBroker::deliveries(odd).unwrap().is_empty());
        let good = Value::Array(vec![Value::Array(vec![
            Value::BulkString(b"q".to_vec()),
            Value::BulkString(b"D-x".to_vec()),
            Value::BulkString(b"body".to_vec()),
            Value::BulkString(b"nacks".to_vec()),
            Value::Int(1),
            Value::BulkString(b"additional-deliveries".to_vec()),
            Value::Int(2),
        ])]);
        let d = DisqueBroker::deliveries(good).unwrap();
        assert_eq!(d[0].ack.as_str(), "D-x#4");
        assert_eq!(d[0].payload, b"body");
    }
}
