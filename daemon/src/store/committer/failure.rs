//! What a failed commit means for the writes it carried (docs/RELIABILITY.md).
//!
//! The rule, after PostgreSQL's answer to "fsyncgate": an error before the commit record can
//! have reached the disk is clean (roll back, tell the writers nothing was committed, carry
//! on); an error at or after that point is not: the transaction may come back when SQLite
//! recovers the WAL at the next open, so no writer may be told it failed, and the process
//! must not commit anything else (a later commit would overwrite those WAL frames, deciding
//! the outcome behind the clients' backs). The committer then stops the server.
//!
//! In WAL mode SQLite's COMMIT writes the transaction's frames, the commit frame last, then
//! syncs the WAL (`synchronous=FULL`). A failed frame write (`SQLITE_FULL`,
//! `SQLITE_IOERR_WRITE`) means the commit frame was never written: clean. A failed sync
//! (`SQLITE_IOERR_FSYNC`) comes after the commit frame was written: ambiguous. Any other error
//! from COMMIT is treated as ambiguous, as is a ROLLBACK that fails (the connection's state is
//! then unknown).

use rusqlite::ffi;

use crate::metrics::CommitPhase;
use crate::store::StoreError;

/// A commit that failed, and where.
#[derive(Debug)]
pub struct Failure {
    pub phase: CommitPhase,
    pub error: rusqlite::Error,
}

impl Failure {
    /// An error while applying writes, before COMMIT.
    pub fn applying(error: rusqlite::Error) -> Failure {
        Failure {
            phase: CommitPhase::Apply,
            error,
        }
    }

    /// An error returned by the COMMIT statement, classified by SQLite's extended code.
    pub fn committing(error: rusqlite::Error) -> Failure {
        let phase = match extended_code(&error) {
            Some(ffi::SQLITE_FULL) | Some(ffi::SQLITE_IOERR_WRITE) => CommitPhase::WalWrite,
            Some(ffi::SQLITE_IOERR_FSYNC) => CommitPhase::WalSync,
            _ => CommitPhase::Commit,
        };
        Failure { phase, error }
    }

    /// A ROLLBACK that failed.
    pub fn rolling_back(error: rusqlite::Error) -> Failure {
        Failure {
            phase: CommitPhase::Rollback,
            error,
        }
    }

    /// The commit may have reached the disk, or the connection is in an unknown state: the
    /// committer must stop and the server exit.
    pub fn is_ambiguous(&self) -> bool {
        matches!(
            self.phase,
            CommitPhase::WalSync | CommitPhase::Commit | CommitPhase::Rollback
        )
    }

    /// The disk (or the file system's quota) is full.
    pub fn is_disk_full(&self) -> bool {
        extended_code(&self.error).map(|c| c & 0xff) == Some(ffi::SQLITE_FULL)
    }

    /// The answer for a write that would have committed in the failed transaction.
    pub fn answer_for_applied(&self) -> StoreError {
        if self.is_ambiguous() {
            StoreError::OutcomeUnknown
        } else {
            self.answer_for_unapplied()
        }
    }

    /// The answer for a write that changed nothing in the failed transaction (its checks
    /// failed, or it was invalid). Those answers were computed against writes of the batch
    /// that are now rolled back (or undecided), so they may be wrong; retrying is always safe
    /// for a write that changed nothing.
    pub fn answer_for_unapplied(&self) -> StoreError {
        if self.is_disk_full() {
            StoreError::DiskFull
        } else {
            StoreError::Unavailable
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} failed: {}", self.phase.name(), self.error)
    }
}

fn extended_code(e: &rusqlite::Error) -> Option<i32> {
    match e {
        rusqlite::Error::SqliteFailure(e, _) => Some(e.extended_code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sqlite_error(code: i32) -> rusqlite::Error {
        rusqlite::Error::SqliteFailure(ffi::Error::new(code), None)
    }

    #[test]
    fn commit_errors_before_the_commit_frame_are_clean_and_after_it_ambiguous() {
        let full = Failure::committing(sqlite_error(ffi::SQLITE_FULL));
        assert_eq!(full.phase, CommitPhase::WalWrite);
        assert!(!full.is_ambiguous());
        assert!(matches!(full.answer_for_applied(), StoreError::DiskFull));

        let write = Failure::committing(sqlite_error(ffi::SQLITE_IOERR_WRITE));
        assert_eq!(write.phase, CommitPhase::WalWrite);
        assert!(matches!(
            write.answer_for_applied(),
            StoreError::Unavailable
        ));

        let sync = Failure::committing(sqlite_error(ffi::SQLITE_IOERR_FSYNC));
        assert_eq!(sync.phase, CommitPhase::WalSync);
        assert!(sync.is_ambiguous());
        assert!(matches!(
            sync.answer_for_applied(),
            StoreError::OutcomeUnknown
        ));
        assert!(matches!(
            sync.answer_for_unapplied(),
            StoreError::Unavailable
        ));

        // Unknown errors at COMMIT: assume the worst.
        let other = Failure::committing(sqlite_error(ffi::SQLITE_IOERR_SHMMAP));
        assert_eq!(other.phase, CommitPhase::Commit);
        assert!(other.is_ambiguous());

        let rollback = Failure::rolling_back(sqlite_error(ffi::SQLITE_IOERR));
        assert!(rollback.is_ambiguous());
    }

    #[test]
    fn errors_while_applying_are_clean() {
        let full = Failure::applying(sqlite_error(ffi::SQLITE_FULL));
        assert!(!full.is_ambiguous());
        assert!(full.is_disk_full());
        assert!(matches!(full.answer_for_applied(), StoreError::DiskFull));
        let io = Failure::applying(sqlite_error(ffi::SQLITE_IOERR_READ));
        assert!(matches!(io.answer_for_applied(), StoreError::Unavailable));
    }
}
