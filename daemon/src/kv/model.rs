//! Requests after validation: every size, count and encoding is known to be acceptable.

use bytes::Bytes;

use super::v8sum::V8Sum;
use super::value::Value;
use super::versionstamp::Versionstamp;

/// One range of a snapshot read: `start <= key < end`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadRange {
    pub start: Bytes,
    pub end: Bytes,
    pub limit: u32,
    pub reverse: bool,
}

/// A key and what a read returns for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub key: Bytes,
    pub value: Value,
    pub versionstamp: Versionstamp,
}

/// A precondition of an atomic write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Check {
    pub key: Bytes,
    /// `None`: the key must be absent.
    pub versionstamp: Option<Versionstamp>,
}

/// What a mutation does to its key.
#[derive(Clone, Debug, PartialEq)]
pub enum MutationKind {
    Set(Value),
    Delete,
    /// `sum`, `min` or `max` of LE64 (`Deno.KvU64`) values.
    Le64(super::value::Le64Op, u64),
    /// `sum` of V8 numbers or BigInts.
    V8Sum(V8Sum),
    /// Set at `key ++ versionstamp suffix` (SPEC §2.4.5).
    SetSuffixVersionstamped(Value),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Mutation {
    pub key: Bytes,
    pub kind: MutationKind,
    /// Absolute expiry in ms; `None` for no expiry.
    pub expire_at_ms: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueue {
    pub payload: Bytes,
    pub deadline_ms: i64,
    pub keys_if_undelivered: Vec<Bytes>,
    pub backoff_schedule: Vec<u32>,
}

/// An atomic write: checks, then mutations in order, then enqueues; all or nothing.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AtomicWrite {
    pub checks: Vec<Check>,
    pub mutations: Vec<Mutation>,
    pub enqueues: Vec<Enqueue>,
}

impl AtomicWrite {
    /// Bytes of keys, values and payloads the write carries: what a commit batch is bounded by.
    pub fn size_bytes(&self) -> usize {
        let mut n: usize = self.checks.iter().map(|c| c.key.len()).sum();
        for m in &self.mutations {
            n += m.key.len();
            if let MutationKind::Set(v) | MutationKind::SetSuffixVersionstamped(v) = &m.kind {
                n += v.data.len();
            }
        }
        for e in &self.enqueues {
            n += e.payload.len() + e.keys_if_undelivered.iter().map(Bytes::len).sum::<usize>();
        }
        n
    }

    /// Moves every key, value and payload into one buffer of its own. Decoded fields are
    /// slices of the request body, which they would otherwise keep alive, padding and all,
    /// for as long as the write waits in the committer's queue.
    pub fn detach(&mut self) {
        let mut fields: Vec<&mut Bytes> = Vec::new();
        for c in &mut self.checks {
            fields.push(&mut c.key);
        }
        for m in &mut self.mutations {
            fields.push(&mut m.key);
            if let MutationKind::Set(v) | MutationKind::SetSuffixVersionstamped(v) = &mut m.kind {
                fields.push(&mut v.data);
            }
        }
        for e in &mut self.enqueues {
            fields.push(&mut e.payload);
            fields.extend(e.keys_if_undelivered.iter_mut());
        }
        detach_all(fields);
    }
}

/// Re-points each of `fields` at a copy in one new buffer (see [`AtomicWrite::detach`]).
pub fn detach_all<'a>(fields: impl IntoIterator<Item = &'a mut Bytes>) {
    let fields: Vec<&mut Bytes> = fields.into_iter().collect();
    let mut buf = Vec::with_capacity(fields.iter().map(|b| b.len()).sum());
    for b in &fields {
        buf.extend_from_slice(b);
    }
    let buf = Bytes::from(buf);
    let mut at = 0;
    for b in fields {
        let len = b.len();
        *b = buf.slice(at..at + len);
        at += len;
    }
}

/// How an atomic write ended, when it was not refused as invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Committed(Versionstamp),
    /// 0-based indexes of every failing check, ascending. Nothing was written.
    ChecksFailed(Vec<u32>),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::value::Encoding;

    #[test]
    fn detached_writes_hold_nothing_of_the_request_body() {
        // A 1 MiB "body" with the write's fields as slices of it, as the protobuf decoder
        // leaves them.
        let body = Bytes::from(vec![7u8; 1 << 20]);
        let inside = |b: &Bytes| {
            let range = body.as_ptr() as usize..body.as_ptr() as usize + body.len();
            range.contains(&(b.as_ptr() as usize))
        };
        let mut w = AtomicWrite {
            checks: vec![Check {
                key: body.slice(0..10),
                versionstamp: None,
            }],
            mutations: vec![Mutation {
                key: body.slice(10..20),
                kind: MutationKind::Set(Value {
                    data: body.slice(20..1020),
                    encoding: Encoding::Bytes,
                }),
                expire_at_ms: None,
            }],
            enqueues: vec![Enqueue {
                payload: body.slice(2000..2100),
                deadline_ms: 0,
                keys_if_undelivered: vec![body.slice(3000..3005)],
                backoff_schedule: vec![],
            }],
        };
        let before = w.clone();
        assert_eq!(w.size_bytes(), 10 + 10 + 1000 + 100 + 5);
        w.detach();
        assert_eq!(w, before, "the same bytes");
        let mut fields = vec![&w.checks[0].key, &w.mutations[0].key];
        if let MutationKind::Set(v) = &w.mutations[0].kind {
            fields.push(&v.data);
        }
        fields.push(&w.enqueues[0].payload);
        fields.push(&w.enqueues[0].keys_if_undelivered[0]);
        assert!(
            fields.iter().all(|b| !inside(b)),
            "a field still points into the body"
        );
    }
}
