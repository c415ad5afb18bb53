//! A device stopped by its error policy: the state its queues share, the
//! notices that go up to the control thread (BLOCK_IO_ERROR, and STOP
//! when the device stops), and how `cont` wakes the queues that hold
//! requests.

use super::Backend;
use super::ErrorAction;
use crate::block::io::IoKind;
use crate::block::notice::{IoErrorNotice, Notice, Sink};
use crate::qapi::{BlockDeviceIoStatus, BlockErrorAction};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

/// Wakes one queue's thread so it retries what it holds.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

const STATUS_OK: u8 = 0;
const STATUS_FAILED: u8 = 1;
const STATUS_NOSPACE: u8 = 2;

#[derive(Default)]
pub(super) struct StopState {
    pub(super) stopped: AtomicBool,
    /// Moves at every `cont`; a queue retries its held requests when it
    /// sees a new value.
    pub(super) resumes: AtomicU64,
    status: AtomicU8,
    notices: Mutex<Option<Sink>>,
    wakers: Mutex<Vec<Option<Waker>>>,
}

impl Backend {
    /// Where the device's notices go (the graph's sink).
    pub fn set_notices(&self, sink: Option<Sink>) {
        *self
            .stop
            .notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = sink;
    }

    /// How queue `index` is woken at `cont` (None: it is gone).
    pub fn set_waker(&self, index: usize, waker: Option<Waker>) {
        let mut w = self
            .stop
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if w.len() <= index {
            w.resize(index + 1, None);
        }
        w[index] = waker;
    }

    /// Whether an error stopped the device.
    pub fn is_stopped(&self) -> bool {
        self.stop.stopped.load(Ordering::Acquire)
    }

    /// query-block's io-status.
    pub fn io_status(&self) -> BlockDeviceIoStatus {
        match self.stop.status.load(Ordering::Acquire) {
            STATUS_FAILED => BlockDeviceIoStatus::Failed,
            STATUS_NOSPACE => BlockDeviceIoStatus::Nospace,
            _ => BlockDeviceIoStatus::Ok,
        }
    }

    /// `cont`: the device runs again and its queues retry what they hold.
    /// Returns whether it was stopped.
    pub fn resume(&self) -> bool {
        let was = self.stop.stopped.swap(false, Ordering::AcqRel);
        self.stop.status.store(STATUS_OK, Ordering::Release);
        self.stop.resumes.fetch_add(1, Ordering::AcqRel);
        let wakers: Vec<Waker> = self
            .stop
            .wakers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .flatten()
            .cloned()
            .collect();
        for w in wakers {
            w();
        }
        was
    }

    /// A request failed and the policy decided `action`: the event goes
    /// up, and with `Stop` the device stops (STOP goes up the first time).
    pub(super) fn failed(&self, kind: IoKind, errno: i32, action: ErrorAction) {
        let nospace = errno == libc::ENOSPC;
        if action == ErrorAction::Stop {
            self.stop.status.store(
                if nospace {
                    STATUS_NOSPACE
                } else {
                    STATUS_FAILED
                },
                Ordering::Release,
            );
        }
        let newly_stopped =
            action == ErrorAction::Stop && !self.stop.stopped.swap(true, Ordering::AcqRel);
        let sink = self
            .stop
            .notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let Some(sink) = sink else { return };
        sink(Notice::IoError(IoErrorNotice {
            device: self.name.clone(),
            read: kind == IoKind::Read,
            action: match action {
                ErrorAction::Report => BlockErrorAction::Report,
                ErrorAction::Ignore => BlockErrorAction::Ignore,
                ErrorAction::Stop => BlockErrorAction::Stop,
            },
            nospace,
            reason: crate::error::os_reason(&std::io::Error::from_raw_os_error(errno)),
        }));
        if newly_stopped {
            sink(Notice::Stopped(self.name.clone()));
        }
    }
}
