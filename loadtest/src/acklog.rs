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
        // Formatted before taking the lock, so clients hold it only for a buffer copy.
        let mut line = String::with_capacity(2 * key.len() + 48);
        line.push_str(&data::to_hex(key));
        let _ = writeln!(
            line,
            " {} {tag:016x} {size}",
            data::versionstamp_hex(versionstamp)
        );
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

pub fn read(path: &Path) -> anyhow::Result<Vec<Ack>> {
    let file =
        File::open(path).with_context(|| format!("cannot open ack log {}", path.display()))?;
    let mut acks = Vec::new();
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line?;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let ack = parse(line)
            .ok_or_else(|| anyhow!("{}:{}: not an ack record: {line:?}", path.display(), n + 1))?;
        acks.push(ack);
    }
    Ok(acks)
}

fn parse(line: &str) -> Option<Ack> {
    let mut fields = line.split_ascii_whitespace();
    let key = data::from_hex(fields.next()?)?;
    let vs = fields.next()?;
    if vs.len() != 20 {
        return None;
    }
    let versionstamp = u128::from_str_radix(vs, 16).ok()?;
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
        log.finish().unwrap();
        let acks = read(&path).unwrap();
        assert_eq!(
            acks,
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
    }
}
