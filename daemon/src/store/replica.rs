//! The replica database (SPEC §8.3): the tables and views upstream's S3 reader creates in
//! the SQLite file, so a replica file made by upstream works with this server and the other
//! way round, and the reader's algorithms on them (SPEC §8.4): snapshot ranges, the redo log
//! filled by syncs, checkouts forward and backward through the redo and undo logs.
//!
//! The KV engine (the per-core readers) reads the `kv` view; only the replica thread and the
//! `pitr` subcommands write, on a connection of their own (`ReplicaDb`).

use std::path::Path;

use anyhow::{bail, Context};
use rusqlite::{params, Connection, OpenFlags, OptionalExtension, TransactionBehavior};

/// The replica's own migration number (`tt_migration_state`).
const REPLICA_SCHEMA_VERSION: i64 = 1;

/// Migration 1, as upstream's reader creates it (SPEC §8.3).
const MIGRATION_1: &str = "
CREATE TABLE tt_migration_state(
  k integer not null primary key,
  version integer not null
);
CREATE VIEW migration_state as select 0 as k, 3 as version;
CREATE TABLE data_version (
  k integer primary key,
  version integer not null,
  seq integer not null default 0
);
INSERT INTO data_version (k, version) VALUES (0, 0);
CREATE TABLE kv_snapshot (
  k blob primary key,
  v blob not null,
  v_encoding integer not null,
  version integer not null,
  seq integer not null default 0,
  expiration_ms integer not null default -1
) without rowid;
CREATE VIEW kv as
  select k, v, v_encoding, version, seq, expiration_ms from kv_snapshot;
CREATE TABLE tt_redo_log (
  versionstamp12 blob not null primary key,
  timestamp_ms integer not null,

  k blob not null,
  v blob,
  v_encoding integer not null,
  real_versionstamp blob not null
) without rowid;
CREATE TABLE tt_undo_log (
  versionstamp12 blob not null primary key,
  timestamp_ms integer not null,

  k blob not null,
  v blob,
  v_encoding integer not null,
  real_versionstamp blob not null
) without rowid;
CREATE TABLE tt_redo_cursor (
  zero integer not null primary key,

  format_version integer not null,
  monoseq integer not null,
  first_versionstamp12 blob not null,
  last_versionstamp12 blob not null
);
CREATE TABLE tt_initial_snapshot_ranges (
  format_version integer not null,
  monoseq integer not null,
  seq integer not null,

  pulled integer not null,

  primary key (format_version, monoseq, seq)
) without rowid;
CREATE TABLE tt_config (
  k text not null primary key,
  v text not null
) without rowid;
";

/// `tt_config` keys (SPEC §8.3).
const S3_INIT_COMPLETED: &str = "s3_init_completed";
const S3_BUCKET: &str = "s3_bucket";
const S3_PREFIX: &str = "s3_prefix";
const INITIAL_SNAPSHOT_COMPLETED: &str = "initial_snapshot_completed";
const CURRENT: &str = "current_snapshot_versionstamp12";

/// A log versionstamp: the commit's 10 bytes and a 2-byte index.
pub type Vs12 = [u8; 12];

/// Whether `vs` is a boundary (index `ff ff`): a consistent point, a valid checkout target.
pub fn is_boundary(vs: &[u8]) -> bool {
    vs.len() == 12 && vs[10] == 0xff && vs[11] == 0xff
}

/// `target10 ++ ff ff`.
pub fn boundary_of(vs10: &[u8; 10]) -> Vs12 {
    let mut out = [0xff; 12];
    out[..10].copy_from_slice(vs10);
    out
}

/// One entry of a log object, as the redo log stores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogEntry {
    pub versionstamp12: Vs12,
    pub timestamp_ms: i64,
    pub key: Vec<u8>,
    /// `None`: a delete.
    pub value: Option<Vec<u8>>,
    pub encoding: i64,
}

/// A row of a snapshot object.
pub struct SnapshotPair<'a> {
    pub key: &'a [u8],
    pub value: &'a [u8],
    pub encoding: i64,
    pub version: u64,
    pub seq: u16,
}

/// Where the last fetched log object was (its name's parts).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub format: u16,
    pub monoseq: u64,
    pub first: Vs12,
    pub last: Vs12,
}

/// A snapshot object's name parts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct RangeId {
    pub format: u16,
    pub monoseq: u64,
    pub seq: u64,
}

/// What a checkout did.
#[derive(Debug, Default)]
pub struct Checkout {
    /// The point the replica is at now.
    pub current: Vs12,
    /// Log entries applied (forward) or undone (backward).
    pub entries: usize,
    /// The keys whose rows changed (each once), for waking watchers; empty when
    /// `too_many_keys`.
    pub keys: Vec<Vec<u8>>,
    /// More than `MAX_NOTIFIED_KEYS` keys changed: wake every watcher.
    pub too_many_keys: bool,
}

/// A recoverable point: a boundary in the redo or undo log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Point {
    pub versionstamp12: Vs12,
    pub timestamp_ms: i64,
}

/// The replica file, opened read-write.
pub struct ReplicaDb {
    conn: Connection,
}

impl ReplicaDb {
    /// Opens (creating it if missing) a replica file and runs the replica migrations. A normal
    /// KV database (one with a `kv` table) is refused: it is not a replica.
    pub fn open(path: &Path) -> anyhow::Result<ReplicaDb> {
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(path, flags)
            .with_context(|| format!("cannot open replica database {}", path.display()))?;
        conn.busy_timeout(super::schema::BUSY_TIMEOUT)?;
        let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            tracing::warn!("replica {}: cannot use WAL mode ({mode})", path.display());
        }
        if super::schema::table_exists(&conn, "kv")? {
            bail!(
                "{} is a normal database, not a replica: --sync-from-s3 and pitr need a replica \
                 file (give a new path; it is created and filled from S3)",
                path.display()
            );
        }
        migrate(&mut conn).with_context(|| format!("cannot migrate replica {}", path.display()))?;
        Ok(ReplicaDb { conn })
    }

    fn config(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row("SELECT v FROM tt_config WHERE k = ?1", [key], |r| r.get(0))
            .optional()
    }

    /// Binds the file to a bucket and prefix at its first use; later uses must name the same.
    pub fn bind_s3(&mut self, bucket: &str, prefix: &str) -> anyhow::Result<()> {
        if self.config(S3_INIT_COMPLETED)?.as_deref() == Some("1") {
            let (b, p) = (self.config(S3_BUCKET)?, self.config(S3_PREFIX)?);
            if b.as_deref() != Some(bucket) || p.as_deref() != Some(prefix) {
                bail!(
                    "this replica follows s3://{}/{}, not s3://{bucket}/{prefix}: give that \
                     bucket and prefix, or delete the key `{S3_INIT_COMPLETED}` from its table \
                     tt_config to follow another backup",
                    b.unwrap_or_default(),
                    p.unwrap_or_default()
                );
            }
            return Ok(());
        }
        let tx = self.conn.transaction()?;
        for (k, v) in [
            (S3_BUCKET, bucket),
            (S3_PREFIX, prefix),
            (S3_INIT_COMPLETED, "1"),
        ] {
            set_config(&tx, k, v)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// The bucket and prefix the file follows, if bound.
    pub fn bound_s3(&self) -> anyhow::Result<Option<(String, String)>> {
        if self.config(S3_INIT_COMPLETED)?.as_deref() != Some("1") {
            return Ok(None);
        }
        Ok(Some((
            self.config(S3_BUCKET)?.unwrap_or_default(),
            self.config(S3_PREFIX)?.unwrap_or_default(),
        )))
    }

    pub fn initial_snapshot_completed(&self) -> anyhow::Result<bool> {
        Ok(self.config(INITIAL_SNAPSHOT_COMPLETED)?.as_deref() == Some("1"))
    }

    /// The snapshot objects recorded for the initial snapshot.
    pub fn snapshot_ranges(&self) -> anyhow::Result<Vec<(RangeId, bool)>> {
        let mut stmt = self.conn.prepare(
            "SELECT format_version, monoseq, seq, pulled FROM tt_initial_snapshot_ranges
             ORDER BY format_version, monoseq, seq",
        )?;
        let rows = stmt.query_map([], |r| {
            Ok((
                RangeId {
                    format: r.get::<_, i64>(0)? as u16,
                    monoseq: r.get::<_, i64>(1)? as u64,
                    seq: r.get::<_, i64>(2)? as u64,
                },
                r.get::<_, i64>(3)? != 0,
            ))
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Records the snapshot objects of the initial snapshot (once, committed).
    pub fn record_snapshot_ranges(&mut self, ids: &[RangeId]) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare(
                "INSERT OR IGNORE INTO tt_initial_snapshot_ranges
                   (format_version, monoseq, seq, pulled) VALUES (?1, ?2, ?3, 0)",
            )?;
            for id in ids {
                stmt.execute(params![id.format, id.monoseq as i64, id.seq as i64])?;
            }
        }
        tx.commit()?;
        Ok(())
    }

    /// Writes one snapshot object's rows into `kv_snapshot` and marks it pulled, in one
    /// transaction.
    pub fn apply_snapshot_range(
        &mut self,
        id: RangeId,
        pairs: &[SnapshotPair<'_>],
    ) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(UPSERT)?;
            for p in pairs {
                stmt.execute(params![p.key, p.value, p.encoding, p.version as i64, p.seq])?;
            }
        }
        tx.execute(
            "UPDATE tt_initial_snapshot_ranges SET pulled = 1
             WHERE format_version = ?1 AND monoseq = ?2 AND seq = ?3",
            params![id.format, id.monoseq as i64, id.seq as i64],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The last log object fetched.
    pub fn cursor(&self) -> anyhow::Result<Option<Cursor>> {
        let row = self
            .conn
            .query_row(
                "SELECT format_version, monoseq, first_versionstamp12, last_versionstamp12
                 FROM tt_redo_cursor WHERE zero = 0",
                [],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                        r.get::<_, Vec<u8>>(3)?,
                    ))
                },
            )
            .optional()?;
        let Some((format, monoseq, first, last)) = row else {
            return Ok(None);
        };
        Ok(Some(Cursor {
            format: format as u16,
            monoseq: monoseq as u64,
            first: vs12(&first).context("tt_redo_cursor")?,
            last: vs12(&last).context("tt_redo_cursor")?,
        }))
    }

    /// Stores the entries of fetched log objects in the redo log and moves the cursor to the
    /// last object, in one transaction. Entries already there are kept (`INSERT OR IGNORE`).
    pub fn insert_logs(&mut self, entries: &[LogEntry], cursor: &Cursor) -> anyhow::Result<()> {
        let tx = self.conn.transaction()?;
        {
            let mut stmt = tx.prepare_cached(
                "INSERT OR IGNORE INTO tt_redo_log
                   (versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?;
            for e in entries {
                stmt.execute(params![
                    &e.versionstamp12[..],
                    e.timestamp_ms,
                    e.key,
                    e.value,
                    e.encoding,
                    &e.versionstamp12[..10],
                ])?;
            }
        }
        tx.execute(
            "INSERT INTO tt_redo_cursor
               (zero, format_version, monoseq, first_versionstamp12, last_versionstamp12)
             VALUES (0, ?1, ?2, ?3, ?4)
             ON CONFLICT (zero) DO UPDATE SET format_version = excluded.format_version,
               monoseq = excluded.monoseq, first_versionstamp12 = excluded.first_versionstamp12,
               last_versionstamp12 = excluded.last_versionstamp12",
            params![
                cursor.format,
                cursor.monoseq as i64,
                &cursor.first[..],
                &cursor.last[..]
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// The point the replica is at; `None` before the initial snapshot completed.
    pub fn current(&self) -> anyhow::Result<Option<Vs12>> {
        match self.config(CURRENT)? {
            None => Ok(None),
            Some(text) => Ok(Some(
                crate::backup::names::parse_hex(&text)
                    .with_context(|| format!("bad {CURRENT} in tt_config"))?,
            )),
        }
    }

    /// Ends the initial snapshot consistent at the backup's `differential` point `dv` (SPEC
    /// §8.4 step 5, with the fix of SPEC §10 D23): when the redo log holds entries at or
    /// before it, they are replayed over the (fuzzy) snapshot from the beginning, without undo
    /// entries; otherwise the snapshot is the point `dv` itself.
    pub fn finish_initial_snapshot(&mut self, dv: &[u8; 10]) -> anyhow::Result<Checkout> {
        let dv12 = boundary_of(dv);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let replay: bool = tx.query_row(
            "SELECT count(*) > 0 FROM tt_redo_log WHERE versionstamp12 <= ?1",
            [&dv12[..]],
            |r| r.get(0),
        )?;
        let checkout = if replay {
            set_config(&tx, CURRENT, &hex(&[0u8; 12]))?;
            forward(&tx, [0u8; 12], dv12, false)?
        } else {
            set_config(&tx, CURRENT, &hex(&dv12))?;
            Checkout {
                current: dv12,
                ..Default::default()
            }
        };
        set_config(&tx, INITIAL_SNAPSHOT_COMPLETED, "1")?;
        tx.commit()?;
        Ok(checkout)
    }

    /// The newest recoverable point the redo log leads to, if it is ahead of `current`.
    pub fn newest_point(&self) -> anyhow::Result<Option<Vs12>> {
        let newest: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT versionstamp12 FROM tt_redo_log
                 WHERE substr(versionstamp12, 11, 2) = x'ffff'
                 ORDER BY versionstamp12 DESC LIMIT 1",
                [],
                |r| r.get(0),
            )
            .optional()?;
        newest.map(|v| vs12(&v)).transpose()
    }

    /// Moves the replica to the point `target` (SPEC §8.4): forward through the redo log
    /// (recording undo entries), or backward through the undo log. A point older than the
    /// oldest one the undo log can reach is refused (SPEC §10 D17), and so is a point past the
    /// newest one downloaded; the database is unchanged then.
    pub fn checkout(&mut self, target: &[u8; 10]) -> anyhow::Result<Checkout> {
        let target12 = boundary_of(target);
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let current = current_in(&tx)?;
        if target12 == current {
            return Ok(Checkout {
                current,
                ..Default::default()
            });
        }
        let checkout = if target12 > current {
            let reachable: bool = tx.query_row(
                "SELECT count(*) > 0 FROM tt_redo_log WHERE versionstamp12 >= ?1
                   AND substr(versionstamp12, 11, 2) = x'ffff'",
                [&target12[..]],
                |r| r.get(0),
            )?;
            if !reachable {
                bail!(
                    "cannot check out {}: it is newer than every point downloaded (the newest \
                     is {}); run `pitr sync` to fetch newer ones, and `pitr list` to see them",
                    hex(target),
                    hex(&newest_in(&tx)?.unwrap_or(current)[..10])
                );
            }
            forward(&tx, current, target12, true)?
        } else {
            let oldest: Option<Vec<u8>> = tx
                .query_row(
                    "SELECT versionstamp12 FROM tt_undo_log
                     WHERE substr(versionstamp12, 11, 2) = x'ffff'
                     ORDER BY versionstamp12 ASC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            match oldest {
                Some(o) if o.as_slice() <= &target12[..] => {}
                Some(o) => bail!(
                    "cannot check out {}: it is older than the oldest recoverable point, {} \
                     (`pitr list` shows every point)",
                    hex(target),
                    hex(&o[..10])
                ),
                None => bail!(
                    "cannot check out {}: it is older than the current point {}, and there is \
                     no older recoverable point",
                    hex(target),
                    hex(&current[..10])
                ),
            }
            backward(&tx, current, target12)?
        };
        set_config(&tx, CURRENT, &hex(&checkout.current))?;
        tx.commit()?;
        Ok(checkout)
    }

    /// Recoverable points with `start_ms <= timestamp_ms < end_ms`, newest first.
    pub fn points(&self, start_ms: i64, end_ms: i64) -> anyhow::Result<Vec<Point>> {
        let mut stmt = self.conn.prepare(
            "SELECT versionstamp12, timestamp_ms FROM tt_redo_log
               WHERE substr(versionstamp12, 11, 2) = x'ffff' AND timestamp_ms >= ?1
                 AND timestamp_ms < ?2
             UNION
             SELECT versionstamp12, timestamp_ms FROM tt_undo_log
               WHERE substr(versionstamp12, 11, 2) = x'ffff' AND timestamp_ms >= ?1
                 AND timestamp_ms < ?2
             ORDER BY versionstamp12 DESC",
        )?;
        let rows = stmt.query_map(params![start_ms, end_ms], |r| {
            Ok((r.get::<_, Vec<u8>>(0)?, r.get::<_, i64>(1)?))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (vs, timestamp_ms) = row?;
            out.push(Point {
                versionstamp12: vs12(&vs)?,
                timestamp_ms,
            });
        }
        Ok(out)
    }

    /// Deletes up to `batch` undo entries of the commits before the newest point older than
    /// `cutoff_ms`, which stays the oldest recoverable point (its entries are kept). Returns how
    /// many were deleted: call again until it is less than `batch`.
    pub fn prune_undo(&mut self, cutoff_ms: i64, batch: usize) -> anyhow::Result<usize> {
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let oldest_kept: Option<Vec<u8>> = tx
            .query_row(
                "SELECT versionstamp12 FROM tt_undo_log
                 WHERE substr(versionstamp12, 11, 2) = x'ffff' AND timestamp_ms < ?1
                 ORDER BY versionstamp12 DESC LIMIT 1",
                [cutoff_ms],
                |r| r.get(0),
            )
            .optional()?;
        let Some(oldest_kept) = oldest_kept else {
            return Ok(0);
        };
        // The entries of the commit ending at `oldest_kept` start after the previous boundary.
        let previous: Option<Vec<u8>> = tx
            .query_row(
                "SELECT versionstamp12 FROM tt_undo_log
                 WHERE substr(versionstamp12, 11, 2) = x'ffff' AND versionstamp12 < ?1
                 ORDER BY versionstamp12 DESC LIMIT 1",
                [&oldest_kept],
                |r| r.get(0),
            )
            .optional()?;
        let Some(previous) = previous else {
            return Ok(0);
        };
        let deleted = tx.execute(
            "DELETE FROM tt_undo_log WHERE versionstamp12 IN
               (SELECT versionstamp12 FROM tt_undo_log WHERE versionstamp12 <= ?1
                ORDER BY versionstamp12 LIMIT ?2)",
            params![previous, batch as i64],
        )?;
        tx.commit()?;
        Ok(deleted)
    }

    /// The commit time of the point the replica is at (the newest applied entry's range
    /// time), if it came from a log.
    pub fn current_timestamp_ms(&self) -> anyhow::Result<Option<i64>> {
        let Some(current) = self.current()? else {
            return Ok(None);
        };
        Ok(self
            .conn
            .query_row(
                "SELECT timestamp_ms FROM tt_undo_log WHERE versionstamp12 = ?1",
                [&current[..]],
                |r| r.get(0),
            )
            .optional()?)
    }
}

const UPSERT: &str = "INSERT INTO kv_snapshot (k, v, v_encoding, version, seq, expiration_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, -1)
     ON CONFLICT (k) DO UPDATE SET v = excluded.v, v_encoding = excluded.v_encoding,
       version = excluded.version, seq = excluded.seq, expiration_ms = -1";

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let version: i64 = if super::schema::table_exists(&tx, "tt_migration_state")? {
        tx.query_row(
            "SELECT version FROM tt_migration_state WHERE k = 0",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0)
    } else {
        0
    };
    if version > REPLICA_SCHEMA_VERSION {
        bail!(
            "replica schema version {version} is newer than this server understands \
             ({REPLICA_SCHEMA_VERSION})"
        );
    }
    if version < 1 {
        tx.execute_batch(MIGRATION_1)
            .context("replica migration 1")?;
        tx.execute(
            "INSERT INTO tt_migration_state (k, version) VALUES (0, ?1)
             ON CONFLICT (k) DO UPDATE SET version = excluded.version",
            [REPLICA_SCHEMA_VERSION],
        )?;
    }
    tx.commit()?;
    Ok(())
}

fn set_config(conn: &Connection, key: &str, value: &str) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO tt_config (k, v) VALUES (?1, ?2)
         ON CONFLICT (k) DO UPDATE SET v = excluded.v",
        [key, value],
    )?;
    Ok(())
}

fn current_in(conn: &Connection) -> anyhow::Result<Vs12> {
    let text: Option<String> = conn
        .query_row("SELECT v FROM tt_config WHERE k = ?1", [CURRENT], |r| {
            r.get(0)
        })
        .optional()?;
    let Some(text) = text else {
        bail!("the replica has no snapshot yet: run `pitr sync` (or serve --sync-from-s3) first");
    };
    crate::backup::names::parse_hex(&text).with_context(|| format!("bad {CURRENT} in tt_config"))
}

fn newest_in(conn: &Connection) -> anyhow::Result<Option<Vs12>> {
    let newest: Option<Vec<u8>> = conn
        .query_row(
            "SELECT versionstamp12 FROM tt_redo_log WHERE substr(versionstamp12, 11, 2) = x'ffff'
             ORDER BY versionstamp12 DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .optional()?;
    newest.map(|v| vs12(&v)).transpose()
}

/// A row of the redo or undo log.
struct LogRow {
    vs12: Vec<u8>,
    timestamp_ms: i64,
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    encoding: i64,
    real: Vec<u8>,
}

/// The key's row now, as a log row would restore it: value (or `None`), encoding (0 when
/// absent) and its 10-byte versionstamp (zeros when absent).
fn present(conn: &Connection, key: &[u8]) -> rusqlite::Result<(Option<Vec<u8>>, i64, Vec<u8>)> {
    let row = conn
        .prepare_cached("SELECT v, v_encoding, version, seq FROM kv_snapshot WHERE k = ?1")?
        .query_row([key], |r| {
            Ok((
                r.get::<_, Vec<u8>>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
            ))
        })
        .optional()?;
    Ok(match row {
        Some((v, enc, version, seq)) => {
            let mut real = (version as u64).to_be_bytes().to_vec();
            real.extend_from_slice(&(seq as u16).to_be_bytes());
            (Some(v), enc, real)
        }
        None => (None, 0, vec![0; 10]),
    })
}

/// Applies a log row to `kv_snapshot`: a set with the row's versionstamp, or a delete.
fn apply(conn: &Connection, row: &LogRow) -> anyhow::Result<()> {
    match &row.value {
        Some(v) => {
            if row.real.len() != 10 {
                bail!(
                    "a log entry at {} has a {}-byte versionstamp",
                    hex(&row.vs12),
                    row.real.len()
                );
            }
            let version = u64::from_be_bytes(row.real[..8].try_into().expect("8 bytes"));
            let seq = u16::from_be_bytes(row.real[8..].try_into().expect("2 bytes"));
            conn.prepare_cached(UPSERT)?.execute(params![
                row.key,
                v,
                row.encoding,
                version as i64,
                seq
            ])?;
        }
        None => {
            conn.prepare_cached("DELETE FROM kv_snapshot WHERE k = ?1")?
                .execute([&row.key])?;
        }
    }
    Ok(())
}

fn read_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        vs12: r.get(0)?,
        timestamp_ms: r.get(1)?,
        key: r.get(2)?,
        value: r.get(3)?,
        encoding: r.get(4)?,
        real: r.get(5)?,
    })
}

/// How many log rows a step of a checkout reads at once.
const CHUNK: i64 = 1024;

/// Applies redo rows after `current` in order, through the first boundary at or after
/// `target` (recording each key's previous state in the undo log when `undo`).
fn forward(conn: &Connection, current: Vs12, target: Vs12, undo: bool) -> anyhow::Result<Checkout> {
    let mut keys = KeySet::default();
    let mut after = current.to_vec();
    let mut last: Option<Vec<u8>> = None;
    let mut entries = 0;
    'chunks: loop {
        let rows: Vec<LogRow> = conn
            .prepare_cached(
                "SELECT versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp
                 FROM tt_redo_log WHERE versionstamp12 > ?1 ORDER BY versionstamp12 ASC LIMIT ?2",
            )?
            .query_map(params![after, CHUNK], read_row)?
            .collect::<Result<_, _>>()?;
        if rows.is_empty() {
            break;
        }
        for row in rows {
            if undo {
                let (v, enc, real) = present(conn, &row.key)?;
                conn.prepare_cached(
                    "INSERT OR REPLACE INTO tt_undo_log
                       (versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                )?
                .execute(params![
                    row.vs12,
                    row.timestamp_ms,
                    row.key,
                    v,
                    enc,
                    real
                ])?;
            }
            apply(conn, &row)?;
            conn.prepare_cached("DELETE FROM tt_redo_log WHERE versionstamp12 = ?1")?
                .execute([&row.vs12])?;
            entries += 1;
            keys.add(&row.key);
            let done = is_boundary(&row.vs12) && row.vs12.as_slice() >= &target[..];
            after = row.vs12.clone();
            last = Some(row.vs12);
            if done {
                break 'chunks;
            }
        }
    }
    finish(last, keys, entries, current)
}

/// Undoes undo rows at or before `current`, newest first, stopping at the first boundary at
/// or before `target` (which stays: the state is just after it). Each undone entry goes back
/// into the redo log.
fn backward(conn: &Connection, current: Vs12, target: Vs12) -> anyhow::Result<Checkout> {
    let mut keys = KeySet::default();
    let mut upto = current.to_vec();
    let mut inclusive = true;
    let mut last: Option<Vec<u8>> = None;
    let mut entries = 0;
    'chunks: loop {
        let sql = if inclusive {
            "SELECT versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp
             FROM tt_undo_log WHERE versionstamp12 <= ?1 ORDER BY versionstamp12 DESC LIMIT ?2"
        } else {
            "SELECT versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp
             FROM tt_undo_log WHERE versionstamp12 < ?1 ORDER BY versionstamp12 DESC LIMIT ?2"
        };
        let rows: Vec<LogRow> = conn
            .prepare_cached(sql)?
            .query_map(params![upto, CHUNK], read_row)?
            .collect::<Result<_, _>>()?;
        if rows.is_empty() {
            break;
        }
        inclusive = false;
        for row in rows {
            if is_boundary(&row.vs12) && row.vs12.as_slice() <= &target[..] {
                last = Some(row.vs12);
                break 'chunks;
            }
            let (v, enc, real) = present(conn, &row.key)?;
            conn.prepare_cached(
                "INSERT OR REPLACE INTO tt_redo_log
                   (versionstamp12, timestamp_ms, k, v, v_encoding, real_versionstamp)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![row.vs12, row.timestamp_ms, row.key, v, enc, real])?;
            apply(conn, &row)?;
            conn.prepare_cached("DELETE FROM tt_undo_log WHERE versionstamp12 = ?1")?
                .execute([&row.vs12])?;
            entries += 1;
            keys.add(&row.key);
            upto = row.vs12.clone();
            last = Some(row.vs12);
        }
    }
    finish(last, keys, entries, current)
}

fn finish(
    last: Option<Vec<u8>>,
    keys: KeySet,
    entries: usize,
    current: Vs12,
) -> anyhow::Result<Checkout> {
    let current = match last {
        None => current,
        Some(last) if is_boundary(&last) => vs12(&last)?,
        Some(_) => bail!("redo/undo log did not end at a snapshot boundary"),
    };
    Ok(Checkout {
        current,
        entries,
        too_many_keys: keys.overflow,
        keys: keys.seen.into_iter().collect(),
    })
}

/// The distinct keys a checkout changed, up to a bound (past it, watchers are all woken).
#[derive(Default)]
struct KeySet {
    seen: std::collections::HashSet<Vec<u8>>,
    overflow: bool,
}

/// More changed keys than this wake every watcher instead of the watchers of each.
pub const MAX_NOTIFIED_KEYS: usize = 100_000;

impl KeySet {
    fn add(&mut self, key: &[u8]) {
        if self.overflow {
            return;
        }
        if self.seen.len() >= MAX_NOTIFIED_KEYS {
            self.overflow = true;
            self.seen.clear();
            return;
        }
        if !self.seen.contains(key) {
            self.seen.insert(key.to_vec());
        }
    }
}

fn vs12(bytes: &[u8]) -> anyhow::Result<Vs12> {
    bytes
        .try_into()
        .with_context(|| format!("a {}-byte versionstamp12 ({})", bytes.len(), hex(bytes)))
}

fn hex(bytes: &[u8]) -> String {
    crate::backup::names::hex(bytes)
}

#[cfg(test)]
mod tests;
