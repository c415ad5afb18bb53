//! I/O accounting of a BlockBackend (what query-blockstats shows for a
//! device). Each queue counts into its own block of counters, on its own
//! cache lines, written only by the thread that owns the queue; a query
//! adds the blocks up. Figures over intervals come from
//! [`super::timed_stats`].

use super::timed_stats::{self, Interval, Kind};
use crate::qapi::BlockDeviceStats;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// What a request was, for accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acct {
    Read,
    Write,
    Flush,
    /// Discards and write-zeroes requests that may unmap.
    Unmap,
}

#[derive(Default)]
struct Counters {
    bytes: AtomicU64,
    ops: AtomicU64,
    time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// Counts into one of a queue's own counters (written by one thread only).
fn add(c: &AtomicU64, v: u64) {
    c.fetch_add(v, Ordering::Relaxed);
}

/// How a device counts (the export's accounting options).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accounting {
    /// Whether invalid requests count for the idle time.
    pub account_invalid: bool,
    /// Whether failed requests count for latencies and the idle time.
    pub account_failed: bool,
    /// Lengths in seconds of the intervals timed statistics cover.
    pub intervals: Vec<u64>,
}

impl Default for Accounting {
    fn default() -> Self {
        Accounting {
            account_invalid: true,
            account_failed: true,
            intervals: Vec::new(),
        }
    }
}

/// The counters of one queue.
#[repr(align(128))]
#[derive(Default)]
pub struct QueueStats {
    read: Counters,
    write: Counters,
    flush: Counters,
    unmap: Counters,
    wr_highest_offset: AtomicU64,
    /// Nanoseconds since `epoch` of the last completed request, plus one
    /// (zero: none yet).
    last_done: AtomicU64,
    intervals: Vec<Interval>,
    skip_failed: bool,
    skip_invalid: bool,
}

/// When the counting started, for idle times.
pub struct StatsEpoch(Instant);

impl Default for StatsEpoch {
    fn default() -> Self {
        StatsEpoch(Instant::now())
    }
}

impl StatsEpoch {
    pub fn now_ns(&self) -> u64 {
        u64::try_from(self.0.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }
}

impl QueueStats {
    pub fn new(acct: &Accounting) -> Self {
        QueueStats {
            intervals: acct.intervals.iter().map(|s| Interval::new(*s)).collect(),
            skip_failed: !acct.account_failed,
            skip_invalid: !acct.account_invalid,
            ..QueueStats::default()
        }
    }

    fn counters(&self, kind: Acct) -> &Counters {
        match kind {
            Acct::Read => &self.read,
            Acct::Write => &self.write,
            Acct::Flush => &self.flush,
            Acct::Unmap => &self.unmap,
        }
    }

    /// A request finished: `ok` tells whether it succeeded; `end` is the
    /// end offset of a write.
    pub fn done(&self, kind: Acct, bytes: u64, ns: u64, ok: bool, end: u64, now_ns: u64) {
        let c = self.counters(kind);
        if ok {
            add(&c.ops, 1);
            add(&c.bytes, bytes);
            if kind == Acct::Write {
                self.wr_highest_offset.fetch_max(end, Ordering::Relaxed);
            }
        } else {
            add(&c.failed, 1);
            if self.skip_failed {
                return;
            }
        }
        add(&c.time_ns, ns);
        self.last_done
            .store(now_ns.saturating_add(1), Ordering::Relaxed);
        let timed = match kind {
            Acct::Read => Kind::Read,
            Acct::Write => Kind::Write,
            Acct::Flush => Kind::Flush,
            Acct::Unmap => return,
        };
        for i in &self.intervals {
            i.account(timed, ns, now_ns);
        }
    }

    /// A request was refused before reaching the node.
    pub fn invalid(&self, kind: Acct, now_ns: u64) {
        let c = self.counters(kind);
        add(&c.invalid, 1);
        if !self.skip_invalid {
            self.last_done
                .store(now_ns.saturating_add(1), Ordering::Relaxed);
        }
    }
}

fn i(v: &AtomicU64) -> i64 {
    i64::try_from(v.load(Ordering::Relaxed)).unwrap_or(i64::MAX)
}

/// The sum of a backend's queues, as QMP shows it.
pub fn sum<'a>(
    queues: impl IntoIterator<Item = &'a QueueStats> + Clone,
    epoch: &StatsEpoch,
) -> BlockDeviceStats {
    let first = queues.clone().into_iter().next();
    let mut s = BlockDeviceStats {
        account_invalid: first.is_none_or(|q| !q.skip_invalid),
        account_failed: first.is_none_or(|q| !q.skip_failed),
        ..BlockDeviceStats::default()
    };
    let now = epoch.now_ns();
    let intervals = first.map_or(0, |q| q.intervals.len());
    s.timed_stats = (0..intervals)
        .filter_map(|j| {
            let windows: Vec<&Interval> = queues
                .clone()
                .into_iter()
                .filter_map(|q| q.intervals.get(j))
                .collect();
            timed_stats::report(&windows, now)
        })
        .collect();
    let mut last = 0u64;
    for q in queues {
        s.rd_bytes += i(&q.read.bytes);
        s.rd_operations += i(&q.read.ops);
        s.rd_total_time_ns += i(&q.read.time_ns);
        s.failed_rd_operations += i(&q.read.failed);
        s.invalid_rd_operations += i(&q.read.invalid);
        s.wr_bytes += i(&q.write.bytes);
        s.wr_operations += i(&q.write.ops);
        s.wr_total_time_ns += i(&q.write.time_ns);
        s.failed_wr_operations += i(&q.write.failed);
        s.invalid_wr_operations += i(&q.write.invalid);
        s.flush_operations += i(&q.flush.ops);
        s.flush_total_time_ns += i(&q.flush.time_ns);
        s.failed_flush_operations += i(&q.flush.failed);
        s.invalid_flush_operations += i(&q.flush.invalid);
        s.unmap_bytes += i(&q.unmap.bytes);
        s.unmap_operations += i(&q.unmap.ops);
        s.unmap_total_time_ns += i(&q.unmap.time_ns);
        s.failed_unmap_operations += i(&q.unmap.failed);
        s.invalid_unmap_operations += i(&q.unmap.invalid);
        s.wr_highest_offset = s.wr_highest_offset.max(i(&q.wr_highest_offset));
        last = last.max(q.last_done.load(Ordering::Relaxed));
    }
    if last > 0 {
        let idle = epoch.now_ns().saturating_sub(last - 1);
        s.idle_time_ns = Some(i64::try_from(idle).unwrap_or(i64::MAX));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queues_add_up_and_failures_count_apart() {
        let epoch = StatsEpoch::default();
        let a = QueueStats::default();
        let b = QueueStats::default();
        a.done(Acct::Read, 4096, 100, true, 0, epoch.now_ns());
        b.done(Acct::Read, 512, 50, true, 0, epoch.now_ns());
        b.done(Acct::Write, 8192, 70, true, 1 << 20, epoch.now_ns());
        a.done(Acct::Write, 512, 10, false, 1 << 30, epoch.now_ns());
        a.invalid(Acct::Flush, epoch.now_ns());
        let s = sum([&a, &b], &epoch);
        assert_eq!(
            (s.rd_bytes, s.rd_operations, s.rd_total_time_ns),
            (4608, 2, 150)
        );
        assert_eq!(
            (s.wr_bytes, s.wr_operations, s.failed_wr_operations),
            (8192, 1, 1)
        );
        assert_eq!(s.wr_highest_offset, 1 << 20);
        assert_eq!(s.invalid_flush_operations, 1);
        assert!(s.idle_time_ns.is_some());
    }

    #[test]
    fn idle_time_is_absent_before_any_request() {
        let epoch = StatsEpoch::default();
        let s = sum([&QueueStats::default()], &epoch);
        assert_eq!(s.idle_time_ns, None);
    }
}
