//! The data-plane BlockBackend: the layer between an export's transport
//! and the export's root node, as QEMU's BlockBackend is for its devices.
//!
//! A transport (a vhost-user virtqueue today, an NBD connection later)
//! knows its wire format: it takes requests off the ring or the socket,
//! checks them, and writes the answer back in its own terms. Everything
//! in between that a disk device does whatever the wire is happens here:
//!
//! * the **medium**: the root node, published through a [`RootSlot`] and
//!   read through the queue's own [`LocalRoot`]; with no node, requests
//!   fail with `ENOMEDIUM`;
//! * **buffers** a node cannot take: an O_DIRECT node needs aligned
//!   buffers, and guest buffers that are not get an aligned copy (a bounce
//!   buffer, per request slot, grown on demand and reused);
//! * **writethrough**: while the guest has not enabled its write cache,
//!   a write completes only after the flush that follows it;
//! * **statistics** for query-blockstats, counted per queue;
//! * **I/O limits** (`block_set_io_throttle`): a membership in a throttle
//!   group, checked per request with one relaxed load while unlimited;
//! * the **fate of a failed request**, decided in one place
//!   ([`ErrorAction`]) from the device's `rerror`/`werror`: reported,
//!   ignored, or held while the device stops until `cont`.
//!
//! What a read past the end of a file returns is the file driver's
//! business (it zero-fills), so a backend never sees a short read.
//!
//! A [`Backend`] is shared by an export's queues; each queue (on its I/O
//! thread) owns a [`BackendQueue`], whose per-request state is a slab
//! indexed by the transport's own slot numbers, so the request path
//! allocates nothing, takes no lock and writes no cache line another
//! queue writes. Completions come back on the thread's
//! [`IoContext`](crate::io::IoContext) under the transport's tag; the
//! transport hands them to [`BackendQueue::complete`], which either
//! finishes the request or sends it on (the flush of a writethrough
//! write) under the same tag.

mod acct;
mod bounce;
mod policy;
mod queue;
mod stop;
#[cfg(test)]
mod tests;

pub use policy::{ErrorAction, ErrorPolicy};
pub use queue::BackendQueue;
pub use stop::Waker;

use crate::block::drain::RootSlot;
use crate::block::io::IoKind;
use crate::block::stats::{Accounting, QueueStats, StatsEpoch};
use crate::block::throttle::shared::Membership;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// What an export's queues share: the medium, the cache mode, the
/// statistics.
pub struct Backend {
    /// The export id, for messages.
    name: String,
    slot: Arc<RootSlot>,
    /// Writeback (true) or writethrough, as the guest last chose.
    writeback: AtomicBool,
    /// One block of counters per queue.
    stats: Vec<QueueStats>,
    epoch: StatsEpoch,
    /// The throttle group the device is in, if any; queues pick up a
    /// change when `throttle_gen` moves.
    throttle: Mutex<Option<Arc<Membership>>>,
    throttle_gen: AtomicU64,
    /// rerror and werror.
    policy: ErrorPolicy,
    /// Whether an error stopped the device, and what `cont` needs.
    stop: stop::StopState,
}

/// How a backend is set up (an export's options).
#[derive(Debug, Clone, Default)]
pub struct BackendOptions {
    pub writeback: bool,
    pub accounting: Accounting,
    pub policy: ErrorPolicy,
}

impl Backend {
    /// A backend over the root in `slot`, for `queues` queues.
    pub fn new(name: &str, slot: Arc<RootSlot>, queues: usize, writeback: bool) -> Arc<Self> {
        let opts = BackendOptions {
            writeback,
            ..BackendOptions::default()
        };
        Self::with_options(name, slot, queues, &opts)
    }

    /// As [`Self::new`], with the export's accounting and error policy.
    pub fn with_options(
        name: &str,
        slot: Arc<RootSlot>,
        queues: usize,
        opts: &BackendOptions,
    ) -> Arc<Self> {
        Arc::new(Backend {
            name: name.to_string(),
            slot,
            writeback: AtomicBool::new(opts.writeback),
            stats: (0..queues)
                .map(|_| QueueStats::new(&opts.accounting))
                .collect(),
            epoch: StatsEpoch::default(),
            throttle: Mutex::new(None),
            throttle_gen: AtomicU64::new(0),
            policy: opts.policy,
            stop: stop::StopState::default(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether writes complete without a flush (the guest's write cache).
    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// The guest switched its write cache on or off.
    pub fn set_writeback(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// The device's throttle group membership.
    pub fn throttle(&self) -> Option<Arc<Membership>> {
        self.throttle
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Puts the device in a throttle group (or takes it out); queues
    /// follow at their next request. Requests already held keep the
    /// membership they waited under.
    pub fn set_throttle(&self, m: Option<Arc<Membership>>) {
        *self.throttle.lock().unwrap_or_else(PoisonError::into_inner) = m;
        self.throttle_gen.fetch_add(1, Ordering::Release);
    }

    /// The counters of all queues, added up (query-blockstats).
    pub fn io_stats(&self) -> crate::qapi::BlockDeviceStats {
        crate::block::stats::sum(&self.stats, &self.epoch)
    }

    /// The state queue `index` keeps on its I/O thread, with room for
    /// `slots` requests at a time. `K` is what keeps a request's buffers
    /// mapped until it completes (the transport's choice).
    pub fn queue<K>(self: &Arc<Self>, index: usize, slots: usize) -> BackendQueue<K> {
        BackendQueue::new(self.clone(), self.slot.register(), index, slots)
    }
}

/// A request as a transport hands it to the backend. Reads and writes
/// carry their buffers in the slot's iovecs
/// ([`BackendQueue::iovecs`]); the other kinds carry none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub kind: IoKind,
    pub offset: u64,
    pub len: u64,
    /// The transport's tag: the completion on the thread's context
    /// carries it. Bits 62 and 63 must be clear (the context uses them).
    pub tag: u64,
}

/// How a request ended, for the transport to say in its own terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Ok,
    /// Failed with this errno (`ENOMEDIUM` without a medium).
    Error(i32),
}

/// A finished request: its status, and the keep-alive handle the
/// transport gave with it (for writing the answer into the same memory).
pub struct Done<K> {
    pub status: Status,
    pub keep: Option<K>,
}
