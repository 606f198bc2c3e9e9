//! Hostile and careless clients (issue 12): connection deadlines, caps and accept back-off,
//! against the real binary with short deadlines.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;
use denokv::proto as pb;
use prost::Message;

/// The metric line `name{labels} value` of a scrape, as a number (0 when absent).
fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, _, body) = s.scrape();
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).unwrap();
    stream.set_nodelay(true).unwrap();
    stream
}

/// Connects from the loopback address `from` (127.0.0.2, say).
fn connect_from(from: &str, addr: SocketAddr) -> TcpStream {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let local: SocketAddr = format!("{from}:0").parse().unwrap();
    socket.bind(&local.into()).unwrap();
    socket.connect(&addr.into()).unwrap();
    socket.into()
}

/// Reads (and discards) until the server closes the connection; how long that took. Panics
/// if it is still open after `limit`.
fn time_to_close(stream: &mut TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    loop {
        let left = limit.saturating_sub(start.elapsed());
        assert!(!left.is_zero(), "still open after {limit:?}");
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                panic!("still open after {limit:?}")
            }
            Err(e) => panic!("read failed: {e}"),
        }
    }
}

/// A complete HTTP/1.1 request that keeps the connection open.
const GET: &[u8] = b"GET /nothing-here HTTP/1.1\r\nHost: x\r\n\r\n";

/// Sends `GET` and reads the answer's head and body (by Content-Length); the status.
fn get(stream: &mut TcpStream) -> u16 {
    stream.write_all(GET).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = stream.read(&mut buf).expect("an answer");
        assert!(n > 0, "closed before answering");
        raw.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&raw).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length: usize = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse().unwrap())
                })
                .unwrap_or(0);
            if body.len() >= length {
                return head.split(' ').nth(1).unwrap().parse().unwrap();
            }
        }
    }
}

fn watch_body() -> Vec<u8> {
    pb::Watch {
        keys: vec![pb::WatchKey { key: key("w") }],
    }
    .encode_to_vec()
}

/// Opens an HTTP/1.1 watch stream and reads its response head.
fn open_h1_watch(addr: SocketAddr) -> TcpStream {
    let mut stream = connect(addr);
    let body = watch_body();
    let head = format!(
        "POST /v2/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\
         x-denokv-version: 3\r\nx-denokv-database-id: {NIL_ID}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).unwrap();
    stream.write_all(&body).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).unwrap();
    let text = String::from_utf8_lossy(&buf[..n]);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    // Drops the first frames (the current values), so that a later read sees new ones.
    stream
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
    stream
}

/// Short deadlines: first byte 1 s, head 2 s, idle 2 s.
fn quick_server(extra: &[&str]) -> Server {
    let mut args = vec![
        "--first-byte-timeout",
        "1",
        "--head-timeout",
        "2",
        "--idle-timeout",
        "2",
    ];
    args.extend_from_slice(extra);
    Server::start(&args)
}

#[test]
fn a_silent_connection_is_closed_after_the_first_byte_deadline() {
    let s = quick_server(&[]);
    let mut silent = connect(s.addr);
    let took = time_to_close(&mut silent, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(900), "closed after {took:?}");
    assert!(took < Duration::from_millis(1900), "closed after {took:?}");
    assert_eq!(
        metric(
            &s,
            "denokv_connections_closed_total{reason=\"first_byte_timeout\"}"
        ),
        1.0
    );
}

#[test]
fn a_partial_head_or_a_bare_h2_preface_is_closed_after_the_head_deadline() {
    let s = quick_server(&[]);
    // HTTP/1.1: half a head, sent after half a second (past the first-byte deadline by then
    // would need 1 s: the head deadline, 2 s from the first byte, is what closes it).
    let mut h1 = connect(s.addr);
    std::thread::sleep(Duration::from_millis(500));
    h1.write_all(b"POST /v2/snapshot_read HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    let took = time_to_close(&mut h1, Duration::from_secs(6));
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    assert!(took < Duration::from_millis(3000), "closed after {took:?}");
    // The same on a keep-alive connection after a complete request.
    let mut again = connect(s.addr);
    assert_eq!(get(&mut again), 404);
    again.write_all(b"GET /nothing-here HTTP/1.1\r\n").unwrap();
    let took = time_to_close(&mut again, Duration::from_secs(6));
    assert!(took < Duration::from_millis(2900), "closed after {took:?}");
    // h2: the preface and nothing more.
    let mut h2 = connect(s.addr);
    h2.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    let took = time_to_close(&mut h2, Duration::from_secs(6));
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    assert!(took < Duration::from_millis(3000), "closed after {took:?}");
    assert_eq!(
        metric(
            &s,
            "denokv_connections_closed_total{reason=\"head_timeout\"}"
        ),
        3.0
    );
}

#[test]
fn an_idle_connection_is_closed_but_one_with_a_watch_stream_is_not() {
    let s = quick_server(&[]);
    let mut watching = open_h1_watch(s.addr);
    let mut idle = connect(s.addr);
    assert_eq!(get(&mut idle), 404);
    let took = time_to_close(&mut idle, Duration::from_secs(5));
    assert!(took >= Duration::from_millis(1900), "closed after {took:?}");
    // Well past the idle timeout, the watch stream is still open (and still streams).
    std::thread::sleep(Duration::from_secs(2));
    let c = tokio_rt();
    c.block_on(async {
        let client = Client::new();
        let r = set_key(&client, Proto::H2, &s.url(""), "w", "new")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    });
    watching
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = watching.read(&mut buf).expect("the watch stream is open");
    assert!(n > 0, "the watch stream was closed");
    assert_eq!(
        metric(
            &s,
            "denokv_connections_closed_total{reason=\"idle_timeout\"}"
        ),
        1.0
    );
}

fn tokio_rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

#[test]
fn caps_refuse_the_next_connection_and_count_it() {
    let s = Server::start(&["--max-connections", "3", "--max-connections-per-ip", "2"]);
    let per_ip = "denokv_connections_refused_total{reason=\"max_connections_per_ip\"}";
    let total = "denokv_connections_refused_total{reason=\"max_connections\"}";
    let mut first = connect(s.addr);
    let mut second = connect(s.addr);
    assert_eq!(get(&mut first), 404);
    assert_eq!(get(&mut second), 404);
    // A third from 127.0.0.1: closed at once.
    let mut third = connect(s.addr);
    let took = time_to_close(&mut third, Duration::from_secs(2));
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    assert_eq!(metric(&s, per_ip), 1.0);
    // Another address still gets in, up to the total cap.
    let mut other = connect_from("127.0.0.2", s.addr);
    assert_eq!(get(&mut other), 404);
    let mut fourth = connect_from("127.0.0.2", s.addr);
    let took = time_to_close(&mut fourth, Duration::from_secs(2));
    assert!(took < Duration::from_millis(500), "closed after {took:?}");
    assert_eq!(metric(&s, total), 1.0);
    // The connections let in keep working, and a closed one frees its place.
    assert_eq!(get(&mut first), 404);
    drop(second);
    let start = Instant::now();
    loop {
        let mut again = connect(s.addr);
        again.write_all(GET).unwrap();
        again
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut buf = [0u8; 16];
        if matches!(again.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no place freed");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// h2 frames by hand: a client that ignores the server's SETTINGS_MAX_CONCURRENT_STREAMS.
mod h2_raw {
    use std::io::{Read, Write};
    use std::net::TcpStream;

    pub const DATA: u8 = 0;
    pub const HEADERS: u8 = 1;
    pub const RST_STREAM: u8 = 3;
    pub const SETTINGS: u8 = 4;
    pub const PING: u8 = 6;
    pub const GOAWAY: u8 = 7;

    pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len() as u32;
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    /// HPACK literal header fields without indexing, plain strings (all shorter than 127).
    pub fn headers(fields: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, value) in fields {
            out.push(0);
            out.push(name.len() as u8);
            out.extend_from_slice(name.as_bytes());
            out.push(value.len() as u8);
            out.extend_from_slice(value.as_bytes());
        }
        out
    }

    /// The next frame: type, flags, stream id, payload.
    pub fn read(stream: &mut TcpStream) -> (u8, u8, u32, Vec<u8>) {
        let mut head = [0u8; 9];
        stream.read_exact(&mut head).expect("a frame");
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let id = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        let mut payload = vec![0u8; len];
        stream.read_exact(&mut payload).unwrap();
        if head[3] == SETTINGS && head[4] & 1 == 0 {
            stream.write_all(&frame(SETTINGS, 1, 0, &[])).unwrap();
        }
        (head[3], head[4], id, payload)
    }
}

/// Connects and exchanges the h2 preface and SETTINGS by hand.
fn h2_handshake(addr: SocketAddr) -> TcpStream {
    use h2_raw::*;
    let mut c = connect(addr);
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    c.write_all(&frame(SETTINGS, 0, 0, &[])).unwrap();
    // Until the server's SETTINGS (acknowledged by `read`) and its ACK of ours.
    let mut acked = false;
    let mut settings = false;
    while !(acked && settings) {
        let (kind, flags, _, _) = read(&mut c);
        if kind == SETTINGS {
            if flags & 1 == 1 {
                acked = true;
            } else {
                settings = true;
            }
        }
    }
    c
}

/// Opens a watch stream on h2 stream `id` (HEADERS and DATA, by hand).
fn h2_open_watch(c: &mut TcpStream, id: u32) {
    use h2_raw::*;
    let auth = format!("Bearer {TOKEN}");
    let body = watch_body();
    let length = body.len().to_string();
    let block = headers(&[
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v2/watch"),
        (":authority", "x"),
        ("authorization", &auth),
        ("x-denokv-version", "3"),
        ("x-denokv-database-id", NIL_ID),
        ("content-length", &length),
    ]);
    c.write_all(&frame(HEADERS, 0x4, id, &block)).unwrap();
    c.write_all(&frame(DATA, 0x1, id, &body)).unwrap();
}

#[test]
fn h2_streams_past_the_cap_are_refused_and_the_connection_goes_on() {
    use h2_raw::*;
    let s = Server::start(&["--max-h2-streams", "2"]);
    let mut c = h2_handshake(s.addr);
    let open = h2_open_watch;
    // Two watch streams stay open; the third is refused.
    for id in [1, 3, 5] {
        open(&mut c, id);
    }
    let mut answered = Vec::new();
    let refused = loop {
        let (kind, _, id, payload) = read(&mut c);
        match kind {
            HEADERS => answered.push(id),
            RST_STREAM => break (id, u32::from_be_bytes(payload[..4].try_into().unwrap())),
            _ => {}
        }
    };
    assert_eq!(refused, (5, 7), "stream 5 gets REFUSED_STREAM (7)");
    // Counted once the server sees its write of the frame complete (with io_uring, possibly
    // after the client has read it).
    let counted = "denokv_requests_refused_total{reason=\"max_h2_streams\"}";
    let start = Instant::now();
    while metric(&s, counted) != 1.0 {
        assert!(start.elapsed() < Duration::from_secs(2), "not counted");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The client goes on: it cancels one watch and opens another, which is answered.
    c.write_all(&frame(RST_STREAM, 0, 1, &8u32.to_be_bytes()))
        .unwrap();
    open(&mut c, 7);
    loop {
        let (kind, _, id, _) = read(&mut c);
        if id == 7 {
            assert_eq!(kind, HEADERS, "stream 7 is answered");
            break;
        }
    }
}

#[test]
fn h2_keep_alive_pings_close_a_peer_that_stops_answering_them() {
    use h2_raw::*;
    // Pings every second, each answered within a second; no idle timeout while a watch is open.
    let s = quick_server(&[
        "--h2-keepalive-interval",
        "1",
        "--h2-keepalive-timeout",
        "1",
    ]);
    let mut c = h2_handshake(s.addr);
    h2_open_watch(&mut c, 1);
    // A live peer: every ping answered for 4 s, and the connection stays open.
    let start = Instant::now();
    let mut pings = 0;
    while start.elapsed() < Duration::from_secs(4) {
        let (kind, flags, _, payload) = read(&mut c);
        assert_ne!(kind, GOAWAY, "closed although every ping was answered");
        if kind == PING && flags & 1 == 0 {
            pings += 1;
            c.write_all(&frame(PING, 1, 0, &payload)).unwrap();
        }
    }
    assert!(pings >= 2, "{pings} pings in 4 s");
    // A dead peer: it reads but answers nothing (a vanished peer's kernel would not even
    // read). The next ping goes unanswered, and the connection is closed.
    let dead = Instant::now();
    let mut unanswered = 0;
    let mut buf = [0u8; 9];
    loop {
        match c.read_exact(&mut buf) {
            Ok(()) => {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                let mut payload = vec![0u8; len];
                if c.read_exact(&mut payload).is_err() {
                    break;
                }
                if buf[3] == PING && buf[4] & 1 == 0 {
                    unanswered += 1;
                }
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        ErrorKind::UnexpectedEof | ErrorKind::ConnectionReset
                    ),
                    "{e}"
                );
                break;
            }
        }
        assert!(dead.elapsed() < Duration::from_secs(5), "still open");
    }
    let took = dead.elapsed();
    assert!(unanswered >= 1, "closed before a ping went unanswered");
    assert!(took < Duration::from_secs(4), "closed after {took:?}");
}

#[test]
fn out_of_descriptors_accept_backs_off_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--threads", "1", "--first-byte-timeout", "60"])
        .wrapper(&["prlimit", "--nofile=64:64"], false)
        .start();
    let mut existing = connect(s.addr);
    assert_eq!(get(&mut existing), 404);
    // More connections than descriptors: the last ones wait in the backlog.
    let mut extra = Vec::new();
    for _ in 0..80 {
        let mut c = connect(s.addr);
        c.write_all(GET).unwrap();
        extra.push(c);
    }
    s.wait_for_log("accept failed", Duration::from_secs(5));
    // Two seconds out of descriptors (the old loop warned every 50 ms: 40 lines).
    std::thread::sleep(Duration::from_secs(2));
    let warnings = s.log_text().matches("accept failed").count();
    assert!(
        warnings <= 2,
        "{warnings} accept warnings:\n{}",
        s.log_text()
    );
    assert_eq!(get(&mut existing), 404, "an open connection keeps working");
    drop(extra);
    let start = Instant::now();
    loop {
        let mut c = connect(s.addr);
        c.write_all(GET).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut buf = [0u8; 16];
        if matches!(c.read(&mut buf), Ok(n) if n > 0) {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no new connection served after the extra ones closed; log:\n{}",
            s.log_text()
        );
    }
    s.wait_for_log("accept works again", Duration::from_secs(5));
    assert!(metric(&s, "denokv_accept_errors_total") > 0.0);
}
