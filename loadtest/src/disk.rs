//! `disk`: the storage ceilings of this machine, for reading the load results against:
//! fdatasync/s of a 4 KiB overwrite, and single-row SQLite commits/s in WAL mode at
//! `synchronous=FULL` and `NORMAL` (no server, no HTTP).

use std::fmt::Write as _;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::cli::DiskArgs;

#[derive(Debug, Serialize)]
pub struct DiskReport {
    pub dir: String,
    pub seconds_each: f64,
    pub fdatasync_per_sec: f64,
    pub sqlite_full_commits_per_sec: f64,
    pub sqlite_normal_commits_per_sec: f64,
    pub passed: bool,
}

pub fn run(args: &DiskArgs) -> anyhow::Result<DiskReport> {
    let dir = tempfile_dir(&args.dir)?;
    let result = (|| {
        Ok::<_, anyhow::Error>(DiskReport {
            dir: args.dir.display().to_string(),
            seconds_each: args.duration.as_secs_f64(),
            fdatasync_per_sec: fdatasyncs(&dir.join("fsync"), args.duration)?,
            sqlite_full_commits_per_sec: commits(&dir.join("full.sqlite"), "FULL", args.duration)?,
            sqlite_normal_commits_per_sec: commits(
                &dir.join("normal.sqlite"),
                "NORMAL",
                args.duration,
            )?,
            passed: true,
        })
    })();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn tempfile_dir(parent: &Path) -> anyhow::Result<std::path::PathBuf> {
    let dir = parent.join(format!("denokv-disk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Overwrites the first 4 KiB of a file and fdatasyncs it, as often as it can.
fn fdatasyncs(path: &Path, duration: Duration) -> anyhow::Result<f64> {
    let mut file = std::fs::File::create(path)?;
    file.write_all(&[0u8; 4096])?;
    file.sync_all()?;
    let block = [7u8; 4096];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        file.write_all_at(&block, 0)?;
        file.sync_data()?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

/// One-row commits (an upsert of 100 bytes over 10,000 keys) in WAL mode.
fn commits(path: &Path, synchronous: &str, duration: Duration) -> anyhow::Result<f64> {
    let conn = rusqlite::Connection::open(path)?;
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous};
         CREATE TABLE t (k INTEGER PRIMARY KEY, v BLOB NOT NULL);"
    ))?;
    let mut upsert = conn.prepare("INSERT OR REPLACE INTO t (k, v) VALUES (?1, ?2)")?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let value = [9u8; 100];
    let started = Instant::now();
    let mut n = 0u64;
    while started.elapsed() < duration {
        upsert.execute(rusqlite::params![
            rng.random_range(0..10_000i64),
            &value[..]
        ])?;
        n += 1;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

impl DiskReport {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "disk ceilings in {} ({:.1} s each):",
            self.dir, self.seconds_each
        );
        let _ = writeln!(
            t,
            "  fdatasync of 4 KiB:          {:>10.0}/s",
            self.fdatasync_per_sec
        );
        let _ = writeln!(
            t,
            "  SQLite commits, FULL:        {:>10.0}/s",
            self.sqlite_full_commits_per_sec
        );
        let _ = writeln!(
            t,
            "  SQLite commits, NORMAL:      {:>10.0}/s",
            self.sqlite_normal_commits_per_sec
        );
        t
    }
}
