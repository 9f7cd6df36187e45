//! The text form of a package, for brokers that store text only (SQS, IronMQ): base64url
//! without padding, the same alphabet as [`Codec::encode_text`](crate::Codec::encode_text).
//!
//! A text-only adapter writes [`to_text`] of the envelope, reads back with [`from_text`], and
//! declares as its [`Capabilities::max_message_size`](crate::Capabilities::max_message_size)
//! [`raw_fitting`] of the server's limit, so that the conformance kit's largest package fits.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The envelope as base64url text, without padding.
pub fn to_text(payload: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(payload)
}

/// The envelope back from its text; `None` when the text is not base64url (padding accepted),
/// e.g. a message some other program put in the queue.
pub fn from_text(text: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok()
}

/// The largest raw package whose text (base64url, no padding) fits in `text` bytes.
pub fn raw_fitting(text: usize) -> usize {
    text / 4 * 3 + (text % 4).saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_fitting_is_the_largest_that_fits() {
        for text in 0..200usize {
            let n = raw_fitting(text);
            assert!(to_text(&vec![0u8; n]).len() <= text);
            assert!(to_text(&vec![0u8; n + 1]).len() > text);
        }
    }

    #[test]
    fn round_trip_and_foreign_text() {
        let bytes: Vec<u8> = (0..=255).collect();
        assert_eq!(from_text(&to_text(&bytes)), Some(bytes));
        assert_eq!(from_text("aGk="), Some(b"hi".to_vec()));
        assert_eq!(from_text("not base64!"), None);
    }
}
