//! What one connection is doing, for its deadlines: the first bytes, each request head, and
//! idleness. hyper's own header timeout is not used: it also runs on an idle HTTP/1.1
//! keep-alive connection, and hyper-util's protocol detection reads with no timeout at all.

use std::cell::Cell;
use std::convert::Infallible;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Instant;

use bytes::Bytes;
use hyper::body::{Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::limits::Limits;
use crate::http::body::Body;

/// Which deadline ran out: the `reason` of `denokv_connections_closed_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expiry {
    FirstByte,
    Head,
    Idle,
}

impl Expiry {
    pub const COUNT: usize = 3;
    pub const ALL: [Expiry; Self::COUNT] = [Expiry::FirstByte, Expiry::Head, Expiry::Idle];

    pub fn name(self) -> &'static str {
        match self {
            Expiry::FirstByte => "first_byte_timeout",
            Expiry::Head => "head_timeout",
            Expiry::Idle => "idle_timeout",
        }
    }
}

/// The state of one connection; lives on its core (`Rc`, `Cell`).
pub struct ConnState {
    accepted: Instant,
    /// When the first byte of a request head not yet complete arrived.
    head_started: Cell<Option<Instant>>,
    /// Requests (h2: streams) whose response is not finished: a watch stream counts until it
    /// ends.
    active: Cell<usize>,
    idle_since: Cell<Instant>,
    requests: Cell<u64>,
    h2: Cell<bool>,
    /// Set when the deadline may have moved earlier; wakes the connection's supervisor.
    changed: Cell<bool>,
    waker: Cell<Option<Waker>>,
}

impl ConnState {
    pub fn new() -> Rc<ConnState> {
        let now = Instant::now();
        Rc::new(ConnState {
            accepted: now,
            head_started: Cell::new(None),
            active: Cell::new(0),
            idle_since: Cell::new(now),
            requests: Cell::new(0),
            h2: Cell::new(false),
            changed: Cell::new(false),
            waker: Cell::new(None),
        })
    }

    fn notify(&self) {
        self.changed.set(true);
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }

    /// Bytes arrived. With nothing in flight they start a request head, except on an h2
    /// connection past its first request: there pings, settings and window updates arrive
    /// while idle, and the idle timeout bounds a stalled HEADERS frame.
    fn on_read(&self) {
        if self.head_started.get().is_none()
            && self.active.get() == 0
            && (self.requests.get() == 0 || !self.h2.get())
        {
            self.head_started.set(Some(Instant::now()));
            self.notify();
        }
    }

    /// hyper handed a request to the service: its head is complete.
    pub fn request_started(self: &Rc<Self>, h2: bool) -> Active {
        self.head_started.set(None);
        self.requests.set(self.requests.get() + 1);
        self.h2.set(h2);
        self.active.set(self.active.get() + 1);
        self.notify();
        Active(self.clone())
    }

    /// The next deadline and what it is for; `None` while a request is in flight.
    pub fn deadline(&self, limits: &Limits) -> Option<(Instant, Expiry)> {
        if let Some(started) = self.head_started.get() {
            return Some((started + limits.head_timeout, Expiry::Head));
        }
        if self.active.get() > 0 {
            return None;
        }
        if self.requests.get() == 0 {
            return Some((self.accepted + limits.first_byte_timeout, Expiry::FirstByte));
        }
        Some((self.idle_since.get() + limits.idle_timeout, Expiry::Idle))
    }

    /// Resolves once the deadline may have changed since the last call.
    pub async fn changed(&self) {
        poll_fn(|cx| {
            if self.changed.replace(false) {
                Poll::Ready(())
            } else {
                self.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        })
        .await
    }
}

/// A request in flight; held by the service and then by the response body until it ends.
pub struct Active(Rc<ConnState>);

impl Drop for Active {
    fn drop(&mut self) {
        let state = &self.0;
        state.active.set(state.active.get() - 1);
        if state.active.get() == 0 {
            state.idle_since.set(Instant::now());
            state.notify();
        }
    }
}

/// Counts a connection in a per-thread tally while it lives (a core's, for its drain; the
/// metrics listener's, for its cap).
pub struct Open(Rc<Cell<usize>>);

impl Open {
    pub fn new(open: &Rc<Cell<usize>>) -> Open {
        open.set(open.get() + 1);
        Open(open.clone())
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.set(self.0.get() - 1);
    }
}

/// A response body that keeps its request counted as in flight until it is finished.
pub struct Tracked {
    body: Body,
    _active: Active,
}

impl Tracked {
    pub fn new(body: Body, active: Active) -> Tracked {
        Tracked {
            body,
            _active: active,
        }
    }
}

impl hyper::body::Body for Tracked {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, telling its state when bytes arrive.
pub struct Watched<T> {
    io: T,
    state: Rc<ConnState>,
}

impl<T> Watched<T> {
    pub fn new(io: T, state: Rc<ConnState>) -> Watched<T> {
        Watched { io, state }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let result = Pin::new(&mut self.io).poll_read(cx, buf);
        if matches!(result, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.state.on_read();
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
