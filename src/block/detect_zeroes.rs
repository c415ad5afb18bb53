//! detect-zeroes: a write whose data is all zeroes becomes a write-zeroes
//! request (deallocating with `unmap`), so zeroed blocks cost no space.
//! The node's face ([`super::face`]) applies it.

use super::io::IoRequest;

/// Whether every byte the request's buffers hold is zero.
pub fn all_zero(req: &IoRequest) -> bool {
    let (iov, n) = req.iov();
    (0..n as usize).all(|i| {
        // SAFETY: IoRequest's contract: `n` valid iovecs describing
        // readable memory for a write request.
        let v = unsafe { &*iov.add(i) };
        // SAFETY: as above, the buffer is `iov_len` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len) };
        let (head, words, tail) = {
            // SAFETY: u64 has no invalid bit patterns; align_to only
            // reinterprets the aligned middle of the slice.
            unsafe { bytes.align_to::<u64>() }
        };
        head.iter().all(|&b| b == 0)
            && words.iter().all(|&w| w == 0)
            && tail.iter().all(|&b| b == 0)
    })
}
