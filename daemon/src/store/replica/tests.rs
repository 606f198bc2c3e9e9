use super::*;
use crate::backup::names::versionstamp12;

fn entry(version: u64, index: u16, key: &str, value: Option<&str>) -> LogEntry {
    LogEntry {
        versionstamp12: versionstamp12(version, index),
        timestamp_ms: version as i64 * 1000,
        key: key.as_bytes().to_vec(),
        value: value.map(|v| v.as_bytes().to_vec()),
        encoding: 3,
    }
}

fn vs10(version: u64) -> [u8; 10] {
    versionstamp12(version, 0)[..10].try_into().unwrap()
}

/// Every row of the `kv` view: key, value, encoding, version, seq.
fn contents(db: &ReplicaDb) -> Vec<(String, String, i64, i64, i64)> {
    db.conn
        .prepare("SELECT k, v, v_encoding, version, seq FROM kv ORDER BY k")
        .unwrap()
        .query_map([], |r| {
            Ok((
                String::from_utf8(r.get(0)?).unwrap(),
                String::from_utf8(r.get(1)?).unwrap(),
                r.get(2)?,
                r.get(3)?,
                r.get(4)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn cursor(last: u64) -> Cursor {
    Cursor {
        format: 1,
        monoseq: last,
        first: versionstamp12(last, 0),
        last: versionstamp12(last, 0xffff),
    }
}

/// A replica with a snapshot (a=0 at version 1) at point 1, and logs for commits 2..=4:
/// 2 sets a and b; 3 deletes a; 4 sets b.
fn replica(dir: &tempfile::TempDir) -> ReplicaDb {
    let mut db = ReplicaDb::open(&dir.path().join("replica.sqlite")).unwrap();
    db.bind_s3("bucket", "p/").unwrap();
    let id = RangeId {
        format: 1,
        monoseq: 1,
        seq: 0,
    };
    db.record_snapshot_ranges(&[id]).unwrap();
    db.apply_snapshot_range(
        id,
        &[SnapshotPair {
            key: b"a",
            value: b"0",
            encoding: 3,
            version: 1,
            seq: 0,
        }],
    )
    .unwrap();
    db.finish_initial_snapshot(&vs10(1)).unwrap();
    db.insert_logs(
        &[
            entry(2, 0, "a", Some("2")),
            entry(2, 0xffff, "b", Some("2")),
            entry(3, 0xffff, "a", None),
        ],
        &cursor(3),
    )
    .unwrap();
    db.insert_logs(&[entry(4, 0xffff, "b", Some("4"))], &cursor(4))
        .unwrap();
    db
}

#[test]
fn checkouts_go_forward_and_backward_through_every_point() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = replica(&dir);
    assert_eq!(db.current().unwrap(), Some(versionstamp12(1, 0xffff)));
    let at1 = vec![("a".into(), "0".into(), 3, 1, 0)];
    assert_eq!(contents(&db), at1);
    assert_eq!(db.newest_point().unwrap(), Some(versionstamp12(4, 0xffff)));

    let c = db.checkout(&vs10(4)).unwrap();
    assert_eq!(c.current, versionstamp12(4, 0xffff));
    assert_eq!(c.entries, 4);
    let mut keys = c.keys.clone();
    keys.sort();
    assert_eq!(keys, [b"a".to_vec(), b"b".to_vec()]);
    let at4 = vec![("b".into(), "4".into(), 3, 4, 0)];
    assert_eq!(contents(&db), at4);

    db.checkout(&vs10(2)).unwrap();
    assert_eq!(db.current().unwrap(), Some(versionstamp12(2, 0xffff)));
    let at2 = vec![
        ("a".into(), "2".into(), 3, 2, 0),
        ("b".into(), "2".into(), 3, 2, 0),
    ];
    assert_eq!(contents(&db), at2);

    let c = db.checkout(&vs10(3)).unwrap();
    assert_eq!(c.keys, [b"a".to_vec()]);
    assert_eq!(contents(&db), vec![("b".into(), "2".into(), 3, 2, 0)]);
    db.checkout(&vs10(4)).unwrap();
    assert_eq!(contents(&db), at4);
    // The same point again: nothing to do.
    assert_eq!(db.checkout(&vs10(4)).unwrap().entries, 0);

    let points: Vec<u64> = db
        .points(0, i64::MAX)
        .unwrap()
        .iter()
        .map(|p| crate::backup::names::version_of(&p.versionstamp12))
        .collect();
    assert_eq!(points, [4, 3, 2]);
    let points = db.points(3000, 4000).unwrap();
    assert_eq!(points.len(), 1);
    assert_eq!(points[0].timestamp_ms, 3000);
}

#[test]
fn a_point_older_than_the_oldest_undo_boundary_is_refused_and_nothing_changes() {
    // SPEC §10 D17: upstream undoes past the oldest boundary and records a wrong point.
    let dir = tempfile::tempdir().unwrap();
    let mut db = replica(&dir);
    db.checkout(&vs10(4)).unwrap();
    let before = contents(&db);
    for old in [1, 0] {
        let e = db.checkout(&vs10(old)).unwrap_err().to_string();
        assert!(
            e.contains("older than the oldest recoverable point, 00000000000000020000"),
            "{e}"
        );
        assert_eq!(contents(&db), before);
        assert_eq!(db.current().unwrap(), Some(versionstamp12(4, 0xffff)));
    }
    // Past the newest point downloaded: refused too.
    let e = db.checkout(&vs10(9)).unwrap_err().to_string();
    assert!(e.contains("newer than every point downloaded"), "{e}");
    assert_eq!(contents(&db), before);
    // A point between two boundaries goes to the one before it (backward) or after (forward).
    db.checkout(&vs10(2)).unwrap();
    db.conn.execute("DELETE FROM tt_undo_log", []).unwrap();
    let e = db.checkout(&vs10(1)).unwrap_err().to_string();
    assert!(e.contains("no older recoverable point"), "{e}");
}

#[test]
fn a_log_that_does_not_end_at_a_boundary_rolls_the_replay_back() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = ReplicaDb::open(&dir.path().join("r.sqlite")).unwrap();
    db.insert_logs(&[entry(2, 0, "a", Some("2"))], &cursor(2))
        .unwrap();
    let e = db
        .finish_initial_snapshot(&vs10(2))
        .unwrap_err()
        .to_string();
    assert_eq!(e, "redo/undo log did not end at a snapshot boundary");
    assert!(!db.initial_snapshot_completed().unwrap());
    assert_eq!(db.current().unwrap(), None);
    assert!(contents(&db).is_empty());
    // Once the rest of the commit arrives, the replay goes through.
    db.insert_logs(&[entry(2, 0xffff, "b", Some("2"))], &cursor(2))
        .unwrap();
    db.finish_initial_snapshot(&vs10(2)).unwrap();
    assert_eq!(contents(&db).len(), 2);
}

#[test]
fn the_initial_snapshot_replays_stored_logs_up_to_the_differential() {
    // SPEC §10 D23: the redo entries at or before DV are replayed even when fetched by an
    // earlier run.
    let dir = tempfile::tempdir().unwrap();
    let mut db = ReplicaDb::open(&dir.path().join("r.sqlite")).unwrap();
    // A fuzzy snapshot: b was read after commit 3 had changed it.
    let id = RangeId {
        format: 1,
        monoseq: 2,
        seq: 0,
    };
    db.record_snapshot_ranges(&[id]).unwrap();
    db.apply_snapshot_range(
        id,
        &[SnapshotPair {
            key: b"b",
            value: b"3",
            encoding: 3,
            version: 3,
            seq: 0,
        }],
    )
    .unwrap();
    db.insert_logs(
        &[
            entry(2, 0, "a", Some("2")),
            entry(2, 0xffff, "b", Some("2")),
            entry(3, 0xffff, "b", Some("3")),
            entry(5, 0xffff, "a", None),
        ],
        &cursor(5),
    )
    .unwrap();
    let c = db.finish_initial_snapshot(&vs10(3)).unwrap();
    assert_eq!(c.current, versionstamp12(3, 0xffff));
    assert!(db.initial_snapshot_completed().unwrap());
    assert_eq!(
        contents(&db),
        vec![
            ("a".into(), "2".into(), 3, 2, 0),
            ("b".into(), "3".into(), 3, 3, 0)
        ]
    );
    // No undo entries for the replay: 3 is not a point to go back to.
    assert!(db.points(0, i64::MAX).unwrap().len() == 1);
}

#[test]
fn a_normal_database_is_not_a_replica_and_a_replica_opens_for_reading() {
    let dir = tempfile::tempdir().unwrap();
    let normal = dir.path().join("normal.sqlite");
    drop(
        crate::store::schema::open_writer(
            &normal,
            crate::store::SyncMode::Full,
            crate::store::WalWrites::Pwrite,
        )
        .unwrap(),
    );
    let e = ReplicaDb::open(&normal).err().unwrap().to_string();
    assert!(e.contains("is a normal database, not a replica"), "{e}");

    let db = replica(&dir);
    drop(db);
    let path = dir.path().join("replica.sqlite");
    let mut reader = crate::store::Reader::open(&path).unwrap();
    let got = reader
        .read_keys(&[bytes::Bytes::from_static(b"a")], 0)
        .unwrap();
    assert_eq!(&got[0].as_ref().unwrap().value.data[..], b"0");
    // Reopening runs no migration twice, and the bucket binding holds.
    let mut db = ReplicaDb::open(&path).unwrap();
    db.bind_s3("bucket", "p/").unwrap();
    let e = db.bind_s3("other", "p/").unwrap_err().to_string();
    assert!(e.contains("delete the key `s3_init_completed`"), "{e}");
}

#[test]
fn versionstamps_keep_bytes_8_and_9_through_checkouts_and_reads() {
    // SPEC §10 D14: upstream's reads drop them.
    let dir = tempfile::tempdir().unwrap();
    let mut db = replica(&dir);
    let mut vs = versionstamp12(9, 0xffff);
    vs[8..10].copy_from_slice(&[0x01, 0x02]);
    db.insert_logs(
        &[LogEntry {
            versionstamp12: vs,
            timestamp_ms: 9000,
            key: b"s".to_vec(),
            value: Some(b"x".to_vec()),
            encoding: 1,
        }],
        &cursor(9),
    )
    .unwrap();
    let target: [u8; 10] = vs[..10].try_into().unwrap();
    assert_eq!(db.checkout(&target).unwrap().current, vs);
    let mut reader = crate::store::Reader::open(&dir.path().join("replica.sqlite")).unwrap();
    let got = reader
        .read_keys(&[bytes::Bytes::from_static(b"s")], 0)
        .unwrap();
    let e = got[0].as_ref().unwrap();
    assert_eq!(e.versionstamp.0, target);
    assert_eq!(e.value.encoding as i64, 1);
    // Backward and forward again: the same bytes.
    db.checkout(&vs10(4)).unwrap();
    db.checkout(&target).unwrap();
    let got = reader
        .read_keys(&[bytes::Bytes::from_static(b"s")], 0)
        .unwrap();
    assert_eq!(got[0].as_ref().unwrap().versionstamp.0, target);
}

#[test]
fn pruning_the_undo_log_keeps_the_oldest_point_after_the_cutoff_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let mut db = replica(&dir);
    db.checkout(&vs10(4)).unwrap();
    let at3 = {
        db.checkout(&vs10(3)).unwrap();
        let c = contents(&db);
        db.checkout(&vs10(4)).unwrap();
        c
    };
    // Points 2, 3 and 4 at 2000, 3000 and 4000 ms; keep what 3500 needs: point 3 and on.
    assert_eq!(db.prune_undo(3500, 1).unwrap(), 1);
    assert_eq!(db.prune_undo(3500, 1).unwrap(), 1);
    assert_eq!(db.prune_undo(3500, 1).unwrap(), 0);
    let points: Vec<u64> = db
        .points(0, i64::MAX)
        .unwrap()
        .iter()
        .map(|p| crate::backup::names::version_of(&p.versionstamp12))
        .collect();
    assert_eq!(points, [4, 3]);
    db.checkout(&vs10(3)).unwrap();
    assert_eq!(contents(&db), at3);
    let e = db.checkout(&vs10(2)).unwrap_err().to_string();
    assert!(
        e.contains("oldest recoverable point, 00000000000000030000"),
        "{e}"
    );
    db.checkout(&vs10(4)).unwrap();
    // Nothing older than the cutoff but the oldest point itself: nothing to delete.
    assert_eq!(db.prune_undo(0, 100).unwrap(), 0);
}
