//! Property tests for the signed package codec: round trips, and that every tampered, truncated,
//! foreign or malformed-but-signed envelope is refused with the right error (never accepted, never
//! a panic).

use std::str::FromStr;
use std::time::Duration;

use broker_core::codec::{FLAG_COMPRESSED, OVERHEAD, TAG_LEN, VERSION};
use broker_core::{Codec, CodecError, TaskId, TaskOptions, TaskPackage, TraceContext};
use proptest::collection::vec;
use proptest::prelude::*;

const SECRET: &[u8] = b"s3cret-for-property-tests";
const CLUSTER: &str = "cluster-a";

fn codec() -> Codec {
    Codec::new(SECRET, CLUSTER).unwrap()
}

fn codecs() -> [Codec; 2] {
    [codec(), codec().with_compression(true)]
}

// ---------------------------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------------------------

fn arb_id() -> impl Strategy<Value = TaskId> {
    any::<[u8; 16]>().prop_map(|b| {
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        TaskId::from_str(&hex).unwrap()
    })
}

/// Random bytes (incompressible), long runs (compressible) or repeated JSON-ish text.
fn arb_bytes(max_random: usize, max_run: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        vec(any::<u8>(), 0..=max_random),
        (any::<u8>(), 0..=max_run).prop_map(|(b, n)| vec![b; n]),
        ("[ -~]{1,12}", 0..=max_run / 12).prop_map(|(s, n)| s.repeat(n).into_bytes()),
    ]
}

fn arb_opt_string(max: usize) -> impl Strategy<Value = Option<String>> {
    proptest::option::of(proptest::string::string_regex(&format!(".{{0,{max}}}")).unwrap())
}

fn arb_options(max_str: usize) -> impl Strategy<Value = TaskOptions> {
    (
        proptest::option::of(
            (any::<u64>(), 0u32..1_000_000_000).prop_map(|(s, n)| Duration::new(s, n)),
        ),
        proptest::option::of(any::<u32>()),
        proptest::option::of(any::<bool>()),
        arb_opt_string(max_str),
        arb_opt_string(max_str),
        any::<i16>(),
        arb_opt_string(max_str),
    )
        .prop_map(
            |(timeout, max_attempts, ack_failure, hook, group, priority, name)| TaskOptions {
                timeout,
                max_attempts,
                ack_failure,
                hook,
                group,
                priority,
                name,
            },
        )
}

fn arb_trace(max_str: usize) -> impl Strategy<Value = Option<TraceContext>> {
    proptest::option::of(
        (
            proptest::string::string_regex(&format!(".{{0,{max_str}}}")).unwrap(),
            arb_opt_string(max_str),
        )
            .prop_map(|(traceparent, tracestate)| TraceContext {
                traceparent,
                tracestate,
            }),
    )
}

/// Arbitrary packages; `max_str` bounds the strings, `max_random`/`max_run` the byte fields.
fn arb_package(
    max_str: usize,
    max_random: usize,
    max_run: usize,
) -> impl Strategy<Value = TaskPackage> {
    (
        arb_id(),
        proptest::string::string_regex(&format!(".{{0,{max_str}}}")).unwrap(),
        arb_bytes(max_random, max_run),
        arb_bytes(max_random, max_run),
        arb_options(max_str),
        any::<u32>(),
        any::<i64>(),
        arb_trace(max_str),
    )
        .prop_map(
            |(id, func, args, kwargs, options, attempt, enqueued_at_us, trace)| TaskPackage {
                id,
                func,
                args,
                kwargs,
                options,
                attempt,
                enqueued_at_us,
                trace,
                flow: None,
            },
        )
}

/// A few fixed packages, small and large, some compressible.
fn concrete_packages() -> Vec<TaskPackage> {
    let mut small = TaskPackage::new("echo", br#"[1,"two"]"#.to_vec());
    small.enqueued_at_us = 1_700_000_000_000_000;

    let mut full = TaskPackage::new("app.tasks.send_mail", br#"["a@example.org"]"#.to_vec());
    full.kwargs = br#"{"subject":"hi","body":"hello"}"#.to_vec();
    full.options = TaskOptions {
        timeout: Some(Duration::from_millis(30_500)),
        max_attempts: Some(5),
        ack_failure: Some(true),
        hook: Some("app.hooks.done".into()),
        group: Some("mails".into()),
        priority: -3,
        name: Some("Mail to a — ünïcødé".into()),
    };
    full.attempt = 2;
    full.trace = Some(TraceContext {
        traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        tracestate: Some("congo=t61rcWkgMzE".into()),
    });

    let mut compressible = full.clone();
    compressible.args = br#"{"k":"v"},"#.repeat(100);

    vec![small, full, compressible]
}

/// Flips every bit of `envelope` in turn; each flipped envelope must be refused. Since a flip
/// keeps the length and the tag is checked before anything else is looked at, the error is
/// always `BadSignature`.
fn assert_every_bit_flip_rejected(codec: &Codec, envelope: &[u8]) -> Result<(), TestCaseError> {
    let mut tampered = envelope.to_vec();
    for byte in 0..tampered.len() {
        for bit in 0..8 {
            tampered[byte] ^= 1 << bit;
            let got = codec.decode(&tampered);
            prop_assert_eq!(
                got,
                Err(CodecError::BadSignature),
                "flip of bit {} of byte {} (of {}) was not refused",
                bit,
                byte,
                envelope.len()
            );
            tampered[byte] ^= 1 << bit;
        }
    }
    prop_assert_eq!(&tampered[..], envelope);
    Ok(())
}

/// Every strict prefix of `envelope` must be refused: `Truncated` below the envelope overhead,
/// `BadSignature` from there on (the "tag" is then the wrong 32 bytes).
fn assert_every_truncation_rejected(codec: &Codec, envelope: &[u8]) -> Result<(), TestCaseError> {
    for len in 0..envelope.len() {
        let got = codec.decode(&envelope[..len]);
        if len < OVERHEAD {
            prop_assert_eq!(
                got,
                Err(CodecError::Truncated { len, min: OVERHEAD }),
                "prefix of {} bytes",
                len
            );
        } else {
            prop_assert_eq!(
                got,
                Err(CodecError::BadSignature),
                "prefix of {} bytes",
                len
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Round trips
// ---------------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    #[test]
    fn prop_round_trip_binary_and_text(p in arb_package(40, 300, 3000)) {
        for c in codecs() {
            let env = c.encode(&p).unwrap();
            prop_assert_eq!(env[0], VERSION);
            prop_assert!(env[1] == 0 || env[1] == FLAG_COMPRESSED);
            prop_assert_eq!(c.decode(&env).unwrap(), p.clone());

            let text = c.encode_text(&p).unwrap();
            prop_assert!(
                text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
                "not unpadded base64url: {}",
                text
            );
            prop_assert_eq!(c.decode_text(&text).unwrap(), p.clone());
        }
        // The plain codec never compresses, and either codec decodes the other's envelopes.
        let plain = codec().encode(&p).unwrap();
        prop_assert_eq!(plain[1], 0);
        let packed = codec().with_compression(true).encode(&p).unwrap();
        prop_assert_eq!(codec().decode(&packed).unwrap(), p.clone());
        prop_assert_eq!(codec().with_compression(true).decode(&plain).unwrap(), p);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Packages with a long run of one byte are stored compressed, and still round trip
    /// (binary and text) through the compressed path.
    #[test]
    fn prop_compressible_packages_round_trip_compressed(
        p in arb_package(40, 300, 300),
        byte: u8,
        run in 1024usize..20_000,
    ) {
        let mut p = p;
        p.kwargs = vec![byte; run];
        let c = codec().with_compression(true);
        let env = c.encode(&p).unwrap();
        prop_assert_eq!(env[1], FLAG_COMPRESSED);
        prop_assert!(env.len() < run / 2, "{} bytes for a run of {}", env.len(), run);
        prop_assert_eq!(c.decode(&env).unwrap(), p.clone());
        prop_assert_eq!(c.decode_text(&c.encode_text(&p).unwrap()).unwrap(), p);
    }
}

#[test]
fn concrete_packages_round_trip_and_compress() {
    for p in concrete_packages() {
        for c in codecs() {
            let env = c.encode(&p).unwrap();
            assert_eq!(c.decode(&env).unwrap(), p);
            assert_eq!(c.decode_text(&c.encode_text(&p).unwrap()).unwrap(), p);
            // What `sign_raw` signs is exactly what `encode` signs.
            assert_eq!(c.sign_raw(&env[..env.len() - TAG_LEN]), env);
        }
    }
    let compressible = &concrete_packages()[2];
    let packed = codec().with_compression(true).encode(compressible).unwrap();
    let plain = codec().encode(compressible).unwrap();
    assert_eq!(packed[1], FLAG_COMPRESSED);
    assert_eq!(plain[1], 0);
    assert!(
        packed.len() < plain.len() / 3,
        "{} vs {}",
        packed.len(),
        plain.len()
    );
}

#[test]
fn padded_text_is_accepted_and_garbage_text_is_base64_error() {
    let p = &concrete_packages()[1];
    let c = codec();
    let text = c.encode_text(p).unwrap();
    let padded = format!("{text}{}", "=".repeat((4 - text.len() % 4) % 4));
    assert_eq!(c.decode_text(&padded).unwrap(), *p);
    for bad in [format!("{text}*"), format!("+{text}"), format!("{text}/x")] {
        assert!(
            matches!(c.decode_text(&bad), Err(CodecError::Base64(_))),
            "{bad}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Tampering and truncation
// ---------------------------------------------------------------------------------------------

#[test]
fn every_bit_flip_of_concrete_envelopes_is_rejected() {
    for p in concrete_packages() {
        for c in codecs() {
            let env = c.encode(&p).unwrap();
            assert_every_bit_flip_rejected(&c, &env).unwrap();
        }
    }
}

#[test]
fn every_truncation_of_concrete_envelopes_is_rejected() {
    for p in concrete_packages() {
        for c in codecs() {
            let env = c.encode(&p).unwrap();
            assert_every_truncation_rejected(&c, &env).unwrap();
            // Text: every strict prefix of the text form is refused too.
            let text = c.encode_text(&p).unwrap();
            for len in 0..text.len() {
                assert!(c.decode_text(&text[..len]).is_err(), "text prefix {len}");
            }
        }
    }
}

proptest! {
    // Each case decodes 8 × len tampered envelopes: keep packages small and cases few.
    #![proptest_config(ProptestConfig::with_cases(12))]

    #[test]
    fn prop_every_bit_flip_is_rejected(p in arb_package(12, 48, 2048), compress in any::<bool>()) {
        let c = codec().with_compression(compress);
        let env = c.encode(&p).unwrap();
        prop_assume!(env.len() <= 600);
        assert_every_bit_flip_rejected(&c, &env)?;
    }

    #[test]
    fn prop_every_truncation_is_rejected(p in arb_package(24, 200, 4096), compress in any::<bool>()) {
        let c = codec().with_compression(compress);
        let env = c.encode(&p).unwrap();
        assert_every_truncation_rejected(&c, &env)?;
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Arbitrary bytes are never accepted, and never make the decoder panic.
    #[test]
    fn prop_arbitrary_bytes_are_rejected(bytes in vec(any::<u8>(), 0..200)) {
        let c = codec();
        prop_assert!(c.decode(&bytes).is_err());
        prop_assert!(c.decode_text(&String::from_utf8_lossy(&bytes)).is_err());
    }

    /// A package signed for one cluster never verifies in another.
    #[test]
    fn prop_other_cluster_is_bad_signature(
        p in arb_package(16, 64, 1024),
        other in "[a-z0-9._-]{0,24}",
        compress in any::<bool>(),
    ) {
        prop_assume!(other != CLUSTER);
        let env = codec().with_compression(compress).encode(&p).unwrap();
        let foreign = Codec::new(SECRET, &other).unwrap();
        prop_assert_eq!(foreign.decode(&env), Err(CodecError::BadSignature));
    }

    /// A package signed with one secret never verifies with another. (Secrets here are printable
    /// and at most 48 bytes: HMAC pads short keys with zero bytes, so `k` and `k\0` are the same
    /// key.)
    #[test]
    fn prop_other_secret_is_bad_signature(
        p in arb_package(16, 64, 1024),
        other in "[ -~]{1,48}",
        compress in any::<bool>(),
    ) {
        prop_assume!(other.as_bytes() != SECRET);
        let env = codec().with_compression(compress).encode(&p).unwrap();
        let foreign = Codec::new(other.as_bytes(), CLUSTER).unwrap();
        prop_assert_eq!(foreign.decode(&env), Err(CodecError::BadSignature));
    }
}

#[test]
fn wrong_cluster_or_secret_is_bad_signature() {
    for p in concrete_packages() {
        for c in codecs() {
            let env = c.encode(&p).unwrap();
            let text = c.encode_text(&p).unwrap();
            for other in [
                Codec::new(SECRET, "cluster-b").unwrap(),
                Codec::new(SECRET, "").unwrap(),
                Codec::new(SECRET, "cluster-a ").unwrap(),
                Codec::new(b"s3cret-for-property-test", CLUSTER).unwrap(),
                Codec::new(b"S3cret-for-property-tests", CLUSTER).unwrap(),
                Codec::new(b"x", CLUSTER).unwrap(),
            ] {
                assert_eq!(other.decode(&env), Err(CodecError::BadSignature));
                assert_eq!(other.decode_text(&text), Err(CodecError::BadSignature));
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Correctly signed but malformed envelopes
// ---------------------------------------------------------------------------------------------

/// `version | flags | payload` of a real envelope (the tag cut off).
fn body_of(envelope: &[u8]) -> Vec<u8> {
    envelope[..envelope.len() - TAG_LEN].to_vec()
}

#[test]
fn signed_unknown_version_is_unknown_version() {
    for p in concrete_packages() {
        for c in codecs() {
            let body = body_of(&c.encode(&p).unwrap());
            for version in [0u8, 2, 3, 0x7f, 0x80, 0xff] {
                let mut b = body.clone();
                b[0] = version;
                let env = c.sign_raw(&b);
                assert_eq!(c.decode(&env), Err(CodecError::UnknownVersion(version)));
            }
        }
    }
    // Also with an empty payload: the version is checked before the payload is looked at.
    let c = codec();
    assert_eq!(
        c.decode(&c.sign_raw(&[9, 0])),
        Err(CodecError::UnknownVersion(9))
    );
}

#[test]
fn signed_unknown_flags_are_unknown_flags() {
    for p in concrete_packages() {
        for c in codecs() {
            let body = body_of(&c.encode(&p).unwrap());
            let compressed = body[1] & FLAG_COMPRESSED;
            // Bit 1 is FLAG_FLOW; every other bit is unknown.
            for unknown in (2..8)
                .map(|bit| 1u8 << bit)
                .chain([0xfe, 0x81 & !FLAG_COMPRESSED])
            {
                let mut b = body.clone();
                b[1] = compressed | unknown;
                let env = c.sign_raw(&b);
                assert_eq!(
                    c.decode(&env),
                    Err(CodecError::UnknownFlags(compressed | unknown))
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any signed header other than `VERSION | {0, FLAG_COMPRESSED}` is refused with the matching
    /// error, whatever the payload; a known header with an arbitrary payload may fail to decode
    /// but never panics.
    #[test]
    fn prop_signed_headers(version: u8, flags: u8, payload in vec(any::<u8>(), 0..64)) {
        let c = codec();
        let mut body = vec![version, flags];
        body.extend_from_slice(&payload);
        let got = c.decode(&c.sign_raw(&body));
        if version != VERSION {
            prop_assert_eq!(got, Err(CodecError::UnknownVersion(version)));
        } else if flags & !FLAG_COMPRESSED != 0 {
            prop_assert_eq!(got, Err(CodecError::UnknownFlags(flags)));
        } else {
            prop_assert!(
                matches!(got, Err(CodecError::Decode(_) | CodecError::Truncated { .. })),
                "{:?}",
                got
            );
        }
    }
}

#[test]
fn signed_compressed_payload_with_lying_length_is_rejected() {
    let p = &concrete_packages()[2];
    let c = codec().with_compression(true);
    let body = body_of(&c.encode(p).unwrap());
    assert_eq!(body[1], FLAG_COMPRESSED);
    let real = u32::from_le_bytes(body[2..6].try_into().unwrap());

    for announced in [0, 1, real / 2, real - 1, real + 1, real * 2] {
        let mut b = body.clone();
        b[2..6].copy_from_slice(&announced.to_le_bytes());
        let got = c.decode(&c.sign_raw(&b));
        assert!(
            matches!(got, Err(CodecError::Decode(_))),
            "{announced}: {got:?}"
        );
    }

    // Over the cap: refused on the announced size alone.
    let small = codec().with_max_size(real as usize - 1);
    let got = small.decode(&small.sign_raw(&body));
    assert_eq!(
        got,
        Err(CodecError::TooLarge {
            size: real as usize,
            limit: real as usize - 1
        })
    );

    // Compressed header cut short.
    for len in 0..4 {
        let got = c.decode(&c.sign_raw(&body[..2 + len]));
        assert_eq!(got, Err(CodecError::Truncated { len, min: 4 }));
    }
}

#[test]
fn trailing_bytes_after_a_signed_package_are_rejected() {
    let c = codec();
    let mut body = body_of(&c.encode(&concrete_packages()[1]).unwrap());
    body.push(0);
    let got = c.decode(&c.sign_raw(&body));
    assert!(matches!(got, Err(CodecError::Decode(_))), "{got:?}");
}

#[test]
fn oversize_envelope_is_too_large_before_the_tag_is_checked() {
    let c = codec().with_max_size(100);
    let junk = vec![0u8; 100 + OVERHEAD + 4 + 1];
    assert_eq!(
        c.decode(&junk),
        Err(CodecError::TooLarge {
            size: junk.len(),
            limit: 100 + OVERHEAD + 4
        })
    );
}
