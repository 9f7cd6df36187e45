//! The vocabulary every role shares: a [`Job`] (a verified delivery on its way to a worker), a
//! [`Ran`] (what one run produced), an [`Outcome`] (a job and its run, on its way to the
//! monitor), what the store knew before the run ([`Prior`]), and the result row a run becomes.
//!
//! [`execute`] runs one package in this process; the async workers, the process workers' children
//! and `sync` clients all run tasks through it, so a task fails the same way wherever it runs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use broker_core::{AckId, TaskPackage, now_us};
use futures::FutureExt;

use crate::store::TaskRecord;
use crate::task::{Registry, TaskContext, panic_text};

/// A place in the in-memory queue; returned when dropped (the job started, or was given back).
#[derive(Debug)]
pub(crate) struct Slot(pub Arc<tokio::sync::Semaphore>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// A verified package on its way to a worker.
#[derive(Debug)]
pub(crate) struct Job {
    pub seq: u64,
    pub ack: AckId,
    pub deliveries: Option<u32>,
    pub package: TaskPackage,
    /// When the broker leased it: the lease runs out at `claimed + retry`.
    pub claimed: Instant,
    /// Released when a worker takes the job.
    pub slot: Option<Slot>,
}

/// What the result store knows about a delivered task before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Prior {
    /// Nothing final stored: this is attempt `n`.
    Attempt(u32),
    /// Already succeeded, or failed for good: settle without running.
    Settled,
    /// The store could not be asked: give the package back rather than risk a second run.
    Unknown,
}

/// What a worker hands to the monitor.
#[derive(Debug)]
pub(crate) struct Outcome {
    pub job: Job,
    /// `None`: a duplicate delivery of a task that already succeeded; acknowledge, do not run.
    pub ran: Option<Ran>,
    pub attempt: u32,
}

impl Outcome {
    pub fn ran(job: Job, ran: Ran, attempt: u32) -> Self {
        Self {
            job,
            ran: Some(ran),
            attempt,
        }
    }
    pub fn duplicate(job: Job) -> Self {
        Self {
            job,
            ran: None,
            attempt: 0,
        }
    }
}

/// What one run produced.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Ran {
    /// Result JSON, or the failure message.
    pub result: Result<String, String>,
    /// Retrying cannot help (unknown task, arguments that do not decode).
    pub permanent: bool,
    pub started_us: i64,
    pub stopped_us: i64,
}

/// Runs `package` once within `timeout`: unknown task and bad arguments fail permanently, an
/// overrun fails with "timed out", a panic (even while the task is being set up) fails with its
/// message.
pub(crate) async fn execute(
    registry: &Registry,
    package: &TaskPackage,
    attempt: u32,
    timeout: Duration,
) -> Ran {
    let started_us = now_us();
    let ctx = TaskContext {
        id: package.id,
        func: package.func.clone(),
        attempt,
        group: package.options.group.clone(),
    };
    let start = std::panic::catch_unwind(AssertUnwindSafe(|| {
        registry.start(&package.func, package.args.clone(), ctx)
    }));
    let (result, permanent) = match start {
        Err(panic) => (Err(format!("panicked: {}", panic_text(panic))), false),
        Ok(Err(e)) => (Err(e), true),
        Ok(Ok(fut)) => {
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

/// Longest text the store's indexed columns take (bytes).
const MAX_COLUMN: usize = 191;

/// Fits `s` into an indexed column: no NUL (PostgreSQL refuses it), at most 191 bytes.
fn column(s: &str) -> String {
    let mut s = s.replace('\0', "\u{fffd}");
    if s.len() > MAX_COLUMN {
        let mut end = MAX_COLUMN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// The result row for a run.
pub(crate) fn record(p: &TaskPackage, ran: &Ran, attempts: u32, cluster: &str) -> TaskRecord {
    let args = if p.args.is_empty() {
        "null".to_owned()
    } else {
        String::from_utf8_lossy(&p.args).replace('\0', "\u{fffd}")
    };
    let (success, result) = match &ran.result {
        Ok(json) => (true, json.replace('\0', "\u{fffd}")),
        Err(msg) => (false, serde_json::Value::String(msg.clone()).to_string()),
    };
    TaskRecord {
        id: p.id,
        name: column(p.options.name.as_deref().unwrap_or(&p.func)),
        func: column(&p.func),
        args,
        result: Some(result),
        enqueued_us: p.enqueued_at_us,
        started_us: ran.started_us,
        stopped_us: ran.stopped_us,
        success,
        done: success || ran.permanent,
        attempts,
        group: match &p.flow {
            // An iterator's items are grouped under it until it is complete: the store spares
            // them from pruning until then (see `Store::prune`).
            Some(broker_core::Flow::Item(i)) => Some(i.iter.to_string()),
            _ => p.options.group.as_deref().map(column),
        },
        cluster: column(cluster),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn starts_by_panicking(_: (), _: TaskContext) -> std::future::Ready<Result<(), String>> {
        panic!("panicked while setting up")
    }

    #[tokio::test]
    async fn panics_timeouts_and_unknown_tasks_become_failed_results() {
        let mut r = Registry::with_builtins();
        r.register("setup_panic", starts_by_panicking);
        r.register("run_panic", |_: (), _: TaskContext| async {
            if true {
                panic!("panicked while running");
            }
            Ok::<(), String>(())
        });
        let run = |func: &str, args: &str, timeout_ms: u64| {
            let p = TaskPackage::new(func, args.as_bytes().to_vec());
            let r = r.clone();
            async move { execute(&r, &p, 1, Duration::from_millis(timeout_ms)).await }
        };
        let ran = run("setup_panic", "null", 1000).await;
        assert_eq!(
            ran.result,
            Err("panicked: panicked while setting up".into())
        );
        assert!(!ran.permanent);
        let ran = run("run_panic", "null", 1000).await;
        assert_eq!(ran.result, Err("panicked: panicked while running".into()));
        let ran = run("sleep", "5", 50).await;
        assert_eq!(ran.result, Err("timed out after 0.05s".into()));
        assert!(ran.stopped_us - ran.started_us < 2_000_000);
        let ran = run("nope", "null", 1000).await;
        assert!(ran.permanent && ran.result.is_err());
        let ran = run("echo", "[1]", 1000).await;
        assert_eq!(ran.result, Ok("[1]".into()));
    }

    #[test]
    fn records_fit_the_columns() {
        let mut p = TaskPackage::new("f\0unc", b"[1]".to_vec());
        p.options.group = Some("é".repeat(150));
        let ran = Ran {
            result: Ok("1".into()),
            permanent: false,
            started_us: 1,
            stopped_us: 2,
        };
        let r = record(&p, &ran, 1, "c");
        assert_eq!(r.func, "f\u{fffd}unc");
        let g = r.group.expect("group");
        assert!(g.len() <= MAX_COLUMN && g.chars().all(|c| c == 'é'));
        assert!(r.done && r.success);
    }
}
