//! HTTP/1.1 on a raw socket: the request line, headers and framing written byte by byte (so
//! that they can be wrong), and the answers parsed from what comes back.

use std::net::SocketAddr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use super::request::{Framing, Req};
use super::Exchange;

/// How the bytes are written.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Plan {
    /// Write in pieces this long, with a short pause between them (empty: all at once).
    pub pieces: Vec<usize>,
    /// Shut down the sending side at once after the request (the server must still answer);
    /// otherwise only after a quiet second or the first answer.
    pub half_close: bool,
}

/// Serialises `req` (request line, headers, framing, body), with an HTTP/1.1 specific change
/// now and then: version, line endings, spacing.
pub fn serialize(req: &Req, rng: &mut StdRng) -> Vec<u8> {
    let mut out = Vec::with_capacity(req.body.len() + 512);
    let version: &[u8] = match rng.random_range(0..40) {
        0 => b"HTTP/1.0",
        1 => b"HTTP/1.2",
        2 => b"HTTP/2.0",
        3 => b"http/1.1",
        4 => b"HTTP/11",
        5 => b"",
        6 => b"HTTP/1.1 ",
        7 => b"HTTP/9.9",
        _ => b"HTTP/1.1",
    };
    let eol: &[u8] = match rng.random_range(0..40) {
        0 => b"\n",
        1 => b"\r",
        2 => b"\r\r\n",
        _ => b"\r\n",
    };
    let sp: &[u8] = match rng.random_range(0..40) {
        0 => b"  ",
        1 => b"\t",
        _ => b" ",
    };
    out.extend_from_slice(&req.method);
    out.extend_from_slice(sp);
    out.extend_from_slice(&req.path);
    if !version.is_empty() {
        out.extend_from_slice(sp);
        out.extend_from_slice(version);
    }
    out.extend_from_slice(eol);
    if rng.random_ratio(19, 20) {
        out.extend_from_slice(b"host: 127.0.0.1");
        out.extend_from_slice(eol);
    }
    for (name, value) in &req.headers {
        out.extend_from_slice(name);
        out.extend_from_slice(match rng.random_range(0..60) {
            0 => b" : ".as_slice(),
            1 => b":",
            2 => b"\r\n : ",
            _ => b": ",
        });
        out.extend_from_slice(value);
        out.extend_from_slice(eol);
    }
    match &req.framing {
        Framing::Length => {
            out.extend_from_slice(format!("content-length: {}", req.body.len()).as_bytes());
            out.extend_from_slice(eol);
        }
        Framing::LengthValue(values) => {
            for v in values {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(v);
                out.extend_from_slice(eol);
            }
        }
        Framing::Chunked { .. } => {
            out.extend_from_slice(b"transfer-encoding: chunked");
            out.extend_from_slice(eol);
        }
        Framing::None => {}
    }
    out.extend_from_slice(eol);
    match &req.framing {
        Framing::Chunked { sizes, bad, end } => {
            // The sizes were chosen before the body's last mutation: cut to what is there,
            // and the rest in one more chunk.
            let mut sizes: Vec<usize> = sizes.clone();
            let mut left = req.body.len();
            for n in sizes.iter_mut() {
                *n = (*n).min(left);
                left -= *n;
            }
            sizes.retain(|&n| n > 0);
            if left > 0 {
                sizes.push(left);
            }
            let mut at = 0;
            for (i, &n) in sizes.iter().enumerate() {
                match bad {
                    Some((j, line)) if *j == i => out.extend_from_slice(line),
                    _ => out.extend_from_slice(format!("{n:x}").as_bytes()),
                }
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(&req.body[at..at + n]);
                out.extend_from_slice(b"\r\n");
                at += n;
            }
            if let Some((j, line)) = bad {
                if *j == sizes.len() {
                    out.extend_from_slice(line);
                    out.extend_from_slice(b"\r\n");
                }
            }
            out.extend_from_slice(end);
        }
        _ => out.extend_from_slice(&req.body),
    }
    out
}

/// A few bytes of the whole request changed, or the request cut short.
pub fn mutate_bytes(bytes: &mut Vec<u8>, rng: &mut StdRng) {
    for _ in 0..rng.random_range(1..4) {
        if bytes.is_empty() {
            return;
        }
        let i = rng.random_range(0..bytes.len());
        match rng.random_range(0..5) {
            0 => bytes[i] ^= 1 << rng.random_range(0..8),
            1 => bytes[i] = b"\r\n\0: \t"[rng.random_range(0..6)],
            2 => bytes.truncate(i),
            3 => bytes.insert(i, rng.random()),
            _ => {
                bytes.remove(i);
            }
        }
    }
}

pub fn plan(len: usize, rng: &mut StdRng) -> Plan {
    let pieces = if rng.random_ratio(1, 10) && len > 1 {
        (0..rng.random_range(1..5))
            .map(|_| rng.random_range(1..len))
            .collect()
    } else {
        Vec::new()
    };
    Plan {
        pieces,
        half_close: rng.random_ratio(9, 10),
    }
}

/// Sends `bytes` on a new connection and reads every answer until the server closes, the
/// sending side is shut, a watch stream starts, or `hang` passes.
pub async fn exchange(addr: SocketAddr, bytes: &[u8], plan: &Plan, hang: Duration) -> Exchange {
    let mut ex = Exchange::default();
    let s = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            ex.connect_failed = Some(e.to_string());
            return ex;
        }
    };
    let _ = s.set_nodelay(true);
    // Written from a task: a large request the server refuses early would otherwise block
    // the writer while nobody reads the answer.
    let (mut rd, mut wr) = s.into_split();
    let data = bytes.to_vec();
    let plan2 = plan.clone();
    let writer = tokio::spawn(async move {
        let mut at = 0;
        let mut cuts = plan2.pieces.clone();
        cuts.sort_unstable();
        for cut in cuts {
            if cut > at && cut < data.len() {
                if wr.write_all(&data[at..cut]).await.is_err() {
                    return None;
                }
                at = cut;
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
        }
        if wr.write_all(&data[at..]).await.is_err() {
            return None;
        }
        if plan2.half_close {
            let _ = wr.shutdown().await;
        }
        Some(wr)
    });
    let mut buf = Vec::new();
    let mut parsed = 0usize;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut deadline = Instant::now() + hang;
    let mut write_half: Option<tokio::net::tcp::OwnedWriteHalf> = None;
    let mut writer = Some(writer);
    let quiet_until = Instant::now() + Duration::from_secs(1);
    loop {
        if let Some(w) = &writer {
            if w.is_finished() {
                // The deadline runs from the end of the request.
                let done = writer.take().unwrap().await.ok().flatten();
                deadline = Instant::now() + hang;
                write_half = done;
            }
        }
        // Not shut down at once: after the first answer, or a quiet second.
        if !plan.half_close
            && write_half.is_some()
            && (!ex.statuses.is_empty() || Instant::now() >= quiet_until)
        {
            let _ = write_half.take().unwrap().shutdown().await;
        }
        let wake = if writer.is_some() || write_half.is_some() {
            deadline.min(Instant::now() + Duration::from_millis(100))
        } else {
            deadline
        };
        match tokio::time::timeout_at(wake, rd.read(&mut chunk)).await {
            Ok(Ok(0)) => {
                ex.closed = true;
                break;
            }
            Ok(Ok(n)) => {
                buf.extend_from_slice(&chunk[..n]);
                if parse(&buf, &mut parsed, &mut ex.statuses) {
                    ex.stream = true;
                    break;
                }
            }
            Ok(Err(_)) => {
                ex.reset = true;
                break;
            }
            Err(_) if Instant::now() >= deadline => {
                if contains(&buf, b"content-type: application/octet-stream") {
                    // A watch stream behind an answer the parser could not delimit (HEAD).
                    ex.stream = true;
                    break;
                }
                ex.hang = Some(format!(
                    "no end within {hang:?} after the request; {} answers, {} bytes received",
                    ex.statuses.len(),
                    buf.len()
                ));
                break;
            }
            Err(_) => {}
        }
    }
    if let Some(w) = writer {
        w.abort();
    }
    ex.tail = first_line(&buf[parsed.min(buf.len())..]);
    ex
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

fn first_line(rest: &[u8]) -> String {
    let line = rest.split(|&b| b == b'\n').next().unwrap_or_default();
    String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned()
}

/// Parses the complete answers in `buf` from `*at` on, appending their statuses. Returns true
/// when a watch stream started (a 200 of type `application/octet-stream`).
fn parse(buf: &[u8], at: &mut usize, statuses: &mut Vec<u16>) -> bool {
    loop {
        let rest = &buf[*at..];
        if rest.is_empty() {
            return false;
        }
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut headers);
        let head = match resp.parse(rest) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return false,
            Err(_) => {
                // Not an answer: look for a status line further on (best effort), so that a
                // 5xx is not missed; unparseable bytes are otherwise left alone.
                if let Some(code) = scan_status(rest) {
                    statuses.push(code);
                }
                *at = buf.len();
                return false;
            }
        };
        let code = resp.code.unwrap_or(0);
        let header = |name: &str| {
            resp.headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(name))
                .map(|h| String::from_utf8_lossy(h.value).to_ascii_lowercase())
        };
        let chunked = header("transfer-encoding").is_some_and(|v| v.contains("chunked"));
        let length = header("content-length").and_then(|v| v.trim().parse::<usize>().ok());
        if (100..200).contains(&code) || code == 204 || code == 304 {
            statuses.push(code);
            *at += head;
            continue;
        }
        // A watch stream (its content type) does not end: nothing after it will be answered.
        let stream = header("content-type").is_some_and(|v| v == "application/octet-stream");
        if code == 200 && stream {
            statuses.push(code);
            return true;
        }
        let body = &rest[head..];
        if body.starts_with(b"HTTP/1.") {
            // The answer to HEAD: a length, but no body.
            statuses.push(code);
            *at += head;
            continue;
        }
        let used = if chunked {
            match chunked_len(body) {
                Some(n) => n,
                None => return false,
            }
        } else if let Some(n) = length {
            if body.len() < n {
                return false;
            }
            n
        } else {
            // Until the connection closes: count it now, the rest is its body.
            statuses.push(code);
            *at = buf.len();
            return false;
        };
        statuses.push(code);
        *at += head + used;
    }
}

/// The length of a complete chunked body at the start of `b`, or `None` if it is incomplete.
fn chunked_len(b: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let line_end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
        let size_text = std::str::from_utf8(&b[at..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        at = line_end + 2;
        if size == 0 {
            // Trailers (none from this server), then the empty line.
            let end = b[at..].windows(2).position(|w| w == b"\r\n")? + at;
            return Some(end + 2);
        }
        if b.len() < at + size + 2 {
            return None;
        }
        at += size + 2;
    }
}

/// The first `HTTP/1.x NNN` status line at a line start in `b`.
fn scan_status(b: &[u8]) -> Option<u16> {
    let mut i = 0;
    while i + 12 <= b.len() {
        if (i == 0 || b[i - 1] == b'\n') && b[i..].starts_with(b"HTTP/1.") && b[i + 8] == b' ' {
            let code = std::str::from_utf8(&b[i + 9..i + 12]).ok()?;
            return code.parse().ok();
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_parsed_one_after_the_other() {
        let two = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 400 Bad Request\r\ncontent-length: 3\r\n\r\nabcHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nHTTP/1.1 503 X\r\ncontent-length: 0\r\n\r\n";
        let (mut at, mut statuses) = (0, Vec::new());
        assert!(!parse(two, &mut at, &mut statuses));
        assert_eq!(statuses, [100, 400, 200, 503]);
        assert_eq!(at, two.len());
        // Incomplete: nothing counted until the body is there.
        let (mut at, mut statuses) = (0, Vec::new());
        parse(
            b"HTTP/1.1 500 X\r\ncontent-length: 9\r\n\r\nab",
            &mut at,
            &mut statuses,
        );
        assert!(statuses.is_empty());
        // Garbage that hides a status line further on.
        let (mut at, mut statuses) = (0, Vec::new());
        parse(b"\x00junk\r\nHTTP/1.1 502 X\r\n", &mut at, &mut statuses);
        assert_eq!(statuses, [502]);
        // A watch stream ends the reading.
        let (mut at, mut statuses) = (0, Vec::new());
        let watch = b"HTTP/1.0 200 OK\r\ncontent-type: application/octet-stream\r\n\r\n\0\0";
        assert!(parse(watch, &mut at, &mut statuses));
    }
}
