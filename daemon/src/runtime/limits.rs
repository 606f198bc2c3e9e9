//! Connection caps: how many connections the server holds in all and per client address.
//! Shared by every core: the total is an atomic, the per-address counts a small sharded map.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The deadlines and caps every connection is held to (`--first-byte-timeout` and friends).
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From accept to the first byte the client sends.
    pub first_byte_timeout: Duration,
    /// From the first byte of a request head to its end (HTTP/1.1: every request; h2: the
    /// preface, settings and the first request's HEADERS).
    pub head_timeout: Duration,
    /// How long a connection with no request or stream open stays open.
    pub idle_timeout: Duration,
    pub h2_keepalive_interval: Duration,
    pub h2_keepalive_timeout: Duration,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_h2_streams: u32,
}

/// Why a connection was refused at accept: the `reason` of `denokv_connections_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    MaxConnections,
    MaxConnectionsPerIp,
}

impl Refusal {
    pub const COUNT: usize = 2;
    pub const ALL: [Refusal; Self::COUNT] = [Refusal::MaxConnections, Refusal::MaxConnectionsPerIp];

    pub fn name(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::MaxConnectionsPerIp => "max_connections_per_ip",
        }
    }
}

/// Why a request (an h2 stream) was refused: the `reason` of `denokv_requests_refused_total`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestRefusal {
    /// An h2 stream past `--max-h2-streams`, refused with `REFUSED_STREAM` by the h2 crate.
    MaxH2Streams,
    /// A watch past `--max-watch-streams-per-connection` (429).
    MaxWatchStreamsPerConnection,
    /// A watch past `--max-watch-streams` (429).
    MaxWatchStreams,
    /// A body past `--max-body-bytes` (413).
    MaxBodyBytes,
    /// A body whose repeated fields outnumber the protocol's limits: refused before it is
    /// decoded (400).
    TooManyMessages,
}

impl RequestRefusal {
    pub const COUNT: usize = 5;
    pub const ALL: [RequestRefusal; Self::COUNT] = [
        RequestRefusal::MaxH2Streams,
        RequestRefusal::MaxWatchStreamsPerConnection,
        RequestRefusal::MaxWatchStreams,
        RequestRefusal::MaxBodyBytes,
        RequestRefusal::TooManyMessages,
    ];

    pub fn name(self) -> &'static str {
        match self {
            RequestRefusal::MaxH2Streams => "max_h2_streams",
            RequestRefusal::MaxWatchStreamsPerConnection => "max_watch_streams_per_connection",
            RequestRefusal::MaxWatchStreams => "max_watch_streams",
            RequestRefusal::MaxBodyBytes => "max_body_bytes",
            RequestRefusal::TooManyMessages => "too_many_messages",
        }
    }
}

/// Shards of the per-address map: cores accepting at once rarely wait on each other.
const SHARDS: usize = 16;

/// Counts open connections against the caps.
pub struct Admission {
    max_total: usize,
    max_per_ip: usize,
    total: AtomicUsize,
    per_ip: [Mutex<HashMap<IpAddr, usize>>; SHARDS],
    hasher: RandomState,
}

/// One admitted connection; gives its place back when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(max_total: usize, max_per_ip: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Default::default(),
            hasher: RandomState::new(),
        })
    }

    fn shard(&self, ip: &IpAddr) -> &Mutex<HashMap<IpAddr, usize>> {
        &self.per_ip[self.hasher.hash_one(ip) as usize % SHARDS]
    }

    /// Takes a place for a connection from `ip`, unless a cap is reached.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Permit, Refusal> {
        if self.total.fetch_add(1, Ordering::Relaxed) >= self.max_total {
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::MaxConnections);
        }
        let mut map = self.shard(&ip).lock().unwrap_or_else(|e| e.into_inner());
        let count = map.entry(ip).or_insert(0);
        if *count >= self.max_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::Relaxed);
            return Err(Refusal::MaxConnectionsPerIp);
        }
        *count += 1;
        Ok(Permit {
            admission: self.clone(),
            ip,
        })
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let admission = &self.admission;
        let mut map = admission
            .shard(&self.ip)
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                // Keeps the map as small as the set of clients connected now.
                map.remove(&self.ip);
            }
        }
        drop(map);
        admission.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_refuse_and_permits_give_their_place_back() {
        let a = Admission::new(3, 2);
        let one: IpAddr = "127.0.0.1".parse().unwrap();
        let two: IpAddr = "127.0.0.2".parse().unwrap();
        let p1 = a.admit(one).unwrap();
        let _p2 = a.admit(one).unwrap();
        assert_eq!(a.admit(one).err(), Some(Refusal::MaxConnectionsPerIp));
        let _p3 = a.admit(two).unwrap();
        assert_eq!(a.admit(two).err(), Some(Refusal::MaxConnections));
        drop(p1);
        let _p4 = a.admit(one).unwrap();
        assert_eq!(a.total.load(Ordering::Relaxed), 3);
    }
}
