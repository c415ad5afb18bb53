//! The vhost-user queues as the built-in client of an I/O thread
//! ([`crate::iothread::Client`]): the thread's loop calls these hooks to
//! take every available request on a kick or when polling finds one,
//! complete requests from the I/O engine's completions, and notify the
//! guest once per batch (respecting EVENT_IDX). Starting, stopping and
//! re-wiring a queue are messages ([`QueueMsg`]) from the connection's
//! handler.
//!
//! Per-request state lives in slots preallocated per queue, one per ring
//! entry: the parsed request here, its buffers and accounting in the same
//! slot of the queue's backend (`block::backend`), so the request path
//! does not allocate once the slots' vectors have grown. Buffers are
//! iovecs straight into guest memory; a request keeps the memory snapshot
//! it points into until it completes.

use super::inflight::InflightQueue;
use super::memory::AtomicMem;
use super::queue::{
    complete, polled_avail_idx, remember_guess, resubmit_heads, ring_is_broken, snapshot,
    take_requests, QueueRun, Slot,
};
use super::Device;
use crate::export::virtio_blk::{Request, RequestLimits};
use crate::io::{Completion, IoContext};
use crate::iothread::{Client, Ctx};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

/// Which queue of which device.
pub type QueueKey = (u64, u16);

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

/// What the connection's handler asks of a queue's thread.
pub enum QueueMsg {
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
}

/// The queues of one thread; a queue's epoll token is its index here.
#[derive(Default)]
pub struct VhostQueues {
    queues: Vec<Option<QueueRun>>,
}

impl VhostQueues {
    fn find(&mut self, key: QueueKey) -> Option<&mut QueueRun> {
        self.queues.iter_mut().flatten().find(|q| q.key == key)
    }

    fn start(&mut self, ctx: &mut Ctx, s: QueueStart) {
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
            })
            .collect();
        let limits = RequestLimits::new(&s.dev.options);
        if let Err(e) = ctx.watch(s.kick.as_raw_fd(), i as u64) {
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
        // `cont` wakes the queue (as a kick would) to retry what an error
        // stopped it on.
        match s.kick.try_clone() {
            Ok(kick) => s.dev.backend.set_waker(
                usize::from(s.index),
                Some(Arc::new(move || {
                    let _ = kick.write(1);
                })),
            ),
            Err(e) => log::warn!(
                "queue {} of '{}': no waker for cont: {e}",
                s.index,
                s.dev.id
            ),
        }
        self.queues[i] = Some(QueueRun {
            key: (s.dev.uid, s.index),
            backend: s.dev.backend.queue(usize::from(s.index), usize::from(size)),
            dev: s.dev,
            queue,
            kick: s.kick,
            call: s.call,
            snap_generation: s.mem.generation(),
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
            held: false,
            failed: false,
            avail_idx_at: None,
            guess: [0, 0],
            guess_slot: None,
            last_lone: (u16::MAX, None),
            driver_waits: true,
            event_idx,
            inflight,
            broken: false,
        });
        if !resubmit.is_empty() {
            if let Some(q) = self.queues[i].as_mut() {
                resubmit_heads(q, i, &resubmit, &mut ctx.io);
            }
        }
    }

    /// Stops the queues whose requests have all finished.
    fn finish_stops(&mut self, ctx: &Ctx) {
        use std::os::fd::AsRawFd;
        for q in self.queues.iter_mut().flatten() {
            // Requests an error holds would never finish: the stop lets
            // them go unanswered (inflight tracking keeps them for the
            // frontend's next connection).
            if q.stopping.is_some() && q.backend.has_held() {
                for si in q.backend.abandon_held() {
                    log::warn!(
                        "queue {} of '{}': a request held by the error policy is dropped as the queue stops",
                        q.key.1,
                        q.dev.id
                    );
                    q.free.push(si as u16);
                    q.in_flight -= 1;
                    q.backend.leave();
                }
            }
        }
        for entry in self.queues.iter_mut() {
            let done = entry
                .as_ref()
                .is_some_and(|q| q.stopping.is_some() && q.in_flight == 0);
            if !done {
                continue;
            }
            if let Some(q) = entry.take() {
                ctx.unwatch(q.kick.as_raw_fd());
                if let Some(reply) = &q.stopping {
                    let _ = reply.send(q.queue.next_avail());
                }
                log::debug!("queue {} of '{}' stopped", q.key.1, q.dev.id);
            }
        }
    }

    /// Notifies the guest where completions need it, then accounts them.
    fn notify(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            if q.need_notify {
                q.need_notify = false;
                let needed = !q.event_idx || q.queue.needs_notification(&**q.snap).unwrap_or(true);
                q.driver_waits = needed;
                if needed {
                    if let Err(e) = q.call.write(1) {
                        log::warn!("notifying queue {} of '{}': {e}", q.key.1, q.dev.id);
                    }
                }
            }
            q.backend.account_finished();
            remember_guess(q);
        }
    }
}

impl Client for VhostQueues {
    type Msg = QueueMsg;

    fn message(&mut self, ctx: &mut Ctx, msg: QueueMsg) {
        match msg {
            QueueMsg::Start(s) => self.start(ctx, *s),
            QueueMsg::Stop { key, reply } => {
                if let Some(q) = self.find(key) {
                    q.stopping = Some(reply);
                } else {
                    let _ = reply.send(0);
                }
                self.finish_stops(ctx);
            }
            QueueMsg::SetCall { key, call } => {
                if let Some(q) = self.find(key) {
                    q.call = call;
                }
            }
        }
    }

    fn event(&mut self, token: u64) -> bool {
        match self.queues.get_mut(token as usize) {
            Some(Some(q)) => {
                let _ = q.kick.read();
                q.deferred = true;
                true
            }
            _ => false,
        }
    }

    fn has_deferred(&self) -> bool {
        self.queues
            .iter()
            .flatten()
            .any(|q| q.deferred && q.stopping.is_none())
    }

    fn held(&self) -> bool {
        self.queues.iter().flatten().any(|q| q.held)
    }

    fn release_held(&mut self) {
        for q in self.queues.iter_mut().flatten() {
            if q.held {
                q.held = false;
                q.deferred = true;
            }
        }
    }

    /// The avail index through each queue's current snapshot (a memory
    /// table change is picked up when requests are taken).
    fn peek(&mut self) -> bool {
        let mut found = false;
        for q in self.queues.iter_mut().flatten() {
            if !q.can_take() {
                continue;
            }
            // A ring already found broken is looked at again before it
            // counts as work (it would otherwise be found at every turn);
            // taking requests checks every ring anyway.
            if polled_avail_idx(q).is_some_and(|a| a != q.queue.next_avail())
                && !(q.broken && ring_is_broken(q))
            {
                q.deferred = true;
                found = true;
            }
        }
        found
    }

    fn wants_notify(&self) -> bool {
        self.queues.iter().flatten().any(|q| q.need_notify)
    }

    /// Kicks stay off for as long as the thread is awake (see
    /// `take_requests`), so a guest that adds requests while it works, or
    /// polls, does not pay for a kick nobody waits for; this turns them
    /// back on and looks once more (the EVENT_IDX handshake).
    fn arm(&mut self) -> bool {
        let mut found = false;
        for q in self.queues.iter_mut().flatten() {
            if !q.can_take() {
                continue;
            }
            let mem = snapshot(q);
            match q.queue.enable_notification(&**mem) {
                Ok(true) if !ring_is_broken(q) => {
                    q.deferred = true;
                    found = true;
                }
                _ => {}
            }
        }
        found
    }

    /// Takes new requests from every queue that has some. A queue gives
    /// at most [`super::queue::MAX_BATCH`] requests per round; one that
    /// has more stays `deferred` for the next.
    fn process(&mut self, io: &mut IoContext) {
        for i in 0..self.queues.len() {
            let Some(q) = self.queues[i].as_mut() else {
                continue;
            };
            if q.deferred && q.stopping.is_none() {
                q.deferred = take_requests(q, i, io);
            }
        }
    }

    fn complete(&mut self, io: &mut IoContext, c: Completion) {
        let qi = (c.tag >> 32) as usize;
        let si = (c.tag & 0xffff_ffff) as usize;
        let Some(Some(q)) = self.queues.get_mut(qi) else {
            log::error!("completion for a queue that is gone");
            return;
        };
        complete(q, si, c.result, io);
    }

    fn round_done(&mut self, ctx: &mut Ctx) {
        self.notify();
        self.finish_stops(ctx);
    }
}
