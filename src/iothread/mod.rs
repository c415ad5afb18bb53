//! I/O threads: each owns an epoll loop, an I/O context (io_uring engine,
//! task executor, per-thread state), timers and handlers for other
//! descriptors, and serves one built-in client on its hot path — on
//! vubd's threads, the vhost-user queues given to it.
//!
//! Other threads reach a running thread through its handle: messages for
//! the built-in client ([`Thread::send`]), closures run on the thread with
//! its [`Ctx`] ([`Thread::run`], [`Thread::call`] for an answer), and
//! tasks ([`Thread::spawn_task`]: a future on the thread's executor, such
//! as a job's copy loop). On the thread, a closure registers fd handlers
//! ([`Ctx::register_fd`]: an NBD server's sockets), timers
//! ([`Ctx::add_timer`]: a throttle group's refill) and tasks
//! ([`Ctx::spawn`]); per-thread driver state lives in
//! [`crate::io::IoContext::state`].
//!
//! Named threads come from `--object iothread,id=X` (or object-add) and
//! may serve queues of several exports; an export given no iothread gets
//! one private thread per queue ([`registry`]).

pub mod client;
pub mod ctx;
mod event_loop;
pub mod polling;
pub mod registry;
#[cfg(test)]
mod tests;

pub use client::Client;
pub use ctx::{Ctx, Handled, HandlerId};
pub use event_loop::Control;
pub use registry::{IoThread, IoThreads};

use polling::PollPolicy;
use std::future::Future;
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::EventFd;

/// One I/O thread serving built-in client `C`; dropping the last handle
/// stops it.
pub struct Thread<C: Client> {
    pub name: String,
    tx: Mutex<Sender<Control<C::Msg>>>,
    wake: EventFd,
    join: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl<C: Client> Thread<C> {
    pub fn spawn(name: &str, poll: PollPolicy) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_wake = wake.try_clone()?;
        let join = std::thread::Builder::new()
            .name(format!("iothread-{name}"))
            .spawn(move || event_loop::run::<C>(rx, thread_wake, poll))?;
        Ok(Arc::new(Thread {
            name: name.to_string(),
            tx: Mutex::new(tx),
            wake,
            join: Mutex::new(Some(join)),
        }))
    }

    fn control(&self, msg: Control<C::Msg>) -> bool {
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(msg)
            .is_ok();
        let _ = self.wake.write(1);
        sent
    }

    /// Hands the built-in client a message and wakes the thread; false
    /// when the thread is gone.
    pub fn send(&self, msg: C::Msg) -> bool {
        self.control(Control::Client(msg))
    }

    /// Runs `f` on the thread, with its [`Ctx`].
    pub fn run(&self, f: impl FnOnce(&mut Ctx) + Send + 'static) -> bool {
        self.control(Control::Run(Box::new(f)))
    }

    /// Runs `f` on the thread and waits for its answer; None when the
    /// thread is gone (or ends before it runs `f`). Not for code running
    /// on the thread itself, which would wait for itself.
    pub fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Ctx) -> R + Send + 'static,
    ) -> Option<R> {
        let (tx, rx) = mpsc::channel();
        if !self.run(move |ctx| {
            let _ = tx.send(f(ctx));
        }) {
            return None;
        }
        rx.recv().ok()
    }

    /// Starts a task on the thread's executor: `make` runs there and
    /// builds the future (which need not be `Send`: it never leaves the
    /// thread). The receiver gets the task's value when it ends. A thread
    /// told to exit waits (up to 30 s) for its tasks, so whoever starts a
    /// long-running one (a job's loop) ends it first.
    pub fn spawn_task<F, Fut>(&self, make: F) -> Receiver<i32>
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = i32> + 'static,
    {
        let (tx, rx) = mpsc::channel();
        self.run(move |ctx| {
            ctx.spawn(make(), move |_, result| {
                let _ = tx.send(result);
            })
        });
        rx
    }

    /// Gives the thread new polling options.
    pub fn set_poll(&self, poll: PollPolicy) {
        self.control(Control::SetPoll(poll));
    }
}

impl<C: Client> Drop for Thread<C> {
    fn drop(&mut self) {
        self.control(Control::Exit);
        if let Some(j) = self
            .join
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            let _ = j.join();
        }
    }
}
