//! Block drivers. Each has a control face ([`Driver`]: permissions,
//! locking, what the queries show) used on the control thread, and a data
//! face ([`BlockIo`](super::io::BlockIo)) shared with the I/O threads.

pub mod blkdebug;
pub mod blkverify;
pub mod file;
#[cfg(test)]
mod file_tests;
mod inline_write;
pub mod null;
pub mod qcow2;
pub mod raw;
pub mod throttle;

use super::drain::Root;
use super::error::BlockError;
use super::perm::Perm;
use crate::qapi::{
    BlockdevDetectZeroesOptions, BlockdevDiscardOptions, BlockdevDriver, SnapshotInfo,
};

/// What a driver is in the graph.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DriverKind {
    /// Talks to storage; has no children.
    Protocol,
    /// Interprets the bytes of its `file` child.
    Format,
    /// Passes requests to its child unchanged (raw without a window).
    Filter,
}

/// The role of a child edge, as QEMU names it in messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ChildRole {
    File,
    Backing,
    /// blkverify's node under test (its `file` is the raw image).
    Test,
}

impl ChildRole {
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Test => "test",
        }
    }
}

/// Options every node has (BlockdevOptions' base), with defaults applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeFlags {
    pub read_only: bool,
    pub auto_read_only: bool,
    pub force_share: bool,
    pub cache_direct: bool,
    pub cache_no_flush: bool,
    pub discard: BlockdevDiscardOptions,
    pub detect_zeroes: BlockdevDetectZeroesOptions,
}

impl Default for NodeFlags {
    fn default() -> Self {
        NodeFlags {
            read_only: false,
            auto_read_only: false,
            force_share: false,
            cache_direct: false,
            cache_no_flush: false,
            discard: BlockdevDiscardOptions::Ignore,
            detect_zeroes: BlockdevDetectZeroesOptions::Off,
        }
    }
}

/// The control face of an open node.
pub trait Driver: Send + Sync {
    /// The driver's name as queries show it (`drv`, `format`).
    fn name(&self) -> &'static str;

    fn kind(&self) -> DriverKind;

    /// The node's data face.
    fn io(&self) -> Root;

    /// The data-plane edge to the child in `role`, for the graph to
    /// re-point (a snapshot, a pivot, a medium change).
    fn child(&self, role: ChildRole) -> Option<&crate::block::edge::Child> {
        let _ = role;
        None
    }

    /// What QEMU calls the node's filename: the path of a file, the
    /// filename of a format node's file, a pseudo-URL for null nodes.
    fn filename(&self) -> String;

    /// Whether the node ended up read-only (auto-read-only may decide it).
    fn is_read_only(&self) -> bool;

    /// The permissions this node takes on a child, and what it lets
    /// others do there, given what its own parents take (`perm`) and let
    /// others do (`shared`).
    fn child_perm(&self, role: ChildRole, perm: Perm, shared: Perm) -> (Perm, Perm) {
        let _ = role;
        default_child_perm(self.kind(), self.is_read_only(), perm, shared)
    }

    /// First phase of a permission change on the node itself (a protocol
    /// node locks its image here so other processes see it).
    fn prepare_perm(&self, perm: Perm, shared: Perm) -> Result<(), BlockError> {
        let _ = (perm, shared);
        Ok(())
    }

    /// Second phase: keep the prepared permissions.
    fn commit_perm(&self, perm: Perm, shared: Perm) {
        let _ = (perm, shared);
    }

    /// Second phase: return to the committed permissions.
    fn abort_perm(&self) {}

    /// Records a new backing file name (and format) in the image's
    /// header, written through `write` (change-backing-file); an errno
    /// when the driver cannot.
    fn change_backing_file(
        &self,
        name: &str,
        format: &str,
        write: qcow2::HeaderWriter<'_>,
    ) -> Result<(), i32> {
        let _ = (name, format, write);
        Err(-libc::ENOTSUP)
    }

    /// Adds what only this driver knows to the node's ImageInfo.
    fn describe_image(&self, info: &mut crate::qapi::ImageInfo) {
        let _ = info;
    }

    /// The image's internal snapshots, for a driver that keeps them
    /// (qcow2); None for the others.
    fn internal_snapshots(&self) -> Option<&dyn InternalSnapshots> {
        None
    }

    /// Counters only this driver keeps (query-blockstats).
    fn stats_specific(&self) -> Option<crate::qapi::BlockStatsSpecific> {
        None
    }

    /// Flushes and releases what the node holds; called once, last.
    fn close(&self) -> Result<(), BlockError> {
        if self.is_read_only() {
            Ok(())
        } else {
            self.io().flush()
        }
    }
}

/// Taking and deleting internal snapshots of an image. The caller has
/// drained every user of the node: no request is in flight meanwhile.
pub trait InternalSnapshots {
    /// Takes a snapshot of the active image named `name`, with the next
    /// free numeric id.
    fn create(&self, name: &str) -> Result<(), BlockError>;

    /// Deletes the snapshot with this id and/or name (the caller checked
    /// that it exists); what it was.
    fn delete(&self, id: Option<&str>, name: Option<&str>) -> Result<SnapshotInfo, BlockError>;

    /// The snapshot that matches `id` and `name` (both when both given).
    fn find(&self, id: Option<&str>, name: Option<&str>) -> Option<SnapshotInfo>;
}

/// QEMU's defaults: a filter passes its parents' needs through; a format
/// driver always reads its file consistently and lets nobody else write or
/// resize it (its metadata must not change under it), and takes write and
/// resize only where its parents need them (as QEMU's raw driver does).
pub fn default_child_perm(
    kind: DriverKind,
    read_only: bool,
    perm: Perm,
    shared: Perm,
) -> (Perm, Perm) {
    let passthrough = Perm::CONSISTENT_READ | Perm::WRITE | Perm::WRITE_UNCHANGED | Perm::RESIZE;
    let mut need = perm & passthrough;
    let mut share = (shared & passthrough) | (Perm::ALL - (Perm::WRITE | Perm::RESIZE));
    if kind == DriverKind::Format {
        need |= Perm::CONSISTENT_READ;
        share -= Perm::WRITE | Perm::RESIZE;
        if read_only {
            need -= Perm::WRITE | Perm::RESIZE;
        }
    }
    (need, share)
}

/// Whether vubd can open nodes of this driver (the others are in the
/// schema, and blockdev-add names them in its error).
pub fn is_built(driver: BlockdevDriver) -> bool {
    matches!(
        driver,
        BlockdevDriver::Blkdebug
            | BlockdevDriver::Blkverify
            | BlockdevDriver::File
            | BlockdevDriver::HostDevice
            | BlockdevDriver::Raw
            | BlockdevDriver::NullCo
            | BlockdevDriver::NullAio
            | BlockdevDriver::Qcow2
            | BlockdevDriver::Throttle
    )
}
