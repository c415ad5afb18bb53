//! The event loop of an I/O thread: one epoll set over the control
//! eventfd, the I/O engine's eventfd, the built-in client's descriptors
//! and the fd handlers (timers among them); adaptive polling over the
//! client's [`Client::peek`] and the engine's completion queue before it
//! sleeps.
//!
//! The built-in client's hooks are called directly (the loop is generic
//! over it), so a request costs what it did when the loop was the
//! vhost-user worker itself; handlers, closures and spawned tasks are
//! reached through pointers only when their descriptor fires, a message
//! comes, or a completion carries [`TASK_TAG`].

use super::client::Client;
use super::ctx::{Ctx, TASK_TAG, TOKEN_CLIENT, TOKEN_CONTROL, TOKEN_HANDLER, TOKEN_IO};
use super::polling::{Ended, Fired, PollPolicy, PollTime};
use crate::io::{Completion, IoContext};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};
use vmm_sys_util::epoll::{ControlOperation, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Depth of each thread's io_uring.
const RING_DEPTH: u32 = 1024;
/// How often a client held back by a drain looks again.
const DRAIN_RETRY: Duration = Duration::from_millis(1);
/// How long a thread with I/O in flight sleeps at most before it looks at
/// the completion queue itself. Completions wake it through the engine's
/// eventfd; this only bounds the delay should a wake-up be lost in the
/// window where the eventfd is re-enabled (the kernel reads that flag
/// after publishing the completion, without a full barrier between).
/// While only sleeps are in flight (throttled requests waiting) the bound
/// is this long after the first sleep ends, so that waiting costs no
/// wake-ups of its own.
const COMPLETION_RECHECK: Duration = Duration::from_millis(10);
/// Polling looks at the clock once per this many iterations.
const POLL_CLOCK_EVERY: u32 = 16;
/// A gap this long between two of polling's looks at the clock, which
/// normally come well under a microsecond apart, means the thread was kept
/// off its CPU in between (an interrupt, or another thread that ran).
const POLL_INTERRUPTED: Duration = Duration::from_micros(4);
/// A thread kept busy by polling or by work found when about to sleep
/// still collects its events (control messages, other queues' kicks, fd
/// handlers, timers) after this many rounds.
const EVENTS_EVERY: u32 = 64;
/// How long an exiting thread waits for its I/O in flight.
const EXIT_GRACE: Duration = Duration::from_secs(30);

/// What other threads send a thread.
pub enum Control<M> {
    /// For the built-in client.
    Client(M),
    /// A closure to run on the thread.
    Run(Box<dyn FnOnce(&mut Ctx) + Send>),
    /// New polling options (an iothread's qom-set).
    SetPoll(PollPolicy),
    Exit,
}

struct Loop<C: Client> {
    ctx: Ctx,
    client: C,
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
pub fn run<C: Client>(rx: Receiver<Control<C::Msg>>, wake: EventFd, poll: PollPolicy) {
    let mut w = match Loop::<C>::new(&wake, poll) {
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
        // A client that stopped at its batch limit goes on at once; the
        // events are still collected (without waiting) so that other
        // queues, completions, handlers and control messages are not
        // starved. So are they every EVENTS_EVERY rounds found by polling
        // or arming. When the thread runs out of work it is idle until
        // something shows up; with adaptive polling, how long that took
        // (polling included) sets the next polling time. `idle_since` is
        // when the idle spell began, read only when the thread is about to
        // sleep.
        let mut idle_since = None;
        let mut interrupted = false;
        let timeout = if rounds >= EVENTS_EVERY || w.client.has_deferred() {
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
            if w.client.held() {
                DRAIN_RETRY
            } else {
                w.ctx
                    .io
                    .recheck_in(COMPLETION_RECHECK)
                    .unwrap_or(Duration::MAX)
            }
        };
        rounds = 0;
        let waited = w
            .ctx
            .epoll()
            .wait(timeout.as_millis().try_into().unwrap_or(-1), &mut events);
        if !timeout.is_zero() {
            w.ctx.io.disarm();
        }
        // Read the clock before handling anything: the wait ended now.
        let woke_after = idle_since.map(|since| since.elapsed());
        w.client.release_held();
        let n = match waited {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("I/O thread: epoll: {e}");
                return;
            }
        };
        if n == 0 && w.ctx.io.busy() {
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
                    w.ctx.io.clear_wake();
                    w.reap();
                    fired.completions = true;
                }
                t if t & TOKEN_HANDLER != 0 => {
                    w.ctx.dispatch(t, ev.event_set());
                }
                t => fired.requests |= w.client.event(t - TOKEN_CLIENT),
            }
        }
        if let Some(d) = woke_after {
            w.poll
                .observe(d.as_nanos() as u64, fired, Ended::Wakeup, interrupted);
        }
        w.process_all();
    }
}

impl<C: Client> Loop<C> {
    fn new(wake: &EventFd, poll: PollPolicy) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let ctx = Ctx::new(IoContext::new(RING_DEPTH, false)?, poll)?;
        ctx.epoll().ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        )?;
        ctx.epoll().ctl(
            ControlOperation::Add,
            ctx.io.event_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_IO),
        )?;
        Ok(Loop {
            ctx,
            client: C::default(),
            completions: Vec::with_capacity(256),
            poll: PollTime::new(poll),
        })
    }

    /// Handles a control message; false means exit.
    fn control(&mut self, msg: Control<C::Msg>) -> bool {
        match msg {
            Control::Client(m) => self.client.message(&mut self.ctx, m),
            Control::Run(f) => f(&mut self.ctx),
            Control::SetPoll(p) => {
                self.poll = PollTime::new(p);
                self.ctx.poll_policy = p;
            }
            Control::Exit => return false,
        }
        true
    }

    fn shutdown(&mut self) {
        // Let requests in flight finish so no I/O outlives its buffers.
        let deadline = Instant::now() + EXIT_GRACE;
        while self.ctx.io.busy() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_micros(100));
        }
        self.ctx.clear_handlers();
    }

    /// Prepares to sleep: turns the client's notifications and the
    /// engine's wake-ups back on, then looks once more for work that
    /// arrived before they were on. Returns what it found, if anything (the
    /// caller then processes it instead of sleeping).
    fn arm(&mut self) -> Fired {
        let mut fired = Fired {
            requests: self.client.arm(),
            completions: false,
        };
        if !self.ctx.io.arm() {
            fired.completions = true;
        }
        if fired.any() {
            self.ctx.io.disarm();
        }
        fired
    }

    /// Busy-waits up to `window` for new requests or completions.
    ///
    /// An iteration is kept to a few loads from shared memory: the
    /// client's peek, the completion queue's tail, the other clients'
    /// polling hooks if there are any, and the clock only every
    /// [`POLL_CLOCK_EVERY`] iterations.
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
            if self.ctx.io.has_ready() {
                self.reap();
                if self.client.wants_notify() {
                    return Polled::Work {
                        fired: Fired::COMPLETIONS,
                        waited,
                        interrupted,
                    };
                }
                worked = true;
            }
            if self.client.peek() || (self.ctx.has_poll_hooks() && self.ctx.run_poll_hooks()) {
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

    /// Lets the client take its new work, submits the batch, and finishes
    /// the round.
    fn process_all(&mut self) {
        self.client.process(&mut self.ctx.io);
        if let Err(e) = self.ctx.io.submit() {
            log::error!("I/O submission failed: {e}");
        }
        if self.ctx.io.has_ready() {
            self.reap();
            return;
        }
        self.client.round_done(&mut self.ctx);
    }

    fn reap(&mut self) {
        loop {
            self.reap_once();
            if !self.ctx.io.has_ready() {
                break;
            }
        }
        self.client.round_done(&mut self.ctx);
    }

    fn reap_once(&mut self) {
        self.completions.clear();
        self.ctx.io.reap(&mut self.completions);
        let mut done = std::mem::take(&mut self.completions);
        for c in done.iter() {
            if c.tag & TASK_TAG != 0 {
                self.ctx.task_done(*c);
            } else {
                self.client.complete(&mut self.ctx.io, *c);
            }
        }
        done.clear();
        self.completions = done;
        if let Err(e) = self.ctx.io.submit() {
            log::error!("I/O submission failed: {e}");
        }
    }
}
