//! The replica's metrics (`denokv_replica_*`), registered into the server's registry.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use prometheus::{Gauge, IntCounter, IntCounterVec, IntGauge, Opts};

use crate::backup::s3::Operation;
use crate::metrics::Metrics;

const OPERATIONS: [Operation; 4] = [
    Operation::Put,
    Operation::Get,
    Operation::List,
    Operation::Delete,
];

pub struct ReplicaMetrics {
    /// Seconds since the moment up to which the replica serves everything S3 held (sampled at
    /// each scrape, so a stuck sync shows).
    pub lag_seconds: Gauge,
    /// Unix seconds of the last successful sync and checkout.
    pub last_sync: IntGauge,
    /// Unix seconds (ms precision) of the commit the replica serves (the newest applied).
    pub point_timestamp: Gauge,
    pub sync_errors: IntCounter,
    pub log_objects: IntCounter,
    pub applied_entries: IntCounter,
    s3_errors: [IntCounter; 4],
    s3_requests: [IntCounter; 4],
    /// Unix ms: the replica serves everything S3 held at this time (0: not yet).
    current_as_of_ms: AtomicU64,
}

impl ReplicaMetrics {
    pub fn new(metrics: &Metrics) -> ReplicaMetrics {
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            metrics.register(Box::new(c.clone()));
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = Gauge::new(name, help).expect("valid metric");
            metrics.register(Box::new(g.clone()));
            g
        };
        let by_operation = |name: &str, help: &str| {
            let v = IntCounterVec::new(Opts::new(name, help), &["operation"]).expect("valid");
            metrics.register(Box::new(v.clone()));
            OPERATIONS.map(|o| v.with_label_values(&[o.name()]))
        };
        let last_sync = IntGauge::new(
            "denokv_replica_last_sync_timestamp_seconds",
            "Unix time of the replica's last successful sync from S3 (and checkout of the \
             newest point).",
        )
        .expect("valid metric");
        metrics.register(Box::new(last_sync.clone()));
        ReplicaMetrics {
            lag_seconds: gauge(
                "denokv_replica_lag_seconds",
                "How far the replica is behind its backup in S3: seconds since the last moment \
                 up to which it serves every commit S3 held (about the sync interval when \
                 healthy; grows while syncs fail).",
            ),
            last_sync,
            point_timestamp: gauge(
                "denokv_replica_point_timestamp_seconds",
                "Unix time of the newest commit the replica serves (its log range's time).",
            ),
            sync_errors: counter(
                "denokv_replica_sync_errors_total",
                "Syncs from S3 that failed (retried with backoff).",
            ),
            log_objects: counter(
                "denokv_replica_log_objects_total",
                "Log objects fetched from S3.",
            ),
            applied_entries: counter(
                "denokv_replica_applied_entries_total",
                "Log entries applied to the replica by checkouts.",
            ),
            s3_errors: by_operation(
                "denokv_replica_s3_request_errors_total",
                "The replica's S3 requests that failed, by operation (get, list).",
            ),
            s3_requests: by_operation(
                "denokv_replica_s3_requests_total",
                "The replica's S3 requests, by operation (get, list).",
            ),
            current_as_of_ms: AtomicU64::new(0),
        }
    }

    pub fn s3_error(&self, operation: Operation) -> &IntCounter {
        &self.s3_errors[operation as usize]
    }

    pub fn s3_request(&self, operation: Operation) -> &IntCounter {
        &self.s3_requests[operation as usize]
    }

    /// The replica serves every commit S3 held at `at`.
    pub fn current_as_of(&self, at: SystemTime) {
        let ms = at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.current_as_of_ms.fetch_max(ms, Ordering::AcqRel);
        self.sample();
    }

    /// Seconds behind S3 now (`None` before the first sync).
    pub fn lag(&self) -> Option<f64> {
        let at = self.current_as_of_ms.load(Ordering::Acquire);
        if at == 0 {
            return None;
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        Some(now.saturating_sub(at) as f64 / 1000.0)
    }

    /// Updates the lag gauge (at each scrape and each sync).
    pub fn sample(&self) {
        if let Some(lag) = self.lag() {
            self.lag_seconds.set(lag);
        }
    }
}
