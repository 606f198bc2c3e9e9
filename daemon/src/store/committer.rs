//! The one writer: group-commits queued atomic writes, a savepoint per write (DESIGN.md).
//!
//! Cores send writes over a bounded channel. The committer takes every write waiting, opens one
//! transaction, applies each write inside its own `SAVEPOINT` (checks, then mutations, then
//! enqueues), rolls a failing write back to its savepoint, commits once, and only then answers
//! the writers and wakes the watchers. It also sweeps expired rows.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use super::checkpointer::{self, CheckpointPoke};
use super::watch::WatchRegistry;
use super::StoreError;
use crate::health::Beater;
use crate::kv::model::{AtomicWrite, Enqueue, MutationKind, WriteOutcome};
use crate::kv::value::{Le64Op, StoredValue, Value};
use crate::kv::versionstamp::Versionstamp;
use crate::kv::{now_ms, KvError};
use crate::metrics::{Metrics, MutationLabel};
use crate::traces::{self, SpanContext};

/// Most writes one transaction carries.
const MAX_BATCH: usize = 512;
/// Writes that may wait for the committer before senders are made to wait (backpressure).
pub const QUEUE_CAPACITY: usize = 4096;
/// Longest time between two expiry sweeps, to catch expiries written by other processes.
const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// How often the committer looks for commits made by other processes on the same file (the Deno CLI, say), whose changes must reach watchers too.
const EXTERNAL_POLL: Duration = Duration::from_millis(500);
/// Rows one sweep transaction deletes at most, so a sweep never holds writers up for long.
const SWEEP_CHUNK: i64 = 1000;
/// Queue retry schedule stored when a message gives none (proto3 cannot tell empty from absent).
const DEFAULT_BACKOFF: &str = "[100,1000,5000,30000,60000]";

const LOOKUP_VERSION: &str =
    "SELECT version, seq FROM kv WHERE k = ?1 AND (expiration_ms < 0 OR expiration_ms > ?2)";
const LOOKUP_VALUE: &str =
    "SELECT v, v_encoding FROM kv WHERE k = ?1 AND (expiration_ms < 0 OR expiration_ms > ?2)";
const UPSERT: &str =
    "INSERT INTO kv (k, v, v_encoding, version, seq, expiration_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)
     ON CONFLICT (k) DO UPDATE SET v = excluded.v, v_encoding = excluded.v_encoding,
       version = excluded.version, seq = 0, expiration_ms = excluded.expiration_ms";
const DELETE: &str = "DELETE FROM kv WHERE k = ?1";
const ENQUEUE: &str =
    "INSERT INTO queue (ts, id, data, backoff_schedule, keys_if_undelivered) VALUES (?1, ?2, ?3, ?4, ?5)";
const SET_VERSION: &str = "UPDATE data_version SET version = ?1 WHERE k = 0";

struct WriteJob {
    write: AtomicWrite,
    /// The span of the request that sent the write (traces on): the batch span links to it.
    trace: Option<SpanContext>,
    reply: oneshot::Sender<Reply>,
}

/// The outcome of a write, and the span of the batch that carried it (traces on).
type Reply = (Result<WriteOutcome, StoreError>, Option<SpanContext>);

enum Message {
    Write(WriteJob),
    /// Commit what is queued, then stop.
    Stop,
}

/// Where cores send writes. Cheap to clone; the committer stops once every handle is dropped
/// and the queue is drained.
#[derive(Clone)]
pub struct CommitterHandle {
    tx: flume::Sender<Message>,
}

impl CommitterHandle {
    /// Queues a write and waits for its outcome. Waits for room when the queue is full.
    pub async fn write(&self, write: AtomicWrite) -> Result<WriteOutcome, StoreError> {
        self.write_traced(write, None).await.0
    }

    /// [`write`](Self::write) from the request span `trace`; also returns the span of the
    /// commit batch that carried the write (when traces are on and the batch was committed or
    /// rolled back).
    pub async fn write_traced(
        &self,
        write: AtomicWrite,
        trace: Option<SpanContext>,
    ) -> (Result<WriteOutcome, StoreError>, Option<SpanContext>) {
        let (reply, outcome) = oneshot::channel();
        let job = WriteJob {
            write,
            trace,
            reply,
        };
        if self.tx.send_async(Message::Write(job)).await.is_err() {
            return (Err(StoreError::Unavailable), None);
        }
        outcome
            .await
            .unwrap_or((Err(StoreError::Unavailable), None))
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

/// Starts the committer thread on the write connection.
pub fn spawn(
    conn: Connection,
    watches: Arc<WatchRegistry>,
) -> anyhow::Result<(CommitterHandle, JoinHandle<()>)> {
    spawn_with_heartbeat(conn, watches, None, Arc::new(Metrics::new()))
}

/// [`spawn`], and the committer beats `heartbeat` at every turn of its loop, waiting at most
/// `heartbeat.period()` for work so that an idle committer still beats (the systemd watchdog).
/// Commits and sweeps are recorded in `metrics`.
pub fn spawn_with_heartbeat(
    conn: Connection,
    watches: Arc<WatchRegistry>,
    heartbeat: Option<Beater>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<(CommitterHandle, JoinHandle<()>)> {
    let (tx, rx) = flume::bounded(QUEUE_CAPACITY);
    // Checkpoints run on their own thread (see checkpointer.rs), not inside our commits.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    checkpointer::limit_wal_file(&conn)?;
    let path = conn
        .path()
        .map(std::path::PathBuf::from)
        .unwrap_or_default();
    let (checkpoints, checkpointer) = checkpointer::spawn(&path)?;
    let mut committer = Committer::new(conn, watches, metrics)?;
    committer.checkpoints = Some(checkpoints);
    committer.heartbeat = heartbeat;
    let thread = std::thread::Builder::new()
        .name("committer".into())
        .spawn(move || {
            committer.sweep();
            committer.run(rx);
            committer.checkpoints = None;
            let _ = checkpointer.join();
            // Leave a small WAL behind for whoever opens the file next.
            if let Err(e) = checkpointer::checkpoint(&committer.conn, "TRUNCATE") {
                tracing::warn!("final WAL checkpoint failed: {e}");
            }
        })?;
    Ok((CommitterHandle { tx }, thread))
}

struct Committer {
    conn: Connection,
    /// Told after commits; `None` once stopping.
    checkpoints: Option<CheckpointPoke>,
    /// Last `PRAGMA data_version` seen: tells commits by other processes.
    data_version: i64,
    /// Last committed global version (`data_version.version`).
    version: u64,
    watches: Arc<WatchRegistry>,
    /// Earliest expiry in the table, if any is known.
    next_expiry: Option<i64>,
    last_sweep: Instant,
    /// Beaten at every turn of the loop (see `spawn_with_heartbeat`).
    heartbeat: Option<Beater>,
    metrics: Arc<Metrics>,
}

/// What one batch did, recorded in the metrics once the COMMIT succeeded (and in its span).
#[derive(Default)]
struct BatchTally {
    committed: u64,
    checks_failed: u64,
    invalid: u64,
    enqueues: u64,
    mutations: [u64; MutationLabel::COUNT],
    /// `BEGIN` to the last write applied.
    apply: Duration,
    /// The `COMMIT` statement: the WAL write and, in sync mode full, the fsync.
    commit: Duration,
    /// The database failed; the batch was rolled back.
    rolled_back: bool,
}

impl BatchTally {
    fn add_committed(&mut self, write: &AtomicWrite) {
        self.committed += 1;
        self.enqueues += write.enqueues.len() as u64;
        for m in &write.mutations {
            let label = match &m.kind {
                MutationKind::Set(_) => MutationLabel::Set,
                MutationKind::Delete => MutationLabel::Delete,
                MutationKind::Le64(Le64Op::Sum, _) | MutationKind::V8Sum(_) => MutationLabel::Sum,
                MutationKind::Le64(Le64Op::Min, _) => MutationLabel::Min,
                MutationKind::Le64(Le64Op::Max, _) => MutationLabel::Max,
                MutationKind::SetSuffixVersionstamped(_) => {
                    MutationLabel::SetSuffixVersionstampedKey
                }
            };
            self.mutations[label as usize] += 1;
        }
    }

    /// Sets the attributes of the batch's span.
    fn describe(&self, span: &mut traces::Span, batch: usize) {
        span.set("db.system.name", "sqlite");
        span.set("denokv.batch.size", batch as i64);
        span.set("denokv.batch.committed", self.committed as i64);
        span.set("denokv.batch.checks_failed", self.checks_failed as i64);
        span.set("denokv.batch.invalid", self.invalid as i64);
        span.set(
            "denokv.batch.mutations",
            self.mutations.iter().sum::<u64>() as i64,
        );
        span.set("denokv.batch.enqueues", self.enqueues as i64);
        span.set("denokv.batch.apply_ms", self.apply.as_secs_f64() * 1e3);
        span.set("denokv.batch.commit_ms", self.commit.as_secs_f64() * 1e3);
        if self.rolled_back {
            span.set_error("the database failed; the batch was rolled back");
        }
    }

    fn record(&self, metrics: &Metrics, batch: usize, duration: Duration) {
        metrics.commit_batch_size.observe(batch as f64);
        metrics.commit_duration.observe(duration.as_secs_f64());
        let add = |c: &prometheus::IntCounter, n: u64| {
            if n > 0 {
                c.inc_by(n);
            }
        };
        add(&metrics.writes_committed, self.committed);
        add(&metrics.write_checks_failed, self.checks_failed);
        add(&metrics.writes_invalid, self.invalid);
        add(&metrics.enqueues, self.enqueues);
        for (i, n) in self.mutations.iter().enumerate() {
            add(metrics.mutations(MutationLabel::ALL[i]), *n);
        }
    }
}

/// Why one write of a batch did not apply.
enum ApplyError {
    /// The write is invalid; it was rolled back to its savepoint; the batch goes on.
    Invalid(KvError),
    /// The database failed; the whole batch is rolled back.
    Database(rusqlite::Error),
}

impl From<rusqlite::Error> for ApplyError {
    fn from(e: rusqlite::Error) -> Self {
        ApplyError::Database(e)
    }
}

impl From<KvError> for ApplyError {
    fn from(e: KvError) -> Self {
        ApplyError::Invalid(e)
    }
}

impl Committer {
    fn new(
        conn: Connection,
        watches: Arc<WatchRegistry>,
        metrics: Arc<Metrics>,
    ) -> rusqlite::Result<Self> {
        let version: i64 =
            conn.query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
                r.get(0)
            })?;
        let data_version = conn.query_row("PRAGMA data_version", [], |r| r.get(0))?;
        Ok(Committer {
            conn,
            checkpoints: None,
            data_version,
            version: version as u64,
            watches,
            next_expiry: None,
            last_sweep: Instant::now(),
            heartbeat: None,
            metrics,
        })
    }

    fn run(&mut self, rx: flume::Receiver<Message>) {
        let mut stopping = false;
        while !stopping {
            // Always poll: a stream may subscribe while we wait, and must not wait for the
            // next sweep to see another process's commits (one cheap PRAGMA per interval).
            let mut wait = self.time_until_sweep().min(EXTERNAL_POLL);
            if let Some(heartbeat) = &self.heartbeat {
                heartbeat.beat();
                wait = wait.min(heartbeat.period());
            }
            let first = match rx.recv_timeout(wait) {
                Ok(Message::Write(job)) => job,
                Ok(Message::Stop) | Err(flume::RecvTimeoutError::Disconnected) => break,
                Err(flume::RecvTimeoutError::Timeout) => {
                    self.notify_external_changes();
                    if self.time_until_sweep().is_zero() {
                        self.sweep();
                    }
                    continue;
                }
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(Message::Write(job)) => batch.push(job),
                    Ok(Message::Stop) => {
                        stopping = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            self.commit_batch(batch);
            if self.time_until_sweep().is_zero() {
                self.sweep();
            }
        }
        // Commit whatever is still queued: those writers are waiting for an answer.
        let mut rest = rx
            .drain()
            .filter_map(|m| match m {
                Message::Write(job) => Some(job),
                Message::Stop => None,
            })
            .peekable();
        while rest.peek().is_some() {
            self.commit_batch(rest.by_ref().take(MAX_BATCH).collect());
        }
        tracing::debug!("committer stopped with an empty queue");
    }

    /// `PRAGMA data_version` changes when another connection commits to the file; watchers
    /// then re-read their keys (and send a frame only if something they watch changed).
    fn notify_external_changes(&mut self) {
        match self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
        {
            Ok(v) if v != self.data_version => {
                self.data_version = v;
                self.watches.notify_all();
            }
            Ok(_) => {}
            Err(e) => tracing::warn!("cannot read PRAGMA data_version: {e}"),
        }
    }

    fn time_until_sweep(&self) -> Duration {
        let periodic = SWEEP_INTERVAL.saturating_sub(self.last_sweep.elapsed());
        match self.next_expiry {
            Some(t) => periodic.min(Duration::from_millis((t - now_ms()).max(0) as u64)),
            None => periodic,
        }
    }

    fn commit_batch(&mut self, batch: Vec<WriteJob>) {
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
        let (results, tally) = self.commit_writes(batch.iter().map(|job| &job.write));
        let batch_span = span.context();
        for (job, result) in batch.into_iter().zip(results) {
            let _ = job.reply.send((result, batch_span.clone()));
        }
        if span.is_on() {
            tally.describe(&mut span, size);
        }
    }

    /// Commits `writes` in one transaction and returns each write's own result, in order, and
    /// what the batch did. If the database fails, nothing is committed and every write gets
    /// `Unavailable`, which is then safe to retry. Watchers are woken only after the commit.
    fn commit_writes<'a>(
        &mut self,
        writes: impl ExactSizeIterator<Item = &'a AtomicWrite>,
    ) -> (Vec<Result<WriteOutcome, StoreError>>, BatchTally) {
        let count = writes.len();
        let now = now_ms();
        let mut version = self.version;
        let mut results = Vec::with_capacity(count);
        let mut changed: Vec<Bytes> = Vec::new();
        let mut next_expiry = self.next_expiry;
        let mut tally = BatchTally::default();
        let started = Instant::now();

        let applied = (|| -> rusqlite::Result<()> {
            self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            // Another process (the Deno CLI, say) may have written the file since our last
            // commit: versionstamps must never go backwards.
            let start = self.current_version()?;
            version = start;
            for write in writes {
                let keys_before = changed.len();
                match self.apply_in_savepoint(write, version, now, &mut changed) {
                    Ok((outcome, v)) => {
                        version = v;
                        if let WriteOutcome::ChecksFailed(_) = outcome {
                            tally.checks_failed += 1;
                        } else {
                            tally.add_committed(write);
                            for t in write.mutations.iter().filter_map(|m| m.expire_at_ms) {
                                next_expiry = Some(next_expiry.map_or(t, |n| n.min(t)));
                            }
                        }
                        results.push(Ok(outcome));
                    }
                    Err(ApplyError::Invalid(e)) => {
                        tally.invalid += 1;
                        changed.truncate(keys_before);
                        results.push(Err(StoreError::Invalid(e)));
                    }
                    Err(ApplyError::Database(e)) => return Err(e),
                }
            }
            if version != start {
                self.conn
                    .prepare_cached(SET_VERSION)?
                    .execute([version as i64])?;
            }
            tally.apply = started.elapsed();
            let committing = Instant::now();
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            tally.commit = committing.elapsed();
            Ok(())
        })();

        if let Err(e) = applied {
            tracing::error!("commit of {count} writes failed, rolled back: {e}");
            let _ = self.conn.execute_batch("ROLLBACK");
            tally.rolled_back = true;
            let failed = (0..count).map(|_| Err(StoreError::Unavailable)).collect();
            return (failed, tally);
        }
        tally.record(&self.metrics, count, started.elapsed());
        self.version = version;
        self.next_expiry = next_expiry;
        if let Some(c) = &self.checkpoints {
            c.poke();
        }
        self.watches.notify(&changed);
        (results, tally)
    }

    /// Applies one write inside its own savepoint. Returns the outcome and the global version
    /// after it (advanced only when the write applies).
    fn apply_in_savepoint(
        &self,
        write: &AtomicWrite,
        version: u64,
        now: i64,
        changed: &mut Vec<Bytes>,
    ) -> Result<(WriteOutcome, u64), ApplyError> {
        self.conn.prepare_cached("SAVEPOINT write")?.execute([])?;
        let result = self.apply(write, version, now, changed);
        if let Err(ApplyError::Invalid(_)) = result {
            self.conn.prepare_cached("ROLLBACK TO write")?.execute([])?;
        }
        self.conn.prepare_cached("RELEASE write")?.execute([])?;
        result
    }

    fn apply(
        &self,
        write: &AtomicWrite,
        version: u64,
        now: i64,
        changed: &mut Vec<Bytes>,
    ) -> Result<(WriteOutcome, u64), ApplyError> {
        let mut failed = Vec::new();
        {
            let mut lookup = self.conn.prepare_cached(LOOKUP_VERSION)?;
            for (i, check) in write.checks.iter().enumerate() {
                let current = lookup
                    .query_row(params![&check.key[..], now], |r| {
                        Ok(Versionstamp::new(
                            r.get::<_, i64>(0)? as u64,
                            r.get::<_, i64>(1)? as u16,
                        ))
                    })
                    .optional()?;
                if current != check.versionstamp {
                    failed.push(i as u32);
                }
            }
        }
        if !failed.is_empty() {
            return Ok((WriteOutcome::ChecksFailed(failed), version));
        }

        let new_version = version + rand::rng().random_range(1..=9);
        let stamp = Versionstamp::new(new_version, 0);
        for m in &write.mutations {
            let expiry = m.expire_at_ms.unwrap_or(-1);
            match &m.kind {
                MutationKind::Set(value) => {
                    self.upsert(&m.key, value, new_version, expiry)?;
                    changed.push(m.key.clone());
                }
                MutationKind::SetSuffixVersionstamped(value) => {
                    let mut key = Vec::with_capacity(m.key.len() + 22);
                    key.extend_from_slice(&m.key);
                    key.extend_from_slice(&stamp.key_suffix());
                    let key = Bytes::from(key);
                    self.upsert(&key, value, new_version, expiry)?;
                    changed.push(key);
                }
                MutationKind::Delete => {
                    self.conn.prepare_cached(DELETE)?.execute([&m.key[..]])?;
                    changed.push(m.key.clone());
                }
                // sum/min/max clear an existing expiry unless the mutation sets one (SPEC §10 D13).
                MutationKind::Le64(op, operand) => {
                    let result = op.apply(self.lookup_value(&m.key, now)?, *operand)?;
                    self.upsert(&m.key, &result, new_version, expiry)?;
                    changed.push(m.key.clone());
                }
                MutationKind::V8Sum(sum) => {
                    let result = sum.apply(self.lookup_value(&m.key, now)?)?;
                    self.upsert(&m.key, &result, new_version, expiry)?;
                    changed.push(m.key.clone());
                }
            }
        }
        for e in &write.enqueues {
            self.enqueue(e)?;
        }
        Ok((WriteOutcome::Committed(stamp), new_version))
    }

    fn current_version(&self) -> rusqlite::Result<u64> {
        let v: i64 = self
            .conn
            .prepare_cached("SELECT version FROM data_version WHERE k = 0")?
            .query_row([], |r| r.get(0))?;
        Ok(v as u64)
    }

    fn lookup_value(&self, key: &[u8], now: i64) -> rusqlite::Result<Option<StoredValue>> {
        self.conn
            .prepare_cached(LOOKUP_VALUE)?
            .query_row(params![key, now], |r| {
                Ok(StoredValue {
                    data: Bytes::from(r.get::<_, Vec<u8>>(0)?),
                    encoding: r.get(1)?,
                })
            })
            .optional()
    }

    fn upsert(&self, key: &[u8], value: &Value, version: u64, expiry: i64) -> rusqlite::Result<()> {
        self.conn.prepare_cached(UPSERT)?.execute(params![
            key,
            &value.data[..],
            value.encoding as i64,
            version as i64,
            expiry
        ])?;
        Ok(())
    }

    fn enqueue(&self, e: &Enqueue) -> rusqlite::Result<()> {
        let backoff = if e.backoff_schedule.is_empty() {
            DEFAULT_BACKOFF.to_string()
        } else {
            serde_json::to_string(&e.backoff_schedule).expect("a list of numbers serializes")
        };
        let dead_letter: Vec<&[u8]> = e.keys_if_undelivered.iter().map(|k| &k[..]).collect();
        let dead_letter =
            serde_json::to_string(&dead_letter).expect("a list of byte lists serializes");
        let id = uuid::Uuid::new_v4().hyphenated().to_string();
        self.conn.prepare_cached(ENQUEUE)?.execute(params![
            e.deadline_ms,
            id,
            &e.payload[..],
            backoff,
            dead_letter
        ])?;
        Ok(())
    }

    /// Deletes expired rows in small transactions; each transaction that deleted rows advances
    /// the version by one and wakes the watchers of those keys (SPEC §7.6).
    fn sweep(&mut self) {
        self.last_sweep = Instant::now();
        loop {
            // A long sweep is still progress: keep the watchdog fed between chunks.
            if let Some(h) = &self.heartbeat {
                h.beat();
            }
            match self.sweep_chunk() {
                Ok(n) if n < SWEEP_CHUNK as usize => break,
                Ok(_) => continue,
                Err(e) => {
                    tracing::error!("expiry sweep failed: {e}");
                    let _ = self.conn.execute_batch("ROLLBACK");
                    return;
                }
            }
        }
        self.next_expiry = self
            .conn
            .query_row(
                "SELECT min(expiration_ms) FROM kv WHERE expiration_ms >= 0",
                [],
                |r| r.get(0),
            )
            .unwrap_or(None);
    }

    fn sweep_chunk(&mut self) -> rusqlite::Result<usize> {
        let now = now_ms();
        self.conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
        self.version = self.current_version()?;
        let deleted: Vec<Bytes> = self
            .conn
            .prepare_cached(
                "DELETE FROM kv WHERE k IN
                   (SELECT k FROM kv WHERE expiration_ms >= 0 AND expiration_ms <= ?1 LIMIT ?2)
                 RETURNING k",
            )?
            .query_map(params![now, SWEEP_CHUNK], |r| {
                Ok(Bytes::from(r.get::<_, Vec<u8>>(0)?))
            })?
            .collect::<rusqlite::Result<_>>()?;
        let version = self.version + 1;
        if !deleted.is_empty() {
            self.conn
                .prepare_cached(SET_VERSION)?
                .execute([version as i64])?;
        }
        self.conn.prepare_cached("COMMIT")?.execute([])?;
        if !deleted.is_empty() {
            self.version = version;
            if let Some(c) = &self.checkpoints {
                c.poke();
            }
            tracing::debug!("expiry sweep deleted {} rows", deleted.len());
            self.metrics.expired_rows_swept.inc_by(deleted.len() as u64);
            self.watches.notify(&deleted);
        }
        Ok(deleted.len())
    }
}

/// Commits batches synchronously on the calling thread, without a queue, a checkpointer or a
/// sweep: the committer's hot path alone, for benchmarks.
pub struct DirectCommitter(Committer);

impl DirectCommitter {
    pub fn new(conn: Connection) -> anyhow::Result<Self> {
        Ok(DirectCommitter(Committer::new(
            conn,
            Arc::new(WatchRegistry::default()),
            Arc::new(Metrics::new()),
        )?))
    }

    /// Commits `writes` as one batch (one transaction, a savepoint each).
    pub fn commit(&mut self, writes: &[AtomicWrite]) -> Vec<Result<WriteOutcome, StoreError>> {
        self.0.commit_writes(writes.iter()).0
    }
}
