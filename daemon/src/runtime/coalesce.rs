//! Gathers what hyper writes on a connection and writes it to the socket once per poll of the
//! connection's task, instead of once per h2 frame.
//!
//! The h2 crate does not copy a DATA payload of 256 bytes or more into its own buffer when
//! the socket takes vectored writes: it chains it, and flushes before the next frame. A commit
//! that wakes a hundred watch streams on one connection thus cost a hundred `writev`s. Here
//! `poll_write` copies into a buffer and `poll_flush` does nothing; the connection's task
//! (the only one that touches the socket) writes the buffer out after every poll of hyper's
//! connection ([`Drained`]), before it can go to sleep, so nothing is left behind: what hyper
//! flushed in one poll goes out in one system call.
//!
//! The layer sits above TLS, so that rustls gets bigger writes and makes bigger records.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::rc::Rc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How many bytes a connection gathers before it writes them out ahead of the end of the poll
/// (and, with a socket that takes no more, before it takes more: the back-pressure hyper sees).
/// 64 KiB is a few dozen watch frames per write and about what a socket's send buffer takes at
/// once; more gains nothing per system call and holds more memory per busy connection.
pub const CAP: usize = 64 * 1024;

/// How many emptied buffers a core keeps for the next connection that writes. Only the
/// connection being polled fills one (it is written out before the next is polled), unless its
/// socket is full; an idle connection holds none.
const SPARES: usize = 4;

/// At most this many slices go in one `writev` of the buffer and the caller's bytes.
const MAX_SLICES: usize = 64;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

fn take_buffer() -> Vec<u8> {
    SPARE
        .with(|spare| spare.borrow_mut().pop())
        .unwrap_or_else(|| Vec::with_capacity(CAP))
}

fn give_back(mut buf: Vec<u8>) {
    buf.clear();
    SPARE.with(|spare| {
        let mut spare = spare.borrow_mut();
        if spare.len() < SPARES {
            spare.push(buf);
        }
    });
}

/// The socket hyper writes to: see the module's comment.
pub struct Coalesced<T>(Rc<RefCell<Inner<T>>>);

/// The connection task's handle on the same buffer and socket, to write out after each poll.
pub struct Writer<T>(Rc<RefCell<Inner<T>>>);

/// Wraps `io`; hyper gets the first, the task that polls hyper's connection the second.
pub fn coalesce<T>(io: T) -> (Coalesced<T>, Writer<T>) {
    let inner = Rc::new(RefCell::new(Inner {
        io,
        buf: Vec::new(),
        unflushed: false,
        error: None,
        #[cfg(test)]
        writes: 0,
    }));
    (Coalesced(inner.clone()), Writer(inner))
}

struct Inner<T> {
    io: T,
    /// Bytes accepted and not yet written; no allocation while empty.
    buf: Vec<u8>,
    /// Written to `io` since its last `poll_flush` (TLS keeps records back until then).
    unflushed: bool,
    /// A write failed: every later write, flush or drain fails the same way.
    error: Option<(io::ErrorKind, String)>,
    /// Writes to the socket, for the tests.
    #[cfg(test)]
    writes: usize,
}

impl<T: AsyncWrite + Unpin> Inner<T> {
    fn failed(&self) -> Option<io::Error> {
        let (kind, message) = self.error.as_ref()?;
        Some(io::Error::new(*kind, message.clone()))
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        self.error = Some((e.kind(), e.to_string()));
        self.release();
        e
    }

    /// Gives the buffer's memory back once it is empty.
    fn release(&mut self) {
        if self.buf.capacity() > 0 {
            give_back(std::mem::take(&mut self.buf));
        }
    }

    fn append(&mut self, bufs: &[IoSlice<'_>], mut limit: usize) -> usize {
        if self.buf.capacity() == 0 {
            self.buf = take_buffer();
        }
        let mut copied = 0;
        for b in bufs {
            if limit == 0 {
                break;
            }
            let take = b.len().min(limit);
            self.buf.extend_from_slice(&b[..take]);
            copied += take;
            limit -= take;
        }
        copied
    }

    /// Writes to the socket: the buffer, then `bufs`. Returns how many of `bufs`' bytes went
    /// (0 when only buffered bytes did).
    fn poll_write_out(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut slices = [IoSlice::new(&[]); MAX_SLICES];
        let mut count = 0;
        if !self.buf.is_empty() {
            slices[0] = IoSlice::new(&self.buf);
            count = 1;
        }
        for b in bufs.iter().filter(|b| !b.is_empty()) {
            if count == MAX_SLICES {
                break;
            }
            slices[count] = *b;
            count += 1;
        }
        let written = ready!(Pin::new(&mut self.io).poll_write_vectored(cx, &slices[..count]));
        #[cfg(test)]
        {
            self.writes += 1;
        }
        let n = match written {
            Ok(0) => {
                let e = io::Error::new(io::ErrorKind::WriteZero, "the socket took no bytes");
                return Poll::Ready(Err(self.fail(e)));
            }
            Ok(n) => n,
            Err(e) => return Poll::Ready(Err(self.fail(e))),
        };
        self.unflushed = true;
        let buffered = self.buf.len();
        if n < buffered {
            self.buf.drain(..n);
            return Poll::Ready(Ok(0));
        }
        self.buf.clear();
        self.release();
        Poll::Ready(Ok(n - buffered))
    }

    fn poll_write_vectored(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(e));
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if total == 0 {
            return Poll::Ready(Ok(0));
        }
        loop {
            let room = CAP - self.buf.len();
            if total <= room {
                return Poll::Ready(Ok(self.append(bufs, total)));
            }
            // Past the cap: out with the buffer, and these bytes along with it without a copy
            // (an HTTP/1.1 body of a megabyte goes straight to the socket).
            match self.poll_write_out(cx, bufs) {
                Poll::Ready(Ok(0)) => continue,
                Poll::Ready(result) => return Poll::Ready(result),
                // The socket is full: take what still fits, then wait for it.
                Poll::Pending if room > 0 => return Poll::Ready(Ok(self.append(bufs, room))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Writes everything buffered out, then flushes the socket (TLS records held back).
    fn poll_drain(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if let Some(e) = self.failed() {
            return Poll::Ready(Err(e));
        }
        while !self.buf.is_empty() {
            ready!(self.poll_write_out(cx, &[]))?;
        }
        self.release();
        if self.unflushed {
            if let Err(e) = ready!(Pin::new(&mut self.io).poll_flush(cx)) {
                return Poll::Ready(Err(self.fail(e)));
            }
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncWrite + Unpin> Writer<T> {
    /// Writes out what is buffered; on `Pending` the socket wakes the task when it can take
    /// more. An error is kept: hyper's next write or flush gets it too.
    pub fn poll_drain(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.0.borrow_mut().poll_drain(cx)
    }

    /// Polls `conn` (hyper's connection), then writes out what it wrote.
    pub fn drained<'a, F>(&'a self, conn: Pin<&'a mut F>) -> Drained<'a, F, T> {
        Drained { conn, writer: self }
    }

    #[cfg(test)]
    fn writes(&self) -> usize {
        self.0.borrow().writes
    }

    #[cfg(test)]
    fn buffered(&self) -> usize {
        self.0.borrow().buf.len()
    }
}

/// hyper's connection, polled so that what it writes in a poll is written out before the
/// poll returns. A write error met there ends the connection with that error.
pub struct Drained<'a, F, T> {
    conn: Pin<&'a mut F>,
    writer: &'a Writer<T>,
}

impl<F, O, E, T> Future for Drained<'_, F, T>
where
    F: Future<Output = Result<O, E>>,
    E: From<io::Error>,
    T: AsyncWrite + Unpin,
{
    type Output = Result<O, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let polled = this.conn.as_mut().poll(cx);
        // hyper drains on shutdown itself; a connection that ended otherwise (an error) may
        // leave bytes that cannot go, and nothing waits for them.
        match (this.writer.poll_drain(cx), polled) {
            (Poll::Ready(Err(e)), Poll::Pending) => Poll::Ready(Err(e.into())),
            (_, polled) => polled,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Coalesced<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0.borrow_mut().io).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Coalesced<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0
            .borrow_mut()
            .poll_write_vectored(cx, &[IoSlice::new(buf)])
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.0.borrow_mut().poll_write_vectored(cx, bufs)
    }

    /// Copies either way: hyper and h2 need not flatten what they write.
    fn is_write_vectored(&self) -> bool {
        true
    }

    /// Writes nothing: [`Drained`] writes the buffer out at the end of the task's poll, before
    /// the task can sleep. Only reports an earlier write error.
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.0.borrow().failed() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Ready(Ok(())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let mut inner = self.0.borrow_mut();
        ready!(inner.poll_drain(cx))?;
        Pin::new(&mut inner.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Wake, Waker};

    /// A socket that records what it takes; it can be full (`Pending`), take a few bytes per
    /// call, or fail.
    #[derive(Default)]
    struct Socket {
        taken: Vec<u8>,
        writes: usize,
        full: bool,
        per_call: Option<usize>,
        fail: Option<io::ErrorKind>,
        shut: bool,
        waker: Option<Waker>,
    }

    #[derive(Clone, Default)]
    struct Mock(Rc<RefCell<Socket>>);

    impl Mock {
        fn with(&self, f: impl FnOnce(&mut Socket)) {
            f(&mut self.0.borrow_mut());
        }

        fn taken(&self) -> Vec<u8> {
            self.0.borrow().taken.clone()
        }

        /// Makes room: wakes whoever waits to write.
        fn unblock(&self) {
            let mut s = self.0.borrow_mut();
            s.full = false;
            if let Some(w) = s.waker.take() {
                w.wake();
            }
        }
    }

    impl AsyncWrite for Mock {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(buf)])
        }

        fn poll_write_vectored(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut s = self.0.borrow_mut();
            if let Some(kind) = s.fail {
                return Poll::Ready(Err(io::Error::new(kind, "mock")));
            }
            if s.full {
                s.waker = Some(cx.waker().clone());
                return Poll::Pending;
            }
            s.writes += 1;
            let mut limit = s.per_call.unwrap_or(usize::MAX);
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(limit);
                s.taken.extend_from_slice(&b[..take]);
                n += take;
                limit -= take;
            }
            Poll::Ready(Ok(n))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            self.0.borrow_mut().shut = true;
            Poll::Ready(Ok(()))
        }
    }

    #[derive(Default)]
    struct Wakes(AtomicUsize);

    impl Wake for Wakes {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn context() -> (Arc<Wakes>, Waker) {
        let wakes = Arc::new(Wakes::default());
        (wakes.clone(), Waker::from(wakes))
    }

    fn write(io: &mut Coalesced<Mock>, cx: &mut Context<'_>, bytes: &[u8]) -> Poll<usize> {
        Pin::new(io).poll_write(cx, bytes).map(|r| r.unwrap())
    }

    fn bytes(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    /// docs/PERFORMANCE.md (and the notes it is made from) state the cap: it must be the code's.
    #[test]
    fn the_performance_notes_state_the_cap() {
        let says = format!("gathered (up to {} KiB", CAP / 1024);
        for doc in [
            include_str!("../../../docs/PERFORMANCE.md"),
            include_str!("../../../loadtest/perf-notes.md"),
        ] {
            assert!(doc.replace('\n', " ").contains(&says), "{says:?}");
        }
    }

    #[test]
    fn writes_land_in_order_in_one_write_per_drain() {
        let mock = Mock::default();
        let (mut io, writer) = coalesce(mock.clone());
        let (_, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        let mut expected = Vec::new();
        for i in 0..20u8 {
            let frame = bytes(1_600, i);
            // As h2 writes a chained frame: its buffer (the head), then the payload.
            let bufs = [IoSlice::new(&frame[..9]), IoSlice::new(&frame[9..])];
            let n = Pin::new(&mut io).poll_write_vectored(cx, &bufs);
            assert!(matches!(n, Poll::Ready(Ok(1_600))));
            assert!(Pin::new(&mut io).poll_flush(cx).is_ready());
            expected.extend_from_slice(&frame);
        }
        assert_eq!(
            mock.0.borrow().writes,
            0,
            "nothing written before the drain"
        );
        assert!(writer.poll_drain(cx).is_ready());
        assert_eq!(mock.taken(), expected);
        assert_eq!((writer.writes(), mock.0.borrow().writes), (1, 1));
        // Drained, the buffer holds no memory.
        assert_eq!(writer.0.borrow().buf.capacity(), 0);
        assert!(writer.poll_drain(cx).is_ready());
        assert_eq!(writer.writes(), 1, "nothing buffered, nothing written");
    }

    #[test]
    fn past_the_cap_the_buffer_goes_out_with_the_write() {
        let mock = Mock::default();
        let (mut io, writer) = coalesce(mock.clone());
        let (_, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        let (a, b, c) = (bytes(30_000, 1), bytes(30_000, 2), bytes(30_000, 3));
        assert_eq!(write(&mut io, cx, &a), Poll::Ready(30_000));
        assert_eq!(write(&mut io, cx, &b), Poll::Ready(30_000));
        assert_eq!(writer.writes(), 0);
        // 90 000 bytes pass the cap: one writev of the buffer and the new bytes.
        assert_eq!(write(&mut io, cx, &c), Poll::Ready(30_000));
        assert_eq!(writer.writes(), 1);
        assert_eq!(writer.buffered(), 0);
        // A big write goes straight out too.
        let big = bytes(1 << 20, 4);
        assert_eq!(write(&mut io, cx, &big), Poll::Ready(1 << 20));
        assert_eq!(writer.writes(), 2);
        assert_eq!(mock.taken(), [a, b, c, big].concat());
    }

    #[test]
    fn a_full_socket_holds_writes_at_the_cap_and_loses_nothing() {
        let mock = Mock::default();
        mock.with(|s| s.full = true);
        let (mut io, writer) = coalesce(mock.clone());
        let (wakes, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        let data = bytes(100_000, 5);
        let mut accepted = 0;
        while let Poll::Ready(n) = write(&mut io, cx, &data[accepted..]) {
            accepted += n;
        }
        assert_eq!(accepted, CAP, "takes bytes up to the cap, then Pending");
        assert_eq!(writer.buffered(), CAP);
        assert!(writer.poll_drain(cx).is_pending());
        assert_eq!(wakes.0.load(Ordering::SeqCst), 0);
        // Room again: the socket wakes the task, and the drain writes a few bytes at a time.
        mock.with(|s| s.per_call = Some(7_000));
        mock.unblock();
        assert_eq!(wakes.0.load(Ordering::SeqCst), 1);
        assert!(writer.poll_drain(cx).is_ready());
        assert_eq!(writer.buffered(), 0);
        while accepted < data.len() {
            accepted += match write(&mut io, cx, &data[accepted..]) {
                Poll::Ready(n) => n,
                Poll::Pending => panic!("the socket has room"),
            };
        }
        assert!(writer.poll_drain(cx).is_ready());
        assert_eq!(mock.taken(), data);
    }

    #[test]
    fn a_write_error_is_kept_and_ends_the_connection() {
        let mock = Mock::default();
        let (mut io, writer) = coalesce(mock.clone());
        let (_, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        assert_eq!(write(&mut io, cx, b"frame"), Poll::Ready(5));
        mock.with(|s| s.fail = Some(io::ErrorKind::BrokenPipe));
        // Met while draining after hyper's poll: the connection ends with it...
        let mut conn = std::pin::pin!(std::future::pending::<Result<(), io::Error>>());
        let ended = Pin::new(&mut writer.drained(conn.as_mut())).poll(cx);
        match ended {
            Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
            other => panic!("{other:?}"),
        }
        // ...and hyper's next write, flush or shutdown gets it too, even with the socket back.
        mock.with(|s| s.fail = None);
        for result in [
            Pin::new(&mut io)
                .poll_write(cx, b"more")
                .map(|r| r.map(|_| ())),
            Pin::new(&mut io).poll_flush(cx),
            Pin::new(&mut io).poll_shutdown(cx),
        ] {
            match result {
                Poll::Ready(Err(e)) => assert_eq!(e.kind(), io::ErrorKind::BrokenPipe),
                other => panic!("{other:?}"),
            }
        }
        assert!(mock.taken().is_empty());
        assert!(!mock.0.borrow().shut);
    }

    #[test]
    fn shutdown_writes_out_what_is_buffered_first() {
        let mock = Mock::default();
        mock.with(|s| s.full = true);
        let (mut io, _writer) = coalesce(mock.clone());
        let (_, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        assert_eq!(write(&mut io, cx, b"GOAWAY"), Poll::Ready(6));
        assert!(Pin::new(&mut io).poll_shutdown(cx).is_pending());
        assert!(!mock.0.borrow().shut, "not shut with bytes buffered");
        mock.unblock();
        assert!(matches!(
            Pin::new(&mut io).poll_shutdown(cx),
            Poll::Ready(Ok(()))
        ));
        assert_eq!(mock.taken(), b"GOAWAY");
        assert!(mock.0.borrow().shut);
    }

    #[test]
    fn the_connection_is_polled_then_drained() {
        let mock = Mock::default();
        let (io, writer) = coalesce(mock.clone());
        let (_, waker) = context();
        let cx = &mut Context::from_waker(&waker);
        let io = RefCell::new(io);
        // A connection that writes two frames per poll and never ends.
        let mut conn = std::pin::pin!(std::future::poll_fn(|cx| {
            let mut io = io.borrow_mut();
            for frame in [&b"one"[..], b"two"] {
                assert!(Pin::new(&mut *io).poll_write(cx, frame).is_ready());
            }
            Poll::<Result<(), io::Error>>::Pending
        }));
        for _ in 0..3 {
            assert!(Pin::new(&mut writer.drained(conn.as_mut()))
                .poll(cx)
                .is_pending());
        }
        assert_eq!(mock.taken(), b"onetwoonetwoonetwo");
        assert_eq!(mock.0.borrow().writes, 3, "one write per poll");
    }
}
