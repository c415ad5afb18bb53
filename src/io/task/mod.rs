//! Multi-step requests on an I/O thread.
//!
//! A node whose request needs more than one operation (read a table, then
//! the data; split over several places and join; wait on a timer or on a
//! range another request holds) runs it here, on the thread that submitted
//! it, with no hop to another thread:
//!
//! * **Joins** ([`IoContext::start_join`]) split a request into parts that
//!   all carry one tag; when the last part completes the parent does, with
//!   the bytes of all parts or the first error. A join is a slab entry: no
//!   future, no allocation.
//! * **Fills** ([`IoContext::start_fill`]) are reads that come back whole:
//!   what a short read (the end of a file) left untouched is zeroed and
//!   the parent completes with the full length. A slab entry, like a join.
//! * **Tasks** ([`IoContext::spawn`]) are `async` blocks. Inside one,
//!   [`submit`] starts a request on a node and returns a future of its
//!   result, [`sleep`] one that completes after a time, and
//!   [`locks::RangeLocks`] waits for a range that other requests hold.
//!   Requests are started when [`submit`] is called, so a task that starts
//!   several and then awaits them runs them at once. The value the task
//!   returns completes its parent tag.
//!
//! Everything a task waits for comes back as an ordinary completion of the
//! thread's [`IoContext`] under an internal tag (bit [`INTERNAL`]), which
//! [`IoContext::reap`] routes here before handing the rest to its caller;
//! a wake-up from another thread comes through the thread's mailbox the
//! same way. The executor polls only tasks that such a completion names,
//! with a waker that does nothing: there is no other way to wake a task.
//! Tasks' futures live in blocks recycled per thread ([`boxes`]), so a
//! steady load allocates nothing.
//!
//! The rules for code running in a task: never block, never drop a
//! [`Pending`] whose request has not completed unless the buffers it uses
//! stay valid until it does (its completion is then discarded), and keep
//! the buffers of a request alive until its [`Pending`] is ready.

pub(crate) mod boxes;
mod fill;
pub mod locks;
#[cfg(test)]
mod tests;

use super::{Completion, IoContext, Op};
use crate::block::io::{BlockIo, IoRequest};
use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};

/// Tag bit of completions meant for the executor. Callers' own tags keep
/// bits 62 and 63 clear (63 is the io_uring engine's sleep marker).
pub const INTERNAL: u64 = 1 << 62;
const KIND_SHIFT: u32 = 60;
const KIND_MASK: u64 = 3 << KIND_SHIFT;
const KIND_CELL: u64 = 0;
const KIND_JOIN: u64 = 1 << KIND_SHIFT;
const KIND_WAKE: u64 = 2 << KIND_SHIFT;
const KIND_FILL: u64 = 3 << KIND_SHIFT;
const GEN_SHIFT: u32 = 32;
const GEN_MASK: u64 = (1 << 28) - 1;

fn index(tag: u64) -> usize {
    (tag & 0xffff_ffff) as usize
}

fn generation(tag: u64) -> u32 {
    ((tag >> GEN_SHIFT) & GEN_MASK) as u32
}

fn make_tag(kind: u64, gen: u32, index: usize) -> u64 {
    INTERNAL | kind | ((u64::from(gen) & GEN_MASK) << GEN_SHIFT) | index as u64
}

/// What a cell (one awaited request or timer) holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CellState {
    Free,
    /// Its request is in flight and the task awaits it.
    Waiting,
    Done(i32),
    /// Its future was dropped before the request completed; the cell is
    /// freed when the completion comes.
    Orphan,
}

#[derive(Clone, Copy)]
struct CellSlot {
    task: u32,
    state: CellState,
}

struct TaskSlot {
    fut: Option<boxes::TaskBox>,
    parent: u64,
    gen: u32,
    /// In the ready queue already.
    queued: bool,
}

#[derive(Clone, Copy)]
struct JoinSlot {
    parent: u64,
    remaining: u32,
    bytes: i64,
    error: i32,
    gen: u32,
}

/// A thread's executor: the tasks, cells and joins in flight.
#[derive(Default)]
pub struct Executor {
    tasks: Vec<TaskSlot>,
    free_tasks: Vec<u32>,
    cells: Vec<CellSlot>,
    free_cells: Vec<u32>,
    joins: Vec<JoinSlot>,
    free_joins: Vec<u32>,
    fills: Vec<fill::FillSlot>,
    free_fills: Vec<u32>,
    ready: std::collections::VecDeque<u32>,
    /// Tasks, cells, joins and fills in use; none means no internal tag can come.
    live: usize,
    boxes: boxes::BoxPool,
    /// Internal completions being routed (kept to reuse its capacity).
    scratch: Vec<Completion>,
}

impl Executor {
    /// Whether anything of the executor's is outstanding.
    pub fn is_idle(&self) -> bool {
        self.live == 0
    }

    /// Blocks taken from the allocator for futures so far.
    pub fn blocks_allocated(&self) -> usize {
        self.boxes.allocated()
    }

    fn new_cell(&mut self, task: u32) -> usize {
        self.live += 1;
        let slot = CellSlot {
            task,
            state: CellState::Waiting,
        };
        match self.free_cells.pop() {
            Some(i) => {
                self.cells[i as usize] = slot;
                i as usize
            }
            None => {
                self.cells.push(slot);
                self.cells.len() - 1
            }
        }
    }

    fn free_cell(&mut self, i: usize) {
        self.cells[i].state = CellState::Free;
        self.free_cells.push(i as u32);
        self.live -= 1;
    }

    /// Takes a finished cell's result; None while it waits.
    fn take_cell(&mut self, i: usize) -> Option<i32> {
        match self.cells.get(i)?.state {
            CellState::Done(r) => {
                self.free_cell(i);
                Some(r)
            }
            _ => None,
        }
    }

    /// The future of a cell is gone.
    fn drop_cell(&mut self, i: usize) {
        match self.cells.get(i).map(|c| c.state) {
            Some(CellState::Waiting) => self.cells[i].state = CellState::Orphan,
            Some(CellState::Done(_)) => self.free_cell(i),
            _ => {}
        }
    }

    fn make_ready(&mut self, task: u32) {
        if let Some(t) = self.tasks.get_mut(task as usize) {
            if t.fut.is_some() && !t.queued {
                t.queued = true;
                self.ready.push_back(task);
            }
        }
    }

    /// Takes an internal completion; a join that finished completes its
    /// parent into `done`.
    fn deliver(&mut self, c: Completion, done: &mut Vec<Completion>) {
        let i = index(c.tag);
        match c.tag & KIND_MASK {
            KIND_CELL => match self.cells.get(i).map(|s| s.state) {
                Some(CellState::Waiting) => {
                    self.cells[i].state = CellState::Done(c.result);
                    let task = self.cells[i].task;
                    self.make_ready(task);
                }
                Some(CellState::Orphan) => self.free_cell(i),
                _ => log::error!("completion for an unknown request cell {i}"),
            },
            KIND_JOIN => {
                let Some(j) = self.joins.get_mut(i).filter(|j| j.gen == generation(c.tag)) else {
                    log::error!("completion for an unknown join {i}");
                    return;
                };
                if c.result < 0 {
                    if j.error == 0 {
                        j.error = c.result;
                    }
                } else {
                    j.bytes += i64::from(c.result);
                }
                j.remaining = j.remaining.saturating_sub(1);
                if j.remaining == 0 {
                    let result = if j.error < 0 {
                        j.error
                    } else {
                        i32::try_from(j.bytes).unwrap_or(i32::MAX)
                    };
                    done.push(Completion {
                        tag: j.parent,
                        result,
                    });
                    j.gen = j.gen.wrapping_add(1) & GEN_MASK as u32;
                    self.free_joins.push(i as u32);
                    self.live -= 1;
                }
            }
            KIND_WAKE => {
                if self
                    .tasks
                    .get(i)
                    .is_some_and(|t| t.gen == generation(c.tag))
                {
                    self.make_ready(i as u32);
                }
            }
            KIND_FILL => done.extend(self.finish_fill(c)),
            _ => log::error!("completion with a malformed internal tag {:#x}", c.tag),
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        for t in &mut self.tasks {
            if let Some(f) = t.fut.take() {
                self.boxes.recycle(f);
            }
        }
    }
}

thread_local! {
    /// The context whose task is being polled on this thread, and that
    /// task's index: what [`submit`], [`sleep`] and the locks act on.
    static CURRENT: Cell<(*mut IoContext, u32)> = const { Cell::new((std::ptr::null_mut(), 0)) };
}

/// Runs `f` on the context of the task being polled, with that task's
/// index; None outside a task.
fn with_current<R>(f: impl FnOnce(&mut IoContext, u32) -> R) -> Option<R> {
    let (ctx, task) = CURRENT.with(Cell::get);
    if ctx.is_null() {
        return None;
    }
    // SAFETY: CURRENT is set only by `IoContext::poll_task` for the span
    // of one poll, from the `&mut IoContext` it was called with, which it
    // does not use itself until the poll returns; the task runs on this
    // thread, so no other reference to the context is live meanwhile.
    // `f` does not let the reference escape (it is not 'static).
    Some(f(unsafe { &mut *ctx }, task))
}

/// The result of one awaited request, timer or operation.
#[must_use = "a request's result must be awaited"]
pub struct Pending {
    cell: Option<usize>,
    /// The result when nothing was started (called outside a task).
    now: i32,
}

impl Future for Pending {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<i32> {
        let Some(cell) = self.cell else {
            return Poll::Ready(self.now);
        };
        match with_current(|ctx, _| ctx.exec.take_cell(cell)).flatten() {
            Some(r) => {
                self.cell = None;
                Poll::Ready(r)
            }
            None => Poll::Pending,
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(cell) = self.cell.take() {
            if with_current(|ctx, _| ctx.exec.drop_cell(cell)).is_none() {
                log::error!("a pending request was dropped outside its task");
            }
        }
    }
}

/// Starts `req` (its tag is replaced) on `node` from the task being
/// polled; the future gives its result. Outside a task it fails at once
/// with EINVAL.
pub fn submit(node: &dyn BlockIo, req: &IoRequest) -> Pending {
    with_current(|ctx, task| {
        let cell = ctx.exec.new_cell(task);
        node.submit(ctx, &req.with_tag(make_tag(KIND_CELL, 0, cell)));
        Pending {
            cell: Some(cell),
            now: 0,
        }
    })
    .unwrap_or(Pending {
        cell: None,
        now: -libc::EINVAL,
    })
}

/// Starts an engine operation from the task being polled.
///
/// # Safety
/// As [`IoContext::push`]: the operation's memory stays valid until the
/// returned future is ready.
pub unsafe fn operate(op: Op) -> Pending {
    with_current(|ctx, task| {
        let cell = ctx.exec.new_cell(task);
        // SAFETY: the caller's contract.
        unsafe { ctx.push(op, make_tag(KIND_CELL, 0, cell)) };
        Pending {
            cell: Some(cell),
            now: 0,
        }
    })
    .unwrap_or(Pending {
        cell: None,
        now: -libc::EINVAL,
    })
}

/// A future that is ready `ns` nanoseconds from now (a timer of the
/// thread's engine: no thread sleeps and nothing spins).
pub fn sleep(ns: u64) -> Pending {
    // SAFETY: a sleep refers to no memory.
    unsafe { operate(Op::Sleep { ns, result: 0 }) }
}

/// Runs `f` on the thread's value of type `T` (see [`super::state`]) from
/// the task being polled; None outside a task.
pub fn with_state<T: Default + 'static, R>(f: impl FnOnce(&mut T) -> R) -> Option<R> {
    with_current(|ctx, _| f(ctx.state::<T>()))
}

/// What another thread needs to wake the task being polled: the tag to
/// post to the context's mailbox. None outside a task.
pub fn current_waker() -> Option<RemoteWake> {
    with_current(|ctx, task| RemoteWake {
        mailbox: ctx.mailbox().clone(),
        tag: make_tag(KIND_WAKE, ctx.exec.tasks[task as usize].gen, task as usize),
    })
}

/// Wakes a task, from any thread.
#[derive(Clone)]
pub struct RemoteWake {
    mailbox: std::sync::Arc<super::mailbox::Mailbox>,
    tag: u64,
}

impl RemoteWake {
    pub fn wake(&self) {
        self.mailbox.expect();
        self.mailbox.post(Completion {
            tag: self.tag,
            result: 0,
        });
    }
}

impl IoContext {
    /// Runs `fut` as a task whose value completes `parent`. It starts at
    /// once, on the caller's stack, up to its first wait.
    pub fn spawn<F: Future<Output = i32> + 'static>(&mut self, parent: u64, fut: F) {
        let fut = self.exec.boxes.store(fut);
        self.exec.live += 1;
        let slot = TaskSlot {
            fut: Some(fut),
            parent,
            gen: 0,
            queued: false,
        };
        let i = match self.exec.free_tasks.pop() {
            Some(i) => {
                let gen = self.exec.tasks[i as usize].gen;
                self.exec.tasks[i as usize] = TaskSlot { gen, ..slot };
                i
            }
            None => {
                self.exec.tasks.push(slot);
                (self.exec.tasks.len() - 1) as u32
            }
        };
        self.poll_task(i);
    }

    /// Opens a join for `parts` requests that complete `parent` together;
    /// returns the tag every part is submitted with.
    pub fn start_join(&mut self, parent: u64, parts: u32) -> u64 {
        if parts == 0 {
            self.complete_now(parent, 0);
            // A tag no completion will carry.
            return make_tag(KIND_JOIN, u32::MAX, u32::MAX as usize);
        }
        self.exec.live += 1;
        let slot = |gen| JoinSlot {
            parent,
            remaining: parts,
            bytes: 0,
            error: 0,
            gen,
        };
        let i = match self.exec.free_joins.pop() {
            Some(i) => {
                let gen = self.exec.joins[i as usize].gen;
                self.exec.joins[i as usize] = slot(gen);
                i as usize
            }
            None => {
                self.exec.joins.push(slot(0));
                self.exec.joins.len() - 1
            }
        };
        make_tag(KIND_JOIN, self.exec.joins[i].gen, i)
    }

    /// Polls task `i` once; a task that finished completes its parent.
    fn poll_task(&mut self, i: u32) {
        let Some(slot) = self.exec.tasks.get_mut(i as usize) else {
            return;
        };
        slot.queued = false;
        let Some(mut fut) = slot.fut.take() else {
            return;
        };
        let me: *mut IoContext = self;
        let outer = CURRENT.with(|c| c.replace((me, i)));
        let mut cx = Context::from_waker(Waker::noop());
        let polled = fut.as_mut().poll(&mut cx);
        if polled.is_ready() {
            // Dropped while CURRENT still names this context (and before
            // `self` is used again): the pending requests it may hold find
            // their cells.
            fut.drop_future();
            CURRENT.with(|c| c.set(outer));
            self.exec.boxes.recycle(fut);
            let slot = &mut self.exec.tasks[i as usize];
            slot.gen = (slot.gen + 1) & GEN_MASK as u32;
            let parent = slot.parent;
            self.exec.free_tasks.push(i);
            self.exec.live -= 1;
            if let Poll::Ready(result) = polled {
                self.complete_now(parent, result);
            }
        } else {
            CURRENT.with(|c| c.set(outer));
            self.exec.tasks[i as usize].fut = Some(fut);
        }
    }

    /// Takes the internal completions out of `out`, lets the tasks they
    /// name go on, and adds what those complete; repeats until nothing
    /// internal is left.
    pub(super) fn route(&mut self, out: &mut Vec<Completion>, mut from: usize) {
        loop {
            let mut scratch = std::mem::take(&mut self.exec.scratch);
            let mut k = from;
            for j in from..out.len() {
                let mut c = out[j];
                // A fill finishes where it stands: its parent's completion
                // takes its place (and is routed on when it is internal).
                if c.tag & (INTERNAL | KIND_MASK) == INTERNAL | KIND_FILL {
                    match self.exec.finish_fill(c) {
                        Some(parent) => c = parent,
                        None => continue,
                    }
                }
                if c.tag & INTERNAL != 0 {
                    scratch.push(c);
                } else {
                    out[k] = c;
                    k += 1;
                }
            }
            out.truncate(k);
            // What the executor completes from here on lands in
            // `immediate` (joins directly, tasks through complete_now).
            for c in scratch.drain(..) {
                self.exec.deliver(c, &mut self.immediate);
            }
            self.exec.scratch = scratch;
            while let Some(t) = self.exec.ready.pop_front() {
                self.poll_task(t);
            }
            if self.immediate.is_empty() {
                return;
            }
            from = out.len();
            out.append(&mut self.immediate);
        }
    }
}
