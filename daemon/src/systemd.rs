//! systemd integration without libsystemd: `sd_notify` (READY, STATUS, RELOADING, STOPPING,
//! WATCHDOG) over the `$NOTIFY_SOCKET` datagram socket, the watchdog pinger, and the sockets
//! handed over by socket activation (`$LISTEN_FDS`).
//!
//! Every function here is a no-op when the process does not run under systemd.
//!
//! Not the `sd-notify` crate: the README (Running under systemd) says what it lacks.

use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::health::Monitor;

/// Where notifications go: the socket named by `$NOTIFY_SOCKET`, if any.
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// A failed send is logged once, not on every watchdog ping.
    failed: AtomicBool,
}

impl Notifier {
    /// The notifier `$NOTIFY_SOCKET` asks for: an absolute path, or an abstract socket name
    /// written with a leading `@`. Anything else (unset, or a kind we do not speak) disables it.
    pub fn from_env() -> Notifier {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::disabled();
        };
        match Notifier::to(&name.to_string_lossy()) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("NOTIFY_SOCKET is set but unusable, not notifying systemd: {e:#}");
                Notifier::disabled()
            }
        }
    }

    /// A notifier that sends nothing.
    pub fn disabled() -> Notifier {
        Notifier {
            target: None,
            failed: AtomicBool::new(false),
        }
    }

    /// A notifier for the socket `name` (a path, or `@abstract`).
    pub fn to(name: &str) -> anyhow::Result<Notifier> {
        let addr = if let Some(abstract_name) = name.strip_prefix('@') {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(abstract_name.as_bytes())?
        } else if name.starts_with('/') {
            SocketAddr::from_pathname(name)?
        } else {
            bail!("{name:?} is neither an absolute path nor an abstract socket name (@...)");
        };
        let socket = UnixDatagram::unbound().context("cannot create a unix datagram socket")?;
        Ok(Notifier {
            target: Some((socket, addr)),
            failed: AtomicBool::new(false),
        })
    }

    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// Sends one notification: newline-separated `KEY=value` assignments.
    pub fn notify(&self, state: &str) {
        let Some((socket, addr)) = &self.target else {
            return;
        };
        if let Err(e) = socket.send_to_addr(state.as_bytes(), addr) {
            if !self.failed.swap(true, Ordering::Relaxed) {
                tracing::warn!("cannot notify systemd: {e}");
            }
        }
    }

    /// `STATUS=`: one line saying what the daemon does.
    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    /// `READY=1`: start-up (or a reload) is complete, with the status to show.
    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    /// `RELOADING=1` with the monotonic time systemd wants alongside; send `ready` afterwards.
    pub fn reloading(&self, status: &str) {
        self.notify(&format!(
            "RELOADING=1\nMONOTONIC_USEC={}\nSTATUS={}",
            monotonic_usec(),
            one_line(status)
        ));
    }

    /// `STOPPING=1`: shutdown has begun.
    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }
}

/// A notification is newline-separated: a status must not start a new assignment.
fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// `CLOCK_MONOTONIC` in microseconds, as `MONOTONIC_USEC=` wants it.
fn monotonic_usec() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(t) => t.tv_sec() as u64 * 1_000_000 + t.tv_nsec() as u64 / 1_000,
        Err(_) => 0,
    }
}

/// The watchdog interval systemd expects pings within (`WatchdogSec=`), when it is on for this
/// process: `$WATCHDOG_USEC` is set and `$WATCHDOG_PID`, if set, is our pid.
pub fn watchdog_interval() -> Option<Duration> {
    parse_watchdog(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

fn parse_watchdog(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|&u| u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != own_pid {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Pings the systemd watchdog every half interval, but only while every heartbeat of `monitor`
/// is fresher than half the interval: a stuck committer or core stops the pings, and systemd
/// then restarts the service.
pub struct Watchdog {
    stop: Option<mpsc::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Watchdog {
    pub fn start(
        notifier: Arc<Notifier>,
        interval: Duration,
        monitor: Arc<Monitor>,
    ) -> anyhow::Result<Watchdog> {
        let (stop, stopped) = mpsc::channel::<()>();
        let half = interval / 2;
        let thread = std::thread::Builder::new()
            .name("watchdog".into())
            .spawn(move || {
                let mut healthy = true;
                loop {
                    let stale = monitor.stale(half);
                    if stale.is_empty() {
                        if !healthy {
                            tracing::info!("watchdog: every thread checks in again");
                            healthy = true;
                        }
                        notifier.notify("WATCHDOG=1");
                    } else if healthy {
                        healthy = false;
                        let who: Vec<String> = stale
                            .iter()
                            .map(|(name, age)| format!("{name} (silent for {age:.1?})"))
                            .collect();
                        let who = who.join(", ");
                        tracing::error!(
                            "watchdog: {who} stopped checking in; not telling systemd all is well"
                        );
                        notifier.status(&format!("Unhealthy: {who} stopped checking in"));
                    }
                    match stopped.recv_timeout(half) {
                        Err(mpsc::RecvTimeoutError::Timeout) => {}
                        _ => break,
                    }
                }
            })
            .context("cannot start the watchdog thread")?;
        tracing::info!(
            "systemd watchdog on: pinging every {:?} while the committer and every core check in",
            half
        );
        Ok(Watchdog {
            stop: Some(stop),
            thread: Some(thread),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The first file descriptor systemd passes (`SD_LISTEN_FDS_START`).
const LISTEN_FDS_START: RawFd = 3;

/// A socket handed over by socket activation, with its `FileDescriptorName=`, if any.
pub struct ListenFd {
    pub fd: OwnedFd,
    pub name: Option<String>,
}

/// Takes the sockets passed with `$LISTEN_FDS` (when `$LISTEN_PID` is this process), like
/// `sd_listen_fds_with_names(unset_environment=true)`: the `LISTEN_*` variables are removed so
/// nothing started later mistakes them for its own. Call it before any thread starts.
pub fn take_listen_fds() -> anyhow::Result<Vec<ListenFd>> {
    let pid = std::env::var("LISTEN_PID").ok();
    let fds = std::env::var("LISTEN_FDS").ok();
    let names = std::env::var("LISTEN_FDNAMES").ok();
    for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
        std::env::remove_var(var);
    }
    let Some(count) = listen_fd_count(pid.as_deref(), fds.as_deref(), std::process::id())? else {
        return Ok(Vec::new());
    };
    let mut names = names
        .as_deref()
        .map(|n| n.split(':').map(str::to_string).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter();
    let mut out = Vec::with_capacity(count);
    for fd in LISTEN_FDS_START..LISTEN_FDS_START + count as RawFd {
        // SAFETY: borrowed only for the fcntl below, which fails cleanly (EBADF) on a
        // descriptor that is not open.
        let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
        nix::fcntl::fcntl(
            borrowed,
            nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
        )
        .with_context(|| format!("LISTEN_FDS={count}, but file descriptor {fd} is not open"))?;
        // SAFETY: the descriptor is open (fcntl succeeded), and by the socket activation
        // protocol it is handed to this process to own; nothing else in the process uses it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let name = names.next().filter(|n| !n.is_empty());
        out.push(ListenFd { fd, name });
    }
    Ok(out)
}

/// How many descriptors `$LISTEN_FDS` passes to the process `own_pid`.
fn listen_fd_count(
    pid: Option<&str>,
    fds: Option<&str>,
    own_pid: u32,
) -> anyhow::Result<Option<usize>> {
    let (Some(pid), Some(fds)) = (pid, fds) else {
        return Ok(None);
    };
    let Ok(pid) = pid.trim().parse::<u32>() else {
        bail!("LISTEN_PID={pid:?} is not a process id");
    };
    if pid != own_pid {
        tracing::debug!("LISTEN_FDS is meant for process {pid}, not this one: ignored");
        return Ok(None);
    }
    let Ok(count) = fds.trim().parse::<usize>() else {
        bail!("LISTEN_FDS={fds:?} is not a number");
    };
    Ok((count > 0).then_some(count))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recv(sock: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = sock.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn notifies_a_socket_by_path() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::to(path.to_str().unwrap()).unwrap();
        assert!(n.enabled());
        n.ready("Serving\nsomething");
        assert_eq!(recv(&sock), "READY=1\nSTATUS=Serving something");
        n.stopping("Draining");
        assert_eq!(recv(&sock), "STOPPING=1\nSTATUS=Draining");
        n.reloading("Reloading");
        let msg = recv(&sock);
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert_eq!(lines[2], "STATUS=Reloading");
    }

    #[test]
    fn notifies_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!(
            "denokv-test-{}-{}",
            std::process::id(),
            rand::random::<u64>()
        );
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let sock = UnixDatagram::bind_addr(&addr).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let n = Notifier::to(&format!("@{name}")).unwrap();
        n.notify("WATCHDOG=1");
        assert_eq!(recv(&sock), "WATCHDOG=1");
    }

    #[test]
    fn unusable_targets_are_refused_and_a_missing_one_is_quiet() {
        assert!(Notifier::to("relative/path").is_err());
        assert!(Notifier::to("vsock:2:1234").is_err());
        let n = Notifier::to("/nonexistent/denokv-notify").unwrap();
        n.notify("READY=1"); // logs once, never panics
        n.notify("READY=1");
        Notifier::disabled().notify("READY=1");
    }

    #[test]
    fn watchdog_applies_only_to_its_pid() {
        let s = Duration::from_secs(1);
        assert_eq!(parse_watchdog(Some("1000000"), None, 7), Some(s));
        assert_eq!(parse_watchdog(Some("1000000"), Some("7"), 7), Some(s));
        assert_eq!(parse_watchdog(Some("1000000"), Some("8"), 7), None);
        assert_eq!(parse_watchdog(Some("0"), None, 7), None);
        // A WATCHDOG_PID that is not a number names no process of ours either.
        assert_eq!(parse_watchdog(Some("1000000"), Some("x"), 7), None);
        assert_eq!(parse_watchdog(Some("x"), None, 7), None);
        assert_eq!(parse_watchdog(None, Some("7"), 7), None);
    }

    #[test]
    fn listen_fds_apply_only_to_their_pid() {
        assert_eq!(listen_fd_count(None, None, 7).unwrap(), None);
        assert_eq!(listen_fd_count(None, Some("1"), 7).unwrap(), None);
        assert_eq!(listen_fd_count(Some("7"), Some("2"), 7).unwrap(), Some(2));
        assert_eq!(listen_fd_count(Some("8"), Some("2"), 7).unwrap(), None);
        assert_eq!(listen_fd_count(Some("7"), Some("0"), 7).unwrap(), None);
        assert!(listen_fd_count(Some("x"), Some("1"), 7).is_err());
        assert!(listen_fd_count(Some("7"), Some("many"), 7).is_err());
    }

    #[test]
    fn the_watchdog_pings_only_while_every_thread_checks_in() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let sock = UnixDatagram::bind(&path).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let notifier = Arc::new(Notifier::to(path.to_str().unwrap()).unwrap());
        let interval = Duration::from_millis(100);
        let mut monitor = Monitor::new(interval / 4);
        let beater = monitor.heartbeat("committer");
        let alive = Arc::new(AtomicBool::new(true));
        let alive2 = alive.clone();
        let worker = std::thread::spawn(move || {
            while alive2.load(Ordering::Relaxed) {
                beater.beat();
                std::thread::sleep(Duration::from_millis(10));
            }
            // Neither retired nor beating: like a thread that is stuck.
            std::mem::forget(beater);
        });
        let dog = Watchdog::start(notifier, interval, Arc::new(monitor)).unwrap();
        for _ in 0..3 {
            assert_eq!(recv(&sock), "WATCHDOG=1");
        }
        alive.store(false, Ordering::Relaxed);
        worker.join().unwrap();
        // Pings sent before the worker stopped may still be queued; then only the status.
        let mut buf = [0u8; 256];
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let n = sock.recv(&mut buf).expect("a status saying who is stuck");
            let msg = std::str::from_utf8(&buf[..n]).unwrap();
            if msg.starts_with("STATUS=") {
                assert!(msg.contains("committer"), "{msg}");
                break;
            }
            assert!(std::time::Instant::now() < deadline);
        }
        sock.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(sock.recv(&mut buf).is_err(), "no ping while stuck");
        drop(dog);
    }
}
