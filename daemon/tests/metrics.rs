//! Prometheus metrics: the `/metrics` listener, the exposition format, and counters that move
//! by exactly what the requests did.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use denokv::proto as pb;
use http_body_util::BodyExt;
use prost::Message;

fn mutation(k: &Bytes, ty: pb::MutationType, value: Option<pb::KvValue>) -> pb::Mutation {
    pb::Mutation {
        key: k.clone(),
        value,
        mutation_type: ty as i32,
        ..Default::default()
    }
}

fn bytes_value(data: &[u8]) -> Option<pb::KvValue> {
    Some(pb::KvValue {
        data: Bytes::copy_from_slice(data),
        encoding: pb::ValueEncoding::VeBytes as i32,
    })
}

fn u64_value(n: u64) -> Option<pb::KvValue> {
    Some(pb::KvValue {
        data: Bytes::copy_from_slice(&n.to_le_bytes()),
        encoding: pb::ValueEncoding::VeLe64 as i32,
    })
}

/// Every sample of an exposition, by `name{labels}` as written; panics on a malformed line.
///
/// Checks the text format 0.0.4: `# HELP` and `# TYPE` lines, one `TYPE` per family before its
/// samples, metric and label names, quoted label values, and float values.
fn parse(text: &str) -> BTreeMap<String, f64> {
    fn is_name(s: &str) -> bool {
        let mut chars = s.chars();
        matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
            && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    }
    let mut samples = BTreeMap::new();
    let mut typed: BTreeMap<String, String> = BTreeMap::new();
    assert!(text.ends_with('\n'), "the exposition ends with a newline");
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            let (kind, name, tail) = (
                parts.next().unwrap(),
                parts.next().unwrap(),
                parts.next().unwrap_or(""),
            );
            assert!(is_name(name), "bad metric name in {line:?}");
            match kind {
                "HELP" => assert!(!tail.is_empty(), "empty help in {line:?}"),
                "TYPE" => {
                    assert!(
                        ["counter", "gauge", "histogram", "summary", "untyped"].contains(&tail),
                        "bad type in {line:?}"
                    );
                    assert!(
                        typed.insert(name.to_string(), tail.to_string()).is_none(),
                        "second TYPE for {name}"
                    );
                }
                _ => panic!("unknown comment {line:?}"),
            }
            continue;
        }
        assert!(!line.is_empty(), "empty line in the exposition");
        let (series, value) = line.rsplit_once(' ').expect("a sample has a value");
        let value: f64 = match value {
            "+Inf" => f64::INFINITY,
            "-Inf" => f64::NEG_INFINITY,
            v => v
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {line:?}")),
        };
        let name = match series.split_once('{') {
            None => series,
            Some((name, labels)) => {
                let labels = labels.strip_suffix('}').expect("labels end with }");
                for pair in labels.split("\",").filter(|p| !p.is_empty()) {
                    let (k, v) = pair.split_once("=\"").expect("label=\"value\"");
                    assert!(is_name(k), "bad label name in {line:?}");
                    assert!(!v.contains('\n'), "bad label value in {line:?}");
                }
                name
            }
        };
        assert!(is_name(name), "bad metric name in {line:?}");
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| typed.get(*f).map(String::as_str) == Some("histogram"))
            })
            .unwrap_or(name);
        assert!(typed.contains_key(family), "no TYPE before {line:?}");
        assert!(
            samples.insert(series.to_string(), value).is_none(),
            "duplicate series {series}"
        );
    }
    samples
}

struct Scrape(BTreeMap<String, f64>);

impl Scrape {
    fn of(s: &Server) -> Scrape {
        let (status, content_type, body) = s.scrape();
        assert_eq!(status, 200);
        assert_eq!(content_type, "text/plain; version=0.0.4");
        Scrape(parse(&body))
    }

    /// A sample's value; 0 for a series not (yet) exposed.
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }
}

/// Asserts that every series moved by exactly its expected amount between two scrapes.
fn assert_moved(before: &Scrape, after: &Scrape, expected: &[(&str, f64)]) {
    let wrong: Vec<String> = expected
        .iter()
        .filter_map(|&(series, want)| {
            let got = after.get(series) - before.get(series);
            (got != want).then(|| format!("{series}: moved by {got}, expected {want}"))
        })
        .collect();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

async fn write(c: &Client, s: &Server, w: pb::AtomicWrite) -> Reply {
    c.data(Proto::H1, s, "atomic_write", w.encode_to_vec())
        .await
}

#[tokio::test]
async fn counters_move_by_exactly_what_the_requests_did() {
    let s = Server::start(&["--metrics-addr", "127.0.0.1:0"]);
    let c = Client::new();
    let before = Scrape::of(&s);
    for series in [
        "denokv_build_info{version=\"0.1.0\"}",
        "denokv_sync_mode{mode=\"full\"}",
    ] {
        assert_eq!(before.get(series), 1.0, "{series}");
    }
    for series in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "denokv_database_size_bytes",
    ] {
        assert!(before.get(series) > 0.0, "{series} is sampled");
    }

    // 1: every mutation type and an enqueue, committed.
    let (a, b, n, lo, hi, q, text) = (
        key("a"),
        key("b"),
        key("n"),
        key("lo"),
        key("hi"),
        key("q"),
        key("text"),
    );
    let w = pb::AtomicWrite {
        mutations: vec![
            mutation(&a, pb::MutationType::MSet, bytes_value(b"1")),
            mutation(&b, pb::MutationType::MDelete, None),
            mutation(&n, pb::MutationType::MSum, u64_value(5)),
            mutation(&lo, pb::MutationType::MMin, u64_value(3)),
            mutation(&hi, pb::MutationType::MMax, u64_value(7)),
            mutation(
                &q,
                pb::MutationType::MSetSuffixVersionstampedKey,
                bytes_value(b"x"),
            ),
        ],
        enqueues: vec![pb::Enqueue {
            payload: Bytes::from_static(b"job"),
            deadline_ms: 1,
            ..Default::default()
        }],
        ..Default::default()
    };
    let r = write(&c, &s, w).await;
    assert_eq!(r.status, 200, "{}", r.text());
    // 2: two sets, committed.
    let w = pb::AtomicWrite {
        mutations: vec![
            mutation(&text, pb::MutationType::MSet, bytes_value(b"hello")),
            mutation(&b, pb::MutationType::MSet, bytes_value(b"2")),
        ],
        ..Default::default()
    };
    assert_eq!(write(&c, &s, w).await.status, 200);
    // 3: a failed check (`a` exists, the check says it must not).
    let w = pb::AtomicWrite {
        checks: vec![pb::Check {
            key: a.clone(),
            versionstamp: Bytes::new(),
        }],
        mutations: vec![mutation(&a, pb::MutationType::MSet, bytes_value(b"2"))],
        ..Default::default()
    };
    let out: pb::AtomicWriteOutput = write(&c, &s, w).await.decode();
    assert_eq!(out.status, pb::AtomicWriteStatus::AwCheckFailure as i32);
    // 4: invalid in the committer (sum on bytes), rolled back.
    let w = pb::AtomicWrite {
        mutations: vec![mutation(&text, pb::MutationType::MSum, u64_value(1))],
        ..Default::default()
    };
    assert_eq!(write(&c, &s, w).await.status, 400);
    // 5: invalid before the committer (a 3-byte versionstamp).
    let w = pb::AtomicWrite {
        checks: vec![pb::Check {
            key: a.clone(),
            versionstamp: Bytes::from_static(&[1, 2, 3]),
        }],
        ..Default::default()
    };
    assert_eq!(write(&c, &s, w).await.status, 400);

    // One snapshot read of two ranges: `a` alone (1 row), and `a`..`text` (a, b, hi, lo, n: 5
    // rows; the versionstamped `q...` keys sort after "n" and before "text": 6 rows).
    let mut a_end = a.to_vec();
    a_end.push(0);
    let read = pb::SnapshotRead {
        ranges: vec![
            pb::ReadRange {
                start: a.clone(),
                end: Bytes::from(a_end),
                limit: 10,
                reverse: false,
            },
            pb::ReadRange {
                start: a.clone(),
                end: text.clone(),
                limit: 100,
                reverse: false,
            },
        ],
    };
    let out: pb::SnapshotReadOutput = c
        .data(Proto::H1, &s, "snapshot_read", read.encode_to_vec())
        .await
        .decode();
    let rows: usize = out.ranges.iter().map(|r| r.values.len()).sum();
    assert_eq!(rows, 7);
    // Not a route.
    let r = c
        .request(Proto::H1, "GET", &s.url("/nope"), &[], Bytes::new())
        .await;
    assert_eq!(r.status, 404);

    let after = Scrape::of(&s);
    // Writes 1 to 4 each reached the committer alone: four transactions of one write.
    assert_moved(
        &before,
        &after,
        &[
            ("denokv_writes_committed_total", 2.0),
            ("denokv_write_checks_failed_total", 1.0),
            ("denokv_writes_invalid_total", 2.0),
            ("denokv_enqueues_total", 1.0),
            ("denokv_mutations_total{type=\"set\"}", 3.0),
            ("denokv_mutations_total{type=\"delete\"}", 1.0),
            ("denokv_mutations_total{type=\"sum\"}", 1.0),
            ("denokv_mutations_total{type=\"min\"}", 1.0),
            ("denokv_mutations_total{type=\"max\"}", 1.0),
            (
                "denokv_mutations_total{type=\"set_suffix_versionstamped_key\"}",
                1.0,
            ),
            ("denokv_commit_batch_size_count", 4.0),
            ("denokv_commit_batch_size_sum", 4.0),
            ("denokv_commit_batch_size_bucket{le=\"1\"}", 4.0),
            ("denokv_commit_duration_seconds_count", 4.0),
            ("denokv_read_rows_total", 7.0),
            (
                "denokv_http_requests_total{route=\"atomic_write\",status=\"200\"}",
                3.0,
            ),
            (
                "denokv_http_requests_total{route=\"atomic_write\",status=\"400\"}",
                2.0,
            ),
            (
                "denokv_http_requests_total{route=\"snapshot_read\",status=\"200\"}",
                1.0,
            ),
            (
                "denokv_http_requests_total{route=\"other\",status=\"404\"}",
                1.0,
            ),
            (
                "denokv_http_request_duration_seconds_count{route=\"atomic_write\"}",
                5.0,
            ),
            (
                "denokv_http_request_duration_seconds_count{route=\"snapshot_read\"}",
                1.0,
            ),
            (
                "denokv_http_request_duration_seconds_count{route=\"other\"}",
                1.0,
            ),
            ("denokv_expired_rows_swept_total", 0.0),
        ],
    );
    assert!(after.get("denokv_commit_duration_seconds_sum") > 0.0);
    // Pairs that never happened are not exposed.
    assert!(!after.has("denokv_http_requests_total{route=\"watch\",status=\"200\"}"));
    // The client keeps its HTTP/1.1 connection open.
    assert!(after.get("denokv_open_connections") >= 1.0);
    assert_eq!(after.get("denokv_committer_queue_depth"), 0.0);
    assert!(
        after.get("denokv_wal_size_bytes") > 0.0,
        "the WAL holds the commits"
    );

    drop(c);
    let mut s = s;
    tokio::task::spawn_blocking(move || assert!(s.stop().success()))
        .await
        .unwrap();
}

#[tokio::test]
async fn watch_streams_and_connections_are_gauges() {
    let s = Server::start(&[]);
    let c = Client::new();
    let body = pb::Watch {
        keys: vec![pb::WatchKey { key: key("w") }],
    }
    .encode_to_vec();
    let req = data_request(&s.url("/v2/watch"), body);
    let resp = c.send(Proto::H1, req).await;
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    // The ping and the first frame.
    let mut buf = BytesMut::new();
    while buf.len() < 8 {
        let frame = body.frame().await.unwrap().unwrap();
        if let Ok(d) = frame.into_data() {
            buf.extend_from_slice(&d);
        }
    }
    assert_eq!(buf.get_u32_le(), 0, "a ping first");
    let scrape = Scrape::of(&s);
    assert_eq!(scrape.get("denokv_watch_streams"), 1.0);
    assert_eq!(scrape.get("denokv_open_connections"), 1.0);
    assert_eq!(
        scrape.get("denokv_http_requests_total{route=\"watch\",status=\"200\"}"),
        1.0
    );

    drop(body);
    drop(c);
    // An HTTP/1.1 client that goes away is noticed when a ping cannot be written: the first
    // ping after the close may still be accepted by the kernel, so allow two ping intervals.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let scrape = Scrape::of(&s);
        if scrape.get("denokv_watch_streams") == 0.0 && scrape.get("denokv_open_connections") == 0.0
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "gauges did not return to 0: {} streams, {} connections",
            scrape.get("denokv_watch_streams"),
            scrape.get("denokv_open_connections")
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn the_listener_answers_only_get_metrics() {
    let s = Server::start(&[]);
    let addr = s.metrics_addr.unwrap();
    assert!(s
        .log_text()
        .contains(&format!("Metrics on http://{addr}/metrics")));
    // A labelled family shows once it has a child: answer one request first.
    assert_eq!(http_get(s.addr, "/nope").0, 404);
    let (status, _, _) = http_get(addr, "/");
    assert_eq!(status, 404);
    let (status, _, _) = http_get(addr, "/metricsx");
    assert_eq!(status, 404);
    for method in ["POST", "PUT", "DELETE", "HEAD", "OPTIONS"] {
        let (status, _, body) = http_request(addr, method, "/metrics");
        assert_eq!(status, 405, "{method} /metrics");
        assert!(
            !body.contains("# TYPE"),
            "{method} /metrics served the metrics"
        );
    }
    let (status, content_type, body) = http_get(addr, "/metrics?x=1");
    assert_eq!(status, 200);
    assert_eq!(content_type, "text/plain; version=0.0.4");
    let names: HashSet<&str> = body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    for name in [
        "denokv_http_requests_total",
        "denokv_http_request_duration_seconds",
        "denokv_commit_batch_size",
        "denokv_commit_duration_seconds",
        "denokv_writes_committed_total",
        "denokv_write_checks_failed_total",
        "denokv_writes_invalid_total",
        "denokv_mutations_total",
        "denokv_enqueues_total",
        "denokv_read_rows_total",
        "denokv_reads_handed_over_total",
        "denokv_inline_commits_total",
        "denokv_open_connections",
        "denokv_watch_streams",
        "denokv_committer_queue_depth",
        "denokv_database_size_bytes",
        "denokv_wal_size_bytes",
        "denokv_expired_rows_swept_total",
        "denokv_build_info",
        "denokv_sync_mode",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(names.contains(name), "{name} is not exposed");
    }
}

/// Connects to the metrics port and sends `head` (maybe nothing, maybe half a request).
fn hold(addr: std::net::SocketAddr, head: &[u8]) -> std::net::TcpStream {
    use std::io::Write;
    let mut t = std::net::TcpStream::connect(addr).unwrap();
    t.write_all(head).unwrap();
    t
}

/// Waits until the server closes `t` (EOF or reset); how long that took.
fn closed_after(t: &mut std::net::TcpStream, limit: Duration) -> Duration {
    use std::io::Read;
    let start = std::time::Instant::now();
    t.set_read_timeout(Some(limit)).unwrap();
    let mut buf = [0u8; 1024];
    loop {
        match t.read(&mut buf) {
            Ok(0) => return start.elapsed(),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return start.elapsed(),
            Err(e) => panic!("still open after {:?}: {e}", start.elapsed()),
        }
    }
}

#[test]
fn a_silent_or_slow_client_does_not_delay_a_scrape_and_is_closed_after_5_s() {
    let s = Server::start(&[]);
    let addr = s.metrics_addr.unwrap();
    let opened = std::time::Instant::now();
    let mut silent = hold(addr, b"");
    let mut slow = hold(addr, b"GET /metr");
    for _ in 0..3 {
        let start = std::time::Instant::now();
        let (status, _, body) = http_get(addr, "/metrics");
        assert_eq!(status, 200);
        assert!(body.contains("# TYPE denokv_build_info"));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "a scrape took {:?} while a silent client was connected",
            start.elapsed()
        );
    }
    // The header read deadline (5 s) closes both.
    for t in [&mut silent, &mut slow] {
        closed_after(t, Duration::from_secs(10));
        let open_for = opened.elapsed();
        assert!(
            open_for >= Duration::from_millis(4500) && open_for < Duration::from_secs(7),
            "closed after {open_for:?}"
        );
    }
}

#[test]
fn concurrent_scrapes_all_succeed() {
    let s = Server::start(&[]);
    let addr = s.metrics_addr.unwrap();
    let barrier = std::sync::Arc::new(std::sync::Barrier::new(16));
    let scrapers: Vec<_> = (0..16)
        .map(|_| {
            let barrier = barrier.clone();
            std::thread::spawn(move || {
                for _ in 0..4 {
                    barrier.wait();
                    let (status, content_type, body) = http_get(addr, "/metrics");
                    assert_eq!(status, 200);
                    assert_eq!(content_type, "text/plain; version=0.0.4");
                    assert!(body.contains("# TYPE process_open_fds"));
                }
            })
        })
        .collect();
    for t in scrapers {
        t.join().unwrap();
    }
}

#[test]
fn at_most_16_connections_at_once() {
    let s = Server::start(&[]);
    let addr = s.metrics_addr.unwrap();
    let mut held: Vec<_> = (0..16).map(|_| hold(addr, b"")).collect();
    // The 17th is closed at once.
    let mut extra = hold(addr, b"");
    let took = closed_after(&mut extra, Duration::from_secs(3));
    assert!(took < Duration::from_secs(1), "{took:?}");
    // The 16 are still open.
    for t in &held {
        t.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 1];
        let r = std::io::Read::read(&mut &*t, &mut buf);
        assert_eq!(
            r.map_err(|e| e.kind()).unwrap_err(),
            std::io::ErrorKind::WouldBlock
        );
    }
    // One fewer, and a scrape is served again.
    drop(held.pop());
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(http_get(addr, "/metrics").0, 200);
    // Connections still open do not hold up the shutdown.
    let mut s = s;
    let stopping = std::time::Instant::now();
    let status = s.stop();
    assert!(status.success(), "{status}: {}", s.log_text());
    assert!(stopping.elapsed() < Duration::from_secs(3));
    drop(held);
}

#[test]
fn metrics_off_serves_none() {
    let s = Server::start(&["--metrics-addr", "off"]);
    assert!(s.metrics_addr.is_none());
    assert!(!s.log_text().contains("Metrics on"));
}

#[test]
fn expired_rows_swept_are_counted() {
    // Synchronous: the write and the scrape are plain blocking calls on a runtime of its own.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = Server::start(&[]);
    let c = Client::new();
    let now = denokv::kv::now_ms();
    let w = pb::AtomicWrite {
        mutations: (0..3)
            .map(|i| pb::Mutation {
                expire_at_ms: now + 200,
                ..mutation(
                    &key(&format!("e{i}")),
                    pb::MutationType::MSet,
                    bytes_value(b"x"),
                )
            })
            .collect(),
        ..Default::default()
    };
    let r = rt.block_on(write(&c, &s, w));
    assert_eq!(r.status, 200, "{}", r.text());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while Scrape::of(&s).get("denokv_expired_rows_swept_total") < 3.0 {
        assert!(std::time::Instant::now() < deadline, "no sweep counted");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(Scrape::of(&s).get("denokv_expired_rows_swept_total"), 3.0);
}

/// `promtool check metrics` on a real scrape, when promtool is installed (Debian package
/// `prometheus`; tests/run-all.sh installs it).
#[test]
fn promtool_accepts_the_exposition() {
    if std::process::Command::new("promtool")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("promtool is needed for this test (apt-get install prometheus)");
    }
    let s = Server::start(&[]);
    let (_, _, body) = s.scrape();
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(body.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A Prometheus server from the Debian package, killed when dropped.
struct Prometheus {
    child: std::process::Child,
    addr: std::net::SocketAddr,
}

impl Prometheus {
    /// Scrapes `target` every second.
    fn start(dir: &std::path::Path, target: std::net::SocketAddr) -> Prometheus {
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: denokv\n    \
                 static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus is needed for this test (apt-get install prometheus)");
        Prometheus { child, addr }
    }

    /// The value of the one series `query` selects, once Prometheus has it.
    fn value(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|b| match b {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (b as char).to_string(),
                _ => format!("%{b:02X}"),
            })
            .collect();
        // http_get panics when nothing listens yet; Prometheus takes a moment to start.
        std::net::TcpStream::connect(self.addr).ok()?;
        let (status, _, body) = http_get(self.addr, &format!("/api/v1/query?query={encoded}"));
        if status != 200 {
            return None;
        }
        // The JSON object, whatever transfer framing surrounds it.
        let json = &body[body.find('{')?..=body.rfind('}')?];
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_server_and_answers_queries() {
    let dir = tempfile::tempdir().unwrap();
    let s = Server::start(&["--metrics-addr", "127.0.0.1:0"]);
    let c = Client::new();
    for i in 0..7 {
        let w = pb::AtomicWrite {
            mutations: vec![mutation(
                &key(&format!("p{i}")),
                pb::MutationType::MSet,
                bytes_value(b"1"),
            )],
            ..Default::default()
        };
        assert_eq!(write(&c, &s, w).await.status, 200);
    }
    let target = s.metrics_addr.unwrap();
    let prometheus = tokio::task::spawn_blocking(move || {
        let p = Prometheus::start(dir.path(), target);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let mut seen = (None, None);
        while std::time::Instant::now() < deadline {
            seen = (
                p.value("up{job=\"denokv\"}"),
                p.value("denokv_writes_committed_total{job=\"denokv\"}"),
            );
            if seen.0 == Some(1.0) && seen.1.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        }
        drop(p);
        drop(dir);
        seen
    })
    .await
    .unwrap();
    assert_eq!(prometheus.0, Some(1.0), "the target is up");
    assert_eq!(
        prometheus.1,
        Some(7.0),
        "7 writes, read back through the query API"
    );
}
