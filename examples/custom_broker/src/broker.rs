//! [`NatsBroker`]: the [`Broker`] trait on NATS JetStream.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{self, consumer, response::Response, stream};
use async_nats::{Client, HeaderMap};
use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, Stat, async_trait, now_us,
};
use bytes::Bytes;
use futures::StreamExt;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::config::NatsConfig;
use crate::layout::Layout;
use crate::pull::{End, Pull};
use crate::receipt::Receipt;

/// The adapter's name in errors and `info`.
const NAME: &str = "nats";
/// Most packages one `dequeue` returns (one pull request).
pub const MAX_BULK: usize = 1000;
/// Room kept under the server's `max_payload` for the headers a dead letter carries.
const HEADER_ROOM: usize = 4096;
/// Longest dead-letter reason kept, in bytes.
const MAX_REASON: usize = 1024;
/// Packages published before their acknowledgements are awaited, in `enqueue_many`.
const PIPELINE: usize = 512;
/// Headers of dead letters and stats.
const H_REASON: &str = "Qcluster-Reason";
const H_MESSAGE: &str = "Qcluster-Message-Id";
const H_DELIVERIES: &str = "Qcluster-Deliveries";
const H_DEAD_AT: &str = "Qcluster-Dead-At-Us";
const H_EXPIRES: &str = "Qcluster-Expires-Ms";

/// A handle on one queue of a NATS JetStream server.
///
/// Layout (see [`NatsConfig::prefix`]; `<q>` is the queue name in hex, or hashed when long):
/// - stream `<prefix>-q-<q>`, work-queue retention, subject `<prefix>.q.<q>`: the packages.
///   A package's id is its stream sequence.
/// - durable pull consumer `workers` on it, shared by every handle: explicit acks,
///   `ack_wait` = `retry` (the lease), unlimited deliveries.
/// - stream `<prefix>-d-<q>`: dead letters, each with its reason in a header; `requeue_dead`
///   and `delete_dead` read it in order to find an id, and a requeued package is published to
///   the work stream (a new sequence) before its dead letter is deleted.
/// - stream `<prefix>-l-<q>`: the redelivery ledger (see below).
/// - stream `<prefix>-stats`: monitoring values of every queue under the prefix.
///
/// Receipts are the delivery's ack subject, so any handle (any process) settles them, and
/// settles work while a `dequeue` of the same handle is waiting. NATS itself ignores a stale
/// `-NAK` but not a stale `+ACK` or `+TERM`: a receipt whose lease may have run out is checked
/// against the ledger first, where every delivery after the first is recorded; receipts
/// settled within their lease (the usual case) cost no extra call.
///
/// Cheap to clone: clones share the connection.
#[derive(Clone)]
pub struct NatsBroker {
    inner: Arc<Inner>,
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    names: Layout,
    settings: QueueSettings,
    endpoint: String,
    secrets: Vec<String>,
    replicas: usize,
    api_timeout: Duration,
    max_message_size: usize,
    server_version: String,
    server_max_payload: usize,
    next_subject: String,
    /// Background tasks that keep extending leases asked longer than `retry`, by package.
    keepers: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// Whether `keepers` was ever used: settles skip its lock until then.
    any_keeper: AtomicBool,
    /// Set by `delete_queue`: the next dequeue creates the queue again first.
    deleted: AtomicBool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Ok(keepers) = self.keepers.get_mut() {
            for (_, k) in keepers.drain() {
                k.abort();
            }
        }
    }
}

impl fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("queue", &self.inner.settings.queue)
            .field("stream", &self.inner.names.work_stream)
            .finish_non_exhaustive()
    }
}

/// What a settle sends to the ack subject.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Settle {
    Ack,
    Nak(Duration),
    Progress,
    Term,
}

impl Settle {
    fn body(self) -> Bytes {
        match self {
            Self::Ack => Bytes::from_static(b"+ACK"),
            Self::Nak(d) if d.is_zero() => Bytes::from_static(b"-NAK"),
            Self::Nak(d) => Bytes::from(format!("-NAK {{\"delay\": {}}}", d.as_nanos())),
            Self::Progress => Bytes::from_static(b"+WPI"),
            Self::Term => Bytes::from_static(b"+TERM"),
        }
    }

    /// Whether the package is gone for good afterwards (its ledger entry can go too).
    fn is_final(self) -> bool {
        matches!(self, Self::Ack | Self::Term)
    }
}

/// The parts of `CONSUMER.INFO` this adapter reads.
#[derive(Deserialize)]
struct ConsumerState {
    num_pending: u64,
    num_ack_pending: u64,
    delivered: Delivered,
}

#[derive(Deserialize)]
struct Delivered {
    stream_seq: u64,
}

/// The parts of `STREAM.INFO` this adapter reads.
#[derive(Deserialize)]
struct StreamInfo {
    state: StreamState,
}

#[derive(Deserialize)]
struct StreamState {
    messages: u64,
    last_seq: u64,
    #[serde(default)]
    subjects: Option<BTreeMap<String, u64>>,
}

#[derive(Deserialize)]
struct Purged {
    purged: u64,
}

#[derive(Deserialize)]
struct Success {
    success: bool,
}

/// A JetStream API error: `err_code` names it (10059 stream not found, …).
#[derive(Debug)]
struct ApiError {
    err_code: u64,
    message: String,
}

const STREAM_NOT_FOUND: u64 = 10059;
const CONSUMER_NOT_FOUND: u64 = 10014;

impl NatsBroker {
    /// Connects to `config.url` and creates the queue's streams and consumer if missing.
    ///
    /// Fails with [`BrokerError::Config`] for bad settings (`bulk` over [`MAX_BULK`], a bad
    /// `nats.prefix`), [`BrokerError::Unreachable`] / [`BrokerError::Timeout`] (within
    /// `connect_timeout`) when the server does not answer, and [`BrokerError::Backend`] when it
    /// has no JetStream.
    pub async fn connect(
        config: NatsConfig,
        settings: QueueSettings,
    ) -> Result<NatsBroker, BrokerError> {
        config.validate()?;
        settings.validate(MAX_BULK)?;
        let endpoint = config.endpoint();
        let secrets = config.secrets();
        let scrub = |m: String| scrub(&secrets, m);
        let options = async_nats::ConnectOptions::new()
            .name("qcluster")
            .connection_timeout(config.connect_timeout)
            .request_timeout(Some(config.connect_timeout));
        let client = match tokio::time::timeout(
            config.connect_timeout + Duration::from_millis(500),
            options.connect(config.url.as_str()),
        )
        .await
        {
            Err(_) => {
                return Err(BrokerError::Timeout {
                    broker: NAME,
                    operation: "connect",
                    endpoint,
                    after: config.connect_timeout,
                });
            }
            Ok(Err(e)) if e.kind() == async_nats::ConnectErrorKind::TimedOut => {
                return Err(BrokerError::Timeout {
                    broker: NAME,
                    operation: "connect",
                    endpoint,
                    after: config.connect_timeout,
                });
            }
            Ok(Err(e)) => {
                return Err(BrokerError::Unreachable {
                    broker: NAME,
                    endpoint,
                    message: scrub(e.to_string()),
                });
            }
            Ok(Ok(c)) => c,
        };
        let info = client.server_info();
        let js = jetstream::ContextBuilder::new()
            .timeout(config.connect_timeout)
            .max_ack_inflight(64 * 1024)
            .build(client.clone());
        let room = info.max_payload.saturating_sub(HEADER_ROOM).max(1);
        let names = Layout::new(&config.prefix, &settings.queue);
        let broker = NatsBroker {
            inner: Arc::new(Inner {
                next_subject: format!(
                    "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
                    names.work_stream, names.consumer
                ),
                client,
                js,
                names,
                max_message_size: settings.max_message_size.map_or(room, |m| m.min(room)),
                settings,
                endpoint,
                secrets,
                replicas: config.replicas,
                api_timeout: config.connect_timeout,
                server_version: info.version.clone(),
                server_max_payload: info.max_payload,
                keepers: Mutex::new(HashMap::new()),
                any_keeper: AtomicBool::new(false),
                deleted: AtomicBool::new(false),
            }),
        };
        broker.ensure().await?;
        tracing::debug!(
            "nats: queue {:?} ready on {} (stream {})",
            broker.inner.settings.queue,
            broker.inner.endpoint,
            broker.inner.names.work_stream
        );
        Ok(broker)
    }

    /// Creates whatever of the queue's streams and consumer is missing (idempotent: every
    /// handle calls it at connect, and again when it finds the queue deleted).
    async fn ensure(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let n = &i.names;
        let base = stream::Config {
            num_replicas: i.replicas,
            storage: stream::StorageType::File,
            ..Default::default()
        };
        let work = stream::Config {
            name: n.work_stream.clone(),
            subjects: vec![n.work_subject.clone()],
            retention: stream::RetentionPolicy::WorkQueue,
            ..base.clone()
        };
        let dead = stream::Config {
            name: n.dead_stream.clone(),
            subjects: vec![n.dead_subject.clone()],
            ..base.clone()
        };
        // Entries go when their package is settled; the age limit only bounds leftovers.
        let ledger = stream::Config {
            name: n.ledger_stream.clone(),
            subjects: vec![format!("{}.*", n.ledger_subject)],
            max_messages_per_subject: 1,
            max_age: (i.settings.retry * 4).max(Duration::from_secs(24 * 3600)),
            ..base.clone()
        };
        let stats = stream::Config {
            name: n.stats_stream.clone(),
            subjects: vec![format!("{}.*", n.stats_subject)],
            max_messages_per_subject: 1,
            ..base
        };
        for config in [dead, ledger, stats] {
            i.js.get_or_create_stream(config)
                .await
                .map_err(|e| self.error("create stream", e))?;
        }
        let work =
            i.js.get_or_create_stream(work)
                .await
                .map_err(|e| self.error("create stream", e))?;
        let wanted = consumer::pull::Config {
            durable_name: Some(n.consumer.clone()),
            description: Some(format!("qcluster workers of queue {:?}", i.settings.queue)),
            ack_policy: consumer::AckPolicy::Explicit,
            ack_wait: i.settings.retry,
            max_deliver: -1,
            max_ack_pending: -1,
            max_batch: MAX_BULK as i64,
            ..Default::default()
        };
        let c: consumer::PullConsumer = work
            .get_or_create_consumer(&n.consumer, wanted.clone())
            .await
            .map_err(|e| self.error("create consumer", e))?;
        if c.cached_info().config.ack_wait != i.settings.retry {
            // `retry` changed since the consumer was made: the lease follows the newest handle.
            tracing::info!(
                "nats: queue {:?}: ack wait {:?} -> {:?}",
                i.settings.queue,
                c.cached_info().config.ack_wait,
                i.settings.retry
            );
            work.create_consumer(wanted)
                .await
                .map_err(|e| self.error("update consumer", e))?;
        }
        self.inner.deleted.store(false, Ordering::Release);
        Ok(())
    }

    // ---- errors -------------------------------------------------------------------------

    /// Maps a client error: connection trouble to `Unreachable`, time-outs to `Timeout`, the
    /// rest to `Backend`; secrets scrubbed.
    fn error(&self, operation: &'static str, e: impl fmt::Display) -> BrokerError {
        let message = scrub(&self.inner.secrets, e.to_string());
        let connected =
            self.inner.client.connection_state() == async_nats::connection::State::Connected;
        if message.to_ascii_lowercase().contains("timed out") {
            BrokerError::Timeout {
                broker: NAME,
                operation,
                endpoint: self.inner.endpoint.clone(),
                after: self.inner.api_timeout,
            }
        } else if !connected {
            BrokerError::Unreachable {
                broker: NAME,
                endpoint: self.inner.endpoint.clone(),
                message: format!("{operation}: {message}"),
            }
        } else {
            BrokerError::Backend {
                broker: NAME,
                message: format!("{operation}: {message}"),
            }
        }
    }

    /// One JetStream API call (`subject` after `$JS.API.`): `Ok(Err(..))` is the server's refusal.
    async fn api<T: DeserializeOwned>(
        &self,
        operation: &'static str,
        subject: String,
        body: serde_json::Value,
    ) -> Result<Result<T, ApiError>, BrokerError> {
        let r: Response<T> = match self.inner.js.request(subject, &body).await {
            Ok(r) => r,
            Err(e)
                if e.kind() == async_nats::jetstream::context::RequestErrorKind::NoResponders =>
            {
                return Err(BrokerError::Backend {
                    broker: NAME,
                    message: format!(
                        "{operation}: JetStream does not answer at {} (is the server started with -js?)",
                        self.inner.endpoint
                    ),
                });
            }
            Err(e) => return Err(self.error(operation, e)),
        };
        Ok(match r {
            Response::Ok(v) => Ok(v),
            Response::Err { error } => Err(ApiError {
                err_code: error.error_code().0,
                message: scrub(&self.inner.secrets, error.to_string()),
            }),
        })
    }

    fn refused(&self, operation: &'static str, e: ApiError) -> BrokerError {
        BrokerError::Backend {
            broker: NAME,
            message: format!("{operation}: {}", e.message),
        }
    }

    // ---- reads --------------------------------------------------------------------------

    /// The consumer's counters; `None` when the queue does not exist (deleted).
    async fn consumer_state(&self) -> Result<Option<ConsumerState>, BrokerError> {
        let n = &self.inner.names;
        let subject = format!("CONSUMER.INFO.{}.{}", n.work_stream, n.consumer);
        match self
            .api("consumer info", subject, serde_json::json!({}))
            .await?
        {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.err_code == STREAM_NOT_FOUND || e.err_code == CONSUMER_NOT_FOUND => {
                Ok(None)
            }
            Err(e) => Err(self.refused("consumer info", e)),
        }
    }

    /// A stream's state, subjects matching `filter` listed; `None` when it does not exist.
    async fn stream_state(
        &self,
        stream: &str,
        filter: Option<&str>,
    ) -> Result<Option<StreamState>, BrokerError> {
        let body = match filter {
            Some(f) => serde_json::json!({ "subjects_filter": f }),
            None => serde_json::json!({}),
        };
        match self
            .api::<StreamInfo>("stream info", format!("STREAM.INFO.{stream}"), body)
            .await?
        {
            Ok(s) => Ok(Some(s.state)),
            Err(e) if e.err_code == STREAM_NOT_FOUND => Ok(None),
            Err(e) => Err(self.refused("stream info", e)),
        }
    }

    /// A stored message by sequence, or the first at or after it on `next_by`.
    async fn get_message(
        &self,
        stream: &str,
        seq: u64,
        next_by: Option<&str>,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        let s = self
            .inner
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.error("get message", e))?;
        let builder = s.raw_message_builder().sequence(seq);
        let builder = match next_by {
            Some(subject) => builder.next_by_subject(subject),
            None => builder,
        };
        match builder.send().await {
            Ok(m) => Ok(Some(m)),
            Err(e) => self.absent(e),
        }
    }

    /// The dead letter listed as `id` (its `Qcluster-Message-Id` header): its sequence in the
    /// dead-letter stream and its package. Reads the stream in order, one direct get per dead
    /// letter, until it shows.
    async fn find_dead(&self, id: &MessageId) -> Result<Option<(u64, Bytes)>, BrokerError> {
        let n = &self.inner.names;
        let mut seq = 1;
        while let Some(m) = self
            .get_message(&n.dead_stream, seq, Some(&n.dead_subject))
            .await?
        {
            seq = m.sequence + 1;
            if header(&m.headers, H_MESSAGE) == Some(id.0.as_str()) {
                return Ok(Some((m.sequence, m.payload)));
            }
        }
        Ok(None)
    }

    /// The last message on `subject` of `stream`, if any.
    async fn get_last(
        &self,
        stream: &str,
        subject: &str,
    ) -> Result<Option<jetstream::message::StreamMessage>, BrokerError> {
        let s = self
            .inner
            .js
            .get_stream_no_info(stream)
            .await
            .map_err(|e| self.error("get message", e))?;
        match s.get_last_raw_message_by_subject(subject).await {
            Ok(m) => Ok(Some(m)),
            Err(e) => self.absent(e),
        }
    }

    /// "No such message" and "no such stream" are `None`; the rest are errors.
    fn absent<T>(
        &self,
        e: jetstream::stream::LastRawMessageError,
    ) -> Result<Option<T>, BrokerError> {
        use jetstream::stream::LastRawMessageErrorKind as K;
        match e.kind() {
            K::NoMessageFound => Ok(None),
            K::JetStream(j) if j.error_code().0 == STREAM_NOT_FOUND => Ok(None),
            _ => Err(self.error("get message", e)),
        }
    }

    async fn delete_message(&self, stream: &str, seq: u64) -> Result<bool, BrokerError> {
        let body = serde_json::json!({ "seq": seq, "no_erase": true });
        match self
            .api::<Success>(
                "delete message",
                format!("STREAM.MSG.DELETE.{stream}"),
                body,
            )
            .await?
        {
            Ok(s) => Ok(s.success),
            // Already gone (acknowledged, terminated, purged) or the stream was deleted.
            Err(_) => Ok(false),
        }
    }

    /// Purges `subject` of `stream`; with `below`, only its messages before that sequence.
    async fn purge_subject(
        &self,
        stream: &str,
        subject: &str,
        below: Option<u64>,
    ) -> Result<u64, BrokerError> {
        let body = match below {
            Some(seq) => serde_json::json!({ "filter": subject, "seq": seq }),
            None => serde_json::json!({ "filter": subject }),
        };
        match self
            .api::<Purged>("purge", format!("STREAM.PURGE.{stream}"), body)
            .await?
        {
            Ok(p) => Ok(p.purged),
            Err(e) if e.err_code == STREAM_NOT_FOUND => Ok(0),
            Err(e) => Err(self.refused("purge", e)),
        }
    }

    // ---- writes -------------------------------------------------------------------------

    /// Publishes to a stream and awaits every acknowledgement, `PIPELINE` at a time; recreates
    /// the queue's streams once if they are gone. Returns the stream sequences.
    async fn publish_all(
        &self,
        subject: &str,
        items: Vec<(Option<HeaderMap>, Bytes)>,
    ) -> Result<Vec<u64>, BrokerError> {
        let mut seqs = Vec::with_capacity(items.len());
        for chunk in items.chunks(PIPELINE) {
            let mut recreated = false;
            loop {
                match self.publish_chunk(subject, chunk).await {
                    Ok(s) => {
                        seqs.extend(s);
                        break;
                    }
                    Err(Missing::Stream) if !recreated && seqs.is_empty() => {
                        tracing::info!(
                            "nats: queue {:?} is gone; creating it again",
                            self.inner.settings.queue
                        );
                        self.ensure().await?;
                        recreated = true;
                    }
                    Err(Missing::Stream) => {
                        return Err(BrokerError::Backend {
                            broker: NAME,
                            message: format!(
                                "the stream of queue {:?} was deleted while publishing; {} of the packages were stored",
                                self.inner.settings.queue,
                                seqs.len()
                            ),
                        });
                    }
                    Err(Missing::Other(e)) => return Err(e),
                }
            }
        }
        Ok(seqs)
    }

    async fn publish_chunk(
        &self,
        subject: &str,
        chunk: &[(Option<HeaderMap>, Bytes)],
    ) -> Result<Vec<u64>, Missing> {
        use async_nats::jetstream::context::PublishErrorKind as K;
        let js = &self.inner.js;
        let mut pending = Vec::with_capacity(chunk.len());
        for (headers, payload) in chunk {
            let sent = match headers {
                Some(h) => {
                    js.publish_with_headers(subject.to_owned(), h.clone(), payload.clone())
                        .await
                }
                None => js.publish(subject.to_owned(), payload.clone()).await,
            };
            pending.push(sent.map_err(|e| Missing::Other(self.error("publish", e)))?);
        }
        let acks = futures::future::join_all(pending.into_iter().map(|f| f.into_future())).await;
        let mut seqs = Vec::with_capacity(acks.len());
        for a in acks {
            match a {
                Ok(ack) => seqs.push(ack.sequence),
                Err(e) if e.kind() == K::StreamNotFound && seqs.is_empty() => {
                    return Err(Missing::Stream);
                }
                Err(e) => return Err(Missing::Other(self.error("publish", e))),
            }
        }
        Ok(seqs)
    }

    fn check_size(&self, size: usize) -> Result<(), BrokerError> {
        let limit = self.inner.max_message_size;
        if size > limit {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size,
                limit,
            });
        }
        Ok(())
    }

    // ---- receipts -----------------------------------------------------------------------

    fn receipt(&self, ack: &AckId) -> Result<Receipt, BrokerError> {
        let n = &self.inner.names;
        Receipt::parse(ack, &n.work_stream, &n.consumer, NAME)
    }

    /// Whether `r` is the package's latest delivery. Within its lease it surely is; after
    /// that, the ledger tells whether the package was delivered again since.
    async fn is_current(&self, r: &Receipt) -> Result<bool, BrokerError> {
        if now_ms() < r.sure_until_ms {
            return Ok(true);
        }
        let n = &self.inner.names;
        let latest = self
            .get_last(&n.ledger_stream, &n.ledger_for(r.stream_seq))
            .await?;
        let current = match latest {
            None => true,
            Some(m) => std::str::from_utf8(&m.payload)
                .ok()
                .and_then(|s| s.parse::<u64>().ok())
                .is_none_or(|seq| seq == r.consumer_seq),
        };
        if !current {
            tracing::debug!(
                "nats: stale receipt for package {} ignored (delivered again since)",
                r.stream_seq
            );
        }
        Ok(current)
    }

    /// Records the deliveries after the first in the ledger, before they are handed out.
    async fn record_redeliveries(
        &self,
        messages: &[async_nats::Message],
    ) -> Result<(), BrokerError> {
        let n = &self.inner.names;
        let mut by_subject: Vec<(String, Bytes)> = Vec::new();
        for m in messages {
            if let Some(r) = m
                .reply
                .as_deref()
                .and_then(|s| Receipt::from_delivery(s, 0))
                && r.delivered > 1
            {
                by_subject.push((
                    n.ledger_for(r.stream_seq),
                    Bytes::from(r.consumer_seq.to_string()),
                ));
            }
        }
        if by_subject.is_empty() {
            return Ok(());
        }
        let js = &self.inner.js;
        let mut pending = Vec::with_capacity(by_subject.len());
        for (subject, seq) in by_subject {
            pending.push(
                js.publish(subject, seq)
                    .await
                    .map_err(|e| self.error("record redelivery", e))?,
            );
        }
        for r in futures::future::join_all(pending.into_iter().map(|f| f.into_future())).await {
            r.map_err(|e| self.error("record redelivery", e))?;
        }
        Ok(())
    }

    /// Sends a settle to the ack subject and waits until the server has applied it. A queue
    /// deleted meanwhile has nobody listening there: nothing left to settle.
    async fn send(&self, r: &Receipt, op: Settle) -> Result<(), BrokerError> {
        use async_nats::RequestErrorKind as K;
        match self
            .inner
            .client
            .request(r.subject.clone(), op.body())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == K::NoResponders => Ok(()),
            Err(e) if e.kind() == K::TimedOut => Err(BrokerError::Timeout {
                broker: NAME,
                operation: "settle",
                endpoint: self.inner.endpoint.clone(),
                after: self.inner.api_timeout,
            }),
            Err(e) => Err(self.error("settle", e)),
        }
    }

    /// Drops the ledger entry of a package that is gone for good.
    async fn forget(&self, r: &Receipt) {
        if r.delivered > 1 {
            let n = &self.inner.names;
            if let Err(e) = self
                .purge_subject(&n.ledger_stream, &n.ledger_for(r.stream_seq), None)
                .await
            {
                tracing::debug!("nats: ledger entry of package {} kept: {e}", r.stream_seq);
            }
        }
    }

    async fn settle(&self, ack: &AckId, op: Settle) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(r.stream_seq);
        if !self.is_current(&r).await? {
            return Ok(());
        }
        self.send(&r, op).await?;
        if op.is_final() {
            self.forget(&r).await;
        }
        Ok(())
    }
}

impl NatsBroker {
    /// Stops extending the lease of package `seq` (it is being settled, or extended anew).
    fn stop_keeper(&self, seq: u64) {
        if !self.inner.any_keeper.load(Ordering::Acquire) {
            return;
        }
        let mut keepers = self
            .inner
            .keepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(k) = keepers.remove(&seq) {
            k.abort();
        }
    }

    /// Keeps the lease of `r` until `target`: NATS restarts a lease at `retry` and no longer,
    /// so a longer extension is a few `+WPI`s, the last one `retry` before `target`. Stops
    /// early when this handle settles the package, or when it was delivered to someone else.
    fn keep_until(&self, r: Receipt, target: Instant) {
        let retry = self.inner.settings.retry;
        let margin = (retry / 5).min(Duration::from_secs(1));
        let weak: Weak<Inner> = Arc::downgrade(&self.inner);
        let seq = r.stream_seq;
        let task = tokio::spawn(async move {
            let mut lease_end = Instant::now() + retry;
            while lease_end < target {
                let at = target
                    .checked_sub(retry)
                    .unwrap_or(target)
                    .min(lease_end.checked_sub(margin).unwrap_or(lease_end));
                tokio::time::sleep_until(at.into()).await;
                let Some(inner) = weak.upgrade() else { return };
                let broker = NatsBroker { inner };
                let sent = Instant::now();
                match broker.is_current(&r).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(e) => tracing::warn!("nats: lease of package {seq} not checked: {e}"),
                }
                match broker.send(&r, Settle::Progress).await {
                    Ok(()) => lease_end = sent + retry,
                    Err(e) => {
                        tracing::warn!("nats: lease of package {seq} not extended: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        });
        let mut keepers = self
            .inner
            .keepers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = keepers.insert(seq, task.abort_handle()) {
            old.abort();
        }
        keepers.retain(|_, k| !k.is_finished());
        self.inner.any_keeper.store(true, Ordering::Release);
    }
}

/// Why a chunk was not stored.
enum Missing {
    /// No stream listens on the subject: the queue was deleted.
    Stream,
    Other(BrokerError),
}

/// Milliseconds since the Unix epoch, local clock.
fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn scrub(secrets: &[String], mut message: String) -> String {
    for s in secrets {
        message = broker_core::redact(&message, Some(s));
    }
    message
}

fn header<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get(name).map(|v| v.as_str())
}

/// A header value is one line: line breaks become spaces, and long reasons are cut (on a
/// character boundary).
fn one_line(reason: &str, max: usize) -> String {
    let mut end = reason.len().min(max);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    reason[..end].replace(['\r', '\n'], " ")
}

#[async_trait]
impl Broker for NatsBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    /// Publishes and awaits JetStream's acknowledgement; the id is the stream sequence.
    /// `Message::priority` is ignored (FIFO); a `Message::delay` is refused
    /// ([`BrokerError::Unsupported`]) rather than run early: NATS 2.9 cannot hold a message back.
    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let mut ids = self.enqueue_many(vec![message]).await?;
        ids.pop().ok_or_else(|| BrokerError::Backend {
            broker: NAME,
            message: "publish returned no sequence".into(),
        })
    }

    /// Pipelines the publishes and awaits every acknowledgement. Every package is checked
    /// first (nothing is sent if one is too large); on an error the packages acknowledged
    /// before it are stored (the error says how many when the queue was deleted meanwhile).
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        for m in &messages {
            self.check_size(m.payload.len())?;
            if m.delay.is_some_and(|d| !d.is_zero()) {
                return Err(BrokerError::Unsupported {
                    broker: NAME,
                    operation: "delayed enqueue",
                });
            }
        }
        let items = messages
            .into_iter()
            .map(|m| (None, Bytes::from(m.payload)))
            .collect();
        let seqs = self
            .publish_all(&self.inner.names.work_subject, items)
            .await?;
        Ok(seqs.into_iter().map(|s| MessageId(s.to_string())).collect())
    }

    /// One pull request for up to `bulk`, held at most `wait` when nothing is waiting.
    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let lease = i.settings.retry;
        // The lease starts when the server delivers, which is after this instant: a receipt
        // is surely current until this + retry, less a margin for the settle's trip.
        let margin = (lease / 10).min(Duration::from_secs(1));
        if i.deleted.swap(false, Ordering::AcqRel) {
            self.ensure().await?;
        }
        for attempt in 0..2 {
            let sure_until = now_ms()
                .saturating_add(u64::try_from((lease - margin).as_millis()).unwrap_or(u64::MAX));
            let mut pull =
                Pull::start(&i.client, &i.next_subject, i.settings.bulk, i.settings.wait)
                    .await
                    .map_err(|e| self.error("dequeue", e))?;
            let end = pull.collect().await.map_err(|e| BrokerError::Backend {
                broker: NAME,
                message: scrub(&i.secrets, e),
            })?;
            let missing = match end {
                End::Missing => true,
                // Pulls on a missing consumer go unanswered: look whether it is there.
                End::Abandoned if pull.received().is_empty() => {
                    self.consumer_state().await?.is_none()
                }
                _ => false,
            };
            if missing && pull.received().is_empty() {
                if attempt == 0 {
                    tracing::info!(
                        "nats: queue {:?} is gone; creating it again",
                        i.settings.queue
                    );
                    self.ensure().await?;
                    continue;
                }
                return Ok(Vec::new());
            }
            // Dropped (an error, or the caller's future) before `take`, the guard gives
            // the packages back.
            self.record_redeliveries(pull.received()).await?;
            let messages = pull.take();
            let mut out = Vec::with_capacity(messages.len());
            for m in messages {
                let Some(r) = m
                    .reply
                    .as_deref()
                    .and_then(|s| Receipt::from_delivery(s, sure_until))
                else {
                    tracing::warn!("nats: delivery without a JetStream ack subject ignored");
                    continue;
                };
                out.push(Delivery {
                    ack: r.to_ack(),
                    message_id: MessageId(r.stream_seq.to_string()),
                    payload: m.payload.to_vec(),
                    deliveries: Some(u32::try_from(r.delivered).unwrap_or(u32::MAX)),
                });
            }
            return Ok(out);
        }
        Ok(Vec::new())
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.settle(ack, Settle::Ack).await
    }

    /// Publishes every `+ACK` without waiting and confirms only the last: the server applies
    /// one connection's acks in order, so its answer covers the others.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let mut current = Vec::with_capacity(acks.len());
        let mut redelivered = Vec::new();
        for a in acks {
            let r = self.receipt(a)?;
            self.stop_keeper(r.stream_seq);
            if self.is_current(&r).await? {
                if r.delivered > 1 {
                    redelivered.push(r.clone());
                }
                current.push(r);
            }
        }
        let Some(last) = current.pop() else {
            return Ok(());
        };
        for r in current {
            self.inner
                .client
                .publish(r.subject, Settle::Ack.body())
                .await
                .map_err(|e| self.error("acknowledge", e))?;
        }
        self.send(&last, Settle::Ack).await?;
        for r in &redelivered {
            self.forget(r).await;
        }
        Ok(())
    }

    /// `-NAK`: delivered again at once (a stale receipt changes nothing).
    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.settle(ack, Settle::Nak(Duration::ZERO)).await
    }

    /// `-NAK` with a delay: honoured by the server, although [`Capabilities::delay`] is false
    /// (that flag covers enqueue delays, which NATS 2.9 lacks).
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        self.settle(ack, Settle::Nak(delay)).await
    }

    /// `+TERM`, then the message is removed from the stream by sequence, whatever its lease.
    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(r.stream_seq);
        self.send(&r, Settle::Term).await?;
        self.delete_message(&self.inner.names.work_stream, r.stream_seq)
            .await?;
        self.forget(&r).await;
        Ok(())
    }

    /// `+WPI` (work in progress): the server restarts the lease at the consumer's `ack_wait`,
    /// i.e. `retry` from now; NATS takes no duration. So `by` up to `retry` is rounded up to
    /// `retry` (the cluster extends by exactly `retry`), and a longer `by` is kept by a
    /// background task of this handle that sends `+WPI` again before each lease runs out, the
    /// last one `retry` before `by` is over. That task stops when this handle settles the
    /// package or the package was delivered to someone else; a settle on another handle leaves
    /// it running until `by` is over, harmlessly (the server ignores progress on a settled
    /// package).
    /// `+WPI`. `Ok(false)` only for a receipt the ledger shows was delivered again; NATS does
    /// not say whether a `+WPI` found its message, so an acknowledged one answers `true`.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let asked = Instant::now();
        let r = self.receipt(ack)?;
        self.stop_keeper(r.stream_seq);
        if !self.is_current(&r).await? {
            return Ok(false);
        }
        self.send(&r, Settle::Progress).await?;
        if by > self.inner.settings.retry {
            self.keep_until(r, asked + by);
        }
        Ok(true)
    }

    /// Copies the package into the dead-letter stream with the reason, then `+TERM`s it and
    /// removes it from the work stream. A crash in between leaves it in both places (it may
    /// be delivered again and dead-lettered twice), never in neither.
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let r = self.receipt(ack)?;
        self.stop_keeper(r.stream_seq);
        if !self.is_current(&r).await? {
            return Ok(());
        }
        let n = &self.inner.names;
        let Some(original) = self.get_message(&n.work_stream, r.stream_seq, None).await? else {
            tracing::debug!(
                "nats: package {} already gone; not dead-lettered",
                r.stream_seq
            );
            return Ok(());
        };
        let mut h = HeaderMap::new();
        h.insert(H_REASON, one_line(reason, MAX_REASON).as_str());
        h.insert(H_MESSAGE, r.stream_seq.to_string().as_str());
        h.insert(H_DELIVERIES, r.delivered.to_string().as_str());
        h.insert(H_DEAD_AT, now_us().to_string().as_str());
        self.publish_all(&n.dead_subject, vec![(Some(h), original.payload)])
            .await?;
        self.send(&r, Settle::Term).await?;
        self.delete_message(&n.work_stream, r.stream_seq).await?;
        self.forget(&r).await;
        Ok(())
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let n = &self.inner.names;
        let mut out = Vec::new();
        let mut seq = 1;
        while out.len() < limit {
            let Some(m) = self
                .get_message(&n.dead_stream, seq, Some(&n.dead_subject))
                .await?
            else {
                break;
            };
            seq = m.sequence + 1;
            let number = |name| header(&m.headers, name).and_then(|v| v.parse::<i64>().ok());
            out.push(DeadLetter {
                message_id: MessageId(header(&m.headers, H_MESSAGE).unwrap_or_default().to_owned()),
                reason: header(&m.headers, H_REASON).unwrap_or_default().to_owned(),
                deliveries: number(H_DELIVERIES).and_then(|d| u32::try_from(d).ok()),
                dead_at_us: number(H_DEAD_AT).unwrap_or(0),
                payload: m.payload.to_vec(),
            });
        }
        Ok(out)
    }

    /// Reads the dead-letter stream in order until the dead letter listed as `id` shows (one
    /// direct get per dead letter before it), publishes its package to the work stream
    /// (acknowledged by JetStream: a new sequence, first delivery again), then deletes the dead
    /// letter. If a concurrent requeue deleted it first, the copy made here is withdrawn again
    /// (when not yet delivered) and the answer is `false`.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let n = &self.inner.names;
        let Some((seq, payload)) = self.find_dead(id).await? else {
            return Ok(false);
        };
        let copies = self
            .publish_all(&n.work_subject, vec![(None, payload)])
            .await?;
        if self.delete_message(&n.dead_stream, seq).await? {
            tracing::info!(message_id = %id, new_id = ?copies.first(), "nats: dead letter requeued");
            return Ok(true);
        }
        for copy in copies {
            self.delete_message(&n.work_stream, copy).await?;
        }
        Ok(false)
    }

    /// Finds the dead letter like `requeue_dead` and deletes it from the dead-letter stream.
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((seq, _)) = self.find_dead(id).await? else {
            return Ok(false);
        };
        self.delete_message(&self.inner.names.dead_stream, seq)
            .await
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let state = self
            .stream_state(&self.inner.names.dead_stream, None)
            .await?;
        Ok(Some(state.map_or(0, |s| s.messages)))
    }

    /// Removes the packages never delivered so far. NATS keeps a package that was given back
    /// (`fail`, a lease that ran out) in the consumer's pending set until it is delivered
    /// again, indistinguishable from one in flight: such packages are neither removed nor
    /// counted. With nothing in flight the stream is purged in one call; otherwise the waiting
    /// packages are deleted one by one (pipelined) by sequence.
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let n = &self.inner.names;
        let Some(c) = self.consumer_state().await? else {
            return Ok(0);
        };
        if c.num_pending == 0 {
            return Ok(0);
        }
        if c.num_ack_pending == 0 {
            return self
                .purge_subject(&n.work_stream, &n.work_subject, None)
                .await;
        }
        let Some(s) = self.stream_state(&n.work_stream, None).await? else {
            return Ok(0);
        };
        let first = c.delivered.stream_seq + 1;
        let results: Vec<Result<bool, BrokerError>> = futures::stream::iter(first..=s.last_seq)
            .map(|seq| self.delete_message(&n.work_stream, seq))
            .buffer_unordered(64)
            .collect()
            .await;
        let mut purged = 0;
        for r in results {
            purged += u64::from(r?);
        }
        Ok(purged)
    }

    /// Deletes the work stream (its consumer with it), the dead letters and the ledger. A
    /// handle used afterwards creates the queue again.
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        let n = &self.inner.names;
        for stream in [&n.work_stream, &n.dead_stream, &n.ledger_stream] {
            match self
                .api::<Success>(
                    "delete queue",
                    format!("STREAM.DELETE.{stream}"),
                    serde_json::json!({}),
                )
                .await?
            {
                Ok(_) => {}
                Err(e) if e.err_code == STREAM_NOT_FOUND => {}
                Err(e) => return Err(self.refused("delete queue", e)),
            }
        }
        self.inner.deleted.store(true, Ordering::Release);
        Ok(())
    }

    /// Never delivered so far (the consumer's `num_pending`).
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        Ok(self.consumer_state().await?.map_or(0, |c| c.num_pending))
    }

    /// The consumer's `num_ack_pending`: in flight, plus given-back packages not yet delivered
    /// again (NATS does not tell them apart).
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        Ok(Some(
            self.consumer_state()
                .await?
                .map_or(0, |c| c.num_ack_pending),
        ))
    }

    /// A round trip to the server (flush) and one to JetStream, each within `connect_timeout`.
    async fn ping(&self) -> Result<(), BrokerError> {
        let i = &self.inner;
        let timeout = |operation| BrokerError::Timeout {
            broker: NAME,
            operation,
            endpoint: i.endpoint.clone(),
            after: i.api_timeout,
        };
        tokio::time::timeout(i.api_timeout, i.client.flush())
            .await
            .map_err(|_| timeout("ping"))?
            .map_err(|e| BrokerError::Unreachable {
                broker: NAME,
                endpoint: i.endpoint.clone(),
                message: scrub(&i.secrets, e.to_string()),
            })?;
        tokio::time::timeout(
            i.api_timeout,
            self.stream_state(&i.names.stats_stream, None),
        )
        .await
        .map_err(|_| timeout("ping"))??;
        Ok(())
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let n = &i.names;
        let details = BTreeMap::from([
            ("stream".to_owned(), n.work_stream.clone()),
            ("subject".to_owned(), n.work_subject.clone()),
            ("consumer".to_owned(), n.consumer.clone()),
            ("dead_letter_stream".to_owned(), n.dead_stream.clone()),
            ("ledger_stream".to_owned(), n.ledger_stream.clone()),
            ("stats_stream".to_owned(), n.stats_stream.clone()),
            ("max_payload".to_owned(), i.server_max_payload.to_string()),
            (
                "max_message_size".to_owned(),
                i.max_message_size.to_string(),
            ),
        ]);
        Ok(BrokerInfo {
            broker: NAME.to_owned(),
            server: Some(format!("nats-server {}", i.server_version)),
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.settings.retry.as_secs_f64()),
            notes: vec![
                "at least once: a package not settled within its lease (retry = the consumer's ack wait) is delivered again".into(),
                "extend: NATS restarts a lease at retry only; a longer extension is kept by the extending handle (repeated +WPI)".into(),
                "receipts settle on any handle; stale ones are recognised after their lease".into(),
                "requeue_dead and delete_dead read the dead-letter stream in order until the id shows (one get per dead letter before it)".into(),
                "first in, first out: no priorities; no enqueue delay (fail_after delays work)".into(),
                "packages given back (fail, lease ran out) count as in flight until delivered again, and purge leaves them".into(),
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
            priority: false,
            delay: false,
            stats: true,
            extend: true,
        }
    }

    /// One subject per key (max one message per subject); the expiry travels in a header
    /// because NATS 2.9 has no per-message TTL, and `get_stats` drops expired values.
    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        self.check_size(value.len())?;
        let expires = now_ms().saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX));
        let mut h = HeaderMap::new();
        h.insert(H_EXPIRES, expires.to_string().as_str());
        let subject = self.inner.names.stat_subject(key);
        self.publish_all(&subject, vec![(Some(h), Bytes::copy_from_slice(value))])
            .await?;
        Ok(())
    }

    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let n = &self.inner.names;
        let filter = format!("{}.*", n.stats_subject);
        let Some(state) = self.stream_state(&n.stats_stream, Some(&filter)).await? else {
            return Ok(Vec::new());
        };
        let keys: Vec<(String, String)> = state
            .subjects
            .unwrap_or_default()
            .into_keys()
            .filter_map(|s| n.stat_key(&s).map(|k| (s, k)))
            .filter(|(_, k)| k.starts_with(prefix))
            .collect();
        let now = now_ms();
        let mut out = Vec::new();
        for (subject, key) in keys {
            let Some(m) = self.get_last(&n.stats_stream, &subject).await? else {
                continue;
            };
            let expires = header(&m.headers, H_EXPIRES).and_then(|v| v.parse::<u64>().ok());
            if expires.is_some_and(|e| e <= now) {
                // Expired: remove it (not a newer value written meanwhile) so that the
                // subject list stays short.
                let below = Some(m.sequence + 1);
                if let Err(e) = self.purge_subject(&n.stats_stream, &subject, below).await {
                    tracing::debug!("nats: expired stat {key:?} kept: {e}");
                }
                continue;
            }
            out.push(Stat {
                key,
                value: m.payload.to_vec(),
            });
        }
        Ok(out)
    }
}
