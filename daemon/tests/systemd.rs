//! Running under systemd: sd_notify (READY, STATUS, RELOADING, STOPPING), the watchdog, socket
//! activation, SIGHUP reloads of the access tokens and the log level, systemd credentials, and
//! journald log lines. systemd itself is played by the tests: a notify socket they bind, and
//! `systemd-socket-activate` (Debian package `systemd`) for socket activation.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::notify::NotifySocket;
use common::*;
use denokv::proto as pb;
use nix::sys::signal::Signal;
use prost::Message;

fn pings(msgs: &[(Instant, String)]) -> usize {
    msgs.iter().filter(|(_, m)| m == "WATCHDOG=1").count()
}

fn snapshot_read_body() -> Vec<u8> {
    pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: Bytes::from_static(&[0x02]),
            end: Bytes::from_static(&[0x03]),
            limit: 10,
            reverse: false,
        }],
    }
    .encode_to_vec()
}

/// A snapshot read with `token`: the status code.
async fn read_with(c: &Client, p: Proto, s: &Server, token: &str) -> u16 {
    let auth = format!("Bearer {token}");
    c.request(
        p,
        "POST",
        &s.url("/v2/snapshot_read"),
        &[
            ("authorization", &auth),
            ("x-denokv-version", "3"),
            ("x-denokv-database-id", NIL_ID),
        ],
        snapshot_read_body(),
    )
    .await
    .status
}

fn set_body(key: &str, value: &str) -> Vec<u8> {
    let mut k = vec![0x02];
    k.extend_from_slice(key.as_bytes());
    k.push(0);
    pb::AtomicWrite {
        mutations: vec![pb::Mutation {
            key: Bytes::from(k),
            value: Some(pb::KvValue {
                data: Bytes::copy_from_slice(value.as_bytes()),
                encoding: pb::ValueEncoding::VeBytes as i32,
            }),
            mutation_type: pb::MutationType::MSet as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
    .encode_to_vec()
}

async fn stop(mut s: Server) -> Server {
    let status = tokio::task::spawn_blocking(move || {
        let status = s.stop();
        (s, status)
    })
    .await
    .unwrap();
    assert!(
        status.1.success(),
        "{:?}\n{}",
        status.1,
        status.0.log_text()
    );
    status.0
}

#[tokio::test]
async fn notifies_ready_status_reloading_and_stopping() {
    for abstract_name in [true, false] {
        let notify = NotifySocket::bind(abstract_name);
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("db.sqlite");
        let s = Launch::new(&db)
            .args(&["--threads", "2"])
            .env("NOTIFY_SOCKET", &notify.name)
            .start();
        let limit = Duration::from_secs(10);
        assert_eq!(
            notify.next_state(limit),
            format!("STATUS=Opening database {}", db.display())
        );
        let ready = notify.next_state(limit);
        let expected = format!(
            "READY=1\nSTATUS=Serving {} on {} (2 cores, ",
            db.display(),
            s.addr
        );
        assert!(ready.starts_with(&expected), "{ready}");
        assert!(ready.ends_with(", sync mode full)"), "{ready}");
        // Ready means served: the first request right after READY=1 is answered.
        let c = Client::new();
        assert_eq!(read_with(&c, Proto::H2, &s, TOKEN).await, 200);

        s.signal(Signal::SIGHUP);
        let reloading = notify.next_state(limit);
        let lines: Vec<&str> = reloading.lines().collect();
        assert_eq!(lines[0], "RELOADING=1", "{reloading}");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).unwrap();
        let now = now.tv_sec() as u64 * 1_000_000 + now.tv_nsec() as u64 / 1000;
        assert!(usec <= now && now - usec < 10_000_000, "{usec} vs {now}");
        assert!(lines[2].starts_with("STATUS=Reloading"), "{reloading}");
        assert_eq!(
            notify.next_state(limit),
            ready,
            "ready again after the reload"
        );
        s.wait_for_log("reloaded on SIGHUP", limit);

        drop(c);
        let s = stop(s).await;
        assert_eq!(
            notify.next_state(limit),
            "STOPPING=1\nSTATUS=Draining: finishing open requests (up to 10 s) and committing \
             queued writes"
        );
        assert!(s.log_text().contains("stopped"));
    }
}

#[tokio::test]
async fn read_only_status_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let first = Server::start_on(&db, &[]);
    stop(first).await;
    let notify = NotifySocket::bind(false);
    let s = Launch::new(&db)
        .args(&["--read-only", "--threads", "1"])
        .env("NOTIFY_SOCKET", &notify.name)
        .start();
    notify.next_state(Duration::from_secs(10));
    let ready = notify.next_state(Duration::from_secs(10));
    assert!(ready.contains(" read-only on "), "{ready}");
    assert!(ready.ends_with("no writes)"), "{ready}");
    stop(s).await;
}

#[tokio::test]
async fn watchdog_pings_only_for_its_own_pid() {
    let notify = NotifySocket::bind(false);
    let s = Launch::new(&tempfile::tempdir().unwrap().path().join("db.sqlite"))
        .env("NOTIFY_SOCKET", &notify.name)
        .env("WATCHDOG_USEC", "200000")
        .env("WATCHDOG_PID", "1")
        .start();
    let mut msgs = notify.collect_until(Duration::from_secs(10), |m| {
        m.iter().any(|(_, m)| m.starts_with("READY=1"))
    });
    // Five ping intervals after READY=1.
    msgs.extend(notify.collect(Duration::from_secs(1)));
    assert_eq!(pings(&msgs), 0, "WATCHDOG_PID names another process");
    assert!(!s.log_text().contains("watchdog on"));
    stop(s).await;
}

/// The watchdog is fed only while the committer and every core check in: a hung committer
/// (SIGUSR1 makes a debug build hang it on purpose) stops the pings, so systemd would restart
/// the service.
#[cfg(debug_assertions)]
#[tokio::test]
async fn watchdog_pings_stop_when_the_committer_hangs() {
    let notify = NotifySocket::bind(false);
    let dir = tempfile::tempdir().unwrap();
    let mut s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--threads", "2"])
        .env("NOTIFY_SOCKET", &notify.name)
        .env("WATCHDOG_USEC", "400000")
        .start();
    // Pings every 200 ms; a loaded test machine may delay some: wait for 5, however long.
    let healthy = notify.collect_until(Duration::from_secs(20), |m| pings(m) >= 5);
    assert!(
        healthy.iter().any(|(_, m)| m.starts_with("READY=1")),
        "{healthy:?}"
    );
    assert!(s.log_text().contains("systemd watchdog on"));
    // A write still works: the committer is alive.
    let c = Client::new();
    assert_eq!(
        c.data(Proto::H1, &s, "atomic_write", set_body("k", "v"))
            .await
            .status,
        200
    );

    s.signal(Signal::SIGUSR1);
    s.wait_for_log("committer hangs on purpose now", Duration::from_secs(5));
    // Pings already on their way, or sent before the committer's heartbeat is old enough to
    // count as stale (half the interval), may arrive for a while, later on a loaded machine:
    // 1 s of grace, then 2 s in which a live watchdog would ping about 10 times.
    let hung_at = Instant::now();
    let after = notify.collect(Duration::from_millis(3000));
    let late: Vec<_> = after
        .iter()
        .filter(|(t, m)| {
            m == "WATCHDOG=1" && t.duration_since(hung_at) > Duration::from_millis(1000)
        })
        .collect();
    assert!(
        late.is_empty(),
        "pings went on after the committer hung: {after:?}"
    );
    assert!(
        after
            .iter()
            .any(|(_, m)| m.starts_with("STATUS=Unhealthy: committer")),
        "{after:?}"
    );
    s.wait_for_log("watchdog: committer (silent for", Duration::from_secs(1));
    // Reads are still served (the cores are fine); only the committer is stuck.
    assert_eq!(read_with(&c, Proto::H2, &s, TOKEN).await, 200);
    drop(c);
    s.kill();
}

#[tokio::test]
async fn socket_activation_serves_the_passed_socket_on_every_core() {
    assert!(
        std::process::Command::new("systemd-socket-activate")
            .arg("--version")
            .output()
            .is_ok(),
        "systemd-socket-activate is needed for this test (apt-get install systemd)"
    );
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let listen = addr.to_string();
    let dir = tempfile::tempdir().unwrap();
    let notify = NotifySocket::bind(false);
    let s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--threads", "2"])
        .env("NOTIFY_SOCKET", &notify.name)
        .wrapper(
            &[
                "systemd-socket-activate",
                "-l",
                &listen,
                "--fdname=denokv",
                "-E",
                "RUST_LOG",
                "-E",
                "NOTIFY_SOCKET",
            ],
            false,
        )
        .kick(addr)
        .start();
    assert_eq!(s.addr, addr, "the log names the inherited socket");
    let log = s.log_text();
    assert!(
        log.contains(
            "Serving 1 socket(s) passed by systemd (socket activation); --addr is not used"
        ),
        "{log}"
    );
    notify.next_state(Duration::from_secs(10));
    let ready = notify.next_state(Duration::from_secs(10));
    assert!(ready.contains(&format!(" on {addr} (2 cores")), "{ready}");

    // Many connections over both protocols: whichever core takes each, all are answered.
    for round in 0..8 {
        let c = Client::new();
        for p in BOTH {
            let key = format!("{p:?}-{round}");
            let w = c.data(p, &s, "atomic_write", set_body(&key, "v")).await;
            assert_eq!(w.status, 200, "{}", w.text());
            assert_eq!(read_with(&c, p, &s, TOKEN).await, 200);
        }
    }
    stop(s).await;
}

#[test]
fn a_passed_socket_that_is_not_tcp_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("unix.sock");
    let db = dir.path().join("db.sqlite");
    let mut child = std::process::Command::new("systemd-socket-activate")
        .args(["-l", sock.to_str().unwrap(), binary(), "--sqlite-path"])
        .arg(&db)
        .args(["serve", "--access-token", TOKEN])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate (apt-get install systemd)");
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = wait_timeout(&mut child, Duration::from_secs(10));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains("Error: the socket 0 passed by systemd is not a TCP socket"),
        "{err}"
    );
}

fn write_private(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
}

#[tokio::test]
async fn sighup_rereads_the_token_file_and_the_log_level() {
    const OLD: &str = "old-token-0123456789";
    const NEW: &str = "new-token-9876543210";
    const SECOND: &str = "second-token-abcdefg";
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    let level = dir.path().join("log-level");
    write_private(&tokens, &format!("{OLD}\n"));
    write_private(&level, "info\n");
    let s = Launch::bare(&dir.path().join("db.sqlite"))
        .args(&[
            "--addr",
            "127.0.0.1:0",
            "--access-token-file",
            tokens.to_str().unwrap(),
            "--log-level-file",
            level.to_str().unwrap(),
        ])
        .start();
    let c = Client::new();
    for p in BOTH {
        assert_eq!(read_with(&c, p, &s, OLD).await, 200);
        assert_eq!(read_with(&c, p, &s, NEW).await, 401);
    }
    assert!(s.log_text().contains(&format!(
        "Access tokens: 1 from {} (re-read on SIGHUP)",
        tokens.display()
    )));

    // A new set of two tokens, and debug logs.
    write_private(&tokens, &format!("\n{NEW}\n  {SECOND}  \n"));
    write_private(&level, "debug\n");
    s.signal(Signal::SIGHUP);
    let line = s.wait_for_log("reloaded on SIGHUP", Duration::from_secs(10));
    assert!(
        line.contains(&format!(
            "reloaded on SIGHUP: 2 access token(s) from {}; log level \"debug\" from {}",
            tokens.display(),
            level.display()
        )),
        "{line}"
    );
    for p in BOTH {
        assert_eq!(
            read_with(&c, p, &s, OLD).await,
            401,
            "the old token is gone"
        );
        assert_eq!(read_with(&c, p, &s, NEW).await, 200);
        assert_eq!(read_with(&c, p, &s, SECOND).await, 200);
    }

    // A broken file changes nothing, and says why without quoting a token.
    write_private(&tokens, "short\n");
    s.signal(Signal::SIGHUP);
    let error = s.wait_for_log("reload: access tokens unchanged", Duration::from_secs(10));
    assert!(
        error.contains("line 1: Access token must be at minimum 12"),
        "{error}"
    );
    for p in BOTH {
        assert_eq!(read_with(&c, p, &s, NEW).await, 200);
    }

    drop(c);
    let s = stop(s).await;
    let log = s.log_text();
    assert!(
        log.contains("committer stopped with an empty queue"),
        "debug lines show after the reload:\n{log}"
    );
    for secret in [OLD, NEW, SECOND, "short"] {
        assert!(!log.contains(secret), "the log shows a token:\n{log}");
    }
}

#[tokio::test]
async fn a_token_given_on_the_command_line_is_kept_on_reload() {
    let s = Server::start(&["--threads", "1"]);
    s.signal(Signal::SIGHUP);
    let line = s.wait_for_log("reloaded on SIGHUP", Duration::from_secs(10));
    assert!(
        line.contains("access token unchanged (given on the command line or DENO_KV_ACCESS_TOKEN"),
        "{line}"
    );
    assert!(!s.log_text().contains(TOKEN));
    let c = Client::new();
    assert_eq!(read_with(&c, Proto::H1, &s, TOKEN).await, 200);
    drop(c);
    stop(s).await;
}

#[tokio::test]
async fn systemd_credentials_supply_the_token_and_the_log_level() {
    let creds = tempfile::tempdir().unwrap();
    write_private(
        &creds.path().join("access-token"),
        "credential-token-1\ncredential-token-2\n",
    );
    write_private(&creds.path().join("log-level"), "debug\n");
    let dir = tempfile::tempdir().unwrap();
    let s = Launch::bare(&dir.path().join("db.sqlite"))
        .args(&["--addr", "127.0.0.1:0", "--threads", "1"])
        .env("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())
        .start();
    assert!(s.log_text().contains(&format!(
        "Access tokens: 2 from {}",
        creds.path().join("access-token").display()
    )));
    assert!(
        s.log_text().contains("DEBUG"),
        "the credential log-level is debug"
    );
    let c = Client::new();
    assert_eq!(
        read_with(&c, Proto::H2, &s, "credential-token-2").await,
        200
    );
    assert_eq!(read_with(&c, Proto::H2, &s, TOKEN).await, 401);
    drop(c);
    stop(s).await;

    // A token given on the command line wins over the credential.
    let s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--threads", "1"])
        .env("CREDENTIALS_DIRECTORY", creds.path().to_str().unwrap())
        .start();
    let c = Client::new();
    assert_eq!(read_with(&c, Proto::H1, &s, TOKEN).await, 200);
    assert_eq!(
        read_with(&c, Proto::H1, &s, "credential-token-1").await,
        401
    );
    drop(c);
    stop(s).await;
}

#[test]
fn token_flags_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let db = db.to_str().unwrap();
    let file = dir.path().join("tokens");
    write_private(&file, "file-token-0123456\n");
    let (status, err) = run_binary(
        &[
            "--sqlite-path",
            db,
            "serve",
            "--access-token",
            TOKEN,
            "--access-token-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("cannot be used with"), "{err}");

    let (status, err) = run_binary(&["--sqlite-path", db, "serve"], &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("--access-token-file"), "{err}");

    let missing = dir.path().join("missing");
    let (status, err) = run_binary(
        &[
            "--sqlite-path",
            db,
            "serve",
            "--access-token-file",
            missing.to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(
        err.contains(&format!(
            "Error: cannot read access tokens from {}",
            missing.display()
        )),
        "{err}"
    );
}

/// Under journald (`JOURNAL_STREAM` names our stderr) lines carry syslog priorities and no
/// timestamps; on any other stderr they look as usual.
#[test]
fn journald_lines_carry_syslog_priorities() {
    use std::os::unix::fs::MetadataExt;
    for journald in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let level = dir.path().join("log-level");
        write_private(&level, "denokv=loud\n"); // invalid: a warning
        let (read, write) = nix::unistd::pipe().unwrap();
        let write = std::fs::File::from(write);
        let meta = write.metadata().unwrap();
        let stream = if journald {
            format!("{}:{}", meta.dev(), meta.ino())
        } else {
            format!("{}:{}", meta.dev(), meta.ino() + 1)
        };
        let mut cmd = std::process::Command::new(binary());
        cmd.args(["--sqlite-path"])
            .arg(dir.path().join("db.sqlite"))
            .args([
                "serve",
                "--access-token",
                TOKEN,
                "--addr",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--log-level-file",
            ])
            .arg(&level)
            .env("JOURNAL_STREAM", &stream)
            .env("RUST_LOG", "info")
            .stderr(write);
        let mut child = cmd.spawn().unwrap();
        drop(cmd);
        let mut lines = BufReader::new(std::fs::File::from(read)).lines();
        let mut seen = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            seen.push(line.clone());
            if line.contains("Listening on http://") {
                break;
            }
        }
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            Signal::SIGTERM,
        )
        .unwrap();
        seen.extend(lines.map(|l| l.unwrap()));
        assert!(wait_timeout(&mut child, Duration::from_secs(10)).success());
        let warning = seen
            .iter()
            .find(|l| l.contains("is not a log filter"))
            .unwrap_or_else(|| panic!("{seen:?}"));
        let listening = seen
            .iter()
            .find(|l| l.contains("Listening on http://"))
            .unwrap();
        if journald {
            assert!(warning.starts_with("<4>denokv::telemetry: "), "{warning}");
            assert!(
                listening.starts_with("<6>denokv::runtime: Listening on http://"),
                "{listening}"
            );
            assert!(
                seen.iter().all(|l| l.starts_with('<')),
                "every line has a priority: {seen:?}"
            );
        } else {
            assert!(!listening.starts_with('<'), "{listening}");
            // The usual format starts with a timestamp: 2025-01-01T00:00:00.000000Z
            assert!(
                listening.as_bytes()[..4].iter().all(u8::is_ascii_digit),
                "{listening}"
            );
        }
    }
}

#[tokio::test]
async fn a_metrics_address_in_use_is_loud_in_the_log_and_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let notify = NotifySocket::bind(false);
    let s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&["--metrics-addr", &addr])
        .env("NOTIFY_SOCKET", &notify.name)
        .start();
    notify.next_state(Duration::from_secs(10));
    let ready = notify.next_state(Duration::from_secs(10));
    assert!(
        ready.contains(&format!("NO METRICS: cannot listen on {addr}")),
        "{ready}"
    );
    let line = s.wait_for_log("METRICS ARE NOT SERVED", Duration::from_secs(5));
    assert!(line.contains("--metrics-addr"), "{line}");
    // The database is served all the same.
    assert_eq!(read_with(&Client::new(), Proto::H2, &s, TOKEN).await, 200);
    stop(s).await;
}

#[tokio::test]
async fn a_backup_that_cannot_reach_s3_says_so_in_the_status() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: every S3 request fails at once.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let notify = NotifySocket::bind(false);
    let s = Launch::new(&dir.path().join("db.sqlite"))
        .args(&[
            "--backup-to-s3",
            "--s3-bucket",
            "b",
            "--s3-endpoint",
            &endpoint,
        ])
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_REGION", "us-east-1")
        .env("NOTIFY_SOCKET", &notify.name)
        .start();
    let states = notify.collect_until(Duration::from_secs(20), |m| {
        m.last()
            .is_some_and(|(_, msg)| msg.contains("BACKUP BEHIND"))
    });
    let last = &states.last().expect("notifications").1;
    assert!(
        last.starts_with("STATUS=Serving ")
            && last.contains("; BACKUP BEHIND: cannot list the backup location"),
        "{states:?}"
    );
    // Writes are served all the same.
    assert_eq!(read_with(&Client::new(), Proto::H2, &s, TOKEN).await, 200);
    stop(s).await;
}
