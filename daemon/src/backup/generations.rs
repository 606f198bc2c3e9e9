//! Snapshot generations: each complete snapshot is recorded by an object of ours under
//! `denokv/generations/` whose name carries where it starts (the version its reading began
//! at, which is also its snapshot objects' `monoseq`), the version `differential` gave it,
//! and when it finished. Restores pick a generation by these; retention deletes by them.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;

use super::metrics::BackupMetrics;
use super::names::{self, LogName, SnapshotName, GENERATIONS};
use super::s3::{Bucket, S3Error};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Generation {
    /// Its snapshot objects are `snapshots/0001_<start>_<seq>`; logs from `start` on apply.
    pub start: u64,
    /// Snapshot plus logs up to this version are consistent: the oldest point it restores.
    pub differential: u64,
    /// How many snapshot objects it has.
    pub objects: u64,
    pub finished_ms: u64,
}

impl Generation {
    /// The record's key and body (the body repeats the name, for people).
    pub fn object(&self) -> (String, Bytes) {
        let key = format!(
            "{GENERATIONS}{:016x}_{:016x}_{:016x}_{:016x}.json",
            self.start, self.differential, self.objects, self.finished_ms
        );
        let body = serde_json::json!({
            "start_version": self.start,
            "differential_version": self.differential,
            "snapshot_objects": self.objects,
            "finished_ms": self.finished_ms,
        });
        (key, Bytes::from(body.to_string()))
    }

    pub fn parse(key: &str) -> anyhow::Result<Generation> {
        let stem = key
            .strip_prefix(GENERATIONS)
            .and_then(|k| k.strip_suffix(".json"))
            .with_context(|| format!("bad generation record name {key}"))?;
        let fields = stem
            .split('_')
            .map(|f| u64::from_str_radix(f, 16))
            .collect::<Result<Vec<_>, _>>()
            .with_context(|| format!("bad generation record name {key}"))?;
        let [start, differential, objects, finished_ms] = fields[..] else {
            anyhow::bail!("bad generation record name {key}");
        };
        Ok(Generation {
            start,
            differential,
            objects,
            finished_ms,
        })
    }

    pub fn age(&self) -> Duration {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.finished_ms))
    }
}

/// Every recorded generation, oldest first.
pub async fn list(bucket: &Bucket) -> Result<Vec<Generation>, S3Error> {
    let listed = bucket.list(GENERATIONS, None, usize::MAX).await?;
    let mut out: Vec<Generation> = listed
        .iter()
        .filter_map(|o| Generation::parse(&o.key).ok())
        .collect();
    out.sort_by_key(|g| g.start);
    Ok(out)
}

/// The start of the oldest generation retention needs: the newest one that finished before
/// the retention horizon (the oldest retained point restores from it), or the oldest one if
/// none did. `None` when there is none.
pub fn oldest_needed(known: &[Generation], retention: Duration) -> Option<u64> {
    let before_horizon = known.iter().rev().find(|g| g.age() >= retention);
    before_horizon.or(known.first()).map(|g| g.start)
}

/// Deletes the snapshot objects and records of generations that start before `start`, and
/// the logs whose last commit is before it. Logs that end at or after it stay: replaying a
/// commit older than a snapshot is harmless when the logs from it on are whole.
pub async fn delete_before(
    bucket: &Bucket,
    start: u64,
    metrics: &BackupMetrics,
) -> Result<(), S3Error> {
    let mut doomed = Vec::new();
    for o in bucket.list(names::SNAPSHOTS, None, usize::MAX).await? {
        if SnapshotName::parse(&o.key).is_ok_and(|n| n.monoseq < start) {
            doomed.push(o.key);
        }
    }
    for o in bucket.list(GENERATIONS, None, usize::MAX).await? {
        if Generation::parse(&o.key).is_ok_and(|g| g.start < start) {
            doomed.push(o.key);
        }
    }
    for o in bucket.list(names::RESETS, None, usize::MAX).await? {
        if names::parse_reset(&o.key).is_some_and(|v| v < start) {
            doomed.push(o.key);
        }
    }
    // Logs are listed in commit order: stop at the first that starts at or after `start`.
    let mut pages = bucket.pages(names::LOGS);
    'pages: while let Some(page) = pages.next().await? {
        for o in page {
            let Ok(name) = LogName::parse(&o.key) else {
                continue;
            };
            if name.monoseq >= start {
                break 'pages;
            }
            if names::version_of(&name.last) < start {
                doomed.push(o.key);
            }
        }
    }
    if doomed.is_empty() {
        return Ok(());
    }
    bucket.delete(&doomed).await?;
    metrics.gc_deleted.inc_by(doomed.len() as u64);
    tracing::info!(
        "backup: deleted {} objects of the history before version {start}",
        doomed.len()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generation(start: u64, age: Duration) -> Generation {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        Generation {
            start,
            differential: start + 1,
            objects: 1,
            finished_ms: now - age.as_millis() as u64,
        }
    }

    #[test]
    fn records_round_trip_through_their_names() {
        let g = generation(0x1234, Duration::ZERO);
        let (key, body) = g.object();
        assert!(key.starts_with("denokv/generations/0000000000001234_"));
        assert_eq!(Generation::parse(&key).unwrap(), g);
        assert!(String::from_utf8(body.to_vec())
            .unwrap()
            .contains("\"start_version\":4660"));
        assert!(Generation::parse("denokv/generations/01_02.json").is_err());
    }

    #[test]
    fn retention_keeps_the_generation_the_oldest_retained_point_needs() {
        let day = Duration::from_secs(86_400);
        let gens = vec![
            generation(10, day * 9),
            generation(20, day * 8),
            generation(30, day * 6),
            generation(40, day),
        ];
        // 7 days: the generation 8 days old covers points from 7 days ago.
        assert_eq!(oldest_needed(&gens, day * 7), Some(20));
        assert_eq!(oldest_needed(&gens, day * 30), Some(10));
        assert_eq!(oldest_needed(&gens, Duration::from_secs(60)), Some(40));
        assert_eq!(oldest_needed(&[], day), None);
    }
}
