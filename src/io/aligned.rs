//! A heap buffer with a chosen alignment, for O_DIRECT bounce copies.

use std::alloc::{alloc_zeroed, dealloc, Layout};

pub struct AlignedBuf {
    ptr: *mut u8,
    layout: Layout,
}

// SAFETY: the buffer is plain memory owned by this value.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (at least one) aligned to `align` (a
    /// power of two); None if the allocation is refused.
    pub fn new(len: usize, align: usize) -> Option<Self> {
        let layout = Layout::from_size_align(len.max(1), align.max(1)).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc_zeroed(layout) };
        if ptr.is_null() {
            None
        } else {
            Some(AlignedBuf { ptr, layout })
        }
    }

    pub fn len(&self) -> usize {
        self.layout.size()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `len` initialised (zeroed at first) bytes
        // owned by self.
        unsafe { std::slice::from_raw_parts(self.ptr, self.layout.size()) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, borrowed mutably through self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this layout.
        unsafe { dealloc(self.ptr, self.layout) };
    }
}

/// Copies from the iovecs into `dst` (a gather).
///
/// # Safety
/// The iovecs must describe readable memory.
pub unsafe fn gather(iov: &[libc::iovec], dst: &mut [u8]) {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(dst.len() - at);
        // SAFETY: the caller guarantees the source; `dst` has room for `n`.
        unsafe {
            std::ptr::copy_nonoverlapping(v.iov_base as *const u8, dst.as_mut_ptr().add(at), n)
        };
        at += n;
    }
}

/// Copies `src` out into the iovecs (a scatter).
///
/// # Safety
/// The iovecs must describe writable memory.
pub unsafe fn scatter(src: &[u8], iov: &[libc::iovec]) {
    let mut at = 0;
    for v in iov {
        let n = v.iov_len.min(src.len() - at);
        // SAFETY: the caller guarantees the destination; `src` has `n` left.
        unsafe { std::ptr::copy_nonoverlapping(src.as_ptr().add(at), v.iov_base as *mut u8, n) };
        at += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffer_is_aligned_and_gather_scatter_round_trip() {
        let mut buf = AlignedBuf::new(1024, 4096).unwrap();
        assert_eq!(buf.as_mut_ptr() as usize % 4096, 0);
        let mut a = [1u8; 300];
        let mut b = [2u8; 724];
        let iov = [
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: a.len(),
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            },
        ];
        // SAFETY: the iovecs describe the two local arrays.
        unsafe { gather(&iov, buf.as_mut_slice()) };
        assert_eq!(buf.as_slice()[299], 1);
        assert_eq!(buf.as_slice()[300], 2);
        buf.as_mut_slice().fill(9);
        // SAFETY: as above.
        unsafe { scatter(buf.as_slice(), &iov) };
        assert!(a.iter().chain(b.iter()).all(|&x| x == 9));
    }
}
