//! Counts of repeated fields read from a request body's protobuf wire format before it is
//! decoded, so that a body within the size cap cannot decode into a million small messages.
//!
//! A 2 MiB body of empty `Mutation`s (`12 00`, two bytes each) decodes into about a million
//! `pb::Mutation` structs: over a hundred MiB of memory for one request, before validation
//! refuses it for having more than 1000. The walk here reads only tags and lengths, allocates
//! nothing, and refuses such a body with the same text validation would give. A body it cannot
//! walk (not protobuf) is left to the decoder, whose error is the one answered.

use super::limits::*;
use super::KvError;

/// The protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

/// Fields of one message, as (field number, wire type, payload). Ends at the first malformed
/// byte: the decoder reports it.
struct Fields<'a> {
    buf: &'a [u8],
}

fn varint(buf: &mut &[u8]) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..70).step_by(7) {
        let (&byte, rest) = buf.split_first()?;
        *buf = rest;
        if shift == 63 && byte > 1 {
            return None;
        }
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

impl<'a> Iterator for Fields<'a> {
    type Item = (u64, u8, &'a [u8]);

    fn next(&mut self) -> Option<Self::Item> {
        let key = varint(&mut self.buf)?;
        let (field, wire) = (key >> 3, (key & 7) as u8);
        let start = self.buf;
        let len = match wire {
            VARINT => {
                varint(&mut self.buf)?;
                return Some((field, wire, &start[..start.len() - self.buf.len()]));
            }
            FIXED64 => 8,
            FIXED32 => 4,
            LEN => usize::try_from(varint(&mut self.buf)?).ok()?,
            // Groups are not in these messages; the decoder refuses them.
            _ => return None,
        };
        if self.buf.len() < len {
            self.buf = &[];
            return None;
        }
        let (payload, rest) = self.buf.split_at(len);
        self.buf = rest;
        Some((field, wire, payload))
    }
}

fn fields(buf: &[u8]) -> Fields<'_> {
    Fields { buf }
}

/// How many elements of the repeated field `number` a message holds, with `packed` scalars
/// counted element by element (as the decoder would append them).
fn count(buf: &[u8], number: u64, packed_scalar: bool) -> usize {
    fields(buf)
        .filter(|&(field, _, _)| field == number)
        .map(|(_, wire, payload)| {
            if packed_scalar && wire == LEN {
                let mut p = payload;
                let mut n = 0;
                while !p.is_empty() && varint(&mut p).is_some() {
                    n += 1;
                }
                n
            } else {
                1
            }
        })
        .sum()
}

/// `SnapshotRead`: at most 10 ranges.
pub fn snapshot_read(body: &[u8]) -> Result<(), KvError> {
    if count(body, 1, false) > MAX_READ_RANGES {
        return Err(KvError::new(
            "Too many read ranges requested in one read request.",
        ));
    }
    Ok(())
}

/// `Watch`: at most 10 keys.
pub fn watch(body: &[u8]) -> Result<(), KvError> {
    if count(body, 1, false) > MAX_WATCHED_KEYS {
        return Err(KvError::new(
            "Too many keys watched in a single watch request.",
        ));
    }
    Ok(())
}

/// `AtomicWrite`: at most 100 checks, 1000 mutations and enqueues, and per enqueue 10
/// dead-letter keys and 10 backoff intervals.
pub fn atomic_write(body: &[u8]) -> Result<(), KvError> {
    let (mut checks, mut mutations) = (0usize, 0usize);
    for (field, wire, payload) in fields(body) {
        match (field, wire) {
            (1, _) => checks += 1,
            (2, _) => mutations += 1,
            (3, _) => {
                mutations += 1;
                if wire == LEN {
                    enqueue(payload)?;
                }
            }
            _ => {}
        }
        if checks > MAX_CHECKS {
            return Err(KvError::new("Too many checks included in atomic write."));
        }
        if mutations > MAX_MUTATIONS {
            return Err(KvError::new(
                "Too many mutations / enqueues included in atomic write.",
            ));
        }
    }
    Ok(())
}

fn enqueue(buf: &[u8]) -> Result<(), KvError> {
    if count(buf, 3, false) > MAX_DEAD_LETTER_KEYS {
        return Err(KvError::new(
            "Too many dead letter keys for a single queue message.",
        ));
    }
    if count(buf, 4, true) > MAX_BACKOFF_INTERVALS {
        return Err(KvError::new(
            "Too many backoff intervals for a single queue message.",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto as pb;
    use bytes::Bytes;
    use prost::Message;

    fn mutation(i: usize) -> pb::Mutation {
        pb::Mutation {
            key: Bytes::from(format!("k{i}")),
            value: Some(pb::KvValue {
                data: Bytes::from_static(b"v"),
                encoding: 2,
            }),
            mutation_type: 1,
            ..Default::default()
        }
    }

    fn enqueue_with(keys: usize, backoffs: usize) -> pb::Enqueue {
        pb::Enqueue {
            payload: Bytes::from_static(b"p"),
            deadline_ms: 1,
            keys_if_undelivered: (0..keys).map(|i| Bytes::from(format!("d{i}"))).collect(),
            backoff_schedule: vec![1000; backoffs],
        }
    }

    #[test]
    fn counts_agree_with_the_decoder_at_and_past_each_limit() {
        let write = |checks: usize, mutations: usize, enqueues: Vec<pb::Enqueue>| {
            pb::AtomicWrite {
                checks: (0..checks)
                    .map(|i| pb::Check {
                        key: Bytes::from(format!("c{i}")),
                        versionstamp: Bytes::new(),
                    })
                    .collect(),
                mutations: (0..mutations).map(mutation).collect(),
                enqueues,
            }
            .encode_to_vec()
        };
        assert!(atomic_write(&write(100, 990, vec![enqueue_with(10, 10); 10])).is_ok());
        let text = |r: Result<(), KvError>| r.unwrap_err().message().to_string();
        assert_eq!(
            text(atomic_write(&write(101, 1, vec![]))),
            "Too many checks included in atomic write."
        );
        assert_eq!(
            text(atomic_write(&write(0, 991, vec![enqueue_with(0, 0); 10]))),
            "Too many mutations / enqueues included in atomic write."
        );
        assert_eq!(
            text(atomic_write(&write(0, 0, vec![enqueue_with(11, 0)]))),
            "Too many dead letter keys for a single queue message."
        );
        // Packed (prost's encoding) and unpacked backoff intervals are both counted.
        assert_eq!(
            text(atomic_write(&write(0, 0, vec![enqueue_with(0, 11)]))),
            "Too many backoff intervals for a single queue message."
        );
        let mut unpacked = Vec::new();
        for _ in 0..11 {
            unpacked.extend_from_slice(&[0x20, 0x01]);
        }
        let mut body = vec![0x1a, unpacked.len() as u8];
        body.extend_from_slice(&unpacked);
        assert_eq!(
            pb::AtomicWrite::decode(&body[..]).unwrap().enqueues[0]
                .backoff_schedule
                .len(),
            11
        );
        assert!(atomic_write(&body).is_err());

        let read = |n: usize| {
            pb::SnapshotRead {
                ranges: vec![pb::ReadRange::default(); n],
            }
            .encode_to_vec()
        };
        assert!(snapshot_read(&read(10)).is_ok());
        assert!(snapshot_read(&read(11)).is_err());
        let w = |n: usize| {
            pb::Watch {
                keys: vec![pb::WatchKey::default(); n],
            }
            .encode_to_vec()
        };
        assert!(watch(&w(10)).is_ok());
        assert!(watch(&w(11)).is_err());
    }

    /// The largest requests within the protocol's limits (SPEC §3) encode to less than
    /// `MIN_BODY_BYTES`, the least `--max-body-bytes`: every valid request fits under the cap.
    #[test]
    fn the_largest_valid_request_fits() {
        let now = 1_800_000_000_000i64;
        let checks: Vec<pb::Check> = (0..MAX_CHECKS)
            .map(|i| pb::Check {
                key: Bytes::from(vec![i as u8; MAX_READ_KEY_BYTES]),
                versionstamp: Bytes::from(vec![0xff; 10]),
            })
            .collect();
        let left = (MAX_TOTAL_WRITE_BYTES - MAX_CHECKS * MAX_READ_KEY_BYTES) / MAX_MUTATIONS;
        // Enqueues carry the most per counted byte: ten dead-letter keys, ten backoffs.
        let enqueues = (0..MAX_MUTATIONS)
            .map(|i| {
                let backoffs = 4 * MAX_BACKOFF_INTERVALS;
                let key_len = (left - backoffs - 4) / MAX_DEAD_LETTER_KEYS;
                pb::Enqueue {
                    payload: Bytes::from(vec![1; left - backoffs - key_len * 10]),
                    deadline_ms: now + MAX_QUEUE_DELAY_MS,
                    keys_if_undelivered: (0..MAX_DEAD_LETTER_KEYS)
                        .map(|j| Bytes::from([i as u8, j as u8].repeat(key_len / 2)))
                        .collect(),
                    backoff_schedule: vec![MAX_BACKOFF_MS; MAX_BACKOFF_INTERVALS],
                }
            })
            .collect();
        // Mutations: a key and a value each, and an expiry.
        let mutations = (0..MAX_MUTATIONS)
            .map(|i| pb::Mutation {
                key: Bytes::from(format!("{i:04}").repeat(left / 8)),
                value: Some(pb::KvValue {
                    data: Bytes::from(vec![1; left - left / 8 * 4]),
                    encoding: 1,
                }),
                mutation_type: 1,
                expire_at_ms: now + MAX_QUEUE_DELAY_MS,
                ..Default::default()
            })
            .collect();
        // Unpacked backoffs take one byte more each than prost's packed encoding.
        let unpacked_slack = MAX_MUTATIONS * MAX_BACKOFF_INTERVALS;
        for (name, write) in [
            (
                "enqueues",
                pb::AtomicWrite {
                    checks: checks.clone(),
                    mutations: vec![],
                    enqueues,
                },
            ),
            (
                "mutations",
                pb::AtomicWrite {
                    checks,
                    mutations,
                    enqueues: vec![],
                },
            ),
        ] {
            let body = write.encode_to_vec();
            assert!(atomic_write(&body).is_ok());
            super::super::validate::atomic_write(write, now)
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            let largest = body.len() + unpacked_slack;
            println!("the largest atomic write of {name}: {} bytes", body.len());
            assert!(largest < MIN_BODY_BYTES, "{name}: {largest}");
        }
        let read = pb::SnapshotRead {
            ranges: (0..MAX_READ_RANGES)
                .map(|_| pb::ReadRange {
                    start: Bytes::from(vec![0; MAX_READ_KEY_BYTES]),
                    end: Bytes::from(vec![0xff; MAX_READ_KEY_BYTES]),
                    limit: 100,
                    reverse: true,
                })
                .collect(),
        };
        let read = read.encode_to_vec();
        println!("the largest snapshot read: {} bytes", read.len());
        assert!(read.len() < MIN_BODY_BYTES);
    }

    #[test]
    fn a_hostile_body_of_empty_messages_is_refused_without_decoding() {
        // 1 MiB of empty mutations: half a million `12 00`.
        let body = [0x12, 0x00].repeat(512 * 1024);
        assert!(atomic_write(&body).is_err());
        let ranges = [0x0a, 0x00].repeat(512 * 1024);
        assert!(snapshot_read(&ranges).is_err());
        // Not protobuf: left to the decoder.
        assert!(atomic_write(&[0xff; 64]).is_ok());
        assert!(atomic_write(&[0x12, 0x80]).is_ok());
    }
}
