//! The cluster over HTTP: `/metrics` (Prometheus text), `/stats.json`, `/health` and the
//! dashboard pages, served by `qcluster run` when `[http] listen` is set and by
//! `qcluster dashboard`.
//!
//! The promise, on access: nothing changes state without the token (`[http] token`, sent as
//! `Authorization: Bearer …` or by the dashboard's login cookie); with no token set the
//! dashboard is read-only. When a token is set, `/metrics` and `/stats.json` need it too; when
//! the address is beyond loopback, everything but `/health` and the login page needs it (and
//! such an address is refused without a token), and `/health` answers a stranger with its
//! status code and `{"healthy": …}` only (hosts, pids and errors need the token). The login
//! cookie is `HttpOnly` and `SameSite=Strict`, so another site's page cannot post a form with
//! it, and holds an HMAC of the token, not the token: a cookie read from a browser profile or a
//! proxy log does not give the bearer token away, and changing the token ends every login.
//! Every value shown on a page is escaped (task arguments and results are user data); the
//! token is never shown. The server speaks plain HTTP: beyond loopback, put TLS in front.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use broker_core::Broker;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::config::Config;
use crate::error::{ConfigError, Error};
use crate::metrics::Metrics;
use crate::shared::Shared;
use crate::store::Store;

mod pages;

/// What the pages and endpoints read from.
#[derive(Clone)]
pub(crate) struct Web {
    pub config: Arc<Config>,
    pub broker: Arc<dyn Broker>,
    pub store: Store,
    pub client: Client,
    token: Option<Arc<str>>,
    /// The login cookie's value: HMAC-SHA256 of a fixed label under the token, hex.
    session: Option<Arc<str>>,
    /// Reads need no token (the address is loopback).
    open_reads: bool,
    /// The port served, for the `Host` check on loopback.
    port: u16,
    dashboard: bool,
    /// The running cluster's own figures (`run` only; `qcluster dashboard` has none).
    pub live: Option<Live>,
}

/// A running cluster's state, for `/metrics` and `/stats.json`.
#[derive(Clone)]
pub(crate) struct Live {
    pub shared: Arc<Shared>,
    pub metrics: Option<Arc<Metrics>>,
    pub started: Instant,
    pub host: String,
}

impl Web {
    /// The server's state; `addr` is where it listens.
    pub fn new(
        config: Arc<Config>,
        client: Client,
        store: Store,
        addr: SocketAddr,
        dashboard: bool,
        live: Option<Live>,
    ) -> Self {
        let token: Option<Arc<str>> = config.http.token.as_ref().map(|t| t.reveal().into());
        Self {
            broker: client.broker().clone(),
            session: token.as_deref().map(|t| session_of(t).into()),
            token,
            open_reads: addr.ip().is_loopback(),
            port: addr.port(),
            config,
            store,
            client,
            dashboard,
            live,
        }
    }

    /// The request carries the token (bearer header or login cookie).
    pub fn authorized(&self, headers: &HeaderMap) -> bool {
        let (Some(token), Some(session)) = (&self.token, &self.session) else {
            return false;
        };
        let bearer = headers
            .get_all(header::AUTHORIZATION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .filter_map(|v| v.strip_prefix("Bearer "))
            .any(|v| same(v.trim().as_bytes(), token.as_bytes()));
        bearer
            || headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|c| c.trim().strip_prefix(COOKIE_NAME))
                .filter_map(|c| c.strip_prefix('='))
                .any(|v| same(v.as_bytes(), session.as_bytes()))
    }

    /// A state change may go ahead: the token, and (for a browser) a request from our own
    /// pages. `SameSite=Strict` keeps other sites' forms from carrying the cookie, but a page on
    /// another port of the same host is the same site: the browser's `Sec-Fetch-Site` and
    /// `Origin` headers tell it apart.
    pub fn may_change(&self, headers: &HeaderMap) -> bool {
        self.token.is_some() && self.authorized(headers) && same_origin(headers)
    }

    /// Pages may be read.
    pub fn may_read(&self, headers: &HeaderMap) -> bool {
        self.open_reads || self.authorized(headers)
    }

    /// `/metrics` and `/stats.json` may be read.
    fn may_scrape(&self, headers: &HeaderMap) -> bool {
        (self.token.is_none() && self.open_reads) || self.authorized(headers)
    }

    /// A token is set (the dashboard offers a login).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The login cookie for `token`, if it is the right one.
    pub fn login_cookie(&self, token: &str) -> Option<HeaderValue> {
        let t = self.token.as_ref()?;
        let session = self.session.as_ref()?;
        if !same(token.trim().as_bytes(), t.as_bytes()) {
            return None;
        }
        HeaderValue::from_str(&format!(
            "{COOKIE_NAME}={session}; HttpOnly; SameSite=Strict; Path=/"
        ))
        .ok()
    }
}

/// The login cookie's value for `token`: HMAC-SHA256 of a fixed label keyed by the token, in
/// hex. Only the server, which holds the token, can make it; it does not reveal the token.
fn session_of(token: &str) -> String {
    use hmac::{Hmac, Mac};
    // HMAC takes a key of any length: this cannot fail.
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(token.as_bytes()) else {
        return String::new();
    };
    mac.update(b"qcluster dashboard login v1");
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// False when a browser says the request comes from another origin (tools such as curl send
/// neither header and pass).
fn same_origin(headers: &HeaderMap) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return false;
    }
    match (header("origin"), header("host")) {
        (Some(origin), Some(host)) => origin
            .split_once("://")
            .is_some_and(|(_, rest)| rest.eq_ignore_ascii_case(host)),
        (Some(_), None) => false,
        _ => true,
    }
}

/// On a loopback address, answers only requests whose `Host` is a loopback name with our port:
/// a page of another site whose name was made to resolve to 127.0.0.1 (DNS rebinding) cannot
/// read what loopback serves without the token.
async fn loopback_host(State(web): State<Web>, req: Request, next: Next) -> Response {
    if web.open_reads {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let port = web.port;
        let ok = [
            format!("127.0.0.1:{port}"),
            format!("localhost:{port}"),
            format!("[::1]:{port}"),
        ]
        .iter()
        .any(|h| h.eq_ignore_ascii_case(host));
        if !ok {
            return refused(
                StatusCode::MISDIRECTED_REQUEST,
                "this server answers to 127.0.0.1, localhost or [::1] with its port only",
            );
        }
    }
    next.run(req).await
}

/// The dashboard's login cookie.
pub(crate) const COOKIE_NAME: &str = "qcluster_token";

/// Compares in time independent of where the inputs differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Binds `listen` (checked as `[http]` says; `key` names the setting in errors).
pub(crate) async fn bind(
    config: &Config,
    listen: &str,
    key: &str,
) -> Result<(tokio::net::TcpListener, SocketAddr), Error> {
    let addr = config.http.check(listen, key)?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| ConfigError::new(key, format!("cannot listen on {addr}: {e}")))?;
    let local = listener.local_addr().unwrap_or(addr);
    Ok((listener, local))
}

/// Serves until `stop` is cancelled.
pub(crate) async fn serve(listener: tokio::net::TcpListener, web: Web, stop: CancellationToken) {
    let mut app = Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/stats.json", get(stats));
    if web.dashboard {
        app = app.merge(pages::routes());
    }
    let app = app
        .layer(axum::middleware::from_fn_with_state(
            web.clone(),
            loopback_host,
        ))
        .layer(axum::middleware::from_fn(security_headers))
        .with_state(web);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::error!("http server stopped: {e}");
    }
}

/// Pages are not framed by other sites and are not cached.
async fn security_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert("x-frame-options", HeaderValue::from_static("DENY"));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; \
             frame-ancestors 'none'",
        ),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    res
}

fn refused(status: StatusCode, why: &str) -> Response {
    (status, format!("{why}\n")).into_response()
}

const NEEDS_TOKEN: &str = "needs the token: `Authorization: Bearer <http.token>`";

/// `/health`: 200 when the broker and the store answer and a cluster of this name published
/// its status within 3 guard cycles (at least 10 s), else 503; JSON as `qcluster health --json`
/// to whoever may read the pages, `{"healthy": …}` alone to others (a load balancer needs only
/// the code).
async fn health(State(web): State<Web>, headers: HeaderMap) -> Response {
    let max_age = (web.config.guard_cycle * 3).max(Duration::from_secs(10));
    let h = crate::health::assess(&web.config, &web.broker, &web.store, max_age).await;
    let status = if h.healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    // Details (hosts, pids, errors, upkeep figures) to whoever may read the pages.
    if web.may_read(&headers) {
        (status, axum::Json(h)).into_response()
    } else {
        (
            status,
            axum::Json(serde_json::json!({ "healthy": h.healthy })),
        )
            .into_response()
    }
}

async fn live_figures(live: &Live) -> (crate::metrics::Gauges, crate::counters::Summary) {
    let gauges = crate::metrics::read_gauges(
        &*live.shared.broker,
        &live.shared.running,
        live.shared.config.workers,
        Duration::from_secs(2),
    )
    .await;
    (gauges, live.shared.counters.summary())
}

/// `/metrics`: Prometheus text.
async fn metrics(State(web): State<Web>, headers: HeaderMap) -> Response {
    if !web.may_scrape(&headers) {
        return refused(StatusCode::UNAUTHORIZED, NEEDS_TOKEN);
    }
    let Some(live) = &web.live else {
        return refused(
            StatusCode::NOT_FOUND,
            "no cluster runs in this process: /metrics is served by `qcluster run` with [http] listen",
        );
    };
    let Some(m) = &live.metrics else {
        return refused(
            StatusCode::NOT_FOUND,
            "metrics are off ([http] metrics = false)",
        );
    };
    let (gauges, totals) = live_figures(live).await;
    m.set_gauges(&gauges, &totals);
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.render(),
    )
        .into_response()
}

/// `/stats.json`: the figures of `/metrics` as JSON, with the cluster's totals.
async fn stats(State(web): State<Web>, headers: HeaderMap) -> Response {
    if !web.may_scrape(&headers) {
        return refused(StatusCode::UNAUTHORIZED, NEEDS_TOKEN);
    }
    let Some(live) = &web.live else {
        return refused(
            StatusCode::NOT_FOUND,
            "no cluster runs in this process: /stats.json is served by `qcluster run` with [http] listen",
        );
    };
    let (gauges, totals) = live_figures(live).await;
    let by_func = live.metrics.as_ref().map(|m| m.by_func());
    axum::Json(serde_json::json!({
        "cluster": web.config.name,
        "label": web.config.label,
        "host": live.host,
        "pid": std::process::id(),
        "uptime_s": live.started.elapsed().as_secs_f64(),
        "worker_mode": web.config.worker_mode.to_string(),
        "totals": totals,
        "queue": {
            "waiting": gauges.waiting,
            "in_flight": gauges.in_flight,
            "dead_letters": gauges.dead_letters,
        },
        "workers": { "busy": gauges.workers_busy, "total": gauges.workers },
        "reincarnations": totals.reincarnated,
        "by_func": by_func,
    }))
    .into_response()
}
