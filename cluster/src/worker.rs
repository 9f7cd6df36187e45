//! Workers: take jobs from the pusher, run them under the timeout with panics caught, and hand
//! the outcome to the monitor.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use broker_core::{TaskPackage, now_us};
use futures::FutureExt;

use crate::sentinel::{Job, Outcome, Shared};
use crate::store::TaskRecord;
use crate::task::{Registry, TaskContext, effective_timeout, panic_text};

/// What one run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Ran {
    /// Result JSON, or the failure message.
    pub result: Result<String, String>,
    /// Retrying cannot help (unknown task, arguments that do not decode).
    pub permanent: bool,
    pub started_us: i64,
    pub stopped_us: i64,
}

/// Runs `package` once: unknown task and bad arguments fail permanently, an overrun fails with
/// "timed out", a panic fails with its message.
pub(crate) async fn execute(
    registry: &Registry,
    package: &TaskPackage,
    attempt: u32,
    cluster_timeout: Duration,
) -> Ran {
    let started_us = now_us();
    let ctx = TaskContext {
        id: package.id,
        func: package.func.clone(),
        attempt,
        group: package.options.group.clone(),
    };
    let timeout = effective_timeout(package.options.timeout, cluster_timeout);
    let (result, permanent) = match registry.start(&package.func, package.args.clone(), ctx) {
        Err(e) => (Err(e), true),
        Ok(fut) => {
            match tokio::time::timeout(timeout, AssertUnwindSafe(fut).catch_unwind()).await {
                Err(_) => (
                    Err(format!("timed out after {}s", timeout.as_secs_f64())),
                    false,
                ),
                Ok(Err(panic)) => (Err(format!("panicked: {}", panic_text(panic))), false),
                Ok(Ok(r)) => (r, false),
            }
        }
    };
    Ran {
        result,
        permanent,
        started_us,
        stopped_us: now_us(),
    }
}

/// The result row for a run.
pub(crate) fn record(p: &TaskPackage, ran: &Ran, attempts: u32, cluster: &str) -> TaskRecord {
    let args = if p.args.is_empty() {
        "null".to_owned()
    } else {
        String::from_utf8_lossy(&p.args).into_owned()
    };
    let (success, result) = match &ran.result {
        Ok(json) => (true, json.clone()),
        Err(msg) => (false, serde_json::Value::String(msg.clone()).to_string()),
    };
    TaskRecord {
        id: p.id,
        name: p.options.name.clone().unwrap_or_else(|| p.func.clone()),
        func: p.func.clone(),
        args,
        result: Some(result),
        enqueued_us: p.enqueued_at_us,
        started_us: ran.started_us,
        stopped_us: ran.stopped_us,
        success,
        done: success || ran.permanent,
        attempts,
        group: p.options.group.clone(),
        cluster: cluster.to_owned(),
    }
}

/// One worker: runs jobs until the job channel closes. After stop, jobs not yet started are
/// given back to the broker at once.
pub(crate) async fn run(
    shared: Arc<Shared>,
    jobs: async_channel::Receiver<Job>,
    outcomes: tokio::sync::mpsc::Sender<Outcome>,
) {
    while let Ok(job) = jobs.recv().await {
        if shared.stop.is_cancelled() {
            shared.give_back(job.seq, &job.ack).await;
            continue;
        }
        let attempt = job.attempt();
        if attempt > 1 && shared.already_succeeded(&job).await {
            let _ = outcomes.send(Outcome::duplicate(job)).await;
            continue;
        }
        shared.running.fetch_add(1, Ordering::Relaxed);
        let ran = execute(
            &shared.registry,
            &job.package,
            attempt,
            shared.config.timeout,
        )
        .await;
        shared.running.fetch_sub(1, Ordering::Relaxed);
        if outcomes
            .send(Outcome::ran(job, ran, attempt))
            .await
            .is_err()
        {
            // The monitor is gone (shutdown past its deadline): the ledger gives the job back.
            break;
        }
    }
}
