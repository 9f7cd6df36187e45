//! The [`Broker`] trait and the values that cross it.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::BrokerError;

/// The broker's own id for a stored message (a row id, a stream id, an SQS message id...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct MessageId(pub String);

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A receipt for one delivery: what [`Broker::acknowledge`], [`Broker::fail`] and
/// [`Broker::delete`] take. Opaque to callers; each adapter defines its content.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AckId(String);

impl AckId {
    /// Wraps an adapter-defined receipt.
    pub fn new(raw: impl Into<String>) -> Self {
        Self(raw.into())
    }

    /// The receipt as the adapter wrote it.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AckId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A package on its way into a broker: the encoded envelope plus routing hints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// The encoded, signed envelope (see [`crate::Codec`]). Brokers store it byte for byte.
    pub payload: Vec<u8>,
    /// Higher is delivered first, where [`Capabilities::priority`] holds.
    pub priority: i16,
    /// Not delivered before this delay has passed, where [`Capabilities::delay`] holds.
    pub delay: Option<Duration>,
    /// The task's id, in clear: brokers that deduplicate (SQS FIFO) use it as the
    /// deduplication key. Never needed for delivery; `None` when the producer has none.
    pub key: Option<String>,
    /// The task's group, in clear: brokers that order per group (SQS FIFO message groups) use
    /// it; `None` when the task has none.
    pub group: Option<String>,
}

impl Message {
    /// A message with default priority and no delay.
    pub fn new(payload: Vec<u8>) -> Self {
        Self {
            payload,
            priority: 0,
            delay: None,
            key: None,
            group: None,
        }
    }

    /// Sets the priority.
    pub fn with_priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Sets a delivery delay.
    pub fn with_delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self
    }

    /// Sets the deduplication key (the task's id).
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the ordering group (the task's group).
    pub fn with_group(mut self, group: impl Into<String>) -> Self {
        self.group = Some(group.into());
        self
    }
}

/// One package handed out by [`Broker::dequeue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The receipt to acknowledge or fail this delivery with.
    pub ack: AckId,
    /// The broker's id of the stored message (stable across redeliveries).
    pub message_id: MessageId,
    /// The envelope exactly as it was enqueued.
    pub payload: Vec<u8>,
    /// How many times this message has been handed out, this time included, if the broker counts.
    pub deliveries: Option<u32>,
}

/// A package that was set aside instead of being delivered again (bad signature, given up).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DeadLetter {
    /// The broker's id of the set-aside message.
    pub message_id: MessageId,
    /// The envelope exactly as it was enqueued.
    #[serde(skip)]
    pub payload: Vec<u8>,
    /// Why it was set aside.
    pub reason: String,
    /// How many times it had been delivered.
    pub deliveries: Option<u32>,
    /// When it was set aside, microseconds since the Unix epoch.
    pub dead_at_us: i64,
}

/// A value stored for cluster monitoring (Django Q's `set_stat`), with its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    /// The key it was stored under.
    pub key: String,
    /// The stored bytes.
    pub value: Vec<u8>,
}

/// What a broker can and cannot do; callers and the conformance kit read this instead of guessing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Delivered packages stay invisible for `retry` and come back unless acknowledged.
    pub receipts: bool,
    /// A package is handed to one consumer at a time (claims are atomic).
    pub atomic: bool,
    /// Most packages one `dequeue` can return.
    pub max_bulk: usize,
    /// Largest package the broker accepts, in bytes.
    pub max_message_size: usize,
    /// The broker stores text only; packages travel base64url-encoded.
    pub text_only: bool,
    /// `dead_letter` and `dead_letters` work.
    pub dead_letter: bool,
    /// `Message::priority` is honoured.
    pub priority: bool,
    /// `Message::delay` and `fail_after` delays are honoured.
    pub delay: bool,
    /// `set_stat` and `get_stats` work.
    pub stats: bool,
    /// [`Broker::extend`] pushes a lease back, so a task may run longer than `retry` without
    /// being delivered to a second consumer.
    pub extend: bool,
}

impl Default for Capabilities {
    /// The weakest broker: no receipts, one package at a time, 256 KiB, nothing optional.
    fn default() -> Self {
        Self {
            receipts: false,
            atomic: false,
            max_bulk: 1,
            max_message_size: 256 * 1024,
            text_only: false,
            dead_letter: false,
            priority: false,
            delay: false,
            stats: false,
            extend: false,
        }
    }
}

/// What `qcluster info` shows about a broker. Never holds a secret.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BrokerInfo {
    /// Adapter name, e.g. `orm/postgres` or `redis`.
    pub broker: String,
    /// Server name and version when known.
    pub server: Option<String>,
    /// Where it connects, password masked.
    pub endpoint: String,
    /// The queue this handle reads and writes.
    pub queue: String,
    /// Whether delivered packages come back when not acknowledged (see [`Capabilities`]).
    pub receipts: bool,
    /// The lease length in seconds, where receipts hold.
    pub retry_secs: Option<f64>,
    /// Plain-language guarantees and caveats (e.g. "a dequeued package is gone from the broker").
    pub notes: Vec<String>,
    /// Adapter-specific facts (table names, pool size, replica...).
    pub details: BTreeMap<String, String>,
}

/// A message broker that carries task packages.
///
/// Object safe: the cluster holds an `Arc<dyn Broker>`. Every adapter documents its guarantees and
/// runs the conformance kit (`broker_core::testkit`, feature `testkit`).
///
/// Semantics:
/// - with receipts, a delivered package is invisible for `retry`; unless acknowledged it is
///   delivered again after that. `acknowledge` removes it for good.
/// - `fail` is a negative acknowledgement: the package goes back to the queue (or to a dead-letter
///   place that [`Broker::dead_letters`] lists); it is never silently dropped.
/// - without receipts a dequeued package is gone from the broker, and `info` says so.
///
/// Where a receipt may be settled: by default on **any** handle of the same queue (a clone, a
/// handle opened by another process): the SQL, Redis and memory adapters keep the lease on the
/// server, so the receipt alone names it. An adapter whose server binds a reservation to the
/// connection that took it (AMQP channels, beanstalkd connections) settles only on the handle
/// that dequeued, must say so in its docs and `info`, and must make that handle's settles work
/// while a `dequeue` of the same handle is waiting (the cluster runs both at once). If that
/// connection breaks, the server gives the reservation back by itself; a later settle with the
/// old receipt is ignored like any stale receipt.
#[async_trait]
pub trait Broker: Send + Sync + fmt::Debug {
    /// The adapter's name as errors and `info` show it (`orm/postgres`, `redis`, `nats`).
    /// Defaults to the Rust type name; adapters override it with something shorter.
    fn name(&self) -> &'static str {
        std::any::type_name::<Self>()
    }

    /// Stores one package; returns the broker's id for it.
    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError>;

    /// Stores many packages, in order; adapters override this to batch. Either every package is
    /// stored or an error is returned (adapters document whether a failed batch may be partial).
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        let mut ids = Vec::with_capacity(messages.len());
        for m in messages {
            ids.push(self.enqueue(m).await?);
        }
        Ok(ids)
    }

    /// Takes up to `bulk` packages. On an empty queue waits at most the configured `wait`, then
    /// returns an empty batch.
    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError>;

    /// Removes a delivered package for good. A receipt that is stale (its lease ran out and the
    /// package was delivered again) is ignored: the new holder's lease stands.
    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError>;

    /// Acknowledges many deliveries; adapters override this to batch.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        for a in acks {
            self.acknowledge(a).await?;
        }
        Ok(())
    }

    /// Negative acknowledgement: gives the package back for another delivery now.
    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError>;

    /// Gives the package back to be delivered again after `delay` (where [`Capabilities::delay`]
    /// holds; otherwise the same as [`Broker::fail`]).
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let _ = delay;
        self.fail(ack).await
    }

    /// Removes the message behind a receipt whatever its lease (Django Q's `delete`).
    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError>;

    /// Pushes the lease of a delivered package back: it now runs out `by` from now (not from
    /// its former deadline), where [`Capabilities::extend`] holds.
    ///
    /// `Ok(true)`: this receipt holds the lease, now extended. `Ok(false)`: it no longer does
    /// (the package was settled, or delivered again to someone else) and nothing changed, like a
    /// stale acknowledgement: the new holder's lease stands, and a caller still running the task
    /// should stop. An adapter that cannot tell answers `true` and says so. Adapters whose
    /// leases cover a whole claimed batch may extend the batch; they say so too.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let _ = (ack, by);
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "extend",
        })
    }

    /// Moves a delivered package to the dead-letter place with a reason (never run again, listable).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let _ = (ack, reason);
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "dead_letter",
        })
    }

    /// Lists up to `limit` dead letters of this queue, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let _ = limit;
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "dead_letters",
        })
    }

    /// Puts dead letter `id` back in the queue as a fresh package (delivered again from its
    /// first delivery; priority kept where the broker keeps it). `Ok(false)`: there is no dead
    /// letter `id` (already requeued or deleted). Never loses the package: it is stored in the
    /// queue before it leaves the dead-letter place, so a crash in between may leave it in both,
    /// never in neither. The caller verifies the payload first; the broker does not.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let _ = id;
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "requeue_dead",
        })
    }

    /// Removes dead letter `id` for good. `Ok(false)`: there is no dead letter `id`.
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let _ = id;
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "delete_dead",
        })
    }

    /// Number of dead letters of this queue; `None` where there is no dead-letter place.
    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        Ok(None)
    }

    /// Removes every package waiting in the queue (not those in flight); returns how many.
    async fn purge_queue(&self) -> Result<u64, BrokerError>;

    /// Removes the queue and everything in it, in flight and dead letters included.
    async fn delete_queue(&self) -> Result<(), BrokerError>;

    /// Packages waiting to be delivered (delayed ones included, in-flight ones not).
    async fn queue_size(&self) -> Result<u64, BrokerError>;

    /// Packages delivered but not yet acknowledged, where the broker can tell.
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError>;

    /// Checks that the server answers, within a bounded time.
    async fn ping(&self) -> Result<(), BrokerError>;

    /// Describes the broker for `qcluster info`; never contains a secret.
    async fn info(&self) -> Result<BrokerInfo, BrokerError>;

    /// What this broker can do.
    fn capabilities(&self) -> Capabilities;

    /// Stores a monitoring value that expires after `ttl` (Django Q's `set_stat`).
    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let _ = (key, value, ttl);
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "set_stat",
        })
    }

    /// Returns the unexpired monitoring values whose key starts with `prefix` (Django Q's
    /// `get_stats`).
    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let _ = prefix;
        Err(BrokerError::Unsupported {
            broker: self.name(),
            operation: "get_stats",
        })
    }
}
