//! Pieces of a request's buffers: the iovecs covering a byte range of
//! the request, zeroing them, and copying into them.

use crate::block::io::IoRequest;

/// The iovecs of `req` that cover `len` bytes from byte `start` of the
/// request.
pub fn slice(req: &IoRequest, start: u64, len: u64) -> Vec<libc::iovec> {
    let (iov, n) = req.iov();
    let mut out = Vec::new();
    let mut skip = start as usize;
    let mut want = len as usize;
    for i in 0..n as usize {
        if want == 0 {
            break;
        }
        // SAFETY: the request's contract: `n` valid iovecs.
        let v = unsafe { *iov.add(i) };
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        let take = (v.iov_len - skip).min(want);
        out.push(libc::iovec {
            // SAFETY: `skip` is within this iovec's buffer.
            iov_base: unsafe { (v.iov_base as *mut u8).add(skip) }.cast(),
            iov_len: take,
        });
        want -= take;
        skip = 0;
    }
    out
}

/// Fills the memory of `iov` with zeroes.
pub fn zero(iov: &[libc::iovec]) {
    for v in iov {
        // SAFETY: the iovecs describe writable buffers of a read request
        // (the only requests whose buffers are zeroed), valid until it
        // completes.
        unsafe { std::ptr::write_bytes(v.iov_base as *mut u8, 0, v.iov_len) };
    }
}

/// Copies `data` into the memory of `iov`, as far as both go.
pub fn fill(iov: &[libc::iovec], mut data: &[u8]) {
    for v in iov {
        let n = v.iov_len.min(data.len());
        // SAFETY: as in `zero`; `data` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), v.iov_base as *mut u8, n) };
        data = &data[n..];
        if data.is_empty() {
            break;
        }
    }
}
