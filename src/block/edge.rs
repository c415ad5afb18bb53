//! A child edge as the data plane sees it: the node a parent sends its
//! requests to in one role (`file`, `backing`), re-pointable while the
//! daemon runs.
//!
//! Reading the edge on the request path is one load, as holding the
//! child's `Arc` directly would be: there is no lock and no counter. That
//! is sound because the control plane re-points an edge only inside
//! [`Graph::change`](super::graph::Graph::change), after draining every
//! data-plane user whose requests can pass through the parent (the users
//! whose root reaches it), so no request reads the edge meanwhile; the
//! drain's release and the users' re-entry order the write before any
//! later read. The control thread itself reads edges only between
//! changes.

use super::drain::Root;
use super::driver::ChildRole;
use super::io::BlockIo;
use std::cell::UnsafeCell;

pub struct Child {
    role: ChildRole,
    node: UnsafeCell<Root>,
}

// SAFETY: the node is an `Arc<dyn BlockIo>` (Send + Sync); the cell is
// written only by `replace`, whose contract excludes every reader.
unsafe impl Sync for Child {}
// SAFETY: as above; moving the edge moves an `Arc`.
unsafe impl Send for Child {}

impl Child {
    pub fn new(role: ChildRole, node: Root) -> Self {
        Child {
            role,
            node: UnsafeCell::new(node),
        }
    }

    pub fn role(&self) -> ChildRole {
        self.role
    }

    /// The child, for a request or a control-plane call.
    #[inline]
    pub fn get(&self) -> &dyn BlockIo {
        // SAFETY: no `replace` runs while a reader exists (its contract),
        // so the `Arc` in the cell is alive and unchanged for as long as
        // the reference is used.
        unsafe { &**self.node.get() }
    }

    /// A counted handle on the child (for a task that outlives the call).
    pub fn node(&self) -> Root {
        // SAFETY: as in `get`.
        unsafe { (*self.node.get()).clone() }
    }

    /// Points the edge at `node` and returns the node it pointed at.
    ///
    /// # Safety
    /// No request may be reading the edge: every data-plane user whose
    /// requests can reach the parent is drained, and the caller holds no
    /// reference obtained from [`Self::get`].
    pub unsafe fn replace(&self, node: Root) -> Root {
        // SAFETY: the caller's contract: nobody else reads or writes the
        // cell now.
        unsafe { std::mem::replace(&mut *self.node.get(), node) }
    }
}

/// The node an optional edge points at while it has no child (a qcow2
/// image without a backing file): zero bytes long, so nothing reads it.
pub struct Absent;

impl BlockIo for Absent {
    fn length(&self) -> Result<u64, super::error::BlockError> {
        Ok(0)
    }
    fn truncate(&self, _size: u64) -> Result<(), super::error::BlockError> {
        Err(super::error::BlockError::invalid("no node here"))
    }
    fn flush(&self) -> Result<(), super::error::BlockError> {
        Ok(())
    }
    fn submit(&self, ctx: &mut crate::io::IoContext, req: &super::io::IoRequest) {
        ctx.complete_now(req.tag(), -libc::EIO);
    }
}

impl Child {
    /// An edge with no child yet (see [`Absent`]).
    pub fn absent(role: ChildRole) -> Self {
        Child::new(role, std::sync::Arc::new(Absent))
    }
}
