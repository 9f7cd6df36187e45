//! The conformance kit against Redis at 127.0.0.1:6379, reliable and fast mode, each check
//! under its own key prefix.
//!
//! Each run logs in as an ACL user made for it (`qkit-<random>`, password [`SECRET`], removed
//! at the end), so that the `connection_loss` check can drop exactly the kit's connections with
//! `CLIENT KILL USER`: other test binaries share this Redis at the same time. Where the server
//! refuses `ACL SETUSER` the kit runs without a user and `connection_loss` is skipped, loudly.

use std::sync::Arc;
use std::time::Duration;

use broker_core::testkit::{BrokerFuture, DisconnectFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_redis::{RedisBroker, RedisConfig};
use redis::aio::MultiplexedConnection;

/// The kit user's password, which the kit checks never shows in `info`, `Debug` or errors; the
/// unreachable URL carries it too.
const SECRET: &str = "kit-Redis-pw-4410";

fn url() -> String {
    std::env::var("QCLUSTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn reachable() -> bool {
    match RedisBroker::connect(&RedisConfig::new(url()), QueueSettings::for_queue("probe")).await {
        Ok(b) => match b.ping().await {
            Ok(()) => true,
            Err(e) => skip(e.to_string()),
        },
        Err(e) => skip(e.to_string()),
    }
}

fn skip(e: String) -> bool {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("server required but unreachable: {e}");
    }
    eprintln!("skipped: {e}");
    false
}

/// An ACL user of one kit run, and a connection of the test's own (as the server's URL says)
/// to kill the user's clients and to remove the user.
struct KitUser {
    name: String,
    url: String,
    admin: MultiplexedConnection,
}

impl KitUser {
    async fn create() -> Result<Self, String> {
        let name = format!("qkit-{}", &uuid::Uuid::now_v7().simple().to_string()[16..]);
        let mut admin = redis::Client::open(url())
            .map_err(|e| e.to_string())?
            .get_multiplexed_async_connection()
            .await
            .map_err(|e| e.to_string())?;
        redis::cmd("ACL")
            .arg("SETUSER")
            .arg(&name)
            .arg("reset")
            .arg("on")
            .arg(format!(">{SECRET}"))
            .arg("allkeys")
            .arg("allchannels")
            .arg("+@all")
            .query_async::<()>(&mut admin)
            .await
            .map_err(|e| format!("ACL SETUSER: {e}"))?;
        let mut u = redis::parse_redis_url(&url()).ok_or("not a redis:// URL")?;
        let set = u
            .set_username(&name)
            .and_then(|()| u.set_password(Some(SECRET)));
        if set.is_err() {
            return Err("cannot put a user in the URL".into());
        }
        Ok(Self {
            name,
            url: u.to_string(),
            admin,
        })
    }

    /// `CLIENT KILL USER`: the server drops every connection of the kit's brokers (they alone
    /// log in as this user), and no one else's.
    fn hook(&self) -> impl Fn() -> DisconnectFuture + Send + Sync + 'static {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        move || {
            let (mut admin, name) = (admin.clone(), name.clone());
            Box::pin(async move {
                let killed: u64 = redis::cmd("CLIENT")
                    .arg("KILL")
                    .arg("USER")
                    .arg(&name)
                    .query_async(&mut admin)
                    .await
                    .map_err(|e| format!("CLIENT KILL USER {name}: {e}"))?;
                if killed == 0 {
                    return Err(format!("no client of user {name} to kill"));
                }
                Ok(())
            })
        }
    }

    async fn remove(mut self) {
        let removed: Result<u64, _> = redis::cmd("ACL")
            .arg("DELUSER")
            .arg(&self.name)
            .query_async(&mut self.admin)
            .await;
        if let Err(e) = removed {
            eprintln!("could not remove ACL user {}: {e}", self.name);
        }
    }
}

fn kit(reliable: bool, url: String) -> Kit {
    let run = uuid::Uuid::now_v7().simple().to_string();
    let make = move |s: QueueSettings| -> BrokerFuture {
        let mut cfg = RedisConfig::new(url.clone());
        cfg.reliable = reliable;
        cfg.prefix = Some(format!("kit{}", &run[16..]));
        Box::pin(async move {
            let b = RedisBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make).secret(SECRET).unreachable(|| {
        Box::pin(async {
            let mut cfg = RedisConfig::new(format!("redis://:{SECRET}@127.0.0.1:1/0"));
            cfg.connect_timeout = Duration::from_secs(2);
            let b = RedisBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    })
}

/// Runs the kit as a user of its own with the disconnect hook, or (without the right to make
/// users) as the URL says and without the hook.
async fn run(reliable: bool) {
    let user = match KitUser::create().await {
        Ok(u) => u,
        Err(e) => {
            eprintln!("no ACL user of the kit's own ({e}): connection_loss will be skipped");
            return kit(reliable, url()).run().await;
        }
    };
    let k = kit(reliable, user.url.clone()).disconnect(user.hook());
    let outcome = tokio::spawn(async move { k.run().await }).await;
    user.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_reliable() {
    if reachable().await {
        run(true).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_fast() {
    if reachable().await {
        run(false).await;
    }
}
