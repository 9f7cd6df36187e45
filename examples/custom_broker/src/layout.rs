//! [`Layout`]: the stream, subject and consumer names of one queue.
//!
//! Queue names are any text up to 191 bytes (spaces, dots, `*`, `>`, quotes, unicode), while
//! NATS names allow neither dots nor wildcards nor whitespace, and a stream name becomes a
//! directory name on the server. So the queue name is written in hex when that is short
//! (queues up to 32 bytes: `qcluster-q-64656661756c74` is `default`), and as `h` + its SHA-256
//! otherwise. Both forms are `[0-9a-f]` (plus the `h`), so they never collide with each other.

use sha2::{Digest, Sha256};

/// Longest queue name written in hex; longer ones are hashed.
const HEX_UP_TO: usize = 32;

/// Names for one queue under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// The work-queue stream holding waiting and in-flight packages.
    pub work_stream: String,
    /// Its only subject.
    pub work_subject: String,
    /// The durable pull consumer every handle of the queue shares.
    pub consumer: String,
    /// The stream of dead letters (limits retention: kept until the queue is deleted).
    pub dead_stream: String,
    /// Its only subject.
    pub dead_subject: String,
    /// The redelivery ledger: the latest delivery of every package delivered more than once,
    /// so that a receipt from an earlier delivery is recognised as stale.
    pub ledger_stream: String,
    /// Ledger subjects are this plus `.<stream sequence>`.
    pub ledger_subject: String,
    /// Monitoring values of every queue under this prefix.
    pub stats_stream: String,
    /// Stat subjects are this plus `.<hex of the key>`.
    pub stats_subject: String,
}

impl Layout {
    /// The names for `queue` under `prefix` (already checked to be `[A-Za-z0-9_-]{1,32}`).
    pub fn new(prefix: &str, queue: &str) -> Self {
        let q = encode_queue(queue);
        Self {
            work_stream: format!("{prefix}-q-{q}"),
            work_subject: format!("{prefix}.q.{q}"),
            consumer: "workers".to_owned(),
            dead_stream: format!("{prefix}-d-{q}"),
            dead_subject: format!("{prefix}.d.{q}"),
            ledger_stream: format!("{prefix}-l-{q}"),
            ledger_subject: format!("{prefix}.l.{q}"),
            stats_stream: format!("{prefix}-stats"),
            stats_subject: format!("{prefix}.s"),
        }
    }

    /// The ledger subject of the package stored at `seq`.
    pub fn ledger_for(&self, seq: u64) -> String {
        format!("{}.{seq}", self.ledger_subject)
    }

    /// The subject a monitoring value with `key` is stored under.
    pub fn stat_subject(&self, key: &str) -> String {
        format!("{}.{}", self.stats_subject, hex(key.as_bytes()))
    }

    /// The key back from a stat subject, if it is one of ours.
    pub fn stat_key(&self, subject: &str) -> Option<String> {
        let h = subject
            .strip_prefix(&self.stats_subject)?
            .strip_prefix('.')?;
        String::from_utf8(unhex(h)?).ok()
    }
}

fn encode_queue(queue: &str) -> String {
    if queue.len() <= HEX_UP_TO {
        hex(queue.as_bytes())
    } else {
        format!("h{}", hex(&Sha256::digest(queue.as_bytes())))
    }
}

/// Lower-case hex of `bytes`.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 15)] as char);
    }
    s
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid_name(n: &str) -> bool {
        !n.is_empty()
            && n.len() <= 128
            && n.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    fn valid_token(t: &str) -> bool {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    }

    #[test]
    fn hostile_names_become_valid_names() {
        let long = "é".repeat(95);
        for q in [
            "default",
            "a.b *>",
            "x'; DROP TABLE q; --\"`\\",
            "日本語 ",
            &long,
        ] {
            let l = Layout::new("qcluster", q);
            for n in [
                &l.work_stream,
                &l.dead_stream,
                &l.ledger_stream,
                &l.consumer,
            ] {
                assert!(valid_name(n), "{n:?} from {q:?}");
            }
            for s in [&l.work_subject, &l.dead_subject, &l.ledger_subject] {
                assert!(s.split('.').all(valid_token), "{s:?} from {q:?}");
            }
        }
        assert_eq!(
            Layout::new("p", "default").work_stream,
            "p-q-64656661756c74"
        );
        assert_ne!(Layout::new("p", "a.b"), Layout::new("p", "a_b"));
    }

    #[test]
    fn stat_keys_round_trip() {
        let l = Layout::new("p", "q");
        let key = "kit:st_t%:a b.c*>";
        let subject = l.stat_subject(key);
        assert!(subject.split('.').all(valid_token));
        assert_eq!(l.stat_key(&subject).as_deref(), Some(key));
        assert_eq!(l.stat_key("p.s.zz"), None);
    }
}
