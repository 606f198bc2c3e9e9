//! Continuous backup of a primary to S3 (SPEC §8, docs/BACKUP.md): the object names, the S3
//! client, snapshot generations and the backup thread.

pub mod generations;
pub mod metrics;
pub mod names;
pub mod replica;
pub mod restore;
pub mod s3;
pub mod side;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

pub use self::metrics::BackupMetrics;
pub use self::s3::Location;
pub use self::side::{ProblemSink, LAG_WARNING};
use crate::store::outbox::OutboxReader;

/// What `serve --backup-to-s3` was given.
#[derive(Clone, Debug)]
pub struct BackupConfig {
    pub location: Location,
    /// Every committed write is in S3 within this time under steady load.
    pub interval: Duration,
    /// A new snapshot generation this often.
    pub snapshot_interval: Duration,
    /// Points in time kept restorable.
    pub retention: Duration,
    /// Bytes of commits the local outbox may hold while S3 is away; beyond, it is emptied
    /// and the backup starts a new history when S3 answers.
    pub max_pending_bytes: u64,
}

/// The running backup thread.
pub struct Backup(side::SideThread);

impl Backup {
    /// Starts the thread. The database must hold the outbox (the committer, started with
    /// backup on, creates it).
    pub fn start(
        db_path: &Path,
        config: BackupConfig,
        switch: crate::store::BackupOutbox,
        metrics: Arc<BackupMetrics>,
        on_problem: ProblemSink,
    ) -> anyhow::Result<Backup> {
        let outbox = OutboxReader::open(db_path)?;
        let stop = Arc::new(AtomicBool::new(false));
        let problem = side::Problem::new(on_problem);
        let view = problem.view();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the backup thread's runtime")?;
        let stop2 = stop.clone();
        let path: PathBuf = db_path.to_path_buf();
        tracing::info!(
            "Backup to {} (every write within {} ms; a snapshot every {} s; retention {} s)",
            config.location.describe(),
            config.interval.as_millis(),
            config.snapshot_interval.as_secs(),
            config.retention.as_secs()
        );
        let thread = std::thread::Builder::new()
            .name("backup".into())
            .spawn(move || {
                let result = runtime.block_on(async move {
                    let bucket =
                        s3::Bucket::connect(config.location.clone(), Some(metrics.clone())).await;
                    writer::Writer {
                        config,
                        bucket,
                        outbox,
                        metrics,
                        stop: stop2,
                        problem,
                        check_shipped: true,
                        switch,
                        lag_warning: Default::default(),
                        local_backoff: Duration::from_secs(1),
                        pending_counted: std::cell::Cell::new(
                            std::time::Instant::now() - Duration::from_secs(3600),
                        ),
                    }
                    .run()
                    .await
                });
                if let Err(e) = &result {
                    // The backup cannot go on: a server that says nothing would let writes
                    // pile up unprotected. Stop, and let systemd restart us.
                    crate::fatal::stop(format!("the backup of {} failed: {e:#}", path.display()));
                }
                result
            })
            .context("cannot start the backup thread")?;
        Ok(Backup(side::SideThread::new("backup", thread, stop, view)))
    }

    /// What is wrong with the backup now (for systemd's status), if anything.
    pub fn problem(&self) -> Option<String> {
        self.0.problem()
    }

    /// Stops the thread after it ships what is pending (a few seconds at most); call after
    /// the committer has stopped.
    pub fn stop(self) -> anyhow::Result<()> {
        self.0.stop()
    }
}
