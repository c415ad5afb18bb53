//! What code running on an I/O thread reaches: the thread's I/O context,
//! and the registries of its handlers for descriptors, its timers and the
//! tasks other code spawned on it.

use super::polling::PollPolicy;
use crate::io::{Completion, IoContext};
use std::future::Future;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

/// epoll tokens: the control eventfd, the engine's eventfd, the built-in
/// client's descriptors from [`TOKEN_CLIENT`] on, and fd handlers with bit
/// 63 set (their generation and index below).
pub(super) const TOKEN_CONTROL: u64 = 0;
pub(super) const TOKEN_IO: u64 = 1;
pub(super) const TOKEN_CLIENT: u64 = 2;
pub(super) const TOKEN_HANDLER: u64 = 1 << 63;

/// Tag bit of the completions of tasks spawned through [`Ctx::spawn`];
/// the built-in client's tags keep it clear (as they keep 62 and 63, the
/// engine's and the executor's).
pub const TASK_TAG: u64 = 1 << 61;

/// What an fd handler or timer callback wants after it ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    Keep,
    Remove,
}

/// A registered fd handler or timer, to unregister it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HandlerId {
    index: u32,
    gen: u32,
}

type FdHandler = Box<dyn FnMut(&mut Ctx, EventSet) -> Handled>;
type PollHook = Box<dyn FnMut(&mut Ctx) -> bool>;
type TaskDone = Box<dyn FnOnce(&mut Ctx, i32)>;

struct HandlerSlot {
    fd: RawFd,
    gen: u32,
    /// Taken out while it runs.
    handler: Option<FdHandler>,
    live: bool,
}

/// The thread-side state every client shares.
pub struct Ctx {
    /// The thread's I/O engine, task executor and per-thread state
    /// ([`IoContext::state`]). The completions of operations started on
    /// it directly with plain tags go to the built-in client; other code
    /// starts its work as tasks ([`Self::spawn`]).
    pub io: IoContext,
    epoll: Epoll,
    handlers: Vec<HandlerSlot>,
    free_handlers: Vec<u32>,
    tasks: Vec<Option<TaskDone>>,
    free_tasks: Vec<u32>,
    /// Polling hooks of clients other than the built-in one, with their
    /// ids.
    poll_hooks: Vec<(u64, PollHook)>,
    next_hook: u64,
    /// Hooks removed while the hooks ran (out of `poll_hooks` then).
    hooks_removed: Vec<u64>,
    hooks_running: bool,
    /// The polling options in force (the loop keeps the state).
    pub(super) poll_policy: PollPolicy,
}

impl Ctx {
    pub(super) fn new(io: IoContext, poll_policy: PollPolicy) -> std::io::Result<Self> {
        Ok(Ctx {
            io,
            epoll: Epoll::new()?,
            handlers: Vec::new(),
            free_handlers: Vec::new(),
            tasks: Vec::new(),
            free_tasks: Vec::new(),
            poll_hooks: Vec::new(),
            next_hook: 0,
            hooks_removed: Vec::new(),
            hooks_running: false,
            poll_policy,
        })
    }

    /// The thread's polling options (as `--object iothread` or qom-set
    /// last gave them).
    pub fn poll_policy(&self) -> PollPolicy {
        self.poll_policy
    }

    pub(super) fn epoll(&self) -> &Epoll {
        &self.epoll
    }

    /// Watches `fd` for the built-in client, which is told of it under
    /// `token` (below 2^32).
    pub fn watch(&self, fd: RawFd, token: u64) -> std::io::Result<()> {
        self.epoll.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, TOKEN_CLIENT + token),
        )
    }

    /// Stops watching one of the built-in client's descriptors.
    pub fn unwatch(&self, fd: RawFd) {
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
    }

    /// Runs `handler` on this thread whenever `fd` reports one of
    /// `events` (level-triggered), until it returns [`Handled::Remove`] or
    /// is unregistered. The descriptor must stay open while registered: a
    /// handler usually owns it, and it is dropped (closing it) only after
    /// the descriptor left the epoll set.
    pub fn register_fd(
        &mut self,
        fd: RawFd,
        events: EventSet,
        handler: impl FnMut(&mut Ctx, EventSet) -> Handled + 'static,
    ) -> std::io::Result<HandlerId> {
        let index = match self.free_handlers.pop() {
            Some(i) => i,
            None => {
                self.handlers.push(HandlerSlot {
                    fd: -1,
                    gen: 0,
                    handler: None,
                    live: false,
                });
                (self.handlers.len() - 1) as u32
            }
        };
        let slot = &mut self.handlers[index as usize];
        let gen = slot.gen;
        let token = TOKEN_HANDLER | (u64::from(gen) << 32) | u64::from(index);
        if let Err(e) = self
            .epoll
            .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        {
            self.free_handlers.push(index);
            return Err(e);
        }
        slot.fd = fd;
        slot.handler = Some(Box::new(handler));
        slot.live = true;
        Ok(HandlerId { index, gen })
    }

    /// Removes an fd handler or timer; false when it was gone already.
    pub fn unregister(&mut self, id: HandlerId) -> bool {
        let Some(slot) = self.handlers.get_mut(id.index as usize) else {
            return false;
        };
        if !slot.live || slot.gen != id.gen {
            return false;
        }
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, slot.fd, EpollEvent::default());
        slot.live = false;
        slot.gen = slot.gen.wrapping_add(1) & 0x7fff_ffff;
        // A handler that unregisters itself is out of its slot while it
        // runs; it is dropped by `dispatch` when it returns.
        let handler = slot.handler.take();
        self.free_handlers.push(id.index);
        drop(handler);
        true
    }

    /// Calls `cb` on this thread after `first`, then every `period` if
    /// given, until it returns [`Handled::Remove`] or is unregistered. A
    /// timerfd in the thread's epoll set: missed periods (the thread was
    /// busy) make one call, not several.
    pub fn add_timer(
        &mut self,
        first: Duration,
        period: Option<Duration>,
        mut cb: impl FnMut(&mut Ctx) -> Handled + 'static,
    ) -> std::io::Result<HandlerId> {
        let mut timer = TimerFd::new()?;
        // A zero first expiry would disarm the timer instead.
        timer.reset(first.max(Duration::from_nanos(1)), period)?;
        let fd = timer.as_raw_fd();
        let once = period.is_none();
        self.register_fd(fd, EventSet::IN, move |ctx, _| {
            // Readable means expired: the read does not block.
            let _ = timer.wait();
            match cb(ctx) {
                Handled::Keep if !once => Handled::Keep,
                _ => Handled::Remove,
            }
        })
    }

    /// Runs `fut` as a task of this thread's executor (see
    /// [`crate::io::task`]: it may `task::submit` requests to nodes and
    /// `task::sleep`); `done` gets its value on this thread.
    pub fn spawn<F>(&mut self, fut: F, done: impl FnOnce(&mut Ctx, i32) + 'static)
    where
        F: Future<Output = i32> + 'static,
    {
        let done: TaskDone = Box::new(done);
        let index = match self.free_tasks.pop() {
            Some(i) => {
                self.tasks[i as usize] = Some(done);
                i
            }
            None => {
                self.tasks.push(Some(done));
                (self.tasks.len() - 1) as u32
            }
        };
        // The task starts here, up to its first wait; if it finishes at
        // once its completion waits in the context for the next reap.
        self.io.spawn(TASK_TAG | u64::from(index), fut);
    }

    /// Adds `hook` to what the thread's polling looks at: on every spin,
    /// next to the built-in client's rings and the completion queue, until
    /// removed. It must be cheap (a load or two, no system call) and does
    /// the work it finds itself, returning true when it found some. Only
    /// polling calls it: a client that needs waking from sleep also
    /// registers a descriptor ([`Self::register_fd`]).
    pub fn add_poll_hook(&mut self, hook: impl FnMut(&mut Ctx) -> bool + 'static) -> u64 {
        self.next_hook += 1;
        self.poll_hooks.push((self.next_hook, Box::new(hook)));
        self.next_hook
    }

    /// Removes a polling hook (a hook may remove itself); false when it
    /// was gone.
    pub fn remove_poll_hook(&mut self, id: u64) -> bool {
        if self.hooks_removed.contains(&id) {
            return false;
        }
        let before = self.poll_hooks.len();
        self.poll_hooks.retain(|(i, _)| *i != id);
        if before != self.poll_hooks.len() {
            return true;
        }
        // Not in the list: out of it while the hooks run, or gone.
        if self.hooks_running && id <= self.next_hook {
            self.hooks_removed.push(id);
            return true;
        }
        false
    }

    /// Whether polling has hooks to call besides the built-in client.
    #[inline]
    pub(super) fn has_poll_hooks(&self) -> bool {
        !self.poll_hooks.is_empty()
    }

    /// Calls every polling hook once; true when one found work.
    pub(super) fn run_poll_hooks(&mut self) -> bool {
        let mut hooks = std::mem::take(&mut self.poll_hooks);
        let mut found = false;
        self.hooks_running = true;
        for (_, hook) in hooks.iter_mut() {
            found |= hook(self);
        }
        self.hooks_running = false;
        // Hooks added while these ran come after them; those removed
        // meanwhile go.
        hooks.append(&mut self.poll_hooks);
        if !self.hooks_removed.is_empty() {
            let removed = std::mem::take(&mut self.hooks_removed);
            hooks.retain(|(i, _)| !removed.contains(i));
        }
        self.poll_hooks = hooks;
        found
    }

    /// A spawned task finished.
    pub(super) fn task_done(&mut self, c: Completion) {
        let index = (c.tag & 0xffff_ffff) as usize;
        match self.tasks.get_mut(index).and_then(Option::take) {
            Some(done) => {
                self.free_tasks.push(index as u32);
                done(self, c.result);
            }
            None => log::error!("completion of an unknown task {index}"),
        }
    }

    /// Runs the fd handler named by `token`.
    pub(super) fn dispatch(&mut self, token: u64, events: EventSet) {
        let index = (token & 0xffff_ffff) as usize;
        let gen = ((token >> 32) & 0x7fff_ffff) as u32;
        let Some(slot) = self.handlers.get_mut(index) else {
            return;
        };
        // A handler removed earlier in this batch of events.
        if !slot.live || slot.gen != gen {
            return;
        }
        let Some(mut handler) = slot.handler.take() else {
            return;
        };
        let verdict = handler(self, events);
        let slot = &mut self.handlers[index];
        if slot.live && slot.gen == gen {
            slot.handler = Some(handler);
            if verdict == Handled::Remove {
                self.unregister(HandlerId {
                    index: index as u32,
                    gen,
                });
            }
        }
    }

    /// How many fd handlers and timers are registered.
    pub fn handlers(&self) -> usize {
        self.handlers.iter().filter(|s| s.live).count()
    }

    /// How many spawned tasks are still running.
    pub fn tasks(&self) -> usize {
        self.tasks.iter().filter(|t| t.is_some()).count()
    }

    /// Drops every fd handler (the thread ends).
    pub(super) fn clear_handlers(&mut self) {
        for i in 0..self.handlers.len() {
            let gen = self.handlers[i].gen;
            self.unregister(HandlerId {
                index: i as u32,
                gen,
            });
        }
    }
}
