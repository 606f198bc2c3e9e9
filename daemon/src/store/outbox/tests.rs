//! Outbox tests: what each commit leaves for the backup, and that rolled-back or failed
//! commits leave nothing, and the hand-over across a crash.

use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::*;
use crate::backup_proto::BackupKvMutationKind as Kind;
use crate::kv::model::*;
use crate::kv::value::{Encoding, Le64Op};
use crate::store::committer::DirectCommitter;
use crate::store::{schema, wal_vfs, Reader, StoreError, SyncMode, WalWrites};

fn key(k: &str) -> Bytes {
    Bytes::copy_from_slice(k.as_bytes())
}

fn mutation(k: &str, kind: MutationKind) -> Mutation {
    Mutation {
        key: key(k),
        kind,
        expire_at_ms: None,
    }
}

fn set(k: &str, v: &str) -> Mutation {
    mutation(
        k,
        MutationKind::Set(Value {
            data: key(v),
            encoding: Encoding::Bytes,
        }),
    )
}

fn le64(k: &str, op: Le64Op, n: u64) -> Mutation {
    mutation(k, MutationKind::Le64(op, n))
}

fn write(mutations: Vec<Mutation>) -> AtomicWrite {
    AtomicWrite {
        mutations,
        ..Default::default()
    }
}

fn version_of(o: &Result<WriteOutcome, StoreError>) -> u64 {
    match o {
        Ok(WriteOutcome::Committed(v)) => v.version(),
        other => panic!("expected a commit, got {other:?}"),
    }
}

fn direct(path: &Path, backup: BackupOutbox) -> DirectCommitter {
    let conn = schema::open_writer(path, SyncMode::Full, WalWrites::Pwrite).unwrap();
    DirectCommitter::with_backup(conn, backup).unwrap()
}

fn db() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("db.sqlite");
    (dir, path)
}

/// Everything pending, one range per row (transaction): (version, entries).
fn all_commits(reader: &OutboxReader) -> Vec<(u64, Vec<BackupReplicationLogEntry>)> {
    let mut out = Vec::new();
    let mut last = None;
    while let Some(d) = reader.drain(1, usize::MAX).unwrap() {
        assert_eq!(d.commits, 1);
        assert!(last < Some(d.position), "{last:?} then {:?}", d.position);
        last = Some(d.position);
        out.push((d.position.0, d.range.entries));
        reader.acknowledge(d.position).unwrap();
    }
    out
}

fn stamp(version: u64, index: u16) -> Bytes {
    let mut s = version.to_be_bytes().to_vec();
    s.extend_from_slice(&[0, 0]);
    s.extend_from_slice(&index.to_be_bytes());
    Bytes::from(s)
}

fn entry(
    version: u64,
    index: u16,
    kind: Kind,
    k: &[u8],
    v: &[u8],
    enc: i32,
    exp: u64,
) -> BackupReplicationLogEntry {
    BackupReplicationLogEntry {
        versionstamp: stamp(version, index),
        kind: kind as i32,
        key: Bytes::copy_from_slice(k),
        value: Bytes::copy_from_slice(v),
        value_encoding: enc,
        expire_at_ms: exp,
    }
}

/// Each kind of mutation is logged with its final key and resulting value; indexes count up
/// within the commit and its last entry is the boundary `ffff`; the sweep logs clears.
#[test]
fn each_mutation_is_logged_as_the_reader_must_apply_it() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let first = c.commit(&[write(vec![
        set("gone", "x"),
        le64("n", Le64Op::Sum, 5),
        le64("lo", Le64Op::Min, 7),
        le64("hi", Le64Op::Max, 7),
    ])]);
    let v1 = version_of(&first[0]);
    let mut expiring = set("e", "soon");
    expiring.expire_at_ms = Some(4_000_000_000_000);
    let mut expired = set("old", "o");
    expired.expire_at_ms = Some(1);
    let second = c.commit(&[write(vec![
        expiring,
        mutation("gone", MutationKind::Delete),
        le64("n", Le64Op::Sum, 2),
        le64("lo", Le64Op::Min, 3),
        le64("hi", Le64Op::Max, 3),
        mutation("vs", MutationKind::SetSuffixVersionstamped(Value::le64(1))),
        expired,
    ])]);
    let v2 = version_of(&second[0]);
    c.sweep().unwrap();

    let reader = OutboxReader::open(&path).unwrap();
    let commits = all_commits(&reader);
    assert_eq!(commits.len(), 3, "two writes and one sweep");
    assert_eq!(commits[0].0, v1);
    let le = |n: u64| n.to_le_bytes();
    let (b, l) = (Encoding::Bytes as i32, Encoding::Le64 as i32);
    assert_eq!(
        commits[0].1,
        vec![
            entry(v1, 0, Kind::MkSet, b"gone", b"x", b, 0),
            entry(v1, 1, Kind::MkSet, b"n", &le(5), l, 0),
            entry(v1, 2, Kind::MkSet, b"lo", &le(7), l, 0),
            entry(v1, 0xffff, Kind::MkSet, b"hi", &le(7), l, 0),
        ]
    );
    let mut vs_key = b"vs".to_vec();
    vs_key.extend_from_slice(&crate::kv::versionstamp::Versionstamp::new(v2, 0).key_suffix());
    assert_eq!(commits[1].0, v2);
    assert_eq!(
        commits[1].1,
        vec![
            entry(v2, 0, Kind::MkSet, b"e", b"soon", b, 4_000_000_000_000),
            entry(v2, 1, Kind::MkClear, b"gone", b"", 0, 0),
            // The results, not the operands: 5 + 2, min(7, 3), max(7, 3).
            entry(v2, 2, Kind::MkSet, b"n", &le(7), l, 0),
            entry(v2, 3, Kind::MkSet, b"lo", &le(3), l, 0),
            entry(v2, 4, Kind::MkSet, b"hi", &le(7), l, 0),
            entry(v2, 5, Kind::MkSet, &vs_key, &le(1), l, 0),
            entry(v2, 0xffff, Kind::MkSet, b"old", b"o", b, 1),
        ]
    );
    // The sweep deleted the expired row at the next version.
    assert_eq!(commits[2].0, v2 + 1);
    assert_eq!(
        commits[2].1,
        vec![entry(v2 + 1, 0xffff, Kind::MkClear, b"old", b"", 0, 0)]
    );
    assert_eq!(
        reader.pending().unwrap(),
        Pending {
            commits: 0,
            bytes: 0
        }
    );
}

/// A drained range holds whole rows (a row: one transaction's commits) within its bounds, ends
/// at a boundary, and its `prev_version` chains to the row before it.
#[test]
fn ranges_hold_whole_commits_within_their_bounds() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let start = c.commit(&[write(vec![])]);
    let mut versions = vec![version_of(&start[0])];
    for i in 0..20 {
        let batch: Vec<AtomicWrite> = (0..3)
            .map(|j| write(vec![set(&format!("a{i}.{j}"), "v"), set("b", "w")]))
            .collect();
        versions.extend(c.commit(&batch).iter().map(version_of));
    }
    let reader = OutboxReader::open(&path).unwrap();
    let pending = reader.pending().unwrap();
    assert_eq!(pending.commits, 21, "one row per transaction");

    // The first commit changed no key: a row without entries, to keep the chain whole.
    let d = reader.drain(1, usize::MAX).unwrap().unwrap();
    assert!(d.range.entries.is_empty());
    reader.acknowledge(d.position).unwrap();
    let mut prev = versions[0];
    let mut seen = vec![versions[0]];
    let one_row = reader.drain(1, usize::MAX).unwrap().unwrap().bytes;
    let mut rows = 1;
    for (max_rows, max_bytes) in [(7, usize::MAX), (100, 3 * one_row + 1), (100, 1)] {
        let d = reader.drain(max_rows, max_bytes).unwrap().unwrap();
        let expected = (max_rows).min(max_bytes / one_row).max(1);
        assert_eq!(d.commits, expected, "bounds {max_rows} {max_bytes}");
        rows += d.commits;
        assert!(
            d.bytes <= max_bytes || d.commits == 1,
            "at least one row, else within the bound"
        );
        assert_eq!(d.prev_version, prev, "the range follows the last one");
        assert_eq!(d.range.entries.len(), 6 * d.commits, "three writes a row");
        for pair in d.range.entries.chunks(2) {
            let v = u64::from_be_bytes(pair[0].versionstamp[..8].try_into().unwrap());
            assert_eq!(pair[0].versionstamp, stamp(v, 0));
            assert_eq!(
                pair[1].versionstamp,
                stamp(v, 0xffff),
                "each commit ends at ffff"
            );
            seen.push(v);
        }
        assert_eq!(*seen.last().unwrap(), d.position.0);
        prev = d.position.0;
        reader.acknowledge(d.position).unwrap();
    }
    assert_eq!(
        seen,
        versions[..seen.len()],
        "in commit order, none left out"
    );
    assert_eq!(reader.pending().unwrap().commits, 21 - rows as u64);
}

/// A write rolled back to its savepoint, or whose check failed, leaves no entry; its
/// neighbours in the same batch (one transaction) leave theirs.
#[test]
fn a_failing_write_in_a_shared_batch_leaves_no_entries() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    version_of(&c.commit(&[write(vec![set("text", "not a number")])])[0]);
    let failed_check = AtomicWrite {
        checks: vec![Check {
            key: key("text"),
            versionstamp: None,
        }],
        mutations: vec![set("never", "x")],
        ..Default::default()
    };
    let answers = c.commit(&[
        write(vec![set("before", "1")]),
        write(vec![
            set("a", "x"),
            le64("text", Le64Op::Sum, 1),
            set("b", "y"),
        ]),
        failed_check,
        write(vec![set("after", "1")]),
    ]);
    assert!(matches!(answers[1], Err(StoreError::Invalid(_))));
    assert!(matches!(answers[2], Ok(WriteOutcome::ChecksFailed(_))));
    let reader = OutboxReader::open(&path).unwrap();
    let rows = all_commits(&reader);
    let keys: Vec<Vec<&[u8]>> = rows
        .iter()
        .map(|(_, es)| es.iter().map(|e| &e.key[..]).collect())
        .collect();
    // The batch is one row: the two writes that committed, nothing of the other two.
    assert_eq!(keys, vec![vec![&b"text"[..]], vec![b"before", b"after"]]);
    assert_eq!(rows[1].0, version_of(&answers[3]));
    assert_eq!(
        rows[1].1[0].versionstamp,
        stamp(version_of(&answers[0]), 0xffff)
    );
    assert_eq!(
        rows[1].1[1].versionstamp,
        stamp(version_of(&answers[3]), 0xffff)
    );
}

/// A batch whose COMMIT cannot write the WAL is rolled back with its entries; the next
/// batch's entries follow the last committed one without a gap.
#[test]
fn a_batch_that_fails_to_commit_leaves_no_entries() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let v1 = version_of(&c.commit(&[write(vec![set("k", "1")])])[0]);
    wal_vfs::inject_faults(Some("write:EIO:times=1".parse().unwrap()));
    let (answers, fatal) =
        c.commit_checked(&[write(vec![set("lost", "x")]), write(vec![set("k", "2")])]);
    wal_vfs::inject_faults(None);
    assert!(fatal.is_none(), "{fatal:?}");
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Err(StoreError::Unavailable))),
        "{answers:?}"
    );
    let v2 = version_of(&c.commit(&[write(vec![set("k", "3")])])[0]);

    let reader = OutboxReader::open(&path).unwrap();
    let d = reader.drain(100, usize::MAX).unwrap().unwrap();
    assert_eq!(d.commits, 2, "the failed batch left nothing");
    assert_eq!(d.first_version, v1);
    assert_eq!(d.position, Position(v2));
    let values: Vec<&[u8]> = d.range.entries.iter().map(|e| &e.value[..]).collect();
    assert_eq!(values, [b"1", b"3"]);
}

fn crash_copy(path: &Path) -> (tempfile::TempDir, PathBuf) {
    let (dir, copy) = db();
    std::fs::copy(path, &copy).unwrap();
    let wal = PathBuf::from(format!("{}-wal", path.display()));
    if wal.exists() {
        std::fs::copy(&wal, format!("{}-wal", copy.display())).unwrap();
    }
    (dir, copy)
}

/// The hand-over across a crash: commits, part of them drained and acknowledged, a range
/// drained but not acknowledged, then the files as SIGKILL leaves them (a copy, with the
/// writer still open). From the copy, the rest comes out: the unacknowledged range again,
/// then every later commit, each exactly once, in order, chained without a gap, each with
/// the keys it wrote.
#[test]
fn after_a_crash_every_commit_is_handed_over_once_in_order() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let mut committed: Vec<(u64, Vec<Bytes>)> = Vec::new();
    for i in 0..40 {
        let batch: Vec<AtomicWrite> = (0..5)
            .map(|j| {
                write(vec![
                    set(&format!("k{i}.{j}"), "v"),
                    le64("counter", Le64Op::Sum, 1),
                ])
            })
            .collect();
        for (w, a) in batch.iter().zip(c.commit(&batch)) {
            committed.push((
                version_of(&a),
                w.mutations.iter().map(|m| m.key.clone()).collect(),
            ));
        }
    }
    let reader = OutboxReader::open(&path).unwrap();
    let mut shipped: Vec<(u64, Vec<Bytes>)> = Vec::new();
    let take = |d: &Drained, into: &mut Vec<(u64, Vec<Bytes>)>| {
        for e in &d.range.entries {
            let v = u64::from_be_bytes(e.versionstamp[..8].try_into().unwrap());
            if into.last().map(|l| l.0) != Some(v) {
                into.push((v, Vec::new()));
            }
            into.last_mut().unwrap().1.push(e.key.clone());
        }
    };
    for _ in 0..6 {
        let d = reader.drain(3, usize::MAX).unwrap().unwrap();
        take(&d, &mut shipped);
        reader.acknowledge(d.position).unwrap();
    }
    // Drained (say, uploaded) but the process dies before acknowledging it.
    let unacked = reader.drain(3, usize::MAX).unwrap().unwrap();
    let (_crash, copy) = crash_copy(&path);

    let reader = OutboxReader::open(&copy).unwrap();
    let again = reader.drain(3, usize::MAX).unwrap().unwrap();
    assert_eq!(
        again.range, unacked.range,
        "an unacknowledged range is handed over again"
    );
    let mut last = shipped.last().unwrap().0;
    assert_eq!(
        again.prev_version, last,
        "no gap after the acknowledged part"
    );
    let mut d = Some(again);
    while let Some(range) = d {
        assert_eq!(range.prev_version, last, "ranges chain");
        take(&range, &mut shipped);
        last = range.position.0;
        reader.acknowledge(range.position).unwrap();
        d = reader.drain(3, usize::MAX).unwrap();
    }
    assert_eq!(shipped, committed);
    assert_eq!(reader.pending().unwrap().commits, 0);
}

/// A commit whose WAL sync failed has an unknown outcome, and SQLite's recovery brings it
/// back at the next open: its entries must come back with it (they are in the same
/// transaction), or the backup would miss a commit that the database has.
#[test]
fn a_commit_recovered_after_a_failed_sync_brings_its_entries_back() {
    let (dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let v1 = version_of(&c.commit(&[write(vec![set("k", "1")])])[0]);
    wal_vfs::inject_faults(Some("sync:EIO:times=1".parse().unwrap()));
    let (answers, fatal) = c.commit_checked(&[write(vec![set("k", "2")])]);
    wal_vfs::inject_faults(None);
    assert!(fatal.is_some(), "a failed sync at COMMIT is fatal");
    assert!(
        matches!(answers[0], Err(StoreError::OutcomeUnknown)),
        "{answers:?}"
    );
    // The process would stop here without closing the writer: the files as it leaves them.
    let (_crash, copy) = crash_copy(&path);
    let got = Reader::open(&copy)
        .unwrap()
        .read_keys(&[key("k")], crate::kv::now_ms())
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().value.data, key("2"), "recovered");
    let d = OutboxReader::open(&copy)
        .unwrap()
        .drain(10, usize::MAX)
        .unwrap()
        .unwrap();
    assert_eq!(d.first_version, v1);
    assert_eq!(d.commits, 2, "the recovered commit's entries are there");
    assert_eq!(&d.range.entries[1].value[..], b"2");
    std::mem::forget(c);
    drop(dir);
}

/// A database used with backup still is a Deno KV file: the schema checks pass, migrations
/// are not re-run, the data reads back.
#[test]
fn a_database_with_the_outbox_opens_and_reads_as_before() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    version_of(&c.commit(&[write(vec![set("k", "v")])])[0]);
    drop(c);
    let conn = schema::open_writer(&path, SyncMode::Full, WalWrites::Pwrite).unwrap();
    let version: i64 = conn
        .query_row("SELECT version FROM migration_state WHERE k = 0", [], |r| {
            r.get(0)
        })
        .unwrap();
    assert_eq!(
        version,
        schema::SCHEMA_VERSION,
        "our table is not a migration"
    );
    drop(conn);
    schema::open_reader(&path).unwrap();
    let got = Reader::open(&path)
        .unwrap()
        .read_keys(&[key("k")], crate::kv::now_ms())
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().value.data, key("v"));
    // And reopening with backup on again keeps the pending entries.
    direct(&path, BackupOutbox::enabled());
    assert_eq!(
        OutboxReader::open(&path)
            .unwrap()
            .pending()
            .unwrap()
            .commits,
        1
    );
}

/// Backup off: no table is created and nothing is recorded.
#[test]
fn backup_off_leaves_the_file_as_deno_would() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::disabled());
    version_of(&c.commit(&[write(vec![set("k", "v")])])[0]);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let tables: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        tables,
        [
            "data_version",
            "kv",
            "migration_state",
            "queue",
            "queue_running"
        ]
    );
    let err = OutboxReader::open(&path).err().expect("no outbox");
    assert!(format!("{err:#}").contains("no backup outbox"), "{err:#}");
}

/// A new history (reset) drops what the snapshot covers and counts it as shipped; a periodic
/// snapshot keeps the log going; a paused recorder leaves nothing, and the next recorded
/// commit shows the gap.
#[test]
fn generations_acknowledgements_and_a_paused_recorder() {
    let (_dir, path) = db();
    let outbox = BackupOutbox::enabled();
    let mut c = direct(&path, outbox.clone());
    let v1 = version_of(&c.commit(&[write(vec![set("a", "1")])])[0]);
    let reader = OutboxReader::open(&path).unwrap();
    assert_eq!(reader.state().unwrap(), None);

    let start = reader.start_generation("s3://b/p/", true).unwrap();
    assert_eq!(start, v1);
    let state = reader.state().unwrap().unwrap();
    assert_eq!(
        (
            state.shipped_version,
            state.generation,
            state.generation_done,
            state.reset
        ),
        (v1, v1, false, true)
    );
    assert_eq!(
        reader.pending().unwrap().commits,
        0,
        "covered by the snapshot"
    );

    let v2 = version_of(&c.commit(&[write(vec![set("b", "2")])])[0]);
    reader.finish_generation().unwrap();
    // A periodic generation: nothing dropped, the shipped version unchanged.
    let start2 = reader.start_generation("s3://b/p/", false).unwrap();
    assert_eq!(start2, v2);
    let state = reader.state().unwrap().unwrap();
    assert_eq!((state.shipped_version, state.reset), (v1, false));
    let d = reader.drain(10, usize::MAX).unwrap().unwrap();
    assert_eq!((d.prev_version, d.position), (v1, Position(v2)));
    reader.acknowledge(d.position).unwrap();
    assert_eq!(reader.state().unwrap().unwrap().shipped_version, v2);

    // Paused: a commit leaves no row; the next recorded one does not chain on.
    outbox.set_recording(false);
    let v3 = version_of(&c.commit(&[write(vec![set("c", "3")])])[0]);
    assert_eq!(reader.pending().unwrap().commits, 0);
    outbox.set_recording(true);
    let v4 = version_of(&c.commit(&[write(vec![set("d", "4")])])[0]);
    let d = reader.drain(10, usize::MAX).unwrap().unwrap();
    assert_eq!((d.prev_version, d.first_version), (v3, v4));
    assert_ne!(d.prev_version, v2, "a gap after the last shipped version");
    assert_eq!(reader.discard_all().unwrap(), 1);
    assert_eq!(reader.oldest_pending_ms().unwrap(), None);
    assert_eq!(reader.current_version().unwrap(), v4);
}

/// Snapshot rows come in key order, in chunks bounded by rows and bytes, at least one each.
#[test]
fn snapshot_rows_page_through_the_table_in_key_order() {
    let (_dir, path) = db();
    let mut c = direct(&path, BackupOutbox::enabled());
    let keys: Vec<String> = (0..25).map(|i| format!("k{i:02}")).collect();
    for k in &keys {
        c.commit(&[write(vec![set(k, "value")])]);
    }
    let reader = OutboxReader::open(&path).unwrap();
    let mut after: Option<Vec<u8>> = None;
    let mut seen = Vec::new();
    let mut chunks = 0;
    loop {
        let rows = reader.snapshot_rows(after.as_deref(), 10, 1 << 20).unwrap();
        let Some(last) = rows.last() else { break };
        assert!(rows.len() <= 10);
        after = Some(last.key.clone());
        seen.extend(rows.into_iter().map(|r| String::from_utf8(r.key).unwrap()));
        chunks += 1;
    }
    assert_eq!(seen, keys);
    assert_eq!(chunks, 3);
    // A byte bound smaller than one row still yields one row.
    assert_eq!(reader.snapshot_rows(None, 10, 1).unwrap().len(), 1);
}
