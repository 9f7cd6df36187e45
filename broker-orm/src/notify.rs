//! PostgreSQL LISTEN/NOTIFY: wakes this process's waiting consumers when a package arrives, and
//! lowers the handle's claim floor to the new package's key (see `floor`).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPool};
use tokio::sync::Notify;

use crate::db::Ctx;
use crate::floor::{self, Floor};

/// Listens until the broker is dropped (the task is aborted then). Reconnects after errors, with
/// a growing pause, and after a reconnect wakes every waiter and resets the floor, since
/// notifications may have been missed meanwhile. Logged errors are scrubbed of passwords.
pub(crate) async fn listen(
    pool: PgPool,
    channel: &'static str,
    queue: String,
    wake: Arc<Notify>,
    floor: Arc<Floor>,
    listening: Arc<AtomicBool>,
    ctx: Ctx,
) {
    let mut pause = Duration::from_millis(250);
    loop {
        let mut listener = match PgListener::connect_with(&pool).await {
            Ok(l) => l,
            Err(e) => {
                tracing::debug!(error = %ctx.scrub(&e.to_string()), "LISTEN connection failed; polling meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(10));
                continue;
            }
        };
        if let Err(e) = listener.listen(channel).await {
            tracing::debug!(error = %ctx.scrub(&e.to_string()), "LISTEN failed; polling meanwhile");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(10));
            continue;
        }
        listening.store(true, Ordering::Relaxed);
        floor.reset();
        wake.notify_waiters();
        loop {
            match listener.try_recv().await {
                Ok(Some(n)) => {
                    pause = Duration::from_millis(250);
                    match floor::parse_notice(n.payload()) {
                        Some((key, q)) if q == queue => {
                            floor.lower(key);
                            wake.notify_waiters();
                        }
                        Some(_) => {}
                        // Not ours to read (an older binary's plain queue name): look from
                        // the bottom.
                        None if n.payload() == queue => {
                            floor.reset();
                            wake.notify_waiters();
                        }
                        None => {}
                    }
                }
                // The connection was lost and sqlx has already reconnected and listens again:
                // whatever was sent meanwhile is lost, so every waiter looks once more, from
                // the bottom.
                Ok(None) => {
                    floor.reset();
                    wake.notify_waiters();
                }
                Err(e) => {
                    tracing::debug!(error = %ctx.scrub(&e.to_string()), "LISTEN connection broke; reconnecting");
                    listening.store(false, Ordering::Relaxed);
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(10));
                    break;
                }
            }
        }
    }
}
