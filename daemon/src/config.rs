//! The command line and environment, compatible with the upstream `denokv` binary (SPEC §9).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::{Parser, Subcommand};

use crate::runtime::ServeOptions;
use crate::store::SyncMode;

/// Shortest access token accepted.
pub const MIN_TOKEN_LEN: usize = 12;

#[derive(Parser, Debug)]
#[command(
    name = "denokv",
    version,
    about = "A self-hosted Deno KV server speaking the KV Connect protocol."
)]
pub struct Cli {
    /// SQLite database file; created if missing (unless --read-only). Same format as the
    /// Deno CLI's local KV.
    #[arg(long, env = "DENO_KV_SQLITE_PATH")]
    pub sqlite_path: PathBuf,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the database over KV Connect (HTTP/1.1 and cleartext HTTP/2 on one port).
    Serve(ServeArgs),
}

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// Access token clients must present (at least 12 characters).
    #[arg(long, env = "DENO_KV_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: String,

    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:4512")]
    pub addr: SocketAddr,

    /// Open the database read-only: reads are served, writes answer "writes disabled".
    #[arg(long)]
    pub read_only: bool,

    /// Serving threads, one runtime each [default: the CPUs this process may use].
    #[arg(long, env = "DENOKV_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// full: fsync every commit (an acknowledged write survives power loss);
    /// normal: fsync at checkpoints only (faster, may lose the last writes on power loss).
    #[arg(long, env = "DENOKV_SYNC_MODE", value_enum, default_value = "full")]
    pub sync_mode: SyncMode,

    /// Seconds to let open requests finish after SIGTERM or SIGINT.
    #[arg(long, env = "DENOKV_DRAIN_TIMEOUT", default_value = "10")]
    pub drain_timeout: u64,

    /// Accepted for compatibility with upstream denokv; writes are always group-committed.
    #[arg(long, env = "DENO_KV_ATOMIC_WRITE_BATCH_TIMEOUT_MS")]
    pub atomic_write_batch_timeout_ms: Option<u64>,

    /// Accepted for compatibility with upstream denokv; use --threads.
    #[arg(long, env = "DENO_KV_NUM_WORKERS")]
    pub num_workers: Option<usize>,

    /// Serve a replica synced from S3 (not yet supported by this server).
    #[arg(long, conflicts_with = "read_only")]
    pub sync_from_s3: bool,
}

impl ServeArgs {
    /// Checks what clap cannot and fills in defaults.
    pub fn into_options(self, db_path: PathBuf) -> anyhow::Result<ServeOptions> {
        if self.access_token.len() < MIN_TOKEN_LEN {
            bail!("Access token must be at minimum {MIN_TOKEN_LEN} chars long.");
        }
        if self.num_workers == Some(0) {
            bail!("num_workers must be at least 1");
        }
        if self.sync_from_s3 {
            bail!("--sync-from-s3 (replica mode) is not supported by this version of denokv yet");
        }
        if self.read_only && !db_path.exists() {
            bail!(
                "cannot open database {} read-only: the file does not exist",
                db_path.display()
            );
        }
        let threads = match self.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(ServeOptions {
            db_path,
            tokens: vec![self.access_token],
            addr: self.addr,
            read_only: self.read_only,
            threads,
            sync_mode: self.sync_mode,
            drain_timeout: Duration::from_secs(self.drain_timeout),
        })
    }
}
