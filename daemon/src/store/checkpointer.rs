//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the WAL size threshold,
//! so one writer batch in a thousand pages would pay for copying the WAL into the database and
//! fsyncing it. The committer turns that off and pokes this thread after its commits instead; a
//! PASSIVE checkpoint here never blocks the committer or the readers.
//!
//! SQLite only rewinds the WAL (the next writer starts again at its beginning) once everything
//! in it was copied into the database, and under sustained writes a PASSIVE checkpoint never
//! catches up with the end of the WAL, so the file would grow without bound. Past
//! `WalBound::restart_frames` the checkpointer therefore catches up: it syncs what its passes
//! copied and makes more passes while the writers write, until a pass finds at most
//! `FINISH_FRAMES` new, and then asks the committer to run a RESTART checkpoint on its own
//! connection between two of its transactions (`Checkpoints::finish_requested`): nothing is
//! appended meanwhile, so it copies and syncs only the last frames (1-4 ms of held-up writes at
//! 10M keys) and rewinds the WAL; a WAL file that grew past `JOURNAL_SIZE_LIMIT` is cut back to
//! it at the next commit.
//!
//! Why not a RESTART from this thread: it needs the write lock, which the committer frees for
//! microseconds between batches, and SQLite's busy handler polls for it in sleeps of up to
//! 100 ms. Under load at 10M keys such a RESTART waited up to 5.7 s while the WAL grew to
//! 820 MiB, and writes stalled meanwhile (docs/PERFORMANCE.md).

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// How large the WAL may grow, and how often it is checkpointed.
#[derive(Clone, Copy, Debug)]
pub struct WalBound {
    /// WAL frames (pages) past which the checkpointer makes the WAL rewind.
    pub restart_frames: i64,
    /// Least time between two checkpoints; pokes in between coalesce. The WAL may grow by what
    /// is written in this time beyond `restart_frames`.
    pub interval: Duration,
}

impl WalBound {
    /// 32 MiB of 4 KiB pages, checkpointed at most 5 times a second.
    pub const DEFAULT: WalBound = WalBound {
        restart_frames: 8192,
        interval: Duration::from_millis(200),
    };
}
/// Frames the checkpointer's passes may leave for the committer to copy: the committer holds
/// writes up while it does.
const FINISH_FRAMES: i64 = 1024;
/// Most passes the checkpointer makes to catch up before it hands the rest over.
const CATCH_UP_PASSES: u32 = 4;
/// Longest the committer waits for readers when it finishes a checkpoint, holding writes up.
const FINISH_READER_WAIT_MS: i32 = 10;
/// Finishes held back by readers in a row after which the committer is asked again only after
/// a pause: one checkpoint interval, doubled at each further one up to `HELD_BACK_MAX`.
const HELD_BACK_TRIES: u32 = 3;
const HELD_BACK_MAX: Duration = Duration::from_secs(5);
/// Size the WAL file is cut back to when it rewinds.
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// The committer's side of the checkpointer: pokes it after commits, and copies the last frames
/// of the WAL when it asks. Dropping it stops the thread.
pub struct Checkpoints {
    tx: flume::Sender<()>,
    /// Set by a poke, cleared when a checkpoint starts: pokes in between send nothing, so the
    /// thread is woken once per checkpoint, not once per commit (a context switch on the
    /// committer's path to its reply, on a machine with few cores).
    pending: Arc<AtomicBool>,
    /// Set by the checkpointer when it wants the committer to finish a checkpoint.
    finish_wanted: Arc<AtomicBool>,
    /// Where the committer's pass reports; the checkpointer waits for it.
    finished: flume::Sender<rusqlite::Result<(i64, i64)>>,
}

impl Checkpoints {
    /// Says that commits happened; never blocks.
    pub fn poke(&self) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            let _ = self.tx.try_send(());
        }
    }

    /// If the checkpointer asked for it, copies what is left of the WAL into the database on
    /// `conn`, the writer's connection, outside any transaction (nothing is appended meanwhile),
    /// and rewinds the WAL.
    pub fn finish_requested(&self, conn: &Connection) {
        if self.finish_wanted.swap(false, Ordering::AcqRel) {
            let _ = self.finished.try_send(restart_briefly(conn));
        }
    }
}

/// A RESTART checkpoint that waits for readers still on older WAL frames (each core's ends
/// within `SNAPSHOT_HOLD`) for at most about `FINISH_READER_WAIT_MS`, checking every 100 µs
/// (SQLite's own busy handler sleeps up to 100 ms at a time). A longer read, such as a backup
/// upload's snapshot, is not waited for: the writes it would hold up matter more than the
/// WAL's size, and the next round tries again.
fn restart_briefly(conn: &Connection) -> rusqlite::Result<(i64, i64)> {
    fn poll(retries: i32) -> bool {
        if retries >= FINISH_READER_WAIT_MS * 10 {
            return false;
        }
        std::thread::sleep(Duration::from_micros(100));
        true
    }
    conn.busy_handler(Some(poll))?;
    let result = checkpoint(conn, "RESTART");
    conn.busy_timeout(super::schema::BUSY_TIMEOUT)?;
    result
}

/// The checkpointer's side of the committer.
struct Committer {
    rx: flume::Receiver<()>,
    pending: Arc<AtomicBool>,
    finish_wanted: Arc<AtomicBool>,
    finished: flume::Receiver<rusqlite::Result<(i64, i64)>>,
    /// Wakes the committer's thread when it waits for writes.
    wake: Box<dyn Fn() + Send>,
}

impl Committer {
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

    /// Asks the committer to finish the checkpoint and waits for its pass; `None` once the
    /// committer has stopped.
    fn finish(&self) -> Option<rusqlite::Result<(i64, i64)>> {
        self.finish_wanted.store(true, Ordering::Release);
        (self.wake)();
        self.finished.recv().ok()
    }
}

/// Starts the checkpointer thread on its own connection to `path`, keeping the WAL within
/// `bound` (`WalBound::DEFAULT`; tests use a small one); `wake` wakes the committer's thread
/// (see `Checkpoints::finish_requested`).
pub fn spawn(
    path: &Path,
    bound: WalBound,
    wake: Box<dyn Fn() + Send>,
) -> anyhow::Result<(Checkpoints, JoinHandle<()>)> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(super::schema::BUSY_TIMEOUT)?;
    limit_wal_file(&conn)?;
    // Read-only is enough for fsync.
    let db = std::fs::File::open(path)?;
    let (checkpoints, committer) = channel(wake);
    let thread = std::thread::Builder::new()
        .name("checkpointer".into())
        .spawn(move || run(&conn, &db, &committer, bound))?;
    Ok((checkpoints, thread))
}

fn channel(wake: Box<dyn Fn() + Send>) -> (Checkpoints, Committer) {
    let (tx, rx) = flume::bounded::<()>(1);
    // One request at a time: the checkpointer waits for each answer.
    let (finished_tx, finished_rx) = flume::bounded(1);
    let pending = Arc::new(AtomicBool::new(false));
    let finish_wanted = Arc::new(AtomicBool::new(false));
    let checkpoints = Checkpoints {
        tx,
        pending: pending.clone(),
        finish_wanted: finish_wanted.clone(),
        finished: finished_tx,
    };
    let committer = Committer {
        rx,
        pending,
        finish_wanted,
        finished: finished_rx,
        wake,
    };
    (checkpoints, committer)
}

/// Checkpoints when poked, at most once per `bound.interval`; returns as soon as the
/// committer's side is dropped, even in the middle of a pause.
fn run(conn: &Connection, db: &std::fs::File, committer: &Committer, bound: WalBound) {
    let mut held_back = HeldBack::new(bound.interval);
    let mut poked = committer.recv().is_ok();
    while poked {
        committer.taken();
        crate::fatal::debug::panic_point("checkpointer");
        match checkpoint_round(conn, db, committer, bound.restart_frames, &mut held_back) {
            Ok(Round::Done) => {}
            Ok(Round::CommitterStopped) => return,
            Err(e) => {
                if is_fatal(&e) {
                    crate::fatal::stop(format!(
                        "a WAL checkpoint failed: {e}. Pages copied into the database file may \
                         not be on the disk; the WAL still holds them, and recovery at the next \
                         open replays it"
                    ));
                    return;
                }
                // A full disk or a busy reader: the WAL keeps everything; the next poke retries.
                tracing::warn!("WAL checkpoint failed: {e}");
            }
        }
        let deadline = std::time::Instant::now() + bound.interval;
        poked = false;
        loop {
            match committer.recv_deadline(deadline) {
                Ok(()) => poked = true,
                Err(flume::RecvTimeoutError::Timeout) => break,
                Err(flume::RecvTimeoutError::Disconnected) => return,
            }
        }
        if !poked {
            poked = committer.recv().is_ok();
        }
    }
}

enum Round {
    Done,
    CommitterStopped,
}

/// One checkpoint: a PASSIVE pass, and past `restart_frames` the catch-up and the committer's
/// RESTART that rewind the WAL (module comment).
fn checkpoint_round(
    conn: &Connection,
    db: &std::fs::File,
    committer: &Committer,
    restart_frames: i64,
    held_back: &mut HeldBack,
) -> rusqlite::Result<Round> {
    let (frames, mut copied) = checkpoint(conn, "PASSIVE")?;
    if frames < restart_frames {
        return Ok(Round::Done);
    }
    // A pass copies the frames that were there when it began; the writers append more
    // meanwhile. Each pass copies what was appended during the one before, so the gap shrinks
    // as long as copying is faster than writing. What the last pass left, the committer copies.
    //
    // A pass that has not caught up with the end of the WAL does not sync the database file
    // (the WAL still holds what it copied): only the one that catches up does, the committer's.
    // Left to it, that sync would write back the pages of every pass while writes wait (60 to
    // 120 ms at 10M keys); synced here, it has only its own last frames to write.
    for _ in 1..CATCH_UP_PASSES {
        sync_database(db)?;
        let (frames, now_copied) = checkpoint(conn, "PASSIVE")?;
        let appended = frames - copied;
        copied = now_copied;
        if appended <= FINISH_FRAMES {
            break;
        }
    }
    sync_database(db)?;
    if !held_back.may_ask() {
        return Ok(Round::Done);
    }
    match committer.finish() {
        Some(result) => {
            let (frames, copied) = result?;
            held_back.record(copied < frames);
            Ok(Round::Done)
        }
        None => Ok(Round::CommitterStopped),
    }
}

/// A read that lasts (a backup upload's snapshot, say) holds the WAL's rewind back for as long
/// as it lasts, and each finish the committer tries meanwhile holds writes up for
/// `FINISH_READER_WAIT_MS`. A busy reader may hold back a try now and then (its thread was not
/// scheduled in time), and the next round should try again; after `HELD_BACK_TRIES` in a row,
/// the committer is asked again only after a pause that starts at one checkpoint interval and
/// doubles up to `HELD_BACK_MAX`.
struct HeldBack {
    first: Duration,
    /// Tries held back in a row.
    tries: u32,
    until: Option<std::time::Instant>,
}

impl HeldBack {
    fn new(first: Duration) -> Self {
        HeldBack {
            first,
            tries: 0,
            until: None,
        }
    }

    fn may_ask(&self) -> bool {
        self.until.is_none_or(|at| std::time::Instant::now() >= at)
    }

    fn record(&mut self, held_back: bool) {
        if !held_back {
            self.tries = 0;
            self.until = None;
            return;
        }
        self.tries += 1;
        if let Some(doublings) = self.tries.checked_sub(HELD_BACK_TRIES) {
            let pause = self
                .first
                .saturating_mul(1 << doublings.min(16))
                .min(HELD_BACK_MAX);
            self.until = Some(std::time::Instant::now() + pause);
        }
    }
}

/// Writes back what the passes copied into the database file; a failure is a failed sync.
fn sync_database(db: &std::fs::File) -> rusqlite::Result<()> {
    db.sync_data().map_err(|e| {
        rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR_FSYNC),
            Some(format!("syncing the database file: {e}")),
        )
    })
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

    /// A writer connection as the committer's, without SQLite's own checkpoints.
    fn writer(path: &Path, wal: WalWrites) -> Connection {
        let writer = schema::open_writer(path, SyncMode::Normal, wal).unwrap();
        writer.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        writer
    }

    /// Commits row `i`: about a page of WAL.
    fn insert(writer: &Connection, i: u32) {
        writer
            .execute(
                "INSERT INTO kv (k, v, v_encoding, version) VALUES (?1, ?2, 3, 1)",
                rusqlite::params![i.to_be_bytes(), vec![7u8; 3000]],
            )
            .unwrap();
    }

    #[test]
    fn sustained_writes_cannot_grow_the_wal_without_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = writer(&path, WalWrites::IoUring);
        limit_wal_file(&writer).unwrap();
        let bound = WalBound {
            restart_frames: 64,
            ..WalBound::DEFAULT
        };
        let (checkpoints, thread) = spawn(&path, bound, Box::new(|| {})).unwrap();
        let wal = dir.path().join("db.sqlite-wal");
        let mut largest = 0;
        // 2,000 commits of about five pages each, poking after each as the committer does.
        for i in 0..2000u32 {
            insert(&writer, i);
            // As the committer does after each commit.
            checkpoints.poke();
            checkpoints.finish_requested(&writer);
            largest = largest.max(std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0));
            // Room for the checkpointer thread to run even on a busy machine (it failed once at
            // 28 MB with every 50th commit here while two builds shared the two cores).
            if i % 20 == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        drop(checkpoints);
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
        let (poke, pokes) = channel(Box::new(|| {}));
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

    /// The checkpointer waits for the committer's RESTART; a committer that stops instead
    /// (its side dropped unanswered, as when the server shuts down) must not leave it waiting,
    /// or the committer's own join of this thread would never return.
    #[test]
    fn a_checkpointer_waiting_for_the_committer_stops_with_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        // Kept open: closing the last connection would checkpoint and delete the WAL.
        let writer = writer(&path, WalWrites::Pwrite);
        insert(&writer, 0);
        let (woken_tx, woken) = flume::unbounded();
        let bound = WalBound {
            restart_frames: 1,
            ..WalBound::DEFAULT
        };
        let wake = Box::new(move || {
            let _ = woken_tx.send(());
        });
        let (checkpoints, thread) = spawn(&path, bound, wake).unwrap();
        checkpoints.poke();
        woken
            .recv_timeout(Duration::from_secs(10))
            .expect("past the bound, the checkpointer wakes the committer");
        drop(checkpoints);
        let (joined_tx, joined) = flume::bounded(1);
        std::thread::spawn(move || {
            thread.join().unwrap();
            let _ = joined_tx.send(());
        });
        joined
            .recv_timeout(Duration::from_secs(10))
            .expect("the checkpointer stops when the committer does");
    }

    /// A reader that holds the WAL back for long (as a backup upload's snapshot does) is not
    /// waited for at every round: each try would hold writes up.
    #[test]
    fn a_long_read_holding_the_wal_back_is_retried_after_growing_pauses() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let writer = writer(&path, WalWrites::Pwrite);
        insert(&writer, 0);
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
            .unwrap();
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = asked.clone();
        let wake = Box::new(move || {
            counter.fetch_add(1, Ordering::Relaxed);
        });
        let bound = WalBound {
            restart_frames: 16,
            interval: Duration::from_millis(10),
        };
        let (checkpoints, thread) = spawn(&path, bound, wake).unwrap();
        // The test's thread is the committer: it writes, pokes, and finishes when asked.
        let mut i = 1;
        let mut write_for = |how_long: Duration| {
            let end = std::time::Instant::now() + how_long;
            while std::time::Instant::now() < end {
                insert(&writer, i);
                i += 1;
                checkpoints.poke();
                checkpoints.finish_requested(&writer);
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        write_for(Duration::from_millis(1500));
        let while_held = asked.load(Ordering::Relaxed);
        // Asked at three rounds, then after pauses of 10, 20, 40, … ms: about 11 times in
        // 1.5 s; at every round (about 50 of them) without the pauses.
        assert!(
            (1..=16).contains(&while_held),
            "asked {while_held} times in 1.5 s"
        );
        reader.execute_batch("COMMIT").unwrap();
        write_for(Duration::from_millis(3000));
        assert!(
            asked.load(Ordering::Relaxed) > while_held + 2,
            "asked again once the read ended"
        );
        drop(checkpoints);
        thread.join().unwrap();
    }

    #[test]
    fn the_reliability_doc_states_the_wal_bound() {
        let doc = include_str!("../../../docs/RELIABILITY.md");
        let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        let says = |text: String| assert!(doc.contains(&text), "RELIABILITY.md lacks {text:?}");
        let bound = WalBound::DEFAULT;
        says(format!(
            "passes {} MiB ({} frames)",
            (bound.restart_frames * 4096) >> 20,
            bound.restart_frames
        ));
        says(format!(
            "at most {FINISH_FRAMES} new frames (or after {CATCH_UP_PASSES} passes)"
        ));
        says(format!("at most {FINISH_READER_WAIT_MS} ms for readers"));
        says(format!(
            "after {HELD_BACK_TRIES} tries in a row that readers held back, the committer is \
             asked again after {} ms, then {} ms, … up to {} s",
            bound.interval.as_millis(),
            (bound.interval * 2).as_millis(),
            HELD_BACK_MAX.as_secs()
        ));
        says(format!("cut back to {} MiB", JOURNAL_SIZE_LIMIT >> 20));
        says(format!(
            "one checkpoint interval ({} ms)",
            bound.interval.as_millis()
        ));
        let hold = crate::store::SNAPSHOT_HOLD.as_millis();
        says(format!("snapshot ends within {hold} ms"));
    }
}
