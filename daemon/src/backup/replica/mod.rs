//! Replica mode (`serve --sync-from-s3`): a side thread with its own small tokio runtime
//! follows a backup in S3 into the replica file (SPEC §8.3–8.5) while the cores serve reads
//! from its `kv` view. Before the server listens: bind the file to the bucket, take the
//! initial snapshot, check out the newest point. Then, every `--sync-interval-ms`: fetch the
//! new log objects, check out the newest point, and wake the watch streams of the keys that
//! changed (upstream's replica never wakes them: SPEC §10 D8b).
//!
//! Failures (docs/BACKUP.md "Replicas and pitr"): an S3 request that fails is retried with
//! backoff (upstream's replica dies instead: SPEC §10 D18) while the replica serves its last
//! good point, with the lag growing in `denokv_replica_lag_seconds`, a warning when it passes
//! a minute and the reason in systemd's status. Anything else (a malformed object, a log that
//! does not lead on from the replica's point, a database error) stops the server: serving on
//! from a replica that can no longer follow would be silently stale.

mod follower;
pub mod metrics;
pub mod pitr;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use bytes::Bytes;

pub use self::follower::Follower;
pub use self::metrics::ReplicaMetrics;
use crate::backup::s3::Location;
use crate::backup::side::{self, LAG_WARNING};
use crate::store::replica::Checkout;
use crate::store::WatchRegistry;

/// What `serve --sync-from-s3` was given.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    pub location: Location,
    /// The pause between syncs.
    pub interval: Duration,
    /// How far back `pitr checkout` can go: older undo entries are deleted.
    pub history: Duration,
}

/// Retries of a failed sync back off up to this.
const RETRY_LAST: Duration = Duration::from_secs(30);

/// The running replica thread.
pub struct Replica(side::SideThread);

/// How the start of the replica went, told to the thread that waits for it.
pub type Started = mpsc::Receiver<anyhow::Result<()>>;

impl Replica {
    /// Starts the thread: it binds the file, takes the initial snapshot and checks out the
    /// newest point, then says so on the returned channel (or sends the error and ends), and
    /// goes on syncing until stopped.
    pub fn start(
        db_path: &Path,
        config: ReplicaConfig,
        metrics: Arc<ReplicaMetrics>,
        watches: Arc<WatchRegistry>,
        on_problem: crate::backup::ProblemSink,
    ) -> anyhow::Result<(Replica, Started)> {
        let stop = Arc::new(AtomicBool::new(false));
        let problem = side::Problem::new(on_problem);
        let view = problem.view();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the replica thread's runtime")?;
        let (started_tx, started_rx) = mpsc::channel();
        let path: PathBuf = db_path.to_path_buf();
        tracing::info!(
            "Replica of {} (a sync every {} ms)",
            config.location.describe(),
            config.interval.as_millis()
        );
        let mut sync = Sync {
            stop: stop.clone(),
            problem,
            metrics,
            watches,
            interval: config.interval,
            history: config.history,
            pruned: None,
            lag_warning: Default::default(),
        };
        let thread = std::thread::Builder::new()
            .name("replica".into())
            .spawn(move || {
                let file = path.clone();
                let result = runtime.block_on(async move {
                    let mut follower = match sync.start(&file, config.location).await {
                        Ok(f) => {
                            let _ = started_tx.send(Ok(()));
                            f
                        }
                        Err(e) => {
                            let _ = started_tx.send(Err(e));
                            return Ok(());
                        }
                    };
                    sync.run(&mut follower).await
                });
                if let Err(e) = &result {
                    // A replica that cannot follow must not serve on as if it did.
                    crate::fatal::stop(format!("the replica {} failed: {e:#}", path.display()));
                }
                result
            })
            .context("cannot start the replica thread")?;
        Ok((
            Replica(side::SideThread::new("replica", thread, stop, view)),
            started_rx,
        ))
    }

    /// What is wrong with the replica now (for systemd's status), if anything.
    pub fn problem(&self) -> Option<String> {
        self.0.problem()
    }

    /// Stops the thread (it finishes the sync or checkout it is in).
    pub fn stop(self) -> anyhow::Result<()> {
        self.0.stop()
    }
}

struct Sync {
    stop: Arc<AtomicBool>,
    problem: side::Problem,
    metrics: Arc<ReplicaMetrics>,
    watches: Arc<WatchRegistry>,
    interval: Duration,
    history: Duration,
    /// When the undo log was last pruned.
    pruned: Option<std::time::Instant>,
    lag_warning: side::LagWarning,
}

impl Sync {
    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Binding, initial snapshot and the first checkout; S3 failures are retried.
    async fn start(&mut self, path: &Path, location: Location) -> anyhow::Result<Follower> {
        let mut follower = Follower::open(path, location, Some(self.metrics.clone())).await?;
        let mut failures = 0u32;
        loop {
            let started = SystemTime::now();
            let work = async {
                follower.initial_snapshot(&self.stop).await?;
                let synced = follower.sync().await?;
                let checkout = follower.checkout_latest()?;
                anyhow::Ok((synced, checkout))
            };
            // A stop does not wait for S3 (a request may hang up to its timeout); each step
            // that changes the file is one transaction, so stopping between them is safe.
            let Some(result) = self.unless_stopped(work).await else {
                anyhow::bail!("stopped before the replica was ready");
            };
            match result {
                Ok((_, checkout)) => {
                    self.succeeded(&follower, started, checkout, failures);
                    return Ok(follower);
                }
                Err(e) => {
                    if self.stopping() || !follower::is_s3_failure(&e) {
                        return Err(e);
                    }
                    failures += 1;
                    self.failed(&e, failures).await;
                }
            }
        }
    }

    /// Syncs and checks out the newest point every interval until stopped.
    async fn run(&mut self, follower: &mut Follower) -> anyhow::Result<()> {
        let mut failures = 0u32;
        while !self.stopping() {
            self.pause(self.interval).await;
            if self.stopping() {
                break;
            }
            let started = SystemTime::now();
            let work = async {
                follower.sync().await?;
                follower.checkout_latest()
            };
            let Some(result) = self.unless_stopped(work).await else {
                break;
            };
            match result {
                Ok(checkout) => {
                    self.succeeded(follower, started, checkout, failures);
                    failures = 0;
                    self.prune(follower)?;
                }
                Err(e) if follower::is_s3_failure(&e) => {
                    failures += 1;
                    self.failed(&e, failures).await;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    fn succeeded(
        &mut self,
        follower: &Follower,
        started: SystemTime,
        checkout: Option<Checkout>,
        failures: u32,
    ) {
        if failures > 0 {
            tracing::info!("replica: syncing from S3 works again (after {failures} failures)");
            self.set_problem(None);
        }
        if let Some(c) = checkout {
            self.metrics.applied_entries.inc_by(c.entries as u64);
            if c.too_many_keys {
                self.watches.notify_all();
            } else {
                let keys: Vec<Bytes> = c.keys.into_iter().map(Bytes::from).collect();
                self.watches.notify(&keys);
            }
            if let Ok(Some(ms)) = follower.db.current_timestamp_ms() {
                self.metrics.point_timestamp.set(ms as f64 / 1000.0);
            }
        }
        self.metrics.current_as_of(started);
        self.metrics.last_sync.set(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
        );
        self.check_lag();
    }

    /// Once a minute: deletes the undo entries older than the history kept, a batch per
    /// transaction (the undo log holds every change applied: without this the file grows for
    /// ever).
    fn prune(&mut self, follower: &mut Follower) -> anyhow::Result<()> {
        const EVERY: Duration = Duration::from_secs(60);
        const BATCH: usize = 10_000;
        if self.pruned.is_some_and(|t| t.elapsed() < EVERY) {
            return Ok(());
        }
        self.pruned = Some(std::time::Instant::now());
        let cutoff = SystemTime::now()
            .checked_sub(self.history)
            .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let mut total = 0;
        while !self.stopping() {
            let deleted = follower.db.prune_undo(cutoff, BATCH)?;
            total += deleted;
            if deleted < BATCH {
                break;
            }
        }
        if total > 0 {
            tracing::info!(
                "replica: deleted {total} undo entries older than {} s (the oldest point \
                 `pitr checkout` can go back to moves on)",
                self.history.as_secs()
            );
        }
        Ok(())
    }

    /// After a failed S3 request: log (the first failure and then at powers of two), count,
    /// say so in the status, and back off.
    async fn failed(&mut self, e: &anyhow::Error, failures: u32) {
        self.metrics.sync_errors.inc();
        if failures == 1 || failures.is_power_of_two() {
            tracing::warn!(
                "replica: cannot sync from S3 (attempt {failures}), serving the last point \
                 synced: {e:#}"
            );
        }
        self.set_problem(Some(format!("cannot sync from S3: {e:#}")));
        self.metrics.sample();
        self.check_lag();
        let backoff = self
            .interval
            .max(Duration::from_millis(200))
            .saturating_mul(1 << failures.min(8))
            .min(RETRY_LAST);
        self.pause(backoff).await;
    }

    fn check_lag(&mut self) {
        let Some(lag) = self.metrics.lag() else {
            return;
        };
        self.lag_warning.update(
            Duration::from_secs_f64(lag),
            &self.problem,
            "replica",
            |s| format!("{s} s behind the backup in S3: clients read data that old"),
            &format!("more than {} s behind", LAG_WARNING.as_secs()),
        );
    }

    fn set_problem(&self, problem: Option<String>) {
        self.problem.set(problem);
    }

    /// Runs `work` to its end, or until the server stops (`None`; `work` is dropped).
    async fn unless_stopped<T>(&self, work: impl std::future::Future<Output = T>) -> Option<T> {
        use std::future::Future;
        use std::task::Poll;
        let mut work = std::pin::pin!(work);
        let mut stopped = std::pin::pin!(async {
            while !self.stopping() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        std::future::poll_fn(|cx| {
            if let Poll::Ready(t) = work.as_mut().poll(cx) {
                return Poll::Ready(Some(t));
            }
            match stopped.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            }
        })
        .await
    }

    /// Sleeps `d`, waking early when the server stops.
    async fn pause(&self, d: Duration) {
        let end = tokio::time::Instant::now() + d;
        while !self.stopping() {
            let now = tokio::time::Instant::now();
            if now >= end {
                return;
            }
            tokio::time::sleep((end - now).min(Duration::from_millis(50))).await;
        }
    }
}
