//! The event loop of an I/O thread: it owns the virtqueues given to it,
//! takes every available request on a kick, submits them in one batch,
//! completes them from the I/O engine's completions, and notifies the
//! guest once per batch (respecting EVENT_IDX).
//!
//! Per-request state lives in slots preallocated per queue, one per ring
//! entry, so the request path does not allocate once the slots' vectors
//! have grown. Buffers are iovecs straight into guest memory; a request
//! keeps the memory snapshot it points into until it completes.

use super::inflight::InflightQueue;
use super::memory::{AtomicMem, Mem};
use super::Device;
use crate::block::drain::LocalRoot;
use crate::block::io::{IoKind, IoRequest};
use crate::block::stats::Acct;
use crate::export::virtio_blk::{
    write_status, Request, RequestLimits, RequestType, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK,
};
use crate::io::aligned::{gather, scatter, AlignedBuf};
use crate::io::{Completion, IoContext};
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryLoadGuard};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

/// Depth of each thread's io_uring.
const RING_DEPTH: u32 = 1024;
/// How often a queue held back by a drain looks again.
const DRAIN_RETRY: Duration = Duration::from_millis(1);

const TOKEN_CONTROL: u64 = 0;
const TOKEN_IO: u64 = 1;
const TOKEN_QUEUE: u64 = 2;

/// Which queue of which device.
pub type QueueKey = (u64, u16);

/// A queue's own handle on a guest memory snapshot. Requests clone this
/// queue-local `Arc` rather than the shared one, so queues on different
/// threads never write the same reference count.
type Snap = Arc<GuestMemoryLoadGuard<Mem>>;

/// A queue handed to a thread.
pub struct QueueStart {
    pub dev: Arc<Device>,
    pub index: u16,
    pub queue: Queue,
    pub kick: EventFd,
    pub call: EventFd,
    pub mem: AtomicMem,
    /// Inflight tracking for this queue, when the frontend set it up.
    pub inflight: Option<InflightQueue>,
}

pub enum WorkerMsg {
    Start(Box<QueueStart>),
    /// Stop a queue once its requests finished; the reply is the index of
    /// the next available entry (for GET_VRING_BASE).
    Stop {
        key: QueueKey,
        reply: Sender<u16>,
    },
    /// The frontend gave the queue a new call eventfd.
    SetCall {
        key: QueueKey,
        call: EventFd,
    },
    Exit,
}

struct Slot {
    head: u16,
    req: Request,
    iov: Vec<libc::iovec>,
    /// The memory the request's pointers refer to, held until completion.
    mem: Option<Snap>,
    /// Bytes a read or write must transfer.
    expect: u64,
    /// A write in writethrough mode: a flush follows before completing.
    flush_pending: bool,
    /// What to account the request as (GET_ID is not accounted).
    acct: Option<Acct>,
    /// Bytes the request covers, and where a write ends.
    acct_bytes: u64,
    acct_end: u64,
    /// When the request started, in the device's accounting clock.
    started_ns: u64,
    /// An aligned copy of the data, for nodes that need aligned buffers
    /// (O_DIRECT) when the guest's are not; grown on demand, then reused.
    bounce: Option<AlignedBuf>,
    bounce_iov: libc::iovec,
    bounced: bool,
}

// SAFETY: the raw pointers in `iov` point into guest memory kept mapped by
// `mem`; a slot is only ever used by the thread that owns its queue (it
// moves once, with the queue, when the queue is handed to the thread).
unsafe impl Send for Slot {}

struct QueueRun {
    key: QueueKey,
    dev: Arc<Device>,
    queue: Queue,
    kick: EventFd,
    call: EventFd,
    mem: AtomicMem,
    /// The current snapshot of `mem` (see [`Snap`]).
    snap: Snap,
    root: LocalRoot,
    limits: RequestLimits,
    capacity_seen: u64,
    slots: Vec<Slot>,
    free: Vec<u16>,
    in_flight: usize,
    stopping: Option<Sender<u16>>,
    need_notify: bool,
    /// Held back by a drain: look again shortly.
    deferred: bool,
    event_idx: bool,
    inflight: Option<InflightQueue>,
    /// The guest put the ring in an impossible state (an avail index more
    /// than a ring ahead): the queue is left alone until the index makes
    /// sense again; said once per episode.
    broken: bool,
}

struct Worker {
    epoll: Epoll,
    ctx: IoContext,
    queues: Vec<Option<QueueRun>>,
    completions: Vec<Completion>,
    poll: Duration,
}

/// Runs an I/O thread until it is told to exit.
pub fn run(rx: Receiver<WorkerMsg>, wake: EventFd, poll_us: u32) {
    let mut w = match Worker::new(&wake, poll_us) {
        Ok(w) => w,
        Err(e) => {
            log::error!("I/O thread cannot start: {e}");
            return;
        }
    };
    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let timeout = if w.queues.iter().flatten().any(|q| q.deferred) {
            DRAIN_RETRY.as_millis() as i32
        } else {
            -1
        };
        if !w.poll.is_zero() && w.poll_for_work() {
            w.process_all();
            continue;
        }
        let n = match w.epoll.wait(timeout, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                log::error!("I/O thread: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_CONTROL => {
                    let _ = wake.read();
                    while let Ok(msg) = rx.try_recv() {
                        if !w.control(msg) {
                            w.shutdown();
                            return;
                        }
                    }
                }
                TOKEN_IO => w.reap(),
                t => {
                    let i = (t - TOKEN_QUEUE) as usize;
                    if let Some(Some(q)) = w.queues.get_mut(i) {
                        let _ = q.kick.read();
                        q.deferred = true;
                    }
                }
            }
        }
        w.process_all();
    }
}

impl Worker {
    fn new(wake: &EventFd, poll_us: u32) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new()?;
        let ctx = IoContext::new(RING_DEPTH, false)?;
        epoll.ctl(
            ControlOperation::Add,
            wake.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_CONTROL),
        )?;
        epoll.ctl(
            ControlOperation::Add,
            ctx.event_fd(),
            EpollEvent::new(EventSet::IN, TOKEN_IO),
        )?;
        Ok(Worker {
            epoll,
            ctx,
            queues: Vec::new(),
            completions: Vec::with_capacity(256),
            poll: Duration::from_micros(u64::from(poll_us)),
        })
    }

    /// Handles a control message; false means exit.
    fn control(&mut self, msg: WorkerMsg) -> bool {
        match msg {
            WorkerMsg::Start(s) => self.start(*s),
            WorkerMsg::Stop { key, reply } => {
                if let Some(q) = self.find(key) {
                    q.stopping = Some(reply);
                } else {
                    let _ = reply.send(0);
                }
                self.finish_stops();
            }
            WorkerMsg::SetCall { key, call } => {
                if let Some(q) = self.find(key) {
                    q.call = call;
                }
            }
            WorkerMsg::Exit => return false,
        }
        true
    }

    fn find(&mut self, key: QueueKey) -> Option<&mut QueueRun> {
        self.queues.iter_mut().flatten().find(|q| q.key == key)
    }

    fn start(&mut self, s: QueueStart) {
        use std::os::fd::AsRawFd;
        let i = match self.queues.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.queues.push(None);
                self.queues.len() - 1
            }
        };
        let size = s.queue.size();
        let slots = (0..size)
            .map(|_| Slot {
                head: 0,
                req: Request::with_capacity(8, 1),
                iov: Vec::with_capacity(8),
                mem: None,
                expect: 0,
                flush_pending: false,
                acct: None,
                acct_bytes: 0,
                acct_end: 0,
                started_ns: 0,
                bounce: None,
                bounce_iov: libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0,
                },
                bounced: false,
            })
            .collect();
        let limits = RequestLimits::new(&s.dev.options);
        let event = EpollEvent::new(EventSet::IN, TOKEN_QUEUE + i as u64);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, s.kick.as_raw_fd(), event)
        {
            log::error!("queue {} of '{}' cannot be watched: {e}", s.index, s.dev.id);
            return;
        }
        let event_idx = s.queue.event_idx_enabled();
        let mut queue = s.queue;
        let mut inflight = s.inflight;
        let resubmit = match inflight
            .as_mut()
            .and_then(|iq| iq.recover(queue.next_used()))
        {
            Some(heads) => {
                // An area given back: every request taken and not returned
                // is marked, so the ring's next entry follows them, whatever
                // base the frontend sent (QEMU sends the used index).
                let used = queue.next_used();
                queue.set_next_avail(used.wrapping_add(heads.len() as u16));
                if !heads.is_empty() {
                    log::info!(
                        "queue {} of '{}': resubmitting {} requests that were in flight",
                        s.index,
                        s.dev.id,
                        heads.len()
                    );
                }
                heads
            }
            None => Vec::new(),
        };
        log::debug!(
            "queue {} of '{}' started ({size} entries)",
            s.index,
            s.dev.id
        );
        self.queues[i] = Some(QueueRun {
            key: (s.dev.uid, s.index),
            root: s.dev.slot.register(),
            dev: s.dev,
            queue,
            kick: s.kick,
            call: s.call,
            snap: Arc::new(s.mem.memory()),
            mem: s.mem,
            limits,
            capacity_seen: u64::MAX,
            slots,
            free: (0..size).rev().collect(),
            in_flight: 0,
            stopping: None,
            need_notify: false,
            // Requests may already wait (a reconnect): look right away.
            deferred: true,
            event_idx,
            inflight,
            broken: false,
        });
        if !resubmit.is_empty() {
            if let Some(q) = self.queues[i].as_mut() {
                resubmit_heads(q, i, &resubmit, &mut self.ctx);
            }
        }
    }

    /// Stops the queues whose requests have all finished.
    fn finish_stops(&mut self) {
        use std::os::fd::AsRawFd;
        for entry in self.queues.iter_mut() {
            let done = entry
                .as_ref()
                .is_some_and(|q| q.stopping.is_some() && q.in_flight == 0);
            if !done {
                continue;
            }
            if let Some(q) = entry.take() {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    q.kick.as_raw_fd(),
                    EpollEvent::default(),
                );
                if let Some(reply) = &q.stopping {
                    let _ = reply.send(q.queue.next_avail());
                }
                log::debug!("queue {} of '{}' stopped", q.key.1, q.dev.id);
            }
        }
    }

    fn shutdown(&mut self) {
        // Let requests in flight finish so no I/O outlives its buffers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.ctx.busy() && Instant::now() < deadline {
            self.reap();
            std::thread::sleep(Duration::from_micros(100));
        }
    }

    /// Busy-waits up to the polling time for new requests or completions.
    fn poll_for_work(&mut self) -> bool {
        let end = Instant::now() + self.poll;
        loop {
            if self.ctx.busy() {
                self.reap();
                if self.queues.iter().flatten().any(|q| q.need_notify) {
                    return true;
                }
            }
            for q in self.queues.iter_mut().flatten() {
                let mem = q.mem.memory();
                let avail = q.queue.avail_idx(&*mem, Ordering::Acquire).map(|w| w.0);
                if avail.is_ok_and(|a| a != q.queue.next_avail()) && !ring_is_broken(q, &mem) {
                    q.deferred = true;
                }
            }
            if self.queues.iter().flatten().any(|q| q.deferred) {
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::hint::spin_loop();
        }
    }

    /// Takes new requests from every queue that has some, submits the
    /// batch, and notifies the guest where needed.
    fn process_all(&mut self) {
        for i in 0..self.queues.len() {
            let Some(q) = self.queues[i].as_mut() else {
                continue;
            };
            if q.deferred && q.stopping.is_none() {
                q.deferred = false;
                take_requests(q, i, &mut self.ctx);
            }
        }
        if let Err(e) = self.ctx.submit() {
            log::error!("I/O submission failed: {e}");
        }
        if self.ctx.has_ready() {
            self.reap();
            return;
        }
        self.notify();
        self.finish_stops();
    }

    fn reap(&mut self) {
        loop {
            self.reap_once();
            if !self.ctx.has_ready() {
                break;
            }
        }
        self.notify();
        self.finish_stops();
    }

    fn reap_once(&mut self) {
        self.completions.clear();
        self.ctx.reap(&mut self.completions);
        let mut done = std::mem::take(&mut self.completions);
        for c in done.iter() {
            let qi = (c.tag >> 32) as usize;
            let si = (c.tag & 0xffff_ffff) as usize;
            let Some(Some(q)) = self.queues.get_mut(qi) else {
                log::error!("completion for a queue that is gone");
                continue;
            };
            complete(q, qi, si, c.result, &mut self.ctx);
        }
        done.clear();
        self.completions = done;
        if let Err(e) = self.ctx.submit() {
            log::error!("I/O submission failed: {e}");
        }
    }

    fn notify(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            if !q.need_notify {
                continue;
            }
            q.need_notify = false;
            let mem = q.mem.memory();
            let needed = !q.event_idx || q.queue.needs_notification(&*mem).unwrap_or(true);
            if needed {
                if let Err(e) = q.call.write(1) {
                    log::warn!("notifying queue {} of '{}': {e}", q.key.1, q.dev.id);
                }
            }
        }
    }
}

/// Takes every available request of a queue (the EVENT_IDX loop: take,
/// re-enable notifications, look again) and starts them.
fn take_requests(q: &mut QueueRun, qi: usize, ctx: &mut IoContext) {
    let snap = snapshot(q);
    let mem: &Mem = &snap;
    if ring_is_broken(q, mem) {
        return;
    }
    let capacity = q.dev.capacity.load(Ordering::Relaxed);
    if capacity != q.capacity_seen {
        q.limits.set_capacity_bytes(capacity);
        q.capacity_seen = capacity;
    }
    loop {
        if q.event_idx {
            let _ = q.queue.disable_notification(mem);
        }
        while let Some(si) = q.free.pop() {
            if !q.root.enter() {
                q.free.push(si);
                q.deferred = true;
                return;
            }
            let Some(chain) = q.queue.pop_descriptor_chain(mem) else {
                q.root.leave();
                q.free.push(si);
                break;
            };
            handle_chain(q, qi, si as usize, chain, &snap, ctx);
        }
        if !q.event_idx {
            return;
        }
        match q.queue.enable_notification(mem) {
            Ok(true) if !ring_is_broken(q, mem) => continue,
            _ => return,
        }
    }
}

/// The queue's snapshot of guest memory, renewed when the frontend changed
/// the memory table.
fn snapshot(q: &mut QueueRun) -> Snap {
    let current = q.mem.memory();
    if !std::ptr::eq::<Mem>(&*current, &**q.snap) {
        q.snap = Arc::new(current);
    }
    q.snap.clone()
}

/// Whether the guest claims more new entries than the ring holds; such a
/// queue is marked broken (and said so once).
fn ring_is_broken(q: &mut QueueRun, mem: &Mem) -> bool {
    let Ok(avail) = q.queue.avail_idx(mem, Ordering::Acquire) else {
        return true;
    };
    let pending = avail.0.wrapping_sub(q.queue.next_avail());
    let broken = pending > q.queue.size();
    if broken && !q.broken {
        log::warn!(
            "queue {} of '{}': the guest announced {pending} new requests in a ring of {}; \
             the queue waits until that makes sense",
            q.key.1,
            q.dev.id,
            q.queue.size()
        );
    }
    q.broken = broken;
    broken
}

/// Marks, parses and starts one chain taken from the ring.
fn handle_chain<M>(
    q: &mut QueueRun,
    qi: usize,
    si: usize,
    chain: virtio_queue::DescriptorChain<M>,
    mem: &Snap,
    ctx: &mut IoContext,
) where
    M: std::ops::Deref,
    M::Target: vm_memory::GuestMemory,
{
    q.in_flight += 1;
    let head = chain.head_index();
    if let Some(iq) = q.inflight.as_mut() {
        iq.taken(head);
    }
    let slot = &mut q.slots[si];
    slot.head = head;
    match slot.req.parse(chain, &q.limits) {
        Ok(()) => start_request(q, qi, si, mem, ctx),
        Err(e) => {
            e.log();
            let m: &Mem = mem;
            let used = match slot.req.status_addr() {
                Some(a) if write_status(m, a, e.status()).is_ok() => e.used_len(),
                _ => 0,
            };
            release(q, si, m, used);
        }
    }
}

/// Starts again the requests a previous connection (or vubd process) took
/// and never returned. `virtio_queue` builds chains only from an avail
/// ring, so the heads are listed in a private ring placed in a page after
/// guest memory, and popped from a second queue that shares the real
/// descriptor table.
fn resubmit_heads(q: &mut QueueRun, qi: usize, heads: &[u16], ctx: &mut IoContext) {
    use vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};
    let mem = snapshot(q);
    let end = mem
        .iter()
        .map(|r| r.start_addr().0.saturating_add(r.len()))
        .max()
        .unwrap_or(0);
    let Some(base) = end.checked_add(0xfff).map(|e| e & !0xfff) else {
        return;
    };
    let ring_bytes = 4 + 2 * heads.len() + 2;
    let shadow = MmapRegion::<()>::new(ring_bytes.div_ceil(4096) * 4096)
        .ok()
        .and_then(|r| GuestRegionMmap::new(r, vm_memory::GuestAddress(base)))
        .and_then(|r| mem.insert_region(Arc::new(r)).ok());
    let Some(shadow) = shadow else {
        log::error!(
            "queue {} of '{}': cannot resubmit in-flight requests",
            q.key.1,
            q.dev.id
        );
        return;
    };
    let mut ring = Vec::with_capacity(ring_bytes);
    ring.extend_from_slice(&0u16.to_le_bytes());
    ring.extend_from_slice(&(heads.len() as u16).to_le_bytes());
    for h in heads {
        ring.extend_from_slice(&h.to_le_bytes());
    }
    if shadow
        .write_slice(&ring, vm_memory::GuestAddress(base))
        .is_err()
    {
        return;
    }
    let Ok(mut sq) = Queue::new(q.queue.max_size()) else {
        return;
    };
    sq.set_size(q.queue.size());
    sq.set_desc_table_address(
        Some(q.queue.desc_table() as u32),
        Some((q.queue.desc_table() >> 32) as u32),
    );
    sq.set_avail_ring_address(Some(base as u32), Some((base >> 32) as u32));
    sq.set_used_ring_address(
        Some(q.queue.used_ring() as u32),
        Some((q.queue.used_ring() >> 32) as u32),
    );
    sq.set_ready(true);
    for _ in heads {
        let Some(si) = q.free.pop() else { break };
        if !q.root.enter() {
            q.free.push(si);
            break;
        }
        let Some(chain) = sq.pop_descriptor_chain(&shadow) else {
            q.root.leave();
            q.free.push(si);
            break;
        };
        handle_chain(q, qi, si as usize, chain, &mem, ctx);
    }
    if let Err(e) = ctx.submit() {
        log::error!("I/O submission failed: {e}");
    }
}

/// Whether every buffer starts and ends on `align`.
fn is_aligned(iov: &[libc::iovec], align: usize) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
}

/// Points the slot's bounce iovec at an aligned buffer big enough for the
/// request, filled with the guest's data for a write.
fn prepare_bounce(slot: &mut Slot, align: usize, write: bool) -> bool {
    let len = slot.expect as usize;
    if slot.bounce.as_ref().is_none_or(|b| b.len() < len) {
        slot.bounce = AlignedBuf::new(len.div_ceil(align) * align, align);
    }
    let Some(buf) = slot.bounce.as_mut() else {
        return false;
    };
    if write {
        // SAFETY: the iovecs describe readable guest memory, still mapped.
        unsafe { gather(&slot.iov, &mut buf.as_mut_slice()[..len]) };
    }
    slot.bounce_iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    };
    true
}

fn tag(qi: usize, si: usize) -> u64 {
    ((qi as u64) << 32) | si as u64
}

/// Starts a parsed request on the node.
fn start_request(q: &mut QueueRun, qi: usize, si: usize, mem: &Snap, ctx: &mut IoContext) {
    let m: &Mem = mem;
    let Some(root) = q.root.root().cloned() else {
        // No medium: the request fails.
        return finish(q, si, m, VIRTIO_BLK_S_IOERR);
    };
    let slot = &mut q.slots[si];
    let t = tag(qi, si);
    slot.flush_pending = false;
    let kind = slot.req.request_type();
    slot.started_ns = q.dev.epoch.now_ns();
    slot.acct = match kind {
        RequestType::In => Some(Acct::Read),
        RequestType::Out => Some(Acct::Write),
        RequestType::Flush => Some(Acct::Flush),
        RequestType::Discard | RequestType::WriteZeroes => Some(Acct::Unmap),
        RequestType::GetId => None,
    };
    slot.acct_bytes = match kind {
        RequestType::In | RequestType::Out => u64::from(slot.req.data_len()),
        RequestType::Discard | RequestType::WriteZeroes => {
            slot.req.ranges().iter().map(|r| r.len_bytes()).sum()
        }
        _ => 0,
    };
    slot.acct_end = slot.req.offset().saturating_add(slot.acct_bytes);
    let io = match kind {
        RequestType::GetId => {
            let status = match slot.req.write_device_id(m, &q.dev.device_id) {
                Ok(_) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            };
            return finish(q, si, m, status);
        }
        RequestType::In | RequestType::Out => {
            if slot.req.host_iovecs(m, &mut slot.iov).is_err() {
                return finish(q, si, m, VIRTIO_BLK_S_IOERR);
            }
            slot.expect = u64::from(slot.req.data_len());
            slot.mem = Some(mem.clone());
            let kind = if kind == RequestType::In {
                IoKind::Read
            } else {
                IoKind::Write
            };
            slot.flush_pending = kind == IoKind::Write && !q.dev.writeback.load(Ordering::Relaxed);
            let align = root.mem_alignment();
            slot.bounced = align > 1 && !is_aligned(&slot.iov, align);
            if slot.bounced && !prepare_bounce(slot, align, kind == IoKind::Write) {
                return finish(q, si, m, VIRTIO_BLK_S_IOERR);
            }
            let (iov, iovcnt) = if slot.bounced {
                (&slot.bounce_iov as *const libc::iovec, 1)
            } else {
                (slot.iov.as_ptr(), slot.iov.len() as u32)
            };
            // SAFETY: the iovecs point into guest memory kept mapped by
            // `slot.mem` (or into the slot's bounce buffer), and neither
            // `slot.iov`, `slot.bounce_iov` nor the buffer is touched or
            // moved until this tag completes (the slot is not reused
            // before).
            unsafe { IoRequest::new(kind, slot.req.offset(), slot.expect, iov, iovcnt, t) }
        }
        RequestType::Flush => IoRequest::without_data(IoKind::Flush, 0, 0, t),
        RequestType::Discard | RequestType::WriteZeroes => {
            let Some(range) = slot.req.ranges().first().copied() else {
                return finish(q, si, m, VIRTIO_BLK_S_OK);
            };
            let kind = if kind == RequestType::Discard {
                IoKind::Discard
            } else {
                IoKind::WriteZeroes { unmap: range.unmap }
            };
            IoRequest::without_data(kind, range.offset(), range.len_bytes(), t)
        }
    };
    root.submit(ctx, &io);
}

/// A completion from the engine.
fn complete(q: &mut QueueRun, qi: usize, si: usize, result: i32, ctx: &mut IoContext) {
    let mem = match q.slots.get(si).and_then(|s| s.mem.clone()) {
        Some(m) => m,
        None => snapshot(q),
    };
    let Some(slot) = q.slots.get_mut(si) else {
        return;
    };
    let kind = slot.req.request_type();
    if slot.bounced && kind == RequestType::In && result > 0 {
        if let Some(b) = slot.bounce.as_ref() {
            let n = (result as usize).min(b.len());
            // SAFETY: the iovecs describe writable guest memory of a read
            // request, still mapped (the slot holds the memory).
            unsafe { scatter(&b.as_slice()[..n], &slot.iov) };
        }
    }
    slot.bounced = false;
    let status = if result < 0 {
        log::debug!(
            "request on '{}' failed: {}",
            q.dev.id,
            std::io::Error::from_raw_os_error(-result)
        );
        VIRTIO_BLK_S_IOERR
    } else {
        let done = result as u64;
        match kind {
            RequestType::In if done < slot.expect => {
                // Past the end of the file: the rest reads as zeroes.
                zero_tail(&slot.iov, done);
                VIRTIO_BLK_S_OK
            }
            // A write completes with its byte count, or 0 when it was done
            // as a whole some other way (detect-zeroes).
            RequestType::Out if done != slot.expect && done != 0 && !slot.flush_pending => {
                VIRTIO_BLK_S_IOERR
            }
            RequestType::Out if slot.flush_pending => {
                slot.flush_pending = false;
                if done != slot.expect && done != 0 {
                    VIRTIO_BLK_S_IOERR
                } else if let Some(root) = q.root.root() {
                    // Writethrough: the write completes once flushed.
                    root.submit(
                        ctx,
                        &IoRequest::without_data(IoKind::Flush, 0, 0, tag(qi, si)),
                    );
                    slot.expect = 0;
                    return;
                } else {
                    VIRTIO_BLK_S_IOERR
                }
            }
            _ => VIRTIO_BLK_S_OK,
        }
    };
    finish(q, si, &mem, status);
}

/// Zeroes the buffers from byte `from` on.
fn zero_tail(iov: &[libc::iovec], from: u64) {
    let mut skip = from as usize;
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: the iovec points into mapped guest memory the request
        // may write (it is a read request's buffer).
        unsafe { std::ptr::write_bytes((v.iov_base as *mut u8).add(skip), 0, v.iov_len - skip) };
        skip = 0;
    }
}

/// Writes the status, returns the chain to the guest and frees the slot.
fn finish(q: &mut QueueRun, si: usize, mem: &Mem, status: u8) {
    let slot = &mut q.slots[si];
    if let (Some(kind), Some(stats)) = (slot.acct.take(), q.dev.stats.get(usize::from(q.key.1))) {
        let now = q.dev.epoch.now_ns();
        let ns = now.saturating_sub(slot.started_ns);
        stats.done(
            kind,
            slot.acct_bytes,
            ns,
            status == VIRTIO_BLK_S_OK,
            slot.acct_end,
            now,
        );
    }
    let slot = &q.slots[si];
    let used = match slot.req.status_addr() {
        Some(a) if write_status(mem, a, status).is_ok() => slot.req.used_len(status),
        _ => 0,
    };
    release(q, si, mem, used);
}

fn release(q: &mut QueueRun, si: usize, mem: &Mem, used: u32) {
    let head = q.slots[si].head;
    if head >= q.queue.size() {
        // The guest named a descriptor outside the ring: there is no valid
        // id to return it under.
        log::debug!(
            "queue {} of '{}': dropping head {head} outside the ring",
            q.key.1,
            q.dev.id
        );
    } else {
        if let Some(iq) = q.inflight.as_ref() {
            iq.returning(head);
        }
        if let Err(e) = q.queue.add_used(mem, head, used) {
            log::debug!(
                "queue {} of '{}': returning a request: {e}",
                q.key.1,
                q.dev.id
            );
        }
        if let Some(iq) = q.inflight.as_ref() {
            iq.returned(head, q.queue.next_used());
        }
    }
    q.slots[si].mem = None;
    q.free.push(si as u16);
    q.in_flight -= 1;
    q.root.leave();
    q.need_notify = true;
}
