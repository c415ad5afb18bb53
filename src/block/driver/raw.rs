//! The `raw` format: shows its file child as it is, or a window of it
//! (`offset`, `size`).

use super::{Driver, DriverKind};
use crate::block::drain::Root;
use crate::block::edge::Child;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::io::IoContext;
use crate::qapi::BlkdebugEvent;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub struct RawIo {
    child: Child,
    offset: u64,
    /// The window's length when `size` was given; it cannot be resized.
    fixed_size: Option<u64>,
    /// The current length, kept so requests need no system call; a resize
    /// anywhere in the graph refreshes it (Graph::refresh_lengths).
    size: AtomicU64,
}

impl BlockIo for RawIo {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn allocated_size(&self) -> Option<u64> {
        self.child.get().allocated_size()
    }

    fn mem_alignment(&self) -> usize {
        self.child.get().mem_alignment()
    }

    fn preferred_alignment(&self) -> u32 {
        self.child.get().preferred_alignment()
    }

    fn refresh_length(&self) {
        if self.fixed_size.is_none() {
            if let Ok(len) = self.child.get().length() {
                self.size
                    .store(len.saturating_sub(self.offset), Ordering::Relaxed);
            }
        }
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        if self.fixed_size.is_some() {
            return Err(BlockError::invalid("Cannot resize fixed-size raw disks"));
        }
        let end = self
            .offset
            .checked_add(size)
            .ok_or_else(|| BlockError::invalid("Image size too large"))?;
        self.child.get().truncate(end)?;
        self.size.store(size, Ordering::Relaxed);
        Ok(())
    }

    fn flush(&self) -> Result<(), BlockError> {
        let child = self.child.get();
        child.debug_event(BlkdebugEvent::FlushToDisk);
        child.flush()
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        let child = self.child.get();
        match req.kind() {
            IoKind::Read => child.debug_event(BlkdebugEvent::ReadAio),
            IoKind::Write => child.debug_event(BlkdebugEvent::WriteAio),
            IoKind::Flush => child.debug_event(BlkdebugEvent::FlushToDisk),
            _ => {}
        }
        let size = self.size.load(Ordering::Relaxed);
        let in_range = req
            .offset()
            .checked_add(req.len())
            .is_some_and(|end| end <= size);
        match req.offset().checked_add(self.offset) {
            Some(offset) if in_range => child.submit(ctx, &req.at(offset)),
            _ => ctx.complete_now(req.tag(), -libc::EIO),
        }
    }
}

pub struct RawDriver {
    io: Arc<RawIo>,
    child_filename: String,
    /// The child as JSON (its options or its filename), for json: names.
    child_desc: String,
    read_only: bool,
}

impl RawDriver {
    pub fn open(
        child: Root,
        child_driver: &str,
        child_filename: String,
        offset: Option<i64>,
        size: Option<i64>,
        read_only: bool,
    ) -> Result<Self, BlockError> {
        let child_len = child.length()?;
        let offset = u64::try_from(offset.unwrap_or(0))
            .map_err(|_| BlockError::invalid("offset cannot be negative"))?;
        let fixed_size = match size {
            None => None,
            Some(s) => {
                Some(u64::try_from(s).map_err(|_| BlockError::invalid("size cannot be negative"))?)
            }
        };
        if offset > child_len {
            return Err(BlockError::invalid(format!(
                "The sum of offset ({offset}) and size (0) has to be smaller or equal to the actual size of the containing file ({child_len})"
            )));
        }
        if let Some(size) = fixed_size {
            if offset.checked_add(size).is_none_or(|end| end > child_len) {
                return Err(BlockError::invalid(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({child_len})"
                )));
            }
            if size % 512 != 0 {
                return Err(BlockError::invalid("Specified size is not multiple of 512"));
            }
        }
        let size = match fixed_size {
            Some(s) => s,
            None => child_len - offset,
        };
        let child_desc =
            serde_json::json!({"driver": child_driver, "filename": child_filename}).to_string();
        Ok(RawDriver {
            child_desc: child_desc.replace("\":", "\": ").replace(",\"", ", \""),
            io: Arc::new(RawIo {
                child: Child::new(super::ChildRole::File, child),
                offset,
                fixed_size,
                size: AtomicU64::new(size),
            }),
            child_filename,
            read_only,
        })
    }
}

impl Driver for RawDriver {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn kind(&self) -> DriverKind {
        // Without a window raw changes nothing, and QEMU treats it as a
        // filter: it takes from its file only what its parents take.
        if self.io.offset == 0 && self.io.fixed_size.is_none() {
            DriverKind::Filter
        } else {
            DriverKind::Format
        }
    }

    fn io(&self) -> Root {
        self.io.clone()
    }

    fn child(&self, role: super::ChildRole) -> Option<&Child> {
        (role == super::ChildRole::File).then_some(&self.io.child)
    }

    fn filename(&self) -> String {
        match self.io.fixed_size {
            // A window is described by its options, as QEMU does.
            Some(size) => format!(
                "json:{{\"driver\": \"raw\", \"offset\": {}, \"size\": {size}, \"file\": {}}}",
                self.io.offset, self.child_desc
            ),
            None if self.io.offset > 0 => format!(
                "json:{{\"driver\": \"raw\", \"offset\": {}, \"file\": {}}}",
                self.io.offset, self.child_desc
            ),
            None => self.child_filename.clone(),
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn describe_image(&self, info: &mut crate::qapi::ImageInfo) {
        info.dirty_flag = Some(false);
    }
}
