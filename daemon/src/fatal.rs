//! Fail-stop: when going on could make the server tell a client something false, it stops.
//!
//! Two ways in:
//! - [`stop`]: a thread met a failure after which no answer can be trusted (an fsync failed
//!   after a commit's frames reached the WAL, a ROLLBACK failed). The first reason is kept, the
//!   main thread is woken (it drains, then `serve` returns the reason as an error and the
//!   process exits non-zero, so systemd restarts it and SQLite's recovery decides).
//! - a panic anywhere: [`install_panic_hook`] logs the thread, the place and the message, and
//!   aborts the process. A panic leaves a thread's work half done (a core's connections, the
//!   committer's queue), and a process that runs on without one of its threads is worse than
//!   one that restarts.

use std::sync::OnceLock;

static REASON: OnceLock<String> = OnceLock::new();
static WAKE: OnceLock<Box<dyn Fn() + Send + Sync>> = OnceLock::new();

/// Records `reason` (the first one wins), logs it and wakes the main thread, which then shuts
/// the process down with a non-zero exit. Without a waker (library use, tests) it only records.
pub fn stop(reason: impl Into<String>) {
    let reason = reason.into();
    if REASON.set(reason.clone()).is_ok() {
        tracing::error!("stopping the server: {reason}");
        if let Some(wake) = WAKE.get() {
            wake();
        }
    }
}

/// Why the process is stopping on a failure, if it is.
pub fn reason() -> Option<&'static str> {
    REASON.get().map(String::as_str)
}

/// Sets how [`stop`] wakes the main thread (once; `runtime::serve` raises SIGTERM at itself).
pub fn set_waker(wake: impl Fn() + Send + Sync + 'static) {
    let _ = WAKE.set(Box::new(wake));
}

/// Makes every panic, on any thread, log one clear line (and a backtrace) and abort the
/// process. Called first thing by the binary.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".to_string());
        let place = info
            .location()
            .map(|l| format!("{}:{}", l.file(), l.line()))
            .unwrap_or_default();
        // eprintln, not tracing: the logger may be what panicked.
        eprintln!(
            "{}thread '{name}' panicked at {place}: {message}; aborting the process (a panic \
             leaves work half done; systemd restarts the service)\n{}",
            crate::telemetry::error_prefix(),
            std::backtrace::Backtrace::force_capture()
        );
        std::process::abort();
    }));
}

/// Debug builds: a panic on purpose, to test that any thread's panic stops the process.
///
/// `DENOKV_DEBUG_PANIC=<place>` names the place (`committer`, `checkpointer`, `core`,
/// `metrics`, `external`); SIGUSR2 arms it; the place panics the next time it passes its panic
/// point. Release builds compile the points to nothing.
pub mod debug {
    #[cfg(debug_assertions)]
    static ARMED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// Arms the place named by `DENOKV_DEBUG_PANIC` (SIGUSR2).
    #[cfg(debug_assertions)]
    pub fn arm() -> Option<String> {
        let place = std::env::var("DENOKV_DEBUG_PANIC").ok()?;
        ARMED.store(true, std::sync::atomic::Ordering::Relaxed);
        Some(place)
    }

    /// Panics here if this is the armed place.
    #[inline]
    pub fn panic_point(_place: &str) {
        #[cfg(debug_assertions)]
        if ARMED.load(std::sync::atomic::Ordering::Relaxed)
            && std::env::var("DENOKV_DEBUG_PANIC").as_deref() == Ok(_place)
        {
            panic!("debug build: panic on purpose in {_place} (DENOKV_DEBUG_PANIC, SIGUSR2)");
        }
    }
}
