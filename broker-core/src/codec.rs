//! Package codec: bincode → optional LZ4 → signed envelope.
//!
//! Envelope layout: `version (1) | flags (1) | payload | HMAC-SHA256 tag (32)`, the tag computed
//! over every byte before it. When the `COMPRESSED` flag is set the payload is
//! `uncompressed length (u32 LE) | LZ4 block`.
//!
//! The (uncompressed) payload is the bincode package; when the `FLOW` flag is set a second
//! bincode value, the package's [`crate::Flow`], follows it. A package without a flow encodes
//! byte for byte as before the flow section existed.
//!
//! The key is derived from the secret *and* the cluster name, so a package made for one cluster
//! fails verification in another that shares the broker. [`Codec::decode`] checks the size and the
//! tag (in constant time) before it decompresses or deserialises a byte, and never allocates more
//! than the configured maximum for a decompressed payload.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::{Flow, TaskPackage};

type HmacSha256 = Hmac<Sha256>;

/// Envelope format version written by this codec.
pub const VERSION: u8 = 1;
/// Flag bit: the payload is LZ4-compressed with its length prepended.
pub const FLAG_COMPRESSED: u8 = 0b0000_0001;
/// Flag bit: a flow section ([`crate::Flow`]) follows the package in the payload.
pub const FLAG_FLOW: u8 = 0b0000_0010;
/// Every flag bit this codec knows.
const KNOWN_FLAGS: u8 = FLAG_COMPRESSED | FLAG_FLOW;
/// Length of the HMAC-SHA256 tag.
pub const TAG_LEN: usize = 32;
/// Bytes an envelope adds around its payload.
pub const OVERHEAD: usize = 2 + TAG_LEN;
/// Default cap on a (decompressed) payload: 16 MiB.
pub const DEFAULT_MAX_SIZE: usize = 16 * 1024 * 1024;
/// Payloads smaller than this are not worth compressing.
const COMPRESS_THRESHOLD: usize = 512;
const KDF_LABEL: &[u8] = b"qcluster package signing key v1\0";

/// Why a package could not be encoded or decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The tag does not match: tampered, or signed with another secret or cluster name.
    #[error("package signature does not verify (tampered, or another secret or cluster name)")]
    BadSignature,
    /// Shorter than the smallest possible envelope, or a compressed header cut short.
    #[error("package truncated: {len} bytes, at least {min} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes needed.
        min: usize,
    },
    /// A version byte this codec does not know.
    #[error("unknown package format version {0}")]
    UnknownVersion(u8),
    /// Flag bits this codec does not know.
    #[error("unknown package flags {0:#04x}")]
    UnknownFlags(u8),
    /// Over the size cap (before or after decompression).
    #[error("package of {size} bytes is over the limit of {limit} bytes")]
    TooLarge {
        /// The size found or announced.
        size: usize,
        /// The configured cap.
        limit: usize,
    },
    /// The verified payload does not decompress or deserialise into a package.
    #[error("package does not decode: {0}")]
    Decode(String),
    /// Encoding failed (should not happen for a well-formed package).
    #[error("package does not encode: {0}")]
    Encode(String),
    /// The text form is not valid base64url.
    #[error("package text is not base64url: {0}")]
    Base64(String),
    /// The secret is empty.
    #[error("the signing secret is empty")]
    EmptySecret,
}

/// Encodes, signs, verifies and decodes task packages for one cluster.
#[derive(Clone)]
pub struct Codec {
    mac: HmacSha256,
    compress: bool,
    max_size: usize,
}

impl fmt::Debug for Codec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Codec")
            .field("key", &"<redacted>")
            .field("compress", &self.compress)
            .field("max_size", &self.max_size)
            .finish()
    }
}

impl Codec {
    /// A codec whose key is derived from `secret` and `cluster` (the cluster name).
    pub fn new(secret: &[u8], cluster: &str) -> Result<Self, CodecError> {
        if secret.is_empty() {
            return Err(CodecError::EmptySecret);
        }
        let mut kdf =
            HmacSha256::new_from_slice(secret).map_err(|e| CodecError::Encode(e.to_string()))?;
        kdf.update(KDF_LABEL);
        kdf.update(cluster.as_bytes());
        let key = kdf.finalize().into_bytes();
        let mac =
            HmacSha256::new_from_slice(&key).map_err(|e| CodecError::Encode(e.to_string()))?;
        Ok(Self {
            mac,
            compress: false,
            max_size: DEFAULT_MAX_SIZE,
        })
    }

    /// Compress payloads (LZ4) when that makes them smaller.
    pub fn with_compression(mut self, on: bool) -> Self {
        self.compress = on;
        self
    }

    /// Caps a payload's size (decompressed) at `bytes`.
    /// Values above 4 GiB - 1 are lowered to it (the compressed length prefix is 32 bits).
    pub fn with_max_size(mut self, bytes: usize) -> Self {
        self.max_size = bytes.min(u32::MAX as usize);
        self
    }

    /// The payload size cap in bytes.
    pub fn max_size(&self) -> usize {
        self.max_size
    }

    /// Serialises, optionally compresses and signs a package.
    pub fn encode(&self, package: &TaskPackage) -> Result<Vec<u8>, CodecError> {
        let cfg = bincode::config::standard();
        let mut raw = bincode::serde::encode_to_vec(PackageOut::of(package), cfg)
            .map_err(|e| CodecError::Encode(e.to_string()))?;
        let mut flags = 0;
        if let Some(flow) = &package.flow {
            bincode::serde::encode_into_std_write(flow, &mut raw, cfg)
                .map_err(|e| CodecError::Encode(e.to_string()))?;
            flags |= FLAG_FLOW;
        }
        if raw.len() > self.max_size {
            return Err(CodecError::TooLarge {
                size: raw.len(),
                limit: self.max_size,
            });
        }
        let mut out = Vec::with_capacity(raw.len() + OVERHEAD + 4);
        out.push(VERSION);
        let compressed = if self.compress && raw.len() >= COMPRESS_THRESHOLD {
            let block = lz4_flex::block::compress(&raw);
            (block.len() + 4 < raw.len()).then_some(block)
        } else {
            None
        };
        match compressed {
            Some(block) => {
                out.push(flags | FLAG_COMPRESSED);
                out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
                out.extend_from_slice(&block);
            }
            None => {
                out.push(flags);
                out.extend_from_slice(&raw);
            }
        }
        let tag = self.tag(&out);
        out.extend_from_slice(&tag);
        Ok(out)
    }

    /// Verifies and decodes an envelope. Nothing is decompressed or deserialised before the size
    /// and the signature check out.
    pub fn decode(&self, envelope: &[u8]) -> Result<TaskPackage, CodecError> {
        let (flags, payload) = self.verify(envelope)?;
        decode_verified(flags, payload, self.max_size)
    }

    /// Checks size, version, flags and tag; returns the flags and the still-encoded payload.
    pub fn verify<'a>(&self, envelope: &'a [u8]) -> Result<(u8, &'a [u8]), CodecError> {
        if envelope.len() < OVERHEAD {
            return Err(CodecError::Truncated {
                len: envelope.len(),
                min: OVERHEAD,
            });
        }
        // A compressed payload is smaller than its original, plus its 4-byte length.
        let limit = self.max_size.saturating_add(OVERHEAD + 4);
        if envelope.len() > limit {
            return Err(CodecError::TooLarge {
                size: envelope.len(),
                limit,
            });
        }
        let (body, tag) = envelope.split_at(envelope.len() - TAG_LEN);
        let mut mac = self.mac.clone();
        mac.update(body);
        // `verify_slice` compares in constant time.
        mac.verify_slice(tag)
            .map_err(|_| CodecError::BadSignature)?;
        if body[0] != VERSION {
            return Err(CodecError::UnknownVersion(body[0]));
        }
        let flags = body[1];
        if flags & !KNOWN_FLAGS != 0 {
            return Err(CodecError::UnknownFlags(flags));
        }
        Ok((flags, &body[2..]))
    }

    /// [`Codec::encode`] as base64url text, for brokers that carry text only.
    pub fn encode_text(&self, package: &TaskPackage) -> Result<String, CodecError> {
        Ok(URL_SAFE_NO_PAD.encode(self.encode(package)?))
    }

    /// [`Codec::decode`] from base64url text. The text length is checked before decoding it.
    pub fn decode_text(&self, text: &str) -> Result<TaskPackage, CodecError> {
        let limit = (self.max_size.saturating_add(OVERHEAD + 4)).saturating_mul(4) / 3 + 4;
        if text.len() > limit {
            return Err(CodecError::TooLarge {
                size: text.len(),
                limit,
            });
        }
        let bytes = URL_SAFE_NO_PAD
            .decode(text.trim_end_matches('='))
            .map_err(|e| CodecError::Base64(e.to_string()))?;
        self.decode(&bytes)
    }

    /// Appends this codec's tag to an arbitrary `body` (`version | flags | payload`), with no
    /// checks at all. For tests that need a correctly signed but malformed envelope.
    #[doc(hidden)]
    pub fn sign_raw(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(body.len() + TAG_LEN);
        out.extend_from_slice(body);
        out.extend_from_slice(&self.tag(body));
        out
    }

    fn tag(&self, body: &[u8]) -> [u8; TAG_LEN] {
        let mut mac = self.mac.clone();
        mac.update(body);
        mac.finalize().into_bytes().into()
    }
}

/// Decompresses (within `max_size`) and deserialises a payload whose tag has been checked.
///
/// Public for the fuzz target; callers use [`Codec::decode`].
#[doc(hidden)]
pub fn decode_verified(
    flags: u8,
    payload: &[u8],
    max_size: usize,
) -> Result<TaskPackage, CodecError> {
    if flags & !KNOWN_FLAGS != 0 {
        return Err(CodecError::UnknownFlags(flags));
    }
    let flow = flags & FLAG_FLOW != 0;
    if flags & FLAG_COMPRESSED == 0 {
        return deserialize(payload, flow);
    }
    if payload.len() < 4 {
        return Err(CodecError::Truncated {
            len: payload.len(),
            min: 4,
        });
    }
    let (len, block) = payload.split_at(4);
    let size = u32::from_le_bytes([len[0], len[1], len[2], len[3]]) as usize;
    if size > max_size {
        // Refused on the announced size: nothing is allocated for it.
        return Err(CodecError::TooLarge {
            size,
            limit: max_size,
        });
    }
    let mut raw = vec![0u8; size];
    let written = lz4_flex::block::decompress_into(block, &mut raw)
        .map_err(|e| CodecError::Decode(format!("lz4: {e}")))?;
    if written != size {
        return Err(CodecError::Decode(format!(
            "lz4: {written} bytes decompressed, {size} announced"
        )));
    }
    deserialize(&raw, flow)
}

/// The package as the codec writes it, field for field as [`TaskPackage`] without its flow,
/// so that a package without a flow encodes exactly as it always did.
#[derive(serde::Serialize)]
struct PackageOut<'a> {
    id: crate::TaskId,
    func: &'a str,
    #[serde(with = "serde_bytes")]
    args: &'a [u8],
    #[serde(with = "serde_bytes")]
    kwargs: &'a [u8],
    options: &'a crate::TaskOptions,
    attempt: u32,
    enqueued_at_us: i64,
    trace: &'a Option<crate::TraceContext>,
}

impl<'a> PackageOut<'a> {
    fn of(p: &'a TaskPackage) -> Self {
        Self {
            id: p.id,
            func: &p.func,
            args: &p.args,
            kwargs: &p.kwargs,
            options: &p.options,
            attempt: p.attempt,
            enqueued_at_us: p.enqueued_at_us,
            trace: &p.trace,
        }
    }
}

/// Borrowed mirror of [`TaskPackage`], field for field (bincode is positional): every string and
/// byte field points into the verified input, so a length claim larger than the input fails
/// without allocating anything. Only what really is in the input is then copied out.
#[derive(serde::Deserialize)]
struct PackageRef<'a> {
    id: crate::TaskId,
    #[serde(borrow)]
    func: &'a str,
    #[serde(borrow, with = "serde_bytes")]
    args: &'a [u8],
    #[serde(borrow, with = "serde_bytes")]
    kwargs: &'a [u8],
    #[serde(borrow)]
    options: OptionsRef<'a>,
    attempt: u32,
    enqueued_at_us: i64,
    #[serde(borrow)]
    trace: Option<TraceRef<'a>>,
}

#[derive(serde::Deserialize)]
struct OptionsRef<'a> {
    timeout: Option<std::time::Duration>,
    max_attempts: Option<u32>,
    ack_failure: Option<bool>,
    #[serde(borrow)]
    hook: Option<&'a str>,
    #[serde(borrow)]
    group: Option<&'a str>,
    priority: i16,
    #[serde(borrow)]
    name: Option<&'a str>,
}

#[derive(serde::Deserialize)]
struct TraceRef<'a> {
    #[serde(borrow)]
    traceparent: &'a str,
    #[serde(borrow)]
    tracestate: Option<&'a str>,
}

/// Borrowed mirror of [`Flow`], variant for variant.
#[derive(serde::Deserialize)]
enum FlowRef<'a> {
    Hook { parent: crate::TaskId },
    Chain(#[serde(borrow)] ChainRef<'a>),
    Item(crate::ItemFlow),
}

#[derive(serde::Deserialize)]
struct ChainRef<'a> {
    chain: crate::TaskId,
    index: u32,
    #[serde(borrow)]
    links: Grow<LinkRef<'a>>,
    #[serde(borrow)]
    results: Grow<&'a str>,
}

#[derive(serde::Deserialize)]
struct LinkRef<'a> {
    id: crate::TaskId,
    #[serde(borrow)]
    func: &'a str,
    #[serde(borrow, with = "serde_bytes")]
    args: &'a [u8],
    #[serde(borrow)]
    options: OptionsRef<'a>,
}

/// A sequence that grows only with the elements really decoded: a length claim reserves
/// nothing, so a lying one fails when the input runs out, having allocated no more than the
/// input holds.
struct Grow<T>(Vec<T>);

impl<'de, T: serde::Deserialize<'de>> serde::Deserialize<'de> for Grow<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Seq<T>(std::marker::PhantomData<T>);
        impl<'de, T: serde::Deserialize<'de>> serde::de::Visitor<'de> for Seq<T> {
            type Value = Grow<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a sequence")
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut a: A,
            ) -> Result<Grow<T>, A::Error> {
                let mut v = Vec::new();
                while let Some(x) = a.next_element()? {
                    v.push(x);
                }
                Ok(Grow(v))
            }
        }
        d.deserialize_seq(Seq(std::marker::PhantomData))
    }
}

fn options(o: OptionsRef<'_>) -> crate::TaskOptions {
    let owned = |s: Option<&str>| s.map(str::to_owned);
    crate::TaskOptions {
        timeout: o.timeout,
        max_attempts: o.max_attempts,
        ack_failure: o.ack_failure,
        hook: owned(o.hook),
        group: owned(o.group),
        priority: o.priority,
        name: owned(o.name),
    }
}

fn flow(f: FlowRef<'_>) -> Flow {
    match f {
        FlowRef::Hook { parent } => Flow::Hook { parent },
        FlowRef::Item(i) => Flow::Item(i),
        FlowRef::Chain(c) => Flow::Chain(crate::ChainFlow {
            chain: c.chain,
            index: c.index,
            links: c
                .links
                .0
                .into_iter()
                .map(|l| crate::ChainLink {
                    id: l.id,
                    func: l.func.to_owned(),
                    args: l.args.to_vec(),
                    options: options(l.options),
                })
                .collect(),
            results: c.results.0.into_iter().map(str::to_owned).collect(),
        }),
    }
}

fn deserialize(bytes: &[u8], with_flow: bool) -> Result<TaskPackage, CodecError> {
    // The limit is a second fence: nothing in a package can legitimately claim more than 4 GiB.
    let cfg = bincode::config::standard().with_limit::<{ 1 << 32 }>();
    let (p, mut used): (PackageRef<'_>, usize) =
        bincode::serde::borrow_decode_from_slice(bytes, cfg)
            .map_err(|e| CodecError::Decode(e.to_string()))?;
    let mut found = None;
    if with_flow {
        let (f, n): (FlowRef<'_>, usize) =
            bincode::serde::borrow_decode_from_slice(&bytes[used..], cfg)
                .map_err(|e| CodecError::Decode(format!("flow section: {e}")))?;
        used += n;
        found = Some(flow(f));
    }
    if used != bytes.len() {
        return Err(CodecError::Decode(format!(
            "{} trailing bytes after the package",
            bytes.len() - used
        )));
    }
    let owned = |s: Option<&str>| s.map(str::to_owned);
    Ok(TaskPackage {
        id: p.id,
        func: p.func.to_owned(),
        args: p.args.to_vec(),
        kwargs: p.kwargs.to_vec(),
        options: options(p.options),
        attempt: p.attempt,
        enqueued_at_us: p.enqueued_at_us,
        trace: p.trace.map(|t| crate::TraceContext {
            traceparent: t.traceparent.to_owned(),
            tracestate: owned(t.tracestate),
        }),
        flow: found,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codec() -> Codec {
        Codec::new(b"s3cret", "cluster-a").unwrap()
    }

    #[test]
    fn round_trips_plain_and_compressed() {
        let mut p = TaskPackage::new("echo", br#"{"a":1}"#.to_vec());
        p.kwargs = vec![b'x'; 10_000];
        for c in [codec(), codec().with_compression(true)] {
            let env = c.encode(&p).unwrap();
            assert_eq!(c.decode(&env).unwrap(), p);
            assert_eq!(c.decode_text(&c.encode_text(&p).unwrap()).unwrap(), p);
        }
        let small = codec().encode(&p).unwrap().len();
        let packed = codec().with_compression(true).encode(&p).unwrap().len();
        assert!(packed < small / 10, "{packed} vs {small}");
    }

    #[test]
    fn other_cluster_or_secret_is_rejected() {
        let p = TaskPackage::new("echo", b"[]".to_vec());
        let env = codec().encode(&p).unwrap();
        let other_cluster = Codec::new(b"s3cret", "cluster-b").unwrap();
        assert_eq!(other_cluster.decode(&env), Err(CodecError::BadSignature));
        let other_secret = Codec::new(b"s3cres", "cluster-a").unwrap();
        assert_eq!(other_secret.decode(&env), Err(CodecError::BadSignature));
    }

    #[test]
    fn debug_hides_the_key() {
        let s = format!("{:?}", Codec::new(b"topsecretvalue", "c").unwrap());
        assert!(
            !s.contains("topsecretvalue") && s.contains("redacted"),
            "{s}"
        );
    }

    #[test]
    fn empty_secret_is_refused() {
        assert_eq!(Codec::new(b"", "c").unwrap_err(), CodecError::EmptySecret);
    }

    #[test]
    fn encode_refuses_oversize() {
        let p = TaskPackage::new("echo", vec![b'1'; 2000]);
        let e = codec().with_max_size(1000).encode(&p).unwrap_err();
        assert!(matches!(e, CodecError::TooLarge { limit: 1000, .. }), "{e}");
    }

    fn flows() -> Vec<Flow> {
        let parent = crate::TaskId::new();
        let link = |i: u64| crate::ChainLink {
            id: crate::TaskId::derived(parent, "link", i),
            func: "echo".into(),
            args: format!("[{i}]").into_bytes(),
            options: crate::TaskOptions {
                group: Some("g".into()),
                hook: Some("h".into()),
                ..Default::default()
            },
        };
        vec![
            Flow::Hook { parent },
            Flow::Chain(crate::ChainFlow {
                chain: parent,
                index: 1,
                links: (0..3).map(link).collect(),
                results: vec!["1".into()],
            }),
            Flow::Item(crate::ItemFlow {
                iter: parent,
                index: 7,
                total: 1000,
            }),
        ]
    }

    #[test]
    fn round_trips_every_flow_plain_and_compressed() {
        for flow in flows() {
            let mut p = TaskPackage::new("echo", br#"{"a":1}"#.to_vec());
            p.flow = Some(flow);
            for kwargs in [Vec::new(), vec![b'x'; 10_000]] {
                p.kwargs = kwargs;
                for c in [codec(), codec().with_compression(true)] {
                    let env = c.encode(&p).unwrap();
                    assert_ne!(env[1] & FLAG_FLOW, 0);
                    assert_eq!(c.decode(&env).unwrap(), p);
                    assert_eq!(c.decode_text(&c.encode_text(&p).unwrap()).unwrap(), p);
                }
            }
            let packed = codec().with_compression(true).encode(&p).unwrap();
            assert_eq!(packed[1], FLAG_FLOW | FLAG_COMPRESSED);
        }
    }

    /// The package as every earlier version wrote it.
    #[derive(serde::Serialize)]
    struct V1 {
        id: crate::TaskId,
        func: String,
        #[serde(with = "serde_bytes")]
        args: Vec<u8>,
        #[serde(with = "serde_bytes")]
        kwargs: Vec<u8>,
        options: crate::TaskOptions,
        attempt: u32,
        enqueued_at_us: i64,
        trace: Option<crate::TraceContext>,
    }

    #[test]
    fn a_package_without_flow_is_byte_identical_to_version_1() {
        let mut p = TaskPackage::new("echo", br#"{"a":1}"#.to_vec());
        p.options.hook = Some("h".into());
        p.trace = Some(crate::TraceContext {
            traceparent: "00-x".into(),
            tracestate: None,
        });
        let v1 = V1 {
            id: p.id,
            func: p.func.clone(),
            args: p.args.clone(),
            kwargs: p.kwargs.clone(),
            options: p.options.clone(),
            attempt: p.attempt,
            enqueued_at_us: p.enqueued_at_us,
            trace: p.trace.clone(),
        };
        let raw = bincode::serde::encode_to_vec(&v1, bincode::config::standard()).unwrap();
        let mut body = vec![VERSION, 0];
        body.extend_from_slice(&raw);
        assert_eq!(codec().encode(&p).unwrap(), codec().sign_raw(&body));
    }

    #[test]
    fn a_cut_or_missing_flow_section_is_refused() {
        let c = codec();
        for flow in flows() {
            let mut p = TaskPackage::new("echo", b"[]".to_vec());
            p.flow = Some(flow);
            let env = c.encode(&p).unwrap();
            let body = &env[..env.len() - TAG_LEN];
            // Every cut inside the flow section, down to none of it left.
            let mut bare = p.clone();
            bare.flow = None;
            let package_len = c.encode(&bare).unwrap().len() - OVERHEAD;
            for cut in 2 + package_len..body.len() {
                let e = c.decode(&c.sign_raw(&body[..cut])).unwrap_err();
                assert!(matches!(e, CodecError::Decode(_)), "cut at {cut}: {e}");
            }
            // A flow section where none is flagged is trailing bytes.
            let mut unflagged = body.to_vec();
            unflagged[1] = 0;
            let e = c.decode(&c.sign_raw(&unflagged)).unwrap_err();
            assert!(e.to_string().contains("trailing bytes"), "{e}");
        }
        let e = c.decode(&c.sign_raw(&[VERSION, 0b100])).unwrap_err();
        assert_eq!(e, CodecError::UnknownFlags(0b100));
    }

    #[test]
    fn a_lying_chain_length_is_refused() {
        // A chain claiming 2^40 links in a few bytes of input.
        let c = codec();
        let bare = TaskPackage::new("echo", b"[]".to_vec());
        let env = c.encode(&bare).unwrap();
        let mut body = env[..env.len() - TAG_LEN].to_vec();
        body[1] = FLAG_FLOW;
        let mut flow = vec![1u8]; // variant Chain
        flow.extend_from_slice(&[0u8; 16]); // chain id
        flow.push(0); // index
        flow.push(253); // u64 length follows
        flow.extend_from_slice(&(1u64 << 40).to_le_bytes());
        body.extend_from_slice(&flow);
        let e = c.decode(&c.sign_raw(&body)).unwrap_err();
        assert!(matches!(e, CodecError::Decode(_)), "{e}");
    }
}
