//! Your own `qcluster`: the built-in tasks plus yours, with the same CLI and configuration.
//!
//! ```text
//! cargo run -p custom_tasks -- enqueue add --args '[2, 3]' --wait 10
//! cargo run -p custom_tasks -- run
//! ```

use std::process::ExitCode;

use cluster::{Registry, Task, TaskContext};
use serde::{Deserialize, Serialize};

/// A typed task: `client.enqueue::<Add>(&(2, 3))` does not compile with the wrong argument type.
struct Add;

impl Task for Add {
    const NAME: &'static str = "add";
    type Args = (i64, i64);
    type Output = i64;
    type Error = String;

    async fn run((a, b): (i64, i64), _ctx: TaskContext) -> Result<i64, String> {
        a.checked_add(b)
            .ok_or_else(|| format!("{a} + {b} overflows"))
    }
}

#[derive(Deserialize)]
struct Text {
    text: String,
}

#[derive(Serialize)]
struct Counted {
    words: usize,
    lines: usize,
}

fn main() -> ExitCode {
    let mut tasks = Registry::with_builtins();
    tasks.task::<Add>();
    // A blocking function runs on the blocking pool, never on the async threads.
    tasks.register_blocking("word_count", |t: Text, _ctx: TaskContext| {
        Ok::<_, String>(Counted {
            words: t.text.split_whitespace().count(),
            lines: t.text.lines().count(),
        })
    });
    cluster::cli::main(tasks)
}
