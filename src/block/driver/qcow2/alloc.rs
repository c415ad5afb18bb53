//! Cluster allocation and the refcounts behind it, in an order that
//! survives a crash at any point.
//!
//! New clusters are taken from the end of the file. They are reserved in
//! batches: the refcounts of a batch are set to 1 in their refcount
//! blocks, the blocks written and the file flushed before any cluster of
//! the batch is handed out, so no table can ever point at a cluster whose
//! refcount on disk is 0 (the one kind of damage `qemu-img check` calls
//! corruption). A crash leaves at most the unused rest of a batch counted
//! but unreferenced: a leak, which is harmless. A batch is 1 MiB of
//! clusters at first; while batches run out quickly (a fresh image taking
//! writes all over) each one doubles, up to 256 MiB, so the flush a batch
//! costs stays rare (16 clusters of 64 KiB per flush made random 4 KiB
//! writes to a fresh image ten times slower than qemu-storage-daemon's).
//! A clean close gives the unused rest back. A refcount block that
//! does not exist yet is placed in the first cluster it must count, counts
//! itself, and is written and flushed before the refcount table points at
//! it.
//!
//! Refcounts of clusters already in use change through
//! [`adjust_refcounts`] (copy-on-write of shared clusters, internal
//! snapshots, overwritten or discarded compressed clusters). Freed
//! clusters are not reused yet.

use super::io::Qcow2Io;
use super::words::put_table_words;
use crate::block::io::{IoKind, IoRequest};
use crate::block::qcow2::format::{get_refcount, set_refcount, REFTABLE_OFFSET_MASK};
use crate::io::aligned::AlignedBuf;
use crate::io::task::{self, locks::RangeLocks};
use std::collections::{HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The range of `meta_locks` that the one reserving thread holds.
const RESERVING: u64 = u64::MAX - 1;
/// Bytes of clusters reserved at a time at first (at least one cluster).
const BATCH_BYTES: u64 = 1 << 20;
/// The most bytes of clusters a batch grows to.
const BATCH_MAX_BYTES: u64 = 256 << 20;
/// A batch used up within this long makes the next one twice as large.
const BATCH_QUICK: std::time::Duration = std::time::Duration::from_millis(500);

pub struct Allocator {
    state: Mutex<State>,
    /// Guest clusters being allocated, by guest offset.
    pub(super) guest_locks: RangeLocks,
    /// Metadata being rewritten, by file offset (units of `unit`).
    pub(super) meta_locks: RangeLocks,
    /// The smallest write to metadata: 512 bytes, or the file's alignment.
    pub(super) unit: u64,
    pub(super) l1_table_offset: u64,
    refcount_order: u32,
}

struct State {
    free: VecDeque<u64>,
    next_host: u64,
    /// Clusters the next batch reserves, and when the last one was.
    batch: usize,
    last_batch: Option<std::time::Instant>,
    reftable: Vec<u64>,
    reftable_offset: u64,
    blocks: HashMap<u64, Vec<u8>>,
}

/// What a reservation pass found missing.
enum Pass {
    Done {
        clusters: Vec<u64>,
        blocks: Vec<u64>,
        table_entries: Vec<usize>,
    },
    /// The refcount block at this offset must be read first.
    Load(u64),
    Full,
}

impl Allocator {
    pub fn new(
        reftable: Vec<u64>,
        reftable_offset: u64,
        file_len: u64,
        cluster_size: u64,
        unit: u64,
        l1_table_offset: u64,
        refcount_order: u32,
    ) -> Self {
        Allocator {
            state: Mutex::new(State {
                free: VecDeque::new(),
                next_host: file_len.div_ceil(cluster_size) * cluster_size,
                batch: 0,
                last_batch: None,
                reftable,
                reftable_offset,
                blocks: HashMap::new(),
            }),
            guest_locks: RangeLocks::default(),
            meta_locks: RangeLocks::default(),
            unit: unit.max(512),
            l1_table_offset,
            refcount_order,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A buffer for metadata I/O, aligned as the file needs.
pub(super) fn meta_buf(io: &Qcow2Io, len: usize) -> Result<AlignedBuf, i32> {
    let align = io.file.get().mem_alignment().max(512);
    AlignedBuf::new(len, align).ok_or(-libc::ENOMEM)
}

/// Writes `buf` to the file at `offset` and waits for it.
pub(super) async fn write_file(io: &Qcow2Io, offset: u64, buf: &mut AlignedBuf) -> Result<(), i32> {
    let len = buf.len();
    io.guard.check_meta(offset, len as u64)?;
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    // SAFETY: `buf` and `iov` outlive the awaited write.
    let req = unsafe { IoRequest::new(IoKind::Write, offset, len as u64, iov.as_ptr(), 1, 0) };
    match task::submit(io.file.get(), &req).await {
        r if r < 0 => Err(r),
        r if r as usize != len && r != 0 => Err(-libc::EIO),
        _ => Ok(()),
    }
}

/// Reads `buf.len()` bytes of the file at `offset` and waits.
pub(super) async fn read_file(io: &Qcow2Io, offset: u64, buf: &mut AlignedBuf) -> Result<(), i32> {
    let len = buf.len();
    let iov = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: len,
    }];
    // SAFETY: `buf` and `iov` outlive the awaited read.
    let req = unsafe { IoRequest::new(IoKind::Read, offset, len as u64, iov.as_ptr(), 1, 0) };
    let r = task::submit(io.file.get(), &req).await;
    if r < 0 {
        return Err(r);
    }
    // Past the end of the file reads as zeroes.
    if let Some(tail) = buf.as_mut_slice().get_mut(r as usize..) {
        tail.fill(0);
    }
    Ok(())
}

/// Makes everything written so far stable.
pub(super) async fn flush_file(io: &Qcow2Io) -> Result<(), i32> {
    let r = task::submit(
        io.file.get(),
        &IoRequest::without_data(IoKind::Flush, 0, 0, 0),
    )
    .await;
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

/// A new cluster, its refcount already 1 on disk.
pub(super) async fn take_cluster(io: &Qcow2Io, a: &Allocator) -> Result<u64, i32> {
    io.file
        .get()
        .debug_event(crate::qapi::BlkdebugEvent::ClusterAlloc);
    loop {
        let (got, low) = {
            let mut st = a.state();
            let got = st.free.pop_front();
            (got, st.free.len() < st.batch / 2)
        };
        if let Some(c) = got {
            // Half the batch gone: this request reserves the next one
            // (and waits for its flush) while the others go on taking
            // what is left, so no allocation waits for a flush.
            if low {
                if let Some(_reserving) = a.meta_locks.try_lock(RESERVING, RESERVING + 1) {
                    if let Err(e) = reserve(io, a).await {
                        log::warn!(
                            "qcow2 node '{}': reserving clusters ahead: {}",
                            io.name,
                            std::io::Error::from_raw_os_error(-e)
                        );
                    }
                }
            }
            return Ok(c);
        }
        let _reserving = a.meta_locks.lock(RESERVING, RESERVING + 1).await?;
        if !a.state().free.is_empty() {
            continue;
        }
        reserve(io, a).await?;
    }
}

/// Counts one reference less to the cluster at `host` (a reference just
/// dropped from the tables, and flushed so); the count left.
pub(super) async fn release_cluster(io: &Qcow2Io, a: &Allocator, host: u64) -> Result<u64, i32> {
    let counts = adjust_refcounts(io, a, &[(host, -1)]).await?;
    Ok(counts.first().map_or(0, |&(_, c)| c))
}

/// Adds `delta` to the refcount of each cluster listed (a cluster may be
/// listed more than once), writes every refcount block that changed once,
/// and gives each cluster's new count. Nothing is flushed: the caller
/// orders the flushes around the tables that the counts are for.
pub(super) async fn adjust_refcounts(
    io: &Qcow2Io,
    a: &Allocator,
    changes: &[(u64, i64)],
) -> Result<Vec<(u64, u64)>, i32> {
    let mut dirty = Vec::new();
    let counts = stage_refcounts(io, a, changes, &mut dirty).await?;
    write_refcount_blocks(io, a, &dirty).await?;
    Ok(counts)
}

/// Writes the refcount blocks at these offsets as they are in memory.
pub(super) async fn write_refcount_blocks(
    io: &Qcow2Io,
    a: &Allocator,
    blocks: &[u64],
) -> Result<(), i32> {
    let cs = io.geo.cluster_size();
    // Held while writing: two writers of one block must not land out of
    // order.
    let _reserving = a.meta_locks.lock(RESERVING, RESERVING + 1).await?;
    for &block in blocks {
        let mut buf = meta_buf(io, cs as usize)?;
        match a.state().blocks.get(&block) {
            Some(b) => buf.as_mut_slice().copy_from_slice(b),
            None => return Err(-libc::EIO),
        }
        write_file(io, block, &mut buf).await?;
    }
    Ok(())
}

/// [`adjust_refcounts`] in memory only: the blocks it changed are added
/// to `dirty`, for [`write_refcount_blocks`] later (a snapshot change
/// computes everything first, so that what it writes is written close
/// together).
pub(super) async fn stage_refcounts(
    io: &Qcow2Io,
    a: &Allocator,
    changes: &[(u64, i64)],
    dirty: &mut Vec<u64>,
) -> Result<Vec<(u64, u64)>, i32> {
    let cs = io.geo.cluster_size();
    let _reserving = a.meta_locks.lock(RESERVING, RESERVING + 1).await?;
    let mut located = Vec::with_capacity(changes.len());
    for &(host, delta) in changes {
        let pos = io.geo.refcount_position(host);
        let block = a
            .state()
            .reftable
            .get(pos.table_index as usize)
            .map_or(0, |e| e & REFTABLE_OFFSET_MASK);
        if block == 0 {
            return Err(io.corrupt(&format!("cluster {host} has no refcount block")));
        }
        if !a.state().blocks.contains_key(&block) {
            let mut buf = meta_buf(io, cs as usize)?;
            read_file(io, block, &mut buf).await?;
            a.state()
                .blocks
                .entry(block)
                .or_insert_with(|| buf.as_slice().to_vec());
        }
        located.push((host, delta, block, pos.block_index));
    }
    let mut counts = Vec::with_capacity(changes.len());
    {
        let mut st = a.state();
        for &(host, delta, block, index) in &located {
            let Some(b) = st.blocks.get_mut(&block) else {
                return Err(-libc::EIO);
            };
            let count = get_refcount(b, a.refcount_order, index)
                .map_err(|e| io.corrupt(&format!("refcount of {host}: {e}")))?;
            let Some(new) = count.checked_add_signed(delta) else {
                return Err(io.corrupt(&format!(
                    "refcount of {host} would go below 0 (it is {count})"
                )));
            };
            if set_refcount(b, a.refcount_order, index, new).is_err() {
                log::error!(
                    "qcow2 node '{}': the refcount of {host} would overflow",
                    io.name
                );
                return Err(-libc::EOVERFLOW);
            }
            counts.push((host, new));
            if delta != 0 && !dirty.contains(&block) {
                dirty.push(block);
            }
        }
    }
    Ok(counts)
}

/// Gives back the clusters reserved but not handed out (at close): their
/// refcounts return to 0, so a clean close leaves no leak, even once the
/// file grows past them.
pub(super) async fn return_unused(io: &Qcow2Io, a: &Allocator) -> Result<(), i32> {
    let unused: Vec<(u64, i64)> = a.state().free.drain(..).map(|c| (c, -1)).collect();
    if unused.is_empty() {
        return Ok(());
    }
    adjust_refcounts(io, a, &unused).await?;
    flush_file(io).await
}

/// `n` clusters in a row, each counted 1 on disk (for a table that must be
/// contiguous). Clusters taken on the way that do not fit the run go back
/// to the free list.
pub(super) async fn take_run(io: &Qcow2Io, a: &Allocator, n: u64) -> Result<u64, i32> {
    let cs = io.geo.cluster_size();
    let mut run: Vec<u64> = Vec::new();
    let mut spare: Vec<u64> = Vec::new();
    while (run.len() as u64) < n {
        let c = match take_cluster(io, a).await {
            Ok(c) => c,
            Err(e) => {
                a.state().free.extend(run.into_iter().chain(spare));
                return Err(e);
            }
        };
        if run.last().is_some_and(|&l| l + cs != c) {
            spare.append(&mut run);
        }
        run.push(c);
    }
    let mut st = a.state();
    for c in spare.into_iter().rev() {
        st.free.push_front(c);
    }
    Ok(run.first().copied().unwrap_or(0))
}

/// Reserves the next batch of clusters at the end of the file.
async fn reserve(io: &Qcow2Io, a: &Allocator) -> Result<(), i32> {
    let cs = io.geo.cluster_size();
    let want = {
        let base = (BATCH_BYTES / cs).clamp(1, 64) as usize;
        let most = (BATCH_MAX_BYTES / cs).clamp(1, 16384) as usize;
        let mut st = a.state();
        let now = std::time::Instant::now();
        let quick = st
            .last_batch
            .is_some_and(|t| now.duration_since(t) < BATCH_QUICK);
        st.batch = if quick {
            (st.batch * 2).clamp(base, most)
        } else {
            base
        };
        st.last_batch = Some(now);
        st.batch
    };
    let (clusters, blocks, table_entries) = loop {
        match plan(io, a, want) {
            Pass::Done {
                clusters,
                blocks,
                table_entries,
            } => break (clusters, blocks, table_entries),
            Pass::Load(off) => {
                let mut buf = meta_buf(io, cs as usize)?;
                read_file(io, off, &mut buf).await?;
                a.state().blocks.insert(off, buf.as_slice().to_vec());
            }
            Pass::Full => {
                log::error!(
                    "qcow2 node '{}': the refcount table is full (growing it is not supported yet)",
                    io.name
                );
                return Err(-libc::ENOSPC);
            }
        }
    };
    // The blocks first, then a flush: only then may anything point at the
    // new clusters, or at a new block.
    for off in &blocks {
        let mut buf = meta_buf(io, cs as usize)?;
        if let Some(b) = a.state().blocks.get(off) {
            buf.as_mut_slice().copy_from_slice(b);
        }
        write_file(io, *off, &mut buf).await?;
    }
    flush_file(io).await?;
    if !table_entries.is_empty() {
        let mut units: Vec<u64> = table_entries.iter().map(|&t| reftable_unit(a, t)).collect();
        units.dedup();
        for u in units {
            let mut buf = meta_buf(io, a.unit as usize)?;
            {
                let st = a.state();
                put_table_words(buf.as_mut_slice(), u, st.reftable_offset, |i| {
                    st.reftable.get(i).copied().unwrap_or(0)
                });
            }
            write_file(io, u, &mut buf).await?;
        }
        flush_file(io).await?;
    }
    a.state().free.extend(clusters);
    Ok(())
}

/// The metadata unit of the refcount table holding entry `t`.
fn reftable_unit(a: &Allocator, t: usize) -> u64 {
    let st = a.state();
    let at = st.reftable_offset + t as u64 * 8;
    at / a.unit * a.unit
}

/// Sets the refcounts of up to `want` clusters from the end of the file
/// in memory; says which blocks and table entries changed.
fn plan(io: &Qcow2Io, a: &Allocator, want: usize) -> Pass {
    let cs = io.geo.cluster_size();
    let mut st = a.state();
    // Work on a copy of the cursor: a pass that must load a block starts
    // over, and a pass that completes commits it.
    let mut next = st.next_host;
    let mut clusters = Vec::new();
    let mut blocks = Vec::new();
    let mut table_entries = Vec::new();
    let mut changes: Vec<(u64, u64)> = Vec::new();
    let mut new_blocks: Vec<(usize, u64)> = Vec::new();
    while clusters.len() < want {
        let pos = io.geo.refcount_position(next);
        let t = pos.table_index as usize;
        if t >= st.reftable.len() {
            return Pass::Full;
        }
        let planned_block = new_blocks.iter().find(|(nt, _)| *nt == t).map(|(_, b)| *b);
        let block = match planned_block {
            Some(b) => b,
            None => st.reftable[t] & REFTABLE_OFFSET_MASK,
        };
        if block == 0 {
            // A new block in this very cluster, counting itself.
            new_blocks.push((t, next));
            changes.push((next, pos.block_index));
            blocks.push(next);
            table_entries.push(t);
            next += cs;
            continue;
        }
        if planned_block.is_none() && !st.blocks.contains_key(&block) {
            return Pass::Load(block);
        }
        let in_use = planned_block.is_none()
            && st
                .blocks
                .get(&block)
                .map(|b| get_refcount(b, a.refcount_order, pos.block_index).unwrap_or(1))
                .unwrap_or(1)
                != 0;
        if !in_use {
            changes.push((block, pos.block_index));
            if !blocks.contains(&block) {
                blocks.push(block);
            }
            clusters.push(next);
        }
        next += cs;
    }
    for &(t, b) in &new_blocks {
        st.reftable[t] = b;
        io.guard.register(b, cs, super::guard::REFCOUNT_BLOCK);
        st.blocks.insert(b, vec![0u8; cs as usize]);
    }
    for (block, index) in changes {
        if let Some(b) = st.blocks.get_mut(&block) {
            if set_refcount(b, a.refcount_order, index, 1).is_err() {
                log::error!(
                    "qcow2 node '{}': refcount index {index} out of range",
                    io.name
                );
            }
        }
    }
    st.next_host = next;
    Pass::Done {
        clusters,
        blocks,
        table_entries,
    }
}
