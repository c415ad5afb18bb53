//! Buffered writes issued on the request's own thread.
//!
//! A write into the page cache is a memory copy, but how the kernel gets it
//! done decides what it costs. io_uring first tries it without blocking;
//! file systems that cannot promise that (ext4 refuses `IOCB_NOWAIT` for
//! buffered writes outright) make io_uring hand every write to a worker
//! thread, which then has to be woken, and whose round trip measured here
//! at 2.5 times the CPU of a plain `pwritev` from the submitting thread
//! (4k random writes into a cached file, 6.18 kernel: 16.5k against 41.9k
//! writes per second on one core).
//!
//! So buffered writes to regular files are tried inline first: with
//! `RWF_NOWAIT` where the file system supports it (the write then either
//! finishes at once or goes to the engine), and as a plain blocking
//! `pwritev` where it does not. A blocking write can stall the queue it
//! runs on (dirty-page throttling, a journal commit); when one takes longer
//! than [`SLOW_WRITE`], the next [`BACKOFF_WRITES`] writes go to the engine
//! again, so a throttled file costs the other requests of the queue at most
//! one slow write in that many.

use crate::block::io::IoRequest;
use crate::io::mailbox::{Mailbox, Serve};
use crate::io::Completion;
use std::os::fd::RawFd;
use std::sync::atomic::{fence, AtomicBool, AtomicU32, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

/// An inline write slower than this sends the following writes to the
/// engine for a while.
pub const SLOW_WRITE: Duration = Duration::from_millis(4);
/// How many writes go to the engine after a slow inline write.
pub const BACKOFF_WRITES: u32 = 256;

/// What the file system has shown about non-blocking buffered writes.
const MODE_NOWAIT: u8 = 0;
const MODE_BLOCKING: u8 = 1;

/// A write one thread handed to the thread writing the file.
struct Handed {
    fd: RawFd,
    req: IoRequest,
    to: Arc<Mailbox>,
}

// SAFETY: the request's iovecs and buffers stay valid until its
// completion has been reaped by the thread owning `to`
// (IoRequest's contract), which happens only after this write was done
// and posted; the writing thread only reads them.
unsafe impl Send for Handed {}

/// The per-file state. Shared by every thread writing the file.
///
/// ext4 takes a file's inode lock exclusively for every buffered write, so
/// two threads writing the same file inline would take turns on it, and
/// spin on it while the other one writes (and pull the page cache's
/// buffer heads back and forth between their caches). Instead, one thread
/// at a time writes the file (`busy`); a thread that finds it busy hands
/// its write over and gets the completion through its mailbox. The writing
/// thread does its own write, then what was handed over at most twice (so
/// its own queue is not starved by another that keeps handing writes
/// over), then asks a thread whose writes are still waiting to take over.
pub struct InlineWrites {
    mode: AtomicU8,
    backoff: AtomicU32,
    busy: AtomicBool,
    handed: Mutex<Vec<Handed>>,
    queued: AtomicUsize,
    me: Weak<InlineWrites>,
}

impl std::fmt::Debug for InlineWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InlineWrites")
            .field("mode", &self.mode)
            .field("queued", &self.queued)
            .finish()
    }
}

/// What became of a write tried inline.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished: bytes written, or `-errno`.
    Done(i32),
    /// Not started; the engine must do it.
    ToEngine,
    /// Another thread writes it; the completion arrives in the mailbox.
    HandedOver,
}

impl InlineWrites {
    pub fn new() -> Arc<Self> {
        Arc::new_cyclic(|me| InlineWrites {
            mode: AtomicU8::new(MODE_NOWAIT),
            backoff: AtomicU32::new(0),
            busy: AtomicBool::new(false),
            handed: Mutex::new(Vec::new()),
            queued: AtomicUsize::new(0),
            me: me.clone(),
        })
    }

    /// Writes the request to `fd` on this thread, hands it to the thread
    /// writing this file, or declines.
    ///
    /// # Safety
    /// `req` is a write whose buffers stay valid until its completion has
    /// been reaped from the context whose mailbox is `mailbox`
    /// (IoRequest's contract).
    pub unsafe fn write(&self, mailbox: &Arc<Mailbox>, fd: RawFd, req: &IoRequest) -> Outcome {
        let ((iov, iovcnt), offset, len) = (req.iov(), req.offset(), req.len());
        if len > i32::MAX as u64 || iovcnt > libc::c_int::MAX as u32 {
            return Outcome::ToEngine;
        }
        if self.mode.load(Ordering::Relaxed) == MODE_NOWAIT {
            // SAFETY: the caller's contract on `iov`.
            let r = unsafe { pwritev2(fd, iov, iovcnt, offset, libc::RWF_NOWAIT) };
            match r {
                Ok(n) if n as u64 == len => return Outcome::Done(n as i32),
                // Part of it went in before the write would have blocked:
                // the rest is written blocking below, from where it stopped.
                Ok(n) if n > 0 => {
                    // SAFETY: as above.
                    let rest = unsafe { write_all_from(fd, iov, iovcnt, offset, n) };
                    return Outcome::Done(rest.map_or_else(|e| -e, |()| len as i32));
                }
                Ok(_) => return Outcome::ToEngine,
                Err(libc::EAGAIN) => return Outcome::ToEngine,
                Err(libc::EOPNOTSUPP) => {
                    log::debug!("buffered writes cannot be non-blocking here; writing inline");
                    self.mode.store(MODE_BLOCKING, Ordering::Relaxed);
                }
                Err(e) => return Outcome::Done(-e),
            }
        }
        if self.backing_off() {
            return Outcome::ToEngine;
        }
        if !self.acquire() {
            mailbox.expect();
            {
                let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
                handed.push(Handed {
                    fd,
                    req: *req,
                    to: mailbox.clone(),
                });
                self.queued.fetch_add(1, Ordering::Relaxed);
            }
            // The writer may have let go just before: then this thread
            // writes what is waiting, its own write among it.
            fence(Ordering::SeqCst);
            if self.acquire() {
                self.serve_handed();
                self.release();
            }
            return Outcome::HandedOver;
        }
        // First in, first written: what was handed over before this write
        // goes first.
        self.serve_handed();
        // SAFETY: the caller's contract on `iov`.
        let r = unsafe { self.timed_write(fd, req) };
        self.release();
        Outcome::Done(r)
    }

    fn acquire(&self) -> bool {
        self.busy
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    /// Writes inline and notes how long it took.
    ///
    /// # Safety
    /// As [`Self::write`].
    unsafe fn timed_write(&self, fd: RawFd, req: &IoRequest) -> i32 {
        let (iov, iovcnt) = req.iov();
        let start = Instant::now();
        // SAFETY: the caller's contract on the request's buffers.
        let r = unsafe { write_all_from(fd, iov, iovcnt, req.offset(), 0) };
        self.record(start.elapsed());
        r.map_or_else(|e| -e, |()| req.len() as i32)
    }

    /// Writes what other threads handed over until now, posting each
    /// completion to its thread. Called holding `busy`.
    fn serve_handed(&self) {
        let batch = {
            let mut handed = self.handed.lock().unwrap_or_else(PoisonError::into_inner);
            if handed.is_empty() {
                return;
            }
            self.queued.fetch_sub(handed.len(), Ordering::Relaxed);
            std::mem::take(&mut *handed)
        };
        // Completions go back in runs per thread, one wake-up each.
        let mut run: Vec<Completion> = Vec::new();
        let mut run_to: Option<Arc<Mailbox>> = None;
        for w in batch {
            // SAFETY: the handing thread's contract (see `Handed`).
            let result = unsafe { self.timed_write(w.fd, &w.req) };
            if let Some(to) = run_to.as_ref().filter(|to| !Arc::ptr_eq(to, &w.to)) {
                to.post_all(&mut run);
            }
            run.push(Completion {
                tag: w.req.tag(),
                result,
            });
            run_to = Some(w.to);
        }
        if let Some(to) = run_to {
            to.post_all(&mut run);
        }
    }

    /// Lets go of `busy`. Writes handed over meanwhile are not written by
    /// this thread (its own queue would wait behind them): the thread that
    /// handed over the first of them is asked to write them, so the work
    /// alternates between the queues and none waits for a writer that is
    /// not coming.
    fn release(&self) {
        loop {
            // Every letting go is followed by a look at `queued`: a write
            // handed over while `busy` was held is seen here, or its
            // hander's own attempt to take over succeeds.
            self.busy.store(false, Ordering::Release);
            fence(Ordering::SeqCst);
            if self.queued.load(Ordering::Relaxed) == 0 {
                return;
            }
            // Another thread took over: the waiting writes are its now.
            if !self.acquire() {
                return;
            }
            let next = self
                .handed
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .first()
                .map(|w| w.to.clone());
            match (next, self.me.upgrade()) {
                // Written by someone else meanwhile: look again.
                (None, _) => continue,
                (Some(to), Some(me)) => {
                    self.busy.store(false, Ordering::Release);
                    // The nudged thread takes `busy` itself (or whoever
                    // gets it first writes the list).
                    to.nudge(me);
                    return;
                }
                // Not reachable while `self` is borrowed (the last Arc
                // cannot be gone); write them rather than leave them.
                (Some(_), None) => self.serve_handed(),
            }
        }
    }

    /// Whether this write is one of those sent to the engine after a slow
    /// one (and counts it).
    fn backing_off(&self) -> bool {
        if self.backoff.load(Ordering::Relaxed) == 0 {
            return false;
        }
        // Two threads may both take the last one; a write more or less
        // inline does not matter.
        self.backoff
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Notes how long an inline write took.
    fn record(&self, took: Duration) {
        if took > SLOW_WRITE {
            log::debug!(
                "an inline write took {} µs; the next {BACKOFF_WRITES} writes go to the engine",
                took.as_micros()
            );
            self.backoff.store(BACKOFF_WRITES, Ordering::Relaxed);
        }
    }
}

impl Serve for InlineWrites {
    /// Asked by a thread that let go with writes of this one's waiting.
    fn serve(&self) {
        if self.acquire() {
            self.serve_handed();
            self.release();
        }
    }
}

/// `pwritev2`, with EINTR retried; `Err` is the errno.
///
/// # Safety
/// As [`InlineWrites::write`].
unsafe fn pwritev2(
    fd: RawFd,
    iov: *const libc::iovec,
    iovcnt: u32,
    offset: u64,
    flags: libc::c_int,
) -> Result<usize, i32> {
    loop {
        // SAFETY: the caller's contract: `iov` describes valid memory.
        let r = unsafe { libc::pwritev2(fd, iov, iovcnt as libc::c_int, offset as i64, flags) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO);
        if e != libc::EINTR {
            return Err(e);
        }
    }
}

/// Writes everything `iov` describes from byte `done` on, at `offset`
/// (where byte 0 goes), resuming after short writes. `Err` is the errno.
///
/// # Safety
/// As [`InlineWrites::write`].
unsafe fn write_all_from(
    fd: RawFd,
    iov: *const libc::iovec,
    iovcnt: u32,
    offset: u64,
    mut done: usize,
) -> Result<(), i32> {
    // SAFETY: the caller's contract: `iovcnt` valid iovecs.
    let vecs = unsafe { std::slice::from_raw_parts(iov, iovcnt as usize) };
    let total: usize = vecs.iter().map(|v| v.iov_len).sum();
    let mut rest: Vec<libc::iovec> = Vec::new();
    while done < total {
        // The iovecs left from byte `done`; built only after a short write
        // (the first pass writes the caller's array as it is).
        let (ptr, cnt) = if done == 0 {
            (iov, iovcnt)
        } else {
            rest.clear();
            let mut skip = done;
            for v in vecs {
                if skip >= v.iov_len {
                    skip -= v.iov_len;
                    continue;
                }
                rest.push(libc::iovec {
                    // SAFETY: `skip` is inside this iovec's buffer.
                    iov_base: unsafe { (v.iov_base as *mut u8).add(skip) }.cast(),
                    iov_len: v.iov_len - skip,
                });
                skip = 0;
            }
            (rest.as_ptr(), rest.len() as u32)
        };
        // SAFETY: `ptr` describes a tail of the caller's buffers.
        match unsafe { pwritev2(fd, ptr, cnt, offset + done as u64, 0) }? {
            0 => return Err(libc::EIO),
            n => done += n,
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::io::IoKind;
    use std::os::fd::AsRawFd;

    fn mailbox() -> Arc<Mailbox> {
        let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Arc::new(Mailbox::new(wake))
    }

    /// A write request over `iovcnt` iovecs at `iov`.
    ///
    /// # Safety
    /// IoRequest's contract.
    unsafe fn req(
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        len: u64,
        tag: u64,
    ) -> IoRequest {
        // SAFETY: passed on to the caller.
        unsafe { IoRequest::new(IoKind::Write, offset, len, iov, iovcnt, tag) }
    }

    fn iov(b: &[u8]) -> libc::iovec {
        libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        }
    }

    fn temp_file(name: &str) -> (std::path::PathBuf, std::fs::File) {
        let p = std::env::temp_dir().join(format!("vubd-inline-{}-{name}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&p)
            .unwrap();
        (p, f)
    }

    #[test]
    fn scattered_write_lands_at_its_offset() {
        let (p, f) = temp_file("scatter");
        let a = vec![1u8; 4096];
        let b = vec![2u8; 512];
        let c = vec![3u8; 1536];
        let v = [iov(&a), iov(&b), iov(&c)];
        let w = InlineWrites::new();
        // SAFETY: the iovecs describe the three vectors above, alive here.
        let r = unsafe {
            w.write(
                &mailbox(),
                f.as_raw_fd(),
                &req(v.as_ptr(), 3, 8192, 6144, 1),
            )
        };
        assert_eq!(r, Outcome::Done(6144));
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 8192 + 6144);
        assert!(data[..8192].iter().all(|&x| x == 0));
        assert!(data[8192..12288].iter().all(|&x| x == 1));
        assert!(data[12288..12800].iter().all(|&x| x == 2));
        assert!(data[12800..].iter().all(|&x| x == 3));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn resuming_after_a_short_write_skips_what_was_written() {
        let (p, f) = temp_file("resume");
        let a = vec![7u8; 1000];
        let b = vec![8u8; 1000];
        let v = [iov(&a), iov(&b)];
        // As if the first 1500 bytes had gone in already: only the last
        // 500 of `b` are written, at offset 1500.
        // SAFETY: the iovecs describe `a` and `b`, alive here.
        unsafe { write_all_from(f.as_raw_fd(), v.as_ptr(), 2, 0, 1500) }.unwrap();
        let data = std::fs::read(&p).unwrap();
        assert_eq!(data.len(), 2000);
        assert!(data[..1500].iter().all(|&x| x == 0));
        assert!(data[1500..].iter().all(|&x| x == 8));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_failing_write_reports_its_errno() {
        let (p, f) = temp_file("ro");
        drop(f);
        let ro = std::fs::File::open(&p).unwrap();
        let a = vec![1u8; 512];
        let v = [iov(&a)];
        let w = InlineWrites::new();
        // SAFETY: the iovec describes `a`, alive here.
        let r = unsafe { w.write(&mailbox(), ro.as_raw_fd(), &req(v.as_ptr(), 1, 0, 512, 1)) };
        assert_eq!(r, Outcome::Done(-libc::EBADF));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_slow_write_sends_the_next_ones_to_the_engine() {
        let (p, f) = temp_file("backoff");
        let w = InlineWrites::new();
        let mb = mailbox();
        w.mode.store(MODE_BLOCKING, Ordering::Relaxed);
        w.record(SLOW_WRITE / 2);
        assert!(!w.backing_off(), "a fast write changes nothing");
        w.record(SLOW_WRITE * 3);
        let a = vec![1u8; 512];
        let v = [iov(&a)];
        for _ in 0..BACKOFF_WRITES {
            // SAFETY: the iovec describes `a`, alive here.
            let r = unsafe { w.write(&mb, f.as_raw_fd(), &req(v.as_ptr(), 1, 0, 512, 1)) };
            assert_eq!(r, Outcome::ToEngine);
        }
        // SAFETY: as above.
        let r = unsafe { w.write(&mb, f.as_raw_fd(), &req(v.as_ptr(), 1, 0, 512, 1)) };
        assert_eq!(r, Outcome::Done(512), "inline again after the back-off");
        std::fs::remove_file(p).unwrap();
    }

    /// Two threads writing one file: one writes at a time, the other
    /// hands its writes over and gets their completions in its mailbox;
    /// every write completes once, with its length, and lands.
    #[test]
    fn two_threads_writing_one_file_hand_writes_over() {
        let (p, f) = temp_file("handover");
        f.set_len(2 * 64 * 4096).unwrap();
        let w = InlineWrites::new();
        w.mode.store(MODE_BLOCKING, Ordering::Relaxed);
        let fd = f.as_raw_fd();
        let run = |t: u8| {
            let w = w.clone();
            std::thread::spawn(move || {
                let mb = mailbox();
                let bufs: Vec<Vec<u8>> = (0..64u8).map(|i| vec![t * 64 + i; 4096]).collect();
                let iovs: Vec<libc::iovec> = bufs.iter().map(|b| iov(b)).collect();
                let mut done: Vec<Completion> = Vec::new();
                let mut handed = 0;
                for round in 0..20u64 {
                    for (i, v) in iovs.iter().enumerate() {
                        let off = (u64::from(t) * 64 + i as u64) * 4096;
                        let tag = round * 64 + i as u64;
                        // SAFETY: `bufs` and `iovs` outlive every
                        // completion, which this thread waits for below.
                        match unsafe { w.write(&mb, fd, &req(v, 1, off, 4096, tag)) } {
                            Outcome::Done(r) => done.push(Completion { tag, result: r }),
                            Outcome::HandedOver => handed += 1,
                            // A write slower than the stall limit (a loaded
                            // machine) sends the next ones to the engine:
                            // write them here as it would.
                            Outcome::ToEngine => {
                                // SAFETY: `v` points into `bufs`, 4096 bytes.
                                let r = unsafe { libc::pwrite(fd, v.iov_base, 4096, off as i64) };
                                done.push(Completion {
                                    tag,
                                    result: r as i32,
                                });
                            }
                        }
                    }
                    let deadline = Instant::now() + Duration::from_secs(10);
                    while mb.pending() > 0 {
                        mb.take(&mut done);
                        assert!(Instant::now() < deadline, "handed writes never completed");
                        std::thread::yield_now();
                    }
                    mb.take(&mut done);
                }
                (done, handed)
            })
        };
        let (a, b) = (run(0), run(1));
        let (da, ha) = a.join().unwrap();
        let (db, hb) = b.join().unwrap();
        for done in [&da, &db] {
            assert_eq!(done.len(), 20 * 64);
            let mut tags: Vec<u64> = done.iter().map(|c| c.tag).collect();
            tags.sort_unstable();
            tags.dedup();
            assert_eq!(tags.len(), 20 * 64, "a write completed twice or never");
            assert!(done.iter().all(|c| c.result == 4096));
        }
        let data = std::fs::read(&p).unwrap();
        for blk in 0..128usize {
            assert!(data[blk * 4096..(blk + 1) * 4096]
                .iter()
                .all(|&x| x == blk as u8));
        }
        eprintln!("handed over: {ha} and {hb} of {} writes each", 20 * 64);
        std::fs::remove_file(p).unwrap();
    }
}
