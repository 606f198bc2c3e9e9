//! Watch streams (SPEC §2.7) over HTTP/1.1 and h2c.

mod common;

use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use common::*;
use denokv::proto as pb;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prost::Message;

/// Reads length-prefixed frames from a watch body.
struct Frames {
    body: Incoming,
    buf: BytesMut,
}

enum Frame {
    Ping,
    Data(pb::WatchOutput),
}

impl Frames {
    async fn next(&mut self) -> Option<Frame> {
        loop {
            if self.buf.len() >= 4 {
                let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                if self.buf.len() >= 4 + len {
                    self.buf.advance(4);
                    let payload = self.buf.split_to(len);
                    return Some(if len == 0 {
                        Frame::Ping
                    } else {
                        Frame::Data(pb::WatchOutput::decode(payload).unwrap())
                    });
                }
            }
            let frame = self.body.frame().await?.ok()?;
            if let Ok(d) = frame.into_data() {
                self.buf.extend_from_slice(&d);
            }
        }
    }

    /// Reads the rest of the stream: `Ok` at a proper end (HTTP/2 END_STREAM, the last chunk of
    /// an HTTP/1.1 chunked body), the error if the stream was reset or cut short.
    async fn end(&mut self) -> Result<(), hyper::Error> {
        while let Some(frame) = self.body.frame().await {
            frame?;
        }
        Ok(())
    }

    /// The next data frame, skipping pings; fails after `limit`.
    async fn data(&mut self, limit: Duration) -> pb::WatchOutput {
        tokio::time::timeout(limit, async {
            loop {
                match self.next().await.expect("stream ended") {
                    Frame::Ping => continue,
                    Frame::Data(d) => return d,
                }
            }
        })
        .await
        .expect("no data frame in time")
    }
}

async fn open_watch(c: &Client, p: Proto, s: &Server, keys: &[Bytes]) -> Frames {
    let body = pb::Watch {
        keys: keys
            .iter()
            .map(|k| pb::WatchKey { key: k.clone() })
            .collect(),
    }
    .encode_to_vec();
    let req = data_request(&s.url("/v2/watch"), body);
    let resp = c.send(p, req).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "application/octet-stream");
    Frames {
        body: resp.into_body(),
        buf: BytesMut::new(),
    }
}

async fn set(c: &Client, s: &Server, k: &Bytes, v: &[u8]) -> Bytes {
    let w = pb::AtomicWrite {
        mutations: vec![set_bytes(k, v)],
        ..Default::default()
    };
    let out: pb::AtomicWriteOutput = c
        .data(Proto::H2, s, "atomic_write", w.encode_to_vec())
        .await
        .decode();
    out.versionstamp
}

#[tokio::test]
async fn first_frame_then_changes_pushed_on_commit() {
    let s = Server::start(&[]);
    let c = Client::new();
    let a = key("a");
    set(&c, &s, &a, b"1").await;
    for p in BOTH {
        let b = key(&format!("b-{p:?}"));
        let mut frames = open_watch(&c, p, &s, &[a.clone(), b.clone()]).await;
        // The first frame carries every key, changed=true; absent keys have no entry.
        let first = frames.data(Duration::from_secs(5)).await;
        assert_eq!(first.status, pb::SnapshotReadStatus::SrSuccess as i32);
        assert_eq!(first.keys.len(), 2);
        assert!(first.keys.iter().all(|k| k.changed));
        assert_eq!(
            &first.keys[0].entry_if_changed.as_ref().unwrap().value[..],
            b"1"
        );
        assert!(first.keys[1].entry_if_changed.is_none());

        // A commit to b is pushed. Every key is sent as changed with its entry, since Deno 2.x
        // reads changed=false as "deleted".
        let stamp = set(&c, &s, &b, p.label()).await;
        let next = frames.data(Duration::from_secs(5)).await;
        assert!(next.keys.iter().all(|k| k.changed));
        assert_eq!(
            &next.keys[0].entry_if_changed.as_ref().unwrap().value[..],
            b"1"
        );
        let entry = next.keys[1].entry_if_changed.as_ref().unwrap();
        assert_eq!((&entry.value[..], &entry.versionstamp), (p.label(), &stamp));
    }
}

#[tokio::test]
async fn every_commit_of_a_lagging_watcher_is_seen_coalesced() {
    let s = Server::start(&[]);
    let c = Client::new();
    let k = key("counter");
    let mut frames = open_watch(&c, Proto::H2, &s, std::slice::from_ref(&k)).await;
    frames.data(Duration::from_secs(5)).await;
    let mut last = Bytes::new();
    for i in 0..50u32 {
        last = set(&c, &s, &k, &i.to_le_bytes()).await;
    }
    // Frames may coalesce, but the stream converges on the last commit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let f = frames.data(deadline - tokio::time::Instant::now()).await;
        let e = f.keys[0].entry_if_changed.as_ref().unwrap();
        if e.versionstamp == last {
            assert_eq!(&e.value[..], &49u32.to_le_bytes());
            break;
        }
    }
}

#[tokio::test]
async fn watch_limits() {
    let s = Server::start(&[]);
    let c = Client::new();
    let too_many = pb::Watch {
        keys: (0..11)
            .map(|i| pb::WatchKey {
                key: key(&i.to_string()),
            })
            .collect(),
    };
    let r = c
        .data(Proto::H2, &s, "watch", too_many.encode_to_vec())
        .await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "Too many keys watched in a single watch request.")
    );
    let big = pb::Watch {
        keys: vec![pb::WatchKey {
            key: Bytes::from(vec![1u8; 2050]),
        }],
    };
    let r = c.data(Proto::H2, &s, "watch", big.encode_to_vec()).await;
    assert_eq!(
        (r.status, r.text().as_str()),
        (400, "A key exceeds the key size limit.")
    );
    // A 2049-byte key is accepted (Deno allows it; SPEC §10 D8d).
    let mut frames = open_watch(&c, Proto::H2, &s, &[Bytes::from(vec![1u8; 2049])]).await;
    frames.data(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_end_cleanly_on_shutdown() {
    // The default drain timeout (10 s): ended streams let the server stop long before it.
    let mut s = Server::start(&[]);
    let c = Client::new();
    let mut streams = Vec::new();
    for p in BOTH {
        let mut frames = open_watch(&c, p, &s, &[key("x")]).await;
        frames.data(Duration::from_secs(5)).await;
        streams.push((p, frames));
    }
    let started = std::time::Instant::now();
    let (status, log) = tokio::task::spawn_blocking(move || (s.stop(), s.log_text()))
        .await
        .unwrap();
    assert!(status.success(), "{status:?}; log:\n{log}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "the drain waited for the watch streams: {:?}",
        started.elapsed()
    );
    for (p, mut frames) in streams {
        let end = tokio::time::timeout(Duration::from_secs(5), frames.end()).await;
        match end {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!("{p:?}: the watch stream was cut, not ended: {e}"),
            Err(_) => panic!("{p:?}: the watch stream did not end"),
        }
    }
}

trait Label {
    fn label(&self) -> &'static [u8];
}

impl Label for Proto {
    fn label(&self) -> &'static [u8] {
        match self {
            Proto::H1 => b"h1",
            Proto::H2 => b"h2",
        }
    }
}

/// Writes `[k] = v` as another process would (the Deno CLI, say): on its own connection to the
/// file, advancing the global version as every writer of the format does.
fn write_as_another_process(db: &std::path::Path, k: &Bytes, v: &[u8]) {
    let conn = rusqlite::Connection::open(db).unwrap();
    // SQLite's busy handler polls for the lock: against a server committing back to back it
    // can lose every time for a while, so try for long.
    conn.busy_timeout(Duration::from_secs(60)).unwrap();
    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
    conn.execute(
        "UPDATE data_version SET version = version + 1 WHERE k = 0",
        [],
    )
    .unwrap();
    conn.execute(
        "INSERT INTO kv (k, v, v_encoding, version) VALUES (?1, ?2, 3,
           (SELECT version FROM data_version WHERE k = 0))
         ON CONFLICT (k) DO UPDATE SET v = excluded.v, version = excluded.version",
        rusqlite::params![&k[..], v],
    )
    .unwrap();
    conn.execute_batch("COMMIT").unwrap();
}

/// The value in the next data frame for the one watched key.
async fn next_value(frames: &mut Frames, limit: Duration) -> Vec<u8> {
    let frame = frames.data(limit).await;
    frame.keys[0]
        .entry_if_changed
        .as_ref()
        .map(|e| e.value.to_vec())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_read_only_server_streams_every_commit_of_other_processes() {
    // SPEC §10 D8b: upstream's read-only watches freeze after the first frame.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let k = key("shared");
    let mut writer = Server::start_on(&db, &[]);
    let c = Client::new();
    set(&c, &writer, &k, b"0").await;
    tokio::task::spawn_blocking(move || writer.stop())
        .await
        .unwrap();

    let s = Server::start_on(&db, &["--read-only"]);
    for p in BOTH {
        let mut frames = open_watch(&c, p, &s, std::slice::from_ref(&k)).await;
        next_value(&mut frames, Duration::from_secs(5)).await;
        for round in 1..=3 {
            let v = format!("{p:?}-{round}");
            write_as_another_process(&db, &k, v.as_bytes());
            assert_eq!(
                next_value(&mut frames, Duration::from_secs(2)).await,
                v.as_bytes(),
                "{p:?}: frame {round}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_processes_commits_reach_watchers_under_steady_load() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let s = Server::start_on(&db, &[]);
    let c = Client::new();
    let k = key("watched");
    set(&c, &s, &k, b"0").await;
    let mut frames = open_watch(&c, Proto::H2, &s, std::slice::from_ref(&k)).await;
    next_value(&mut frames, Duration::from_secs(5)).await;

    // Steady writes of other keys by this server's own clients, all the while.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = Vec::new();
    for w in 0..4 {
        let (c, url, stop) = (Client::new(), s.url(""), stop.clone());
        load.push(tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                set_key(&c, Proto::H2, &url, &format!("load{w}-{n}"), "x").await;
                // Steady, not saturating: leaves the other process gaps to take the lock in.
                tokio::time::sleep(Duration::from_millis(2)).await;
                n += 1;
            }
            n
        }));
    }
    for round in 1..=5 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let v = format!("external-{round}");
        let (db, k2, v2) = (db.clone(), k.clone(), v.clone());
        tokio::task::spawn_blocking(move || write_as_another_process(&db, &k2, v2.as_bytes()))
            .await
            .unwrap();
        assert_eq!(
            next_value(&mut frames, Duration::from_secs(2)).await,
            v.as_bytes(),
            "round {round}"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut writes = 0;
    for t in load {
        writes += t.await.unwrap();
    }
    assert!(writes > 100, "the load wrote only {writes} times");
}

#[tokio::test]
async fn writes_to_other_keys_send_no_frames() {
    // The Deno client does not surface a repeated frame, so this is checked on the wire.
    let s = Server::start(&[]);
    let c = Client::new();
    let (a, other) = (key("watched-a"), key("other"));
    for p in BOTH {
        let mut frames = open_watch(&c, p, &s, std::slice::from_ref(&a)).await;
        frames.data(Duration::from_secs(5)).await;
        for i in 0..5 {
            set(&c, &s, &other, format!("{i}").as_bytes()).await;
        }
        let spurious = tokio::time::timeout(Duration::from_millis(700), async {
            loop {
                match frames.next().await {
                    Some(Frame::Ping) => continue,
                    Some(Frame::Data(_)) => return true,
                    None => return false,
                }
            }
        })
        .await;
        assert!(
            !matches!(spurious, Ok(true)),
            "{p:?}: a frame came for writes to other keys"
        );
        let stamp = set(&c, &s, &a, p.label()).await;
        let next = frames.data(Duration::from_secs(5)).await;
        let entry = next.keys[0].entry_if_changed.as_ref().unwrap();
        assert_eq!(entry.versionstamp, stamp, "{p:?}");
    }
}

/// A watch request that may be refused: its status and, when refused, the text.
async fn try_watch(c: &Client, s: &Server, k: &str) -> (u16, Option<Frames>, String) {
    let body = pb::Watch {
        keys: vec![pb::WatchKey { key: key(k) }],
    }
    .encode_to_vec();
    let resp = c
        .send(Proto::H2, data_request(&s.url("/v2/watch"), body))
        .await;
    let status = resp.status().as_u16();
    if status == 200 {
        let frames = Frames {
            body: resp.into_body(),
            buf: BytesMut::new(),
        };
        return (status, Some(frames), String::new());
    }
    let text = resp.into_body().collect().await.unwrap().to_bytes();
    (status, None, String::from_utf8_lossy(&text).into_owned())
}

fn refused(s: &Server, reason: &str) -> f64 {
    let (_, _, body) = s.scrape();
    let line = format!("denokv_requests_refused_total{{reason=\"{reason}\"}}");
    body.lines()
        .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn watch_streams_past_a_cap_get_429_and_a_closed_one_frees_its_slot() {
    let s = Server::start(&[
        "--max-watch-streams-per-connection",
        "2",
        "--max-watch-streams",
        "3",
    ]);
    // Each client is one h2 connection.
    let (one, two) = (Client::new(), Client::new());
    let (status, first, _) = try_watch(&one, &s, "a").await;
    assert_eq!(status, 200);
    let mut first = first.unwrap();
    first.data(Duration::from_secs(5)).await;
    let (status, _second, _) = try_watch(&one, &s, "b").await;
    assert_eq!(status, 200);
    let (status, _, text) = try_watch(&one, &s, "c").await;
    assert_eq!(status, 429, "{text}");
    assert!(
        text.contains("--max-watch-streams-per-connection"),
        "{text}"
    );
    assert_eq!(refused(&s, "max_watch_streams_per_connection"), 1.0);
    // Another connection: one more fits in the server's three.
    let (status, _third, _) = try_watch(&two, &s, "d").await;
    assert_eq!(status, 200);
    let (status, _, text) = try_watch(&two, &s, "e").await;
    assert_eq!(status, 429, "{text}");
    assert!(text.contains("--max-watch-streams)"), "{text}");
    assert_eq!(refused(&s, "max_watch_streams"), 1.0);
    // Reads and writes on a connection at its cap go on.
    set(&one, &s, &key("a"), b"1").await;
    // A closed stream gives its slots back (once the server has seen it close).
    drop(first);
    let start = std::time::Instant::now();
    loop {
        let (status, frames, _) = try_watch(&two, &s, "f").await;
        if status == 200 {
            frames.unwrap().data(Duration::from_secs(5)).await;
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "no slot freed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A commit that wakes many watch streams on one h2 connection writes their frames to the
/// socket in a few system calls, not one per frame (the h2 crate flushes after each DATA
/// frame of 256 bytes or more; the server gathers what it writes in a poll of the connection).
#[tokio::test]
async fn one_commit_reaches_many_watch_streams_on_one_connection_in_few_socket_writes() {
    const STREAMS: usize = 64;
    const COMMITS: usize = 4;
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("trace");
    let trace_arg = trace.display().to_string();
    let mut s = Launch::new(&dir.path().join("db.sqlite"))
        .under_strace(&trace_arg, &["-y", "-ttt", "-e", "trace=write,writev"])
        .start();
    let c = Client::new();
    let hot = key("hot");
    // A watch frame of about 1.6 KB, as in the watch load.
    set(&c, &s, &hot, &[0; 1_500]).await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut frames = open_watch(&c, Proto::H2, &s, std::slice::from_ref(&hot)).await;
        frames.data(Duration::from_secs(10)).await;
        streams.push(frames);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for i in 1..=COMMITS {
        set(&c, &s, &hot, &[i as u8; 1_500]).await;
        for frames in &mut streams {
            let d = frames.data(Duration::from_secs(10)).await;
            let value = &d.keys[0].entry_if_changed.as_ref().unwrap().value;
            assert_eq!(value[0], i as u8);
        }
    }
    drop(streams);
    drop(c);
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success());
    // `PID 1733.123456 writev(7<socket:[...]>, ...) = 1618`: writes to sockets after `since`.
    let writes = std::fs::read_to_string(&trace)
        .unwrap()
        .lines()
        .filter(|l| l.contains("write") && l.contains("<socket:"))
        .filter(|l| {
            l.split_whitespace()
                .find_map(|f| f.parse::<f64>().ok().filter(|t| *t > 1e9))
                .is_some_and(|t| t >= since)
        })
        .count();
    let frames = STREAMS * COMMITS;
    eprintln!("{writes} socket writes for {frames} watch frames and {COMMITS} commits");
    // At least the commits' answers: the trace was read.
    assert!(writes >= COMMITS, "{writes} socket writes");
    assert!(
        writes * 4 <= frames,
        "{writes} socket writes for {frames} watch frames (and {COMMITS} commits)"
    );
}

/// Streams woken by the same commit on one core share one read of their keys
/// (`http::watch::WatchReads`): 100 streams on one connection, one commit, one row read.
#[tokio::test]
async fn streams_woken_by_one_commit_share_one_read() {
    const STREAMS: usize = 100;
    let s = Server::start(&[]);
    let c = Client::new();
    let hot = key("hot");
    set(&c, &s, &hot, b"0").await;
    let mut streams = Vec::new();
    for _ in 0..STREAMS {
        let mut frames = open_watch(&c, Proto::H2, &s, std::slice::from_ref(&hot)).await;
        frames.data(Duration::from_secs(10)).await;
        streams.push(frames);
    }
    let rows = || {
        let (_, _, body) = s.scrape();
        body.lines()
            .find_map(|l| {
                l.strip_prefix("denokv_read_rows_total ")?
                    .parse::<f64>()
                    .ok()
            })
            .expect("denokv_read_rows_total")
    };
    let before = rows();
    set(&c, &s, &hot, b"1").await;
    for frames in &mut streams {
        let d = frames.data(Duration::from_secs(10)).await;
        assert_eq!(
            &d.keys[0].entry_if_changed.as_ref().unwrap().value[..],
            b"1"
        );
    }
    let read = rows() - before;
    assert_eq!(
        read, 1.0,
        "{read} rows read for {STREAMS} frames of one commit"
    );
}
