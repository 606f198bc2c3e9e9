//! The protocol's size and count limits (SPEC §3), with the fixes of §10 (D8d, D19).

/// Largest key a mutation, dead-letter key or enqueue may write.
pub const MAX_WRITE_KEY_BYTES: usize = 2048;
/// Largest key a read range bound, check or watch may name (room for a `00`/`ff` suffix).
pub const MAX_READ_KEY_BYTES: usize = MAX_WRITE_KEY_BYTES + 1;
/// Largest value (`KvValue.data`, `Enqueue.payload`).
pub const MAX_VALUE_BYTES: usize = 65_536;
/// Ranges in one snapshot read.
pub const MAX_READ_RANGES: usize = 10;
/// Sum of `limit` over the ranges of one snapshot read.
pub const MAX_READ_ENTRIES: u64 = 1000;
/// Checks in one atomic write. Deno allows 100; the upstream server's 10 breaks valid programs (D19).
pub const MAX_CHECKS: usize = 100;
/// Mutations plus enqueues in one atomic write.
pub const MAX_MUTATIONS: usize = 1000;
/// Total bytes of one atomic write, counted as SPEC §3 describes.
pub const MAX_TOTAL_WRITE_BYTES: usize = 819_200;
/// Dead-letter keys of one queue message.
pub const MAX_DEAD_LETTER_KEYS: usize = 10;
/// Backoff intervals of one queue message.
pub const MAX_BACKOFF_INTERVALS: usize = 10;
/// Largest backoff interval, in ms (one hour).
pub const MAX_BACKOFF_MS: u32 = 3_600_000;
/// Furthest an enqueue deadline may lie in the future, in ms (30 days).
pub const MAX_QUEUE_DELAY_MS: i64 = 2_592_000_000;
/// Keys in one watch request.
pub const MAX_WATCHED_KEYS: usize = 10;
/// Largest HTTP request body by default (`--max-body-bytes`): upstream's framework default.
pub const MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
/// The least `--max-body-bytes` may be: above the largest request within the limits above
/// (an atomic write of about 0.9 MB, see the test `the_largest_valid_request_fits`).
pub const MIN_BODY_BYTES: usize = 1024 * 1024;
