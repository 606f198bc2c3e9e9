//! `denokv --sqlite-path P pitr sync | list | info | checkout` (SPEC §8.5, §9.3): the
//! point-in-time tools on a replica file, with upstream's texts and formats.
//!
//! One change from upstream (SPEC §10 D16): `pitr sync` only fetches, as its help says; it
//! never moves the replica's point, so a `pitr checkout` made before stays. Points older than
//! the oldest one the undo log reaches are refused (D17).

use std::io::Write;
use std::path::Path;
use std::sync::atomic::AtomicBool;

use anyhow::{bail, Context};

use super::Follower;
use crate::backup::names;
use crate::backup::s3::Location;
use crate::store::replica::ReplicaDb;

/// `pitr sync`: binds the file to the bucket (first time), takes the initial snapshot if
/// needed, then fetches the new log objects. Prints nothing on stdout.
pub fn sync(path: &Path, location: Location) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start a runtime")?;
    runtime.block_on(async {
        let mut follower = Follower::open(path, location, None).await?;
        follower
            .initial_snapshot(&AtomicBool::new(false))
            .await
            .context("Failed to sync from S3")?;
        let synced = follower.sync().await.context("Failed to sync from S3")?;
        tracing::info!(
            "Fetched {} log objects ({} entries); the snapshot stays at {}",
            synced.objects,
            synced.entries,
            follower
                .db
                .current()?
                .map(|c| names::hex(&c[..10]))
                .unwrap_or_default()
        );
        Ok(())
    })
}

/// `pitr list [--start T] [--end T]`: the recoverable points with `start ≤ time < end`,
/// newest first: `<20 hex>\t<RFC 3339 UTC, ms>`.
pub fn list(path: &Path, start: Option<String>, end: Option<String>) -> anyhow::Result<()> {
    let start_ms = match &start {
        None => 0,
        Some(s) => parse_rfc3339_ms(s).with_context(|| format!("invalid start time {start:?}"))?,
    };
    let end_ms = match &end {
        None => i64::MAX,
        Some(s) => parse_rfc3339_ms(s).with_context(|| format!("invalid end time {end:?}"))?,
    };
    let db = open_existing(path)?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for p in db.points(start_ms, end_ms)? {
        let line = format!(
            "{}\t{}",
            names::hex(&p.versionstamp12[..10]),
            format_rfc3339_ms(p.timestamp_ms)
        );
        // A closed stdout (`| head`) ends the listing quietly.
        if writeln!(out, "{line}").is_err() {
            return Ok(());
        }
    }
    let _ = out.flush();
    Ok(())
}

/// `pitr info`: `Current versionstamp: <20 hex>`.
pub fn info(path: &Path) -> anyhow::Result<()> {
    let db = open_existing(path)?;
    let Some(current) = db.current()? else {
        bail!("the replica has no snapshot yet: run `pitr sync` first");
    };
    println!("Current versionstamp: {}", names::hex(&current[..10]));
    Ok(())
}

/// `pitr checkout <VS>`: moves the replica to that point.
pub fn checkout(path: &Path, versionstamp: &str) -> anyhow::Result<()> {
    let target: [u8; 10] = match names::parse_hex(versionstamp) {
        Ok(t) => t,
        Err(_) => bail!("invalid versionstamp {versionstamp}"),
    };
    let mut db = open_existing(path)?;
    let c = db.checkout(&target)?;
    println!(
        "Snapshot is now at versionstamp {}",
        names::hex(&c.current[..10])
    );
    Ok(())
}

fn open_existing(path: &Path) -> anyhow::Result<ReplicaDb> {
    if !path.exists() {
        bail!(
            "{} does not exist: make a replica with `pitr sync` (or serve --sync-from-s3) first",
            path.display()
        );
    }
    ReplicaDb::open(path)
}

/// `2026-11-28T21:52:11.502Z`.
pub fn format_rfc3339_ms(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Parses an RFC 3339 time (`2021-01-01T00:00:00Z`, fractions and `±hh:mm` offsets too)
/// into unix milliseconds.
pub fn parse_rfc3339_ms(s: &str) -> anyhow::Result<i64> {
    let b = s.as_bytes();
    let num = |from: usize, len: usize| -> anyhow::Result<i64> {
        let part = s.get(from..from + len).context("too short")?;
        if !part.bytes().all(|c| c.is_ascii_digit()) {
            bail!("not a number: {part:?}");
        }
        Ok(part.parse()?)
    };
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        bail!("expected a time like 2021-01-01T00:00:00Z");
    }
    let (y, mo, d, h, mi, sec) = (
        num(0, 4)?,
        num(5, 2)?,
        num(8, 2)?,
        num(11, 2)?,
        num(14, 2)?,
        num(17, 2)?,
    );
    if !(1..=12).contains(&mo) || d < 1 || d > days_in_month(y, mo) || h > 23 || mi > 59 || sec > 60
    {
        bail!("no such date or time");
    }
    let mut i = 19;
    let mut millis = 0i64;
    if b.get(i) == Some(&b'.') {
        i += 1;
        let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
        if digits == 0 {
            bail!("no digits after the decimal point");
        }
        let frac = &s[i..i + digits];
        millis = format!("{:0<3}", &frac[..digits.min(3)]).parse()?;
        i += digits;
    }
    let offset_s = match &s[i..] {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let (oh, om) = (num(i + 1, 2)?, num(i + 4, 2)?);
            if oh > 23 || om > 59 {
                bail!("bad offset {o}");
            }
            let sign = if o.starts_with('-') { -1 } else { 1 };
            sign * (oh * 3600 + om * 60)
        }
        o => bail!("bad time zone {o:?} (give Z or +hh:mm)"),
    };
    let days = days_from_civil(y, mo, d);
    let secs = days * 86_400 + h * 3600 + mi * 60 + sec - offset_s;
    Ok(secs * 1000 + millis)
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_and_parse_as_rfc3339() {
        assert_eq!(format_rfc3339_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            format_rfc3339_ms(1_795_902_731_502),
            "2026-11-28T21:52:11.502Z"
        );
        assert_eq!(
            format_rfc3339_ms(951_782_400_007),
            "2000-02-29T00:00:00.007Z"
        );
        for ms in [0, 1_795_902_731_502, 951_782_400_007, 4_102_444_799_999] {
            assert_eq!(parse_rfc3339_ms(&format_rfc3339_ms(ms)).unwrap(), ms);
        }
        assert_eq!(
            parse_rfc3339_ms("2021-01-01T00:00:00Z").unwrap(),
            1_609_459_200_000
        );
        assert_eq!(
            parse_rfc3339_ms("2021-01-01T01:30:00.5+01:30").unwrap(),
            1_609_459_200_500
        );
        assert_eq!(
            parse_rfc3339_ms("2020-12-31T23:00:00-01:00").unwrap(),
            1_609_459_200_000
        );
        for bad in [
            "yesterday",
            "2021-01-01",
            "2021-01-01T00:00:00",
            "2021-02-30T00:00:00Z",
            "2021-01-01T24:00:00Z",
            "2021-01-01T00:00:00.Z",
            "2021-01-01T00:00:00+1:00",
        ] {
            assert!(parse_rfc3339_ms(bad).is_err(), "{bad}");
        }
    }
}
