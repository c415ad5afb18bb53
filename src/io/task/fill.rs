//! Reads that always come back whole.
//!
//! A read of a regular file that reaches past its end transfers only the
//! bytes the file has. What lies beyond reads as zeroes, as a disk would
//! show it, and nodes above the file (and the export's backend) should
//! not each have to know that. So the file driver starts such reads as a
//! *fill*: one slab entry that remembers the parent tag and the buffers,
//! and when the read completes with fewer bytes than asked (and no error),
//! zeroes the rest of the buffers and completes the parent with the full
//! length. A fill costs what a join of one part costs: no future and no
//! allocation once the slab has grown.

use super::{generation, make_tag, Executor, KIND_FILL};
use crate::io::{Completion, IoContext};

/// One read in flight whose tail is zeroed should it come back short.
#[derive(Clone, Copy)]
pub(super) struct FillSlot {
    parent: u64,
    iov: *const libc::iovec,
    iovcnt: u32,
    len: u64,
    gen: u32,
}

impl IoContext {
    /// Opens a fill for a read of `len` bytes into the buffers `iov`
    /// describes, on behalf of `parent`; returns the tag to start the read
    /// with. Its completion completes `parent` with `len` when the read
    /// transferred `len` bytes or fewer (the rest zeroed), or with the
    /// read's error.
    ///
    /// # Safety
    /// `iov` must point to `iovcnt` iovecs describing `len` bytes of
    /// writable memory, and the array and that memory must stay valid
    /// until the completion of the returned tag has been reaped (the same
    /// contract as the read itself).
    pub unsafe fn start_fill(
        &mut self,
        parent: u64,
        iov: *const libc::iovec,
        iovcnt: u32,
        len: u64,
    ) -> u64 {
        let exec = &mut self.exec;
        exec.live += 1;
        let slot = |gen| FillSlot {
            parent,
            iov,
            iovcnt,
            len,
            gen,
        };
        let i = match exec.free_fills.pop() {
            Some(i) => {
                let i = i as usize;
                exec.fills[i] = slot(exec.fills[i].gen);
                i
            }
            None => {
                exec.fills.push(slot(0));
                exec.fills.len() - 1
            }
        };
        make_tag(KIND_FILL, exec.fills[i].gen, i)
    }
}

impl Executor {
    /// The read of fill `c.tag` completed: zeroes what it did not
    /// transfer and gives the parent's completion (None for a tag that
    /// names no fill in flight).
    pub(super) fn finish_fill(&mut self, c: Completion) -> Option<Completion> {
        let i = super::index(c.tag);
        let Some(f) = self.fills.get_mut(i).filter(|f| f.gen == generation(c.tag)) else {
            log::error!("completion for an unknown fill {i}");
            return None;
        };
        let result = match u64::try_from(c.result) {
            Ok(got) if got < f.len => {
                // SAFETY: start_fill's contract: the iovecs describe
                // writable memory that stays valid until this completion
                // has been reaped, which is happening now.
                unsafe { zero_from(f.iov, f.iovcnt, got) };
                i32::try_from(f.len).unwrap_or(i32::MAX)
            }
            _ => c.result,
        };
        let parent = f.parent;
        f.gen = f.gen.wrapping_add(1) & super::GEN_MASK as u32;
        self.free_fills.push(i as u32);
        self.live -= 1;
        Some(Completion {
            tag: parent,
            result,
        })
    }
}

/// Zeroes the buffers `iov` describes from byte `from` on.
///
/// # Safety
/// `iov` must point to `iovcnt` iovecs describing writable memory.
unsafe fn zero_from(iov: *const libc::iovec, iovcnt: u32, from: u64) {
    let mut skip = usize::try_from(from).unwrap_or(usize::MAX);
    for i in 0..iovcnt as usize {
        // SAFETY: the caller's contract: `iovcnt` valid iovecs.
        let v = unsafe { &*iov.add(i) };
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // SAFETY: the iovec describes writable memory (the caller's
        // contract); `skip < iov_len`, so the range stays inside it.
        unsafe { std::ptr::write_bytes((v.iov_base as *mut u8).add(skip), 0, v.iov_len - skip) };
        skip = 0;
    }
}
