//! One virtqueue on its I/O thread: taking chains from the ring, parsing
//! them, handing them to the export's backend, and answering the guest
//! when the backend is done with them.

use super::inflight::InflightQueue;
use super::memory::{AtomicMem, Mem};
use super::Device;
use crate::block::backend::{BackendQueue, Done, Request as BackendRequest, Status};
use crate::block::io::IoKind;
use crate::export::virtio_blk::{
    prefetch_status, write_status, Request, RequestLimits, RequestType, VIRTIO_BLK_S_IOERR,
    VIRTIO_BLK_S_OK,
};
use crate::io::IoContext;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Sender;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryLoadGuard;
use vmm_sys_util::eventfd::EventFd;

use super::worker::QueueKey;

/// A queue's own handle on a guest memory snapshot. Requests clone this
/// queue-local `Arc` rather than the shared one, so queues on different
/// threads never write the same reference count.
pub(super) type Snap = Arc<GuestMemoryLoadGuard<Mem>>;

/// A ring entry being served: its head and the parsed request. What the
/// request needs beyond the ring (buffers, accounting, bounce copies) is
/// the backend's, in its slab under the same index.
pub(super) struct Slot {
    pub(super) head: u16,
    pub(super) req: Request,
}

pub(super) struct QueueRun {
    pub(super) key: QueueKey,
    pub(super) dev: Arc<Device>,
    pub(super) queue: Queue,
    pub(super) kick: EventFd,
    pub(super) call: EventFd,
    pub(super) mem: AtomicMem,
    /// The current snapshot of `mem` (see [`Snap`]), and the generation
    /// of `mem` it was looked up at.
    pub(super) snap: Snap,
    pub(super) snap_generation: u64,
    /// The export's backend, this queue's side of it: requests in flight,
    /// the medium, statistics. A request's slot index is its index there.
    pub(super) backend: BackendQueue<Snap>,
    pub(super) limits: RequestLimits,
    pub(super) capacity_seen: u64,
    pub(super) slots: Vec<Slot>,
    pub(super) free: Vec<u16>,
    pub(super) in_flight: usize,
    pub(super) stopping: Option<Sender<u16>>,
    pub(super) need_notify: bool,
    /// To be looked at by the next round: kicked, found by polling, or
    /// stopped at the batch limit with more available.
    pub(super) deferred: bool,
    /// Held back by a drain: looked at again shortly.
    pub(super) held: bool,
    /// The guest made a head outside the ring available. Like a virtio
    /// device that needs a reset (and like QEMU), the queue takes nothing
    /// more until the frontend sets the ring up again: there is no id to
    /// return that entry under, and skipping it silently would make the
    /// inflight count (used index + marked heads) one short after a
    /// restart, so that a request would complete twice.
    pub(super) failed: bool,

    /// Where the avail index lies in the mapping of `snap` (see
    /// [`polled_avail_idx`]); cleared whenever `snap` is replaced.
    pub(super) avail_idx_at: Option<*const std::sync::atomic::AtomicU16>,
    /// Where the last request's head descriptor and header were, as host
    /// addresses (0: none), remembered while the queue ran one request at
    /// a time. Drivers reuse both for the next request at that depth, so
    /// they are prefetched as soon as a new one shows up (see
    /// [`prefetch_next`]). Only hints: never read through.
    pub(super) guess: [usize; 2],
    /// The slot of a lone request finished this round, for
    /// [`remember_guess`].
    pub(super) guess_slot: Option<u16>,
    /// Head index and header address of the last lone request.
    pub(super) last_lone: (u16, Option<vm_memory::GuestAddress>),
    /// The driver asked to be notified of the last completions (it sleeps
    /// rather than polls).
    pub(super) driver_waits: bool,
    pub(super) event_idx: bool,
    pub(super) inflight: Option<InflightQueue>,
    /// The guest put the ring in an impossible state (an avail index more
    /// than a ring ahead): the queue is left alone until the index makes
    /// sense again; said once per episode.
    pub(super) broken: bool,
}

/// How many requests a queue takes from its ring before the thread submits
/// them, completes what finished and notifies the guest.
///
/// Taking the whole ring at once looks like the best batching, but it
/// turns guest and backend into a ping-pong: the guest waits for all of
/// it, then refills all of it while the backend waits. Completing in
/// rounds of 16 lets the guest refill on its own CPU while the backend
/// works through the rest. Measured with libblkio at queue depth 32 on
/// one queue (2-core VM): raw file 4k random reads 284k -> 441k IOPS at
/// 3.4 -> 2.2 µs of backend CPU each, null-co 647k -> 1074k; rounds of 8
/// and 4 gave the same, so 16 keeps the larger batch.
pub(super) const MAX_BATCH: usize = 16;

/// Takes up to [`MAX_BATCH`] available requests of a queue and starts
/// them; true when it stopped at that limit with more available.
pub(super) fn take_requests(q: &mut QueueRun, qi: usize, ctx: &mut IoContext) -> bool {
    if q.failed {
        return false;
    }
    let snap = snapshot(q);
    let mem: &Mem = &snap;
    if ring_is_broken(q) {
        return false;
    }
    let capacity = q.dev.capacity.load(Ordering::Relaxed);
    if capacity != q.capacity_seen {
        q.limits.set_capacity_bytes(capacity);
        q.capacity_seen = capacity;
    }
    prefetch_next(q);
    q.backend.new_round();
    // Requests the error policy held go again once `cont` ran.
    q.backend.retry_held(ctx);
    // Kicks stay off until the thread is about to sleep (VhostQueues::arm turns
    // them on and looks again).
    let _ = q.queue.disable_notification(mem);
    for _ in 0..MAX_BATCH {
        let Some(si) = q.free.pop() else {
            return false;
        };
        if !q.backend.enter() {
            q.free.push(si);
            q.held = true;
            return false;
        }
        let Some(chain) = q.queue.pop_descriptor_chain(mem) else {
            q.backend.leave();
            q.free.push(si);
            return false;
        };
        let head = chain.head_index();
        if head >= q.queue.size() {
            q.backend.leave();
            q.free.push(si);
            q.failed = true;
            log::warn!(
                "queue {} of '{}': the guest made descriptor {head} available in a ring of {}; \
                 the queue stops until the frontend sets it up again",
                q.key.1,
                q.dev.id,
                q.queue.size()
            );
            return false;
        }
        handle_chain(q, qi, si as usize, chain, &snap, ctx);
    }
    !q.free.is_empty() && polled_avail_idx(q).is_some_and(|a| a != q.queue.next_avail())
}

/// The queue's snapshot of guest memory, renewed when the frontend changed
/// the memory table.
pub(super) fn snapshot(q: &mut QueueRun) -> Snap {
    let generation = q.mem.generation();
    if generation != q.snap_generation {
        let current = q.mem.memory();
        q.snap_generation = generation;
        if !std::ptr::eq::<Mem>(&*current, &**q.snap) {
            q.avail_idx_at = None;
            q.snap = Arc::new(current);
        }
    }
    q.snap.clone()
}

impl QueueRun {
    /// Whether the queue may take requests now: not held back by a drain
    /// (retried on a timer), not stopping or failed, and with a free slot
    /// (every slot busy happens only with a misbehaving guest, and a
    /// completion wakes the thread anyway).
    pub(super) fn can_take(&self) -> bool {
        !self.held && !self.failed && self.stopping.is_none() && !self.free.is_empty()
    }
}

/// Starts fetching what taking the next request reads, in parallel rather
/// than one line after the other as the reads depend on each other: the
/// avail ring entry, and the descriptor and header the last request used
/// (the likely ones when the driver keeps one request in flight).
fn prefetch_next(q: &QueueRun) {
    use crate::export::cache_hint::prefetch_read;
    if let Some(idx) = q.avail_idx_at {
        let slot = usize::from(q.queue.next_avail() % q.queue.size().max(1));
        // The ring's entries follow its index: 2 + 2 * slot bytes on.
        prefetch_read((idx as *const u8).wrapping_add(2 + 2 * slot));
    }
    for &g in &q.guess {
        if g != 0 {
            prefetch_read(g as *const u8);
        }
    }
}

/// Notes where the last lone request's head descriptor and header were
/// (see `QueueRun::guess`). Called once the guest has been told about the
/// completion, and before the queue takes anything new, so the slot still
/// holds that request.
pub(super) fn remember_guess(q: &mut QueueRun) {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    let Some(si) = q.guess_slot.take() else {
        return;
    };
    let Some(slot) = q.slots.get(usize::from(si)) else {
        return;
    };
    // Only a guess that held last time is used: a driver that rotates its
    // descriptors or headers would have the lines it is about to write
    // pulled away from its CPU for nothing.
    let (head, header) = (slot.head, slot.req.header_addr());
    let repeated = std::mem::replace(&mut q.last_lone, (head, header)) == (head, header);
    // Measured: with a driver that sleeps between requests the prefetch
    // cost it about 5 % of its requests per second (why is not clear); a
    // polling driver's round trip, where the time goes to these transfers,
    // gains about 0.15 µs.
    if !repeated || q.driver_waits {
        q.guess = [0, 0];
        return;
    }
    let mem: &Mem = &q.snap;
    let desc = q
        .queue
        .desc_table()
        .checked_add(16 * u64::from(head))
        .map(GuestAddress);
    let host = |a: Option<GuestAddress>| {
        a.and_then(|a| mem.get_host_address(a).ok())
            .map_or(0, |p| p as usize)
    };
    q.guess = [host(desc), host(header)];
}

/// The avail index as polling reads it: through a pointer into the
/// queue's current snapshot, found once per snapshot, instead of a region
/// lookup on every look; the usual way where the index is not plainly
/// addressable. `None` when it cannot be read at all.
pub(super) fn polled_avail_idx(q: &mut QueueRun) -> Option<u16> {
    match cached_avail_idx(q) {
        Some(a) => Some(a),
        None => q
            .queue
            .avail_idx(&**q.snap, Ordering::Acquire)
            .ok()
            .map(|a| a.0),
    }
}

fn cached_avail_idx(q: &mut QueueRun) -> Option<u16> {
    use vm_memory::{GuestAddress, GuestMemoryBackend};
    if q.avail_idx_at.is_none() {
        let at = GuestAddress(q.queue.avail_ring().checked_add(2)?);
        if !q.snap.check_range(at, 2) {
            return None;
        }
        let p = q.snap.get_host_address(at).ok()?;
        if (p as usize) % std::mem::align_of::<std::sync::atomic::AtomicU16>() != 0 {
            return None;
        }
        q.avail_idx_at = Some(p as *const std::sync::atomic::AtomicU16);
    }
    let p = q.avail_idx_at?;
    // SAFETY: `p` points at two aligned bytes inside a region of `q.snap`
    // (checked above), whose mapping the snapshot keeps alive; the pointer
    // is forgotten whenever `q.snap` is replaced. The guest writes the
    // index concurrently, hence the atomic load.
    let v = unsafe { (*p).load(Ordering::Acquire) };
    Some(u16::from_le(v))
}

/// Whether the guest claims more new entries than the ring holds; such a
/// queue is marked broken (and said so once).
pub(super) fn ring_is_broken(q: &mut QueueRun) -> bool {
    let Some(avail) = polled_avail_idx(q) else {
        return true;
    };
    let pending = avail.wrapping_sub(q.queue.next_avail());
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
        Ok(()) => {
            if let Some(a) = slot.req.status_addr() {
                prefetch_status::<Mem>(mem, a);
            }
            start_request(q, qi, si, mem, ctx)
        }
        Err(e) => {
            e.log();
            if e.is_invalid_range() {
                let kind = match slot.req.request_type() {
                    RequestType::In => Some(IoKind::Read),
                    RequestType::Out => Some(IoKind::Write),
                    RequestType::Discard => Some(IoKind::Discard),
                    RequestType::WriteZeroes => Some(IoKind::WriteZeroes { unmap: false }),
                    RequestType::Flush | RequestType::GetId => None,
                };
                if let Some(kind) = kind {
                    q.backend.invalid(kind);
                }
            }
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
pub(super) fn resubmit_heads(q: &mut QueueRun, qi: usize, heads: &[u16], ctx: &mut IoContext) {
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
        if !q.backend.enter() {
            q.free.push(si);
            break;
        }
        let Some(chain) = sq.pop_descriptor_chain(&shadow) else {
            q.backend.leave();
            q.free.push(si);
            break;
        };
        handle_chain(q, qi, si as usize, chain, &mem, ctx);
    }
    if let Err(e) = ctx.submit() {
        log::error!("I/O submission failed: {e}");
    }
}

fn tag(qi: usize, si: usize) -> u64 {
    ((qi as u64) << 32) | si as u64
}

/// The virtio-blk status of a request the backend finished. UNSUPP is
/// the parser's answer (request types and flags the device does not
/// offer); anything that reached the backend and failed is IOERR.
fn virtio_status(status: Status) -> u8 {
    match status {
        Status::Ok => VIRTIO_BLK_S_OK,
        Status::Error(_) => VIRTIO_BLK_S_IOERR,
    }
}

/// Hands a parsed request to the backend (GET_ID is answered here: it
/// concerns the device, not the disk).
fn start_request(q: &mut QueueRun, qi: usize, si: usize, mem: &Snap, ctx: &mut IoContext) {
    let m: &Mem = mem;
    let Some(slot) = q.slots.get(si) else {
        return;
    };
    let req = &slot.req;
    let t = tag(qi, si);
    let (kind, offset, len) = match req.request_type() {
        RequestType::GetId => {
            let status = match req.write_device_id(m, &q.dev.device_id) {
                Ok(_) => VIRTIO_BLK_S_OK,
                Err(_) => VIRTIO_BLK_S_IOERR,
            };
            return finish(q, si, m, status);
        }
        RequestType::In => (IoKind::Read, req.offset(), u64::from(req.data_len())),
        RequestType::Out => (IoKind::Write, req.offset(), u64::from(req.data_len())),
        RequestType::Flush => (IoKind::Flush, 0, 0),
        // The device offers one range per request (max_discard_seg and
        // max_write_zeroes_seg are 1), which the parser checked.
        t @ (RequestType::Discard | RequestType::WriteZeroes) => {
            let Some(range) = req.ranges().first().copied() else {
                return finish(q, si, m, VIRTIO_BLK_S_OK);
            };
            let kind = if t == RequestType::Discard {
                IoKind::Discard
            } else {
                IoKind::WriteZeroes { unmap: range.unmap }
            };
            (kind, range.offset(), range.len_bytes())
        }
    };
    let r = BackendRequest {
        kind,
        offset,
        len,
        tag: t,
    };
    let keep = if matches!(kind, IoKind::Read | IoKind::Write) {
        let mapped = q
            .backend
            .iovecs(si)
            .is_some_and(|iov| req.host_iovecs(m, iov).is_ok());
        if !mapped {
            let status = q.backend.reject(si, r);
            return finish(q, si, m, virtio_status(status));
        }
        Some(mem.clone())
    } else {
        None
    };
    // SAFETY: the iovecs point into guest memory that `keep`, the
    // request's own snapshot, keeps mapped; the slot is not reused (nor
    // its iovecs touched) until the backend gives the request back.
    if let Some(done) = unsafe { q.backend.submit(ctx, si, r, keep) } {
        finish_done(q, si, done);
    }
}

/// A completion from the engine.
pub(super) fn complete(q: &mut QueueRun, si: usize, result: i32, ctx: &mut IoContext) {
    if let Some(done) = q.backend.complete(ctx, si, result) {
        finish_done(q, si, done);
    }
}

/// Answers a request the backend finished, in the memory its buffers
/// came from when the backend kept it.
fn finish_done(q: &mut QueueRun, si: usize, done: Done<Snap>) {
    let mem = match done.keep {
        Some(m) => m,
        None => snapshot(q),
    };
    finish(q, si, &mem, virtio_status(done.status));
}

/// Writes the status, returns the chain to the guest and frees the slot.
fn finish(q: &mut QueueRun, si: usize, mem: &Mem, status: u8) {
    let Some(slot) = q.slots.get(si) else {
        return;
    };
    let used = match slot.req.status_addr() {
        Some(a) if write_status(mem, a, status).is_ok() => slot.req.used_len(status),
        _ => 0,
    };
    release(q, si, mem, used);
    if q.in_flight == 0 {
        q.guess_slot = Some(si as u16);
    } else {
        q.guess = [0, 0];
        q.guess_slot = None;
    }
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
    q.free.push(si as u16);
    q.in_flight -= 1;
    q.backend.leave();
    q.need_notify = true;
}
