//! The writer connection's SQLite VFS: a thin layer over the default (unix) VFS that only
//! touches the write-ahead log.
//!
//! - It times every WAL sync (`denokv_wal_sync_duration_seconds`).
//! - In its io_uring flavour it also keeps the WAL writes of a transaction in memory (one
//!   contiguous buffer: SQLite appends frames) and, at the commit's sync, submits them and the
//!   `fdatasync` as one linked io_uring submission: one system call per commit instead of two
//!   `pwrite`s per page plus an `fsync`. Any other call on the WAL (read, size, truncate,
//!   close, file control) first writes out what is buffered, so SQLite never sees a difference.
//!
//! The buffering is only correct when every commit syncs the WAL (`synchronous=FULL`): with
//! `NORMAL` a commit would be visible to readers while its frames were still in our buffer. So
//! [`vfs_name`] hands out the io_uring flavour only for [`SyncMode::Full`].
//!
//! Every other file (the database, the shared-memory index, temporary files) is opened by the
//! default VFS straight into SQLite's file object, so it runs the default code unchanged.

mod faults;
/// Public only for the fuzz target `uring_writer` (fuzz/), which checks its frame buffering.
#[doc(hidden)]
pub mod uring;

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;
use std::time::Instant;

use io_uring::IoUring;
use rusqlite::ffi;

use self::faults::Op;
use self::uring::UringWriter;
use super::SyncMode;

pub use self::faults::{inject as inject_faults, inject_from_env as inject_faults_from_env};
pub use self::faults::{Op as FaultOp, Plan as FaultPlan};
#[cfg(test)]
pub use self::uring::syncs_on_this_thread as uring_syncs_on_this_thread;

/// How the writer's WAL reaches the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WalWrites {
    /// A commit's WAL writes and its fdatasync as one io_uring submission (needs io_uring and
    /// `--sync-mode full`; otherwise `pwrite` is used).
    IoUring,
    /// SQLite's own `pwrite` per page and `fsync` per commit.
    Pwrite,
}

/// Name of the VFS the writer opens its database with, registering it on first use: the
/// io_uring flavour when asked for, available, and correct for `sync` (see [`describe`]).
pub fn vfs_name(wanted: WalWrites, sync: SyncMode) -> &'static str {
    match choose(wanted, sync) {
        Ok(()) => URING_NAME,
        Err(_) => PLAIN_NAME,
    }
}

/// How the writer's WAL is written, and why, for the log.
pub fn describe(wanted: WalWrites, sync: SyncMode) -> &'static str {
    match choose(wanted, sync) {
        Ok(()) => "io_uring",
        Err(why) => why,
    }
}

fn choose(wanted: WalWrites, sync: SyncMode) -> Result<(), &'static str> {
    let vfs = registered();
    match wanted {
        WalWrites::Pwrite => Err("pwrite"),
        WalWrites::IoUring if sync != SyncMode::Full => {
            Err("pwrite (io_uring batching needs --sync-mode full)")
        }
        WalWrites::IoUring if !vfs.uring_available => Err("pwrite (io_uring is not available)"),
        WalWrites::IoUring => Ok(()),
    }
}

/// Where WAL sync durations are recorded (the metrics registry sets it once).
pub fn observe_syncs(histogram: prometheus::Histogram) {
    let _ = SYNC_HISTOGRAM.set(histogram);
}

const URING_NAME: &str = "denokv-wal-uring";
const PLAIN_NAME: &str = "denokv-wal";

static SYNC_HISTOGRAM: OnceLock<prometheus::Histogram> = OnceLock::new();
static REGISTERED: OnceLock<Registered> = OnceLock::new();

struct Registered {
    uring_available: bool,
}

/// What each of our two `sqlite3_vfs` points to through `pAppData`.
struct VfsData {
    base: *mut ffi::sqlite3_vfs,
    uring: bool,
}

fn registered() -> &'static Registered {
    REGISTERED.get_or_init(|| {
        // SAFETY: sqlite3_vfs_find/register are thread-safe after sqlite3_initialize, which
        // they call themselves; the structs we register are leaked, so they live forever.
        unsafe {
            let base = ffi::sqlite3_vfs_find(std::ptr::null());
            assert!(!base.is_null(), "SQLite has no default VFS");
            register(base, PLAIN_NAME, false);
            let uring_available = IoUring::new(4).is_ok();
            if uring_available {
                register(base, URING_NAME, true);
            }
            Registered { uring_available }
        }
    })
}

unsafe fn register(base: *mut ffi::sqlite3_vfs, name: &'static str, uring: bool) {
    let data = Box::leak(Box::new(VfsData { base, uring }));
    let name = CString::new(name)
        .expect("VFS names have no NUL")
        .into_raw();
    let vfs = Box::leak(Box::new(ffi::sqlite3_vfs {
        iVersion: 3.min((*base).iVersion),
        szOsFile: (HEADER + (*base).szOsFile as usize) as c_int,
        mxPathname: (*base).mxPathname,
        pNext: std::ptr::null_mut(),
        zName: name,
        pAppData: data as *mut VfsData as *mut c_void,
        xOpen: Some(vfs_open),
        xDelete: Some(vfs_delete),
        xAccess: Some(vfs_access),
        xFullPathname: Some(vfs_full_pathname),
        // The default VFS ignores its first argument in these; passing ours is harmless.
        xDlOpen: (*base).xDlOpen,
        xDlError: (*base).xDlError,
        xDlSym: (*base).xDlSym,
        xDlClose: (*base).xDlClose,
        xRandomness: Some(vfs_randomness),
        xSleep: Some(vfs_sleep),
        xCurrentTime: Some(vfs_current_time),
        xGetLastError: Some(vfs_get_last_error),
        xCurrentTimeInt64: Some(vfs_current_time_int64),
        xSetSystemCall: (*base).xSetSystemCall,
        xGetSystemCall: (*base).xGetSystemCall,
        xNextSystemCall: (*base).xNextSystemCall,
    }));
    let rc = ffi::sqlite3_vfs_register(vfs, 0);
    assert_eq!(rc, ffi::SQLITE_OK, "cannot register the {name:?} VFS");
}

/// Our part of a WAL file object; the default VFS's file object follows at `HEADER`.
#[repr(C)]
struct WalFile {
    base: ffi::sqlite3_file,
    state: *mut WalState,
}

/// Room for [`WalFile`], rounded up so the default VFS's object stays aligned.
const HEADER: usize = (std::mem::size_of::<WalFile>() + 15) & !15;

struct WalState {
    /// `None` for the plain flavour.
    uring: Option<UringWriter>,
}

unsafe fn data(vfs: *mut ffi::sqlite3_vfs) -> &'static VfsData {
    &*((*vfs).pAppData as *const VfsData)
}

/// The default VFS's file object inside ours.
unsafe fn inner(file: *mut ffi::sqlite3_file) -> *mut ffi::sqlite3_file {
    (file as *mut u8).add(HEADER) as *mut ffi::sqlite3_file
}

unsafe fn inner_methods(file: *mut ffi::sqlite3_file) -> &'static ffi::sqlite3_io_methods {
    &*(*inner(file)).pMethods
}

unsafe fn state<'a>(file: *mut ffi::sqlite3_file) -> &'a mut WalState {
    &mut *(*(file as *mut WalFile)).state
}

unsafe extern "C" fn vfs_open(
    vfs: *mut ffi::sqlite3_vfs,
    name: ffi::sqlite3_filename,
    file: *mut ffi::sqlite3_file,
    flags: c_int,
    out_flags: *mut c_int,
) -> c_int {
    let data = data(vfs);
    let open = (*data.base).xOpen.expect("the default VFS opens files");
    if flags & ffi::SQLITE_OPEN_WAL == 0 {
        // Not the WAL: the default VFS's object takes our whole slot, methods and all.
        return open(data.base, name, file, flags, out_flags);
    }
    (*file).pMethods = std::ptr::null();
    let rc = open(data.base, name, inner(file), flags, out_flags);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    let uring = if data.uring && !name.is_null() {
        UringWriter::open(CStr::from_ptr(name))
            .map_err(|e| tracing::warn!("WAL writes fall back to pwrite: {e}"))
            .ok()
    } else {
        None
    };
    (*(file as *mut WalFile)).state = Box::into_raw(Box::new(WalState { uring }));
    (*file).pMethods = &WAL_METHODS;
    ffi::SQLITE_OK
}

/// Writes out what is buffered before a call that must see the file as SQLite wrote it.
unsafe fn settle(file: *mut ffi::sqlite3_file) -> c_int {
    match state(file).uring.as_mut().map(|u| u.flush(false)) {
        Some(Err(e)) => {
            tracing::error!("writing the WAL failed: {}", std::io::Error::from(e));
            ffi::SQLITE_IOERR_WRITE
        }
        _ => ffi::SQLITE_OK,
    }
}

static WAL_METHODS: ffi::sqlite3_io_methods = ffi::sqlite3_io_methods {
    iVersion: 3,
    xClose: Some(wal_close),
    xRead: Some(wal_read),
    xWrite: Some(wal_write),
    xTruncate: Some(wal_truncate),
    xSync: Some(wal_sync),
    xFileSize: Some(wal_file_size),
    xLock: Some(wal_lock),
    xUnlock: Some(wal_unlock),
    xCheckReservedLock: Some(wal_check_reserved_lock),
    xFileControl: Some(wal_file_control),
    xSectorSize: Some(wal_sector_size),
    xDeviceCharacteristics: Some(wal_device_characteristics),
    xShmMap: Some(wal_shm_map),
    xShmLock: Some(wal_shm_lock),
    xShmBarrier: Some(wal_shm_barrier),
    xShmUnmap: Some(wal_shm_unmap),
    xFetch: Some(wal_fetch),
    xUnfetch: Some(wal_unfetch),
};

unsafe extern "C" fn wal_close(file: *mut ffi::sqlite3_file) -> c_int {
    let settled = settle(file);
    drop(Box::from_raw((*(file as *mut WalFile)).state));
    let rc = (inner_methods(file).xClose.expect("xClose"))(inner(file));
    (*file).pMethods = std::ptr::null();
    if settled != ffi::SQLITE_OK {
        settled
    } else {
        rc
    }
}

unsafe extern "C" fn wal_read(
    file: *mut ffi::sqlite3_file,
    buf: *mut c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    let rc = settle(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    (inner_methods(file).xRead.expect("xRead"))(inner(file), buf, amount, offset)
}

unsafe extern "C" fn wal_write(
    file: *mut ffi::sqlite3_file,
    buf: *const c_void,
    amount: c_int,
    offset: ffi::sqlite3_int64,
) -> c_int {
    if let Some(errno) = faults::check(Op::Write) {
        tracing::error!("writing the WAL failed (injected): errno {errno}");
        return if errno == libc::ENOSPC {
            ffi::SQLITE_FULL
        } else {
            ffi::SQLITE_IOERR_WRITE
        };
    }
    match state(file).uring.as_mut() {
        Some(uring) => {
            let bytes = std::slice::from_raw_parts(buf as *const u8, amount as usize);
            match uring.write(bytes, offset as u64) {
                Ok(()) => ffi::SQLITE_OK,
                Err(e) => {
                    tracing::error!("writing the WAL failed: {e}");
                    if e.raw_os_error() == Some(libc::ENOSPC) {
                        ffi::SQLITE_FULL
                    } else {
                        ffi::SQLITE_IOERR_WRITE
                    }
                }
            }
        }
        None => (inner_methods(file).xWrite.expect("xWrite"))(inner(file), buf, amount, offset),
    }
}

unsafe extern "C" fn wal_truncate(file: *mut ffi::sqlite3_file, size: ffi::sqlite3_int64) -> c_int {
    let rc = settle(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    (inner_methods(file).xTruncate.expect("xTruncate"))(inner(file), size)
}

unsafe extern "C" fn wal_sync(file: *mut ffi::sqlite3_file, flags: c_int) -> c_int {
    let started = Instant::now();
    let rc = match state(file).uring.as_mut() {
        Some(uring) if uring.synced_once => match uring.flush(true) {
            Ok(()) => ffi::SQLITE_OK,
            Err(e) => {
                let code = e.code();
                tracing::error!("syncing the WAL failed: {}", std::io::Error::from(e));
                code
            }
        },
        Some(uring) => {
            uring.synced_once = true;
            match uring.flush(false) {
                Ok(()) => (inner_methods(file).xSync.expect("xSync"))(inner(file), flags),
                Err(e) => e.code(),
            }
        }
        None => (inner_methods(file).xSync.expect("xSync"))(inner(file), flags),
    };
    // Injected after the real sync: the commit is on the disk, SQLite is told it failed.
    let rc = match faults::check(Op::Sync) {
        Some(errno) if rc == ffi::SQLITE_OK => {
            tracing::error!("syncing the WAL failed (injected): errno {errno}");
            ffi::SQLITE_IOERR_FSYNC
        }
        _ => rc,
    };
    if let Some(h) = SYNC_HISTOGRAM.get() {
        h.observe(started.elapsed().as_secs_f64());
    }
    rc
}

unsafe extern "C" fn wal_file_size(
    file: *mut ffi::sqlite3_file,
    size: *mut ffi::sqlite3_int64,
) -> c_int {
    let rc = settle(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    (inner_methods(file).xFileSize.expect("xFileSize"))(inner(file), size)
}

unsafe extern "C" fn wal_lock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    (inner_methods(file).xLock.expect("xLock"))(inner(file), lock)
}

unsafe extern "C" fn wal_unlock(file: *mut ffi::sqlite3_file, lock: c_int) -> c_int {
    (inner_methods(file).xUnlock.expect("xUnlock"))(inner(file), lock)
}

unsafe extern "C" fn wal_check_reserved_lock(
    file: *mut ffi::sqlite3_file,
    out: *mut c_int,
) -> c_int {
    (inner_methods(file)
        .xCheckReservedLock
        .expect("xCheckReservedLock"))(inner(file), out)
}

unsafe extern "C" fn wal_file_control(
    file: *mut ffi::sqlite3_file,
    op: c_int,
    arg: *mut c_void,
) -> c_int {
    let rc = settle(file);
    if rc != ffi::SQLITE_OK {
        return rc;
    }
    (inner_methods(file).xFileControl.expect("xFileControl"))(inner(file), op, arg)
}

unsafe extern "C" fn wal_sector_size(file: *mut ffi::sqlite3_file) -> c_int {
    (inner_methods(file).xSectorSize.expect("xSectorSize"))(inner(file))
}

unsafe extern "C" fn wal_device_characteristics(file: *mut ffi::sqlite3_file) -> c_int {
    (inner_methods(file)
        .xDeviceCharacteristics
        .expect("xDeviceCharacteristics"))(inner(file))
}

unsafe extern "C" fn wal_shm_map(
    file: *mut ffi::sqlite3_file,
    page: c_int,
    size: c_int,
    extend: c_int,
    out: *mut *mut c_void,
) -> c_int {
    match inner_methods(file).xShmMap {
        Some(f) => f(inner(file), page, size, extend, out),
        None => ffi::SQLITE_IOERR,
    }
}

unsafe extern "C" fn wal_shm_lock(
    file: *mut ffi::sqlite3_file,
    offset: c_int,
    n: c_int,
    flags: c_int,
) -> c_int {
    match inner_methods(file).xShmLock {
        Some(f) => f(inner(file), offset, n, flags),
        None => ffi::SQLITE_IOERR,
    }
}

unsafe extern "C" fn wal_shm_barrier(file: *mut ffi::sqlite3_file) {
    if let Some(f) = inner_methods(file).xShmBarrier {
        f(inner(file))
    }
}

unsafe extern "C" fn wal_shm_unmap(file: *mut ffi::sqlite3_file, delete: c_int) -> c_int {
    match inner_methods(file).xShmUnmap {
        Some(f) => f(inner(file), delete),
        None => ffi::SQLITE_OK,
    }
}

unsafe extern "C" fn wal_fetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    amount: c_int,
    out: *mut *mut c_void,
) -> c_int {
    match inner_methods(file).xFetch {
        Some(f) => {
            let rc = settle(file);
            if rc != ffi::SQLITE_OK {
                return rc;
            }
            f(inner(file), offset, amount, out)
        }
        None => {
            *out = std::ptr::null_mut();
            ffi::SQLITE_OK
        }
    }
}

unsafe extern "C" fn wal_unfetch(
    file: *mut ffi::sqlite3_file,
    offset: ffi::sqlite3_int64,
    page: *mut c_void,
) -> c_int {
    match inner_methods(file).xUnfetch {
        Some(f) => f(inner(file), offset, page),
        None => ffi::SQLITE_OK,
    }
}

// The VFS-level calls go to the default VFS with its own pointer.

unsafe extern "C" fn vfs_delete(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    dir: c_int,
) -> c_int {
    let base = data(vfs).base;
    ((*base).xDelete.expect("xDelete"))(base, name, dir)
}

unsafe extern "C" fn vfs_access(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    flags: c_int,
    out: *mut c_int,
) -> c_int {
    let base = data(vfs).base;
    ((*base).xAccess.expect("xAccess"))(base, name, flags, out)
}

unsafe extern "C" fn vfs_full_pathname(
    vfs: *mut ffi::sqlite3_vfs,
    name: *const c_char,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let base = data(vfs).base;
    ((*base).xFullPathname.expect("xFullPathname"))(base, name, n, out)
}

unsafe extern "C" fn vfs_randomness(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let base = data(vfs).base;
    ((*base).xRandomness.expect("xRandomness"))(base, n, out)
}

unsafe extern "C" fn vfs_sleep(vfs: *mut ffi::sqlite3_vfs, micros: c_int) -> c_int {
    let base = data(vfs).base;
    ((*base).xSleep.expect("xSleep"))(base, micros)
}

unsafe extern "C" fn vfs_current_time(vfs: *mut ffi::sqlite3_vfs, out: *mut f64) -> c_int {
    let base = data(vfs).base;
    ((*base).xCurrentTime.expect("xCurrentTime"))(base, out)
}

unsafe extern "C" fn vfs_get_last_error(
    vfs: *mut ffi::sqlite3_vfs,
    n: c_int,
    out: *mut c_char,
) -> c_int {
    let base = data(vfs).base;
    match (*base).xGetLastError {
        Some(f) => f(base, n, out),
        None => 0,
    }
}

unsafe extern "C" fn vfs_current_time_int64(
    vfs: *mut ffi::sqlite3_vfs,
    out: *mut ffi::sqlite3_int64,
) -> c_int {
    let base = data(vfs).base;
    match (*base).xCurrentTimeInt64 {
        Some(f) => f(base, out),
        None => {
            let mut days = 0.0;
            let rc = vfs_current_time(vfs, &mut days);
            *out = (days * 86_400_000.0) as ffi::sqlite3_int64;
            rc
        }
    }
}

#[cfg(test)]
mod tests {
    use rusqlite::{params, Connection, OpenFlags};

    use super::*;

    /// A writer through the io_uring flavour on a fresh file, with a table `t`.
    fn uring_writer(path: &std::path::Path) -> Connection {
        assert_eq!(
            describe(WalWrites::IoUring, SyncMode::Full),
            "io_uring",
            "these tests need io_uring"
        );
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
        let name = vfs_name(WalWrites::IoUring, SyncMode::Full);
        let conn = Connection::open_with_flags_and_vfs(path, flags, name).unwrap();
        conn.execute_batch(
            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
             CREATE TABLE IF NOT EXISTS t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);",
        )
        .unwrap();
        conn
    }

    fn plain(path: &std::path::Path) -> Connection {
        Connection::open(path).unwrap()
    }

    fn value(k: i64, round: i64) -> Vec<u8> {
        // Sizes from a few bytes to several pages, so frames and overflow pages vary.
        let len = ((k * 7919 + round * 104_729) % 20_000) as usize + 1;
        (0..len).map(|i| (i as i64 + k + round) as u8).collect()
    }

    fn contents(conn: &Connection) -> Vec<(i64, Vec<u8>)> {
        let mut stmt = conn.prepare("SELECT k, v FROM t ORDER BY k").unwrap();
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?))).unwrap();
        rows.map(Result::unwrap).collect()
    }

    fn integrity(conn: &Connection) -> String {
        conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
            .unwrap()
    }

    #[test]
    fn every_commit_is_visible_to_another_connection_at_once_and_survives_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut writer = uring_writer(&path);
        let reader = plain(&path);
        let mut expected = std::collections::BTreeMap::new();
        for round in 0..60 {
            let tx = writer.transaction().unwrap();
            for k in (round * 3)..(round * 3 + 25) {
                let v = value(k, round);
                tx.execute(
                    "INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)",
                    params![k, v],
                )
                .unwrap();
                expected.insert(k, v);
            }
            tx.commit().unwrap();
            // The commit's frames must be in the file before SQLite publishes the commit.
            let seen = contents(&reader);
            assert_eq!(seen.len(), expected.len(), "round {round}");
            assert!(seen.iter().eq(expected
                .iter()
                .map(|(k, v)| (*k, v.clone()))
                .collect::<Vec<_>>()
                .iter()));
        }
        drop(reader);
        drop(writer);
        let reopened = plain(&path);
        assert_eq!(integrity(&reopened), "ok");
        assert_eq!(contents(&reopened).len(), expected.len());
    }

    #[test]
    fn a_rolled_back_transaction_that_spilled_into_the_wal_leaves_no_trace() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut writer = uring_writer(&path);
        // A tiny cache makes SQLite spill dirty pages into the WAL (and read them back)
        // in the middle of the transaction.
        writer.execute_batch("PRAGMA cache_size = 10").unwrap();
        let tx = writer.transaction().unwrap();
        for k in 0..50 {
            tx.execute(
                "INSERT INTO t (k, v) VALUES (?1, ?2)",
                params![k, value(k, 0)],
            )
            .unwrap();
        }
        tx.commit().unwrap();
        let before = contents(&writer);

        let tx = writer.transaction().unwrap();
        for k in 0..400 {
            tx.execute(
                "INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)",
                params![k, value(k, 1)],
            )
            .unwrap();
        }
        // Read back what was spilled: must see this transaction's own writes.
        let n: i64 = tx
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        assert_eq!(n, 400);
        tx.rollback().unwrap();
        assert_eq!(contents(&writer), before);

        let tx = writer.transaction().unwrap();
        tx.execute("INSERT INTO t (k, v) VALUES (1000, x'01')", [])
            .unwrap();
        tx.commit().unwrap();
        drop(writer);
        let reopened = plain(&path);
        assert_eq!(integrity(&reopened), "ok");
        let mut want = before;
        want.push((1000, vec![1]));
        assert_eq!(contents(&reopened), want);
    }

    #[test]
    fn checkpoints_by_another_connection_between_commits_lose_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = uring_writer(&path);
        let other = plain(&path);
        for round in 0..30i64 {
            writer
                .execute(
                    "INSERT INTO t (k, v) VALUES (?1, ?2)",
                    params![round, value(round, 2)],
                )
                .unwrap();
            let mode = ["PASSIVE", "RESTART", "TRUNCATE"][round as usize % 3];
            other
                .query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
                .unwrap();
        }
        drop(writer);
        drop(other);
        let reopened = plain(&path);
        assert_eq!(integrity(&reopened), "ok");
        let keys: Vec<i64> = contents(&reopened).into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, (0..30).collect::<Vec<_>>());
    }

    #[test]
    fn both_flavours_write_the_same_database() {
        let dir = tempfile::tempdir().unwrap();
        let mut results = Vec::new();
        for wal in [WalWrites::IoUring, WalWrites::Pwrite] {
            let path = dir.path().join(format!("{wal:?}.sqlite"));
            let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE;
            let conn =
                Connection::open_with_flags_and_vfs(&path, flags, vfs_name(wal, SyncMode::Full))
                    .unwrap();
            conn.execute_batch(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;
                 CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);",
            )
            .unwrap();
            for k in 0..100 {
                conn.execute(
                    "INSERT INTO t (k, v) VALUES (?1, ?2)",
                    params![k % 37, value(k, 3)],
                )
                .or_else(|_| {
                    conn.execute(
                        "UPDATE t SET v = ?2 WHERE k = ?1",
                        params![k % 37, value(k, 3)],
                    )
                })
                .unwrap();
            }
            results.push(contents(&conn));
        }
        assert_eq!(results[0], results[1]);
    }

    #[test]
    fn normal_sync_mode_never_gets_the_buffering_flavour() {
        assert_eq!(vfs_name(WalWrites::IoUring, SyncMode::Normal), PLAIN_NAME);
        assert_eq!(vfs_name(WalWrites::Pwrite, SyncMode::Full), PLAIN_NAME);
    }
}
