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

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};
use std::time::{Duration, Instant};

/// An inline write slower than this sends the following writes to the
/// engine for a while.
pub const SLOW_WRITE: Duration = Duration::from_millis(1);
/// How many writes go to the engine after a slow inline write.
pub const BACKOFF_WRITES: u32 = 256;

/// What the file system has shown about non-blocking buffered writes.
const MODE_NOWAIT: u8 = 0;
const MODE_BLOCKING: u8 = 1;

/// The per-file decision state. Shared by every thread writing the file;
/// it changes rarely (a mode switch, a slow write), so its cache line stays
/// shared between them.
#[derive(Debug, Default)]
pub struct InlineWrites {
    mode: AtomicU8,
    backoff: AtomicU32,
}

/// What became of a write tried inline.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Finished: bytes written, or `-errno`.
    Done(i32),
    /// Not started; the engine must do it.
    ToEngine,
}

impl InlineWrites {
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes `len` bytes described by `iov` at `offset`, or declines.
    ///
    /// # Safety
    /// `iov` must point to `iovcnt` iovecs describing `len` readable bytes,
    /// valid for the duration of the call.
    pub unsafe fn write(
        &self,
        fd: RawFd,
        iov: *const libc::iovec,
        iovcnt: u32,
        offset: u64,
        len: u64,
    ) -> Outcome {
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
        let start = Instant::now();
        // SAFETY: the caller's contract on `iov`.
        let r = unsafe { write_all_from(fd, iov, iovcnt, offset, 0) };
        self.record(start.elapsed());
        Outcome::Done(r.map_or_else(|e| -e, |()| len as i32))
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
    use std::os::fd::AsRawFd;

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
        let r = unsafe { w.write(f.as_raw_fd(), v.as_ptr(), 3, 8192, 6144) };
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
        let r = unsafe { w.write(ro.as_raw_fd(), v.as_ptr(), 1, 0, 512) };
        assert_eq!(r, Outcome::Done(-libc::EBADF));
        std::fs::remove_file(p).unwrap();
    }

    #[test]
    fn a_slow_write_sends_the_next_ones_to_the_engine() {
        let (p, f) = temp_file("backoff");
        let w = InlineWrites::new();
        w.mode.store(MODE_BLOCKING, Ordering::Relaxed);
        w.record(SLOW_WRITE / 2);
        assert!(!w.backing_off(), "a fast write changes nothing");
        w.record(SLOW_WRITE * 3);
        let a = vec![1u8; 512];
        let v = [iov(&a)];
        for _ in 0..BACKOFF_WRITES {
            // SAFETY: the iovec describes `a`, alive here.
            let r = unsafe { w.write(f.as_raw_fd(), v.as_ptr(), 1, 0, 512) };
            assert_eq!(r, Outcome::ToEngine);
        }
        // SAFETY: as above.
        let r = unsafe { w.write(f.as_raw_fd(), v.as_ptr(), 1, 0, 512) };
        assert_eq!(r, Outcome::Done(512), "inline again after the back-off");
        std::fs::remove_file(p).unwrap();
    }
}
