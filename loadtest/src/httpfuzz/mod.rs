//! `http-fuzz`: mutated requests against a running denokv server, over HTTP/1.1 on raw
//! sockets, HTTP/2 through a real client, and raw HTTP/2 frames.
//!
//! The server is started here, on loopback, with a token file: the fuzzed requests carry tokens
//! limited to the key prefix `["fuzz"]` (or none, or broken ones), and sentinel keys written
//! before the run under another prefix must be unchanged after it. During the run: no answer
//! may be a 5xx, every request must end (an answer, or a closed or reset connection) within
//! the hang timeout, the server must stay up, and a valid write and read must keep working.
//! After it: the server stops cleanly on SIGTERM and its database passes
//! `PRAGMA integrity_check`.
//!
//! Request number N of a seed is the same whatever the concurrency (each is made from its own
//! random generator), and every finding is saved with its bytes: `--replay FILE` sends it
//! again to a fresh server.

pub mod gen;
mod h1;
mod h2;
mod request;
mod server;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use denokv::kv::key::{encode, prefix_range, KeyPart};
use denokv::proto as pb;
use http_body_util::{BodyExt, Full};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cli::HttpFuzzArgs;
use gen::Route;
use request::{Creds, Req};
use server::{Server, Tokens};

/// The ways a request is put on the wire.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum, Serialize, Deserialize,
)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// HTTP/1.1 written byte by byte on a new connection (pipelined now and then).
    H1,
    /// HTTP/2 with prior knowledge through hyper's client (what Deno speaks).
    H2,
    /// HTTP/2 frames written by hand, mutated at the frame and HPACK level.
    H2Frames,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::H1 => "h1",
            Mode::H2 => "h2",
            Mode::H2Frames => "h2-frames",
        }
    }
}

/// A request as sent: enough to send it again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "mode", rename_all = "kebab-case")]
pub enum Wire {
    H1 { bytes: Vec<u8>, plan: h1::Plan },
    H2 { req: Req },
    H2Frames { bytes: Vec<u8> },
}

impl Wire {
    fn mode(&self) -> Mode {
        match self {
            Wire::H1 { .. } => Mode::H1,
            Wire::H2 { .. } => Mode::H2,
            Wire::H2Frames { .. } => Mode::H2Frames,
        }
    }

    /// The request as text, for a person (bytes that are not UTF-8 replaced, long ones cut).
    fn text(&self) -> String {
        let cut = |b: &[u8]| {
            let t = String::from_utf8_lossy(&b[..b.len().min(4096)]).into_owned();
            if b.len() > 4096 {
                format!("{t}… ({} bytes in all)", b.len())
            } else {
                t
            }
        };
        match self {
            Wire::H1 { bytes, .. } | Wire::H2Frames { bytes } => cut(bytes),
            Wire::H2 { req } => {
                let mut t = format!(
                    "{} {}\n",
                    String::from_utf8_lossy(&req.method),
                    String::from_utf8_lossy(&req.path)
                );
                for (n, v) in &req.headers {
                    t.push_str(&format!("{}: {}\n", String::from_utf8_lossy(n), cut(v)));
                }
                t.push_str(&format!("{:?}\n\n{}", req.framing, cut(&req.body)));
                t
            }
        }
    }
}

/// What came back for one request.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Exchange {
    /// The status of every answer (several for pipelined HTTP/1.1 or several h2 streams).
    pub statuses: Vec<u16>,
    /// The server closed the connection.
    pub closed: bool,
    /// The connection was reset, or (h2) the stream was.
    pub reset: bool,
    /// RST_STREAM frames received (raw h2).
    pub resets: u32,
    /// The error code of a GOAWAY received (raw h2).
    pub goaway: Option<u32>,
    /// A watch stream started (and was left).
    pub stream: bool,
    /// HEADERS whose `:status` was not decoded (raw h2).
    pub unknown_status: u32,
    /// The client refused to send it (h2: a method or header the `http` types reject).
    pub refused_by_client: bool,
    pub hang: Option<String>,
    pub connect_failed: Option<String>,
    /// The first line of what was not understood as an answer (HTTP/1.1).
    pub tail: String,
}

/// The name of an HTTP/2 error code (RFC 9113 §7).
fn h2_error(code: u32) -> String {
    const NAMES: [&str; 14] = [
        "NO_ERROR",
        "PROTOCOL_ERROR",
        "INTERNAL_ERROR",
        "FLOW_CONTROL_ERROR",
        "SETTINGS_TIMEOUT",
        "STREAM_CLOSED",
        "FRAME_SIZE_ERROR",
        "REFUSED_STREAM",
        "CANCEL",
        "COMPRESSION_ERROR",
        "CONNECT_ERROR",
        "ENHANCE_YOUR_CALM",
        "INADEQUATE_SECURITY",
        "HTTP_1_1_REQUIRED",
    ];
    NAMES
        .get(code as usize)
        .map_or_else(|| format!("0x{code:x}"), |n| n.to_string())
}

/// A 64-bit mix (splitmix64's finaliser).
pub fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Request number `index` of `seed`.
pub fn generate(seed: u64, index: u64, modes: &[Mode], creds: &Creds, now_ms: i64) -> Wire {
    let mut rng = StdRng::seed_from_u64(mix(seed ^ mix(index)));
    // Weights: HTTP/1.1 is where most of the parsing is ours to get wrong.
    let weighted: Vec<Mode> = modes
        .iter()
        .flat_map(|&m| {
            std::iter::repeat_n(
                m,
                match m {
                    Mode::H1 => 5,
                    Mode::H2 => 3,
                    Mode::H2Frames => 2,
                },
            )
        })
        .collect();
    let mode = weighted[rng.random_range(0..weighted.len())];
    let one = |rng: &mut StdRng| {
        let route = Route::ALL[rng.random_range(0..4)];
        let mut req = Req::valid(route, creds, rng, now_ms);
        let other = gen::valid_body(Route::ALL[rng.random_range(0..4)], rng, now_ms);
        req.mutate(&other, creds, rng);
        if rng.random_ratio(1, 3000) {
            // Past --max-body-bytes (2 MiB by default).
            req.body.resize(2_200_000, 0x0a);
        }
        req
    };
    match mode {
        Mode::H1 => {
            let req = one(&mut rng);
            let mut bytes = h1::serialize(&req, &mut rng);
            if rng.random_ratio(1, 10) {
                for _ in 0..rng.random_range(1..3) {
                    let next = one(&mut rng);
                    bytes.extend(h1::serialize(&next, &mut rng));
                }
            }
            if rng.random_ratio(1, 10) {
                h1::mutate_bytes(&mut bytes, &mut rng);
            }
            let plan = h1::plan(bytes.len(), &mut rng);
            Wire::H1 { bytes, plan }
        }
        Mode::H2 => Wire::H2 { req: one(&mut rng) },
        Mode::H2Frames => {
            let reqs: Vec<Req> = (0..rng.random_range(1..=3))
                .map(|_| one(&mut rng))
                .collect();
            Wire::H2Frames {
                bytes: h2::frames(&reqs, &mut rng),
            }
        }
    }
}

/// Sends one request the way its mode says.
pub async fn execute(
    wire: &Wire,
    addr: SocketAddr,
    h2conn: &mut Option<h2::Sender>,
    hang: Duration,
) -> Exchange {
    match wire {
        Wire::H1 { bytes, plan } => h1::exchange(addr, bytes, plan, hang).await,
        Wire::H2 { req } => match h2::build(req, addr) {
            Some(request) => h2::exchange(h2conn, addr, request, hang).await,
            None => Exchange {
                refused_by_client: true,
                ..Default::default()
            },
        },
        Wire::H2Frames { bytes } => h2::frames_exchange(addr, bytes, hang).await,
    }
}

/// A saved finding.
#[derive(Serialize, Deserialize)]
struct Finding {
    what: String,
    seed: u64,
    index: u64,
    wire: Wire,
    /// The request as text, for reading; `wire` is what is sent again.
    text: String,
    answer: serde_json::Value,
}

#[derive(Default)]
struct Counts {
    executions: u64,
    by_mode: BTreeMap<&'static str, BTreeMap<String, u64>>,
    statuses: BTreeMap<String, u64>,
    five_xx: u64,
    hangs: u64,
    connect_failures: u64,
    findings: Vec<String>,
}

/// The result of a run.
#[derive(Debug, Serialize)]
pub struct FuzzReport {
    pub seed: u64,
    pub modes: Vec<Mode>,
    pub concurrency: u32,
    pub hang_timeout_s: f64,
    pub server: String,
    pub duration_s: f64,
    /// Requests sent (a pipelined HTTP/1.1 group or an h2 frame connection counts once).
    pub executions: u64,
    pub per_sec: f64,
    /// Requests sent, and what came back, per mode: statuses, and `closed`, `reset`,
    /// `watch-stream`, …
    pub by_mode: BTreeMap<&'static str, BTreeMap<String, u64>>,
    /// Every status seen, all modes together.
    pub statuses: BTreeMap<String, u64>,
    pub five_xx: u64,
    pub hangs: u64,
    pub connect_failures: u64,
    /// The server exited during the run (with this status).
    pub crash: Option<String>,
    pub canary_rounds: u64,
    pub canary_failures: Vec<String>,
    pub sentinels: String,
    pub server_exit: String,
    pub integrity_check: String,
    pub server_error_lines: Vec<String>,
    pub findings: Vec<String>,
    pub passed: bool,
}

impl FuzzReport {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let ok = |b: bool| if b { "ok" } else { "FAILED" };
        t.push_str(&format!(
            "http-fuzz  seed {}  modes {:?}  concurrency {}  hang timeout {:.0} s\nserver: {}\n\n",
            self.seed, self.modes, self.concurrency, self.hang_timeout_s, self.server
        ));
        t.push_str(&format!(
            "executions {}  in {:.1} s  = {:.0}/s\n\n",
            self.executions, self.duration_s, self.per_sec
        ));
        for (mode, counts) in &self.by_mode {
            let line: Vec<String> = counts.iter().map(|(k, v)| format!("{k}: {v}")).collect();
            t.push_str(&format!("{mode:<10} {}\n", line.join("  ")));
        }
        let all: Vec<String> = self
            .statuses
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        t.push_str(&format!("statuses   {}\n\n", all.join("  ")));
        t.push_str(&format!(
            "5xx answers       {} {}\n",
            self.five_xx,
            ok(self.five_xx == 0)
        ));
        t.push_str(&format!(
            "hangs             {} {}\n",
            self.hangs,
            ok(self.hangs == 0)
        ));
        t.push_str(&format!(
            "connect failures  {} {}\n",
            self.connect_failures,
            ok(self.connect_failures == 0)
        ));
        t.push_str(&format!(
            "crash             {} {}\n",
            self.crash.as_deref().unwrap_or("none"),
            ok(self.crash.is_none())
        ));
        t.push_str(&format!(
            "canary set+get    {} rounds, {} failed {}\n",
            self.canary_rounds,
            self.canary_failures.len(),
            ok(self.canary_failures.is_empty() && self.canary_rounds > 0)
        ));
        t.push_str(&format!("sentinels         {}\n", self.sentinels));
        t.push_str(&format!("server exit       {}\n", self.server_exit));
        t.push_str(&format!("integrity_check   {}\n", self.integrity_check));
        if !self.server_error_lines.is_empty() {
            t.push_str(&format!(
                "server log errors {} (first: {})\n",
                self.server_error_lines.len(),
                self.server_error_lines[0]
            ));
        }
        for f in self.findings.iter().take(20) {
            t.push_str(&format!("finding: {f}\n"));
        }
        t.push_str(&format!(
            "\n{}\n",
            if self.passed { "PASSED" } else { "FAILED" }
        ));
        t
    }
}

struct Run {
    seed: u64,
    modes: Vec<Mode>,
    creds: Creds,
    addr: SocketAddr,
    hang: Duration,
    findings_dir: PathBuf,
    next: AtomicU64,
    limit: u64,
    end: Instant,
    stop: AtomicBool,
    counts: Mutex<Counts>,
    now_ms: i64,
    /// `--only`: print the answer.
    verbose: bool,
}

impl Run {
    fn record(&self, index: u64, wire: &Wire, ex: &Exchange) {
        let mode = wire.mode().name();
        let mut c = self.counts.lock().unwrap();
        c.executions += 1;
        let mut keys: Vec<String> = ex.statuses.iter().map(|s| s.to_string()).collect();
        for s in &keys {
            *c.statuses.entry(s.clone()).or_default() += 1;
        }
        let flags = [
            (ex.stream, "watch-stream"),
            (ex.unknown_status > 0, "status-unknown"),
            (ex.resets > 0, "rst-stream"),
            (ex.refused_by_client, "client-refused"),
            (ex.connect_failed.is_some(), "connect-failed"),
            (ex.hang.is_some(), "HANG"),
        ];
        keys.extend(
            flags
                .iter()
                .filter(|(on, _)| *on)
                .map(|(_, k)| k.to_string()),
        );
        if let Some(code) = ex.goaway {
            keys.push(format!("goaway-{}", h2_error(code)));
        }
        if ex.statuses.is_empty() && ex.resets == 0 && !ex.refused_by_client {
            if ex.reset {
                keys.push("reset".into());
            } else if ex.closed {
                keys.push("closed".into());
            }
        }
        let per_mode = c.by_mode.entry(mode).or_default();
        *per_mode.entry("requests".into()).or_default() += 1;
        for k in keys {
            *per_mode.entry(k).or_default() += 1;
        }
        let five = ex.statuses.iter().filter(|&&s| s >= 500).count() as u64;
        c.five_xx += five;
        if ex.hang.is_some() {
            c.hangs += 1;
        }
        if ex.connect_failed.is_some() {
            c.connect_failures += 1;
        }
        let what = if five > 0 {
            Some(format!("5xx: {:?}", ex.statuses))
        } else if let Some(h) = &ex.hang {
            Some(format!("hang: {h}"))
        } else {
            ex.connect_failed
                .as_ref()
                .map(|e| format!("connect failed: {e}"))
        };
        if let Some(what) = what {
            if c.findings.len() < 100 {
                let path = self.findings_dir.join(format!(
                    "{}-seed{}-{index}.json",
                    what.split(':').next().unwrap_or("finding"),
                    self.seed
                ));
                match save(&path, &what, self.seed, index, wire, ex) {
                    Ok(()) => c.findings.push(format!("{what} -> {}", path.display())),
                    Err(e) => c.findings.push(format!("{what} (not saved: {e:#})")),
                }
            }
        }
    }
}

fn save(
    path: &Path,
    what: &str,
    seed: u64,
    index: u64,
    wire: &Wire,
    ex: &Exchange,
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let f = Finding {
        what: what.to_string(),
        seed,
        index,
        wire: wire.clone(),
        text: wire.text(),
        answer: serde_json::to_value(ex)?,
    };
    std::fs::write(path, serde_json::to_vec_pretty(&f)?)?;
    Ok(())
}

async fn worker(run: Arc<Run>) {
    let mut h2conn = None;
    loop {
        if run.stop.load(Ordering::Relaxed) || Instant::now() >= run.end {
            return;
        }
        let index = run.next.fetch_add(1, Ordering::Relaxed);
        if index >= run.limit {
            return;
        }
        let wire = generate(run.seed, index, &run.modes, &run.creds, run.now_ms);
        let ex = execute(&wire, run.addr, &mut h2conn, run.hang).await;
        if run.limit - index == 1 && run.verbose {
            println!(
                "answer: {}\n",
                serde_json::to_string_pretty(&ex).unwrap_or_default()
            );
        }
        run.record(index, &wire, &ex);
    }
}

// ---- Valid calls: the session token, the sentinels, the canary ----

/// One valid call on its own h2 connection: the status and the body.
async fn call(
    addr: SocketAddr,
    token: &str,
    route: Route,
    body: Vec<u8>,
) -> anyhow::Result<(u16, Bytes)> {
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{addr}{}", route.path()))
        .header("authorization", format!("Bearer {token}"))
        .header("content-type", route.content_type());
    if route != Route::Metadata {
        req = req.header("x-denokv-version", "3").header(
            "x-denokv-database-id",
            "00000000-0000-0000-0000-000000000000",
        );
    }
    let req = req.body(Full::new(Bytes::from(body)))?;
    let mut sender = h2::dial(addr).await.map_err(|e| anyhow!("connect: {e}"))?;
    let resp = tokio::time::timeout(Duration::from_secs(15), async {
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, body))
    })
    .await
    .map_err(|_| anyhow!("no answer within 15 s"))??;
    Ok(resp)
}

async fn session_token(addr: SocketAddr, token: &str) -> anyhow::Result<String> {
    let (status, body) = call(
        addr,
        token,
        Route::Metadata,
        br#"{"supportedVersions":[2,3]}"#.to_vec(),
    )
    .await?;
    if status != 200 {
        bail!("metadata exchange: status {status}");
    }
    let meta: serde_json::Value = serde_json::from_slice(&body)?;
    meta["token"]
        .as_str()
        .map(str::to_string)
        .ok_or_else(|| anyhow!("no token in the metadata answer"))
}

fn sentinel_prefix() -> Vec<u8> {
    encode(&[KeyPart::String("sentinel".into())])
}

/// Every entry under `["sentinel"]`, read with the sentinel token.
async fn read_sentinels(addr: SocketAddr, token: &str) -> anyhow::Result<Vec<pb::KvEntry>> {
    let (start, end) = prefix_range(&sentinel_prefix());
    let read = pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: start.into(),
            end: end.into(),
            limit: 1000,
            reverse: false,
        }],
    };
    let (status, body) = call(addr, token, Route::SnapshotRead, read.encode_to_vec()).await?;
    if status != 200 {
        bail!(
            "reading the sentinels: status {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let out = pb::SnapshotReadOutput::decode(body)?;
    Ok(out.ranges.into_iter().flat_map(|r| r.values).collect())
}

/// Writes 50 sentinel keys of every kind of value.
async fn write_sentinels(addr: SocketAddr, token: &str) -> anyhow::Result<Vec<pb::KvEntry>> {
    let mutations = (0..50u8)
        .map(|i| {
            let mut key = sentinel_prefix();
            key.extend(encode(&[KeyPart::Int(i as i128)]));
            pb::Mutation {
                key: key.into(),
                value: Some(pb::KvValue {
                    data: Bytes::from(vec![i; i as usize * 10]),
                    encoding: [pb::ValueEncoding::VeBytes, pb::ValueEncoding::VeV8][i as usize % 2]
                        as i32,
                }),
                mutation_type: pb::MutationType::MSet as i32,
                ..Default::default()
            }
        })
        .collect();
    let write = pb::AtomicWrite {
        mutations,
        ..Default::default()
    };
    let (status, body) = call(addr, token, Route::AtomicWrite, write.encode_to_vec()).await?;
    if status != 200 {
        bail!(
            "writing the sentinels: status {status}: {}",
            String::from_utf8_lossy(&body)
        );
    }
    let entries = read_sentinels(addr, token).await?;
    if entries.len() != 50 {
        bail!("{} sentinels read back after writing 50", entries.len());
    }
    Ok(entries)
}

/// A set and a get with the fuzzed token: the value read must be the one written.
async fn canary(addr: SocketAddr, token: &str, round: u64) -> anyhow::Result<()> {
    let key = Bytes::from(gen::fuzz_key(KeyPart::String("canary".into())));
    let value = Bytes::from(round.to_le_bytes().to_vec());
    let write = pb::AtomicWrite {
        mutations: vec![pb::Mutation {
            key: key.clone(),
            value: Some(pb::KvValue {
                data: value.clone(),
                encoding: pb::ValueEncoding::VeBytes as i32,
            }),
            mutation_type: pb::MutationType::MSet as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    let (status, body) = call(addr, token, Route::AtomicWrite, write.encode_to_vec()).await?;
    let out = pb::AtomicWriteOutput::decode(body)?;
    if status != 200 || out.status != pb::AtomicWriteStatus::AwSuccess as i32 {
        bail!("set: status {status}, write status {}", out.status);
    }
    let mut end = key.to_vec();
    end.push(0);
    let read = pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: key,
            end: end.into(),
            limit: 1,
            reverse: false,
        }],
    };
    let (status, body) = call(addr, token, Route::SnapshotRead, read.encode_to_vec()).await?;
    let out = pb::SnapshotReadOutput::decode(body)?;
    let got = out
        .ranges
        .first()
        .and_then(|r| r.values.first())
        .map(|e| e.value.clone());
    if status != 200 || got.as_ref() != Some(&value) {
        bail!("get: status {status}, read {got:?}, wrote {value:?}");
    }
    Ok(())
}

fn describe(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (_, Some(s)) => format!("killed by signal {s}"),
        _ => status.to_string(),
    }
}

/// Runs the fuzzer as the arguments say; the report tells whether it passed.
pub async fn run(args: &HttpFuzzArgs) -> anyhow::Result<FuzzReport> {
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => server::default_binary()?,
    };
    let replay: Option<Finding> = match &args.replay {
        Some(path) => Some(serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?,
        )?),
        None => None,
    };
    let seed = replay.as_ref().map_or(args.seed, |f| f.seed);
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let tokens = Tokens::of_seed(seed);
    let mut server = Server::start(&bin, &dir, &tokens, &args.server_arg)?;
    let addr = server.addr;
    let sentinels = write_sentinels(addr, &tokens.sentinel).await?;
    let creds = Creds {
        fuzz: tokens.fuzz.clone(),
        read: tokens.read.clone(),
        session: session_token(addr, &tokens.fuzz).await?,
    };
    let modes = if args.modes.is_empty() {
        vec![Mode::H1, Mode::H2, Mode::H2Frames]
    } else {
        let mut m = args.modes.clone();
        m.sort();
        m.dedup();
        m
    };
    let hang = args.hang_timeout;
    let (start_index, limit) = match (args.only, replay.is_some()) {
        (_, true) => (0, 0),
        (Some(n), _) => (n, n + 1),
        (None, _) => (
            0,
            if args.requests == 0 {
                u64::MAX
            } else {
                args.requests
            },
        ),
    };
    let start = Instant::now();
    let run = Arc::new(Run {
        seed,
        modes: modes.clone(),
        creds,
        addr,
        hang,
        findings_dir: args.findings.clone(),
        next: AtomicU64::new(start_index),
        limit,
        end: start + args.duration,
        stop: AtomicBool::new(false),
        counts: Mutex::new(Counts::default()),
        now_ms: now_ms(),
        verbose: args.only.is_some(),
    });
    if let Some(f) = &replay {
        let ex = execute(&f.wire, addr, &mut None, hang).await;
        println!(
            "replayed {} (seed {}, request {}):\n{}\n",
            f.what,
            f.seed,
            f.index,
            f.wire.text()
        );
        println!("answer: {}\n", serde_json::to_string_pretty(&ex)?);
        run.record(f.index, &f.wire, &ex);
    }
    if let Some(n) = args.only {
        let wire = generate(seed, n, &modes, &run.creds, run.now_ms);
        println!("request {n} of seed {seed}:\n{}\n", wire.text());
        println!("as sent: {}\n", serde_json::to_string(&wire)?);
    }
    let workers: Vec<_> = (0..args.concurrency)
        .map(|_| tokio::spawn(worker(run.clone())))
        .collect();
    // The watchers: the server's process, and a valid write and read every second.
    let mut crash = None;
    let mut canary_rounds = 0;
    let mut canary_failures = Vec::new();
    let mut next_canary = Instant::now();
    let mut last_progress = Instant::now();
    loop {
        let done = workers.iter().all(|w| w.is_finished());
        if let Some(status) = server.exited() {
            crash = Some(format!(
                "{}; last log lines:\n{}",
                describe(status),
                server.log_tail(30)
            ));
            run.stop.store(true, Ordering::Relaxed);
            break;
        }
        if done {
            break;
        }
        if Instant::now() >= next_canary {
            canary_rounds += 1;
            if let Err(e) = canary(addr, &tokens.fuzz, canary_rounds).await {
                canary_failures.push(format!("round {canary_rounds}: {e:#}"));
            }
            next_canary = Instant::now() + Duration::from_secs(1);
        }
        if args.progress && last_progress.elapsed() >= Duration::from_secs(10) {
            last_progress = Instant::now();
            let c = run.counts.lock().unwrap();
            eprintln!(
                "{:>6.0} s  {} requests  {:.0}/s  5xx {}  hangs {}",
                start.elapsed().as_secs_f64(),
                c.executions,
                c.executions as f64 / start.elapsed().as_secs_f64(),
                c.five_xx,
                c.hangs
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for w in workers {
        let _ = w.await;
    }
    let duration = start.elapsed().as_secs_f64();
    // One last canary round: the server still works after everything.
    if crash.is_none() {
        canary_rounds += 1;
        if let Err(e) = canary(addr, &tokens.fuzz, canary_rounds).await {
            canary_failures.push(format!("last round: {e:#}"));
        }
    }
    let sentinels = if crash.is_some() {
        "not checked (the server crashed)".to_string()
    } else {
        match read_sentinels(addr, &tokens.sentinel).await {
            Ok(now) if now == sentinels => format!("{} unchanged: ok", now.len()),
            Ok(now) => format!(
                "CHANGED: {} entries now, {} before",
                now.len(),
                sentinels.len()
            ),
            Err(e) => format!("FAILED to read: {e:#}"),
        }
    };
    let server_exit = match server.stop() {
        Ok(s) if s.success() => "0 after SIGTERM: ok".to_string(),
        Ok(s) => format!("FAILED: {}", describe(s)),
        Err(e) => format!("FAILED: {e:#}"),
    };
    let integrity_check = match server::integrity_check(&server.db) {
        Ok(r) => r,
        Err(e) => format!("FAILED: {e:#}"),
    };
    let c = std::mem::take(&mut *run.counts.lock().unwrap());
    let passed = c.five_xx == 0
        && c.hangs == 0
        && c.connect_failures == 0
        && crash.is_none()
        && canary_failures.is_empty()
        && sentinels.ends_with(": ok")
        && server_exit.ends_with(": ok")
        && integrity_check == "ok";
    Ok(FuzzReport {
        seed,
        modes,
        concurrency: args.concurrency,
        hang_timeout_s: hang.as_secs_f64(),
        server: server.command.clone(),
        duration_s: duration,
        executions: c.executions,
        per_sec: c.executions as f64 / duration.max(1e-9),
        by_mode: c.by_mode,
        statuses: c.statuses,
        five_xx: c.five_xx,
        hangs: c.hangs,
        connect_failures: c.connect_failures,
        crash,
        canary_rounds,
        canary_failures,
        sentinels,
        server_exit,
        integrity_check,
        server_error_lines: server.error_lines(),
        findings: c.findings,
        passed,
    })
}
