//! Draining and publishing: how the control plane changes what the data
//! plane uses without a lock on the I/O path.
//!
//! A [`RootSlot`] holds the node a user (an export's backend, a job) sends
//! its requests to. Each I/O thread keeps a [`LocalRoot`]: its own clone of
//! the `Arc`, refreshed only when the slot's generation moves, so a request
//! costs one atomic load.
//!
//! Changing the root is: [`RootSlot::quiesce`] (new requests are held
//! back), waiting until [`Quiesced::in_flight`] is 0 (the graph's
//! [`crate::block::graph::PendingChange`] does, without blocking the
//! control thread), [`Quiesced::publish`] (the new node is installed and
//! the generation bumped), and dropping the guard (requests flow again). Every I/O thread counts its own
//! requests in its own [`InFlight`] counter, on its own cache line, so two
//! queues on two threads never write a shared line.

use super::io::BlockIo;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Requests in flight on one I/O thread, padded to its own cache line.
#[repr(align(128))]
#[derive(Debug, Default)]
pub struct InFlight {
    count: AtomicU64,
}

impl InFlight {
    pub fn get(&self) -> u64 {
        self.count.load(Ordering::SeqCst)
    }
}

pub type Root = Arc<dyn BlockIo>;

#[derive(Default)]
struct Shared {
    root: Option<Root>,
    users: Vec<Arc<InFlight>>,
}

/// The root node of a data-plane user, published to its I/O threads.
#[derive(Default)]
pub struct RootSlot {
    generation: AtomicU64,
    quiesced: AtomicBool,
    shared: Mutex<Shared>,
}

/// Why a drain did not complete.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{pending} requests still in flight after {waited_ms} ms")]
pub struct DrainTimeout {
    pub pending: u64,
    pub waited_ms: u128,
}

impl RootSlot {
    pub fn new(root: Option<Root>) -> Self {
        RootSlot {
            generation: AtomicU64::new(1),
            quiesced: AtomicBool::new(false),
            shared: Mutex::new(Shared {
                root,
                users: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding this lock leaves the data consistent (every
        // write is a single assignment), so a poisoned lock is still usable.
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers an I/O thread; it counts its requests in the returned
    /// counter and reads the root through [`LocalRoot`].
    pub fn register(self: &Arc<Self>) -> LocalRoot {
        let inflight = Arc::new(InFlight::default());
        self.lock().users.push(inflight.clone());
        LocalRoot {
            slot: self.clone(),
            inflight,
            generation: 0,
            root: None,
        }
    }

    /// The current root, for the control plane.
    pub fn current(&self) -> Option<Root> {
        self.lock().root.clone()
    }

    /// Requests in flight on all the slot's I/O threads.
    pub fn in_flight(&self) -> u64 {
        self.lock().users.iter().map(|u| u.get()).sum()
    }

    /// Holds back new requests and returns at once; requests already in
    /// flight go on. The slot is drained once [`Quiesced::in_flight`] is 0,
    /// and resumes when the guard is dropped.
    pub fn quiesce(self: &Arc<Self>) -> Quiesced {
        self.quiesced.store(true, Ordering::SeqCst);
        Quiesced { slot: self.clone() }
    }

    fn resume(&self) {
        self.quiesced.store(false, Ordering::SeqCst);
    }
}

/// A quiesced slot: nothing new starts until this guard is dropped, and
/// once nothing is in flight the root may be replaced.
pub struct Quiesced {
    slot: Arc<RootSlot>,
}

impl Quiesced {
    /// Requests still in flight; the drain is complete at 0 (no request
    /// can start while the guard lives).
    pub fn in_flight(&self) -> u64 {
        self.slot.in_flight()
    }

    /// Whether this guard holds `slot`.
    pub fn holds(&self, slot: &Arc<RootSlot>) -> bool {
        Arc::ptr_eq(&self.slot, slot)
    }

    /// Installs a new root; I/O threads pick it up on their next request.
    /// Only once the drain is complete (nothing in flight); the graph
    /// checks that before it publishes. The count may read 1 for a moment
    /// even then: a thread trying to start a request counts it before it
    /// sees the slot quiesced, and takes it back without touching the
    /// root, so it is not asserted here.
    pub fn publish(&self, root: Option<Root>) {
        let mut shared = self.slot.lock();
        shared.root = root;
        self.slot.generation.fetch_add(1, Ordering::SeqCst);
    }
}

impl Drop for Quiesced {
    fn drop(&mut self) {
        self.slot.resume();
    }
}

/// One I/O thread's view of a [`RootSlot`].
pub struct LocalRoot {
    slot: Arc<RootSlot>,
    inflight: Arc<InFlight>,
    generation: u64,
    root: Option<Root>,
}

impl LocalRoot {
    /// Starts a request: counts it in flight and makes sure the root is
    /// current. Returns false (and counts nothing) while the slot is
    /// drained; the caller holds the request back and tries again later.
    pub fn enter(&mut self) -> bool {
        // Count first, then look at the flag: together with a drain, which
        // sets the flag first and then reads the counts, a request either
        // sees the drain or is seen by it.
        self.inflight.count.fetch_add(1, Ordering::SeqCst);
        if self.slot.quiesced.load(Ordering::SeqCst) {
            self.inflight.count.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        let generation = self.slot.generation.load(Ordering::SeqCst);
        if generation != self.generation {
            self.root = self.slot.lock().root.clone();
            self.generation = generation;
        }
        true
    }

    /// Which publication of the slot [`Self::root`] is: it changes
    /// whenever a new root was picked up.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// The root for requests started with [`Self::enter`].
    pub fn root(&self) -> Option<&Root> {
        self.root.as_ref()
    }

    /// Ends a request started with [`Self::enter`].
    pub fn leave(&self) {
        self.inflight.count.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drop for LocalRoot {
    fn drop(&mut self) {
        let mine = &self.inflight;
        self.slot.lock().users.retain(|u| !Arc::ptr_eq(u, mine));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::error::BlockError;
    use std::sync::atomic::AtomicU64;
    use std::time::{Duration, Instant};

    /// Quiesces and waits, as the graph's pending change does in steps.
    fn drain(slot: &Arc<RootSlot>, timeout: Duration) -> Result<Quiesced, DrainTimeout> {
        let q = slot.quiesce();
        let start = Instant::now();
        loop {
            let pending = q.in_flight();
            if pending == 0 {
                return Ok(q);
            }
            if start.elapsed() >= timeout {
                return Err(DrainTimeout {
                    pending,
                    waited_ms: start.elapsed().as_millis(),
                });
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// A node whose length names it, counting requests that use it while it
    /// is no longer published.
    struct Tagged {
        tag: u64,
        retired: AtomicBool,
        late_uses: AtomicU64,
    }

    impl BlockIo for Tagged {
        fn length(&self) -> Result<u64, BlockError> {
            if self.retired.load(Ordering::SeqCst) {
                self.late_uses.fetch_add(1, Ordering::SeqCst);
            }
            Ok(self.tag)
        }
        fn truncate(&self, _: u64) -> Result<(), BlockError> {
            Ok(())
        }
        fn flush(&self) -> Result<(), BlockError> {
            Ok(())
        }
        fn submit(&self, ctx: &mut crate::io::IoContext, req: &crate::block::io::IoRequest) {
            ctx.complete_now(req.tag(), 0);
        }
    }

    fn tagged(tag: u64) -> Arc<Tagged> {
        Arc::new(Tagged {
            tag,
            retired: AtomicBool::new(false),
            late_uses: AtomicU64::new(0),
        })
    }

    #[test]
    fn drained_swap_is_never_seen_half_done() {
        let first = tagged(1);
        let slot = Arc::new(RootSlot::new(Some(first.clone() as Root)));
        let stop = Arc::new(AtomicBool::new(false));
        let saw_new = Arc::new(AtomicU64::new(0));
        let workers: Vec<_> = (0..2)
            .map(|_| {
                let mut local = slot.register();
                let stop = stop.clone();
                let saw_new = saw_new.clone();
                std::thread::spawn(move || {
                    let mut seen = Vec::new();
                    let mut counted = false;
                    while !stop.load(Ordering::SeqCst) {
                        if local.enter() {
                            let tag = local.root().map(|r| r.length().unwrap_or(0));
                            std::thread::yield_now();
                            local.leave();
                            if tag == Some(2) && !counted {
                                counted = true;
                                saw_new.fetch_add(1, Ordering::SeqCst);
                            }
                            seen.push(tag);
                        }
                    }
                    seen
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        let second = tagged(2);
        {
            let drained = drain(&slot, Duration::from_secs(5)).unwrap();
            first.retired.store(true, Ordering::SeqCst);
            drained.publish(Some(second.clone() as Root));
        }
        // Wait (on a loaded machine, a while) until both workers used it.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while saw_new.load(Ordering::SeqCst) < 2 && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        stop.store(true, Ordering::SeqCst);
        let seen: Vec<Vec<Option<u64>>> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert_eq!(first.late_uses.load(Ordering::SeqCst), 0);
        for s in &seen {
            let switch = s.iter().position(|t| *t == Some(2)).unwrap_or(s.len());
            assert!(s[..switch].iter().all(|t| *t == Some(1)));
            assert!(s[switch..].iter().all(|t| *t == Some(2)));
            assert!(switch < s.len(), "worker never saw the new root");
        }
    }

    #[test]
    fn drain_waits_for_request_in_flight_and_times_out() {
        let slot = Arc::new(RootSlot::new(None));
        let mut local = slot.register();
        assert!(local.enter());
        let err = drain(&slot, Duration::from_millis(30)).err();
        assert_eq!(err.map(|e| e.pending), Some(1));
        local.leave();
        assert!(drain(&slot, Duration::from_millis(30)).is_ok());
    }

    #[test]
    fn requests_are_held_back_while_drained() {
        let slot = Arc::new(RootSlot::new(None));
        let mut local = slot.register();
        let drained = drain(&slot, Duration::from_millis(30)).unwrap();
        assert!(!local.enter());
        drop(drained);
        assert!(local.enter());
        local.leave();
    }
}
