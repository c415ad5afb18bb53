//! What becomes of a request that failed: the one place where that is
//! decided, QEMU's `blk_get_error_action`.

use super::Backend;
use crate::block::io::IoKind;

/// The fate of a failed request.
///
/// Only [`ErrorAction::Report`] exists so far. The error policy
/// (`rerror` / `werror` of a device, QEMU's `BlockdevOnError`) will add:
///
/// * `Ignore`: the request completes as if it had succeeded;
/// * `Stop`: the request is held in its slot, the backend stops taking
///   new requests, `BLOCK_IO_ERROR` is sent, and `cont` retries every
///   held request.
///
/// A policy picks the action per request: `report` and `ignore` always
/// give theirs, `stop` gives `Stop`, `enospc` gives `Stop` for `ENOSPC`
/// and `Report` for anything else. A guest device's defaults are `enospc`
/// for writes and `report` for reads.
///
/// A held request keeps its slab entry, tag and buffers, so retrying it
/// is submitting the entry again; the transport sees nothing until the
/// request finally completes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorAction {
    /// The error goes to the guest.
    Report,
}

impl Backend {
    /// Decides what a request of `kind` that failed with `errno` becomes.
    /// Every failure of a request that reached the backend comes here:
    /// a node's error, a short write, no medium.
    #[inline]
    pub fn error_action(&self, kind: IoKind, errno: i32) -> ErrorAction {
        let _ = (kind, errno);
        ErrorAction::Report
    }
}
