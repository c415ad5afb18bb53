//! Notices the data plane sends up to the control plane, which turns them
//! into QMP events: corruption found in an image, a write past a node's
//! write threshold, a device's failed request and its stop.
//!
//! A driver or node face gets the sink when its node is opened (from the
//! graph, which the daemon gives one); a graph without a sink (unit
//! tests) drops them.

use std::sync::Arc;

/// Corruption found in an image (QEMU's `BLOCK_IMAGE_CORRUPTED`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Corruption {
    /// The node whose image is damaged.
    pub node: String,
    /// What was found, for humans.
    pub msg: String,
    /// The host offset and length of the access that found it, if an
    /// access did.
    pub access: Option<(u64, u64)>,
    /// The image is marked corrupt and refuses writes from now on.
    pub fatal: bool,
}

/// A write reached past a node's write threshold, which is now disarmed
/// (QEMU's `BLOCK_WRITE_THRESHOLD`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThresholdCrossed {
    pub node: String,
    /// How far past the threshold the write ended, in bytes.
    pub amount_exceeded: u64,
    pub threshold: u64,
}

/// A device's request failed (QEMU's `BLOCK_IO_ERROR`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IoErrorNotice {
    /// The export id.
    pub device: String,
    /// A read (else a write, flush, discard or write-zeroes).
    pub read: bool,
    pub action: crate::qapi::BlockErrorAction,
    pub nospace: bool,
    /// The error, in words.
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Corruption(Corruption),
    WriteThreshold(ThresholdCrossed),
    IoError(IoErrorNotice),
    /// An export (by id) stopped on an error.
    Stopped(String),
}

/// Where notices go; called from any thread, it must not block.
pub type Sink = Arc<dyn Fn(Notice) + Send + Sync>;
