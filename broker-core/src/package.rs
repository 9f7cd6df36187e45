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

impl TaskId {
    /// A deterministic id derived from `parent`, a `label` and an `index`: the same inputs give
    /// the same id everywhere. It is a UUID of version 8 (its bytes come from SHA-256), so it
    /// can never equal a time-ordered v7 id from [`TaskId::new`].
    pub fn derived(parent: TaskId, label: &str, index: u64) -> Self {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"qcluster derived task id\0");
        h.update(parent.0.as_bytes());
        h.update(label.as_bytes());
        h.update([0]);
        h.update(index.to_le_bytes());
        let digest = h.finalize();
        let mut bytes = [0u8; 16];
        bytes.copy_from_slice(&digest[..16]);
        Self(uuid::Builder::from_custom_bytes(bytes).into_uuid())
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
    /// The flow this package is part of (a hook, a chain link, an iterator item), if any.
    /// The codec writes it as a section after the package, flagged
    /// [`crate::codec::FLAG_FLOW`]; a package without one encodes exactly as before.
    #[serde(default)]
    pub flow: Option<Flow>,
}

/// What makes a package part of a larger unit of work. The monitor acts on it once the
/// package's task is done: it enqueues the next link of a chain, or completes an iterator.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Flow {
    /// This package runs the hook of the task `parent`, with its finished record as argument.
    Hook {
        /// The task whose hook this is.
        parent: TaskId,
    },
    /// A link of a chain.
    Chain(ChainFlow),
    /// An item of an iterator.
    Item(ItemFlow),
}

/// A chain link's view of its chain: every link (ids assigned when the chain was made), which
/// one this is, and the results of the links before it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainFlow {
    /// The chain's id: its result row is saved under it.
    pub chain: TaskId,
    /// This link's place in `links`.
    pub index: u32,
    /// Every link of the chain, in order.
    pub links: Vec<ChainLink>,
    /// The result JSON of each link before this one, in order.
    pub results: Vec<String>,
}

/// One link of a chain, with its id assigned in advance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// The link's task id.
    pub id: TaskId,
    /// Registered name of the function to run.
    pub func: String,
    /// Arguments, JSON-encoded.
    #[serde(with = "serde_bytes")]
    pub args: Vec<u8>,
    /// The link's options.
    pub options: TaskOptions,
}

/// An iterator item: its place among the iterator's items.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ItemFlow {
    /// The iterator's id: its result row is saved under it.
    pub iter: TaskId,
    /// This item's place, from 0.
    pub index: u32,
    /// How many items the iterator has.
    pub total: u32,
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
            flow: None,
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
