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
use crate::kv::limits::MAX_BODY_BYTES;

/// Every response body this server sends.
pub type Body = UnsyncBoxBody<Bytes, Infallible>;

pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// Bytes of an oversized body read and thrown away before answering 413, so that an HTTP/1.1
/// client still sending it gets the answer instead of a reset connection.
const DRAIN_LIMIT: usize = 16 * 1024 * 1024;

/// Longest time a client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(30);

/// Reads a whole request body of at most 2 MiB within 30 s; larger bodies are refused with 413,
/// slower ones with 408.
pub async fn read_limited(body: Incoming, content_length: Option<u64>) -> Result<Bytes, ApiError> {
    let slow = || {
        ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "The request body was not received in time.",
        )
    };
    monoio::time::timeout(BODY_TIMEOUT, read_body(body, content_length))
        .await
        .unwrap_or_else(|_| Err(slow()))
}

async fn read_body(mut body: Incoming, content_length: Option<u64>) -> Result<Bytes, ApiError> {
    let declared_too_large = content_length.is_some_and(|n| n > MAX_BODY_BYTES as u64);
    let mut buf = BytesMut::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("Failed to read the request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if declared_too_large || seen > MAX_BODY_BYTES {
            if seen > DRAIN_LIMIT {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&data);
    }
    if declared_too_large || seen > MAX_BODY_BYTES {
        return Err(ApiError::body_too_large());
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
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx
            .poll_recv(cx)
            .map(|chunk| chunk.map(|b| Ok(Frame::data(b))))
    }
}
