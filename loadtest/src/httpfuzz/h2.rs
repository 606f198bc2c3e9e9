//! HTTP/2 over cleartext: mutated requests through a real client (hyper), and raw frames
//! written by hand and mutated at the frame and HPACK level, with the answers' `:status`
//! decoded from the frames that come back.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rand::rngs::StdRng;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::request::Req;
use super::Exchange;

pub type Sender = http2::SendRequest<Full<Bytes>>;

/// Dials an h2c connection (prior knowledge, as Deno does).
pub async fn dial(addr: SocketAddr) -> Result<Sender, String> {
    let tcp = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The request as the h2 client sends it; `None` when the client cannot express it (a method,
/// path or header the `http` types refuse: those are for the raw modes).
pub fn build(req: &Req, addr: SocketAddr) -> Option<Request<Full<Bytes>>> {
    let method = Method::from_bytes(&req.method).ok()?;
    let path = std::str::from_utf8(&req.path).ok()?;
    let uri = if path.starts_with('/') {
        format!("http://{addr}{path}")
    } else {
        path.to_string()
    };
    let mut r = Request::builder().method(method).uri(uri);
    for (name, value) in &req.headers {
        let name = HeaderName::from_bytes(name).ok()?;
        let value = HeaderValue::from_bytes(value).ok()?;
        r = r.header(name, value);
    }
    if let super::request::Framing::LengthValue(values) = &req.framing {
        for v in values {
            r = r.header("content-length", HeaderValue::from_bytes(v).ok()?);
        }
    }
    r.body(Full::new(Bytes::from(req.body.clone()))).ok()
}

/// Sends one request on `conn` (dialled if missing or closed) and reads the whole answer.
pub async fn exchange(
    conn: &mut Option<Sender>,
    addr: SocketAddr,
    request: Request<Full<Bytes>>,
    hang: Duration,
) -> Exchange {
    let mut ex = Exchange::default();
    if conn.as_ref().is_none_or(|c| c.is_closed()) {
        match dial(addr).await {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                ex.connect_failed = Some(e);
                return ex;
            }
        }
    }
    let sender = conn.as_mut().expect("dialled above");
    let answer = tokio::time::timeout(hang, async {
        if sender.ready().await.is_err() {
            return Err(true);
        }
        let resp = sender.send_request(request).await.map_err(|_| false)?;
        let status = resp.status().as_u16();
        // A watch stream (its content type) does not end: its start is the answer.
        let stream = resp
            .headers()
            .get("content-type")
            .is_some_and(|v| v == "application/octet-stream");
        if stream && status == 200 {
            return Ok((status, true));
        }
        resp.into_body().collect().await.map_err(|_| false)?;
        Ok((status, false))
    })
    .await;
    match answer {
        Ok(Ok((status, stream))) => {
            ex.statuses.push(status);
            ex.stream = stream;
        }
        // The connection was gone before the request: not sent, dial again next time.
        Ok(Err(true)) => {
            *conn = None;
            ex.closed = true;
        }
        // A reset stream or a closed connection (GOAWAY): answered that way.
        Ok(Err(false)) => {
            ex.reset = true;
            if conn.as_ref().is_some_and(|c| c.is_closed()) {
                *conn = None;
            }
        }
        Err(_) => {
            ex.hang = Some(format!("no complete answer within {hang:?}"));
            *conn = None;
        }
    }
    ex
}

// ---- Raw frames ----

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0;
const HEADERS: u8 = 1;
const PRIORITY: u8 = 2;
const RST_STREAM: u8 = 3;
const SETTINGS: u8 = 4;
const PUSH_PROMISE: u8 = 5;
const PING: u8 = 6;
const GOAWAY: u8 = 7;
const WINDOW_UPDATE: u8 = 8;
const CONTINUATION: u8 = 9;
const END_STREAM: u8 = 0x1;
/// The largest frame payload a peer must accept (RFC 9113 §4.2).
const MAX_FRAME: usize = 16_384;
const ACK: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;

#[derive(Clone, Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
    /// Written as the length instead of the payload's (a lie).
    length: Option<u32>,
}

impl Frame {
    fn new(kind: u8, flags: u8, stream: u32, payload: Vec<u8>) -> Frame {
        Frame {
            kind,
            flags,
            stream,
            payload,
            length: None,
        }
    }

    fn write(&self, out: &mut Vec<u8>) {
        let len = self.length.unwrap_or(self.payload.len() as u32);
        out.extend_from_slice(&len.to_be_bytes()[1..]);
        out.push(self.kind);
        out.push(self.flags);
        out.extend_from_slice(&self.stream.to_be_bytes());
        out.extend_from_slice(&self.payload);
    }
}

/// An HPACK integer with an `n`-bit prefix; `first` holds the bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut value: u64) {
    let max = (1u64 << n) - 1;
    if value < max {
        out.push(first | value as u8);
        return;
    }
    out.push(first | max as u8);
    value -= max;
    while value >= 128 {
        out.push((value % 128) as u8 | 0x80);
        value /= 128;
    }
    out.push(value as u8);
}

/// A literal header field without indexing: a static name index when there is one.
fn hpack_field(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    let index = match name {
        b":authority" => 1,
        b":method" => 2,
        b":path" => 4,
        b":scheme" => 6,
        b"authorization" => 23,
        b"content-length" => 28,
        b"content-type" => 31,
        b"user-agent" => 58,
        _ => 0,
    };
    hpack_int(out, 0x00, 4, index);
    if index == 0 {
        hpack_int(out, 0x00, 7, name.len() as u64);
        out.extend_from_slice(name);
    }
    hpack_int(out, 0x00, 7, value.len() as u64);
    out.extend_from_slice(value);
}

fn header_block(req: &Req, rng: &mut StdRng) -> Vec<u8> {
    let mut fields: Vec<(Vec<u8>, Vec<u8>)> = vec![
        (b":method".to_vec(), req.method.clone()),
        (b":scheme".to_vec(), b"http".to_vec()),
        (b":authority".to_vec(), b"127.0.0.1".to_vec()),
        (b":path".to_vec(), req.path.clone()),
    ];
    for (n, v) in &req.headers {
        fields.push((n.clone(), v.clone()));
    }
    if let super::request::Framing::LengthValue(values) = &req.framing {
        for v in values {
            fields.push((b"content-length".to_vec(), v.clone()));
        }
    }
    match rng.random_range(0..24) {
        // Pseudo-headers wrong: missing, repeated, after a regular one, unknown, a response's.
        0 => {
            fields.remove(rng.random_range(0..4));
        }
        1 => {
            let i = rng.random_range(0..4);
            let f = fields[i].clone();
            fields.push(f);
        }
        2 => fields.push((b":foo".to_vec(), b"bar".to_vec())),
        3 => fields.insert(1, (b":status".to_vec(), b"200".to_vec())),
        4 => fields.push((b"connection".to_vec(), b"keep-alive".to_vec())),
        5 => fields.push((b"Upper-Case".to_vec(), b"x".to_vec())),
        _ => {}
    }
    let mut block = Vec::new();
    if rng.random_ratio(1, 12) {
        // Odd representations: a table size update past the limit, an index out of range,
        // an indexed field with index 0, a Huffman flag on raw bytes, a huge integer.
        match rng.random_range(0..5) {
            0 => hpack_int(&mut block, 0x20, 5, 1 << 20),
            1 => hpack_int(&mut block, 0x80, 7, rng.random_range(62..100_000)),
            2 => block.push(0x80),
            3 => block.extend_from_slice(&[0x00, 0x85, b'a', b'b', b'c', b'd', b'e', 0x01, b'x']),
            _ => block.extend_from_slice(&[0x3f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]),
        }
    }
    for (n, v) in &fields {
        hpack_field(&mut block, n, v);
    }
    block
}

/// The frames of one connection: preface, SETTINGS (dynamic table off, so that `:status`
/// can be read without a table), then 1–3 requests, mutated at the frame level.
pub fn frames(reqs: &[Req], rng: &mut StdRng) -> Vec<u8> {
    let mut fs = vec![Frame::new(
        SETTINGS,
        0,
        0,
        vec![0, 1, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0],
    )];
    for (i, req) in reqs.iter().enumerate() {
        let stream = 1 + 2 * i as u32;
        let block = header_block(req, rng);
        let end = if req.body.is_empty() { END_STREAM } else { 0 };
        // Frames of at most 16 KiB (the default SETTINGS_MAX_FRAME_SIZE): a long block
        // continues in CONTINUATION frames, and now and then a short one too.
        let size = if rng.random_ratio(1, 8) {
            rng.random_range(1..=block.len().clamp(1, MAX_FRAME))
        } else {
            MAX_FRAME
        };
        let pieces: Vec<&[u8]> = block.chunks(size).collect();
        for (j, piece) in pieces.iter().enumerate() {
            let last = if j + 1 == pieces.len() {
                END_HEADERS
            } else {
                0
            };
            let (kind, flags) = if j == 0 {
                (HEADERS, end | last)
            } else {
                (CONTINUATION, last)
            };
            fs.push(Frame::new(kind, flags, stream, piece.to_vec()));
        }
        if !req.body.is_empty() {
            let pieces = rng.random_range(1..=3usize).min(req.body.len());
            let size = req.body.len().div_ceil(pieces).min(MAX_FRAME);
            let chunks: Vec<&[u8]> = req.body.chunks(size).collect();
            for (j, c) in chunks.iter().enumerate() {
                let flags = if j + 1 == chunks.len() { END_STREAM } else { 0 };
                fs.push(Frame::new(DATA, flags, stream, c.to_vec()));
            }
        }
    }
    if rng.random_ratio(1, 3) {
        for _ in 0..rng.random_range(1..=2) {
            mutate_frames(&mut fs, rng);
        }
    }
    let mut out = PREFACE.to_vec();
    if rng.random_ratio(1, 30) {
        // A damaged preface: the server must tell h2 from HTTP/1.1 and refuse both.
        let i = rng.random_range(0..out.len());
        out[i] ^= 1 << rng.random_range(0..8);
    }
    for f in &fs {
        f.write(&mut out);
    }
    if rng.random_ratio(1, 20) {
        super::h1::mutate_bytes(&mut out, rng);
    }
    out
}

fn mutate_frames(fs: &mut Vec<Frame>, rng: &mut StdRng) {
    let n = fs.len();
    let i = rng.random_range(0..n);
    match rng.random_range(0..12) {
        0 => fs[i].flags ^= 1 << rng.random_range(0..8),
        1 => {
            fs[i].stream = *[0, 2, 3, 0x7fff_ffff, 0x8000_0001, 1]
                .get(rng.random_range(0..6))
                .unwrap()
        }
        2 => fs[i].kind = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xfa][rng.random_range(0..12)],
        3 => {
            let len = fs[i].payload.len() as u32;
            fs[i].length = Some(match rng.random_range(0..4) {
                0 => len + rng.random_range(1..20),
                1 => len.saturating_sub(rng.random_range(1..5)),
                2 => 0xff_ffff,
                _ => 0,
            });
        }
        4 => {
            fs.remove(i);
        }
        5 => {
            let f = fs[i].clone();
            fs.insert(i, f);
        }
        6 => {
            let j = rng.random_range(0..n);
            fs.swap(i, j);
        }
        7 => {
            // Padding, maybe longer than the frame.
            let f = &mut fs[i];
            if f.kind == DATA || f.kind == HEADERS {
                f.flags |= PADDED;
                let pad = rng.random_range(0..=255u8);
                let mut p = vec![pad];
                p.extend_from_slice(&f.payload);
                if rng.random_bool(0.5) {
                    p.extend(std::iter::repeat_n(0, pad as usize));
                }
                f.payload = p;
            }
        }
        8 if !fs[i].payload.is_empty() => {
            let f = &mut fs[i];
            let j = rng.random_range(0..f.payload.len());
            f.payload[j] ^= 1 << rng.random_range(0..8);
        }
        _ => {
            // A frame of another kind, good or bad, anywhere.
            let stream = [0u32, 1, 3, 5][rng.random_range(0..4)];
            let f = match rng.random_range(0..10) {
                0 => Frame::new(PING, 0, 0, vec![0; [8, 8, 7, 0][rng.random_range(0..4)]]),
                1 => Frame::new(
                    WINDOW_UPDATE,
                    0,
                    stream,
                    [0u32, 1, 0x7fff_ffff, 0xffff_ffff][rng.random_range(0..4)]
                        .to_be_bytes()
                        .to_vec(),
                ),
                2 => Frame::new(PRIORITY, 0, 1, vec![0, 0, 0, 1, 16]),
                3 => Frame::new(RST_STREAM, 0, stream, vec![0, 0, 0, 8]),
                4 => {
                    let (id, value): (u16, u32) = [
                        (2, 2),
                        (4, 0x8000_0000),
                        (5, 1),
                        (5, 0x0100_0000),
                        (3, 0),
                        (0x99, 7),
                        (1, u32::MAX),
                        (6, 0),
                    ][rng.random_range(0..8)];
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(&value.to_be_bytes());
                    Frame::new(SETTINGS, 0, 0, p)
                }
                5 => Frame::new(SETTINGS, ACK, 0, vec![0; rng.random_range(0..7)]),
                6 => Frame::new(GOAWAY, 0, 0, vec![0, 0, 0, 1, 0, 0, 0, 0]),
                7 => Frame::new(CONTINUATION, END_HEADERS, stream, vec![0x82]),
                8 => Frame::new(PUSH_PROMISE, END_HEADERS, 1, vec![0, 0, 0, 2, 0x82]),
                _ => Frame::new(DATA, END_STREAM, stream, b"xyz".to_vec()),
            };
            fs.insert(rng.random_range(0..=n), f);
        }
    }
}

/// The stream ids a frame sequence opens (odd ids of its HEADERS frames).
fn opened(bytes: &[u8]) -> Vec<u32> {
    let mut ids = Vec::new();
    let mut at = PREFACE.len();
    while at + 9 <= bytes.len() {
        let len = u32::from_be_bytes([0, bytes[at], bytes[at + 1], bytes[at + 2]]) as usize;
        let stream = u32::from_be_bytes(bytes[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        if bytes[at + 3] == HEADERS && stream % 2 == 1 && !ids.contains(&stream) {
            ids.push(stream);
        }
        at += 9 + len;
    }
    ids
}

/// Sends raw frames on a new connection and reads the server's frames until every stream
/// opened is answered or reset, the server closes, or `hang` passes. SETTINGS and PINGs are
/// acknowledged; the sending side is shut after a quiet second, so that a stream the
/// mutation left open ends.
pub async fn frames_exchange(addr: SocketAddr, bytes: &[u8], hang: Duration) -> Exchange {
    let mut ex = Exchange::default();
    let mut s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            ex.connect_failed = Some(e.to_string());
            return ex;
        }
    };
    let _ = s.set_nodelay(true);
    let mut open = opened(bytes);
    let write = tokio::time::timeout(hang, s.write_all(bytes)).await;
    if !matches!(write, Ok(Ok(()))) {
        // The server closed (or reset) while we wrote: read what it said before.
    }
    let deadline = Instant::now() + hang;
    let quiet_until = Instant::now() + Duration::from_secs(1);
    let mut shut = false;
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 32 * 1024];
    let mut h1 = false;
    loop {
        if open.is_empty() && ex.statuses.len() + ex.resets as usize > 0 {
            break;
        }
        if !shut && Instant::now() >= quiet_until {
            let _ = s.shutdown().await;
            shut = true;
        }
        let wake = if shut {
            deadline
        } else {
            quiet_until.min(deadline)
        };
        match tokio::time::timeout_at(wake, s.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                ex.closed = true;
                break;
            }
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.starts_with(b"HTTP/1.") {
                    // A damaged preface read as HTTP/1.1: an HTTP/1.1 answer.
                    h1 = true;
                    continue;
                }
                let replies = read_frames(&mut buf, &mut open, &mut ex);
                if !replies.is_empty() && !shut {
                    let _ = s.write_all(&replies).await;
                }
            }
            Ok(Err(_)) => {
                ex.reset = true;
                break;
            }
            Err(_) if Instant::now() >= deadline => {
                ex.hang = Some(format!(
                    "streams {open:?} neither answered nor reset, and the connection not \
                     closed, within {hang:?}"
                ));
                break;
            }
            Err(_) => {}
        }
    }
    if h1 {
        let line = buf.split(|&b| b == b'\n').next().unwrap_or_default();
        if let Some(code) = line
            .get(9..12)
            .and_then(|c| std::str::from_utf8(c).ok()?.parse().ok())
        {
            ex.statuses.push(code);
        }
    }
    ex
}

/// Consumes the complete frames in `buf`: statuses and resets into `ex`, answered streams
/// out of `open`. Returns the acknowledgements to send.
fn read_frames(buf: &mut Vec<u8>, open: &mut Vec<u32>, ex: &mut Exchange) -> Vec<u8> {
    let mut replies = Vec::new();
    let mut at = 0;
    while at + 9 <= buf.len() {
        let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
        if at + 9 + len > buf.len() {
            break;
        }
        let (kind, flags) = (buf[at + 3], buf[at + 4]);
        let stream = u32::from_be_bytes(buf[at + 5..at + 9].try_into().unwrap()) & 0x7fff_ffff;
        let payload = &buf[at + 9..at + 9 + len];
        match kind {
            HEADERS => {
                let mut block = payload;
                if flags & PADDED != 0 && !block.is_empty() {
                    let pad = block[0] as usize;
                    block = &block[1..block.len().saturating_sub(pad).max(1)];
                }
                if flags & 0x20 != 0 && block.len() >= 5 {
                    block = &block[5..];
                }
                match status_of(block) {
                    Some(code) => ex.statuses.push(code),
                    None => ex.unknown_status += 1,
                }
                open.retain(|&s| s != stream);
            }
            RST_STREAM => {
                ex.resets += 1;
                open.retain(|&s| s != stream);
            }
            GOAWAY if payload.len() >= 4 => {
                let last = u32::from_be_bytes(payload[..4].try_into().unwrap()) & 0x7fff_ffff;
                ex.goaway = payload
                    .get(4..8)
                    .map(|c| u32::from_be_bytes(c.try_into().unwrap()));
                open.retain(|&s| s <= last);
            }
            SETTINGS if flags & ACK == 0 => {
                Frame::new(SETTINGS, ACK, 0, Vec::new()).write(&mut replies)
            }
            PING if flags & ACK == 0 => {
                Frame::new(PING, ACK, 0, payload.to_vec()).write(&mut replies)
            }
            _ => {}
        }
        at += 9 + len;
    }
    buf.drain(..at);
    replies
}

/// The `:status` at the start of an HPACK block, where the server encodes it (pseudo-headers
/// first). Understands what a server whose peer turned the dynamic table off can send: table
/// size updates, the static entries 8–14, and a literal value (plain, or Huffman-coded digits).
/// `None` for anything else.
fn status_of(block: &[u8]) -> Option<u16> {
    let mut at = 0;
    while *block.get(at)? & 0xe0 == 0x20 {
        at = skip_int(block, at, 5)?;
    }
    let b = *block.get(at)?;
    if b & 0x80 != 0 {
        let (index, _) = read_int(block, at, 7)?;
        return match index {
            8 => Some(200),
            9 => Some(204),
            10 => Some(206),
            11 => Some(304),
            12 => Some(400),
            13 => Some(404),
            14 => Some(500),
            _ => None,
        };
    }
    let prefix = if b & 0xc0 == 0x40 { 6 } else { 4 };
    let (name, next) = read_int(block, at, prefix)?;
    if name != 8 {
        return None;
    }
    let huffman = *block.get(next)? & 0x80 != 0;
    let (len, start) = read_int(block, next, 7)?;
    let raw = block.get(start..start + len as usize)?;
    let text = if huffman {
        huffman_digits(raw)?
    } else {
        raw.to_vec()
    };
    std::str::from_utf8(&text).ok()?.parse().ok()
}

fn read_int(b: &[u8], at: usize, prefix: u32) -> Option<(u64, usize)> {
    let max = (1u64 << prefix) - 1;
    let mut value = (*b.get(at)? as u64) & max;
    let mut i = at + 1;
    if value < max {
        return Some((value, i));
    }
    let mut shift = 0;
    loop {
        let byte = *b.get(i)?;
        i += 1;
        value = value.checked_add(((byte & 0x7f) as u64).checked_shl(shift)?)?;
        shift += 7;
        if byte & 0x80 == 0 || shift > 56 {
            return Some((value, i));
        }
    }
}

fn skip_int(b: &[u8], at: usize, prefix: u32) -> Option<usize> {
    read_int(b, at, prefix).map(|(_, i)| i)
}

/// Decodes Huffman-coded decimal digits (RFC 7541 Appendix B: `0`–`2` have 5-bit codes
/// 00000–00010, `3`–`9` 6-bit codes 011001–011111); the padding is ones.
fn huffman_digits(raw: &[u8]) -> Option<Vec<u8>> {
    let bits = raw.len() * 8;
    let bit = |i: usize| (raw[i / 8] >> (7 - i % 8)) & 1;
    let mut out = Vec::new();
    let mut i = 0;
    while i < bits {
        if bits - i < 8 && (i..bits).all(|j| bit(j) == 1) {
            break;
        }
        if i + 5 > bits {
            return None;
        }
        let v5 = (0..5).fold(0u8, |v, j| (v << 1) | bit(i + j));
        if v5 <= 2 {
            out.push(b'0' + v5);
            i += 5;
            continue;
        }
        if i + 6 > bits {
            return None;
        }
        let v6 = (v5 << 1) | bit(i + 5);
        if !(0x19..=0x1f).contains(&v6) {
            return None;
        }
        out.push(b'3' + (v6 - 0x19));
        i += 6;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_read_from_hpack() {
        assert_eq!(status_of(&[0x88]), Some(200));
        assert_eq!(status_of(&[0x20, 0x8e]), Some(500));
        assert_eq!(status_of(&[0x08, 0x03, b'4', b'0', b'3']), Some(403));
        // "413" in Huffman: 011010 00001 011001 + 111 padding.
        let mut bits = ["011010", "00001", "011001"].concat();
        while bits.len() % 8 != 0 {
            bits.push('1');
        }
        let bytes: Vec<u8> = bits
            .as_bytes()
            .chunks(8)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap())
            .collect();
        let mut block = vec![0x48, 0x80 | bytes.len() as u8];
        block.extend_from_slice(&bytes);
        assert_eq!(status_of(&block), Some(413));
        // A dynamic table reference is not guessed.
        assert_eq!(status_of(&[0xbe]), None);
    }

    #[test]
    fn frames_are_read_and_acknowledged() {
        let mut buf = Vec::new();
        Frame::new(SETTINGS, 0, 0, vec![0, 3, 0, 0, 0, 100]).write(&mut buf);
        Frame::new(HEADERS, END_HEADERS, 1, vec![0x8c]).write(&mut buf);
        Frame::new(RST_STREAM, 0, 3, vec![0, 0, 0, 1]).write(&mut buf);
        buf.extend_from_slice(&[0, 0]);
        let mut open = vec![1, 3, 5];
        let mut ex = Exchange::default();
        let replies = read_frames(&mut buf, &mut open, &mut ex);
        assert_eq!(ex.statuses, [400]);
        assert_eq!(ex.resets, 1);
        assert_eq!(open, [5]);
        assert_eq!(buf, [0, 0]);
        assert_eq!(replies, [0, 0, 0, SETTINGS, ACK, 0, 0, 0, 0]);
    }
}
