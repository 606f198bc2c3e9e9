//! Watch streams (SPEC §2.7): length-prefixed `WatchOutput` frames and keep-alive pings.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Response};
use prost::Message;

use super::auth::Access;
use super::body::ChannelBody;
use super::error::ApiError;
use super::{entry_to_pb, CoreContext};
use crate::kv::versionstamp::Versionstamp;
use crate::kv::{now_ms, validate};
use crate::metrics::GaugeGuard;
use crate::proto as pb;
use crate::runtime::limits::WatchPermit;

const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING: Bytes = Bytes::from_static(&[0, 0, 0, 0]);

/// Validates the request and starts the stream on this core.
pub fn start(
    req: pb::Watch,
    ctx: &Rc<CoreContext>,
    access: Arc<Access>,
    permit: WatchPermit,
) -> Result<Response<super::Body>, ApiError> {
    let mut keys = validate::watch(req)?;
    access.check_keys(keys.iter().map(|k| &k[..]))?;
    // The stream lives long: let go of the request body the keys were decoded from.
    crate::kv::model::detach_all(keys.iter_mut());
    // Subscribe before the first read so that no commit in between is missed.
    let subscription = ctx.shared.watches.subscribe(&keys);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let mut seen = vec![None; keys.len()];
    let keys = KeySet::new(keys);
    let first = frame(ctx, &keys, &mut seen, true)?.expect("the first frame is always built");
    let open = GaugeGuard::new(&ctx.shared.metrics.watch_streams);
    monoio::spawn(stream(
        ctx.clone(),
        Watched { access, keys },
        seen,
        subscription,
        tx,
        first,
        (open, permit),
    ));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(http_body_util::BodyExt::boxed_unsync(ChannelBody::new(rx)))
        .expect("static response parts are valid"))
}

/// The keys of a stream, and the token that may read them.
struct Watched {
    access: Arc<Access>,
    keys: KeySet,
}

async fn stream(
    ctx: Rc<CoreContext>,
    watched: Watched,
    mut seen: Vec<Option<Versionstamp>>,
    subscription: crate::store::watch::Subscription,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    first: Bytes,
    // Counts this stream in `denokv_watch_streams` and against the watch caps until the task
    // ends.
    _open: (GaugeGuard, WatchPermit),
) {
    let Watched {
        mut access,
        keys: key_set,
    } = watched;
    let mut shutdown = ctx.shutdown.clone();
    // Subscribed first, then checked: a reload since the request was authenticated counts.
    let mut reloads = ctx.tokens.reloads();
    if !still_allowed(&ctx, &mut access, &key_set.keys) {
        return;
    }
    if tx.send(PING).await.is_err() || tx.send(first).await.is_err() {
        return;
    }
    // Made once, not at every wake-up: a stream woken by every commit would otherwise add and
    // remove a timer and three waiters each time. Pings go out every `PING_INTERVAL`, also
    // between frames.
    let mut ping = std::pin::pin!(monoio::time::sleep(PING_INTERVAL));
    let mut closed = std::pin::pin!(tx.closed());
    let mut stopping = std::pin::pin!(shutdown.wait_for(|stopping| *stopping));
    loop {
        let wake = monoio::select! {
            _ = subscription.changed() => Wake::Commit,
            _ = &mut ping => Wake::Ping,
            r = reloads.changed() => if r.is_ok() { Wake::Reload } else { return },
            _ = &mut closed => return,
            _ = &mut stopping => return,
        };
        if wake == Wake::Reload {
            if !still_allowed(&ctx, &mut access, &key_set.keys) {
                return;
            }
            continue;
        }
        if wake == Wake::Ping {
            ping.as_mut()
                .reset(monoio::time::Instant::now() + PING_INTERVAL);
            if tx.send(PING).await.is_err() {
                return;
            }
            continue;
        }
        match frame(&ctx, &key_set, &mut seen, false) {
            Ok(Some(bytes)) => {
                if tx.send(bytes).await.is_err() {
                    return;
                }
            }
            Ok(None) => {}
            Err(e) => {
                // Ending the stream makes the client reconnect and read again.
                tracing::warn!("watch read failed, closing the stream: {}", e.message);
                return;
            }
        }
    }
}

/// A stream's keys and their hash, computed once: streams woken together look their shared
/// read up by it (`WatchReads`).
struct KeySet {
    keys: Vec<Bytes>,
    hash: u64,
}

impl KeySet {
    fn new(keys: Vec<Bytes>) -> Self {
        use std::hash::{BuildHasher, RandomState};
        thread_local! {
            static HASHER: RandomState = RandomState::new();
        }
        let hash = HASHER.with(|h| h.hash_one(&keys));
        KeySet { keys, hash }
    }
}

/// Whether the stream's token is still in the current set and still covers every key (after
/// a reload); `access` becomes its current entry.
fn still_allowed(ctx: &CoreContext, access: &mut Arc<Access>, keys: &[Bytes]) -> bool {
    match ctx.tokens.current_entry(access) {
        Some(now) if keys.iter().all(|k| now.allows_key(k)) => {
            *access = now;
            true
        }
        _ => {
            tracing::debug!(
                "watch stream closed: its access token ({}) was removed or no longer covers \
                 its keys",
                access.name
            );
            false
        }
    }
}

#[derive(PartialEq, Eq)]
enum Wake {
    Commit,
    Ping,
    Reload,
}

/// One core's watch reads at the current count of changes (`WatchRegistry::changes`), by key
/// set: when a commit wakes many streams watching the same keys (a thousand browsers on one
/// document, say), the first one reads and encodes the frame, and the others reuse both.
#[derive(Default)]
pub struct WatchReads {
    /// The count of changes the reads below were made at.
    generation: u64,
    /// By `KeySet::hash`; streams whose different key sets share a hash read for themselves.
    by_keys: HashMap<u64, Rc<Snapshot>>,
}

/// The keys' versionstamps at one read, and the frame that carries their entries.
struct Snapshot {
    keys: Vec<Bytes>,
    stamps: Vec<Option<Versionstamp>>,
    frame: Bytes,
}

impl WatchReads {
    /// Most key sets kept for one generation (a bound on memory, not a limit on streams).
    const MAX_KEY_SETS: usize = 4096;

    fn read(&mut self, ctx: &CoreContext, key_set: &KeySet) -> Result<Rc<Snapshot>, ApiError> {
        // Read the count of changes before the database: the read then holds every commit
        // notified up to it, so any stream woken by those commits may use it.
        let generation = ctx.shared.watches.changes();
        if generation != self.generation {
            self.generation = generation;
            self.by_keys.clear();
        }
        if let Some(snapshot) = self.by_keys.get(&key_set.hash) {
            if snapshot.keys == key_set.keys {
                return Ok(snapshot.clone());
            }
        }
        let snapshot = Rc::new(read(ctx, &key_set.keys)?);
        if self.by_keys.len() < Self::MAX_KEY_SETS {
            self.by_keys
                .entry(key_set.hash)
                .or_insert_with(|| snapshot.clone());
        }
        Ok(snapshot)
    }
}

/// Reads the keys and encodes their frame.
///
/// Every key is sent with `changed=true` and its current entry, as upstream does: Deno 2.x
/// turns a `changed=false` key into `null`, as if it had been deleted, so the protocol's
/// "unchanged" marker cannot be used with real Deno clients.
fn read(ctx: &CoreContext, keys: &[Bytes]) -> Result<Snapshot, ApiError> {
    let entries = ctx.read(|reader| reader.read_keys(keys, now_ms()))?;
    let stamps = entries
        .iter()
        .map(|e| e.as_ref().map(|e| e.versionstamp))
        .collect();
    let msg = pb::WatchOutput {
        status: pb::SnapshotReadStatus::SrSuccess as i32,
        keys: entries
            .into_iter()
            .map(|entry| pb::WatchKeyOutput {
                changed: true,
                entry_if_changed: entry.map(entry_to_pb),
            })
            .collect(),
    };
    let mut buf = BytesMut::with_capacity(4 + msg.encoded_len());
    buf.put_u32_le(msg.encoded_len() as u32);
    msg.encode(&mut buf).expect("buffer has room");
    Ok(Snapshot {
        keys: keys.to_vec(),
        stamps,
        frame: buf.freeze(),
    })
}

/// The frame to send, if any: `None` when no key's versionstamp changed since the last frame
/// (and this is not the first).
fn frame(
    ctx: &CoreContext,
    key_set: &KeySet,
    seen: &mut [Option<Versionstamp>],
    first: bool,
) -> Result<Option<Bytes>, ApiError> {
    let snapshot = if first {
        // A new stream reads for itself: its subscription is newer than any shared read.
        Rc::new(read(ctx, &key_set.keys)?)
    } else {
        ctx.watch_reads.borrow_mut().read(ctx, key_set)?
    };
    let changed = first || snapshot.stamps.as_slice() != &*seen;
    seen.copy_from_slice(&snapshot.stamps);
    Ok(changed.then(|| snapshot.frame.clone()))
}
