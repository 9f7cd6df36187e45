//! [`Pull`]: one JetStream pull request, and what happens to its packages if nobody takes them.
//!
//! A pull request asks the server for up to `batch` packages and, when none is waiting, to hold
//! the request open for `wait` (`no_wait` + `expires`: since server 2.9 that returns as soon as
//! one package arrives). The server leases every package it sends, whether or not the caller is
//! still listening: if a `dequeue` future is dropped mid-way, the packages already received and
//! those still on their way would sit out their whole lease (`retry`) before coming back. The
//! guard prevents that: dropped unfinished, it gives them back at once (`-NAK`) from a
//! background task that listens until the request has expired.

use std::time::{Duration, Instant};

use async_nats::{Client, Message, StatusCode, Subscriber};
use futures::StreamExt;
use serde::Serialize;

/// Extra time after `expires` for the server's closing status to arrive (it comes within a few
/// milliseconds when all is well).
const GRACE: Duration = Duration::from_secs(1);

/// How a pull request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum End {
    /// The server closed it (batch full, nothing more waiting, or it expired).
    Done,
    /// Nobody serves the consumer: the queue was deleted; recreate it and pull again.
    Missing,
    /// The client's own deadline passed without a closing status: connection trouble, or the
    /// consumer does not exist (the JetStream API ignores pulls on a missing consumer).
    Abandoned,
}

/// The body of a `CONSUMER.MSG.NEXT` request.
#[derive(Serialize)]
struct Request {
    batch: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    expires: Option<u64>,
    no_wait: bool,
}

/// An open pull request and the packages it has brought so far.
pub(crate) struct Pull {
    client: Client,
    subscriber: Option<Subscriber>,
    received: Vec<Message>,
    batch: usize,
    /// When the server forgets the request, at the latest.
    expires_at: Instant,
    closed: bool,
}

impl Pull {
    /// Sends a pull request for up to `batch` packages to `next_subject`
    /// (`$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>`), waiting at most `wait` for the first.
    pub async fn start(
        client: &Client,
        next_subject: &str,
        batch: usize,
        wait: Duration,
    ) -> Result<Self, async_nats::Error> {
        let inbox = client.new_inbox();
        let subscriber = client.subscribe(inbox.clone()).await?;
        // Under a millisecond the server would refuse the request; `no_wait` alone answers at once.
        let expires = (wait >= Duration::from_millis(1))
            .then(|| u64::try_from(wait.as_nanos()).unwrap_or(u64::MAX));
        let body = serde_json::to_vec(&Request {
            batch,
            expires,
            no_wait: true,
        })?;
        let pull = Self {
            client: client.clone(),
            subscriber: Some(subscriber),
            received: Vec::with_capacity(batch),
            batch,
            expires_at: Instant::now() + wait,
            closed: false,
        };
        client
            .publish_with_reply(next_subject.to_owned(), inbox, body.into())
            .await?;
        Ok(pull)
    }

    /// Collects packages until the server closes the request or the client's deadline passes.
    pub async fn collect(&mut self) -> Result<End, String> {
        let deadline = self.expires_at + GRACE;
        let Some(sub) = self.subscriber.as_mut() else {
            return Ok(End::Done);
        };
        // One timer for the whole request, not one per message.
        let timer = tokio::time::sleep_until(deadline.into());
        tokio::pin!(timer);
        loop {
            let next = tokio::select! {
                biased;
                m = sub.next() => m,
                () = &mut timer => return Ok(End::Abandoned),
            };
            let Some(message) = next else {
                self.closed = true;
                return Ok(End::Done);
            };
            match message.status {
                None | Some(StatusCode::OK) if message.reply.is_some() => {
                    self.received.push(message);
                    if self.received.len() >= self.batch {
                        self.closed = true;
                        return Ok(End::Done);
                    }
                }
                None | Some(StatusCode::OK) | Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(StatusCode::NOT_FOUND) | Some(StatusCode::TIMEOUT) => {
                    self.closed = true;
                    return Ok(End::Done);
                }
                Some(StatusCode::NO_RESPONDERS) => {
                    self.closed = true;
                    return Ok(End::Missing);
                }
                Some(StatusCode::REQUEST_TERMINATED) => {
                    self.closed = true;
                    let why = message.description.unwrap_or_default();
                    tracing::debug!("nats: pull request ended early: {why}");
                    return Ok(if why.contains("Deleted") {
                        End::Missing
                    } else {
                        End::Done
                    });
                }
                Some(other) => {
                    self.closed = true;
                    return Err(format!(
                        "pull request answered {other}: {}",
                        message.description.unwrap_or_default()
                    ));
                }
            }
        }
    }

    /// The packages received so far.
    pub fn received(&self) -> &[Message] {
        &self.received
    }

    /// Hands the packages to the caller: from now on they are the caller's to settle.
    pub fn take(&mut self) -> Vec<Message> {
        std::mem::take(&mut self.received)
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        let received = std::mem::take(&mut self.received);
        let subscriber = if self.closed {
            None
        } else {
            self.subscriber.take()
        };
        if received.is_empty() && subscriber.is_none() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return; // No runtime left: the leases run out and the server delivers them again.
        };
        let client = self.client.clone();
        // An abandoned request may still be answered late: listen a little longer for it.
        let until = (self.expires_at + GRACE).max(Instant::now() + GRACE);
        runtime.spawn(give_back(client, received, subscriber, until));
    }
}

/// `-NAK`s what a dropped pull request brought, and keeps listening until it has expired.
async fn give_back(
    client: Client,
    received: Vec<Message>,
    subscriber: Option<Subscriber>,
    until: Instant,
) {
    let mut n = 0usize;
    for m in received {
        n += usize::from(nak(&client, &m).await);
    }
    if let Some(mut sub) = subscriber {
        while let Ok(Some(m)) = tokio::time::timeout_at(until.into(), sub.next()).await {
            match m.status {
                None | Some(StatusCode::OK) => n += usize::from(nak(&client, &m).await),
                Some(StatusCode::IDLE_HEARTBEAT) => {}
                Some(_) => break,
            }
        }
    }
    if n > 0 {
        let _ = client.flush().await;
        tracing::debug!("nats: gave back {n} package(s) of an abandoned dequeue");
    }
}

async fn nak(client: &Client, m: &Message) -> bool {
    match &m.reply {
        Some(reply) => client.publish(reply.clone(), "-NAK".into()).await.is_ok(),
        None => false,
    }
}
