//! Listening sockets: one per core, all bound to the same address with `SO_REUSEPORT`, or the
//! sockets systemd hands over (socket activation), shared by every core.

use std::net::{SocketAddr, TcpListener};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, Socket, Type};

use crate::systemd::ListenFd;

const BACKLOG: i32 = 1024;

/// How long a start waits for a port that only a dead server's sockets hold. A server killed a
/// moment ago can leave its listening sockets open for a while after its exit: the kernel tears
/// its io_uring instances down asynchronously, and a ring holds the sockets of the accepts it
/// had pending.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Binds `count` listeners to `addr`. Port 0 is resolved by the first bind, so every listener
/// shares one port. While the port is in use but no live server answers on it, retries for up
/// to `PORT_RELEASE_WAIT` (saying so in the log).
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpListener>> {
    let started = Instant::now();
    let mut waiting = false;
    loop {
        match bind_all(addr, count) {
            Ok(listeners) => {
                if waiting {
                    tracing::info!(
                        "{addr} was released after {} ms",
                        started.elapsed().as_millis()
                    );
                }
                return Ok(listeners);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::AddrInUse
                    && started.elapsed() < PORT_RELEASE_WAIT
                    && !answers_http(addr) =>
            {
                if !waiting {
                    tracing::warn!(
                        "{addr} is in use but nothing answers on it (a server stopped a moment \
                         ago may still be releasing it); retrying for up to {} s",
                        PORT_RELEASE_WAIT.as_secs()
                    );
                    waiting = true;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                return Err(anyhow::Error::new(e)
                    .context(format!("Failed to start server: cannot listen on {addr}")))
            }
        }
    }
}

fn bind_all(addr: SocketAddr, count: usize) -> std::io::Result<Vec<TcpListener>> {
    // SO_REUSEPORT would let a second server of the same user share a port that is already
    // served, splitting clients between two databases. A probe bound without it fails then.
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe.bind(&addr.into())?;
    }
    let first = bind_one(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(bind_one(addr)?);
    }
    Ok(listeners)
}

/// Whether a live server answers HTTP on `addr` (an unspecified address is tried on
/// loopback). The sockets of a dead process still complete TCP handshakes from their backlog
/// but never answer.
fn answers_http(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let mut target = addr;
    if target.ip().is_unspecified() {
        target.set_ip(match addr {
            SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
            SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
        });
    }
    let limit = Duration::from_millis(300);
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&target, limit) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(limit));
    let _ = stream.set_write_timeout(Some(limit));
    if stream
        .write_all(b"GET / HTTP/1.1\r\nHost: denokv\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1))
}

fn bind_one(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(BACKLOG)?;
    Ok(socket.into())
}

/// Gives every one of `cores` cores its own descriptor of each socket systemd passed: all cores
/// accept from the same queue. Each socket must be a listening TCP socket; it is made
/// non-blocking (the epoll driver needs that).
pub fn from_activation(fds: Vec<ListenFd>, cores: usize) -> anyhow::Result<Vec<Vec<TcpListener>>> {
    let mut per_core: Vec<Vec<TcpListener>> = (0..cores).map(|_| Vec::new()).collect();
    for (i, passed) in fds.into_iter().enumerate() {
        let what = match &passed.name {
            Some(name) => format!("socket {i} ({name:?}) passed by systemd"),
            None => format!("socket {i} passed by systemd"),
        };
        let socket = Socket::from(passed.fd);
        let tcp = socket.r#type().ok() == Some(Type::STREAM)
            && socket
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .is_some();
        if !tcp {
            bail!("the {what} is not a TCP socket: denokv serves TCP only (ListenStream=PORT or ADDRESS:PORT)");
        }
        if !socket
            .is_listener()
            .with_context(|| format!("cannot inspect the {what}"))?
        {
            bail!("the {what} is not listening (use ListenStream=, and Accept=no)");
        }
        socket
            .set_nonblocking(true)
            .with_context(|| format!("cannot make the {what} non-blocking"))?;
        for listeners in per_core.iter_mut().skip(1) {
            listeners.push(
                socket
                    .try_clone()
                    .with_context(|| format!("cannot duplicate the {what}"))?
                    .into(),
            );
        }
        per_core[0].push(socket.into());
    }
    Ok(per_core)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reliability_doc_states_the_wait() {
        let doc = include_str!("../../../docs/RELIABILITY.md");
        let wait = format!("waits up to {} s for a port", PORT_RELEASE_WAIT.as_secs());
        assert!(doc.contains(&wait), "docs/RELIABILITY.md lacks {wait:?}");
    }

    #[test]
    fn a_port_served_by_a_live_server_fails_at_once() {
        // A live HTTP server on the port: no waiting.
        let live = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = live.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            use std::io::{Read, Write};
            let (mut s, _) = live.accept().unwrap();
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n");
        });
        let started = Instant::now();
        let err = bind_reuseport(addr, 2).unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert!(format!("{err:#}").contains("cannot listen on"), "{err:#}");
        server.join().unwrap();
    }

    #[test]
    fn a_port_held_by_a_silent_socket_is_waited_for_until_released() {
        // A listening socket nobody serves, as a killed server's can linger: released after
        // 700 ms, the bind then succeeds.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap();
        let releaser = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(700));
            drop(silent);
        });
        let started = Instant::now();
        let listeners = bind_reuseport(addr, 2).unwrap();
        assert!(started.elapsed() >= Duration::from_millis(600));
        assert_eq!(listeners[1].local_addr().unwrap(), addr);
        releaser.join().unwrap();
    }

    #[test]
    fn passed_sockets_are_shared_by_every_core() {
        let std_listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = std_listener.local_addr().unwrap();
        let fds = vec![ListenFd {
            fd: std_listener.into(),
            name: Some("denokv.socket".into()),
        }];
        let per_core = from_activation(fds, 3).unwrap();
        assert_eq!(per_core.len(), 3);
        for listeners in &per_core {
            assert_eq!(listeners.len(), 1);
            assert_eq!(listeners[0].local_addr().unwrap(), addr);
        }
        // Non-blocking: an accept with nothing queued returns at once.
        let err = per_core[2][0].accept().unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::WouldBlock);
    }

    #[test]
    fn a_passed_socket_must_be_a_tcp_listener() {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let fds = vec![ListenFd {
            fd: udp.into(),
            name: None,
        }];
        let err = from_activation(fds, 1).unwrap_err().to_string();
        assert!(err.contains("not a TCP socket"), "{err}");

        let unlistened = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        unlistened
            .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
            .unwrap();
        let fds = vec![ListenFd {
            fd: unlistened.into(),
            name: Some("web".into()),
        }];
        let err = from_activation(fds, 1).unwrap_err().to_string();
        assert!(
            err.contains("not listening") && err.contains("\"web\""),
            "{err}"
        );
    }
}
