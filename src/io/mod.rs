//! The I/O engine of one I/O thread: asynchronous reads, writes, flushes
//! and space operations on file descriptors, completed through an eventfd
//! that the thread's event loop watches next to its virtqueue kicks.
//!
//! The engine is io_uring; where the kernel refuses it (an old kernel, a
//! seccomp policy, `io_uring_disabled`), a small thread pool runs the same
//! operations with plain system calls.
//!
//! Requests are identified by a caller-chosen tag, with bits 62 and 63
//! clear (they mark the executor's tags and the engine's sleeps). Buffers and iovec arrays
//! handed to an operation must stay valid and unmoved until the completion
//! with that tag has been reaped; this is the caller's contract on the
//! `unsafe` submission functions.

pub mod aligned;
pub mod mailbox;
mod pool;
pub mod state;
pub mod task;
mod uring;

use std::os::fd::RawFd;

/// One finished operation: its tag, and bytes transferred or `-errno`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    pub tag: u64,
    pub result: i32,
}

/// An operation on a file descriptor.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    Readv {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
        /// The file is read through the page cache, so a non-blocking
        /// attempt may finish the read at once (see [`IoContext::submit`]).
        cached: bool,
    },
    Writev {
        fd: RawFd,
        offset: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
    },
    /// fdatasync
    Flush { fd: RawFd },
    /// fallocate with the given mode over [offset, offset+len)
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// Completes with `result` after `ns` nanoseconds (null drivers'
    /// latency).
    Sleep { ns: u64, result: i32 },
}

// SAFETY: the raw pointers in an `Op` point into memory whose validity the
// submitter guarantees until completion (see the module contract); moving
// the description of the operation to a pool thread does not change that.
unsafe impl Send for Op {}

// One per I/O thread: the size difference costs nothing, boxing would add an
// indirection on every request.
#[allow(clippy::large_enum_variant)]
enum Engine {
    Uring(uring::Uring),
    Threads(pool::Pool),
}

/// The I/O engine of one thread.
pub struct IoContext {
    engine: Engine,
    /// Operations that finished without reaching the engine; the owner
    /// reaps them after its own submissions (see [`Self::has_immediate`]).
    immediate: Vec<Completion>,
    /// Signalled by the engine when completions are ready.
    wake: vmm_sys_util::eventfd::EventFd,
    /// The first operation of a batch, held back from the ring while it is
    /// the only one (see [`Self::submit`]).
    lone: Option<(Op, u64)>,
    /// Descriptors whose file refused `RWF_NOWAIT` (network and FUSE file
    /// systems, procfs): their lone reads go straight to the engine rather
    /// than pay for a refused system call each time. A closed descriptor's
    /// number reused for another file only loses it that shortcut.
    no_nowait: Vec<RawFd>,
    /// Completions of operations other threads did for this one.
    mailbox: std::sync::Arc<mailbox::Mailbox>,
    /// Multi-step requests in flight ([`task`]).
    exec: task::Executor,
    /// Per-thread state of drivers and clients ([`state`]).
    state: state::StateMap,
}

impl IoContext {
    /// An io_uring context of `depth` entries, or the thread pool when
    /// io_uring is unavailable (or `threads_only` is set).
    pub fn new(depth: u32, threads_only: bool) -> std::io::Result<Self> {
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK)?;
        let engine = if threads_only {
            Engine::Threads(pool::Pool::new(wake.try_clone()?)?)
        } else {
            match uring::Uring::new(depth, &wake) {
                Ok(u) => Engine::Uring(u),
                Err(e) => {
                    log::warn!("io_uring unavailable ({e}); using the thread-pool engine");
                    Engine::Threads(pool::Pool::new(wake.try_clone()?)?)
                }
            }
        };
        Ok(IoContext {
            engine,
            immediate: Vec::new(),
            mailbox: std::sync::Arc::new(mailbox::Mailbox::new(wake.try_clone()?)),
            wake,
            lone: None,
            no_nowait: Vec::new(),
            exec: task::Executor::default(),
            state: state::StateMap::default(),
        })
    }

    /// This thread's value of type `T` (see [`state`]), created on first
    /// use.
    pub fn state<T: Default + 'static>(&mut self) -> &mut T {
        self.state.get::<T>()
    }

    /// Takes this thread's value of type `T` out.
    pub fn take_state<T: 'static>(&mut self) -> Option<T> {
        self.state.remove::<T>()
    }

    /// Where other threads post completions of work done for this one.
    pub fn mailbox(&self) -> &std::sync::Arc<mailbox::Mailbox> {
        &self.mailbox
    }

    /// Readable when completions are waiting to be reaped.
    pub fn event_fd(&self) -> RawFd {
        use std::os::fd::AsRawFd;
        self.wake.as_raw_fd()
    }

    /// Queues an operation; it is started by the next [`Self::submit`].
    ///
    /// # Safety
    /// Every pointer in `op` (iovec arrays and the buffers they describe)
    /// must stay valid, and not be moved or freed, until the completion
    /// with `tag` has been returned by [`Self::reap`].
    pub unsafe fn push(&mut self, op: Op, tag: u64) {
        match &mut self.engine {
            Engine::Uring(u) => {
                if let Some((first, first_tag)) = self.lone.take() {
                    // SAFETY: the caller's contract, given with the first
                    // operation's push, is passed on unchanged.
                    unsafe { u.push(first, first_tag) };
                } else if matches!(op, Op::Readv { cached: true, fd, .. } if !self.no_nowait.contains(&fd))
                    && !u.has_queued()
                {
                    self.lone = Some((op, tag));
                    return;
                }
                // SAFETY: the caller's contract is passed on unchanged.
                unsafe { u.push(op, tag) }
            }
            Engine::Threads(p) => p.push(op, tag),
        }
    }

    /// Completes an operation that needed no I/O. No wake-up is sent: the
    /// thread that called this is the one that reaps, and checks
    /// [`Self::has_immediate`] after submitting.
    pub fn complete_now(&mut self, tag: u64, result: i32) {
        self.immediate.push(Completion { tag, result });
    }

    /// Whether operations completed without I/O wait to be reaped.
    pub fn has_immediate(&self) -> bool {
        !self.immediate.is_empty()
    }

    /// Whether completions can be reaped right now: immediate ones,
    /// io_uring's (which often completes cached I/O while submitting) or
    /// the pool's. Costs no system call.
    pub fn has_ready(&mut self) -> bool {
        !self.immediate.is_empty()
            || self.mailbox.ready()
            || match &mut self.engine {
                Engine::Uring(u) => u.ready(),
                Engine::Threads(p) => p.ready(),
            }
    }

    /// Starts every queued operation (one system call for a batch).
    ///
    /// A batch of one cached read is first tried with `preadv2` and
    /// `RWF_NOWAIT`: for a lone request the ring's extra work (an entry to
    /// fill and parse, a completion to post and reap) is all overhead, and
    /// at queue depth 1 it is a measurable part of the latency. When the
    /// data is not all in the page cache the read goes to the ring as usual.
    pub fn submit(&mut self) -> std::io::Result<()> {
        if let Some((op, tag)) = self.lone.take() {
            match read_now(&op) {
                Ok(result) => self.immediate.push(Completion { tag, result }),
                Err(miss) => {
                    if let (NotNow::Refused, Op::Readv { fd, .. }) = (miss, op) {
                        log::debug!("fd {fd} refuses RWF_NOWAIT: its reads go to the ring");
                        self.no_nowait.push(fd);
                    }
                    if let Engine::Uring(u) = &mut self.engine {
                        // SAFETY: the contract given with this operation's push.
                        unsafe { u.push(op, tag) };
                    }
                }
            }
        }
        match &mut self.engine {
            Engine::Uring(u) => u.submit(),
            Engine::Threads(p) => {
                p.submit();
                Ok(())
            }
        }
    }

    /// Moves every finished operation into `out`. The wake-up eventfd is
    /// left as it is: the owner clears it when its event loop reports it
    /// ([`Self::clear_wake`]).
    ///
    /// Completions of parts of multi-step requests are not handed out:
    /// they move their requests on, and what those complete is.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let from = out.len();
        out.append(&mut self.immediate);
        self.mailbox.take(out);
        match &mut self.engine {
            Engine::Uring(u) => u.reap(out),
            Engine::Threads(p) => p.reap(out),
        }
        if !self.exec.is_idle() {
            self.route(out, from);
        }
    }

    /// The executor of multi-step requests ([`task`]).
    pub fn executor(&self) -> &task::Executor {
        &self.exec
    }

    /// Resets the wake-up eventfd after the event loop saw it readable.
    pub fn clear_wake(&self) {
        let _ = self.wake.read();
    }

    /// Prepares for the owner to sleep on [`Self::event_fd`]: completions
    /// from now on signal it. Returns false (and stays quiet) when
    /// completions are already waiting, so the owner reaps instead.
    ///
    /// While the owner is awake the io_uring engine does not signal the
    /// eventfd at all: the owner looks at the completion queue itself
    /// after each submission, and an eventfd write per completion batch,
    /// plus the read that resets it, would cost two system calls' worth of
    /// work for nothing.
    pub fn arm(&mut self) -> bool {
        // The mailbox always signals the eventfd after posting, so seeing
        // it empty here is enough.
        if !self.immediate.is_empty() || self.mailbox.ready() {
            return false;
        }
        match &mut self.engine {
            Engine::Uring(u) => u.arm(),
            // The pool's threads always signal.
            Engine::Threads(_) => true,
        }
    }

    /// The owner woke up: stop signalling until the next [`Self::arm`].
    pub fn disarm(&mut self) {
        if let Engine::Uring(u) = &mut self.engine {
            u.disarm();
        }
    }

    /// How long the owner may sleep at most before it reaps by itself (see
    /// the ring's `recheck_in`); `None`: until woken. Only the ring's
    /// wake-up can be lost; the pool and the mailbox always signal.
    pub fn recheck_in(&self, margin: std::time::Duration) -> Option<std::time::Duration> {
        if self.lone.is_some() {
            return Some(margin);
        }
        match &self.engine {
            Engine::Uring(u) => u.recheck_in(margin),
            Engine::Threads(p) => (p.in_flight() > 0).then_some(margin),
        }
    }

    /// Whether operations are queued or running.
    pub fn busy(&self) -> bool {
        !self.exec.is_idle()
            || !self.immediate.is_empty()
            || self.lone.is_some()
            || self.mailbox.pending() > 0
            || match &self.engine {
                Engine::Uring(u) => u.in_flight() > 0,
                Engine::Threads(p) => p.in_flight() > 0,
            }
    }
}

/// Why a lone read was not done at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NotNow {
    /// Not all cached, a short read that may be the end of the file, or
    /// an error the ring's attempt reports the usual way.
    Later,
    /// The file does not take `RWF_NOWAIT` at all.
    Refused,
}

/// Tries a cached read without blocking: the byte count when it read
/// everything; otherwise the ring must do it.
fn read_now(op: &Op) -> Result<i32, NotNow> {
    let Op::Readv {
        fd,
        offset,
        iov,
        iovcnt,
        cached: true,
    } = *op
    else {
        return Err(NotNow::Later);
    };
    // SAFETY: the iovecs are valid until completion (push's contract).
    let vecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
    let total: usize = vecs.iter().map(|v| v.iov_len).sum();
    if total > i32::MAX as usize {
        return Err(NotNow::Later);
    }
    // SAFETY: the iovecs describe writable buffers valid until completion
    // (push's contract); a read that does not finish here is redone in
    // full by the ring, which overwrites whatever this one wrote.
    let r = unsafe {
        libc::syscall(
            libc::SYS_preadv2,
            fd,
            iov,
            iovcnt as libc::c_int,
            offset as libc::off_t,
            0 as libc::c_long,
            libc::RWF_NOWAIT,
        )
    };
    if r >= 0 && r as usize == total {
        Ok(r as i32)
    } else if r < 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::EOPNOTSUPP) {
        Err(NotNow::Refused)
    } else {
        Err(NotNow::Later)
    }
}

#[cfg(test)]
mod tests;
