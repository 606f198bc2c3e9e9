//! Snapshot reads on a core's own read-only connection (SPEC §2.3, §7.5).
//!
//! Each read transaction costs SQLite a round of `fcntl` locks on the database and its `-shm`
//! file (about a fifth of a point read's server time). So a core's reader may keep one read
//! snapshot for the reads that follow (`share_snapshots`), as long as it is as fresh as a new
//! one would be: nothing changed since it was taken (`WatchRegistry::changes`, which moves on
//! before any commit is acknowledged or notified) and it is younger than `hold`. The core lets
//! go of it when it falls idle (`release`), so an idle core never holds back a checkpoint.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use prometheus::IntCounter;
use rusqlite::{params, Connection, OptionalExtension};

use super::sql::{GET, SCAN_FORWARD, SCAN_REVERSE};
use super::{StoreError, WatchRegistry};
use crate::kv::model::{Entry, ReadRange};
use crate::kv::value::StoredValue;
use crate::kv::versionstamp::Versionstamp;
use crate::metrics::Metrics;

/// How long a core's reader may keep one read snapshot. Bounds how late it sees another
/// process's commits (which this process learns of only by polling) and how long it holds
/// back the WAL's rewind (store::checkpointer).
pub const SNAPSHOT_HOLD: Duration = Duration::from_millis(1);

/// One read-only SQLite connection; each core owns one.
pub struct Reader {
    conn: Connection,
    /// `denokv_read_rows_total` (or a counter nobody reads).
    read_rows: IntCounter,
    /// With `share_snapshots`: when to take a new snapshot, and the one held.
    sharing: Option<Sharing>,
}

struct Sharing {
    watches: Arc<WatchRegistry>,
    hold: Duration,
    held: Option<Held>,
}

/// The read transaction kept open, and `WatchRegistry::changes` just before it began.
#[derive(Clone, Copy)]
struct Held {
    changes: u64,
    since: Instant,
}

impl Reader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Reader {
            conn: super::schema::open_reader(path)?,
            read_rows: IntCounter::new("read_rows", "unregistered").expect("valid metric"),
            sharing: None,
        })
    }

    /// Lets reads share one snapshot while `watches` counts no change and for at most `hold`
    /// (the caller then calls `release` when it falls idle).
    pub fn share_snapshots(mut self, watches: Arc<WatchRegistry>, hold: Duration) -> Self {
        self.sharing = Some(Sharing {
            watches,
            hold,
            held: None,
        });
        self
    }

    /// Whether a snapshot is kept open for the next reads (`release` ends it).
    pub fn holds_snapshot(&self) -> bool {
        self.sharing.as_ref().is_some_and(|s| s.held.is_some())
    }

    /// Ends the snapshot kept for the next reads, if any.
    pub fn release(&mut self) {
        if let Some(sharing) = &mut self.sharing {
            if sharing.held.take().is_some() {
                end_read(&self.conn);
            }
        }
    }

    /// Counts the rows this reader returns in `metrics`.
    pub fn with_metrics(mut self, metrics: &Metrics) -> Self {
        self.read_rows = metrics.read_rows.clone();
        self
    }

    /// Reads every range from one snapshot.
    pub fn read_ranges(
        &mut self,
        ranges: &[ReadRange],
        now_ms: i64,
    ) -> Result<Vec<Vec<Entry>>, StoreError> {
        let out = self.snapshot(ranges.len(), |conn| {
            let mut out = Vec::with_capacity(ranges.len());
            for r in ranges {
                if r.start >= r.end {
                    out.push(Vec::new());
                    continue;
                }
                let sql = if r.reverse {
                    SCAN_REVERSE
                } else {
                    SCAN_FORWARD
                };
                let mut stmt = conn.prepare_cached(sql)?;
                let rows = stmt.query_map(
                    params![&r.start[..], &r.end[..], now_ms, r.limit as i64],
                    row_to_entry,
                )?;
                out.push(
                    rows.map(|e| e?.decode())
                        .collect::<Result<Vec<_>, StoreError>>()?,
                );
            }
            Ok(out)
        })?;
        let rows: usize = out.iter().map(Vec::len).sum();
        self.read_rows.inc_by(rows as u64);
        Ok(out)
    }

    /// Reads single keys from one snapshot; `None` for absent (or expired) keys.
    pub fn read_keys(
        &mut self,
        keys: &[Bytes],
        now_ms: i64,
    ) -> Result<Vec<Option<Entry>>, StoreError> {
        let out = self.snapshot(keys.len(), |conn| {
            let mut stmt = conn.prepare_cached(GET)?;
            let mut out = Vec::with_capacity(keys.len());
            for k in keys {
                let row = stmt
                    .query_row(params![&k[..], now_ms], row_to_entry)
                    .optional()?;
                out.push(row.map(RawEntry::decode).transpose()?);
            }
            Ok(out)
        })?;
        let rows = out.iter().filter(|e| e.is_some()).count();
        self.read_rows.inc_by(rows as u64);
        Ok(out)
    }

    /// Runs `statements` queries from one snapshot. Without sharing, one statement is a
    /// snapshot by itself, so only several need the (cached) BEGIN and COMMIT around them.
    fn snapshot<T>(
        &mut self,
        statements: usize,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let Some(sharing) = &mut self.sharing else {
            if statements <= 1 {
                return read(&self.conn);
            }
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            let result = read(&self.conn);
            end_read(&self.conn);
            return result;
        };
        // Read before the snapshot begins: it then holds every change counted here.
        let changes = sharing.watches.changes();
        if let Some(held) = sharing.held {
            if held.changes != changes || held.since.elapsed() >= sharing.hold {
                sharing.held = None;
                end_read(&self.conn);
            }
        }
        if sharing.held.is_none() {
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            sharing.held = Some(Held {
                changes,
                since: Instant::now(),
            });
        }
        let result = read(&self.conn);
        if result.is_err() {
            self.release();
        }
        result
    }
}

/// Ends a read transaction. It has nothing to undo: COMMIT just ends it, also after an error.
fn end_read(conn: &Connection) {
    let ended = conn
        .prepare_cached("COMMIT")
        .and_then(|mut s| s.execute([]));
    if ended.is_err() && !conn.is_autocommit() {
        let _ = conn.execute_batch("ROLLBACK");
    }
}

/// A row before its encoding is checked.
pub(crate) struct RawEntry {
    key: Vec<u8>,
    value: StoredValue,
    versionstamp: Versionstamp,
}

impl RawEntry {
    fn decode(self) -> Result<Entry, StoreError> {
        Ok(Entry {
            key: Bytes::from(self.key),
            value: self.value.decode()?,
            versionstamp: self.versionstamp,
        })
    }
}

fn row_to_entry(r: &rusqlite::Row<'_>) -> rusqlite::Result<RawEntry> {
    let version: i64 = r.get(3)?;
    let seq: i64 = r.get(4)?;
    Ok(RawEntry {
        key: r.get(0)?,
        value: StoredValue {
            data: Bytes::from(r.get::<_, Vec<u8>>(1)?),
            encoding: r.get(2)?,
        },
        versionstamp: Versionstamp::new(version as u64, seq as u16),
    })
}
