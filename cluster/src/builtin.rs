//! The tasks every `qcluster` binary ships: `noop`, `echo`, `sleep`, `fail`.

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

/// Longest `sleep` accepts, so that a typo cannot park a worker for a year.
const MAX_SLEEP: f64 = 24.0 * 3600.0;

pub(crate) fn register(r: &mut Registry) {
    r.register("noop", |_: serde::de::IgnoredAny, _: TaskContext| async {
        Ok::<_, String>(Value::Null)
    });
    r.register("echo", |v: Value, _: TaskContext| async move {
        Ok::<_, String>(v)
    });
    r.register("sleep", |a: SleepArgs, _: TaskContext| async move {
        let secs = match a {
            SleepArgs::Secs(s) | SleepArgs::Named { secs: s } => s,
        };
        if !(0.0..=MAX_SLEEP).contains(&secs) {
            return Err(format!("sleep takes 0 to {MAX_SLEEP} seconds, got {secs}"));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        Ok(secs)
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
            ["echo", "fail", "noop", "sleep"]
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
