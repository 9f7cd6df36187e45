//! The conformance kit against the MongoDB-wire server of `QCLUSTER_TEST_MONGO_URL` (SecantusDB on
//! 127.0.0.1:27018 by default).
//!
//! Each run works in a database of its own (`qkit_<random>`, dropped at the end) and logs in as
//! a user made for it (password [`SECRET`], which the kit checks never shows in `info`, `Debug`
//! or errors); where the server refuses `createUser` the run goes without credentials and the
//! secret is only in the unreachable URL. The kit's clients carry an application name of their
//! own, so the `connection_loss` hook finds exactly their connections in `currentOp` and has
//! the server close them with `killOp` (SecantusDB closes the connection; a real mongod only
//! interrupts a running operation, so there the hook reports that the connections stayed and
//! the check fails loudly instead of passing without a loss).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::testkit::{BrokerFuture, DisconnectFuture, Kit};
use broker_core::{Broker, QueueSettings};
use broker_mongo::{MongoBroker, MongoConfig};
use common::*;
use mongodb::Client;
use mongodb::bson::doc;

const SECRET: &str = "kit-Mongo-pw-5520";

fn hook(admin: Client, app: String) -> impl Fn() -> DisconnectFuture + Send + Sync + 'static {
    move || {
        let (admin, app) = (admin.clone(), app.clone());
        Box::pin(async move {
            let ids = connections_of(&admin, &app).await?;
            if ids.is_empty() {
                return Err(format!("no connection of application {app} to kill"));
            }
            let db = admin.database("admin");
            for id in &ids {
                db.run_command(doc! { "killOp": 1, "op": id })
                    .await
                    .map_err(|e| format!("killOp {id}: {e}"))?;
            }
            // The server closes them asynchronously: wait until they are gone.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let left = connections_of(&admin, &app).await?;
                if !left.iter().any(|c| ids.contains(c)) {
                    return Ok(());
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "killOp left connections {left:?} of {app} open (a real mongod does not \
                         close connections on killOp)"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance() {
    let Some(admin) = admin().await else {
        return;
    };
    let t = tag();
    let database = format!("qkit_{t}");
    let user = format!("qkit_{t}");
    let app = format!("qkit-{t}");
    let created = admin
        .database(&database)
        .run_command(doc! {
            "createUser": &user,
            "pwd": SECRET,
            "roles": [{ "role": "readWrite", "db": &database }],
        })
        .await;
    let url = match &created {
        Ok(_) => with_credentials(&url(), &user, SECRET, &database, &app),
        Err(e) => {
            eprintln!(
                "no user of the kit's own ({e}): the secret is only checked on the unreachable URL"
            );
            with_app(&url(), &app)
        }
    };
    let db = database.clone();
    let make = move |s: QueueSettings| -> BrokerFuture {
        let cfg = MongoConfig {
            database: db.clone(),
            connect_timeout: Duration::from_secs(5),
            ..MongoConfig::new(url.clone())
        };
        Box::pin(async move {
            let b = MongoBroker::connect(&cfg, s).await?;
            Ok(Arc::new(b) as Arc<dyn Broker>)
        })
    };
    let kit = Kit::new(make)
        .secret(SECRET)
        // Short leases keep the run short; SecantusDB answers a claim within tens of ms.
        .retry(Duration::from_secs(2))
        .unreachable(|| {
            Box::pin(async {
                let cfg = MongoConfig {
                    connect_timeout: Duration::from_secs(2),
                    ..MongoConfig::new(format!(
                        "mongodb://qkit:{SECRET}@127.0.0.1:9/?authSource=admin"
                    ))
                };
                let b = MongoBroker::connect(&cfg, QueueSettings::for_queue("unreachable")).await?;
                Ok(Arc::new(b) as Arc<dyn Broker>)
            })
        })
        .disconnect(hook(admin.clone(), app));
    let outcome = tokio::spawn(async move { kit.run().await }).await;
    cleanup(&admin, &database, created.is_ok().then_some(user.as_str())).await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}
