//! Replicas and pitr (issue 11 §2) against a real S3 on loopback (moto): our primary backs up
//! to S3 under a write load, our replica (`serve --sync-from-s3`) follows it, the `pitr`
//! subcommands move a replica file through time, and the upstream server follows our backup.
//! Needs `tests/s3/setup.sh` (moto in ~/.cache/denokv/s3-venv); the upstream test needs the
//! upstream binary (`$DENOKV_UPSTREAM_BIN` or ~/.cache/denokv/upstream/bin/denokv, installed by
//! tests/run-all.sh).

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use common::moto::{Moto, Proxy, S3_ENV};
use common::notify::NotifySocket;
use common::*;
use denokv::proto as pb;
use http_body_util::BodyExt;
use prost::Message;

const BUCKET: &str = "replica-tests";

/// The lag measurement runs alone (write); the other tests of this file run beside each other
/// (read): on a small machine they would measure each other.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// `(key, value, encoding, versionstamp)` of every entry, in key order.
type Contents = Vec<(Bytes, Bytes, i32, Bytes)>;

fn s3_args<'a>(endpoint: &'a str, prefix: &'a str) -> Vec<&'a str> {
    vec![
        "--s3-bucket",
        BUCKET,
        "--s3-prefix",
        prefix,
        "--s3-endpoint",
        endpoint,
    ]
}

fn with_s3(mut launch: Launch) -> Launch {
    for (k, v) in S3_ENV {
        launch = launch.env(k, v);
    }
    launch
}

fn start_primary(moto: &Moto, db: &Path, prefix: &str) -> Server {
    let endpoint = moto.endpoint();
    let mut args = vec!["--backup-to-s3", "--threads", "1"];
    args.extend(s3_args(&endpoint, prefix));
    with_s3(Launch::new(db).args(&args)).start()
}

fn start_replica(moto: &Moto, db: &Path, prefix: &str) -> Server {
    let endpoint = moto.endpoint();
    let mut args = vec!["--sync-from-s3", "--threads", "2"];
    args.extend(s3_args(&endpoint, prefix));
    with_s3(Launch::new(db).args(&args)).start()
}

/// Every entry of the database the server at `url` serves, read in pages.
async fn dump(c: &Client, url: &str) -> Contents {
    let mut out = Vec::new();
    let mut start = vec![0u8];
    loop {
        let read = pb::SnapshotRead {
            ranges: vec![pb::ReadRange {
                start: Bytes::from(start.clone()),
                end: Bytes::from_static(&[0xff]),
                limit: 500,
                reverse: false,
            }],
        };
        let reply = c
            .try_data(Proto::H1, url, "snapshot_read", read.encode_to_vec())
            .await
            .expect("the server answers");
        let got: pb::SnapshotReadOutput = reply.decode();
        let entries = &got.ranges[0].values;
        for e in entries {
            let v = e.value.clone();
            out.push((e.key.clone(), v, e.encoding, e.versionstamp.clone()));
        }
        if entries.len() < 500 {
            return out;
        }
        start = entries.last().unwrap().key.to_vec();
        start.push(0);
    }
}

fn vs_hex(vs: &[u8]) -> String {
    to_hex(vs)
}

/// A steady write load on the primary: one write at a time, every few ms, of every kind the
/// log carries (bytes, V8 and LE64 values, sums, deletes, versionstamped keys). Holding
/// `gate` pauses it; `last` is the versionstamp of the last acknowledged write.
struct Load {
    gate: Arc<tokio::sync::Mutex<()>>,
    last: Arc<Mutex<Vec<u8>>>,
    writes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn mutation(
    key: Bytes,
    kind: pb::MutationType,
    value: Option<(Vec<u8>, pb::ValueEncoding)>,
) -> pb::Mutation {
    pb::Mutation {
        key,
        value: value.map(|(data, e)| pb::KvValue {
            data: Bytes::from(data),
            encoding: e as i32,
        }),
        mutation_type: kind as i32,
        ..Default::default()
    }
}

fn load_write(n: u64) -> pb::AtomicWrite {
    use pb::MutationType as M;
    use pb::ValueEncoding as E;
    let k = |prefix: &str, i: u64| key(&format!("{prefix}{i}"));
    let mutations = match n % 6 {
        0 | 1 => vec![mutation(
            k("k", n % 300),
            M::MSet,
            Some((format!("value {n}").into_bytes(), E::VeBytes)),
        )],
        2 => vec![
            mutation(
                k("c", n % 7),
                M::MSum,
                Some((1u64.to_le_bytes().to_vec(), E::VeLe64)),
            ),
            mutation(
                k("v8-", n % 50),
                M::MSet,
                Some((vec![0xff, 0x0f, 0x49, 0x02], E::VeV8)),
            ),
        ],
        3 => vec![mutation(k("k", (n * 7) % 300), M::MDelete, None)],
        4 => vec![mutation(
            key("jobs"),
            M::MSetSuffixVersionstampedKey,
            Some((n.to_be_bytes().to_vec(), E::VeBytes)),
        )],
        _ => vec![
            mutation(
                k("m", n % 5),
                M::MMax,
                Some((n.to_le_bytes().to_vec(), E::VeLe64)),
            ),
            mutation(
                k("k", (n * 3) % 300),
                M::MSet,
                Some((vec![n as u8; 40], E::VeBytes)),
            ),
        ],
    };
    pb::AtomicWrite {
        mutations,
        ..Default::default()
    }
}

impl Load {
    fn start(url: String, pause: Duration) -> Load {
        let gate = Arc::new(tokio::sync::Mutex::new(()));
        let last = Arc::new(Mutex::new(Vec::new()));
        let writes = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (g, l, w, s) = (gate.clone(), last.clone(), writes.clone(), stop.clone());
        let task = tokio::spawn(async move {
            let c = Client::new();
            let mut n = 0u64;
            while !s.load(Ordering::Relaxed) {
                {
                    let _held = g.lock().await;
                    let body = load_write(n).encode_to_vec();
                    let reply = c
                        .try_data(Proto::H2, &url, "atomic_write", body)
                        .await
                        .expect("the primary answers");
                    let out: pb::AtomicWriteOutput = reply.decode();
                    assert_eq!(out.status, pb::AtomicWriteStatus::AwSuccess as i32);
                    *l.lock().unwrap() = out.versionstamp.to_vec();
                    w.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
                tokio::time::sleep(pause).await;
            }
        });
        Load {
            gate,
            last,
            writes,
            stop,
            task,
        }
    }

    /// Pauses the load and returns the primary's last versionstamp and contents (the state
    /// at that versionstamp), with the load paused until the guard drops.
    async fn checkpoint(
        &self,
        c: &Client,
        url: &str,
    ) -> (tokio::sync::MutexGuard<'_, ()>, Vec<u8>, Contents) {
        let held = self.gate.lock().await;
        let vs = self.last.lock().unwrap().clone();
        (held, vs, dump(c, url).await)
    }

    /// Stops the load: the number of writes, and the last one's versionstamp.
    async fn stop(self) -> (u64, Vec<u8>) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap();
        let last = self.last.lock().unwrap().clone();
        (self.writes.load(Ordering::Relaxed), last)
    }
}

/// Waits until the server at `url` serves `want`; panics with the difference after `limit`.
async fn wait_for_contents(c: &Client, url: &str, want: &Contents, limit: Duration, what: &str) {
    let start = Instant::now();
    loop {
        let got = dump(c, url).await;
        if &got == want {
            return;
        }
        if start.elapsed() > limit {
            let missing = want.iter().filter(|e| !got.contains(e)).count();
            let extra = got.iter().filter(|e| !want.contains(e)).count();
            panic!(
                "{what}: after {limit:?} the contents differ: {} entries wanted, {} served, {missing} \
                 missing or different, {extra} extra (first wanted {:?}, first served {:?})",
                want.len(),
                got.len(),
                want.iter().find(|e| !got.contains(e)),
                got.iter().find(|e| !want.contains(e)),
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// The value of `[k]` on the server at `url` (bytes), if present.
async fn value_of(c: &Client, url: &str, k: &str) -> Option<Bytes> {
    get_key(c, Proto::H1, url, k).await
}

/// The value of `[k]` on `server`; panics with the server's log if it does not answer.
async fn served_value(c: &Client, server: &Server, k: &str) -> Option<Bytes> {
    let key = key(k);
    let mut end = key.to_vec();
    end.push(0);
    let read = pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start: key,
            end: Bytes::from(end),
            limit: 1,
            reverse: false,
        }],
    };
    let body = read.encode_to_vec();
    let url = server.url("");
    // Once more on a transport error: the test client's pool has no idle timer, so over a run
    // longer than the server's idle timeout (120 s) it may pick a pooled connection the
    // server is closing at that moment (a client-side race, not the replica's doing).
    let reply = match c
        .try_data(Proto::H1, &url, "snapshot_read", body.clone())
        .await
    {
        Some(reply) => Some(reply),
        None => c.try_data(Proto::H1, &url, "snapshot_read", body).await,
    };
    let Some(reply) = reply else {
        panic!("{url} did not answer; log:\n{}", server.log_text());
    };
    let out: pb::SnapshotReadOutput = reply.decode();
    out.ranges[0].values.first().map(|e| e.value.clone())
}

struct Frames {
    body: hyper::body::Incoming,
    buf: BytesMut,
}

impl Frames {
    /// The next data frame's value of the one watched key (skipping pings).
    async fn next_value(&mut self, limit: Duration) -> Option<Vec<u8>> {
        tokio::time::timeout(limit, async {
            loop {
                if self.buf.len() >= 4 {
                    let len = u32::from_le_bytes(self.buf[..4].try_into().unwrap()) as usize;
                    if self.buf.len() >= 4 + len {
                        self.buf.advance(4);
                        let payload = self.buf.split_to(len);
                        if len == 0 {
                            continue;
                        }
                        let out = pb::WatchOutput::decode(payload).unwrap();
                        return out.keys[0]
                            .entry_if_changed
                            .as_ref()
                            .map(|e| e.value.to_vec());
                    }
                }
                let frame = self.body.frame().await.expect("stream ended").unwrap();
                if let Ok(d) = frame.into_data() {
                    self.buf.extend_from_slice(&d);
                }
            }
        })
        .await
        .expect("no watch frame in time")
    }
}

async fn open_watch(c: &Client, s: &Server, k: &str) -> Frames {
    let body = pb::Watch {
        keys: vec![pb::WatchKey { key: key(k) }],
    }
    .encode_to_vec();
    let resp = c
        .send(Proto::H2, data_request(&s.url("/v2/watch"), body))
        .await;
    assert_eq!(resp.status(), 200);
    Frames {
        body: resp.into_body(),
        buf: BytesMut::new(),
    }
}

async fn set_value(c: &Client, url: &str, k: &str, v: &str) -> pb::AtomicWriteOutput {
    set_key(c, Proto::H1, url, k, v)
        .await
        .expect("the server answers")
        .decode()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_follows_a_primary_under_load() {
    let _serial = ALONE.write().await;
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "follow/";
    let mut primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    let load = Load::start(primary.url(""), Duration::from_millis(3));
    // The replica starts from a snapshot and the logs written so far.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let replica_db = dir.path().join("replica.sqlite");
    let mut replica = start_replica(&moto, &replica_db, prefix);
    let log = replica.wait_for_log("initial snapshot complete", Duration::from_secs(5));
    assert!(log.contains("log objects"), "{log}");

    // Checkpoints: the load paused, the replica must come to serve exactly what the primary
    // has (every key, value, encoding and versionstamp).
    for round in 0..2 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (held, vs, want) = load.checkpoint(&c, &primary.url("")).await;
        assert!(want.len() > 50, "round {round}: {} entries", want.len());
        wait_for_contents(
            &c,
            &replica.url(""),
            &want,
            Duration::from_secs(10),
            "checkpoint",
        )
        .await;
        drop(held);
        eprintln!(
            "checkpoint {round}: {} entries at {} equal on the replica",
            want.len(),
            vs_hex(&vs)
        );
    }

    // Writes to a replica are refused with the protocol's answer.
    let out = set_value(&c, &replica.url(""), "refused", "x").await;
    assert_eq!(out.status, pb::AtomicWriteStatus::AwWriteDisabled as i32);

    // A watch on the replica sees a change synced from the primary.
    let mut frames = open_watch(&c, &replica, "watched").await;
    assert_eq!(frames.next_value(Duration::from_secs(5)).await, None);
    for i in 0..2 {
        let v = format!("synced-{i}");
        set_value(&c, &primary.url(""), "watched", &v).await;
        assert_eq!(
            frames.next_value(Duration::from_secs(5)).await.as_deref(),
            Some(v.as_bytes()),
            "watch frame {i}"
        );
    }

    // Replica lag under the steady load: from a write's acknowledgement by the primary to
    // the moment the replica serves it.
    // DENOKV_REPLICA_LAG_PROBES=200 for a longer measurement.
    let probes: usize = std::env::var("DENOKV_REPLICA_LAG_PROBES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(30);
    let mut lags = Vec::new();
    for i in 0..probes {
        let v = format!("probe-{i}");
        set_value(&c, &primary.url(""), "probe", &v).await;
        let acked = Instant::now();
        loop {
            if served_value(&c, &replica, "probe").await.as_deref() == Some(v.as_bytes()) {
                break;
            }
            assert!(
                acked.elapsed() < Duration::from_secs(10),
                "probe {i} never arrived"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        lags.push(acked.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_millis(137)).await;
    }
    lags.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lags, 0.5), percentile(&lags, 0.99));
    eprintln!(
        "replica lag over {} probes under load: p50 {p50:.2} s, p99 {p99:.2} s, max {:.2} s",
        lags.len(),
        lags[lags.len() - 1]
    );
    assert!(p50 <= 2.0, "replica lag p50 {p50:.2} s");
    // The target is p50; p99 has room for a busy test machine (measured alone: about 1 s).
    assert!(p99 <= 5.0, "replica lag p99 {p99:.2} s");

    let (_, _, metrics) = replica.scrape();
    let lag = metric(&metrics, "denokv_replica_lag_seconds").expect("a lag metric");
    assert!(lag < 5.0, "denokv_replica_lag_seconds {lag}");
    assert!(metric(&metrics, "denokv_replica_last_sync_timestamp_seconds").unwrap() > 1.7e9);
    assert!(metric(&metrics, "denokv_replica_applied_entries_total").unwrap() > 100.0);
    assert_eq!(
        metric(&metrics, "denokv_replica_sync_errors_total"),
        Some(0.0)
    );

    // SIGKILL mid-load, restart on the same file: it goes on from where it was.
    replica.kill();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut replica = start_replica(&moto, &replica_db, prefix);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (held, _, want) = load.checkpoint(&c, &primary.url("")).await;
    wait_for_contents(
        &c,
        &replica.url(""),
        &want,
        Duration::from_secs(10),
        "after SIGKILL",
    )
    .await;
    drop(held);
    assert!(
        !replica.log_text().contains("initial snapshot"),
        "a restart does not take the snapshot again:\n{}",
        replica.log_text()
    );

    let (writes, _) = load.stop().await;
    eprintln!("{writes} writes in the load");
    tokio::task::spawn_blocking(move || {
        assert!(replica.stop().success());
        assert!(primary.stop().success());
    })
    .await
    .unwrap();
}

/// Runs `denokv --sqlite-path DB pitr ARGS`: status, stdout, stderr.
fn pitr(db: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    pitr_with(binary(), db, args, env)
}

fn pitr_with(bin: &str, db: &Path, args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(bin);
    cmd.arg("--sqlite-path").arg(db).arg("pitr").args(args);
    cmd.env_remove("DENO_KV_SQLITE_PATH")
        .env("RUST_LOG", "info");
    for (k, v) in S3_ENV.iter().chain(env) {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// What a replica file holds, read by our server started `--read-only` on it.
async fn served_by_read_only(c: &Client, db: &Path) -> Contents {
    let mut s = Server::start_on(db, &["--read-only", "--threads", "1"]);
    let got = dump(c, &s.url("")).await;
    tokio::task::spawn_blocking(move || s.stop()).await.unwrap();
    got
}

fn current(db: &Path) -> String {
    let (ok, out, err) = pitr(db, &["info"], &[]);
    assert!(ok, "{err}");
    let vs = out
        .trim()
        .strip_prefix("Current versionstamp: ")
        .unwrap_or_else(|| panic!("pitr info printed {out:?}"));
    assert_eq!(vs.len(), 20, "{out}");
    vs.to_string()
}

/// Waits until the primary's backup has shipped everything (`denokv_backup_lag_versions` 0).
fn wait_shipped(primary: &Server) {
    let start = Instant::now();
    loop {
        let (_, _, text) = primary.scrape();
        if metric(&text, "denokv_backup_lag_versions") == Some(0.0)
            && metric(&text, "denokv_backup_pending_commits") == Some(0.0)
        {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the backup did not ship:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pitr_moves_a_replica_file_through_time() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "pitr/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    let load = Load::start(primary.url(""), Duration::from_millis(2));
    let mut points: Vec<(String, Contents)> = Vec::new();
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (held, vs, contents) = load.checkpoint(&c, &primary.url("")).await;
        points.push((vs_hex(&vs), contents));
        drop(held);
    }
    let (writes, _) = load.stop().await;
    assert!(writes > 100, "{writes} writes");
    let p = primary;
    let primary = tokio::task::spawn_blocking(move || {
        wait_shipped(&p);
        p
    })
    .await
    .unwrap();
    let db = dir.path().join("replica.sqlite");
    let s3 = s3_args(&endpoint, prefix);

    // A replica file that does not exist yet: info says so.
    let (ok, _, err) = pitr(&db, &["info"], &[]);
    assert!(!ok && err.contains("does not exist"), "{err}");

    let mut args = vec!["sync"];
    args.extend(s3);
    let (ok, out, err) = pitr(&db, &args, &[]);
    assert!(ok, "{err}");
    assert_eq!(out, "", "pitr sync prints nothing on stdout");
    // The initial snapshot of a fresh backup is at its differential (version 0): every
    // checkpoint is ahead, in the redo log.
    let start_point = current(&db);
    assert!(start_point < points[0].0, "{start_point}");

    // `pitr list`: every checkpoint, newest first, `<20 hex>\t<RFC 3339 ms Z>`.
    let (ok, list, err) = pitr(&db, &["list"], &[]);
    assert!(ok, "{err}");
    let lines: Vec<&str> = list.lines().collect();
    assert!(lines.len() >= 3, "{list}");
    let mut previous: Option<&str> = None;
    for line in &lines {
        let (vs, time) = line.split_once('\t').unwrap_or_else(|| panic!("{line:?}"));
        assert_eq!(vs.len(), 20, "{line:?}");
        assert!(vs
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
        assert_eq!(time.len(), 24, "{line:?}");
        assert!(
            time.ends_with('Z') && &time[10..11] == "T" && &time[19..20] == ".",
            "{line:?}"
        );
        if let Some(p) = previous {
            assert!(vs < p, "newest first: {list}");
        }
        previous = Some(vs);
    }
    for (vs, _) in &points {
        assert!(
            lines.iter().any(|l| l.starts_with(vs.as_str())),
            "{vs} not in\n{list}"
        );
    }
    // Time filters: nothing before 2000, everything since then; bad times are refused as
    // upstream refuses them.
    let (ok, none, _) = pitr(&db, &["list", "--end", "2000-01-01T00:00:00Z"], &[]);
    assert!(ok && none.is_empty(), "{none}");
    let (ok, all, _) = pitr(&db, &["list", "--start", "2000-01-01T00:00:00+01:00"], &[]);
    assert!(ok && all == list);
    let (ok, _, err) = pitr(&db, &["list", "--start", "yesterday"], &[]);
    assert!(
        !ok && err.contains("invalid start time Some(\"yesterday\")"),
        "{err}"
    );

    // Forward to the middle point, then the newest, then back to the first, then forward:
    // each time exactly what the primary had then.
    for i in [1, 2, 0, 1] {
        let (vs, want) = &points[i];
        let (ok, out, err) = pitr(&db, &["checkout", vs], &[]);
        assert!(ok, "checkout {vs}: {err}");
        assert_eq!(out, format!("Snapshot is now at versionstamp {vs}\n"));
        assert_eq!(&current(&db), vs);
        let got = served_by_read_only(&c, &db).await;
        assert!(
            &got == want,
            "point {i} ({vs}): {} entries, want {}",
            got.len(),
            want.len()
        );
    }

    // Before the oldest point the undo log reaches: refused, nothing moves (SPEC §10 D17).
    let (ok, _, err) = pitr(&db, &["checkout", &start_point], &[]);
    assert!(
        !ok && err.contains("older than the oldest recoverable point"),
        "{err}"
    );
    assert_eq!(current(&db), points[1].0);
    let (ok, _, err) = pitr(&db, &["checkout", "xyz"], &[]);
    assert!(!ok && err.contains("invalid versionstamp xyz"), "{err}");

    // `pitr sync` only fetches (SPEC §10 D16): more writes, a sync, and the point stays.
    let after = set_value(&c, &primary.url(""), "after", "1").await;
    let after = vs_hex(&after.versionstamp);
    let fetched = Instant::now();
    loop {
        let (ok, _, err) = pitr(&db, &args, &[]);
        assert!(ok, "{err}");
        assert_eq!(current(&db), points[1].0);
        let (_, list2, _) = pitr(&db, &["list"], &[]);
        if list2.starts_with(&after) {
            break;
        }
        assert!(
            fetched.elapsed() < Duration::from_secs(15),
            "{after} never fetched:\n{list2}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Another bucket or prefix for the same file is refused.
    let (ok, _, err) = pitr(
        &db,
        &[
            "sync",
            "--s3-bucket",
            BUCKET,
            "--s3-prefix",
            "other/",
            "--s3-endpoint",
            &endpoint,
        ],
        &[],
    );
    assert!(
        !ok && err.contains("delete the key `s3_init_completed`"),
        "{err}"
    );
    // A normal database is not a replica.
    let (ok, _, err) = pitr(&primary.db, &["info"], &[]);
    assert!(
        !ok && err.contains("is a normal database, not a replica"),
        "{err}"
    );

    stop(primary).await;
}

/// Stops a server with SIGTERM; it must exit cleanly.
async fn stop(mut s: Server) {
    tokio::task::spawn_blocking(move || {
        let status = s.stop();
        assert!(status.success(), "{status}; log:\n{}", s.log_text());
    })
    .await
    .unwrap();
}

fn upstream_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("DENOKV_UPSTREAM_BIN") {
        return p.into();
    }
    let p =
        PathBuf::from(std::env::var_os("HOME").unwrap()).join(".cache/denokv/upstream/bin/denokv");
    assert!(
        p.exists(),
        "no upstream denokv at {}: run `cargo install denokv --locked --root \
         ~/.cache/denokv/upstream` (tests/run-all.sh does), or set DENOKV_UPSTREAM_BIN",
        p.display()
    );
    p
}

/// The upstream server, killed on drop.
struct Upstream {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<Vec<String>>>,
}

impl Upstream {
    fn start(db: &Path, args: &[&str]) -> Upstream {
        let mut cmd = Command::new(upstream_binary());
        cmd.arg("--sqlite-path")
            .arg(db)
            .arg("serve")
            .args(["--access-token", TOKEN, "--addr", "127.0.0.1:0"])
            .args(args)
            .env("RUST_LOG", "info")
            .env_remove("DENO_KV_ACCESS_TOKEN");
        for (k, v) in S3_ENV {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot run the upstream denokv");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(i) = line.find("Listening on http://") {
                    let _ = tx.send(line[i + "Listening on http://".len()..].trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(a) => a.parse().unwrap(),
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "upstream did not start:\n{}",
                    log.lock().unwrap().join("\n")
                );
            }
        };
        Upstream { child, addr, log }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_server_follows_our_backup_and_reads_our_replica_files() {
    let _serial = ALONE.read().await;
    let upstream = upstream_binary();
    let moto = Moto::start(BUCKET);
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "upstream/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    let load = Load::start(primary.url(""), Duration::from_millis(3));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (held, first_vs, first) = load.checkpoint(&c, &primary.url("")).await;
    drop(held);

    // Upstream as a replica of our backup, while our load goes on. It syncs every 10-15 s.
    let up_db = dir.path().join("upstream-replica.sqlite");
    let mut endpoint_args = vec!["--sync-from-s3"];
    endpoint_args.extend(s3_args(&endpoint, prefix));
    let up = Upstream::start(&up_db, &endpoint_args);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (writes, last_vs) = load.stop().await;
    let want = dump(&c, &primary.url("")).await;
    assert!(writes > 100);
    wait_for_contents(
        &c,
        &up.url(),
        &want,
        Duration::from_secs(40),
        "upstream replica",
    )
    .await;
    drop(up);

    // Its pitr list shows our points; its checkout goes back to the first checkpoint, and
    // our server reads the file it made.
    let (ok, list, err) = pitr_with(upstream.to_str().unwrap(), &up_db, &["list"], &[]);
    assert!(ok, "{err}");
    let first_hex = vs_hex(&first_vs);
    let last_hex = vs_hex(&last_vs);
    assert!(
        list.lines().any(|l| l.starts_with(&last_hex)),
        "{last_hex} not in\n{list}"
    );
    assert_eq!(
        list,
        pitr(&up_db, &["list"], &[]).1,
        "our pitr list reads its file alike"
    );
    let (ok, out, err) = pitr_with(
        upstream.to_str().unwrap(),
        &up_db,
        &["checkout", &first_hex],
        &[],
    );
    assert!(ok, "{out}{err}");
    assert_eq!(served_by_read_only(&c, &up_db).await, first);
    // Our replica goes on from the file upstream made (back to the newest point).
    let mut ours = start_replica(&moto, &up_db, prefix);
    wait_for_contents(
        &c,
        &ours.url(""),
        &want,
        Duration::from_secs(10),
        "ours on upstream's file",
    )
    .await;
    let (_, info, _) = pitr(&up_db, &["info"], &[]);
    assert_eq!(info.trim(), format!("Current versionstamp: {last_hex}"));
    tokio::task::spawn_blocking(move || assert!(ours.stop().success()))
        .await
        .unwrap();

    // And upstream follows from a replica file our server made.
    let our_db = dir.path().join("our-replica.sqlite");
    let mut ours = start_replica(&moto, &our_db, prefix);
    wait_for_contents(
        &c,
        &ours.url(""),
        &want,
        Duration::from_secs(10),
        "our replica",
    )
    .await;
    tokio::task::spawn_blocking(move || assert!(ours.stop().success()))
        .await
        .unwrap();
    let up = Upstream::start(&our_db, &endpoint_args);
    wait_for_contents(
        &c,
        &up.url(),
        &want,
        Duration::from_secs(20),
        "upstream on our file",
    )
    .await;
    let log = up.log.lock().unwrap().join("\n");
    drop(up);
    assert!(!log.contains("panicked"), "{log}");

    stop(primary).await;
}

/// Waits until `[k]` on the server at `url` holds `v`.
async fn wait_for_value(c: &Client, url: &str, k: &str, v: &str, limit: Duration) {
    let start = Instant::now();
    while value_of(c, url, k).await.as_deref() != Some(v.as_bytes()) {
        assert!(start.elapsed() < limit, "[{k}] never became {v:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_outage_leaves_the_replica_serving_and_it_catches_up() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let proxy = Proxy::start(moto.addr);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "outage/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    set_value(&c, &primary.url(""), "k", "before").await;
    let endpoint = format!("http://{}", proxy.addr);
    let mut args = vec![
        "--sync-from-s3",
        "--threads",
        "1",
        "--sync-interval-ms",
        "200",
    ];
    args.extend(s3_args(&endpoint, prefix));
    let notify = NotifySocket::bind(false);
    let replica = with_s3(Launch::new(&dir.path().join("replica.sqlite")).args(&args))
        .env("NOTIFY_SOCKET", &notify.name)
        .start();
    wait_for_value(&c, &replica.url(""), "k", "before", Duration::from_secs(10)).await;

    proxy.up.store(false, Ordering::Relaxed);
    set_value(&c, &primary.url(""), "k", "during").await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    // It serves its last point, says why it is behind, and counts.
    assert_eq!(
        value_of(&c, &replica.url(""), "k").await.as_deref(),
        Some(&b"before"[..])
    );
    replica.wait_for_log("cannot sync from S3", Duration::from_secs(5));
    let (_, _, metrics) = replica.scrape();
    assert!(
        metric(&metrics, "denokv_replica_sync_errors_total").unwrap() >= 1.0,
        "{metrics}"
    );
    let lag = metric(&metrics, "denokv_replica_lag_seconds").unwrap();
    assert!(lag >= 3.0, "lag {lag} while S3 is away");
    // systemd's status line says so after what is served.
    let states = notify.collect_until(Duration::from_secs(5), |m| {
        m.last()
            .is_some_and(|(_, msg)| msg.contains("REPLICA BEHIND"))
    });
    let behind = &states.last().unwrap().1;
    assert!(
        behind.starts_with("STATUS=Serving ") && behind.contains("; REPLICA BEHIND: cannot sync"),
        "{states:?}"
    );

    proxy.up.store(true, Ordering::Relaxed);
    wait_for_value(&c, &replica.url(""), "k", "during", Duration::from_secs(40)).await;
    replica.wait_for_log("syncing from S3 works again", Duration::from_secs(5));
    let states = notify.collect_until(Duration::from_secs(5), |m| {
        m.last()
            .is_some_and(|(_, msg)| msg.starts_with("STATUS=") && !msg.contains("BEHIND"))
    });
    assert!(
        states.last().unwrap().1.starts_with("STATUS=Serving "),
        "{states:?}"
    );
    let (_, _, metrics) = replica.scrape();
    let lag = metric(&metrics, "denokv_replica_lag_seconds").unwrap();
    assert!(lag < 3.0, "lag {lag} after S3 came back");
    stop(replica).await;
    stop(primary).await;
}

/// PUTs an object into the bucket (moto checks no signature).
fn put_object(moto: &Moto, key: &str, body: &[u8]) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(moto.addr).unwrap();
    write!(
        s,
        "PUT /{BUCKET}/{key} HTTP/1.1\r\nHost: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        moto.addr,
        body.len()
    )
    .unwrap();
    s.write_all(body).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_cannot_follow_its_backup_stops() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "broken/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    set_value(&c, &primary.url(""), "k", "1").await;
    let mut replica = start_replica(&moto, &dir.path().join("replica.sqlite"), prefix);
    wait_for_value(&c, &replica.url(""), "k", "1", Duration::from_secs(10)).await;
    // A log object that is not a mutation range, after every real one.
    let bad = "logs/0001_7fffffffffffffff_7fffffffffffffff00000000_7fffffffffffffff0000ffff.bin";
    put_object(
        &moto,
        &format!("{prefix}{bad}"),
        b"\xff\xff\xff not protobuf",
    );
    let status = replica.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(1), "{}", replica.log_text());
    let log = replica.log_text();
    assert!(
        log.contains("the replica")
            && log.contains(bad)
            && log.contains("Error: stopped after a failure"),
        "{log}"
    );
    stop(primary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stops_promptly_while_it_waits_for_s3() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    // No backup at this prefix yet: the replica waits for the first snapshot, not listening.
    let mut cmd = Command::new(binary());
    cmd.arg("--sqlite-path")
        .arg(dir.path().join("waiting.sqlite"))
        .args([
            "serve",
            "--access-token",
            TOKEN,
            "--addr",
            "127.0.0.1:0",
            "--sync-from-s3",
        ])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .args(s3_args(&endpoint, "nothing-yet/"))
        .env("RUST_LOG", "info")
        .env_remove("NOTIFY_SOCKET")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in S3_ENV {
        cmd.env(k, v);
    }
    let child = cmd.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let sent = Instant::now();
    let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(sent.elapsed() < Duration::from_secs(5), "{log}");
    assert!(out.status.success(), "{}: {log}", out.status);
    assert!(
        log.contains("waiting for") && log.contains("stopped before the replica was ready"),
        "{log}"
    );
    assert!(!log.contains("Listening on"), "{log}");

    // Following a primary, with S3 hung (moto stopped): SIGTERM does not wait for S3.
    let prefix = "hang/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    set_value(&c, &primary.url(""), "k", "1").await;
    let mut replica = start_replica(&moto, &dir.path().join("replica.sqlite"), prefix);
    wait_for_value(&c, &replica.url(""), "k", "1", Duration::from_secs(10)).await;
    moto.pause();
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        value_of(&c, &replica.url(""), "k").await.as_deref(),
        Some(&b"1"[..])
    );
    let sent = Instant::now();
    let status = tokio::task::spawn_blocking(move || {
        let status = replica.stop();
        (status, replica.log_text())
    })
    .await
    .unwrap();
    assert!(
        status.0.success() && sent.elapsed() < Duration::from_secs(5),
        "{:?}",
        status
    );
    moto.resume();
    stop(primary).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_deletes_undo_history_older_than_it_keeps() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let endpoint = moto.endpoint();
    let dir = tempfile::tempdir().unwrap();
    let prefix = "history/";
    let primary = start_primary(&moto, &dir.path().join("primary.sqlite"), prefix);
    let c = Client::new();
    let mut stamps = Vec::new();
    for i in 0..6 {
        let out = set_value(&c, &primary.url(""), "k", &i.to_string()).await;
        stamps.push(vs_hex(&out.versionstamp));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let db = dir.path().join("replica.sqlite");
    let mut args = vec![
        "--sync-from-s3",
        "--threads",
        "1",
        "--replica-history",
        "1s",
    ];
    args.extend(s3_args(&endpoint, prefix));
    let replica = with_s3(Launch::new(&db).args(&args)).start();
    wait_for_value(&c, &replica.url(""), "k", "5", Duration::from_secs(10)).await;
    replica.wait_for_log("undo entries older than 1 s", Duration::from_secs(10));
    stop(replica).await;
    // Every point was older than a second: only the newest stays.
    let (ok, list, err) = pitr(&db, &["list"], &[]);
    assert!(ok, "{err}");
    assert_eq!(list.lines().count(), 1, "{list}");
    assert!(list.starts_with(&stamps[5]), "{list}");
    let (ok, _, err) = pitr(&db, &["checkout", &stamps[4]], &[]);
    assert!(
        !ok && err.contains("older than the oldest recoverable point"),
        "{err}"
    );
    stop(primary).await;
}

/// The primary starts a new backup history (here: another process wrote its file while it
/// was stopped): a replica following the old history stops with a clear error instead of
/// applying the new history's logs on top of the commits it never got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_stops_when_the_primary_starts_a_new_history() {
    let _serial = ALONE.read().await;
    let moto = Moto::start(BUCKET);
    let dir = tempfile::tempdir().unwrap();
    let prefix = "reset/";
    let primary_db = dir.path().join("primary.sqlite");
    let mut primary = start_primary(&moto, &primary_db, prefix);
    let c = Client::new();
    set_value(&c, &primary.url(""), "k", "1").await;
    let mut replica = start_replica(&moto, &dir.path().join("replica.sqlite"), prefix);
    wait_for_value(&c, &replica.url(""), "k", "1", Duration::from_secs(10)).await;
    tokio::task::spawn_blocking(move || {
        assert!(primary.stop().success());
    })
    .await
    .unwrap();
    // Another process changes a key and the global version (as the Deno CLI would).
    {
        let conn = rusqlite::Connection::open(&primary_db).unwrap();
        let v: i64 = conn
            .query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
                r.get(0)
            })
            .unwrap();
        conn.execute("UPDATE data_version SET version = ?1 WHERE k = 0", [v + 1])
            .unwrap();
        conn.execute(
            "UPDATE kv SET v = ?1, version = ?2 WHERE k = ?3",
            rusqlite::params![&b"by another process"[..], v + 1, &key("k")[..]],
        )
        .unwrap();
    }
    let primary = start_primary(&moto, &primary_db, prefix);
    set_value(&c, &primary.url(""), "after", "2").await;
    let status = replica.wait_exit(Duration::from_secs(30));
    assert_eq!(status.code(), Some(1), "{}", replica.log_text());
    let log = replica.log_text();
    assert!(log.contains("started a new backup history"), "{log}");
    // One marker in the end: the old history's goes with it once the new snapshot is complete.
    let start = Instant::now();
    while moto.keys(BUCKET, &format!("{prefix}denokv/resets/")).len() != 1 {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the old marker stays"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    stop(primary).await;
}
