//! The expiry sweep: deletes expired rows in small transactions (SPEC §7.6). Reads already
//! hide expired rows (`sql::unexpired!`); the sweep reclaims their space and wakes their
//! watchers.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rusqlite::params;

use super::failure::Failure;
use super::Committer;
use crate::kv::now_ms;
use crate::store::sql::{DELETE_EXPIRED, NEXT_EXPIRY, SET_VERSION};

/// Longest time between two expiry sweeps, to catch expiries written by other processes.
pub(super) const SWEEP_INTERVAL: Duration = Duration::from_secs(60);
/// Rows one sweep transaction deletes at most, so a sweep never holds writers up for long.
const SWEEP_CHUNK: i64 = 1000;
/// Pause after a failed sweep (a full disk, say), doubled at each further failure up to
/// `SWEEP_INTERVAL`: a failing sweep must not spin.
pub(super) const FIRST_RETRY: Duration = Duration::from_secs(1);

/// When the next sweep is due.
pub struct Schedule {
    /// Earliest expiry in the table, if any is known.
    next_expiry: Option<i64>,
    last_sweep: Instant,
    /// After a failed sweep: when to try again, and the pause to take after the next failure.
    retry: Option<(Instant, Duration)>,
}

impl Schedule {
    pub fn new() -> Schedule {
        Schedule {
            next_expiry: None,
            last_sweep: Instant::now(),
            retry: None,
        }
    }

    /// Time until the next sweep is due (zero: now).
    pub fn due_in(&self) -> Duration {
        if let Some((at, _)) = self.retry {
            return at.saturating_duration_since(Instant::now());
        }
        let periodic = SWEEP_INTERVAL.saturating_sub(self.last_sweep.elapsed());
        match self.next_expiry {
            Some(t) => periodic.min(Duration::from_millis((t - now_ms()).max(0) as u64)),
            None => periodic,
        }
    }

    /// The earliest expiry known (ms); only ever brought forward by commits.
    pub fn next_expiry(&self) -> Option<i64> {
        self.next_expiry
    }

    /// A committed write set an expiry at `t` (ms).
    pub fn expires_at(&mut self, t: i64) {
        self.next_expiry = Some(self.next_expiry.map_or(t, |n| n.min(t)));
    }

    /// Records a failed sweep; returns the pause before the next attempt.
    fn failed(&mut self) -> Duration {
        let pause = self.retry.map_or(FIRST_RETRY, |(_, p)| p);
        self.retry = Some((Instant::now() + pause, (pause * 2).min(SWEEP_INTERVAL)));
        pause
    }
}

impl Committer {
    /// Sweeps if a sweep is due. Fails only when the server must stop (see `failure`); a sweep
    /// that fails cleanly is rolled back, logged and tried again after a growing pause.
    pub(super) fn sweep_if_due(&mut self) -> Result<(), Failure> {
        if self.schedule.due_in().is_zero() {
            self.sweep()
        } else {
            Ok(())
        }
    }

    /// Deletes every expired row, in transactions of at most `SWEEP_CHUNK` rows.
    pub(super) fn sweep(&mut self) -> Result<(), Failure> {
        self.schedule.last_sweep = Instant::now();
        loop {
            // A long sweep is still progress: keep the watchdog fed between chunks.
            self.beat();
            match self.sweep_chunk() {
                Ok(n) if n < SWEEP_CHUNK as usize => break,
                Ok(_) => continue,
                Err(failure) => {
                    self.metrics.commit_failures(failure.phase).inc();
                    if failure.is_ambiguous() {
                        self.stopped = true;
                        return Err(failure);
                    }
                    self.rollback().inspect_err(|_| self.stopped = true)?;
                    let pause = self.schedule.failed();
                    tracing::error!(
                        "expiry sweep {failure}; rolled back, next attempt in {} s",
                        pause.as_secs_f64()
                    );
                    return Ok(());
                }
            }
        }
        self.schedule.retry = None;
        self.schedule.next_expiry = self
            .conn
            .query_row(NEXT_EXPIRY, [], |r| r.get(0))
            .unwrap_or(None);
        Ok(())
    }

    fn sweep_chunk(&mut self) -> Result<usize, Failure> {
        let now = now_ms();
        let version = self.begin().map_err(Failure::applying)?;
        let deleted: Vec<Bytes> = (|| {
            let deleted = self
                .conn
                .prepare_cached(DELETE_EXPIRED)?
                .query_map(params![now, SWEEP_CHUNK], |r| {
                    Ok(Bytes::from(r.get::<_, Vec<u8>>(0)?))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            if !deleted.is_empty() {
                self.conn
                    .prepare_cached(SET_VERSION)?
                    .execute([(version + 1) as i64])?;
                // The replica cannot expire rows itself: it gets the deletions (SPEC §8.7).
                if let Some(log) = self.outbox.as_mut() {
                    log.begin();
                    for key in &deleted {
                        log.clear(key);
                    }
                    log.append(&self.conn, version, version + 1, now)?;
                }
            }
            Ok(deleted)
        })()
        .map_err(Failure::applying)?;
        self.commit()?;
        if !deleted.is_empty() {
            tracing::debug!("expiry sweep deleted {} rows", deleted.len());
            self.metrics.expired_rows_swept.inc_by(deleted.len() as u64);
            self.committed(version + 1, &deleted);
        }
        Ok(deleted.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_sweeps_back_off_instead_of_spinning() {
        let mut s = Schedule::new();
        s.expires_at(now_ms() - 1000);
        assert!(s.due_in().is_zero(), "an expiry in the past is due now");
        assert_eq!(s.failed(), Duration::from_secs(1));
        assert!(s.due_in() > Duration::from_millis(900), "{:?}", s.due_in());
        assert_eq!(s.failed(), Duration::from_secs(2));
        assert_eq!(s.failed(), Duration::from_secs(4));
        for _ in 0..10 {
            s.failed();
        }
        assert_eq!(s.failed(), SWEEP_INTERVAL, "the pause is capped");
    }
}
