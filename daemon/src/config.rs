//! The command line and environment, compatible with the upstream `denokv` binary (SPEC §9).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::http::auth::TokenSource;
pub use crate::http::auth::MIN_TOKEN_LEN;
use crate::runtime::limits::Limits;
use crate::runtime::ServeOptions;
use crate::store::{SyncMode, WalWrites};

/// Name of the systemd credential (`LoadCredential=access-token:...`) read when no token is
/// given otherwise.
pub const TOKEN_CREDENTIAL: &str = "access-token";
/// Name of the systemd credential read as the log level file when none is given otherwise.
pub const LOG_LEVEL_CREDENTIAL: &str = "log-level";

/// Parses the command line and environment; exits with a usage error (status 2) when they
/// cannot work.
pub fn parse() -> Cli {
    let matches = Cli::command().get_matches();
    let mut cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    match &mut cli.command {
        Command::Pitr(_) => {}
        Command::Serve(args) => {
            args.access_token_on_command_line = matches
                .subcommand_matches("serve")
                .and_then(|m| m.value_source("access_token"))
                == Some(ValueSource::CommandLine);
            if args.token_source().is_none() {
                Cli::command()
                    .error(
                        ErrorKind::MissingRequiredArgument,
                        "no access token: give --access-token <TOKEN> (or DENO_KV_ACCESS_TOKEN), \
                         --access-token-file <PATH>, or a systemd credential named access-token",
                    )
                    .exit();
            }
        }
        Command::Restore(_) => {}
    }
    cli
}

/// `$CREDENTIALS_DIRECTORY/name`, when systemd passed that credential.
pub fn credential(name: &str) -> Option<PathBuf> {
    let path = PathBuf::from(std::env::var_os("CREDENTIALS_DIRECTORY")?).join(name);
    path.is_file().then_some(path)
}

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

// Parsed once at start: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the database over KV Connect (HTTP/1.1 and cleartext HTTP/2 on one port).
    Serve(ServeArgs),
    /// Point-in-time recovery tools on a replica file (docs/BACKUP.md, "Replicas and pitr").
    #[command(subcommand)]
    Pitr(PitrCommand),
    /// Write a new database (the Deno CLI's format) from an S3 backup, as of its newest
    /// point or of --versionstamp.
    Restore(RestoreArgs),
}

/// `pitr` subcommands (SPEC §8.5, §9.3).
#[derive(Subcommand, Debug)]
pub enum PitrCommand {
    /// Sync changes from S3 to the SQLite database, without updating the current snapshot.
    Sync(S3Args),
    /// List available recovery points.
    List {
        /// Start time in RFC3339 format, e.g. 2021-01-01T00:00:00Z
        #[arg(long)]
        start: Option<String>,
        /// End time in RFC3339 format, e.g. 2021-01-01T00:00:00Z
        #[arg(long)]
        end: Option<String>,
    },
    /// Show information about the current snapshot.
    Info,
    /// Checkout the snapshot at a specific versionstamp.
    Checkout {
        /// 20 hex characters, as `pitr list` prints them.
        versionstamp: String,
    },
}

impl PitrCommand {
    /// Runs the subcommand on the replica file at `db_path`.
    pub fn run(self, db_path: &std::path::Path) -> anyhow::Result<()> {
        use crate::backup::replica::pitr;
        match self {
            PitrCommand::Sync(s3) => pitr::sync(db_path, s3.location()?),
            PitrCommand::List { start, end } => pitr::list(db_path, start, end),
            PitrCommand::Info => pitr::info(db_path),
            PitrCommand::Checkout { versionstamp } => pitr::checkout(db_path, &versionstamp),
        }
    }
}

#[derive(Parser, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub s3: S3Args,

    /// The point to restore: a commit's versionstamp (20 hex characters), as `pitr list` or
    /// a client's commit result gives it. Default: the newest point.
    #[arg(long, value_parser = parse_versionstamp)]
    pub versionstamp: Option<[u8; 10]>,
}

fn parse_versionstamp(s: &str) -> Result<[u8; 10], String> {
    crate::backup::names::parse_hex(s).map_err(|_| format!("invalid versionstamp {s}"))
}

#[derive(Parser, Debug)]
pub struct ServeArgs {
    /// Access token clients must present (at least 12 characters). Required unless
    /// --access-token-file or the systemd credential `access-token` gives the tokens.
    #[arg(long, env = "DENO_KV_ACCESS_TOKEN", hide_env_values = true)]
    pub access_token: Option<String>,

    /// Whether --access-token came from the command line (visible in the process list)
    /// rather than from DENO_KV_ACCESS_TOKEN: warned about at start.
    #[arg(skip)]
    pub access_token_on_command_line: bool,

    /// File of access tokens, re-read on SIGHUP: a bare token a line (read-write, every key),
    /// or `name scope token [prefix…]` (see the README). Without this flag or
    /// --access-token, `$CREDENTIALS_DIRECTORY/access-token` is used.
    #[arg(
        long,
        env = "DENOKV_ACCESS_TOKEN_FILE",
        value_name = "PATH",
        conflicts_with = "access_token"
    )]
    pub access_token_file: Option<PathBuf>,

    /// File holding the log filter (`info`, `debug`, `denokv=debug,warn`, ...), read at start
    /// and on SIGHUP; overrides RUST_LOG. Default: `$CREDENTIALS_DIRECTORY/log-level` if that
    /// exists.
    #[arg(long, env = "DENOKV_LOG_LEVEL_FILE", value_name = "PATH")]
    pub log_level_file: Option<PathBuf>,

    /// PEM certificate chain (leaf first): serve HTTPS (ALPN h2 and http/1.1) instead of
    /// plain HTTP. Re-read on SIGHUP, with --tls-key.
    #[arg(
        long,
        env = "DENOKV_TLS_CERT",
        value_name = "PATH",
        requires = "tls_key"
    )]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of --tls-cert (PKCS#8, RSA or EC). Re-read on SIGHUP.
    #[arg(
        long,
        env = "DENOKV_TLS_KEY",
        value_name = "PATH",
        requires = "tls_cert"
    )]
    pub tls_key: Option<PathBuf>,

    /// Address to listen on. Ignored when systemd passes a socket (socket activation).
    #[arg(long, env = "DENOKV_ADDR", default_value = "0.0.0.0:4512")]
    pub addr: SocketAddr,

    /// Where to serve Prometheus metrics (`GET /metrics`), or `off`. The default port is the
    /// one after the service's own: 9090 is Prometheus's, and the exporters' range 9100-9999
    /// is fully allocated.
    #[arg(
        long,
        env = "DENOKV_METRICS_ADDR",
        default_value = "127.0.0.1:4513",
        value_name = "ADDR|off",
        value_parser = parse_metrics_addr
    )]
    pub metrics_addr: MetricsAddr,

    /// Open the database read-only: reads are served, writes answer "writes disabled".
    #[arg(long)]
    pub read_only: bool,

    /// Serving threads, one runtime each [default: the CPUs this process may use].
    #[arg(long, env = "DENOKV_THREADS", value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub threads: Option<u16>,

    /// How the serving threads wait for their sockets: auto (io_uring where the kernel allows
    /// it, else epoll), io-uring, or epoll.
    #[arg(long, env = "DENOKV_IO_DRIVER", value_enum, default_value = "auto")]
    pub io_driver: crate::runtime::IoDriver,

    /// on: a core with reads waiting hands some to idle cores, so that one busy connection (a
    /// Deno app's) uses every core; worth it where cores idle while one connection's core is
    /// busy (clients on other machines). off: each connection's reads stay on its core.
    #[arg(long, env = "DENOKV_READ_SHARING", value_enum, default_value = "off")]
    pub read_sharing: crate::http::read_share::ReadSharing,

    /// full: fsync every commit (an acknowledged write survives power loss);
    /// normal: fsync at checkpoints only (faster, may lose the last writes on power loss).
    #[arg(long, env = "DENOKV_SYNC_MODE", value_enum, default_value = "full")]
    pub sync_mode: SyncMode,

    /// io-uring: a commit's WAL writes and its fdatasync go to the disk as one io_uring
    /// submission (with --sync-mode full where io_uring is available; otherwise pwrite);
    /// pwrite: SQLite's own write per page and fsync per commit.
    /// The default is pwrite: measured faster for small batches (docs/PERFORMANCE.md).
    #[arg(long, env = "DENOKV_WAL_WRITES", value_enum, default_value = "pwrite")]
    pub wal_writes: WalWrites,

    /// Seconds to let open requests finish after SIGTERM or SIGINT.
    #[arg(long, env = "DENOKV_DRAIN_TIMEOUT", default_value = "10")]
    pub drain_timeout: u64,

    // Deadlines are whole seconds, at least 1 (0 would close every connection at once).
    /// Seconds a new connection may stay silent before its first byte; then it is closed.
    #[arg(long, env = "DENOKV_FIRST_BYTE_TIMEOUT", default_value = "10", value_parser = clap::value_parser!(u64).range(1..))]
    pub first_byte_timeout: u64,

    /// Seconds from the first byte of a request head to its end (HTTP/1.1: every request;
    /// HTTP/2: the preface and the first request's headers); then the connection is closed.
    #[arg(long, env = "DENOKV_HEAD_TIMEOUT", default_value = "10", value_parser = clap::value_parser!(u64).range(1..))]
    pub head_timeout: u64,

    /// Seconds a keep-alive connection with no request or stream open (a watch stream is
    /// open) stays open.
    #[arg(long, env = "DENOKV_IDLE_TIMEOUT", default_value = "120", value_parser = clap::value_parser!(u64).range(1..))]
    pub idle_timeout: u64,

    /// Seconds between HTTP/2 pings the server sends on each connection.
    #[arg(long, env = "DENOKV_H2_KEEPALIVE_INTERVAL", default_value = "20", value_parser = clap::value_parser!(u64).range(1..))]
    pub h2_keepalive_interval: u64,

    /// Seconds an HTTP/2 ping may go unanswered before the connection is closed.
    #[arg(long, env = "DENOKV_H2_KEEPALIVE_TIMEOUT", default_value = "20", value_parser = clap::value_parser!(u64).range(1..))]
    pub h2_keepalive_timeout: u64,

    /// Client connections open at once, on all cores; more are closed at accept.
    #[arg(long, env = "DENOKV_MAX_CONNECTIONS", default_value = "10000", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_connections: usize,

    /// Client connections open at once from one IP address; more are closed at accept.
    #[arg(
        long,
        env = "DENOKV_MAX_CONNECTIONS_PER_IP",
        default_value = "1000",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_connections_per_ip: usize,

    /// Concurrent streams per HTTP/2 connection; more are refused (REFUSED_STREAM).
    #[arg(long, env = "DENOKV_MAX_H2_STREAMS", default_value = "256", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_h2_streams: u32,

    /// Watch streams open at once on one connection; the next gets 429. Below
    /// --max-h2-streams, so that reads and writes always have streams left.
    #[arg(
        long,
        env = "DENOKV_MAX_WATCH_STREAMS_PER_CONNECTION",
        default_value = "128",
        value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..)
    )]
    pub max_watch_streams_per_connection: usize,

    /// Watch streams open at once on the server, on all connections; the next gets 429.
    #[arg(long, env = "DENOKV_MAX_WATCH_STREAMS", default_value = "10000", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    pub max_watch_streams: usize,

    /// Largest request body in bytes; a larger one gets 413, refused from its Content-Length
    /// before it is read. At least 1 MiB: the largest valid request is about 0.9 MB.
    #[arg(long, env = "DENOKV_MAX_BODY_BYTES", default_value = "2097152", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(crate::kv::limits::MIN_BODY_BYTES as u64..=(64 << 20)))]
    pub max_body_bytes: usize,

    /// MiB of snapshot read answers held in memory at once (read, not yet sent), on all
    /// cores; a read that would pass it waits for others to be sent.
    #[arg(long, env = "DENOKV_MAX_READ_BUFFER_MB", default_value = "128", value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=(1 << 20)))]
    pub max_read_buffer_mb: usize,

    /// Seconds the session token handed out by the metadata exchange (and its `expiresAt`)
    /// is valid. Deno fetches new metadata every 60 s; keep this above 70. 0: hand out the
    /// presented token itself, valid for a day, as upstream denokv does.
    #[arg(long, env = "DENOKV_SESSION_TOKEN_TTL", default_value = "900", value_parser = clap::value_parser!(u64).range(0..=86400))]
    pub session_token_ttl: u64,

    /// Accepted for compatibility with upstream denokv; writes are always group-committed.
    #[arg(long, env = "DENO_KV_ATOMIC_WRITE_BATCH_TIMEOUT_MS")]
    pub atomic_write_batch_timeout_ms: Option<u64>,

    /// Accepted for compatibility with upstream denokv; use --threads.
    #[arg(long, env = "DENO_KV_NUM_WORKERS")]
    pub num_workers: Option<usize>,

    /// Serve a read-only replica that follows a backup in S3 (--s3-bucket, --s3-prefix): the
    /// file is a replica file, created and kept up to date from S3 (docs/BACKUP.md).
    #[arg(long, env = "DENOKV_SYNC_FROM_S3", conflicts_with = "read_only")]
    pub sync_from_s3: bool,

    /// Replica: pause between syncs from S3, in milliseconds.
    #[arg(long, env = "DENOKV_SYNC_INTERVAL_MS", default_value = "1000", value_parser = clap::value_parser!(u64).range(10..))]
    pub sync_interval_ms: u64,

    /// Replica: how far back `pitr checkout` can take the file (a number with s, m, h or d);
    /// older undo entries are deleted.
    #[arg(long, env = "DENOKV_REPLICA_HISTORY", default_value = "7d", value_parser = parse_duration)]
    pub replica_history: Duration,

    /// Back every committed write up to S3 (--s3-bucket, --s3-prefix): snapshots and a log
    /// of every commit (docs/BACKUP.md).
    #[arg(long, env = "DENOKV_BACKUP_TO_S3", conflicts_with_all = ["read_only", "sync_from_s3"])]
    pub backup_to_s3: bool,

    #[command(flatten)]
    pub s3: S3Args,

    /// Backup: every committed write is in S3 within this many milliseconds under steady load.
    #[arg(long, env = "DENOKV_BACKUP_INTERVAL_MS", default_value = "1000", value_parser = clap::value_parser!(u64).range(10..))]
    pub backup_interval_ms: u64,

    /// Backup: take a new snapshot this often (a number with s, m, h or d).
    #[arg(long, env = "DENOKV_BACKUP_SNAPSHOT_INTERVAL", default_value = "24h", value_parser = parse_duration)]
    pub backup_snapshot_interval: Duration,

    /// Backup: keep every point in time this far back restorable (a number with s, m, h or d).
    #[arg(long, env = "DENOKV_BACKUP_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub backup_retention: Duration,

    /// Backup: MiB of commits kept locally while S3 is unreachable; beyond, they are dropped
    /// and a new snapshot is taken when S3 answers again.
    #[arg(long, env = "DENOKV_BACKUP_MAX_PENDING_MB", default_value = "1024", value_parser = clap::value_parser!(u64).range(1..))]
    pub backup_max_pending_mb: u64,
}

/// Where the S3 backup lives (SPEC §9.2): shared by `serve` and the S3 subcommands.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct S3Args {
    /// S3 bucket of the backup.
    #[arg(long, env = "DENO_KV_S3_BUCKET")]
    pub s3_bucket: Option<String>,

    /// Key prefix in the bucket; must end with a slash.
    #[arg(long, env = "DENO_KV_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,

    /// S3-compatible endpoint URL (path-style addressing); default: AWS.
    #[arg(long, env = "DENO_KV_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
}

impl S3Args {
    pub fn location(&self) -> anyhow::Result<crate::backup::Location> {
        crate::backup::Location::new(
            self.s3_bucket.clone().unwrap_or_default(),
            self.s3_prefix.clone(),
            self.s3_endpoint.clone(),
        )
    }
}

/// `90s`, `30m`, `24h`, `7d` (a bare number is seconds).
fn parse_duration(s: &str) -> Result<Duration, String> {
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d (like 24h)"))?;
    let seconds = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    if n == 0 {
        return Err(format!("{s:?}: must be more than zero"));
    }
    n.checked_mul(seconds)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?}: too long"))
}

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetricsAddr {
    Off,
    On(SocketAddr),
}

fn parse_metrics_addr(s: &str) -> Result<MetricsAddr, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(MetricsAddr::Off);
    }
    s.parse()
        .map(MetricsAddr::On)
        .map_err(|e| format!("{e} (give an address like 127.0.0.1:4513, or off)"))
}

impl ServeArgs {
    /// Where the access tokens come from: the token given, the token file, or the systemd
    /// credential, in that order.
    pub fn token_source(&self) -> Option<TokenSource> {
        if let Some(token) = &self.access_token {
            return Some(TokenSource::Given(token.clone()));
        }
        self.access_token_file
            .clone()
            .or_else(|| credential(TOKEN_CREDENTIAL))
            .map(TokenSource::File)
    }

    /// The log level file: the one given, or the systemd credential `log-level`.
    pub fn log_level_file(&self) -> Option<PathBuf> {
        self.log_level_file
            .clone()
            .or_else(|| credential(LOG_LEVEL_CREDENTIAL))
    }

    /// Checks what clap cannot and fills in defaults.
    pub fn into_options(self, db_path: PathBuf) -> anyhow::Result<ServeOptions> {
        let Some(token_source) = self.token_source() else {
            bail!("no access token given");
        };
        let tokens = token_source.load()?;
        if self.access_token_on_command_line {
            tracing::warn!(
                "the access token was given on the command line (--access-token), where every \
                 user of this machine can read it in the process list: give it in \
                 DENO_KV_ACCESS_TOKEN, --access-token-file or the systemd credential \
                 access-token instead"
            );
        }
        if self.num_workers == Some(0) {
            bail!("num_workers must be at least 1");
        }
        let replica = if self.sync_from_s3 {
            Some(crate::backup::replica::ReplicaConfig {
                location: self.s3.location()?,
                interval: Duration::from_millis(self.sync_interval_ms),
                history: self.replica_history,
            })
        } else {
            None
        };
        if self.read_only && !db_path.exists() {
            bail!(
                "cannot open database {} read-only: the file does not exist",
                db_path.display()
            );
        }
        let backup = if self.backup_to_s3 {
            Some(crate::backup::BackupConfig {
                location: self.s3.location()?,
                interval: Duration::from_millis(self.backup_interval_ms),
                snapshot_interval: self.backup_snapshot_interval,
                retention: self.backup_retention,
                max_pending_bytes: self.backup_max_pending_mb << 20,
            })
        } else {
            None
        };
        let threads = match self.threads {
            Some(n) => n as usize,
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        };
        Ok(ServeOptions {
            db_path,
            tokens,
            token_source,
            addr: self.addr,
            metrics_addr: match self.metrics_addr {
                MetricsAddr::Off => None,
                MetricsAddr::On(addr) => Some(addr),
            },
            read_only: self.read_only || replica.is_some(),
            backup,
            replica,
            threads,
            io_driver: self.io_driver,
            read_sharing: self.read_sharing,
            sync_mode: self.sync_mode,
            wal_writes: self.wal_writes,
            drain_timeout: Duration::from_secs(self.drain_timeout),
            limits: Limits {
                first_byte_timeout: Duration::from_secs(self.first_byte_timeout),
                head_timeout: Duration::from_secs(self.head_timeout),
                idle_timeout: Duration::from_secs(self.idle_timeout),
                h2_keepalive_interval: Duration::from_secs(self.h2_keepalive_interval),
                h2_keepalive_timeout: Duration::from_secs(self.h2_keepalive_timeout),
                max_connections: self.max_connections,
                max_connections_per_ip: self.max_connections_per_ip,
                max_h2_streams: self.max_h2_streams,
                max_watch_streams_per_connection: self.max_watch_streams_per_connection,
                max_watch_streams: self.max_watch_streams,
                max_body_bytes: self.max_body_bytes,
                max_read_buffer_mb: self.max_read_buffer_mb,
            },
            session_ttl: Duration::from_secs(self.session_token_ttl),
            tls: match (self.tls_cert, self.tls_key) {
                (Some(cert), Some(key)) => Some(crate::runtime::tls::TlsFiles { cert, key }),
                _ => None,
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The README's flag tables: each row `| `--flag` | `ENV` | `default` | … |` must name the
    /// environment variable and the default that the command line has.
    #[test]
    fn the_readme_states_the_defaults_and_variables_the_code_has() {
        let readme = include_str!("../../README.md");
        let cli = Cli::command();
        let serve = cli.find_subcommand("serve").expect("a serve subcommand");
        let mut checked = 0;
        for line in readme.lines().filter(|l| l.starts_with("| `--")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            // cells[0] is empty (the line starts with '|').
            let flags: Vec<&str> = cells[1]
                .split(", ")
                .map(|f| f.trim_matches('`').split(' ').next().unwrap_or_default())
                .collect();
            for flag in flags {
                let name = flag.trim_start_matches("--");
                let arg = serve
                    .get_arguments()
                    .chain(cli.get_arguments())
                    .find(|a| a.get_long() == Some(name))
                    .unwrap_or_else(|| panic!("README names {flag}, which the command lacks"));
                if cells.len() > 4 && cells[3].starts_with('`') {
                    let documented = cells[3].trim_matches('`');
                    let default: Vec<String> = arg
                        .get_default_values()
                        .iter()
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect();
                    assert_eq!(default, [documented], "the default of {flag}");
                    checked += 1;
                }
                if let Some(env) = arg.get_env() {
                    if cells[2].starts_with('`') && !cells[2].contains('…') {
                        assert_eq!(cells[2].trim_matches('`'), env.to_string_lossy(), "{flag}");
                    }
                }
            }
        }
        assert!(
            checked >= 5,
            "only {checked} defaults found in the README's tables"
        );
    }
}
