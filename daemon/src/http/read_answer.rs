//! Snapshot read answers: encoded entry by entry while they are sent, within a server-wide
//! budget of answer bytes held in memory (`--max-read-buffer-mb`).
//!
//! A read of 1000 values of 64 KiB is a 66 MB answer. Built as one buffer (as before), it
//! took twice that while encoding, and 16 such reads at once held over a GiB. Here the entries
//! read are encoded into chunks of at most `CHUNK` bytes as hyper asks for them, each entry
//! dropped once encoded; the bytes are those `prost` would encode (tested), so clients see
//! no difference. Every read first reserves its worst case in the budget (waiting, in order of
//! arrival, while the budget is spent), keeps what its answer really holds once read, and gives
//! that back as the answer is sent. A client that stops reading its answer for `STALL` has it
//! cut off (h2: the stream is reset; HTTP/1.1: the connection is closed), so that it cannot
//! hold the budget for ever.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use hyper::body::{Frame, SizeHint};
use prost::Message;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::body::{full, Body, BodyError};
use super::entry_to_pb;
use crate::kv::limits::{MAX_VALUE_BYTES, MAX_WRITE_KEY_BYTES};
use crate::kv::model::{Entry, ReadRange};
use crate::metrics::Metrics;
use crate::proto as pb;

/// Largest chunk handed to hyper at once.
const CHUNK: usize = 256 * 1024;
/// Answers up to this size are sent as one buffer, and do not hold the budget while sent.
const SMALL: usize = 64 * 1024;
/// How long an answer may wait for its client to take the next chunk.
pub const STALL: Duration = Duration::from_secs(30);
/// The most one entry can take encoded: a key, a value, the encoding, a versionstamp, and
/// the tags and lengths of the entry and its fields.
const MAX_ENTRY: usize = MAX_WRITE_KEY_BYTES + MAX_VALUE_BYTES + 32;

/// Bytes of answers held at once on the whole server, in KiB permits.
pub struct ReadBudget {
    permits: Arc<Semaphore>,
    kib: usize,
}

impl ReadBudget {
    pub fn new(mib: usize) -> ReadBudget {
        let kib = mib.saturating_mul(1024).min(Semaphore::MAX_PERMITS);
        ReadBudget {
            permits: Arc::new(Semaphore::new(kib)),
            kib,
        }
    }

    /// Waits for room for `bytes` (at most the whole budget, so that any read can run).
    pub async fn reserve(&self, bytes: usize, metrics: &Metrics) -> OwnedSemaphorePermit {
        let n = kib(bytes).min(self.kib).min(u32::MAX as usize) as u32;
        match self.permits.clone().try_acquire_many_owned(n) {
            Ok(permit) => permit,
            Err(_) => {
                metrics.read_budget_waits.inc();
                self.permits
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .expect("the semaphore is never closed")
            }
        }
    }

    /// KiB not reserved now.
    #[cfg(test)]
    fn available(&self) -> usize {
        self.permits.available_permits()
    }
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

/// The most a read of `ranges` can answer: the reservation made before reading.
pub fn worst_case(ranges: &[ReadRange]) -> usize {
    ranges
        .iter()
        .map(|r| 8 + r.limit as usize * MAX_ENTRY)
        .sum::<usize>()
        + 16
}

enum Piece {
    /// A `ReadRangeOutput`'s tag and length.
    Range(usize),
    Entry(pb::KvEntry),
    /// The fields after the ranges.
    Tail,
}

/// The answer to a read: sent as one buffer when small, else streamed.
pub fn answer(
    results: Vec<Vec<Entry>>,
    permit: OwnedSemaphorePermit,
    metrics: &Arc<Metrics>,
) -> Body {
    answer_within(results, permit, metrics, STALL)
}

fn answer_within(
    results: Vec<Vec<Entry>>,
    mut permit: OwnedSemaphorePermit,
    metrics: &Arc<Metrics>,
    stall: Duration,
) -> Body {
    let mut pieces = VecDeque::new();
    let mut total = 0;
    for entries in results {
        let entries: Vec<pb::KvEntry> = entries.into_iter().map(entry_to_pb).collect();
        let len: usize = entries
            .iter()
            .map(|e| prost::encoding::message::encoded_len(1, e))
            .sum();
        total += 1 + prost::encoding::encoded_len_varint(len as u64) + len;
        pieces.push_back(Piece::Range(len));
        pieces.extend(entries.into_iter().map(Piece::Entry));
    }
    let tail = tail().encode_to_vec();
    total += tail.len();
    pieces.push_back(Piece::Tail);
    let mut state = State {
        pieces,
        left: total,
        permit: None,
        last_poll: Instant::now(),
        stalled: false,
    };
    if total <= SMALL {
        drop(permit);
        return full(state.chunk(usize::MAX));
    }
    // Keep what the answer holds; give back the rest of the worst case.
    let keep = kib(total).min(permit.num_permits());
    if let Some(extra) = permit.split(permit.num_permits() - keep) {
        drop(extra);
    }
    state.permit = Some(permit);
    // A mutex only because hyper's boxed body must be `Send`: one core uses it.
    let state = Arc::new(Mutex::new(state));
    monoio::spawn(watch_stall(Arc::downgrade(&state), metrics.clone(), stall));
    http_body_util::BodyExt::boxed_unsync(Streamed {
        state,
        size: total as u64,
    })
}

fn tail() -> pb::SnapshotReadOutput {
    pb::SnapshotReadOutput {
        ranges: Vec::new(),
        read_disabled: false,
        read_is_strongly_consistent: true,
        status: pb::SnapshotReadStatus::SrSuccess as i32,
    }
}

struct State {
    pieces: VecDeque<Piece>,
    /// Bytes not yet handed to hyper.
    left: usize,
    permit: Option<OwnedSemaphorePermit>,
    last_poll: Instant,
    stalled: bool,
}

impl State {
    /// Encodes the next pieces, up to about `max` bytes, and gives back the budget they held.
    fn chunk(&mut self, max: usize) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.left.min(max.saturating_add(MAX_ENTRY)));
        while buf.len() < max {
            let Some(piece) = self.pieces.pop_front() else {
                break;
            };
            match piece {
                Piece::Range(len) => {
                    buf.put_u8(0x0a);
                    prost::encoding::encode_varint(len as u64, &mut buf);
                }
                Piece::Entry(e) => prost::encoding::message::encode(1, &e, &mut buf),
                Piece::Tail => tail().encode(&mut buf).expect("the buffer grows"),
            }
        }
        self.left -= buf.len();
        if let Some(permit) = &mut self.permit {
            let keep = kib(self.left);
            if permit.num_permits() > keep {
                drop(permit.split(permit.num_permits() - keep));
            }
        }
        buf.freeze()
    }
}

/// Cuts off an answer whose client took no chunk for `stall`: its entries and its budget are
/// let go at once, and its next poll (if any) is an error.
async fn watch_stall(state: Weak<Mutex<State>>, metrics: Arc<Metrics>, stall: Duration) {
    loop {
        let due = match state.upgrade() {
            Some(s) if !lock(&s).pieces.is_empty() => lock(&s).last_poll + stall,
            _ => return,
        };
        monoio::time::sleep(due.saturating_duration_since(Instant::now())).await;
        let Some(s) = state.upgrade() else {
            return;
        };
        let mut s = lock(&s);
        if s.pieces.is_empty() {
            return;
        }
        if s.last_poll + stall <= Instant::now() {
            tracing::debug!(
                "a snapshot read's client took nothing of its answer for {stall:?}: cut off \
                 with {} bytes unsent",
                s.left
            );
            metrics.responses_stalled.inc();
            s.stalled = true;
            s.pieces.clear();
            s.permit = None;
            return;
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// A streamed answer.
struct Streamed {
    state: Arc<Mutex<State>>,
    size: u64,
}

impl hyper::body::Body for Streamed {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let mut s = lock(&self.state);
        if s.stalled {
            return Poll::Ready(Some(Err(BodyError::Stalled)));
        }
        s.last_poll = Instant::now();
        if s.pieces.is_empty() {
            s.permit = None;
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(Frame::data(s.chunk(CHUNK)))))
    }

    fn is_end_stream(&self) -> bool {
        let s = lock(&self.state);
        s.pieces.is_empty() && !s.stalled
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kv::model::Entry;
    use crate::kv::value::{Encoding, Value};
    use crate::kv::versionstamp::Versionstamp;
    use hyper::body::Body as _;

    fn entry(i: usize, size: usize) -> Entry {
        Entry {
            key: Bytes::from(format!("key{i}")),
            value: Value {
                data: Bytes::from(vec![i as u8; size]),
                encoding: Encoding::Bytes,
            },
            versionstamp: Versionstamp([i as u8; 10]),
        }
    }

    fn prost_encoding(results: &[Vec<Entry>]) -> Vec<u8> {
        pb::SnapshotReadOutput {
            ranges: results
                .iter()
                .map(|entries| pb::ReadRangeOutput {
                    values: entries.iter().cloned().map(entry_to_pb).collect(),
                })
                .collect(),
            ..tail()
        }
        .encode_to_vec()
    }

    fn collect(body: Body) -> (Vec<u8>, usize) {
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async move {
            let mut body = body;
            let mut out = Vec::new();
            let mut frames = 0;
            while let Some(frame) =
                std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
            {
                let data = frame.unwrap().into_data().unwrap();
                assert!(data.len() <= CHUNK + MAX_ENTRY);
                out.extend_from_slice(&data);
                frames += 1;
            }
            (out, frames)
        })
    }

    #[test]
    fn streamed_answers_are_the_bytes_prost_encodes_and_give_back_their_budget() {
        let metrics = Arc::new(Metrics::new());
        let budget = ReadBudget::new(256);
        let shapes: [Vec<Vec<Entry>>; 4] = [
            vec![],
            vec![vec![]],
            vec![vec![entry(1, 10)], vec![], vec![entry(2, 0), entry(3, 5)]],
            vec![
                (0..300).map(|i| entry(i, 65536)).collect(),
                (0..3).map(|i| entry(i, 100)).collect(),
            ],
        ];
        for results in shapes {
            let expected = prost_encoding(&results);
            let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
                .enable_timer()
                .build()
                .unwrap();
            let permit = rt.block_on(budget.reserve(70 << 20, &metrics));
            let body = rt.block_on(async { answer(results, permit, &metrics) });
            if expected.len() > SMALL {
                // Reserved now: the answer's size, not the worst case.
                assert_eq!(budget.available(), 256 * 1024 - kib(expected.len()));
                assert_eq!(body.size_hint().exact(), Some(expected.len() as u64));
            }
            let (bytes, frames) = collect(body);
            assert_eq!(bytes, expected);
            if expected.len() > SMALL {
                assert!(frames > 1);
            }
            assert_eq!(budget.available(), 256 * 1024);
        }
    }

    #[test]
    fn an_answer_its_client_stops_taking_is_cut_off_and_gives_back_its_budget() {
        let metrics = Arc::new(Metrics::new());
        let budget = ReadBudget::new(64);
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        rt.block_on(async {
            let permit = budget.reserve(70 << 20, &metrics).await;
            let results = vec![(0..100).map(|i| entry(i, 65536)).collect()];
            let mut body = answer_within(results, permit, &metrics, Duration::from_millis(100));
            macro_rules! next {
                () => {
                    std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await
                };
            }
            assert!(next!().unwrap().is_ok());
            assert!(budget.available() < 64 * 1024);
            // Taken in time: goes on.
            monoio::time::sleep(Duration::from_millis(50)).await;
            assert!(next!().unwrap().is_ok());
            // Not taken for longer than the deadline: cut off, the budget back at once.
            monoio::time::sleep(Duration::from_millis(300)).await;
            assert_eq!(budget.available(), 64 * 1024);
            assert_eq!(metrics.responses_stalled.get(), 1);
            assert!(matches!(next!(), Some(Err(BodyError::Stalled))));
        });
    }

    #[test]
    fn a_reservation_is_at_most_the_whole_budget() {
        let metrics = Metrics::new();
        let budget = ReadBudget::new(1);
        let mut rt = monoio::RuntimeBuilder::<monoio::FusionDriver>::new()
            .enable_timer()
            .build()
            .unwrap();
        let permit = rt.block_on(budget.reserve(70 << 20, &metrics));
        assert_eq!(permit.num_permits(), 1024);
        assert_eq!(metrics.read_budget_waits.get(), 0);
    }
}
