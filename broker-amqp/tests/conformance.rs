//! The conformance kit against RabbitMQ at 127.0.0.1:5672, on quorum and on classic queues.
//!
//! Each run logs in as a user made for it with `rabbitmqctl` (`qkit-<random>`, password
//! [`SECRET`], removed at the end), so that the kit checks a real secret and the
//! `connection_loss` hook can close exactly the kit's connections (`rabbitmqctl
//! close_connection` on the connections of that user): other tests share this RabbitMQ. Without
//! `rabbitmqctl` (or its rights) the kit runs as guest and `connection_loss` is skipped, loudly.
//! Receipts are bound to the handle that dequeued them (AMQP channels): `.bound_reservations()`.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use broker_amqp::{AmqpBroker, AmqpConfig, QueueType};
use broker_core::testkit::{BrokerFuture, DisconnectFuture, Kit};
use broker_core::{Broker, QueueSettings};

/// The kit user's password, which the kit checks never shows in `info`, `Debug` or errors; the
/// unreachable URL carries it too.
const SECRET: &str = "kit-Rabbit-pw-7731";

fn url() -> String {
    std::env::var("QCLUSTER_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

async fn reachable() -> bool {
    let mut cfg = AmqpConfig::new(url());
    cfg.connect_timeout = Duration::from_secs(3);
    let probe = format!(
        "qkit-probe-{}",
        &uuid::Uuid::now_v7().simple().to_string()[16..]
    );
    match AmqpBroker::connect(&cfg, QueueSettings::for_queue(&probe)).await {
        Ok(b) => {
            drop(b);
            if let Err(e) = delete_queues(&[probe]).await {
                eprintln!("could not remove the probe queue: {e}");
            }
            true
        }
        Err(e) => skip(e.to_string()),
    }
}

/// Deletes the queues a run used and their `.dead` queues, over AMQP (any name, the kit's
/// hostile one included).
async fn delete_queues(names: &[String]) -> Result<(), String> {
    use lapin::options::QueueDeleteOptions;
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .map_err(|e| e.to_string())?;
    let ch = conn.create_channel().await.map_err(|e| e.to_string())?;
    for q in names {
        for n in [q.clone(), format!("{q}.dead")] {
            ch.queue_delete(n.as_str().into(), QueueDeleteOptions::default())
                .await
                .map_err(|e| format!("delete {n:?}: {e}"))?;
        }
    }
    let _ = conn.close(200, "kit done".into()).await;
    Ok(())
}

fn skip(e: String) -> bool {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("RabbitMQ required but unreachable: {e}");
    }
    eprintln!("skipped: RabbitMQ unreachable: {e}");
    false
}

fn rabbitmqctl(args: &[&str]) -> Result<String, String> {
    let out = Command::new("rabbitmqctl")
        .args(args)
        .output()
        .map_err(|e| format!("rabbitmqctl {}: {e}", args[0]))?;
    if !out.status.success() {
        return Err(format!(
            "rabbitmqctl {}: {}",
            args[0],
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A RabbitMQ user of one kit run.
struct KitUser {
    name: String,
}

impl KitUser {
    fn create() -> Result<Self, String> {
        let name = format!("qkit-{}", &uuid::Uuid::now_v7().simple().to_string()[16..]);
        rabbitmqctl(&["add_user", &name, SECRET])?;
        let u = Self { name };
        rabbitmqctl(&["set_permissions", "-p", "/", &u.name, ".*", ".*", ".*"])?;
        Ok(u)
    }

    fn url(&self) -> String {
        format!("amqp://{}:{SECRET}@127.0.0.1:5672/%2f", self.name)
    }

    /// Closes every connection of this user (the kit's brokers alone log in as it).
    fn hook(&self) -> impl Fn() -> DisconnectFuture + Send + Sync + 'static {
        let name = self.name.clone();
        move || {
            let name = name.clone();
            Box::pin(async move {
                tokio::task::spawn_blocking(move || close_connections_of(&name))
                    .await
                    .map_err(|e| e.to_string())?
            })
        }
    }
}

impl Drop for KitUser {
    fn drop(&mut self) {
        if let Err(e) = rabbitmqctl(&["delete_user", &self.name]) {
            eprintln!("could not remove user {}: {e}", self.name);
        }
    }
}

fn close_connections_of(user: &str) -> Result<(), String> {
    let list = rabbitmqctl(&[
        "list_connections",
        "-q",
        "--no-table-headers",
        "pid",
        "user",
    ])?;
    let mut closed = 0;
    for line in list.lines() {
        let mut cols = line.split('\t');
        let (Some(pid), Some(u)) = (cols.next(), cols.next()) else {
            continue;
        };
        if u.trim() == user {
            // A connection that closed meanwhile is fine.
            if rabbitmqctl(&[
                "close_connection",
                pid.trim(),
                "qcluster kit: connection_loss",
            ])
            .is_ok()
            {
                closed += 1;
            }
        }
    }
    if closed == 0 {
        return Err(format!("no connection of user {user} to close"));
    }
    Ok(())
}

type Used = Arc<std::sync::Mutex<std::collections::BTreeSet<String>>>;

fn kit(queue_type: QueueType, url: String, used: Used) -> Kit {
    let make = move |s: QueueSettings| -> BrokerFuture {
        used.lock().unwrap().insert(s.queue.clone());
        let mut cfg = AmqpConfig::new(url.clone());
        cfg.queue_type = queue_type;
        cfg.connect_timeout = Duration::from_secs(3);
        Box::pin(async move {
            let b = AmqpBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    Kit::new(make)
        .bound_reservations()
        .retry(Duration::from_secs(2))
        .secret(SECRET)
        .unreachable(|| {
            Box::pin(async {
                let mut cfg = AmqpConfig::new(format!("amqp://qkit:{SECRET}@127.0.0.1:9/%2f"));
                cfg.connect_timeout = Duration::from_secs(2);
                let b = AmqpBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
                Ok(Arc::new(b) as Arc<dyn Broker>)
            })
        })
}

async fn run(queue_type: QueueType) {
    let user = match KitUser::create() {
        Ok(u) => u,
        Err(e) => {
            eprintln!(
                "no RabbitMQ user of the kit's own ({e}): running as guest; connection_loss \
                 will be skipped and the secret check sees only guest's password"
            );
            return kit(queue_type, url(), Used::default()).run().await;
        }
    };
    let used = Used::default();
    let k = kit(queue_type, user.url(), used.clone()).disconnect(user.hook());
    let only = std::env::var("KIT_ONLY").ok();
    let outcome = tokio::spawn(async move {
        match only {
            Some(o) => {
                let names: Vec<&str> = o.split(',').collect();
                k.run_only(&names).await
            }
            None => k.run().await,
        }
    })
    .await;
    let names: Vec<String> = used.lock().unwrap().iter().cloned().collect();
    if let Err(e) = delete_queues(&names).await {
        eprintln!("could not remove the kit's queues: {e}");
    }
    drop(user);
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

/// Removes queues left by interrupted runs: `KIT_LEFTOVERS` lists their names, one a line.
#[tokio::test]
async fn remove_leftovers() {
    if let Ok(list) = std::env::var("KIT_LEFTOVERS") {
        let names: Vec<String> = list
            .lines()
            .map(|l| l.trim_end_matches(".dead").to_owned())
            .filter(|l| !l.is_empty())
            .collect();
        delete_queues(&names).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_quorum() {
    if reachable().await {
        run(QueueType::Quorum).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_classic() {
    if reachable().await {
        run(QueueType::Classic).await;
    }
}
