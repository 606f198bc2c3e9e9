//! OpenTelemetry traces against a real OTLP/HTTP receiver (`tests/otlp/receiver.py`, built on
//! the official `opentelemetry-proto` classes): request spans, commit batch spans, the links
//! between them, the flush at shutdown, and nothing at all when OTLP is not configured.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use denokv::proto as pb;
use prost::Message;
use serde_json::Value;

/// The Python that has `opentelemetry-proto`: `$DENOKV_OTLP_PYTHON`, else the venv that
/// `tests/otlp/setup.sh` makes, else `python3`.
fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DENOKV_OTLP_PYTHON") {
        return p.into();
    }
    let venv = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cache/denokv/otlp-venv/bin/python"))
        .filter(|p| p.exists());
    venv.unwrap_or_else(|| "python3".into())
}

/// The receiver, running; stopped on drop.
struct Receiver {
    child: Child,
    port: u16,
    lines: Arc<Mutex<Vec<Value>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Receiver {
    fn start() -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/otlp/receiver.py");
        let python = python();
        let mut child = Command::new(&python)
            .arg(script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        let stdout = child.stdout.take().unwrap();
        let lines = Arc::new(Mutex::new(Vec::new()));
        let sink = lines.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).expect("the receiver writes JSON");
                if let Some(port) = v["listening"].as_u64() {
                    let _ = tx.send(port as u16);
                }
                sink.lock().unwrap().push(v);
            }
        });
        let Ok(port) = rx.recv_timeout(Duration::from_secs(30)) else {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "the OTLP receiver did not start with {}: {}\n\
                 It needs the PyPI package opentelemetry-proto: run tests/otlp/setup.sh \
                 (a venv in ~/.cache/denokv/otlp-venv), or set DENOKV_OTLP_PYTHON.",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        Receiver {
            child,
            port,
            lines,
            reader: Some(reader),
        }
    }

    /// Stops the receiver (by closing its stdin) and waits until every line it wrote is read.
    fn finish(&mut self) {
        drop(self.child.stdin.take());
        let status = wait_timeout(&mut self.child, Duration::from_secs(10));
        assert!(status.success(), "the receiver failed: {status}");
        self.reader.take().unwrap().join().unwrap();
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn count(&self, what: &str) -> usize {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v.get(what).is_some())
            .count()
    }

    fn all(&self, what: &str) -> Vec<Value> {
        self.lines
            .lock()
            .unwrap()
            .iter()
            .filter_map(|v| v.get(what).cloned())
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_of(keys: &[&Bytes]) -> Vec<u8> {
    pb::SnapshotRead {
        ranges: keys
            .iter()
            .map(|k| {
                let mut end = k.to_vec();
                end.push(0);
                pb::ReadRange {
                    start: (*k).clone(),
                    end: end.into(),
                    limit: 10,
                    reverse: false,
                }
            })
            .collect(),
    }
    .encode_to_vec()
}

fn attr<'a>(span: &'a Value, name: &str) -> &'a Value {
    &span["attributes"][name]
}

fn id(v: &Value) -> (String, String) {
    (
        v["trace_id"].as_str().unwrap().to_string(),
        v["span_id"].as_str().unwrap().to_string(),
    )
}

/// A key whose bytes must never show up in a span.
const SECRET_KEY: &str = "key-contents-never-in-spans";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn requests_and_commit_batches_are_exported_and_linked() {
    let mut receiver = Receiver::start();
    let dir = tempfile::tempdir().unwrap();
    let mut s = Launch::new(&dir.path().join("db.sqlite"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &receiver.endpoint())
        .env("OTEL_EXPORTER_OTLP_HEADERS", "x-tenant=test-tenant")
        .env("OTEL_SERVICE_NAME", "denokv-under-test")
        // Nothing is exported on a timer during the test: what arrives was flushed at shutdown.
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .start();
    s.wait_for_log("Traces: OTLP/HTTP to", Duration::from_secs(5));
    let c = Arc::new(Client::new());
    let url = s.url("");

    // Metadata exchange, reads on both protocols, a 401, a 404.
    let auth = format!("Bearer {TOKEN}");
    let meta = c
        .request(
            Proto::H1,
            "POST",
            &s.url("/"),
            &[("authorization", &auth)],
            r#"{"supportedVersions":[2,3]}"#,
        )
        .await;
    assert_eq!(meta.status, 200);
    let secret = key(SECRET_KEY);
    for proto in BOTH {
        let r = c
            .data(proto, &s, "snapshot_read", read_of(&[&secret, &key("b")]))
            .await;
        assert_eq!(r.status, 200);
    }
    let bad = c
        .request(
            Proto::H1,
            "POST",
            &s.url("/v2/snapshot_read"),
            &[
                ("authorization", "Bearer wrong-token-000000"),
                ("x-denokv-version", "3"),
                ("x-denokv-database-id", NIL_ID),
            ],
            Vec::new(),
        )
        .await;
    assert_eq!(bad.status, 401);
    assert_eq!(
        c.request(Proto::H1, "GET", &s.url("/nope"), &[], Vec::new())
            .await
            .status,
        404
    );

    // Writes, many at once over both protocols so that some share a batch; one fails a check.
    let mut tasks = Vec::new();
    for i in 0..24 {
        let (c, url, secret) = (c.clone(), url.clone(), secret.clone());
        tasks.push(tokio::spawn(async move {
            let proto = if i % 2 == 0 { Proto::H1 } else { Proto::H2 };
            let w = pb::AtomicWrite {
                mutations: vec![
                    set_bytes(&secret, b"v"),
                    set_bytes(&key(&format!("k{i}")), b"v"),
                ],
                ..Default::default()
            };
            let r = c
                .try_data(proto, &url, "atomic_write", w.encode_to_vec())
                .await
                .unwrap();
            assert_eq!(r.status, 200, "{}", r.text());
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let failing = pb::AtomicWrite {
        checks: vec![pb::Check {
            key: key("absent"),
            versionstamp: Bytes::from(vec![0u8; 10]),
        }],
        mutations: vec![set_bytes(&key("never"), b"v")],
        ..Default::default()
    };
    let r = c
        .data(Proto::H2, &s, "atomic_write", failing.encode_to_vec())
        .await;
    assert_eq!(
        r.decode::<pb::AtomicWriteOutput>().status,
        pb::AtomicWriteStatus::AwCheckFailure as i32
    );

    assert_eq!(receiver.count("request"), 0, "exported before shutdown");
    assert!(
        !exporter_threads(s.pid()).is_empty(),
        "{:?}",
        threads(s.pid())
    );
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success(), "{status}");
    receiver.finish();

    // Flushed before the exit.
    let requests = receiver.all("request");
    assert!(!requests.is_empty(), "nothing was exported at shutdown");
    for r in &requests {
        assert_eq!(r["path"], "/v1/traces");
        assert_eq!(r["content_type"], "application/x-protobuf");
        assert_eq!(
            r["headers"]["x-tenant"], "test-tenant",
            "OTEL_EXPORTER_OTLP_HEADERS"
        );
    }
    let spans = receiver.all("span");
    let text = serde_json::to_string(&spans).unwrap();
    assert!(!text.contains(TOKEN), "a span carries the token");
    assert!(
        !text.contains("wrong-token"),
        "a span carries a presented token"
    );
    assert!(!text.contains(SECRET_KEY), "a span carries key contents");
    for span in &spans {
        assert_eq!(span["resource"]["service.name"], "denokv-under-test");
        assert_eq!(span["scope"], "denokv");
        assert_eq!(span["dropped_links"], 0);
    }
    let by_id: HashMap<(String, String), &Value> = spans.iter().map(|s| (id(s), s)).collect();
    let named =
        |name: &str| -> Vec<&Value> { spans.iter().filter(|s| s["name"] == name).collect() };

    // Request spans: server spans with the route, the status and the protocol.
    let meta = named("POST /");
    assert_eq!(meta.len(), 1);
    assert_eq!(meta[0]["kind"], 2, "SPAN_KIND_SERVER");
    assert_eq!(attr(meta[0], "http.route"), "/");
    assert_eq!(attr(meta[0], "http.response.status_code"), 200);
    let reads = named("POST /v2/snapshot_read");
    assert_eq!(reads.len(), 3, "two reads and the 401");
    let versions: HashSet<&str> = reads
        .iter()
        .filter(|r| attr(r, "http.response.status_code") == 200)
        .map(|r| attr(r, "network.protocol.version").as_str().unwrap())
        .collect();
    assert_eq!(versions, HashSet::from(["1.1", "2"]));
    for r in reads
        .iter()
        .filter(|r| attr(r, "http.response.status_code") == 200)
    {
        assert_eq!(attr(r, "denokv.read.ranges"), 2);
        assert_eq!(attr(r, "http.route"), "/v2/snapshot_read");
        assert_eq!(attr(r, "http.request.method"), "POST");
        assert!(attr(r, "http.request.body.size").as_i64().unwrap() > 0);
        assert!(attr(r, "http.response.body.size").as_i64().unwrap() > 0);
    }
    let unauthorized: Vec<_> = reads
        .iter()
        .filter(|r| attr(r, "http.response.status_code") == 401)
        .collect();
    assert_eq!(unauthorized.len(), 1);
    assert_eq!(attr(unauthorized[0], "error.type"), "401");
    let other = named("GET");
    assert_eq!(other.len(), 1);
    assert_eq!(attr(other[0], "http.response.status_code"), 404);
    assert!(
        attr(other[0], "http.route").is_null(),
        "no route for an unknown path"
    );

    // Every write's span links to a batch span that was exported, and that batch span links
    // back to it; batch sizes add up.
    let writes = named("POST /v2/atomic_write");
    assert_eq!(writes.len(), 25);
    let batches = named("commit batch");
    assert!(
        !batches.is_empty() && batches.len() <= 25,
        "{} batches",
        batches.len()
    );
    let mut carried = 0;
    for b in &batches {
        assert_eq!(b["kind"], 1, "SPAN_KIND_INTERNAL");
        let links = b["links"].as_array().unwrap();
        assert_eq!(
            attr(b, "denokv.batch.size"),
            links.len(),
            "a link per write"
        );
        carried += links.len();
        assert!(attr(b, "denokv.batch.commit_ms").as_f64().unwrap() > 0.0);
        assert!(attr(b, "denokv.batch.apply_ms").as_f64().is_some());
        let committed = attr(b, "denokv.batch.committed").as_u64().unwrap();
        let failed = attr(b, "denokv.batch.checks_failed").as_u64().unwrap();
        assert_eq!(committed + failed, links.len() as u64);
        assert_eq!(
            attr(b, "denokv.batch.mutations").as_u64().unwrap(),
            2 * committed
        );
        for l in links {
            let w = by_id
                .get(&id(l))
                .expect("a batch links to an exported request span");
            assert_eq!(w["name"], "POST /v2/atomic_write");
        }
    }
    assert_eq!(carried, 25, "every write is carried by one batch");
    let mut outcomes = HashMap::new();
    for w in &writes {
        assert_eq!(attr(w, "http.response.status_code"), 200);
        let links = w["links"].as_array().unwrap();
        assert_eq!(links.len(), 1, "a write links to its batch");
        let b = by_id
            .get(&id(&links[0]))
            .expect("the linked batch span was exported");
        assert_eq!(b["name"], "commit batch");
        assert!(
            b["links"]
                .as_array()
                .unwrap()
                .iter()
                .any(|l| id(l) == id(w)),
            "the batch links back to the write"
        );
        *outcomes
            .entry(
                attr(w, "denokv.write.outcome")
                    .as_str()
                    .unwrap()
                    .to_string(),
            )
            .or_insert(0) += 1;
        assert_eq!(
            attr(w, "denokv.write.checks").as_i64().unwrap() > 0,
            attr(w, "denokv.write.outcome") == "check_failed"
        );
    }
    assert_eq!(
        outcomes,
        HashMap::from([
            ("committed".to_string(), 24),
            ("check_failed".to_string(), 1)
        ])
    );
}

/// Thread names of a process.
fn threads(pid: i32) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|n| n.trim().to_string())
        .collect()
}

/// The exporter's threads in the process (the batch span processor's).
fn exporter_threads(pid: i32) -> Vec<String> {
    threads(pid)
        .into_iter()
        .filter(|n| n.starts_with("OpenTelemetry"))
        .collect()
}

#[tokio::test]
async fn without_an_otlp_endpoint_nothing_is_started_or_exported() {
    let mut receiver = Receiver::start();
    let endpoint = receiver.endpoint();
    let configs: [&[(&str, &str)]; 2] = [
        // Other OTEL_ variables alone do not turn traces on.
        &[
            ("OTEL_SERVICE_NAME", "denokv-under-test"),
            ("OTEL_BSP_SCHEDULE_DELAY", "10"),
        ],
        // Nor does an endpoint when the SDK is disabled.
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("OTEL_SDK_DISABLED", "true"),
        ],
    ];
    for env in configs {
        let dir = tempfile::tempdir().unwrap();
        let mut launch = Launch::new(&dir.path().join("db.sqlite"));
        for (k, v) in env {
            launch = launch.env(k, v);
        }
        let mut s = launch.start();
        let c = Client::new();
        let w = pb::AtomicWrite {
            mutations: vec![set_bytes(&key("a"), b"v")],
            ..Default::default()
        };
        for proto in BOTH {
            let r = c.data(proto, &s, "atomic_write", w.encode_to_vec()).await;
            assert_eq!(r.status, 200);
            let r = c
                .data(proto, &s, "snapshot_read", read_of(&[&key("a")]))
                .await;
            assert_eq!(r.status, 200);
        }
        assert_eq!(exporter_threads(s.pid()), Vec::<String>::new(), "{env:?}");
        assert!(!s.log_text().contains("Traces"), "{}", s.log_text());
        let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
        assert!(status.success(), "{status}");
    }
    receiver.finish();
    assert_eq!(
        receiver.count("connection"),
        0,
        "something connected to the receiver"
    );
}

/// A hostile collector: each connection gets the next of these answers (after the request was
/// read), then the connection is closed; `None` is a collector that reads and never answers.
const HOSTILE_ANSWERS: [Option<&[u8]>; 4] = [
    // A chunk size of usize::MAX and then the end (the old hand-written client panicked on it).
    Some(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nffffffffffffffff\r\nabc"),
    // A chunk size beyond usize::MAX.
    Some(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1ffffffffffffffff\r\nx\r\n0\r\n\r\n",
    ),
    Some(b"\x00garbage\xff\r\n\r\n"),
    None,
];

/// Runs a hostile collector on a thread; returns its address and the count of connections it
/// answered (or held).
fn hostile_collector() -> (std::net::SocketAddr, Arc<Mutex<usize>>) {
    use std::io::{Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let served = Arc::new(Mutex::new(0usize));
    let count = served.clone();
    std::thread::spawn(move || {
        for (i, stream) in listener.incoming().enumerate() {
            let Ok(mut s) = stream else { return };
            let answer = HOSTILE_ANSWERS[i % HOSTILE_ANSWERS.len()];
            let count = count.clone();
            std::thread::spawn(move || {
                // Read the request head and whatever body came with it.
                let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
                let mut buf = [0u8; 64 * 1024];
                let _ = s.read(&mut buf);
                *count.lock().unwrap() += 1;
                match answer {
                    Some(bytes) => {
                        let _ = s.write_all(bytes);
                    }
                    None => std::thread::sleep(Duration::from_secs(30)),
                }
            });
        }
    });
    (addr, served)
}

#[tokio::test]
async fn a_hostile_collector_neither_crashes_nor_hangs_the_exporter() {
    let (collector, served) = hostile_collector();
    let dir = tempfile::tempdir().unwrap();
    let timeout_ms = 700;
    let mut s = Launch::new(&dir.path().join("db.sqlite"))
        .env(
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            &format!("http://{collector}"),
        )
        .env("OTEL_EXPORTER_OTLP_TIMEOUT", &timeout_ms.to_string())
        .env(
            "OTEL_EXPORTER_OTLP_HEADERS",
            "x-api-key=hostile-test-secret",
        )
        .env("OTEL_BSP_SCHEDULE_DELAY", "50")
        .start();
    s.wait_for_log("Traces: OTLP/HTTP to", Duration::from_secs(5));
    let c = Client::new();
    let w = pb::AtomicWrite {
        mutations: vec![set_bytes(&key("a"), b"v")],
        ..Default::default()
    };
    // Keep making spans until every kind of answer was given at least twice.
    let start = std::time::Instant::now();
    while *served.lock().unwrap() < 2 * HOSTILE_ANSWERS.len() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the exporter stopped exporting after {} answers; log:\n{}",
            served.lock().unwrap(),
            s.log_text()
        );
        let r = c
            .data(Proto::H1, &s, "atomic_write", w.encode_to_vec())
            .await;
        assert_eq!(r.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still serving, and still alive (a panic on any thread aborts the process).
    let r = c
        .data(Proto::H1, &s, "snapshot_read", read_of(&[&key("a")]))
        .await;
    assert_eq!(r.status, 200);
    let stopping = std::time::Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = s.stop();
        (status, s)
    })
    .await
    .unwrap();
    let (status, s) = status;
    assert!(status.success(), "{status}; log:\n{}", s.log_text());
    // The drain, then at most the export timeout (or the 5 s shutdown bound) for the last spans.
    assert!(
        stopping.elapsed() < Duration::from_secs(8),
        "{:?}",
        stopping.elapsed()
    );
    let log = s.log_text();
    assert!(!log.contains("panicked"), "{log}");
    assert!(
        !log.contains("hostile-test-secret"),
        "the headers were logged:\n{log}"
    );
    // A failed export is logged.
    assert!(log.contains("ExportError"), "{log}");
}
