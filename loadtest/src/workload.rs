//! The closed-loop workloads: what one operation of each does, and the counter check that
//! `cas` and `sum` run afterwards.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use denokv::proto::{self, AtomicWrite, MutationType, ReadRange};
use rand::rngs::SmallRng;
use rand::Rng;
use serde::Serialize;

use crate::acklog::AckLog;
use crate::client::{self, CallError, Conn, Endpoint, Written};
use crate::data;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Workload {
    Write,
    Read,
    Mixed,
    Cas,
    List,
    Sum,
    CrashMix,
    Watch,
}

impl Workload {
    pub fn name(self) -> &'static str {
        match self {
            Workload::Write => "write",
            Workload::Read => "read",
            Workload::Mixed => "mixed",
            Workload::Cas => "cas",
            Workload::List => "list",
            Workload::Sum => "sum",
            Workload::CrashMix => "crash-mix",
            Workload::Watch => "watch",
        }
    }

    /// The kind of the counters `cas` and `sum` keep (also their key part).
    fn counter_kind(self) -> Option<&'static str> {
        match self {
            Workload::Cas => Some("cas"),
            Workload::Sum => Some("sum"),
            _ => None,
        }
    }
}

/// What every client of a run shares.
pub struct Plan {
    pub workload: Workload,
    pub ep: Arc<Endpoint>,
    pub keys: u64,
    pub value_size: u32,
    pub read_pct: u8,
    pub list_size: u32,
    pub hot_keys: u64,
    pub sum_max: u64,
    /// New every run: names this run's counters (`cas`, `sum`) and watched keys.
    pub run_id: u64,
    pub ack_log: Option<Arc<AckLog>>,
}

/// What one client added to one counter.
#[derive(Clone, Copy, Debug, Default)]
pub struct Tally {
    /// Added by writes the server acknowledged.
    pub acked: u64,
    /// Added by writes whose answer never came: they may or may not have committed.
    pub uncertain: u64,
}

/// One client of the closed loop.
pub struct Client {
    pub conn: Conn,
    pub rng: SmallRng,
    /// By counter index (`cas`, `sum`).
    pub tallies: HashMap<u64, Tally>,
}

/// A completed operation.
pub struct Done {
    /// Names the latency histogram it is counted in.
    pub kind: &'static str,
    /// A `cas` write refused by its check: counted as a conflict, not as an error.
    pub conflict: bool,
    /// A counter to bump for it (e.g. a read that found nothing).
    pub note: Option<&'static str>,
}

impl Done {
    fn ok(kind: &'static str) -> Done {
        Done {
            kind,
            conflict: false,
            note: None,
        }
    }
}

/// Runs one operation of the plan's workload.
pub async fn op(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    match plan.workload {
        Workload::Write => write(plan, c).await,
        Workload::Read => read(plan, c).await,
        Workload::Mixed => {
            if c.rng.random_range(0..100u8) < plan.read_pct {
                read(plan, c).await
            } else {
                write(plan, c).await
            }
        }
        Workload::Cas => cas(plan, c).await,
        Workload::List => list(plan, c).await,
        Workload::Sum => sum(plan, c).await,
        Workload::CrashMix => crash_mix(plan, c).await,
        Workload::Watch => unreachable!("watch has its own driver"),
    }
}

async fn write(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let key = data::kv_key(c.rng.random_range(0..plan.keys));
    let tag: u64 = c.rng.random();
    let value = data::value_for(tag, plan.value_size as usize);
    let write = AtomicWrite {
        mutations: vec![client::set_bytes(key.clone(), value)],
        ..Default::default()
    };
    match client::atomic_write(&mut c.conn, &plan.ep, &write).await? {
        Written::Committed(vs) => {
            if let Some(log) = &plan.ack_log {
                log.record(&key, vs, tag, plan.value_size);
            }
            Ok(Done::ok("write"))
        }
        Written::CheckFailed => Err(CallError::Protocol(
            "check failure reported for a write without checks".into(),
        )),
    }
}

async fn read(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let key = data::kv_key(c.rng.random_range(0..plan.keys));
    let ranges =
        client::snapshot_read(&mut c.conn, &plan.ep, vec![client::get_range(&key)]).await?;
    let mut done = Done::ok("read");
    if ranges[0].is_empty() {
        done.note = Some("read misses");
    }
    Ok(done)
}

async fn list(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    // Start where a full page still fits, so short pages mean missing keys (no --preload).
    let starts = plan.keys.saturating_sub(plan.list_size as u64) + 1;
    let start = data::kv_key(c.rng.random_range(0..starts));
    let mut end = data::kv_prefix();
    end.push(0xff);
    let range = ReadRange {
        start,
        end: Bytes::from(end),
        limit: plan.list_size as i32,
        reverse: false,
    };
    let ranges = client::snapshot_read(&mut c.conn, &plan.ep, vec![range]).await?;
    let mut done = Done::ok("list");
    if ranges[0].len() < plan.list_size as usize {
        done.note = Some("short lists");
    }
    Ok(done)
}

/// Read-modify-write of a counter guarded by a versionstamp check: the pattern of Deno's
/// `kv.atomic().check(entry).set(...)` loops.
async fn cas(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let h = c.rng.random_range(0..plan.hot_keys);
    let key = data::run_key("cas", plan.run_id, h);
    let ranges =
        client::snapshot_read(&mut c.conn, &plan.ep, vec![client::get_range(&key)]).await?;
    let (seen, current) = match ranges[0].first() {
        Some(entry) => {
            let n = client::le64_value(entry)
                .ok_or_else(|| CallError::Protocol("a cas counter is not LE64".into()))?;
            (entry.versionstamp.clone(), n)
        }
        // An empty versionstamp checks that the key is still absent.
        None => (Bytes::new(), 0),
    };
    let write = AtomicWrite {
        checks: vec![proto::Check {
            key: key.clone(),
            versionstamp: seen,
        }],
        mutations: vec![client::le64(
            MutationType::MSet,
            key,
            current.wrapping_add(1),
        )],
        ..Default::default()
    };
    let result = client::atomic_write(&mut c.conn, &plan.ep, &write).await;
    let tally = c.tallies.entry(h).or_default();
    match result {
        Ok(Written::Committed(_)) => {
            tally.acked += 1;
            Ok(Done::ok("cas"))
        }
        Ok(Written::CheckFailed) => Ok(Done {
            kind: "cas",
            conflict: true,
            note: None,
        }),
        Err(e) => {
            if e.maybe_committed() {
                tally.uncertain += 1;
            }
            Err(e)
        }
    }
}

async fn sum(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let h = c.rng.random_range(0..plan.hot_keys);
    let n = c.rng.random_range(1..=plan.sum_max);
    let key = data::run_key("sum", plan.run_id, h);
    let write = AtomicWrite {
        mutations: vec![client::le64(MutationType::MSum, key, n)],
        ..Default::default()
    };
    let result = client::atomic_write(&mut c.conn, &plan.ep, &write).await;
    let tally = c.tallies.entry(h).or_default();
    match result {
        Ok(Written::Committed(_)) => {
            tally.acked = tally.acked.wrapping_add(n);
            Ok(Done::ok("sum"))
        }
        Ok(Written::CheckFailed) => Err(CallError::Protocol(
            "check failure reported for a write without checks".into(),
        )),
        Err(e) => {
            if e.maybe_committed() {
                tally.uncertain += n;
            }
            Err(e)
        }
    }
}

/// Shares of `crash-mix` operations, in percent: plain sets, then sums; the rest are
/// versionstamped sets with an enqueue.
const CRASH_SETS_PCT: u8 = 50;
const CRASH_SUMS_PCT: u8 = 30;

/// Writes whose every outcome goes to the ack log, for a crash test (tests/crash/). Plain sets
/// are checked by reading their key back; sums and enqueues, which are not idempotent, also
/// catch a write applied twice.
async fn crash_mix(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let r = c.rng.random_range(0..100u8);
    if r < CRASH_SETS_PCT {
        write(plan, c).await
    } else if r < CRASH_SETS_PCT + CRASH_SUMS_PCT {
        logged_sum(plan, c).await
    } else {
        versionstamped_enqueue(plan, c).await
    }
}

fn ack_log(plan: &Plan) -> &AckLog {
    plan.ack_log
        .as_deref()
        .expect("crash-mix runs with an ack log (checked at start)")
}

/// Why a write that failed this way may still have committed, as one word for the ack log;
/// `None` when it surely did not (the request never left this process). Only a decoded
/// success is certain: a 5xx may follow a commit (clients retry it), and so may a 200 whose
/// body does not decode.
fn uncertain_why(e: &CallError) -> Option<String> {
    match e {
        CallError::Transport { sent: false, .. } => None,
        CallError::Transport { .. } => Some("no-answer".into()),
        CallError::Http { status, .. } => Some(format!("http-{status}")),
        CallError::Protocol(_) => Some("bad-answer".into()),
    }
}

fn no_checks_failed() -> CallError {
    CallError::Protocol("check failure reported for a write without checks".into())
}

/// An LE64 sum on one of the shared crash counters, logged whatever its outcome.
async fn logged_sum(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let h = c.rng.random_range(0..plan.hot_keys);
    let n = c.rng.random_range(1..=plan.sum_max);
    let key = data::crash_counter_key(h);
    let write = AtomicWrite {
        mutations: vec![client::le64(MutationType::MSum, key.clone(), n)],
        ..Default::default()
    };
    let result = match client::atomic_write(&mut c.conn, &plan.ep, &write).await {
        Ok(Written::Committed(vs)) => Ok(vs),
        Ok(Written::CheckFailed) => Err(no_checks_failed()),
        Err(e) => Err(e),
    };
    match result {
        Ok(vs) => {
            ack_log(plan).record_sum(&key, n, Ok(vs));
            Ok(Done::ok("sum"))
        }
        Err(e) => {
            if let Some(why) = uncertain_why(&e) {
                ack_log(plan).record_sum(&key, n, Err(&why));
            }
            Err(e)
        }
    }
}

/// A set at a versionstamped key (a new key every time) and an enqueue, in one atomic write.
/// The enqueue's payload is unique (run id and value tag), so the crash test can find it in the
/// `queue` table exactly once.
async fn versionstamped_enqueue(plan: &Plan, c: &mut Client) -> Result<Done, CallError> {
    let tag: u64 = c.rng.random();
    let mut payload = plan.run_id.to_be_bytes().to_vec();
    payload.extend_from_slice(&tag.to_be_bytes());
    let mut set = client::set_bytes(
        data::crash_vs_prefix(),
        data::value_for(tag, plan.value_size as usize),
    );
    set.mutation_type = MutationType::MSetSuffixVersionstampedKey as i32;
    let write = AtomicWrite {
        mutations: vec![set],
        enqueues: vec![proto::Enqueue {
            payload: Bytes::from(payload.clone()),
            // A day ahead: were messages ever delivered, these would still be in `queue`.
            deadline_ms: now_ms() + 86_400_000,
            keys_if_undelivered: Vec::new(),
            backoff_schedule: Vec::new(),
        }],
        ..Default::default()
    };
    let result = match client::atomic_write(&mut c.conn, &plan.ep, &write).await {
        Ok(Written::Committed(vs)) => Ok(vs),
        Ok(Written::CheckFailed) => Err(no_checks_failed()),
        Err(e) => Err(e),
    };
    let log = ack_log(plan);
    match result {
        Ok(vs) => {
            let key = data::versionstamped_key(&data::crash_vs_prefix(), vs);
            log.record(&key, vs, tag, plan.value_size);
            log.record_enqueue(&payload, Ok(vs));
            Ok(Done::ok("vs-enqueue"))
        }
        Err(e) => {
            if let Some(why) = uncertain_why(&e) {
                log.record_enqueue(&payload, Err(&why));
            }
            Err(e)
        }
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The outcome of a check run after the load.
#[derive(Debug, Serialize)]
pub struct CheckResult {
    pub name: String,
    pub passed: bool,
    pub summary: String,
    /// What failed, one line each.
    pub problems: Vec<String>,
}

/// Reads every counter of a `cas` or `sum` run and compares it with what the clients were
/// told: a counter must hold at least its acknowledged total, and more only by what writes
/// without an answer (transport errors) may have added.
pub async fn check_counters(
    plan: &Plan,
    tallies: &HashMap<u64, Tally>,
) -> Option<anyhow::Result<CheckResult>> {
    let kind = plan.workload.counter_kind()?;
    Some(read_and_compare(plan, kind, tallies).await)
}

async fn read_and_compare(
    plan: &Plan,
    kind: &str,
    tallies: &HashMap<u64, Tally>,
) -> anyhow::Result<CheckResult> {
    let mut conn = plan.ep.dedicated();
    let mut problems = Vec::new();
    let (mut acked, mut found, mut uncertain) = (0u64, 0u64, 0u64);
    let indexes: Vec<u64> = (0..plan.hot_keys).collect();
    // Ten ranges per read: the server's limit (SPEC §3).
    for chunk in indexes.chunks(10) {
        let ranges = chunk
            .iter()
            .map(|&h| client::get_range(&data::run_key(kind, plan.run_id, h)))
            .collect();
        let answers = client::snapshot_read(&mut conn, &plan.ep, ranges)
            .await
            .map_err(|e| anyhow::anyhow!("reading the {kind} counters failed: {}", e.label()))?;
        for (&h, entries) in chunk.iter().zip(answers) {
            let want = tallies.get(&h).copied().unwrap_or_default();
            let have = match entries.first() {
                None => 0,
                Some(e) => match client::le64_value(e) {
                    Some(n) => n,
                    None => {
                        problems.push(format!("counter {h}: not an LE64 value"));
                        continue;
                    }
                },
            };
            acked = acked.wrapping_add(want.acked);
            found = found.wrapping_add(have);
            uncertain += want.uncertain;
            if have < want.acked || have - want.acked > want.uncertain {
                problems.push(format!(
                    "counter {h}: holds {have}, acknowledged {} (+ up to {} unacknowledged)",
                    want.acked, want.uncertain
                ));
            }
        }
    }
    let summary = format!(
        "{} counters hold {found}; acknowledged {acked}{}",
        plan.hot_keys,
        if uncertain > 0 {
            format!(" + up to {uncertain} from writes without an answer")
        } else {
            String::new()
        }
    );
    Ok(CheckResult {
        name: format!("{kind} counters equal the acknowledged totals"),
        passed: problems.is_empty(),
        summary,
        problems,
    })
}
