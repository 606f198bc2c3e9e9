//! Running a load: connections, the optional preload, the closed loop with its warm-up and
//! measured window, and the checks afterwards.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use denokv::proto::AtomicWrite;
use rand::rngs::SmallRng;
use rand::SeedableRng;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::acklog::AckLog;
use crate::cli::RunArgs;
use crate::client::{self, CallError, Conn, Endpoint, Proto, SharedH2, Written};
use crate::data;
use crate::report::Report;
use crate::server::{self, ProcessUsage};
use crate::stats::Stats;
use crate::watch;
use crate::workload::{self, Client, Plan, Tally, Workload};

/// The measured window: operations that end inside `[from, to]` are counted.
#[derive(Clone, Copy)]
pub struct Window {
    pub from: Instant,
    pub to: Instant,
}

impl Window {
    /// Starts now: warm-up first, then the measured time.
    pub fn starting_now(warmup: Duration, duration: Duration) -> Window {
        let from = Instant::now() + warmup;
        Window {
            from,
            to: from + duration,
        }
    }

    pub fn contains(&self, t: Instant) -> bool {
        self.from <= t && t <= self.to
    }
}

pub async fn run(workload: Workload, args: &RunArgs) -> anyhow::Result<Report> {
    let c = &args.client;
    let ep = Arc::new(client::discover(&c.url, &c.token, c.proto, c.timeout).await?);
    if matches!(workload, Workload::Cas | Workload::Sum) && args.hot_keys > 100_000 {
        bail!("--hot-keys above 100000 makes the counter check too slow");
    }
    let ack_log = match &args.ack_log {
        Some(path) => Some(Arc::new(AckLog::open(
            path,
            &format!("{} run against {}", workload.name(), c.url),
        )?)),
        None => None,
    };
    if workload == Workload::CrashMix && ack_log.is_none() {
        bail!("crash-mix needs --ack-log: its checks are all made later, from the log");
    }
    let logged = matches!(
        workload,
        Workload::Write | Workload::Mixed | Workload::CrashMix
    );
    if ack_log.is_some() && !logged && !args.preload {
        eprintln!(
            "note: --ack-log records the writes of write, mixed, crash-mix and --preload only"
        );
    }
    let plan = Arc::new(Plan {
        workload,
        ep: ep.clone(),
        keys: args.keys,
        value_size: args.value_size,
        read_pct: args.read_pct,
        list_size: args.list_size,
        hot_keys: args.hot_keys,
        sum_max: args.sum_max,
        run_id: run_id(),
        ack_log,
    });

    // The watch workload has one writer and --watchers streams instead of --concurrency clients.
    let clients = match workload {
        Workload::Watch => args.watchers + 1,
        _ => c.concurrency,
    };
    let mut conns = connections(&ep, clients as usize, c.connections as usize);
    for conn in &mut conns {
        conn.connect()
            .await
            .map_err(|e| anyhow!("cannot connect: {}", e.label()))?;
    }

    let preload = if args.preload {
        let started = Instant::now();
        let writes = preload(&plan, &mut conns, args.seed).await?;
        let seconds = started.elapsed().as_secs_f64();
        eprintln!(
            "preloaded {} keys in {writes} writes, {seconds:.1} s",
            args.keys
        );
        Some(PreloadInfo {
            keys: args.keys,
            writes,
            seconds,
        })
    } else {
        None
    };

    let mut report = if workload == Workload::Watch {
        watch::run(&plan, args, conns).await?
    } else {
        let (stats, tallies, usage, measured) = closed_loop(&plan, args, conns).await;
        // Rates are per measured second: shorter than --duration if --stop-when-down ended it.
        let measured_args = RunArgs {
            duration: measured,
            ..args.clone()
        };
        let mut report = Report::new(
            workload.name(),
            &measured_args,
            connection_count(c, clients),
            stats,
            &[],
        );
        report.set_usage(usage.0, usage.1);
        if let Some(check) = workload::check_counters(&plan, &tallies).await {
            report.add_check(check?);
        }
        report
    };
    report.preload = preload;
    if let Some(log) = &plan.ack_log {
        log.finish()?;
    }
    Ok(report)
}

/// A fresh id per run, so counters and watched keys of earlier runs never mix in.
fn run_id() -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    now.as_nanos() as u64 & (i64::MAX as u64)
}

/// One connection per client with HTTP/1.1; with HTTP/2, `shared` connections handed out to
/// the clients in turn.
pub fn connections(ep: &Endpoint, clients: usize, shared: usize) -> Vec<Conn> {
    match ep.proto {
        Proto::H1 => (0..clients).map(|_| ep.dedicated()).collect(),
        Proto::H2 => {
            let pool: Vec<Arc<SharedH2>> = (0..shared.min(clients))
                .map(|_| SharedH2::new(&ep.authority))
                .collect();
            (0..clients)
                .map(|i| Conn::H2(pool[i % pool.len()].clone()))
                .collect()
        }
    }
}

/// How many TCP connections `connections` makes for `clients` clients.
pub fn connection_count(c: &crate::cli::ClientArgs, clients: u32) -> u32 {
    match c.proto {
        Proto::H1 => clients,
        Proto::H2 => c.connections.min(clients),
    }
}

/// A different random stream per client, all fixed by `--seed`.
pub fn client_rng(seed: u64, client: usize) -> SmallRng {
    SmallRng::seed_from_u64(seed ^ (client as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Every client sends its next request as soon as the previous one is answered, until the
/// window ends (or, with --stop-when-down, until any client has a transport error). A transport
/// error is followed by a short pause, so a dead server is not hammered by a tight reconnect
/// loop. Also returns how long the measured window really lasted.
async fn closed_loop(
    plan: &Arc<Plan>,
    args: &RunArgs,
    conns: Vec<Conn>,
) -> (
    Stats,
    HashMap<u64, Tally>,
    (Option<ProcessUsage>, Option<ProcessUsage>),
    Duration,
) {
    let window = Window::starting_now(args.warmup, args.duration);
    let usage = args.server_pid.map(|pid| server::sample_both(pid, window));
    let down = Arc::new(AtomicBool::new(false));
    let mut tasks = JoinSet::new();
    for (id, conn) in conns.into_iter().enumerate() {
        let plan = plan.clone();
        let down = down.clone();
        let stop_when_down = args.stop_when_down;
        let mut client = Client {
            conn,
            rng: client_rng(args.seed, id),
            tallies: HashMap::new(),
        };
        tasks.spawn(async move {
            let mut stats = Stats::default();
            while Instant::now() < window.to && !down.load(Ordering::Relaxed) {
                let started = Instant::now();
                let result = workload::op(&plan, &mut client).await;
                let ended = Instant::now();
                let measured = window.contains(ended);
                match result {
                    Ok(done) if measured => {
                        if done.conflict {
                            stats.conflicts += 1;
                        } else {
                            stats.record(done.kind, ended - started);
                        }
                        if let Some(note) = done.note {
                            stats.count(note, 1);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        if measured {
                            stats.error(&e);
                        }
                        if stop_when_down && e.is_transport() {
                            down.store(true, Ordering::Relaxed);
                        } else if e.is_transport() {
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
            (stats, client.tallies)
        });
    }
    let mut stats = Stats::default();
    let mut tallies: HashMap<u64, Tally> = HashMap::new();
    while let Some(done) = tasks.join_next().await {
        let (s, t) = done.expect("a client task panicked");
        stats.merge(s);
        for (h, tally) in t {
            let sum = tallies.entry(h).or_default();
            sum.acked = sum.acked.wrapping_add(tally.acked);
            sum.uncertain += tally.uncertain;
        }
    }
    let measured = Instant::now()
        .min(window.to)
        .saturating_duration_since(window.from);
    (stats, tallies, server::finish(usage).await, measured)
}

#[derive(Debug, Serialize)]
pub struct PreloadInfo {
    pub keys: u64,
    pub writes: u64,
    pub seconds: f64,
}

/// At most this many mutations per preload write (the server allows 1000).
const PRELOAD_BATCH: u64 = 500;
/// Key and value bytes per preload write: below the server's 819200-byte total (SPEC §3).
const PRELOAD_BYTES: u64 = 800_000;

/// Writes every key of the key space, in batches, with a few clients at once. Sets are
/// idempotent, so a batch whose answer was lost is simply sent again.
async fn preload(plan: &Arc<Plan>, conns: &mut Vec<Conn>, seed: u64) -> anyhow::Result<u64> {
    let key_len = data::kv_key(plan.keys).len() as u64;
    let per_batch = (PRELOAD_BYTES / (key_len + plan.value_size as u64)).clamp(1, PRELOAD_BATCH);
    let batches = plan.keys.div_ceil(per_batch);
    let next = Arc::new(AtomicU64::new(0));
    let workers = conns.len().min(8);
    let mut tasks: JoinSet<anyhow::Result<Conn>> = JoinSet::new();
    for conn in conns.drain(..workers) {
        let (plan, next) = (plan.clone(), next.clone());
        tasks.spawn(async move {
            let mut conn = conn;
            loop {
                let batch = next.fetch_add(1, Ordering::Relaxed);
                if batch >= batches {
                    return Ok(conn);
                }
                let first = batch * per_batch;
                let last = (first + per_batch).min(plan.keys);
                preload_batch(&plan, &mut conn, first..last, seed).await?;
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        conns.push(done.expect("a preload task panicked")?);
    }
    Ok(batches)
}

async fn preload_batch(
    plan: &Plan,
    conn: &mut Conn,
    keys: std::ops::Range<u64>,
    seed: u64,
) -> anyhow::Result<()> {
    let tag = |i: u64| data::preload_tag(seed, i);
    let write = AtomicWrite {
        mutations: keys
            .clone()
            .map(|i| {
                client::set_bytes(
                    data::kv_key(i),
                    data::value_for(tag(i), plan.value_size as usize),
                )
            })
            .collect(),
        ..Default::default()
    };
    let mut tries = 0;
    let vs = loop {
        match client::atomic_write(conn, &plan.ep, &write).await {
            Ok(Written::Committed(vs)) => break vs,
            Ok(Written::CheckFailed) => bail!("preload: check failure on a write without checks"),
            Err(e @ CallError::Transport { .. }) if tries < 5 => {
                tries += 1;
                eprintln!("preload: {} (retrying)", e.label());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => bail!("preload failed: {}", e.label()),
        }
    };
    if let Some(log) = &plan.ack_log {
        for i in keys {
            log.record(&data::kv_key(i), vs, tag(i), plan.value_size);
        }
    }
    Ok(())
}
