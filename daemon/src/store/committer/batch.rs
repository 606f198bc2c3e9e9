//! One batch: every write in one transaction, a savepoint each, one COMMIT; what the batch did
//! (for the metrics and its trace span); and the answers when it failed.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::apply::{self, ApplyError};
use super::failure::Failure;
use super::Committer;
use crate::kv::model::{AtomicWrite, MutationKind, WriteOutcome};
use crate::kv::now_ms;
use crate::kv::value::Le64Op;
use crate::metrics::{Metrics, MutationLabel};
use crate::store::sql::SET_VERSION;
use crate::store::StoreError;
use crate::traces;

/// What one batch did, recorded in the metrics once the COMMIT succeeded (and in its span).
#[derive(Default)]
pub struct BatchTally {
    committed: u64,
    checks_failed: u64,
    invalid: u64,
    enqueues: u64,
    mutations: [u64; MutationLabel::COUNT],
    /// `BEGIN` to the last write applied.
    apply: Duration,
    /// The `COMMIT` statement: the WAL write and, in sync mode full, the fsync.
    commit: Duration,
    /// The database failed; the batch was not committed (or its outcome is unknown).
    failed: bool,
}

impl BatchTally {
    fn add_committed(&mut self, write: &AtomicWrite) {
        self.committed += 1;
        self.enqueues += write.enqueues.len() as u64;
        for m in &write.mutations {
            let label = match &m.kind {
                MutationKind::Set(_) => MutationLabel::Set,
                MutationKind::Delete => MutationLabel::Delete,
                MutationKind::Le64(Le64Op::Sum, _) | MutationKind::V8Sum(_) => MutationLabel::Sum,
                MutationKind::Le64(Le64Op::Min, _) => MutationLabel::Min,
                MutationKind::Le64(Le64Op::Max, _) => MutationLabel::Max,
                MutationKind::SetSuffixVersionstamped(_) => {
                    MutationLabel::SetSuffixVersionstampedKey
                }
            };
            self.mutations[label as usize] += 1;
        }
    }

    /// Sets the attributes of the batch's span.
    pub fn describe(&self, span: &mut traces::Span, batch: usize) {
        span.set("db.system.name", "sqlite");
        span.set("denokv.batch.size", batch as i64);
        span.set("denokv.batch.committed", self.committed as i64);
        span.set("denokv.batch.checks_failed", self.checks_failed as i64);
        span.set("denokv.batch.invalid", self.invalid as i64);
        span.set(
            "denokv.batch.mutations",
            self.mutations.iter().sum::<u64>() as i64,
        );
        span.set("denokv.batch.enqueues", self.enqueues as i64);
        span.set("denokv.batch.apply_ms", self.apply.as_secs_f64() * 1e3);
        span.set("denokv.batch.commit_ms", self.commit.as_secs_f64() * 1e3);
        if self.failed {
            span.set_error("the database failed; the batch was not committed");
        }
    }

    fn record(&self, metrics: &Metrics, batch: usize, duration: Duration) {
        metrics.commit_batch_size.observe(batch as f64);
        metrics.commit_duration.observe(duration.as_secs_f64());
        let add = |c: &prometheus::IntCounter, n: u64| {
            if n > 0 {
                c.inc_by(n);
            }
        };
        add(&metrics.writes_committed, self.committed);
        add(&metrics.write_checks_failed, self.checks_failed);
        add(&metrics.writes_invalid, self.invalid);
        add(&metrics.enqueues, self.enqueues);
        for (i, n) in self.mutations.iter().enumerate() {
            add(metrics.mutations(MutationLabel::ALL[i]), *n);
        }
    }
}

/// What became of a batch.
pub struct BatchOutcome {
    /// Each write's answer, in order.
    pub results: Vec<Result<WriteOutcome, StoreError>>,
    pub tally: BatchTally,
    /// Set when the server must stop: the commit's outcome is unknown, or the connection's
    /// state is (a ROLLBACK failed).
    pub fatal: Option<Failure>,
}

impl Committer {
    /// Commits `writes` in one transaction. Returns each write's own answer, in order, and
    /// what the batch did. If the database fails, each write gets the answer `failure` gives
    /// for it: "not committed" only where that is certain. Watchers are woken only after the
    /// commit.
    pub(super) fn commit_writes<'a>(
        &mut self,
        writes: impl ExactSizeIterator<Item = &'a AtomicWrite>,
    ) -> BatchOutcome {
        let count = writes.len();
        let now = now_ms();
        let mut results = Vec::with_capacity(count);
        let mut changed: Vec<Bytes> = Vec::new();
        let mut expiries = Vec::new();
        let mut tally = BatchTally::default();
        let started = Instant::now();
        let mut version = self.version;

        let applied = (|| -> Result<(), Failure> {
            let start = self.begin().map_err(Failure::applying)?;
            version = start;
            if let Some(log) = self.outbox.as_mut() {
                log.begin_batch(start);
            }
            for write in writes {
                // A batch of large writes takes a while: keep the watchdog fed.
                self.beat();
                let keys_before = changed.len();
                let log = self.outbox.as_mut();
                match apply::in_savepoint(&self.conn, write, version, now, &mut changed, log) {
                    Ok((outcome, v)) => {
                        if let (WriteOutcome::Committed(_), Some(log)) =
                            (&outcome, self.outbox.as_mut())
                        {
                            log.commit_write(v);
                        }
                        version = v;
                        if let WriteOutcome::ChecksFailed(_) = outcome {
                            tally.checks_failed += 1;
                        } else {
                            tally.add_committed(write);
                            expiries.extend(write.mutations.iter().filter_map(|m| m.expire_at_ms));
                        }
                        results.push(Ok(outcome));
                    }
                    Err(ApplyError::Invalid(e)) => {
                        tally.invalid += 1;
                        changed.truncate(keys_before);
                        results.push(Err(StoreError::Invalid(e)));
                    }
                    Err(ApplyError::Database(e)) => return Err(Failure::applying(e)),
                }
            }
            if version != start {
                self.conn
                    .prepare_cached(SET_VERSION)
                    .and_then(|mut s| s.execute([version as i64]))
                    .map_err(Failure::applying)?;
            }
            // In the batch's transaction: the entries commit with the data.
            if let Some(log) = self.outbox.as_mut() {
                log.flush(&self.conn, now).map_err(Failure::applying)?;
            }
            tally.apply = started.elapsed();
            let committing = Instant::now();
            self.commit()?;
            tally.commit = committing.elapsed();
            Ok(())
        })();

        if let Err(failure) = applied {
            tally.failed = true;
            return self.batch_failed(failure, count, results, tally);
        }
        tally.record(&self.metrics, count, started.elapsed());
        for t in expiries {
            self.schedule.expires_at(t);
        }
        self.committed(version, &changed);
        BatchOutcome {
            results,
            tally,
            fatal: None,
        }
    }

    /// Answers a failed batch (`results` holds the answers of the writes applied before the
    /// failure) and rolls it back when that is safe.
    fn batch_failed(
        &mut self,
        failure: Failure,
        count: usize,
        results: Vec<Result<WriteOutcome, StoreError>>,
        tally: BatchTally,
    ) -> BatchOutcome {
        self.metrics.commit_failures(failure.phase).inc();
        let mut answers: Vec<Result<WriteOutcome, StoreError>> = results
            .into_iter()
            .map(|r| match r {
                Ok(WriteOutcome::Committed(_)) => Err(failure.answer_for_applied()),
                _ => Err(failure.answer_for_unapplied()),
            })
            .collect();
        answers.resize_with(count, || Err(failure.answer_for_unapplied()));
        if failure.is_ambiguous() {
            // Leave the transaction as it is: recovery at the next open decides it.
            tracing::error!(
                "commit of {count} writes {failure}: the commit may have reached the disk, so \
                 its writes are answered as of unknown outcome"
            );
            return BatchOutcome {
                results: answers,
                tally,
                fatal: Some(failure),
            };
        }
        tracing::error!("commit of {count} writes {failure}; rolled back, nothing committed");
        let fatal = self.rollback().err();
        if let Some(rollback) = &fatal {
            self.metrics.commit_failures(rollback.phase).inc();
        }
        BatchOutcome {
            results: answers,
            tally,
            fatal,
        }
    }
}
