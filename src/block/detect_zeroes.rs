//! detect-zeroes: a write whose data is all zeroes becomes a write-zeroes
//! request (deallocating with `unmap`), so zeroed blocks cost no space.
//! It wraps the data face of a node that has the option set.

use super::drain::Root;
use super::error::BlockError;
use super::io::{BlockIo, IoKind, IoRequest};
use crate::io::IoContext;

pub struct DetectZeroes {
    inner: Root,
    unmap: bool,
}

impl DetectZeroes {
    pub fn new(inner: Root, unmap: bool) -> Self {
        DetectZeroes { inner, unmap }
    }
}

/// Whether every byte the request's buffers hold is zero.
fn all_zero(req: &IoRequest) -> bool {
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

impl BlockIo for DetectZeroes {
    fn length(&self) -> Result<u64, BlockError> {
        self.inner.length()
    }

    fn allocated_size(&self) -> Option<u64> {
        self.inner.allocated_size()
    }

    fn mem_alignment(&self) -> usize {
        self.inner.mem_alignment()
    }

    fn preferred_alignment(&self) -> u32 {
        self.inner.preferred_alignment()
    }

    fn refresh_length(&self) {
        self.inner.refresh_length()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.inner.truncate(size)
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.inner.flush()
    }

    fn debug_event(&self, event: crate::qapi::BlkdebugEvent) {
        self.inner.debug_event(event);
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        if req.kind() == IoKind::Write && !req.is_empty() && all_zero(req) {
            // Completes with 0: for a write that means done as a whole
            // (see BlockIo::submit).
            let zeroes = IoRequest::without_data(
                IoKind::WriteZeroes { unmap: self.unmap },
                req.offset(),
                req.len(),
                req.tag(),
            );
            return self.inner.submit(ctx, &zeroes);
        }
        self.inner.submit(ctx, req)
    }
}
