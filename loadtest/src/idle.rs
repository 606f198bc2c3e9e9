//! `idle`: what open, idle connections cost the server. Opens --concurrency connections (one
//! TCP connection each, HTTP/1.1 or h2), makes one read on each so the server holds a live
//! keep-alive connection, holds them for --duration, reads on each again, and reports the
//! server's resident memory before and after (`--server-pid`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;

use serde::Serialize;
use tokio::task::JoinSet;

use crate::cli::IdleArgs;
use crate::client::{self, Conn, Endpoint, Proto};
use crate::data;
use crate::server;

/// Connections opened at once (the server's accept backlog is finite).
const OPENING_AT_ONCE: usize = 256;

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub url: String,
    pub proto: Proto,
    pub connections: u32,
    /// Connections that answered their first read.
    pub opened: u64,
    /// Opened connections that still answered a read after the hold.
    pub alive_after_hold: u64,
    pub hold_s: f64,
    pub errors: BTreeMap<String, u64>,
    pub server_rss_mib_before: Option<f64>,
    pub server_rss_mib_with_connections: Option<f64>,
    /// (with − before) / opened.
    pub server_kib_per_connection: Option<f64>,
    pub passed: bool,
}

pub async fn run(args: &IdleArgs) -> anyhow::Result<IdleReport> {
    let n = args.client.concurrency as usize;
    // The server's own way of lifting the soft limit to the hard one.
    let (_, limit) = denokv::runtime::raise_open_files_limit()
        .map_err(|e| anyhow::anyhow!("cannot raise the open files limit: {e}"))?;
    if limit < n as u64 + 256 {
        eprintln!("note: open files limited to {limit} (hard limit); some connections may fail");
    }
    let c = &args.client;
    let ep = Arc::new(client::discover(&c.url, &c.token, c.proto, c.timeout).await?);
    let rss_before = args.server_pid.and_then(server::rss_mib);

    let conns = (0..n).map(|_| ep.dedicated()).collect();
    let (conns, mut errors) = read_on_each(&ep, conns).await;
    let opened = conns.len() as u64;
    tokio::time::sleep(args.duration).await;
    let rss_with = args.server_pid.and_then(server::rss_mib);
    let (alive, later_errors) = read_on_each(&ep, conns).await;
    for (k, v) in later_errors {
        *errors.entry(format!("after hold: {k}")).or_default() += v;
    }
    let per_conn = match (rss_before, rss_with) {
        (Some(b), Some(w)) if opened > 0 => Some((w - b) * 1024.0 / opened as f64),
        _ => None,
    };
    Ok(IdleReport {
        url: c.url.clone(),
        proto: c.proto,
        connections: c.concurrency,
        opened,
        alive_after_hold: alive.len() as u64,
        hold_s: args.duration.as_secs_f64(),
        errors,
        server_rss_mib_before: rss_before,
        server_rss_mib_with_connections: rss_with,
        server_kib_per_connection: per_conn,
        passed: opened == n as u64 && alive.len() == n,
    })
}

/// One point read on every connection, `OPENING_AT_ONCE` at a time; the connections that
/// answered, and the errors of the others by label.
async fn read_on_each(ep: &Arc<Endpoint>, conns: Vec<Conn>) -> (Vec<Conn>, BTreeMap<String, u64>) {
    let mut ok = Vec::with_capacity(conns.len());
    let mut errors = BTreeMap::new();
    let mut pending = conns.into_iter();
    let mut tasks = JoinSet::new();
    loop {
        while tasks.len() < OPENING_AT_ONCE {
            let Some(mut conn) = pending.next() else {
                break;
            };
            let ep = ep.clone();
            tasks.spawn(async move {
                let range = client::get_range(&data::kv_key(0));
                let r = client::snapshot_read(&mut conn, &ep, vec![range]).await;
                (conn, r.map(|_| ()))
            });
        }
        let Some(done) = tasks.join_next().await else {
            break;
        };
        match done.expect("a connection task panicked") {
            (conn, Ok(())) => ok.push(conn),
            (_, Err(e)) => *errors.entry(e.label()).or_default() += 1,
        }
    }
    (ok, errors)
}

impl IdleReport {
    pub fn table(&self) -> String {
        let mut t = String::new();
        let mib = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} MiB"));
        let _ = writeln!(
            t,
            "idle against {}: {:?}, {} connections held {:.1} s",
            self.url, self.proto, self.connections, self.hold_s
        );
        let _ = writeln!(
            t,
            "opened: {}   alive after the hold: {}",
            self.opened, self.alive_after_hold
        );
        let _ = writeln!(
            t,
            "server RSS: {} before, {} with the connections{}",
            mib(self.server_rss_mib_before),
            mib(self.server_rss_mib_with_connections),
            self.server_kib_per_connection
                .map_or(String::new(), |k| format!(" ({k:.1} KiB per connection)"))
        );
        for (label, n) in &self.errors {
            let _ = writeln!(t, "  {n:>8}  {label}");
        }
        if !self.passed {
            let _ = writeln!(t, "FAILED: not every connection stayed usable");
        }
        t
    }
}
