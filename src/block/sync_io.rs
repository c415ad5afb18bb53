//! Synchronous reads and writes on a node, for the control plane: opening
//! an image reads its header and tables, creating an overlay writes one.
//!
//! The calling thread gets an I/O context of its own on first use (never
//! an I/O thread's, so no queue waits behind this) and waits on it.

use super::error::BlockError;
use super::io::{BlockIo, IoKind, IoRequest};
use crate::io::aligned::AlignedBuf;
use crate::io::{Completion, IoContext};
use std::cell::RefCell;
use std::time::{Duration, Instant};

/// How long one synchronous request may take before it is reported.
const TIMEOUT: Duration = Duration::from_secs(60);

thread_local! {
    static CTX: RefCell<Option<IoContext>> = const { RefCell::new(None) };
}

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the node
/// read as zeroes.
pub fn read_at(node: &dyn BlockIo, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    let align = node.mem_alignment().max(1) as u64;
    if align > 1 {
        // An O_DIRECT node: read the aligned span into an aligned buffer.
        let start = offset / align * align;
        let end = (offset + buf.len() as u64).div_ceil(align) * align;
        let mut bounce = AlignedBuf::new((end - start) as usize, align as usize)
            .ok_or_else(|| BlockError::invalid("cannot allocate an aligned buffer"))?;
        read_plain(node, start, bounce.as_mut_slice())?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&bounce.as_slice()[skip..skip + buf.len()]);
        return Ok(());
    }
    read_plain(node, offset, buf)
}

fn read_plain(node: &dyn BlockIo, offset: u64, buf: &mut [u8]) -> Result<(), BlockError> {
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    // SAFETY: `buf` and `iov` outlive `run`, which waits for completion.
    let req = unsafe { IoRequest::new(IoKind::Read, offset, buf.len() as u64, iov.as_ptr(), 1, 1) };
    let n = run(node, &req)?;
    if let Some(tail) = buf.get_mut(n..) {
        tail.fill(0);
    }
    Ok(())
}

/// Writes `buf` at `offset`, all of it (on an O_DIRECT node, `offset`
/// and the length must be aligned as the node needs).
pub fn write_at(node: &dyn BlockIo, offset: u64, buf: &[u8]) -> Result<(), BlockError> {
    // An O_DIRECT node takes only aligned buffers: copy into one.
    let align = node.mem_alignment().max(1);
    let mut bounce = None;
    let data: *const u8 = if align > 1 {
        let b = bounce.insert(
            AlignedBuf::new(buf.len(), align)
                .ok_or_else(|| BlockError::invalid("cannot allocate an aligned buffer"))?,
        );
        b.as_mut_slice().copy_from_slice(buf);
        b.as_slice().as_ptr()
    } else {
        buf.as_ptr()
    };
    let iov = [libc::iovec {
        iov_base: data as *mut libc::c_void,
        iov_len: buf.len(),
    }];
    // SAFETY: `buf`, `bounce` and `iov` outlive `run`, which waits for
    // completion; a write only reads the buffer.
    let req =
        unsafe { IoRequest::new(IoKind::Write, offset, buf.len() as u64, iov.as_ptr(), 1, 1) };
    let n = run(node, &req)?;
    drop(bounce);
    if n != buf.len() && n != 0 {
        return Err(BlockError::Io {
            op: "write",
            reason: format!("short write: {n} of {} bytes", buf.len()),
        });
    }
    Ok(())
}

/// Runs `fut` as a task on this thread's I/O context and waits for it;
/// the value it completes with. Metadata changes made on the control
/// thread (internal snapshots) use the same async helpers as the I/O
/// threads this way.
pub fn run_task<F: std::future::Future<Output = i32> + 'static>(fut: F) -> Result<i32, BlockError> {
    CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoContext::new(16, false).map_err(|e| BlockError::io("I/O setup", &e))?);
        }
        let Some(ctx) = slot.as_mut() else {
            return Err(BlockError::invalid("no I/O context"));
        };
        ctx.spawn(TASK_TAG, fut);
        wait(ctx, TASK_TAG)
    })
}

/// The tag a task run by [`run_task`] completes with.
const TASK_TAG: u64 = 1;

/// Submits `req` and waits for its completion; the bytes done.
fn run(node: &dyn BlockIo, req: &IoRequest) -> Result<usize, BlockError> {
    CTX.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(IoContext::new(16, false).map_err(|e| BlockError::io("I/O setup", &e))?);
        }
        let Some(ctx) = slot.as_mut() else {
            return Err(BlockError::invalid("no I/O context"));
        };
        node.submit(ctx, req);
        let result = wait(ctx, req.tag())?;
        if result < 0 {
            let op = if req.kind() == IoKind::Read {
                "read"
            } else {
                "write"
            };
            return Err(BlockError::io(
                op,
                &std::io::Error::from_raw_os_error(-result),
            ));
        }
        Ok(result as usize)
    })
}

fn wait(ctx: &mut IoContext, tag: u64) -> Result<i32, BlockError> {
    let start = Instant::now();
    let mut out: Vec<Completion> = Vec::new();
    loop {
        ctx.submit()
            .map_err(|e| BlockError::io("I/O submission", &e))?;
        out.clear();
        ctx.reap(&mut out);
        if let Some(c) = out.iter().find(|c| c.tag == tag) {
            return Ok(c.result);
        }
        if start.elapsed() > TIMEOUT {
            return Err(BlockError::Io {
                op: "I/O",
                reason: format!("no completion in {} s", TIMEOUT.as_secs()),
            });
        }
        if ctx.arm() {
            let mut pfd = libc::pollfd {
                fd: ctx.event_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, 10) };
            ctx.disarm();
            ctx.clear_wake();
        }
    }
}
