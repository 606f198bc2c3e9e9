//! The statements the readers and the committer run on the `kv`, `queue` and `data_version`
//! tables (SPEC §7), and the one rule every read of `kv` shares.

/// A row is visible unless it has an expiry that has passed (SPEC §10 D4): expired rows are
/// absent even before the sweep deletes them. `$now` names the parameter holding the current
/// time in ms.
macro_rules! unexpired {
    ($now:literal) => {
        concat!("(expiration_ms < 0 OR expiration_ms > ", $now, ")")
    };
}

// Reads.
pub const SCAN_FORWARD: &str = concat!(
    "SELECT k, v, v_encoding, version, seq FROM kv WHERE k >= ?1 AND k < ?2 AND ",
    unexpired!("?3"),
    " ORDER BY k ASC LIMIT ?4"
);
pub const SCAN_REVERSE: &str = concat!(
    "SELECT k, v, v_encoding, version, seq FROM kv WHERE k >= ?1 AND k < ?2 AND ",
    unexpired!("?3"),
    " ORDER BY k DESC LIMIT ?4"
);
pub const GET: &str = concat!(
    "SELECT k, v, v_encoding, version, seq FROM kv WHERE k = ?1 AND ",
    unexpired!("?2")
);

// The committer's reads inside a write.
pub const LOOKUP_VERSION: &str = concat!(
    "SELECT version, seq FROM kv WHERE k = ?1 AND ",
    unexpired!("?2")
);
pub const LOOKUP_VALUE: &str = concat!(
    "SELECT v, v_encoding FROM kv WHERE k = ?1 AND ",
    unexpired!("?2")
);

// Writes.
pub const UPSERT: &str =
    "INSERT INTO kv (k, v, v_encoding, version, seq, expiration_ms) VALUES (?1, ?2, ?3, ?4, 0, ?5)
     ON CONFLICT (k) DO UPDATE SET v = excluded.v, v_encoding = excluded.v_encoding,
       version = excluded.version, seq = 0, expiration_ms = excluded.expiration_ms";
pub const DELETE: &str = "DELETE FROM kv WHERE k = ?1";
/// A row as a backup recorded it (restore): its own version and sequence number.
pub const RESTORE_ROW: &str =
    "INSERT OR REPLACE INTO kv (k, v, v_encoding, version, seq, expiration_ms)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6)";
pub const ENQUEUE: &str =
    "INSERT INTO queue (ts, id, data, backoff_schedule, keys_if_undelivered) VALUES (?1, ?2, ?3, ?4, ?5)";

// The global version (every writer of the file advances it: SPEC §2.6).
pub const GET_VERSION: &str = "SELECT version FROM data_version WHERE k = 0";
pub const SET_VERSION: &str = "UPDATE data_version SET version = ?1 WHERE k = 0";

// Expiry.
pub const DELETE_EXPIRED: &str = "DELETE FROM kv WHERE k IN
       (SELECT k FROM kv WHERE expiration_ms >= 0 AND expiration_ms <= ?1 LIMIT ?2)
     RETURNING k";
pub const NEXT_EXPIRY: &str = "SELECT min(expiration_ms) FROM kv WHERE expiration_ms >= 0";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_read_of_kv_hides_expired_rows() {
        for sql in [
            SCAN_FORWARD,
            SCAN_REVERSE,
            GET,
            LOOKUP_VERSION,
            LOOKUP_VALUE,
        ] {
            assert!(
                sql.contains("(expiration_ms < 0 OR expiration_ms > ?"),
                "{sql}"
            );
        }
        assert_eq!(
            GET,
            "SELECT k, v, v_encoding, version, seq FROM kv WHERE k = ?1 AND \
             (expiration_ms < 0 OR expiration_ms > ?2)"
        );
    }
}
