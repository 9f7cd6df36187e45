//! The `[amqp]` configuration section.

use std::fmt;
use std::time::Duration;

use broker_core::{BrokerError, mask_url};
use serde::{Deserialize, Serialize};

/// Which kind of RabbitMQ queue holds the packages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum QueueType {
    /// Replicated Raft queue: what RabbitMQ recommends for data safety. No priorities (3.10).
    #[default]
    Quorum,
    /// The classic queue: single node, supports `max_priority`.
    Classic,
}

impl QueueType {
    /// The value of the `x-queue-type` argument.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Quorum => "quorum",
            Self::Classic => "classic",
        }
    }
}

/// Settings of the RabbitMQ broker (`[amqp]` in `qcluster.toml`).
///
/// `Debug` masks the password of `url`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` (`%2f` is the default vhost `/`); `amqps://` needs
    /// the crate feature `tls`.
    pub url: String,
    /// `quorum` (default) or `classic`.
    pub queue_type: QueueType,
    /// Longest time a connection attempt (TCP, TLS, AMQP handshake, channels, declarations) and
    /// `ping` may take, in seconds.
    #[serde(with = "broker_core::secs")]
    pub connect_timeout: Duration,
    /// Packages the server may push to this handle beyond the ones it has handed out and not
    /// yet settled (the consumer's `basic.qos` prefetch). Default: the cluster's `bulk`.
    pub prefetch: Option<u16>,
    /// Classic queues only: declare the queue with `x-max-priority` (1..=255; RabbitMQ advises
    /// at most 10) and honour `Message::priority` (clamped to 0..=max_priority). Quorum queues
    /// of RabbitMQ 3.10 have no priorities.
    pub max_priority: Option<u8>,
    /// The `connection_name` client property shown by `rabbitmqctl list_connections` and the
    /// management UI. Default: `qcluster <queue>`.
    pub connection_name: Option<String>,
    /// Quorum queues only: declare the queue with `x-delivery-limit` (at least 1). A package
    /// given back more often than this (`fail`, a lease or prefetch given back, a closed
    /// channel: RabbitMQ counts every return) is dead-lettered by the server into
    /// `<queue>.dead`. Default: none, the server's own (unlimited in 3.x, 20 in 4.x).
    pub delivery_limit: Option<u32>,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned(),
            queue_type: QueueType::Quorum,
            connect_timeout: Duration::from_secs(5),
            prefetch: None,
            max_priority: None,
            connection_name: None,
            delivery_limit: None,
        }
    }
}

impl AmqpConfig {
    /// The defaults with another URL.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ..Self::default()
        }
    }

    /// Checks the values, naming the offending key.
    pub fn validate(&self) -> Result<(), BrokerError> {
        let scheme = self.url.split_once("://").map(|(s, _)| s);
        match scheme {
            Some("amqp") => {}
            Some("amqps") if cfg!(feature = "tls") => {}
            Some("amqps") => {
                return Err(BrokerError::config(
                    "amqp.url",
                    "amqps:// needs broker-amqp built with the feature `tls`",
                ));
            }
            _ => {
                return Err(BrokerError::config(
                    "amqp.url",
                    format!(
                        "must start with amqp:// or amqps://, got {}",
                        mask_url(&self.url)
                    ),
                ));
            }
        }
        if self.connect_timeout.is_zero() {
            return Err(BrokerError::config(
                "amqp.connect_timeout",
                "must be greater than zero",
            ));
        }
        if self.prefetch == Some(0) {
            return Err(BrokerError::config(
                "amqp.prefetch",
                "must be at least 1 (0 would mean unlimited)",
            ));
        }
        match (self.max_priority, self.queue_type) {
            (Some(0), _) => {
                return Err(BrokerError::config(
                    "amqp.max_priority",
                    "must be between 1 and 255",
                ));
            }
            (Some(_), QueueType::Quorum) => {
                return Err(BrokerError::config(
                    "amqp.max_priority",
                    "quorum queues have no priorities (RabbitMQ 3.10); set queue_type = \"classic\" or remove max_priority",
                ));
            }
            _ => {}
        }
        match (self.delivery_limit, self.queue_type) {
            (Some(0), _) => {
                return Err(BrokerError::config(
                    "amqp.delivery_limit",
                    "must be at least 1",
                ));
            }
            (Some(_), QueueType::Classic) => {
                return Err(BrokerError::config(
                    "amqp.delivery_limit",
                    "classic queues have no delivery limit; set queue_type = \"quorum\" or remove delivery_limit",
                ));
            }
            _ => {}
        }
        Ok(())
    }
}

impl fmt::Debug for AmqpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AmqpConfig")
            .field("url", &mask_url(&self.url))
            .field("queue_type", &self.queue_type)
            .field("connect_timeout", &self.connect_timeout)
            .field("prefetch", &self.prefetch)
            .field("max_priority", &self.max_priority)
            .field("connection_name", &self.connection_name)
            .field("delivery_limit", &self.delivery_limit)
            .finish()
    }
}
