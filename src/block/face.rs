//! A node's face: what its parents and users send requests to. It wraps
//! the driver's data face with what QEMU's generic block layer does for
//! every node whatever its driver:
//!
//! * `discard=ignore` (the default): discards end here, successfully,
//!   and write-zeroes may not deallocate;
//! * detect-zeroes;
//! * the write threshold (`block-set-write-threshold`), which sends one
//!   BLOCK_WRITE_THRESHOLD for the first write or write-zeroes that ends
//!   past it and disarms.
//!
//! Each node decides for itself, as in QEMU: a discard reaches the file
//! only if every node on its way has `discard=unmap` (children inherit
//! the option from a parent that defines them inline). With nothing set a
//! face costs one relaxed load per write.

use super::detect_zeroes::all_zero;
use super::drain::Root;
use super::io::{BlockIo, IoKind, IoRequest};
use super::notice::{Notice, Sink, ThresholdCrossed};
use crate::io::IoContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// A node's write threshold (0: none), shared by its face and the graph.
pub struct WriteThreshold {
    value: AtomicU64,
    node: String,
    sink: Option<Sink>,
}

impl WriteThreshold {
    pub fn new(node: &str, sink: Option<Sink>) -> Arc<Self> {
        Arc::new(WriteThreshold {
            value: AtomicU64::new(0),
            node: node.to_string(),
            sink,
        })
    }

    pub fn get(&self) -> u64 {
        self.value.load(Ordering::Relaxed)
    }

    /// Arms (or with 0, disarms) the threshold.
    pub fn set(&self, bytes: u64) {
        self.value.store(bytes, Ordering::Relaxed);
    }

    /// A write ending at `end` starts: past an armed threshold, the
    /// threshold is disarmed and the notice sent, once.
    #[inline]
    fn check(&self, end: u64) {
        let t = self.value.load(Ordering::Relaxed);
        if t == 0 || end <= t {
            return;
        }
        // Only the write that disarms it reports (two threads may race).
        if self
            .value
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        if let Some(sink) = &self.sink {
            sink(Notice::WriteThreshold(ThresholdCrossed {
                node: self.node.clone(),
                amount_exceeded: end - t,
                threshold: t,
            }));
        }
    }
}

pub struct NodeFace {
    inner: Root,
    /// detect-zeroes: None (off), or whether zeroes are unmapped.
    zeroes: Option<bool>,
    /// discard=unmap: discards pass and write-zeroes may deallocate.
    unmap: bool,
    threshold: Arc<WriteThreshold>,
}

impl NodeFace {
    pub fn new(
        inner: Root,
        zeroes: Option<bool>,
        unmap: bool,
        threshold: Arc<WriteThreshold>,
    ) -> Self {
        NodeFace {
            inner,
            zeroes,
            unmap,
            threshold,
        }
    }
}

impl NodeFace {
    fn below(&self) -> &dyn BlockIo {
        &*self.inner
    }
}

impl BlockIo for NodeFace {
    crate::block::io::pass_through_block_io!();

    #[inline]
    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        match req.kind() {
            IoKind::Discard if !self.unmap => return ctx.complete_now(req.tag(), 0),
            IoKind::WriteZeroes { unmap: true } if !self.unmap => {
                self.threshold.check(req.offset().saturating_add(req.len()));
                let keep = req.with_kind(IoKind::WriteZeroes { unmap: false });
                return self.inner.submit(ctx, &keep);
            }
            _ => {}
        }
        if matches!(req.kind(), IoKind::Write | IoKind::WriteZeroes { .. }) {
            self.threshold.check(req.offset().saturating_add(req.len()));
            if let Some(unmap) = self.zeroes {
                if req.kind() == IoKind::Write && !req.is_empty() && all_zero(req) {
                    // Completes with 0: for a write that means done as a
                    // whole (see BlockIo::submit).
                    let zeroes = IoRequest::without_data(
                        IoKind::WriteZeroes { unmap },
                        req.offset(),
                        req.len(),
                        req.tag(),
                    );
                    return self.inner.submit(ctx, &zeroes);
                }
            }
        }
        self.inner.submit(ctx, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[test]
    fn threshold_fires_once_for_the_write_that_crosses_it() {
        let seen: Arc<Mutex<Vec<Notice>>> = Arc::default();
        let s = seen.clone();
        let t = WriteThreshold::new("n", Some(Arc::new(move |n| s.lock().unwrap().push(n))));
        t.check(1 << 20);
        t.set(4096);
        t.check(4096);
        assert!(seen.lock().unwrap().is_empty());
        t.check(8192);
        t.check(16384);
        assert_eq!(t.get(), 0);
        assert_eq!(
            *seen.lock().unwrap(),
            vec![Notice::WriteThreshold(ThresholdCrossed {
                node: "n".into(),
                amount_exceeded: 4096,
                threshold: 4096
            })]
        );
    }
}
