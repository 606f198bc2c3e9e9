//! Hostile input: every bad request gets a clear 4xx, the connection or the server never dies,
//! and nothing stored is touched.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use common::*;
use rand::{Rng, SeedableRng};

fn raw_exchange(server: &Server, request: &[u8], half_close: bool) -> String {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(request).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn data_request(route: &str, body: &[u8], extra: &str) -> Vec<u8> {
    let mut r = format!(
        "POST /v2/{route} HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
         x-denokv-version: 3\r\nx-denokv-database-id: {NIL_ID}\r\ncontent-length: {}\r\n\
         connection: close\r\n{extra}\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(body);
    r
}

#[tokio::test]
async fn malformed_protobuf_is_a_400_on_every_route() {
    let s = Server::start(&[]);
    let c = Client::new();
    let bodies: [&[u8]; 5] = [
        b"\x0a",                     // truncated length-delimited field
        b"\x0a\xff\xff\xff\xff\x0f", // length far past the end
        b"\x08",                     // truncated varint
        b"\x0f",                     // invalid wire type 7
        b"\x12\x05\x0a\x01",         // nested message cut short
    ];
    for route in ["snapshot_read", "atomic_write", "watch"] {
        for body in bodies {
            for p in BOTH {
                let r = c.data(p, &s, route, body.to_vec()).await;
                assert_eq!(r.status, 400, "{route} {body:02x?}: {}", r.text());
                assert!(
                    r.text().starts_with("Request protobuf is invalid: "),
                    "{}",
                    r.text()
                );
            }
        }
    }
}

#[tokio::test]
async fn random_bodies_never_get_a_5xx_or_a_dropped_connection() {
    let s = Server::start(&[]);
    let c = Client::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for i in 0..600 {
        let len = rng.random_range(0..200);
        let body: Vec<u8> = (0..len).map(|_| rng.random()).collect();
        let route = ["snapshot_read", "atomic_write", "watch"][i % 3];
        let p = BOTH[i % 2];
        if route == "watch" {
            // A valid watch is an endless stream: look at the status only.
            let req = common::data_request(&s.url("/v2/watch"), body.clone());
            let resp = c.try_send(p, req).await.expect("the server answered");
            assert!(
                matches!(resp.status().as_u16(), 200 | 400),
                "{body:02x?} -> {}",
                resp.status()
            );
            continue;
        }
        let r = c
            .try_data(p, &s.url(""), route, body.clone())
            .await
            .expect("the server answered");
        assert!(
            matches!(r.status, 200 | 400),
            "{route} {body:02x?} -> {} {}",
            r.status,
            r.text()
        );
    }
    // Still serving.
    let r = c.data(Proto::H2, &s, "snapshot_read", Vec::new()).await;
    assert_eq!(r.status, 200);
}

#[test]
fn not_http_at_all_gets_a_400_and_the_server_lives_on() {
    let s = Server::start(&[]);
    let reply = raw_exchange(
        &s,
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        false,
    );
    assert!(reply.starts_with("HTTP/1.1 400 "), "{reply:?}");
    let reply = raw_exchange(&s, &data_request("snapshot_read", b"", ""), false);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_half_closed_connection_still_gets_its_answer() {
    let s = Server::start(&[]);
    let reply = raw_exchange(&s, &data_request("snapshot_read", b"", ""), true);
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
}

#[test]
fn a_body_shorter_than_declared_is_not_served() {
    let s = Server::start(&[]);
    // Declares 100 bytes, sends 3, then half-closes.
    let mut req = data_request("atomic_write", b"", "").to_vec();
    let text = String::from_utf8(req.clone())
        .unwrap()
        .replace("content-length: 0", "content-length: 100");
    req = text.into_bytes();
    req.extend_from_slice(b"\x12\x05\x0a");
    let reply = raw_exchange(&s, &req, true);
    assert!(
        reply.is_empty() || reply.starts_with("HTTP/1.1 400"),
        "{reply}"
    );
    let conn = rusqlite::Connection::open(&s.db).unwrap();
    let rows: i64 = conn
        .query_row("SELECT count(*) FROM kv", [], |r| r.get(0))
        .unwrap();
    assert_eq!(rows, 0);
}

#[test]
fn non_ascii_authorization_is_malformed() {
    let s = Server::start(&[]);
    let req = b"POST / HTTP/1.1\r\nhost: x\r\nauthorization: Bearer \xff\xfe\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";
    let reply = raw_exchange(&s, req, false);
    assert!(reply.starts_with("HTTP/1.1 401"), "{reply}");
    assert!(
        reply.ends_with("Malformed authorization header."),
        "{reply}"
    );
}

#[test]
fn chunked_bodies_over_the_limit_are_refused() {
    let s = Server::start(&[]);
    let mut req = format!(
        "POST /v2/atomic_write HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
         x-denokv-version: 3\r\nx-denokv-database-id: {NIL_ID}\r\ntransfer-encoding: chunked\r\n\
         connection: close\r\n\r\n"
    )
    .into_bytes();
    let chunk = vec![0u8; 64 * 1024];
    for _ in 0..40 {
        req.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        req.extend_from_slice(&chunk);
        req.extend_from_slice(b"\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    let reply = raw_exchange(&s, &req, false);
    assert!(
        reply.starts_with("HTTP/1.1 413"),
        "{}",
        &reply[..reply.len().min(200)]
    );
}

/// The metric line `name{labels} value` of a scrape, as a number (0 when absent).
fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, _, body) = s.scrape();
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// `VmHWM` of the server: its peak resident memory, in KiB.
fn peak_rss_kib(s: &Server) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", s.pid())).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_body_declared_over_the_cap_is_refused_from_its_header() {
    let s = Server::start(&["--max-body-bytes", "1048576"]);
    // The head alone, declaring 1 MiB + 1: answered without waiting for the body (the
    // server reads and drops what comes for 2 s at most, then answers).
    let head = format!(
        "POST /v2/atomic_write HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\n\
         x-denokv-version: 3\r\nx-denokv-database-id: {NIL_ID}\r\ncontent-length: {}\r\n\r\n",
        1024 * 1024 + 1
    );
    let start = std::time::Instant::now();
    let mut c = TcpStream::connect(s.addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(head.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = c.read(&mut buf).unwrap();
    let reply = String::from_utf8_lossy(&buf[..n]);
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    let refused = "denokv_requests_refused_total{reason=\"max_body_bytes\"}";
    assert_eq!(metric(&s, refused), 1.0);
    // A body of exactly the cap is read (and refused as bad protobuf, not as too large).
    let reply = raw_exchange(
        &s,
        &data_request("atomic_write", &vec![0xff; 1 << 20], ""),
        false,
    );
    assert!(
        reply.starts_with("HTTP/1.1 400"),
        "{}",
        &reply[..reply.len().min(200)]
    );
    assert_eq!(metric(&s, refused), 1.0);
    // The least cap is 1 MiB, above the largest valid request.
    let (status, stderr) = run_binary(
        &[
            "serve",
            "--max-body-bytes",
            "1048575",
            "--sqlite-path",
            "/nonexistent",
        ],
        &[("DENO_KV_ACCESS_TOKEN", TOKEN)],
    );
    assert!(!status.success(), "{stderr}");
    assert!(stderr.contains("--max-body-bytes"), "{stderr}");
}

#[test]
fn a_body_of_many_small_messages_is_refused_before_it_is_decoded() {
    let s = Server::start(&[]);
    let before = peak_rss_kib(&s);
    // 2 MiB of empty mutations (`12 00`): a million `Mutation`s if decoded whole.
    let body = [0x12u8, 0x00].repeat(1 << 20);
    for route in ["atomic_write", "snapshot_read", "watch"] {
        let mut body = body.clone();
        if route != "atomic_write" {
            // Empty ranges and watch keys (`0a 00`).
            body = [0x0au8, 0x00].repeat(1 << 20);
        }
        let reply = raw_exchange(&s, &data_request(route, &body, ""), false);
        assert!(reply.starts_with("HTTP/1.1 400"), "{route}: {reply}");
        let text = reply.split("\r\n\r\n").nth(1).unwrap_or_default();
        assert!(text.starts_with("Too many"), "{route}: {text}");
    }
    let grew = peak_rss_kib(&s).saturating_sub(before);
    println!("peak RSS grew by {grew} KiB");
    // The bodies themselves (2 MiB each, read once) and little else.
    assert!(grew < 24 * 1024, "peak RSS grew by {grew} KiB");
    let refused = "denokv_requests_refused_total{reason=\"too_many_messages\"}";
    assert_eq!(metric(&s, refused), 3.0);
}

/// Fills keys `big0000`… with `n` values of 64 KiB; a read of them all.
async fn big_values(s: &Server, c: &Client, n: usize) -> Vec<u8> {
    use denokv::proto as pb;
    use prost::Message;
    let value = vec![7u8; 65536];
    let keys: Vec<bytes::Bytes> = (0..n).map(|i| key(&format!("big{i:04}"))).collect();
    for chunk in keys.chunks(12) {
        let w = pb::AtomicWrite {
            mutations: chunk.iter().map(|k| set_bytes(k, &value)).collect(),
            ..Default::default()
        };
        let r = c
            .data(Proto::H2, s, "atomic_write", w.encode_to_vec())
            .await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: key("big"),
            end: key("big9999"),
            limit: n as i32,
            reverse: false,
        }],
    }
    .encode_to_vec()
}

#[tokio::test]
async fn large_answers_wait_for_room_in_the_read_buffer_and_are_all_served() {
    use http_body_util::BodyExt;
    // 16 MiB: one answer of 200 × 64 KiB (13 MB) at a time.
    let s = Server::start(&["--max-read-buffer-mb", "16"]);
    let (a, b) = (Client::new(), Client::new());
    let read = big_values(&s, &a, 200).await;
    let full = a.data(Proto::H2, &s, "snapshot_read", read.clone()).await;
    let out: denokv::proto::SnapshotReadOutput = full.decode();
    assert_eq!(out.ranges[0].values.len(), 200);
    // A takes its answer's head and leaves the body unread: it holds its 13 MB.
    let held = a
        .send(
            Proto::H2,
            common::data_request(&s.url("/v2/snapshot_read"), read.clone()),
        )
        .await;
    assert_eq!(held.status(), 200);
    // B's read waits for room…
    let url = s.url("/v2/snapshot_read");
    let second = tokio::spawn({
        let read = read.clone();
        async move {
            let r = b.send(Proto::H2, common::data_request(&url, read)).await;
            (
                r.status(),
                r.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(!second.is_finished(), "the second read did not wait");
    let waits = "denokv_read_buffer_waits_total ";
    assert_eq!(metric(&s, waits), 1.0);
    // …until A reads its answer: then both are served in full.
    let body = held.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&body[..], &full.body[..]);
    let (status, body) = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("served once there was room")
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(&body[..], &full.body[..]);
}
