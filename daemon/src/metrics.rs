//! Prometheus metrics: the registry every part of the server records into, and the small
//! listener that serves it at `GET /metrics` (text format 0.0.4).
//!
//! One [`Metrics`] is made at start and handed down (`Arc`) to the cores, the readers and the
//! committer. Recording is an atomic add on a metric looked up once: labelled children are
//! resolved at start (or once, on first use) and kept in arrays indexed by enums, so the data
//! path never looks a label up by string. Gauges that describe state (queue depth, file sizes,
//! process figures) are sampled when scraped. The listener is hyper (HTTP/1.1) on a monoio
//! runtime of its own thread: scrapes are served concurrently, and never on a serving core.
//! monoio rather than a current-thread tokio runtime: the cores already run monoio with hyper
//! (`runtime::hyper_compat`), so this adds no crate, where tokio's `rt` and `net` would add its
//! runtime and a second mio.

use std::cell::Cell;
use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::rc::Rc;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use monoio::io::IntoPollIo;

use crate::runtime::hyper_compat::MonoioTimer;

use prometheus::{
    exponential_buckets, Counter, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter,
    IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

pub use crate::runtime::connection::Expiry;
use crate::runtime::connection::Open;
pub use crate::runtime::limits::{Refusal, RequestRefusal};
pub use crate::runtime::tls::HandshakeFailure;

/// The `Content-Type` of the text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Seconds: 100 µs to 10 s, for request and commit durations.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `route` label of the HTTP metrics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteLabel {
    Metadata,
    SnapshotRead,
    AtomicWrite,
    Watch,
    Other,
}

impl RouteLabel {
    const ALL: [RouteLabel; 5] = [
        RouteLabel::Metadata,
        RouteLabel::SnapshotRead,
        RouteLabel::AtomicWrite,
        RouteLabel::Watch,
        RouteLabel::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RouteLabel::Metadata => "metadata",
            RouteLabel::SnapshotRead => "snapshot_read",
            RouteLabel::AtomicWrite => "atomic_write",
            RouteLabel::Watch => "watch",
            RouteLabel::Other => "other",
        }
    }
}

/// The `type` label of `denokv_mutations_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MutationLabel {
    Set,
    Delete,
    Sum,
    Min,
    Max,
    SetSuffixVersionstampedKey,
}

impl MutationLabel {
    pub const COUNT: usize = 6;
    pub const ALL: [MutationLabel; Self::COUNT] = [
        MutationLabel::Set,
        MutationLabel::Delete,
        MutationLabel::Sum,
        MutationLabel::Min,
        MutationLabel::Max,
        MutationLabel::SetSuffixVersionstampedKey,
    ];

    pub fn name(self) -> &'static str {
        match self {
            MutationLabel::Set => "set",
            MutationLabel::Delete => "delete",
            MutationLabel::Sum => "sum",
            MutationLabel::Min => "min",
            MutationLabel::Max => "max",
            MutationLabel::SetSuffixVersionstampedKey => "set_suffix_versionstamped_key",
        }
    }
}

/// Where a commit (a batch of writes, or an expiry sweep) failed: the `phase` label of
/// `denokv_commit_failures_total`. See `store::committer::failure` for what each means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitPhase {
    /// Applying the writes, before COMMIT: rolled back, nothing committed.
    Apply,
    /// COMMIT could not write the WAL: the commit never reached the disk.
    WalWrite,
    /// COMMIT's sync of the WAL failed: the commit may be durable (the server stops).
    WalSync,
    /// COMMIT failed otherwise: its outcome is unknown (the server stops).
    Commit,
    /// ROLLBACK after a failure failed (the server stops).
    Rollback,
}

impl CommitPhase {
    pub const COUNT: usize = 5;
    pub const ALL: [CommitPhase; Self::COUNT] = [
        CommitPhase::Apply,
        CommitPhase::WalWrite,
        CommitPhase::WalSync,
        CommitPhase::Commit,
        CommitPhase::Rollback,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CommitPhase::Apply => "apply",
            CommitPhase::WalWrite => "wal_write",
            CommitPhase::WalSync => "wal_sync",
            CommitPhase::Commit => "commit",
            CommitPhase::Rollback => "rollback",
        }
    }
}

/// Status codes the server answers with; each gets a slot resolved once. Others (none today)
/// fall back to a label lookup.
const STATUSES: [u16; 13] = [
    200, 400, 401, 403, 404, 405, 408, 409, 413, 429, 500, 503, 507,
];

fn status_slot(status: u16) -> Option<usize> {
    STATUSES.iter().position(|&s| s == status)
}

/// Every metric of the server.
pub struct Metrics {
    registry: Registry,
    http_requests: IntCounterVec,
    /// `http_requests` children by route and status slot, created on first use so that only
    /// pairs that happened are exposed.
    http_request_slots: [[OnceLock<IntCounter>; STATUSES.len()]; RouteLabel::ALL.len()],
    http_durations: [Histogram; RouteLabel::ALL.len()],
    /// Writes per committed transaction.
    pub commit_batch_size: Histogram,
    /// BEGIN to COMMIT of a committed transaction.
    pub commit_duration: Histogram,
    /// Fed by the writer's VFS (`store::wal_vfs`), which times every WAL sync.
    pub wal_sync_duration: Histogram,
    pub writes_committed: IntCounter,
    pub write_checks_failed: IntCounter,
    pub writes_invalid: IntCounter,
    commit_failures: [IntCounter; CommitPhase::COUNT],
    mutations: [IntCounter; MutationLabel::COUNT],
    pub enqueues: IntCounter,
    pub read_rows: IntCounter,
    /// Snapshot reads a busy core handed to an idle core's reader (`http::read_share`).
    pub reads_handed_over: IntCounter,
    /// Write batches a core committed itself, the committer being idle.
    pub inline_commits: IntCounter,
    pub open_connections: IntGauge,
    connections_refused: [IntCounter; Refusal::COUNT],
    connections_closed: [IntCounter; Expiry::COUNT],
    tls_handshake_failures: [IntCounter; HandshakeFailure::COUNT],
    requests_refused: [IntCounter; RequestRefusal::COUNT],
    /// By token name (never the token): one series per name in the token file.
    token_requests: IntCounterVec,
    token_refusals: IntCounterVec,
    /// Failed accepts (out of descriptors, say): each retry of a backed-off accept counts.
    pub accept_errors: IntCounter,
    pub watch_streams: IntGauge,
    /// Snapshot reads that waited for room in `--max-read-buffer-mb`.
    pub read_budget_waits: IntCounter,
    /// Snapshot read answers cut off because their client stopped reading them.
    pub responses_stalled: IntCounter,
    pub committer_queue_depth: IntGauge,
    database_size: IntGauge,
    wal_size: IntGauge,
    pub expired_rows_swept: IntCounter,
    build_info: IntGaugeVec,
    sync_mode: IntGaugeVec,
    process_cpu: Counter,
    process_resident_memory: IntGauge,
    process_open_fds: IntGauge,
    process_max_fds: IntGauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered (at zero).
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry
                .register(c)
                .expect("metric names and labels are valid and unique")
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            reg(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };
        let histogram = |name: &str, help: &str, buckets: Vec<f64>| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))
                .expect("valid metric");
            reg(Box::new(h.clone()));
            h
        };
        let gauge_vec = |name: &str, help: &str, label: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            reg(Box::new(g.clone()));
            g
        };

        let http_requests = IntCounterVec::new(
            Opts::new(
                "denokv_http_requests_total",
                "HTTP requests answered, by route and status code.",
            ),
            &["route", "status"],
        )
        .expect("valid metric");
        reg(Box::new(http_requests.clone()));
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "denokv_http_request_duration_seconds",
                "Time from receiving a request to its response head (for watch: until the \
                 stream starts).",
            )
            .buckets(DURATION_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("valid metric");
        reg(Box::new(http_duration.clone()));
        let mutations_vec = IntCounterVec::new(
            Opts::new("denokv_mutations_total", "Mutations committed, by type."),
            &["type"],
        )
        .expect("valid metric");
        reg(Box::new(mutations_vec.clone()));
        let commit_failures = IntCounterVec::new(
            Opts::new(
                "denokv_commit_failures_total",
                "Commits (write batches and expiry sweeps) that failed, by phase: apply and \
                 wal_write were rolled back; wal_sync, commit and rollback stop the server.",
            ),
            &["phase"],
        )
        .expect("valid metric");
        reg(Box::new(commit_failures.clone()));
        let connections_refused = IntCounterVec::new(
            Opts::new(
                "denokv_connections_refused_total",
                "Connections closed at accept because a cap was reached, by reason: \
                 max_connections or max_connections_per_ip.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(connections_refused.clone()));
        let connections_closed = IntCounterVec::new(
            Opts::new(
                "denokv_connections_closed_total",
                "Connections the server closed because a deadline ran out, by reason: \
                 first_byte_timeout, head_timeout or idle_timeout.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(connections_closed.clone()));
        let tls_handshake_failures = IntCounterVec::new(
            Opts::new(
                "denokv_tls_handshake_failures_total",
                "TLS handshakes that failed (with --tls-cert), by reason: not_tls (plain HTTP \
                 or other bytes on the TLS port) or handshake (rustls refused it). Handshakes \
                 cut off by a deadline count in denokv_connections_closed_total.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(tls_handshake_failures.clone()));
        let requests_refused = IntCounterVec::new(
            Opts::new(
                "denokv_requests_refused_total",
                "Requests refused because a cap was reached, by reason: max_h2_streams \
                 (REFUSED_STREAM), max_watch_streams_per_connection and max_watch_streams \
                 (429), max_body_bytes (413), too_many_messages (400, before decoding).",
            ),
            &["reason"],
        )
        .expect("valid metric");
        reg(Box::new(requests_refused.clone()));
        let token_requests = IntCounterVec::new(
            Opts::new(
                "denokv_token_requests_total",
                "Requests authenticated, by access token name (a session token counts as the \
                 token it was issued for).",
            ),
            &["token"],
        )
        .expect("valid metric");
        reg(Box::new(token_requests.clone()));
        let token_refusals = IntCounterVec::new(
            Opts::new(
                "denokv_token_refusals_total",
                "Requests refused with 403, by access token name and reason: read_only (a \
                 write with a read token) or prefix (a key or range outside its prefixes).",
            ),
            &["token", "reason"],
        )
        .expect("valid metric");
        reg(Box::new(token_refusals.clone()));

        let process_cpu = Counter::new(
            "process_cpu_seconds_total",
            "Total user and system CPU time spent in seconds.",
        )
        .expect("valid metric");
        reg(Box::new(process_cpu.clone()));

        Metrics {
            http_request_slots: Default::default(),
            http_durations: RouteLabel::ALL.map(|r| http_duration.with_label_values(&[r.name()])),
            http_requests,
            commit_batch_size: histogram(
                "denokv_commit_batch_size",
                "Atomic writes per committed transaction (group commit).",
                exponential_buckets(1.0, 2.0, 10).expect("valid buckets"),
            ),
            commit_duration: histogram(
                "denokv_commit_duration_seconds",
                "Time from BEGIN to the end of COMMIT of a committed transaction.",
                DURATION_BUCKETS.to_vec(),
            ),
            wal_sync_duration: histogram(
                "denokv_wal_sync_duration_seconds",
                "Time of one sync of the write-ahead log (with io_uring WAL writes: the \
                 commit's WAL writes and the fdatasync, submitted together).",
                DURATION_BUCKETS.to_vec(),
            ),
            writes_committed: counter("denokv_writes_committed_total", "Atomic writes committed."),
            write_checks_failed: counter(
                "denokv_write_checks_failed_total",
                "Atomic writes not applied because a versionstamp check failed.",
            ),
            writes_invalid: counter(
                "denokv_writes_invalid_total",
                "Atomic writes rejected as invalid (400): by validation, or by the committer \
                 (rolled back to their savepoint).",
            ),
            commit_failures: CommitPhase::ALL
                .map(|p| commit_failures.with_label_values(&[p.name()])),
            mutations: MutationLabel::ALL.map(|m| mutations_vec.with_label_values(&[m.name()])),
            enqueues: counter(
                "denokv_enqueues_total",
                "Queue messages enqueued by committed writes.",
            ),
            read_rows: counter(
                "denokv_read_rows_total",
                "Rows returned by reads (snapshot reads and watch reads).",
            ),
            inline_commits: counter(
                "denokv_inline_commits_total",
                "Writes committed on the serving thread that received them, without the hand-over \
                 to the committer thread (the committer was idle and the thread had nothing else \
                 to do).",
            ),
            reads_handed_over: counter(
                "denokv_reads_handed_over_total",
                "Snapshot reads a core with reads waiting handed to an idle core, which ran \
                 them on its own reader.",
            ),
            open_connections: gauge(
                "denokv_open_connections",
                "Client connections open on the serving port.",
            ),
            connections_refused: Refusal::ALL
                .map(|r| connections_refused.with_label_values(&[r.name()])),
            connections_closed: Expiry::ALL
                .map(|e| connections_closed.with_label_values(&[e.name()])),
            tls_handshake_failures: HandshakeFailure::ALL
                .map(|r| tls_handshake_failures.with_label_values(&[r.name()])),
            requests_refused: RequestRefusal::ALL
                .map(|r| requests_refused.with_label_values(&[r.name()])),
            token_requests,
            token_refusals,
            accept_errors: counter(
                "denokv_accept_errors_total",
                "Accepts that failed (e.g. out of file descriptors); retried with back-off.",
            ),
            watch_streams: gauge("denokv_watch_streams", "Watch streams open."),
            read_budget_waits: counter(
                "denokv_read_buffer_waits_total",
                "Snapshot reads that waited for room in --max-read-buffer-mb (answers read and \
                 not yet sent, on all cores).",
            ),
            responses_stalled: counter(
                "denokv_read_answers_stalled_total",
                "Snapshot read answers cut off because the client took none of it for 30 s.",
            ),
            committer_queue_depth: gauge(
                "denokv_committer_queue_depth",
                "Atomic writes waiting for the committer.",
            ),
            database_size: gauge(
                "denokv_database_size_bytes",
                "Size of the SQLite database file.",
            ),
            wal_size: gauge(
                "denokv_wal_size_bytes",
                "Size of the SQLite write-ahead log file.",
            ),
            expired_rows_swept: counter(
                "denokv_expired_rows_swept_total",
                "Expired rows deleted by the expiry sweep.",
            ),
            build_info: gauge_vec(
                "denokv_build_info",
                "Always 1; the version label says which denokv runs.",
                "version",
            ),
            sync_mode: gauge_vec(
                "denokv_sync_mode",
                "Always 1; the mode label is the durability setting (full or normal).",
                "mode",
            ),
            process_cpu,
            process_resident_memory: gauge(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
            ),
            process_open_fds: gauge("process_open_fds", "Number of open file descriptors."),
            process_max_fds: gauge(
                "process_max_fds",
                "Maximum number of open file descriptors.",
            ),
            registry,
        }
    }

    /// Registers a metric kept elsewhere (the backup's), to be exposed with these.
    pub fn register(&self, collector: Box<dyn prometheus::core::Collector>) {
        self.registry
            .register(collector)
            .expect("metric names and labels are valid and unique");
    }

    /// Sets `denokv_build_info` and `denokv_sync_mode`.
    pub fn set_info(&self, sync_mode: &str) {
        self.build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        self.sync_mode.with_label_values(&[sync_mode]).set(1);
    }

    /// Records one answered request.
    pub fn http_request(&self, route: RouteLabel, status: u16, elapsed: Duration) {
        let r = route as usize;
        self.http_durations[r].observe(elapsed.as_secs_f64());
        match status_slot(status) {
            Some(s) => self.http_request_slots[r][s]
                .get_or_init(|| {
                    self.http_requests
                        .with_label_values(&[route.name(), &status.to_string()])
                })
                .inc(),
            None => self
                .http_requests
                .with_label_values(&[route.name(), &status.to_string()])
                .inc(),
        }
    }

    /// The counter of committed mutations of one type.
    pub fn commit_failures(&self, phase: CommitPhase) -> &IntCounter {
        &self.commit_failures[phase as usize]
    }

    /// Connections refused at accept for `reason`.
    pub fn connections_refused(&self, reason: Refusal) -> &IntCounter {
        &self.connections_refused[reason as usize]
    }

    /// Requests refused because the cap `reason` was reached.
    pub fn requests_refused(&self, reason: RequestRefusal) -> &IntCounter {
        &self.requests_refused[reason as usize]
    }

    /// Connections closed because the deadline `expiry` ran out.
    pub fn connections_closed(&self, expiry: Expiry) -> &IntCounter {
        &self.connections_closed[expiry as usize]
    }

    pub fn tls_handshake_failures(&self, reason: HandshakeFailure) -> &IntCounter {
        &self.tls_handshake_failures[reason as usize]
    }

    /// The counters of the access token named `name`, resolved once per token set.
    pub fn token_counters(&self, name: &str) -> crate::http::auth::TokenCounters {
        use crate::http::auth::Refusal as R;
        crate::http::auth::TokenCounters {
            requests: self.token_requests.with_label_values(&[name]),
            refusals: R::ALL.map(|r| self.token_refusals.with_label_values(&[name, r.name()])),
        }
    }

    /// Drops the series of token names that are no longer in the token file, so that their
    /// number stays bounded by the file's.
    pub fn forget_tokens<'a>(&self, gone: impl IntoIterator<Item = &'a str>) {
        use crate::http::auth::Refusal as R;
        for name in gone {
            let _ = self.token_requests.remove_label_values(&[name]);
            for r in R::ALL {
                let _ = self.token_refusals.remove_label_values(&[name, r.name()]);
            }
        }
    }

    pub fn mutations(&self, kind: MutationLabel) -> &IntCounter {
        &self.mutations[kind as usize]
    }

    /// Samples the sizes of the database file and its WAL (0 when missing).
    pub fn sample_files(&self, db: &Path) {
        let len = |p: &Path| std::fs::metadata(p).map_or(0, |m| m.len() as i64);
        let mut wal = db.as_os_str().to_owned();
        wal.push("-wal");
        self.database_size.set(len(db));
        self.wal_size.set(len(Path::new(&wal)));
    }

    /// Samples the process figures from `/proc/self` and `getrusage`.
    pub fn sample_process(&self) {
        use nix::sys::resource::{getrlimit, getrusage, Resource, UsageWho};
        if let Ok(usage) = getrusage(UsageWho::RUSAGE_SELF) {
            let secs =
                |t: nix::sys::time::TimeVal| t.tv_sec() as f64 + t.tv_usec() as f64 / 1_000_000.0;
            let cpu = secs(usage.user_time()) + secs(usage.system_time());
            let delta = cpu - self.process_cpu.get();
            if delta > 0.0 {
                self.process_cpu.inc_by(delta);
            }
        }
        if let Ok(status) = std::fs::read_to_string("/proc/self/status") {
            let rss_kb = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<i64>().ok());
            if let Some(kb) = rss_kb {
                self.process_resident_memory.set(kb * 1024);
            }
        }
        if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
            // Less the descriptor read_dir itself holds open.
            self.process_open_fds.set(fds.count() as i64 - 1);
        }
        if let Ok((soft, _)) = getrlimit(Resource::RLIMIT_NOFILE) {
            self.process_max_fds.set(soft.min(i64::MAX as u64) as i64);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut out) {
            tracing::error!("cannot encode metrics: {e}");
        }
        out
    }
}

/// Increments a gauge now and decrements it when dropped (open connections, watch streams).
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What runs before each scrape to sample state into gauges.
pub type Sampler = Box<dyn Fn(&Metrics) + Send>;

/// The `/metrics` listener: hyper (HTTP/1.1) on a monoio runtime of its own, on a thread of its
/// own, so scrapes are served concurrently and never on a serving core. Stops when dropped.
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

/// Connections served at once; more are closed as soon as they are accepted.
pub const MAX_CONNECTIONS: usize = 16;
/// How long a scraper may take to send its request head.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a connection may last in all (the head, the sampling, writing the answer).
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(10);
/// hyper's read buffer, which bounds the request head (hyper answers 431 past it); its minimum.
const MAX_BUF: usize = 8192;

impl MetricsServer {
    /// Binds `addr` and serves `GET /metrics` on a thread of its own.
    pub fn start(
        addr: SocketAddr,
        metrics: Arc<Metrics>,
        sampler: Sampler,
    ) -> io::Result<MetricsServer> {
        let listener = TcpListener::bind(addr)?;
        let addr = listener.local_addr()?;
        listener.set_nonblocking(true)?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (started, start_result) = std::sync::mpsc::channel::<io::Result<()>>();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let mut rt = match monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                    .enable_timer()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = started.send(Err(e));
                        return;
                    }
                };
                rt.block_on(async move {
                    // Inside the runtime: the listener registers with its driver.
                    let listener = match monoio::net::TcpListener::from_std(listener) {
                        Ok(l) => l,
                        Err(e) => {
                            let _ = started.send(Err(e));
                            return;
                        }
                    };
                    let _ = started.send(Ok(()));
                    serve(listener, metrics, Rc::new(sampler), stopped).await;
                });
            })?;
        match start_result.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(io::Error::other("the metrics thread ended at start")),
        }
        Ok(MetricsServer {
            addr,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        // The runtime ends with the accept loop; connections still open are dropped with it.
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Accepts until told to stop, at most [`MAX_CONNECTIONS`] connections at once.
async fn serve(
    listener: monoio::net::TcpListener,
    metrics: Arc<Metrics>,
    sampler: Rc<Sampler>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(MonoioTimer)
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_BUF)
        // One request per connection, as scrapers expect of an exporter.
        .keep_alive(false);
    let builder = Rc::new(builder);
    let open = Rc::new(Cell::new(0usize));
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if open.get() >= MAX_CONNECTIONS {
                        tracing::debug!(
                            "metrics: {MAX_CONNECTIONS} connections open; closed one from {peer}"
                        );
                        drop(stream);
                        continue;
                    }
                    monoio::spawn(connection(
                        stream,
                        builder.clone(),
                        metrics.clone(),
                        sampler.clone(),
                        Open::new(&open),
                    ));
                }
                Err(e) => {
                    tracing::warn!("metrics accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.wait_for(|stopping| *stopping) => break,
        }
    }
}

async fn connection(
    stream: monoio::net::TcpStream,
    builder: Rc<hyper::server::conn::http1::Builder>,
    metrics: Arc<Metrics>,
    sampler: Rc<Sampler>,
    _open: Open,
) {
    let _ = stream.set_nodelay(true);
    let io = match stream.into_poll_io() {
        Ok(io) => io,
        Err(e) => {
            tracing::debug!("metrics: cannot serve a connection: {e}");
            return;
        }
    };
    let service = service_fn(move |req: Request<Incoming>| {
        let response = answer(&req, &metrics, &sampler);
        std::future::ready(Ok::<_, Infallible>(response))
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    match monoio::time::timeout(CONNECTION_TIMEOUT, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!("metrics request failed: {e}"),
        Err(_) => tracing::debug!("metrics: a connection took longer than {CONNECTION_TIMEOUT:?}"),
    }
}

/// `GET /metrics` (any query) gets the exposition; other paths 404, other methods 405.
fn answer(req: &Request<Incoming>, metrics: &Metrics, sampler: &Sampler) -> Response<Full<Bytes>> {
    crate::fatal::debug::panic_point("metrics");
    let plain = |status: StatusCode, text: &'static str| {
        let mut response = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
        *response.status_mut() = status;
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        response
    };
    if req.uri().path() != "/metrics" {
        return plain(StatusCode::NOT_FOUND, "not found\n");
    }
    if req.method() != Method::GET {
        let mut response = plain(StatusCode::METHOD_NOT_ALLOWED, "use GET\n");
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET"));
        return response;
    }
    sampler(metrics);
    metrics.sample_process();
    let mut response = Response::new(Full::new(Bytes::from(metrics.encode())));
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
    response
}
