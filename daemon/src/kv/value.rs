//! Value encodings (SPEC §5) and the LE64 mutations `sum`, `min` and `max` (SPEC §2.4.4).

use bytes::Bytes;

use super::KvError;

/// How a value's bytes are encoded. Only these three are ever stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Encoding {
    V8 = 1,
    Le64 = 2,
    Bytes = 3,
}

impl Encoding {
    /// The encoding named by a wire or database number; unknown numbers are a 400.
    pub fn from_number(n: i64) -> Result<Self, KvError> {
        match n {
            1 => Ok(Encoding::V8),
            2 => Ok(Encoding::Le64),
            3 => Ok(Encoding::Bytes),
            _ => Err(KvError::new(format!("The value encoding {n} is unknown."))),
        }
    }
}

/// A value as stored: its bytes and its encoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Value {
    pub data: Bytes,
    pub encoding: Encoding,
}

impl Value {
    pub fn le64(n: u64) -> Self {
        Value {
            data: Bytes::copy_from_slice(&n.to_le_bytes()),
            encoding: Encoding::Le64,
        }
    }

    /// The u64 of an LE64 value, if this is one with exactly 8 bytes.
    pub fn as_u64(&self) -> Option<u64> {
        match self.encoding {
            Encoding::Le64 => <[u8; 8]>::try_from(&self.data[..])
                .ok()
                .map(u64::from_le_bytes),
            _ => None,
        }
    }
}

/// A row's value as read back from the database, where the encoding number is not yet trusted.
#[derive(Clone, Debug)]
pub struct StoredValue {
    pub data: Bytes,
    pub encoding: i64,
}

impl StoredValue {
    pub fn decode(self) -> Result<Value, KvError> {
        Ok(Value {
            encoding: Encoding::from_number(self.encoding)?,
            data: self.data,
        })
    }
}

/// The three LE64 mutations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Le64Op {
    Sum,
    Min,
    Max,
}

impl Le64Op {
    pub fn name(self) -> &'static str {
        match self {
            Le64Op::Sum => "sum",
            Le64Op::Min => "min",
            Le64Op::Max => "max",
        }
    }

    /// Applies the operation to the stored value (`None` when the key is absent).
    pub fn apply(self, stored: Option<StoredValue>, operand: u64) -> Result<Value, KvError> {
        let Some(stored) = stored else {
            return Ok(Value::le64(operand));
        };
        let old = stored.decode()?.as_u64().ok_or_else(|| {
            KvError::new(format!(
                "Failed to perform '{}' mutation on a non-U64 value in the database",
                self.name()
            ))
        })?;
        Ok(Value::le64(match self {
            Le64Op::Sum => old.wrapping_add(operand),
            Le64Op::Min => old.min(operand),
            Le64Op::Max => old.max(operand),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(v: Value) -> Option<StoredValue> {
        Some(StoredValue {
            data: v.data,
            encoding: v.encoding as i64,
        })
    }

    #[test]
    fn le64_spec_vector() {
        assert_eq!(&Value::le64(42).data[..], &[0x2a, 0, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn sum_wraps_modulo_2_pow_64() {
        let r = Le64Op::Sum.apply(stored(Value::le64(u64::MAX)), 2).unwrap();
        assert_eq!(r.as_u64(), Some(1));
    }

    #[test]
    fn absent_key_stores_operand() {
        for op in [Le64Op::Sum, Le64Op::Min, Le64Op::Max] {
            assert_eq!(op.apply(None, 7).unwrap().as_u64(), Some(7));
        }
    }

    #[test]
    fn min_max_compare_unsigned() {
        let big = stored(Value::le64(1 << 63));
        assert_eq!(Le64Op::Min.apply(big.clone(), 5).unwrap().as_u64(), Some(5));
        assert_eq!(Le64Op::Max.apply(big, 5).unwrap().as_u64(), Some(1 << 63));
    }

    #[test]
    fn non_u64_stored_value_is_an_error_with_upstream_text() {
        let v8 = stored(Value {
            data: Bytes::from_static(b"\xff\x0f\x49\x02"),
            encoding: Encoding::V8,
        });
        let err = Le64Op::Sum.apply(v8, 1).unwrap_err();
        assert_eq!(
            err.message(),
            "Failed to perform 'sum' mutation on a non-U64 value in the database"
        );
        let bytes = stored(Value {
            data: Bytes::from_static(b"x"),
            encoding: Encoding::Bytes,
        });
        let err = Le64Op::Min.apply(bytes, 1).unwrap_err();
        assert_eq!(
            err.message(),
            "Failed to perform 'min' mutation on a non-U64 value in the database"
        );
    }

    #[test]
    fn unknown_stored_encoding_is_named() {
        let s = Some(StoredValue {
            data: Bytes::from_static(b"x"),
            encoding: 7,
        });
        assert_eq!(
            Le64Op::Max.apply(s, 1).unwrap_err().message(),
            "The value encoding 7 is unknown."
        );
    }

    #[test]
    fn wrong_length_le64_in_database_is_not_a_u64() {
        let s = Some(StoredValue {
            data: Bytes::from_static(b"\x01\x02"),
            encoding: 2,
        });
        assert!(Le64Op::Sum.apply(s, 1).is_err());
    }
}
