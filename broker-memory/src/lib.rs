//! The in-process broker: queues in this process's memory, with receipts, priority, delay, dead
//! letters, stats and lease extension.
//!
//! Layout: a [`MemoryHub`] holds queues by name (and the stats of every queue); each queue keeps
//! its packages in one map by id and indexes them in three ordered sets: **ready** by
//! `(priority descending, visible since, id)`, **delayed** by the time they come due, and
//! **leased** by the time their lease runs out. A package is in exactly one of the three, or in
//! the queue's dead letters; every operation moves it under the queue's lock, so a package is
//! never in two places or in none. Ids come from one counter for the whole process, so no two
//! packages (in any hub) share one. A receipt is `<id>:<delivery number>`.
//!
//! The promise: **at least once, within this process.**
//! - A delivered package is invisible for `retry`. If it is not settled by then it is delivered
//!   again, its delivery count raised ([`Delivery::deliveries`] is `Some(n)` for the n-th
//!   delivery). Until it is delivered again the old receipt still holds (a late `acknowledge`
//!   still removes it, a late `extend` leases it again); once it is, the old receipt is stale and
//!   `acknowledge`, `fail`, `fail_after`, `dead_letter` and `extend` ignore it. `fail` and
//!   `fail_after` end the lease: the same receipt does nothing afterwards. `delete` removes the
//!   message whatever its lease or place.
//! - `dequeue` returns up to `bulk` packages, highest priority first, then in the order they
//!   became visible (enqueue order for plain packages; a delayed package at its due time, a
//!   package whose lease ran out at the end of its lease, a failed one when it was failed), ties
//!   by id. On an empty queue it waits up to `wait`, woken at once by an enqueue or a `fail`, and
//!   in time for a delayed package or a lease that comes due within the wait.
//! - A claim happens synchronously under the lock, never across an `.await`: a `dequeue` future
//!   dropped while it waits has claimed nothing, so nothing is lost or held. Any number of
//!   `dequeue`s may wait at once on one handle while others settle receipts on it.
//! - A receipt settles on any handle of the same queue in the same hub.
//! - `enqueue` refuses a package over the size limit with [`BrokerError::TooLarge`] before storing
//!   anything; `enqueue_many` checks every size first, then stores all in order (all or nothing).
//!   A malformed receipt gives [`BrokerError::InvalidReceipt`].
//!
//! Dead letters are kept in the queue, oldest first, with the package's priority:
//! `requeue_dead` moves one back as a fresh package (a new id, first delivery again, the same
//! priority) under the queue's lock, `delete_dead` drops one; both find the id by a linear scan
//! of the dead letters.
//!
//! Limits: packages live in this process only and are lost when it exits; other processes cannot
//! see the queue. Nothing bounds how many packages or dead letters a queue holds but memory; a
//! queue, once opened, stays in its hub (empty after `delete_queue`) as long as the hub lives.
//! Stats (`set_stat`) belong to the hub, shared by all its queues, like a server's. Times are
//! [`tokio::time::Instant`]s, so a test runtime with paused time moves leases and delays too.
//!
//! ```
//! use broker_core::{Broker, Message, QueueSettings};
//! use broker_memory::{MemoryBroker, MemoryHub};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), broker_core::BrokerError> {
//! let hub = MemoryHub::new(); // or MemoryHub::global(), which `MemoryBroker::connect` uses
//! let producer = MemoryBroker::open(&hub, QueueSettings::for_queue("jobs"))?;
//! let consumer = MemoryBroker::open(&hub, QueueSettings::for_queue("jobs"))?;
//! producer.enqueue(Message::new(b"package".to_vec())).await?;
//! let got = consumer.dequeue().await?;
//! assert_eq!((got[0].payload.as_slice(), got[0].deliveries), (&b"package"[..], Some(1)));
//! consumer.acknowledge(&got[0].ack).await?;
//! assert_eq!(producer.queue_size().await?, 0);
//! # Ok(())
//! # }
//! ```
#![warn(missing_docs)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use broker_core::{
    AckId, Broker, BrokerError, BrokerInfo, Capabilities, DeadLetter, Delivery, MAX_RETRY, Message,
    MessageId, QueueSettings, Stat, async_trait, now_us,
};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Most packages one `dequeue` returns.
pub const MAX_BULK: usize = 1000;
/// Largest package accepted when [`QueueSettings::max_message_size`] gives none: 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: usize = 16 * 1024 * 1024;

/// The adapter's name, in errors and `info`.
const NAME: &str = "memory";
/// Stands in for a time too far ahead to represent (a delay of `Duration::MAX`, say).
const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Ids of every package in the process, in every hub: a receipt never names a package of
/// another queue or hub.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
/// Numbers the hubs, for `Debug` and `info`.
static NEXT_HUB: AtomicU64 = AtomicU64::new(1);

/// `[memory]` settings. There are none yet: queue settings (`bulk`, `retry`, `wait`,
/// `max_message_size`) say everything this broker needs. Unknown keys are refused when read from
/// a config file.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
#[non_exhaustive]
pub struct MemoryConfig {}

/// Queues by name, shared by every handle opened on it: what a server is to the other brokers.
///
/// Cheap to clone (an `Arc` inside); clones are the same hub. [`MemoryHub::new`] makes an isolated
/// one (for tests); [`MemoryHub::global`] is the process-wide hub that [`MemoryBroker::connect`]
/// uses.
#[derive(Clone)]
pub struct MemoryHub {
    inner: Arc<HubInner>,
}

struct HubInner {
    label: String,
    queues: Mutex<HashMap<String, Arc<Queue>>>,
    stats: Mutex<BTreeMap<String, (Vec<u8>, Instant)>>,
}

impl MemoryHub {
    /// A new, empty hub that shares nothing with any other.
    pub fn new() -> Self {
        let n = NEXT_HUB.fetch_add(1, Ordering::Relaxed);
        Self::labelled(format!("private #{n}"))
    }

    /// The process-wide hub (created on first use).
    pub fn global() -> Self {
        static GLOBAL: OnceLock<MemoryHub> = OnceLock::new();
        GLOBAL
            .get_or_init(|| Self::labelled("global".into()))
            .clone()
    }

    fn labelled(label: String) -> Self {
        Self {
            inner: Arc::new(HubInner {
                label,
                queues: Mutex::new(HashMap::new()),
                stats: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The queue called `name`, created empty if the hub has none yet.
    fn queue(&self, name: &str) -> Arc<Queue> {
        let mut queues = lock(&self.inner.queues);
        if let Some(q) = queues.get(name) {
            return q.clone();
        }
        let q = Arc::new(Queue {
            state: Mutex::new(State::default()),
            notify: Notify::new(),
        });
        queues.insert(name.to_owned(), q.clone());
        q
    }
}

impl Default for MemoryHub {
    /// Same as [`MemoryHub::new`]: an isolated hub.
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryHub {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryHub")
            .field("hub", &self.inner.label)
            .field("queues", &lock(&self.inner.queues).len())
            .finish()
    }
}

/// A handle on one queue of a [`MemoryHub`]. Cheap to clone; every handle opened with the same
/// queue name on the same hub shares the queue.
#[derive(Clone)]
pub struct MemoryBroker {
    hub: MemoryHub,
    queue: Arc<Queue>,
    settings: Arc<QueueSettings>,
    limit: usize,
}

impl MemoryBroker {
    /// A handle on queue `settings.queue` of `hub` (created empty if missing). Refuses settings
    /// out of range with [`BrokerError::Config`] naming the key (`bulk` at most [`MAX_BULK`]).
    pub fn open(hub: &MemoryHub, settings: QueueSettings) -> Result<Self, BrokerError> {
        settings.validate(MAX_BULK)?;
        Ok(Self {
            hub: hub.clone(),
            queue: hub.queue(&settings.queue),
            limit: settings
                .max_message_size
                .unwrap_or(DEFAULT_MAX_MESSAGE_SIZE),
            settings: Arc::new(settings),
        })
    }

    /// A handle on queue `settings.queue` of the process-wide hub ([`MemoryHub::global`]): what
    /// `broker = "memory"` opens.
    pub async fn connect(
        config: MemoryConfig,
        settings: QueueSettings,
    ) -> Result<Self, BrokerError> {
        let MemoryConfig {} = config;
        Self::open(&MemoryHub::global(), settings)
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.queue.state)
    }

    fn check_size(&self, m: &Message) -> Result<(), BrokerError> {
        if m.payload.len() > self.limit {
            return Err(BrokerError::TooLarge {
                broker: NAME,
                size: m.payload.len(),
                limit: self.limit,
            });
        }
        Ok(())
    }

    /// Runs `f` on the package a receipt names if that receipt still holds it (see the crate
    /// doc), then wakes waiting consumers if `wake`.
    fn settle(
        &self,
        ack: &AckId,
        wake: bool,
        f: impl FnOnce(&mut State, u64, Instant),
    ) -> Result<bool, BrokerError> {
        let (id, n) = parse_receipt(ack)?;
        let held = {
            let mut st = self.state();
            let held = st.holds(id, n);
            if held {
                f(&mut st, id, Instant::now());
            }
            held
        };
        if wake {
            self.queue.notify.notify_waiters();
        }
        Ok(held)
    }
}

impl fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBroker")
            .field("hub", &self.hub.inner.label)
            .field("queue", &self.settings.queue)
            .field("bulk", &self.settings.bulk)
            .field("retry", &self.settings.retry)
            .field("wait", &self.settings.wait)
            .field("max_message_size", &self.limit)
            .finish()
    }
}

/// One queue: its packages and the consumers waiting for them.
struct Queue {
    state: Mutex<State>,
    /// Woken (all waiters) by every change that may make a package deliverable sooner.
    notify: Notify,
}

/// Where a package is, with the time that orders it there.
#[derive(Debug, Clone, Copy)]
enum Place {
    /// Deliverable; visible since then.
    Ready(Instant),
    /// Not deliverable before then.
    Delayed(Instant),
    /// Delivered; the lease runs out then.
    Leased(Instant),
}

struct Entry {
    payload: Vec<u8>,
    priority: i16,
    /// Deliveries so far; the last one's receipt carries this number.
    deliveries: u32,
    /// The last receipt still holds the package: set by a delivery, cleared by `fail`. A lease
    /// that ran out keeps it until the next delivery.
    held: bool,
    place: Place,
}

#[derive(Default)]
struct Index {
    ready: BTreeSet<(Reverse<i16>, Instant, u64)>,
    delayed: BTreeSet<(Instant, u64)>,
    leased: BTreeSet<(Instant, u64)>,
}

impl Index {
    fn insert(&mut self, id: u64, priority: i16, place: Place) {
        match place {
            Place::Ready(t) => self.ready.insert((Reverse(priority), t, id)),
            Place::Delayed(t) => self.delayed.insert((t, id)),
            Place::Leased(t) => self.leased.insert((t, id)),
        };
    }

    fn remove(&mut self, id: u64, priority: i16, place: Place) {
        match place {
            Place::Ready(t) => self.ready.remove(&(Reverse(priority), t, id)),
            Place::Delayed(t) => self.delayed.remove(&(t, id)),
            Place::Leased(t) => self.leased.remove(&(t, id)),
        };
    }
}

#[derive(Default)]
struct State {
    entries: HashMap<u64, Entry>,
    index: Index,
    /// Dead letters, oldest first, with the priority each package had.
    dead: VecDeque<(DeadLetter, i16)>,
}

impl State {
    /// Makes delayed packages that came due, and leased ones whose lease ran out, ready (visible
    /// since their due time or the end of their lease).
    fn promote(&mut self, now: Instant) {
        while let Some(&(t, id)) = self.index.delayed.first() {
            if t > now {
                break;
            }
            self.index.delayed.pop_first();
            self.make_ready(id, t);
        }
        while let Some(&(t, id)) = self.index.leased.first() {
            if t > now {
                break;
            }
            self.index.leased.pop_first();
            tracing::trace!(
                id,
                "memory broker: lease ran out, package deliverable again"
            );
            self.make_ready(id, t);
        }
    }

    /// Files package `id`, already out of its index, as ready since `t`.
    fn make_ready(&mut self, id: u64, t: Instant) {
        if let Some(e) = self.entries.get_mut(&id) {
            e.place = Place::Ready(t);
            self.index.insert(id, e.priority, e.place);
        }
    }

    /// Moves package `id` to `place`.
    fn move_to(&mut self, id: u64, place: Place) {
        if let Some(e) = self.entries.get_mut(&id) {
            self.index.remove(id, e.priority, e.place);
            e.place = place;
            self.index.insert(id, e.priority, place);
        }
    }

    /// Takes package `id` out of the queue.
    fn take(&mut self, id: u64) -> Option<Entry> {
        let e = self.entries.remove(&id)?;
        self.index.remove(id, e.priority, e.place);
        Some(e)
    }

    /// Whether receipt `(id, n)` still holds its package.
    fn holds(&self, id: u64, n: u32) -> bool {
        self.entries
            .get(&id)
            .is_some_and(|e| e.held && e.deliveries == n)
    }

    /// Leases up to `bulk` ready packages for `retry`, in delivery order.
    fn claim(&mut self, now: Instant, bulk: usize, retry: Duration) -> Vec<Delivery> {
        self.promote(now);
        let deadline = later(now, retry);
        let mut out = Vec::new();
        while out.len() < bulk {
            let Some((_, _, id)) = self.index.ready.pop_first() else {
                break;
            };
            let Some(e) = self.entries.get_mut(&id) else {
                continue;
            };
            e.deliveries = e.deliveries.saturating_add(1);
            e.held = true;
            e.place = Place::Leased(deadline);
            self.index.leased.insert((deadline, id));
            out.push(Delivery {
                ack: AckId::new(format!("{id}:{}", e.deliveries)),
                message_id: MessageId(id.to_string()),
                payload: e.payload.clone(),
                deliveries: Some(e.deliveries),
            });
        }
        out
    }

    /// The next time a package becomes deliverable by itself (a delay or a lease running out).
    fn next_due(&self) -> Option<Instant> {
        let d = self.index.delayed.first().map(|&(t, _)| t);
        let l = self.index.leased.first().map(|&(t, _)| t);
        match (d, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Stores one package (the size is checked already).
    fn store(&mut self, id: u64, m: Message, now: Instant) {
        let place = match m.delay {
            Some(d) if !d.is_zero() => Place::Delayed(later(now, d)),
            _ => Place::Ready(now),
        };
        self.index.insert(id, m.priority, place);
        self.entries.insert(
            id,
            Entry {
                payload: m.payload,
                priority: m.priority,
                deliveries: 0,
                held: false,
                place,
            },
        );
    }

    /// Ends the lease of package `id` and makes it deliverable `after` from `now`.
    fn give_back(&mut self, id: u64, now: Instant, after: Duration) {
        let place = if after.is_zero() {
            Place::Ready(now)
        } else {
            Place::Delayed(later(now, after))
        };
        self.move_to(id, place);
        if let Some(e) = self.entries.get_mut(&id) {
            e.held = false;
        }
    }
}

/// `now + d`, or about thirty years ahead where that cannot be represented.
fn later(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(FAR))
        .unwrap_or(now)
}

/// A lock whose holder panicked is still consistent (no operation panics half-way through a
/// change it cannot undo), so it is taken over rather than propagated.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `<id>:<delivery number>`, as [`State::claim`] writes it.
fn parse_receipt(ack: &AckId) -> Result<(u64, u32), BrokerError> {
    let bad = || BrokerError::InvalidReceipt {
        broker: NAME,
        receipt: ack.as_str().to_owned(),
    };
    let (id, n) = ack.as_str().split_once(':').ok_or_else(bad)?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(id) || !digits(n) {
        return Err(bad());
    }
    match (id.parse::<u64>(), n.parse::<u32>()) {
        (Ok(id), Ok(n)) if n > 0 => Ok((id, n)),
        _ => Err(bad()),
    }
}

#[async_trait]
impl Broker for MemoryBroker {
    fn name(&self) -> &'static str {
        NAME
    }

    async fn enqueue(&self, message: Message) -> Result<MessageId, BrokerError> {
        self.check_size(&message)?;
        let id = {
            let mut st = self.state();
            let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            st.store(id, message, Instant::now());
            id
        };
        self.queue.notify.notify_waiters();
        Ok(MessageId(id.to_string()))
    }

    /// Checks every size first, then stores all under one lock, in order: all or nothing.
    async fn enqueue_many(&self, messages: Vec<Message>) -> Result<Vec<MessageId>, BrokerError> {
        for m in &messages {
            self.check_size(m)?;
        }
        if messages.is_empty() {
            return Ok(Vec::new());
        }
        let mut ids = Vec::with_capacity(messages.len());
        {
            let mut st = self.state();
            let now = Instant::now();
            for m in messages {
                let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
                st.store(id, m, now);
                ids.push(MessageId(id.to_string()));
            }
        }
        self.queue.notify.notify_waiters();
        Ok(ids)
    }

    async fn dequeue(&self) -> Result<Vec<Delivery>, BrokerError> {
        let s = &*self.settings;
        let give_up = later(Instant::now(), s.wait);
        loop {
            // Registered before looking, so a wake-up between the look and the wait is not lost.
            let notified = self.queue.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let now = Instant::now();
            let (batch, due) = {
                let mut st = self.state();
                let batch = st.claim(now, s.bulk, s.retry);
                (batch, st.next_due())
            };
            if !batch.is_empty() || now >= give_up {
                return Ok(batch);
            }
            let wake = due.map_or(give_up, |d| d.min(give_up));
            tokio::select! {
                _ = &mut notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    async fn acknowledge(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.settle(ack, false, |st, id, _| {
            st.take(id);
        })
        .map(drop)
    }

    /// Every receipt is parsed first: one malformed receipt settles none.
    async fn acknowledge_many(&self, acks: &[AckId]) -> Result<(), BrokerError> {
        let parsed = acks
            .iter()
            .map(parse_receipt)
            .collect::<Result<Vec<_>, _>>()?;
        let mut st = self.state();
        for (id, n) in parsed {
            if st.holds(id, n) {
                st.take(id);
            }
        }
        Ok(())
    }

    async fn fail(&self, ack: &AckId) -> Result<(), BrokerError> {
        self.settle(ack, true, |st, id, now| {
            st.give_back(id, now, Duration::ZERO)
        })
        .map(drop)
    }

    async fn fail_after(&self, ack: &AckId, delay: Duration) -> Result<(), BrokerError> {
        self.settle(ack, true, |st, id, now| st.give_back(id, now, delay))
            .map(drop)
    }

    async fn delete(&self, ack: &AckId) -> Result<(), BrokerError> {
        let (id, _) = parse_receipt(ack)?;
        self.state().take(id);
        Ok(())
    }

    /// The lease runs out `by` from now (at most [`MAX_RETRY`]); a lease that ran out but whose
    /// package was not delivered again is taken up again.
    async fn extend(&self, ack: &AckId, by: Duration) -> Result<bool, BrokerError> {
        self.settle(ack, true, |st, id, now| {
            st.move_to(id, Place::Leased(later(now, by.min(MAX_RETRY))));
        })
    }

    async fn dead_letter(&self, ack: &AckId, reason: &str) -> Result<(), BrokerError> {
        self.settle(ack, false, |st, id, _| {
            if let Some(e) = st.take(id) {
                st.dead.push_back((
                    DeadLetter {
                        message_id: MessageId(id.to_string()),
                        payload: e.payload,
                        reason: reason.to_owned(),
                        deliveries: Some(e.deliveries),
                        dead_at_us: now_us(),
                    },
                    e.priority,
                ));
            }
        })
        .map(drop)
    }

    async fn dead_letters(&self, limit: usize) -> Result<Vec<DeadLetter>, BrokerError> {
        Ok(self
            .state()
            .dead
            .iter()
            .take(limit)
            .map(|(d, _)| d.clone())
            .collect())
    }

    /// Moves the dead letter back under the queue's lock (never in both places, never in none),
    /// as a fresh package with a new id and its former priority.
    async fn requeue_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        {
            let mut st = self.state();
            let Some(at) = st.dead.iter().position(|(d, _)| d.message_id == *id) else {
                return Ok(false);
            };
            let Some((dead, priority)) = st.dead.remove(at) else {
                return Ok(false);
            };
            let fresh = NEXT_ID.fetch_add(1, Ordering::Relaxed);
            let m = Message::new(dead.payload).with_priority(priority);
            st.store(fresh, m, Instant::now());
        }
        self.queue.notify.notify_waiters();
        Ok(true)
    }

    async fn delete_dead(&self, id: &MessageId) -> Result<bool, BrokerError> {
        let mut st = self.state();
        let Some(at) = st.dead.iter().position(|(d, _)| d.message_id == *id) else {
            return Ok(false);
        };
        Ok(st.dead.remove(at).is_some())
    }

    async fn dead_letter_size(&self) -> Result<Option<u64>, BrokerError> {
        Ok(Some(self.state().dead.len() as u64))
    }

    async fn purge_queue(&self) -> Result<u64, BrokerError> {
        let mut st = self.state();
        st.promote(Instant::now());
        let ready = std::mem::take(&mut st.index.ready);
        let delayed = std::mem::take(&mut st.index.delayed);
        let ids = ready
            .into_iter()
            .map(|(_, _, id)| id)
            .chain(delayed.into_iter().map(|(_, id)| id));
        let mut n = 0;
        for id in ids {
            if st.entries.remove(&id).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    async fn delete_queue(&self) -> Result<(), BrokerError> {
        // The queue stays in the hub, empty, so that handles opened before and after share it.
        *self.state() = State::default();
        Ok(())
    }

    async fn queue_size(&self) -> Result<u64, BrokerError> {
        let mut st = self.state();
        st.promote(Instant::now());
        Ok((st.index.ready.len() + st.index.delayed.len()) as u64)
    }

    async fn lock_size(&self) -> Result<Option<u64>, BrokerError> {
        let mut st = self.state();
        st.promote(Instant::now());
        Ok(Some(st.index.leased.len() as u64))
    }

    async fn ping(&self) -> Result<(), BrokerError> {
        Ok(())
    }

    async fn info(&self) -> Result<BrokerInfo, BrokerError> {
        let s = &*self.settings;
        let mut details = BTreeMap::new();
        details.insert("hub".to_owned(), self.hub.inner.label.clone());
        details.insert("max_message_size".to_owned(), self.limit.to_string());
        Ok(BrokerInfo {
            broker: NAME.to_owned(),
            server: None,
            endpoint: "in-process".to_owned(),
            queue: s.queue.clone(),
            receipts: true,
            retry_secs: Some(s.retry.as_secs_f64()),
            notes: vec![
                "packages live in this process only and are lost when it exits".to_owned(),
                "other processes cannot see the queue".to_owned(),
                "at least once within the process: a delivered package is leased for `retry`; \
                 unless acknowledged it is delivered again"
                    .to_owned(),
            ],
            details,
        })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            receipts: true,
            atomic: true,
            max_bulk: MAX_BULK,
            max_message_size: self.limit,
            text_only: false,
            dead_letter: true,
            priority: true,
            delay: true,
            stats: true,
            extend: true,
        }
    }

    /// Stats belong to the hub: every queue of it sees them. A `ttl` of zero stores nothing
    /// visible.
    async fn set_stat(&self, key: &str, value: &[u8], ttl: Duration) -> Result<(), BrokerError> {
        let now = Instant::now();
        let mut stats = lock(&self.hub.inner.stats);
        stats.retain(|_, (_, expires)| *expires > now);
        stats.insert(key.to_owned(), (value.to_vec(), later(now, ttl)));
        Ok(())
    }

    /// Sorted by key; `prefix` is plain text (no wildcards).
    async fn get_stats(&self, prefix: &str) -> Result<Vec<Stat>, BrokerError> {
        let now = Instant::now();
        let stats = lock(&self.hub.inner.stats);
        Ok(stats
            .range::<str, _>((
                std::ops::Bound::Included(prefix),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|(k, _)| k.starts_with(prefix))
            .filter(|(_, (_, expires))| *expires > now)
            .map(|(k, (v, _))| Stat {
                key: k.clone(),
                value: v.clone(),
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn receipts_parse_strictly() {
        assert_eq!(parse_receipt(&AckId::new("12:3")).ok(), Some((12, 3)));
        for bad in [
            "",
            "12",
            ":3",
            "12:",
            "12:0",
            "+1:2",
            "1:-2",
            "a:1",
            "1:2:3",
            "1:99999999999",
        ] {
            match parse_receipt(&AckId::new(bad)) {
                Err(BrokerError::InvalidReceipt { broker, receipt }) => {
                    assert_eq!((broker, receipt.as_str()), (NAME, bad));
                }
                other => panic!("{bad:?} gave {other:?}"),
            }
        }
    }
}
