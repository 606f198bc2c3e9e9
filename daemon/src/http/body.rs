//! Response bodies and bounded reading of request bodies.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http::StatusCode;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};

use super::error::ApiError;

/// Every response body this server sends.
pub type Body = UnsyncBoxBody<Bytes, BodyError>;

/// Why a response body was cut off: hyper resets the h2 stream (or closes the HTTP/1.1
/// connection).
#[derive(Debug)]
pub enum BodyError {
    /// The client took nothing of the answer for too long (`read_answer::STALL`).
    Stalled,
}

impl std::fmt::Display for BodyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BodyError::Stalled => f.write_str("the client stopped reading the answer"),
        }
    }
}

impl std::error::Error for BodyError {}

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never: Infallible| match never {})
        .boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Bytes of an oversized body read and thrown away before answering 413, so that an HTTP/1.1
/// client still sending it gets the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Longest time a client may take to send a request body (a body under the cap).
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a whole request body of at most `max` bytes (`--max-body-bytes`) within 30 s; larger
/// bodies are refused with 413, slower ones with 408. A body whose `Content-Length` is larger
/// is refused before any of it is kept: on HTTP/2 at once (the stream is reset after the
/// answer), on HTTP/1.1 after reading and dropping up to 16 MiB of it, so that a client still
/// sending gets the answer rather than a reset connection. A body without a length (chunked,
/// or h2 DATA frames) is refused as soon as it grows past `max`.
pub async fn read_limited(
    body: Incoming,
    content_length: Option<u64>,
    max: usize,
    h2: bool,
) -> Result<Bytes, ApiError> {
    if content_length.is_some_and(|n| n > max as u64) {
        if !h2 {
            // Refused already; what arrives within a moment is read and dropped.
            let _ = monoio::time::timeout(DRAIN_TIME, drain(body, 0)).await;
        }
        return Err(ApiError::body_too_large());
    }
    let slow = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "The request body was not received in time.",
        )
    };
    monoio::time::timeout(BODY_TIMEOUT, read_body(body, content_length, max, h2))
        .await
        .unwrap_or_else(|_| Err(slow()))
}

/// How long the rest of a refused HTTP/1.1 body is read and dropped before the answer.
const DRAIN_TIME: Duration = Duration::from_secs(2);

/// Reads and drops a body (up to `DRAIN_LIMIT` bytes in all, `seen` of them already read).
async fn drain(mut body: Incoming, mut seen: usize) {
    while let Some(Ok(frame)) = body.frame().await {
        seen += frame.data_ref().map_or(0, |d| d.len());
        if seen > DRAIN_LIMIT {
            break;
        }
    }
}

async fn read_body(
    mut body: Incoming,
    content_length: Option<u64>,
    max: usize,
    h2: bool,
) -> Result<Bytes, ApiError> {
    let mut buf = BytesMut::with_capacity(content_length.map_or(0, |n| n as usize));
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("Failed to read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        if buf.len() + data.len() > max {
            // A body without a length (chunked, h2 DATA frames) grew past the cap.
            if !h2 {
                let _ =
                    monoio::time::timeout(DRAIN_TIME, drain(body, buf.len() + data.len())).await;
            }
            return Err(ApiError::body_too_large());
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

/// A streamed body fed by a task through a channel; ends when the sender is dropped.
pub struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
}

impl ChannelBody {
    pub fn new(rx: tokio::sync::mpsc::Receiver<Bytes>) -> Self {
        ChannelBody { rx }
    }
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
