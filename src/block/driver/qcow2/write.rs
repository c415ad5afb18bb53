//! Writing: in place where the cluster is this image's own, otherwise by
//! allocating a cluster, copying in what the write does not cover (from
//! the old cluster, the backing node or zeroes), and then pointing the L2
//! entry at it.
//!
//! The order is what keeps a crash harmless: the cluster's refcount is on
//! disk before it is handed out ([`super::alloc`]); the data is written
//! before the L2 entry; the entry is changed in memory only once the image
//! has it, so no later request can complete, and be flushed, on the
//! strength of an entry the image does not yet hold. An L2 table is
//! written and flushed before the L1 entry points at it. Requests to the
//! same cluster wait for its allocation (a range lock per guest cluster);
//! allocations of different clusters run at once.

use super::alloc::{
    adjust_refcounts, flush_file, meta_buf, read_file, release_cluster, take_cluster, write_file,
    Allocator,
};
use super::io::{load_table, Lookup, Map, Qcow2Io};
use super::iov;
use super::words::put_table_words;
use crate::block::io::{IoKind, IoRequest};
use crate::block::qcow2::format::{L1Entry, L2Entry};
use crate::io::task;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The mapping of `off`, reading its table if needed.
async fn resolve(io: &Qcow2Io, off: u64) -> Result<(Map, u64), i32> {
    loop {
        match io.lookup(off) {
            Lookup::Found(m, n) => return Ok((m, n)),
            Lookup::NeedTable(t) => load_table(io, t).await?,
            Lookup::Bad(what) => return Err(io.corrupt(&what)),
        }
    }
}

/// Writes the whole request (write or write-zeroes), cluster by cluster.
pub(super) async fn write_task(io: Arc<Qcow2Io>, req: IoRequest) -> i32 {
    let Some(a) = io.alloc.as_ref() else {
        return -libc::EROFS;
    };
    let zeroes = matches!(req.kind(), IoKind::WriteZeroes { .. });
    let cs = io.geo.cluster_size();
    let mut done = 0u64;
    while done < req.len() {
        let off = req.offset() + done;
        let n = (cs - io.geo.offset_in_cluster(off)).min(req.len() - done);
        // Zeroes for a write-zeroes piece, or the request's own buffers.
        let mut zero_buf = None;
        let part = if zeroes {
            let Ok(b) = meta_buf(&io, n as usize) else {
                return -libc::ENOMEM;
            };
            let b = zero_buf.insert(b);
            b.as_mut_slice().fill(0);
            vec![libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: n as usize,
            }]
        } else {
            iov::slice(&req, done, n)
        };
        let whole = n == cs;
        let r = if zeroes && whole && io.version >= 3 {
            zero_cluster(&io, a, off).await
        } else {
            write_piece(&io, a, &req, off, &part).await
        };
        drop(zero_buf);
        if let Err(e) = r {
            return e;
        }
        done += n;
    }
    if zeroes {
        0
    } else {
        i32::try_from(req.len()).unwrap_or(i32::MAX)
    }
}

/// Writes `part` (the request's buffers for `[off, off + len)`, within
/// one cluster).
async fn write_piece(
    io: &Qcow2Io,
    a: &Allocator,
    req: &IoRequest,
    off: u64,
    part: &[libc::iovec],
) -> Result<(), i32> {
    let len = part.iter().map(|v| v.iov_len as u64).sum::<u64>();
    let cs = io.geo.cluster_size();
    let cstart = off - io.geo.offset_in_cluster(off);
    if let (Map::Data(host), _) = resolve(io, off).await? {
        return write_at(io, req, host, len, part).await;
    }
    let _cluster = a.guest_locks.lock(cstart, cstart + cs).await?;
    // Another request may have allocated it while this one waited.
    let (map, _) = resolve(io, cstart).await?;
    if let Map::Data(host) = map {
        return write_at(io, req, host + (off - cstart), len, part).await;
    }
    let l2 = ensure_l2(io, a, off).await?;
    let host = take_cluster(io, a).await?;
    let head = off - cstart;
    // A cluster taken from the allocator has never been written (they
    // come from the end of the file and are not reused), so it reads as
    // zeroes already. When that is also what the guest would see around
    // its write (no backing, or a zero cluster), only the guest's bytes
    // are written: no 60 KiB of zeroes copied per 4 KiB write. O_DIRECT
    // files keep the whole-cluster write (its alignment).
    let old_is_zero = match map {
        Map::Zero => true,
        Map::Unallocated => io.backing_len().is_none(),
        _ => false,
    };
    if old_is_zero && io.file.get().mem_alignment() <= 1 {
        io.guard.check_data(host, cs)?;
        // SAFETY: `part` points into the request's buffers, alive until
        // the awaited write completes.
        let only = unsafe { req.part(host + head, len, part.as_ptr(), part.len() as u32) }
            .with_kind(IoKind::Write);
        let r = task::submit(io.file.get(), &only).await;
        if r < 0 {
            return Err(r);
        }
        return map_new_cluster(io, a, l2, off, host, map).await;
    }
    // The new cluster: old content around the write, the write between.
    let tail = cs - head - len;
    let mut head_buf = meta_buf(io, head as usize)?;
    let mut tail_buf = meta_buf(io, tail as usize)?;
    if head > 0 {
        read_old(io, map, cstart, head_buf.as_mut_slice()).await?;
    }
    if tail > 0 {
        read_old(io, map, off + len, tail_buf.as_mut_slice()).await?;
    }
    let mut vecs = Vec::with_capacity(part.len() + 2);
    if head > 0 {
        vecs.push(libc::iovec {
            iov_base: head_buf.as_mut_ptr().cast(),
            iov_len: head as usize,
        });
    }
    vecs.extend_from_slice(part);
    if tail > 0 {
        vecs.push(libc::iovec {
            iov_base: tail_buf.as_mut_ptr().cast(),
            iov_len: tail as usize,
        });
    }
    io.guard.check_data(host, cs)?;
    // SAFETY: the iovecs point at `head_buf`, `tail_buf` and the request's
    // buffers, all alive until the awaited write completes.
    let whole =
        unsafe { req.part(host, cs, vecs.as_ptr(), vecs.len() as u32) }.with_kind(IoKind::Write);
    let r = task::submit(io.file.get(), &whole).await;
    if r < 0 {
        return Err(r);
    }
    map_new_cluster(io, a, l2, off, host, map).await
}

/// Points the L2 entry of `off` at the new cluster `host`, written, and
/// lets go of what the entry held before (`old`).
async fn map_new_cluster(
    io: &Qcow2Io,
    a: &Allocator,
    l2: u64,
    off: u64,
    host: u64,
    old: Map,
) -> Result<(), i32> {
    let entry = L2Entry::Normal {
        host_offset: host,
        copied: true,
    };
    let raw = entry
        .encode(&io.geo)
        .map_err(|e| io.corrupt(&format!("new L2 entry: {e}")))?;
    set_l2_entry(io, a, l2, off, raw).await?;
    drop_shared(io, a, old).await
}

/// After an L2 entry stopped pointing at a cluster shared with a snapshot
/// (`old`, the entry's previous mapping): the entry is made stable first,
/// then the cluster counts one reference less. A crash in between leaves
/// the reference counted: a leak.
async fn drop_shared(io: &Qcow2Io, a: &Allocator, old: Map) -> Result<(), i32> {
    let held = held_clusters(io, old);
    if held.is_empty() {
        return Ok(());
    }
    flush_file(io).await?;
    let less: Vec<(u64, i64)> = held.into_iter().map(|c| (c, -1)).collect();
    adjust_refcounts(io, a, &less).await?;
    Ok(())
}

/// The host clusters a mapping holds a reference to: its cluster, or each
/// cluster its compressed data touches.
fn held_clusters(io: &Qcow2Io, map: Map) -> Vec<u64> {
    let cs = io.geo.cluster_size();
    match map {
        Map::Shared(h) | Map::Data(h) => vec![h - io.geo.offset_in_cluster(h)],
        Map::Compressed(c) => {
            let first = c.host_offset / cs * cs;
            let last = (c.host_offset + c.compressed_len() - 1) / cs * cs;
            (0..=(last - first) / cs).map(|i| first + i * cs).collect()
        }
        Map::Zero | Map::Unallocated => Vec::new(),
    }
}

/// Makes a whole cluster read as zeroes through its L2 entry.
async fn zero_cluster(io: &Qcow2Io, a: &Allocator, off: u64) -> Result<(), i32> {
    let cs = io.geo.cluster_size();
    let _cluster = a.guest_locks.lock(off, off + cs).await?;
    let (map, _) = resolve(io, off).await?;
    if map == Map::Zero {
        return Ok(());
    }
    let l2 = ensure_l2(io, a, off).await?;
    let raw = L2Entry::Zero {
        host_offset: None,
        copied: false,
    }
    .encode(&io.geo)
    .map_err(|e| io.corrupt(&format!("new L2 entry: {e}")))?;
    set_l2_entry(io, a, l2, off, raw).await?;
    // The cluster the entry held (this image's own or shared with a
    // snapshot) counts one reference less.
    drop_shared(io, a, map).await
}

/// Writes `part` to the file at `host` (a cluster of this image's own).
async fn write_at(
    io: &Qcow2Io,
    req: &IoRequest,
    host: u64,
    len: u64,
    part: &[libc::iovec],
) -> Result<(), i32> {
    io.guard.check_data(host, len)?;
    // SAFETY: `part` points into buffers alive until the awaited write
    // completes (the request's, or the caller's zeroes).
    let w =
        unsafe { req.part(host, len, part.as_ptr(), part.len() as u32) }.with_kind(IoKind::Write);
    let r = task::submit(io.file.get(), &w).await;
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

/// Reads what the guest saw at `[from, from + buf.len())` before this
/// write, from the cluster's old mapping `map`.
async fn read_old(io: &Qcow2Io, map: Map, from: u64, buf: &mut [u8]) -> Result<(), i32> {
    let iovs = [libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    }];
    let len = buf.len() as u64;
    // SAFETY: `buf` and `iovs` outlive the awaited read below.
    let req = unsafe { IoRequest::new(IoKind::Read, from, len, iovs.as_ptr(), 1, 0) };
    let r = match map {
        Map::Zero => {
            buf.fill(0);
            return Ok(());
        }
        Map::Data(h) | Map::Shared(h) => {
            let cstart = from - io.geo.offset_in_cluster(from);
            let base = h - io.geo.offset_in_cluster(h);
            task::submit(io.file.get(), &req.at(base + (from - cstart))).await
        }
        Map::Unallocated => match io.backing_len() {
            None => {
                buf.fill(0);
                return Ok(());
            }
            Some((b, blen)) => {
                let avail = blen.saturating_sub(from).min(len);
                buf[avail as usize..].fill(0);
                if avail == 0 {
                    return Ok(());
                }
                let head_iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: avail as usize,
                }];
                // SAFETY: `buf` and `head_iov` outlive the awaited read.
                let head =
                    unsafe { IoRequest::new(IoKind::Read, from, avail, head_iov.as_ptr(), 1, 0) };
                task::submit(b, &head).await
            }
        },
        Map::Compressed(c) => {
            let mut cluster = vec![0u8; io.geo.cluster_size() as usize];
            super::io::read_compressed(io, c, &mut cluster).await?;
            let at = io.geo.offset_in_cluster(from) as usize;
            buf.copy_from_slice(&cluster[at..at + buf.len()]);
            return Ok(());
        }
    };
    if r < 0 {
        Err(r)
    } else {
        Ok(())
    }
}

/// The L2 table for guest offset `off`, allocated if there is none.
async fn ensure_l2(io: &Qcow2Io, a: &Allocator, off: u64) -> Result<u64, i32> {
    let idx = io.geo.guest_position(off).l1_index as usize;
    let Some(slot) = io.l1.get(idx) else {
        return Err(io.corrupt(&format!("offset {off} is beyond the L1 table")));
    };
    let decode = |raw| {
        L1Entry::decode(raw, &io.geo).map_err(|e| io.corrupt(&format!("L1 entry {idx}: {e}")))
    };
    let e = decode(slot.load(Ordering::Acquire))?;
    if e.l2_offset != 0 && e.copied {
        return Ok(e.l2_offset);
    }
    let at = a.l1_table_offset + idx as u64 * 8;
    let unit = at / a.unit * a.unit;
    let _l1 = a.meta_locks.lock(unit, unit + a.unit).await?;
    let e = decode(slot.load(Ordering::Acquire))?;
    if e.l2_offset != 0 && e.copied {
        return Ok(e.l2_offset);
    }
    // A new table: empty, or a copy of the one shared with a snapshot
    // (its entries stay as they are: every cluster they name is shared
    // too, and the copy takes over the active image's reference to it).
    let shared = e.l2_offset;
    let cs = io.geo.cluster_size();
    let table = take_cluster(io, a).await?;
    io.guard.register(table, cs, super::guard::ACTIVE_L2);
    let mut content = meta_buf(io, cs as usize)?;
    let file = io.file.get();
    if shared == 0 {
        content.as_mut_slice().fill(0);
    } else {
        file.debug_event(crate::qapi::BlkdebugEvent::L2AllocCowRead);
        read_file(io, shared, &mut content).await?;
    }
    file.debug_event(crate::qapi::BlkdebugEvent::L2AllocWrite);
    write_file(io, table, &mut content).await?;
    flush_file(io).await?;
    let raw = L1Entry {
        l2_offset: table,
        copied: true,
    }
    .encode(&io.geo)
    .map_err(|e| io.corrupt(&format!("new L1 entry: {e}")))?;
    let mut buf = meta_buf(io, a.unit as usize)?;
    put_table_words(buf.as_mut_slice(), unit, a.l1_table_offset, |i| {
        if i == idx {
            raw
        } else {
            io.l1.get(i).map_or(0, |w| w.load(Ordering::Acquire))
        }
    });
    if unit < a.l1_table_offset {
        // The unit starts before the table (a table not aligned to the
        // unit): keep the bytes before it as they are on disk.
        let mut old = meta_buf(io, a.unit as usize)?;
        read_file(io, unit, &mut old).await?;
        let keep = (a.l1_table_offset - unit) as usize;
        buf.as_mut_slice()[..keep].copy_from_slice(&old.as_slice()[..keep]);
    }
    io.file
        .get()
        .debug_event(crate::qapi::BlkdebugEvent::L1Update);
    write_file(io, unit, &mut buf).await?;
    let words: super::cache::Words = super::words::be_words(content.as_slice())
        .map(AtomicU64::new)
        .collect();
    io.cache().insert(table, words);
    slot.store(raw, Ordering::Release);
    io.meta_writes.fetch_add(1, Ordering::AcqRel);
    if shared != 0 {
        // The snapshot keeps the old table; the active image's reference
        // to it goes once the L1 entry no longer points there on disk.
        flush_file(io).await?;
        release_cluster(io, a, shared).await?;
    }
    Ok(table)
}

/// Points the L2 entry of guest offset `off` (in the table at `l2`) at
/// `raw`: on disk first, then in the cache.
async fn set_l2_entry(io: &Qcow2Io, a: &Allocator, l2: u64, off: u64, raw: u64) -> Result<(), i32> {
    let idx = io.geo.guest_position(off).l2_index as usize;
    let at = l2 + idx as u64 * 8;
    let unit = at / a.unit * a.unit;
    let _l2 = a.meta_locks.lock(unit, unit + a.unit).await?;
    let table = loop {
        if let Some(t) = io.cache().table(l2) {
            break t;
        }
        load_table(io, l2).await?;
    };
    let mut buf = meta_buf(io, a.unit as usize)?;
    put_table_words(buf.as_mut_slice(), unit, l2, |i| {
        if i == idx {
            raw
        } else {
            table.get(i).map_or(0, |w| w.load(Ordering::Acquire))
        }
    });
    io.file
        .get()
        .debug_event(crate::qapi::BlkdebugEvent::L2Update);
    write_file(io, unit, &mut buf).await?;
    if let Some(w) = table.get(idx) {
        w.store(raw, Ordering::Release);
    }
    io.meta_writes.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

/// Discards the whole clusters of the request: each reads as zeroes (or
/// from the backing node, where there is none to hide) and the cluster it
/// held counts one reference less; one that nothing holds any more is
/// freed and, with `pass-discard-request`, discarded in the file too.
/// Parts of clusters are left alone, as QEMU does.
pub(super) async fn discard_task(io: Arc<Qcow2Io>, req: IoRequest) -> i32 {
    let Some(a) = io.alloc.as_ref() else {
        return -libc::EROFS;
    };
    let cs = io.geo.cluster_size();
    let first = req.offset().div_ceil(cs) * cs;
    let end = (req.offset() + req.len()) / cs * cs;
    let mut freed = Vec::new();
    let mut at = first;
    while at < end {
        match discard_cluster(&io, a, at).await {
            Ok(Some(map)) => freed.extend(held_clusters(&io, map)),
            Ok(None) => {}
            Err(e) => return e,
        }
        at += cs;
    }
    if freed.is_empty() {
        return 0;
    }
    // The tables no longer point at the clusters on disk before their
    // refcounts drop: a crash in between leaks them, never worse.
    if let Err(e) = flush_file(&io).await {
        return e;
    }
    for host in freed {
        match release_cluster(&io, a, host).await {
            // A snapshot (or other compressed data) still holds it.
            Ok(left) if left > 0 => continue,
            Ok(_) => {}
            Err(e) => return e,
        }
        if io.pass_discard {
            let r = task::submit(
                io.file.get(),
                &IoRequest::without_data(IoKind::Discard, host, cs, 0),
            )
            .await;
            if r < 0 {
                log::debug!(
                    "qcow2 node '{}': discarding {host} in the file: {r}",
                    io.name
                );
            }
        }
    }
    0
}

/// Unmaps one cluster; the mapping it had (whose clusters then count one
/// reference less), if it had one.
async fn discard_cluster(io: &Qcow2Io, a: &Allocator, at: u64) -> Result<Option<Map>, i32> {
    let cs = io.geo.cluster_size();
    let _cluster = a.guest_locks.lock(at, at + cs).await?;
    let (map, _) = resolve(io, at).await?;
    let has_backing = io.backing_len().is_some();
    let entry = match (map, has_backing) {
        (Map::Unallocated, false) | (Map::Zero, _) => return Ok(None),
        // Unallocated over a backing node shows the backing data; only a
        // zero cluster can hide it, and version 2 has none.
        (_, true) if io.version < 3 => return Ok(None),
        (_, true) => L2Entry::Zero {
            host_offset: None,
            copied: false,
        },
        (_, false) => L2Entry::Unallocated,
    };
    let raw = entry
        .encode(&io.geo)
        .map_err(|e| io.corrupt(&format!("new L2 entry: {e}")))?;
    let l2 = ensure_l2(io, a, at).await?;
    set_l2_entry(io, a, l2, at, raw).await?;
    Ok(Some(map))
}
