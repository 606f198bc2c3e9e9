//! Valid requests of every route, and the mutations of their bodies.
//!
//! Every key a valid request names lies under `["fuzz"]`, the prefix of the fuzzed tokens, so
//! that most requests get past the access checks to the handlers; mutations then move them off.

use bytes::Bytes;
use denokv::kv::key::{encode, prefix_range, KeyPart};
use denokv::proto as pb;
use prost::Message;
use rand::rngs::StdRng;
use rand::Rng;

/// The four routes of KV Connect (SPEC §1).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Route {
    Metadata,
    SnapshotRead,
    AtomicWrite,
    Watch,
}

impl Route {
    pub const ALL: [Route; 4] = [
        Route::Metadata,
        Route::SnapshotRead,
        Route::AtomicWrite,
        Route::Watch,
    ];

    pub fn path(self) -> &'static str {
        match self {
            Route::Metadata => "/",
            Route::SnapshotRead => "/v2/snapshot_read",
            Route::AtomicWrite => "/v2/atomic_write",
            Route::Watch => "/v2/watch",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Route::Metadata => "application/json",
            _ => "application/x-protobuf",
        }
    }
}

/// The part every fuzzed key starts with; the fuzzed tokens may touch nothing else.
pub const FUZZ_PREFIX: &str = "fuzz";

/// `["fuzz", part]`.
pub fn fuzz_key(part: KeyPart) -> Vec<u8> {
    encode(&[KeyPart::String(FUZZ_PREFIX.into()), part])
}

/// One of a small set of keys under the fuzz prefix (few, so the database stays small).
fn key(rng: &mut StdRng) -> Bytes {
    let part = match rng.random_range(0..6) {
        0 => KeyPart::String(format!("k{}", rng.random_range(0..40))),
        1 => KeyPart::Bytes(vec![rng.random_range(0..4); rng.random_range(0..4)]),
        2 => KeyPart::Float(rng.random_range(-3..3) as f64 / 2.0),
        3 => KeyPart::True,
        4 => KeyPart::Int(rng.random_range(-1000..1000) as i128),
        _ => KeyPart::Int(rng.random_range(0..40)),
    };
    Bytes::from(fuzz_key(part))
}

fn v8_string(text: &str) -> Vec<u8> {
    let mut out = vec![0xFF, 0x0F, b'"'];
    push_varint(&mut out, text.len() as u64);
    out.extend_from_slice(text.as_bytes());
    out
}

/// A V8 BigInt of one 64-bit digit.
fn v8_bigint(n: i64) -> Vec<u8> {
    let mut out = vec![0xFF, 0x0F, b'Z', (8 << 1) | (n < 0) as u8];
    out.extend_from_slice(&n.unsigned_abs().to_le_bytes());
    out
}

pub fn push_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn value(rng: &mut StdRng) -> pb::KvValue {
    let (data, encoding) = match rng.random_range(0..4) {
        0 => {
            // Mostly small; now and then up to the 64 KiB limit (and one byte past it).
            let len = match rng.random_range(0..200) {
                0 => rng.random_range(60_000..=65_537),
                _ => rng.random_range(0..64),
            };
            (vec![rng.random(); len], pb::ValueEncoding::VeBytes)
        }
        1 => (
            v8_string(&"v".repeat(rng.random_range(0..20))),
            pb::ValueEncoding::VeV8,
        ),
        2 => (
            rng.random::<u64>().to_le_bytes().to_vec(),
            pb::ValueEncoding::VeLe64,
        ),
        _ => (
            v8_bigint(rng.random_range(-50..50)),
            pb::ValueEncoding::VeV8,
        ),
    };
    pb::KvValue {
        data: Bytes::from(data),
        encoding: encoding as i32,
    }
}

fn versionstamp(rng: &mut StdRng) -> Bytes {
    match rng.random_range(0..3) {
        0 => Bytes::new(),
        1 => Bytes::from(vec![0u8; 10]),
        _ => Bytes::from((0..10).map(|_| rng.random_range(0..2)).collect::<Vec<u8>>()),
    }
}

fn mutation(rng: &mut StdRng, now_ms: i64) -> pb::Mutation {
    use pb::MutationType as T;
    let kind = match rng.random_range(0..7) {
        0 | 1 => T::MSet,
        2 => T::MDelete,
        3 => T::MSum,
        4 => T::MMax,
        5 => T::MMin,
        _ => T::MSetSuffixVersionstampedKey,
    };
    let mut m = pb::Mutation {
        key: key(rng),
        mutation_type: kind as i32,
        ..Default::default()
    };
    match kind {
        T::MDelete => {}
        T::MSum | T::MMax | T::MMin if rng.random_bool(0.7) => {
            m.value = Some(pb::KvValue {
                data: Bytes::copy_from_slice(&rng.random_range(0u64..100).to_le_bytes()),
                encoding: pb::ValueEncoding::VeLe64 as i32,
            });
        }
        T::MSum => {
            m.value = Some(pb::KvValue {
                data: Bytes::from(v8_bigint(rng.random_range(-5..5))),
                encoding: pb::ValueEncoding::VeV8 as i32,
            });
            if rng.random_bool(0.5) {
                m.sum_min = Bytes::from(v8_bigint(-100));
                m.sum_max = Bytes::from(v8_bigint(100));
                m.sum_clamp = rng.random();
            }
        }
        _ => m.value = Some(value(rng)),
    }
    if rng.random_ratio(1, 10) {
        m.expire_at_ms = now_ms + rng.random_range(-1000..100_000);
    }
    m
}

/// A valid body of `route` (one the server accepts, for the fuzzed token).
pub fn valid_body(route: Route, rng: &mut StdRng, now_ms: i64) -> Vec<u8> {
    match route {
        Route::Metadata => match rng.random_range(0..4) {
            0 => br#"{"supportedVersions":[2]}"#.to_vec(),
            1 => br#"{"supportedVersions":[1,2,3],"extra":{"a":[null,true]}}"#.to_vec(),
            _ => br#"{"supportedVersions":[2,3]}"#.to_vec(),
        },
        Route::SnapshotRead => {
            let ranges = (0..rng.random_range(1..=3))
                .map(|_| {
                    if rng.random_bool(0.5) {
                        let k = key(rng);
                        let mut end = k.to_vec();
                        end.push(0);
                        pb::ReadRange {
                            start: k,
                            end: Bytes::from(end),
                            limit: 1,
                            reverse: false,
                        }
                    } else {
                        let (start, end) =
                            prefix_range(&encode(&[KeyPart::String(FUZZ_PREFIX.into())]));
                        pb::ReadRange {
                            start: Bytes::from(start),
                            end: Bytes::from(end),
                            limit: rng.random_range(1..=100),
                            reverse: rng.random(),
                        }
                    }
                })
                .collect();
            pb::SnapshotRead { ranges }.encode_to_vec()
        }
        Route::AtomicWrite => {
            let checks = (0..rng.random_range(0..=2))
                .map(|_| pb::Check {
                    key: key(rng),
                    versionstamp: versionstamp(rng),
                })
                .collect();
            let mutations = (0..rng.random_range(0..=3))
                .map(|_| mutation(rng, now_ms))
                .collect();
            let n = if rng.random_ratio(1, 4) { 1 } else { 0 };
            let enqueues = (0..n)
                .map(|_| pb::Enqueue {
                    payload: Bytes::from(v8_string("job")),
                    // Far enough ahead that no message is delivered during a run.
                    deadline_ms: now_ms + 86_400_000,
                    keys_if_undelivered: vec![key(rng)],
                    backoff_schedule: vec![100, 1000],
                })
                .collect();
            pb::AtomicWrite {
                checks,
                mutations,
                enqueues,
            }
            .encode_to_vec()
        }
        Route::Watch => pb::Watch {
            keys: (0..rng.random_range(1..=3))
                .map(|_| pb::WatchKey { key: key(rng) })
                .collect(),
        }
        .encode_to_vec(),
    }
}

/// Interesting bytes to write over or insert: protobuf tags and lengths, JSON tokens, key tags.
const TOKENS: &[&[u8]] = &[
    b"\x00",
    b"\xff",
    b"\x0a",
    b"\x12",
    b"\x1a",
    b"\x08",
    b"\x0f",
    b"\x7f",
    b"\x80",
    b"\xff\xff\xff\xff\x0f",
    b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",
    b"\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80\x00",
    b"\x0a\x00",
    b"\x12\x00",
    b"\x02fuzz\x00",
    b"\x02sentinel\x00",
    b"\x21",
    b"\x14",
    b"\x01",
    b"{",
    b"}",
    b"[",
    b"]",
    b"\"",
    b",",
    b":",
    b"null",
    b"1e999",
    b"-0",
    b"\\u0000",
    b"\"supportedVersions\"",
    b"18446744073709551616",
];

/// Mutates a body: byte flips, truncation, insertion, splicing with another valid body,
/// huge varints, repeated fields, deep nesting. `other` is a valid body of any route.
pub fn mutate_body(body: &mut Vec<u8>, other: &[u8], rng: &mut StdRng) {
    let rounds = match rng.random_range(0..10) {
        0..=5 => 1,
        6..=8 => rng.random_range(2..5),
        _ => rng.random_range(5..20),
    };
    for _ in 0..rounds {
        mutate_once(body, other, rng);
    }
}

fn mutate_once(body: &mut Vec<u8>, other: &[u8], rng: &mut StdRng) {
    let at = |rng: &mut StdRng, len: usize| rng.random_range(0..=len);
    match rng.random_range(0..14) {
        0 if !body.is_empty() => {
            let i = rng.random_range(0..body.len());
            body[i] ^= 1 << rng.random_range(0..8);
        }
        1 if !body.is_empty() => {
            let i = rng.random_range(0..body.len());
            body[i] = rng.random();
        }
        2 => {
            let n = at(rng, body.len());
            body.truncate(n);
        }
        3 => {
            let t = TOKENS[rng.random_range(0..TOKENS.len())];
            let i = at(rng, body.len());
            body.splice(i..i, t.iter().copied());
        }
        4 if !body.is_empty() => {
            // Overwrite with a token.
            let t = TOKENS[rng.random_range(0..TOKENS.len())];
            let i = rng.random_range(0..body.len());
            let end = (i + t.len()).min(body.len());
            body.splice(i..end, t.iter().copied());
        }
        5 => {
            // Splice: our head with the other's tail.
            let i = at(rng, body.len());
            let j = at(rng, other.len());
            body.truncate(i);
            body.extend_from_slice(&other[j..]);
        }
        6 if !body.is_empty() => {
            // Repeat a slice (a repeated field, when it is one), up to many times.
            let i = rng.random_range(0..body.len());
            let j = rng.random_range(i..=body.len().min(i + 64));
            let piece = body[i..j].to_vec();
            let times = if rng.random_ratio(1, 8) {
                rng.random_range(100..3000)
            } else {
                rng.random_range(1..5)
            };
            body.splice(j..j, piece.repeat(times));
        }
        7 => {
            // A field with a huge or overlong length varint.
            let mut f = vec![[0x0a, 0x12, 0x1a, 0x22, 0x08][rng.random_range(0..5)]];
            push_varint(
                &mut f,
                [u64::MAX, 1 << 31, 1 << 40, 0x7fff_ffff][rng.random_range(0..4)],
            );
            let i = at(rng, body.len());
            body.splice(i..i, f);
        }
        8 if !body.is_empty() => {
            // Delete a slice.
            let i = rng.random_range(0..body.len());
            let j = rng.random_range(i..=body.len().min(i + 32));
            body.drain(i..j);
        }
        9 => {
            // Deep nesting: JSON arrays, or protobuf groups / nested length-delimited fields.
            let depth = rng.random_range(10..20_000);
            let (open, close): (&[u8], &[u8]) = match rng.random_range(0..3) {
                0 => (b"[", b"]"),
                1 => (b"{\"a\":", b"}"),
                _ => (b"\x0b", b"\x0c"),
            };
            let i = at(rng, body.len());
            let mut nest = open.repeat(depth);
            if rng.random_bool(0.5) {
                nest.extend(close.repeat(depth));
            }
            body.splice(i..i, nest);
        }
        10 => {
            // Random bytes.
            let n = rng.random_range(1..64);
            let i = at(rng, body.len());
            body.splice(i..i, (0..n).map(|_| rng.random::<u8>()));
        }
        11 if !body.is_empty() => {
            // Swap two bytes.
            let i = rng.random_range(0..body.len());
            let j = rng.random_range(0..body.len());
            body.swap(i, j);
        }
        12 => {
            // Append another valid body: repeated top-level fields merge in protobuf.
            body.extend_from_slice(other);
        }
        _ => {
            // An arithmetic nudge of a byte (lengths off by one).
            let i = rng.random_range(0..body.len().max(1));
            if let Some(b) = body.get_mut(i) {
                *b = b.wrapping_add([1, 255, 2, 254][rng.random_range(0..4)]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn valid_bodies_decode_and_mutations_stay_bounded() {
        let mut rng = StdRng::seed_from_u64(3);
        for i in 0..2000 {
            let route = Route::ALL[i % 4];
            let body = valid_body(route, &mut rng, 1_700_000_000_000);
            match route {
                Route::Metadata => {
                    serde_json::from_slice::<serde_json::Value>(&body).unwrap();
                }
                Route::SnapshotRead => {
                    pb::SnapshotRead::decode(&body[..]).unwrap();
                }
                Route::AtomicWrite => {
                    pb::AtomicWrite::decode(&body[..]).unwrap();
                }
                Route::Watch => {
                    pb::Watch::decode(&body[..]).unwrap();
                }
            }
            let mut m = body.clone();
            mutate_body(&mut m, &body, &mut rng);
            // Repetition and nesting can grow a body, but not without bound.
            assert!(m.len() < 8 << 20, "{}", m.len());
        }
    }
}
