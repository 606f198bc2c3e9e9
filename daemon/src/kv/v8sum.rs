//! `M_SUM` with a V8 operand (SPEC §2.4.6): V8 numbers and BigInts, with optional bounds.
//!
//! Only the few V8 ValueSerializer tags that carry numbers are understood; any other V8 value is
//! "not a number" for a sum.

use bytes::Bytes;
use num_bigint::{BigInt, BigUint, Sign};
use num_traits::{ToPrimitive, Zero};

use super::value::{Encoding, StoredValue, Value};
use super::KvError;

/// A number a sum works on.
#[derive(Clone, Debug, PartialEq)]
pub enum SumNumber {
    BigInt(BigInt),
    Number(f64),
    KvU64(u64),
}

impl SumNumber {
    fn kind(&self) -> &'static str {
        match self {
            SumNumber::BigInt(_) => "BigInt",
            SumNumber::Number(_) => "Number",
            SumNumber::KvU64(_) => "KvU64",
        }
    }

    fn into_value(self) -> Value {
        match self {
            SumNumber::BigInt(b) => Value {
                data: encode_bigint(&b),
                encoding: Encoding::V8,
            },
            SumNumber::Number(n) => Value {
                data: encode_number(n),
                encoding: Encoding::V8,
            },
            SumNumber::KvU64(n) => Value::le64(n),
        }
    }
}

/// Why V8 bytes are not a number.
#[derive(Debug, PartialEq, Eq)]
pub enum V8Error {
    Empty,
    Malformed,
    NotANumber,
}

fn invalid_params() -> KvError {
    KvError::new("Some of the parameters are not valid V8 values")
}

/// Parses V8 ValueSerializer bytes holding a number or a BigInt.
pub fn parse_number(data: &[u8]) -> Result<SumNumber, V8Error> {
    if data.is_empty() {
        return Err(V8Error::Empty);
    }
    let mut r = Reader { data, pos: 0 };
    if r.byte()? != 0xFF {
        return Err(V8Error::Malformed);
    }
    let version = r.varint()?;
    if version < 13 {
        return Err(V8Error::Malformed);
    }
    // Padding bytes may precede the value.
    let mut tag = r.byte()?;
    while tag == 0x00 {
        tag = r.byte()?;
    }
    let n = match tag {
        b'I' => {
            let z = r.varint()? as u32;
            SumNumber::Number(((z >> 1) as i32 ^ -((z & 1) as i32)) as f64)
        }
        b'U' => SumNumber::Number(r.varint()? as u32 as f64),
        b'N' => SumNumber::Number(f64::from_le_bytes(r.take(8)?.try_into().unwrap())),
        b'Z' => {
            let bitfield = r.varint()?;
            let len = (bitfield >> 1) as usize;
            let magnitude = BigUint::from_bytes_le(r.take(len)?);
            let sign = if bitfield & 1 == 1 {
                Sign::Minus
            } else {
                Sign::Plus
            };
            SumNumber::BigInt(BigInt::from_biguint(sign, magnitude))
        }
        _ => return Err(V8Error::NotANumber),
    };
    if r.pos != data.len() {
        return Err(V8Error::Malformed);
    }
    Ok(n)
}

struct Reader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Result<u8, V8Error> {
        let b = *self.data.get(self.pos).ok_or(V8Error::Malformed)?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], V8Error> {
        let end = self.pos.checked_add(n).ok_or(V8Error::Malformed)?;
        let s = self.data.get(self.pos..end).ok_or(V8Error::Malformed)?;
        self.pos = end;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64, V8Error> {
        let mut out = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            out |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(out);
            }
        }
        Err(V8Error::Malformed)
    }
}

fn push_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A V8 BigInt, magnitude padded to a multiple of 8 bytes as V8 itself writes it.
pub fn encode_bigint(b: &BigInt) -> Bytes {
    let mut mag = if b.is_zero() {
        Vec::new()
    } else {
        b.magnitude().to_bytes_le()
    };
    mag.resize(mag.len().div_ceil(8) * 8, 0);
    let mut out = vec![0xFF, 0x0F, b'Z'];
    let negative = b.sign() == Sign::Minus;
    push_varint(&mut out, ((mag.len() as u64) << 1) | negative as u64);
    out.extend_from_slice(&mag);
    Bytes::from(out)
}

/// A V8 double.
pub fn encode_number(n: f64) -> Bytes {
    let mut out = vec![0xFF, 0x0F, b'N'];
    out.extend_from_slice(&n.to_le_bytes());
    Bytes::from(out)
}

/// The operand and bounds of a V8 sum, checked before any database access.
#[derive(Clone, Debug, PartialEq)]
pub struct V8Sum {
    pub operand: SumNumber,
    pub min: Option<SumNumber>,
    pub max: Option<SumNumber>,
    pub clamp: bool,
}

impl V8Sum {
    pub fn parse(operand: &[u8], min: &[u8], max: &[u8], clamp: bool) -> Result<Self, KvError> {
        let operand = parse_number(operand).map_err(|_| invalid_params())?;
        let bound = |b: &[u8]| -> Result<Option<SumNumber>, KvError> {
            if b.is_empty() {
                return Ok(None);
            }
            let n = parse_number(b).map_err(|_| invalid_params())?;
            if n.kind() != operand.kind() {
                return Err(KvError::new(
                    "Min/max parameters have different types than the operand",
                ));
            }
            Ok(Some(n))
        };
        Ok(V8Sum {
            min: bound(min)?,
            max: bound(max)?,
            operand,
            clamp,
        })
    }

    /// Adds the operand to the stored value (`None`: absent key) and applies the bounds.
    pub fn apply(&self, stored: Option<StoredValue>) -> Result<Value, KvError> {
        let Some(stored) = stored else {
            // Upstream stores the operand unchecked here (D12); we apply the bounds.
            return Ok(self.bounded(self.operand.clone())?.into_value());
        };
        let stored = match Encoding::from_number(stored.encoding) {
            Err(_) => return Err(KvError::new("Invalid sum operand")),
            Ok(Encoding::Le64) => match <[u8; 8]>::try_from(&stored.data[..]) {
                Ok(b) => SumNumber::KvU64(u64::from_le_bytes(b)),
                Err(_) => return Err(KvError::new("invalid v8 value")),
            },
            Ok(Encoding::Bytes) => return Err(KvError::new("unsupported value type")),
            Ok(Encoding::V8) => match parse_number(&stored.data) {
                Ok(n) => n,
                Err(V8Error::Empty) => return Err(KvError::new("operand cannot be empty")),
                Err(V8Error::Malformed) => return Err(KvError::new("invalid v8 value")),
                Err(V8Error::NotANumber) => return Err(KvError::new("unsupported value type")),
            },
        };
        let no_bounds = self.min.is_none() && self.max.is_none() && !self.clamp;
        let sum = match (&stored, &self.operand) {
            (SumNumber::KvU64(a), SumNumber::BigInt(b)) if no_bounds => match b.to_u64() {
                Some(b) => SumNumber::KvU64(a.wrapping_add(b)),
                None => return Err(mixed(&stored, &self.operand)),
            },
            (SumNumber::BigInt(a), SumNumber::BigInt(b)) => SumNumber::BigInt(a + b),
            (SumNumber::Number(a), SumNumber::Number(b)) => SumNumber::Number(a + b),
            (SumNumber::KvU64(_), SumNumber::KvU64(_)) => {
                return Err(KvError::new(
                    "Cannot use min/max parameters with KvU64 operands",
                ))
            }
            _ => return Err(mixed(&stored, &self.operand)),
        };
        Ok(self.bounded(sum)?.into_value())
    }

    fn bounded(&self, n: SumNumber) -> Result<SumNumber, KvError> {
        let below = |b: &SumNumber| less(&n, b);
        let above = |b: &SumNumber| less(b, &n);
        let out_of_range =
            || KvError::new("The result of a Sum operation would exceed its range limit");
        if let Some(min) = self.min.as_ref().filter(|m| below(m)) {
            return if self.clamp {
                Ok(min.clone())
            } else {
                Err(out_of_range())
            };
        }
        if let Some(max) = self.max.as_ref().filter(|m| above(m)) {
            return if self.clamp {
                Ok(max.clone())
            } else {
                Err(out_of_range())
            };
        }
        Ok(n)
    }
}

fn less(a: &SumNumber, b: &SumNumber) -> bool {
    match (a, b) {
        (SumNumber::BigInt(a), SumNumber::BigInt(b)) => a < b,
        (SumNumber::Number(a), SumNumber::Number(b)) => a < b,
        (SumNumber::KvU64(a), SumNumber::KvU64(b)) => a < b,
        _ => false,
    }
}

fn mixed(stored: &SumNumber, operand: &SumNumber) -> KvError {
    KvError::new(format!(
        "Cannot sum {} with {}",
        stored.kind(),
        operand.kind()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn v8(s: &str) -> Option<StoredValue> {
        Some(StoredValue {
            data: Bytes::from(hex(s)),
            encoding: 1,
        })
    }

    fn big(n: i64) -> SumNumber {
        SumNumber::BigInt(BigInt::from(n))
    }

    #[test]
    fn parses_spec_vectors() {
        assert_eq!(parse_number(&hex("ff0f5a020a")), Ok(big(10)));
        assert_eq!(parse_number(&hex("ff0f5a0301")), Ok(big(-1)));
        assert_eq!(
            parse_number(&hex("ff0f4e000000000000f83f")),
            Ok(SumNumber::Number(1.5))
        );
        assert_eq!(parse_number(&hex("ff0f4902")), Ok(SumNumber::Number(1.0)));
        assert_eq!(parse_number(&hex("ff0f4901")), Ok(SumNumber::Number(-1.0)));
        assert_eq!(parse_number(&hex("ff0f5a100a00000000000000")), Ok(big(10)));
    }

    #[test]
    fn rejects_non_numbers_and_garbage() {
        assert_eq!(parse_number(b""), Err(V8Error::Empty));
        assert_eq!(parse_number(&hex("ff0f5a20")), Err(V8Error::Malformed));
        assert_eq!(parse_number(&hex("ff0f5f")), Err(V8Error::NotANumber)); // undefined
        assert_eq!(parse_number(&hex("ff0f4902ff")), Err(V8Error::Malformed)); // trailing byte
        assert_eq!(parse_number(&hex("00")), Err(V8Error::Malformed));
    }

    #[test]
    fn bigint_encoding_round_trips_padded() {
        for n in [0i64, 1, -1, 10, i64::MAX, i64::MIN + 1] {
            let enc = encode_bigint(&BigInt::from(n));
            assert_eq!((enc.len() - 4) % 8, 0, "{n}");
            assert_eq!(parse_number(&enc), Ok(big(n)));
        }
        assert_eq!(
            &encode_bigint(&BigInt::from(10))[..],
            &hex("ff0f5a100a00000000000000")[..]
        );
    }

    #[test]
    fn bigint_and_number_sums() {
        let s = V8Sum::parse(&hex("ff0f5a020a"), b"", b"", false).unwrap();
        assert_eq!(
            parse_number(&s.apply(v8("ff0f5a0301")).unwrap().data),
            Ok(big(9))
        );
        let s = V8Sum::parse(&hex("ff0f4e000000000000f83f"), b"", b"", false).unwrap();
        assert_eq!(
            parse_number(&s.apply(v8("ff0f4902")).unwrap().data),
            Ok(SumNumber::Number(2.5))
        );
    }

    #[test]
    fn mixed_kinds_are_named() {
        let s = V8Sum::parse(&hex("ff0f4902"), b"", b"", false).unwrap();
        assert_eq!(
            s.apply(v8("ff0f5a020a")).unwrap_err().message(),
            "Cannot sum BigInt with Number"
        );
    }

    #[test]
    fn kvu64_with_bigint_operand_wraps_as_u64() {
        let s = V8Sum::parse(&hex("ff0f5a0202"), b"", b"", false).unwrap();
        let stored = Some(StoredValue {
            data: Bytes::copy_from_slice(&u64::MAX.to_le_bytes()),
            encoding: 2,
        });
        assert_eq!(s.apply(stored).unwrap(), Value::le64(1));
    }

    #[test]
    fn bounds_clamp_or_fail_also_on_absent_key() {
        let ten = hex("ff0f5a020a");
        let five = encode_bigint(&BigInt::from(5));
        let clamp = V8Sum::parse(&ten, b"", &five, true).unwrap();
        assert_eq!(parse_number(&clamp.apply(None).unwrap().data), Ok(big(5)));
        let fail = V8Sum::parse(&ten, b"", &five, false).unwrap();
        assert_eq!(
            fail.apply(None).unwrap_err().message(),
            "The result of a Sum operation would exceed its range limit"
        );
        let min = encode_bigint(&BigInt::from(0));
        let neg = V8Sum::parse(&hex("ff0f5a0301"), &min, b"", true).unwrap();
        assert_eq!(
            parse_number(&neg.apply(v8("ff0f5a00")).unwrap().data),
            Ok(big(0))
        );
    }

    #[test]
    fn bound_kind_must_match_operand() {
        let err = V8Sum::parse(&hex("ff0f5a020a"), &hex("ff0f4902"), b"", false).unwrap_err();
        assert_eq!(
            err.message(),
            "Min/max parameters have different types than the operand"
        );
        let err = V8Sum::parse(b"xyz", b"", b"", false).unwrap_err();
        assert_eq!(
            err.message(),
            "Some of the parameters are not valid V8 values"
        );
    }

    #[test]
    fn stored_value_errors() {
        let s = V8Sum::parse(&hex("ff0f4902"), b"", b"", false).unwrap();
        let bytes = Some(StoredValue {
            data: Bytes::from_static(b"x"),
            encoding: 3,
        });
        assert_eq!(
            s.apply(bytes).unwrap_err().message(),
            "unsupported value type"
        );
        assert_eq!(
            s.apply(v8("")).unwrap_err().message(),
            "operand cannot be empty"
        );
        assert_eq!(
            s.apply(v8("0102")).unwrap_err().message(),
            "invalid v8 value"
        );
        let unknown = Some(StoredValue {
            data: Bytes::from_static(b"x"),
            encoding: 9,
        });
        assert_eq!(
            s.apply(unknown).unwrap_err().message(),
            "Invalid sum operand"
        );
    }
}
