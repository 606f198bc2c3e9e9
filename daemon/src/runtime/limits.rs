//! Connection caps: how many connections the server holds in all and per client address.
//! Shared by every core: the total is an atomic, the per-address counts a small sharded map.

use std::cell::Cell;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::rc::Rc;
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
    /// Watch streams open at once on one connection, and on the whole server.
    pub max_watch_streams_per_connection: usize,
    pub max_watch_streams: usize,
    /// The largest request body (`--max-body-bytes`).
    pub max_body_bytes: usize,
    /// MiB of snapshot read answers held at once (`--max-read-buffer-mb`).
    pub max_read_buffer_mb: usize,
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
    /// The watch stream caps.
    pub watches: Arc<WatchSlots>,
    /// The budget of snapshot read answers held in memory.
    pub reads: Arc<crate::http::read_answer::ReadBudget>,
}

/// One admitted connection; gives its place back when dropped.
pub struct Permit {
    admission: Arc<Admission>,
    ip: IpAddr,
}

impl Admission {
    pub fn new(limits: &Limits) -> Arc<Admission> {
        Arc::new(Admission {
            max_total: limits.max_connections,
            max_per_ip: limits.max_connections_per_ip,
            total: AtomicUsize::new(0),
            per_ip: Default::default(),
            hasher: RandomState::new(),
            watches: Arc::new(WatchSlots {
                max_per_connection: limits.max_watch_streams_per_connection,
                max_total: limits.max_watch_streams,
                total: AtomicUsize::new(0),
            }),
            reads: Arc::new(crate::http::read_answer::ReadBudget::new(
                limits.max_read_buffer_mb,
            )),
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

/// Counts open watch streams against `--max-watch-streams-per-connection` and
/// `--max-watch-streams`.
pub struct WatchSlots {
    pub max_per_connection: usize,
    pub max_total: usize,
    total: AtomicUsize,
}

/// One connection's watch streams: the server's slots and this connection's count.
#[derive(Clone)]
pub struct ConnWatches {
    slots: Arc<WatchSlots>,
    open: Rc<Cell<usize>>,
}

/// One open watch stream; gives its slots back when dropped.
pub struct WatchPermit {
    slots: Arc<WatchSlots>,
    open: Rc<Cell<usize>>,
}

impl ConnWatches {
    pub fn new(slots: Arc<WatchSlots>) -> ConnWatches {
        ConnWatches {
            slots,
            open: Rc::new(Cell::new(0)),
        }
    }

    /// Takes a slot for a watch stream on this connection, unless a cap is reached.
    pub fn take(&self) -> Result<WatchPermit, RequestRefusal> {
        if self.open.get() >= self.slots.max_per_connection {
            return Err(RequestRefusal::MaxWatchStreamsPerConnection);
        }
        let slots = &self.slots;
        if slots.total.fetch_add(1, Ordering::Relaxed) >= slots.max_total {
            slots.total.fetch_sub(1, Ordering::Relaxed);
            return Err(RequestRefusal::MaxWatchStreams);
        }
        self.open.set(self.open.get() + 1);
        Ok(WatchPermit {
            slots: slots.clone(),
            open: self.open.clone(),
        })
    }

    pub fn limits(&self) -> &WatchSlots {
        &self.slots
    }
}

impl Drop for WatchPermit {
    fn drop(&mut self) {
        self.open.set(self.open.get() - 1);
        self.slots.total.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(conns: usize, per_ip: usize, watches: usize, per_conn: usize) -> Limits {
        Limits {
            first_byte_timeout: Duration::from_secs(1),
            head_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(1),
            h2_keepalive_interval: Duration::from_secs(1),
            h2_keepalive_timeout: Duration::from_secs(1),
            max_connections: conns,
            max_connections_per_ip: per_ip,
            max_h2_streams: 1,
            max_watch_streams_per_connection: per_conn,
            max_watch_streams: watches,
            max_body_bytes: 1 << 20,
            max_read_buffer_mb: 1,
        }
    }

    #[test]
    fn watch_slots_are_capped_per_connection_and_in_all() {
        let a = Admission::new(&limits(1, 1, 3, 2));
        let one = ConnWatches::new(a.watches.clone());
        let two = ConnWatches::new(a.watches.clone());
        let w1 = one.take().unwrap();
        let _w2 = one.take().unwrap();
        assert_eq!(
            one.take().err(),
            Some(RequestRefusal::MaxWatchStreamsPerConnection)
        );
        let _w3 = two.take().unwrap();
        assert_eq!(two.take().err(), Some(RequestRefusal::MaxWatchStreams));
        drop(w1);
        let _w4 = two.take().unwrap();
        assert_eq!(one.take().err(), Some(RequestRefusal::MaxWatchStreams));
        assert_eq!(a.watches.total.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn caps_refuse_and_permits_give_their_place_back() {
        let a = Admission::new(&limits(3, 2, 1, 1));
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
