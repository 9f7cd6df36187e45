//! Error reporting (Django Q's `error_reporter`): every final failure is POSTed as a JSON document
//! to `[error_reporter] webhook`, and sent to Sentry as an error event with `sentry_dsn`.
//!
//! ## The promise
//! A report never delays a task or its settlement: the monitor hands it to a bounded queue
//! ([`QUEUE`] reports; past that a report is dropped and counted, with a warning) and goes on. The
//! reporter posts each within `timeout`, and tries a failed POST (no answer, or a status other
//! than 2xx) again `retries` times, 1 s, 2 s, 4 s … apart. At shutdown the reports still queued get
//! one try each within [`DRAIN`]. The webhook URL is a secret (its path often is the token): logs
//! name its host only, and errors are stripped of it. The Sentry DSN is a secret too (it holds
//! the project's key); the `sentry` crate queues events on a thread of its own and retries on
//! its own terms, and gets [`DRAIN`] to flush at shutdown. Its event carries the function, cluster
//! and host as tags (one issue per function), the task id, arguments and attempts as extra data.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::ReporterSection;
use crate::error::{ConfigError, Error};
use crate::store::{TaskRecord, rfc3339};

/// Reports waiting to be posted, at most.
pub const QUEUE: usize = 1000;
/// How long the reports queued at shutdown get.
pub const DRAIN: Duration = Duration::from_secs(5);

/// One final failure, as POSTed.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// `"task_failed"`.
    pub event: &'static str,
    /// The cluster name.
    pub cluster: String,
    /// The host that ran it.
    pub host: String,
    /// The task's id.
    pub id: String,
    /// Its function.
    pub func: String,
    /// Its name (`name` option or schedule), when other than the function.
    pub name: Option<String>,
    /// Its group.
    pub group: Option<String>,
    /// Its arguments (JSON).
    pub args: serde_json::Value,
    /// The failure message.
    pub error: String,
    /// Attempts made.
    pub attempts: u32,
    /// When the last attempt started and stopped (RFC 3339).
    pub started: String,
    /// When it stopped.
    pub stopped: String,
}

impl Report {
    /// The report of the final failure `r`.
    pub fn of(r: &TaskRecord, host: &str) -> Self {
        let json = |s: &str| {
            serde_json::from_str(s).unwrap_or_else(|_| serde_json::Value::String(s.to_owned()))
        };
        let error = match r.result.as_deref().map(json) {
            Some(serde_json::Value::String(s)) => s,
            Some(other) => other.to_string(),
            None => String::new(),
        };
        Self {
            event: "task_failed",
            cluster: r.cluster.clone(),
            host: host.to_owned(),
            id: r.id.to_string(),
            func: r.func.clone(),
            name: (r.name != r.func).then(|| r.name.clone()),
            group: r.group.clone(),
            args: json(&r.args),
            error,
            attempts: r.attempts,
            started: rfc3339(r.started_us),
            stopped: rfc3339(r.stopped_us),
        }
    }
}

/// The monitor's end: hands reports over without waiting.
#[derive(Debug, Clone)]
pub(crate) struct Reports {
    tx: mpsc::Sender<Report>,
    dropped: Arc<AtomicU64>,
    host: String,
}

impl Reports {
    /// Queues the report of the final failure `r`; drops it (counted, and said once per 100)
    /// when the queue is full.
    pub fn send(&self, r: &TaskRecord) {
        let report = Report::of(r, &self.host);
        if self.tx.try_send(report).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed);
            if n.is_multiple_of(100) {
                tracing::warn!(
                    "error reporter: {} reports dropped, the webhook cannot keep up",
                    n + 1
                );
            }
        }
    }
}

/// `scheme://host` of the webhook, for logs.
fn where_to(url: &reqwest::Url) -> String {
    format!("{}://{}", url.scheme(), url.host_str().unwrap_or("?"))
}

/// The reporter of `[error_reporter]`, if a webhook is set: the monitor's end and the task that
/// posts. Fails (naming the key) on a URL that is not http(s).
pub(crate) fn start(
    section: &ReporterSection,
    host: &str,
    done: CancellationToken,
) -> Result<Option<(Reports, tokio::task::JoinHandle<()>)>, Error> {
    if section.webhook.is_none() && section.sentry_dsn.is_none() {
        return Ok(None);
    }
    let webhook = match &section.webhook {
        Some(url) => {
            let bad = |m: &str| ConfigError::new("error_reporter.webhook", m.to_owned());
            let url = reqwest::Url::parse(url.reveal()).map_err(|_| bad("is not a URL"))?;
            if !matches!(url.scheme(), "http" | "https") {
                return Err(bad("must be an http:// or https:// URL").into());
            }
            Some((http_client(section.timeout, "error_reporter.webhook")?, url))
        }
        None => None,
    };
    let sentry = match &section.sentry_dsn {
        Some(dsn) => {
            let key = "error_reporter.sentry_dsn";
            // The DSN holds the project's key: never echoed, not even in the error.
            let dsn: sentry::types::Dsn = dsn.reveal().parse().map_err(|_| {
                ConfigError::new(
                    key,
                    "is not a Sentry DSN (https://KEY@HOST/PROJECT_ID)".to_owned(),
                )
            })?;
            let http = http_client(section.timeout, key)?;
            let mut options = sentry::ClientOptions::default();
            options.dsn = Some(dsn);
            options.release = Some(concat!("qcluster@", env!("CARGO_PKG_VERSION")).into());
            options.server_name = Some(host.to_owned().into());
            options.shutdown_timeout = DRAIN;
            // Room for a burst of failures (the crate's default holds 30, then drops).
            options.transport_channel_capacity = std::num::NonZeroUsize::new(QUEUE);
            options.transport = Some(Arc::new(Via(http)));
            Some(Arc::new(sentry::Client::from(options)))
        }
        None => None,
    };
    let (tx, rx) = mpsc::channel(QUEUE);
    let post = Poster {
        webhook,
        sentry,
        retries: section.retries,
    };
    let handle = tokio::spawn(post.run(rx, done));
    Ok(Some((
        Reports {
            tx,
            dropped: Arc::default(),
            host: host.to_owned(),
        },
        handle,
    )))
}

/// An HTTP client on rustls (ring, the webpki roots) with `timeout`; `key` names the setting
/// in errors.
fn http_client(timeout: Duration, key: &str) -> Result<reqwest::Client, ConfigError> {
    let bad = |m: String| ConfigError::new(key, m);
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(format!("TLS setup: {e}")))?
    .with_root_certificates(rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    })
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .timeout(timeout)
        .user_agent(concat!("qcluster/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| bad(format!("HTTP client: {}", e.without_url())))
}

/// Sentry's transport on our HTTP client.
struct Via(reqwest::Client);

impl sentry::TransportFactory for Via {
    fn create_transport_with_options(
        &self,
        options: sentry::TransportOptions,
    ) -> Arc<dyn sentry::Transport> {
        Arc::new(
            sentry::transports::ReqwestHttpTransportOptions::from(options)
                .with_client(self.0.clone())
                .build(),
        )
    }
}

/// The Sentry event of a final failure.
fn sentry_event(r: &Report) -> sentry::protocol::Event<'static> {
    let mut e = sentry::protocol::Event {
        level: sentry::Level::Error,
        message: Some(format!("task {} failed: {}", r.func, r.error)),
        logger: Some("qcluster".into()),
        server_name: Some(r.host.clone().into()),
        // One issue per function, whatever the message.
        fingerprint: vec!["qcluster-task-failed".into(), r.func.clone().into()].into(),
        ..Default::default()
    };
    e.tags.insert("func".into(), r.func.clone());
    e.tags.insert("cluster".into(), r.cluster.clone());
    if let Some(g) = &r.group {
        e.tags.insert("group".into(), g.clone());
    }
    e.extra.insert("task_id".into(), r.id.clone().into());
    e.extra.insert("args".into(), r.args.clone());
    e.extra.insert("attempts".into(), r.attempts.into());
    e.extra.insert("started".into(), r.started.clone().into());
    e.extra.insert("stopped".into(), r.stopped.clone().into());
    e
}

struct Poster {
    webhook: Option<(reqwest::Client, reqwest::Url)>,
    sentry: Option<Arc<sentry::Client>>,
    retries: u32,
}

impl Poster {
    /// One POST: `Ok` on a 2xx answer (or no webhook).
    async fn post(&self, r: &Report) -> Result<(), String> {
        let Some((http, url)) = &self.webhook else {
            return Ok(());
        };
        match http.post(url.clone()).json(r).send().await {
            Ok(a) if a.status().is_success() => Ok(()),
            Ok(a) => Err(format!("answered {}", a.status())),
            Err(e) => Err(e.without_url().to_string()),
        }
    }

    /// Sends `r` to Sentry (if set) and posts it to the webhook (if set) with `tries` tries.
    async fn deliver(&self, r: &Report, tries: u32, done: &CancellationToken) {
        if let Some(client) = &self.sentry {
            // Queued on the sentry client's own thread: never waits for the network.
            let hub = sentry::Hub::new(Some(client.clone()), Arc::new(sentry::Scope::default()));
            hub.capture_event(sentry_event(r));
        }
        self.post_with_retries(r, tries, done).await;
    }

    /// Posts `r` to the webhook (if any), with `tries` tries, `pause` doubling in between unless
    /// `done` is cancelled.
    async fn post_with_retries(&self, r: &Report, tries: u32, done: &CancellationToken) {
        let Some((_, url)) = &self.webhook else {
            return;
        };
        let mut pause = Duration::from_secs(1);
        for n in 1..=tries {
            match self.post(r).await {
                Ok(()) => return,
                Err(e) if n == tries => tracing::warn!(
                    "error reporter: report of task {} not delivered to {} after {n} tries: {e}",
                    r.id,
                    where_to(url)
                ),
                Err(e) => {
                    tracing::debug!("error reporter: {e}; trying again in {pause:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(pause) => {}
                        _ = done.cancelled() => return,
                    }
                    pause *= 2;
                }
            }
        }
    }

    async fn run(self, mut rx: mpsc::Receiver<Report>, done: CancellationToken) {
        loop {
            let r = tokio::select! {
                r = rx.recv() => r,
                _ = done.cancelled() => break,
            };
            let Some(r) = r else { return };
            self.deliver(&r, self.retries.saturating_add(1), &done)
                .await;
        }
        // Shutdown: every queued report goes to Sentry's queue first; then Sentry flushes while
        // the webhook gets one try per report, both within the drain time.
        let mut left = Vec::new();
        while let Ok(r) = rx.try_recv() {
            left.push(r);
        }
        let sentry = self.sentry.clone().map(|client| {
            let hub = sentry::Hub::new(Some(client.clone()), Arc::new(sentry::Scope::default()));
            for r in &left {
                hub.capture_event(sentry_event(r));
            }
            tokio::task::spawn_blocking(move || client.close(Some(DRAIN)))
        });
        let posts = async {
            for r in &left {
                self.post_with_retries(r, 1, &CancellationToken::new())
                    .await;
            }
        };
        if tokio::time::timeout(DRAIN, posts).await.is_err() {
            tracing::warn!("error reporter: reports still queued at shutdown were dropped");
        }
        if let Some(closing) = sentry {
            let closed = closing.await;
            if !matches!(closed, Ok(true)) {
                tracing::warn!(
                    "error reporter: Sentry events still queued at shutdown were dropped"
                );
            }
        }
    }
}
