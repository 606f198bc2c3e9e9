//! The SQLite schema shared with the Deno CLI's local KV (SPEC §7): connection settings and
//! migrations 1–3.

use std::path::Path;

use anyhow::{bail, Context};
use rusqlite::{Connection, OpenFlags};

use super::wal_vfs::{self, WalWrites};

/// The `migration_state.version` this server writes and understands.
pub const SCHEMA_VERSION: i64 = 3;

const MIGRATIONS: [&str; 3] = [
    "CREATE TABLE data_version (k INTEGER PRIMARY KEY, version INTEGER NOT NULL);
     INSERT INTO data_version (k, version) VALUES (0, 0);
     CREATE TABLE kv (
       k BLOB PRIMARY KEY,
       v BLOB NOT NULL,
       v_encoding INTEGER NOT NULL,
       version INTEGER NOT NULL
     ) WITHOUT ROWID;",
    "CREATE TABLE queue (
       ts INTEGER NOT NULL,
       id TEXT NOT NULL,
       data BLOB NOT NULL,
       backoff_schedule TEXT NOT NULL,
       keys_if_undelivered BLOB NOT NULL,
       PRIMARY KEY (ts, id)
     );
     CREATE TABLE queue_running (
       deadline INTEGER NOT NULL,
       id TEXT NOT NULL,
       data BLOB NOT NULL,
       backoff_schedule TEXT NOT NULL,
       keys_if_undelivered BLOB NOT NULL,
       PRIMARY KEY (deadline, id)
     );",
    "ALTER TABLE kv ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE data_version ADD COLUMN seq INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE kv ADD COLUMN expiration_ms INTEGER NOT NULL DEFAULT -1;
     CREATE INDEX kv_expiration_ms_idx ON kv (expiration_ms);",
];

/// How hard a commit waits for the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum SyncMode {
    /// fsync the WAL at every commit: an acknowledged write survives power loss.
    Full,
    /// fsync only at checkpoints: faster; a power loss may lose the last commits.
    Normal,
}

impl SyncMode {
    fn pragma(self) -> &'static str {
        match self {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        }
    }
}

/// Opens the one read-write connection, switches the file to WAL and brings the schema up to
/// date. Creates the file if it does not exist. `wal` says how its WAL reaches the disk
/// (see `wal_vfs`).
pub fn open_writer(path: &Path, sync: SyncMode, wal: WalWrites) -> anyhow::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
        | OpenFlags::SQLITE_OPEN_CREATE
        | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let vfs = wal_vfs::vfs_name(wal, sync);
    let mut conn = Connection::open_with_flags_and_vfs(path, flags, vfs)
        .with_context(|| format!("cannot open database {}", path.display()))?;
    configure(&conn).with_context(|| format!("cannot use database {}", path.display()))?;
    // Room for the largest batch's pages, so a transaction never spills pages into the WAL
    // before its commit (the default is 2 MiB).
    conn.pragma_update(None, "cache_size", -65536)?;
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!(
            "database {} cannot use WAL mode (journal_mode is {mode})",
            path.display()
        );
    }
    conn.execute_batch(&format!("PRAGMA synchronous = {}", sync.pragma()))?;
    migrate(&mut conn).with_context(|| format!("cannot migrate database {}", path.display()))?;
    Ok(conn)
}

/// Opens a read-only connection for serving reads. The file must exist.
pub fn open_reader(path: &Path) -> anyhow::Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .with_context(|| format!("cannot open database {} for reading", path.display()))?;
    configure(&conn)?;
    let version = schema_version(&conn)
        .with_context(|| format!("cannot read database {}", path.display()))?;
    if version < SCHEMA_VERSION {
        bail!("database {} has schema version {version}; it needs {SCHEMA_VERSION} (open it once read-write)", path.display());
    }
    Ok(conn)
}

/// How long a connection waits for a lock another connection holds before it gives up.
pub const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_millis(5000);

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    conn.set_prepared_statement_cache_capacity(64);
    // Without the planner stability guarantee SQLite plans `LIMIT ?` for the bound value and
    // re-prepares the cached statement every time a new value is bound: 14x slower reads.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    Ok(())
}

/// Whether the database holds a table called `name`.
pub fn table_exists(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |r| r.get(0),
    )
}

fn schema_version(conn: &Connection) -> rusqlite::Result<i64> {
    // A replica file has a view here (SPEC §8.3): it reads as version 3.
    let exists: bool = conn.query_row(
        "SELECT count(*) > 0 FROM sqlite_master WHERE type IN ('table', 'view')
           AND name = 'migration_state'",
        [],
        |r| r.get(0),
    )?;
    if !exists {
        return Ok(0);
    }
    let v: Option<i64> = conn
        .query_row("SELECT version FROM migration_state WHERE k = 0", [], |r| {
            r.get(0)
        })
        .map(Some)
        .or_else(|e| {
            if e == rusqlite::Error::QueryReturnedNoRows {
                Ok(None)
            } else {
                Err(e)
            }
        })?;
    Ok(v.unwrap_or(0))
}

fn migrate(conn: &mut Connection) -> anyhow::Result<()> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    tx.execute_batch(
        "CREATE TABLE IF NOT EXISTS migration_state (k INTEGER NOT NULL PRIMARY KEY, version INTEGER NOT NULL)",
    )?;
    let current = schema_version(&tx)?;
    if current > SCHEMA_VERSION {
        bail!("schema version {current} is newer than this server understands ({SCHEMA_VERSION})");
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current as usize) {
        tx.execute_batch(sql)
            .with_context(|| format!("migration {}", i + 1))?;
    }
    tx.execute(
        "INSERT INTO migration_state (k, version) VALUES (0, ?1)
         ON CONFLICT (k) DO UPDATE SET version = excluded.version",
        [SCHEMA_VERSION],
    )?;
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WalWrites;

    #[test]
    fn fresh_database_gets_the_deno_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = open_writer(&path, SyncMode::Full, WalWrites::IoUring).unwrap();
        let cols: Vec<(String, String, i64, Option<String>, i64)> = conn
            .prepare("SELECT name, type, \"notnull\", dflt_value, pk FROM pragma_table_info('kv')")
            .unwrap()
            .query_map([], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let names: Vec<&str> = cols.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            names,
            ["k", "v", "v_encoding", "version", "seq", "expiration_ms"]
        );
        assert_eq!(cols[5].3.as_deref(), Some("-1"));
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2);
        assert_eq!(schema_version(&conn).unwrap(), 3);
        let dv: i64 = conn
            .query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(dv, 0);
        drop(conn);
        // Reopening runs no migration twice.
        open_writer(&path, SyncMode::Normal, WalWrites::IoUring).unwrap();
        open_reader(&path).unwrap();
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = open_writer(&path, SyncMode::Full, WalWrites::IoUring).unwrap();
        conn.execute("UPDATE migration_state SET version = 4", [])
            .unwrap();
        drop(conn);
        let err = open_writer(&path, SyncMode::Full, WalWrites::IoUring).unwrap_err();
        assert!(
            format!("{err:#}").contains("schema version 4 is newer"),
            "{err:#}"
        );
    }

    #[test]
    fn reader_needs_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        assert!(open_reader(&dir.path().join("missing.sqlite")).is_err());
    }
}
