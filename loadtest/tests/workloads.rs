//! Short loads (about a second each) against the real server on a temporary database: the
//! checks the load generator makes must pass against a correct server, and its numbers must
//! be there.

mod common;

use std::time::{Duration, Instant};

use common::{finish, loadtest, loadtest_command, serial, Server};
use serde_json::Value;

const SHORT: [&str; 4] = ["--duration", "1s", "--warmup", "200ms"];

fn args<'a>(head: &[&'a str]) -> Vec<&'a str> {
    let mut all = head.to_vec();
    all.extend(SHORT);
    all
}

fn n(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

#[test]
fn sum_totals_equal_the_acknowledged_sums() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("db.sqlite"));
    for proto in ["h1", "h2"] {
        let run = loadtest(
            &server,
            dir.path(),
            &args(&[
                "sum",
                "--proto",
                proto,
                "--concurrency",
                "8",
                "--hot-keys",
                "4",
            ]),
        );
        assert_eq!(run.code, 0, "{}", run.explain());
        let r = &run.json;
        assert!(n(&r["ops"]) > 0, "{}", run.explain());
        assert_eq!(n(&r["error_total"]), 0, "{}", run.explain());
        assert_eq!(r["checks"][0]["passed"], true, "{}", run.explain());
        assert!(run.stdout.contains("PASS sum counters"), "{}", run.stdout);
        for key in ["p50", "p90", "p99", "p999", "max"] {
            assert!(r["latency_ms"]["sum"][key].as_f64().unwrap() > 0.0);
        }
    }
    server.stop();
}

#[test]
fn cas_conflicts_are_counted_apart_from_errors() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("db.sqlite"));
    // Eight clients on one key: most checks race.
    let run = loadtest(
        &server,
        dir.path(),
        &args(&["cas", "--concurrency", "8", "--hot-keys", "1"]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    let r = &run.json;
    assert!(n(&r["ops"]) > 0, "{}", run.explain());
    assert!(n(&r["conflicts"]) > 0, "{}", run.explain());
    assert_eq!(n(&r["error_total"]), 0, "{}", run.explain());
    assert_eq!(
        r["checks"][0]["passed"],
        true,
        "the counter must equal the committed increments: {}",
        run.explain()
    );
    server.stop();
}

#[test]
fn watch_streams_deliver_every_acknowledged_write() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("db.sqlite"));
    for proto in ["h1", "h2"] {
        let run = loadtest(
            &server,
            dir.path(),
            &args(&[
                "watch",
                "--proto",
                proto,
                "--watchers",
                "4",
                "--hot-keys",
                "3",
                "--connections",
                "2",
            ]),
        );
        assert_eq!(run.code, 0, "{}", run.explain());
        let r = &run.json;
        let writes = n(&r["latency_ms"]["write"]["count"]);
        assert!(writes > 0, "{}", run.explain());
        assert_eq!(
            n(&r["latency_ms"]["notify"]["count"]),
            4 * writes,
            "{}",
            run.explain()
        );
        assert!(n(&r["counters"]["watch data frames"]) > 0);
        assert_eq!(n(&r["error_total"]), 0, "{}", run.explain());
        assert_eq!(r["checks"][0]["passed"], true, "{}", run.explain());
    }
    server.stop();
}

#[test]
fn reads_and_lists_find_the_preloaded_keys() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("db.sqlite"));
    let run = loadtest(
        &server,
        dir.path(),
        &args(&["read", "--preload", "--keys", "1200", "--proto", "h1"]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    assert_eq!(n(&run.json["preload"]["writes"]), 3, "500 keys a write");
    assert!(n(&run.json["ops"]) > 0);
    assert!(
        run.json["counters"]["read misses"].is_null(),
        "{}",
        run.explain()
    );

    let run = loadtest(
        &server,
        dir.path(),
        &args(&["list", "--keys", "1200", "--list-size", "50"]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    assert!(n(&run.json["ops"]) > 0);
    assert!(
        run.json["counters"]["short lists"].is_null(),
        "{}",
        run.explain()
    );

    let run = loadtest(
        &server,
        dir.path(),
        &args(&["mixed", "--keys", "1200", "--read-pct", "50"]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    for kind in ["read", "write", "all"] {
        assert!(n(&run.json["latency_ms"][kind]["count"]) > 0, "{kind}");
    }
    server.stop();
}

#[test]
fn bad_options_and_refused_tokens_exit_2() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::start(&dir.path().join("db.sqlite"));
    // Values above the server's 65536-byte limit are refused before anything is sent.
    let (mut cmd, _) = loadtest_command(&server, dir.path(), &["write"]);
    let out = cmd
        .args(SHORT)
        .args(["--value-size", "70000"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    let out = std::process::Command::new(common::loadtest_binary())
        .args([
            "read",
            "--url",
            &server.url,
            "--token",
            "not-the-token-at-all",
        ])
        .args(SHORT)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("HTTP 401: Invalid access token."),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    server.stop();
}

#[test]
fn acknowledged_writes_survive_a_restart() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let acks = dir.path().join("acks.log");
    let acks_arg = acks.to_str().unwrap();
    let mut server = Server::start(&db);
    let run = loadtest(
        &server,
        dir.path(),
        &args(&[
            "write",
            "--preload",
            "--keys",
            "700",
            "--ack-log",
            acks_arg,
            "--proto",
            "h1",
        ]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    server.stop();

    let mut server = Server::start(&db);
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 0, "{}", run.explain());
    assert_eq!(n(&run.json["keys"]), 700, "{}", run.explain());
    assert_eq!(n(&run.json["intact"]), 700, "{}", run.explain());

    // A write the server never saw must be reported, with its key.
    let mut log = std::fs::read_to_string(&acks).unwrap();
    let key = denokv::kv::key::encode(&[
        denokv::kv::key::KeyPart::String("denokv-loadtest".into()),
        denokv::kv::key::KeyPart::String("kv".into()),
        denokv::kv::key::KeyPart::Int(99_999),
    ]);
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    log.push_str(&format!(
        "{hex} 00000000000000010000 0000000000000001 100\n"
    ));
    std::fs::write(&acks, log).unwrap();
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 1, "{}", run.explain());
    assert_eq!(n(&run.json["missing"]), 1, "{}", run.explain());
    assert!(
        run.stdout
            .contains("missing: [\"denokv-loadtest\", \"kv\", 99999n]"),
        "{}",
        run.stdout
    );
    server.stop();
}

#[test]
fn acknowledged_writes_survive_a_crash() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let acks = dir.path().join("acks.log");
    let acks_arg = acks.to_str().unwrap();
    let mut server = Server::start(&db);
    let (mut cmd, json) = loadtest_command(
        &server,
        dir.path(),
        &[
            "write",
            "--duration",
            "3s",
            "--warmup",
            "0s",
            "--keys",
            "300",
            "--concurrency",
            "8",
            "--ack-log",
            acks_arg,
        ],
    );
    let writer = cmd.spawn().unwrap();
    // Crash the server once acknowledged writes are on record: the log's first 64 KiB buffer
    // reaches the file after several hundred acknowledgements.
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::fs::metadata(&acks).map_or(0, |m| m.len()) == 0 {
        assert!(Instant::now() < deadline, "no write was acknowledged");
        std::thread::sleep(Duration::from_millis(20));
    }
    server.kill();
    let run = finish(writer.wait_with_output().unwrap(), &json);
    assert!(n(&run.json["ops"]) > 0, "{}", run.explain());
    let transport_errors: u64 = run.json["errors"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| k.starts_with("transport:"))
                .map(|(_, v)| n(v))
                .sum()
        })
        .unwrap_or(0);
    assert!(
        transport_errors > 0,
        "the server died mid-run: {}",
        run.explain()
    );

    let mut server = Server::start(&db);
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 0, "{}", run.explain());
    assert!(n(&run.json["keys"]) > 0, "{}", run.explain());
    server.stop();
}

#[test]
fn crash_mix_logs_sums_and_enqueues_that_verify_checks() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("db.sqlite");
    let acks = dir.path().join("acks.log");
    let acks_arg = acks.to_str().unwrap();
    let mut server = Server::start(&db);
    let run = loadtest(
        &server,
        dir.path(),
        &args(&[
            "crash-mix",
            "--hot-keys",
            "3",
            "--ack-log",
            acks_arg,
            "--stop-when-down",
        ]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    for kind in ["write", "sum", "vs-enqueue"] {
        assert!(
            n(&run.json["latency_ms"][kind]["count"]) > 0,
            "{kind}: {}",
            run.explain()
        );
    }
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 0, "{}", run.explain());
    let r = &run.json;
    assert_eq!(n(&r["counters"]), 3, "{}", run.explain());
    assert_eq!(n(&r["counters_ok"]), 3, "{}", run.explain());
    assert_eq!(n(&r["sum_acked"]), n(&r["sum_stored"]), "{}", run.explain());
    assert!(n(&r["enqueue_records"]) > 0, "{}", run.explain());
    let enqueued: i64 = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("SELECT count(*) FROM queue", [], |row| row.get(0))
        .unwrap();
    assert_eq!(enqueued as u64, n(&r["enqueue_records"]));

    // An acknowledged sum the counter does not hold is a lost write; a counter above its
    // acknowledged and uncertain sums took a write twice.
    let log = std::fs::read_to_string(&acks).unwrap();
    let line = log.lines().find(|l| l.starts_with("sum ")).unwrap();
    let fields: Vec<&str> = line.split(' ').collect();
    let extra = format!("sum {} 1000 {}\n", fields[1], fields[3]);
    std::fs::write(&acks, format!("{log}{extra}")).unwrap();
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 1, "{}", run.explain());
    assert_eq!(n(&run.json["counters_short"]), 1, "{}", run.explain());
    let without = log.replacen(&format!("{line}\n"), "", 1);
    std::fs::write(&acks, without).unwrap();
    let run = loadtest(&server, dir.path(), &["verify", "--ack-log", acks_arg]);
    assert_eq!(run.code, 1, "{}", run.explain());
    assert_eq!(n(&run.json["counters_excess"]), 1, "{}", run.explain());
    assert!(run.stdout.contains("a sum applied twice"), "{}", run.stdout);
    server.stop();
}

/// The (key, value, encoding) rows of a database file, in key order.
fn kv_rows(db: &std::path::Path) -> Vec<(Vec<u8>, Vec<u8>, i64)> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT k, v, v_encoding FROM kv ORDER BY k")
        .unwrap();
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap();
    rows.map(Result::unwrap).collect()
}

#[test]
fn gen_db_writes_what_a_preload_writes_and_the_server_reports_its_costs() {
    let _one = serial();
    let dir = tempfile::tempdir().unwrap();
    let generated = dir.path().join("generated.sqlite");
    let out = std::process::Command::new(common::loadtest_binary())
        .args(["gen-db", "--keys", "1200", "--path"])
        .arg(&generated)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut server = Server::start(&generated);
    let pid = server.pid().to_string();
    let run = loadtest(
        &server,
        dir.path(),
        &args(&["read", "--keys", "1200", "--server-pid", &pid]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    assert!(
        run.json["counters"]["read misses"].is_null(),
        "{}",
        run.explain()
    );
    assert!(run.json["server"]["cpu_seconds"].as_f64().unwrap() > 0.0);
    assert!(run.json["server_cpu_ms_per_1k_ops"].as_f64().unwrap() > 0.0);
    assert!(run.json["server"]["rss_mib_end"].as_f64().unwrap() > 1.0);

    for proto in ["h1", "h2"] {
        let run = loadtest(
            &server,
            dir.path(),
            &[
                "idle",
                "--proto",
                proto,
                "--concurrency",
                "40",
                "--duration",
                "200ms",
                "--server-pid",
                &pid,
            ],
        );
        assert_eq!(run.code, 0, "{}", run.explain());
        assert_eq!(n(&run.json["opened"]), 40, "{}", run.explain());
        assert_eq!(n(&run.json["alive_after_hold"]), 40, "{}", run.explain());
        assert!(
            run.json["server_rss_mib_with_connections"]
                .as_f64()
                .unwrap()
                > 1.0
        );
    }
    server.stop();

    let preloaded = dir.path().join("preloaded.sqlite");
    let mut server = Server::start(&preloaded);
    let run = loadtest(
        &server,
        dir.path(),
        &args(&["read", "--preload", "--keys", "1200"]),
    );
    assert_eq!(run.code, 0, "{}", run.explain());
    server.stop();
    let (a, b) = (kv_rows(&generated), kv_rows(&preloaded));
    assert_eq!(a.len(), 1200);
    assert!(a == b, "gen-db and --preload wrote different rows");
}
