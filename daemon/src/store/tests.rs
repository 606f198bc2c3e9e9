//! Store tests: group commit, savepoint isolation, expiry, watch notification.

use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::kv::model::*;
use crate::kv::value::{Encoding, Le64Op, Value};
use crate::kv::versionstamp::Versionstamp;

struct TestStore {
    _dir: tempfile::TempDir,
    path: std::path::PathBuf,
    committer: CommitterHandle,
    watches: Arc<WatchRegistry>,
    thread: std::thread::JoinHandle<()>,
    _external: external::ExternalCommits,
}

/// Both ways the committer writes the WAL: every store test runs with each. (`SyncMode::Full`:
/// with `Normal` the io_uring flavour is never used.)
const WAL_WRITES: [WalWrites; 2] = [WalWrites::Pwrite, WalWrites::IoUring];

impl TestStore {
    fn new(wal: WalWrites) -> Self {
        Self::with_backup(wal, BackupOutbox::disabled())
    }

    fn with_backup(wal: WalWrites, backup: BackupOutbox) -> Self {
        // Shown with the output of a failing test.
        eprintln!("store with WAL writes {wal:?}, {backup:?}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = schema::open_writer(&path, SyncMode::Full, wal).unwrap();
        let watches = Arc::new(WatchRegistry::default());
        let (committer, thread) = committer::spawn(conn, watches.clone(), backup).unwrap();
        let external = external::ExternalCommits::spawn(&path, watches.clone()).unwrap();
        TestStore {
            _dir: dir,
            path,
            committer,
            watches,
            thread,
            _external: external,
        }
    }

    fn reader(&self) -> Reader {
        Reader::open(&self.path).unwrap()
    }

    fn get(&self, key: &[u8]) -> Option<Entry> {
        self.reader()
            .read_keys(&[Bytes::copy_from_slice(key)], crate::kv::now_ms())
            .unwrap()
            .pop()
            .unwrap()
    }

    fn stop(self) {
        drop(self.committer);
        self.thread.join().unwrap();
    }
}

fn bytes_value(s: &str) -> Value {
    Value {
        data: Bytes::copy_from_slice(s.as_bytes()),
        encoding: Encoding::Bytes,
    }
}

fn set(key: &str, value: &str) -> Mutation {
    Mutation {
        key: Bytes::copy_from_slice(key.as_bytes()),
        kind: MutationKind::Set(bytes_value(value)),
        expire_at_ms: None,
    }
}

fn write(mutations: Vec<Mutation>) -> AtomicWrite {
    AtomicWrite {
        mutations,
        ..Default::default()
    }
}

fn committed(o: Result<WriteOutcome, StoreError>) -> Versionstamp {
    match o {
        Ok(WriteOutcome::Committed(v)) => v,
        other => panic!("expected a commit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writers_each_get_their_own_increasing_versionstamp() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let mut tasks = Vec::new();
        for i in 0..400 {
            let c = s.committer.clone();
            tasks.push(tokio::spawn(async move {
                let key = format!("k{i}");
                (
                    key.clone(),
                    committed(c.write(write(vec![set(&key, "v")])).await),
                )
            }));
        }
        let mut stamps = Vec::new();
        for t in tasks {
            let (key, stamp) = t.await.unwrap();
            assert_eq!(
                s.get(key.as_bytes()).unwrap().versionstamp,
                stamp,
                "the row carries its write's versionstamp"
            );
            stamps.push(stamp);
        }
        stamps.sort();
        stamps.dedup();
        assert_eq!(stamps.len(), 400, "every write has its own versionstamp");
        let conn = rusqlite::Connection::open(&s.path).unwrap();
        let dv: i64 = conn
            .query_row("SELECT version FROM data_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(
            dv as u64,
            stamps.last().unwrap().version(),
            "data_version is the last commit's version"
        );
        s.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versionstamps_advance_by_one_to_nine() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let mut last = 0;
        for _ in 0..50 {
            let v = committed(s.committer.write(AtomicWrite::default()).await).version();
            assert!((last + 1..=last + 9).contains(&v), "{last} -> {v}");
            last = v;
        }
        s.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_in_a_batch_leaves_no_trace() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        committed(
            s.committer
                .write(write(vec![set("text", "not a number")]))
                .await,
        );
        // Queue many writes at once so they share batches; every third one fails mid-way.
        let mut tasks = Vec::new();
        for i in 0..90 {
            let c = s.committer.clone();
            tasks.push(tokio::spawn(async move {
                let mut muts = vec![set(&format!("a{i}"), "x")];
                if i % 3 == 0 {
                    muts.push(Mutation {
                        key: Bytes::from_static(b"text"),
                        kind: MutationKind::Le64(Le64Op::Sum, 1),
                        expire_at_ms: None,
                    });
                }
                muts.push(set(&format!("b{i}"), "y"));
                (i, c.write(write(muts)).await)
            }));
        }
        for t in tasks {
            let (i, result) = t.await.unwrap();
            if i % 3 == 0 {
                match result {
                    Err(StoreError::Invalid(e)) => assert_eq!(
                        e.message(),
                        "Failed to perform 'sum' mutation on a non-U64 value in the database"
                    ),
                    other => panic!("expected an invalid write, got {other:?}"),
                }
                assert!(
                    s.get(format!("a{i}").as_bytes()).is_none(),
                    "mutation before the failure was rolled back"
                );
                assert!(s.get(format!("b{i}").as_bytes()).is_none());
            } else {
                committed(result);
                assert!(s.get(format!("a{i}").as_bytes()).is_some());
                assert!(s.get(format!("b{i}").as_bytes()).is_some());
            }
        }
        s.stop();
    }
}

/// A batch of five committed as one transaction (the direct committer commits what it is
/// given as one batch): the second write fails half-way, its neighbours commit.
#[test]
fn a_failing_write_in_a_shared_batch_leaves_no_trace() {
    for wal in WAL_WRITES {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let conn = schema::open_writer(&path, SyncMode::Full, wal).unwrap();
        let mut c = committer::DirectCommitter::with_metrics(conn, metrics.clone()).unwrap();
        committed(
            c.commit(&[write(vec![set("text", "not a number")])])
                .remove(0),
        );
        let before = global_version(&path);
        let failing = write(vec![set("a", "x"), sum("text", 1), set("b", "y")]);
        let batch = [
            write(vec![set("before", "1")]),
            failing,
            write(vec![set("after", "1")]),
            // Sees neither the failed write's rows nor its version.
            write(vec![sum("counter", 1)]),
            write(vec![set("last", "1")]),
        ];
        let answers = c.commit(&batch);
        // One transaction: one batch of five in the histogram (one before it).
        assert_eq!(metrics.commit_batch_size.get_sample_count(), 2, "{wal:?}");
        assert_eq!(metrics.commit_batch_size.get_sample_sum(), 6.0, "{wal:?}");
        match &answers[1] {
            Err(StoreError::Invalid(e)) => assert_eq!(
                e.message(),
                "Failed to perform 'sum' mutation on a non-U64 value in the database"
            ),
            other => panic!("{wal:?}: expected an invalid write, got {other:?}"),
        }
        let stamps: Vec<u64> = [0, 2, 3, 4]
            .iter()
            .map(|&i| match &answers[i] {
                Ok(WriteOutcome::Committed(v)) => v.version(),
                other => panic!("{wal:?}: write {i}: expected a commit, got {other:?}"),
            })
            .collect();
        assert!(
            stamps.windows(2).all(|w| w[0] < w[1]),
            "{wal:?}: {stamps:?}"
        );
        assert_eq!(
            global_version(&path) as u64,
            stamps[3],
            "{wal:?}: the version is the last committed write's"
        );
        assert!(stamps[0] > before as u64);
        let entries = Reader::open(&path)
            .unwrap()
            .read_keys(
                &[
                    Bytes::from_static(b"a"),
                    Bytes::from_static(b"b"),
                    Bytes::from_static(b"text"),
                    Bytes::from_static(b"before"),
                    Bytes::from_static(b"after"),
                    Bytes::from_static(b"counter"),
                    Bytes::from_static(b"last"),
                ],
                crate::kv::now_ms(),
            )
            .unwrap();
        assert!(
            entries[0].is_none(),
            "{wal:?}: the failed write's first set"
        );
        assert!(entries[1].is_none(), "{wal:?}");
        assert_eq!(
            entries[2].as_ref().unwrap().value,
            bytes_value("not a number")
        );
        for (i, e) in entries[3..].iter().enumerate() {
            assert!(
                e.is_some(),
                "{wal:?}: a neighbour of the failed write ({i})"
            );
        }
        assert_eq!(entries[5].as_ref().unwrap().value.as_u64(), Some(1));
    }
}

#[tokio::test]
async fn checks_report_every_failing_index_and_do_not_advance_the_version() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let v1 = committed(
            s.committer
                .write(write(vec![set("a", "1"), set("b", "1")]))
                .await,
        );
        let check = |k: &str, v: Option<Versionstamp>| Check {
            key: Bytes::copy_from_slice(k.as_bytes()),
            versionstamp: v,
        };
        let w = AtomicWrite {
            checks: vec![
                check("a", Some(v1)),                      // holds
                check("b", None),                          // fails: b exists
                check("c", None),                          // holds
                check("a", Some(Versionstamp::new(1, 7))), // fails
            ],
            mutations: vec![set("a", "2")],
            ..Default::default()
        };
        let before = global_version(&s.path);
        assert_eq!(before as u64, v1.version());
        assert_eq!(
            s.committer.write(w).await.unwrap(),
            WriteOutcome::ChecksFailed(vec![1, 3])
        );
        assert_eq!(s.get(b"a").unwrap().value, bytes_value("1"));
        assert_eq!(
            global_version(&s.path),
            before,
            "the failed write advanced the global version"
        );
        s.stop();
    }
}

#[tokio::test]
async fn mutations_see_earlier_mutations_of_the_same_write() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let sum = |n| Mutation {
            key: Bytes::from_static(b"n"),
            kind: MutationKind::Le64(Le64Op::Sum, n),
            expire_at_ms: None,
        };
        let set_n = Mutation {
            key: Bytes::from_static(b"n"),
            kind: MutationKind::Set(Value::le64(1)),
            expire_at_ms: None,
        };
        committed(s.committer.write(write(vec![set_n, sum(2), sum(3)])).await);
        assert_eq!(s.get(b"n").unwrap().value.as_u64(), Some(6));
        s.stop();
    }
}

#[tokio::test]
async fn suffix_versionstamped_key_is_written_at_prefix_plus_stamp() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let m = Mutation {
            key: Bytes::from_static(b"\x02jobs\x00"),
            kind: MutationKind::SetSuffixVersionstamped(bytes_value("job")),
            expire_at_ms: None,
        };
        let stamp = committed(s.committer.write(write(vec![m])).await);
        let mut key = b"\x02jobs\x00".to_vec();
        key.extend_from_slice(&stamp.key_suffix());
        assert_eq!(s.get(&key).unwrap().versionstamp, stamp);
        s.stop();
    }
}

#[tokio::test]
async fn expired_rows_are_invisible_and_swept() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let now = crate::kv::now_ms();
        let mut m = set("soon", "x");
        m.expire_at_ms = Some(now + 300);
        let mut later = set("later", "x");
        later.expire_at_ms = Some(now + 3_600_000);
        committed(s.committer.write(write(vec![m, later])).await);
        assert!(s.get(b"soon").is_some());
        let range = ReadRange {
            start: Bytes::new(),
            end: Bytes::from_static(b"\xff"),
            limit: 10,
            reverse: false,
        };
        // Expired rows are hidden at read time, before the sweep runs...
        let entries = s
            .reader()
            .read_ranges(std::slice::from_ref(&range), now + 301)
            .unwrap();
        assert_eq!(entries[0].len(), 1);
        assert_eq!(&entries[0][0].key[..], b"later");
        // ...and a "must be absent" check passes on an expired row.
        let watch = s.watches.subscribe(&[Bytes::from_static(b"soon")]);
        // The sweep deletes the row shortly after its expiry and wakes its watchers. (A wake-up may
        // also come from the commit above, which notifies after answering.)
        let conn = rusqlite::Connection::open(&s.path).unwrap();
        let rows = || -> i64 {
            conn.query_row("SELECT count(*) FROM kv WHERE k = x'736f6f6e'", [], |r| {
                r.get(0)
            })
            .unwrap()
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while rows() > 0 {
                watch.changed().await;
            }
        })
        .await
        .expect("the sweep deleted the expired row and woke the watcher");
        s.stop();
    }
}

#[tokio::test]
async fn absent_check_passes_on_an_expired_row() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let mut m = set("k", "x");
        m.expire_at_ms = Some(crate::kv::now_ms() - 1000);
        committed(s.committer.write(write(vec![m])).await);
        let w = AtomicWrite {
            checks: vec![Check {
                key: Bytes::from_static(b"k"),
                versionstamp: None,
            }],
            mutations: vec![set("k", "y")],
            ..Default::default()
        };
        committed(s.committer.write(w).await);
        assert_eq!(s.get(b"k").unwrap().value, bytes_value("y"));
        s.stop();
    }
}

#[tokio::test]
async fn watchers_are_woken_by_commits_of_their_keys_only() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let watch = s.watches.subscribe(&[Bytes::from_static(b"w")]);
        committed(s.committer.write(write(vec![set("other", "x")])).await);
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(100), watch.changed()).await;
        assert!(quiet.is_err(), "an unrelated key woke the watcher");
        committed(s.committer.write(write(vec![set("w", "x")])).await);
        tokio::time::timeout(std::time::Duration::from_secs(1), watch.changed())
            .await
            .expect("woken");
        s.stop();
    }
}

#[tokio::test]
async fn enqueues_are_stored_like_upstream() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let e = Enqueue {
            payload: Bytes::from_static(b"\xff\x0f\x49\x02"),
            deadline_ms: 1000,
            keys_if_undelivered: vec![Bytes::from_static(b"\x02a\x00")],
            backoff_schedule: vec![],
        };
        committed(
            s.committer
                .write(AtomicWrite {
                    enqueues: vec![e],
                    ..Default::default()
                })
                .await,
        );
        let conn = rusqlite::Connection::open(&s.path).unwrap();
        let (ts, id, backoff, dead): (i64, String, String, String) = conn
            .query_row(
                "SELECT ts, id, backoff_schedule, keys_if_undelivered FROM queue",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap();
        assert_eq!(ts, 1000);
        assert!(uuid::Uuid::parse_str(&id).is_ok());
        assert_eq!(backoff, "[100,1000,5000,30000,60000]");
        assert_eq!(dead, "[[2,97,0]]");
        s.stop();
    }
}

#[tokio::test]
async fn reads_honour_bounds_reverse_and_limits() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        committed(
            s.committer
                .write(write((0..10).map(|i| set(&format!("k{i}"), "v")).collect()))
                .await,
        );
        let mut r = s.reader();
        let range = |start: &str, end: &str, limit, reverse| ReadRange {
            start: Bytes::copy_from_slice(start.as_bytes()),
            end: Bytes::copy_from_slice(end.as_bytes()),
            limit,
            reverse,
        };
        let keys = |rs: Vec<Vec<Entry>>| -> Vec<Vec<String>> {
            rs.into_iter()
                .map(|es| {
                    es.into_iter()
                        .map(|e| String::from_utf8(e.key.to_vec()).unwrap())
                        .collect()
                })
                .collect()
        };
        let now = crate::kv::now_ms();
        let got = keys(
            r.read_ranges(
                &[
                    range("k2", "k5", 10, false),
                    range("k2", "k5", 2, true),
                    range("k5", "k2", 5, false),
                ],
                now,
            )
            .unwrap(),
        );
        assert_eq!(got, vec![vec!["k2", "k3", "k4"], vec!["k4", "k3"], vec![]]);
        s.stop();
    }
}

#[tokio::test]
async fn commits_by_another_process_wake_watchers() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let watch = s.watches.subscribe(&[Bytes::from_static(b"ext")]);
        // Some other writer of the same file, as the Deno CLI would be: it advances the version.
        let other = rusqlite::Connection::open(&s.path).unwrap();
        other
            .execute_batch(
                "BEGIN IMMEDIATE;
             UPDATE data_version SET version = version + 1000 WHERE k = 0;
             INSERT INTO kv (k, v, v_encoding, version)
               VALUES (x'657874', x'01', 3, (SELECT version FROM data_version WHERE k = 0));
             COMMIT;",
            )
            .unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(3), watch.changed())
            .await
            .expect("the watcher was woken by another connection's commit");
        s.stop();
    }
}

#[tokio::test]
async fn suffix_versionstamped_writes_notify_the_written_key() {
    // SPEC §10 D8c: upstream notifies the prefix instead of the key it wrote.
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        let before = committed(s.committer.write(AtomicWrite::default()).await).version();
        let prefix = Bytes::from_static(b"\x02jobs\x00");
        // The next commit's version is one of the nine that follow: watch all their keys.
        let candidates: Vec<Bytes> = (1..=9)
            .map(|i| {
                let mut k = prefix.to_vec();
                k.extend_from_slice(&Versionstamp::new(before + i, 0).key_suffix());
                Bytes::from(k)
            })
            .collect();
        let written = s.watches.subscribe(&candidates);
        let at_prefix = s.watches.subscribe(std::slice::from_ref(&prefix));
        let m = Mutation {
            key: prefix.clone(),
            kind: MutationKind::SetSuffixVersionstamped(bytes_value("job")),
            expire_at_ms: None,
        };
        committed(s.committer.write(write(vec![m])).await);
        tokio::time::timeout(std::time::Duration::from_secs(1), written.changed())
            .await
            .expect("the written key's watcher was woken");
        let quiet =
            tokio::time::timeout(std::time::Duration::from_millis(100), at_prefix.changed()).await;
        assert!(
            quiet.is_err(),
            "the prefix was not written and must not be notified"
        );
        s.stop();
    }
}

/// A store on a file synced at every commit, with the committer driven on this thread (so
/// that the WAL faults injected on this thread hit its commits).
fn direct(path: &std::path::Path, wal: WalWrites) -> committer::DirectCommitter {
    let conn = schema::open_writer(path, SyncMode::Full, wal).unwrap();
    committer::DirectCommitter::new(conn).unwrap()
}

/// `keys` as a server would read them after a crash of this process: from a copy of the
/// database and its WAL (the live connection still holds them; closing it would checkpoint).
fn read_after_crash(path: &std::path::Path, keys: &[&str]) -> Vec<Option<Entry>> {
    let crashed = tempfile::tempdir().unwrap();
    let copy = crashed.path().join("db.sqlite");
    std::fs::copy(path, &copy).unwrap();
    std::fs::copy(
        path.with_file_name("db.sqlite-wal"),
        crashed.path().join("db.sqlite-wal"),
    )
    .expect("the WAL is still there");
    let keys: Vec<Bytes> = keys
        .iter()
        .map(|k| Bytes::copy_from_slice(k.as_bytes()))
        .collect();
    Reader::open(&copy)
        .unwrap()
        .read_keys(&keys, crate::kv::now_ms())
        .unwrap()
}

fn global_version(path: &std::path::Path) -> i64 {
    rusqlite::Connection::open(path)
        .unwrap()
        .query_row("SELECT version FROM data_version WHERE k = 0", [], |r| {
            r.get(0)
        })
        .unwrap()
}

fn sum(key: &str, n: u64) -> Mutation {
    Mutation {
        key: Bytes::copy_from_slice(key.as_bytes()),
        kind: MutationKind::Le64(Le64Op::Sum, n),
        expire_at_ms: None,
    }
}

/// A batch of three: a sum, a write whose check fails, a set.
fn mixed_batch() -> Vec<AtomicWrite> {
    let failing_check = AtomicWrite {
        checks: vec![Check {
            key: Bytes::from_static(b"counter"),
            versionstamp: None,
        }],
        mutations: vec![set("never", "x")],
        ..Default::default()
    };
    vec![
        write(vec![sum("counter", 1)]),
        failing_check,
        write(vec![set("k", "v")]),
    ]
}

#[test]
fn a_failed_sync_at_commit_is_never_answered_as_not_committed() {
    for wal in [WalWrites::Pwrite, WalWrites::IoUring] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let mut c = direct(&path, wal);
        let (ok, fatal) = c.commit_checked(&[write(vec![sum("counter", 1)])]);
        assert!(fatal.is_none());
        committed(ok.into_iter().next().unwrap());

        wal_vfs::inject_faults(Some("sync:EIO:times=1".parse().unwrap()));
        let (answers, fatal) = c.commit_checked(&mixed_batch());
        wal_vfs::inject_faults(None);
        let fatal = fatal.expect("an fsync failure at COMMIT stops the server");
        assert_eq!(fatal.phase, crate::metrics::CommitPhase::WalSync, "{wal:?}");
        // The writes that would have applied: unknown. The one that changed nothing: retry.
        assert!(
            matches!(answers[0], Err(StoreError::OutcomeUnknown)),
            "{answers:?}"
        );
        assert!(
            matches!(answers[1], Err(StoreError::Unavailable)),
            "{answers:?}"
        );
        assert!(
            matches!(answers[2], Err(StoreError::OutcomeUnknown)),
            "{answers:?}"
        );
        // Why "not committed" would have been a lie: the injected failure came after a real
        // sync, and the commit comes back when the files are opened after a crash (a copy of
        // them, as the process is still alive; dropping `c` would close the connection, and
        // the last connection to close checkpoints and deletes the WAL).
        let entries = read_after_crash(&path, &["counter", "k"]);
        assert_eq!(
            entries[0].as_ref().unwrap().value.as_u64(),
            Some(2),
            "{wal:?}"
        );
        assert!(entries[1].is_some());
    }
}

/// With io_uring WAL writes, every commit after the first (which syncs through SQLite, and the
/// directory with it) is synced by the fdatasync in its io_uring submission.
#[test]
fn every_io_uring_commit_carries_its_fdatasync() {
    for (wal, per_commit) in [(WalWrites::Pwrite, 0), (WalWrites::IoUring, 1)] {
        let dir = tempfile::tempdir().unwrap();
        let mut c = direct(&dir.path().join("db.sqlite"), wal);
        committed(c.commit(&[write(vec![set("first", "1")])]).remove(0));
        let before = wal_vfs::uring_syncs_on_this_thread();
        for i in 0..5 {
            committed(c.commit(&mixed_batch()).remove(0));
            assert_eq!(
                wal_vfs::uring_syncs_on_this_thread(),
                before + per_commit * (i + 1),
                "{wal:?}: commit {i}"
            );
        }
    }
}

#[test]
fn a_failed_wal_write_at_commit_is_rolled_back_and_writes_resume() {
    for (wal, errno, expect_full) in [
        (WalWrites::Pwrite, "EIO", false),
        (WalWrites::Pwrite, "ENOSPC", true),
        (WalWrites::IoUring, "ENOSPC", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let metrics = Arc::new(crate::metrics::Metrics::new());
        let conn = schema::open_writer(&path, SyncMode::Full, wal).unwrap();
        let mut c = committer::DirectCommitter::with_metrics(conn, metrics.clone()).unwrap();
        committed(c.commit(&[write(vec![sum("counter", 1)])]).remove(0));
        let before = global_version(&path);

        wal_vfs::inject_faults(Some(format!("write:{errno}").parse().unwrap()));
        let (answers, fatal) = c.commit_checked(&mixed_batch());
        wal_vfs::inject_faults(None);
        assert!(
            fatal.is_none(),
            "{wal:?} {errno}: a failed write is clean: {fatal:?}"
        );
        for a in &answers {
            match a {
                Err(StoreError::DiskFull) => assert!(expect_full, "{wal:?} {errno}"),
                Err(StoreError::Unavailable) => assert!(!expect_full, "{wal:?} {errno}"),
                other => panic!("{wal:?} {errno}: {other:?}"),
            }
        }
        assert_eq!(global_version(&path), before, "the version did not move");
        let phase = crate::metrics::CommitPhase::WalWrite;
        assert_eq!(metrics.commit_failures(phase).get(), 1);

        // The same writes go through once the disk works again.
        let answers = c.commit(&mixed_batch());
        committed(answers.into_iter().next().unwrap());
        let entries = Reader::open(&path)
            .unwrap()
            .read_keys(&[Bytes::from_static(b"counter")], crate::kv::now_ms())
            .unwrap();
        assert_eq!(
            entries[0].as_ref().unwrap().value.as_u64(),
            Some(2),
            "{wal:?} {errno}: the failed increment left no trace"
        );
    }
}

#[test]
fn batches_are_bounded_by_bytes_as_well_as_count() {
    let big = |i: usize| {
        let mut m = set(&format!("k{i}"), "");
        if let MutationKind::Set(v) = &mut m.kind {
            v.data = Bytes::from(vec![b'x'; 60_000]);
        }
        write(vec![m])
    };
    assert_eq!(big(0).size_bytes(), 60_002);
    let sizes = committer::batch_sizes((0..1000).map(big));
    assert!(sizes.iter().all(|&n| n <= 512));
    // 16 MiB of 60 kB writes: 280 a batch (the write that crosses the bound is the last).
    assert_eq!(sizes[0], 280, "{sizes:?}");
    assert_eq!(sizes.iter().sum::<usize>(), 1000);
    let small = committer::batch_sizes((0..1000).map(|i| write(vec![set(&format!("k{i}"), "v")])));
    assert_eq!(small, vec![512, 488]);
}

/// Backup on, the threaded committer under concurrent writers (batches of varying size):
/// every committed write is in the outbox once, in commit order, the versions chained
/// without a gap; a write whose check failed is not.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_backup_every_committed_write_reaches_the_outbox_once_in_order() {
    for wal in WAL_WRITES {
        let s = TestStore::with_backup(wal, BackupOutbox::enabled());
        let mut tasks = Vec::new();
        for i in 0..300 {
            let c = s.committer.clone();
            tasks.push(tokio::spawn(async move {
                let mut w = write(vec![set(&format!("k{i}"), "v"), sum("n", 1)]);
                if i % 10 == 0 {
                    // Fails: "n" exists once the first sum committed (and if not, commits).
                    w.checks.push(Check {
                        key: Bytes::from_static(b"n"),
                        versionstamp: None,
                    });
                }
                c.write(w).await.unwrap()
            }));
        }
        let mut versions = Vec::new();
        for t in tasks {
            if let WriteOutcome::Committed(v) = t.await.unwrap() {
                versions.push(v.version());
            }
        }
        versions.sort();
        assert!(versions.len() >= 270, "{}", versions.len());
        // Every write is answered: the committer is idle (the drain runs beside it, as the
        // backup thread will).
        let reader = outbox::OutboxReader::open(&s.path).unwrap();
        let mut logged = Vec::new();
        let mut prev = 0;
        while let Some(d) = reader.drain(64, 1 << 20).unwrap() {
            assert_eq!(d.prev_version, prev, "{wal:?}: no gap");
            for pair in d.range.entries.chunks(2) {
                let v = u64::from_be_bytes(pair[0].versionstamp[..8].try_into().unwrap());
                assert_eq!(&pair[1].versionstamp[..8], &v.to_be_bytes());
                assert_eq!(&pair[1].versionstamp[8..], &[0, 0, 0xff, 0xff]);
                logged.push(v);
            }
            prev = d.position.0;
            reader.acknowledge(d.position).unwrap();
        }
        assert_eq!(logged, versions, "{wal:?}");
        drop(reader);
        s.stop();
    }
}

/// A threaded committer recording into its own metrics.
fn spawn_counted(
    path: &std::path::Path,
    wal: WalWrites,
) -> (
    CommitterHandle,
    std::thread::JoinHandle<()>,
    Arc<crate::metrics::Metrics>,
) {
    let conn = schema::open_writer(path, SyncMode::Full, wal).unwrap();
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (handle, thread) = committer::spawn_with_heartbeat(
        conn,
        Arc::new(WatchRegistry::default()),
        None,
        metrics.clone(),
        BackupOutbox::disabled(),
    )
    .unwrap();
    (handle, thread, metrics)
}

/// Sends `w` once the committer's thread waits for writes, so that it is committed inline.
async fn write_when_idle(c: &CommitterHandle, w: AtomicWrite) -> Result<WriteOutcome, StoreError> {
    c.wait_idle();
    c.write_traced(w, None, Inline::WhenIdle).await.0
}

// The test's thread is its runtime's only thread: a fault plan set on it reaches a write
// committed inline, and only such a write.
#[tokio::test]
async fn a_write_alone_is_committed_on_the_calling_thread_when_the_committer_is_idle() {
    for wal in WAL_WRITES {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let (c, thread, metrics) = spawn_counted(&path, wal);
        let outcome = write_when_idle(&c, write(vec![set("a", "1")])).await;
        committed(outcome);
        assert_eq!(metrics.inline_commits.get(), 1, "{wal:?}");
        committed(c.write(write(vec![set("b", "1")])).await);
        assert_eq!(
            metrics.inline_commits.get(),
            1,
            "{wal:?}: Never goes to the thread"
        );
        assert_eq!(metrics.writes_committed.get(), 2, "{wal:?}");

        // A full disk on this thread only: the inline write meets it (and is rolled back,
        // as on the committer's thread); the same write sent to the committer does not.
        wal_vfs::inject_faults(Some("write:ENOSPC".parse().unwrap()));
        let outcome = write_when_idle(&c, write(vec![set("c", "1")])).await;
        let handed = c.write(write(vec![set("c", "1")])).await;
        wal_vfs::inject_faults(None);
        assert!(
            matches!(outcome, Err(StoreError::DiskFull)),
            "{wal:?}: {outcome:?}"
        );
        committed(handed);
        // The committer goes on after a clean failure, inline or not.
        let outcome = write_when_idle(&c, write(vec![set("d", "1")])).await;
        committed(outcome);
        assert_eq!(metrics.inline_commits.get(), 3, "{wal:?}");
        drop(c);
        thread.join().unwrap();
    }
}

#[tokio::test]
async fn an_ambiguous_inline_commit_stops_the_committer_and_nothing_commits_after_it() {
    for wal in WAL_WRITES {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let (c, thread, metrics) = spawn_counted(&path, wal);
        committed(c.write(write(vec![sum("counter", 1)])).await);
        // The commit pokes the checkpointer, which copies the whole WAL and then pauses. A
        // commit after a complete copy rewinds the WAL and syncs its new header first: the
        // fault would hit that sync, before any frame is written. So: let the checkpointer
        // finish, rewind with a commit of the committer's thread, and fail the next commit's
        // sync while the checkpointer pauses.
        std::thread::sleep(std::time::Duration::from_millis(50));
        committed(c.write(write(vec![sum("counter", 1)])).await);

        wal_vfs::inject_faults(Some("sync:EIO:times=1".parse().unwrap()));
        let outcome = write_when_idle(&c, write(vec![sum("counter", 1)])).await;
        wal_vfs::inject_faults(None);
        assert!(
            matches!(outcome, Err(StoreError::OutcomeUnknown)),
            "{wal:?}: {outcome:?}"
        );
        assert!(
            crate::fatal::reason().is_some(),
            "the server is told to stop"
        );
        // Neither the committer's thread nor this one commits anything more.
        let handed = c.write(write(vec![set("later", "x")])).await;
        assert!(
            matches!(handed, Err(StoreError::Unavailable)),
            "{wal:?}: {handed:?}"
        );
        let (inline, _) = c
            .write_traced(write(vec![set("later", "x")]), None, Inline::WhenIdle)
            .await;
        assert!(
            matches!(inline, Err(StoreError::Unavailable)),
            "{wal:?}: {inline:?}"
        );
        assert_eq!(metrics.inline_commits.get(), 1, "{wal:?}");
        thread.join().unwrap();
        drop(c);
        // The connection was never closed (closing would checkpoint and delete the WAL), and
        // the commit whose sync "failed" comes back when the files are opened after a crash.
        let entries = read_after_crash(&path, &["counter", "later"]);
        assert_eq!(
            entries[0].as_ref().unwrap().value.as_u64(),
            Some(3),
            "{wal:?}"
        );
        assert!(entries[1].is_none(), "{wal:?}");
    }
}

/// A reader that shares its snapshot (as each core's does) still answers every read with
/// every write acknowledged before it: each commit counts a change before its writer hears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shared_read_snapshot_sees_every_write_acknowledged_before_the_read() {
    for wal in WAL_WRITES {
        let s = TestStore::new(wal);
        // Held "for ever" unless a change is counted: only the count can end it here.
        let mut reader = s
            .reader()
            .share_snapshots(s.watches.clone(), std::time::Duration::from_secs(3600));
        let key = Bytes::from_static(b"k");
        for i in 0..50 {
            let value = format!("v{i}");
            let w = write(vec![set("k", &value)]);
            // Both ways a write commits: queued to the committer's thread, or on this thread.
            let stamp = if i % 2 == 0 {
                committed(s.committer.write(w).await)
            } else {
                committed(write_when_idle(&s.committer, w).await)
            };
            let got = reader
                .read_keys(std::slice::from_ref(&key), crate::kv::now_ms())
                .unwrap();
            let got = got[0].as_ref().expect("the acknowledged write is seen");
            assert_eq!(
                (&got.value.data[..], got.versionstamp),
                (value.as_bytes(), stamp)
            );
            assert!(reader.holds_snapshot());
        }
        s.stop();
    }
}

/// The snapshot is shared while nothing is counted as changed and it is younger than its
/// hold, and not after: `release` or a counted change ends it.
#[tokio::test]
async fn a_shared_read_snapshot_lasts_until_a_change_is_counted_or_its_hold_ends() {
    let s = TestStore::new(WalWrites::Pwrite);
    let read = |reader: &mut Reader| {
        let got = reader
            .read_keys(&[Bytes::from_static(b"k")], crate::kv::now_ms())
            .unwrap();
        got[0].as_ref().map(|e| e.value.data.clone())
    };
    // A count of its own, which the store's commits do not move: as if they were another
    // process's that nobody has noticed yet.
    let unseen = Arc::new(WatchRegistry::default());
    let mut reader = s
        .reader()
        .share_snapshots(unseen.clone(), std::time::Duration::from_secs(3600));
    assert_eq!(read(&mut reader), None);
    committed(s.committer.write(write(vec![set("k", "1")])).await);
    assert_eq!(read(&mut reader), None, "the snapshot is shared");
    unseen.notify_all();
    assert_eq!(
        read(&mut reader).as_deref(),
        Some(&b"1"[..]),
        "a change ends it"
    );

    committed(s.committer.write(write(vec![set("k", "2")])).await);
    assert_eq!(read(&mut reader).as_deref(), Some(&b"1"[..]));
    reader.release();
    assert!(!reader.holds_snapshot());
    assert_eq!(
        read(&mut reader).as_deref(),
        Some(&b"2"[..]),
        "release ends it"
    );

    let hold = std::time::Duration::from_millis(200);
    let mut reader = s.reader().share_snapshots(unseen, hold);
    assert_eq!(read(&mut reader).as_deref(), Some(&b"2"[..]));
    committed(s.committer.write(write(vec![set("k", "3")])).await);
    std::thread::sleep(hold);
    assert_eq!(
        read(&mut reader).as_deref(),
        Some(&b"3"[..]),
        "so does its age"
    );
    s.stop();
}

/// Writes of scattered keys from many writers at once, with reads going on, for as long as
/// it takes to rewind a small WAL bound many times over: the WAL file stays near the bound
/// instead of growing with what was written (SQLite rewinds a WAL only once all of it was
/// copied, which a checkpoint racing the writers never achieves on its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sustained_scattered_writes_keep_the_wal_file_bounded() {
    // 1 MiB of 4 KiB pages, checkpointed often enough that the interval adds little.
    const BOUND: checkpointer::WalBound = checkpointer::WalBound {
        restart_frames: 256,
        interval: std::time::Duration::from_millis(10),
    };
    const WRITERS: usize = 32;
    const WRITES_EACH: usize = 250;
    for wal in WAL_WRITES {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = schema::open_writer(&path, SyncMode::Full, wal).unwrap();
        let watches = Arc::new(WatchRegistry::default());
        let (committer, thread) = committer::spawn_bounded(
            conn,
            watches.clone(),
            None,
            Arc::new(crate::metrics::Metrics::new()),
            BackupOutbox::disabled(),
            BOUND,
        )
        .unwrap();
        let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let wal_path = dir.path().join("db.sqlite-wal");
        let sampler = {
            let done = done.clone();
            std::thread::spawn(move || {
                let mut largest = 0;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let len = std::fs::metadata(&wal_path).map(|m| m.len()).unwrap_or(0);
                    largest = largest.max(len);
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                largest
            })
        };
        // Reads as a core makes them, sharing snapshots.
        let reads = {
            let done = done.clone();
            let mut reader = Reader::open(&path)
                .unwrap()
                .share_snapshots(watches.clone(), SNAPSHOT_HOLD);
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !done.load(std::sync::atomic::Ordering::Relaxed) {
                    let key = Bytes::from(format!("{:016x}", scatter(n)));
                    reader.read_keys(&[key], crate::kv::now_ms()).unwrap();
                    n += 1;
                }
            })
        };
        let value = "v".repeat(2000);
        let mut tasks = Vec::new();
        for w in 0..WRITERS {
            let c = committer.clone();
            let value = value.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..WRITES_EACH {
                    let key = format!("{:016x}", scatter((w * WRITES_EACH + i) as u64));
                    committed(c.write(write(vec![set(&key, &value)])).await);
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        let largest = sampler.join().unwrap();
        reads.join().unwrap();
        drop(committer);
        thread.join().unwrap();
        // Every write's value alone is half a page: the WAL received at least 4,000 pages
        // (16 MiB; about 120 MiB in fact). Between two rewinds it holds the bound and what
        // arrives in one checkpoint interval and its catch-up passes: 4–7 MiB seen here, and
        // 70 MiB when this thread's RESTART, not the committer, rewound the WAL.
        let written = (WRITERS * WRITES_EACH * 4096 / 2) as u64;
        eprintln!("{wal:?}: largest WAL file {largest} bytes; at least {written} written");
        assert!(
            largest < 16 << 20,
            "{wal:?}: the WAL file reached {largest} bytes; the writes put {written} or more in it"
        );
    }
}

/// Spreads consecutive numbers over the key space (a bijection on u64).
fn scatter(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17)
}

/// An inline commit that sets no expiry leaves the committer's thread asleep: waking it costs
/// the writer a futex call, and the thread may then take the lock from under its next write
/// (which then waits for the hand-over).
#[tokio::test]
async fn an_inline_commit_without_an_expiry_leaves_the_committer_thread_asleep() {
    let dir = tempfile::tempdir().unwrap();
    let (c, thread, metrics) = spawn_counted(&dir.path().join("db.sqlite"), WalWrites::Pwrite);
    // Once the thread has started (its first sweep takes the lock).
    committed(c.write(write(vec![set("first", "v")])).await);
    for i in 0..20 {
        committed(write_when_idle(&c, write(vec![set(&format!("k{i}"), "v")])).await);
        // A message for the thread would still be queued: it takes a while to wake.
        assert_eq!(c.queue_depth(), 0, "commit {i} woke the committer's thread");
    }
    assert_eq!(metrics.inline_commits.get(), 20);
    drop(c);
    thread.join().unwrap();
}
