//! The data face of a node: what the I/O path (and the control plane, for
//! sizes, flushes and resizes) calls on it. It is shared between threads
//! behind an `Arc` and takes `&self`; a node's parents hold its `Arc`.
//!
//! Requests are asynchronous: [`BlockIo::submit`] starts one on the
//! calling thread's [`IoContext`], and its completion comes back through
//! that context under the request's tag (bytes done, or `-errno`).

use super::error::BlockError;
use crate::io::IoContext;

/// What a request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    Read,
    Write,
    Flush,
    /// Drop the data; reads may return anything afterwards.
    Discard,
    /// Make the range read as zeroes, deallocating it if `unmap`.
    WriteZeroes {
        unmap: bool,
    },
}

/// One request: a range of the node and, for reads and writes, the
/// buffers. Holding one means its buffers stay valid until completion.
#[derive(Debug, Clone, Copy)]
pub struct IoRequest {
    kind: IoKind,
    offset: u64,
    len: u64,
    iov: *const libc::iovec,
    iovcnt: u32,
    tag: u64,
}

impl IoRequest {
    /// # Safety
    /// For reads and writes, `iov` must point to `iovcnt` iovecs describing
    /// `len` bytes of memory that stays valid (and, for reads, writable),
    /// together with the iovec array itself, until the completion tagged
    /// `tag` has been reaped from the context the request is submitted on.
    pub unsafe fn new(
        kind: IoKind,
        offset: u64,
        len: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
        tag: u64,
    ) -> Self {
        IoRequest {
            kind,
            offset,
            len,
            iov,
            iovcnt,
            tag,
        }
    }

    /// A request without buffers (flush, discard, write-zeroes).
    pub fn without_data(kind: IoKind, offset: u64, len: u64, tag: u64) -> Self {
        IoRequest {
            kind,
            offset,
            len,
            iov: std::ptr::null(),
            iovcnt: 0,
            tag,
        }
    }

    pub fn kind(&self) -> IoKind {
        self.kind
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn tag(&self) -> u64 {
        self.tag
    }

    pub fn iov(&self) -> (*const libc::iovec, u32) {
        (self.iov, self.iovcnt)
    }

    /// The same request at another offset (a format driver mapping it
    /// onto its child).
    pub fn at(&self, offset: u64) -> Self {
        IoRequest { offset, ..*self }
    }

    /// The same request as another kind (a write-zeroes a node carries
    /// out as a write of zeroes, with buffers given by [`Self::part`]).
    pub fn with_kind(&self, kind: IoKind) -> Self {
        IoRequest { kind, ..*self }
    }

    /// The same request under another tag (a node starting it as a part
    /// of its own request).
    pub fn with_tag(&self, tag: u64) -> Self {
        IoRequest { tag, ..*self }
    }

    /// The same request over a part of the range: `len` bytes from
    /// `offset`, its buffers the ones `iov` describes (a node splitting it).
    ///
    /// # Safety
    /// As [`Self::new`], for `iov`.
    pub unsafe fn part(&self, offset: u64, len: u64, iov: *const libc::iovec, iovcnt: u32) -> Self {
        IoRequest {
            offset,
            len,
            iov,
            iovcnt,
            ..*self
        }
    }

    /// Fills the request's buffers with zeroes.
    pub fn zero_buffers(&self) {
        for i in 0..self.iovcnt as usize {
            // SAFETY: the constructor's contract: `iovcnt` valid iovecs
            // describing writable memory for read requests (the only ones
            // that call this).
            unsafe {
                let v = &*self.iov.add(i);
                std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len);
            }
        }
    }
}

pub trait BlockIo: Send + Sync + 'static {
    /// The size the node shows its parents, in bytes.
    fn length(&self) -> Result<u64, BlockError>;

    /// Bytes the node takes on its storage, where that is known.
    fn allocated_size(&self) -> Option<u64> {
        None
    }

    /// Changes the size the node shows.
    fn truncate(&self, size: u64) -> Result<(), BlockError>;

    /// The alignment the node needs for buffer addresses and lengths
    /// (O_DIRECT files); 1 when any buffer will do.
    fn mem_alignment(&self) -> usize {
        1
    }

    /// The write granularity the node's storage works in: a write smaller
    /// than this, or not aligned to it, costs a read-modify-write further
    /// down (a file system block, a disk's physical sector). At least
    /// [`Self::mem_alignment`]; guests see it as the physical block size.
    fn preferred_alignment(&self) -> u32 {
        512
    }

    /// Re-reads a length kept in memory after a node below was resized.
    fn refresh_length(&self) {}

    /// Makes written data stable (synchronously, for the control plane).
    fn flush(&self) -> Result<(), BlockError>;

    /// A parent reached a point blkdebug rules can name (reading guest
    /// data, writing a table, ...). Only blkdebug acts on it.
    fn debug_event(&self, event: crate::qapi::BlkdebugEvent) {
        let _ = event;
    }

    /// Starts a request on the calling thread's context. It completes with
    /// a negative errno on failure; otherwise with the bytes a read
    /// transferred (fewer at the end of a file), and for the other kinds
    /// with the bytes done or 0 (done as a whole: a write turned into
    /// write-zeroes reports 0).
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest);
}

/// Writes the [`BlockIo`] members that a wrapper passes unchanged to the
/// node it wraps, which the implementing type returns from its own
/// `fn below(&self) -> &dyn BlockIo`: every member but `submit`.
macro_rules! pass_through_block_io {
    () => {
        fn length(&self) -> Result<u64, $crate::block::error::BlockError> {
            self.below().length()
        }

        fn allocated_size(&self) -> Option<u64> {
            self.below().allocated_size()
        }

        fn truncate(&self, size: u64) -> Result<(), $crate::block::error::BlockError> {
            self.below().truncate(size)
        }

        fn mem_alignment(&self) -> usize {
            self.below().mem_alignment()
        }

        fn preferred_alignment(&self) -> u32 {
            self.below().preferred_alignment()
        }

        fn refresh_length(&self) {
            self.below().refresh_length()
        }

        fn flush(&self) -> Result<(), $crate::block::error::BlockError> {
            self.below().flush()
        }

        fn debug_event(&self, event: $crate::qapi::BlkdebugEvent) {
            self.below().debug_event(event)
        }
    };
}
pub(crate) use pass_through_block_io;
