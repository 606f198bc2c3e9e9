//! The OTLP exporter's HTTP client: a blocking HTTP/1.1 POST over a new connection
//! (`Connection: close`), plain `http://` only. It runs on the batch span processor's own
//! thread, which calls the exporter one batch at a time: no async runtime, no connection pool,
//! no thread of its own. A general-purpose client (reqwest) would bring its own tokio runtime
//! thread and some 35 crates (URL parsing with IDNA tables among them) for this one request
//! every few seconds.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use opentelemetry_http::{HttpClient, HttpError};

/// Longest response kept (a collector's answer is a small protobuf message).
const MAX_RESPONSE: usize = 4 * 1024 * 1024;

/// Posts each export on a connection of its own, within `timeout` (connect to last byte).
#[derive(Debug)]
pub struct BlockingClient {
    timeout: Duration,
}

impl BlockingClient {
    pub fn new(timeout: Duration) -> Self {
        BlockingClient { timeout }
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let deadline = Instant::now() + self.timeout;
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// endpoints are supported").into());
        }
        let authority = uri.authority().ok_or_else(|| format!("{uri}: no host"))?;
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = authority.port_u16().unwrap_or(80);
        let mut stream = connect(host, port, deadline)?;
        stream.set_nodelay(true)?;

        let path = uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = Vec::with_capacity(256);
        write!(
            head,
            "{} {path} HTTP/1.1\r\nhost: {authority}\r\ncontent-length: {}\r\nconnection: close\r\n",
            request.method(),
            request.body().len()
        )?;
        for (name, value) in request.headers() {
            if [header::HOST, header::CONTENT_LENGTH, header::CONNECTION].contains(name) {
                continue;
            }
            head.extend_from_slice(name.as_str().as_bytes());
            head.extend_from_slice(b": ");
            head.extend_from_slice(value.as_bytes());
            head.extend_from_slice(b"\r\n");
        }
        head.extend_from_slice(b"\r\n");
        stream.set_write_timeout(Some(remaining(deadline)?))?;
        stream.write_all(&head)?;
        stream.write_all(request.body())?;

        // The answer ends when the collector closes the connection.
        let mut raw = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            stream.set_read_timeout(Some(remaining(deadline)?))?;
            let n = match stream.read(&mut buf) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                break;
            }
            raw.extend_from_slice(&buf[..n]);
            if raw.len() > MAX_RESPONSE {
                return Err(opentelemetry_http::ResponseBodyTooLarge::new().into());
            }
            // Done once a complete Content-Length body is in, even if the peer keeps the
            // connection open.
            if let Ok(Some(_)) = parse(&raw, false) {
                break;
            }
        }
        parse(&raw, true)?.ok_or_else(|| "the collector closed the connection mid-answer".into())
    }
}

impl HttpClient for BlockingClient {
    fn send_bytes<'a, 'b>(
        &'a self,
        request: Request<Bytes>,
    ) -> std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Response<Bytes>, HttpError>> + Send + 'b>,
    >
    where
        'a: 'b,
        Self: 'b,
    {
        // Blocking on purpose: this runs on the exporter's own thread.
        let result = self.send(request);
        Box::pin(std::future::ready(result))
    }
}

fn remaining(deadline: Instant) -> Result<Duration, HttpError> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err("timed out".into());
    }
    Ok(left)
}

fn connect(host: &str, port: u16, deadline: Instant) -> Result<TcpStream, HttpError> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    let mut last = None;
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, remaining(deadline)?) {
            Ok(stream) => return Ok(stream),
            Err(e) => last = Some(format!("cannot connect to {addr}: {e}")),
        }
    }
    Err(last
        .unwrap_or_else(|| format!("{host} has no address"))
        .into())
}

/// The response in `raw`: `None` while incomplete. `at_eof`: nothing more will come, so a body
/// without a length ends here.
fn parse(raw: &[u8], at_eof: bool) -> Result<Option<Response<Bytes>>, HttpError> {
    let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| "response head is not text")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .strip_prefix("HTTP/1.")
        .and_then(|rest| rest.get(2..5))
        .and_then(|code| code.parse::<u16>().ok())
        .and_then(|code| StatusCode::from_u16(code).ok())
        .ok_or_else(|| format!("not an HTTP/1.x status line: {status_line:?}"))?;
    let mut builder = Response::builder().status(status);
    let (mut length, mut chunked) = (None, false);
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| format!("bad header line {line:?}"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().map_err(|_| "bad content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.to_ascii_lowercase().ends_with("chunked");
        }
        builder = builder.header(name.trim(), value);
    }
    let rest = &raw[end + 4..];
    let body = if chunked {
        match dechunk(rest)? {
            Some(body) => body,
            None if at_eof => return Err("chunked body cut short".into()),
            None => return Ok(None),
        }
    } else if let Some(n) = length {
        if rest.len() < n {
            return if at_eof {
                Err("body shorter than its content-length".into())
            } else {
                Ok(None)
            };
        }
        rest[..n].to_vec()
    } else if at_eof {
        rest.to_vec()
    } else {
        return Ok(None);
    };
    Ok(Some(builder.body(Bytes::from(body))?))
}

/// A chunked body; `None` while the last chunk has not arrived.
fn dechunk(mut rest: &[u8]) -> Result<Option<Vec<u8>>, HttpError> {
    let mut body = Vec::new();
    loop {
        let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let size_line = std::str::from_utf8(&rest[..eol]).map_err(|_| "bad chunk size")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16).map_err(|_| "bad chunk size")?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok(Some(body));
        }
        if rest.len() < size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// A one-shot server: reads one request (head and `content-length` body), answers
    /// `answer` in pieces, then closes. Returns what it received.
    fn serve_once(answer: &'static [u8]) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut buf = [0u8; 1024];
            loop {
                let n = s.read(&mut buf).unwrap();
                got.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&got).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if got.len() >= end + 4 + len {
                        break;
                    }
                }
            }
            for piece in answer.chunks(7) {
                s.write_all(piece).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
            got
        });
        (url, thread)
    }

    fn post(url: &str) -> Result<Response<Bytes>, HttpError> {
        let request = Request::post(url)
            .header("content-type", "application/x-protobuf")
            .header("x-api-key", "k1")
            .body(Bytes::from_static(b"\x0a\x00payload"))
            .unwrap();
        BlockingClient::new(Duration::from_secs(5)).send(request)
    }

    #[test]
    fn posts_the_request_and_reads_a_sized_answer() {
        let (url, server) =
            serve_once(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-protobuf\r\nContent-Length: 2\r\n\r\nok");
        let resp = post(&url).unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["content-type"], "application/x-protobuf");
        assert_eq!(&resp.body()[..], b"ok");
        let got = String::from_utf8_lossy(&server.join().unwrap()).to_string();
        assert!(got.starts_with("POST /v1/traces HTTP/1.1\r\n"), "{got}");
        for line in [
            "content-length: 9",
            "connection: close",
            "x-api-key: k1",
            "content-type: application/x-protobuf",
        ] {
            assert!(got.contains(&format!("{line}\r\n")), "{line} in {got}");
        }
        assert!(got.ends_with("\r\n\r\n\x0a\x00payload"), "{got}");
    }

    #[test]
    fn reads_chunked_and_unsized_answers_and_error_statuses() {
        let (url, server) = serve_once(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n",
        );
        assert_eq!(&post(&url).unwrap().body()[..], b"abcde");
        server.join().unwrap();
        let (url, server) = serve_once(b"HTTP/1.0 200 OK\r\n\r\nuntil close");
        assert_eq!(&post(&url).unwrap().body()[..], b"until close");
        server.join().unwrap();
        let (url, server) = serve_once(
            b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n",
        );
        let resp = post(&url).unwrap();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()["retry-after"], "3");
        server.join().unwrap();
    }

    #[test]
    fn failures_are_errors() {
        let (url, server) = serve_once(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort");
        let err = post(&url).unwrap_err().to_string();
        assert!(err.contains("content-length"), "{err}");
        server.join().unwrap();
        let (url, server) = serve_once(b"garbage\r\n\r\n");
        assert!(post(&url).unwrap_err().to_string().contains("status line"));
        server.join().unwrap();
        // Nothing listens there any more.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let err = post(&format!("http://127.0.0.1:{port}/v1/traces")).unwrap_err();
        assert!(err.to_string().contains("cannot connect"), "{err}");
        assert!(post("https://127.0.0.1:1/v1/traces").is_err());
    }

    #[test]
    fn a_silent_collector_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let request = Request::post(url).body(Bytes::from_static(b"x")).unwrap();
        let start = Instant::now();
        let err = BlockingClient::new(Duration::from_millis(300))
            .send(request)
            .unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3), "{err}");
        drop(listener);
    }
}
