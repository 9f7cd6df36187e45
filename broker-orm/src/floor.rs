//! Where a PostgreSQL claim starts looking: the handle's floor in the claim order.
//!
//! **The promise**: a claim costs the same with a million dead rows at the head of the queue's
//! index as with none, and no ready package is passed over for longer than [`FULL_SCAN_EVERY`].
//!
//! **Why**: without vacuum, an acknowledged (deleted) row stays in the claim index
//! `(queue, tier, due_at, id)` as a dead entry, and the head of the order, where every claim
//! starts, fills with them; a claim that walks from the head slows down with every task run.
//!
//! **How**: each handle keeps a key `(tier, due_at, id)` below which it believes nothing is ready,
//! and claims with `(tier, due_at, id) >= floor`, so the index scan starts past the dead entries.
//! After a claim the floor rises to just past the highest key it leased. Ready rows can appear
//! below the floor: a new package of higher priority, a transaction that commits a row with an
//! older due time, a delayed package of a higher tier coming due, a package failed back, a lease
//! running out. Each is handled:
//! - every enqueue's `NOTIFY` carries the new row's key, and the listener lowers the floor of
//!   every handle of that queue to it ([`Floor::lower`]); a handle's own enqueue and `fail`
//!   lower its floor directly;
//! - a lowering made while a claim is in flight caps how far that claim raises the floor: the
//!   claim may have passed the new row's place before the row was committed (the last
//!   [`RECENT`] lowerings are kept with a generation count; a claim older than those does not
//!   raise the floor at all);
//! - at most every [`FULL_SCAN_EVERY`], and then only when the claim from the floor came back
//!   short or the period has passed, a claim starts from the bottom of the order, which finds
//!   whatever the rest missed (expired leases, lost notifications, rows skipped while another
//!   transaction held them, a delayed row of higher priority coming due). When it finds rows
//!   below the floor, the floor comes down to just past them, so the following claims sweep up
//!   through whatever else is there at full speed instead of `bulk` rows per scan. A lost
//!   `LISTEN` connection also resets the floor to the bottom.
//!
//! So a package is never lost to the floor, only, in those rare cases, up to a second late.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A position in the claim order `(tier, due_at, id)`.
pub type Key = (i32, i64, i64);

/// Below every key.
pub const BOTTOM: Key = (i32::MIN, i64::MIN, i64::MIN);

/// Longest time between two claims that start from the bottom of the order.
pub const FULL_SCAN_EVERY: Duration = Duration::from_secs(1);

/// Lowerings remembered to cap the claims in flight when they came.
pub const RECENT: usize = 64;

/// One handle's floor.
#[derive(Debug)]
pub struct Floor {
    state: Mutex<State>,
}

#[derive(Debug)]
struct State {
    key: Key,
    /// Raised by every lowering.
    generation: u64,
    /// The last `RECENT` lowerings: (the generation they made, their key).
    recent: VecDeque<(u64, Key)>,
    last_full: Option<Instant>,
}

impl State {
    fn lower(&mut self, key: Key) {
        self.generation = self.generation.wrapping_add(1);
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back((self.generation, key));
        if key < self.key {
            self.key = key;
        }
    }

    /// The lowest key lowered to since `generation` (`BOTTOM` when some were forgotten), or
    /// `None` when there was none.
    fn lowered_since(&self, generation: u64) -> Option<Key> {
        if self.generation == generation {
            return None;
        }
        match self.recent.front() {
            Some((oldest, _)) if *oldest <= generation.wrapping_add(1) => self
                .recent
                .iter()
                .filter(|(g, _)| *g > generation)
                .map(|(_, k)| *k)
                .min(),
            _ => Some(BOTTOM),
        }
    }
}

/// Where one claim starts, handed back to [`Floor::advance`] when it ends.
#[derive(Debug, Clone, Copy)]
pub struct Start {
    /// The key the claim scans from.
    pub from: Key,
    generation: u64,
    /// Whether it scans from the bottom.
    pub full: bool,
}

impl Default for Floor {
    fn default() -> Self {
        Self {
            state: Mutex::new(State {
                key: BOTTOM,
                generation: 0,
                recent: VecDeque::with_capacity(RECENT),
                last_full: None,
            }),
        }
    }
}

impl Floor {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state is three plain values, valid whatever a panicking holder did.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Where the next claim starts: from the floor, or from the bottom when the last full scan
    /// is `FULL_SCAN_EVERY` old.
    pub fn start(&self) -> Start {
        let mut s = self.lock();
        let due = s.last_full.is_none_or(|t| t.elapsed() >= FULL_SCAN_EVERY);
        if due || s.key == BOTTOM {
            s.last_full = Some(Instant::now());
            return Start {
                from: BOTTOM,
                generation: s.generation,
                full: true,
            };
        }
        Start {
            from: s.key,
            generation: s.generation,
            full: false,
        }
    }

    /// After a claim from the floor came back short: a scan from the bottom, unless one ran
    /// within `FULL_SCAN_EVERY` (then `None`).
    pub fn full_scan_if_due(&self) -> Option<Start> {
        let mut s = self.lock();
        if s.last_full.is_some_and(|t| t.elapsed() < FULL_SCAN_EVERY) {
            return None;
        }
        s.last_full = Some(Instant::now());
        Some(Start {
            from: BOTTOM,
            generation: s.generation,
            full: true,
        })
    }

    /// A claim that started at `start` leased rows up to `highest`: the floor rises past it,
    /// but not past a row lowered to while the claim was in flight. A scan from the bottom that
    /// leased rows below the floor brings the floor down to just past them.
    pub fn advance(&self, start: Start, highest: Key) {
        let mut s = self.lock();
        let mut next = (highest.0, highest.1, highest.2.saturating_add(1));
        if let Some(cap) = s.lowered_since(start.generation) {
            next = next.min(cap);
        }
        if next > s.key {
            s.key = next;
        } else if start.full && next < s.key {
            // Rows were waiting below the floor; there may be more: sweep up from here. A
            // lowering, so that claims in flight do not raise the floor over them again.
            s.lower(next);
        }
    }

    /// A row became ready (or will) at `key`: the floor comes down to it.
    pub fn lower(&self, key: Key) {
        self.lock().lower(key);
    }

    /// Forget the floor: the next claim scans from the bottom.
    pub fn reset(&self) {
        self.lock().lower(BOTTOM);
    }
}

/// Parses a notification's payload, `"<tier> <due_at> <id> <queue>"`, into its key and queue.
pub fn parse_notice(payload: &str) -> Option<(Key, &str)> {
    let mut parts = payload.splitn(4, ' ');
    let tier = parts.next()?.parse().ok()?;
    let due = parts.next()?.parse().ok()?;
    let id = parts.next()?.parse().ok()?;
    Some(((tier, due, id), parts.next()?))
}

/// The payload announcing a row at `key` in `queue`.
pub fn notice(key: Key, queue: &str) -> String {
    format!("{} {} {} {queue}", key.0, key.1, key.2)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_claim_scans_from_the_bottom_then_from_the_floor() {
        let f = Floor::default();
        let s = f.start();
        assert!(s.full);
        assert_eq!(s.from, BOTTOM);
        f.advance(s, (0, 10, 5));
        let s = f.start();
        assert!(!s.full);
        assert_eq!(s.from, (0, 10, 6));
        // A short claim does not scan from the bottom again within the period.
        assert!(f.full_scan_if_due().is_none());
    }

    #[test]
    fn a_lowering_during_a_claim_wins() {
        let f = Floor::default();
        f.advance(f.start(), (0, 10, 5));
        let s = f.start();
        f.lower((-1, 20, 9));
        f.advance(s, (0, 30, 50));
        assert_eq!(f.start().from, (-1, 20, 9));
    }

    #[test]
    fn a_claim_in_flight_rises_only_to_a_row_lowered_to_meanwhile() {
        let f = Floor::default();
        f.advance(f.start(), (0, 10, 5));
        let s = f.start();
        // A row committed at (0, 20, 7) while the claim ran: above the floor, but the claim
        // may have passed its place before it was there.
        f.lower((0, 20, 7));
        f.advance(s, (0, 30, 50));
        assert_eq!(f.start().from, (0, 20, 7));
    }

    #[test]
    fn a_claim_older_than_the_remembered_lowerings_does_not_raise() {
        let f = Floor::default();
        f.advance(f.start(), (0, 10, 5));
        let s = f.start();
        for k in 0..(RECENT as i64 + 1) {
            f.lower((0, 100 + k, 1));
        }
        f.advance(s, (0, 30, 50));
        assert_eq!(f.start().from, (0, 10, 6));
    }

    #[test]
    fn a_bottom_scan_below_the_floor_brings_it_down_to_sweep() {
        let f = Floor::default();
        f.advance(f.start(), (0, 1000, 500));
        // A scan from the bottom (the test runs within a second of the first one, so it is
        // made by hand) finds rows far below the floor.
        let s = Start {
            from: BOTTOM,
            full: true,
            ..f.start()
        };
        f.advance(s, (0, 40, 20));
        assert_eq!(f.start().from, (0, 40, 21));
    }

    #[test]
    fn a_lowering_above_the_floor_changes_nothing() {
        let f = Floor::default();
        f.advance(f.start(), (0, 10, 5));
        f.lower((0, 99, 1));
        assert_eq!(f.start().from, (0, 10, 6));
    }

    #[test]
    fn reset_goes_back_to_the_bottom() {
        let f = Floor::default();
        f.advance(f.start(), (0, 10, 5));
        f.reset();
        assert!(f.start().full);
    }

    #[test]
    fn notices_round_trip_with_spaces_in_the_queue_name() {
        let n = notice((-5, 1_700_000_000_000_000, 42), "a queue name");
        assert_eq!(
            parse_notice(&n),
            Some(((-5, 1_700_000_000_000_000, 42), "a queue name"))
        );
        assert_eq!(parse_notice("default"), None);
        assert_eq!(parse_notice("1 2 x q"), None);
    }
}
