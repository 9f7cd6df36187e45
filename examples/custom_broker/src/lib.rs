//! Your own broker, outside the core: the [`Broker`](broker_core::Broker) trait on
//! [NATS JetStream](https://docs.nats.io/nats-concepts/jetstream), as a team would write it for
//! the message system they already run.
//!
//! - [`NatsConfig`]: the `[nats]` section of `qcluster.toml` (serde, unknown keys refused,
//!   `Debug` without secrets).
//! - [`NatsBroker::connect`]`(config, settings)`: the `(Config, QueueSettings) -> Result<B,
//!   BrokerError>` constructor the cluster's broker registry calls.
//! - `impl Broker for NatsBroker`: every operation, with NATS's limits documented where they
//!   bite (see [`NatsBroker`]).
//!
//! Its tests run the conformance kit (`broker_core::testkit`) against a real server, and the
//! `qcluster-nats` binary is the whole `qcluster` CLI with `broker = "nats"` added.
//!
//! ```no_run
//! # async fn demo() -> Result<(), broker_core::BrokerError> {
//! use broker_core::{Broker, Message, QueueSettings};
//! use custom_broker::{NatsBroker, NatsConfig};
//!
//! let broker = NatsBroker::connect(NatsConfig::default(), QueueSettings::for_queue("default")).await?;
//! broker.enqueue(Message::new(b"package".to_vec())).await?;
//! for d in broker.dequeue().await? {
//!     broker.acknowledge(&d.ack).await?;
//! }
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

mod broker;
mod config;
mod layout;
mod pull;
mod receipt;

pub use broker::{MAX_BULK, NatsBroker};
pub use config::NatsConfig;
