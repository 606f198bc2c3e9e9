//! The process: opens the store, starts the committer and one serving thread per core, tells
//! systemd when it is ready, reloads on SIGHUP, and on SIGTERM or SIGINT shuts down in order.

mod coalesce;
pub mod connection;
mod core;
pub(crate) mod hyper_compat;
pub mod limits;
mod listener;
mod signals;
pub mod tls;

pub use self::core::IoDriver;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::health::Monitor;
use crate::http::auth::{SharedTokens, TokenSource, Tokens};
use crate::http::Shared;
use crate::metrics::{Metrics, MetricsServer};
use crate::store::{self, Reader, SyncMode, WalWrites, WatchRegistry};
use crate::systemd::{self, Notifier, Watchdog};
use crate::telemetry::Logging;

/// Everything `serve` needs, already validated.
pub struct ServeOptions {
    pub db_path: PathBuf,
    /// The tokens accepted at start.
    pub tokens: Tokens,
    /// Where they came from; a file is re-read on SIGHUP.
    pub token_source: TokenSource,
    /// Where to listen, unless systemd passes the listening socket.
    pub addr: SocketAddr,
    /// Where to serve `/metrics`; `None`: not served.
    pub metrics_addr: Option<SocketAddr>,
    pub read_only: bool,
    /// `--backup-to-s3`: the S3 backup's settings.
    pub backup: Option<crate::backup::BackupConfig>,
    /// `--sync-from-s3`: the replica's settings (then `read_only` is set too).
    pub replica: Option<crate::backup::replica::ReplicaConfig>,
    pub threads: usize,
    pub io_driver: IoDriver,
    pub read_sharing: crate::http::read_share::ReadSharing,
    pub sync_mode: SyncMode,
    pub wal_writes: WalWrites,
    pub drain_timeout: Duration,
    /// Connection deadlines and caps.
    pub limits: limits::Limits,
    /// How long the session tokens of the metadata exchange are valid.
    pub session_ttl: Duration,
    /// `--tls-cert` and `--tls-key`: serve HTTPS, re-reading them on SIGHUP.
    pub tls: Option<tls::TlsFiles>,
}

/// Serves until SIGTERM or SIGINT, then drains and returns. `logging`, when given, is re-read
/// on SIGHUP.
pub fn serve(opts: ServeOptions, logging: Option<&Logging>) -> anyhow::Result<()> {
    // Before any thread starts: these read and unset environment variables.
    let activated = systemd::take_listen_fds()?;
    let tls = match &opts.tls {
        Some(files) => {
            let (tls, description) = tls::Tls::new(files.clone())?;
            tracing::info!(
                "TLS: {description}, key from {} (re-read on SIGHUP)",
                files.key.display()
            );
            Some(Arc::new(tls))
        }
        None => None,
    };
    let notifier = Arc::new(Notifier::from_env());
    // Pings need somewhere to go.
    let watchdog = systemd::watchdog_interval().filter(|_| notifier.enabled());
    // Already blocked by `block_signals` in a binary; blocking again is harmless.
    let signals = signals::block()?;
    // A fatal failure on any thread wakes the signal loop below like a SIGTERM would.
    crate::fatal::set_waker(|| {
        // SAFETY: kill(2) with our own pid and a valid signal number.
        unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    });
    let open_files = match raise_open_files_limit() {
        Ok((before, after)) => {
            if before != after {
                tracing::debug!("open files limit raised from {before} to {after}");
            }
            Some(after)
        }
        Err(e) => {
            tracing::warn!("cannot raise the open files limit: {e}");
            None
        }
    };
    // The database, io_uring rings, listeners and watch pollers need descriptors too.
    const RESERVED_FDS: u64 = 64;
    if let Some(limit) = open_files {
        if opts.limits.max_connections as u64 + RESERVED_FDS > limit {
            tracing::warn!(
                "--max-connections {} is more than the open files limit ({limit}) allows: \
                 accept backs off when descriptors run out; raise LimitNOFILE= or lower \
                 --max-connections",
                opts.limits.max_connections
            );
        }
    }
    let admission = limits::Admission::new(&opts.limits);
    let watches = Arc::new(WatchRegistry::default());
    // Threads beat every quarter interval; the watchdog checks and pings every half.
    let mut monitor = watchdog.map(|interval| Monitor::new(interval / 4));
    let metrics = Arc::new(Metrics::new());
    metrics.set_info(&format!("{:?}", opts.sync_mode).to_lowercase());

    notifier.status(&format!("Opening database {}", opts.db_path.display()));
    // What `notifier.ready` last said, for the backup's status updates.
    let serving_status = Arc::new(std::sync::Mutex::new(String::new()));
    // With backup on, the committer records every commit for the backup thread.
    let outbox = if opts.backup.is_some() {
        store::BackupOutbox::enabled()
    } else {
        store::BackupOutbox::disabled()
    };
    let (committer, committer_thread) = if opts.read_only {
        if opts.replica.is_none() {
            tracing::info!("Opened read only database at {}", opts.db_path.display());
        }
        (None, None)
    } else {
        store::wal_vfs::observe_syncs(metrics.wal_sync_duration.clone());
        let conn = store::schema::open_writer(&opts.db_path, opts.sync_mode, opts.wal_writes)?;
        let heartbeat = monitor.as_mut().map(|m| m.heartbeat("committer"));
        let (handle, thread) = store::committer::spawn_with_heartbeat(
            conn,
            watches.clone(),
            heartbeat,
            metrics.clone(),
            outbox.clone(),
        )?;
        tracing::info!(
            "Opened database at {}. Sync mode: {:?}. WAL writes: {}. Group commit: always on",
            opts.db_path.display(),
            opts.sync_mode,
            store::wal_vfs::describe(opts.wal_writes, opts.sync_mode)
        );
        (Some(handle), Some(thread))
    };
    tracing::info!(
        "Access tokens: {} from {}{}",
        opts.tokens.len(),
        opts.token_source.describe(),
        if opts.token_source.reloadable() {
            " (re-read on SIGHUP)"
        } else {
            ""
        }
    );
    let backup = match &opts.backup {
        Some(config) => {
            let backup_metrics = Arc::new(crate::backup::BackupMetrics::new(&metrics));
            // `systemctl status` shows a backup that falls behind next to what is served.
            let (notifier, serving) = (notifier.clone(), serving_status.clone());
            let on_problem: crate::backup::ProblemSink = Box::new(move |problem| {
                let base = serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
                // Before READY= the serving status says it once known.
                if base.is_empty() {
                    return;
                }
                match problem {
                    Some(p) => notifier.status(&format!("{base}; BACKUP BEHIND: {p}")),
                    None => notifier.status(&base),
                }
            });
            match crate::backup::Backup::start(
                &opts.db_path,
                config.clone(),
                outbox.clone(),
                backup_metrics,
                on_problem,
            ) {
                Ok(b) => Some(b),
                Err(e) => {
                    stop_committer(committer, committer_thread)?;
                    return Err(e);
                }
            }
        }
        None => None,
    };
    let replica_metrics = opts
        .replica
        .as_ref()
        .map(|_| Arc::new(crate::backup::replica::ReplicaMetrics::new(&metrics)));
    // Before the replica's first sync, which may be long: its progress shows in the metrics.
    let (_metrics_server, metrics_problem) = start_metrics(
        opts.metrics_addr,
        &opts.db_path,
        &metrics,
        committer.clone(),
        replica_metrics.clone(),
    );
    // A replica is made and brought up to date before anything listens (as upstream's).
    let replica = match (&opts.replica, &replica_metrics) {
        (Some(config), Some(replica_metrics)) => {
            // `systemctl status` shows a replica that cannot sync next to what is served.
            let (notifier2, serving) = (notifier.clone(), serving_status.clone());
            let on_problem: crate::backup::ProblemSink = Box::new(move |problem| {
                let base = serving.lock().unwrap_or_else(|e| e.into_inner()).clone();
                match (problem, base.is_empty()) {
                    (Some(p), true) => notifier2.status(&format!("Syncing the replica: {p}")),
                    (Some(p), false) => notifier2.status(&format!("{base}; REPLICA BEHIND: {p}")),
                    (None, false) => notifier2.status(&base),
                    (None, true) => {}
                }
            });
            notifier.status(&format!(
                "Syncing the replica from {} before serving",
                config.location.describe()
            ));
            let replica = start_replica(
                &opts.db_path,
                config,
                replica_metrics,
                &watches,
                &signals,
                &notifier,
                on_problem,
            )?;
            match replica {
                Some(r) => Some(r),
                // Stopped by a signal while syncing.
                None => return Ok(()),
            }
        }
        _ => None,
    };
    // Wakes watch streams on commits of other processes (and on a read-only server, on all).
    let external = store::external::ExternalCommits::spawn(&opts.db_path, watches.clone())?;
    opts.tokens.attach_metrics(&metrics);
    let shared = Arc::new(Shared {
        tokens: Arc::new(SharedTokens::new(opts.tokens)),
        committer: committer.clone(),
        watches,
        endpoint_url: "/v2".to_string(),
        session_ttl: opts.session_ttl,
        metrics: metrics.clone(),
    });

    let per_core = if activated.is_empty() {
        listener::bind_reuseport(opts.addr, opts.threads)?
            .into_iter()
            .map(|l| vec![l])
            .collect()
    } else {
        tracing::info!(
            "Serving {} socket(s) passed by systemd (socket activation); --addr is not used",
            activated.len()
        );
        listener::from_activation(activated, opts.threads)?
    };
    let addrs = per_core[0]
        .iter()
        .map(|l| l.local_addr())
        .collect::<Result<Vec<_>, _>>()?;

    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let (ready_tx, ready_rx) = mpsc::channel();
    let (read_share, inboxes) =
        crate::http::read_share::ReadShare::new(per_core.len(), opts.read_sharing);
    let mut cores = Vec::with_capacity(opts.threads);
    let mut started = Ok(());
    for ((index, listeners), inbox) in per_core.into_iter().enumerate().zip(inboxes) {
        let setup = match Reader::open(&opts.db_path) {
            Ok(reader) => core::CoreSetup {
                reader: reader
                    .with_metrics(&metrics)
                    .share_snapshots(shared.watches.clone(), store::SNAPSHOT_HOLD),
                index,
                listeners,
                shared: shared.clone(),
                shutdown: shutdown_rx.clone(),
                drain_timeout: opts.drain_timeout,
                limits: opts.limits,
                admission: admission.clone(),
                ready: ready_tx.clone(),
                heartbeat: monitor
                    .as_mut()
                    .map(|m| m.heartbeat(&format!("core {index}"))),
                tls: tls.clone(),
                io_driver: opts.io_driver,
                read_share: read_share.clone(),
                inbox,
            },
            Err(e) => {
                started = Err(e);
                break;
            }
        };
        match std::thread::Builder::new()
            .name(format!("core-{index}"))
            .spawn(move || core::run(setup))
        {
            Ok(thread) => cores.push(thread),
            Err(e) => {
                started = Err(anyhow::Error::new(e).context("cannot start a core thread"));
                break;
            }
        }
    }
    drop(ready_tx);
    let tokens = shared.tokens.clone();
    drop(shared);
    if started.is_ok() {
        // Every core says when it accepts; a core that fails drops its sender unsent.
        let ready = ready_rx.iter().take(cores.len()).count();
        if ready < opts.threads {
            started = Err(anyhow::anyhow!("a core failed to start"));
        }
    }
    if let Err(e) = started {
        let _ = shutdown_tx.send(true);
        let cores_result = join_cores(cores);
        stop_committer(committer, committer_thread)?;
        if let Some(backup) = backup {
            let _ = backup.stop();
        }
        if let Some(replica) = replica {
            let _ = replica.stop();
        }
        return Err(cores_result.err().unwrap_or(e));
    }

    let driver = core::driver_name(opts.io_driver);
    tracing::info!("{} cores on {driver}", opts.threads);
    for addr in &addrs {
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!("Listening on {scheme}://{addr}");
    }
    let mut serving = format!(
        "Serving {}{} on {} ({} cores, {driver}, {})",
        opts.db_path.display(),
        match &opts.replica {
            Some(r) => format!(" read-only, a replica of {}", r.location.describe()),
            None if opts.read_only => " read-only".to_string(),
            None => String::new(),
        },
        addrs
            .iter()
            .map(|a| a.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        opts.threads,
        if opts.read_only {
            "no writes".to_string()
        } else {
            format!("sync mode {:?}", opts.sync_mode).to_lowercase()
        },
    );
    if let Some(problem) = metrics_problem {
        // In `systemctl status`, where an operator looks first.
        serving.push_str(&format!("; NO METRICS: {problem}"));
    }
    notifier.ready(&serving);
    *serving_status.lock().unwrap_or_else(|e| e.into_inner()) = serving.clone();
    // A problem the backup or the replica met before READY= (or a reload's READY=) is not
    // lost under the serving status.
    let side_status = || {
        let problems = [
            ("BACKUP", backup.as_ref().and_then(|b| b.problem())),
            ("REPLICA", replica.as_ref().and_then(|r| r.problem())),
        ];
        for (who, problem) in problems {
            if let Some(p) = problem {
                notifier.status(&format!("{serving}; {who} BEHIND: {p}"));
            }
        }
    };
    side_status();
    let monitor = monitor.map(Arc::new);
    let watchdog = match (watchdog, &monitor) {
        (Some(interval), Some(monitor)) => Some(Watchdog::start(
            notifier.clone(),
            interval,
            monitor.clone(),
        )?),
        _ => None,
    };

    let signal = loop {
        match signals::wait(&signals)? {
            Signal::SIGHUP => {
                reload(
                    &notifier,
                    &opts.token_source,
                    &tokens,
                    tls.as_deref(),
                    &metrics,
                    logging,
                );
                notifier.ready(&serving);
                side_status();
            }
            #[cfg(debug_assertions)]
            Signal::SIGUSR1 => match &monitor {
                Some(m) if m.debug_hang("committer") => tracing::warn!(
                    "debug build, SIGUSR1: the committer hangs at its next heartbeat, on purpose"
                ),
                _ => tracing::warn!(
                    "debug build, SIGUSR1: no committer heartbeat to hang (needs WATCHDOG_USEC \
                     and a writable database)"
                ),
            },
            #[cfg(debug_assertions)]
            Signal::SIGUSR2 => match crate::fatal::debug::arm() {
                Some(place) => tracing::warn!(
                    "debug build, SIGUSR2: {place} panics at its next panic point, on purpose"
                ),
                None => tracing::warn!("debug build, SIGUSR2: DENOKV_DEBUG_PANIC is not set"),
            },
            stop => break stop,
        }
    };
    if let Some(reason) = crate::fatal::reason() {
        notifier.stopping(&format!("Failed, stopping: {reason}"));
    } else {
        tracing::info!("received {signal}: draining connections and committing queued writes");
        notifier.stopping(&format!(
            "Draining: finishing open requests (up to {} s) and committing queued writes",
            opts.drain_timeout.as_secs()
        ));
    }
    let _ = shutdown_tx.send(true);
    let cores_result = join_cores(cores);
    stop_committer(committer, committer_thread)?;
    if let Some(replica) = replica {
        if let Err(e) = replica.stop() {
            tracing::error!("the replica stopped with an error: {e:#}");
        }
    }
    // After the committer: the last commits are shipped too.
    if let Some(backup) = backup {
        if let Err(e) = backup.stop() {
            tracing::error!("the backup stopped with an error: {e:#}");
        }
    }
    drop(external);
    drop(watchdog);
    if let Some(reason) = crate::fatal::reason() {
        anyhow::bail!("stopped after a failure: {reason}");
    }
    // A request cut off by the drain timeout may have gone unanswered: not a clean stop.
    let cut_off = cores_result?;
    if cut_off > 0 {
        anyhow::bail!(
            "the drain timed out: {cut_off} connections were still open after {} s and were \
             cut off; requests in flight on them may have gone unanswered",
            opts.drain_timeout.as_secs()
        );
    }
    tracing::info!("stopped");
    Ok(())
}

/// Starts the replica thread and waits until it has made the replica current (initial
/// snapshot, newest point), answering signals meanwhile: `None` when SIGTERM or SIGINT came
/// first (the thread is stopped). A large initial snapshot, or a primary that has not made
/// its first one, may take longer than systemd's start timeout: it is extended meanwhile.
fn start_replica(
    db: &std::path::Path,
    config: &crate::backup::replica::ReplicaConfig,
    metrics: &Arc<crate::backup::replica::ReplicaMetrics>,
    watches: &Arc<WatchRegistry>,
    signals: &nix::sys::signal::SigSet,
    notifier: &Notifier,
    on_problem: crate::backup::ProblemSink,
) -> anyhow::Result<Option<crate::backup::replica::Replica>> {
    const EXTEND_EVERY: Duration = Duration::from_secs(10);
    let mut extended = std::time::Instant::now();
    notifier.notify("EXTEND_TIMEOUT_USEC=30000000");
    let (replica, started) = crate::backup::replica::Replica::start(
        db,
        config.clone(),
        metrics.clone(),
        watches.clone(),
        on_problem,
    )?;
    loop {
        match started.recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(())) => return Ok(Some(replica)),
            Ok(Err(e)) => {
                let _ = replica.stop();
                return Err(e.context(format!(
                    "cannot make the replica {} from {}",
                    db.display(),
                    config.location.describe()
                )));
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                return Err(match replica.stop() {
                    Err(e) => e,
                    Ok(()) => anyhow::anyhow!("the replica thread ended before it was ready"),
                });
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if extended.elapsed() >= EXTEND_EVERY {
            notifier.notify("EXTEND_TIMEOUT_USEC=30000000");
            extended = std::time::Instant::now();
        }
        match signals::wait_timeout(signals, Duration::ZERO)? {
            Some(Signal::SIGTERM) | Some(Signal::SIGINT) => {
                tracing::info!("stopped before the replica was ready");
                if let Err(e) = replica.stop() {
                    tracing::debug!("replica: {e:#}");
                }
                return Ok(None);
            }
            _ => {}
        }
    }
}

/// Blocks the signals the server takes synchronously, in the calling thread and every thread
/// it starts later. A binary calls this first, before any thread (the OTLP exporter's, say)
/// exists: a thread started earlier would take SIGTERM's or SIGHUP's default action and kill
/// the process.
pub fn block_signals() -> anyhow::Result<()> {
    signals::block().map(|_| ())
}

/// Starts the `/metrics` listener, if one is asked for. A listener that cannot bind is not
/// fatal (the database is served; the scraper reports the target down), but it is loud: an
/// error that says what to do, and the reason, returned for systemd's `STATUS=`.
fn start_metrics(
    addr: Option<SocketAddr>,
    db: &std::path::Path,
    metrics: &Arc<Metrics>,
    committer: Option<store::CommitterHandle>,
    replica: Option<Arc<crate::backup::replica::ReplicaMetrics>>,
) -> (Option<MetricsServer>, Option<String>) {
    let Some(addr) = addr else {
        return (None, None);
    };
    let db = db.to_path_buf();
    let sampler = Box::new(move |m: &Metrics| {
        let depth = committer.as_ref().map_or(0, |c| c.queue_depth());
        m.committer_queue_depth.set(depth as i64);
        m.sample_files(&db);
        if let Some(r) = &replica {
            r.sample();
        }
    });
    match MetricsServer::start(addr, metrics.clone(), sampler) {
        Ok(server) => {
            tracing::info!("Metrics on http://{}/metrics", server.local_addr());
            (Some(server), None)
        }
        Err(e) => {
            tracing::error!(
                "METRICS ARE NOT SERVED: cannot listen on {addr}: {e}. The database is served \
                 without metrics. Give --metrics-addr (DENOKV_METRICS_ADDR) a free address, or \
                 `off`, and restart."
            );
            (None, Some(format!("cannot listen on {addr}: {e}")))
        }
    }
}

/// SIGHUP: re-reads the access tokens (from a file), the TLS certificate and key, and the log
/// level (from the log level file), telling systemd it is reloading meanwhile. What cannot be
/// read stays as it was.
fn reload(
    notifier: &Notifier,
    source: &TokenSource,
    tokens: &SharedTokens,
    tls: Option<&tls::Tls>,
    metrics: &Metrics,
    logging: Option<&Logging>,
) {
    notifier.reloading("Reloading access tokens, TLS certificate and log level");
    let mut done = Vec::new();
    if source.reloadable() {
        match source.load() {
            Ok(new) => {
                done.push(format!(
                    "{} access token(s) from {}",
                    new.len(),
                    source.describe()
                ));
                new.attach_metrics(metrics);
                let kept: std::collections::HashSet<String> =
                    new.names().map(str::to_string).collect();
                let old = tokens.replace(new);
                // The series of names no longer in the file go, so they stay bounded by it.
                metrics.forget_tokens(old.names().filter(|n| !kept.contains(*n)));
            }
            Err(e) => {
                tracing::error!("reload: access tokens unchanged: {e:#}");
                done.push("access tokens unchanged (see the error above)".to_string());
            }
        }
    } else {
        done.push(format!(
            "access token unchanged (given on {}; --access-token-file can be re-read)",
            source.describe()
        ));
    }
    if let Some(tls) = tls {
        match tls.reload() {
            Ok(description) => done.push(format!("TLS: {description}")),
            Err(e) => {
                tracing::error!(
                    "reload: TLS CERTIFICATE UNCHANGED, still serving the old one: {e:#}"
                );
                done.push("TLS certificate unchanged (see the error above)".to_string());
            }
        }
    }
    let mut level = None;
    match logging.map(Logging::read_level) {
        None => {}
        Some(Ok(None)) => done.push("log level unchanged (no --log-level-file)".to_string()),
        Some(Ok(Some(new))) => {
            done.push(new.description.clone());
            level = Some(new);
        }
        Some(Err(e)) => {
            tracing::error!("reload: log level unchanged: {e:#}");
            done.push("log level unchanged (see the error above)".to_string());
        }
    }
    // Said before the new level applies, which may hide info lines.
    tracing::info!("reloaded on SIGHUP: {}", done.join("; "));
    if let (Some(logging), Some(level)) = (logging, level) {
        if let Err(e) = logging.apply(level) {
            tracing::error!("reload: {e:#}");
        }
    }
}

/// Every connection and watch stream holds a descriptor, and the usual soft limit (1024) would
/// refuse clients long before memory runs short: lifts it to the hard limit, as systemd's
/// `LimitNOFILE=` does for the service. Returns the soft limit before and after.
pub fn raise_open_files_limit() -> nix::Result<(u64, u64)> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok((soft, hard))
}

/// Waits for every core; logs each failure and returns the first, else how many connections
/// the drain timeout cut off in all.
fn join_cores(cores: Vec<JoinHandle<anyhow::Result<usize>>>) -> anyhow::Result<usize> {
    let mut first = Ok(0);
    for (i, thread) in cores.into_iter().enumerate() {
        let error = match thread.join() {
            Ok(Ok(cut_off)) => {
                if let Ok(total) = &mut first {
                    *total += cut_off;
                }
                continue;
            }
            Ok(Err(e)) => e.context(format!("core {i} failed")),
            Err(_) => anyhow::anyhow!("core {i} panicked"),
        };
        tracing::error!("{error:#}");
        if first.is_ok() {
            first = Err(error);
        }
    }
    first
}

/// Lets the committer commit what is queued, and waits for it.
fn stop_committer(
    handle: Option<store::CommitterHandle>,
    thread: Option<JoinHandle<()>>,
) -> anyhow::Result<()> {
    if let (Some(handle), Some(thread)) = (handle, thread) {
        handle.stop();
        drop(handle);
        if thread.join().is_err() {
            anyhow::bail!("the committer panicked");
        }
    }
    Ok(())
}
