//! The reader side of a backup (SPEC §8.4): binds a replica file to a bucket and prefix,
//! takes the initial snapshot, fetches new log objects into the redo log, and checks out the
//! newest point. Used by `serve --sync-from-s3` and the `pitr` subcommands.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use prost::Message;

use super::metrics::ReplicaMetrics;
use crate::backup::names::{self, LogName, SnapshotName};
use crate::backup::s3::{Bucket, Location, Operation, S3Error};
use crate::backup_proto::{BackupKvMutationKind, BackupMutationRange, BackupSnapshotRange};
use crate::store::replica::{Checkout, Cursor, LogEntry, RangeId, ReplicaDb, SnapshotPair};

/// Snapshot objects fetched at once (SPEC §8.4).
const SNAPSHOT_FETCHES: usize = 16;
/// Log objects fetched at once, and stored per transaction.
const LOG_FETCHES: usize = 32;
const LOG_CHUNK: usize = 64;
/// How often the initial snapshot looks for the `differential` object.
const DIFFERENTIAL_POLL: Duration = Duration::from_secs(1);

/// A replica file and the backup it follows.
pub struct Follower {
    pub db: ReplicaDb,
    bucket: Bucket,
    metrics: Option<Arc<ReplicaMetrics>>,
}

/// What one sync fetched.
#[derive(Debug, Default)]
pub struct Synced {
    /// When it started: everything S3 held then (by LastModified) is in the redo log now.
    pub started: Option<SystemTime>,
    pub objects: usize,
    pub entries: usize,
}

impl Follower {
    /// Opens (or creates) the replica file and binds it to `location` (SPEC §8.4 `init_s3`).
    pub async fn open(
        path: &Path,
        location: Location,
        metrics: Option<Arc<ReplicaMetrics>>,
    ) -> anyhow::Result<Follower> {
        let mut db = ReplicaDb::open(path)?;
        db.bind_s3(&location.bucket, &location.prefix)?;
        let bucket = Bucket::connect(location, None).await;
        Ok(Follower {
            db,
            bucket,
            metrics,
        })
    }

    pub fn location(&self) -> &Location {
        self.bucket.location()
    }

    /// Counts a request and its failure in the replica's metrics.
    fn counted<T>(&self, operation: Operation, result: Result<T, S3Error>) -> Result<T, S3Error> {
        if let Some(m) = &self.metrics {
            m.s3_request(operation).inc();
            if result.is_err() {
                m.s3_error(operation).inc();
            }
        }
        result
    }

    /// The initial snapshot, unless the file has it (resumable: each step is kept as it
    /// completes). Waits for the `differential` object until `stop` is set.
    pub async fn initial_snapshot(&mut self, stop: &AtomicBool) -> anyhow::Result<()> {
        if self.db.initial_snapshot_completed()? {
            return Ok(());
        }
        let mut waited = false;
        let dv = loop {
            let got = self.bucket.get(names::DIFFERENTIAL).await;
            match self.counted(Operation::Get, got)? {
                Some(body) => break names::parse_differential(&body)?,
                None => {
                    if !waited {
                        tracing::info!(
                            "replica: waiting for {}{} (the backup's first snapshot)",
                            self.location().describe(),
                            names::DIFFERENTIAL
                        );
                        waited = true;
                    }
                    if stop.load(Ordering::Relaxed) {
                        bail!("stopped while waiting for the backup's first snapshot");
                    }
                    tokio::time::sleep(DIFFERENTIAL_POLL).await;
                }
            }
        };
        tracing::info!(
            "replica: taking the initial snapshot of {} (consistent at {})",
            self.location().describe(),
            names::hex(&dv)
        );
        if self.db.snapshot_ranges()?.is_empty() {
            let listed = self.bucket.list(names::SNAPSHOTS, None, usize::MAX).await;
            let listed = self.counted(Operation::List, listed)?;
            let mut ids = Vec::with_capacity(listed.len());
            for o in &listed {
                let n = SnapshotName::parse(&o.key)?;
                ids.push(RangeId {
                    format: n.format,
                    monoseq: n.monoseq,
                    seq: n.seq,
                });
            }
            self.db.record_snapshot_ranges(&ids)?;
        }
        let pending: Vec<RangeId> = self
            .db
            .snapshot_ranges()?
            .into_iter()
            .filter(|(_, pulled)| !pulled)
            .map(|(id, _)| id)
            .collect();
        let mut keys = 0usize;
        for chunk in pending.chunks(SNAPSHOT_FETCHES) {
            let names: Vec<String> = chunk.iter().map(snapshot_key).collect();
            let bodies = self.fetch(&names).await?;
            for ((id, key), body) in chunk.iter().zip(&names).zip(bodies) {
                let range = BackupSnapshotRange::decode(body)
                    .with_context(|| format!("snapshot object {key} is not a snapshot range"))?;
                let pairs = snapshot_pairs(&range).with_context(|| format!("snapshot {key}"))?;
                keys += pairs.len();
                self.db.apply_snapshot_range(*id, &pairs)?;
            }
        }
        let synced = self.sync().await?;
        let c = self.db.finish_initial_snapshot(&dv)?;
        tracing::info!(
            "replica: initial snapshot complete: {keys} keys from {} objects, {} log objects; \
             at {}",
            pending.len(),
            synced.objects,
            names::hex(&c.current[..10])
        );
        Ok(())
    }

    /// Fetches the log objects after the cursor into the redo log (SPEC §8.4 "Sync"),
    /// stopping at the first one modified after the sync started.
    pub async fn sync(&mut self) -> anyhow::Result<Synced> {
        let started = SystemTime::now();
        let mut synced = Synced {
            started: Some(started),
            ..Default::default()
        };
        let mut after = self.db.cursor()?.map(|c| {
            LogName {
                format: c.format,
                monoseq: c.monoseq,
                first: c.first,
                last: c.last,
            }
            .key()
        });
        loop {
            let page = self.bucket.list(names::LOGS, after.as_deref(), 1000).await;
            let page = self.counted(Operation::List, page)?;
            // After the listing: a new history's marker is written before its logs.
            self.check_history().await?;
            let full = page.len() >= 1000;
            let mut due = Vec::with_capacity(page.len());
            let mut newer = false;
            for o in &page {
                if o.last_modified.is_some_and(|t| t > started) {
                    newer = true;
                    break;
                }
                due.push((LogName::parse(&o.key)?, o.key.clone()));
            }
            for chunk in due.chunks(LOG_CHUNK) {
                let mut bodies = Vec::with_capacity(chunk.len());
                for part in chunk.chunks(LOG_FETCHES) {
                    let keys: Vec<String> = part.iter().map(|(_, k)| k.clone()).collect();
                    bodies.extend(self.fetch(&keys).await?);
                }
                let mut entries = Vec::new();
                for ((_, key), body) in chunk.iter().zip(bodies) {
                    decode_log(&body, &mut entries).with_context(|| format!("log object {key}"))?;
                }
                let (name, _) = chunk.last().expect("a chunk is not empty");
                self.db.insert_logs(
                    &entries,
                    &Cursor {
                        format: name.format,
                        monoseq: name.monoseq,
                        first: name.first,
                        last: name.last,
                    },
                )?;
                synced.objects += chunk.len();
                synced.entries += entries.len();
                if let Some(m) = &self.metrics {
                    m.log_objects.inc_by(chunk.len() as u64);
                }
            }
            if newer || !full {
                return Ok(synced);
            }
            after = page.last().map(|o| o.key.clone());
        }
    }

    /// Stops following when the primary started a new history after the point this replica
    /// has reached (names::RESETS): the commits before it were never shipped, so applying its
    /// logs would serve a database with a hole in it. The replica file must be made anew.
    async fn check_history(&self) -> anyhow::Result<()> {
        let reached = match (self.db.cursor()?, self.db.current()?) {
            (Some(c), _) => names::version_of(&c.last),
            (None, Some(current)) => names::version_of(&current),
            (None, None) => return Ok(()),
        };
        let markers = self.bucket.list(names::RESETS, None, usize::MAX).await;
        let markers = self.counted(Operation::List, markers)?;
        if let Some(v) = markers
            .iter()
            .filter_map(|o| names::parse_reset(&o.key))
            .find(|&v| v > reached)
        {
            anyhow::bail!(
                "the primary started a new backup history at version {v} (it made commits the \
                 backup could not ship: another process wrote its file, or its outbox \
                 overflowed); this replica, at version {reached}, cannot follow it: delete the \
                 replica file and start the replica again"
            );
        }
        Ok(())
    }

    /// Checks out the newest point downloaded, if it is ahead of the current one.
    pub fn checkout_latest(&mut self) -> anyhow::Result<Option<Checkout>> {
        let current = self
            .db
            .current()?
            .context("the replica has no initial snapshot")?;
        match self.db.newest_point()? {
            Some(newest) if newest > current => {
                let target: [u8; 10] = newest[..10].try_into().expect("10 bytes");
                Ok(Some(self.db.checkout(&target)?))
            }
            _ => Ok(None),
        }
    }

    /// Fetches `keys` (relative to the prefix) at once; all must exist.
    async fn fetch(&self, keys: &[String]) -> anyhow::Result<Vec<Bytes>> {
        let mut set = tokio::task::JoinSet::new();
        for (i, key) in keys.iter().enumerate() {
            let (bucket, key) = (self.bucket.clone(), key.clone());
            set.spawn(async move { (i, bucket.get(&key).await) });
        }
        let mut out: Vec<Option<Bytes>> = vec![None; keys.len()];
        while let Some(joined) = set.join_next().await {
            let (i, got) = joined.context("a fetch task failed")?;
            match self.counted(Operation::Get, got)? {
                Some(body) => out[i] = Some(body),
                None => bail!(
                    "{}{} was listed but is gone: the backup's retention deleted history this \
                     replica still needed; start a new replica (a new --sqlite-path)",
                    self.location().describe(),
                    keys[i]
                ),
            }
        }
        Ok(out
            .into_iter()
            .map(|b| b.expect("every fetch answered"))
            .collect())
    }
}

fn snapshot_key(id: &RangeId) -> String {
    if id.format == 1 {
        SnapshotName {
            format: 1,
            monoseq: id.monoseq,
            seq: id.seq,
        }
        .key()
    } else {
        format!(
            "{}{:016x}_{:016x}_{:016x}.bin",
            names::SNAPSHOTS,
            id.monoseq >> 32,
            id.monoseq & 0xffff_ffff,
            id.seq
        )
    }
}

/// The rows of a snapshot object: data and metadata lists paired by index (SPEC §8.2).
fn snapshot_pairs(range: &BackupSnapshotRange) -> anyhow::Result<Vec<SnapshotPair<'_>>> {
    if range.data_list.len() != range.metadata_list.len() {
        bail!(
            "{} data entries but {} metadata entries",
            range.data_list.len(),
            range.metadata_list.len()
        );
    }
    let mut out = Vec::with_capacity(range.data_list.len());
    for (data, meta) in range.data_list.iter().zip(&range.metadata_list) {
        let (Some((b'd', key)), Some((b'm', meta_key))) =
            (data.key.split_first(), meta.key.split_first())
        else {
            bail!(
                "bad snapshot pair keys {} / {}",
                names::hex(&data.key),
                names::hex(&meta.key)
            );
        };
        if key != meta_key {
            bail!(
                "data key {} paired with metadata key {}",
                names::hex(key),
                names::hex(meta_key)
            );
        }
        let m = &meta.value;
        if m.len() < 11 {
            bail!("invalid metadata for key {}", names::hex(key));
        }
        out.push(SnapshotPair {
            key,
            value: &data.value,
            encoding: m[10] as i64,
            version: u64::from_be_bytes(m[..8].try_into().expect("8 bytes")),
            seq: u16::from_be_bytes(m[8..10].try_into().expect("2 bytes")),
        });
    }
    Ok(out)
}

/// The entries of a log object, as redo log rows.
fn decode_log(body: &[u8], out: &mut Vec<LogEntry>) -> anyhow::Result<()> {
    let range = BackupMutationRange::decode(body).context("not a mutation range")?;
    for e in range.entries {
        let versionstamp12: [u8; 12] = e.versionstamp[..].try_into().with_context(|| {
            format!(
                "an entry has a {}-byte versionstamp ({})",
                e.versionstamp.len(),
                names::hex(&e.versionstamp)
            )
        })?;
        let value = if e.kind == BackupKvMutationKind::MkClear as i32 {
            None
        } else {
            Some(e.value.to_vec())
        };
        out.push(LogEntry {
            versionstamp12,
            timestamp_ms: range.timestamp_ms as i64,
            key: e.key.to_vec(),
            value,
            encoding: e.value_encoding as i64,
        });
    }
    Ok(())
}

/// Whether `e` is an S3 request that failed (worth retrying) rather than a bad backup or a
/// database failure.
pub fn is_s3_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<S3Error>().is_some()
}
