//! The data face of a node: what the I/O path (and the control plane, for
//! sizes, flushes and resizes) calls on it. It is shared between threads
//! behind an `Arc` and takes `&self`; a node's parents hold its `Arc`.

use super::error::BlockError;

pub trait BlockIo: Send + Sync + 'static {
    /// The size the node shows its parents, in bytes.
    fn length(&self) -> Result<u64, BlockError>;

    /// Bytes the node takes on its storage, where that is known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// Changes the size the node shows.
    fn truncate(&self, size: u64) -> Result<(), BlockError>;

    /// Makes written data stable.
    fn flush(&self) -> Result<(), BlockError>;
}
