//! The IronMQ v3 broker, over IronMQ's HTTP API.
//!
//! Layout: one IronMQ pull queue per cluster queue (`ironmq.queue`, else the cluster's queue
//! name, sent percent-encoded), plus `<queue>--dead` for dead letters, created by the first
//! dead letter and deleted with the queue. Packages travel as base64url text in the message
//! body (IronMQ carries text only). Dead letters are JSON envelopes (reason, deliveries, time,
//! original id, body) since IronMQ messages have no attributes.
//!
//! `requeue_dead` and `delete_dead` **scan `<queue>--dead`** for the id (IronMQ finds messages
//! by their own id only, and a dead letter is listed by its original one): they reserve it 100
//! messages at a time (30 s reservations) until the id shows, the queue has none left, or 10,000
//! were seen, then release every message passed over at once (one release call each: the cost
//! grows with the dead letters before the one wanted). `requeue_dead` posts the package to the
//! queue as a new message before it deletes the dead letter, so a crash in between leaves it in
//! both places, never in neither.
//!
//! The promise: a delivered package is reserved for `retry` (IronMQ's reservation `timeout`)
//! and delivered again unless acknowledged; `fail` releases it at once (`fail_after` with a
//! delay); nothing is dropped silently. IronMQ itself refuses a stale reservation (403/404),
//! so a late `acknowledge`, `fail` or `extend` of a receipt whose reservation ran out changes
//! nothing (`extend` answers `false`). Receipts are `message_id:reservation_id` and settle on
//! any handle of the queue, with one exception: `extend` is IronMQ's touch, which hands out a
//! **new** reservation id; the handle that extended (and its clones) maps the receipt's id to
//! the newest one, so the original receipt keeps working there, but another handle holding
//! the original receipt after an extend sees it as stale.
//!
//! IronMQ limits, as documented: reservation timeouts of 30 s to 24 h (a shorter `retry` is a
//! configuration error unless `allow_short_timeout` is set, for test servers only), at most 100
//! messages per reserve, post or batch delete, long polls of at most 30 s, delays of at most
//! 7 days, message bodies of 64 KB on the standard plan (`max_message_size`, 256 KB on larger
//! plans). Every call is bounded in time (`connect_timeout`, `timeout` plus the long poll); the
//! token never appears in `Debug`, `info`, logs or errors.
//!
//! Sizes: IronMQ's queue info has `size` (waiting messages) and `total_messages`, nothing
//! about reservations, so `lock_size` is `None` against IronMQ itself. The test server in
//! `testserver/ironmq_v3.py` adds a `reserved` count, which this adapter reports when present.
#![warn(missing_docs)]

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId,
    QueueSettings, async_trait, redact,
};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

/// Most messages one IronMQ call posts, reserves or deletes.
pub const MAX_BULK: usize = 100;
/// Shortest reservation IronMQ accepts (30 s).
pub const MIN_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest reservation IronMQ accepts (24 h): the longest `retry` and lease extension.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(86_400);
/// Longest delay IronMQ accepts on a post or a release (7 days).
pub const MAX_DELAY: Duration = Duration::from_secs(604_800);
/// IronMQ's message size limit on the standard plan, in bytes of body text (64 KB).
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 64 * 1024;
/// Bytes of the body limit kept for the dead-letter envelope around a package.
const DEAD_HEADROOM: usize = 2048;
/// Longest dead-letter reason stored (bytes, before JSON escaping); longer ones are cut.
const MAX_REASON: usize = 256;
/// Longest long poll IronMQ allows, in seconds.
const MAX_WAIT_SECS: u64 = 30;
/// Most dead letters `requeue_dead` / `delete_dead` look through for one id.
const MAX_DEAD_SCAN: usize = 10_000;
/// Reservation timeout of the dead letters reserved while searching (IronMQ's minimum), in
/// seconds: how long they stay hidden if this process dies before releasing them.
const SCAN_TIMEOUT_SECS: u64 = 30;
/// Suffix of the dead-letter queue's name.
const DEAD_SUFFIX: &str = "--dead";
/// Marker field of a dead-letter envelope.
const DEAD_MARK: &str = "qcluster_dead_letter";
const NAME: &str = "ironmq";

/// `[ironmq]` settings. Unknown keys are refused; `Debug` masks the token.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IronMqConfig {
    /// The IronMQ host (`mq-aws-us-east-1-1.iron.io`, or your cluster's / test server's).
    pub host: String,
    /// Port (443).
    pub port: u16,
    /// `https` or `http` (`http` for a local test server only).
    pub protocol: String,
    /// The IronMQ project id.
    pub project_id: String,
    /// The OAuth token. Never shown.
    pub token: String,
    /// The IronMQ queue name; `None` takes the cluster's queue name.
    pub queue: Option<String>,
    /// Largest message body IronMQ takes on your plan, in bytes of text (64 KB; 256 KB on
    /// larger plans). Packages are refused before sending when their text would not fit.
    pub max_message_size: usize,
    /// Send reservation timeouts under IronMQ's minimum of 30 s as `retry` says. For test
    /// servers that accept them (the project's `testserver/ironmq_v3.py`); the hosted IronMQ
    /// refuses them. Off: a `retry` under 30 s is a configuration error.
    pub allow_short_timeout: bool,
    /// Longest wait to open a connection, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// Longest time one request may take, in seconds (a long poll adds its wait).
    #[serde(with = "broker_core::secs")]
    pub timeout: Duration,
}

impl Default for IronMqConfig {
    fn default() -> Self {
        Self {
            host: "mq-aws-us-east-1-1.iron.io".into(),
            port: 443,
            protocol: "https".into(),
            project_id: String::new(),
            token: String::new(),
            queue: None,
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            allow_short_timeout: false,
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(20),
        }
    }
}

impl IronMqConfig {
    /// A config for `project_id` and `token` on `url` (`http://127.0.0.1:8787`), other keys at
    /// their defaults. A URL that does not parse leaves host, port and protocol at theirs.
    pub fn for_url(url: &str, project_id: &str, token: &str) -> Self {
        let mut c = Self {
            project_id: project_id.into(),
            token: token.into(),
            ..Self::default()
        };
        if let Ok(u) = url::Url::parse(url) {
            c.protocol = u.scheme().to_owned();
            if let Some(h) = u.host_str() {
                c.host = h.to_owned();
            }
            if let Some(p) = u.port_or_known_default() {
                c.port = p;
            }
        }
        c
    }
}

impl fmt::Debug for IronMqConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IronMqConfig")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("protocol", &self.protocol)
            .field("project_id", &self.project_id)
            .field("token", &if self.token.is_empty() { "" } else { "***" })
            .field("queue", &self.queue)
            .field("max_message_size", &self.max_message_size)
            .field("allow_short_timeout", &self.allow_short_timeout)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .finish()
    }
}

/// A receipt: `message_id:reservation_id` as IronMQ handed them out.
struct Receipt {
    message_id: String,
    reservation: String,
}

impl Receipt {
    fn parse(ack: &AckId) -> Result<Self, BrokerError> {
        match ack.as_str().split_once(':') {
            Some((m, r)) if !m.is_empty() && !r.is_empty() => Ok(Self {
                message_id: m.to_owned(),
                reservation: r.to_owned(),
            }),
            _ => Err(BrokerError::InvalidReceipt {
                broker: NAME,
                receipt: ack.as_str().chars().take(200).collect(),
            }),
        }
    }
}

/// How a call ended, when the server answered.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl Answer {
    fn ok(&self) -> bool {
        self.status.is_success()
    }

    /// 403/404: a stale or unknown reservation, a missing message or queue.
    fn gone(&self) -> bool {
        matches!(self.status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND)
    }

    fn msg(&self) -> String {
        match self.body.get("msg").and_then(Value::as_str) {
            Some(m) => m.to_owned(),
            None => self.body.to_string().chars().take(300).collect(),
        }
    }
}

struct Inner {
    http: reqwest::Client,
    config: IronMqConfig,
    settings: QueueSettings,
    /// `<protocol>://<host>:<port>/3/projects/<project>/queues`
    base: url::Url,
    endpoint: String,
    auth: reqwest::header::HeaderValue,
    queue: String,
    dead: String,
    /// Reservation `timeout` sent with each reserve, whole seconds.
    timeout_secs: u64,
    /// Long poll seconds; 0 with a `wait` under a second (short polls every `poll` instead).
    wait_secs: u64,
    /// Largest raw package accepted.
    raw_limit: usize,
    /// The receipt's reservation id → the newest one after touches.
    touched: Touched,
    requests: AtomicU64,
}

/// How long a touched receipt is remembered past its newest reservation's end: by then the
/// reservation is stale either way, so forgetting the mapping changes no answer.
const TOUCH_GRACE: Duration = Duration::from_secs(60);

/// A receipt's reservation id → the newest one after touches, with when to forget it.
/// Entries go on every settle of the receipt and, for receipts never settled (lease lost,
/// worker gone), once their reservation has run out: every `record` drops expired ones, so
/// the map holds at most the receipts extended within the last reservation timeout + grace.
#[derive(Default)]
struct Touched(std::sync::Mutex<HashMap<String, (String, Instant)>>);

impl Touched {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (String, Instant)>> {
        // The map stays consistent whatever panicked while holding it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn current(&self, reservation: &str) -> Option<String> {
        self.lock().get(reservation).map(|(c, _)| c.clone())
    }

    fn forget(&self, reservation: &str) {
        self.lock().remove(reservation);
    }

    /// `original` now stands for `newest`, a reservation that ends `lasts` after `now`.
    fn record(&self, original: &str, newest: String, lasts: Duration, now: Instant) {
        let mut t = self.lock();
        t.retain(|_, (_, until)| *until > now);
        t.insert(original.to_owned(), (newest, now + lasts + TOUCH_GRACE));
    }

    fn clear(&self) {
        self.lock().clear();
    }

    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// A queue on IronMQ v3 (or a server speaking its API). Cheap to clone.
#[derive(Clone)]
pub struct IronMqBroker {
    inner: Arc<Inner>,
}

impl fmt::Debug for IronMqBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IronMqBroker")
            .field("endpoint", &self.inner.endpoint)
            .field("queue", &self.inner.queue)
            .finish_non_exhaustive()
    }
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Whole seconds, rounded up.
fn secs_up(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

fn decode_body(body: &str) -> Vec<u8> {
    match broker_core::text::from_text(body) {
        Some(b) => b,
        None => {
            // Not ours: handed on as it is, so the codec refuses it and the cluster
            // quarantines it instead of retrying it forever.
            tracing::warn!("IronMQ message body is not base64url; delivered as raw text");
            body.as_bytes().to_vec()
        }
    }
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

fn id_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl IronMqBroker {
    /// Checks the settings against IronMQ's limits, opens an HTTP client and makes sure the
    /// queue exists (creating it), which also proves the token. Bounded by `connect_timeout` +
    /// `timeout`; errors name the endpoint, never the token.
    pub async fn connect(
        config: &IronMqConfig,
        settings: QueueSettings,
    ) -> Result<IronMqBroker, BrokerError> {
        settings.validate(MAX_BULK)?;
        if config.project_id.trim().is_empty() {
            return Err(BrokerError::config("ironmq.project_id", "is missing"));
        }
        if config.token.is_empty() {
            return Err(BrokerError::config("ironmq.token", "is missing"));
        }
        if !matches!(config.protocol.as_str(), "http" | "https") {
            return Err(BrokerError::config(
                "ironmq.protocol",
                format!(
                    "is {:?}; use https (or http for a local test server)",
                    config.protocol
                ),
            ));
        }
        if config.connect_timeout.is_zero() {
            return Err(BrokerError::config(
                "ironmq.connect_timeout",
                "must be greater than zero",
            ));
        }
        if config.timeout.is_zero() {
            return Err(BrokerError::config(
                "ironmq.timeout",
                "must be greater than zero",
            ));
        }
        if config.max_message_size <= DEAD_HEADROOM + 4 {
            return Err(BrokerError::config(
                "ironmq.max_message_size",
                format!("must be more than {} bytes", DEAD_HEADROOM + 4),
            ));
        }
        if settings.retry > MAX_TIMEOUT {
            return Err(BrokerError::config(
                "retry",
                format!(
                    "is {} s; IronMQ reserves a message for at most 24 hours (86400 s)",
                    settings.retry.as_secs()
                ),
            ));
        }
        if settings.retry < MIN_TIMEOUT && !config.allow_short_timeout {
            return Err(BrokerError::config(
                "retry",
                format!(
                    "is {:?}; IronMQ reserves a message for at least 30 s: set retry to 30 or \
                     more (ironmq.allow_short_timeout = true sends shorter reservations, for \
                     test servers that accept them)",
                    settings.retry
                ),
            ));
        }
        let queue = config
            .queue
            .clone()
            .unwrap_or_else(|| settings.queue.clone());
        if queue.is_empty() {
            return Err(BrokerError::config("ironmq.queue", "must not be empty"));
        }
        let mut base = url::Url::parse(&format!(
            "{}://{}:{}/",
            config.protocol, config.host, config.port
        ))
        .map_err(|e| {
            BrokerError::config(
                "ironmq.host",
                format!("{:?} does not make a URL: {e}", config.host),
            )
        })?;
        base.path_segments_mut()
            .map_err(|()| BrokerError::config("ironmq.host", "does not make a URL with a path"))?
            .extend(["3", "projects", config.project_id.as_str(), "queues"]);
        let endpoint = format!(
            "{}://{}:{}/3/projects/{}",
            config.protocol, config.host, config.port, config.project_id
        );
        let mut auth = reqwest::header::HeaderValue::from_str(&format!("OAuth {}", config.token))
            .map_err(|_| {
            BrokerError::config("ironmq.token", "holds characters an HTTP header cannot")
        })?;
        auth.set_sensitive(true);
        let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| BrokerError::Backend {
            broker: NAME,
            message: format!("TLS setup: {e}"),
        })?
        .with_root_certificates(rustls::RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
        .with_no_client_auth();
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .connect_timeout(config.connect_timeout)
            .pool_idle_timeout(Duration::from_secs(50))
            .user_agent(concat!(
                "qcluster-broker-ironmq/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()
            .map_err(|e| BrokerError::Backend {
                broker: NAME,
                message: format!("HTTP client: {e}"),
            })?;
        let raw_limit = broker_core::text::raw_fitting(config.max_message_size - DEAD_HEADROOM);
        let raw_limit = settings
            .max_message_size
            .map_or(raw_limit, |m| m.min(raw_limit));
        let wait_secs = settings.wait.as_secs().min(MAX_WAIT_SECS);
        let broker = IronMqBroker {
            inner: Arc::new(Inner {
                http,
                timeout_secs: secs_up(settings.retry).max(1),
                wait_secs,
                raw_limit,
                dead: format!("{queue}{DEAD_SUFFIX}"),
                queue,
                settings,
                base,
                endpoint,
                auth,
                config: config.clone(),
                touched: Touched::default(),
                requests: AtomicU64::new(0),
            }),
        };
        let budget = config.connect_timeout + config.timeout;
        let q = broker.inner.queue.clone();
        match tokio::time::timeout(budget, broker.ensure_queue(&q)).await {
            Ok(r) => r?,
            Err(_) => {
                return Err(BrokerError::Timeout {
                    broker: NAME,
                    operation: "connect",
                    endpoint: broker.inner.endpoint.clone(),
                    after: budget,
                });
            }
        }
        Ok(broker)
    }

    /// IronMQ requests this handle has sent: for cost estimates.
    pub fn requests(&self) -> u64 {
        self.inner.requests.load(Ordering::Relaxed)
    }

    /// The IronMQ queue name this handle uses.
    pub fn queue_name(&self) -> &str {
        &self.inner.queue
    }

    /// The dead-letter queue's name.
    pub fn dead_letter_queue(&self) -> &str {
        &self.inner.dead
    }

    fn url(&self, queue: &str, tail: &[&str]) -> url::Url {
        let mut u = self.inner.base.clone();
        if let Ok(mut segs) = u.path_segments_mut() {
            segs.push(queue);
            segs.extend(tail);
        }
        u
    }

    fn scrub(&self, m: &str) -> String {
        redact(m, Some(&self.inner.config.token))
    }

    /// One HTTP call; transport trouble becomes `Unreachable`/`Timeout`, a refused token a
    /// `Config` error naming `ironmq.token`; any other answer is the caller's to read.
    async fn call(
        &self,
        op: &'static str,
        method: Method,
        url: url::Url,
        body: Option<&Value>,
        extra: Duration,
    ) -> Result<Answer, BrokerError> {
        let i = &self.inner;
        i.requests.fetch_add(1, Ordering::Relaxed);
        let limit = i.config.timeout + extra;
        let mut req = i
            .http
            .request(method, url)
            .header(reqwest::header::AUTHORIZATION, i.auth.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(limit);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_string());
        }
        let transport = |e: reqwest::Error| {
            if e.is_timeout() {
                BrokerError::Timeout {
                    broker: NAME,
                    operation: op,
                    endpoint: i.endpoint.clone(),
                    after: limit,
                }
            } else {
                let e = e.without_url();
                let mut m = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(s) = src {
                    m.push_str(": ");
                    m.push_str(&s.to_string());
                    src = s.source();
                }
                BrokerError::Unreachable {
                    broker: NAME,
                    endpoint: i.endpoint.clone(),
                    message: self.scrub(&format!("{op}: {m}")),
                }
            }
        };
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let bytes = resp.bytes().await.map_err(transport)?;
        let body = serde_json::from_slice(&bytes).unwrap_or_else(|_| {
            Value::String(String::from_utf8_lossy(&bytes).chars().take(300).collect())
        });
        let answer = Answer { status, body };
        if status == StatusCode::UNAUTHORIZED {
            return Err(BrokerError::config(
                "ironmq.token",
                format!(
                    "IronMQ at {} refused the token for project {} (401: {})",
                    i.endpoint,
                    i.config.project_id,
                    self.scrub(&answer.msg())
                ),
            ));
        }
        Ok(answer)
    }

    /// A 2xx answer without what IronMQ's API promises in it.
    fn malformed(&self, op: &str, what: &str, a: &Answer) -> BrokerError {
        BrokerError::Backend {
            broker: NAME,
            message: self.scrub(&format!(
                "{op}: IronMQ answered HTTP {} without {what}: {}",
                a.status.as_u16(),
                a.msg()
            )),
        }
    }

    fn unexpected(&self, op: &str, a: &Answer) -> BrokerError {
        BrokerError::Backend {
            broker: NAME,
            message: self.scrub(&format!("{op}: HTTP {}: {}", a.status.as_u16(), a.msg())),
        }
    }

    /// Makes sure `queue` exists: its info, else a create.
    async fn ensure_queue(&self, queue: &str) -> Result<(), BrokerError> {
        let a = self
            .call(
                "queue info",
                Method::GET,
                self.url(queue, &[]),
                None,
                Duration::ZERO,
            )
            .await?;
        if a.ok() {
            return Ok(());
        }
        if a.status != StatusCode::NOT_FOUND {
            return Err(self.unexpected("queue info", &a));
        }
        tracing::debug!(queue, "IronMQ queue missing: creating it");
        let a = self
            .call(
                "create queue",
                Method::PUT,
                self.url(queue, &[]),
                Some(&json!({})),
                Duration::ZERO,
            )
            .await?;
        if a.ok() {
            Ok(())
        } else {
            Err(self.unexpected("create queue", &a))
        }
    }

    /// A queue's info object; `None` when the queue does not exist.
    async fn queue_info(&self, queue: &str) -> Result<Option<Value>, BrokerError> {
        let a = self
            .call(
                "queue info",
                Method::GET,
                self.url(queue, &[]),
                None,
                Duration::ZERO,
            )
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !a.ok() {
            return Err(self.unexpected("queue info", &a));
        }
        match a.body.get("queue") {
            Some(q @ Value::Object(_)) => Ok(Some(q.clone())),
            _ => Err(self.malformed("queue info", "a queue object", &a)),
        }
    }

    /// The reservation id that currently stands for a receipt's (after touches).
    fn current(&self, r: &Receipt) -> String {
        self.inner
            .touched
            .current(&r.reservation)
            .unwrap_or_else(|| r.reservation.clone())
    }

    fn forget(&self, r: &Receipt) {
        self.inner.touched.forget(&r.reservation);
    }

    /// Receipts this handle (and its clones) maps to a newer reservation after an extend.
    pub fn touched_receipts(&self) -> usize {
        self.inner.touched.len()
    }

    /// Posts bodies in batches of [`MAX_BULK`]; returns their ids in order.
    async fn post(
        &self,
        queue: &str,
        items: &[(String, u64)],
        op: &'static str,
    ) -> Result<Vec<MessageId>, BrokerError> {
        let mut ids = Vec::with_capacity(items.len());
        for chunk in items.chunks(MAX_BULK) {
            let msgs: Vec<Value> = chunk
                .iter()
                .map(|(body, delay)| {
                    if *delay > 0 {
                        json!({ "body": body, "delay": delay })
                    } else {
                        json!({ "body": body })
                    }
                })
                .collect();
            let body = json!({ "messages": msgs });
            let res = self
                .call(
                    op,
                    Method::POST,
                    self.url(queue, &["messages"]),
                    Some(&body),
                    Duration::ZERO,
                )
                .await;
            // What became of this batch: refused (an HTTP error answer: IronMQ stores all of a
            // post or none), unknown (no answer: it may be stored) or stored (2xx).
            let partial = |e: BrokerError, stored: usize, this: &str| {
                if stored == 0 && !this.starts_with("stored") {
                    // Nothing known stored: the error as it is (a retry is as safe as one of
                    // a single post).
                    return e;
                }
                let rest = items.len() - stored - chunk.len();
                BrokerError::Backend {
                    broker: NAME,
                    message: format!(
                        "{op}: of {} packages the first {stored} were stored, the next {} \
                         {this}, the last {rest} not sent: {e}",
                        items.len(),
                        chunk.len(),
                    ),
                }
            };
            let a =
                res.map_err(|e| partial(e, ids.len(), "may or may not be stored (no answer)"))?;
            if !a.ok() {
                return Err(partial(self.unexpected(op, &a), ids.len(), "refused"));
            }
            let got: Vec<MessageId> = a
                .body
                .get("ids")
                .and_then(Value::as_array)
                .map(|v| v.iter().filter_map(id_text).map(MessageId).collect())
                .unwrap_or_default();
            if got.len() != chunk.len() {
                return Err(partial(
                    BrokerError::Backend {
                        broker: NAME,
                        message: self.scrub(&format!(
                            "IronMQ answered HTTP {} with {} readable ids for {} messages: {}",
                            a.status.as_u16(),
                            got.len(),
                            chunk.len(),
                            a.msg()
                        )),
                    },
                    ids.len(),
                    "stored (their ids unreadable)",
                ));
            }
            ids.extend(got);
        }
        Ok(ids)
    }

    fn outgoing(&self, m: &Message) -> Result<(String, u64), BrokerError> {
        if m.payload.len() > self.inner.raw_limit {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size: m.payload.len(),
                limit: self.inner.raw_limit,
            });
        }
        let delay = match m.delay {
            None => 0,
            Some(d) if d > MAX_DELAY => {
                return Err(BrokerError::Unsupported {
                    broker: NAME,
                    operation: "a delay over 7 days (IronMQ's limit; nothing was sent)",
                });
            }
            Some(d) => secs_up(d),
        };
        Ok((broker_core::text::to_text(&m.payload), delay))
    }

    /// One reserve call; a missing queue is created and the call made again.
    async fn reserve(&self, n: usize, wait: u64, delete: bool) -> Result<Vec<Value>, BrokerError> {
        let i = &self.inner;
        let body = json!({
            "n": n.clamp(1, MAX_BULK),
            "timeout": i.timeout_secs,
            "wait": wait,
            "delete": delete,
        });
        let extra = Duration::from_secs(wait);
        let url = self.url(&i.queue, &["reservations"]);
        let mut a = self
            .call("dequeue", Method::POST, url.clone(), Some(&body), extra)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            self.ensure_queue(&i.queue).await?;
            a = self
                .call("dequeue", Method::POST, url, Some(&body), extra)
                .await?;
        }
        if !a.ok() {
            return Err(self.unexpected("dequeue", &a));
        }
        // A reservation we cannot read comes back when its timeout runs out: nothing is lost.
        match a.body.get("messages") {
            Some(Value::Array(m)) => Ok(m.clone()),
            _ => Err(self.malformed("dequeue", "a messages list", &a)),
        }
    }

    /// Deletes one message with (or without) a reservation id; the raw answer.
    async fn delete_message(
        &self,
        queue: &str,
        message_id: &str,
        reservation: Option<&str>,
        op: &'static str,
    ) -> Result<Answer, BrokerError> {
        let body = match reservation {
            Some(r) => json!({ "reservation_id": r }),
            None => json!({}),
        };
        self.call(
            op,
            Method::DELETE,
            self.url(queue, &["messages", message_id]),
            Some(&body),
            Duration::ZERO,
        )
        .await
    }

    /// Finds dead letter `id` (the original message id of a qcluster envelope, else the
    /// dead-letter message's own id) by reserving `<queue>--dead` 100 messages at a time (for
    /// [`SCAN_TIMEOUT_SECS`]) until it shows, the queue has none left, or [`MAX_DEAD_SCAN`] were
    /// seen. Every message passed over is released again as soon as the search ends; the one
    /// found stays reserved. Returns its own id, reservation id and the package's body text.
    async fn find_dead(
        &self,
        id: &MessageId,
        op: &'static str,
    ) -> Result<Option<(String, String, String)>, BrokerError> {
        let dead = self.inner.dead.clone();
        let mut passed: Vec<(String, String)> = Vec::new();
        let mut found = None;
        let mut failure = None;
        while found.is_none() && passed.len() < MAX_DEAD_SCAN {
            let body =
                json!({ "n": MAX_BULK, "timeout": SCAN_TIMEOUT_SECS, "wait": 0, "delete": false });
            let a = match self
                .call(
                    op,
                    Method::POST,
                    self.url(&dead, &["reservations"]),
                    Some(&body),
                    Duration::ZERO,
                )
                .await
            {
                Ok(a) => a,
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            };
            if a.status == StatusCode::NOT_FOUND {
                break;
            }
            if !a.ok() {
                failure = Some(self.unexpected(op, &a));
                break;
            }
            let Some(listed) = a.body.get("messages").and_then(Value::as_array) else {
                failure = Some(self.malformed(op, "a messages list", &a));
                break;
            };
            if listed.is_empty() {
                break;
            }
            for m in listed {
                let (Some(own), Some(rid)) = (
                    m.get("id").and_then(id_text),
                    m.get("reservation_id").and_then(id_text),
                ) else {
                    continue; // unreadable: its reservation runs out by itself
                };
                let text = m.get("body").and_then(Value::as_str).unwrap_or_default();
                let env: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                let (listed_id, package) = if env.get(DEAD_MARK).is_some() {
                    (
                        env.get("message_id").and_then(id_text).unwrap_or_default(),
                        env.get("body")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    )
                } else {
                    (own.clone(), text.to_owned())
                };
                if found.is_none() && listed_id == id.0 {
                    found = Some((own, rid, package));
                } else {
                    passed.push((own, rid));
                }
            }
        }
        for (own, rid) in &passed {
            self.release_dead(own, rid, op).await;
        }
        match failure {
            Some(e) => {
                if let Some((own, rid, _)) = &found {
                    self.release_dead(own, rid, op).await;
                }
                Err(e)
            }
            None => Ok(found),
        }
    }

    /// Releases a reserved dead-letter message at once (best effort: otherwise its reservation
    /// runs out after [`SCAN_TIMEOUT_SECS`]).
    async fn release_dead(&self, own: &str, rid: &str, op: &'static str) {
        let body = json!({ "reservation_id": rid, "delay": 0 });
        let url = self.url(&self.inner.dead, &["messages", own, "release"]);
        match self
            .call(op, Method::POST, url, Some(&body), Duration::ZERO)
            .await
        {
            Ok(a) if a.ok() || a.gone() => {}
            Ok(a) => tracing::warn!(
                message_id = own,
                status = a.status.as_u16(),
                "{op}: could not release a dead letter (it comes back when its reservation runs out)"
            ),
            Err(e) => {
                tracing::warn!(message_id = own, error = %e, "{op}: could not release a dead letter (it comes back when its reservation runs out)")
            }
        }
    }

    /// Deletes a reserved dead-letter message.
    async fn delete_dead_message(
        &self,
        own: &str,
        rid: &str,
        op: &'static str,
    ) -> Result<(), BrokerError> {
        let d = self
            .delete_message(&self.inner.dead, own, Some(rid), op)
            .await?;
        if d.ok() {
            return Ok(());
        }
        Err(self.unexpected(op, &d))
    }

    async fn release(
        &self,
        ack: &AckId,
        delay: Duration,
        op: &'static str,
    ) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        let delay = secs_up(delay.min(MAX_DELAY));
        let body = json!({ "reservation_id": self.current(&r), "delay": delay });
        let a = self
            .call(
                op,
                Method::POST,
                self.url(&self.inner.queue, &["messages", &r.message_id, "release"]),
                Some(&body),
                Duration::ZERO,
            )
            .await?;
        if a.ok() || a.gone() {
            if a.gone() {
                tracing::debug!(message_id = %r.message_id, "{op}: stale reservation ignored");
            }
            self.forget(&r);
            return Ok(());
        }
        Err(self.unexpected(op, &a))
    }
}

#[async_trait]
impl Broker for IronMqBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        let item = self.outgoing(&message)?;
        let mut ids = self.post(&self.inner.queue, &[item], "enqueue").await?;
        ids.pop().ok_or_else(|| BrokerError::Backend {
            broker: NAME,
            message: "enqueue: IronMQ answered no id".into(),
        })
    }

    /// Checks every package first (nothing is sent if one is too large), then posts batches of
    /// 100. A failed batch may be partial: once a post was stored, the error (not transient:
    /// retrying the whole batch would store those twice) says how many were stored, whether
    /// the failing post of up to 100 was refused or is unknown (no answer), and how many were
    /// not sent.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        let items = messages
            .iter()
            .map(|m| self.outgoing(m))
            .collect::<Result<Vec<_>, _>>()?;
        if items.is_empty() {
            return Ok(Vec::new());
        }
        self.post(&self.inner.queue, &items, "enqueue_many").await
    }

    /// Reserves up to `bulk` messages for `retry`. With `wait` of a second or more, one long
    /// poll of `wait` (at most 30 s); under a second, short polls every `poll` until `wait`.
    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let i = &self.inner;
        let deadline = Instant::now() + i.settings.wait;
        loop {
            let got = self.reserve(i.settings.bulk, i.wait_secs, false).await?;
            if !got.is_empty() {
                let mut out = Vec::with_capacity(got.len());
                for m in got {
                    // Skipped ones come back when their reservation runs out.
                    let (Some(id), Some(rid), Some(body)) = (
                        m.get("id").and_then(id_text),
                        m.get("reservation_id").and_then(id_text),
                        m.get("body").and_then(Value::as_str),
                    ) else {
                        tracing::warn!(
                            "IronMQ reservation without id, reservation_id or body skipped"
                        );
                        continue;
                    };
                    out.push(Delivery {
                        ack: AckId::new(format!("{id}:{rid}")),
                        message_id: MessageId(id),
                        payload: decode_body(body),
                        deliveries: m
                            .get("reserved_count")
                            .and_then(Value::as_u64)
                            .and_then(|n| u32::try_from(n).ok()),
                    });
                }
                return Ok(out);
            }
            let now = Instant::now();
            if i.wait_secs > 0 || now >= deadline {
                return Ok(Vec::new());
            }
            tokio::time::sleep(i.settings.poll.min(deadline - now)).await;
        }
    }

    /// Deletes the message with its reservation id; a stale reservation (403/404) is ignored.
    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        let rid = self.current(&r);
        let a = self
            .delete_message(&self.inner.queue, &r.message_id, Some(&rid), "acknowledge")
            .await?;
        if a.ok() || a.gone() {
            if a.gone() {
                tracing::debug!(message_id = %r.message_id, "acknowledge: stale reservation ignored");
            }
            self.forget(&r);
            return Ok(());
        }
        Err(self.unexpected("acknowledge", &a))
    }

    /// Batched deletes of up to 100; a batch IronMQ refuses in part (a stale reservation
    /// among them) is settled one by one, stale ones ignored.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let receipts = acks
            .iter()
            .map(Receipt::parse)
            .collect::<Result<Vec<_>, _>>()?;
        for chunk in receipts.chunks(MAX_BULK) {
            if chunk.len() == 1 {
                self.acknowledge(&AckId::new(format!(
                    "{}:{}",
                    chunk[0].message_id, chunk[0].reservation
                )))
                .await?;
                continue;
            }
            let ids: Vec<Value> = chunk
                .iter()
                .map(|r| json!({ "id": r.message_id, "reservation_id": self.current(r) }))
                .collect();
            let a = self
                .call(
                    "acknowledge_many",
                    Method::DELETE,
                    self.url(&self.inner.queue, &["messages"]),
                    Some(&json!({ "ids": ids })),
                    Duration::ZERO,
                )
                .await?;
            if a.ok() {
                for r in chunk {
                    self.forget(r);
                }
            } else if a.gone() {
                for r in chunk {
                    self.acknowledge(&AckId::new(format!("{}:{}", r.message_id, r.reservation)))
                        .await?;
                }
            } else {
                return Err(self.unexpected("acknowledge_many", &a));
            }
        }
        Ok(())
    }

    /// Releases the reservation: the message is at the front of the queue again at once.
    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.release(ack, Duration::ZERO, "fail").await
    }

    /// Releases with a delay (whole seconds, rounded up, at most 7 days).
    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        self.release(ack, delay, "fail_after").await
    }

    /// Deletes with the reservation id; if that reservation is stale, without one (IronMQ
    /// deletes an unreserved message so). A message reserved by another consumer under a newer
    /// reservation cannot be deleted (IronMQ needs that reservation id): an error says so.
    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        let rid = self.current(&r);
        let q = &self.inner.queue;
        let a = self
            .delete_message(q, &r.message_id, Some(&rid), "delete")
            .await?;
        self.forget(&r);
        if a.ok() || a.status == StatusCode::NOT_FOUND {
            return Ok(());
        }
        if a.status == StatusCode::FORBIDDEN {
            let b = self
                .delete_message(q, &r.message_id, None, "delete")
                .await?;
            if b.ok() || b.status == StatusCode::NOT_FOUND {
                return Ok(());
            }
            return Err(BrokerError::Backend {
                broker: NAME,
                message: self.scrub(&format!(
                    "delete: message {} is reserved by another consumer now and IronMQ deletes \
                     a reserved message only with its reservation id (HTTP {}: {})",
                    r.message_id,
                    b.status.as_u16(),
                    b.msg()
                )),
            });
        }
        Err(self.unexpected("delete", &a))
    }

    /// IronMQ's touch: a new reservation of `by` (whole seconds, rounded up; at least 30 s
    /// unless `allow_short_timeout`; at most 24 h). Touch hands out a new reservation id, which
    /// this handle maps the receipt to. `Ok(false)` when the reservation is stale.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        let r = Receipt::parse(ack)?;
        let i = &self.inner;
        let mut secs = secs_up(by.min(MAX_TIMEOUT)).max(1);
        if !i.config.allow_short_timeout {
            secs = secs.max(MIN_TIMEOUT.as_secs());
        }
        let body = json!({ "reservation_id": self.current(&r), "timeout": secs });
        let a = self
            .call(
                "extend",
                Method::POST,
                self.url(&i.queue, &["messages", &r.message_id, "touch"]),
                Some(&body),
                Duration::ZERO,
            )
            .await?;
        if a.gone() {
            self.forget(&r);
            return Ok(false);
        }
        if !a.ok() {
            return Err(self.unexpected("extend", &a));
        }
        let Some(new) = a.body.get("reservation_id").and_then(id_text) else {
            return Err(BrokerError::Backend {
                broker: NAME,
                message: "extend: IronMQ's touch answered no reservation_id".into(),
            });
        };
        i.touched.record(
            &r.reservation,
            new,
            Duration::from_secs(secs),
            Instant::now(),
        );
        Ok(true)
    }

    /// Copies the package into `<queue>--dead` (a JSON envelope with the reason), then deletes
    /// the original with its reservation id; when that reservation is stale the copy is
    /// removed again and nothing changed. A crash between the two leaves the package in both
    /// places (never in neither).
    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        let r = Receipt::parse(ack)?;
        let i = &self.inner;
        let a = self
            .call(
                "dead_letter",
                Method::GET,
                self.url(&i.queue, &["messages", &r.message_id]),
                None,
                Duration::ZERO,
            )
            .await?;
        if a.gone() {
            tracing::debug!(message_id = %r.message_id, "dead_letter: message gone; ignored");
            return Ok(());
        }
        if !a.ok() {
            return Err(self.unexpected("dead_letter", &a));
        }
        // Without the body there is nothing to set aside: the original stays where it is.
        let m = a.body.get("message").cloned().unwrap_or(Value::Null);
        let Some(body) = m.get("body").and_then(Value::as_str) else {
            return Err(self.malformed("dead_letter", "the message body", &a));
        };
        let envelope = json!({
            DEAD_MARK: 1,
            "reason": cut(reason, MAX_REASON),
            "message_id": r.message_id,
            "deliveries": m.get("reserved_count").and_then(Value::as_u64),
            "dead_at_us": now_us(),
            "body": body,
        })
        .to_string();
        let dead_ids = self.post(&i.dead, &[(envelope, 0)], "dead_letter").await?;
        let rid = self.current(&r);
        let d = self
            .delete_message(&i.queue, &r.message_id, Some(&rid), "dead_letter")
            .await?;
        if d.ok() {
            self.forget(&r);
            return Ok(());
        }
        // Not ours any more (stale) or refused: take the copy back.
        for id in &dead_ids {
            let u = self
                .delete_message(&i.dead, &id.0, None, "dead_letter")
                .await?;
            if !(u.ok() || u.status == StatusCode::NOT_FOUND) {
                tracing::warn!(
                    message_id = %r.message_id,
                    "dead_letter: could not remove the dead-letter copy of a package whose \
                     reservation was stale; it is listed in both places"
                );
            }
        }
        if d.gone() {
            tracing::debug!(message_id = %r.message_id, "dead_letter: stale reservation ignored");
            self.forget(&r);
            return Ok(());
        }
        Err(self.unexpected("dead_letter", &d))
    }

    /// Peeks (never reserves) up to `limit` (at most 100) dead letters, oldest first.
    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let mut url = self.url(&self.inner.dead, &["messages"]);
        url.query_pairs_mut()
            .append_pair("n", &limit.min(MAX_BULK).to_string());
        let a = self
            .call("dead_letters", Method::GET, url, None, Duration::ZERO)
            .await?;
        if a.status == StatusCode::NOT_FOUND {
            return Ok(Vec::new());
        }
        if !a.ok() {
            return Err(self.unexpected("dead_letters", &a));
        }
        let Some(listed) = a.body.get("messages").and_then(Value::as_array) else {
            return Err(self.malformed("dead_letters", "a messages list", &a));
        };
        let mut out: Vec<DeadLetter> = listed
            .iter()
            .map(|m| {
                let text = m.get("body").and_then(Value::as_str).unwrap_or_default();
                let env: Value = serde_json::from_str(text).unwrap_or(Value::Null);
                if env.get(DEAD_MARK).is_some() {
                    DeadLetter {
                        message_id: MessageId(
                            env.get("message_id").and_then(id_text).unwrap_or_default(),
                        ),
                        payload: decode_body(
                            env.get("body").and_then(Value::as_str).unwrap_or_default(),
                        ),
                        reason: env
                            .get("reason")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                        deliveries: env
                            .get("deliveries")
                            .and_then(Value::as_u64)
                            .and_then(|n| u32::try_from(n).ok()),
                        dead_at_us: env.get("dead_at_us").and_then(Value::as_i64).unwrap_or(0),
                    }
                } else {
                    // Put there by someone else: shown as it is.
                    DeadLetter {
                        message_id: MessageId(m.get("id").and_then(id_text).unwrap_or_default()),
                        payload: decode_body(text),
                        reason: "not a qcluster dead letter".into(),
                        deliveries: None,
                        dead_at_us: 0,
                    }
                }
            })
            .collect();
        out.sort_by_key(|d| d.dead_at_us);
        out.truncate(limit);
        Ok(out)
    }

    /// Scans `<queue>--dead` for `id` (see the module docs), posts the package to the queue as a
    /// new message (first delivery again) and only once IronMQ stored it deletes the dead letter.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((own, rid, package)) = self.find_dead(id, "requeue_dead").await? else {
            return Ok(false);
        };
        let i = &self.inner;
        let posted = match self.post(&i.queue, &[(package, 0)], "requeue_dead").await {
            Ok(p) => p,
            Err(e) => {
                self.release_dead(&own, &rid, "requeue_dead").await;
                return Err(e);
            }
        };
        self.delete_dead_message(&own, &rid, "requeue_dead (delete the dead letter)")
            .await?;
        tracing::info!(message_id = %id, new_id = ?posted.first(), "ironmq: dead letter requeued");
        Ok(true)
    }

    /// Scans `<queue>--dead` for `id` like `requeue_dead`, then deletes it.
    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let Some((own, rid, _)) = self.find_dead(id, "delete_dead").await? else {
            return Ok(false);
        };
        self.delete_dead_message(&own, &rid, "delete_dead").await?;
        Ok(true)
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        let info = self.queue_info(&self.inner.dead).await?;
        Ok(Some(info.map_or(0, |q| {
            q.get("size").and_then(Value::as_u64).unwrap_or(0)
                + q.get("reserved").and_then(Value::as_u64).unwrap_or(0)
        })))
    }

    /// Reserves-and-deletes (`delete: true`) waiting messages in batches of 100 until none is
    /// left: packages in flight stay with their holders; delayed ones are not yet reservable
    /// and stay too. Returns how many were removed.
    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        if self.queue_info(&self.inner.queue).await?.is_none() {
            return Ok(0);
        }
        let mut removed = 0u64;
        loop {
            let got = self.reserve(MAX_BULK, 0, true).await?;
            if got.is_empty() {
                return Ok(removed);
            }
            removed += got.len() as u64;
        }
    }

    /// Deletes the queue and `<queue>--dead` (missing ones are fine). The next call on a
    /// handle creates the queue again.
    async fn delete_queue(&self) -> Result<(), BrokerError> {
        for q in [&self.inner.queue, &self.inner.dead] {
            let a = self
                .call(
                    "delete_queue",
                    Method::DELETE,
                    self.url(q, &[]),
                    None,
                    Duration::ZERO,
                )
                .await?;
            if !(a.ok() || a.status == StatusCode::NOT_FOUND) {
                return Err(self.unexpected("delete_queue", &a));
            }
        }
        self.inner.touched.clear();
        Ok(())
    }

    /// IronMQ's `size`: messages waiting, delayed ones included.
    async fn queue_size(&self) -> Result<u64, BrokerError> {
        match self.queue_info(&self.inner.queue).await? {
            None => Ok(0),
            Some(q) => q
                .get("size")
                .and_then(Value::as_u64)
                .ok_or_else(|| BrokerError::Backend {
                    broker: NAME,
                    message: "queue_size: IronMQ's queue info has no size".into(),
                }),
        }
    }

    /// `None` against IronMQ itself (its queue info says nothing about reservations); the
    /// test server's `reserved` count where the server gives one.
    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let info = self.queue_info(&self.inner.queue).await?;
        Ok(info.and_then(|q| q.get("reserved").and_then(Value::as_u64)))
    }

    /// The queue's info (a missing queue is an answer too), within `timeout`.
    async fn ping(&self) -> Result<(), BrokerError> {
        let limit = self.inner.config.timeout;
        match tokio::time::timeout(limit, self.queue_info(&self.inner.queue)).await {
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
        details.insert("ironmq_queue".into(), i.queue.clone());
        details.insert("dead_letter_queue".into(), i.dead.clone());
        details.insert("project_id".into(), i.config.project_id.clone());
        details.insert(
            "reservation_timeout_secs".into(),
            i.timeout_secs.to_string(),
        );
        details.insert(
            "long_poll_secs".into(),
            if i.wait_secs > 0 {
                i.wait_secs.to_string()
            } else {
                format!("0 (short polls every {:?})", i.settings.poll)
            },
        );
        details.insert(
            "max_message_size".into(),
            i.config.max_message_size.to_string(),
        );
        details.insert("max_package_bytes".into(), i.raw_limit.to_string());
        details.insert("bulk".into(), i.settings.bulk.to_string());
        details.insert(
            "allow_short_timeout".into(),
            i.config.allow_short_timeout.to_string(),
        );
        let notes = vec![
            "at-least-once: a package not acknowledged within retry (IronMQ's reservation \
             timeout) is delivered again"
                .into(),
            "cost: 1 post per 100 tasks (enqueue_many) or per task, 1 reserve per up to bulk \
             tasks (empty long polls too), 1 delete per task or per 100 (acknowledge_many); \
             fail is 1 release, extend 1 touch"
                .into(),
            format!(
                "packages travel base64url-encoded: at most {} raw bytes (message limit {} \
                 bytes of text, {DEAD_HEADROOM} kept for the dead-letter envelope)",
                i.raw_limit, i.config.max_message_size
            ),
            "a stale reservation (ran out, or the package was delivered again) is refused by \
             IronMQ: late acknowledge/fail/extend change nothing"
                .into(),
            "extend is IronMQ's touch, which issues a new reservation id: after an extend the \
             receipt settles on the handle that extended it (and its clones) only"
                .into(),
            "lock_size is unknown on IronMQ (its queue info has no reserved count)".into(),
            "requeue_dead and delete_dead scan <queue>--dead for the id (1 reserve per 100 dead \
             letters, then 1 release per dead letter passed over)"
                .into(),
        ];
        Ok(BrokerInfo {
            broker: NAME.into(),
            server: Some("IronMQ v3 API".into()),
            endpoint: i.endpoint.clone(),
            queue: i.settings.queue.clone(),
            receipts: true,
            retry_secs: Some(i.timeout_secs as f64),
            notes,
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            receipts: true,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: self.inner.raw_limit,
            text_only: true,
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
    fn debug_masks_the_token() {
        let c = IronMqConfig {
            token: "tok-s3cret".into(),
            ..IronMqConfig::default()
        };
        assert!(!format!("{c:?}").contains("tok-s3cret"));
    }

    #[test]
    fn config_refuses_unknown_keys_and_reads_seconds() {
        let e = serde_json::from_str::<IronMqConfig>(r#"{"tokn": "x"}"#).unwrap_err();
        assert!(e.to_string().contains("tokn"), "{e}");
        let c: IronMqConfig = serde_json::from_str(r#"{"timeout": 2.5, "port": 8787}"#).unwrap();
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!((c.port, c.protocol.as_str()), (8787, "https"));
    }

    #[test]
    fn touched_receipts_expire_without_a_settle() {
        let t = Touched::default();
        let t0 = Instant::now();
        let lease = Duration::from_secs(30);
        t.record("a", "a2".into(), lease, t0);
        t.record("b", "b2".into(), lease, t0);
        assert_eq!(t.current("a").as_deref(), Some("a2"));
        // Extended again: the newest id and a new deadline.
        t.record("a", "a3".into(), lease, t0 + Duration::from_secs(20));
        assert_eq!((t.current("a").as_deref(), t.len()), (Some("a3"), 2));
        // "b" never settled (worker died): gone after its lease and the grace, at the next
        // record; "a" (extended later) still there.
        let later = t0 + lease + TOUCH_GRACE + Duration::from_secs(1);
        t.record("c", "c2".into(), lease, later);
        assert_eq!(t.current("b"), None);
        assert_eq!(t.current("a").as_deref(), Some("a3"));
        // A long-running handle: a thousand abandoned extends leave only the live ones.
        for n in 0..1000u64 {
            t.record(
                &format!("x{n}"),
                "y".into(),
                lease,
                later + Duration::from_secs(n),
            );
        }
        assert!(t.len() <= 92, "{} entries kept", t.len());
        t.forget("x999");
        assert_eq!(t.current("x999"), None);
    }

    #[test]
    fn receipts_parse() {
        let r = Receipt::parse(&AckId::new("123:abc")).unwrap();
        assert_eq!(
            (r.message_id.as_str(), r.reservation.as_str()),
            ("123", "abc")
        );
        assert!(Receipt::parse(&AckId::new("123")).is_err());
        assert!(Receipt::parse(&AckId::new(":x")).is_err());
    }

    #[tokio::test]
    async fn short_retry_is_a_config_error() {
        let c = IronMqConfig::for_url("http://127.0.0.1:9", "p", "t");
        let s = QueueSettings {
            retry: Duration::from_secs(5),
            ..QueueSettings::for_queue("q")
        };
        let e = IronMqBroker::connect(&c, s).await.unwrap_err();
        assert!(e.to_string().contains("`retry`"), "{e}");
    }
}
