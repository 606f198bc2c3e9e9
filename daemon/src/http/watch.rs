//! Watch streams (SPEC §2.7): length-prefixed `WatchOutput` frames and keep-alive pings.

use std::rc::Rc;
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use http::{header, Response};
use prost::Message;

use super::body::ChannelBody;
use super::error::ApiError;
use super::{entry_to_pb, CoreContext};
use crate::kv::versionstamp::Versionstamp;
use crate::kv::{now_ms, validate};
use crate::metrics::GaugeGuard;
use crate::proto as pb;

const PING_INTERVAL: Duration = Duration::from_secs(5);
const PING: Bytes = Bytes::from_static(&[0, 0, 0, 0]);

/// Validates the request and starts the stream on this core.
pub fn start(req: pb::Watch, ctx: &Rc<CoreContext>) -> Result<Response<super::Body>, ApiError> {
    let keys = validate::watch(req)?;
    // Subscribe before the first read so that no commit in between is missed.
    let subscription = ctx.shared.watches.subscribe(&keys);
    let (tx, rx) = tokio::sync::mpsc::channel(2);
    let mut seen = vec![None; keys.len()];
    let first = frame(ctx, &keys, &mut seen, true)?.expect("the first frame is always built");
    let open = GaugeGuard::new(&ctx.shared.metrics.watch_streams);
    monoio::spawn(stream(
        ctx.clone(),
        keys,
        seen,
        subscription,
        tx,
        first,
        open,
    ));
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(http_body_util::BodyExt::boxed_unsync(ChannelBody::new(rx)))
        .expect("static response parts are valid"))
}

async fn stream(
    ctx: Rc<CoreContext>,
    keys: Vec<Bytes>,
    mut seen: Vec<Option<Versionstamp>>,
    subscription: crate::store::watch::Subscription,
    tx: tokio::sync::mpsc::Sender<Bytes>,
    first: Bytes,
    // Counts this stream in `denokv_watch_streams` until the task ends.
    _open: GaugeGuard,
) {
    let mut shutdown = ctx.shutdown.clone();
    if tx.send(PING).await.is_err() || tx.send(first).await.is_err() {
        return;
    }
    loop {
        monoio::select! {
            _ = subscription.changed() => {}
            _ = monoio::time::sleep(PING_INTERVAL) => {
                if tx.send(PING).await.is_err() { return; }
                continue;
            }
            _ = tx.closed() => return,
            _ = shutdown.wait_for(|stopping| *stopping) => return,
        }
        match frame(&ctx, &keys, &mut seen, false) {
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

/// Reads the keys and builds a frame; `None` when no key's versionstamp changed since the
/// last frame (and this is not the first).
///
/// Every key is sent with `changed=true` and its current entry, as upstream does: Deno 2.x
/// turns a `changed=false` key into `null`, as if it had been deleted, so the protocol's
/// "unchanged" marker cannot be used with real Deno clients.
fn frame(
    ctx: &CoreContext,
    keys: &[Bytes],
    seen: &mut [Option<Versionstamp>],
    first: bool,
) -> Result<Option<Bytes>, ApiError> {
    let entries = ctx.reader.borrow_mut().read_keys(keys, now_ms())?;
    let mut any_changed = first;
    let mut outputs = Vec::with_capacity(keys.len());
    for (entry, seen) in entries.into_iter().zip(seen.iter_mut()) {
        let stamp = entry.as_ref().map(|e| e.versionstamp);
        any_changed |= stamp != *seen;
        *seen = stamp;
        outputs.push(pb::WatchKeyOutput {
            changed: true,
            entry_if_changed: entry.map(entry_to_pb),
        });
    }
    if !any_changed {
        return Ok(None);
    }
    let msg = pb::WatchOutput {
        status: pb::SnapshotReadStatus::SrSuccess as i32,
        keys: outputs,
    };
    let mut buf = BytesMut::with_capacity(4 + msg.encoded_len());
    buf.put_u32_le(msg.encoded_len() as u32);
    msg.encode(&mut buf).expect("buffer has room");
    Ok(Some(buf.freeze()))
}
