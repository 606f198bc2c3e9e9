//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the WAL size threshold,
//! so one writer batch in a thousand pages would pay for copying the WAL into the database and
//! fsyncing it. The committer turns that off and pokes this thread after its commits instead; a
//! PASSIVE checkpoint here never blocks the committer or the readers.
//!
//! Under sustained writes a PASSIVE checkpoint never catches up with the end of the WAL, and
//! SQLite only rewinds the WAL once everything in it was checkpointed, so the file would grow
//! without bound. Past `RESTART_FRAMES` the checkpointer therefore runs a RESTART checkpoint,
//! which holds the committer up for the short time it takes to copy what PASSIVE left, and the
//! WAL file is truncated back to `JOURNAL_SIZE_LIMIT` when it rewinds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Least time between two checkpoints; pokes in between coalesce.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// WAL frames (pages) past which a checkpoint also rewinds the WAL: 32 MiB of 4 KiB pages.
pub const RESTART_FRAMES: i64 = 8192;
/// Size the WAL file is cut back to when it rewinds.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Pokes the checkpointer; dropping it stops the thread.
pub struct CheckpointPoke {
    tx: flume::Sender<()>,
    /// Set by a poke, cleared when a checkpoint starts: pokes in between send nothing, so the
    /// thread is woken once per checkpoint, not once per commit (a context switch on the
    /// committer's path to its reply, on a machine with few cores).
    pending: Arc<AtomicBool>,
}

impl CheckpointPoke {
    /// Says that commits happened; never blocks.
    pub fn poke(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.tx.try_send(());
        }
    }
}

/// The checkpointer's side of the pokes.
struct Pokes {
    rx: flume::Receiver<()>,
    pending: Arc<AtomicBool>,
}

impl Pokes {
    fn recv(&self) -> Result<(), flume::RecvError> {
        self.rx.recv()
    }

    fn recv_deadline(&self, deadline: std::time::Instant) -> Result<(), flume::RecvTimeoutError> {
        self.rx.recv_deadline(deadline)
    }

    /// A checkpoint starts: commits from now on poke again.
    fn taken(&self) {
        self.pending.store(false, Ordering::Release);
    }
}

/// Starts the checkpointer thread on its own connection to `path`.
pub fn spawn(path: &Path) -> anyhow::Result<(CheckpointPoke, JoinHandle<()>)> {
    spawn_with(path, RESTART_FRAMES)
}

/// [`spawn`] with another WAL bound (tests use a small one).
pub fn spawn_with(
    path: &Path,
    restart_frames: i64,
) -> anyhow::Result<(CheckpointPoke, JoinHandle<()>)> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(5000))?;
    limit_wal_file(&conn)?;
    let (poke, pokes) = channel();
    let thread = std::thread::Builder::new()
        .name("checkpointer".into())
        .spawn(move || run(&conn, &pokes, restart_frames))?;
    Ok((poke, thread))
}

fn channel() -> (CheckpointPoke, Pokes) {
    let (tx, rx) = flume::bounded::<()>(1);
    let pending = Arc::new(AtomicBool::new(false));
    let poke = CheckpointPoke {
        tx,
        pending: pending.clone(),
    };
    let pokes = Pokes { rx, pending };
    (poke, pokes)
}

/// Checkpoints when poked, at most once per `MIN_INTERVAL`; returns as soon as the poker is
/// dropped, even in the middle of a pause.
fn run(conn: &Connection, pokes: &Pokes, restart_frames: i64) {
    let mut poked = pokes.recv().is_ok();
    while poked {
        pokes.taken();
        crate::fatal::debug::panic_point("checkpointer");
        let result = match checkpoint(conn, "PASSIVE") {
            Ok((frames, _)) if frames >= restart_frames => checkpoint(conn, "RESTART").map(|_| ()),
            other => other.map(|_| ()),
        };
        if let Err(e) = result {
            if is_fatal(&e) {
                crate::fatal::stop(format!(
                    "a WAL checkpoint failed: {e}. Pages copied into the database file may not \
                     be on the disk; the WAL still holds them, and recovery at the next open \
                     replays it"
                ));
                return;
            }
            // A full disk or a busy reader: the WAL keeps everything; the next poke retries.
            tracing::warn!("WAL checkpoint failed: {e}");
        }
        let deadline = std::time::Instant::now() + MIN_INTERVAL;
        poked = false;
        loop {
            match pokes.recv_deadline(deadline) {
                Ok(()) => poked = true,
                Err(flume::RecvTimeoutError::Timeout) => break,
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
        }
        if !poked {
            poked = pokes.recv().is_ok();
        }
    }
}

/// An I/O error other than a full disk: after a failed write-back, the kernel may have dropped
/// pages it could not write (the "fsyncgate" lesson), so nothing read back can be trusted.
fn is_fatal(e: &rusqlite::Error) -> bool {
    match e {
        rusqlite::Error::SqliteFailure(e, _) => {
            e.code == rusqlite::ErrorCode::SystemIoFailure
                && e.extended_code != rusqlite::ffi::SQLITE_IOERR_NOMEM
        }
        _ => false,
    }
}

/// Makes a rewinding WAL shrink back to `JOURNAL_SIZE_LIMIT` (set on every connection that
/// may rewind it).
pub fn limit_wal_file(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_size_limit", JOURNAL_SIZE_LIMIT)
}

/// Runs `PRAGMA wal_checkpoint(mode)`; returns (WAL frames, frames checkpointed).
pub fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{schema, SyncMode, WalWrites};

    #[test]
    fn sustained_writes_cannot_grow_the_wal_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = schema::open_writer(&path, SyncMode::Normal, WalWrites::IoUring).unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        limit_wal_file(&writer).unwrap();
        let (poke, thread) = spawn_with(&path, 64).unwrap();
        let value = vec![7u8; 3000];
        let wal = dir.path().join("db.sqlite-wal");
        let mut largest = 0;
        // 2,000 commits of about five pages each, poking after each as the committer does.
        for i in 0..2000u32 {
            writer
                .execute(
                    "INSERT INTO kv (k, v, v_encoding, version) VALUES (?1, ?2, 3, 1)",
                    rusqlite::params![i.to_be_bytes(), value],
                )
                .unwrap();
            poke.poke();
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            // Room for the checkpointer thread to run even on a busy machine (it failed once at
            // 28 MB with every 50th commit here while two builds shared the two cores).
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        drop(poke);
        thread.join().unwrap();
        // Without the restart the WAL ends near 11,000 frames (44 MB) here; with it the file only
        // holds what arrives between two checkpoints.
        assert!(
            largest < 24 * 1024 * 1024,
            "the WAL file reached {largest} bytes"
        );
    }

    #[test]
    fn pokes_between_two_checkpoints_wake_the_thread_once() {
        let (poke, pokes) = channel();
        for _ in 0..1000 {
            poke.poke();
        }
        assert_eq!(pokes.rx.len(), 1, "one message for a thousand commits");
        pokes.recv().unwrap();
        // Not yet taken: commits while the checkpointer pauses send nothing.
        poke.poke();
        assert_eq!(pokes.rx.len(), 0);
        // A checkpoint starts: the next commit pokes again, and is not lost.
        pokes.taken();
        poke.poke();
        poke.poke();
        assert_eq!(pokes.rx.len(), 1);
        drop(poke);
        assert!(pokes.recv().is_ok(), "the queued poke outlives the poker");
        assert!(pokes.recv().is_err(), "then the thread stops");
    }
}
