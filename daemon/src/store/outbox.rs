//! The backup outbox: the hand-over from the committer to the (future) S3 backup thread
//! (docs/BACKUP.md, SPEC §8.7).
//!
//! The committer appends, inside the very transaction that commits the data, one row per
//! transaction (a batch of commits) holding the `BackupReplicationLogEntry`s the backup log
//! must carry for them. The row
//! is therefore durable exactly when the commit is: a write rolled back to its savepoint, a
//! batch that fails or a crash before COMMIT leave no row, and no commit is ever without one.
//! The backup thread drains the rows in order on a connection of its own and deletes them
//! once shipped; after a crash it finds every commit not yet acknowledged still there.
//!
//! One row per transaction, not per commit or entry: one B-tree insert per batch keeps the
//! committer's cost flat in the number of writes and mutations, and the rowid (the batch's last
//! version) grows with every batch, so rows are appended at the end of the table. The entries are stored already
//! encoded as a `BackupMutationRange` carrying only field 1: protobuf concatenation merges
//! repeated fields, so a range of commits is the concatenation of their rows.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use bytes::Bytes;
use prost::Message;
use rusqlite::{params, Connection, OpenFlags};

use crate::backup_proto::{BackupKvMutationKind, BackupMutationRange, BackupReplicationLogEntry};
use crate::kv::value::Value;

/// Our own table in the database file. The Deno CLI and the upstream server ignore tables
/// they do not know; `migration_state` stays at 3 (SPEC §7.2).
pub const TABLE: &str = "denokv_backup_outbox";

/// `version`: the transaction's last commit's version (rowid, so commit order is table order).
/// `prev_version`: the global version just before the transaction, so that a commit missing
/// from the outbox (one made by another process, or by this server with backup off) shows as
/// a gap. `entries`: an encoded `BackupMutationRange` with entries only (empty for commits
/// that changed no key, kept so that the chain of versions has no hole).
const CREATE: &str = "CREATE TABLE IF NOT EXISTS denokv_backup_outbox (
       version INTEGER PRIMARY KEY,
       prev_version INTEGER NOT NULL,
       timestamp_ms INTEGER NOT NULL,
       entries BLOB NOT NULL
     )";
/// The backup thread's progress, one row: which bucket and prefix it ships to, the last
/// version shipped (an outbox row whose `prev_version` differs is a gap), and the snapshot
/// generation it last started (its start version) and whether that generation is complete.
const CREATE_STATE: &str = "CREATE TABLE IF NOT EXISTS denokv_backup_state (
       k INTEGER PRIMARY KEY CHECK (k = 0),
       location TEXT NOT NULL,
       shipped_version INTEGER NOT NULL,
       generation INTEGER NOT NULL,
       generation_done INTEGER NOT NULL,
       reset INTEGER NOT NULL
     )";
const STATE: &str =
    "SELECT location, shipped_version, generation, generation_done, reset FROM denokv_backup_state";
const START_GENERATION: &str = "INSERT OR REPLACE INTO denokv_backup_state
       (k, location, shipped_version, generation, generation_done, reset)
       VALUES (0, ?1, ?2, ?3, 0, ?4)";
const SHIPPED: &str = "UPDATE denokv_backup_state SET shipped_version = ?1";
const GENERATION_DONE: &str = "UPDATE denokv_backup_state SET generation_done = 1";
const CURRENT_VERSION: &str = "SELECT version FROM data_version WHERE k = 0";
const OLDEST_PENDING: &str =
    "SELECT timestamp_ms FROM denokv_backup_outbox ORDER BY version LIMIT 1";
/// A snapshot chunk: rows in key order after a key (expired rows too: the sweep's deletes
/// follow in the log).
const SNAPSHOT_FIRST: &str = "SELECT k, v, v_encoding, version, seq, expiration_ms FROM kv
     ORDER BY k LIMIT ?1";
const SNAPSHOT_NEXT: &str = "SELECT k, v, v_encoding, version, seq, expiration_ms FROM kv
     WHERE k > ?1 ORDER BY k LIMIT ?2";
const INSERT: &str =
    "INSERT INTO denokv_backup_outbox (version, prev_version, timestamp_ms, entries)
     VALUES (?1, ?2, ?3, ?4)";
const OLDEST: &str = "SELECT version, prev_version, timestamp_ms, entries
     FROM denokv_backup_outbox ORDER BY version LIMIT ?1";
const ACKNOWLEDGE: &str = "DELETE FROM denokv_backup_outbox WHERE version <= ?1";
const DISCARD_ALL: &str = "DELETE FROM denokv_backup_outbox";
const PENDING: &str =
    "SELECT count(*), coalesce(sum(length(entries)), 0) FROM denokv_backup_outbox";

/// The index of a commit's last entry: a consistent point for the reader (SPEC §8.6).
pub const BOUNDARY: u16 = 0xffff;

/// Whether the committer fills the outbox. Off by default: a database never used with backup
/// is left byte for byte as the Deno CLI would.
#[derive(Clone, Debug, Default)]
pub struct BackupOutbox {
    /// `None`: off. Else whether commits are recorded now: the backup thread pauses the
    /// recording when the outbox outgrows its bound (S3 away for long), and resumes it when
    /// it starts a new history.
    recording: Option<Arc<AtomicBool>>,
}

impl BackupOutbox {
    pub fn disabled() -> Self {
        BackupOutbox { recording: None }
    }

    pub fn enabled() -> Self {
        BackupOutbox {
            recording: Some(Arc::new(AtomicBool::new(true))),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.recording.is_some()
    }

    /// Stops or resumes recording commits (the backup thread's switch).
    pub fn set_recording(&self, on: bool) {
        if let Some(r) = &self.recording {
            r.store(on, Ordering::SeqCst);
        }
    }

    pub fn is_recording(&self) -> bool {
        self.recording
            .as_ref()
            .is_some_and(|r| r.load(Ordering::SeqCst))
    }

    /// The committer's recorder, creating the table if needed; `None` when disabled.
    pub(crate) fn recorder(&self, conn: &Connection) -> anyhow::Result<Option<Recorder>> {
        let Some(recording) = &self.recording else {
            return Ok(None);
        };
        conn.execute_batch(CREATE)
            .and_then(|_| conn.execute_batch(CREATE_STATE))
            .with_context(|| format!("cannot create the backup outbox table {TABLE}"))?;
        Ok(Some(Recorder {
            recording: recording.clone(),
            ..Default::default()
        }))
    }
}

/// Collects the entries of a batch's commits while the committer applies them, then appends
/// them as one row: one INSERT per transaction, whatever its number of writes.
#[derive(Default)]
pub struct Recorder {
    /// The entries of the write being applied.
    entries: Vec<BackupReplicationLogEntry>,
    /// The batch's committed entries, encoded.
    buf: Vec<u8>,
    /// The global version before the batch, and after its last committed write.
    batch: Option<(u64, u64)>,
    recording: Arc<AtomicBool>,
}

impl Recorder {
    /// Starts a batch (a transaction) that begins at global version `prev_version`.
    pub fn begin_batch(&mut self, prev_version: u64) {
        self.buf.clear();
        self.entries.clear();
        self.batch = Some((prev_version, prev_version));
    }

    /// Starts a write (drops what a rolled-back write left).
    pub fn begin(&mut self) {
        self.entries.clear();
    }

    /// The commit stores `value` at `key`. `expiry` as stored (`-1`: none).
    pub fn set(&mut self, key: &Bytes, value: &Value, expiry: i64) {
        self.entries.push(BackupReplicationLogEntry {
            versionstamp: Bytes::new(),
            kind: BackupKvMutationKind::MkSet as i32,
            key: key.clone(),
            value: value.data.clone(),
            value_encoding: value.encoding as i32,
            expire_at_ms: expiry.max(0) as u64,
        });
    }

    /// The commit deletes `key` (a delete, or the expiry sweep).
    pub fn clear(&mut self, key: &Bytes) {
        self.entries.push(BackupReplicationLogEntry {
            versionstamp: Bytes::new(),
            kind: BackupKvMutationKind::MkClear as i32,
            key: key.clone(),
            value: Bytes::new(),
            value_encoding: 0,
            expire_at_ms: 0,
        });
    }

    /// The write being applied committed at `version`: its entries join the batch, stamped
    /// `version ++ 0000 ++ index`, the last index `ffff`.
    pub fn commit_write(&mut self, version: u64) {
        let last = self.entries.len().saturating_sub(1);
        for (i, e) in self.entries.iter_mut().enumerate() {
            // At most 1000 mutations (or a sweep chunk of 1000 keys) a commit: indexes fit.
            let index = if i == last { BOUNDARY } else { i as u16 };
            let mut stamp = [0u8; 12];
            stamp[..8].copy_from_slice(&version.to_be_bytes());
            stamp[10..].copy_from_slice(&index.to_be_bytes());
            e.versionstamp = Bytes::copy_from_slice(&stamp);
            // Field 1 of BackupMutationRange, one per entry: what `encode` of the message
            // would write, without moving the entries into one.
            prost::encoding::message::encode(1, &*e, &mut self.buf);
        }
        self.entries.clear();
        if let Some((_, v)) = &mut self.batch {
            *v = version;
        }
    }

    /// Appends the batch's row, if a write of it committed, in the caller's transaction (the
    /// batch's own, before its COMMIT).
    pub fn flush(&mut self, conn: &Connection, timestamp_ms: i64) -> rusqlite::Result<()> {
        let Some((prev, version)) = self.batch.take() else {
            return Ok(());
        };
        if version == prev {
            return Ok(());
        }
        if !self.recording.load(Ordering::SeqCst) {
            // Paused: the backup starts a new history when it resumes (a gap it will see).
            self.buf.clear();
            return Ok(());
        }
        conn.prepare_cached(INSERT)?.execute(params![
            version as i64,
            prev as i64,
            timestamp_ms,
            &self.buf[..]
        ])?;
        self.buf.clear();
        Ok(())
    }

    /// A transaction of one commit (an expiry-sweep chunk): the recorded entries, committed
    /// at `version` after `prev_version`, appended at once.
    pub fn append(
        &mut self,
        conn: &Connection,
        prev_version: u64,
        version: u64,
        timestamp_ms: i64,
    ) -> rusqlite::Result<()> {
        self.buf.clear();
        self.batch = Some((prev_version, prev_version));
        self.commit_write(version);
        self.flush(conn, timestamp_ms)
    }
}

/// Where a drained range ends: acknowledging it deletes every commit up to it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position(pub u64);

/// The oldest pending commits, ready to ship as one log object.
#[derive(Debug)]
pub struct Drained {
    /// Whole commits in commit order; the last entry is a boundary (`…ffff`) unless every
    /// commit in it changed no key (then it has no entries: nothing to ship, only to
    /// acknowledge). `timestamp_ms` is the last commit's wall-clock time.
    pub range: BackupMutationRange,
    /// The version of the first commit, and the global version just before it. A
    /// `prev_version` that is not the last shipped version means commits are missing.
    pub first_version: u64,
    pub prev_version: u64,
    /// The last commit's version.
    pub position: Position,
    pub commits: usize,
    /// Encoded size of `range`'s entries.
    pub bytes: usize,
}

/// The backup thread's progress (see `CREATE_STATE`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ShipState {
    pub location: String,
    pub shipped_version: u64,
    pub generation: u64,
    pub generation_done: bool,
    /// The generation started last begins a new history: what is older is deleted once it
    /// is complete.
    pub reset: bool,
}

/// One row of the `kv` table, for a snapshot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotRow {
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub encoding: i64,
    pub version: u64,
    pub seq: u16,
    pub expiration_ms: i64,
}

/// What waits in the outbox, for a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pending {
    pub commits: u64,
    pub bytes: u64,
}

/// The backup thread's side: its own connection to the database file.
pub struct OutboxReader {
    conn: Connection,
}

impl OutboxReader {
    /// Opens the database at `path`, which must hold the outbox (the committer creates it).
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let conn = Connection::open_with_flags(path, flags)
            .with_context(|| format!("cannot open database {} for the backup", path.display()))?;
        // The committer holds the write lock for a batch at a time: wait for it.
        conn.busy_timeout(super::schema::BUSY_TIMEOUT)?;
        // Acknowledgements need no fsync of their own (which would hold the write lock the
        // committer waits for): one lost in a crash leaves rows that were shipped, and the
        // restarted backup finds them in S3 before shipping anything (writer::already_shipped).
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        if !super::schema::table_exists(&conn, TABLE)? {
            bail!(
                "database {} has no backup outbox ({TABLE}): the server must run with backup on",
                path.display()
            );
        }
        Ok(OutboxReader { conn })
    }

    /// The oldest pending commits: at least one (if any is pending), then more while the
    /// range stays within `max_commits` and `max_bytes` of entries. Never splits a commit,
    /// and stops before a gap in the versions (so each range is contiguous). `None` when the
    /// outbox is empty.
    pub fn drain(&self, max_commits: usize, max_bytes: usize) -> anyhow::Result<Option<Drained>> {
        let mut stmt = self.conn.prepare_cached(OLDEST)?;
        let mut rows = stmt.query([max_commits.max(1) as i64])?;
        let mut encoded = Vec::new();
        let mut drained: Option<(u64, u64, u64, i64, usize)> = None;
        while let Some(row) = rows.next()? {
            let version = row.get::<_, i64>(0)? as u64;
            let prev = row.get::<_, i64>(1)? as u64;
            let timestamp: i64 = row.get(2)?;
            let entries = row.get_ref(3)?.as_blob()?;
            if let Some((first, first_prev, last, _, commits)) = drained {
                if prev != last || encoded.len() + entries.len() > max_bytes {
                    break;
                }
                drained = Some((first, first_prev, version, timestamp, commits + 1));
            } else {
                drained = Some((version, prev, version, timestamp, 1));
            }
            encoded.extend_from_slice(entries);
        }
        let Some((first_version, prev_version, last, timestamp, commits)) = drained else {
            return Ok(None);
        };
        let mut range = BackupMutationRange::decode(&encoded[..])
            .with_context(|| format!("the backup outbox holds a bad row before {last}"))?;
        range.timestamp_ms = timestamp.max(0) as u64;
        Ok(Some(Drained {
            range,
            first_version,
            prev_version,
            position: Position(last),
            commits,
            bytes: encoded.len(),
        }))
    }

    /// Deletes every commit up to `position` (shipped) and records it as the last version
    /// shipped, in a transaction of its own.
    pub fn acknowledge(&self, position: Position) -> anyhow::Result<usize> {
        let tx = self.conn.unchecked_transaction()?;
        let n = tx
            .prepare_cached(ACKNOWLEDGE)?
            .execute([position.0 as i64])
            .context("cannot acknowledge shipped backup entries")?;
        tx.prepare_cached(SHIPPED)?.execute([position.0 as i64])?;
        tx.commit()
            .context("cannot acknowledge shipped backup entries")?;
        Ok(n)
    }

    /// Deletes every pending commit (the outbox outgrew its bound: the backup will start a
    /// new history instead).
    pub fn discard_all(&self) -> anyhow::Result<usize> {
        Ok(self.conn.execute(DISCARD_ALL, [])?)
    }

    /// Where the backup stands, if it ever started.
    pub fn state(&self) -> anyhow::Result<Option<ShipState>> {
        use rusqlite::OptionalExtension;
        let state = self
            .conn
            .prepare_cached(STATE)?
            .query_row([], |r| {
                Ok(ShipState {
                    location: r.get(0)?,
                    shipped_version: r.get::<_, i64>(1)? as u64,
                    generation: r.get::<_, i64>(2)? as u64,
                    generation_done: r.get::<_, i64>(3)? != 0,
                    reset: r.get::<_, i64>(4)? != 0,
                })
            })
            .optional()?;
        Ok(state)
    }

    /// Starts a snapshot generation for `location` at the current version S, which it
    /// returns. With `reset` (a new history: first backup, or after a gap) every commit up to
    /// S is in the snapshot about to be read, so its outbox rows are dropped and S counts as
    /// shipped. Without, the logs go on as they were (their history stays whole).
    pub fn start_generation(&self, location: &str, reset: bool) -> anyhow::Result<u64> {
        let tx = rusqlite::Transaction::new_unchecked(
            &self.conn,
            rusqlite::TransactionBehavior::Immediate,
        )?;
        let start = tx.query_row(CURRENT_VERSION, [], |r| r.get::<_, i64>(0))? as u64;
        let shipped = if reset {
            tx.prepare_cached(ACKNOWLEDGE)?.execute([start as i64])?;
            start
        } else {
            tx.query_row(STATE, [], |r| r.get::<_, i64>(1))? as u64
        };
        tx.prepare_cached(START_GENERATION)?.execute(params![
            location,
            shipped as i64,
            start as i64,
            reset as i64
        ])?;
        tx.commit().context("cannot start a backup snapshot")?;
        Ok(start)
    }

    /// Marks the generation started last as complete (uploaded, `differential` written).
    pub fn finish_generation(&self) -> anyhow::Result<()> {
        self.conn.execute(GENERATION_DONE, [])?;
        Ok(())
    }

    /// The database's current version (the last commit's).
    pub fn current_version(&self) -> anyhow::Result<u64> {
        Ok(self
            .conn
            .query_row(CURRENT_VERSION, [], |r| r.get::<_, i64>(0))? as u64)
    }

    /// The commit time of the oldest pending commit, if any.
    pub fn oldest_pending_ms(&self) -> anyhow::Result<Option<i64>> {
        use rusqlite::OptionalExtension;
        Ok(self
            .conn
            .prepare_cached(OLDEST_PENDING)?
            .query_row([], |r| r.get(0))
            .optional()?)
    }

    /// Rows of the `kv` table in key order after `after` (from the start when `None`): at
    /// least one if any is left, then more while within `max_rows` and `max_bytes`.
    pub fn snapshot_rows(
        &self,
        after: Option<&[u8]>,
        max_rows: usize,
        max_bytes: usize,
    ) -> anyhow::Result<Vec<SnapshotRow>> {
        let mut stmt;
        let mut rows = match after {
            None => {
                stmt = self.conn.prepare_cached(SNAPSHOT_FIRST)?;
                stmt.query(params![max_rows as i64])?
            }
            Some(after) => {
                stmt = self.conn.prepare_cached(SNAPSHOT_NEXT)?;
                stmt.query(params![after, max_rows as i64])?
            }
        };
        let mut out = Vec::new();
        let mut bytes = 0;
        while let Some(r) = rows.next()? {
            let row = SnapshotRow {
                key: r.get(0)?,
                value: r.get(1)?,
                encoding: r.get(2)?,
                version: r.get::<_, i64>(3)? as u64,
                seq: r.get::<_, i64>(4)? as u16,
                expiration_ms: r.get(5)?,
            };
            bytes += row.key.len() + row.value.len() + 19;
            out.push(row);
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(out)
    }

    /// What waits to be shipped.
    pub fn pending(&self) -> anyhow::Result<Pending> {
        let (commits, bytes): (i64, i64) = self
            .conn
            .prepare_cached(PENDING)?
            .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
        Ok(Pending {
            commits: commits as u64,
            bytes: bytes as u64,
        })
    }
}

#[cfg(test)]
mod tests;
