//! Applying one atomic write inside the batch's transaction: checks, then mutations in order,
//! then enqueues (SPEC §2.4.2), all inside a savepoint of its own.

use bytes::Bytes;
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension};

use crate::kv::model::{AtomicWrite, Enqueue, MutationKind, WriteOutcome};
use crate::kv::value::{StoredValue, Value};
use crate::kv::versionstamp::Versionstamp;
use crate::kv::KvError;
use crate::store::outbox::Recorder;
use crate::store::sql::{DELETE, ENQUEUE, LOOKUP_VALUE, LOOKUP_VERSION, UPSERT};

/// Queue retry schedule stored when a message gives none (proto3 cannot tell empty from absent).
const DEFAULT_BACKOFF: &str = "[100,1000,5000,30000,60000]";

/// Why one write of a batch did not apply.
pub enum ApplyError {
    /// The write is invalid; it was rolled back to its savepoint; the batch goes on.
    Invalid(KvError),
    /// The database failed; the whole batch is rolled back.
    Database(rusqlite::Error),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Database(e)
    }
}

impl From<KvError> for ApplyError {
    fn from(e: KvError) -> Self {
        ApplyError::Invalid(e)
    }
}

/// Applies `write` inside its own savepoint, at the global `version`. Returns the outcome and
/// the global version after it (advanced only when the write applies). The keys it changed
/// are appended to `changed`, and what it stored to `log` (backup on; see `outbox`).
pub fn in_savepoint(
    conn: &Connection,
    write: &AtomicWrite,
    version: u64,
    now: i64,
    changed: &mut Vec<Bytes>,
    log: Option<&mut Recorder>,
) -> Result<(WriteOutcome, u64), ApplyError> {
    conn.prepare_cached("SAVEPOINT write")?.execute([])?;
    let result = apply(conn, write, version, now, changed, log);
    if let Err(ApplyError::Invalid(_)) = result {
        conn.prepare_cached("ROLLBACK TO write")?.execute([])?;
    }
    conn.prepare_cached("RELEASE write")?.execute([])?;
    result
}

fn apply(
    conn: &Connection,
    write: &AtomicWrite,
    version: u64,
    now: i64,
    changed: &mut Vec<Bytes>,
    mut log: Option<&mut Recorder>,
) -> Result<(WriteOutcome, u64), ApplyError> {
    let mut failed = Vec::new();
    {
        let mut lookup = conn.prepare_cached(LOOKUP_VERSION)?;
        for (i, check) in write.checks.iter().enumerate() {
            let current = lookup
                .query_row(params![&check.key[..], now], |r| {
                    Ok(Versionstamp::new(
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, i64>(1)? as u16,
                    ))
                })
                .optional()?;
            if current != check.versionstamp {
                failed.push(i as u32);
            }
        }
    }
    if !failed.is_empty() {
        return Ok((WriteOutcome::ChecksFailed(failed), version));
    }

    let new_version = version + rand::rng().random_range(1..=9);
    let stamp = Versionstamp::new(new_version, 0);
    if let Some(log) = log.as_deref_mut() {
        log.begin();
    }
    for m in &write.mutations {
        let expiry = m.expire_at_ms.unwrap_or(-1);
        match &m.kind {
            MutationKind::Set(value) => {
                upsert(conn, &m.key, value, new_version, expiry)?;
                if let Some(log) = log.as_deref_mut() {
                    log.set(&m.key, value, expiry);
                }
                changed.push(m.key.clone());
            }
            MutationKind::SetSuffixVersionstamped(value) => {
                let mut key = Vec::with_capacity(m.key.len() + 22);
                key.extend_from_slice(&m.key);
                key.extend_from_slice(&stamp.key_suffix());
                let key = Bytes::from(key);
                upsert(conn, &key, value, new_version, expiry)?;
                if let Some(log) = log.as_deref_mut() {
                    log.set(&key, value, expiry);
                }
                changed.push(key);
            }
            MutationKind::Delete => {
                conn.prepare_cached(DELETE)?.execute([&m.key[..]])?;
                if let Some(log) = log.as_deref_mut() {
                    log.clear(&m.key);
                }
                changed.push(m.key.clone());
            }
            // sum/min/max clear an existing expiry unless the mutation sets one (SPEC §10 D13).
            MutationKind::Le64(op, operand) => {
                let result = op.apply(lookup_value(conn, &m.key, now)?, *operand)?;
                upsert(conn, &m.key, &result, new_version, expiry)?;
                // The backup logs the result: the reader applies every entry as a set.
                if let Some(log) = log.as_deref_mut() {
                    log.set(&m.key, &result, expiry);
                }
                changed.push(m.key.clone());
            }
            MutationKind::V8Sum(sum) => {
                let result = sum.apply(lookup_value(conn, &m.key, now)?)?;
                upsert(conn, &m.key, &result, new_version, expiry)?;
                if let Some(log) = log.as_deref_mut() {
                    log.set(&m.key, &result, expiry);
                }
                changed.push(m.key.clone());
            }
        }
    }
    for e in &write.enqueues {
        enqueue(conn, e)?;
    }
    Ok((WriteOutcome::Committed(stamp), new_version))
}

fn lookup_value(conn: &Connection, key: &[u8], now: i64) -> rusqlite::Result<Option<StoredValue>> {
    conn.prepare_cached(LOOKUP_VALUE)?
        .query_row(params![key, now], |r| {
            Ok(StoredValue {
                data: Bytes::from(r.get::<_, Vec<u8>>(0)?),
                encoding: r.get(1)?,
            })
        })
        .optional()
}

fn upsert(
    conn: &Connection,
    key: &[u8],
    value: &Value,
    version: u64,
    expiry: i64,
) -> rusqlite::Result<()> {
    conn.prepare_cached(UPSERT)?.execute(params![
        key,
        &value.data[..],
        value.encoding as i64,
        version as i64,
        expiry
    ])?;
    Ok(())
}

fn enqueue(conn: &Connection, e: &Enqueue) -> rusqlite::Result<()> {
    let backoff = if e.backoff_schedule.is_empty() {
        DEFAULT_BACKOFF.to_string()
    } else {
        serde_json::to_string(&e.backoff_schedule).expect("a list of numbers serializes")
    };
    let dead_letter: Vec<&[u8]> = e.keys_if_undelivered.iter().map(|k| &k[..]).collect();
    let dead_letter = serde_json::to_string(&dead_letter).expect("a list of byte lists serializes");
    let id = uuid::Uuid::new_v4().hyphenated().to_string();
    conn.prepare_cached(ENQUEUE)?.execute(params![
        e.deadline_ms,
        id,
        &e.payload[..],
        backoff,
        dead_letter
    ])?;
    Ok(())
}
