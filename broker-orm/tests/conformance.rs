//! The shared conformance kit against real SQLite, PostgreSQL and MariaDB servers.
//!
//! On PostgreSQL and MariaDB the kit runs in a database made for the run (`qkit_<random>`,
//! dropped at the end): the servers are shared with other tests, and only so can the
//! `connection_loss` check make the server drop the kit's connections and no one else's.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/kit.sqlite3", dir.path().display());
    // A file in a directory that does not exist cannot be opened.
    let bad = format!("sqlite://{}/missing/dir/kit.sqlite3", dir.path().display());
    // No server to drop connections: `connection_loss` is skipped.
    kit(url, bad).run().await;
}

/// Runs `kit` in a database of its own on the server of `url`, with the disconnect hook; without
/// the right to create one, on `url` itself and without the hook (said loudly).
#[cfg(any(feature = "postgres", feature = "mysql"))]
async fn run_in_own_db(url: String, unreachable: String) {
    let db = match OwnDb::create(&url).await {
        Ok(db) => db,
        Err(e) => {
            eprintln!("no database of the kit's own ({e}): connection_loss will be skipped");
            return kit(url, unreachable).run().await;
        }
    };
    let k = kit(db.url.clone(), unreachable).disconnect(db.hook());
    let outcome = tokio::spawn(async move { k.run().await }).await;
    db.remove().await;
    if let Err(e) = outcome {
        std::panic::resume_unwind(e.into_panic());
    }
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_postgres() {
    let url = postgres_url();
    if !reachable(&url).await {
        return;
    }
    run_in_own_db(
        url,
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
    )
    .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_mariadb() {
    let url = mysql_url();
    if !reachable(&url).await {
        return;
    }
    run_in_own_db(url, format!("mysql://root:{SECRET}@127.0.0.1:1/test")).await;
}
