//! The thread-pool engine, for when io_uring is refused: the same
//! operations as plain system calls on two worker threads.

use super::{Completion, Op};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::EventFd;

const WORKERS: usize = 2;

struct Shared {
    done: Mutex<Vec<Completion>>,
    /// Set after a completion was added to `done` (may be set spuriously,
    /// never missed).
    ready: AtomicBool,
    wake: EventFd,
    in_flight: AtomicUsize,
}

pub struct Pool {
    shared: Arc<Shared>,
    queued: Vec<(Op, u64)>,
    tx: Sender<(Op, u64)>,
}

impl Pool {
    pub fn new(wake: EventFd) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<(Op, u64)>();
        let rx = Arc::new(Mutex::new(rx));
        let shared = Arc::new(Shared {
            done: Mutex::new(Vec::new()),
            ready: AtomicBool::new(false),
            wake,
            in_flight: AtomicUsize::new(0),
        });
        for i in 0..WORKERS {
            let rx = rx.clone();
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("io-pool-{i}"))
                .spawn(move || worker(&rx, &shared))?;
        }
        Ok(Pool {
            shared,
            queued: Vec::new(),
            tx,
        })
    }

    pub fn in_flight(&self) -> usize {
        self.shared.in_flight.load(Ordering::SeqCst) + self.queued.len()
    }

    pub fn push(&mut self, op: Op, tag: u64) {
        self.queued.push((op, tag));
    }

    pub fn submit(&mut self) {
        for item in self.queued.drain(..) {
            self.shared.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.tx.send(item).is_err() {
                log::error!("I/O pool workers are gone");
            }
        }
    }

    /// Whether completions may be waiting (no system call, no lock).
    pub fn ready(&self) -> bool {
        self.shared.ready.load(Ordering::Acquire)
    }

    pub fn reap(&mut self, out: &mut Vec<Completion>) {
        let mut done = self
            .shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.shared.ready.store(false, Ordering::Relaxed);
        out.append(&mut done);
    }
}

fn worker(rx: &Mutex<Receiver<(Op, u64)>>, shared: &Shared) {
    loop {
        let next = rx.lock().unwrap_or_else(PoisonError::into_inner).recv();
        let Ok((op, tag)) = next else { return };
        let result = run(op);
        shared
            .done
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Completion { tag, result });
        shared.ready.store(true, Ordering::Release);
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        let _ = shared.wake.write(1);
    }
}

fn errno_result(r: isize) -> i32 {
    if r < 0 {
        -std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    } else {
        i32::try_from(r).unwrap_or(i32::MAX)
    }
}

fn run(op: Op) -> i32 {
    match op {
        Op::Readv {
            fd,
            offset,
            iov,
            iovcnt,
            ..
        } => {
            // SAFETY: the submitter guarantees the iovecs and their buffers
            // stay valid until completion (IoContext::push's contract).
            let r = unsafe { libc::preadv(fd, iov, iovcnt as i32, offset as libc::off_t) };
            errno_result(r)
        }
        Op::Writev {
            fd,
            offset,
            iov,
            iovcnt,
        } => {
            // SAFETY: as for reads.
            let r = unsafe { libc::pwritev(fd, iov, iovcnt as i32, offset as libc::off_t) };
            errno_result(r)
        }
        Op::Flush { fd } => {
            // SAFETY: fdatasync on a descriptor the submitter keeps open.
            let r = unsafe { libc::fdatasync(fd) };
            errno_result(r as isize)
        }
        Op::Fallocate {
            fd,
            mode,
            offset,
            len,
        } => {
            // SAFETY: fallocate on a descriptor the submitter keeps open.
            let r = unsafe { libc::fallocate(fd, mode, offset as libc::off_t, len as libc::off_t) };
            errno_result(r as isize)
        }
        Op::Sleep { ns, result } => {
            std::thread::sleep(std::time::Duration::from_nanos(ns));
            result
        }
    }
}
