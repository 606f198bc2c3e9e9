//! Storage: the Deno-compatible SQLite schema, the committer (the only writer), per-core
//! readers, expiry, and watch notification. All SQL lives here.

pub mod checkpointer;
pub mod committer;
pub mod external;
pub mod outbox;
pub mod reader;
pub mod replica;
pub mod schema;
pub(crate) mod sql;
pub mod wal_vfs;
pub mod watch;

use std::fmt;

use crate::kv::KvError;

pub use committer::{CommitterHandle, Inline};
pub use outbox::BackupOutbox;
pub use reader::{Reader, SNAPSHOT_HOLD};
pub use schema::SyncMode;
pub use wal_vfs::WalWrites;
pub use watch::WatchRegistry;

/// Why the store could not serve a request.
#[derive(Debug)]
pub enum StoreError {
    /// The request (or a stored value it met) is invalid: a 400, nothing was written.
    Invalid(KvError),
    /// The database failed; for writes, nothing was committed.
    Database(rusqlite::Error),
    /// The committer is gone (shutting down) or rolled back the batch; nothing was committed,
    /// so the client may retry.
    Unavailable,
    /// The disk is full; nothing was committed. Retrying succeeds once there is space.
    DiskFull,
    /// The commit failed after it may have reached the disk: the write may or may not be
    /// durable. Never told to a client as retryable; the server stops (see `committer::failure`).
    OutcomeUnknown,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Database(e)
    }
}

impl From<KvError> for StoreError {
    fn from(e: KvError) -> Self {
        StoreError::Invalid(e)
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Invalid(e) => write!(f, "{e}"),
            StoreError::Database(e) => write!(f, "database error: {e}"),
            StoreError::Unavailable => f.write_str("the committer is unavailable"),
            StoreError::DiskFull => f.write_str("the disk is full"),
            StoreError::OutcomeUnknown => f.write_str("the outcome of the commit is unknown"),
        }
    }
}

impl std::error::Error for StoreError {}

#[cfg(test)]
mod tests;
