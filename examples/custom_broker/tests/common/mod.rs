//! Shared by the tests: the server's URL, skipping when it is down, a prefix per run, cleanup.
#![allow(dead_code)]

use std::time::Duration;

use broker_core::{Broker, QueueSettings};
use custom_broker::{NatsBroker, NatsConfig};
use futures::StreamExt;

/// `QCLUSTER_TEST_NATS_URL`, else the local server `scripts/test` starts.
pub fn url() -> String {
    std::env::var("QCLUSTER_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A stream/subject prefix no other run uses.
pub fn run_prefix() -> String {
    format!("t{}", &uuid::Uuid::now_v7().simple().to_string()[16..])
}

/// Whether the server answers; prints `skipped: <why>` if not, or panics when
/// `QCLUSTER_REQUIRE_SERVICES=1`.
pub async fn reachable() -> bool {
    let mut cfg = NatsConfig::new(url());
    cfg.connect_timeout = Duration::from_secs(3);
    match NatsBroker::connect(cfg, QueueSettings::for_queue("probe")).await {
        Ok(b) => match b.ping().await {
            Ok(()) => true,
            Err(e) => skip(e.to_string()),
        },
        Err(e) => skip(e.to_string()),
    }
}

fn skip(why: String) -> bool {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("NATS required (QCLUSTER_REQUIRE_SERVICES=1) but unreachable: {why}");
    }
    eprintln!("skipped: {why}");
    false
}

/// Deletes every stream whose name starts with `prefix-` (what a run created).
pub async fn cleanup(prefix: &str) {
    let Ok(client) = async_nats::connect(url()).await else {
        return;
    };
    let js = async_nats::jetstream::new(client);
    let names: Vec<String> = js
        .stream_names()
        .filter_map(|n| async move { n.ok() })
        .collect()
        .await;
    for n in names
        .iter()
        .filter(|n| n.starts_with(&format!("{prefix}-")))
    {
        let _ = js.delete_stream(n).await;
    }
}

/// A TCP proxy in front of the server that can cut every connection through it at once (the
/// server has no command to drop a given client's connections), while it keeps accepting new
/// ones, so clients reconnect.
pub struct Proxy {
    /// `nats://127.0.0.1:<port>` of the proxy.
    pub url: String,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free local port and forwards to the host:port of [`url`].
    pub async fn start() -> std::io::Result<Self> {
        let upstream = url()
            .trim_start_matches("nats://")
            .rsplit('@')
            .next()
            .unwrap_or("127.0.0.1:4222")
            .to_owned();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let c = conns.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut down, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut up) = tokio::net::TcpStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut down, &mut up).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Ok(Self {
            url: format!("nats://127.0.0.1:{port}"),
            conns,
            accept,
        })
    }

    /// A hook that drops every connection open through the proxy now.
    pub fn cutter(&self) -> impl Fn() + Send + Sync + 'static {
        let conns = self.conns.clone();
        move || {
            for c in conns.lock().unwrap().drain(..) {
                c.abort();
            }
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        (self.cutter())();
    }
}
