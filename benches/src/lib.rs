//! Fixtures for the benchmarks: the requests a Deno client typically sends, and databases.

use bytes::Bytes;
use denokv::kv::key::{encode, KeyPart};
use denokv::kv::model::{AtomicWrite, Mutation, MutationKind};
use denokv::kv::value::{Encoding, Value};
use denokv::proto as pb;
use denokv::store::{schema, SyncMode, WalWrites};
use rand::{Rng, SeedableRng};

/// `["bench", i]`, as Deno encodes a string and a number key part.
pub fn key(i: u64) -> Bytes {
    Bytes::from(encode(&[
        KeyPart::String("bench".into()),
        KeyPart::Float(i as f64),
    ]))
}

/// One `kv.set(key, value)` with a value of `value_size` bytes.
pub fn set_request(i: u64, value_size: usize) -> pb::AtomicWrite {
    pb::AtomicWrite {
        mutations: vec![pb::Mutation {
            key: key(i),
            value: Some(pb::KvValue {
                data: Bytes::from(vec![7u8; value_size]),
                encoding: pb::ValueEncoding::VeBytes as i32,
            }),
            mutation_type: pb::MutationType::MSet as i32,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// One `kv.get(key)`.
pub fn get_request(i: u64) -> pb::SnapshotRead {
    let start = key(i);
    let mut end = start.to_vec();
    end.push(0);
    pb::SnapshotRead {
        ranges: vec![pb::ReadRange {
            start,
            end: Bytes::from(end),
            limit: 1,
            reverse: false,
        }],
    }
}

/// Validated sets of random keys among `keys`, for the committer.
pub fn random_sets(n: usize, keys: u64, value_size: usize, seed: u64) -> Vec<AtomicWrite> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n)
        .map(|_| AtomicWrite {
            mutations: vec![Mutation {
                key: key(rng.random_range(0..keys)),
                kind: MutationKind::Set(Value {
                    data: Bytes::from(vec![7u8; value_size]),
                    encoding: Encoding::Bytes,
                }),
                expire_at_ms: None,
            }],
            ..Default::default()
        })
        .collect()
}

/// A fresh database holding `keys` keys with `value_size`-byte values.
pub fn database(
    keys: u64,
    value_size: usize,
    sync: SyncMode,
) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("bench.sqlite");
    let conn = schema::open_writer(&path, sync, WalWrites::Pwrite).expect("open");
    let mut committer = denokv::store::committer::DirectCommitter::new(conn).expect("committer");
    let writes: Vec<AtomicWrite> = (0..keys)
        .collect::<Vec<_>>()
        .chunks(500)
        .map(|chunk| AtomicWrite {
            mutations: chunk
                .iter()
                .map(|&i| Mutation {
                    key: key(i),
                    kind: MutationKind::Set(Value {
                        data: Bytes::from(vec![7u8; value_size]),
                        encoding: Encoding::Bytes,
                    }),
                    expire_at_ms: None,
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    for w in writes.chunks(16) {
        for r in committer.commit(w) {
            r.expect("preload write");
        }
    }
    (dir, path)
}
