//! The shared conformance kit against real SQLite, PostgreSQL and MariaDB servers.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_sqlite() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/kit.sqlite3", dir.path().display());
    // A file in a directory that does not exist cannot be opened.
    let bad = format!("sqlite://{}/missing/dir/kit.sqlite3", dir.path().display());
    kit(url, bad).run().await;
}

#[cfg(feature = "postgres")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_postgres() {
    let url = postgres_url();
    if !reachable(&url).await {
        return;
    }
    kit(
        url,
        format!("postgres://postgres:{SECRET}@127.0.0.1:1/test"),
    )
    .run()
    .await;
}

#[cfg(feature = "mysql")]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_mariadb() {
    let url = mysql_url();
    if !reachable(&url).await {
        return;
    }
    kit(url, format!("mysql://root:{SECRET}@127.0.0.1:1/test"))
        .run()
        .await;
}
