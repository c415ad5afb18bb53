//! A throttle group as the data path uses it: the group's bookkeeping
//! ([`Group`]) behind a lock, with the requests its members hold back.
//!
//! A request that may not start yet becomes a task on its own I/O thread
//! that waits for a signal: *released* (it may start now) or *timer duty*
//! (sleep until the given time on the thread's engine timer, then tell the
//! group the timer fired, which may release it or another request).
//! Signals cross threads through the tasks' mailboxes, so a request never
//! leaves the thread that owns its completion, and a waiting request costs
//! no CPU. Members whose group limits nothing take no lock at all.
//!
//! Far from its limits a group hands a thread a *lease*: a few dozen
//! operations (and some MiB) counted in its buckets ahead of time, which
//! that thread's requests of that member then use without the lock. A
//! lease is granted only while nothing of its direction waits, is at
//! most 1/16 of a bucket, and is dropped when the limits change or a drain
//! begins; what a thread leaves unused is taken back when it next asks. So
//! a throttle whose limits are not reached takes the lock once per lease,
//! and one near its limits behaves as before (too small for a lease).

use super::config::{Config, Direction};
use super::group::{Group, MemberId, Step};
use crate::io::task::{current_waker, RemoteWake};
use std::cell::RefCell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::Instant;

/// What a waiting request was told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// Sleep until this time (ns on the group's clock), then report.
    Timer(u64),
    /// Start now.
    Released,
}

#[derive(Default)]
struct WaitState {
    released: bool,
    timer_at: Option<u64>,
    wake: Option<RemoteWake>,
}

/// One held-back request's mailbox.
#[derive(Default)]
pub struct Waiter {
    state: Mutex<WaitState>,
}

impl Waiter {
    fn lock(&self) -> MutexGuard<'_, WaitState> {
        // Every update is a plain assignment: a poisoned lock is usable.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn signal(&self, f: impl FnOnce(&mut WaitState)) {
        let wake = {
            let mut st = self.lock();
            f(&mut st);
            st.wake.take()
        };
        if let Some(w) = wake {
            w.wake();
        }
    }

    /// The next signal (timer duty first: it must not be lost when both
    /// came before the task looked).
    pub fn next(self: &Arc<Self>) -> NextSignal {
        NextSignal {
            waiter: self.clone(),
        }
    }
}

/// The future of a waiter's next signal.
pub struct NextSignal {
    waiter: Arc<Waiter>,
}

impl Future for NextSignal {
    type Output = Signal;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Signal> {
        let mut st = self.waiter.lock();
        if let Some(at) = st.timer_at.take() {
            return Poll::Ready(Signal::Timer(at));
        }
        if st.released {
            st.released = false;
            return Poll::Ready(Signal::Released);
        }
        match current_waker() {
            Some(w) => {
                st.wake = Some(w);
                Poll::Pending
            }
            // Outside a task nothing could wake it: let it go.
            None => Poll::Ready(Signal::Released),
        }
    }
}

struct Inner {
    group: Group,
    /// Per member, per direction, the held-back requests, oldest first.
    waiting: Vec<[VecDeque<Arc<Waiter>>; 2]>,
}

/// A throttle group shared by its members' threads.
pub struct SharedGroup {
    inner: Mutex<Inner>,
    enabled: AtomicBool,
    epoch: Instant,
    /// Unique among the daemon's groups, for the threads' leases.
    id: u64,
    /// Moves when leases must be dropped (new limits, a drain).
    lease_gen: AtomicU64,
    /// The limits' `iops-size`, for requests taken from a lease, and its
    /// inverse (as f64 bits).
    iops_size: AtomicU64,
    per_iops_size: AtomicU64,
}

/// 1/n, or 0 for 0.
fn inverse(n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        1.0 / n as f64
    }
}

/// What one thread may still start of one member's requests in one
/// direction without asking the group.
struct Lease {
    group: u64,
    member: MemberId,
    dir: usize,
    gen: u64,
    ops: f64,
    bytes: f64,
}

/// Leases a thread holds are kept this many at most (entries of groups
/// gone are dropped then).
const LEASES_PER_THREAD: usize = 16;

thread_local! {
    static LEASES: RefCell<Vec<Lease>> = const { RefCell::new(Vec::new()) };
}

/// Where a request stands with the thread's lease.
enum FromLease {
    /// Started on the lease.
    Taken,
    /// Not enough left (or none): what is left goes back to the group.
    Return(f64, f64),
    None,
}

static NEXT_GROUP_ID: AtomicU64 = AtomicU64::new(1);

fn d(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
    }
}

impl SharedGroup {
    pub fn new(cfg: Config) -> Arc<Self> {
        Arc::new(SharedGroup {
            enabled: AtomicBool::new(cfg.enabled()),
            inner: Mutex::new(Inner {
                group: Group::new(cfg, 0),
                waiting: Vec::new(),
            }),
            epoch: Instant::now(),
            id: NEXT_GROUP_ID.fetch_add(1, Ordering::Relaxed),
            lease_gen: AtomicU64::new(0),
            iops_size: AtomicU64::new(cfg.iops_size),
            per_iops_size: AtomicU64::new(inverse(cfg.iops_size).to_bits()),
        })
    }

    /// Takes a request of `ops` and `bytes` from this thread's lease.
    fn take_from_lease(&self, m: MemberId, dir: usize, ops: f64, bytes: f64) -> FromLease {
        let gen = self.lease_gen.load(Ordering::Relaxed);
        LEASES.with(|l| {
            let mut leases = l.borrow_mut();
            let Some(i) = leases
                .iter()
                .position(|x| x.group == self.id && x.member == m && x.dir == dir)
            else {
                return FromLease::None;
            };
            let lease = &mut leases[i];
            if lease.gen == gen && lease.ops >= ops && lease.bytes >= bytes {
                lease.ops -= ops;
                lease.bytes -= bytes;
                return FromLease::Taken;
            }
            let left = leases.swap_remove(i);
            if left.gen == gen {
                FromLease::Return(left.ops, left.bytes)
            } else {
                FromLease::None
            }
        })
    }

    fn keep_lease(&self, m: MemberId, dir: usize, (ops, bytes): (f64, f64)) {
        let gen = self.lease_gen.load(Ordering::Relaxed);
        LEASES.with(|l| {
            let mut leases = l.borrow_mut();
            if leases.len() >= LEASES_PER_THREAD {
                leases.clear();
            }
            leases.push(Lease {
                group: self.id,
                member: m,
                dir,
                gen,
                ops,
                bytes,
            });
        });
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The bookkeeping is updated in single steps under the lock; a
        // panic cannot leave it half-changed.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Nanoseconds on the group's clock.
    pub fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// Whether any limit is set (else members pass requests straight on).
    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn config(&self) -> Config {
        *self.lock().group.config()
    }

    /// New limits; requests held back are moved on under them.
    pub fn set_config(&self, cfg: Config) {
        let now = self.now();
        let mut inner = self.lock();
        self.iops_size.store(cfg.iops_size, Ordering::Relaxed);
        self.per_iops_size
            .store(inverse(cfg.iops_size).to_bits(), Ordering::Relaxed);
        self.lease_gen.fetch_add(1, Ordering::Relaxed);
        self.enabled.store(cfg.enabled(), Ordering::Relaxed);
        let steps = inner.group.reconfigure(cfg, now);
        apply(&mut inner, Direction::Read, steps[0]);
        apply(&mut inner, Direction::Write, steps[1]);
    }

    pub fn join(&self) -> MemberId {
        let mut inner = self.lock();
        let m = inner.group.join();
        if inner.waiting.len() <= m {
            inner.waiting.resize_with(m + 1, Default::default);
        }
        m
    }

    pub fn leave(&self, m: MemberId) {
        let mut inner = self.lock();
        inner.group.leave(m);
        if let Some(queues) = inner.waiting.get_mut(m) {
            // Nothing should wait here (the member was drained); let any
            // straggler go rather than hold it forever.
            for q in queues.iter_mut() {
                for w in q.drain(..) {
                    w.signal(|st| st.released = true);
                }
            }
        }
    }

    /// Whether members are held back at all right now (for tests).
    pub fn waiting(&self) -> usize {
        self.lock()
            .waiting
            .iter()
            .flatten()
            .map(VecDeque::len)
            .sum()
    }

    /// A request of `bytes` from member `m` wants to start: `None` when
    /// it may (and is counted), else the waiter to await.
    pub fn arrive(&self, m: MemberId, dir: Direction, bytes: u64) -> Option<Arc<Waiter>> {
        let i = d(dir);
        let len = bytes as f64;
        // A multiplication by 1/iops-size rather than a division: the
        // compiler computes it whether or not it is used, and a division
        // was most of this function's time.
        let size = self.iops_size.load(Ordering::Relaxed);
        let ops = if size > 0 && bytes > size {
            len * f64::from_bits(self.per_iops_size.load(Ordering::Relaxed))
        } else {
            1.0
        };
        let back = match self.take_from_lease(m, i, ops, len) {
            FromLease::Taken => return None,
            FromLease::Return(o, b) => Some((o, b)),
            FromLease::None => None,
        };
        let mut inner = self.lock();
        if let Some((o, b)) = back {
            inner.group.refund(dir, o, b);
        }
        if inner.group.admit_undrained(m, dir, bytes) {
            if let Some(lease) = inner.group.lease(m, dir) {
                self.keep_lease(m, i, lease);
            }
            return None;
        }
        let now = self.now();
        let step = inner.group.arrive(m, dir, bytes, now)?;
        let w = Arc::new(Waiter::default());
        if let Some(q) = inner.waiting.get_mut(m) {
            q[d(dir)].push_back(w.clone());
        }
        apply(&mut inner, dir, step);
        Some(w)
    }

    /// A drain begins (see [`Group::drain_begin`]): what waits is let go.
    pub fn drain_begin(&self) {
        let now = self.now();
        let mut inner = self.lock();
        self.lease_gen.fetch_add(1, Ordering::Relaxed);
        let steps = inner.group.drain_begin(now);
        apply(&mut inner, Direction::Read, steps[0]);
        apply(&mut inner, Direction::Write, steps[1]);
    }

    /// A drain ended: the limits hold again.
    pub fn drain_end(&self) {
        self.lock().group.drain_end();
    }

    /// A waiter's timer duty is done.
    pub fn timer_fired(&self, dir: Direction) {
        let now = self.now();
        let mut inner = self.lock();
        let step = inner.group.timer_fired(dir, now);
        apply(&mut inner, dir, step);
    }

    /// A released waiter of member `m` starts its request of `bytes`.
    pub fn start_waiting(&self, m: MemberId, dir: Direction, bytes: u64) {
        let now = self.now();
        let mut inner = self.lock();
        let step = inner.group.start_waiting(m, dir, bytes, now);
        apply(&mut inner, dir, step);
    }
}

/// Carries out what the group decided.
fn apply(inner: &mut Inner, dir: Direction, step: Step) {
    let i = d(dir);
    match step {
        Step::Idle => {}
        Step::Release(m) => {
            if let Some(w) = inner.waiting.get_mut(m).and_then(|q| q[i].pop_front()) {
                w.signal(|st| st.released = true);
            }
        }
        Step::Arm { member, at } => {
            if let Some(w) = inner.waiting.get(member).and_then(|q| q[i].front()) {
                w.signal(|st| st.timer_at = Some(at));
            }
        }
    }
}

/// Waits, in a task, until the group lets a held-back request of member
/// `m` start (taking the timer duty when given it).
pub async fn wait_turn(
    group: &SharedGroup,
    m: MemberId,
    waiter: Arc<Waiter>,
    dir: Direction,
    bytes: u64,
) {
    loop {
        match waiter.next().await {
            Signal::Timer(at) => {
                let now = group.now();
                if at > now {
                    let _ = crate::io::task::sleep(at - now).await;
                }
                group.timer_fired(dir);
            }
            Signal::Released => {
                group.start_waiting(m, dir, bytes);
                return;
            }
        }
    }
}

/// The limits of some groups switched off for as long as this lives: a
/// graph change holds one while it drains.
pub struct LimitsOff(Vec<Arc<SharedGroup>>);

impl LimitsOff {
    /// Lets go of what `groups` hold back, and keeps their limits off.
    pub fn new(groups: Vec<Arc<SharedGroup>>) -> Self {
        for g in &groups {
            g.drain_begin();
        }
        LimitsOff(groups)
    }
}

impl Drop for LimitsOff {
    fn drop(&mut self) {
        for g in &self.0 {
            g.drain_end();
        }
    }
}

/// A member's place in a group, left when dropped: what a BlockBackend
/// holds while `block_set_io_throttle` limits it.
pub struct Membership {
    /// The group's name (an object id, or the one a command gave).
    pub name: String,
    pub group: Arc<SharedGroup>,
    pub member: MemberId,
}

impl Membership {
    pub fn join(name: &str, group: Arc<SharedGroup>) -> Arc<Self> {
        let member = group.join();
        Arc::new(Membership {
            name: name.to_string(),
            group,
            member,
        })
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.group.leave(self.member);
    }
}
