//! POST /v2/snapshot_read: the body as the handler decodes it, then validation (SPEC §3).
#![no_main]

use bytes::Bytes;
use denokv::kv::limits::{MAX_READ_ENTRIES, MAX_READ_KEY_BYTES, MAX_READ_RANGES};
use denokv::kv::validate;
use denokv::proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::SnapshotRead::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let n = req.ranges.len();
    if let Ok(ranges) = validate::snapshot_read(req) {
        // What passes validation is within every limit the reader relies on.
        assert_eq!(ranges.len(), n);
        assert!(n <= MAX_READ_RANGES);
        let total: u64 = ranges.iter().map(|r| u64::from(r.limit)).sum();
        assert!(total <= MAX_READ_ENTRIES);
        for r in &ranges {
            assert!(r.limit > 0);
            assert!(r.start.len() <= MAX_READ_KEY_BYTES && r.end.len() <= MAX_READ_KEY_BYTES);
        }
    }
});
