//! The conformance kit against the Disque nodes named by `DISQUE_NODES`
//! (`127.0.0.1:7711,127.0.0.1:7712`), with `DISQUE_AUTH` as their `requirepass` when set (the
//! kit then checks that it never shows). Without `DISQUE_NODES` every test prints a skip line and
//! passes, even under `QCLUSTER_REQUIRE_SERVICES=1`: no Disque package exists to install.
//!
//! The kit's lease is 1.75 s: Disque's RETRY is whole seconds with ±0.25 s jitter, and the
//! adapter sends `ceil(retry + 0.25 s)` = 2 s, so leases last 1.75–2.25 s.
//! `connection_loss` is skipped: Disque cannot name a client per handle for `CLIENT KILL`, and
//! killing every client would disturb other users of the shared nodes.

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_disque::{DisqueBroker, DisqueConfig};

fn config() -> Option<DisqueConfig> {
    let nodes = std::env::var("DISQUE_NODES").ok()?;
    let nodes: Vec<String> = nodes
        .split(',')
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
        .collect();
    if nodes.is_empty() {
        return None;
    }
    Some(DisqueConfig {
        auth: std::env::var("DISQUE_AUTH").ok().filter(|a| !a.is_empty()),
        ..DisqueConfig::new(nodes)
    })
}

fn skip() {
    eprintln!("skipped: no Disque server (set DISQUE_NODES)");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(config) = config() else {
        return skip();
    };
    let make = {
        let config = config.clone();
        move |settings: QueueSettings| -> BrokerFuture {
            let config = config.clone();
            Box::pin(async move {
                Ok(Arc::new(DisqueBroker::connect(&config, settings).await?) as Arc<dyn Broker>)
            })
        }
    };
    let unreachable = {
        let config = config.clone();
        move || -> BrokerFuture {
            let config = DisqueConfig {
                nodes: vec!["127.0.0.1:9".into()],
                connect_timeout: Duration::from_secs(2),
                ..config.clone()
            };
            Box::pin(async move {
                Ok(
                    Arc::new(DisqueBroker::connect(&config, QueueSettings::default()).await?)
                        as Arc<dyn Broker>,
                )
            })
        }
    };
    let mut kit = Kit::new(make)
        .unreachable(unreachable)
        .retry(Duration::from_millis(1750));
    if let Some(secret) = &config.auth {
        kit = kit.secret(secret.clone());
    } else {
        eprintln!("no DISQUE_AUTH: the secret checks run without a password");
    }
    kit.run().await;
}
