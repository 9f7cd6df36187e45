//! RabbitMQ / AMQP 0-9-1 broker on `lapin`.
//!
//! Layout on the server, for a cluster queue `Q` (any name up to 191 bytes, not starting
//! with `amq.`):
//! - `Q`: a durable queue (`x-queue-type` = `quorum` by default, or `classic`), reached through
//!   the default exchange, whose own dead-letter route is `Q.dead` (see below); packages are
//!   persistent messages (delivery mode 2) whose `message_id` is the id `enqueue` returned;
//! - `Q.dead`: a durable queue of the same type holding dead letters: the adapter's, each a copy
//!   of the package with the headers `x-qcluster-reason` and `x-qcluster-dead-at-us`, and those
//!   the server dead-lettered by itself;
//! - `Q.delay.<ms>`: holding queues of delayed packages, one per delay (see below).
//!
//! `requeue_dead` and `delete_dead` **scan `Q.dead`** for the id (AMQP cannot fetch a message
//! by id): `basic.get` one message at a time on a channel of their own, holding those passed over
//! unacknowledged until the search ends and closing the channel then, which puts them back at
//! once (their order in `Q.dead` may change). The cost is one round trip per dead letter before
//! the one wanted. `requeue_dead` publishes the package to `Q` as a fresh message (a new
//! `message_id`, confirmed) before it acknowledges the dead letter.
//!
//! # What the server dead-letters
//!
//! RabbitMQ drops what it dead-letters from a queue without a dead-letter exchange, and it does
//! dead-letter by itself: a quorum queue message returned more often than the delivery limit
//! (`x-delivery-limit`, config `delivery_limit`; unlimited by default in 3.x, 20 in 4.x), where
//! every return counts (`fail`, a lease or an idle handle's prefetch given back, a closed
//! channel), and a reject without requeue (this adapter sends none). So `Q` is declared with
//! `x-dead-letter-exchange = ""` and `x-dead-letter-routing-key = Q.dead`, and on quorum queues
//! `x-dead-letter-strategy = at-least-once` with `x-overflow = reject-publish` (which that
//! strategy needs; without a length limit it changes nothing): the message stays in `Q` until
//! `Q.dead` confirmed it. Classic queues dead-letter at most once, and only on a reject or a
//! limit an operator's policy adds. `dead_letters` lists such a message with the reason and
//! time of the newest `x-death` entry (`RabbitMQ dead-lettered it: delivery_limit (queue Q)`;
//! without one, `dead-lettered by RabbitMQ` and the time it was published); `requeue_dead` and
//! `delete_dead` treat it like the adapter's own.
//!
//! # A queue declared by an older version
//!
//! Versions before these arguments declared `Q` without them, and RabbitMQ refuses a
//! declaration whose arguments differ from the existing queue's (PRECONDITION_FAILED, which
//! also closes the channel). The adapter then declares `Q` with the arguments the older version
//! used (which still checks its type and priorities; any other mismatch is a
//! [`BrokerError::Config`] naming `amqp.queue_type` or `amqp.delivery_limit`) and **runs on with
//! the queue as it is**, logging at every connection a `warn!` with the `rabbitmqctl
//! set_policy` command that gives that queue the dead-letter settings in place (`info` shows it
//! as `dead_letter_fix`), or else to delete the queue once it is empty. It does not refuse to
//! run: that would stop every worker and every `enqueue`, and the only way to make the
//! declaration pass would be to delete the queue, so an operator in a hurry could lose what it
//! holds; running on keeps every package and is no worse than before the upgrade, and the
//! policy closes the gap without moving a message. While the queue lacks the arguments, the
//! declaration with them is tried (at each connection, and when a consumer or publish finds the
//! queue gone) on a channel of its own, so the refusal never closes a working channel, and the
//! other declarations of `Q` are passive; a queue deleted and declared again gets them.
//!
//! # Delays
//!
//! A package enqueued with `Message::delay`, or given back with `fail_after(delay)`, is
//! published (confirmed) to the holding queue `Q.delay.<ms>`: a durable **quorum** queue
//! (whatever `queue_type`) with `x-message-ttl = ms`, `x-dead-letter-exchange = ""`,
//! `x-dead-letter-routing-key = Q`, `x-dead-letter-strategy = at-least-once`,
//! `x-overflow = reject-publish` and `x-expires = ms + 60 s`. Nobody consumes it: when a message's
//! TTL ends, RabbitMQ dead-letters it into `Q`, at least once (a quorum queue keeps it until `Q`
//! confirmed it; classic queues would dead-letter at most once). All messages of a holding
//! queue share its TTL, so they expire in order and a short delay never waits behind a long one.
//! No plugin is needed. Delays are rounded **up** ([`delay_bucket`]): to 100 ms up to 10 s,
//! beyond that to two significant figures, so a package waits at most 100 ms or 10 % longer
//! than asked (plus RabbitMQ's expiry latency), and a queue has at most ~575 possible holding
//! queues; delays beyond [`MAX_DELAY`] (40 days) are cut to it, under 1 ms are none. A
//! holding queue is declared again before a publish once its last declaration is 30 s old, so
//! it cannot expire with messages in it; an idle one disappears a minute after its delay.
//!
//! `fail_after` publishes the delayed copy (confirmed, same `message_id`, priority, and the
//! delivery count so far) and then acknowledges the delivery: a crash in between leaves the
//! package twice, never loses it; if the copy fails the delivery is given back at once and the
//! error returned. `queue_size` counts the delayed packages of the holding queues this handle
//! published to (within their delay + 10 s), `purge_queue` empties those (delayed packages count
//! as waiting); those that other handles published are invisible to it (AMQP cannot list
//! queues). `delete_queue` deletes every possible holding queue, whoever filled it.
//!
//! The promise: `enqueue` returns only once the server confirmed the message (publisher
//! confirms, published `mandatory`): a nack, an unroutable message or a lost connection is an
//! error, never silence. A delivered package is held by this handle for `retry` (an adapter
//! lease, see below); it is removed only by `acknowledge`/`delete`, and otherwise goes back to
//! the queue, so nothing is lost; a package may be delivered more than once (at least once).
//!
//! # What `retry` means here
//!
//! AMQP itself redelivers an unacknowledged message only when the channel that holds it closes
//! (RabbitMQ's `consumer_timeout`, 30 min by default, closes a channel whose delivery stays
//! unacknowledged longer). This adapter enforces the lease itself: each delivery gets a deadline
//! `retry` after `dequeue` handed it out; when the deadline passes unsettled, the adapter gives
//! the message back (`basic.nack` with requeue), so another consumer gets it. A settle with a
//! receipt whose lease ran out, or whose channel is gone (a receipt carries the handle, the
//! connection generation and the delivery tag), is ignored and never sent to the server (an ack
//! of an unknown delivery tag would close the channel). `extend` moves the adapter's deadline;
//! it cannot outlast the server's `consumer_timeout`, after which the server closes the channel
//! and gives the message back itself.
//!
//! # Receipts are bound to the handle
//!
//! A RabbitMQ reservation belongs to the channel that received it, so receipts are settled only
//! on the handle (an [`AmqpBroker`] and its clones) that dequeued them; a receipt from another
//! handle is ignored. Settles never wait behind a waiting `dequeue` of the same handle. When the
//! connection breaks, the server requeues what it held; the next operation reconnects (bounded
//! by `connect_timeout`, [`BrokerError::Unreachable`] until it works) and old receipts are stale.
//!
//! # Consuming
//!
//! The first `dequeue` starts a consumer (`basic.consume`, manual acks) whose prefetch is
//! `prefetch` (default `bulk`): room for one more batch beyond what the handle already holds.
//! Deliveries are buffered in the handle until a `dequeue` takes them, so a dropped `dequeue`
//! future loses nothing. When the handed-out leases fill the consumer's prefetch, the next
//! `dequeue` cancels it and starts a fresh one (prefetch counts per consumer), so a handle may
//! hold any number of leases. A handle that stops dequeuing (no `dequeue` for `max(wait,
//! 500 ms)`) cancels its consumer and gives back what it had buffered but not handed out, so an
//! idle handle hoards nothing; a handle that only enqueues never consumes.
#![warn(missing_docs)]

mod config;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, codec, mask_url, now_us, redact, url_password,
};
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, ErrorKind,
    PublisherConfirm,
};
use tracing::{debug, info, warn};

pub use config::{AmqpConfig, QueueType};

const NAME: &str = "amqp";
/// RabbitMQ's default `max_message_size` (3.10): 128 MiB.
pub const SERVER_MAX_MESSAGE_SIZE: usize = 128 * 1024 * 1024;
/// Most packages one `dequeue` returns (the prefetch is a 16-bit count).
pub const MAX_BULK: usize = 10_000;
/// RabbitMQ's default `consumer_timeout` (3.10): an `extend` beyond it does not hold.
pub const SERVER_CONSUMER_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Most dead letters `requeue_dead` / `delete_dead` look through for one id.
const MAX_DEAD_SCAN: usize = 100_000;
/// How long a `dequeue` that has part of a batch waits for the rest to arrive.
const LINGER: Duration = Duration::from_millis(5);
const REASON_HEADER: &str = "x-qcluster-reason";
const DEAD_AT_HEADER: &str = "x-qcluster-dead-at-us";
const DELIVERIES_HEADER: &str = "x-qcluster-deliveries";
/// On a delayed copy made by `fail_after`: how many times the package had been delivered
/// before (`-1`: unknown), so the next delivery counts on from it.
const PRIOR_HEADER: &str = "x-qcluster-prior-deliveries";
/// Longest delay honoured (`Message::delay`, `fail_after`): longer ones are cut to it. RabbitMQ
/// keeps TTLs in 32-bit milliseconds (49.7 days); 40 days leaves room for the rounding.
pub const MAX_DELAY: Duration = Duration::from_secs(40 * 24 * 3600);
/// A holding queue expires (`x-expires`) this long after its delay once nobody declares it.
const HOLDING_MARGIN: Duration = Duration::from_secs(60);
/// A holding queue is declared again before a publish when its last declaration is older than
/// this (half the margin), so it never expires with messages in it.
const HOLDING_REDECLARE: Duration = Duration::from_secs(30);
/// How long after its last publish (plus the delay) a holding queue is still counted.
const HOLDING_SLACK: Duration = Duration::from_secs(10);

/// A RabbitMQ broker handle for one queue. Cheap to clone; clones share the connection, the
/// consumer and the leases (they are the same handle).
#[derive(Clone)]
pub struct AmqpBroker {
    inner: Arc<Inner>,
}

struct Inner {
    cfg: AmqpConfig,
    settings: QueueSettings,
    endpoint: String,
    /// The URL's password, decoded and as written (percent-encoded): both are scrubbed.
    secrets: Vec<String>,
    limit: usize,
    prefetch: u16,
    dead: String,
    /// Random id of this handle: receipts of other handles are recognised and ignored.
    handle: u64,
    /// How long an idle handle keeps its consumer and its buffered deliveries.
    hold: Duration,
    current: RwLock<Option<Arc<Conn>>>,
    reconnect: tokio::sync::Mutex<()>,
    consumer_lock: tokio::sync::Mutex<()>,
    state: Mutex<State>,
    notify: tokio::sync::Notify,
    generation: AtomicU64,
    consumer_seq: AtomicU64,
    server: OnceLock<Option<String>>,
    /// The holding queues this handle published to, by delay in ms (they outlive connections).
    holding: Mutex<HashMap<u64, Holding>>,
    /// `<queue>` is not known to have its dead-letter arguments: set until a declaration with
    /// them succeeds, and while the queue refuses them (declared by an older version; see the
    /// module docs). While set, `declare` tries them on a channel of its own and the other
    /// declarations of `<queue>` are passive.
    legacy: AtomicBool,
}

/// A holding queue (`<queue>.delay.<ms>`) this handle knows.
#[derive(Clone, Copy)]
struct Holding {
    /// Last `queue.declare` (which resets its `x-expires` clock).
    declared: Instant,
    /// Last publish to it.
    published: Instant,
}

/// Where a publish goes.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Main,
    Dead,
    /// The holding queue of this delay (ms).
    Delay(u64),
}

/// One connection generation: the connection and its three channels.
struct Conn {
    generation: u64,
    connection: Connection,
    /// Confirm mode; every publish.
    publish: Channel,
    /// The consumers, acks and nacks (delivery tags belong to this channel).
    consume: Channel,
    /// Declarations, sizes, purge, delete, dead-letter listing.
    admin: Channel,
    broken: AtomicBool,
}

impl Conn {
    fn healthy(&self) -> bool {
        !self.broken.load(Ordering::SeqCst)
            && self.connection.status().connected()
            && self.publish.status().connected()
            && self.consume.status().connected()
            && self.admin.status().connected()
    }
}

struct Buffered {
    tag: u64,
    consumer: u64,
    message_id: String,
    payload: Vec<u8>,
    redelivered: bool,
    /// Deliveries before this copy (header of a `fail_after` copy): `None` for a fresh message.
    prior: Option<i64>,
    priority: Option<u8>,
    arrived: Instant,
}

struct Lease {
    deadline: Instant,
    consumer: u64,
    message_id: String,
    payload: Vec<u8>,
    deliveries: Option<u32>,
    priority: Option<u8>,
}

struct Active {
    seq: u64,
    tag: String,
}

struct State {
    generation: u64,
    buffer: VecDeque<Buffered>,
    held: HashMap<u64, Lease>,
    active: Option<Active>,
    /// Deliveries per consumer not yet settled or given back (what its prefetch counts).
    outstanding: HashMap<u64, usize>,
    waiting: usize,
    last_dequeue: Instant,
    declared: bool,
}

impl State {
    fn release(&mut self, consumer: u64) {
        if let Some(n) = self.outstanding.get_mut(&consumer) {
            *n = n.saturating_sub(1);
            if *n == 0 && self.active.as_ref().is_none_or(|a| a.seq != consumer) {
                self.outstanding.remove(&consumer);
            }
        }
    }

    fn reset(&mut self, generation: u64) {
        self.generation = generation;
        self.buffer.clear();
        self.held.clear();
        self.active = None;
        self.outstanding.clear();
        self.declared = true;
    }
}

/// A parsed receipt: `<handle>.<generation>.<delivery tag>`.
struct Receipt {
    handle: u64,
    generation: u64,
    tag: u64,
}

impl fmt::Debug for AmqpBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("queue", &self.inner.settings.queue)
            .field("queue_type", &self.inner.cfg.queue_type)
            .field("prefetch", &self.inner.prefetch)
            .finish()
    }
}

enum Settle {
    Ack,
    Requeue,
}

impl AmqpBroker {
    /// Deliveries this handle has handed out and not yet settled (leases it holds).
    pub fn held(&self) -> usize {
        self.inner.lock().held.len()
    }

    /// Connects, declares `<queue>` and `<queue>.dead` (durable, of `queue_type`) and opens the
    /// channels. Fails with [`BrokerError::Unreachable`] or [`BrokerError::Timeout`] (within
    /// `connect_timeout`) when the server does not answer, [`BrokerError::Config`] for invalid
    /// settings or a queue declared before with another type, priorities or delivery limit. A
    /// queue declared by an older version without dead-letter arguments is used as it is, with
    /// a warning (see the module docs).
    pub async fn connect(
        config: &AmqpConfig,
        settings: QueueSettings,
    ) -> Result<AmqpBroker, BrokerError> {
        config.validate()?;
        settings.validate(MAX_BULK)?;
        if settings.queue.starts_with("amq.") {
            return Err(BrokerError::config(
                "queue",
                "names starting with `amq.` are reserved by RabbitMQ",
            ));
        }
        let own = SERVER_MAX_MESSAGE_SIZE.min(codec::DEFAULT_MAX_SIZE);
        let limit = settings.max_message_size.map_or(own, |m| m.min(own));
        let prefetch = match config.prefetch {
            Some(p) => p,
            None => u16::try_from(settings.bulk).unwrap_or(u16::MAX),
        };
        let hold = settings.wait.max(Duration::from_millis(500));
        let inner = Arc::new(Inner {
            endpoint: mask_url(&config.url),
            secrets: secrets_of(&config.url),
            dead: format!("{}.dead", settings.queue),
            cfg: config.clone(),
            limit,
            prefetch,
            handle: random_u64(),
            hold,
            current: RwLock::new(None),
            reconnect: tokio::sync::Mutex::new(()),
            consumer_lock: tokio::sync::Mutex::new(()),
            state: Mutex::new(State {
                generation: 0,
                buffer: VecDeque::new(),
                held: HashMap::new(),
                active: None,
                outstanding: HashMap::new(),
                waiting: 0,
                last_dequeue: Instant::now(),
                declared: true,
            }),
            notify: tokio::sync::Notify::new(),
            generation: AtomicU64::new(0),
            consumer_seq: AtomicU64::new(0),
            server: OnceLock::new(),
            holding: Mutex::new(HashMap::new()),
            legacy: AtomicBool::new(true),
            settings,
        });
        inner.conn().await?;
        tokio::spawn(reaper(Arc::downgrade(&inner)));
        Ok(AmqpBroker { inner })
    }
}

/// The password of `url` decoded and as written (they differ when it is percent-encoded).
fn secrets_of(url: &str) -> Vec<String> {
    let mut out: Vec<String> = url_password(url).into_iter().collect();
    if let Some((_, rest)) = url.split_once("://")
        && let Some((userinfo, _)) = rest.rsplit_once('@')
        && let Some((_, raw)) = userinfo.split_once(':')
        && !raw.is_empty()
        && !out.iter().any(|s| s == raw)
    {
        out.push(raw.to_owned());
    }
    out.retain(|s| !s.is_empty());
    // The longest first, so that a secret containing another is scrubbed whole.
    out.sort_by_key(|s| std::cmp::Reverse(s.len()));
    out
}

/// The delay a holding queue implements for `delay`: `None` for no delay (under 1 ms);
/// otherwise rounded **up** to a multiple of 100 ms up to 10 s, beyond that to two significant
/// figures (11 s, 12 s, ..., 99 s, 100 s, 110 s, ...), so a package waits at most 100 ms or
/// 10 % longer than asked, and a queue has at most a few hundred holding queues. Delays beyond
/// [`MAX_DELAY`] are cut to it.
pub fn delay_bucket(delay: Duration) -> Option<Duration> {
    bucket_ms(delay).map(Duration::from_millis)
}

fn bucket_ms(delay: Duration) -> Option<u64> {
    let d = delay.min(MAX_DELAY);
    if d < Duration::from_millis(1) {
        return None;
    }
    let ms = u64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(u64::MAX);
    if ms <= 10_000 {
        return Some(ms.div_ceil(100) * 100);
    }
    let mut unit = 1u64;
    while ms / unit >= 100 {
        unit *= 10;
    }
    Some(ms.div_ceil(unit) * unit)
}

/// Every delay `bucket_ms` can give, in ms (what `delete_queue` removes).
fn all_buckets() -> Vec<u64> {
    let max = bucket_ms(MAX_DELAY).unwrap_or(0);
    let mut out: Vec<u64> = (1..=100).map(|i| i * 100).collect();
    let mut unit = 1_000u64;
    'outer: loop {
        for i in 11..=100 {
            let ms = i * unit;
            if ms > max {
                break 'outer;
            }
            out.push(ms);
        }
        unit *= 10;
    }
    out
}

/// A holding queue: its messages expire after `ms` and are dead-lettered (at least once) to
/// `queue` through the default exchange.
fn holding_args(queue: &str, ms: u64) -> FieldTable {
    let mut args = FieldTable::default();
    // Quorum whatever the main queue's type: only quorum queues dead-letter at least once.
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    args.insert(
        "x-message-ttl".into(),
        AMQPValue::LongLongInt(i64::try_from(ms).unwrap_or(i64::MAX)),
    );
    let expires = ms.saturating_add(u64::try_from(HOLDING_MARGIN.as_millis()).unwrap_or(0));
    args.insert(
        "x-expires".into(),
        AMQPValue::LongLongInt(i64::try_from(expires).unwrap_or(i64::MAX)),
    );
    dead_letter_into(&mut args, queue, true);
    args
}

/// Routes what the server dead-letters from a queue into `queue` (through the default
/// exchange); `at_least_once` (quorum queues only) keeps each message until `queue` confirmed
/// it, which needs `reject-publish` (no effect without a length limit).
fn dead_letter_into(args: &mut FieldTable, queue: &str, at_least_once: bool) {
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(queue.into()),
    );
    if at_least_once {
        args.insert(
            "x-dead-letter-strategy".into(),
            AMQPValue::LongString("at-least-once".into()),
        );
        args.insert(
            "x-overflow".into(),
            AMQPValue::LongString("reject-publish".into()),
        );
    }
}

fn random_u64() -> u64 {
    // The tail of a v7 UUID is random.
    let u = uuid::Uuid::now_v7();
    let b = u.as_bytes();
    u64::from_le_bytes([b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]])
}

/// The arguments of `Q` (`main`) or `Q.dead`. `dead_letters_to`: `Q`'s dead-letter route (its
/// dead-letter queue) and, on quorum queues, at-least-once dead-lettering and the configured
/// delivery limit; `None` gives the arguments versions before it declared.
fn queue_args(cfg: &AmqpConfig, main: bool, dead_letters_to: Option<&str>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(cfg.queue_type.as_str().into()),
    );
    if !main {
        return args;
    }
    if let Some(p) = cfg.max_priority {
        args.insert("x-max-priority".into(), AMQPValue::LongInt(i32::from(p)));
    }
    let Some(dead) = dead_letters_to else {
        return args;
    };
    let quorum = cfg.queue_type == QueueType::Quorum;
    dead_letter_into(&mut args, dead, quorum);
    if quorum && let Some(n) = cfg.delivery_limit {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(n)),
        );
    }
    args
}

/// A refusal to declare a queue that exists with other arguments (the server closes the channel).
fn precondition_failed(e: &lapin::Error) -> bool {
    matches!(e.kind(), ErrorKind::ProtocolError(p) if p.get_id() == 406)
}

/// `s` quoted for a POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// `s` as a JSON string.
fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A regular expression matching exactly `s` (RabbitMQ policies match names with PCRE).
fn regex_exact(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 4);
    out.push('^');
    for c in s.chars() {
        if "\\^$.|?*+()[]{}".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('$');
    out
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves consistent-enough bookkeeping; keep going.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn current(&self) -> Option<Arc<Conn>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn err(&self, op: &str, e: &lapin::Error) -> BrokerError {
        let message = self.scrub(&format!("{op}: {e}"));
        match e.kind() {
            ErrorKind::ProtocolError(p) if p.get_id() == 406 => {
                if p.get_message().as_str().contains("x-delivery-limit") {
                    BrokerError::Config {
                        key: "amqp.delivery_limit".into(),
                        message: format!(
                            "{message} (the queue exists with another delivery limit: set \
                             delivery_limit as it was, or delete the queue once it is empty)"
                        ),
                    }
                } else {
                    BrokerError::Config {
                        key: "amqp.queue_type".into(),
                        message: format!(
                            "{message} (the queue exists with other arguments: another \
                             queue_type or max_priority?)"
                        ),
                    }
                }
            }
            ErrorKind::ProtocolError(_) | ErrorKind::ParsingError(_) => BrokerError::Backend {
                broker: NAME,
                message,
            },
            _ => BrokerError::Unreachable {
                broker: NAME,
                endpoint: self.endpoint.clone(),
                message,
            },
        }
    }

    /// Removes the URL's password (decoded or percent-encoded) from a message.
    fn scrub(&self, message: &str) -> String {
        self.secrets
            .iter()
            .fold(message.to_owned(), |m, s| redact(&m, Some(s)))
    }

    fn holding_name(&self, ms: u64) -> String {
        format!("{}.delay.{ms}", self.settings.queue)
    }

    fn routing(&self, t: Target) -> String {
        match t {
            Target::Main => self.settings.queue.clone(),
            Target::Dead => self.dead.clone(),
            Target::Delay(ms) => self.holding_name(ms),
        }
    }

    fn holdings(&self) -> MutexGuard<'_, HashMap<u64, Holding>> {
        self.holding.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The holding queues that may still hold a package this handle published (forgets the
    /// others).
    fn live_holdings(&self) -> Vec<u64> {
        let now = Instant::now();
        let mut h = self.holdings();
        h.retain(|ms, x| now < x.published + Duration::from_millis(*ms) + HOLDING_SLACK);
        let mut v: Vec<u64> = h.keys().copied().collect();
        v.sort_unstable();
        v
    }

    /// Declares the holding queue of `ms` (unless this handle did so recently and `force` is
    /// off; the declaration resets its expiry clock) and returns its message count, if declared.
    async fn ensure_holding(
        &self,
        conn: &Conn,
        ms: u64,
        force: bool,
        publishing: bool,
    ) -> Result<Option<u64>, BrokerError> {
        let now = Instant::now();
        let fresh = self
            .holdings()
            .get(&ms)
            .is_some_and(|h| now.saturating_duration_since(h.declared) < HOLDING_REDECLARE);
        let count = if fresh && !force {
            None
        } else {
            let q = conn
                .admin
                .queue_declare(
                    self.holding_name(ms).as_str().into(),
                    QueueDeclareOptions::durable(),
                    holding_args(&self.settings.queue, ms),
                )
                .await
                .map_err(|e| {
                    conn.broken.store(true, Ordering::SeqCst);
                    self.err("queue.declare (holding queue)", &e)
                })?;
            Some(u64::from(q.message_count()))
        };
        let mut h = self.holdings();
        let e = h.entry(ms).or_insert(Holding {
            declared: now,
            published: now,
        });
        if count.is_some() {
            e.declared = now;
        }
        if publishing {
            e.published = now;
        }
        Ok(count)
    }

    fn unreachable(&self, message: impl Into<String>) -> BrokerError {
        BrokerError::Unreachable {
            broker: NAME,
            endpoint: self.endpoint.clone(),
            message: message.into(),
        }
    }

    /// The current connection, reconnecting if it is gone. Reconnection runs in its own task so
    /// that a dropped caller cannot leave it half done.
    async fn conn(self: &Arc<Self>) -> Result<Arc<Conn>, BrokerError> {
        if let Some(c) = self.current()
            && c.healthy()
        {
            return Ok(c);
        }
        let me = self.clone();
        tokio::spawn(async move {
            let _g = me.reconnect.lock().await;
            if let Some(c) = me.current()
                && c.healthy()
            {
                return Ok(c);
            }
            let timeout = me.cfg.connect_timeout;
            let c = match tokio::time::timeout(timeout, me.open()).await {
                Ok(r) => r?,
                Err(_) => {
                    return Err(BrokerError::Timeout {
                        broker: NAME,
                        operation: "connect",
                        endpoint: me.endpoint.clone(),
                        after: timeout,
                    });
                }
            };
            let c = Arc::new(c);
            let old = me
                .current
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .replace(c.clone());
            me.lock().reset(c.generation);
            me.notify.notify_waiters();
            if let Some(old) = old {
                info!(queue = %me.settings.queue, generation = c.generation,
                      "amqp: reconnected; receipts of the old connection are stale");
                tokio::spawn(async move {
                    let _ = old.connection.close(200, "replaced".into()).await;
                });
            }
            Ok(c)
        })
        .await
        .map_err(|e| self.unreachable(format!("reconnect task failed: {e}")))?
    }

    async fn open(&self) -> Result<Conn, BrokerError> {
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let name = self
            .cfg
            .connection_name
            .clone()
            .unwrap_or_else(|| format!("qcluster {}", self.settings.queue));
        let props = ConnectionProperties::default()
            .with_connection_name(name.into())
            .with_client_property("product".into(), "qcluster broker-amqp".into())
            .with_client_property("version".into(), env!("CARGO_PKG_VERSION").into());
        let connection = Connection::connect(&self.cfg.url, props)
            .await
            .map_err(|e| self.err("connect", &e))?;
        let publish = connection
            .create_channel()
            .await
            .map_err(|e| self.err("open channel", &e))?;
        publish
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(|e| self.err("confirm.select", &e))?;
        let consume = connection
            .create_channel()
            .await
            .map_err(|e| self.err("open channel", &e))?;
        consume
            .basic_qos(self.prefetch, BasicQosOptions { global: false })
            .await
            .map_err(|e| self.err("basic.qos", &e))?;
        let admin = connection
            .create_channel()
            .await
            .map_err(|e| self.err("open channel", &e))?;
        let conn = Conn {
            generation,
            connection,
            publish,
            consume,
            admin,
            broken: AtomicBool::new(false),
        };
        self.declare(&conn).await?;
        if self.legacy.load(Ordering::SeqCst) {
            let limit = if self.cfg.delivery_limit.is_some() {
                "; delivery_limit is not in effect either"
            } else {
                ""
            };
            warn!(
                queue = %self.settings.queue,
                "amqp: queue {q:?} was declared by an older version, without a dead-letter \
                 exchange: whatever RabbitMQ dead-letters from it by itself (a quorum queue's \
                 delivery limit, 20 returns by default on RabbitMQ 4) is DROPPED, not moved to \
                 {dead:?}{limit}. Running on with the queue as it is. Fix it in place, without \
                 moving a message: {fix} (a queue follows one policy: if another one matches \
                 it, add these keys to that one instead). Or, once the queue is empty, delete \
                 it (rabbitmqctl delete_queue -p {vhost} {qq}) and connect again: it is \
                 declared with them. This warning comes back at every connection while the \
                 queue's own arguments lack them (AMQP cannot see policies).",
                q = self.settings.queue,
                dead = self.dead,
                fix = self.policy_fix(),
                vhost = sh_quote(&self.vhost()),
                qq = sh_quote(&self.settings.queue),
            );
        }
        debug!(queue = %self.settings.queue, generation, endpoint = %self.endpoint, "amqp: connected");
        Ok(conn)
    }

    async fn declare_one(&self, conn: &Conn, main: bool) -> Result<u64, BrokerError> {
        self.declare_on(conn, &conn.admin, main).await
    }

    /// Declares (idempotently) and returns the ready count. Counting on the consuming channel
    /// orders the count after this handle's own acks and nacks (the server handles one
    /// channel's methods in order), so a just-failed package is counted. `<queue>` without its
    /// dead-letter arguments ([`Inner::legacy`]) is declared passively: a declaration with
    /// them would close the channel, and one without them could create it that way.
    async fn declare_on(&self, conn: &Conn, ch: &Channel, main: bool) -> Result<u64, BrokerError> {
        let name = if main {
            &self.settings.queue
        } else {
            &self.dead
        };
        let passive = main && self.legacy.load(Ordering::SeqCst);
        let (options, args) = if passive {
            let options = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::durable()
            };
            (options, FieldTable::default())
        } else {
            let args = queue_args(&self.cfg, main, Some(&self.dead));
            (QueueDeclareOptions::durable(), args)
        };
        let q = ch
            .queue_declare(name.as_str().into(), options, args)
            .await
            .map_err(|e| {
                conn.broken.store(true, Ordering::SeqCst);
                self.err("queue.declare", &e)
            })?;
        Ok(u64::from(q.message_count()))
    }

    /// Declares `<queue>` with its dead-letter arguments when it has them or is new. Until one
    /// such declaration succeeded ([`Inner::legacy`]) it is tried on a channel of its own,
    /// because a queue declared by an older version refuses them (PRECONDITION_FAILED), which
    /// closes the channel; such a queue is then declared with the arguments that version used
    /// (which checks its type and priorities) and stays as it is (see the module docs). A
    /// queue deleted and declared again later gets them.
    async fn declare_main(&self, conn: &Conn) -> Result<(), BrokerError> {
        if self.legacy.load(Ordering::SeqCst) {
            let name = self.settings.queue.as_str();
            let probe = conn
                .connection
                .create_channel()
                .await
                .map_err(|e| self.err("open channel", &e))?;
            match probe
                .queue_declare(
                    name.into(),
                    QueueDeclareOptions::durable(),
                    queue_args(&self.cfg, true, Some(&self.dead)),
                )
                .await
            {
                Ok(_) => {
                    let _ = probe.close(200, "declared".into()).await;
                    self.legacy.store(false, Ordering::SeqCst);
                }
                Err(refused) if precondition_failed(&refused) => {
                    // The server closed `probe`. Without its dead-letter arguments, the queue
                    // must match the older declaration; if it does not, the refusal is about
                    // something else (its type, priorities or delivery limit).
                    conn.admin
                        .queue_declare(
                            name.into(),
                            QueueDeclareOptions::durable(),
                            queue_args(&self.cfg, true, None),
                        )
                        .await
                        .map_err(|e| {
                            conn.broken.store(true, Ordering::SeqCst);
                            let e = if precondition_failed(&e) {
                                &refused
                            } else {
                                &e
                            };
                            self.err("queue.declare", e)
                        })?;
                    return Ok(());
                }
                Err(e) => {
                    let _ = probe.close(200, "failed".into()).await;
                    return Err(self.err("queue.declare", &e));
                }
            }
        }
        self.declare_on(conn, &conn.admin, true).await.map(|_| ())
    }

    async fn declare(&self, conn: &Conn) -> Result<(), BrokerError> {
        self.declare_main(conn).await?;
        self.declare_one(conn, false).await?;
        Ok(())
    }

    /// The virtual host of the URL (`/` by default).
    fn vhost(&self) -> String {
        self.cfg
            .url
            .parse::<lapin::uri::AMQPUri>()
            .map(|u| u.vhost)
            .unwrap_or_else(|_| "/".to_owned())
    }

    /// The `rabbitmqctl set_policy` command that gives `<queue>` the dead-letter settings it
    /// lacks when an older version declared it (a policy applies to an existing queue at once,
    /// and its arguments left them unset).
    fn policy_fix(&self) -> String {
        let mut def = format!(
            "{{\"dead-letter-exchange\":\"\",\"dead-letter-routing-key\":{}",
            json_str(&self.dead)
        );
        if self.cfg.queue_type == QueueType::Quorum {
            def.push_str(
                ",\"dead-letter-strategy\":\"at-least-once\",\"overflow\":\"reject-publish\"",
            );
            if let Some(n) = self.cfg.delivery_limit {
                def.push_str(&format!(",\"delivery-limit\":{n}"));
            }
        }
        def.push('}');
        format!(
            "rabbitmqctl set_policy -p {} --apply-to queues --priority 10 {} {} {}",
            sh_quote(&self.vhost()),
            sh_quote(&format!("qcluster-dlx-{}", self.settings.queue)),
            sh_quote(&regex_exact(&self.settings.queue)),
            sh_quote(&def)
        )
    }

    /// Publishes all messages (persistent, mandatory) then awaits every confirm. Holding queues
    /// are declared first (see [`Inner::ensure_holding`]). A message the server returned as
    /// unroutable (its queue was deleted meanwhile) is published once more after declaring its
    /// queue again.
    async fn publish_all(
        &self,
        conn: &Conn,
        items: Vec<(Target, Vec<u8>, BasicProperties)>,
    ) -> Result<(), BrokerError> {
        let mut delays: Vec<u64> = items
            .iter()
            .filter_map(|(t, ..)| match t {
                Target::Delay(ms) => Some(*ms),
                _ => None,
            })
            .collect();
        delays.sort_unstable();
        delays.dedup();
        for ms in delays {
            self.ensure_holding(conn, ms, false, true).await?;
        }
        let mut pending = Vec::with_capacity(items.len());
        for (t, payload, props) in &items {
            pending.push(
                self.publish_one(conn, &self.routing(*t), payload, props.clone())
                    .await?,
            );
        }
        let mut unroutable = Vec::new();
        let mut first_err = None;
        for (i, pc) in pending.into_iter().enumerate() {
            match self.confirmed(conn, pc).await {
                Ok(true) => {}
                Ok(false) => unroutable.push(i),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_err {
            return Err(e);
        }
        if unroutable.is_empty() {
            return Ok(());
        }
        warn!(queue = %self.settings.queue, n = unroutable.len(), "amqp: messages came back unroutable (queue deleted?); declaring again and publishing once more");
        let mut targets: Vec<Target> = Vec::new();
        for &i in &unroutable {
            if !targets.contains(&items[i].0) {
                targets.push(items[i].0);
            }
        }
        for t in targets {
            match t {
                Target::Main | Target::Dead => self.declare(conn).await?,
                Target::Delay(ms) => {
                    self.ensure_holding(conn, ms, true, true).await?;
                }
            }
        }
        let mut pending = Vec::with_capacity(unroutable.len());
        for i in unroutable {
            let (t, payload, props) = &items[i];
            pending.push((
                *t,
                self.publish_one(conn, &self.routing(*t), payload, props.clone())
                    .await?,
            ));
        }
        for (t, pc) in pending {
            if !self.confirmed(conn, pc).await? {
                return Err(BrokerError::Backend {
                    broker: NAME,
                    message: format!(
                        "message to {:?} is unroutable: the queue is gone",
                        self.routing(t)
                    ),
                });
            }
        }
        Ok(())
    }

    async fn publish_one(
        &self,
        conn: &Conn,
        routing: &str,
        payload: &[u8],
        props: BasicProperties,
    ) -> Result<PublisherConfirm, BrokerError> {
        conn.publish
            .basic_publish(
                "".into(),
                routing.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                payload,
                props,
            )
            .await
            .map_err(|e| self.err("basic.publish", &e))
    }

    /// `Ok(true)`: confirmed; `Ok(false)`: returned unroutable.
    async fn confirmed(&self, _conn: &Conn, pc: PublisherConfirm) -> Result<bool, BrokerError> {
        match pc.await {
            Ok(Confirmation::Ack(None)) => Ok(true),
            Ok(Confirmation::Ack(Some(_))) => Ok(false),
            Ok(Confirmation::Nack(_)) => Err(BrokerError::Backend {
                broker: NAME,
                message: "the server refused the message (publisher confirm nack)".into(),
            }),
            Ok(Confirmation::NotRequested) => Err(BrokerError::Backend {
                broker: NAME,
                message: "publisher confirms are off on the publishing channel".into(),
            }),
            Err(e) => Err(self.err("publisher confirm", &e)),
        }
    }

    fn props(&self, m: &Message, id: &str) -> BasicProperties {
        let mut p = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(id.into())
            .with_timestamp(u64::try_from(now_us() / 1_000_000).unwrap_or(0));
        if let Some(max) = self.cfg.max_priority {
            let prio = m.priority.clamp(0, i16::from(max));
            p = p.with_priority(u8::try_from(prio).unwrap_or(0));
        }
        p
    }

    /// Where a message goes: its holding queue when it has a delay.
    fn target(m: &Message) -> Target {
        m.delay
            .and_then(bucket_ms)
            .map_or(Target::Main, Target::Delay)
    }

    fn check_size(&self, m: &Message) -> Result<(), BrokerError> {
        if m.payload.len() > self.limit {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size: m.payload.len(),
                limit: self.limit,
            });
        }
        Ok(())
    }

    fn parse(&self, ack: &AckId) -> Result<Receipt, BrokerError> {
        let bad = || BrokerError::InvalidReceipt {
            broker: NAME,
            receipt: ack.as_str().to_owned(),
        };
        let mut it = ack.as_str().split('.');
        let mut next = || {
            it.next()
                .and_then(|s| u64::from_str_radix(s, 16).ok())
                .ok_or_else(bad)
        };
        let r = Receipt {
            handle: next()?,
            generation: next()?,
            tag: next()?,
        };
        if it.next().is_some() {
            return Err(bad());
        }
        Ok(r)
    }

    /// Takes the lease of a receipt away from the reaper: `None` when it is stale (settled,
    /// given back, another handle's, or of a connection that is gone).
    fn claim(&self, ack: &AckId) -> Result<Option<(Receipt, Lease)>, BrokerError> {
        let r = self.parse(ack)?;
        if r.handle != self.handle {
            warn!(receipt = %ack, "amqp: receipt of another handle ignored (receipts settle on the handle that dequeued)");
            return Ok(None);
        }
        let mut st = self.lock();
        if st.generation != r.generation {
            debug!(receipt = %ack, "amqp: receipt of an earlier connection ignored");
            return Ok(None);
        }
        let Some(lease) = st.held.remove(&r.tag) else {
            debug!(receipt = %ack, "amqp: stale receipt ignored");
            return Ok(None);
        };
        st.release(lease.consumer);
        Ok(Some((r, lease)))
    }

    /// Sends an ack or a requeueing nack for a claimed delivery, on its own connection only.
    async fn send(&self, r: &Receipt, how: Settle) -> Result<(), BrokerError> {
        let Some(conn) = self.current().filter(|c| c.generation == r.generation) else {
            return Ok(()); // the connection is gone: the server requeued it already
        };
        let res = match how {
            Settle::Ack => {
                conn.consume
                    .basic_ack(r.tag, BasicAckOptions { multiple: false })
                    .await
            }
            Settle::Requeue => {
                conn.consume
                    .basic_nack(
                        r.tag,
                        BasicNackOptions {
                            multiple: false,
                            requeue: true,
                        },
                    )
                    .await
            }
        };
        res.map_err(|e| {
            conn.broken.store(true, Ordering::SeqCst);
            self.err("settle", &e)
        })
    }

    async fn settle(&self, ack: &AckId, how: Settle) -> Result<(), BrokerError> {
        match self.claim(ack)? {
            Some((r, _)) => self.send(&r, how).await,
            None => Ok(()),
        }
    }

    /// Finds dead letter `id` with `basic.get` on a channel of its own (at most
    /// [`MAX_DEAD_SCAN`] messages); those passed over stay unacknowledged on that channel until
    /// the search ends, then closing it puts them all back at once. With `requeue`, the one
    /// found is first published to the queue as a fresh package (confirmed); then it is
    /// acknowledged, which removes it from the dead letters. A failure before the acknowledge
    /// leaves it a dead letter (perhaps also requeued: in both places, never in neither).
    async fn settle_dead(
        self: &Arc<Self>,
        id: &MessageId,
        requeue: bool,
    ) -> Result<bool, BrokerError> {
        let conn = self.conn().await?;
        let ch = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| self.err("open channel", &e))?;
        let mut total = None;
        let result = async {
            for _ in 0..MAX_DEAD_SCAN {
                let got = ch
                    .basic_get(self.dead.as_str().into(), BasicGetOptions { no_ack: false })
                    .await
                    .map_err(|e| self.err("basic.get", &e))?;
                let Some(m) = got else {
                    return Ok(false);
                };
                total.get_or_insert(u64::from(m.message_count) + 1);
                let d = m.delivery;
                let mine = d
                    .properties
                    .message_id()
                    .as_ref()
                    .is_some_and(|s| s.as_str() == id.0);
                if !mine {
                    continue; // held by this channel until it closes
                }
                if requeue {
                    let fresh = uuid::Uuid::now_v7().simple().to_string();
                    let props = self.props(&Message::new(Vec::new()), &fresh);
                    self.publish_all(&conn, vec![(Target::Main, d.data, props)])
                        .await?;
                    info!(queue = %self.settings.queue, message_id = %id, new_id = %fresh, "amqp: dead letter requeued");
                }
                ch.basic_ack(d.delivery_tag, BasicAckOptions { multiple: false })
                    .await
                    .map_err(|e| self.err("basic.ack", &e))?;
                return Ok(true);
            }
            Ok(false)
        }
        .await;
        // Closing the channel puts back every dead letter it passed over; wait (briefly) until
        // the server counts them again, as `dead_letters` does.
        let _ = ch.close(200, "searched".into()).await;
        if let Some(total) = total {
            let want = total - u64::from(matches!(result, Ok(true)));
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until
                && self.declare_one(&conn, false).await.unwrap_or(want) < want
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        result
    }

    /// Takes up to `bulk` buffered deliveries and leases them.
    fn take(&self, generation: u64) -> Vec<Delivery> {
        let mut st = self.lock();
        if st.generation != generation {
            return Vec::new();
        }
        let n = st.buffer.len().min(self.settings.bulk);
        let deadline = Instant::now() + self.settings.retry;
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let Some(b) = st.buffer.pop_front() else {
                break;
            };
            // The server says whether it delivered the message before; how often it can't
            // (quorum queues count returns, including this adapter's give-backs).
            let deliveries = if b.redelivered {
                None
            } else {
                match b.prior {
                    None => Some(1),
                    Some(n) => u32::try_from(n).ok().map(|n| n.saturating_add(1)),
                }
            };
            st.held.insert(
                b.tag,
                Lease {
                    deadline,
                    consumer: b.consumer,
                    message_id: b.message_id.clone(),
                    payload: b.payload.clone(),
                    deliveries,
                    priority: b.priority,
                },
            );
            out.push(Delivery {
                ack: AckId::new(format!("{:x}.{:x}.{:x}", self.handle, generation, b.tag)),
                message_id: MessageId(b.message_id),
                payload: b.payload,
                deliveries,
            });
        }
        out
    }

    /// Makes sure a consumer with room for more deliveries runs on this connection.
    async fn ensure_consumer(self: &Arc<Self>, conn: &Arc<Conn>) -> Result<(), BrokerError> {
        if self.consumer_has_room(conn.generation) {
            return Ok(());
        }
        let (me, conn) = (self.clone(), conn.clone());
        tokio::spawn(async move {
            let _g = me.consumer_lock.lock().await;
            if me.consumer_has_room(conn.generation) || !conn.healthy() {
                return Ok(());
            }
            let (old, declared) = {
                let mut st = me.lock();
                (st.active.take(), st.declared)
            };
            if let Some(old) = old {
                // Full: its prefetch is spent on leases this handle holds. A fresh consumer
                // gets its own prefetch; the old deliveries stay settleable on the channel.
                conn.consume
                    .basic_cancel(old.tag.as_str().into(), BasicCancelOptions::default())
                    .await
                    .map_err(|e| {
                        conn.broken.store(true, Ordering::SeqCst);
                        me.err("basic.cancel", &e)
                    })?;
            }
            if !declared {
                me.declare(&conn).await?;
            }
            let seq = me.consumer_seq.fetch_add(1, Ordering::SeqCst) + 1;
            let tag = format!("qcluster-{:x}-{}-{seq}", me.handle, conn.generation);
            let consumer = conn
                .consume
                .basic_consume(
                    me.settings.queue.as_str().into(),
                    tag.as_str().into(),
                    BasicConsumeOptions::default(),
                    FieldTable::default(),
                )
                .await
                .map_err(|e| {
                    conn.broken.store(true, Ordering::SeqCst);
                    me.err("basic.consume", &e)
                })?;
            {
                let mut st = me.lock();
                if st.generation != conn.generation {
                    return Ok(());
                }
                st.declared = true;
                st.active = Some(Active { seq, tag });
                st.outstanding.entry(seq).or_insert(0);
            }
            tokio::spawn(pump(Arc::downgrade(&me), conn.clone(), seq, consumer));
            Ok(())
        })
        .await
        .map_err(|e| self.unreachable(format!("consumer task failed: {e}")))?
    }

    fn consumer_has_room(&self, generation: u64) -> bool {
        let st = self.lock();
        st.generation == generation
            && st.active.as_ref().is_some_and(|a| {
                st.outstanding.get(&a.seq).copied().unwrap_or(0) < usize::from(self.prefetch)
            })
    }

    /// Stops consuming and gives back what is buffered (used when idle and by delete_queue).
    async fn stop_consuming(&self, conn: &Conn) {
        let (active, buffered) = {
            let mut st = self.lock();
            if st.generation != conn.generation {
                return;
            }
            let active = st.active.take();
            let buffered: Vec<Buffered> = st.buffer.drain(..).collect();
            for b in &buffered {
                st.release(b.consumer);
            }
            (active, buffered)
        };
        if let Some(a) = active {
            debug!(queue = %self.settings.queue, tag = %a.tag, "amqp: idle; cancelling the consumer");
            if let Err(e) = conn
                .consume
                .basic_cancel(a.tag.as_str().into(), BasicCancelOptions::default())
                .await
            {
                conn.broken.store(true, Ordering::SeqCst);
                warn!(error = %self.err("basic.cancel", &e), "amqp: cancel failed");
            }
        }
        for b in buffered {
            let r = Receipt {
                handle: self.handle,
                generation: conn.generation,
                tag: b.tag,
            };
            if let Err(e) = self.send(&r, Settle::Requeue).await {
                warn!(error = %e, "amqp: could not give back a buffered delivery (the server requeues it when the channel closes)");
            }
        }
    }
}

/// Moves deliveries of one consumer into the handle's buffer.
async fn pump(inner: Weak<Inner>, conn: Arc<Conn>, seq: u64, mut consumer: lapin::Consumer) {
    while let Some(item) = consumer.next().await {
        let Some(me) = inner.upgrade() else { return };
        match item {
            Ok(d) => {
                let message_id = d
                    .properties
                    .message_id()
                    .as_ref()
                    .map(|s| s.as_str().to_owned())
                    .unwrap_or_else(|| format!("tag-{}", d.delivery_tag));
                {
                    let mut st = me.lock();
                    if st.generation != conn.generation {
                        return;
                    }
                    *st.outstanding.entry(seq).or_insert(0) += 1;
                    st.buffer.push_back(Buffered {
                        tag: d.delivery_tag,
                        consumer: seq,
                        message_id,
                        payload: d.data,
                        redelivered: d.redelivered,
                        prior: header_int(d.properties.headers().as_ref(), PRIOR_HEADER),
                        priority: *d.properties.priority(),
                        arrived: Instant::now(),
                    });
                }
                me.notify.notify_waiters();
            }
            Err(e) => {
                warn!(queue = %me.settings.queue, error = %me.err("consume", &e), "amqp: consumer failed");
                conn.broken.store(true, Ordering::SeqCst);
                me.notify.notify_waiters();
                break;
            }
        }
    }
    if let Some(me) = inner.upgrade() {
        let mut st = me.lock();
        if st.generation == conn.generation && st.active.as_ref().is_some_and(|a| a.seq == seq) {
            // The server cancelled it (queue deleted) or the channel closed.
            debug!(queue = %me.settings.queue, "amqp: consumer ended by the server");
            st.active = None;
            st.declared = false;
        }
        drop(st);
        me.notify.notify_waiters();
    }
}

/// Gives back deliveries whose lease ran out and, on an idle handle, cancels the consumer and
/// gives back what it buffered. Ends when the broker is dropped.
async fn reaper(inner: Weak<Inner>) {
    let tick = {
        let Some(me) = inner.upgrade() else { return };
        (me.settings.retry.min(me.hold) / 8)
            .clamp(Duration::from_millis(10), Duration::from_millis(250))
    };
    loop {
        tokio::time::sleep(tick).await;
        let Some(me) = inner.upgrade() else { return };
        let Some(conn) = me.current() else { continue };
        let now = Instant::now();
        let (expired, idle) = {
            let mut st = me.lock();
            if st.generation != conn.generation {
                continue;
            }
            let tags: Vec<u64> = st
                .held
                .iter()
                .filter(|(_, l)| l.deadline <= now)
                .map(|(t, _)| *t)
                .collect();
            for t in &tags {
                if let Some(l) = st.held.remove(t) {
                    st.release(l.consumer);
                }
            }
            let idle = st.waiting == 0
                && now.saturating_duration_since(st.last_dequeue) >= me.hold
                && (st.active.is_some()
                    || st
                        .buffer
                        .front()
                        .is_some_and(|b| now.saturating_duration_since(b.arrived) >= me.hold));
            (tags, idle)
        };
        for tag in expired {
            debug!(queue = %me.settings.queue, tag, "amqp: lease ran out; giving the message back");
            let r = Receipt {
                handle: me.handle,
                generation: conn.generation,
                tag,
            };
            if let Err(e) = me.send(&r, Settle::Requeue).await {
                warn!(error = %e, "amqp: could not give back an expired delivery (the server requeues it when the channel closes)");
            }
        }
        if idle && conn.healthy() {
            me.stop_consuming(&conn).await;
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let conn = self
            .current
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let (Some(conn), Ok(rt)) = (conn, tokio::runtime::Handle::try_current()) {
            rt.spawn(async move {
                let _ = conn.connection.close(200, "broker dropped".into()).await;
            });
        }
    }
}

/// Decrements the waiting count when a `dequeue` ends or is dropped.
struct Waiting<'a>(&'a Inner);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.waiting = st.waiting.saturating_sub(1);
        st.last_dequeue = Instant::now();
    }
}

fn header_str(h: Option<&FieldTable>, key: &str) -> Option<String> {
    match h?.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

fn header_int(h: Option<&FieldTable>, key: &str) -> Option<i64> {
    match h?.inner().get(key)? {
        AMQPValue::LongLongInt(i) => Some(*i),
        AMQPValue::LongInt(i) => Some(i64::from(*i)),
        AMQPValue::LongUInt(i) => Some(i64::from(*i)),
        AMQPValue::ShortInt(i) => Some(i64::from(*i)),
        _ => None,
    }
}

/// A listed dead letter. Ours carry the reason and the time in headers; one RabbitMQ
/// dead-lettered by itself (delivery limit, a reject without requeue) has the server's `x-death`
/// header instead (newest event first), else only `x-first-death-*`.
fn dead_letter_of(props: &BasicProperties, payload: Vec<u8>) -> DeadLetter {
    let h = props.headers().as_ref();
    let (reason, dead_at_us) = match header_str(h, REASON_HEADER) {
        Some(reason) => (reason, header_int(h, DEAD_AT_HEADER)),
        None => {
            let (reason, at) = server_death(h);
            let sent = props
                .timestamp()
                .and_then(|s| i64::try_from(s).ok())
                .map(|s| s.saturating_mul(1_000_000));
            (reason, at.or(sent))
        }
    };
    DeadLetter {
        message_id: MessageId(
            props
                .message_id()
                .as_ref()
                .map(|s| s.as_str().to_owned())
                .unwrap_or_default(),
        ),
        reason,
        deliveries: header_int(h, DELIVERIES_HEADER).and_then(|n| u32::try_from(n).ok()),
        dead_at_us: dead_at_us.unwrap_or(0),
        payload,
    }
}

/// Why and when (µs) RabbitMQ dead-lettered a message, from its headers.
fn server_death(h: Option<&FieldTable>) -> (String, Option<i64>) {
    let newest = match h.and_then(|h| h.inner().get("x-death")) {
        Some(AMQPValue::FieldArray(a)) => a.as_slice().iter().find_map(|v| match v {
            AMQPValue::FieldTable(t) => Some(t),
            _ => None,
        }),
        _ => None,
    };
    let (reason, queue, at) = match newest {
        Some(t) => (
            header_str(Some(t), "reason"),
            header_str(Some(t), "queue"),
            match t.inner().get("time") {
                Some(AMQPValue::Timestamp(s)) => {
                    i64::try_from(*s).ok().map(|s| s.saturating_mul(1_000_000))
                }
                _ => None,
            },
        ),
        None => (
            header_str(h, "x-first-death-reason"),
            header_str(h, "x-first-death-queue"),
            None,
        ),
    };
    let text = match (reason, queue) {
        (Some(r), Some(q)) => format!("RabbitMQ dead-lettered it: {r} (queue {q})"),
        (Some(r), None) => format!("RabbitMQ dead-lettered it: {r}"),
        (None, _) => "dead-lettered by RabbitMQ".to_owned(),
    };
    (text, at)
}

#[async_trait]
impl Broker for AmqpBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let i = &self.inner;
        i.check_size(&message)?;
        let conn = i.conn().await?;
        let id = uuid::Uuid::now_v7().simple().to_string();
        let props = i.props(&message, &id);
        let target = Inner::target(&message);
        i.publish_all(&conn, vec![(target, message.payload, props)])
            .await?;
        Ok(MessageId(id))
    }

    /// Publishes every message, then awaits every confirm. On an error some of the batch may be
    /// stored (those the server confirmed before it); nothing is stored when a package is too
    /// large (checked before publishing).
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        let i = &self.inner;
        for m in &messages {
            i.check_size(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let conn = i.conn().await?;
        let mut ids = Vec::with_capacity(messages.len());
        let mut items = Vec::with_capacity(messages.len());
        for m in messages {
            let id = uuid::Uuid::now_v7().simple().to_string();
            let props = i.props(&m, &id);
            items.push((Inner::target(&m), m.payload, props));
            ids.push(MessageId(id));
        }
        i.publish_all(&conn, items).await?;
        Ok(ids)
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let deadline = Instant::now() + i.settings.wait;
        i.lock().waiting += 1;
        let _waiting = Waiting(i);
        let mut linger: Option<Instant> = None;
        loop {
            let conn = i.conn().await?;
            let notified = i.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // A batch is arriving: give it a moment to fill up to `bulk`.
            let buffered = i.lock().buffer.len();
            if buffered > 0 && buffered < i.settings.bulk && i.consumer_has_room(conn.generation) {
                let until = linger.get_or_insert_with(|| (Instant::now() + LINGER).min(deadline));
                let now = Instant::now();
                if now < *until {
                    let _ = tokio::time::timeout(*until - now, notified).await;
                    continue;
                }
            }
            let got = i.take(conn.generation);
            if !got.is_empty() {
                return Ok(got);
            }
            i.ensure_consumer(&conn).await?;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            // Wakes on a delivery, and at least every 250 ms to notice a lost connection.
            let _ =
                tokio::time::timeout((deadline - now).min(Duration::from_millis(250)), notified)
                    .await;
            if !conn.healthy() {
                // The connection broke while waiting: end now (empty; what this handle had
                // buffered goes back to the queue with the channel); the next call reconnects.
                return Ok(Vec::new());
            }
        }
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.inner.settle(ack, Settle::Ack).await
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.inner.settle(ack, Settle::Requeue).await
    }

    /// Publishes a copy of the package (confirmed) to the holding queue of `delay` (rounded up,
    /// see [`delay_bucket`]), then acknowledges the delivery; the copy comes back to the queue
    /// when its delay has passed. If the copy fails, the delivery is given back at once and
    /// the error returned; a crash between the copy and the ack leaves the package twice
    /// (never lost). A delay under 1 ms is [`Broker::fail`].
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let i = &self.inner;
        let Some(ms) = bucket_ms(delay) else {
            return self.fail(ack).await;
        };
        let Some((r, lease)) = i.claim(ack)? else {
            return Ok(());
        };
        let Some(conn) = i.current().filter(|c| c.generation == r.generation) else {
            return Ok(()); // its connection is gone: the server requeued it
        };
        let mut headers = FieldTable::default();
        headers.insert(
            PRIOR_HEADER.into(),
            AMQPValue::LongLongInt(lease.deliveries.map_or(-1, i64::from)),
        );
        let mut props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(lease.message_id.as_str().into())
            .with_timestamp(u64::try_from(now_us() / 1_000_000).unwrap_or(0))
            .with_headers(headers);
        if let Some(p) = lease.priority {
            props = props.with_priority(p);
        }
        if let Err(e) = i
            .publish_all(&conn, vec![(Target::Delay(ms), lease.payload, props)])
            .await
        {
            warn!(error = %e, "amqp: delayed copy failed; giving the message back now");
            let _ = i.send(&r, Settle::Requeue).await;
            return Err(e);
        }
        i.send(&r, Settle::Ack).await
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.inner.settle(ack, Settle::Ack).await
    }

    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let i = &self.inner;
        let r = i.parse(ack)?;
        if r.handle != i.handle {
            return Ok(false);
        }
        let mut st = i.lock();
        if st.generation != r.generation {
            return Ok(false);
        }
        match st.held.get_mut(&r.tag) {
            Some(l) => {
                l.deadline = Instant::now() + by.min(broker_core::MAX_RETRY);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Publishes a copy to `<queue>.dead` (confirmed) with the reason, then acknowledges the
    /// delivery. If the copy fails, the delivery is given back to the queue and the error
    /// returned: the package is never lost (it may, at worst, exist twice).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let i = &self.inner;
        let Some((r, lease)) = i.claim(ack)? else {
            return Ok(());
        };
        let Some(conn) = i.current().filter(|c| c.generation == r.generation) else {
            return Ok(()); // its connection is gone: the server requeued it
        };
        let mut headers = FieldTable::default();
        headers.insert(REASON_HEADER.into(), AMQPValue::LongString(reason.into()));
        headers.insert(DEAD_AT_HEADER.into(), AMQPValue::LongLongInt(now_us()));
        if let Some(n) = lease.deliveries {
            headers.insert(
                DELIVERIES_HEADER.into(),
                AMQPValue::LongLongInt(i64::from(n)),
            );
        }
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(lease.message_id.as_str().into())
            .with_headers(headers);
        if let Err(e) = i
            .publish_all(&conn, vec![(Target::Dead, lease.payload, props)])
            .await
        {
            warn!(error = %e, "amqp: dead-letter copy failed; giving the message back");
            let _ = i.send(&r, Settle::Requeue).await;
            return Err(e);
        }
        i.send(&r, Settle::Ack).await
    }

    /// Reads up to `limit` dead letters with `basic.get` on a channel of its own, then closes
    /// that channel, which puts them all back: listing never consumes them. Dead letters that
    /// another listing holds at that moment are not seen; on quorum queues the order after a
    /// listing may change.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let i = &self.inner;
        let conn = i.conn().await?;
        let ch = conn
            .connection
            .create_channel()
            .await
            .map_err(|e| i.err("open channel", &e))?;
        let mut out = Vec::new();
        let mut result = Ok(());
        let mut total = None;
        while out.len() < limit {
            match ch
                .basic_get(i.dead.as_str().into(), BasicGetOptions { no_ack: false })
                .await
            {
                Ok(Some(m)) => {
                    total.get_or_insert(u64::from(m.message_count) + 1);
                    let d = m.delivery;
                    out.push(dead_letter_of(&d.properties, d.data));
                }
                Ok(None) => break,
                Err(e) => {
                    result = Err(i.err("basic.get", &e));
                    break;
                }
            }
        }
        // Closing the channel requeues every message it got; wait (briefly) until the server
        // counts them again, so a dead_letter_size right after a listing is not short.
        let _ = ch.close(200, "listed".into()).await;
        if let Some(total) = total {
            let until = Instant::now() + Duration::from_secs(2);
            while Instant::now() < until
                && i.declare_one(&conn, false).await.unwrap_or(total) < total
            {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        result.map(|()| out)
    }

    /// Scans `<queue>.dead` for `id` (see the module docs), publishes the package to
    /// `<queue>` as a fresh message (a new `message_id`, confirmed) and only then acknowledges
    /// the dead letter.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        self.inner.settle_dead(id, true).await
    }

    /// Scans `<queue>.dead` for `id` (see the module docs) and acknowledges it.
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        self.inner.settle_dead(id, false).await
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let i = &self.inner;
        let conn = i.conn().await?;
        i.declare_one(&conn, false).await.map(Some)
    }

    /// `queue.purge` of the waiting messages, plus the ones this handle had buffered but not
    /// handed out (acknowledged), plus the delayed ones in the holding queues this handle
    /// published to (delayed packages count as waiting). Leased ones stay with their holders;
    /// delayed packages that other handles published are not seen (AMQP cannot list queues)
    /// and arrive when their delay ends.
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let conn = i.conn().await?;
        let mut delayed = 0u64;
        for ms in i.live_holdings() {
            // Declared first: a purge of a queue that expired meanwhile would close the channel.
            i.ensure_holding(&conn, ms, true, false).await?;
            delayed += u64::from(
                conn.admin
                    .queue_purge(
                        i.holding_name(ms).as_str().into(),
                        QueuePurgeOptions::default(),
                    )
                    .await
                    .map_err(|e| {
                        conn.broken.store(true, Ordering::SeqCst);
                        i.err("queue.purge (holding queue)", &e)
                    })?,
            );
        }
        let n = conn
            .consume
            .queue_purge(
                i.settings.queue.as_str().into(),
                QueuePurgeOptions::default(),
            )
            .await
            .map_err(|e| {
                conn.broken.store(true, Ordering::SeqCst);
                i.err("queue.purge", &e)
            })?;
        let buffered: Vec<Buffered> = {
            let mut st = i.lock();
            if st.generation != conn.generation {
                Vec::new()
            } else {
                let b: Vec<Buffered> = st.buffer.drain(..).collect();
                for x in &b {
                    st.release(x.consumer);
                }
                b
            }
        };
        let extra = buffered.len() as u64;
        for b in buffered {
            let r = Receipt {
                handle: i.handle,
                generation: conn.generation,
                tag: b.tag,
            };
            i.send(&r, Settle::Ack).await?;
        }
        Ok(u64::from(n) + extra + delayed)
    }

    /// Deletes `<queue>` and `<queue>.dead` with everything in them, and every holding queue
    /// `<queue>.delay.<ms>` a delay can round to (whoever published to it; deleting a missing
    /// queue is no error), then declares the two again (empty) so this handle stays usable. Other handles' consumers are cancelled by the server
    /// and start again on their next `dequeue`.
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let conn = i.conn().await?;
        {
            let _g = i.consumer_lock.lock().await;
            i.stop_consuming(&conn).await;
            let mut st = i.lock();
            if st.generation == conn.generation {
                st.held.clear();
                st.outstanding.clear();
            }
        }
        for q in [&i.settings.queue, &i.dead] {
            conn.admin
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| {
                    conn.broken.store(true, Ordering::SeqCst);
                    i.err("queue.delete", &e)
                })?;
        }
        for ms in all_buckets() {
            conn.admin
                .queue_delete(
                    i.holding_name(ms).as_str().into(),
                    QueueDeleteOptions::default(),
                )
                .await
                .map_err(|e| {
                    conn.broken.store(true, Ordering::SeqCst);
                    i.err("queue.delete (holding queue)", &e)
                })?;
        }
        i.holdings().clear();
        i.declare(&conn).await
    }

    /// Ready messages on the server (`message_count` of a declare), plus the deliveries this
    /// handle received but no `dequeue` took yet (waiting, from the cluster's point of view),
    /// plus the delayed packages in the holding queues this handle published to within their
    /// delay (+10 s). Delayed packages that other handles published are not counted: AMQP
    /// cannot list queues (the management API could).
    ///
    /// The server's count trails its own bookkeeping by a moment (a requeue or a delivery in
    /// flight; quorum queues apply them through Raft), so the sum is read until two reads a few
    /// milliseconds apart agree (at most five reads).
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let i = &self.inner;
        let conn = i.conn().await?;
        let mut last = None;
        for _ in 0..5 {
            let ready = i.declare_on(&conn, &conn.consume, true).await?;
            // A delivery pushed before the answer is on the wire ahead of it; let the consumer
            // task move it into the buffer before counting.
            tokio::time::sleep(Duration::from_millis(3)).await;
            let buffered = {
                let st = i.lock();
                if st.generation == conn.generation {
                    st.buffer.len() as u64
                } else {
                    0
                }
            };
            let mut delayed = 0;
            for ms in i.live_holdings() {
                delayed += i.ensure_holding(&conn, ms, true, false).await?.unwrap_or(0);
            }
            let total = ready + buffered + delayed;
            if last == Some(total) {
                break;
            }
            last = Some(total);
        }
        Ok(last.unwrap_or(0))
    }

    /// What this handle holds: its leases (deliveries handed out and not settled). Other
    /// handles' (and other processes') in-flight messages are not visible without the
    /// management API.
    /// `None`: AMQP does not tell how many deliveries other consumers hold unacknowledged (the
    /// management API would); a count of this handle's alone would read as the queue's in
    /// `qcluster info`. [`AmqpBroker::held`] gives this handle's.
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        Ok(None)
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let after = i.cfg.connect_timeout;
        match tokio::time::timeout(after, async {
            let conn = i.conn().await?;
            i.declare_one(&conn, true).await
        })
        .await
        {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BrokerError::Timeout {
                broker: NAME,
                operation: "ping",
                endpoint: i.endpoint.clone(),
                after,
            }),
        }
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let server = match i.server.get() {
            Some(s) => s.clone(),
            None => {
                let s = server_version(&i.cfg.url, i.cfg.connect_timeout).await;
                let _ = i.server.set(s.clone());
                s
            }
        };
        let mut details = BTreeMap::new();
        details.insert("queue_type".into(), i.cfg.queue_type.as_str().into());
        details.insert("dead_letter_queue".into(), i.dead.clone());
        details.insert(
            "delay_queues".into(),
            format!("{}.delay.<ms> (quorum)", i.settings.queue),
        );
        details.insert("prefetch".into(), i.prefetch.to_string());
        details.insert("max_message_size".into(), i.limit.to_string());
        if let Some(p) = i.cfg.max_priority {
            details.insert("max_priority".into(), p.to_string());
        }
        details.insert(
            "delivery_limit".into(),
            i.cfg
                .delivery_limit
                .map_or_else(|| "server default".to_owned(), |n| n.to_string()),
        );
        if i.legacy.load(Ordering::SeqCst) {
            details.insert(
                "dead_letter_exchange".into(),
                "none: the queue was declared by an older version; what RabbitMQ dead-letters \
                 from it is dropped"
                    .into(),
            );
            details.insert("dead_letter_fix".into(), i.policy_fix());
        } else {
            details.insert("dead_letter_exchange".into(), format!("\"\" -> {}", i.dead));
        }
        if let Some(c) = i.current() {
            details.insert("connected".into(), c.healthy().to_string());
        }
        Ok(BrokerInfo {
            broker: NAME.into(),
            server,
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.settings.retry.as_secs_f64()),
            notes: vec![
                format!(
                    "retry is a lease this adapter enforces: a delivery not settled within {:?} \
                     of being handed out is given back (basic.nack, requeue) for another \
                     consumer; a late settle with its receipt is ignored, never sent to the \
                     server",
                    i.settings.retry
                ),
                "receipts settle only on the handle that dequeued them (AMQP binds a delivery \
                 to its channel); if the connection breaks the server requeues what it held and \
                 old receipts are ignored"
                    .into(),
                format!(
                    "extend is bounded by the server's consumer_timeout (default {} min), after \
                     which RabbitMQ closes the channel and requeues the message",
                    SERVER_CONSUMER_TIMEOUT.as_secs() / 60
                ),
                "enqueue returns after the publisher confirm; messages are persistent in a \
                 durable queue"
                    .into(),
                "what RabbitMQ dead-letters by itself (a quorum queue's delivery limit, a \
                 reject) goes to <queue>.dead too (at least once on quorum queues), listed with \
                 the reason from its x-death header"
                    .into(),
                "requeue_dead and delete_dead scan <queue>.dead with basic.get (one round trip \
                 per dead letter before the one wanted; those passed over are put back when the \
                 search ends)"
                    .into(),
                "in-flight packages are not counted: AMQP does not tell how many deliveries \
                 consumers hold unacknowledged (the management API would); queue_size counts \
                 ready messages plus what this handle prefetched and did not hand out yet"
                    .into(),
                "delays (Message::delay, fail_after) wait in holding queues <queue>.delay.<ms> \
                 (quorum, x-message-ttl, dead-lettered back at least once), rounded up to 100 ms \
                 under 10 s and to two significant figures beyond (at most 10 % late), at most \
                 40 days; fail_after publishes the copy (confirmed) before acknowledging, so a \
                 crash in between delivers the package twice, never loses it"
                    .into(),
                "queue_size and purge_queue see the delayed packages this handle published, not \
                 other handles' (AMQP cannot list queues); delete_queue removes every holding \
                 queue"
                    .into(),
            ],
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        let i = &self.inner;
        Capabilities {
            receipts: true,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: i.limit,
            text_only: false,
            dead_letter: true,
            priority: i.cfg.max_priority.is_some(),
            delay: true,
            stats: false,
            extend: true,
        }
    }
}

/// Reads the server's product and version from its `connection.start` (lapin does not expose
/// the server properties): a short TCP exchange of its own, plain `amqp://` only.
async fn server_version(url: &str, timeout: Duration) -> Option<String> {
    let uri: lapin::uri::AMQPUri = url.parse().ok()?;
    if uri.scheme != lapin::uri::AMQPScheme::AMQP {
        return None;
    }
    let addr = format!("{}:{}", uri.authority.host, uri.authority.port);
    let probe = async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
        s.write_all(b"AMQP\x00\x00\x09\x01").await.ok()?;
        let mut buf = vec![0u8; 7];
        s.read_exact(&mut buf).await.ok()?;
        let size = u32::from_be_bytes([buf[3], buf[4], buf[5], buf[6]]) as usize;
        if size > 64 * 1024 {
            return None;
        }
        let mut frame = vec![0u8; size];
        s.read_exact(&mut frame).await.ok()?;
        let find = |key: &[u8]| -> Option<String> {
            let pos = frame.windows(key.len()).position(|w| w == key)? + key.len();
            let len = u32::from_be_bytes(frame.get(pos..pos + 4)?.try_into().ok()?) as usize;
            let v = frame.get(pos + 4..pos + 4 + len)?;
            Some(String::from_utf8_lossy(v).into_owned())
        };
        let product = find(b"\x07productS").unwrap_or_else(|| "AMQP server".into());
        let version = find(b"\x07versionS")?;
        Some(format!("{product} {version}"))
    };
    tokio::time::timeout(timeout, probe).await.ok().flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_round_up_to_few_buckets() {
        let ms = |m| bucket_ms(Duration::from_millis(m));
        assert_eq!(bucket_ms(Duration::from_micros(999)), None);
        assert_eq!(ms(1), Some(100));
        assert_eq!(ms(100), Some(100));
        assert_eq!(ms(101), Some(200));
        assert_eq!(ms(1500), Some(1500));
        assert_eq!(ms(10_000), Some(10_000));
        assert_eq!(ms(10_001), Some(11_000));
        assert_eq!(ms(123_456), Some(130_000));
        assert_eq!(
            bucket_ms(Duration::from_secs(1 << 40)),
            bucket_ms(MAX_DELAY)
        );
        let all = all_buckets();
        assert!(all.len() < 700, "{}", all.len());
        assert!(*all.last().unwrap() < u64::from(u32::MAX) - 60_000);
        // Every delay lands on a listed bucket, never earlier, at most 10 % (or 100 ms) later.
        for m in [
            1u64,
            99,
            5_050,
            9_999,
            10_500,
            99_999,
            100_001,
            3_000_000_007,
        ] {
            let b = ms(m).unwrap();
            assert!(all.contains(&b), "{m} -> {b}");
            assert!(b >= m && (b - m <= 100 || b - m <= m / 10), "{m} -> {b}");
        }
    }

    #[test]
    fn both_forms_of_the_password_are_scrubbed() {
        let s = secrets_of("amqp://bob:p%40ss%2Fw@h:5672/%2f");
        assert!(s.contains(&"p@ss/w".to_owned()) && s.contains(&"p%40ss%2Fw".to_owned()));
        assert_eq!(
            secrets_of("amqp://bob:plain@h/%2f"),
            vec!["plain".to_owned()]
        );
        assert!(secrets_of("amqp://h/%2f").is_empty());
    }

    #[test]
    fn server_dead_letters_are_described_from_their_headers() {
        let entry = |reason: &str, queue: &str, time: u64| {
            let mut t = FieldTable::default();
            t.insert("reason".into(), AMQPValue::LongString(reason.into()));
            t.insert("queue".into(), AMQPValue::LongString(queue.into()));
            t.insert("time".into(), AMQPValue::Timestamp(time));
            t.insert("count".into(), AMQPValue::LongLongInt(1));
            AMQPValue::FieldTable(t)
        };
        // Newest first: the delivery limit, not the holding queue's expiry before it.
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![
                    entry("delivery_limit", "jobs", 1_700_000_100),
                    entry("expired", "jobs.delay.1000", 1_700_000_000),
                ]
                .into(),
            ),
        );
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("expired".into()),
        );
        let props = BasicProperties::default()
            .with_message_id("m1".into())
            .with_timestamp(1_600_000_000)
            .with_headers(h);
        let d = dead_letter_of(&props, b"p".to_vec());
        assert_eq!(
            d.reason,
            "RabbitMQ dead-lettered it: delivery_limit (queue jobs)"
        );
        assert_eq!(d.dead_at_us, 1_700_000_100_000_000);
        assert_eq!(d.message_id.0, "m1");
        assert_eq!(d.deliveries, None);
        // Without x-death: x-first-death-*, then the message's own timestamp.
        let mut h = FieldTable::default();
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString("rejected".into()),
        );
        let props = BasicProperties::default()
            .with_timestamp(1_600_000_000)
            .with_headers(h);
        let d = dead_letter_of(&props, Vec::new());
        assert_eq!(d.reason, "RabbitMQ dead-lettered it: rejected");
        assert_eq!(d.dead_at_us, 1_600_000_000_000_000);
        let d = dead_letter_of(&BasicProperties::default(), Vec::new());
        assert_eq!(
            (d.reason.as_str(), d.dead_at_us),
            ("dead-lettered by RabbitMQ", 0)
        );
        // Ours keep their own reason, time and count.
        let mut h = FieldTable::default();
        h.insert(REASON_HEADER.into(), AMQPValue::LongString("bad".into()));
        h.insert(DEAD_AT_HEADER.into(), AMQPValue::LongLongInt(42));
        h.insert(DELIVERIES_HEADER.into(), AMQPValue::LongLongInt(3));
        let d = dead_letter_of(&BasicProperties::default().with_headers(h), Vec::new());
        assert_eq!(
            (d.reason.as_str(), d.dead_at_us, d.deliveries),
            ("bad", 42, Some(3))
        );
    }

    #[test]
    fn the_advised_policy_command_quotes_what_it_names() {
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(json_str("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
        assert_eq!(regex_exact("a.b(c)"), "^a\\.b\\(c\\)$");
        let args = queue_args(
            &AmqpConfig {
                delivery_limit: Some(4),
                ..AmqpConfig::default()
            },
            true,
            Some("q.dead"),
        );
        let keys: Vec<&str> = args.inner().keys().map(|k| k.as_str()).collect();
        assert_eq!(
            keys,
            [
                "x-dead-letter-exchange",
                "x-dead-letter-routing-key",
                "x-dead-letter-strategy",
                "x-delivery-limit",
                "x-overflow",
                "x-queue-type"
            ]
        );
        let classic = AmqpConfig {
            queue_type: QueueType::Classic,
            ..AmqpConfig::default()
        };
        assert_eq!(queue_args(&classic, true, Some("q.dead")).inner().len(), 3);
        assert_eq!(queue_args(&classic, true, None).inner().len(), 1);
        assert_eq!(queue_args(&classic, false, Some("q.dead")).inner().len(), 1);
    }

    #[test]
    fn config_defaults_and_masking() {
        let c: AmqpConfig = serde_json::from_str(
            r#"{"url":"amqp://bob:s3cret-pw@h:5672/%2f","queue_type":"classic","max_priority":5}"#,
        )
        .unwrap();
        assert_eq!(c.queue_type, QueueType::Classic);
        assert!(!format!("{c:?}").contains("s3cret-pw"));
        assert!(c.validate().is_ok());
        let bad: Result<AmqpConfig, _> = serde_json::from_str(r#"{"urll":"x"}"#);
        assert!(bad.unwrap_err().to_string().contains("url"));
        let d = AmqpConfig::default();
        assert_eq!(d.queue_type, QueueType::Quorum);
        assert_eq!(d.url, "amqp://guest:guest@127.0.0.1:5672/%2f");
        let q = AmqpConfig {
            max_priority: Some(3),
            ..AmqpConfig::default()
        };
        assert!(
            q.validate()
                .unwrap_err()
                .to_string()
                .contains("max_priority")
        );
        for (queue_type, limit) in [(QueueType::Classic, 3), (QueueType::Quorum, 0)] {
            let c = AmqpConfig {
                queue_type,
                delivery_limit: Some(limit),
                ..AmqpConfig::default()
            };
            assert!(
                matches!(c.validate(), Err(BrokerError::Config { key, .. }) if key == "amqp.delivery_limit"),
                "{queue_type:?} {limit}"
            );
        }
        let c: AmqpConfig = serde_json::from_str(r#"{"delivery_limit":20}"#).unwrap();
        assert_eq!(c.delivery_limit, Some(20));
        assert!(c.validate().is_ok());
    }
}
