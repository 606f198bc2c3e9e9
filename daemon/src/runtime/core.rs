//! One serving core: a monoio runtime (io_uring, or epoll where io_uring is unavailable) that
//! accepts on its own listener and serves HTTP/1.1 and h2c with hyper.

use std::cell::{Cell, RefCell};
use std::convert::Infallible;
use std::pin::pin;
use std::rc::Rc;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use monoio::io::IntoPollIo;

use super::coalesce::coalesce;
use super::connection::{ConnState, Expiry, Open, Tracked, Watched};
use super::hyper_compat::{LocalExec, MonoioTimer};
use super::limits::{Admission, ConnWatches, Limits, Permit, RequestRefusal};
use super::tls::{self, MaybeTls, Protocol, Tls};
use crate::health::Beater;
use crate::http::auth::CoreTokens;
use crate::http::read_share::{self, CoreReads, Inbox, ReadShare};
use crate::http::{self, CoreContext, Shared};
use crate::metrics::GaugeGuard;
use crate::store::Reader;

/// What a core needs to start.
pub struct CoreSetup {
    pub index: usize,
    /// This core's own listener, or its copies of the sockets systemd passed.
    pub listeners: Vec<std::net::TcpListener>,
    pub shared: Arc<Shared>,
    pub reader: Reader,
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    pub drain_timeout: Duration,
    pub limits: Limits,
    /// Shared by every core: the connection caps.
    pub admission: Arc<Admission>,
    /// Told this core's index once it accepts connections; dropped unsent if it cannot.
    pub ready: mpsc::Sender<usize>,
    /// Beaten every `period()` while the core's runtime runs (when the watchdog is on).
    pub heartbeat: Option<Beater>,
    /// `--tls-cert`: every connection is TLS.
    pub tls: Option<Arc<Tls>>,
    pub io_driver: IoDriver,
    /// What the cores see of each other's load, to share reads.
    pub read_share: Arc<ReadShare>,
    /// The reads other cores hand to this one.
    pub inbox: Inbox,
}

/// Runs the core until shutdown, then lets open connections finish (bounded by the drain
/// timeout). Returns how many connections the drain timeout cut off.
pub fn run(setup: CoreSetup) -> anyhow::Result<usize> {
    let mut rt = build_runtime(setup.io_driver).map_err(|e| {
        anyhow::anyhow!(
            "core {}: cannot start the {} driver (--io-driver): {e}",
            setup.index,
            driver_name(setup.io_driver)
        )
    })?;
    rt.block_on(serve(setup))
}

/// How a core waits for its sockets (`--io-driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoDriver {
    /// io_uring where the kernel allows it, else epoll.
    Auto,
    /// io_uring; a core that cannot set up a ring fails to start.
    IoUring,
    /// epoll and non-blocking system calls (monoio's legacy driver).
    Epoll,
}

type CoreRuntime = monoio::FusionRuntime<
    monoio::time::TimeDriver<monoio::IoUringDriver>,
    monoio::time::TimeDriver<monoio::LegacyDriver>,
>;

fn build_runtime(driver: IoDriver) -> std::io::Result<CoreRuntime> {
    match driver {
        IoDriver::Auto => monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build(),
        IoDriver::IoUring => Ok(monoio::RuntimeBuilder::<monoio::IoUringDriver>::new()
            .enable_timer()
            .build()?
            .into()),
        IoDriver::Epoll => Ok(monoio::RuntimeBuilder::<monoio::LegacyDriver>::new()
            .enable_timer()
            .build()?
            .into()),
    }
}

/// The io driver the cores use with `driver`.
pub fn driver_name(driver: IoDriver) -> &'static str {
    match driver {
        IoDriver::IoUring => "io_uring",
        IoDriver::Epoll => "epoll",
        IoDriver::Auto if monoio::utils::detect_uring() => "io_uring",
        IoDriver::Auto => "epoll",
    }
}

async fn serve(setup: CoreSetup) -> anyhow::Result<usize> {
    // Inside the runtime: `is_legacy` reads its thread-local and panics outside of it.
    tracing::debug!(
        "core {} runs on {}",
        setup.index,
        if monoio::utils::is_legacy() {
            "epoll"
        } else {
            "io_uring"
        }
    );
    let listeners = setup
        .listeners
        .into_iter()
        .map(monoio::net::TcpListener::from_std)
        .collect::<Result<Vec<_>, _>>()?;
    let handed_over = setup.shared.metrics.reads_handed_over.clone();
    let ctx = Rc::new(CoreContext {
        tokens: CoreTokens::new(setup.shared.tokens.clone()),
        shared: setup.shared,
        reader: RefCell::new(setup.reader),
        watch_reads: Default::default(),
        shutdown: setup.shutdown.clone(),
        max_body_bytes: setup.limits.max_body_bytes,
        read_budget: setup.admission.reads.clone(),
        handling: Default::default(),
        snapshot_held: Default::default(),
        reads: Rc::new(CoreReads::new(
            setup.read_share,
            setup.index,
            setup.inbox,
            handed_over,
        )),
    });
    monoio::spawn(release_snapshots(ctx.clone()));
    monoio::spawn(read_share::serve_inbox(
        ctx.clone(),
        ConnWatches::new(setup.admission.watches.clone()),
    ));
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        // A client that shuts down its sending side after the request still gets the answer.
        .half_close(true)
        .timer(MonoioTimer)
        // Ours (`connection`) instead: hyper's also closes idle keep-alive connections.
        .header_read_timeout(None);
    builder
        .http2()
        .timer(MonoioTimer)
        // Streams past it get REFUSED_STREAM from the h2 crate; the client may retry them.
        .max_concurrent_streams(setup.limits.max_h2_streams)
        // Closes connections to peers that vanished (no FIN: a pulled cable, a dead NAT entry).
        .keep_alive_interval(Some(setup.limits.h2_keepalive_interval))
        .keep_alive_timeout(setup.limits.h2_keepalive_timeout);
    // Under TLS, ALPN tells the protocol; without it (or without TLS) the preface does.
    let builders = Rc::new(Builders {
        h1: builder.clone().http1_only(),
        h2: builder.clone().http2_only(),
        auto: builder,
    });
    let open = Rc::new(Cell::new(0usize));
    let heartbeat = setup.heartbeat.map(Rc::new);
    if let Some(beater) = &heartbeat {
        monoio::spawn(beat(beater.clone()));
    }
    let accepting: Vec<_> = listeners
        .into_iter()
        .map(|listener| {
            monoio::spawn(accept(
                listener,
                Serving {
                    ctx: ctx.clone(),
                    builders: builders.clone(),
                    open: open.clone(),
                    limits: setup.limits,
                    admission: setup.admission.clone(),
                    tls: setup.tls.clone(),
                },
                setup.shutdown.clone(),
            ))
        })
        .collect();
    let _ = setup.ready.send(setup.index);
    drop(setup.ready);
    for task in accepting {
        task.await;
    }
    let deadline = Instant::now() + setup.drain_timeout;
    while open.get() > 0 && Instant::now() < deadline {
        monoio::time::sleep(Duration::from_millis(10)).await;
    }
    // Reads other cores handed over during the drain are answered, not cut off.
    ctx.reads.close(deadline).await;
    let cut_off = open.get();
    if cut_off > 0 {
        tracing::warn!(
            "core {}: {cut_off} connections still open after the drain timeout: cut off",
            setup.index,
        );
    }
    if let Some(beater) = heartbeat {
        beater.retire();
    }
    Ok(cut_off)
}

/// What a core hands each connection it accepts.
#[derive(Clone)]
struct Serving {
    ctx: Rc<CoreContext>,
    builders: Rc<Builders>,
    open: Rc<Cell<usize>>,
    limits: Limits,
    admission: Arc<Admission>,
    tls: Option<Arc<Tls>>,
}

/// hyper's connection builders: by the preface, and for what ALPN agreed on.
struct Builders {
    auto: auto::Builder<LocalExec>,
    h1: auto::Builder<LocalExec>,
    h2: auto::Builder<LocalExec>,
}

/// Back-off of a failing accept: from the first to the longest wait between tries.
const ACCEPT_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(10), Duration::from_millis(500));

/// Accepts connections on one listener until shutdown; the listener closes when this returns.
async fn accept(
    listener: monoio::net::TcpListener,
    serving: Serving,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let metrics = serving.ctx.shared.metrics.clone();
    // An episode of failing accepts (out of descriptors): when it began, and how many failed.
    let mut failing: Option<(Instant, u64)> = None;
    let mut backoff = ACCEPT_BACKOFF.0;
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    if let Some((since, failed)) = failing.take() {
                        tracing::info!(
                            "accept works again after {failed} failed attempts in {:.1} s",
                            since.elapsed().as_secs_f64()
                        );
                        backoff = ACCEPT_BACKOFF.0;
                    }
                    match serving.admission.admit(peer.ip()) {
                        Ok(permit) => {
                            monoio::spawn(connection(stream, serving.clone(), permit));
                        }
                        Err(reason) => {
                            // Counted, not logged: a flood would flood the log.
                            metrics.connections_refused(reason).inc();
                            tracing::debug!("refused a connection from {peer}: {}", reason.name());
                            drop(stream);
                        }
                    }
                }
                Err(e) => {
                    // Out of file descriptors, say: pending connections wait in the listen
                    // backlog while this backs off; existing connections are not affected.
                    metrics.accept_errors.inc();
                    match &mut failing {
                        Some((_, failed)) => *failed += 1,
                        None => {
                            tracing::warn!(
                                "accept failed: {e}; backing off (up to {} ms between tries) \
                                 until it works again; new connections wait meanwhile",
                                ACCEPT_BACKOFF.1.as_millis()
                            );
                            failing = Some((Instant::now(), 1));
                        }
                    }
                    monoio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        }
    }
}

/// Ends the read snapshot the core's reader keeps for the next reads once it is
/// `SNAPSHOT_HOLD` old (the reader itself takes a new one when a read finds it older): an idle
/// core would otherwise hold it for good, and with it the WAL's rewind (store::checkpointer).
async fn release_snapshots(ctx: Rc<CoreContext>) {
    loop {
        ctx.snapshot_held.notified().await;
        monoio::time::sleep(crate::store::SNAPSHOT_HOLD).await;
        ctx.reader.borrow_mut().release();
    }
}

/// Proves the core's runtime still runs tasks: a core stuck in a request stops beating.
async fn beat(beater: Rc<Beater>) {
    loop {
        beater.beat();
        monoio::time::sleep(beater.period()).await;
    }
}

async fn connection(stream: monoio::net::TcpStream, serving: Serving, _permit: Permit) {
    let Serving {
        ctx,
        builders,
        open,
        limits,
        admission,
        tls,
    } = serving;
    let _open = Open::new(&open);
    let _counted = GaugeGuard::new(&ctx.shared.metrics.open_connections);
    let metrics = ctx.shared.metrics.clone();
    let _ = stream.set_nodelay(true);
    let io = match stream.into_poll_io() {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!("cannot serve a connection: {e}");
            return;
        }
    };
    let mut shutdown = ctx.shutdown.clone();
    let state = ConnState::new();
    let (io, builder) = match &tls {
        None => (MaybeTls::Plain(io), &builders.auto),
        Some(tls) => {
            // The handshake's bytes are the first bytes: the first-byte and head deadlines
            // bound it (a silent client, a partial ClientHello).
            let handshake = tls::accept(tls.config(), Watched::reads(io, state.clone()));
            let Some(done) =
                within_deadlines(handshake, &state, &limits, &mut shutdown, &metrics).await
            else {
                return;
            };
            match done {
                Ok((stream, protocol)) => (
                    MaybeTls::Tls(Box::new(stream)),
                    match protocol {
                        Protocol::H2 => &builders.h2,
                        Protocol::Http1 => &builders.h1,
                        Protocol::Unknown => &builders.auto,
                    },
                ),
                Err((reason, e)) => {
                    metrics.tls_handshake_failures(reason).inc();
                    tracing::debug!("TLS handshake failed ({}): {e}", reason.name());
                    return;
                }
            }
        }
    };
    let watches = ConnWatches::new(admission.watches.clone());
    let service = {
        let state = state.clone();
        service_fn(move |req: http::Request| {
            let active = state.request_started(req.version() == hyper::Version::HTTP_2);
            let arrival = ctx.reads.arrived(http::is_snapshot_read(&req));
            let handling = http::Handling::start(&ctx);
            let ctx = ctx.clone();
            let watches = watches.clone();
            async move {
                let response = read_share::handle(req, &ctx, &watches, arrival).await;
                drop(handling);
                Ok::<_, Infallible>(response.map(|body| Tracked::new(body, active)))
            }
        })
    };
    let refused = metrics
        .requests_refused(RequestRefusal::MaxH2Streams)
        .clone();
    // What hyper writes is gathered and written out after each poll of the connection (above
    // TLS: bigger records); `writer.drained` polls it wherever it is polled below.
    let (io, writer) = coalesce(io);
    let io = TokioIo::new(Watched::new(io, state.clone(), refused));
    let mut conn = pin!(builder.serve_connection(io, service));
    loop {
        let timer = until(state.deadline(&limits));
        monoio::select! {
            result = writer.drained(conn.as_mut()) => {
                if let Err(e) = result {
                    tracing::debug!("connection ended with an error: {e}");
                }
                return;
            }
            _ = shutdown.wait_for(|stopping| *stopping) => break,
            _ = state.changed() => continue,
            _ = timer => {}
        }
        // The state may have moved on since the timer was set: only a deadline still due counts.
        let Some((at, expiry)) = state.deadline(&limits) else {
            continue;
        };
        if at > Instant::now() {
            continue;
        }
        metrics.connections_closed(expiry).inc();
        tracing::debug!("closing a connection: {}", expiry.name());
        if expiry == Expiry::Idle {
            // Nothing in flight: HTTP/1.1 closes at once, h2 says GOAWAY first.
            conn.as_mut().graceful_shutdown();
            monoio::select! {
                _ = writer.drained(conn.as_mut()) => {}
                _ = monoio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        // Dropping the connection closes the socket.
        return;
    }
    // Finish requests in flight; HTTP/2 clients get GOAWAY and retry elsewhere.
    conn.as_mut().graceful_shutdown();
    let _ = writer.drained(conn.as_mut()).await;
}

/// Resolves at the deadline; never without one.
async fn until(deadline: Option<(Instant, Expiry)>) {
    match deadline {
        Some((at, _)) => monoio::time::sleep(at.saturating_duration_since(Instant::now())).await,
        None => std::future::pending().await,
    }
}

/// Runs `work` (a TLS handshake) within the connection's deadlines. `None`: a deadline ran
/// out (counted in `denokv_connections_closed_total`) or the server is shutting down.
async fn within_deadlines<F: std::future::Future>(
    work: F,
    state: &ConnState,
    limits: &Limits,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
    metrics: &crate::metrics::Metrics,
) -> Option<F::Output> {
    let mut work = pin!(work);
    loop {
        let timer = until(state.deadline(limits));
        monoio::select! {
            done = work.as_mut() => return Some(done),
            _ = shutdown.wait_for(|stopping| *stopping) => return None,
            _ = state.changed() => continue,
            _ = timer => {}
        }
        let Some((at, expiry)) = state.deadline(limits) else {
            continue;
        };
        if at > Instant::now() {
            continue;
        }
        metrics.connections_closed(expiry).inc();
        tracing::debug!(
            "closing a connection in its TLS handshake: {}",
            expiry.name()
        );
        return None;
    }
}
