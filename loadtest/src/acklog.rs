//! The ack log: one line per acknowledged write, so that `verify` can check each one against
//! the database later (for example after the server was killed and restarted).
//!
//! Text, one record a line, `#` starts a comment line:
//!
//! ```text
//! <key hex> <versionstamp: 20 hex digits> <value tag: 16 hex digits> <value size>
//! ```
//!
//! The value itself is `data::value_for(tag, size)` stored as `VE_BYTES`; logging the tag
//! instead of the bytes keeps the log small while `verify` still compares every byte.
//!
//! `crash-mix` also logs writes that cannot be checked by reading one key back, in records
//! that start with a word (so they never parse as a key):
//!
//! ```text
//! sum <key hex> <addend> <versionstamp>     an acknowledged LE64 sum
//! sum? <key hex> <addend> <why>             a sum that may or may not have committed
//! enq <payload hex> <versionstamp>          an acknowledged enqueue
//! enq? <payload hex> <why>                  an enqueue that may or may not have committed
//! ```
//!
//! A sum is not idempotent, so its uncertain outcomes must be logged too: a counter may exceed
//! its acknowledged total by at most its uncertain addends, and any more means a write was
//! applied twice. `<why>` is one word (`no-answer`, `http-503`, …). Enqueues land in the
//! `queue` table, which KV Connect cannot read: the crash test checks them in the database file.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::Path;
use std::sync::Mutex;

use anyhow::{anyhow, Context};

use crate::data;

pub struct AckLog {
    out: Mutex<BufWriter<File>>,
}

impl AckLog {
    /// Opens `path` for appending (several runs may feed one log) and marks the start of a run.
    pub fn open(path: &Path, note: &str) -> anyhow::Result<AckLog> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .with_context(|| format!("cannot open ack log {}", path.display()))?;
        let mut out = BufWriter::with_capacity(1 << 16, file);
        writeln!(out, "# denokv-loadtest ack log v1: {note}")?;
        Ok(AckLog {
            out: Mutex::new(out),
        })
    }

    /// Records one acknowledged write. Called only after the server answered success.
    pub fn record(&self, key: &[u8], versionstamp: u128, tag: u64, size: u32) {
        let mut line = String::with_capacity(2 * key.len() + 48);
        line.push_str(&data::to_hex(key));
        let _ = writeln!(
            line,
            " {} {tag:016x} {size}",
            data::versionstamp_hex(versionstamp)
        );
        self.write_line(&line);
    }

    /// Records an LE64 sum of `n` on `key`: `Ok(versionstamp)` when acknowledged, `Err(why)`
    /// (one word) when it may or may not have committed.
    pub fn record_sum(&self, key: &[u8], n: u64, outcome: Result<u128, &str>) {
        let line = match outcome {
            Ok(vs) => format!(
                "sum {} {n} {}\n",
                data::to_hex(key),
                data::versionstamp_hex(vs)
            ),
            Err(why) => format!("sum? {} {n} {why}\n", data::to_hex(key)),
        };
        self.write_line(&line);
    }

    /// Records an enqueue of `payload`, like `record_sum`.
    pub fn record_enqueue(&self, payload: &[u8], outcome: Result<u128, &str>) {
        let line = match outcome {
            Ok(vs) => format!(
                "enq {} {}\n",
                data::to_hex(payload),
                data::versionstamp_hex(vs)
            ),
            Err(why) => format!("enq? {} {why}\n", data::to_hex(payload)),
        };
        self.write_line(&line);
    }

    /// Lines are formatted before taking the lock, so clients hold it only for a buffer copy.
    fn write_line(&self, line: &str) {
        let mut out = self.out.lock().unwrap();
        if let Err(e) = out.write_all(line.as_bytes()) {
            // A log with holes would make `verify` pass wrongly for the missing lines; stop.
            eprintln!("denokv-loadtest: cannot write the ack log: {e}");
            std::process::exit(2);
        }
    }

    /// Flushes and fsyncs, so the log outlives a crash of this machine too.
    pub fn finish(&self) -> anyhow::Result<()> {
        let mut out = self.out.lock().unwrap();
        out.flush()?;
        out.get_ref().sync_all()?;
        Ok(())
    }
}

/// One acknowledged write.
#[derive(Clone, Debug, PartialEq)]
pub struct Ack {
    pub key: Vec<u8>,
    pub versionstamp: u128,
    pub tag: u64,
    pub size: u32,
}

/// One LE64 sum: acknowledged (`Some` versionstamp) or of unknown outcome (`None`).
#[derive(Clone, Debug, PartialEq)]
pub struct Sum {
    pub key: Vec<u8>,
    pub n: u64,
    pub versionstamp: Option<u128>,
}

/// Everything an ack log holds.
#[derive(Debug, Default, PartialEq)]
pub struct Records {
    pub writes: Vec<Ack>,
    pub sums: Vec<Sum>,
    /// Enqueue records (acknowledged or not): counted only, `verify` cannot read the queue.
    pub enqueues: usize,
}

impl Records {
    pub fn len(&self) -> usize {
        self.writes.len() + self.sums.len() + self.enqueues
    }
}

pub fn read(path: &Path) -> anyhow::Result<Records> {
    let file =
        File::open(path).with_context(|| format!("cannot open ack log {}", path.display()))?;
    let mut records = Records::default();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || anyhow!("{}:{}: not an ack record: {line:?}", path.display(), n + 1);
        match line.split_once(' ').map_or(line, |(word, _)| word) {
            "sum" | "sum?" => records.sums.push(parse_sum(line).ok_or_else(bad)?),
            "enq" | "enq?" => {
                parse_enqueue(line).ok_or_else(bad)?;
                records.enqueues += 1;
            }
            _ => records.writes.push(parse(line).ok_or_else(bad)?),
        }
    }
    Ok(records)
}

fn parse_versionstamp(text: &str) -> Option<u128> {
    if text.len() != 20 {
        return None;
    }
    u128::from_str_radix(text, 16).ok()
}

fn parse_sum(line: &str) -> Option<Sum> {
    let mut fields = line.split_ascii_whitespace();
    let acked = match fields.next()? {
        "sum" => true,
        "sum?" => false,
        _ => return None,
    };
    let key = data::from_hex(fields.next()?)?;
    let n = fields.next()?.parse().ok()?;
    let last = fields.next()?;
    let versionstamp = if acked {
        Some(parse_versionstamp(last)?)
    } else {
        None
    };
    if fields.next().is_some() {
        return None;
    }
    Some(Sum {
        key,
        n,
        versionstamp,
    })
}

/// Checks the shape of an `enq`/`enq?` record.
fn parse_enqueue(line: &str) -> Option<()> {
    let mut fields = line.split_ascii_whitespace();
    let acked = match fields.next()? {
        "enq" => true,
        "enq?" => false,
        _ => return None,
    };
    data::from_hex(fields.next()?)?;
    let last = fields.next()?;
    if acked {
        parse_versionstamp(last)?;
    }
    fields.next().is_none().then_some(())
}

fn parse(line: &str) -> Option<Ack> {
    let mut fields = line.split_ascii_whitespace();
    let key = data::from_hex(fields.next()?)?;
    let versionstamp = parse_versionstamp(fields.next()?)?;
    let tag = u64::from_str_radix(fields.next()?, 16).ok()?;
    let size = fields.next()?.parse().ok()?;
    if fields.next().is_some() {
        return None;
    }
    Some(Ack {
        key,
        versionstamp,
        tag,
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("acks");
        let log = AckLog::open(&path, "first").unwrap();
        log.record(&[2, b'a', 0], 0x1234, u64::MAX, 100);
        log.finish().unwrap();
        let log = AckLog::open(&path, "second").unwrap();
        log.record(&[2, b'b', 0], 7, 1, 0);
        log.record_sum(&[2, b'c', 0], 5, Ok(9));
        log.record_sum(&[2, b'c', 0], 3, Err("no-answer"));
        log.record_enqueue(&[1, 2], Ok(10));
        log.record_enqueue(&[3], Err("http-503"));
        log.finish().unwrap();
        let records = read(&path).unwrap();
        assert_eq!(
            records.sums,
            vec![
                Sum {
                    key: vec![2, b'c', 0],
                    n: 5,
                    versionstamp: Some(9)
                },
                Sum {
                    key: vec![2, b'c', 0],
                    n: 3,
                    versionstamp: None
                },
            ]
        );
        assert_eq!(records.enqueues, 2);
        assert_eq!(records.len(), 6);
        assert_eq!(
            records.writes,
            vec![
                Ack {
                    key: vec![2, b'a', 0],
                    versionstamp: 0x1234,
                    tag: u64::MAX,
                    size: 100
                },
                Ack {
                    key: vec![2, b'b', 0],
                    versionstamp: 7,
                    tag: 1,
                    size: 0
                },
            ]
        );
    }

    #[test]
    fn bad_lines_are_refused() {
        assert!(parse("zz 00000000000000000001 01 1").is_none());
        assert!(parse("0261 0001 01 1").is_none());
        assert!(parse("0261 00000000000000000001 01 1 extra").is_none());
        assert!(parse_sum("sum 0261 5 0001").is_none());
        assert!(parse_sum("sum 0261 x 00000000000000000001").is_none());
        assert!(parse_sum("sum? 0261 5 no-answer extra").is_none());
        assert!(parse_enqueue("enq 01 no-answer").is_none());
        assert!(parse_enqueue("enq? 01 no-answer").is_some());
    }
}
