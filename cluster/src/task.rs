//! Tasks: named Rust functions with serde arguments, kept in a [`Registry`].
//!
//! Arguments travel as JSON bytes, so the CLI and programs in other languages enqueue the same
//! tasks. A typed task implements [`Task`]; a plain one is registered with
//! [`Registry::register`] (async) or [`Registry::register_blocking`] (runs off the async threads).

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use broker_core::TaskId;
use futures::future::BoxFuture;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::Error;

/// What a running task knows about itself.
#[derive(Debug, Clone)]
pub struct TaskContext {
    /// The task's id (also its result's id).
    pub id: TaskId,
    /// The registered name that was called.
    pub func: String,
    /// 1 on the first attempt.
    pub attempt: u32,
    /// The group the result belongs to.
    pub group: Option<String>,
}

/// A typed task: enqueueing the wrong argument type does not compile.
///
/// ```
/// use cluster::{Task, TaskContext};
/// struct Add;
/// impl Task for Add {
///     const NAME: &'static str = "add";
///     type Args = (i64, i64);
///     type Output = i64;
///     type Error = std::convert::Infallible;
///     async fn run((a, b): (i64, i64), _ctx: TaskContext) -> Result<i64, Self::Error> {
///         Ok(a + b)
///     }
/// }
/// ```
pub trait Task: Send + Sync + 'static {
    /// The name the task is enqueued under.
    const NAME: &'static str;
    /// Arguments, sent as JSON.
    type Args: Serialize + DeserializeOwned + Send + 'static;
    /// The result, saved as JSON.
    type Output: Serialize + Send + 'static;
    /// The failure, saved as its `Display` text.
    type Error: fmt::Display + Send + 'static;
    /// Runs the task.
    fn run(
        args: Self::Args,
        ctx: TaskContext,
    ) -> impl Future<Output = Result<Self::Output, Self::Error>> + Send;
}

/// A finished run: the result as JSON text, or the failure message.
pub type RunResult = Result<String, String>;

/// Decodes the arguments (an error here is permanent: retrying cannot help) and starts the run.
type Handler = Arc<
    dyn Fn(Vec<u8>, TaskContext) -> Result<BoxFuture<'static, RunResult>, String> + Send + Sync,
>;
type Checker = Arc<dyn Fn(&[u8]) -> Result<(), String> + Send + Sync>;

#[derive(Clone)]
struct Entry {
    run: Handler,
    check: Checker,
}

/// Named tasks the cluster can run.
#[derive(Clone, Default)]
pub struct Registry {
    tasks: BTreeMap<String, Entry>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.tasks.keys()).finish()
    }
}

fn decode_args<A: DeserializeOwned>(raw: &[u8]) -> Result<A, String> {
    let raw = if raw.is_empty() {
        b"null" as &[u8]
    } else {
        raw
    };
    serde_json::from_slice(raw).map_err(|e| format!("bad arguments: {e}"))
}

fn encode_output<O: Serialize>(out: O) -> RunResult {
    serde_json::to_string(&out).map_err(|e| format!("result is not serialisable as JSON: {e}"))
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding the built-in tasks `noop`, `echo`, `sleep`, `fail`, `spin`, `crash`
    /// and `leak`.
    pub fn with_builtins() -> Self {
        let mut r = Self::new();
        crate::builtin::register(&mut r);
        r
    }

    /// Registers a typed task.
    pub fn task<T: Task>(&mut self) -> &mut Self {
        self.register(T::NAME, T::run)
    }

    /// Registers an async function under `name`; its first argument is decoded from the JSON
    /// arguments.
    pub fn register<A, O, E, F, Fut>(&mut self, name: &str, f: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(A, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, E>> + Send + 'static,
    {
        let f = Arc::new(f);
        let run: Handler = Arc::new(move |raw, ctx| {
            let args: A = decode_args(&raw)?;
            let fut = f(args, ctx);
            Ok(Box::pin(async move {
                match fut.await {
                    Ok(out) => encode_output(out),
                    Err(e) => Err(e.to_string()),
                }
            }))
        });
        self.insert::<A>(name, run)
    }

    /// Registers a blocking function under `name`: it runs on tokio's blocking pool, never on the
    /// async threads.
    pub fn register_blocking<A, O, E, F>(&mut self, name: &str, f: F) -> &mut Self
    where
        A: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        E: fmt::Display + Send + 'static,
        F: Fn(A, TaskContext) -> Result<O, E> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let run: Handler = Arc::new(move |raw, ctx| {
            let f = f.clone();
            let args: A = decode_args(&raw)?;
            Ok(Box::pin(async move {
                let joined = tokio::task::spawn_blocking(move || f(args, ctx)).await;
                match joined {
                    Ok(Ok(out)) => encode_output(out),
                    Ok(Err(e)) => Err(e.to_string()),
                    Err(e) if e.is_panic() => {
                        Err(format!("panicked: {}", panic_text(e.into_panic())))
                    }
                    Err(e) => Err(format!("cancelled: {e}")),
                }
            }))
        });
        self.insert::<A>(name, run)
    }

    fn insert<A: DeserializeOwned>(&mut self, name: &str, run: Handler) -> &mut Self {
        let check: Checker = Arc::new(|raw| decode_args::<A>(raw).map(drop));
        self.tasks.insert(name.to_owned(), Entry { run, check });
        self
    }

    /// True when `name` is registered.
    pub fn contains(&self, name: &str) -> bool {
        self.tasks.contains_key(name)
    }

    /// Registered names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tasks.keys().map(String::as_str)
    }

    /// Checks that `name` exists and that `args` (JSON) decode into its argument type.
    pub fn check(&self, name: &str, args: &[u8]) -> Result<(), Error> {
        let entry = self
            .tasks
            .get(name)
            .ok_or_else(|| Error::UnknownTask(name.to_owned()))?;
        (entry.check)(args).map_err(|message| Error::Args {
            func: name.to_owned(),
            message,
        })
    }

    /// Starts a run of `name`. Errors (unknown task, arguments that do not decode) are
    /// permanent: another attempt would fail the same way.
    pub(crate) fn start(
        &self,
        name: &str,
        args: Vec<u8>,
        ctx: TaskContext,
    ) -> Result<BoxFuture<'static, RunResult>, String> {
        match self.tasks.get(name) {
            Some(e) => (e.run)(args, ctx),
            None => Err(format!("unknown task `{name}`")),
        }
    }
}

/// The text of a panic payload.
pub(crate) fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "non-text panic payload".to_owned()
    }
}

/// How long a run may take: the task's own timeout, else the cluster's.
pub(crate) fn effective_timeout(own: Option<Duration>, cluster: Duration) -> Duration {
    own.unwrap_or(cluster)
}
