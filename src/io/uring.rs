//! The io_uring engine.

use super::{Completion, Op};
use io_uring::{opcode, types, IoUring};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Tag bit marking a sleep, whose completion (-ETIME) means success.
const SLEEP_BIT: u64 = 1 << 63;

pub struct Uring {
    ring: IoUring,
    /// Whether the eventfd can be switched off (see `new`).
    toggle: bool,
    /// Operations pushed but not yet completed.
    in_flight: usize,
    /// Timespecs of sleeps not yet taken by the kernel; boxed so their
    /// address is stable (the vector itself may move when it grows).
    #[allow(clippy::vec_box)]
    sleeps: Vec<Box<types::Timespec>>,
    /// The results sleeps in flight complete with, and when they end, by
    /// tag.
    sleep_results: Vec<(u64, i32, Instant)>,
}

impl Uring {
    pub fn new(depth: u32, wake: &vmm_sys_util::eventfd::EventFd) -> std::io::Result<Self> {
        let mut ring: IoUring = IoUring::builder().build(depth.max(8))?;
        ring.submitter().register_eventfd(wake.as_raw_fd())?;
        // The completion queue's flags word exists since Linux 5.8; a
        // feature flag of 5.9 stands in for it. Without it the eventfd is
        // simply always signalled.
        let toggle = ring.params().is_feature_poll_32bits();
        if toggle {
            // The owner is awake until it arms the eventfd.
            ring.completion().disable_eventfd();
        }
        Ok(Uring {
            toggle,
            ring,
            in_flight: 0,
            sleeps: Vec::new(),
            sleep_results: Vec::new(),
        })
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How long the owner may sleep before it looks at the completion
    /// queue itself, should a wake-up be lost: `margin` while file
    /// operations run, `margin` past the end of the first sleep while only
    /// sleeps do (a throttled request waiting costs no wake-ups but its
    /// own), `None` with nothing in flight.
    pub fn recheck_in(&self, margin: Duration) -> Option<Duration> {
        if self.in_flight > self.sleep_results.len() {
            return Some(margin);
        }
        let now = Instant::now();
        self.sleep_results
            .iter()
            .map(|&(_, _, end)| end.saturating_duration_since(now) + margin)
            .min()
    }

    /// Whether completions wait in the completion queue (no system call:
    /// the queue is shared memory).
    pub fn ready(&mut self) -> bool {
        !self.ring.completion().is_empty()
    }

    /// See [`super::IoContext::arm`].
    pub fn arm(&mut self) -> bool {
        if !self.toggle {
            return self.ring.completion().is_empty();
        }
        let mut cq = self.ring.completion();
        cq.enable_eventfd();
        // The flag must be visible to the kernel before the queue is looked
        // at again: a completion posted after this reload signals, one
        // posted before is seen by it.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        cq.sync();
        if cq.is_empty() {
            return true;
        }
        cq.disable_eventfd();
        false
    }

    pub fn disarm(&mut self) {
        if self.toggle {
            self.ring.completion().disable_eventfd();
        }
    }

    /// Whether entries wait in the submission queue.
    pub fn has_queued(&mut self) -> bool {
        !self.ring.submission().is_empty()
    }

    /// # Safety
    /// See [`super::IoContext::push`].
    pub unsafe fn push(&mut self, op: Op, tag: u64) {
        let entry = match op {
            Op::Readv {
                fd,
                offset,
                iov,
                iovcnt,
                ..
            } => opcode::Readv::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build()
                .user_data(tag),
            Op::Writev {
                fd,
                offset,
                iov,
                iovcnt,
            } => opcode::Writev::new(types::Fd(fd), iov, iovcnt)
                .offset(offset)
                .build()
                .user_data(tag),
            Op::Flush { fd } => opcode::Fsync::new(types::Fd(fd))
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .user_data(tag),
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(fd), len)
                .offset(offset)
                .mode(mode)
                .build()
                .user_data(tag),
            Op::Sleep { ns, result } => {
                self.sleep_results
                    .push((tag, result, Instant::now() + Duration::from_nanos(ns)));
                let ts = Box::new(
                    types::Timespec::new()
                        .sec(ns / 1_000_000_000)
                        .nsec((ns % 1_000_000_000) as u32),
                );
                let entry = opcode::Timeout::new(&*ts)
                    .build()
                    .user_data(tag | SLEEP_BIT);
                self.sleeps.push(ts);
                entry
            }
        };
        loop {
            // SAFETY: the entry's pointers are valid until completion by the
            // caller's contract (timespecs are kept in `self.sleeps`).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // The submission queue is full: start what is there and retry.
            if let Err(e) = self.submit() {
                log::error!("io_uring submit: {e}");
                std::thread::yield_now();
            }
        }
        self.in_flight += 1;
    }

    pub fn submit(&mut self) -> std::io::Result<()> {
        if self.ring.submission().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit() {
                Ok(_) => {
                    // The kernel copies timeouts when it takes the entries.
                    if self.ring.submission().is_empty() {
                        self.sleeps.clear();
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
                // The completion queue is full: the caller reaps and the
                // entries stay queued for the next submit.
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        for cqe in self.ring.completion() {
            let mut tag = cqe.user_data();
            let mut result = cqe.result();
            if tag & SLEEP_BIT != 0 {
                tag &= !SLEEP_BIT;
                if let Some(i) = self.sleep_results.iter().position(|(t, _, _)| *t == tag) {
                    let (_, wanted, _) = self.sleep_results.swap_remove(i);
                    if result == -libc::ETIME {
                        result = wanted;
                    }
                }
            }
            self.in_flight = self.in_flight.saturating_sub(1);
            out.push(Completion { tag, result });
        }
        // Entries left over from a full completion queue.
        if let Err(e) = self.submit() {
            log::error!("io_uring submit: {e}");
        }
    }
}
