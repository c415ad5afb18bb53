//! The `null-co` and `null-aio` drivers: a disk with no storage behind it,
//! for tests and benchmarks. Reads return zeroes (when `read-zeroes` is
//! set) or whatever the buffer held; writes are dropped.

use super::{Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::io::{IoContext, Op};
use crate::qapi::BlockdevOptionsNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// QEMU's default size for a null node: 1 GiB.
pub const DEFAULT_SIZE: u64 = 1 << 30;

pub struct NullIo {
    size: AtomicU64,
    /// Delay added to every request, in nanoseconds.
    pub latency_ns: u64,
    /// Whether reads fill the buffer with zeroes.
    pub read_zeroes: bool,
}

impl BlockIo for NullIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn allocated_size(&self) -> Option<u64> {
        Some(0)
    }

    fn truncate(&self, _size: u64) -> Result<(), BlockError> {
        Err(BlockError::invalid(
            "Image format driver does not support resize",
        ))
    }

    fn flush(&self) -> Result<(), BlockError> {
        Ok(())
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        if req.kind() == IoKind::Read && self.read_zeroes {
            req.zero_buffers();
        }
        let result = match req.kind() {
            IoKind::Read | IoKind::Write => i32::try_from(req.len()).unwrap_or(i32::MAX),
            _ => 0,
        };
        if self.latency_ns == 0 {
            ctx.complete_now(req.tag(), result);
        } else {
            let op = Op::Sleep {
                ns: self.latency_ns,
                result,
            };
            // SAFETY: a sleep refers to no caller memory.
            unsafe { ctx.push(op, req.tag()) };
        }
    }
}

pub struct NullDriver {
    io: Arc<NullIo>,
    name: &'static str,
    read_only: bool,
    /// QEMU's name for a node built from options: the options as JSON.
    filename: String,
}

impl NullDriver {
    pub fn open(
        opts: &BlockdevOptionsNull,
        read_only: bool,
        aio: bool,
    ) -> Result<Self, BlockError> {
        let size = match opts.size {
            None => DEFAULT_SIZE,
            Some(s) => u64::try_from(s)
                .map_err(|_| BlockError::invalid("Parameter 'size' must be a non-negative size"))?,
        };
        Ok(NullDriver {
            io: Arc::new(NullIo {
                size: AtomicU64::new(size),
                latency_ns: opts.latency_ns.unwrap_or(0),
                read_zeroes: opts.read_zeroes.unwrap_or(false),
            }),
            name: if aio { "null-aio" } else { "null-co" },
            read_only,
            filename: pseudo_filename(if aio { "null-aio" } else { "null-co" }, opts),
        })
    }
}

/// `null-co://` when no option was given, else `json:{...}` with the
/// driver and the options, as QEMU names such nodes.
fn pseudo_filename(driver: &str, opts: &BlockdevOptionsNull) -> String {
    // Only the options that change what the node contains count (QEMU's
    // "strong" options): latency-ns does not.
    let mut map = serde_json::Map::new();
    if let Some(z) = opts.read_zeroes {
        map.insert("read-zeroes".into(), z.into());
    }
    map.insert("driver".into(), driver.into());
    if let Some(size) = opts.size {
        map.insert("size".into(), size.into());
    }
    if map.len() == 1 {
        return format!("{driver}://");
    }
    let text = serde_json::to_string(&serde_json::Value::Object(map)).unwrap_or_default();
    // QEMU separates members with ", " and keys from values with ": ".
    format!(
        "json:{}",
        text.replace("\",\"", "\", \"")
            .replace("\":", "\": ")
            .replace(",\"", ", \"")
    )
}

impl Driver for NullDriver {
    fn name(&self) -> &'static str {
        self.name
    }

    fn kind(&self) -> DriverKind {
        DriverKind::Protocol
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn filename(&self) -> String {
        self.filename.clone()
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}
