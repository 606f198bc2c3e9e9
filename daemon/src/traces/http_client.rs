//! The OTLP exporter's HTTP client: `ureq` (blocking, no TLS: plain `http://` only), called on
//! the batch span processor's own thread, which exports one batch at a time. No async runtime
//! and no thread of its own; the agent keeps the connection to the collector for the next
//! export. A general-purpose async client (reqwest) would bring its own tokio runtime thread and
//! some 35 crates for this one request every few seconds; ureq without its default features
//! adds four (ureq, ureq-proto, base64, utf8-zero).

use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use opentelemetry_http::{HttpClient, HttpError};

/// Longest response kept (a collector's answer is a small protobuf message).
const MAX_RESPONSE: u64 = 4 * 1024 * 1024;

/// Longest response head accepted.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Posts each export within `timeout` (resolving and connecting to the last byte of the answer).
#[derive(Debug)]
pub struct BlockingClient {
    agent: ureq::Agent,
}

impl BlockingClient {
    pub fn new(timeout: Duration) -> Self {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            // The exporter looks at the status itself (and retries on some).
            .http_status_as_error(false)
            .max_redirects(0)
            .max_response_header_size(MAX_RESPONSE_HEAD)
            // The endpoint is what OTEL_EXPORTER_OTLP_* says, never an http_proxy of the
            // environment.
            .proxy(None)
            .build()
            .new_agent();
        BlockingClient { agent }
    }

    fn send(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let uri = request.uri().clone();
        if uri.scheme_str() != Some("http") {
            return Err(format!("{uri}: only http:// endpoints are supported").into());
        }
        let (parts, body) = request.into_parts();
        let request = Request::from_parts(parts, &body[..]);
        let response = self.agent.run(request).map_err(|e| format!("{uri}: {e}"))?;
        let (parts, mut body) = response.into_parts();
        let body = body
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .map_err(|e| format!("{uri}: reading the answer: {e}"))?;
        Ok(Response::from_parts(parts, Bytes::from(body)))
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
#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    /// Reads one request (head and `content-length` body) from `s`; returns it.
    fn read_request(s: &mut TcpStream) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "the client closed mid-request");
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
            if let Some(end) = text.find("\r\n\r\n") {
                let len: usize = text
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length: "))
                    .unwrap()
                    .parse()
                    .unwrap();
                if got.len() >= end + 4 + len {
                    return got;
                }
            }
        }
    }

    /// A one-shot server: reads one request, answers with `answer(stream)`, then closes.
    /// Returns what it received.
    fn serve_with(
        answer: impl FnOnce(&mut TcpStream) + Send + 'static,
    ) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let thread = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let got = read_request(&mut s);
            answer(&mut s);
            got
        });
        (url, thread)
    }

    /// Answers `answer` in pieces, then closes.
    fn serve_once(answer: &'static [u8]) -> (String, std::thread::JoinHandle<Vec<u8>>) {
        serve_with(move |s| {
            for piece in answer.chunks(7) {
                // The client may hang up first (a hostile answer is refused early).
                if s.write_all(piece).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    }

    fn post_within(url: &str, timeout: Duration) -> Result<Response<Bytes>, HttpError> {
        let request = Request::post(url)
            .header("content-type", "application/x-protobuf")
            .header("x-api-key", "k1")
            .body(Bytes::from_static(b"\x0a\x00payload"))
            .unwrap();
        BlockingClient::new(timeout).send(request)
    }

    fn post(url: &str) -> Result<Response<Bytes>, HttpError> {
        post_within(url, Duration::from_secs(5))
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
        let lower = got.to_ascii_lowercase();
        for line in [
            "content-length: 9",
            "x-api-key: k1",
            "content-type: application/x-protobuf",
        ] {
            assert!(lower.contains(&format!("{line}\r\n")), "{line} in {got}");
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
        assert!(post(&url).is_err());
        server.join().unwrap();
        let (url, server) = serve_once(b"garbage\r\n\r\n");
        assert!(post(&url).is_err());
        server.join().unwrap();
        // Nothing listens there any more.
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://127.0.0.1:{port}/v1/traces");
        let err = post(&url).unwrap_err().to_string();
        assert!(err.contains(&url), "{err}");
        assert!(post("https://127.0.0.1:1/v1/traces").is_err());
    }

    #[test]
    fn a_silent_collector_times_out() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/v1/traces", listener.local_addr().unwrap());
        let start = Instant::now();
        let err = post_within(&url, Duration::from_millis(300)).unwrap_err();
        assert!(start.elapsed() < Duration::from_secs(3), "{err}");
        assert!(err.to_string().contains("timeout"), "{err}");
        drop(listener);
    }

    /// A hostile collector: chunk sizes that overflow or promise more than will ever come,
    /// garbage, an endless head, an endless body, a trickle. Each is an error, within the
    /// timeout, never a panic (the old hand-written client's `size + 2` overflowed here).
    #[test]
    fn a_hostile_collector_is_an_error_in_time_never_a_panic() {
        let timeout = Duration::from_millis(800);
        let answers: [&'static [u8]; 7] = [
            // usize::MAX, then a few bytes and the end of the connection.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc",
            // More than usize::MAX.
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nabc\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabcdef\r\n0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nContent-Length: 18446744073709551616\r\n\r\nabc",
            b"HTTP/1.1 99999999999999999999 OK\r\n\r\n",
            b"\x00\xff\r\n\r\n\r\n",
        ];
        for answer in answers {
            let (url, server) = serve_once(answer);
            let start = Instant::now();
            let result = post_within(&url, timeout);
            assert!(
                result.is_err(),
                "{:?} accepted",
                String::from_utf8_lossy(answer)
            );
            assert!(start.elapsed() < timeout + Duration::from_secs(1));
            server.join().unwrap();
        }

        // A huge chunk that keeps coming, fast: refused at the response size limit.
        let (url, server) = serve_with(|s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            let _ = s.write_all(b"ffffffffffffffff\r\n");
            let block = [b'x'; 64 * 1024];
            while s.write_all(&block).is_ok() {}
        });
        let start = Instant::now();
        let err = post_within(&url, Duration::from_secs(5)).unwrap_err();
        assert!(err.to_string().contains("limit"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5), "{err}");
        server.join().unwrap();

        // A head that never ends: refused at the head size limit.
        let (url, server) = serve_with(|s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n");
            while s.write_all(b"x-filler: 0123456789abcdef\r\n").is_ok() {}
        });
        assert!(post_within(&url, Duration::from_secs(5)).is_err());
        server.join().unwrap();

        // A trickle, a byte every 50 ms, forever: cut at the timeout.
        let (url, server) = serve_with(|s| {
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n");
            let _ = s.write_all(b"ffffffffffffffff\r\n");
            while s.write_all(b"x").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let start = Instant::now();
        let err = post_within(&url, timeout).unwrap_err();
        let took = start.elapsed();
        assert!(
            took >= timeout && took < timeout + Duration::from_secs(1),
            "{took:?} {err}"
        );
        assert!(err.to_string().contains("timeout"), "{err}");
        server.join().unwrap();
    }
}
