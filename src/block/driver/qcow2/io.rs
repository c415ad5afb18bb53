//! The qcow2 data face: guest requests mapped through the L1/L2 tables.
//!
//! A read that stays within one cluster (one subcluster with extended L2
//! entries) whose table is cached goes the direct way: the request is
//! passed to the file, or the backing node, at the mapped offset, or its
//! buffers are zeroed, with no task. Everything else — a table to read
//! first, a compressed cluster, a request over several clusters — runs as
//! a task that walks the range piece by piece.

use super::cache::L2Cache;
use super::iov;
use crate::block::edge::Child;
use crate::block::error::BlockError;
use crate::block::io::{BlockIo, IoKind, IoRequest};
use crate::block::qcow2::format::{
    decompress, CompressedCluster, CompressionType, ExtendedL2Entry, FormatError, Geometry,
    L1Entry, L2Entry, Subcluster,
};
use crate::io::task;
use crate::io::IoContext;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

/// Where a guest byte's data is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Map {
    /// At this offset of the file, in a cluster only this image uses
    /// (refcount 1: it may be written in place).
    Data(u64),
    /// At this offset of the file, in a cluster shared with an internal
    /// snapshot (written by copying it first).
    Shared(u64),
    /// Reads as zeroes.
    Zero,
    /// Not in this image: the backing node's, or zeroes.
    Unallocated,
    /// Inside this compressed cluster, which starts at the given guest
    /// offset.
    Compressed(CompressedCluster),
}

/// What looking up a guest offset found.
pub(super) enum Lookup {
    /// The mapping, valid for `len` bytes from the offset.
    Found(Map, u64),
    /// The L2 table at this file offset must be read first.
    NeedTable(u64),
    /// The tables are corrupt here.
    Bad(String),
}

pub struct Qcow2Io {
    pub(super) me: Weak<Qcow2Io>,
    pub(super) file: Child,
    /// The backing node ([`crate::block::edge::Absent`] while there is
    /// none: it is 0 bytes long, so everything reads as zeroes).
    pub(super) backing: Child,
    pub(super) geo: Geometry,
    pub(super) size: AtomicU64,
    pub(super) compression: CompressionType,
    /// The L1 table's raw entries (changed when an L2 table is added), as
    /// many as its clusters hold; the first `l1_size` are the image's.
    pub(super) l1: Vec<AtomicU64>,
    pub(super) l1_size: AtomicU64,
    pub(super) l1_table_offset: u64,
    pub(super) cache: Mutex<L2Cache>,
    /// Counts metadata writes that completed (see `load_table`).
    pub(super) meta_writes: AtomicU64,
    /// What writing needs; None on a read-only node.
    pub(super) alloc: Option<super::alloc::Allocator>,
    /// The node's name, for messages.
    pub(super) name: String,
    /// The image's qcow2 version (zero clusters need 3).
    pub(super) version: u32,
    /// The node's `discard=unmap`: guest discards free clusters.
    pub(super) discard_unmap: bool,
    /// `pass-discard-request`: freed clusters are discarded in the file.
    pub(super) pass_discard: bool,
    /// `pass-discard-snapshot`: clusters a snapshot deletion frees are
    /// discarded in the file.
    pub(super) pass_discard_snapshot: bool,
    /// The internal snapshots, as the image lists them now.
    pub(super) snapshots: Mutex<super::snapshots::SnapTable>,
    /// Overlap checks and what happens when damage is found.
    pub(super) guard: super::guard::Guard,
}

impl Qcow2Io {
    pub(super) fn cache(&self) -> std::sync::MutexGuard<'_, L2Cache> {
        self.cache.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn snapshots(&self) -> std::sync::MutexGuard<'_, super::snapshots::SnapTable> {
        self.snapshots
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Maps guest offset `off` with what is cached.
    pub(super) fn lookup(&self, off: u64) -> Lookup {
        let geo = &self.geo;
        let pos = geo.guest_position(off);
        let to_cluster_end = geo.cluster_size() - pos.offset_in_cluster;
        let Some(raw) = self
            .l1
            .get(pos.l1_index as usize)
            .map(|e| e.load(Ordering::Acquire))
        else {
            return Lookup::Found(Map::Unallocated, to_cluster_end);
        };
        let l1 = match L1Entry::decode(raw, geo) {
            Ok(e) => e,
            Err(FormatError::TableEntryUnaligned(o)) => {
                return Lookup::Bad(format!(
                    "L2 table offset {} unaligned (L1 index: {})",
                    c_hex(o),
                    c_hex(pos.l1_index)
                ))
            }
            Err(e) => return Lookup::Bad(format!("L1 entry {}: {e}", pos.l1_index)),
        };
        if l1.l2_offset == 0 {
            return Lookup::Found(Map::Unallocated, to_cluster_end);
        }
        let oic = pos.offset_in_cluster;
        if geo.extended_l2() {
            let i = (pos.l2_index * 2) as usize;
            let Some((word, bitmap)) = self.cache().pair(l1.l2_offset, i) else {
                return Lookup::NeedTable(l1.l2_offset);
            };
            let entry = match ExtendedL2Entry::decode(word, bitmap, geo) {
                Ok(e) => e,
                Err(e) => return Lookup::Bad(format!("L2 entry at {off}: {e}")),
            };
            let sub = geo.subcluster_size();
            let to_sub_end = sub - oic % sub;
            return match entry.subcluster(geo.subcluster_index(oic), geo) {
                Ok(Subcluster::Data { host_offset }) => {
                    Lookup::Found(Map::Data(host_offset + oic % sub), to_sub_end)
                }
                Ok(Subcluster::Zero) => Lookup::Found(Map::Zero, to_sub_end),
                Ok(Subcluster::Unallocated) => Lookup::Found(Map::Unallocated, to_sub_end),
                Ok(Subcluster::Compressed(c)) => Lookup::Found(Map::Compressed(c), to_cluster_end),
                Err(e) => Lookup::Bad(format!("L2 entry at {off}: {e}")),
            };
        }
        let Some(word) = self.cache().word(l1.l2_offset, pos.l2_index as usize) else {
            return Lookup::NeedTable(l1.l2_offset);
        };
        match L2Entry::decode(word, geo) {
            Ok(L2Entry::Normal {
                host_offset,
                copied: true,
            }) => Lookup::Found(Map::Data(host_offset + oic), to_cluster_end),
            Ok(L2Entry::Normal { host_offset, .. }) => {
                Lookup::Found(Map::Shared(host_offset + oic), to_cluster_end)
            }
            Ok(L2Entry::Zero { .. }) => Lookup::Found(Map::Zero, to_cluster_end),
            Ok(L2Entry::Unallocated) => Lookup::Found(Map::Unallocated, to_cluster_end),
            Ok(L2Entry::Compressed(c)) => Lookup::Found(Map::Compressed(c), to_cluster_end),
            Err(FormatError::ClusterOffsetUnaligned(o)) => Lookup::Bad(format!(
                "Cluster allocation offset {} unaligned (L2 offset: {}, L2 index: {})",
                c_hex(o),
                c_hex(l1.l2_offset),
                c_hex(pos.l2_index)
            )),
            Err(e) => Lookup::Bad(format!("L2 entry at {off}: {e}")),
        }
    }

    /// The backing node and its length (0 when there is none).
    pub(super) fn backing_len(&self) -> Option<(&dyn BlockIo, u64)> {
        let b = self.backing.get();
        match b.length().unwrap_or(0) {
            0 => None,
            len => Some((b, len)),
        }
    }

    /// Tries the direct way for a read; false when it needs a task.
    fn read_direct(&self, ctx: &mut IoContext, req: &IoRequest) -> bool {
        let Lookup::Found(map, len) = self.lookup(req.offset()) else {
            return false;
        };
        if req.len() > len {
            return false;
        }
        match map {
            Map::Data(host) | Map::Shared(host) => self.file.get().submit(ctx, &req.at(host)),
            Map::Zero => {
                req.zero_buffers();
                ctx.complete_now(req.tag(), req.len() as i32);
            }
            Map::Unallocated => match self.backing_len() {
                Some((b, blen)) if req.offset() + req.len() <= blen => b.submit(ctx, req),
                Some((_, blen)) if req.offset() < blen => return false,
                _ => {
                    req.zero_buffers();
                    ctx.complete_now(req.tag(), req.len() as i32);
                }
            },
            Map::Compressed(_) => return false,
        }
        true
    }

    /// Tries the direct way for a write: a cluster of this image's own
    /// whose table is cached; false when it needs a task.
    fn write_direct(&self, ctx: &mut IoContext, req: &IoRequest) -> bool {
        match self.lookup(req.offset()) {
            Lookup::Found(Map::Data(host), len)
                if req.len() <= len && self.guard.data_clear(host, req.len()) =>
            {
                self.file.get().submit(ctx, &req.at(host));
                true
            }
            _ => false,
        }
    }

    /// Reports damage found in the image (fatal on a writable node).
    pub(super) fn corrupt(&self, what: &str) -> i32 {
        self.guard.signal(true, what, None);
        -libc::EIO
    }
}

impl super::cleaner::Clean for Qcow2Io {
    fn clean(&self) {
        let n = self.cache().clean_unused();
        if n > 0 {
            log::debug!("qcow2 node '{}': {n} idle L2 tables dropped", self.name);
        }
    }
}

/// A number in hex as C's `%#x` writes it (QEMU's messages): zero has no
/// prefix.
fn c_hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

/// Reads the L2 table at `offset` into the cache.
pub(super) async fn load_table(io: &Qcow2Io, offset: u64) -> Result<(), i32> {
    let before = io.meta_writes.load(Ordering::Acquire);
    let size = io.geo.cluster_size() as usize;
    // A table past the end of the file would read as zeroes (the file
    // node fills short reads): that is a damaged L1 entry, not an empty
    // table.
    let file_len = io.file.get().length().unwrap_or(u64::MAX);
    if offset.saturating_add(size as u64) > file_len {
        return Err(io.corrupt(&format!(
            "L2 table at {offset} is past the end of the file ({file_len} bytes)"
        )));
    }
    // Aligned as the file needs (an O_DIRECT file takes nothing else).
    let mut buf = super::alloc::meta_buf(io, size)?;
    io.file
        .get()
        .debug_event(crate::qapi::BlkdebugEvent::L2Load);
    super::alloc::read_file(io, offset, &mut buf).await?;
    let words: super::cache::Words = super::words::be_words(buf.as_slice())
        .map(AtomicU64::new)
        .collect();
    // A table written while it was being read may have been read half
    // old: read it again.
    if io.meta_writes.load(Ordering::Acquire) != before {
        return Box::pin(load_table(io, offset)).await;
    }
    io.cache().insert(offset, words);
    Ok(())
}

/// Reads one compressed cluster into `out` (one cluster long).
pub(super) async fn read_compressed(
    io: &Qcow2Io,
    c: CompressedCluster,
    out: &mut [u8],
) -> Result<(), i32> {
    let len = c.compressed_len() as usize;
    let mut input = vec![0u8; len];
    let iovs = [libc::iovec {
        iov_base: input.as_mut_ptr().cast(),
        iov_len: len,
    }];
    // SAFETY: `input` and `iovs` live in this future until the read is
    // awaited below.
    let req =
        unsafe { IoRequest::new(IoKind::Read, c.host_offset, len as u64, iovs.as_ptr(), 1, 0) };
    let r = task::submit(io.file.get(), &req).await;
    if r < 0 {
        return Err(r);
    }
    // The last sector may run past the end of the file.
    input.truncate(r as usize);
    decompress(io.compression, &input, out).map_err(|e| {
        io.corrupt(&format!(
            "compressed cluster at {} does not decompress: {e}",
            c.host_offset
        ))
    })
}

/// Reads the whole request, piece by piece.
async fn read_task(io: Arc<Qcow2Io>, req: IoRequest) -> i32 {
    let mut done = 0u64;
    let mut cluster: Option<(u64, Vec<u8>)> = None;
    while done < req.len() {
        let off = req.offset() + done;
        let (map, avail) = match io.lookup(off) {
            Lookup::Found(m, n) => (m, n),
            Lookup::NeedTable(t) => {
                if let Err(e) = load_table(&io, t).await {
                    return e;
                }
                continue;
            }
            Lookup::Bad(what) => return io.corrupt(&what),
        };
        let n = avail.min(req.len() - done);
        let part = iov::slice(&req, done, n);
        match map {
            Map::Data(host) | Map::Shared(host) => {
                // SAFETY: `part` points into the request's buffers, valid
                // until the request completes, which is after this await.
                let r = task::submit(io.file.get(), &unsafe {
                    req.part(host, n, part.as_ptr(), part.len() as u32)
                })
                .await;
                if r < 0 {
                    return r;
                }
            }
            Map::Zero => iov::zero(&part),
            Map::Unallocated => {
                let Some((b, blen)) = io.backing_len() else {
                    iov::zero(&part);
                    done += n;
                    continue;
                };
                let from_backing = blen.saturating_sub(off).min(n);
                if from_backing > 0 {
                    let head = iov::slice(&req, done, from_backing);
                    // SAFETY: as for the data case.
                    let r = task::submit(b, &unsafe {
                        req.part(off, from_backing, head.as_ptr(), head.len() as u32)
                    })
                    .await;
                    if r < 0 {
                        return r;
                    }
                }
                if from_backing < n {
                    iov::zero(&iov::slice(&req, done + from_backing, n - from_backing));
                }
            }
            Map::Compressed(c) => {
                let start = off - io.geo.offset_in_cluster(off);
                let cached = matches!(&cluster, Some((s, _)) if *s == start);
                if !cached {
                    let mut buf = vec![0u8; io.geo.cluster_size() as usize];
                    if let Err(e) = read_compressed(&io, c, &mut buf).await {
                        return e;
                    }
                    cluster = Some((start, buf));
                }
                if let Some((_, buf)) = &cluster {
                    let at = io.geo.offset_in_cluster(off) as usize;
                    iov::fill(&part, &buf[at..at + n as usize]);
                }
            }
        }
        done += n;
    }
    i32::try_from(req.len()).unwrap_or(i32::MAX)
}

impl Qcow2Io {
    fn spawn_write(&self, ctx: &mut IoContext, req: &IoRequest) {
        match self.me.upgrade() {
            Some(me) => ctx.spawn(
                req.tag(),
                super::guard::marking(me.clone(), super::write::write_task(me, *req)),
            ),
            None => ctx.complete_now(req.tag(), -libc::EIO),
        }
    }
}

impl BlockIo for Qcow2Io {
    fn length(&self) -> Result<u64, BlockError> {
        Ok(self.size.load(Ordering::Relaxed))
    }

    fn allocated_size(&self) -> Option<u64> {
        self.file.get().allocated_size()
    }

    fn truncate(&self, size: u64) -> Result<(), BlockError> {
        super::resize::grow(self, size)
    }

    fn mem_alignment(&self) -> usize {
        self.file.get().mem_alignment()
    }

    fn preferred_alignment(&self) -> u32 {
        self.file.get().preferred_alignment()
    }

    fn flush(&self) -> Result<(), BlockError> {
        let file = self.file.get();
        file.debug_event(crate::qapi::BlkdebugEvent::FlushToDisk);
        file.flush()
    }

    fn submit(&self, ctx: &mut IoContext, req: &IoRequest) {
        // The events QEMU's qcow2 raises on its file for guest requests
        // (a blkdebug file node acts on them).
        match req.kind() {
            IoKind::Read => self
                .file
                .get()
                .debug_event(crate::qapi::BlkdebugEvent::ReadAio),
            IoKind::Write => self
                .file
                .get()
                .debug_event(crate::qapi::BlkdebugEvent::WriteAio),
            IoKind::Flush => self
                .file
                .get()
                .debug_event(crate::qapi::BlkdebugEvent::FlushToDisk),
            _ => {}
        }
        let size = self.size.load(Ordering::Relaxed);
        if req
            .offset()
            .checked_add(req.len())
            .is_none_or(|end| end > size)
        {
            ctx.complete_now(req.tag(), -libc::EIO);
            return;
        }
        match req.kind() {
            IoKind::Read => {
                if req.is_empty() {
                    ctx.complete_now(req.tag(), 0);
                } else if !self.read_direct(ctx, req) {
                    match self.me.upgrade() {
                        Some(me) => ctx.spawn(
                            req.tag(),
                            super::guard::marking(me.clone(), read_task(me, *req)),
                        ),
                        None => ctx.complete_now(req.tag(), -libc::EIO),
                    }
                }
            }
            IoKind::Flush => self.file.get().submit(ctx, req),
            _ if self.alloc.is_none() => ctx.complete_now(req.tag(), -libc::EROFS),
            _ if self.guard.is_broken() => ctx.complete_now(req.tag(), -libc::EIO),
            IoKind::Write => {
                if req.is_empty() {
                    ctx.complete_now(req.tag(), 0);
                } else if !self.write_direct(ctx, req) {
                    self.spawn_write(ctx, req);
                }
            }
            IoKind::WriteZeroes { .. } => self.spawn_write(ctx, req),
            IoKind::Discard if !self.discard_unmap => ctx.complete_now(req.tag(), 0),
            IoKind::Discard => match self.me.upgrade() {
                Some(me) => ctx.spawn(
                    req.tag(),
                    super::guard::marking(me.clone(), super::write::discard_task(me, *req)),
                ),
                None => ctx.complete_now(req.tag(), -libc::EIO),
            },
        }
    }
}
