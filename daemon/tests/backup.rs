//! The S3 backup against a real S3-compatible server on loopback (moto, `tests/s3/setup.sh`):
//! a primary under a write load ships every commit; `restore` rebuilds the database at
//! several points and every row (key, value, encoding, versionstamp, expiry) is compared with
//! what the primary had; a SIGKILL while shipping leaves no gap and no duplicate in the logs;
//! an S3 outage delays the backup, not the writes; commits made by another process while the
//! server was stopped are not missed.

mod common;

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::moto::{Moto, Proxy, S3_ENV};
use common::*;
use denokv::backup_proto::{BackupKvMutationKind, BackupMutationRange};
use denokv::proto as pb;
use prost::Message;
use rand::{Rng, SeedableRng};

const BUCKET: &str = "backups";

/// A row of `kv`: key, value, encoding, version, seq, expiry.
type Row = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

fn rows(db: &Path) -> (u64, Vec<Row>) {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let version: i64 = conn
        .query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    let mut stmt = conn
        .prepare("SELECT k, v, v_encoding, version, seq, expiration_ms FROM kv ORDER BY k")
        .unwrap();
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
                r.get(5)?,
            ))
        })
        .unwrap()
        .collect::<Result<Vec<Row>, _>>()
        .unwrap();
    (version as u64, rows)
}

fn primary(db: &Path, moto_endpoint: &str, prefix: &str, extra: &[&str]) -> Server {
    let mut launch = Launch::new(db).args(&[
        "--backup-to-s3",
        "--s3-bucket",
        BUCKET,
        "--s3-prefix",
        prefix,
        "--s3-endpoint",
        moto_endpoint,
    ]);
    launch = launch.args(extra);
    for (k, v) in S3_ENV {
        launch = launch.env(k, v);
    }
    launch.start()
}

/// `denokv restore`: its exit status and output.
fn restore(out: &Path, endpoint: &str, prefix: &str, versionstamp: Option<u64>) -> (bool, String) {
    let mut args = vec![
        "--sqlite-path".to_string(),
        out.display().to_string(),
        "restore".into(),
        "--s3-bucket".into(),
        BUCKET.into(),
        "--s3-prefix".into(),
        prefix.into(),
        "--s3-endpoint".into(),
        endpoint.into(),
    ];
    if let Some(v) = versionstamp {
        args.push("--versionstamp".into());
        args.push(format!("{v:016x}0000"));
    }
    let out = std::process::Command::new(binary())
        .args(&args)
        .envs(S3_ENV)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn restored_equals(
    moto: &Moto,
    prefix: &str,
    dir: &Path,
    name: &str,
    want: &(u64, Vec<Row>),
    at: Option<u64>,
) {
    let out = dir.join(name);
    let (ok, text) = restore(&out, &moto.endpoint(), prefix, at);
    assert!(ok, "restore failed: {text}");
    assert!(
        text.contains(&format!("Restored to versionstamp {:016x}0000", want.0)),
        "{text}"
    );
    let got = rows(&out);
    assert_eq!(got.0, want.0, "restored version");
    assert_eq!(
        got.1.len(),
        want.1.len(),
        "restored key count at version {}",
        want.0
    );
    assert!(
        got.1 == want.1,
        "restored rows differ at version {}",
        want.0
    );
}

/// One random atomic write: 1 to 3 of set (some with an expiry an hour away), delete, sum on
/// a few counters, set at a versionstamped key.
fn random_write(rng: &mut rand::rngs::StdRng, keys: u32) -> pb::AtomicWrite {
    let mut mutations = Vec::new();
    for _ in 0..rng.random_range(1..=3) {
        let k = key(&format!("k{}", rng.random_range(0..keys)));
        let m = match rng.random_range(0..10) {
            0..=3 => set_bytes(&k, &rng.random::<[u8; 8]>()),
            4 => {
                let mut m = set_bytes(&k, b"expiring");
                m.expire_at_ms = (std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_millis()
                    + 3_600_000) as i64;
                m
            }
            5 | 6 => pb::Mutation {
                key: k,
                mutation_type: pb::MutationType::MDelete as i32,
                ..Default::default()
            },
            7 | 8 => pb::Mutation {
                key: key(&format!("counter{}", rng.random_range(0..4))),
                value: Some(pb::KvValue {
                    data: Bytes::copy_from_slice(&rng.random_range(1u64..100).to_le_bytes()),
                    encoding: pb::ValueEncoding::VeLe64 as i32,
                }),
                mutation_type: pb::MutationType::MSum as i32,
                ..Default::default()
            },
            _ => pb::Mutation {
                key: key("vs"),
                value: Some(pb::KvValue {
                    data: Bytes::from_static(b"stamped"),
                    encoding: pb::ValueEncoding::VeBytes as i32,
                }),
                mutation_type: pb::MutationType::MSetSuffixVersionstampedKey as i32,
                ..Default::default()
            },
        };
        mutations.push(m);
    }
    pb::AtomicWrite {
        mutations,
        ..Default::default()
    }
}

/// Writes from `clients` concurrent clients until `stop`; returns the acknowledged commit
/// versions. Transport errors (a killed server) end a client.
async fn load(url: String, clients: usize, stop: Arc<AtomicBool>, seed: u64) -> Vec<u64> {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (url, stop) = (url.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let client = Client::new();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed * 1000 + c as u64);
            let mut acked = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                let body = random_write(&mut rng, 300).encode_to_vec();
                let Some(reply) = client.try_data(Proto::H2, &url, "atomic_write", body).await
                else {
                    break;
                };
                assert_eq!(reply.status, 200, "{}", reply.text());
                let out = pb::AtomicWriteOutput::decode(reply.body.clone()).unwrap();
                assert_eq!(out.status, pb::AtomicWriteStatus::AwSuccess as i32);
                acked.push(u64::from_be_bytes(
                    out.versionstamp[..8].try_into().unwrap(),
                ));
            }
            acked
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

async fn load_for(url: &str, duration: Duration, seed: u64) -> Vec<u64> {
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(load(url.to_string(), 4, stop.clone(), seed));
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap()
}

fn metric(server: &Server, name: &str) -> f64 {
    let (_, _, text) = server.scrape();
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .unwrap_or_else(|| panic!("no {name} in the scrape"))
        .parse()
        .unwrap()
}

/// Waits until everything committed is in S3 (a snapshot taken, the lag gauges at zero).
fn wait_shipped(server: &Server, limit: Duration) {
    let start = Instant::now();
    let behind = || {
        metric(server, "denokv_backup_last_snapshot_timestamp_seconds") == 0.0
            || metric(server, "denokv_backup_lag_versions") > 0.0
            || metric(server, "denokv_backup_pending_commits") > 0.0
    };
    // The gauges are set by the backup thread every 50 ms: two readings 300 ms apart, both
    // caught up, so that a reading from before the last commits does not count.
    loop {
        std::thread::sleep(Duration::from_millis(300));
        if !behind() {
            std::thread::sleep(Duration::from_millis(300));
            if !behind() {
                return;
            }
        }
        assert!(
            start.elapsed() < limit,
            "the backup did not catch up in {limit:?}"
        );
    }
}

/// Every log object of `prefix`: its entries' versionstamps in listing order.
fn log_entries(moto: &Moto, prefix: &str) -> Vec<(Vec<u8>, i32)> {
    let mut out = Vec::new();
    for k in moto.keys(BUCKET, &format!("{prefix}logs/")) {
        let body = moto.get(BUCKET, &k).unwrap();
        let range = BackupMutationRange::decode(&body[..]).unwrap();
        let last = range.entries.last().expect("no empty log objects");
        assert_eq!(
            &last.versionstamp[10..],
            &[0xff, 0xff],
            "{k} ends at a boundary"
        );
        out.extend(
            range
                .entries
                .iter()
                .map(|e| (e.versionstamp.to_vec(), e.kind)),
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_restores_every_committed_write_at_several_points() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    // A new snapshot generation every 2 s: the points below fall in different generations.
    let server = primary(
        &db,
        &moto.endpoint(),
        "p/",
        &["--backup-snapshot-interval", "2s"],
    );
    let url = server.url("");
    let mut points = Vec::new();
    for phase in 0..3 {
        let acked = load_for(&url, Duration::from_millis(2500), phase).await;
        assert!(acked.len() > 100, "only {} writes", acked.len());
        // Nothing writes now: the file is the state at its version.
        points.push(rows(&db));
    }
    wait_shipped(&server, Duration::from_secs(20));
    // The differential object is 20 hex characters, and every log ends at a boundary.
    let differential = moto.get(BUCKET, "p/differential").unwrap();
    assert_eq!(differential.len(), 20);
    let entries = log_entries(&moto, "p/");
    let mut stamps: Vec<&Vec<u8>> = entries.iter().map(|(v, _)| v).collect();
    let n = stamps.len();
    stamps.dedup();
    assert_eq!(
        stamps.len(),
        n,
        "a versionstamp12 appears twice in the logs"
    );
    assert!(
        entries
            .iter()
            .any(|(_, k)| *k == BackupKvMutationKind::MkClear as i32),
        "deletes are logged as MK_CLEAR"
    );
    let generations = moto.keys(BUCKET, "p/denokv/generations/");
    assert!(generations.len() >= 2, "generations: {generations:?}");

    for (i, point) in points.iter().enumerate() {
        restored_equals(
            &moto,
            "p/",
            dir.path(),
            &format!("at{i}.sqlite"),
            point,
            Some(point.0),
        );
    }
    // The newest point, by default.
    restored_equals(
        &moto,
        "p/",
        dir.path(),
        "newest.sqlite",
        points.last().unwrap(),
        None,
    );
    // A file that exists is never overwritten; a point beyond the backup is refused.
    let (ok, text) = restore(&dir.path().join("at0.sqlite"), &moto.endpoint(), "p/", None);
    assert!(!ok && text.contains("exists"), "{text}");
    let (ok, text) = restore(
        &dir.path().join("future.sqlite"),
        &moto.endpoint(),
        "p/",
        Some(points[2].0 + 1000),
    );
    assert!(
        !ok && text.contains("newer than the newest point"),
        "{text}"
    );
    assert!(!dir.path().join("future.sqlite").exists());
    let (ok, text) = restore(
        &dir.path().join("x.sqlite"),
        &moto.endpoint(),
        "nothing/",
        None,
    );
    assert!(!ok && text.contains("holds no complete snapshot"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_primary_killed_while_shipping_resumes_with_no_gap_and_no_duplicate() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let mut acked = Vec::new();
    for round in 0..4u64 {
        let mut server = primary(&db, &moto.endpoint(), "k/", &[]);
        let url = server.url("");
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(load(url, 4, stop.clone(), 100 + round));
        // Kill at a moment that varies: mid-upload, mid-acknowledgement, or idle.
        tokio::time::sleep(Duration::from_millis(700 + 450 * round)).await;
        server.kill();
        stop.store(true, Ordering::Relaxed);
        acked.extend(task.await.unwrap());
    }
    // And a crash exactly between an upload and its acknowledgement (a debug hook).
    let crashing = {
        let mut launch = Launch::new(&db)
            .args(&["--backup-to-s3", "--s3-bucket", BUCKET, "--s3-prefix", "k/"])
            .args(&["--s3-endpoint", &moto.endpoint()])
            .env("DENOKV_DEBUG_BACKUP_CRASH", "after-upload:3");
        for (k, v) in S3_ENV {
            launch = launch.env(k, v);
        }
        launch.start()
    };
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(load(crashing.url(""), 4, stop.clone(), 200));
    let mut crashing = crashing;
    let status = crashing.wait_exit(Duration::from_secs(30));
    assert!(!status.success(), "the hook aborts the server");
    stop.store(true, Ordering::Relaxed);
    acked.extend(task.await.unwrap());
    let mut server = primary(&db, &moto.endpoint(), "k/", &[]);
    wait_shipped(&server, Duration::from_secs(20));
    server.wait_for_log("was shipped before the restart", Duration::from_secs(5));
    server.stop();
    let entries = log_entries(&moto, "k/");
    let versions: Vec<u64> = entries
        .iter()
        .map(|(v, _)| u64::from_be_bytes(v[..8].try_into().unwrap()))
        .collect();
    // No duplicate, in commit order across objects and restarts.
    for w in entries.windows(2) {
        assert!(
            w[0].0 < w[1].0,
            "versionstamps out of order or repeated: {:?} then {:?}",
            w[0].0,
            w[1].0
        );
    }
    // No gap: every acknowledged commit (each changes at least one key) after the first
    // snapshot's start is in the logs (those before are in the snapshot; the restore below
    // checks them).
    let generations = moto.keys(BUCKET, "k/denokv/generations/");
    assert_eq!(generations.len(), 1, "{generations:?}");
    let name = &generations[0]["k/denokv/generations/".len()..];
    let first_start = u64::from_str_radix(&name[..16], 16).unwrap();
    let missing: Vec<&u64> = acked
        .iter()
        .filter(|&&v| v > first_start && versions.binary_search(&v).is_err())
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits are not in S3: {:?}",
        missing.len(),
        acked.len(),
        &missing[..missing.len().min(5)]
    );
    assert_eq!(
        server.log_text().matches("taking a snapshot").count(),
        0,
        "restarts go on with the same history"
    );
    restored_equals(&moto, "k/", dir.path(), "restored.sqlite", &rows(&db), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_s3_outage_delays_the_backup_but_not_the_writes() {
    let moto = Moto::start(BUCKET);
    let proxy = Proxy::start(moto.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let endpoint = format!("http://{}", proxy.addr);
    let server = primary(&db, &endpoint, "o/", &[]);
    let url = server.url("");
    load_for(&url, Duration::from_millis(1000), 1).await;
    wait_shipped(&server, Duration::from_secs(20));

    proxy.up.store(false, Ordering::Relaxed);
    let acked = load_for(&url, Duration::from_secs(4), 2).await;
    assert!(
        acked.len() > 100,
        "writes go on while S3 is down: {}",
        acked.len()
    );
    let lag = metric(&server, "denokv_backup_lag_seconds");
    assert!(lag >= 1.0, "the lag grows while S3 is down: {lag}");
    assert!(metric(&server, "denokv_backup_pending_commits") > 0.0);
    assert!(
        proxy.refused.load(Ordering::Relaxed) > 0,
        "the backup tried S3"
    );
    let (_, _, scrape) = server.scrape();
    assert!(
        scrape
            .lines()
            .any(|l| l.starts_with("denokv_s3_request_errors_total{") && !l.ends_with(" 0")),
        "failed requests are counted"
    );

    proxy.up.store(true, Ordering::Relaxed);
    // Retries back off up to 10 s.
    wait_shipped(&server, Duration::from_secs(30));
    assert_eq!(metric(&server, "denokv_backup_lag_seconds"), 0.0);
    let state = rows(&db);
    restored_equals(&moto, "o/", dir.path(), "restored.sqlite", &state, None);
    // Shipped in order, nothing twice.
    let entries = log_entries(&moto, "o/");
    for w in entries.windows(2) {
        assert!(w[0].0 < w[1].0);
    }
}

/// A primary with no AWS keys in its environment, given `credentials` as the systemd
/// credential `aws-credentials` (the packaged unit's `LoadCredential=`).
fn primary_with_credential(db: &Path, moto: &Moto, prefix: &str, credentials: &str) -> Server {
    let dir = db.parent().unwrap().join(format!("credentials-{prefix}"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("aws-credentials"), credentials).unwrap();
    let mut launch = Launch::new(db)
        .args(&["--backup-to-s3", "--s3-bucket", BUCKET])
        .args(&["--s3-prefix", prefix, "--s3-endpoint", &moto.endpoint()])
        .env("CREDENTIALS_DIRECTORY", dir.to_str().unwrap())
        .env("AWS_REGION", "us-east-1")
        // No instance role to wait for.
        .env("AWS_EC2_METADATA_DISABLED", "true");
    for var in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_SHARED_CREDENTIALS_FILE",
        "AWS_CONFIG_FILE",
        "HOME",
    ] {
        launch = launch.env_remove(var);
    }
    launch.start()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aws_keys_in_the_systemd_credential_are_used() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();

    // The package installs an empty credential: no keys anywhere, so no request can be signed.
    let mut unsigned = primary_with_credential(&dir.path().join("a.sqlite"), &moto, "a/", "\n");
    let line = unsigned.wait_for_log("backup: cannot", Duration::from_secs(30));
    assert!(line.contains("credentials"), "{line}");
    assert!(
        !unsigned
            .log_text()
            .contains("S3 credentials: the systemd credential"),
        "an empty credential is not used"
    );
    assert_eq!(
        metric(&unsigned, "denokv_backup_last_snapshot_timestamp_seconds"),
        0.0
    );
    unsigned.stop();

    let keys = "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n";
    let server = primary_with_credential(&dir.path().join("b.sqlite"), &moto, "b/", keys);
    load_for(&server.url(""), Duration::from_millis(500), 1).await;
    wait_shipped(&server, Duration::from_secs(20));
    assert!(server
        .log_text()
        .contains("S3 credentials: the systemd credential aws-credentials"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commits_made_by_another_process_while_stopped_take_a_new_snapshot() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let mut server = primary(&db, &moto.endpoint(), "g/", &[]);
    load_for(&server.url(""), Duration::from_millis(800), 1).await;
    wait_shipped(&server, Duration::from_secs(20));
    server.stop();
    // Another process (as the Deno CLI would: a row and the global version) writes the file.
    {
        let conn = rusqlite::Connection::open(&db).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        conn.execute("UPDATE data_version SET version = ?1 WHERE k = 0", [v + 1])
            .unwrap();
        conn.execute(
            "INSERT OR REPLACE INTO kv (k, v, v_encoding, version, seq, expiration_ms) VALUES (?1, ?2, 3, ?3, 0, -1)",
            rusqlite::params![&key("written-elsewhere")[..], &b"by the CLI"[..], v + 1],
        )
        .unwrap();
        conn.execute(
            "DELETE FROM kv WHERE k IN (SELECT k FROM kv WHERE k != ?1 LIMIT 5)",
            [&key("written-elsewhere")[..]],
        )
        .unwrap();
    }
    let server = primary(&db, &moto.endpoint(), "g/", &[]);
    load_for(&server.url(""), Duration::from_millis(800), 2).await;
    wait_shipped(&server, Duration::from_secs(20));
    server.wait_for_log("were made without the backup", Duration::from_secs(5));
    assert_eq!(metric(&server, "denokv_backup_history_resets_total"), 1.0);
    restored_equals(&moto, "g/", dir.path(), "restored.sqlite", &rows(&db), None);
    // The history before the other process's commits is gone: it does not lead here.
    assert_eq!(moto.keys(BUCKET, "g/denokv/generations/").len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_backup_refuses_a_location_that_holds_objects() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let mut first = primary(&dir.path().join("a.sqlite"), &moto.endpoint(), "same/", &[]);
    load_for(&first.url(""), Duration::from_millis(300), 1).await;
    wait_shipped(&first, Duration::from_secs(20));
    first.stop();
    let mut second = primary(&dir.path().join("b.sqlite"), &moto.endpoint(), "same/", &[]);
    let status = second.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(1));
    let log = second.log_text();
    assert!(log.contains("that this database did not write"), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retention_deletes_what_no_retained_point_needs() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let server = primary(
        &db,
        &moto.endpoint(),
        "r/",
        &[
            "--backup-snapshot-interval",
            "1s",
            "--backup-retention",
            "2s",
        ],
    );
    let url = server.url("");
    // Generations every second, retention 2 s: old generations and logs must go.
    let start = Instant::now();
    while metric(&server, "denokv_backup_gc_deleted_objects_total") == 0.0 {
        load_for(&url, Duration::from_millis(500), 2).await;
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "nothing was ever deleted"
        );
    }
    wait_shipped(&server, Duration::from_secs(20));
    // What is kept: the generations of the last 2 s and the one before; logs and snapshot
    // objects from the oldest kept generation's start on (GC runs after each generation, so
    // allow what the last one has not collected yet: compare with the second-oldest record).
    let mut generations: Vec<u64> = moto
        .keys(BUCKET, "r/denokv/generations/")
        .iter()
        .map(|k| u64::from_str_radix(&k["r/denokv/generations/".len()..][..16], 16).unwrap())
        .collect();
    generations.sort();
    let oldest = generations[0];
    for k in moto.keys(BUCKET, "r/logs/") {
        let last = &k[k.len() - 4 - 24..k.len() - 4];
        let last = u64::from_str_radix(&last[..16], 16).unwrap();
        assert!(
            last >= oldest,
            "{k} ends before the oldest kept generation ({oldest})"
        );
    }
    for k in moto.keys(BUCKET, "r/snapshots/") {
        let monoseq = u64::from_str_radix(&k["r/snapshots/0001_".len()..][..16], 16).unwrap();
        assert!(monoseq >= oldest, "{k} belongs to a deleted generation");
    }
    // What is left still restores the newest point.
    restored_equals(&moto, "r/", dir.path(), "restored.sqlite", &rows(&db), None);
}

/// `n` sets of 60 KiB values, one at a time.
async fn big_writes(url: &str, n: usize, tag: &str) {
    let client = Client::new();
    for i in 0..n {
        let w = pb::AtomicWrite {
            mutations: vec![set_bytes(
                &key(&format!("big-{tag}-{i}")),
                &vec![b'x'; 60 << 10],
            )],
            ..Default::default()
        };
        let reply = client
            .try_data(Proto::H2, url, "atomic_write", w.encode_to_vec())
            .await
            .expect("the server answers");
        assert_eq!(reply.status, 200, "{}", reply.text());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_long_outage_bounds_the_pending_commits_then_starts_a_new_history() {
    let moto = Moto::start(BUCKET);
    let proxy = Proxy::start(moto.addr);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let endpoint = format!("http://{}", proxy.addr);
    let server = primary(&db, &endpoint, "b/", &["--backup-max-pending-mb", "1"]);
    let url = server.url("");
    big_writes(&url, 5, "before").await;
    wait_shipped(&server, Duration::from_secs(20));

    proxy.up.store(false, Ordering::Relaxed);
    // 40 × 60 KiB: more than the 1 MiB bound.
    big_writes(&url, 40, "during").await;
    server.wait_for_log("paused recording", Duration::from_secs(10));
    let pending = metric(&server, "denokv_backup_pending_bytes");
    assert!(
        pending <= (1 << 20) as f64,
        "pending stays bounded: {pending}"
    );
    big_writes(&url, 5, "still-down").await;
    assert_eq!(
        metric(&server, "denokv_backup_pending_bytes"),
        0.0,
        "nothing recorded while paused"
    );

    proxy.up.store(true, Ordering::Relaxed);
    let start = Instant::now();
    while metric(&server, "denokv_backup_history_resets_total") < 1.0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no new history after the outage; log:\n{}",
            server.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    big_writes(&url, 3, "after").await;
    wait_shipped(&server, Duration::from_secs(30));
    restored_equals(&moto, "b/", dir.path(), "restored.sqlite", &rows(&db), None);
}

/// The upstream server's binary: `$DENOKV_UPSTREAM_BIN`, else where the test command installs
/// it (`cargo install denokv --locked --root ~/.cache/denokv/upstream`).
fn upstream_bin() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("DENOKV_UPSTREAM_BIN") {
        return p.into();
    }
    let p = std::path::PathBuf::from(std::env::var_os("HOME").unwrap())
        .join(".cache/denokv/upstream/bin/denokv");
    assert!(
        p.exists(),
        "no upstream denokv at {}: cargo install denokv --locked --root ~/.cache/denokv/upstream, \
         or set DENOKV_UPSTREAM_BIN",
        p.display()
    );
    p
}

/// A file that holds the backup's tables is still served by the upstream server, with the
/// same rows as ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_upstream_server_serves_a_file_with_the_backup_tables() {
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("primary.sqlite");
    let mut server = primary(&db, &moto.endpoint(), "u/", &[]);
    load_for(&server.url(""), Duration::from_millis(500), 7).await;
    wait_shipped(&server, Duration::from_secs(20));
    server.stop();
    let (_, want) = rows(&db);
    assert!(!want.is_empty());
    let conn = rusqlite::Connection::open(&db).unwrap();
    for table in ["denokv_backup_outbox", "denokv_backup_state"] {
        let n: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE name = ?1",
                [table],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, 1, "the file holds {table}");
    }
    drop(conn);

    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut upstream = std::process::Command::new(upstream_bin())
        .args(["--sqlite-path", db.to_str().unwrap(), "serve"])
        .args([
            "--access-token",
            TOKEN,
            "--addr",
            &format!("127.0.0.1:{port}"),
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "upstream did not listen"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("http://127.0.0.1:{port}");
    let read = pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: Bytes::from_static(&[0]),
            end: Bytes::from_static(&[0xff]),
            limit: 1000,
            reverse: false,
        }],
    };
    let reply = Client::new()
        .try_data(Proto::H2, &url, "snapshot_read", read.encode_to_vec())
        .await
        .expect("upstream answers");
    let _ = upstream.kill();
    let _ = upstream.wait();
    assert_eq!(reply.status, 200, "{}", reply.text());
    let out = pb::SnapshotReadOutput::decode(reply.body.clone()).unwrap();
    let got: Vec<(Vec<u8>, Vec<u8>, i64)> = out.ranges[0]
        .values
        .iter()
        .map(|e| (e.key.to_vec(), e.value.to_vec(), e.encoding as i64))
        .collect();
    let want: Vec<(Vec<u8>, Vec<u8>, i64)> = want
        .into_iter()
        .filter(|r| r.0 < vec![0xff])
        .map(|(k, v, e, ..)| (k, v, e))
        .collect();
    assert_eq!(got, want);
}
