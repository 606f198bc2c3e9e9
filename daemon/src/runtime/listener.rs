//! Listening sockets: one per core, all bound to the same address with `SO_REUSEPORT`, or the
//! sockets systemd hands over (socket activation), shared by every core.

use std::net::{SocketAddr, TcpListener};

use anyhow::{bail, Context};
use socket2::{Domain, Protocol, Socket, Type};

use crate::systemd::ListenFd;

const BACKLOG: i32 = 1024;

/// Binds `count` listeners to `addr`. Port 0 is resolved by the first bind, so every listener
/// shares one port.
pub fn bind_reuseport(addr: SocketAddr, count: usize) -> anyhow::Result<Vec<TcpListener>> {
    // SO_REUSEPORT would let a second server of the same user share a port that is already
    // served, splitting clients between two databases. A probe bound without it fails then.
    if addr.port() != 0 {
        let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        probe.set_reuse_address(true)?;
        probe
            .bind(&addr.into())
            .with_context(|| format!("Failed to start server: cannot listen on {addr}"))?;
    }
    let first = bind_one(addr)
        .with_context(|| format!("Failed to start server: cannot listen on {addr}"))?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..count {
        listeners.push(
            bind_one(addr)
                .with_context(|| format!("Failed to start server: cannot listen on {addr}"))?,
        );
    }
    Ok(listeners)
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
