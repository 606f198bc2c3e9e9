//! Commits by other processes on the same file (the Deno CLI, the upstream server, a tool):
//! their changes must wake watch streams too (SPEC §10 D8b), on a read-only server as well.
//!
//! A thread with its own read-only connection polls `PRAGMA data_version`, which changes
//! whenever another connection commits. Our own commits change it too; the global version in
//! `data_version` tells them apart: every writer advances it, and the committer records the
//! version of its last commit in the watch registry. A version beyond that one was written by
//! someone else, and every stream is woken (it re-reads its keys and sends a frame only if one
//! of them changed). Under steady writes the committer also sees such commits, at the start
//! of its next transaction (`Committer::begin`).

use std::path::Path;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;

use super::sql::GET_VERSION;
use super::watch::WatchRegistry;

/// How often the file is checked for other processes' commits.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// The polling thread; dropping this stops it.
pub struct ExternalCommits {
    stop: Option<flume::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl ExternalCommits {
    /// Starts polling the database at `path` for `watches`.
    pub fn spawn(path: &Path, watches: Arc<WatchRegistry>) -> anyhow::Result<ExternalCommits> {
        let conn = super::schema::open_reader(path)?;
        // From now on every commit by someone else is noticed.
        let seen = data_version(&conn)?;
        let (stop, stopped) = flume::bounded::<()>(1);
        let thread = std::thread::Builder::new()
            .name("external-commits".into())
            .spawn(move || poll(&conn, seen, &watches, &stopped))?;
        Ok(ExternalCommits {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for ExternalCommits {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn poll(conn: &Connection, mut seen: i64, watches: &WatchRegistry, stopped: &flume::Receiver<()>) {
    let mut failing = false;
    while let Err(flume::RecvTimeoutError::Timeout) = stopped.recv_timeout(POLL_INTERVAL) {
        crate::fatal::debug::panic_point("external");
        match check(conn, &mut seen, watches.own_version()) {
            Ok(changed) => {
                failing = false;
                if changed {
                    watches.notify_all();
                }
            }
            Err(e) => {
                // Logged once per run of failures, not at every poll.
                if !failing {
                    tracing::warn!("cannot check for other processes' commits: {e}");
                }
                failing = true;
            }
        }
    }
}

/// Whether another process committed since the last call (`seen` is the last
/// `PRAGMA data_version`; `own` the version of this process's last commit).
fn check(conn: &Connection, seen: &mut i64, own: u64) -> rusqlite::Result<bool> {
    let now = data_version(conn)?;
    if *seen == now {
        return Ok(false);
    }
    *seen = now;
    let version: i64 = conn.query_row(GET_VERSION, [], |r| r.get(0))?;
    Ok(version as u64 > own)
}

/// Changes whenever another connection commits to the file.
fn data_version(conn: &Connection) -> rusqlite::Result<i64> {
    conn.query_row("PRAGMA data_version", [], |r| r.get(0))
}
