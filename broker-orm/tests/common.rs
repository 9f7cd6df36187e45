//! Shared helpers: server URLs, loud skips, broker factories.
#![allow(dead_code)]

use std::sync::Arc;

use broker_core::testkit::{BrokerFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_orm::{OrmBroker, OrmConfig};

/// The password put in URLs so that the kit can check it never leaks (trust auth ignores it).
pub const SECRET: &str = "kit-Secret-pw-8731";

pub fn postgres_url() -> String {
    std::env::var("QCLUSTER_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| format!("postgres://postgres:{SECRET}@127.0.0.1:5432/test"))
}

pub fn mysql_url() -> String {
    std::env::var("QCLUSTER_TEST_MYSQL_URL")
        .unwrap_or_else(|_| "mysql://root@127.0.0.1:3306/test".into())
}

/// Opens a broker, or says loudly why the test is skipped. With `QCLUSTER_REQUIRE_SERVICES=1`
/// (set by `scripts/test`) an unreachable server fails the test instead.
pub async fn reachable(url: &str) -> bool {
    match OrmBroker::connect(&OrmConfig::new(url), QueueSettings::for_queue("probe")).await {
        Ok(_) => true,
        Err(e) => {
            if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
                panic!("server required but unreachable: {e}");
            }
            eprintln!("skipped: {e}");
            false
        }
    }
}

pub fn factory(url: String) -> impl Fn(QueueSettings) -> BrokerFuture + Send + Sync + 'static {
    move |s| {
        let url = url.clone();
        Box::pin(async move {
            let b = OrmBroker::connect(&OrmConfig::new(url), s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    }
}

pub fn kit(url: String, unreachable: String) -> Kit {
    Kit::new(factory(url)).secret(SECRET).unreachable(move || {
        let url = unreachable.clone();
        Box::pin(async move {
            let mut cfg = OrmConfig::new(url);
            cfg.connect_timeout = std::time::Duration::from_secs(3);
            let b = OrmBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    })
}
