//! `gen-db`: writes the load generator's key space straight into a database file, with the
//! server's own storage code, for runs on databases far larger than a preload over HTTP can
//! fill in reasonable time. The keys and value bytes are exactly those `--preload` writes.

use std::path::Path;
use std::time::Instant;

use anyhow::Context;
use denokv::kv::model::{AtomicWrite, Mutation, MutationKind};
use denokv::kv::value::{Encoding, Value};
use denokv::store::committer::DirectCommitter;
use denokv::store::{schema, SyncMode, WalWrites};

use crate::data;

/// Keys per atomic write and writes per transaction.
const KEYS_PER_WRITE: u64 = 500;
const WRITES_PER_COMMIT: u64 = 40;

/// Fills `path` (created if missing; the server must not be running on it) with keys
/// `0..keys` of `value_size` bytes. Returns the seconds it took.
pub fn generate(path: &Path, keys: u64, value_size: usize, seed: u64) -> anyhow::Result<f64> {
    let started = Instant::now();
    let conn = schema::open_writer(path, SyncMode::Normal, WalWrites::Pwrite)?;
    let mut committer = DirectCommitter::new(conn)?;
    let per_commit = KEYS_PER_WRITE * WRITES_PER_COMMIT;
    let mut next_report = 1_000_000;
    let mut first = 0;
    while first < keys {
        let last = (first + per_commit).min(keys);
        let writes: Vec<AtomicWrite> = (first..last)
            .step_by(KEYS_PER_WRITE as usize)
            .map(|start| AtomicWrite {
                mutations: (start..(start + KEYS_PER_WRITE).min(last))
                    .map(|i| Mutation {
                        key: data::kv_key(i),
                        kind: MutationKind::Set(Value {
                            data: data::value_for(data::preload_tag(seed, i), value_size),
                            encoding: Encoding::Bytes,
                        }),
                        expire_at_ms: None,
                    })
                    .collect(),
                ..Default::default()
            })
            .collect();
        for result in committer.commit(&writes) {
            result
                .map_err(|e| anyhow::anyhow!("{e}"))
                .context("writing keys")?;
        }
        first = last;
        if first >= next_report {
            eprintln!("{first} keys, {:.0} s", started.elapsed().as_secs_f64());
            next_report += 1_000_000;
        }
    }
    drop(committer);
    Ok(started.elapsed().as_secs_f64())
}
