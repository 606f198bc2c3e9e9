//! Cores share snapshot reads, so that one busy connection can use every core.
//!
//! A connection lives on the core that accepted it, and every Deno app sends all its requests
//! over one h2 connection: without help, one app keeps one core busy while the others idle.
//! Here a core that has reads waiting behind the one it is about to answer hands that request
//! to an idle core, which answers it as its own (token check, body, decoding, its own reader,
//! the encoded answer) and gives the response back; the connection's core only frames it.
//! Handing over just the SQLite step saved the connection's core too little: the hop cost
//! about as much as the read. Off by default (`--read-sharing`): it halves what the
//! connection's core spends per read but adds CPU in all, which pays only where other cores
//! idle (docs/PERFORMANCE.md, "Reading the results", read sharing).
//!
//! The policy:
//! - A read is answered on its own core when nothing else waits there (a lone client pays no
//!   hop), or when no other core is idle.
//! - Idle means no request of the core's own in flight and none for `IDLE_FOR`, so cores that
//!   each serve connections of their own (the many-connection case), even in bursts with gaps
//!   between them, keep thread-per-core: they do not trade reads. (Measured: with "none in
//!   flight" alone, two h2 connections, one per core, traded a quarter to three quarters of
//!   their reads in the gaps of their bursts, and lost throughput.)
//! - An idle core takes at most `SHARE` reads for each still waiting on the busy core (which
//!   also frames every answer), and `MAX_QUEUED` in all; past that the busy core answers
//!   itself, so that both cores stay busy. An idle core that took the whole burst left the
//!   connection's core waiting for it.
//! - Hand-overs and answers travel in batches, so that a burst costs a few wake-ups, not one a
//!   read: the reads handed over go in one message, sent when the core turns to a read of its
//!   own or after the burst; the answers come back `ANSWERS_BATCH` at a time, so that the
//!   connection's core frames the first while the rest are read.
//!
//! Consistency is unchanged: every read opens its own read transaction on whichever reader
//! answers it (`store::Reader`), after its request arrived, so it sees every write
//! acknowledged before. The read budget is the server's, shared by every core. A core that
//! stops takes no more reads and answers those it has before its runtime ends; a read that
//! reaches it too late is sent back unanswered and answered by its own core.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http::Response;
use prometheus::IntCounter;
use tokio::sync::oneshot;

use super::body::Body;
use super::error::ApiError;
use super::{CoreContext, Request};
use crate::runtime::limits::ConnWatches;

/// Most reads handed to one core and not yet answered.
const MAX_QUEUED: usize = 64;
/// An idle core takes up to this many reads for each one still waiting on the busy core,
/// which also frames every answer (measured: 2 balanced the cores best).
const SHARE: usize = 2;
/// Answers sent back in a batch of this many, so that the connection's core frames them while
/// the rest are read.
const ANSWERS_BATCH: usize = 8;

/// A core is idle when its own connections brought no request for this long: cores that each
/// serve connections of their own, even in bursts, do not trade reads.
const IDLE_FOR: Duration = Duration::from_millis(10);

/// What a core that took a read sends back: the response, or the request it could not take.
type Reply = Result<Response<Body>, Request>;

/// A read handed to another core. Dropped unanswered (its core stopped), it goes back.
pub struct Job {
    req: Option<Request>,
    reply: Option<oneshot::Sender<Reply>>,
    /// The core that handed it over, where the answer goes.
    from: usize,
}

impl Drop for Job {
    fn drop(&mut self) {
        if let (Some(req), Some(reply)) = (self.req.take(), self.reply.take()) {
            let _ = reply.send(Err(req));
        }
    }
}

/// What one core sends another.
enum Message {
    Reads(Vec<Job>),
    Answers(Vec<(oneshot::Sender<Reply>, Response<Body>)>),
}

/// `--read-sharing`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadSharing {
    On,
    Off,
}

/// What every core sees of every core.
pub struct ReadShare {
    cores: Box<[Slot]>,
    on: bool,
}

/// One core's load and inbox, on its own cache line.
#[repr(align(128))]
struct Slot {
    inbox: flume::Sender<Message>,
    /// Requests of the core's own connections without a response head yet (written by the
    /// core only).
    in_flight: AtomicUsize,
    /// When the core's own connections last brought a request, in µs since `epoch()` (written
    /// by the core only).
    last_own: AtomicU64,
    /// Reads handed to the core and not yet answered.
    queued: AtomicUsize,
    /// False once the core stops taking reads (it is shutting down).
    open: AtomicBool,
}

/// A core's inbox: reads other cores hand to it, and the answers to those it handed over.
#[derive(Clone)]
pub struct Inbox(flume::Receiver<Message>);

impl ReadShare {
    /// The shared state of `cores` cores, and each core's inbox.
    pub fn new(cores: usize, sharing: ReadSharing) -> (Arc<ReadShare>, Vec<Inbox>) {
        let (slots, inboxes): (Vec<_>, Vec<_>) = (0..cores)
            .map(|_| {
                let (tx, rx) = flume::unbounded();
                let slot = Slot {
                    inbox: tx,
                    in_flight: AtomicUsize::new(0),
                    last_own: AtomicU64::new(0),
                    queued: AtomicUsize::new(0),
                    open: AtomicBool::new(true),
                };
                (slot, Inbox(rx))
            })
            .unzip();
        let share = ReadShare {
            cores: slots.into_boxed_slice(),
            on: sharing == ReadSharing::On,
        };
        (Arc::new(share), inboxes)
    }
}

/// One core's side: its load, and the reads it hands over or takes.
pub struct CoreReads {
    share: Arc<ReadShare>,
    index: usize,
    inbox: Inbox,
    /// Reads that arrived on this core and are not yet being answered (here or elsewhere).
    waiting: Rc<Cell<usize>>,
    /// Where the search for an idle core starts next, to spread over many cores.
    next: Cell<usize>,
    /// What waits to be sent to each core at the end of this burst.
    outbox: RefCell<Vec<Outgoing>>,
    /// A task is due to send the outbox.
    flush_due: Cell<bool>,
    /// `denokv_reads_handed_over_total`.
    handed: IntCounter,
}

#[derive(Default)]
struct Outgoing {
    reads: Vec<Job>,
    answers: Vec<(oneshot::Sender<Reply>, Response<Body>)>,
}

impl CoreReads {
    pub fn new(share: Arc<ReadShare>, index: usize, inbox: Inbox, handed: IntCounter) -> CoreReads {
        let cores = share.cores.len();
        CoreReads {
            next: Cell::new(index + 1),
            share,
            index,
            inbox,
            waiting: Rc::new(Cell::new(0)),
            outbox: RefCell::new((0..cores).map(|_| Outgoing::default()).collect()),
            flush_due: Cell::new(false),
            handed,
        }
    }

    fn slot(&self) -> &Slot {
        &self.share.cores[self.index]
    }

    /// A request arrived on this core. Called as hyper hands it to the service, so that a burst
    /// of streams is counted before the first of them runs; the guard ends it. `None` (nothing
    /// counted) when reads are not shared.
    pub fn arrived(self: &Rc<Self>, is_read: bool) -> Option<Arrival> {
        if !self.share.on || self.share.cores.len() < 2 {
            return None;
        }
        let slot = self.slot();
        // Only this core writes these: a load and a store need no read-modify-write.
        let n = slot.in_flight.load(Ordering::Relaxed);
        slot.in_flight.store(n + 1, Ordering::Relaxed);
        // 0 means never.
        slot.last_own.store(micros_now().max(1), Ordering::Relaxed);
        if is_read {
            self.waiting.set(self.waiting.get() + 1);
        }
        Some(Arrival {
            core: self.clone(),
            waiting: is_read,
        })
    }

    /// An idle core that takes a read now, if reads wait on this one.
    fn idle_peer(&self) -> Option<usize> {
        let cores = &self.share.cores;
        if self.waiting.get() == 0 {
            return None;
        }
        let now = micros_now();
        let start = self.next.get();
        for i in 0..cores.len() {
            let peer = (start + i) % cores.len();
            let slot = &cores[peer];
            let queued = slot.queued.load(Ordering::Relaxed);
            let last_own = slot.last_own.load(Ordering::Relaxed);
            if peer == self.index
                || slot.in_flight.load(Ordering::Relaxed) > 0
                || (last_own > 0 && now.saturating_sub(last_own) < IDLE_FOR.as_micros() as u64)
                || queued >= MAX_QUEUED
                || queued > SHARE * self.waiting.get()
            {
                continue;
            }
            // Counted before `open` is checked, and `close` the other way round: a core that
            // stops either sees this read in its count and waits for it, or is not sent it.
            slot.queued.fetch_add(1, Ordering::SeqCst);
            if slot.open.load(Ordering::SeqCst) {
                self.next.set(peer + 1);
                return Some(peer);
            }
            slot.queued.fetch_sub(1, Ordering::SeqCst);
        }
        None
    }

    /// Queues `f` for core `to` and makes sure a task sends the outbox once the tasks already
    /// queued on this core (the rest of the burst) have run.
    fn post(self: &Rc<Self>, to: usize, f: impl FnOnce(&mut Outgoing)) {
        f(&mut self.outbox.borrow_mut()[to]);
        if !self.flush_due.replace(true) {
            monoio::spawn(self.clone().flush());
        }
    }

    /// Sends the reads handed over so far, now.
    fn send_reads(&self) {
        for (to, out) in self.outbox.borrow_mut().iter_mut().enumerate() {
            if !out.reads.is_empty() {
                let reads = std::mem::take(&mut out.reads);
                // Not sent (the core stopped): the jobs are dropped here and go back.
                let _ = self.share.cores[to].inbox.send(Message::Reads(reads));
            }
        }
    }

    /// Sends the answers due to core `to`, if at least `min` wait.
    fn send_answers(&self, to: usize, min: usize) {
        let answers = {
            let mut outbox = self.outbox.borrow_mut();
            if outbox[to].answers.len() < min.max(1) {
                return;
            }
            std::mem::take(&mut outbox[to].answers)
        };
        let n = answers.len();
        // Not sent: that core's runtime ended, and with it whoever waited.
        let _ = self.share.cores[to].inbox.send(Message::Answers(answers));
        self.slot().queued.fetch_sub(n, Ordering::SeqCst);
    }

    async fn flush(self: Rc<Self>) {
        self.flush_due.set(false);
        self.send_reads();
        for to in 0..self.share.cores.len() {
            self.send_answers(to, 1);
        }
    }

    /// The core stops taking reads: waits (up to `deadline`) until those handed to it are
    /// answered, so that none is cut off with the runtime; any left then go back.
    pub async fn close(&self, deadline: Instant) {
        let slot = self.slot();
        slot.open.store(false, Ordering::SeqCst);
        while slot.queued.load(Ordering::SeqCst) > 0 && Instant::now() < deadline {
            monoio::time::sleep(Duration::from_millis(1)).await;
        }
        while let Ok(message) = self.inbox.0.try_recv() {
            match message {
                // Dropped unanswered: each goes back to its core.
                Message::Reads(jobs) => drop(jobs),
                Message::Answers(answers) => deliver(answers),
            }
        }
    }
}

fn deliver(answers: Vec<(oneshot::Sender<Reply>, Response<Body>)>) {
    for (reply, response) in answers {
        let _ = reply.send(Ok(response));
    }
}

/// A request in flight on its core, from its arrival to its response head.
pub struct Arrival {
    core: Rc<CoreReads>,
    /// A read not yet being answered.
    waiting: bool,
}

impl Arrival {
    /// The request starts being answered; true for a read.
    fn started(&mut self) -> bool {
        let read = std::mem::take(&mut self.waiting);
        if read {
            let waiting = &self.core.waiting;
            waiting.set(waiting.get() - 1);
        }
        read
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        self.started();
        let slot = self.core.slot();
        let n = slot.in_flight.load(Ordering::Relaxed);
        slot.in_flight.store(n - 1, Ordering::Relaxed);
    }
}

/// µs since the first call: a clock all cores share.
fn micros_now() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// Answers `req`: here, or on an idle core when it is a read and other reads wait here.
pub async fn handle(
    req: Request,
    ctx: &Rc<CoreContext>,
    watches: &ConnWatches,
    mut arrival: Option<Arrival>,
) -> Response<Body> {
    let placed = match &mut arrival {
        Some(arrival) => hand_over(req, ctx, arrival),
        None => Err(req),
    };
    let req = match placed {
        Ok(answer) => match answer.await {
            Ok(Ok(response)) => {
                ctx.reads.handed.inc();
                return response;
            }
            // The other core stopped before it took the read.
            Ok(Err(req)) => req,
            // Its runtime ended with the read half answered: nothing was changed, so the
            // client may retry.
            Err(_) => return ApiError::unavailable().into_response(),
        },
        Err(req) => req,
    };
    // One call site: the request's future is moved into its task, so it stays small.
    let response = super::handle(req, ctx, watches).await;
    drop(arrival);
    response
}

/// Posts `req` to an idle core if it is a read and others wait here; else gives it back.
// The request is moved once either way; boxing it would cost an allocation per request.
#[allow(clippy::result_large_err)]
fn hand_over(
    req: Request,
    ctx: &CoreContext,
    arrival: &mut Arrival,
) -> Result<oneshot::Receiver<Reply>, Request> {
    let peer = match arrival.started() {
        true => ctx.reads.idle_peer(),
        false => None,
    };
    let Some(peer) = peer else {
        // Reads handed over earlier in this burst leave first, so the other core starts now.
        ctx.reads.send_reads();
        return Err(req);
    };
    let (reply, answer) = oneshot::channel();
    let job = Job {
        req: Some(req),
        reply: Some(reply),
        from: ctx.reads.index,
    };
    ctx.reads.post(peer, |out| out.reads.push(job));
    Ok(answer)
}

/// Serves this core's inbox until the runtime ends: answers the reads other cores hand over
/// (each as a task of its own), and passes on the answers to those this core handed over.
pub async fn serve_inbox(ctx: Rc<CoreContext>, watches: ConnWatches) {
    let inbox = ctx.reads.inbox.clone();
    while let Ok(message) = inbox.0.recv_async().await {
        let jobs = match message {
            Message::Reads(jobs) => jobs,
            Message::Answers(answers) => {
                deliver(answers);
                continue;
            }
        };
        for mut job in jobs {
            let (Some(req), Some(reply)) = (job.req.take(), job.reply.take()) else {
                continue;
            };
            let (ctx, watches, from) = (ctx.clone(), watches.clone(), job.from);
            monoio::spawn(async move {
                let response = super::handle(req, &ctx, &watches).await;
                ctx.reads
                    .post(from, |out| out.answers.push((reply, response)));
                ctx.reads.send_answers(from, ANSWERS_BATCH);
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cores(n: usize) -> Vec<Rc<CoreReads>> {
        cores_sharing(n, ReadSharing::On)
    }

    fn cores_sharing(n: usize, sharing: ReadSharing) -> Vec<Rc<CoreReads>> {
        let (share, inboxes) = ReadShare::new(n, sharing);
        inboxes
            .into_iter()
            .enumerate()
            .map(|(i, inbox)| {
                let handed = IntCounter::new("handed", "handed").unwrap();
                Rc::new(CoreReads::new(share.clone(), i, inbox, handed))
            })
            .collect()
    }

    /// Starts each of `arrivals` in turn as the core would: how many went to another core.
    fn start_all(core: &CoreReads, arrivals: &mut [Arrival]) -> usize {
        let mut handed = 0;
        for a in arrivals {
            if a.started() && core.idle_peer().is_some() {
                handed += 1;
            }
        }
        handed
    }

    #[test]
    fn a_lone_read_is_answered_by_its_own_core() {
        let c = cores(2);
        let mut a = c[0].arrived(true).unwrap();
        assert!(a.started());
        assert_eq!(c[0].idle_peer(), None);
    }

    #[test]
    fn reads_waiting_go_to_an_idle_core_which_takes_two_for_each_left_waiting() {
        let c = cores(2);
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(true).unwrap()).collect();
        // Waiting behind each: 9, 8, ... 0; handed while queued <= 2 × waiting.
        assert_eq!(start_all(&c[0], &mut burst), 7);
        assert_eq!(c[0].share.cores[1].queued.load(Ordering::Relaxed), 7);
        assert_eq!(c[0].waiting.get(), 0);
        drop(burst);
        assert_eq!(c[0].slot().in_flight.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn a_core_with_requests_of_its_own_takes_none_until_they_pause() {
        let c = cores(2);
        let own = c[1].arrived(false).unwrap();
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(true).unwrap()).collect();
        assert_eq!(start_all(&c[0], &mut burst), 0);
        // Answered, but its connections may bring more at once: still not idle.
        drop(own);
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(true).unwrap()).collect();
        assert_eq!(start_all(&c[0], &mut burst), 0);
        std::thread::sleep(IDLE_FOR + Duration::from_millis(5));
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(true).unwrap()).collect();
        assert!(start_all(&c[0], &mut burst) > 0);
    }

    #[test]
    fn a_stopping_core_takes_none() {
        let c = cores(2);
        c[1].slot().open.store(false, Ordering::SeqCst);
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(true).unwrap()).collect();
        assert_eq!(start_all(&c[0], &mut burst), 0);
        assert_eq!(c[1].slot().queued.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn with_read_sharing_off_or_one_core_nothing_is_counted_or_handed_over() {
        assert!(cores_sharing(2, ReadSharing::Off)[0]
            .arrived(true)
            .is_none());
        assert!(cores(1)[0].arrived(true).is_none());
    }

    #[test]
    fn writes_and_other_requests_are_never_handed_over() {
        let c = cores(2);
        let mut burst: Vec<Arrival> = (0..10).map(|_| c[0].arrived(false).unwrap()).collect();
        assert_eq!(start_all(&c[0], &mut burst), 0);
    }

    #[test]
    fn hand_overs_spread_over_the_idle_cores() {
        let c = cores(3);
        let mut burst: Vec<Arrival> = (0..12).map(|_| c[0].arrived(true).unwrap()).collect();
        let handed = start_all(&c[0], &mut burst);
        let (q1, q2) = (
            c[0].share.cores[1].queued.load(Ordering::Relaxed),
            c[0].share.cores[2].queued.load(Ordering::Relaxed),
        );
        assert_eq!(q1 + q2, handed);
        assert!(q1.abs_diff(q2) <= 1, "{q1} and {q2}");
    }
}
