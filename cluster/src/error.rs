//! The cluster's error type.

use broker_core::{BrokerError, CodecError};

/// A configuration value that stops start-up, naming its key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    /// The dotted key (`workers`, `orm.url`) or flag at fault.
    pub key: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: &str, message: impl Into<String>) -> Self {
        Self {
            key: key.to_owned(),
            message: message.into(),
        }
    }
}

/// What a result-store failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreFault {
    /// May pass on its own: the connection failed, or a lock or deadlock got in the way.
    Transient,
    /// The data of a row is refused (too long, a constraint): saving it again cannot help.
    Row,
    /// The store itself is wrong (full, read-only, missing table, no grant): needs an operator.
    Store,
}

/// Everything the cluster library can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad configuration (exit code 2 in `qcluster`).
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// A package could not be encoded or decoded.
    #[error("package: {0}")]
    Codec(#[from] CodecError),
    /// The result store failed.
    #[error("result store ({endpoint}): {message}")]
    Store {
        /// The store URL, password masked.
        endpoint: String,
        /// What failed, secrets removed.
        message: String,
        /// What kind of failure: worth retrying, this row's fault, or the store's.
        fault: StoreFault,
    },
    /// No task of this name is registered.
    #[error("unknown task `{0}`")]
    UnknownTask(String),
    /// Task arguments are not what the task takes.
    #[error("arguments for task `{func}`: {message}")]
    Args {
        /// The task.
        func: String,
        /// What is wrong, with the JSON position.
        message: String,
    },
    /// A schedule that cannot be added or changed as asked (bad timing, name taken, unknown).
    #[error("schedule `{name}`: {message}")]
    Schedule {
        /// The schedule's name.
        name: String,
        /// What is wrong.
        message: String,
    },
    /// Waiting for a result ran out of time.
    #[error("no result for task {0} yet")]
    NotReady(String),
    /// An I/O failure (signals, files).
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// True for failures that may pass on their own (connection lost, lock contention).
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { fault, .. } => *fault == StoreFault::Transient,
            Error::Broker(b) => b.is_transient(),
            _ => false,
        }
    }

    /// True when a result row's own data was refused.
    pub fn is_row_fault(&self) -> bool {
        matches!(
            self,
            Error::Store {
                fault: StoreFault::Row,
                ..
            }
        )
    }

    /// True when the error is the user's input or configuration (exit code 2).
    pub fn is_usage(&self) -> bool {
        matches!(
            self,
            Error::Config(_) | Error::UnknownTask(_) | Error::Args { .. } | Error::Schedule { .. }
        ) || matches!(self, Error::Broker(BrokerError::Config { .. }))
    }
}
