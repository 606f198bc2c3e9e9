//! Counting: a latency histogram per kind of operation, failures by kind, check conflicts and
//! a few named counters. Every client keeps its own `Stats` and they are merged at the end,
//! so the request loop never takes a lock.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;

use crate::client::CallError;

/// Latencies are kept in microseconds, from 1 µs to a minute, to 3 significant digits.
const MAX_MICROS: u64 = 60_000_000;

pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_MICROS, 3).expect("valid histogram bounds")
}

#[derive(Default)]
pub struct Stats {
    /// Completed operations by kind ("write", "read", …): latency of each.
    pub latency: BTreeMap<&'static str, Histogram<u64>>,
    /// Writes refused because a check failed (`cas`): expected under contention, so they are
    /// counted apart from errors.
    pub conflicts: u64,
    /// Failures by label: `HTTP <status>: <first line>`, `transport: …`, `protocol: …`.
    pub errors: BTreeMap<String, u64>,
    /// Other facts worth showing (read misses, watch frames, …).
    pub counters: BTreeMap<&'static str, u64>,
}

impl Stats {
    pub fn record(&mut self, kind: &'static str, elapsed: Duration) {
        let micros = (elapsed.as_micros() as u64).clamp(1, MAX_MICROS);
        self.latency
            .entry(kind)
            .or_insert_with(histogram)
            .saturating_record(micros);
    }

    pub fn error(&mut self, e: &CallError) {
        self.error_label(e.label());
    }

    pub fn error_label(&mut self, label: String) {
        *self.errors.entry(label).or_default() += 1;
    }

    pub fn count(&mut self, name: &'static str, n: u64) {
        *self.counters.entry(name).or_default() += n;
    }

    pub fn error_total(&self) -> u64 {
        self.errors.values().sum()
    }

    pub fn merge(&mut self, other: Stats) {
        for (kind, h) in other.latency {
            self.latency
                .entry(kind)
                .or_insert_with(histogram)
                .add(&h)
                .expect("histograms share bounds");
        }
        self.conflicts += other.conflicts;
        for (label, n) in other.errors {
            *self.errors.entry(label).or_default() += n;
        }
        for (name, n) in other.counters {
            self.count(name, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_adds_everything() {
        let mut a = Stats::default();
        a.record("read", Duration::from_micros(100));
        a.error_label("HTTP 400: x".into());
        let mut b = Stats::default();
        b.record("read", Duration::from_micros(300));
        b.record("write", Duration::from_secs(3600));
        b.error_label("HTTP 400: x".into());
        b.conflicts = 2;
        b.count("misses", 5);
        a.merge(b);
        assert_eq!(a.latency["read"].len(), 2);
        assert_eq!(
            a.latency["write"].max(),
            a.latency["write"].highest_equivalent(MAX_MICROS)
        );
        assert_eq!(a.errors["HTTP 400: x"], 2);
        assert_eq!(a.conflicts, 2);
        assert_eq!(a.counters["misses"], 5);
    }
}
