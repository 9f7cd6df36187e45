//! The Amazon SQS broker.
//!
//! Layout: one SQS queue per cluster queue (its name mapped to SQS's alphabet, see `names.rs`),
//! plus a dead-letter queue: the one the queue's `RedrivePolicy` names, else `<queue>-dead`
//! (`<queue>-dead.fifo`), which this adapter creates on the first dead letter and removes with
//! the queue. Packages travel as base64url text (SQS carries text only).
//!
//! The promise: a delivered package is invisible for `retry` (SQS's visibility timeout) and is
//! delivered again unless acknowledged; `fail` makes it visible at once; nothing is dropped
//! silently (an `enqueue_many` that could not store some packages says which). Receipts carry
//! SQS's receipt handle and the lease's deadline, so they settle on any handle of the queue; a
//! receipt whose lease has run out is ignored (the trait's stale receipt), which this adapter
//! decides itself because SQS and its emulators do not always refuse an old receipt handle.
//! Every call is bounded in time (`connect_timeout`, `timeout`); secrets never appear in
//! `Debug`, `info` or errors.
//!
//! # Receipts and stale receipts
//!
//! A receipt is `deadline|deliveries|message id|receipt handle`. The deadline is the wall
//! clock at which the lease is taken as run out: `retry` − a margin (a quarter of `retry`, at
//! most 500 ms) after the receive (after its sending for a short poll, its answer for a long
//! poll). The handle that dequeued or extended a receipt keeps its own record of the deadline
//! on the monotonic clock, which it reads instead: `extend` moves it either way (the lease now
//! ends `by` from the call, perhaps sooner than before), and a wall clock stepping back cannot
//! stretch it. Those records expire shortly after the receipt's own deadline, settled or not.
//! After the deadline `acknowledge`, `fail`, `dead_letter` and `extend` do nothing
//! (`extend` answers `false`), so a late settle cannot touch the next holder's lease: moto
//! takes *any* receipt handle a message ever had (deleting or re-showing the message someone
//! else now holds), and SQS itself may delete on an old handle. `delete` ignores the deadline
//! (it removes the message whatever its lease). A receipt extended on one handle and settled
//! on another after the original deadline is ignored there; the cluster settles on the handle
//! that extends. Handles on other machines rely on clocks agreeing to within the margin.
//!
//! # Dead letters: requeue and delete
//!
//! SQS cannot fetch a message by id, so `requeue_dead` and `delete_dead` **scan the dead-letter
//! queue**: they receive it 10 messages at a time (each hidden for 30 s meanwhile) until the id
//! shows, the queue answers empty, or 10,000 messages were looked at; every message passed over
//! is made visible again as soon as the search ends. The cost is one `ReceiveMessage` per 10
//! dead letters (plus a 1 s long poll at the end when the id is not found). `requeue_dead` then
//! sends the body to the queue as a new message (first delivery again, default group on FIFO)
//! and deletes the dead letter only after SQS stored it. Two concurrent searches may hide each
//! other's target: the losing one answers `false` (not found) although the letter exists.
//!
//! # Purge
//!
//! SQS's `PurgeQueue` deletes messages in flight too, which the trait forbids; so it is used
//! only when nothing is in flight, and otherwise the visible messages are received and deleted.
#![warn(missing_docs)]

mod error;
mod names;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_config::BehaviorVersion;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_sqs::Client;
use aws_sdk_sqs::config::{Credentials, Region};
use aws_sdk_sqs::types::{
    ChangeMessageVisibilityBatchRequestEntry, DeleteMessageBatchRequestEntry,
    MessageAttributeValue, MessageSystemAttributeName, QueueAttributeName,
    SendMessageBatchRequestEntry,
};
use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, async_trait, mask_url, redact,
};

use error::{Fail, Kind};

/// Most messages one SQS call sends, receives or deletes.
pub const MAX_BULK: usize = 10;
/// Longest visibility timeout SQS allows (12 hours): the longest `retry` and lease extension.
pub const MAX_VISIBILITY: Duration = Duration::from_secs(43_200);
/// Longest per-message delay SQS allows (15 minutes).
pub const MAX_DELAY: Duration = Duration::from_secs(900);
/// SQS's own cap on a message (and on a whole batch), in bytes of text: 1 MiB.
pub const SQS_MAX_MESSAGE_SIZE: usize = 1024 * 1024;
/// Bytes of a message's limit kept for the attributes a dead letter carries.
const ATTRIBUTE_HEADROOM: usize = 1024;
/// Longest dead-letter reason stored (bytes); longer ones are cut.
const MAX_REASON: usize = 512;
/// Longest long poll SQS allows.
const MAX_WAIT_SECS: u64 = 20;
const NAME: &str = "sqs";
const ATTR_REASON: &str = "qcluster-reason";
const ATTR_DELIVERIES: &str = "qcluster-deliveries";
const ATTR_DEAD_AT: &str = "qcluster-dead-at-us";
const ATTR_MESSAGE_ID: &str = "qcluster-message-id";
/// Most dead-letter-queue messages `requeue_dead` / `delete_dead` look through for one id.
const MAX_SCAN: usize = 10_000;
/// How long a message received while searching the dead-letter queue stays hidden if this
/// process dies before making it visible again (seconds).
const SCAN_VISIBILITY: i32 = 30;

/// `[sqs]` settings. Unknown keys are refused; `Debug` masks the secret key and session token.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SqsConfig {
    /// AWS region (`us-east-1`); `None` reads the standard chain (`AWS_REGION`, profile), else
    /// `us-east-1`.
    pub region: Option<String>,
    /// Another endpoint than AWS's (an emulator, a VPC endpoint), e.g. `http://127.0.0.1:9324`.
    pub endpoint_url: Option<String>,
    /// The SQS queue name; `None` takes the cluster's queue name (mapped to SQS's alphabet).
    /// A name ending in `.fifo` is a FIFO queue.
    pub queue: Option<String>,
    /// Create the queue when it is missing (true), or require it to exist (false).
    pub create: bool,
    /// Use a FIFO queue: `.fifo` is added to the queue name when it lacks it. A `queue` ending
    /// in `.fifo` is FIFO anyway.
    pub fifo: bool,
    /// Explicit credentials (with `secret_access_key`); `None` uses the standard chain
    /// (environment, profile, web identity, ECS/EC2 metadata).
    pub access_key_id: Option<String>,
    /// The secret of `access_key_id`. Never shown.
    pub secret_access_key: Option<String>,
    /// A session token for temporary credentials. Never shown.
    pub session_token: Option<String>,
    /// Longest wait to open a connection, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// Longest time one SQS call may take, SDK retries included (a long poll adds its wait).
    #[serde(with = "broker_core::secs")]
    pub timeout: Duration,
}

impl Default for SqsConfig {
    fn default() -> Self {
        Self {
            region: None,
            endpoint_url: None,
            queue: None,
            create: true,
            fifo: false,
            access_key_id: None,
            secret_access_key: None,
            session_token: None,
            connect_timeout: Duration::from_secs(3),
            timeout: Duration::from_secs(20),
        }
    }
}

impl fmt::Debug for SqsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hide = |s: &Option<String>| s.as_ref().map(|_| "***");
        f.debug_struct("SqsConfig")
            .field("region", &self.region)
            .field("endpoint_url", &self.endpoint_url.as_deref().map(mask_url))
            .field("queue", &self.queue)
            .field("create", &self.create)
            .field("fifo", &self.fifo)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &hide(&self.secret_access_key))
            .field("session_token", &hide(&self.session_token))
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// Where dead letters go.
#[derive(Debug, Clone)]
enum DeadPlace {
    /// The queue named by the queue's `RedrivePolicy` (the operator's; never deleted here).
    Redrive { name: String, account: String },
    /// `<queue>-dead`, created on the first dead letter and deleted with the queue.
    Managed { name: String },
}

/// A receipt: `deadline_ms|deliveries|message_id|receipt_handle`.
struct Receipt {
    /// Wall clock (ms since the epoch) after which the lease is taken as run out.
    deadline_ms: u64,
    deliveries: u32,
    message_id: String,
    handle: String,
}

impl Receipt {
    fn to_ack(&self) -> AckId {
        AckId::new(format!(
            "{}|{}|{}|{}",
            self.deadline_ms, self.deliveries, self.message_id, self.handle
        ))
    }

    fn parse(ack: &AckId) -> Result<Self, BrokerError> {
        let bad = || BrokerError::InvalidReceipt {
            broker: NAME,
            receipt: ack.as_str().chars().take(200).collect(),
        };
        let mut parts = ack.as_str().splitn(4, '|');
        let deadline_ms = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let deliveries = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
        let message_id = parts.next().ok_or_else(bad)?.to_owned();
        let handle = parts.next().filter(|h| !h.is_empty()).ok_or_else(bad)?;
        Ok(Self {
            deadline_ms,
            deliveries,
            message_id,
            handle: handle.to_owned(),
        })
    }
}

/// How long a lease record outlives the moment its receipt alone reads as stale, so that a wall
/// clock stepping back a little does not bring a settled receipt back to life.
const KEEP_GRACE: Duration = Duration::from_secs(10);
/// Least time between two sweeps of the lease table.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// What this handle knows about a delivery it made, extended or settled.
struct Held {
    /// When the lease is taken as run out, on the monotonic clock: the dequeue's deadline, or
    /// the latest `extend`'s (which may be earlier: `extend` counts from now).
    deadline: Instant,
    /// The record is needed until then: afterwards the receipt's own deadline reads as stale
    /// too, so forgetting the record cannot make a settled or shortened lease look held.
    keep_until: Instant,
    /// The message body as received, for `dead_letter` (SQS cannot read a message by receipt);
    /// dropped when the lease is settled or runs out.
    body: Option<String>,
    settled: bool,
}

/// A handle's lease records, keyed by SQS receipt handle. Every record expires (`keep_until` +
/// [`KEEP_GRACE`]), whether or not its receipt is ever settled, and every call that adds one
/// sweeps (at most once per [`SWEEP_EVERY`]), so the table holds the leases of the last `retry`
/// or so, not the handle's history.
#[derive(Default)]
struct Leases {
    map: HashMap<String, Held>,
    swept: Option<Instant>,
}

impl Leases {
    fn sweep(&mut self, now: Instant) {
        if self
            .swept
            .is_some_and(|t| now.saturating_duration_since(t) < SWEEP_EVERY)
        {
            return;
        }
        self.swept = Some(now);
        self.map.retain(|_, h| {
            if h.deadline <= now {
                h.body = None;
            }
            h.keep_until + KEEP_GRACE > now
        });
    }

    /// A delivery just received: held until `deadline`, body kept for `dead_letter`.
    fn hold(&mut self, handle: &str, deadline: Instant, body: String, now: Instant) {
        self.sweep(now);
        self.map.insert(
            handle.to_owned(),
            Held {
                deadline,
                keep_until: deadline,
                body: Some(body),
                settled: false,
            },
        );
    }

    /// `Some(held)` when this table knows the receipt handle, `None` when it does not.
    fn live(&self, handle: &str, now: Instant) -> Option<bool> {
        self.map.get(handle).map(|h| !h.settled && now < h.deadline)
    }

    /// The lease now runs out at `deadline`; `receipt_until` is when the receipt's own
    /// deadline passes.
    fn extend(&mut self, handle: &str, deadline: Instant, receipt_until: Instant, now: Instant) {
        self.sweep(now);
        let h = self.map.entry(handle.to_owned()).or_insert(Held {
            deadline,
            keep_until: deadline,
            body: None,
            settled: false,
        });
        if !h.settled {
            h.deadline = deadline;
        }
        h.keep_until = h.keep_until.max(deadline).max(receipt_until);
    }

    /// The delivery was settled: its receipt is dead from now on, the body is dropped.
    fn settle(&mut self, handle: &str, receipt_until: Instant, now: Instant) {
        self.sweep(now);
        let h = self.map.entry(handle.to_owned()).or_insert(Held {
            deadline: now,
            keep_until: receipt_until,
            body: None,
            settled: true,
        });
        h.settled = true;
        h.body = None;
        h.keep_until = h.keep_until.max(receipt_until);
    }

    fn body(&self, handle: &str) -> Option<String> {
        self.map.get(handle).and_then(|h| h.body.clone())
    }

    fn clear(&mut self) {
        self.map.clear();
    }
}

/// A package ready to send: checked, encoded, with its FIFO fields.
struct Outgoing {
    body: String,
    delay: Option<i32>,
    group: Option<String>,
    dedup: Option<String>,
}

struct Inner {
    client: Client,
    config: SqsConfig,
    settings: QueueSettings,
    endpoint: String,
    region: String,
    queue_name: String,
    queue_url: std::sync::RwLock<String>,
    fifo: bool,
    /// The queue's `MaximumMessageSize` at connect (text bytes).
    queue_max: usize,
    /// Largest raw package accepted.
    raw_limit: usize,
    /// Most text bytes in one `SendMessageBatch`.
    batch_limit: usize,
    visibility_secs: i32,
    /// Long poll seconds; 0 with a `wait` under a second (short polls every `poll` instead).
    wait_secs: i32,
    /// Margin taken off each lease's deadline (the server's lease starts before we see it).
    margin_ms: u64,
    dead: DeadPlace,
    dead_url: tokio::sync::Mutex<Option<String>>,
    held: std::sync::Mutex<Leases>,
    secrets: Vec<String>,
    requests: AtomicU64,
    last_purge: std::sync::Mutex<Option<Instant>>,
    queue_visibility: Option<String>,
}

/// A queue on Amazon SQS (or an API-compatible server). Cheap to clone.
#[derive(Clone)]
pub struct SqsBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for SqsBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqsBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("region", &self.inner.region)
            .field("queue", &self.inner.queue_name)
            .field("fifo", &self.inner.fifo)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// When the deadline a receipt carries passes, on the monotonic clock (at most a little over
/// SQS's longest visibility timeout from now, whatever the receipt says).
fn receipt_until(r: &Receipt, now: Instant) -> Instant {
    let left = Duration::from_millis(r.deadline_ms.saturating_sub(now_ms()))
        .min(MAX_VISIBILITY + Duration::from_secs(60));
    now.checked_add(left).unwrap_or(now)
}

/// Whole seconds, rounded up, at most `max`.
fn secs_up(d: Duration, max: Duration) -> i32 {
    let d = d.min(max);
    let s = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    i32::try_from(s).unwrap_or(i32::MAX)
}

/// A FIFO group or deduplication id: up to 128 characters of ASCII punctuation and
/// alphanumerics; anything else is replaced by a hash of it.
fn fifo_token(s: &str) -> String {
    if !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_graphic()) {
        s.to_owned()
    } else {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in s.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("h-{h:016x}-{}", s.len())
    }
}

fn decode_body(body: &str) -> Vec<u8> {
    match broker_core::text::from_text(body) {
        Some(b) => b,
        None => {
            // Not ours (someone else's message): handed on as it is, so the codec refuses it
            // and the cluster quarantines it instead of retrying it forever.
            tracing::warn!("SQS message body is not base64url; delivered as raw text");
            body.as_bytes().to_vec()
        }
    }
}

fn attr_string(
    value: impl Into<String>,
    data_type: &str,
) -> Result<MessageAttributeValue, BrokerError> {
    MessageAttributeValue::builder()
        .data_type(data_type)
        .string_value(value)
        .build()
        .map_err(|e| BrokerError::Backend {
            broker: NAME,
            message: format!("message attribute: {e}"),
        })
}

fn cut(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

impl SqsBroker {
    /// Opens the queue (creating it when `create` holds), reads its attributes and limits.
    /// Bounded by `connect_timeout` + `timeout`; errors name the masked endpoint.
    pub async fn connect(
        config: &SqsConfig,
        settings: QueueSettings,
    ) -> Result<SqsBroker, BrokerError> {
        let mut settings = settings;
        if settings.bulk > MAX_BULK {
            tracing::warn!(
                bulk = settings.bulk,
                "SQS returns at most {MAX_BULK} messages per receive: bulk clamped to {MAX_BULK}"
            );
            settings.bulk = MAX_BULK;
        }
        settings.validate(MAX_BULK)?;
        if settings.retry > MAX_VISIBILITY {
            return Err(BrokerError::config(
                "retry",
                format!(
                    "is {} s; SQS keeps a received message invisible for at most 12 hours \
                     (43200 s)",
                    settings.retry.as_secs()
                ),
            ));
        }
        match (&config.access_key_id, &config.secret_access_key) {
            (Some(_), None) => {
                return Err(BrokerError::config(
                    "sqs.secret_access_key",
                    "is missing while sqs.access_key_id is set (give both, or neither to use \
                     the standard credential chain)",
                ));
            }
            (None, Some(_)) => {
                return Err(BrokerError::config(
                    "sqs.access_key_id",
                    "is missing while sqs.secret_access_key is set (give both, or neither)",
                ));
            }
            _ => {}
        }
        if config.session_token.is_some() && config.access_key_id.is_none() {
            return Err(BrokerError::config(
                "sqs.session_token",
                "needs sqs.access_key_id and sqs.secret_access_key",
            ));
        }
        if let Some(u) = &config.endpoint_url {
            let ok = url::Url::parse(u)
                .map(|p| matches!(p.scheme(), "http" | "https") && p.host().is_some())
                .unwrap_or(false);
            if !ok {
                return Err(BrokerError::config(
                    "sqs.endpoint_url",
                    format!("{} is not an http:// or https:// URL", mask_url(u)),
                ));
            }
        }
        for (key, value) in [
            ("sqs.connect_timeout", config.connect_timeout),
            ("sqs.timeout", config.timeout),
        ] {
            if value.is_zero() {
                return Err(BrokerError::config(key, "must be greater than zero"));
            }
        }
        let with_fifo = |q: &str| {
            if config.fifo && !q.ends_with(names::FIFO_SUFFIX) {
                format!("{q}{}", names::FIFO_SUFFIX)
            } else {
                q.to_owned()
            }
        };
        let (queue_name, dead_name, fifo) = match config.queue.as_deref().map(with_fifo) {
            Some(q) => {
                if !names::valid(&q) {
                    return Err(BrokerError::config(
                        "sqs.queue",
                        format!(
                            "{q:?} is not an SQS queue name (1 to 80 of A-Z a-z 0-9 - _, \
                             `.fifo` at the end for a FIFO queue)"
                        ),
                    ));
                }
                let (_, dead, fifo) = names::sqs_names(&q);
                (q, dead, fifo)
            }
            None => names::sqs_names(&with_fifo(&settings.queue)),
        };

        // Whole seconds of long polling; under a second, short polls every `poll`.
        let wait_secs = i32::try_from(settings.wait.as_secs().min(MAX_WAIT_SECS)).unwrap_or(0);
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
                aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
            ))
            .build_https();
        let call_limit = config.timeout + Duration::from_secs(wait_secs.unsigned_abs().into());
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_attempt_timeout(call_limit)
            .operation_timeout(call_limit)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .timeout_config(timeouts);
        if let Some(r) = &config.region {
            loader = loader.region(Region::new(r.clone()));
        }
        if let Some(u) = &config.endpoint_url {
            loader = loader.endpoint_url(u.clone());
        }
        if let (Some(id), Some(secret)) = (&config.access_key_id, &config.secret_access_key) {
            loader = loader.credentials_provider(Credentials::new(
                id.clone(),
                secret.clone(),
                config.session_token.clone(),
                None,
                "qcluster-config",
            ));
        }
        let endpoint = match &config.endpoint_url {
            Some(u) => mask_url(u),
            None => "aws".to_owned(),
        };
        // Scrubbed from every message: the secret key, the session token, and a password in
        // the endpoint URL (an SDK error may quote the URL it could not reach).
        let url_password = config
            .endpoint_url
            .as_deref()
            .and_then(|u| url::Url::parse(u).ok())
            .and_then(|u| u.password().map(str::to_owned));
        let secrets: Vec<String> = [
            config.secret_access_key.clone(),
            config.session_token.clone(),
            url_password,
        ]
        .into_iter()
        .flatten()
        .filter(|s| !s.is_empty())
        .collect();
        let budget = config.connect_timeout + config.timeout;
        let opened = tokio::time::timeout(budget, async {
            let sdk = loader.load().await;
            let mut conf = aws_sdk_sqs::config::Builder::from(&sdk);
            if sdk.region().is_none() {
                conf = conf.region(Region::new("us-east-1"));
            }
            let region = sdk
                .region()
                .map(|r| r.to_string())
                .unwrap_or_else(|| "us-east-1".to_owned());
            let endpoint = match &config.endpoint_url {
                Some(_) => endpoint.clone(),
                None => format!("https://sqs.{region}.amazonaws.com"),
            };
            let client = Client::from_conf(conf.build());
            let probe = Probe {
                client: &client,
                endpoint: &endpoint,
                secrets: &secrets,
                timeout: config.timeout,
            };
            let url = probe.resolve(&queue_name, fifo, config.create).await?;
            let attrs = probe.attributes(&url).await?;
            Ok::<_, BrokerError>((client, region, endpoint, url, attrs))
        })
        .await;
        let (client, region, endpoint, url, attrs) = match opened {
            Ok(r) => r?,
            Err(_) => {
                return Err(BrokerError::Timeout {
                    broker: NAME,
                    operation: "connect",
                    endpoint,
                    after: budget,
                });
            }
        };
        let queue_max = attrs
            .get("MaximumMessageSize")
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(SQS_MAX_MESSAGE_SIZE)
            .min(SQS_MAX_MESSAGE_SIZE);
        let own_raw = broker_core::text::raw_fitting(queue_max.saturating_sub(ATTRIBUTE_HEADROOM));
        let raw_limit = settings
            .max_message_size
            .map_or(own_raw, |m| m.min(own_raw));
        let dead = match attrs
            .get("RedrivePolicy")
            .and_then(|p| serde_json::from_str::<serde_json::Value>(p).ok())
            .and_then(|v| v.get("deadLetterTargetArn")?.as_str().map(str::to_owned))
        {
            Some(arn) => {
                // arn:aws:sqs:<region>:<account>:<name>
                let parts: Vec<&str> = arn.split(':').collect();
                match parts.as_slice() {
                    [.., account, name] if parts.len() >= 6 => DeadPlace::Redrive {
                        name: (*name).to_owned(),
                        account: (*account).to_owned(),
                    },
                    _ => {
                        return Err(BrokerError::config(
                            "sqs.queue",
                            format!("the queue's RedrivePolicy names {arn:?}, not a queue ARN"),
                        ));
                    }
                }
            }
            None => DeadPlace::Managed { name: dead_name },
        };
        let retry_ms = u64::try_from(settings.retry.as_millis()).unwrap_or(u64::MAX);
        Ok(SqsBroker {
            inner: Arc::new(Inner {
                client,
                config: config.clone(),
                visibility_secs: secs_up(settings.retry, MAX_VISIBILITY),
                margin_ms: (retry_ms / 4).min(500),
                settings,
                endpoint,
                region,
                queue_name,
                queue_url: std::sync::RwLock::new(url),
                fifo,
                queue_max,
                raw_limit,
                batch_limit: queue_max,
                wait_secs,
                dead,
                dead_url: tokio::sync::Mutex::new(None),
                held: std::sync::Mutex::new(Leases::default()),
                secrets,
                requests: AtomicU64::new(0),
                last_purge: std::sync::Mutex::new(None),
                queue_visibility: attrs.get("VisibilityTimeout").cloned(),
            }),
        })
    }

    /// SQS requests this handle has sent (SDK-level retries not counted): for cost estimates.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The SQS queue's URL.
    pub fn queue_url(&self) -> String {
        self.url()
    }

    /// Whether the queue is a FIFO queue.
    pub fn is_fifo(&self) -> bool {
        self.inner.fifo
    }

    fn url(&self) -> String {
        match self.inner.queue_url.read() {
            Ok(u) => u.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    fn count(&self, n: u64) {
        self.inner.requests.fetch_add(n, Ordering::Relaxed);
    }

    fn scrub(&self, m: &str) -> String {
        let mut m = m.to_owned();
        for s in &self.inner.secrets {
            m = redact(&m, Some(s));
        }
        m
    }

    fn err(&self, op: &'static str, f: Fail) -> BrokerError {
        let message = self.scrub(&format!("{op}: {}", f.message));
        match f.kind {
            Kind::Unreachable => BrokerError::Unreachable {
                broker: NAME,
                endpoint: self.inner.endpoint.clone(),
                message,
            },
            Kind::Timeout => BrokerError::Timeout {
                broker: NAME,
                operation: op,
                endpoint: self.inner.endpoint.clone(),
                after: self.inner.config.timeout,
            },
            Kind::Service if f.missing_queue() && !self.inner.config.create => BrokerError::config(
                "sqs.queue",
                format!(
                    "queue {} no longer exists at {} and sqs.create is false",
                    self.inner.queue_name, self.inner.endpoint
                ),
            ),
            Kind::Service => BrokerError::Backend {
                broker: NAME,
                message,
            },
        }
    }

    /// Runs `call` on the queue's URL; when the queue has gone (deleted by `delete_queue` or by
    /// hand) and `create` holds, creates it again and runs `call` once more.
    async fn on_queue<T, F, Fut>(&self, op: &'static str, call: F) -> Result<T, BrokerError>
    where
        F: Fn(Client, String) -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        self.count(1);
        match call(self.inner.client.clone(), self.url()).await {
            Err(f) if f.missing_queue() && self.inner.config.create => {
                self.recreate().await?;
                self.count(1);
                call(self.inner.client.clone(), self.url())
                    .await
                    .map_err(|f| self.err(op, f))
            }
            r => r.map_err(|f| self.err(op, f)),
        }
    }

    /// Runs `call` on the queue's URL; `Ok(None)` when the queue is not there.
    async fn if_queue<T, F, Fut>(&self, op: &'static str, call: F) -> Result<Option<T>, BrokerError>
    where
        F: FnOnce(Client, String) -> Fut,
        Fut: Future<Output = Result<T, Fail>>,
    {
        self.count(1);
        match call(self.inner.client.clone(), self.url()).await {
            Ok(v) => Ok(Some(v)),
            Err(f) if f.missing_queue() => Ok(None),
            Err(f) => Err(self.err(op, f)),
        }
    }

    async fn recreate(&self) -> Result<(), BrokerError> {
        tracing::info!(queue = %self.inner.queue_name, "SQS queue missing: creating it again");
        self.count(1);
        let url = create_queue(&self.inner.client, &self.inner.queue_name, self.inner.fifo)
            .await
            .map_err(|f| self.err("create queue", f))?;
        match self.inner.queue_url.write() {
            Ok(mut u) => *u = url,
            Err(p) => *p.into_inner() = url,
        }
        Ok(())
    }

    fn outgoing(&self, m: &Message) -> Result<Outgoing, BrokerError> {
        let i = &self.inner;
        if m.payload.len() > i.raw_limit {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size: m.payload.len(),
                limit: i.raw_limit,
            });
        }
        let delay = match m.delay {
            None => None,
            Some(d) if d.is_zero() => None,
            Some(_) if i.fifo => {
                return Err(BrokerError::Unsupported {
                    broker: NAME,
                    operation: "a per-message delay on a FIFO queue (SQS delays FIFO queues \
                                as a whole only; nothing was sent)",
                });
            }
            Some(d) if d > MAX_DELAY => {
                return Err(BrokerError::Unsupported {
                    broker: NAME,
                    operation: "a delay over 900 s (SQS's limit; nothing was sent)",
                });
            }
            Some(d) => Some(secs_up(d, MAX_DELAY)),
        };
        let (group, dedup) = if i.fifo {
            let group = fifo_token(m.group.as_deref().unwrap_or(&i.queue_name));
            let dedup = match &m.key {
                Some(k) => fifo_token(k),
                None => uuid::Uuid::new_v4().simple().to_string(),
            };
            (Some(group), Some(dedup))
        } else {
            (None, None)
        };
        Ok(Outgoing {
            body: broker_core::text::to_text(&m.payload),
            delay,
            group,
            dedup,
        })
    }

    fn leases(&self) -> std::sync::MutexGuard<'_, Leases> {
        self.inner
            .held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether this receipt's lease is still held, as far as this handle can tell: by its own
    /// record (monotonic clock; an `extend` may have moved the deadline either way) where it has
    /// one, else by the deadline the receipt carries (wall clock).
    fn live(&self, r: &Receipt) -> bool {
        match self.leases().live(&r.handle, Instant::now()) {
            Some(held) => held,
            None => now_ms() < r.deadline_ms,
        }
    }

    fn settled(&self, r: &Receipt) {
        let now = Instant::now();
        let until = receipt_until(r, now);
        self.leases().settle(&r.handle, until, now);
    }

    async fn receive(
        &self,
        max: usize,
        visibility: i32,
        wait: i32,
    ) -> Result<Vec<aws_sdk_sqs::types::Message>, BrokerError> {
        let max = i32::try_from(max.clamp(1, MAX_BULK)).unwrap_or(1);
        let out = self
            .on_queue("dequeue", |c, url| async move {
                c.receive_message()
                    .queue_url(url)
                    .max_number_of_messages(max)
                    .visibility_timeout(visibility)
                    .wait_time_seconds(wait)
                    .message_system_attribute_names(
                        MessageSystemAttributeName::ApproximateReceiveCount,
                    )
                    .send()
                    .await
                    .map_err(Fail::from_sdk)
            })
            .await?;
        Ok(out.messages().to_vec())
    }

    async fn counters(&self) -> Result<HashMap<QueueAttributeName, u64>, BrokerError> {
        let got = self
            .if_queue("queue attributes", |c, url| async move {
                c.get_queue_attributes()
                    .queue_url(url)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
                    .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
                    .send()
                    .await
                    .map_err(Fail::from_sdk)
            })
            .await?;
        Ok(parse_counters(got.as_ref().and_then(|o| o.attributes())))
    }

    /// The dead-letter queue's URL; with `create`, a managed one is created when missing.
    async fn dead_url(&self, create: bool) -> Result<Option<String>, BrokerError> {
        let mut cached = self.inner.dead_url.lock().await;
        if let Some(u) = cached.as_ref() {
            return Ok(Some(u.clone()));
        }
        let c = &self.inner.client;
        let (name, account) = match &self.inner.dead {
            DeadPlace::Redrive { name, account } => (name.clone(), Some(account.clone())),
            DeadPlace::Managed { name } => (name.clone(), None),
        };
        self.count(1);
        let found = c
            .get_queue_url()
            .queue_name(&name)
            .set_queue_owner_aws_account_id(account)
            .send()
            .await
            .map_err(Fail::from_sdk);
        let url = match found {
            Ok(o) => o.queue_url().map(str::to_owned),
            Err(f) if f.missing_queue() => {
                if create && matches!(self.inner.dead, DeadPlace::Managed { .. }) {
                    self.count(1);
                    Some(
                        create_queue(c, &name, self.inner.fifo)
                            .await
                            .map_err(|f| self.err("create dead-letter queue", f))?,
                    )
                } else {
                    None
                }
            }
            Err(f) => return Err(self.err("dead-letter queue", f)),
        };
        cached.clone_from(&url);
        Ok(url)
    }

    /// Makes received dead-letter-queue messages visible again at once (best effort: if this
    /// fails they come back by themselves when their visibility timeout runs out).
    async fn release(&self, url: &str, msgs: &[aws_sdk_sqs::types::Message], op: &str) {
        let c = &self.inner.client;
        for chunk in msgs.chunks(MAX_BULK) {
            let entries: Vec<ChangeMessageVisibilityBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(n, m)| {
                    ChangeMessageVisibilityBatchRequestEntry::builder()
                        .id(n.to_string())
                        .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                        .visibility_timeout(0)
                        .build()
                        .ok()
                })
                .collect();
            self.count(1);
            if let Err(e) = c
                .change_message_visibility_batch()
                .queue_url(url)
                .set_entries(Some(entries))
                .send()
                .await
            {
                tracing::warn!(
                    error = %self.scrub(&Fail::from_sdk(e).message),
                    "{op}: could not make dead letters visible again (they will be after their \
                     visibility timeout)"
                );
            }
        }
    }

    /// Finds dead letter `id` (the id `dead_letters` lists: the original message's id, else the
    /// dead-letter message's own) by receiving the dead-letter queue 10 at a time, each message
    /// hidden for [`SCAN_VISIBILITY`] meanwhile, until it shows, the queue answers empty or
    /// [`MAX_SCAN`] were seen. Every message passed over is made visible again before this
    /// returns; the one found stays hidden (its receipt handle is in the answer) for the caller
    /// to delete. `None`: not found (or no dead-letter queue).
    async fn find_dead(
        &self,
        id: &MessageId,
        op: &'static str,
    ) -> Result<Option<(String, aws_sdk_sqs::types::Message)>, BrokerError> {
        let Some(url) = self.dead_url(false).await? else {
            return Ok(None);
        };
        let c = &self.inner.client;
        let mut passed: Vec<aws_sdk_sqs::types::Message> = Vec::new();
        let mut found = None;
        let mut failure = None;
        while found.is_none() && passed.len() < MAX_SCAN {
            self.count(1);
            let res = c
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(MAX_BULK as i32)
                .visibility_timeout(SCAN_VISIBILITY)
                .wait_time_seconds(1)
                .message_attribute_names(ATTR_MESSAGE_ID)
                .send()
                .await
                .map_err(Fail::from_sdk);
            let batch = match res {
                Ok(o) => o.messages().to_vec(),
                Err(f) if f.missing_queue() => {
                    self.forget_dead_url().await;
                    break;
                }
                Err(f) => {
                    failure = Some(self.err(op, f));
                    break;
                }
            };
            if batch.is_empty() {
                break;
            }
            for m in batch {
                let listed = m
                    .message_attributes()
                    .and_then(|a| a.get(ATTR_MESSAGE_ID))
                    .and_then(|v| v.string_value())
                    .or(m.message_id());
                if found.is_none() && listed == Some(id.0.as_str()) {
                    found = Some(m);
                } else {
                    passed.push(m);
                }
            }
        }
        self.release(&url, &passed, op).await;
        match failure {
            Some(e) => {
                if let Some(m) = &found {
                    self.release(&url, std::slice::from_ref(m), op).await;
                }
                Err(e)
            }
            None => Ok(found.map(|m| (url, m))),
        }
    }

    /// Deletes a received dead-letter-queue message by its receipt handle.
    async fn delete_dead_message(
        &self,
        url: &str,
        m: &aws_sdk_sqs::types::Message,
        op: &'static str,
    ) -> Result<(), BrokerError> {
        self.count(1);
        self.inner
            .client
            .delete_message()
            .queue_url(url)
            .set_receipt_handle(m.receipt_handle().map(str::to_owned))
            .send()
            .await
            .map(drop)
            .map_err(|f| self.err(op, Fail::from_sdk(f)))
    }

    async fn forget_dead_url(&self) {
        *self.inner.dead_url.lock().await = None;
    }

    async fn change_visibility(&self, r: &Receipt, secs: i32) -> Result<bool, BrokerError> {
        let handle = r.handle.clone();
        self.count(1);
        let res = self
            .inner
            .client
            .change_message_visibility()
            .queue_url(self.url())
            .receipt_handle(handle)
            .visibility_timeout(secs)
            .send()
            .await
            .map_err(Fail::from_sdk);
        match res {
            Ok(_) => Ok(true),
            Err(f) if f.stale_receipt() || f.missing_queue() => Ok(false),
            Err(f) => Err(self.err("change visibility", f)),
        }
    }

    async fn delete_message(&self, r: &Receipt, op: &'static str) -> Result<(), BrokerError> {
        self.count(1);
        let res = self
            .inner
            .client
            .delete_message()
            .queue_url(self.url())
            .receipt_handle(r.handle.clone())
            .send()
            .await
            .map_err(Fail::from_sdk);
        match res {
            Ok(_) => Ok(()),
            Err(f) if f.stale_receipt() || f.missing_queue() => {
                tracing::debug!(message_id = %r.message_id, "{op}: stale receipt ignored");
                Ok(())
            }
            Err(f) => Err(self.err(op, f)),
        }
    }

    /// Sends one batch (indexes into `items`), retrying entries SQS failed on its side twice.
    /// Returns the failures left: `(index, reason)`.
    async fn send_batch(
        &self,
        items: &[Outgoing],
        batch: &[usize],
        ids: &mut [Option<MessageId>],
    ) -> Result<Vec<(usize, String)>, BrokerError> {
        let mut todo: Vec<usize> = batch.to_vec();
        let mut failed = Vec::new();
        for attempt in 0..3 {
            if todo.is_empty() {
                break;
            }
            if attempt > 0 {
                tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
            }
            let entries: Vec<SendMessageBatchRequestEntry> = todo
                .iter()
                .filter_map(|&i| {
                    let o = &items[i];
                    SendMessageBatchRequestEntry::builder()
                        .id(i.to_string())
                        .message_body(o.body.clone())
                        .set_delay_seconds(o.delay)
                        .set_message_group_id(o.group.clone())
                        .set_message_deduplication_id(o.dedup.clone())
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .on_queue("enqueue_many", |c, url| {
                    let entries = entries.clone();
                    async move {
                        c.send_message_batch()
                            .queue_url(url)
                            .set_entries(Some(entries))
                            .send()
                            .await
                            .map_err(Fail::from_sdk)
                    }
                })
                .await;
            let out = match out {
                Ok(o) => o,
                Err(e) => {
                    // The call itself failed (after the SDK's retries): none of these is known
                    // to be stored.
                    failed.extend(todo.iter().map(|&i| (i, e.to_string())));
                    return Ok(failed);
                }
            };
            let stored = out.successful().iter().map(|s| (s.id(), s.message_id()));
            let refused = out.failed().iter().map(|f| {
                let why = self.scrub(&format!("{}: {}", f.code(), f.message().unwrap_or("")));
                (f.id(), f.sender_fault(), why)
            });
            let again = sort_answer(&todo, stored, refused, attempt == 2, ids, &mut failed);
            todo = again;
        }
        Ok(failed)
    }
}

/// Sorts a `SendMessageBatch` answer for the entries `todo` (ids are indexes into `ids`): ids
/// of stored entries go into `ids`, entries refused for good (sender's fault, or `last` try)
/// into `failed`; returns those to try again. Only the entries of `todo` are read from the
/// answer, each once (a stored one stays stored), so `failed` names each package at most once
/// and never one that was stored; entries the answer does not name are not known to be stored.
fn sort_answer<'a>(
    todo: &[usize],
    stored: impl Iterator<Item = (&'a str, &'a str)>,
    refused: impl Iterator<Item = (&'a str, bool, String)>,
    last: bool,
    ids: &mut [Option<MessageId>],
    failed: &mut Vec<(usize, String)>,
) -> Vec<usize> {
    let ours = |id: &str| id.parse::<usize>().ok().filter(|i| todo.contains(i));
    for (id, message_id) in stored {
        if let Some(i) = ours(id) {
            ids[i] = Some(MessageId(message_id.to_owned()));
        }
    }
    let mut again: Vec<usize> = Vec::new();
    let settled = |i: usize, again: &[usize], failed: &[(usize, String)]| {
        ids[i].is_some() || again.contains(&i) || failed.iter().any(|(j, _)| *j == i)
    };
    for (id, sender_fault, why) in refused {
        let Some(i) = ours(id) else {
            continue;
        };
        if settled(i, &again, failed) {
            continue;
        }
        if sender_fault || last {
            failed.push((i, why));
        } else {
            tracing::debug!(index = i, %why, "SendMessageBatch entry failed; retrying");
            again.push(i);
        }
    }
    for &i in todo {
        if !settled(i, &again, failed) {
            failed.push((i, "not in SQS's answer".into()));
        }
    }
    again
}

/// Reads the three message counters of a `GetQueueAttributes` answer (absent ones are 0).
fn parse_counters(
    attrs: Option<&HashMap<QueueAttributeName, String>>,
) -> HashMap<QueueAttributeName, u64> {
    let mut out = HashMap::new();
    for k in [
        QueueAttributeName::ApproximateNumberOfMessages,
        QueueAttributeName::ApproximateNumberOfMessagesNotVisible,
        QueueAttributeName::ApproximateNumberOfMessagesDelayed,
    ] {
        let v = attrs
            .and_then(|a| a.get(&k))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        out.insert(k, v);
    }
    out
}

async fn create_queue(c: &Client, name: &str, fifo: bool) -> Result<String, Fail> {
    let mut req = c.create_queue().queue_name(name);
    if fifo {
        req = req
            .attributes(QueueAttributeName::FifoQueue, "true")
            .attributes(QueueAttributeName::ContentBasedDeduplication, "false");
    }
    let out = req.send().await.map_err(Fail::from_sdk)?;
    Ok(out.queue_url().unwrap_or_default().to_owned())
}

/// Calls made while connecting, before there is a broker to report errors.
struct Probe<'a> {
    client: &'a Client,
    endpoint: &'a str,
    secrets: &'a [String],
    timeout: Duration,
}

impl Probe<'_> {
    fn err(&self, op: &'static str, f: Fail) -> BrokerError {
        let mut message = format!("{op}: {}", f.message);
        for s in self.secrets {
            message = redact(&message, Some(s));
        }
        match f.kind {
            Kind::Unreachable => BrokerError::Unreachable {
                broker: NAME,
                endpoint: self.endpoint.to_owned(),
                message,
            },
            Kind::Timeout => BrokerError::Timeout {
                broker: NAME,
                operation: op,
                endpoint: self.endpoint.to_owned(),
                after: self.timeout,
            },
            Kind::Service => BrokerError::Backend {
                broker: NAME,
                message,
            },
        }
    }

    async fn resolve(&self, name: &str, fifo: bool, create: bool) -> Result<String, BrokerError> {
        let found = self
            .client
            .get_queue_url()
            .queue_name(name)
            .send()
            .await
            .map_err(Fail::from_sdk);
        match found {
            Ok(o) => Ok(o.queue_url().unwrap_or_default().to_owned()),
            Err(f) if f.missing_queue() && create => create_queue(self.client, name, fifo)
                .await
                .map_err(|f| self.err("create queue", f)),
            Err(f) if f.missing_queue() => Err(BrokerError::config(
                "sqs.queue",
                format!(
                    "queue {name} does not exist at {} and sqs.create is false (create it, or \
                     set sqs.create = true)",
                    self.endpoint
                ),
            )),
            Err(f) => Err(self.err("get queue url", f)),
        }
    }

    async fn attributes(&self, url: &str) -> Result<HashMap<String, String>, BrokerError> {
        let out = self
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::All)
            .send()
            .await
            .map_err(|e| self.err("queue attributes", Fail::from_sdk(e)))?;
        Ok(out
            .attributes()
            .map(|a| {
                a.iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect()
            })
            .unwrap_or_default())
    }
}

#[async_trait]
impl Broker for SqsBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let o = self.outgoing(&message)?;
        let out = self
            .on_queue("enqueue", |c, url| {
                let o = &o;
                async move {
                    c.send_message()
                        .queue_url(url)
                        .message_body(o.body.clone())
                        .set_delay_seconds(o.delay)
                        .set_message_group_id(o.group.clone())
                        .set_message_deduplication_id(o.dedup.clone())
                        .send()
                        .await
                        .map_err(Fail::from_sdk)
                }
            })
            .await?;
        Ok(MessageId(out.message_id().unwrap_or_default().to_owned()))
    }

    /// Sends in `SendMessageBatch` calls of at most 10 packages and at most the queue's
    /// message size in text bytes. Every package is checked first: one that is too large (or a
    /// delay SQS refuses) fails the call before anything is sent. Entries SQS fails on its own
    /// side are retried twice. On error, the message lists the positions of the packages that
    /// were not (or not surely) stored; every other package was stored exactly once.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        let items = messages
            .iter()
            .map(|m| self.outgoing(m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut batches: Vec<Vec<usize>> = Vec::new();
        let mut bytes = 0usize;
        for (i, o) in items.iter().enumerate() {
            let len = o.body.len();
            match batches.last_mut() {
                Some(b) if b.len() < MAX_BULK && bytes + len <= self.inner.batch_limit => {
                    b.push(i);
                    bytes += len;
                }
                _ => {
                    batches.push(vec![i]);
                    bytes = len;
                }
            }
        }
        let mut ids: Vec<Option<MessageId>> = vec![None; items.len()];
        let mut failed: Vec<(usize, String)> = Vec::new();
        for b in &batches {
            failed.extend(self.send_batch(&items, b, &mut ids).await?);
        }
        if failed.is_empty() {
            return Ok(ids.into_iter().flatten().collect());
        }
        failed.sort_by_key(|(i, _)| *i);
        let positions: Vec<String> = failed.iter().take(20).map(|(i, _)| i.to_string()).collect();
        let more = if failed.len() > 20 { ", ..." } else { "" };
        let stored = items.len().saturating_sub(failed.len());
        Err(BrokerError::Backend {
            broker: NAME,
            message: format!(
                "enqueue_many: {} of {} packages were not stored, or not surely (positions \
                 {}{more}, counted from 0): {}; the other {stored} were stored",
                failed.len(),
                items.len(),
                positions.join(", "),
                failed[0].1
            ),
        })
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let started = Instant::now();
        let (msgs, base, base_ms) = loop {
            let sent = (Instant::now(), now_ms());
            let got = self
                .receive(i.settings.bulk, i.visibility_secs, i.wait_secs)
                .await?;
            let elapsed = started.elapsed();
            if !got.is_empty() || i.wait_secs > 0 || elapsed >= i.settings.wait {
                // SQS started these leases somewhere between sending and answering. A short
                // poll counts from the sending (the earliest they can have started); a long
                // poll, which may have waited seconds before a message came, from the answer,
                // less the margin.
                let base = if i.wait_secs > 0 {
                    (Instant::now(), now_ms())
                } else {
                    sent
                };
                break (got, base.0, base.1);
            }
            tokio::time::sleep(i.settings.poll.min(i.settings.wait - elapsed)).await;
        };
        let lease = Duration::from_secs(u64::from(i.visibility_secs.unsigned_abs()))
            .saturating_sub(Duration::from_millis(i.margin_ms));
        let deadline = base_ms.saturating_add(u64::try_from(lease.as_millis()).unwrap_or(u64::MAX));
        let until = base.checked_add(lease).unwrap_or(base);
        let mut out = Vec::with_capacity(msgs.len());
        let now = Instant::now();
        let mut held = self.leases();
        for m in msgs {
            let (Some(handle), Some(id)) = (m.receipt_handle(), m.message_id()) else {
                continue;
            };
            let body = m.body().unwrap_or_default();
            let deliveries = m
                .attributes()
                .and_then(|a| a.get(&MessageSystemAttributeName::ApproximateReceiveCount))
                .and_then(|v| v.parse::<u32>().ok());
            let r = Receipt {
                deadline_ms: deadline,
                deliveries: deliveries.unwrap_or(0),
                message_id: id.to_owned(),
                handle: handle.to_owned(),
            };
            held.hold(handle, until, body.to_owned(), now);
            out.push(Delivery {
                ack: r.to_ack(),
                message_id: MessageId(id.to_owned()),
                payload: decode_body(body),
                deliveries,
            });
        }
        Ok(out)
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        if !self.live(&r) {
            tracing::debug!(message_id = %r.message_id, "acknowledge: lease ran out; ignored");
            return Ok(());
        }
        self.delete_message(&r, "acknowledge").await?;
        self.settled(&r);
        Ok(())
    }

    /// `DeleteMessageBatch` calls of 10; stale receipts are skipped or ignored.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let mut live = Vec::with_capacity(acks.len());
        for a in acks {
            let r = Receipt::parse(a)?;
            if self.live(&r) {
                live.push(r);
            }
        }
        for chunk in live.chunks(MAX_BULK) {
            let entries: Vec<DeleteMessageBatchRequestEntry> = chunk
                .iter()
                .enumerate()
                .filter_map(|(n, r)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(n.to_string())
                        .receipt_handle(r.handle.clone())
                        .build()
                        .ok()
                })
                .collect();
            self.count(1);
            let res = self
                .inner
                .client
                .delete_message_batch()
                .queue_url(self.url())
                .set_entries(Some(entries))
                .send()
                .await
                .map_err(Fail::from_sdk);
            match res {
                Ok(out) => {
                    let bad: Vec<String> = out
                        .failed()
                        .iter()
                        .filter(|f| !error::stale_code(f.code(), f.message().unwrap_or("")))
                        .map(|f| format!("{}: {}", f.code(), f.message().unwrap_or("")))
                        .collect();
                    if !bad.is_empty() {
                        return Err(BrokerError::Backend {
                            broker: NAME,
                            message: self.scrub(&format!(
                                "acknowledge_many: {} of {} not acknowledged: {}",
                                bad.len(),
                                chunk.len(),
                                bad[0]
                            )),
                        });
                    }
                }
                Err(f) if f.missing_queue() => {}
                Err(f) => return Err(self.err("acknowledge_many", f)),
            }
            for r in chunk {
                self.settled(r);
            }
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.fail_after(ack, Duration::ZERO).await
    }

    /// The package becomes visible again after `delay` (whole seconds, rounded up, at most
    /// 12 hours: SQS's limit; longer delays are cut to it).
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        if !self.live(&r) {
            tracing::debug!(message_id = %r.message_id, "fail: lease ran out; ignored");
            return Ok(());
        }
        if delay > MAX_VISIBILITY {
            tracing::warn!(
                ?delay,
                "fail_after: SQS holds a message back 12 hours at most"
            );
        }
        self.change_visibility(&r, secs_up(delay, MAX_VISIBILITY))
            .await?;
        self.settled(&r);
        Ok(())
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        self.delete_message(&r, "delete").await?;
        self.settled(&r);
        Ok(())
    }

    /// `ChangeMessageVisibility(by)` (whole seconds, at most 12 hours). `Ok(false)` when the
    /// lease ran out or the receipt was settled (known on this handle), or when SQS refuses the
    /// receipt handle.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let r = Receipt::parse(ack)?;
        if !self.live(&r) {
            return Ok(false);
        }
        let secs = secs_up(by, MAX_VISIBILITY);
        // SQS's new lease starts after the call is sent: counting from before it is safe.
        let before = Instant::now();
        if !self.change_visibility(&r, secs).await? {
            return Ok(false);
        }
        let lease = Duration::from_secs(u64::from(secs.unsigned_abs()))
            .saturating_sub(Duration::from_millis(self.inner.margin_ms));
        let deadline = before.checked_add(lease).unwrap_or(before);
        let now = Instant::now();
        let until = receipt_until(&r, now);
        self.leases().extend(&r.handle, deadline, until, now);
        Ok(true)
    }

    /// Sends the package to the dead-letter queue with the reason, delivery count and time as
    /// message attributes, then deletes the original. Works on the handle that dequeued the
    /// package (SQS cannot read a message by its receipt; that handle keeps the body).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        if !self.live(&r) {
            tracing::debug!(message_id = %r.message_id, "dead_letter: lease ran out; ignored");
            return Ok(());
        }
        let body = self.leases().body(&r.handle);
        let Some(body) = body else {
            return Err(BrokerError::Unsupported {
                broker: NAME,
                operation: "dead_letter on a handle that did not dequeue the package (SQS \
                            cannot read a message by its receipt)",
            });
        };
        let Some(url) = self.dead_url(true).await? else {
            return Err(BrokerError::Backend {
                broker: NAME,
                message: "the dead-letter queue named by the RedrivePolicy does not exist".into(),
            });
        };
        let dead_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros())
            .unwrap_or(0);
        let mut req = self
            .inner
            .client
            .send_message()
            .queue_url(url)
            .message_body(body)
            .message_attributes(ATTR_REASON, attr_string(cut(reason, MAX_REASON), "String")?)
            .message_attributes(
                ATTR_DELIVERIES,
                attr_string(r.deliveries.to_string(), "Number")?,
            )
            .message_attributes(ATTR_DEAD_AT, attr_string(dead_at.to_string(), "Number")?)
            .message_attributes(
                ATTR_MESSAGE_ID,
                attr_string(r.message_id.clone(), "String")?,
            );
        if self.inner.fifo {
            // A group per message, so that listing never waits behind an in-flight group.
            req = req
                .message_group_id(fifo_token(&r.message_id))
                .message_deduplication_id(fifo_token(&r.message_id));
        }
        self.count(1);
        req.send()
            .await
            .map_err(|e| self.err("dead_letter", Fail::from_sdk(e)))?;
        self.delete_message(&r, "dead_letter").await?;
        self.settled(&r);
        Ok(())
    }

    /// Reads the dead-letter queue without consuming it: receives up to `limit` messages
    /// (10 per call, each hidden for 10 s meanwhile), then makes them visible again at once.
    /// Listing is therefore approximate like everything in SQS: two concurrent listings see
    /// different parts, and a FIFO dead-letter queue lists only what its groups let through.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        let Some(url) = self.dead_url(false).await? else {
            return Ok(Vec::new());
        };
        let c = &self.inner.client;
        let mut got: Vec<aws_sdk_sqs::types::Message> = Vec::new();
        while got.len() < limit {
            let n = i32::try_from((limit - got.len()).min(MAX_BULK)).unwrap_or(1);
            self.count(1);
            let res = c
                .receive_message()
                .queue_url(&url)
                .max_number_of_messages(n)
                .visibility_timeout(10)
                .wait_time_seconds(0)
                .message_system_attribute_names(MessageSystemAttributeName::All)
                .message_attribute_names("All")
                .send()
                .await
                .map_err(Fail::from_sdk);
            let batch = match res {
                Ok(o) => o.messages().to_vec(),
                Err(f) if f.missing_queue() => {
                    self.forget_dead_url().await;
                    break;
                }
                Err(f) => return Err(self.err("dead_letters", f)),
            };
            if batch.is_empty() {
                break;
            }
            got.extend(batch);
        }
        // Visible again at once: listing does not consume.
        self.release(&url, &got, "dead_letters").await;
        let mut out: Vec<DeadLetter> = got
            .iter()
            .map(|m| {
                let attr = |k: &str| {
                    m.message_attributes()
                        .and_then(|a| a.get(k))
                        .and_then(|v| v.string_value())
                        .map(str::to_owned)
                };
                let sys =
                    |k: MessageSystemAttributeName| m.attributes().and_then(|a| a.get(&k)).cloned();
                let sent_us = sys(MessageSystemAttributeName::SentTimestamp)
                    .and_then(|v| v.parse::<i64>().ok())
                    .map_or(0, |ms| ms.saturating_mul(1000));
                DeadLetter {
                    message_id: MessageId(
                        attr(ATTR_MESSAGE_ID)
                            .unwrap_or_else(|| m.message_id().unwrap_or_default().to_owned()),
                    ),
                    payload: decode_body(m.body().unwrap_or_default()),
                    reason: attr(ATTR_REASON).unwrap_or_else(|| {
                        "moved by SQS (the queue's RedrivePolicy maxReceiveCount)".to_owned()
                    }),
                    deliveries: attr(ATTR_DELIVERIES)
                        .or_else(|| sys(MessageSystemAttributeName::ApproximateReceiveCount))
                        .and_then(|v| v.parse().ok()),
                    dead_at_us: attr(ATTR_DEAD_AT)
                        .and_then(|v| v.parse().ok())
                        .unwrap_or(sent_us),
                }
            })
            .collect();
        out.sort_by_key(|d| d.dead_at_us);
        out.truncate(limit);
        Ok(out)
    }

    /// Scans the dead-letter queue for `id` (see the module docs: up to 10,000 messages, those
    /// passed over made visible again at once), sends its body to the queue as a new message
    /// (first delivery again; on a FIFO queue in the queue's default group with a fresh
    /// deduplication id), and only once SQS has stored it deletes the dead letter. A failure
    /// between the two leaves the package in both places, never in neither.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((url, m)) = self.find_dead(id, "requeue_dead").await? else {
            return Ok(false);
        };
        let payload = decode_body(m.body().unwrap_or_default());
        if let Err(e) = self.enqueue(Message::new(payload)).await {
            self.release(&url, std::slice::from_ref(&m), "requeue_dead")
                .await;
            return Err(e);
        }
        self.delete_dead_message(&url, &m, "requeue_dead (delete the dead letter)")
            .await?;
        tracing::info!(message_id = %id, "dead letter requeued");
        Ok(true)
    }

    /// Scans the dead-letter queue for `id` like `requeue_dead`, then deletes it.
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((url, m)) = self.find_dead(id, "delete_dead").await? else {
            return Ok(false);
        };
        self.delete_dead_message(&url, &m, "delete_dead").await?;
        Ok(true)
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let Some(url) = self.dead_url(false).await? else {
            return Ok(Some(0));
        };
        self.count(1);
        let res = self
            .inner
            .client
            .get_queue_attributes()
            .queue_url(url)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessages)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesNotVisible)
            .attribute_names(QueueAttributeName::ApproximateNumberOfMessagesDelayed)
            .send()
            .await
            .map_err(Fail::from_sdk);
        match res {
            Ok(o) => Ok(Some(parse_counters(o.attributes()).values().sum())),
            Err(f) if f.missing_queue() => {
                self.forget_dead_url().await;
                Ok(Some(0))
            }
            Err(f) => Err(self.err("dead_letter_size", f)),
        }
    }

    /// With nothing in flight: `PurgeQueue` (one call; SQS allows one per queue every 60 s, a
    /// second one is refused with an error saying when to retry). With packages in flight,
    /// which `PurgeQueue` would delete too, the visible packages are received and deleted in
    /// batches instead (delayed ones are left). Returns the approximate count removed.
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let counts = self.counters().await?;
        let visible = counts[&QueueAttributeName::ApproximateNumberOfMessages];
        let delayed = counts[&QueueAttributeName::ApproximateNumberOfMessagesDelayed];
        let in_flight = counts[&QueueAttributeName::ApproximateNumberOfMessagesNotVisible];
        if in_flight == 0 {
            let res = self
                .if_queue("purge_queue", |c, url| async move {
                    c.purge_queue()
                        .queue_url(url)
                        .send()
                        .await
                        .map_err(Fail::from_sdk)
                })
                .await;
            return match res {
                Ok(_) => {
                    if let Ok(mut t) = self.inner.last_purge.lock() {
                        *t = Some(Instant::now());
                    }
                    Ok(visible + delayed)
                }
                Err(BrokerError::Backend { message, .. })
                    if message.contains("PurgeQueueInProgress") =>
                {
                    let when = match self.inner.last_purge.lock().ok().and_then(|t| *t) {
                        Some(t) => format!(
                            "retry in about {} s",
                            60u64.saturating_sub(t.elapsed().as_secs()).max(1)
                        ),
                        None => "retry within 60 s".to_owned(),
                    };
                    Err(BrokerError::Backend {
                        broker: NAME,
                        message: format!(
                            "purge_queue: SQS allows one PurgeQueue per queue every 60 seconds \
                             and one was made less than 60 s ago; nothing was purged: {when}"
                        ),
                    })
                }
                Err(e) => Err(e),
            };
        }
        // Packages in flight: drain the visible ones only.
        let hide = self.inner.visibility_secs.max(30);
        let mut removed = 0u64;
        loop {
            let got = self.receive(MAX_BULK, hide, 0).await?;
            if got.is_empty() {
                break;
            }
            let entries: Vec<DeleteMessageBatchRequestEntry> = got
                .iter()
                .enumerate()
                .filter_map(|(n, m)| {
                    DeleteMessageBatchRequestEntry::builder()
                        .id(n.to_string())
                        .set_receipt_handle(m.receipt_handle().map(str::to_owned))
                        .build()
                        .ok()
                })
                .collect();
            let out = self
                .on_queue("purge_queue", |c, url| {
                    let entries = entries.clone();
                    async move {
                        c.delete_message_batch()
                            .queue_url(url)
                            .set_entries(Some(entries))
                            .send()
                            .await
                            .map_err(Fail::from_sdk)
                    }
                })
                .await?;
            removed += u64::try_from(out.successful().len()).unwrap_or(0);
        }
        Ok(removed)
    }

    /// Deletes the queue and the managed `<queue>-dead` queue (a dead-letter queue named by a
    /// RedrivePolicy is the operator's and stays). A later call on this handle creates the
    /// queue again when `create` holds (AWS refuses that for 60 s after a delete).
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        self.if_queue("delete_queue", |c, url| async move {
            c.delete_queue()
                .queue_url(url)
                .send()
                .await
                .map_err(Fail::from_sdk)
        })
        .await?;
        if let DeadPlace::Managed { .. } = self.inner.dead
            && let Some(url) = self.dead_url(false).await?
        {
            self.count(1);
            match self
                .inner
                .client
                .delete_queue()
                .queue_url(url)
                .send()
                .await
                .map_err(Fail::from_sdk)
            {
                Ok(_) => {}
                Err(f) if f.missing_queue() => {}
                Err(f) => return Err(self.err("delete_queue (dead letters)", f)),
            }
            self.forget_dead_url().await;
        }
        self.leases().clear();
        Ok(())
    }

    /// `ApproximateNumberOfMessages` + `ApproximateNumberOfMessagesDelayed` (approximate).
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let c = self.counters().await?;
        Ok(c[&QueueAttributeName::ApproximateNumberOfMessages]
            + c[&QueueAttributeName::ApproximateNumberOfMessagesDelayed])
    }

    /// `ApproximateNumberOfMessagesNotVisible` (approximate).
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let c = self.counters().await?;
        Ok(Some(
            c[&QueueAttributeName::ApproximateNumberOfMessagesNotVisible],
        ))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        let limit = self.inner.config.timeout;
        let call = self.if_queue("ping", |c, url| async move {
            c.get_queue_attributes()
                .queue_url(url)
                .attribute_names(QueueAttributeName::QueueArn)
                .send()
                .await
                .map_err(Fail::from_sdk)
        });
        match tokio::time::timeout(limit, call).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(BrokerError::Timeout {
                broker: NAME,
                operation: "ping",
                endpoint: self.inner.endpoint.clone(),
                after: limit,
            }),
        }
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let i = &self.inner;
        let mut details = BTreeMap::new();
        details.insert("region".into(), i.region.clone());
        details.insert("queue_url".into(), self.url());
        details.insert("sqs_queue".into(), i.queue_name.clone());
        details.insert("fifo".into(), i.fifo.to_string());
        details.insert("queue_max_message_size".into(), i.queue_max.to_string());
        details.insert("max_package_bytes".into(), i.raw_limit.to_string());
        details.insert(
            "visibility_timeout_secs".into(),
            i.visibility_secs.to_string(),
        );
        if let Some(v) = &i.queue_visibility {
            details.insert("queue_default_visibility_secs".into(), v.clone());
        }
        details.insert(
            "long_poll_secs".into(),
            if i.wait_secs > 0 {
                i.wait_secs.to_string()
            } else {
                format!("0 (short polls every {:?})", i.settings.poll)
            },
        );
        details.insert(
            "dead_letter_queue".into(),
            match &i.dead {
                DeadPlace::Redrive { name, .. } => format!("{name} (RedrivePolicy)"),
                DeadPlace::Managed { name } => format!("{name} (managed)"),
            },
        );
        details.insert("bulk".into(), i.settings.bulk.to_string());
        let mut notes = vec![
            "queue_size, lock_size and dead_letter_size are SQS's approximate counters".into(),
            "cost: 1 SendMessage per task (or 1 SendMessageBatch per 10), 1 ReceiveMessage per \
             up to 10 tasks (empty long polls too), 1 DeleteMessage per task (or 1 \
             DeleteMessageBatch per 10); extend and fail are 1 ChangeMessageVisibility each"
                .into(),
            format!(
                "packages travel base64url-encoded: at most {} raw bytes (queue limit {} bytes \
                 of text)",
                i.raw_limit, i.queue_max
            ),
            "a receipt whose lease ran out is ignored, even if SQS would still take it".into(),
            "dead_letter must be called on the handle that dequeued the package".into(),
            "requeue_dead and delete_dead scan the dead-letter queue for the id (1 \
             ReceiveMessage per 10 dead letters, up to 10,000; those passed over are made \
             visible again at once)"
                .into(),
        ];
        if i.fifo {
            notes.push(
                "FIFO: order is kept per message group (the task's group, else the queue \
                 name); a group delivers one batch at a time, so ungrouped tasks run one \
                 batch after the other; a task id sent twice within 5 minutes is stored once; \
                 per-task delays are refused"
                    .into(),
            );
        } else {
            notes.push(
                "standard queue: at-least-once, order not guaranteed; a package may rarely be \
                 delivered twice"
                    .into(),
            );
        }
        Ok(BrokerInfo {
            broker: NAME.into(),
            server: Some("Amazon SQS API".into()),
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(f64::from(i.visibility_secs)),
            notes,
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            receipts: true,
            atomic: self.inner.fifo,
            max_bulk: MAX_BULK,
            max_message_size: self.inner.raw_limit,
            text_only: true,
            dead_letter: true,
            priority: false,
            delay: !self.inner.fifo,
            stats: false,
            extend: true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_round_trip() {
        let r = Receipt {
            deadline_ms: 12,
            deliveries: 3,
            message_id: "m-1".into(),
            handle: "a|b+c/=".into(),
        };
        let p = Receipt::parse(&r.to_ack()).unwrap();
        assert_eq!(
            (p.deadline_ms, p.deliveries, p.message_id, p.handle),
            (12, 3, "m-1".into(), "a|b+c/=".into())
        );
        assert!(Receipt::parse(&AckId::new("x")).is_err());
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn lease_records_expire_whether_settled_or_not() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        // A worker that died: dequeued, never settled. Its body is dropped when the lease runs
        // out, its record soon after.
        l.hold("orphan", t0 + secs(30), "body".into(), t0);
        assert_eq!(l.live("orphan", t0 + secs(29)), Some(true));
        assert_eq!(l.body("orphan").as_deref(), Some("body"));
        l.sweep(t0 + secs(31));
        assert_eq!(l.live("orphan", t0 + secs(31)), Some(false));
        assert_eq!(l.body("orphan"), None, "body kept past the lease");
        // A handle that only settles receipts dequeued elsewhere.
        for n in 0..1000 {
            l.settle(&format!("other-{n}"), t0 + secs(5), t0 + secs(1));
        }
        l.sweep(t0 + secs(30) + KEEP_GRACE + secs(1));
        assert!(l.map.is_empty(), "{} records left", l.map.len());
    }

    #[test]
    fn a_settled_receipt_stays_dead_until_its_own_deadline() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.hold("h", t0 + secs(600), "b".into(), t0);
        // Settled at once; the receipt says its lease runs 600 s.
        l.settle("h", t0 + secs(600), t0 + secs(1));
        assert_eq!(l.body("h"), None);
        // Sweeps long after the settle, before the receipt's deadline: still known as settled
        // (forgetting it would let the receipt's own deadline make it look held again).
        l.sweep(t0 + secs(120));
        l.sweep(t0 + secs(599));
        assert_eq!(l.live("h", t0 + secs(599)), Some(false));
        l.sweep(t0 + secs(601) + KEEP_GRACE);
        assert_eq!(l.live("h", t0 + secs(602) + KEEP_GRACE), None);
    }

    #[test]
    fn a_shortening_extend_is_honoured() {
        let t0 = Instant::now();
        let mut l = Leases::default();
        l.hold("h", t0 + secs(300), "b".into(), t0);
        // extend(by = 2 s) at t0 + 10 s: the lease now ends at t0 + 12 s, not t0 + 300 s.
        l.extend("h", t0 + secs(12), t0 + secs(300), t0 + secs(10));
        assert_eq!(l.live("h", t0 + secs(11)), Some(true));
        assert_eq!(l.live("h", t0 + secs(13)), Some(false));
        // The record outlives the receipt's deadline, so sweeping cannot revive it.
        l.sweep(t0 + secs(100));
        assert_eq!(l.live("h", t0 + secs(100)), Some(false));
        // An extend on a handle that never dequeued: held until the new deadline.
        l.extend("x", t0 + secs(50), t0 + secs(20), t0 + secs(10));
        assert_eq!(l.live("x", t0 + secs(40)), Some(true));
        // A settled receipt is not revived by a late extend record.
        l.settle("x", t0 + secs(20), t0 + secs(41));
        l.extend("x", t0 + secs(90), t0 + secs(20), t0 + secs(42));
        assert_eq!(l.live("x", t0 + secs(43)), Some(false));
    }

    #[test]
    fn receipt_deadlines_are_capped() {
        let r = Receipt::parse(&AckId::new(format!("{}|1|m|h", u64::MAX))).unwrap();
        let now = Instant::now();
        let until = receipt_until(&r, now);
        assert!(until <= now + MAX_VISIBILITY + secs(60));
        let old = Receipt::parse(&AckId::new("5|1|m|h")).unwrap();
        assert_eq!(receipt_until(&old, now), now);
    }

    #[test]
    fn batch_answers_name_each_package_once() {
        let todo = [3usize, 4, 5, 6];
        let mut ids: Vec<Option<MessageId>> = vec![None; 7];
        let mut failed = Vec::new();
        let again = sort_answer(
            &todo,
            // 3 stored; 1 is not in this batch (an answer naming it is ignored).
            [("3", "m3"), ("1", "m1")].into_iter(),
            [
                // 3 was stored: a failure naming it too does not make it unstored.
                ("3", false, "x".to_owned()),
                ("4", false, "InternalError".to_owned()),
                ("4", true, "twice".to_owned()),
                ("5", true, "InvalidParameterValue".to_owned()),
                ("99", true, "not ours".to_owned()),
                ("junk", true, "not ours".to_owned()),
            ]
            .into_iter(),
            false,
            &mut ids,
            &mut failed,
        );
        assert_eq!(again, vec![4]);
        assert_eq!(ids[3], Some(MessageId("m3".into())));
        assert_eq!(ids[1], None);
        let positions: Vec<usize> = failed.iter().map(|(i, _)| *i).collect();
        // 5 refused for good; 6 not in the answer: not known to be stored.
        assert_eq!(positions, vec![5, 6]);
        // The last try: a server-side failure is final.
        let mut failed = Vec::new();
        let again = sort_answer(
            &[4],
            std::iter::empty(),
            [("4", false, "InternalError".to_owned())].into_iter(),
            true,
            &mut ids,
            &mut failed,
        );
        assert!(again.is_empty());
        assert_eq!(failed, vec![(4, "InternalError".to_owned())]);
    }

    #[test]
    fn debug_masks_secrets() {
        let c = SqsConfig {
            secret_access_key: Some("s3cret-key".into()),
            session_token: Some("tok-123".into()),
            ..SqsConfig::default()
        };
        let d = format!("{c:?}");
        assert!(!d.contains("s3cret-key") && !d.contains("tok-123"), "{d}");
    }

    #[tokio::test]
    async fn zero_timeouts_name_their_key() {
        for (key, c) in [
            (
                "sqs.connect_timeout",
                SqsConfig {
                    connect_timeout: Duration::ZERO,
                    ..SqsConfig::default()
                },
            ),
            (
                "sqs.timeout",
                SqsConfig {
                    timeout: Duration::ZERO,
                    ..SqsConfig::default()
                },
            ),
        ] {
            let e = SqsBroker::connect(&c, QueueSettings::for_queue("q"))
                .await
                .unwrap_err();
            assert!(
                matches!(&e, BrokerError::Config { key: k, .. } if k == key),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn an_endpoint_password_never_shows() {
        let c = SqsConfig {
            endpoint_url: Some("http://user:pw-S3cret@127.0.0.1:9".into()),
            region: Some("us-east-1".into()),
            access_key_id: Some("id".into()),
            secret_access_key: Some("key-S3cret".into()),
            connect_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(2),
            ..SqsConfig::default()
        };
        let e = SqsBroker::connect(&c, QueueSettings::for_queue("q"))
            .await
            .unwrap_err();
        let shown = format!("{e} {e:?} {c:?}");
        assert!(!shown.contains("S3cret"), "{shown}");
    }

    #[test]
    fn config_refuses_unknown_keys() {
        let e = serde_json::from_str::<SqsConfig>(r#"{"regoin": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("regoin"), "{e}");
        let c: SqsConfig = serde_json::from_str(r#"{"connect_timeout": 1.5}"#).unwrap();
        assert_eq!(c.connect_timeout, Duration::from_millis(1500));
        assert!(c.create);
    }
}
