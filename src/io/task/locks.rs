//! Locks over byte ranges that tasks wait for without blocking their
//! thread: a request that must not overlap another (an allocating write
//! and the requests to the same cluster, a copy-before-write and the write
//! it protects) takes its range, and overlapping takers wait until it is
//! given back, on whichever I/O thread they run.
//!
//! The table is shared between threads behind a mutex held only to look
//! at it; a waiting task leaves the tag that wakes it (see
//! [`super::current_waker`]) and tries again when woken.

use super::{current_waker, RemoteWake};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

struct Held {
    id: u64,
    start: u64,
    end: u64,
    /// Whether others may hold overlapping ranges shared too.
    shared: bool,
    waiters: Vec<RemoteWake>,
}

#[derive(Default)]
struct Table {
    held: Vec<Held>,
    next_id: u64,
}

/// The ranges held on one node (or one structure of it).
#[derive(Default, Clone)]
pub struct RangeLocks {
    table: Arc<Mutex<Table>>,
}

/// A range held; dropping it gives the range back and wakes its waiters.
pub struct RangeGuard {
    table: Arc<Mutex<Table>>,
    id: u64,
}

/// The future of [`RangeLocks::lock`].
pub struct Locking {
    table: Arc<Mutex<Table>>,
    start: u64,
    end: u64,
    shared: bool,
}

impl RangeLocks {
    /// Takes `[start, end)` for this request alone, waiting while any
    /// overlapping range is held.
    pub fn lock(&self, start: u64, end: u64) -> Locking {
        self.take(start, end, false)
    }

    /// Takes `[start, end)` shared: only exclusive holders of an
    /// overlapping range make it wait.
    pub fn lock_shared(&self, start: u64, end: u64) -> Locking {
        self.take(start, end, true)
    }

    fn take(&self, start: u64, end: u64, shared: bool) -> Locking {
        Locking {
            table: self.table.clone(),
            start,
            end: end.max(start.saturating_add(1)),
            shared,
        }
    }

    /// Takes the range if it is free now, without waiting (for code that
    /// runs outside a task).
    pub fn try_lock(&self, start: u64, end: u64) -> Option<RangeGuard> {
        let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
        let end = end.max(start.saturating_add(1));
        if t.held.iter().any(|h| h.start < end && start < h.end) {
            return None;
        }
        Some(insert(&self.table, &mut t, start, end, false))
    }

    /// Ranges held now.
    pub fn held(&self) -> usize {
        self.table
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .held
            .len()
    }
}

fn insert(
    table: &Arc<Mutex<Table>>,
    t: &mut Table,
    start: u64,
    end: u64,
    shared: bool,
) -> RangeGuard {
    t.next_id += 1;
    let id = t.next_id;
    t.held.push(Held {
        id,
        start,
        end,
        shared,
        waiters: Vec::new(),
    });
    RangeGuard {
        table: table.clone(),
        id,
    }
}

impl Future for Locking {
    type Output = Result<RangeGuard, i32>;

    fn poll(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &*self;
        let mut t = this.table.lock().unwrap_or_else(PoisonError::into_inner);
        let blocker = t
            .held
            .iter_mut()
            .find(|h| h.start < this.end && this.start < h.end && !(h.shared && this.shared));
        match blocker {
            None => Poll::Ready(Ok(insert(
                &this.table,
                &mut t,
                this.start,
                this.end,
                this.shared,
            ))),
            Some(h) => match current_waker() {
                Some(w) => {
                    h.waiters.push(w);
                    Poll::Pending
                }
                // Outside a task nobody could wake the caller.
                None => Poll::Ready(Err(-libc::EDEADLK)),
            },
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let waiters = {
            let mut t = self.table.lock().unwrap_or_else(PoisonError::into_inner);
            match t.held.iter().position(|h| h.id == self.id) {
                Some(i) => t.held.swap_remove(i).waiters,
                None => Vec::new(),
            }
        };
        for w in waiters {
            w.wake();
        }
    }
}
