//! The Deno KV key encoding (SPEC §4), a subset of the FoundationDB tuple layer.
//!
//! The server treats keys as opaque bytes; this codec is for tools and tests that build or
//! show keys (the load generator, test clients).

use std::fmt;

/// One part of a key.
#[derive(Clone, Debug, PartialEq)]
pub enum KeyPart {
    Bytes(Vec<u8>),
    String(String),
    /// A JS `bigint`, limited here to the i128 range.
    Int(i128),
    /// A JS `number`.
    Float(f64),
    False,
    True,
}

/// Why bytes are not a valid key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeyError(pub &'static str);

impl fmt::Display for KeyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Encodes a key.
pub fn encode(parts: &[KeyPart]) -> Vec<u8> {
    let mut out = Vec::new();
    for p in parts {
        match p {
            KeyPart::Bytes(b) => escaped(&mut out, 0x01, b),
            KeyPart::String(s) => escaped(&mut out, 0x02, s.as_bytes()),
            KeyPart::Int(i) => int(&mut out, *i),
            KeyPart::Float(f) => {
                let bits = if f.is_nan() {
                    if f.is_sign_negative() {
                        0xfff8_0000_0000_0000
                    } else {
                        0x7ff8_0000_0000_0000
                    }
                } else {
                    f.to_bits()
                };
                let bits = if bits >> 63 == 1 {
                    !bits
                } else {
                    bits ^ (1 << 63)
                };
                out.push(0x21);
                out.extend_from_slice(&bits.to_be_bytes());
            }
            KeyPart::False => out.push(0x26),
            KeyPart::True => out.push(0x27),
        }
    }
    out
}

fn escaped(out: &mut Vec<u8>, tag: u8, data: &[u8]) {
    out.push(tag);
    for &b in data {
        out.push(b);
        if b == 0 {
            out.push(0xff);
        }
    }
    out.push(0);
}

fn int(out: &mut Vec<u8>, i: i128) {
    let magnitude = i.unsigned_abs().to_be_bytes();
    let skip = magnitude.iter().take_while(|&&b| b == 0).count();
    let m = &magnitude[skip..];
    let n = m.len();
    if i >= 0 {
        if n <= 8 {
            out.push(0x14 + n as u8);
        } else {
            out.extend_from_slice(&[0x1d, n as u8]);
        }
        out.extend_from_slice(m);
    } else {
        if n <= 8 {
            out.push(0x14 - n as u8);
        } else {
            out.extend_from_slice(&[0x0b, n as u8 ^ 0xff]);
        }
        out.extend(m.iter().map(|b| !b));
    }
}

/// Decodes a key; fails on the inputs Deno's decoder rejects.
pub fn decode(mut bytes: &[u8]) -> Result<Vec<KeyPart>, KeyError> {
    let mut parts = Vec::new();
    while let Some((&tag, rest)) = bytes.split_first() {
        bytes = rest;
        parts.push(match tag {
            0x01 => KeyPart::Bytes(unescape(&mut bytes)?),
            0x02 => KeyPart::String(
                String::from_utf8(unescape(&mut bytes)?).map_err(|_| KeyError("invalid utf8"))?,
            ),
            0x0b..=0x1d => KeyPart::Int(decode_int(tag, &mut bytes)?),
            0x21 => {
                let b: [u8; 8] = take(&mut bytes, 8)?.try_into().unwrap();
                let bits = u64::from_be_bytes(b);
                let bits = if bits >> 63 == 1 {
                    bits ^ (1 << 63)
                } else {
                    !bits
                };
                KeyPart::Float(f64::from_bits(bits))
            }
            0x26 => KeyPart::False,
            0x27 => KeyPart::True,
            _ => return Err(KeyError("invalid tag")),
        });
    }
    Ok(parts)
}

fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Result<&'a [u8], KeyError> {
    if bytes.len() < n {
        return Err(KeyError("unexpected end of key"));
    }
    let (head, rest) = bytes.split_at(n);
    *bytes = rest;
    Ok(head)
}

fn unescape(bytes: &mut &[u8]) -> Result<Vec<u8>, KeyError> {
    let mut out = Vec::new();
    loop {
        let b = *take(bytes, 1)?.first().unwrap();
        if b != 0 {
            out.push(b);
        } else if bytes.first() == Some(&0xff) {
            *bytes = &bytes[1..];
            out.push(0);
        } else {
            return Ok(out);
        }
    }
}

fn decode_int(tag: u8, bytes: &mut &[u8]) -> Result<i128, KeyError> {
    let (negative, n) = match tag {
        0x14 => return Ok(0),
        0x15..=0x1c => (false, (tag - 0x14) as usize),
        0x1d => (false, *take(bytes, 1)?.first().unwrap() as usize),
        0x0c..=0x13 => (true, (0x14 - tag) as usize),
        0x0b => (true, (*take(bytes, 1)?.first().unwrap() ^ 0xff) as usize),
        _ => unreachable!("caller matched the integer tags"),
    };
    let m = take(bytes, n)?;
    if n > 16 {
        return Err(KeyError("integer too large for this decoder"));
    }
    let mut buf = [0u8; 16];
    for (dst, src) in buf[16 - n..].iter_mut().zip(m) {
        *dst = if negative { !src } else { *src };
    }
    let magnitude = u128::from_be_bytes(buf);
    let value =
        i128::try_from(magnitude).map_err(|_| KeyError("integer too large for this decoder"))?;
    Ok(if negative { -value } else { value })
}

/// The range `[p ++ 00, p ++ ff)`: every key that has `prefix` as a proper prefix.
pub fn prefix_range(prefix: &[u8]) -> (Vec<u8>, Vec<u8>) {
    let mut start = prefix.to_vec();
    start.push(0x00);
    let mut end = prefix.to_vec();
    end.push(0xff);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::KeyPart::*;
    use super::*;

    fn hex(b: &[u8]) -> std::string::String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn spec_vectors() {
        let cases: Vec<(Vec<KeyPart>, &str)> = vec![
            (vec![String("hello".into())], "0268656c6c6f00"),
            (vec![String("".into())], "0200"),
            (vec![String("héllo".into())], "0268c3a96c6c6f00"),
            (vec![Bytes(vec![1, 2, 0, 7, 8])], "01010200ff070800"),
            (vec![Bytes(vec![])], "0100"),
            (vec![Int(0)], "14"),
            (vec![Int(1)], "1501"),
            (vec![Int(255)], "15ff"),
            (vec![Int(256)], "160100"),
            (vec![Int(-1)], "13fe"),
            (vec![Int(-255)], "1300"),
            (vec![Int(-256)], "12feff"),
            (vec![Int(1 << 64)], "1d09010000000000000000"),
            (vec![Int(-(1 << 64))], "0bf6feffffffffffffffff"),
            (vec![Float(0.0)], "218000000000000000"),
            (vec![Float(-0.0)], "217fffffffffffffff"),
            (vec![Float(1.0)], "21bff0000000000000"),
            (vec![Float(-1.0)], "21400fffffffffffff"),
            (vec![Float(42.0)], "21c045000000000000"),
            (vec![Float(f64::INFINITY)], "21fff0000000000000"),
            (vec![Float(f64::NEG_INFINITY)], "21000fffffffffffff"),
            (vec![Float(f64::NAN)], "21fff8000000000000"),
            (vec![False], "26"),
            (vec![True], "27"),
            (
                vec![String("users".into()), Float(42.0)],
                "0275736572730021c045000000000000",
            ),
            (vec![String("a".into()), Int(1), True], "026100150127"),
        ];
        for (parts, want) in cases {
            let enc = encode(&parts);
            assert_eq!(hex(&enc), want, "{parts:?}");
            let back = decode(&enc).unwrap();
            if !matches!(parts[0], Float(f) if f.is_nan()) {
                assert_eq!(back, parts);
            }
        }
    }

    #[test]
    fn byte_order_is_key_order() {
        let ordered = [
            vec![Int(-256)],
            vec![Int(-255)],
            vec![Int(-1)],
            vec![Int(0)],
            vec![Int(1)],
        ];
        for w in ordered.windows(2) {
            assert!(encode(&w[0]) < encode(&w[1]), "{w:?}");
        }
        let types = [
            vec![Bytes(vec![])],
            vec![String("".into())],
            vec![Int(0)],
            vec![Float(0.0)],
            vec![False],
            vec![True],
        ];
        for w in types.windows(2) {
            assert!(encode(&w[0]) < encode(&w[1]), "{w:?}");
        }
        assert!(
            encode(&[String("a".into())]) < encode(&[String("a".into()), Int(0)]),
            "a prefix sorts first"
        );
    }

    #[test]
    fn rejects_what_deno_rejects() {
        assert_eq!(decode(&[0x05]), Err(KeyError("invalid tag")));
        assert_eq!(
            decode(&[0x02, b'a']),
            Err(KeyError("unexpected end of key"))
        );
        assert_eq!(decode(&[0x02, 0xff, 0x00]), Err(KeyError("invalid utf8")));
        assert_eq!(
            decode(&[0x21, 0, 0]),
            Err(KeyError("unexpected end of key"))
        );
    }

    #[test]
    fn prefix_range_holds_exactly_the_children() {
        let p = encode(&[String("users".into())]);
        let (start, end) = prefix_range(&p);
        let child = encode(&[String("users".into()), Int(5)]);
        assert!(start <= child && child < end);
        assert!(!(start <= p && p < end), "the prefix itself is outside");
    }
}
