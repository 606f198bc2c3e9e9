//! The command line.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::client::Proto;

#[derive(Parser, Debug)]
#[command(
    name = "denokv-loadtest",
    version,
    about = "Closed-loop KV Connect load generator for denokv, with durability checks."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// One random `set` per operation over --keys keys.
    Write(RunArgs),
    /// One random `get` per operation over --keys keys (use --preload on a fresh database).
    Read(RunArgs),
    /// Reads and writes over --keys keys; --read-pct of them are reads.
    Mixed(RunArgs),
    /// Read one of --hot-keys counters, then write it +1 with a versionstamp check. Check
    /// failures are counted as conflicts; the final counters must equal the acknowledged
    /// increments (exit 1 otherwise).
    Cas(RunArgs),
    /// One range read of --list-size entries from a random start in the key space.
    List(RunArgs),
    /// One LE64 `sum` of +1..+--sum-max on one of --hot-keys counters per operation; the
    /// final counters must equal the acknowledged sums (exit 1 otherwise).
    Sum(RunArgs),
    /// Writes for crash tests, every outcome in --ack-log (required): half plain sets over
    /// --keys keys, 30% LE64 sums of +1..+--sum-max on --hot-keys counters, 20% sets at a
    /// versionstamped key, each with an enqueue. `verify` checks the keys and the counters; the
    /// enqueues are for a check of the database file (tests/crash/).
    CrashMix(RunArgs),
    /// --watchers watch streams on --hot-keys keys (at most 10) and one writer: measures the
    /// time from a commit's acknowledgement to the watch frame that carries it.
    Watch(RunArgs),
    /// Checks that every write recorded in an --ack-log is in the database with its value
    /// (e.g. after a crash and restart); exit 1 and list the keys otherwise.
    Verify(VerifyArgs),
    /// Opens --concurrency connections (one TCP connection each), reads once on each, holds
    /// them idle for --duration, reads again, and reports the server's memory (--server-pid);
    /// exit 1 unless every connection stayed usable.
    Idle(IdleArgs),
    /// Writes keys 0..--keys of the load generator's key space (the bytes --preload writes)
    /// straight into a database file, with the server's storage code; the server must not be
    /// running on it.
    GenDb(GenDbArgs),
    /// Measures this machine's storage ceilings in --dir: fdatasync/s, and SQLite commits/s
    /// at synchronous=FULL and NORMAL.
    Disk(DiskArgs),
    /// Starts a denokv server on loopback and sends it mutated requests of every route over
    /// HTTP/1.1 (raw sockets), HTTP/2 (hyper's client) and raw HTTP/2 frames; exit 1 on a 5xx
    /// answer, a hang, a crash, a failed canary write and read, a changed sentinel key, an
    /// unclean stop or a failed integrity check of the database.
    HttpFuzz(HttpFuzzArgs),
}

#[derive(Args, Debug, Clone)]
pub struct HttpFuzzArgs {
    /// The denokv binary to start [default: `denokv` beside this program].
    #[arg(long)]
    pub server_bin: Option<PathBuf>,

    /// More flags for `denokv serve` (repeat it: --server-arg=--threads --server-arg=1).
    #[arg(long, allow_hyphen_values = true)]
    pub server_arg: Vec<String>,

    /// Seed of every choice: request N of a seed is the same whatever --concurrency.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Stop after this many requests (0: --duration alone ends the run).
    #[arg(long, default_value_t = 0)]
    pub requests: u64,

    /// Stop after this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Requests in flight at once.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub concurrency: u32,

    /// A request neither answered nor ended by the server (a closed or reset connection or
    /// stream) this long after it was sent is a hang.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    pub hang_timeout: Duration,

    /// Ways to send requests, comma-separated [default: all].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub modes: Vec<crate::httpfuzz::Mode>,

    /// Where each request that got a 5xx, hung or found the server gone is saved (JSON: the
    /// bytes sent and what came back), for --replay.
    #[arg(long, default_value = "httpfuzz-findings")]
    pub findings: PathBuf,

    /// Send only request number N of --seed, and print it.
    #[arg(long, conflicts_with = "replay")]
    pub only: Option<u64>,

    /// Send a saved finding again to a fresh server (of the finding's seed) and print the answer.
    #[arg(long)]
    pub replay: Option<PathBuf>,

    /// The server's folder (database, token file) [default: a temporary folder, removed after].
    #[arg(long)]
    pub dir: Option<PathBuf>,

    /// Print the counts every 10 s on stderr.
    #[arg(long)]
    pub progress: bool,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct DiskArgs {
    /// Where to measure (the filesystem of the database).
    #[arg(long, default_value = ".")]
    pub dir: PathBuf,

    /// Time for each measurement.
    #[arg(long, default_value = "3s", value_parser = parse_duration)]
    pub duration: Duration,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct IdleArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// How long to hold the connections idle.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub duration: Duration,

    /// The server process whose memory is reported.
    #[arg(long)]
    pub server_pid: Option<i32>,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct GenDbArgs {
    /// The database file (created if missing).
    #[arg(long)]
    pub path: PathBuf,

    /// Keys to write.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,

    /// Bytes per value.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    pub value_size: u32,

    /// The seed a later `--preload` would use (the value bytes depend on it).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

/// How to reach the server.
#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The database URL, as given to `Deno.openKv` (the metadata exchange is POSTed to it).
    #[arg(long, env = "DENOKV_URL", default_value = "http://127.0.0.1:4512")]
    pub url: String,

    /// Access token.
    #[arg(long, env = "DENO_KV_ACCESS_TOKEN", hide_env_values = true)]
    pub token: String,

    /// h1: one HTTP/1.1 keep-alive connection per client; h2: cleartext HTTP/2 with prior
    /// knowledge, clients spread as streams over --connections connections (like Deno).
    #[arg(long, value_enum, default_value = "h2")]
    pub proto: Proto,

    /// Concurrent clients, each with one request in flight (closed loop).
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub concurrency: u32,

    /// HTTP/2 connections the clients share (ignored with --proto h1).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub connections: u32,

    /// A request without a complete answer after this long counts as a transport error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub timeout: Duration,

    /// Threads of the load generator's runtime [default: the CPUs this process may use].
    #[arg(long)]
    pub client_threads: Option<usize>,
}

#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// Measured time (e.g. 10s, 500ms, 1m).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub duration: Duration,

    /// Unmeasured load before the measured time.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub warmup: Duration,

    /// Size of the key space of write, read, mixed and list.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub keys: u64,

    /// Bytes per written value (write, mixed, preload, watch); the server allows 65536.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=65_536))]
    pub value_size: u32,

    /// Write every key of the key space before the load starts.
    #[arg(long)]
    pub preload: bool,

    /// Percentage of reads in `mixed`.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub read_pct: u8,

    /// Entries per range read in `list` (the server allows 1000).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub list_size: u32,

    /// Contended keys of cas, sum and watch (watch uses at most 10: one watch request's limit).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub hot_keys: u64,

    /// Largest addend of `sum` (each sum adds 1..=this).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub sum_max: u64,

    /// Watch streams in `watch`.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub watchers: u32,

    /// Pause of the `watch` writer between writes (0: write again as soon as acknowledged).
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub write_interval: Duration,

    /// Seed of the random key and value choices.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,

    /// Append every acknowledged write (key, versionstamp, value) of write, mixed and the
    /// preload to this file, for `verify`.
    #[arg(long)]
    pub ack_log: Option<PathBuf>,

    /// End the load at the first transport error (the server died), instead of at the end of
    /// --duration (all workloads but watch). A crash fails every request in flight, so each client stops there, before a
    /// restarted server could answer it: the ack log then holds only writes before the crash.
    #[arg(long)]
    pub stop_when_down: bool,

    /// A server process on this machine whose CPU time and memory over the measured window
    /// go into the report.
    #[arg(long)]
    pub server_pid: Option<i32>,

    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Args, Debug, Clone)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub client: ClientArgs,

    /// The ack log a `write --ack-log` run wrote.
    #[arg(long)]
    pub ack_log: PathBuf,

    /// How many bad keys to print (all of them go to --json).
    #[arg(long, default_value_t = 50)]
    pub show: usize,

    #[command(flatten)]
    pub output: OutputArgs,
}

/// Where the report goes.
#[derive(Args, Debug, Clone)]
pub struct OutputArgs {
    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,

    /// How to print the report on stdout.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

/// `1.5s`, `500ms`, `2m`, `100us`, or plain seconds (`10`).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("not a duration: {text:?} (try 10s, 500ms, 2m)"))?;
    let seconds = match unit.trim() {
        "" | "s" => n,
        "ms" => n / 1e3,
        "us" | "µs" => n / 1e6,
        "m" | "min" => n * 60.0,
        "h" => n * 3600.0,
        other => return Err(format!("unknown time unit {other:?} in {text:?}")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("not a duration: {text:?}"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("").is_err());
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
