//! What becomes of a request that failed: the one place where that is
//! decided (QEMU's `blk_get_error_action`), from the device's error
//! policy, `rerror` for reads and `werror` for everything else.
//!
//! * `report`: the error goes to the guest;
//! * `ignore`: the request completes as if it had succeeded;
//! * `stop`: the request is held in its slot, the device takes no new
//!   requests, and `cont` retries every held request in order;
//! * `enospc`: `stop` when the storage is full (ENOSPC), else `report`.
//!
//! Every failure also sends BLOCK_IO_ERROR. A held request keeps its slab
//! entry, tag and buffers, so retrying it is submitting the entry again;
//! the transport sees nothing until it finally completes, and the guest
//! never sees an error for it.

use super::Backend;
use crate::block::io::IoKind;
use crate::qapi::BlockdevOnError;

/// The fate of a failed request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The error goes to the guest.
    Report,
    /// The request completes as if it had succeeded.
    Ignore,
    /// The request is held and the device stops until `cont`.
    Stop,
}

/// A device's `rerror` and `werror`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorPolicy {
    pub read: BlockdevOnError,
    pub write: BlockdevOnError,
}

impl Default for ErrorPolicy {
    /// A guest device's defaults: report read errors, stop on a full disk.
    fn default() -> Self {
        ErrorPolicy {
            read: BlockdevOnError::Report,
            write: BlockdevOnError::Enospc,
        }
    }
}

impl ErrorPolicy {
    /// `auto` means the default of the direction.
    pub fn new(read: Option<BlockdevOnError>, write: Option<BlockdevOnError>) -> Self {
        let d = ErrorPolicy::default();
        let pick = |v: Option<BlockdevOnError>, dflt| match v {
            None | Some(BlockdevOnError::Auto) => dflt,
            Some(v) => v,
        };
        ErrorPolicy {
            read: pick(read, d.read),
            write: pick(write, d.write),
        }
    }

    pub fn action(&self, kind: IoKind, errno: i32) -> ErrorAction {
        let policy = if kind == IoKind::Read {
            self.read
        } else {
            self.write
        };
        match policy {
            BlockdevOnError::Report | BlockdevOnError::Auto => ErrorAction::Report,
            BlockdevOnError::Ignore => ErrorAction::Ignore,
            BlockdevOnError::Stop => ErrorAction::Stop,
            BlockdevOnError::Enospc if errno == libc::ENOSPC => ErrorAction::Stop,
            BlockdevOnError::Enospc => ErrorAction::Report,
        }
    }
}

impl Backend {
    /// Decides what a request of `kind` that failed with `errno` becomes.
    /// Every failure of a request that reached the backend comes here:
    /// a node's error, a short write, no medium.
    #[inline]
    pub fn error_action(&self, kind: IoKind, errno: i32) -> ErrorAction {
        self.policy.action(kind, errno)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_report_reads_and_stop_writes_on_a_full_disk() {
        let p = ErrorPolicy::new(None, Some(BlockdevOnError::Auto));
        assert_eq!(p.action(IoKind::Read, libc::ENOSPC), ErrorAction::Report);
        assert_eq!(p.action(IoKind::Write, libc::ENOSPC), ErrorAction::Stop);
        assert_eq!(p.action(IoKind::Write, libc::EIO), ErrorAction::Report);
        assert_eq!(p.action(IoKind::Flush, libc::ENOSPC), ErrorAction::Stop);
    }

    #[test]
    fn each_policy_gives_its_action() {
        let p = ErrorPolicy::new(Some(BlockdevOnError::Stop), Some(BlockdevOnError::Ignore));
        assert_eq!(p.action(IoKind::Read, libc::EIO), ErrorAction::Stop);
        assert_eq!(p.action(IoKind::Discard, libc::EIO), ErrorAction::Ignore);
    }
}
