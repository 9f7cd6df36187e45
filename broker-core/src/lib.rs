//! Core of the task queue: the [`Broker`] trait every adapter implements, the signed
//! [`TaskPackage`] codec every broker carries, shared settings and errors, and (feature
//! `testkit`) the conformance kit that proves an adapter.
#![warn(missing_docs)]

mod broker;
pub mod codec;
mod error;
mod package;
mod settings;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod text;

pub use broker::{
    AckId, Broker, BrokerInfo, Capabilities, DeadLetter, Delivery, Message, MessageId, Stat,
};
pub use codec::{Codec, CodecError};
pub use error::BrokerError;
pub use package::{
    ChainFlow, ChainLink, Flow, ItemFlow, TaskId, TaskOptions, TaskPackage, TraceContext, now_us,
};
pub use settings::{
    MAX_QUEUE_NAME, MAX_RETRY, QueueSettings, mask_url, redact, secs, url_password,
};

pub use async_trait::async_trait;
