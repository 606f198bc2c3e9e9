//! Snapshot reads on a core's own read-only connection (SPEC §2.3, §7.5).

use std::path::Path;

use bytes::Bytes;
use prometheus::IntCounter;
use rusqlite::{params, Connection, OptionalExtension};

use super::sql::{GET, SCAN_FORWARD, SCAN_REVERSE};
use super::StoreError;
use crate::kv::model::{Entry, ReadRange};
use crate::kv::value::StoredValue;
use crate::kv::versionstamp::Versionstamp;
use crate::metrics::Metrics;

/// One read-only SQLite connection; each core owns one.
pub struct Reader {
    conn: Connection,
    /// `denokv_read_rows_total` (or a counter nobody reads).
    read_rows: IntCounter,
}

impl Reader {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Reader {
            conn: super::schema::open_reader(path)?,
            read_rows: IntCounter::new("read_rows", "unregistered").expect("valid metric"),
        })
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

    /// Runs `statements` queries from one snapshot. One statement is a snapshot by itself, so
    /// only several need the (cached) BEGIN and COMMIT around them.
    fn snapshot<T>(
        &self,
        statements: usize,
        read: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        if statements <= 1 {
            return read(&self.conn);
        }
        self.conn.prepare_cached("BEGIN")?.execute([])?;
        let result = read(&self.conn);
        // A read transaction has nothing to undo: COMMIT just ends it, also after an error.
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        result
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
