//! Hot paths: validation, protobuf, the committer's batch, and a point read.
//! Run with `cargo bench -p denokv-benches`.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use denokv::kv::{now_ms, validate};
use denokv::proto as pb;
use denokv::store::committer::DirectCommitter;
use denokv::store::{schema, Reader, SyncMode, WalWrites, WatchRegistry, SNAPSHOT_HOLD};
use denokv_benches::*;
use prost::Message;

fn validation(c: &mut Criterion) {
    let mut g = c.benchmark_group("validate");
    let write = set_request(42, 100);
    g.bench_function("atomic_write_one_set_100B", |b| {
        b.iter(|| validate::atomic_write(black_box(write.clone()), now_ms()).unwrap())
    });
    let read = get_request(42);
    g.bench_function("snapshot_read_one_get", |b| {
        b.iter(|| validate::snapshot_read(black_box(read.clone())).unwrap())
    });
    g.finish();
}

fn protobuf(c: &mut Criterion) {
    let mut g = c.benchmark_group("protobuf");
    let write = set_request(42, 100).encode_to_vec();
    g.bench_function("decode_atomic_write_one_set_100B", |b| {
        b.iter(|| pb::AtomicWrite::decode(black_box(&write[..])).unwrap())
    });
    let read = get_request(42).encode_to_vec();
    g.bench_function("decode_snapshot_read_one_get", |b| {
        b.iter(|| pb::SnapshotRead::decode(black_box(&read[..])).unwrap())
    });
    let output = pb::SnapshotReadOutput {
        ranges: vec![pb::ReadRangeOutput {
            values: (0..10)
                .map(|i| pb::KvEntry {
                    key: key(i),
                    value: vec![7u8; 100].into(),
                    encoding: pb::ValueEncoding::VeBytes as i32,
                    versionstamp: vec![0u8; 10].into(),
                })
                .collect(),
        }],
        read_disabled: false,
        read_is_strongly_consistent: true,
        status: pb::SnapshotReadStatus::SrSuccess as i32,
    };
    g.bench_function("encode_snapshot_read_output_10_entries", |b| {
        b.iter(|| black_box(&output).encode_to_vec())
    });
    g.finish();
}

fn commit_batch(c: &mut Criterion) {
    for (sync, wal) in [
        (SyncMode::Full, WalWrites::Pwrite),
        (SyncMode::Full, WalWrites::IoUring),
        (SyncMode::Normal, WalWrites::Pwrite),
    ] {
        let name = format!("commit_batch_{sync:?}_{wal:?}").to_lowercase();
        let mut g = c.benchmark_group(name);
        g.sample_size(20);
        let (_dir, path) = database(10_000, 100, sync);
        let mut committer =
            DirectCommitter::new(schema::open_writer(&path, sync, wal).unwrap()).unwrap();
        for n in [1usize, 8, 64, 512] {
            g.throughput(Throughput::Elements(n as u64));
            let mut seed = 0;
            g.bench_function(format!("{n}_writes"), |b| {
                b.iter_batched(
                    || {
                        seed += 1;
                        random_sets(n, 10_000, 100, seed)
                    },
                    |writes| {
                        for r in committer.commit(&writes) {
                            r.unwrap();
                        }
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        g.finish();
    }
}

/// Point reads of random keys of 10,000: a read transaction each (`point_get_10k_keys`), and
/// as each core's reader reads, one read snapshot shared while nothing changes (no commits
/// here, so only the hold ends it).
fn point_read(c: &mut Criterion) {
    let (_dir, path) = database(10_000, 100, SyncMode::Normal);
    let watches = std::sync::Arc::new(WatchRegistry::default());
    let readers = [
        ("read/point_get_10k_keys", Reader::open(&path).unwrap()),
        (
            "read/point_get_10k_keys_shared_snapshot",
            Reader::open(&path)
                .unwrap()
                .share_snapshots(watches, SNAPSHOT_HOLD),
        ),
    ];
    for (name, mut reader) in readers {
        let mut i = 0u64;
        c.bench_function(name, |b| {
            b.iter(|| {
                i = (i + 7919) % 10_000;
                let ranges = validate::snapshot_read(get_request(i)).unwrap();
                let out = reader.read_ranges(&ranges, now_ms()).unwrap();
                assert_eq!(out[0].len(), 1);
            })
        });
    }
}

criterion_group!(benches, validation, protobuf, commit_batch, point_read);
criterion_main!(benches);
