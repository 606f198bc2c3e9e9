//! The backup thread of a primary: ships the outbox to S3 as log objects, takes snapshot
//! generations, and deletes what falls out of retention (docs/BACKUP.md, SPEC §8.7).
//!
//! One thread with a current-thread tokio runtime. It reads the database on a connection of
//! its own (`store::outbox::OutboxReader`) and never blocks the committer: the committer only
//! appends outbox rows in its own transactions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use prost::Message;

use super::generations::{self, Generation};
use super::metrics::BackupMetrics;
use super::names::{self, LogName, SnapshotName};
use super::s3::{Bucket, S3Error};
use super::side::LAG_WARNING;
use super::BackupConfig;
use crate::backup_proto::{BackupKvPair, BackupSnapshotRange};
use crate::store::outbox::{Drained, OutboxReader, SnapshotRow};

/// A log object holds at most this many commits and bytes of entries (a commit is never
/// split, so one large commit may exceed it).
const MAX_LOG_COMMITS: usize = 100_000;
const MAX_LOG_BYTES: usize = 16 << 20;
/// A snapshot object holds at most this many rows and bytes.
const SNAPSHOT_ROWS: usize = 50_000;
const SNAPSHOT_BYTES: usize = 16 << 20;
/// How often the thread looks at the outbox.
const POLL: Duration = Duration::from_millis(50);
/// Retries of a failed S3 request back off from the first to the last.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_LAST: Duration = Duration::from_secs(10);
/// How often the pending commits and bytes are counted (a scan of the outbox).
const PENDING_COUNT_EVERY: Duration = Duration::from_secs(1);
/// How long the backup keeps trying to ship what is pending when the server stops.
const FINAL_SHIP: Duration = Duration::from_secs(5);

/// Waits after the database refused the backup's own writes (a full disk).
const LOCAL_RETRY_FIRST: Duration = Duration::from_secs(1);
const LOCAL_RETRY_LAST: Duration = Duration::from_secs(60);

/// Whether a database error may pass by itself: a full disk, a lock held too long.
fn transient(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<rusqlite::Error>()
            .and_then(|e| e.sqlite_error_code())
            .is_some_and(|code| {
                matches!(
                    code,
                    rusqlite::ErrorCode::DiskFull
                        | rusqlite::ErrorCode::DatabaseBusy
                        | rusqlite::ErrorCode::DatabaseLocked
                )
            })
    })
}

/// Why the ship loop stops what it is doing.
#[derive(Debug)]
pub(super) enum Interrupt {
    /// Commits are missing from the outbox: a new snapshot generation is needed.
    Gap {
        shipped: u64,
        next_prev: u64,
    },
    Stop,
    Fatal(anyhow::Error),
}

impl From<anyhow::Error> for Interrupt {
    fn from(e: anyhow::Error) -> Self {
        Interrupt::Fatal(e)
    }
}

impl From<rusqlite::Error> for Interrupt {
    fn from(e: rusqlite::Error) -> Self {
        Interrupt::Fatal(e.into())
    }
}

pub(super) struct Writer {
    pub config: BackupConfig,
    pub bucket: Bucket,
    pub outbox: OutboxReader,
    pub metrics: Arc<BackupMetrics>,
    pub stop: Arc<AtomicBool>,
    /// Set by the thread: what an operator should see in `systemctl status` (`None`: fine).
    pub problem: super::side::Problem,
    /// After a start, the first range may already be in S3 (shipped, not acknowledged).
    pub check_shipped: bool,
    /// The committer's switch: off while the outbox is over its bound.
    pub switch: crate::store::BackupOutbox,
    /// The next wait after the database refused the backup's own writes.
    pub local_backoff: Duration,
    /// When the outbox was last counted.
    pub pending_counted: std::cell::Cell<std::time::Instant>,
    pub lag_warning: super::side::LagWarning,
}

impl Writer {
    /// Runs until stopped (returns `Ok`) or until a failure it cannot go on from.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let location = self.location_id();
        let mut known = generations::list(&self.bucket).await;
        if let Some(g) = known.as_ref().ok().and_then(|g| g.last()) {
            self.metrics
                .last_snapshot
                .set((g.finished_ms / 1000) as i64);
        }
        // A gap asks for a new generation that drops the history before it.
        let mut gap: Option<String> = None;
        loop {
            let state = self.outbox.state()?;
            let due = if let Some(why) = gap.take() {
                Some((why, true))
            } else {
                match &state {
                    Some(s) if s.location == location && !s.generation_done => {
                        Some(("the last snapshot did not finish".to_string(), s.reset))
                    }
                    Some(s) if s.location == location => match known.as_ref().ok() {
                        Some(g) => match g.last() {
                            Some(g) if g.age() < self.config.snapshot_interval => None,
                            Some(_) => Some(("the snapshot interval has passed".into(), false)),
                            None => Some(("no snapshot in S3".into(), true)),
                        },
                        None => None,
                    },
                    _ => {
                        self.check_empty().await?;
                        Some(("first backup to this location".to_string(), true))
                    }
                }
            };
            // Until the next generation is due, or a minute (then retention and due snapshots
            // are looked at again).
            let until_due = known
                .as_ref()
                .ok()
                .and_then(|g| g.last())
                .map_or(Duration::MAX, |g| {
                    self.config.snapshot_interval.saturating_sub(g.age())
                });
            let result = match due {
                Some((why, reset)) => self.generation(&why, reset).await,
                None => self.ship_loop(until_due.min(Duration::from_secs(60))).await,
            };
            match result {
                Ok(()) => {
                    self.local_backoff = LOCAL_RETRY_FIRST;
                }
                Err(Interrupt::Stop) => return self.final_ship().await,
                Err(Interrupt::Fatal(e)) if transient(&e) => {
                    // A full disk (or a lock held too long) refuses the outbox's deletes like
                    // the committer's writes: wait, as the committer does, and go on.
                    tracing::warn!(
                        "backup: the database refused the backup's bookkeeping ({e:#}); \
                         retrying in {} s",
                        self.local_backoff.as_secs()
                    );
                    self.set_problem(Some(format!("the database refused the backup: {e:#}")));
                    // An upload may have gone through unacknowledged: look before re-shipping.
                    self.check_shipped = true;
                    if self.pause(self.local_backoff).await {
                        return self.final_ship().await;
                    }
                    self.local_backoff = (self.local_backoff * 2).min(LOCAL_RETRY_LAST);
                    continue;
                }
                Err(Interrupt::Fatal(e)) => return Err(e),
                Err(Interrupt::Gap { shipped, next_prev }) => {
                    if self.switch.is_recording() {
                        tracing::warn!(
                            "backup: commits {}..={next_prev} were made without the backup (by \
                             another process, or by this server with backup off): taking a new \
                             snapshot; the backup's history before it is dropped",
                            shipped + 1
                        );
                    } else {
                        tracing::warn!(
                            "backup: commits after {shipped} were dropped from the full outbox: \
                             taking a new snapshot; the backup's history before it is dropped"
                        );
                    }
                    self.metrics.history_resets.inc();
                    gap = Some("commits were made without the backup".to_string());
                    continue;
                }
            }
            if self.stopping() {
                return self.final_ship().await;
            }
            known = generations::list(&self.bucket).await;
            if let Ok(g) = &known {
                self.collect_garbage(g).await;
            }
        }
    }

    /// A first backup goes only to an empty location: what is there was not written from
    /// this database, and its history does not lead to it.
    async fn check_empty(&self) -> anyhow::Result<()> {
        let found = match self
            .retry("list the backup location", || self.bucket.list("", None, 1))
            .await
        {
            Ok(found) => found,
            Err(Interrupt::Fatal(e)) => return Err(e),
            Err(_) => return Ok(()),
        };
        if let Some(o) = found.first() {
            anyhow::bail!(
                "{} already holds objects ({}{}) that this database did not write: back it up \
                 to an empty location (another --s3-prefix), or delete what is there",
                self.bucket.location().describe(),
                self.bucket.location().prefix,
                o.key
            );
        }
        Ok(())
    }

    /// Sleeps `d`, waking early when the server stops (returns `true` then).
    async fn pause(&self, d: Duration) -> bool {
        let end = tokio::time::Instant::now() + d;
        while tokio::time::Instant::now() < end {
            if self.stopping() {
                return true;
            }
            tokio::time::sleep(POLL.min(end - tokio::time::Instant::now())).await;
        }
        self.stopping()
    }

    fn location_id(&self) -> String {
        let l = self.bucket.location();
        format!("s3://{}/{}", l.bucket, l.prefix)
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Ships whatever is due for `limit` (returns `Ok`), or until the server stops or a gap
    /// shows.
    async fn ship_loop(&mut self, limit: Duration) -> Result<(), Interrupt> {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if self.stopping() {
                return Err(Interrupt::Stop);
            }
            if !self.ship_due(false).await? {
                tokio::time::sleep(POLL).await;
            }
        }
        Ok(())
    }

    /// Ships one range if one is due (or, with `force`, if anything is pending). Returns
    /// whether it shipped something.
    async fn ship_due(&mut self, force: bool) -> Result<bool, Interrupt> {
        self.update_lag()?;
        if !self.switch.is_recording() {
            // The outbox overflowed: what it dropped can only be had from a new snapshot.
            let shipped = self.outbox.state()?.map_or(0, |s| s.shipped_version);
            return Err(Interrupt::Gap {
                shipped,
                next_prev: self.outbox.current_version()?,
            });
        }
        let Some(oldest) = self.outbox.oldest_pending_ms()? else {
            return Ok(false);
        };
        // Ship when the oldest waiting commit is half an interval old: under steady load
        // every commit is in S3 within the interval, with about two objects per interval.
        let age = Duration::from_millis(now_ms().saturating_sub(oldest.max(0) as u64));
        // (Or when a full object waits: the count is at most a second old.)
        if !force
            && age < self.config.interval / 2
            && (self.metrics.pending_bytes.get() as usize) < MAX_LOG_BYTES
        {
            return Ok(false);
        }
        let Some(drained) = self.outbox.drain(MAX_LOG_COMMITS, MAX_LOG_BYTES)? else {
            return Ok(false);
        };
        let shipped = self
            .outbox
            .state()?
            .map(|s| s.shipped_version)
            .unwrap_or_default();
        if drained.prev_version != shipped {
            return Err(Interrupt::Gap {
                shipped,
                next_prev: drained.prev_version,
            });
        }
        self.ship(drained).await?;
        Ok(true)
    }

    /// Uploads one drained range (retrying until it is in S3) and acknowledges it.
    async fn ship(&mut self, drained: Drained) -> Result<(), Interrupt> {
        let entries = &drained.range.entries;
        let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
            // Commits that changed no key: nothing for the log, only the position.
            self.outbox.acknowledge(drained.position)?;
            return Ok(());
        };
        let name =
            LogName::for_commits(stamp12(&first.versionstamp)?, stamp12(&last.versionstamp)?);
        // After a start (or a refused acknowledgement) the ranges may already be in S3: look
        // until one is not.
        if self.check_shipped {
            if let Some(shipped) = self.already_shipped(&name).await? {
                tracing::info!(
                    "backup: {} was shipped before the restart; going on after it",
                    shipped.key()
                );
                let upto = names::version_of(&shipped.last);
                self.outbox
                    .acknowledge(crate::store::outbox::Position(upto))?;
                return Ok(());
            }
            self.check_shipped = false;
        }
        let body = Bytes::from(drained.range.encode_to_vec());
        let key = name.key();
        self.retry("upload a log object", || {
            self.bucket.put(&key, body.clone())
        })
        .await?;
        self.metrics.log_objects.inc();
        self.metrics.log_bytes.inc_by(body.len() as u64);
        #[cfg(debug_assertions)]
        debug_crash_after_upload();
        self.outbox.acknowledge(drained.position)?;
        self.update_lag()?;
        Ok(())
    }

    /// A log object with the same first versionstamp: shipped before a crash, not
    /// acknowledged. Shipping again would make a second object with the same entries.
    async fn already_shipped(&self, name: &LogName) -> Result<Option<LogName>, Interrupt> {
        let prefix = LogName::monoseq_prefix(name.monoseq);
        let listed = self
            .retry("look for a log shipped before the restart", || {
                self.bucket.list(&prefix, None, 10)
            })
            .await?;
        Ok(listed
            .iter()
            .filter_map(|o| LogName::parse(&o.key).ok())
            .filter(|n| n.first == name.first)
            .max_by_key(|n| n.last))
    }

    /// Runs an S3 request until it succeeds, backing off; gives up only when the server
    /// stops. Keeps the lag metrics current meanwhile.
    async fn retry<T, F, Fut>(&self, what: &str, mut request: F) -> Result<T, Interrupt>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, S3Error>>,
    {
        let mut delay = RETRY_FIRST;
        let mut failures = 0u32;
        loop {
            match request().await {
                Ok(t) => {
                    if failures > 0 {
                        tracing::info!("backup: S3 works again ({what} after {failures} failures)");
                        self.set_problem(None);
                    }
                    return Ok(t);
                }
                Err(e) => {
                    failures += 1;
                    if failures == 1 || failures.is_power_of_two() {
                        tracing::warn!("backup: cannot {what} (attempt {failures}): {e}");
                    }
                    self.set_problem(Some(format!("cannot {what}: {e}")));
                    if self.stopping() {
                        return Err(Interrupt::Stop);
                    }
                    self.update_lag()?;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_LAST);
                }
            }
        }
    }

    fn set_problem(&self, problem: Option<String>) {
        self.problem.set(problem);
    }

    /// Sets the lag and pending gauges; warns once when the lag crosses `LAG_WARNING`.
    fn update_lag(&self) -> anyhow::Result<()> {
        let lag = match self.outbox.oldest_pending_ms()? {
            Some(oldest) => Duration::from_millis(now_ms().saturating_sub(oldest.max(0) as u64)),
            None => Duration::ZERO,
        };
        self.metrics.lag_seconds.set(lag.as_secs_f64());
        self.lag_warning.update(
            lag,
            &self.problem,
            "backup",
            |s| format!("writes of the last {s} s are not in S3 yet"),
            &format!(
                "writes of more than {} s are not in S3 yet",
                LAG_WARNING.as_secs()
            ),
        );
        // Before the first snapshot nothing is in S3.
        let shipped = match self.outbox.state()? {
            Some(s) if s.generation_done || s.shipped_version > 0 => s.shipped_version,
            _ => 0,
        };
        let current = self.outbox.current_version()?;
        self.metrics
            .lag_versions
            .set(current.saturating_sub(shipped) as i64);
        // Counting the outbox reads every pending row: once a second, not every poll.
        if self.pending_counted.get().elapsed() < PENDING_COUNT_EVERY {
            return Ok(());
        }
        self.pending_counted.set(std::time::Instant::now());
        let mut pending = self.outbox.pending()?;
        if pending.bytes > self.config.max_pending_bytes && self.switch.is_recording() {
            self.switch.set_recording(false);
            let dropped = self.outbox.discard_all()?;
            tracing::error!(
                "backup: {} bytes of commits wait for S3, more than the bound of {} \
                 (--backup-max-pending-mb): dropped {dropped} pending commits and paused \
                 recording; when S3 answers again the backup takes a new snapshot and starts a \
                 new history",
                pending.bytes,
                self.config.max_pending_bytes
            );
            pending = self.outbox.pending()?;
        }
        self.metrics.pending_commits.set(pending.commits as i64);
        self.metrics.pending_bytes.set(pending.bytes as i64);
        Ok(())
    }

    /// Takes a snapshot generation: reads the `kv` table in chunks (a fuzzy snapshot that
    /// starts at version S), uploads them, ships the logs past the version E at which the
    /// reading ended, then records the generation and writes `differential` = E. With
    /// `reset`, everything older in S3 is deleted afterwards (its history does not lead here).
    async fn generation(&mut self, why: &str, reset: bool) -> Result<(), Interrupt> {
        let location = self.location_id();
        if !self.switch.is_recording() {
            // Only once S3 answers: recording sooner would fill the outbox again.
            self.retry("reach S3", || {
                self.bucket.list(names::DIFFERENTIAL, None, 1)
            })
            .await?;
            self.switch.set_recording(true);
        }
        let start = self.outbox.start_generation(&location, reset)?;
        if reset {
            // Before any log of the new history is shipped (see names::RESETS).
            let key = names::reset_key(start);
            self.retry("mark a new history", || self.bucket.put(&key, Bytes::new()))
                .await?;
        }
        tracing::info!("backup: taking a snapshot from version {start} ({why})");
        let began = std::time::Instant::now();
        let mut seq = 0u64;
        let mut after: Option<Vec<u8>> = None;
        let mut rows_total = 0usize;
        loop {
            let rows =
                self.outbox
                    .snapshot_rows(after.as_deref(), SNAPSHOT_ROWS, SNAPSHOT_BYTES)?;
            let Some(last) = rows.last() else { break };
            after = Some(last.key.clone());
            rows_total += rows.len();
            let body = Bytes::from(snapshot_range(&rows).encode_to_vec());
            let key = SnapshotName {
                format: 1,
                monoseq: start,
                seq,
            }
            .key();
            self.retry("upload a snapshot object", || {
                self.bucket.put(&key, body.clone())
            })
            .await?;
            self.metrics.snapshot_objects.inc();
            self.metrics.snapshot_bytes.inc_by(body.len() as u64);
            seq += 1;
            // Keep the logs flowing while a large snapshot uploads.
            self.ship_due(false).await?;
            if self.stopping() {
                return Err(Interrupt::Stop);
            }
        }
        // Every commit up to `end` must be in the logs before `differential` says `end`.
        let end = self.outbox.current_version()?;
        loop {
            let shipped = self
                .outbox
                .state()?
                .map(|s| s.shipped_version)
                .unwrap_or_default();
            if shipped >= end {
                break;
            }
            if !self.ship_due(true).await? {
                tokio::time::sleep(POLL).await;
            }
            if self.stopping() {
                return Err(Interrupt::Stop);
            }
        }
        let generation = Generation {
            start,
            differential: end,
            objects: seq,
            finished_ms: now_ms(),
        };
        let (key, body) = generation.object();
        self.retry("record the snapshot", || {
            self.bucket.put(&key, body.clone())
        })
        .await?;
        let text = Bytes::from(names::differential_text(end));
        self.retry("write the differential object", || {
            self.bucket.put(names::DIFFERENTIAL, text.clone())
        })
        .await?;
        self.outbox.finish_generation()?;
        self.metrics
            .last_snapshot
            .set((generation.finished_ms / 1000) as i64);
        tracing::info!(
            "backup: snapshot from version {start} complete: {rows_total} keys in {seq} objects, \
             consistent at version {end}, in {:.1} s",
            began.elapsed().as_secs_f64()
        );
        if reset {
            self.drop_history_before(start).await;
        }
        Ok(())
    }

    /// Deletes every generation that started before `start` and every log that ends before
    /// it.
    async fn drop_history_before(&self, start: u64) {
        if let Err(e) = generations::delete_before(&self.bucket, start, &self.metrics).await {
            tracing::warn!("backup: cannot delete history before version {start}: {e}");
        }
    }

    /// Retention: keeps every generation finished within `retention`, and the newest one
    /// before that (the oldest retained point needs it); deletes the rest and the logs that
    /// end before the oldest kept generation starts.
    async fn collect_garbage(&self, known: &[Generation]) {
        let Some(keep_from) = generations::oldest_needed(known, self.config.retention) else {
            return;
        };
        if known.iter().any(|g| g.start < keep_from) {
            self.drop_history_before(keep_from).await;
        }
    }

    /// On stop: ships what is pending, for a few seconds at most.
    async fn final_ship(mut self) -> anyhow::Result<()> {
        self.stop.store(false, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + FINAL_SHIP;
        let shipping = async {
            loop {
                match self.ship_due(true).await {
                    Ok(true) => continue,
                    Ok(false) => return Ok(()),
                    Err(Interrupt::Fatal(e)) => return Err(e),
                    Err(_) => return Ok(()),
                }
            }
        };
        match tokio::time::timeout_at(deadline, shipping).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!(
                "backup: stopped with writes not yet in S3; they are shipped at the next start"
            ),
        }
        let _ = self.update_lag();
        Ok(())
    }
}

/// A snapshot object from `kv` rows: data and metadata lists paired by index (SPEC §8.2).
fn snapshot_range(rows: &[SnapshotRow]) -> BackupSnapshotRange {
    let mut range = BackupSnapshotRange::default();
    for row in rows {
        let mut data_key = Vec::with_capacity(row.key.len() + 1);
        data_key.push(b'd');
        data_key.extend_from_slice(&row.key);
        let mut meta_key = data_key.clone();
        meta_key[0] = b'm';
        let mut meta = Vec::with_capacity(19);
        meta.extend_from_slice(&row.version.to_be_bytes());
        meta.extend_from_slice(&row.seq.to_be_bytes());
        meta.push(row.encoding as u8);
        meta.extend_from_slice(&row.expiration_ms.to_le_bytes());
        range.data_list.push(BackupKvPair {
            key: data_key.into(),
            value: Bytes::copy_from_slice(&row.value),
        });
        range.metadata_list.push(BackupKvPair {
            key: meta_key.into(),
            value: meta.into(),
        });
    }
    range
}

fn stamp12(vs: &[u8]) -> anyhow::Result<names::Versionstamp12> {
    vs.try_into()
        .with_context(|| format!("the outbox holds a {}-byte versionstamp", vs.len()))
}

/// Debug builds: `DENOKV_DEBUG_BACKUP_CRASH=after-upload:N` aborts the process right after
/// the N-th log object is uploaded, before it is acknowledged (the crash the restart must
/// recover from without shipping it twice).
#[cfg(debug_assertions)]
fn debug_crash_after_upload() {
    use std::sync::atomic::AtomicU64;
    static UPLOADS: AtomicU64 = AtomicU64::new(0);
    let Ok(spec) = std::env::var("DENOKV_DEBUG_BACKUP_CRASH") else {
        return;
    };
    let n: u64 = spec
        .strip_prefix("after-upload:")
        .and_then(|n| n.parse().ok())
        .expect("DENOKV_DEBUG_BACKUP_CRASH=after-upload:N");
    if UPLOADS.fetch_add(1, Ordering::Relaxed) + 1 == n {
        eprintln!("debug build, DENOKV_DEBUG_BACKUP_CRASH: aborting after upload {n}");
        std::process::abort();
    }
}

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_or_a_busy_database_is_waited_out_other_errors_stop() {
        let full = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            None,
        );
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            None,
        );
        let io = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_IOERR),
            None,
        );
        assert!(transient(
            &anyhow::Error::new(full).context("cannot acknowledge shipped backup entries")
        ));
        assert!(transient(&anyhow::Error::new(busy)));
        assert!(!transient(&anyhow::Error::new(io)));
        assert!(!transient(&anyhow::anyhow!("the outbox holds a bad row")));
    }

    #[test]
    fn snapshot_objects_pair_data_and_metadata_by_index() {
        let rows = vec![
            SnapshotRow {
                key: b"a".to_vec(),
                value: b"1".to_vec(),
                encoding: 2,
                version: 7,
                seq: 0,
                expiration_ms: -1,
            },
            SnapshotRow {
                key: b"b".to_vec(),
                value: b"22".to_vec(),
                encoding: 1,
                version: 9,
                seq: 3,
                expiration_ms: 1234,
            },
        ];
        let r = snapshot_range(&rows);
        assert_eq!(r.data_list.len(), 2);
        assert_eq!(&r.data_list[1].key[..], b"db");
        assert_eq!(&r.data_list[1].value[..], b"22");
        assert_eq!(&r.metadata_list[1].key[..], b"mb");
        let m = &r.metadata_list[1].value;
        assert_eq!(m.len(), 19);
        assert_eq!(&m[..10], &[0, 0, 0, 0, 0, 0, 0, 9, 0, 3]);
        assert_eq!(m[10], 1);
        assert_eq!(i64::from_le_bytes(m[11..].try_into().unwrap()), 1234);
        assert_eq!(
            i64::from_le_bytes(r.metadata_list[0].value[11..].try_into().unwrap()),
            -1
        );
    }
}
