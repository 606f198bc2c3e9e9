//! Liveness: threads that must keep running (the committer, every core) beat a heartbeat; the
//! systemd watchdog is told all is well only while every heartbeat is fresh.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// A heartbeat value meaning "finished on purpose": never stale.
const RETIRED: u64 = u64::MAX;

fn now_ms() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_millis() as u64
}

struct Pulse {
    /// When the owner last beat, in ms since the process's heartbeat epoch, or `RETIRED`.
    last: AtomicU64,
    /// Set (debug builds only) to make the owner hang at its next beat.
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    hang: AtomicBool,
}

/// Held by the thread whose liveness it proves. Beat at least every `period()`.
///
/// Dropping it retires the heartbeat (the thread ended on purpose), except while panicking: a
/// thread that died stays stale.
pub struct Beater {
    pulse: Arc<Pulse>,
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    name: String,
    period: Duration,
}

impl Beater {
    /// Records that the owning thread is alive. Cheap: one atomic load and store.
    pub fn beat(&self) {
        #[cfg(debug_assertions)]
        if self.pulse.hang.load(Ordering::Relaxed) {
            tracing::warn!("debug build: {} hangs on purpose now", self.name);
            loop {
                std::thread::park();
            }
        }
        // Only the owning thread beats or retires, so a load then a store cannot race.
        if self.pulse.last.load(Ordering::Relaxed) != RETIRED {
            self.pulse.last.store(now_ms(), Ordering::Relaxed);
        }
    }

    /// The longest the owner may go between two beats.
    pub fn period(&self) -> Duration {
        self.period
    }

    /// Marks the owner as finished on purpose; later beats change nothing.
    pub fn retire(&self) {
        self.pulse.last.store(RETIRED, Ordering::Relaxed);
    }
}

impl Drop for Beater {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            self.retire();
        }
    }
}

/// Watches a set of heartbeats.
pub struct Monitor {
    period: Duration,
    beats: Vec<(String, Arc<Pulse>)>,
}

impl Monitor {
    /// Owners beat every `period`.
    pub fn new(period: Duration) -> Monitor {
        Monitor {
            period,
            beats: Vec::new(),
        }
    }

    /// A new heartbeat, fresh from now, for the thread called `name`.
    pub fn heartbeat(&mut self, name: &str) -> Beater {
        let pulse = Arc::new(Pulse {
            last: AtomicU64::new(now_ms()),
            hang: AtomicBool::new(false),
        });
        self.beats.push((name.to_string(), pulse.clone()));
        Beater {
            pulse,
            name: name.to_string(),
            period: self.period,
        }
    }

    /// The threads whose last beat is older than `max_age`, with that age.
    pub fn stale(&self, max_age: Duration) -> Vec<(&str, Duration)> {
        let now = now_ms();
        self.beats
            .iter()
            .filter_map(|(name, pulse)| {
                let last = pulse.last.load(Ordering::Relaxed);
                let age = Duration::from_millis(now.saturating_sub(last));
                (last != RETIRED && age > max_age).then_some((name.as_str(), age))
            })
            .collect()
    }

    /// Debug builds: makes the thread called `name` hang forever at its next beat, to test that
    /// the watchdog notices. Returns false when no such heartbeat exists.
    #[cfg(debug_assertions)]
    pub fn debug_hang(&self, name: &str) -> bool {
        let mut found = false;
        for (n, pulse) in &self.beats {
            if n == name {
                pulse.hang.store(true, Ordering::Relaxed);
                found = true;
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_until_beaten_and_never_after_retiring() {
        let mut m = Monitor::new(Duration::from_millis(5));
        let a = m.heartbeat("a");
        let b = m.heartbeat("b");
        assert_eq!(a.period(), Duration::from_millis(5));
        assert!(m.stale(Duration::from_secs(5)).is_empty());
        std::thread::sleep(Duration::from_millis(30));
        a.beat();
        let stale = m.stale(Duration::from_millis(20));
        assert_eq!(stale.len(), 1);
        assert_eq!(stale[0].0, "b");
        assert!(stale[0].1 >= Duration::from_millis(20));
        drop(b);
        a.retire();
        a.beat();
        std::thread::sleep(Duration::from_millis(30));
        assert!(m.stale(Duration::from_millis(20)).is_empty());
    }

    #[test]
    fn a_thread_that_panics_stays_stale() {
        let mut m = Monitor::new(Duration::from_millis(5));
        let a = m.heartbeat("worker");
        let t = std::thread::spawn(move || {
            let _owned = a;
            panic!("worker died");
        });
        assert!(t.join().is_err());
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(m.stale(Duration::from_millis(20)).len(), 1);
    }

    #[cfg(debug_assertions)]
    #[test]
    fn debug_hang_stops_the_beats() {
        let mut m = Monitor::new(Duration::from_millis(5));
        let a = m.heartbeat("committer");
        std::thread::spawn(move || loop {
            a.beat();
            std::thread::sleep(Duration::from_millis(2));
        });
        std::thread::sleep(Duration::from_millis(30));
        assert!(m.stale(Duration::from_millis(20)).is_empty());
        assert!(m.debug_hang("committer"));
        assert!(!m.debug_hang("nobody"));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(m.stale(Duration::from_millis(20)).len(), 1);
    }
}
