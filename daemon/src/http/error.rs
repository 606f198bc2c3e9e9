//! Error answers: a status and a one-line plain-text message (SPEC §1.6).

use bytes::Bytes;
use http::{header, Response, StatusCode};

use super::body::{full, Body};
use crate::kv::KvError;
use crate::runtime::limits::{RequestRefusal, WatchSlots};
use crate::store::StoreError;

/// An answer other than success.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        ApiError {
            status,
            message: message.into(),
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, message)
    }

    pub fn not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "Resource not found.")
    }

    pub fn malformed_authorization() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Malformed authorization header.")
    }

    pub fn invalid_token() -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "Invalid access token.")
    }

    pub fn body_too_large() -> Self {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "Failed to buffer the request body: length limit exceeded",
        )
    }

    /// A watch past a watch stream cap: 429, not 5xx. Deno ends the watch with this text
    /// (`KV Connect failed to call …/watch (status=429): …`) instead of retrying it every
    /// 200–300 ms for ever, unseen; the program (or its operator) can then act on it.
    pub fn too_many_watches(reason: RequestRefusal, slots: &WatchSlots) -> Self {
        let message = match reason {
            RequestRefusal::MaxWatchStreamsPerConnection => format!(
                "Too many watch streams on this connection: at most {} may be open at once \
                 (--max-watch-streams-per-connection). Close one before opening another.",
                slots.max_per_connection
            ),
            _ => format!(
                "Too many watch streams on this server: at most {} may be open at once \
                 (--max-watch-streams). Try again later.",
                slots.max_total
            ),
        };
        Self::new(StatusCode::TOO_MANY_REQUESTS, message)
    }

    pub fn internal() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An internal server error occurred.",
        )
    }

    /// Only for failures where the request surely had no effect: Deno retries 5xx forever.
    pub fn unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "The server is temporarily unavailable, try again later.",
        )
    }

    /// Nothing was committed because the disk is full. A 5xx, so Deno retries (every 200–300
    /// ms) and the write goes through by itself once space returns.
    pub fn disk_full() -> Self {
        Self::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "The server's disk is full: the write was not committed. Try again later.",
        )
    }

    /// The commit failed after it may have reached the disk. Not a 5xx: Deno would re-send
    /// the write, and a sum, an enqueue or a versionstamped key would then apply twice (SPEC
    /// §1.7, implication 1). A 4xx ends the call with this text instead.
    pub fn outcome_unknown() -> Self {
        Self::new(
            StatusCode::CONFLICT,
            "The outcome of this write is unknown: the server's disk failed while committing it, \
             so it may or may not have been applied. The server is restarting; read the keys to \
             find out.",
        )
    }

    pub fn into_response(self) -> Response<Body> {
        Response::builder()
            .status(self.status)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(full(Bytes::from(self.message)))
            .expect("static response parts are valid")
    }
}

impl From<KvError> for ApiError {
    fn from(e: KvError) -> Self {
        ApiError::bad_request(e.message())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(e) => e.into(),
            StoreError::Database(e) => {
                tracing::error!("database error: {e}");
                ApiError::internal()
            }
            StoreError::Unavailable => ApiError::unavailable(),
            StoreError::DiskFull => ApiError::disk_full(),
            StoreError::OutcomeUnknown => ApiError::outcome_unknown(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn texts_clients_see() {
        // SPEC §10 D11: upstream misspells "temporarily"; clients do not read it, so we spell it.
        assert_eq!(
            ApiError::unavailable().message,
            "The server is temporarily unavailable, try again later."
        );
        assert_eq!(ApiError::unavailable().status, 503);
        assert_eq!(
            ApiError::internal().message,
            "An internal server error occurred."
        );
        let resp = ApiError::not_found().into_response();
        assert_eq!(resp.headers()["content-type"], "text/plain; charset=utf-8");
    }
}
