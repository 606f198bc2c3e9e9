//! Listening sockets: one per core, all bound to the same address with `SO_REUSEPORT`.

use std::net::{SocketAddr, TcpListener};

use anyhow::Context;
use socket2::{Domain, Protocol, Socket, Type};

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
