//! `qcluster-nats`: the whole `qcluster` command line, with `broker = "nats"` added.
//!
//! ```toml
//! # qcluster.toml
//! name = "orders"
//! broker = "nats"
//!
//! [nats]
//! url = "nats://127.0.0.1:4222"   # user:password@ or token@ if the server wants one
//! connect_timeout = 5
//! prefix = "qcluster"
//! ```
//!
//! Every command of `qcluster` works (`run`, `enqueue`, `result`, `info`, `ping`, `purge`,
//! `quarantine`, `config`), with the built-in tasks and brokers.

use broker_core::QueueSettings;
use custom_broker::{NatsBroker, NatsConfig};

fn main() -> std::process::ExitCode {
    cluster::App::new()
        .broker("nats", |config: NatsConfig, settings: QueueSettings| {
            NatsBroker::connect(config, settings)
        })
        .main()
}
