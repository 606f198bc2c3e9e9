//! Turns decoded protobuf requests into the validated model, in upstream's order and with its
//! texts (SPEC §2.4.1, §3), fixing the defects listed in SPEC §10.

use bytes::Bytes;

use super::limits::*;
use super::model::{AtomicWrite, Check, Enqueue, Mutation, MutationKind, ReadRange};
use super::v8sum::V8Sum;
use super::value::{Encoding, Le64Op, Value};
use super::versionstamp::Versionstamp;
use super::KvError;
use crate::proto as pb;

fn key_too_large() -> KvError {
    KvError::new("A key exceeds the key size limit.")
}

fn value_too_large() -> KvError {
    KvError::new("A value exceeds the value size limit.")
}

fn invalid_mutation() -> KvError {
    KvError::new("Invalid mutation kind or arguments.")
}

/// Validates a snapshot read (SPEC §3).
pub fn snapshot_read(req: pb::SnapshotRead) -> Result<Vec<ReadRange>, KvError> {
    if req.ranges.len() > MAX_READ_RANGES {
        return Err(KvError::new(
            "Too many read ranges requested in one read request.",
        ));
    }
    let mut total: u64 = 0;
    let mut out = Vec::with_capacity(req.ranges.len());
    for r in req.ranges {
        if r.start.len() > MAX_READ_KEY_BYTES || r.end.len() > MAX_READ_KEY_BYTES {
            return Err(key_too_large());
        }
        if r.limit <= 0 {
            return Err(KvError::new(
                "The read range limit of the snapshot read request is invalid.",
            ));
        }
        total += r.limit as u64;
        out.push(ReadRange {
            start: r.start,
            end: r.end,
            limit: r.limit as u32,
            reverse: r.reverse,
        });
    }
    if total > MAX_READ_ENTRIES {
        return Err(KvError::new(
            "The total number of entries requested across read ranges in the read request is too large.",
        ));
    }
    Ok(out)
}

/// Validates a watch request; returns its keys in request order.
pub fn watch(req: pb::Watch) -> Result<Vec<Bytes>, KvError> {
    if req.keys.len() > MAX_WATCHED_KEYS {
        return Err(KvError::new(
            "Too many keys watched in a single watch request.",
        ));
    }
    req.keys
        .into_iter()
        .map(|k| {
            if k.key.len() > MAX_READ_KEY_BYTES {
                Err(key_too_large())
            } else {
                Ok(k.key)
            }
        })
        .collect()
}

/// Validates an atomic write before any database access. `now_ms` bounds enqueue deadlines.
pub fn atomic_write(req: pb::AtomicWrite, now_ms: i64) -> Result<AtomicWrite, KvError> {
    if req.checks.len() > MAX_CHECKS {
        return Err(KvError::new("Too many checks included in atomic write."));
    }
    if req.mutations.len() + req.enqueues.len() > MAX_MUTATIONS {
        return Err(KvError::new(
            "Too many mutations / enqueues included in atomic write.",
        ));
    }
    let mut total = 0usize;

    let mut checks = Vec::with_capacity(req.checks.len());
    for c in req.checks {
        if c.key.len() > MAX_READ_KEY_BYTES {
            return Err(key_too_large());
        }
        let versionstamp = match c.versionstamp.len() {
            0 => None,
            Versionstamp::LEN => Versionstamp::from_slice(&c.versionstamp),
            _ => return Err(KvError::new("Invalid versionstamp.")),
        };
        total += c.key.len();
        checks.push(Check {
            key: c.key,
            versionstamp,
        });
    }

    let mut mutations = Vec::with_capacity(req.mutations.len());
    for m in req.mutations {
        total += m.key.len() + m.value.as_ref().map_or(0, |v| v.data.len());
        mutations.push(mutation(m)?);
    }

    let mut enqueues = Vec::with_capacity(req.enqueues.len());
    for e in req.enqueues {
        total += e.payload.len()
            + e.keys_if_undelivered.iter().map(|k| k.len()).sum::<usize>()
            + 4 * e.backoff_schedule.len();
        enqueues.push(enqueue(e, now_ms)?);
    }

    if total > MAX_TOTAL_WRITE_BYTES {
        return Err(KvError::new(
            "The total size of the atomic write is too large.",
        ));
    }
    Ok(AtomicWrite {
        checks,
        mutations,
        enqueues,
    })
}

fn mutation(m: pb::Mutation) -> Result<Mutation, KvError> {
    if m.key.len() > MAX_WRITE_KEY_BYTES {
        return Err(key_too_large());
    }
    if m.value
        .as_ref()
        .is_some_and(|v| v.data.len() > MAX_VALUE_BYTES)
    {
        return Err(value_too_large());
    }
    let ty = pb::MutationType::try_from(m.mutation_type).unwrap_or(pb::MutationType::MUnspecified);
    let kind = match ty {
        pb::MutationType::MDelete => MutationKind::Delete,
        pb::MutationType::MUnspecified => return Err(invalid_mutation()),
        _ => {
            let value = value(m.value.ok_or_else(invalid_mutation)?)?;
            match ty {
                pb::MutationType::MSet => MutationKind::Set(value),
                pb::MutationType::MSetSuffixVersionstampedKey => {
                    MutationKind::SetSuffixVersionstamped(value)
                }
                pb::MutationType::MSum => match value.encoding {
                    Encoding::Le64 => MutationKind::Le64(Le64Op::Sum, value.as_u64().unwrap()),
                    Encoding::V8 => MutationKind::V8Sum(V8Sum::parse(
                        &value.data,
                        &m.sum_min,
                        &m.sum_max,
                        m.sum_clamp,
                    )?),
                    Encoding::Bytes => {
                        return Err(KvError::new(
                            "Some of the parameters are not valid V8 values",
                        ))
                    }
                },
                pb::MutationType::MMin | pb::MutationType::MMax => {
                    let op = if ty == pb::MutationType::MMin {
                        Le64Op::Min
                    } else {
                        Le64Op::Max
                    };
                    let n = value.as_u64().ok_or_else(|| {
                        KvError::new(format!(
                            "Failed to perform '{}' mutation on a non-U64 operand",
                            op.name()
                        ))
                    })?;
                    MutationKind::Le64(op, n)
                }
                pb::MutationType::MDelete | pb::MutationType::MUnspecified => unreachable!(),
            }
        }
    };
    let expire_at_ms = match m.expire_at_ms {
        i64::MIN..=-2 => return Err(KvError::new("Invalid mutation expire at.")),
        -1 | 0 => None,
        t => Some(t),
    };
    Ok(Mutation {
        key: m.key,
        kind,
        expire_at_ms,
    })
}

/// Decodes a mutation's value. Unknown encodings and LE64 values that are not 8 bytes are 400s
/// (upstream answers 500 or crashes: SPEC §10 D2, D3).
fn value(v: pb::KvValue) -> Result<Value, KvError> {
    let encoding = Encoding::from_number(v.encoding as i64)?;
    if encoding == Encoding::Le64 && v.data.len() != 8 {
        return Err(KvError::new(
            "A Deno.KvU64 (LE64) value must be exactly 8 bytes.",
        ));
    }
    Ok(Value {
        data: v.data,
        encoding,
    })
}

fn enqueue(e: pb::Enqueue, now_ms: i64) -> Result<Enqueue, KvError> {
    if e.payload.len() > MAX_VALUE_BYTES {
        return Err(value_too_large());
    }
    if e.keys_if_undelivered.len() > MAX_DEAD_LETTER_KEYS {
        return Err(KvError::new(
            "Too many dead letter keys for a single queue message.",
        ));
    }
    if e.keys_if_undelivered
        .iter()
        .any(|k| k.len() > MAX_WRITE_KEY_BYTES)
    {
        return Err(key_too_large());
    }
    if e.backoff_schedule.len() > MAX_BACKOFF_INTERVALS {
        return Err(KvError::new(
            "Too many backoff intervals for a single queue message.",
        ));
    }
    if e.backoff_schedule.iter().any(|&ms| ms > MAX_BACKOFF_MS) {
        return Err(KvError::new(
            "A backoff interval exceeds the maximum allowed backoff interval.",
        ));
    }
    // Upstream rejects past deadlines and accepts any future one (D5); this is the intended rule.
    if e.deadline_ms < 0 || e.deadline_ms > now_ms.saturating_add(MAX_QUEUE_DELAY_MS) {
        return Err(KvError::new("Invalid mutation enqueue deadline."));
    }
    Ok(Enqueue {
        payload: e.payload,
        deadline_ms: e.deadline_ms,
        keys_if_undelivered: e.keys_if_undelivered,
        backoff_schedule: e.backoff_schedule,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn set(key: &[u8], data: &[u8], encoding: pb::ValueEncoding) -> pb::Mutation {
        pb::Mutation {
            key: Bytes::copy_from_slice(key),
            value: Some(pb::KvValue {
                data: Bytes::copy_from_slice(data),
                encoding: encoding as i32,
            }),
            mutation_type: pb::MutationType::MSet as i32,
            ..Default::default()
        }
    }

    fn write_err(w: pb::AtomicWrite) -> String {
        atomic_write(w, NOW).unwrap_err().message().to_string()
    }

    fn one(m: pb::Mutation) -> pb::AtomicWrite {
        pb::AtomicWrite {
            mutations: vec![m],
            ..Default::default()
        }
    }

    #[test]
    fn read_limits() {
        let range = |limit| pb::ReadRange {
            start: Bytes::new(),
            end: Bytes::from_static(b"\xff"),
            limit,
            reverse: false,
        };
        let too_many = pb::SnapshotRead {
            ranges: vec![range(1); 11],
        };
        assert_eq!(
            snapshot_read(too_many).unwrap_err().message(),
            "Too many read ranges requested in one read request."
        );
        let zero = pb::SnapshotRead {
            ranges: vec![range(0)],
        };
        assert_eq!(
            snapshot_read(zero).unwrap_err().message(),
            "The read range limit of the snapshot read request is invalid."
        );
        let over = pb::SnapshotRead {
            ranges: vec![range(500), range(501)],
        };
        assert!(snapshot_read(over)
            .unwrap_err()
            .message()
            .starts_with("The total number of entries"));
        assert_eq!(
            snapshot_read(pb::SnapshotRead {
                ranges: vec![range(500), range(500)]
            })
            .unwrap()
            .len(),
            2
        );
        let big_key = pb::ReadRange {
            start: Bytes::from(vec![1; 2050]),
            ..range(1)
        };
        assert_eq!(
            snapshot_read(pb::SnapshotRead {
                ranges: vec![big_key]
            })
            .unwrap_err()
            .message(),
            "A key exceeds the key size limit."
        );
        let ok_key = pb::ReadRange {
            start: Bytes::from(vec![1; 2049]),
            ..range(1)
        };
        assert!(snapshot_read(pb::SnapshotRead {
            ranges: vec![ok_key]
        })
        .is_ok());
    }

    #[test]
    fn watch_limits_accept_2049_byte_keys() {
        let key = |n| pb::WatchKey {
            key: Bytes::from(vec![2; n]),
        };
        assert!(watch(pb::Watch {
            keys: vec![key(2049)]
        })
        .is_ok());
        assert_eq!(
            watch(pb::Watch {
                keys: vec![key(2050)]
            })
            .unwrap_err()
            .message(),
            "A key exceeds the key size limit."
        );
        assert_eq!(
            watch(pb::Watch {
                keys: vec![key(1); 11]
            })
            .unwrap_err()
            .message(),
            "Too many keys watched in a single watch request."
        );
    }

    #[test]
    fn up_to_100_checks_are_accepted() {
        let check = pb::Check {
            key: Bytes::from_static(b"\x02a\x00"),
            versionstamp: Bytes::new(),
        };
        let w = |n| pb::AtomicWrite {
            checks: vec![check.clone(); n],
            ..Default::default()
        };
        assert_eq!(atomic_write(w(100), NOW).unwrap().checks.len(), 100);
        assert_eq!(
            write_err(w(101)),
            "Too many checks included in atomic write."
        );
    }

    #[test]
    fn check_versionstamp_length() {
        let w = pb::AtomicWrite {
            checks: vec![pb::Check {
                key: Bytes::from_static(b"a"),
                versionstamp: Bytes::from_static(b"123"),
            }],
            ..Default::default()
        };
        assert_eq!(write_err(w), "Invalid versionstamp.");
    }

    #[test]
    fn mutation_count_includes_enqueues() {
        let e = pb::Enqueue {
            payload: Bytes::from_static(b"\xff\x0f\x49\x02"),
            deadline_ms: NOW,
            ..Default::default()
        };
        let w = pb::AtomicWrite {
            mutations: vec![set(b"a", b"x", pb::ValueEncoding::VeBytes); 600],
            enqueues: vec![e; 401],
            ..Default::default()
        };
        assert_eq!(
            write_err(w),
            "Too many mutations / enqueues included in atomic write."
        );
    }

    #[test]
    fn key_and_value_sizes() {
        assert_eq!(
            write_err(one(set(&[1; 2049], b"x", pb::ValueEncoding::VeBytes))),
            "A key exceeds the key size limit."
        );
        assert!(atomic_write(one(set(&[1; 2048], b"x", pb::ValueEncoding::VeBytes)), NOW).is_ok());
        assert_eq!(
            write_err(one(set(b"a", &[0; 65537], pb::ValueEncoding::VeBytes))),
            "A value exceeds the value size limit."
        );
        assert!(atomic_write(one(set(b"a", &[0; 65536], pb::ValueEncoding::VeBytes)), NOW).is_ok());
    }

    #[test]
    fn total_size_limit() {
        let m = set(&[1; 1000], &[0; 60000], pb::ValueEncoding::VeBytes);
        let w = pb::AtomicWrite {
            mutations: vec![m; 14],
            ..Default::default()
        };
        assert_eq!(
            write_err(w),
            "The total size of the atomic write is too large."
        );
    }

    #[test]
    fn bad_encodings_are_400s_not_500s() {
        assert_eq!(
            write_err(one(set(b"a", b"x", pb::ValueEncoding::VeUnspecified))),
            "The value encoding 0 is unknown."
        );
        let mut m = set(b"a", b"x", pb::ValueEncoding::VeBytes);
        m.value.as_mut().unwrap().encoding = 42;
        assert_eq!(write_err(one(m)), "The value encoding 42 is unknown.");
        assert_eq!(
            write_err(one(set(b"a", b"1234567", pb::ValueEncoding::VeLe64))),
            "A Deno.KvU64 (LE64) value must be exactly 8 bytes."
        );
    }

    #[test]
    fn mutation_kinds() {
        let mut m = set(b"a", b"x", pb::ValueEncoding::VeBytes);
        m.mutation_type = 0;
        assert_eq!(
            write_err(one(m.clone())),
            "Invalid mutation kind or arguments."
        );
        m.mutation_type = 7;
        assert_eq!(
            write_err(one(m.clone())),
            "Invalid mutation kind or arguments."
        );
        m.mutation_type = pb::MutationType::MSet as i32;
        m.value = None;
        assert_eq!(
            write_err(one(m.clone())),
            "Invalid mutation kind or arguments."
        );
        m.mutation_type = pb::MutationType::MDelete as i32;
        assert_eq!(
            atomic_write(one(m), NOW).unwrap().mutations[0].kind,
            MutationKind::Delete
        );

        let mut min = set(b"a", b"\xff\x0f\x49\x02", pb::ValueEncoding::VeV8);
        min.mutation_type = pb::MutationType::MMin as i32;
        assert_eq!(
            write_err(one(min)),
            "Failed to perform 'min' mutation on a non-U64 operand"
        );
        let mut sum = set(b"a", b"x", pb::ValueEncoding::VeBytes);
        sum.mutation_type = pb::MutationType::MSum as i32;
        assert_eq!(
            write_err(one(sum)),
            "Some of the parameters are not valid V8 values"
        );
        let mut max = set(b"a", &7u64.to_le_bytes(), pb::ValueEncoding::VeLe64);
        max.mutation_type = pb::MutationType::MMax as i32;
        assert_eq!(
            atomic_write(one(max), NOW).unwrap().mutations[0].kind,
            MutationKind::Le64(Le64Op::Max, 7)
        );
    }

    #[test]
    fn expiry() {
        let mut m = set(b"a", b"x", pb::ValueEncoding::VeBytes);
        m.expire_at_ms = -2;
        assert_eq!(write_err(one(m.clone())), "Invalid mutation expire at.");
        for (given, want) in [(-1, None), (0, None), (1, Some(1)), (NOW, Some(NOW))] {
            m.expire_at_ms = given;
            assert_eq!(
                atomic_write(one(m.clone()), NOW).unwrap().mutations[0].expire_at_ms,
                want
            );
        }
    }

    #[test]
    fn enqueue_rules() {
        let base = pb::Enqueue {
            payload: Bytes::from_static(b"\xff\x0f\x49\x02"),
            deadline_ms: NOW,
            ..Default::default()
        };
        let err = |e: pb::Enqueue| {
            write_err(pb::AtomicWrite {
                enqueues: vec![e],
                ..Default::default()
            })
        };
        let ok = |e: pb::Enqueue| {
            atomic_write(
                pb::AtomicWrite {
                    enqueues: vec![e],
                    ..Default::default()
                },
                NOW,
            )
            .is_ok()
        };
        assert!(ok(base.clone()));
        assert!(
            ok(pb::Enqueue {
                deadline_ms: 0,
                ..base.clone()
            }),
            "past deadlines are delivered at once"
        );
        assert!(ok(pb::Enqueue {
            deadline_ms: NOW + MAX_QUEUE_DELAY_MS,
            ..base.clone()
        }));
        assert_eq!(
            err(pb::Enqueue {
                deadline_ms: NOW + MAX_QUEUE_DELAY_MS + 1,
                ..base.clone()
            }),
            "Invalid mutation enqueue deadline."
        );
        assert_eq!(
            err(pb::Enqueue {
                deadline_ms: -1,
                ..base.clone()
            }),
            "Invalid mutation enqueue deadline."
        );
        assert_eq!(
            err(pb::Enqueue {
                payload: Bytes::from(vec![0; 65537]),
                ..base.clone()
            }),
            "A value exceeds the value size limit."
        );
        assert_eq!(
            err(pb::Enqueue {
                keys_if_undelivered: vec![Bytes::from_static(b"a"); 11],
                ..base.clone()
            }),
            "Too many dead letter keys for a single queue message."
        );
        assert_eq!(
            err(pb::Enqueue {
                keys_if_undelivered: vec![Bytes::from(vec![1; 2049])],
                ..base.clone()
            }),
            "A key exceeds the key size limit."
        );
        assert_eq!(
            err(pb::Enqueue {
                backoff_schedule: vec![1; 11],
                ..base.clone()
            }),
            "Too many backoff intervals for a single queue message."
        );
        assert_eq!(
            err(pb::Enqueue {
                backoff_schedule: vec![3_600_001],
                ..base
            }),
            "A backoff interval exceeds the maximum allowed backoff interval."
        );
    }
}
