//! Aligned copies of buffers a node cannot take as they are.
//!
//! An O_DIRECT node needs buffer addresses and lengths aligned to its
//! sector size. Guest buffers usually are (drivers allocate pages), but
//! nothing obliges a guest to, so a request whose buffers are not goes
//! through a bounce buffer: a write's data is copied in before it starts,
//! a read's copied out when it completes. Each request slot keeps its
//! buffer, grown to the largest request it carried, and reuses it.

use crate::io::aligned::{gather, scatter, AlignedBuf};

pub(super) struct Bounce {
    buf: Option<AlignedBuf>,
    /// The single iovec the node is given instead of the guest's.
    iov: libc::iovec,
    /// The request in the slot goes through the copy.
    active: bool,
}

impl Default for Bounce {
    fn default() -> Self {
        Bounce {
            buf: None,
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            active: false,
        }
    }
}

/// Whether every buffer starts and ends on `align`.
#[inline]
pub(super) fn is_aligned(iov: &[libc::iovec], align: usize) -> bool {
    iov.iter()
        .all(|v| (v.iov_base as usize) % align == 0 && v.iov_len % align == 0)
}

impl Bounce {
    pub(super) fn active(&self) -> bool {
        self.active
    }

    /// The iovec to give the node while [`Self::active`].
    pub(super) fn iov(&self) -> *const libc::iovec {
        &self.iov
    }

    /// Sets up the copy for a request of `len` bytes over `guest`; for a
    /// write, copies the data in. False when no buffer could be had.
    ///
    /// # Safety
    /// `guest` must describe `len` bytes of memory that is readable (for a
    /// write) and stays valid until [`Self::finish`].
    pub(super) unsafe fn start(
        &mut self,
        guest: &[libc::iovec],
        len: usize,
        align: usize,
        write: bool,
    ) -> bool {
        if self.buf.as_ref().is_none_or(|b| b.len() < len) {
            self.buf = None;
            self.buf = AlignedBuf::new(len.div_ceil(align) * align, align);
        }
        let Some(buf) = self.buf.as_mut() else {
            return false;
        };
        if write {
            // SAFETY: the caller's contract: `guest` is readable memory.
            unsafe { gather(guest, &mut buf.as_mut_slice()[..len]) };
        }
        self.iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: len,
        };
        self.active = true;
        true
    }

    /// Ends the copy; a read that transferred `read` bytes has them copied
    /// out to `guest`.
    ///
    /// # Safety
    /// `guest` must describe writable memory when `read` is given.
    pub(super) unsafe fn finish(&mut self, guest: &[libc::iovec], read: Option<usize>) {
        self.active = false;
        if let (Some(n), Some(b)) = (read, self.buf.as_ref()) {
            let n = n.min(b.len()).min(self.iov.iov_len);
            // SAFETY: the caller's contract: `guest` is writable memory.
            unsafe { scatter(&b.as_slice()[..n], guest) };
        }
    }
}
