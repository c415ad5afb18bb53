//! A throttle group: several members (throttled nodes or backends) that
//! share one set of buckets. Members take turns: when requests of more
//! than one member wait, they are let through one at a time, moving
//! round the members that have any waiting, so one busy member cannot
//! starve the others. A member that has requests waiting queues every
//! new one of that direction behind them (requests of one member keep
//! their order).
//!
//! This is the bookkeeping only; it does not hold requests or timers.
//! Each member keeps its own queue of waiting requests and its own timer,
//! and does what the returned [`Step`] says: arm its timer, or let its
//! oldest waiting request go ([`Group::start_waiting`]). The caller keeps
//! the group behind a lock shared by the members' threads.

use super::config::{Config, Direction};
use super::state::State;

/// A member's handle in its group.
pub type MemberId = usize;

/// What a member must do next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing: no request waits, or a timer is already armed.
    Idle,
    /// `member` lets its oldest waiting request of the direction go now.
    Release(MemberId),
    /// `member` arms its timer for the direction at `at` (ns) and then
    /// calls [`Group::timer_fired`].
    Arm { member: MemberId, at: u64 },
}

#[derive(Debug, Default, Clone)]
struct Member {
    live: bool,
    waiting: [u32; 2],
}

/// The shared state of one group.
#[derive(Debug, Clone)]
pub struct Group {
    state: State,
    members: Vec<Member>,
    /// Per direction, the member whose turn it is (or was last).
    turn: [MemberId; 2],
    /// Per direction, whether some member's timer is armed.
    timer_armed: [bool; 2],
    /// Per direction, a member was told to release a request that has
    /// not started yet; nothing else goes before it.
    releasing: [bool; 2],
    /// Drains under way: while any is, the limits hold nothing back and
    /// what waits is released, one after the other, as QEMU lets throttled
    /// requests go when a drain begins.
    drains: u32,
}

/// Operations a lease counts ahead at most.
const LEASE_OPS: f64 = 64.0;
/// Bytes a lease counts ahead at most.
const LEASE_BYTES: f64 = 8.0 * 1024.0 * 1024.0;

fn d(dir: Direction) -> usize {
    match dir {
        Direction::Read => 0,
        Direction::Write => 1,
    }
}

impl Group {
    pub fn new(cfg: Config, now: u64) -> Self {
        Group {
            state: State::new(cfg, now),
            members: Vec::new(),
            turn: [0; 2],
            timer_armed: [false; 2],
            drains: 0,
            releasing: [false; 2],
        }
    }

    pub fn config(&self) -> &Config {
        self.state.config()
    }

    /// New limits; the buckets start empty. Members with waiting requests
    /// are moved on by the returned steps (one per direction).
    pub fn reconfigure(&mut self, cfg: Config, now: u64) -> [Step; 2] {
        self.state.reconfigure(cfg, now);
        self.timer_armed = [false; 2];
        [
            self.schedule(Direction::Read, now),
            self.schedule(Direction::Write, now),
        ]
    }

    /// Adds a member.
    pub fn join(&mut self) -> MemberId {
        if let Some(i) = self.members.iter().position(|m| !m.live) {
            self.members[i] = Member {
                live: true,
                waiting: [0; 2],
            };
            return i;
        }
        self.members.push(Member {
            live: true,
            waiting: [0; 2],
        });
        self.members.len() - 1
    }

    /// Removes a member. Its waiting requests must have been let go
    /// (drained) first; any still counted are forgotten.
    pub fn leave(&mut self, m: MemberId) {
        if let Some(member) = self.members.get_mut(m) {
            *member = Member::default();
        }
    }

    /// Whether no member is left.
    pub fn is_empty(&self) -> bool {
        !self.members.iter().any(|m| m.live)
    }

    /// Whether a new request of member `m` must queue behind others: the
    /// member's own waiting ones, a timer armed, or a release under way.
    fn queue_first(&self, m: MemberId, dir: Direction) -> bool {
        let i = d(dir);
        self.members.get(m).is_some_and(|mb| mb.waiting[i] > 0)
            || self.timer_armed[i]
            || self.releasing[i]
    }

    /// A request of `bytes` from member `m` starts without the clock being
    /// read, if nothing waits before it and its buckets are within their
    /// sizes even undrained (see [`State::admits_undrained`]); true when it
    /// did (and is counted). Otherwise [`Self::arrive`] decides.
    pub fn admit_undrained(&mut self, m: MemberId, dir: Direction, bytes: u64) -> bool {
        if self.queue_first(m, dir) || !self.state.admits_undrained(dir) {
            return false;
        }
        self.state.account(dir, bytes);
        true
    }

    /// A lease for member `m` in `dir`: operations and bytes counted now
    /// for requests that then start without asking (see `shared`). Only
    /// while nothing of the direction waits and no drain is under way, and
    /// only where it is small beside the buckets (State::reserve).
    pub fn lease(&mut self, m: MemberId, dir: Direction) -> Option<(f64, f64)> {
        if self.drains > 0 || self.queue_first(m, dir) {
            return None;
        }
        self.state.reserve(dir, LEASE_OPS, LEASE_BYTES)
    }

    /// What a lease did not use is taken back.
    pub fn refund(&mut self, dir: Direction, ops: f64, bytes: f64) {
        self.state.refund(dir, ops, bytes);
    }

    /// A request of `bytes` from member `m` wants to start at `now`.
    /// `None`: it starts now (and is counted). `Some(step)`: it waits in
    /// the member's queue; the step says what to do meanwhile.
    pub fn arrive(&mut self, m: MemberId, dir: Direction, bytes: u64, now: u64) -> Option<Step> {
        let i = d(dir);
        if !self.queue_first(m, dir) && self.wait(dir, now).is_none() {
            self.state.account(dir, bytes);
            return None;
        }
        if let Some(member) = self.members.get_mut(m) {
            member.waiting[i] += 1;
        }
        Some(self.schedule(dir, now))
    }

    /// Member `m` starts the waiting request it was told to release, of
    /// `bytes`; the step says who goes next.
    pub fn start_waiting(&mut self, m: MemberId, dir: Direction, bytes: u64, now: u64) -> Step {
        let i = d(dir);
        self.releasing[i] = false;
        if let Some(member) = self.members.get_mut(m) {
            member.waiting[i] = member.waiting[i].saturating_sub(1);
        }
        self.state.account(dir, bytes);
        self.turn[i] = m;
        self.schedule(dir, now)
    }

    /// How long a request of `dir` must wait at `now` (None: not at all,
    /// as while a drain is under way).
    fn wait(&mut self, dir: Direction, now: u64) -> Option<u64> {
        if self.drains > 0 {
            return None;
        }
        self.state.wait(dir, now)
    }

    /// A drain begins: the limits are off until it ends, and the steps say
    /// which waiting request of each direction goes first (the others
    /// follow as each one starts). A request already sleeping on the
    /// timer goes when the timer fires.
    pub fn drain_begin(&mut self, now: u64) -> [Step; 2] {
        self.drains += 1;
        [
            self.schedule(Direction::Read, now),
            self.schedule(Direction::Write, now),
        ]
    }

    /// A drain ended; the limits hold again once none is under way.
    pub fn drain_end(&mut self) {
        self.drains = self.drains.saturating_sub(1);
    }

    /// The timer armed for `dir` fired at `now`.
    pub fn timer_fired(&mut self, dir: Direction, now: u64) -> Step {
        self.timer_armed[d(dir)] = false;
        self.schedule(dir, now)
    }

    /// The member after `from` (in turn) with requests of `dir` waiting.
    fn next_waiting(&self, dir: Direction, from: MemberId) -> Option<MemberId> {
        let n = self.members.len();
        let i = d(dir);
        (1..=n)
            .map(|k| (from + k) % n)
            .find(|&m| self.members[m].live && self.members[m].waiting[i] > 0)
    }

    /// Decides who goes next in `dir`, if anyone waits.
    fn schedule(&mut self, dir: Direction, now: u64) -> Step {
        let i = d(dir);
        if self.timer_armed[i] || self.releasing[i] {
            return Step::Idle;
        }
        // The turn moves on only when a request starts (start_waiting):
        // when the timer fires, the member it was armed for is still next.
        let Some(next) = self.next_waiting(dir, self.turn[i]) else {
            return Step::Idle;
        };
        match self.wait(dir, now) {
            None => {
                self.releasing[i] = true;
                Step::Release(next)
            }
            Some(ns) => {
                self.timer_armed[i] = true;
                Step::Arm {
                    member: next,
                    at: now + ns,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::throttle::config::{Bucket, Limit};

    const SEC: u64 = 1_000_000_000;

    fn iops(n: u64) -> Config {
        let mut c = Config::default();
        *c.limit_mut(Bucket::OpsTotal) = Limit {
            avg: n,
            ..Limit::default()
        };
        c
    }

    /// Drives members that always have requests waiting for `secs`
    /// simulated seconds; returns how many each started.
    fn run(members: usize, cfg: Config, secs: u64) -> Vec<u64> {
        let mut g = Group::new(cfg, 0);
        let ids: Vec<_> = (0..members).map(|_| g.join()).collect();
        let mut started = vec![0u64; members];
        let mut timer: Option<u64> = None;
        let mut release: Option<MemberId> = None;
        let mut now = 0;
        // Each member sends requests until one has to wait.
        for &m in &ids {
            loop {
                match enter(&mut g, m, now) {
                    None => started[m] += 1,
                    Some(step) => {
                        apply(step, &mut timer, &mut release);
                        break;
                    }
                }
            }
        }
        while now < secs * SEC {
            if let Some(m) = release.take() {
                started[m] += 1;
                // The member refills its queue right away: always busy.
                if let Some(step) = enter(&mut g, m, now) {
                    apply(step, &mut timer, &mut release);
                }
                let step = g.start_waiting(m, Direction::Write, 4096, now);
                apply(step, &mut timer, &mut release);
                continue;
            }
            let Some(at) = timer.take() else {
                panic!("stalled: nothing armed and nothing released");
            };
            now = at;
            let step = g.timer_fired(Direction::Write, now);
            apply(step, &mut timer, &mut release);
        }
        started
    }

    /// A write arriving as SharedGroup sends it: without the clock when
    /// it may, else with it.
    fn enter(g: &mut Group, m: MemberId, now: u64) -> Option<Step> {
        if g.admit_undrained(m, Direction::Write, 4096) {
            return None;
        }
        g.arrive(m, Direction::Write, 4096, now)
    }

    fn apply(step: Step, timer: &mut Option<u64>, release: &mut Option<MemberId>) {
        match step {
            Step::Idle => {}
            Step::Release(m) => *release = Some(m),
            Step::Arm { at, .. } => *timer = Some(at),
        }
    }

    /// A group of 1 IOPS whose one member started a read and has two
    /// more waiting, the first with the timer armed for it.
    fn one_started_two_waiting() -> (Group, MemberId) {
        let mut g = Group::new(iops(1), 0);
        let a = g.join();
        assert_eq!(g.arrive(a, Direction::Read, 1, 0), None);
        assert!(matches!(
            g.arrive(a, Direction::Read, 1, 0),
            Some(Step::Arm { .. })
        ));
        assert_eq!(g.arrive(a, Direction::Read, 1, 0), Some(Step::Idle));
        (g, a)
    }

    #[test]
    fn a_drain_lets_waiting_requests_go_one_after_the_other() {
        let (mut g, a) = one_started_two_waiting();
        // The timer is armed: the first goes when it fires, the next at
        // once after it.
        assert_eq!(g.drain_begin(0), [Step::Idle, Step::Idle]);
        assert_eq!(g.timer_fired(Direction::Read, 1), Step::Release(a));
        assert_eq!(g.start_waiting(a, Direction::Read, 1, 1), Step::Release(a));
        assert_eq!(g.start_waiting(a, Direction::Read, 1, 1), Step::Idle);
        // Nothing waits while the drain lasts; the limit holds after it.
        assert_eq!(g.arrive(a, Direction::Read, 1, 1), None);
        g.drain_end();
        assert!(g.arrive(a, Direction::Read, 1, 1).is_some());
    }

    #[test]
    fn a_lone_member_gets_the_whole_limit() {
        let n = run(1, iops(200), 5);
        assert!((995..=1025).contains(&n[0]), "{n:?}");
    }

    #[test]
    fn busy_members_share_fairly_and_the_sum_holds() {
        let n = run(3, iops(300), 10);
        let total: u64 = n.iter().sum();
        assert!((2990..=3050).contains(&total), "{n:?}");
        for x in &n {
            assert!((960..=1060).contains(x), "{n:?}");
        }
    }

    #[test]
    fn unlimited_group_lets_everything_through() {
        let mut g = Group::new(Config::default(), 0);
        let a = g.join();
        for _ in 0..100 {
            assert_eq!(g.arrive(a, Direction::Read, 1 << 20, 0), None);
        }
    }

    #[test]
    fn a_waiting_member_keeps_order_behind_its_queue() {
        let mut g = Group::new(iops(10), 0);
        let a = g.join();
        let b = g.join();
        // Slack of one operation, then a wait.
        assert_eq!(g.arrive(a, Direction::Read, 1, 0), None);
        assert_eq!(g.arrive(a, Direction::Read, 1, 0), None);
        let step = g.arrive(a, Direction::Read, 1, 0);
        assert!(matches!(step, Some(Step::Arm { member, .. }) if member == a));
        // Another member queues too; the timer is already armed.
        assert_eq!(g.arrive(b, Direction::Read, 1, 0), Some(Step::Idle));
        // Writes are counted in the total bucket as well, so they wait.
        assert!(g.arrive(b, Direction::Write, 1, 0).is_some());
        // When the timer fires, b's turn comes before a's second.
        let Step::Arm { at, .. } = step.unwrap_or(Step::Idle) else {
            unreachable!()
        };
        assert_eq!(g.timer_fired(Direction::Read, at), Step::Release(b));
        assert!(matches!(
            g.start_waiting(b, Direction::Read, 1, at),
            Step::Arm { member, .. } if member == a
        ));
    }

    #[test]
    fn members_slots_are_reused() {
        let mut g = Group::new(iops(1), 0);
        let a = g.join();
        let b = g.join();
        g.leave(a);
        assert!(!g.is_empty());
        assert_eq!(g.join(), a);
        g.leave(a);
        g.leave(b);
        assert!(g.is_empty());
    }

    #[test]
    fn new_limits_release_waiting_requests() {
        let (mut g, a) = one_started_two_waiting();
        let steps = g.reconfigure(Config::default(), 0);
        assert_eq!(steps, [Step::Release(a), Step::Idle]);
    }
}
