//! One queue's side of the backend, on its I/O thread: per-request state
//! in a slab indexed by the transport's slot numbers, and the steps from a
//! transport's request to its node and back.

use super::acct::{self, acct_of, Finished};
use super::bounce::{is_aligned, Bounce};
use super::policy::ErrorAction;
use super::{Backend, Done, Request, Status};
use crate::block::drain::LocalRoot;
use crate::block::io::{IoKind, IoRequest};
use crate::block::stats::Acct;
use crate::block::throttle::shared::{wait_turn, Membership, Waiter};
use crate::block::throttle::Direction;
use crate::io::IoContext;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// Tag bits the I/O context keeps for itself.
const RESERVED_TAG_BITS: u64 = 3 << 62;

/// What the backend keeps of one request in flight.
struct Entry<K> {
    /// The buffers, as the transport filled them in.
    iov: Vec<libc::iovec>,
    /// Keeps the memory `iov` points into mapped.
    keep: Option<K>,
    tag: u64,
    kind: IoKind,
    offset: u64,
    /// Bytes the node must transfer (0 once a writethrough write went on
    /// to its flush).
    len: u64,
    /// A write in writethrough mode: its flush is still to come.
    flush_pending: bool,
    acct: Acct,
    acct_bytes: u64,
    acct_end: u64,
    started_ns: u64,
    bounce: Bounce,
}

impl<K> Entry<K> {
    fn new() -> Self {
        Entry {
            iov: Vec::with_capacity(8),
            keep: None,
            tag: 0,
            kind: IoKind::Flush,
            offset: 0,
            len: 0,
            flush_pending: false,
            acct: Acct::Flush,
            acct_bytes: 0,
            acct_end: 0,
            started_ns: 0,
            bounce: Bounce::default(),
        }
    }
}

/// A queue's state on its I/O thread (see the module docs of
/// [`super`]). `K` is the transport's keep-alive handle for the memory
/// a request's buffers point into.
pub struct BackendQueue<K> {
    backend: Arc<Backend>,
    root: LocalRoot,
    /// Which block of the backend's statistics this queue counts into.
    index: usize,
    /// The root's buffer alignment, looked up when the root changes
    /// rather than per request.
    align: usize,
    /// The root generation `align` belongs to.
    align_of: u64,
    slab: Vec<Entry<K>>,
    /// The start time of the requests of the current round.
    clock: Option<u64>,
    /// Requests finished but not yet counted; room for every slot is
    /// reserved up front.
    finished: Vec<Finished>,
    /// The backend's throttle membership as of `gate_gen`.
    gate: Option<Arc<Membership>>,
    gate_gen: u64,
    /// Slots whose failed request the error policy holds, oldest first.
    held: Vec<usize>,
    /// The backend's resume count these were held under.
    held_since: u64,
}

impl<K> BackendQueue<K> {
    pub(super) fn new(backend: Arc<Backend>, root: LocalRoot, index: usize, slots: usize) -> Self {
        BackendQueue {
            backend,
            root,
            index,
            align: 1,
            align_of: 0,
            slab: (0..slots).map(|_| Entry::new()).collect(),
            clock: None,
            finished: Vec::with_capacity(slots),
            gate: None,
            gate_gen: 0,
            held: Vec::with_capacity(slots),
            held_since: 0,
        }
    }

    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Counts a request in flight before the transport takes it; false
    /// while the medium is being changed (a drain): the transport leaves
    /// the request where it is and tries again shortly.
    #[inline]
    pub fn enter(&mut self) -> bool {
        // A device an error stopped takes nothing new until `cont`.
        if self.backend.stop.stopped.load(Ordering::Relaxed) {
            return false;
        }
        if !self.root.enter() {
            return false;
        }
        let generation = self.root.generation();
        if generation != self.align_of {
            self.align_of = generation;
            self.align = self.root.root().map_or(1, |r| r.mem_alignment().max(1));
        }
        true
    }

    /// Ends a request counted by [`Self::enter`] (once the transport has
    /// answered it, whether or not it reached the backend).
    #[inline]
    pub fn leave(&self) {
        self.root.leave();
    }

    /// The transport starts a new round of requests: they share one
    /// reading of the clock, taken when the first is submitted.
    #[inline]
    pub fn new_round(&mut self) {
        self.clock = None;
    }

    /// The iovecs of slot `si`, for the transport to fill with a read's or
    /// write's buffers before [`Self::submit`]. None for a slot that does
    /// not exist.
    #[inline]
    pub fn iovecs(&mut self, si: usize) -> Option<&mut Vec<libc::iovec>> {
        self.slab.get_mut(si).map(|e| &mut e.iov)
    }

    /// Starts `req` in slot `si`; a read or write uses the slot's iovecs,
    /// whose memory `keep` keeps mapped until the request is done.
    ///
    /// Returns the request when it ended at once (no medium, no bounce
    /// buffer to be had); otherwise its completion comes on `ctx` under
    /// `req.tag`, for [`Self::complete`].
    ///
    /// # Safety
    /// For a read or write, the slot's iovecs must describe `req.len`
    /// bytes of memory that stays valid (and for a read, writable) while
    /// `keep` is held, and neither may be touched by the transport until
    /// the request is done.
    #[inline]
    pub unsafe fn submit(
        &mut self,
        ctx: &mut IoContext,
        si: usize,
        req: Request,
        keep: Option<K>,
    ) -> Option<Done<K>> {
        debug_assert_eq!(req.tag & RESERVED_TAG_BITS, 0, "tag bits 62 and 63");
        let started = *self
            .clock
            .get_or_insert_with(|| self.backend.epoch.now_ns());
        let Some(e) = self.slab.get_mut(si) else {
            log::error!("backend '{}': no request slot {si}", self.backend.name);
            return Some(Done {
                status: Status::Error(libc::EINVAL),
                keep,
            });
        };
        e.tag = req.tag;
        e.kind = req.kind;
        e.offset = req.offset;
        e.len = req.len;
        e.flush_pending = false;
        e.acct = acct_of(req.kind);
        e.acct_bytes = if req.kind == IoKind::Flush {
            0
        } else {
            req.len
        };
        e.acct_end = req.offset.saturating_add(e.acct_bytes);
        e.started_ns = started;
        e.keep = keep;
        let Some(root) = self.root.root() else {
            return self.fail(si, libc::ENOMEDIUM);
        };
        let io = match req.kind {
            IoKind::Read | IoKind::Write => {
                let write = req.kind == IoKind::Write;
                e.flush_pending = write && !self.backend.writeback();
                let align = self.align;
                if align > 1 && !is_aligned(&e.iov, align) {
                    let len = usize::try_from(req.len).unwrap_or(usize::MAX);
                    // SAFETY: the caller's contract: the iovecs describe
                    // `len` bytes of valid memory until the request is
                    // done, which ends the copy.
                    if !unsafe { e.bounce.start(&e.iov, len, align, write) } {
                        return self.fail(si, libc::ENOMEM);
                    }
                }
                let (iov, iovcnt) = if e.bounce.active() {
                    (e.bounce.iov(), 1)
                } else {
                    (e.iov.as_ptr(), e.iov.len() as u32)
                };
                // SAFETY: the iovecs point into memory kept valid by `keep`
                // (the caller's contract) or into the slot's bounce buffer;
                // the entry is not reused, nor its vectors touched, before
                // this tag completes.
                unsafe { IoRequest::new(req.kind, req.offset, req.len, iov, iovcnt, req.tag) }
            }
            kind => IoRequest::without_data(kind, req.offset, req.len, req.tag),
        };
        let gen = self.backend.throttle_gen.load(Ordering::Acquire);
        if gen != self.gate_gen {
            self.gate_gen = gen;
            self.gate = self.backend.throttle();
        }
        if let Some(gate) = self.gate.as_ref().filter(|g| g.group.enabled()) {
            let dir = match req.kind {
                IoKind::Read => Some(Direction::Read),
                IoKind::Flush => None,
                _ => Some(Direction::Write),
            };
            if let Some(dir) = dir {
                if let Some(waiter) = gate.group.arrive(gate.member, dir, req.len) {
                    ctx.spawn(req.tag, held(gate.clone(), waiter, root.clone(), io, dir));
                    return None;
                }
            }
        }
        root.submit(ctx, &io);
        None
    }

    /// Counts slot `si`'s request as failed without starting it (the
    /// transport found its buffers unusable): it is not an I/O error, so
    /// no error policy applies.
    pub fn reject(&mut self, si: usize, req: Request) -> Status {
        let started = *self
            .clock
            .get_or_insert_with(|| self.backend.epoch.now_ns());
        let bytes = if req.kind == IoKind::Flush {
            0
        } else {
            req.len
        };
        self.finished.push(Finished {
            kind: acct_of(req.kind),
            bytes,
            started_ns: started,
            ok: false,
            end: req.offset.saturating_add(bytes),
        });
        if let Some(e) = self.slab.get_mut(si) {
            e.keep = None;
        }
        Status::Error(libc::EFAULT)
    }

    /// The completion of slot `si`'s request (bytes done, or `-errno`)
    /// came on the context. Returns the request when it is done; None
    /// when it went on (the flush of a writethrough write, under the same
    /// tag) or names no slot.
    #[inline]
    pub fn complete(&mut self, ctx: &mut IoContext, si: usize, result: i32) -> Option<Done<K>> {
        let e = self.slab.get_mut(si)?;
        if e.bounce.active() {
            let read = (e.kind == IoKind::Read && result > 0).then_some(result as usize);
            // SAFETY: a read's iovecs describe writable memory still kept
            // by `keep` (submit's contract).
            unsafe { e.bounce.finish(&e.iov, read) };
        }
        let errno = match u64::try_from(result) {
            Err(_) => result.saturating_neg(),
            Ok(done) => match e.kind {
                // Nodes complete reads whole (a file zero-fills its end).
                IoKind::Read if done != e.len => {
                    log::debug!(
                        "backend '{}': a read of {} bytes completed with {done}",
                        self.backend.name,
                        e.len
                    );
                    libc::EIO
                }
                // A write completes with its byte count, or 0 when it
                // was done as a whole another way (detect-zeroes).
                IoKind::Write if done != e.len && done != 0 => libc::EIO,
                IoKind::Write if e.flush_pending => {
                    e.flush_pending = false;
                    e.len = 0;
                    let tag = e.tag;
                    let Some(root) = self.root.root() else {
                        return self.fail(si, libc::ENOMEDIUM);
                    };
                    // Writethrough: the write is done once flushed.
                    root.submit(ctx, &IoRequest::without_data(IoKind::Flush, 0, 0, tag));
                    return None;
                }
                _ => return Some(self.finish(si, Status::Ok)),
            },
        };
        self.fail(si, errno)
    }

    /// The request in slot `si` failed with `errno`: the error policy
    /// decides what it becomes.
    fn fail(&mut self, si: usize, errno: i32) -> Option<Done<K>> {
        let kind = self.slab.get(si)?.kind;
        log::debug!(
            "backend '{}': {kind:?} request failed: {}",
            self.backend.name,
            std::io::Error::from_raw_os_error(errno)
        );
        let action = self.backend.error_action(kind, errno);
        // Read before the notice goes up: a `cont` that answers the
        // notice before this request is held still moves the count past
        // this reading, so the request is retried.
        let resumes = self.backend.stop.resumes.load(Ordering::Acquire);
        self.backend.failed(kind, errno, action);
        match action {
            ErrorAction::Report => Some(self.finish(si, Status::Error(errno))),
            ErrorAction::Ignore => Some(self.finish(si, Status::Ok)),
            ErrorAction::Stop => {
                if self.held.is_empty() {
                    self.held_since = resumes;
                }
                self.held.push(si);
                log::warn!(
                    "backend '{}': {kind:?} request held until cont: {}",
                    self.backend.name,
                    std::io::Error::from_raw_os_error(errno)
                );
                None
            }
        }
    }

    /// The transport stops the queue while requests are held (the
    /// frontend went away): they will not be answered here. Returns their
    /// slots for the transport to recycle, and lets go of their memory;
    /// the transport ends each with [`Self::leave`]. A frontend that
    /// tracks inflight requests submits them again when it comes back.
    pub fn abandon_held(&mut self) -> Vec<usize> {
        let held = std::mem::take(&mut self.held);
        for &si in &held {
            if let Some(e) = self.slab.get_mut(si) {
                e.keep = None;
                e.bounce = Default::default();
            }
        }
        held
    }

    /// Whether the error policy holds requests of this queue.
    pub fn has_held(&self) -> bool {
        !self.held.is_empty()
    }

    /// After `cont`, submits the held requests again, in the order they
    /// failed; their completions come on `ctx` under their tags as any.
    /// The transport calls this whenever it looks at the queue.
    pub fn retry_held(&mut self, ctx: &mut IoContext) {
        if self.held.is_empty()
            || self.backend.stop.stopped.load(Ordering::Acquire)
            || self.backend.stop.resumes.load(Ordering::Acquire) == self.held_since
        {
            return;
        }
        let held = std::mem::take(&mut self.held);
        for &si in &held {
            self.resubmit(ctx, si);
        }
        self.held = held;
        self.held.clear();
    }

    /// Submits slot `si`'s request again as it was (its buffers, or its
    /// bounce buffer, are still the slot's).
    fn resubmit(&mut self, ctx: &mut IoContext, si: usize) {
        let Some(root) = self.root.root() else {
            if let Some(e) = self.slab.get(si) {
                ctx.complete_now(e.tag, -libc::ENOMEDIUM);
            }
            return;
        };
        let Some(e) = self.slab.get(si) else { return };
        let io = match e.kind {
            // A writethrough write that failed in its flush retries the
            // flush (its data is written).
            IoKind::Write if e.len == 0 => IoRequest::without_data(IoKind::Flush, 0, 0, e.tag),
            IoKind::Read | IoKind::Write => {
                let (iov, iovcnt) = if e.bounce.active() {
                    (e.bounce.iov(), 1)
                } else {
                    (e.iov.as_ptr(), e.iov.len() as u32)
                };
                // SAFETY: the entry's iovecs (or its bounce buffer) still
                // point into memory its `keep` keeps valid: the request
                // was never answered, so the transport left them alone.
                unsafe { IoRequest::new(e.kind, e.offset, e.len, iov, iovcnt, e.tag) }
            }
            kind => IoRequest::without_data(kind, e.offset, e.len, e.tag),
        };
        root.submit(ctx, &io);
    }

    /// Ends slot `si`'s request with `status`: notes its accounting and
    /// gives the keep-alive handle back.
    fn finish(&mut self, si: usize, status: Status) -> Done<K> {
        let Some(e) = self.slab.get_mut(si) else {
            return Done { status, keep: None };
        };
        self.finished.push(Finished {
            kind: e.acct,
            bytes: e.acct_bytes,
            started_ns: e.started_ns,
            ok: status == Status::Ok,
            end: e.acct_end,
        });
        Done {
            status,
            keep: e.keep.take(),
        }
    }

    /// Counts a request the transport refused before it reached the
    /// backend because its range was invalid (past the end, misaligned),
    /// as the `invalid_*` figures of query-blockstats.
    pub fn invalid(&mut self, kind: IoKind) {
        if let Some(stats) = self.backend.stats.get(self.index) {
            stats.invalid(acct_of(kind), self.backend.epoch.now_ns());
        }
    }

    /// Counts the requests finished since the last call into the queue's
    /// statistics. The transport calls this once the guest has been told
    /// about them.
    pub fn account_finished(&mut self) {
        acct::count(
            self.backend.stats.get(self.index),
            &self.backend.epoch,
            &mut self.finished,
        );
    }
}

/// A request the device's I/O limits hold back: waits for its turn, then
/// goes to the root it was submitted to.
async fn held(
    gate: Arc<Membership>,
    waiter: Arc<Waiter>,
    root: crate::block::drain::Root,
    io: IoRequest,
    dir: Direction,
) -> i32 {
    wait_turn(&gate.group, gate.member, waiter, dir, io.len()).await;
    crate::io::task::submit(&*root, &io).await
}
