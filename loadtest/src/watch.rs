//! The `watch` workload: `--watchers` watch streams on the same few keys and one writer.
//!
//! Measured: the time from the writer receiving a commit's acknowledgement to each watcher
//! receiving the first frame that reflects that commit. Every data frame carries every
//! watched key (SPEC §2.7, and this server always sends `changed=true`), so the newest
//! versionstamp among a frame's entries names the latest commit the frame reflects. Times are
//! only collected while the load runs and matched afterwards, so neither side waits for the
//! other.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use denokv::proto::{self, AtomicWrite, WatchOutput};
use http_body_util::BodyExt;
use prost::Message;
use rand::Rng;

use crate::cli::RunArgs;
use crate::client::{self, CallError, Conn, Written};
use crate::data;
use crate::report::Report;
use crate::run::{self, Window};
use crate::stats::Stats;
use crate::workload::{CheckResult, Plan};

/// One request may watch at most 10 keys (SPEC §3).
const MAX_WATCHED: u64 = 10;
/// How long watchers may take to catch up with the last write once the writer stopped.
const CATCH_UP: Duration = Duration::from_secs(5);
/// Pause before a watch stream that failed is opened again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(100);

/// What one watcher saw.
#[derive(Default)]
struct Seen {
    /// (newest versionstamp reflected, arrival), one per data frame, in arrival order.
    frames: Vec<(u128, Instant)>,
    pings: u64,
    unchanged_keys: u64,
    stats: Stats,
}

/// Shared between the watchers and the driver while the load runs.
struct Progress {
    /// Watchers that received their first data frame.
    ready: AtomicUsize,
    /// Per watcher: the newest versionstamp it has seen.
    newest: Vec<Mutex<u128>>,
}

/// `conns[0]` serves the writer, the rest one watcher each.
pub async fn run(plan: &Arc<Plan>, args: &RunArgs, mut conns: Vec<Conn>) -> anyhow::Result<Report> {
    let n_keys = plan.hot_keys.min(MAX_WATCHED);
    let keys: Vec<Bytes> = (0..n_keys)
        .map(|i| data::run_key("watch", plan.run_id, i))
        .collect();
    let request = Bytes::from(
        proto::Watch {
            keys: keys
                .iter()
                .map(|k| proto::WatchKey { key: k.clone() })
                .collect(),
        }
        .encode_to_vec(),
    );
    let watchers = conns.len() - 1;
    let progress = Arc::new(Progress {
        ready: AtomicUsize::new(0),
        newest: (0..watchers).map(|_| Mutex::new(0)).collect(),
    });
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    let writer_conn = conns.remove(0);
    let mut tasks = Vec::new();
    for (w, conn) in conns.into_iter().enumerate() {
        let (plan, progress, request, stop) = (
            plan.clone(),
            progress.clone(),
            request.clone(),
            stop_rx.clone(),
        );
        tasks.push(tokio::spawn(async move {
            watcher(&plan, conn, request, n_keys as usize, w, &progress, stop).await
        }));
    }

    // Measure only once every stream is open and has sent its first frame.
    let deadline = Instant::now() + args.client.timeout;
    while progress.ready.load(Ordering::Relaxed) < watchers {
        if Instant::now() > deadline {
            let _ = stop_tx.send(true);
            anyhow::bail!(
                "only {} of {watchers} watch streams delivered their first frame within {:?}",
                progress.ready.load(Ordering::Relaxed),
                args.client.timeout
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let window = Window::starting_now(args.warmup, args.duration);
    let usage = args
        .server_pid
        .map(|pid| crate::server::sample_both(pid, window));
    let (mut stats, acks) = writer(plan, writer_conn, &keys, window, args).await;

    // Let the watchers catch up with the last acknowledged write, then close the streams.
    if let Some(&(last, _)) = acks.last() {
        let until = Instant::now() + CATCH_UP;
        while Instant::now() < until && progress.newest.iter().any(|n| *n.lock().unwrap() < last) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let _ = stop_tx.send(true);

    let measured: Vec<(u128, Instant)> = acks
        .iter()
        .copied()
        .filter(|&(_, at)| window.contains(at))
        .collect();
    let mut missed = 0;
    let mut frames = 0;
    for task in tasks {
        let seen = task.await.expect("a watcher panicked");
        frames += seen.frames.len() as u64;
        missed += match_frames(&seen.frames, &measured, &mut stats);
        stats.count("watch pings", seen.pings);
        stats.count("watch keys sent unchanged", seen.unchanged_keys);
        stats.merge(seen.stats);
    }
    stats.count("watch data frames", frames);
    if missed > 0 {
        *stats
            .errors
            .entry("watch: acknowledged write never delivered".into())
            .or_default() += missed;
    }

    let clients = (watchers + 1) as u32;
    let mut report = Report::new(
        "watch",
        args,
        run::connection_count(&args.client, clients),
        stats,
        &["notify"],
    );
    report.concurrency = clients;
    let (server, client) = crate::server::finish(usage).await;
    report.set_usage(server, client);
    let delivered = report.latency_ms.get("notify").map_or(0, |l| l.count);
    report.add_check(CheckResult {
        name: "every watcher saw every acknowledged write".into(),
        passed: missed == 0 && delivered > 0,
        summary: format!(
            "{watchers} watchers x {} measured writes: {delivered} delivered, {missed} missing",
            measured.len()
        ),
        problems: Vec::new(),
    });
    Ok(report)
}

/// The single writer: sets the watched keys in turn as fast as acknowledged (or paced by
/// --write-interval). Returns the acknowledgements as (versionstamp, arrival).
async fn writer(
    plan: &Plan,
    mut conn: Conn,
    keys: &[Bytes],
    window: Window,
    args: &RunArgs,
) -> (Stats, Vec<(u128, Instant)>) {
    let mut stats = Stats::default();
    let mut acks = Vec::new();
    let mut rng = run::client_rng(args.seed, 0);
    let mut seq = 0usize;
    while Instant::now() < window.to {
        let key = keys[seq % keys.len()].clone();
        seq += 1;
        let value = data::value_for(rng.random(), plan.value_size as usize);
        let write = AtomicWrite {
            mutations: vec![client::set_bytes(key, value)],
            ..Default::default()
        };
        let started = Instant::now();
        let result = client::atomic_write(&mut conn, &plan.ep, &write).await;
        let ended = Instant::now();
        match result {
            Ok(Written::Committed(vs)) => {
                acks.push((vs, ended));
                if window.contains(ended) {
                    stats.record("write", ended - started);
                }
            }
            Ok(Written::CheckFailed) => {
                stats.error_label("protocol: check failure without checks".into())
            }
            Err(e) => {
                if window.contains(ended) {
                    stats.error(&e);
                }
                if e.is_transport() {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
        if !args.write_interval.is_zero() {
            tokio::time::sleep(args.write_interval).await;
        }
    }
    (stats, acks)
}

/// For each measured write, finds the first frame that reflects it and records the delay
/// from the acknowledgement. Returns how many writes no frame reflected.
fn match_frames(frames: &[(u128, Instant)], writes: &[(u128, Instant)], stats: &mut Stats) -> u64 {
    let mut missed = 0;
    let mut newest = 0u128;
    let mut j = 0;
    for &(vs, acked) in writes {
        // Frames only move forward in practice; the running maximum keeps this right even
        // if a reconnected stream repeats an older state.
        while j < frames.len() && newest.max(frames[j].0) < vs {
            newest = newest.max(frames[j].0);
            j += 1;
        }
        let Some(&(_, arrived)) = frames.get(j) else {
            missed += 1;
            continue;
        };
        if arrived < acked {
            // The server wakes watchers as it answers the writer; either may come first.
            stats.count("frames before the write's ack", 1);
        }
        stats.record("notify", arrived.saturating_duration_since(acked));
    }
    missed
}

/// One watch stream, reopened after failures, until `stop`.
async fn watcher(
    plan: &Plan,
    mut conn: Conn,
    request: Bytes,
    n_keys: usize,
    me: usize,
    progress: &Progress,
    mut stop: tokio::sync::watch::Receiver<bool>,
) -> Seen {
    let mut seen = Seen::default();
    let mut ready = false;
    // The entry versionstamp of each watched key as of the last frame (None: absent).
    let mut current: Vec<Option<u128>> = vec![None; n_keys];
    'streams: while !*stop.borrow() {
        let sent = tokio::select! {
            r = conn.send(plan.ep.request("watch", request.clone())) => r,
            _ = stop.changed() => break,
        };
        let mut body = match sent {
            Ok(resp) if resp.status() == 200 => resp.into_body(),
            Ok(resp) => {
                let status = resp.status().as_u16();
                let text = resp
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let line = String::from_utf8_lossy(&text)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .to_string();
                seen.stats.error(&CallError::Http { status, line });
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
            Err(e) => {
                seen.stats.error(&e);
                tokio::time::sleep(RECONNECT_PAUSE).await;
                continue;
            }
        };
        let mut buf = BytesMut::new();
        loop {
            let frame = tokio::select! {
                f = body.frame() => f,
                _ = stop.changed() => break 'streams,
            };
            let chunk = match frame {
                Some(Ok(f)) => match f.into_data() {
                    Ok(d) => d,
                    Err(_) => continue, // trailers: nothing to read
                },
                Some(Err(e)) => {
                    seen.stats
                        .error_label(format!("transport: watch stream broke: {e}"));
                    break;
                }
                None => {
                    seen.stats.error_label("watch: stream ended".into());
                    break;
                }
            };
            buf.extend_from_slice(&chunk);
            let arrived = Instant::now();
            if let Err(e) = read_frames(&mut buf, &mut current, arrived, &mut seen) {
                seen.stats.error_label(format!("protocol: {e}"));
                break;
            }
            if let Some(&(newest, _)) = seen.frames.last() {
                let mut n = progress.newest[me].lock().unwrap();
                *n = (*n).max(newest);
            }
            if !ready && !seen.frames.is_empty() {
                ready = true;
                progress.ready.fetch_add(1, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(RECONNECT_PAUSE).await;
    }
    seen
}

/// Takes every complete frame off `buf` (SPEC §2.7.1: u32 LE length, then a `WatchOutput`;
/// length 0 is a ping).
fn read_frames(
    buf: &mut BytesMut,
    current: &mut [Option<u128>],
    arrived: Instant,
    seen: &mut Seen,
) -> Result<(), String> {
    while buf.len() >= 4 {
        let len = u32::from_le_bytes(buf[..4].try_into().unwrap()) as usize;
        if buf.len() < 4 + len {
            break;
        }
        buf.advance(4);
        let payload = buf.split_to(len).freeze();
        if len == 0 {
            seen.pings += 1;
            continue;
        }
        let out =
            WatchOutput::decode(payload).map_err(|e| format!("undecodable watch frame: {e}"))?;
        if out.status != proto::SnapshotReadStatus::SrSuccess as i32 {
            return Err(format!("watch frame status {}", out.status));
        }
        if out.keys.len() != current.len() {
            return Err(format!(
                "watch frame with {} keys for {} watched",
                out.keys.len(),
                current.len()
            ));
        }
        for (slot, k) in current.iter_mut().zip(out.keys) {
            if k.changed {
                *slot = match k.entry_if_changed {
                    Some(e) => Some(
                        data::versionstamp(&e.versionstamp)
                            .ok_or("watch entry without a 10-byte versionstamp")?,
                    ),
                    None => None,
                };
            } else {
                seen.unchanged_keys += 1;
            }
        }
        let newest = current.iter().flatten().copied().max().unwrap_or(0);
        seen.frames.push((newest, arrived));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(out: &WatchOutput) -> Vec<u8> {
        let body = out.encode_to_vec();
        let mut f = (body.len() as u32).to_le_bytes().to_vec();
        f.extend(body);
        f
    }

    fn entry(vs: u8) -> proto::WatchKeyOutput {
        proto::WatchKeyOutput {
            changed: true,
            entry_if_changed: Some(proto::KvEntry {
                key: Bytes::from_static(b"k"),
                value: Bytes::new(),
                encoding: 3,
                versionstamp: Bytes::from(vec![0, 0, 0, 0, 0, 0, 0, vs, 0, 0]),
            }),
        }
    }

    #[test]
    fn frames_split_anywhere_are_read_whole() {
        let ok = proto::SnapshotReadStatus::SrSuccess as i32;
        let mut wire = vec![0, 0, 0, 0]; // a ping
        wire.extend(frame(&WatchOutput {
            status: ok,
            // The second key is absent: changed, no entry.
            keys: vec![
                entry(1),
                proto::WatchKeyOutput {
                    changed: true,
                    entry_if_changed: None,
                },
            ],
        }));
        wire.extend(frame(&WatchOutput {
            status: ok,
            keys: vec![
                proto::WatchKeyOutput {
                    changed: false,
                    entry_if_changed: None,
                },
                entry(5),
            ],
        }));
        let mut seen = Seen::default();
        let mut current = vec![None; 2];
        let mut buf = BytesMut::new();
        let now = Instant::now();
        for piece in wire.chunks(3) {
            buf.extend_from_slice(piece);
            read_frames(&mut buf, &mut current, now, &mut seen).unwrap();
        }
        assert!(buf.is_empty());
        assert_eq!(seen.pings, 1);
        assert_eq!(seen.unchanged_keys, 1);
        let newest: Vec<u128> = seen.frames.iter().map(|f| f.0).collect();
        assert_eq!(newest, vec![1 << 16, 5 << 16]);
    }

    #[test]
    fn each_write_is_matched_to_the_first_frame_reflecting_it() {
        let t = Instant::now();
        let at = |ms: u64| t + Duration::from_millis(ms);
        let frames = vec![(10, at(5)), (30, at(20)), (40, at(45))];
        let writes = vec![(10, at(4)), (20, at(10)), (30, at(21)), (50, at(50))];
        let mut stats = Stats::default();
        let missed = match_frames(&frames, &writes, &mut stats);
        assert_eq!(missed, 1, "nothing reflects versionstamp 50");
        let h = &stats.latency["notify"];
        assert_eq!(h.len(), 3);
        assert_eq!(stats.counters["frames before the write's ack"], 1);
        assert!(
            h.max() >= 9_000 && h.max() <= 10_100,
            "20 acked at 10 ms, seen at 20 ms"
        );
    }
}
