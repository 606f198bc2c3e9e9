//! The key codec (SPEC §4). Property: whatever decodes re-encodes to a canonical form that is
//! never longer, decodes to the same parts, and encodes to itself; canonical input comes back
//! byte for byte. Non-canonical input (a NaN other than the two quiet ones, an integer with
//! leading zero bytes or in the wrong-size tag) decodes to the same value as its canonical form.
#![no_main]

use denokv::kv::key::{decode, encode, KeyPart};
use libfuzzer_sys::fuzz_target;

/// Parts compared with floats by bits (NaN != NaN otherwise), NaNs by sign only.
fn same(a: &[KeyPart], b: &[KeyPart]) -> bool {
    a.len() == b.len()
        && a.iter().zip(b).all(|(x, y)| match (x, y) {
            (KeyPart::Float(x), KeyPart::Float(y)) if x.is_nan() && y.is_nan() => {
                x.is_sign_negative() == y.is_sign_negative()
            }
            (KeyPart::Float(x), KeyPart::Float(y)) => x.to_bits() == y.to_bits(),
            _ => x == y,
        })
}

fuzz_target!(|data: &[u8]| {
    let Ok(parts) = decode(data) else {
        return;
    };
    let bytes = encode(&parts);
    assert!(bytes.len() <= data.len(), "canonical form is longer");
    let again = decode(&bytes).expect("an encoded key decodes");
    assert!(same(&parts, &again), "{parts:?} != {again:?}");
    assert_eq!(encode(&again), bytes);
    // Equal bytes unless the input was non-canonical (a float NaN or an integer).
    if bytes != data {
        assert!(parts
            .iter()
            .any(|p| matches!(p, KeyPart::Int(_)) || matches!(p, KeyPart::Float(f) if f.is_nan())));
    }
});
