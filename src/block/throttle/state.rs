//! The moving part of a throttle: how full each bucket is. Every request
//! adds its size (or its operation count) to the buckets of its
//! direction; buckets drain at their average rate (and a second level at
//! the burst rate, when bursts may last more than a second). A request
//! may start when none of its buckets is over its size; otherwise the
//! answer is how long until the fullest one has drained enough.
//!
//! Time is passed in (nanoseconds on any monotonic clock), so the
//! arithmetic is tested without sleeping.
//!
//! Draining only lowers a level, so a request whose buckets are within
//! their sizes before draining may start without the clock being read
//! ([`State::admits_undrained`]); the drain is then done in one step the
//! next time the clock is read. Its only effect is on a level that would
//! have reached zero in between: the requests counted meanwhile drain with
//! it, which lets through at most one bucket's worth more after a quiet
//! spell. A throttle whose limits are not reached reads no clock at all.

use super::config::{Bucket, Config, Direction, BUCKETS};

const NS_PER_SEC: f64 = 1e9;
/// A lease is at most this fraction of a bucket's size.
pub const LEASE_SHARE: f64 = 16.0;

/// Levels of the six buckets under one configuration.
#[derive(Debug, Clone)]
pub struct State {
    cfg: Config,
    level: [f64; BUCKETS],
    burst_level: [f64; BUCKETS],
    last_leak: u64,
}

impl State {
    /// A throttle with empty buckets, as of `now`.
    pub fn new(cfg: Config, now: u64) -> Self {
        State {
            cfg,
            level: [0.0; BUCKETS],
            burst_level: [0.0; BUCKETS],
            last_leak: now,
        }
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Replaces the limits; the buckets start empty again (as QEMU does
    /// when limits change).
    pub fn reconfigure(&mut self, cfg: Config, now: u64) {
        *self = State::new(cfg, now);
    }

    /// Drains every bucket for the time since the last call.
    fn leak(&mut self, now: u64) {
        let delta = now.saturating_sub(self.last_leak);
        // A clock read on another thread may be a little behind: never
        // move backwards, and never leak for negative time.
        self.last_leak = self.last_leak.max(now);
        if delta == 0 {
            return;
        }
        let secs = delta as f64 / NS_PER_SEC;
        for (i, l) in self.cfg.limits.iter().enumerate() {
            self.level[i] = (self.level[i] - l.avg as f64 * secs).max(0.0);
            if l.burst_length > 1 {
                self.burst_level[i] = (self.burst_level[i] - l.max as f64 * secs).max(0.0);
            }
        }
    }

    /// Nanoseconds until one bucket lets a request through (0: now).
    fn bucket_wait(&self, b: Bucket) -> u64 {
        let l = self.cfg.limit(b);
        if l.avg == 0 {
            return 0;
        }
        let i = b as usize;
        // Without a burst rate a bucket still holds a tenth of a second
        // of its average, so a guest's short bursts are not cut into
        // single requests. With one, it holds the whole burst, and the
        // burst level keeps the rate within it to `max`.
        let (size, burst_size) = if l.max == 0 {
            (l.avg as f64 / 10.0, 0.0)
        } else {
            (l.max as f64 * l.burst_length as f64, l.max as f64 / 10.0)
        };
        let over = self.level[i] - size;
        if over > 0.0 {
            return (over * NS_PER_SEC / l.avg as f64) as u64;
        }
        if l.burst_length > 1 {
            let over = self.burst_level[i] - burst_size;
            if over > 0.0 {
                return (over * NS_PER_SEC / l.max as f64) as u64;
            }
        }
        0
    }

    /// How long a request of `dir` must wait from `now` before it may
    /// start: `None` when it may start at once.
    /// Whether a request of `dir` may start by the levels as they are,
    /// before draining (which can only lower them): then it starts without
    /// the clock being read.
    pub fn admits_undrained(&self, dir: Direction) -> bool {
        dir.buckets().iter().all(|b| self.bucket_wait(*b) == 0)
    }

    /// Counts `ops` operations and `bytes` bytes of `dir` ahead of the
    /// requests that will use them (a lease, see `shared`), if every
    /// limited bucket of the direction has room for them undrained and
    /// they are at most 1/[`LEASE_SHARE`] of its size. Returns how much was
    /// counted (each kind capped that way; infinite for a kind no bucket
    /// limits), or None when a lease is not worth it.
    pub fn reserve(&mut self, dir: Direction, ops: f64, bytes: f64) -> Option<(f64, f64)> {
        let (mut ops, mut bytes) = (ops, bytes);
        let (mut ops_limited, mut bytes_limited) = (false, false);
        for b in dir.buckets() {
            let l = self.cfg.limit(b);
            if l.avg == 0 {
                continue;
            }
            let i = b as usize;
            let (size, burst_size) = if l.max == 0 {
                (l.avg as f64 / 10.0, f64::INFINITY)
            } else {
                (l.max as f64 * l.burst_length as f64, l.max as f64 / 10.0)
            };
            let mut room = (size / LEASE_SHARE).min(size - self.level[i]);
            if l.burst_length > 1 {
                room = room
                    .min(burst_size / LEASE_SHARE)
                    .min(burst_size - self.burst_level[i]);
            }
            if b.counts_bytes() {
                bytes = bytes.min(room);
                bytes_limited = true;
            } else {
                ops = ops.min(room);
                ops_limited = true;
            }
        }
        if (ops_limited && ops < 1.0) || (bytes_limited && bytes < 512.0) {
            return None;
        }
        self.add(dir, ops, bytes);
        Some((
            if ops_limited { ops } else { f64::INFINITY },
            if bytes_limited { bytes } else { f64::INFINITY },
        ))
    }

    /// Takes back what a lease did not use.
    pub fn refund(&mut self, dir: Direction, ops: f64, bytes: f64) {
        for b in dir.buckets() {
            let i = b as usize;
            let units = if b.counts_bytes() { bytes } else { ops };
            if !units.is_finite() {
                continue;
            }
            self.level[i] = (self.level[i] - units).max(0.0);
            if self.cfg.limits[i].burst_length > 1 {
                self.burst_level[i] = (self.burst_level[i] - units).max(0.0);
            }
        }
    }

    /// The operations a request of `bytes` counts for.
    pub fn ops_of(&self, bytes: u64) -> f64 {
        let iops_size = self.cfg.iops_size;
        if iops_size > 0 && bytes > iops_size {
            bytes as f64 / iops_size as f64
        } else {
            1.0
        }
    }

    pub fn wait(&mut self, dir: Direction, now: u64) -> Option<u64> {
        self.leak(now);
        let wait = dir
            .buckets()
            .iter()
            .map(|b| self.bucket_wait(*b))
            .max()
            .unwrap_or(0);
        (wait > 0).then_some(wait)
    }

    /// Counts a request of `bytes` that starts now.
    pub fn account(&mut self, dir: Direction, bytes: u64) {
        self.add(dir, self.ops_of(bytes), bytes as f64);
    }

    fn add(&mut self, dir: Direction, ops: f64, bytes: f64) {
        for b in dir.buckets() {
            let i = b as usize;
            let units = if b.counts_bytes() { bytes } else { ops };
            self.level[i] += units;
            if self.cfg.limits[i].burst_length > 1 {
                self.burst_level[i] += units;
            }
        }
    }

    /// The level of a bucket (for tests and statistics).
    pub fn level(&self, b: Bucket) -> f64 {
        self.level[b as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::throttle::config::Limit;

    const SEC: u64 = 1_000_000_000;

    fn config(b: Bucket, avg: u64, max: u64, burst_length: u64) -> Config {
        let mut c = Config::default();
        *c.limit_mut(b) = Limit {
            avg,
            max,
            burst_length,
        };
        c
    }

    /// Runs requests back to back (each starting as soon as allowed) for
    /// `secs` simulated seconds; returns how many started.
    fn saturate(st: &mut State, dir: Direction, bytes: u64, secs: u64) -> u64 {
        let end = secs * SEC;
        let mut now = 0;
        let mut started = 0;
        loop {
            if let Some(w) = st.wait(dir, now) {
                now += w.max(1);
                continue;
            }
            if now >= end {
                return started;
            }
            st.account(dir, bytes);
            started += 1;
        }
    }

    #[test]
    fn undrained_admission_gives_at_most_one_bucket_more_after_a_pause() {
        // 100 IOPS (a bucket of 10): busy for a second, quiet for ten,
        // then busy for ten, admitting without the clock where it may.
        let mut st = State::new(config(Bucket::OpsTotal, 100, 0, 1), 0);
        let mut started = 0u64;
        for (from, to) in [(0, SEC), (11 * SEC, 21 * SEC)] {
            let mut now = from;
            while now < to {
                if st.admits_undrained(Direction::Read) {
                    st.account(Direction::Read, 4096);
                    started += 1;
                    continue;
                }
                match st.wait(Direction::Read, now) {
                    Some(w) => now += w.max(1),
                    None => {
                        st.account(Direction::Read, 4096);
                        started += 1;
                    }
                }
            }
        }
        // Exact: 100 a second plus a bucket at each start; undrained
        // admission may add one more bucket after the pause.
        assert!((1100..=1100 + 3 * 11).contains(&started), "{started}");
    }

    #[test]
    fn leases_keep_the_rate_and_stay_small() {
        // 10000 IOPS: a bucket of 1000, leases of at most 62.5 operations.
        let mut st = State::new(config(Bucket::OpsTotal, 10_000, 0, 1), 0);
        let (mut ops, mut bytes) = (0.0, 0.0);
        let (mut started, mut leases) = (0u64, 0u64);
        let mut now = 0;
        while now < SEC {
            if ops >= 1.0 {
                ops -= 1.0;
                started += 1;
                continue;
            }
            st.refund(Direction::Write, ops, bytes);
            (ops, bytes) = (0.0, 0.0);
            if st.admits_undrained(Direction::Write) {
                st.account(Direction::Write, 4096);
                started += 1;
                if let Some((o, b)) = st.reserve(Direction::Write, 64.0, 8e6) {
                    assert!(o <= 62.5 && b.is_infinite(), "{o} {b}");
                    (ops, bytes) = (o, b);
                    leases += 1;
                }
                continue;
            }
            match st.wait(Direction::Write, now) {
                Some(w) => now += w.max(1),
                None => {
                    st.account(Direction::Write, 4096);
                    started += 1;
                }
            }
        }
        assert!(leases > 0);
        assert!((10_000..=11_070).contains(&started), "{started}");
        // Near the limit no lease is granted: 10 IOPS, a bucket of 1.
        let mut st = State::new(config(Bucket::OpsTotal, 10, 0, 1), 0);
        assert_eq!(st.reserve(Direction::Read, 64.0, 8e6), None);
    }

    #[test]
    fn unlimited_never_waits() {
        let mut st = State::new(Config::default(), 0);
        for _ in 0..1000 {
            assert_eq!(st.wait(Direction::Write, 0), None);
            st.account(Direction::Write, 1 << 20);
        }
    }

    #[test]
    fn iops_limit_holds_over_time() {
        let mut st = State::new(config(Bucket::OpsTotal, 100, 0, 1), 0);
        let n = saturate(&mut st, Direction::Read, 4096, 10);
        // 100/s for 10 s, plus the bucket's slack of a tenth of a second.
        assert!((1000..=1012).contains(&n), "{n}");
    }

    #[test]
    fn bps_limit_counts_bytes() {
        let mut st = State::new(config(Bucket::BpsWrite, 1 << 20, 0, 1), 0);
        let n = saturate(&mut st, Direction::Write, 64 << 10, 10);
        // 16 requests of 64 KiB per second.
        assert!((160..=163).contains(&n), "{n}");
        // Reads are not limited by a write bucket.
        assert_eq!(st.wait(Direction::Read, 10 * SEC), None);
    }

    #[test]
    fn a_full_bucket_waits_exactly_for_its_overflow() {
        let mut st = State::new(config(Bucket::OpsTotal, 10, 0, 1), 0);
        // Slack is 1 op (10/10); two requests make it 1 over.
        st.account(Direction::Read, 512);
        st.account(Direction::Read, 512);
        assert_eq!(st.wait(Direction::Write, 0), Some(SEC / 10));
        assert_eq!(st.wait(Direction::Write, SEC / 10), None);
    }

    #[test]
    fn burst_runs_at_max_for_its_length_then_falls_to_avg() {
        // 100 iops, bursts of 1000 iops for 2 s.
        let mut st = State::new(config(Bucket::OpsTotal, 100, 1000, 2), 0);
        let first = saturate(&mut st, Direction::Read, 512, 1);
        // During the first second the burst rate applies.
        assert!((1000..=1200).contains(&first), "{first}");
        let mut st = State::new(config(Bucket::OpsTotal, 100, 1000, 2), 0);
        let total = saturate(&mut st, Direction::Read, 512, 12);
        // The whole burst (2000 plus what leaked meanwhile) and then 100/s.
        assert!((2000 + 1000..=2000 + 1300).contains(&total), "{total}");
    }

    #[test]
    fn iops_size_counts_large_requests_as_several() {
        let mut c = config(Bucket::OpsTotal, 10, 0, 1);
        c.iops_size = 4096;
        let mut st = State::new(c, 0);
        st.account(Direction::Write, 16384);
        assert_eq!(st.level(Bucket::OpsTotal), 4.0);
        st.account(Direction::Write, 512);
        assert_eq!(st.level(Bucket::OpsTotal), 5.0);
    }

    #[test]
    fn a_clock_behind_does_not_refill() {
        let mut st = State::new(config(Bucket::OpsTotal, 10, 0, 1), SEC);
        st.account(Direction::Read, 1);
        st.account(Direction::Read, 1);
        let w = st.wait(Direction::Read, SEC);
        assert_eq!(st.wait(Direction::Read, SEC / 2), w);
    }

    #[test]
    fn reconfiguring_empties_the_buckets() {
        let mut st = State::new(config(Bucket::OpsTotal, 1, 0, 1), 0);
        st.account(Direction::Read, 1);
        st.account(Direction::Read, 1);
        assert!(st.wait(Direction::Read, 0).is_some());
        st.reconfigure(config(Bucket::OpsTotal, 1, 0, 1), 0);
        assert_eq!(st.wait(Direction::Read, 0), None);
    }
}
