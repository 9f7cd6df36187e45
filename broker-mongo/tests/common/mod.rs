//! Helpers shared by the tests: the server's URL, loud skips, a database (and user) of the
//! test's own on the shared server, dropped at the end.
#![allow(dead_code)]

use std::time::Duration;

use broker_core::{Broker, BrokerError, QueueSettings};
use broker_mongo::{MongoBroker, MongoConfig};
use mongodb::Client;
use mongodb::bson::{Document, doc, oid::ObjectId};

/// The server the tests use (`QCLUSTER_TEST_MONGO_URL`, else SecantusDB's port on this machine).
pub fn url() -> String {
    std::env::var("QCLUSTER_TEST_MONGO_URL").unwrap_or_else(|_| "mongodb://127.0.0.1:27018".into())
}

/// A short random tag for names (an ObjectId's counter and random part).
pub fn tag() -> String {
    ObjectId::new().to_hex()[12..].to_owned()
}

/// Says why a test does not run, or panics when `QCLUSTER_REQUIRE_SERVICES=1`.
pub fn skip(why: impl std::fmt::Display) {
    if std::env::var("QCLUSTER_REQUIRE_SERVICES").as_deref() == Ok("1") {
        panic!("server required but unreachable: {why}");
    }
    eprintln!("skipped: {why}");
}

/// A client of the test's own (not one of the brokers under test), or `None` after a skip.
pub async fn admin() -> Option<Client> {
    let probe = MongoConfig {
        connect_timeout: Duration::from_secs(3),
        ..MongoConfig::new(url())
    };
    // Reachability through the adapter itself, so the skip message is the adapter's error.
    if let Err(e) = MongoBroker::connect(&probe, QueueSettings::for_queue("probe")).await {
        skip(e);
        return None;
    }
    let mut opts = mongodb::options::ClientOptions::parse(url()).await.ok()?;
    opts.server_selection_timeout = Some(Duration::from_secs(3));
    Client::with_options(opts).ok()
}

/// `url()` with a user, password, auth database and application name put in.
pub fn with_credentials(base: &str, user: &str, password: &str, db: &str, app: &str) -> String {
    let rest = base.strip_prefix("mongodb://").unwrap_or(base);
    let (hosts, query) = match rest.find(['/', '?']) {
        Some(k) => (
            &rest[..k],
            rest[k..].trim_start_matches('/').trim_start_matches('?'),
        ),
        None => (rest, ""),
    };
    let mut url = format!("mongodb://{user}:{password}@{hosts}/?authSource={db}&appName={app}");
    if !query.is_empty() {
        url.push('&');
        url.push_str(query);
    }
    url
}

/// `url()` with an application name put in (no credentials).
pub fn with_app(base: &str, app: &str) -> String {
    let sep = if base.contains('?') {
        "&"
    } else if base.trim_start_matches("mongodb://").contains('/') {
        "?"
    } else {
        "/?"
    };
    format!("{base}{sep}appName={app}")
}

/// A broker of `queue` in `database`, the queue emptied first.
pub async fn open(
    url: &str,
    database: &str,
    settings: QueueSettings,
) -> Result<MongoBroker, BrokerError> {
    let cfg = MongoConfig {
        database: database.to_owned(),
        connect_timeout: Duration::from_secs(5),
        ..MongoConfig::new(url)
    };
    let b = MongoBroker::connect(&cfg, settings).await?;
    b.delete_queue().await?;
    Ok(b)
}

/// Drops `database` (and the user, if any); errors are printed, not raised.
pub async fn cleanup(admin: &Client, database: &str, user: Option<&str>) {
    let db = admin.database(database);
    if let Some(u) = user
        && let Err(e) = db.run_command(doc! { "dropUser": u }).await
    {
        eprintln!("could not drop user {u}: {e}");
    }
    if let Err(e) = db.drop().await {
        eprintln!("could not drop database {database}: {e}");
    }
}

/// The connection ids the server lists for clients that said `appName = app`.
pub async fn connections_of(admin: &Client, app: &str) -> Result<Vec<i64>, String> {
    let ops = admin
        .database("admin")
        .run_command(doc! { "currentOp": 1, "$all": true })
        .await
        .map_err(|e| format!("currentOp: {e}"))?;
    let list = ops
        .get_array("inprog")
        .map_err(|e| format!("currentOp: {e}"))?;
    Ok(list
        .iter()
        .filter_map(|o| o.as_document())
        .filter(|o| {
            o.get_document("clientMetadata")
                .and_then(|m| m.get_document("application"))
                .and_then(|a| a.get_str("name"))
                .is_ok_and(|n| n == app)
        })
        .filter_map(|o: &Document| {
            o.get_i64("connectionId")
                .ok()
                .or_else(|| o.get_i32("connectionId").ok().map(i64::from))
        })
        .collect())
}
