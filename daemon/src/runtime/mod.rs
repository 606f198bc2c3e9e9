//! The process: opens the store, starts the committer and one serving thread per core, waits
//! for a stop signal and shuts down in order.

mod core;
mod hyper_compat;
mod listener;
mod signals;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::http::{auth::Tokens, Shared};
use crate::store::{self, Reader, SyncMode, WatchRegistry};

/// Everything `serve` needs, already validated.
pub struct ServeOptions {
    pub db_path: PathBuf,
    pub tokens: Vec<String>,
    pub addr: SocketAddr,
    pub read_only: bool,
    pub threads: usize,
    pub sync_mode: SyncMode,
    pub drain_timeout: Duration,
}

/// Serves until SIGTERM or SIGINT, then drains and returns.
pub fn serve(opts: ServeOptions) -> anyhow::Result<()> {
    let signals = signals::block()?;
    let watches = Arc::new(WatchRegistry::default());

    let (committer, committer_thread) = if opts.read_only {
        tracing::info!("Opened read only database at {}", opts.db_path.display());
        (None, None)
    } else {
        let conn = store::schema::open_writer(&opts.db_path, opts.sync_mode)?;
        let (handle, thread) = store::committer::spawn(conn, watches.clone())?;
        tracing::info!(
            "Opened database at {}. Sync mode: {:?}. Group commit: always on",
            opts.db_path.display(),
            opts.sync_mode
        );
        (Some(handle), Some(thread))
    };
    let shared = Arc::new(Shared {
        tokens: Tokens::new(opts.tokens),
        committer: committer.clone(),
        watches,
        endpoint_url: "/v2".to_string(),
    });

    let listeners = listener::bind_reuseport(opts.addr, opts.threads)?;
    let local_addr = listeners[0].local_addr()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::watch::channel(false);
    let mut cores = Vec::with_capacity(opts.threads);
    for (index, listener) in listeners.into_iter().enumerate() {
        let setup = core::CoreSetup {
            index,
            listener,
            shared: shared.clone(),
            reader: Reader::open(&opts.db_path)?,
            shutdown: shutdown_rx.clone(),
            drain_timeout: opts.drain_timeout,
        };
        let thread = std::thread::Builder::new()
            .name(format!("core-{index}"))
            .spawn(move || core::run(setup))
            .context("cannot start a core thread")?;
        cores.push(thread);
    }
    drop(shared);
    tracing::info!("{} cores on {}", opts.threads, core::driver_name());
    tracing::info!("Listening on http://{local_addr}");

    let signal = signals::wait_for_stop(&signals)?;
    tracing::info!("received {signal}: draining connections and committing queued writes");
    let _ = shutdown_tx.send(true);
    let mut failed = false;
    for (i, thread) in cores.into_iter().enumerate() {
        match thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!("core {i} failed: {e:#}");
                failed = true;
            }
            Err(_) => {
                tracing::error!("core {i} panicked");
                failed = true;
            }
        }
    }
    if let (Some(handle), Some(thread)) = (committer, committer_thread) {
        handle.stop();
        drop(handle);
        if thread.join().is_err() {
            anyhow::bail!("the committer panicked");
        }
    }
    if failed {
        anyhow::bail!("a core failed");
    }
    tracing::info!("stopped");
    Ok(())
}
