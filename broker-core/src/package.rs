//! The task package: what a producer enqueues and a worker runs.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A task's id: a UUID v7, so ids sort by creation time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct TaskId(pub Uuid);

impl TaskId {
    /// A new time-ordered id.
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for TaskId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.hyphenated(), f)
    }
}

impl FromStr for TaskId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(Self)
    }
}

/// Per-task options (Django Q's `q_options`). `None` takes the cluster's setting.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskOptions {
    /// Longest a run may take before it is failed.
    pub timeout: Option<Duration>,
    /// Most attempts before the failure is final.
    pub max_attempts: Option<u32>,
    /// Acknowledge the package even when the task fails.
    pub ack_failure: Option<bool>,
    /// Name of a task to run with the result.
    pub hook: Option<String>,
    /// Group the result belongs to.
    pub group: Option<String>,
    /// Higher runs first where the broker supports it.
    pub priority: i16,
    /// A human-readable name for the result (Django Q's `task_name`).
    pub name: Option<String>,
}

/// W3C trace context carried from the producer to the worker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceContext {
    /// The `traceparent` header value.
    pub traceparent: String,
    /// The `tracestate` header value, if any.
    pub tracestate: Option<String>,
}

/// A task on the wire. Arguments are data (JSON bytes the task decodes), never code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskPackage {
    /// Unique id, also the result's id.
    pub id: TaskId,
    /// Registered name of the function to run.
    pub func: String,
    /// Positional arguments, JSON-encoded (what the task's argument type deserialises).
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
    /// Keyword arguments, JSON-encoded object; empty when there are none.
    #[serde(with = "serde_bytes")]
    pub kwargs: Vec<u8>,
    /// Per-task options.
    pub options: TaskOptions,
    /// Attempts already made by whoever re-enqueued it (0 when first enqueued).
    pub attempt: u32,
    /// When it was enqueued, microseconds since the Unix epoch.
    pub enqueued_at_us: i64,
    /// Trace context, if the producer had one.
    pub trace: Option<TraceContext>,
}

impl TaskPackage {
    /// A package for `func` with JSON `args`, a fresh id, enqueue time now and default options.
    pub fn new(func: impl Into<String>, args: Vec<u8>) -> Self {
        Self {
            id: TaskId::new(),
            func: func.into(),
            args,
            kwargs: Vec::new(),
            options: TaskOptions::default(),
            attempt: 0,
            enqueued_at_us: now_us(),
            trace: None,
        }
    }
}

/// Microseconds since the Unix epoch, now.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
