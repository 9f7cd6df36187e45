//! [`App`]: a `qcluster`-compatible program with your own tasks and brokers.

use std::future::Future;
use std::process::ExitCode;

use broker_core::{Broker, BrokerError, QueueSettings};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::broker::Brokers;
use crate::task::Registry;

/// The whole `qcluster` command line (run, enqueue, result, info, ping, config, …) over the tasks
/// and brokers you give it.
///
/// ```no_run
/// # use broker_core::{BrokerError, QueueSettings};
/// # use broker_memory::{MemoryBroker, MemoryConfig};
/// # async fn connect(c: MemoryConfig, s: QueueSettings) -> Result<MemoryBroker, BrokerError> {
/// #     MemoryBroker::connect(c, s).await
/// # }
/// fn main() -> std::process::ExitCode {
///     let mut tasks = cluster::Registry::with_builtins();
///     tasks.register("hello", |name: String, _ctx: cluster::TaskContext| async move {
///         Ok::<_, String>(format!("hello {name}"))
///     });
///     // `broker = "mine"` with a `[mine]` section now selects this broker.
///     cluster::App::new().tasks(tasks).broker("mine", connect).main()
/// }
/// ```
#[derive(Debug)]
pub struct App {
    tasks: Registry,
    brokers: Brokers,
}

impl Default for App {
    fn default() -> Self {
        Self::new()
    }
}

impl App {
    /// The built-in tasks (`noop`, `echo`, `sleep`, `fail`, `spin`, `crash`, `leak`) and the brokers compiled in.
    pub fn new() -> Self {
        Self {
            tasks: Registry::with_builtins(),
            brokers: Brokers::builtin(),
        }
    }

    /// Runs these tasks instead (start from [`Registry::with_builtins`] to keep the built-ins).
    pub fn tasks(mut self, tasks: Registry) -> Self {
        self.tasks = tasks;
        self
    }

    /// Adds (or replaces) broker `name`: `broker = "<name>"` selects it, and `connect` gets the
    /// section `[<name>]` read into `C` (see [`Brokers::register`]) and the queue settings.
    pub fn broker<C, F, Fut, B>(mut self, name: &str, connect: F) -> Self
    where
        C: DeserializeOwned + Serialize + Send + 'static,
        F: Fn(C, QueueSettings) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<B, BrokerError>> + Send + 'static,
        B: Broker + 'static,
    {
        self.brokers.register(name, connect);
        self
    }

    /// Uses exactly these brokers (instead of the built-in ones plus those added).
    pub fn brokers(mut self, brokers: Brokers) -> Self {
        self.brokers = brokers;
        self
    }

    /// Parses the command line, runs it, and returns the exit code (0 success, 1 failure,
    /// 2 usage or configuration error).
    pub fn main(self) -> ExitCode {
        crate::cli::run(self.tasks, self.brokers)
    }
}
