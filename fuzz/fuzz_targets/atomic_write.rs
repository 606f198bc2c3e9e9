//! POST /v2/atomic_write: the body as the handler decodes it, validation (SPEC §2.4), then
//! each validated sum/min/max applied to a few stored values, as the committer does.
#![no_main]

use bytes::Bytes;
use denokv::kv::limits::{
    MAX_BACKOFF_MS, MAX_CHECKS, MAX_MUTATIONS, MAX_QUEUE_DELAY_MS, MAX_TOTAL_WRITE_BYTES,
};
use denokv::kv::model::MutationKind;
use denokv::kv::validate;
use denokv::kv::value::StoredValue;
use denokv::proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

/// A fixed clock keeps runs reproducible.
const NOW_MS: i64 = 1_700_000_000_000;

fn stored() -> [Option<StoredValue>; 4] {
    let v = |data: &[u8], encoding| {
        Some(StoredValue {
            data: Bytes::copy_from_slice(data),
            encoding,
        })
    };
    [
        None,
        v(&7u64.to_le_bytes(), 2),
        // V8 number 1.5 and BigInt 5.
        v(&[0xff, 0x0f, b'N', 0, 0, 0, 0, 0, 0, 0xf8, 0x3f], 1),
        v(&[0xff, 0x0f, b'Z', 0x10, 5, 0, 0, 0, 0, 0, 0, 0], 1),
    ]
}

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::AtomicWrite::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let Ok(write) = validate::atomic_write(req, NOW_MS) else {
        return;
    };
    assert!(write.checks.len() <= MAX_CHECKS);
    assert!(write.mutations.len() + write.enqueues.len() <= MAX_MUTATIONS);
    assert!(write.size_bytes() <= MAX_TOTAL_WRITE_BYTES);
    for e in &write.enqueues {
        assert!(e.deadline_ms >= 0 && e.deadline_ms <= NOW_MS + MAX_QUEUE_DELAY_MS);
        assert!(e.backoff_schedule.iter().all(|&ms| ms <= MAX_BACKOFF_MS));
    }
    for m in &write.mutations {
        for s in stored() {
            // Errors are 400s; only a panic is a finding.
            let _ = match &m.kind {
                MutationKind::Le64(op, n) => op.apply(s, *n),
                MutationKind::V8Sum(sum) => sum.apply(s),
                _ => continue,
            };
        }
    }
});
