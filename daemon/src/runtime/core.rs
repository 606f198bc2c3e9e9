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

use super::hyper_compat::{LocalExec, MonoioTimer};
use crate::health::Beater;
use crate::http::auth::CoreTokens;
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
    /// Told this core's index once it accepts connections; dropped unsent if it cannot.
    pub ready: mpsc::Sender<usize>,
    /// Beaten every `period()` while the core's runtime runs (when the watchdog is on).
    pub heartbeat: Option<Beater>,
}

/// Runs the core until shutdown, then lets open connections finish (bounded by the drain
/// timeout). Returns how many connections the drain timeout cut off.
pub fn run(setup: CoreSetup) -> anyhow::Result<usize> {
    let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
        .enable_timer()
        .build()?;
    rt.block_on(serve(setup))
}

/// The io driver the runtime of the calling thread uses.
pub fn driver_name() -> &'static str {
    if monoio::utils::detect_uring() {
        "io_uring"
    } else {
        "epoll"
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
    let ctx = Rc::new(CoreContext {
        tokens: CoreTokens::new(setup.shared.tokens.clone()),
        shared: setup.shared,
        reader: RefCell::new(setup.reader),
        watch_reads: Default::default(),
        shutdown: setup.shutdown.clone(),
    });
    let mut builder = auto::Builder::new(LocalExec);
    builder
        .http1()
        // A client that shuts down its sending side after the request still gets the answer.
        .half_close(true)
        .timer(MonoioTimer)
        .header_read_timeout(Duration::from_secs(30));
    builder
        .http2()
        .timer(MonoioTimer)
        .max_concurrent_streams(1024)
        .keep_alive_interval(Some(Duration::from_secs(60)));
    let builder = Rc::new(builder);
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
                ctx.clone(),
                builder.clone(),
                open.clone(),
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

/// Accepts connections on one listener until shutdown; the listener closes when this returns.
async fn accept(
    listener: monoio::net::TcpListener,
    ctx: Rc<CoreContext>,
    builder: Rc<auto::Builder<LocalExec>>,
    open: Rc<Cell<usize>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        monoio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    monoio::spawn(connection(stream, ctx.clone(), builder.clone(), open.clone()));
                }
                Err(e) => {
                    // Out of file descriptors or similar: back off instead of spinning.
                    tracing::warn!("accept failed: {e}");
                    monoio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait_for(|stopping| *stopping) => break,
        }
    }
}

/// Proves the core's runtime still runs tasks: a core stuck in a request stops beating.
async fn beat(beater: Rc<Beater>) {
    loop {
        beater.beat();
        monoio::time::sleep(beater.period()).await;
    }
}

async fn connection(
    stream: monoio::net::TcpStream,
    ctx: Rc<CoreContext>,
    builder: Rc<auto::Builder<LocalExec>>,
    open: Rc<Cell<usize>>,
) {
    open.set(open.get() + 1);
    let _guard = OpenGuard(open);
    let _counted = GaugeGuard::new(&ctx.shared.metrics.open_connections);
    let _ = stream.set_nodelay(true);
    let io = match stream.into_poll_io() {
        Ok(io) => io,
        Err(e) => {
            tracing::warn!("cannot serve a connection: {e}");
            return;
        }
    };
    let mut shutdown = ctx.shutdown.clone();
    let service = service_fn(move |req| {
        let ctx = ctx.clone();
        async move { Ok::<_, Infallible>(http::handle(req, &ctx).await) }
    });
    let mut conn = pin!(builder.serve_connection(TokioIo::new(io), service));
    monoio::select! {
        result = conn.as_mut() => {
            if let Err(e) = result {
                tracing::debug!("connection ended with an error: {e}");
            }
            return;
        }
        _ = shutdown.wait_for(|stopping| *stopping) => {}
    }
    // Finish requests in flight; HTTP/2 clients get GOAWAY and retry elsewhere.
    conn.as_mut().graceful_shutdown();
    let _ = conn.await;
}

struct OpenGuard(Rc<Cell<usize>>);

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}
