//! What the load generator writes: key layout, value contents, versionstamps.
//!
//! Keys are real Deno KV keys (tuple-encoded with the server's own codec), so a database filled
//! by a load run can still be opened and listed by the Deno CLI.

use bytes::Bytes;
use denokv::kv::key::{encode, KeyPart};

/// Every key the load generator writes starts with this part.
const ROOT: &str = "denokv-loadtest";

fn s(part: &str) -> KeyPart {
    KeyPart::String(part.to_string())
}

/// The shared key space of `write`, `read`, `mixed` and `list`: `[ROOT, "kv", i]`. It is the
/// same in every run, so a preloaded database can be read by later runs.
pub fn kv_key(i: u64) -> Bytes {
    Bytes::from(encode(&[s(ROOT), s("kv"), KeyPart::Int(i as i128)]))
}

/// The encoded prefix of the shared key space.
pub fn kv_prefix() -> Vec<u8> {
    encode(&[s(ROOT), s("kv")])
}

/// The counters of `cas` and `sum`, and the keys of `watch`: `[ROOT, kind, run, i]`. The run
/// id is new for every run, so counters start from absent and the expected totals are exactly
/// what this run acknowledged, whatever earlier runs left in the database.
pub fn run_key(kind: &str, run: u64, i: u64) -> Bytes {
    Bytes::from(encode(&[
        s(ROOT),
        s(kind),
        KeyPart::Int(run as i128),
        KeyPart::Int(i as i128),
    ]))
}

/// The counters of `crash-mix`: `[ROOT, "crash-sum", i]`. The same in every run, so that the
/// sums of several runs (one per crash) add up in one counter; use a fresh database.
pub fn crash_counter_key(i: u64) -> Bytes {
    Bytes::from(encode(&[s(ROOT), s("crash-sum"), KeyPart::Int(i as i128)]))
}

/// The prefix of the versionstamped keys of `crash-mix`: `[ROOT, "crash-vs"]`.
pub fn crash_vs_prefix() -> Bytes {
    Bytes::from(encode(&[s(ROOT), s("crash-vs")]))
}

/// The key a versionstamped-suffix set on `prefix` writes when it commits at `versionstamp`:
/// the prefix and one more string part, the 20 hex digits (SPEC §2.4.5).
pub fn versionstamped_key(prefix: &[u8], versionstamp: u128) -> Vec<u8> {
    let mut key = prefix.to_vec();
    key.push(0x02);
    key.extend_from_slice(versionstamp_hex(versionstamp).as_bytes());
    key.push(0x00);
    key
}

/// The end of a read range that holds exactly `key`: `[k, k ++ 00)` (SPEC §4).
pub fn exact_end(key: &[u8]) -> Bytes {
    let mut end = key.to_vec();
    end.push(0x00);
    Bytes::from(end)
}

/// The tag of key `i`'s value in a preload (and `gen-db`): it depends on the key and the seed
/// only, so the same preload writes the same bytes.
pub fn preload_tag(seed: u64, i: u64) -> u64 {
    seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ i.wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

/// The value written for `tag`: `size` bytes expanded from the tag by splitmix64. The ack log
/// stores only the tag and the size; `verify` recomputes the bytes and compares all of them.
pub fn value_for(tag: u64, size: usize) -> Bytes {
    let mut out = Vec::with_capacity(size + 8);
    let mut state = tag;
    while out.len() < size {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        out.extend_from_slice(&z.to_le_bytes());
    }
    out.truncate(size);
    Bytes::from(out)
}

/// A 10-byte versionstamp as an integer, so that versionstamps compare with `<` (their byte
/// order is commit order, SPEC §2.6). Anything else maps to `None`.
pub fn versionstamp(bytes: &[u8]) -> Option<u128> {
    if bytes.len() != 10 {
        return None;
    }
    Some(bytes.iter().fold(0u128, |acc, &b| (acc << 8) | b as u128))
}

/// The 20-character lowercase hex form Deno shows for a versionstamp.
pub fn versionstamp_hex(v: u128) -> String {
    format!("{v:020x}")
}

pub fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if text.len() % 2 != 0 {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// A key for people: the decoded tuple when it decodes, else its hex.
pub fn show_key(key: &[u8]) -> String {
    match denokv::kv::key::decode(key) {
        Ok(parts) => {
            let shown: Vec<String> = parts
                .iter()
                .map(|p| match p {
                    KeyPart::String(s) => format!("{s:?}"),
                    KeyPart::Int(i) => format!("{i}n"),
                    KeyPart::Float(f) => format!("{f}"),
                    KeyPart::Bytes(b) => format!("bytes({})", to_hex(b)),
                    KeyPart::False => "false".into(),
                    KeyPart::True => "true".into(),
                })
                .collect();
            format!("[{}]", shown.join(", "))
        }
        Err(_) => format!("0x{}", to_hex(key)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_deterministic_and_sized() {
        assert_eq!(value_for(7, 100), value_for(7, 100));
        assert_ne!(value_for(7, 100), value_for(8, 100));
        assert_eq!(value_for(7, 0).len(), 0);
        assert_eq!(value_for(7, 13).len(), 13);
        assert_eq!(&value_for(7, 13)[..], &value_for(7, 16)[..13]);
    }

    #[test]
    fn versionstamps_order_like_bytes() {
        let a = versionstamp(&[0, 0, 0, 0, 0, 0, 0, 1, 0, 0]).unwrap();
        let b = versionstamp(&[0, 0, 0, 0, 0, 0, 1, 0, 0, 0]).unwrap();
        assert!(a < b);
        assert_eq!(versionstamp_hex(a), "00000000000000010000");
        assert_eq!(versionstamp(&[1, 2]), None);
    }

    #[test]
    fn versionstamped_keys_are_tuple_keys() {
        let key = versionstamped_key(&crash_vs_prefix(), 0x1234);
        assert_eq!(
            show_key(&key),
            "[\"denokv-loadtest\", \"crash-vs\", \"00000000000000001234\"]"
        );
    }

    #[test]
    fn keys_sort_inside_the_prefix_range() {
        let p = kv_prefix();
        let (k1, k2) = (kv_key(1), kv_key(300));
        assert!(k1.starts_with(&p) && k2.starts_with(&p));
        assert!(k1 < k2, "integer parts sort numerically");
        assert_eq!(show_key(&k2), "[\"denokv-loadtest\", \"kv\", 300n]");
        assert_eq!(from_hex(&to_hex(&k2)).unwrap(), &k2[..]);
    }
}
