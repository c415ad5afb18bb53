//! I/O threads: the threads that own virtqueues and run their requests.
//!
//! Named ones come from `--object iothread,id=X` (or object-add) and may
//! serve queues of several exports; an export given no iothread gets one
//! private thread per queue. Each thread runs the event loop of
//! [`crate::export::vhost_user::worker`].

use crate::error::QmpError;
use crate::export::vhost_user::polling::PollPolicy;
use crate::export::vhost_user::worker::{self, WorkerMsg};
use crate::qapi::{BlockExportIothreads, BlockExportOptions, BlockExportOptionsBranch};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex, PoisonError};
use vmm_sys_util::eventfd::EventFd;

/// One I/O thread; dropping the last handle stops it.
pub struct IoThread {
    pub name: String,
    tx: Mutex<Sender<WorkerMsg>>,
    wake: EventFd,
    join: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl IoThread {
    pub fn spawn(name: &str, poll: PollPolicy) -> std::io::Result<Arc<Self>> {
        let (tx, rx) = mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK)?;
        let thread_wake = wake.try_clone()?;
        let join = std::thread::Builder::new()
            .name(format!("iothread-{name}"))
            .spawn(move || worker::run(rx, thread_wake, poll))?;
        Ok(Arc::new(IoThread {
            name: name.to_string(),
            tx: Mutex::new(tx),
            wake,
            join: Mutex::new(Some(join)),
        }))
    }

    /// Hands the thread a message and wakes it.
    pub fn send(&self, msg: WorkerMsg) -> bool {
        let sent = self
            .tx
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .send(msg)
            .is_ok();
        let _ = self.wake.write(1);
        sent
    }
}

impl Drop for IoThread {
    fn drop(&mut self) {
        self.send(WorkerMsg::Exit);
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

/// The daemon's named I/O threads.
#[derive(Default)]
pub struct IoThreads {
    named: Vec<Arc<IoThread>>,
}

impl IoThreads {
    pub fn add(&mut self, id: &str, poll: PollPolicy) -> Result<(), QmpError> {
        if self.named.iter().any(|t| t.name == id) {
            return Err(QmpError::generic(format!(
                "attempt to add duplicate property '{id}' to object (type 'container')"
            )));
        }
        let t = IoThread::spawn(id, poll)
            .map_err(|e| QmpError::generic(format!("cannot start iothread '{id}': {e}")))?;
        self.named.push(t);
        Ok(())
    }

    pub fn remove(&mut self, id: &str) -> Result<(), QmpError> {
        let i = self
            .named
            .iter()
            .position(|t| t.name == id)
            .ok_or_else(|| QmpError::generic(format!("object '{id}' not found")))?;
        if Arc::strong_count(&self.named[i]) > 1 {
            return Err(QmpError::generic(format!("object '{id}' is in use")));
        }
        self.named.remove(i);
        Ok(())
    }

    /// Gives a running iothread new polling options.
    pub fn set_poll(&self, id: &str, poll: PollPolicy) -> Result<(), QmpError> {
        self.get(id)?.send(WorkerMsg::SetPoll(poll));
        Ok(())
    }

    fn get(&self, id: &str) -> Result<Arc<IoThread>, QmpError> {
        self.named
            .iter()
            .find(|t| t.name == id)
            .cloned()
            .ok_or_else(|| QmpError::generic(format!("iothread \"{id}\" not found")))
    }

    /// The threads an export's queues run on: its named iothread(s), or a
    /// private thread per queue.
    pub fn for_export(&self, opts: &BlockExportOptions) -> Result<Vec<Arc<IoThread>>, QmpError> {
        let BlockExportOptionsBranch::VhostUserBlk(vu) = &opts.u;
        match &opts.iothread {
            Some(BlockExportIothreads::Single(id)) => Ok(vec![self.get(id)?]),
            Some(BlockExportIothreads::Multi(ids)) if ids.is_empty() => {
                Err(QmpError::generic("The iothread list must not be empty"))
            }
            Some(BlockExportIothreads::Multi(ids)) => {
                if opts.fixed_iothread.unwrap_or(false) {
                    return Err(QmpError::generic(
                        "Cannot use fixed-iothread with a list of iothreads",
                    ));
                }
                ids.iter().map(|id| self.get(id)).collect()
            }
            None => {
                let queues = vu.num_queues.unwrap_or(1).max(1);
                let poll = PollPolicy::for_export(vu.poll_us);
                (0..queues)
                    .map(|q| {
                        IoThread::spawn(&format!("{}-q{q}", opts.id), poll).map_err(|e| {
                            QmpError::generic(format!("cannot start an I/O thread: {e}"))
                        })
                    })
                    .collect()
            }
        }
    }
}
