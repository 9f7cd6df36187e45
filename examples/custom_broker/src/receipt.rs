//! [`Receipt`]: what an [`AckId`] holds for NATS.
//!
//! A receipt is the delivery's JetStream ack subject (`$JS.ACK.<stream>.<consumer>.<delivered>.
//! <stream seq>.<consumer seq>.<timestamp>.<pending>`) followed by a space and the time, in
//! milliseconds since the Unix epoch, until which the lease surely holds. The ack subject alone
//! lets any connection settle the delivery; the lease time lets a settle skip the staleness
//! check while no other delivery of the package can exist yet.

use broker_core::{AckId, BrokerError};

/// One parsed receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Receipt {
    /// The ack subject to publish `+ACK`, `-NAK`, `+WPI`, `+TERM` to.
    pub subject: String,
    /// How many times the package has been delivered, this time included.
    pub delivered: u64,
    /// The package's sequence in the work stream: its message id.
    pub stream_seq: u64,
    /// The delivery's sequence in the consumer: unique per delivery.
    pub consumer_seq: u64,
    /// Until when (ms since the epoch, local clock) no second delivery can exist.
    pub sure_until_ms: u64,
}

impl Receipt {
    /// Wraps an ack subject from a delivery; `sure_until_ms` as described on the module.
    pub fn from_delivery(subject: &str, sure_until_ms: u64) -> Option<Self> {
        let mut r = Self::parse_subject(subject)?;
        r.sure_until_ms = sure_until_ms;
        Some(r)
    }

    /// The opaque receipt handed to callers.
    pub fn to_ack(&self) -> AckId {
        AckId::new(format!("{} {}", self.subject, self.sure_until_ms))
    }

    /// Reads a receipt back, checking that it belongs to `stream` / `consumer`.
    pub fn parse(
        ack: &AckId,
        stream: &str,
        consumer: &str,
        broker: &'static str,
    ) -> Result<Self, BrokerError> {
        let invalid = || BrokerError::InvalidReceipt {
            broker,
            receipt: ack.as_str().to_owned(),
        };
        let (subject, until) = ack.as_str().split_once(' ').ok_or_else(invalid)?;
        let sure_until_ms = until.parse().map_err(|_| invalid())?;
        let (r, s, c) = Self::parse_parts(subject).ok_or_else(invalid)?;
        if s != stream || c != consumer {
            return Err(invalid());
        }
        Ok(Self { sure_until_ms, ..r })
    }

    fn parse_subject(subject: &str) -> Option<Self> {
        Self::parse_parts(subject).map(|(r, _, _)| r)
    }

    /// `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>` (servers before
    /// 2.10), or the form with domain and account hash after `$JS.ACK.` (2.10 and later).
    /// Returns the receipt, its stream and its consumer. Allocates only the subject's copy.
    fn parse_parts(subject: &str) -> Option<(Self, &str, &str)> {
        let mut t = [""; 12];
        let mut len = 0;
        for part in subject.split('.') {
            *t.get_mut(len)? = part;
            len += 1;
        }
        let at = match len {
            9 => 2,
            11 | 12 => 4,
            _ => return None,
        };
        if t[0] != "$JS" || t[1] != "ACK" || t[..len].iter().any(|x| x.is_empty()) {
            return None;
        }
        let n = |i: usize| t[at + i].parse::<u64>().ok();
        let r = Self {
            subject: subject.to_owned(),
            delivered: n(2)?,
            stream_seq: n(3)?,
            consumer_seq: n(4)?,
            sure_until_ms: 0,
        };
        Some((r, t[at], t[at + 1]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_checks_the_queue() {
        let subject = "$JS.ACK.p-q-61.workers.2.17.40.1795962341420696668.3";
        let r = Receipt::from_delivery(subject, 1234).unwrap();
        assert_eq!((r.delivered, r.stream_seq, r.consumer_seq), (2, 17, 40));
        let ack = r.to_ack();
        assert_eq!(
            Receipt::parse(&ack, "p-q-61", "workers", "nats").unwrap(),
            r
        );
        assert!(matches!(
            Receipt::parse(&ack, "p-q-62", "workers", "nats"),
            Err(BrokerError::InvalidReceipt { .. })
        ));
        let v2 = "$JS.ACK.hub.ACC.p-q-61.workers.1.5.6.1795962341420696668.0.tok";
        let r2 = Receipt::from_delivery(v2, 9).unwrap();
        assert_eq!((r2.delivered, r2.stream_seq, r2.consumer_seq), (1, 5, 6));
        assert!(Receipt::parse(&r2.to_ack(), "p-q-61", "workers", "nats").is_ok());
        for bad in [
            "",
            "x 1",
            "$JS.ACK.a.b.c.d.e.f.g 1",
            "foo.bar 2",
            &format!("{subject} x"),
        ] {
            assert!(Receipt::parse(&AckId::new(bad), "p-q-61", "workers", "nats").is_err());
        }
    }
}
