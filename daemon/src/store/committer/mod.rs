//! The one writer: group-commits queued atomic writes, a savepoint per write (DESIGN.md).
//!
//! Cores send writes over a bounded channel. The committer takes every write waiting (up to
//! `MAX_BATCH` writes or `MAX_BATCH_BYTES`), opens one transaction, applies each write inside
//! its own `SAVEPOINT` (`apply`), rolls a failing write back to its savepoint, commits once,
//! and only then answers the writers and wakes the watchers (`batch`). It also sweeps expired
//! rows (`expiry`), and finishes a WAL checkpoint between two transactions when the
//! checkpointer asks, which rewinds the WAL (`super::checkpointer`). When a commit fails in a way that leaves its outcome unknown, it answers
//! accordingly, stops taking writes and stops the server (`failure`, `crate::fatal`).
//!
//! A write whose core has nothing else to do, sent while the committer is idle (no write
//! queued, none being committed), is committed on the core's own thread instead: the same
//! code under the same lock, without the two cross-thread wake-ups of the hand-over, which
//! are most of what a lone writer waits for beside the fsync (docs/PERFORMANCE.md).

mod apply;
mod batch;
mod expiry;
pub mod failure;

use std::mem::ManuallyDrop;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use bytes::Bytes;
use rusqlite::Connection;
use tokio::sync::oneshot;

use self::failure::Failure;
use super::checkpointer::{self, Checkpoints, WalBound};
use super::outbox::{BackupOutbox, Recorder};
use super::sql::GET_VERSION;
use super::watch::WatchRegistry;
use super::StoreError;
use crate::health::Beater;
use crate::kv::model::{AtomicWrite, WriteOutcome};
use crate::metrics::Metrics;
use crate::traces::{self, SpanContext};

/// Most writes one transaction carries.
const MAX_BATCH: usize = 512;
/// A batch stops growing once its writes carry this many bytes (a write may carry 800 KiB):
/// the transaction's pages then stay in the writer's page cache, and a commit stays short.
const MAX_BATCH_BYTES: usize = 16 << 20;
/// Writes that may wait for the committer before senders are made to wait (backpressure).
pub const QUEUE_CAPACITY: usize = 4096;

struct WriteJob {
    write: AtomicWrite,
    /// `write.size_bytes()`, for the batch's byte bound.
    size: usize,
    /// The span of the request that sent the write (traces on): the batch span links to it.
    trace: Option<SpanContext>,
    reply: oneshot::Sender<Reply>,
}

/// The outcome of a write, and the span of the batch that carried it (traces on).
type Reply = (Result<WriteOutcome, StoreError>, Option<SpanContext>);

enum Message {
    Write(WriteJob),
    /// A core's commit brought the next expiry sweep forward (wait less), or the checkpointer
    /// asks for a checkpoint to be finished (`Checkpoints::finish_requested`): look again.
    Reschedule,
    /// Commit what is queued, then stop.
    Stop,
}

/// Where cores send writes. Cheap to clone; the committer stops once every handle is dropped
/// and the queue is drained.
#[derive(Clone)]
pub struct CommitterHandle {
    tx: flume::Sender<Message>,
    /// The committer's state: its thread takes it for each batch, a core for a write it
    /// commits itself.
    shared: Arc<Mutex<Committer>>,
}

impl CommitterHandle {
    /// Queues a write and waits for its outcome. Waits for room when the queue is full.
    pub async fn write(&self, write: AtomicWrite) -> Result<WriteOutcome, StoreError> {
        self.write_traced(write, None, Inline::Never).await.0
    }

    /// [`write`](Self::write) from the request span `trace`; also returns the span of the
    /// commit batch that carried the write (when traces are on and the batch was committed or
    /// rolled back). With `Inline::WhenIdle` the write is committed on the calling thread
    /// when the committer is idle.
    pub async fn write_traced(
        &self,
        mut write: AtomicWrite,
        trace: Option<SpanContext>,
        inline: Inline,
    ) -> (Result<WriteOutcome, StoreError>, Option<SpanContext>) {
        // The write may wait in the queue: let go of the request body it was decoded from.
        write.detach();
        let (reply, outcome) = oneshot::channel();
        let mut job = WriteJob {
            size: write.size_bytes(),
            write,
            trace,
            reply,
        };
        if inline == Inline::WhenIdle {
            job = match self.commit_here(job) {
                None => {
                    return outcome
                        .await
                        .unwrap_or((Err(StoreError::Unavailable), None))
                }
                Some(job) => job,
            };
        }
        // A committer that stopped (shutting down, or after a failure) committed nothing of
        // what it did not answer: retrying is safe.
        if self.tx.send_async(Message::Write(job)).await.is_err() {
            return (Err(StoreError::Unavailable), None);
        }
        outcome
            .await
            .unwrap_or((Err(StoreError::Unavailable), None))
    }

    /// Commits `job` on the calling thread if the committer is idle: no write queued, none
    /// being committed, not stopped. Gives the job back otherwise.
    fn commit_here(&self, job: WriteJob) -> Option<WriteJob> {
        if !self.tx.is_empty() {
            return Some(job);
        }
        let Ok(mut committer) = self.shared.try_lock() else {
            return Some(job);
        };
        if committer.stopped {
            return Some(job);
        }
        committer.metrics.inline_commits.inc();
        let next_expiry = committer.schedule.next_expiry();
        if let Err(failure) = committer.commit_batch(vec![job]) {
            // As the committer's thread would: stop the server now; the thread answers the
            // writes queued meanwhile and never closes the connection.
            crate::fatal::stop(stop_reason(&failure));
            committer.failed = Some(failure);
        } else if committer.schedule.next_expiry() != next_expiry {
            // The write expires before anything the thread knew of, and the thread waits for
            // the sweep it knew of; a full queue is woken anyway. (Not otherwise: waking the
            // thread costs a lone writer a futex call and a committer that may take the lock
            // from under its next write.)
            let _ = self.tx.try_send(Message::Reschedule);
        }
        None
    }

    /// Waits until the committer's thread lets go of its state (it then waits for writes).
    #[cfg(test)]
    pub fn wait_idle(&self) {
        while self.shared.try_lock().is_err() {
            std::thread::yield_now();
        }
    }

    /// Asks the committer to commit every write already queued and stop. Blocks while the
    /// queue is full.
    pub fn stop(&self) {
        let _ = self.tx.send(Message::Stop);
    }

    /// Writes waiting for the committer.
    pub fn queue_depth(&self) -> usize {
        self.tx.len()
    }
}

/// Whether a write may be committed on the thread that sends it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Inline {
    /// The sender's thread has nothing else to do: commit there if the committer is idle.
    WhenIdle,
    /// Always hand the write to the committer's thread.
    Never,
}

/// Starts the committer thread on the write connection.
pub fn spawn(
    conn: Connection,
    watches: Arc<WatchRegistry>,
    backup: BackupOutbox,
) -> anyhow::Result<(CommitterHandle, JoinHandle<()>)> {
    spawn_with_heartbeat(conn, watches, None, Arc::new(Metrics::new()), backup)
}

/// [`spawn`], and the committer beats `heartbeat` at every turn of its loop, waiting at most
/// `heartbeat.period()` for work so that an idle committer still beats (the systemd watchdog).
/// Commits and sweeps are recorded in `metrics`. With `backup` on, every commit also appends
/// its entries to the backup outbox (`store::outbox`).
pub fn spawn_with_heartbeat(
    conn: Connection,
    watches: Arc<WatchRegistry>,
    heartbeat: Option<Beater>,
    metrics: Arc<Metrics>,
    backup: BackupOutbox,
) -> anyhow::Result<(CommitterHandle, JoinHandle<()>)> {
    spawn_bounded(conn, watches, heartbeat, metrics, backup, WalBound::DEFAULT)
}

/// [`spawn_with_heartbeat`] with another WAL bound (tests use a small one).
pub fn spawn_bounded(
    conn: Connection,
    watches: Arc<WatchRegistry>,
    heartbeat: Option<Beater>,
    metrics: Arc<Metrics>,
    backup: BackupOutbox,
    wal_bound: WalBound,
) -> anyhow::Result<(CommitterHandle, JoinHandle<()>)> {
    let (tx, rx) = flume::bounded(QUEUE_CAPACITY);
    // Checkpoints run on their own thread (see checkpointer.rs), not inside our commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    checkpointer::limit_wal_file(&conn)?;
    let path = conn
        .path()
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    // The checkpointer wakes this thread to finish a checkpoint; it must not keep the queue
    // open (the committer stops once every handle is gone).
    let queue = tx.downgrade();
    let wake = Box::new(move || {
        if let Some(tx) = queue.upgrade() {
            let _ = tx.try_send(Message::Reschedule);
        }
    });
    let (checkpoints, checkpointer) = checkpointer::spawn(&path, wal_bound, wake)?;
    let mut committer = Committer::new(conn, watches, metrics, backup)?;
    committer.checkpoints = Some(checkpoints);
    committer.heartbeat = heartbeat;
    let shared = Arc::new(Mutex::new(committer));
    let state = shared.clone();
    let thread = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || {
            super::wal_vfs::inject_faults_from_env();
            // The guard of the first sweep is dropped before `run` takes the lock.
            let swept = lock(&state).sweep();
            let failed = match swept {
                Err(failure) => Some(failure),
                Ok(()) => run(&state, &rx).err(),
            };
            let mut committer = lock(&state);
            // No core commits from here on.
            committer.stopped = true;
            committer.checkpoints = None;
            let _ = checkpointer.join();
            match failed {
                Some(failure) => committer.fail_stop(failure, rx),
                None => {
                    // Leave a small WAL behind for whoever opens the file next.
                    if let Err(e) = checkpointer::checkpoint(&committer.conn, "TRUNCATE") {
                        tracing::warn!("final WAL checkpoint failed: {e}");
                    }
                }
            }
        })?;
    Ok((CommitterHandle { tx, shared }, thread))
}

/// The committer's state. A core that panics holding it aborts the process (`crate::fatal`),
/// so a poisoned lock is never seen by the server; in tests it fails the committer too.
fn lock(shared: &Mutex<Committer>) -> MutexGuard<'_, Committer> {
    shared.lock().expect("a thread panicked while committing")
}

/// Commits batches until told to stop (or every handle is gone), then commits what is still
/// queued. Returns the failure that makes the server stop, if one happens (here or in a
/// write a core committed).
fn run(shared: &Mutex<Committer>, rx: &flume::Receiver<Message>) -> Result<(), Failure> {
    let mut wait = lock(shared).next_wait();
    loop {
        crate::fatal::debug::panic_point("committer");
        let message = rx.recv_timeout(wait);
        // Held from here to the next wait, so that no core commits in between.
        let mut committer = lock(shared);
        committer.take_failure()?;
        let first = match message {
            Ok(Message::Write(job)) => job,
            Ok(Message::Stop) | Err(flume::RecvTimeoutError::Disconnected) => break,
            Ok(Message::Reschedule) | Err(flume::RecvTimeoutError::Timeout) => {
                committer.sweep_if_due()?;
                committer.finish_checkpoint();
                wait = committer.next_wait();
                continue;
            }
        };
        let mut batch = vec![first];
        let stopping = fill(&mut batch, || rx.try_recv().ok());
        committer.commit_batch(batch)?;
        committer.sweep_if_due()?;
        committer.finish_checkpoint();
        if stopping {
            break;
        }
        wait = committer.next_wait();
    }
    // Commit whatever is still queued: those writers are waiting for an answer.
    let mut committer = lock(shared);
    committer.take_failure()?;
    let mut rest = rx.drain();
    loop {
        let mut batch = Vec::new();
        fill(&mut batch, || rest.next());
        if batch.is_empty() {
            break;
        }
        committer.commit_batch(batch)?;
    }
    tracing::debug!("committer stopped with an empty queue");
    Ok(())
}

/// Why the server stops after `failure`.
fn stop_reason(failure: &Failure) -> String {
    format!(
        "the committer stopped: a commit {failure}. Its outcome is decided by SQLite's \
         recovery when the database is opened again; no further writes are taken"
    )
}

struct Committer {
    /// Never closed after a failure: the last connection to close checkpoints and deletes the
    /// WAL, which would decide an unknown commit (as not committed) instead of leaving it to
    /// recovery at the next open.
    conn: ManuallyDrop<Connection>,
    /// A commit failed in a way that stops the server (`failure`); set only with `stopped`.
    failed: Option<Failure>,
    /// The committer's thread has ended its loop, or a commit failed: nothing more is
    /// committed here, and cores commit nothing.
    stopped: bool,
    /// Told after commits; `None` once stopping.
    checkpoints: Option<Checkpoints>,
    /// Last committed global version (`data_version.version`).
    version: u64,
    watches: Arc<WatchRegistry>,
    schedule: expiry::Schedule,
    /// Beaten at every turn of the loop (see `spawn_with_heartbeat`).
    heartbeat: Option<Beater>,
    metrics: Arc<Metrics>,
    /// Backup on: records each commit's entries into the outbox.
    outbox: Option<Recorder>,
}

impl Committer {
    fn new(
        conn: Connection,
        watches: Arc<WatchRegistry>,
        metrics: Arc<Metrics>,
        backup: BackupOutbox,
    ) -> anyhow::Result<Self> {
        let outbox = backup.recorder(&conn)?;
        let version: i64 = conn.query_row(GET_VERSION, [], |r| r.get(0))?;
        Ok(Committer {
            outbox,
            conn: ManuallyDrop::new(conn),
            failed: None,
            stopped: false,
            checkpoints: None,
            version: version as u64,
            watches,
            schedule: expiry::Schedule::new(),
            heartbeat: None,
            metrics,
        })
    }

    fn commit_batch(&mut self, batch: Vec<WriteJob>) -> Result<(), Failure> {
        let mut span = if traces::enabled() {
            traces::Span::internal(
                "commit batch",
                std::time::SystemTime::now(),
                batch.iter().filter_map(|job| job.trace.as_ref()),
            )
        } else {
            traces::Span::OFF
        };
        let size = batch.len();
        let outcome = self.commit_writes(batch.iter().map(|job| &job.write));
        let batch_span = span.context();
        for (job, result) in batch.into_iter().zip(outcome.results) {
            let _ = job.reply.send((result, batch_span.clone()));
        }
        if span.is_on() {
            outcome.tally.describe(&mut span, size);
        }
        match outcome.fatal {
            Some(failure) => {
                self.stopped = true;
                Err(failure)
            }
            None => Ok(()),
        }
    }

    /// After a failure that leaves a commit's outcome unknown: stops the server, and answers
    /// every write still queued as not committed (it was not, and never will be by this
    /// process), so that clients retry against the restarted server.
    fn fail_stop(&mut self, failure: Failure, rx: flume::Receiver<Message>) {
        crate::fatal::stop(stop_reason(&failure));
        self.failed = Some(failure);
        // Writes sent after this are refused by the closed channel (also "not committed").
        for message in rx.drain() {
            if let Message::Write(job) = message {
                let _ = job.reply.send((Err(StoreError::Unavailable), None));
            }
        }
    }

    /// Begins a write transaction and returns the global version. Another process (the Deno
    /// CLI, say) may have written the file since our last commit: versionstamps must never go
    /// backwards, and its changes must reach the watchers even while we are busy.
    fn begin(&mut self) -> rusqlite::Result<u64> {
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        let version: i64 = self
            .conn
            .prepare_cached(GET_VERSION)?
            .query_row([], |r| r.get(0))?;
        let version = version as u64;
        if version != self.version {
            self.version = version;
            self.watches.notify_all();
        }
        Ok(version)
    }

    fn commit(&self) -> Result<(), Failure> {
        self.conn
            .prepare_cached("COMMIT")
            .and_then(|mut s| s.execute([]))
            .map(|_| ())
            .map_err(Failure::committing)
    }

    /// Ends the open transaction without committing it (SQLite may already have).
    fn rollback(&self) -> Result<(), Failure> {
        if self.conn.is_autocommit() {
            return Ok(());
        }
        self.conn
            .execute_batch("ROLLBACK")
            .map_err(Failure::rolling_back)
    }

    /// After a commit that brought the global version to `version` and changed `keys`.
    fn committed(&mut self, version: u64, keys: &[Bytes]) {
        self.version = version;
        if let Some(c) = &self.checkpoints {
            c.poke();
        }
        self.watches.committed(version, keys);
    }

    /// Copies the last frames of the WAL if the checkpointer asked (checkpointer.rs): called
    /// between two transactions, by the only writer.
    fn finish_checkpoint(&self) {
        if let Some(c) = &self.checkpoints {
            c.finish_requested(&self.conn);
        }
    }

    /// Beats the heartbeat; how long to wait for writes before the next turn (a sweep, or a
    /// beat, is due then).
    fn next_wait(&self) -> std::time::Duration {
        let wait = self.schedule.due_in();
        match &self.heartbeat {
            Some(heartbeat) => {
                heartbeat.beat();
                wait.min(heartbeat.period())
            }
            None => wait,
        }
    }

    /// The failure of a write a core committed, if one failed.
    fn take_failure(&mut self) -> Result<(), Failure> {
        match self.failed.take() {
            Some(failure) => {
                self.stopped = true;
                Err(failure)
            }
            None => Ok(()),
        }
    }

    fn beat(&self) {
        if let Some(h) = &self.heartbeat {
            h.beat();
        }
    }
}

impl Drop for Committer {
    fn drop(&mut self) {
        if self.failed.is_none() {
            // SAFETY: dropped once, here, and never used again.
            unsafe { ManuallyDrop::drop(&mut self.conn) };
        }
    }
}

/// Adds writes from `next` to `batch` until it is full (`MAX_BATCH` writes or
/// `MAX_BATCH_BYTES`) or `next` has none. Returns whether a stop request was taken.
fn fill(batch: &mut Vec<WriteJob>, mut next: impl FnMut() -> Option<Message>) -> bool {
    let mut bytes: usize = batch.iter().map(|j| j.size).sum();
    while batch.len() < MAX_BATCH && bytes < MAX_BATCH_BYTES {
        match next() {
            Some(Message::Write(job)) => {
                bytes += job.size;
                batch.push(job);
            }
            Some(Message::Stop) => return true,
            // The turn after this batch computes its wait afresh.
            Some(Message::Reschedule) => continue,
            None => break,
        }
    }
    false
}

/// The sizes of the batches `writes` would be committed in, queued all at once.
#[cfg(test)]
pub fn batch_sizes(writes: impl Iterator<Item = AtomicWrite>) -> Vec<usize> {
    let mut queue = writes.map(|write| {
        let (reply, _) = oneshot::channel();
        Message::Write(WriteJob {
            size: write.size_bytes(),
            write,
            trace: None,
            reply,
        })
    });
    let mut sizes = Vec::new();
    loop {
        let mut batch = Vec::new();
        fill(&mut batch, || queue.next());
        if batch.is_empty() {
            return sizes;
        }
        sizes.push(batch.len());
    }
}

/// Commits batches synchronously on the calling thread, without a queue, a checkpointer or a
/// sweep: the committer's hot path alone, for benchmarks and tests.
pub struct DirectCommitter(Committer);

impl DirectCommitter {
    pub fn new(conn: Connection) -> anyhow::Result<Self> {
        Self::with_metrics(conn, Arc::new(Metrics::new()))
    }

    /// [`new`](Self::new), recording into `metrics`.
    pub fn with_metrics(conn: Connection, metrics: Arc<Metrics>) -> anyhow::Result<Self> {
        Ok(DirectCommitter(Committer::new(
            conn,
            Arc::new(WatchRegistry::default()),
            metrics,
            BackupOutbox::disabled(),
        )?))
    }

    /// [`new`](Self::new), filling the backup outbox when `backup` is on.
    pub fn with_backup(conn: Connection, backup: BackupOutbox) -> anyhow::Result<Self> {
        Ok(DirectCommitter(Committer::new(
            conn,
            Arc::new(WatchRegistry::default()),
            Arc::new(Metrics::new()),
            backup,
        )?))
    }

    /// Runs the expiry sweep now, on the calling thread.
    pub fn sweep(&mut self) -> Result<(), Failure> {
        self.0.sweep()
    }

    /// Commits `writes` as one batch (one transaction, a savepoint each).
    pub fn commit(&mut self, writes: &[AtomicWrite]) -> Vec<Result<WriteOutcome, StoreError>> {
        self.commit_checked(writes).0
    }

    /// [`commit`](Self::commit), and the failure that would stop the server, if any.
    pub fn commit_checked(
        &mut self,
        writes: &[AtomicWrite],
    ) -> (Vec<Result<WriteOutcome, StoreError>>, Option<Failure>) {
        let outcome = self.0.commit_writes(writes.iter());
        (outcome.results, outcome.fatal)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http::error::ApiError;

    /// docs/RELIABILITY.md states these numbers and texts: they must be the code's.
    #[test]
    fn the_reliability_doc_states_what_the_code_does() {
        let doc = include_str!("../../../../docs/RELIABILITY.md").replace('\n', " ");
        let doc = doc.split_whitespace().collect::<Vec<_>>().join(" ");
        let says = |text: String| assert!(doc.contains(&text), "RELIABILITY.md lacks {text:?}");
        says(format!("at most {MAX_BATCH} writes"));
        says(format!("stops growing at {} MiB", MAX_BATCH_BYTES >> 20));
        let poll = super::super::external::POLL_INTERVAL.as_millis();
        says(format!("within about {poll} ms"));
        says(format!("every {poll} ms"));
        let hold = crate::store::SNAPSHOT_HOLD.as_millis();
        says(format!("reads see its commits within {hold} ms"));
        says(format!("for at most {hold} ms"));
        let readme = include_str!("../../../../README.md");
        let readme = readme.split_whitespace().collect::<Vec<_>>().join(" ");
        let text = format!("reads see them within {hold} ms");
        assert!(readme.contains(&text), "README.md lacks {text:?}");
        says(format!(
            "tried again after {} s, then 2 s, 4 s, … up to {} s",
            expiry::FIRST_RETRY.as_secs(),
            expiry::SWEEP_INTERVAL.as_secs()
        ));
        for e in [
            ApiError::unavailable(),
            ApiError::disk_full(),
            ApiError::outcome_unknown(),
        ] {
            says(format!("{} `{}`", e.status.as_u16(), e.message));
        }
    }
}
