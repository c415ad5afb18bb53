//! The backend driven as a transport drives it, on an `IoContext`, over
//! small nodes in memory (and a real file for the end-of-file case).

use super::*;
use crate::block::drain::Root;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoRequest};
use crate::io::IoContext;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What a test node saw of one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    kind: IoKind,
    offset: u64,
    len: u64,
    /// Every buffer started and ended on the node's alignment.
    aligned: bool,
    /// The first buffer's address.
    first: usize,
}

/// A disk in memory. It needs buffers aligned to `align` (refusing others
/// with EINVAL, as O_DIRECT does), and can be told to fail flushes or to
/// answer reads short.
struct MemNode {
    data: Mutex<Vec<u8>>,
    align: usize,
    fail_flush: bool,
    short_reads: bool,
    seen: Mutex<Vec<Seen>>,
}

impl MemNode {
    fn new(len: usize, align: usize) -> Self {
        MemNode {
            data: Mutex::new((0..len).map(|i| (i % 251) as u8).collect()),
            align,
            fail_flush: false,
            short_reads: false,
            seen: Mutex::new(Vec::new()),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    fn kinds(&self) -> Vec<IoKind> {
        self.seen().iter().map(|s| s.kind).collect()
    }
}

impl BlockIo for MemNode {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.data.lock().unwrap().len() as u64)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn mem_alignment(&self) -> usize {
        self.align
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let (iov, n) = req.iov();
        let vecs = if n == 0 {
            &[][..]
        } else {
            // SAFETY: IoRequest's contract: `n` valid iovecs.
            unsafe { std::slice::from_raw_parts(iov, n as usize) }
        };
        let aligned = vecs
            .iter()
            .all(|v| v.iov_base as usize % self.align == 0 && v.iov_len % self.align == 0);
        self.seen.lock().unwrap().push(Seen {
            kind: req.kind(),
            offset: req.offset(),
            len: req.len(),
            aligned,
            first: vecs.first().map_or(0, |v| v.iov_base as usize),
        });
        let result = match req.kind() {
            IoKind::Read | IoKind::Write if !aligned => -libc::EINVAL,
            IoKind::Read | IoKind::Write => {
                let mut data = self.data.lock().unwrap();
                let mut at = req.offset() as usize;
                for v in vecs {
                    let Some(range) = data.get_mut(at..at + v.iov_len) else {
                        return ctx.complete_now(req.tag(), -libc::EIO);
                    };
                    // SAFETY: the iovec is valid for the request; it does
                    // not overlap the node's own vector.
                    unsafe {
                        if req.kind() == IoKind::Read {
                            std::ptr::copy_nonoverlapping(
                                range.as_ptr(),
                                v.iov_base.cast(),
                                v.iov_len,
                            );
                        } else {
                            std::ptr::copy_nonoverlapping(
                                v.iov_base.cast(),
                                range.as_mut_ptr(),
                                v.iov_len,
                            );
                        }
                    }
                    at += v.iov_len;
                }
                if self.short_reads && req.kind() == IoKind::Read {
                    req.len() as i32 / 2
                } else {
                    req.len() as i32
                }
            }
            IoKind::Flush if self.fail_flush => -libc::EIO,
            _ => 0,
        };
        ctx.complete_now(req.tag(), result);
    }
}

/// The keep-alive handle the tests give: it only has to come back.
type Keep = u32;

/// A transport in miniature: one backend queue of 8 slots on a context.
struct Rig {
    ctx: IoContext,
    backend: Arc<Backend>,
    q: BackendQueue<Keep>,
}

/// Tags carry bits above the slot index, as the vhost-user queue's do, to
/// show they come back as given.
const TAG_HIGH: u64 = 5 << 32;

impl Rig {
    fn new(root: Option<Root>, writeback: bool) -> Self {
        let slot = Arc::new(RootSlot::new(root));
        let backend = Backend::new("test0", slot, 1, writeback);
        let q = backend.queue(0, 8);
        Rig {
            ctx: IoContext::new(32, false).unwrap(),
            backend,
            q,
        }
    }

    /// Submits a request in slot `si`; a read or write uses `bufs`, the
    /// other kinds cover 4096 bytes at `offset`. Returns the request if
    /// the backend finished it at once.
    fn start(
        &mut self,
        si: usize,
        kind: IoKind,
        offset: u64,
        bufs: &mut [&mut [u8]],
    ) -> Option<(usize, Status, Option<Keep>)> {
        assert!(self.q.enter());
        let iov = self.q.iovecs(si).unwrap();
        iov.clear();
        for b in bufs.iter_mut() {
            iov.push(libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            });
        }
        let data = matches!(kind, IoKind::Read | IoKind::Write);
        let req = Request {
            kind,
            offset,
            len: if data {
                bufs.iter().map(|b| b.len() as u64).sum()
            } else {
                4096
            },
            tag: TAG_HIGH | si as u64,
        };
        // SAFETY: every test keeps its buffers alive and untouched until
        // the request is done (`run` waits for it).
        let done = unsafe { self.q.submit(&mut self.ctx, si, req, Some(si as Keep)) }?;
        self.q.leave();
        Some((si, done.status, done.keep))
    }

    /// Reaps until `want` requests are done, as a transport would: each
    /// completion goes to the backend, which finishes the request or
    /// sends it on.
    /// Reaps until the error policy holds a request (none may finish).
    fn run_until_held(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut out = Vec::new();
        while !self.q.has_held() {
            assert!(Instant::now() < deadline);
            self.ctx.submit().unwrap();
            out.clear();
            self.ctx.reap(&mut out);
            for c in &out {
                assert!(self
                    .q
                    .complete(&mut self.ctx, (c.tag & 0xffff) as usize, c.result)
                    .is_none());
            }
        }
    }

    fn run(&mut self, want: usize) -> Vec<(usize, Status, Option<Keep>)> {
        let mut done = Vec::new();
        let mut out = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(5);
        while done.len() < want {
            assert!(Instant::now() < deadline, "only {done:?} of {want} in 5 s");
            self.ctx.submit().unwrap();
            out.clear();
            self.ctx.reap(&mut out);
            for c in &out {
                assert_eq!(c.tag & !0xffff, TAG_HIGH, "the tag comes back as given");
                let si = (c.tag & 0xffff) as usize;
                if let Some(d) = self.q.complete(&mut self.ctx, si, c.result) {
                    self.q.leave();
                    done.push((si, d.status, d.keep));
                }
            }
            if done.len() < want {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
        self.q.account_finished();
        done
    }

    fn stats(&self) -> crate::qapi::BlockDeviceStats {
        self.backend.io_stats()
    }
}

fn node(len: usize, align: usize) -> Arc<MemNode> {
    Arc::new(MemNode::new(len, align))
}

#[test]
fn a_writethrough_write_completes_after_its_flush() {
    // Arrange: the guest has not enabled its write cache.
    let n = node(8192, 1);
    let mut rig = Rig::new(Some(n.clone()), false);
    let mut buf = vec![7u8; 1024];

    // Act
    assert!(rig.start(3, IoKind::Write, 512, &mut [&mut buf]).is_none());
    let done = rig.run(1);

    // Assert: one write, one flush under the same tag, then done; counted
    // as one write.
    assert_eq!(done, vec![(3, Status::Ok, Some(3))]);
    assert_eq!(n.kinds(), vec![IoKind::Write, IoKind::Flush]);
    assert_eq!(n.data.lock().unwrap()[512..1536], [7u8; 1024]);
    let s = rig.stats();
    assert_eq!(
        (s.wr_operations, s.wr_bytes, s.flush_operations),
        (1, 1024, 0)
    );
    assert_eq!(s.wr_highest_offset, 1536);
}

#[test]
fn a_writeback_write_is_not_flushed_until_the_guest_switches() {
    // Arrange
    let n = node(8192, 1);
    let mut rig = Rig::new(Some(n.clone()), true);
    let mut buf = vec![1u8; 512];

    // Act: a write with the cache on, then one after the guest turned it
    // off.
    rig.start(0, IoKind::Write, 0, &mut [&mut buf]);
    rig.run(1);
    rig.backend.set_writeback(false);
    rig.start(0, IoKind::Write, 0, &mut [&mut buf]);
    rig.run(1);

    // Assert
    assert_eq!(n.kinds(), vec![IoKind::Write, IoKind::Write, IoKind::Flush]);
}

#[test]
fn a_failed_writethrough_flush_fails_the_write() {
    // Arrange
    let mut n = MemNode::new(8192, 1);
    n.fail_flush = true;
    let mut rig = Rig::new(Some(Arc::new(n)), false);
    let mut buf = vec![1u8; 512];

    // Act
    rig.start(1, IoKind::Write, 0, &mut [&mut buf]);
    let done = rig.run(1);

    // Assert: the write's error is the flush's, counted as a failed write.
    assert_eq!(done, vec![(1, Status::Error(libc::EIO), Some(1))]);
    let s = rig.stats();
    assert_eq!((s.wr_operations, s.failed_wr_operations), (0, 1));
}

#[test]
fn unaligned_buffers_go_through_an_aligned_copy_that_is_reused() {
    // Arrange: a node that takes only 512-byte aligned buffers, and guest
    // buffers that start one byte into an allocation.
    let n = node(8192, 512);
    let mut rig = Rig::new(Some(n.clone()), true);
    let mut wmem = vec![0u8; 2049];
    let (wa, wb) = wmem[1..].split_at_mut(1000);
    wa.fill(0x11);
    wb.fill(0x22);
    let mut rmem = vec![0u8; 2049];

    // Act: write from the unaligned buffers, read back into others.
    rig.start(2, IoKind::Write, 1024, &mut [wa, wb]);
    let wrote = rig.run(1);
    let (ra, rb) = rmem[1..].split_at_mut(512);
    rig.start(2, IoKind::Read, 1024, &mut [ra, rb]);
    let read = rig.run(1);

    // Assert: the node saw aligned buffers, the same ones both times, and
    // the data made the round trip.
    assert_eq!(wrote, vec![(2, Status::Ok, Some(2))]);
    assert_eq!(read, vec![(2, Status::Ok, Some(2))]);
    let seen = n.seen();
    assert!(seen.iter().all(|s| s.aligned), "{seen:?}");
    assert_eq!(seen[0].first, seen[1].first, "the copy is reused");
    assert_eq!(rmem[1..1001], [0x11u8; 1000]);
    assert_eq!(rmem[1001..], [0x22u8; 1048]);
}

#[test]
fn aligned_buffers_reach_the_node_as_they_are() {
    // Arrange
    let n = node(8192, 512);
    let mut rig = Rig::new(Some(n.clone()), true);
    let mut mem = crate::io::aligned::AlignedBuf::new(1024, 512).unwrap();
    let addr = mem.as_mut_ptr() as usize;

    // Act
    rig.start(0, IoKind::Read, 0, &mut [mem.as_mut_slice()]);
    let done = rig.run(1);

    // Assert
    assert_eq!(done, vec![(0, Status::Ok, Some(0))]);
    assert_eq!(n.seen()[0].first, addr);
}

#[test]
fn statistics_count_each_kind_once_the_transport_asks() {
    // Arrange
    let n = node(1 << 20, 1);
    let mut rig = Rig::new(Some(n.clone()), true);
    let (mut a, mut b) = (vec![0u8; 4096], vec![0u8; 512]);

    // Act: two reads, a write, a flush, a discard, a write-zeroes, and a
    // read the node refuses (past its end).
    rig.start(0, IoKind::Read, 0, &mut [&mut a]);
    rig.start(1, IoKind::Write, 8192, &mut [&mut b]);
    rig.start(2, IoKind::Flush, 0, &mut []);
    rig.start(3, IoKind::Discard, 0, &mut []);
    rig.start(4, IoKind::WriteZeroes { unmap: true }, 4096, &mut []);
    let mut c = vec![0u8; 512];
    rig.start(5, IoKind::Read, 1 << 20, &mut [&mut c]);
    let before = rig.stats();
    let done = rig.run(6);
    let mut d = vec![0u8; 1024];
    rig.start(6, IoKind::Read, 0, &mut [&mut d]);
    rig.run(1);

    // Assert: nothing is counted before the transport asks (the requests
    // completed at once, but were not reaped), all of it after.
    assert_eq!(before.rd_operations + before.wr_operations, 0);
    assert_eq!(done.len(), 6);
    let s = rig.stats();
    assert_eq!(
        (s.rd_operations, s.rd_bytes, s.failed_rd_operations),
        (2, 5120, 1)
    );
    assert_eq!((s.wr_operations, s.wr_bytes), (1, 512));
    assert_eq!(s.flush_operations, 1);
    assert_eq!((s.unmap_operations, s.unmap_bytes), (2, 8192));
    assert_eq!(s.wr_highest_offset, 8704);
    assert!(s.idle_time_ns.is_some());
}

#[test]
fn without_a_medium_every_request_fails_at_once() {
    // Arrange
    let mut rig = Rig::new(None, true);
    let mut buf = vec![0u8; 512];

    // Act
    let read = rig.start(0, IoKind::Read, 0, &mut [&mut buf]);
    let flush = rig.start(1, IoKind::Flush, 0, &mut []);
    rig.q.account_finished();

    // Assert: finished on the spot with ENOMEDIUM, the handles given back,
    // counted as failures.
    assert_eq!(read, Some((0, Status::Error(libc::ENOMEDIUM), Some(0))));
    assert_eq!(flush, Some((1, Status::Error(libc::ENOMEDIUM), Some(1))));
    assert!(!rig.ctx.busy());
    let s = rig.stats();
    assert_eq!((s.failed_rd_operations, s.failed_flush_operations), (1, 1));
}

#[test]
fn a_node_that_answers_a_read_short_fails_it() {
    // Arrange: nodes complete reads whole; this one does not.
    let mut n = MemNode::new(8192, 1);
    n.short_reads = true;
    let mut rig = Rig::new(Some(Arc::new(n)), true);
    let mut buf = vec![0u8; 1024];

    // Act
    rig.start(0, IoKind::Read, 0, &mut [&mut buf]);
    let done = rig.run(1);

    // Assert
    assert_eq!(done, vec![(0, Status::Error(libc::EIO), Some(0))]);
}

#[test]
fn failed_requests_are_reported_except_writes_on_a_full_disk() {
    let rig = Rig::new(None, true);
    for kind in [IoKind::Read, IoKind::Write, IoKind::Flush] {
        assert_eq!(
            rig.backend.error_action(kind, libc::EIO),
            ErrorAction::Report
        );
    }
    assert_eq!(
        rig.backend.error_action(IoKind::Read, libc::ENOSPC),
        ErrorAction::Report
    );
    assert_eq!(
        rig.backend.error_action(IoKind::Write, libc::ENOSPC),
        ErrorAction::Stop
    );
}

#[test]
fn a_read_past_the_end_of_a_file_comes_back_zero_filled() {
    use crate::block::driver::{file::FileDriver, Driver, NodeFlags};
    use crate::qapi::{BlockdevOptionsFile, OnOffAuto};

    // Arrange: a file of 1000 bytes.
    let path = std::env::temp_dir().join(format!("vubd-backend-eof-{}", std::process::id()));
    std::fs::write(&path, vec![0x5au8; 1000]).unwrap();
    let opts = BlockdevOptionsFile {
        filename: path.to_string_lossy().into_owned(),
        locking: Some(OnOffAuto::Off),
        ..BlockdevOptionsFile::default()
    };
    let file = FileDriver::open(&opts, &NodeFlags::default(), false).unwrap();
    let mut rig = Rig::new(Some(file.io()), true);
    let mut buf = vec![0xffu8; 2048];

    // Act: a read from 512 across the end.
    rig.start(0, IoKind::Read, 512, &mut [&mut buf]);
    let done = rig.run(1);
    let _ = std::fs::remove_file(&path);

    // Assert: whole, the file's bytes then zeroes.
    assert_eq!(done, vec![(0, Status::Ok, Some(0))]);
    assert_eq!(buf[..488], [0x5au8; 488]);
    assert!(buf[488..].iter().all(|&b| b == 0));
    assert_eq!(rig.stats().rd_bytes, 2048);
}

/// Completes every request at once, in full (null-co's direct path).
struct DoneNode;

impl BlockIo for DoneNode {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(1 << 30)
    }
    fn truncate(&self, _: u64) -> Result<(), BlockError> {
        Ok(())
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        ctx.complete_now(req.tag(), req.len() as i32);
    }
}

/// ns per 4k read, 32 at a time, best of five: straight to the node, or
/// through a backend queue (submit, complete, count) as a transport does.
fn per_read(through_backend: bool) -> f64 {
    let node: Root = Arc::new(DoneNode);
    let mut rig = Rig::new(Some(node.clone()), true);
    let mut buf = vec![0u8; 4096];
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    for si in 0..8 {
        rig.q.iovecs(si).unwrap().extend_from_slice(&iov);
    }
    let mut out = Vec::with_capacity(64);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let n = 200_000u64;
        let t = Instant::now();
        for _ in 0..n / 8 {
            rig.q.new_round();
            for si in 0..8 {
                let req = Request {
                    kind: IoKind::Read,
                    offset: 0,
                    len: 4096,
                    tag: si as u64,
                };
                if through_backend {
                    assert!(rig.q.enter());
                    // SAFETY: `buf` outlives the loop; nothing touches it.
                    let early = unsafe { rig.q.submit(&mut rig.ctx, si, req, None) };
                    assert!(early.is_none());
                } else {
                    // SAFETY: as above.
                    let io = unsafe { IoRequest::new(req.kind, 0, 4096, iov.as_ptr(), 1, req.tag) };
                    node.submit(&mut rig.ctx, &io);
                }
            }
            out.clear();
            rig.ctx.reap(&mut out);
            for c in &out {
                if through_backend {
                    let done = rig.q.complete(&mut rig.ctx, c.tag as usize, c.result);
                    assert!(done.is_some_and(|d| d.status == Status::Ok));
                    rig.q.leave();
                }
            }
            rig.q.account_finished();
        }
        best = best.min(t.elapsed().as_nanos() as f64 / n as f64);
    }
    best
}

/// What the backend costs a request over handing it to the node; run
/// with `cargo test --release --lib measure_backend -- --ignored --nocapture`.
#[test]
#[ignore]
fn measure_backend_overhead() {
    let direct = per_read(false);
    let backend = per_read(true);
    println!("ns per read: to the node {direct:.1}, through the backend {backend:.1}");
}

/// A node whose writes fail with `errno` while `failing` is set.
struct Flaky {
    inner: MemNode,
    failing: std::sync::atomic::AtomicBool,
    errno: i32,
}

impl BlockIo for Flaky {
    fn length(&self) -> Result<u64, BlockError> {
        self.inner.length()
    }
    fn truncate(&self, s: u64) -> Result<(), BlockError> {
        self.inner.truncate(s)
    }
    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        if req.kind() == IoKind::Write && self.failing.load(std::sync::atomic::Ordering::SeqCst) {
            return ctx.complete_now(req.tag(), -self.errno);
        }
        self.inner.submit(ctx, req)
    }
}

fn flaky_rig(errno: i32, policy: ErrorPolicy) -> (Rig, Arc<Flaky>) {
    let n = Arc::new(Flaky {
        inner: MemNode::new(8192, 1),
        failing: std::sync::atomic::AtomicBool::new(true),
        errno,
    });
    let slot = Arc::new(RootSlot::new(Some(n.clone() as Root)));
    let opts = BackendOptions {
        writeback: true,
        policy,
        ..BackendOptions::default()
    };
    let backend = Backend::with_options("test0", slot, 1, &opts);
    let q = backend.queue(0, 8);
    let rig = Rig {
        ctx: IoContext::new(32, false).unwrap(),
        backend,
        q,
    };
    (rig, n)
}

#[test]
fn a_full_disk_holds_the_write_until_cont_and_nothing_is_lost() {
    // Arrange: werror=enospc (the default) over storage that is full.
    let (mut rig, n) = flaky_rig(libc::ENOSPC, ErrorPolicy::default());
    let woken = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let w = woken.clone();
    rig.backend.set_waker(
        0,
        Some(Arc::new(move || {
            w.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        })),
    );
    let mut buf = vec![5u8; 1024];

    // Act: the write fails; nothing is answered, the device stops.
    assert!(rig.start(2, IoKind::Write, 1024, &mut [&mut buf]).is_none());
    rig.run_until_held();
    assert!(rig.backend.is_stopped());
    assert_eq!(
        rig.backend.io_status(),
        crate::qapi::BlockDeviceIoStatus::Nospace
    );
    assert!(!rig.q.enter(), "a stopped device takes no new request");
    // Retrying before cont does nothing.
    rig.q.retry_held(&mut rig.ctx);
    assert!(rig.q.has_held());

    // Space is freed, then cont.
    n.failing.store(false, std::sync::atomic::Ordering::SeqCst);
    assert!(rig.backend.resume());
    assert_eq!(woken.load(std::sync::atomic::Ordering::SeqCst), 1);
    rig.q.retry_held(&mut rig.ctx);
    let done = rig.run(1);

    // Assert: the write completed as if nothing happened, its data is in.
    assert_eq!(done, vec![(2, Status::Ok, Some(2))]);
    assert_eq!(n.inner.data.lock().unwrap()[1024..2048], [5u8; 1024]);
    assert_eq!(
        rig.backend.io_status(),
        crate::qapi::BlockDeviceIoStatus::Ok
    );
    assert!(rig.q.enter());
    rig.q.leave();
}

#[test]
fn a_cont_that_answers_the_event_before_the_request_is_held_still_retries_it() {
    // The monitor may see BLOCK_IO_ERROR and send `cont` before the queue
    // has put the failed request on its held list: here the notice sink
    // itself frees space and resumes, as early as `cont` can come.
    let (mut rig, n) = flaky_rig(libc::ENOSPC, ErrorPolicy::default());
    let backend = Arc::downgrade(&rig.backend);
    let node = n.clone();
    rig.backend.set_notices(Some(Arc::new(move |notice| {
        if let crate::block::notice::Notice::IoError(_) = notice {
            node.failing
                .store(false, std::sync::atomic::Ordering::SeqCst);
            if let Some(b) = backend.upgrade() {
                b.resume();
            }
        }
    })));
    let mut buf = vec![6u8; 1024];
    assert!(rig.start(1, IoKind::Write, 0, &mut [&mut buf]).is_none());
    rig.run_until_held();
    // The resume came after the failure: the held request goes again.
    rig.q.retry_held(&mut rig.ctx);
    let done = rig.run(1);
    assert_eq!(done, vec![(1, Status::Ok, Some(1))]);
    assert_eq!(n.inner.data.lock().unwrap()[..1024], [6u8; 1024]);
}

#[test]
fn ignore_completes_and_report_fails() {
    let policy = ErrorPolicy::new(
        Some(crate::qapi::BlockdevOnError::Report),
        Some(crate::qapi::BlockdevOnError::Ignore),
    );
    let (mut rig, _n) = flaky_rig(libc::EIO, policy);
    let mut buf = vec![1u8; 512];
    assert!(rig.start(0, IoKind::Write, 0, &mut [&mut buf]).is_none());
    assert_eq!(rig.run(1), vec![(0, Status::Ok, Some(0))]);
    assert!(!rig.backend.is_stopped());
    let s = rig.stats();
    assert_eq!(s.failed_wr_operations, 0);
}
