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

/// Whether `key` lies in the key space of `prefix` (an encoded key): whether the parts of
/// `key` start with the parts of `prefix`. A byte prefix is not enough: after a string or
/// bytes part's terminator `00`, a following `ff` makes that `00` an escaped NUL inside a
/// longer part (`["a\0b"]` starts with the bytes of `["a"]`). Encoded parts all start with a
/// tag in `01`…`27`, so the key space of `prefix` is exactly `prefix <= key < prefix ++ ff`:
/// `prefix` itself, and the keys that continue it with a byte other than `ff`.
pub fn in_prefix(prefix: &[u8], key: &[u8]) -> bool {
    key.starts_with(prefix) && key.get(prefix.len()) != Some(&0xff)
}

/// Whether the read range `[start, end)` lies in the key space of `prefix` (see
/// [`in_prefix`]): both bounds lie in `[prefix, prefix ++ ff]`, so every key the range can
/// hold does. Deno's `list({ prefix })` range, `[p ++ 00, p ++ ff)`, lies in the key space of
/// `p` and of every prefix of `p`.
pub fn range_in_prefix(prefix: &[u8], start: &[u8], end: &[u8]) -> bool {
    let within = |b: &[u8]| {
        b.starts_with(prefix)
            && b.get(prefix.len())
                .is_none_or(|&next| next < 0xff || b.len() == prefix.len() + 1)
    };
    within(start) && within(end)
}

/// Parses key prefixes written as JavaScript key literals, one after the other:
/// `["users"] ["logs", 2024n] []`. A part is a string in JSON syntax (`"a\"b"`), a bigint
/// (`1n`, `-7n`), a number (`1`, `2.5`, `-1e3`: a JS number is a double, so `1` and `1n` are
/// different parts), `true`, `false`, or bytes as hex (`b"00ff"`, a `Uint8Array`). Returns
/// each prefix's parts; an error says what was expected and where (character offset).
pub fn parse_literals(text: &str) -> Result<Vec<Vec<KeyPart>>, String> {
    let mut p = LiteralParser { s: text, at: 0 };
    let mut out = Vec::new();
    loop {
        p.skip_ws();
        if p.at == text.len() {
            return Ok(out);
        }
        let prefix = out.len() + 1;
        if !p.eat("[") {
            return Err(p.error(&format!("prefix {prefix}: expected `[`")));
        }
        let mut parts = Vec::new();
        p.skip_ws();
        if !p.eat("]") {
            loop {
                p.skip_ws();
                parts.push(
                    p.part()
                        .map_err(|e| p.error(&format!("prefix {prefix}: {e}")))?,
                );
                p.skip_ws();
                if p.eat("]") {
                    break;
                }
                if !p.eat(",") {
                    return Err(p.error(&format!("prefix {prefix}: expected `,` or `]`")));
                }
            }
        }
        out.push(parts);
    }
}

struct LiteralParser<'a> {
    s: &'a str,
    at: usize,
}

impl LiteralParser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.at..]
    }

    fn skip_ws(&mut self) {
        let rest = self.rest();
        self.at += rest.len() - rest.trim_start().len();
    }

    fn eat(&mut self, token: &str) -> bool {
        let ok = self.rest().starts_with(token);
        if ok {
            self.at += token.len();
        }
        ok
    }

    fn error(&self, what: &str) -> String {
        let column = self.s[..self.at].chars().count() + 1;
        format!("{what} at character {column} of the prefixes")
    }

    /// The JSON string starting at the current `"`, unescaped.
    fn json_string(&mut self) -> Result<String, &'static str> {
        let rest = self.rest();
        let mut escaped = false;
        for (i, c) in rest.char_indices().skip(1) {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    let s = serde_json::from_str(&rest[..=i]).map_err(|_| "invalid string")?;
                    self.at += i + 1;
                    return Ok(s);
                }
                _ => {}
            }
        }
        Err("unterminated string")
    }

    fn part(&mut self) -> Result<KeyPart, &'static str> {
        const EXPECTED: &str = "expected a key part (\"string\", 1n, 1.5, true, false or b\"hex\")";
        if self.rest().starts_with('"') {
            return self.json_string().map(KeyPart::String);
        }
        if self.eat("b\"") {
            self.at -= 1;
            let hex = self.json_string()?;
            if hex.len() % 2 != 0 {
                return Err("bytes need an even number of hex digits");
            }
            return (0..hex.len())
                .step_by(2)
                .map(|i| {
                    hex.get(i..i + 2)
                        .and_then(|d| u8::from_str_radix(d, 16).ok())
                        .ok_or("invalid hex in bytes")
                })
                .collect::<Result<Vec<u8>, _>>()
                .map(KeyPart::Bytes);
        }
        if self.eat("true") {
            return Ok(KeyPart::True);
        }
        if self.eat("false") {
            return Ok(KeyPart::False);
        }
        let len = self
            .rest()
            .find(|c: char| !(c.is_ascii_digit() || matches!(c, '-' | '+' | '.' | 'e' | 'E')))
            .unwrap_or(self.rest().len());
        if len == 0 {
            return Err(EXPECTED);
        }
        let s = self.s;
        let number = &s[self.at..self.at + len];
        self.at += len;
        if self.eat("n") {
            return number
                .parse::<i128>()
                .map(KeyPart::Int)
                .map_err(|_| "invalid bigint (an integer, within ±2^127)");
        }
        // JSON's number syntax, which is JavaScript's decimal literal syntax.
        match serde_json::from_str::<serde_json::Value>(number) {
            Ok(serde_json::Value::Number(n)) => n.as_f64().map(KeyPart::Float).ok_or(EXPECTED),
            _ => Err("invalid number"),
        }
    }
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

    #[test]
    fn a_prefix_holds_keys_that_continue_it_at_a_part_boundary() {
        let users = encode(&[String("users".into())]);
        let inside = [
            vec![String("users".into())],
            vec![String("users".into()), Int(1)],
            vec![String("users".into()), String("".into())],
            vec![String("users".into()), Bytes(vec![0xff])],
            vec![String("users".into()), True, Float(f64::NAN)],
        ];
        for k in &inside {
            assert!(in_prefix(&users, &encode(k)), "{k:?}");
        }
        let outside = [
            vec![],
            vec![String("user".into())],
            vec![String("users2".into())],
            // Bytewise `users` ++ `00 ff 78 00`: one longer string part, not `users` + more.
            vec![String("users\0x".into())],
            vec![String("usert".into())],
            vec![Bytes(b"users".to_vec())],
        ];
        for k in &outside {
            assert!(!in_prefix(&users, &encode(k)), "{k:?}");
        }
        // The byte-prefix trap, spelled out: every key part after the prefix starts with a
        // tag, never with ff.
        let longer = encode(&[String("a\0b".into())]);
        let a = encode(&[String("a".into())]);
        assert!(longer.starts_with(&a) && !in_prefix(&a, &longer));
        // Integer and bytes prefixes.
        let one = encode(&[Int(1)]);
        assert!(in_prefix(&one, &encode(&[Int(1), Int(2)])));
        assert!(!in_prefix(&one, &encode(&[Int(256)])));
        let bytes = encode(&[Bytes(vec![1, 0])]);
        assert!(in_prefix(&bytes, &encode(&[Bytes(vec![1, 0]), False])));
        assert!(!in_prefix(&bytes, &encode(&[Bytes(vec![1, 0, 0])])));
        // The empty prefix holds every key.
        assert!(in_prefix(&[], &users) && in_prefix(&[], &[]));
    }

    #[test]
    fn a_range_is_inside_a_prefix_only_with_both_bounds_inside() {
        let p = encode(&[String("users".into())]);
        let deeper = encode(&[String("users".into()), Int(7)]);
        let (start, end) = prefix_range(&p);
        // list({ prefix }) of the prefix and of anything under it.
        assert!(range_in_prefix(&p, &start, &end));
        let (ds, de) = prefix_range(&deeper);
        assert!(range_in_prefix(&p, &ds, &de));
        // get(k) reads [k, k ++ 00).
        let mut after = deeper.clone();
        after.push(0);
        assert!(range_in_prefix(&p, &deeper, &after));
        let mut after_p = p.clone();
        after_p.push(0);
        assert!(range_in_prefix(&p, &p, &after_p));
        // list({ prefix: [] }), and ranges that reach out on either side.
        assert!(!range_in_prefix(&p, &[0x00], &[0xff]));
        let mut past = p.clone();
        past.extend_from_slice(&[0xff, 0x00]);
        assert!(!range_in_prefix(&p, &start, &past), "end past p ++ ff");
        let before = encode(&[String("user".into())]);
        assert!(!range_in_prefix(&p, &before, &end), "start before p");
        // A longer string that shares the bytes: ["users\0"] = users 00 ff 00.
        let trap = encode(&[String("users\0".into())]);
        let (ts, te) = prefix_range(&trap);
        assert!(!range_in_prefix(&p, &ts, &te));
        // list({ prefix: ["user"] }) is wider than ["users"].
        let (ws, we) = prefix_range(&before);
        assert!(!range_in_prefix(&p, &ws, &we));
    }

    #[test]
    fn key_literals_parse_like_javascript_keys() {
        let parsed =
            parse_literals(r#" ["users", 1n, -2n, 1, 2.5, true, false, b"00ff", "a\"b"] [] ["x"]"#)
                .unwrap();
        assert_eq!(
            parsed,
            vec![
                vec![
                    String("users".into()),
                    Int(1),
                    Int(-2),
                    Float(1.0),
                    Float(2.5),
                    True,
                    False,
                    Bytes(vec![0, 255]),
                    String("a\"b".into()),
                ],
                vec![],
                vec![String("x".into())],
            ]
        );
        assert_eq!(parse_literals("").unwrap(), Vec::<Vec<KeyPart>>::new());
        let err = |t: &str| parse_literals(t).unwrap_err();
        assert_eq!(
            err("users"),
            "prefix 1: expected `[` at character 1 of the prefixes"
        );
        assert_eq!(
            err(r#"["a"] ["b" "c"]"#),
            "prefix 2: expected `,` or `]` at character 12 of the prefixes"
        );
        assert!(err(r#"["a"#).contains("unterminated string"));
        assert!(err(r#"[users]"#).contains("expected a key part"));
        assert!(err(r#"[1.5n]"#).contains("invalid bigint"));
        assert!(err(r#"[b"0"]"#).contains("even number"));
        assert!(err(r#"[b"zz"]"#).contains("invalid hex"));
        assert!(err(r#"[1e]"#).contains("invalid number"));
        assert!(err(r#"["a",]"#).contains("expected a key part"));
        assert!(err(r#"["a", "b"#).contains("unterminated"));
    }
}
