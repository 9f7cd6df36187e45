//! The conformance kit against the NATS server at 127.0.0.1:4222 (JetStream on), under a
//! stream prefix of its own per run.

mod common;

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use common::*;
use custom_broker::{NatsBroker, NatsConfig};

/// A password in the URL. The test server has no authentication and ignores it, so the kit
/// can check that it shows nowhere (info, Debug, errors) on a working broker too.
const SECRET: &str = "kit-Nats-pw-7731";

fn with_secret(url: &str) -> String {
    url.replacen("nats://", &format!("nats://kit:{SECRET}@"), 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    if !reachable().await {
        return;
    }
    let prefix = run_prefix();
    // Through a proxy, so that the connection-loss check can cut the kit's connections.
    let proxy = Proxy::start().await.expect("proxy");
    let cut = proxy.cutter();
    let via = proxy.url.clone();
    let p = prefix.clone();
    let make = move |s: QueueSettings| -> BrokerFuture {
        let mut cfg = NatsConfig::new(with_secret(&via));
        cfg.prefix = p.clone();
        Box::pin(async move {
            let b = NatsBroker::connect(cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    let kit = Kit::new(make)
        .secret(SECRET)
        .disconnect(move || {
            cut();
            Box::pin(async { Ok(()) })
        })
        .unreachable(|| {
            Box::pin(async {
                // Nothing listens on port 1: refused at once, within connect_timeout at worst.
                let mut cfg = NatsConfig::new(format!("nats://kit:{SECRET}@127.0.0.1:1"));
                cfg.connect_timeout = Duration::from_secs(2);
                let b = NatsBroker::connect(cfg, QueueSettings::for_queue("unreachable")).await?;
                Ok(Arc::new(b) as Arc<dyn Broker>)
            })
        });
    let outcome = tokio::spawn(async move { kit.run().await }).await;
    drop(proxy);
    cleanup(&prefix).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
