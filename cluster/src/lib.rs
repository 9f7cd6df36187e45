//! The qcluster task cluster: configuration, the task registry, the producer [`Client`], the
//! result [`Store`], and the [`Cluster`] itself (sentinel, pusher, workers, monitor) on any
//! [`broker_core::Broker`].
//!
//! Modelled on Django Q's cluster: the sentinel supervises a pusher that dequeues in bulk, a
//! pool of workers that run tasks under a timeout, and a monitor that saves results and settles
//! each package with the broker.
#![warn(missing_docs)]

mod app;
pub mod broker;
mod builtin;
pub mod cli;
pub mod client;
pub mod config;
pub mod counters;
pub mod dead;
mod error;
pub mod flow;
pub mod health;
mod http;
mod job;
pub mod metrics;
mod monitor;
pub mod overview;
pub mod process;
mod pusher;
pub mod reporter;
pub mod schedule;
pub mod scheduler;
pub mod sentinel;
mod shared;
pub mod status;
pub mod store;
pub mod task;
mod worker;

pub use app::App;
pub use broker::Brokers;
pub use client::{Client, EnqueueOptions, NewTask};
pub use config::{Config, Loaded, WorkerMode};
pub use error::{ConfigError, Error, StoreFault};
pub use flow::Finished;
pub use sentinel::{Cluster, Counters, Status, Summary, shutdown_signal};
pub use store::{Store, TaskRecord};
pub use task::{Registry, Task, TaskContext};

pub use broker_core;
pub use broker_memory;
