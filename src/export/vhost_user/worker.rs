//! The event loop of an I/O thread: it owns the virtqueues given to it,
//! takes every available request on a kick, submits them in one batch,
//! completes them from the I/O engine's completions, and notifies the
//! guest once per batch (respecting EVENT_IDX).
//!
//! Per-request state lives in slots preallocated per queue, one per ring
//! entry: the parsed request here, its buffers and accounting in the same
//! slot of the queue's backend (`block::backend`), so the request path
//! does not allocate once the slots' vectors have grown. Buffers are
//! iovecs straight into guest memory; a request keeps the memory snapshot
//! it points into until it completes.

use super::inflight::InflightQueue;
use super::memory::AtomicMem;
use super::polling::{Ended, Fired, PollPolicy, PollTime};
use super::queue::{
    complete, polled_avail_idx, remember_guess, resubmit_heads, ring_is_broken, snapshot,
    take_requests, QueueRun, Slot,
};
use super::Device;
use crate::export::virtio_blk::{Request, RequestLimits};
use crate::io::{Completion, IoContext};
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Depth of each thread's io_uring.
const RING_DEPTH: u32 = 1024;
/// How often a queue held back by a drain looks again.
const DRAIN_RETRY: Duration = Duration::from_millis(1);
/// How long a thread with I/O in flight sleeps at most before it looks at
/// the completion queue itself. Completions wake it through the engine's
/// eventfd; this only bounds the delay should a wake-up be lost in the
/// window where the eventfd is re-enabled (the kernel reads that flag
/// after publishing the completion, without a full barrier between).
const COMPLETION_RECHECK: Duration = Duration::from_millis(10);
/// Polling looks at the clock once per this many iterations.
const POLL_CLOCK_EVERY: u32 = 16;
/// A gap this long between two of polling's looks at the clock, which
/// normally come well under a microsecond apart, means the thread was kept
/// off its CPU in between (an interrupt, or another thread that ran).
const POLL_INTERRUPTED: Duration = Duration::from_micros(4);
/// A thread kept busy by polling or by work found when about to sleep
/// still collects its events (control messages, other queues' kicks)
/// after this many rounds.
const EVENTS_EVERY: u32 = 64;

const TOKEN_CONTROL: u64 = 0;
const TOKEN_IO: u64 = 1;
const TOKEN_QUEUE: u64 = 2;

/// Which queue of which device.
pub type QueueKey = (u64, u16);

/// A queue handed to a thread.
pub struct QueueStart {
    pub dev: Arc<Device>,
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
    pub call: EventFd,
    pub mem: AtomicMem,
    /// Inflight tracking for this queue, when the frontend set it up.
    pub inflight: Option<InflightQueue>,
}

pub enum WorkerMsg {
    Start(Box<QueueStart>),
    /// Stop a queue once its requests finished; the reply is the index of
    /// the next available entry (for GET_VRING_BASE).
    Stop {
        key: QueueKey,
        reply: Sender<u16>,
    },
    /// The frontend gave the queue a new call eventfd.
    SetCall {
        key: QueueKey,
        call: EventFd,
    },
    /// An iothread's polling options changed (qom-set).
    SetPoll(PollPolicy),
    Exit,
}

struct Worker {
    epoll: Epoll,
    ctx: IoContext,
    queues: Vec<Option<QueueRun>>,
    completions: Vec<Completion>,
    poll: PollTime,
}

/// What polling came to; `interrupted`: the thread was kept off its CPU
/// for a moment while it polled.
enum Polled {
    /// Work showed up; `waited` is how long polling had run by the last
    /// look at the clock (`None`: found before the clock was read at all).
    Work {
        fired: Fired,
        waited: Option<Duration>,
        interrupted: bool,
    },
    /// Nothing within the polling time, which started at `since`.
    Nothing { since: Instant, interrupted: bool },
}

/// Runs an I/O thread until it is told to exit.
pub fn run(rx: Receiver<WorkerMsg>, wake: EventFd, poll: PollPolicy) {
    let mut w = match Worker::new(&wake, poll) {
        Ok(w) => w,
        Err(e) => {
            log::error!("I/O thread cannot start: {e}");
            return;
        }
    };
    let mut events = vec![EpollEvent::default(); 64];
    // Rounds of work done since events were last collected.
    let mut rounds = 0u32;
    loop {
        // A queue that stopped at the batch limit goes on at once; the
        // events are still collected (without waiting) so that the other
        // queues, completions and control messages are not starved. So
        // are they every EVENTS_EVERY rounds found by polling or arming.
        // When the thread runs out of work it is idle until something
        // shows up; with adaptive polling, how long that took (polling
        // included) sets the next polling time. `idle_since` is when the
        // idle spell began, read only when the thread is about to sleep.
        let mut idle_since = None;
        let mut interrupted = false;
        let timeout = if rounds >= EVENTS_EVERY
            || w.queues
                .iter()
                .flatten()
                .any(|q| q.deferred && q.stopping.is_none())
        {
            Duration::ZERO
        } else {
            let window = w.poll.ns();
            if window > 0 {
                match w.poll_for_work(Duration::from_nanos(window)) {
                    Polled::Work {
                        fired,
                        waited,
                        interrupted,
                    } => {
                        // Work found before the clock was read came within
                        // a few iterations: a wait of about nothing.
                        let ns = waited.map_or(0, |d| d.as_nanos() as u64);
                        w.poll.observe(ns, fired, Ended::Polling, interrupted);
                        w.process_all();
                        rounds += 1;
                        continue;
                    }
                    Polled::Nothing {
                        since,
                        interrupted: i,
                    } => {
                        interrupted = i;
                        if w.poll.adapts() {
                            idle_since = Some(since);
                        }
                    }
                }
            }
            if w.poll.adapts() && idle_since.is_none() {
                idle_since = Some(Instant::now());
            }
            let fired = w.arm();
            if fired.any() {
                if let Some(since) = idle_since {
                    let ns = since.elapsed().as_nanos() as u64;
                    w.poll.observe(ns, fired, Ended::LastLook, interrupted);
                }
                w.process_all();
                rounds += 1;
                continue;
            }
            if w.queues.iter().flatten().any(|q| q.held) {
                DRAIN_RETRY
            } else if w.ctx.busy() {
                COMPLETION_RECHECK
            } else {
                Duration::MAX
            }
        };
        rounds = 0;
        let waited = w
            .epoll
            .wait(timeout.as_millis().try_into().unwrap_or(-1), &mut events);
        if !timeout.is_zero() {
            w.ctx.disarm();
        }
        // Read the clock before handling anything: the wait ended now.
        let woke_after = idle_since.map(|since| since.elapsed());
        for q in w.queues.iter_mut().flatten() {
            if q.held {
                q.held = false;
                q.deferred = true;
            }
        }
        let n = match waited {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("I/O thread: epoll: {e}");
                return;
            }
        };
        if n == 0 && w.ctx.busy() {
            // The safety net below COMPLETION_RECHECK.
            w.reap();
        }
        let mut fired = Fired::default();
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_CONTROL => {
                    let _ = wake.read();
                    while let Ok(msg) = rx.try_recv() {
                        if !w.control(msg) {
                            w.shutdown();
                            return;
                        }
                    }
                }
                TOKEN_IO => {
                    w.ctx.clear_wake();
                    w.reap();
                    fired.completions = true;
                }
                t => {
                    let i = (t - TOKEN_QUEUE) as usize;
                    if let Some(Some(q)) = w.queues.get_mut(i) {
                        let _ = q.kick.read();
                        q.deferred = true;
                        fired.requests = true;
                    }
                }
            }
        }
        if let Some(d) = woke_after {
            w.poll
                .observe(d.as_nanos() as u64, fired, Ended::Wakeup, interrupted);
        }
        w.process_all();
    }
}

impl Worker {
    fn new(wake: &EventFd, poll: PollPolicy) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new()?;
        let ctx = IoContext::new(RING_DEPTH, false)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            ctx.event_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_IO),
        )?;
        Ok(Worker {
            epoll,
            ctx,
            queues: Vec::new(),
            completions: Vec::with_capacity(256),
            poll: PollTime::new(poll),
        })
    }

    /// Handles a control message; false means exit.
    fn control(&mut self, msg: WorkerMsg) -> bool {
        match msg {
            WorkerMsg::Start(s) => self.start(*s),
            WorkerMsg::Stop { key, reply } => {
                if let Some(q) = self.find(key) {
                    q.stopping = Some(reply);
                } else {
                    let _ = reply.send(0);
                }
                self.finish_stops();
            }
            WorkerMsg::SetCall { key, call } => {
                if let Some(q) = self.find(key) {
                    q.call = call;
                }
            }
            WorkerMsg::SetPoll(p) => self.poll = PollTime::new(p),
            WorkerMsg::Exit => return false,
        }
        true
    }

    fn find(&mut self, key: QueueKey) -> Option<&mut QueueRun> {
        self.queues.iter_mut().flatten().find(|q| q.key == key)
    }

    fn start(&mut self, s: QueueStart) {
        use std::os::fd::AsRawFd;
        let i = match self.queues.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.queues.push(None);
                self.queues.len() - 1
            }
        };
        let size = s.queue.size();
        let slots = (0..size)
            .map(|_| Slot {
                head: 0,
                req: Request::with_capacity(8, 1),
            })
            .collect();
        let limits = RequestLimits::new(&s.dev.options);
        let event = EpollEvent::new(EventSet::IN, TOKEN_QUEUE + i as u64);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, s.kick.as_raw_fd(), event)
        {
            log::error!("queue {} of '{}' cannot be watched: {e}", s.index, s.dev.id);
            return;
        }
        let event_idx = s.queue.event_idx_enabled();
        let mut queue = s.queue;
        let mut inflight = s.inflight;
        let resubmit = match inflight
            .as_mut()
            .and_then(|iq| iq.recover(queue.next_used()))
        {
            Some(heads) => {
                // An area given back: every request taken and not returned
                // is marked, so the ring's next entry follows them, whatever
                // base the frontend sent (QEMU sends the used index).
                let used = queue.next_used();
                queue.set_next_avail(used.wrapping_add(heads.len() as u16));
                if !heads.is_empty() {
                    log::info!(
                        "queue {} of '{}': resubmitting {} requests that were in flight",
                        s.index,
                        s.dev.id,
                        heads.len()
                    );
                }
                heads
            }
            None => Vec::new(),
        };
        log::debug!(
            "queue {} of '{}' started ({size} entries)",
            s.index,
            s.dev.id
        );
        // `cont` wakes the queue (as a kick would) to retry what an error
        // stopped it on.
        match s.kick.try_clone() {
            Ok(kick) => s.dev.backend.set_waker(
                usize::from(s.index),
                Some(Arc::new(move || {
                    let _ = kick.write(1);
                })),
            ),
            Err(e) => log::warn!(
                "queue {} of '{}': no waker for cont: {e}",
                s.index,
                s.dev.id
            ),
        }
        self.queues[i] = Some(QueueRun {
            key: (s.dev.uid, s.index),
            backend: s.dev.backend.queue(usize::from(s.index), usize::from(size)),
            dev: s.dev,
            queue,
            kick: s.kick,
            call: s.call,
            snap_generation: s.mem.generation(),
            snap: Arc::new(s.mem.memory()),
            mem: s.mem,
            limits,
            capacity_seen: u64::MAX,
            slots,
            free: (0..size).rev().collect(),
            in_flight: 0,
            stopping: None,
            need_notify: false,
            // Requests may already wait (a reconnect): look right away.
            deferred: true,
            held: false,
            failed: false,
            avail_idx_at: None,
            guess: [0, 0],
            guess_slot: None,
            last_lone: (u16::MAX, None),
            driver_waits: true,
            event_idx,
            inflight,
            broken: false,
        });
        if !resubmit.is_empty() {
            if let Some(q) = self.queues[i].as_mut() {
                resubmit_heads(q, i, &resubmit, &mut self.ctx);
            }
        }
    }

    /// Stops the queues whose requests have all finished.
    fn finish_stops(&mut self) {
        use std::os::fd::AsRawFd;
        for q in self.queues.iter_mut().flatten() {
            // Requests an error holds would never finish: the stop lets
            // them go unanswered (inflight tracking keeps them for the
            // frontend's next connection).
            if q.stopping.is_some() && q.backend.has_held() {
                for si in q.backend.abandon_held() {
                    log::warn!(
                        "queue {} of '{}': a request held by the error policy is dropped as the queue stops",
                        q.key.1,
                        q.dev.id
                    );
                    q.free.push(si as u16);
                    q.in_flight -= 1;
                    q.backend.leave();
                }
            }
        }
        for entry in self.queues.iter_mut() {
            let done = entry
                .as_ref()
                .is_some_and(|q| q.stopping.is_some() && q.in_flight == 0);
            if !done {
                continue;
            }
            if let Some(q) = entry.take() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    q.kick.as_raw_fd(),
                    EpollEvent::default(),
                );
                if let Some(reply) = &q.stopping {
                    let _ = reply.send(q.queue.next_avail());
                }
                log::debug!("queue {} of '{}' stopped", q.key.1, q.dev.id);
            }
        }
    }

    fn shutdown(&mut self) {
        // Let requests in flight finish so no I/O outlives its buffers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctx.busy() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Prepares to sleep: turns the guest's kicks and the engine's
    /// wake-ups back on, then looks once more for work that arrived before
    /// they were on. Returns what it found, if anything (the caller then
    /// processes it instead of sleeping).
    ///
    /// Kicks stay off for as long as the thread is awake (see
    /// `take_requests`), so a guest that adds requests while it works, or
    /// polls, does not pay for a kick nobody waits for.
    fn arm(&mut self) -> Fired {
        let mut fired = Fired::default();
        for q in self.queues.iter_mut().flatten() {
            if !q.can_take() {
                continue;
            }
            let mem = snapshot(q);
            match q.queue.enable_notification(&**mem) {
                Ok(true) if !ring_is_broken(q) => {
                    q.deferred = true;
                    fired.requests = true;
                }
                _ => {}
            }
        }
        if !self.ctx.arm() {
            fired.completions = true;
        }
        if fired.any() {
            self.ctx.disarm();
        }
        fired
    }

    /// Busy-waits up to `window` for new requests or completions.
    ///
    /// An iteration is kept to a few loads from shared memory: the avail
    /// index through the queue's current snapshot (a memory table change is
    /// picked up when requests are taken), the completion queue's tail, and
    /// the clock only every [`POLL_CLOCK_EVERY`] iterations.
    fn poll_for_work(&mut self, window: Duration) -> Polled {
        // The clock is first read after POLL_CLOCK_EVERY iterations: work
        // found sooner costs no reading at all.
        let mut start: Option<Instant> = None;
        let mut waited: Option<Duration> = None;
        let mut interrupted = false;
        // Completions handled since the last look at the clock make the
        // gap between the looks no sign of anything.
        let mut worked = false;
        let mut spins = 0u32;
        loop {
            if self.ctx.has_ready() {
                self.reap();
                if self.queues.iter().flatten().any(|q| q.need_notify) {
                    return Polled::Work {
                        fired: Fired::COMPLETIONS,
                        waited,
                        interrupted,
                    };
                }
                worked = true;
            }
            let mut found = false;
            for q in self.queues.iter_mut().flatten() {
                if !q.can_take() {
                    continue;
                }
                // A ring already found broken is looked at again before
                // it counts as work (it would otherwise be found at every
                // turn); taking requests checks every ring anyway.
                if polled_avail_idx(q).is_some_and(|a| a != q.queue.next_avail())
                    && !(q.broken && ring_is_broken(q))
                {
                    q.deferred = true;
                    found = true;
                }
            }
            if found {
                return Polled::Work {
                    fired: Fired::REQUESTS,
                    waited,
                    interrupted,
                };
            }
            spins = spins.wrapping_add(1);
            if spins % POLL_CLOCK_EVERY == 0 {
                let now = Instant::now();
                let since = *start.get_or_insert(now);
                let d = now - since;
                if !worked {
                    interrupted |= d - waited.unwrap_or(Duration::ZERO) > POLL_INTERRUPTED;
                }
                if d >= window {
                    return Polled::Nothing { since, interrupted };
                }
                worked = false;
                waited = Some(d);
            }
            std::hint::spin_loop();
        }
    }

    /// Takes new requests from every queue that has some, submits the
    /// batch, and notifies the guest where needed.
    ///
    /// A queue gives at most [`super::queue::MAX_BATCH`] requests per
    /// round; one that has more stays `deferred` for the next.
    fn process_all(&mut self) {
        for i in 0..self.queues.len() {
            let Some(q) = self.queues[i].as_mut() else {
                continue;
            };
            if q.deferred && q.stopping.is_none() {
                q.deferred = take_requests(q, i, &mut self.ctx);
            }
        }
        if let Err(e) = self.ctx.submit() {
            log::error!("I/O submission failed: {e}");
        }
        if self.ctx.has_ready() {
            self.reap();
            return;
        }
        self.notify();
        self.finish_stops();
    }

    fn reap(&mut self) {
        loop {
            self.reap_once();
            if !self.ctx.has_ready() {
                break;
            }
        }
        self.notify();
        self.finish_stops();
    }

    fn reap_once(&mut self) {
        self.completions.clear();
        self.ctx.reap(&mut self.completions);
        let mut done = std::mem::take(&mut self.completions);
        for c in done.iter() {
            let qi = (c.tag >> 32) as usize;
            let si = (c.tag & 0xffff_ffff) as usize;
            let Some(Some(q)) = self.queues.get_mut(qi) else {
                log::error!("completion for a queue that is gone");
                continue;
            };
            complete(q, si, c.result, &mut self.ctx);
        }
        done.clear();
        self.completions = done;
        if let Err(e) = self.ctx.submit() {
            log::error!("I/O submission failed: {e}");
        }
    }

    /// Notifies the guest where completions need it, then accounts them.
    fn notify(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            if q.need_notify {
                q.need_notify = false;
                let needed = !q.event_idx || q.queue.needs_notification(&**q.snap).unwrap_or(true);
                q.driver_waits = needed;
                if needed {
                    if let Err(e) = q.call.write(1) {
                        log::warn!("notifying queue {} of '{}': {e}", q.key.1, q.dev.id);
                    }
                }
            }
            q.backend.account_finished();
            remember_guess(q);
        }
    }
}
