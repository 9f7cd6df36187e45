//! The one error type every broker returns.

use std::time::Duration;

/// What went wrong in a broker operation.
///
/// Messages never carry secrets: endpoints are masked with [`crate::mask_url`] and adapters pass
/// server messages through [`crate::redact`] before building one of these.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    /// The server could not be reached or the connection broke.
    #[error("cannot reach {broker} at {endpoint}: {message}")]
    Unreachable {
        /// Adapter name, e.g. `orm/postgres`.
        broker: &'static str,
        /// The endpoint with its password masked.
        endpoint: String,
        /// The underlying message.
        message: String,
    },
    /// An operation did not finish in its time budget.
    #[error("{operation} on {broker} at {endpoint} timed out after {after:?}")]
    Timeout {
        /// Adapter name.
        broker: &'static str,
        /// What was attempted (`connect`, `ping`, ...).
        operation: &'static str,
        /// The endpoint with its password masked.
        endpoint: String,
        /// How long we waited.
        after: Duration,
    },
    /// A package is bigger than the broker accepts. Nothing was sent; nothing was truncated.
    #[error("package of {size} bytes is over the {broker} limit of {limit} bytes")]
    TooLarge {
        /// Adapter name.
        broker: &'static str,
        /// Size of the rejected package in bytes.
        size: usize,
        /// The broker's limit in bytes.
        limit: usize,
    },
    /// A configuration value is invalid; `key` names it.
    #[error("invalid broker setting `{key}`: {message}")]
    Config {
        /// The configuration key, e.g. `orm.url` or `bulk`.
        key: String,
        /// What is wrong with it.
        message: String,
    },
    /// A receipt (`AckId`) that this broker did not issue or cannot parse.
    #[error("malformed receipt {receipt:?} for {broker}")]
    InvalidReceipt {
        /// Adapter name.
        broker: &'static str,
        /// The receipt as given.
        receipt: String,
    },
    /// The broker cannot do this operation at all (see [`crate::Capabilities`]).
    #[error("{broker} does not support {operation}")]
    Unsupported {
        /// Adapter name.
        broker: &'static str,
        /// The operation asked for.
        operation: &'static str,
    },
    /// Any other error reported by the server or its client library, message kept.
    #[error("{broker}: {message}")]
    Backend {
        /// Adapter name.
        broker: &'static str,
        /// The server's or client's message, secrets removed.
        message: String,
    },
}

impl BrokerError {
    /// True for errors that may go away by themselves (connection trouble, timeouts): callers
    /// retry these with backoff instead of giving up.
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Unreachable { .. } | Self::Timeout { .. })
    }

    /// Shorthand for a [`BrokerError::Config`].
    pub fn config(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            key: key.into(),
            message: message.into(),
        }
    }
}
