//! Work other threads do for an I/O thread: completions of operations
//! another thread carried out on its behalf, and requests to take over such
//! work. Posting writes the thread's wake-up eventfd, so a sleeping owner
//! wakes; reading needs no system call until something was posted.

use super::Completion;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::EventFd;

/// Work a thread can be asked to take over (see [`Mailbox::nudge`]).
pub trait Serve: Send + Sync {
    fn serve(&self);
}

pub struct Mailbox {
    done: Mutex<Vec<Completion>>,
    nudges: Mutex<Vec<Arc<dyn Serve>>>,
    /// Something was posted since the owner last took it (may be set
    /// spuriously, never missed).
    ready: AtomicBool,
    /// Operations of this thread's that another thread has taken on.
    pending: AtomicUsize,
    wake: EventFd,
}

impl Mailbox {
    pub fn new(wake: EventFd) -> Self {
        Mailbox {
            done: Mutex::new(Vec::new()),
            nudges: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            pending: AtomicUsize::new(0),
            wake,
        }
    }

    /// Another thread took on one operation of the owner's; its completion
    /// comes through [`Self::post`].
    pub fn expect(&self) {
        self.pending.fetch_add(1, Ordering::Relaxed);
    }

    /// Hands the owner the completion of an operation done for it.
    pub fn post(&self, c: Completion) {
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(c);
        self.signal();
    }

    /// Hands the owner several completions with one wake-up.
    pub fn post_all(&self, cs: &mut Vec<Completion>) {
        if cs.is_empty() {
            return;
        }
        self.done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .append(cs);
        self.signal();
    }

    /// Asks the owner to run `work.serve()` on its own thread.
    pub fn nudge(&self, work: Arc<dyn Serve>) {
        self.nudges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(work);
        self.signal();
    }

    fn signal(&self) {
        self.ready.store(true, Ordering::Release);
        let _ = self.wake.write(1);
    }

    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Takes what was posted: completions into `out`, then runs the work
    /// the owner was asked to take over (which may post more).
    pub fn take(&self, out: &mut Vec<Completion>) {
        // A plain load first: most reaps find nothing, and the swap is a
        // locked instruction.
        if !self.ready.load(Ordering::Acquire) || !self.ready.swap(false, Ordering::AcqRel) {
            return;
        }
        let nudges =
            std::mem::take(&mut *self.nudges.lock().unwrap_or_else(PoisonError::into_inner));
        for n in nudges {
            n.serve();
        }
        let mut done = self.done.lock().unwrap_or_else(PoisonError::into_inner);
        self.pending.fetch_sub(done.len(), Ordering::Relaxed);
        out.append(&mut done);
    }
}
