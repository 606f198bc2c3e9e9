//! WAL checkpoints off the commit path.
//!
//! SQLite's automatic checkpoint runs inside the COMMIT that crosses the WAL size threshold,
//! so one writer batch in a thousand pages would pay for copying the WAL into the database and
//! fsyncing it. The committer turns that off and pokes this thread after its commits instead; a
//! PASSIVE checkpoint here never blocks the committer or the readers.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags};

/// Least time between two checkpoints; pokes in between coalesce.
const MIN_INTERVAL: Duration = Duration::from_millis(200);

/// Pokes the checkpointer; dropping it stops the thread.
pub struct CheckpointPoke(flume::Sender<()>);

impl CheckpointPoke {
    /// Says that commits happened; never blocks.
    pub fn poke(&self) {
        let _ = self.0.try_send(());
    }
}

/// Starts the checkpointer thread on its own connection to `path`.
pub fn spawn(path: &Path) -> anyhow::Result<(CheckpointPoke, JoinHandle<()>)> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_millis(5000))?;
    let (tx, rx) = flume::bounded::<()>(1);
    let thread = std::thread::Builder::new()
        .name("checkpointer".into())
        .spawn(move || run(&conn, &rx))?;
    Ok((CheckpointPoke(tx), thread))
}

/// Checkpoints when poked, at most once per `MIN_INTERVAL`; returns as soon as the poker is
/// dropped, even in the middle of a pause.
fn run(conn: &Connection, pokes: &flume::Receiver<()>) {
    let mut poked = pokes.recv().is_ok();
    while poked {
        if let Err(e) = checkpoint(conn, "PASSIVE") {
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

/// Runs `PRAGMA wal_checkpoint(mode)`; returns (WAL frames, frames checkpointed).
pub fn checkpoint(conn: &Connection, mode: &str) -> rusqlite::Result<(i64, i64)> {
    conn.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |r| {
        Ok((r.get(1)?, r.get(2)?))
    })
}
