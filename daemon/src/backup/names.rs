//! Object names under the backup prefix (SPEC §8.1): `differential`, `snapshots/<S>.bin`,
//! `logs/<L>.bin`. We write format 1 only and read formats 0 and 1.
//!
//! Our writer's `monoseq` is a version: a log object's is the version of its first commit
//! (versions grow with every commit, and an object holds whole commits, so names sort in
//! commit order and an object shipped twice after a crash gets the same name); a snapshot's
//! is the version its generation started reading at.

use anyhow::{bail, Context};

pub const DIFFERENTIAL: &str = "differential";
pub const SNAPSHOTS: &str = "snapshots/";
pub const LOGS: &str = "logs/";
/// Our own records of each snapshot generation (JSON; readers of SPEC §8 never look here).
pub const GENERATIONS: &str = "denokv/generations/";
/// Markers of new histories: `denokv/resets/<version>` is written before any log of a history
/// that starts at `version` (after commits the backup could not ship), so that a replica
/// following the older history stops instead of applying the new one on top of a hole.
pub const RESETS: &str = "denokv/resets/";

/// The marker of a history that starts at `version`.
pub fn reset_key(version: u64) -> String {
    format!("{RESETS}{version:016x}")
}

/// The version a reset marker's key names.
pub fn parse_reset(key: &str) -> Option<u64> {
    u64::from_str_radix(key.strip_prefix(RESETS)?, 16).ok()
}

const FORMAT_1: &str = "0001";

/// A 12-byte log versionstamp: the commit's 10-byte versionstamp and a 2-byte index.
pub type Versionstamp12 = [u8; 12];

/// The versionstamp12 of commit `version`'s entry `index` (our commits' versionstamps are
/// the version followed by two zero bytes).
pub fn versionstamp12(version: u64, index: u16) -> Versionstamp12 {
    let mut vs = [0u8; 12];
    vs[..8].copy_from_slice(&version.to_be_bytes());
    vs[10..].copy_from_slice(&index.to_be_bytes());
    vs
}

/// The version (first 8 bytes) of a 10- or 12-byte versionstamp.
pub fn version_of(vs: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&vs[..8]);
    u64::from_be_bytes(b)
}

/// A parsed log object name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogName {
    pub format: u16,
    pub monoseq: u64,
    pub first: Versionstamp12,
    pub last: Versionstamp12,
}

impl LogName {
    /// The format-1 name of an object holding commits `first_version..=last_version`.
    pub fn for_commits(first: Versionstamp12, last: Versionstamp12) -> LogName {
        LogName {
            format: 1,
            monoseq: version_of(&first),
            first,
            last,
        }
    }

    /// The object's key relative to the prefix: `logs/0001_<monoseq>_<first>_<last>.bin`.
    pub fn key(&self) -> String {
        format!(
            "{LOGS}{}_{}_{}.bin",
            self.stem_prefix(),
            hex(&self.first),
            hex(&self.last)
        )
    }

    /// The part of the key every object of this `monoseq` shares (for a listing by prefix).
    pub fn monoseq_prefix(monoseq: u64) -> String {
        format!("{LOGS}{FORMAT_1}_{monoseq:016x}_")
    }

    fn stem_prefix(&self) -> String {
        if self.format == 1 {
            format!("{FORMAT_1}_{:016x}", self.monoseq)
        } else {
            format!(
                "{:016x}_{:016x}",
                self.monoseq >> 32,
                self.monoseq & 0xffff_ffff
            )
        }
    }

    /// Parses a key relative to the prefix (`logs/….bin`).
    pub fn parse(key: &str) -> anyhow::Result<LogName> {
        let stem = strip(key, LOGS)?;
        let fields: Vec<&str> = stem.split('_').collect();
        let (format, monoseq, rest) =
            format_and_monoseq(&fields).with_context(|| format!("bad log object name {key}"))?;
        let [first, last] = rest else {
            bail!("bad log object name {key}: expected two versionstamps");
        };
        Ok(LogName {
            format,
            monoseq,
            first: parse_hex(first).with_context(|| format!("bad log object name {key}"))?,
            last: parse_hex(last).with_context(|| format!("bad log object name {key}"))?,
        })
    }
}

/// A parsed snapshot object name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotName {
    pub format: u16,
    pub monoseq: u64,
    pub seq: u64,
}

impl SnapshotName {
    pub fn key(&self) -> String {
        format!(
            "{SNAPSHOTS}{FORMAT_1}_{:016x}_{:016x}.bin",
            self.monoseq, self.seq
        )
    }

    pub fn parse(key: &str) -> anyhow::Result<SnapshotName> {
        let stem = strip(key, SNAPSHOTS)?;
        let fields: Vec<&str> = stem.split('_').collect();
        let (format, monoseq, rest) = format_and_monoseq(&fields)
            .with_context(|| format!("bad snapshot object name {key}"))?;
        let [seq] = rest else {
            bail!("bad snapshot object name {key}: expected a sequence number");
        };
        let seq = u64::from_str_radix(seq, 16)
            .with_context(|| format!("bad snapshot object name {key}"))?;
        Ok(SnapshotName {
            format,
            monoseq,
            seq,
        })
    }
}

fn strip<'a>(key: &'a str, dir: &str) -> anyhow::Result<&'a str> {
    key.strip_prefix(dir)
        .and_then(|k| k.strip_suffix(".bin"))
        .with_context(|| format!("bad object name {key}: not {dir}….bin"))
}

/// Format 1: `0001_<monoseq>`; format 0: `<epoch>_<tsn>` (SPEC §8.1).
fn format_and_monoseq<'a>(fields: &'a [&'a str]) -> anyhow::Result<(u16, u64, &'a [&'a str])> {
    let Some(first) = fields.first() else {
        bail!("empty name");
    };
    if first.len() == 4 {
        let format = u16::from_str_radix(first, 16).context("bad format number")?;
        if format != 1 {
            bail!("unknown format {first}");
        }
        let monoseq = fields.get(1).context("no monoseq")?;
        let monoseq = u64::from_str_radix(monoseq, 16).context("bad monoseq")?;
        Ok((1, monoseq, &fields[2..]))
    } else {
        let epoch = u64::from_str_radix(first, 16).context("bad epoch")?;
        let tsn = fields.get(1).context("no tsn")?;
        let tsn = u64::from_str_radix(tsn, 16).context("bad tsn")?;
        if epoch >= u32::MAX as u64 || tsn >= u32::MAX as u64 {
            bail!("epoch or tsn out of range");
        }
        Ok((0, (epoch << 32) | tsn, &fields[2..]))
    }
}

/// The `differential` object's text: 20 hex characters of a 10-byte versionstamp.
pub fn differential_text(version: u64) -> String {
    format!("{version:016x}0000")
}

/// Parses the `differential` object (either case, exactly 20 hex characters).
pub fn parse_differential(body: &[u8]) -> anyhow::Result<[u8; 10]> {
    let text = std::str::from_utf8(body).context("the differential object is not text")?;
    if text.len() != 20 {
        bail!("the differential object is not 20 hex characters: {text:?}");
    }
    parse_hex(text).context("the differential object is not hex")
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exactly `N` bytes of hex, either case.
pub fn parse_hex<const N: usize>(text: &str) -> anyhow::Result<[u8; N]> {
    if text.len() != 2 * N || !text.is_ascii() {
        bail!("expected {} hex characters, got {text:?}", 2 * N);
    }
    let mut out = [0u8; N];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
            .with_context(|| format!("not hex: {text:?}"))?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_names_are_format_1_and_sort_in_commit_order() {
        let a = LogName::for_commits(versionstamp12(9, 0), versionstamp12(15, 0xffff));
        let b = LogName::for_commits(versionstamp12(16, 0xffff), versionstamp12(16, 0xffff));
        let c = LogName::for_commits(
            versionstamp12(0x1_0000_0000, 0),
            versionstamp12(0x1_0000_0000, 0xffff),
        );
        assert_eq!(
            a.key(),
            "logs/0001_0000000000000009_000000000000000900000000_000000000000000f0000ffff.bin"
        );
        assert!(a.key() < b.key() && b.key() < c.key());
        for n in [a, b, c] {
            assert_eq!(LogName::parse(&n.key()).unwrap(), n);
        }
        assert!(
            LogName::monoseq_prefix(9)
                < LogName::for_commits(versionstamp12(9, 0), versionstamp12(9, 0xffff)).key()
        );
    }

    #[test]
    fn names_of_format_0_and_either_case_parse() {
        let n = LogName::parse(
            "logs/0000000000000002_0000000000000003_000000000000000900000000_00000000000000090000FFFF.bin",
        )
        .unwrap();
        assert_eq!((n.format, n.monoseq), (0, (2 << 32) | 3));
        assert_eq!(n.last, versionstamp12(9, 0xffff));
        let s =
            SnapshotName::parse("snapshots/0001_00000000000000aa_0000000000000003.bin").unwrap();
        assert_eq!((s.format, s.monoseq, s.seq), (1, 0xaa, 3));
        assert_eq!(SnapshotName::parse(&s.key()).unwrap(), s);
    }

    #[test]
    fn bad_names_are_refused() {
        for key in [
            "logs/0002_0000000000000001_000000000000000900000000_00000000000000090000ffff.bin",
            "logs/0001_0000000000000001_000000000000000900000000.bin",
            "logs/0001_0000000000000001_0000000000000009000000_00000000000000090000ffff.bin",
            "logs/0001_0000000000000001_000000000000000900000000_00000000000000090000ffff_00.bin",
            "logs/0001_xyz_000000000000000900000000_00000000000000090000ffff.bin",
            "snapshots/0001_0000000000000001_0000000000000001.bin",
        ] {
            assert!(LogName::parse(key).is_err(), "{key}");
        }
        assert!(SnapshotName::parse("snapshots/0001_01.bin").is_err());
        assert!(SnapshotName::parse(
            "snapshots/00000000ffffffff_0000000000000000_0000000000000001.bin"
        )
        .is_err());
    }

    #[test]
    fn the_differential_is_20_hex_characters() {
        assert_eq!(differential_text(2), "00000000000000020000");
        assert_eq!(
            version_of(&parse_differential(b"00000000000000020000").unwrap()),
            2
        );
        assert_eq!(
            version_of(&parse_differential(b"00000000000000FF0000").unwrap()),
            255
        );
        assert!(parse_differential(b"00000000000000020000\n").is_err());
        assert!(parse_differential(b"0000000000000002").is_err());
    }
}
