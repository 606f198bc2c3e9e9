//! Faults (docs/RELIABILITY.md): what clients are told when the disk fails at or before COMMIT,
//! a full disk, and a panic on any thread. WAL failures and panics are injected through the
//! debug build's hooks (`DENOKV_DEBUG_WAL_FAULT`, `DENOKV_DEBUG_PANIC` + SIGUSR2); the full
//! disk is a real one: a small tmpfs (the tests run as root).

mod common;

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const H2: Proto = Proto::H2;

async fn write_ok(c: &Client, s: &Server, k: &str) {
    let r = set_key(c, H2, &s.url(""), k, "v").await.expect("an answer");
    assert_eq!(r.status, 200, "{}: {}", k, r.text());
}

/// The metric line `name{labels} value` of a scrape, as a number.
fn metric(s: &Server, line_start: &str) -> f64 {
    let (_, _, body) = s.scrape();
    body.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line_start} in\n{body}"))
}

/// Writes `k0`, `k1`, … one at a time until one is not answered 200 (at most 10): the keys
/// acknowledged before, the refused one and its answer.
async fn write_until_refused(c: &Client, s: &Server) -> (Vec<String>, String, Reply) {
    let mut acknowledged = Vec::new();
    loop {
        let k = format!("k{}", acknowledged.len());
        let r = set_key(c, H2, &s.url(""), &k, "v").await.unwrap();
        if r.status != 200 {
            return (acknowledged, k, r);
        }
        acknowledged.push(k);
        assert!(acknowledged.len() < 10, "no write failed");
    }
}

/// After the server stopped on its own with exit code 1 (saying why): every key of `keys` is
/// there once the database is opened again.
async fn stopped_and_recovered(s: &mut Server, db: &Path, keys: &[String], what: &str) {
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(20)));
    assert_eq!(
        status.code(),
        Some(1),
        "{what}: {status:?}; log:\n{}",
        s.log_text()
    );
    let log = s.log_text();
    assert!(
        log.contains("stopping the server") && log.contains("wal_sync failed"),
        "{log}"
    );
    let s = Launch::new(db).start();
    let c = Client::new();
    for k in keys {
        assert!(
            get_key(&c, H2, &s.url(""), k).await.is_some(),
            "{what}: {k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_sync_is_answered_as_unknown_and_stops_the_server() {
    // ENOSPC from a sync: thin-provisioned and network volumes report a full disk late.
    for (wal, errno) in [("pwrite", "EIO"), ("io-uring", "EIO"), ("pwrite", "ENOSPC")] {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let mut s = Launch::new(&db)
            .args(&["--wal-writes", wal])
            .env(
                "DENOKV_DEBUG_WAL_FAULT",
                &format!("sync:{errno}:after=4:times=1"),
            )
            .start();
        // The fifth WAL sync of the committer fails (the count includes its own start-up).
        let (mut written, doubtful, r) = write_until_refused(&Client::new(), &s).await;
        assert!(written.len() >= 2, "{wal}: {written:?}");
        // Not a 5xx: Deno would send the write again.
        assert_eq!(r.status, 409, "{wal}: {}", r.text());
        assert!(
            r.text().contains("outcome of this write is unknown"),
            "{}",
            r.text()
        );
        // Recovery decides: here the sync had in fact happened, so the write is there, and
        // answering "not committed" (a retry) would have applied it twice.
        written.push(doubtful);
        stopped_and_recovered(&mut s, &db, &written, &format!("{wal} {errno}")).await;
    }
}

/// The same fault as a real failing system call, no debug hook: strace makes an fsync of the
/// WAL fail with EIO (with `--wal-writes pwrite` SQLite syncs the WAL with fsync).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_fsync_failure_of_the_wal_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let wal = format!("{}-wal", db.display());
    let mut s = Launch::new(&db)
        .args(&["--wal-writes", "pwrite"])
        .under_strace(
            "/dev/null",
            &[
                "-P",
                &wal,
                "-e",
                "trace=fsync,fdatasync",
                "-e",
                "inject=fsync:error=EIO:when=4",
            ],
        )
        .start();
    let (mut written, doubtful, r) = write_until_refused(&Client::new(), &s).await;
    assert_eq!(r.status, 409, "{}", r.text());
    written.push(doubtful);
    stopped_and_recovered(&mut s, &db, &written, "strace").await;
}

/// A failed sync of the database file during a WAL checkpoint, as a real failing system call:
/// strace makes the checkpointer's `fdatasync` of the database file fail with EIO (SQLite
/// itself syncs with fsync). Pages it copied may not be on the disk, so the server stops, and
/// recovery replays them from the WAL, which still holds every acknowledged write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_sync_of_the_database_file_at_a_checkpoint_stops_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let path = db.display().to_string();
    let mut s = Launch::new(&db)
        .under_strace(
            "/dev/null",
            &[
                "-P",
                &path,
                "-e",
                "trace=fdatasync",
                "-e",
                "inject=fdatasync:error=EIO",
            ],
        )
        .start();
    let c = Client::new();
    // The checkpointer syncs the database file once the WAL passes 32 MiB: 60 kB values
    // (about 400 of them).
    let value = "v".repeat(60_000);
    let mut acknowledged = Vec::new();
    for i in 0..2_000 {
        let k = format!("k{i}");
        match set_key(&c, H2, &s.url(""), &k, &value).await {
            Some(r) if r.status == 200 => acknowledged.push(k),
            // Stopping: a write answered during the drain, or a closed connection.
            _ => break,
        }
    }
    assert!(acknowledged.len() > 100, "{} writes", acknowledged.len());
    let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(30)));
    let log = s.log_text();
    assert_eq!(status.code(), Some(1), "{status:?}; log:\n{log}");
    assert!(
        log.contains("a WAL checkpoint failed") && log.contains("syncing the database file"),
        "{log}"
    );
    let s = Launch::new(&db).start();
    for k in &acknowledged {
        let entry = get_key(&c, H2, &s.url(""), k).await;
        assert!(entry.is_some_and(|v| v.len() == value.len()), "{k}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_wal_write_is_rolled_back_and_the_server_carries_on() {
    for (wal, errno, status) in [
        ("pwrite", "EIO", 503),
        ("pwrite", "ENOSPC", 507),
        ("io-uring", "ENOSPC", 507),
    ] {
        let s = Launch::new(&tempfile::tempdir().unwrap().keep().join("db.sqlite"))
            .args(&["--wal-writes", wal])
            .env("DENOKV_DEBUG_WAL_FAULT", &format!("write:{errno}:times=1"))
            .start();
        let c = Client::new();
        let r = set_key(&c, H2, &s.url(""), "failed", "v").await.unwrap();
        assert_eq!(r.status, status, "{wal} {errno}: {}", r.text());
        if status == 507 {
            assert_eq!(
                r.text(),
                "The server's disk is full: the write was not committed. Try again later."
            );
        }
        assert!(get_key(&c, H2, &s.url(""), "failed").await.is_none());
        // The same write, retried as Deno would, goes through.
        write_ok(&c, &s, "failed").await;
        assert_eq!(
            metric(&s, "denokv_commit_failures_total{phase=\"wal_write\"}"),
            1.0
        );
        assert_eq!(
            metric(&s, "denokv_commit_failures_total{phase=\"wal_sync\"}"),
            0.0
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_any_thread_aborts_the_process_with_a_clear_line() {
    for (place, thread) in [
        ("committer", "committer"),
        ("checkpointer", "checkpointer"),
        ("core", "core-"),
        ("metrics", "metrics"),
        ("external", "external-commits"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Launch::new(&dir.path().join("db.sqlite"))
            .env("DENOKV_DEBUG_PANIC", place)
            .start();
        let c = Client::new();
        write_ok(&c, &s, "before").await;
        s.signal(nix::sys::signal::Signal::SIGUSR2);
        s.wait_for_log("panics at its next panic point", Duration::from_secs(5));
        // Pass the place's panic point (the poller passes its own every 100 ms).
        match place {
            "core" => drop(set_key(&c, H2, &s.url(""), "after", "v").await),
            "committer" => {
                // A lone write is committed on its core: writes in flight together reach the
                // committer's thread.
                let writes: Vec<_> = (0..16)
                    .map(|i| {
                        let (c, url) = (c.clone(), s.url(""));
                        tokio::spawn(async move {
                            set_key(&c, H2, &url, &format!("after{i}"), "v").await
                        })
                    })
                    .collect();
                for w in writes {
                    let _ = w.await;
                }
            }
            "checkpointer" => {
                // Checkpoints are at least 200 ms apart; a new commit pokes again.
                tokio::time::sleep(Duration::from_millis(300)).await;
                drop(set_key(&c, H2, &s.url(""), "after", "v").await);
            }
            "metrics" => {
                let addr = s.metrics_addr.unwrap();
                let _ = std::net::TcpStream::connect(addr).and_then(|mut t| {
                    std::io::Write::write_all(&mut t, b"GET /metrics HTTP/1.1\r\n\r\n")
                });
            }
            _ => {}
        }
        let status = tokio::task::block_in_place(|| s.wait_exit(Duration::from_secs(10)));
        assert_eq!(status.signal(), Some(libc::SIGABRT), "{place}: {status:?}");
        let log = s.log_text();
        assert!(
            log.contains(&format!("thread '{thread}")) && log.contains("aborting the process"),
            "{place}: {log}"
        );
    }
}

/// A tmpfs of `size` mounted at a new folder, unmounted when dropped.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let dir = tempfile::tempdir().unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot mount a tmpfs (this test needs root)");
        Tmpfs { dir }
    }

    fn resize(&self, size: &str) {
        let ok = std::process::Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(self.dir.path())
            .status()
            .unwrap()
            .success();
        assert!(ok, "cannot resize the tmpfs");
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

/// CPU time (user + system) of process `pid` so far.
fn cpu_time(pid: i32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

async fn set_expiring(c: &Client, s: &Server, k: &str, in_ms: i64) {
    use denokv::proto as pb;
    use prost::Message;
    let mut m = set_bytes(&key(k), b"soon gone");
    m.expire_at_ms = denokv::kv::now_ms() + in_ms;
    let w = pb::AtomicWrite {
        mutations: vec![m],
        ..Default::default()
    };
    let r = c.data(H2, s, "atomic_write", w.encode_to_vec()).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

/// Eight writers at once (their writes share commit batches) set `value` under new keys, each
/// until it is refused with the full-disk 507; returns the acknowledged keys.
async fn fill_until_full(s: &Server, value: &str) -> Vec<String> {
    let mut writers = Vec::new();
    for w in 0..8 {
        let (url, value) = (s.url(""), value.to_string());
        writers.push(tokio::spawn(async move {
            let c = Client::new();
            let mut acknowledged = Vec::new();
            for i in 0..1000 {
                let k = format!("fill{w}-{i}");
                let r = set_key(&c, H2, &url, &k, &value).await.unwrap();
                match r.status {
                    200 => acknowledged.push(k),
                    507 => return (acknowledged, r.text()),
                    other => panic!("write {k}: {other} {}", r.text()),
                }
            }
            panic!("writer {w}: the 3 MiB disk never filled up");
        }));
    }
    let mut acknowledged = Vec::new();
    for w in writers {
        let (acked, full) = w.await.unwrap();
        assert_eq!(
            full,
            "The server's disk is full: the write was not committed. Try again later."
        );
        acknowledged.extend(acked);
    }
    assert!(acknowledged.len() > 10, "{}", acknowledged.len());
    acknowledged
}

/// Space has returned: the same write, retried as Deno retries a 5xx (each refusal a 507),
/// goes through within 10 s.
async fn retry_until_accepted(c: &Client, s: &Server, k: &str, value: &str) {
    let start = Instant::now();
    loop {
        let r = set_key(c, H2, &s.url(""), k, value).await.unwrap();
        if r.status == 200 {
            break;
        }
        assert_eq!(r.status, 507, "{}", r.text());
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "writes did not resume"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_refuses_writes_cleanly_keeps_reads_and_recovers_by_itself() {
    let fs = Tmpfs::mount("3m");
    let db: PathBuf = fs.path().join("db.sqlite");
    let mut s = Launch::new(&db).start();
    let c = Client::new();
    // Rows that expire while the disk is full: the sweep that deletes them must fail quietly.
    for i in 0..20 {
        set_expiring(&c, &s, &format!("expiring{i}"), 1500).await;
    }
    let value = "x".repeat(30_000);
    let acknowledged = fill_until_full(&s, &value).await;

    // Reads keep working.
    assert_eq!(
        get_key(&c, H2, &s.url(""), &acknowledged[0])
            .await
            .as_deref(),
        Some(value.as_bytes())
    );
    // The expiry sweep fails while the disk is full, without spinning.
    let cpu = cpu_time(s.pid());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let spent = cpu_time(s.pid()) - cpu;
    assert!(
        spent < Duration::from_millis(500),
        "{spent:?} of CPU in 3 s idle"
    );
    let sweeps = s.log_text().matches("expiry sweep").count();
    assert!(
        (1..=4).contains(&sweeps),
        "{sweeps} sweep failures logged:\n{}",
        s.log_text()
    );
    assert!(
        get_key(&c, H2, &s.url(""), "expiring0").await.is_none(),
        "expired rows are hidden"
    );

    // Space returns: the same write, retried as Deno retries a 5xx, goes through.
    fs.resize("64m");
    retry_until_accepted(&c, &s, "after", &value).await;
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let conn = rusqlite::Connection::open(&db).unwrap();
    let check: String = conn
        .query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap();
    assert_eq!(check, "ok");
    let s = Launch::new(&db).start();
    for k in acknowledged.iter().chain(["after".to_string()].iter()) {
        assert!(get_key(&c, H2, &s.url(""), k).await.is_some(), "{k} lost");
    }
}

/// With the backup on, a full disk: the server keeps serving reads, refuses writes with 507,
/// stays up, and when space returns the backup catches up; the restored database holds every
/// acknowledged write. (Whether the backup's own deletes meet the full disk depends on the
/// WAL's free space; `backup::writer` unit tests pin that a full disk is waited out.)
#[tokio::test]
async fn a_full_disk_with_the_backup_on_keeps_the_server_up_and_the_backup_catches_up() {
    use common::moto::{Moto, S3_ENV};
    let moto = Moto::start("full");
    let fs = Tmpfs::mount("3m");
    let db: PathBuf = fs.path().join("db.sqlite");
    let mut launch = Launch::new(&db).args(&[
        "--backup-to-s3",
        "--s3-bucket",
        "full",
        "--s3-endpoint",
        &moto.endpoint(),
    ]);
    for (k, v) in S3_ENV {
        launch = launch.env(k, v);
    }
    let mut s = launch.start();
    let c = Client::new();
    let value = "x".repeat(30_000);
    let acknowledged = fill_until_full(&s, &value).await;
    // The backup meets the full disk too; the server stays up and serves reads.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(s.is_running(), "the server stopped:\n{}", s.log_text());
    assert!(get_key(&c, H2, &s.url(""), &acknowledged[0])
        .await
        .is_some());

    fs.resize("64m");
    retry_until_accepted(&c, &s, "after", &value).await;
    // Caught up: nothing pending (two readings of the gauges, 300 ms apart).
    let behind = |s: &Server| {
        let (_, _, text) = s.scrape();
        let get = |name: &str| -> f64 {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{name} ")))
                .unwrap()
                .parse()
                .unwrap()
        };
        get("denokv_backup_lag_versions") > 0.0 || get("denokv_backup_pending_commits") > 0.0
    };
    let start = Instant::now();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        if !behind(&s) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if !behind(&s) {
                break;
            }
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the backup did not catch up"
        );
    }
    let status = tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    assert!(status.success(), "{status:?}");
    let out = tempfile::tempdir().unwrap();
    let restored = out.path().join("restored.sqlite");
    let result = std::process::Command::new(binary())
        .args(["--sqlite-path", restored.to_str().unwrap(), "restore"])
        .args(["--s3-bucket", "full", "--s3-endpoint", &moto.endpoint()])
        .envs(S3_ENV)
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let conn = rusqlite::Connection::open(&restored).unwrap();
    for k in acknowledged.iter().chain(["after".to_string()].iter()) {
        let n: i64 = conn
            .query_row("SELECT count(*) FROM kv WHERE k = ?1", [&key(k)[..]], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(n, 1, "{k} is not in the backup");
    }
}
