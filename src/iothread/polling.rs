//! How long an I/O thread busy-polls for work before it goes to sleep.
//!
//! Polling is either fixed (the export's `poll-us`: the same time before
//! every sleep) or adaptive, which is the default and what an iothread's
//! `poll-max-ns`, `poll-grow` and `poll-shrink` control, with QEMU's
//! meaning. Adaptive polling looks at how long the thread waited for the
//! event that ended its idle spell, polling included:
//!
//! * no longer than it polls now: polling caught the event, nothing
//!   changes;
//! * longer than the ceiling (`poll-max-ns`): no polling within the limit
//!   would have caught it, so the time is divided by `poll-shrink`, or
//!   dropped to nothing when that is 0;
//! * in between: a little more polling would have caught it, so the time
//!   grows, from nothing to 4 µs and then by the factor `poll-grow` (2 when
//!   0), never above the ceiling.
//!
//! A ceiling of 0 turns polling off. Like QEMU's event loops since 10.0,
//! which keep a time per event source, a thread keeps one time per kind of
//! event — requests showing up in its rings, and completions of the I/O
//! engine — adjusts only those that ended the wait, and polls for the
//! longer of the two. A thread waiting for a slow device therefore still
//! polls for a guest that sends the next request right after a completion,
//! while the device's completions alone would have talked it out of it.
//!
//! One thing QEMU's rule cannot see: polling only pays when whoever sends
//! the next request runs on another CPU. A driver that busy-polls for its
//! completions on the thread's own CPU (a loaded host puts them there)
//! cannot send anything while the thread spins, so every polling time runs
//! out and the request comes right after the thread goes to sleep — a wait
//! just above the polling time, which the rule answers by polling longer.
//! The time then climbs from 4 µs to the ceiling, drops, and climbs again,
//! and each spin is taken out of the driver's share of the CPU. A driver
//! that sleeps on the same CPU fares no better: its wake-up has to wait
//! for the spin to end, or interrupts it (then polling does catch the
//! request, but only because the driver ran in the middle of it). So the
//! thread counts strikes: a polling time that ran out before a wake-up
//! within the ceiling, and a poll during which the thread was kept off its
//! CPU for a moment. After [`FUTILE_LIMIT`] strikes with no clean catch in
//! between the thread stops polling for the next [`REST_WAITS`] waits,
//! then starts over. A clean catch now and then (a driver on another CPU)
//! keeps it polling through the odd timer interrupt or missed request.
//!
//! The rule is kept apart from the clock: the thread measures, this module
//! only decides, so that the tests can feed it waits of their choosing.

/// QEMU's default ceiling for an iothread's polling, which vubd also uses
/// for the threads it creates for exports on their own.
pub const DEFAULT_POLL_MAX_NS: u64 = 32_768;
/// Where adaptive polling starts when it grows from nothing.
const FIRST_POLL_NS: u64 = 4_000;
/// The growth factor a `poll-grow` of 0 stands for.
const DEFAULT_GROW: u64 = 2;
/// Strikes against polling (see the module documentation) with no clean
/// catch in between after which a thread rests.
pub const FUTILE_LIMIT: u32 = 8;
/// Waits a resting thread sleeps through without polling.
pub const REST_WAITS: u32 = 4096;

/// The parameters of adaptive polling, as an iothread object takes them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Adaptive {
    /// Ceiling of the polling time in nanoseconds; 0 turns polling off.
    pub max_ns: u64,
    /// Factor to grow by; 0 means 2.
    pub grow: u64,
    /// Divisor to shrink by; 0 means dropping to nothing at once.
    pub shrink: u64,
}

impl Adaptive {
    /// The polling time after a wait of `block_ns` with `ns` in force.
    pub fn adjust(&self, ns: u64, block_ns: u64) -> u64 {
        if block_ns <= ns {
            ns
        } else if block_ns > self.max_ns {
            match self.shrink {
                0 => 0,
                by => ns / by,
            }
        } else if ns < self.max_ns && block_ns < self.max_ns {
            let grown = match (ns, self.grow) {
                (0, _) => FIRST_POLL_NS,
                (ns, 0) => ns.saturating_mul(DEFAULT_GROW),
                (ns, by) => ns.saturating_mul(by),
            };
            grown.min(self.max_ns)
        } else {
            ns
        }
    }
}

/// How a thread polls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PollPolicy {
    /// The same time before every sleep, in nanoseconds (0: never poll).
    Fixed(u64),
    /// A time that follows the waits (see the module documentation).
    Adaptive(Adaptive),
}

impl PollPolicy {
    /// QEMU's iothread default: adaptive up to 32768 ns.
    pub const DEFAULT: PollPolicy = PollPolicy::Adaptive(Adaptive {
        max_ns: DEFAULT_POLL_MAX_NS,
        grow: 0,
        shrink: 0,
    });

    /// The polling of a thread serving an export alone: fixed when the
    /// export sets `poll-us`, else the default.
    pub fn for_export(poll_us: Option<u32>) -> PollPolicy {
        match poll_us {
            Some(us) => PollPolicy::Fixed(u64::from(us) * 1000),
            None => PollPolicy::DEFAULT,
        }
    }
}

/// Which kinds of events ended a wait.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fired {
    /// A ring had new requests (found by polling, or a kick).
    pub requests: bool,
    /// The I/O engine had completions.
    pub completions: bool,
}

impl Fired {
    pub const REQUESTS: Fired = Fired {
        requests: true,
        completions: false,
    };
    pub const COMPLETIONS: Fired = Fired {
        requests: false,
        completions: true,
    };

    pub fn any(self) -> bool {
        self.requests || self.completions
    }
}

/// How a wait ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ended {
    /// Polling found work.
    Polling,
    /// The last look before sleeping found work (polling, if any, had run
    /// out).
    LastLook,
    /// The thread slept until an event woke it.
    Wakeup,
}

/// The polling state of one thread.
#[derive(Clone, Debug)]
pub struct PollTime {
    policy: PollPolicy,
    /// Adaptive times per kind of event, in nanoseconds.
    requests_ns: u64,
    completions_ns: u64,
    /// Strikes against polling since its last clean catch (see the module
    /// documentation).
    futile: u32,
    /// Waits left before polling again; 0 when not resting.
    resting: u32,
}

impl PollTime {
    pub fn new(policy: PollPolicy) -> Self {
        PollTime {
            policy,
            requests_ns: 0,
            completions_ns: 0,
            futile: 0,
            resting: 0,
        }
    }

    /// Whether the time follows the waits (the thread must then measure
    /// them).
    pub fn adapts(&self) -> bool {
        matches!(self.policy, PollPolicy::Adaptive(a) if a.max_ns > 0)
    }

    /// How long to poll before the next sleep, in nanoseconds.
    pub fn ns(&self) -> u64 {
        match self.policy {
            PollPolicy::Fixed(ns) => ns,
            PollPolicy::Adaptive(_) => self.requests_ns.max(self.completions_ns),
        }
    }

    /// The thread waited `block_ns` (polling included) before the events
    /// in `fired` ended the wait, as `ended` says; `interrupted`: while it
    /// polled, the thread was kept off its CPU for a moment.
    pub fn observe(&mut self, block_ns: u64, fired: Fired, ended: Ended, interrupted: bool) {
        let PollPolicy::Adaptive(rule) = self.policy else {
            return;
        };
        if !fired.any() {
            return;
        }
        if self.resting > 0 {
            self.resting -= 1;
            return;
        }
        let ran_out = ended == Ended::Wakeup && self.ns() > 0 && block_ns <= rule.max_ns;
        if interrupted || ran_out {
            self.futile += 1;
            if self.futile >= FUTILE_LIMIT {
                self.rest();
                return;
            }
        } else if ended == Ended::Polling {
            self.futile = 0;
        }
        if fired.requests {
            self.requests_ns = rule.adjust(self.requests_ns, block_ns);
        }
        if fired.completions {
            self.completions_ns = rule.adjust(self.completions_ns, block_ns);
        }
    }

    fn rest(&mut self) {
        self.futile = 0;
        self.resting = REST_WAITS;
        self.requests_ns = 0;
        self.completions_ns = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const QEMU: Adaptive = Adaptive {
        max_ns: DEFAULT_POLL_MAX_NS,
        grow: 0,
        shrink: 0,
    };

    /// Feeds `waits` to a fresh rule and returns the time after each.
    fn walk(rule: Adaptive, waits: &[u64]) -> Vec<u64> {
        let mut ns = 0;
        waits
            .iter()
            .map(|&w| {
                ns = rule.adjust(ns, w);
                ns
            })
            .collect()
    }

    #[test]
    fn short_waits_grow_from_4us_doubling_up_to_the_ceiling() {
        assert_eq!(
            walk(QEMU, &[100, 100, 100, 100, 100, 100]),
            [4_000, 4_000, 4_000, 4_000, 4_000, 4_000],
            "a wait within the polling time changes nothing"
        );
        assert_eq!(
            walk(QEMU, &[5_000, 5_000, 9_000, 17_000, 30_000, 32_500, 30_000]),
            [4_000, 8_000, 16_000, 32_000, 32_000, 32_768, 32_768]
        );
    }

    #[test]
    fn a_wait_beyond_the_ceiling_drops_polling_or_divides_it() {
        assert_eq!(
            walk(QEMU, &[20_000, 20_000, 20_000, 40_000]),
            [4_000, 8_000, 16_000, 0]
        );
        let halving = Adaptive { shrink: 2, ..QEMU };
        assert_eq!(
            walk(halving, &[20_000, 20_000, 20_000, 40_000, 1_000_000]),
            [4_000, 8_000, 16_000, 8_000, 4_000]
        );
        // Exactly the ceiling neither grows nor shrinks.
        assert_eq!(QEMU.adjust(8_000, DEFAULT_POLL_MAX_NS), 8_000);
    }

    #[test]
    fn grow_factor_and_small_ceilings() {
        let by4 = Adaptive { grow: 4, ..QEMU };
        assert_eq!(walk(by4, &[5_000, 5_000, 30_000]), [4_000, 16_000, 32_768]);
        // A ceiling under 4 µs caps the first step.
        let tiny = Adaptive {
            max_ns: 1_000,
            ..QEMU
        };
        assert_eq!(walk(tiny, &[500, 900, 1_001]), [1_000, 1_000, 0]);
        // Off: nothing ever grows.
        let off = Adaptive { max_ns: 0, ..QEMU };
        assert_eq!(walk(off, &[0, 1, 100]), [0, 0, 0]);
        // Huge values do not overflow.
        let big = Adaptive {
            max_ns: u64::MAX,
            grow: u64::MAX,
            shrink: 0,
        };
        assert_eq!(big.adjust(4_000, 5_000), u64::MAX);
    }

    #[test]
    fn a_thread_polls_for_the_longer_of_its_two_times() {
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        assert!(t.adapts());
        assert_eq!(t.ns(), 0);
        // Requests arrive 3 µs after the thread runs out of work.
        for _ in 0..5 {
            t.observe(3_000, Fired::REQUESTS, Ended::Polling, false);
        }
        assert_eq!(t.ns(), 4_000);
        for w in [5_000, 9_000, 17_000, 20_000] {
            t.observe(w, Fired::REQUESTS, Ended::Wakeup, false);
        }
        assert_eq!(t.ns(), 32_000);
        // A slow device's completions do not talk it out of polling for
        // the next request.
        t.observe(200_000, Fired::COMPLETIONS, Ended::Wakeup, false);
        assert_eq!(t.ns(), 32_000);
        // A guest that goes quiet does.
        t.observe(5_000_000, Fired::REQUESTS, Ended::Wakeup, false);
        assert_eq!(t.ns(), 0);
        // Waits that nothing ended (timeouts, control messages) count
        // for nothing.
        t.observe(1_000, Fired::default(), Ended::Wakeup, false);
        assert_eq!(t.ns(), 0);
    }

    /// A driver on the thread's own CPU: it sends its request only once
    /// the thread stops polling and sleeps, 1 µs later.
    fn colocated_wait(t: &PollTime) -> u64 {
        t.ns() + 1_000
    }

    #[test]
    fn polling_that_never_catches_anything_rests() {
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        let mut polled = Vec::new();
        for _ in 0..20 {
            polled.push(t.ns());
            t.observe(colocated_wait(&t), Fired::REQUESTS, Ended::Wakeup, false);
        }
        // QEMU's rule alone would cycle 0, 4, 8, 16, 32 µs for ever; the
        // eighth time that ran out in vain (the third 8 µs) ends it.
        assert_eq!(
            &polled[..13],
            [0, 4_000, 8_000, 16_000, 32_000, 0, 4_000, 8_000, 16_000, 32_000, 0, 4_000, 8_000]
        );
        assert!(polled[13..].iter().all(|&ns| ns == 0), "{polled:?}");
        // It sits the rest out (7 waits of it are gone), then tries again.
        for _ in 0..REST_WAITS - 7 {
            assert_eq!(t.ns(), 0);
            t.observe(2_000, Fired::REQUESTS, Ended::Wakeup, false);
        }
        t.observe(2_000, Fired::REQUESTS, Ended::Wakeup, false);
        assert_eq!(t.ns(), 4_000);
    }

    #[test]
    fn polling_that_catches_now_and_then_goes_on() {
        // A driver on another CPU sending every 20 µs: the time grows past
        // it, with a miss or three on the way, and polling catches the rest.
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        for _ in 0..10_000 {
            if t.ns() >= 20_000 {
                t.observe(20_000, Fired::REQUESTS, Ended::Polling, false);
            } else {
                t.observe(20_000 + 2_000, Fired::REQUESTS, Ended::Wakeup, false);
            }
        }
        assert_eq!(t.ns(), 32_000);
        // Misses spread among catches never add up to a rest.
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        for i in 0..10_000 {
            let ended = if i % 7 == 6 {
                Ended::Polling
            } else {
                Ended::Wakeup
            };
            t.observe(10_000, Fired::REQUESTS, ended, false);
            assert!(i < 3 || t.ns() > 0, "rested at {i}");
        }
    }

    #[test]
    fn catches_the_driver_interrupted_count_against_polling() {
        // A sleeping driver on the thread's CPU: it wakes in the middle of
        // the spin, sends, sleeps, and the spin "catches" its request.
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        t.observe(3_000, Fired::REQUESTS, Ended::Wakeup, false);
        for _ in 0..FUTILE_LIMIT - 1 {
            t.observe(3_000, Fired::REQUESTS, Ended::Polling, true);
            assert_eq!(t.ns(), 4_000);
        }
        t.observe(3_000, Fired::REQUESTS, Ended::Polling, true);
        assert_eq!(t.ns(), 0);
        // An interruption now and then (a timer tick) does no harm.
        let mut t = PollTime::new(PollPolicy::DEFAULT);
        for i in 0..10_000 {
            t.observe(3_000, Fired::REQUESTS, Ended::Polling, i % 50 == 0);
        }
        assert_eq!(t.ns(), 4_000);
    }

    #[test]
    fn a_fixed_time_is_kept_whatever_happens() {
        let mut f = PollTime::new(PollPolicy::Fixed(20_000));
        for _ in 0..100 {
            f.observe(25_000, Fired::REQUESTS, Ended::Wakeup, true);
        }
        assert_eq!(f.ns(), 20_000);
    }

    #[test]
    fn fixed_and_export_policies() {
        let mut t = PollTime::new(PollPolicy::Fixed(50_000));
        assert!(!t.adapts());
        t.observe(1_000_000, Fired::REQUESTS, Ended::Wakeup, false);
        assert_eq!(t.ns(), 50_000);
        assert_eq!(PollPolicy::for_export(Some(0)), PollPolicy::Fixed(0));
        assert_eq!(PollPolicy::for_export(Some(32)), PollPolicy::Fixed(32_000));
        assert_eq!(PollPolicy::for_export(None), PollPolicy::DEFAULT);
        let off = PollTime::new(PollPolicy::Adaptive(Adaptive {
            max_ns: 0,
            grow: 0,
            shrink: 0,
        }));
        assert!(!off.adapts());
        assert_eq!(off.ns(), 0);
    }
}
