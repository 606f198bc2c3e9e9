//! POST /v2/watch: the body as the handler decodes it, then validation (SPEC §2.5).
#![no_main]

use bytes::Bytes;
use denokv::kv::limits::{MAX_READ_KEY_BYTES, MAX_WATCHED_KEYS};
use denokv::kv::validate;
use denokv::proto as pb;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(req) = pb::Watch::decode(Bytes::copy_from_slice(data)) else {
        return;
    };
    let want: Vec<Bytes> = req.keys.iter().map(|k| k.key.clone()).collect();
    if let Ok(keys) = validate::watch(req) {
        // The keys come back in request order, within the limits.
        assert_eq!(keys, want);
        assert!(keys.len() <= MAX_WATCHED_KEYS);
        assert!(keys.iter().all(|k| k.len() <= MAX_READ_KEY_BYTES));
    }
});
