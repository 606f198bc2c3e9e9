//! Test harness: runs the real `denokv` binary on a free loopback port with a temporary
//! database, and talks to it over HTTP/1.1 or h2c.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client as HyperClient};
use hyper_util::rt::TokioExecutor;
use prost::Message;

pub mod moto;
pub mod notify;

pub const TOKEN: &str = "0123456789abcdef";
pub const NIL_ID: &str = "00000000-0000-0000-0000-000000000000";

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_denokv")
}

/// A running server; stopped (SIGKILL) on drop if not stopped before.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Where `/metrics` is served, from the log line `Metrics on http://ADDR/metrics`.
    pub metrics_addr: Option<SocketAddr>,
    pub db: PathBuf,
    wrapped: bool,
    _dir: Option<tempfile::TempDir>,
    pub log: Arc<Mutex<Vec<String>>>,
}

impl Server {
    /// A fresh database in a temporary folder.
    pub fn start(extra: &[&str]) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let mut s = Server::start_on(&db, extra);
        s._dir = Some(dir);
        s
    }

    /// A server on the database file `db`, with `extra` arguments.
    pub fn start_on(db: &Path, extra: &[&str]) -> Server {
        Launch::new(db).args(extra).start()
    }
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// `GET /metrics`: the status, the `Content-Type` and the body.
    pub fn scrape(&self) -> (u16, String, String) {
        let addr = self.metrics_addr.expect("the server serves metrics");
        http_get(addr, "/metrics")
    }

    pub fn log_text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// The server's pid: the child itself, or the child's child when a wrapper runs it.
    pub fn pid(&self) -> i32 {
        let pid = self.child.as_ref().unwrap().id();
        if self.wrapped {
            let children =
                std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
            children
                .split_whitespace()
                .next()
                .expect("the wrapper runs the server")
                .parse()
                .unwrap()
        } else {
            pid as i32
        }
    }

    /// Sends `signal` to the server.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid()), signal).unwrap();
    }

    /// Waits until a log line contains `text`; panics with the log after `limit`.
    pub fn wait_for_log(&self, text: &str, limit: Duration) -> String {
        let start = std::time::Instant::now();
        loop {
            if let Some(line) = self.log.lock().unwrap().iter().find(|l| l.contains(text)) {
                return line.clone();
            }
            if start.elapsed() > limit {
                panic!(
                    "no log line with {text:?} within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM to the server, then wait for the exit (of the wrapper, if any). This blocks the
    /// thread: from async tests call it in `spawn_blocking`, or a client connection on the same
    /// runtime cannot answer the server's HTTP/2 GOAWAY ping and the drain runs out.
    pub fn stop(&mut self) -> ExitStatus {
        let pid = self.pid();
        let mut child = self.child.take().expect("running");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        wait_timeout(&mut child, Duration::from_secs(20))
    }

    /// Whether the server has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// Waits for the server to exit by itself; panics with the log after `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("running");
        let start = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            if start.elapsed() > limit {
                panic!(
                    "the server did not exit within {limit:?}; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, then wait for the exit.
    pub fn kill(&mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }
}

/// How to start a server: the command line, the environment, and what to do before the server
/// logs its address.
pub struct Launch {
    /// The whole command: the wrapper, if any, then the binary and its arguments.
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    /// The server runs as a child of the wrapper (`strace -f`), not in its place (`exec`).
    forks: bool,
    /// Connect here once first: `systemd-socket-activate` starts the server on the first
    /// connection.
    kick: Option<SocketAddr>,
    /// Variables removed from the environment the server inherits.
    unset: Vec<String>,
}

impl Launch {
    /// `--sqlite-path DB serve --access-token TOKEN --addr 127.0.0.1:0`.
    pub fn new(db: &Path) -> Launch {
        Launch::bare(db).args(&["--access-token", TOKEN, "--addr", "127.0.0.1:0"])
    }

    /// `--sqlite-path DB serve` and nothing else (and `DENOKV_METRICS_ADDR=127.0.0.1:0`, so
    /// that servers of parallel tests do not compete for the default metrics port).
    pub fn bare(db: &Path) -> Launch {
        Launch {
            cmd: vec![
                binary().to_string(),
                "--sqlite-path".into(),
                db.display().to_string(),
                "serve".into(),
            ],
            env: vec![
                ("RUST_LOG".into(), "info".into()),
                ("DENOKV_METRICS_ADDR".into(), "127.0.0.1:0".into()),
            ],
            unset: Vec::new(),
            forks: false,
            kick: None,
        }
    }

    pub fn args(mut self, args: &[&str]) -> Launch {
        self.cmd.extend(args.iter().map(|s| s.to_string()));
        self
    }

    pub fn env(mut self, key: &str, value: &str) -> Launch {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Starts the server without `key`, whatever the environment of the tests holds.
    pub fn env_remove(mut self, key: &str) -> Launch {
        self.unset.push(key.into());
        self
    }

    /// Runs `wrapper` with the binary and its arguments after it. `forks`: the wrapper runs
    /// the server as its child rather than exec'ing it.
    pub fn wrapper(mut self, wrapper: &[&str], forks: bool) -> Launch {
        let mut cmd: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        cmd.append(&mut self.cmd);
        self.cmd = cmd;
        self.forks = forks;
        self
    }

    /// Runs the server under `strace -f -qq -o output options…` (to trace its system calls
    /// into `output`, or to make some fail with `-e inject=…`).
    pub fn under_strace(self, output: &str, options: &[&str]) -> Launch {
        assert!(
            Command::new("strace").arg("-V").output().is_ok(),
            "strace is needed for this test (apt-get install strace)"
        );
        let mut wrapper = vec!["strace", "-f", "-qq", "-o", output];
        wrapper.extend_from_slice(options);
        self.wrapper(&wrapper, true)
    }

    pub fn kick(mut self, addr: SocketAddr) -> Launch {
        self.kick = Some(addr);
        self
    }

    pub fn start(self) -> Server {
        let mut command = Command::new(&self.cmd[0]);
        command
            .args(&self.cmd[1..])
            .env_remove("DENO_KV_ACCESS_TOKEN")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .env_remove("LISTEN_FDS")
            .env_remove("CREDENTIALS_DIRECTORY")
            .env_remove("JOURNAL_STREAM");
        // Traces only where a test asks for them, whatever the shell running the tests set.
        for (k, _) in std::env::vars_os() {
            if k.to_str().is_some_and(|k| k.starts_with("OTEL_")) {
                command.env_remove(k);
            }
        }
        for k in &self.unset {
            command.env_remove(k);
        }
        for (k, v) in &self.env {
            command.env(k, v);
        }
        let mut child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.cmd[0]));
        drop(command);
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let metrics_addr = Arc::new(Mutex::new(None));
        let metrics_sink = metrics_addr.clone();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("Metrics on http://") {
                    let rest = &line[i + "Metrics on http://".len()..];
                    let addr = rest.trim().trim_end_matches("/metrics").parse().ok();
                    *metrics_sink.lock().unwrap() = addr;
                }
                // http:// or, with --tls-cert, https://.
                if let Some(i) = line.find("Listening on http") {
                    let rest = &line[i..];
                    let addr = rest[rest.find("://").unwrap() + 3..].trim().to_string();
                    let _ = tx.send(addr);
                }
                sink.lock().unwrap().push(line);
            }
        });
        if let Some(addr) = self.kick {
            let start = std::time::Instant::now();
            while std::net::TcpStream::connect(addr).is_err() {
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "nothing listens on {addr}; log:\n{}",
                    log.lock().unwrap().join("\n")
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addr = match rx.recv_timeout(Duration::from_secs(20)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "server did not start; log:\n{}",
                    log.lock().unwrap().join("\n")
                )
            }
        };
        let db = self
            .cmd
            .iter()
            .position(|a| a == "--sqlite-path")
            .map(|i| PathBuf::from(&self.cmd[i + 1]))
            .unwrap_or_default();
        // Logged before the serving address.
        let metrics_addr = *metrics_addr.lock().unwrap();
        Server {
            child: Some(child),
            addr,
            metrics_addr,
            db,
            wrapped: self.forks,
            _dir: None,
            log,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = std::time::Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the binary to completion (for start-up errors).
pub fn run_binary(args: &[&str], env: &[(&str, &str)]) -> (ExitStatus, String) {
    let mut cmd = Command::new(binary());
    cmd.args(args)
        .env_remove("DENO_KV_ACCESS_TOKEN")
        .env_remove("DENO_KV_SQLITE_PATH")
        .env("DENOKV_METRICS_ADDR", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    H1,
    H2,
}

pub const BOTH: [Proto; 2] = [Proto::H1, Proto::H2];

/// An HTTP/1.1 and an h2c (prior knowledge) client.
#[derive(Clone)]
pub struct Client {
    h1: HyperClient<HttpConnector, Full<Bytes>>,
    h2: HyperClient<HttpConnector, Full<Bytes>>,
}

pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn content_type(&self) -> &str {
        self.headers
            .get("content-type")
            .map_or("", |v| v.to_str().unwrap())
    }

    pub fn decode<M: Message + Default>(&self) -> M {
        assert_eq!(
            self.status,
            200,
            "expected 200, got {}: {}",
            self.status,
            self.text()
        );
        M::decode(self.body.clone()).unwrap()
    }
}

impl Default for Client {
    fn default() -> Self {
        Client::new()
    }
}

impl Client {
    pub fn new() -> Self {
        // Without TCP_NODELAY a request written in two parts (h2 HEADERS, then DATA) waits
        // for the peer's delayed ACK: 40 ms a request.
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        Client {
            h1: HyperClient::builder(TokioExecutor::new()).build(connector.clone()),
            h2: HyperClient::builder(TokioExecutor::new())
                .http2_only(true)
                .build(connector),
        }
    }

    pub async fn send(
        &self,
        proto: Proto,
        req: http::Request<Full<Bytes>>,
    ) -> http::Response<Incoming> {
        self.try_send(proto, req).await.unwrap()
    }

    pub async fn try_send(
        &self,
        proto: Proto,
        req: http::Request<Full<Bytes>>,
    ) -> Result<http::Response<Incoming>, hyper_util::client::legacy::Error> {
        let c = if proto == Proto::H1 {
            &self.h1
        } else {
            &self.h2
        };
        c.request(req).await
    }

    /// A data-path call that may fail at the transport level (server killed).
    pub async fn try_data(
        &self,
        proto: Proto,
        server_url: &str,
        route: &str,
        body: Vec<u8>,
    ) -> Option<Reply> {
        let req = data_request(&format!("{server_url}/v2/{route}"), body);
        let resp = self.try_send(proto, req).await.ok()?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.ok()?.to_bytes();
        Some(Reply {
            status,
            headers,
            body,
        })
    }

    pub async fn request(
        &self,
        proto: Proto,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut b = http::Request::builder().method(method).uri(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let resp = self
            .send(proto, b.body(Full::new(body.into())).unwrap())
            .await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A data-path call with the right headers.
    pub async fn data(
        &self,
        proto: Proto,
        server: &Server,
        route: &str,
        body: impl Into<Bytes>,
    ) -> Reply {
        let auth = format!("Bearer {TOKEN}");
        let headers = [
            ("authorization", auth.as_str()),
            ("x-denokv-version", "3"),
            ("x-denokv-database-id", NIL_ID),
        ];
        self.request(
            proto,
            "POST",
            &server.url(&format!("/v2/{route}")),
            &headers,
            body,
        )
        .await
    }
}

/// A blocking HTTP/1.1 GET (for the metrics listener): the status, the `Content-Type` and the
/// body.
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String, String) {
    http_request(addr, "GET", path)
}

/// [`http_get`] with another method (and no request body).
pub fn http_request(addr: SocketAddr, method: &str, path: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a complete response");
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    (status, content_type, body.to_string())
}

/// A POST to a data-path URL with the headers a version 3 client sends.
pub fn data_request(url: &str, body: Vec<u8>) -> http::Request<Full<Bytes>> {
    http::Request::post(url)
        .header("authorization", format!("Bearer {TOKEN}"))
        .header("x-denokv-version", "3")
        .header("x-denokv-database-id", NIL_ID)
        .body(Full::new(Bytes::from(body)))
        .unwrap()
}

/// A `set` of `k` to the bytes `v`.
pub fn set_bytes(k: &Bytes, v: &[u8]) -> denokv::proto::Mutation {
    use denokv::proto as pb;
    pb::Mutation {
        key: k.clone(),
        value: Some(pb::KvValue {
            data: Bytes::copy_from_slice(v),
            encoding: pb::ValueEncoding::VeBytes as i32,
        }),
        mutation_type: pb::MutationType::MSet as i32,
        ..Default::default()
    }
}

/// The key `[s]`, encoded as Deno encodes a one-string key.
pub fn key(s: &str) -> Bytes {
    Bytes::from(denokv::kv::key::encode(&[
        denokv::kv::key::KeyPart::String(s.into()),
    ]))
}

pub fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

pub fn to_hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Sets `[k]` to the bytes of `v` at the server `url`; `None` when the transport failed.
pub async fn set_key(c: &Client, p: Proto, url: &str, k: &str, v: &str) -> Option<Reply> {
    use denokv::proto as pb;
    let w = pb::AtomicWrite {
        mutations: vec![set_bytes(&key(k), v.as_bytes())],
        ..Default::default()
    };
    c.try_data(p, url, "atomic_write", w.encode_to_vec()).await
}

/// The value of `[k]` at the server `url`, if any.
pub async fn get_key(c: &Client, p: Proto, url: &str, k: &str) -> Option<Bytes> {
    use denokv::proto as pb;
    let key = key(k);
    let mut end = key.to_vec();
    end.push(0);
    let read = pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: key,
            end: Bytes::from(end),
            limit: 1,
            reverse: false,
        }],
    };
    let out: pb::SnapshotReadOutput = c
        .try_data(p, url, "snapshot_read", read.encode_to_vec())
        .await
        .unwrap()
        .decode();
    out.ranges[0].values.first().map(|e| e.value.clone())
}
