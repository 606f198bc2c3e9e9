//! A notify socket playing systemd's part: collects what the server sends to
//! `$NOTIFY_SOCKET` (READY=1, STATUS=…, WATCHDOG=1), with when it arrived.

use std::os::unix::net::UnixDatagram;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Collects what the server sends to its notify socket, with when it arrived.
pub struct NotifySocket {
    pub name: String,
    rx: mpsc::Receiver<(Instant, String)>,
    _dir: tempfile::TempDir,
}

impl NotifySocket {
    /// A socket bound at a path, or an abstract one (`NOTIFY_SOCKET=@name`).
    pub fn bind(abstract_name: bool) -> NotifySocket {
        let dir = tempfile::tempdir().unwrap();
        let (socket, name) = if abstract_name {
            use std::os::linux::net::SocketAddrExt;
            let name = format!(
                "denokv-test-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            );
            let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
            (UnixDatagram::bind_addr(&addr).unwrap(), format!("@{name}"))
        } else {
            let path = dir.path().join("notify");
            (
                UnixDatagram::bind(&path).unwrap(),
                path.display().to_string(),
            )
        };
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send((Instant::now(), msg)).is_err() {
                    break;
                }
            }
        });
        NotifySocket {
            name,
            rx,
            _dir: dir,
        }
    }

    /// The next message that is not a watchdog ping.
    pub fn next_state(&self, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok((_, msg)) if msg == "WATCHDOG=1" => continue,
                Ok((_, msg)) => return msg,
                Err(_) => panic!("no notification within {limit:?}"),
            }
        }
    }

    /// Messages until `enough` holds for them; panics after `limit`.
    pub fn collect_until(
        &self,
        limit: Duration,
        enough: impl Fn(&[(Instant, String)]) -> bool,
    ) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + limit;
        let mut out = Vec::new();
        while !enough(&out) {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(m) => out.push(m),
                Err(_) => panic!("not enough within {limit:?}: {out:?}"),
            }
        }
        out
    }

    /// Every message that arrives within `period`.
    pub fn collect(&self, period: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + period;
        let mut out = Vec::new();
        while let Ok(m) = self
            .rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            out.push(m);
        }
        out
    }
}
