//! The KV Connect HTTP surface (SPEC §1): routes, authentication, data-path checks, and the
//! translation between protobuf and the protocol model. Nothing outside this module knows HTTP.

pub mod auth;
pub mod body;
pub mod error;
pub mod metadata;
pub mod read_answer;
pub mod read_share;
mod watch;

use std::cell::RefCell;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{header, HeaderMap, Method, Response, StatusCode, Version};
use hyper::body::{Body as _, Incoming};
use prost::Message;

use crate::kv::model::{Entry, WriteOutcome};
use crate::kv::wire;
use crate::kv::{now_ms, validate};
use crate::metrics::{Metrics, RouteLabel};
use crate::proto as pb;
use crate::runtime::limits::{ConnWatches, RequestRefusal};
use crate::store::{CommitterHandle, Inline, Reader, WatchRegistry};
use crate::traces::Span;
use auth::{Access, CoreTokens, SharedTokens};
use body::{empty, full, read_limited, Body};
use error::ApiError;

pub type Request = http::Request<Incoming>;

/// What every core shares.
pub struct Shared {
    /// Replaced as a whole when SIGHUP re-reads the token file.
    pub tokens: Arc<SharedTokens>,
    /// `None` when the server is read-only.
    pub committer: Option<CommitterHandle>,
    pub watches: Arc<WatchRegistry>,
    /// The data-path endpoint advertised in the metadata (`/v2`).
    pub endpoint_url: String,
    /// How long the session tokens of the metadata exchange are valid.
    pub session_ttl: Duration,
    pub metrics: Arc<Metrics>,
}

/// What one core's request handlers use: the shared state and the core's own reader.
pub struct CoreContext {
    pub shared: Arc<Shared>,
    /// This core's copy of `shared.tokens`.
    pub tokens: CoreTokens,
    pub reader: RefCell<Reader>,
    /// Watch reads shared by the streams one commit wakes on this core.
    pub watch_reads: RefCell<watch::WatchReads>,
    /// Turns true when the server starts shutting down.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
    /// `--max-body-bytes`.
    pub max_body_bytes: usize,
    /// Shared by every core: `--max-read-buffer-mb`.
    pub read_budget: Arc<read_answer::ReadBudget>,
    /// This core's load, and the reads it hands to idle cores or takes from busy ones.
    pub reads: std::rc::Rc<read_share::CoreReads>,
    /// Requests of this core's connections being answered (`Handling`).
    pub handling: std::cell::Cell<usize>,
    /// Told when the reader keeps a snapshot for the next reads: the core's
    /// `release_snapshots` task ends it once the core has been idle for `SNAPSHOT_HOLD`.
    pub snapshot_held: tokio::sync::Notify,
}

impl CoreContext {
    /// Reads with this core's reader.
    pub fn read<T>(&self, read: impl FnOnce(&mut Reader) -> T) -> T {
        let mut reader = self.reader.borrow_mut();
        let out = read(&mut reader);
        if reader.holds_snapshot() {
            self.snapshot_held.notify_one();
        }
        out
    }
}

/// A request of the core's own connections, from hyper handing it over to its response head.
/// A write that is the only one may be committed on the core's thread (`Inline`).
pub struct Handling(std::rc::Rc<CoreContext>);

impl Handling {
    pub fn start(ctx: &std::rc::Rc<CoreContext>) -> Handling {
        ctx.handling.set(ctx.handling.get() + 1);
        Handling(ctx.clone())
    }
}

impl Drop for Handling {
    fn drop(&mut self) {
        self.0.handling.set(self.0.handling.get() - 1);
    }
}

/// Answers one request; errors become their plain-text responses. Every answer is counted,
/// and traced when traces are on (a span per request, ended when the response head is ready).
pub async fn handle(
    req: Request,
    ctx: &std::rc::Rc<CoreContext>,
    watches: &ConnWatches,
) -> Response<Body> {
    crate::fatal::debug::panic_point("core");
    let start = Instant::now();
    let route = Route::of(req.uri().path());
    let mut span = Span::server(|| route.span_name(req.method()));
    if span.is_on() {
        span.set("http.request.method", req.method().as_str().to_string());
        if route != Route::Other {
            span.set("http.route", route.path());
        }
        span.set("network.protocol.version", protocol_version(req.version()));
    }
    let resp = match serve(route, req, ctx, watches, &mut span).await {
        Ok(resp) => resp,
        Err(e) => e.into_response(),
    };
    let status = resp.status().as_u16();
    if span.is_on() {
        span.set("http.response.status_code", i64::from(status));
        if let Some(n) = resp.body().size_hint().exact() {
            span.set("http.response.body.size", n as i64);
        }
        if status >= 400 {
            span.set("error.type", status.to_string());
        }
        if status >= 500 {
            span.set_error("server error");
        }
    }
    ctx.shared
        .metrics
        .http_request(route.label(), status, start.elapsed());
    resp
}

/// Whether `req` is a snapshot read (which another core may answer).
pub fn is_snapshot_read(req: &Request) -> bool {
    Route::of(req.uri().path()) == Route::SnapshotRead
}

fn protocol_version(v: Version) -> &'static str {
    match v {
        Version::HTTP_09 => "0.9",
        Version::HTTP_10 => "1.0",
        Version::HTTP_11 => "1.1",
        Version::HTTP_2 => "2",
        Version::HTTP_3 => "3",
        _ => "other",
    }
}

async fn serve(
    route: Route,
    req: Request,
    ctx: &std::rc::Rc<CoreContext>,
    watches: &ConnWatches,
    span: &mut Span,
) -> Result<Response<Body>, ApiError> {
    if route == Route::Other {
        return Err(ApiError::not_found());
    }
    if req.method() != Method::POST {
        return Ok(Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .body(empty())
            .unwrap());
    }
    let (parts, incoming) = req.into_parts();
    let h2 = parts.version == Version::HTTP_2;
    let content_length = content_length_of(&parts.headers);
    let read_body = |incoming| async move {
        let read = read_limited(incoming, content_length, ctx.max_body_bytes, h2);
        read.await.inspect_err(|e| {
            if e.status == StatusCode::PAYLOAD_TOO_LARGE {
                ctx.shared
                    .metrics
                    .requests_refused(RequestRefusal::MaxBodyBytes)
                    .inc();
            }
        })
    };
    if route == Route::Metadata {
        // Long-lived tokens only; the answer carries a session token derived from it.
        let access = ctx.tokens.authenticate_long_lived(&parts.headers)?;
        access.count_request();
        let body = read_body(incoming).await?;
        span.set("http.request.body.size", body.len() as i64);
        if ctx.shared.session_ttl.is_zero() {
            // `--session-token-ttl 0`: the presented token itself, for a day, as upstream.
            let token = auth::bearer_token(&parts.headers).unwrap_or_default();
            let expires = SystemTime::now() + Duration::from_secs(24 * 3600);
            return metadata::exchange(&body, token, expires, &ctx.shared.endpoint_url);
        }
        let expires = SystemTime::now() + ctx.shared.session_ttl;
        let session = auth::issue_session(&access, expires);
        return metadata::exchange(&body, &session, expires, &ctx.shared.endpoint_url);
    }
    let access = check_data_path_headers(&parts.headers, &ctx.tokens)?;
    access.count_request();
    if route == Route::AtomicWrite {
        // Refused before the body is read.
        access.check_write()?;
    }
    // A watch takes its slots before its body is read (and keeps them while it streams).
    let watch_permit = match route {
        Route::Watch => Some(watches.take().map_err(|reason| {
            ctx.shared.metrics.requests_refused(reason).inc();
            ApiError::too_many_watches(reason, watches.limits())
        })?),
        _ => None,
    };
    let body = read_body(incoming).await?;
    span.set("http.request.body.size", body.len() as i64);
    // Counted before decoding: a body of many small messages is refused without them.
    let counted = |check: fn(&[u8]) -> Result<(), crate::kv::KvError>| {
        check(&body).map_err(|e| {
            ctx.shared
                .metrics
                .requests_refused(RequestRefusal::TooManyMessages)
                .inc();
            ApiError::from(e)
        })
    };
    match route {
        Route::SnapshotRead => {
            counted(wire::snapshot_read)?;
            snapshot_read(decode(&body)?, ctx, span, &access).await
        }
        Route::AtomicWrite => {
            counted(wire::atomic_write).inspect_err(|_| ctx.shared.metrics.writes_invalid.inc())?;
            atomic_write(decode(&body)?, ctx, span, &access).await
        }
        Route::Watch => {
            counted(wire::watch)?;
            let req: pb::Watch = decode(&body)?;
            span.set("denokv.watch.keys", req.keys.len() as i64);
            let permit = watch_permit.expect("taken above for a watch");
            watch::start(req, ctx, access, permit)
        }
        Route::Metadata | Route::Other => unreachable!("handled above"),
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Metadata,
    SnapshotRead,
    AtomicWrite,
    Watch,
    Other,
}

impl Route {
    fn of(path: &str) -> Route {
        match path {
            "/" => Route::Metadata,
            "/v2/snapshot_read" => Route::SnapshotRead,
            "/v2/atomic_write" => Route::AtomicWrite,
            "/v2/watch" => Route::Watch,
            _ => Route::Other,
        }
    }

    /// The `http.route` of a span.
    fn path(self) -> &'static str {
        match self {
            Route::Metadata => "/",
            Route::SnapshotRead => "/v2/snapshot_read",
            Route::AtomicWrite => "/v2/atomic_write",
            Route::Watch => "/v2/watch",
            Route::Other => "",
        }
    }

    /// A span's name: `POST /v2/atomic_write`; just the method for an unknown path, whose
    /// name must not grow with every path a scanner tries.
    fn span_name(self, method: &Method) -> std::borrow::Cow<'static, str> {
        match (self, method == Method::POST) {
            (Route::Metadata, true) => "POST /".into(),
            (Route::SnapshotRead, true) => "POST /v2/snapshot_read".into(),
            (Route::AtomicWrite, true) => "POST /v2/atomic_write".into(),
            (Route::Watch, true) => "POST /v2/watch".into(),
            (Route::Other, _) => method.as_str().to_string().into(),
            (route, false) => format!("{} {}", method.as_str(), route.path()).into(),
        }
    }

    fn label(self) -> RouteLabel {
        match self {
            Route::Metadata => RouteLabel::Metadata,
            Route::SnapshotRead => RouteLabel::SnapshotRead,
            Route::AtomicWrite => RouteLabel::AtomicWrite,
            Route::Watch => RouteLabel::Watch,
            Route::Other => RouteLabel::Other,
        }
    }
}

/// The checks every data-path request passes first, in upstream's order (SPEC §1.4); returns
/// whose token the request carries. Public for the fuzz target `headers` (fuzz/).
pub fn check_data_path_headers(
    headers: &HeaderMap,
    tokens: &CoreTokens,
) -> Result<Arc<Access>, ApiError> {
    let version = headers
        .get("x-denokv-version")
        .and_then(|v| v.to_str().ok());
    if !matches!(version, Some("2" | "3")) {
        return Err(ApiError::bad_request("Expected protocol version 2."));
    }
    let access = tokens.authenticate(headers)?;
    let id = headers
        .get("x-denokv-database-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| uuid::Uuid::parse_str(v).ok());
    if id != Some(uuid::Uuid::nil()) {
        return Err(ApiError::bad_request("Invalid database id."));
    }
    Ok(access)
}

fn content_length_of(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse().ok())
}

fn decode<M: Message + Default>(body: &Bytes) -> Result<M, ApiError> {
    M::decode(body.clone())
        .map_err(|e| ApiError::bad_request(format!("Request protobuf is invalid: {e}.")))
}

fn protobuf(msg: &impl Message) -> Response<Body> {
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(full(msg.encode_to_vec()))
        .expect("static response parts are valid")
}

fn entry_to_pb(e: Entry) -> pb::KvEntry {
    pb::KvEntry {
        key: e.key,
        value: e.value.data,
        encoding: e.value.encoding as i32,
        versionstamp: Bytes::copy_from_slice(&e.versionstamp.0),
    }
}

async fn snapshot_read(
    req: pb::SnapshotRead,
    ctx: &CoreContext,
    span: &mut Span,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    span.set("denokv.read.ranges", req.ranges.len() as i64);
    let ranges = validate::snapshot_read(req)?;
    access.check_ranges(ranges.iter().map(|r| (&r.start[..], &r.end[..])))?;
    // The worst case of the answer while reading, then what it really holds until it is sent.
    let metrics = &ctx.shared.metrics;
    let permit = ctx
        .read_budget
        .reserve(read_answer::worst_case(&ranges), metrics)
        .await;
    let results = ctx.read(|reader| reader.read_ranges(&ranges, now_ms()))?;
    if span.is_on() {
        let entries: usize = results.iter().map(Vec::len).sum();
        span.set("denokv.read.entries", entries as i64);
    }
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/x-protobuf")
        .body(read_answer::answer(results, permit, metrics))
        .expect("static response parts are valid"))
}

async fn atomic_write(
    req: pb::AtomicWrite,
    ctx: &CoreContext,
    span: &mut Span,
    access: &Access,
) -> Result<Response<Body>, ApiError> {
    if span.is_on() {
        span.set("denokv.write.checks", req.checks.len() as i64);
        span.set("denokv.write.mutations", req.mutations.len() as i64);
        span.set("denokv.write.enqueues", req.enqueues.len() as i64);
    }
    let write = validate::atomic_write(req, now_ms()).inspect_err(|_| {
        // Counted with those the committer finds invalid: one count per rejected write.
        ctx.shared.metrics.writes_invalid.inc();
    })?;
    // Every key the write touches: checks, mutations (a versionstamped key is the mutation's
    // key and a suffix part, so it lies wherever that key does) and dead-letter keys.
    access.check_keys(
        write
            .checks
            .iter()
            .map(|c| &c.key[..])
            .chain(write.mutations.iter().map(|m| &m.key[..]))
            .chain(
                write
                    .enqueues
                    .iter()
                    .flat_map(|e| e.keys_if_undelivered.iter().map(|k| &k[..])),
            ),
    )?;
    let Some(committer) = &ctx.shared.committer else {
        // Read-only: a 200 that says so, not a 400 (SPEC §10 D6).
        span.set("denokv.write.outcome", "write_disabled");
        return Ok(protobuf(&pb::AtomicWriteOutput {
            status: pb::AtomicWriteStatus::AwWriteDisabled as i32,
            ..Default::default()
        }));
    };
    // Alone on its core, the write may be committed right here: blocking this thread for the
    // commit then holds up no other request.
    let inline = match ctx.handling.get() {
        1 => Inline::WhenIdle,
        _ => Inline::Never,
    };
    if inline == Inline::WhenIdle {
        // Another process's RESTART checkpoint waits for every read snapshot to end while it
        // keeps writers out: one this thread held would block its own commit until the busy
        // timeout.
        ctx.reader.borrow_mut().release();
    }
    let (outcome, batch) = committer.write_traced(write, span.context(), inline).await;
    if let Some(batch) = &batch {
        // The commit batch span that carried this write (it links back to this span).
        span.add_link(batch);
    }
    let outcome = outcome?;
    span.set(
        "denokv.write.outcome",
        match &outcome {
            WriteOutcome::Committed(_) => "committed",
            WriteOutcome::ChecksFailed(_) => "check_failed",
        },
    );
    let out = match outcome {
        WriteOutcome::Committed(stamp) => pb::AtomicWriteOutput {
            status: pb::AtomicWriteStatus::AwSuccess as i32,
            versionstamp: Bytes::copy_from_slice(&stamp.0),
            failed_checks: Vec::new(),
        },
        WriteOutcome::ChecksFailed(failed) => pb::AtomicWriteOutput {
            status: pb::AtomicWriteStatus::AwCheckFailure as i32,
            versionstamp: Bytes::new(),
            failed_checks: failed,
        },
    };
    Ok(protobuf(&out))
}
