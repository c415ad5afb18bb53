//! Counting finished requests into a queue's statistics.
//!
//! A request's start time is one clock reading shared by the requests the
//! transport took in the same round (they are microseconds apart, and a
//! reading per request cost as much as parsing one). Finished requests
//! wait in a list until the transport has told the guest about them; they
//! are then counted with one more reading, which overlaps with the
//! guest's own work instead of delaying each completion.

use crate::block::io::IoKind;
use crate::block::stats::{Acct, QueueStats, StatsEpoch};

/// What to account a request of `kind` as.
#[inline]
pub(super) fn acct_of(kind: IoKind) -> Acct {
    match kind {
        IoKind::Read => Acct::Read,
        IoKind::Write => Acct::Write,
        IoKind::Flush => Acct::Flush,
        IoKind::Discard | IoKind::WriteZeroes { .. } => Acct::Unmap,
    }
}

/// A finished request's accounting, kept until it is counted.
pub(super) struct Finished {
    pub(super) kind: Acct,
    pub(super) bytes: u64,
    pub(super) started_ns: u64,
    pub(super) ok: bool,
    /// Where a write ended (the highest written offset).
    pub(super) end: u64,
}

/// Counts `finished` into `stats` with one clock reading, and empties it.
pub(super) fn count(stats: Option<&QueueStats>, epoch: &StatsEpoch, finished: &mut Vec<Finished>) {
    if finished.is_empty() {
        return;
    }
    let Some(stats) = stats else {
        finished.clear();
        return;
    };
    let now = epoch.now_ns();
    for f in finished.drain(..) {
        let ns = now.saturating_sub(f.started_ns);
        stats.done(f.kind, f.bytes, ns, f.ok, f.end, now);
    }
}
