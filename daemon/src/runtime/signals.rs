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

/// Waits up to `limit` for the next signal of `set`; `None` when none came.
pub fn wait_timeout(set: &SigSet, limit: std::time::Duration) -> anyhow::Result<Option<Signal>> {
    let timeout = libc::timespec {
        tv_sec: limit.as_secs() as libc::time_t,
        tv_nsec: limit.subsec_nanos() as libc::c_long,
    };
    // SAFETY: valid pointers to a signal set and a timespec; no siginfo wanted.
    let n = unsafe { libc::sigtimedwait(set.as_ref(), std::ptr::null_mut(), &timeout) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::EAGAIN) | Some(libc::EINTR) => Ok(None),
            _ => Err(e.into()),
        };
    }
    Ok(Some(Signal::try_from(n)?))
}
