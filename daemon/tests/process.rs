//! The process: command line, start-up errors, the epoll fallback, graceful shutdown, and
//! durability of acknowledged writes across SIGKILL.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;

const SHORT: &str = "short-token";

fn db_arg(dir: &tempfile::TempDir) -> String {
    dir.path().join("db.sqlite").display().to_string()
}

#[test]
fn start_up_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);

    let (status, err) = run_binary(
        &["--sqlite-path", &db, "serve", "--access-token", SHORT],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert_eq!(
        err.trim(),
        "Error: Access token must be at minimum 12 chars long."
    );

    let (status, err) = run_binary(&["--sqlite-path", &db, "serve"], &[]);
    assert_eq!(status.code(), Some(2), "a usage error");
    assert!(err.contains("--access-token"), "{err}");

    let (status, err) = run_binary(&["serve", "--access-token", TOKEN], &[]);
    assert_eq!(status.code(), Some(2));
    assert!(err.contains("--sqlite-path"), "{err}");

    // The token in the environment: on the command line it adds a warning line.
    let (status, err) = run_binary(
        &["--sqlite-path", "/nonexistent/dir/db.sqlite", "serve"],
        &[("DENO_KV_ACCESS_TOKEN", TOKEN)],
    );
    assert_eq!(status.code(), Some(1));
    assert!(
        err.starts_with("Error: cannot open database /nonexistent/dir/db.sqlite"),
        "{err}"
    );
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");

    let (status, err) = run_binary(
        &[
            "--sqlite-path",
            &db,
            "serve",
            "--access-token",
            TOKEN,
            "--read-only",
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("does not exist"), "{err}");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let (status, err) = run_binary(
        &[
            "--sqlite-path",
            &db,
            "serve",
            "--access-token",
            TOKEN,
            "--addr",
            &addr,
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1));
    assert!(err.contains("Failed to start server"), "{err}");
}

#[test]
fn a_second_server_cannot_take_a_served_port() {
    let first = Server::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    let addr = first.addr.to_string();
    let (status, err) = run_binary(
        &[
            "--sqlite-path",
            &db_arg(&dir),
            "serve",
            "--access-token",
            TOKEN,
            "--addr",
            &addr,
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("Failed to start server"), "{err}");
}

#[test]
fn help_explains_every_flag() {
    let (status, out) = {
        let o = std::process::Command::new(binary())
            .args(["--sqlite-path", "x", "serve", "--help"])
            .output()
            .unwrap();
        (o.status, String::from_utf8(o.stdout).unwrap())
    };
    assert!(status.success());
    for flag in [
        "--access-token",
        "--addr",
        "--read-only",
        "--threads",
        "--sync-mode",
        "--drain-timeout",
        "--access-token-file",
        "--log-level-file",
    ] {
        assert!(out.contains(flag), "{flag} missing from:\n{out}");
    }
    assert!(out.contains("DENO_KV_ACCESS_TOKEN"));
}

#[tokio::test]
async fn environment_variables_configure_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = db_arg(&dir);
    let mut child = std::process::Command::new(binary())
        .args(["serve", "--addr", "127.0.0.1:0", "--threads", "1"])
        .env("DENO_KV_SQLITE_PATH", &db)
        .env("DENO_KV_ACCESS_TOKEN", TOKEN)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let line = std::io::BufRead::lines(std::io::BufReader::new(stderr))
        .map(|l| l.unwrap())
        .find(|l| l.contains("Listening on http://"))
        .expect("listening");
    assert!(line.contains("127.0.0.1:"));
    assert!(std::path::Path::new(&db).exists());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .unwrap();
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    assert!(status.success(), "SIGINT exits 0: {status:?}");
}

#[tokio::test]
async fn serves_on_epoll_when_io_uring_is_denied() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut s = Launch::new(&db)
        .under_strace(
            "/dev/null",
            &[
                "-e",
                "trace=io_uring_setup",
                "-e",
                "inject=io_uring_setup:error=ENOSYS",
            ],
        )
        .start();
    assert!(s.log_text().contains("cores on epoll"), "{}", s.log_text());
    serves_both_protocols(&s).await;
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success());
}

/// Sets a key and reads it back over both protocols.
async fn serves_both_protocols(s: &Server) {
    let c = Client::new();
    let url = s.url("");
    for p in BOTH {
        let r = set_key(&c, p, &url, &format!("{p:?}"), "works")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
        assert_eq!(
            get_key(&c, p, &url, &format!("{p:?}")).await.unwrap(),
            "works"
        );
    }
}

#[tokio::test]
async fn the_io_driver_can_be_chosen() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--io-driver", "epoll", "--threads", "2"])
        .env("RUST_LOG", "info,denokv::runtime::core=debug")
        .start();
    let log = s.log_text();
    assert!(log.contains("cores on epoll"), "{log}");
    // What each core's runtime really is (monoio's own answer, inside the runtime).
    for core in 0..2 {
        assert!(log.contains(&format!("core {core} runs on epoll")), "{log}");
    }
    serves_both_protocols(&s).await;
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success());

    // io_uring asked for but denied (as a seccomp filter or kernel.io_uring_disabled would):
    // the server does not start, and says why.
    let out = std::process::Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "-e", "trace=io_uring_setup"])
        .args([
            "-e",
            "inject=io_uring_setup:error=ENOSYS",
            binary(),
            "--sqlite-path",
        ])
        .arg(dir.path().join("db2.sqlite"))
        .args(["serve", "--access-token", TOKEN, "--addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "off", "--io-driver", "io-uring"])
        .env_remove("DENO_KV_ACCESS_TOKEN")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("strace is needed for this test (apt-get install strace)");
    let (status, out) = (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(!status.success());
    assert!(
        out.contains("cannot start the io_uring driver (--io-driver)"),
        "{out}"
    );
}

/// The WAL system calls the threads that commit (the committer's and the cores') make while a
/// server commits `writes` writes one at a time, by name (`pwrite64`, `fsync`, `fdatasync`,
/// `io_uring_enter`). The checkpointer's calls do not count: it syncs the WAL too, as often
/// as timing has it. The cores wait on epoll, so that their io_uring calls are the WAL's.
async fn writer_wal_syscalls(
    extra: &[&str],
    writes: usize,
) -> std::collections::HashMap<String, usize> {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let trace = dir.path().join("trace");
    let trace_arg = trace.display().to_string();
    let args: Vec<&str> = extra
        .iter()
        .copied()
        .chain(["--io-driver", "epoll"])
        .collect();
    let mut s = Launch::new(&db)
        .args(&args)
        .under_strace(
            &trace_arg,
            &["-y", "-e", "trace=pwrite64,fsync,fdatasync,io_uring_enter"],
        )
        .start();
    let pid = s.pid();
    // The threads that commit: the committer's, and the cores' (a lone write is committed on
    // the core that received it).
    let writers: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .map(|t| t.unwrap().file_name().into_string().unwrap())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .is_ok_and(|c| c.trim() == "committer" || c.starts_with("core-"))
        })
        .collect();
    assert!(writers.len() >= 2, "a committer thread and a core");
    let c = Client::new();
    let url = s.url("");
    for i in 0..writes {
        let r = set_key(&c, Proto::H2, &url, &format!("k{i}"), "v")
            .await
            .unwrap();
        assert_eq!(r.status, 200);
    }
    drop(c);
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success());
    let mut counts = std::collections::HashMap::new();
    for line in std::fs::read_to_string(&trace).unwrap().lines() {
        let mut fields = line.split_whitespace();
        if !fields
            .next()
            .is_some_and(|tid| writers.iter().any(|w| w == tid))
        {
            continue;
        }
        let Some(call) = fields.next() else { continue };
        let name = call.split('(').next().unwrap_or_default().to_string();
        if name == "io_uring_enter" || call.contains("-wal>") {
            *counts.entry(name).or_default() += 1;
        }
    }
    counts
}

#[tokio::test]
async fn io_uring_wal_writes_replace_the_pwrites_and_fsyncs_of_each_commit() {
    const WRITES: usize = 30;
    let plain = writer_wal_syscalls(&["--wal-writes", "pwrite"], WRITES).await;
    let get =
        |m: &std::collections::HashMap<String, usize>, k: &str| m.get(k).copied().unwrap_or(0);
    // SQLite itself: a frame header and a page per written page, and an fsync per commit.
    assert!(get(&plain, "pwrite64") >= 2 * WRITES, "{plain:?}");
    assert!(get(&plain, "fsync") >= WRITES, "{plain:?}");

    let uring = writer_wal_syscalls(&["--wal-writes", "io-uring"], WRITES).await;
    eprintln!("pwrite: {plain:?}\nio_uring: {uring:?}");
    // Ours: the first sync of the WAL goes through SQLite (it also syncs the directory
    // then); every later commit is one io_uring submission.
    assert!(get(&uring, "pwrite64") <= 2, "{uring:?}");
    assert!(
        get(&uring, "fsync") + get(&uring, "fdatasync") <= 2,
        "{uring:?}"
    );
    assert!(get(&uring, "io_uring_enter") >= WRITES, "{uring:?}");
    assert_eq!(get(&plain, "io_uring_enter"), 0, "{plain:?}");
}

/// Writers that record a key only after its write was acknowledged, and when each writer
/// stopped on a failure (a refused connection, an error answer).
async fn write_load(
    url: String,
    writers: usize,
    acked: Arc<Mutex<Vec<String>>>,
    failed_at: Arc<Mutex<Vec<Instant>>>,
    stop_after: Duration,
) {
    let c = Arc::new(Client::new());
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (c, url, acked, failed_at) = (c.clone(), url.clone(), acked.clone(), failed_at.clone());
        tasks.push(tokio::spawn(async move {
            let start = Instant::now();
            let p = if w % 2 == 0 { Proto::H1 } else { Proto::H2 };
            for i in 0.. {
                if start.elapsed() > stop_after {
                    break;
                }
                let k = format!("w{w}-{i}");
                match set_key(&c, p, &url, &k, &k).await {
                    Some(r) if r.status == 200 => acked.lock().unwrap().push(k),
                    _ => {
                        failed_at.lock().unwrap().push(Instant::now());
                        break;
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// A request body that hyper sends as it is handed over: the test holds it back.
struct HeldBody(tokio::sync::mpsc::Receiver<Bytes>);

impl hyper::body::Body for HeldBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|b| b.map(|b| Ok(hyper::body::Frame::data(b))))
    }
}

/// A write of `[key] = key` whose request head and first half of body are sent, on a
/// connection of its own, and whose second half waits for `finish`: a request the server
/// certainly has in flight meanwhile.
struct HeldWrite {
    key: String,
    rest: Bytes,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    /// The status and the complete body, or why there was none.
    answer: tokio::task::JoinHandle<Result<(u16, Bytes), String>>,
}

impl HeldWrite {
    async fn start(addr: std::net::SocketAddr, p: Proto, key: &str) -> HeldWrite {
        use denokv::proto as pb;
        use prost::Message;
        let body = pb::AtomicWrite {
            mutations: vec![set_bytes(&common::key(key), key.as_bytes())],
            ..Default::default()
        }
        .encode_to_vec();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let req = http::Request::post(format!("http://{addr}/v2/atomic_write"))
            .header("authorization", format!("Bearer {TOKEN}"))
            .header("x-denokv-version", "3")
            .header("x-denokv-database-id", NIL_ID)
            .body(HeldBody(rx))
            .unwrap();
        let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let io = hyper_util::rt::TokioIo::new(stream);
        let sent = match p {
            Proto::H1 => {
                let (mut send, conn) = hyper::client::conn::http1::handshake(io).await.unwrap();
                tokio::spawn(conn);
                tokio::spawn(async move { send.send_request(req).await })
            }
            Proto::H2 => {
                let exec = hyper_util::rt::TokioExecutor::new();
                let (mut send, conn) = hyper::client::conn::http2::handshake(exec, io)
                    .await
                    .unwrap();
                tokio::spawn(conn);
                tokio::spawn(async move { send.send_request(req).await })
            }
        };
        let answer = tokio::spawn(async move {
            let resp = sent.await.unwrap().map_err(|e| format!("no answer: {e}"))?;
            let status = resp.status().as_u16();
            // A reset stream or a truncated chunked body is an error here, not an end.
            let body = http_body_util::BodyExt::collect(resp.into_body())
                .await
                .map_err(|e| format!("the answer's body did not end cleanly: {e}"))?;
            Ok((status, body.to_bytes()))
        });
        let half = body.len() / 2;
        tx.send(Bytes::copy_from_slice(&body[..half]))
            .await
            .unwrap();
        HeldWrite {
            key: key.to_string(),
            rest: Bytes::copy_from_slice(&body[half..]),
            tx,
            answer,
        }
    }

    /// Sends the rest of the body and ends it; the answer, as `answer` holds it.
    async fn finish(self) -> Result<(u16, Bytes), String> {
        // The server may have cut the connection already: then the answer says so.
        let _ = self.tx.send(self.rest).await;
        drop(self.tx);
        self.answer.await.unwrap()
    }
}

async fn assert_all_present(db: &std::path::Path, acked: &[String]) {
    let mut s = Server::start_on(db, &[]);
    let c = Client::new();
    let url = s.url("");
    for k in acked {
        assert_eq!(
            get_key(&c, Proto::H2, &url, k).await.as_deref(),
            Some(k.as_bytes()),
            "acknowledged write {k} lost"
        );
    }
    drop(c);
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success());
}

/// How the server is stopped in the middle of a write load.
enum Stop {
    /// SIGKILL: nothing acknowledged may be lost.
    Kill,
    /// SIGTERM: in-flight writes finish, the exit code is 0, nothing acknowledged is lost.
    Term,
}

async fn acknowledged_writes_survive(stop: Stop, extra: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let mut s = Server::start_on(&db, extra);
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failed_at = Arc::new(Mutex::new(Vec::new()));
    let load = tokio::spawn(write_load(
        s.url(""),
        32,
        acked.clone(),
        failed_at.clone(),
        Duration::from_secs(10),
    ));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stopped_at = Instant::now();
    match stop {
        Stop::Kill => s.kill(),
        Stop::Term => {
            // Requests the server has in flight when SIGTERM comes, on both protocols: each
            // must get its whole answer during the drain.
            let mut held = Vec::new();
            for p in BOTH {
                held.push(HeldWrite::start(s.addr, p, &format!("held-{p:?}")).await);
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut s = tokio::task::spawn_blocking(move || {
                s.signal(nix::sys::signal::Signal::SIGTERM);
                s.wait_for_log("draining connections", Duration::from_secs(10));
                s
            })
            .await
            .unwrap();
            // The cores act on the shutdown right after that line.
            tokio::time::sleep(Duration::from_millis(200)).await;
            for h in held {
                let key = h.key.clone();
                let (status, body) = h
                    .finish()
                    .await
                    .unwrap_or_else(|e| panic!("{key}: in flight at SIGTERM, {e}"));
                assert_eq!(status, 200, "{key}: {}", String::from_utf8_lossy(&body));
                let out =
                    <denokv::proto::AtomicWriteOutput as prost::Message>::decode(body).unwrap();
                assert_eq!(out.versionstamp.len(), 10, "{key}: {out:?}");
                acked.lock().unwrap().push(key);
            }
            let status = tokio::task::spawn_blocking(move || {
                let status = s.wait_exit(Duration::from_secs(20));
                (status, s.log_text())
            })
            .await
            .unwrap();
            assert!(status.0.success(), "{:?}; log:\n{}", status.0, status.1);
        }
    }
    load.await.unwrap();
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 100,
        "the load made too little progress to prove anything: {}",
        acked.len()
    );
    // Writers stop on the first failure: none may come before the server was stopped.
    for t in failed_at.lock().unwrap().iter() {
        assert!(
            *t >= stopped_at,
            "a writer failed before the server was stopped"
        );
    }
    assert_all_present(&db, &acked).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_write() {
    acknowledged_writes_survive(Stop::Kill, &[]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_loses_no_acknowledged_write_with_io_uring_wal_writes() {
    acknowledged_writes_survive(Stop::Kill, &["--wal-writes", "io-uring"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_drains_and_exits_zero() {
    acknowledged_writes_survive(Stop::Term, &[]).await;
}

/// A connection still busy when the drain timeout runs out is cut off: the server says so
/// and does not exit 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_times_out_cuts_off_and_exits_one() {
    let s = Server::start(&["--drain-timeout", "1"]);
    // Never finished: it keeps its connection open through the drain.
    let held = HeldWrite::start(s.addr, Proto::H1, "never-finished").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let started = Instant::now();
    let (s, status) = tokio::task::spawn_blocking(move || {
        let mut s = s;
        let status = s.stop();
        s.wait_for_log("Error: ", Duration::from_secs(5));
        (s, status)
    })
    .await
    .unwrap();
    let log = s.log_text();
    assert_eq!(status.code(), Some(1), "{status:?}; log:\n{log}");
    assert!(started.elapsed() < Duration::from_secs(8), "{log}");
    assert!(
        log.contains("1 connections still open after the drain timeout: cut off"),
        "{log}"
    );
    let last = log.lines().last().unwrap();
    assert!(
        last.starts_with("Error: the drain timed out: 1 connections were still open after 1 s"),
        "{log}"
    );
    assert!(
        held.finish().await.is_err(),
        "the cut-off request has no answer"
    );
}

#[test]
fn lifts_its_open_files_limit_to_the_hard_limit() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    // Soft 256 would refuse the 250th client; the server lifts it to the hard limit.
    let mut s = Launch::new(&db)
        .wrapper(&["prlimit", "--nofile=256:4096"], false)
        .start();
    let (status, _, body) = s.scrape();
    assert_eq!(status, 200);
    assert!(body.contains("\nprocess_max_fds 4096\n"), "{body}");
    assert!(s.stop().success());
}

/// Signals the main thread takes synchronously must be blocked in every thread, including
/// those started before serving (the OTLP exporter's): a thread that does not block SIGHUP or
/// SIGTERM takes its default action, which kills the process.
#[test]
fn every_thread_blocks_the_signals_the_server_handles() {
    let dir = tempfile::tempdir().unwrap();
    let s = Launch::new(&dir.path().join("db.sqlite"))
        // Starts the exporter thread; nothing needs to listen there.
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
        .start();
    let pid = s.pid();
    let wanted = [libc::SIGHUP, libc::SIGINT, libc::SIGTERM];
    let mut threads = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let path = task.unwrap().path();
        // The main thread waits for them in sigtimedwait, which unblocks them while it waits.
        if path.ends_with(pid.to_string()) {
            continue;
        }
        let name = std::fs::read_to_string(path.join("comm")).unwrap();
        let status = std::fs::read_to_string(path.join("status")).unwrap();
        let blocked = status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap())
            .unwrap();
        for sig in wanted {
            assert!(
                blocked & (1 << (sig - 1)) != 0,
                "thread {} does not block signal {sig}",
                name.trim()
            );
        }
        threads.push(name.trim().to_string());
    }
    assert!(
        threads.iter().any(|t| t.starts_with("OpenTelemetry")),
        "no exporter thread among {threads:?}"
    );
}

/// A server killed under HTTP/2 load and started again at once, many times: every start must
/// come up (a killed server's listening sockets can outlive it for a moment).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_right_after_a_crash_under_load_comes_up_every_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let start = || {
        Launch::bare(&db)
            .args(&["--access-token", TOKEN, "--addr", &addr])
            .start()
    };
    let mut s = start();
    for cycle in 0..10 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let mut load = Vec::new();
        for w in 0..3 {
            let (url, stop) = (s.url(""), stop.clone());
            load.push(tokio::spawn(async move {
                let c = Client::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    set_key(&c, Proto::H2, &url, &format!("c{cycle}w{w}n{i}"), "v").await;
                    i += 1;
                }
            }));
        }
        tokio::time::sleep(Duration::from_millis(200 + 37 * cycle)).await;
        s.kill();
        // At once: `start` panics unless the server logs that it listens.
        s = start();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in load {
            let _ = t.await;
        }
    }
}
