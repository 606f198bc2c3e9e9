//! Talking to the server: the metadata exchange, HTTP/1.1 and h2c connections, and the
//! data-path calls, with every failure sorted into the kind the report counts.
//!
//! Connections are made by hand (`hyper::client::conn`) rather than through a pooling client,
//! so that the connection layout is exactly what was asked for: one HTTP/1.1 connection per
//! client, or a fixed number of HTTP/2 connections shared by all clients.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use denokv::proto;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use prost::Message;
use tokio::net::TcpStream;

use crate::data;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    /// HTTP/1.1, one keep-alive connection per client.
    H1,
    /// Cleartext HTTP/2 with prior knowledge, as the Deno CLI talks: many streams per connection.
    H2,
}

/// Why a call failed, sorted the way the report counts failures.
#[derive(Debug, Clone)]
pub enum CallError {
    /// The server answered with a status other than 200.
    Http { status: u16, line: String },
    /// No complete answer. `sent` is false only when the request surely never left this
    /// process (no connection could be made); otherwise a write may or may not have committed.
    Transport { sent: bool, what: String },
    /// A 200 whose body is not what the protocol promises.
    Protocol(String),
}

impl CallError {
    /// The key this failure is counted under in the report.
    pub fn label(&self) -> String {
        match self {
            CallError::Http { status, line } => format!("HTTP {status}: {line}"),
            CallError::Transport { what, .. } => format!("transport: {what}"),
            CallError::Protocol(what) => format!("protocol: {what}"),
        }
    }

    /// True when a write that failed this way may nevertheless have committed.
    pub fn maybe_committed(&self) -> bool {
        matches!(self, CallError::Transport { sent: true, .. })
    }

    pub fn is_transport(&self) -> bool {
        matches!(self, CallError::Transport { .. })
    }
}

fn transport(sent: bool, what: &str, e: &dyn std::error::Error) -> CallError {
    // hyper's errors keep the interesting part (e.g. "Connection reset by peer") in the source
    // chain, not in their own Display.
    let mut text = format!("{what}: {e}");
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    CallError::Transport { sent, what: text }
}

/// The data path as the metadata exchange described it.
pub struct Endpoint {
    pub proto: Proto,
    /// `host:port` of the data path.
    pub authority: String,
    /// Path of the data-path routes, e.g. `/v2` (SPEC §1.2).
    prefix: String,
    headers: HeaderMap,
    pub timeout: Duration,
}

impl Endpoint {
    /// A data-path request: `POST <endpoint>/<route>` with the KV Connect headers.
    pub fn request(&self, route: &str, body: Bytes) -> Request<Full<Bytes>> {
        let path = format!("{}/{route}", self.prefix);
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = request_uri(self.proto, &self.authority, &path)
            .parse()
            .expect("the endpoint URL was checked by the metadata exchange");
        *req.headers_mut() = self.headers.clone();
        req
    }

    /// A connection of this endpoint's protocol that belongs to one client alone.
    pub fn dedicated(&self) -> Conn {
        Conn::dedicated(self.proto, &self.authority)
    }
}

/// HTTP/1.1 requests carry the origin form plus a Host header; HTTP/2 needs the absolute form
/// (hyper turns scheme and authority into the `:scheme` and `:authority` pseudo-headers).
fn request_uri(proto: Proto, authority: &str, path: &str) -> String {
    match proto {
        Proto::H1 => path.to_string(),
        Proto::H2 => format!("http://{authority}{path}"),
    }
}

/// The metadata exchange (SPEC §1.3): POST `{"supportedVersions":[2,3]}` to the URL, check for
/// 200, and take the endpoint, token, database id and version from the answer.
pub async fn discover(
    url: &str,
    token: &str,
    proto: Proto,
    timeout: Duration,
) -> anyhow::Result<Endpoint> {
    let uri: http::Uri = url.parse().with_context(|| format!("bad --url {url:?}"))?;
    if uri.scheme_str() != Some("http") {
        bail!("--url must be an http:// URL (TLS is expected to end at a proxy), got {url:?}");
    }
    let authority = uri
        .authority()
        .ok_or_else(|| anyhow!("--url has no host: {url:?}"))?
        .to_string();
    let path = uri.path().to_string();

    let mut req = Request::new(Full::new(Bytes::from_static(
        br#"{"supportedVersions":[2,3]}"#,
    )));
    *req.method_mut() = Method::POST;
    *req.uri_mut() = request_uri(proto, &authority, &path).parse()?;
    let h = req.headers_mut();
    h.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {token}"))?,
    );
    h.insert("content-type", HeaderValue::from_static("application/json"));
    if proto == Proto::H1 {
        h.insert("host", HeaderValue::from_str(&authority)?);
    }
    let mut conn = Conn::dedicated(proto, &authority);
    let body = conn
        .call(req, timeout)
        .await
        .map_err(|e| anyhow!("metadata exchange with {url} failed: {}", e.label()))?;

    let meta: serde_json::Value =
        serde_json::from_slice(&body).context("metadata answer is not JSON")?;
    let version = meta["version"]
        .as_u64()
        .filter(|v| *v == 2 || *v == 3)
        .ok_or_else(|| anyhow!("metadata answer has no usable version: {meta}"))?;
    let database_id = meta["databaseId"]
        .as_str()
        .ok_or_else(|| anyhow!("metadata answer has no databaseId: {meta}"))?;
    // The answer's token is a session token that expires (after 15 minutes by default), and
    // this client does not refresh metadata as Deno does: the data path takes the long-lived
    // token too, so runs of any length use that.
    meta["token"]
        .as_str()
        .ok_or_else(|| anyhow!("metadata answer has no token: {meta}"))?;
    let data_token = token;
    // Like Deno: the first strongly consistent endpoint serves every call.
    let endpoint_url = meta["endpoints"]
        .as_array()
        .and_then(|eps| eps.iter().find(|e| e["consistency"] == "strong"))
        .and_then(|e| e["url"].as_str())
        .ok_or_else(|| anyhow!("metadata answer has no strong endpoint: {meta}"))?;
    let (data_authority, prefix) = resolve_endpoint(&authority, &path, endpoint_url)?;

    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        HeaderValue::from_str(&format!("Bearer {data_token}"))?,
    );
    headers.insert("x-denokv-version", HeaderValue::from(version));
    headers.insert("x-denokv-database-id", HeaderValue::from_str(database_id)?);
    headers.insert(
        "content-type",
        HeaderValue::from_static("application/x-protobuf"),
    );
    if proto == Proto::H1 {
        headers.insert("host", HeaderValue::from_str(&data_authority)?);
    }
    Ok(Endpoint {
        proto,
        authority: data_authority,
        prefix,
        headers,
        timeout,
    })
}

/// Resolves the endpoint URL of the metadata answer against the metadata URL (SPEC §1.3.3):
/// absolute `http://…`, absolute path `/v2`, or relative to the metadata URL's folder.
fn resolve_endpoint(
    authority: &str,
    meta_path: &str,
    url: &str,
) -> anyhow::Result<(String, String)> {
    if url.contains("://") {
        let uri: http::Uri = url
            .parse()
            .with_context(|| format!("bad endpoint URL {url:?}"))?;
        if uri.scheme_str() != Some("http") {
            bail!("endpoint {url:?} is not http://; this tool speaks cleartext only");
        }
        let a = uri
            .authority()
            .ok_or_else(|| anyhow!("endpoint URL {url:?} has no host"))?;
        return Ok((a.to_string(), uri.path().trim_end_matches('/').to_string()));
    }
    if url.starts_with('/') {
        return Ok((authority.to_string(), url.to_string()));
    }
    let folder = &meta_path[..meta_path.rfind('/').map_or(0, |i| i + 1)];
    Ok((authority.to_string(), format!("{folder}{url}")))
}

/// An HTTP/2 connection shared by many clients; re-opened by the first client that finds it
/// closed (the others wait for that one instead of each dialling).
pub struct SharedH2 {
    authority: String,
    current: Mutex<Option<http2::SendRequest<Full<Bytes>>>>,
    dialing: tokio::sync::Mutex<()>,
}

impl SharedH2 {
    pub fn new(authority: &str) -> Arc<SharedH2> {
        Arc::new(SharedH2 {
            authority: authority.to_string(),
            current: Mutex::new(None),
            dialing: tokio::sync::Mutex::new(()),
        })
    }

    fn open(&self) -> Option<http2::SendRequest<Full<Bytes>>> {
        let current = self.current.lock().unwrap();
        current.as_ref().filter(|s| !s.is_closed()).cloned()
    }

    async fn sender(&self) -> Result<http2::SendRequest<Full<Bytes>>, CallError> {
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let _turn = self.dialing.lock().await;
        if let Some(s) = self.open() {
            return Ok(s);
        }
        let s = dial_h2(&self.authority).await?;
        *self.current.lock().unwrap() = Some(s.clone());
        Ok(s)
    }
}

/// One client's way to the server.
pub enum Conn {
    /// A keep-alive HTTP/1.1 connection of its own, re-dialled after any failure.
    H1 {
        authority: String,
        sender: Option<http1::SendRequest<Full<Bytes>>>,
    },
    /// A stream slot on a shared HTTP/2 connection.
    H2(Arc<SharedH2>),
}

impl Conn {
    pub fn dedicated(proto: Proto, authority: &str) -> Conn {
        match proto {
            Proto::H1 => Conn::H1 {
                authority: authority.to_string(),
                sender: None,
            },
            Proto::H2 => Conn::H2(SharedH2::new(authority)),
        }
    }

    /// Opens the connection now, so that the first timed request does not pay for it.
    pub async fn connect(&mut self) -> Result<(), CallError> {
        match self {
            Conn::H1 { authority, sender } => {
                if sender.as_ref().is_none_or(|s| s.is_closed()) {
                    *sender = Some(dial_h1(authority).await?);
                }
            }
            Conn::H2(shared) => {
                shared.sender().await?;
            }
        }
        Ok(())
    }

    /// Sends a request; the response body is left to the caller (watch streams it).
    pub async fn send(
        &mut self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<Incoming>, CallError> {
        match self {
            Conn::H1 { .. } => {
                self.connect().await?;
                let Conn::H1 {
                    sender: Some(s), ..
                } = self
                else {
                    unreachable!("connect() leaves a sender")
                };
                let result = match s.ready().await {
                    Err(e) => Err(transport(false, "connection not ready", &e)),
                    Ok(()) => s
                        .send_request(req)
                        .await
                        .map_err(|e| transport(true, "request failed", &e)),
                };
                if result.is_err() {
                    self.reset();
                }
                result
            }
            Conn::H2(shared) => {
                let mut s = shared.sender().await?;
                s.ready()
                    .await
                    .map_err(|e| transport(false, "connection not ready", &e))?;
                s.send_request(req)
                    .await
                    .map_err(|e| transport(true, "request failed", &e))
            }
        }
    }

    /// Sends a request and reads the whole answer; anything but 200 is an error.
    pub async fn call(
        &mut self,
        req: Request<Full<Bytes>>,
        timeout: Duration,
    ) -> Result<Bytes, CallError> {
        let answer = tokio::time::timeout(timeout, async {
            let resp = self.send(req).await?;
            let status = resp.status().as_u16();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| transport(true, "reading the answer failed", &e))?
                .to_bytes();
            if status != 200 {
                return Err(CallError::Http {
                    status,
                    line: first_line(&body),
                });
            }
            Ok(body)
        })
        .await
        .unwrap_or_else(|_| {
            Err(CallError::Transport {
                sent: true,
                what: format!("no answer within {timeout:?}"),
            })
        });
        if matches!(answer, Err(CallError::Transport { .. })) {
            // An HTTP/1.1 connection whose exchange broke off cannot be reused.
            self.reset();
        }
        answer
    }

    fn reset(&mut self) {
        if let Conn::H1 { sender, .. } = self {
            *sender = None;
        }
    }
}

/// The first line of an error body, which is where the server puts its message (SPEC §1.6).
fn first_line(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or("").trim();
    if line.chars().count() > 160 {
        format!("{}…", line.chars().take(160).collect::<String>())
    } else {
        line.to_string()
    }
}

async fn tcp(authority: &str) -> Result<TokioIo<TcpStream>, CallError> {
    let stream = TcpStream::connect(authority)
        .await
        .map_err(|e| transport(false, "connect", &e))?;
    // Without TCP_NODELAY a request written in two parts (h2 HEADERS, then DATA; or h1 head
    // and body) waits for the peer's delayed ACK: 40 ms a request.
    stream
        .set_nodelay(true)
        .map_err(|e| transport(false, "TCP_NODELAY", &e))?;
    Ok(TokioIo::new(stream))
}

async fn dial_h1(authority: &str) -> Result<http1::SendRequest<Full<Bytes>>, CallError> {
    let io = tcp(authority).await?;
    let (sender, conn) = http1::handshake(io)
        .await
        .map_err(|e| transport(false, "handshake", &e))?;
    tokio::spawn(async move {
        // Its end is seen by the next request on it (is_closed / ready fail).
        let _ = conn.await;
    });
    Ok(sender)
}

async fn dial_h2(authority: &str) -> Result<http2::SendRequest<Full<Bytes>>, CallError> {
    let io = tcp(authority).await?;
    let (sender, conn) = http2::Builder::new(TokioExecutor::new())
        .handshake(io)
        .await
        .map_err(|e| transport(false, "handshake", &e))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A protobuf call: encode, POST, decode.
async fn rpc<Req: Message, Resp: Message + Default>(
    conn: &mut Conn,
    ep: &Endpoint,
    route: &str,
    msg: &Req,
) -> Result<Resp, CallError> {
    let body = conn
        .call(
            ep.request(route, Bytes::from(msg.encode_to_vec())),
            ep.timeout,
        )
        .await?;
    Resp::decode(body).map_err(|e| CallError::Protocol(format!("undecodable {route} answer: {e}")))
}

/// `snapshot_read`: the entries of each range, in order.
pub async fn snapshot_read(
    conn: &mut Conn,
    ep: &Endpoint,
    ranges: Vec<proto::ReadRange>,
) -> Result<Vec<Vec<proto::KvEntry>>, CallError> {
    let asked = ranges.len();
    let out: proto::SnapshotReadOutput =
        rpc(conn, ep, "snapshot_read", &proto::SnapshotRead { ranges }).await?;
    if out.status != proto::SnapshotReadStatus::SrSuccess as i32 {
        return Err(CallError::Protocol(format!("read status {}", out.status)));
    }
    if out.ranges.len() != asked {
        return Err(CallError::Protocol(format!(
            "{} ranges answered for {asked} asked",
            out.ranges.len()
        )));
    }
    Ok(out.ranges.into_iter().map(|r| r.values).collect())
}

/// A single-key read range `[k, k ++ 00)` with limit 1, the way Deno's `get` reads.
pub fn get_range(key: &Bytes) -> proto::ReadRange {
    proto::ReadRange {
        start: key.clone(),
        end: data::exact_end(key),
        limit: 1,
        reverse: false,
    }
}

/// What a write that the server answered did.
pub enum Written {
    /// Committed with this versionstamp.
    Committed(u128),
    /// A check failed; nothing was written.
    CheckFailed,
}

/// `atomic_write`.
pub async fn atomic_write(
    conn: &mut Conn,
    ep: &Endpoint,
    write: &proto::AtomicWrite,
) -> Result<Written, CallError> {
    let out: proto::AtomicWriteOutput = rpc(conn, ep, "atomic_write", write).await?;
    match proto::AtomicWriteStatus::try_from(out.status) {
        Ok(proto::AtomicWriteStatus::AwSuccess) => data::versionstamp(&out.versionstamp)
            .map(Written::Committed)
            .ok_or_else(|| {
                CallError::Protocol(format!(
                    "success with a {}-byte versionstamp",
                    out.versionstamp.len()
                ))
            }),
        Ok(proto::AtomicWriteStatus::AwCheckFailure) => Ok(Written::CheckFailed),
        Ok(proto::AtomicWriteStatus::AwWriteDisabled) => {
            Err(CallError::Protocol("writes are disabled".into()))
        }
        _ => Err(CallError::Protocol(format!("write status {}", out.status))),
    }
}

/// A `set` of a `VE_BYTES` value.
pub fn set_bytes(key: Bytes, value: Bytes) -> proto::Mutation {
    proto::Mutation {
        key,
        value: Some(proto::KvValue {
            data: value,
            encoding: proto::ValueEncoding::VeBytes as i32,
        }),
        mutation_type: proto::MutationType::MSet as i32,
        ..Default::default()
    }
}

/// A mutation with an LE64 operand (`set`, `sum`, …).
pub fn le64(kind: proto::MutationType, key: Bytes, n: u64) -> proto::Mutation {
    proto::Mutation {
        key,
        value: Some(proto::KvValue {
            data: Bytes::copy_from_slice(&n.to_le_bytes()),
            encoding: proto::ValueEncoding::VeLe64 as i32,
        }),
        mutation_type: kind as i32,
        ..Default::default()
    }
}

/// The number an LE64 entry holds, if it is one.
pub fn le64_value(entry: &proto::KvEntry) -> Option<u64> {
    if entry.encoding != proto::ValueEncoding::VeLe64 as i32 {
        return None;
    }
    Some(u64::from_le_bytes(entry.value.as_ref().try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_urls_resolve_like_deno() {
        let r = |p: &str, u: &str| resolve_endpoint("h:1", p, u).unwrap();
        assert_eq!(r("/", "/v2"), ("h:1".into(), "/v2".into()));
        assert_eq!(r("/db/meta", "v2"), ("h:1".into(), "/db/v2".into()));
        assert_eq!(r("/", "http://other:2/x"), ("other:2".into(), "/x".into()));
        assert!(resolve_endpoint("h:1", "/", "https://other/x").is_err());
    }

    #[test]
    fn error_bodies_are_cut_to_their_first_line() {
        assert_eq!(
            first_line(b"Invalid access token.\nmore"),
            "Invalid access token."
        );
        assert_eq!(first_line(b""), "");
    }
}
