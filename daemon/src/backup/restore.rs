//! `denokv --sqlite-path OUT restore --s3-bucket B [--versionstamp VS]`: writes a normal
//! database (the Deno CLI's format) as of a point of the backup.
//!
//! A point is a commit boundary. The restore takes the newest snapshot generation whose
//! `differential` is at or before the point, loads its snapshot objects, and replays the
//! logs of every commit after the generation's start up to the point (SPEC §8.7: a fuzzy
//! snapshot plus the logs from its start is consistent at any boundary from `differential`
//! on). The file is written under a temporary name and renamed when complete.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use prost::Message;
use rusqlite::params;

use super::generations::{self, Generation};
use super::names::{self, LogName, SnapshotName};
use super::s3::{Bucket, Location};
use crate::backup_proto::{BackupKvMutationKind, BackupMutationRange, BackupSnapshotRange};
use crate::store::{schema, sql, SyncMode, WalWrites};

/// What a restore did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Restored {
    /// The commit version restored to (its versionstamp is this and two zero bytes).
    pub version: u64,
    /// Its commit time (ms since the epoch).
    pub timestamp_ms: u64,
    pub keys: u64,
}

impl Restored {
    /// `Restored to versionstamp <20 hex> (<RFC 3339 time>), <n> keys`.
    pub fn describe(&self) -> String {
        format!(
            "Restored to versionstamp {} ({}), {} keys",
            names::differential_text(self.version),
            rfc3339_ms(self.timestamp_ms),
            self.keys
        )
    }
}

/// Restores the backup at `location` into a new database file `out`, as of `target` (a
/// 10-byte versionstamp) or of the newest point.
pub fn restore(
    out: &Path,
    location: Location,
    target: Option<[u8; 10]>,
) -> anyhow::Result<Restored> {
    if out.exists() {
        bail!(
            "{} exists: restore writes a new file, give a path that does not exist",
            out.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let bucket = Bucket::connect(location, None).await;
        restore_from(&bucket, out, target.map(|t| names::version_of(&t))).await
    })
}

async fn restore_from(
    bucket: &Bucket,
    out: &Path,
    target: Option<u64>,
) -> anyhow::Result<Restored> {
    let where_ = bucket.location().describe();
    let known = generations::list(bucket).await?;
    if known.is_empty() {
        bail!("{where_} holds no complete snapshot (written by denokv serve --backup-to-s3)");
    }
    let generation = match target {
        Some(t) => known
            .iter()
            .rev()
            .find(|g| g.differential <= t)
            .with_context(|| {
                format!(
                    "versionstamp {} is older than the oldest point {where_} can restore ({})",
                    names::differential_text(t),
                    names::differential_text(known[0].differential)
                )
            })?,
        None => known.last().expect("not empty"),
    }
    .clone();
    let partial = partial_path(out);
    let _ = std::fs::remove_file(&partial);
    let result = write(bucket, &partial, &generation, target).await;
    match result {
        Ok(restored) => {
            std::fs::rename(&partial, out).with_context(|| {
                format!("cannot rename {} to {}", partial.display(), out.display())
            })?;
            Ok(restored)
        }
        Err(e) => {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", partial.display()));
            }
            Err(e)
        }
    }
}

fn partial_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".restoring");
    out.with_file_name(name)
}

async fn write(
    bucket: &Bucket,
    path: &Path,
    generation: &Generation,
    target: Option<u64>,
) -> anyhow::Result<Restored> {
    let mut conn = schema::open_writer(path, SyncMode::Full, WalWrites::Pwrite)?;
    // The snapshot.
    let prefix = format!("{}0001_{:016x}_", names::SNAPSHOTS, generation.start);
    let objects = bucket.list(&prefix, None, usize::MAX).await?;
    if objects.len() as u64 != generation.objects {
        bail!(
            "the snapshot from version {} should have {} objects; S3 has {}",
            generation.start,
            generation.objects,
            objects.len()
        );
    }
    for o in &objects {
        SnapshotName::parse(&o.key)?;
        let body = bucket
            .get(&o.key)
            .await?
            .with_context(|| format!("{} disappeared while restoring", o.key))?;
        let range = BackupSnapshotRange::decode(body)
            .with_context(|| format!("{} is not a BackupSnapshotRange", o.key))?;
        let tx = conn.transaction()?;
        load_snapshot(&tx, &range).with_context(|| format!("in {}", o.key))?;
        tx.commit()?;
    }
    // The logs: every commit after the generation's start, up to the target.
    let mut version = generation.differential;
    let mut timestamp_ms = generation.finished_ms;
    let mut reached = target.is_none_or(|t| t == generation.differential);
    let mut pages = bucket.pages(names::LOGS);
    'pages: while let Some(page) = pages.next().await? {
        for o in &page {
            let name = LogName::parse(&o.key)?;
            if names::version_of(&name.last) <= generation.start {
                continue;
            }
            if let Some(t) = target.filter(|&t| names::version_of(&name.first) > t) {
                version = t;
                reached = true;
                break 'pages;
            }
            let body = bucket
                .get(&o.key)
                .await?
                .with_context(|| format!("{} disappeared while restoring", o.key))?;
            let range = BackupMutationRange::decode(body)
                .with_context(|| format!("{} is not a BackupMutationRange", o.key))?;
            let tx = conn.transaction()?;
            for e in &range.entries {
                let v = names::version_of(&e.versionstamp);
                if v <= generation.start {
                    continue;
                }
                if let Some(t) = target.filter(|&t| v > t) {
                    // The logs go past the target: every commit up to it is applied (a
                    // commit that changed no key has no entries, yet is a point).
                    version = t;
                    reached = true;
                    tx.commit()?;
                    break 'pages;
                }
                apply(&tx, e)?;
                if e.versionstamp.len() == 12 && e.versionstamp[10..] == [0xff, 0xff] {
                    version = v;
                    timestamp_ms = range.timestamp_ms;
                    if target == Some(v) {
                        reached = true;
                    }
                }
            }
            tx.commit()?;
        }
    }
    if !reached {
        bail!(
            "versionstamp {} is newer than the newest point of the backup ({})",
            names::differential_text(target.unwrap_or_default()),
            names::differential_text(version)
        );
    }
    if version < generation.differential {
        bail!(
            "the logs of {} stop at version {version}, before the snapshot from version {} is \
             consistent ({}): the backup is incomplete",
            bucket.location().describe(),
            generation.start,
            generation.differential
        );
    }
    conn.execute(sql::SET_VERSION, [version as i64])?;
    let keys: i64 = conn.query_row("SELECT count(*) FROM kv", [], |r| r.get(0))?;
    // A clean close checkpoints the WAL into the file: one file, as the Deno CLI leaves it.
    conn.close().map_err(|(_, e)| e)?;
    Ok(Restored {
        version,
        timestamp_ms,
        keys: keys as u64,
    })
}

fn load_snapshot(tx: &rusqlite::Transaction, range: &BackupSnapshotRange) -> anyhow::Result<()> {
    if range.data_list.len() != range.metadata_list.len() {
        bail!("data and metadata lists differ in length");
    }
    let mut stmt = tx.prepare_cached(sql::RESTORE_ROW)?;
    for (data, meta) in range.data_list.iter().zip(&range.metadata_list) {
        let (Some((b'd', key)), Some((b'm', mkey))) =
            (data.key.split_first(), meta.key.split_first())
        else {
            bail!("a snapshot pair without its 'd'/'m' prefixes");
        };
        if key != mkey {
            bail!("snapshot data and metadata keys differ");
        }
        let m = &meta.value;
        if m.len() < 11 {
            bail!("invalid metadata for key {}", names::hex(key));
        }
        let expiry = if m.len() >= 19 {
            i64::from_le_bytes(m[11..19].try_into().expect("8 bytes"))
        } else {
            -1
        };
        stmt.execute(params![
            key,
            &data.value[..],
            m[10] as i64,
            names::version_of(&m[..8]) as i64,
            u16::from_be_bytes([m[8], m[9]]) as i64,
            expiry
        ])?;
    }
    Ok(())
}

fn apply(
    tx: &rusqlite::Transaction,
    e: &crate::backup_proto::BackupReplicationLogEntry,
) -> anyhow::Result<()> {
    if e.versionstamp.len() != 12 {
        bail!(
            "a log entry with a {}-byte versionstamp",
            e.versionstamp.len()
        );
    }
    if e.kind == BackupKvMutationKind::MkClear as i32 {
        tx.prepare_cached(sql::DELETE)?.execute([&e.key[..]])?;
    } else {
        let expiry = if e.expire_at_ms == 0 {
            -1
        } else {
            e.expire_at_ms as i64
        };
        tx.prepare_cached(sql::RESTORE_ROW)?.execute(params![
            &e.key[..],
            &e.value[..],
            e.value_encoding as i64,
            names::version_of(&e.versionstamp) as i64,
            u16::from_be_bytes([e.versionstamp[8], e.versionstamp[9]]) as i64,
            expiry
        ])?;
    }
    Ok(())
}

/// `2026-11-28T21:45:04.913Z`.
pub fn rfc3339_ms(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_rfc3339_utc_with_milliseconds() {
        assert_eq!(rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339_ms(1_795_902_392_123), "2026-11-28T21:46:32.123Z");
        assert_eq!(rfc3339_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
