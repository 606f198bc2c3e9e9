//! `verify`: is every write the server acknowledged still there, with its value?
//!
//! For each key only the newest acknowledged write (highest versionstamp) matters. The stored
//! entry may be newer still: a write that committed but whose answer was lost (the server
//! died while answering) legitimately overwrote it. Anything else — key missing, an older
//! versionstamp, or the right versionstamp with other bytes — is a lost acknowledged write.
//!
//! Sum records (`crash-mix`) are checked per counter: it must hold at least the total of its
//! acknowledged addends (less is a lost write) and at most that plus the addends whose outcome
//! is unknown (more means a write was applied twice).

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::anyhow;
use bytes::Bytes;
use denokv::proto;
use serde::Serialize;
use tokio::task::JoinSet;

use crate::acklog::{self, Ack, Sum};
use crate::cli::VerifyArgs;
use crate::client::{self, Conn, Endpoint};
use crate::data;
use crate::run;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Finding {
    /// Stored with the acknowledged versionstamp and value.
    Intact,
    /// Overwritten by a later write whose acknowledgement never arrived.
    Newer,
    Missing,
    /// An older versionstamp than acknowledged: the acknowledged write was lost.
    Older,
    /// The acknowledged versionstamp with other bytes or another encoding.
    WrongValue,
}

#[derive(Debug, Default, Serialize)]
pub struct VerifyReport {
    pub ack_log: String,
    pub url: String,
    /// Lines in the ack log.
    pub records: usize,
    /// Distinct keys, each checked against its newest acknowledged write.
    pub keys: usize,
    pub intact: usize,
    pub newer: usize,
    pub missing: usize,
    pub older: usize,
    pub wrong_value: usize,
    /// Sum records in the log, acknowledged or not.
    pub sum_records: usize,
    /// Distinct counters the sums went to.
    pub counters: usize,
    /// Counters holding their acknowledged total plus at most their uncertain addends.
    pub counters_ok: usize,
    /// Counters below their acknowledged total: acknowledged sums lost.
    pub counters_short: usize,
    /// Counters above acknowledged + uncertain: a sum applied more than once.
    pub counters_excess: usize,
    /// Totals over every counter: acknowledged addends, uncertain ones, what is stored.
    pub sum_acked: u64,
    pub sum_uncertain: u64,
    pub sum_stored: u64,
    /// Enqueue records in the log (not checkable over KV Connect).
    pub enqueue_records: usize,
    pub passed: bool,
    /// Every lost key, one line each.
    pub problems: Vec<String>,
}

impl VerifyReport {
    pub fn table(&self, show: usize) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "verify {} against {}: {} records, {} keys",
            self.ack_log, self.url, self.records, self.keys
        );
        let _ = writeln!(t, "  {:>8}  intact", self.intact);
        let _ = writeln!(
            t,
            "  {:>8}  overwritten by a newer unacknowledged write (fine)",
            self.newer
        );
        let _ = writeln!(t, "  {:>8}  missing", self.missing);
        let _ = writeln!(
            t,
            "  {:>8}  older versionstamp than acknowledged",
            self.older
        );
        let _ = writeln!(t, "  {:>8}  wrong value", self.wrong_value);
        if self.sum_records > 0 {
            let _ = writeln!(
                t,
                "  {} sum records on {} counters: acknowledged {}, uncertain {}, stored {}",
                self.sum_records,
                self.counters,
                self.sum_acked,
                self.sum_uncertain,
                self.sum_stored
            );
            let _ = writeln!(t, "  {:>8}  counters within bounds", self.counters_ok);
            let _ = writeln!(
                t,
                "  {:>8}  counters below their acknowledged total",
                self.counters_short
            );
            let _ = writeln!(
                t,
                "  {:>8}  counters above acknowledged + uncertain",
                self.counters_excess
            );
        }
        for p in self.problems.iter().take(show) {
            let _ = writeln!(t, "  {p}");
        }
        if self.problems.len() > show {
            let _ = writeln!(
                t,
                "  … and {} more (all are in --json)",
                self.problems.len() - show
            );
        }
        let _ = writeln!(
            t,
            "{}",
            if self.passed {
                "PASS: every acknowledged write is present"
            } else {
                "FAIL: acknowledged writes are lost (or sums applied twice)"
            }
        );
        t
    }
}

pub async fn verify(args: &VerifyArgs) -> anyhow::Result<VerifyReport> {
    let records = acklog::read(&args.ack_log)?;
    let mut newest: HashMap<Vec<u8>, Ack> = HashMap::new();
    for ack in &records.writes {
        match newest.get(&ack.key) {
            Some(seen) if seen.versionstamp >= ack.versionstamp => {}
            _ => {
                newest.insert(ack.key.clone(), ack.clone());
            }
        }
    }
    let mut acks: Vec<Ack> = newest.into_values().collect();
    acks.sort_by(|a, b| a.key.cmp(&b.key));
    let acks = Arc::new(acks);

    let c = &args.client;
    let ep = Arc::new(client::discover(&c.url, &c.token, c.proto, c.timeout).await?);
    // Ten keys per read: the server's limit on ranges per read (SPEC §3).
    let chunks = acks.len().div_ceil(10);
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    for conn in run::connections(&ep, c.concurrency as usize, c.connections as usize) {
        let (ep, acks, next) = (ep.clone(), acks.clone(), next.clone());
        tasks.spawn(check_chunks(ep, conn, acks, next, chunks));
    }
    let mut findings = vec![Finding::Intact; acks.len()];
    while let Some(done) = tasks.join_next().await {
        for (i, f) in done.expect("a verify task panicked")? {
            findings[i] = f;
        }
    }

    let mut report = VerifyReport {
        ack_log: args.ack_log.display().to_string(),
        url: c.url.clone(),
        records: records.len(),
        keys: acks.len(),
        sum_records: records.sums.len(),
        enqueue_records: records.enqueues,
        ..Default::default()
    };
    for (ack, f) in acks.iter().zip(&findings) {
        let what = match f {
            Finding::Intact => {
                report.intact += 1;
                continue;
            }
            Finding::Newer => {
                report.newer += 1;
                continue;
            }
            Finding::Missing => {
                report.missing += 1;
                "missing"
            }
            Finding::Older => {
                report.older += 1;
                "older versionstamp"
            }
            Finding::WrongValue => {
                report.wrong_value += 1;
                "wrong value"
            }
        };
        report.problems.push(format!(
            "{what}: {} (acknowledged at {})",
            data::show_key(&ack.key),
            data::versionstamp_hex(ack.versionstamp)
        ));
    }
    check_counters(&ep, &records.sums, &mut report).await?;
    report.passed = report.problems.is_empty();
    Ok(report)
}

/// What the log says one counter must hold.
#[derive(Clone, Copy, Default)]
struct Bounds {
    acked: u64,
    uncertain: u64,
}

/// Reads every counter the sum records name and compares it with its bounds.
async fn check_counters(
    ep: &Endpoint,
    sums: &[Sum],
    report: &mut VerifyReport,
) -> anyhow::Result<()> {
    let mut bounds: HashMap<&[u8], Bounds> = HashMap::new();
    for s in sums {
        let b = bounds.entry(&s.key).or_default();
        match s.versionstamp {
            Some(_) => b.acked = b.acked.wrapping_add(s.n),
            None => b.uncertain = b.uncertain.wrapping_add(s.n),
        }
    }
    let mut keys: Vec<&[u8]> = bounds.keys().copied().collect();
    keys.sort();
    report.counters = keys.len();
    let mut conn = ep.dedicated();
    // Ten ranges per read: the server's limit (SPEC §3).
    for chunk in keys.chunks(10) {
        let ranges = chunk
            .iter()
            .map(|k| client::get_range(&Bytes::copy_from_slice(k)))
            .collect();
        let answers = client::snapshot_read(&mut conn, ep, ranges)
            .await
            .map_err(|e| anyhow!("reading the counters failed: {}", e.label()))?;
        for (key, entries) in chunk.iter().zip(answers) {
            let b = bounds[key];
            report.sum_acked = report.sum_acked.wrapping_add(b.acked);
            report.sum_uncertain = report.sum_uncertain.wrapping_add(b.uncertain);
            let stored = match entries.first() {
                None => 0,
                Some(e) => match client::le64_value(e) {
                    Some(n) => n,
                    None => {
                        report.counters_short += 1;
                        report.problems.push(format!(
                            "counter {}: not an LE64 value",
                            data::show_key(key)
                        ));
                        continue;
                    }
                },
            };
            report.sum_stored = report.sum_stored.wrapping_add(stored);
            let what = if stored < b.acked {
                report.counters_short += 1;
                "lost acknowledged sums"
            } else if stored - b.acked > b.uncertain {
                report.counters_excess += 1;
                "a sum applied twice"
            } else {
                report.counters_ok += 1;
                continue;
            };
            report.problems.push(format!(
                "{what}: counter {} holds {stored}, acknowledged {} (+ up to {} uncertain)",
                data::show_key(key),
                b.acked,
                b.uncertain
            ));
        }
    }
    Ok(())
}

/// Takes chunks of ten keys until none is left; returns (index, finding) of each key.
async fn check_chunks(
    ep: Arc<Endpoint>,
    mut conn: Conn,
    acks: Arc<Vec<Ack>>,
    next: Arc<AtomicUsize>,
    chunks: usize,
) -> anyhow::Result<Vec<(usize, Finding)>> {
    let mut out = Vec::new();
    loop {
        let chunk = next.fetch_add(1, Ordering::Relaxed);
        if chunk >= chunks {
            return Ok(out);
        }
        let first = chunk * 10;
        let last = (first + 10).min(acks.len());
        let ranges = acks[first..last]
            .iter()
            .map(|a| client::get_range(&a.key.clone().into()))
            .collect();
        let answers = client::snapshot_read(&mut conn, &ep, ranges)
            .await
            .map_err(|e| anyhow!("reading the acknowledged keys failed: {}", e.label()))?;
        for (i, entries) in (first..last).zip(answers) {
            out.push((i, judge(&acks[i], entries.first())));
        }
    }
}

fn judge(ack: &Ack, stored: Option<&proto::KvEntry>) -> Finding {
    let Some(entry) = stored else {
        return Finding::Missing;
    };
    let Some(vs) = data::versionstamp(&entry.versionstamp) else {
        return Finding::WrongValue;
    };
    if vs > ack.versionstamp {
        return Finding::Newer;
    }
    if vs < ack.versionstamp {
        return Finding::Older;
    }
    let intact = entry.encoding == proto::ValueEncoding::VeBytes as i32
        && entry.value == data::value_for(ack.tag, ack.size as usize);
    if intact {
        Finding::Intact
    } else {
        Finding::WrongValue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(vs: u8, value: Bytes, encoding: proto::ValueEncoding) -> proto::KvEntry {
        proto::KvEntry {
            key: Bytes::new(),
            value,
            encoding: encoding as i32,
            versionstamp: Bytes::from(vec![0, 0, 0, 0, 0, 0, 0, vs, 0, 0]),
        }
    }

    #[test]
    fn findings() {
        let ack = Ack {
            key: vec![1],
            versionstamp: 5 << 16,
            tag: 42,
            size: 20,
        };
        let good = data::value_for(42, 20);
        let bytes = proto::ValueEncoding::VeBytes;
        assert_eq!(judge(&ack, None), Finding::Missing);
        assert_eq!(
            judge(&ack, Some(&stored(5, good.clone(), bytes))),
            Finding::Intact
        );
        assert_eq!(
            judge(&ack, Some(&stored(6, Bytes::new(), bytes))),
            Finding::Newer
        );
        assert_eq!(
            judge(&ack, Some(&stored(4, good.clone(), bytes))),
            Finding::Older
        );
        assert_eq!(
            judge(&ack, Some(&stored(5, data::value_for(43, 20), bytes))),
            Finding::WrongValue
        );
        assert_eq!(
            judge(&ack, Some(&stored(5, good, proto::ValueEncoding::VeV8))),
            Finding::WrongValue
        );
    }
}
