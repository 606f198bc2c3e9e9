//! The backup's and the replica's metrics (registered into the server's registry).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts};

use super::s3::Operation;
use crate::metrics::Metrics;

const OPERATIONS: [Operation; 4] = [
    Operation::Put,
    Operation::Get,
    Operation::List,
    Operation::Delete,
];

pub struct BackupMetrics {
    /// Seconds since the oldest commit not yet in S3 was made; 0 when all is shipped.
    pub lag_seconds: prometheus::Gauge,
    /// The database's version minus the last version shipped.
    pub lag_versions: IntGauge,
    pub log_objects: IntCounter,
    pub log_bytes: IntCounter,
    pub snapshot_objects: IntCounter,
    pub snapshot_bytes: IntCounter,
    pub pending_commits: IntGauge,
    pub pending_bytes: IntGauge,
    /// Unix seconds of the last complete snapshot generation.
    pub last_snapshot: IntGauge,
    pub history_resets: IntCounter,
    pub gc_deleted: IntCounter,
    s3_errors: [IntCounter; 4],
    s3_requests: [IntCounter; 4],
}

impl BackupMetrics {
    pub fn new(metrics: &Metrics) -> BackupMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            metrics.register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            metrics.register(Box::new(g.clone()));
            g
        };
        let by_operation = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &["operation"]).expect("valid");
            metrics.register(Box::new(v.clone()));
            OPERATIONS.map(|o| v.with_label_values(&[o.name()]))
        };
        let lag_seconds = prometheus::Gauge::new(
            "denokv_backup_lag_seconds",
            "Age of the oldest committed write not yet shipped to S3 (0: all shipped): the \
             writes a lost disk would lose.",
        )
        .expect("valid metric");
        metrics.register(Box::new(lag_seconds.clone()));
        BackupMetrics {
            lag_seconds,
            lag_versions: gauge(
                "denokv_backup_lag_versions",
                "Commits made but not yet shipped to S3 (database version minus the last \
                 version shipped).",
            ),
            log_objects: counter(
                "denokv_backup_log_objects_total",
                "Log objects uploaded to S3.",
            ),
            log_bytes: counter(
                "denokv_backup_log_bytes_total",
                "Bytes of log objects uploaded.",
            ),
            snapshot_objects: counter(
                "denokv_backup_snapshot_objects_total",
                "Snapshot objects uploaded to S3.",
            ),
            snapshot_bytes: counter(
                "denokv_backup_snapshot_bytes_total",
                "Bytes of snapshot objects uploaded.",
            ),
            pending_commits: gauge(
                "denokv_backup_pending_commits",
                "Transactions (batches of commits) waiting in the local outbox to be shipped.",
            ),
            pending_bytes: gauge(
                "denokv_backup_pending_bytes",
                "Encoded bytes waiting in the local outbox to be shipped.",
            ),
            last_snapshot: gauge(
                "denokv_backup_last_snapshot_timestamp_seconds",
                "Unix time at which the last complete snapshot generation finished.",
            ),
            history_resets: counter(
                "denokv_backup_history_resets_total",
                "Times the backup dropped its history and started anew, because commits were \
                 made that it could not ship (by another process, or while the outbox was full).",
            ),
            gc_deleted: counter(
                "denokv_backup_gc_deleted_objects_total",
                "Objects deleted from S3 because they fell out of retention.",
            ),
            s3_errors: by_operation(
                "denokv_s3_request_errors_total",
                "S3 requests that failed, by operation (put, get, list, delete).",
            ),
            s3_requests: by_operation(
                "denokv_s3_requests_total",
                "S3 requests made, by operation (put, get, list, delete).",
            ),
        }
    }

    pub fn s3_error(&self, operation: Operation) -> &IntCounter {
        &self.s3_errors[operation as usize]
    }

    pub fn s3_request(&self, operation: Operation) -> &IntCounter {
        &self.s3_requests[operation as usize]
    }
}
