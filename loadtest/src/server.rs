//! What the load cost the server: its CPU time and memory over the measured window, read from
//! `/proc/<pid>` of a server on this machine (`--server-pid`).

use std::time::Instant;

use serde::Serialize;

use crate::run::Window;

/// A process's resource use over the measured window (the server's, or the load generator's own).
#[derive(Clone, Debug, Serialize)]
pub struct ProcessUsage {
    pub pid: i32,
    /// User + system CPU seconds, all threads.
    pub cpu_seconds: f64,
    /// Resident memory at the start and the end of the window.
    pub rss_mib_start: f64,
    pub rss_mib_end: f64,
}

/// Samples the server `pid` and this process at the start and the end of `window`.
pub type Sampling = (
    tokio::task::JoinHandle<Option<ProcessUsage>>,
    tokio::task::JoinHandle<Option<ProcessUsage>>,
);

pub fn sample_both(server: i32, window: Window) -> Sampling {
    (
        sample(server, window),
        sample(std::process::id() as i32, window),
    )
}

/// Waits for both samples.
pub async fn finish(sampling: Option<Sampling>) -> (Option<ProcessUsage>, Option<ProcessUsage>) {
    match sampling {
        Some((server, client)) => (server.await.ok().flatten(), client.await.ok().flatten()),
        None => (None, None),
    }
}

/// Samples `pid` at the start and the end of `window`.
pub fn sample(pid: i32, window: Window) -> tokio::task::JoinHandle<Option<ProcessUsage>> {
    tokio::spawn(async move {
        sleep_until(window.from).await;
        let (cpu0, rss0) = (cpu_seconds(pid)?, rss_mib(pid)?);
        sleep_until(window.to).await;
        let (cpu1, rss1) = (cpu_seconds(pid)?, rss_mib(pid)?);
        Some(ProcessUsage {
            pid,
            cpu_seconds: cpu1 - cpu0,
            rss_mib_start: rss0,
            rss_mib_end: rss1,
        })
    })
}

async fn sleep_until(t: Instant) {
    tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
}

/// utime + stime of every thread of `pid` (fields 14 and 15 of `/proc/<pid>/stat`).
pub fn cpu_seconds(pid: i32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; fields after it are plain numbers.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some((utime + stime) / ticks)
}

/// `VmRSS` of `pid` in MiB.
pub fn rss_mib(pid: i32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let pid = std::process::id() as i32;
        let before = cpu_seconds(pid).unwrap();
        let mut x = 0u64;
        let until = Instant::now() + std::time::Duration::from_millis(100);
        while Instant::now() < until {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_seconds(pid).unwrap() > before);
        assert!(rss_mib(pid).unwrap() > 1.0);
        assert!(cpu_seconds(-5).is_none());
    }
}
