//! Signals are blocked in every thread and taken synchronously by the main thread.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Blocks SIGTERM, SIGINT and SIGHUP in the calling thread and every thread it starts later.
pub fn block() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// Waits for a stop signal. SIGHUP is logged; there is nothing to reload yet.
pub fn wait_for_stop(set: &SigSet) -> anyhow::Result<Signal> {
    loop {
        match set.wait()? {
            Signal::SIGHUP => tracing::info!("received SIGHUP: nothing to reload"),
            stop => return Ok(stop),
        }
    }
}
