//! The `blkverify` filter: every request goes to both children, `test`
//! (the node under test; its size is the node's) and `raw` (a plain image
//! that holds what `test` should). A read is done on both and the bytes
//! compared; on a mismatch the request fails with EIO and the first
//! differing offset is logged (QEMU ends the process instead). Writes,
//! write-zeroes, discards and flushes go to both, and fail if either
//! fails.

use super::{ChildRole, Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::edge::Child;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::io::aligned::AlignedBuf;
use crate::io::{task, IoContext};
use std::sync::{Arc, Weak};

pub struct BlkverifyIo {
    test: Child,
    raw: Child,
    name: String,
    me: Weak<BlkverifyIo>,
}

/// Where two byte strings first differ.
fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

/// Copies the request's buffers out (the test node's data, for comparing).
fn gather(req: &IoRequest, out: &mut Vec<u8>) {
    out.clear();
    let (iov, n) = req.iov();
    for i in 0..n as usize {
        // SAFETY: a read's iovecs describe valid memory until it completes
        // (IoRequest's contract); it has completed but is not yet
        // answered, so the memory is still the requester's and unchanged.
        let v = unsafe { &*iov.add(i) };
        // SAFETY: as above: `iov_len` bytes at `iov_base` are readable.
        out.extend_from_slice(unsafe {
            std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
        });
    }
}

async fn verified_read(io: Arc<BlkverifyIo>, req: IoRequest) -> i32 {
    let len = usize::try_from(req.len()).unwrap_or(usize::MAX);
    let align = io.raw.get().mem_alignment().max(8);
    let Some(mut copy) = AlignedBuf::new(len.max(1), align) else {
        return -libc::ENOMEM;
    };
    let iov = libc::iovec {
        iov_base: copy.as_mut_ptr().cast(),
        iov_len: len,
    };
    // SAFETY: `copy` and `iov` live in this task until both reads are
    // awaited below.
    let raw_req = unsafe { IoRequest::new(IoKind::Read, req.offset(), req.len(), &iov, 1, 0) };
    let test = task::submit(io.test.get(), &req);
    let raw = task::submit(io.raw.get(), &raw_req);
    let (t, r) = (test.await, raw.await);
    if t < 0 {
        return t;
    }
    if r < 0 {
        log::error!(
            "blkverify '{}': raw read at {} failed: {r}",
            io.name,
            req.offset()
        );
        return -libc::EIO;
    }
    let mut got = Vec::with_capacity(len);
    gather(&req, &mut got);
    if let Some(at) = first_difference(&got, &copy.as_slice()[..len]) {
        log::error!(
            "blkverify '{}': read offset={} bytes={} contents mismatch at offset {}",
            io.name,
            req.offset(),
            req.len(),
            req.offset() + at as u64
        );
        return -libc::EIO;
    }
    t
}

async fn both(io: Arc<BlkverifyIo>, req: IoRequest) -> i32 {
    let test = task::submit(io.test.get(), &req);
    let raw = task::submit(io.raw.get(), &req);
    let (t, r) = (test.await, raw.await);
    if t < 0 {
        return t;
    }
    if r < 0 {
        log::error!(
            "blkverify '{}': {:?} at {} failed on raw: {r}",
            io.name,
            req.kind(),
            req.offset()
        );
        return -libc::EIO;
    }
    t
}

impl BlockIo for BlkverifyIo {
    fn length(&self) -> Result<u64, BlockError> {
        self.test.get().length()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        self.test.get().truncate(size)?;
        self.raw.get().truncate(size)
    }

    fn mem_alignment(&self) -> usize {
        self.test
            .get()
            .mem_alignment()
            .max(self.raw.get().mem_alignment())
    }

    fn refresh_length(&self) {
        self.test.get().refresh_length();
        self.raw.get().refresh_length();
    }

    fn flush(&self) -> Result<(), BlockError> {
        self.test.get().flush()?;
        self.raw.get().flush()
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let Some(me) = self.me.upgrade() else {
            return ctx.complete_now(req.tag(), -libc::EIO);
        };
        match req.kind() {
            IoKind::Read => ctx.spawn(req.tag(), verified_read(me, *req)),
            _ => ctx.spawn(req.tag(), both(me, *req)),
        }
    }
}

pub struct BlkverifyDriver {
    io: Arc<BlkverifyIo>,
    filename: String,
    read_only: bool,
}

impl BlkverifyDriver {
    pub fn open(
        name: &str,
        test: Root,
        test_filename: &str,
        raw: Root,
        raw_filename: &str,
        read_only: bool,
    ) -> Self {
        BlkverifyDriver {
            io: Arc::new_cyclic(|me| BlkverifyIo {
                test: Child::new(ChildRole::Test, test),
                raw: Child::new(ChildRole::File, raw),
                name: name.to_string(),
                me: me.clone(),
            }),
            filename: format!("blkverify:{raw_filename}:{test_filename}"),
            read_only,
        }
    }
}

impl Driver for BlkverifyDriver {
    fn name(&self) -> &'static str {
        "blkverify"
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Filter
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn child(&self, role: ChildRole) -> Option<&Child> {
        match role {
            ChildRole::File => Some(&self.io.raw),
            ChildRole::Test => Some(&self.io.test),
            _ => None,
        }
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::first_difference;

    #[test]
    fn finds_the_first_differing_byte() {
        assert_eq!(first_difference(b"abcd", b"abcd"), None);
        assert_eq!(first_difference(b"abcd", b"abxd"), Some(2));
    }
}
