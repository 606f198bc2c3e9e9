//! Glue between hyper and monoio: an executor and a timer for tasks that stay on their core.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Spawns hyper's background tasks (HTTP/2 streams) on the current core.
#[derive(Clone, Copy, Debug)]
pub struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future + 'static,
{
    fn execute(&self, fut: F) {
        monoio::spawn(fut);
    }
}

/// hyper's timer (header read timeouts, HTTP/2 keep-alive) on monoio's per-core timer.
#[derive(Clone, Copy, Debug)]
pub struct MonoioTimer;

impl hyper::rt::Timer for MonoioTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        Box::pin(LocalSleep(Box::pin(monoio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }
}

struct LocalSleep(Pin<Box<monoio::time::Sleep>>);

// SAFETY: hyper's `Sleep` must be Send + Sync, but a connection and everything hyper creates for
// it live and die on the core thread that accepted it (tasks are spawned with `monoio::spawn`,
// which never moves them), so this sleep is never touched from another thread. A read request
// handed to another core (`http::read_share`) takes no sleep along: hyper's sleeps (header read
// timeout, h2 keep-alive) belong to the connection's task, and the h2 body only reads the clock.
unsafe impl Send for LocalSleep {}
unsafe impl Sync for LocalSleep {}

impl Future for LocalSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for LocalSleep {}
