//! A libblkio (`virtio-blk-vhost-user`) client of a vhost-user-blk
//! export, with blocking helpers that time out instead of hanging.
//!
//! Every request's buffers live in one memory region registered with the
//! backend; each queue owns a slice of it ([`BlkQueue`]).  Reads fill
//! their buffer with [`POISON`] first, so data the daemon did not write
//! shows.  Calls that talk to the daemon over the vhost-user socket
//! (connect, start, mapping memory, reading the config) run in a helper
//! thread with a deadline, since libblkio has no timeout for them.

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

/// How long one request (or one batch) may take before the test fails.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting (including waiting for the socket) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Bytes of the memory region each queue owns by default.
pub const DEFAULT_QUEUE_BUFFER: usize = 4 << 20;
/// What read buffers hold before the daemon fills them.
pub const POISON: u8 = 0xa5;

/// How to set up a connection.
#[derive(Clone, Copy, Debug)]
pub struct BlkOptions {
    /// Queues to start (libblkio's `num-queues`).
    pub num_queues: usize,
    /// Poll queues to start after them (`num-poll-queues`): libblkio
    /// disables their notifications and busy-waits for completions.
    pub num_poll_queues: usize,
    /// libblkio's `read-only` (must be set for an export that is not
    /// writable, or `start` fails with EROFS).
    pub read_only: bool,
    /// Bytes of the memory region per queue.
    pub queue_buffer: usize,
}

impl Default for BlkOptions {
    fn default() -> Self {
        BlkOptions {
            num_queues: 1,
            num_poll_queues: 0,
            read_only: false,
            queue_buffer: DEFAULT_QUEUE_BUFFER,
        }
    }
}

/// Runs `f` on a helper thread and waits at most `timeout` for it; panics
/// with `what` if it does not finish in time.
pub fn run_with_timeout<R, F>(what: &str, timeout: Duration, f: F) -> R
where
    R: Send + 'static,
    F: FnOnce() -> R + Send + 'static,
{
    let (tx, rx) = mpsc::channel();
    let worker = thread::Builder::new()
        .name(format!("blk: {what}"))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("cannot spawn a helper thread");
    match rx.recv_timeout(timeout) {
        Ok(r) => {
            let _ = worker.join();
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("{what}: no answer within {timeout:?}"),
        Err(mpsc::RecvTimeoutError::Disconnected) => match worker.join() {
            Err(p) => std::panic::resume_unwind(p),
            Ok(()) => panic!("{what}: helper thread ended without a result"),
        },
    }
}

/// A connected and started libblkio instance.
pub struct Blk {
    // Declared first: queues are dropped before the instance they belong to.
    queues: Vec<BlkQueue>,
    blkio: Option<Blkio>,
    /// Regions added with `add_region`.
    extra: Vec<MemoryRegion>,
    path: PathBuf,
}

struct Started {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    region: MemoryRegion,
}

fn setup(path: &str, opts: BlkOptions, deadline: Instant) -> blkio::Result<Started> {
    // The socket may not exist yet, or not accept yet: retry connecting
    // until the deadline; later steps are not retried.
    let mut blkio = loop {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", path)?;
        // read-only can only be set before connecting.
        b.set_bool("read-only", opts.read_only)?;
        match b.connect() {
            Ok(()) => break b,
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => thread::sleep(Duration::from_millis(10)),
        }
    };
    blkio.set_i32("num-queues", opts.num_queues as i32)?;
    blkio.set_i32("num-poll-queues", opts.num_poll_queues as i32)?;
    let outcome = blkio.start()?;
    let total = opts.num_queues + opts.num_poll_queues;
    let region = blkio.alloc_mem_region(opts.queue_buffer * total)?;
    blkio.map_mem_region(&region)?;
    let mut queues = outcome.queues;
    queues.extend(outcome.poll_queues);
    Ok(Started {
        blkio,
        queues,
        region,
    })
}

impl Blk {
    /// Connects with one queue; panics on failure.
    pub fn connect(path: &Path) -> Blk {
        Blk::connect_with(path, BlkOptions::default())
    }

    /// Connects as `opts` says; panics on failure.
    pub fn connect_with(path: &Path, opts: BlkOptions) -> Blk {
        Blk::try_connect_with(path, opts)
            .unwrap_or_else(|e| panic!("cannot connect to {}: {e}", path.display()))
    }

    /// Connects as `opts` says; the error of the step that failed.
    pub fn try_connect_with(path: &Path, opts: BlkOptions) -> blkio::Result<Blk> {
        assert!(opts.num_queues >= 1, "at least one queue");
        let spath = path.to_str().expect("socket path is UTF-8").to_string();
        let deadline = Instant::now() + CONNECT_TIMEOUT;
        let started = run_with_timeout(
            &format!("connecting to {spath}"),
            CONNECT_TIMEOUT + IO_TIMEOUT,
            move || setup(&spath, opts, deadline),
        )?;
        let queues = started
            .queues
            .into_iter()
            .enumerate()
            .map(|(i, q)| BlkQueue {
                q,
                base: started.region.addr + i * opts.queue_buffer,
                len: opts.queue_buffer,
                next_tag: 0,
                shift: 0,
            })
            .collect();
        Ok(Blk {
            queues,
            blkio: Some(started.blkio),
            extra: Vec::new(),
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn blkio(&self) -> &Blkio {
        self.blkio
            .as_ref()
            .expect("instance lost to a timed-out call")
    }

    /// A property libblkio keeps from connecting (no daemon round trip):
    /// `request-alignment`, `max-queues`, `max-segments`, ...
    pub fn get_i32(&self, name: &str) -> i32 {
        self.blkio()
            .get_i32(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn get_u64(&self, name: &str) -> u64 {
        self.blkio()
            .get_u64(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    pub fn get_bool(&self, name: &str) -> bool {
        self.blkio()
            .get_bool(name)
            .unwrap_or_else(|e| panic!("property {name}: {e}"))
    }

    /// Runs `f` on the instance in a helper thread, for calls that send
    /// vhost-user messages; panics after `IO_TIMEOUT`.
    fn with_blkio<R: Send + 'static>(
        &mut self,
        what: &str,
        f: impl FnOnce(&mut Blkio) -> R + Send + 'static,
    ) -> R {
        let mut b = self
            .blkio
            .take()
            .expect("instance lost to a timed-out call");
        let (b, r) = run_with_timeout(what, IO_TIMEOUT, move || {
            let r = f(&mut b);
            (b, r)
        });
        self.blkio = Some(b);
        r
    }

    /// `capacity`, which libblkio reads from the device's config space
    /// (a GET_CONFIG round trip) every time it is asked.
    pub fn try_capacity(&mut self) -> blkio::Result<u64> {
        self.with_blkio("reading capacity", |b| b.get_u64("capacity"))
    }

    pub fn capacity(&mut self) -> u64 {
        self.try_capacity()
            .unwrap_or_else(|e| panic!("reading capacity: {e}"))
    }

    /// Allocates and maps (ADD_MEM_REG) another memory region of `len`
    /// bytes; its address and length.
    pub fn add_region(&mut self, len: usize) -> (usize, usize) {
        let region = self
            .with_blkio("adding a memory region", move |b| {
                let r = b.alloc_mem_region(len)?;
                b.map_mem_region(&r)?;
                Ok::<_, blkio::Error>(r)
            })
            .unwrap_or_else(|e| panic!("adding a memory region: {e}"));
        self.extra.push(region);
        (region.addr, region.len)
    }

    /// Unmaps (REM_MEM_REG) and frees a region from `add_region`.
    pub fn remove_region(&mut self, addr: usize, len: usize) {
        let i = self
            .extra
            .iter()
            .position(|r| r.addr == addr && r.len == len)
            .expect("no such region");
        let region = self.extra.remove(i);
        self.with_blkio("removing a memory region", move |b| {
            b.unmap_mem_region(&region);
            b.free_mem_region(&region);
        });
    }

    /// Moves every queue's helper buffers off alignment (see
    /// [`BlkQueue::set_misalignment`]).
    pub fn set_misalignment(&mut self, shift: usize) {
        for q in &mut self.queues {
            q.set_misalignment(shift);
        }
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Queue `i` (poll queues come after the others).
    pub fn queue(&mut self, i: usize) -> &mut BlkQueue {
        &mut self.queues[i]
    }

    /// Takes all queues out (to move them into threads); give them back
    /// with [`put_queues`](Self::put_queues) or drop them before `self`.
    pub fn take_queues(&mut self) -> Vec<BlkQueue> {
        std::mem::take(&mut self.queues)
    }

    pub fn put_queues(&mut self, queues: Vec<BlkQueue>) {
        self.queues = queues;
    }

    // Shortcuts on queue 0.

    pub fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        self.queue(0).read(off, len)
    }

    pub fn try_read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.queue(0).try_read(off, len)
    }

    pub fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        self.queue(0).write(off, data)
    }

    pub fn write_fua(&mut self, off: u64, data: &[u8]) -> i32 {
        self.queue(0).write_flags(off, data, ReqFlags::FUA)
    }

    pub fn flush(&mut self) -> i32 {
        self.queue(0).flush()
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> i32 {
        self.queue(0).write_zeroes(off, len, unmap)
    }

    pub fn discard(&mut self, off: u64, len: u64) -> i32 {
        self.queue(0).discard(off, len)
    }

    pub fn readv(&mut self, off: u64, sizes: &[usize]) -> Result<Vec<u8>, i32> {
        self.queue(0).readv(off, sizes)
    }

    pub fn writev(&mut self, off: u64, data: &[u8], sizes: &[usize]) -> i32 {
        self.queue(0).writev(off, data, sizes)
    }
}

impl Drop for Blk {
    fn drop(&mut self) {
        // Queues go before the instance they belong to.  Nothing is sent
        // to the daemon (an unmap would wait for its answer): closing the
        // connection ends everything there.
        self.queues.clear();
        self.extra.clear();
    }
}

/// One started queue and its part of the memory region.
pub struct BlkQueue {
    q: Blkioq,
    /// Address of this queue's buffer (inside the mapped region).
    base: usize,
    len: usize,
    next_tag: usize,
    /// Bytes by which the helpers move their buffers off alignment.
    shift: usize,
}

impl BlkQueue {
    /// Moves the buffers of the blocking helpers `shift` bytes (and
    /// scattered buffer `i` by `shift * (i + 1)`) off their aligned
    /// places, e.g. 1 for odd addresses; 0 again for aligned ones.
    pub fn set_misalignment(&mut self, shift: usize) {
        assert!(shift < 512, "shift below a sector");
        self.shift = shift;
    }

    /// Bytes of buffer this queue owns.
    pub fn buffer_len(&self) -> usize {
        self.len
    }

    fn check_span(&self, at: usize, len: usize) {
        assert!(
            at.checked_add(len).is_some_and(|end| end <= self.len),
            "buffer span {at}+{len} outside the queue's {} bytes",
            self.len
        );
    }

    fn ptr(&self, at: usize) -> *mut u8 {
        (self.base + at) as *mut u8
    }

    /// Address of the buffer at `at`, for requests built by hand.
    pub fn buffer_ptr(&self, at: usize) -> *mut u8 {
        self.check_span(at, 0);
        self.ptr(at)
    }

    /// Copies `data` into the buffer at `at`.  Only while no request
    /// using that part is in flight.
    pub fn fill_buffer(&mut self, at: usize, data: &[u8]) {
        self.check_span(at, data.len());
        // SAFETY: the span is inside the mapped region this queue owns
        // and no request is using it.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr(at), data.len()) };
    }

    /// Sets `len` bytes of the buffer at `at` to `byte`.
    pub fn set_buffer(&mut self, at: usize, len: usize, byte: u8) {
        self.check_span(at, len);
        // SAFETY: as in fill_buffer.
        unsafe { std::ptr::write_bytes(self.ptr(at), byte, len) };
    }

    /// A copy of `len` bytes of the buffer at `at`.
    pub fn buffer(&self, at: usize, len: usize) -> Vec<u8> {
        self.check_span(at, len);
        // SAFETY: as in fill_buffer; the daemon wrote it before completing.
        unsafe { std::slice::from_raw_parts(self.ptr(at), len) }.to_vec()
    }

    fn tag(&mut self) -> usize {
        self.next_tag = self.next_tag.wrapping_add(1);
        self.next_tag
    }

    /// Queues a read of `len` bytes at disk offset `off` into the buffer
    /// at `at`, with user data `tag`.
    pub fn submit_read(&mut self, off: u64, at: usize, len: usize, tag: usize) {
        self.check_span(at, len);
        self.q.read(off, self.ptr(at), len, tag, ReqFlags::empty());
    }

    /// Queues a write of the buffer's `len` bytes at `at` to disk offset
    /// `off`.
    pub fn submit_write(&mut self, off: u64, at: usize, len: usize, tag: usize, flags: ReqFlags) {
        self.check_span(at, len);
        self.q.write(off, self.ptr(at), len, tag, flags);
    }

    /// Queues a flush with user data `tag`.
    pub fn submit_flush(&mut self, tag: usize) {
        self.q.flush(tag, ReqFlags::empty());
    }

    /// Queues a read into any memory (even memory the daemon cannot see).
    pub fn submit_read_raw(&mut self, off: u64, buf: *mut u8, len: usize, tag: usize) {
        self.q.read(off, buf, len, tag, ReqFlags::empty());
    }

    /// Reads into the given iovecs (anywhere in mapped memory) and waits;
    /// the ret.
    pub fn readv_raw(&mut self, off: u64, iov: &[blkio::iovec], tag: usize) -> i32 {
        self.q
            .readv(off, iov.as_ptr(), iov.len() as u32, tag, ReqFlags::empty());
        self.wait_one(tag, &format!("readv {off}"))
    }

    /// Notifies the device of queued requests without waiting for any.
    pub fn kick(&mut self) {
        let mut none: [MaybeUninit<Completion>; 0] = [];
        let mut zero = Duration::ZERO;
        self.q
            .do_io(&mut none, 0, Some(&mut zero), None)
            .unwrap_or_else(|e| panic!("notifying the device: {e}"));
    }

    /// Waits for `n` completions, `(user data, ret)` each, or fails with
    /// libblkio's error (ETIME after `timeout`).
    pub fn try_wait(&mut self, n: usize, timeout: Duration) -> blkio::Result<Vec<(usize, i32)>> {
        let mut out = Vec::with_capacity(n);
        let mut slots: Vec<MaybeUninit<Completion>> =
            (0..n.max(1)).map(|_| MaybeUninit::uninit()).collect();
        let mut left = timeout;
        while out.len() < n {
            let want = n - out.len();
            let got = self
                .q
                .do_io(&mut slots[..want], want, Some(&mut left), None)?;
            for slot in &slots[..got] {
                // SAFETY: do_io initialised the first `got` slots.
                let c = unsafe { slot.assume_init_read() };
                out.push((c.user_data, c.ret));
            }
        }
        Ok(out)
    }

    /// Waits for `n` completions; panics if they do not come in
    /// [`IO_TIMEOUT`].
    pub fn wait(&mut self, n: usize) -> Vec<(usize, i32)> {
        self.try_wait(n, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("waiting for {n} completions: {e}"))
    }

    /// Waits for the one request tagged `tag`; its ret.
    fn wait_one(&mut self, tag: usize, what: &str) -> i32 {
        let done = self
            .try_wait(1, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(done[0].0, tag, "{what}: completion of another request");
        done[0].1
    }

    /// Reads `len` bytes at `off`, with `timeout`: the data, the
    /// completion's error (negative errno), or libblkio's error (ETIME
    /// when nothing completed).
    pub fn read_timeout(
        &mut self,
        off: u64,
        len: usize,
        timeout: Duration,
    ) -> blkio::Result<Result<Vec<u8>, i32>> {
        let at = self.shift;
        self.set_buffer(at, len, POISON);
        let tag = self.tag();
        self.submit_read(off, at, len, tag);
        let done = self.try_wait(1, timeout)?;
        assert_eq!(done[0].0, tag, "completion of another request");
        Ok(match done[0].1 {
            0 => Ok(self.buffer(at, len)),
            err => Err(err),
        })
    }

    /// Reads `len` bytes at `off`: the data or the completion's error.
    pub fn try_read(&mut self, off: u64, len: usize) -> Result<Vec<u8>, i32> {
        self.read_timeout(off, len, IO_TIMEOUT)
            .unwrap_or_else(|e| panic!("read {off}+{len}: {e}"))
    }

    /// Reads `len` bytes at `off`; panics if the read fails.
    pub fn read(&mut self, off: u64, len: usize) -> Vec<u8> {
        self.try_read(off, len)
            .unwrap_or_else(|ret| panic!("read {off}+{len} failed with {ret}"))
    }

    /// Writes `data` at `off`; the completion's ret.
    pub fn write(&mut self, off: u64, data: &[u8]) -> i32 {
        self.write_flags(off, data, ReqFlags::empty())
    }

    pub fn write_flags(&mut self, off: u64, data: &[u8], flags: ReqFlags) -> i32 {
        let at = self.shift;
        self.fill_buffer(at, data);
        let tag = self.tag();
        self.submit_write(off, at, data.len(), tag, flags);
        self.wait_one(tag, &format!("write {off}+{}", data.len()))
    }

    pub fn flush(&mut self) -> i32 {
        let tag = self.tag();
        self.q.flush(tag, ReqFlags::empty());
        self.wait_one(tag, "flush")
    }

    /// Write-zeroes; `unmap` false sends NO_UNMAP.
    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> i32 {
        let flags = if unmap {
            ReqFlags::empty()
        } else {
            ReqFlags::NO_UNMAP
        };
        let tag = self.tag();
        self.q.write_zeroes(off, len, tag, flags);
        self.wait_one(tag, &format!("write-zeroes {off}+{len}"))
    }

    pub fn discard(&mut self, off: u64, len: u64) -> i32 {
        let tag = self.tag();
        self.q.discard(off, len, tag, ReqFlags::empty());
        self.wait_one(tag, &format!("discard {off}+{len}"))
    }

    /// Where the buffers of a scattered request go: from the end of the
    /// queue's buffer backwards (so the last iovec sits lowest), each
    /// after a gap of a different odd number of sectors, so no buffer is
    /// adjacent to the next one nor page aligned in the same way; moved
    /// off alignment by the misalignment (see `set_misalignment`).
    pub fn scatter(&self, sizes: &[usize]) -> Vec<usize> {
        let mut end = self.len;
        sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| {
                let gap = 512 * (2 * i + 3);
                let at = end
                    .checked_sub(size + gap)
                    .expect("scattered buffers do not fit the queue's buffer");
                end = at;
                // The gaps are larger than the shifts, so buffers stay
                // apart.
                at + self.shift * (i + 1)
            })
            .collect()
    }

    fn iovecs(&self, places: &[usize], sizes: &[usize]) -> Vec<blkio::iovec> {
        places
            .iter()
            .zip(sizes)
            .map(|(&at, &len)| blkio::iovec {
                iov_base: self.ptr(at).cast(),
                iov_len: len,
            })
            .collect()
    }

    /// Reads `sizes.iter().sum()` bytes at `off` into buffers of these
    /// sizes scattered over the queue's buffer (see [`scatter`]); the
    /// bytes in order, or the completion's error.  Panics if the read
    /// changed any byte outside its buffers.
    pub fn readv(&mut self, off: u64, sizes: &[usize]) -> Result<Vec<u8>, i32> {
        let places = self.scatter(sizes);
        self.set_buffer(0, self.len, POISON);
        let iov = self.iovecs(&places, sizes);
        let tag = self.tag();
        self.q
            .readv(off, iov.as_ptr(), iov.len() as u32, tag, ReqFlags::empty());
        let ret = self.wait_one(tag, &format!("readv {off} {sizes:?}"));
        // The iovec array must outlive the request.
        drop(iov);
        let mut data = Vec::new();
        for (&at, &len) in places.iter().zip(sizes) {
            data.extend_from_slice(&self.buffer(at, len));
        }
        let mut outside = self.buffer(0, self.len);
        for (&at, &len) in places.iter().zip(sizes) {
            outside[at..at + len].fill(POISON);
        }
        let stray = outside.iter().position(|&b| b != POISON);
        assert_eq!(stray, None, "readv wrote outside its buffers");
        if ret == 0 {
            Ok(data)
        } else {
            Err(ret)
        }
    }

    /// Writes `data` at `off` from buffers of `sizes` (which must add up
    /// to its length) scattered over the queue's buffer; the ret.
    pub fn writev(&mut self, off: u64, data: &[u8], sizes: &[usize]) -> i32 {
        assert_eq!(
            sizes.iter().sum::<usize>(),
            data.len(),
            "iovec sizes must add up to the data"
        );
        let places = self.scatter(sizes);
        self.set_buffer(0, self.len, POISON);
        let mut rest = data;
        for (&at, &len) in places.iter().zip(sizes) {
            let (part, tail) = rest.split_at(len);
            self.fill_buffer(at, part);
            rest = tail;
        }
        let iov = self.iovecs(&places, sizes);
        let tag = self.tag();
        self.q
            .writev(off, iov.as_ptr(), iov.len() as u32, tag, ReqFlags::empty());
        let ret = self.wait_one(tag, &format!("writev {off} {sizes:?}"));
        drop(iov);
        ret
    }
}
