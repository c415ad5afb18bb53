//! The I/O engine of one I/O thread: asynchronous reads, writes, flushes
//! and space operations on file descriptors, completed through an eventfd
//! that the thread's event loop watches next to its virtqueue kicks.
//!
//! The engine is io_uring; where the kernel refuses it (an old kernel, a
//! seccomp policy, `io_uring_disabled`), a small thread pool runs the same
//! operations with plain system calls.
//!
//! Requests are identified by a caller-chosen tag. Buffers and iovec arrays
//! handed to an operation must stay valid and unmoved until the completion
//! with that tag has been reaped; this is the caller's contract on the
//! `unsafe` submission functions.

pub mod aligned;
mod pool;
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
            wake,
        })
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
            // SAFETY: the caller's contract is passed on unchanged.
            Engine::Uring(u) => unsafe { u.push(op, tag) },
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

    /// Whether completions can be reaped right now: immediate ones, or
    /// io_uring's (which often completes cached I/O while submitting).
    pub fn has_ready(&mut self) -> bool {
        !self.immediate.is_empty()
            || match &mut self.engine {
                Engine::Uring(u) => u.ready(),
                Engine::Threads(_) => false,
            }
    }

    /// Starts every queued operation (one system call for a batch).
    pub fn submit(&mut self) -> std::io::Result<()> {
        match &mut self.engine {
            Engine::Uring(u) => u.submit(),
            Engine::Threads(p) => {
                p.submit();
                Ok(())
            }
        }
    }

    /// Moves every finished operation into `out`.
    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        out.append(&mut self.immediate);
        // Clear the wake-up first so completions arriving after this point
        // signal again.
        let _ = self.wake.read();
        match &mut self.engine {
            Engine::Uring(u) => u.reap(out),
            Engine::Threads(p) => p.reap(out),
        }
    }

    /// Whether operations are queued or running.
    pub fn busy(&self) -> bool {
        !self.immediate.is_empty()
            || match &self.engine {
                Engine::Uring(u) => u.in_flight() > 0,
                Engine::Threads(p) => p.in_flight() > 0,
            }
    }
}

#[cfg(test)]
mod tests;
