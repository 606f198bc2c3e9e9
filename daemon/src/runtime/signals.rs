//! Signals are blocked in every thread and taken synchronously by the main thread.

use nix::sys::signal::{SigSet, SigmaskHow, Signal};

/// Blocks SIGTERM, SIGINT and SIGHUP (and, in debug builds, SIGUSR1: hang the committer on
/// purpose, and SIGUSR2: panic on purpose) in the calling thread and every thread it starts
/// later.
pub fn block() -> anyhow::Result<SigSet> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGTERM);
    set.add(Signal::SIGINT);
    set.add(Signal::SIGHUP);
    #[cfg(debug_assertions)]
    set.add(Signal::SIGUSR1);
    #[cfg(debug_assertions)]
    set.add(Signal::SIGUSR2);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    Ok(set)
}

/// Waits for the next signal of `set`.
pub fn wait(set: &SigSet) -> anyhow::Result<Signal> {
    Ok(set.wait()?)
}
