//! Nodes and connections: the configured node list grown by `HELLO`, one multiplexed connection
//! to the node in use for every non-blocking command, a small pool of connections for the
//! blocking `GETJOB`, and failover to the next node when the one in use stops answering.

use std::sync::Mutex as SyncMutex;
use std::time::Duration;

use broker_core::BrokerError;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, IntoConnectionInfo, RedisConnectionInfo,
    RedisError, Value,
};
use tokio::sync::Mutex;

use crate::NAME;

/// Most idle `GETJOB` connections kept per handle.
const POOL: usize = 8;

/// True for errors that mean the node (or the way to it) is gone, not that it refused a command.
pub(crate) fn is_connection_error(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout()
}

/// Splits `host:port` (`[v6]:port` too).
pub(crate) fn parse_addr(addr: &str) -> Option<(String, u16)> {
    let (host, port) = addr.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    // Not a URL (`disque://:pw@host:7711`): a password would end up in errors and logs.
    if host.is_empty() || host.contains(['@', '/']) || host.contains(char::is_whitespace) {
        return None;
    }
    Some((host.to_owned(), port.parse().ok()?))
}

/// Opens one connection to `addr`, authenticating with `auth` when set.
pub(crate) async fn open(
    addr: &str,
    auth: Option<&str>,
    connect_timeout: Duration,
    response_timeout: Duration,
) -> Result<MultiplexedConnection, RedisError> {
    let (host, port) = parse_addr(addr).ok_or_else(|| {
        RedisError::from((
            redis::ErrorKind::InvalidClientConfig,
            "not a host:port address",
        ))
    })?;
    // Disque predates CLIENT SETINFO: do not send it.
    let mut settings = RedisConnectionInfo::default().set_skip_set_lib_name();
    if let Some(pw) = auth {
        settings = settings.set_password(pw);
    }
    let info = ConnectionAddr::Tcp(host, port)
        .into_connection_info()?
        .set_redis_settings(settings);
    let client = Client::open(info)?;
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(connect_timeout))
        .set_response_timeout(Some(response_timeout));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
}

/// The node list and the connections of one handle.
pub(crate) struct Nodes {
    auth: Option<String>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// Configured nodes first, then those learnt with `HELLO`; never shrinks.
    known: SyncMutex<Vec<String>>,
    /// The node in use and its connection; `None` after a connection error.
    current: Mutex<Option<(usize, String, MultiplexedConnection)>>,
    /// Where the next connection attempt starts (after the node that failed).
    next: SyncMutex<usize>,
    /// Idle connections for `GETJOB`, with the node they go to.
    waiters: SyncMutex<Vec<(String, MultiplexedConnection)>>,
    /// Connections to the other nodes, for the commands that visit every node.
    others: SyncMutex<std::collections::HashMap<String, MultiplexedConnection>>,
}

impl Nodes {
    pub(crate) fn new(
        nodes: Vec<String>,
        auth: Option<String>,
        connect_timeout: Duration,
        response_timeout: Duration,
        start: usize,
    ) -> Self {
        let n = nodes.len().max(1);
        Self {
            auth,
            connect_timeout,
            response_timeout,
            known: SyncMutex::new(nodes),
            current: Mutex::new(None),
            next: SyncMutex::new(start % n),
            waiters: SyncMutex::new(Vec::new()),
            others: SyncMutex::new(std::collections::HashMap::new()),
        }
    }

    /// Every node known so far.
    pub(crate) fn known(&self) -> Vec<String> {
        self.known.lock().map(|k| k.clone()).unwrap_or_default()
    }

    /// The address of the node in use, if connected.
    pub(crate) async fn current_addr(&self) -> Option<String> {
        self.current
            .lock()
            .await
            .as_ref()
            .map(|(_, a, _)| a.clone())
    }

    /// The connection to the node in use; connects (trying each known node once, starting after
    /// the last one that failed) when there is none.
    pub(crate) async fn conn(&self) -> Result<(String, MultiplexedConnection), BrokerError> {
        let mut cur = self.current.lock().await;
        if let Some((_, addr, c)) = cur.as_ref() {
            return Ok((addr.clone(), c.clone()));
        }
        let known = self.known();
        let start = self.next.lock().map(|n| *n).unwrap_or(0);
        let mut last = String::from("no node configured");
        for k in 0..known.len() {
            let idx = (start + k) % known.len();
            let addr = &known[idx];
            match open(
                addr,
                self.auth.as_deref(),
                self.connect_timeout,
                self.response_timeout,
            )
            .await
            {
                Ok(mut c) => {
                    self.learn(&mut c).await;
                    tracing::debug!(node = %addr, "disque: connected");
                    *cur = Some((idx, addr.clone(), c.clone()));
                    return Ok((addr.clone(), c));
                }
                Err(e) => {
                    tracing::warn!(node = %addr, "disque: cannot connect: {}", self.scrub(&e));
                    last = format!("{addr}: {}", self.scrub(&e));
                }
            }
        }
        Err(BrokerError::Unreachable {
            broker: NAME,
            endpoint: known.join(","),
            message: last,
        })
    }

    /// Forgets the connection to `addr` (after a connection error), so that the next command
    /// goes to the next node.
    pub(crate) async fn failed(&self, addr: &str) {
        let mut cur = self.current.lock().await;
        if let Some((idx, a, _)) = cur.as_ref()
            && a == addr
        {
            if let Ok(mut n) = self.next.lock() {
                *n = idx + 1;
            }
            *cur = None;
        }
        if let Ok(mut w) = self.waiters.lock() {
            w.retain(|(a, _)| a != addr);
        }
    }

    /// Adds the nodes `HELLO` names to the known list (best effort).
    async fn learn(&self, c: &mut MultiplexedConnection) {
        let hello: Result<Value, _> = redis::cmd("HELLO").query_async(c).await;
        let Ok(Value::Array(items)) = hello else {
            return;
        };
        let mut found = Vec::new();
        for item in items.iter().skip(2) {
            if let Value::Array(node) = item
                && let (Some(host), Some(port)) = (
                    node.get(1).and_then(crate::text),
                    node.get(2).and_then(crate::int),
                )
            {
                let host = if host.contains(':') {
                    format!("[{host}]")
                } else {
                    host
                };
                found.push(format!("{host}:{port}"));
            }
        }
        if let Ok(mut k) = self.known.lock() {
            for f in found {
                if !k.contains(&f) {
                    tracing::debug!(node = %f, "disque: learnt a node from HELLO");
                    k.push(f);
                }
            }
        }
    }

    /// A connection for one blocking `GETJOB` to `addr` (pooled or new).
    pub(crate) async fn waiter(
        &self,
        addr: &str,
        response_timeout: Duration,
    ) -> Result<MultiplexedConnection, RedisError> {
        let pooled = self.waiters.lock().ok().and_then(|mut w| {
            let at = w.iter().position(|(a, _)| a == addr)?;
            Some(w.swap_remove(at).1)
        });
        match pooled {
            Some(c) => Ok(c),
            None => {
                open(
                    addr,
                    self.auth.as_deref(),
                    self.connect_timeout,
                    response_timeout,
                )
                .await
            }
        }
    }

    /// A connection to another node `addr` (kept for the next visit).
    pub(crate) async fn other(&self, addr: &str) -> Result<MultiplexedConnection, RedisError> {
        if let Some(c) = self.others.lock().ok().and_then(|o| o.get(addr).cloned()) {
            return Ok(c);
        }
        let c = open(
            addr,
            self.auth.as_deref(),
            self.connect_timeout,
            self.response_timeout,
        )
        .await?;
        if let Ok(mut o) = self.others.lock() {
            o.insert(addr.to_owned(), c.clone());
        }
        Ok(c)
    }

    /// Forgets the kept connection to another node after an error.
    pub(crate) fn other_failed(&self, addr: &str) {
        if let Ok(mut o) = self.others.lock() {
            o.remove(addr);
        }
    }

    /// Gives a `GETJOB` connection back after a complete reply.
    pub(crate) fn give_back(&self, addr: String, c: MultiplexedConnection) {
        if let Ok(mut w) = self.waiters.lock()
            && w.len() < POOL
        {
            w.push((addr, c));
        }
    }

    /// The error's text with the password removed.
    pub(crate) fn scrub(&self, e: &RedisError) -> String {
        broker_core::redact(&e.to_string(), self.auth.as_deref())
    }
}
