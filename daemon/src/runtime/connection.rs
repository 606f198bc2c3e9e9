//! What one connection is doing, for its deadlines: the first bytes, each request head, and
//! idleness. hyper's own header timeout is not used: it also runs on an idle HTTP/1.1
//! keep-alive connection, and hyper-util's protocol detection reads with no timeout at all.

use std::cell::Cell;
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
use crate::http::body::{Body, BodyError};

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
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The connection's socket, telling its state when bytes arrive, and counting the streams the
/// h2 crate refuses in what is written.
pub struct Watched<T> {
    io: T,
    state: Rc<ConnState>,
    /// `None` under TLS, where what this socket writes is encrypted (the plaintext is watched
    /// by a second `Watched` above the TLS stream).
    refusals: Option<RefusalScan>,
}

impl<T> Watched<T> {
    /// `refused` counts the h2 streams refused with `REFUSED_STREAM`.
    pub fn new(io: T, state: Rc<ConnState>, refused: prometheus::IntCounter) -> Watched<T> {
        Watched {
            io,
            state,
            refusals: Some(RefusalScan::new(refused)),
        }
    }

    /// Only tells the state when bytes arrive: the socket under TLS, so that the handshake's
    /// bytes count as the first bytes and start the head deadline.
    pub fn reads(io: T, state: Rc<ConnState>) -> Watched<T> {
        Watched {
            io,
            state,
            refusals: None,
        }
    }

    fn written(&mut self, bufs: &[io::IoSlice<'_>], mut n: usize) {
        let Some(refusals) = &mut self.refusals else {
            return;
        };
        for buf in bufs {
            if n == 0 {
                break;
            }
            let take = buf.len().min(n);
            refusals.feed(&buf[..take]);
            n -= take;
        }
    }
}

/// Follows the h2 frames the server writes and counts each `RST_STREAM` with the error
/// `REFUSED_STREAM`: the h2 crate refuses a stream past `--max-h2-streams` by itself (and
/// hyper tells nothing), so the written frames are where it can be seen. Reads only the 9-byte
/// frame heads and a `RST_STREAM`'s 4-byte payload; an HTTP/1.1 connection (its first byte
/// written is the `H` of `HTTP/1.1`) is not followed.
struct RefusalScan {
    refused: prometheus::IntCounter,
    state: Scan,
    /// The bytes of the frame head (or `RST_STREAM` payload) read so far.
    buf: [u8; 9],
    have: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scan {
    /// Nothing written yet.
    Start,
    /// HTTP/1.1: nothing to follow.
    Off,
    Head,
    /// Payload bytes to skip.
    Skip(usize),
    /// The error code of a `RST_STREAM`, then `usize` more bytes to skip.
    ResetCode(usize),
}

const RST_STREAM: u8 = 0x3;
const REFUSED_STREAM: u32 = 0x7;

impl RefusalScan {
    fn new(refused: prometheus::IntCounter) -> RefusalScan {
        RefusalScan {
            refused,
            state: Scan::Start,
            buf: [0; 9],
            have: 0,
        }
    }

    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            match self.state {
                Scan::Off => return,
                Scan::Start => {
                    // An h2 server's first frame is its SETTINGS, whose length starts with 0.
                    self.state = if bytes[0] == b'H' {
                        Scan::Off
                    } else {
                        Scan::Head
                    };
                }
                Scan::Head => {
                    let take = (9 - self.have).min(bytes.len());
                    self.buf[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                    self.have += take;
                    bytes = &bytes[take..];
                    if self.have == 9 {
                        self.have = 0;
                        let len =
                            u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                        self.state = if self.buf[3] == RST_STREAM && len >= 4 {
                            Scan::ResetCode(len - 4)
                        } else {
                            Scan::Skip(len)
                        };
                    }
                }
                Scan::Skip(left) => {
                    let take = left.min(bytes.len());
                    bytes = &bytes[take..];
                    self.state = if left == take {
                        Scan::Head
                    } else {
                        Scan::Skip(left - take)
                    };
                }
                Scan::ResetCode(rest) => {
                    let take = (4 - self.have).min(bytes.len());
                    self.buf[self.have..self.have + take].copy_from_slice(&bytes[..take]);
                    self.have += take;
                    bytes = &bytes[take..];
                    if self.have == 4 {
                        self.have = 0;
                        let code = u32::from_be_bytes(self.buf[..4].try_into().unwrap());
                        if code == REFUSED_STREAM {
                            self.refused.inc();
                        }
                        self.state = Scan::Skip(rest);
                    }
                }
            }
            if self.state == Scan::Skip(0) {
                self.state = Scan::Head;
            }
        }
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
        let result = Pin::new(&mut self.io).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = result {
            self.written(&[io::IoSlice::new(buf)], n);
        }
        result
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let result = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = result {
            self.written(bufs, n);
        }
        result
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

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    #[test]
    fn refused_streams_are_counted_in_what_is_written_however_it_is_split() {
        let mut written = frame(0x4, 0, &[0, 3, 0, 0, 0, 2]);
        written.extend(frame(0x1, 1, &[0x88]));
        written.extend(frame(0x0, 1, &[7; 300]));
        written.extend(frame(RST_STREAM, 5, &7u32.to_be_bytes()));
        written.extend(frame(RST_STREAM, 7, &8u32.to_be_bytes()));
        written.extend(frame(0x0, 3, &[]));
        written.extend(frame(RST_STREAM, 9, &7u32.to_be_bytes()));
        for chunk in [1, 2, 3, 5, 9, 13, 4096] {
            let counter = prometheus::IntCounter::new("c", "c").unwrap();
            let mut scan = RefusalScan::new(counter.clone());
            for piece in written.chunks(chunk) {
                scan.feed(piece);
            }
            assert_eq!(counter.get(), 2, "in chunks of {chunk}");
        }
        // HTTP/1.1 is not followed, whatever its body holds.
        let counter = prometheus::IntCounter::new("c", "c").unwrap();
        let mut scan = RefusalScan::new(counter.clone());
        scan.feed(b"HTTP/1.1 200 OK\r\n\r\n");
        scan.feed(&frame(RST_STREAM, 5, &7u32.to_be_bytes()));
        assert_eq!(counter.get(), 0);
    }
}
