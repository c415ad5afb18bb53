//! The daemon's I/O threads: named ones from `--object iothread` and the
//! private ones of exports given none.

use super::polling::PollPolicy;
use super::Thread;
use crate::error::QmpError;
use crate::export::vhost_user::worker::VhostQueues;
use crate::qapi::{BlockExportIothreads, BlockExportOptions, BlockExportOptionsBranch};
use std::sync::Arc;

/// vubd's I/O threads: their built-in client is the vhost-user queues.
pub type IoThread = Thread<VhostQueues>;

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
        self.get(id)?.set_poll(poll);
        Ok(())
    }

    /// A named thread, to run work on it.
    pub fn get(&self, id: &str) -> Result<Arc<IoThread>, QmpError> {
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
