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

/// How an atomic write ended, when it was not refused as invalid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WriteOutcome {
    Committed(Versionstamp),
    /// 0-based indexes of every failing check, ascending. Nothing was written.
    ChecksFailed(Vec<u32>),
}
