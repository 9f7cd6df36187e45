//! Feeds arbitrary bytes to every decoding entry point of the package codec. None may panic,
//! and nothing unsigned may ever be accepted.
#![no_main]

use std::sync::LazyLock;

use broker_core::Codec;
use broker_core::codec::{FLAG_COMPRESSED, decode_verified};
use libfuzzer_sys::fuzz_target;

/// A small cap keeps the post-verification path from allocating the default 16 MiB per input.
const MAX_SIZE: usize = 1024 * 1024;

static CODEC: LazyLock<Codec> = LazyLock::new(|| {
    Codec::new(b"fuzz-secret", "fuzz-cluster")
        .unwrap()
        .with_max_size(MAX_SIZE)
});

fuzz_target!(|data: &[u8]| {
    // The full path: size and tag checks first. A random input forging the tag would be a bug.
    assert!(CODEC.decode(data).is_err(), "unsigned input accepted");
    assert!(
        CODEC.decode_text(&String::from_utf8_lossy(data)).is_err(),
        "unsigned text accepted"
    );

    // The path behind the signature check, which only a key holder can reach: the first byte
    // picks the flags, the rest is the payload. Errors are fine; panics and crashes are not.
    if let Some((&flags, payload)) = data.split_first() {
        let _ = decode_verified(flags & FLAG_COMPRESSED, payload, MAX_SIZE);
        let _ = decode_verified(flags, payload, MAX_SIZE);
    }
});
