//! The tasks every `qcluster` binary ships: `noop`, `echo`, `sleep`, `fail`, and three that
//! exercise process workers: `spin` (burns CPU, never yields), `crash` (aborts its process) and
//! `leak` (keeps memory for good). `crash` and `leak` run only in a worker process: anywhere
//! else they would take the whole cluster down or grow it for good.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::task::{Registry, TaskContext};

/// `sleep`'s arguments: a number of seconds, or `{"secs": n}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum SleepArgs {
    Secs(f64),
    Named { secs: f64 },
}

/// Longest `sleep` and `spin` accept, so that a typo cannot park a worker for a year.
const MAX_SLEEP: f64 = 24.0 * 3600.0;
/// Most `leak` takes at once.
const MAX_LEAK_MIB: u64 = 64 * 1024;

/// `leak`'s arguments: MiB, or `{"mib": n}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum LeakArgs {
    Mib(u64),
    Named { mib: u64 },
}

fn secs_in_range(a: SleepArgs) -> Result<f64, String> {
    let secs = match a {
        SleepArgs::Secs(s) | SleepArgs::Named { secs: s } => s,
    };
    if !(0.0..=MAX_SLEEP).contains(&secs) {
        return Err(format!("takes 0 to {MAX_SLEEP} seconds, got {secs}"));
    }
    Ok(secs)
}

fn only_in_worker_process(func: &str) -> Result<(), String> {
    if crate::process::in_worker() {
        Ok(())
    } else {
        Err(format!(
            "`{func}` runs only in a worker process (worker_mode = \"process\"): here it would \
             hit the whole cluster"
        ))
    }
}

pub(crate) fn register(r: &mut Registry) {
    r.register("noop", |_: serde::de::IgnoredAny, _: TaskContext| async {
        Ok::<_, String>(Value::Null)
    });
    r.register("echo", |v: Value, _: TaskContext| async move {
        Ok::<_, String>(v)
    });
    r.register("sleep", |a: SleepArgs, _: TaskContext| async move {
        let secs = secs_in_range(a).map_err(|e| format!("sleep {e}"))?;
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        Ok::<_, String>(secs)
    });
    // A blocking task: in async mode it holds a thread of the blocking pool until it returns,
    // timeout or not; in process mode its process is killed at the timeout.
    r.register_blocking("spin", |a: SleepArgs, _: TaskContext| {
        let secs = secs_in_range(a).map_err(|e| format!("spin {e}"))?;
        let until = std::time::Instant::now() + Duration::from_secs_f64(secs);
        let mut x: u64 = 0;
        while std::time::Instant::now() < until {
            for i in 0..10_000u64 {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(i));
            }
        }
        std::hint::black_box(x);
        Ok::<_, String>(secs)
    });
    r.register_blocking(
        "crash",
        |_: serde::de::IgnoredAny, _: TaskContext| -> Result<Value, String> {
            only_in_worker_process("crash")?;
            tracing::warn!("crash: aborting worker process {}", std::process::id());
            std::process::abort()
        },
    );
    r.register_blocking("leak", |a: LeakArgs, _: TaskContext| {
        only_in_worker_process("leak")?;
        let mib = match a {
            LeakArgs::Mib(m) | LeakArgs::Named { mib: m } => m,
        };
        if mib > MAX_LEAK_MIB {
            return Err(format!("leak takes at most {MAX_LEAK_MIB} MiB, got {mib}"));
        }
        let size = usize::try_from(mib << 20).map_err(|_| "too large".to_owned())?;
        // Touched page by page, so that it is resident, then kept for good.
        let mut block = vec![0u8; size];
        for i in (0..size).step_by(4096) {
            block[i] = 1;
        }
        std::hint::black_box(&block);
        block.leak();
        Ok::<_, String>(mib)
    });
    r.register("fail", |msg: Option<String>, ctx: TaskContext| async move {
        Err::<Value, _>(msg.unwrap_or_else(|| format!("task {} failed on purpose", ctx.id)))
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> TaskContext {
        TaskContext {
            id: broker_core::TaskId::new(),
            func: "t".into(),
            attempt: 1,
            group: None,
        }
    }

    #[tokio::test]
    async fn builtins_run_and_check_arguments() {
        let r = Registry::with_builtins();
        assert_eq!(
            r.names().collect::<Vec<_>>(),
            ["crash", "echo", "fail", "leak", "noop", "sleep", "spin"]
        );
        let echo = r
            .start("echo", br#"{"a":[1,2]}"#.to_vec(), ctx())
            .expect("echo");
        assert_eq!(echo.await.as_deref(), Ok(r#"{"a":[1,2]}"#));
        let sleep = r.start("sleep", b"0.01".to_vec(), ctx()).expect("sleep");
        assert_eq!(sleep.await.as_deref(), Ok("0.01"));
        let fail = r.start("fail", br#""boom""#.to_vec(), ctx()).expect("fail");
        assert_eq!(fail.await, Err("boom".to_owned()));
        assert!(r.check("sleep", b"\"x\"").is_err());
        assert!(
            r.check("sleep", b"-1").is_ok(),
            "range is checked at run time"
        );
        assert!(matches!(
            r.check("nope", b"1"),
            Err(crate::Error::UnknownTask(n)) if n == "nope"
        ));
        let bad = r
            .start("sleep", b"{".to_vec(), ctx())
            .err()
            .expect("bad json");
        assert!(bad.contains("line 1"), "{bad}");
        let unknown = r
            .start("nope", b"1".to_vec(), ctx())
            .err()
            .expect("unknown");
        assert!(unknown.contains("unknown task `nope`"), "{unknown}");
    }
}
